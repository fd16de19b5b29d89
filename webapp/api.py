"""The JSON API for teams that wire the product into their own systems (OpenAPI at /openapi.json).

Thin: every route calls the library (engine.services.Services) and library errors become HTTP answers in
one place (:func:`install_error_handlers`).
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

from engine.errors import AccessDenied, BatchError, BatchMismatch, EngineError, SheetError, TemplateError, WorkflowInvalid
from engine.sheets import Sheet, SheetRow, read_sheet
from webapp.auth import ADMIN
from webapp.files import resolve_inside
from webapp.guard import ApiGuard, RateLimited, fastapi_dependency
from webapp.ratelimit import UploadLimit

# HTTP status per library error type; the first match in the class's MRO wins.
STATUS_BY_ERROR: dict[type[EngineError], int] = {
    WorkflowInvalid: 400,
    TemplateError: 400,
    SheetError: 400,
    BatchMismatch: 409,
    BatchError: 400,
}


def error_status(exc: EngineError) -> int:
    if isinstance(exc, AccessDenied):
        return exc.status
    for cls in type(exc).__mro__:
        if cls in STATUS_BY_ERROR:
            return STATUS_BY_ERROR[cls]
    return 400 if "not found" not in exc.message else 404


def install_error_handlers(app: Any) -> None:
    """Library errors -> JSON answers: ``{"error": {type, message, details}}`` with the right status."""
    from fastapi.responses import JSONResponse

    async def handle(request: Any, exc: EngineError) -> Any:
        status = error_status(exc)
        headers: dict[str, str] = {}
        if isinstance(exc, RateLimited):
            headers.update(exc.headers)
        if status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        body = exc.to_comfy() if isinstance(exc, WorkflowInvalid) else {"error": exc.to_dict()}
        return JSONResponse(json.loads(json.dumps(body, default=str)), status_code=status, headers=headers)

    app.add_exception_handler(EngineError, handle)


def sheet_from_records(records: list[dict[str, Any]], name: str = "api.json") -> Sheet:
    """Rows given as JSON objects become a sheet whose cells are text, exactly like an uploaded CSV."""
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise SheetError("'rows' must be a list of objects (one per image)")
    columns: list[str] = []
    for record in records:
        for key in record:
            if key not in columns:
                columns.append(str(key))
    rows = [
        SheetRow(number=index + 2, cells={str(k): "" if v is None else _cell_text(v) for k, v in record.items()})
        for index, record in enumerate(records)
    ]
    return Sheet(columns=columns, rows=rows, filename=name, format="json")


def _cell_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def template_summary(template: Any) -> dict[str, Any]:
    return template.to_dict() if hasattr(template, "to_dict") else {"name": template.name, "hash": template.hash}


def batch_status(services: Any, batch_id: str, with_rows: bool = True) -> dict[str, Any]:
    batch = services.ledger.get_batch(batch_id)
    if batch is None:
        raise BatchError(f"no batch {batch_id!r}; it was not found", batch_id=batch_id)
    summary = services.runner.summary(batch_id)
    progress = services.queue.status(batch_id)
    body: dict[str, Any] = {
        "batch": batch,
        "counts": {
            "done": summary.done,
            "failed": summary.failed,
            "timed_out": summary.timed_out,
            "skipped": summary.skipped,
            "not_run": summary.cancelled,
            "total": summary.total,
        },
        "progress": progress.__dict__ if progress is not None else None,
    }
    if with_rows:
        body["rows"] = [_public_row(row) for row in services.ledger.rows(batch_id)]
    return body


def _public_row(row: dict[str, Any]) -> dict[str, Any]:
    hidden = {"workflow"}
    out = {k: v for k, v in row.items() if k not in hidden}
    if row.get("image_path"):
        out["image_url"] = f"/api/generations/{row['row_key']}/image"
    return out


def api_router(services: Any, guard: ApiGuard, upload_limit: UploadLimit, metrics: Any = None) -> Any:
    from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
    from fastapi.responses import FileResponse, StreamingResponse

    router = APIRouter(prefix="/api", tags=["API"])
    user = Depends(fastapi_dependency(guard))
    admin_models = Depends(fastapi_dependency(guard, ADMIN, "switch_model"))
    admin_templates = Depends(fastapi_dependency(guard, ADMIN, "upload_template"))

    async def read_upload(upload: UploadFile) -> bytes:
        chunks = []
        total = 0
        while chunk := await upload.read(1024 * 1024):
            total += len(chunk)
            if total > upload_limit.max_bytes:
                raise upload_limit._too_large(total, declared=False)
            chunks.append(chunk)
        return b"".join(chunks)

    def check_length(request: Request) -> None:
        upload_limit.check_content_length(request.headers.get("content-length"))

    @router.post("/token", summary="Exchange a user name and password for a bearer token")
    async def create_token(request: Request) -> Any:
        body = await request.json()
        if guard.tokens is None or not guard.users.configured:
            raise AccessDenied("token login needs users and SD35_JWT_SECRET configured", status=400, reason="not_configured")
        found = guard.users.authenticate(str(body.get("username", "")), str(body.get("password", "")))
        if found is None:
            raise AccessDenied("wrong user name or password", status=401, reason="bad_credentials")
        ttl = str(body.get("ttl") or "24h")
        return {"access_token": guard.tokens.create(found, ttl=ttl), "token_type": "bearer", "role": found.role}

    @router.get("/templates", summary="Templates with their field schemas")
    def list_templates(caller: Any = user) -> Any:
        return [template_summary(t) for t in services.templates.list()]

    @router.get("/templates/{name}")
    def get_template(name: str, caller: Any = user) -> Any:
        return template_summary(services.templates.get(name))

    @router.post("/templates", summary="Add or replace a template (admin)")
    async def upload_template(
        request: Request,
        template_json: UploadFile = File(...),
        workflow: UploadFile = File(...),
        caller: Any = admin_templates,
    ) -> Any:
        check_length(request)
        meta = await read_upload(template_json)
        text = await read_upload(workflow)
        saved = await asyncio.to_thread(services.templates.add, meta, text)
        return template_summary(saved)

    def _prepare(template: str, sheet: Sheet, body: dict[str, Any], caller: Any) -> Any:
        seed = body.get("batch_seed")
        return services.runner.prepare(
            template,
            sheet,
            batch_seed=int(seed) if seed not in (None, "") else None,
            on_invalid=body.get("on_invalid", "skip"),
            user=caller.name,
        )

    def _submit(prepared: Any, start: bool) -> dict[str, Any]:
        answer: dict[str, Any] = {
            "batch_id": prepared.batch_id,
            "report": prepared.report.to_dict(),
            "queued_rows": prepared.runnable,
            "started": False,
        }
        if start:
            services.runner.start(prepared)
            services.queue.submit(prepared.batch_id)
            answer["started"] = True
        return answer

    @router.post("/batches", summary="Submit a batch: template + rows as JSON")
    async def submit_batch(request: Request, caller: Any = user) -> Any:
        check_length(request)
        body = await request.json()
        if not isinstance(body, dict) or "template" not in body:
            raise BatchError("the body needs 'template' and 'rows'")
        sheet = sheet_from_records(body.get("rows", []))
        prepared = await asyncio.to_thread(_prepare, body["template"], sheet, body, caller)
        return _submit(prepared, bool(body.get("start", True)))

    @router.post("/batches/upload", summary="Submit a batch: template + an uploaded CSV/XLSX sheet")
    async def submit_batch_upload(
        request: Request,
        template: str = Form(...),
        sheet: UploadFile = File(...),
        sheet_name: str | None = Form(None),
        batch_seed: str | None = Form(None),
        on_invalid: str = Form("skip"),
        start: bool = Form(True),
        caller: Any = user,
    ) -> Any:
        check_length(request)
        data = await read_upload(sheet)
        parsed = await asyncio.to_thread(read_sheet, data, sheet.filename or "upload", sheet_name)
        body = {"batch_seed": batch_seed, "on_invalid": on_invalid}
        prepared = await asyncio.to_thread(_prepare, template, parsed, body, caller)
        return _submit(prepared, start)

    @router.get("/batches", summary="Recent batches")
    def list_batches(limit: int = 50, caller: Any = user) -> Any:
        return services.ledger.list_batches(limit=limit)

    @router.get("/batches/{batch_id}", summary="A batch's status and per-row results")
    def get_batch(batch_id: str, caller: Any = user) -> Any:
        return batch_status(services, batch_id)

    @router.post("/batches/{batch_id}/cancel")
    def cancel_batch(batch_id: str, caller: Any = user) -> Any:
        batch_status(services, batch_id, with_rows=False)
        services.queue.cancel(batch_id)
        return {"batch_id": batch_id, "cancelled": True}

    @router.post("/batches/{batch_id}/resume", summary="Run the rows of a batch that are not done")
    def resume_batch(batch_id: str, caller: Any = user) -> Any:
        batch_status(services, batch_id, with_rows=False)
        progress = services.queue.submit(batch_id)
        return {"batch_id": batch_id, "state": progress.state}

    @router.get("/batches/{batch_id}/zip", summary="Download the batch as a zip with manifests")
    def download_zip(batch_id: str, caller: Any = user) -> Any:
        batch_status(services, batch_id, with_rows=False)
        headers = {"Content-Disposition": f'attachment; filename="{batch_id}.zip"'}
        return StreamingResponse(services.runner.zip_stream(batch_id), media_type="application/zip", headers=headers)

    @router.post("/generate", summary="One image from a template and field values (waits for it)")
    async def generate(request: Request, caller: Any = user) -> Any:
        body = await request.json()
        if not isinstance(body, dict) or "template" not in body:
            raise BatchError("the body needs 'template' and 'values'")
        sheet = sheet_from_records([body.get("values") or {}], name="generate.json")
        prepared = await asyncio.to_thread(_prepare, body["template"], sheet, {"on_invalid": "stop", **body}, caller)
        services.runner.start(prepared)
        services.queue.submit(prepared.batch_id)
        timeout = float(body.get("timeout_s", services.settings.row_timeout_s))
        await asyncio.to_thread(services.queue.wait, prepared.batch_id, timeout)
        rows = services.ledger.rows(prepared.batch_id)
        return {"batch_id": prepared.batch_id, "generation": _public_row(rows[0]) if rows else None}

    @router.get("/generations", summary="Search the ledger")
    def search(
        q: str | None = None,
        batch: str | None = None,
        status: str | None = None,
        date_from: str | None = None,
        date_to: str | None = None,
        limit: int = 50,
        offset: int = 0,
        caller: Any = user,
    ) -> Any:
        found = services.ledger.search(
            text=q, batch_id=batch, status=status, date_from=date_from, date_to=date_to, limit=limit, offset=offset
        )
        return [_public_row(r) for r in found]

    @router.get("/generations/{row_key}")
    def get_generation(row_key: str, caller: Any = user) -> Any:
        row = services.ledger.get_generation(row_key)
        if row is None:
            raise BatchError(f"generation {row_key!r} not found")
        return row

    @router.get("/generations/{row_key}/image")
    def get_image(row_key: str, caller: Any = user) -> Any:
        row = services.ledger.get_generation(row_key)
        if row is None or not row.get("image_path"):
            raise AccessDenied("no such image", status=404, reason="not_found")
        path = Path(row["image_path"])
        safe = resolve_inside(services.settings.outputs_path, str(path.parent.name), path.name)
        return FileResponse(safe, media_type="image/png")

    @router.get("/system", summary="Model in use, device, memory, queue, versions")
    def system(caller: Any = user) -> Any:
        return {
            **services.engine.system_info(),
            "default_checkpoint": services.runner.default_checkpoint,
            "queue": services.queue.queued(),
        }

    @router.post("/system/model", summary="Switch the default checkpoint (admin)")
    async def switch_model(request: Request, caller: Any = admin_models) -> Any:
        body = await request.json()
        name = str(body.get("checkpoint", ""))
        await asyncio.to_thread(services.runner.switch_checkpoint, name)
        return {"default_checkpoint": services.runner.default_checkpoint}

    @router.get("/healthz", include_in_schema=False)
    def healthz() -> Any:
        return {"ok": True, "time": time.time()}

    _ = metrics
    return router


__all__ = ["api_router", "install_error_handlers", "sheet_from_records", "error_status", "batch_status"]
