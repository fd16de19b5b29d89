"""The background queue of batches the web app and the APIs submit to: one batch at a time on its own
thread (GPU concurrency 1), with a live :class:`BatchProgress` snapshot per batch that anyone can read.
Closing a browser tab does not stop a batch: the queue owns it.

Listeners get every :class:`BatchEvent` of the batches it runs, plus the queue's own: ``batch_queued``
(submitted), ``batch_cancelled`` (taken off the queue before it ran, or while it waited for storage),
``batch_failed`` (the run itself raised) and ``batch_waiting_for_storage`` (stopped by its disk: not over,
it runs again by itself once there is space). A batch's progress already shows its final state when its
``batch_done`` reaches listeners, so anyone counting the queue from a listener never counts a finished
batch as waiting. ``batch_queued`` and ``batch_cancelled`` are published on the caller's thread (a web
request): listeners must not block on them.

A batch stopped by a full or unwritable disk (:mod:`engine.storage`) is ``waiting_for_storage``: its progress
keeps the error's code and the time of its next try (``retry_at``), which backs off while the problem
lasts; :meth:`BatchQueue.ready_to_retry` says when whoever resumes batches may submit it again, and
:meth:`BatchQueue.waiting_for_storage` lists such batches (still to run, though on no queue for now).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from engine.batch import BatchEvent, BatchRunner, describe_error
from engine.errors import EngineError
from engine.jobs import jsonable
from engine.storage import PROBE_CODES, RetrySchedule, free_bytes, is_storage_problem, storage_folder

log = logging.getLogger(__name__)

# States of a batch that is not over for this queue: its progress is kept whatever the bound below.
ACTIVE_STATES = frozenset({"queued", "running", "waiting_for_storage"})
# Progress snapshots of ended batches kept for readers (the page, the API, ComfyUI's /queue), newest ended
# last: a server left running for weeks ends a batch per ComfyUI prompt and per API call, and each snapshot
# holds up to ``keep_images`` image paths. Older ones are read from the ledger, as after a restart.
KEEP_ENDED = 1000


@dataclass
class BatchProgress:
    """A live snapshot of one batch for the web app and the API."""

    batch_id: str
    # queued | running | done | finished_with_errors | cancelled | error | waiting_for_storage | interrupted
    # (stopped by this process shutting down) | running_elsewhere
    state: str = "queued"
    done: int = 0
    failed: int = 0
    remaining: int = 0
    eta_s: float | None = None
    row_number: int | None = None
    step: int = 0
    steps: int = 0
    recent_images: list[str] = field(default_factory=list)
    error: str | None = None
    error_code: str | None = None  # the error's code (engine.errors.ERROR_CODES), with its values
    error_details: dict[str, Any] = field(default_factory=dict)
    retry_at: float | None = None  # waiting_for_storage: when the batch is tried again at the latest (epoch s)
    updated: float = field(default_factory=time.time)


@dataclass
class _StorageWait:
    """A batch stopped by its disk: how many tries failed in a row, when to try next, and whether the
    storage probe saw the problem (then a probe that passes again means the space is back: try at once)."""

    failures: int
    retry_at: float
    probe_sees_it: bool


class BatchQueue:
    """Runs submitted batches one after another on a background thread (GPU concurrency 1).

    Closing a browser tab does not stop a batch: the queue owns it, and anyone can read its progress. The
    progress of the ``keep_ended`` batches that ended last is kept; an older one's reads as None (``status``),
    and its readers turn to the ledger, as they do after a restart.
    """

    def __init__(self, runner: BatchRunner, keep_images: int = 48, retry_schedule: RetrySchedule | None = None,
                 keep_ended: int = KEEP_ENDED) -> None:
        self.runner = runner
        self.keep_images = keep_images
        self.keep_ended = keep_ended
        self.retry_schedule = retry_schedule or RetrySchedule()
        self._storage_waits: dict[str, _StorageWait] = {}
        self._order: deque[str] = deque()
        self._progress: dict[str, BatchProgress] = {}
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.listeners: list[Callable[[BatchEvent], None]] = []

    def start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="batch-queue", daemon=True)
                self._thread.start()

    def stop(self, wait_s: float = 0.0) -> bool:
        """Take no more batches, and stop the running one between sampler steps (the process is shutting
        down: its batch is left to resume, not cancelled; see :meth:`BatchRunner.stop_runs`). Waits up to
        ``wait_s`` for the run to end; returns whether the queue's thread has ended."""
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
            thread = self._thread
        for batch_id in self.runner.stop_runs():
            log.info("stopping batch %s between sampler steps: this process is shutting down", batch_id)
        if thread is None:
            return True
        if wait_s > 0:
            thread.join(wait_s)
        return not thread.is_alive()

    def submit(self, batch_id: str, front: bool = False) -> BatchProgress:
        """Queue ``batch_id`` behind the waiting batches, or with ``front`` ahead of them (it runs next,
        once the running batch ends: ComfyUI's ``front``, where the latest front submission goes first)."""
        self.start()
        with self._wake:
            progress = self._progress.get(batch_id)
            if progress is not None and progress.state in {"queued", "running"}:
                return progress
            progress = BatchProgress(batch_id)
            self._progress[batch_id] = progress
            if front:
                self._order.appendleft(batch_id)
            else:
                self._order.append(batch_id)
            self._wake.notify_all()
        self._publish(BatchEvent("batch_queued", batch_id))
        return progress

    def running(self) -> list[str]:
        """The batch this queue is running now (none or one: GPU concurrency 1)."""
        with self._lock:
            return [b for b, p in self._progress.items() if p.state == "running"]

    def status(self, batch_id: str) -> BatchProgress | None:
        with self._lock:
            return self._progress.get(batch_id)

    def queued(self) -> list[str]:
        with self._lock:
            return list(self._order)

    def waiting_for_storage(self) -> list[str]:
        """Batches a full or unwritable disk stopped, in the order they were submitted: not over (they run
        again by themselves once there is space, or are cancelled), though neither running nor queued now."""
        with self._lock:
            return [b for b, p in self._progress.items() if p.state == "waiting_for_storage"]

    def cancel(self, batch_id: str) -> str:
        """Stop a running batch between sampler steps, or take a waiting one off the queue.

        Returns what happened: ``"cancelling"`` (running here), ``"removed_from_queue"`` (it had not
        started; its rows are marked cancelled, ready to resume) or ``"not_running"`` (nothing to cancel
        here). A batch that is neither waiting nor running is left alone: a stale cancel must not stop its
        next resume.
        """
        with self._lock:
            progress = self._progress.get(batch_id)
            waiting = batch_id in self._order or (progress is not None and progress.state == "waiting_for_storage")
            running = progress is not None and progress.state == "running"
            if waiting:
                if batch_id in self._order:
                    self._order.remove(batch_id)
                self._storage_waits.pop(batch_id, None)
                progress.state, progress.retry_at = "cancelled", None
                self._ended(batch_id)
            elif running:
                # Under the lock: the queue thread cannot finish the run between this check and the flag.
                self.runner.cancel(batch_id)
        if waiting:
            cancelled_rows = self.runner.cancel_waiting(batch_id)
            self._publish(BatchEvent("batch_cancelled", batch_id, cancelled=cancelled_rows))
            return "removed_from_queue"
        return "cancelling" if running else "not_running"

    def interrupted(self) -> list[dict[str, Any]]:
        """Batches the ledger says were left unfinished and that are not queued or running here."""
        with self._lock:
            active = {b for b, p in self._progress.items() if p.state in {"queued", "running"}}
        return [b for b in self.runner.unfinished_batches() if b["id"] not in active]

    def ready_to_retry(self, batch_id: str, now: float | None = None) -> bool:
        """Whether a batch may be submitted again now: always, unless its disk stopped it, then once its
        ``retry_at`` has come, or sooner when the storage probe that saw the problem passes again."""
        with self._lock:
            wait = self._storage_waits.get(batch_id)
        if wait is None:
            return True
        if (time.time() if now is None else now) >= wait.retry_at:
            return True
        return wait.probe_sees_it and self.runner.storage_problem(batch_id) is None

    def storage_failures(self, batch_id: str) -> int:
        """How many tries of the batch in a row a full or unwritable disk has stopped (0: none)."""
        with self._lock:
            wait = self._storage_waits.get(batch_id)
        return wait.failures if wait is not None else 0

    def wait(self, batch_id: str, timeout: float = 60.0) -> BatchProgress | None:
        """The progress of ``batch_id`` once it is neither queued nor running, or as it is after ``timeout``
        seconds; None at once for a batch this queue does not know (never submitted here, or ended long
        ago: see :data:`KEEP_ENDED`)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            progress = self.status(batch_id)
            if progress is None or progress.state not in {"queued", "running"}:
                return progress
            time.sleep(0.05)
        return self.status(batch_id)

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._order and not self._stopping:
                    self._wake.wait()
                if self._stopping:
                    return
                batch_id = self._order.popleft()
                progress = self._progress[batch_id]
                progress.state = "running"
            try:
                summary = self.runner.run(batch_id, on_event=self._on_event)
                with self._lock:
                    self._storage_waits.pop(batch_id, None)
                    self._finish(progress, summary)
                    self._ended(batch_id)
            except EngineError as exc:
                if not is_storage_problem(exc):
                    self._failed(batch_id, progress, exc)
                else:  # a known condition with its own message: no traceback, one line per try
                    self._wait_for_storage(batch_id, progress, exc)
            except Exception as exc:  # a batch-level failure must not kill the queue thread
                self._failed(batch_id, progress, exc)
            finally:
                with self._lock:
                    progress.updated = time.time()
                    # A cancel that landed after the run's last step has nothing left to stop: drop it, so
                    # it cannot stop this batch's next resume.
                    self.runner.forget_cancel(batch_id)

    def _failed(self, batch_id: str, progress: BatchProgress, exc: Exception) -> None:
        log.exception("batch %s failed", batch_id, exc_info=exc)
        with self._lock:
            progress.state = "error"
            progress.error = describe_error(exc) if isinstance(exc, EngineError) else str(exc)
            if isinstance(exc, EngineError) and exc.code is not None:
                progress.error_code, progress.error_details = exc.code, jsonable(exc.details)
            self._ended(batch_id)
        self._publish(BatchEvent("batch_failed", batch_id, error=progress.error))

    def _wait_for_storage(self, batch_id: str, progress: BatchProgress, exc: EngineError) -> None:
        """The disk stopped the batch: it waits, its next try backed off (see :class:`RetrySchedule`)."""
        # Did the probe see it (or would it now)? Then it can tell when the space is back.
        try:
            seen = exc.code in PROBE_CODES or self.runner.storage_problem(batch_id) is not None
        except EngineError:  # the ledger cannot be read either: only the schedule can tell
            seen = False
        folder = storage_folder(exc) or str(self.runner.output_dir(batch_id))
        free = exc.details.get("free_bytes") if exc.code == "batch_waiting_for_storage" else free_bytes(folder)
        now = time.time()
        with self._lock:
            failures = self._storage_waits[batch_id].failures + 1 if batch_id in self._storage_waits else 1
            delay = self.retry_schedule.delay_s(failures)
            self._storage_waits[batch_id] = _StorageWait(failures, now + delay, seen)
            progress.state, progress.retry_at = "waiting_for_storage", now + delay
            progress.error, progress.error_code = describe_error(exc), exc.code
            progress.error_details = jsonable(exc.details)
        log.warning("batch %s is waiting for disk space: %s has %s bytes free (%s, try %d); next try in %s%s. %s",
                    batch_id, folder, "unknown" if free is None else free, exc.code, failures, _minutes(delay),
                    ", or as soon as there is space" if seen else "", exc.message)
        # Not batch_failed: the batch has not ended, and whoever follows it (a ComfyUI client) must not be
        # told it did, only to see it finish later.
        self._publish(BatchEvent("batch_waiting_for_storage", batch_id, error=progress.error))

    @staticmethod
    def _finish(progress: BatchProgress, summary: Any) -> None:
        """Set the final state of a run from its summary (caller holds the lock)."""
        if summary.stopped:  # this process is shutting down: whoever starts next resumes the batch
            progress.state = "interrupted"
            return
        if summary.running:  # rows another live process holds: this run is over, the batch is not
            progress.state, progress.remaining = "running_elsewhere", summary.running
            return
        progress.state = "cancelled" if summary.cancelled else ("done" if summary.ok else "finished_with_errors")
        progress.remaining = 0 if progress.state != "cancelled" else progress.remaining

    def _on_event(self, event: BatchEvent) -> None:
        # The run announces its end before it returns: take the final state now, so that a listener
        # counting the queue on batch_done already sees this batch as finished.
        summary = self.runner.summary(event.batch_id) if event.kind == "batch_done" else None
        with self._lock:
            progress = self._progress.setdefault(event.batch_id, BatchProgress(event.batch_id))
            progress.done, progress.failed, progress.remaining = event.done, event.failed, event.remaining
            progress.eta_s = event.eta_s
            if event.row_number is not None:
                progress.row_number = event.row_number
            if event.kind == "step":
                progress.step, progress.steps = event.step, event.steps
            if event.kind == "row_done" and event.image_path:
                progress.recent_images.append(event.image_path)
                del progress.recent_images[: -self.keep_images]
            if summary is not None:
                self._finish(progress, summary)
                self._ended(event.batch_id)
            progress.updated = time.time()
        self._publish(event)

    def _ended(self, batch_id: str) -> None:
        """``batch_id`` has ended here: its progress becomes the newest of the ended ones, and the oldest
        past ``keep_ended`` are forgotten (caller holds the lock)."""
        progress = self._progress.pop(batch_id, None)
        if progress is None:
            return
        self._progress[batch_id] = progress
        ended = [b for b, p in self._progress.items() if p.state not in ACTIVE_STATES]
        for old in ended[: max(0, len(ended) - self.keep_ended)]:
            del self._progress[old]

    def _publish(self, event: BatchEvent) -> None:
        for listener in list(self.listeners):
            try:
                listener(event)
            except Exception:  # a broken listener (closed websocket) must not stop the batch
                log.exception("batch event listener failed")



def _minutes(seconds: float) -> str:
    return f"{seconds / 60:g} min" if seconds >= 60 else f"{seconds:g} s"


__all__ = ["BatchProgress", "BatchQueue"]
