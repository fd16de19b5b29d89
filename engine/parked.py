"""A checked batch set aside on disk until someone starts it.

The page checks a sheet, shows the report, and waits for Start; a tab may stay open for days. Kept in
memory, a prepared batch of 10,000 rows (every row's rendered workflow, its values, the sheet and the
validation report) took about 100 MB per page session, and a server keeps hundreds of sessions. What
Start needs is only the rows to record, so :func:`park` writes them, compressed, into the uploads'
staging folder and hands back a :class:`ParkedBatch` of a few hundred bytes: the batch's identity, the
template object it was rendered with (shared with the template registry) and where its rows lie, with
their sha256. :meth:`ParkedBatch.load_rows` reads them back at Start and refuses a file that is gone or
no longer the one written, so Start records exactly the rows the report described or nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.errors import BatchError

ROWS_SUFFIX = ".rows.json.z"
COMPRESS_LEVEL = 1  # 16 MB of rows JSON -> 0.6 MB in 30 ms; level 6 saves 0.15 MB for twice the time


@dataclass(frozen=True)
class ParkedBatch:
    """What :meth:`engine.batch.BatchRunner.start` needs of a checked batch, its rows on disk.

    Holds the same attributes :class:`engine.batch.PreparedBatch` gives ``start``, so either starts a batch.
    """

    batch_id: str
    template: Any  # the template object the rows were rendered with, not a copy
    sheet_name: str
    columns: tuple[str, ...]
    sheet_hash: str
    batch_seed: int
    user: str | None
    images: Any  # engine.image_refs.ImageLibrary (its photos staged on disk), or None
    rows_file: Path
    rows_sha256: str
    row_count: int  # rows of the report, queued and skipped
    runnable: int
    resumed: bool = False

    def load_rows(self) -> list[dict[str, Any]]:
        """The rows as :meth:`engine.batch.BatchRunner.prepare` made them (the ledger's rows to insert).

        BatchError ``batch_check_expired`` when the file is gone (cleared from the staging after a week,
        or started already) or is not the one written."""
        try:
            packed = self.rows_file.read_bytes()
        except FileNotFoundError:
            packed = None
        if packed is None or hashlib.sha256(packed).hexdigest() != self.rows_sha256:
            raise BatchError(f"the checked rows of batch {self.batch_id} are no longer kept (not started within a "
                             "week, or started already); check the sheet again",
                             code="batch_check_expired", batch_id=self.batch_id)
        return json.loads(zlib.decompress(packed))

    def discard(self) -> None:
        """Remove the rows from disk (started, or replaced by a newer check)."""
        self.rows_file.unlink(missing_ok=True)


def park(prepared: Any, folder: Path) -> ParkedBatch:
    """Write ``prepared``'s rows (an :class:`engine.batch.PreparedBatch`) into ``folder``; the compact handle.

    The rows go through JSON as the ledger stores them (``default=str`` as for a row's problems), so what
    :meth:`ParkedBatch.load_rows` gives back is what the ledger would have recorded. Written under a
    temporary name and renamed, so a half-written file never carries the batch's name. BatchError
    ``batch_check_unwritable`` when the folder cannot take it (a full disk, no permission)."""
    rows = prepared.rows
    packed = zlib.compress(json.dumps(rows, ensure_ascii=False, default=str).encode("utf-8"), COMPRESS_LEVEL)
    target = Path(folder) / f"{prepared.batch_id}{ROWS_SUFFIX}"
    partial = target.with_name(target.name + ".part")
    try:
        partial.write_bytes(packed)
        os.replace(partial, target)
    except OSError as exc:
        with contextlib.suppress(OSError):
            partial.unlink(missing_ok=True)
        raise BatchError(f"cannot keep the checked rows in {folder}: {exc.strerror or exc}",
                         code="batch_check_unwritable", batch_id=prepared.batch_id, path=str(folder)) from exc
    return ParkedBatch(
        batch_id=prepared.batch_id,
        template=prepared.template,
        sheet_name=prepared.sheet_name,
        columns=tuple(prepared.columns),
        sheet_hash=prepared.sheet_hash,
        batch_seed=prepared.batch_seed,
        user=prepared.user,
        images=prepared.images,
        rows_file=target,
        rows_sha256=hashlib.sha256(packed).hexdigest(),
        row_count=len(rows),
        runnable=prepared.runnable,
        resumed=prepared.resumed,
    )


__all__ = ["ParkedBatch", "park"]
