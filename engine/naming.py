"""Safe file names built from spreadsheet cells.

A cell is user data: it may hold ``../``, an absolute path, a Windows device name (``CON``), full-width
characters or two spellings of one name (``Cat``/``cat``) that collide on case-insensitive file systems and
inside zip files opened on Windows or macOS. Every name that reaches a disk or a zip goes through
:func:`safe_filename`.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Mapping
from typing import Any

from engine.sheets import column_key

__all__ = ["safe_filename", "fill_filename_pattern", "pattern_fields", "pattern_values", "row_digits",
           "PATTERN_BUILTINS"]

# Device names Windows refuses as a file name whatever the extension (``con.png`` is the console).
_WINDOWS_RESERVED = frozenset(
    {"CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$"}
    | {f"COM{i}" for i in range(1, 10)}
    | {f"LPT{i}" for i in range(1, 10)}
)
# Characters illegal on Windows, path separators, and every control character.
_ILLEGAL = re.compile(r'[<>:"/\\|?*\x00-\x1f\x7f-\x9f]')
_DOT_RUN = re.compile(r"\.{2,}")
_SPACE_RUN = re.compile(r"\s+")
_PATTERN_FIELD = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")

# Names a filename pattern may use besides the template's fields.
PATTERN_BUILTINS = ("row", "seed", "batch_id")

# Filesystems cap a name at 255 bytes; leave room for "_12345" and the suffix.
_MAX_STEM_BYTES = 150


def _truncate_utf8(text: str, max_bytes: int) -> str:
    encoded = text.encode("utf-8")
    if len(encoded) <= max_bytes:
        return text
    return encoded[:max_bytes].decode("utf-8", errors="ignore")


def _clean_stem(stem: str) -> str:
    """The cleaned stem. Cleaning a cleaned stem changes nothing: the batch names a file and its zip
    entry in two passes, and both must agree."""
    text = unicodedata.normalize("NFKC", str(stem))
    # Invisible format characters (bidi overrides, zero-width spaces) would let a name display as another
    # one ("photo\u202egnp.exe"): they are dropped.
    text = "".join(char for char in text if unicodedata.category(char) != "Cf")
    text = _ILLEGAL.sub("_", text)
    text = _SPACE_RUN.sub(" ", text)
    # Windows drops trailing dots and spaces (so "a." and "a" collide); a leading dot hides the file.
    text = text.strip(" .")
    text = _DOT_RUN.sub("_", text)  # ".." never survives, even between other characters
    text = _truncate_utf8(text, _MAX_STEM_BYTES).strip(" .")
    if not text:
        return "image"
    device, dot, rest = text.partition(".")
    if device.upper().rstrip(" ") in _WINDOWS_RESERVED:
        # "NUL.tar" is still the device on Windows: the part before the first dot must change
        text = f"{device.rstrip(' ')}_{dot}{rest}"
    return text


def safe_filename(stem: str, used: set[str], suffix: str = ".png") -> str:
    """A file name made from ``stem`` that is safe on every OS and unique within ``used``.

    No path parts, no ``..``, no Windows device names, NFKC-normalised, at most 150 bytes of stem. The
    original case is kept, but uniqueness is case-insensitive: ``Cat`` then ``cat`` give ``Cat.png`` and
    ``cat_2.png``. ``used`` holds the case-folded names already taken and is updated with the new one.
    """
    if suffix and not re.fullmatch(r"\.[A-Za-z0-9]{1,8}", suffix):
        raise ValueError(f"suffix must look like '.png', got {suffix!r}")
    base = _clean_stem(stem)
    candidate = f"{base}{suffix}"
    counter = 1
    while candidate.casefold() in used:
        counter += 1
        candidate = f"{base}_{counter}{suffix}"
    used.add(candidate.casefold())
    return candidate


def pattern_fields(pattern: str) -> list[str]:
    """The ``{name}`` placeholders of a filename pattern, in order."""
    return _PATTERN_FIELD.findall(pattern)


def row_digits(row_numbers: Iterable[int]) -> int:
    """How many digits ``{row}`` is written with in a batch of ``row_numbers``: those of the largest, so
    that a file browser and a zip list the files in row order (``row_00002`` ... ``row_10001``, not
    ``row_10``, ``row_100``, ``row_1000``, ``row_2``)."""
    return len(str(max(row_numbers, default=1)))


def pattern_values(
    row_values: Mapping[str, Any], row_number: int, batch_id: str, seed: int | None, digits: int = 0
) -> dict[str, Any]:
    """What a row's filename pattern is filled from: its cells plus ``row``, ``seed`` and ``batch_id``.

    The one source of these values for every place that names a row's image (the batch runner's files
    and the batch zip), so both give a row the same name. Cell names are folded with
    :func:`engine.sheets.column_key` (as fields are matched to columns), so ``{productName}`` finds a
    ``ProductName`` cell. The built-in names win over cells of the same name; a row without a seed yet
    fills ``{seed}`` with an empty string. ``digits``: the width ``row`` is zero-padded to (the batch's
    :func:`row_digits`); 0 leaves it unpadded, as batches recorded before names were padded keep it.
    """
    values: dict[str, Any] = {column_key(name): value for name, value in row_values.items()}
    values.update(row=f"{row_number:0{digits}d}" if digits else row_number, seed="" if seed is None else seed,
                  batch_id=batch_id)
    return values


_EMPTY = "\x00"  # stands for an empty field while its separator is removed (never in a cell: stripped)
_EMPTY_AFTER_SEPARATOR = re.compile("[_\\-.]\x00")
_EMPTY_BEFORE_SEPARATOR = re.compile("\x00[_\\-.]?")


def fill_filename_pattern(pattern: str, values: Mapping[str, Any]) -> str:
    """Fill ``{name}`` placeholders from ``values`` (looked up as written, case-folded, then as
    :func:`pattern_values` keys cells; a missing value becomes an empty string).

    Only plain ``{name}`` placeholders are replaced; unlike ``str.format`` there is no attribute or index
    access, so a pattern uploaded with a template cannot reach into objects. The result is a stem still
    to be made safe with :func:`safe_filename`.
    """

    def replace(match: re.Match[str]) -> str:
        name = match.group(1)
        value = values.get(name, values.get(name.casefold(), values.get(column_key(name))))
        return "" if value is None else str(value)

    # An empty field takes one neighbouring separator with it: "{product_name}_{color}" without a colour
    # gives "Jacket", not "Jacket_"; literal text of the pattern is left as written.
    filled = _PATTERN_FIELD.sub(lambda match: replace(match) or _EMPTY, pattern)
    filled = _EMPTY_AFTER_SEPARATOR.sub("", filled)
    return _EMPTY_BEFORE_SEPARATOR.sub("", filled)
