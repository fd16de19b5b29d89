"""Library refusals said in the page's language: error codes (engine.errors.ERROR_CODES), the Chinese
words for each (webapp.i18n.ERRORS_ZH), workflow problems per node, and the codes API clients receive."""

from __future__ import annotations

import ast
import io
import re
import string
import zipfile
from pathlib import Path

import pytest

from arithmetic_nodes import arithmetic_registry
from engine.errors import ERROR_CODES, EngineError, NodeProblem, WorkflowInvalid
from engine.settings import load_settings
from engine.sheets import read_sheet
from engine.validate import validate_workflow
from engine.workflow import parse_workflow
from webapp import handlers
from webapp.guard import Caller
from webapp.i18n import (ERRORS_ZH, NODE_DETAILS_ZH, NODE_PROBLEMS_ZH, error_text, node_problem_text,
                         problem_text)

ROOT = Path(__file__).resolve().parents[1]
ALICE, BOB = Caller("alice", "user"), Caller("bob", "user")


def _codes_raised_in_source() -> dict[str, set[str]]:
    """Every ``code="..."`` passed to a call in engine/ and webapp/, with the keywords passed beside it."""
    found: dict[str, set[str]] = {}
    for path in [*ROOT.glob("engine/**/*.py"), *ROOT.glob("webapp/*.py")]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call):
                continue
            keywords = {k.arg: k.value for k in node.keywords if k.arg}
            code = keywords.get("code")
            if isinstance(code, ast.Constant) and isinstance(code.value, str) and code.value in ERROR_CODES:
                found.setdefault(code.value, set()).update(keywords)
    return found


def _placeholders(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name}


# Names and formats a Chinese sentence may carry as they are: what the user sees in Excel or in a file name.
_NAMES = {"csv", "xlsx", "xlsm", "xls", "tsv", "txt", "excel", "utf", "gb18030", "gbk", "mib", "kib", "zip", "xml", "doctype",
          "png", "jpg", "jpeg", "webp", "json", "jinja", "workflow", "template", "sd35_demo_tiny", "nan", "vae", "gpu",
          "saveimage", "previewimage", "loadimage", "lora", "controlnet", "yyyy", "filename_pattern", "class_type",
          "inputs", "api", "ods", "opendocument", "libreoffice", "openoffice", "calc", "apple", "numbers",
          "python", "sqlite", "fts5"}


def _english_words(text: str) -> list[str]:
    """Latin words of three letters or more in ``text`` that are not names (file types, formats, nodes) nor
    inside quotes or file names (the user's own values): what an English sentence left in a Chinese one
    would show."""
    # values, node types after their ids, and lists of the values allowed
    unquoted = re.sub(r"“[^”]*”|'[^']*'|\"[^\"]*\"|（\w+）|(可选|可用|可用的图片|支持)：[^；\n]*", "", text)
    unquoted = re.sub(r"[\w./-]+\.(csv|xlsx|png|zip|json|j2|safetensors|xml|txt|gif)\b", "", unquoted,
                      flags=re.IGNORECASE)
    return [w for w in re.findall(r"[A-Za-z][A-Za-z0-9_]{2,}", unquoted) if w.lower() not in _NAMES]


def test_every_error_code_is_raised_with_its_values_and_has_chinese_words():
    raised = _codes_raised_in_source()
    assert set(raised) == set(ERROR_CODES), f"registered but never raised: {set(ERROR_CODES) - set(raised)}"
    assert set(ERRORS_ZH) == set(ERROR_CODES)
    for code, params in ERROR_CODES.items():
        assert _placeholders(ERRORS_ZH[code]) == set(params), code
    # ModelNotFound passes its values positionally; every other site names them beside the code
    for code, keywords in raised.items():
        if code != "model_not_found":
            assert set(ERROR_CODES[code]) <= keywords, (code, keywords)


@pytest.mark.parametrize("code", sorted(ERROR_CODES))
def test_every_registered_code_is_a_whole_chinese_sentence_filled_from_its_detail_names(code):
    """A code added to ERROR_CODES without Chinese words, or with words that name another value, fails here.
    Details arrive as text, numbers or lists (a list is written as its items), so the words use no format
    specifications."""
    assert code in ERRORS_ZH, f"{code} has no Chinese words in webapp.i18n.ERRORS_ZH"
    names = ERROR_CODES[code]
    for sample in ("值", 7, ["甲", "乙"]):
        said = error_text(EngineError("the engine's English", code=code, **{name: sample for name in names}), "zh")
        assert said != "the engine's English" and "{" not in said and "}" not in said, (code, said)
        assert re.search("[\u4e00-\u9fff]", said), (code, said)
        assert not _english_words(said), (code, said)


# ---------------------------------------------------------------------------------- over the real library


@pytest.fixture(scope="module")
def demo_engine(tmp_path_factory):
    from engine.runtime import Engine

    return Engine(load_settings({"data_dir": str(tmp_path_factory.mktemp("engine"))}, environ={}))


@pytest.fixture
def services(tmp_path, demo_engine):
    from engine.services import build_services

    settings = load_settings({"data_dir": str(tmp_path / "data"), "templates_dir": str(ROOT / "templates")},
                             environ={})
    built = build_services(settings, demo_engine)
    yield built
    built.close()


def refusal(call) -> EngineError:
    with pytest.raises(EngineError) as caught:
        call()
    return caught.value


def test_sheet_refusals_are_said_in_chinese_and_keep_the_english_words_on_an_english_page(services, tmp_path):
    empty, header_only, missing = tmp_path / "empty.csv", tmp_path / "header.csv", tmp_path / "missing.csv"
    empty.write_text("", encoding="utf-8")
    header_only.write_text("product_name,color\n", encoding="utf-8")
    missing.write_text("color\nred\n", encoding="utf-8")

    def check(path, template="product_shot"):
        return lambda: handlers.check_sheet(services, ALICE, template, path)

    cases = [
        (check(empty), "sheet_empty", "表格文件“empty.csv”是空的"),
        (check(header_only), "sheet_no_data_rows", "没有数据行"),
        (check(missing), "required_columns_missing", "表格缺少必填列：product_name"),
        (check(missing, template="no_such"), "template_not_found", "没有模板“no_such”；可用：article_workflow"),
        (check(missing, template=""), "template_not_chosen", "请先选择模板"),
        (lambda: handlers.parse_seed("12.5"), "batch_seed_not_whole", "批次种子必须是整数，而不是“12.5”"),
        (lambda: handlers.resume_batch(services, ALICE, "b-none"), "batch_not_found", "记录中没有批次“b-none”"),
        (lambda: handlers.start_batch(services, None), "batch_not_checked", "请先检查表格"),
    ]
    for call, code, chinese in cases:
        exc = refusal(call)
        assert exc.code == code
        assert chinese in handlers.error_message(exc, "zh")
        assert handlers.error_message(exc, "en") == exc.message  # the engine's own words, unchanged


def test_another_users_batch_is_refused_in_chinese_naming_batch_and_owner(services, tmp_path):
    sheet = tmp_path / "rows.csv"
    sheet.write_text("product_name,width,height,steps\nmug,64,64,1\n", encoding="utf-8")
    checked = handlers.check_sheet(services, ALICE, "product_shot", sheet)
    batch_id = services.runner.start(checked.prepared)  # recorded, not queued: ownership is all that matters

    exc = refusal(lambda: handlers.cancel_batch(services, BOB, batch_id))
    assert exc.code == "batch_not_owner"
    assert handlers.error_message(exc, "zh") == f"批次 {batch_id} 由 alice 启动：只有本人或管理员可以停止或继续"


def test_saving_over_a_shipped_template_is_refused_in_chinese(services):
    shipped = ROOT / "templates" / "turbo_draft"
    files = {name: (shipped / name).read_bytes() for name in ("template.json", "workflow.json.j2")}
    exc = refusal(lambda: services.templates.add(files, replace=True))
    assert exc.code == "template_shipped"
    assert handlers.error_message(exc, "zh").startswith("“turbo_draft”是内置模板，不能替换")


def test_a_row_whose_workflow_fails_names_node_and_input_in_chinese(services, tmp_path):
    """A photo template's sheet without the photos: the row's problem is LoadImage's, said per node."""
    sheet = tmp_path / "rows.csv"
    sheet.write_text("product_name,product_photo,scene\nmug,mug.png,kitchen\n", encoding="utf-8")
    prepared = services.runner.prepare("product_in_scene", read_sheet(sheet), on_invalid="skip")
    (problem,) = prepared.report.rows[0].problems
    assert problem.code == "workflow_invalid"
    (node,) = problem.params["problems"]
    assert (node["class_type"], node["input_name"]) == ("LoadImage", "image")

    chinese = problem_text(problem, "zh")
    assert chinese == f"{problem.column}: 节点 {node['node_id']}（LoadImage）的输入“image”：找不到图片“mug.png”；可用的图片：无"
    assert problem_text(problem, "en") == f"{problem.column}: {problem.reason}"

    table = handlers.check_sheet(services, ALICE, "product_in_scene", sheet, lang="zh").rows
    assert table[0][2] == chinese


def test_workflow_problems_of_every_kind_are_said_in_chinese_per_node():
    registry = arithmetic_registry()
    broken = {
        "1": {"class_type": "Number", "inputs": {"value": "many"}},  # invalid_input_type
        "3": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": ["9", 0]}},  # bad_linked_input
        # required_input_missing (number) and value_not_in_list (mode)
        "4": {"class_type": "Pick", "inputs": {"seed": 1, "mode": "median", "scale": 2.0}},
        "5": {"class_type": "Show", "inputs": {"value": ["4", 1], "label": ["3", 0]}},  # return_type_mismatch
        "6": {"class_type": "Teleport", "inputs": {}},  # invalid_prompt (unknown node type)
    }
    problems = validate_workflow(parse_workflow(broken, registry), registry)
    said = {(p.node_id, p.input_name): node_problem_text(p, "zh") for p in problems}
    # Each said whole from the problem's values, not around the engine's English sentence
    assert said == {
        ("1", "value"): "节点 1（Number）的输入“value”：“many”不是有效的整数",
        ("3", "b"): "节点 3（Add）的输入“b”：连接到不存在的节点 9",
        ("4", "number"): "节点 4（Pick）的输入“number”：缺少必需的输入（类型 整数）",
        ("4", "mode"): "节点 4（Pick）的输入“mode”：“median”不在可选值中；可选：sum, product",
        ("5", "value"): "节点 5（Show）的输入“value”：连接的输出类型是 文字，而此输入需要 整数",
        ("5", "label"): "节点 5（Show）的输入“label”：连接的输出类型是 整数，而此输入需要 文字",
        ("6", None): "节点 6（Teleport）：未知的节点类型“Teleport”，本程序不支持",
    }
    for problem in problems:
        assert node_problem_text(problem, "en") == problem.describe()

    page = error_text(WorkflowInvalid(problems), "zh")
    assert page.splitlines()[0] == "工作流检查未通过:"
    assert len(page.splitlines()) == 1 + min(len(problems), 10)
    no_outputs = NodeProblem(None, None, "prompt_no_outputs", "Prompt has no outputs")
    assert node_problem_text(no_outputs, "zh") == "工作流：没有输出节点（例如 SaveImage 或 PreviewImage），不会生成任何图片"
    # A rare kind (a node's own check) is a whole Chinese sentence, the engine's words after it in brackets
    rare = NodeProblem("4", "SaveImage", "custom_validation_failed", "filename_prefix '/x' leads outside",
                       "use a relative prefix", "filename_prefix")
    assert node_problem_text(rare, "zh") == (
        "节点 4（SaveImage）的输入“filename_prefix”：检查未通过（filename_prefix '/x' leads outside: use a relative prefix）")


def test_out_of_range_values_links_to_missing_outputs_and_cycles_name_their_values_in_chinese():
    registry = arithmetic_registry()
    workflow = {
        "1": {"class_type": "Number", "inputs": {"value": 5}},
        "2": {"class_type": "Pick", "inputs": {"number": ["1", 3], "seed": -1, "mode": "sum", "scale": 99.0}},
        "3": {"class_type": "Show", "inputs": {"value": ["2", 0]}},
        "7": {"class_type": "Add", "inputs": {"a": ["8", 0], "b": 1}},
        "8": {"class_type": "Add", "inputs": {"a": ["7", 0], "b": 1}},
        "9": {"class_type": "Show", "inputs": {"value": ["8", 0]}},
    }
    said = {node_problem_text(p, "zh") for p in validate_workflow(parse_workflow(workflow, registry), registry)}
    assert said >= {
        "节点 2（Pick）的输入“number”：连接到节点 1 的第 3 号输出，但该节点只有 1 个输出",
        "节点 2（Pick）的输入“seed”：-1 小于最小值 0",
        "节点 2（Pick）的输入“scale”：99.0 大于最大值 10.0",
        "工作流：工作流中有循环：节点 7, 8 互相依赖",
    }, said


def test_a_model_file_not_in_the_folder_lists_the_files_there_in_chinese(demo_engine):
    with pytest.raises(WorkflowInvalid) as caught:
        demo_engine.validate(demo_engine.parse({
            "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "nope.safetensors"}},
            "2": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
            "3": {"class_type": "VAEDecode", "inputs": {"samples": ["2", 0], "vae": ["1", 2]}},
            "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}},
        }))
    (problem,) = caught.value.problems
    assert node_problem_text(problem, "zh") == (
        "节点 1（CheckpointLoaderSimple）的输入“ckpt_name”：找不到模型文件“nope.safetensors”；可用：sd35_demo_tiny")


def test_every_node_problem_sentence_fills_in_only_values_its_entry_requires():
    for kind, entries in NODE_DETAILS_ZH.items():
        assert kind in NODE_PROBLEMS_ZH, kind
        for wanted, words in entries:
            assert _placeholders(words) <= set(wanted), (kind, words)


def test_an_error_without_a_code_keeps_the_engines_words_in_every_language():
    plain = EngineError("the moon is in the way", reason="moon")
    assert error_text(plain, "en") == "the moon is in the way"
    assert error_text(plain, "zh") == "出错了：the moon is in the way"  # its kind first, then the same words
    assert "code" not in plain.to_dict()


def test_page_handlers_raise_the_refusal_in_the_language_of_the_request(services):
    import gradio as gr

    from webapp.ui import _guard

    @_guard
    def resume(batch_id: str, request: gr.Request):
        handlers.resume_batch(services, ALICE, batch_id)

    for header, expected in (("zh-CN,zh;q=0.9", "记录中没有批次“b-none”"), ("en-US", "no batch 'b-none' in the ledger")):
        with pytest.raises(gr.Error) as raised:
            resume("b-none", gr.Request(headers={"accept-language": header}))
        assert raised.value.message == expected


# ------------------------------------------------------------------------- every message a sheet can get


def _zip(members: dict[str, bytes], method: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", method) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def _crc_broken_workbook() -> bytes:
    data = bytearray(_zip({"xl/workbook.xml": b"<workbook>hello</workbook>"}, zipfile.ZIP_STORED))
    data[data.index(b"hello")] = ord("j")  # stored as is: the bytes change, the checksum does not
    return bytes(data)


def _workbook_with_a_damaged_number() -> bytes:
    from openpyxl import Workbook

    book = Workbook()
    book.active.append(["prompt", "seed"])
    book.active.append(["cat", 7])
    buffer = io.BytesIO()
    book.save(buffer)
    source, out = zipfile.ZipFile(io.BytesIO(buffer.getvalue())), io.BytesIO()
    with zipfile.ZipFile(out, "w") as target:
        for info in source.infolist():
            data = source.read(info)
            target.writestr(info, data.replace(b"<v>7</v>", b"<v>INF</v>") if "worksheets" in info.filename else data)
    return out.getvalue()


SHEETS_REFUSED = [
    ("rows.xlsx", b"prompt\na cat\n", {}, "sheet_xlsx_holds_csv",
     "“rows.xlsx”的扩展名是 .xlsx，但内容是 CSV 文本，不是 Excel 工作簿；请改名为 .csv，或在 Excel 中另存为“Excel 工作簿（.xlsx）”"),
    ("rows.csv", _zip({"xl/workbook.xml": b"<workbook/>"}), {}, "sheet_csv_holds_zip",
     ("“rows.csv”的扩展名是 .csv，但它是 zip 压缩包（可能是 Excel 工作簿），不是 CSV 文本；请改名为 .xlsx，"
      "或在 Excel 中另存为“CSV UTF-8（逗号分隔）”")),
    ("rows.csv", b"prompt\n\xff\xff\xff\n", {}, "sheet_encoding_unknown",
     "无法按 UTF-8、GB18030/GBK、“Windows-1252”或“MacRoman”编码读取该 CSV 文件；请在 Excel 中另存为“CSV UTF-8（逗号分隔）”"),
    ("rows.csv", b"\xff\xfea", {}, "sheet_utf16_invalid",
     "文件以 UTF-16 标记开头，但内容不是有效的 UTF-16；请在 Excel 中另存为“CSV UTF-8（逗号分隔）”"),
    ("rows.csv", b'prompt\na cat\n"a dog" on a mat\n', {}, "sheet_csv_unparsable",
     "第 3 行无法按 CSV 读取：请检查该行是否有未闭合的引号，或引号后紧跟着其他文字"),
    ("rows.xlsx", _zip({"word/document.xml": b"<w/>"}), {}, "workbook_not_excel",
     "文件是 zip 压缩包，但不是 Excel 工作簿（没有 xl/workbook.xml）；支持：.csv、.xlsx"),
    ("rows.xlsx", _zip({f"xl/{n}.xml": b"<x/>" for n in range(5)}), {"max_zip_members": 3},
     "workbook_too_many_parts", "工作簿有 5 个部件，上限为 3"),
    ("rows.xlsx", _zip({"xl/big.xml": b"<x>" + b" " * 3_000_000 + b"</x>"}), {"max_decompressed_bytes": 2 * 1048576},
     "workbook_unpacks_too_large", "工作簿解压后超过 2 MiB（疑似压缩炸弹），已拒绝"),
    ("rows.xlsx", _zip({"xl/big.xml": b"<x>" + b" " * 3_000_000 + b"</x>"}), {}, "workbook_part_compressed",
     "工作簿部件“xl/big.xml”的压缩比为"),
    ("rows.xlsx", _zip({"xl/workbook.xml": b'<!DOCTYPE x [<!ENTITY a "aaaa">]><x>&a;</x>'}), {},
     "workbook_xml_entities", "工作簿部件“xl/workbook.xml”声明了 XML 实体（DOCTYPE），疑似 XML 炸弹，已拒绝"),
    ("rows.xlsx", _crc_broken_workbook(), {}, "workbook_part_unreadable",
     "工作簿部件“xl/workbook.xml”无法读取（文件已损坏或已加密）"),
    ("rows.xlsx", _workbook_with_a_damaged_number(), {}, "workbook_damaged", "工作簿无法打开（文件已损坏，或不是 .xlsx）"),
]


@pytest.mark.parametrize("filename, data, limits, code, chinese", SHEETS_REFUSED,
                         ids=[case[3] for case in SHEETS_REFUSED])
def test_a_sheet_that_cannot_be_read_is_refused_in_chinese(filename, data, limits, code, chinese):
    from engine.sheets import SheetLimits

    exc = refusal(lambda: read_sheet(data, filename, limits=SheetLimits(**limits)))
    assert exc.code == code
    said = handlers.error_message(exc, "zh")
    assert said.startswith(chinese), said
    assert not _english_words(said), said
    assert handlers.error_message(exc, "en") == exc.message


def test_cell_problems_excel_leaves_and_notes_on_the_whole_sheet_are_said_in_chinese(services, tmp_path):
    from openpyxl import Workbook

    book = Workbook()
    for row in (["prompt", "seed", "", "steps"], ["a cat", "=1+1", "x", 1], ["a dog", 2**64 - 1, "", 1]):
        book.active.append(row)
    book.save(tmp_path / "rows.xlsx")
    checked = handlers.check_sheet(services, ALICE, "turbo_draft", tmp_path / "rows.xlsx", lang="zh")
    assert checked.rows[0][2] == "seed: 公式 =1+1 没有保存的计算结果；请在 Excel 中打开文件并重新保存（或粘贴为数值）"
    assert checked.rows[1][2] == ("seed: “18446744073709549568”是被 Excel 舍入到 15 位的数字；请在 Excel 中把该列设为"
                                  "“文本”格式后重新输入")
    assert "第 1 行中 C 列没有列名，该列的 1 个值已忽略" in checked.summary

    (tmp_path / "gbk.csv").write_bytes("prompt,seed\n一只猫,1\n".encode("gb18030"))  # also valid UTF-8
    checked = handlers.check_sheet(services, ALICE, "turbo_draft", tmp_path / "gbk.csv", lang="zh")
    assert "文件按 UTF-8 读取，但其中的文字按 GB18030/GBK 读才是中文（例如“一只猫,1”）" in checked.summary
    assert not _english_words(checked.summary)


# ------------------------------------------------------------------------ the photos uploaded with a sheet


def _png(size: tuple[int, int] = (8, 8)) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def _crc_broken_photos() -> bytes:
    data = bytearray(_zip({"mug.png": b"\x89PNG hello"}, zipfile.ZIP_STORED))
    data[data.index(b"hello")] = ord("j")
    return bytes(data)


PHOTOS_REFUSED = [
    (b"PK\x03\x04 truncated", {}, "photos_not_a_zip", "上传的产品照片不是有效的 zip 压缩包；请把照片打包成 zip 后上传"),
    (_zip({"mug.png": bytes(range(256)) * 8192}, zipfile.ZIP_STORED), {"max_archive_bytes": 1048576},
     "photos_zip_too_large", "照片压缩包有 2.0 MiB，上限为 1 MiB"),
    (_zip({"../mug.png": _png()}), {}, "photos_unsafe_path",
     "照片压缩包中“../mug.png”的路径不安全（绝对路径、“..”或控制字符），已拒绝"),
    (_zip({"a.png": _png(), "b.png": _png(), "c.png": _png()}), {"max_members": 2}, "photos_too_many_entries",
     "照片压缩包有 3 个条目，上限为 2"),
    (_zip({"a.png": _png(), "b.png": _png()}), {"max_images": 1}, "photos_too_many", "照片超过 1 张；请拆分成较小的批次"),
    (_zip({"red/mug.png": _png(), "blue/MUG.png": _png()}), {}, "photos_duplicate_name",
     "有两张照片都叫“MUG.png”（不区分大小写和文件夹）：“red/mug.png”和“blue/MUG.png”；请给其中一张改名，使每个单元格只对应一张照片"),
    (_zip({"mug.png": bytes(range(256)) * 8192}, zipfile.ZIP_STORED), {"max_file_bytes": 1048576}, "photo_too_large",
     "照片“mug.png”有 2.0 MiB，上限为 1 MiB"),
    (_zip({"mug.png": bytes(3 * 1048576)}), {}, "photo_compressed", "照片“mug.png”的压缩比为"),
    (_zip({"a.png": bytes(range(256)) * 4096, "b.png": bytes(range(256)) * 4096}, zipfile.ZIP_STORED),
     {"max_total_bytes": 1048576, "max_file_bytes": 1048576}, "photos_unpack_too_large",
     "照片压缩包解压后超过 1 MiB（疑似压缩炸弹），已拒绝"),
    (_crc_broken_photos(), {}, "photo_unpack_failed", "照片“mug.png”无法解压（压缩包已损坏或已加密）"),
]


@pytest.mark.parametrize("data, limits, code, chinese", PHOTOS_REFUSED, ids=[case[2] for case in PHOTOS_REFUSED])
def test_a_photos_zip_that_is_refused_is_refused_in_chinese(tmp_path, data, limits, code, chinese):
    from engine.image_refs import ImageLibrary, ImageLimits

    exc = refusal(lambda: ImageLibrary.from_zip(data, tmp_path / "photos", ImageLimits(**limits)))
    assert exc.code == code
    said = handlers.error_message(exc, "zh")
    assert said.startswith(chinese), said
    assert not _english_words(said), said


def test_photos_that_are_no_photos_or_too_large_are_row_problems_said_in_chinese(services, tmp_path):
    (tmp_path / "photos.zip").write_bytes(_zip({"mug.png": b"not a png", "poster.png": _png((100, 100))}))
    (tmp_path / "rows.csv").write_text("product_name,product_photo,scene\nmug,mug.png,desk\nposter,poster.png,wall\n"
                                       "cup,cup.png,kitchen\n", encoding="utf-8")
    from engine.image_refs import ImageLimits

    images = services.runner.unpack_photos(tmp_path / "photos.zip", ImageLimits(max_pixels=5000))
    prepared = services.runner.prepare("product_in_scene", read_sheet(tmp_path / "rows.csv"), images=images)
    said = [problem_text(p, "zh") for row in prepared.report.rows for p in row.problems]
    assert said == [
        "product_photo: 图片“mug.png”无法读取（文件已损坏或不是图片）",
        "product_photo: 图片“poster.png”（100×100，共 1 帧）超过 5,000 像素的上限",
        "product_photo: 上传的图片中没有“cup.png”；可用：-",
    ]


def test_a_photo_of_the_single_image_form_and_a_model_switch_are_refused_in_chinese(services, tmp_path):
    (tmp_path / "mug.gif").write_bytes(b"GIF89a")
    exc = refusal(lambda: handlers.stage_single_photos(services, "product_in_scene",
                                                       {"product_photo": tmp_path / "mug.gif"}))
    assert exc.code == "upload_photo_unsupported"
    assert handlers.error_message(exc, "zh") == "product_photo：“mug.gif”不是支持的照片格式；支持：.png, .jpg, .jpeg, .webp"

    exc = refusal(lambda: handlers.switch_model(services, Caller("root", "admin"), "sd3.5_large.safetensors"))
    assert exc.code == "model_not_allowed"
    assert handlers.error_message(exc, "zh") == "不能切换到模型“sd3.5_large.safetensors”；可选：sd35_demo_tiny"


# ------------------------------------------------------------------------------------------ templates


def _turbo_files(schema_change=None, workflow_change=None) -> dict[str, bytes]:
    import json

    shipped = ROOT / "templates" / "turbo_draft"
    schema = json.loads((shipped / "template.json").read_text(encoding="utf-8"))
    schema["name"] = "my_draft"
    if schema_change:
        schema_change(schema)
    workflow = (shipped / "workflow.json.j2").read_text(encoding="utf-8")
    if workflow_change:
        workflow = workflow_change(workflow)
    return {"template.json": json.dumps(schema).encode(), "workflow.json.j2": workflow.encode()}


def test_a_row_the_template_cannot_render_is_said_in_chinese(services, tmp_path):
    """An uploaded template whose own expression fails for some rows (a division by steps - 3): the row's
    problem carries the template error's code, so the report says it in Chinese."""
    files = _turbo_files(workflow_change=lambda w: w.replace('"cfg": 1.0', '"cfg": {{ 12 // (steps - 3) }}'))
    services.templates.add(files)
    sheet = tmp_path / "rows.csv"
    sheet.write_text("prompt,width,height,steps\na cat,64,64,4\na dog,64,64,3\n", encoding="utf-8")
    checked = handlers.check_sheet(services, ALICE, "my_draft", sheet, lang="zh")
    assert checked.rows[0][1] == "正常"
    assert checked.rows[1][2] == "整行: 模板“my_draft”渲染失败：模板本身有误，请管理员检查它的 workflow.json.j2"
    (problem,) = services.runner.prepare("my_draft", read_sheet(sheet)).report.rows[1].problems
    assert problem.code == "template_render_failed" and problem.params["template"] == "my_draft"


def test_a_field_without_a_value_stops_the_render_in_chinese():
    from engine.templates import parse_template

    files = _turbo_files()
    template = parse_template(files["template.json"], files["workflow.json.j2"])
    exc = refusal(lambda: template.render({"prompt": "a cat"}))  # no checkpoint, and no default given
    assert exc.code == "template_value_missing"
    assert error_text(exc, "zh") == "模板“my_draft”需要字段“checkpoint”的值，但单元格为空且没有默认值"


TEMPLATES_REFUSED = [
    (lambda f: f.update({"notes.txt": b"hi"}), "template_upload_unexpected_files",
     "上传了不属于模板的文件：notes.txt；模板由 template.json、workflow.json.j2 以及可选的 example.png 组成"),
    (lambda f: f.pop("workflow.json.j2"), "template_upload_lacks_file", "上传的文件中缺少 workflow.json.j2"),
    (lambda f: f.update({"template.json": b"{'name': 'x'}"}), "template_schema_not_json",
     "template.json 必须是有效的 UTF-8 JSON 对象"),
    (lambda f: f.update({"template.json": f["template.json"].replace(b'"my_draft"', b'"My Draft"')}),
     "template_name_invalid", "模板名称“My Draft”无效：只能由 1–64 个小写字母、数字、“_”或“-”组成"),
    (lambda f: f.update({"workflow.json.j2": f["workflow.json.j2"].replace(b"{{ prompt }}", b"{{ prompt | }}")}),
     "template_jinja_syntax", "模板“my_draft”的 workflow.json.j2 第 3 行有 Jinja 语法错误："),
    (lambda f: f.update({"workflow.json.j2": f["workflow.json.j2"].replace(b"{{ prompt }}", b"{{ promt }}")}),
     "template_name_not_a_field", "模板“my_draft”的工作流用到了“promt”，但 template.json 没有声明这些字段"),
    (lambda f: f.update({"workflow.json.j2": f["workflow.json.j2"].replace(b'"steps": {{ steps }}', b'"steps": 4')}),
     "template_field_unused", "模板“my_draft”声明了字段“steps”，但工作流和 filename_pattern 都没有用到；请使用它，或从 template.json 中删除"),
    (lambda f: f.update({"workflow.json.j2": f["workflow.json.j2"].replace(b'"cfg": 1.0', b'"cfg": 1.0,')}),
     "template_invalid_json", "模板“my_draft”渲染出的内容不是有效的 JSON（第 8 行第 58 列）"),
    (lambda f: f.update({"workflow.json.j2": f["workflow.json.j2"].replace(b'"sgm_uniform"', b'"sideways"')}),
     "template_example_invalid", "模板“my_draft”的示例工作流未通过检查\n• 节点 5（KSampler）的输入“scheduler”：“sideways”不在可选值中；可选："),
    (lambda f: f.update({"example.png": b"GIF89a"}), "template_example_not_png", "example.png 必须是 PNG 图片，且小于"),
    # A definition's mistakes, each with its own code, naming the field, key or node at fault
    (lambda f: f.update({"template.json": f["template.json"].replace(b'"min": 1,', b'"min": 100,')}),
     "template_field_min_above_max", "模板“my_draft”的字段“steps”的最小值 100 大于最大值 12"),
    (lambda f: _change_schema(f, lambda s: s["fields"][3].update({"defualt": 512})),
     "template_field_unknown_keys", "模板“my_draft”的字段“width”有未知的键：“defualt”"),
    (lambda f: _change_schema(f, lambda s: s["fields"][3].update({"default": 4096})),
     "template_field_value_refused", "模板“my_draft”的字段“width”的“default”值不符合该字段自己的要求：4096 大于最大值 2048"),
    (lambda f: _change_schema(f, lambda s: s["fields"][5].update({"required": "false"})),
     "template_field_required_not_boolean",
     "模板“my_draft”的字段“steps”的“required”必须是“true”或“false”（不加引号），不能是“false”"),
    (lambda f: _change_schema(f, lambda s: s["fields"].append("steps")),
     "template_field_not_object", "模板“my_draft”的“fields”中第 7 项必须是 JSON 对象"),
    (lambda f: _change_schema(f, lambda s: s.update({"filename_pattern": "draft_{row}_{produkt}"})),
     "template_filename_pattern_unknown",
     "模板“my_draft”的 filename_pattern 用到了“produkt”，它不是字段；可用：prompt, seed, checkpoint, width"),
    (lambda f: _change_schema(f, lambda s: s["translations"]["zh"]["fields"].update({"stpes": "步数"})),
     "template_translation_field_unknown",
     "模板“my_draft”的“translations”中“zh”的“fields”写了“stpes”，但 template.json 没有声明这些字段"),
    (lambda f: f.update({"workflow.json.j2": f["workflow.json.j2"].replace(b"{{ prompt }}", b"{{ prompt | tojson }}")}),
     "template_tojson_redundant", "模板“my_draft”的 workflow.json.j2 第 3 行：请删除“|tojson”"),
    (lambda f: f.update({"workflow.json.j2": f["workflow.json.j2"].replace(b'"3": {"class_type"', b'"3": {"class"')}),
     "template_node_malformed", "模板“my_draft”渲染出的节点“3”必须是含有“class_type”和“inputs”的对象"),
]


def _change_schema(files: dict[str, bytes], change) -> None:
    import json

    schema = json.loads(files["template.json"])
    change(schema)
    files["template.json"] = json.dumps(schema).encode()


@pytest.mark.parametrize("change, code, chinese", TEMPLATES_REFUSED, ids=[case[1] for case in TEMPLATES_REFUSED])
def test_a_template_an_admin_saves_is_refused_in_chinese(services, change, code, chinese):
    files = _turbo_files()
    change(files)
    exc = refusal(lambda: services.templates.add(files))
    assert exc.code == code
    said = handlers.error_message(exc, "zh")
    assert said.startswith(chinese), said
    if code != "template_jinja_syntax":  # Jinja's own words of what it could not parse
        assert not _english_words(said), said


def test_every_refusal_of_a_template_definition_has_its_own_code():
    """Whatever parse_template refuses is said in the page's language from a code given where it is raised,
    never a catch-all added later that loses which field or node is at fault."""
    source = (ROOT / "engine" / "templates.py").read_text(encoding="utf-8")
    checked = {"parse_template", "_parse_field", "_parse_translations", "_check_api_shape", "load_template", "add"}
    uncoded = []
    for function in ast.walk(ast.parse(source)):
        if not isinstance(function, ast.FunctionDef) or function.name not in checked:
            continue
        for node in ast.walk(function):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "TemplateError" \
                    and not any(k.arg == "code" for k in node.keywords):
                uncoded.append(f"{function.name} line {node.lineno}")
    assert not uncoded, f"TemplateError without a code: {uncoded}"


# -------------------------------------------------------------------------- history, progress, system


def test_a_skipped_row_says_why_in_chinese_in_the_history(services, tmp_path):
    sheet = tmp_path / "rows.csv"
    sheet.write_text("prompt,seed,width,height,steps\na cat,abc,64,64,1\na dog,1,64,64,1\n", encoding="utf-8")
    batch_id = services_start(services, sheet)
    detail = handlers.generation_detail(services, f"{batch_id}:2")
    rows = dict(handlers.generation_rows(detail, "zh"))
    assert rows["错误"] == "seed: “abc”不是整数"
    assert dict(handlers.generation_rows(detail, "en"))["Error"] == "seed: 'abc' is not a whole number"


def test_a_row_that_ran_past_its_deadline_says_so_in_chinese(tmp_path, demo_engine):
    from engine.services import build_services

    settings = load_settings({"data_dir": str(tmp_path / "data"), "templates_dir": str(ROOT / "templates"),
                              "row_timeout_s": 1e-6}, environ={})
    built = build_services(settings, demo_engine)
    try:
        sheet = tmp_path / "rows.csv"
        sheet.write_text("prompt,seed,width,height,steps\na cat,1,64,64,2\n", encoding="utf-8")
        batch_id = services_start(built, sheet)
        built.runner.run(batch_id)
        detail = handlers.generation_detail(built, f"{batch_id}:2")
        assert detail["status"] == "timed_out"
        assert dict(handlers.generation_rows(detail, "zh"))["错误"] == "节点 5（KSampler）：采样超过了 1e-06 秒的时间限制"
        assert detail["extra"]["failure"]["code"] == "sampler_deadline"
    finally:
        built.close()


def services_start(services, sheet) -> str:
    checked = handlers.check_sheet(services, ALICE, "turbo_draft", sheet)
    return services.runner.start(checked.prepared)


def test_a_batch_stopped_by_a_full_disk_says_so_in_chinese_on_the_progress_line(services, tmp_path, monkeypatch):
    from engine.errors import BatchError

    sheet = tmp_path / "rows.csv"
    sheet.write_text("prompt,seed,width,height,steps\na cat,1,64,64,1\n", encoding="utf-8")
    batch_id = services_start(services, sheet)

    def full_disk(batch, **_):
        raise BatchError(f"batch {batch} stopped at row 2: cannot write out.png: No space left on device",
                         batch_id=batch, row=2, path="out.png", code="batch_stopped_by_storage")

    monkeypatch.setattr(services.runner, "run", full_disk)
    services.queue.submit(batch_id)
    progress = services.queue.wait(batch_id, 30)
    assert progress.state == "waiting_for_storage" and progress.error_code == "batch_stopped_by_storage"
    view = handlers.batch_view(services, batch_id, "zh")
    assert view.error.startswith(f"批次 {batch_id} 在第 2 行停止：无法写入 out.png（磁盘已满或文件夹不可写）")
    assert "等待磁盘空间" in view.status_line and view.step_line.startswith("最迟 ") and not view.finished
    english = handlers.batch_view(services, batch_id, "en")
    assert english.error.startswith(f"batch {batch_id} stopped at row 2")
    assert "waiting for disk space" in english.status_line and english.step_line.startswith("next try in ")


def test_history_and_single_image_refusals_and_model_kinds_are_said_in_chinese(services):
    exc = refusal(lambda: handlers.rerun_row(services, ALICE, "b-none:2"))
    assert exc.code == "generation_not_found" and handlers.error_message(exc, "zh") == "记录中没有生成记录“b-none:2”"
    exc = refusal(lambda: services.engine.models.resolver.resolve("loras", "brand.safetensors"))
    assert handlers.error_message(exc, "zh").startswith("找不到 LoRA“brand.safetensors”")
    info = {"default_checkpoint": "sd35_demo_tiny", "demo_in_use": True, "loaded_models": [
        {"name": "sd35_demo_tiny", "kind": "checkpoint"}, {"name": "brand", "kind": "lora"}]}
    rows = dict(handlers.system_rows(info, "zh"))
    assert rows["已载入的模型"].startswith("brand (LoRA), sd35_demo_tiny (模型文件)")


# ------------------------------------------------------------------------- the rarer errors, without code


def test_every_library_error_class_has_its_kind_in_chinese():
    """A class added to the hierarchy without words would show the engine's bare English on the Chinese page."""
    from engine import errors
    from webapp.i18n import ERROR_KINDS_ZH

    classes = {cls.__name__ for cls in vars(errors).values()
               if isinstance(cls, type) and issubclass(cls, errors.EngineError)}
    assert classes - set(ERROR_KINDS_ZH) == set()
    assert all(re.search("[\u4e00-\u9fff]", words) for words in ERROR_KINDS_ZH.values())


def test_a_model_that_cannot_load_is_said_in_chinese_before_the_engines_exact_words(tmp_path):
    """An admin switches to a damaged checkpoint on the Chinese page: the kind of failure in Chinese, then the
    engine's English naming the file, which is what one searches for or reports."""
    from engine.runtime import Engine
    from engine.services import build_services

    (tmp_path / "models" / "checkpoints").mkdir(parents=True)
    (tmp_path / "models" / "checkpoints" / "broken.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{bad json")
    settings = load_settings({"data_dir": str(tmp_path / "data"), "models_dir": str(tmp_path / "models"),
                              "templates_dir": str(ROOT / "templates")}, environ={})
    built = build_services(settings, Engine(settings))
    try:
        exc = refusal(lambda: handlers.switch_model(built, Caller("root", "admin"), "broken.safetensors"))
    finally:
        built.close()
    assert exc.code is None and type(exc).__name__ == "ModelLoadError"
    said = handlers.error_message(exc, "zh")
    assert said == f"模型文件无法加载：{exc.message}" and "broken.safetensors" in said
    assert handlers.error_message(exc, "en") == exc.message


def test_a_row_that_failed_on_an_uncoded_error_says_its_kind_in_chinese():
    from webapp.i18n import row_error_text

    def failed(exception_type):
        return {"error": "node 7 (LoraLoader): LoRA 'x' holds no LoRA weights",
                "extra": {"failure": {"node_id": "7", "exception_type": exception_type}}}

    assert row_error_text(failed("engine.errors.ModelLoadError"), "zh") == (
        "模型文件无法加载：node 7 (LoraLoader): LoRA 'x' holds no LoRA weights")
    assert row_error_text(failed("KeyError"), "zh").startswith("生成时出错：node 7")
    assert row_error_text(failed("engine.errors.NoSuchClass"), "zh").startswith("生成时出错：")
    assert row_error_text(failed("engine.errors.ModelLoadError"), "en") == failed("x")["error"]


def test_a_message_already_in_the_pages_language_gets_no_second_lead():
    from engine.errors import AccessDenied

    exc = AccessDenied("只有管理员可以切换模型", status=403)
    assert handlers.error_message(exc, "zh") == "只有管理员可以切换模型"


def test_resuming_with_changed_inputs_and_a_busy_batch_are_said_in_chinese():
    from engine.errors import BatchBusy, BatchMismatch

    changed = BatchMismatch("batch 'b7' cannot resume: ...", code="batch_inputs_changed", batch_id="b7",
                            changed="template+sheet")
    assert handlers.error_message(changed, "zh").startswith("批次“b7”无法继续：模板和表格发生了变化")
    busy = BatchBusy("batch b7 ...", code="batch_busy", batch_id="b7", worker="host-a:123")
    assert handlers.error_message(busy, "zh").startswith("另一个进程（host-a:123）正在运行相同输入的批次 b7")
