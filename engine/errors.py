"""The one error hierarchy of the engine.

Every error the library raises derives from :class:`EngineError`. Each carries structured attributes
(never only a message) so the CLI, the web app and the HTTP API can render it in one place each.

    EngineError
    ├── WorkflowError
    │   ├── WorkflowFormatError      the JSON is not any of the three workflow formats
    │   └── WorkflowInvalid          validation found problems; ``problems`` lists every one, per node
    ├── ModelError
    │   ├── ModelNotFound            a checkpoint/encoder/VAE/LoRA name resolves to nothing
    │   └── ModelLoadError           the file exists but cannot be loaded
    ├── ExecutionError               a node failed while running (``node_id``, ``class_type``)
    │   ├── Cancelled                the caller asked to stop
    │   ├── DeadlineExceeded         a sampler ran past its time limit
    │   ├── OutOfMemory              the device ran out of memory (retry cheaper)
    │   └── BadOutput                NaN or all-black image
    ├── Fp8Error                     FP8 quantisation or calibration problems
    ├── TemplateError                a workflow template cannot load or render (``field``)
    ├── SheetError                   a spreadsheet cannot be read at all (``column``/``row`` where known)
    ├── BatchError                   batch-level refusals (``batch_id``)
    │   ├── BatchMismatch            resume with a different sheet/template than the batch was started with
    │   ├── BatchExists              a new batch under an id the ledger already holds
    │   └── BatchBusy                another live process is running the batch now
    ├── StoreError                   the ledger
    │   └── BadQuery                 a listing or search filter the ledger cannot apply (``field``)
    ├── IdempotencyError             an Idempotency-Key a request cannot use now (``key``)
    │   ├── IdempotencyKeyReused     the key came before with another request (its body differs)
    │   └── IdempotencyKeyInUse      the key's first request is still being answered
    ├── RequestInvalid               a request's fields are missing or malformed (``problems``: field, where, why)
    ├── BrokerError                  the scale-out broker's URL is malformed, or Redis refuses us (``broker``:
    │                                the URL with its password blanked)
    └── AccessDenied                 authentication / authorisation refusals (``status`` for HTTP)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


# The refusals a person meets most often, by stable code, with the ``details`` each one fills in. The
# message stays the engine's English; a page or an API client says the same thing in its own language from
# the code and these values (``webapp.i18n.error_text``). Codes are never renamed: clients match on them.
ERROR_CODES: dict[str, tuple[str, ...]] = {
    "sheet_empty": ("file",),
    "sheet_too_large": ("size_mib", "limit_mib"),
    "sheet_old_excel": ("file",),
    "sheet_password_protected": ("file",),
    "sheet_opendocument": ("file",),
    "sheet_apple_numbers": ("file",),
    "sheet_not_a_spreadsheet": ("file",),
    "sheet_type_unsupported": ("file", "extension"),
    "sheet_no_header": (),
    "sheet_no_data_rows": (),
    "sheet_too_many_rows": ("limit",),
    "sheet_too_many_columns": ("count", "limit"),
    "sheet_duplicate_columns": ("columns",),
    "sheet_csv_has_no_worksheets": ("file", "sheet"),
    "sheet_xlsx_holds_csv": ("file", "extension"),
    "sheet_csv_holds_zip": ("file", "extension"),
    "sheet_utf16_invalid": (),
    "sheet_encoding_unknown": (),
    "sheet_csv_unparsable": ("row",),
    "workbook_damaged": (),
    "workbook_too_many_parts": ("count", "limit"),
    "workbook_not_excel": (),
    "workbook_unpacks_too_large": ("limit_mib",),
    "workbook_part_compressed": ("member", "ratio", "limit"),
    "workbook_xml_entities": ("member",),
    "workbook_part_unreadable": ("member",),
    "worksheet_is_chart": ("sheet",),
    "worksheet_not_found": ("sheet", "available"),
    "worksheet_empty": ("sheet", "available"),
    "required_columns_missing": ("columns",),
    "columns_below_title": ("columns", "title", "title_row", "names_row"),
    "batch_seed_not_whole": ("value",),
    "batch_seed_out_of_range": ("limit",),
    "photos_not_a_zip": (),
    "photos_zip_too_large": ("size_mib", "limit_mib"),
    "photos_unsafe_path": ("member",),
    "photos_too_many_entries": ("count", "limit"),
    "photos_too_many": ("limit",),
    "photos_duplicate_name": ("name", "first", "second"),
    "photo_too_large": ("member", "size_mib", "limit_mib"),
    "photo_compressed": ("member", "ratio", "limit"),
    "photos_unpack_too_large": ("limit_mib",),
    "photo_unpacks_past_its_size": ("member",),
    "photo_unpack_failed": ("member",),
    "upload_photo_unsupported": ("field", "file", "supported"),
    "upload_photo_gone": ("field", "file"),
    "template_not_chosen": (),
    "template_not_found": ("template", "available"),
    "template_shipped": ("template",),
    "template_exists": ("template",),
    "template_value_missing": ("template", "field"),
    "template_render_failed": ("template",),
    "template_duplicate_key": ("template", "key"),
    "template_invalid_json": ("template", "line", "column"),
    "template_not_api_format": ("template",),
    "template_file_too_large": ("file", "limit"),
    "template_schema_not_json": ("file",),
    "template_name_invalid": ("name",),
    "template_jinja_syntax": ("template", "line", "detail"),
    "template_name_not_a_field": ("template", "names"),
    "template_field_unused": ("template", "fields"),
    "template_example_invalid": ("template",),
    "template_upload_unexpected_files": ("files",),
    "template_upload_lacks_file": ("file",),
    "template_example_not_png": ("limit_kib",),
    "template_field_not_object": ("template", "position"),
    "template_field_name_invalid": ("template", "field"),
    "template_field_unknown_keys": ("template", "field", "keys"),
    "template_field_type_unknown": ("template", "field", "type", "supported"),
    "template_field_choices_missing": ("template", "field"),
    "template_field_choices_unexpected": ("template", "field", "type"),
    "template_field_choices_not_text": ("template", "field"),
    "template_field_choice_repeated": ("template", "field", "choice"),
    "template_field_bound_not_number": ("template", "field", "bound"),
    "template_field_bound_not_allowed": ("template", "field", "type", "bound"),
    "template_field_min_above_max": ("template", "field", "min", "max"),
    "template_field_required_not_boolean": ("template", "field", "value"),
    "template_field_value_wrong_type": ("template", "field", "key", "value", "type"),
    "template_field_value_refused": ("template", "field", "key"),
    "template_field_default_missing": ("template", "field"),
    "template_fields_missing": ("template",),
    "template_field_declared_twice": ("template", "field"),
    "template_fields_share_column": ("template", "field", "other"),
    "template_translations_not_object": ("template",),
    "template_translation_language_invalid": ("template", "language"),
    "template_translation_not_object": ("template", "language"),
    "template_translation_fields_not_object": ("template", "language"),
    "template_translation_field_unknown": ("template", "language", "fields"),
    "template_translation_not_text": ("template", "language"),
    "template_folder_mismatch": ("template", "folder"),
    "template_filename_pattern_not_text": ("template",),
    "template_filename_pattern_invalid": ("template", "pattern"),
    "template_filename_pattern_unknown": ("template", "field", "available"),
    "template_tags_invalid": ("template",),
    "template_over_limits": ("template", "detail"),
    "template_include_unsupported": ("template", "line"),
    "template_block_unsupported": ("template", "line", "tag"),
    "template_tojson_redundant": ("template", "line"),
    "template_node_malformed": ("template", "node"),
    "template_file_unreadable": ("template", "file"),
    "batch_not_selected": (),
    "batch_not_found": ("batch_id",),
    "batch_not_checked": (),
    "batch_check_expired": ("batch_id",),
    "batch_photos_expired": ("batch_id", "count", "example"),
    "batch_check_unwritable": ("batch_id", "path"),
    "batch_not_owner": ("batch_id", "owner"),
    "model_not_found": ("kind", "name", "available"),
    "model_not_allowed": ("name", "allowed"),
    "batch_running_here": ("batch_id",),
    "batch_busy": ("batch_id", "worker"),
    "batch_exists": ("batch_id",),
    "batch_inputs_changed": ("batch_id", "changed"),
    "batch_photos_missing": ("batch_id",),
    "batch_photos_differ": ("batch_id",),
    "batch_output_unwritable": ("batch_id", "path"),
    "batch_stopped_by_storage": ("batch_id", "row", "path"),
    "batch_waiting_for_storage": ("batch_id", "path", "free_bytes", "needed_bytes"),
    "batch_storage_unwritable": ("batch_id", "path"),
    "ledger_unwritable": ("path",),
    "ledger_upgrade_failed": ("path", "version", "name", "detail", "sqlite_version", "needed"),
    "generation_not_found": ("row_key",),
    "generation_has_no_template": ("row_key",),
    "single_image_timeout": ("seconds",),
    # why a row failed while it ran (kept with the row in the ledger: its extra's "failure")
    "cancelled": (),
    "sampler_deadline": ("limit_s",),
    "out_of_memory": ("node_id", "class_type"),
    "image_nan": (),
    "image_blank": (),
    "no_image": (),
    "node_failed": ("node_id", "class_type", "error"),
    "idempotency_key_reused": ("key",),
    "idempotency_key_in_use": ("key", "retry_after_s"),
}


class EngineError(Exception):
    """Base of every error raised by the engine.

    ``code``: one of :data:`ERROR_CODES` where the refusal is one people meet often enough to be said in
    their language; its values are in ``details``.
    """

    def __init__(self, message: str, *, code: str | None = None, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.details = details

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"type": type(self).__name__, "message": self.message, "details": self.details}
        if self.code is not None:
            body["code"] = self.code
        return body


class WorkflowError(EngineError):
    pass


class WorkflowFormatError(WorkflowError):
    pass


@dataclass(frozen=True)
class NodeProblem:
    """One validation problem, shaped like one entry of ComfyUI's ``node_errors[...].errors``."""

    node_id: str | None  # None for prompt-level problems (no outputs, cycle across nodes)
    class_type: str | None
    type: str  # ComfyUI's error type, e.g. "value_not_in_list"
    message: str
    details: str = ""
    input_name: str | None = None
    extra_info: dict[str, Any] = field(default_factory=dict)
    dependent_outputs: tuple[str, ...] = ()  # the output nodes that need this node (ComfyUI reports them)

    def describe(self) -> str:
        where = f"node {self.node_id} ({self.class_type})" if self.node_id else "workflow"
        what = f" input '{self.input_name}'" if self.input_name else ""
        tail = f": {self.details}" if self.details else ""
        return f"{where}{what}: {self.message}{tail}"


class WorkflowInvalid(WorkflowError):
    """Validation failed. ``problems`` holds every problem found, not just the first."""

    def __init__(self, problems: list[NodeProblem]) -> None:
        self.problems = list(problems)
        summary = "; ".join(p.describe() for p in self.problems[:5])
        more = f" (+{len(self.problems) - 5} more)" if len(self.problems) > 5 else ""
        super().__init__(f"workflow failed validation: {summary}{more}", problems=[asdict(p) for p in self.problems])

    def to_comfy(self) -> dict[str, Any]:
        """The body ComfyUI's ``POST /prompt`` answers with on a 400. As ComfyUI, an unknown node type
        refuses the whole prompt on its own, named in the top-level error, with no node_errors."""
        unknown = next((p for p in self.problems if p.extra_info.get("unknown_node_type")), None)
        if unknown is not None:
            error = {"type": "invalid_prompt",
                     "message": f"Cannot execute because node {unknown.class_type} does not exist.",
                     "details": f"Node ID '#{unknown.node_id}'", "extra_info": {}}
            return {"error": error, "node_errors": {}}
        return {"error": self.comfy_error(), "node_errors": self.node_errors()}

    def node_errors(self) -> dict[str, Any]:
        """ComfyUI's ``node_errors``: per node id, its problems, the outputs they hold up and its class."""
        node_errors: dict[str, Any] = {}
        for p in self.problems:
            if p.node_id is None:
                continue
            entry = node_errors.setdefault(
                p.node_id, {"errors": [], "dependent_outputs": list(p.dependent_outputs), "class_type": p.class_type}
            )
            extra = dict(p.extra_info)
            if p.input_name:
                extra.setdefault("input_name", p.input_name)
            entry["errors"].append(
                {"type": p.type, "message": p.message, "details": p.details, "extra_info": extra}
            )
        return node_errors

    def comfy_error(self) -> dict[str, Any]:
        """ComfyUI's top-level ``error``: the first prompt-level problem, else prompt_outputs_failed_validation."""
        prompt_level = [p for p in self.problems if p.node_id is None]
        if prompt_level:
            head = prompt_level[0]
            error = {"type": head.type, "message": head.message, "details": head.details, "extra_info": {}}
        else:
            error = {
                "type": "prompt_outputs_failed_validation",
                "message": "Prompt outputs failed validation",
                # every node's problems, one per line, as ComfyUI joins them
                "details": "\n".join(f"{p.message}: {p.details}" for p in self.problems),
                "extra_info": {},
            }
        return error


class ModelError(EngineError):
    pass


class ModelNotFound(ModelError):
    def __init__(self, name: str, kind: str, searched: list[str], available: list[str]) -> None:
        shown = ", ".join(available[:20]) or "none"
        super().__init__(
            f"{kind} '{name}' not found; looked in: {', '.join(searched) or 'nowhere'}; available: {shown}",
            code="model_not_found",
            name=name,
            kind=kind,
            searched=searched,
            available=available,
        )
        self.name, self.kind, self.searched, self.available = name, kind, searched, available


class ModelLoadError(ModelError):
    pass


class ExecutionError(EngineError):
    def __init__(self, message: str, node_id: str | None = None, class_type: str | None = None, **details: Any):
        super().__init__(message, node_id=node_id, class_type=class_type, **details)
        self.node_id, self.class_type = node_id, class_type


class Cancelled(ExecutionError):
    pass


class DeadlineExceeded(ExecutionError):
    pass


class OutOfMemory(ExecutionError):
    pass


class BadOutput(ExecutionError):
    pass


class Fp8Error(EngineError):
    pass


class TemplateError(EngineError):
    def __init__(self, message: str, template: str | None = None, field: str | None = None, **details: Any):
        super().__init__(message, template=template, field=field, **details)
        self.template, self.field = template, field


class SheetError(EngineError):
    def __init__(self, message: str, row: int | None = None, column: str | None = None, **details: Any):
        super().__init__(message, row=row, column=column, **details)
        self.row, self.column = row, column


class BatchError(EngineError):
    def __init__(self, message: str, batch_id: str | None = None, **details: Any):
        super().__init__(message, batch_id=batch_id, **details)
        self.batch_id = batch_id


class BatchMismatch(BatchError):
    pass


class BatchExists(BatchError):
    """Creating a batch whose id is taken. Callers that were told the id was free (two submissions of one
    client-chosen id racing) resume the existing batch instead."""


class BatchBusy(BatchError):
    """Running a batch that a live process is running now (``batch_id``, ``worker``: its host:pid): a second
    run of the same command, say from an overlapping cron job, would only wait for rows the first holds."""


class StoreError(EngineError):
    pass


class BadQuery(StoreError):
    pass


class IdempotencyError(EngineError):
    def __init__(self, message: str, key: str, **details: Any) -> None:
        super().__init__(message, key=key, **details)
        self.key = key


class IdempotencyKeyReused(IdempotencyError):
    """The Idempotency-Key came before with another request: a key names one request, and its first answer
    is kept for retries of that request only."""


class IdempotencyKeyInUse(IdempotencyError):
    """The Idempotency-Key's first request is still being answered: retry once it has been."""


class RequestInvalid(EngineError):
    """A request whose shape is wrong before any library code could look at it: a missing field, a query
    parameter that is not a number, a body that is not JSON. ``problems`` lists each as
    ``{"field", "location", "message"}`` (location: body, query, path, form, header)."""

    def __init__(self, message: str, problems: list[dict[str, Any]] | None = None, **details: Any) -> None:
        super().__init__(message, problems=list(problems or []), **details)
        self.problems = list(problems or [])


class BrokerError(EngineError):
    """The scale-out broker cannot be used: its URL is malformed, or Redis refuses us. Said at start-up, with
    the URL's password blanked (``broker``)."""


class AccessDenied(EngineError):
    def __init__(self, message: str, status: int = 403, **details: Any):
        super().__init__(message, status=status, **details)
        self.status = status
