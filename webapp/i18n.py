"""The web app's words in English and Simplified Chinese, chosen by the browser.

Two uses of the same tables:

* component labels go to the browser as keys (``gradio_i18n()("batch.start")``) and the Gradio front end
  picks the language from the browser's locale;
* messages built on the server (status lines, errors, the login page) pick the language from the
  request's ``Accept-Language`` header (:func:`language_of`), then :func:`text` fills in the values.

Every key must exist in both tables; ``tests/test_webapp_handlers.py`` checks that.
"""

from __future__ import annotations

import json
from typing import Any

LANGUAGES = ("en", "zh")

EN: dict[str, str] = {
    # page frame
    "app.title": "SD3.5 batch images",
    "app.signed_in": "Signed in as {user} ({role}).",
    "app.sign_out": "Sign out",
    "app.no_users": "No users are configured: the app listens on this computer only (localhost). "
    "Add a users file to share it on the network.",
    "app.public_no_users": "No users are configured and this app is public: everyone uses it without signing in, and admin actions (template upload, model switch) are off. Configure users (SD35_USERS) to sign in.",
    "app.demo_model": "Demo model in use: images are placeholders from a tiny built-in model, not real renders.",
    "app.demo_badge": "Demo model",
    "app.warming_up": "Warming up the model… Batches submitted now wait their turn and start as soon as it is ready.",
    "role.admin": "admin",
    "role.user": "user",
    "role.anonymous": "local user",
    # titles of the pop-up messages
    "toast.info": "Info",
    "toast.warning": "Warning",
    "toast.error": "Error",
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
    "field.default_value": "Default: {value}.",
    "field.required_note": "* required",
    "yes": "yes",
    "no": "no",
    # field types (engine.templates.FIELD_TYPES), as the field tables show them: in English the schema's own words
    "fieldtype.string": "string",
    "fieldtype.text": "text",
    "fieldtype.int": "int",
    "fieldtype.float": "float",
    "fieldtype.bool": "bool",
    "fieldtype.choice": "choice",
    "fieldtype.seed": "seed",
    "fieldtype.checkpoint": "checkpoint",
    "fieldtype.image": "image",
    # batch tab
    "batch.section.template": "1 · Template",
    "batch.section.sheet": "2 · Spreadsheet",
    "batch.section.progress": "3 · Progress",
    "batch.photos_hint": "This template has image columns ({columns}): upload the product photos they name as one zip.",
    "batch.upload": "Spreadsheet (CSV or XLSX)",
    "batch.photos": "Product photos (zip, for templates with image columns)",
    "batch.photo_caption": "photo: {name}",
    "image.row": "Row {row}: {subject}",
    "image.row_only": "Row {row}",
    "image.single": "Generated image: {subject}",
    "image.single_only": "Generated image",
    "batch.on_invalid": "Rows with problems",
    "batch.on_invalid.skip": "Skip them and run the rest",
    "batch.on_invalid.stop": "Do not start the batch",
    "batch.seed": "Batch seed (empty: random)",
    "batch.check": "Check spreadsheet",
    "batch.report": "Validation report",
    "batch.report_summary": "{ok} rows ready, {bad} rows with problems.",
    "batch.report_blocked": "{bad} rows have problems and the batch is set to stop on problems: fix the sheet.",
    "batch.report_problems_only": "The report lists only the rows with problems; they are in the CSV below too.",
    "batch.report_capped": "The report lists only rows with problems, the first {shown} of {bad}; every one is in the CSV below.",
    "batch.problems_file": "Rows with problems (CSV: fix them and upload them again)",
    "batch.start": "Start batch",
    "batch.started": "Batch {batch_id} queued.",
    "batch.nothing_prepared": "Check a spreadsheet first.",
    "batch.no_rows": "No row of this spreadsheet can run.",
    "batch.recheck": "The settings changed: check the spreadsheet again before starting.",
    "batch.photos_missing": "The column(s) {columns} name product photos: upload their zip beside the sheet.",
    "batch.unused_columns": "Columns no field of this template uses (ignored; check their spelling): {columns}.",
    "batch.unknown": "No batch {batch_id} in the ledger.",
    "batch.gallery_newest": "Images so far: {count} (the newest {shown} shown)",
    "batch.removed_from_queue": "Batch {batch_id} was taken off the queue before it started; resume it to run it.",
    "batch.watching": "Batch",
    "batch.progress": "Progress",
    "batch.rows_done": "{done} of {total} rows done",
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
    "status.announce": "{status}: {percent} % of the rows made",
    "status.queue_position": "waiting: {ahead} batch(es) ahead",
    "status.step": "row {row}: step {step} of {steps}",
    "status.waiting_for_model": "waiting for the model to finish warming up",
    "status.queued": "queued",
    "status.running": "running",
    "status.done": "done",
    "status.failed": "failed",
    "status.timed_out": "timed out",
    "status.skipped": "skipped",
    "status.cancelled": "cancelled",
    "status.interrupted": "interrupted",
    "status.finished": "finished",
    "status.finished_with_errors": "finished with errors",
    "status.running_elsewhere": "running in another process",
    "status.error": "stopped by an error",
    "status.unknown": "unknown",
    "status.waiting_for_storage": "waiting for disk space",
    "status.storage_retry": "next try in {wait} at the latest; sooner once there is space",
    "report.row": "Row",
    "report.status": "Status",
    "report.problems": "Problems",
    "report.ok": "ok",
    "report.problem": "problem",
    "report.whole_row": "row",
    # single image tab
    "single.hint": "Fill in one row to try a template before a batch (for an image field, upload the photo: PNG, JPG or WebP). The image, the photo it was made from and its parameters appear here.",
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
    "history.page_number": "Page",
    "history.page": "Rows {first}–{last} (page {page}).",
    "history.more": "More rows match: go to page {next}, or narrow the search.",
    "history.page_empty": "No rows on page {page}: the results end before it.",
    "history.no_results": "Nothing recorded matches this search.",
    "history.bad_date": "Dates are written YYYY-MM-DD; got '{value}'.",
    "history.full_record": "Full record (JSON)",
    "param.size": "Size",
    "param.prompt": "Prompt",
    "param.negative_prompt": "Negative prompt",
    "param.seed": "Seed",
    "param.steps": "Steps",
    "param.cfg": "CFG",
    "param.sampler": "Sampler",
    "param.scheduler": "Scheduler",
    "param.denoise": "Denoise",
    "param.model_name": "Model",
    "param.model_hash": "Model hash",
    "param.precision": "Precision",
    "param.loras": "LoRAs",
    "param.template_name": "Template",
    "param.template_hash": "Template hash",
    "param.error": "Error",
    "param.duration": "Duration",
    "param.values": "Spreadsheet values",
    "col.row_key": "Row key",
    "col.batch": "Batch",
    "col.row": "Row",
    "col.status": "Status",
    "col.prompt": "Prompt",
    "col.seed": "Seed",
    "col.finished": "Finished (UTC)",
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
    "system.state": "State",
    "system.ready": "ready",
    "system.warming_up": "warming up the model…",
    "system.precision": "Precision",
    "system.fp8_backend": "FP8 backend",
    "system.device": "Device",
    "system.gpu": "GPU",
    "system.gpu_memory": "GPU memory",
    "system.gpu_memory_value": "{free} free of {total}",
    "system.loaded": "Models in memory",
    "system.none_loaded": "none yet",
    "system.queue": "Batch queue",
    "system.queue_value": "running: {running} · waiting: {waiting}",
    "system.versions": "Versions",
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
    "upload.too_large": "File(s) exceed the maximum allowed size of {size}: {files}",
    "error.admin_only": "Only admins may {action}.",
    "error.login_required": "Please sign in.",
    "error.workflow_invalid": "workflow failed validation",
    # durations and lists inside sentences
    "duration.s": "{s}s",
    "duration.ms": "{m}m {s}s",
    "duration.hm": "{h}h {m}m",
    "list.separator": "; ",
    "action.switch_model": "switch the model",
    "action.edit_template": "add or edit templates",
    "action.upload_template": "upload templates",
    # login page
    "login.title": "Sign in",
    "login.username": "User name",
    "login.password": "Password",
    "login.submit": "Sign in",
    "login.failed": "Wrong user name or password.",
    "login.rate_limited": "Too many sign-in attempts. Try again in {seconds} s.",
    "login.cross_site": "Sign in on this app's own sign-in page: a sign-in sent from another site is refused.",
    "login.cookie_refused": "You were signed in, but your browser did not keep the sign-in cookie: it blocks cookies of pages embedded in another site (as a Hugging Face Space is). Open the app in a tab of its own and sign in there.",
    "login.open_in_tab": "Open the app in a new tab",
}

ZH: dict[str, str] = {
    "app.title": "SD3.5 批量出图",
    "app.signed_in": "已登录：{user}（{role}）。",
    "app.sign_out": "退出登录",
    "app.no_users": "未配置用户：本应用仅在本机（localhost）监听。添加用户文件后即可在网络上共享。",
    "app.public_no_users": "未配置用户且本应用是公开的：任何人无需登录即可使用，管理员操作（上传模板、切换模型）已关闭。配置用户（SD35_USERS）后即可登录。",
    "app.demo_model": "正在使用演示模型：图片来自内置的微型模型，仅作占位，并非真实渲染。",
    "app.demo_badge": "演示模型",
    "app.warming_up": "模型预热中…… 现在提交的批次会排队等候，模型就绪后立即开始。",
    "role.admin": "管理员",
    "role.user": "普通用户",
    "role.anonymous": "本机用户",
    # titles of the pop-up messages
    "toast.info": "提示",
    "toast.warning": "注意",
    "toast.error": "错误",
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
    "field.default_value": "默认值：{value}。",
    "field.required_note": "* 为必填",
    "yes": "是",
    "no": "否",
    # field types (engine.templates.FIELD_TYPES), as the field tables show them
    "fieldtype.string": "文字（单行）",
    "fieldtype.text": "文字",
    "fieldtype.int": "整数",
    "fieldtype.float": "数字",
    "fieldtype.bool": "是/否",
    "fieldtype.choice": "选项",
    "fieldtype.seed": "种子",
    "fieldtype.checkpoint": "模型文件",
    "fieldtype.image": "图片",
    "batch.section.template": "1 · 模板",
    "batch.section.sheet": "2 · 表格",
    "batch.section.progress": "3 · 进度",
    "batch.photos_hint": "该模板含图片列（{columns}）：请把表格中引用的产品照片打包成一个 zip 上传。",
    "batch.upload": "表格文件（CSV 或 XLSX）",
    "batch.photos": "产品照片（zip，用于含图片列的模板）",
    "batch.photo_caption": "照片：{name}",
    "image.row": "第 {row} 行：{subject}",
    "image.row_only": "第 {row} 行",
    "image.single": "生成的图片：{subject}",
    "image.single_only": "生成的图片",
    "batch.on_invalid": "有问题的行",
    "batch.on_invalid.skip": "跳过这些行，其余照常生成",
    "batch.on_invalid.stop": "不启动批次",
    "batch.seed": "批次种子（留空则随机）",
    "batch.check": "检查表格",
    "batch.report": "校验报告",
    "batch.report_summary": "{ok} 行可以生成，{bad} 行有问题。",
    "batch.report_blocked": "{bad} 行有问题，且已设置为遇到问题不启动：请先修改表格。",
    "batch.report_problems_only": "报告只列出有问题的行；下方的 CSV 文件中也有这些行。",
    "batch.report_capped": "报告只列出有问题的行，显示 {bad} 行中的前 {shown} 行；全部有问题的行见下方的 CSV 文件。",
    "batch.problems_file": "有问题的行（CSV：修改后可重新上传）",
    "batch.start": "开始批量生成",
    "batch.started": "批次 {batch_id} 已加入队列。",
    "batch.nothing_prepared": "请先检查表格。",
    "batch.no_rows": "该表格中没有可以生成的行。",
    "batch.recheck": "设置已更改：请重新检查表格后再开始。",
    "batch.photos_missing": "列 {columns} 引用了产品照片：请在表格旁上传照片压缩包。",
    "batch.unused_columns": "以下列不对应此模板的任何字段（已忽略，请检查拼写）：{columns}。",
    "batch.unknown": "台账中没有批次 {batch_id}。",
    "batch.gallery_newest": "已生成的图片：{count} 张（显示最新的 {shown} 张）",
    "batch.removed_from_queue": "批次 {batch_id} 在开始前已从队列中移除；恢复即可运行。",
    "batch.watching": "批次",
    "batch.progress": "进度",
    "batch.rows_done": "已完成 {done}/{total} 行",
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
    "status.announce": "{status}：已完成 {percent}% 的行",
    "status.queue_position": "排队中：前面还有 {ahead} 个批次",
    "status.step": "第 {row} 行：第 {step}/{steps} 步",
    "status.waiting_for_model": "等待模型预热完成",
    "status.queued": "排队中",
    "status.running": "生成中",
    "status.done": "已完成",
    "status.failed": "失败",
    "status.timed_out": "超时",
    "status.skipped": "已跳过",
    "status.cancelled": "已取消",
    "status.interrupted": "已中断",
    "status.finished": "已结束",
    "status.finished_with_errors": "已结束（有失败的行）",
    "status.running_elsewhere": "正在由另一个进程运行",
    "status.error": "因错误停止",
    "status.unknown": "未知",
    "status.waiting_for_storage": "等待磁盘空间",
    "status.storage_retry": "最迟 {wait} 后重试；腾出空间后会更早继续",
    "report.row": "行号",
    "report.status": "状态",
    "report.problems": "问题",
    "report.ok": "正常",
    "report.problem": "有问题",
    "report.whole_row": "整行",
    "single.hint": "填写一行即可在批量生成前试用模板（图片字段请上传照片：PNG、JPG 或 WebP）。生成的图片、所用照片及其参数会显示在这里。",
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
    "history.page_number": "页码",
    "history.page": "第 {first}–{last} 行（第 {page} 页）。",
    "history.more": "还有更多匹配的行：请翻到第 {next} 页，或缩小搜索范围。",
    "history.page_empty": "第 {page} 页没有记录：结果在此之前已结束。",
    "history.no_results": "没有符合搜索条件的记录。",
    "history.bad_date": "日期格式应为 YYYY-MM-DD，收到的是“{value}”。",
    "history.full_record": "完整记录（JSON）",
    "param.size": "尺寸",
    "param.prompt": "提示词",
    "param.negative_prompt": "反向提示词",
    "param.seed": "种子",
    "param.steps": "步数",
    "param.cfg": "CFG 系数",
    "param.sampler": "采样器",
    "param.scheduler": "调度器",
    "param.denoise": "去噪强度",
    "param.model_name": "模型",
    "param.model_hash": "模型哈希",
    "param.precision": "精度",
    "param.loras": "LoRA 列表",
    "param.template_name": "模板",
    "param.template_hash": "模板哈希",
    "param.error": "错误",
    "param.duration": "耗时",
    "param.values": "表格中的值",
    "col.row_key": "行键",
    "col.batch": "批次",
    "col.row": "行号",
    "col.status": "状态",
    "col.prompt": "提示词",
    "col.seed": "种子",
    "col.finished": "完成时间（UTC）",
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
    "system.state": "状态",
    "system.ready": "就绪",
    "system.warming_up": "模型预热中……",
    "system.precision": "精度",
    "system.fp8_backend": "FP8 后端",
    "system.device": "设备",
    "system.gpu": "显卡",
    "system.gpu_memory": "显存",
    "system.gpu_memory_value": "可用 {free}，共 {total}",
    "system.loaded": "已载入的模型",
    "system.none_loaded": "尚未载入",
    "system.queue": "批次队列",
    "system.queue_value": "运行中：{running} · 等待中：{waiting}",
    "system.versions": "版本",
    "system.model": "当前模型",
    "system.info": "详细信息",
    "system.switch": "切换模型（仅管理员）",
    "system.switch_to": "模型",
    "system.switch_button": "切换",
    "system.switched": "已切换到模型 {name}。",
    "system.refresh": "刷新",
    "system.demo": "演示模型",
    "system.real": "正式模型",
    "upload.too_large": "文件超过了 {size} 的上传上限：{files}",
    "error.admin_only": "只有管理员可以{action}。",
    "error.login_required": "请先登录。",
    "error.workflow_invalid": "工作流检查未通过",
    "duration.s": "{s} 秒",
    "duration.ms": "{m} 分 {s} 秒",
    "duration.hm": "{h} 小时 {m} 分",
    "list.separator": "；",
    "action.switch_model": "切换模型",
    "action.edit_template": "新增或编辑模板",
    "action.upload_template": "上传模板",
    "login.title": "登录",
    "login.username": "用户名",
    "login.password": "密码",
    "login.submit": "登录",
    "login.failed": "用户名或密码错误。",
    "login.rate_limited": "登录尝试次数过多，请在 {seconds} 秒后重试。",
    "login.cross_site": "请在本应用自己的登录页面登录：从其他网站发来的登录请求会被拒绝。",
    "login.cookie_refused": "登录已成功，但浏览器没有保存登录 Cookie：它会拦截嵌入在其他网站中的页面（例如 Hugging Face Space）的 Cookie。请在单独的标签页中打开本应用并在那里登录。",
    "login.open_in_tab": "在新标签页中打开本应用",
}

TABLES: dict[str, dict[str, str]] = {"en": EN, "zh": ZH}

# Spreadsheet cell problems by code (engine.sheets.PROBLEM_CODES). English needs no table: the engine's
# own reason is English, with the very values these fill in.
PROBLEMS_ZH: dict[str, str] = {
    "required_column_missing": "缺少必填列",
    "required_value_empty": "必填项为空",
    "not_whole_number": "“{value}”不是整数",
    "not_a_number": "“{value}”不是有效数字",
    "too_large": "“{value}”数值过大",
    "not_yes_no": "“{value}”不是“是/否”；可用：{words}",
    "below_minimum": "{value} 小于最小值 {min}",
    "above_maximum": "{value} 大于最大值 {max}",
    "text_too_long": "文字有 {length} 个字符，上限为 {max}",
    "seed_out_of_range": "种子 {value} 超出范围 0 … {max}",
    "not_a_choice": "“{value}”不在可选值中：{choices}",
    "not_a_file_name": "“{value}”必须是 models/inputs 文件夹内的文件名，不能是路径",
    "cell_too_long": "单元格有 {length:,} 个字符，上限为 {max:,}",
    "photo_not_named": "未填写图片文件名",
    "photo_unreadable": "图片“{value}”无法读取（文件已损坏或不是图片）",
    "photo_too_many_pixels": "图片“{value}”（{width}×{height}，共 {frames} 帧）超过 {max:,} 像素的上限",
    "photo_type_unsupported": "“{value}”不是支持的图片格式；支持：{supported}",
    "photo_not_uploaded": "上传的图片中没有“{value}”；可用：{available}",
    "excel_rounded": "“{value}”是被 Excel 舍入到 15 位的数字；请在 Excel 中把该列设为“文本”格式后重新输入",
    "inexact_number": "{value} 超过 2^53，JSON 只能近似保存；请以字符串或不带小数点的整数发送",
    "not_finite": "单元格中的数字无效（不是有限的数值）",
    "excel_error": "单元格是 Excel 错误值 {value}；请在 Excel 中修正公式",
    "formula_without_value": "公式 {formula} 没有保存的计算结果；请在 Excel 中打开文件并重新保存（或粘贴为数值）",
    # about the sheet as a whole: the report's notes
    "looks_like_gb18030": "文件按 UTF-8 读取，但其中的文字按 GB18030/GBK 读才是中文（例如“{sample}”）；"
    "如果是中文版 Excel 保存的，请另存为“CSV UTF-8（逗号分隔）”后重新上传",
    "column_unnamed": "第 1 行中 {column} 列没有列名，该列的 {count} 个值已忽略",
    "read_as_code_page": "文件不是 UTF-8 编码，已按 {encoding} 读取（例如“{sample}”）；如果文字显示不对，"
    "请另存为“CSV UTF-8”后重新上传",
    "merged_cells_filled": "合并单元格 {ranges} 的值用于其跨越的每一行",
    "read_as_shown": "“{column}”列的数字带有格式（第 {row} 行显示为“{shown}”，存储值为 {stored}）：文本字段和文件名按显示的文字读取，"
    "数字字段按存储的数值读取",
    "format_not_shown": "“{column}”列的数字格式“{format}”在这里无法准确显示；其单元格按存储值读取（第 {row} 行：{value}）",
    "title_rows_skipped": "第 {rows} 行（“{title}”，合并单元格 {cells}）是列名上方的标题；列名从第 {header_row} 行读取",
    "read_decimal_comma": "数字列按小数逗号读取：第 {row} 行“{column}”列的“{written}”读作 {value}；"
    "点号表示千位分隔（“1.024”即 1024）",
    "not_a_cell_value": "单元格只能是一个值（文本、数字、true/false 或 null），不能是 JSON {type}",
    "decimal_comma_unexpected": "“{value}”使用了小数逗号，但本表格的数字使用小数点；请写成 {number}",
}
PROBLEM_TABLES: dict[str, dict[str, str]] = {"zh": PROBLEMS_ZH}

# Library refusals by code (engine.errors.ERROR_CODES), filled in from the error's details.
ERRORS_ZH: dict[str, str] = {
    "sheet_empty": "表格文件“{file}”是空的",
    "sheet_too_large": "表格文件有 {size_mib} MiB，上限为 {limit_mib} MiB",
    "sheet_old_excel": "“{file}”是旧版 Excel 97-2003 工作簿（.xls）；请另存为 .xlsx（Excel 工作簿）或 CSV",
    "sheet_password_protected": "“{file}”设置了密码（已加密），无法读取；请在 Excel 中取消密码后保存，再重新上传",
    "sheet_opendocument": "“{file}”是 OpenDocument 表格（.ods，来自 LibreOffice 或 OpenOffice）；请在 Calc 中另存为"
    " .xlsx 或 CSV 后上传",
    "sheet_apple_numbers": "“{file}”是 Apple Numbers 文稿；请在 Numbers 中导出为 Excel（.xlsx）或 CSV 后上传",
    "sheet_not_a_spreadsheet": "“{file}”既不是 CSV 文本也不是 XLSX 工作簿；支持：.csv、.xlsx",
    "sheet_type_unsupported": "“{file}”：不支持的文件类型“{extension}”；支持：.csv、.tsv、.txt、.xlsx、.xlsm",
    "sheet_no_header": "第 1 行必须是列名，但它是空的",
    "sheet_no_data_rows": "表格第 1 行有列名，但下面没有数据行",
    "sheet_too_many_rows": "表格超过 {limit} 行数据；请拆分成较小的表格",
    "sheet_too_many_columns": "表格有 {count} 列，上限为 {limit}",
    "sheet_duplicate_columns": "列名重复（不区分大小写和空格）：{columns}",
    "sheet_csv_has_no_worksheets": "“{file}”是 CSV 文件，没有工作表“{sheet}”",
    "sheet_xlsx_holds_csv": "“{file}”的扩展名是 {extension}，但内容是 CSV 文本，不是 Excel 工作簿；请改名为 .csv，"
    "或在 Excel 中另存为“Excel 工作簿（.xlsx）”",
    "sheet_csv_holds_zip": "“{file}”的扩展名是 {extension}，但它是 zip 压缩包（可能是 Excel 工作簿），不是 CSV 文本；"
    "请改名为 .xlsx，或在 Excel 中另存为“CSV UTF-8（逗号分隔）”",
    "sheet_utf16_invalid": "文件以 UTF-16 标记开头，但内容不是有效的 UTF-16；"
    "请在 Excel 中另存为“CSV UTF-8（逗号分隔）”",
    "sheet_encoding_unknown": "无法按 UTF-8、GB18030/GBK、“Windows-1252”或“MacRoman”编码读取该 CSV 文件；请在 Excel 中另存为“CSV UTF-8（逗号分隔）”",
    "sheet_csv_unparsable": "第 {row} 行无法按 CSV 读取：请检查该行是否有未闭合的引号，或引号后紧跟着其他文字",
    "workbook_damaged": "工作簿无法打开（文件已损坏，或不是 .xlsx）",
    "workbook_too_many_parts": "工作簿有 {count} 个部件，上限为 {limit}",
    "workbook_not_excel": "文件是 zip 压缩包，但不是 Excel 工作簿（没有 xl/workbook.xml）；支持：.csv、.xlsx",
    "workbook_unpacks_too_large": "工作簿解压后超过 {limit_mib} MiB（疑似压缩炸弹），已拒绝",
    "workbook_part_compressed": "工作簿部件“{member}”的压缩比为 {ratio}:1，上限为 {limit}:1（疑似压缩炸弹），已拒绝",
    "workbook_xml_entities": "工作簿部件“{member}”声明了 XML 实体（DOCTYPE），疑似 XML 炸弹，已拒绝",
    "workbook_part_unreadable": "工作簿部件“{member}”无法读取（文件已损坏或已加密）",
    "worksheet_is_chart": "“{sheet}”是图表工作表，不是数据工作表；请把数据放到第一个工作表",
    "worksheet_not_found": "工作簿中没有工作表“{sheet}”；现有：{available}",
    "worksheet_empty": "工作表“{sheet}”是空的；工作簿中还有：{available}（请选择该工作表，或把数据移到第一个工作表）",
    "required_columns_missing": "表格缺少必填列：{columns}",
    "columns_below_title": "表格缺少必填列：{columns}；列名必须在第 {title_row} 行，但第 {title_row} 行是标题“{title}”，"
    "列名在第 {names_row} 行；请删除标题行（在 Excel 中右键单击行号，选择“删除”）后重新上传",
    "batch_seed_not_whole": "批次种子必须是整数，而不是“{value}”",
    "batch_seed_out_of_range": "批次种子必须在 0 到 {limit} 之间",
    "photos_not_a_zip": "上传的产品照片不是有效的 zip 压缩包；请把照片打包成 zip 后上传",
    "photos_zip_too_large": "照片压缩包有 {size_mib} MiB，上限为 {limit_mib} MiB",
    "photos_unsafe_path": "照片压缩包中“{member}”的路径不安全（绝对路径、“..”或控制字符），已拒绝",
    "photos_too_many_entries": "照片压缩包有 {count} 个条目，上限为 {limit}",
    "photos_too_many": "照片超过 {limit} 张；请拆分成较小的批次",
    "photos_duplicate_name": "有两张照片都叫“{name}”（不区分大小写和文件夹）：“{first}”和“{second}”；"
    "请给其中一张改名，使每个单元格只对应一张照片",
    "photo_too_large": "照片“{member}”有 {size_mib} MiB，上限为 {limit_mib} MiB",
    "photo_compressed": "照片“{member}”的压缩比为 {ratio}:1，上限为 {limit}:1（疑似压缩炸弹），已拒绝",
    "photos_unpack_too_large": "照片压缩包解压后超过 {limit_mib} MiB（疑似压缩炸弹），已拒绝",
    "photo_unpacks_past_its_size": "照片“{member}”解压后超过压缩包声明的大小或上限（疑似压缩炸弹），已拒绝",
    "photo_unpack_failed": "照片“{member}”无法解压（压缩包已损坏或已加密）",
    "upload_photo_unsupported": "{field}：“{file}”不是支持的照片格式；支持：{supported}",
    "upload_photo_gone": "{field}：上传的照片“{file}”已不存在，请重新上传",
    "template_not_chosen": "请先选择模板",
    "template_not_found": "没有模板“{template}”；可用：{available}",
    "template_shipped": "“{template}”是内置模板，不能替换；请用另一个名称保存（template.json 中的 \"name\"）",
    "template_exists": "模板“{template}”已存在；勾选替换后再保存即可覆盖",
    "template_value_missing": "模板“{template}”需要字段“{field}”的值，但单元格为空且没有默认值",
    "template_render_failed": "模板“{template}”渲染失败：模板本身有误，请管理员检查它的 workflow.json.j2",
    "template_duplicate_key": "模板“{template}”在同一个对象中两次写出了键“{key}”（节点编号或同一节点的输入重复）",
    "template_invalid_json": "模板“{template}”渲染出的内容不是有效的 JSON（第 {line} 行第 {column} 列）",
    "template_not_api_format": "模板“{template}”必须渲染出由节点组成的 JSON 对象"
    "（API 格式，每个节点含 class_type 和 inputs）",
    "template_file_too_large": "{file} 超过 {limit} 字节的上限",
    "template_schema_not_json": "{file} 必须是有效的 UTF-8 JSON 对象",
    "template_name_invalid": "模板名称“{name}”无效：只能由 1–64 个小写字母、数字、“_”或“-”组成",
    "template_jinja_syntax": "模板“{template}”的 workflow.json.j2 第 {line} 行有 Jinja 语法错误：{detail}",
    "template_name_not_a_field": "模板“{template}”的工作流用到了“{names}”，但 template.json 没有声明这些字段",
    "template_field_unused": "模板“{template}”声明了字段“{fields}”，但工作流和 filename_pattern 都没有用到；"
    "请使用它，或从 template.json 中删除",
    "template_example_invalid": "模板“{template}”的示例工作流未通过检查",
    "template_upload_unexpected_files": "上传了不属于模板的文件：{files}；模板由 template.json、workflow.json.j2 "
    "以及可选的 example.png 组成",
    "template_upload_lacks_file": "上传的文件中缺少 {file}",
    "template_example_not_png": "example.png 必须是 PNG 图片，且小于 {limit_kib} KiB",
    "template_field_not_object": "模板“{template}”的“fields”中第 {position} 项必须是 JSON 对象（写出“name”“type”等键）",
    "template_field_name_invalid": "模板“{template}”的字段名“{field}”无效：只能由字母、数字和“_”组成，以字母开头，且不能是 Jinja 的保留名称",
    "template_field_unknown_keys": "模板“{template}”的字段“{field}”有未知的键：“{keys}”",
    "template_field_type_unknown": "模板“{template}”的字段“{field}”的类型“{type}”不受支持；支持：{supported}",
    "template_field_choices_missing": "模板“{template}”的选项字段“{field}”需要一个非空的“choices”列表",
    "template_field_choices_unexpected": "模板“{template}”的字段“{field}”是“{type}”类型，却列出了“choices”；请把它改为“choice”类型，或删除“choices”",
    "template_field_choices_not_text": "模板“{template}”的选项字段“{field}”的“choices”只能是文本或数字",
    "template_field_choice_repeated": "模板“{template}”的选项字段“{field}”把选项“{choice}”列了两次（选项不区分大小写）",
    "template_field_bound_not_number": "模板“{template}”的字段“{field}”的“{bound}”必须是数字",
    "template_field_bound_not_allowed": "模板“{template}”的字段“{field}”是“{type}”类型，不能设置“{bound}”",
    "template_field_min_above_max": "模板“{template}”的字段“{field}”的最小值 {min} 大于最大值 {max}",
    "template_field_required_not_boolean": "模板“{template}”的字段“{field}”的“required”必须是“true”或“false”（不加引号），不能是“{value}”",
    "template_field_value_wrong_type": "模板“{template}”的字段“{field}”的“{key}”值“{value}”不是“{type}”类型",
    "template_field_value_refused": "模板“{template}”的字段“{field}”的“{key}”值不符合该字段自己的要求",
    "template_field_default_missing": "模板“{template}”的可选字段“{field}”需要默认值“default”（或把“required”设为“true”）",
    "template_fields_missing": "模板“{template}”的“fields”必须是非空列表",
    "template_field_declared_twice": "模板“{template}”把字段“{field}”声明了两次（字段名不区分大小写）",
    "template_fields_share_column": "模板“{template}”的字段“{other}”和“{field}”会读取表格的同一列（列名匹配时忽略大小写、空格和重复的“_”）；请重命名其中一个",
    "template_translations_not_object": "模板“{template}”的“translations”必须是以语言代码为键的对象",
    "template_translation_language_invalid": "模板“{template}”的“translations”中的“{language}”不是语言代码（例如“zh”或“de”）",
    "template_translation_not_object": "模板“{template}”的“translations”中“{language}”的内容必须是只含“title”“description”“fields”的对象",
    "template_translation_fields_not_object": "模板“{template}”的“translations”中“{language}”的“fields”必须是“字段名 → 说明”的对象",
    "template_translation_field_unknown": "模板“{template}”的“translations”中“{language}”的“fields”写了“{fields}”，但 template.json 没有声明这些字段",
    "template_translation_not_text": "模板“{template}”的“translations”中“{language}”的标题和说明都必须是文本",
    "template_folder_mismatch": "模板文件夹“{folder}”中的模板名为“{template}”，两者必须一致",
    "template_filename_pattern_not_text": "模板“{template}”的 filename_pattern 必须是文本",
    "template_filename_pattern_invalid": "模板“{template}”的 filename_pattern“{pattern}”只能包含用花括号括起的字段名，不能有格式说明、属性或未闭合的花括号",
    "template_filename_pattern_unknown": "模板“{template}”的 filename_pattern 用到了“{field}”，它不是字段；可用：{available}",
    "template_tags_invalid": "模板“{template}”的“tags”必须是文本列表",
    "template_over_limits": "模板“{template}”的 workflow.json.j2 超出了安全限制：{detail}",
    "template_include_unsupported": "模板“{template}”的 workflow.json.j2 第 {line} 行：不支持“include”“import”和“extends”；请把整个工作流写在一个文件里",
    "template_block_unsupported": "模板“{template}”的 workflow.json.j2 第 {line} 行：宏之外不支持“{tag}”块，它写出的内容不会按 JSON 编码；请在表达式里使用过滤器或调用",
    "template_tojson_redundant": "模板“{template}”的 workflow.json.j2 第 {line} 行：请删除“|tojson”，每个表达式都已按 JSON 写出",
    "template_node_malformed": "模板“{template}”渲染出的节点“{node}”必须是含有“class_type”和“inputs”的对象",
    "template_file_unreadable": "无法读取模板“{template}”的文件“{file}”",
    "batch_not_selected": "没有选择批次",
    "batch_not_found": "记录中没有批次“{batch_id}”",
    "batch_not_checked": "还没有可开始的内容：请先检查表格",
    "batch_check_expired": "批次 {batch_id} 检查过的行已不再保留（超过一周未开始，或已经开始过）：请重新检查表格",
    "batch_photos_expired": "批次 {batch_id} 检查时上传的图片已不再保留（解压的图片只保留一天；已有 {count} 张不在，例如“{example}”）：请重新上传图片并检查表格",
    "batch_check_unwritable": "无法保存批次 {batch_id} 检查过的行：文件夹 {path} 无法写入（磁盘已满或没有写入权限）",
    "batch_not_owner": "批次 {batch_id} 由 {owner} 启动：只有本人或管理员可以停止或继续",
    "model_not_found": "找不到 {kind}“{name}”；可用：{available}",
    "model_not_allowed": "不能切换到模型“{name}”；可选：{allowed}",
    "batch_running_here": "批次 {batch_id} 已在本进程中运行",
    "batch_busy": "另一个进程（{worker}）正在运行相同输入的批次 {batch_id}，不会再开始一份。"
    "请等它完成，或停止它后再运行一次以继续",
    "batch_exists": "批次“{batch_id}”已存在；请继续该批次，或换一个批次名",
    "batch_inputs_changed": "批次“{batch_id}”无法继续：{changed}发生了变化。已完成的行来自原来的输入；"
    "改动过的内容请开始新批次",
    "batch_photos_missing": "批次 {batch_id} 开始时没有照片；要使用照片请开始新批次",
    "batch_photos_differ": "批次 {batch_id} 开始时用的是另一组照片；继续时请不要上传照片（批次保留了自己的副本），"
    "或开始新批次",
    "batch_output_unwritable": "批次 {batch_id} 无法创建输出文件夹 {path}（磁盘已满或没有写入权限）",
    "batch_stopped_by_storage": "批次 {batch_id} 在第 {row} 行停止：无法写入 {path}（磁盘已满或文件夹不可写）。"
    "已完成的行都已保留；请释放空间（或修复文件夹）后继续该批次",
    "batch_waiting_for_storage": "批次 {batch_id} 正在等待磁盘空间：{path} 只剩 {free_bytes} 字节，"
    "至少需要 {needed_bytes} 字节。已完成的行都已保留；释放空间后批次会自动继续",
    "batch_storage_unwritable": "批次 {batch_id} 正在等待：无法写入文件夹 {path}（磁盘已满、只读或没有写入权限）。"
    "已完成的行都已保留；修复后批次会自动继续",
    "ledger_unwritable": "无法写入记录库 {path}（磁盘已满，或此用户对该文件及其所在文件夹没有写入权限）。"
    "已完成的行和图片都已保留；释放空间或修复权限后继续",
    "ledger_upgrade_failed": "记录库 {path} 无法升级到第 {version} 版结构（{name}）：{detail}。记录库未作任何改动。"
    "此 Python 的 SQLite 版本为 {sqlite_version}，记录库需要 {needed} 或更新、且带 FTS5 的 SQLite",
    "generation_not_found": "记录中没有生成记录“{row_key}”",
    "generation_has_no_template": "生成记录“{row_key}”没有记录所用的模板，无法重新生成",
    "single_image_timeout": "图片在 {seconds} 秒内没有完成",
    "cancelled": "已被用户取消",
    "sampler_deadline": "采样超过了 {limit_s} 秒的时间限制",
    "out_of_memory": "节点 {node_id}（{class_type}）运行时显存不足",
    "image_nan": "生成的图片含有 NaN（模型或 VAE 数值溢出）",
    "image_blank": "生成的图片是一片空白（所有像素都相同）",
    "no_image": "工作流没有生成任何图片",
    "node_failed": "节点 {node_id}（{class_type}）运行失败：{error}",
    "idempotency_key_reused": "幂等键“{key}”已用于另一个请求；新的请求请使用新的键",
    "idempotency_key_in_use": "幂等键“{key}”的第一个请求仍在处理中；请 {retry_after_s} 秒后重试",
}
ERROR_TABLES: dict[str, dict[str, str]] = {"zh": ERRORS_ZH}

# Kinds of model file (engine.models: the folders looked in, and the kinds the model cache holds), as the
# errors and the system page name them.
MODEL_KINDS_ZH = {"checkpoint": "模型文件", "checkpoints": "模型文件", "diffusion_model": "扩散模型",
                  "diffusion_models": "扩散模型", "text_encoders": "文本编码器", "vae": "VAE", "lora": "LoRA",
                  "loras": "LoRA", "controlnet": "ControlNet"}
# Values that are words themselves, said in the language wherever a coded message fills them in.
# What a resumed batch found changed (engine.store's "batch_inputs_changed").
CHANGED_INPUTS_ZH = {"template": "模板", "sheet": "表格", "template+sheet": "模板和表格"}
VALUE_WORDS: dict[str, dict[str, dict[str, str]]] = {"zh": {"kind": MODEL_KINDS_ZH, "changed": CHANGED_INPUTS_ZH}}

# What kind of trouble a library error is, by its class in engine.errors, for the rarer errors that have no
# code: the page says the kind in its language and then the engine's exact English, so a reader knows at
# once what failed and still has the precise words (a file name, a tensor's shape) to act on or report.
ERROR_KINDS_ZH: dict[str, str] = {
    "EngineError": "出错了",
    "WorkflowError": "工作流有问题",
    "WorkflowFormatError": "无法识别工作流文件的格式",
    "WorkflowInvalid": "工作流检查未通过",
    "ModelError": "模型出错",
    "ModelNotFound": "找不到模型文件",
    "ModelLoadError": "模型文件无法加载",
    "ExecutionError": "生成时出错",
    "Cancelled": "已取消",
    "DeadlineExceeded": "超过了时间限制",
    "OutOfMemory": "显存不足",
    "BadOutput": "生成的图片无效",
    "Fp8Error": "FP8 量化或校准出错",
    "TemplateError": "模板有问题",
    "SheetError": "无法读取表格",
    "BatchError": "批次无法进行",
    "BatchMismatch": "批次无法继续：输入与开始时不同",
    "BatchExists": "批次已存在",
    "BatchBusy": "另一个进程正在运行该批次",
    "StoreError": "生成记录库出错",
    "BadQuery": "查询条件无效",
    "IdempotencyError": "幂等键无法使用",
    "IdempotencyKeyReused": "幂等键已用于另一个请求",
    "IdempotencyKeyInUse": "幂等键的第一个请求仍在处理中",
    "RequestInvalid": "请求无效",
    "AccessDenied": "无权执行此操作",
    "BrokerError": "无法使用扩展用的 Redis 代理（broker）",
}
ERROR_KIND_TABLES: dict[str, dict[str, str]] = {"zh": ERROR_KINDS_ZH}

# Workflow problems by ComfyUI's error type: the kind of problem in a few words, said where no more
# precise sentence below fits (rare kinds, a node's own checks).
NODE_PROBLEMS_ZH: dict[str, str] = {
    "required_input_missing": "缺少必需的输入",
    "value_not_in_list": "值不在可选列表中",
    "value_smaller_than_min": "值小于最小值",
    "value_bigger_than_max": "值大于最大值",
    "invalid_input_type": "值的类型不对",
    "return_type_mismatch": "连接的输出类型不匹配",
    "bad_linked_input": "连接无效",
    "exception_during_validation": "检查时出错",
    "custom_validation_failed": "检查未通过",
    "prompt_no_outputs": "工作流没有输出节点（例如 SaveImage 或 PreviewImage）",
    "invalid_prompt": "工作流无效",
}
# The common problems said whole, from the values the engine keeps in ``extra_info`` (the choices, the
# limits, the types) rather than from its English sentence: per type, ``(what extra_info holds, words)``,
# the first whose keys are all there (and, where a value is given, equal to it) wins. ``link_node`` and
# ``link_output`` are read from ``linked_node``.
NODE_DETAILS_ZH: dict[str, list[tuple[dict[str, Any], str]]] = {
    "required_input_missing": [({"input_type": None}, "缺少必需的输入（类型 {input_type}）")],
    "value_not_in_list": [
        ({"file_problem": "missing", "received_value": None, "available": None},
         "找不到图片“{received_value}”；可用的图片：{available}"),
        ({"file_problem": "outside", "received_value": None},
         "图片“{received_value}”不在输入文件夹内（不接受绝对路径和“..”）"),
        ({"file_problem": "bad_name", "received_value": None}, "图片文件名“{received_value}”无效"),
        ({"file_problem": "no_input_folder"}, "没有配置输入文件夹，无法读取图片"),
        ({"missing_file": "model", "received_value": None, "choices": None},
         "找不到模型文件“{received_value}”；可用：{choices}"),
        ({"received_value": None, "choices": None}, "“{received_value}”不在可选值中；可选：{choices}"),
    ],
    "invalid_input_type": [
        ({"link_only": True, "expected_type": None, "received_value": None},
         "只能连接 {expected_type} 类型的输出，不能直接填写 {received_value}"),
        ({"expected_type": None, "received_value": None}, "“{received_value}”不是有效的{expected_type}"),
    ],
    "value_smaller_than_min": [({"received_value": None, "min": None}, "{received_value} 小于最小值 {min}")],
    "value_bigger_than_max": [({"received_value": None, "max": None}, "{received_value} 大于最大值 {max}")],
    "return_type_mismatch": [({"received_type": None, "input_type": None},
                              "连接的输出类型是 {received_type}，而此输入需要 {input_type}")],
    "bad_linked_input": [
        ({"link_node": None, "link_output": None, "output_count": None},
         "连接到节点 {link_node} 的第 {link_output} 号输出，但该节点只有 {output_count} 个输出"),
        ({"link_node": None}, "连接到不存在的节点 {link_node}"),
    ],
    "invalid_prompt": [
        ({"unknown_node_type": None}, "未知的节点类型“{unknown_node_type}”，本程序不支持"),
        ({"nodes": None}, "工作流中有循环：节点 {nodes} 互相依赖"),
    ],
    "prompt_no_outputs": [({}, "没有输出节点（例如 SaveImage 或 PreviewImage），不会生成任何图片")],
}
NODE_WORDS_ZH = {"node": "节点 {node_id}（{class_type}）", "input": "的输入“{input_name}”", "workflow": "工作流",
                 "none": "无", "more": "等 {count} 项"}
# The value types of node inputs people type in; the others (IMAGE, LATENT, MODEL...) are named as ComfyUI does.
NODE_TYPES_ZH = {"INT": "整数", "FLOAT": "数字", "STRING": "文字", "BOOLEAN": "是/否值", "COMBO": "选项"}


def _filled(template: str, values: dict[str, Any]) -> str:
    """``template`` with ``values``; lists are written as comma-separated names."""
    shown = {k: ", ".join(map(str, v)) if isinstance(v, (list, tuple)) else v for k, v in values.items()}
    return template.format(**shown)


def _coded_text(tables: dict[str, dict[str, str]], code: str | None, values: dict[str, Any], lang: str) -> str | None:
    """What ``code`` says in ``lang`` with ``values`` filled in; None where ``lang`` has no words for it (the
    caller keeps the engine's English)."""
    template = tables.get(lang, {}).get(code or "")
    if template is None:
        return None
    words = VALUE_WORDS.get(lang, {})
    return _filled(template, {k: words[k].get(v, v) if k in words and isinstance(v, str) else v
                              for k, v in values.items()})


def _node_detail_values(problem: Any) -> dict[str, Any]:
    """A node problem's ``extra_info`` ready for :data:`NODE_DETAILS_ZH`: value types in words, a link split
    into node and output, an empty list said as "none" and a cut list of choices marked as longer."""
    values = dict(problem.extra_info)
    for key in ("expected_type", "input_type", "received_type"):
        if values.get(key) in NODE_TYPES_ZH:
            values[key] = NODE_TYPES_ZH[values[key]]
    linked = values.get("linked_node")
    if isinstance(linked, (list, tuple)) and len(linked) == 2:
        values["link_node"], values["link_output"] = linked
    for key in ("available", "choices"):
        if isinstance(values.get(key), (list, tuple)) and not values[key]:
            values[key] = NODE_WORDS_ZH["none"]
    count = values.get("choice_count")
    if isinstance(values.get("choices"), list) and isinstance(count, int) and count > len(values["choices"]):
        values["choices"] = ", ".join(map(str, values["choices"])) + " " + NODE_WORDS_ZH["more"].format(count=count)
    return values


def _node_detail(problem: Any) -> str | None:
    """The Chinese sentence for a node problem from its values, or None when no entry fits."""
    values = _node_detail_values(problem)
    for wanted, words in NODE_DETAILS_ZH.get(problem.type, ()):
        if all(key in values and (want is None or values[key] == want) for key, want in wanted.items()):
            return _filled(words, values)
    return None


def node_problem_text(problem: Any, lang: str = "en") -> str:
    """One workflow problem (``engine.errors.NodeProblem`` or its dict) in ``lang``, naming node and input.

    In Chinese the common problems are said whole from their values; a rare one is said by its kind, with
    the engine's own words after it in brackets for whoever fixes the workflow."""
    from engine.errors import NodeProblem

    if isinstance(problem, dict):
        problem = NodeProblem(**problem)
    kind = NODE_PROBLEMS_ZH.get(problem.type) if lang == "zh" else None
    if kind is None:
        return problem.describe()
    if problem.node_id:
        where = NODE_WORDS_ZH["node"].format(node_id=problem.node_id, class_type=problem.class_type)
    else:
        where = NODE_WORDS_ZH["workflow"]
    if problem.input_name:
        where += NODE_WORDS_ZH["input"].format(input_name=problem.input_name)
    detail = _node_detail(problem)
    if detail is None:
        english = problem.message + (f": {problem.details}" if problem.details else "")
        detail = f"{kind}（{english}）"
    return f"{where}：{detail}"


def error_text(exc: Any, lang: str = "en") -> str:
    """A library error (``engine.errors.EngineError``) as one message in ``lang``: the table's words for
    its code, or, for a failed workflow check, its problems one per line. Without either the engine's own
    English message stands, so no error is ever swallowed for want of a translation."""
    from engine.errors import WorkflowInvalid

    if isinstance(exc, WorkflowInvalid):  # other errors may carry "problems" of their own shape
        lines = [f"• {node_problem_text(p, lang)}" for p in exc.problems[:10]]
        return text("error.workflow_invalid", lang) + ":\n" + "\n".join(lines)
    coded = _coded_text(ERROR_TABLES, getattr(exc, "code", None), exc.details, lang)
    if coded is None:
        return _with_error_kind(type(exc), exc.message, lang)
    cell_problem = exc.details.get("cell_problem")  # a template field's default its own checks refuse
    if cell_problem:
        why = _coded_text(PROBLEM_TABLES, cell_problem["code"], cell_problem["params"], lang)
        coded += "：" + (cell_problem["reason"] if why is None else why)
    node_problems = exc.details.get("node_problems") or []  # a template whose example workflow fails
    return coded + "".join(f"\n• {node_problem_text(p, lang)}" for p in node_problems[:10])


def _with_error_kind(error_type: type, english: str, lang: str) -> str:
    """``english``, a library error's own message, led by what kind of error it is in ``lang`` (the nearest
    class in its ancestry that :data:`ERROR_KINDS_ZH` names); as it is in English, or where it already is in
    the page's language (a refusal written with the page's words)."""
    kinds = ERROR_KIND_TABLES.get(lang)
    if not kinds or _has_cjk(english):
        return english
    lead = next((kinds[cls.__name__] for cls in error_type.__mro__ if cls.__name__ in kinds), None)
    return english if lead is None else f"{lead}：{english}"


def _has_cjk(words: str) -> bool:
    return any("\u4e00" <= ch <= "\u9fff" for ch in words)


def coded_text(code: str | None, values: dict[str, Any], english: str, lang: str = "en") -> str:
    """A library error kept as its code and values (a batch's progress, a row in the ledger) in ``lang``;
    ``english``, the engine's message, where the language has no words for the code."""
    coded = _coded_text(ERROR_TABLES, code, values, lang)
    return english if coded is None else coded


def row_error_text(detail: dict[str, Any], lang: str = "en") -> str | None:
    """Why a ledger row (``Generation.to_dict()``) was skipped or failed, in ``lang``: from the problems a
    skipped row keeps, or the code of the error a failed row met (its ``extra``'s failure); the ledger's
    English ``error`` otherwise."""
    from engine.errors import ERROR_CODES
    from engine.sheets import RowProblem

    error = detail.get("error")
    if lang == "en" or not error:
        return error
    extra = detail.get("extra") or {}
    if extra.get("problems"):
        return text("list.separator", lang).join(problem_text(RowProblem(**p), lang) for p in extra["problems"])
    failure = extra.get("failure") or {}
    said = _coded_text(ERROR_TABLES, failure.get("code"), failure.get("values") or {}, lang)
    if said is None:
        return _with_error_kind(_failure_type(failure), error, lang)
    if failure.get("node_id") and "node_id" not in ERROR_CODES.get(failure["code"], ()):
        where = NODE_WORDS_ZH["node"].format(node_id=failure["node_id"], class_type=failure.get("node_type"))
        said = f"{where}：{said}"
    return said


def _failure_type(failure: dict[str, Any]) -> type:
    """The library error class a failed row met (its ``exception_type``, "engine.errors.ModelLoadError"); a
    row that failed on anything else failed while it ran, an ``ExecutionError``."""
    from engine import errors

    module, _, name = str(failure.get("exception_type") or "").rpartition(".")
    found = getattr(errors, name, None) if module == errors.__name__ else None
    return found if isinstance(found, type) and issubclass(found, errors.EngineError) else errors.ExecutionError


def model_kind_text(kind: str, lang: str = "en") -> str:
    """A kind of model file ("checkpoint", "loras") in ``lang``."""
    return VALUE_WORDS.get(lang, {}).get("kind", {}).get(kind, kind)


def problem_reason(problem: Any, lang: str = "en") -> str:
    """Why a spreadsheet problem (``engine.sheets.RowProblem``) is one, in ``lang``, without its place. A
    workflow check that failed for the row lists its node problems; problems without a code and languages
    without a table keep the engine's English reason."""
    if problem.code == "workflow_invalid" and lang != "en":
        return text("list.separator", lang).join(node_problem_text(p, lang) for p in problem.params["problems"])
    coded = _coded_text(PROBLEM_TABLES, problem.code, problem.params, lang)
    if coded is None:  # a row whose workflow could not be rendered carries the library error's code
        coded = _coded_text(ERROR_TABLES, problem.code, problem.params, lang)
    return problem.reason if coded is None else coded


def problem_text(problem: Any, lang: str = "en") -> str:
    """One spreadsheet problem as "column: why" in ``lang`` (see :func:`problem_reason`)."""
    where = problem.column or text("report.whole_row", lang)
    return f"{where}: {problem_reason(problem, lang)}"


# The BCP 47 tag each page language is served under: the page's lang attribute, and the locale Gradio's front end
# is told (it ships words for zh-CN, not plain zh, and falls back to English for a tag it lacks).
PAGE_LANGUAGE_TAGS = {"en": "en", "zh": "zh-CN"}


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


def page_locale_script(lang: str) -> str:
    """A script for the very top of the page that tells Gradio's front end the page's language.

    The front end picks its words by ``navigator.language`` alone, among the locales Gradio ships words in
    (zh-CN, zh-TW, fr, ...), and falls back to English for a tag it lacks: a browser set to ``zh`` or
    ``zh-HK`` got English labels under the server's Chinese words, one set to ``zh-TW`` Gradio's traditional
    characters around our simplified ones. The server's choice (from ``Accept-Language``) is told instead.
    It must run before Gradio's module script reads the locale, so it goes into the served HTML itself;
    Gradio adds its ``head`` argument later, from the page's config."""
    tag = json.dumps(PAGE_LANGUAGE_TAGS[lang])
    script = f'Object.defineProperty(Navigator.prototype, "language", {{get: () => {tag}, configurable: true}});'
    return f"<script>{script}{_fixed_english_labels_script(lang)}</script>"


# Accessible names Gradio's front end writes in English whatever the locale (no component parameter sets
# them), with what a screen reader should say instead on a page in another language.
GRADIO_FIXED_LABELS = {"zh": {"Click to upload or drop files": "点击上传或拖放文件"}}


def _fixed_english_labels_script(lang: str) -> str:
    """A script that renames :data:`GRADIO_FIXED_LABELS` as Gradio renders them (and again if it re-renders
    them), so a screen reader on a Chinese page does not announce the upload area in English."""
    labels = GRADIO_FIXED_LABELS.get(lang)
    if not labels:
        return ""
    return ("(() => { const said = " + json.dumps(labels, ensure_ascii=False) + ";"
            " const english = Object.keys(said).map(k => '[aria-label=' + JSON.stringify(k) + ']').join(',');"
            " const rename = () => document.querySelectorAll(english).forEach(e =>"
            " e.setAttribute('aria-label', said[e.getAttribute('aria-label')]));"
            " new MutationObserver(rename).observe(document.documentElement,"
            " {subtree: true, childList: true, attributes: true, attributeFilter: ['aria-label']}); })();")


def language_of_request(request: Any) -> str:
    """The language of a ``gr.Request`` or Starlette request (either carries the headers); English if none."""
    headers = getattr(request, "headers", None)
    if headers is None:
        return "en"
    return language_of(headers.get("accept-language"))


def text(key: str, lang: str = "en", **values: Any) -> str:
    """The string ``key`` in ``lang``, with ``values`` filled in. A missing key is a KeyError."""
    table = TABLES.get(lang, EN)
    return table[key].format(**values) if values else table[key]


def gradio_i18n():
    """A ``gr.I18n`` over both tables, so component labels follow the browser's locale."""
    import gradio as gr

    # The page's head script tells Gradio's front end the tag of the language the server chose
    # (PAGE_LANGUAGE_TAGS), one Gradio ships its own words in; the plain tags serve its fallback lookups.
    tables = dict(TABLES)
    tables.update({PAGE_LANGUAGE_TAGS[lang]: table for lang, table in TABLES.items()})
    return gr.I18n(**tables)
