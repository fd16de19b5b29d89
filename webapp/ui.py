"""The Gradio UI: lays out the five pages and wires events to ``webapp.handlers``. No logic lives here.

Labels are i18n keys (``webapp/i18n.py``) that the browser shows in its own language; messages built on
the server use the request's ``Accept-Language``. Library errors become ``gr.Error`` in :func:`_guard`,
the one place that does so. Every event that waits on the GPU shares the concurrency group ``"gpu"``
with limit 1; batches themselves run on the :class:`engine.batch.BatchQueue` thread, so closing the tab
never stops one, and a 1 s timer shows the progress of whatever batch the page watches.
"""

from __future__ import annotations

import functools
import html
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gradio as gr

from engine.errors import EngineError
from webapp import handlers
from webapp.i18n import gradio_i18n, language_of_request, text
from webapp.server import file_url, zip_url

GPU = {"concurrency_id": "gpu", "concurrency_limit": 1}
QUIET = {"show_progress": "hidden", "concurrency_limit": None}

CSS = """
.demo-banner { background: #fff7ed; border: 1px solid #fdba74; border-radius: 8px; padding: 4px 12px; }
.step-bar { height: 10px; background: #e5e7eb; border-radius: 5px; overflow: hidden; }
.step-bar > div { height: 100%; background: #ea580c; transition: width .4s; }
.download-link a { display: inline-block; padding: 8px 14px; border-radius: 8px; background: #ea580c;
                   color: #fff !important; text-decoration: none; font-weight: 600; }
"""


def _guard(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The one place library errors become messages in the browser."""

    @functools.wraps(fn)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except EngineError as exc:
            raise gr.Error(handlers.error_message(exc), print_exception=False) from exc

    return guarded


def _base_url(request: gr.Request) -> str:
    """``scheme://host`` the browser used, so gallery items can point at the authenticated /files route."""
    headers = request.headers
    proto = headers.get("x-forwarded-proto") or getattr(getattr(request, "request", None), "url", None)
    scheme = proto if isinstance(proto, str) else getattr(proto, "scheme", "http")
    host = headers.get("x-forwarded-host") or headers.get("host") or "localhost"
    return f"{scheme.split(',')[0].strip()}://{host}"


def _step_bar(fraction: float, label: str) -> str:
    if not label:
        return ""
    width = max(0.0, min(1.0, fraction)) * 100
    return (
        f'<div aria-label="{html.escape(label)}">{html.escape(label)}'
        f'<div class="step-bar"><div style="width:{width:.0f}%"></div></div></div>'
    )


def _download_link(batch_id: str | None, lang: str) -> str:
    if not batch_id:
        return ""
    return (
        f'<div class="download-link"><a href="{zip_url(batch_id)}" download>'
        f'{html.escape(text("batch.download", lang))} ({html.escape(batch_id)})</a></div>'
    )


def _image_html(path: str | None, outputs: Any) -> str:
    if not path:
        return ""
    url = file_url(outputs, path)
    return f'<a href="{url}" target="_blank"><img src="{url}" style="max-width:100%;max-height:560px" alt=""></a>'


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


def _field_widget(spec: Any, checkpoints: list[str]) -> gr.components.Component:
    """The input widget for one template field, by its type (engine.templates.FIELD_TYPES)."""
    label = spec.name + (" *" if spec.required else "")
    info = spec.description or None
    example = "" if spec.example is None else str(spec.example)
    if spec.type == "choice" or spec.choices:
        return gr.Dropdown(choices=list(spec.choices), value=spec.default, label=label, info=info)
    if spec.type == "bool":
        return gr.Checkbox(value=bool(spec.default), label=label, info=info)
    if spec.type in {"int", "float"}:
        return gr.Number(value=spec.default, label=label, info=info, precision=0 if spec.type == "int" else None,
                         minimum=spec.min, maximum=spec.max)
    if spec.type == "checkpoint":
        return gr.Dropdown(choices=checkpoints, value=spec.default, label=label, info=info, allow_custom_value=True)
    if spec.type == "seed":
        # Text, not a number widget: seeds go up to 2**64 - 1 and a browser number keeps only 53 bits.
        return gr.Textbox(value="" if spec.default is None else str(spec.default), label=label, info=info,
                          placeholder=example)
    return gr.Textbox(value=spec.default, label=label, info=info, placeholder=example,
                      lines=3 if spec.type == "text" else 1)


def build_ui(services: Any, settings: Any, users: Any = None) -> gr.Blocks:
    """The web app's Blocks. ``users`` (a UserStore) decides login and roles; None means no users."""
    L = gradio_i18n()
    outputs = settings.outputs_path
    names = handlers.template_names(services)
    first = names[0] if names else None
    statuses = ["", *handlers.LEDGER_STATUSES]

    def caller(request: gr.Request) -> handlers.Caller:
        return handlers.caller_for(users, getattr(request, "username", None), language_of_request(request))

    with gr.Blocks(title="SD3.5 batch images", analytics_enabled=False) as ui:
        header = gr.Markdown()
        demo_banner = gr.Markdown(visible=False, elem_classes="demo-banner")

        with gr.Tabs():
            # ------------------------------------------------------------------------------ batch
            with gr.Tab(L("tab.batch"), id="batch"):
                with gr.Row():
                    with gr.Column(scale=2):
                        batch_template = gr.Dropdown(choices=names, value=first, label=L("template.pick"),
                                                     elem_id="batch-template")
                        batch_template_desc = gr.Markdown()
                        batch_template_image = gr.Image(label=L("template.example"), interactive=False,
                                                        visible=False, height=220)
                        batch_fields = gr.Dataframe(label=L("template.fields"), interactive=False, wrap=True,
                                                    max_height=300)
                    with gr.Column(scale=3):
                        sheet_file = gr.File(label=L("batch.upload"), type="filepath", elem_id="sheet-file",
                                             file_types=[".csv", ".tsv", ".txt", ".xlsx", ".xlsm"])
                        photos_file = gr.File(label=L("batch.photos"), type="filepath", elem_id="photos-file",
                                              file_types=[".zip"])
                        with gr.Row():
                            on_invalid = gr.Radio(
                                choices=[(L("batch.on_invalid.skip"), "skip"), (L("batch.on_invalid.stop"), "stop")],
                                value="skip", label=L("batch.on_invalid"))
                            batch_seed = gr.Textbox(label=L("batch.seed"), value="")
                        check_button = gr.Button(L("batch.check"))
                        report_summary = gr.Markdown()
                        report_table = gr.Dataframe(label=L("batch.report"), interactive=False, wrap=True,
                                                    visible=False, max_height=320, elem_id="validation-report")
                        start_button = gr.Button(L("batch.start"), variant="primary", interactive=False,
                                                 elem_id="start-batch")
                prepared_state = gr.State(None)

                with gr.Group():
                    with gr.Row():
                        watched = gr.Dropdown(choices=[], label=L("batch.watching"), allow_custom_value=True,
                                              scale=4, elem_id="watched-batch")
                        refresh_button = gr.Button(L("batch.refresh"), scale=1, size="sm")
                    progress_line = gr.Markdown(elem_id="batch-progress")
                    step_html = gr.HTML()
                    gallery = gr.Gallery(label=L("batch.gallery"), columns=8, height=280, object_fit="contain",
                                         elem_id="batch-gallery", preview=False)
                    with gr.Row():
                        cancel_button = gr.Button(L("batch.cancel"), variant="stop", interactive=False, scale=1)
                        download_html = gr.HTML(elem_classes="download-link")
                shown_images = gr.State(-1)
                remembered_batch = gr.BrowserState(None, storage_key="sd35-watched-batch")

                with gr.Accordion(L("batch.interrupted"), open=False):
                    interrupted_table = gr.Dataframe(interactive=False, wrap=True)
                    with gr.Row():
                        resume_pick = gr.Dropdown(choices=[], label=L("batch.watching"), scale=4)
                        resume_button = gr.Button(L("batch.resume"), scale=1)
                timer = gr.Timer(1.0)

            # ------------------------------------------------------------------------------ single
            with gr.Tab(L("tab.single"), id="single"):
                with gr.Row():
                    with gr.Column(scale=2):
                        single_template = gr.Dropdown(choices=names, value=first, label=L("template.pick"))

                        @gr.render(inputs=single_template)
                        def single_form(template_name: str | None):
                            if not template_name:
                                gr.Markdown(L("template.none"))
                                return
                            specs = handlers.template_fields(services, template_name)
                            checkpoints = handlers.model_choices(services)
                            widgets = [_field_widget(spec, checkpoints) for spec in specs]
                            generate = gr.Button(L("single.generate"), variant="primary")

                            @_guard
                            def run_single(*values: Any, request: gr.Request, progress=gr.Progress()):
                                who, lang = caller(request), language_of_request(request)
                                form = {spec.name: value for spec, value in zip(specs, values)}
                                result = handlers.generate_single(
                                    services, who, template_name, form,
                                    on_progress=lambda fraction, desc: progress(fraction, desc=desc), lang=lang,
                                )
                                return _image_html(result.image_path, outputs), result.parameters

                            generate.click(run_single, inputs=widgets, outputs=[single_image, single_params], **GPU)

                    with gr.Column(scale=3):
                        single_image = gr.HTML(label=L("single.image"), elem_id="single-image")
                        single_params = gr.JSON(label=L("single.parameters"))

            # ----------------------------------------------------------------------------- history
            with gr.Tab(L("tab.history"), id="history"):
                with gr.Row():
                    history_text = gr.Textbox(label=L("history.text"), scale=3)
                    history_batch = gr.Textbox(label=L("history.batch"), scale=2, elem_id="history-batch")
                    history_status = gr.Dropdown(choices=statuses, value="", label=L("history.status"), scale=1)
                    history_from = gr.Textbox(label=L("history.date_from"), scale=1)
                    history_to = gr.Textbox(label=L("history.date_to"), scale=1)
                history_search = gr.Button(L("history.search"), variant="primary", elem_id="history-search")
                history_table = gr.Dataframe(label=L("history.results"), interactive=False, wrap=True,
                                             max_height=360, elem_id="history-table")
                history_hint = gr.Markdown()
                with gr.Row():
                    with gr.Column(scale=2):
                        history_image = gr.HTML()
                        with gr.Row():
                            rerun_button = gr.Button(L("history.rerun"), interactive=False)
                        history_zip = gr.HTML(elem_classes="download-link")
                    with gr.Column(scale=3):
                        history_detail = gr.JSON(label=L("history.detail"))
                selected_row = gr.State(None)

            # --------------------------------------------------------------------------- templates
            with gr.Tab(L("tab.templates"), id="templates"):
                browse_template = gr.Dropdown(choices=names, value=first, label=L("template.pick"))
                browse_desc = gr.Markdown()
                browse_image = gr.Image(label=L("template.example"), interactive=False, visible=False, height=260)
                browse_fields = gr.Dataframe(label=L("template.fields"), interactive=False, wrap=True)
                with gr.Accordion(L("templates.admin"), open=False):
                    load_button = gr.Button(L("templates.load"), size="sm")
                    edit_schema = gr.Code(label=L("templates.schema"), language="json", interactive=True)
                    edit_workflow = gr.Code(label=L("templates.workflow"), language="jinja2", interactive=True)
                    replace_existing = gr.Checkbox(label=L("templates.replace"), value=False)
                    save_button = gr.Button(L("templates.save"), variant="primary")
                    upload_template = gr.File(label=L("templates.upload"), file_count="multiple", type="filepath",
                                              file_types=[".json", ".j2", ".png"])
                    upload_button = gr.Button(L("templates.upload_button"))

            # ------------------------------------------------------------------------------ system
            with gr.Tab(L("tab.system"), id="system"):
                model_line = gr.Markdown(elem_id="model-line")
                system_json = gr.JSON(label=L("system.info"))
                system_refresh = gr.Button(L("system.refresh"), size="sm")
                with gr.Group():
                    gr.Markdown(L("system.switch"))
                    with gr.Row():
                        model_pick = gr.Dropdown(choices=[], label=L("system.switch_to"), scale=4)
                        switch_button = gr.Button(L("system.switch_button"), scale=1, elem_id="switch-model")

        # ================================================================================ wiring

        @_guard
        def on_load(remembered: str | None, request: gr.Request):
            who, lang = caller(request), language_of_request(request)
            if users is not None and users.configured:
                role = text(f"role.{who.role}", lang)
                head = text("app.signed_in", lang, user=who.name, role=role)
                head += f" [{text('app.sign_out', lang)}](/logout)"
            else:
                head = text("app.no_users", lang)
            title = f"## {text('app.title', lang)}\n{head}"
            info = handlers.system_info(services)
            banner = gr.update(value=text("app.demo_model", lang), visible=bool(info.get("demo_in_use")))
            recent = handlers.recent_batches(services)
            chosen = remembered if remembered in recent else handlers.current_batch(services)
            return (
                title,
                banner,
                gr.update(choices=recent, value=chosen),
                gr.update(choices=handlers.model_choices(services), value=info.get("default_checkpoint")),
            )

        def _interrupted_outputs(lang: str):
            rows = handlers.interrupted_batches(services)
            header = [text("col.batch", lang), text("col.template", lang), text("col.status", lang)]
            table = [[b["id"], b.get("template_name", ""), b.get("status", "")] for b in rows]
            return (
                gr.update(value={"headers": header, "data": table} if table else None,
                          label=None if table else text("batch.none_interrupted", lang)),
                gr.update(choices=[b["id"] for b in rows], value=rows[0]["id"] if rows else None),
            )

        ui.load(
            on_load,
            inputs=[remembered_batch],
            outputs=[header, demo_banner, watched, model_pick],
        )

        @_guard
        def show_interrupted(request: gr.Request):
            return _interrupted_outputs(language_of_request(request))

        ui.load(show_interrupted, outputs=[interrupted_table, resume_pick])

        # template description (batch and templates pages share the function)
        @_guard
        def show_template(name: str | None, request: gr.Request):
            if not name:
                return text("template.none", language_of_request(request)), gr.update(visible=False), None
            overview = handlers.template_overview(services, name, language_of_request(request))
            image = gr.update(value=overview.example_image, visible=bool(overview.example_image))
            table = {"headers": overview.fields_header, "data": overview.fields_rows}
            return f"**{overview.title}** (`{overview.name}`)\n\n{overview.description}", image, table

        for picker, desc, image, table in (
            (batch_template, batch_template_desc, batch_template_image, batch_fields),
            (browse_template, browse_desc, browse_image, browse_fields),
        ):
            picker.change(show_template, inputs=picker, outputs=[desc, image, table])
            ui.load(show_template, inputs=picker, outputs=[desc, image, table])

        @_guard
        def check(template_name, path, mode, seed, photos, request: gr.Request):
            who, lang = caller(request), language_of_request(request)
            if not path:
                return None, text("batch.nothing_prepared", lang), gr.update(visible=False), gr.update(interactive=False)
            seed = handlers.parse_seed(seed)
            result = handlers.check_sheet(
                services, who, template_name, path, on_invalid=mode, batch_seed=seed, lang=lang, images_path=photos)
            table = gr.update(value={"headers": result.header, "data": result.rows}, visible=True)
            return result.prepared, result.summary, table, gr.update(interactive=result.can_start)

        check_outputs = [prepared_state, report_summary, report_table, start_button]
        check_inputs = [batch_template, sheet_file, on_invalid, batch_seed, photos_file]
        check_button.click(check, inputs=check_inputs, outputs=check_outputs)
        sheet_file.upload(check, inputs=check_inputs, outputs=check_outputs)
        photos_file.upload(check, inputs=check_inputs, outputs=check_outputs)

        @_guard
        def start(prepared, request: gr.Request):
            who, lang = caller(request), language_of_request(request)
            batch_id = handlers.start_batch(services, prepared)
            gr.Info(text("batch.started", lang, batch_id=batch_id))
            recent = handlers.recent_batches(services)
            return None, gr.update(interactive=False), gr.update(choices=recent, value=batch_id), batch_id

        start_button.click(start, inputs=prepared_state,
                           outputs=[prepared_state, start_button, watched, remembered_batch])

        photo_thumbnails: dict[str, Any] = {}  # small copies of the product photos shown, bounded below

        def thumbnails(path: str) -> Any:
            if path not in photo_thumbnails:
                if len(photo_thumbnails) >= 512:
                    photo_thumbnails.clear()
                photo_thumbnails[path] = handlers.reference_thumbnail(path)
            return photo_thumbnails[path]

        @_guard
        def refresh(batch_id: str | None, shown: int, request: gr.Request):
            lang = language_of_request(request)
            if not batch_id:
                return "", "", gr.skip(), "", gr.update(interactive=False), shown
            view = handlers.batch_view(services, batch_id, lang)
            gallery_update = gr.skip()
            if len(view.images) != shown:
                base = _base_url(request)
                gallery_update = []
                for p in view.images:  # each result after the product photo(s) it was made from
                    for photo in view.references.get(p, []):
                        gallery_update.append((thumbnails(photo), text("batch.photo_caption", lang, name=Path(photo).name)))
                    gallery_update.append(base + file_url(outputs, p))
            line = view.status_line + (f"\n\n⚠ {view.error}" if view.error else "")
            return (
                line,
                _step_bar(view.step_fraction, view.step_line),
                gallery_update,
                _download_link(batch_id, lang) if view.done else "",
                gr.update(interactive=not view.finished),
                len(view.images),
            )

        refresh_outputs = [progress_line, step_html, gallery, download_html, cancel_button, shown_images]
        timer.tick(refresh, inputs=[watched, shown_images], outputs=refresh_outputs, **QUIET)
        refresh_button.click(refresh, inputs=[watched, gr.State(-1)], outputs=refresh_outputs, **QUIET)

        def remember(batch_id: str | None):
            return batch_id, -1

        watched.change(remember, inputs=watched, outputs=[remembered_batch, shown_images], **QUIET)

        @_guard
        def cancel(batch_id: str | None, request: gr.Request):
            lang = language_of_request(request)
            handlers.cancel_batch(services, batch_id)
            gr.Info(text("batch.cancelled", lang, batch_id=batch_id))

        cancel_button.click(cancel, inputs=watched)

        @_guard
        def resume(batch_id: str | None, request: gr.Request):
            lang = language_of_request(request)
            handlers.resume_batch(services, batch_id)
            gr.Info(text("batch.resumed", lang, batch_id=batch_id))
            return gr.update(choices=handlers.recent_batches(services), value=batch_id), *_interrupted_outputs(lang)

        resume_button.click(resume, inputs=resume_pick, outputs=[watched, interrupted_table, resume_pick])

        # history
        @_guard
        def search(query, batch_id, status, since, until, request: gr.Request):
            lang = language_of_request(request)
            header, rows = handlers.search_history(
                services, text_query=query or "", batch_id=batch_id or "", status=status or "",
                date_from=since or "", date_to=until or "", lang=lang,
            )
            return {"headers": header, "data": rows}, text("history.select_hint", lang) if rows else ""

        history_search.click(search, inputs=[history_text, history_batch, history_status, history_from, history_to],
                             outputs=[history_table, history_hint])

        @_guard
        def select_generation(table, evt: gr.SelectData, request: gr.Request):
            lang = language_of_request(request)
            row_index = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
            row_key = table.iloc[row_index, 0] if hasattr(table, "iloc") else table[row_index][0]
            detail = handlers.generation_detail(services, str(row_key))
            link = _download_link(detail.get("batch_id"), lang).replace(
                text("batch.download", lang), text("history.batch_zip", lang))
            return (
                str(row_key),
                _image_html(detail.get("image_path"), outputs) + _reference_html(detail.get("reference_images", []), lang),
                detail,
                gr.update(interactive=True),
                link,
            )

        history_table.select(select_generation, inputs=history_table,
                             outputs=[selected_row, history_image, history_detail, rerun_button, history_zip])

        @_guard
        def rerun(row_key, request: gr.Request):
            who, lang = caller(request), language_of_request(request)
            batch_id = handlers.rerun_row(services, who, row_key)
            gr.Info(text("history.rerun_done", lang, batch_id=batch_id))
            return gr.update(choices=handlers.recent_batches(services), value=batch_id)

        rerun_button.click(rerun, inputs=selected_row, outputs=watched)

        # templates
        @_guard
        def load_sources(name):
            schema, workflow = handlers.template_sources(services, name)
            return schema, workflow, gr.update(value=True)

        load_button.click(load_sources, inputs=browse_template, outputs=[edit_schema, edit_workflow, replace_existing])

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

        save_button.click(save, inputs=[edit_schema, edit_workflow, replace_existing], outputs=template_pickers)

        @_guard
        def save_upload(paths, replace, request: gr.Request):
            lang = language_of_request(request)
            saved = handlers.save_uploaded_template(services, caller(request), paths or [], replace=replace, lang=lang)
            return _saved(saved, lang)

        upload_button.click(save_upload, inputs=[upload_template, replace_existing], outputs=template_pickers)

        # system
        @_guard
        def show_system(request: gr.Request):
            lang = language_of_request(request)
            info = handlers.system_info(services)
            kind = text("system.demo" if info.get("demo_in_use") else "system.real", lang)
            line = (f"**{text('system.model', lang)}:** {info.get('default_checkpoint')} — **{kind}** · "
                    f"{info.get('precision')} · {info.get('device')}")
            return line, info

        ui.load(show_system, outputs=[model_line, system_json])
        system_refresh.click(show_system, outputs=[model_line, system_json])

        @_guard
        def switch(name, request: gr.Request):
            who, lang = caller(request), language_of_request(request)
            handlers.switch_model(services, who, name, lang=lang)
            gr.Info(text("system.switched", lang, name=name))
            return show_system(request)

        switch_button.click(switch, inputs=model_pick, outputs=[model_line, system_json], **GPU)

    return ui


__all__ = ["build_ui"]
