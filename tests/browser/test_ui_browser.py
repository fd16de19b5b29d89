"""The web app in a real browser: log in, upload a sheet, validate, run a batch on the demo model, watch the
gallery fill, download the zip, find the batch in History; a single image from the form, also one made from
an uploaded product photo; cancel a running batch; resume an interrupted one; warm-up; both languages; and
the refusals (wrong password, anonymous file requests, a non-admin switching models). Screenshots of each
page go to test-artifacts/screenshots/.

Images are 64x64 with one or two steps wherever the size does not matter, so the suite stays fast.
"""

from __future__ import annotations

import io
import re
import threading
import zipfile

import httpx
import pytest

pytestmark = pytest.mark.browser

SHEET = """prompt,seed,width,height,steps
a red shoe on white,11,64,64,1
a blue mug,12,64,64,1
a bad row,13,64,9999,1
"""


def log_in(page, base_url: str, name: str, password: str) -> None:
    page.goto(base_url + "/")
    page.fill("#username", name)
    page.fill("#password", password)
    page.click("button[type=submit]")


def open_tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def pick(page, dropdown_id: str, option: str) -> None:
    page.locator(f"#{dropdown_id} input").click()
    page.get_by_role("option", name=option, exact=True).click()


def upload_sheet(page, path, template: str = "turbo_draft") -> None:
    pick(page, "batch-template", template)
    page.locator("#batch-template-desc code", has_text=template).wait_for()  # the switch has landed
    page.locator("#sheet-file input[type=file]").set_input_files(str(path))


def field(page, name: str):
    return page.locator(f"#field-{name} textarea, #field-{name} input").first


def prepare_batch(services, tmp_path, sheet: str) -> str:
    """A batch recorded in the ledger through the library (as the API or the CLI would), not yet run."""
    from webapp import handlers
    from webapp.guard import Caller

    path = tmp_path / "sheet.csv"
    path.write_text(sheet, encoding="utf-8")
    check = handlers.check_sheet(services, Caller("bob", "user"), "turbo_draft", path)
    return services.runner.start(check.prepared)


def test_batch_from_upload_to_zip_and_history(app_server, new_page, screenshot, tmp_path):
    base_url, services = app_server
    page = new_page()
    log_in(page, base_url, "bob", "bob-pass")
    page.get_by_text("Signed in as").wait_for()

    page.locator("#batch-template input").click()
    page.get_by_role("option", name="turbo_draft").click()
    page.get_by_text("Quick draft").first.wait_for()

    sheet = tmp_path / "rows.csv"
    sheet.write_text(SHEET, encoding="utf-8")
    page.locator("#sheet-file input[type=file]").set_input_files(str(sheet))
    report = page.locator("#validation-report")
    report.get_by_text("height").first.wait_for()
    page.get_by_text("2 rows ready, 1 rows with problems").wait_for()
    rows = report.locator("tbody tr")
    assert rows.count() == 3
    assert [rows.nth(i).locator("td").first.inner_text() for i in range(3)] == ["2", "3", "4"]
    assert rows.nth(0).get_by_text("ok").is_visible() and rows.nth(2).get_by_text("problem").is_visible()
    assert "above the maximum 2048" in rows.nth(2).inner_text()
    screenshot(page, "batch-validation")

    page.locator("#start-batch").click()
    page.locator("#batch-progress").get_by_text(re.compile(r"done 2 · failed 0 · remaining 0")).wait_for(timeout=90_000)
    gallery_images = page.locator("#batch-gallery img")
    gallery_images.nth(1).wait_for()
    assert gallery_images.count() == 2
    # The gallery's images come through the authenticated /files route and really load.
    page.wait_for_function("() => [...document.querySelectorAll('#batch-gallery img')].every(i => i.naturalWidth > 0)")
    screenshot(page, "batch-finished")

    with page.expect_download() as download_info:
        page.locator(".download-link a").first.click()
    archive = zipfile.ZipFile(io.BytesIO(download_info.value.path().read_bytes()))
    names = archive.namelist()
    assert sum(name.endswith(".png") for name in names) == 2
    assert {"manifest.csv", "manifest.json"} <= set(names)

    batch_id = page.locator("#watched-batch input").input_value()
    counts = services.ledger.batch_summary(batch_id)["counts"]
    assert (counts["done"], counts["skipped"]) == (2, 1)
    open_tab(page, "History")
    page.locator("#history-batch textarea, #history-batch input").first.fill(batch_id)
    page.locator("#history-search").click()
    page.locator("#history-table").get_by_text(f"{batch_id}:2").first.wait_for()
    page.locator("#history-table").get_by_text("a blue mug", exact=True).first.click()
    detail = page.locator("#history-detail")
    detail.get_by_text("64 × 64").wait_for()
    assert "a blue mug" in detail.inner_text() and "12" in detail.inner_text()
    page.wait_for_function("() => document.querySelector('#history-image img')?.naturalWidth === 64")
    screenshot(page, "history")

    for tab in ("Templates", "System"):
        open_tab(page, tab)
        page.wait_for_timeout(500)
        screenshot(page, tab.lower())


def open_single_form(page, base_url: str, template: str, field_name: str) -> None:
    """Signed in as bob, on the Single image tab, with ``template``'s form rebuilt (``field_name`` shown)."""
    log_in(page, base_url, "bob", "bob-pass")
    open_tab(page, "Single image")
    pick(page, "single-template", template)
    field(page, field_name).wait_for()  # the form is rebuilt for the chosen template's fields


def test_a_long_sheet_shows_its_first_problems_and_offers_every_one_as_csv(app_server, new_page, screenshot,
                                                                          tmp_path):
    """A sheet past the report's length lists only rows with problems (the first REPORT_TABLE_ROWS), and
    the page offers every row with problems as a CSV: not thousands of ready rows to scroll through."""
    import csv

    from webapp.handlers import REPORT_TABLE_ROWS

    base_url, _ = app_server
    page = new_page()
    log_in(page, base_url, "bob", "bob-pass")
    page.get_by_text("Signed in as").wait_for()
    rows = REPORT_TABLE_ROWS + 60  # every row past the first 20 is too tall: 240 problems, 20 ready rows
    sheet = tmp_path / "catalogue.csv"
    sheet.write_text("prompt,seed,width,height,steps\n" + "".join(
        f"item {i},{i},64,{64 if i < 20 else 9999},1\n" for i in range(rows)), encoding="utf-8")
    upload_sheet(page, sheet)
    page.get_by_text("20 rows ready, 240 rows with problems").wait_for()
    assert f"the first {REPORT_TABLE_ROWS} of 240" in page.locator("#report-summary").inner_text()
    listed = page.locator("#validation-report tbody tr")
    assert listed.count() == REPORT_TABLE_ROWS
    assert listed.first.locator("td").first.inner_text() == "22" and listed.get_by_text("ok").count() == 0
    screenshot(page, "batch-long-sheet-report")

    with page.expect_download() as download_info:
        page.locator("#report-problems a").first.click()
    problems = list(csv.reader(download_info.value.path().read_text(encoding="utf-8-sig").splitlines()))
    assert len(problems) == 1 + 240 and problems[1][0] == "22" and "height" in problems[1][1]


def test_single_image_from_the_form(app_server, new_page, screenshot):
    base_url, services = app_server
    page = new_page()
    open_single_form(page, base_url, "turbo_draft", "steps")
    field(page, "prompt").fill("a yellow teapot")
    field(page, "seed").fill("5")
    for name, value in (("width", "64"), ("height", "80"), ("steps", "2")):
        field(page, name).fill(value)
    screenshot(page, "single-image")
    page.locator("#single-generate").click()

    page.wait_for_function("() => document.querySelector('#single-image img')?.naturalHeight === 80", timeout=60_000)
    parameters = page.locator("#single-parameters")
    parameters.get_by_text("64 × 80").wait_for()
    text = parameters.inner_text()
    assert "a yellow teapot" in text and "turbo_draft" in text
    assert re.search(r"Seed\s+5\b", text) and re.search(r"Steps\s+2\b", text)
    screenshot(page, "single-image-result")
    assert services.ledger.search(text="a yellow teapot", limit=5)[0].status == "done"


def test_single_image_without_its_required_photo_or_with_a_size_out_of_range_says_which_field(
    app_server, new_page, screenshot
):
    base_url, _ = app_server
    page = new_page()
    open_single_form(page, base_url, "product_in_scene", "product_name")
    field(page, "product_name").fill("a mug with no photo")
    page.locator("#single-generate").click()
    page.get_by_text("product_photo: required value is empty").wait_for(timeout=30_000)
    screenshot(page, "single-image-no-photo")

    pick(page, "single-template", "turbo_draft")
    field(page, "steps").wait_for()
    field(page, "prompt").fill("a teapot")
    field(page, "width").fill("5000")
    page.locator("#single-generate").click()
    page.get_by_text("width: 5000 is above the maximum 2048").wait_for(timeout=30_000)


def test_single_image_with_an_uploaded_product_photo(app_server, new_page, screenshot, tmp_path):
    from PIL import Image

    base_url, services = app_server
    photo = tmp_path / "blue-mug.png"  # an opaque product on a transparent background (the inpaint mask)
    drawing = Image.new("RGBA", (48, 40), (0, 0, 0, 0))
    drawing.paste((30, 90, 200, 255), (12, 8, 36, 32))
    drawing.save(photo)
    page = new_page()
    open_single_form(page, base_url, "product_in_scene", "product_name")
    field(page, "product_name").fill("a blue mug photo")
    page.locator("#field-product_photo input[type=file]").set_input_files(str(photo))
    page.locator("#field-product_photo img").wait_for()  # the upload's preview
    for name, value in (("seed", "7"), ("width", "256"), ("height", "256"), ("steps", "1")):
        field(page, name).fill(value)
    screenshot(page, "single-image-photo")
    page.locator("#single-generate").click()

    result = "#single-image .result-image img"
    page.wait_for_function(f"() => document.querySelector('{result}')?.naturalWidth === 256", timeout=60_000)
    reference = page.locator("#single-image .reference-photos img")
    page.wait_for_function("() => document.querySelector('#single-image .reference-photos img')?.naturalWidth === 48")
    assert "blue-mug.png" in page.locator("#single-image .reference-photos").inner_text()
    image_box, reference_box = page.locator(result).bounding_box(), reference.bounding_box()
    assert reference_box["x"] >= image_box["x"] + image_box["width"]  # beside the image, not under it
    page.locator("#single-parameters").get_by_text("256 × 256").wait_for()
    screenshot(page, "single-image-photo-result")
    row = services.ledger.search(text="a blue mug photo", limit=5)[0]
    assert row.status == "done" and row.row_values["product_photo"] == "blue-mug.png"


def long_sheet(tmp_path):
    """Eight rows large enough (for the demo model) that the batch still runs when Cancel is pressed."""
    sheet = tmp_path / "long.csv"
    sheet.write_text("prompt,seed,width,height,steps\n"
                     + "".join(f"row {n},{n},768,768,12\n" for n in range(8)), encoding="utf-8")
    return sheet


def test_cancel_a_running_batch_with_live_progress(app_server, new_page, screenshot, tmp_path):
    base_url, services = app_server
    page = new_page()
    log_in(page, base_url, "bob", "bob-pass")
    sheet = long_sheet(tmp_path)
    upload_sheet(page, sheet)
    page.get_by_text("8 rows ready, 0 rows with problems").wait_for()
    page.locator("#start-batch").click()

    progress = page.locator("#batch-progress")
    progress.get_by_text(re.compile(r"running · done [1-7] · failed 0 · remaining \d+ · about \S+ left")).wait_for(
        timeout=60_000)
    page.locator("#batch-step").get_by_text(re.compile(r"row \d+: step \d+ of 12")).wait_for()
    page.locator("#batch-gallery img").first.wait_for()
    screenshot(page, "batch-running")

    page.locator("#cancel-batch").click()
    progress.get_by_text(re.compile(r"cancelled · done \d · failed 0 · remaining [1-7]")).wait_for(timeout=30_000)
    page.locator("#cancel-batch").wait_for(state="hidden")
    batch_id = page.locator("#watched-batch input").input_value()
    counts = services.ledger.batch_summary(batch_id)["counts"]
    assert 1 <= counts["done"] < 8 and counts["cancelled"] + counts["queued"] == 8 - counts["done"]
    screenshot(page, "batch-cancelled")


def test_resume_an_interrupted_batch(app_server, new_page, screenshot, tmp_path):
    base_url, services = app_server
    # Different sizes: each row is its own GPU batch, so the cancel lands in the last row (sheet row 4).
    batch_id = prepare_batch(services, tmp_path, "prompt,seed,width,height,steps\n"
                             "first,1,64,64,1\nsecond,2,80,80,1\nthird,3,96,96,4\n")

    def cancel_in_the_last_row(event):
        if event.kind == "step" and event.row_number == 4:
            services.runner.cancel(batch_id)

    stopped = services.runner.run(batch_id, on_event=cancel_in_the_last_row)
    assert stopped.cancelled >= 1 and stopped.done + stopped.cancelled == 3

    page = new_page()
    log_in(page, base_url, "bob", "bob-pass")
    page.locator("#interrupted").get_by_text("Interrupted batches").click()
    page.locator("#interrupted-table").get_by_text(batch_id).wait_for()
    pick(page, "resume-pick", batch_id)
    screenshot(page, "batch-interrupted")
    page.locator("#resume-batch").click()

    page.locator("#batch-progress").get_by_text(re.compile(r"done 3 · failed 0 · remaining 0")).wait_for(timeout=60_000)
    assert page.locator("#watched-batch input").input_value() == batch_id
    page.locator("#batch-gallery img").nth(2).wait_for()
    screenshot(page, "batch-resumed")
    assert services.ledger.batch_summary(batch_id)["counts"]["done"] == 3
    page.locator("#interrupted-table").get_by_text(batch_id).wait_for(state="detached")


def test_a_batch_started_during_warm_up_waits_its_turn(app_server, new_page, screenshot, tmp_path):
    base_url, services = app_server
    engine = services.engine
    page = new_page()
    log_in(page, base_url, "bob", "bob-pass")
    page.get_by_text("Signed in as").wait_for()
    sheet = tmp_path / "rows.csv"
    sheet.write_text(SHEET, encoding="utf-8")

    # Keep the model cache busy, as the minutes-long first load of a real checkpoint does: the warm-up
    # stays in its load, and the pages must neither hang nor start the batch before the model is ready.
    engine.models._lock.acquire()
    try:
        warm = threading.Thread(target=engine.warm_up, daemon=True)
        warm.start()
        page.locator("#warm-up-notice").get_by_text("Warming up the model").wait_for()
        upload_sheet(page, sheet)
        page.get_by_text("2 rows ready, 1 rows with problems").wait_for()
        page.locator("#start-batch").click()
        page.locator("#batch-progress").get_by_text(re.compile(r"done 0 · failed 0 · remaining 2")).wait_for()
        screenshot(page, "batch-warming-up")
        open_tab(page, "System")
        page.locator("#model-line").get_by_text("warming up the model…").wait_for()
        assert "warming up the model…" in page.locator("#system-info").inner_text()
        screenshot(page, "system-warming-up")
        open_tab(page, "Batch")
    finally:
        engine.models._lock.release()
    warm.join(timeout=60)
    page.locator("#batch-progress").get_by_text(re.compile(r"done 2 · failed 0 · remaining 0")).wait_for(timeout=60_000)
    page.locator("#warm-up-notice").wait_for(state="hidden")
    open_tab(page, "System")
    page.locator("#system-info").get_by_text("ready").wait_for()


def test_wrong_password_is_refused(app_server, new_page, screenshot):
    base_url, _ = app_server
    page = new_page()
    log_in(page, base_url, "alice", "not-her-password")
    page.get_by_text("Wrong user name or password").wait_for()
    screenshot(page, "login-refused")
    assert page.context.cookies() == [] or all(c["name"] != "sd35_session" for c in page.context.cookies())


def test_anonymous_file_requests_are_refused(app_server):
    base_url, _ = app_server
    for path in ("/files/zip/anything", "/files/some-batch/image.png"):
        assert httpx.get(base_url + path).status_code in (401, 403)


def test_a_user_cannot_switch_models(app_server, new_page, screenshot):
    base_url, services = app_server
    page = new_page()
    log_in(page, base_url, "bob", "bob-pass")
    open_tab(page, "System")
    page.get_by_text("demo model").first.wait_for()
    page.locator("#switch-model").click()
    page.get_by_text("Only admins may switch the model").wait_for()
    screenshot(page, "system-refused")
    assert services.engine.default_checkpoint == services.settings.default_checkpoint


def test_chinese_browser_gets_chinese_labels(app_server, new_page, screenshot, tmp_path):
    base_url, _ = app_server
    page = new_page(locale="zh-CN")
    page.goto(base_url + "/login")
    page.get_by_text("用户名").wait_for()
    screenshot(page, "login-zh")
    log_in(page, base_url, "alice", "alice-pass")
    page.get_by_text("已登录").wait_for()
    page.get_by_role("tab", name="批量生成").wait_for()
    page.get_by_text("检查表格").wait_for()
    page.locator("#demo-banner").get_by_text("演示模型").first.wait_for()
    sheet = tmp_path / "rows.csv"
    sheet.write_text(SHEET, encoding="utf-8")
    upload_sheet(page, sheet)
    page.locator("#batch-template-desc").get_by_text("快速草图（SD3.5 Large Turbo）").wait_for()  # the template's words
    page.get_by_text("2 行可以生成，1 行有问题。").wait_for()
    assert "有问题" in page.locator("#validation-report").inner_text()
    screenshot(page, "batch-zh")
    lacking = tmp_path / "lacking.csv"  # a refusal of the whole sheet is said in Chinese too
    lacking.write_text("colour\nred\n", encoding="utf-8")
    refused = new_page(locale="zh-CN")
    log_in(refused, base_url, "alice", "alice-pass")
    upload_sheet(refused, lacking)
    refused.locator("#report-summary").get_by_text("表格缺少必填列：prompt").wait_for()
    screenshot(refused, "batch-refused-zh")
    for tab, name in (("单张生成", "single-image-zh"), ("历史记录", "history-zh"), ("模板", "templates-zh"),
                      ("系统", "system-zh")):
        open_tab(page, tab)
        page.wait_for_timeout(500)
        screenshot(page, name)
    page.locator("#model-line").get_by_text("演示模型").wait_for()
    assert "当前模型" in page.locator("#system-info").inner_text()


def test_start_never_runs_a_check_the_page_no_longer_shows(app_server, new_page, screenshot, tmp_path):
    base_url, services = app_server
    page = new_page()
    log_in(page, base_url, "bob", "bob-pass")
    sign_out = page.locator("#app-header a", has_text="Sign out")
    sign_out.wait_for()
    assert sign_out.get_attribute("target") == "_self"  # signs this tab out, not a new one

    sheet = tmp_path / "rows.csv"
    sheet.write_text(SHEET, encoding="utf-8")
    upload_sheet(page, sheet)
    start = page.locator("#start-batch")
    page.get_by_text("2 rows ready, 1 rows with problems").wait_for()
    assert start.is_enabled()

    page.locator("#on-invalid").get_by_text("Do not start").click()  # checked again at once: now blocked
    page.get_by_text("stop on problems").wait_for()
    page.wait_for_function("() => document.querySelector('#start-batch').disabled")
    page.locator("#on-invalid").get_by_text("Skip").click()
    page.wait_for_function("() => !document.querySelector('#start-batch').disabled")

    page.locator("#batch-seed textarea, #batch-seed input").first.fill("7")  # a new seed needs a new check
    page.get_by_text("check the spreadsheet again").wait_for()
    assert not start.is_enabled()
    page.locator("#batch-seed textarea, #batch-seed input").first.fill("not-a-seed")
    page.get_by_role("button", name="Check spreadsheet").click()
    page.locator("#report-summary").get_by_text("⚠").wait_for()  # the failed check leaves nothing to start
    assert not start.is_enabled()
    screenshot(page, "batch-stale-check")


def test_on_a_public_space_each_visitor_owns_their_own_batches(space_server, new_page, screenshot, tmp_path):
    base_url, services = space_server
    owner = new_page()
    owner.goto(base_url + "/")
    sheet = long_sheet(tmp_path)
    upload_sheet(owner, sheet)
    owner.get_by_text("8 rows ready, 0 rows with problems").wait_for()
    owner.locator("#start-batch").click()
    owner.locator("#batch-progress").get_by_text(re.compile(r"running · done \d")).wait_for(timeout=60_000)
    batch_id = owner.locator("#watched-batch input").input_value()
    assert services.ledger.get_batch(batch_id)["user"].startswith("visitor-")

    # Another visitor (another browser) sees the batch but cannot stop it.
    other = new_page()
    other.goto(base_url + "/")
    pick(other, "watched-batch", batch_id)
    other.locator("#cancel-batch").click()
    other.get_by_text(re.compile("only they or an admin")).first.wait_for()
    screenshot(other, "space-visitor-cannot-cancel")
    assert services.queue.status(batch_id).state == "running"

    owner.locator("#cancel-batch").click()
    owner.locator("#batch-progress").get_by_text(re.compile(r"cancelled · done \d")).wait_for(timeout=30_000)


def test_signing_in_inside_a_cross_site_frame_that_drops_the_cookie_says_so(app_server, new_page, screenshot):
    """The app embedded in another site's page, as a Space is in huggingface.co's: the browser drops the
    session cookie set inside the frame. The frame says why and links to the app in a tab of its own,
    where signing in works."""
    base_url, _ = app_server
    page = new_page()
    # Another site (localhost is not 127.0.0.1's site), answered by the browser itself: the frame's cookies
    # are third-party. Both are loopback, so Chromium's private-network checks do not stop the frame.
    outer = base_url.replace("127.0.0.1", "localhost") + "/embedding-page"
    page.route(outer, lambda route: route.fulfill(
        content_type="text/html",
        body=f'<!doctype html><iframe id="app" src="{base_url}/login" style="width:900px;height:700px"></iframe>'))
    page.goto(outer)
    frame = page.frame_locator("#app")
    frame.locator("#username").fill("bob")
    frame.locator("#password").fill("bob-pass")
    frame.locator("button[type=submit]").click()
    frame.get_by_text("did not keep the sign-in cookie").wait_for()
    screenshot(page, "login-cookie-refused-in-frame")

    with page.context.expect_page() as opened:
        frame.locator("#open-in-tab").click()
    tab = opened.value  # first-party here: the same sign-in now reaches the app
    tab.fill("#username", "bob")
    tab.fill("#password", "bob-pass")
    tab.click("button[type=submit]")
    tab.get_by_text("Signed in as").wait_for()


def test_start_brings_the_progress_into_view_at_laptop_height(app_server, new_page, screenshot, tmp_path):
    from playwright.sync_api import expect

    base_url, _ = app_server
    page = new_page()
    page.set_viewport_size({"width": 1366, "height": 768})
    log_in(page, base_url, "bob", "bob-pass")
    sheet = tmp_path / "rows.csv"
    sheet.write_text(SHEET, encoding="utf-8")
    upload_sheet(page, sheet)
    page.get_by_text("2 rows ready, 1 rows with problems").wait_for()
    start = page.locator("#start-batch")
    start.evaluate("button => button.scrollIntoView({block: 'end'})")  # scrolled down just far enough to reach it
    start.click()
    # The progress section lies below the fold: Start takes the page there, or the batch starts out of sight.
    expect(page.locator("#progress-section")).to_be_in_viewport()
    page.locator("#batch-progress").get_by_text(re.compile(r"done 2 · failed 0 · remaining 0")).wait_for(timeout=90_000)
    expect(page.locator("#batch-progress")).to_be_in_viewport()
    screenshot(page, "batch-started-laptop")


def test_a_refusal_on_a_chinese_page_is_titled_in_chinese_and_leaves_the_pickers_usable(app_server, new_page,
                                                                                        screenshot):
    base_url, _ = app_server
    page = new_page(locale="zh-CN")
    log_in(page, base_url, "alice", "alice-pass")
    title = page.locator("#app-header h2")
    title.get_by_text("SD3.5 批量出图").wait_for()
    assert title.evaluate(  # the page's title reads as one, not as body text
        "h => parseFloat(getComputedStyle(h).fontSize) / parseFloat(getComputedStyle(document.body).fontSize)") >= 1.4
    open_tab(page, "模板")
    page.get_by_text("新增或编辑模板（仅管理员）").click()
    page.get_by_role("button", name="把所选模板载入编辑器").click()
    page.wait_for_function("() => [...document.querySelectorAll('input[type=checkbox]')].some(box => box.checked)")
    page.get_by_role("button", name="校验并保存", exact=True).click()  # a shipped template cannot be replaced
    toast = page.locator(".toast-body.error")
    toast.get_by_text("是内置模板").wait_for()
    heading = toast.locator(".toast-title")
    # Gradio's English "Error" is hidden and the page's word shown in its place
    assert heading.evaluate("t => getComputedStyle(t).fontSize") == "0px"
    assert heading.evaluate("t => getComputedStyle(t, '::before').content") == '"错误"'
    screenshot(page, "templates-refused-zh")
    # The refusal is in the pop-up only: no red cover laid over the template picker it would have updated
    picker = page.locator("#templates-template input")
    picker.scroll_into_view_if_needed()
    page.wait_for_timeout(300)
    assert picker.evaluate("i => { const r = i.getBoundingClientRect();"
                           " return document.elementFromPoint(r.x + r.width / 2, r.y + r.height / 2) === i; }")
    assert picker.input_value() == "article_workflow"


def english_sentence(text: str) -> str | None:
    """Two or more English words in a row outside quotes: what is left of an English sentence in Chinese text
    (single names, such as a column, a node type or a file, are values and stay as they are)."""
    unquoted = re.sub(r"“[^”]*”|\"[^\"]*\"", "", text)
    found = re.search(r"[A-Za-z]{2,}(?:[ ,:;'-]+[A-Za-z]{2,})+", unquoted)
    return found.group(0) if found else None


def test_a_chinese_page_says_problems_and_refusals_in_chinese(app_server, new_page, screenshot, tmp_path):
    """A sheet with a bad seed and a value over its maximum, a photo template's sheet naming a photo that is
    not uploaded (first without the zip: the workflow check's problem, then with it: the sheet's), a
    CSV named .xlsx, a photos zip that is none, a single image without its photo and a file over the upload
    limit: every report, status line and pop-up speaks Chinese, without an English sentence."""
    from PIL import Image

    base_url, services = app_server
    page = new_page(locale="zh-CN")
    log_in(page, base_url, "bob", "bob-pass")
    page.get_by_text("已登录").wait_for()
    summary, report = page.locator("#report-summary"), page.locator("#validation-report")

    def shown() -> str:
        return summary.inner_text() + "\n" + report.inner_text()

    bad = tmp_path / "bad.csv"
    bad.write_text("prompt,seed,width,height,steps\n一只猫,abc,64,64,1\n一只狗,12.5,64,9999,1\n一只鸟,3,64,64,1\n",
                   encoding="utf-8")
    upload_sheet(page, bad)
    report.get_by_text("seed: “abc”不是整数").wait_for()
    assert "seed: “12.5”不是整数；height: 9999 大于最大值 2048" in report.inner_text()
    page.get_by_text("1 行可以生成，2 行有问题。").wait_for()
    assert english_sentence(shown()) is None, shown()
    screenshot(page, "batch-problems-zh")

    scene = tmp_path / "scene.csv"
    scene.write_text("product_name,product_photo,scene\n杯子,mug.png,厨房\n", encoding="utf-8")
    page.goto(base_url + "/")
    upload_sheet(page, scene, template="product_in_scene")
    report.get_by_text("找不到图片“mug.png”").wait_for()  # the workflow's LoadImage, said from its values
    assert "节点 10（LoadImage）的输入“image”：找不到图片“mug.png”；可用的图片：无" in report.inner_text()
    assert english_sentence(shown()) is None, shown()
    photo = tmp_path / "cup.png"
    Image.new("RGB", (16, 16), (200, 30, 30)).save(photo)
    photos = tmp_path / "photos.zip"
    with zipfile.ZipFile(photos, "w") as archive:
        archive.write(photo, "cup.png")
    page.locator("#photos-file input[type=file]").set_input_files(str(photos))
    report.get_by_text("上传的图片中没有“mug.png”；可用：cup.png").wait_for()
    assert english_sentence(shown()) is None, shown()
    screenshot(page, "batch-photo-missing-zh")

    refused = new_page(locale="zh-CN")
    log_in(refused, base_url, "bob", "bob-pass")
    lying = tmp_path / "rows.xlsx"
    lying.write_text("prompt\n一只猫\n", encoding="utf-8")
    upload_sheet(refused, lying)
    refused.locator("#report-summary").get_by_text("“rows.xlsx”的扩展名是 .xlsx，但内容是 CSV 文本").wait_for()
    assert english_sentence(refused.locator("#report-summary").inner_text()) is None

    not_a_zip = tmp_path / "photos-broken.zip"
    not_a_zip.write_bytes(b"these are no photos")
    refused.goto(base_url + "/")
    upload_sheet(refused, scene, template="product_in_scene")
    refused.locator("#photos-file input[type=file]").set_input_files(str(not_a_zip))
    refused.locator("#report-summary").get_by_text("上传的产品照片不是有效的 zip 压缩包").wait_for()
    screenshot(refused, "batch-photos-refused-zh")

    # Gradio's own refusal of a file over the upload limit, before it is sent
    huge = tmp_path / "huge.csv"
    with open(huge, "wb") as out:
        out.truncate((int(services.settings.max_upload_mb) + 1) * 1024 * 1024)
    refused.goto(base_url + "/")
    refused.locator("#sheet-file input[type=file]").set_input_files(str(huge))
    toast = refused.locator("[data-testid=toast-text]").filter(has_text="huge.csv")
    toast.wait_for()
    assert toast.inner_text() == f'文件超过了 {services.settings.max_upload_mb:.1f} MB 的上传上限："huge.csv"'
    assert english_sentence(toast.inner_text()) is None, toast.inner_text()

    open_tab(refused, "单张生成")
    pick(refused, "single-template", "product_in_scene")
    field(refused, "product_name").wait_for()
    field(refused, "product_name").fill("杯子")
    refused.locator("#single-generate").click()
    refused.get_by_text("product_photo: 必填项为空").wait_for(timeout=30_000)
    screenshot(refused, "single-image-no-photo-zh")
