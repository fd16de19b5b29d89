"""Where rows run: :class:`RowExecutor` turns jobs into results on the resident engine (same-shape rows as
one GPU batch, out-of-memory retried with the tiled VAE, every failure a status), and
:class:`LocalDispatcher` feeds it from a GPU thread so storing results overlaps sampling. The Celery
dispatcher (engine.distributed) has the same ``run`` contract.
"""

from __future__ import annotations

import contextvars
import hashlib
import logging
import queue
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from engine.errors import ERROR_CODES, BadOutput, Cancelled, DeadlineExceeded, EngineError, ExecutionError, OutOfMemory
from engine.execute import full_type_name
from engine.jobs import CANCELLED, DONE, FAILED, TIMED_OUT, RowImage, RowJob, RowResult

log = logging.getLogger(__name__)


ProgressCallback = Callable[[str, Any], None]  # (row_key, ProgressEvent)


class PendingRow:
    """A row whose GPU work is done while its PNGs may still be encoding; :meth:`result` waits for them."""

    def __init__(self, finish: Callable[[], RowResult]) -> None:
        self._finish = finish
        self._result: RowResult | None = None

    @classmethod
    def ready(cls, result: RowResult) -> "PendingRow":
        pending = cls(lambda: result)
        pending._result = result
        return pending

    def result(self) -> RowResult:
        if self._result is None:
            self._result = self._finish()
        return self._result


class RowExecutor:
    """Runs jobs on the resident engine: in this process, or inside a Celery worker.

    Same-shape jobs run as one GPU batch (each row keeps its own seed, so batching never changes an image);
    how many rows share a batch is chosen when the batch starts, from free device memory
    (:func:`engine.throughput.choose_gpu_batch`, at most ``max_gpu_batch``). Output nodes hand their
    images to a PNG encoder pool (:func:`engine.nodes.image.deferred_saves`), so the GPU batch returns
    before its PNGs are made: :meth:`start_group` returns at once, and a row's :class:`PendingRow` waits
    for its bytes. A row's own failure never raises: it becomes a RowResult with a status and a reason.
    """

    def __init__(
        self, engine: Any, max_gpu_batch: int = 4, worker_name: str = "local", png_workers: int = 2
    ) -> None:
        self.engine = engine
        self.max_gpu_batch = max(1, int(max_gpu_batch))
        self.worker_name = worker_name
        self.png_workers = png_workers
        self._encoder: Any = None  # PngEncoder, started on first use
        self._encoder_lock = threading.Lock()

    def close(self) -> None:
        """Stop the PNG encoder threads (after finishing what they hold)."""
        with self._encoder_lock:
            encoder, self._encoder = self._encoder, None
        if encoder is not None:
            encoder.close()

    def execute(
        self,
        jobs: list[RowJob],
        on_progress: ProgressCallback | None = None,
        should_cancel: Callable[[], bool] | None = None,
    ) -> list[RowResult]:
        results: list[RowResult] = []
        for group in self.groups(jobs):
            results.extend(row.result() for row in self.start_group(group, on_progress, should_cancel))
        return results

    def groups(self, jobs: list[RowJob]) -> Iterator[list[RowJob]]:
        """Consecutive chunks of same-shape jobs in row order. Each chunk's size is chosen lazily, when
        the chunk is asked for, so it sees the device memory left after the previous batches."""
        by_shape: dict[str, list[RowJob]] = {}
        order: list[str] = []
        for job in jobs:
            key = self._shape_key(job)
            if key not in by_shape:
                order.append(key)
                by_shape[key] = []
            by_shape[key].append(job)
        for key in order:
            members = by_shape[key]
            start = 0
            while start < len(members):
                size = self._batch_size(members[start])
                yield members[start : start + size]
                start += size

    def _shape_key(self, job: RowJob) -> str:
        try:
            return self.engine.batch_key(self.engine.parse(job.workflow))
        except EngineError:
            return f"unparseable:{job.row_key}"

    def _batch_size(self, job: RowJob) -> int:
        if self.max_gpu_batch == 1:
            return 1
        from engine.throughput import choose_gpu_batch

        try:
            workflow = self.engine.parse(job.workflow)
        except EngineError:
            return 1
        return choose_gpu_batch(self.engine, workflow, self.max_gpu_batch)

    def _png_encoder(self) -> Any:
        with self._encoder_lock:
            if self._encoder is None:
                from engine.nodes.image import PngEncoder

                self._encoder = PngEncoder(self.png_workers)
            return self._encoder

    def start_group(
        self,
        group: list[RowJob],
        on_progress: ProgressCallback | None,
        should_cancel: Callable[[], bool] | None,
        vae_tiled: bool = False,
    ) -> list[PendingRow]:
        """Run one GPU batch; return one PendingRow per job without waiting for the PNGs."""
        from engine.nodes.image import deferred_saves

        started = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="rows-") as staging:
            try:
                workflows = [self.engine.parse(job.workflow) for job in group]
            except EngineError as exc:
                if len(group) > 1:  # parse each alone so one bad row doesn't fail its neighbours
                    return [r for job in group for r in self.start_group([job], on_progress, should_cancel)]
                return [PendingRow.ready(self._failure(group[0], exc))]

            def progress(event: Any) -> None:
                if on_progress is None:
                    return
                row = event.row_index if getattr(event, "row_index", None) is not None else 0
                for index, job in enumerate(group):
                    if len(group) == 1 or index == row or event.row_index is None:
                        on_progress(job.row_key, event)

            deadline = max(job.deadline_s for job in group) * len(group)
            try:
                input_dirs = [job.materialize_inputs(Path(staging) / f"inputs-{i}") for i, job in enumerate(group)]
            except (EngineError, OSError, ValueError) as exc:  # carried photos that cannot be written
                if len(group) > 1:  # alone, so one bad row doesn't fail its neighbours
                    return [r for job in group for r in self.start_group([job], on_progress, should_cancel)]
                return [PendingRow.ready(self._failure(group[0], exc))]
            with deferred_saves(self._png_encoder()):
                outcomes = self.engine.run_batch(
                    workflows,
                    output_dir=Path(staging),
                    on_progress=progress,
                    should_cancel=should_cancel,
                    deadline_s=deadline,
                    png_extra=[job.png_extra for job in group],
                    vae_tiled=vae_tiled,
                    input_dir=input_dirs,
                )
            gpu_s = time.perf_counter() - started
            results: list[PendingRow] = []
            if any(isinstance(outcome, OutOfMemory) for outcome in outcomes):
                release_device_memory()  # the failed batch's tensors are gone: give their memory back first
            for job, outcome in zip(group, outcomes):
                if isinstance(outcome, OutOfMemory) and not vae_tiled:
                    # Retry once on its own, decoding in tiles: the cheaper setting the issue asks for.
                    log.warning("row %s ran out of memory; retrying alone with tiled VAE", job.row_key)
                    retry = self.start_group([job], on_progress, should_cancel, vae_tiled=True)[0]
                    results.append(PendingRow(lambda retry=retry: _mark_oom_retry(retry.result())))
                elif isinstance(outcome, BaseException):
                    results.append(PendingRow.ready(self._failure(job, outcome)))
                else:
                    # Files an output node wrote itself (outside the deferral) are read before staging goes.
                    results.append(self._success(job, outcome, gpu_s, len(group), vae_tiled))
            return results

    def _success(self, job: RowJob, outcome: Any, gpu_s: float, rows: int, vae_tiled: bool) -> PendingRow:
        from engine.nodes.image import PendingImage

        parts: list[Any] = []  # PendingImage, or a RowImage read from a file now
        for saved in outcome.images:
            if isinstance(saved, PendingImage):
                parts.append(saved)
                continue
            data = Path(saved.path).read_bytes()
            parts.append(RowImage(
                filename=Path(saved.path).name, data=data, sha256=hashlib.sha256(data).hexdigest(),
                width=int(saved.width), height=int(saved.height), node_id=str(getattr(saved, "node_id", "") or ""),
                subfolder=str(getattr(saved, "subfolder", "") or ""), type=str(getattr(saved, "type", "output")),
            ))
        record = dict(outcome.record)
        if vae_tiled:
            record["vae_tiled"] = True
        timings = dict(outcome.timings)
        timings["gpu_s"] = gpu_s / rows  # this row's share of the GPU batch
        timings["gpu_batch"] = rows

        def finish() -> RowResult:
            images: list[RowImage] = []
            png_s = png_cpu_s = 0.0
            for part in parts:
                if not isinstance(part, PendingImage):
                    images.append(part)
                    continue
                try:
                    encoded = part.result()
                except Exception as exc:  # an encoding failure fails this row only
                    return self._failure(job, BadOutput(f"PNG encoding failed: {type(exc).__name__}: {exc}"))
                png_s += encoded.encode_s
                png_cpu_s += encoded.encode_cpu_s
                images.append(RowImage(
                    filename=encoded.filename, data=encoded.data, sha256=encoded.sha256, width=encoded.width,
                    height=encoded.height, node_id=str(encoded.node_id or ""), subfolder=str(encoded.subfolder or ""),
                    type=encoded.type,
                ))
            if not images:
                return self._failure(job, BadOutput("the workflow produced no image", code="no_image"))
            row_timings = {**timings, "png_s": round(png_s, 4), "png_cpu_s": round(png_cpu_s, 4)}
            row_timings.setdefault("row_s", timings["gpu_s"] + png_s)
            return RowResult(job.row_key, DONE, None, images, record, row_timings, self.worker_name)

        return PendingRow(finish)

    def _failure(self, job: RowJob, error: BaseException) -> RowResult:
        if isinstance(error, DeadlineExceeded):
            status = TIMED_OUT
        elif isinstance(error, Cancelled):
            status = CANCELLED
        else:
            status = FAILED
        message = error.message if isinstance(error, EngineError) else f"{type(error).__name__}: {error}"
        where = getattr(error, "node_id", None)
        if where:
            message = f"node {where} ({getattr(error, 'class_type', '?')}): {message}"
        details = error.details if isinstance(error, EngineError) else {}
        # What went wrong as ComfyUI names it, the exception's type: for a generic ExecutionError that a node
        # raised from another exception (a file it could not read), that exception's.
        cause = error.__cause__ if type(error) is ExecutionError else None
        failure = {
            "node_id": where,
            "node_type": getattr(error, "class_type", None),
            "exception_type": details.get("exception_type") or full_type_name(type(cause or error)),
            "executed": list(details.get("executed", [])),
            "current_outputs": list(details.get("cached", [])),
            "current_inputs": dict(details.get("current_inputs", {})),
        }
        code = getattr(error, "code", None)
        if code in ERROR_CODES:  # so a page can say why in its language (webapp.i18n.row_error_text)
            failure["code"] = code
            failure["values"] = {name: details.get(name) for name in ERROR_CODES[code]}
        return RowResult(job.row_key, status, message, [], {}, {}, self.worker_name, failure)


def _mark_oom_retry(result: RowResult) -> RowResult:
    result.record.setdefault("oom_retry", True)
    return result


# --------------------------------------------------------------------------------------- dispatchers


class Dispatcher(Protocol):
    """Where rows run. Yields one RowResult per job (in any order)."""

    def run(
        self,
        jobs: list[RowJob],
        on_event: ProgressCallback | None,
        should_cancel: Callable[[], bool] | None,
    ) -> Iterator[RowResult]: ...


@dataclass
class PipelineStats:
    """Where the time of one :meth:`LocalDispatcher.run` went, in seconds.

    ``gpu_s``: the GPU thread running batches; ``gpu_blocked_s``: the GPU thread waiting for room in the
    queue (storing fell behind: the GPU idled); ``png_wait_s``: the storing side waiting for PNGs still
    being encoded; ``store_s``: the caller's work per yielded row (file write, fsync, ledger commit, events).
    """

    rows: int = 0
    batches: int = 0
    gpu_s: float = 0.0
    gpu_blocked_s: float = 0.0
    png_wait_s: float = 0.0
    store_s: float = 0.0
    wall_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(self).items()}


def release_device_memory() -> None:
    """Return cached device memory after an out-of-memory error, so the next row starts from baseline."""
    import gc

    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class LocalDispatcher:
    """Runs rows in this process on the resident engine, one GPU batch at a time.

    The GPU work runs on its own thread and hands rows through a small bounded queue as soon as a batch is
    sampled and decoded; their PNGs are encoded on the executor's pool meanwhile. Storing a finished row
    (file write, fsync, ledger commit) therefore overlaps with sampling the next rows, while memory stays
    flat: at most ``pipeline_depth`` finished batches wait to be stored. ``last_stats`` holds the
    :class:`PipelineStats` of the latest run.
    """

    def __init__(self, executor: RowExecutor, pipeline_depth: int = 2) -> None:
        self.executor = executor
        self.pipeline_depth = max(1, pipeline_depth)
        self.last_stats: PipelineStats | None = None

    def run(
        self,
        jobs: list[RowJob],
        on_event: ProgressCallback | None,
        should_cancel: Callable[[], bool] | None,
    ) -> Iterator[RowResult]:
        results: queue.Queue[list[PendingRow] | BaseException | None] = queue.Queue(self.pipeline_depth)
        stop = threading.Event()
        stats = self.last_stats = PipelineStats()
        started = time.perf_counter()
        context = contextvars.copy_context()  # log context (batch id) follows the work onto the GPU thread

        def hand_over(item: list[PendingRow] | BaseException | None) -> None:
            waited = time.perf_counter()
            results.put(item)
            stats.gpu_blocked_s += time.perf_counter() - waited

        def produce() -> None:
            try:
                for group in self.executor.groups(jobs):
                    if stop.is_set():
                        return
                    if should_cancel is not None and should_cancel():
                        hand_over([
                            PendingRow.ready(RowResult(job.row_key, CANCELLED, "cancelled before it started"))
                            for job in group
                        ])
                        continue
                    began = time.perf_counter()
                    pending = self.executor.start_group(group, on_event, should_cancel)
                    stats.gpu_s += time.perf_counter() - began
                    stats.batches += 1
                    hand_over(pending)
            except BaseException as exc:  # surfaced on the consumer side, never lost in the thread
                results.put(exc)
            finally:
                results.put(None)

        worker = threading.Thread(target=context.run, args=(produce,), name="gpu-rows", daemon=True)
        worker.start()
        try:
            while (item := results.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                for pending in item:
                    waited = time.perf_counter()
                    result = pending.result()
                    stats.png_wait_s += time.perf_counter() - waited
                    stats.rows += 1
                    handed = time.perf_counter()
                    yield result
                    stats.store_s += time.perf_counter() - handed
        finally:
            stop.set()
            while worker.is_alive():  # unblock a producer waiting on a full queue, then let it finish
                try:
                    results.get(timeout=0.1)
                except queue.Empty:
                    pass
            worker.join()
            stats.wall_s = time.perf_counter() - started



__all__ = ["Dispatcher", "LocalDispatcher", "PendingRow", "PipelineStats", "ProgressCallback", "RowExecutor"]
