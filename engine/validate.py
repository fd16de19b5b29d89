"""Validate a parsed workflow against the node registry before any model work.

Every problem is reported, per node, with ComfyUI's error types (see ``NodeProblem``). Only ancestors of
output nodes are checked, as ComfyUI does: a stray unconnected node is ignored, except that an unknown
class type is reported wherever it appears (it might be an output node we cannot recognise).
Validation never mutates the workflow; :func:`coerce_literal` gives the value the executor will pass.
"""

from __future__ import annotations

import copy
import heapq
import math
import sys
from collections.abc import Iterable
from dataclasses import dataclass, replace
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any

from engine.errors import NodeProblem, WorkflowInvalid
from engine.workflow import GraphNode, Link, Workflow, node_sort_key

if TYPE_CHECKING:
    from engine.nodes.base import Input, NodeRegistry, NodeType
    from engine.nodes.context import NodeContext

__all__ = [
    "LiteralProblem",
    "coerce_literal",
    "ensure_valid",
    "find_cycles",
    "output_ancestors",
    "output_node_ids",
    "output_subgraph",
    "prompt_as_comfyui_keeps_it",
    "runnable_outputs",
    "types_compatible",
    "validate_workflow",
]

BOOLEAN_WORDS = {"true": True, "false": False}


class LiteralProblem(ValueError):
    """A literal does not fit its declared input; ``type`` is ComfyUI's error type, ``extra`` the values
    behind the message (``choices``, ``min``, ``expected_type``...), which land in the problem's
    ``extra_info`` so a page can say the same in another language."""

    def __init__(self, type: str, message: str, details: str = "", **extra: Any) -> None:
        super().__init__(message)
        self.type, self.message, self.details, self.extra = type, message, details, extra


def validate_workflow(
    workflow: Workflow, registry: "NodeRegistry", ctx: "NodeContext | None" = None
) -> list[NodeProblem]:
    """Every problem of ``workflow``: unknown nodes, no outputs, cycles, missing/bad links and literals.

    ``ctx`` (optional) lets COMBO inputs list their run-time choices (model files on disk).
    """
    shape = _graph_shape(workflow, registry, ctx)
    problems = _unknown_node_types(workflow, registry) if shape.has_unknown_types else []
    if not shape.outputs:
        problems.append(NodeProblem(
            None, None, "prompt_no_outputs", "Prompt has no outputs",
            "a workflow needs at least one output node (e.g. SaveImage or PreviewImage)",
        ))
        return problems
    for cycle in shape.cycles:
        named = ", ".join(f"{n} ({workflow.nodes[n].class_type})" for n in cycle)
        problems.append(NodeProblem(
            None, None, "invalid_prompt", f"workflow has a cycle through nodes {named}",
            "a node cannot depend on its own output", extra_info={"nodes": list(cycle)},
        ))
    for node_id in shape.order:
        node = workflow.nodes[node_id]
        node_cls = registry.get(node.class_type)
        if node_cls is not None:
            problems.extend(_node_problems(workflow, node, node_cls, registry, ctx))
    needed_by = shape.needed_by
    return [replace(p, dependent_outputs=tuple(needed_by.get(p.node_id, ()))) if p.node_id else p for p in problems]


@dataclass(frozen=True)
class _GraphShape:
    """What validation learns from a graph's nodes and links alone, whatever its literal values."""

    has_unknown_types: bool
    outputs: tuple[str, ...]  # output node ids, natural order
    order: tuple[str, ...]  # their ancestors, topologically (see _ancestor_order)
    cycles: tuple[tuple[str, ...], ...]
    needed_by: dict[str, list[str]]  # node id -> the outputs that need it


def _graph_shape(workflow: Workflow, registry: "NodeRegistry", ctx: "NodeContext | None") -> _GraphShape:
    """The :class:`_GraphShape` of ``workflow``, worked out once per shape while ``ctx`` keeps lookups: a
    batch's rows render one template into the same few graphs that differ only in their values."""

    def analyse() -> _GraphShape:
        outputs = output_node_ids(workflow, registry)
        order, cycles = _ancestor_order(workflow, registry) if outputs else ([], [])
        return _GraphShape(
            has_unknown_types=any(registry.get(node.class_type) is None for node in workflow.nodes.values()),
            outputs=tuple(outputs), order=tuple(order), cycles=tuple(tuple(c) for c in cycles),
            needed_by=_outputs_needing(workflow, outputs),
        )

    if ctx is None or ctx.lookups is None:
        return analyse()
    key = ("graph shape", tuple(
        (node_id, node.class_type,
         tuple((name, value.node_id, value.output_index) for name, value in node.inputs.items()
               if isinstance(value, Link)))
        for node_id, node in workflow.nodes.items()
    ))
    return ctx.read_once(key, analyse)


def runnable_outputs(
    workflow: Workflow, registry: "NodeRegistry", ctx: "NodeContext | None" = None,
    targets: Iterable[str] | None = None,
) -> tuple[list[str], list[NodeProblem]]:
    """ComfyUI's validate_prompt: (the output nodes that validate, the problems of those that do not).

    Only the output nodes among ``targets`` count when it is given (ComfyUI's partial execution). Raises
    :class:`WorkflowInvalid` when nothing can run: an unknown node type anywhere in the workflow, no output
    node (among the targets), a cycle, or no output node that validates.
    """
    unknown = _unknown_node_types(workflow, registry)
    if unknown:
        raise WorkflowInvalid(unknown)
    wanted = None if targets is None else {str(t) for t in targets}
    outputs = [o for o in output_node_ids(workflow, registry) if wanted is None or o in wanted]
    if not outputs:
        raise WorkflowInvalid([NodeProblem(
            None, None, "prompt_no_outputs", "Prompt has no outputs",
            "none of the nodes to run is an output node" if wanted is not None
            else "a workflow needs at least one output node (e.g. SaveImage or PreviewImage)",
        )])
    problems = validate_workflow(output_subgraph(workflow, outputs), registry, ctx)
    if any(p.node_id is None for p in problems):
        raise WorkflowInvalid(problems)
    failing = {o for p in problems for o in p.dependent_outputs}
    good = [o for o in outputs if o not in failing]
    if not good:
        raise WorkflowInvalid(problems)
    return good, problems


def output_subgraph(workflow: Workflow, outputs: Iterable[str]) -> Workflow:
    """The part of ``workflow`` that ``outputs`` need: those output nodes and their ancestors. Running it
    runs exactly those outputs (only ancestors of output nodes ever run)."""
    keep: set[str] = set()
    pending = [o for o in outputs if o in workflow.nodes]
    while pending:
        node_id = pending.pop()
        if node_id in keep:
            continue
        keep.add(node_id)
        pending.extend(l.node_id for l in workflow.nodes[node_id].links().values() if l.node_id in workflow.nodes)
    return replace(workflow, nodes={n: node for n, node in workflow.nodes.items() if n in keep})


def _unknown_node_types(workflow: Workflow, registry: "NodeRegistry") -> list[NodeProblem]:
    """A problem per node whose class type the registry does not know, wherever it is in the workflow."""
    return [
        NodeProblem(
            node_id, node.class_type, "invalid_prompt",
            f"unknown node type '{node.class_type}'; supported node types: {', '.join(registry.names())}",
            f"Node ID '#{node_id}'", extra_info={"unknown_node_type": node.class_type},
        )
        for node_id in sorted(workflow.nodes, key=node_sort_key)
        if registry.get((node := workflow.nodes[node_id]).class_type) is None
    ]


def _outputs_needing(workflow: Workflow, outputs: list[str]) -> dict[str, list[str]]:
    """node id -> the output nodes among ``outputs`` that need it (an output needs itself)."""
    needed_by: dict[str, list[str]] = {}
    for output in outputs:
        seen: set[str] = set()
        pending = [output]
        while pending:
            node_id = pending.pop()
            if node_id in seen or node_id not in workflow.nodes:
                continue
            seen.add(node_id)
            pending.extend(link.node_id for link in workflow.nodes[node_id].links().values())
        for node_id in seen:
            needed_by.setdefault(node_id, []).append(output)
    return needed_by


def ensure_valid(workflow: Workflow, registry: "NodeRegistry", ctx: "NodeContext | None" = None) -> None:
    """Raise :class:`WorkflowInvalid` listing every problem, or return None when there are none."""
    problems = validate_workflow(workflow, registry, ctx)
    if problems:
        raise WorkflowInvalid(problems)


def output_node_ids(workflow: Workflow, registry: "NodeRegistry") -> list[str]:
    """Ids of the nodes whose (known) class is an output node, in natural id order."""
    found = []
    for node_id in sorted(workflow.nodes, key=node_sort_key):
        node_cls = registry.get(workflow.nodes[node_id].class_type)
        if node_cls is not None and node_cls.output_node:
            found.append(node_id)
    return found


def output_ancestors(workflow: Workflow, registry: "NodeRegistry") -> list[str]:
    """Output nodes and everything they depend on, in a deterministic topological order.

    Raises :class:`WorkflowInvalid` when those nodes form a cycle.
    """
    order, cycles = _ancestor_order(workflow, registry)
    if cycles:
        raise WorkflowInvalid([
            NodeProblem(None, None, "invalid_prompt",
                        f"workflow has a cycle through nodes {', '.join(cycle)}",
                        extra_info={"nodes": list(cycle)})
            for cycle in cycles
        ])
    return order


def find_cycles(workflow: Workflow, node_ids: Iterable[str]) -> list[list[str]]:
    """The cycles (strongly connected components with a loop) among ``node_ids``, each sorted."""
    members = set(node_ids)
    edges = {n: sorted({l.node_id for l in workflow.nodes[n].links().values() if l.node_id in members},
                       key=node_sort_key) for n in members}
    # Iterative Tarjan: deep graphs must not hit the recursion limit.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = 0
    for root in sorted(members, key=node_sort_key):
        if root in index:
            continue
        work = [(root, iter(edges[root]))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(edges[child])))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1 or node in edges[node]:
                    cycles.append(sorted(component, key=node_sort_key))
    return sorted(cycles, key=lambda c: node_sort_key(c[0]))


def _ancestor_order(workflow: Workflow, registry: "NodeRegistry") -> tuple[list[str], list[list[str]]]:
    """(ancestors of output nodes in topological order, cycles among them).

    Nodes caught in or behind a cycle come last, in natural id order, so callers can still check them.
    """
    ancestors: set[str] = set()
    pending = output_node_ids(workflow, registry)
    while pending:
        node_id = pending.pop()
        if node_id in ancestors:
            continue
        ancestors.add(node_id)
        for link in workflow.nodes[node_id].links().values():
            if link.node_id in workflow.nodes and link.node_id not in ancestors:
                pending.append(link.node_id)
    sources = {n: {l.node_id for l in workflow.nodes[n].links().values() if l.node_id in ancestors}
               for n in ancestors}
    consumers: dict[str, list[str]] = {n: [] for n in ancestors}
    for node_id, deps in sources.items():
        for dep in deps:
            consumers[dep].append(node_id)
    waiting = {n: len(deps) for n, deps in sources.items()}
    ready = [(node_sort_key(n), n) for n, count in waiting.items() if count == 0]
    heapq.heapify(ready)
    order: list[str] = []
    while ready:
        _, node_id = heapq.heappop(ready)
        order.append(node_id)
        for consumer in consumers[node_id]:
            waiting[consumer] -= 1
            if waiting[consumer] == 0:
                heapq.heappush(ready, (node_sort_key(consumer), consumer))
    stuck = sorted(ancestors.difference(order), key=node_sort_key)
    cycles = find_cycles(workflow, stuck) if stuck else []
    return order + stuck, cycles


def types_compatible(output_type: str, input_type: str) -> bool:
    """Whether an output of ``output_type`` may feed an input of ``input_type`` (ComfyUI's rule).

    "*" matches anything; comma-separated types are unions.
    """
    if output_type == input_type or "*" in (output_type, input_type):
        return True
    return bool(set(output_type.split(",")) & set(input_type.split(",")))


def coerce_literal(
    spec: "Input", value: Any, ctx: "NodeContext | None" = None, check_choices: bool = True,
    check_range: bool = True,
) -> Any:
    """The value ``spec`` accepts for literal ``value``, converted exactly; raises :class:`LiteralProblem`.

    INT takes ints, floats (truncated toward zero, as ComfyUI's int()) and integer strings (never through
    float, so 64-bit seeds stay exact);
    bools are not numbers. FLOAT takes finite numbers and numeric strings. STRING takes text and numbers
    (as ComfyUI does). BOOLEAN takes bools, 0/1 and "true"/"false". COMBO takes one of its choices.
    Ranges (min/max) are checked after conversion, unless ``check_range`` is false.
    """
    kind = spec.type
    if kind == "INT":
        result: Any = _to_int(value)
    elif kind == "FLOAT":
        result = _to_float(value)
    elif kind == "STRING":
        if isinstance(value, str):
            result = value
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            result = str(value)
        else:
            raise _wrong_type(spec, value)
    elif kind == "BOOLEAN":
        if isinstance(value, bool):
            result = value
        elif isinstance(value, int) and value in (0, 1):
            result = bool(value)
        elif isinstance(value, str) and value.strip().lower() in BOOLEAN_WORDS:
            result = BOOLEAN_WORDS[value.strip().lower()]
        else:
            raise _wrong_type(spec, value)
    elif kind == "COMBO":
        result = value
        if check_choices:
            choices = spec.choice_list(ctx)
            accepts = getattr(spec.choices, "accepts", None)  # model lists also take cached hub repo ids
            if not isinstance(value, (str, int, float)) or (
                    value not in choices and not (accepts is not None and _accepted(spec, accepts, ctx, value))):
                shown = ", ".join(map(str, choices[:50])) + (" ..." if len(choices) > 50 else "")
                where = getattr(spec.choices, "where", None)  # model lists: say where the file goes
                details = "no values are available" if not choices else ""
                if where is not None:
                    details = f"put the file in {where(ctx)}" if not choices else f"files are looked up in {where(ctx)}"
                raise LiteralProblem(
                    "value_not_in_list", f"Value not in list: {spec.name}: '{value}' not in [{shown}]", details,
                    choices=[_jsonable(c) for c in choices[:50]], choice_count=len(choices),
                )
    else:
        raise LiteralProblem(
            "invalid_input_type",
            f"input '{spec.name}' takes a link to a {kind} output, got the literal {_short(value)}",
            expected_type=kind, link_only=True,
        )
    if kind in ("INT", "FLOAT") and check_range:
        if spec.min is not None and result < spec.min:
            raise LiteralProblem(
                "value_smaller_than_min", f"Value {result} smaller than min of {spec.min}: {spec.name}", min=spec.min
            )
        if spec.max is not None and result > spec.max:
            raise LiteralProblem(
                "value_bigger_than_max", f"Value {result} bigger than max of {spec.max}: {spec.name}", max=spec.max
            )
    return result


def _accepted(spec: "Input", accepts: Any, ctx: "NodeContext | None", value: Any) -> bool:
    """Whether a COMBO's own rule takes ``value`` beyond its list (a hub repo id in the local cache)."""
    from engine.nodes.context import read_once

    return bool(read_once(ctx, ("accepts", spec.choices, value), lambda: accepts(ctx, value)))


def prompt_as_comfyui_keeps_it(
    prompt: dict[str, Any], registry: "NodeRegistry", targets: Iterable[str] | None = None,
) -> dict[str, Any]:
    """An API-format ``prompt`` as ComfyUI keeps it for ``/queue`` and ``/history`` once validated.

    ComfyUI's validation writes each INT, FLOAT and STRING literal it converts back into the prompt (a
    seed sent as ``"123"`` is kept as ``123``, steps ``2.5`` as ``2``, cfg ``7`` as ``7.0``), and a client
    reads those values back from the history. This gives that copy, with the values the engine runs with,
    of the nodes ComfyUI checks: the output nodes (those among ``targets`` when given) and their
    ancestors, links being what ComfyUI takes them for, lists. A literal that does not convert is kept as
    sent. ``prompt`` itself is left as it is: the engine's validation never changes a workflow.
    """
    kept = copy.deepcopy(prompt)
    wanted = None if targets is None else {str(t) for t in targets}

    def node_class(node_id: str) -> "type[NodeType] | None":
        node = kept.get(node_id)
        if not isinstance(node, dict) or not isinstance(node.get("inputs"), dict):
            return None
        return registry.get(str(node.get("class_type", "")))

    pending = [n for n in kept if (cls := node_class(n)) is not None and cls.output_node
               and (wanted is None or n in wanted)]
    checked: set[str] = set()
    while pending:
        node_id = pending.pop()
        node_cls = node_class(node_id)
        if node_id in checked or node_cls is None:
            continue
        checked.add(node_id)
        inputs = kept[node_id]["inputs"]
        for spec in node_cls.inputs:
            if spec.name not in inputs:
                continue
            value = inputs[spec.name]
            if isinstance(value, list):
                if value:
                    pending.append(str(value[0]))
                continue
            if spec.type in ("INT", "FLOAT", "STRING"):
                try:
                    inputs[spec.name] = coerce_literal(spec, value, check_choices=False, check_range=False)
                except LiteralProblem:
                    pass
    return kept


def _to_int(value: Any) -> int:
    if isinstance(value, bool):
        raise _wrong_type_named("INT", value)
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if math.isfinite(value):
            return int(value)  # truncated toward zero, as ComfyUI's int() does: 2.5 -> 2
        raise _wrong_type_named("INT", value)
    if isinstance(value, str):
        try:
            number = Decimal(value.strip())
        except InvalidOperation:
            raise _wrong_type_named("INT", value) from None
        # Past the digits Python reads an integer from text with (4300), "1e999999999" would hold the server
        # for minutes building a number no input takes
        if number.is_finite() and number.adjusted() < sys.get_int_max_str_digits() \
                and number == number.to_integral_value():
            return int(number)
    raise _wrong_type_named("INT", value)


def _to_float(value: Any) -> float:
    if isinstance(value, bool):
        raise _wrong_type_named("FLOAT", value)
    if isinstance(value, (int, float)):
        try:
            number = float(value)
        except OverflowError:  # an integer past the largest float (10**400)
            raise _wrong_type_named("FLOAT", value) from None
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            raise _wrong_type_named("FLOAT", value) from None
    else:
        raise _wrong_type_named("FLOAT", value)
    if not math.isfinite(number):
        raise _wrong_type_named("FLOAT", value)
    return number


def _wrong_type(spec: "Input", value: Any) -> LiteralProblem:
    return _wrong_type_named(spec.type, value)


def _wrong_type_named(kind: str, value: Any) -> LiteralProblem:
    return LiteralProblem(
        "invalid_input_type",
        f"Failed to convert an input value to a {kind} value",
        f"got {type(value).__name__} {_short(value)}",
        expected_type=kind,
    )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _node_problems(
    workflow: Workflow,
    node: GraphNode,
    node_cls: "type[NodeType]",
    registry: "NodeRegistry",
    ctx: "NodeContext | None",
) -> list[NodeProblem]:
    problems: list[NodeProblem] = []

    def report(kind: str, message: str, details: str = "", input_name: str | None = None, **extra: Any) -> None:
        problems.append(NodeProblem(node.id, node.class_type, kind, message, details, input_name, extra))

    checked_literals: dict[str, Any] = {}
    for spec in node_cls.inputs:
        if spec.name not in node.inputs:
            if not spec.optional:
                report("required_input_missing", "Required input is missing", f"{spec.name} ({spec.type})",
                       spec.name, input_type=spec.type)
            continue
        value = node.inputs[spec.name]
        if isinstance(value, Link):
            _check_link(workflow, registry, spec, value, report)
            continue
        try:
            checked_literals[spec.name] = coerce_literal(spec, value, ctx)
        except LiteralProblem as problem:
            report(problem.type, problem.message, problem.details, spec.name, received_value=_jsonable(value),
                   **problem.extra)
        except Exception as exc:  # a COMBO choice source that fails (unreadable models folder, ...)
            report("exception_during_validation", f"checking '{spec.name}' failed: {exc}",
                   type(exc).__name__, spec.name)
    try:
        extras = node_cls.check(checked_literals, ctx)
    except Exception as exc:  # a node's own check must not hide the other problems
        report("exception_during_validation", f"{node.class_type}.check failed: {exc}", type(exc).__name__)
    else:
        for input_name, kind, message, details, *extra in extras:  # a 5th item: the values behind the message
            report(kind, message, details, input_name, **(extra[0] if extra else {}))
    return problems


def _check_link(workflow: Workflow, registry: "NodeRegistry", spec: "Input", link: Link, report: Any) -> None:
    source = workflow.nodes.get(link.node_id)
    if source is None:
        report("bad_linked_input", f"input '{spec.name}' links to node {link.node_id}, which does not exist",
               "", spec.name, linked_node=link.to_api())
        return
    source_cls = registry.get(source.class_type)
    if source_cls is None:
        return  # the unknown class type is reported on the source node itself
    if link.output_index >= len(source_cls.outputs):
        report("bad_linked_input",
               f"input '{spec.name}' links to output {link.output_index} of node {link.node_id} "
               f"({source.class_type}), which has {len(source_cls.outputs)} outputs",
               "", spec.name, linked_node=link.to_api(), output_count=len(source_cls.outputs))
        return
    output_type = source_cls.outputs[link.output_index].type
    if not types_compatible(output_type, spec.type):
        report("return_type_mismatch", "Return type mismatch between linked nodes",
               f"{spec.name}, received_type({output_type}) mismatch input_type({spec.type})",
               spec.name, received_type=output_type, input_type=spec.type, linked_node=link.to_api())


def _jsonable(value: Any) -> Any:
    return value if isinstance(value, (str, int, float, bool, type(None), list, dict)) else repr(value)
