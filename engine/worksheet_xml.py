"""What a worksheet's XML says that openpyxl's read-only cells do not: its merged cell ranges, and the values
Excel saved for its formulas.

Each is read from the worksheet's part of the workbook's zip by an XML parser (expat), in time that grows
with the part's size alone. :mod:`engine.sheets` has already refused a part that declares XML entities (a
DOCTYPE) before this module reads it, so the parser expands none.
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass, field
from typing import Any

from engine.errors import SheetError

__all__ = ["FormulaCells", "MergedRange", "formula_cells_of", "merged_ranges"]

# A merged cell range: its reference (B2:B4), then first column, first row, last column, last row (from 1).
MergedRange = tuple[str, int, int, int, int]

_SHEET_MAIN = "http://schemas.openxmlformats.org/spreadsheetml/2006/main"  # the namespace openpyxl reads cells in


@dataclass
class FormulaCells:
    """What a worksheet's XML says of the values saved for its formulas, which openpyxl's values cannot tell
    apart: a formula whose value is the empty text (``=IF(A2="","",...)`` filled down past the data; Excel
    writes ``t="str"`` and an empty ``<v/>``) reads as None there, as does a formula saved without a value."""

    unsaved: bool  # a formula cell has no saved value (a file written by a script): the formulas are read
    empty_text: set[tuple[int, int]] = field(default_factory=set)  # (row, column from 1) of formulas saved as ""


def formula_cells_of(data: bytes, member: str) -> FormulaCells:
    """The :class:`FormulaCells` of the worksheet ``member`` of the workbook ``data``. Where the part cannot
    be read here, every formula counts as unsaved: the caller then reads the formulas and reports those
    without a value."""
    from openpyxl.utils.cell import coordinate_to_tuple

    row_tag, cell_tag = f"{_SHEET_MAIN} row", f"{_SHEET_MAIN} c"
    formula_tag, value_tag = f"{_SHEET_MAIN} f", f"{_SHEET_MAIN} v"
    found = FormulaCells(unsaved=False)
    depth = 0
    cell_depth = -1  # depth of the <c> element being read; -1 outside cells
    row_number = column = 0  # counted as openpyxl counts them where the XML leaves them out
    position = (0, 0)
    cell_type = "n"
    has_formula = has_value = in_value = False
    saved: list[str] = []

    def start(name: str, attributes: dict[str, str]) -> None:
        nonlocal depth, cell_depth, row_number, column, position, cell_type, has_formula, has_value, in_value
        depth += 1
        if name == row_tag:
            row_number = int(attributes["r"]) if "r" in attributes else row_number + 1
            column = 0
        elif name == cell_tag:
            if attributes.get("r"):  # as openpyxl: an empty reference (r="") is counted, like a missing one
                position = coordinate_to_tuple(attributes["r"])
                column = position[1]
            else:
                column += 1
                position = (row_number, column)
            cell_depth, cell_type, has_formula, has_value = depth, attributes.get("t", "n"), False, False
            saved.clear()
        elif depth == cell_depth + 1:  # openpyxl reads a cell's own <f> and <v>, not nested ones
            has_formula = has_formula or name == formula_tag
            has_value = has_value or name == value_tag
            in_value = name == value_tag

    def end(name: str) -> None:
        nonlocal depth, cell_depth, in_value
        if depth == cell_depth + 1:
            in_value = False
        elif depth == cell_depth:
            cell_depth = -1
            text = "".join(saved)
            if not has_formula or (text and cell_type not in ("s", "inlineStr")):
                pass  # no formula, or its saved value is what openpyxl reads
            elif cell_type == "str" and has_value and not text:
                found.empty_text.add(position)
            else:
                found.unsaved = True
        depth -= 1

    def characters(chunk: str) -> None:
        if in_value:
            saved.append(chunk)

    xml = _worksheet_part(data, member)
    # damaged XML, or a row or cell reference that is none
    if xml is None or not _parse(xml, start, end, characters, (ValueError, TypeError)):
        return FormulaCells(unsaved=True)
    return found


def merged_ranges(data: bytes, member: str) -> list[MergedRange]:
    """The merged cell ranges (``B2:B4``) of the worksheet ``member`` of the workbook ``data``: text that
    only looks like one (in a comment) is none, and the time taken grows with the part's size alone (a
    pattern search for ``<mergeCell`` started over at each of them, minutes for a few hundred KB)."""
    from openpyxl.utils.cell import range_boundaries

    refs: list[str] = []

    def start(name: str, attributes: dict[str, str]) -> None:
        if name.rpartition(" ")[2] == "mergeCell" and "ref" in attributes:
            refs.append(attributes["ref"])

    xml = _worksheet_part(data, member)
    if xml is None or b"mergeCell" not in xml:
        return []  # most sheets: no need to parse the part a second time
    if not _parse(xml, start):
        return []  # openpyxl read the rows of this part; what it could not read was refused there
    ranges = []
    for ref in refs:
        try:
            ranges.append((ref, *range_boundaries(ref)))
        except (ValueError, TypeError) as exc:
            shown = ref if len(ref) <= 40 else ref[:39] + "…"
            raise SheetError(f"workbook part '{member.lstrip('/')}' cannot be read: the merged cells '{shown}' "
                             f"are no range of cells ({exc})", code="workbook_part_unreadable",
                             member=member.lstrip("/")) from exc
    return [r for r in ranges if None not in r]  # whole rows or columns (A:A) merge no cells of a sheet


def _worksheet_part(data: bytes, member: str) -> bytes | None:
    """The XML of the zip member ``member`` (openpyxl's worksheet path, with a leading /); None when the
    workbook has none such or cannot be read here."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            return archive.read(member.lstrip("/"))
    except (KeyError, zipfile.BadZipFile, OSError, ValueError):
        return None


def _parse(xml: bytes, start: Any, end: Any = None, characters: Any = None,
           handler_errors: tuple[type[Exception], ...] = ()) -> bool:
    """Run expat over ``xml`` with these handlers (names with their namespace, a space between); False when
    the XML is damaged, or a handler raised one of ``handler_errors``."""
    from xml.parsers import expat

    parser = expat.ParserCreate(namespace_separator=" ")
    parser.StartElementHandler = start
    if end is not None:
        parser.EndElementHandler = end
    if characters is not None:
        parser.CharacterDataHandler = characters
    try:
        parser.Parse(xml, True)
    except (expat.ExpatError, *handler_errors):
        return False
    return True
