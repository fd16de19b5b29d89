"""Workflow templates: an API-format ComfyUI workflow with Jinja placeholders plus a schema of its fields.

A template is a folder ``templates/<name>/`` holding ``template.json`` (the schema, see
:class:`TemplateField`), ``workflow.json.j2`` (the workflow) and optionally ``example.png``.

Rendering cannot be broken by a cell. Every ``{{ expression }}`` of the workflow is JSON-encoded where it
lands, so templates write ``"text": {{ prompt }}`` without quotes and a cell holding quotes, backslashes,
newlines, ``"}``, ``{{ }}`` or ``{% %}`` arrives verbatim inside one JSON string: it can neither break the
JSON, nor add or change nodes, nor be evaluated (Jinja never re-reads its output). To build a string, build
it inside one expression: ``{{ "photo of " ~ product_name ~ ", " ~ color }}`` or
``{{ [product_name, color, style] | join_nonempty(", ") }}``, or with a macro or a ``{% set name %}`` block:
their bodies build plain text (nothing in them is JSON-encoded), which is encoded once where ``{{ }}``
writes it. ``{% filter %}`` and ``{% call %}`` blocks outside a macro are refused: what they write would land
in the workflow as it is, unencoded.

Rendering is sandboxed (``ImmutableSandboxedEnvironment``: no ``__class__`` tricks, no mutation), an
undefined name is an error naming the field (``StrictUndefined``), and work is bounded by a render budget
of time and size. Time is checked on every loop iteration (``{% for %}``, recursive ``loop()``, ``range``),
every call, operator, filter and test (so ``map``/``select`` check it per item) and every output chunk; a
template that loops for ever is stopped after ``RenderLimits.max_seconds``. ``range`` is capped, and
repetition, padding, ``~`` and ``+`` are size-checked before they build a value. A template that cannot
render its own field examples into a JSON object of nodes is refused when loaded; files the example names
that a fresh install lacks (model files, input images: problems the engine marks ``missing_file``) are left
to each row's own check.

Each template is versioned by ``content_hash`` (sha256 of ``template.json`` and the workflow text), which
the ledger records with every generation.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
import types
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from jinja2 import (
    StrictUndefined,
    TemplateSyntaxError,
    Undefined,
    UndefinedError,
    meta,
    nodes,
    pass_context,
)
from jinja2.runtime import Context, LoopContext, markup_join
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError
from jinja2.visitor import NodeTransformer

from engine.errors import TemplateError, WorkflowInvalid
from engine.naming import PATTERN_BUILTINS, pattern_fields
from engine.settings import DEMO_CHECKPOINT
from engine.sheets import RowProblem, choice_key, coerce_cell, coerce_fields, column_key

__all__ = [
    "FIELD_TYPES",
    "TemplateField",
    "WorkflowTemplate",
    "TemplateLibrary",
    "RenderLimits",
    "parse_template",
    "load_template",
]

FIELD_TYPES = ("string", "text", "int", "float", "bool", "choice", "seed", "checkpoint", "image")
TEMPLATE_FILE = "template.json"
WORKFLOW_FILE = "workflow.json.j2"
EXAMPLE_FILE = "example.png"

_FIELD_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}")
_TEMPLATE_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
# Names Jinja gives a meaning of its own; a field so named would shadow it.
_RESERVED_NAMES = frozenset(
    {"range", "dict", "namespace", "cycler", "joiner", "loop", "self", "caller", "varargs", "kwargs",
     "true", "false", "none", "True", "False", "None"}
)
# The field types each bound is checked for (engine.sheets.coerce_cell): max is the longest text of a string
_BOUNDED_TYPES = {"min": ("int", "float", "seed"), "max": ("int", "float", "seed", "string")}
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_SEED_MAX = 2**64 - 1
MAX_INT_BITS = 4096  # integers a template may compute: far past any seed (64 bits) or size


@dataclass(frozen=True)
class RenderLimits:
    """Bounds on one render: untrusted templates cannot loop or grow output without end."""

    max_seconds: float = 2.0
    max_output_chars: int = 1_000_000
    max_range: int = 1_000
    max_template_chars: int = 1_000_000
    max_schema_bytes: int = 256 * 1024
    max_example_bytes: int = 5 * 1024 * 1024


@dataclass(frozen=True)
class TemplateField:
    """One field of a template's schema (a spreadsheet column).

    ``type`` is one of :data:`FIELD_TYPES`. ``min``/``max`` bound ``int``, ``float`` and ``seed`` values
    (``max`` is the longest text for ``string``). An optional field needs a ``default`` except ``string``/
    ``text`` (default ""), ``bool`` (false), ``seed`` (derived from the batch seed), ``checkpoint`` (the
    engine's default checkpoint) and ``image``. ``example`` is what the load-time test render uses.
    """

    name: str
    type: str
    default: Any = None
    required: bool = False
    choices: tuple[Any, ...] = ()
    min: float | int | None = None
    max: float | int | None = None
    description: str = ""
    example: Any = None

    def to_dict(self) -> dict[str, Any]:
        out = {"name": self.name, "type": self.type, "required": self.required, "description": self.description}
        for key in ("default", "min", "max", "example"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.choices:
            out["choices"] = list(self.choices)
        return out

    def example_value(self) -> Any:
        """The value used to test-render the template: the example, else the default, else a sample."""
        if self.example is not None:
            return self.example
        if self.default is not None:
            return self.default
        samples = {
            "string": "example", "text": "example text", "bool": False, "seed": 12345,
            "checkpoint": DEMO_CHECKPOINT, "image": "example.png",
        }
        if self.type == "choice":
            return self.choices[0]
        if self.type in ("int", "float"):
            low = self.min if self.min is not None else 0
            return int(low) if self.type == "int" else float(low)
        return samples[self.type]


def _type_matches(kind: str, value: Any) -> bool:
    if kind in ("int", "seed"):
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "bool":
        return isinstance(value, bool)
    if kind in ("string", "text", "checkpoint", "image"):
        return isinstance(value, str)
    return True  # choice: checked against the choices


def _parse_field(template: str, raw: Any, position: int) -> TemplateField:
    """The field ``raw``, the ``position``-th (from 1) of template.json's ``fields``."""
    if not isinstance(raw, dict):
        raise TemplateError(f"template '{template}': field {position} must be an object", template=template,
                            code="template_field_not_object", position=position)
    name = raw.get("name")
    if not isinstance(name, str) or not _FIELD_NAME.fullmatch(name) or name in _RESERVED_NAMES:
        raise TemplateError(
            f"template '{template}': field name {name!r} must be letters, digits and _ (starting with a "
            "letter) and not a Jinja name", template=template, field=str(name), code="template_field_name_invalid",
        )
    unknown = sorted(set(raw) - {"name", "type", "default", "required", "choices", "min", "max", "description",
                                 "example"})
    if unknown:
        raise TemplateError(f"template '{template}': field '{name}' has unknown keys: {', '.join(unknown)}",
                            template=template, field=name, code="template_field_unknown_keys", keys=unknown)
    kind = raw.get("type")
    if kind not in FIELD_TYPES:
        raise TemplateError(
            f"template '{template}': field '{name}' has type {kind!r}; supported: {', '.join(FIELD_TYPES)}",
            template=template, field=name, code="template_field_type_unknown", type=str(kind),
            supported=list(FIELD_TYPES),
        )
    choices = raw.get("choices") or ()
    if kind == "choice" and (not isinstance(choices, list) or not choices):
        raise TemplateError(f"template '{template}': choice field '{name}' needs a non-empty 'choices' list",
                            template=template, field=name, code="template_field_choices_missing")
    if kind != "choice" and choices:
        raise TemplateError(f"template '{template}': field '{name}' has choices but type {kind!r}; make it a "
                            "choice field or drop the choices", template=template, field=name,
                            code="template_field_choices_unexpected", type=kind)
    if kind == "choice":
        if not all(isinstance(c, (str, int, float)) and not isinstance(c, bool) for c in choices):
            raise TemplateError(f"template '{template}': choice field '{name}' choices must be text or numbers",
                                template=template, field=name, code="template_field_choices_not_text")
        folded = [choice_key(c) for c in choices]
        repeated = next((c for c, key in zip(choices, folded) if folded.count(key) > 1), None)
        if repeated is not None:  # a cell matches a choice ignoring case and by value: two would be one
            raise TemplateError(f"template '{template}': choice field '{name}' lists a choice twice: {repeated!r}",
                                template=template, field=name, code="template_field_choice_repeated",
                                choice=str(repeated))
    for bound in ("min", "max"):
        value = raw.get(bound)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise TemplateError(f"template '{template}': field '{name}' {bound} must be a number",
                                template=template, field=name, code="template_field_bound_not_number", bound=bound)
        if value is not None and kind not in _BOUNDED_TYPES[bound]:
            # Nothing would check it: the author would believe cells are bounded that are not
            raise TemplateError(
                f"template '{template}': field '{name}' of type {kind!r} cannot have a {bound}; "
                f"{bound} applies to {', '.join(_BOUNDED_TYPES[bound])} fields", template=template, field=name,
                code="template_field_bound_not_allowed", type=kind, bound=bound,
            )
    if raw.get("min") is not None and raw.get("max") is not None and raw["min"] > raw["max"]:
        raise TemplateError(f"template '{template}': field '{name}' min {raw['min']} is above its max {raw['max']}",
                            template=template, field=name, code="template_field_min_above_max",
                            min=raw["min"], max=raw["max"])
    if not isinstance(raw.get("required", False), bool):
        # "false" (a string) is truthy: the field would silently become required
        raise TemplateError(f"template '{template}': field '{name}' required must be true or false, "
                            f"not {raw['required']!r}", template=template, field=name,
                            code="template_field_required_not_boolean", value=str(raw["required"]))
    result = TemplateField(
        name=name, type=kind, default=raw.get("default"), required=raw.get("required", False),
        choices=tuple(choices), min=raw.get("min"), max=raw.get("max"),
        description=str(raw.get("description", "")), example=raw.get("example"),
    )
    for key in ("default", "example"):
        value = getattr(result, key)
        if value is None:
            continue
        if not _type_matches(kind, value):
            raise TemplateError(f"template '{template}': field '{name}' {key} {value!r} is not a {kind}",
                                template=template, field=name, code="template_field_value_wrong_type", key=key,
                                value=str(value), type=kind)
        try:
            typed = coerce_cell(result, str(value) if kind != "bool" else ("true" if value else "false"))
        except ValueError as exc:
            # What is wrong with the value is the cell check's own problem, said in the page's language
            # from its code as a cell's would be (webapp.i18n.error_text)
            problem = {"code": getattr(exc, "code", None), "reason": str(exc), "params": getattr(exc, "params", {})}
            raise TemplateError(f"template '{template}': field '{name}' {key}: {exc}",
                                template=template, field=name, code="template_field_value_refused", key=key,
                                cell_problem=problem) from exc
        # Kept as a cell holding it would be read (the choice as listed, 512 for "512"; 1.0 for a float's
        # 1): a row that leaves the cell blank renders exactly as a row that types the default.
        result = TemplateField(**{**result.__dict__, key: typed})
    if kind in ("string", "text") and result.default is None and not result.required:
        result = TemplateField(**{**result.__dict__, "default": ""})
    if kind == "bool" and result.default is None and not result.required:
        result = TemplateField(**{**result.__dict__, "default": False})
    if (not result.required and result.default is None
            and kind not in ("seed", "checkpoint", "image")):
        raise TemplateError(
            f"template '{template}': optional field '{name}' needs a default (or mark it required)",
            template=template, field=name, code="template_field_default_missing",
        )
    return result


# --------------------------------------------------------------------------------------------------
# The sandbox


class _RenderBudget:
    """Per-render deadline and counters. Its attributes are private, so sandboxed code cannot read them."""

    def __init__(self, limits: RenderLimits) -> None:
        self._limits = limits
        self._deadline = time.monotonic() + limits.max_seconds

    def _check(self) -> None:
        if time.monotonic() > self._deadline:
            raise SecurityError(f"rendering took longer than {self._limits.max_seconds:g} s")

    def _check_size(self, size: int, what: str) -> None:
        if size > self._limits.max_output_chars:
            raise SecurityError(f"{what} would be {size:,} long; the limit is {self._limits.max_output_chars:,}")


# The render context key of the budget: not a Jinja name, so no template can read, set or shadow it.
_BUDGET_KEY = "render budget"
# The filters every ``{% for %}`` iterable, every ``~`` and every expression the workflow writes are
# rewritten into (see _BudgetRewrite); Jinja names, but calling them from a template only does what the
# loop, the ``~`` or the ``{{ }}`` would.
_LOOP_FILTER = "_budgeted_loop"
_CONCAT_FILTER = "_budgeted_concat"
_JSON_FILTER = "_as_json"


def _budget(context: Context) -> _RenderBudget:
    budget = context.get(_BUDGET_KEY)
    if not isinstance(budget, _RenderBudget):  # compile-time constant folding has no render context
        return _RenderBudget(RenderLimits())
    return budget


@pass_context
def _budgeted_loop(context: Context, iterable: Any) -> Iterable[Any]:
    """``iterable``, checking the render's time budget before each item: nested loops over a long string
    would otherwise run for minutes without producing output or calling anything."""
    budget = _budget(context)
    for item in iterable:
        budget._check()
        yield item


@pass_context
def _budgeted_concat(context: Context, parts: list[Any]) -> str:
    """What ``a ~ b`` gives, refused before it is built when it would exceed the render size limit:
    ``{% set ns.s = ns.s ~ ns.s %}`` in a short loop would otherwise take gigabytes."""
    budget = _budget(context)
    if context.eval_ctx.autoescape:
        joined = markup_join(parts)
        budget._check_size(len(joined), "a joined value")
        return joined
    texts = [str(part) for part in parts]
    budget._check_size(sum(len(text) for text in texts), "a joined value")
    return "".join(texts)


class _BudgetRewrite(NodeTransformer):
    """Rewrites what the compiled template runs as plain Python, where no sandbox hook sees it: every
    ``{% for %}`` iterates through :func:`_budgeted_loop`, every ``~`` joins through :func:`_budgeted_concat`.

    It also decides which ``{{ }}`` are JSON-encoded (through :func:`_as_json`): those that write into the
    workflow, not those inside a macro or a ``{% set %}`` block, which build a text value. Encoding there
    too would put JSON quotes and escapes into the text (``"a \\"cat\\""`` for a cat) and encode it again
    where it lands. ``unencoded_blocks`` collects the ``{% filter %}`` and ``{% call %}`` blocks found
    outside such bodies: their output reaches the workflow unencoded (``upper`` turns the escape ``\\n``
    into ``\\N``), so the caller refuses them.
    """

    def __init__(self) -> None:
        self._text_depth = 0  # > 0 inside a body that builds text
        self.unencoded_blocks: list[nodes.Node] = []

    def _text_body(self, node: nodes.Node) -> nodes.Node:
        self._text_depth += 1
        try:
            return self.generic_visit(node)
        finally:
            self._text_depth -= 1

    visit_Macro = _text_body
    visit_AssignBlock = _text_body

    def _unencoded_block(self, node: nodes.Node) -> nodes.Node:
        if not self._text_depth:
            self.unencoded_blocks.append(node)
        return self._text_body(node)

    visit_FilterBlock = _unencoded_block
    visit_CallBlock = _unencoded_block

    def visit_Output(self, node: nodes.Output) -> nodes.Node:
        node = self.generic_visit(node)
        if not self._text_depth:
            node.nodes = [
                child if isinstance(child, nodes.TemplateData)
                else nodes.Filter(child, _JSON_FILTER, [], [], None, None, lineno=child.lineno)
                for child in node.nodes
            ]
        return node

    def visit_For(self, node: nodes.For) -> nodes.Node:
        node = self.generic_visit(node)
        node.iter = nodes.Filter(node.iter, _LOOP_FILTER, [], [], None, None, lineno=node.iter.lineno)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        node = self.generic_visit(node)
        parts = nodes.List(node.nodes, lineno=node.lineno)
        return nodes.Filter(parts, _CONCAT_FILTER, [], [], None, None, lineno=node.lineno)


def _budgeted(function: Callable[..., Any]) -> Callable[..., Any]:
    """A filter or test that checks the render's time budget before it runs.

    ``map``, ``select``, ``reject`` and friends call filters and tests once per item, so this bounds them
    too. The wrapper takes the render context and hands ``function`` what it asked for (its
    ``pass_context`` / ``pass_eval_context`` / ``pass_environment`` marker).
    """
    wants = getattr(getattr(function, "jinja_pass_arg", None), "name", None)

    @pass_context
    def checked(context: Context, *args: Any, **kwargs: Any) -> Any:
        _budget(context)._check()
        if wants == "context":
            return function(context, *args, **kwargs)
        if wants == "eval_context":
            return function(context.eval_ctx, *args, **kwargs)
        if wants == "environment":
            return function(context.environment, *args, **kwargs)
        return function(*args, **kwargs)

    return checked


def _as_json(value: Any) -> str:
    """Every ``{{ expression }}`` of the workflow lands as JSON: a string is quoted and escaped, a number
    stays a number."""
    if isinstance(value, Undefined):
        str(value)  # StrictUndefined raises UndefinedError naming the variable
    try:
        return json.dumps(value, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TemplateError(f"an expression produced a value that is not JSON ({type(value).__name__}): {exc}") from exc


def _sized(length: Any) -> int:
    return length if isinstance(length, int) else 0


class _TemplateEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox plus size checks on the operations that can build huge values from small ones."""

    intercepted_binops = frozenset({"*", "**", "%", "+"})

    def __init__(self, limits: RenderLimits) -> None:
        super().__init__(undefined=StrictUndefined, autoescape=False)
        self.limits = limits
        self.globals = {"dict": dict, "namespace": self.globals["namespace"], "range": self._capped_range}
        for name in ("center", "indent", "wordwrap", "truncate", "format", "replace", "join"):
            self.filters[name] = self._size_checked_filter(self.filters[name])
        self.filters["join_nonempty"] = _join_nonempty
        self.filters[_LOOP_FILTER] = _budgeted_loop
        self.filters[_CONCAT_FILTER] = _budgeted_concat
        self.filters[_JSON_FILTER] = _as_json
        self.filters = {name: _budgeted(function) for name, function in self.filters.items()}
        self.tests = {name: _budgeted(function) for name, function in self.tests.items()}

    def concat(self, parts: Iterable[str]) -> str:  # type: ignore[override]
        """How compiled templates join the output of a macro or ``{% set %}`` block: size-checked first,
        since a loop in one collects references to one large value and the join would copy it each time."""
        parts = list(parts)
        size = sum(len(part) for part in parts)
        if size > self.limits.max_output_chars:
            raise SecurityError(f"a block's text would be {size:,} long; the limit is {self.limits.max_output_chars:,}")
        return "".join(parts)

    @pass_context
    def _capped_range(self, context: Context, *args: int) -> Iterable[int]:
        try:
            values = range(*args)
            count = len(values)
        except OverflowError:
            count = self.limits.max_range + 1
        if count > self.limits.max_range:
            raise SecurityError(f"range() of {count} items; the limit is {self.limits.max_range}")
        budget = _budget(context)
        for value in values:
            budget._check()
            yield value

    def _size_checked_filter(self, original: Callable[..., Any]) -> Callable[..., Any]:
        limit = self.limits.max_output_chars

        def checked(*args: Any, **kwargs: Any) -> Any:
            for arg in list(args) + list(kwargs.values()):
                if isinstance(arg, int) and not isinstance(arg, bool) and abs(arg) > limit:
                    raise SecurityError(f"a filter argument of {arg} exceeds the render size limit")
                if isinstance(arg, str) and re.search(r"\d{7,}", arg) and "%" in arg:
                    raise SecurityError("a format width exceeds the render size limit")
            result = original(*args, **kwargs)
            if isinstance(result, str) and len(result) > limit:
                raise SecurityError("a filter result exceeds the render size limit")
            return result

        if hasattr(original, "jinja_pass_arg"):  # keep the pass_context / pass_environment marker
            checked.jinja_pass_arg = original.jinja_pass_arg  # type: ignore[attr-defined]
        return checked

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        budget = _budget(context)
        budget._check()
        if operator == "**":
            if isinstance(right, (int, float)) and abs(right) > 128:
                raise SecurityError(f"exponent {right} is too large")
            if _is_int(left) and _is_int(right) and left.bit_length() * max(right, 0) > MAX_INT_BITS:
                # Chained powers grow without bound and CPython computes them holding the GIL: the
                # whole server would stop, so the size is checked before, not timed after.
                raise SecurityError(f"a power with a result over {MAX_INT_BITS} bits is refused")
        elif operator == "*":
            for seq, times in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(times, int):
                    budget._check_size(len(seq) * max(times, 0), "a repeated value")
            if _is_int(left) and _is_int(right) and left.bit_length() + right.bit_length() > MAX_INT_BITS:
                raise SecurityError(f"a product with a result over {MAX_INT_BITS} bits is refused")
        elif operator == "+" and isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
            budget._check_size(len(left) + len(right), "a joined value")
        elif operator == "%" and isinstance(left, str) and re.search(r"\d{7,}", left):
            raise SecurityError("a format width exceeds the render size limit")
        return super().call_binop(context, operator, left, right)

    def call(__self, __context: Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        budget = _budget(__context)
        budget._check()
        if isinstance(__obj, LoopContext) and args:  # loop(children) of a recursive for: iterate on budget
            args = (_budgeted_loop(__context, args[0]), *args[1:])
        if isinstance(__obj, types.BuiltinMethodType) and isinstance(getattr(__obj, "__self__", None), str):
            text: str = __obj.__self__
            name = __obj.__name__
            if name in ("ljust", "rjust", "center", "zfill") and args:
                budget._check_size(_sized(args[0]), f"str.{name}()")
            elif name == "expandtabs":
                budget._check_size(len(text) * max(_sized(args[0]) if args else 8, 1), "str.expandtabs()")
            elif name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
                hits = text.count(args[0]) if args[0] else len(text) + 1
                budget._check_size(len(text) + hits * len(args[1]), "str.replace()")
            elif name == "join" and args:
                try:
                    items = list(args[0])
                except TypeError:
                    items = []
                budget._check_size(sum(len(str(i)) for i in items) + len(text) * len(items), "str.join()")
        result = super().call(__context, __obj, *args, **kwargs)
        if isinstance(result, (str, list, tuple)):
            budget._check_size(len(result), "a call result")
        return result

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        wrapped = super().wrap_str_format(value)
        if wrapped is not None and re.search(r"\d{5,}", value.__self__):
            raise SecurityError("a format width exceeds the render size limit")
        return wrapped


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _join_nonempty(items: Iterable[Any], separator: str = ", ") -> str:
    """Join the non-empty items as text: ``[name, color, ""] | join_nonempty(", ")`` → ``"name, color"``."""
    parts = [str(item) for item in items if item is not None and str(item).strip() != ""]
    return separator.join(parts)


# --------------------------------------------------------------------------------------------------
# Templates


@dataclass(frozen=True)
class TemplateWords:
    """A template's words for people in one more language (``translations`` in template.json): its title,
    description and field descriptions. Whatever it leaves out is shown in the template's own words."""

    title: str = ""
    description: str = ""
    fields: Mapping[str, str] = field(default_factory=dict)  # field name -> description

    def to_dict(self) -> dict[str, Any]:
        return {"title": self.title, "description": self.description, "fields": dict(self.fields)}


_NO_WORDS = TemplateWords()  # a language the template has no words for


@dataclass
class WorkflowTemplate:
    """A loaded, validated template. Render rows with :meth:`render`; convert cells with :meth:`coerce_row`."""

    name: str
    title: str
    description: str
    version: str
    fields: tuple[TemplateField, ...]
    filename_pattern: str
    tags: tuple[str, ...]
    workflow_source: str
    content_hash: str
    folder: Path | None = None
    limits: RenderLimits = field(default_factory=RenderLimits)
    translations: Mapping[str, TemplateWords] = field(default_factory=dict)  # language tag -> words
    _compiled: Any = field(default=None, repr=False)

    # The words in ``lang`` where the template has them, else its own.
    def title_in(self, lang: str) -> str:
        return self.translations.get(lang, _NO_WORDS).title or self.title

    def description_in(self, lang: str) -> str:
        return self.translations.get(lang, _NO_WORDS).description or self.description

    def field_description_in(self, spec: TemplateField, lang: str) -> str:
        return self.translations.get(lang, _NO_WORDS).fields.get(spec.name) or spec.description

    @property
    def example_image(self) -> Path | None:
        if self.folder is None:
            return None
        path = self.folder / EXAMPLE_FILE
        return path if path.is_file() else None

    def get_field(self, name: str) -> TemplateField:
        for f in self.fields:
            if f.name == name:
                return f
        raise TemplateError(
            f"template '{self.name}' has no field '{name}'; fields: {', '.join(f.name for f in self.fields)}",
            template=self.name, field=name,
        )

    def to_dict(self) -> dict[str, Any]:
        """What listings show: everything but the workflow text."""
        return {
            "name": self.name, "title": self.title, "description": self.description, "version": self.version,
            "content_hash": self.content_hash, "filename_pattern": self.filename_pattern, "tags": list(self.tags),
            "fields": [f.to_dict() for f in self.fields],
            "translations": {lang: words.to_dict() for lang, words in self.translations.items()},
            "has_example_image": self.example_image is not None,
        }

    def example_values(self) -> dict[str, Any]:
        return {f.name: f.example_value() for f in self.fields}

    def coerce_row(
        self, raw: Mapping[str, str], row_number: int, decimal_comma: bool = False,
        numbers: Mapping[str, str] | None = None,
    ) -> tuple[dict[str, Any], list[RowProblem]]:
        """Typed values and problems for one spreadsheet row; ``raw`` maps field names to cell text
        (numbers written 7,5 where ``decimal_comma``: :attr:`engine.sheets.Sheet.decimal_comma`), ``numbers``
        to the stored number of cells shown formatted (:attr:`engine.sheets.SheetRow.numbers`)."""
        return coerce_fields(self.fields, raw, row_number, decimal_comma, numbers)

    def _context(self, values: Mapping[str, Any], defaults: Mapping[str, Any] | None) -> dict[str, Any]:
        defaults = defaults or {}
        context: dict[str, Any] = {}
        for f in self.fields:
            value = values.get(f.name)
            if value is None:
                value = f.default
            if value is None:
                value = defaults.get(f.name, defaults.get(f.type))
            if value is None:
                continue  # left undefined: using it is an error naming the field
            if isinstance(value, str) and f.type not in ("string", "text"):
                try:
                    value = coerce_cell(f, value)
                except ValueError as exc:
                    raise TemplateError(f"field '{f.name}': {exc}", template=self.name, field=f.name) from exc
            elif not _type_matches(f.type, value):
                raise TemplateError(
                    f"field '{f.name}' expects a {f.type}, got {type(value).__name__} {value!r}",
                    template=self.name, field=f.name,
                )
            elif f.type == "choice" and value not in f.choices:
                raise TemplateError(
                    f"field '{f.name}': {value!r} is not one of: {', '.join(map(str, f.choices))}",
                    template=self.name, field=f.name,
                )
            elif f.type == "seed" and not 0 <= value <= _SEED_MAX:
                raise TemplateError(f"field '{f.name}': seed {value} is outside 0 … 2^64−1",
                                    template=self.name, field=f.name)
            context[f.name] = value
        return context

    def render_text(self, values: Mapping[str, Any], defaults: Mapping[str, Any] | None = None) -> str:
        """The rendered workflow text (before JSON parsing); see :meth:`render`."""
        context = self._context(values, defaults)
        budget = _RenderBudget(self.limits)
        context[_BUDGET_KEY] = budget
        parts: list[str] = []
        size = 0
        try:
            for chunk in self._compiled.generate(context):
                size += len(chunk)
                budget._check_size(size, "the rendered workflow")
                budget._check()
                parts.append(chunk)
        except UndefinedError as exc:
            missing = _undefined_name(str(exc))
            if missing in {f.name for f in self.fields}:
                raise TemplateError(
                    f"template '{self.name}'{_at_line(exc)}: no value for field '{missing}' (empty cell, no default)",
                    template=self.name, field=missing, line=_template_line(exc), code="template_value_missing",
                ) from exc
            raise TemplateError(f"template '{self.name}'{_at_line(exc)}: {exc}", template=self.name, field=missing,
                                line=_template_line(exc), code="template_render_failed") from exc
        except SecurityError as exc:
            raise TemplateError(f"template '{self.name}' was stopped{_at_line(exc)}: {exc}", template=self.name,
                                line=_template_line(exc), code="template_render_failed") from exc
        except RecursionError as exc:
            raise TemplateError(f"template '{self.name}' recursed too deeply", template=self.name,
                                code="template_render_failed") from exc
        except TemplateError as exc:
            if exc.template is not None:
                raise
            # Raised by the template's own expressions (a value that is not JSON): say whose and where
            raise TemplateError(f"template '{self.name}'{_at_line(exc)}: {exc.message}", template=self.name,
                                field=exc.field, line=_template_line(exc), code="template_render_failed") from exc
        except Exception as exc:  # any runtime error inside the template's own expressions
            raise TemplateError(
                f"template '{self.name}' failed to render{_at_line(exc)}: {type(exc).__name__}: {exc}",
                template=self.name, line=_template_line(exc), code="template_render_failed",
            ) from exc
        return "".join(parts)

    def render(self, values: Mapping[str, Any], defaults: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Render one row into an API-format workflow (a dict of nodes).

        ``values`` maps field names to typed values (from :meth:`coerce_row`; text for non-string fields
        is converted). A missing value falls back to the field's default, then to ``defaults`` looked up by
        field name and then by field type, e.g. ``{"checkpoint": settings.default_checkpoint}``.
        """
        text = self.render_text(values, defaults)
        try:
            data = json.loads(text, object_pairs_hook=_refuse_duplicate_keys)
        except _DuplicateKey as exc:
            raise TemplateError(
                f"template '{self.name}' rendered the key '{exc.key}' twice in one object (a node id, or an input "
                "of one node, written twice; JSON readers would silently keep only the last)",
                template=self.name, key=exc.key, code="template_duplicate_key",
            ) from exc
        except json.JSONDecodeError as exc:
            line = text.splitlines()[exc.lineno - 1] if exc.lineno - 1 < len(text.splitlines()) else ""
            hint = ""
            if '""' in line or re.search(r'"[^"]*"\S', line):
                hint = (" (write {{ field }} without quotes: every expression is JSON-encoded where it lands)")
            raise TemplateError(
                f"template '{self.name}' did not render valid JSON: {exc.msg} at line {exc.lineno} column "
                f"{exc.colno}: {line.strip()[:120]!r}{hint}", template=self.name,
                code="template_invalid_json", line=exc.lineno, column=exc.colno,
            ) from exc
        _check_api_shape(self.name, data)
        return data


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _refuse_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object, refused when a key repeats: a copied node whose id was not changed, or a loop that
    writes the same id for two items, would otherwise replace the earlier node without a word."""
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


def _template_line(exc: BaseException) -> int | None:
    """The workflow line an error in rendering came from: Jinja rewrites the traceback of a render error so
    that the template's own frames carry its file name, ``<template>``, and its line numbers."""
    line = None
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def _at_line(exc: BaseException) -> str:
    line = _template_line(exc)
    return "" if line is None else f" (workflow.json.j2 line {line})"


def _undefined_name(message: str) -> str | None:
    match = re.search(r"'([^']+)' is undefined", message)
    return match.group(1) if match else None


def _check_api_shape(name: str, data: Any) -> None:
    if not isinstance(data, dict) or not data:
        raise TemplateError(f"template '{name}' must render a JSON object of nodes (API format)", template=name,
                            code="template_not_api_format")
    for node_id, node in data.items():
        if not isinstance(node, dict) or not isinstance(node.get("class_type"), str) \
                or not isinstance(node.get("inputs", {}), dict):
            raise TemplateError(
                f"template '{name}': node {node_id} must be an object with 'class_type' and 'inputs'",
                template=name, code="template_node_malformed", node=node_id,
            )


_LANGUAGE_TAG = re.compile(r"[a-z]{2,3}(-[A-Za-z0-9]{2,8})*")


def _parse_translations(name: str, raw: Any, fields: tuple[TemplateField, ...]) -> dict[str, TemplateWords]:
    """``translations``: ``{"zh": {"title": ..., "description": ..., "fields": {"prompt": ...}}}``. Every
    mistake is refused by name, so a misspelt field never leaves its description silently untranslated."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise TemplateError(f"template '{name}': translations must be an object of languages", template=name,
                            code="template_translations_not_object")
    declared = {f.name for f in fields}
    parsed: dict[str, TemplateWords] = {}
    for lang, words in raw.items():
        where = f"template '{name}': translations.{lang}"
        if not _LANGUAGE_TAG.fullmatch(lang):
            raise TemplateError(f"template '{name}': translations key {lang!r} is not a language tag such as "
                                "'zh' or 'de'", template=name, code="template_translation_language_invalid",
                                language=lang)
        if not isinstance(words, dict) or set(words) - {"title", "description", "fields"}:
            raise TemplateError(f"{where} must be an object of title, description and fields", template=name,
                                code="template_translation_not_object", language=lang)
        described = words.get("fields") or {}
        if not isinstance(described, dict):
            raise TemplateError(f"{where}.fields must be an object of field name -> description", template=name,
                                code="template_translation_fields_not_object", language=lang)
        unknown = sorted(set(described) - declared)
        if unknown:
            raise TemplateError(f"{where}.fields names {', '.join(unknown)}, which is not a declared field",
                                template=name, field=unknown[0], code="template_translation_field_unknown",
                                language=lang, fields=unknown)
        texts = [words.get("title", ""), words.get("description", ""), *described.values()]
        if not all(isinstance(value, str) for value in texts):
            raise TemplateError(f"{where}: every title and description must be text", template=name,
                                code="template_translation_not_text", language=lang)
        parsed[lang] = TemplateWords(words.get("title", ""), words.get("description", ""), dict(described))
    return parsed


def parse_template(
    schema_text: str | bytes,
    workflow_text: str | bytes,
    folder: Path | None = None,
    limits: RenderLimits | None = None,
    validate_workflow: Callable[[dict[str, Any]], None] | None = None,
) -> WorkflowTemplate:
    """Build and check a template from its two files.

    Checks: the schema, the Jinja syntax, that the workflow uses no name besides its fields, that the
    filename pattern uses only fields (or ``row``, ``seed``, ``batch_id``), and that the examples render
    to an API-format workflow which ``validate_workflow`` (the engine's parse + validate, when given)
    accepts. Raises :class:`TemplateError` naming the template and, where known, the field.
    """
    limits = limits or RenderLimits()
    schema_bytes = schema_text.encode("utf-8") if isinstance(schema_text, str) else bytes(schema_text)
    workflow_bytes = workflow_text.encode("utf-8") if isinstance(workflow_text, str) else bytes(workflow_text)
    label = folder.name if folder else "uploaded"
    if len(schema_bytes) > limits.max_schema_bytes:
        raise TemplateError(f"template '{label}': {TEMPLATE_FILE} is over {limits.max_schema_bytes} bytes",
                            template=label, code="template_file_too_large", file=TEMPLATE_FILE,
                            limit=limits.max_schema_bytes)
    if len(workflow_bytes) > limits.max_template_chars:
        raise TemplateError(f"template '{label}': {WORKFLOW_FILE} is over {limits.max_template_chars} bytes",
                            template=label, code="template_file_too_large", file=WORKFLOW_FILE,
                            limit=limits.max_template_chars)
    try:
        schema = json.loads(schema_bytes.decode("utf-8-sig"))
        source = workflow_bytes.decode("utf-8-sig")
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TemplateError(f"template '{label}': {TEMPLATE_FILE} is not valid UTF-8 JSON: {exc}",
                            template=label, code="template_schema_not_json", file=TEMPLATE_FILE,
                            line=getattr(exc, "lineno", None)) from exc
    if not isinstance(schema, dict):
        raise TemplateError(f"template '{label}': {TEMPLATE_FILE} must be a JSON object", template=label,
                            code="template_schema_not_json", file=TEMPLATE_FILE, line=None)
    name = schema.get("name")
    if not isinstance(name, str) or not _TEMPLATE_NAME.fullmatch(name):
        raise TemplateError(
            f"template '{label}': name {name!r} must be 1-64 lowercase letters, digits, '_' or '-'", template=label,
            code="template_name_invalid", name=str(name),
        )
    if folder is not None and folder.name != name:
        raise TemplateError(f"template folder '{folder.name}' holds a template named '{name}'; they must match",
                            template=name, code="template_folder_mismatch", folder=folder.name)
    raw_fields = schema.get("fields")
    if not isinstance(raw_fields, list) or not raw_fields:
        raise TemplateError(f"template '{name}': 'fields' must be a non-empty list", template=name,
                            code="template_fields_missing")
    fields = tuple(_parse_field(name, raw, position) for position, raw in enumerate(raw_fields, start=1))
    seen: set[str] = set()
    by_column: dict[str, str] = {}
    for f in fields:
        if f.name.casefold() in seen:
            raise TemplateError(f"template '{name}': field '{f.name}' is declared twice", template=name, field=f.name,
                                code="template_field_declared_twice")
        seen.add(f.name.casefold())
        # Sheet columns match fields by column_key ("Product Name" is product_name): two fields with one key
        # would both read the same column
        other = by_column.setdefault(column_key(f.name), f.name)
        if other != f.name:
            raise TemplateError(
                f"template '{name}': fields '{other}' and '{f.name}' would read the same spreadsheet column "
                "(columns match fields ignoring case, spaces and repeated '_'); rename one",
                template=name, field=f.name, code="template_fields_share_column", other=other,
            )
    pattern = schema.get("filename_pattern") or "row_{row}"
    if not isinstance(pattern, str):
        raise TemplateError(f"template '{name}': filename_pattern must be a string", template=name,
                            code="template_filename_pattern_not_text")
    stray = re.sub(r"\{[A-Za-z_][A-Za-z0-9_]*\}", "", pattern)
    if "{" in stray or "}" in stray:  # "{name:>10}", "{a.b}" or an unclosed brace would land in file names
        raise TemplateError(
            f"template '{name}': filename_pattern {pattern!r} may hold only plain {{field}} placeholders",
            template=name, code="template_filename_pattern_invalid", pattern=pattern,
        )
    for placeholder in pattern_fields(pattern):
        # Filled by engine.naming.pattern_values, which matches names case-insensitively.
        if placeholder.casefold() not in seen and placeholder.casefold() not in PATTERN_BUILTINS:
            raise TemplateError(
                f"template '{name}': filename_pattern uses '{{{placeholder}}}', which is not a field "
                f"(fields: {', '.join(f.name for f in fields)}; also: {', '.join(PATTERN_BUILTINS)})",
                template=name, field=placeholder, code="template_filename_pattern_unknown",
                available=[*(f.name for f in fields), *PATTERN_BUILTINS],
            )
    tags = schema.get("tags") or []
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise TemplateError(f"template '{name}': tags must be a list of strings", template=name,
                            code="template_tags_invalid")
    translations = _parse_translations(name, schema.get("translations"), fields)

    environment = _TemplateEnvironment(limits)
    rewrite = _BudgetRewrite()
    try:
        ast = environment.parse(source)
        compiled = environment.from_string(rewrite.visit(environment.parse(source)))
    except TemplateSyntaxError as exc:
        raise TemplateError(f"template '{name}': Jinja syntax error at line {exc.lineno}: {exc.message}",
                            template=name, line=exc.lineno, code="template_jinja_syntax",
                            detail=exc.message or "") from exc
    except SecurityError as exc:  # a constant expression past the sandbox's limits, met as Jinja folds it
        raise TemplateError(f"template '{name}' refused: {exc}", template=name, code="template_over_limits",
                            detail=str(exc)) from exc
    for node in ast.find_all((nodes.Include, nodes.Import, nodes.FromImport, nodes.Extends)):
        # A template is one file: there is nothing to include, and the sandbox has no loader
        raise TemplateError(
            f"template '{name}': line {node.lineno}: include, import and extends are not supported; "
            "write the workflow as one file", template=name, line=node.lineno, code="template_include_unsupported",
        )
    for node in rewrite.unencoded_blocks:
        tag = "filter" if isinstance(node, nodes.FilterBlock) else "call"
        raise TemplateError(
            f"template '{name}': line {node.lineno}: a {{% {tag} %}} block is not supported outside a macro: "
            "what it writes would land in the workflow without being JSON-encoded; apply the filter or call "
            "inside the expression instead ({{ prompt | upper }})", template=name, line=node.lineno,
            code="template_block_unsupported", tag=tag,
        )
    for node in ast.find_all(nodes.Filter):
        if node.name == "tojson":  # every expression is JSON-encoded where it lands: this would encode twice
            raise TemplateError(
                f"template '{name}': line {node.lineno}: drop '|tojson': every {{{{ ... }}}} is already written "
                "as JSON", template=name, line=node.lineno, code="template_tojson_redundant",
            )
    used = meta.find_undeclared_variables(ast)
    undeclared = used - {f.name for f in fields} - set(environment.globals)
    if undeclared:
        listed = ", ".join(sorted(undeclared))
        raise TemplateError(
            f"template '{name}': the workflow uses {listed}, which is not a declared field",
            template=name, field=sorted(undeclared)[0], code="template_name_not_a_field", names=sorted(undeclared),
        )
    in_pattern = {placeholder.casefold() for placeholder in pattern_fields(pattern)}
    unused = [f.name for f in fields if f.name not in used and f.name.casefold() not in in_pattern]
    if unused:
        # Its column would be asked for, checked and then change nothing: a misspelt placeholder, or a
        # field left over from an edit
        raise TemplateError(
            f"template '{name}': field {', '.join(repr(u) for u in unused)} is declared but neither the workflow "
            "nor the filename_pattern uses it; use it or remove it from template.json",
            template=name, field=unused[0], code="template_field_unused", fields=unused,
        )
    content_hash = hashlib.sha256(schema_bytes + b"\0" + workflow_bytes).hexdigest()
    template = WorkflowTemplate(
        name=name, title=str(schema.get("title") or name), description=str(schema.get("description", "")),
        version=str(schema.get("version", "1")), fields=fields, filename_pattern=pattern, tags=tuple(tags),
        workflow_source=source, content_hash=content_hash, folder=folder, limits=limits,
        translations=translations, _compiled=compiled,
    )
    rendered = template.render(template.example_values(), defaults={"checkpoint": DEMO_CHECKPOINT})
    if validate_workflow is not None:
        try:
            validate_workflow(rendered)
        except TemplateError:
            raise
        except WorkflowInvalid as exc:
            # The example names files a fresh install lacks (the product photo uploaded with each sheet, a
            # LoRA or ControlNet the user adds later): those are checked per row, when the files exist.
            problems = [p for p in exc.problems if not p.extra_info.get("missing_file")]
            if problems:
                raise TemplateError(f"template '{name}': its example workflow is invalid: "
                                    f"{WorkflowInvalid(problems)}", template=name, code="template_example_invalid",
                                    node_problems=[asdict(p) for p in problems]) from exc
        except Exception as exc:
            raise TemplateError(f"template '{name}': its example workflow is invalid: {exc}", template=name,
                                code="template_example_invalid") from exc
    return template


def _template_folders(root: Path) -> list[Path]:
    """The template folders directly under ``root`` (hidden ones, e.g. an upload being written, left out)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and (p / TEMPLATE_FILE).exists())


def _same_folder(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def load_template(
    folder: str | Path,
    limits: RenderLimits | None = None,
    validate_workflow: Callable[[dict[str, Any]], None] | None = None,
) -> WorkflowTemplate:
    """Load and check the template in ``folder`` (``template.json`` + ``workflow.json.j2``)."""
    folder = Path(folder)
    try:
        schema = (folder / TEMPLATE_FILE).read_bytes()
        workflow = (folder / WORKFLOW_FILE).read_bytes()
    except OSError as exc:
        raise TemplateError(f"template '{folder.name}': cannot read {exc.filename}: {exc.strerror}",
                            template=folder.name, code="template_file_unreadable",
                            file=Path(exc.filename or "").name) from exc
    return parse_template(schema, workflow, folder=folder, limits=limits, validate_workflow=validate_workflow)


class TemplateLibrary:
    """The shipped templates in ``folder`` and, when ``user_folder`` is given, the ones admins upload or edit,
    kept there (``<data_dir>/templates``: the app's data, not its code, so they survive a Space's restart
    and leave a git checkout clean). Loads lazily; reloads a template when its files change.

    Shipped templates are read-only: :meth:`add` refuses their names (save an edited copy under another
    name), so a template's name means the same workflow wherever the code is updated. A user template
    that nonetheless carries a shipped name (copied in by hand, or shipped later) is not used: it is
    listed by :meth:`errors` with the reason. Without ``user_folder`` the one folder is both.
    """

    def __init__(
        self,
        folder: str | Path,
        limits: RenderLimits | None = None,
        validate_workflow: Callable[[dict[str, Any]], None] | None = None,
        user_folder: str | Path | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.user_folder = Path(user_folder) if user_folder is not None else None
        if self.user_folder is not None and _same_folder(self.user_folder, self.folder):
            self.user_folder = None  # one folder configured twice: it is simply the writable one
        self.limits = limits or RenderLimits()
        self.validate_workflow = validate_workflow
        self._loaded: dict[Path, tuple[tuple[int, ...], WorkflowTemplate | TemplateError]] = {}

    @classmethod
    def for_settings(
        cls, settings: Any, validate_workflow: Callable[[dict[str, Any]], None] | None = None
    ) -> TemplateLibrary:
        """The shipped templates (``settings.templates_path``) and the data folder's (``user_templates_path``)."""
        return cls(settings.templates_path, validate_workflow=validate_workflow,
                   user_folder=settings.user_templates_path)

    @property
    def writable_folder(self) -> Path:
        """Where :meth:`add` saves."""
        return self.user_folder if self.user_folder is not None else self.folder

    def _stamp(self, folder: Path) -> tuple[int, ...]:
        stamp: list[int] = []
        for file_name in (TEMPLATE_FILE, WORKFLOW_FILE):
            try:
                st = (folder / file_name).stat()
                stamp += [st.st_mtime_ns, st.st_size]
            except OSError:
                stamp += [-1, -1]
        return tuple(stamp)

    def _load(self, folder: Path) -> WorkflowTemplate | TemplateError:
        stamp = self._stamp(folder)
        cached = self._loaded.get(folder)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        try:
            result: WorkflowTemplate | TemplateError = load_template(folder, self.limits, self.validate_workflow)
        except TemplateError as exc:
            result = exc
        self._loaded[folder] = (stamp, result)
        return result

    def _shipped_folders(self) -> list[Path]:
        return _template_folders(self.folder)

    def _user_folders(self) -> tuple[list[Path], list[Path]]:
        """``(used, shadowed)``: the user folder's templates, and those whose name a shipped one has."""
        if self.user_folder is None:
            return [], []
        shipped = {p.name for p in self._shipped_folders()}
        found = _template_folders(self.user_folder)
        return [p for p in found if p.name not in shipped], [p for p in found if p.name in shipped]

    def _folders(self) -> list[Path]:
        return sorted([*self._shipped_folders(), *self._user_folders()[0]], key=lambda p: p.name)

    def is_shipped(self, name: str) -> bool:
        """Whether ``name`` is a shipped (read-only) template."""
        return self.user_folder is not None and (self.folder / name / TEMPLATE_FILE).exists()

    def list(self) -> list[WorkflowTemplate]:
        """Every template that loads, by name. Those that do not are reported by :meth:`errors`."""
        return [t for t in (self._load(p) for p in self._folders()) if isinstance(t, WorkflowTemplate)]

    def errors(self) -> dict[str, TemplateError]:
        """Template folders that fail to load, or are not used, with the reason."""
        found = {p.name: t for p in self._folders() if isinstance(t := self._load(p), TemplateError)}
        for folder in self._user_folders()[1]:
            found.setdefault(folder.name, TemplateError(
                f"{folder} is not used: a shipped template is named '{folder.name}'; rename it (change the "
                "name in its template.json and the folder)", template=folder.name))
        return found

    def names(self) -> list[str]:
        return [t.name for t in self.list()]

    def describe_available(self) -> str:
        """What a user asking for a template needs to hear: the names there are, or why there are none."""
        if not self.folder.is_dir() and (self.user_folder is None or not self.user_folder.is_dir()):
            return f"the templates folder {self.folder} does not exist (setting templates_dir)"
        names = self.names()
        return f"available: {', '.join(names)}" if names else f"the templates folder {self.folder} holds none"

    def get(self, name: str) -> WorkflowTemplate:
        """The template ``name``; :class:`TemplateError` naming the available ones when there is none."""
        folder = self._folder_of(name)
        if folder is None:
            raise TemplateError(f"no template '{name}'; {self.describe_available()}", template=name,
                                code="template_not_found", available=self.names())
        result = self._load(folder)
        if isinstance(result, TemplateError):
            raise result
        return result

    def _folder_of(self, name: str) -> Path | None:
        if not _TEMPLATE_NAME.fullmatch(name or ""):
            return None
        for root in (self.folder, self.user_folder):  # shipped first: a shipped name is never shadowed
            if root is not None and (root / name / TEMPLATE_FILE).exists():
                return root / name
        return None

    def add(self, files: Mapping[str, bytes], replace: bool = False) -> WorkflowTemplate:
        """Validate and save an uploaded template (admins only; the caller checks the role).

        ``files`` maps file names (``template.json``, ``workflow.json.j2``, optionally ``example.png``) to
        their bytes. Nothing is written unless the whole template checks out; the folder appears at once
        (written aside, then renamed). An existing template is replaced only with ``replace=True``.
        """
        by_name = {Path(k).name: v for k, v in files.items()}
        unknown = set(by_name) - {TEMPLATE_FILE, WORKFLOW_FILE, EXAMPLE_FILE}
        if unknown:
            raise TemplateError(
                f"unexpected files {', '.join(sorted(unknown))}; a template is {TEMPLATE_FILE}, {WORKFLOW_FILE} "
                f"and optionally {EXAMPLE_FILE}", code="template_upload_unexpected_files", files=sorted(unknown),
            )
        for required in (TEMPLATE_FILE, WORKFLOW_FILE):
            if required not in by_name:
                raise TemplateError(f"the upload lacks {required}", code="template_upload_lacks_file", file=required)
        template = parse_template(by_name[TEMPLATE_FILE], by_name[WORKFLOW_FILE], limits=self.limits,
                                  validate_workflow=self.validate_workflow)
        example = by_name.get(EXAMPLE_FILE)
        if example is not None and (not example.startswith(_PNG_SIGNATURE)
                                    or len(example) > self.limits.max_example_bytes):
            raise TemplateError(f"{EXAMPLE_FILE} must be a PNG under {self.limits.max_example_bytes} bytes",
                                template=template.name, code="template_example_not_png",
                                limit_kib=self.limits.max_example_bytes // 1024)
        if self.is_shipped(template.name):
            raise TemplateError(f"'{template.name}' is a shipped template and cannot be replaced; save your version "
                                "under another name (the \"name\" in template.json)", template=template.name,
                                code="template_shipped")
        folder = self.writable_folder
        target = folder / template.name
        if target.exists() and not replace:
            raise TemplateError(f"template '{template.name}' already exists; save it with replace to overwrite it",
                                template=template.name, code="template_exists")
        folder.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{template.name}-", dir=folder))
        try:
            for file_name, data in by_name.items():
                with open(staging / file_name, "wb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
            if target.exists():
                retired = Path(tempfile.mkdtemp(prefix=f".{template.name}-old-", dir=folder))
                os.replace(target, retired / template.name)
                os.replace(staging, target)
                shutil.rmtree(retired, ignore_errors=True)
            else:
                os.replace(staging, target)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        return self.get(template.name)
