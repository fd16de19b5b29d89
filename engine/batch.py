"""Rows -> jobs -> results: the production line.

A batch is a template, a spreadsheet and a batch seed. :class:`BatchRunner` validates and renders every
row before any GPU work, records the batch in the ledger, and runs the pending rows through a
:class:`Dispatcher` (in process, or on Celery workers). The coordinator is the single writer of the ledger
and of the output folder: an image is written to a temporary name, fsynced and renamed before its ledger
row is committed ``done``, so a crash at any point leaves no finished row without its file and no row with
two images. Resume is simply "run the rows that are not done".
"""

from __future__ import annotations

import base64
import contextvars
import hashlib
import json
import logging
import os
import queue
import secrets
import shutil
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from engine.errors import (
    BadOutput,
    BatchError,
    BatchMismatch,
    Cancelled,
    DeadlineExceeded,
    EngineError,
    OutOfMemory,
)
from engine.logs import log_context
from engine.naming import fill_filename_pattern, safe_filename
from engine.sheets import Sheet, ValidationReport, derive_seed, validate_rows

log = logging.getLogger(__name__)

DONE, FAILED, TIMED_OUT, CANCELLED, QUEUED, SKIPPED = "done", "failed", "timed_out", "cancelled", "queued", "skipped"
STAGING_FOLDER = ".staging"  # under the uploads folder: photos unpacked for a batch not yet started
STAGING_MAX_AGE_S = 24 * 3600


# --------------------------------------------------------------------------------------------- jobs


@dataclass
class RowJob:
    """One rendered sheet row: everything a worker needs, nothing it must look up in the ledger."""

    row_key: str
    batch_id: str
    row_number: int
    workflow: dict[str, Any]
    png_extra: dict[str, Any]
    deadline_s: float
    checkpoint: str
    attempt: int = 1
    input_dir: str | None = None  # where LoadImage reads (the batch's photos); None: the uploads folder
    input_files: dict[str, str] = field(default_factory=dict)  # wire form: file name -> base64 bytes

    def to_dict(self) -> dict[str, Any]:
        """The wire form for workers. It carries the bytes of the input images the workflow reads, so a
        worker on another machine, without the coordinator's uploads folder, finds the row's photos."""
        data = asdict(self)
        if self.input_dir and not self.input_files:
            from engine.image_refs import workflow_image_names

            folder = Path(self.input_dir)
            data["input_files"] = {
                name: base64.b64encode((folder / name).read_bytes()).decode("ascii")
                for name in workflow_image_names(self.workflow)
                if _plain_file_name(name) and (folder / name).is_file()
            }
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RowJob":
        return cls(**data)

    def materialize_inputs(self, folder: Path) -> Path | None:
        """The folder LoadImage reads for this job: its carried files written into ``folder``, else
        its ``input_dir`` (None: the engine's uploads folder)."""
        if not self.input_files:
            return Path(self.input_dir) if self.input_dir else None
        folder.mkdir(parents=True, exist_ok=True)
        for name, encoded in self.input_files.items():
            if not _plain_file_name(name):
                raise BatchError(f"row {self.row_key}: refused input file name {name!r}", batch_id=self.batch_id)
            (folder / name).write_bytes(base64.b64decode(encoded))
        return folder


def _plain_file_name(name: str) -> bool:
    """A bare file name: no folder part, not hidden, nothing that could leave the folder it is written to."""
    return bool(name) and Path(name).name == name and "\\" not in name and not name.startswith(".")


@dataclass
class RowImage:
    filename: str
    data: bytes
    sha256: str
    width: int
    height: int
    node_id: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "data": base64.b64encode(self.data).decode("ascii")}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RowImage":
        return cls(**{**data, "data": base64.b64decode(data["data"])})


@dataclass
class RowResult:
    row_key: str
    status: str
    error: str | None = None
    images: list[RowImage] = field(default_factory=list)
    record: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, Any] = field(default_factory=dict)
    worker: str = "local"

    def to_dict(self) -> dict[str, Any]:
        return {
            "row_key": self.row_key,
            "status": self.status,
            "error": self.error,
            "images": [image.to_dict() for image in self.images],
            "record": _jsonable(self.record),
            "timings": _jsonable(self.timings),
            "worker": self.worker,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RowResult":
        return cls(
            row_key=data["row_key"],
            status=data["status"],
            error=data.get("error"),
            images=[RowImage.from_dict(i) for i in data.get("images", [])],
            record=data.get("record", {}),
            timings=data.get("timings", {}),
            worker=data.get("worker", "?"),
        )


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


# ----------------------------------------------------------------------------------------- executor


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

    def _execute_group(
        self,
        group: list[RowJob],
        on_progress: ProgressCallback | None,
        should_cancel: Callable[[], bool] | None,
        vae_tiled: bool = False,
    ) -> list[RowResult]:
        return [row.result() for row in self.start_group(group, on_progress, should_cancel, vae_tiled)]

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
            ))
        record = dict(outcome.record)
        if vae_tiled:
            record["vae_tiled"] = True
        timings = dict(outcome.timings)
        timings["gpu_s"] = gpu_s / rows  # this row's share of the GPU batch
        timings["gpu_batch"] = rows

        def finish() -> RowResult:
            images: list[RowImage] = []
            png_s = 0.0
            for part in parts:
                if not isinstance(part, PendingImage):
                    images.append(part)
                    continue
                try:
                    encoded = part.result()
                except Exception as exc:  # an encoding failure fails this row only
                    return self._failure(job, BadOutput(f"PNG encoding failed: {type(exc).__name__}: {exc}"))
                png_s += encoded.encode_s
                images.append(RowImage(
                    filename=encoded.filename, data=encoded.data, sha256=encoded.sha256, width=encoded.width,
                    height=encoded.height, node_id=str(encoded.node_id or ""),
                ))
            if not images:
                return self._failure(job, BadOutput("the workflow produced no image"))
            row_timings = {**timings, "png_s": round(png_s, 4)}
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
        return RowResult(job.row_key, status, message, [], {}, {}, self.worker_name)


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


# ----------------------------------------------------------------------------------------- batches


@dataclass
class BatchEvent:
    kind: str
    batch_id: str
    row_number: int | None = None
    node_id: str | None = None
    image_path: str | None = None
    error: str | None = None
    step: int = 0
    steps: int = 0
    done: int = 0
    failed: int = 0
    remaining: int = 0
    eta_s: float | None = None


@dataclass
class PreparedBatch:
    batch_id: str
    template: Any
    sheet: Sheet
    report: ValidationReport
    batch_seed: int
    sheet_hash: str
    rows: list[dict[str, Any]]  # ledger rows to insert (queued or skipped)
    user: str | None = None
    resumed: bool = False
    images: Any = None  # engine.image_refs.ImageLibrary: the photos the rows name, installed by start()

    @property
    def runnable(self) -> int:
        return sum(1 for row in self.rows if row["status"] == QUEUED)


@dataclass
class BatchSummary:
    batch_id: str
    done: int
    failed: int
    timed_out: int
    skipped: int
    cancelled: int
    total: int
    output_dir: Path
    seconds: float

    @property
    def ok(self) -> bool:
        return self.failed == 0 and self.timed_out == 0 and self.cancelled == 0


class BatchRunner:
    """Validates, records and runs batches. The single writer of the ledger and the output folder."""

    def __init__(
        self,
        engine: Any,
        ledger: Any,
        templates: Any,
        settings: Any,
        dispatcher: Dispatcher | None = None,
        on_result: Callable[[RowResult], None] | None = None,
    ) -> None:
        self.engine = engine
        self.ledger = ledger
        self.templates = templates
        self.settings = settings
        self.dispatcher = dispatcher or LocalDispatcher(
            RowExecutor(engine, max_gpu_batch=settings.max_gpu_batch)
        )
        self.on_result = on_result
        self._cancelled: set[str] = set()
        self._lock = threading.Lock()

    # ----------------------------------------------------------------- models

    @property
    def default_checkpoint(self) -> str:
        """The checkpoint templates use when a row names none (the engine's, switchable by admins)."""
        return self.engine.default_checkpoint

    def allowed_checkpoints(self) -> list[str]:
        """The checkpoints an admin may switch to: the allow-list setting, else every one found."""
        available = self.engine.available_checkpoints()
        allow = [name.strip() for name in self.settings.allowed_models.split(",") if name.strip()]
        return [name for name in available if name in allow] if allow else available

    def switch_checkpoint(self, name: str) -> None:
        """Make ``name`` the checkpoint templates use by default, loading it now (admins only, at the edge)."""
        allowed = self.allowed_checkpoints()
        if name not in allowed:
            raise BatchError(f"checkpoint {name!r} is not allowed; allowed: {', '.join(allowed) or 'none'}")
        self.engine.switch_model(name)

    # ---------------------------------------------------------------- prepare

    def prepare(
        self,
        template_name: str,
        sheet: Sheet,
        *,
        batch_seed: int | None = None,
        on_invalid: str = "skip",
        user: str | None = None,
        batch_id: str | None = None,
        images: Any = None,
    ) -> PreparedBatch:
        """Validate every row and render its workflow; nothing is recorded or run yet.

        ``images`` (an :class:`engine.image_refs.ImageLibrary`): the photos uploaded with the sheet. A cell
        of an ``image`` field naming a photo that is not among them, or that is not readable, is a row
        problem. Resuming a batch uses the photos it was started with (``images`` may be left out; other
        photos are refused).
        """
        if on_invalid not in {"skip", "stop"}:
            raise BatchError(f"on_invalid must be 'skip' or 'stop', not {on_invalid!r}")
        template = self.templates.get(template_name)
        fingerprint = sheet.content_hash
        resumed = False
        if batch_id is not None:
            existing = self.ledger.get_batch(batch_id)
            if existing is not None:
                self.ledger.ensure_same_inputs(batch_id, template.content_hash, fingerprint)
                resumed = True
                batch_seed = int(existing["batch_seed"])
                images = self._resumed_images(batch_id, images)
        report = validate_rows(sheet, template, images=images)
        if report.missing_columns:
            raise BatchError(
                f"the sheet lacks required column(s): {', '.join(report.missing_columns)}",
                missing_columns=report.missing_columns,
            )
        input_dir = images.folder if images is not None else None
        if batch_seed is None:
            batch_seed = secrets.randbits(63)
        batch_id = batch_id or f"b{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
        defaults = {"checkpoint": self.default_checkpoint}
        rows: list[dict[str, Any]] = []
        for row_report in report.rows:
            values = dict(row_report.values or {})
            problems = [f"{p.column or 'row'}: {p.reason}" for p in row_report.problems]
            rendered: dict[str, Any] | None = None
            if row_report.ok:
                for seed_field in (f.name for f in template.fields if f.type == "seed"):
                    if values.get(seed_field) in (None, ""):
                        values[seed_field] = derive_seed(batch_seed, row_report.number)
                try:
                    rendered = template.render(values, defaults=defaults)
                    self.engine.validate(self.engine.parse(rendered), input_dir=input_dir)
                except EngineError as exc:
                    problems.append(_describe(exc))
                    rendered = None
            status = QUEUED if rendered is not None else SKIPPED
            if rendered is None and row_report.ok:
                row_report.ok = False
                row_report.problems.append(_row_problem(row_report.number, None, problems[-1]))
            seeds = [values[f.name] for f in template.fields if f.type == "seed" and values.get(f.name) is not None]
            rows.append(
                {
                    "row_number": row_report.number,
                    "values": {**row_report.cells, **_jsonable(values)},
                    "seed": seeds[0] if seeds else None,
                    "workflow": rendered,
                    "status": status,
                    "error": "; ".join(problems) or None,
                }
            )
        if on_invalid == "stop" and any(row["status"] == SKIPPED for row in rows):
            bad = [row["row_number"] for row in rows if row["status"] == SKIPPED]
            raise BatchError(
                f"{len(bad)} row(s) have problems (rows {', '.join(map(str, bad[:20]))}); nothing was queued",
                rows=bad,
            )
        return PreparedBatch(batch_id, template, sheet, report, batch_seed, fingerprint, rows, user, resumed, images)

    def unpack_photos(self, source: Any, limits: Any = None) -> Any:
        """The photos zip uploaded with a sheet (path, bytes or file object) as an ImageLibrary, unpacked
        into a staging folder under the uploads folder. :meth:`start` copies the photos into the batch's
        own folder and removes the staging; staging left by batches never started goes after a day."""
        from engine.image_refs import ImageLibrary

        root = Path(self.settings.uploads_path) / STAGING_FOLDER
        root.mkdir(parents=True, exist_ok=True)
        cutoff = time.time() - STAGING_MAX_AGE_S
        for old in root.iterdir():
            if old.is_dir() and old.stat().st_mtime < cutoff:
                shutil.rmtree(old, ignore_errors=True)
        folder = Path(tempfile.mkdtemp(prefix="photos-", dir=root))
        try:
            return ImageLibrary.from_zip(source, folder / "images", limits)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise

    def discard_staging(self, images: Any) -> None:
        """Remove the staging folder of photos from :meth:`unpack_photos` (nothing else is touched)."""
        root = (Path(self.settings.uploads_path) / STAGING_FOLDER).resolve()
        holder = Path(images.folder).resolve().parent
        if holder.parent == root:
            shutil.rmtree(holder, ignore_errors=True)

    def images_dir(self, batch_id: str) -> Path:
        """The batch's own copy of its photos (``<data_dir>/uploads/<batch_id>/images``): its input folder."""
        return Path(self.settings.uploads_path) / batch_id / "images"

    def _resumed_images(self, batch_id: str, images: Any) -> Any:
        """The photos batch ``batch_id`` was started with; BatchMismatch when ``images`` are other photos."""
        from engine.image_refs import ImageLibrary

        folder = self.images_dir(batch_id)
        if not folder.is_dir():
            if images is not None and len(images):
                raise BatchMismatch(f"batch {batch_id} was started without photos; start a new batch to use them",
                                    batch_id=batch_id)
            return None
        stored = ImageLibrary.from_folder(folder)
        if images is not None and images.content_hash != stored.content_hash:
            raise BatchMismatch(
                f"batch {batch_id} was started with other photos ({stored.describe()}); resume it without "
                "photos (it keeps its own copy) or start a new batch", batch_id=batch_id,
            )
        return stored

    def reference_images(self, batch: dict[str, Any] | str, row_values: dict[str, Any]) -> list[Path]:
        """The batch's photos a row used (its ``image`` fields' files), for showing beside the result.

        ``batch``: the ledger's batch dict, or its id."""
        if isinstance(batch, str):
            batch = self.ledger.get_batch(batch) or {"id": batch}
        options = batch.get("options") or {}
        if isinstance(options, str):
            options = json.loads(options)
        folder = self.images_dir(batch["id"])
        found = []
        for name in options.get("image_fields") or []:
            value = row_values.get(name)
            if isinstance(value, str) and _plain_file_name(value) and (folder / value).is_file():
                found.append(folder / value)
        return found

    def prepare_workflow(
        self,
        workflow: dict[str, Any],
        *,
        user: str | None = None,
        batch_id: str | None = None,
        png_extra: dict[str, Any] | None = None,
        kind: str = "workflow",
    ) -> PreparedBatch:
        """A one-row batch from a ready workflow (ComfyUI's /prompt, the single-image form, a re-run)."""
        parsed = self.engine.parse(workflow)
        self.engine.validate(parsed)
        api = parsed.to_api()
        batch_id = batch_id or f"{kind[:1]}{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
        values = {"workflow_kind": kind, **({"png_extra": png_extra} if png_extra else {})}
        row = {"row_number": 1, "values": values, "workflow": api, "status": QUEUED, "error": None}
        sheet = Sheet(columns=[], rows=[], filename=kind)
        digest = hashlib.sha256(json.dumps(api, sort_keys=True).encode()).hexdigest()
        template = _WorkflowTemplate(name=f"({kind})", content_hash=digest, filename_pattern=f"{kind}_{{row}}")
        return PreparedBatch(batch_id, template, sheet, ValidationReport(rows=[], missing_columns=[], unknown_columns=[]), 0, digest, [row], user)

    def find_unfinished(self, template_name: str, sheet: Sheet) -> str | None:
        """The id of an unfinished batch of the same template and sheet, so re-running a command resumes it."""
        template = self.templates.get(template_name)
        for batch in self.unfinished_batches():
            if batch["template_hash"] == template.content_hash and batch["sheet_hash"] == sheet.content_hash:
                return batch["id"]
        return None

    def unfinished_batches(self, limit: int = 200) -> list[dict[str, Any]]:
        """Batches with rows still to run (queued, running or cancelled), newest first."""
        found = []
        for batch in self.ledger.list_batches(limit=limit):
            counts = self.ledger.batch_summary(batch["id"])["counts"]
            if counts["queued"] + counts["running"] + counts["cancelled"] > 0:
                found.append(batch)
        return found

    def start(self, prepared: PreparedBatch) -> str:
        """Record the batch and its rows (queued or skipped). Idempotent for a resumed batch."""
        template = prepared.template
        if not prepared.resumed:
            images = prepared.images
            if images is not None:  # the batch's own copy, so resume and re-runs find the same photos
                images = images.install(self.images_dir(prepared.batch_id))
                self.discard_staging(prepared.images)
            self.ledger.create_batch(
                batch_id=prepared.batch_id,
                template_name=template.name,
                template_hash=template.content_hash,
                sheet_name=prepared.sheet.filename,
                sheet_hash=prepared.sheet_hash,
                batch_seed=prepared.batch_seed,
                user=prepared.user,
                options={
                    "filename_pattern": template.filename_pattern,
                    "columns": list(prepared.sheet.columns),
                    "keep_workflow_names": isinstance(template, _WorkflowTemplate),
                    "image_fields": [f.name for f in getattr(template, "fields", ()) if f.type == "image"],
                    **({"images": {"count": len(images), "content_hash": images.content_hash}} if images is not None else {}),
                },
            )
            self.ledger.add_rows(prepared.batch_id, prepared.rows)
        return prepared.batch_id

    # -------------------------------------------------------------------- run

    def cancel(self, batch_id: str) -> None:
        with self._lock:
            self._cancelled.add(batch_id)

    def is_cancelled(self, batch_id: str) -> bool:
        with self._lock:
            return batch_id in self._cancelled

    def output_dir(self, batch_id: str) -> Path:
        return Path(self.settings.outputs_path) / batch_id

    def run(
        self,
        batch_id: str,
        on_event: Callable[[BatchEvent], None] | None = None,
        should_cancel: Callable[[], bool] | None = None,
        retry_failed: bool = False,
    ) -> BatchSummary:
        """Run every row of the batch that is not done. Safe to call again after a crash: that is resume."""
        batch = self.ledger.get_batch(batch_id)
        if batch is None:
            raise BatchError(f"no batch {batch_id!r} in the ledger", batch_id=batch_id)
        with self._lock:
            self._cancelled.discard(batch_id)
        started = time.perf_counter()
        out_dir = self.output_dir(batch_id)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.ledger.reset_stale_running(batch_id)
        all_rows = self.ledger.rows(batch_id)
        names = self._file_names(batch, all_rows)
        requeue = [CANCELLED] + ([FAILED, TIMED_OUT] if retry_failed else [])
        self.ledger.requeue(batch_id, requeue)
        all_rows = self.ledger.rows(batch_id)
        pending = [row for row in all_rows if row.status == QUEUED]
        jobs = [self._job(batch, row) for row in pending]
        by_key = {job.row_key: job for job in jobs}
        counts = {DONE: sum(1 for r in all_rows if r.status == DONE), FAILED: 0}
        remaining = len(jobs)
        durations: deque[float] = deque(maxlen=20)

        def emit(kind: str, **kw: Any) -> None:
            if on_event is None:
                return
            eta = (sum(durations) / len(durations)) * remaining if durations else None
            on_event(
                BatchEvent(kind, batch_id, done=counts[DONE], failed=counts[FAILED], remaining=remaining, eta_s=eta, **kw)
            )

        def cancelled() -> bool:
            return self.is_cancelled(batch_id) or (should_cancel is not None and should_cancel())

        def on_progress(row_key: str, event: Any) -> None:
            job = by_key.get(row_key)
            if job is None:
                return
            if event.kind == "step":
                emit("step", row_number=job.row_number, node_id=event.node_id, step=event.value, steps=event.maximum)
            elif event.kind in {"node", "cached"}:
                emit("node" if event.kind == "node" else "cached", row_number=job.row_number, node_id=event.node_id)

        self.ledger.set_batch_status(batch_id, "running")
        emit("batch_started")
        last_finish = time.perf_counter()
        with log_context(batch_id=batch_id, user=batch.get("user")):
            log.info("batch started: %d row(s) to run", len(jobs))
            for result in self.dispatcher.run(jobs, on_progress, cancelled):
                job = by_key.get(result.row_key)
                if job is None:
                    continue  # a late or repeated result for a row we no longer wait for
                with log_context(row=job.row_number):
                    now = time.perf_counter()
                    durations.append(now - last_finish)
                    last_finish = now
                    stored = self._store_result(job, result, names, out_dir)
                    if stored is None:
                        continue  # the ledger already had it done: a duplicate delivery
                    remaining -= 1
                    log.info("row %s", result.status, extra={"error": result.error} if result.error else None)
                    if result.status == DONE:
                        counts[DONE] += 1
                        emit("row_done", row_number=job.row_number, image_path=str(stored[0]) if stored else None)
                    else:
                        counts[FAILED] += result.status in {FAILED, TIMED_OUT}
                        emit("row_failed", row_number=job.row_number, error=result.error)
                    if self.on_result is not None:
                        self.on_result(result)
            log.info("batch ended: %d done, %d failed", counts[DONE], counts[FAILED])
        summary = self.summary(batch_id, time.perf_counter() - started)
        self.ledger.set_batch_status(batch_id, "cancelled" if summary.cancelled or cancelled() else "finished")
        emit("batch_done")
        return summary

    def summary(self, batch_id: str, seconds: float = 0.0) -> BatchSummary:
        rows = self.ledger.rows(batch_id)
        count = lambda status: sum(1 for r in rows if r.status == status)  # noqa: E731
        return BatchSummary(
            batch_id,
            count(DONE),
            count(FAILED),
            count(TIMED_OUT),
            count(SKIPPED),
            count(CANCELLED) + count(QUEUED),
            len(rows),
            self.output_dir(batch_id),
            seconds,
        )

    # ------------------------------------------------------------------- zips

    def _zip_pattern(self, batch_id: str) -> str:
        batch = self.ledger.get_batch(batch_id)
        if batch is None:
            raise BatchError(f"no batch {batch_id!r} in the ledger", batch_id=batch_id)
        return (batch.get("options") or {}).get("filename_pattern") or "row_{row}"

    def write_zip(self, batch_id: str, out: Path | Any) -> Any:
        """The batch's zip (images named by the template's pattern + manifests) to a path or file object."""
        from engine.archive import write_batch_zip

        return write_batch_zip(self.ledger, batch_id, out, self._zip_pattern(batch_id))

    def zip_stream(self, batch_id: str) -> Iterator[bytes]:
        """The batch's zip as byte chunks, for streaming over HTTP without holding it in memory."""
        from engine.archive import iter_zip_stream

        return iter_zip_stream(self.ledger, batch_id, self._zip_pattern(batch_id))

    # ---------------------------------------------------------------- helpers

    def _job(self, batch: dict[str, Any], row: Any) -> RowJob:
        workflow = row.workflow or {}
        extra = row.row_values.get("png_extra")
        return RowJob(
            row_key=row.row_key,
            batch_id=batch["id"],
            row_number=int(row.row_number),
            workflow=workflow,
            png_extra={
                "batch_id": batch["id"],
                "row": str(row.row_number),
                "template": batch.get("template_name") or "",
                "template_hash": batch.get("template_hash") or "",
                **(extra if isinstance(extra, dict) else {}),
            },
            deadline_s=float(self.settings.row_timeout_s),
            checkpoint=_checkpoint_of(workflow) or self.default_checkpoint,
            attempt=int(row.attempts or 0) + 1,
            input_dir=str(photos) if (photos := self.images_dir(batch["id"])).is_dir() else None,
        )

    def _file_names(self, batch: dict[str, Any], rows: list[Any]) -> dict[int, str]:
        """Safe, unique stems per row, computed the same way on every (re)run from the row order."""
        options = batch.get("options") or {}
        if isinstance(options, str):
            options = json.loads(options)
        if options.get("keep_workflow_names"):
            return {}
        pattern = options.get("filename_pattern") or "row_{row}"
        used: set[str] = set()
        names: dict[int, str] = {}
        for row in sorted(rows, key=lambda r: int(r.row_number)):
            stem = fill_filename_pattern(pattern, {**row.row_values, "row": row.row_number}) or f"row_{row.row_number}"
            names[int(row.row_number)] = safe_filename(stem, used)
        return names

    def _store_result(
        self, job: RowJob, result: RowResult, names: dict[int, str], out_dir: Path
    ) -> list[Path] | None:
        """Files first (atomic), ledger second. Returns None when the row was already done."""
        current = self.ledger.get_generation(job.row_key)
        if current is None or current.status == DONE:
            return None
        duration = result.timings.get("row_s")
        if result.status != DONE:
            self.ledger.fail_row(job.row_key, result.status, result.error or result.status, duration_s=duration)
            return []
        base = names.get(job.row_number)
        paths: list[Path] = []
        for index, image in enumerate(result.images):
            if base is None:  # a ready workflow (ComfyUI /prompt): keep its filename_prefix naming
                final = out_dir / Path(image.filename).name
            else:
                stem = Path(base).stem if index == 0 else f"{Path(base).stem}_{index + 1}"
                final = out_dir / f"{stem}.png"
            _atomic_write(final, image.data)
            paths.append(final)
        first = result.images[0]
        self.ledger.complete_row(
            job.row_key,
            record={**result.record, "worker": result.worker},
            image_path=str(paths[0]),
            image_sha256=first.sha256,
            images=[{"path": str(p), "sha256": i.sha256, "node_id": i.node_id} for p, i in zip(paths, result.images)],
            duration_s=duration,
            sampler_s=result.timings.get("sampler_s"),
        )
        return paths


@dataclass(frozen=True)
class _WorkflowTemplate:
    """Stands in for a template in batches made from a ready workflow: recorded name, hash, file names."""

    name: str
    content_hash: str
    filename_pattern: str


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    try:  # make the rename itself durable before the ledger says "done"
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def _checkpoint_of(workflow: dict[str, Any]) -> str | None:
    for node in workflow.values():
        if isinstance(node, dict) and node.get("class_type") in {"CheckpointLoaderSimple", "LoadCheckpoint"}:
            name = node.get("inputs", {}).get("ckpt_name")
            if isinstance(name, str):
                return name
    return None


def _describe(exc: EngineError) -> str:
    problems = getattr(exc, "problems", None)
    if problems:
        return "workflow: " + "; ".join(p.describe() for p in problems)
    return exc.message


def _row_problem(row: int, column: str | None, reason: str) -> Any:
    from engine.sheets import RowProblem

    return RowProblem(row=row, column=column, reason=reason)


# --------------------------------------------------------------------------------------- the queue


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

    def submit(self, batch_id: str) -> BatchProgress:
        self.start()
        with self._wake:
            progress = self._progress.get(batch_id)
            if progress is not None and progress.state in {"queued", "running"}:
                return progress
            progress = BatchProgress(batch_id)
            self._progress[batch_id] = progress
            self._order.append(batch_id)
            self._wake.notify_all()
            return progress

    def status(self, batch_id: str) -> BatchProgress | None:
        with self._lock:
            return self._progress.get(batch_id)

    def queued(self) -> list[str]:
        with self._lock:
            return list(self._order)

    def cancel(self, batch_id: str) -> None:
        with self._lock:
            if batch_id in self._order:
                self._order.remove(batch_id)
                self._progress[batch_id].state = "cancelled"
        self.runner.cancel(batch_id)

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
                    progress.state = (
                        "cancelled" if summary.cancelled else ("done" if summary.ok else "finished_with_errors")
                    )
                    progress.remaining = 0 if progress.state != "cancelled" else progress.remaining
            except Exception as exc:  # a batch-level failure must not kill the queue thread
                log.exception("batch %s failed", batch_id)
                with self._lock:
                    progress.state = "error"
                    progress.error = _describe(exc) if isinstance(exc, EngineError) else str(exc)
            finally:
                with self._lock:
                    progress.updated = time.time()

    def _on_event(self, event: BatchEvent) -> None:
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
            progress.updated = time.time()
        for listener in list(self.listeners):
            try:
                listener(event)
            except Exception:  # a broken listener (closed websocket) must not stop the batch
                log.exception("batch event listener failed")


__all__ = [
    "BatchEvent",
    "BatchProgress",
    "BatchQueue",
    "BatchRunner",
    "BatchSummary",
    "Dispatcher",
    "LocalDispatcher",
    "PendingRow",
    "PipelineStats",
    "PreparedBatch",
    "RowExecutor",
    "RowImage",
    "RowJob",
    "RowResult",
]
