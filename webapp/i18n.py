"""The web app's words in English and Simplified Chinese, chosen by the browser.

Two uses of the same tables:

* component labels go to the browser as keys (``gradio_i18n()("batch.start")``) and the Gradio front end
  picks the language from the browser's locale;
* messages built on the server (status lines, errors, the login page) pick the language from the
  request's ``Accept-Language`` header (:func:`language_of`), then :func:`text` fills in the values.

Every key must exist in both tables; ``tests/test_webapp_handlers.py`` checks that.
"""

from __future__ import annotations

from typing import Any

LANGUAGES = ("en", "zh")

EN: dict[str, str] = {
    # page frame
    "app.title": "SD3.5 batch images",
    "app.signed_in": "Signed in as **{user}** ({role}).",
    "app.sign_out": "Sign out",
    "app.no_users": "No users are configured: the app listens on this computer only (localhost). "
    "Add a users file to share it on the network.",
    "app.demo_model": "Demo model in use: images are placeholders from a tiny built-in model, not real renders.",
    "role.admin": "admin",
    "role.user": "user",
    "role.anonymous": "local user",
    # tabs
    "tab.batch": "Batch",
    "tab.single": "Single image",
    "tab.history": "History",
    "tab.templates": "Templates",
    "tab.system": "System",
    # template picker and description
    "template.pick": "Template",
    "template.description": "Description",
    "template.example": "Example image",
    "template.fields": "Fields (spreadsheet columns)",
    "template.none": "No templates found in the templates folder.",
    "field.name": "Column",
    "field.type": "Type",
    "field.required": "Required",
    "field.default": "Default",
    "field.description": "Description",
    "yes": "yes",
    "no": "no",
    # batch tab
    "batch.upload": "Spreadsheet (CSV or XLSX)",
    "batch.photos": "Product photos (zip, for templates with image columns)",
    "batch.photo_caption": "photo: {name}",
    "batch.on_invalid": "Rows with problems",
    "batch.on_invalid.skip": "Skip them and run the rest",
    "batch.on_invalid.stop": "Do not start the batch",
    "batch.seed": "Batch seed (empty: random)",
    "batch.check": "Check spreadsheet",
    "batch.report": "Validation report",
    "batch.report_summary": "{ok} rows ready, {bad} rows with problems.",
    "batch.report_blocked": "{bad} rows have problems and the batch is set to stop on problems: fix the sheet.",
    "batch.start": "Start batch",
    "batch.started": "Batch {batch_id} queued.",
    "batch.nothing_prepared": "Check a spreadsheet first.",
    "batch.no_rows": "No row of this spreadsheet can run.",
    "batch.watching": "Batch",
    "batch.progress": "Progress",
    "batch.gallery": "Images so far",
    "batch.cancel": "Cancel batch",
    "batch.cancelled": "Cancel requested for batch {batch_id}: it stops after the current step.",
    "batch.download": "Download zip",
    "batch.interrupted": "Interrupted batches",
    "batch.resume": "Resume",
    "batch.resumed": "Batch {batch_id} queued again: only unfinished rows run.",
    "batch.none_interrupted": "No interrupted batches.",
    "batch.none_selected": "No batch selected.",
    "batch.refresh": "Refresh",
    "status.line": "**{status}** · done {done} · failed {failed} · remaining {remaining} · {eta}",
    "status.eta": "about {eta} left",
    "status.eta_unknown": "time left unknown",
    "status.queue_position": "waiting: {ahead} batch(es) ahead",
    "status.step": "row {row}: step {step} of {steps}",
    "status.queued": "queued",
    "status.running": "running",
    "status.done": "done",
    "status.failed": "failed",
    "status.timed_out": "timed out",
    "status.skipped": "skipped",
    "status.cancelled": "cancelled",
    "status.interrupted": "interrupted",
    "status.unknown": "unknown",
    "report.row": "Row",
    "report.status": "Status",
    "report.problems": "Problems",
    "report.ok": "ok",
    "report.problem": "problem",
    # single image tab
    "single.generate": "Generate",
    "single.image": "Image",
    "single.parameters": "Parameters",
    "single.waiting": "Waiting for the GPU",
    "single.running": "Generating",
    "single.failed": "The image failed: {error}",
    # history tab
    "history.text": "Search text (prompt, values)",
    "history.batch": "Batch id",
    "history.status": "Status",
    "history.any_status": "any",
    "history.date_from": "From date (YYYY-MM-DD)",
    "history.date_to": "To date (YYYY-MM-DD)",
    "history.search": "Search",
    "history.results": "Generations",
    "history.detail": "Everything recorded",
    "history.reference": "Reference photo",
    "history.image": "Image",
    "history.rerun": "Re-run this row",
    "history.rerun_done": "Row queued again as batch {batch_id}.",
    "history.batch_zip": "Download this batch",
    "history.select_hint": "Select a row of the table to see it.",
    "history.bad_date": "Dates are written YYYY-MM-DD; got '{value}'.",
    "col.row_key": "Row key",
    "col.batch": "Batch",
    "col.row": "Row",
    "col.status": "Status",
    "col.prompt": "Prompt",
    "col.seed": "Seed",
    "col.finished": "Finished",
    "col.template": "Template",
    "col.user": "User",
    # templates tab
    "templates.workflow": "workflow.json.j2: API-format workflow with Jinja placeholders",
    "templates.schema": "template.json: name, description, fields, filename pattern",
    "templates.admin": "Add or edit a template (admins)",
    "templates.load": "Load the selected template into the editor",
    "templates.replace": "Replace an existing template of the same name",
    "templates.save": "Validate and save",
    "templates.saved": "Template '{name}' validated and saved.",
    "templates.upload": "Or upload template.json, workflow.json.j2 and optionally example.png",
    "templates.upload_button": "Validate and save the uploaded files",
    "templates.load_errors": "Templates that fail to load",
    # system tab
    "system.model": "Model in use",
    "system.info": "Details",
    "system.switch": "Switch model (admins)",
    "system.switch_to": "Model",
    "system.switch_button": "Switch",
    "system.switched": "Model switched to {name}.",
    "system.refresh": "Refresh",
    "system.demo": "demo model",
    "system.real": "real model",
    # errors
    "error.admin_only": "Only admins may {action}.",
    "error.login_required": "Please sign in.",
    "action.switch_model": "switch the model",
    "action.edit_template": "add or edit templates",
    "action.upload_template": "upload templates",
    # login page
    "login.title": "Sign in",
    "login.username": "User name",
    "login.password": "Password",
    "login.submit": "Sign in",
    "login.failed": "Wrong user name or password.",
}

ZH: dict[str, str] = {
    "app.title": "SD3.5 批量出图",
    "app.signed_in": "已登录：**{user}**（{role}）。",
    "app.sign_out": "退出登录",
    "app.no_users": "未配置用户：本应用仅在本机（localhost）监听。添加用户文件后即可在网络上共享。",
    "app.demo_model": "正在使用演示模型：图片来自内置的微型模型，仅作占位，并非真实渲染。",
    "role.admin": "管理员",
    "role.user": "普通用户",
    "role.anonymous": "本机用户",
    "tab.batch": "批量生成",
    "tab.single": "单张生成",
    "tab.history": "历史记录",
    "tab.templates": "模板",
    "tab.system": "系统",
    "template.pick": "模板",
    "template.description": "说明",
    "template.example": "示例图片",
    "template.fields": "字段（表格列）",
    "template.none": "模板文件夹中没有模板。",
    "field.name": "列名",
    "field.type": "类型",
    "field.required": "必填",
    "field.default": "默认值",
    "field.description": "说明",
    "yes": "是",
    "no": "否",
    "batch.upload": "表格文件（CSV 或 XLSX）",
    "batch.photos": "产品照片（zip，用于含图片列的模板）",
    "batch.photo_caption": "照片：{name}",
    "batch.on_invalid": "有问题的行",
    "batch.on_invalid.skip": "跳过这些行，其余照常生成",
    "batch.on_invalid.stop": "不启动批次",
    "batch.seed": "批次种子（留空则随机）",
    "batch.check": "检查表格",
    "batch.report": "校验报告",
    "batch.report_summary": "{ok} 行可以生成，{bad} 行有问题。",
    "batch.report_blocked": "{bad} 行有问题，且已设置为遇到问题不启动：请先修改表格。",
    "batch.start": "开始批量生成",
    "batch.started": "批次 {batch_id} 已加入队列。",
    "batch.nothing_prepared": "请先检查表格。",
    "batch.no_rows": "该表格中没有可以生成的行。",
    "batch.watching": "批次",
    "batch.progress": "进度",
    "batch.gallery": "已生成的图片",
    "batch.cancel": "取消批次",
    "batch.cancelled": "已请求取消批次 {batch_id}：当前步骤结束后停止。",
    "batch.download": "下载压缩包",
    "batch.interrupted": "中断的批次",
    "batch.resume": "继续",
    "batch.resumed": "批次 {batch_id} 已重新加入队列：只生成未完成的行。",
    "batch.none_interrupted": "没有中断的批次。",
    "batch.none_selected": "未选择批次。",
    "batch.refresh": "刷新",
    "status.line": "**{status}** · 完成 {done} · 失败 {failed} · 剩余 {remaining} · {eta}",
    "status.eta": "预计还需 {eta}",
    "status.eta_unknown": "剩余时间未知",
    "status.queue_position": "排队中：前面还有 {ahead} 个批次",
    "status.step": "第 {row} 行：第 {step}/{steps} 步",
    "status.queued": "排队中",
    "status.running": "生成中",
    "status.done": "已完成",
    "status.failed": "失败",
    "status.timed_out": "超时",
    "status.skipped": "已跳过",
    "status.cancelled": "已取消",
    "status.interrupted": "已中断",
    "status.unknown": "未知",
    "report.row": "行号",
    "report.status": "状态",
    "report.problems": "问题",
    "report.ok": "正常",
    "report.problem": "有问题",
    "single.generate": "生成",
    "single.image": "图片",
    "single.parameters": "参数",
    "single.waiting": "等待 GPU",
    "single.running": "生成中",
    "single.failed": "生成失败：{error}",
    "history.text": "搜索文字（提示词、字段值）",
    "history.batch": "批次编号",
    "history.status": "状态",
    "history.any_status": "全部",
    "history.date_from": "开始日期（YYYY-MM-DD）",
    "history.date_to": "结束日期（YYYY-MM-DD）",
    "history.search": "搜索",
    "history.results": "生成记录",
    "history.detail": "完整记录",
    "history.reference": "参考照片",
    "history.image": "图片",
    "history.rerun": "重新生成此行",
    "history.rerun_done": "该行已作为批次 {batch_id} 重新加入队列。",
    "history.batch_zip": "下载该批次",
    "history.select_hint": "在表格中选择一行即可查看。",
    "history.bad_date": "日期格式应为 YYYY-MM-DD，收到的是“{value}”。",
    "col.row_key": "行键",
    "col.batch": "批次",
    "col.row": "行号",
    "col.status": "状态",
    "col.prompt": "提示词",
    "col.seed": "种子",
    "col.finished": "完成时间",
    "col.template": "模板",
    "col.user": "用户",
    "templates.workflow": "workflow.json.j2：API 格式工作流，含 Jinja 占位符",
    "templates.schema": "template.json：名称、说明、字段、文件名规则",
    "templates.admin": "新增或编辑模板（仅管理员）",
    "templates.load": "把所选模板载入编辑器",
    "templates.replace": "覆盖同名的现有模板",
    "templates.save": "校验并保存",
    "templates.saved": "模板“{name}”已通过校验并保存。",
    "templates.upload": "或上传 template.json、workflow.json.j2 以及可选的 example.png",
    "templates.upload_button": "校验并保存上传的文件",
    "templates.load_errors": "无法加载的模板",
    "system.model": "当前模型",
    "system.info": "详细信息",
    "system.switch": "切换模型（仅管理员）",
    "system.switch_to": "模型",
    "system.switch_button": "切换",
    "system.switched": "已切换到模型 {name}。",
    "system.refresh": "刷新",
    "system.demo": "演示模型",
    "system.real": "正式模型",
    "error.admin_only": "只有管理员可以{action}。",
    "error.login_required": "请先登录。",
    "action.switch_model": "切换模型",
    "action.edit_template": "新增或编辑模板",
    "action.upload_template": "上传模板",
    "login.title": "登录",
    "login.username": "用户名",
    "login.password": "密码",
    "login.submit": "登录",
    "login.failed": "用户名或密码错误。",
}

TABLES: dict[str, dict[str, str]] = {"en": EN, "zh": ZH}


def language_of(accept_language: str | None) -> str:
    """The interface language for an ``Accept-Language`` header: "zh" when Chinese ranks above English."""
    best_lang, best_q = "en", -1.0
    for part in (accept_language or "").split(","):
        tag, _, params = part.strip().partition(";")
        primary = tag.strip().lower().split("-")[0]
        if primary not in LANGUAGES:
            continue
        q = 1.0
        for param in params.split(";"):
            name, _, value = param.strip().partition("=")
            if name == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        if q > best_q:
            best_lang, best_q = primary, q
    return best_lang


def language_of_request(request: Any) -> str:
    """The language of a ``gr.Request`` or Starlette request (either carries the headers); English if none."""
    headers = getattr(request, "headers", None)
    if headers is None:
        return "en"
    return language_of(headers.get("accept-language"))


def text(key: str, lang: str = "en", **values: Any) -> str:
    """The string ``key`` in ``lang``, with ``values`` filled in. A missing key is a KeyError."""
    table = TABLES[lang] if lang in TABLES else EN
    return table[key].format(**values) if values else table[key]


def gradio_i18n():
    """A ``gr.I18n`` over both tables, so component labels follow the browser's locale."""
    import gradio as gr

    # The front end matches the browser locale by its primary tag; zh-CN, zh-TW and plain zh all land
    # on the simplified table, which is the only Chinese one.
    return gr.I18n(en=EN, zh=ZH, **{"zh-CN": ZH})
