"""The Gradio UI: lays out the five pages and wires events to ``webapp.handlers``. No logic lives here.

Labels are i18n keys (``webapp/i18n.py``) that the browser shows in its own language; messages built on
the server use the request's ``Accept-Language``. Library errors become ``gr.Error`` in :func:`_guard`,
the one place that does so. Every event that waits on the GPU shares the concurrency group ``"gpu"``
with limit 1; batches themselves run on the :class:`engine.batch_queue.BatchQueue` thread, so closing the tab
never stops one, and a 1 s timer shows the progress of whatever batch the page watches (and whether the
model is still warming up).

Read-only tables (validation report, template fields, parameters, system details) are plain HTML tables
built here: they size their columns to their content and every cell is in the page as the user sees it.
The history results stay a ``gr.Dataframe`` because a click on a row selects a generation.
"""

from __future__ import annotations

import functools
import html
import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import gradio as gr

from engine.errors import BatchError, EngineError
from webapp import handlers
from webapp.i18n import LANGUAGES, gradio_i18n, language_of_request, text
from webapp.files import file_url, zip_url

GPU = {"concurrency_id": "gpu", "concurrency_limit": 1}
QUIET = {"show_progress": "hidden", "concurrency_limit": None}
PLAIN = {"apply_default_css": False, "js_on_load": None}  # HTML blocks styled by CSS below, not clickable
# Areas whose new text a screen reader says as it appears (the check's verdict, the batch's progress and
# errors): the page head's script makes each a role="status" live region, which Gradio has no parameter for.
LIVE = "live-status"
# For events whose outputs are controls the user still needs (template pickers, the history table, Start): a
# refusal is said in its pop-up, never laid over them as a red "Error" cover that hides them until dismissed.
CONTROLS = {"show_progress": "hidden"}
# Start moves the page to the progress section: at a laptop's height it lies below the fold, and a batch
# that starts out of sight looks like a click that did nothing.
SHOW_PROGRESS_JS = ("() => document.getElementById('progress-section')"
                    "?.scrollIntoView({behavior: 'smooth', block: 'start'})")


def toast_title_css() -> str:
    """Gradio titles its pop-ups with their type in English ("Info", "Error"; it ignores ``title``): on a page
    in another language the English word is hidden and the page's word (``toast.*``) shown in its place."""
    rules = []
    for lang in LANGUAGES:
        if lang == "en":
            continue
        rules.append(f"html:lang({lang}) .toast-title {{ font-size: 0 !important; }}\n"
                     f"html:lang({lang}) .toast-title::before, html:lang({lang}) .toast-title > * "
                     "{ font-size: var(--text-lg); }")
        rules += [f'html:lang({lang}) .toast-title.{kind}::before {{ content: "{text(f"toast.{kind}", lang)}"; '
                  "margin-right: .3em; }" for kind in ("info", "warning", "error")]
    return "\n".join(rules)


def page_head() -> str:
    """A script for the page's ``<head>``: the one message Gradio's own front end makes and says in English
    only, its refusal of an upload over ``max_file_size`` before sending it ("File(s) exceed the maximum
    allowed size of 1.0 Mb: "big.csv""), is said in the page's language (``upload.too_large``); the areas
    marked ``LIVE`` become live regions. (The page's language reaches Gradio's front end earlier, through
    :func:`webapp.i18n.page_locale_script`.)"""
    words = {lang: text("upload.too_large", lang) for lang in LANGUAGES if lang != "en"}
    script = r"""<script>
(() => {
  const words = WORDS;
  const gradio = /^File\(s\) exceed the maximum allowed size of (.+?): (.+)$/s;
  const say = (node) => {
    const template = words[(document.documentElement.lang || "").split("-")[0]];
    const found = template && gradio.exec(node.textContent.trim());
    if (found) node.textContent = template.replace("{size}", found[1].replace(/b$/, "B")).replace("{files}", found[2]);
  };
  new MutationObserver(() => {
    document.querySelectorAll('[data-testid="toast-text"]').forEach(say);
    document.querySelectorAll('.LIVE:not([role])').forEach((area) => area.setAttribute("role", "status"));
  }).observe(document.documentElement, {childList: true, subtree: true});
})();
</script>"""
    script = script.replace("LIVE", LIVE, 1)
    return script.replace("WORDS", json.dumps(words, ensure_ascii=False), 1)


def page_theme() -> gr.themes.Base:
    """Gradio's default theme with text and primary buttons at WCAG AA contrast: its subdued text
    (captions, field help, the upload's "- or -") is #bbbbc2 on white (1.9:1) and its primary buttons white
    on orange-500 (2.8:1); neutral-600 and orange-700 reach 7.7:1 and 5.2:1."""
    return gr.themes.Default().set(
        body_text_color_subdued="*neutral_600",
        button_primary_background_fill="*primary_700", button_primary_background_fill_dark="*primary_700",
        button_primary_background_fill_hover="*primary_800", button_primary_background_fill_hover_dark="*primary_800",
    )


CSS = """
#app-header h2 { font-size: 1.6em; font-weight: 700; margin: 4px 0 2px; }
#app-header p { margin: 0; }
/* read by screen readers, not shown */
.visually-hidden { position: absolute !important; width: 1px; height: 1px; padding: 0; margin: -1px;
                   overflow: hidden; clip: rect(0 0 0 0); white-space: nowrap; border: 0; }
.demo-banner { background: #fff7ed; border: 1px solid #fdba74; border-radius: 8px; padding: 8px 14px;
               color: #7c2d12; }
.notice { background: #eff6ff; border: 1px solid #93c5fd; border-radius: 8px; padding: 8px 14px; color: #1e3a8a; }
.badge { display: inline-block; padding: 1px 9px; border-radius: 999px; font-size: .82em; font-weight: 600;
         white-space: nowrap; }
.badge.demo { background: #c2410c; color: #fff; }
.badge.real { background: #15803d; color: #fff; }
.badge.ok { background: #dcfce7; color: #166534; }
.badge.problem { background: #fee2e2; color: #991b1b; }
.section-title p { font-size: 1.05em; font-weight: 600; margin: 6px 0 0; }
.align-end { align-items: flex-end; }
.caption { font-size: .88em; color: var(--body-text-color-subdued); margin: 10px 0 4px; }
.table-scroll { max-height: 340px; overflow: auto; border: 1px solid var(--border-color-primary);
                border-radius: 8px; }
table.data-table { width: 100%; border-collapse: collapse; font-size: .92em; margin: 0; }
table.data-table th, table.data-table td { text-align: left; padding: 6px 10px; vertical-align: top;
                                           border: 0; border-bottom: 1px solid var(--border-color-primary); }
table.data-table th { white-space: nowrap; font-weight: 600; background: var(--background-fill-secondary);
                      position: sticky; top: 0; }
table.data-table tr:last-child > * { border-bottom: 0; }
table.data-table td.narrow { white-space: nowrap; width: 1%; }
table.kv-table th { position: static; width: 12em; background: transparent; }
table.data-table td:last-child { overflow-wrap: anywhere; }
.html-container { padding: 0 !important; }
.model-card { border: 1px solid var(--border-color-primary); border-radius: 8px; padding: 10px 14px; }
.model-card.demo { border-color: #fdba74; background: #fff7ed; color: #7c2d12; }
.model-card .name { font-size: 1.15em; font-weight: 600; margin: 0 8px; }
.model-card p { margin: 6px 0 0; }
.step-bar { height: 8px; background: #e5e7eb; border-radius: 4px; overflow: hidden; margin-top: 4px; }
.step-bar > div { height: 100%; background: #ea580c; transition: width .4s; }
.download-link a { display: inline-block; padding: 8px 14px; border-radius: 8px; background: #c2410c;
                   color: #fff !important; text-decoration: none; font-weight: 600; }
.result-image img { max-width: 100%; max-height: 560px; min-width: 192px; border-radius: 6px;
                    border: 1px solid var(--border-color-primary); image-rendering: auto; }
.thumbs { display: flex; flex-wrap: wrap; gap: 8px; max-height: 420px; overflow: auto; }
.thumbs img { width: 128px; height: 128px; object-fit: contain; border-radius: 6px; display: block;
              background: var(--background-fill-secondary); border: 1px solid var(--border-color-primary); }
.thumbs figure { margin: 0; width: 128px; }
.thumbs figcaption { font-size: .78em; color: var(--body-text-color-subdued); overflow: hidden;
                     text-overflow: ellipsis; white-space: nowrap; }
.reference-photos { display: flex; gap: 10px; flex-wrap: wrap; margin-top: 8px; }
.single-result { display: flex; gap: 14px; flex-wrap: wrap; align-items: flex-start; }
.single-result > .result-image { flex: 0 1 auto; }
.single-result > .reference-photos { margin-top: 0; }
.single-result .reference-photos img { border: 1px solid var(--border-color-primary); border-radius: 6px; }
""" + toast_title_css()


class _Html(str):
    """A table cell that is already HTML (a badge); every other cell is escaped."""


def _guard(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The one place library errors become messages in the browser, in the language of the request
    the handler was called with."""

    @functools.wraps(fn)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except EngineError as exc:
            request = next((a for a in [*args, *kwargs.values()] if isinstance(a, gr.Request)), None)
            message = handlers.error_message(exc, language_of_request(request))
            raise gr.Error(message, print_exception=False) from exc

    return guarded


def _cell(value: Any, narrow: bool = False) -> str:
    content = value if isinstance(value, _Html) else html.escape("" if value is None else str(value))
    return f'<td class="narrow">{content}</td>' if narrow else f"<td>{content}</td>"


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]], narrow: Sequence[int] = (),
           caption: str = "") -> str:
    """An HTML table; columns whose index is in ``narrow`` take only the width of their content."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(_cell(value, index in narrow) for index, value in enumerate(row)) + "</tr>" for row in rows
    )
    title = f'<p class="caption">{html.escape(caption)}</p>' if caption else ""
    return (f'{title}<div class="table-scroll"><table class="data-table"><thead><tr>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table></div>")


def _pairs_table(pairs: Iterable[tuple[str, str]]) -> str:
    """A two-column label/value table (parameters, system details)."""
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in pairs)
    return f'<table class="data-table kv-table"><tbody>{body}</tbody></table>'


def _badge(label: str, kind: str) -> _Html:
    return _Html(f'<span class="badge {kind}">{html.escape(label)}</span>')


def _step_bar(fraction: float, label: str) -> str:
    if not label:
        return ""
    width = max(0.0, min(1.0, fraction)) * 100
    return (
        f'<div>{html.escape(label)}<div class="step-bar" role="progressbar" aria-label="{html.escape(label)}" '
        f'aria-valuemin="0" aria-valuemax="100" aria-valuenow="{width:.0f}"><div style="width:{width:.0f}%"></div>'
        "</div></div>"
    )


def _download_link(batch_id: str | None, label: str) -> str:
    if not batch_id:
        return ""
    return (
        f'<div class="download-link"><a href="{zip_url(batch_id)}" download>'
        f"{html.escape(label)} ({html.escape(batch_id)})</a></div>"
    )


def _image_html(path: str | None, outputs: Any, caption: str) -> str:
    """A generated image, linked to its full size; ``caption`` (handlers.image_caption) is its alt text."""
    if not path:
        return ""
    url, alt = file_url(outputs, path), html.escape(caption)
    return f'<div class="result-image"><a href="{url}" target="_blank"><img src="{url}" alt="{alt}"></a></div>'


def _reference_html(paths: list[str], lang: str) -> str:
    """The product photo(s) a generation was made from, beside its image in the history page."""
    if not paths:
        return ""
    figures = "".join(
        f'<figure style="margin:0"><img src="{handlers.reference_data_url(p)}" style="max-width:100%;max-height:260px" '
        f'alt=""><figcaption>{html.escape(text("history.reference", lang))}: {html.escape(Path(p).name)}</figcaption>'
        "</figure>"
        for p in paths
    )
    return f'<div class="reference-photos">{figures}</div>'


def _result_html(path: str | None, references: list[str], outputs: Any, caption: str, lang: str) -> str:
    """A generated image with the product photo(s) it was made from beside it."""
    image = _image_html(path, outputs, caption)
    if not references:
        return image
    return f'<div class="single-result">{image}{_reference_html(references, lang)}</div>'


def _notice(message: str) -> str:
    return f'<div class="notice" role="status">{html.escape(message)}</div>'


def _model_card(info: dict[str, Any], lang: str) -> str:
    """The System page's headline: which model, whether it is the demo, whether it is still warming up."""
    demo = bool(info.get("demo_in_use"))
    badge = _badge(text("system.demo" if demo else "system.real", lang), "demo" if demo else "real")
    details = f"{info.get('precision')} · {info.get('device')}"
    name = html.escape(str(info.get("default_checkpoint")))
    headline = f"<b>{html.escape(text('system.model', lang))}:</b><span class=\"name\">{name}</span>{badge}"
    lines = [f"{headline} · {html.escape(details)}"]
    if info.get("warming_up"):
        lines.append(f"<p><b>{html.escape(text('system.warming_up', lang))}</b></p>")
    return f'<div class="model-card{" demo" if demo else ""}">' + "".join(lines) + "</div>"


def _field_widget(spec: Any, description: str, checkpoints: list[str]) -> gr.components.Component:
    """The input widget for one template field, by its type (engine.templates.FIELD_TYPES)."""
    common = {"label": spec.name + (" *" if spec.required else ""), "info": description or None,
              "elem_id": f"field-{spec.name}", "interactive": True}
    example = "" if spec.example is None else str(spec.example)
    if spec.type == "choice" or spec.choices:
        return gr.Dropdown(choices=list(spec.choices), value=spec.default, **common)
    if spec.type == "bool":
        return gr.Checkbox(value=bool(spec.default), **common)
    if spec.type in {"int", "float"}:
        # No minimum/maximum here: Gradio would refuse an out-of-range number in its own English words,
        # without the field's name; the engine's check says which field, in the page's language.
        return gr.Number(value=spec.default, precision=0 if spec.type == "int" else None, **common)
    if spec.type == "checkpoint":
        return gr.Dropdown(choices=checkpoints, value=spec.default, allow_custom_value=True, **common)
    if spec.type == "image":
        # The uploaded file itself (image_mode None): a product photo's transparency is the inpaint mask.
        common.pop("info")
        return gr.Image(type="filepath", image_mode=None, sources=["upload"], height=220, **common)
    if spec.type == "seed":
        # Text, not a number widget: seeds go up to 2**64 - 1 and a browser number keeps only 53 bits.
        return gr.Textbox(value="" if spec.default is None else str(spec.default), placeholder=example, **common)
    return gr.Textbox(value=spec.default, placeholder=example, lines=3 if spec.type == "text" else 1, **common)


NO_FILE = gr.update(value=None, visible=False)


def _problems_file(sheet_path: str, problems_csv: str) -> str:
    """The rows with problems as a CSV file to download, beside the uploaded sheet in Gradio's upload cache
    (removed with it, see :func:`upload_cache_schedule`); UTF-8 with a BOM, so Excel reads Chinese right."""
    import tempfile

    sheet = Path(sheet_path)
    with tempfile.NamedTemporaryFile("w", encoding="utf-8-sig", newline="", dir=sheet.parent,
                                     prefix=f"{sheet.stem[:60]}-problems-", suffix=".csv", delete=False) as out:
        out.write(problems_csv)
    return out.name


def upload_cache_schedule(retention_s: int) -> tuple[int, int] | None:
    """Gradio's ``delete_cache`` ``(every, older_than)`` for the ``upload_retention_s`` setting: uploads would
    otherwise pile up in Gradio's cache for the life of the machine (sheets and photo zips up to
    ``max_upload_mb`` each). Nothing the app keeps lives there: a checked sheet's rows are set aside in the
    uploads' staging folder and its photos unpacked beside them, a template's files are read when saved."""
    if retention_s <= 0:
        return None
    return max(1, min(3600, retention_s // 4)), retention_s


def build_ui(services: Any, settings: Any, users: Any = None, anonymous_role: str = "admin",
             visitor_of: Callable[[gr.Request], str] | None = None) -> gr.Blocks:
    """The web app's Blocks. ``users`` (a UserStore) decides login and roles; None means no users, and
    then everyone acts with ``anonymous_role`` (admin on a localhost workstation, user on a public Space),
    named by ``visitor_of`` (a public Space: each browser its own visitor, so it owns its own batches)."""
    L = gradio_i18n()
    outputs = settings.outputs_path
    names = handlers.template_names(services)
    first = names[0] if names else None
    status_choices = [(L("history.any_status"), ""), *[(L(f"status.{s}"), s) for s in handlers.LEDGER_STATUSES]]

    def caller(request: gr.Request) -> handlers.Caller:
        if visitor_of is not None and (users is None or not users.configured):
            return handlers.Caller(visitor_of(request), anonymous_role)
        return handlers.caller_for(users, getattr(request, "username", None), language_of_request(request),
                                   anonymous_role)

    with gr.Blocks(title="SD3.5 batch images", analytics_enabled=False,
                   delete_cache=upload_cache_schedule(int(settings.upload_retention_s))) as ui:
        # Gradio keeps every page session's state (a copy of the page's components, ~0.25 MB) until 10,000
        # sessions have piled up, closed tabs included: gigabytes on a server left running for weeks. It reads
        # the bound from here when the page is mounted (launch() would set it the same way).
        ui.state_session_capacity = max(1, int(settings.page_sessions))
        header = gr.HTML(elem_id="app-header", **PLAIN)
        demo_banner = gr.HTML(visible=False, elem_id="demo-banner", **PLAIN)

        with gr.Tabs():
            # ------------------------------------------------------------------------------ batch
            with gr.Tab(L("tab.batch"), id="batch"):
                warm_notice = gr.HTML(visible=False, elem_id="warm-up-notice", **PLAIN)
                with gr.Row(equal_height=False):
                    with gr.Column(scale=2):
                        gr.Markdown(L("batch.section.template"), elem_classes="section-title")
                        batch_template = gr.Dropdown(choices=names, value=first, label=L("template.pick"),
                                                     elem_id="batch-template")
                        batch_template_desc = gr.Markdown(elem_id="batch-template-desc")
                        batch_template_image = gr.Image(label=L("template.example"), interactive=False,
                                                        visible=False, height=220)
                        batch_fields = gr.HTML(elem_id="batch-fields", **PLAIN)
                    with gr.Column(scale=3):
                        gr.Markdown(L("batch.section.sheet"), elem_classes="section-title")
                        sheet_file = gr.File(label=L("batch.upload"), type="filepath", elem_id="sheet-file",
                                             file_types=[".csv", ".tsv", ".txt", ".xlsx", ".xlsm"], height=130)
                        photos_hint = gr.Markdown(visible=False)
                        photos_file = gr.File(label=L("batch.photos"), type="filepath", elem_id="photos-file",
                                              file_types=[".zip"], visible=False, height=130)
                        with gr.Row():
                            on_invalid = gr.Radio(
                                choices=[(L("batch.on_invalid.skip"), "skip"), (L("batch.on_invalid.stop"), "stop")],
                                value="skip", label=L("batch.on_invalid"), scale=3, elem_id="on-invalid")
                            batch_seed = gr.Textbox(label=L("batch.seed"), value="", scale=2, elem_id="batch-seed")
                        check_button = gr.Button(L("batch.check"), variant="secondary")
                        report_summary = gr.Markdown(elem_id="report-summary", elem_classes=LIVE)
                        report_table = gr.HTML(elem_id="validation-report", **PLAIN)
                        problems_file = gr.File(label=L("batch.problems_file"), visible=False, interactive=False,
                                                elem_id="report-problems", height=80)
                        start_button = gr.Button(L("batch.start"), variant="primary", interactive=False,
                                                 elem_id="start-batch")
                # A closed tab's state is dropped an hour later; its checked rows, waiting on disk for Start,
                # go with it instead of staying a week in the staging folder.
                prepared_state = gr.State(None, delete_callback=handlers.discard_check)

                gr.Markdown(L("batch.section.progress"), elem_classes="section-title", elem_id="progress-section")
                with gr.Row(equal_height=False, elem_classes="align-end"):
                    watched = gr.Dropdown(choices=[], label=L("batch.watching"), allow_custom_value=True,
                                          scale=5, elem_id="watched-batch")
                    refresh_button = gr.Button(L("batch.refresh"), scale=1, min_width=120)
                progress_line = gr.Markdown(elem_id="batch-progress")
                # The line above changes every second; screen readers hear this one (progress_announcement).
                progress_announcement = gr.Markdown(elem_id="batch-announcement",
                                                    elem_classes=[LIVE, "visually-hidden"])
                step_html = gr.HTML(elem_id="batch-step", **PLAIN)
                gallery = gr.HTML(elem_id="batch-gallery", **PLAIN)
                with gr.Row(equal_height=False, elem_classes="align-end"):
                    download_html = gr.HTML(elem_id="batch-download", **PLAIN)
                    cancel_button = gr.Button(L("batch.cancel"), variant="stop", visible=False, scale=0,
                                              min_width=160, elem_id="cancel-batch")
                shown_images = gr.State(-1)
                last_state = gr.State(None)  # (watched batch's state, warming up) at the previous tick
                remembered_batch = gr.BrowserState(None, storage_key="sd35-watched-batch")

                with gr.Accordion(L("batch.interrupted"), open=False, elem_id="interrupted"):
                    interrupted_table = gr.HTML(elem_id="interrupted-table", **PLAIN)
                    with gr.Row(equal_height=False, elem_classes="align-end"):
                        resume_pick = gr.Dropdown(choices=[], label=L("batch.watching"), scale=5,
                                                  elem_id="resume-pick")
                        resume_button = gr.Button(L("batch.resume"), scale=1, min_width=120, elem_id="resume-batch")
                timer = gr.Timer(1.0)

            # ------------------------------------------------------------------------------ single
            with gr.Tab(L("tab.single"), id="single"), gr.Row(equal_height=False):
                with gr.Column(scale=2):
                    single_template = gr.Dropdown(choices=names, value=first, label=L("template.pick"),
                                                  elem_id="single-template")

                    @gr.render(inputs=single_template)
                    def single_form(template_name: str | None, request: gr.Request):
                        if not template_name:
                            gr.Markdown(L("template.none"))
                            return
                        described = handlers.template_fields(services, template_name, language_of_request(request))
                        specs = [spec for spec, _ in described]
                        checkpoints = handlers.model_choices(services)
                        widgets = [_field_widget(spec, description, checkpoints)
                                   for spec, description in described]

                        @_guard
                        def run_single(values: dict[Any, Any], request: gr.Request,
                                       progress=gr.Progress()):  # noqa: B008 (how Gradio injects progress)
                            who, lang = caller(request), language_of_request(request)
                            form = {spec.name: values[widget] for spec, widget in zip(specs, widgets)
                                    if spec.type != "image"}
                            photos = {spec.name: values[widget] for spec, widget in zip(specs, widgets)
                                      if spec.type == "image"}
                            result = handlers.generate_single(
                                services, who, template_name, form,
                                on_progress=lambda fraction, desc: progress(fraction, desc=desc), lang=lang,
                                photos=photos,
                            )
                            table = _pairs_table(handlers.parameter_rows(result.parameters, lang))
                            caption = f'<p class="caption">{html.escape(text("single.parameters", lang))}</p>'
                            return (_result_html(result.image_path, result.reference_images, outputs,
                                                 result.caption, lang),
                                    caption + table)

                        # A set of inputs arrives as one {component: value} dict: the form has any number of fields.
                        generate.click(run_single, inputs=set(widgets), outputs=[single_image, single_params], **GPU)

                    # Outside the form that is rendered again for each template: a button rendered inside it
                    # left its label in the page's store, where an empty photo field of the next form read it
                    # as its value (an error before anything ran).
                    generate = gr.Button(L("single.generate"), variant="primary", elem_id="single-generate")

                with gr.Column(scale=3):
                    gr.Markdown(L("single.hint"))
                    single_image = gr.HTML(elem_id="single-image", **PLAIN)
                    single_params = gr.HTML(elem_id="single-parameters", **PLAIN)
                # The last result belongs to the template that made it: another template starts blank
                single_template.change(lambda _name: ("", ""), inputs=single_template,
                                       outputs=[single_image, single_params], **QUIET)

            # ----------------------------------------------------------------------------- history
            with gr.Tab(L("tab.history"), id="history") as history_tab:
                with gr.Row():
                    history_text = gr.Textbox(label=L("history.text"), scale=3, elem_id="history-text")
                    history_batch = gr.Textbox(label=L("history.batch"), scale=2, elem_id="history-batch")
                    history_status = gr.Dropdown(choices=status_choices, value="", label=L("history.status"),
                                                 scale=1, min_width=140)
                    history_from = gr.Textbox(label=L("history.date_from"), scale=1, min_width=170,
                                              placeholder="2026-01-31")
                    history_to = gr.Textbox(label=L("history.date_to"), scale=1, min_width=170,
                                            placeholder="2026-12-31")
                with gr.Row():
                    history_search = gr.Button(L("history.search"), variant="primary", elem_id="history-search",
                                               scale=4)
                    history_page = gr.Number(label=L("history.page_number"), value=1, minimum=1, precision=0,
                                             scale=1, min_width=100, elem_id="history-page")
                history_table = gr.Dataframe(label=L("history.results"), interactive=False, wrap=True,
                                             max_height=360, elem_id="history-table",
                                             column_widths=["21%", "5%", "8%", "24%", "8%", "11%", "7%", "16%"])
                history_hint = gr.Markdown()
                with gr.Row(equal_height=False, visible=False) as history_selected:
                    with gr.Column(scale=2):
                        history_image = gr.HTML(elem_id="history-image", **PLAIN)
                        with gr.Row():
                            rerun_button = gr.Button(L("history.rerun"), interactive=False, elem_id="history-rerun")
                        history_zip = gr.HTML(**PLAIN)
                    with gr.Column(scale=3):
                        history_detail = gr.HTML(elem_id="history-detail", **PLAIN)
                        with gr.Accordion(L("history.full_record"), open=False):
                            history_record = gr.JSON(show_label=False)
                selected_row = gr.State(None)

            # --------------------------------------------------------------------------- templates
            with gr.Tab(L("tab.templates"), id="templates"):
                browse_template = gr.Dropdown(choices=names, value=first, label=L("template.pick"),
                                              elem_id="templates-template")
                browse_desc = gr.Markdown()
                browse_image = gr.Image(label=L("template.example"), interactive=False, visible=False, height=260)
                browse_fields = gr.HTML(elem_id="template-fields", **PLAIN)
                with gr.Accordion(L("templates.admin"), open=False):
                    load_button = gr.Button(L("templates.load"), size="sm")
                    edit_schema = gr.Code(label=L("templates.schema"), language="json", interactive=True)
                    edit_workflow = gr.Code(label=L("templates.workflow"), language="jinja2", interactive=True)
                    replace_existing = gr.Checkbox(label=L("templates.replace"), value=False)
                    save_button = gr.Button(L("templates.save"), variant="primary")
                    upload_template = gr.File(label=L("templates.upload"), file_count="multiple", type="filepath",
                                              file_types=[".json", ".j2", ".png"], height=130)
                    upload_button = gr.Button(L("templates.upload_button"))

            # ------------------------------------------------------------------------------ system
            with gr.Tab(L("tab.system"), id="system"):
                model_line = gr.HTML(elem_id="model-line", **PLAIN)
                system_table = gr.HTML(elem_id="system-info", **PLAIN)
                with gr.Row(equal_height=False, elem_classes="align-end"):
                    model_pick = gr.Dropdown(choices=[], label=L("system.switch"), scale=5)
                    switch_button = gr.Button(L("system.switch_button"), scale=1, min_width=120,
                                              elem_id="switch-model")
                    system_refresh = gr.Button(L("system.refresh"), scale=1, min_width=120, variant="secondary")

        # ================================================================================ wiring

        @_guard
        def on_load(remembered: str | None, request: gr.Request):
            who, lang = caller(request), language_of_request(request)
            if users is not None and users.configured:
                role = text(f"role.{who.role}", lang)
                head = html.escape(text("app.signed_in", lang, user="{user}", role=role)).replace(
                    "{user}", f"<strong>{html.escape(who.name)}</strong>")
                # In this tab (Markdown links open a new one, leaving this tab signed in on screen only)
                head += f' <a href="/logout" target="_self">{html.escape(text("app.sign_out", lang))}</a>'
            elif anonymous_role != "admin":
                head = html.escape(text("app.public_no_users", lang))
            else:
                head = html.escape(text("app.no_users", lang))
            title = f"<h2>{html.escape(text('app.title', lang))}</h2><p>{head}</p>"
            banner = gr.update(
                value=f'<div class="demo-banner" role="note">{_badge(text("app.demo_badge", lang), "demo")} '
                      f'{html.escape(text("app.demo_model", lang))}</div>',
                visible=handlers.demo_in_use(services),
            )
            recent = handlers.recent_batches(services)
            chosen = remembered if remembered in recent else handlers.current_batch(services)
            return (
                title,
                banner,
                gr.update(choices=recent, value=chosen),
                gr.update(choices=handlers.model_choices(services), value=services.engine.default_checkpoint),
            )

        ui.load(on_load, inputs=[remembered_batch], outputs=[header, demo_banner, watched, model_pick])

        def _interrupted_outputs(lang: str):
            rows = handlers.interrupted_batches(services)
            header = [text("col.batch", lang), text("col.template", lang), text("col.status", lang),
                      text("batch.progress", lang), text("col.user", lang)]
            table = []
            for b in rows:
                summary = services.ledger.batch_summary(b["id"])
                counts = summary["counts"]
                runnable = summary["total"] - counts.get("skipped", 0)  # rows refused at validation never run
                table.append([
                    b["id"], b.get("template_name") or "",
                    handlers.status_label("interrupted" if b.get("status") == "running" else b.get("status"), lang),
                    text("batch.rows_done", lang, done=counts.get("done", 0), total=runnable),
                    b.get("user") or "",
                ])
            return (
                _table(header, table, narrow=(0, 2, 3)) if table else text("batch.none_interrupted", lang),
                gr.update(choices=[b["id"] for b in rows], value=rows[0]["id"] if rows else None),
            )

        @_guard
        def show_interrupted(request: gr.Request):
            return _interrupted_outputs(language_of_request(request))

        interrupted_outputs = [interrupted_table, resume_pick]
        ui.load(show_interrupted, outputs=interrupted_outputs)

        # template description (batch and templates pages share the function)
        def _template_outputs(name: str | None, lang: str, compact: bool = False):
            if not name:
                return text("template.none", lang), gr.update(visible=False), "", None
            overview = handlers.template_overview(services, name, lang)
            image = gr.update(value=overview.example_image, visible=bool(overview.example_image))
            if compact:  # beside the upload: three columns, the required mark on the name
                caption = f'{text("template.fields", lang)} · {text("field.required_note", lang)}'
                fields = _table(overview.compact_header, overview.compact_rows, narrow=(0,), caption=caption)
            else:
                fields = _table(overview.fields_header, overview.fields_rows, narrow=(0, 1, 2, 3),
                                caption=text("template.fields", lang))
            description = f"**{overview.title}** (`{overview.name}`)\n\n{overview.description}"
            return description, image, fields, overview

        @_guard
        def show_template(name: str | None, request: gr.Request):
            return _template_outputs(name, language_of_request(request))[:3]

        browse_template.change(show_template, inputs=browse_template, outputs=[browse_desc, browse_image, browse_fields])
        ui.load(show_template, inputs=browse_template, outputs=[browse_desc, browse_image, browse_fields])

        @_guard
        def show_batch_template(name: str | None, request: gr.Request):
            lang = language_of_request(request)
            description, image, fields, overview = _template_outputs(name, lang, compact=True)
            photos = bool(overview and overview.image_fields)
            hint = text("batch.photos_hint", lang, columns=", ".join(overview.image_fields)) if photos else ""
            return description, image, fields, gr.update(value=hint, visible=photos), gr.update(visible=photos)

        batch_template_outputs = [batch_template_desc, batch_template_image, batch_fields, photos_hint, photos_file]
        ui.load(show_batch_template, inputs=batch_template, outputs=batch_template_outputs)

        def check(template_name, path, mode, seed, photos, earlier, request: gr.Request):
            who, lang = caller(request), language_of_request(request)
            if not path:
                handlers.discard_check(earlier)
                return None, text("batch.nothing_prepared", lang), "", gr.update(interactive=False), NO_FILE
            try:
                seed = handlers.parse_seed(seed)
                result = handlers.check_sheet(
                    services, who, template_name, path, on_invalid=mode, batch_seed=seed, lang=lang,
                    images_path=photos, replaces=earlier)
            except EngineError as exc:
                # Whatever an earlier check prepared is gone: Start never runs a sheet other than the one shown.
                message = handlers.error_message(exc, lang)
                gr.Warning(message)
                return None, f"⚠ {message}", "", gr.update(interactive=False), NO_FILE
            ok_label = text("report.ok", lang)
            rows = [[number, _badge(status, "ok" if status == ok_label else "problem"), problems]
                    for number, status, problems in result.rows]
            report = _table(result.header, rows, narrow=(0, 1), caption=text("batch.report", lang))
            problems = gr.update(value=_problems_file(path, result.problems_csv), visible=True) \
                if result.problems_csv else NO_FILE
            return result.prepared, result.summary, report, gr.update(interactive=result.can_start), problems

        check_outputs = [prepared_state, report_summary, report_table, start_button, problems_file]
        check_inputs = [batch_template, sheet_file, on_invalid, batch_seed, photos_file, prepared_state]
        check_button.click(check, inputs=check_inputs, outputs=check_outputs)
        sheet_file.upload(check, inputs=check_inputs, outputs=check_outputs)
        photos_file.upload(check, inputs=check_inputs, outputs=check_outputs)
        photos_file.clear(check, inputs=check_inputs, outputs=check_outputs)  # the rows may now lack photos
        on_invalid.change(check, inputs=check_inputs, outputs=check_outputs)

        def clear_report(earlier):
            handlers.discard_check(earlier)
            return None, "", "", gr.update(interactive=False), NO_FILE

        def seed_changed(earlier, request: gr.Request):
            # Checked on every keystroke would be wasteful; Start waits for the next check instead.
            handlers.discard_check(earlier)
            return (None, text("batch.recheck", language_of_request(request)), "", gr.update(interactive=False),
                    NO_FILE)

        sheet_file.clear(clear_report, inputs=prepared_state, outputs=check_outputs)
        batch_seed.change(seed_changed, inputs=prepared_state, outputs=check_outputs)

        def switch_batch_template(name: str | None, earlier, request: gr.Request):
            # One event for both: a report checked against the previous template must never survive the
            # switch, and a sheet uploaded right after the switch must not be cleared by a late event.
            return (*show_batch_template(name, request), *clear_report(earlier))

        batch_template.change(switch_batch_template, inputs=[batch_template, prepared_state],
                              outputs=[*batch_template_outputs, *check_outputs])

        @_guard
        def start(prepared, request: gr.Request):
            lang = language_of_request(request)
            batch_id = handlers.start_batch(services, prepared)
            gr.Info(text("batch.started", lang, batch_id=batch_id))
            recent = handlers.recent_batches(services)
            return None, gr.update(interactive=False), gr.update(choices=recent, value=batch_id), batch_id

        start_button.click(start, inputs=prepared_state,
                           outputs=[prepared_state, start_button, watched, remembered_batch],
                           **CONTROLS).success(None, js=SHOW_PROGRESS_JS)

        photo_thumbnails: dict[str, str] = {}  # data URLs of the product photos shown, bounded below

        def thumbnail(path: str) -> str:
            if path not in photo_thumbnails:
                if len(photo_thumbnails) >= 512:
                    photo_thumbnails.clear()
                photo_thumbnails[path] = handlers.reference_data_url(path, size=160)
            return photo_thumbnails[path]

        def gallery_html(view: handlers.BatchView, lang: str) -> str:
            """Thumbnails of the batch's images (each after the product photos it was made from); a click
            opens the full image through the authenticated /files route."""
            if not view.images:
                return ""
            items = []
            for path in view.images:
                for photo in view.references.get(path, []):
                    caption = html.escape(text("batch.photo_caption", lang, name=Path(photo).name))
                    items.append(f'<figure class="photo"><img src="{thumbnail(photo)}" alt="{caption}" '
                                 f'title="{caption}"><figcaption>{caption}</figcaption></figure>')
                url, caption = file_url(outputs, path), html.escape(view.captions.get(path) or Path(path).name)
                items.append(f'<a href="{url}" target="_blank" title="{caption}"><img src="{url}" alt="{caption}" '
                             'loading="lazy"></a>')
            if view.image_count > len(view.images):
                caption = html.escape(text("batch.gallery_newest", lang, count=view.image_count, shown=len(view.images)))
            else:
                caption = html.escape(f"{text('batch.gallery', lang)} ({len(view.images)})")
            return f'<p class="caption">{caption}</p><div class="thumbs">{"".join(items)}</div>'

        @_guard
        def refresh(batch_id: str | None, shown: int, previous: Any, request: gr.Request):
            lang = language_of_request(request)
            warming = handlers.is_warming_up(services)
            notice = gr.update(value=_notice(text("app.warming_up", lang)) if warming else "", visible=warming)
            if not batch_id:
                return ("", "", "", "", "", gr.update(visible=False), -1, notice, (None, warming),
                        gr.skip(), gr.skip())
            try:
                view = handlers.batch_view(services, batch_id, lang)
            except BatchError as exc:  # an id typed or pasted that is no batch: say so once, in place
                message = handlers.error_message(exc, lang)
                return (message, message, "", "", "", gr.update(visible=False), -1, notice,
                        (None, warming), gr.skip(), gr.skip())
            # Redrawn whenever the batch made another image (the gallery holds only the newest ones)
            gallery_update = gallery_html(view, lang) if view.image_count != shown else gr.skip()
            line = view.status_line + (f"\n\n⚠ {view.error}" if view.error else "")
            # The interrupted list changes when the watched batch starts or stops: re-read it only then.
            state = (view.state, warming)
            interrupted = (_interrupted_outputs(lang) if previous is not None and tuple(previous) != state
                           else (gr.skip(), gr.skip()))
            return (
                line,
                view.announcement,
                _step_bar(view.step_fraction, view.step_line),
                gallery_update,
                _download_link(batch_id, text("batch.download", lang)) if view.finished and view.done else "",
                gr.update(visible=not view.finished),
                view.image_count,
                notice,
                state,
                *interrupted,
            )

        refresh_outputs = [progress_line, progress_announcement, step_html, gallery, download_html, cancel_button,
                           shown_images, warm_notice, last_state, *interrupted_outputs]
        timer.tick(refresh, inputs=[watched, shown_images, last_state], outputs=refresh_outputs, **QUIET)

        @_guard
        def refresh_now(batch_id: str | None, request: gr.Request):
            lang = language_of_request(request)
            recent = handlers.recent_batches(services)
            return (gr.update(choices=recent, value=batch_id), *refresh(batch_id, -1, None, request)[:-2],
                    *_interrupted_outputs(lang))

        refresh_button.click(refresh_now, inputs=watched, outputs=[watched, *refresh_outputs], **QUIET)

        def remember(batch_id: str | None):
            return batch_id, -1

        watched.change(remember, inputs=watched, outputs=[remembered_batch, shown_images], **QUIET)

        @_guard
        def cancel(batch_id: str | None, request: gr.Request):
            lang = language_of_request(request)
            state = handlers.cancel_batch(services, caller(request), batch_id)
            key = "batch.removed_from_queue" if state == "removed_from_queue" else "batch.cancelled"
            gr.Info(text(key, lang, batch_id=batch_id))

        cancel_button.click(cancel, inputs=watched)

        @_guard
        def resume(batch_id: str | None, request: gr.Request):
            lang = language_of_request(request)
            handlers.resume_batch(services, caller(request), batch_id)
            gr.Info(text("batch.resumed", lang, batch_id=batch_id))
            return (gr.update(choices=handlers.recent_batches(services), value=batch_id), batch_id,
                    *_interrupted_outputs(lang))

        resume_button.click(resume, inputs=resume_pick, outputs=[watched, remembered_batch, *interrupted_outputs],
                            **CONTROLS).success(None, js=SHOW_PROGRESS_JS)

        # history
        @_guard
        def search(query, batch_id, status, since, until, page, request: gr.Request):
            lang = language_of_request(request)
            found = handlers.search_history(
                services, text_query=query or "", batch_id=batch_id or "", status=status or "",
                date_from=since or "", date_to=until or "", lang=lang, page=int(page or 1),
            )
            hint = " ".join(filter(None, [found.note, text("history.select_hint", lang) if found.rows else ""]))
            return {"headers": found.header, "data": found.rows}, hint

        def search_first_page(query, batch_id, status, since, until, request: gr.Request):
            return (*search(query, batch_id, status, since, until, 1, request), 1)

        history_filters = [history_text, history_batch, history_status, history_from, history_to]
        history_outputs = [history_table, history_hint]
        history_search.click(search_first_page, inputs=history_filters, outputs=[*history_outputs, history_page],
                             **CONTROLS)
        history_page.submit(search, inputs=[*history_filters, history_page], outputs=history_outputs, **CONTROLS)
        # Opening the tab shows what was made since the page loaded
        history_tab.select(search, inputs=[*history_filters, history_page], outputs=history_outputs, **CONTROLS)
        ui.load(search_first_page, inputs=history_filters, outputs=[*history_outputs, history_page])

        @_guard
        def select_generation(table, evt: gr.SelectData, request: gr.Request):
            lang = language_of_request(request)
            row_index = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
            row_key = table.iloc[row_index, 0] if hasattr(table, "iloc") else table[row_index][0]
            detail = handlers.generation_detail(services, str(row_key))
            return (
                str(row_key),
                gr.update(visible=True),
                _image_html(detail.get("image_path"), outputs,
                            handlers.image_caption(detail.get("row_number"), detail.get("row_values"),
                                                   detail.get("prompt"), lang))
                + _reference_html(detail.get("reference_images", []), lang),
                _pairs_table(handlers.generation_rows(detail, lang)),
                detail,
                gr.update(interactive=True),
                _download_link(detail.get("batch_id"), text("history.batch_zip", lang)),
            )

        history_table.select(select_generation, inputs=history_table,
                             outputs=[selected_row, history_selected, history_image, history_detail, history_record, rerun_button,
                                      history_zip])

        @_guard
        def rerun(row_key, request: gr.Request):
            who, lang = caller(request), language_of_request(request)
            batch_id = handlers.rerun_row(services, who, row_key)
            gr.Info(text("history.rerun_done", lang, batch_id=batch_id))
            return gr.update(choices=handlers.recent_batches(services), value=batch_id)

        rerun_button.click(rerun, inputs=selected_row, outputs=watched, **CONTROLS)

        # templates
        @_guard
        def load_sources(name):
            schema, workflow = handlers.template_sources(services, name)
            return schema, workflow, gr.update(value=True)

        load_button.click(load_sources, inputs=browse_template, outputs=[edit_schema, edit_workflow, replace_existing],
                          **CONTROLS)

        def _saved(name: str, lang: str):
            gr.Info(text("templates.saved", lang, name=name))
            choices = handlers.template_names(services)
            return (gr.update(choices=choices, value=name),) * 3

        template_pickers = [browse_template, batch_template, single_template]

        @_guard
        def save(schema, workflow, replace, request: gr.Request):
            lang = language_of_request(request)
            saved = handlers.save_template(services, caller(request), schema, workflow, replace=replace, lang=lang)
            return _saved(saved, lang)

        save_button.click(save, inputs=[edit_schema, edit_workflow, replace_existing], outputs=template_pickers,
                          **CONTROLS)

        @_guard
        def save_upload(paths, replace, request: gr.Request):
            lang = language_of_request(request)
            saved = handlers.save_uploaded_template(services, caller(request), paths or [], replace=replace, lang=lang)
            return _saved(saved, lang)

        upload_button.click(save_upload, inputs=[upload_template, replace_existing], outputs=template_pickers,
                            **CONTROLS)

        # system
        @_guard
        def show_system(request: gr.Request):
            lang = language_of_request(request)
            info = handlers.system_info(services)
            return _model_card(info, lang), _pairs_table(handlers.system_rows(info, lang))

        system_outputs = [model_line, system_table]
        ui.load(show_system, outputs=system_outputs)
        system_refresh.click(show_system, outputs=system_outputs)

        # The model card says "warming up" only while it does: re-read it when that changes.
        def system_on_warm_change(state: Any, request: gr.Request):
            return show_system(request)

        last_state.change(system_on_warm_change, inputs=last_state, outputs=system_outputs, **QUIET)

        @_guard
        def switch(name, request: gr.Request):
            who, lang = caller(request), language_of_request(request)
            handlers.switch_model(services, who, name, lang=lang)
            gr.Info(text("system.switched", lang, name=name))
            return show_system(request)

        switch_button.click(switch, inputs=model_pick, outputs=system_outputs, **GPU)

    return ui


__all__ = ["build_ui"]
