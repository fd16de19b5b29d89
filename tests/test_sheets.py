"""Spreadsheets: every RELIABILITY.md spreadsheet item, on tiny real CSV and XLSX files."""

import io
import json
import re
import time
import zipfile
from pathlib import Path

import pytest
from openpyxl import Workbook
from openpyxl.styles import PatternFill

from engine.errors import BatchError, SheetError
from engine.sheets import SEED_MAX, CellValueError, SheetLimits, coerce_cell, derive_seed, read_sheet, validate_rows
from engine.templates import parse_template

SHEET_XML = "xl/worksheets/sheet1.xml"
SCHEMA = {
    "name": "sheet_test",
    "filename_pattern": "{prompt}",
    "fields": [
        {"name": "prompt", "type": "text", "required": True, "example": "a cat"},
        {"name": "seed", "type": "seed"},
        {"name": "steps", "type": "int", "default": 20, "min": 1, "max": 50},
        {"name": "cfg", "type": "float", "default": 4.5, "min": 0, "max": 30},
        {"name": "tiled", "type": "bool", "default": False},
        {"name": "sampler", "type": "choice", "default": "euler", "choices": ["euler", "dpmpp_2m"]},
    ],
}
WORKFLOW = """{"1": {"class_type": "KSampler", "inputs": {"seed": {{ seed }}, "steps": {{ steps }}, "cfg": {{ cfg }},
  "sampler_name": {{ sampler }}, "text": {{ prompt }}, "tiled": {{ tiled }}}}}"""


@pytest.fixture(scope="module")
def template():
    return parse_template(json.dumps(SCHEMA), WORKFLOW)


def xlsx_bytes(rows, sheet_title="Sheet1", extra_sheets=None, mutate=None):
    wb = Workbook()
    ws = wb.active
    ws.title = sheet_title
    for row in rows:
        ws.append(row)
    for title, more in (extra_sheets or {}).items():
        other = wb.create_sheet(title)
        for row in more:
            other.append(row)
    if mutate:
        mutate(ws)
    buffer = io.BytesIO()
    wb.save(buffer)
    return buffer.getvalue()


def number_formats(formats):
    """A mutate for xlsx_bytes giving every data cell of the named columns its number format."""
    def mutate(ws):
        for letter, code in formats.items():
            for cell in ws[letter][1:]:
                cell.number_format = code
    return mutate


def rewrite_member(data: bytes, member: str, change) -> bytes:
    source = zipfile.ZipFile(io.BytesIO(data))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as target:
        for info in source.infolist():
            content = source.read(info)
            if info.filename == member:
                content = change(content)
            target.writestr(info.filename, content)
    return out.getvalue()


def report_for(sheet, template):
    return {r.number: r for r in validate_rows(sheet, template).rows}


# CSV -------------------------------------------------------------------------------------------------


def test_utf8_csv_with_quoted_commas_and_newlines_keeps_sheet_row_numbers():
    text = 'prompt,seed\n"a cat, sitting",1\n,\n"two\nlines",2\n'
    sheet = read_sheet(text.encode(), "rows.csv")
    assert sheet.columns == ["prompt", "seed"]
    assert [r.number for r in sheet.rows] == [2, 4]  # the blank row 3 is skipped, numbers kept
    assert sheet.rows[0].cells["prompt"] == "a cat, sitting"
    assert sheet.rows[1].cells["prompt"] == "two\nlines"
    assert sheet.format == "csv" and sheet.delimiter == ","


def test_bom_never_reaches_a_column_name():
    sheet = read_sheet("\ufeffprompt,seed\ncat,1\n".encode("utf-8"), "rows.csv")
    assert sheet.columns == ["prompt", "seed"]
    assert sheet.encoding == "utf-8-sig"


def test_gb18030_csv_from_chinese_excel():
    data = "提示词,种子\n一只猫在沙发上,42\n".encode("gb18030")
    sheet = read_sheet(data, "rows.csv")
    assert sheet.encoding == "gb18030"
    assert sheet.columns == ["提示词", "种子"]
    assert sheet.rows[0].cells == {"提示词": "一只猫在沙发上", "种子": "42"}


def test_utf16_unicode_text_export_with_tabs():
    data = "prompt\tseed\r\ncat\t7\r\n".encode("utf-16")
    sheet = read_sheet(data, "rows.txt")
    assert sheet.delimiter == "\t" and sheet.rows[0].cells == {"prompt": "cat", "seed": "7"}


@pytest.mark.parametrize("delimiter", [";", "\t", "|"])
def test_delimiter_is_sniffed(delimiter):
    text = f"prompt{delimiter}seed\na, b{delimiter}1\n"
    sheet = read_sheet(text.encode(), "rows.csv")
    assert sheet.delimiter == delimiter
    assert sheet.rows[0].cells == {"prompt": "a, b", "seed": "1"}


def test_headers_forgiving_about_case_and_spaces(template):
    sheet = read_sheet(b" Prompt  ,SEED \ncat,5\n", "rows.csv")
    report = validate_rows(sheet, template)
    assert report.column_map == {"prompt": "Prompt", "seed": "SEED"}
    assert report.ok and report.rows[0].values["seed"] == 5


def test_inner_spaces_underscores_and_hyphens_in_headers_are_one_separator(template):
    schema = json.loads(json.dumps(SCHEMA))
    schema["fields"].append({"name": "product_name", "type": "string"})
    schema["fields"].append({"name": "brand_color", "type": "string"})
    with_names = parse_template(json.dumps(schema), WORKFLOW.replace("{{ prompt }}", "{{ prompt ~ product_name ~ brand_color }}"))
    sheet = read_sheet("Prompt,Product  Name,brand-color\ncat,Mug,red\n".encode(), "rows.csv")
    report = validate_rows(sheet, with_names)
    assert report.ok, report.to_dict()
    assert report.rows[0].values["product_name"] == "Mug" and report.rows[0].values["brand_color"] == "red"
    with pytest.raises(SheetError, match="duplicate column names"):
        read_sheet(b"product name,Product_Name\na,b\n", "rows.csv")


def test_an_unclosed_quote_refuses_the_sheet_naming_the_row_instead_of_swallowing_rows():
    with pytest.raises(SheetError) as info:
        read_sheet(b'prompt,seed\ncat,1\n\n"unclosed,2\ndog,3\n', "rows.csv")
    assert "row 4" in info.value.message and "unclosed quote" in info.value.message
    with pytest.raises(SheetError, match="row 2"):
        read_sheet(b'prompt,seed\n"cat" and more,1\n', "rows.csv")


def test_a_sheet_with_column_names_but_no_rows_is_refused():
    for data, name in ((b"prompt,seed\n", "rows.csv"), (xlsx_bytes([["prompt", "seed"]]), "rows.xlsx")):
        with pytest.raises(SheetError, match="no data rows"):
            read_sheet(data, name)


def test_our_own_formula_guard_comes_off_when_an_exported_csv_is_read_back():
    sheet = read_sheet("prompt,note\n'=SUM(1),'-2\n'@x,'+86 10\nit's,'plain\n".encode(), "rows.csv")
    assert [list(r.cells.values()) for r in sheet.rows] == [["=SUM(1)", "-2"], ["@x", "+86 10"], ["it's", "'plain"]]


def test_utf8_that_reads_as_chinese_in_gb18030_gets_a_note_and_real_utf8_does_not():
    tricky = "prompt,seed\n一只猫,1\n".encode("gb18030")  # happens to be valid UTF-8
    sheet = read_sheet(tricky, "rows.csv")
    assert sheet.encoding == "utf-8"
    assert any("GB18030" in p.reason and "一只猫" in p.reason for p in sheet.problems)
    for text in ("prompt,seed\nCafé Müller,1\n", "prompt,seed\nПривет мир,1\n", "prompt,seed\n一只猫,1\n",
                 "prompt,seed\nMen’s café jacket ×2,1\n", "prompt,seed\nSøren’s 10 €,1\n"):
        assert read_sheet(text.encode("utf-8"), "rows.csv").problems == [], text


def test_duplicate_headers_are_an_error_naming_them():
    with pytest.raises(SheetError) as info:
        read_sheet(b"prompt,Seed,PROMPT \na,1,b\n", "rows.csv")
    assert "'prompt' (column A)" in info.value.message and "'PROMPT' (column C)" in info.value.message


def test_missing_required_column_reported_before_anything_runs(template):
    report = validate_rows(read_sheet(b"seed,extra\n1,x\n", "rows.csv"), template)
    assert report.missing_columns == ["prompt"]
    assert report.unknown_columns == ["extra"]
    assert not report.ok
    assert report.rows[0].problems[0].column == "prompt"


def test_control_characters_are_stripped_but_newlines_and_tabs_kept():
    sheet = read_sheet('prompt\n"a\x00b\x07c\td\ne\x1b"\n'.encode(), "rows.csv")
    assert sheet.rows[0].cells["prompt"] == "abc\td\ne"


def test_huge_cell_is_a_cell_problem(template):
    text = "prompt\n" + "x" * 10_001 + "\nfine\n"
    sheet = read_sheet(text.encode(), "rows.csv")
    report = report_for(sheet, template)
    assert not report[2].ok and "10,001 characters" in report[2].problems[0].reason
    assert report[3].ok


def test_too_many_rows_refused():
    text = "prompt\n" + "cat\n" * 11
    with pytest.raises(SheetError, match="more than 10 data rows"):
        read_sheet(text.encode(), "rows.csv", limits=SheetLimits(max_rows=10))


def test_file_over_size_limit_refused_before_reading(tmp_path):
    path = tmp_path / "big.csv"
    path.write_bytes(b"prompt\n" + b"cat\n" * 1000)
    with pytest.raises(SheetError, match="limit"):
        read_sheet(path, limits=SheetLimits(max_file_bytes=100))


# Values ---------------------------------------------------------------------------------------------


def test_seed_spellings(template):
    text = (
        "prompt,seed\n"
        "a,12345\n"
        "b,12345.0\n"
        "c,1.2345E+4\n"
        f"d,{SEED_MAX}\n"
        "e,12345.5\n"
        "f,abc\n"
        f"g,{SEED_MAX + 1}\n"
        "h,-1\n"
        "i,1.23456E+2\n"
        "j,\n"
        "k,1.23456789012346E+17\n"  # how Excel writes an 18-digit seed it already rounded into a CSV
    )
    report = report_for(read_sheet(text.encode(), "rows.csv"), template)
    assert report[2].values["seed"] == 12345
    assert report[3].values["seed"] == 12345
    assert report[4].values["seed"] == 12345
    assert report[5].values["seed"] == SEED_MAX and type(report[5].values["seed"]) is int
    for bad in (6, 7, 8, 9, 10):
        assert not report[bad].ok, bad
        assert report[bad].problems[0].column == "seed"
    assert "not a whole number" in report[6].problems[0].reason
    assert "2^64" in report[8].problems[0].reason
    assert report[11].ok and "seed" not in report[11].values  # blank: derived from the batch seed later
    assert not report[12].ok and "Excel rounded to 15 digits" in report[12].problems[0].reason


def test_big_integers_never_go_through_float(template):
    # 2**63 + 1 is not representable as a float; any float detour changes the last digit.
    report = report_for(read_sheet(f"prompt,seed\na,{2**63 + 1}\n".encode(), "rows.csv"), template)
    assert report[2].values["seed"] == 2**63 + 1


def test_a_float_too_large_for_a_number_says_so(template):
    sheet = read_sheet(b"prompt,cfg\ncat,1e400\n", "rows.csv")
    problem = validate_rows(sheet, template).rows[0].problems[0]
    assert problem.column == "cfg" and "too large" in problem.reason


def test_booleans_choices_and_ranges(template):
    text = (
        "prompt,tiled,sampler,steps,cfg\n"
        "a,yes,EULER,10,7\n"
        "b,是,dpmpp_2m,50,0\n"
        "c,否,euler,1,30\n"
        "d,maybe,ddim,51,31\n"
        "e,N,Euler,0,-1\n"
    )
    report = report_for(read_sheet(text.encode(), "rows.csv"), template)
    assert report[2].values == {"prompt": "a", "tiled": True, "sampler": "euler", "steps": 10, "cfg": 7.0}
    assert report[3].values["tiled"] is True
    assert report[4].values["tiled"] is False
    columns = {p.column for p in report[5].problems}
    assert columns == {"tiled", "sampler", "steps", "cfg"}
    assert any("euler, dpmpp_2m" in p.reason for p in report[5].problems)
    assert report[6].values["tiled"] is False and {p.column for p in report[6].problems} == {"steps", "cfg"}


def test_blank_optional_cells_take_defaults_and_blank_required_is_a_problem(template):
    report = report_for(read_sheet(b"prompt,steps\n ,5\ncat,\n", "rows.csv"), template)
    assert report[2].problems[0].reason == "required value is empty"
    assert report[3].values["steps"] == 20


def test_derive_seed_is_deterministic_and_in_range():
    seeds = {derive_seed(42, row) for row in range(2, 500)}
    assert len(seeds) == 498
    assert all(0 <= s < SEED_MAX for s in seeds)
    assert derive_seed(42, 7) == derive_seed(42, 7)
    assert derive_seed(42, 7) != derive_seed(43, 7)
    assert derive_seed(SEED_MAX, 2) < SEED_MAX


def test_content_hash_ignores_encoding_but_not_data():
    a = read_sheet(b"prompt\ncat\n", "a.csv")
    b = read_sheet("\ufeffprompt\r\ncat\r\n".encode(), "b.csv")
    c = read_sheet(b"prompt\ndog\n", "c.csv")
    assert a.content_hash == b.content_hash != c.content_hash


# XLSX -----------------------------------------------------------------------------------------------


def test_xlsx_integral_floats_read_as_integers_and_text_seeds_exact(template):
    data = xlsx_bytes([["prompt", "seed", "cfg"], ["a", 12345.0, 4.5], ["b", str(SEED_MAX), 7], [None, None, None],
                       ["c", 123.5, True]])
    sheet = read_sheet(data, "rows.xlsx")
    assert sheet.format == "xlsx"
    assert [r.number for r in sheet.rows] == [2, 3, 5]
    assert sheet.rows[0].cells == {"prompt": "a", "seed": "12345", "cfg": "4.5"}
    assert sheet.rows[1].cells["seed"] == str(SEED_MAX)
    report = report_for(sheet, template)
    assert report[2].values["seed"] == 12345 and report[3].values["seed"] == SEED_MAX
    assert not report[5].ok and report[5].problems[0].column == "seed"


def test_xlsx_integer_stored_exactly_in_the_xml_stays_exact(template):
    data = xlsx_bytes([["prompt", "seed"], ["a", 7]])
    data = rewrite_member(data, SHEET_XML,
                          lambda xml: xml.replace(b"<v>7</v>", f"<v>{SEED_MAX}</v>".encode()))
    report = report_for(read_sheet(data, "rows.xlsx"), template)
    assert report[2].values["seed"] == SEED_MAX


def test_xlsx_number_past_excel_precision_is_a_cell_problem(template):
    # Excel (and openpyxl) store numbers as doubles: 2**64-1 typed as a number arrives rounded.
    data = xlsx_bytes([["prompt", "seed"], ["a", SEED_MAX]])
    report = report_for(read_sheet(data, "rows.xlsx"), template)
    assert not report[2].ok and "15" in report[2].problems[0].reason


def test_xlsx_thousands_of_formatted_empty_trailing_rows_are_fast():
    fill = PatternFill("solid", fgColor="FFFF00")

    def format_rows(ws):
        for row in range(3, 20_003):
            ws.cell(row=row, column=1).fill = fill
            ws.cell(row=row, column=2).fill = fill

    data = xlsx_bytes([["prompt", "seed"], ["cat", 1]], mutate=format_rows)
    start = time.perf_counter()
    sheet = read_sheet(data, "rows.xlsx")
    assert time.perf_counter() - start < 5
    assert [r.number for r in sheet.rows] == [2]


def test_xlsx_rows_reaching_the_last_column_are_read_in_seconds():
    """A few bytes per row (one cell at XFD) made every row 16384 cells wide: ten thousand such rows took
    minutes of CPU and gigabytes to read. Empty cells past the column limit are dropped; a value there
    refuses the sheet at once, naming its row and column."""
    fill = PatternFill("solid", fgColor="FFFF00")
    rows = [["prompt", "seed"]] + [["cat", n] for n in range(1, 10_001)]

    def format_last_column(ws):
        for row in range(2, 10_002):
            ws.cell(row=row, column=16384).fill = fill  # formatted, no value

    data = xlsx_bytes(rows, mutate=format_last_column)  # writing it is openpyxl's time, not the reader's
    start = time.perf_counter()
    sheet = read_sheet(data, "rows.xlsx")
    assert time.perf_counter() - start < 10
    assert len(sheet.rows) == 10_000 and sheet.rows[0].cells == {"prompt": "cat", "seed": "1"}

    def value_in_last_column(ws):
        for row in range(2, 10_002):
            ws.cell(row=row, column=16384).value = "x"

    data = xlsx_bytes(rows, mutate=value_in_last_column)
    start = time.perf_counter()
    with pytest.raises(SheetError, match=r"row 2 has a value in column XFD\); the limit is 200") as refused:
        read_sheet(data, "rows.xlsx")
    assert time.perf_counter() - start < 10
    assert refused.value.code == "sheet_too_many_columns"


def test_xlsx_formula_without_cached_value_is_a_cell_problem(template):
    data = xlsx_bytes([["prompt", "seed"], ["cat", "=1+1"], ["dog", 5]])  # openpyxl stores no cached value
    sheet = read_sheet(data, "rows.xlsx")
    report = report_for(sheet, template)
    assert not report[2].ok
    assert report[2].problems[0].column == "seed" and "no saved value" in report[2].problems[0].reason
    assert report[3].ok


def test_xlsx_formula_with_cached_value_uses_the_value(template):
    data = xlsx_bytes([["prompt", "seed"], ["cat", "=1+1"]])
    data = rewrite_member(data, SHEET_XML,
                          lambda xml: re.sub(rb"<f>1\+1</f>(<v\s*/>|<v></v>)?", b"<f>1+1</f><v>2</v>", xml))
    report = report_for(read_sheet(data, "rows.xlsx"), template)
    assert report[2].ok and report[2].values["seed"] == 2


def parses_of_workbooks(monkeypatch) -> list[bool]:
    """openpyxl's parses of a workbook from now on, as their data_only flag (True: values, False: formulas)."""
    import openpyxl

    parses: list[bool] = []
    real = openpyxl.load_workbook

    def load_workbook(*args, **kwargs):
        parses.append(kwargs.get("data_only", False))
        return real(*args, **kwargs)

    monkeypatch.setattr(openpyxl, "load_workbook", load_workbook)
    return parses


def test_xlsx_whose_formulas_all_have_saved_values_is_parsed_once(template, monkeypatch):
    """What Excel saves keeps each formula's value; reading the formulas too parsed a 10,000-row workbook
    twice (1.1–1.2 s instead of 0.6–0.8 s) to find none without one."""
    rows = [["prompt", "seed", "steps"]] + [[f"item {n}", f"=A{n}+1", "=20+8"] for n in range(2, 7)]
    data = rewrite_member(xlsx_bytes(rows), SHEET_XML, lambda xml: re.sub(
        rb"<f>(A\d\+1|20\+8)</f>(<v\s*/>|<v></v>)?", lambda m: m.group(0).split(b"</f>")[0] + b"</f><v>28</v>", xml))
    parses = parses_of_workbooks(monkeypatch)
    sheet = read_sheet(data, "rows.xlsx")
    assert parses == [True]
    assert sheet.problems == [] and {r.cells["steps"] for r in sheet.rows} == {"28"}
    assert all(r.ok and r.values["seed"] == 28 for r in report_for(sheet, template).values())


def test_xlsx_shared_formulas_without_saved_values_are_each_named_in_their_own_row(monkeypatch):
    """Excel writes a formula filled down once, the other cells referring to it (``<f t="shared" si="0"/>``);
    a cell of those without a saved value is still found and named with its own formula."""
    rows = [["prompt", "seed"]] + [[f"item {n}", f"=LEN(A{n})"] for n in range(2, 6)]

    def shared(xml: bytes) -> bytes:
        def cell(m: re.Match) -> bytes:
            n = int(m.group(1))
            if n == 2:  # the first carries the formula and its value
                return b'<c r="B2"><f t="shared" ref="B2:B5" si="0">LEN(A2)</f><v>6</v></c>'
            value = b"<v>6</v>" if n == 3 else b"<v/>"
            return b'<c r="B%d"><f t="shared" si="0"/>%s</c>' % (n, value)
        return re.sub(rb'<c r="B(\d)"><f>LEN\(A\d\)</f>(?:<v\s*/>|<v></v>)?</c>', cell, xml)

    data = rewrite_member(xlsx_bytes(rows), SHEET_XML, shared)
    parses = parses_of_workbooks(monkeypatch)
    sheet = read_sheet(data, "rows.xlsx")
    assert parses == [True, False]  # values, then formulas: two cells have none saved
    assert [(p.row, p.column, p.params) for p in sheet.problems] == [
        (4, "seed", {"formula": "=LEN(A4)"}), (5, "seed", {"formula": "=LEN(A5)"})]
    assert [r.cells["seed"] for r in sheet.rows] == ["6", "6", "", ""]


def excel_saved_text(values: dict[str, str]):
    """A rewrite of SHEET_XML giving the formula cells named in ``values`` (B3: "") the text Excel saves for
    them: ``t="str"`` and the text, an empty ``<v/>`` for the empty text."""
    def rewrite(xml: bytes) -> bytes:
        for ref, text in values.items():
            saved = f"<v>{text}</v>".encode() if text else b"<v/>"
            xml, found = re.subn(rb'<c r="%s"><f>(.*?)</f>(?:<v\s*/>|<v></v>)?</c>' % ref.encode(),
                                 lambda m: b'<c r="%s" t="str"><f>%s</f>%s</c>' % (ref.encode(), m.group(1), saved), xml)
            assert found == 1, ref
        return xml
    return rewrite


def test_xlsx_formula_whose_saved_value_is_the_empty_text_is_a_blank_cell(template):
    """A column of formulas filled down past the data (=IF(A5="","",...)) shows nothing below it, and Excel
    saves the empty text for those cells. Each such row was reported as a formula without a saved value
    ("open the file in Excel and save it again", which changes nothing), and each became a bad row."""
    rows = [["prompt", "sampler"]] + [[None, f'=IF(A{n}="","",IF(A{n}="cat","dpmpp_2m",""))'] for n in range(2, 31)]
    rows[1][0], rows[2][0] = "cat", "dog"
    saved = {"B2": "dpmpp_2m", **{f"B{n}": "" for n in range(3, 31)}}
    data = rewrite_member(xlsx_bytes(rows), SHEET_XML, excel_saved_text(saved))
    sheet = read_sheet(data, "rows.xlsx")
    assert sheet.problems == []
    assert [(r.number, r.cells) for r in sheet.rows] == [
        (2, {"prompt": "cat", "sampler": "dpmpp_2m"}), (3, {"prompt": "dog", "sampler": ""})]
    report = report_for(sheet, template)
    assert report[2].values["sampler"] == "dpmpp_2m" and report[3].values["sampler"] == "euler"  # the default
    assert all(r.ok for r in report.values())


def test_xlsx_formula_without_saved_value_is_still_named_beside_formulas_showing_nothing(template):
    """A file a script wrote after Excel: one formula without any saved value among formulas whose saved
    value is the empty text. The one is reported; the others are blank cells."""
    rows = [["prompt", "seed", "note"], ["cat", "=1+1", '=""'], ["dog", 5, '=""'], [None, None, '=""']]
    data = rewrite_member(xlsx_bytes(rows), SHEET_XML, excel_saved_text({"C2": "", "C3": "", "C4": ""}))
    sheet = read_sheet(data, "rows.xlsx")
    assert [(p.row, p.column, p.code) for p in sheet.problems] == [(2, "seed", "formula_without_value")]
    assert [r.number for r in sheet.rows] == [2, 3]
    report = report_for(sheet, template)
    assert not report[2].ok and report[3].ok


def test_xlsx_cells_with_an_empty_reference_are_counted_in_order_as_openpyxl_reads_them(template):
    """A tool that writes ``<c r="">`` (openpyxl counts such a cell as the next in its row): the look for formulas
    without a saved value crashed on the empty reference (UnboundLocalError) and the file could not be read."""
    rows = [["prompt", "seed", "note"], ["cat", "=1+1", '=""'], ["dog", 5, '=""']]
    data = rewrite_member(xlsx_bytes(rows), SHEET_XML, excel_saved_text({"C2": "", "C3": ""}))
    data = rewrite_member(data, SHEET_XML, lambda xml: re.sub(rb'<c r="[A-Z]+[23]"', b'<c r=""', xml))
    sheet = read_sheet(data, "rows.xlsx")
    assert [(p.row, p.column, p.code) for p in sheet.problems] == [(2, "seed", "formula_without_value")]
    assert [(r.number, r.cells["prompt"], r.cells["note"]) for r in sheet.rows] == [(2, "cat", ""), (3, "dog", "")]


def test_xlsx_cached_excel_error_is_a_cell_problem(template):
    data = xlsx_bytes([["prompt", "seed"], ["cat", "=1/0"]])
    data = rewrite_member(data, SHEET_XML, lambda xml: re.sub(
        rb'<c r="B2"([^>]*)><f>1/0</f>(<v\s*/>|<v></v>)?</c>', rb'<c r="B2" t="e"><f>1/0</f><v>#DIV/0!</v></c>', xml))
    report = report_for(read_sheet(data, "rows.xlsx"), template)
    assert not report[2].ok and "#DIV/0!" in report[2].problems[0].reason


def test_xlsx_chosen_sheet_and_unknown_sheet():
    data = xlsx_bytes([["prompt"], ["first"]], extra_sheets={"Second": [["prompt"], ["second"]]})
    assert read_sheet(data, "rows.xlsx").rows[0].cells["prompt"] == "first"
    sheet = read_sheet(data, "rows.xlsx", sheet_name="second")
    assert sheet.sheet_name == "Second" and sheet.rows[0].cells["prompt"] == "second"
    assert sheet.sheet_names == ["Sheet1", "Second"]
    with pytest.raises(SheetError, match="no worksheet 'Third'; it has: Sheet1, Second"):
        read_sheet(data, "rows.xlsx", sheet_name="Third")


def test_xlsx_zip_bomb_refused_by_ratio_before_parsing():
    data = xlsx_bytes([["prompt"], ["cat"]])
    # Whitespace after the root element is valid XML and compresses about 1000:1.
    bomb = rewrite_member(data, SHEET_XML, lambda xml: xml + b" " * (20 * 1024 * 1024))
    assert len(bomb) < 200_000
    with pytest.raises(SheetError, match="zip bomb"):
        read_sheet(bomb, "rows.xlsx")


def test_xlsx_zip_bomb_refused_by_total_size():
    data = xlsx_bytes([["prompt"], ["cat"]])
    big = rewrite_member(data, SHEET_XML, lambda xml: xml + b" " * (600 * 1024))
    with pytest.raises(SheetError, match="zip bomb"):
        read_sheet(big, "rows.xlsx", limits=SheetLimits(max_decompressed_bytes=512 * 1024))


def test_xlsx_xml_bomb_refused():
    laughs = (
        b'<!DOCTYPE worksheet [<!ENTITY lol "lol">'
        b'<!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">'
        b'<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">]>'
    )

    def inject(xml: bytes) -> bytes:
        xml = xml.replace(b"<worksheet", laughs + b"<worksheet", 1)
        return xml.replace(b"<t>cat</t>", b"<t>&lol3;</t>")

    bomb = rewrite_member(xlsx_bytes([["prompt"], ["cat"]]), SHEET_XML, inject)
    assert b"&lol3;" in zipfile.ZipFile(io.BytesIO(bomb)).read(SHEET_XML)
    with pytest.raises(SheetError, match="XML bomb"):
        read_sheet(bomb, "rows.xlsx")


def test_extension_that_lies_is_detected_by_content():
    with pytest.raises(SheetError, match="named .xlsx but holds CSV text"):
        read_sheet(b"prompt,seed\ncat,1\n", "rows.xlsx")
    with pytest.raises(SheetError, match="named .csv but is a zip archive"):
        read_sheet(xlsx_bytes([["prompt"], ["cat"]]), "rows.csv")
    with pytest.raises(SheetError, match="Excel 97-2003"):
        read_sheet(b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\x00" * 512, "rows.xls")
    with pytest.raises(SheetError, match="not an Excel workbook"):
        archive = io.BytesIO()
        with zipfile.ZipFile(archive, "w") as z:
            z.writestr("word/document.xml", "<w/>")
        read_sheet(archive.getvalue(), "rows.xlsx")
    with pytest.raises(SheetError, match="unsupported file type '.pdf'"):
        read_sheet(b"prompt\ncat\n", "rows.pdf")


def test_empty_file_and_empty_header_row():
    with pytest.raises(SheetError, match="empty"):
        read_sheet(b"  \n", "rows.csv")
    with pytest.raises(SheetError, match="row 1 must hold the column names"):
        read_sheet(b",\ncat,1\n", "rows.csv")


def test_an_empty_first_worksheet_names_the_ones_that_hold_data():
    data = xlsx_bytes([], extra_sheets={"Products": [["prompt", "seed"], ["cat", 1]]})
    with pytest.raises(SheetError, match="worksheet 'Sheet1' is empty; the workbook also has: Products"):
        read_sheet(data, "rows.xlsx")
    assert read_sheet(data, "rows.xlsx", sheet_name="Products").rows[0].cells["prompt"] == "cat"


def test_every_cell_problem_carries_a_documented_code_whose_chinese_words_take_its_values(tmp_path):
    """The validation report's codes are an API contract (clients word them in their own language) and the
    Chinese page words each of them: every code the checks produce is listed, and fills its sentence."""
    import string

    from engine.image_refs import ImageLibrary
    from engine.sheets import PROBLEM_CODES, coerce_fields
    from engine.templates import TemplateField
    from webapp.i18n import PROBLEMS_ZH

    fields = [
        TemplateField("prompt", "text", required=True), TemplateField("title", "string", max=5),
        TemplateField("steps", "int", default=1, min=1, max=50), TemplateField("cfg", "float", default=1.0),
        TemplateField("seed", "seed"), TemplateField("tiled", "bool", default=False),
        TemplateField("sampler", "choice", default="euler", choices=("euler", "dpmpp_2m")),
        TemplateField("checkpoint", "checkpoint"), TemplateField("style", "text", required=True),
    ]
    bad_cells = [
        {"prompt": "", "title": "too long a title", "steps": "1.5", "cfg": "abc", "seed": "-1", "tiled": "maybe",
         "sampler": "ddim", "checkpoint": "../etc/passwd"},
        {"prompt": "a", "steps": "0", "cfg": "1e999", "seed": "1e60", "style": "x"},
        {"prompt": "a", "steps": "99", "cfg": "inf", "style": "x", "seed": "1.23456789012346E+17"},
    ]
    problems = [p for number, raw in enumerate(bad_cells, start=2) for p in coerce_fields(fields, raw, number)[1]]

    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "shoe.png").write_bytes(b"not a png at all")
    from PIL import Image

    from engine.image_refs import ImageLimits

    Image.new("RGB", (10, 10)).save(tmp_path / "photos" / "poster.png")
    photos = ImageLibrary.from_folder(tmp_path / "photos", ImageLimits(max_pixels=50))
    for name in ("", "shoe.png", "poster.png", "shoe.gif", "boot.jpg"):
        code, reason, params = photos.problem(name)
        problems.append(type(problems[0])(5, "photo", reason, code, params))

    from engine.sheets import sheet_from_records

    problems += sheet_from_records([{"seed": 1.23456789012346e17}]).problems
    problems += sheet_from_records([{"prompt": {"text": "a cat"}}]).problems
    limits = SheetLimits(max_cell_chars=10)
    problems += read_sheet(io.BytesIO(b"prompt\n" + b"x" * 11 + b"\n"), "long.csv", limits=limits).problems
    # what Excel leaves in a workbook: a formula without its value, an error, a number past 15 digits, a
    # number that is no number; and notes on the sheet as a whole (an unnamed column, GBK read as UTF-8)
    workbook = xlsx_bytes([["prompt", "seed", "note"], ["a", 7, "=1+1"], ["b", "=1/0", SEED_MAX]])
    workbook = rewrite_member(workbook, SHEET_XML, lambda xml: re.sub(
        rb'<c r="B3"([^>]*)><f>1/0</f>(<v\s*/>|<v></v>)?</c>', rb'<c r="B3" t="e"><f>1/0</f><v>#DIV/0!</v></c>',
        xml.replace(b"<v>7</v>", b"<v>1E999</v>")))
    problems += read_sheet(workbook, "rows.xlsx").problems
    problems += read_sheet(io.BytesIO(b"prompt,,\na,b,\n"), "unnamed.csv").problems
    problems += read_sheet(io.BytesIO("prompt,seed\n一只猫,1\n".encode("gb18030")), "gbk.csv").problems
    # European Excel: a Windows-1252 CSV, decimal commas in a ';' file, and one in a sheet of decimal points
    problems += read_sheet("prompt;cfg\nMüller;7,5\n".encode("cp1252"), "de.csv").problems
    problems += coerce_fields(fields, {"prompt": "a", "style": "x", "cfg": "7,5"}, 6)[1]
    problems += read_sheet(xlsx_bytes([["prompt", "cfg"], ["a", 7], ["b", None]],
                                      mutate=lambda ws: ws.merge_cells("B2:B3")), "merged.xlsx").problems
    # number formats: one shown otherwise than stored, one that cannot be shown exactly; a title banner
    problems += read_sheet(xlsx_bytes([["prompt", "code", "count"], ["a", 42, 3]], mutate=number_formats(
        {"B": "00000", "C": "[DBNum1]0"})), "formats.xlsx").problems
    problems += read_sheet(xlsx_bytes([["Products", None], ["prompt", "cfg"], ["a", 7]],
                                      mutate=lambda ws: ws.merge_cells("A1:B1")), "title.xlsx").problems

    produced = {p.code for p in problems}
    assert produced == set(PROBLEM_CODES), f"never produced: {set(PROBLEM_CODES) - produced}"
    assert set(PROBLEMS_ZH) == set(PROBLEM_CODES)
    for problem in problems:
        wanted = {name for _, name, _, _ in string.Formatter().parse(PROBLEMS_ZH[problem.code]) if name}
        assert wanted <= set(problem.params), (problem.code, problem.params)
        PROBLEMS_ZH[problem.code].format(**problem.params)


def test_a_csv_cell_longer_than_the_csv_readers_own_limit_is_a_problem_of_its_row_only():
    huge = "x" * 200_000  # the csv module refuses fields over 131,072 characters by default
    data = f"product_name,color\nA,red\nB,{huge}\nC,blue\n".encode()

    sheet = read_sheet(io.BytesIO(data), "big.csv")

    assert [row.cells["product_name"] for row in sheet.rows] == ["A", "B", "C"]
    (problem,) = sheet.problems
    assert (problem.row, problem.column, problem.code) == (3, "color", "cell_too_long")
    assert len(sheet.rows[1].cells["color"]) == SheetLimits().max_cell_chars


def test_json_rows_are_read_with_a_spreadsheets_limits_and_cleaning():
    from engine.sheets import sheet_from_records

    sheet = sheet_from_records([{"prompt": "a\x00b\x07c", "n": 3, "ok": True}, {"prompt": "y" * 11}],
                               limits=SheetLimits(max_cell_chars=10))
    assert sheet.rows[0].cells == {"prompt": "abc", "n": "3", "ok": "true"}
    assert [(p.row, p.column, p.code) for p in sheet.problems] == [(3, "prompt", "cell_too_long")]
    with pytest.raises(SheetError, match="the limit is 2"):
        sheet_from_records([{"a": 1}] * 3, limits=SheetLimits(max_rows=2))
    with pytest.raises(SheetError, match="duplicate column names"):
        sheet_from_records([{"Product Name": "a", "product_name": "b"}])


def test_number_choices_match_cells_by_value_as_excel_writes_them():
    # Excel keeps a cell typed 1.0 as the number 1; a choice 1.0 must still be what it picks.
    schema = {"name": "numeric_choices", "fields": [
        {"name": "prompt", "type": "text", "required": True, "example": "a cat"},
        {"name": "strength", "type": "choice", "choices": [0.5, 1.0], "default": 0.5},
        {"name": "size", "type": "choice", "choices": ["512", "1024"], "default": "512"},
    ]}
    workflow = '{"1": {"class_type": "X", "inputs": {"t": {{ prompt }}, "s": {{ strength }}, "z": {{ size }}}}}'
    template = parse_template(json.dumps(schema), workflow)
    data = xlsx_bytes([["prompt", "strength", "size"], ["a", 1, 1024], ["b", 0.5, 512], ["c", 2, 256]])
    report = report_for(read_sheet(data, "rows.xlsx"), template)
    assert report[2].ok and report[2].values == {"prompt": "a", "strength": 1.0, "size": "1024"}
    assert report[3].ok and report[3].values == {"prompt": "b", "strength": 0.5, "size": "512"}
    assert {p.column for p in report[4].problems} == {"strength", "size"}
    # In a CSV, a number choice typed with trailing zeros is the same choice
    report = report_for(read_sheet(b"prompt,strength\nd,0.50\n", "rows.csv"), template)
    assert report[2].ok and report[2].values["strength"] == 0.5


def test_numbers_past_decimals_exponent_limit_are_cell_problems_not_a_failed_sheet():
    """A cell such as 1e9999999999 in a choice column, or 1e9999999999% in a number column, stopped the whole
    sheet's check with decimal.Overflow: no row was reported, none could run."""
    schema = {"name": "huge_numbers", "fields": [
        {"name": "prompt", "type": "text", "required": True, "example": "a cat"},
        {"name": "strength", "type": "choice", "choices": [0.5, 1.0], "default": 0.5},
        {"name": "cfg", "type": "float", "default": 4.5},
    ]}
    workflow = '{"1": {"class_type": "X", "inputs": {"t": {{ prompt }}, "s": {{ strength }}, "c": {{ cfg }}}}}'
    template = parse_template(json.dumps(schema), workflow)
    data = b"prompt,strength,cfg\na,1e9999999999,4\nb,1.0,1e9999999999%\nc,1e-9999999999,5\nd,1.00,50%\n"
    report = report_for(read_sheet(data, "rows.csv"), template)
    assert [(p.column, p.code) for p in report[2].problems] == [("strength", "not_a_choice")]
    assert [(p.column, p.code) for p in report[3].problems] == [("cfg", "too_large")]
    assert [(p.column, p.code) for p in report[4].problems] == [("strength", "not_a_choice")]
    assert report[5].ok and report[5].values == {"prompt": "d", "strength": 1.0, "cfg": 0.5}


def test_xlsx_dates_read_as_the_cell_shows_them():
    import datetime

    data = xlsx_bytes([["prompt", "launch"], ["a", datetime.date(2024, 1, 5)],
                       ["b", datetime.datetime(2024, 1, 5, 14, 30)]])
    assert [r.cells["launch"] for r in read_sheet(data, "rows.xlsx").rows] == ["2024-01-05", "2024-01-05 14:30:00"]


# European Excel, Excel for Mac, LibreOffice ----------------------------------------------------------


def test_a_semicolon_csv_reads_decimal_commas_and_thousands_points_with_a_note(template):
    # German Excel's "CSV (Trennzeichen-getrennt)": ';' between cells because ',' is the decimal mark
    text = "prompt;cfg;steps;seed\nKatze;7,5;20;1.234.567\nHund;12;1.024;12345,0\nMaus;0,25;;\n"
    sheet = read_sheet(text.encode(), "de.csv")
    assert sheet.decimal_comma
    report = report_for(sheet, template)
    assert report[2].ok and report[2].values["cfg"] == 7.5 and report[2].values["seed"] == 1234567
    assert report[3].values["seed"] == 12345
    (problem,) = report[3].problems  # read as German Excel shows it, and the message says both
    assert problem.column == "steps" and "'1.024' (read as 1024) is above the maximum 50" in problem.reason
    assert report[4].values["cfg"] == 0.25
    (note,) = sheet.notes
    assert "decimal comma" in note and "';' separators" in note and "'7,5' (row 2, column 'cfg') is read as 7.5" in note
    # the text of a text field stays as written
    assert report[2].values["prompt"] == "Katze" and sheet.rows[0].cells["cfg"] == "7,5"


def test_decimal_commas_are_read_where_the_files_numbers_show_them_and_refused_among_decimal_points(template):
    # Excel's "Unicode Text" from a German Excel: tabs, and numbers as German Excel shows them
    sheet = read_sheet("prompt\tcfg\r\nKatze\t7,5\r\n".encode("utf-16"), "de.txt")
    assert validate_rows(sheet, template).rows[0].values["cfg"] == 7.5 and sheet.notes
    # a ';' file whose numbers have decimal points is no decimal-comma file: 0.125 stays 0.125, no note
    sheet = read_sheet(b"prompt;cfg\na;7.25\nb;0.125\n", "points.csv")
    assert not sheet.decimal_comma and sheet.notes == []
    assert [r.values["cfg"] for r in validate_rows(sheet, template).rows] == [7.25, 0.125]
    # both marks in one sheet: the odd one is refused, saying how to write it
    report = report_for(read_sheet(b'prompt,cfg\na,7.25\nb,"7,5"\n', "mixed.csv"), template)
    (problem,) = report[3].problems
    assert problem.code == "decimal_comma_unexpected" and "write it as 7.5" in problem.reason


def test_a_percentage_as_excel_writes_it_into_a_csv_is_read_as_the_number_the_workbook_holds():
    from engine.templates import TemplateField

    strength = TemplateField("denoise", "float", default=1.0, min=0.0, max=1.0)
    assert [coerce_cell(strength, text) for text in ("75%", "75 %", "12.5%")] == [0.75, 0.75, 0.125]
    assert coerce_cell(strength, "7,5%", decimal_comma=True) == 0.075
    with pytest.raises(CellValueError, match=r"'150%' \(read as 1.5\) is above the maximum 1.0"):
        coerce_cell(strength, "150%")
    for text in ("%", "abc%", "50%%"):
        with pytest.raises(CellValueError, match="is not a number"):
            coerce_cell(strength, text)


def test_an_excel_sep_line_sets_the_delimiter_and_is_not_a_row():
    for text in ("sep=;\r\nprompt;cfg\r\nKatze;7\r\n", "sep=,\nprompt,cfg\nKatze,7\n", "sep=\t\nprompt\tcfg\nKatze\t7\n"):
        sheet = read_sheet(text.encode(), "rows.csv")
        assert sheet.columns == ["prompt", "cfg"], text
        assert [(r.number, r.cells) for r in sheet.rows] == [(2, {"prompt": "Katze", "cfg": "7"})]


@pytest.mark.parametrize("encoding, name", [("cp1252", "Windows-1252"), ("mac_roman", "MacRoman")])
def test_western_european_code_pages_are_read_as_such_not_as_chinese(encoding, name):
    # what German/French Excel for Windows, and Excel for Mac, save as plain "CSV"
    lines = ["Müller Tasse", "Straße 10 €", "Crème brûlée", "l’été à Paris", "Zoë Björk", "Ação rápida"]
    data = ("prompt\n" + "\n".join(lines) + "\n").encode(encoding)
    sheet = read_sheet(data, "rows.csv")
    assert [r.cells["prompt"] for r in sheet.rows] == lines
    assert sheet.encoding == encoding
    (note,) = sheet.notes
    assert name in note and "Müller Tasse" in note and "CSV UTF-8" in note
    for single in lines:  # one word alone is enough to tell
        assert read_sheet(f"prompt\n{single}\n".encode(encoding), "rows.csv").rows[0].cells["prompt"] == single
    # Chinese Excel's GBK keeps being read as Chinese
    for chinese in ("一只猫在沙发上", "iPhone手机壳", "他说“你好”。", "咖啡杯（白色）"):
        assert read_sheet(f"prompt\n{chinese}\n".encode("gb18030"), "rows.csv").rows[0].cells["prompt"] == chinese


def _zip_of(members):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    return buffer.getvalue()


@pytest.mark.parametrize("data, name, code, words", [
    # Excel's "Encrypt with Password" writes the .xlsx inside an OLE compound file, as an old .xls is
    (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\x00" * 504 + "EncryptedPackage".encode("utf-16-le") + b"\x00" * 64,
     "prices.xlsx", "sheet_password_protected", "protected with a password"),
    (_zip_of({"mimetype": "application/vnd.oasis.opendocument.spreadsheet", "content.xml": "<office:document/>"}),
     "rows.ods", "sheet_opendocument", "OpenDocument spreadsheet"),
    (_zip_of({"mimetype": "application/vnd.oasis.opendocument.spreadsheet", "content.xml": "<office:document/>"}),
     "rows.xlsx", "sheet_opendocument", "OpenDocument spreadsheet"),  # renamed: the content says what it is
    (_zip_of({"Index/Document.iwa": b"\x00\x01", "Metadata/Properties.plist": "<plist/>"}), "rows.numbers",
     "sheet_apple_numbers", "Apple Numbers"),
    (_zip_of({"photos/a.png": b"x"}), "rows.xlsx", "workbook_not_excel", "supported: .csv, .xlsx"),
])
def test_spreadsheets_of_other_programs_are_refused_naming_what_to_save_them_as(data, name, code, words):
    with pytest.raises(SheetError) as info:
        read_sheet(data, name)
    assert info.value.code == code and words in info.value.message
    assert ".xlsx" in info.value.message and ("CSV" in info.value.message or ".csv" in info.value.message)


def test_a_hidden_first_worksheet_is_not_the_one_read():
    # a hidden sheet of drop-down lists first in the workbook; the user sees (and filled) "Products"
    def hide_first(ws):
        ws.sheet_state = "hidden"

    data = xlsx_bytes([["sampler"], ["euler"]], sheet_title="Lists", mutate=hide_first,
                      extra_sheets={"Products": [["prompt", "cfg"], ["Katze", 7]]})
    sheet = read_sheet(data, "rows.xlsx")
    assert sheet.sheet_name == "Products" and sheet.rows[0].cells == {"prompt": "Katze", "cfg": "7"}
    assert read_sheet(data, "rows.xlsx", sheet_name="Lists").columns == ["sampler"]  # still readable by name


def test_cells_merged_down_a_column_give_their_value_to_each_row_with_a_note(template):
    def merge(ws):
        ws.merge_cells("B2:B4")  # one cfg for three products, as the user sees it
        ws.merge_cells("A6:C6")  # across columns: left as Excel's CSV export leaves it

    data = xlsx_bytes([["prompt", "cfg", "steps"], ["a", 7, 10], ["b", None, 11], ["c", None, 12], ["d", 8, 13],
                       ["e", None, None]], mutate=merge)
    sheet = read_sheet(data, "rows.xlsx")
    report = report_for(sheet, template)
    assert [report[n].values["cfg"] for n in (2, 3, 4, 5)] == [7.0, 7.0, 7.0, 8.0]
    assert report[6].values["steps"] == 20  # not filled from A6
    (note,) = sheet.notes
    assert "B2:B4" in note and "A6:C6" not in note


# Number formats: text as Excel shows it, numbers as stored ------------------------------------------------

SHOWN_TEXT = {
    "name": "shown_text",
    "filename_pattern": "{code}",
    "fields": [{"name": "code", "type": "string", "required": True}, {"name": "caption", "type": "text"},
               {"name": "cfg", "type": "float", "default": 4.5, "min": 0, "max": 30},
               {"name": "steps", "type": "int", "default": 20, "min": 1, "max": 50},
               {"name": "strength", "type": "choice", "default": 1, "choices": [0.25, 0.75, 1]}],
}


@pytest.fixture(scope="module")
def shown_template():
    return parse_template(json.dumps(SHOWN_TEXT), '{"1": {"class_type": "Note", "inputs": {"text": {{ code ~ " "'
                          ' ~ (caption or "") }}, "cfg": {{ cfg }}, "steps": {{ steps }}, "s": {{ strength }}}}}')


@pytest.mark.parametrize("value, number_format, shown", [
    (12345678905, "0000000000000", "0012345678905"),  # EAN-13 with a leading zero
    (42, "00000", "00042"),  # article number
    (123456789, "000-000-000", "123-456-789"),
    (19.9, "0.00", "19.90"),
    (1234567.891, "#,##0.00", "1,234,567.89"),
    (19.9, "[$€-407] #,##0.00", "€ 19,90"),  # German euro: decimal comma
    (1234.5, "[$€-407] #,##0.00", "€ 1.234,50"),
    (19.9, '"$"#,##0.00', "$19.90"),
    (-19.9, '"$"#,##0.00_);[Red]("$"#,##0.00)', "($19.90)"),
    (19.9, "[$¥-804]#,##0.00", "¥19.90"),
    (0.75, "0%", "75%"),
    (0.0375, "0.0%", "3.8%"),
    (1234567, "#,##0", "1,234,567"),
    (1234567, '#,##0,"k"', "1,235k"),
    (0, '0;-0;"none"', "none"),
    (-3, '0;"minus "0', "minus 3"),
    (3, '0 "pcs"', "3 pcs"),
    (2, "0.0#", "2.0"),
    (0, '_(* #,##0.00_);_(* \\(#,##0.00\\);_(* "-"??_);_(@_)', "-"),  # Excel's accounting format
])
def test_xlsx_number_cells_read_as_excel_shows_them_in_text_fields(shown_template, value, number_format, shown):
    data = xlsx_bytes([["code", "caption"], [value, "x"]], mutate=number_formats({"A": number_format}))
    report = report_for(read_sheet(data, "rows.xlsx"), shown_template)
    assert report[2].ok and report[2].values["code"] == shown


def test_xlsx_number_fields_keep_the_stored_number_and_a_note_says_what_differs(shown_template):
    data = xlsx_bytes([["code", "cfg", "steps", "strength"], [42, 0.75, 7, 0.75], [1234, 19.9, 12, 1]],
                      mutate=number_formats({"A": "00000", "B": "0%", "C": "00", "D": "0%"}))
    sheet = read_sheet(data, "rows.xlsx")
    assert sheet.rows[0].cells == {"code": "00042", "cfg": "75%", "steps": "07", "strength": "75%"}
    report = report_for(sheet, shown_template)
    assert report[2].values == {"code": "00042", "caption": "", "cfg": 0.75, "steps": 7, "strength": 0.75}
    assert report[3].values == {"code": "01234", "caption": "", "cfg": 19.9, "steps": 12, "strength": 1}
    notes = validate_rows(sheet, shown_template).notes
    assert any("'code'" in n and "'00042'" in n and "stored 42" in n for n in notes)
    assert any("'cfg'" in n and "'75%'" in n and "stored 0.75" in n for n in notes)
    assert {p.code for p in sheet.problems_for(1)} == {"read_as_shown"}
    # a price shown with two decimals says nothing: its shown text is the same number
    priced = read_sheet(xlsx_bytes([["code", "cfg"], ["a", 19.9]], mutate=number_formats({"B": "0.00"})), "p.xlsx")
    assert priced.rows[0].cells["cfg"] == "19.90" and priced.notes == []
    assert report_for(priced, shown_template)[2].values["cfg"] == 19.9


@pytest.mark.parametrize("number_format", ["[DBNum1]0", "# ?/?", "0.00E+00", "[>100]0;0", "[$€-40C] #,##0.00"])
def test_an_xlsx_number_format_that_cannot_be_shown_exactly_reads_the_stored_value_with_a_note(
        shown_template, number_format):
    data = xlsx_bytes([["code", "caption"], [42.5, "x"], [7, "y"]], mutate=number_formats({"A": number_format}))
    sheet = read_sheet(data, "rows.xlsx")
    assert [r.cells["code"] for r in sheet.rows] == ["42.5", "7"]
    (note,) = sheet.problems_for(1)
    assert note.code == "format_not_shown" and note.params["column"] == "code" and note.params["value"] == "42.5"


def test_xlsx_dates_and_times_read_in_their_own_custom_format():
    import datetime

    moment = datetime.datetime(2024, 1, 5, 14, 30)
    data = xlsx_bytes([["prompt", "de", "cn", "us", "time", "month", "english", "system"]]
                      + [["a"] + [moment] * 7], mutate=number_formats({
                          "B": "dd.mm.yyyy", "C": 'yyyy"年"m"月"d"日"', "D": "m/d/yyyy h:mm AM/PM", "E": "hh:mm",
                          "F": "mmmm yyyy", "G": "[$-409]d mmm yyyy", "H": "mm-dd-yy"}))
    sheet = read_sheet(data, "rows.xlsx")
    assert sheet.rows[0].cells == {
        "prompt": "a", "de": "05.01.2024", "cn": "2024年1月5日", "us": "1/5/2024 2:30 PM", "time": "14:30",
        "month": "2024-01-05 14:30:00",  # month names in the viewer's language: not known here
        "english": "5 Jan 2024",
        "system": "2024-01-05 14:30:00",  # Excel's short date shows in each viewer's own order: read as ISO
    }
    (note,) = sheet.problems_for(1)
    assert note.code == "format_not_shown" and note.params["column"] == "month"


def test_a_merged_title_banner_above_the_column_names_is_skipped_with_a_note(template):
    rows = [["Product list — November", None, None], [None, None, None], ["prompt", "seed", "steps"],
            ["cat", 1, 10], ["dog", 2, 12]]
    data = xlsx_bytes(rows, mutate=lambda ws: ws.merge_cells("A1:C1"))
    sheet = read_sheet(data, "rows.xlsx")
    assert sheet.columns == ["prompt", "seed", "steps"]
    assert [(r.number, r.cells["prompt"]) for r in sheet.rows] == [(4, "cat"), (5, "dog")]
    (note,) = sheet.notes
    assert "Product list — November" in note and "row 3" in note
    report = validate_rows(sheet, template)
    assert report.ok and [r.values["steps"] for r in report.rows] == [10, 12]


def test_a_title_above_the_column_names_that_cannot_be_skipped_says_the_names_must_be_in_row_1(template):
    # typed, not merged (and the same in a CSV): a title, or a sheet of one column? The template knows
    data = "Product list — November,,\nprompt,seed,steps\ncat,1,10\n".encode()
    report = validate_rows(read_sheet(data, "rows.csv"), template)
    assert report.missing_columns == ["prompt"] and report.title_above_header is not None
    assert any("column names must be in row 1" in n and "'Product list — November'" in n and "row 2" in n
               for n in report.notes)
    # one column named in row 1 with stray values beside it is no title: the usual notes only
    report = validate_rows(read_sheet(b"prompt,,\na cat,b,c\n", "rows.csv"), template)
    assert report.ok and report.title_above_header is None
    assert not any("row 1" in n and "title" in n for n in report.notes)


def test_a_batch_refused_for_a_title_above_the_column_names_says_why(services_factory, tmp_path):
    services = services_factory()
    sheet = tmp_path / "rows.csv"
    sheet.write_text("Product list — November,,\nproduct_name,color,style\nJacket,red,minimal\n", encoding="utf-8")
    with pytest.raises(BatchError) as refused:
        services.runner.prepare("product_shot", read_sheet(sheet))
    assert refused.value.code == "columns_below_title"
    assert "column names must be in row 1" in str(refused.value)


def test_a_zero_padded_product_code_reaches_the_prompt_and_the_file_name(services_factory, tmp_path):
    """End to end on the shipped product_shot template: an EAN typed 0012345678905 in Excel (the number
    12345678905 in the format 0000000000000) names the product in the prompt and in the image's file name."""
    services = services_factory()
    data = xlsx_bytes([["product_name", "color", "width", "height", "steps"], [12345678905, "red", 64, 64, 2]],
                      mutate=number_formats({"A": "0000000000000", "D": "0000"}))
    runner = services.runner
    prepared = runner.prepare("product_shot", read_sheet(data, "rows.xlsx"), batch_seed=7)
    assert prepared.rows[0]["prompt"].startswith("professional product photo of red 0012345678905")
    runner.start(prepared)
    summary = runner.run(prepared.batch_id)
    assert summary.done == 1
    (row,) = services.ledger.rows(prepared.batch_id)
    assert Path(row.image_path).name == "0012345678905_red.png" and (row.width, row.height) == (64, 64)


# Files built to hurt a shared server: every one read in bounded work and memory, or refused saying why --------


def test_xlsx_numbers_past_28_digits_read_as_excel_shows_them(shown_template):
    # Decimal's default 28 digits made these a traceback instead of a sheet
    data = xlsx_bytes([["code", "caption"], [1e30, "x"], [-1.5e300, "y"], [1e308, "z"]],
                      mutate=number_formats({"A": "#,##0"}))
    sheet = read_sheet(data, "rows.xlsx")
    assert sheet.rows[0].cells["code"] == "1" + ",000" * 10
    assert sheet.rows[1].cells["code"] == "-1,500" + ",000" * 99
    assert sheet.rows[2].cells["code"].startswith("100,000,000,000,000,") and len(sheet.rows[2].cells["code"]) == 411
    # past Excel's 15 digits: the row says so, as for any such number
    assert [p.code for p in report_for(sheet, shown_template)[2].problems] == ["excel_rounded"]


def test_xlsx_dates_past_the_year_9999_and_huge_elapsed_times_read_as_stored_with_a_note():
    import datetime

    # the last millisecond of 9999 rounds to the year 10000 when shown to the minute (Excel shows ####)
    data = xlsx_bytes([["prompt", "until", "elapsed"],
                       ["a", datetime.datetime(9999, 12, 31, 23, 59, 59, 999000), datetime.timedelta(days=10**8)]],
                      mutate=number_formats({"B": "yyyy-mm-dd hh:mm", "C": "[h]:mm"}))
    sheet = read_sheet(data, "rows.xlsx")
    assert sheet.rows[0].cells["until"].startswith("9999-12-31 23:59:59")
    assert {(p.code, p.params["column"]) for p in sheet.problems_for(1)} == {
        ("format_not_shown", "until"), ("format_not_shown", "elapsed")}


def test_a_number_format_longer_than_excels_limit_reads_the_stored_value_with_a_note():
    # Excel keeps number formats to 255 characters; a longer one in the file is no format Excel made, and
    # "0" repeated a million times made a million-character cell of every number
    data = xlsx_bytes([["prompt", "code"], ["a", 42], ["b", 7]], mutate=number_formats({"B": "0" * 256}))
    sheet = read_sheet(data, "rows.xlsx")
    assert [r.cells["code"] for r in sheet.rows] == ["42", "7"]
    (note,) = sheet.problems_for(1)
    assert note.code == "format_not_shown" and note.params["value"] == "42" and len(note.params["format"]) == 40
    assert read_sheet(xlsx_bytes([["prompt", "code"], ["a", 42]], mutate=number_formats({"B": "0" * 255})),
                      "rows.xlsx").rows[0].cells["code"] == "0" * 253 + "42"


def test_a_zip_whose_mimetype_member_unpacks_huge_is_never_unpacked_whole():
    import tracemalloc

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("mimetype", b"\0" * (200 * 1024 * 1024))  # 200 MiB in some 200 KB
        archive.writestr("xl/workbook.xml", "<workbook/>")
    data = buffer.getvalue()
    tracemalloc.start()
    try:
        with pytest.raises(SheetError) as refused:
            read_sheet(data, "rows.xlsx")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert refused.value.code == "workbook_part_compressed" and refused.value.details["member"] == "mimetype"
    assert peak < 20 * 1024 * 1024


def _with_merged_cells(data: bytes, refs, before: bytes = b"") -> bytes:
    merged = b"".join(b'<mergeCell ref="%s"/>' % ref.encode() for ref in refs)
    block = before + (b'<mergeCells count="%d">%s</mergeCells>' % (len(refs), merged) if refs else b"")
    return rewrite_member(data, "xl/worksheets/sheet1.xml", lambda xml: xml.replace(b"</sheetData>", b"</sheetData>" + block))


def test_merged_ranges_over_the_whole_column_many_times_over_fill_each_row_once(template):
    # each range B2:B1048576 walked a million rows: a few thousand of them in a tiny file took minutes.
    # A range overlapping another of its column is none Excel saves; only the first is filled.
    rows = [["prompt", "cfg", "steps"], ["a", 7, 10], ["b", None, 11], ["c", None, None]]
    data = _with_merged_cells(xlsx_bytes(rows), ["B2:B1048576"] * 300 + ["C3:C1048576", "C3:C4", "B3:B4"])
    sheet = read_sheet(data, "rows.xlsx")
    assert [(r.cells["cfg"], r.cells["steps"]) for r in sheet.rows] == [("7", "10"), ("7", "11"), ("7", "11")]
    (note,) = sheet.notes
    assert note.endswith("merged cells B2:B1048576, C3:C1048576 give their value to every row they span")


def test_text_that_only_looks_like_merged_cells_is_none():
    # inside an XML comment: Excel ignores it. A pattern search also took minutes on many "<mergeCell " there.
    rows = [["prompt", "cfg"], ["a", 7], ["b", None]]
    data = _with_merged_cells(xlsx_bytes(rows), [], before=b'<!--<mergeCell ref="B2:B3"/>' + b"<mergeCell " * 1000 + b"-->")
    sheet = read_sheet(data, "rows.xlsx")
    assert sheet.rows[1].cells["cfg"] == "" and sheet.notes == []


def test_a_column_name_merged_down_under_a_title_is_not_copied_into_a_data_row(template):
    rows = [["Product list", None, None], ["prompt", "seed", "steps"], ["cat", 1, None], ["dog", 2, 12]]

    def merge(ws):
        ws.merge_cells("A1:C1")  # the title
        ws.merge_cells("C2:C3")  # the name 'steps' over two rows, as two-row headings are made

    sheet = read_sheet(xlsx_bytes(rows, mutate=merge), "rows.xlsx")
    assert [r.cells["steps"] for r in sheet.rows] == ["", "12"]
    assert report_for(sheet, template)[3].values["steps"] == 20  # the default, not 'steps'


@pytest.mark.parametrize("change", [
    lambda xml: xml.replace(b'state="hidden"', b"state='hidden'"),
    lambda xml: xml.replace(b'state="hidden"', b'state = "hidden"'),
    lambda xml: xml.replace(b'name="Lists"', b'name="&#76;ists"'),
])
def test_a_hidden_first_worksheet_is_found_however_its_xml_is_written(change):
    def hide_first(ws):
        ws.sheet_state = "hidden"

    data = xlsx_bytes([["prompt", "cfg"], ["old", 1]], sheet_title="Lists", mutate=hide_first,
                      extra_sheets={"Products": [["prompt", "cfg"], ["Katze", 7]]})
    sheet = read_sheet(rewrite_member(data, "xl/workbook.xml", change), "rows.xlsx")
    assert sheet.sheet_name == "Products" and sheet.rows[0].cells["prompt"] == "Katze"


def test_the_code_page_is_judged_by_a_bounded_sample_of_the_text():
    from engine.sheets import MISREAD_SAMPLE_CHARS, _misread_score

    # scoring each of 20 MB of accented characters took half a minute for one upload
    score, judged = _misread_score("Café Müller, " * MISREAD_SAMPLE_CHARS)
    assert (score, judged) == (0, MISREAD_SAMPLE_CHARS)
    rows = "prompt\n" + "Café Müller Straße\n" * 9_000
    sheet = read_sheet(rows.encode("cp1252"), "rows.csv")
    assert sheet.encoding == "cp1252" and sheet.rows[-1].cells["prompt"] == "Café Müller Straße"


@pytest.mark.timeout(60)
def test_long_column_names_under_a_merged_title_are_read_in_linear_time():
    # "is this name a number?" tried every split of a run of digits: 200 names of 20,000 digits under a
    # merged title took a quarter of an hour (each name here: seconds before, microseconds now)
    import random

    digits = random.Random(0)
    names = ["".join(digits.choices("0123456789", k=20_000)) + "x" for _ in range(60)]
    data = xlsx_bytes([["Title"], names, ["v"] * len(names)], mutate=lambda ws: ws.merge_cells("A1:C1"))
    sheet = read_sheet(data, "rows.xlsx")
    assert sheet.columns == names and sheet.problems_for(1)[0].code == "title_rows_skipped"


@pytest.mark.parametrize("member, change", [
    ("xl/workbook.xml", lambda xml: re.sub(rb"<sheets>.*</sheets>", b"<sheets/>", xml)),
    ("xl/_rels/workbook.xml.rels", lambda xml: xml.replace(b"sheet1.xml", b"gone.xml")),  # not in the zip
])
def test_a_workbook_listing_no_worksheet_it_holds_is_refused_as_damaged(member, change):
    data = rewrite_member(xlsx_bytes([["prompt"], ["a"]]), member, change)
    with pytest.raises(SheetError) as refused:
        read_sheet(data, "rows.xlsx")
    assert refused.value.code == "workbook_damaged" and "no worksheet" in refused.value.message


def test_a_number_cell_naming_a_style_the_workbook_lacks_is_refused_naming_the_cell():
    data = xlsx_bytes([["prompt", "steps"], ["a", 12]])
    data = rewrite_member(data, "xl/worksheets/sheet1.xml", lambda xml: xml.replace(b'<c r="B2"', b'<c r="B2" s="99"'))
    with pytest.raises(SheetError) as refused:
        read_sheet(data, "rows.xlsx")
    assert refused.value.code == "workbook_damaged" and refused.value.message.startswith("row 2, column B:")


def test_a_zip_of_too_many_parts_is_refused_from_its_end_record_before_anything_lists_them(monkeypatch):
    """300,000 tiny parts take seconds to list, and each check of what kind of zip it is listed them again."""
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for n in range(SheetLimits().max_zip_members + 1):
            archive.writestr(f"xl/p{n}.xml", b"")
    listed = []
    real = zipfile.ZipFile.__init__

    def counted(self, *args, **kwargs):
        listed.append(args)
        real(self, *args, **kwargs)

    monkeypatch.setattr(zipfile.ZipFile, "__init__", counted)
    with pytest.raises(SheetError) as refused:
        read_sheet(buffer.getvalue(), "many.xlsx")
    assert refused.value.code == "workbook_too_many_parts"
    assert refused.value.details["count"] == SheetLimits().max_zip_members + 1
    assert listed == []
