"""What the web app does, as plain functions over the library: no Gradio here.

Each handler takes the assembled :class:`engine.services.Services` (and, where it matters, the
:class:`Caller`), calls the library, and returns plain data the UI lays out. Library errors
(:class:`engine.errors.EngineError`) propagate; ``webapp/ui.py`` turns them into ``gr.Error`` in one
place, using :func:`error_message` for the words.

GPU work never runs in a browser request: batches, single images and re-runs are all submitted to the
:class:`engine.batch_queue.BatchQueue`, which runs one batch at a time on its own thread. A single image is a
one-row batch, so it is recorded in the ledger like every other image.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import Any

from engine.errors import AccessDenied, BatchError, EngineError, SheetError
from webapp.auth import ADMIN
from webapp.guard import LOCAL_USER, Caller
from webapp.i18n import (
    TABLES,
    coded_text,
    error_text,
    model_kind_text,
    problem_reason,
    problem_text,
    row_error_text,
    text,
)

ACTIVE_STATES = ("queued", "running", "waiting_for_storage")  # not over: the page keeps following it
LEDGER_STATUSES = ("queued", "running", "done", "failed", "timed_out", "skipped", "cancelled")


# --------------------------------------------------------------------------------------------- caller


def caller_for(users: Any, username: str | None, lang: str = "en", anonymous_role: str = ADMIN) -> Caller:
    """The caller behind a browser request: the signed-in user with their role.

    Without users a workstation listens on localhost only (see ``webapp.server.listen_address``), so the
    one local person owns it and acts as the local admin, as on the JSON API; a public app without users
    (a Space) passes ``anonymous_role`` "user".
    """
    if users is None or not users.configured:
        return Caller(LOCAL_USER, anonymous_role)
    user = users.get(username) if username else None
    if user is None:
        raise AccessDenied(text("error.login_required", lang), status=401, reason="not_authenticated")
    return Caller(user.name, user.role)


def require_admin(caller: Caller, action: str, lang: str = "en") -> None:
    """Refuse (AccessDenied 403) a non-admin ``caller``, saying in ``lang`` what was refused.

    ``action`` is one of :data:`webapp.auth.ADMIN_ACTIONS` (it names the ``action.*`` i18n key).
    """
    if not caller.is_admin:
        raise AccessDenied(
            text("error.admin_only", lang, action=text(f"action.{action}", lang)),
            status=403,
            reason="forbidden",
            action=action,
            user=caller.name,
        )


def error_message(exc: EngineError, lang: str = "en") -> str:
    """One readable sentence (or a few lines) for a library error, as shown to the user in ``lang``.

    Errors with a code are said in the page's language; the rest in the engine's words. A list of
    validation problems is laid out one per line, for a page rather than a log line.
    """
    return error_text(exc, lang)


# ------------------------------------------------------------------------------------------ templates


def one_row_sheet(values: dict[str, Any], row_number: int, filename: str) -> Any:
    """A one-row sheet of text cells from form or recorded values, read exactly as an uploaded CSV is."""
    from engine.sheets import Sheet, SheetRow, cell_text

    cells = {name: cell_text(value) for name, value in values.items()}
    return Sheet(columns=list(cells), rows=[SheetRow(number=row_number, cells=cells)], filename=filename)


@dataclass
class TemplateOverview:
    name: str
    title: str
    description: str
    example_image: str | None
    fields_header: list[str]
    fields_rows: list[list[str]]
    compact_header: list[str]  # three columns for narrow places: name (* required), type, description
    compact_rows: list[list[str]]
    image_fields: list[str] = field(default_factory=list)  # columns naming product photos (a zip upload)


def template_names(services: Any) -> list[str]:
    return list(services.templates.names())


def _field_kind(spec: Any, lang: str = "en") -> str:
    """``int (256 – 2048)``, ``choice: a, b``: the type (in ``lang``) with its limits, so the table stays narrow."""
    key = f"fieldtype.{spec.type}"
    kind = text(key, lang) if key in TABLES["en"] else spec.type
    if spec.choices:
        return f"{kind}: {', '.join(map(str, spec.choices))}"
    if spec.min is not None or spec.max is not None:
        low = "" if spec.min is None else spec.min
        high = "" if spec.max is None else spec.max
        return f"{kind} ({low} – {high})"
    return kind


def template_overview(services: Any, name: str, lang: str = "en") -> TemplateOverview:
    """Title, description, example image and the field table of template ``name``."""
    template = services.templates.get(name)
    header = [text(k, lang) for k in ("field.name", "field.type", "field.required", "field.default",
                                      "field.description")]
    rows = [
        [
            spec.name,
            _field_kind(spec, lang),
            text("yes" if spec.required else "no", lang),
            "" if spec.default is None else str(spec.default),
            template.field_description_in(spec, lang),
        ]
        for spec in template.fields
    ]
    compact = [
        [
            spec.name + (" *" if spec.required else ""),
            _field_kind(spec, lang),
            " ".join(part for part in (
                template.field_description_in(spec, lang),
                "" if spec.default in (None, "") else text("field.default_value", lang, value=spec.default),
            ) if part),
        ]
        for spec in template.fields
    ]
    example = template.example_image
    return TemplateOverview(
        name=template.name,
        title=template.title_in(lang) or template.name,
        description=template.description_in(lang),
        example_image=str(example) if example else None,
        fields_header=header,
        fields_rows=rows,
        compact_header=[header[0], header[1], header[4]],
        compact_rows=compact,
        image_fields=[spec.name for spec in template.fields if spec.type == "image"],
    )


def template_fields(services: Any, name: str, lang: str = "en") -> list[tuple[Any, str]]:
    """The field specs of template ``name`` with their descriptions in ``lang`` (the single-image form)."""
    template = services.templates.get(name)
    return [(spec, template.field_description_in(spec, lang)) for spec in template.fields]


# --------------------------------------------------------------------------------------------- batches


# Rows the page's validation report lists. A sheet of more rows lists only its rows with problems, the
# first this many: 10,000 rows were a megabyte of table in which 181 problems hid among ready rows.
REPORT_TABLE_ROWS = 200


@dataclass
class SheetCheck:
    """The validation report of an uploaded sheet against a template, ready to show and to start."""

    # engine.parked.ParkedBatch (the rows wait on disk: a page session keeps this for as long as its tab
    # stays open), or None when nothing can start
    prepared: Any
    header: list[str]
    rows: list[list[Any]]  # what the page lists: every row, or for a long sheet the first rows with problems
    summary: str
    ok_rows: int
    bad_rows: int
    problems_csv: str = ""  # every row with problems, its cells and what is wrong (empty: none)

    @property
    def can_start(self) -> bool:
        return self.prepared is not None


def check_sheet(
    services: Any,
    caller: Caller,
    template_name: str,
    sheet_path: str | Path,
    *,
    on_invalid: str = "skip",
    batch_seed: int | None = None,
    lang: str = "en",
    images_path: str | Path | None = None,
    replaces: Any = None,
) -> SheetCheck:
    """Read the uploaded sheet and validate every row; nothing is recorded or queued yet.

    ``images_path``: the zip of product photos uploaded with the sheet, which its image columns name.
    ``replaces``: what an earlier check of the same page prepared (see :func:`discard_check`).
    """
    discard_check(replaces)
    from engine.image_refs import ImageLimits
    from engine.sheets import SheetLimits, read_sheet

    if not template_name:
        raise BatchError("no template chosen", code="template_not_chosen")
    if on_invalid not in {"skip", "stop"}:
        raise BatchError(f"on_invalid must be 'skip' or 'stop', not {on_invalid!r}")
    limits = SheetLimits(max_file_bytes=int(services.settings.max_upload_mb) * 1024 * 1024)
    sheet = read_sheet(Path(sheet_path), limits=limits)
    images = None
    if images_path:
        max_bytes = int(services.settings.max_upload_mb) * 1024 * 1024
        images = services.runner.unpack_photos(Path(images_path), ImageLimits(max_archive_bytes=max_bytes))
    # Prepare in "skip" mode so the report always lists every row; "stop" only decides whether to start.
    try:
        prepared = services.runner.prepare(template_name, sheet, batch_seed=batch_seed, on_invalid="skip",
                                           user=caller.name, images=images)
    except BaseException:
        if images is not None:
            services.runner.discard_staging(images)
        raise
    header = [text("report.row", lang), text("report.status", lang), text("report.problems", lang)]
    table, bad_lines, ok, bad = [], [], 0, 0
    problems = {report.number: report.problems for report in prepared.report.rows}
    for row in prepared.rows:
        good = row["status"] == "queued"
        ok += good
        bad += not good
        described = text("list.separator", lang).join(problem_text(p, lang)
                                                       for p in problems.get(row["row_number"], []))
        line = [row["row_number"], text("report.ok" if good else "report.problem", lang), described or row["error"] or ""]
        table.append(line)
        if not good:
            bad_lines.append(line)
    capped = len(table) > REPORT_TABLE_ROWS
    if capped:
        table = bad_lines[:REPORT_TABLE_ROWS]
    notes = [problem_reason(p, lang) for p in prepared.sheet.problems_for(1)]  # the sheet's own: encoding, ...
    if capped and bad > len(table):
        notes.append(text("batch.report_capped", lang, shown=len(table), bad=bad))
    elif capped and bad:
        notes.append(text("batch.report_problems_only", lang))
    image_fields = [f.name for f in getattr(prepared.template, "fields", ()) if f.type == "image"]
    if image_fields and images is None and bad:  # the usual cause: the photos zip was not uploaded
        notes.append(text("batch.photos_missing", lang, columns=", ".join(image_fields)))
    if prepared.report.unknown_columns:  # a misspelt column would otherwise quietly take the default
        notes.append(text("batch.unused_columns", lang, columns=", ".join(prepared.report.unknown_columns)))
    summary = " ".join([text("batch.report_summary", lang, ok=ok, bad=bad), *notes])
    startable = prepared.runnable > 0 and (on_invalid == "skip" or bad == 0)
    if bad and on_invalid == "stop":
        summary += " " + text("batch.report_blocked", lang, bad=bad)
    elif prepared.runnable == 0:
        summary += " " + text("batch.no_rows", lang)
    problems_csv = _problems_csv(prepared.sheet, bad_lines, lang) if bad else ""
    parked = None
    try:
        if startable:
            parked = services.runner.park(prepared)
    finally:
        if parked is None and images is not None:
            # Nothing will start from this check (no runnable row, or a full disk refused its rows): its unpacked
            # photos would otherwise wait a day in the staging folder, and each try on a full disk adds a copy.
            services.runner.discard_staging(images)
    return SheetCheck(parked, header, table, summary, ok, bad, problems_csv)


def discard_check(prepared: Any) -> None:
    """Forget what a check prepared and nobody will start: the page checked again, or its sheet, template or
    seed changed. Its rows would otherwise wait on disk for a week."""
    if prepared is not None:
        prepared.discard()


def _problems_csv(sheet: Any, bad_lines: list[list[Any]], lang: str) -> str:
    """The rows with problems as CSV: the row number, what is wrong, then the row's own cells, so the sheet
    can be fixed from it and uploaded again. Cells a spreadsheet would run as formulas are neutralised."""
    from engine.archive import csv_text

    cells = {row.number: row.cells for row in sheet.rows}
    columns = [name for name in sheet.columns if name]
    return csv_text([text("report.row", lang), text("report.problems", lang), *columns],
                    [[number, described, *(cells.get(number, {}).get(name, "") for name in columns)]
                     for number, _status, described in bad_lines])


def parse_seed(value: Any) -> int | None:
    """A batch seed typed by a person or sent as a JSON value: empty means random; otherwise an exact
    non-negative integer. A JSON string holds any seed exactly; a JSON number only up to 2^53 (past that a
    reader kept it approximately, so it is refused rather than used as a different seed), and never
    ``true`` or ``1.5``."""
    from engine.sheets import SEED_MAX, parse_integer

    if value is None or not str(value).strip():
        return None
    if isinstance(value, float) and value.is_integer() and abs(value) >= 2**53:
        raise SheetError(f"the batch seed {value!r} is a number past 2^53, which JSON readers keep only "
                         "approximately: send it as a string", column="batch_seed",
                         code="batch_seed_not_whole", value=str(value))
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise SheetError(f"the batch seed must be a whole number, not {value!r}", column="batch_seed",
                         code="batch_seed_not_whole", value=str(value))
    if isinstance(value, float):
        value = int(value)  # 42.0: a whole number a JSON reader holds exactly
    try:
        seed = parse_integer(str(value))
    except (ValueError, SheetError) as exc:
        raise SheetError(f"the batch seed must be a whole number, not {value!r}", column="batch_seed",
                         code="batch_seed_not_whole", value=str(value)) from exc
    if not 0 <= seed <= SEED_MAX:
        raise SheetError(f"the batch seed must be between 0 and {SEED_MAX}", column="batch_seed",
                         code="batch_seed_out_of_range", limit=SEED_MAX,
                         limit_str=str(SEED_MAX))  # exact where a JSON reader rounds past 2^53
    return seed


def start_batch(services: Any, prepared: Any) -> str:
    """Record a prepared batch in the ledger and queue it; returns its id."""
    if prepared is None:
        raise BatchError("nothing to start: check a spreadsheet first", code="batch_not_checked")
    batch_id = services.runner.start(prepared)
    services.queue.submit(batch_id)
    return batch_id


def may_control(services: Any, caller: Caller, batch_id: str) -> bool:
    """Whether ``caller`` may stop or resume ``batch_id``: whoever started it, or an admin. Everyone signed
    in may look at every batch (a team shares its production line); stopping another's work is for admins.
    Batches started without a user (no sign-in configured) belong to everyone."""
    batch = services.ledger.get_batch(batch_id)
    owner = batch.get("user") if batch is not None else None
    return caller.is_admin or not owner or owner == caller.name


def check_may_control(services: Any, caller: Caller, batch_id: str) -> None:
    """AccessDenied (403) unless :func:`may_control`."""
    if not may_control(services, caller, batch_id):
        owner = services.ledger.get_batch(batch_id)["user"]
        raise AccessDenied(f"batch {batch_id} was started by {owner}: only they or an admin can stop or resume it",
                           status=403, reason="not_owner", batch_id=batch_id, owner=owner, code="batch_not_owner")


def cancel_batch(services: Any, caller: Caller, batch_id: str) -> str:
    """Cancel a batch; returns what happened: ``"cancelling"`` (running here: it stops between sampler
    steps), ``"removed_from_queue"`` (it had not started) or ``"not_running"`` (nothing to cancel here)."""
    if not batch_id:
        raise BatchError("no batch selected", code="batch_not_selected")
    check_may_control(services, caller, batch_id)
    return services.queue.cancel(batch_id)


def resume_batch(services: Any, caller: Caller, batch_id: str) -> None:
    """Queue an interrupted batch again: the runner only runs the rows that are not done."""
    if not batch_id:
        raise BatchError("no batch selected", code="batch_not_selected")
    if services.ledger.get_batch(batch_id) is None:
        raise BatchError(f"no batch {batch_id!r} in the ledger", batch_id=batch_id, code="batch_not_found")
    check_may_control(services, caller, batch_id)
    services.queue.submit(batch_id)


def interrupted_batches(services: Any) -> list[dict[str, Any]]:
    """Unfinished batches in the ledger that this process is not running (e.g. after a restart)."""
    return list(services.queue.interrupted())


def recent_batches(services: Any, limit: int = 30) -> list[str]:
    """Ids to offer in the batch watcher: queued and running first, then the ledger's newest."""
    ids = list(services.queue.queued())
    for batch in services.ledger.list_batches(limit=limit):
        if batch["id"] not in ids:
            ids.append(batch["id"])
    return ids[:limit]


def current_batch(services: Any) -> str | None:
    """The batch the queue is running now, else the next queued one."""
    queued = services.queue.queued()
    running = [b for b in recent_batches(services, limit=10) if _state(services, b) == "running"]
    return (running or queued or [None])[0]


def _state(services: Any, batch_id: str) -> str | None:
    progress = services.queue.status(batch_id)
    return progress.state if progress is not None else None


def format_duration(seconds: float | None, lang: str = "en") -> str | None:
    """A duration as people read it in ``lang``: "2s", "3m 05s", "1h 02m" (in Chinese "2 秒", "3 分 05 秒")."""
    if seconds is None:
        return None
    seconds = round(seconds)
    if seconds < 60:
        return text("duration.s", lang, s=seconds)
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return text("duration.ms", lang, m=minutes, s=f"{seconds:02d}")
    hours, minutes = divmod(minutes, 60)
    return text("duration.hm", lang, h=hours, m=f"{minutes:02d}")


@dataclass
class BatchView:
    """What the batch page shows for one batch, built from the queue's live snapshot or the ledger."""

    batch_id: str
    state: str
    status_line: str
    step_line: str
    step_fraction: float
    images: list[str]  # the newest image paths under the outputs folder (at most max_images), oldest first
    finished: bool
    references: dict[str, list[str]] = field(default_factory=dict)  # image path -> the row's product photos
    captions: dict[str, str] = field(default_factory=dict)  # image path -> its text alternative (image_caption)
    done: int = 0
    failed: int = 0
    remaining: int = 0
    error: str | None = None
    announcement: str = ""  # what a screen reader is told (progress_announcement): changes far less often
    warming_up: bool = False  # the model is loading: a running batch waits for it
    image_count: int = 0  # every image the batch has made so far (``images`` holds the newest of them)


def batch_view(services: Any, batch_id: str, lang: str = "en", max_images: int = 48) -> BatchView:
    """Progress of ``batch_id``: live while this process runs it, from the ledger otherwise."""
    batch_id = (batch_id or "").strip()  # a pasted id often carries a space
    batch = services.ledger.get_batch(batch_id)
    if batch is None:
        raise BatchError(text("batch.unknown", lang, batch_id=batch_id), batch_id=batch_id)
    progress = services.queue.status(batch_id)
    # Polled every second while the page is open: counts and the newest images only, never every row
    counts = services.ledger.row_counts(batch_id)
    image_count, rows = services.ledger.latest_images(batch_id, max_images)
    done = counts["done"]
    failed = counts["failed"] + counts["timed_out"]
    # Cancelled rows are still to be made: resuming the batch runs them.
    remaining = counts["queued"] + counts["running"] + counts["cancelled"]
    images = [row.image_path for row in rows]
    references = {row.image_path: [str(p) for p in services.runner.reference_images(batch, row.row_values)]
                  for row in rows}
    if progress is not None:
        state = progress.state
        eta = progress.eta_s if state == "running" else None
        step_line, fraction = "", 0.0
        if state == "running" and progress.row_number is not None and progress.steps:
            step_line = text("status.step", lang, row=progress.row_number, step=progress.step, steps=progress.steps)
            fraction = progress.step / progress.steps
        elif state == "queued":
            ahead = services.queue.queued()
            position = ahead.index(batch_id) if batch_id in ahead else 0
            step_line = text("status.queue_position", lang, ahead=position + (1 if _anything_running(services) else 0))
        elif state == "waiting_for_storage" and progress.retry_at is not None:
            wait = format_duration(max(0.0, progress.retry_at - time.time()), lang)
            step_line = text("status.storage_retry", lang, wait=wait)
        error = progress.error and coded_text(progress.error_code, progress.error_details, progress.error, lang)
    else:
        state = "interrupted" if remaining else (batch.get("status") or "done")
        if counts.get("running") and services.runner.held_elsewhere(batch_id):
            state = "running_elsewhere"  # a CLI run of the same data folder, say: nothing to resume here
        eta, step_line, fraction, error = None, "", 0.0, None
    label = status_label(state, lang)
    if state == "running" and not step_line and is_warming_up(services):
        step_line = text("status.waiting_for_model", lang)
    if state not in ACTIVE_STATES or remaining == 0:
        eta_text = ""
    elif eta is not None:
        eta_text = text("status.eta", lang, eta=format_duration(eta, lang))
    else:
        eta_text = text("status.eta_unknown", lang)
    line = text("status.line", lang, status=label, done=done, failed=failed, remaining=remaining, eta=eta_text)
    announcement = progress_announcement(state, done, failed, remaining, lang)
    return BatchView(
        batch_id=batch_id,
        state=state,
        status_line=line.rstrip(" ·"),
        step_line=step_line,
        step_fraction=fraction,
        images=images,
        finished=state not in ACTIVE_STATES,
        references={path: found for path, found in references.items() if found},
        captions={row.image_path: image_caption(row.row_number, row.row_values, row.prompt, lang) for row in rows},
        done=done,
        failed=failed,
        remaining=remaining,
        error=error,
        announcement=announcement + (f". {error}" if error else ""),
        warming_up=is_warming_up(services),
        image_count=image_count,
    )


def progress_announcement(state: str, done: int, failed: int, remaining: int, lang: str = "en") -> str:
    """What a screen reader is told of a batch's progress: its state and, while it runs, the share of its rows
    made in steps of 10 %; once it is over, the final counts.

    The visible progress line changes every second (the time left) and with every row: as a live region it
    would be read out again and again. This text changes only when the state does or another tenth of the
    rows is made, so each change is worth hearing."""
    label = status_label(state, lang)
    if state not in ACTIVE_STATES:
        return text("status.line", lang, status=label, done=done, failed=failed, remaining=remaining,
                    eta="").replace("**", "").rstrip(" ·")
    total = done + failed + remaining
    percent = 10 * ((done + failed) * 10 // total) if total else 0
    return text("status.announce", lang, status=label, percent=percent)


CAPTION_FIELDS = ("product_name", "title", "prompt")  # the cell that names what a row's image shows


def image_caption(row_number: int | None, values: dict[str, Any] | None, prompt: str | None = None,
                  lang: str = "en") -> str:
    """The text alternative of a generated image: its row and what it shows (the row's product name, title
    or prompt), e.g. "Row 3: a blue mug"; a single image (``row_number`` None) is "Generated image: ...".
    Screen readers read it in place of the picture, so it never is the file name."""
    values = values or {}
    subject = next((str(values[name]).strip() for name in CAPTION_FIELDS if str(values.get(name) or "").strip()),
                   (prompt or "").strip())
    subject = subject if len(subject) <= 120 else subject[:119] + "…"
    if row_number is None:
        return text("image.single", lang, subject=subject) if subject else text("image.single_only", lang)
    if subject:
        return text("image.row", lang, row=row_number, subject=subject)
    return text("image.row_only", lang, row=row_number)


def status_label(status: str | None, lang: str = "en") -> str:
    """A ledger or queue status in ``lang`` ("finished_with_errors" -> "finished with errors")."""
    key = f"status.{status}"
    return text(key, lang) if key in _STATUS_KEYS else (status or "").replace("_", " ")


def is_warming_up(services: Any) -> bool:
    """Whether the engine is loading and warming up its model (batches submitted now wait their turn)."""
    return bool(getattr(services.engine, "warming_up", False))


_STATUS_KEYS = {f"status.{s}" for s in (*LEDGER_STATUSES, "interrupted", "finished", "finished_with_errors", "error",
                                         "running_elsewhere", "waiting_for_storage")}


def _anything_running(services: Any) -> bool:
    return current_batch(services) is not None and _state(services, current_batch(services)) == "running"


def reference_thumbnail(path: str | Path, size: int = 256) -> Any:
    """A small RGB copy (PIL image) of a product photo, to show beside the results made from it."""
    from PIL import Image, ImageOps

    with Image.open(path) as image:
        image.draft("RGB", (size, size))
        upright = ImageOps.exif_transpose(image)
        if upright.mode in ("RGBA", "LA", "PA") or "transparency" in upright.info:
            # A cut-out product: show its transparent area white, as a page would, not as the black the
            # hidden colour values often are.
            rgba = upright.convert("RGBA")
            thumb = Image.new("RGB", rgba.size, (255, 255, 255))
            thumb.paste(rgba, mask=rgba.getchannel("A"))
        else:
            thumb = upright.convert("RGB")
    thumb.thumbnail((size, size))
    return thumb


def reference_data_url(path: str | Path, size: int = 384) -> str:
    """A product photo as a ``data:`` URL: the photos live under the uploads folder, which /files does not serve."""
    import base64
    import io

    buffer = io.BytesIO()
    reference_thumbnail(path, size).save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


# --------------------------------------------------------------------------------------- single image


@dataclass
class SingleResult:
    batch_id: str
    image_path: str
    parameters: dict[str, Any]
    reference_images: list[str] = field(default_factory=list)  # the product photo(s) the image was made from
    caption: str = ""  # the image's text alternative (image_caption)


def stage_single_photos(
    services: Any, template_name: str, photos: dict[str, str | Path | None]
) -> tuple[Any, dict[str, str]]:
    """The photos uploaded on the single-image form, staged like a batch's zip (see
    :meth:`engine.batch.BatchRunner.stage_photos`)."""
    return services.runner.stage_photos(template_name, photos)


def _prepare_one_row(
    services: Any, template_name: str, sheet: Any, caller: Caller, images: Any = None, lang: str = "en"
) -> Any:
    """Prepare a one-row batch; a row with problems is refused with its reasons (which field, why)."""
    prepared = services.runner.prepare(template_name, sheet, on_invalid="skip", user=caller.name, images=images)
    row = prepared.rows[0]
    if row["status"] != "queued":
        described = "; ".join(problem_text(p, lang) for p in prepared.report.rows[0].problems)
        raise BatchError(described or row["error"] or "the row cannot run", row=row["row_number"])
    return prepared


def generate_single(
    services: Any,
    caller: Caller,
    template_name: str,
    values: dict[str, Any],
    on_progress: Callable[[float, str], None] | None = None,
    timeout_s: float | None = None,
    lang: str = "en",
    photos: dict[str, str | Path | None] | None = None,
) -> SingleResult:
    """Render one row from form ``values`` and run it through the batch queue; waits for the image.

    ``photos`` maps the template's ``image`` fields to uploaded files: they become the batch's photos
    (:func:`stage_single_photos`) and the fields' values their file names, so ``LoadImage`` finds them
    as it finds a batch's. ``on_progress(fraction, description)`` is called while waiting (queue
    position, then sampler steps).
    """
    images, names = stage_single_photos(services, template_name, photos or {})
    try:
        # A field left without a photo is an empty cell, so the row says which photo is required.
        cells = {**values, **{name: "" for name in photos or {}}, **names}
        sheet = one_row_sheet(cells, row_number=2, filename="single-image")
        prepared = _prepare_one_row(services, template_name, sheet, caller, images, lang)
        batch_id = start_batch(services, prepared)
    finally:
        if images is not None:  # started: the batch has its own copy; refused: nothing needs them
            services.runner.discard_staging(images)
    limit = timeout_s if timeout_s is not None else float(services.settings.row_timeout_s) * 2 + 600
    deadline = time.monotonic() + limit
    while True:
        view = batch_view(services, batch_id, lang)
        if on_progress is not None:
            description = view.step_line or text("single.waiting", lang)
            on_progress(view.step_fraction, description)
        if view.finished:
            break
        if time.monotonic() > deadline:
            raise BatchError(f"the image did not finish within {int(limit)} s", batch_id=batch_id,
                             code="single_image_timeout", seconds=int(limit))
        time.sleep(0.25)
    row = services.ledger.rows(batch_id)[0]
    if row.status != "done":
        reason = row_error_text(row.to_dict(), lang) or view.error or status_label(row.status, lang)
        raise BatchError(text("single.failed", lang, error=reason), batch_id=batch_id, status=row.status)
    references = [str(p) for p in services.runner.reference_images(batch_id, row.row_values)]
    return SingleResult(batch_id, row.image_path, generation_parameters(row), references,
                        image_caption(None, row.row_values, row.prompt, lang))


# ------------------------------------------------------------------------------------------- history


def parse_day(value: str | None, lang: str = "en") -> date | None:
    """``YYYY-MM-DD`` -> date; empty -> None; anything else is an error naming the expected form."""
    if value is None or not str(value).strip():
        return None
    try:
        return datetime.strptime(str(value).strip(), "%Y-%m-%d").date()
    except ValueError as exc:
        raise SheetError(text("history.bad_date", lang, value=value), column="date") from exc


HISTORY_COLUMNS = ("row_key", "row", "status", "prompt", "seed", "template", "user", "finished")


def search_history(
    services: Any,
    *,
    text_query: str = "",
    batch_id: str = "",
    status: str = "",
    date_from: str = "",
    date_to: str = "",
    lang: str = "en",
    page: int = 1,
    limit: int = 200,
) -> "HistoryPage":
    """One page (``limit`` rows, 1-based ``page``) of a ledger search for the history table, newest first."""
    since, until = parse_day(date_from, lang), parse_day(date_to, lang)
    page = max(1, int(page or 1))  # past every ledger: an empty page (the ledger caps the offset)
    found = services.ledger.search(
        text=text_query.strip() or None,
        batch_id=batch_id.strip() or None,
        status=status or None,
        date_from=since.isoformat() if since else None,
        date_to=until.isoformat() if until else None,
        limit=limit + 1,  # one more tells whether a next page exists
        offset=(page - 1) * limit,
    )
    more = len(found) > limit
    found = found[:limit]
    header = [text(f"col.{name}", lang) for name in HISTORY_COLUMNS]
    rows = [
        [
            row.row_key,  # "<batch id>:<sheet row>": the batch is part of it
            row.row_number,
            status_label(row.status, lang),
            (row.prompt or "")[:120],
            "" if row.seed is None else str(row.seed),  # text: seeds exceed a browser number's 53 bits
            row.template_name or "",
            row.user or "",
            (row.finished_at or "")[:19].replace("T", " "),  # UTC, to the second
        ]
        for row in found
    ]
    first = (page - 1) * limit + 1
    note = text("history.page", lang, first=first, last=first + len(rows) - 1, page=page) if rows else ""
    if more:
        note += " " + text("history.more", lang, next=page + 1)
    if not rows:
        note = text("history.page_empty", lang, page=page) if page > 1 else text("history.no_results", lang)
    return HistoryPage(header, rows, page, more, note)


@dataclass
class HistoryPage:
    """One page of the history table and what to say about its place in the results."""

    header: list[str]
    rows: list[list[Any]]
    page: int
    more: bool  # another page follows
    note: str  # "rows 201-400; more on page 3"


PARAMETER_FIELDS = ("prompt", "negative_prompt", "seed", "steps", "cfg", "sampler", "scheduler", "denoise",
                    "width", "height", "model_name", "model_hash", "precision", "loras", "template_name",
                    "template_hash")


def generation_parameters(row: Any) -> dict[str, Any]:
    """The generation parameters the ledger recorded for a row (prompt, seed, steps, model, ...)."""
    params = {name: getattr(row, name) for name in PARAMETER_FIELDS if getattr(row, name) not in (None, "")}
    if row.seed is not None:
        params["seed"] = str(row.seed)  # exact in the browser, which keeps only 53 bits of a number
    return params


def _parameter_value(name: str, value: Any) -> str:
    if name == "loras" and isinstance(value, list):
        return ", ".join(
            f"{item.get('name', item)} ({item.get('strength_model', item.get('strength', ''))})"
            if isinstance(item, dict) else str(item)
            for item in value
        )
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def parameter_rows(params: dict[str, Any], lang: str = "en") -> list[tuple[str, str]]:
    """Generation parameters as ``(label, value)`` pairs in ``lang``; width and height read as one size."""
    rows = []
    for name in PARAMETER_FIELDS:
        if name == "height" or params.get(name) in (None, "", []):
            continue
        if name == "width":
            rows.append((text("param.size", lang), f"{params['width']} × {params.get('height', '?')}"))
            continue
        rows.append((text(f"param.{name}", lang), _parameter_value(name, params[name])))
    return rows


def generation_rows(detail: dict[str, Any], lang: str = "en") -> list[tuple[str, str]]:
    """What the history page shows about one generation: where it came from, how it went, its parameters
    and the spreadsheet values, as ``(label, value)`` pairs in ``lang``."""
    rows = [
        (text("col.status", lang), status_label(detail.get("status"), lang)),
        (text("col.batch", lang), f"{detail.get('batch_id')} · {text('col.row', lang)} {detail.get('row_number')}"),
    ]
    if detail.get("error"):
        rows.append((text("param.error", lang), str(row_error_text(detail, lang))))
    rows += parameter_rows(detail, lang)
    if detail.get("duration_s") is not None:
        seconds = float(detail["duration_s"])
        rows.append((text("param.duration", lang), text("duration.s", lang, s=f"{seconds:.1f}") if seconds < 10
                     else format_duration(seconds, lang)))
    if detail.get("user"):
        rows.append((text("col.user", lang), str(detail["user"])))
    if detail.get("finished_at"):
        rows.append((text("col.finished", lang), str(detail["finished_at"])[:19].replace("T", " ")))
    values = detail.get("row_values") or {}
    shown = {k: v for k, v in values.items() if k != "png_extra" and v not in (None, "")}
    if shown:
        rows.append((text("param.values", lang), "; ".join(f"{k} = {v}" for k, v in shown.items())))
    return rows


def generation_detail(services: Any, row_key: str) -> dict[str, Any]:
    """Everything the ledger recorded about one generation (values, parameters, workflow, timings)."""
    row = services.ledger.get_generation(row_key)
    if row is None:
        raise BatchError(f"no generation {row_key!r} in the ledger", row_key=row_key, code="generation_not_found")
    detail = row.to_dict()
    if row.seed is not None:
        detail["seed"] = str(row.seed)
    detail["reference_images"] = [str(p) for p in services.runner.reference_images(row.batch_id, row.row_values)]
    return detail


def rerun_row(services: Any, caller: Caller, row_key: str) -> str:
    """Queue the recorded values of one row again, as a new one-row batch of the same template."""
    row = services.ledger.get_generation(row_key)
    if row is None:
        raise BatchError(f"no generation {row_key!r} in the ledger", row_key=row_key, code="generation_not_found")
    values = dict(row.row_values)
    template = row.template_name
    if not template:
        raise BatchError(f"generation {row_key!r} records no template, so it cannot be re-run", row_key=row_key,
                         code="generation_has_no_template")
    sheet = one_row_sheet(values, row_number=row.row_number, filename=f"rerun-{row_key}")
    images = None
    if services.runner.images_dir(row.batch_id).is_dir():  # the photos the original batch used
        from engine.image_refs import ImageLibrary

        images = ImageLibrary.from_folder(services.runner.images_dir(row.batch_id))
    return start_batch(services, _prepare_one_row(services, template, sheet, caller, images))


# -------------------------------------------------------------------------------------- template edits


def template_sources(services: Any, name: str) -> tuple[str, str]:
    """``(schema_text, workflow_text)`` of a template (its ``template.json`` and ``workflow.json.j2``)."""
    template = services.templates.get(name)
    schema = (template.folder / "template.json").read_text(encoding="utf-8") if template.folder else ""
    return schema, template.workflow_source


def save_template(
    services: Any,
    caller: Caller,
    schema_text: str,
    workflow_text: str,
    *,
    replace: bool = False,
    lang: str = "en",
) -> str:
    """Admins only: validate a template (it renders its examples, its graph passes validation), then save.

    Returns the saved template's name (declared inside ``template.json``).
    """
    require_admin(caller, "edit_template", lang)
    files = {"template.json": (schema_text or "").encode("utf-8"), "workflow.json.j2": (workflow_text or "").encode("utf-8")}
    return services.templates.add(files, replace=replace).name


def save_uploaded_template(
    services: Any, caller: Caller, paths: list[str], *, replace: bool = False, lang: str = "en"
) -> str:
    """Admins only: save uploaded ``template.json``, ``workflow.json.j2`` and optional ``example.png``."""
    require_admin(caller, "upload_template", lang)
    files = {Path(p).name: Path(p).read_bytes() for p in paths}
    return services.templates.add(files, replace=replace).name


# -------------------------------------------------------------------------------------------- system


def system_info(services: Any) -> dict[str, Any]:
    """Model in use (``demo_in_use`` says whether it is the demo), precision, backend, device and GPU memory,
    the batch queue and versions."""
    import gradio

    if is_warming_up(services):
        info = _system_info_while_loading(services)
    else:
        info = dict(services.engine.system_info())
    info["warming_up"] = is_warming_up(services)
    info["fp8_backend"] = services.settings.fp8_backend
    info["queue"] = {"waiting": services.queue.queued(), "running": current_batch(services)}
    info["versions"] = {**dict(info.get("versions") or {}), "gradio": gradio.__version__}
    return info


def demo_in_use(services: Any) -> bool:
    """Whether the default checkpoint is the built-in demo model (placeholder images, not real renders)."""
    from engine.settings import DEMO_CHECKPOINT

    return services.engine.default_checkpoint == DEMO_CHECKPOINT


def _system_info_while_loading(services: Any) -> dict[str, Any]:
    """What the system page can tell while the model loads, without asking the model cache: the cache
    answers only once the load is done, and the page must not hang for the minutes a real load takes."""
    import platform
    from importlib.metadata import version

    engine = services.engine
    return {
        "device": str(engine.models.device),
        "dtype": str(engine.models.dtype).replace("torch.", ""),
        "precision": services.settings.precision,
        "default_checkpoint": engine.default_checkpoint,
        "demo_in_use": demo_in_use(services),
        "loaded_models": None,  # unknown until the load finishes
        "versions": {"python": platform.python_version(),
                     **{name: version(name) for name in ("torch", "diffusers", "transformers")}},
    }


def format_bytes(count: float | None) -> str:
    """``1.5 GB``, ``320 MB``, ``12 KB``: a size as people read it."""
    if count is None:
        return ""
    value = float(count)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit in ("B", "KB") else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GB"


def system_rows(info: dict[str, Any], lang: str = "en") -> list[tuple[str, str]]:
    """:func:`system_info` as ``(label, value)`` pairs in ``lang``, for a two-column table."""
    kind = text("system.demo" if info.get("demo_in_use") else "system.real", lang)
    rows = [
        (text("system.model", lang), f"{info.get('default_checkpoint')} ({kind})"),
        (text("system.state", lang), text("system.warming_up" if info.get("warming_up") else "system.ready", lang)),
        (text("system.precision", lang), f"{info.get('precision')} · {info.get('dtype')}"),
        (text("system.fp8_backend", lang), str(info.get("fp8_backend") or "")),
        (text("system.device", lang), str(info.get("device") or "")),
    ]
    gpu = info.get("gpu")
    if gpu:
        rows.append((text("system.gpu", lang), f"{gpu['name']} (compute {gpu['compute_capability']})"))
        rows.append((text("system.gpu_memory", lang), text(
            "system.gpu_memory_value", lang, free=format_bytes(gpu["memory_free_bytes"]),
            total=format_bytes(gpu["memory_total_bytes"]))))
    loaded = info.get("loaded_models")
    if loaded is None:
        rows.append((text("system.loaded", lang), text("system.warming_up", lang)))
    else:
        resident = ", ".join(sorted({f"{m['name']} ({model_kind_text(m['kind'], lang)})" for m in loaded})) or text(
            "system.none_loaded", lang)
        rows.append((text("system.loaded", lang), f"{resident} · {format_bytes(info.get('model_memory_bytes') or 0)}"))
    queue = info.get("queue") or {}
    rows.append((text("system.queue", lang), text(
        "system.queue_value", lang, running=queue.get("running") or "–", waiting=len(queue.get("waiting") or []))))
    versions = info.get("versions") or {}
    rows.append((text("system.versions", lang), " · ".join(f"{name} {version}" for name, version in versions.items())))
    return rows


def model_choices(services: Any) -> list[str]:
    """Checkpoints an admin may switch to (:meth:`engine.batch.BatchRunner.allowed_checkpoints`)."""
    return list(services.runner.allowed_checkpoints())


def switch_model(services: Any, caller: Caller, name: str, lang: str = "en") -> str:
    """Admins only: make ``name`` the default checkpoint (:meth:`engine.batch.BatchRunner.switch_checkpoint`)."""
    require_admin(caller, "switch_model", lang)
    services.runner.switch_checkpoint(name)
    return name


__all__ = [
    "BatchView",
    "Caller",
    "SheetCheck",
    "SingleResult",
    "TemplateOverview",
    "batch_view",
    "caller_for",
    "cancel_batch",
    "check_sheet",
    "current_batch",
    "demo_in_use",
    "discard_check",
    "error_message",
    "generate_single",
    "generation_detail",
    "generation_parameters",
    "generation_rows",
    "interrupted_batches",
    "is_warming_up",
    "model_choices",
    "parameter_rows",
    "recent_batches",
    "require_admin",
    "rerun_row",
    "resume_batch",
    "save_template",
    "save_uploaded_template",
    "search_history",
    "HistoryPage",
    "stage_single_photos",
    "start_batch",
    "status_label",
    "switch_model",
    "system_info",
    "system_rows",
    "template_fields",
    "template_names",
    "template_overview",
    "template_sources",
]
