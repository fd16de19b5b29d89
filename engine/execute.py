"""Run a validated workflow: ancestors of output nodes in topological order, with a signature cache.

A node's *signature* hashes its class type, its literal inputs (as converted for ``run``) and, for each
linked input, the signature of the source node and the output index. Non-output, cacheable nodes are
served from an LRU cache keyed by signature across runs of the same :class:`Executor`, which is what keeps
loaders and unchanged text encodings resident. Output nodes and ``cacheable = False`` nodes always run
(identical rows are still separate generations); a node downstream of a non-cacheable node is never
cached either, since its inputs may differ from run to run.

Record entries a node writes into ``ctx.record`` are stored with its cached outputs and written again on
a cache hit, so the record of a run does not depend on what an earlier run left in the cache. A
``run_batch`` result per row may be a dict ``{"result": (...), "record": {...}}`` carrying that row's
own record entries. Cached outputs hold references (model handles, tensors): call
:meth:`Executor.clear_cache` when models are unloaded so their memory can actually be freed.

No torch import at module load: out-of-memory errors are recognised by class name and message.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from engine.errors import (
    Cancelled,
    DeadlineExceeded,
    EngineError,
    ExecutionError,
    OutOfMemory,
    WorkflowInvalid,
)
from engine.validate import coerce_literal, ensure_valid, output_ancestors
from engine.workflow import Link, Workflow, node_sort_key

if TYPE_CHECKING:
    from engine.nodes.base import NodeRegistry, NodeType
    from engine.nodes.context import NodeContext, ProgressEvent

__all__ = ["ExecutionOutcome", "Executor", "batch_key", "full_type_name", "is_out_of_memory"]

_ABSENT = object()


@dataclass
class ExecutionOutcome:
    """What one workflow run produced.

    ``outputs`` maps each output node id to the ``ui`` dict it returned; ``timings`` maps node ids to
    seconds spent running (0.0 for cache hits); ``cache_hits`` lists the nodes served from the cache.
    """

    outputs: dict[str, dict[str, Any]]
    record: dict[str, Any]
    saved_images: list[Any]
    timings: dict[str, float]
    cache_hits: list[str]
    total_s: float = 0.0


@dataclass
class _CacheEntry:
    outputs: tuple[Any, ...]
    record_updates: dict[str, Any]


@dataclass
class _Row:
    """One workflow of a batch while it runs."""

    index: int
    workflow: Workflow
    ctx: "NodeContext"
    values: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    signatures: dict[str, str] = field(default_factory=dict)
    volatile: set[str] = field(default_factory=set)  # nodes whose result may differ run to run
    literals: dict[str, dict[str, Any]] = field(default_factory=dict)  # node -> converted literal inputs
    inputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    cached_at_start: list[str] = field(default_factory=list)  # nodes the cache held when the row began
    timings: dict[str, float] = field(default_factory=dict)
    cache_hits: list[str] = field(default_factory=list)
    error: EngineError | None = None
    started: float = field(default_factory=time.perf_counter)


def batch_key(workflow: Workflow) -> str:
    """The shape of a workflow: its nodes, class types and links, not its literal values.

    Workflows with equal keys can run together in :meth:`Executor.execute_batch`.
    """
    shape = []
    for node_id in sorted(workflow.nodes, key=node_sort_key):
        node = workflow.nodes[node_id]
        links = sorted((name, link.node_id, link.output_index) for name, link in node.links().items())
        shape.append([node_id, node.class_type, links])
    return hashlib.sha256(json.dumps(shape).encode()).hexdigest()


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is a device out-of-memory error (torch's, without importing torch)."""
    if any(cls.__name__ == "OutOfMemoryError" for cls in type(exc).__mro__):
        return True
    return "CUDA out of memory" in str(exc)


class Executor:
    """Runs workflows on a node registry, keeping an LRU cache of node outputs across runs."""

    def __init__(self, registry: "NodeRegistry", cache_size: int = 64) -> None:
        if cache_size < 0:
            raise ValueError(f"cache_size must be >= 0, got {cache_size}")
        self.registry = registry
        self.cache_size = cache_size
        self.cache_hits = 0  # cache hits over this executor's lifetime
        self._cache: OrderedDict[str, _CacheEntry] = OrderedDict()

    def clear_cache(self) -> None:
        """Forget every cached node output (e.g. after models were unloaded)."""
        self._cache.clear()

    @property
    def cached_signatures(self) -> list[str]:
        return list(self._cache)

    def execute(self, workflow: Workflow, ctx: "NodeContext") -> ExecutionOutcome:
        """Validate and run ``workflow``; raise the node's error (an :class:`EngineError`) on failure."""
        result = self.execute_batch([workflow], [ctx])[0]
        if isinstance(result, EngineError):
            raise result
        return result

    def execute_batch(
        self, workflows: Sequence[Workflow], ctxs: Sequence["NodeContext"]
    ) -> list[ExecutionOutcome | EngineError]:
        """Run several rows, one context each; rows of the same shape (:func:`batch_key`) run together.

        Per node, rows with equal signatures share one run; rows with different inputs go through the
        node's ``run_batch`` when it defines one (one call for the group), else ``run`` per row. A row whose
        node fails gets its error in its slot and takes no further part; the other rows go on. If a
        ``run_batch`` call fails for a reason other than cancellation or a deadline, its rows are run one by
        one so that only the row at fault fails.
        """
        if len(workflows) != len(ctxs):
            raise ValueError(f"{len(workflows)} workflows but {len(ctxs)} contexts")
        results: list[ExecutionOutcome | EngineError | None] = [None] * len(workflows)
        shapes: dict[str, list[_Row]] = {}
        for index, (workflow, ctx) in enumerate(zip(workflows, ctxs)):
            try:
                ensure_valid(workflow, self.registry, ctx)
            except WorkflowInvalid as invalid:
                results[index] = invalid
                continue
            shapes.setdefault(batch_key(workflow), []).append(_Row(index, workflow, ctx))
        for rows in shapes.values():
            self._run_rows(rows)
            for row in rows:
                results[row.index] = self._failure(row) if row.error is not None else self._outcome(row)
        return [result for result in results if result is not None]  # every slot is filled by now

    # --- running ------------------------------------------------------------------------------------

    def _run_rows(self, rows: list[_Row]) -> None:
        order = output_ancestors(rows[0].workflow, self.registry)
        for row in rows:
            self._sign_all(row, order)
        for node_id in order:
            live = [row for row in rows if row.error is None]
            if not live:
                return
            node_cls = self.registry.get(live[0].workflow.nodes[node_id].class_type)
            assert node_cls is not None  # validated
            ready = []
            for row in live:
                if self._prepare(row, node_id, node_cls):
                    ready.append(row)
            if node_cls.output_node:
                for row in ready:
                    self._call(node_id, node_cls, [[row]])
                continue
            groups: OrderedDict[str, list[_Row]] = OrderedDict()
            for row in ready:
                groups.setdefault(row.signatures[node_id], []).append(row)
            pending = [members for sig, members in groups.items() if not self._serve_cached(node_id, sig, members)]
            if not pending:
                continue
            if len(pending) > 1 and callable(getattr(node_cls, "run_batch", None)):
                self._call(node_id, node_cls, pending)
            else:
                for members in pending:
                    self._call(node_id, node_cls, [members])

    def _sign_all(self, row: _Row, order: list[str]) -> None:
        """Every node's signature before anything runs, then one "cached" progress event naming the nodes
        the cache holds (ComfyUI's single execution_cached message); a failing fingerprint fails the row."""
        for node_id in order:
            node_cls = self.registry.get(row.workflow.nodes[node_id].class_type)
            assert node_cls is not None  # validated
            if not self._sign(row, node_id, node_cls):
                return
        row.ctx.node_id = row.ctx.class_type = None
        cached = tuple(n for n in order if n not in row.volatile and row.signatures[n] in self._cache)
        row.cached_at_start = list(cached)
        row.ctx.progress("cached", nodes=cached)

    def _sign(self, row: _Row, node_id: str, node_cls: "type[NodeType]") -> bool:
        """The row's converted literals and signature for ``node_id``; False if the row failed here."""
        node = row.workflow.nodes[node_id]
        literals: dict[str, Any] = {}
        link_part: list[Any] = []
        volatile = not node_cls.cacheable
        for spec in node_cls.inputs:
            value = node.inputs.get(spec.name, _ABSENT)
            if value is _ABSENT:
                continue  # optional input left out: the node's own default applies
            if isinstance(value, Link):
                link_part.append([spec.name, row.signatures[value.node_id], value.output_index])
                volatile = volatile or value.node_id in row.volatile
            else:
                literals[spec.name] = coerce_literal(spec, value, row.ctx, check_choices=False)
        literal_part = list(literals.items())
        try:
            fingerprint = node_cls.fingerprint(dict(literal_part), row.ctx)
        except EngineError as exc:
            row.error = _node_error(exc, node_id, node.class_type)
            return False
        text = json.dumps([node.class_type, literal_part, link_part, fingerprint], default=repr, sort_keys=True)
        if volatile:
            row.volatile.add(node_id)
            text += f"#volatile-row:{row.index}"  # never shared with another row (and never cached)
        row.signatures[node_id] = hashlib.sha256(text.encode()).hexdigest()
        row.literals[node_id] = literals
        return True

    def _prepare(self, row: _Row, node_id: str, node_cls: "type[NodeType]") -> bool:
        """Gather the row's inputs for ``node_id``; False if the row was stopped here."""
        node = row.workflow.nodes[node_id]
        row.ctx.node_id, row.ctx.class_type = node_id, node.class_type
        try:
            row.ctx.check_interrupt()
        except EngineError as exc:
            row.error = exc
            return False
        inputs: dict[str, Any] = {}
        for spec in node_cls.inputs:  # declaration order, as the node's run() receives them
            value = node.inputs.get(spec.name, _ABSENT)
            if isinstance(value, Link):
                inputs[spec.name] = row.values[value.node_id][value.output_index]
            elif spec.name in row.literals[node_id]:
                inputs[spec.name] = row.literals[node_id][spec.name]
        row.inputs[node_id] = inputs
        return True

    def _serve_cached(self, node_id: str, signature: str, members: list[_Row]) -> bool:
        if node_id in members[0].volatile:
            return False
        entry = self._cache.get(signature)
        if entry is None:
            return False
        self._cache.move_to_end(signature)
        for row in members:
            self.cache_hits += 1
            row.values[node_id] = entry.outputs
            row.ctx.record.update(entry.record_updates)
            row.cache_hits.append(node_id)
            row.timings[node_id] = 0.0
        return True

    def _call(self, node_id: str, node_cls: "type[NodeType]", groups: list[list[_Row]]) -> None:
        """One call for ``groups`` (rows with equal signatures per group): ``run``, or ``run_batch``."""
        rows = [row for members in groups for row in members]
        ctx = rows[0].ctx if len(rows) == 1 else _shared_context(rows)
        for row in rows:
            row.ctx.progress("node")
        record_before = dict(ctx.record)
        node = node_cls()
        started = time.perf_counter()
        try:
            if len(groups) == 1:
                results = [node.run(ctx, **groups[0][0].inputs[node_id])]
            else:
                results = list(node.run_batch(ctx, [members[0].inputs[node_id] for members in groups]))
                if len(results) != len(groups):
                    raise ExecutionError(
                        f"{node_cls.class_type}.run_batch returned {len(results)} results for {len(groups)} rows",
                        node_id=node_id, class_type=node_cls.class_type,
                    )
            _wait_for_device(ctx.device)
        except Exception as exc:  # every failure becomes an EngineError naming the node
            error = _node_error(exc, node_id, node_cls.class_type)
            if len(groups) > 1 and not isinstance(error, (Cancelled, DeadlineExceeded)):
                for members in groups:  # isolate the row at fault
                    self._call(node_id, node_cls, [members])
                return
            for row in rows:
                row.error = error
            return
        elapsed = time.perf_counter() - started
        record_updates = {
            k: v for k, v in ctx.record.items() if record_before.get(k, _ABSENT) is not v
        }
        for members, result in zip(groups, results):
            try:
                outputs, ui, row_record = _split_result(result, node_id, node_cls)
            except ExecutionError as error:
                for row in members:
                    row.error = error
                continue
            updates = {**record_updates, **row_record}
            for row in members:
                row.values[node_id] = outputs
                row.timings[node_id] = elapsed
                row.ctx.record.update(updates)
                if node_cls.output_node:
                    row.outputs[node_id] = ui
            if not node_cls.output_node and node_id not in members[0].volatile and self.cache_size > 0:
                self._cache[members[0].signatures[node_id]] = _CacheEntry(outputs, updates)
                self._cache.move_to_end(members[0].signatures[node_id])
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)

    def _failure(self, row: _Row) -> EngineError:
        """The row's error, its details completed with what ComfyUI's execution_error reports: the nodes
        that ran before it (``executed``), those served from the cache (``cached``) and the failing node's
        inputs (``current_inputs``, ComfyUI's shape: a list of values per input)."""
        error = row.error
        assert error is not None
        node_id = getattr(error, "node_id", None)
        error.details["executed"] = [n for n in row.timings if n not in row.cache_hits]
        error.details["cached"] = list(row.cached_at_start)
        inputs = row.inputs.get(node_id, {}) if node_id else {}
        error.details["current_inputs"] = {name: [_shown_value(value)] for name, value in inputs.items()}
        return error

    def _outcome(self, row: _Row) -> ExecutionOutcome:
        row.ctx.node_id = row.ctx.class_type = None
        row.ctx.progress("done")
        return ExecutionOutcome(
            outputs=row.outputs,
            record=row.ctx.record,
            saved_images=row.ctx.saved_images,
            timings=row.timings,
            cache_hits=row.cache_hits,
            total_s=time.perf_counter() - row.started,
        )


def _split_result(
    result: Any, node_id: str, node_cls: "type[NodeType]"
) -> tuple[tuple[Any, ...], dict[str, Any], dict[str, Any]]:
    """(output values, ui dict, row record) from what ``run``/``run_batch`` returned for one row.

    A node returns a tuple (one value per output) or a dict ``{"result": tuple, "ui": {...}, "record":
    {...}}``; ``record`` carries a row's own generation parameters out of a ``run_batch`` call, where one
    shared ``ctx.record`` could not tell the rows apart.
    """
    ui: dict[str, Any] = {}
    row_record: dict[str, Any] = {}
    if isinstance(result, dict):
        ui = dict(result.get("ui") or {})
        row_record = dict(result.get("record") or {})
        result = result.get("result", ())
    if result is None and not node_cls.outputs:
        result = ()
    if not isinstance(result, (tuple, list)) or len(result) != len(node_cls.outputs):
        shown = len(result) if isinstance(result, (tuple, list)) else type(result).__name__
        raise ExecutionError(
            f"{node_cls.class_type} returned {shown} values but declares {len(node_cls.outputs)} outputs",
            node_id=node_id, class_type=node_cls.class_type,
        )
    return tuple(result), ui, row_record


def full_type_name(cls: type) -> str:
    """A class's name as ComfyUI reports an exception type: module-qualified unless it is a builtin."""
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


def _shown_value(value: Any) -> Any:
    """An input value as an error report can carry it: plain values as they are, others by type (and
    shape), never a tensor's contents."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    shape = getattr(value, "shape", None)
    return f"{type(value).__name__}{tuple(shape)}" if shape is not None else type(value).__name__


def _node_error(exc: BaseException, node_id: str, class_type: str) -> EngineError:
    """``exc`` as an EngineError that names the node it came from."""
    if isinstance(exc, EngineError):
        if getattr(exc, "node_id", None) is None:
            exc.node_id = node_id  # type: ignore[attr-defined]
            exc.details["node_id"] = node_id
        if getattr(exc, "class_type", None) is None:
            exc.class_type = class_type  # type: ignore[attr-defined]
            exc.details["class_type"] = class_type
        return exc
    if is_out_of_memory(exc):
        error: EngineError = OutOfMemory(
            f"out of device memory in {class_type} (node {node_id}): {exc}",
            node_id=node_id, class_type=class_type, exception_type=full_type_name(type(exc)), code="out_of_memory",
        )
    else:
        error = ExecutionError(
            f"{class_type} (node {node_id}) failed: {type(exc).__name__}: {exc}",
            node_id=node_id, class_type=class_type, exception_type=full_type_name(type(exc)),
            code="node_failed", error=f"{type(exc).__name__}: {exc}",
        )
    error.__cause__ = exc
    return error


def _wait_for_device(device: str | None) -> None:
    """On CUDA, wait until the node's kernels have run: its timing is then its GPU work, not its launches
    (and an asynchronous device error is reported by the node that caused it)."""
    if str(device or "").startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)


def _shared_context(rows: list[_Row]) -> "NodeContext":
    """One context for a call that serves several rows: progress reaches every row, any cancel stops it."""
    first = rows[0].ctx
    callbacks = [(row.index, row.ctx.on_progress) for row in rows if row.ctx.on_progress is not None]
    cancels = [row.ctx.should_cancel for row in rows if row.ctx.should_cancel is not None]
    deadlines = [row.ctx.deadline for row in rows if row.ctx.deadline is not None]
    limits = [row.ctx.sampler_time_limit_s for row in rows if row.ctx.sampler_time_limit_s is not None]

    def on_progress(event: "ProgressEvent") -> None:
        for _, callback in callbacks:
            callback(event)

    return dataclasses.replace(
        first,
        on_progress=on_progress if callbacks else None,
        should_cancel=(lambda: any(cancel() for cancel in cancels)) if cancels else None,
        deadline=min(deadlines) if deadlines else None,
        sampler_time_limit_s=min(limits) if limits else None,
    )
