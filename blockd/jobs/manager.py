"""The daemon's jobs.

``JobManager`` owns the daemon-wide nursery that runs every job: the one place a nursery
crosses tasks, so that a job outlives the connection whose command started it. It also
keeps the job table (ids, lookups with QEMU's errors, queries newest first) and cancels
every job on shutdown.

The manager is the :class:`~blockd.jobs.job.JobOwner` of its jobs and uses only their
public seam (see the :mod:`blockd.jobs.job` docstring).
"""

from __future__ import annotations

import logging
from typing import Any, Final

import trio

from blockd.errors import DeviceNotActive, RequestError
from blockd.events import EventBus
from blockd.jobs.job import Job
from blockd.jobs.state import COMPLETED, JobStatus, id_wellformed

log = logging.getLogger(__name__)

#: The longest the shutdown's cancel of every job may take (``quit``, SIGTERM). A job
#: stops at its next pause point, normally within one chunk; one whose I/O hangs never
#: gets there, and shutdown must go on without it.
CANCEL_ALL_SECONDS: Final = 10.0


class JobManager:
    """Every job the daemon knows.

    Attributes:
        events: the bus every job event goes to.
        jobs: the jobs by id, oldest first (queries list them newest first, as QEMU).
    """

    def __init__(self, events: EventBus) -> None:
        self.events = events
        self.jobs: dict[str, Job] = {}
        self._nursery: trio.Nursery | None = None
        #: The longest :meth:`cancel_all` waits (:data:`CANCEL_ALL_SECONDS`).
        self.cancel_seconds: float = CANCEL_ALL_SECONDS
        self._gave_up = False
        self._stopping = trio.Event()

    def attach(self, nursery: trio.Nursery) -> None:
        """Run jobs in ``nursery`` from now on (the daemon's top-level nursery)."""
        self._nursery = nursery

    @property
    def nursery(self) -> trio.Nursery:
        """The nursery jobs run in.

        Raises:
            RuntimeError: :meth:`attach` was not called.
        """
        if self._nursery is None:
            raise RuntimeError("JobManager has no nursery: call attach() first")
        return self._nursery

    # ------------------------------------------------------------------- creation

    def create(self, job: Job) -> None:
        """Register ``job``: id checks, ``JOB_STATUS_CHANGE created``, initial speed.

        The caller then starts the job with :meth:`Job.start`, or drops it with
        :meth:`Job.early_fail` (``created`` → ``null``) if its own set-up fails.

        Raises:
            RequestError: ``Invalid job ID '%s'`` or ``Job ID '%s' already in use`` (no
                event emitted); ``Parameter 'speed' expects a non-negative value`` (after
                ``created`` and ``null`` were emitted, as QEMU's early failure).
        """
        if not id_wellformed(job.id):
            raise RequestError(f"Invalid job ID '{job.id}'")
        if job.id in self.jobs:
            raise RequestError(f"Job ID '{job.id}' already in use")
        self.jobs[job.id] = job
        job.mark_created()
        try:
            job.set_speed(job.initial_speed)
        except BaseException:
            job.early_fail()
            raise

    def forget(self, job: Job) -> None:
        """Drop ``job`` from the table (the job calls it on reaching ``null``).

        A different job registered under the same id since is left alone.
        """
        if self.jobs.get(job.id) is job:
            del self.jobs[job.id]

    # ------------------------------------------------------------------- lookups

    def find(self, job_id: str) -> Job | None:
        """The job called ``job_id``, or ``None``."""
        return self.jobs.get(job_id)

    def get(self, job_id: str) -> Job:
        """The job for a ``job-*`` command.

        Raises:
            RequestError: ``Job not found``.
        """
        job = self.jobs.get(job_id)
        if job is None:
            raise RequestError("Job not found")
        return job

    def get_block_job(self, job_id: str) -> Job:
        """The block job for a ``block-job-*`` command.

        Raises:
            DeviceNotActive: ``Block job '%s' not found`` (also for a job that is not a
                block job).
        """
        job = self.jobs.get(job_id)
        if job is None or not job.block_job:
            raise DeviceNotActive(f"Block job '{job_id}' not found")
        return job

    def newest_first(self) -> list[Job]:
        """Every job, newest first."""
        return list(reversed(self.jobs.values()))

    def query_jobs(self) -> list[dict[str, Any]]:
        """``query-jobs``: a ``JobInfo`` per job, newest first."""
        return [job.job_info() for job in self.newest_first()]

    def query_block_jobs(self) -> list[dict[str, Any]]:
        """``query-block-jobs``: a ``BlockJobInfo`` per block job, newest first."""
        return [job.block_job_info() for job in self.newest_first() if job.block_job]

    # ------------------------------------------------------------------- shutdown

    def begin_shutdown(self) -> None:
        """Note that the daemon is shutting down (idempotent); :meth:`cancel_all` calls it."""
        self._stopping.set()

    async def wait_shutdown_begun(self) -> None:
        """Wait until :meth:`begin_shutdown` was called (``quit`` starts with the cancel)."""
        await self._stopping.wait()

    async def cancel_all(self) -> bool:
        """Cancel every job that has not finished, and wait until each has ended.

        As qemu-storage-daemon on ``quit`` and SIGTERM: first every running job is
        drained (paused internally: ``JOB_STATUS_CHANGE paused``), then the jobs are
        cancelled one after the other, newest first, each finished before the next
        (``running``, ``aborting``, ``BLOCK_JOB_CANCELLED``, ``concluded``, ``null``).
        Jobs that finished their work and wait for ``job-finalize`` are aborted too;
        concluded jobs are left alone. (QEMU ``bdrv_drain_all_begin`` and
        ``job_cancel_sync_all``.)

        Bounded by :attr:`cancel_seconds` in all: a job stuck in I/O (a disk that does not
        answer) never reaches its pause point, so past the deadline the jobs not ended are
        logged as errors and left to the daemon's exit.

        Returns:
            True if every job ended, False if the deadline passed first.

        Raises:
            trio.Cancelled: the caller was cancelled; the cancels requested stay requested.
        """
        self.begin_shutdown()
        jobs = self.newest_first()
        # Once a cancel_all gave up (quit's, say), the next one (shutdown's) does not
        # wait for the same stuck jobs again; it still requests the cancels.
        deadline = trio.current_time() + (0 if self._gave_up else self.cancel_seconds)
        with trio.move_on_at(deadline):
            for job in jobs:
                await job.drain()
        for job in jobs:
            if job.completing or (job.status in COMPLETED and job.status is not JobStatus.PENDING):
                continue
            with trio.move_on_at(deadline):  # marks the job before it waits
                await job.force_cancel()
        with trio.move_on_at(deadline):
            for job in jobs:
                await job.wait_ended()
        stuck = [job for job in jobs if job.started and not job.ended]
        if not stuck:
            return True
        if not self._gave_up:
            self._gave_up = True
            for job in stuck:
                log.error(
                    "job '%s' did not end within %gs of the cancel (status %s; storage not "
                    "responding?)",
                    job.id,
                    self.cancel_seconds,
                    job.status,
                )
        return False
