"""Job query and control commands (docs/qemu-behaviour/jobs.md §4, §7).

``job-*`` commands report an unknown id as GenericError ``Job not found``; ``block-job-*``
as DeviceNotActive ``Block job '%s' not found``. Everything else (verb checks, texts,
event order) is the job's; see :mod:`blockd.jobs.job`.

A job that is finishing in its own task (finalising or aborting) would, in QEMU, have
finished within one main-loop turn and never be seen half-way. So a control command that
meets one first waits for it to end and then looks the id up again. Likewise a verb that
wakes a parked job lets it run to its next park before replying (:meth:`Job.settle`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from blockd.commands.registry import command
from blockd.errors import RequestError

if TYPE_CHECKING:
    from blockd.daemon import Daemon
    from blockd.jobs.job import Job


async def _job(d: Daemon, job_id: str) -> Job:
    job = d.jobs.get(job_id)
    while job.completing:
        await job.wait_ended()
        job = d.jobs.get(job_id)
    return job


async def _block_job(d: Daemon, job_id: str) -> Job:
    job = d.jobs.get_block_job(job_id)
    while job.completing:
        await job.wait_ended()
        job = d.jobs.get_block_job(job_id)
    return job


@command("query-jobs")
async def query_jobs(d: Daemon) -> list[dict[str, Any]]:
    return d.jobs.query_jobs()


@command("query-block-jobs")
async def query_block_jobs(d: Daemon) -> list[dict[str, Any]]:
    return d.jobs.query_block_jobs()


# ------------------------------------------------------------------------ job-*


@command("job-pause")
async def job_pause(d: Daemon, *, id: str) -> dict[str, Any]:
    job = await _job(d, id)
    job.pause()
    await job.settle()
    return {}


@command("job-resume")
async def job_resume(d: Daemon, *, id: str) -> dict[str, Any]:
    job = await _job(d, id)
    job.resume()
    await job.settle()
    return {}


@command("job-cancel")
async def job_cancel(d: Daemon, *, id: str) -> dict[str, Any]:
    await (await _job(d, id)).cancel(force=True)
    return {}


@command("job-complete")
async def job_complete(d: Daemon, *, id: str) -> dict[str, Any]:
    (await _job(d, id)).complete()
    return {}


@command("job-finalize")
async def job_finalize(d: Daemon, *, id: str) -> dict[str, Any]:
    await (await _job(d, id)).finalize()
    return {}


@command("job-dismiss")
async def job_dismiss(d: Daemon, *, id: str) -> dict[str, Any]:
    (await _job(d, id)).dismiss()
    return {}


# ------------------------------------------------------------------ block-job-*


@command("block-job-set-speed")
async def block_job_set_speed(d: Daemon, *, device: str, speed: int) -> dict[str, Any]:
    job = await _block_job(d, device)
    job.set_speed(speed)
    await job.settle()
    return {}


@command("block-job-cancel")
async def block_job_cancel(d: Daemon, *, device: str, force: bool = False) -> dict[str, Any]:
    job = await _block_job(d, device)
    if job.user_paused and not force:
        raise RequestError(f"The block job for device '{device}' is currently paused")
    await job.cancel(force=force)
    return {}


@command("block-job-pause")
async def block_job_pause(d: Daemon, *, device: str) -> dict[str, Any]:
    job = await _block_job(d, device)
    job.pause()
    await job.settle()
    return {}


@command("block-job-resume")
async def block_job_resume(d: Daemon, *, device: str) -> dict[str, Any]:
    job = await _block_job(d, device)
    job.resume()
    await job.settle()
    return {}


@command("block-job-complete")
async def block_job_complete(d: Daemon, *, device: str) -> dict[str, Any]:
    (await _block_job(d, device)).complete()
    return {}


@command("block-job-finalize")
async def block_job_finalize(d: Daemon, *, id: str) -> dict[str, Any]:
    await (await _block_job(d, id)).finalize()
    return {}


@command("block-job-dismiss")
async def block_job_dismiss(d: Daemon, *, id: str) -> dict[str, Any]:
    (await _block_job(d, id)).dismiss()
    return {}


@command("block-job-change", raw=True)
async def block_job_change(d: Daemon, options: dict[str, Any]) -> dict[str, Any]:
    (await _block_job(d, options["id"])).change()
    return {}
