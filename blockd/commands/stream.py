"""``block-stream``: check the request in QEMU's order, then hand the job its plan.

The checks and their texts follow docs/qemu-behaviour/block-stream.md §3 (``qmp_block_stream``,
``stream_start``): nothing is changed until every argument was checked. The graph
changes are the job's (:meth:`StreamJob.set_up
<blockd.jobs.stream.StreamJob.set_up>`): a failure after the filter was inserted removes
it again, and a failure after the job was created sends ``JOB_STATUS_CHANGE`` ``created``
then ``null`` before the error.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from blockd.block import chain
from blockd.block.node import BlockNode
from blockd.commands.registry import command
from blockd.commands.serial import one_setup_at_a_time
from blockd.errors import RequestError
from blockd.jobs.stream import StreamJob, StreamPlan

if TYPE_CHECKING:
    from blockd.daemon import Daemon


def _above_base(base_overlay: BlockNode, base: BlockNode | None) -> BlockNode:
    """The node directly above ``base``, filters counted (``stream_start``)."""
    above = base_overlay
    if above.backing is not base:
        walk = above.backing
        while walk is not None and walk.filtered is not base:
            walk = walk.filtered
        if walk is not None:
            above = walk
    return above


@command("block-stream")
@one_setup_at_a_time
async def block_stream(
    d: Daemon,
    *,
    device: str,
    job_id: str | None = None,
    base: str | None = None,
    base_node: str | None = None,
    backing_file: str | None = None,
    backing_mask_protocol: bool = False,
    bottom: str | None = None,
    speed: int = 0,
    on_error: str = "report",
    filter_node_name: str | None = None,
    auto_finalize: bool = True,
    auto_dismiss: bool = True,
) -> dict[str, Any]:
    """Start streaming into ``device`` (docs/qemu-behaviour/block-stream.md §3, §4).

    Raises:
        RequestError: with QEMU's text, in QEMU's order (docs/qemu-behaviour/block-stream.md §3);
            nothing is left behind.
    """
    if base is not None and base_node is not None:
        raise RequestError("'base' and 'base-node' cannot be specified at the same time")
    if base is not None and bottom is not None:
        raise RequestError("'base' and 'bottom' cannot be specified at the same time")
    if bottom is not None and base_node is not None:
        raise RequestError("'bottom' and 'base-node' cannot be specified at the same time")

    top = d.graph.find(device)
    if top is None:
        raise RequestError(f"Cannot find device='{device}' nor node-name='{device}'")

    base_bs: BlockNode | None = None
    if base is not None:
        base_bs = chain.find_backing_image(top, base)
        if base_bs is None:
            raise RequestError(f"Can't find '{base}' in the backing chain")
    if base_node is not None:
        base_bs = d.graph.get(base_node)
        if base_bs is top or not chain.chain_contains(top, base_bs):
            raise RequestError(f"Node '{base_node}' is not a backing image of '{device}'")

    bottom_bs: BlockNode | None = None
    if bottom is not None:
        bottom_bs = d.graph.get(bottom)
        if bottom_bs.is_filter:
            raise RequestError(f"Node '{bottom}' is a filter, use a non-filter node as 'bottom'")
        if not chain.chain_contains(top, bottom_bs):
            raise RequestError(f"Node '{bottom}' is not in a chain starting from '{device}'")

    # Busy check: every node from the top down to the stop node (not included).
    stop = bottom_bs.filtered if bottom_bs is not None else base_bs
    walk: BlockNode | None = top
    while walk is not None and walk is not stop:
        walk.check_not_busy()
        walk = walk.filtered

    if backing_file is not None and base_bs is None:
        raise RequestError("backing file specified, but streaming the entire chain")

    # -- stream_start ----------------------------------------------------------------
    if bottom_bs is not None:
        base_overlay = above_base = bottom_bs
    else:
        overlay = chain.find_overlay(top, base_bs)
        if overlay is None:
            base_name = base_bs.name if base_bs is not None else ""
            raise RequestError(f"'{base_name}' is not in the backing chain of '{top.name}'")
        base_overlay = overlay
        above_base = _above_base(base_overlay, base_bs)

    plan = StreamPlan(
        top=top,
        base=base_bs,
        base_overlay=base_overlay,
        above_base=above_base,
        backing_file=backing_file,
        backing_mask_protocol=backing_mask_protocol,
        filter_node_name=filter_node_name,
    )
    job = StreamJob(
        d.jobs,
        job_id if job_id is not None else device,
        graph=d.graph,
        plan=plan,
        speed=speed,
        on_error=on_error,
        auto_finalize=auto_finalize,
        auto_dismiss=auto_dismiss,
    )
    await job.launch()  # the set-up steps; a failure undoes those done
    return {}
