"""``blkdebug``: a filter that fails chosen requests, for tests (QEMU's ``block/blkdebug.c``).

Theory of operation (docs/qemu-behaviour/blockdev.md §3):

* The node has a numbered *state*, 1 at open. Rules are attached to *events*.
  ``inject-error`` rules arm an error; ``set-state`` rules move the state machine.
* Events come from the node above through :meth:`BlockNode.debug_event`: a format
  driver fires them on its ``file`` child at the points QEMU does (``read_aio`` right
  before a qcow2 or raw data read, ``l2_load`` before an L2 table is read,
  ``write_aio``, ``cluster_alloc``, ...; ``flush_to_os``/``flush_to_disk`` when the
  parent is flushed). Requests that arrive without an event (a qcow2 header read)
  only meet the rules armed earlier. ``none`` fires once at open.
* When an event fires, its rules whose ``state`` matches (0 = any) are processed in the
  order given: the first matching inject rule *replaces* the set of active rules, further
  ones join it; the first matching set-state rule given wins and the state changes
  once all rules were processed (every rule sees the old state).
* Every request then checks the active rules: the first one whose I/O type matches and
  whose ``sector`` is any (-1) or lies inside a non-empty request fails it with
  ``errno``. A ``once`` rule is deleted when it fires. Unless ``immediately`` is set
  the failing request yields once first.

A ``config`` file in QEMU's INI syntax (``[inject-error]`` / ``[set-state]`` sections
of ``key = "value"`` lines) adds rules before the ones given as options. The legacy
filename ``blkdebug:<config>:<image>`` (config may be empty) becomes options through
:func:`legacy_options`.
"""

from __future__ import annotations

import errno as _errno
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Final

import trio

from blockd.block.driver import BlockStatus, Driver
from blockd.block.host import files
from blockd.block.node import BlockNode
from blockd.errors import HostError, RequestError

#: BlkdebugEvent (qapi/block-core.json); blockd itself raises only a few of them.
EVENTS: Final = frozenset(
    {
        "l1_update", "l1_grow_alloc_table", "l1_grow_write_table", "l1_grow_activate_table",
        "l2_load", "l2_update", "l2_update_compressed", "l2_alloc_cow_read", "l2_alloc_write",
        "read_aio", "read_backing_aio", "read_compressed", "write_aio", "write_compressed",
        "vmstate_load", "vmstate_save", "cow_read", "cow_write", "reftable_load",
        "reftable_grow", "reftable_update", "refblock_load", "refblock_update",
        "refblock_update_part", "refblock_alloc", "refblock_alloc_hookup",
        "refblock_alloc_write", "refblock_alloc_write_blocks", "refblock_alloc_write_table",
        "refblock_alloc_switch_table", "cluster_alloc", "cluster_alloc_bytes", "cluster_free",
        "flush_to_os", "flush_to_disk", "pwritev_rmw_head", "pwritev_rmw_after_head",
        "pwritev_rmw_tail", "pwritev_rmw_after_tail", "pwritev", "pwritev_zero",
        "pwritev_done", "empty_image_prepare", "l1_shrink_write_table",
        "l1_shrink_free_l2_clusters", "cor_write", "cluster_alloc_space", "none",
    }
)  # fmt: skip

#: BlkdebugIOType; without ``iotype`` a rule applies to all but ``block-status``.
IO_TYPES: Final = ("read", "write", "write-zeroes", "discard", "flush", "block-status")
DEFAULT_IO_TYPES: Final = frozenset(IO_TYPES[:5])

#: The largest config file read (QEMU reads lines of at most 1,023 bytes, one rule takes
#: a few of them): a bigger file, or ``/dev/zero``, is refused as ``File too large``.
CONFIG_MAX_BYTES: Final = 1 << 20


@dataclass(eq=False)
class InjectRule:
    """One ``inject-error`` rule (identity matters: a ``once`` rule is removed)."""

    event: str
    state: int = 0
    iotypes: frozenset[str] = DEFAULT_IO_TYPES
    errno: int = _errno.EIO
    offset: int = -1
    once: bool = False
    immediately: bool = False

    def matches(self, offset: int, length: int, iotype: str) -> bool:
        if iotype not in self.iotypes:
            return False
        return self.offset == -1 or (length > 0 and offset <= self.offset < offset + length)


@dataclass(frozen=True)
class SetStateRule:
    """One ``set-state`` rule."""

    event: str
    new_state: int
    state: int = 0


class RuleEngine:
    """The state machine and rules of one blkdebug node; pure, no I/O."""

    def __init__(self, injects: Iterable[InjectRule], set_states: Iterable[SetStateRule]) -> None:
        self.state = 1
        self.injects = list(injects)
        self.set_states = list(set_states)
        self.active: list[InjectRule] = []

    def event(self, name: str) -> None:
        """Process the rules of event ``name``."""
        replaced = False
        for rule in self.injects:
            if rule.event == name and rule.state in (0, self.state):
                if not replaced:
                    self.active = []
                    replaced = True
                self.active.append(rule)
        # the first matching set-state rule given wins (QEMU walks its per-event rule
        # list newest first and keeps the last new state it sees)
        for set_rule in self.set_states:
            if set_rule.event == name and set_rule.state in (0, self.state):
                self.state = set_rule.new_state
                break

    def check(self, offset: int, length: int, iotype: str) -> InjectRule | None:
        """The active rule that fails this request, if any (a ``once`` rule is removed)."""
        for rule in self.active:
            if rule.matches(offset, length, iotype):
                if rule.once:
                    self.active.remove(rule)
                    if rule in self.injects:
                        self.injects.remove(rule)
                return rule if rule.errno else None
        return None


def _int(value: Any, name: str) -> int:
    if isinstance(value, bool):
        raise RequestError(f"Parameter '{name}' expects an integer")
    if isinstance(value, int):
        return value
    try:
        return int(str(value), 0)
    except ValueError:
        raise RequestError(f"Parameter '{name}' expects a number") from None


def _bool(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).lower()
    if text in ("on", "true", "yes"):
        return True
    if text in ("off", "false", "no"):
        return False
    raise RequestError(f"Parameter '{name}' expects 'on' or 'off'")


def _event(value: Any) -> str:
    name = str(value)
    if name not in EVENTS:
        raise RequestError(f"Invalid parameter '{name}'")
    return name


def parse_inject(options: Mapping[str, Any]) -> InjectRule:
    """An inject rule from its options (QMP members or config-file keys)."""
    if "event" not in options:
        raise RequestError("Parameter 'event' is missing")
    iotype = options.get("iotype")
    if iotype is not None and iotype not in IO_TYPES:
        raise RequestError(f"Parameter 'iotype' does not accept value '{iotype}'")
    sector = _int(options.get("sector", -1), "sector")
    return InjectRule(
        event=_event(options["event"]),
        state=_int(options.get("state", 0), "state"),
        iotypes=frozenset({iotype}) if iotype is not None else DEFAULT_IO_TYPES,
        errno=_int(options.get("errno", _errno.EIO), "errno"),
        offset=sector * 512 if sector >= 0 else -1,
        once=_bool(options.get("once", False), "once"),
        immediately=_bool(options.get("immediately", False), "immediately"),
    )


def parse_set_state(options: Mapping[str, Any]) -> SetStateRule:
    """A set-state rule from its options."""
    if "event" not in options:
        raise RequestError("Parameter 'event' is missing")
    if "new_state" not in options:
        raise RequestError("Parameter 'new_state' is missing")
    return SetStateRule(
        event=_event(options["event"]),
        new_state=_int(options["new_state"], "new_state"),
        state=_int(options.get("state", 0), "state"),
    )


_SECTION: Final = re.compile(r"^\[\s*([A-Za-z0-9_-]+)\s*\]$")
_ENTRY: Final = re.compile(r'^([A-Za-z0-9_.-]+)\s*=\s*"(.*)"$')


def parse_config(text: str) -> tuple[list[InjectRule], list[SetStateRule]]:
    """Rules from a config file in QEMU's INI syntax.

    Raises:
        RequestError: ``Could not parse blkdebug config file`` on a malformed line or an
            unknown section.
    """
    injects: list[InjectRule] = []
    set_states: list[SetStateRule] = []
    groups: list[tuple[str, dict[str, str]]] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        section = _SECTION.match(line)
        if section:
            if section.group(1) not in ("inject-error", "set-state"):
                raise RequestError("Could not parse blkdebug config file")
            groups.append((section.group(1), {}))
            continue
        entry = _ENTRY.match(line)
        if entry is None or not groups:
            raise RequestError("Could not parse blkdebug config file")
        groups[-1][1][entry.group(1)] = entry.group(2)
    for kind, values in groups:
        if kind == "inject-error":
            injects.append(parse_inject(values))
        else:
            set_states.append(parse_set_state(values))
    return injects, set_states


async def read_config(path: str) -> str:
    """The text of the config file ``path``: a file or a device as QEMU's ``fopen``
    reads it, at most :data:`CONFIG_MAX_BYTES`, off the event loop and bounded in time
    (:mod:`blockd.block.host.files`); undecodable bytes become U+FFFD.

    Raises:
        HostError: ``Could not read blkdebug config file: <why>``: the file's errno
            (``File too large`` past the bound, ``Connection timed out``), or the kind
            of file for a FIFO (QEMU would wait for a writer forever).
    """
    try:
        data = await files.read_bounded(path, CONFIG_MAX_BYTES)
    except OSError as exc:
        code = exc.errno if exc.errno is not None else _errno.EIO
        raise HostError(
            f"Could not read blkdebug config file: {os.strerror(code)}", errno=code
        ) from exc
    except files.WrongKind as exc:
        if exc.kind == "directory":
            code = _errno.EISDIR
            raise HostError(
                f"Could not read blkdebug config file: {os.strerror(code)}", errno=code
            ) from exc
        raise HostError(f"Could not read blkdebug config file: {exc}") from exc
    return data.decode("utf-8", "replace")


def legacy_options(filename: str, base_dir: str = "") -> dict[str, Any] | None:
    """Blockdev options of a legacy ``blkdebug:<config>:<image>`` filename, or ``None``
    when ``filename`` has no ``blkdebug:`` prefix. Relative paths are taken relative
    to ``base_dir`` (the directory of the image whose header names it).

    Raises:
        RequestError: ``blkdebug requires both config file and image path``.
    """
    prefix = "blkdebug:"
    if not filename.startswith(prefix):
        return None
    config, sep, image = filename[len(prefix) :].partition(":")
    if not sep:
        raise RequestError("blkdebug requires both config file and image path")

    def resolve(path: str) -> str:
        return path if os.path.isabs(path) or not base_dir else os.path.join(base_dir, path)

    options: dict[str, Any] = {"driver": "blkdebug"}
    if config:
        options["config"] = resolve(config)
    options["image"] = {"driver": "file", "filename": resolve(image)}
    return options


class BlkdebugDriver(Driver):
    """The ``blkdebug`` filter over its ``image`` child."""

    format_name: ClassVar[str] = "blkdebug"
    is_filter: ClassVar[bool] = True
    child_role: ClassVar[str] = "image"
    filename_prefix: ClassVar[str | None] = "blkdebug:"

    @classmethod
    def parse_filename(cls, filename: str, base_dir: str) -> dict[str, Any]:
        """``blkdebug:<config>:<image>`` as blockdev options (:func:`legacy_options`)."""
        options = legacy_options(filename, base_dir)
        assert options is not None  # the graph checked the prefix
        return options

    def __init__(self, node: BlockNode, rules: RuleEngine, align: int) -> None:
        super().__init__(node)
        self.rules = rules
        self._align = align

    @classmethod
    async def open(cls, node: BlockNode, options: Mapping[str, Any]) -> BlkdebugDriver:
        injects: list[InjectRule] = []
        set_states: list[SetStateRule] = []
        config = options.get("config")
        if config is not None:
            injects, set_states = parse_config(await read_config(str(config)))
        injects += [parse_inject(rule) for rule in options.get("inject-error", [])]
        set_states += [parse_set_state(rule) for rule in options.get("set-state", [])]
        align = _int(options.get("align", 0), "align")
        if align and (align < 0 or align >= 2**31 - 1 or align & (align - 1)):
            raise RequestError(f"Cannot meet constraints with align {align}")
        if node.file is None:
            raise RequestError("Parameter 'image' is missing")
        driver = cls(node, RuleEngine(injects, set_states), align or 1)
        driver.rules.event("none")
        return driver

    def length(self) -> int:
        child = self.node.file
        assert child is not None
        return child.length()

    @property
    def request_alignment(self) -> int:
        child = self.node.file
        below = child.driver.request_alignment if child is not None else 1
        return max(self._align, below)

    def debug_event(self, name: str) -> None:
        self.rules.event(name)

    async def _check(self, offset: int, length: int, iotype: str) -> None:
        rule = self.rules.check(offset, length, iotype)
        if rule is None:
            return
        if not rule.immediately:
            await trio.lowlevel.checkpoint()
        raise OSError(rule.errno, os.strerror(rule.errno))

    async def read(self, offset: int, buf: memoryview) -> None:
        await self._check(offset, len(buf), "read")
        child = self.node.file
        assert child is not None
        await child.read(offset, buf)

    async def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        await self._check(offset, len(data), "write")
        child = self.node.file
        assert child is not None
        await child.write(offset, data)

    async def flush(self) -> None:
        await self._check(0, 0, "flush")
        child = self.node.file
        assert child is not None
        await child.flush()

    async def block_status(self, offset: int, length: int) -> BlockStatus:
        await self._check(offset, length, "block-status")
        child = self.node.file
        assert child is not None
        return await child.block_status(offset, length)

    @property
    def filename(self) -> str:
        child = self.node.file
        return child.filename if child is not None else ""
