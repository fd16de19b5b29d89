"""A batch as one zip: its images under the names they have on disk, plus manifests.

Entries: ``images/<name>.png`` for every finished row, named as the batch runner named the file (the
template's ``filename_pattern`` filled with the row's cells, made safe and unique when the rows were
written; a name is only changed to keep entries unique when files of several folders meet),
``manifest.csv`` (one line per row; every cell that a spreadsheet would run as a formula is neutralised),
``manifest.xlsx`` (the same table for Excel, where a CSV loses digits: seeds, product codes with leading
zeros and long numbers are text cells, and no cell is a formula), ``manifest.json`` (everything, typed) and
``failed_rows.csv`` (the original columns of every row not done,
plus ``error``: fix it and upload it again as a new sheet).

The zip is built by streaming: images are copied from disk in chunks and :func:`iter_zip_stream` hands out
bytes as they are produced, so a batch of thousands of images never needs its size in memory.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import tempfile
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from engine.errors import StoreError
from engine.naming import safe_filename
from engine.sheets import FORMULA_STARTS
from engine.store import BatchLedger, Generation

__all__ = ["write_batch_zip", "iter_zip_stream", "csv_text", "neutralise_csv_cell", "ZipSummary", "MANIFEST_COLUMNS"]

MANIFEST_COLUMNS = (
    "row", "status", "file", "seed", "prompt", "negative_prompt", "width", "height", "steps", "cfg", "sampler",
    "scheduler", "model_name", "model_hash", "precision", "template_name", "template_hash", "image_sha256",
    "duration_s", "attempts", "error", "finished_at",
)
IMAGES_FOLDER = "images/"
_CHUNK = 1 << 20


def neutralise_csv_cell(value: Any) -> str:
    """Text for a CSV cell that Excel/LibreOffice will not run as a formula (leading apostrophe)."""
    text = "" if value is None else str(value)
    return "'" + text if text.startswith(FORMULA_STARTS) else text


@dataclass
class ZipSummary:
    """What went into the zip."""

    images: list[str] = field(default_factory=list)  # entry names, in row order
    problems: list[str] = field(default_factory=list)  # rows whose image could not be added, and why
    entries: list[str] = field(default_factory=list)  # every entry name


class _StreamSink(io.RawIOBase):
    """A write-only stream collecting what zipfile writes, drained by :func:`iter_zip_stream`."""

    def __init__(self) -> None:
        super().__init__()
        self._parts: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        chunk = bytes(data)
        self._parts.append(chunk)
        return len(chunk)

    def take(self) -> bytes:
        data = b"".join(self._parts)
        self._parts.clear()
        return data


def csv_text(header: list[str], lines: list[list[Any]]) -> str:
    """A CSV a spreadsheet program opens safely: no cell, the header's included, runs as a formula."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\r\n")
    writer.writerow([neutralise_csv_cell(h) for h in header])
    for line in lines:
        writer.writerow([neutralise_csv_cell(v) for v in line])
    return text.getvalue()


def _csv_bytes(header: list[str], lines: list[list[Any]]) -> bytes:
    return ("\ufeff" + csv_text(header, lines)).encode("utf-8")  # BOM: Excel then reads UTF-8 (Chinese) correctly


# Manifest columns Excel may show as numbers: whatever else is text, exactly as recorded.
_NUMBER_COLUMNS = frozenset({"row", "width", "height", "steps", "cfg", "duration_s", "attempts"})


def _xlsx_bytes(header: list[str], lines: list[list[Any]]) -> bytes:
    """The manifest as a workbook. Excel reads a CSV's 20-digit seed as 1.2E+19 and a product code 00123
    as 123; here those are text cells. A text cell starting with "=" stays text (openpyxl would otherwise
    write it as a formula), so nothing in the file runs."""
    from openpyxl import Workbook
    from openpyxl.cell import WriteOnlyCell

    book = Workbook(write_only=True)
    sheet = book.create_sheet("manifest")
    sheet.append(header)
    numeric = [name in _NUMBER_COLUMNS for name in header]
    for line in lines:
        cells = []
        for value, is_number in zip(line, numeric):
            if is_number and isinstance(value, (int, float)) and not isinstance(value, bool):
                cells.append(value)
                continue
            cell = WriteOnlyCell(sheet, value="" if value is None else str(value))
            cell.data_type = "s"
            cells.append(cell)
        sheet.append(cells)
    buffer = io.BytesIO()
    book.save(buffer)
    return buffer.getvalue()


def _row_images(row: Generation, image_root: Path | None) -> list[Path]:
    # Previews (type "temp") are not deliverables: ComfyUI does not keep them either.
    listed = [img.get("path") for img in (row.images or [])
              if isinstance(img, Mapping) and img.get("path") and img.get("type", "output") != "temp"]
    paths = [Path(p) for p in (listed or ([row.image_path] if row.image_path else []))]
    return [p if p.is_absolute() or image_root is None else image_root / p for p in paths]


def _copy_file(zf: zipfile.ZipFile, path: Path, name: str) -> Iterator[str]:
    """Copy ``path`` into entry ``name`` chunk by chunk, yielding after each chunk; the last value is its sha256."""
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED  # PNG is already compressed
    info.external_attr = 0o644 << 16
    digest = hashlib.sha256()
    with open(path, "rb") as source, zf.open(info, "w", force_zip64=True) as target:
        while chunk := source.read(_CHUNK):
            target.write(chunk)
            digest.update(chunk)
            yield ""
    yield digest.hexdigest()


def _entries(
    zf: zipfile.ZipFile, ledger: BatchLedger, batch_id: str, image_root: Path | None, summary: ZipSummary,
) -> Iterator[None]:
    batch = ledger.get_batch(batch_id)
    if batch is None:
        raise StoreError(f"no batch '{batch_id}' in the ledger", batch_id=batch_id, code="batch_not_found")
    rows = ledger.rows(batch_id)
    used: set[str] = set()
    files: dict[str, list[str]] = {}
    notes: dict[str, str] = {}
    for row in rows:
        if row.status != "done":
            continue
        names: list[str] = []
        for index, path in enumerate(_row_images(row, image_root)):
            # The file's own name: the one the manifest's image_path shows and the runner made unique
            entry = IMAGES_FOLDER + safe_filename(path.stem, used, suffix=path.suffix or ".png")
            if not path.is_file():
                summary.problems.append(f"row {row.row_number}: image file missing: {path}")
                notes[row.row_key] = "image file missing on disk"
                continue
            digest = ""
            for digest in _copy_file(zf, path, entry):
                yield None
            expected = row.image_sha256 if index == 0 else None
            if expected and digest != expected:
                summary.problems.append(f"row {row.row_number}: {entry} does not match its recorded sha256")
                notes[row.row_key] = "image file changed since it was recorded (sha256 mismatch)"
            names.append(entry)
            summary.images.append(entry)
            summary.entries.append(entry)
        files[row.row_key] = names

    original_columns = _original_columns(batch, rows)
    clashing = {c for c in original_columns if c in MANIFEST_COLUMNS}
    manifest_lines = []
    json_rows = []
    for row in rows:
        record = {
            "row": row.row_number, "status": row.status, "file": "; ".join(files.get(row.row_key, [])),
            "seed": "" if row.seed is None else str(row.seed), "prompt": row.prompt, "negative_prompt":
            row.negative_prompt, "width": row.width, "height": row.height, "steps": row.steps, "cfg": row.cfg,
            "sampler": row.sampler, "scheduler": row.scheduler, "model_name": row.model_name,
            "model_hash": row.model_hash, "precision": row.precision, "template_name": row.template_name,
            "template_hash": row.template_hash, "image_sha256": row.image_sha256, "duration_s": row.duration_s,
            "attempts": row.attempts, "error": "; ".join(filter(None, [row.error, notes.get(row.row_key)])),
            "finished_at": row.finished_at,
        }
        cells = [row.row_values.get(c, "") for c in original_columns]
        manifest_lines.append([("" if record[c] is None else record[c]) for c in MANIFEST_COLUMNS] + cells)
        json_rows.append({**row.to_dict(), "files": files.get(row.row_key, []), "seed":
                          None if row.seed is None else str(row.seed), "note": notes.get(row.row_key)})
    header = list(MANIFEST_COLUMNS) + [f"sheet:{c}" if c in clashing else c for c in original_columns]
    _write_small(zf, "manifest.csv", _csv_bytes(header, manifest_lines), summary)
    yield None
    _write_small(zf, "manifest.xlsx", _xlsx_bytes(header, manifest_lines), summary)
    yield None
    manifest = {
        "batch": {**batch, "batch_seed": str(batch["batch_seed"])},
        "summary": ledger.batch_summary(batch_id)["counts"],
        "filename_pattern": (batch.get("options") or {}).get("filename_pattern"),
        "problems": summary.problems,
        "rows": json_rows,
    }
    _write_small(zf, "manifest.json",
                 json.dumps(manifest, ensure_ascii=False, indent=2, default=str).encode("utf-8"), summary)
    yield None
    failed = [r for r in rows if r.status != "done"]
    failed_lines = [
        [r.row_values.get(c, "") for c in original_columns] + [r.error or f"not run ({r.status})"] for r in failed
    ]
    failed_header = original_columns + (["error"] if "error" not in original_columns else ["row_error"])
    _write_small(zf, "failed_rows.csv", _csv_bytes(failed_header, failed_lines), summary)
    yield None


def _original_columns(batch: Mapping[str, Any], rows: list[Generation]) -> list[str]:
    declared = batch.get("options", {}).get("columns")
    if isinstance(declared, list) and all(isinstance(c, str) for c in declared):
        return list(declared)
    columns: dict[str, None] = {}
    for row in rows:
        for name in row.row_values:
            columns.setdefault(name, None)
    return list(columns)


def _write_small(zf: zipfile.ZipFile, name: str, data: bytes, summary: ZipSummary) -> None:
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_DEFLATED
    info.external_attr = 0o644 << 16
    zf.writestr(info, data)
    summary.entries.append(name)


def write_batch_zip(
    ledger: BatchLedger,
    batch_id: str,
    out: str | Path | IO[bytes],
    image_root: str | Path | None = None,
) -> ZipSummary:
    """Write the batch's zip to a path (atomically: temp file, then rename) or a binary file object.

    Relative image paths in the ledger are resolved against ``image_root``.
    """
    root = Path(image_root) if image_root is not None else None
    summary = ZipSummary()
    if isinstance(out, (str, Path)):
        target = Path(out)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, temp_name = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                with zipfile.ZipFile(handle, "w", allowZip64=True) as zf:
                    for _ in _entries(zf, ledger, batch_id, root, summary):
                        pass
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp_name, target)
        except BaseException:
            Path(temp_name).unlink(missing_ok=True)
            raise
        return summary
    with zipfile.ZipFile(out, "w", allowZip64=True) as zf:
        for _ in _entries(zf, ledger, batch_id, root, summary):
            pass
    return summary


def iter_zip_stream(
    ledger: BatchLedger,
    batch_id: str,
    image_root: str | Path | None = None,
    summary: ZipSummary | None = None,
) -> Iterator[bytes]:
    """The batch's zip as a stream of byte chunks (for an HTTP streaming response).

    Nothing is buffered beyond about one image chunk; pass ``summary`` to learn what went in.
    """
    root = Path(image_root) if image_root is not None else None
    summary = summary if summary is not None else ZipSummary()
    sink = _StreamSink()
    with zipfile.ZipFile(sink, "w", allowZip64=True) as zf:
        for _ in _entries(zf, ledger, batch_id, root, summary):
            data = sink.take()
            if data:
                yield data
    tail = sink.take()
    if tail:
        yield tail
