"""Serving files without ever leaving their folder."""

from __future__ import annotations

from pathlib import Path

from engine.errors import AccessDenied


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
