"""Excel number formats → the text a cell shows (``0000000000000`` shows 12345678905 as ``0012345678905``).

An XLSX cell stores a number and, apart from it, the format Excel displays it in: an article number typed
``00042`` is the number 42 with the format ``00000``, a price ``19.90`` is 19.9 with ``0.00``, ``75%`` is 0.75
with ``0%``. Text that feeds a prompt or a file name must read as the cell shows; see
:func:`engine.sheets.read_sheet`.

:func:`format_cell` renders the parts of the format language that sheets of product data use: digit
placeholders (``0 # ?``) with zero padding and literals between them (``000-000``), fixed decimals,
thousands separators and scaling commas, percent, quoted and escaped literals, currency and locale blocks
(``[$€-407]``), colours, sections ``positive;negative;zero;text`` and date/time codes. Where the text Excel
shows cannot be known here exactly — a fraction, scientific notation, a condition (``[>100]``), Chinese
numerals (``[DBNum1]``), a month name in a language the format does not name, separators of a locale not
listed — it returns None, and the caller keeps the stored value and says so, rather than show a wrong text.
"""

from __future__ import annotations

import datetime as _dt
import re
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal, localcontext
from typing import Any

__all__ = ["CellFormat", "compile_format", "format_cell", "is_system_date_format"]

# Decimal mark and thousands separator by the locale a format names ([$€-407], [$-de-DE]). Excel takes them
# from the viewer's system, so they are known only where the format names a locale, and only for these; a
# format without a locale is read with the marks its code is written in ("#,##0.00").
_LOCALE_MARKS = {
    **{lcid: (".", ",") for lcid in ("409", "809", "c09", "1009", "1409", "1809", "4009", "3409",
                                      "804", "404", "c04", "1004", "1404", "411", "412")},
    **{lcid: (",", ".") for lcid in ("407", "410", "c0a", "413", "416")},
}
_TAG_MARKS = {"en": (".", ","), "zh": (".", ","), "ja": (".", ","), "ko": (".", ","),
              "de-de": (",", "."), "it-it": (",", "."), "es-es": (",", "."), "nl-nl": (",", "."), "pt-br": (",", ".")}
_ENGLISH_LCIDS = frozenset(("409", "809", "c09", "1009", "1409", "1809", "4009", "3409"))
_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December")
_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
# Characters Excel shows as they are without quotes.
_PLAIN_LITERALS = frozenset(" $-+/():!^&'~{}<>=")
_COLOURS = re.compile(r"(?i)black|blue|cyan|green|magenta|red|white|yellow|color\s*\d{1,2}")
_ELAPSED = re.compile(r"(?i)h+|m+|s+")
# The "system" short date and date-time (built-in formats 14 and 22): Excel shows them in each viewer's own
# locale (1/5/2024, 2024/1/5, 05.01.2024), so they are read as ISO dates, which every reader understands.
_SYSTEM_DATE_FORMATS = frozenset(("mm-dd-yy", "m/d/yy h:mm"))
# Excel's own limit on a number format's length. The format comes from the uploaded file: a longer one is
# no format Excel made, and would cost time and text in proportion to its length in every cell it formats.
MAX_FORMAT_CHARS = 255


class _Unsupported(Exception):
    """A part of a format whose shown text cannot be known exactly here."""


@dataclass(frozen=True)
class _Layout:
    """Where a number's digits go in a section, worked out once per format (a sheet has thousands of cells)."""

    before: str  # literal text before the digits ("$", "€ ")
    after: str  # literal text after them (" pcs", "%")
    integer: tuple[tuple[str, str], ...]  # ("digit", "0" | "#" | "?") or ("lit", text between digits: 000-000)
    grouped: bool  # thousands separators
    min_digits: int  # with grouped: integer digits shown at least (#,##0 shows 1, 0,000 shows 4)
    places: str  # decimal placeholders ("00", "0#")
    point: bool  # the decimal mark is shown
    exponent: int  # power of ten the number is shown times: 2 per percent sign, -3 per scaling comma
    marks: tuple[str, str]  # decimal mark, thousands separator
    padded_only: bool = False  # the integer digits are only 0 and # placeholders: zero padding, no more


@dataclass(frozen=True)
class _Section:
    tokens: tuple[tuple[str, str], ...]  # (kind, text): lit, digit, point, comma, percent, text, date, elapsed
    marks: tuple[str, str]  # decimal mark, thousands separator
    english_names: bool  # month and day names may be written in English
    layout: _Layout | None = None  # numbers: the digits' layout; None for dates and General or text sections

    @property
    def is_date(self) -> bool:
        return any(kind in ("date", "elapsed") for kind, _ in self.tokens)

    @property
    def has_digits(self) -> bool:
        return any(kind == "digit" for kind, _ in self.tokens)


@dataclass(frozen=True)
class CellFormat:
    """A compiled number format; ``sections`` empty where the format cannot be rendered (``reason`` says why)."""

    code: str
    sections: tuple[_Section, ...]
    reason: str = ""

    @property
    def is_general(self) -> bool:
        return self.code.strip().casefold() in ("general", "@", "")


def compile_format(code: str) -> CellFormat:
    if len(code) > MAX_FORMAT_CHARS:
        return CellFormat(code, (), f"longer than Excel's {MAX_FORMAT_CHARS} characters")
    try:
        return CellFormat(code, tuple(_parse_section(part) for part in _split_sections(code)))
    except _Unsupported as exc:
        return CellFormat(code, (), str(exc))


def is_system_date_format(code: str) -> bool:
    return code.strip().casefold() in _SYSTEM_DATE_FORMATS


def format_cell(value: Any, fmt: CellFormat) -> str | None:
    """The text Excel shows for ``value`` (a number, or a date/time openpyxl made of a date-formatted
    number) in the format ``fmt``; None where it cannot be known exactly here."""
    if not fmt.sections:
        return None
    try:
        if isinstance(value, (_dt.datetime, _dt.date, _dt.time, _dt.timedelta)):
            section = fmt.sections[0]
            if not section.is_date:
                return None
            return _render_date(value, section).strip()
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None
        return _render_number(value, fmt.sections)
    except (_Unsupported, OverflowError):  # OverflowError: past the year 9999, where Excel shows ####
        return None


# Parsing -------------------------------------------------------------------------------------------------


def _split_sections(code: str) -> list[str]:
    parts, current, index = [], [], 0
    while index < len(code):
        ch = code[index]
        if ch == '"':
            end = code.find('"', index + 1)
            end = len(code) - 1 if end < 0 else end
            current.append(code[index:end + 1])
            index = end + 1
            continue
        if ch in "\\_*" and index + 1 < len(code):
            current.append(code[index:index + 2])
            index += 2
            continue
        if ch == "[":
            end = code.find("]", index)
            end = len(code) - 1 if end < 0 else end
            current.append(code[index:end + 1])
            index = end + 1
            continue
        if ch == ";":
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
        index += 1
    parts.append("".join(current))
    if len(parts) > 4:
        raise _Unsupported("more than four sections")
    return parts


# Format characters that are a token each: digit placeholders, the decimal point, the thousands comma, percent
# and the text placeholder.
_ONE_CHARACTER_TOKENS = {"0": "digit", "#": "digit", "?": "digit", ".": "point", ",": "comma", "%": "percent",
                         "@": "text"}


def _parse_section(text: str) -> _Section:
    tokens: list[tuple[str, str]] = []
    marks = (".", ",")
    english = False
    index = 0
    lower = text.lower()
    while index < len(text):
        ch = text[index]
        if ch == '"':
            end = text.find('"', index + 1)
            end = len(text) if end < 0 else end
            tokens.append(("lit", text[index + 1:end]))
            index = end + 1
        elif ch == "\\":
            tokens.append(("lit", text[index + 1:index + 2]))
            index += 2
        elif ch == "_":
            tokens.append(("pad", " "))  # room the width of the next character: alignment, not text
            index += 2
        elif ch == "*":
            index += 2  # fill the column's width with the next character: alignment, not text
        elif ch == "[":
            end = text.find("]", index)
            if end < 0:
                raise _Unsupported("unclosed [")
            inner = text[index + 1:end]
            index = end + 1
            if _COLOURS.fullmatch(inner.strip()):
                continue
            if _ELAPSED.fullmatch(inner):
                tokens.append(("elapsed", inner.lower()))
                continue
            if inner.startswith("$"):
                symbol, _, locale = inner[1:].partition("-")
                if symbol:
                    tokens.append(("lit", symbol))
                if locale:
                    marks, english = _locale(locale)
                continue
            raise _Unsupported(f"[{inner}]")  # conditions, [DBNum1] numerals, calendars
        elif lower.startswith("general", index):
            tokens.append(("general", ""))
            index += len("general")
        elif lower.startswith("am/pm", index):
            tokens.append(("ampm", text[index:index + 5]))
            index += 5
        elif lower.startswith("a/p", index):
            tokens.append(("ampm", text[index:index + 3]))
            index += 3
        elif ch in _ONE_CHARACTER_TOKENS:
            tokens.append((_ONE_CHARACTER_TOKENS[ch], ch))
            index += 1
        elif ch.lower() in "ymdhs":
            end = index
            while end < len(text) and text[end].lower() == ch.lower():
                end += 1
            tokens.append(("date", text[index:end].lower()))
            index = end
        elif ch.lower() == "e" and index + 1 < len(text) and text[index + 1] in "+-":
            raise _Unsupported("scientific notation")
        elif ch in _PLAIN_LITERALS or ord(ch) > 0x7F:
            tokens.append(("lit", ch))
            index += 1
        else:
            raise _Unsupported(f"the code '{ch}'")
    section = _Section(tuple(tokens), marks, english)
    if section.is_date and section.has_digits and not _is_seconds_fraction(tokens):
        raise _Unsupported("a date mixed with digit placeholders")
    if not section.is_date and any(kind == "lit" and text == "/" for kind, text in tokens) and section.has_digits:
        raise _Unsupported("a fraction")
    if not section.is_date and not {kind for kind, _ in tokens} & {"general", "text", "ampm"}:
        section = _Section(section.tokens, marks, english, _layout(tokens, marks))
    return section


def _is_seconds_fraction(tokens: list[tuple[str, str]]) -> bool:
    """Whether the digit placeholders of a date format are all fractions of a second (``ss.000``)."""
    for index, (kind, _) in enumerate(tokens):
        if kind != "digit":
            continue
        run = index
        while run > 0 and tokens[run - 1][0] == "digit":
            run -= 1
        if run < 2 or tokens[run - 1][0] != "point" or tokens[run - 2][0] not in ("date", "elapsed") \
                or not tokens[run - 2][1].startswith("s"):
            return False
    return True


def _locale(locale: str) -> tuple[tuple[str, str], bool]:
    key = locale.strip().lower()
    if re.fullmatch(r"[0-9a-f]{1,8}", key):
        key = key.lstrip("0")
        if len(key) > 4:
            raise _Unsupported(f"the calendar or numerals of locale {locale}")
        if key not in _LOCALE_MARKS:
            raise _Unsupported(f"the separators of locale {locale}")
        return _LOCALE_MARKS[key], key in _ENGLISH_LCIDS
    for tag, marks in _TAG_MARKS.items():
        if key == tag or key.startswith(tag + "-") and len(tag) == 2:
            return marks, tag == "en"
    raise _Unsupported(f"the separators of locale {locale}")


# Numbers ----------------------------------------------------------------------------------------------------


def _render_number(value: int | float, sections: tuple[_Section, ...]) -> str | None:
    number = Decimal(value) if isinstance(value, int) else Decimal(repr(value))
    if not number.is_finite():
        return None
    numeric = sections[:3]  # a fourth section is for text cells
    if number < 0 and len(numeric) >= 2:
        section, number, sign = numeric[1], -number, ""  # the negative section writes its own sign
    elif number == 0 and len(numeric) >= 3:
        section, sign = numeric[2], ""
    else:
        section, sign = numeric[0], "-" if number < 0 else ""
        number = abs(number)
    if section.layout is None:
        return None  # a date format on a number openpyxl did not take for a date; General; a text section
    return sign + _place_digits(number, section.layout).strip()


def _layout(tokens: list[tuple[str, str]], marks: tuple[str, str]) -> _Layout:
    percent = sum(kind == "percent" for kind, _ in tokens)
    digits_at = [i for i, (kind, _) in enumerate(tokens) if kind == "digit"]
    if not digits_at:  # only literals ("N/A", or ;;; to hide the cell): shown as written
        text = "".join(_literal(kind, text) for kind, text in tokens)
        return _Layout(text, "", (), False, 0, "", False, 0, marks)
    first, last = digits_at[0], digits_at[-1]
    point = next((i for i in range(max(first - 1, 0), last + 2) if i < len(tokens) and tokens[i][0] == "point"), None)
    start = first if point is None else min(first, point)
    integer = tokens[start:point if point is not None else last + 1]
    fraction = tokens[point + 1:last + 1] if point is not None and point < last else []
    end = last + 1
    # Commas right after the digits divide by 1000 each ("#,##0," shows thousands); commas between integer
    # digits group them.
    scale = 0
    while integer and integer[-1][0] == "comma":
        integer.pop()
        scale += 1
    while end < len(tokens) and tokens[end][0] == "comma":
        end += 1
        scale += 1
    if any(kind != "digit" for kind, _ in fraction):
        raise _Unsupported("text between decimal places")
    grouped = any(kind == "comma" for kind, _ in integer)
    placeholders = [text for kind, text in integer if kind == "digit"]
    if grouped and (any(kind not in ("digit", "comma") for kind, _ in integer) or "?" in placeholders):
        raise _Unsupported("thousands separators with text between digits")
    laid_out = tuple(("digit", text) if kind == "digit" else ("lit", _literal(kind, text))
                     for kind, text in integer if kind != "comma")
    min_digits = len(placeholders) - next((i for i, p in enumerate(placeholders) if p == "0"), len(placeholders))
    return _Layout(
        "".join(_literal(kind, text) for kind, text in tokens[:start]),
        "".join(_literal(kind, text) for kind, text in tokens[end:]),
        laid_out, grouped, min_digits, "".join(text for _, text in fraction), point is not None,
        2 * percent - 3 * scale, marks, all(kind == "digit" and text != "?" for kind, text in laid_out),
    )


_QUANTUMS = [Decimal(1).scaleb(-places) for places in range(31)]
_BLANK_DIGIT = {"0": "0", "#": "", "?": " "}


def _place_digits(number: Decimal, layout: _Layout) -> str:
    if not layout.integer and not layout.point:
        return layout.before  # a section of literals only
    if layout.exponent:
        number = number.scaleb(layout.exponent)
    places = len(layout.places)
    if places >= len(_QUANTUMS):
        raise _Unsupported("too many decimal places")
    with localcontext() as context:
        # Room for every digit shown: a double goes up to 1.8e308, and percent signs multiply it further
        context.prec = max(context.prec, number.adjusted() + places + 2)
        if number:  # Excel shows at most 15 significant digits
            number = round(number, 14 - number.adjusted())
        whole, _, fraction = f"{number.quantize(_QUANTUMS[places], rounding=ROUND_HALF_UP):f}".partition(".")
    whole = whole.lstrip("0")
    decimal_mark, thousands = layout.marks
    if layout.grouped:
        digits = whole.rjust(layout.min_digits, "0")
        head = len(digits) % 3 or 3
        integer_text = thousands.join([digits[:head]] + [digits[i:i + 3] for i in range(head, len(digits), 3)])
    elif layout.padded_only:
        integer_text = whole.rjust(layout.min_digits, "0")
    else:
        # Digits fill the placeholders from the right; literals between them stay (000-000 shows 000-042)
        remaining, out = whole, []
        for kind, text in reversed(layout.integer):
            if kind == "lit":
                out.append(text)
            elif remaining:
                out.append(remaining[-1])
                remaining = remaining[:-1]
            else:
                out.append(_BLANK_DIGIT[text])
        out.append(remaining)  # digits beyond the placeholders go before the first
        integer_text = "".join(reversed(out))
    if not layout.point:
        return layout.before + integer_text + layout.after
    shown = list(fraction)
    for index in range(places - 1, -1, -1):  # trailing zeros of # and ? places are not shown
        placeholder = layout.places[index]
        if shown[index] != "0" or placeholder == "0":
            break
        shown[index] = _BLANK_DIGIT[placeholder] if placeholder == "#" else " "
    return layout.before + integer_text + decimal_mark + "".join(shown) + layout.after


def _literal(kind: str, text: str) -> str:
    if kind in ("lit", "pad", "percent"):
        return text
    raise _Unsupported(f"'{text}' outside the digits")


# Dates and times -----------------------------------------------------------------------------------------------


def _render_date(value: Any, section: _Section) -> str:
    if isinstance(value, _dt.timedelta):
        elapsed = value
        moment = _dt.datetime(1899, 12, 30) + value
    elif isinstance(value, _dt.datetime):
        moment = value.replace(tzinfo=None)
        elapsed = moment - _dt.datetime(1899, 12, 30)
    elif isinstance(value, _dt.date):
        moment = _dt.datetime(value.year, value.month, value.day)
        elapsed = moment - _dt.datetime(1899, 12, 30)
    else:
        moment = _dt.datetime.combine(_dt.date(1899, 12, 30), value)
        elapsed = moment - _dt.datetime(1899, 12, 30)
    tokens = list(section.tokens)
    twelve_hour = any(kind == "ampm" for kind, _ in tokens)
    has_fraction = any(kind == "digit" for kind, _ in tokens)
    if not has_fraction and moment.microsecond >= 500_000:  # Excel rounds to the second it shows
        moment += _dt.timedelta(microseconds=1_000_000 - moment.microsecond)
        elapsed += _dt.timedelta(microseconds=1_000_000 - elapsed.microseconds)
    moment = moment.replace(microsecond=moment.microsecond if has_fraction else 0)
    date_tokens = [i for i, (kind, _) in enumerate(tokens) if kind in ("date", "elapsed")]
    out: list[str] = []
    index = 0
    while index < len(tokens):
        kind, text = tokens[index]
        if kind in ("lit", "pad"):
            out.append(text)
        elif kind == "point":
            places = 0
            while index + 1 < len(tokens) and tokens[index + 1][0] == "digit":
                places += 1
                index += 1
            if places:
                out.append("." + f"{moment.microsecond / 1e6:.{places}f}"[2:])
            else:
                out.append(".")
        elif kind == "ampm":
            pm = moment.hour >= 12
            if text.lower() == "am/pm":
                out.append("PM" if pm else "AM")
            else:
                out.append(("P" if pm else "A") if text[0].isupper() else ("p" if pm else "a"))
        elif kind == "elapsed":
            seconds = int(elapsed.total_seconds())
            amount = {"h": seconds // 3600, "m": seconds // 60, "s": seconds}[text[0]]
            out.append(str(amount).rjust(len(text), "0"))
        elif kind == "date":
            out.append(_date_part(text, moment, index, tokens, date_tokens, twelve_hour, section))
        elif kind == "comma":
            out.append(",")
        else:
            raise _Unsupported(f"'{text}' in a date")
        index += 1
    return "".join(out)


def _date_part(code: str, moment: _dt.datetime, index: int, tokens: list[tuple[str, str]],
               date_tokens: list[int], twelve_hour: bool, section: _Section) -> str:
    letter, width = code[0], len(code)
    if letter == "y":
        return f"{moment.year % 100:02d}" if width <= 2 else f"{moment.year:04d}"
    if letter == "d":
        if width <= 2:
            return f"{moment.day:0{width}d}"
        if not section.english_names:
            raise _Unsupported("day names in the viewer's language")
        name = _DAYS[moment.weekday()]
        return name[:3] if width == 3 else name
    if letter == "h":
        hour = moment.hour % 12 or 12 if twelve_hour else moment.hour
        return f"{hour:0{min(width, 2)}d}"
    if letter == "s":
        return f"{moment.second:0{min(width, 2)}d}"
    # m: minutes right after an hour or right before a second, else the month
    position = date_tokens.index(index)
    previous = tokens[date_tokens[position - 1]][1] if position else ""
    following = tokens[date_tokens[position + 1]][1] if position + 1 < len(date_tokens) else ""
    if width <= 2 and (previous.lstrip("[").startswith("h") or following.lstrip("[").startswith("s")):
        return f"{moment.minute:0{width}d}"
    if width <= 2:
        return f"{moment.month:0{width}d}"
    if not section.english_names:
        raise _Unsupported("month names in the viewer's language")
    name = _MONTHS[moment.month - 1]
    return {3: name[:3], 5: name[0]}.get(width, name)
