"""Whether the disks a batch writes can take its next images, and how long to wait while they cannot.

A full disk or an unwritable folder stops a batch (codes ``batch_output_unwritable``,
``batch_stopped_by_storage``, the ledger's ``ledger_unwritable``). Trying it again as soon as possible would
sample rows on the GPU only to fail writing them, so a run looks first (:func:`probe_folder`, run for the
output folder and the ledger's folder before any row is claimed): free bytes from ``os.statvfs`` against
room for a few images, and a tiny file written, synced and removed. What the probe finds is a
``batch_waiting_for_storage`` (too little space) or ``batch_storage_unwritable`` (the write failed) error.

While the problem lasts, the web app tries the batch again on :class:`RetrySchedule` (1, 2, 4 ... minutes,
at most 30), and sooner as soon as the probe that saw the problem no longer sees it.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Every error code that means "the disk, not the batch": a retry can only succeed once space or rights are back.
STORAGE_CODES = frozenset({
    "batch_output_unwritable", "batch_stopped_by_storage", "batch_waiting_for_storage", "batch_storage_unwritable",
    "ledger_unwritable",
})
# The codes of the probe itself: once it passes again, the problem it saw is gone.
PROBE_CODES = frozenset({"batch_output_unwritable", "batch_waiting_for_storage", "batch_storage_unwritable"})

IMAGES_OF_ROOM = 3  # a run starts only with room for this many of its images in the output folder
LEDGER_ROOM_BYTES = 256 * 1024  # SQLite's write-ahead log grows by a few pages per finished row
DEFAULT_IMAGE_BYTES = 1024 * 1024 * 3  # a 1024x1024 RGB image unencoded: PNG rarely makes one larger


@dataclass(frozen=True)
class StorageProblem:
    """What :func:`probe_folder` found: ``folder`` has ``free_bytes`` of the ``needed_bytes`` (None where the
    system cannot say), or a test write into it failed with ``error``."""

    folder: str
    free_bytes: int | None
    needed_bytes: int
    error: OSError | None = None

    @property
    def short_of_space(self) -> bool:
        return self.error is None or self.error.errno in (errno.ENOSPC, errno.EDQUOT)

    def describe(self) -> str:
        free = "unknown" if self.free_bytes is None else f"{self.free_bytes}"
        if self.error is not None:
            return (f"cannot write into {self.folder}: {self.error.strerror or self.error} "
                    f"({free} bytes free)")
        return f"{self.folder} has {free} bytes free, {self.needed_bytes} needed"


def free_bytes(path: str | os.PathLike[str]) -> int | None:
    """Bytes an unprivileged user may still write on the filesystem holding ``path`` (its nearest existing
    folder); None where the system does not say (no ``statvfs``)."""
    where = Path(os.path.abspath(path))
    while not where.exists() and where.parent != where:
        where = where.parent
    try:
        stats = os.statvfs(where)
    except (AttributeError, OSError):
        return None
    return stats.f_bavail * stats.f_frsize


def probe_folder(folder: str | os.PathLike[str], needed_bytes: int) -> StorageProblem | None:
    """None when ``folder`` (created if missing) has ``needed_bytes`` free and takes a write, else what is wrong.

    The test write is one byte, synced, in a hidden file removed at once: what a full disk (even with
    ``statvfs`` blocks left for root only), a read-only mount or a folder of another owner refuses."""
    folder = Path(folder)
    free = free_bytes(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(prefix=".storage-probe-", dir=folder)
        try:
            os.write(handle, b"\0")
            os.fsync(handle)
        finally:
            os.close(handle)
            os.unlink(name)
    except OSError as exc:
        return StorageProblem(str(folder), free, needed_bytes, exc)
    if free is not None and free < needed_bytes:
        return StorageProblem(str(folder), free, needed_bytes)
    return None


IMAGE_SIZE_SAMPLE = 20  # the finished images of a batch whose sizes say how large its next one is


def expected_image_bytes(latest_done: Iterable[Any], pending_sizes: Iterable[int]) -> int:
    """How large the next image of a batch is likely to be: the largest of its latest finished images
    (``latest_done``: rows done with an image, the last :data:`IMAGE_SIZE_SAMPLE`; a file gone since is
    passed over), else the largest of ``pending_sizes``, what its rows not done will write
    (:func:`row_image_bytes`; iterated only when no finished image is there), else a 1024x1024 image."""
    sizes = []
    for row in latest_done:
        try:
            sizes.append(os.path.getsize(row.image_path))
        except OSError:
            continue
    if sizes:
        return max(sizes)
    return max(pending_sizes, default=0) or DEFAULT_IMAGE_BYTES


def row_image_bytes(workflow: Any, row_values: dict[str, Any] | None) -> int:
    """What a row's image file will take, 0 where its workflow names no image size: width x height x 3 of
    its largest empty latent (an unencoded RGB image) and the text its PNG carries (the workflow as ComfyUI's
    ``prompt`` chunk and a client's extras such as the UI workflow, which ComfyUI's page sends at hundreds
    of KB, more than a small picture). Known when the row is recorded: the ledger keeps it per row."""
    pixels = max((w * h for w, h in _latent_sizes(workflow)), default=0)
    return 3 * pixels + _png_text_bytes(workflow, row_values) if pixels else 0


def _png_text_bytes(workflow: Any, row_values: dict[str, Any] | None) -> int:
    """The bytes of the text chunks a row's PNG will hold (as ``engine.nodes.image.png_bytes`` writes them:
    one JSON-encoded chunk per key, uncompressed as ComfyUI writes them)."""
    extra = (row_values or {}).get("png_extra")
    chunks = [workflow, *(extra.values() if isinstance(extra, dict) else ())]
    return sum(len(json.dumps(chunk).encode()) for chunk in chunks if chunk is not None)


def _latent_sizes(workflow: Any) -> list[tuple[int, int]]:
    found = []
    for node in (workflow or {}).values() if isinstance(workflow, dict) else ():
        inputs = node.get("inputs") if isinstance(node, dict) else None
        if isinstance(inputs, dict) and isinstance(inputs.get("width"), int) and isinstance(inputs.get("height"), int):
            batch = inputs.get("batch_size") if isinstance(inputs.get("batch_size"), int) else 1
            found.append((inputs["width"], inputs["height"] * max(1, batch)))
    return found


def is_storage_problem(exc: BaseException) -> bool:
    """Whether ``exc`` is a library error that a full or unwritable disk caused (see :data:`STORAGE_CODES`)."""
    return getattr(exc, "code", None) in STORAGE_CODES


def storage_folder(exc: BaseException) -> str | None:
    """The folder a storage error is about: its ``folder``, else the folder of its file ``path``."""
    details = getattr(exc, "details", None) or {}
    if details.get("folder"):
        return str(details["folder"])
    path = details.get("path")
    if not path:
        return None
    path = Path(os.path.abspath(path))
    return str(path if path.is_dir() else path.parent)


@dataclass(frozen=True)
class RetrySchedule:
    """How long to wait before trying a batch again after its ``failures``-th storage failure in a row:
    ``first_s``, doubled each time, at most ``cap_s`` (1, 2, 4, 8, 16, 30, 30 ... minutes by default)."""

    first_s: float = 60.0
    cap_s: float = 1800.0

    def delay_s(self, failures: int) -> float:
        doublings = min(max(0, failures - 1), 32)  # 2**32 minutes is past any cap: no float overflow
        return min(self.cap_s, self.first_s * 2 ** doublings)


__all__ = [
    "DEFAULT_IMAGE_BYTES",
    "IMAGES_OF_ROOM",
    "IMAGE_SIZE_SAMPLE",
    "LEDGER_ROOM_BYTES",
    "PROBE_CODES",
    "STORAGE_CODES",
    "RetrySchedule",
    "StorageProblem",
    "expected_image_bytes",
    "free_bytes",
    "is_storage_problem",
    "probe_folder",
    "row_image_bytes",
    "storage_folder",
]
