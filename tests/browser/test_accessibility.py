"""The page for keyboard and screen-reader users (WCAG 2.2 AA basics): axe-core finds no serious or critical
violation on the sign-in page and on each tab in both languages; a batch goes from sign-in to its zip by
keyboard alone; progress and the check's verdict are live regions; images say which row they show; the
page's ``lang`` is the language it is written in.

axe-core comes from the ``axe-playwright-python`` package, which ships ``axe.min.js``: nothing is fetched
while the tests run.
"""

from __future__ import annotations

import io
import re
import zipfile

import pytest
from axe_playwright_python.base import AXE_SCRIPT

pytestmark = pytest.mark.browser

SHEET = """prompt,seed,width,height,steps
a red scarf on grey,11,64,64,1
a teal teapot,12,64,64,1
a bad row,13,64,9999,1
"""
# Gradio's own markup that no parameter of it changes: a pop-up's header is a role="button" holding its
# close button.
GRADIO_INTERNALS = {("nested-interactive", ".toast-header")}
TABS = {"en-US": ["Batch", "Single image", "History", "Templates", "System"],
        "zh-CN": ["批量生成", "单张生成", "历史记录", "模板", "系统"]}


def serious_violations(page) -> list[str]:
    """axe-core's serious and critical violations on the page as it is, as "rule: selector" lines.

    Transitions are ended first: a button that was just enabled fades to its colours, and axe measuring the
    contrast halfway would report colours nobody reads."""
    page.add_style_tag(content="*, *::before, *::after { transition: none !important; animation: none !important; }")
    page.evaluate(AXE_SCRIPT)
    results = page.evaluate("axe.run(document, {resultTypes: ['violations']})")
    found = []
    for violation in results["violations"]:
        if violation["impact"] not in {"serious", "critical"}:
            continue
        for node in violation["nodes"]:
            target = " ".join(map(str, node["target"]))
            if (violation["id"], target.split(" > ")[-1]) not in GRADIO_INTERNALS:
                found.append(f"{violation['id']}: {target} {node['html'][:120]}")
    return found


def tab_to(page, selector: str, presses: int = 60) -> None:
    """Presses Tab until the focused element matches ``selector``, as a keyboard user would."""
    for _ in range(presses):
        page.keyboard.press("Tab")
        if page.evaluate("s => document.activeElement?.matches(s)", selector):
            return
    raise AssertionError(f"Tab never reached {selector}")


def sign_in_by_keyboard(page, base_url: str, name: str, password: str) -> None:
    page.goto(base_url + "/")
    page.locator("#username").wait_for()  # the field has autofocus
    page.keyboard.type(name)
    page.keyboard.press("Tab")
    page.keyboard.type(password)
    page.keyboard.press("Enter")
    page.locator("#app-header h2").wait_for()


@pytest.mark.parametrize("locale", ["en-US", "zh-CN"])
def test_axe_finds_no_serious_violation_on_sign_in_and_each_tab(app_server, new_page, locale):
    base_url, _ = app_server
    page = new_page(locale=locale)
    page.goto(base_url + "/")
    page.locator("#username").wait_for()
    assert serious_violations(page) == [], "sign-in page"
    sign_in_by_keyboard(page, base_url, "bob", "bob-pass")
    page.locator("#demo-banner .badge").wait_for()  # the demo-model label: text, not only a colour
    page.locator("#batch-template-desc code").wait_for()
    for name in TABS[locale]:
        page.get_by_role("tab", name=name).click()
        page.wait_for_timeout(500)  # the tab's content has painted
        assert serious_violations(page) == [], name
    page.locator("#model-line .badge").wait_for()
    assert page.locator("#model-line .badge").inner_text().strip() != ""


def test_the_upload_area_is_named_in_the_pages_language(app_server, new_page):
    """Gradio names its upload area "Click to upload or drop files" in every locale; a screen reader on the
    Chinese page hears it in Chinese; the English page keeps Gradio's words."""
    base_url, _ = app_server
    page = new_page(locale="zh-CN")
    sign_in_by_keyboard(page, base_url, "bob", "bob-pass")
    upload = page.locator("#sheet-file button").first
    upload.wait_for()
    assert upload.get_attribute("aria-label") == "点击上传或拖放文件"
    assert page.locator('[aria-label="Click to upload or drop files"]').count() == 0
    english = new_page(locale="en-US")
    sign_in_by_keyboard(english, base_url, "bob", "bob-pass")
    assert english.locator("#sheet-file button").first.get_attribute("aria-label") == "Click to upload or drop files"


def test_batch_by_keyboard_alone_with_live_progress_and_captioned_images(app_server, new_page, tmp_path):
    base_url, _ = app_server
    page = new_page()
    choosers = []
    # Listening from the start: Playwright intercepts file choosers only once a listener is there, and one
    # added together with the key press can miss a chooser the page opens at once.
    page.on("filechooser", lambda chooser: choosers.append(chooser))
    sign_in_by_keyboard(page, base_url, "bob", "bob-pass")

    tab_to(page, "#batch-template input")
    page.keyboard.type("turbo_draft")
    page.keyboard.press("Enter")
    page.locator("#batch-template-desc code", has_text="turbo_draft").wait_for()

    sheet = tmp_path / "rows.csv"
    sheet.write_text(SHEET, encoding="utf-8")
    tab_to(page, "#sheet-file button")  # the upload area is a button: Enter opens the file chooser
    page.keyboard.press("Enter")
    page.wait_for_timeout(500)  # the chooser's event
    assert len(choosers) == 1
    choosers[0].set_files(str(sheet))

    summary = page.locator("#report-summary")
    summary.get_by_text("2 rows ready, 1 rows with problems").wait_for()
    assert summary.get_attribute("role") == "status"  # the verdict is said as it appears
    assert page.locator("#validation-report th").first.inner_text() != ""
    assert serious_violations(page) == [], "validation report"

    tab_to(page, "#start-batch")
    page.keyboard.press("Enter")
    progress = page.locator("#batch-progress")
    progress.get_by_text(re.compile(r"done 2 · failed 0 · remaining 0")).wait_for(timeout=90_000)
    # The visible line changes every second; screen readers are told the batch's state in its own region.
    assert progress.get_attribute("role") is None
    announced = page.locator("#batch-announcement")
    assert announced.get_attribute("role") == "status"
    announced.get_by_text("done · done 2 · failed 0 · remaining 0").wait_for()

    images = page.locator("#batch-gallery img")
    images.nth(1).wait_for()
    assert [images.nth(i).get_attribute("alt") for i in range(2)] == ["Row 2: a red scarf on grey", "Row 3: a teal teapot"]
    page.locator(".download-link a").wait_for()
    assert serious_violations(page) == [], "finished batch"

    tab_to(page, ".download-link a")
    with page.expect_download() as download:
        page.keyboard.press("Enter")
    names = zipfile.ZipFile(io.BytesIO(download.value.path().read_bytes())).namelist()
    assert sum(name.endswith(".png") for name in names) == 2


def test_history_image_names_its_row(app_server, new_page, tmp_path):
    from webapp import handlers
    from webapp.guard import Caller

    base_url, services = app_server
    sheet = tmp_path / "history.csv"
    sheet.write_text("prompt,seed,width,height,steps\na green kettle,21,64,64,1\n", encoding="utf-8")
    batch_id = services.runner.start(handlers.check_sheet(services, Caller("bob", "user"), "turbo_draft",
                                                          sheet).prepared)
    services.runner.run(batch_id)
    page = new_page(locale="zh-CN")
    sign_in_by_keyboard(page, base_url, "bob", "bob-pass")
    page.get_by_role("tab", name="历史记录").click()
    page.locator("#history-batch textarea, #history-batch input").first.fill(batch_id)
    page.locator("#history-search").click()
    page.locator("#history-table").get_by_text("a green kettle", exact=True).first.click()
    image = page.locator("#history-image img")
    image.wait_for()
    assert image.get_attribute("alt") == "第 2 行：a green kettle"
    page.locator("#history-detail").get_by_text("64 × 64").wait_for()
    page.wait_for_timeout(500)
    assert serious_violations(page) == [], "history detail"


@pytest.mark.parametrize(("locale", "lang"), [("zh-CN", "zh-CN"), ("zh", "zh-CN"), ("zh-HK", "zh-CN"),
                                             ("zh-TW", "zh-CN"), ("en-US", "en"), ("fr-FR", "en")])
def test_page_language_is_the_language_it_is_written_in(app_server, new_page, locale, lang):
    # Gradio's front end alone would show zh and zh-HK its English labels under the server's Chinese header,
    # and zh-TW its traditional characters: the whole page is in the language the server chose.
    base_url, _ = app_server
    page = new_page(locale=locale)
    sign_in_by_keyboard(page, base_url, "bob", "bob-pass")
    page.get_by_role("tab").first.wait_for()
    page.wait_for_function(f"() => document.documentElement.lang === {lang!r}")
    tabs = TABS["zh-CN" if lang == "zh-CN" else "en-US"]
    assert page.get_by_role("tab").all_inner_texts()[:len(tabs)] == tabs
