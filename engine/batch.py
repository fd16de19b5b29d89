"""Rows -> jobs -> results: the production line.

A batch is a template, a spreadsheet and a batch seed. :class:`BatchRunner` validates and renders every
row before any GPU work, records the batch in the ledger, and runs the pending rows through a
:class:`Dispatcher` (in process, or on Celery workers). The coordinator is the single writer of the ledger
and of the output folder: an image is written to a temporary name, fsynced and renamed before its ledger
row is committed ``done``, so a crash at any point leaves no finished row without its file and no row with
two images. Resume is simply "run the rows that are not done".
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
import shutil
import socket
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from engine.errors import BatchBusy, BatchError, BatchMismatch, EngineError, SheetError, WorkflowInvalid
from engine.jobs import (
    CANCELLED,
    DONE,
    FAILED,
    MAX_ROW_ATTEMPTS,
    QUEUED,
    RUNNING,
    SKIPPED,
    TIMED_OUT,
    RowJob,
    RowResult,
    jsonable,
    plain_file_name,
)
from engine.logs import log_context
from engine.naming import fill_filename_pattern, pattern_values, row_digits, safe_filename
from engine.parked import ROWS_SUFFIX, ParkedBatch, park
from engine.rows import Dispatcher, LocalDispatcher, RowExecutor
from engine.sheets import Sheet, ValidationReport, derive_seed, title_above_header_hint, validate_rows
from engine.storage import (IMAGE_SIZE_SAMPLE, IMAGES_OF_ROOM, LEDGER_ROOM_BYTES, expected_image_bytes,
                            probe_folder, row_image_bytes)
from engine.workflow import Workflow

log = logging.getLogger(__name__)

STAGING_FOLDER = ".staging"  # under the uploads folder: photos unpacked and rows checked for a batch not yet started
STAGING_MAX_AGE_S = 24 * 3600
# Checked rows wait for Start longer than photos: a tab left open over a weekend still starts its batch.
# They are small (about 0.6 MB for 10,000 rows); a newer check in the same tab replaces them at once.
PARKED_MAX_AGE_S = 7 * 24 * 3600


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
    # Rows that end without a row event of their own, so whoever counts rows learns of them once:
    skipped: int = 0  # on the batch's first "batch_started": rows refused at validation
    cancelled: int = 0  # on "batch_cancelled" (taken off the queue before it ran): rows marked cancelled
    status: str | None = None  # on "row_failed": failed, timed_out or cancelled
    nodes: tuple[str, ...] = ()  # on "cached" (once per row, before its nodes run): the nodes the cache serves


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

    @property
    def sheet_name(self) -> str:
        return self.sheet.filename

    @property
    def columns(self) -> list[str]:
        return list(self.sheet.columns)

    def load_rows(self) -> list[dict[str, Any]]:
        """The rows to record: held here (an :class:`engine.parked.ParkedBatch` reads them from disk)."""
        return self.rows


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
    running: int = 0  # rows another live process has claimed and is still generating
    stopped: bool = False  # the process stopped the run (shutting down): its rows in flight went back to the queue

    @property
    def ok(self) -> bool:
        return self.failed == 0 and self.timed_out == 0 and self.cancelled == 0


@dataclass
class _Run:
    """A run of a batch in this process, as :meth:`BatchRunner.stop_runs` and :meth:`~BatchRunner.release_claims`
    see it: ``stopping`` ends it between sampler steps, ``given_back`` (its rows returned to the queue) means
    nothing it finishes later may be stored."""

    stopping: bool = False
    given_back: bool = False


def _mtime_or_zero(path: Path) -> float:
    """When ``path`` was last written; 0 when another process removed it meanwhile (it sorts first, gone)."""
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


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
        self._active: set[str] = set()  # batches running in this process right now
        self._runs: dict[str, _Run] = {}  # and how each run stands (stopping, given back)
        self._lock = threading.Lock()
        # Held while a finished row is stored (file, then ledger) and while claims are given back, so that
        # no row is written after this process gave it back: another process may be running it by then.
        self._store_lock = threading.Lock()

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
        """Make ``name`` the checkpoint templates use by default, loading it now (admins only, at the edge).
        A coordinator whose rows run on workers only changes the name: the workers load the model."""
        allowed = self.allowed_checkpoints()
        if name not in allowed:
            raise BatchError(f"checkpoint {name!r} is not allowed; allowed: {', '.join(allowed) or 'none'}",
                             code="model_not_allowed", name=name, allowed=list(allowed))
        if getattr(self.dispatcher, "runs_rows_elsewhere", False):
            self.engine.default_checkpoint = name
        else:
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
                self.ledger.ensure_same_inputs(batch_id, template.content_hash, fingerprint, template_name=template.name)
                resumed = True
                batch_seed = int(existing["batch_seed"])
                images = self._resumed_images(batch_id, images)
        report = validate_rows(sheet, template, images=images)
        if report.missing_columns and report.title_above_header is not None:
            title = report.title_above_header
            raise BatchError(
                f"the sheet lacks required column(s): {', '.join(report.missing_columns)}; "
                f"{title_above_header_hint(title)}",
                code="columns_below_title", missing_columns=report.missing_columns,
                columns=report.missing_columns, title=title.title, title_row=title.title_row,
                names_row=title.names_row,
            )
        if report.missing_columns:
            raise BatchError(
                f"the sheet lacks required column(s): {', '.join(report.missing_columns)}",
                code="required_columns_missing",
                missing_columns=report.missing_columns,
                columns=report.missing_columns,
            )
        input_dir = images.folder if images is not None else None
        if batch_seed is None:
            batch_seed = secrets.randbits(63)
        batch_id = batch_id or new_batch_id()
        defaults = {"checkpoint": self.default_checkpoint}
        validator = self.engine.validator(input_dir=input_dir)  # one look at the models folder for all rows
        rows: list[dict[str, Any]] = []
        for row_report in report.rows:
            values = dict(row_report.values or {})
            problems = [f"{p.column or 'row'}: {p.reason}" for p in row_report.problems]
            rendered: dict[str, Any] | None = None
            parsed: Workflow | None = None
            failure: EngineError | None = None
            if row_report.ok:
                for seed_field in (f.name for f in template.fields if f.type == "seed"):
                    if values.get(seed_field) in (None, ""):
                        values[seed_field] = derive_seed(batch_seed, row_report.number)
                try:
                    rendered = template.render(values, defaults=defaults)
                    parsed = validator.validate(rendered)
                except EngineError as exc:
                    problems.append(describe_error(exc))
                    rendered, parsed, failure = None, None, exc
            status = QUEUED if rendered is not None else SKIPPED
            if rendered is None and row_report.ok:
                row_report.ok = False
                column = _problem_column(failure, template, report.column_map)
                row_report.problems.append(_row_problem(row_report.number, column, problems[-1], failure))
            seeds = [values[f.name] for f in template.fields if f.type == "seed" and values.get(f.name) is not None]
            rows.append(
                {
                    "row_number": row_report.number,
                    "values": {**row_report.cells, **jsonable(values)},
                    "seed": seeds[0] if seeds else None,
                    "workflow": rendered,
                    "prompt": self._positive_prompt(parsed) if parsed is not None else None,
                    "status": status,
                    "error": "; ".join(problems) or None,
                    # why, as codes and values (kept with a skipped row, for a page in another language)
                    "problems": [asdict(p) for p in row_report.problems],
                }
            )
        if on_invalid == "stop" and any(row["status"] == SKIPPED for row in rows):
            bad = [row for row in rows if row["status"] == SKIPPED]
            listed = "; ".join(f"row {row['row_number']}: {row['error']}" for row in bad[:20])
            more = f"; and {len(bad) - 20} more row(s)" if len(bad) > 20 else ""
            raise BatchError(
                f"{len(bad)} row(s) have problems, so nothing was queued: {listed}{more}",
                rows=[row["row_number"] for row in bad], problems={row["row_number"]: row["error"] for row in bad},
            )
        return PreparedBatch(batch_id, template, sheet, report, batch_seed, fingerprint, rows, user, resumed, images)

    def unpack_photos(self, source: Any, limits: Any = None) -> Any:
        """The photos zip uploaded with a sheet (path, bytes or file object) as an ImageLibrary, unpacked
        into a staging folder under the uploads folder. :meth:`start` copies the photos into the batch's
        own folder and removes the staging; staging left by batches never started goes after a day."""
        from engine.image_refs import ImageLibrary

        folder = Path(tempfile.mkdtemp(prefix="photos-", dir=self._staging_folder()))
        try:
            return ImageLibrary.from_zip(source, folder / "images", limits)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise

    def _staging_folder(self) -> Path:
        """The uploads' staging folder, cleared of what batches never started left there: photos unpacked
        over a day ago, checked rows parked over a week ago."""
        root = Path(self.settings.uploads_path) / STAGING_FOLDER
        root.mkdir(parents=True, exist_ok=True)
        now = time.time()
        for old in root.iterdir():
            try:
                age = now - old.stat().st_mtime
                if old.is_dir() and age > STAGING_MAX_AGE_S:
                    shutil.rmtree(old, ignore_errors=True)
                elif old.is_file() and age > PARKED_MAX_AGE_S:
                    old.unlink()
            except FileNotFoundError:
                pass  # another process cleared it first
            except OSError as exc:
                # Housekeeping: a read-only or foreign file is left, and what the caller writes next says
                # whether the folder can take it (batch_check_unwritable), rather than a raw OSError here
                log.warning("cannot clear %s from the uploads' staging folder: %s", old, exc.strerror or exc)
        return root

    def park(self, prepared: PreparedBatch) -> ParkedBatch:
        """Set a checked batch aside until it is started: its rows go to the staging folder, and the small
        :class:`engine.parked.ParkedBatch` that :meth:`start` takes instead is what a page session keeps.
        Rows parked and never started are removed after a week (BatchError ``batch_check_expired`` at start),
        and only the newest ``page_sessions`` parked checks are kept: the page holds one per session, and a
        session Gradio dropped past that limit (a script opening session after session) cannot start its own."""
        folder = self._staging_folder()
        parked = sorted(folder.glob(f"*{ROWS_SUFFIX}"), key=_mtime_or_zero)
        for oldest in parked[:max(0, len(parked) - max(1, int(self.settings.page_sessions)) + 1)]:
            oldest.unlink(missing_ok=True)  # room for the one parked now
        return park(prepared, folder)

    def stage_photos(
        self, template_name: str, photos: dict[str, str | Path | None]
    ) -> tuple[Any, dict[str, str]]:
        """Loose photo files (the single-image form's uploads) as an ImageLibrary, staged where
        :meth:`unpack_photos` stages a batch's zip, so a one-row batch installs and reads them exactly as a
        batch does.

        ``photos`` maps an ``image`` field of the template to the uploaded file (None: nothing uploaded).
        Returns ``(library, names)``: ``names`` maps each field with an upload to its stored file name, the
        value the row's cell takes. The library is None when nothing was uploaded. Each photo keeps its own
        name (made safe, and unique when two fields upload files named alike); a name that is not a supported
        photo is refused with the supported extensions.
        """
        from engine.image_refs import IMAGE_EXTENSIONS, ImageLibrary
        from engine.naming import safe_filename

        image_fields = {spec.name for spec in self.templates.get(template_name).fields if spec.type == "image"}
        unknown = sorted(set(photos) - image_fields)
        if unknown:
            raise SheetError(
                f"template {template_name!r} has no image field {', '.join(map(repr, unknown))}; "
                f"its image fields: {', '.join(sorted(image_fields)) or 'none'}", column=unknown[0])
        uploads = {name: Path(path) for name, path in photos.items() if path}
        if not uploads:
            return None, {}
        for name, path in uploads.items():
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                raise SheetError(f"{name}: '{path.name}' is not a supported photo; supported: {', '.join(IMAGE_EXTENSIONS)}",
                                 column=name, image=path.name, code="upload_photo_unsupported", field=name,
                                 file=path.name, supported=list(IMAGE_EXTENSIONS))
            if not path.is_file():
                raise SheetError(f"{name}: the uploaded photo '{path.name}' is gone; upload it again", column=name,
                                 code="upload_photo_gone", field=name, file=path.name)
        root = Path(self.settings.uploads_path) / STAGING_FOLDER
        root.mkdir(parents=True, exist_ok=True)
        holder = Path(tempfile.mkdtemp(prefix="photos-", dir=root))  # the layout discard_staging removes
        folder = holder / "images"
        folder.mkdir()
        try:
            used: set[str] = set()
            names = {}
            for name, path in uploads.items():
                names[name] = safe_filename(path.stem, used, suffix=path.suffix.lower())
                shutil.copyfile(path, folder / names[name])
            return ImageLibrary.from_folder(folder), names
        except BaseException:
            shutil.rmtree(holder, ignore_errors=True)
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
                                    code="batch_photos_missing", batch_id=batch_id)
            return None
        stored = ImageLibrary.from_folder(folder)
        if images is not None and images.content_hash != stored.content_hash:
            raise BatchMismatch(
                f"batch {batch_id} was started with other photos ({stored.describe()}); resume it without "
                "photos (it keeps its own copy) or start a new batch", code="batch_photos_differ", batch_id=batch_id,
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
            if isinstance(value, str) and plain_file_name(value) and (folder / value).is_file():
                found.append(folder / value)
        return found

    def prepare_workflow(
        self,
        workflow: dict[str, Any] | str,
        *,
        user: str | None = None,
        batch_id: str | None = None,
        png_extra: dict[str, Any] | None = None,
        kind: str = "workflow",
        prompts: Mapping[int, str] | None = None,
        prompts_name: str | None = None,
        continue_same_inputs: bool = False,
    ) -> PreparedBatch:
        """A batch from a ready workflow (ComfyUI's /prompt, the single-image form, a re-run): one row, or
        with ``prompts`` (line number -> text, the source article's prompt file) one row per prompt, each
        the workflow with that positive prompt, numbered by its line.

        A ``batch_id`` already in the ledger resumes that batch when it was made from the same workflow and
        prompts (BatchMismatch otherwise); without one, ``continue_same_inputs`` continues
        the batch of the same workflow and prompts if there is one, finished or not (a command run again;
        BatchBusy when a live process runs it now).
        """
        workflow_hash, inputs_hash, rows = self._workflow_rows(workflow, prompts, kind, png_extra, prompts_name)
        if batch_id is None and continue_same_inputs:  # a command run again: its batch, finished or not
            batch_id = self._batch_of_same_inputs(workflow_hash, inputs_hash, template_name=f"({kind})")
        batch_id = batch_id or new_batch_id(kind[:1])
        resumed = self.ledger.get_batch(batch_id) is not None
        if resumed:
            self.ledger.ensure_same_inputs(batch_id, workflow_hash, inputs_hash, template_name=f"({kind})")
        sheet = Sheet(columns=["prompt"] if prompts is not None else [], rows=[], filename=prompts_name or kind)
        pattern = f"{_save_prefix(rows[0]['workflow']) or kind}_{{row}}"  # a prompt line's row is its line number
        template = _WorkflowTemplate(name=f"({kind})", content_hash=workflow_hash, filename_pattern=pattern)
        report = ValidationReport(rows=[], missing_columns=[], unknown_columns=[])
        return PreparedBatch(batch_id, template, sheet, report, 0, inputs_hash, rows, user, resumed)

    def find_unfinished_workflow(
        self, workflow: dict[str, Any] | str, prompts: Mapping[int, str] | None = None, kind: str = "workflow"
    ) -> str | None:
        """The id of an unfinished batch made from the same workflow and prompts (re-running resumes it)."""
        workflow_hash, inputs_hash, _ = self._workflow_rows(workflow, prompts, kind, None, None)
        return self._unfinished_workflow_batch(kind, workflow_hash, inputs_hash)

    def _unfinished_workflow_batch(self, kind: str, workflow_hash: str, inputs_hash: str) -> str | None:
        for batch in self.unfinished_batches():
            if (batch["template_name"] == f"({kind})" and batch["template_hash"] == workflow_hash
                    and batch["sheet_hash"] == inputs_hash):
                return batch["id"]
        return None

    def _workflow_rows(
        self, workflow: dict[str, Any] | str, prompts: Mapping[int, str] | None, kind: str,
        png_extra: dict[str, Any] | None, prompts_name: str | None,
    ) -> tuple[str, str, list[dict[str, Any]]]:
        """(hash of the workflow, hash of workflow + prompts, the ledger rows) of a workflow batch."""
        from engine.prompts import replace_positive_prompt

        parsed = self.engine.parse(workflow)
        self.engine.validate(parsed)
        api = parsed.to_api()
        workflow_hash = hashlib.sha256(json.dumps(api, sort_keys=True).encode()).hexdigest()
        if prompts is None and parsed.ui is not None and "workflow" not in (png_extra or {}):
            # Rows keep only the API graph, so the UI file a user ran (`run --workflow wf.json`) must travel
            # as a PNG chunk, as ComfyUI's editor sends it: the image then opens in ComfyUI with its layout.
            # Prompt-file rows change the text, and the saved UI graph would no longer match what ran.
            png_extra = {**(png_extra or {}), "workflow": parsed.ui}
        extra = {"png_extra": png_extra} if png_extra else {}
        if prompts is None:
            row = {"row_number": 1, "values": {"workflow_kind": kind, **extra}, "workflow": api, "status": QUEUED,
                   "error": None}
            return workflow_hash, workflow_hash, [row]
        if not prompts:
            raise BatchError(f"the prompt file {prompts_name or ''} holds no prompts (one per line)".replace("  ", " "))
        rows = [
            {"row_number": line, "values": {"workflow_kind": kind, "prompt": text, **extra},
             "workflow": replace_positive_prompt(parsed, text, self.engine.registry).to_api(),
             "prompt": text, "status": QUEUED, "error": None}
            for line, text in sorted(prompts.items())
        ]
        inputs_hash = hashlib.sha256(json.dumps([workflow_hash, sorted(prompts.items())]).encode()).hexdigest()
        return workflow_hash, inputs_hash, rows

    def _positive_prompt(self, api: Workflow | dict[str, Any]) -> str | None:
        """The positive prompt a rendered workflow encodes, recorded before the row runs: a row that fails
        still shows (and is found by) what it was asked to make."""
        from engine.prompts import TEXT_INPUTS, positive_text_node

        try:
            workflow = self.engine.parse(api)
            node = workflow.nodes[positive_text_node(workflow, self.engine.registry)]
        except EngineError:
            return None
        texts = (node.inputs.get(name) for name in TEXT_INPUTS[self.engine.registry.canonical(node.class_type)])
        return next((text for text in texts if isinstance(text, str)), None)

    def batch_to_continue(
        self, template_name: str, sheet: Sheet, batch_seed: int | None = None
    ) -> str | None:
        """The batch that running a command again continues: the newest one of the same template and sheet
        (and ``batch_seed``, when one is given), finished or not, so that a second run of a command, a cron
        job or a CI retry never makes every image again. Its unfinished rows run; a finished batch runs
        nothing (or, asked to retry them, its failed rows). None: no such batch, start a new one.

        BatchBusy when a live process is running that batch now: two copies of one command would otherwise
        make every image twice, in two batches.
        """
        template = self.templates.get(template_name)
        return self._batch_of_same_inputs(template.content_hash, sheet.content_hash, batch_seed=batch_seed)

    def unfinished_from_another_sheet(self, template_name: str, sheet: Sheet) -> list[str]:
        """Unfinished batches of the template started from a file of the same name whose content is not
        this sheet's: the sheet was edited between runs, so a run of it starts a new batch, not theirs."""
        template = self.templates.get(template_name)
        return [batch["id"] for batch in self.unfinished_batches()
                if batch["template_hash"] == template.content_hash and batch["sheet_name"] == sheet.filename
                and batch["sheet_hash"] != sheet.content_hash]

    def _batch_of_same_inputs(
        self, template_hash: str, inputs_hash: str, template_name: str | None = None, batch_seed: int | None = None
    ) -> str | None:
        for batch in self.ledger.batches_of_inputs(template_hash, inputs_hash):
            if ((template_name is not None and batch["template_name"] != template_name)
                    or (batch_seed is not None and int(batch["batch_seed"]) != batch_seed)):
                continue
            claimed = self._live_claims(batch["id"])
            if claimed:
                raise BatchBusy(
                    f"batch {batch['id']} of the same inputs is being run by another process "
                    f"({claimed[0].worker}); not starting a second copy. Wait for it, or stop it and run "
                    "this again to resume", code="batch_busy", batch_id=batch["id"], worker=claimed[0].worker,
                )
            return batch["id"]
        return None

    def held_elsewhere(self, batch_id: str) -> bool:
        """Whether a live process other than this one holds rows of the batch (it is running them)."""
        return bool(self._live_claims(batch_id))

    def _live_claims(self, batch_id: str) -> list[Any]:
        """The batch's rows that a live process other than this one holds."""
        return [row for row in self.ledger.rows(batch_id, RUNNING) if not self._claim_is_gone(row)]

    def unfinished_batches(self, limit: int = 200) -> list[dict[str, Any]]:
        """The newest ``limit`` batches with rows still to run (queued, running or cancelled), however many
        finished batches came after them; not those another live process is running (a CLI run of the same
        data folder): nothing to resume there."""
        found = []
        for batch in self.ledger.batches_with_rows_to_run():
            if len(found) == limit:
                break
            if not self.held_elsewhere(batch["id"]):
                found.append(batch)
        return found

    def start(self, prepared: PreparedBatch | ParkedBatch) -> str:
        """Record the batch and its rows (queued or skipped). Idempotent for a resumed batch.

        A parked batch's rows are read back from disk first (BatchError ``batch_check_expired`` when they
        are gone), and removed once recorded: the same check starts one batch."""
        template = prepared.template
        rows = prepared.load_rows()  # before anything is recorded: an expired check records nothing
        if not prepared.resumed:
            images = prepared.images
            gone = [] if images is None else images.missing()
            if gone:
                # Unpacked photos wait a day in the staging folder, a checked sheet's rows a week: a tab left
                # open between the two would otherwise record a batch whose photos cannot be copied
                raise BatchError(f"the photos checked with batch {prepared.batch_id} are no longer kept (unpacked "
                                 f"photos are kept a day; {len(gone)} gone, e.g. '{gone[0]}'); upload the photos and "
                                 "check the sheet again", code="batch_photos_expired", batch_id=prepared.batch_id,
                                 count=len(gone), example=gone[0])
            if images is not None:  # the batch's own copy, so resume and re-runs find the same photos
                images = images.install(self.images_dir(prepared.batch_id))
                self.discard_staging(prepared.images)
            self.ledger.create_batch(
                batch_id=prepared.batch_id,
                template_name=template.name,
                template_hash=template.content_hash,
                sheet_name=prepared.sheet_name,
                sheet_hash=prepared.sheet_hash,
                batch_seed=prepared.batch_seed,
                user=prepared.user,
                options={
                    "filename_pattern": template.filename_pattern,
                    # {row} in file names is padded to this many digits; a batch recorded without it (made
                    # before names were padded) keeps its unpadded names when it resumes
                    "row_digits": row_digits(int(row["row_number"]) for row in rows),
                    "columns": list(prepared.columns),
                    # One ready workflow keeps its SaveImage names (ComfyUI's /prompt); several rows of one
                    # (a prompt file) would number their files alike: they are named by row instead.
                    "keep_workflow_names": isinstance(template, _WorkflowTemplate) and len(rows) == 1,
                    "image_fields": [f.name for f in getattr(template, "fields", ()) if f.type == "image"],
                    **({"images": {"count": len(images), "content_hash": images.content_hash}} if images is not None else {}),
                },
            )
        # Always: rows already recorded are left as they are, and a start that died between the two writes
        # gets its rows on resume. Each row records the size of its image, for the storage probe.
        self.ledger.add_rows(prepared.batch_id, [
            {**row, "image_bytes": row_image_bytes(row.get("workflow"), row.get("values"))} for row in rows
        ])
        if isinstance(prepared, ParkedBatch):
            prepared.discard()
        return prepared.batch_id

    # -------------------------------------------------------------------- run

    def cancel(self, batch_id: str) -> None:
        with self._lock:
            self._cancelled.add(batch_id)

    def forget_cancel(self, batch_id: str) -> None:
        with self._lock:
            self._cancelled.discard(batch_id)

    def is_cancelled(self, batch_id: str) -> bool:
        with self._lock:
            return batch_id in self._cancelled

    def output_dir(self, batch_id: str) -> Path:
        return Path(self.settings.outputs_path) / batch_id

    def temp_dir(self, batch_id: str) -> Path:
        """Where a batch's preview images (PreviewImage, ComfyUI's type "temp") go: apart from its outputs."""
        return Path(self.settings.data_path) / "temp" / batch_id

    @property
    def worker_id(self) -> str:
        """Who claims rows in the ledger: this host and process (so a dead claimant can be told apart)."""
        return f"{socket.gethostname()}:{os.getpid()}"

    def _requeue_abandoned(self, batch_id: str) -> None:
        """Rows left ``running`` by a process that is gone (killed, crashed) go back to ``queued``; a row
        whose process died while running it ``MAX_ROW_ATTEMPTS`` times is failed instead. Rows this very
        process claimed (an earlier run of it stopped on an error it could not record) died with nothing:
        they go back without a crash."""
        gone = [row for row in self.ledger.rows(batch_id, RUNNING) if self._claim_is_gone(row)]
        for claimant in {row.worker for row in gone}:
            ours = claimant == self.worker_id and all(
                self._claimed_by_this_process(row) for row in gone if row.worker == claimant)
            self.ledger.reset_stale_running(batch_id, worker=claimant, crashed=not ours,
                                            max_attempts=None if ours else MAX_ROW_ATTEMPTS)

    def _claimed_by_this_process(self, row: Any) -> bool:
        """Whether ``row`` was claimed under this process's name after it started (not by an earlier process
        that had the same pid: pid 1 in a restarted container)."""
        claimed_at, started = _parse_time(row.started_at), _process_start_time(os.getpid())
        return claimed_at is not None and started is not None and claimed_at >= started

    def _claim_is_gone(self, row: Any) -> bool:
        """Whether no live process holds the claim on ``row``.

        This process's own claim is gone: callers ask about batches not running here, or (run) before this
        run claimed anything, and there is one run of a batch at a time; so it was an earlier run's that
        stopped, or a process before a restart that got the same pid (pid 1 in a container). A claimant on
        this host is gone when its process is, or when the process with its pid started after the claim
        (the pid was reused). A claimant on another host is trusted until its claim is older than a row
        could possibly take.
        """
        claimant = row.worker or ""
        if claimant == self.worker_id:
            return True  # callers never ask about a batch running here
        stale_after = timedelta(seconds=2 * float(self.settings.row_timeout_s) + 600)
        return claimant_gone(claimant, row.started_at, stale_after)

    def run(
        self,
        batch_id: str,
        on_event: Callable[[BatchEvent], None] | None = None,
        should_cancel: Callable[[], bool] | None = None,
        retry_failed: bool = False,
    ) -> BatchSummary:
        """Run every row of the batch that is not done. Safe to call again after a crash: that is resume."""
        with self._lock:
            if batch_id in self._active:
                raise BatchError(f"batch {batch_id} is already running in this process", batch_id=batch_id,
                                 code="batch_running_here")
            self._active.add(batch_id)
            handle = self._runs[batch_id] = _Run()
        try:
            return self._run(batch_id, on_event, should_cancel, retry_failed, handle)
        except BaseException:
            self._give_back_claims(batch_id, handle)
            raise
        finally:
            self.forget_cancel(batch_id)  # a cancel stops the run it arrived before or during, never the next
            with self._lock:
                self._active.discard(batch_id)
                self._runs.pop(batch_id, None)

    def _run(
        self,
        batch_id: str,
        on_event: Callable[[BatchEvent], None] | None,
        should_cancel: Callable[[], bool] | None,
        retry_failed: bool,
        handle: _Run,
    ) -> BatchSummary:
        batch = self.ledger.get_batch(batch_id)
        if batch is None:
            raise BatchError(f"no batch {batch_id!r} in the ledger", batch_id=batch_id, code="batch_not_found")
        started = time.perf_counter()
        out_dir = self.output_dir(batch_id)
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # before any row is claimed: the batch stays resumable as it is
            raise BatchError(f"batch {batch_id}: cannot create the output folder {out_dir}: "
                             f"{exc.strerror or exc}", batch_id=batch_id, path=str(out_dir),
                             code="batch_output_unwritable") from exc
        # Before any row is claimed or sampled: a full or unwritable disk would only fail the rows' writes.
        problem = self.storage_problem(batch_id)
        if problem is not None:
            raise problem
        self._requeue_abandoned(batch_id)
        _remove_abandoned_temp_files(out_dir)
        all_rows = self.ledger.rows(batch_id)
        names = self._file_names(batch, all_rows)
        requeue = [CANCELLED] + ([FAILED, TIMED_OUT] if retry_failed else [])
        self.ledger.requeue(batch_id, requeue)  # done and skipped rows, all that all_rows is counted for, stay
        # Claim before running: a row another live process has claimed (the web app and a CLI resume of the
        # same batch, say) is left to it, so no row is ever generated twice.
        claimed_rows = self.ledger.claim_queued_rows(batch_id, worker=self.worker_id)
        jobs = [self._job(batch, row) for row in claimed_rows]
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

        def cancelled_by_user() -> bool:
            return self.is_cancelled(batch_id) or (should_cancel is not None and should_cancel())

        def cancelled() -> bool:  # what stops the sampler between steps: a cancel, or this process stopping
            return handle.stopping or cancelled_by_user()

        began: set[str] = set()
        # Rows on Celery workers: this process dying is no crash of theirs (a worker's death is counted by
        # the dispatcher, and a restarted coordinator follows the attempt still running).
        local_rows = not getattr(self.dispatcher, "runs_rows_elsewhere", False)

        def on_progress(row_key: str, event: Any) -> None:
            job = by_key.get(row_key)
            if job is None:
                return
            if local_rows and row_key not in began and not handle.given_back:
                began.add(row_key)  # its first node runs: a crash of this process is now its crash
                self.ledger.mark_began(row_key)
            if event.kind == "step":
                emit("step", row_number=job.row_number, node_id=event.node_id, step=event.value, steps=event.maximum)
            elif event.kind == "node":
                emit("node", row_number=job.row_number, node_id=event.node_id)
            elif event.kind == "cached":
                emit("cached", row_number=job.row_number, nodes=tuple(event.nodes))

        # Rows the user's cancel stopped before they began come back together, thousands at once: stored in
        # one ledger write (each alone cost a commit and a recount of the batch: 10 s for 8,000 rows).
        unstarted_cancels: list[tuple[RowJob, RowResult]] = []

        def store_unstarted_cancels() -> None:
            nonlocal remaining
            with self._store_lock:
                stored = set() if handle.given_back else self.ledger.cancel_rows(
                    {job.row_key: result.error or CANCELLED for job, result in unstarted_cancels})
            for job, result in unstarted_cancels:
                if job.row_key in stored:
                    remaining -= 1
                    emit("row_failed", row_number=job.row_number, error=result.error, status=CANCELLED)
                    if self.on_result is not None:
                        self.on_result(result)
            if stored:
                log.info("%d row(s) cancelled before they began", len(stored))
            unstarted_cancels.clear()

        first_run = not batch.get("started_at")  # a resume must not report the skipped rows again
        self.ledger.set_batch_status(batch_id, "running")
        emit("batch_started", skipped=sum(1 for r in all_rows if r.status == SKIPPED) if first_run else 0)
        last_finish = time.perf_counter()
        with log_context(batch_id=batch_id, user=batch.get("user")), \
                contextlib.closing(self.dispatcher.run(jobs, on_progress, cancelled)) as results:
            log.info("batch started: %d row(s) to run", len(jobs))
            for result in results:
                job = by_key.get(result.row_key)
                if job is None:
                    continue  # a late or repeated result for a row we no longer wait for
                with log_context(row=job.row_number):
                    now = time.perf_counter()
                    durations.append(now - last_finish)
                    last_finish = now
                    if result.status == CANCELLED and handle.stopping and not cancelled_by_user():
                        continue  # stopped, not cancelled: the row stays claimed until it is given back below
                    if result.status == CANCELLED and not result.failure and job.row_key not in began:
                        unstarted_cancels.append((job, result))
                        continue
                    if unstarted_cancels:
                        store_unstarted_cancels()
                    with self._store_lock:
                        if handle.given_back:  # another process may be running the row by now
                            log.warning("row not stored: this process gave its rows back while it ran")
                            continue
                        try:
                            stored = self._store_result(job, result, names, out_dir)
                        except OSError as exc:
                            raise self._stopped_by_storage(batch_id, job, exc) from exc
                    if stored is None:
                        continue  # the ledger already had it done: a duplicate delivery
                    remaining -= 1
                    # A failed row is worth an alert; a finished or cancelled one is routine.
                    level = logging.WARNING if result.status in (FAILED, TIMED_OUT) else logging.INFO
                    log.log(level, "row %s", result.status, extra={"error": result.error} if result.error else None)
                    if result.status == DONE:
                        counts[DONE] += 1
                        emit("row_done", row_number=job.row_number, image_path=str(stored[0]) if stored else None)
                    else:
                        counts[FAILED] += result.status in {FAILED, TIMED_OUT}
                        emit("row_failed", row_number=job.row_number, error=result.error, status=result.status)
                    if self.on_result is not None:
                        self.on_result(result)
            if unstarted_cancels:
                store_unstarted_cancels()
            if handle.stopping and remaining and not cancelled_by_user():
                given_back = self._give_back_claims(batch_id, handle)
                log.warning("batch %s stopped between sampler steps: this process is shutting down; the %d "
                            "unfinished row(s) it had claimed went back to the queue (%d done in this run)",
                            batch_id, given_back, counts[DONE])
                summary = self.summary(batch_id, time.perf_counter() - started)
                summary.stopped = True
                return summary  # not cancelled, not finished: whoever starts next resumes it
            log.info("batch ended: %d done, %d failed", counts[DONE], counts[FAILED])
        summary = self.summary(batch_id, time.perf_counter() - started)
        if summary.running == 0:  # else another live process still works on rows: the batch is not over
            self.ledger.set_batch_status(batch_id, "cancelled" if summary.cancelled or cancelled_by_user() else "finished")
        self.ledger.checkpoint()  # the ledger file alone now holds the run: a copy of it is a backup
        emit("batch_done")
        return summary

    def _give_back_claims(self, batch_id: str, handle: _Run) -> int:
        """A run stopped by an error (a full disk, an unwritable folder or ledger, a second Ctrl-C) or by this
        process stopping: the rows it had claimed go back to ``queued``, none counted as a crash, so a resume
        runs them; returns how many. When the ledger itself refuses the write, they stay claimed, and a
        resume by this process still blames none."""
        with self._store_lock:
            if handle.given_back:  # release_claims() gave them back already
                return 0
            handle.given_back = True
            try:
                return self.ledger.reset_stale_running(batch_id, worker=self.worker_id, crashed=False)
            except EngineError as exc:
                log.warning("the rows batch %s had claimed stay claimed until it resumes: %s", batch_id, exc.message)
                return 0

    def _stopped_by_storage(self, batch_id: str, job: RowJob, exc: OSError) -> BatchError:
        """A full disk or an unwritable folder stops the batch: no later row could be stored either. The
        rows this run claimed go back to ``queued`` (see :meth:`run`: none of them is the row's fault), so
        a resume after the space is freed runs them; finished rows and files are untouched."""
        where = f" {exc.filename}" if exc.filename else ""
        return BatchError(
            f"batch {batch_id} stopped at row {job.row_number}: cannot write{where}: {exc.strerror or exc}. "
            f"Finished rows are kept; free space (or fix the folder) and resume the batch",
            batch_id=batch_id, row=job.row_number, path=exc.filename or "", code="batch_stopped_by_storage",
        )

    def cancel_waiting(self, batch_id: str) -> int:
        """Cancel a batch that is not running in this process: its queued rows, and those a dead process
        left claimed, become ``cancelled`` (rows a live process runs are left to it). Returns how many."""
        self._requeue_abandoned(batch_id)
        return self.ledger.cancel_batch(batch_id)

    def stop_runs(self) -> list[str]:
        """This process is shutting down: every run of it stops between sampler steps, as a cancel does, but
        its batches are not cancelled; the rows in flight go back to the queue for whoever starts next. Rows
        already finished are still stored. Returns the batches that were running."""
        with self._lock:
            for handle in self._runs.values():
                handle.stopping = True
            return sorted(self._runs)

    def release_claims(self) -> int:
        """Give back every row this process has claimed (shutting down): they are queued again, and none
        counts a crash. Returns how many. A run still going afterwards (one :meth:`stop_runs` could not stop
        in time) stores nothing more: another process may claim those rows from now on."""
        with self._store_lock:
            with self._lock:
                for handle in self._runs.values():
                    handle.given_back = True
            return self.ledger.reset_stale_running(worker=self.worker_id, crashed=False)

    def storage_problem(self, batch_id: str) -> BatchError | None:
        """What keeps batch ``batch_id`` from storing its next images now, found without claiming or sampling
        anything (:mod:`engine.storage`): too little free space for a few of its images in its output folder
        (or for the ledger's log beside the ledger), or a folder that refuses a test write. None when both
        look fine."""
        out_dir = self.output_dir(batch_id)
        image_bytes = self._next_image_bytes(batch_id)
        ledger_folder = Path(os.path.abspath(self.ledger.path)).parent
        for folder, needed in ((out_dir, IMAGES_OF_ROOM * image_bytes), (ledger_folder, LEDGER_ROOM_BYTES)):
            problem = probe_folder(folder, needed)
            if problem is None:
                continue
            what = "its images" if folder == out_dir else "the ledger"
            if problem.short_of_space:
                return BatchError(
                    f"batch {batch_id} cannot run for want of disk space: {problem.describe()} for {what}. Nothing "
                    "was claimed and finished rows are kept; free space there and resume the batch (the web app "
                    "does so by itself)",
                    batch_id=batch_id, path=problem.folder, free_bytes=problem.free_bytes,
                    needed_bytes=problem.needed_bytes, code="batch_waiting_for_storage",
                )
            return BatchError(
                f"batch {batch_id} cannot run: {problem.describe()}, the folder of {what}. Nothing was claimed and "
                "finished rows are kept; give this user write access there (on a disk not mounted read-only) and "
                "resume the batch (the web app does so by itself)", batch_id=batch_id, path=problem.folder,
                code="batch_storage_unwritable",
            )
        return None

    def _next_image_bytes(self, batch_id: str) -> int:
        """:func:`engine.storage.expected_image_bytes` of the batch, from its latest finished images and the
        image sizes its rows recorded."""
        _, latest = self.ledger.latest_images(batch_id, IMAGE_SIZE_SAMPLE)
        return expected_image_bytes(latest, self._pending_image_sizes(batch_id))

    def _pending_image_sizes(self, batch_id: str) -> Iterator[int]:
        """What the batch's rows not done will write: the largest size they recorded, read in one query;
        where an older release recorded them without it, worked out from each row's workflow."""
        recorded = self.ledger.pending_image_bytes(batch_id)
        if recorded is not None:
            yield recorded
        else:
            yield from (row_image_bytes(row.workflow, row.row_values) for row in self.ledger.pending_rows(batch_id))

    def abandoned_batches(self) -> list[str]:
        """Batches a process left unfinished when it died (still ``created`` or ``running`` in the ledger,
        with rows to run; not those a user cancelled), and that no live process works on now: what the web
        app resumes when it starts and whenever such a process goes away. Oldest first."""
        with self._lock:
            active = set(self._active)
        return [batch_id for batch_id in self.ledger.abandoned_batch_ids()
                if batch_id not in active and not self.held_elsewhere(batch_id)]

    def summary(self, batch_id: str, seconds: float = 0.0) -> BatchSummary:
        counts = self.ledger.row_counts(batch_id)  # counted by SQLite: a poll never loads the rows
        return BatchSummary(
            batch_id,
            counts[DONE],
            counts[FAILED],
            counts[TIMED_OUT],
            counts[SKIPPED],
            counts[CANCELLED] + counts[QUEUED],
            sum(counts.values()),
            self.output_dir(batch_id),
            seconds,
            counts[RUNNING],
        )

    def rows_to_run(self, batch_id: str, retry_failed: bool = False) -> int:
        """Rows a resume of ``batch_id`` still runs: waiting, cancelled, or claimed and not finished (and,
        with ``retry_failed``, failed and timed out). Done and skipped rows are never run again."""
        statuses = {QUEUED, CANCELLED, RUNNING} | ({FAILED, TIMED_OUT} if retry_failed else set())
        counts = self.ledger.row_counts(batch_id)
        return sum(counts[status] for status in statuses)

    # ------------------------------------------------------------------- zips

    def write_zip(self, batch_id: str, out: Path | Any) -> Any:
        """The batch's zip (its images + manifests) to a path or file object."""
        from engine.archive import write_batch_zip

        if self.ledger.get_batch(batch_id) is None:
            raise BatchError(f"no batch {batch_id!r} in the ledger", batch_id=batch_id, code="batch_not_found")
        return write_batch_zip(self.ledger, batch_id, out)

    def zip_stream(self, batch_id: str) -> Iterator[bytes]:
        """The batch's zip as byte chunks, for streaming over HTTP without holding it in memory."""
        from engine.archive import iter_zip_stream

        if self.ledger.get_batch(batch_id) is None:
            raise BatchError(f"no batch {batch_id!r} in the ledger", batch_id=batch_id, code="batch_not_found")
        return iter_zip_stream(self.ledger, batch_id)

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
            attempt=int(row.attempts or 0) + 1,  # the attempt about to begin
            input_dir=str(photos) if (photos := self.images_dir(batch["id"])).is_dir() else None,
        )

    def _file_names(self, batch: dict[str, Any], rows: list[Any]) -> FileNames | None:
        """Safe, unique names for every image of every row, the same on every (re)run of the batch.

        Each row reserves one name per image-saving node of its workflow (``stem``, ``stem_2``, ...), so a
        row's second output can never take the name of another row's first. None for ready workflows
        (ComfyUI's /prompt), whose files keep their filename_prefix names.
        """
        options = batch.get("options") or {}
        if options.get("keep_workflow_names"):
            return None
        pattern = options.get("filename_pattern") or "row_{row}"
        digits = int(options.get("row_digits") or 0)
        names = FileNames()
        for row in sorted(rows, key=lambda r: int(r.row_number)):
            values = pattern_values(row.row_values, int(row.row_number), batch["id"], row.seed, digits)
            stem = Path(safe_filename(fill_filename_pattern(pattern, values) or f"row_{values['row']}", set())).stem
            outputs = max(1, _saving_nodes(row.workflow or {}))
            names.rows[int(row.row_number)] = [
                names.claim(stem if index == 0 else f"{stem}_{index + 1}") for index in range(outputs)
            ]
        return names

    def _store_result(
        self, job: RowJob, result: RowResult, names: FileNames | None, out_dir: Path
    ) -> list[Path] | None:
        """Files first (atomic), ledger second. Returns None when the row was already done."""
        current = self.ledger.get_generation(job.row_key)
        if current is None or current.status == DONE:
            return None
        duration = result.timings.get("row_s")
        # A Celery worker's name replaces the coordinator's claim; a local row keeps its host:pid claimant.
        worker = None if result.worker in ("local", "?", "") else result.worker
        if result.status != DONE:
            self.ledger.fail_row(job.row_key, result.status, result.error or result.status, duration_s=duration,
                                 worker=worker, failure=result.failure or None)
            return []
        paths: list[Path] = []
        saved = 0  # output images so far: a row's file names are reserved per output
        for image in result.images:
            if image.type == "temp":  # a preview keeps its own name, in the batch's temp folder
                final = self.temp_dir(job.batch_id) / image.subfolder / Path(image.filename).name
            elif names is None:  # a ready workflow (ComfyUI /prompt): its filename_prefix folder and name
                final = out_dir / image.subfolder / Path(image.filename).name
            else:
                final = out_dir / names.for_image(job.row_number, saved)
            saved += image.type != "temp"
            final.parent.mkdir(parents=True, exist_ok=True)
            _atomic_write(final, image.data)
            paths.append(final)
        # The row's image is its first output; a row that only previews has its first preview.
        primary = next((i for i, image in enumerate(result.images) if image.type != "temp"), 0)
        self.ledger.complete_row(
            job.row_key,
            record=result.record,
            worker=worker,
            image_path=str(paths[primary]),
            image_sha256=result.images[primary].sha256,
            images=[{"path": str(p), "sha256": i.sha256, "node_id": i.node_id, "type": i.type}
                    for p, i in zip(paths, result.images)],
            duration_s=duration,
            sampler_s=result.timings.get("sampler_s"),
        )
        return [paths[primary], *(p for i, p in enumerate(paths) if i != primary)]


@dataclass
class FileNames:
    """The output file names of a batch: per row, one reserved name per image, unique regardless of case."""

    rows: dict[int, list[str]] = field(default_factory=dict)
    used: set[str] = field(default_factory=set)

    def claim(self, stem: str) -> str:
        return safe_filename(stem, self.used)

    def for_image(self, row_number: int, index: int) -> str:
        reserved = self.rows.setdefault(row_number, [])
        while len(reserved) <= index:  # more images than nodes (a latent batch): take the next free name
            base = Path(reserved[0]).stem if reserved else f"row_{row_number}"
            reserved.append(self.claim(f"{base}_{len(reserved) + 1}"))
        return reserved[index]


def _save_prefix(workflow: dict[str, Any]) -> str | None:
    """The last part of the first SaveImage's literal filename_prefix ("ComfyUI", "shop/shoe" -> "shoe")."""
    for node in workflow.values():
        if isinstance(node, dict) and node.get("class_type") == "SaveImage":
            prefix = (node.get("inputs") or {}).get("filename_prefix")
            if isinstance(prefix, str) and prefix.strip():
                return prefix.replace("\\", "/").rstrip("/").split("/")[-1] or None
    return None


def _saving_nodes(workflow: dict[str, Any]) -> int:
    return sum(1 for node in workflow.values() if isinstance(node, dict) and node.get("class_type") == "SaveImage")


@dataclass(frozen=True)
class _WorkflowTemplate:
    """Stands in for a template in batches made from a ready workflow: recorded name, hash, file names."""

    name: str
    content_hash: str
    filename_pattern: str


def new_batch_id(prefix: str = "b") -> str:
    """A fresh batch id: ``prefix``, the time in UTC and six random hex digits (``b20250131-140000-1a2b3c``).

    UTC, like every time in the ledger and the manifests: an id made on a machine set to Shanghai time
    would otherwise name an hour eight hours off its batch's recorded start."""
    return f"{prefix}{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(3)}"


def process_alive(pid: int, since: datetime | None = None) -> bool:
    """Whether process ``pid`` runs (a zombie does not). With ``since``: and started no later than that,
    so a pid the system gave to a new process after a reboot is not taken for the old one (Linux)."""
    if since is not None and (started := _process_start_time(pid)) is not None and started > since:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    # A killed process stays a zombie until its parent reaps it (in a container without an init, maybe
    # never): it still answers signal 0, but it runs nothing and holds no row.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):  # no /proc (not Linux): signal 0 is all there is
        return True
    return state not in ("Z", "X")


def claimant_gone(claimant: str, claimed_at: str | None, stale_after: timedelta) -> bool:
    """Whether the process ``claimant`` (``host:pid``) no longer holds what it claimed at ``claimed_at`` (an
    ISO time): on this host, when its process has ended or its pid went to a process started after the
    claim; on another host, once the claim is older than ``stale_after`` (or has no time)."""
    host, _, pid = claimant.rpartition(":")
    since = _parse_time(claimed_at)
    if host == socket.gethostname() and pid.isdigit():
        return not process_alive(int(pid), since=since)
    return since is None or datetime.now(timezone.utc) - since > stale_after


def _process_start_time(pid: int) -> datetime | None:
    """When process ``pid`` started, from /proc (None where there is no /proc, or no such process). Rounded
    down to the clock tick, with a second of slack for the boot time's own rounding."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        ticks = int(fields[19])  # starttime: clock ticks after boot (field 22; fields here start at field 3)
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
    except (OSError, IndexError, ValueError, StopIteration):
        return None
    return datetime.fromtimestamp(boot + ticks / os.sysconf("SC_CLK_TCK") - 1.0, timezone.utc)


def _parse_time(text: str | None) -> datetime | None:
    try:
        return datetime.fromisoformat(text) if text else None
    except ValueError:
        return None


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # named after its writer: see below
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):  # a read-only folder refuses this too: the first error is the one
            tmp.unlink(missing_ok=True)  # a full disk keeps no half-written copy
        if exc.filename is None or exc.filename == str(tmp):
            exc.filename = str(path)  # the caller reports the file the row was writing, not the temp name
        raise
    try:  # make the rename itself durable before the ledger says "done"
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def _remove_abandoned_temp_files(folder: Path) -> None:
    """Delete the temp files of :func:`_atomic_write` calls whose process died mid-write (``kill -9``): their
    rows are not done and will be written again. A live writer's temp file is left alone."""
    for tmp in folder.rglob(".*.tmp"):
        pid = tmp.name.rsplit(".", 2)[-2]
        if pid.isdigit() and not process_alive(int(pid)):
            tmp.unlink(missing_ok=True)


def _checkpoint_of(workflow: dict[str, Any]) -> str | None:
    for node in workflow.values():
        if isinstance(node, dict) and node.get("class_type") in {"CheckpointLoaderSimple", "LoadCheckpoint"}:
            name = node.get("inputs", {}).get("ckpt_name")
            if isinstance(name, str):
                return name
    return None


def describe_error(exc: EngineError) -> str:
    problems = getattr(exc, "problems", None)
    if problems:
        return "workflow: " + "; ".join(p.describe() for p in problems)
    return exc.message


# Node inputs that templates usually fill from a field of another name
_INPUT_FIELDS = {"ckpt_name": "checkpoint", "unet_name": "checkpoint", "lora_name": "lora",
                 "control_net_name": "controlnet", "image": "product_photo", "noise_seed": "seed"}


def _problem_column(exc: EngineError, template: Any, column_map: dict[str, str]) -> str | None:
    """The sheet column a workflow problem comes from, where a field feeds the input it names: the
    field of the input's own name (width, steps, seed) or its usual one (lora_name <- lora)."""
    fields = {f.name.casefold(): f.name for f in getattr(template, "fields", ())}
    for problem in getattr(exc, "problems", None) or ():
        name = (problem.input_name or "").casefold()
        field_name = fields.get(name) or fields.get(_INPUT_FIELDS.get(name, ""))
        if field_name is not None:
            return column_map.get(field_name, field_name)
    return None


def _row_problem(row: int, column: str | None, reason: str, failure: EngineError | None) -> Any:
    """The report's problem for a row whose rendered workflow failed: a failed graph check carries its node
    problems (code ``workflow_invalid``), so a client or page can name node and input in its own words; a
    library error with a code (a template that cannot render the row) carries that code and its values."""
    from engine.sheets import RowProblem

    if isinstance(failure, WorkflowInvalid):
        return RowProblem(row=row, column=column, reason=reason, code="workflow_invalid",
                          params={"problems": [asdict(p) for p in failure.problems]})
    if failure is not None and failure.code is not None:  # a template that cannot render the row, say
        return RowProblem(row=row, column=column, reason=reason, code=failure.code, params=jsonable(failure.details))
    return RowProblem(row=row, column=column, reason=reason)



__all__ = [
    "BatchEvent", "BatchRunner", "BatchSummary", "PreparedBatch", "claimant_gone", "describe_error", "new_batch_id",
    "process_alive",
]
