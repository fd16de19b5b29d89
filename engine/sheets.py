"""Spreadsheets (CSV, XLSX) → rows of text cells → typed values with per-row problems.

Every cell is read as text, then converted by the template's field schema (:func:`coerce_cell`), so a seed
never passes through a float and ``12345.0`` from Excel is still the integer 12345. An XLSX cell reads as
Excel shows it, in its number format (an EAN ``0012345678905``, a price ``19.90``, ``75%``:
:mod:`engine.number_formats`); where that differs from the number stored, number fields read the stored
number (:attr:`SheetRow.numbers`) and a note on the sheet says so. Row numbers are the
spreadsheet's own: the header is row 1, the first data row is row 2, blank rows keep their numbers (an XLSX
title merged across the columns above the header is skipped with a note; the header is then the row below).

Reading refuses, with a message that says what to do: files over the size limit, XLSX zip bombs
(decompressed size and ratio checked on the zip members before parsing), XML with entity declarations
(billion laughs), files whose extension lies about their content, legacy ``.xls``, too many rows or
columns, duplicate column names. Cell-level trouble (a formula without a cached value, a huge cell, a
number Excel could not keep exactly) is a :class:`RowProblem` on that row, not a refusal of the file.
"""

from __future__ import annotations

import bisect
import csv
import datetime as _dt
import hashlib
import io
import json
import math
import re
import unicodedata
import zipfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from decimal import Decimal, InvalidOperation, Overflow
from functools import lru_cache
from itertools import compress, repeat
from operator import is_not
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from engine.errors import SheetError
from engine.number_formats import CellFormat, compile_format, format_cell, is_system_date_format
from engine.worksheet_xml import FormulaCells, MergedRange, formula_cells_of, merged_ranges

if TYPE_CHECKING:
    from engine.image_refs import ImageLibrary
    from engine.templates import TemplateField, WorkflowTemplate

__all__ = [
    "SheetLimits",
    "RowProblem",
    "SheetRow",
    "Sheet",
    "TitleAboveHeader",
    "RowReport",
    "ValidationReport",
    "read_sheet",
    "sheet_from_records",
    "cell_text",
    "decode_text",
    "decimal_comma_number",
    "CellValueError",
    "PROBLEM_CODES",
    "validate_rows",
    "derive_seed",
    "coerce_cell",
    "parse_integer",
    "parse_bool",
    "choice_key",
    "column_key",
    "SEED_MAX",
    "BOOL_WORDS",
]

SEED_MAX = 2**64 - 1

TRUE_WORDS = ("true", "yes", "y", "1", "是", "t", "on")
FALSE_WORDS = ("false", "no", "n", "0", "否", "f", "off")
BOOL_WORDS = TRUE_WORDS + FALSE_WORDS

CSV_DELIMITERS = (",", ";", "\t", "|")
CSV_EXTENSIONS = (".csv", ".tsv", ".txt")
XLSX_EXTENSIONS = (".xlsx", ".xlsm")

# Control characters other than tab and newline: invisible, and some break JSON consumers or terminals.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
# Characters Excel and web forms leave around header names (BOM, no-break and zero-width spaces).
_HEADER_JUNK = "\ufeff\u200b\u200c\u200d\u2060\u00a0 \t\r\n"
_XML_DECLS = (b"<!doctype", b"<!entity")
# A cell that reads as a number (a column name never does). Written so that each character has one place in
# the pattern: "[\d.,]*\d[\d.,]*" tried every split of a long run of digits, minutes for a 30,000-digit name.
_NUMBER_LIKE = re.compile(r"[+-]?[.,]*\d[\d.,]*%?")
_EXCEL_ERRORS = frozenset({"#NULL!", "#DIV/0!", "#VALUE!", "#REF!", "#NAME?", "#NUM!", "#N/A", "#GETTING_DATA"})


@dataclass(frozen=True)
class SheetLimits:
    """Bounds on what a spreadsheet may be. Over a bound the file is refused before it is parsed."""

    max_file_bytes: int = 50 * 1024 * 1024
    max_rows: int = 10_000  # data rows, blank rows not counted
    max_columns: int = 200
    max_cell_chars: int = 10_000
    max_decompressed_bytes: int = 300 * 1024 * 1024  # sum over the XLSX zip members
    max_compression_ratio: int = 200  # per member, checked once the member is over 1 MiB
    max_zip_members: int = 5_000


@dataclass(frozen=True)
class RowProblem:
    """One problem with one cell (``column``) or one row (``column`` None) of the spreadsheet."""

    row: int
    column: str | None
    reason: str
    # What went wrong as a stable code and its values (``not_whole_number``, {"value": "abc"}), so a page
    # or an API client can say it in the user's language: one of PROBLEM_CODES for the cell checks, or
    # ``workflow_invalid`` ({"problems": [NodeProblem as a dict, ...]}) for a row whose rendered workflow
    # fails the graph check, a code of engine.errors.ERROR_CODES with its details for a row whose workflow
    # could not be rendered (``template_value_missing``); None for the rest.
    code: str | None = None
    params: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        where = f"row {self.row}" + (f", column '{self.column}'" if self.column else "")
        return f"{where}: {self.reason}"


@dataclass
class SheetRow:
    number: int  # the spreadsheet's own row number (header = 1)
    cells: dict[str, str]  # sheet column name -> cell text, as the spreadsheet shows it
    # XLSX: the stored number of each cell that shows it otherwise (0.75 shown as 75%, 42 as 00042), by column
    # name: what number fields read, where text fields read the shown text
    numbers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class TitleAboveHeader:
    """A title typed above the column names: the row read as the column names holds only ``title``, and the
    row below it holds what may be the real names (see :func:`validate_rows`)."""

    title_row: int
    title: str
    names_row: int
    names: tuple[str, ...]


@dataclass
class Sheet:
    columns: list[str]
    rows: list[SheetRow]
    problems: list[RowProblem] = field(default_factory=list)
    filename: str = ""
    format: str = ""  # "csv" | "xlsx"
    sheet_name: str | None = None  # XLSX: the worksheet read
    sheet_names: list[str] = field(default_factory=list)  # XLSX: every worksheet
    encoding: str | None = None  # CSV
    delimiter: str | None = None  # CSV
    # CSV: numbers are written 7,5 and 1.024 (German, French, Dutch... Excel); number fields read them so
    decimal_comma: bool = False
    # a row that may be a title above the column names (one name only, names in the row below)
    title_above_header: TitleAboveHeader | None = None

    @property
    def content_hash(self) -> str:
        """sha256 of the columns and cells: the same data re-saved by Excel hashes the same."""
        canonical = json.dumps(
            {"columns": self.columns, "rows": [[r.number, r.cells, *([r.numbers] if r.numbers else [])]
                                              for r in self.rows]},
            ensure_ascii=False,
            sort_keys=True,
            separators=(",", ":"),
        )
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    def problems_for(self, row_number: int) -> list[RowProblem]:
        return [p for p in self.problems if p.row == row_number]

    @property
    def notes(self) -> list[str]:
        """What was found about the sheet as a whole (row 1 is the header): encoding, unnamed columns."""
        return [p.reason for p in self.problems_for(1)]


@dataclass
class RowReport:
    number: int
    ok: bool
    problems: list[RowProblem]
    values: dict[str, Any]  # typed values by field name (only fields the row sets, plus declared defaults)
    cells: dict[str, str]  # the row's original cells, by sheet column name


@dataclass
class ValidationReport:
    rows: list[RowReport]
    missing_columns: list[str]  # required template fields no column provides
    unknown_columns: list[str]  # sheet columns no template field uses (ignored)
    column_map: dict[str, str] = field(default_factory=dict)  # field name -> sheet column name
    notes: list[str] = field(default_factory=list)  # about the sheet as a whole (encoding, unnamed columns)
    # set where the missing columns are named in the row below a title: the column names must be in row 1
    title_above_header: TitleAboveHeader | None = None

    @property
    def ok(self) -> bool:
        return not self.missing_columns and all(r.ok for r in self.rows)

    @property
    def ok_rows(self) -> list[RowReport]:
        return [r for r in self.rows if r.ok]

    @property
    def bad_rows(self) -> list[RowReport]:
        return [r for r in self.rows if not r.ok]

    @property
    def problems(self) -> list[RowProblem]:
        return [p for r in self.rows for p in r.problems]

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "missing_columns": self.missing_columns,
            "unknown_columns": self.unknown_columns,
            "column_map": self.column_map,
            "notes": self.notes,
            "rows": [
                {"row": r.number, "ok": r.ok, "problems": [asdict(p) for p in r.problems], "values": r.values}
                for r in self.rows
            ],
        }


# --------------------------------------------------------------------------------------------------
# Reading


def read_sheet(
    source: str | Path | bytes | IO[bytes],
    filename: str | None = None,
    sheet_name: str | None = None,
    limits: SheetLimits | None = None,
) -> Sheet:
    """Read a CSV or XLSX spreadsheet into text cells.

    ``source`` is a path, the file's bytes or a binary file object; ``filename`` (defaults to the path's
    name) is only used to cross-check the extension against the content. ``sheet_name`` picks an XLSX
    worksheet (default: the first). Raises :class:`SheetError` when the file cannot be read at all.
    """
    limits = limits or SheetLimits()
    data, filename = _read_bytes(source, filename, limits)
    _refuse_zip_of_too_many_parts(data, limits)
    kind = _sniff_kind(data)
    ext = Path(filename).suffix.lower() if filename else ""
    _check_extension(kind, ext, filename)
    if kind == "xlsx":
        sheet = _read_xlsx(data, sheet_name, limits)
    else:
        if sheet_name is not None:
            raise SheetError(f"'{filename or 'the file'}' is a CSV file; it has no worksheet '{sheet_name}'",
                             code="sheet_csv_has_no_worksheets", file=filename or "", sheet=sheet_name)
        sheet = _read_csv(data, limits)
    sheet.filename = filename or ""
    return sheet


def _read_bytes(source: Any, filename: str | None, limits: SheetLimits) -> tuple[bytes, str]:
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    elif isinstance(source, (str, Path)):
        path = Path(source)
        filename = filename or path.name
        try:
            size = path.stat().st_size
            if size > limits.max_file_bytes:
                raise _too_big(size, limits)
            data = path.read_bytes()
        except OSError as exc:  # missing, a folder, not readable
            raise SheetError(f"cannot open spreadsheet '{path}': {exc.strerror or exc}") from exc
    else:
        data = source.read(limits.max_file_bytes + 1)
    if len(data) > limits.max_file_bytes:
        raise _too_big(len(data), limits)
    if not data.strip():
        raise SheetError(f"'{filename or 'the spreadsheet'}' is empty", code="sheet_empty",
                         file=filename or "")
    return data, filename or ""


def _too_big(size: int, limits: SheetLimits) -> SheetError:
    size_mib, limit_mib = f"{size / 1048576:.1f}", f"{limits.max_file_bytes / 1048576:.0f}"
    return SheetError(
        f"the spreadsheet is {size_mib} MiB; the limit is {limit_mib} MiB",
        code="sheet_too_large",
        size=size,
        limit=limits.max_file_bytes,
        size_mib=size_mib,
        limit_mib=limit_mib,
    )


def _refuse_zip_of_too_many_parts(data: bytes, limits: SheetLimits) -> None:
    """Refuse a zip whose end record declares more parts than a workbook may have, before anything lists
    them: listing 300,000 tiny parts takes seconds, and each kind check would do it again."""
    if data[:2] != b"PK":
        return
    end = data.rfind(b"PK\x05\x06", max(0, len(data) - 65_557))  # the end record, after a comment of <64 KiB
    if end < 0 or end + 22 > len(data):
        return  # no end record: the zip reader says what is wrong
    count = int.from_bytes(data[end + 10:end + 12], "little")
    if limits.max_zip_members < count < 0xFFFF:  # 0xFFFF: a ZIP64 count, for the zip reader to find
        raise SheetError(f"the workbook has {count} parts; the limit is {limits.max_zip_members}",
                         code="workbook_too_many_parts", count=count, limit=limits.max_zip_members)


def _sniff_kind(data: bytes) -> str:
    if data[:4] == b"PK\x03\x04" or data[:4] == b"PK\x05\x06":
        return _zip_kind(data)
    if data[:8] == b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1":
        # An OLE compound file is an old .xls, or a password-protected .xlsx: Excel encrypts the workbook
        # into a stream of that name inside one.
        return "encrypted" if "EncryptedPackage".encode("utf-16-le") in data else "xls"
    head = data[:8192]
    if head[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return "csv"  # UTF-16 text (Excel's "Unicode Text" export)
    if head.count(b"\x00") > len(head) // 20:  # a stray NUL is a control character; many mean binary
        return "binary"
    return "csv"


def _zip_kind(data: bytes) -> str:
    """Which spreadsheet a zip archive is: "xlsx" (or damaged, for the XLSX reader to say), "ods" for
    LibreOffice's OpenDocument, "numbers" for Apple Numbers."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            names = archive.namelist()
            if "mimetype" in names:
                # 64 bytes, not the whole member: the zip-bomb checks come later, and a member compressed
                # a thousandfold would be unpacked whole into memory here
                with archive.open("mimetype") as member:
                    if member.read(64).startswith(b"application/vnd.oasis.opendocument"):
                        return "ods"
    except (zipfile.BadZipFile, OSError, ValueError, KeyError, RuntimeError):
        return "xlsx"
    if any(n.startswith("Index/") and n.endswith(".iwa") for n in names) or "Index.zip" in names:
        return "numbers"
    return "xlsx"


def _check_extension(kind: str, ext: str, filename: str | None) -> None:
    name = f"'{filename}'" if filename else "the file"
    if kind == "encrypted":
        raise SheetError(
            f"{name} is protected with a password (encrypted), so it cannot be read; in Excel remove the password "
            "(File > Info > Protect Workbook > Encrypt with Password), save it and upload it again "
            "(read here: .csv, and .xlsx without a password)",
            code="sheet_password_protected", file=filename or "",
        )
    if kind == "ods":
        raise SheetError(
            f"{name} is an OpenDocument spreadsheet (.ods, LibreOffice or OpenOffice); save it from Calc as "
            "Excel 2007-365 (.xlsx) or Text CSV (.csv): those are the formats read here",
            code="sheet_opendocument", file=filename or "",
        )
    if kind == "numbers":
        raise SheetError(
            f"{name} is an Apple Numbers document; in Numbers choose File > Export To > Excel (.xlsx) or CSV: "
            "those are the formats read here", code="sheet_apple_numbers", file=filename or "",
        )
    if kind == "xls":
        raise SheetError(
            f"{name} is an old Excel 97-2003 workbook (.xls); save it as .xlsx (Excel Workbook) or CSV",
            code="sheet_old_excel", file=filename or "",
        )
    if kind == "binary":
        raise SheetError(f"{name} is neither CSV text nor an XLSX workbook; supported: .csv, .xlsx",
                         code="sheet_not_a_spreadsheet", file=filename or "")
    if not ext:
        return
    if ext in XLSX_EXTENSIONS and kind == "csv":
        raise SheetError(
            f"{name} is named {ext} but holds CSV text, not an Excel workbook; rename it to .csv "
            "or save it from Excel as Excel Workbook (.xlsx)",
            code="sheet_xlsx_holds_csv", file=filename or "", extension=ext,
        )
    if ext in CSV_EXTENSIONS and kind == "xlsx":
        raise SheetError(
            f"{name} is named {ext} but is a zip archive (an Excel workbook?), not CSV text; "
            "rename it to .xlsx or export it from Excel as CSV UTF-8",
            code="sheet_csv_holds_zip", file=filename or "", extension=ext,
        )
    if ext not in XLSX_EXTENSIONS + CSV_EXTENSIONS:
        raise SheetError(f"{name}: unsupported file type '{ext}'; supported: .csv, .tsv, .txt, .xlsx, .xlsm",
                         code="sheet_type_unsupported", file=filename or "", extension=ext)


# CSV -----------------------------------------------------------------------------------------------


def decode_text(data: bytes) -> tuple[str, str]:
    """(text, encoding) of a text file from a spreadsheet user: UTF-8 with or without BOM, UTF-16 with its
    mark, else the code page a desktop Excel saves "CSV" in: GB18030/GBK (Chinese Windows), Windows-1252
    (Western European Windows) or MacRoman (Excel for Mac), whichever reads as text (see
    :func:`_misread_score`); SheetError when none does."""
    if data.startswith(b"\xef\xbb\xbf"):
        return data[3:].decode("utf-8", errors="strict"), "utf-8-sig"
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        try:
            return data.decode("utf-16"), "utf-16"
        except UnicodeDecodeError as exc:
            raise SheetError(f"the file starts with a UTF-16 mark but is not valid UTF-16: {exc}",
                             code="sheet_utf16_invalid") from exc
    try:
        return data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        pass
    readings = []
    for order, encoding in enumerate(LEGACY_ENCODINGS):  # ties keep this order: Chinese Excel first, as before
        try:
            text = data.decode(encoding)
        except UnicodeDecodeError:
            continue
        readings.append((*_misread_score(text), order, text, encoding))
    readings.sort()
    # MacRoman reads any bytes: text whose best reading still misreads most of its non-ASCII characters is
    # in none of these code pages (or is no text at all).
    if readings and readings[0][0] * 2 > readings[0][1]:
        readings = []
    if not readings:
        raise SheetError(
            "cannot decode the CSV file as UTF-8, GB18030/GBK, Windows-1252 or MacRoman; save it as "
            "'CSV UTF-8' from Excel", code="sheet_encoding_unknown",
        )
    *_, text, encoding = readings[0]
    return text, encoding


# The code pages desktop spreadsheets save "CSV" in, by the name Python knows them, and as users know them.
LEGACY_ENCODINGS = ("gb18030", "cp1252", "mac_roman")
ENCODING_NAMES = {"gb18030": "GB18030/GBK (Chinese)", "cp1252": "Windows-1252 (Western European)",
                  "mac_roman": "MacRoman (Excel for Mac)"}
# Non-letters that Western text holds anywhere, and those that also sit inside a word (l’été, Meier-Müller).
_COMMON_SYMBOLS = frozenset("€£¥¢©®°±×÷™§¶µ·•…–—‘’‚“”„«»‹›¿¡¼½¾²³¹ªº†‡‰\u00a0")
_INSIDE_WORD = frozenset("’'·")
_OPENING_QUOTES = frozenset("‘“„‚«‹")
_NON_ASCII = re.compile(r"[^\x00-\x7f]")
# The non-ASCII characters the code pages are judged by: the first ones of the file tell its code page as
# well as all of them, and judging 20 MB of accented text character by character took half a minute.
MISREAD_SAMPLE_CHARS = 50_000


def _misread_score(text: str) -> tuple[int, int]:
    """How many characters of ``text`` betray bytes read in the wrong code page (0 for plausible text), and
    how many non-ASCII characters were judged: the first :data:`MISREAD_SAMPLE_CHARS` of them.

    A one-byte letter read as GBK swallows the next byte into an ideograph wedged inside a Latin word
    ("Müller" reads "M黮ler"); a MacRoman letter read as Windows-1252 is an uppercase or a symbol inside a
    word ("Café" reads "CafŽ", "Straße" "Stra§e"), and the other way round alike. Real Chinese text has
    ideographs next to each other or next to spaces and punctuation; real Western text has lowercase
    accented letters inside words.
    """
    score = judged = 0
    for found in _NON_ASCII.finditer(text):
        if judged == MISREAD_SAMPLE_CHARS:
            break
        judged += 1
        index, ch = found.start(), found.group()
        before = text[index - 1] if index else " "
        after = text[index + 1] if index + 1 < len(text) else " "
        inside_latin_word = before.isascii() and before.isalpha() and after.isascii() and after.isalpha()
        if _is_cjk(ch):
            try:
                ch.encode("gb2312")  # simplified Chinese text lies almost wholly in GB2312
            except UnicodeEncodeError:
                score += 1
            score += inside_latin_word
        elif ch.isalpha():
            if ch == before:
                score += 1  # no Western word doubles an accented letter ("ÿÿ" is bytes, not text)
            elif not unicodedata.name(ch, "").startswith("LATIN"):
                score += not _is_cjk(before) and not _is_cjk(after)  # Greek or Cyrillic in Western text
            elif ch.isupper() and before.isalpha() and (before.islower() or after.islower()):
                score += 1  # an uppercase letter inside a lowercase word
        elif ch in _COMMON_SYMBOLS:
            if before.isalpha() and after.isalpha():
                score += ch not in _INSIDE_WORD
            elif ch in _OPENING_QUOTES:
                score += before.isalpha()  # a quote that opens right after a word
            else:
                score += ord(before) >= 0x80 and not before.isalpha() and not before.isspace()  # symbols in a row
        else:
            score += 1
    return score, judged


def _sniff_delimiter(text: str) -> str:
    """The candidate delimiter found most often in the header line (outside quotes); ',' when none is."""
    header = []
    in_quotes = False
    for char in text[:65536]:
        if char == '"':
            in_quotes = not in_quotes
        elif char in "\r\n" and not in_quotes:
            break
        elif not in_quotes:
            header.append(char)
    counts = {d: header.count(d) for d in CSV_DELIMITERS}
    best = max(CSV_DELIMITERS, key=lambda d: counts[d])  # ties keep the order above
    return best if counts[best] else ","


def sheet_from_records(
    records: list[Mapping[str, Any]], filename: str = "rows.json", limits: SheetLimits | None = None,
    first_row: int = 2,
) -> Sheet:
    """Rows given as objects (the JSON API, a form) read exactly as an uploaded CSV is: the same cleaning,
    column checks and limits, cells as text. The first object is row ``first_row`` (a spreadsheet's row 2,
    row 1 being the header)."""
    if not isinstance(records, list) or not records or not all(isinstance(r, Mapping) for r in records):
        raise SheetError("'rows' must be a non-empty list of objects (one per image)")
    limits = limits or SheetLimits()
    if len(records) > limits.max_rows:
        raise SheetError(f"{len(records)} rows; the limit is {limits.max_rows}: split them into smaller batches",
                         code="sheet_too_many_rows", limit=limits.max_rows)
    columns: list[str] = []
    for record in records:
        for key in record:
            if str(key) not in columns:
                columns.append(str(key))
    if len(columns) > limits.max_columns:
        raise SheetError(f"the rows have {len(columns)} columns; the limit is {limits.max_columns}",
                         code="sheet_too_many_columns", count=len(columns), limit=limits.max_columns)
    _refuse_duplicate_columns([(column, f"'{column}'") for column in columns])
    rows: list[SheetRow] = []
    problems: list[RowProblem] = []
    for number, record in enumerate(records, start=first_row):
        cells: dict[str, str] = {}
        for key, value in record.items():
            if isinstance(value, float) and abs(value) >= 2**53:  # JSON parsed it as a double: digits lost
                problems.append(RowProblem(
                    number, str(key), f"{value!r} is a number past 2^53, which JSON readers keep only "
                    "approximately; send it as a string or an integer without a decimal point",
                    "inexact_number", {"value": repr(value)},
                ))
            if isinstance(value, (Mapping, list)):  # a cell holds one value; str() would write Python's repr
                kind = "object" if isinstance(value, Mapping) else "array"
                problems.append(RowProblem(
                    number, str(key), f"a JSON {kind} where a cell's value belongs; send text, a number, "
                    "true/false or null", "not_a_cell_value", {"type": kind},
                ))
                value = json.dumps(value, ensure_ascii=False, default=str)
            cells[str(key)] = _within_cell_limit(_clean_cell(cell_text(value)), number, str(key), limits, problems)
        rows.append(SheetRow(number, cells))
    return Sheet(columns=columns, rows=rows, problems=problems, filename=filename, format="json")


def cell_text(value: Any) -> str:
    """A form or JSON value as the text a spreadsheet cell would hold (``True`` -> ``"true"``, ``None`` -> ``""``)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))  # a Number widget gives 42.0 for an integer field
    return str(value)


def _read_csv(data: bytes, limits: SheetLimits) -> Sheet:
    text, encoding = decode_text(data)
    # "sep=;" on the first line is how Excel is told a CSV's delimiter; Excel reads it and shows no such
    # row, so the column names are on the next line and that line is row 1.
    declared = re.match(r"sep=([^\r\n])[ \t]*(\r\n|\r|\n|$)", text)
    if declared:
        text = text[declared.end():]
        delimiter = declared.group(1)
    else:
        delimiter = _sniff_delimiter(text)
    # A cell as long as the file is read whole, so the per-cell limit below makes it a problem of its row,
    # as in an XLSX, instead of the csv module refusing the whole sheet (its default limit is 128 KiB).
    # The setting is process-wide; it only ever grows, up to the largest sheet accepted.
    if len(text) >= csv.field_size_limit():
        csv.field_size_limit(len(text) + 1)
    # strict: an unclosed quote is an error, not a cell that silently swallows every row after it
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    records: list[tuple[int, list[Any]]] = []
    nonblank = number = 0
    try:
        for number, record in enumerate(reader, start=1):
            if not any(cell.strip() for cell in record):
                continue
            records.append((number, [_without_formula_guard(cell) for cell in record]))
            nonblank += 1
            if nonblank > limits.max_rows + 1:
                break  # enough to refuse the sheet; do not read the rest
    except csv.Error as exc:
        raise SheetError(
            f"row {number + 1}: the CSV cannot be parsed ({exc}); check that row for an unclosed quote or "
            "text after a closing quote",
            row=number + 1, code="sheet_csv_unparsable",
        ) from exc
    sheet = _build_sheet(records, limits)
    sheet.format, sheet.encoding, sheet.delimiter = "csv", encoding, delimiter
    notes = []
    if encoding in ("cp1252", "mac_roman"):
        sample = next((line for line in text.splitlines() if any(ord(ch) > 0x7F for ch in line)), "")[:60]
        notes.append(RowProblem(
            1, None, f"the file is not UTF-8; it was read as {ENCODING_NAMES[encoding]} text (e.g. '{sample}'); "
            "if letters look wrong, save it as 'CSV UTF-8' and upload that",
            "read_as_code_page", {"encoding": ENCODING_NAMES[encoding], "sample": sample}))
    # Excel separates with ';' exactly where the decimal mark is a comma; a file whose numbers show a decimal
    # point (7.25) beyond doubt is not such a file, whatever its separator, and one with both is left as is.
    marks = _decimal_marks(sheet)
    sheet.decimal_comma = "." not in marks and (delimiter == ";" or "," in marks)
    if sheet.decimal_comma and (example := _decimal_comma_example(sheet)) is not None:
        row, column, written, value = example
        because = ("the file uses ';' separators, as Excel does where the decimal mark is a comma"
                   if delimiter == ";" else "its numbers are written with decimal commas")
        notes.append(RowProblem(
            1, None, f"number columns are read with a decimal comma because {because}: '{written}' (row {row}, "
            f"column '{column}') is read as {value}; points group thousands ('1.024' is 1024)",
            "read_decimal_comma", {"row": row, "column": column, "written": written, "value": value}))
    sheet.problems[:0] = notes
    if encoding == "utf-8" and (sample := _looks_like_gb18030(data, text)) is not None:
        sheet.problems.insert(0, RowProblem(
            1, None, "the file was read as UTF-8, but its text reads as Chinese in GB18030/GBK (e.g. "
            f"'{sample}'); if it was saved by Chinese Excel, save it again as 'CSV UTF-8' and upload that",
            "looks_like_gb18030", {"sample": sample}))
    return sheet


# How a decimal-comma locale (German, French, Dutch... Excel) writes numbers: 7,5 / -0,25 / 1,5E+3, and
# thousands grouped by points or spaces: 1.024 / 1.234.567,5 / 1 024,5 (French Excel uses no-break spaces).
_GROUPED_BY_POINTS = re.compile(r"[+-]?\d{1,3}(?:\.\d{3})+(?:,\d*)?")
_COMMA_DECIMAL = re.compile(r"[+-]?\d*,\d+(?:[eE][+-]?\d+)?")
_NUMBER_SPACES = re.compile(r"[ \u00a0\u202f\u2009]")
# Which decimal mark a number shows beyond doubt: one that is no thousands group (7,5 or 7.25, not 1,024)
# or one after thousands groups of the other mark (1.234,5 or 1,234.5).
_SURELY_COMMA = re.compile(r"[+-]?(?:\d+,(?:\d{1,2}|\d{4,})|\d{1,3}(?:\.\d{3})+,\d+)")
_SURELY_POINT = re.compile(r"[+-]?(?:\d+\.(?:\d{1,2}|\d{4,})|\d{1,3}(?:,\d{3})+\.\d+)")


def decimal_comma_number(text: str) -> str:
    """A number cell written with a decimal comma, as ``Decimal`` reads numbers: ``7,5`` -> ``7.5``,
    ``1.234,5`` -> ``1234.5``, ``1 024`` -> ``1024``. Other text comes back without its spaces (``7.5``
    stays ``7.5``: thousands groups always have three digits), to be refused or read as it is."""
    compact = _NUMBER_SPACES.sub("", text.strip())
    if _GROUPED_BY_POINTS.fullmatch(compact):
        return compact.replace(".", "").replace(",", ".")
    if _COMMA_DECIMAL.fullmatch(compact):
        return compact.replace(",", ".")
    return compact


def _decimal_marks(sheet: Sheet) -> set[str]:
    """The decimal marks (``,`` ``.``) that some number of the sheet shows beyond doubt."""
    marks = set()
    for row in sheet.rows:
        for text in row.cells.values():
            compact = _NUMBER_SPACES.sub("", text.strip())
            if _SURELY_COMMA.fullmatch(compact):
                marks.add(",")
            elif _SURELY_POINT.fullmatch(compact):
                marks.add(".")
    return marks


def _decimal_comma_example(sheet: Sheet) -> tuple[int, str, str, str] | None:
    """(row, column, cell, number read) of the first cell a decimal comma changes, preferring a column
    whose every cell is a number (a number field's column, not a text that happens to read as one)."""
    def number_like(text: str) -> bool:
        return bool(re.fullmatch(r"[+-]?[\d.,]*\d(?:[eE][+-]?\d+)?", _NUMBER_SPACES.sub("", text.strip())))

    def changed(text: str) -> bool:
        return number_like(text) and decimal_comma_number(text) != _NUMBER_SPACES.sub("", text.strip())

    numeric_columns = [c for c in sheet.columns if all(number_like(r.cells[c]) for r in sheet.rows if r.cells[c].strip())]
    for columns in (numeric_columns, sheet.columns):
        for row in sheet.rows:
            for column in columns:
                text = row.cells.get(column, "")
                if changed(text):
                    try:
                        value = Decimal(decimal_comma_number(text))
                    except InvalidOperation:
                        continue
                    return row.number, column, text.strip(), f"{value:f}"
    return None


# A leading apostrophe is how exported CSVs (our manifests and failed_rows.csv) keep a cell starting with one
# of these from being run as a formula; reading such a file back takes the apostrophe off again.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _without_formula_guard(cell: str) -> str:
    return cell[1:] if cell.startswith("'") and cell[1:].startswith(FORMULA_STARTS) else cell


def _looks_like_gb18030(data: bytes, text: str) -> str | None:
    """A sample of the text read as GB18030 when UTF-8 text looks like Chinese GB18030/GBK bytes that happen
    to be valid UTF-8 (for a note on the sheet), else None.

    Short GBK text can decode as UTF-8 into a jumble of letters from unrelated scripts ("一只猫" reads as
    "һֻè"): no Chinese in the UTF-8 reading, several scripts mixed, and only Chinese in the GB18030 one.
    Real UTF-8 text in one European script (French, Russian) does not trigger it.
    """
    foreign = {ch for ch in text if ord(ch) > 0x7F}
    if not foreign or any(_is_cjk(ch) for ch in foreign):
        return None
    # Letters only: typographic quotes, × or € belong to no script and mix with any
    scripts = {unicodedata.name(ch, "?").split(" ")[0] for ch in foreign if unicodedata.category(ch).startswith("L")}
    if len(scripts) < 2:
        return None
    try:
        other = data.decode("gb18030")
    except UnicodeDecodeError:
        return None
    chinese = [ch for ch in other if ord(ch) > 0x7F]
    if not chinese or not all(_is_cjk(ch) for ch in chinese):
        return None
    return next((line for line in other.splitlines() if any(ord(ch) > 0x7F for ch in line)), "")[:60]


def _is_cjk(ch: str) -> bool:
    code = ord(ch)
    return (0x4E00 <= code <= 0x9FFF or 0x3400 <= code <= 0x4DBF or 0x3000 <= code <= 0x303F
            or 0xFF00 <= code <= 0xFFEF or 0x20000 <= code <= 0x2FFFF)


# XLSX ----------------------------------------------------------------------------------------------


def _check_zip(data: bytes, limits: SheetLimits) -> tuple[zipfile.ZipFile, set[str]]:
    """Refuse zip bombs and XML entity declarations before openpyxl parses anything.

    Returns the archive and the names of worksheet members that contain formulas.
    """
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        members = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise SheetError(f"the workbook is not a valid zip archive (damaged or not .xlsx): {exc}",
                         code="workbook_damaged") from exc
    if len(members) > limits.max_zip_members:
        raise SheetError(f"the workbook has {len(members)} parts; the limit is {limits.max_zip_members}",
                         code="workbook_too_many_parts", count=len(members), limit=limits.max_zip_members)
    names = {m.filename for m in members}
    if not any(name.startswith("xl/") for name in names):
        raise SheetError("the file is a zip archive but not an Excel workbook (no xl/workbook.xml); "
                         "supported: .csv, .xlsx (Excel Workbook)", code="workbook_not_excel")
    declared = sum(m.file_size for m in members)
    if declared > limits.max_decompressed_bytes:
        raise SheetError(
            f"the workbook unpacks to {declared / 1048576:.0f} MiB; the limit is "
            f"{limits.max_decompressed_bytes / 1048576:.0f} MiB (possible zip bomb)",
            decompressed=declared, code="workbook_unpacks_too_large",
            limit_mib=f"{limits.max_decompressed_bytes / 1048576:.0f}",
        )
    for m in members:
        ratio = m.file_size / max(m.compress_size, 1)
        if m.file_size > 1024 * 1024 and ratio > limits.max_compression_ratio:
            raise SheetError(
                f"workbook part '{m.filename}' is compressed {ratio:.0f}:1; the limit is "
                f"{limits.max_compression_ratio}:1 (possible zip bomb)",
                member=m.filename, code="workbook_part_compressed", ratio=f"{ratio:.0f}",
                limit=limits.max_compression_ratio,
            )
    # Declared sizes can lie: decompress for real, counting, and look for DTDs on the way. Excel never
    # writes a DOCTYPE, so any entity declaration is refused rather than expanded.
    total = 0
    with_formulas: set[str] = set()
    for m in members:
        if m.is_dir():
            continue
        is_xml = m.filename.endswith((".xml", ".rels", ".vml"))
        tail = b""
        try:
            with archive.open(m) as stream:
                while chunk := stream.read(1 << 20):
                    total += len(chunk)
                    if total > limits.max_decompressed_bytes:
                        raise SheetError(
                            f"the workbook unpacks to more than {limits.max_decompressed_bytes / 1048576:.0f} MiB"
                            " (possible zip bomb)", code="workbook_unpacks_too_large",
                            limit_mib=f"{limits.max_decompressed_bytes / 1048576:.0f}",
                        )
                    if is_xml:
                        window = (tail + chunk).lower()
                        if any(decl in window for decl in _XML_DECLS):
                            raise SheetError(
                                f"workbook part '{m.filename}' declares XML entities (a DOCTYPE); "
                                "refused as a possible XML bomb", code="workbook_xml_entities", member=m.filename,
                            )
                        if m.filename.startswith("xl/worksheets/") and (b"<f>" in window or b"<f " in window):
                            with_formulas.add(m.filename)
                        tail = window[-16:]
        except (zipfile.BadZipFile, OSError, EOFError, RuntimeError) as exc:  # bad CRC, encrypted part
            raise SheetError(f"workbook part '{m.filename}' cannot be read: {exc}", code="workbook_part_unreadable",
                             member=m.filename) from exc
    return archive, with_formulas


# A problem of one XLSX cell found while reading, before columns have names: (row, column index, reason,
# code, params), as RowProblem holds them.
CellNote = tuple[int, int, str, str, dict[str, Any]]


def _damage_refused(rows: Iterable[tuple[Any, ...]]) -> Iterator[tuple[Any, ...]]:
    """A worksheet's rows as openpyxl parses them, one at a time; a cell it cannot parse (a number cell
    holding "INF") is the damaged workbook it is, not an error of the reader."""
    iterator = iter(rows)
    while True:
        try:
            row = next(iterator)
        except StopIteration:
            return
        except Exception as exc:  # openpyxl raises ValueError, KeyError, TypeError... for damaged XML
            raise SheetError(f"the workbook cannot be read: {type(exc).__name__}: {exc}",
                             code="workbook_damaged") from exc
        yield row


def _xlsx_cell_text(value: Any, row: int, column: int, problems: list[CellNote]) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            problems.append((row, column, "the cell holds a number that is not finite", "not_finite", {}))
            return ""
        if value.is_integer():
            if abs(value) > 2**53:
                # Excel stores numbers as doubles: past 2**53 (about 15-16 digits) the digits typed are
                # not the digits kept, so the value is not what the user sees. Say so instead of guessing.
                problems.append(
                    (row, column, "the number has more digits than Excel can keep exactly (15); format the "
                     "column as Text in Excel and type the value again", "excel_rounded", {"value": str(int(value))})
                )
            return str(int(value))
        return repr(value)
    if isinstance(value, str) and value in _EXCEL_ERRORS:
        problems.append((row, column, f"the cell holds the Excel error {value}; fix the formula in Excel",
                         "excel_error", {"value": value}))
        return ""
    if isinstance(value, _dt.datetime):
        # Excel has no date-only type: a cell shown as 2024-01-05 arrives as midnight of that day, and the
        # prompt or file name should read as the cell does, not gain " 00:00:00"
        if value.time() == _dt.time(0) and value.tzinfo is None:
            return value.date().isoformat()
        return value.isoformat(sep=" ")
    if isinstance(value, (_dt.date, _dt.time)):
        return value.isoformat()
    if isinstance(value, _dt.timedelta):
        return str(value)
    return str(value)


def _read_xlsx(data: bytes, sheet_name: str | None, limits: SheetLimits) -> Sheet:
    archive, with_formulas = _check_zip(data, limits)
    archive.close()
    from openpyxl import load_workbook  # import here: only XLSX reading needs it

    try:
        values_book = load_workbook(io.BytesIO(data), read_only=True, data_only=True)
    except Exception as exc:  # openpyxl raises many types for damaged files
        raise SheetError(f"the workbook cannot be opened: {type(exc).__name__}: {exc}",
                         code="workbook_damaged") from exc
    try:
        names = list(values_book.sheetnames)
        if not names:  # workbook.xml lists none, or none whose part is in the zip
            raise SheetError("the workbook has no worksheet that can be read (damaged, or not saved by Excel); "
                             "open it in Excel and save it again", code="workbook_damaged")
        if sheet_name is None:
            # The first worksheet the user sees: a hidden one first in the workbook (lists for drop-downs,
            # lookup tables) is not where they typed the rows. openpyxl reads the state as XML, as Excel does
            # (state='hidden', state = "hidden", a name written with character references).
            chosen = next((n for n in names if getattr(values_book[n], "sheet_state", "visible") == "visible"),
                          names[0])
        else:
            matches = [n for n in names if n == sheet_name] or [
                n for n in names if n.strip().casefold() == sheet_name.strip().casefold()
            ]
            if not matches:
                raise SheetError(
                    f"the workbook has no worksheet '{sheet_name}'; it has: {', '.join(names)}",
                    code="worksheet_not_found", sheet=sheet_name, available=names, sheet_names=names,
                )
            chosen = matches[0]
        worksheet = values_book[chosen]
        if not hasattr(worksheet, "iter_rows") or worksheet.__class__.__name__ == "ReadOnlyChartsheet":
            raise SheetError(f"'{chosen}' is a chart sheet, not a worksheet", code="worksheet_is_chart",
                             sheet=chosen)
        formula_rows = None
        formula_book = None
        # Formulas matter only where no value was saved for them (a file written by a script, never opened
        # in Excel): the cell is then reported. Reading the formulas costs a second openpyxl parse of the
        # worksheet, as long as the first, so it is done only where some formula cell of it lacks a value.
        part = getattr(worksheet, "_worksheet_path", "")
        formula_cells = formula_cells_of(data, part) if with_formulas else FormulaCells(unsaved=False)
        empty_text = formula_cells.empty_text  # formulas that show nothing: blank cells, not unsaved ones
        if formula_cells.unsaved:
            formula_book = load_workbook(io.BytesIO(data), read_only=True, data_only=False)
            formula_sheet = formula_book[chosen]
            formula_sheet.reset_dimensions()
            formula_rows = _damage_refused(formula_sheet.iter_rows(values_only=True))
        # A declared dimension of A1:XFD1048576 would pad every row to 16384 cells; read rows as stored.
        worksheet.reset_dimensions()
        records: list[tuple[int, list[Any]]] = []
        cell_problems: list[CellNote] = []
        formatted = _FormattedCells()
        nonblank = 0
        # Cells, not values only: a cell's number format says how Excel shows its number
        for number, row in enumerate(_damage_refused(worksheet.iter_rows()), start=1):
            formulas = next(formula_rows, ()) if formula_rows is not None else ()
            cells_read = _within_column_limit(row, number, limits)
            row = [cell.value for cell in cells_read]
            unsaved = [isinstance(f, str) and f.startswith("=") and (number, index + 1) not in empty_text
                       for index, f in enumerate(formulas)]
            if not any(v is not None and v != "" for v in row) and not any(unsaved):
                continue  # formatted but empty rows (or formulas showing nothing): skip without building anything
            cells = []
            for col_index, value in enumerate(row):
                if value is None and col_index < len(unsaved) and unsaved[col_index]:
                    cell_problems.append(
                        (number, col_index, f"the formula {formulas[col_index][:60]} has no saved value; "
                         "open the file in Excel and save it again (or paste the values)",
                         "formula_without_value", {"formula": formulas[col_index][:60]})
                    )
                text = _xlsx_cell_text(value, number, col_index, cell_problems)
                if text and value is not None and not isinstance(value, (str, bool)):
                    text = formatted.shown(value, text, _number_format(cells_read[col_index], number, col_index),
                                           number, col_index)
                cells.append(text)
            records.append((number, cells))
            nonblank += 1
            if nonblank > limits.max_rows + 1:
                break
        ranges = merged_ranges(data, part)
    finally:
        values_book.close()
    if formula_book is not None:
        formula_book.close()
    title_note, records = _skip_title_rows(records, ranges)
    header_row = records[0][0] if title_note is not None else 1
    merged_note = _fill_merged_down(records, ranges, formatted.numbers, header_row)
    try:
        sheet = _build_sheet(records, limits, positional_problems=cell_problems, numbers=formatted.numbers,
                             header_row=header_row)
    except SheetError as exc:
        others = [n for n in names if n != chosen]
        if not records and others:  # the data is often on another worksheet of the workbook
            raise SheetError(f"worksheet '{chosen}' is empty; the workbook also has: {', '.join(others)} "
                             "(choose the worksheet, or move the data to the first one)",
                             code="worksheet_empty", sheet=chosen, available=others, sheet_names=names) from exc
        raise
    sheet.format, sheet.sheet_name, sheet.sheet_names = "xlsx", chosen, names
    header = _header_names(records[0][1])
    sheet.problems[:0] = [note for note in (title_note, merged_note) if note is not None] + formatted.notes(header)
    return sheet


def _number_format(cell: Any, row: int, column: int) -> str | None:
    """The number format of an XLSX cell; SheetError where the cell names a style the workbook lacks."""
    try:
        return cell.number_format
    except IndexError:  # openpyxl looks the cell's style index up in the workbook's list of styles
        raise SheetError(
            f"row {row}, column {_column_letter(column)}: the cell names a style the workbook does not have "
            "(the file is damaged); open it in Excel and save it again", code="workbook_damaged", row=row,
            column=_column_letter(column)) from None


class _FormattedCells:
    """The text XLSX number cells show in their number format, gathered while a worksheet is read: the stored
    number of each cell that shows it otherwise, and per column the first cell whose shown text matters
    (zero padding, percent) or whose format cannot be rendered exactly here (read as the stored value)."""

    def __init__(self) -> None:
        self._formats: dict[str, CellFormat] = {}
        self.numbers: dict[tuple[int, int], str] = {}  # (row, column index) -> stored number
        self._shown: dict[int, tuple[int, str, str]] = {}  # column index -> (row, shown, stored)
        self._unshown: dict[int, tuple[int, str, str]] = {}  # column index -> (row, format, stored)

    def shown(self, value: Any, stored: str, code: str | None, row: int, column: int) -> str:
        if not code or code == "General":
            return stored
        fmt = self._formats.get(code)
        if fmt is None:
            fmt = self._formats[code] = compile_format(code)
        if fmt.is_general:
            return stored
        is_date = isinstance(value, (_dt.datetime, _dt.date, _dt.time, _dt.timedelta))
        if is_date and is_system_date_format(code):
            return stored  # shown in each viewer's own date order: read as an ISO date
        text = format_cell(value, fmt)
        if text is None:
            self._unshown.setdefault(column, (row, code, stored))
            return stored
        if text != stored and not is_date:
            self.numbers[(row, column)] = stored
            if column not in self._shown and _shown_differs_in_value(text, stored):
                self._shown[column] = (row, text, stored)
        return text

    def notes(self, header: list[str]) -> list[RowProblem]:
        notes = []
        for column, (row, shown, stored) in sorted(self._shown.items()):
            if column < len(header) and header[column]:
                name = header[column]
                notes.append(RowProblem(
                    1, None, f"column '{name}' shows its numbers formatted (row {row} shows '{shown}' for the stored "
                    f"{stored}): text fields and file names read them as shown, number fields read the stored number",
                    "read_as_shown", {"column": name, "row": row, "shown": shown, "stored": stored}))
        for column, (row, code, stored) in sorted(self._unshown.items()):
            if column < len(header) and header[column]:
                name = header[column]
                notes.append(RowProblem(
                    1, None, f"column '{name}' has the number format '{_short(code)}', which cannot be shown here "
                    f"exactly; its cells are read as their stored value (row {row}: {stored})",
                    "format_not_shown", {"column": name, "format": _short(code), "row": row, "value": stored}))
        return notes


def _shown_differs_in_value(shown: str, stored: str) -> bool:
    """Whether a number's shown text says something else than its stored value, beyond decimals and
    separators: zero padding (00042 for 42) or a percent (75% for 0.75)."""
    if "%" in shown and "%" not in stored:
        return True
    first_digits = re.search(r"\d+", shown)
    return bool(first_digits and len(first_digits.group()) > 1 and first_digits.group().startswith("0"))


def _skip_title_rows(
    records: list[tuple[int, list[str]]], ranges: list[MergedRange]
) -> tuple[RowProblem | None, list[tuple[int, list[str]]]]:
    """Drop a title banner above the column names ("Product list — November" merged across the columns),
    with a note, where that is beyond doubt: from row 1, rows whose only value is a cell merged across two or
    more columns, then a row of two or more distinct names, none a number. Else the records as they are."""
    merged_across = {}
    for ref, first_col, first_row, last_col, _ in ranges:
        if last_col > first_col:
            merged_across[(first_row, first_col - 1)] = ref
    titles = []
    for number, cells in records:
        filled = [index for index, text in enumerate(cells) if text.strip()]
        if number != len(titles) + 1 or len(filled) != 1 or (number, filled[0]) not in merged_across:
            break
        titles.append((number, cells[filled[0]].strip(), merged_across[(number, filled[0])]))
    if not titles or len(records) <= len(titles):
        return None, records
    header_number, header = records[len(titles)]
    if not _could_be_column_names([text.strip() for text in header if text.strip()]):
        return None, records
    rows = ", ".join(str(number) for number, _, _ in titles)
    title = _short(titles[0][1], 60)
    note = RowProblem(
        1, None, f"row {rows} ('{title}', merged across {titles[0][2]}) is a title above the column names; the column "
        f"names are read from row {header_number}", "title_rows_skipped",
        {"rows": rows, "title": title, "cells": titles[0][2], "header_row": header_number})
    return note, records[len(titles):]


def _could_be_column_names(names: Sequence[str]) -> bool:
    """Whether the values of a row below a title may be the column names: two or more, distinct as column
    names, none a number."""
    return len(names) >= 2 and len({column_key(n) for n in names}) == len(names) \
        and not any(_NUMBER_LIKE.fullmatch(n) for n in names)


def _fill_merged_down(
    records: list[tuple[int, list[str]]], ranges: list[MergedRange], numbers: dict[tuple[int, int], str],
    header_row: int = 1,
) -> RowProblem | None:
    """Give the value of cells merged down one column (B2:B4) to every row they span, as the user sees it
    in Excel, instead of the rows below the first taking the field's default; a note lists the ranges.
    Cells merged across columns are left as Excel's own CSV export leaves them: empty past the first, as
    are cells merged down from the column names (row ``header_row``) or above them.
    ``numbers`` (the stored number of cells shown formatted) gains the filled cells too.

    The work is bounded by the rows read, not by the rows a range spans (B2:B1048576 is a million rows):
    a range visits only the rows read within it, and a range overlapping an earlier one of its column
    (Excel never saves those; it repairs such a file when opening it) is left out."""
    by_number = {number: cells for number, cells in records}
    numbers_read = [number for number, _ in records]  # ascending
    covered: dict[int, int] = {}  # column index -> last row of the ranges filled in it
    filled = []
    for ref, first_col, first_row, last_col, last_row in sorted(ranges, key=lambda r: (r[1], r[2])):
        if first_col != last_col or first_row <= header_row or last_row <= first_row or first_row not in by_number:
            continue
        index = first_col - 1
        if first_row <= covered.get(index, 0):
            continue
        top = by_number[first_row]
        value = top[index] if index < len(top) else ""
        if not value:
            continue
        covered[index] = last_row
        below = bisect.bisect_right(numbers_read, first_row)
        for number in numbers_read[below:bisect.bisect_right(numbers_read, last_row)]:
            cells = by_number[number]  # rows empty but for the merged cell were not read: Excel shows them blank too
            cells.extend([""] * (index + 1 - len(cells)))
            if not cells[index]:
                cells[index] = value
                if (first_row, index) in numbers:
                    numbers[(number, index)] = numbers[(first_row, index)]
        filled.append(ref)
    if not filled:
        return None
    shown = ", ".join(filled[:10]) + (f" and {len(filled) - 10} more" if len(filled) > 10 else "")
    return RowProblem(1, None, f"merged cells {shown} give their value to every row they span",
                      "merged_cells_filled", {"ranges": shown})


# Shared --------------------------------------------------------------------------------------------


@lru_cache(maxsize=4096)  # every row of a sheet compares the same few names: normalise each once
def column_key(name: str) -> str:
    """How column names and field names are compared: NFKC, surrounding spaces stripped, case-folded, and
    runs of inner spaces, underscores or hyphens as one separator ("Product Name" is ``product_name``)."""
    return re.sub(r"[\s_-]+", "_", unicodedata.normalize("NFKC", name).strip(_HEADER_JUNK).casefold())


def _column_letter(index: int) -> str:
    letters = ""
    index += 1
    while index:
        index, rem = divmod(index - 1, 26)
        letters = chr(65 + rem) + letters
    return letters


def _within_column_limit(row: tuple[Any, ...], number: int, limits: SheetLimits) -> tuple[Any, ...]:
    """An XLSX row of cells cut to the column limit; SheetError when a cell past the limit holds a value.

    One ``<c r="XFD7">`` of a few bytes makes openpyxl hand over a row of 16384 cells: ten thousand such
    rows, a file of some 50 KB, took minutes and gigabytes to read cell by cell. Past the limit no column
    can have a name (the header is refused there), so empty cells there are dropped; the cells stored there
    are found among openpyxl's one shared empty cell by identity in C (``map(is_not, ...)``), not cell by
    cell in Python (a cell of openpyxl compares with ``==`` by its attributes, and fails on the empty one).
    """
    if len(row) <= limits.max_columns:
        return row
    from openpyxl.cell.read_only import EMPTY_CELL

    tail = row[limits.max_columns:]
    stored = list(compress(tail, map(is_not, tail, repeat(EMPTY_CELL))))
    if all(cell.value is None or cell.value == "" for cell in stored):
        return row[: limits.max_columns]
    width = len(row) - next(i for i, cell in enumerate(reversed(row)) if cell.value is not None and cell.value != "")
    raise SheetError(
        f"the sheet has {width} columns (row {number} has a value in column {_column_letter(width - 1)}); "
        f"the limit is {limits.max_columns}",
        row=number, code="sheet_too_many_columns", count=width, limit=limits.max_columns,
    )


def _clean_cell(text: str) -> str:
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return _CONTROL.sub("", text)


def _refuse_duplicate_columns(columns: list[tuple[str, str]]) -> None:
    """SheetError listing the columns (name, how to show it) whose names are equal ignoring case and spaces."""
    spellings: dict[str, list[str]] = {}
    for name, shown in columns:
        spellings.setdefault(column_key(name), []).append(shown)
    duplicates = [shown for shown in spellings.values() if len(shown) > 1]
    if duplicates:
        listed = "; ".join(" and ".join(shown) for shown in duplicates)
        raise SheetError(f"duplicate column names (compared ignoring case and spaces): {listed}", row=1,
                         code="sheet_duplicate_columns", columns=listed)


def _within_cell_limit(text: str, row: int, column: str, limits: SheetLimits, problems: list[RowProblem]) -> str:
    """``text`` cut to the cell limit; a cut cell is a problem of its row only (the rest of the sheet reads on)."""
    if len(text) <= limits.max_cell_chars:
        return text
    problems.append(RowProblem(
        row, column, f"the cell is {len(text):,} characters; the limit is {limits.max_cell_chars:,}",
        "cell_too_long", {"length": len(text), "max": limits.max_cell_chars},
    ))
    return text[: limits.max_cell_chars]


def _header_names(cells: list[Any]) -> list[str]:
    """The column names of a header row, by position ("" for a column without one)."""
    header = [unicodedata.normalize("NFKC", _clean_cell("" if h is None else str(h))).strip(_HEADER_JUNK)
              for h in cells]
    while header and not header[-1]:
        header.pop()
    return header


def _build_sheet(
    records: list[tuple[int, list[Any]]],
    limits: SheetLimits,
    positional_problems: list[CellNote] | None = None,
    numbers: Mapping[tuple[int, int], str] | None = None,
    header_row: int = 1,
) -> Sheet:
    """Header row + data rows from ``(row number, raw cells)``; the header must be row ``header_row`` (1, or
    the row below a title banner that was skipped). ``numbers``: the stored number of XLSX cells shown
    formatted, by (row, column index)."""
    flagged_rows = {number for number, *_ in positional_problems or ()}
    records = [(n, [_clean_cell("" if c is None else str(c)) for c in cells]) for n, cells in records]
    records = [(n, cells) for n, cells in records if n in flagged_rows or any(c.strip() for c in cells)]
    if not records or records[0][0] != header_row:
        raise SheetError("row 1 must hold the column names, but it is empty", row=1, code="sheet_no_header")
    header = _header_names(records[0][1])
    if len(header) > limits.max_columns:
        raise SheetError(f"the sheet has {len(header)} columns; the limit is {limits.max_columns}",
                         code="sheet_too_many_columns", count=len(header), limit=limits.max_columns)
    _refuse_duplicate_columns([(name, f"'{name}' (column {_column_letter(index)})")
                               for index, name in enumerate(header) if name])
    data = records[1:]
    if not data:
        raise SheetError("the sheet has column names in row 1 but no data rows below them", row=2,
                         code="sheet_no_data_rows")
    if len(data) > limits.max_rows:
        raise SheetError(f"the sheet has more than {limits.max_rows} data rows; split it into smaller sheets",
                         code="sheet_too_many_rows", limit=limits.max_rows)

    problems: list[RowProblem] = []
    rows: list[SheetRow] = []
    unnamed_values: dict[int, int] = {}
    numbers = numbers or {}
    for number, cells in data:
        row_cells: dict[str, str] = {}
        row_numbers: dict[str, str] = {}
        for index, text in enumerate(cells):
            name = header[index] if index < len(header) else ""
            if not name:
                if text.strip():
                    unnamed_values[index] = unnamed_values.get(index, 0) + 1
                continue
            row_cells[name] = _within_cell_limit(text, number, name, limits, problems)
            if (number, index) in numbers:
                row_numbers[name] = numbers[(number, index)]
        for name in header:
            if name:
                row_cells.setdefault(name, "")
        rows.append(SheetRow(number, row_cells, row_numbers))
    title = _title_above_header(header, data, header_row) if unnamed_values else None
    for index, count in sorted(unnamed_values.items()):
        problems.append(
            RowProblem(1, None, f"column {_column_letter(index)} has no name in row 1; its {count} "
                       "value(s) are ignored", "column_unnamed", {"column": _column_letter(index), "count": count})
        )
    for number, index, reason, code, params in positional_problems or ():
        name = header[index] if index < len(header) else ""
        if name:
            problems.append(RowProblem(number, name, reason, code, params))
    return Sheet(columns=[h for h in header if h], rows=rows, problems=problems, title_above_header=title)


def _title_above_header(header: list[str], data: list[tuple[int, list[str]]], header_row: int) -> TitleAboveHeader | None:
    """Where the row read as the column names may be a title above them: it holds one name only ("Product
    list — November"), and the row below fills more columns with distinct names, none a number. Whether it
    is one shows only against a template (:func:`validate_rows`): the names below are its missing columns."""
    names = [name for name in header if name]
    if len(names) != 1 or not data:
        return None
    below_number, below = data[0]
    candidates = tuple(_short(text.strip(), 60) for text in below if text.strip())
    if not _could_be_column_names(candidates):
        return None
    return TitleAboveHeader(header_row, _short(names[0], 60), below_number, candidates)


# --------------------------------------------------------------------------------------------------
# Converting cells


# The codes of RowProblem: part of the HTTP API's validation report, so clients can word them themselves.
PROBLEM_CODES = (
    "required_column_missing", "required_value_empty", "not_whole_number", "not_a_number", "too_large",
    "not_yes_no", "below_minimum", "above_maximum", "text_too_long", "seed_out_of_range", "not_a_choice",
    "not_a_file_name", "cell_too_long", "photo_not_named", "photo_unreadable", "photo_too_many_pixels",
    "photo_type_unsupported", "photo_not_uploaded", "excel_rounded", "inexact_number", "not_finite", "excel_error",
    "formula_without_value", "not_a_cell_value", "decimal_comma_unexpected",
    # about the sheet as a whole (row 1): Sheet.notes
    "looks_like_gb18030", "column_unnamed", "read_as_code_page", "read_decimal_comma",
    "merged_cells_filled", "read_as_shown", "format_not_shown", "title_rows_skipped",
)


class CellValueError(ValueError):
    """A cell that does not fit its field: ``reason`` in English, plus ``code`` and ``params`` (see RowProblem)."""

    def __init__(self, code: str, reason: str, **params: Any) -> None:
        super().__init__(reason)
        self.code, self.params = code, params


def parse_integer(text: str, decimal_comma: bool = False) -> int:
    """An exact integer from text: ``12345``, ``12345.0``, ``1.2345E+4``. Never goes through a float.
    With ``decimal_comma`` (the sheet writes numbers 7,5), ``1.024`` is 1024 and ``12345,0`` is 12345.

    Raises ValueError (with a user-facing reason) for ``12345.5``, ``abc``, ``inf``.
    """
    cleaned = decimal_comma_number(text) if decimal_comma else _NUMBER_SPACES.sub("", text.strip())
    not_whole = CellValueError("not_whole_number", f"'{_short(text)}' is not a whole number", value=_short(text))
    try:
        number = Decimal(cleaned)
    except InvalidOperation:
        raise not_whole from None
    if not number.is_finite():
        raise not_whole
    if number.adjusted() > 40:  # far past 2**64; refuse before int() builds a huge number
        raise CellValueError("too_large", f"'{_short(text)}' is far too large", value=_short(text))
    if number != number.to_integral_value():
        raise not_whole
    if "e" in cleaned.lower() and abs(number) >= 10**15:
        # How Excel writes a number it could not keep whole (over 15 digits) into a CSV: the digits past
        # the 15th are gone, so the seed typed is not the seed read.
        raise CellValueError(
            "excel_rounded", f"'{_short(text)}' is a number Excel rounded to 15 digits; format the column as "
            "Text in Excel and type the value again", value=_short(text))
    return int(number)


def parse_bool(text: str) -> bool:
    word = unicodedata.normalize("NFKC", text).strip().casefold()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise CellValueError("not_yes_no", f"'{_short(text)}' is not yes/no; use one of: {', '.join(BOOL_WORDS)}",
                         value=_short(text), words=", ".join(BOOL_WORDS))


def _short(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _check_range(field: "TemplateField", value: float | int, written: str = "") -> None:
    if field.min is not None and value < field.min:
        raise CellValueError("below_minimum", f"{_range_value(value, written)} is below the minimum {field.min}",
                             value=value, min=field.min)
    if field.max is not None and value > field.max:
        raise CellValueError("above_maximum", f"{_range_value(value, written)} is above the maximum {field.max}",
                             value=value, max=field.max)


def _range_value(value: float | int, written: str) -> str:
    """The value as a range problem names it. Worked out only for a value out of range: every number cell
    passes through :func:`_check_range`, and comparing the written text with the value cost more than the
    rest of reading a valid decimal cell."""
    if written and not _reads_plainly_as(written, value):  # 1.024 read with a decimal comma: say both
        return f"'{_short(written.strip())}' (read as {value})"
    return str(value)


def _reads_plainly_as(written: str, value: float | int) -> bool:
    try:
        return Decimal(_NUMBER_SPACES.sub("", written.strip())) == Decimal(str(value))
    except InvalidOperation:
        return False


def coerce_cell(field: "TemplateField", text: str, decimal_comma: bool = False) -> Any:
    """Convert one non-blank cell by its field's type. Raises ValueError with the reason shown to users.

    ``decimal_comma``: the sheet writes numbers with a decimal comma (:attr:`Sheet.decimal_comma`).
    """
    kind = field.type
    if kind in ("string", "text"):
        if kind == "string" and field.max is not None and len(text) > field.max:
            raise CellValueError("text_too_long", f"the text is {len(text)} characters; the maximum is {int(field.max)}",
                                 length=len(text), max=int(field.max))
        return text
    if kind == "int":
        value = parse_integer(text, decimal_comma)
        _check_range(field, value, text)
        return value
    if kind == "seed":
        value = parse_integer(text, decimal_comma)
        if not 0 <= value <= SEED_MAX:
            raise CellValueError("seed_out_of_range", f"seed {value} is outside 0 … {SEED_MAX} (2^64−1)",
                                 value=value, max=SEED_MAX)
        _check_range(field, value)
        return value
    if kind == "float":
        # A cell Excel shows as a percentage is written so into a CSV ("75%"); the XLSX holds 0.75
        written = text.strip()
        percent = written.endswith("%") and not written.endswith("%%")
        written = written[:-1].rstrip() if percent else written
        cleaned = decimal_comma_number(written) if decimal_comma else written
        try:
            number = Decimal(cleaned) / 100 if percent else Decimal(cleaned)
        except Overflow:  # a percentage past Decimal's exponent limit (1e9999999999%): far past any float
            raise CellValueError("too_large", f"'{_short(text)}' is too large a number", value=_short(text)) from None
        except InvalidOperation:
            if _SURELY_COMMA.fullmatch(_NUMBER_SPACES.sub("", text.strip())):
                # a decimal comma in a sheet whose other numbers have points (or no sign of either)
                raise CellValueError(
                    "decimal_comma_unexpected", f"'{_short(text)}' is written with a decimal comma, but this "
                    f"sheet's numbers use a decimal point; write it as {decimal_comma_number(text)}",
                    value=_short(text), number=decimal_comma_number(text)) from None
            raise CellValueError("not_a_number", f"'{_short(text)}' is not a number", value=_short(text)) from None
        if not number.is_finite():
            raise CellValueError("not_a_number", f"'{_short(text)}' is not a finite number", value=_short(text))
        value = float(number)
        if not math.isfinite(value):
            raise CellValueError("too_large", f"'{_short(text)}' is too large a number", value=_short(text))
        _check_range(field, value, text)
        return value
    if kind == "bool":
        return parse_bool(text)
    if kind == "choice":
        choice = _match_choice(field.choices, decimal_comma_number(text) if decimal_comma else text)
        if choice is not None:
            return choice
        choices = ", ".join(map(str, field.choices))
        raise CellValueError("not_a_choice", f"'{_short(text)}' is not one of: {choices}", value=_short(text),
                             choices=choices)
    if kind in ("checkpoint", "image"):
        name = text.strip()
        if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or ".." in re.split(r"[\\/]", name):
            raise CellValueError("not_a_file_name",
                                 f"'{_short(name)}' must be a file name inside the models/inputs folder, not a path",
                                 value=_short(name))
        return name
    raise ValueError(f"unsupported field type '{kind}'")


def choice_key(value: Any) -> str:
    """What a choice is compared by: a number by its value (``1`` and ``1.0`` are one), text ignoring case
    and width."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"number:{Decimal(str(value)).normalize():f}"
    return unicodedata.normalize("NFKC", str(value)).strip().casefold()


def _match_choice(choices: Iterable[Any], text: str) -> Any:
    """The choice a cell names, or None: as text ignoring case, or for a number choice by value, since a
    cell typed ``1.0`` reaches the sheet from Excel as ``1`` and one typed ``0.50`` means the choice ``0.5``."""
    wanted = unicodedata.normalize("NFKC", text).strip().casefold()
    for choice in choices:
        if unicodedata.normalize("NFKC", str(choice)).strip().casefold() == wanted:
            return choice
    try:
        number = Decimal(wanted)
    except InvalidOperation:
        return None
    if number.is_finite():
        # Compared as numbers, exactly: writing the cell's number out (as choice_key does) would build a
        # billion digits for 1e999999999, or fail past Decimal's exponent limit (1e9999999999)
        for choice in choices:
            if isinstance(choice, (int, float)) and not isinstance(choice, bool) and Decimal(str(choice)) == number:
                return choice
    return None


def derive_seed(batch_seed: int, row_number: int) -> int:
    """The seed of a row without a seed cell: deterministic in ``[0, 2**64-1)`` from batch seed and row."""
    digest = hashlib.sha256(f"sd35-batch-seed:{int(batch_seed)}:{int(row_number)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % SEED_MAX


# --------------------------------------------------------------------------------------------------
# Validation against a template


def validate_rows(
    sheet: Sheet, template: "WorkflowTemplate", images: "ImageLibrary | None" = None
) -> ValidationReport:
    """Check every row against the template's fields before anything is queued.

    Columns match fields ignoring case and surrounding spaces. A required field no column provides is
    listed in ``missing_columns`` (and each row reports it); extra columns are listed in
    ``unknown_columns`` and otherwise ignored. With ``images`` (the photos uploaded with the sheet), a
    cell of an ``image`` field must name a readable photo among them, and its value becomes the stored
    file name (what ``LoadImage`` reads); without, such cells are left for the engine's own check.
    """
    columns_by_key = {column_key(c): c for c in sheet.columns}
    column_map: dict[str, str] = {}
    for f in template.fields:
        column = columns_by_key.get(column_key(f.name))
        if column is not None:
            column_map[f.name] = column
    missing = [f.name for f in template.fields if f.required and f.name not in column_map]
    used = set(column_map.values())
    unknown = [c for c in sheet.columns if c not in used]
    field_by_column = {column: name for name, column in column_map.items()}

    sheet_problems: dict[int, list[RowProblem]] = {}
    for problem in sheet.problems:
        sheet_problems.setdefault(problem.row, []).append(problem)

    reports: list[RowReport] = []
    for row in sheet.rows:
        raw = {name: row.cells.get(column, "") for name, column in column_map.items()}
        numbers = {name: row.numbers[column] for name, column in column_map.items() if column in row.numbers}
        values, problems = template.coerce_row(raw, row.number, decimal_comma=sheet.decimal_comma, numbers=numbers)
        if images is not None:
            problems += _image_problems(template, values, images, row.number)
        # Problems speak of the sheet's own column spelling.
        problems = [replace(p, column=column_map.get(p.column, p.column)) if p.column else p for p in problems]
        own = [p for p in sheet_problems.get(row.number, []) if p.column is None or p.column in field_by_column]
        all_problems = own + problems
        reports.append(RowReport(row.number, not all_problems, all_problems, values, dict(row.cells)))
    notes = list(sheet.notes)
    title = sheet.title_above_header
    if missing and title is not None and {column_key(m) for m in missing} & {column_key(n) for n in title.names}:
        notes.append(title_above_header_hint(title))
    else:
        title = None
    return ValidationReport(reports, missing, unknown, column_map, notes, title)


def title_above_header_hint(title: TitleAboveHeader) -> str:
    return (f"the column names must be in row {title.title_row}, but row {title.title_row} holds the title "
            f"'{title.title}' and the names are in row {title.names_row}; delete the title row (in Excel: "
            "right-click the row number, Delete) and upload the sheet again")


def _image_problems(
    template: "WorkflowTemplate", values: dict[str, Any], images: "ImageLibrary", row_number: int
) -> list[RowProblem]:
    """Cells of ``image`` fields that name no readable photo; the others are resolved in ``values``."""
    problems = []
    for f in template.fields:
        if f.type != "image" or not isinstance(values.get(f.name), str):
            continue
        problem = images.problem(values[f.name])
        if problem is None:
            values[f.name] = images.resolve(values[f.name])
        else:
            code, reason, params = problem
            problems.append(RowProblem(row_number, f.name, reason, code, params))
            del values[f.name]
    return problems


# Fields that take a cell's stored number (0.75) where it shows otherwise (75%); the others take the shown text.
_NUMBER_FIELD_TYPES = ("int", "float", "seed", "bool")


def coerce_fields(
    fields: Iterable["TemplateField"], raw: Mapping[str, str], row_number: int, decimal_comma: bool = False,
    numbers: Mapping[str, str] | None = None,
) -> tuple[dict[str, Any], list[RowProblem]]:
    """Typed values and problems for one row; ``raw`` maps field names (any case) to cell text, with numbers
    written with a decimal comma where ``decimal_comma`` says so (:attr:`Sheet.decimal_comma`).

    ``numbers`` maps field names to the stored number of cells whose ``raw`` text is that number formatted
    (:attr:`SheetRow.numbers`): number fields read it; a choice reads the shown text first, then the number.

    A blank optional cell takes the field's declared default; a blank ``seed`` or ``checkpoint`` without
    a default is left out so the batch seed / the engine's default checkpoint apply.
    """
    by_key = {column_key(k): v for k, v in raw.items()}
    stored = {column_key(k): v for k, v in (numbers or {}).items()}
    values: dict[str, Any] = {}
    problems: list[RowProblem] = []
    for f in fields:
        text = by_key.get(column_key(f.name))
        if text is None or not text.strip():
            if f.required:
                code = "required_column_missing" if text is None else "required_value_empty"
                reason = "required column is missing" if text is None else "required value is empty"
                problems.append(RowProblem(row_number, f.name, reason, code))
            elif f.default is not None:
                values[f.name] = f.default
            continue
        number = stored.get(column_key(f.name))
        if number is not None and f.type in _NUMBER_FIELD_TYPES:
            text = number
        try:
            try:
                values[f.name] = coerce_cell(f, text, decimal_comma)
            except CellValueError:
                if f.type != "choice" or number is None:
                    raise
                values[f.name] = coerce_cell(f, number, decimal_comma)  # a choice of numbers: 0.75 shown 75%
        except CellValueError as exc:
            problems.append(RowProblem(row_number, f.name, str(exc), exc.code, exc.params))
        except ValueError as exc:
            problems.append(RowProblem(row_number, f.name, str(exc)))
    return values, problems
