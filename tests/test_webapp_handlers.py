"""The web app without a browser: i18n tables, handlers over the real library (demo model, real ledger),
and the FastAPI routes the Gradio UI is mounted beside (login, authenticated files, zip)."""

from __future__ import annotations

import html
import io
import string
import threading
import time
import zipfile
from pathlib import Path

import pytest

from engine.errors import AccessDenied, BatchError, SheetError
from engine.settings import load_settings
from webapp import handlers
from webapp.auth import UserStore, add_user, hash_password
from webapp.guard import Caller
from webapp.i18n import EN, ZH, language_of, text
from webapp.files import file_url
from webapp.server import listen_address

ROOT = Path(__file__).resolve().parents[1]

SHEET = """prompt,seed,width,height,steps
a red shoe on white,11,64,64,1
a blue mug,12,64,64,1
a bad row,13,64,9999,1
"""


# ------------------------------------------------------------------------------------------------ i18n


def test_both_languages_have_the_same_keys():
    assert set(EN) == set(ZH), f"only in one table: {sorted(set(EN) ^ set(ZH))}"


def test_both_languages_use_the_same_placeholders():
    def names(template: str) -> set[str]:
        return {field for _, field, _, _ in string.Formatter().parse(template) if field}

    mismatched = {key for key in EN if names(EN[key]) != names(ZH[key])}
    assert not mismatched


def test_chinese_strings_are_translated():
    same = [key for key in EN if EN[key] == ZH[key] and any(c.isalpha() for c in EN[key])]
    assert same == []


@pytest.mark.parametrize(
    "header, expected",
    [
        ("zh-CN,zh;q=0.9,en;q=0.8", "zh"),
        ("en-US,en;q=0.9,zh-CN;q=0.5", "en"),
        ("fr-FR,zh;q=0.8", "zh"),
        ("fr-FR", "en"),
        ("", "en"),
        (None, "en"),
        ("zh-TW;q=0.2,en;q=0.9", "en"),
    ],
)
def test_language_of_accept_language(header, expected):
    assert language_of(header) == expected


def test_text_fills_values_in_each_language():
    assert text("batch.started", "en", batch_id="b1") == "Batch b1 queued."
    assert "b1" in text("batch.started", "zh", batch_id="b1")
    with pytest.raises(KeyError):
        text("no.such.key", "en")


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def demo_engine(tmp_path_factory):
    from engine.runtime import Engine

    settings = load_settings({"data_dir": str(tmp_path_factory.mktemp("engine"))}, environ={})
    return Engine(settings)


@pytest.fixture
def settings(tmp_path):
    return load_settings(
        {"data_dir": str(tmp_path / "data"), "templates_dir": str(ROOT / "templates"), "max_gpu_batch": 2},
        environ={},
    )


@pytest.fixture
def services(settings, demo_engine):
    from engine.services import build_services

    built = build_services(settings, demo_engine)
    yield built
    built.close()


@pytest.fixture
def sheet_path(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text(SHEET, encoding="utf-8")
    return path


ADMIN = Caller("alice", "admin")
USER = Caller("bob", "user")


def run_batch(services, sheet_path, caller=USER):
    check = handlers.check_sheet(services, caller, "turbo_draft", sheet_path, batch_seed=7)
    batch_id = handlers.start_batch(services, check.prepared)
    progress = services.queue.wait(batch_id, timeout=120)
    assert progress is not None and progress.state not in handlers.ACTIVE_STATES
    return check, batch_id


# ----------------------------------------------------------------------------------------- handlers


def test_template_overview_lists_fields_in_the_browser_language(services):
    overview = handlers.template_overview(services, "turbo_draft", "zh")
    assert overview.fields_header[0] == ZH["field.name"]
    names = [row[0] for row in overview.fields_rows]
    assert names[:2] == ["prompt", "seed"]
    assert overview.fields_rows[0][2] == ZH["yes"]  # prompt is required
    # the template's own Chinese words (translations in template.json)
    assert overview.title == "快速草图（SD3.5 Large Turbo）" and overview.fields_rows[0][4] == "要画的内容。"
    english = handlers.template_overview(services, "turbo_draft", "en")
    assert english.title == "Quick draft (SD3.5 Large Turbo)" and english.fields_rows[0][4] == "What to draw."
    # the field types too, with their limits and choices
    kinds = {row[0]: row[1] for row in overview.fields_rows}
    assert kinds["prompt"] == ZH["fieldtype.text"] and kinds["width"] == f'{ZH["fieldtype.int"]} (64 – 2048)'
    assert {row[0]: row[1] for row in overview.compact_rows}["seed"] == ZH["fieldtype.seed"]
    assert {row[0]: row[1] for row in english.fields_rows}["width"] == "int (64 – 2048)"
    described = dict((spec.name, words) for spec, words in handlers.template_fields(services, "turbo_draft", "zh"))
    assert described["steps"] == "Turbo 模型只需要很少的步数。"  # the single-image form's field help


def test_check_sheet_reports_the_bad_row_with_its_reason(services, sheet_path):
    check = handlers.check_sheet(services, USER, "turbo_draft", sheet_path)
    assert (check.ok_rows, check.bad_rows) == (2, 1)
    bad = [row for row in check.rows if row[1] == EN["report.problem"]]
    assert bad[0][0] == 4 and "height" in bad[0][2]
    assert check.can_start
    stopped = handlers.check_sheet(services, USER, "turbo_draft", sheet_path, on_invalid="stop")
    assert not stopped.can_start and "stop" in stopped.summary


def test_a_chinese_page_words_cell_problems_in_chinese_and_an_english_one_keeps_the_engines_words(
    services, tmp_path
):
    path = tmp_path / "rows.csv"
    path.write_text("prompt,seed,width,height,steps\n,1,64,64,1\nb,x,64,64,1\nc,1,64,9999,1\n", encoding="utf-8")

    chinese = {row[0]: row[2] for row in handlers.check_sheet(services, USER, "turbo_draft", path, lang="zh").rows}
    english = {row[0]: row[2] for row in handlers.check_sheet(services, USER, "turbo_draft", path).rows}

    assert chinese == {2: "prompt: 必填项为空", 3: "seed: “x”不是整数", 4: "height: 9999 大于最大值 2048"}
    assert english == {2: "prompt: required value is empty", 3: "seed: 'x' is not a whole number",
                       4: "height: 9999 is above the maximum 2048"}


def test_a_long_sheet_lists_its_first_rows_with_problems_and_gives_every_one_as_csv(services, tmp_path, sheet_path):
    """A day's catalogue: 10,000 rows listed whole were a megabyte of table in which the problems hid among
    ready rows. A sheet longer than the report lists only its rows with problems, the first of them, and
    every one of them comes as a CSV to fix and upload again."""
    import csv

    cap = handlers.REPORT_TABLE_ROWS
    lines = ["prompt,seed,width,height,steps"]
    for i in range(2 * cap + 100):  # every second row is over the maximum height
        lines.append(f"{'=HYPERLINK(1)' if i == 1 else f'row {i}'},{i},64,{9999 if i % 2 else 64},1")
    path = tmp_path / "catalogue.csv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    check = handlers.check_sheet(services, USER, "turbo_draft", path)

    assert (check.ok_rows, check.bad_rows) == (cap + 50, cap + 50)
    assert len(check.rows) == cap and {row[1] for row in check.rows} == {EN["report.problem"]}
    assert [row[0] for row in check.rows[:2]] == [3, 5]  # sheet rows, the first data row being 2
    assert f"the first {cap} of {cap + 50}" in check.summary and check.can_start
    problems = list(csv.reader(check.problems_csv.splitlines()))
    assert problems[0] == [EN["report.row"], EN["report.problems"], "prompt", "seed", "width", "height", "steps"]
    assert len(problems) == 1 + cap + 50 and problems[-1][0] == str(2 * cap + 101)
    assert "height" in problems[1][1] and problems[1][2:] == ["'=HYPERLINK(1)", "1", "64", "9999", "1"]

    short = handlers.check_sheet(services, USER, "turbo_draft", sheet_path)
    assert [row[0] for row in short.rows] == [2, 3, 4]  # a short sheet still lists every row
    assert short.problems_csv.count("\n") == 2 and "lists only" not in short.summary


def test_watching_a_batch_reads_its_newest_images_not_every_row(services, tmp_path, monkeypatch):
    """The page asks every second how a batch goes: reading its 10,000 rows each time took seconds and
    grew with the batch. Counts come from the ledger, and only the rows of the images shown are read."""
    from engine.store import Generation

    path = tmp_path / "rows.csv"
    path.write_text("prompt,seed,width,height,steps\n" + "".join(f"row {i},{i},64,64,1\n" for i in range(300)),
                    encoding="utf-8")
    check = handlers.check_sheet(services, USER, "turbo_draft", path)
    batch_id = services.runner.start(check.prepared)  # recorded, not queued: the rows stay as set below
    ledger = services.ledger
    for row in ledger.rows(batch_id)[:60]:
        ledger.claim_row(row.row_key, worker="test")
        image = tmp_path / f"{row.row_number}.png"
        image.write_bytes(b"png")
        ledger.complete_row(row.row_key, {}, image, "0" * 64)
    read = []
    real_from_row = Generation.from_row.__func__
    monkeypatch.setattr(Generation, "from_row", classmethod(lambda cls, r: read.append(1) or real_from_row(cls, r)))

    view = handlers.batch_view(services, batch_id, max_images=8)

    assert (view.done, view.remaining, view.image_count) == (60, 240, 60)
    assert view.images == [str(tmp_path / f"{n}.png") for n in range(54, 62)]  # the newest 8, in row order
    assert len(read) <= 8


def test_unreadable_sheet_is_a_library_error(services, tmp_path):
    path = tmp_path / "rows.xls"
    path.write_bytes(b"\xd0\xcf\x11\xe0legacy excel")
    with pytest.raises(SheetError):
        handlers.check_sheet(services, USER, "turbo_draft", path)


def test_batch_runs_in_the_background_and_is_searchable(services, sheet_path):
    _, batch_id = run_batch(services, sheet_path)
    view = handlers.batch_view(services, batch_id)
    assert (view.done, view.failed, view.remaining) == (2, 0, 0)
    assert view.finished and len(view.images) == 2
    assert all(Path(p).is_file() for p in view.images)
    # The gallery holds the newest images; the count says how many there are, so the page redraws it
    newest = handlers.batch_view(services, f" {batch_id} ", max_images=1)  # a pasted id with spaces
    assert newest.images == view.images[-1:] and newest.image_count == view.image_count == 2
    with pytest.raises(BatchError, match="No batch nope in the ledger"):
        handlers.batch_view(services, "nope")

    found = handlers.search_history(services, batch_id=batch_id)
    assert found.header[0] == EN["col.row_key"]
    assert {row[2] for row in found.rows} == {"done", "skipped"}
    rows = handlers.search_history(services, text_query="blue mug", lang="zh").rows
    assert [row[1:3] for row in rows] == [[3, ZH["status.done"]]]
    # Pages: every row once, in order, and each page says whether another follows
    everything = handlers.search_history(services, batch_id=batch_id).rows
    first, second = (handlers.search_history(services, batch_id=batch_id, page=p, limit=1) for p in (1, 2))
    assert first.rows + second.rows == everything[:2] and first.more and "page 2" in first.note
    assert not handlers.search_history(services, batch_id=batch_id, page=len(everything), limit=1).more
    past = handlers.search_history(services, page=10**30)  # past every ledger: empty, not an error
    assert past.rows == [] and "No rows on page" in past.note

    detail = handlers.generation_detail(services, rows[0][0])
    assert detail["row_values"]["prompt"] == "a blue mug"
    assert Path(detail["image_path"]).is_file()

    rerun_id = handlers.rerun_row(services, USER, rows[0][0])
    assert rerun_id != batch_id
    services.queue.wait(rerun_id, timeout=60)
    assert handlers.batch_view(services, rerun_id).done == 1


def test_a_history_search_that_finds_nothing_says_so(services):
    # An empty table alone reads as a click that did nothing
    for lang, table in (("en", EN), ("zh", ZH)):
        found = handlers.search_history(services, text_query="no prompt was ever written like this", lang=lang)
        assert found.rows == [] and found.note == table["history.no_results"]


def test_durations_and_lists_read_in_the_page_language():
    assert [handlers.format_duration(s) for s in (2, 185, 3725)] == ["2s", "3m 05s", "1h 02m"]
    assert [handlers.format_duration(s, "zh") for s in (2, 185, 3725)] == ["2 秒", "3 分 05 秒", "1 小时 02 分"]


def test_a_rows_problems_are_listed_with_the_languages_separator(services, tmp_path):
    sheet = tmp_path / "two.csv"
    sheet.write_text("prompt,width,height,steps\na cup,9999,9999,1\n", encoding="utf-8")
    (row,) = handlers.check_sheet(services, USER, "turbo_draft", sheet, lang="zh").rows
    assert "；" in row[2] and "; " not in row[2]
    (row,) = handlers.check_sheet(services, USER, "turbo_draft", sheet, lang="en").rows
    assert "; " in row[2]


def test_history_rejects_malformed_dates(services):
    with pytest.raises(SheetError, match="YYYY-MM-DD"):
        handlers.search_history(services, date_from="26/11/2026")


def test_single_image_is_a_one_row_batch(services):
    seen = []
    result = handlers.generate_single(
        services, USER, "turbo_draft",
        {"prompt": "a green hat", "seed": "", "checkpoint": None, "width": 64.0, "height": 80.0, "steps": 1.0},
        on_progress=lambda fraction, desc: seen.append(desc),
    )
    assert Path(result.image_path).is_file()
    assert result.parameters["width"] == 64
    assert seen
    rows = dict(handlers.parameter_rows(result.parameters, "zh"))
    assert rows[ZH["param.size"]] == "64 × 80" and rows[ZH["param.prompt"]] == "a green hat"


def test_single_image_with_a_bad_value_names_the_field(services):
    with pytest.raises(BatchError, match="height"):
        handlers.generate_single(services, USER, "turbo_draft", {"prompt": "x", "height": 5, "width": 64, "steps": 1})


def write_photo(path: Path, colour: tuple[int, int, int] = (200, 40, 30)) -> Path:
    """A small product photo: an opaque product on a transparent background (the inpaint mask)."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    photo = Image.new("RGBA", (40, 48), (0, 0, 0, 0))
    photo.paste((*colour, 255), (10, 12, 30, 36))
    photo.save(path)
    return path


PRODUCT = {"product_name": "sneaker", "seed": "3", "width": 256.0, "height": 256.0, "steps": 1.0,
           "checkpoint": None}


def staged_photos(services) -> list[Path]:
    from engine.batch import STAGING_FOLDER

    staging = Path(services.settings.uploads_path) / STAGING_FOLDER
    return list(staging.iterdir()) if staging.is_dir() else []


def test_single_image_reads_the_uploaded_photo_as_a_batch_does(services, tmp_path):
    red = write_photo(tmp_path / "upload" / "Red Sneaker.png")
    result = handlers.generate_single(services, USER, "product_in_scene", PRODUCT,
                                      photos={"product_photo": str(red)})
    assert Path(result.image_path).is_file()
    # The photo is the batch's own, in its input folder, named as uploaded; the cell holds that name.
    assert [Path(p).name for p in result.reference_images] == ["Red Sneaker.png"]
    assert Path(result.reference_images[0]).parent == services.runner.images_dir(result.batch_id)
    assert Path(result.reference_images[0]).read_bytes() == red.read_bytes()
    row = services.ledger.rows(result.batch_id)[0]
    assert row.row_values["product_photo"] == "Red Sneaker.png"
    assert staged_photos(services) == []  # the staging copy went once the batch had its own

    # Another photo, everything else equal: another image, so the run really read the photo.
    blue = write_photo(tmp_path / "other" / "Red Sneaker.png", colour=(20, 40, 220))
    again = handlers.generate_single(services, USER, "product_in_scene", PRODUCT, photos={"product_photo": str(blue)})
    assert Path(again.image_path).read_bytes() != Path(result.image_path).read_bytes()
    assert Path(again.reference_images[0]).read_bytes() == blue.read_bytes()


def test_single_image_refuses_a_missing_or_unusable_photo(services, tmp_path):
    with pytest.raises(BatchError, match="product_photo: required value is empty"):
        handlers.generate_single(services, USER, "product_in_scene", PRODUCT, photos={"product_photo": None})
    gif = tmp_path / "sneaker.gif"
    gif.write_bytes(b"GIF89a")
    with pytest.raises(SheetError, match=r"not a supported photo; supported: \.png, \.jpg, \.jpeg, \.webp"):
        handlers.generate_single(services, USER, "product_in_scene", PRODUCT, photos={"product_photo": str(gif)})
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png at all")
    with pytest.raises(BatchError, match="cannot be read as an image"):
        handlers.generate_single(services, USER, "product_in_scene", PRODUCT, photos={"product_photo": str(broken)})
    with pytest.raises(SheetError, match="no image field 'prompt'; its image fields: none"):
        handlers.generate_single(services, USER, "turbo_draft", {"prompt": "x"}, photos={"prompt": str(broken)})
    assert staged_photos(services) == []  # a refused photo leaves nothing behind


def test_single_image_photos_named_alike_stay_apart(services, tmp_path):
    first = write_photo(tmp_path / "a" / "photo.png")
    second = write_photo(tmp_path / "b" / "PHOTO.png", colour=(0, 200, 0))
    library, names = handlers.stage_single_photos(services, "product_in_scene", {"product_photo": str(first)})
    try:
        assert names == {"product_photo": "photo.png"} and library.names() == ["photo.png"]
    finally:
        services.runner.discard_staging(library)
    assert staged_photos(services) == []
    # A template with two image fields, both uploading files named alike: both photos are kept.
    import json

    schema = json.loads((ROOT / "templates" / "product_in_scene" / "template.json").read_text(encoding="utf-8"))
    schema["name"] = "two_photos"
    schema["fields"].append({"name": "backdrop", "type": "image", "example": "backdrop.png"})
    schema["filename_pattern"] += "_{backdrop}"  # a field the template uses
    workflow = (ROOT / "templates" / "product_in_scene" / "workflow.json.j2").read_bytes()
    services.templates.add({"template.json": json.dumps(schema).encode(), "workflow.json.j2": workflow})
    library, names = handlers.stage_single_photos(
        services, "two_photos", {"product_photo": str(first), "backdrop": str(second)})
    try:
        assert names == {"product_photo": "photo.png", "backdrop": "PHOTO_2.png"}
        assert library.path("PHOTO_2.png").read_bytes() == second.read_bytes()
    finally:
        services.runner.discard_staging(library)


def test_a_cut_out_photo_is_shown_white_where_it_is_transparent(tmp_path):
    thumb = handlers.reference_thumbnail(write_photo(tmp_path / "cut-out.png"))
    assert thumb.mode == "RGB"
    assert thumb.getpixel((0, 0)) == (255, 255, 255) and thumb.getpixel((20, 20)) == (200, 40, 30)


def test_only_admins_switch_models_and_edit_templates(services):
    choices = handlers.model_choices(services)
    with pytest.raises(AccessDenied) as refused:
        handlers.switch_model(services, USER, choices[0], lang="zh")
    assert refused.value.status == 403 and "管理员" in refused.value.message
    assert handlers.switch_model(services, ADMIN, choices[0]) == choices[0]
    with pytest.raises(AccessDenied):
        handlers.save_template(services, USER, "{}", "{}")


def test_model_allow_list_is_the_runners(settings, demo_engine):
    from dataclasses import replace

    from engine.services import build_services

    listed = build_services(replace(settings, allowed_models="sd35_demo_tiny, not_on_disk"), demo_engine)
    try:
        # Only allowed checkpoints that exist are offered, exactly as the API's /api/system lists them.
        assert handlers.model_choices(listed) == listed.runner.allowed_checkpoints() == ["sd35_demo_tiny"]
        with pytest.raises(BatchError, match="not allowed; allowed: sd35_demo_tiny"):
            handlers.switch_model(listed, ADMIN, "not_on_disk")
    finally:
        listed.close()


def test_cancel_reports_what_happened(services, sheet_path):
    first = handlers.check_sheet(services, USER, "turbo_draft", sheet_path)
    second = handlers.check_sheet(services, USER, "turbo_draft", sheet_path)
    services.engine._run_lock.acquire()  # the GPU is busy: the first batch runs (and waits), the second queues
    try:
        running = handlers.start_batch(services, first.prepared)
        deadline = time.monotonic() + 10
        while services.queue.status(running).state != "running" and time.monotonic() < deadline:
            time.sleep(0.01)
        waiting = handlers.start_batch(services, second.prepared)
        assert handlers.cancel_batch(services, USER, waiting) == "removed_from_queue"
        assert handlers.cancel_batch(services, USER, running) == "cancelling"
    finally:
        services.engine._run_lock.release()
    assert services.queue.wait(running, timeout=60).state == "cancelled"
    assert handlers.cancel_batch(services, USER, running) == "not_running"
    assert handlers.cancel_batch(services, USER, waiting) == "not_running"


def test_only_whoever_started_a_batch_or_an_admin_stops_or_resumes_it(services, sheet_path):
    from engine.errors import AccessDenied

    started = handlers.check_sheet(services, USER, "turbo_draft", sheet_path)
    services.engine._run_lock.acquire()  # keep it waiting in the queue
    try:
        batch_id = handlers.start_batch(services, started.prepared)
        carol = Caller("carol", "user")
        with pytest.raises(AccessDenied, match="started by bob: only they or an admin") as refused:
            handlers.cancel_batch(services, carol, batch_id)
        assert refused.value.status == 403
        assert handlers.may_control(services, USER, batch_id) and handlers.may_control(services, ADMIN, batch_id)
        assert handlers.cancel_batch(services, ADMIN, batch_id) in {"removed_from_queue", "cancelling"}
    finally:
        services.engine._run_lock.release()
    services.queue.wait(batch_id, timeout=60)
    with pytest.raises(AccessDenied):
        handlers.resume_batch(services, carol, batch_id)
    handlers.resume_batch(services, USER, batch_id)
    assert services.queue.wait(batch_id, timeout=60).state == "done"


def test_admin_saves_only_a_valid_template_into_the_data_folder_never_over_a_shipped_one(services):
    import json

    from engine.errors import TemplateError

    shipped = ROOT / "templates" / "turbo_draft"
    before = {p.name: p.read_bytes() for p in shipped.iterdir()}
    schema, workflow = handlers.template_sources(services, "turbo_draft")
    with pytest.raises(TemplateError, match="shipped template"):
        handlers.save_template(services, ADMIN, schema, workflow, replace=True)
    mine = json.dumps({**json.loads(schema), "name": "turbo_mine"})
    with pytest.raises(TemplateError):
        handlers.save_template(services, ADMIN, mine, workflow.replace('"KSampler"', '"NoSuchNode"', 1)
                               .replace("{{ seed }}", "{{ no_such_field }}"))
    assert handlers.save_template(services, ADMIN, mine, workflow) == "turbo_mine"
    saved = services.settings.user_templates_path / "turbo_mine" / "template.json"
    assert saved.is_file() and saved.is_relative_to(services.settings.data_path)
    assert not (ROOT / "templates" / "turbo_mine").exists()
    assert {p.name: p.read_bytes() for p in shipped.iterdir()} == before
    assert {"turbo_draft", "turbo_mine"} <= set(handlers.template_names(services))
    assert handlers.save_template(services, ADMIN, mine, workflow, replace=True) == "turbo_mine"  # its own: yes


def test_a_user_template_named_like_a_shipped_one_is_not_used_and_says_why(services):
    copy = services.settings.user_templates_path / "product_shot"
    copy.mkdir(parents=True)
    for name in ("template.json", "workflow.json.j2"):
        (copy / name).write_bytes((ROOT / "templates" / "product_shot" / name).read_bytes())
    assert services.templates.get("product_shot").folder == ROOT / "templates" / "product_shot"
    assert "shipped template" in services.templates.errors()["product_shot"].message
    assert handlers.template_names(services).count("product_shot") == 1


def test_system_info_says_the_demo_model_is_in_use(services):
    info = handlers.system_info(services)
    assert info["demo_in_use"] is True and info["warming_up"] is False
    assert {"device", "precision", "queue", "versions"} <= set(info)
    rows = dict(handlers.system_rows(info, "zh"))
    assert rows[ZH["system.model"]] == f"sd35_demo_tiny ({ZH['system.demo']})"
    assert rows[ZH["system.state"]] == ZH["system.ready"]


def test_cancelled_rows_count_as_remaining(services, sheet_path):
    check = handlers.check_sheet(services, USER, "turbo_draft", sheet_path)
    batch_id = services.runner.start(check.prepared)
    services.runner.run(batch_id, should_cancel=lambda: True)  # stopped before any row ran
    view = handlers.batch_view(services, batch_id)
    assert (view.state, view.done, view.remaining) == ("interrupted", 0, 2)
    assert "remaining 2" in view.status_line and "left" not in view.status_line
    assert [b["id"] for b in handlers.interrupted_batches(services)] == [batch_id]


def test_a_batch_another_process_runs_is_shown_as_such_and_not_offered_for_resume(services, sheet_path):
    import socket
    import subprocess
    import sys

    check = handlers.check_sheet(services, USER, "turbo_draft", sheet_path)
    batch_id = services.runner.start(check.prepared)
    cli = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # a CLI run of the batch
    try:
        row = services.ledger.rows(batch_id)[0]
        services.ledger.claim_row(row.row_key, worker=f"{socket.gethostname()}:{cli.pid}")
        assert handlers.batch_view(services, batch_id).state == "running_elsewhere"
        assert batch_id not in [b["id"] for b in handlers.interrupted_batches(services)]
    finally:
        cli.kill()
        cli.wait()
    assert handlers.batch_view(services, batch_id).state == "interrupted"  # its process is gone now
    assert batch_id in [b["id"] for b in handlers.interrupted_batches(services)]


def test_a_batch_submitted_during_warm_up_waits_for_the_model(services, sheet_path):
    engine = services.engine
    check = handlers.check_sheet(services, USER, "turbo_draft", sheet_path)
    # Keep the model cache busy, as the long first load of a real checkpoint does.
    engine.models._lock.acquire()
    try:
        warm = threading.Thread(target=engine.warm_up, daemon=True)
        warm.start()
        deadline = time.monotonic() + 10
        while not handlers.is_warming_up(services) and time.monotonic() < deadline:
            time.sleep(0.01)
        batch_id = handlers.start_batch(services, check.prepared)
        time.sleep(0.5)
        view = handlers.batch_view(services, batch_id)
        assert view.warming_up and view.done == 0 and view.remaining == 2
        assert view.step_line == EN["status.waiting_for_model"]
        info = handlers.system_info(services)  # answers without waiting for the load
        assert info["warming_up"] and info["loaded_models"] is None
        assert dict(handlers.system_rows(info))[EN["system.state"]] == EN["system.warming_up"]
    finally:
        engine.models._lock.release()
    warm.join(timeout=60)
    progress = services.queue.wait(batch_id, timeout=60)
    assert progress.state == "done" and handlers.batch_view(services, batch_id).done == 2
    assert not handlers.is_warming_up(services)


def test_the_app_warms_the_model_up_in_the_background(settings, tmp_path):
    from fastapi.testclient import TestClient

    from engine.runtime import Engine
    from webapp.server import create_app

    engine = Engine(settings)
    app, _ = create_app(settings, engine, users=UserStore([]))
    with TestClient(app) as client:
        assert client.get("/login", follow_redirects=False).status_code == 303  # no users: straight to the app
        deadline = time.monotonic() + 60
        while not engine.models.loaded() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [m["name"] for m in engine.models.loaded()] == ["sd35_demo_tiny"]


def test_caller_without_users_is_the_local_admin():
    assert handlers.caller_for(UserStore([]), None).is_admin
    with pytest.raises(AccessDenied) as refused:
        handlers.caller_for(UserStore.from_dict({"users": [{"name": "x", "password_hash": hash_password("pw")}]}), None)
    assert refused.value.status == 401


# --------------------------------------------------------------------------------------------- server


def test_listen_address_keeps_an_unprotected_app_on_localhost(settings):

    open_settings = load_settings({"host": "0.0.0.0"}, environ={})
    host, _, note = listen_address(open_settings, UserStore([]), environ={})
    assert host == "127.0.0.1" and "127.0.0.1" in note
    assert listen_address(open_settings, UserStore([]), environ={"SPACE_ID": "x/y"})[0] == "0.0.0.0"


def test_a_public_space_without_users_serves_everyone_as_an_ordinary_user(settings, demo_engine, monkeypatch):
    from fastapi.testclient import TestClient

    from webapp.server import create_app

    monkeypatch.setenv("SPACE_ID", "team/batch-studio")
    app, services = create_app(settings, demo_engine, users=UserStore([]))
    with TestClient(app) as visitor:
        assert visitor.get("/api/templates").status_code == 200  # the app works for whoever reaches it
        refused = visitor.post("/api/system/free")
        assert refused.status_code == 403 and refused.json()["error"]["details"]["action"] == "switch_model"
    anyone = handlers.caller_for(UserStore([]), None, anonymous_role="user")
    assert not anyone.is_admin
    with pytest.raises(AccessDenied):
        handlers.require_admin(anyone, "upload_template")
    assert "public" in EN["app.public_no_users"] and ZH["app.public_no_users"]
    monkeypatch.delenv("SPACE_ID")
    app, services = create_app(settings, demo_engine, users=UserStore([]))  # a workstation: localhost's owner
    with TestClient(app) as owner:
        assert owner.post("/api/system/free").status_code == 200


@pytest.fixture
def client(settings, demo_engine, tmp_path):
    from fastapi.testclient import TestClient

    from webapp.server import create_app

    users_file = tmp_path / "users.json"
    add_user(users_file, "alice", "alice-pass", "admin")
    add_user(users_file, "bob", "bob-pass", "user")
    app, services = create_app(settings, demo_engine, users=UserStore.from_file(users_file))
    with TestClient(app, follow_redirects=False) as test_client:
        test_client.services = services
        yield test_client


def sign_in(client, name, password):
    return client.post("/login", data={"username": name, "password": password})


def test_login_refuses_a_wrong_password(client):
    answer = sign_in(client, "alice", "wrong")
    assert answer.status_code == 401 and "sd35_session" not in answer.cookies
    assert client.get("/").status_code == 303  # the page itself sends a signed-out browser to the form
    assert "<form" in client.get("/login", headers={"accept-language": "zh-CN"}).text


def test_a_browser_that_drops_the_sign_in_cookie_is_told_why_and_offered_a_tab_of_its_own(client):
    """Inside a Space's huggingface.co frame, browsers that block third-party cookies drop the session
    cookie: the sign-in must not just land on an empty form again."""
    answer = sign_in(client, "alice", "alice-pass")
    assert (answer.status_code, answer.headers["location"]) == (303, "/signed-in")
    kept = client.get("/signed-in")  # this client keeps its cookies: on to the app
    assert (kept.status_code, kept.headers["location"]) == (303, "/")

    client.cookies.clear()  # what a browser blocking the frame's cookies sends next: none
    dropped = client.get("/signed-in")
    assert (dropped.status_code, dropped.headers["location"]) == (303, "/login?cookie_refused=1")
    page = client.get(dropped.headers["location"], headers={"accept-language": "zh-CN"})
    assert ZH["login.cookie_refused"] in page.text and "<form" in page.text
    assert '<a id="open-in-tab" href="/login" target="_blank"' in page.text
    assert "open-in-tab" not in client.get("/login").text  # an ordinary visit to the form has no such note


def test_another_sites_page_can_neither_sign_a_browser_in_nor_out(client):
    """Browsers mark what another site's form or image sends with ``Sec-Fetch-Site: cross-site``: a form
    posting the author's own password would sign the visitor in as them, an image at /logout sign them out."""
    foreign = {"sec-fetch-site": "cross-site", "origin": "https://elsewhere.example"}
    refused = client.post("/login", data={"username": "bob", "password": "bob-pass"}, headers=foreign)
    assert refused.status_code == 403 and "sd35_session" not in refused.cookies
    assert html.escape(EN["login.cross_site"]) in refused.text and "<form" in refused.text
    own = client.post("/login", data={"username": "alice", "password": "alice-pass"},
                      headers={"sec-fetch-site": "same-origin"})
    assert own.status_code == 303
    assert client.get("/logout", headers={"sec-fetch-site": "cross-site"}).status_code == 303
    assert client.get("/").status_code == 200, "still signed in"
    assert client.get("/logout", headers={"sec-fetch-site": "same-origin"}).status_code == 303
    assert client.get("/").status_code == 303, "signed out from the app's own link"


def test_login_attempts_are_rate_limited_per_address(settings, demo_engine, tmp_path):
    from dataclasses import replace

    from fastapi.testclient import TestClient

    from webapp.server import create_app

    users_file = tmp_path / "users.json"
    add_user(users_file, "alice", "alice-pass", "admin")
    limited = replace(settings, route_rate_limits="POST /login=3")
    app, _ = create_app(limited, demo_engine, users=UserStore.from_file(users_file))
    with TestClient(app, follow_redirects=False) as browser:
        assert [sign_in(browser, "alice", "guess").status_code for _ in range(3)] == [401, 401, 401]
        refused = browser.post("/login", data={"username": "alice", "password": "alice-pass"},
                               headers={"accept-language": "zh-CN"})
        assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
        assert "sd35_session" not in refused.cookies  # even the right password waits
        wait_s = refused.headers["retry-after"]
        assert ZH["login.rate_limited"].format(seconds=wait_s) in refused.text and "<form" in refused.text


def test_files_need_a_session_and_stay_inside_the_outputs(client, sheet_path):
    services = client.services
    _, batch_id = run_batch(services, sheet_path)
    url = file_url(services.settings.outputs_path, handlers.batch_view(services, batch_id).images[0])
    assert url.startswith(f"/files/{batch_id}/")

    assert client.get(url).status_code == 401
    assert client.get(f"/files/zip/{batch_id}").status_code == 401

    assert sign_in(client, "bob", "bob-pass").status_code == 303
    answer = client.get(url)
    assert answer.status_code == 200 and answer.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert client.get("/files/%2e%2e/ledger.db").status_code in (403, 404)
    assert client.get("/files/..%2fledger.db").status_code in (403, 404)

    archive = client.get(f"/files/zip/{batch_id}")
    assert archive.status_code == 200
    names = zipfile.ZipFile(io.BytesIO(archive.content)).namelist()
    assert sum(name.endswith(".png") for name in names) == 2
    assert "manifest.csv" in names and "manifest.json" in names


def test_a_photo_sheet_checked_without_its_photos_zip_says_to_upload_it(services, tmp_path):
    sheet = tmp_path / "scene.csv"
    sheet.write_text("product_name,product_photo,width,height,steps\nMug,mug.png,64,64,2\n", encoding="utf-8")
    result = handlers.check_sheet(services, USER, "product_in_scene", sheet)
    assert result.bad_rows == 1 and not result.can_start
    assert EN["batch.photos_missing"].format(columns="product_photo") in result.summary


def test_uploads_leave_gradios_cache_and_a_checked_batch_keeps_what_it_needs(settings, demo_engine, tmp_path):
    from dataclasses import replace

    import httpx

    from live_server import live_server
    from webapp.server import create_app

    photos = tmp_path / "photos.zip"
    with zipfile.ZipFile(photos, "w") as archive:
        archive.write(write_photo(tmp_path / "mug.png"), "mug.png")
    sheet = tmp_path / "scene.csv"
    sheet.write_text("product_name,product_photo,width,height,steps\nMug,mug.png,256,256,1\n", encoding="utf-8")
    app, services = create_app(replace(settings, upload_retention_s=2), demo_engine, users=UserStore([]))
    with live_server(app) as url, httpx.Client(base_url=url, timeout=60) as browser:
        # What the page does when a sheet and a photos zip are dropped on it.
        answer = browser.post("/gradio_api/upload", files=[("files", (p.name, p.read_bytes())) for p in (sheet, photos)])
        assert answer.status_code == 200, answer.text
        cached_sheet, cached_photos = map(Path, answer.json())
        assert cached_sheet.is_file() and cached_photos.is_file()
        checked = handlers.check_sheet(services, USER, "product_in_scene", cached_sheet, images_path=cached_photos)
        assert checked.can_start, checked.summary

        deadline = time.monotonic() + 30
        while (cached_sheet.exists() or cached_photos.exists()) and time.monotonic() < deadline:
            time.sleep(0.25)
        assert not cached_sheet.exists() and not cached_photos.exists()  # cleaned up after upload_retention_s

        batch_id = handlers.start_batch(services, checked.prepared)  # started after its uploads are gone
        progress = services.queue.wait(batch_id, timeout=60)
        assert progress is not None and progress.state == "done", progress
        assert [row.status for row in services.ledger.rows(batch_id)] == ["done"]


def test_a_check_whose_rows_the_disk_cannot_take_leaves_no_unpacked_photos_behind(services, tmp_path):
    """On a full disk, Check said the rows could not be kept (batch_check_unwritable) but left the photos it had
    unpacked in the staging folder for a day: each try again put another copy on the disk that was full."""
    import resource
    import signal

    photos = tmp_path / "photos.zip"
    with zipfile.ZipFile(photos, "w") as archive:
        archive.write(write_photo(tmp_path / "mug.png"), "mug.png")
    sheet = tmp_path / "scene.csv"
    sheet.write_text("product_name,product_photo,width,height,steps\n"
                     + "".join(f"Mug {i},mug.png,256,256,1\n" for i in range(300)), encoding="utf-8")
    # A disk that takes the small photo but not the rows of 300 rendered workflows: files past 4 KB fail to
    # write (EFBIG) as they would with ENOSPC.
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, limits[1]))
    try:
        with pytest.raises(BatchError) as refused:
            handlers.check_sheet(services, USER, "product_in_scene", sheet, images_path=photos)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, previous)
    assert refused.value.code == "batch_check_unwritable"
    assert staged_photos(services) == []


def test_the_server_keeps_the_state_of_only_the_page_sessions_used_last(settings, demo_engine):
    """Each page load is a Gradio session whose state (a copy of every component, ~0.25 MB) Gradio keeps,
    closed tab or not, until 10,000 have piled up: a server left running for weeks grew by gigabytes."""
    from dataclasses import replace

    import httpx

    from live_server import live_server
    from webapp.server import create_app

    app, _ = create_app(replace(settings, page_sessions=3), demo_engine, users=UserStore([]))
    page_app = next(route.app for route in app.routes if getattr(route, "path", None) == "")  # Gradio, at /
    with live_server(app) as url, httpx.Client(base_url=url, timeout=60) as browser:
        config = browser.get("/config").json()
        on_load = next(d["id"] for d in config["dependencies"] if d.get("api_name") == "show_interrupted")
        sessions = [f"tab{n}" for n in range(5)]
        for session in sessions:  # what a page does as it loads: its load events, under its own session
            joined = browser.post("/gradio_api/queue/join", json={
                "fn_index": on_load, "data": [], "session_hash": session, "trigger_id": None, "event_data": None})
            assert joined.status_code == 200, joined.text
            with browser.stream("GET", f"/gradio_api/queue/data?session_hash={session}") as events:
                assert any("process_completed" in line for line in events.iter_lines())
        assert list(page_app.state_holder.session_data) == sessions[-3:]  # the three used last

    from webapp.ui import upload_cache_schedule

    assert upload_cache_schedule(86400) == (3600, 86400)
    assert upload_cache_schedule(2) == (1, 2)
    assert upload_cache_schedule(0) is None  # kept, as Gradio does by default


def page_event(browser, config: dict, name: str, session: str, values: list) -> dict:
    """One event of the page under page session ``session``, as the browser sends it: ``values`` for its
    inputs in order, and None where an input is the session's own state (the server fills that in); the
    completed message."""
    import json

    dependency = next(d for d in config["dependencies"] if d.get("api_name") == name)
    kinds = {component["id"]: component["type"] for component in config["components"]}
    given = iter(values)
    data = [None if kinds[block] == "state" else next(given) for block in dependency["inputs"]]
    assert next(given, "all used") == "all used"
    joined = browser.post("/gradio_api/queue/join", json={
        "fn_index": dependency["id"], "data": data, "session_hash": session, "trigger_id": None, "event_data": None})
    assert joined.status_code == 200, joined.text
    with browser.stream("GET", f"/gradio_api/queue/data?session_hash={session}") as events:
        for line in events.iter_lines():
            if line.startswith("data:") and "process_completed" in line:
                return json.loads(line[5:])
    raise AssertionError(f"{name} never completed")

def check_on_page(browser, config: dict, session: str, sheet: Path) -> dict:
    """Upload ``sheet`` and press Check with it (template product_shot, invalid rows skipped, batch seed 7) under
    page session ``session``, as the browser does; the completed message."""
    uploaded = browser.post("/gradio_api/upload", files={"files": (sheet.name, sheet.read_bytes())})
    as_file = {"path": uploaded.json()[0], "orig_name": sheet.name, "meta": {"_type": "gradio.FileData"}}
    return page_event(browser, config, "check", session, ["product_shot", as_file, "skip", "7", None])



def test_a_checked_sheet_leaves_its_page_session_a_small_handle_and_start_records_every_row(
    settings, demo_engine, tmp_path
):
    """A page session kept the whole prepared batch until the next check: every row's rendered workflow,
    its values, the sheet and the report, about 100 MB for 10,000 rows, in each of up to 500 sessions.
    It keeps a handle now (the rows wait on disk), and Start from that session records exactly the rows a
    check prepares."""
    import pickle
    from dataclasses import replace

    import httpx

    from engine.sheets import read_sheet
    from live_server import live_server
    from webapp.server import create_app

    lines = ["product_name,color,seed,width,height,steps"]
    for i in range(300):  # every fifth row has a size over the maximum; half the seeds come from the batch seed
        lines.append(f"产品 {i} \"quoted\",red,{'' if i % 2 else 2**64 - 1 - i},64,{9999 if i % 5 == 0 else 64},1")
    catalogue = tmp_path / "catalogue.csv"
    catalogue.write_text("\n".join(lines) + "\n", encoding="utf-8")
    app, services = create_app(settings, demo_engine, users=UserStore([]))
    page_app = next(route.app for route in app.routes if getattr(route, "path", None) == "")  # Gradio, at /
    staging = Path(settings.uploads_path) / ".staging"
    with live_server(app) as url, httpx.Client(base_url=url, timeout=120) as browser:
        config = browser.get("/config").json()
        checked = check_on_page(browser, config, "tab", catalogue)
        assert checked["success"], checked
        assert checked["output"]["data"][1].startswith("240 rows ready, 60 rows with problems.")

        held = next(value for value in page_app.state_holder.session_data["tab"].state_data.values()
                    if type(value).__name__ in {"PreparedBatch", "ParkedBatch"})
        # What the session holds of its own: the template object is the registry's, shared by every session.
        own = pickle.dumps(replace(held, template=None))
        assert len(own) < 2_000, f"{len(own):,} bytes held for 300 rows"
        assert [path.suffix for path in staging.iterdir()] == [".z"]  # the rows wait on disk

        again = check_on_page(browser, config, "tab", catalogue)
        assert again["success"], again
        assert len(list(staging.iterdir())) == 1  # the earlier check's rows went with it

        started = page_event(browser, config, "start", "tab", [])
        assert started["success"], started
        batch_id = started["output"]["data"][3]
        services.queue.cancel(batch_id)  # the rows are recorded; running them is not what this is about
        assert list(staging.iterdir()) == []  # started: its rows are in the ledger now

    recorded = {row.row_number: row for row in services.ledger.rows(batch_id)}
    expected = services.runner.prepare("product_shot", read_sheet(catalogue), batch_seed=7).rows
    assert len(recorded) == 300
    for row in expected:
        got = recorded[row["row_number"]]
        assert (got.row_values, got.seed, got.workflow, got.prompt) == (
            row["values"], row["seed"], row["workflow"], row["prompt"])
        if row["status"] == "skipped":
            assert (got.status, got.error) == ("skipped", row["error"])
        else:
            assert got.status != "skipped"


def test_a_tab_closed_after_a_check_takes_its_checked_rows_with_it(settings, demo_engine, tmp_path):
    """A session's state goes an hour after its tab closes (Gradio's own clean-up); the rows it checked and never
    started went on waiting in the staging folder for a week, one file per closed tab."""
    import httpx

    from live_server import live_server
    from webapp.server import create_app

    catalogue = tmp_path / "catalogue.csv"
    catalogue.write_text("product_name,color,seed,width,height,steps\nmug,red,1,64,64,1\n", encoding="utf-8")
    app, _ = create_app(settings, demo_engine, users=UserStore([]))
    page_app = next(route.app for route in app.routes if getattr(route, "path", None) == "")  # Gradio, at /
    staging = Path(settings.uploads_path) / ".staging"
    with live_server(app) as url, httpx.Client(base_url=url, timeout=120) as browser:
        config = browser.get("/config").json()
        checked = check_on_page(browser, config, "closed-tab", catalogue)
        assert checked["success"], checked
        assert [path.suffix for path in staging.iterdir()] == [".z"]

        # What Gradio does when the tab's connection ends and the hour it keeps a closed session has passed
        session = page_app.state_holder.session_data["closed-tab"]
        session.is_closed, session.STATE_TTL_WHEN_CLOSED = True, 0
        page_app.state_holder.delete_all_expired_state()
        assert list(staging.iterdir()) == []


def gradio_call(client, endpoint: str, data: list) -> list[str]:
    """The ``data:`` lines of one call through Gradio's HTTP API, as a script would make it."""
    event = client.post(f"/gradio_api/call/{endpoint}", json={"data": data}).json()["event_id"]
    answer = client.get(f"/gradio_api/call/{endpoint}/{event}")
    return [line for line in answer.text.splitlines() if line.startswith("data:")]


def test_the_page_reads_only_files_uploaded_through_it(client, tmp_path):
    """A file input called through /gradio_api/ takes whatever path the caller writes: a signed-in user must
    not make the server read a file of its own as their spreadsheet (the report would show its lines)."""
    private = tmp_path / "private.csv"
    private.write_text("prompt\nTHE-SERVER'S-OWN-LINE\n")
    assert sign_in(client, "bob", "bob-pass").status_code == 303
    as_file = {"path": str(private), "orig_name": "rows.csv", "meta": {"_type": "gradio.FileData"}}
    (answer,) = gradio_call(client, "check", ["product_shot", as_file, "skip", "", None])
    assert "not uploaded by a user" in answer and "column" not in answer

    uploaded = client.post("/gradio_api/upload", files={"files": ("rows.csv", private.read_bytes(), "text/csv")})
    as_upload = {"path": uploaded.json()[0], "orig_name": "rows.csv", "meta": {"_type": "gradio.FileData"}}
    (answer,) = gradio_call(client, "check", ["product_shot", as_upload, "skip", "", None])
    assert "lacks required column(s): product_name" in answer  # read: it was uploaded through the page


def test_screen_readers_hear_a_running_batch_only_at_each_tenth_of_its_rows_and_its_end():
    # The visible line changes with the time left and every row; the announcement must not, or a screen
    # reader reads the progress out every second.
    first_rows = {handlers.progress_announcement("running", done, 0, 100 - done) for done in range(0, 10)}
    assert first_rows == {"running: 0 % of the rows made"}
    assert handlers.progress_announcement("running", 9, 1, 90) == "running: 10 % of the rows made"
    assert handlers.progress_announcement("running", 57, 3, 40, "zh") == "生成中：已完成 60% 的行"
    assert handlers.progress_announcement("queued", 0, 0, 0) == "queued: 0 % of the rows made"
    assert handlers.progress_announcement("done", 97, 3, 0) == "done · done 97 · failed 3 · remaining 0"


def _a_long_finished_batch(services, rows: int, done: int) -> str:
    """A batch of ``rows`` rows, the first ``done`` of them made (through the ledger's own write paths)."""
    ledger = services.ledger
    batch_id = ledger.create_batch("turbo_draft", "t" * 64, "s" * 64, batch_seed=1, user="bob")
    ledger.add_rows(batch_id, [{"row_number": n, "values": {"prompt": f"item {n}"}, "seed": n}
                               for n in range(2, 2 + rows)])
    for _ in range(done):
        row = ledger.claim_next(batch_id, worker="host:1")
        ledger.complete_row(row.row_key, {"prompt": f"item {row.row_number}"},
                            services.settings.outputs_path / batch_id / f"item_{row.row_number}.png", "0" * 64)
    return batch_id


def _rows_read(monkeypatch) -> list[int]:
    """Counts the ledger rows turned into Generation objects from now on (the real method still runs)."""
    from engine.store import Generation

    read = [0]
    from_row = Generation.from_row.__func__

    def counted(cls, row):
        read[0] += 1
        return from_row(cls, row)

    monkeypatch.setattr(Generation, "from_row", classmethod(counted))
    return read


def test_the_batch_page_reads_its_counts_and_newest_images_not_every_row(services, monkeypatch):
    """The batch page asks every second while it is open: with every row read each time, a batch of
    thousands of rows kept a CPU busy for as long as someone watched it."""
    batch_id = _a_long_finished_batch(services, rows=90, done=60)
    read = _rows_read(monkeypatch)
    view = handlers.batch_view(services, batch_id, max_images=48)
    assert (view.done, view.remaining, view.image_count) == (60, 30, 60)
    assert [Path(p).name for p in view.images] == [f"item_{n}.png" for n in range(14, 62)]  # the last 48, in order
    assert set(view.captions) == set(view.images)
    assert read[0] <= 48


def test_polling_a_batch_without_its_rows_reads_none_of_them(services, monkeypatch):
    from webapp.api import batch_status

    batch_id = _a_long_finished_batch(services, rows=30, done=20)
    read = _rows_read(monkeypatch)
    body = batch_status(services, batch_id, with_rows=False)
    assert (body["counts"]["done"], body["counts"]["not_run"], body["counts"]["total"]) == (20, 10, 30)
    assert read[0] == 0
