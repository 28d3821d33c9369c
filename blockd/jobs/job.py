"""The job: QEMU's job life cycle (``job.c``, ``blockjob.c``) as one trio task.

Rules and theory of operation
=============================

A job is created by :meth:`JobManager.create` (id checks, ``JOB_STATUS_CHANGE created``,
initial speed) and started by :meth:`Job.start`, which moves it to ``running`` at once and
runs it as a task in the manager's daemon-wide nursery: a job outlives the connection
whose command started it. Every status change goes through :meth:`Job._transition`, which
checks :data:`~blockd.jobs.state.TRANSITIONS` and emits ``JOB_STATUS_CHANGE``.

The job and its manager meet at a small public seam, and neither touches the other's
private members:

* the job sees its owner only as a :class:`JobOwner` (``events``, ``nursery``,
  ``create(job)``, ``forget(job)``);
* the manager drives a job only through :meth:`Job.mark_created` (registration),
  :meth:`Job.set_speed`, :meth:`Job.early_fail`, :meth:`Job.drain`,
  :meth:`Job.force_cancel` (shutdown), :meth:`Job.wait_ended`, ``completing`` and
  ``status``.

Subclass contract (what the stream job implements)::

    job_type: ClassVar[str]            # "stream"
    async def run(self) -> None        # the work. Return on success; raise OSError (errno
                                       # kept) on an I/O failure that is not handled.
    async def prepare(self) -> None    # on success, at finalisation; raise to fail the job
    async def abort(self) -> None      # after a failure or cancel
    async def clean(self) -> None      # always, last; exceptions are logged and dropped

A job that becomes ready (an active commit, a mirror) also implements::

    completable: ClassVar[bool] = True
    def on_complete(self) -> None      # job-complete was accepted: finish once in sync
    def soft_cancel_allowed(self) -> bool  # a cancel without force ends it as done

Tools for ``run()``:

* ``await pause_point()`` parks while the job is paused (status ``paused``, ``busy`` false)
  and raises ``trio.Cancelled`` once the job is cancelled.
* ``await rate_limit_sleep()`` is QEMU's ``do { d = calculate_delay(0); sleep(d) } while
  (d)`` loop: it always yields at least once, is not busy while it sleeps, wakes early on
  pause, cancel and a ``set-speed`` that raises the limit, and includes a pause point (so
  it also raises ``trio.Cancelled``). Call it before every chunk.
* ``charge(n)`` charges ``n`` copied bytes to the rate limiter (skipped bytes are not);
  ``rate_limited()`` tells whether the next ``rate_limit_sleep()`` would sleep.
* ``set_total(n)`` / ``advance(n)``: progress (``len`` / ``offset``).
* ``ready()``: the job is in sync (``JOB_STATUS_CHANGE ready``, then
  ``BLOCK_JOB_READY``); from then on ``job-complete`` is accepted.
* ``await sleep_ns(ns)``: QEMU's ``job_sleep_ns``: an idle sleep that any verb waking the
  job ends early (complete, cancel, pause); a pause point.
* ``await handle_io_error(exc)`` applies ``on-error`` (docs/qemu-behaviour/jobs.md §6): emits
  ``BLOCK_JOB_ERROR`` (operation ``read`` unless told otherwise) and returns

  - ``"retry"`` after a *stop*: the job paused itself (a user pause, ``io-status``
    ``failed``/``nospace``) and was resumed; redo the same chunk. Raises
    ``trio.Cancelled`` if the job is cancelled while stopped;
  - ``"ignore"``: go on; the chunk counts as done for progress;
  - ``"report"``: leave the loop and return.

  For ``ignore`` and ``report`` the first error is remembered: when ``run()`` returns, the
  job fails with it (``error`` = its strerror) although ``run()`` itself did not raise.

Verbs (called by :mod:`blockd.commands.jobs` after the lookup; each does QEMU's checks
in QEMU's order and raises :class:`~blockd.errors.RequestError` with QEMU's text):
``pause()``, ``resume()``, ``set_speed(n)``, ``complete()``, ``change()``, ``dismiss()``
are synchronous; ``await cancel()`` and ``await finalize()`` may wait for the job's task
(see below). After a verb that may wake a parked job, ``await settle()`` lets it run to
its next park before the reply. ``early_fail()`` drops a created, never started job.
Queries: ``block_job_info()``, ``job_info()``.

Cancellation is cooperative, as in QEMU: ``job-cancel`` marks the job and wakes it, and the
job stops at its next pause point or rate-limit sleep, never in the middle of I/O. The
pause points raise ``trio.Cancelled`` by cancelling the job's own cancel scope around
``run()``; the engine catches it there and finishes the job as cancelled.

Completion (docs/qemu-behaviour/jobs.md §5, one job per transaction): after ``run()`` the job is
``aborting`` on failure or cancel, else ``waiting`` → ``pending`` (+ ``BLOCK_JOB_PENDING`` when
``auto-finalize`` is false, then it waits for ``job-finalize`` or ``job-cancel``) → prepare. Then
abort (on failure) → clean → ``BLOCK_JOB_COMPLETED`` / ``BLOCK_JOB_CANCELLED`` → ``concluded`` →
``null`` when ``auto-dismiss``. All of it runs in the job's own task, so a command that finalises or
cancels a finished job waits for it (its events come before the reply) and a client that disconnects
meanwhile does not interrupt it.

Event order versus command replies (docs/qemu-behaviour/jobs.md §6): QEMU re-enters a parked job
synchronously inside the command. Trio cannot run the job's task inside the command, so
:meth:`_enter` does on the job's behalf, at once, the status change the job would make on
waking (a sleeping job asked to pause enters its pause point; a paused job being resumed
or cancelled leaves it). So a ``pause`` of a sleeping job, and a ``resume`` of a paused
one, emit their ``JOB_STATUS_CHANGE`` before the reply, as in QEMU; a job busy with I/O
changes later, after the reply. A command that woke a job then calls :meth:`settle`, so
that the job has gone back to sleep (or into I/O) when the reply is sent: ``busy`` in a
query that follows is what QEMU would show. A ``cancel`` of a parked (sleeping or paused) job waits
for the job's task to finish: qemu-storage-daemon 10.0 sends ``aborting``,
``BLOCK_JOB_CANCELLED``, ``concluded`` and ``null`` before the cancel's reply in that case
(measured; see docs/qemu-behaviour/jobs.md §6: iotest 141 allows both orders). A job busy with I/O
is only marked, and its events follow the reply.

Where the task is (``_park``): ``RUNNING`` (busy), ``SLEEPING`` (rate-limit sleep, a
timer pending), ``PAUSED`` (parked in a pause point), ``DONE`` (``run()`` is over).
"""

from __future__ import annotations

import enum
import errno
import logging
import os
from typing import TYPE_CHECKING, Any, ClassVar, Final, Literal, Protocol

import trio

from blockd.errors import QMPError, RequestError
from blockd.jobs.policy import (
    BlockDeviceIoStatus,
    BlockdevOnError,
    BlockErrorAction,
    IoOperationType,
    error_action,
    io_status_after,
)
from blockd.jobs.ratelimit import RateLimit
from blockd.jobs.setup import UndoStack
from blockd.jobs.state import JobStatus, JobVerb, check_transition, check_verb

if TYPE_CHECKING:
    from blockd.events import EventBus

log = logging.getLogger(__name__)

S = JobStatus

#: How long a job may take to abort and clean up when the daemon's nursery is torn down
#: under it (the orderly path is :meth:`JobManager.cancel_all`, bounded by the daemon's
#: shutdown deadline). Past it the job is left as it is: its nodes are closed by the
#: graph, and an image whose flush hangs is reported there.
EMERGENCY_CLEANUP_SECONDS: Final = 10.0


class JobOwner(Protocol):
    """What a job needs from whoever owns it (:class:`~blockd.jobs.manager.JobManager`).

    Attributes:
        events: the bus the job's events go to.
    """

    events: EventBus

    @property
    def nursery(self) -> trio.Nursery:
        """The daemon-wide nursery the job's task runs in (see :meth:`Job.start`)."""
        ...

    def create(self, job: Job) -> None:
        """Register ``job`` (``created``); see :meth:`JobManager.create` for the errors."""
        ...

    def forget(self, job: Job) -> None:
        """Drop ``job`` from the owner's table; the job calls it on reaching ``null``."""
        ...


class _Park(enum.Enum):
    RUNNING = enum.auto()
    SLEEPING = enum.auto()
    PAUSED = enum.auto()
    DONE = enum.auto()


class _Wake(enum.Enum):
    """Conditions of QEMU's ``job_enter_cond``."""

    ALWAYS = enum.auto()
    TIMER_PENDING = enum.auto()
    TIMER_NOT_PENDING = enum.auto()


ErrorChoice = Literal["retry", "ignore", "report"]


def error_text(exc: BaseException) -> tuple[int, str]:
    """The errno and the ``error`` text QEMU shows for a job that failed with ``exc``:
    an ``OSError``'s ``strerror``, a :class:`QMPError`'s text. A nursery's exception
    group counts as its first exception. Anything else is a bug of blockd's (logged
    where it was caught) and shows as ``EIO``'s text, never as the exception's own."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    if isinstance(exc, OSError):
        code = exc.errno if exc.errno else errno.EIO
        return code, os.strerror(code)
    if isinstance(exc, QMPError):
        return getattr(exc, "errno", errno.EIO), exc.desc
    return errno.EIO, os.strerror(errno.EIO)


class Job:
    """One job; subclass it and implement :meth:`run` (see the module docstring).

    Attributes:
        id: the job id.
        status: the current :class:`JobStatus`.
        speed: the rate limit in bytes/s (0: unlimited).
        on_error: the ``on-error`` policy.
        io_status: ``BlockJobInfo.io-status``.
        busy: the job's task is running (not parked in a sleep or a pause point, not done).
        pause_count: pause requests outstanding; ``paused`` in queries is ``> 0``.
        user_paused: paused by a client (or by an on-error stop).
        cancelled: a (forced) cancel was requested: the job stops and ends cancelled.
        soft_cancelled: a cancel without force reached a ready job that allows it
            (:meth:`soft_cancel_allowed`): it finishes as done, without its final step.
        error: the error text once the job failed or was cancelled, else ``None``.
    """

    job_type: ClassVar[str]
    #: Listed by ``query-block-jobs`` and reachable through ``block-job-*``.
    block_job: ClassVar[bool] = True
    #: ``BLOCK_JOB_ERROR.operation`` used by :meth:`handle_io_error` by default.
    error_operation: ClassVar[IoOperationType] = IoOperationType.READ
    #: ``job-complete`` is accepted once the job is ready (QEMU: the driver has a
    #: ``complete`` callback); such a job overrides :meth:`on_complete`.
    completable: ClassVar[bool] = False

    def __init__(
        self,
        manager: JobOwner,
        job_id: str,
        *,
        speed: int = 0,
        on_error: str = "report",
        auto_finalize: bool = True,
        auto_dismiss: bool = True,
    ) -> None:
        self.manager = manager
        self.id = job_id
        self.initial_speed = speed
        self.on_error = BlockdevOnError(on_error)
        self.auto_finalize = auto_finalize
        self.auto_dismiss = auto_dismiss

        self.status = S.UNDEFINED
        self.speed = 0
        self.io_status = BlockDeviceIoStatus.OK
        self.busy = False
        self.pause_count = 1  # QEMU: a created job counts as paused until it starts
        self.user_paused = False
        self.cancelled = False
        self.soft_cancelled = False
        self.progress_current = 0
        self.progress_total = 0
        self.error: str | None = None

        self._limit = RateLimit()
        self._ret = 0
        self._first_error: OSError | None = None
        self._started = False
        self._park = _Park.RUNNING
        self._status_before_pause = S.RUNNING
        self._wake = trio.Event()
        self._sleep_scope: trio.CancelScope | None = None
        self._scope: trio.CancelScope | None = None
        self._completing = False
        self._woken = False
        self._parked = trio.Event()
        self._request: JobVerb | None = None
        self._request_event = trio.Event()
        self._ended = trio.Event()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.id!r} {self.status}>"

    # ----------------------------------------------------------------- subclass hooks

    async def run(self) -> None:
        """Do the job's work; see the module docstring."""
        raise NotImplementedError

    async def prepare(self) -> None:
        """Apply the job's result (finalisation of a successful job); raise to fail."""

    async def abort(self) -> None:
        """Undo what must be undone after a failure or a cancel."""

    async def clean(self) -> None:
        """Release what the job holds; runs last, whatever the outcome."""

    def on_complete(self) -> None:
        """``job-complete`` was accepted: finish once in sync (completable jobs only)."""
        raise NotImplementedError

    def soft_cancel_allowed(self) -> bool:
        """Whether a cancel without ``force`` ends the job as done rather than
        cancelled (QEMU: the driver's ``cancel`` callback; a ready mirror). No by
        default: every cancel is forced."""
        return False

    async def set_up(self, undo: UndoStack) -> None:
        """Prepare what the job needs before it starts; by default only :meth:`register`.

        Each step pushes its undo on ``undo`` once done, and the job is registered
        (:meth:`register`) at the point where QEMU creates it.

        Raises:
            QMPError: a step failed; :meth:`launch` undoes the steps done.
        """
        self.register(undo)

    # ------------------------------------------------------------------------ set-up

    def register(self, undo: UndoStack) -> None:
        """Register the job with its owner (``created``); its undo is :meth:`early_fail`.

        Raises:
            RequestError: as :meth:`JobManager.create` (a bad id: no event; a bad speed:
                ``created`` then ``null``, nothing to undo).
        """
        self.manager.create(self)
        undo.push(self.early_fail, "the job's creation")

    async def launch(self) -> None:
        """Set the job up (:meth:`set_up`) and start it (:meth:`start`).

        Raises:
            QMPError: the set-up failed; every step done was undone (shielded, bounded by
                :data:`~blockd.jobs.setup.ROLLBACK_SECONDS`) before this raises.
            trio.Cancelled: likewise undone first; the job was not started.
        """
        async with UndoStack(f"{self.job_type} job '{self.id}'") as undo:
            await self.set_up(undo)
            if self.status is S.UNDEFINED:
                raise RuntimeError(f"job {self.id!r}: set_up() did not register the job")
        self.start()

    # --------------------------------------------------------------------- tools for run

    async def pause_point(self) -> None:
        """Park here while the job is paused; raise ``trio.Cancelled`` once cancelled."""
        await self._checkpoint_cancel()
        if self._park is _Park.PAUSED or self.pause_count > 0:
            if self._park is not _Park.PAUSED:
                self._enter_pause_point()
            await self._wake.wait()
        await self._checkpoint_cancel()

    async def rate_limit_sleep(self) -> None:
        """Sleep as long as the rate limit asks (at least one yield); a pause point.

        Raises:
            trio.Cancelled: the job was cancelled.
        """
        while True:
            delay = self._limit.calculate_delay(0, _now_ns())
            await self._sleep_ns(delay)
            if delay == 0:
                return

    async def sleep_ns(self, ns: int) -> None:
        """Sleep ``ns`` nanoseconds unless woken earlier (a verb, a pause); a pause point.

        Raises:
            trio.Cancelled: the job was cancelled.
        """
        await self._sleep_ns(ns)

    def ready(self) -> None:
        """The job is in sync: ``running`` → ``ready`` (``JOB_STATUS_CHANGE``), then
        ``BLOCK_JOB_READY`` (QEMU ``job_transition_to_ready``)."""
        self._transition(S.READY)
        self._emit("BLOCK_JOB_READY", self._progress_event())

    def rate_limited(self) -> bool:
        """Whether :meth:`rate_limit_sleep` would sleep now (the speed limit is reached)."""
        return self._limit.calculate_delay(0, _now_ns()) > 0

    def charge(self, n: int) -> None:
        """Charge ``n`` copied bytes to the rate limiter; the next sleep pays for them."""
        self._limit.calculate_delay(n, _now_ns())

    def set_total(self, total: int) -> None:
        """Set the progress total (``len``, ``total-progress``)."""
        self.progress_total = total

    def advance(self, n: int) -> None:
        """Add ``n`` to the progress so far (``offset``, ``current-progress``)."""
        self.progress_current += n

    async def handle_io_error(
        self,
        exc: OSError,
        operation: IoOperationType | None = None,
        *,
        ignored_fails: bool = True,
    ) -> ErrorChoice:
        """Apply the ``on-error`` policy to ``exc``; see the module docstring.

        ``ignored_fails``: an ignored error still fails the job at its end (stream);
        false, the job forgets it (commit retries the chunk and succeeds).

        Raises:
            trio.Cancelled: the job was cancelled while stopped.
        """
        code = exc.errno if exc.errno else errno.EIO
        action = error_action(self.on_error, code)
        self._emit(
            "BLOCK_JOB_ERROR",
            {
                "device": self.id,
                "operation": str(operation or self.error_operation),
                "action": str(action),
            },
        )
        if action is BlockErrorAction.STOP:
            # QEMU block_job_error_action: the stop is a user-visible pause.
            if not self.user_paused:
                self.pause_count += 1
                self.user_paused = True
            self.io_status = io_status_after(self.io_status, action, code)
            await self.pause_point()
            return "retry"
        if action is BlockErrorAction.IGNORE:
            if ignored_fails and self._first_error is None:
                self._first_error = exc
            return "ignore"
        if self._first_error is None:
            self._first_error = exc
        return "report"

    # ------------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Move the job from ``created`` to ``running`` and start its task.

        Emits ``JOB_STATUS_CHANGE running`` before returning.
        """
        if self.status is not S.CREATED or self._started:
            raise RuntimeError(f"job {self.id!r} cannot be started in state {self.status}")
        nursery = self.manager.nursery
        self._started = True
        self.pause_count -= 1
        self.busy = True
        self._park = _Park.RUNNING
        self._transition(S.RUNNING)
        nursery.start_soon(self._main, name=f"job {self.id}")

    def early_fail(self) -> None:
        """Drop a job that failed before it started: ``created`` → ``null``
        (docs/qemu-behaviour/jobs.md §5, item 7)."""
        if self.status is not S.CREATED or self._started:
            raise RuntimeError(f"job {self.id!r} cannot early-fail in state {self.status}")
        self._dismiss()

    def mark_created(self) -> None:
        """``undefined`` → ``created``: emits ``JOB_STATUS_CHANGE created``.

        Called once, by the owner that registers the job (:meth:`JobManager.create`).

        Raises:
            JobStateError: the job was registered already.
        """
        self._transition(S.CREATED)

    @property
    def started(self) -> bool:
        """The job's task was started (:meth:`start`)."""
        return self._started

    @property
    def completing(self) -> bool:
        """The job is finishing in its own task (finalising, aborting); commands wait."""
        return self._completing

    async def settle(self) -> None:
        """Let a job that the last verb woke run up to its next park; else return at once.

        QEMU runs a woken job synchronously inside the command, so the reply already
        sees it asleep again (or busy with I/O) and follows whatever it emitted. Trio
        runs it in the next scheduling batch; two checkpoints here make the command's
        reply come after that batch. Not cancellable (the verb has taken effect).
        """
        if self._woken:
            self._woken = False
            await trio.lowlevel.cancel_shielded_checkpoint()
            await trio.lowlevel.cancel_shielded_checkpoint()

    async def drain(self) -> None:
        """Pause the job internally and wait until it is parked (QEMU ``bdrv_drain_all``).

        Used on shutdown before the cancels: a running job moves to ``paused`` (a sleeping
        one at once, a busy one at its next pause point); the pause is never lifted, the
        cancel that follows takes the job out of its pause point. Jobs that finished their
        work, or never started, are left alone.
        """
        if not self._started or self._park is _Park.DONE:
            return
        self.pause_count += 1
        if self._park is not _Park.PAUSED:
            self._enter(_Wake.ALWAYS)
        while self._park is _Park.RUNNING:
            self._parked = trio.Event()
            await self._parked.wait()

    @property
    def ended(self) -> bool:
        """The job's task has finished (its completion ran, or it was torn down)."""
        return self._ended.is_set()

    async def wait_ended(self) -> None:
        """Wait until the job's completion has run (or, never started, returns at once)."""
        if self._started:
            await self._ended.wait()

    # ------------------------------------------------------------------------- verbs

    def pause(self) -> None:
        """``job-pause`` (docs/qemu-behaviour/jobs.md §4): verb check,
        ``Job is already paused``, then pause."""
        check_verb(self.id, self.status, JobVerb.PAUSE)
        if self.user_paused:
            raise RequestError("Job is already paused")
        self.user_paused = True
        self.pause_count += 1
        if self._park is not _Park.PAUSED:
            self._enter(_Wake.ALWAYS)

    def resume(self) -> None:
        """``job-resume`` (docs/qemu-behaviour/jobs.md §4): the not-paused check comes before the
        verb check."""
        if not self.user_paused or self.pause_count <= 0:
            raise RequestError("Can't resume a job that was not paused")
        check_verb(self.id, self.status, JobVerb.RESUME)
        self.io_status = BlockDeviceIoStatus.OK
        self.user_paused = False
        self.pause_count -= 1
        if self.pause_count == 0:
            self._enter(_Wake.TIMER_NOT_PENDING)

    def set_speed(self, speed: int) -> None:
        """``block-job-set-speed`` (docs/qemu-behaviour/jobs.md §11): takes effect at once; wakes a
        sleeper if raised."""
        check_verb(self.id, self.status, JobVerb.SET_SPEED)
        if speed < 0:
            raise RequestError("Parameter 'speed' expects a non-negative value")
        old = self.speed
        self._limit.set_speed(speed)
        self.speed = speed
        if speed and speed <= old:
            return
        self._enter(_Wake.TIMER_PENDING)

    async def cancel(self, force: bool = True) -> None:
        """``job-cancel`` / ``block-job-cancel`` after their own checks
        (docs/qemu-behaviour/jobs.md §4).

        A job busy with I/O is only marked: this returns without yielding and the job's
        events follow later, once it reaches its next pause point. A job parked in a
        rate-limit sleep or a pause point, one that finished its work (pending) and one
        that never started are finished before this returns, events included (as
        qemu-storage-daemon 10.0 does, checked against it).

        Raises:
            JobStateError: the verb is not allowed in the job's status.
        """
        check_verb(self.id, self.status, JobVerb.CANCEL)
        await self._cancel(force)

    async def force_cancel(self) -> None:
        """Cancel without the verb check (QEMU ``job_cancel_sync`` on shutdown).

        As :meth:`cancel` otherwise; the owner calls it for every unfinished job. If the
        caller is cancelled while this waits, the cancel stays requested and the job
        still finishes in its own task.
        """
        await self._cancel()

    def complete(self) -> None:
        """``job-complete``: only jobs that become ready can (stream never does); a
        cancel requested already refuses too (QEMU ``job_complete_locked``)."""
        check_verb(self.id, self.status, JobVerb.COMPLETE)
        if not self.completable or self.cancelled or self.soft_cancelled:
            raise RequestError(f"The active block job '{self.id}' cannot be completed")
        self.on_complete()
        if self.pause_count == 0:
            self._enter(_Wake.ALWAYS)

    def change(self) -> None:
        """``block-job-change``: only mirror jobs have settings to change."""
        check_verb(self.id, self.status, JobVerb.CHANGE)
        raise RequestError("Job type does not support change")

    async def finalize(self) -> None:
        """``job-finalize``: run the pending job's finalisation; returns after its events."""
        check_verb(self.id, self.status, JobVerb.FINALIZE)
        self._send_request(JobVerb.FINALIZE)
        await self._ended.wait()

    def dismiss(self) -> None:
        """``job-dismiss``: ``concluded`` → ``null``; the job disappears."""
        check_verb(self.id, self.status, JobVerb.DISMISS)
        self._dismiss()

    # ------------------------------------------------------------------------ queries

    def block_job_info(self) -> dict[str, Any]:
        """``BlockJobInfo`` (docs/qemu-behaviour/jobs.md §8), members in QAPI order."""
        info: dict[str, Any] = {
            "type": self.job_type,
            "device": self.id,
            "len": self.progress_total,
            "offset": self.progress_current,
            "busy": self.busy,
            "paused": self.pause_count > 0,
            "speed": self.speed,
            "io-status": str(self.io_status),
            "ready": self.status in (S.READY, S.STANDBY),
            "status": str(self.status),
            "auto-finalize": self.auto_finalize,
            "auto-dismiss": self.auto_dismiss,
        }
        if self._ret:
            info["error"] = self.error
        return info

    def job_info(self) -> dict[str, Any]:
        """``JobInfo`` (docs/qemu-behaviour/jobs.md §9), members in QAPI order."""
        info: dict[str, Any] = {
            "id": self.id,
            "type": self.job_type,
            "status": str(self.status),
            "current-progress": self.progress_current,
            "total-progress": self.progress_total,
        }
        if self._ret:
            info["error"] = self.error
        return info

    # ------------------------------------------------------------------ the machinery

    def _transition(self, new: JobStatus) -> None:
        """The one place a status changes (QEMU ``job_state_transition``)."""
        old = self.status
        check_transition(old, new)
        self.status = new
        if new is not old:
            self._emit("JOB_STATUS_CHANGE", {"id": self.id, "status": str(new)})

    def _emit(self, name: str, data: dict[str, Any]) -> None:
        self.manager.events.emit(name, data)

    def _progress_event(self) -> dict[str, Any]:
        return {
            "type": self.job_type,
            "device": self.id,
            "len": self.progress_total,
            "offset": self.progress_current,
            "speed": self.speed,
        }

    def _enter(self, cond: _Wake) -> None:
        """QEMU ``job_enter_cond``: wake a parked job, doing its next status change now."""
        if not self._started or self._park in (_Park.RUNNING, _Park.DONE):
            return
        sleeping = self._park is _Park.SLEEPING
        if cond is _Wake.TIMER_PENDING and not sleeping:
            return
        if cond is _Wake.TIMER_NOT_PENDING and sleeping:
            return
        self._woken = True
        if sleeping:
            assert self._sleep_scope is not None
            self._sleep_scope.cancel()
            # On waking, the job goes through its pause point (job_sleep_ns).
            if self.pause_count > 0 and not self.cancelled:
                self._enter_pause_point()
            else:
                self._park = _Park.RUNNING
                self.busy = True
        else:
            self._leave_pause_point()

    def _enter_pause_point(self) -> None:
        self._status_before_pause = self.status
        self._transition(S.STANDBY if self.status is S.READY else S.PAUSED)
        self._park = _Park.PAUSED
        self.busy = False
        self._wake = trio.Event()
        self._parked.set()

    def _leave_pause_point(self) -> None:
        self._park = _Park.RUNNING
        self.busy = True
        self._transition(self._status_before_pause)
        self._wake.set()

    async def _sleep_ns(self, ns: int) -> None:
        """QEMU ``job_sleep_ns``: sleep unless pausing, then a pause point."""
        await self._checkpoint_cancel()
        if ns <= 0 and self.pause_count == 0:
            # a zero timer only yields; nothing needs to wake it (one scheduler round
            # instead of a cancel scope and a deadline per stream step)
            self.busy = False
            await trio.lowlevel.checkpoint()
            self.busy = True
        elif self.pause_count == 0:
            self._park = _Park.SLEEPING
            self.busy = False
            with trio.CancelScope(deadline=trio.current_time() + ns / 1e9) as scope:
                self._sleep_scope = scope
                await trio.sleep_forever()
            self._sleep_scope = None
            if self._park is _Park.SLEEPING:  # the timer fired; nobody woke us
                self._park = _Park.RUNNING
                self.busy = True
        await self.pause_point()

    async def _checkpoint_cancel(self) -> None:
        if self.cancelled and self._scope is not None:
            self._scope.cancel()
            await trio.lowlevel.checkpoint()  # raises Cancelled: the scope is cancelled

    def _fail(self, exc: BaseException) -> None:
        code, text = error_text(exc)
        self._ret = code
        if self.error is None:
            self.error = text

    def _update_rc(self) -> None:
        """QEMU ``job_update_rc``: a cancel or a failure sends the job to ``aborting``."""
        if not self._ret and self.cancelled:
            self._ret = errno.ECANCELED
        if self._ret:
            if self.error is None:
                self.error = os.strerror(self._ret)
            self._transition(S.ABORTING)

    async def _main(self) -> None:
        try:
            await self._run_and_complete()
        except trio.Cancelled:
            # The daemon's nursery is being torn down under us (job-cancel and
            # cancel_all are cooperative and never get here): abort and clean up, briefly.
            with trio.CancelScope(shield=True):
                with trio.move_on_after(EMERGENCY_CLEANUP_SECONDS) as bound:
                    await self._emergency_stop()
            if bound.cancelled_caught:
                log.error(
                    "job %r: abort and clean-up did not finish within %gs; left as is",
                    self.id,
                    EMERGENCY_CLEANUP_SECONDS,
                )
            raise
        except Exception:
            log.exception("job %r: internal error", self.id)
        finally:
            self._park = _Park.DONE
            self.busy = False
            self._completing = False
            self._ended.set()

    async def _run_and_complete(self) -> None:
        with trio.CancelScope() as scope:
            self._scope = scope
            try:
                await self.run()
            except OSError as exc:
                self._fail(exc)
            except Exception as exc:
                log.exception("job %r: run() failed", self.id)
                self._fail(exc)
        self._scope = None
        # QEMU job_co_entry/job_exit/job_completed: from here on the job is not busy.
        self._park = _Park.DONE
        self.busy = False
        self._parked.set()
        self._completing = True
        if not self._ret and self._first_error is not None:
            self._fail(self._first_error)
        self._update_rc()
        if self._ret:
            await self._finalize_single()
            return
        self._transition(S.WAITING)
        self._transition(S.PENDING)
        if not self.auto_finalize:
            self._emit("BLOCK_JOB_PENDING", {"type": self.job_type, "id": self.id})
            self._completing = False
            await self._request_event.wait()
            if self._request is JobVerb.CANCEL:
                self._update_rc()
                await self._finalize_single()
                return
        await self._do_finalize()

    async def _do_finalize(self) -> None:
        """QEMU ``job_do_finalize``: prepare, then commit or abort, clean, conclude."""
        try:
            await self.prepare()
        except Exception as exc:
            self._fail(exc)
            self._update_rc()
        await self._finalize_single()

    async def _finalize_single(self) -> None:
        """QEMU ``job_finalize_single``: abort/clean, the completion event, conclude."""
        if self._ret:
            await self._call_hook(self.abort)
        await self._call_hook(self.clean)
        if self._started:
            if self.cancelled:
                self._emit("BLOCK_JOB_CANCELLED", self._progress_event())
            else:
                data = self._progress_event()
                if self._ret:
                    data["error"] = self.error
                self._emit("BLOCK_JOB_COMPLETED", data)
        self._transition(S.CONCLUDED)
        if self.auto_dismiss or not self._started:
            self._dismiss()

    async def _call_hook(self, hook: Any) -> None:
        try:
            await hook()
        except Exception:
            log.exception("job %r: %s() failed", self.id, hook.__name__)

    def _dismiss(self) -> None:
        """QEMU ``job_do_dismiss``: to ``null`` and out of the manager."""
        self.busy = False
        self._transition(S.NULL)
        self.manager.forget(self)

    def _send_request(self, verb: JobVerb) -> None:
        self._completing = True
        self._request = verb
        self._request_event.set()

    async def _cancel(self, force: bool = True) -> None:
        """QEMU ``job_cancel``: forced unless ``force`` is false and the job allows a
        soft cancel (:meth:`soft_cancel_allowed`)."""
        if self._started and self._completing:
            # Finishing already (QEMU would have finished within one main-loop turn).
            await self._ended.wait()
            return
        soft = not force and not self.cancelled and self.soft_cancel_allowed()
        if self.user_paused:
            # QEMU job_cancel_async: the cancel lifts the user pause (and its io-status).
            self.io_status = BlockDeviceIoStatus.OK
            self.user_paused = False
            self.pause_count -= 1
        if soft:
            # The job finishes as done in its own task; its events follow the reply.
            self.soft_cancelled = True
            if self.pause_count == 0:
                self._enter(_Wake.ALWAYS)
            return
        self.cancelled = True
        if not self._started:
            self._completing = True
            try:
                self._update_rc()
                await self._finalize_single()
            finally:
                self._completing = False
        elif self._park is _Park.DONE:
            if self.status is S.PENDING:
                self._send_request(JobVerb.CANCEL)
            await self._ended.wait()
        elif self._park is _Park.RUNNING:
            pass  # busy with I/O: it stops at its next pause point, after the reply
        else:
            # Parked in a sleep or a pause point: QEMU runs the job to its end within
            # the command, so every event of the cancel precedes the reply.
            self._enter(_Wake.ALWAYS)
            await self._ended.wait()

    async def _emergency_stop(self) -> None:
        try:
            if self._park is _Park.PAUSED:
                self._leave_pause_point()
            self.cancelled = True
            self._park = _Park.DONE
            self.busy = False
            if self.status in (S.RUNNING, S.READY, S.WAITING, S.PENDING):
                self._update_rc()
                await self._finalize_single()
        except Exception:
            log.exception("job %r: emergency stop failed", self.id)


def _now_ns() -> int:
    return int(trio.current_time() * 1e9)
