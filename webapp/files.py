"""Serving files without ever leaving their folder, and without letting a file act as a web page."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import quote

from engine.errors import AccessDenied

# Raster image types a browser shows without running anything. Everything else (an uploaded "photo" named
# .html, an SVG, a manifest) is sent as a download, never rendered on this origin.
INLINE_TYPES = {
    ".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp",
    ".gif": "image/gif", ".bmp": "image/bmp",
}


def resolve_inside(root: Path, *parts: str) -> Path:
    """``root/parts...`` as an existing file inside ``root``; AccessDenied for anything else.

    Refuses absolute parts, ``..``, drive letters, NUL bytes and symlinks that lead outside: the resolved
    path must stay under the resolved root.
    """
    base = Path(root).resolve()
    for part in parts:
        if part is None:
            continue
        if "\x00" in part or part.startswith(("/", "\\")) or (len(part) > 1 and part[1] == ":"):
            raise AccessDenied("path outside the allowed folder", status=403, reason="bad_path")
    candidate = base.joinpath(*[p for p in parts if p]).resolve()
    if candidate != base and base not in candidate.parents:
        raise AccessDenied("path outside the allowed folder", status=403, reason="bad_path")
    if not candidate.is_file():
        raise AccessDenied("no such file", status=404, reason="not_found")
    return candidate


def file_response(path: Path) -> Any:
    """``path`` as an HTTP answer: raster images inline, anything else as an attachment; never sniffed."""
    from fastapi.responses import FileResponse

    headers = {"X-Content-Type-Options": "nosniff"}
    media = INLINE_TYPES.get(path.suffix.lower())
    if media is not None:
        return FileResponse(path, media_type=media, filename=path.name, content_disposition_type="inline",
                            headers=headers)
    return FileResponse(path, media_type="application/octet-stream", filename=path.name,
                        content_disposition_type="attachment", headers=headers)


def file_url(outputs: Path | str, path: str | Path) -> str:
    """The ``/files/...`` URL of a file under the outputs folder."""
    relative = Path(path).resolve().relative_to(Path(outputs).resolve())
    return "/files/" + quote(relative.as_posix())


def zip_url(batch_id: str) -> str:
    """The ``/files/zip/...`` URL of a batch's zip (why ``zip`` is a reserved batch id)."""
    return f"/files/zip/{quote(batch_id)}"
