"""The block graph: every open node by name, and the only code that opens, links and
closes nodes.

Theory of operation
===================

**Opening** (:meth:`Graph.open_node`, QEMU's ``bdrv_open``). A node's children are opened first
(``file``/``image``: an inline options object, or the name of an existing node), then the node gets
its name, its permissions are taken, the driver opens, and last the ``backing`` child of a format
that has one (docs/qemu-behaviour/blockdev.md §2: from the image header when ``backing`` is left
out, through :mod:`blockd.block.names.backing`; none for ``null``; an existing node for a name). A
failure anywhere closes every node the call opened and leaves the graph as it was.

**Names** (docs/qemu-behaviour/blockdev.md §1). A top-level node must have a ``node-name``; nested
nodes without one get ``#block<counter><2 random digits>``. Names are unique, well formed and short.

**Inheritance.** Children inherit ``read-only``, ``auto-read-only``, ``cache``,
``discard`` and ``force-share`` unless they set them; backing nodes are read-only unless
they say otherwise.

**References.** A node lives while anything holds it: the monitor (top-level
``blockdev-add``), parent nodes (one per link) or users. When the last reference goes the
node is flushed and closed, then its children lose a reference in turn. ``blockdev-del``
removes the monitor's reference (docs/qemu-behaviour/blockdev.md §5). Closing cannot be
interrupted (each node's flush and close is shielded) but is bounded: a node whose storage
does not answer within :data:`NODE_CLOSE_SECONDS` is logged, listed in
:attr:`Graph.unflushed` and dropped.

**Permissions.** After every change the graph recomputes the permissions of the nodes linked to it
(:meth:`Graph.linked`, the part of the graph the change touches; no other node's can change) with
:mod:`blockd.block.permissions` (QEMU's rules, docs/qemu-behaviour/blockdev.md §6), checks them as a
whole before anything is applied, and then mirrors each ``file`` node's cumulative permissions into
QEMU-compatible lock bytes (:mod:`blockd.block.host.locking`): other QEMU processes see them, and
what another process holds is refused (``Failed to get "write" lock``).

API for jobs
============

* ``node.block(reason)`` / ``node.unblock(reason)``: operation blockers. ``blockdev-del``
  and :meth:`BlockNode.check_not_busy` refuse with ``Node '<n>' is busy: <reason>``.
* :meth:`Graph.add_user` / :meth:`Graph.remove_user` with a
  :class:`~blockd.block.node.NodeUser` (``perm``/``shared`` as
  :class:`~blockd.block.host.locking.Perm`): a job's hold on a node; a writer takes
  ``Perm.WRITE`` and leaves it out of ``shared`` to be the only writer.
* :meth:`Graph.freeze_chain` / :meth:`Graph.unfreeze_chain`: frozen links between ``top``
  and ``base``; :meth:`Graph.set_child`, :meth:`Graph.insert_filter` and
  :meth:`Graph.remove_filter` refuse to change them.
* :meth:`Graph.reopen` turns a node (and the children that inherited it) read-write or
  read-only, e.g. a read-only top for a stream.
* :meth:`Graph.generate_name` gives the next ``#block...`` name (for an implicit filter).
* After rewriting an image header's backing name, set ``node.auto_backing_file`` to the
  new string so the node keeps a plain (not ``json:``) filename.

Drivers may define ``async def reopen(self, read_only: bool)``; :meth:`Graph.reopen`
calls it (``file`` reopens its descriptor, keeping its lock bytes).
"""

from __future__ import annotations

import contextlib
import logging
import random
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any, Final

import trio

from blockd.block import permissions
from blockd.block.driver import Driver
from blockd.block.drivers import DRIVERS, JOB_FILTERS
from blockd.block.host.locking import PERM_ALL, LockError, Perm
from blockd.block.names.backing import (
    check_header_name_passes,
    header_backing_options,
    image_path,
)
from blockd.block.names.filename import node_filename
from blockd.block.node import BlockNode, NodeUser
from blockd.errors import HostError, QMPError, RequestError

log = logging.getLogger(__name__)

NODE_NAME_MAX: Final = 31
#: The longest flushing and closing one node may take once its last reference goes
#: (``blockdev-del``, a job's end, shutdown). It runs shielded, so that a half-closed
#: node is never left behind; the bound keeps a disk that stopped answering from hanging
#: the command or the daemon's exit. Generous: a healthy flush of a big write-back cache
#: takes seconds at most.
NODE_CLOSE_SECONDS: Final = 10.0
_WELLFORMED: Final = re.compile(r"[A-Za-z][A-Za-z0-9._-]*\Z")


@dataclass(frozen=True)
class _Inherit:
    """Options a child takes from its parent unless it sets them itself."""

    read_only: bool = False
    auto_read_only: bool = False
    cache: Mapping[str, bool] | None = None
    discard: str | None = None
    force_share: bool = False


@dataclass(frozen=True)
class _Level:
    """One backing link of a chain being opened: ``child`` becomes the backing node of
    ``parent``. ``existing``: a node given by name (its chain is complete already);
    ``implicit``: from the image header. ``options``/``inherit``: what ``child`` was
    opened with (its own backing comes from them)."""

    parent: BlockNode
    child: BlockNode
    options: Mapping[str, Any]
    inherit: _Inherit
    existing: bool
    implicit: bool


def _prefixed(exc: QMPError, times: int) -> QMPError:
    """``exc`` as the backing opens ``times`` levels up report it (QEMU prefixes the
    error of each ``bdrv_open_backing_file``)."""
    return type(exc)("Could not open backing file: " * times + exc.desc)


class _LinkFailed(Exception):
    """A backing link of a chain being opened was refused with ``error`` at ``depth``
    (0: the top's link)."""

    def __init__(self, depth: int, error: QMPError) -> None:
        super().__init__(error.desc)
        self.depth = depth
        self.error = error


class Graph:
    """All nodes of the daemon, oldest first in :attr:`nodes`; see the module docstring."""

    def __init__(self) -> None:
        self.nodes: dict[str, BlockNode] = {}
        self._classes: dict[BlockNode, type[Driver]] = {}
        self._inherits_ro: set[BlockNode] = set()  # opened inline without 'read-only'
        self._counter = 0
        self._random = random.Random()
        #: Follow ``json:`` and protocol-prefixed backing names found in image headers
        #: (the daemon's ``--allow-header-json``); off, such names are refused.
        self.allow_header_json = False
        #: The longest one node's flush and close may take (:data:`NODE_CLOSE_SECONDS`).
        self.close_seconds: float = NODE_CLOSE_SECONDS
        #: Nodes given up at that deadline, oldest first: their data may not be on disk.
        self.unflushed: list[str] = []
        #: The node being flushed and closed right now, if any (for a shutdown report).
        self.closing: str | None = None
        #: Told ``(node-name, message)`` when a request finds a node's image corrupt
        #: (the daemon sends ``BLOCK_IMAGE_CORRUPTED``).
        self.corruption_sink: Callable[[str, str], None] | None = None

    # -- lookup ----------------------------------------------------------------------

    def find(self, name: str) -> BlockNode | None:
        return self.nodes.get(name)

    def get(self, name: str) -> BlockNode:
        """The node called ``name``, looked up as QEMU's ``bdrv_lookup_bs(NULL, name)``.

        Raises:
            RequestError: ``Cannot find device='' nor node-name='<name>'``.
        """
        node = self.nodes.get(name)
        if node is None:
            raise RequestError(f"Cannot find device='' nor node-name='{name}'")
        return node

    def newest_first(self) -> list[BlockNode]:
        """Every node, newest first (the order of query-named-block-nodes)."""
        return list(reversed(self.nodes.values()))

    # -- names -----------------------------------------------------------------------

    def generate_name(self) -> str:
        """A fresh ``#block<counter><2 random digits>`` name (QEMU's ``id_generate``)."""
        while True:
            name = f"#block{self._counter}{self._random.randrange(100):02d}"
            self._counter += 1
            if name not in self.nodes:
                return name

    def check_name(self, name: str) -> None:
        """Raise QEMU's error for an unusable user-given ``node-name``
        (docs/qemu-behaviour/blockdev.md §1)."""
        if not _WELLFORMED.match(name):
            raise RequestError(f"Invalid node-name: '{name}'")
        if name in self.nodes:
            raise RequestError(f"Duplicate nodes with node-name='{name}'")
        if len(name) > NODE_NAME_MAX:
            raise RequestError("Node name too long")

    # -- opening ---------------------------------------------------------------------

    async def open_node(self, options: Mapping[str, Any], *, top_level: bool) -> BlockNode:
        """Open the node tree ``options`` (blockdev-add's arguments, wire names).

        A ``top_level`` node must be named and becomes owned by the monitor (only such
        nodes can be removed with ``blockdev-del``).

        Raises:
            QMPError: QEMU's text; every node this call opened is closed again.
        """
        if top_level and options.get("node-name") is None:
            raise RequestError("'node-name' must be specified for the root node")
        try:
            node = await self._open(options, _Inherit())
        except OSError as exc:  # a driver's I/O failed while opening: report, do not crash
            raise HostError.from_oserror(exc) from exc
        if top_level:
            node.monitor_owned = True
        else:
            # nothing holds a nested-only open yet: the caller takes it over via a link
            node.monitor_owned = False
        return node

    async def _open_ref(self, ref: Any, inherit: _Inherit) -> BlockNode:
        if isinstance(ref, str):
            node = self.find(ref)
            if node is None:
                raise RequestError(f"Cannot find device='{ref}' nor node-name='{ref}'")
            return node
        return await self._open(ref, inherit)

    async def _open(
        self, options: Mapping[str, Any], inherit: _Inherit, *, job_filter: bool = False
    ) -> BlockNode:
        """Open the node tree ``options``: the node, its ``file`` child, then its backing
        chain (:meth:`_open_backing_chain`). A failure closes what the call opened."""
        node, child_inherit = await self._open_one(options, inherit, job_filter=job_filter)
        if self._classes[node].supports_backing:
            try:
                await self._open_backing_chain(node, options, child_inherit)
            except BaseException:
                await self._discard(node)
                raise
        return node

    async def _open_one(
        self, options: Mapping[str, Any], inherit: _Inherit, *, job_filter: bool = False
    ) -> tuple[BlockNode, _Inherit]:
        """Open one node and its ``file`` child (recursively: options nest at most
        :data:`blockd.qmp.validate.MAX_DEPTH` deep), not its backing; the node and what
        its children inherit."""
        driver_name = options.get("driver")
        cls = (JOB_FILTERS if job_filter else DRIVERS).get(str(driver_name))
        if cls is None:
            raise RequestError(f"Unknown driver '{driver_name}'")
        opts = dict(options)
        opts.setdefault("read-only", inherit.read_only)
        opts.setdefault("auto-read-only", inherit.auto_read_only)
        if inherit.force_share:
            opts.setdefault("force-share", True)
        if inherit.discard is not None:
            opts.setdefault("discard", inherit.discard)
        cache = dict(inherit.cache or {})
        cache.update(options.get("cache") or {})
        if cache:
            opts["cache"] = cache
        read_only = bool(opts["read-only"])
        if opts.get("force-share") and not read_only:
            raise RequestError("force-share=on can only be used with read-only images")
        detect = opts.get("detect-zeroes", "off")
        if detect == "unmap" and opts.get("discard", "ignore") != "unmap":
            raise RequestError(
                "setting detect-zeroes to unmap is not allowed without setting discard "
                "operation to unmap"
            )
        child_inherit = _Inherit(
            read_only,
            bool(opts["auto-read-only"]),
            cache or None,
            opts.get("discard"),
            bool(opts.get("force-share", False)),
        )

        # QEMU opens a format's or filter's ``file`` before naming the node; drivers
        # that open their child themselves (blkdebug's ``image``) are named first.
        child: BlockNode | None = None
        name_first = cls.protocol_name is not None or cls.child_role != "file"
        if cls.child_role in options and not name_first:
            child = await self._open_ref(options[cls.child_role], child_inherit)
        try:
            name = options.get("node-name")
            if name is None:
                name = self.generate_name()
            else:
                self.check_name(str(name))
            if cls.child_role in options and name_first:
                # hold the name (and its place in the newest-first order) meanwhile
                self.nodes[name] = BlockNode(name, {})
                try:
                    child = await self._open_ref(options[cls.child_role], child_inherit)
                except BaseException:
                    del self.nodes[name]
                    raise
        except BaseException:
            if child is not None:
                await self._unref(child)
            raise
        node = BlockNode(str(name), opts, read_only=read_only)
        node.child_role = cls.child_role
        node.on_corruption = self._corrupted
        self.nodes[node.name] = node
        self._classes[node] = cls
        if "read-only" not in options:
            self._inherits_ro.add(node)
        if child is not None:
            self._attach(node, cls.child_role, child)
        try:
            if "backing" in options and not cls.supports_backing and cls.child_role != "backing":
                raise RequestError(
                    f"Driver '{cls.format_name}' of node '{node.name}' does not support "
                    "backing files"
                )
            self.refresh_permissions([node])
            node.driver = await cls.open(node, opts)
            header = node.driver.header_backing()
            node.auto_backing_file = header[0] if header is not None else ""
        except BaseException:
            await self._discard(node)
            raise
        return node, child_inherit

    async def _discard(self, node: BlockNode) -> None:
        """Close ``node``, opened by a call that failed, and what only it held."""
        before = self.linked([node])
        await self._unref(node)  # shielded and bounded inside
        # the children it held (an existing node named as its file) give up the
        # permissions and lock bytes it took; fewer permissions never conflict
        with contextlib.suppress(QMPError):
            self.refresh_permissions(before)

    async def _open_backing_chain(
        self, top: BlockNode, options: Mapping[str, Any], inherit: _Inherit
    ) -> None:
        """Open the backing chain below the format node ``top`` (opened from ``options``)
        and link it, as QEMU's recursive ``bdrv_open_backing_file`` does, in a loop: a
        chain of any length opens without recursion.

        Each image down the chain is opened (its ``file`` child first, its backing not
        yet), then the next one below it, until an image has no backing file or the
        backing is an existing node; then the links are made from the bottom up. An
        error at depth ``k`` carries ``k`` times QEMU's ``Could not open backing file:``
        prefix, as the recursion would give it. Images named by headers must not repeat
        (the same host file in the same format): such a chain never ends, so it is
        refused (``creates an infinite loop``) instead of opened until memory runs out.
        On failure every image the call opened is closed again.
        """
        levels: list[_Level] = []  # the links to make, top first
        node, opts, inh = top, options, inherit
        seen = {(self._identity(top), top.drv)}
        prefixes = 0
        try:
            while True:
                prefixes = len(levels) + 1
                level = await self._open_backing(node, opts, inh, seen)
                if level is None:
                    break
                levels.append(level)
                if level.existing or not self._classes[level.child].supports_backing:
                    break
                node, opts, inh = level.child, level.options, level.inherit
            self._link_chain(top, levels)
        except BaseException as exc:
            for level in reversed(levels):  # linked children close with their parents
                if not level.existing:
                    await self._discard(level.child)
            if isinstance(exc, _LinkFailed):  # the link at depth k: k prefixes
                raise _prefixed(exc.error, exc.depth) from exc.error
            if isinstance(exc, QMPError) and prefixes:
                raise _prefixed(exc, prefixes) from exc
            raise

    async def _open_backing(
        self,
        node: BlockNode,
        options: Mapping[str, Any],
        inherit: _Inherit,
        seen: set[tuple[tuple[int, int] | None, str]],
    ) -> _Level | None:
        """Open the backing node of ``node`` (opened from ``options``), not its own
        backing; None when ``node`` has none. ``seen``: the host files (and formats) of
        the chain above, for the loop check; the new image is added.

        Raises:
            QMPError: QEMU's text, without the ``Could not open backing file`` prefix;
                nothing stays open then.
        """
        backing_inherit = replace(inherit, read_only=True, auto_read_only=False)
        ref = options.get("backing")
        if "backing" in options and (ref is None or ref == ""):
            return None
        header = node.driver.header_backing()
        if "backing" not in options and (header is None or not header[0]):
            return None
        if "backing" in options:
            if isinstance(ref, Mapping) and header is not None and header[0]:
                check_header_name_passes(ref)
            if not isinstance(ref, Mapping):
                child = await self._open_ref(ref, backing_inherit)
                return _Level(node, child, {}, backing_inherit, existing=True, implicit=False)
            child_options: Mapping[str, Any] = ref
        else:
            assert header is not None
            child_options = await header_backing_options(
                node, *header, allow_json=self.allow_header_json
            )
        child, child_inherit = await self._open_one(child_options, backing_inherit)
        image = (self._identity(child), child.drv)
        if image in seen and header is not None and "backing" not in options:
            await self._discard(child)
            raise RequestError(
                f"Backing file '{header[0]}' of '{image_path(node)}' creates an infinite loop"
            )
        seen.add(image)
        return _Level(
            node, child, child_options, child_inherit, existing=False,
            implicit="backing" not in options,
        )  # fmt: skip

    def _link_chain(self, top: BlockNode, levels: list[_Level]) -> None:
        """Make the links of ``levels`` from the bottom up, as the recursion did.

        The permissions are refreshed once, for the whole chain: refreshing them after
        each link would plan the growing chain again and again. A chain that the single
        refresh refuses is unlinked and linked again with one refresh per link, so that
        the error is the one the recursion met (fewer links never conflict more).

        Raises:
            _LinkFailed: a cycle (a node given by name) or a permission conflict at a
                depth; that link is not made, the ones below it are.
        """
        names: dict[BlockNode, str] = {}  # filenames of the chain, bottom up
        for depth in range(len(levels) - 1, -1, -1):
            self._link_backing(levels[depth], names, depth)
        try:
            self.refresh_permissions([top])
            return
        except QMPError:
            for level in levels:
                self._detach(level.parent, "backing")
        for depth in range(len(levels) - 1, -1, -1):
            self._link_backing(levels[depth], names, depth)
            try:
                self.refresh_permissions([levels[depth].parent])
            except QMPError as exc:
                self._detach(levels[depth].parent, "backing")
                raise _LinkFailed(depth, exc) from exc

    def _link_backing(self, level: _Level, names: dict[BlockNode, str], depth: int) -> None:
        """Make ``level.child`` the backing node of ``level.parent`` (permissions not
        refreshed); ``names``: the filenames of the nodes below, kept by the caller.

        Raises:
            _LinkFailed: the link would make a cycle; it is not made.
        """
        node, child = level.parent, level.child
        try:
            self._check_cycle(node, "backing", child)
        except RequestError as exc:
            raise _LinkFailed(depth, exc) from exc
        if level.implicit:
            node.implicit_backing = True
            node.auto_backing_file = node_filename(child, names)
        self._attach(node, "backing", child)

    @staticmethod
    def _identity(node: BlockNode) -> tuple[int, int] | None:
        """The host file under ``node`` (its protocol node's), as ``(st_dev, st_ino)``."""
        below = node
        while not below.is_protocol and below.file is not None:
            below = below.file
        return below.driver.file_identity()

    # -- links and references --------------------------------------------------------

    @staticmethod
    def _below(node: BlockNode) -> Iterator[BlockNode]:
        seen: set[int] = set()
        stack = list(node.children.values())
        while stack:
            current = stack.pop()
            if id(current) in seen:
                continue
            seen.add(id(current))
            yield current
            stack.extend(current.children.values())

    def _check_cycle(self, parent: BlockNode, role: str, child: BlockNode) -> None:
        if child is parent or any(n is parent for n in self._below(child)):
            raise RequestError(
                f"Making '{child.name}' a {role} child of '{parent.name}' would create a cycle"
            )

    @staticmethod
    def _attach(parent: BlockNode, role: str, child: BlockNode) -> None:
        parent.children[role] = child
        child.parents.append(parent)

    @staticmethod
    def _detach(parent: BlockNode, role: str) -> BlockNode | None:
        child = parent.children.pop(role, None)
        if child is not None:
            child.parents.remove(parent)
        return child

    async def _unref(self, node: BlockNode) -> None:
        """Drop a reference; close ``node`` (then its orphaned children, depth first, in
        a loop: a backing chain of any length) when none is left."""
        stack = [node]
        while stack:
            node = stack.pop()
            if node.parents or node.users or node.monitor_owned or node not in self._classes:
                continue  # still referenced, or closed already
            if self.nodes.get(node.name) is node:
                del self.nodes[node.name]
            self._classes.pop(node, None)
            self._inherits_ro.discard(node)
            if hasattr(node, "driver"):
                await self._close_driver(node)
            orphans = [self._detach(node, role) for role in list(node.children)]
            stack.extend(child for child in reversed(orphans) if child is not None)

    def _corrupted(self, node: BlockNode, message: str) -> None:
        """A request found ``node``'s image corrupt (:meth:`BlockNode.corrupted`): log it
        as QEMU does (nothing is written to the image) and tell the sink."""
        log.error(
            "%s: Image is corrupt: %s; further non-fatal corruption events will be suppressed",
            node.drv,
            message,
        )
        if self.corruption_sink is not None:
            self.corruption_sink(node.name, message)

    async def _close_driver(self, node: BlockNode) -> None:
        """Flush and close ``node``'s driver; shielded, bounded by :attr:`close_seconds`.

        A failed flush or close does not keep the node open (as QEMU). A flush or close still
        running at the deadline is given up: the node is logged as an error and listed in
        :attr:`unflushed`, and the caller goes on with the next node.
        """
        self.closing = node.name
        try:
            with trio.CancelScope(shield=True):
                with trio.move_on_after(self.close_seconds) as bound:
                    with contextlib.suppress(OSError, QMPError):
                        await node.driver.flush()
                    try:
                        await node.driver.close()
                    except Exception:  # a close cannot fail the caller (QEMU's cannot)
                        log.exception("node '%s': closing failed", node.name)
        finally:
            self.closing = None
        if bound.cancelled_caught:
            self.unflushed.append(node.name)
            log.error(
                "node '%s': flush and close did not finish within %gs (storage not "
                "responding); closed without flushing its data",
                node.name,
                self.close_seconds,
            )

    # -- blockdev-del ----------------------------------------------------------------

    async def delete(self, name: str) -> None:
        """``blockdev-del``: remove the monitor's node ``name``
        (docs/qemu-behaviour/blockdev.md §5, QEMU's order).

        On success the node is flushed and closed, its lock bytes released, and its
        children closed too unless something else holds them.

        Raises:
            RequestError: not found, used by a front end (a job's reader or writer),
                busy (a job's blocker, or the backing of another node), not
                monitor-owned, in use (another node's ``file``, a user).
        """
        node = self.find(name)
        if node is None:
            raise RequestError(f"Failed to find node with node-name='{name}'")
        if node.has_backend:
            raise RequestError(f"Node {name} is in use")
        node.check_not_busy()
        for parent in reversed(node.parents):  # QEMU's backing-link blocker, newest first
            if parent.children.get("backing") is node:
                raise RequestError(
                    f"Node '{name}' is busy: node is used as backing hd of '{parent.name}'"
                )
        if not node.monitor_owned:
            raise RequestError(f"Node {name} is not owned by the monitor")
        if node.in_use:
            raise RequestError(f"Block device {name} is in use")
        node.monitor_owned = False
        before = self.linked([node])
        await self._unref(node)  # shielded and bounded inside
        self.refresh_permissions(before)

    async def close_all(self) -> None:
        """Flush and close every node, parents before their children."""
        for node in self.newest_first():
            node.monitor_owned = False
            node.users.clear()
        for node in self.newest_first():
            if node.name in self.nodes and not node.parents:
                await self._unref(node)
        self.nodes.clear()
        self._classes.clear()
        self._inherits_ro.clear()

    # -- permissions -----------------------------------------------------------------

    def link_kind(self, parent: BlockNode) -> str:
        """How ``parent`` uses its non-backing child (a ``kind`` of
        :func:`~blockd.block.permissions.link_perms`)."""
        cls = self._classes.get(parent)
        if cls is not None and cls.supports_backing:
            return permissions.METADATA
        if cls is None:
            return permissions.PASSTHROUGH
        driver = parent.__dict__.get("driver")  # not there yet while it opens
        return driver.link_kind if driver is not None else cls.link_kind

    def linked(self, nodes: Iterable[BlockNode]) -> list[BlockNode]:
        """The open nodes connected to ``nodes`` by parent/child links (``nodes`` among
        them): permissions flow only along links, so a change inside this part of the
        graph leaves every other node's permissions as they were."""
        seen: dict[BlockNode, None] = {}
        stack = [n for n in nodes if n in self._classes]
        while stack:
            node = stack.pop()
            if node in seen:
                continue
            seen[node] = None
            stack.extend(p for p in node.parents if p not in seen)
            stack.extend(c for c in node.children.values() if c not in seen)
        return list(seen)

    def refresh_permissions(self, around: Iterable[BlockNode] | None = None) -> None:
        """Recompute the permissions of every node, or only of the part of the graph
        :meth:`linked` to ``around`` (after a change there: for a change that removed
        links, pass the nodes linked before it), check them, then update lock bytes.

        Raises:
            RequestError: ``Block node is read-only`` or a permission conflict (4.6).
            HostError: another process holds a lock byte we need; nothing changed.
        """
        nodes = self.nodes.values() if around is None else self.linked(around)
        totals = permissions.check(permissions.plan(nodes, self.link_kind))
        changed: list[tuple[Any, Perm, Perm]] = []
        try:
            for node, (perm, shared) in totals.items():
                locks = getattr(getattr(node, "driver", None), "locks", None)
                if locks is None:
                    continue
                if (locks.perm, locks.unshared) == (perm, PERM_ALL & ~shared):
                    continue
                locks.check(perm, shared)
                changed.append((locks, locks.perm, PERM_ALL & ~locks.unshared))
                locks.apply(perm, shared)
        except (LockError, OSError) as exc:
            for locks, perm, shared in reversed(changed):
                locks.apply(perm, shared)
            if isinstance(exc, LockError):
                raise HostError(str(exc)) from exc
            raise HostError.from_oserror(exc) from exc
        for node, (perm, shared) in totals.items():
            node.perm, node.shared = perm, shared

    def add_user(self, node: BlockNode, user: NodeUser) -> None:
        """Let ``user`` use ``node`` with its permissions.

        Raises:
            RequestError, HostError: as :meth:`refresh_permissions`; ``user`` is not added.
        """
        node.users.append(user)
        try:
            self.refresh_permissions([node])
        except BaseException:
            node.users.remove(user)
            raise

    async def remove_user(self, node: BlockNode, user: NodeUser) -> None:
        """Drop ``user``; closes ``node`` if that was its last reference."""
        if user in node.users:
            node.users.remove(user)
            before = self.linked([node])
            await self._unref(node)  # shielded and bounded inside
            self.refresh_permissions(before)

    # -- frozen links ----------------------------------------------------------------

    @staticmethod
    def _chain_links(top: BlockNode, base: BlockNode | None) -> Iterator[tuple[BlockNode, str]]:
        node: BlockNode | None = top
        while node is not None and node is not base:
            role = node.child_role if node.is_filter else "backing"
            child = node.children.get(role)
            if child is None:
                return
            yield node, role
            node = child

    def freeze_chain(self, top: BlockNode, base: BlockNode | None) -> None:
        """Freeze every filter/backing link from ``top`` down to ``base`` (exclusive).

        Raises:
            RequestError: ``Cannot change '<role>' link from '<a>' to '<b>'`` when a link
                is frozen already, ``Cannot freeze '<role>' link to '<b>'`` for a node that
                must never be frozen. Nothing is frozen then.
        """
        links = list(self._chain_links(top, base))
        for node, role in links:
            if role in node.frozen:
                child = node.children[role]
                raise RequestError(
                    f"Cannot change '{role}' link from '{node.name}' to '{child.name}'"
                )
        for node, role in links:
            child = node.children[role]
            if child.never_freeze:
                raise RequestError(f"Cannot freeze '{role}' link to '{child.name}'")
        for node, role in links:
            node.frozen.add(role)

    def unfreeze_chain(self, top: BlockNode, base: BlockNode | None) -> None:
        """Undo :meth:`freeze_chain` for the same ``top`` and ``base``."""
        for node, role in list(self._chain_links(top, base)):
            node.frozen.discard(role)

    # -- graph changes ---------------------------------------------------------------

    async def set_child(self, parent: BlockNode, role: str, child: BlockNode | None) -> None:
        """Make ``child`` the ``role`` child of ``parent`` (``None`` removes the link).

        The old child loses a reference (and is closed when that was its last).

        Raises:
            RequestError: the link is frozen, a cycle, or a permission problem; nothing
                changed then.
        """
        old = parent.children.get(role)
        if old is child:
            return
        if role in parent.frozen and old is not None:
            target = child.name if child is not None else ""
            raise RequestError(
                f"Cannot change frozen '{role}' link from '{parent.name}' to '{target}'"
            )
        if child is not None:
            self._check_cycle(parent, role, child)
        self._detach(parent, role)
        if child is not None:
            self._attach(parent, role, child)
        try:
            self.refresh_permissions([parent] if old is None else [parent, old])
        except BaseException:
            self._detach(parent, role)
            if old is not None:
                self._attach(parent, role, old)
            raise
        if old is not None:
            before = self.linked([old])
            await self._unref(old)  # shielded and bounded inside
            self.refresh_permissions(before)  # what the old child held, if it closed

    def _move_parents(self, old: BlockNode, new: BlockNode, *, skip: BlockNode | None) -> None:
        moves = [
            (parent, role)
            for parent in list(old.parents)
            if parent is not skip
            for role, child in parent.children.items()
            if child is old
        ]
        for parent, role in moves:
            if role in parent.frozen:
                raise RequestError(f"Cannot change '{role}' link to '{old.name}'")
        for parent, role in moves:
            self._detach(parent, role)
            self._attach(parent, role, new)

    async def replace_node(self, old: BlockNode, new: BlockNode) -> None:
        """Link every parent of ``old`` to ``new`` instead (QEMU's ``bdrv_replace_node``);
        ``old`` loses those references (and is closed when they were its last).

        Raises:
            RequestError: a parent's link is frozen, the change would make a cycle, or
                permissions refuse; nothing changed then.
        """
        links = [
            (parent, role)
            for parent in dict.fromkeys(old.parents)
            for role, child in parent.children.items()
            if child is old
        ]
        for parent, role in links:
            if role in parent.frozen:
                raise RequestError(f"Cannot change '{role}' link to '{old.name}'")
            self._check_cycle(parent, role, new)
        before = self.linked([old, new])
        for parent, role in links:
            self._detach(parent, role)
            self._attach(parent, role, new)
        try:
            self.refresh_permissions([new])
        except BaseException:
            for parent, role in links:
                self._detach(parent, role)
                self._attach(parent, role, old)
            self.refresh_permissions(before)
            raise
        await self._unref(old)  # shielded and bounded inside
        self.refresh_permissions(before)

    async def insert_filter(
        self, options: Mapping[str, Any], above: BlockNode, *, read_only: bool | None = None
    ) -> BlockNode:
        """Open filter ``options`` (its child being ``above``) and give it every parent of
        ``above``. Without ``node-name`` the filter gets a generated name and is implicit
        (it shows its child's filename, as QEMU's implicit filters do). The filter is
        read-only as ``above`` is, unless ``read_only`` says otherwise.

        Raises:
            QMPError: the filter cannot be opened or the parents cannot move (frozen
                links, permissions); the graph is unchanged then.
        """
        filt = await self._open(
            options,
            _Inherit(read_only=above.read_only if read_only is None else read_only),
            job_filter=str(options.get("driver")) in JOB_FILTERS,
        )
        filt.implicit = options.get("node-name") is None
        filt.users.append(NodeUser("graph change", "insert"))  # holds it while moving
        try:
            self._move_parents(above, filt, skip=filt)
            self.refresh_permissions([filt])
        except BaseException:
            self._move_parents(filt, above, skip=None)
            filt.users.clear()
            await self._unref(filt)  # shielded and bounded inside
            self.refresh_permissions()
            raise
        filt.users.clear()
        return filt

    async def remove_filter(self, filt: BlockNode) -> None:
        """Give the parents of filter ``filt`` back to its child and close the filter.

        Raises:
            RequestError: a parent link is frozen or permissions refuse; nothing changed.
        """
        below = filt.file
        if below is not None:
            self._move_parents(filt, below, skip=None)
        before = self.linked([filt])
        await self._unref(filt)  # shielded and bounded inside
        self.refresh_permissions(before)

    async def reopen(self, node: BlockNode, *, read_only: bool) -> None:
        """Reopen ``node`` read-only or read-write, with the children (not backing) that
        inherited its mode; explicitly set children keep theirs.

        Raises:
            RequestError: ``Block node is read-only`` (a child set read-only explicitly)
                or a permission conflict; the old mode stays then.
            HostError: a file cannot be reopened in the new mode.
        """
        targets = [node]
        stack = [node]
        while stack:
            current = stack.pop()
            for role, child in current.children.items():
                inherits = child in self._inherits_ro
                if role != "backing" and inherits and child not in targets:
                    targets.append(child)
                    stack.append(child)
        old = {n: n.read_only for n in targets}
        changed = [n for n in targets if n.read_only != read_only]
        if read_only:
            # format drivers write their cached metadata back while they still may
            for n in changed:
                await n.flush()
        reopened: list[BlockNode] = []
        try:
            if read_only:
                for n in changed:
                    n.read_only = True
                self.refresh_permissions([node])
            for n in reversed(changed) if not read_only else changed:
                hook = getattr(n.driver, "reopen", None)
                if hook is not None:
                    await hook(read_only)
                    reopened.append(n)
                n.read_only = read_only
            if not read_only:
                self.refresh_permissions([node])
        except BaseException:
            for n in reversed(reopened):
                hook = getattr(n.driver, "reopen", None)
                if hook is not None:
                    # the driver's own write-back, bounded as the driver bounds it (the
                    # shutdown watchdog of blockd.run for a disk that stops answering)
                    with trio.CancelScope(shield=True):
                        await hook(old[n])
            for n, value in old.items():
                n.read_only = value
            self.refresh_permissions([node])
            raise
        for n in changed:
            n.options["read-only"] = read_only
