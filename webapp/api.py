"""The JSON API for teams that wire the product into their own systems (OpenAPI at /openapi.json).

Thin: every route calls the library (engine.services.Services) and library errors become HTTP answers in
one place (:func:`install_error_handlers`): ``{"error": {"type", "message", "details"}}`` with the status
of :func:`error_status`.

    POST /api/token                          user name + password -> bearer token (when users and a key exist;
                                             ``ttl`` up to the max_token_ttl setting)
    POST /api/token/revoke                   refuse one token from now on, or every token of a user (admin)
    GET  /api/templates[/{name}]             templates with their field schemas
    POST /api/templates                      add or replace a template (admin; multipart upload)
    POST /api/batches                        template + rows as JSON -> batch id and validation report
    POST /api/batches/upload                 template + CSV/XLSX sheet (+ optional photos zip) (multipart)
    GET  /api/batches[/{id}]                 recent batches; one batch's counts, progress and a page of rows
    POST /api/batches/{id}/cancel|resume     stop between steps (says what happened); run the rows not done
    GET  /api/batches/{id}/zip               images + manifests, streamed
    POST /api/generate                       one image from a template, waits for it
    GET  /api/generations[/{key}[/image]]    search the ledger; one generation; its PNG
    GET  /api/system, POST /api/system/model model, device, queue; switch the default checkpoint (admin)

The routes that make a batch (``POST /api/batches``, ``/api/batches/upload``, ``/api/generate``) take an
``Idempotency-Key`` header: a retry gets the first answer, not a second batch (:mod:`engine.idempotency`).
Seeds go to 2^64-1, so every seed in an answer comes with its exact decimal string (``seed_str``, ...).
"""

# No postponed annotations here: FastAPI reads the route signatures (Request, UploadFile) at runtime.
import asyncio
import difflib
import hashlib
import json
import math
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from engine.batch import new_batch_id
from engine.errors import (
    AccessDenied,
    BadQuery,
    BatchError,
    BatchExists,
    BatchMismatch,
    EngineError,
    ExecutionError,
    IdempotencyKeyInUse,
    IdempotencyKeyReused,
    ModelNotFound,
    RequestInvalid,
    SheetError,
    StoreError,
    TemplateError,
    WorkflowInvalid,
)
from engine.idempotency import IDEMPOTENCY_HEADER, IDEMPOTENCY_TTL_S, check_idempotency_key, request_fingerprint
from engine.sheets import Sheet, read_sheet, sheet_from_records
from engine.store import check_batch_id
from engine.templates import TEMPLATE_FILE, WORKFLOW_FILE
from webapp import handlers
from webapp.auth import ADMIN, parse_ttl
from webapp.files import file_response, file_url, resolve_inside
from webapp.guard import ApiGuard, RateLimited, fastapi_dependency
from webapp.ratelimit import UploadLimit

# HTTP status per library error type; the first match in the class's MRO wins (AccessDenied carries its own).
STATUS_BY_ERROR: dict[type[EngineError], int] = {
    IdempotencyKeyReused: 422,  # as draft-ietf-httpapi-idempotency-key-header says
    IdempotencyKeyInUse: 409,
    WorkflowInvalid: 400,
    TemplateError: 400,
    SheetError: 400,
    RequestInvalid: 400,
    BatchMismatch: 409,
    BatchExists: 409,
    BatchError: 400,
    ModelNotFound: 404,
    ExecutionError: 500,
    BadQuery: 400,
    StoreError: 500,
}
ON_INVALID = ("skip", "stop")
REPLAYED_HEADER = "Idempotent-Replayed"
IDEMPOTENCY_HELP = (
    "Optional: a key of yours for this request (a UUID is usual; at most 255 printable ASCII characters), so "
    "that retrying it never makes a second batch: the same key with the same request answers the first "
    f"answer again (with {REPLAYED_HEADER}: true), with another request 422 (idempotency_key_reused), while "
    f"the first is still being answered 409 (idempotency_key_in_use). Keys are per user and kept "
    f"{IDEMPOTENCY_TTL_S // 3600} h; a refused request keeps nothing, so its retry runs again."
)
KEYED_ROUTES = {("/api/batches", "post"), ("/api/batches/upload", "post"), ("/api/generate", "post")}


def error_status(exc: EngineError) -> int:
    """The HTTP status a library error is answered with (400 for an error type not listed)."""
    if isinstance(exc, AccessDenied):
        return exc.status
    for cls in type(exc).__mro__:
        if cls in STATUS_BY_ERROR:
            return STATUS_BY_ERROR[cls]
    return 400


def request_invalid(errors: list[dict[str, Any]]) -> RequestInvalid:
    """FastAPI's request validation errors (a missing form field, ``?limit=abc``) as one library error
    naming each field, so a client parses one error shape whatever refused its request."""
    problems = []
    for error in errors:
        where = [str(part) for part in error.get("loc", ())]
        location = where[0] if where else "body"
        field = ".".join(where[1:]) or location
        problems.append({"field": field, "location": location, "message": str(error.get("msg", "invalid"))})
    listed = "; ".join(f"{p['location']} field '{p['field']}': {p['message']}" for p in problems[:10])
    return RequestInvalid(f"the request is invalid: {listed or 'unreadable'}", problems)


def install_error_handlers(app: Any) -> None:
    """Library errors -> JSON answers: ``{"error": {type, message, details[, code]}}`` with the right status.

    401s carry ``WWW-Authenticate: Bearer``; 429s carry ``Retry-After`` and the rate-limit headers, as does
    any refusal whose details say when to try again (``retry_after_s``: an Idempotency-Key still in use).
    FastAPI's own refusals of a request's shape (its 422 ``{"detail": [...]}``) are answered the same way,
    as :class:`RequestInvalid` (400).
    """
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse

    async def handle(request: Any, exc: EngineError) -> Any:
        status = error_status(exc)
        headers: dict[str, str] = {}
        if isinstance(exc, RateLimited):
            headers.update(exc.headers)
        if status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        if "retry_after_s" in exc.details and "Retry-After" not in headers:  # a key in use, say
            headers["Retry-After"] = str(max(1, math.ceil(float(exc.details["retry_after_s"]))))
        if status == 405 and exc.details.get("allow"):
            headers["Allow"] = ", ".join(exc.details["allow"])
        body = json.loads(json.dumps({"error": exc.to_dict()}, default=str))
        return JSONResponse(body, status_code=status, headers=headers)

    async def handle_request_shape(request: Any, exc: RequestValidationError) -> Any:
        return await handle(request, request_invalid(list(exc.errors())))

    app.add_exception_handler(EngineError, handle)
    app.add_exception_handler(RequestValidationError, handle_request_shape)


def answer_unknown_api_paths(app: Any) -> None:
    """Paths under ``/api`` that no route serves get the API's error shape, not the ``{"detail": ...}`` of
    whatever app is mounted below: 405 with ``Allow`` when the path exists for other methods, else 404.

    Add it after every ``/api`` route (the JSON API, the ComfyUI routes under ``/api``) and before Gradio
    is mounted at ``/``: a route added later would never be reached.
    """
    from fastapi import Request
    from starlette.routing import Match, Mount

    methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]

    def serves(route: Any, scope: dict[str, Any], method: str) -> bool:
        if isinstance(route, Mount) or getattr(route, "endpoint", None) is unknown_api_path:
            return False  # Gradio's mount answers every path; this route answers every /api path
        return route.matches({**scope, "method": method})[0] == Match.FULL

    @app.api_route("/api/{path:path}", methods=methods, include_in_schema=False)
    def unknown_api_path(path: str, request: Request) -> Any:
        scope = {key: request.scope[key] for key in ("type", "path", "root_path", "headers") if key in request.scope}
        allowed = [method for method in methods if any(serves(route, scope, method) for route in app.router.routes)]
        if allowed:
            raise AccessDenied(f"{request.method} is not allowed on {request.url.path}; use {', '.join(allowed)}",
                               status=405, reason="method_not_allowed", allow=allowed)
        raise not_found(f"no API route {request.url.path}; the routes are listed at /openapi.json",
                        path=request.url.path)


def not_found(message: str, **details: Any) -> AccessDenied:
    return AccessDenied(message, status=404, reason="not_found", **details)


def refuse_unknown_fields(given: Iterable[str], known: tuple[str, ...], location: str) -> None:
    """RequestInvalid naming each field of ``given`` not among ``known``, with the known name it likely
    means (``batchId`` -> ``batch_id``, as a JavaScript client writes it)."""
    problems = []
    for name in dict.fromkeys(str(n) for n in given):
        if name in known:
            continue
        snake = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower()
        guess = snake if snake in known else next(iter(difflib.get_close_matches(name, known, 1)), None)
        hint = f"did you mean '{guess}'?" if guess else f"the fields are {', '.join(known)}"
        problems.append({"field": name[:80], "location": location, "message": f"unknown field; {hint}"})
    if problems:
        listed = "; ".join(f"'{p['field']}': {p['message']}" for p in problems[:10])
        raise RequestInvalid(f"the request has fields this route does not read: {listed}", problems)


def body_fields(schema: dict[str, Any]) -> tuple[str, ...]:
    """The fields of a :func:`json_body_schema`."""
    return tuple(schema["requestBody"]["content"]["application/json"]["schema"]["properties"])


def json_body_schema(properties: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    """``openapi_extra`` for a route that reads its JSON body itself (:func:`api_router`'s ``json_body``):
    FastAPI cannot see that body, so the schema would show none."""
    schema = {"type": "object", "properties": properties, "required": list(required)}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


SEED_SCHEMA = {"oneOf": [{"type": "integer"}, {"type": "string", "pattern": "^[0-9]+$"}],
               "description": "0 to 2^64-1; past 2^53 send it as a string (a number there has been rounded)"}
BATCH_BODY = json_body_schema({
    "template": {"type": "string", "description": "a template name (GET /api/templates)"},
    "rows": {"type": "array", "minItems": 1, "items": {"type": "object", "additionalProperties": {
                 "type": ["string", "number", "boolean", "null"]}},
             "description": "one object per image, keys named like the template's fields; the first is row 2. "
                            "Send seeds as strings: a number past 2^53 has been rounded"},
    "batch_id": {"type": "string", "description": "your own id; posting it again resumes that batch"},
    "batch_seed": SEED_SCHEMA,
    "on_invalid": {"type": "string", "enum": ["skip", "stop"], "default": "skip"},
    "report": {"type": "string", "enum": ["rows", "problems"], "default": "rows",
               "description": "problems: the answer's report lists only the rows with problems, a few KB where "
                              "every row of a 10,000-row batch is MBs; report.row_counts counts them all"},
    "start": {"type": "boolean", "default": True,
              "description": "false: only check the rows (nothing is recorded, not even the batch_id answered)"},
}, required=("template", "rows"))
GENERATE_BODY = json_body_schema({
    "template": {"type": "string"},
    "values": {"type": "object", "description": "field values of the one image"},
    "batch_seed": SEED_SCHEMA,
    "timeout_s": {"type": "number", "exclusiveMinimum": 0,
                  "description": "how long to wait for the image (default: the row timeout, 600 s unless "
                                 "configured); keep it under your HTTP client's and proxy's own limits (Node's "
                                 "fetch gives up waiting for an answer after 300 s, nginx after 60 s). Past it the "
                                 "answer comes with the row still queued or running: poll GET /api/batches/{id}"},
}, required=("template",))
TOKEN_BODY = json_body_schema({
    "username": {"type": "string"}, "password": {"type": "string", "format": "password"},
    "ttl": {"type": "string", "description": "lifetime, e.g. 30m, 24h, 7d (at most max_token_ttl)"},
}, required=("username", "password"))
REVOKE_BODY = json_body_schema({
    "token": {"type": "string", "description": "the token to refuse"},
    "user": {"type": "string", "description": "or: refuse every token of this user issued so far"},
})
MODEL_BODY = json_body_schema({"checkpoint": {"type": "string"}}, required=("checkpoint",))
UPLOAD_FIELDS = ("template", "sheet", "sheet_name", "batch_seed", "batch_id", "on_invalid", "report", "start",
                 "images")
REPORT_KINDS = ("rows", "problems")  # what a submission's answer lists of its rows
ERROR_SCHEMA = {
    "type": "object", "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["type", "message", "details"], "properties": {
        "type": {"type": "string", "description": "the library error, e.g. SheetError, RequestInvalid, AccessDenied"},
        "message": {"type": "string"},
        "details": {"type": "object", "description": "row, column, field, reason, problems... as the error has them"},
        "code": {"type": "string", "description": "for the refusals met most, a stable code whose values are in "
                                                  "details (engine.errors.ERROR_CODES), e.g. template_not_found"},
    }}},
}
# ComfyUI's own refusal of a prompt (POST /prompt answers it with a 400, as ComfyUI does)
COMFY_ERROR_SCHEMA = {
    "type": "object", "required": ["error", "node_errors"],
    "properties": {
        "error": {"type": "object", "properties": {
            "type": {"type": "string"}, "message": {"type": "string"}, "details": {"type": "string"},
            "extra_info": {"type": "object"}}},
        "node_errors": {"type": "object", "description": "per node id: its errors, dependent_outputs, class_type"},
    },
}
COMFY_TAG = "ComfyUI-compatible"
OPEN_ROUTES = {"/api/token"}  # the API routes that take no bearer token

# Answers: what a client reads. Seeds go to 2^64-1, past the 2^53 a JSON reader such as JavaScript's
# JSON.parse keeps exactly, so each seed number has an exact decimal-string twin (Twitter's id / id_str).
_TEXT_OF_WHOLE_NUMBERS = {"type": "object", "additionalProperties": {"type": "string", "pattern": "^-?[0-9]+$"}}


def _exact_twin(of: str) -> dict[str, Any]:
    return {"type": ["string", "null"], "pattern": "^[0-9]+$",
            "description": f"{of} as a decimal string: exact where a JSON reader rounds numbers past 2^53 "
                           "(JavaScript's JSON.parse does)"}


ANSWER_SCHEMAS: dict[str, dict[str, Any]] = {
    "Problem": {"type": "object", "properties": {
        "row": {"type": "integer"}, "column": {"type": ["string", "null"]}, "reason": {"type": "string"},
        "code": {"type": ["string", "null"], "description": "engine.sheets.PROBLEM_CODES, or workflow_invalid"},
        "params": {"type": "object", "description": "the values the reason names, to word it in another language"},
        "params_str": {**_TEXT_OF_WHOLE_NUMBERS, "description": "the whole numbers of params as exact strings"},
    }},
    "ValidationReport": {"type": "object", "properties": {
        "ok": {"type": "boolean"},
        "missing_columns": {"type": "array", "items": {"type": "string"}},
        "unknown_columns": {"type": "array", "items": {"type": "string"}},
        "column_map": {"type": "object", "additionalProperties": {"type": "string"}},
        "notes": {"type": "array", "items": {"type": "string"}},
        "rows": {"type": "array", "items": {"type": "object", "properties": {
            "row": {"type": "integer", "description": "the spreadsheet row: the first data row is 2"},
            "ok": {"type": "boolean"},
            "problems": {"type": "array", "items": {"$ref": "#/components/schemas/Problem"}},
            "values": {"type": "object", "description": "the row's values by field, typed (a seed is a number)"},
            "values_str": {**_TEXT_OF_WHOLE_NUMBERS,
                           "description": "the whole numbers of values (seeds among them) as exact strings"},
        }}, "description": "every row, or only those with problems where the request asked report=problems"},
        "row_counts": {"type": "object", "description": "every row of the sheet, whichever rows are listed",
                       "properties": {"total": {"type": "integer"}, "ok": {"type": "integer"},
                                      "with_problems": {"type": "integer"}}},
    }},
    "BatchSubmitted": {"type": "object", "required": ["batch_id", "resumed", "report", "queued_rows", "started"],
                       "properties": {
        "batch_id": {"type": "string", "description": "with start false nothing is recorded under it"},
        "resumed": {"type": "boolean", "description": "the batch_id was known: its rows not done run again"},
        "report": {"$ref": "#/components/schemas/ValidationReport"},
        "queued_rows": {"type": "integer"},
        "started": {"type": "boolean"},
    }},
    "Batch": {"type": "object", "properties": {
        "id": {"type": "string"}, "template_name": {"type": "string"}, "user": {"type": ["string", "null"]},
        "status": {"type": "string", "enum": ["created", "running", "finished", "cancelled", "failed"]},
        "batch_seed": {"type": "integer", "description": "0 to 2^64-1; read batch_seed_str for the exact value"},
        "batch_seed_str": _exact_twin("batch_seed"),
        "created_at": {"type": "string", "format": "date-time"},
        "started_at": {"type": ["string", "null"], "format": "date-time"},
        "finished_at": {"type": ["string", "null"], "format": "date-time"},
        "row_count": {"type": "integer"}, "done_count": {"type": "integer"},
    }},
    "Generation": {"type": "object", "properties": {
        "row_key": {"type": "string", "description": "<batch_id>:<row_number>"},
        "batch_id": {"type": "string"}, "row_number": {"type": "integer"},
        "status": {"type": "string",
                   "enum": ["queued", "running", "done", "failed", "timed_out", "skipped", "cancelled"]},
        "seed": {"type": ["integer", "null"], "description": "0 to 2^64-1; read seed_str for the exact value"},
        "seed_str": _exact_twin("seed"),
        "row_values": {"type": "object", "description": "the row's cells and typed values by field"},
        "row_values_str": {**_TEXT_OF_WHOLE_NUMBERS,
                           "description": "the whole numbers of row_values (seeds among them) as exact strings"},
        "prompt": {"type": ["string", "null"]}, "error": {"type": ["string", "null"]},
        "image_url": {"type": "string", "description": "the PNG, with the same bearer token (done rows only)"},
    }},
    "BatchStatus": {"type": "object", "properties": {
        "batch": {"$ref": "#/components/schemas/Batch"},
        "counts": {"type": "object", "additionalProperties": {"type": "integer"}},
        "progress": {"type": ["object", "null"], "description": "live progress while this process knows the batch"},
        "rows": {"type": "array", "items": {"$ref": "#/components/schemas/Generation"},
                 "description": "one page of the rows, in row order (rows_page)"},
        "rows_page": {"type": "object", "properties": {
            "offset": {"type": "integer"}, "limit": {"type": "integer"},
            "total": {"type": "integer", "description": "rows there are (of the status asked for)"},
            "next_offset": {"type": ["integer", "null"], "description": "offset of the next page; null: none"}}},
    }},
    "Generated": {"type": "object", "properties": {
        "batch_id": {"type": "string"}, "state": {"type": ["string", "null"]},
        "generation": {"anyOf": [{"$ref": "#/components/schemas/Generation"}, {"type": "null"}]},
    }},
}
_BINARY = {"schema": {"type": "string", "format": "binary"}}
# (path, method) -> the media types of a 200 answer that is a file, not JSON
FILE_ANSWERS: dict[tuple[str, str], tuple[str, ...]] = {
    ("/api/batches/{batch_id}/zip", "get"): ("application/zip",),
    ("/api/generations/{row_key}/image", "get"): ("image/png",),
    ("/files/zip/{batch_id}", "get"): ("application/zip",),
    ("/files/{relative}", "get"): ("image/png",),
    ("/view", "get"): ("image/png", "image/jpeg", "image/webp"),
}
# (path, method) -> the schema of its 200 answer
ANSWERS: dict[tuple[str, str], dict[str, Any]] = {
    ("/api/batches", "post"): {"$ref": "#/components/schemas/BatchSubmitted"},
    ("/api/batches/upload", "post"): {"$ref": "#/components/schemas/BatchSubmitted"},
    ("/api/batches", "get"): {"type": "array", "items": {"$ref": "#/components/schemas/Batch"}},
    ("/api/batches/{batch_id}", "get"): {"$ref": "#/components/schemas/BatchStatus"},
    ("/api/generate", "post"): {"$ref": "#/components/schemas/Generated"},
    ("/api/generations", "get"): {"type": "array", "items": {"$ref": "#/components/schemas/Generation"}},
    ("/api/generations/{row_key}", "get"): {"$ref": "#/components/schemas/Generation"},
}


def describe_api_errors(schema: dict[str, Any], auth_required: bool) -> dict[str, Any]:
    """The OpenAPI schema as the API really answers: the answers of :data:`ANSWERS`, files as their media
    types (:data:`FILE_ANSWERS`), refusals in :data:`ERROR_SCHEMA` (400 where FastAPI would write its 422,
    which :func:`install_error_handlers` never sends; ComfyUI's own shape for a refused prompt), and with
    auth configured the bearer token the ``/api`` and ComfyUI routes ask for. Changes ``schema`` in place
    and returns it."""
    components = schema.setdefault("components", {})
    components.setdefault("schemas", {})["Error"] = ERROR_SCHEMA
    components["schemas"].update(ANSWER_SCHEMAS)
    for (path, method), answer in ANSWERS.items():
        operation = schema.get("paths", {}).get(path, {}).get(method)
        if operation is not None:
            operation.setdefault("responses", {})["200"] = {
                "description": "Successful Response", "content": {"application/json": {"schema": answer}}}
    for (path, method), media_types in FILE_ANSWERS.items():
        operation = schema.get("paths", {}).get(path, {}).get(method)
        if operation is not None:
            operation.setdefault("responses", {})["200"] = {
                "description": "the file", "content": {media_type: _BINARY for media_type in media_types}}
    for unused in ("HTTPValidationError", "ValidationError"):
        components["schemas"].pop(unused, None)
    components["schemas"]["ComfyError"] = COMFY_ERROR_SCHEMA
    refusal = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    if auth_required:
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}}
    for path, operations in schema.get("paths", {}).items():
        for method, operation in operations.items():
            responses = operation.setdefault("responses", {})
            api = path.startswith("/api/")
            comfy = COMFY_TAG in operation.get("tags", ())
            if responses.pop("422", None) is not None or api:
                responses["400"] = {"description": "refused: the request or its rows (details name them)", **refusal}
            if (path, method) == ("/prompt", "post"):
                responses["400"] = {"description": "the prompt is refused, in ComfyUI's own shape", "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/ComfyError"}}}}
            if api:
                responses["404"] = {"description": "no such route, batch, generation or template", **refusal}
            if api or comfy:
                responses["429"] = {"description": "rate limited; Retry-After says when to try again", **refusal}
            if method == "post" and (api or comfy):
                responses["413"] = {"description": "the body is over the upload limit (max_upload_mb)", **refusal}
            if (path, method) in KEYED_ROUTES:
                responses["200"].setdefault("headers", {})[REPLAYED_HEADER] = {
                    "description": "true: the answer to an earlier request with this Idempotency-Key",
                    "schema": {"type": "string", "enum": ["true"]}}
                responses["409"] = {"description": "the request of this Idempotency-Key is still being answered "
                                                   "(code idempotency_key_in_use); or, with batch_id, the batch "
                                                   "was made from other inputs", **refusal}
                responses["422"] = {"description": "this Idempotency-Key came before with another request "
                                                   "(code idempotency_key_reused)", **refusal}
            if auth_required and (api or comfy) and path not in OPEN_ROUTES:
                operation["security"] = [{"bearer": []}]
                responses["401"] = {"description": "no token, or a bad, expired or revoked one", **refusal}
                responses["403"] = {"description": "not allowed: admin only, or not the batch's owner", **refusal}
    return schema


def _wait_seconds(value: Any, default: float) -> float:
    """``timeout_s`` of ``/api/generate``: a positive number of seconds (``default`` when absent)."""
    if value in (None, ""):
        return default
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = math.nan
    if isinstance(value, bool) or not math.isfinite(seconds) or seconds <= 0:
        raise BatchError(f"timeout_s must be a positive number of seconds, not {str(value)[:40]!r}", field="timeout_s")
    return seconds


ROWS_PAGE_MAX = 1000  # rows of a batch in one answer: 10,000 rows with their values were 12 MB


def batch_status(
    services: Any, batch_id: str, with_rows: bool = True, *, offset: int = 0, limit: int = ROWS_PAGE_MAX,
    status: str | None = None,
) -> dict[str, Any]:
    """A batch's ledger record, counts, live progress and (optionally) one page of its rows (``limit``
    rows from ``offset``, at most :data:`ROWS_PAGE_MAX`; only those of ``status`` when given) with
    ``rows_page`` saying where the next page starts; 404 when unknown."""
    batch = services.ledger.get_batch(batch_id)
    if batch is None:
        raise not_found(f"no batch {batch_id!r}", batch_id=batch_id, code="batch_not_found")
    summary = services.runner.summary(batch_id)
    progress = services.queue.status(batch_id)
    body: dict[str, Any] = {
        "batch": public_batch(batch),
        "counts": {
            "done": summary.done,
            "failed": summary.failed,
            "timed_out": summary.timed_out,
            "skipped": summary.skipped,
            "not_run": summary.cancelled,
            "running": summary.running,  # claimed by a process (this one, another, or one that died)
            "total": summary.total,
        },
        "progress": public_progress(services, progress),
    }
    if with_rows:
        limit, offset = min(max(int(limit), 1), ROWS_PAGE_MAX), max(int(offset), 0)
        wanted = _row_status(status)
        total = summary.total if wanted is None else services.ledger.row_counts(batch_id)[wanted]
        rows = services.ledger.rows(batch_id, wanted, limit=limit, offset=offset)
        body["rows"] = [public_row(row) for row in rows]
        following = offset + len(rows)
        body["rows_page"] = {"offset": offset, "limit": limit, "total": total,
                             "next_offset": following if following < total else None}
    return body


def _row_status(status: str | None) -> str | None:
    """The ledger status a ``?status=`` names (None: every row); BadQuery naming the statuses otherwise."""
    from engine.store import ROW_STATUSES

    if status in (None, ""):
        return None
    if status not in ROW_STATUSES:
        raise BadQuery(f"unknown row status {status[:40]!r}; the statuses are {', '.join(ROW_STATUSES)}",
                       field="status", allowed=list(ROW_STATUSES))
    return status


def public_progress(services: Any, progress: Any) -> dict[str, Any] | None:
    """A batch's live progress as the API shows it: recent images as ``/files`` URLs, not server paths."""
    if progress is None:
        return None
    body = asdict(progress)
    outputs = services.settings.outputs_path
    urls = []
    for path in progress.recent_images:
        try:
            urls.append(file_url(outputs, path))
        except ValueError:  # not under the outputs folder: nothing a client could fetch
            continue
    body["recent_images"] = urls
    return body


def whole_numbers_as_text(values: Any) -> dict[str, str]:
    """The whole numbers of a map of field values as decimal strings (``{"seed": 18446744073709551615,
    "steps": 4}`` -> ``{"seed": "18446744073709551615", "steps": "4"}``): JavaScript's ``JSON.parse`` reads
    an integer exactly only up to 2^53, and seeds go to 2^64-1."""
    if not isinstance(values, dict):
        return {}
    return {key: str(value) for key, value in values.items() if isinstance(value, int) and not isinstance(value, bool)}


def _with_text(data: dict[str, Any], key: str) -> dict[str, Any]:
    """``data`` with ``<key>_str`` (the number as a decimal string, or None) right after ``key``: the
    id/id_str pair of APIs whose numbers outgrow what JSON readers keep exactly."""
    out: dict[str, Any] = {}
    for name, value in data.items():
        out[name] = value
        if name == key:
            out[f"{key}_str"] = None if value is None else str(value)
    return out


def public_batch(batch: dict[str, Any]) -> dict[str, Any]:
    """A ledger batch as the API shows it: ``batch_seed`` also as the exact ``batch_seed_str``."""
    return _with_text(batch, "batch_seed")


def public_problem(problem: dict[str, Any]) -> dict[str, Any]:
    """A row problem (a ``RowProblem`` as a dict) as the API shows it: ``params`` also as ``params_str``."""
    return {**problem, "params_str": whole_numbers_as_text(problem.get("params"))}


def public_report(report: dict[str, Any], only_problems: bool = False) -> dict[str, Any]:
    """A validation report (``ValidationReport.to_dict``) as the API shows it: each row's ``values`` and
    each problem's ``params`` also as ``values_str`` / ``params_str``, their whole numbers as text, and
    ``row_counts`` of every row. ``only_problems``: the rows with problems alone."""
    rows = []
    every = report.get("rows", [])
    for row in every:
        if only_problems and row.get("ok"):
            continue
        problems = [public_problem(p) for p in row.get("problems", [])]
        rows.append({**row, "problems": problems, "values_str": whole_numbers_as_text(row.get("values"))})
    ok = sum(1 for row in every if row.get("ok"))
    counts = {"total": len(every), "ok": ok, "with_problems": len(every) - ok}
    return {**report, "rows": rows, "row_counts": counts}


def public_row(row: Any) -> dict[str, Any]:
    """A ledger generation as the API shows it: no rendered workflow, file paths replaced by a URL, the seed
    also as the exact ``seed_str`` and the row's whole-number values as ``row_values_str``."""
    data = row.to_dict() if hasattr(row, "to_dict") else dict(row)
    hidden = {"workflow", "image_path", "images", "id", "image_bytes"}
    out = _with_text({k: v for k, v in data.items() if k not in hidden}, "seed")
    out["row_values_str"] = whole_numbers_as_text(data.get("row_values"))
    if data.get("image_path"):
        out["image_url"] = f"/api/generations/{data['row_key']}/image"
    return out


def api_router(services: Any, guard: ApiGuard, upload_limit: UploadLimit) -> Any:
    """The JSON API as a FastAPI router under ``/api``.

    ``/api/token`` grants lifetimes up to the ``max_token_ttl`` setting (checked here, so a bad setting
    stops the app at start-up rather than at the first login).
    """
    from fastapi import (
        APIRouter,
        Depends,
        File,
        Form,
        Header,
        Query,
        Request,
        UploadFile,
    )
    from fastapi.responses import JSONResponse, StreamingResponse

    router = APIRouter(prefix="/api", tags=["API"])
    user = Depends(fastapi_dependency(guard))
    idempotency_header = Header(None, alias=IDEMPOTENCY_HEADER, description=IDEMPOTENCY_HELP)
    admin_models = Depends(fastapi_dependency(guard, ADMIN, "switch_model"))
    admin_templates = Depends(fastapi_dependency(guard, ADMIN, "upload_template"))
    admin_tokens = Depends(fastapi_dependency(guard, ADMIN, "revoke_tokens"))
    try:
        max_token_ttl = parse_ttl(services.settings.max_token_ttl)
    except EngineError as exc:
        raise EngineError(f"setting max_token_ttl: {exc.message}", setting="max_token_ttl") from exc
    default_token_ttl = min(parse_ttl("24h"), max_token_ttl)

    async def json_body(request: Request, schema: dict[str, Any]) -> dict[str, Any]:
        """The request's JSON object; a field ``schema`` (a :func:`json_body_schema`) does not name is
        refused: a misspelt option (``batchId``) would otherwise be ignored without a word."""
        try:
            body = await request.json()
        except ValueError as exc:
            raise RequestInvalid(f"the request body is not JSON: {exc}",
                                 [{"field": "body", "location": "body", "message": "not JSON"}]) from exc
        if not isinstance(body, dict):
            raise RequestInvalid("the request body must be a JSON object",
                                 [{"field": "body", "location": "body", "message": "not a JSON object"}])
        refuse_unknown_fields(body, body_fields(schema), "body")
        return body

    async def read_upload(upload: UploadFile) -> bytes:
        """An uploaded file's bytes, never more than one chunk past the upload limit."""
        chunks = []
        total = 0
        while chunk := await upload.read(1024 * 1024):
            total += len(chunk)
            if total > upload_limit.max_bytes:
                raise upload_limit.too_large(total, declared=False)
            chunks.append(chunk)
        return b"".join(chunks)

    def prepare(template: str, sheet: Sheet, body: dict[str, Any], caller: Any, images: Any = None) -> Any:
        """Validate and render every row; ``on_invalid="stop"`` refuses the batch naming each bad cell.

        ``images``: the product photos (ImageLibrary) uploaded with the sheet."""
        on_invalid = body.get("on_invalid") or "skip"
        if on_invalid not in ON_INVALID:
            raise BatchError(f"on_invalid must be one of {', '.join(ON_INVALID)}, not {on_invalid!r}")
        if (body.get("report") or "rows") not in REPORT_KINDS:
            raise RequestInvalid(f"report must be one of {', '.join(REPORT_KINDS)}, not {str(body['report'])[:40]!r}",
                                 [{"field": "report", "location": "body", "message": "not one of "
                                   + ", ".join(REPORT_KINDS)}])
        batch_seed = handlers.parse_seed(body.get("batch_seed"))
        batch_id = body.get("batch_id")
        if batch_id not in (None, "") and services.ledger.get_batch(str(batch_id)) is not None:
            handlers.check_may_control(services, caller, str(batch_id))  # resuming is controlling the batch
        prepared = services.runner.prepare(
            template,
            sheet,
            batch_seed=batch_seed,
            on_invalid="skip",
            user=caller.name,
            batch_id=check_batch_id(batch_id) if batch_id not in (None, "") else None,
            images=images,
        )
        problems = prepared.report.problems
        if on_invalid == "stop" and problems:
            described = "; ".join(p.describe() for p in problems[:20])
            raise BatchError(
                f"{len(prepared.report.bad_rows)} row(s) have problems, nothing was queued: {described}",
                problems=[public_problem(asdict(p)) for p in problems],
            )
        return prepared

    def submit(prepared: Any, start: bool, report: str | None = None) -> dict[str, Any]:
        answer: dict[str, Any] = {
            "batch_id": prepared.batch_id,
            "resumed": prepared.resumed,
            "report": public_report(prepared.report.to_dict(), only_problems=report == "problems"),
            "queued_rows": prepared.runnable,
            "started": False,
        }
        if start:
            services.runner.start(prepared)
            if prepared.resumed:  # what the resume will run, not every valid row: the done ones stay done
                answer["queued_rows"] = services.runner.rows_to_run(prepared.batch_id)
            services.queue.submit(prepared.batch_id)
            answer["started"] = True
        return answer

    def prepare_and_submit(
        template: str, sheet: Sheet, body: dict[str, Any], caller: Any, start: bool, images: Any = None,
    ) -> dict[str, Any]:
        """:func:`prepare` then :func:`submit`. Resubmitting a batch id resumes that batch, and so does a
        submission that loses the race to create it: a client retrying a POST whose first answer it did not
        wait for must find one batch, resumed, not a refusal (or a second batch)."""
        prepared = prepare(template, sheet, body, caller, images)
        try:
            return submit(prepared, start, body.get("report"))
        except BatchExists:
            # The id was free when prepare() looked and taken when start() wrote it: prepare again as the
            # resume it now is (owner and inputs checked again: another caller's or other rows are refused).
            return submit(prepare(template, sheet, body, caller, images), start, body.get("report"))

    @router.post("/token", summary="Exchange a user name and password for a bearer token", openapi_extra=TOKEN_BODY)
    async def create_token(request: Request) -> Any:
        guard.admit_address(request.client.host if request.client else "unknown", "POST /api/token")
        body = await json_body(request, TOKEN_BODY)
        if guard.tokens is None or not guard.users.configured:
            raise AccessDenied(
                "token login needs users configured (SD35_USERS or SD35_USERS_FILE)", status=400, reason="not_configured"
            )
        found = await asyncio.to_thread(
            guard.users.authenticate, str(body.get("username", "")), str(body.get("password", ""))
        )
        if found is None:
            raise AccessDenied("wrong user name or password", status=401, reason="bad_credentials")
        ttl = parse_ttl(str(body["ttl"]), maximum=max_token_ttl) if body.get("ttl") else default_token_ttl
        return {"access_token": guard.tokens.create(found, ttl=ttl), "token_type": "bearer", "role": found.role}

    @router.post("/token/revoke", summary="Revoke one token, or every token of a user issued so far (admin)",
                 openapi_extra=REVOKE_BODY)
    async def revoke_token(request: Request, caller: Any = admin_tokens) -> Any:
        body = await json_body(request, REVOKE_BODY)
        if guard.tokens is None or guard.revocations is None:
            raise AccessDenied("tokens need SD35_JWT_SECRET configured", status=400, reason="not_configured")
        if bool(body.get("token")) == bool(body.get("user")):
            raise AccessDenied('give either "token" (the token to refuse) or "user" (all of their tokens)',
                               status=400, reason="bad_request")
        if body.get("user"):
            name = body["user"]
            if not isinstance(name, str):
                raise AccessDenied('"user" must be a user name', status=400, reason="bad_request")
            if guard.users.configured and name not in guard.users:
                raise not_found(f"no user {name[:80]!r}", user=name[:80])
            cutoff = await asyncio.to_thread(guard.revocations.revoke_user, name, caller.name)
            return {"revoked": "user", "user": name, "not_before": cutoff.isoformat()}
        if not isinstance(body["token"], str):
            raise AccessDenied('"token" must be the token text', status=400, reason="bad_request")
        try:  # only a valid token of ours can be revoked; an expired one is refused anyway
            claims = guard.tokens.verify(body["token"])
        except AccessDenied as exc:  # the token given is bad, not the caller's own credentials: no 401
            reason = exc.details.get("reason", "invalid")
            raise AccessDenied(f"cannot revoke that token: {exc.message}", status=400, reason=f"token_{reason}") from exc
        await asyncio.to_thread(guard.revocations.revoke, claims, caller.name)
        return {"revoked": "token", "jti": claims.jti, "user": claims.sub, "expires_at": claims.expires_at.isoformat()}

    @router.get("/templates", summary="Templates with their field schemas")
    def list_templates(caller: Any = user) -> Any:
        return [t.to_dict() for t in services.templates.list()]

    @router.get("/templates/{name}", summary="One template with its field schema")
    def get_template(name: str, caller: Any = user) -> Any:
        if name not in services.templates.names():
            names = services.templates.names()
            raise not_found(f"no template {name!r}; available: {', '.join(names)}", code="template_not_found",
                            template=name, available=names)
        return services.templates.get(name).to_dict()

    @router.post("/templates", summary="Add or replace a template (admin)")
    async def upload_template(
        template_json: UploadFile = File(..., description=TEMPLATE_FILE),
        workflow: UploadFile = File(..., description=WORKFLOW_FILE),
        replace: bool = Form(False),
        caller: Any = admin_templates,
    ) -> Any:
        files = {TEMPLATE_FILE: await read_upload(template_json), WORKFLOW_FILE: await read_upload(workflow)}
        saved = await asyncio.to_thread(services.templates.add, files, replace)
        return saved.to_dict()

    async def once_per_key(
        key_header: str | None, caller: Any, route: str, fields: dict[str, Any], given_batch_id: Any,
        run: Callable[[str | None], dict[str, Any]],
    ) -> Any:
        """``run(batch_id)`` in a thread, once per Idempotency-Key (:mod:`engine.idempotency`): a retry of
        an answered request gets its answer again (``Idempotent-Replayed: true``), and the batch id a keyed
        request makes is reserved with its key first. ``fields``: what the request asks for, as parsed.
        Without the header, ``run(None)``."""
        if key_header is None:
            return await asyncio.to_thread(run, None)
        key = check_idempotency_key(key_header)
        batch_id = check_batch_id(given_batch_id) if given_batch_id not in (None, "") else new_batch_id()
        keyed = await asyncio.to_thread(services.idempotency.begin, caller.name, key,
                                        request_fingerprint(route, fields), batch_id)
        if keyed.answered:
            return JSONResponse(keyed.answer, status_code=keyed.status, headers={REPLAYED_HEADER: "true"})

        def run_keyed() -> dict[str, Any]:
            # Answer or release the key in the thread that runs the request: it ends so even when the
            # request's coroutine is cancelled while the thread goes on making the batch.
            try:
                answer = run(keyed.batch_id)
            except BaseException:
                services.idempotency.abandon(keyed)
                raise
            services.idempotency.finish(keyed, answer)
            return answer

        return await asyncio.to_thread(run_keyed)

    @router.post("/batches", summary="Submit a batch: template + rows as JSON", openapi_extra=BATCH_BODY)
    async def submit_batch(request: Request, idempotency_key: str | None = idempotency_header,
                           caller: Any = user) -> Any:
        body = await json_body(request, BATCH_BODY)
        if "template" not in body or "rows" not in body:
            raise BatchError("the body needs 'template' and 'rows'")
        start = body.get("start", True)
        if not isinstance(start, bool):  # "false" is a non-empty string: truthy, it would start the batch
            raise RequestInvalid(f"start must be true or false (a JSON boolean), not {str(start)[:40]!r}",
                                 [{"field": "start", "location": "body", "message": "not a boolean"}])
        sheet = sheet_from_records(body["rows"], "api.json")

        def run(batch_id: str | None) -> dict[str, Any]:
            fields = body if batch_id is None else {**body, "batch_id": batch_id}
            return prepare_and_submit(str(body["template"]), sheet, fields, caller, start)

        return await once_per_key(idempotency_key, caller, "POST /api/batches", body, body.get("batch_id"), run)

    @router.post("/batches/upload", summary="Submit a batch: template + an uploaded CSV/XLSX sheet")
    async def submit_batch_upload(
        request: Request,
        template: str = Form(...),
        sheet: UploadFile = File(...),
        sheet_name: str | None = Form(None),
        batch_seed: str | None = Form(None),
        batch_id: str | None = Form(None),
        on_invalid: str = Form("skip"),
        report: str = Form("rows", description="problems: the answer lists only the rows with problems"),
        start: bool = Form(True),
        images: UploadFile | None = File(None),
        idempotency_key: str | None = idempotency_header,
        caller: Any = user,
    ) -> Any:
        refuse_unknown_fields((await request.form()).keys(), UPLOAD_FIELDS, "form")
        data = await read_upload(sheet)
        photo_zip = await read_upload(images) if images is not None else None
        fields = {
            "template": template, "sheet": hashlib.sha256(data).hexdigest(), "sheet_file": sheet.filename,
            "sheet_name": sheet_name, "batch_seed": batch_seed, "batch_id": batch_id, "on_invalid": on_invalid,
            **({"report": report} if report != "rows" else {}),  # keys stored before this field still match
            "start": start, "images": None if photo_zip is None else hashlib.sha256(photo_zip).hexdigest(),
        }

        def run(reserved_id: str | None) -> dict[str, Any]:
            parsed = read_sheet(data, sheet.filename or "upload", sheet_name)
            body = {"batch_seed": batch_seed, "on_invalid": on_invalid, "report": report,
                    "batch_id": reserved_id or batch_id}
            # the product photos the sheet's image columns name, as one zip
            photos = services.runner.unpack_photos(photo_zip) if photo_zip is not None else None
            try:
                return prepare_and_submit(template, parsed, body, caller, start, photos)
            finally:
                if photos is not None:  # a started batch has its own copy; otherwise none is kept
                    services.runner.discard_staging(photos)

        return await once_per_key(idempotency_key, caller, "POST /api/batches/upload", fields, batch_id, run)

    @router.get("/batches", summary="Recent batches")
    def list_batches(limit: int = 50, offset: int = Query(0, ge=0), caller: Any = user) -> Any:
        return [public_batch(b) for b in services.ledger.list_batches(limit=min(max(limit, 1), 500), offset=offset)]

    @router.get("/batches/{batch_id}", summary="A batch's status and per-row results")
    def get_batch(
        batch_id: str,
        rows: bool = Query(True, description="false: the batch, counts and progress without its rows (for polling)"),
        offset: int = Query(0, ge=0, description="the first row of the page (rows_page.next_offset of the last one)"),
        limit: int = Query(ROWS_PAGE_MAX, description=f"rows in the page (at most {ROWS_PAGE_MAX}); rows_page says "
                                                      "how many there are and where the next page starts"),
        status: str | None = Query(None, description="only the rows of this status, e.g. failed or skipped"),
        caller: Any = user,
    ) -> Any:
        return batch_status(services, batch_id, with_rows=rows, offset=offset, limit=limit, status=status)

    @router.post("/batches/{batch_id}/cancel", summary="Stop a batch between sampler steps")
    def cancel_batch(batch_id: str, caller: Any = user) -> Any:
        """``state``: ``cancelling`` (running; stops between sampler steps), ``removed_from_queue`` (it had
        not started), or ``not_running`` (nothing to cancel here: finished, interrupted or run elsewhere)."""
        batch_status(services, batch_id, with_rows=False)
        return {"batch_id": batch_id, "state": handlers.cancel_batch(services, caller, batch_id)}

    @router.post("/batches/{batch_id}/resume", summary="Run the rows of a batch that are not done")
    def resume_batch(batch_id: str, caller: Any = user) -> Any:
        batch_status(services, batch_id, with_rows=False)
        handlers.check_may_control(services, caller, batch_id)
        progress = services.queue.submit(batch_id)
        return {"batch_id": batch_id, "state": progress.state}

    @router.get("/batches/{batch_id}/zip", summary="Download the batch as a zip with manifests")
    def download_zip(batch_id: str, caller: Any = user) -> Any:
        batch_status(services, batch_id, with_rows=False)
        headers = {"Content-Disposition": f'attachment; filename="{batch_id}.zip"'}
        return StreamingResponse(services.runner.zip_stream(batch_id), media_type="application/zip", headers=headers)

    @router.post("/generate", summary="One image from a template and field values (waits for it)",
                 openapi_extra=GENERATE_BODY)
    async def generate(request: Request, idempotency_key: str | None = idempotency_header,
                       caller: Any = user) -> Any:
        body = await json_body(request, GENERATE_BODY)
        if "template" not in body:
            raise BatchError("the body needs 'template' and 'values'")
        timeout = _wait_seconds(body.get("timeout_s"), float(services.settings.row_timeout_s))
        values = body.get("values") or {}
        if not isinstance(values, dict):
            raise RequestInvalid("values must be an object of field values (field name: value)",
                                 [{"field": "values", "location": "body", "message": "not a JSON object"}])
        sheet = sheet_from_records([values], "generate.json")

        def run(batch_id: str | None) -> dict[str, Any]:
            options = {"on_invalid": "stop", "batch_seed": body.get("batch_seed"), "batch_id": batch_id}
            prepared = prepare(str(body["template"]), sheet, options, caller)
            submit(prepared, start=True)
            progress = services.queue.wait(prepared.batch_id, timeout)
            rows = services.ledger.rows(prepared.batch_id)
            return {
                "batch_id": prepared.batch_id,
                "state": progress.state if progress is not None else None,
                "generation": public_row(rows[0]) if rows else None,
            }

        return await once_per_key(idempotency_key, caller, "POST /api/generate", body, None, run)

    @router.get("/generations", summary="Search the ledger")
    def search(
        q: str | None = None,
        batch: str | None = None,
        status: str | None = None,
        date_from: str | None = None,
        date_to: str | None = None,
        limit: int = 50,
        offset: int = Query(0, ge=0),  # a negative offset is a client's mistake, not the first page
        caller: Any = user,
    ) -> Any:
        found = services.ledger.search(
            text=q, batch_id=batch, status=status, date_from=date_from, date_to=date_to,
            limit=min(max(limit, 1), 500), offset=offset,
        )
        return [public_row(r) for r in found]

    @router.get("/generations/{row_key}", summary="One generation with its parameters")
    def get_generation(row_key: str, caller: Any = user) -> Any:
        row = services.ledger.get_generation(row_key)
        if row is None:
            raise not_found(f"no generation {row_key!r}", row_key=row_key)
        return public_row(row)

    @router.get("/generations/{row_key}/image", summary="The PNG of a generation")
    def get_image(row_key: str, caller: Any = user) -> Any:
        row = services.ledger.get_generation(row_key)
        if row is None or not row.image_path:
            raise not_found(f"no image for {row_key!r}", row_key=row_key)
        # The ledger's path is trusted only as far as the outputs folder: it is resolved inside it again.
        outputs = Path(services.settings.outputs_path).resolve()
        stored = Path(row.image_path).resolve()
        if outputs not in stored.parents:
            raise AccessDenied("path outside the allowed folder", status=403, reason="bad_path")
        relative = stored.relative_to(outputs).as_posix()
        return file_response(resolve_inside(outputs, relative))

    @router.get("/system", summary="Model in use, device, memory, queue, versions")
    def system(caller: Any = user) -> Any:
        return {
            **services.engine.system_info(),
            "allowed_checkpoints": services.runner.allowed_checkpoints(),
            "queue": services.queue.queued(),
        }

    @router.post("/system/model", summary="Switch the default checkpoint (admin)", openapi_extra=MODEL_BODY)
    async def switch_model(request: Request, caller: Any = admin_models) -> Any:
        body = await json_body(request, MODEL_BODY)
        name = str(body.get("checkpoint", ""))
        await asyncio.to_thread(services.runner.switch_checkpoint, name)
        return {"default_checkpoint": services.runner.default_checkpoint}

    @router.post("/system/free", summary="Free resident models and cached node outputs (admin)")
    def free_models(caller: Any = admin_models) -> Any:
        freed = services.engine.free_models()
        return {"freed": freed, "model_memory_bytes": services.engine.models.memory_bytes()}

    @router.get("/healthz", include_in_schema=False)
    def healthz() -> Any:
        return {"ok": True, "time": time.time()}

    return router


__all__ = [
    "answer_unknown_api_paths",
    "describe_api_errors",
    "api_router",
    "batch_status",
    "error_status",
    "install_error_handlers",
    "public_batch",
    "public_problem",
    "public_progress",
    "public_report",
    "public_row",
    "whole_numbers_as_text",
]
