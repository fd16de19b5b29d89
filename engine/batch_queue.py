"""The background queue of batches the web app and the APIs submit to: one batch at a time on its own
thread (GPU concurrency 1), with a live :class:`BatchProgress` snapshot per batch that anyone can read.
Closing a browser tab does not stop a batch: the queue owns it.

Listeners get every :class:`BatchEvent` of the batches it runs, plus the queue's own: ``batch_queued``
(submitted), ``batch_cancelled`` (taken off the queue before it ran) and ``batch_failed`` (the run itself
raised). A batch's progress already shows its final state when its ``batch_done`` reaches listeners, so
anyone counting the queue from a listener never counts a finished batch as waiting. ``batch_queued`` and
``batch_cancelled`` are published on the caller's thread (a web request): listeners must not block on them.
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

log = logging.getLogger(__name__)


@dataclass
class BatchProgress:
    """A live snapshot of one batch for the web app and the API."""

    batch_id: str
    state: str = "queued"  # queued | running | done | finished_with_errors | cancelled | error
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
    updated: float = field(default_factory=time.time)


class BatchQueue:
    """Runs submitted batches one after another on a background thread (GPU concurrency 1).

    Closing a browser tab does not stop a batch: the queue owns it, and anyone can read its progress.
    """

    def __init__(self, runner: BatchRunner, keep_images: int = 48) -> None:
        self.runner = runner
        self.keep_images = keep_images
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

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify_all()

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

    def cancel(self, batch_id: str) -> str:
        """Stop a running batch between sampler steps, or take a waiting one off the queue.

        Returns what happened: ``"cancelling"`` (running here), ``"removed_from_queue"`` (it had not
        started; its rows are marked cancelled, ready to resume) or ``"not_running"`` (nothing to cancel
        here). A batch that is neither waiting nor running is left alone: a stale cancel must not stop its
        next resume.
        """
        with self._lock:
            waiting = batch_id in self._order
            progress = self._progress.get(batch_id)
            running = progress is not None and progress.state == "running"
            if waiting:
                self._order.remove(batch_id)
                progress.state = "cancelled"
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

    def wait(self, batch_id: str, timeout: float = 60.0) -> BatchProgress | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            progress = self.status(batch_id)
            if progress is not None and progress.state not in {"queued", "running"}:
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
                    self._finish(progress, summary)
            except Exception as exc:  # a batch-level failure must not kill the queue thread
                log.exception("batch %s failed", batch_id)
                with self._lock:
                    progress.state = "error"
                    progress.error = describe_error(exc) if isinstance(exc, EngineError) else str(exc)
                    if isinstance(exc, EngineError) and exc.code is not None:
                        progress.error_code, progress.error_details = exc.code, jsonable(exc.details)
                self._publish(BatchEvent("batch_failed", batch_id, error=progress.error))
            finally:
                with self._lock:
                    progress.updated = time.time()
                    # A cancel that landed after the run's last step has nothing left to stop: drop it, so
                    # it cannot stop this batch's next resume.
                    self.runner.forget_cancel(batch_id)

    @staticmethod
    def _finish(progress: BatchProgress, summary: Any) -> None:
        """Set the final state of a run from its summary (caller holds the lock)."""
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
            progress.updated = time.time()
        self._publish(event)

    def _publish(self, event: BatchEvent) -> None:
        for listener in list(self.listeners):
            try:
                listener(event)
            except Exception:  # a broken listener (closed websocket) must not stop the batch
                log.exception("batch event listener failed")



__all__ = ["BatchProgress", "BatchQueue"]
