"""The web app in a real browser: log in, upload a sheet, validate, run a batch on the demo model, watch the
gallery fill, download the zip, find the batch in History; and the refusals (wrong password, anonymous
file requests, a non-admin switching models). Screenshots of each page go to test-artifacts/screenshots/."""

from __future__ import annotations

import io
import re
import zipfile

import httpx
import pytest

pytestmark = pytest.mark.browser

SHEET = """prompt,seed,width,height,steps
a red shoe on white,11,256,256,1
a blue mug,12,256,256,1
a bad row,13,256,9999,1
"""


def log_in(page, base_url: str, name: str, password: str) -> None:
    page.goto(base_url + "/")
    page.fill("#username", name)
    page.fill("#password", password)
    page.click("button[type=submit]")


def open_tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


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
    screenshot(page, "batch-validation")

    page.locator("#start-batch").click()
    page.locator("#batch-progress").get_by_text(re.compile(r"done 2 · failed 0 · remaining 0")).wait_for(timeout=90_000)
    gallery_images = page.locator("#batch-gallery img")
    gallery_images.nth(1).wait_for()
    assert gallery_images.count() == 2
    screenshot(page, "batch-finished")

    with page.expect_download() as download_info:
        page.locator(".download-link a").first.click()
    archive = zipfile.ZipFile(io.BytesIO(open(download_info.value.path(), "rb").read()))
    names = archive.namelist()
    assert sum(name.endswith(".png") for name in names) == 2
    assert {"manifest.csv", "manifest.json"} <= set(names)

    batch_id = page.locator("#watched-batch input").input_value()
    open_tab(page, "History")
    page.locator("#history-batch textarea, #history-batch input").first.fill(batch_id)
    page.locator("#history-search").click()
    page.locator("#history-table").get_by_text(f"{batch_id}:2").wait_for()
    screenshot(page, "history")

    for tab in ("Single image", "Templates", "System"):
        open_tab(page, tab)
        page.wait_for_timeout(500)
        screenshot(page, tab.lower().replace(" ", "-"))


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


def test_chinese_browser_gets_chinese_labels(app_server, new_page, screenshot):
    base_url, _ = app_server
    page = new_page(locale="zh-CN")
    page.goto(base_url + "/login")
    page.get_by_text("用户名").wait_for()
    screenshot(page, "login-zh")
    log_in(page, base_url, "alice", "alice-pass")
    page.get_by_text("已登录").wait_for()
    page.get_by_role("tab", name="批量生成").wait_for()
    page.get_by_text("检查表格").wait_for()
    screenshot(page, "batch-zh")
