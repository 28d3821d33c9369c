"""``block-commit``: check the request in QEMU's order, choose the mode, hand the job
its plan.

The checks and their texts follow docs/qemu-behaviour/block-commit.md §2
(``qmp_block_commit``): nothing changes until every argument was checked. A top that is
the device (filters skipped), or that somebody writes to, makes an *active* commit (a
mirror of the top into the base, :mod:`blockd.jobs.mirror`); any other top a
*non-active* one (:mod:`blockd.jobs.commit`). The graph changes are the job's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from blockd.block import chain
from blockd.block.host.locking import Perm
from blockd.block.node import BlockNode
from blockd.commands.registry import command
from blockd.commands.serial import one_setup_at_a_time
from blockd.errors import DeviceNotFound, RequestError
from blockd.jobs.commit import CommitJob, CommitPlan
from blockd.jobs.mirror import ActiveCommitJob

if TYPE_CHECKING:
    from blockd.daemon import Daemon


@command("block-commit")
@one_setup_at_a_time
async def block_commit(
    d: Daemon,
    *,
    device: str,
    job_id: str | None = None,
    base_node: str | None = None,
    base: str | None = None,
    top_node: str | None = None,
    top: str | None = None,
    backing_file: str | None = None,
    backing_mask_protocol: bool = False,
    speed: int = 0,
    on_error: str = "report",
    filter_node_name: str | None = None,
    auto_finalize: bool = True,
    auto_dismiss: bool = True,
) -> dict[str, Any]:
    """Start committing ``top`` (default: the device) into ``base`` (default: the
    bottom of the chain) (docs/qemu-behaviour/block-commit.md §2).

    Raises:
        DeviceNotFound: no node is called ``device``.
        RequestError: with QEMU's text, in QEMU's order; nothing is left behind.
    """
    bs = d.graph.find(device)
    if bs is None:
        raise DeviceNotFound(f"Device '{device}' not found")
    if not bs.is_root:
        raise RequestError("Need a root block node")
    bs.check_not_busy()

    if top_node is not None and top is not None:
        raise RequestError("'top-node' and 'top' are mutually exclusive")
    top_bs: BlockNode | None = bs
    if top_node is not None:
        top_bs = d.graph.get(top_node)
        if not chain.chain_contains(bs, top_bs):
            raise RequestError(f"'{top_node}' is not in this backing file chain")
    elif top is not None:
        top_bs = bs if bs.filename == top else chain.find_backing_image(bs, top)
        if top_bs is None:
            raise RequestError(f"Top image file {top} not found")
    assert top_bs is not None

    if base_node is not None and base is not None:
        raise RequestError("'base-node' and 'base' are mutually exclusive")
    if base_node is not None:
        base_bs = d.graph.get(base_node)
        if not chain.chain_contains(top_bs, base_bs):
            raise RequestError(f"'{base_node}' is not in this backing file chain")
    elif base is not None:
        found = chain.find_backing_image(top_bs, base)
        if found is None:
            raise RequestError(f"Can't find '{base}' in the backing chain")
        base_bs = found
    else:
        lowest = chain.find_overlay(top_bs, None)
        if lowest is None:
            raise RequestError("There is no backimg image")  # QEMU's spelling
        base_bs = lowest

    # Every node from the top down to the base, both included, must be free.
    stop = base_bs.filtered
    walk: BlockNode | None = top_bs
    while walk is not None and walk is not stop:
        walk.check_not_busy()
        walk = walk.filtered

    if top_bs is base_bs:
        raise RequestError("cannot commit an image into itself")

    plan = CommitPlan(
        device=bs,
        top=top_bs,
        base=base_bs,
        backing_file=backing_file,
        backing_mask_protocol=backing_mask_protocol,
        filter_node_name=filter_node_name,
    )
    options: dict[str, Any] = {
        "speed": speed,
        "on_error": on_error,
        "auto_finalize": auto_finalize,
        "auto_dismiss": auto_dismiss,
    }
    # Without job-id the job is named after the device, as block-stream's (QEMU takes
    # the BlockBackend's name: qemu-storage-daemon has none and refuses with '').
    job_name = job_id if job_id is not None else device
    if top_bs.perm & Perm.WRITE or top_bs.skip_filters() is bs.skip_filters():
        if backing_file is not None:
            if top_bs.skip_filters() is bs.skip_filters():
                raise RequestError("'backing-file' specified, but 'top' is the active layer")
            raise RequestError("'backing-file' specified, but 'top' has a writer on it")
        job: CommitJob | ActiveCommitJob = ActiveCommitJob(
            d.jobs, job_name, graph=d.graph, plan=plan, **options
        )
    else:
        overlay = chain.find_overlay(bs, top_bs)
        if overlay is not None:
            overlay.check_not_busy()
        job = CommitJob(d.jobs, job_name, graph=d.graph, plan=plan, **options)
    await job.launch()  # the set-up steps; a failure undoes those done
    return {}
