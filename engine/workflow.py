"""One graph model for ComfyUI's API format, its UI format and the source article's list format.

No torch import here: parsing and validation must be cheap and run before any model work.

:func:`parse_workflow` detects the format and returns a :class:`Workflow`:

* API ("prompt") format: ``{node_id: {"class_type", "inputs", "_meta"?}}``.
* UI ("workflow") format, schema versions 0.4 and 1: ``{"nodes": [...], "links": [...], ...}``. Widget
  values are mapped onto the node class's declared widget inputs; muted, bypassed, note, reroute and
  primitive nodes are resolved the way ComfyUI's frontend does when it turns a workflow into a prompt.
  Subgraph instances (definitions in ``definitions.subgraphs``) are expanded into their inner nodes, whose
  ids are the path of instance ids and the inner id joined by ":" (``"16:3"``), as the frontend numbers
  them; legacy group nodes are refused by name.
* The source article's list format: ``{"nodes": [{"id", "type", "inputs": {name: [src, out]}, "values"}]}``
  where ``out`` is an output index or an output type name; widgets left out take their declared default.

Parsing only builds the graph; whether the graph makes sense (types, ranges, unknown nodes) is
:mod:`engine.validate`'s job, so a parsed workflow may still be invalid.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from engine.errors import WorkflowFormatError

if TYPE_CHECKING:
    from engine.nodes.base import NodeRegistry, NodeType

__all__ = ["Link", "GraphNode", "Workflow", "parse_workflow", "node_sort_key"]

# UI-only nodes that never reach the executor.
UI_NOTE_TYPES = frozenset({"Note", "MarkdownNote"})
UI_REROUTE_TYPE = "Reroute"
UI_PRIMITIVE_TYPE = "PrimitiveNode"
# The values of the browser-side "control_after_generate" widget that follows a seed widget.
SEED_CONTROL_VALUES = frozenset({"fixed", "increment", "decrement", "randomize"})
# Keys a dict-shaped widgets_values may hold for browser-only widgets.
UI_ONLY_WIDGET_NAMES = frozenset({"control_after_generate", "control_before_generate", "upload"})
UI_MODE_RUN = 0
UI_MODE_MUTED = 2
UI_MODE_BYPASSED = 4
UI_SUPPORTED_MODES = (UI_MODE_RUN, UI_MODE_MUTED, UI_MODE_BYPASSED)
# Inside a subgraph definition, links from the subgraph's inputs start at this pseudo node and links to
# its outputs end at the other (the frontend's SUBGRAPH_INPUT_ID / SUBGRAPH_OUTPUT_ID).
SUBGRAPH_INPUT_NODE = "-10"
SUBGRAPH_OUTPUT_NODE = "-20"
# Legacy group nodes are typed "workflow>NAME" (older frontends: "workflow/NAME") and defined in
# extra.groupNodes; newer frontends turn them into subgraphs.
GROUP_NODE_PREFIXES = ("workflow>", "workflow/")


@dataclass(frozen=True)
class Link:
    """An input wired to output ``output_index`` of node ``node_id``."""

    node_id: str
    output_index: int

    def to_api(self) -> list[Any]:
        return [self.node_id, self.output_index]


@dataclass
class GraphNode:
    id: str
    class_type: str
    inputs: dict[str, Any] = field(default_factory=dict)  # literal values or Link
    title: str | None = None

    def links(self) -> dict[str, Link]:
        return {k: v for k, v in self.inputs.items() if isinstance(v, Link)}

    def literals(self) -> dict[str, Any]:
        return {k: v for k, v in self.inputs.items() if not isinstance(v, Link)}


@dataclass
class Workflow:
    """A parsed workflow. ``ui`` keeps the original UI-format JSON (for PNG metadata) when known.

    Two workflows compare equal when their graphs are equal: the source format and the kept UI JSON
    describe where a graph came from, not what it is.
    """

    nodes: dict[str, GraphNode]
    source_format: str = field(compare=False)  # "api" | "ui" | "list"
    ui: dict[str, Any] | None = field(default=None, compare=False)

    def to_api(self) -> dict[str, Any]:
        """ComfyUI API ("prompt") format: what SaveImage embeds and what /prompt takes."""
        out: dict[str, Any] = {}
        for node_id, node in self.nodes.items():
            inputs: dict[str, Any] = {}
            for name, value in node.inputs.items():
                if isinstance(value, Link):
                    inputs[name] = value.to_api()
                elif isinstance(value, list):
                    inputs[name] = {"__value__": copy.deepcopy(value)}
                else:
                    inputs[name] = copy.deepcopy(value)
            entry: dict[str, Any] = {"class_type": node.class_type, "inputs": inputs}
            if node.title:
                entry["_meta"] = {"title": node.title}
            out[node_id] = entry
        return out

    def copy(self) -> "Workflow":
        return copy.deepcopy(self)


def node_sort_key(node_id: str) -> tuple[int, int, str]:
    """Natural order of node ids: numeric ids by value first, then the others by name."""
    if node_id.isdigit():
        return (0, int(node_id), "")
    return (1, 0, node_id)


def parse_workflow(data: dict[str, Any] | str, registry: "NodeRegistry") -> Workflow:
    """Parse a workflow in any of the three formats (detected from its shape) into a :class:`Workflow`.

    ``data`` is the decoded JSON object or its text. Class types given by an alias are normalised to the
    registry's canonical name; unknown class types are kept for validation to report. Raises
    :class:`WorkflowFormatError` for text that is not JSON or an object of none of the three shapes.
    """
    if isinstance(data, (str, bytes, bytearray)):
        try:
            data = json.loads(data)
        except json.JSONDecodeError as exc:
            raise WorkflowFormatError(
                f"workflow is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}",
                line=exc.lineno,
                column=exc.colno,
            ) from exc
    if not isinstance(data, dict):
        raise WorkflowFormatError(
            f"a workflow is a JSON object, got {type(data).__name__}", got=type(data).__name__
        )
    fmt = detect_format(data)
    if fmt == "ui":
        return _parse_ui(data, registry)
    if fmt == "list":
        return _parse_list(data, registry)
    return _parse_api(data, registry)


def detect_format(data: dict[str, Any]) -> str:
    """Which of the three formats ``data`` is: "api", "ui" or "list" (WorkflowFormatError if none)."""
    nodes = data.get("nodes")
    if isinstance(nodes, list):
        ui_like = "links" in data or any(
            isinstance(n, dict) and ("widgets_values" in n or "outputs" in n or "mode" in n) for n in nodes
        )
        return "ui" if ui_like else "list"
    if all(isinstance(v, dict) and "class_type" in v for v in data.values()):
        return "api"
    if "prompt" in data and isinstance(data["prompt"], dict):
        raise WorkflowFormatError(
            "this looks like a ComfyUI /prompt request body; pass its 'prompt' object as the workflow",
            keys=sorted(data)[:20],
        )
    bad = next(k for k, v in data.items() if not (isinstance(v, dict) and "class_type" in v))
    raise WorkflowFormatError(
        "not a workflow: expected ComfyUI's API format ({node_id: {class_type, inputs}}), its UI format "
        f"({{nodes: [...], links: [...]}}) or the list format ({{nodes: [{{id, type, inputs, values}}]}}); "
        f"key {bad!r} holds no class_type",
        key=str(bad),
    )


def _canonical(registry: "NodeRegistry", class_type: str) -> str:
    return registry.canonical(class_type) or class_type


# --- API format --------------------------------------------------------------------------------------


def _parse_api(data: dict[str, Any], registry: "NodeRegistry") -> Workflow:
    nodes: dict[str, GraphNode] = {}
    for raw_id, entry in data.items():
        node_id = str(raw_id)
        class_type = entry["class_type"]
        if not isinstance(class_type, str):
            raise WorkflowFormatError(f"node {node_id}: class_type must be a string", node_id=node_id)
        raw_inputs = entry.get("inputs", {})
        if not isinstance(raw_inputs, dict):
            raise WorkflowFormatError(f"node {node_id}: inputs must be an object", node_id=node_id)
        inputs = {name: _api_value(node_id, name, value) for name, value in raw_inputs.items()}
        meta = entry.get("_meta")
        title = meta.get("title") if isinstance(meta, dict) else None
        nodes[node_id] = GraphNode(node_id, _canonical(registry, class_type), inputs, title)
    return Workflow(nodes, "api")


def _api_value(node_id: str, name: str, value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value  # immutable: a copy would be the same object (deepcopy is most of a batch's parsing)
    if isinstance(value, dict) and set(value) == {"__value__"}:
        return copy.deepcopy(value["__value__"])
    if isinstance(value, list) and len(value) == 2:
        source, index = value
        if isinstance(source, (str, int)) and not isinstance(source, bool) and _is_index(index):
            return Link(str(source), int(index))
        raise WorkflowFormatError(
            f"node {node_id} input '{name}': a 2-element list is a link [node_id, output_index], got "
            f"{value!r}; a literal list is written {{\"__value__\": [...]}}",
            node_id=node_id,
            input_name=name,
        )
    return copy.deepcopy(value)


def _is_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# --- list format -------------------------------------------------------------------------------------


def _parse_list(data: dict[str, Any], registry: "NodeRegistry") -> Workflow:
    entries: dict[str, dict[str, Any]] = {}
    for position, entry in enumerate(data["nodes"]):
        if not isinstance(entry, dict) or "id" not in entry or not isinstance(entry.get("type"), str):
            raise WorkflowFormatError(
                f"list-format node #{position} needs an 'id' and a string 'type'", position=position
            )
        node_id = str(entry["id"])
        if node_id in entries:
            raise WorkflowFormatError(f"node id {node_id} appears twice", node_id=node_id)
        entries[node_id] = entry
    nodes: dict[str, GraphNode] = {}
    for node_id, entry in entries.items():
        class_type = _canonical(registry, entry["type"])
        inputs: dict[str, Any] = {}
        values = entry.get("values") or {}
        raw_inputs = entry.get("inputs") or {}
        if not isinstance(values, dict) or not isinstance(raw_inputs, dict):
            raise WorkflowFormatError(f"node {node_id}: 'inputs' and 'values' must be objects", node_id=node_id)
        for name, value in values.items():
            inputs[name] = copy.deepcopy(value)
        for name, value in raw_inputs.items():
            if isinstance(value, list) and len(value) == 2:
                inputs[name] = _list_link(node_id, name, value, entries, registry)
            else:
                inputs[name] = _api_value(node_id, name, value)
        # Hand-written list files leave out widgets they do not change (the article's example has no
        # batch_size or denoise): those take the declared default, as ComfyUI's editor fills them in.
        node_cls = registry.get(class_type)
        for spec in node_cls.widget_inputs() if node_cls is not None else ():
            if spec.name not in inputs and spec.default is not None:
                inputs[spec.name] = copy.deepcopy(spec.default)
        title = entry.get("title") if isinstance(entry.get("title"), str) else None
        nodes[node_id] = GraphNode(node_id, class_type, inputs, title)
    return Workflow(nodes, "list")


def _list_link(
    node_id: str, name: str, value: list[Any], entries: dict[str, dict[str, Any]], registry: "NodeRegistry"
) -> Link:
    source, output = value
    if isinstance(source, bool) or not isinstance(source, (str, int)):
        raise WorkflowFormatError(
            f"node {node_id} input '{name}': link source must be a node id, got {source!r}",
            node_id=node_id,
            input_name=name,
        )
    source_id = str(source)
    if _is_index(output):
        return Link(source_id, output)
    if not isinstance(output, str):
        raise WorkflowFormatError(
            f"node {node_id} input '{name}': link output must be an index or an output type name, "
            f"got {output!r}",
            node_id=node_id,
            input_name=name,
        )
    # The output is named by type (e.g. "CLIP"): resolve it through the source node's declarations.
    source_entry = entries.get(source_id)
    if source_entry is None:
        raise WorkflowFormatError(
            f"node {node_id} input '{name}' links to node {source_id}, which does not exist",
            node_id=node_id,
            input_name=name,
        )
    source_cls = registry.get(source_entry["type"])
    if source_cls is None:
        raise WorkflowFormatError(
            f"node {node_id} input '{name}': cannot resolve output '{output}' of node {source_id}: "
            f"unknown class type '{source_entry['type']}'",
            node_id=node_id,
            input_name=name,
        )
    matches = [i for i, out in enumerate(source_cls.outputs) if output in (out.type, out.name)]
    if len(matches) != 1:
        declared = ", ".join(out.label for out in source_cls.outputs) or "none"
        problem = "no output" if not matches else "more than one output"
        raise WorkflowFormatError(
            f"node {node_id} input '{name}': {source_cls.class_type} (node {source_id}) has {problem} "
            f"named '{output}'; its outputs: {declared}",
            node_id=node_id,
            input_name=name,
        )
    return Link(source_id, matches[0])


# --- UI format ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _UiLink:
    source: str
    slot: int
    target: str
    target_slot: int
    type: str


def _parse_ui(data: dict[str, Any], registry: "NodeRegistry") -> Workflow:
    ui_nodes, links = _flatten_subgraphs(data)
    muted = _muted_closure(ui_nodes, links)
    nodes: dict[str, GraphNode] = {}
    for node_id, ui_node in ui_nodes.items():
        node_type = ui_node["type"]
        mode = ui_node.get("mode", UI_MODE_RUN)
        if (
            node_id in muted
            or mode == UI_MODE_BYPASSED
            or node_type in UI_NOTE_TYPES
            or node_type in (UI_REROUTE_TYPE, UI_PRIMITIVE_TYPE)
        ):
            continue
        class_type = _canonical(registry, node_type)
        node_cls = registry.get(node_type)
        inputs = _ui_widget_values(node_id, ui_node, node_cls) if node_cls is not None else {}
        for slot, ui_input in enumerate(ui_node.get("inputs") or []):
            link_id = ui_input.get("link")
            if link_id is None:
                continue
            if link_id not in links:
                raise WorkflowFormatError(
                    f"node {node_id} input '{ui_input.get('name')}' refers to link {link_id}, "
                    "which is not in links[]",
                    node_id=node_id,
                )
            resolved = _resolve_ui_link(links[link_id], ui_input.get("type", "*"), ui_nodes, links, muted)
            name = ui_input.get("name")
            if resolved is None:
                # ComfyUI drops an input whose source resolves to nothing (a bypass with no matching input).
                inputs.pop(name, None)
            else:
                inputs[name] = resolved
        title = ui_node.get("title") if isinstance(ui_node.get("title"), str) else None
        nodes[node_id] = GraphNode(node_id, class_type, inputs, title)
    return Workflow(nodes, "ui", ui=copy.deepcopy(data))


@dataclass
class _UiScope:
    """One graph level: the root workflow, or one subgraph instance's copy of its definition."""

    path: tuple[str, ...]  # instance ids from the root down to this level; () for the root
    nodes: dict[str, dict[str, Any]]
    links: dict[Any, _UiLink]
    instance: dict[str, Any] | None = None  # the subgraph node this level expands
    parent: "_UiScope | None" = None

    def flat_id(self, node_id: str) -> str:
        return ":".join((*self.path, node_id))


def _flatten_subgraphs(data: dict[str, Any]) -> tuple[dict[str, dict[str, Any]], dict[Any, _UiLink]]:
    """The workflow's nodes and links with every running subgraph instance replaced by its inner nodes.

    Links crossing a subgraph's boundary are followed to the real node on the other side, so what comes
    back is one flat graph that reroutes, bypasses, mutes and primitives are then resolved on. Muted and
    bypassed instances stay whole: muting drops what depends on them, bypassing passes inputs through.
    """
    definitions = _subgraph_definitions(data)
    scopes: list[_UiScope] = []
    root = _UiScope((), _ui_nodes(data), _ui_links(data))
    _expand_scope(root, definitions, scopes, ())
    nodes: dict[str, dict[str, Any]] = {}
    links: dict[Any, _UiLink] = {}
    for scope in scopes:
        for node_id, node in scope.nodes.items():
            if _expands(node, definitions):
                continue
            flat_id = scope.flat_id(node_id)
            if not scope.path:  # the root's nodes and links keep their ids
                nodes[flat_id] = node
                continue
            node = {**node, "id": flat_id, "inputs": [dict(i) for i in node.get("inputs") or []]}
            for slot, ui_input in enumerate(node["inputs"]):
                link_id = ui_input.get("link")
                if link_id is None:
                    continue
                if link_id not in scope.links:
                    raise WorkflowFormatError(
                        f"node {flat_id} input '{ui_input.get('name')}' refers to link {link_id}, which is not "
                        f"in the links of subgraph {scope.instance.get('type')!r}",
                        node_id=flat_id,
                    )
                ui_input["link"] = _link_across_boundaries(
                    scope, scope.links[link_id], flat_id, slot, definitions, nodes, links, scopes
                )
            nodes[flat_id] = node
    for link_id, link in root.links.items():
        resolved = _root_link(root, link, definitions, scopes)
        if resolved is not None:
            links[link_id] = resolved
    return nodes, links


def _subgraph_definitions(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    definitions = data.get("definitions") or {}
    found: dict[str, dict[str, Any]] = {}
    listed = (definitions.get("subgraphs") or []) if isinstance(definitions, dict) else []
    for position, definition in enumerate(listed):
        if not isinstance(definition, dict) or not isinstance(definition.get("id"), str) \
                or not isinstance(definition.get("nodes"), list):
            raise WorkflowFormatError(
                f"subgraph definition #{position} needs a string 'id' and a 'nodes' list", position=position
            )
        found[definition["id"]] = definition
    return found


def _expands(node: dict[str, Any], definitions: dict[str, dict[str, Any]]) -> bool:
    return node["type"] in definitions and node.get("mode", UI_MODE_RUN) == UI_MODE_RUN


def _expand_scope(
    scope: _UiScope, definitions: dict[str, dict[str, Any]], scopes: list[_UiScope], active: tuple[str, ...]
) -> None:
    scopes.append(scope)
    for node_id, node in scope.nodes.items():
        node_type = node["type"]
        if node_type.startswith(GROUP_NODE_PREFIXES):
            raise WorkflowFormatError(
                f"node {scope.flat_id(node_id)} ({node_type}) is a legacy group node, which this engine does "
                "not expand: convert it to a subgraph in ComfyUI (or ungroup it) and save the workflow again",
                node_id=scope.flat_id(node_id), class_type=node_type,
            )
        if not _expands(node, definitions):
            continue
        if node_type in active:
            raise WorkflowFormatError(
                f"node {scope.flat_id(node_id)}: subgraph {definitions[node_type].get('name', node_type)!r} "
                "contains itself",
                node_id=scope.flat_id(node_id), class_type=node_type,
            )
        definition = definitions[node_type]
        child = _UiScope((*scope.path, node_id), _ui_nodes(definition), _ui_links(definition), node, scope)
        _expand_scope(child, definitions, scopes, (*active, node_type))


def _child_scope(scope: _UiScope, node_id: str, scopes: list[_UiScope]) -> _UiScope:
    path = (*scope.path, node_id)
    return next(s for s in scopes if s.path == path)


def _resolve_across_boundaries(
    scope: _UiScope, link: _UiLink, definitions: dict[str, dict[str, Any]], scopes: list[_UiScope]
) -> tuple[_UiScope, _UiLink] | tuple[None, Any] | None:
    """Follow ``link`` out of subgraph inputs and into subgraph outputs to a node that is not an instance.

    Returns (scope, link) for a real source, (None, value) for the value of an instance's promoted widget
    whose input is not connected, or None when the subgraph input is connected to nothing at all (the
    inner node then keeps its own widget value, as the frontend leaves it).
    """
    seen: set[tuple[tuple[str, ...], _UiLink]] = set()
    while True:
        # An instance's output wired back to its own input through the subgraph would go round forever
        if (scope.path, link) in seen:
            raise WorkflowFormatError(
                f"the links into node {scope.flat_id(link.target)} go round through subgraph "
                f"{':'.join(scope.path) or 'instances'} forever", node_id=scope.flat_id(link.target),
            )
        seen.add((scope.path, link))
        if link.source == SUBGRAPH_INPUT_NODE and scope.instance is not None and scope.parent is not None:
            instance, parent = scope.instance, scope.parent
            inputs = instance.get("inputs") or []
            if link.slot >= len(inputs):
                return None
            outer = inputs[link.slot].get("link")
            if outer is None:
                return _promoted_widget_value(instance, link.slot)
            if outer not in parent.links:
                instance_id = parent.flat_id(str(instance["id"]))
                raise WorkflowFormatError(
                    f"node {instance_id} ({instance['type']}) input '{inputs[link.slot].get('name')}' refers "
                    f"to link {outer}, which is not in links[]", node_id=instance_id,
                )
            scope, link = parent, parent.links[outer]
            continue
        source = scope.nodes.get(link.source)
        if source is not None and _expands(source, definitions):
            inner = _child_scope(scope, link.source, scopes)
            feeding = next((l for l in inner.links.values()
                            if l.target == SUBGRAPH_OUTPUT_NODE and l.target_slot == link.slot), None)
            if feeding is None:
                return None
            scope, link = inner, feeding
            continue
        return scope, link


def _promoted_widget_value(instance: dict[str, Any], slot: int) -> tuple[None, Any] | None:
    """The instance's own value for a subgraph input shown as a widget on it. The frontend gives the
    instance one widget per such input, in input order, and saves their values in ``widgets_values``."""
    inputs = instance.get("inputs") or []
    widget = inputs[slot].get("widget")
    values = instance.get("widgets_values")
    if not isinstance(widget, dict):
        return None
    if isinstance(values, dict):
        return (None, copy.deepcopy(values[widget["name"]])) if widget.get("name") in values else None
    position = sum(1 for i in inputs[:slot] if isinstance(i.get("widget"), dict))
    if isinstance(values, list) and position < len(values):
        return None, copy.deepcopy(values[position])
    return None


def _link_across_boundaries(
    scope: _UiScope, link: _UiLink, target: str, target_slot: int, definitions: dict[str, dict[str, Any]],
    nodes: dict[str, dict[str, Any]], links: dict[Any, _UiLink], scopes: list[_UiScope],
) -> str | None:
    """The flat link id that now feeds input ``target_slot`` of inner node ``target`` (None: no link)."""
    resolved = _resolve_across_boundaries(scope, link, definitions, scopes)
    if resolved is None:
        return None
    source_scope, value = resolved
    link_id = f"{target}[{target_slot}]"
    if source_scope is None:  # a promoted widget's value: delivered like a PrimitiveNode's
        primitive_id = f"{target}[{target_slot}]:value"
        nodes[primitive_id] = {"id": primitive_id, "type": UI_PRIMITIVE_TYPE, "widgets_values": [value]}
        links[link_id] = _UiLink(primitive_id, 0, target, target_slot, link.type)
        return link_id
    links[link_id] = _UiLink(source_scope.flat_id(value.source), value.slot, target, target_slot, link.type)
    return link_id


def _root_link(
    scope: _UiScope, link: _UiLink, definitions: dict[str, dict[str, Any]], scopes: list[_UiScope]
) -> _UiLink | None:
    """A root-level link, its source moved into the subgraph when it comes out of an instance."""
    resolved = _resolve_across_boundaries(scope, link, definitions, scopes)
    if resolved is None or resolved[0] is None:
        return None
    source_scope, source_link = resolved
    return replace(link, source=source_scope.flat_id(source_link.source), slot=source_link.slot)


def _ui_nodes(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    nodes: dict[str, dict[str, Any]] = {}
    for position, node in enumerate(data["nodes"]):
        if not isinstance(node, dict) or "id" not in node or not isinstance(node.get("type"), str):
            raise WorkflowFormatError(
                f"UI node #{position} needs an 'id' and a string 'type'", position=position
            )
        node_id = str(node["id"])
        mode = node.get("mode", UI_MODE_RUN)
        if mode not in UI_SUPPORTED_MODES:
            raise WorkflowFormatError(
                f"node {node_id} has mode {mode!r}; supported modes: 0 (run), 2 (muted), 4 (bypassed)",
                node_id=node_id,
                mode=mode,
            )
        nodes[node_id] = node
    return nodes


def _ui_links(data: dict[str, Any]) -> dict[Any, _UiLink]:
    links: dict[Any, _UiLink] = {}
    for raw in data.get("links") or []:
        if isinstance(raw, dict):  # newer frontends may write links as objects
            raw = [raw.get("id"), raw.get("origin_id"), raw.get("origin_slot"),
                   raw.get("target_id"), raw.get("target_slot"), raw.get("type")]
        if not isinstance(raw, list) or len(raw) < 5 or not _is_index(raw[2]) or not _is_index(raw[4]):
            raise WorkflowFormatError(
                f"UI link {raw!r} is not [link_id, src_node, src_slot, dst_node, dst_slot, type]",
                link=repr(raw),
            )
        link_type = raw[5] if len(raw) > 5 and isinstance(raw[5], str) else "*"
        links[raw[0]] = _UiLink(str(raw[1]), raw[2], str(raw[3]), raw[4], link_type)
    return links


def _muted_closure(ui_nodes: dict[str, dict[str, Any]], links: dict[Any, _UiLink]) -> set[str]:
    """Muted nodes plus every node that depends on one (through any chain of links)."""
    muted = {nid for nid, node in ui_nodes.items() if node.get("mode", UI_MODE_RUN) == UI_MODE_MUTED}
    consumers: dict[str, set[str]] = {}
    for link in links.values():
        consumers.setdefault(link.source, set()).add(link.target)
    pending = list(muted)
    while pending:
        for target in consumers.get(pending.pop(), ()):
            if target not in muted:
                muted.add(target)
                pending.append(target)
    return muted


def _resolve_ui_link(
    link: _UiLink,
    input_type: str,
    ui_nodes: dict[str, dict[str, Any]],
    links: dict[Any, _UiLink],
    muted: set[str],
) -> Link | Any | None:
    """Follow a link through reroutes and bypassed nodes to a real node's output (or a primitive's value).

    Returns a :class:`Link`, a literal (from a PrimitiveNode), or None when the chain ends nowhere.
    """
    seen: set[str] = set()
    while True:
        source = ui_nodes.get(link.source)
        if source is None or link.source in muted:
            # A link to a missing node is kept for validation to report (bad_linked_input).
            return Link(link.source, link.slot) if source is None else None
        if link.source in seen:
            raise WorkflowFormatError(
                f"reroute/bypass chain through node {link.source} loops", node_id=link.source
            )
        seen.add(link.source)
        source_type = source["type"]
        if source_type == UI_PRIMITIVE_TYPE:
            values = source.get("widgets_values") or []
            if not values:
                raise WorkflowFormatError(
                    f"PrimitiveNode {link.source} has no value", node_id=link.source
                )
            return copy.deepcopy(values[0])
        if source_type == UI_REROUTE_TYPE:
            upstream = _ui_input_link(source, 0, links)
            if upstream is None:
                return None
            link = upstream
            continue
        if source.get("mode", UI_MODE_RUN) == UI_MODE_BYPASSED:
            upstream = _bypass_upstream(source, link.slot, input_type, links)
            if upstream is None:
                return None
            link = upstream
            continue
        return Link(link.source, link.slot)


def _ui_input_link(ui_node: dict[str, Any], slot: int, links: dict[Any, _UiLink]) -> _UiLink | None:
    inputs = ui_node.get("inputs") or []
    if slot >= len(inputs):
        return None
    return links.get(inputs[slot].get("link"))


def _bypass_upstream(
    bypassed: dict[str, Any], origin_slot: int, wanted_type: str, links: dict[Any, _UiLink]
) -> _UiLink | None:
    """ComfyUI's bypass rule: the input at the same slot as the used output, else the first of that type."""
    inputs = bypassed.get("inputs") or []
    candidates = [origin_slot] + list(range(len(inputs)))
    for slot in candidates:
        if slot < len(inputs) and inputs[slot].get("type") == wanted_type:
            return _ui_input_link(bypassed, slot, links)
    return None


def _ui_widget_values(node_id: str, ui_node: dict[str, Any], node_cls: "type[NodeType]") -> dict[str, Any]:
    """Map a UI node's ``widgets_values`` onto its class's widget inputs (declaration order).

    Required widgets the file holds no value for take their declared default, as in ComfyUI's editor,
    which builds every widget with its default before it reads the saved values: a node saved before a
    widget was added (VAEDecodeTiled's temporal_size) or with no ``widgets_values`` at all still runs
    there. Widgets without a default (a model or sampler name) stay missing, for validation to report;
    optional ones stay out, as in a prompt, and the node uses its own default.
    """
    values = _ui_saved_widget_values(node_id, ui_node, node_cls)
    for spec in node_cls.widget_inputs():
        if spec.name not in values and not spec.optional and spec.default is not None:
            values[spec.name] = copy.deepcopy(spec.default)
    return values


def _ui_saved_widget_values(node_id: str, ui_node: dict[str, Any], node_cls: "type[NodeType]") -> dict[str, Any]:
    raw = ui_node.get("widgets_values")
    widgets = node_cls.widget_inputs()
    if raw is None:
        return {}
    if isinstance(raw, dict):
        declared = {w.name for w in widgets}
        unknown = sorted(k for k in raw if k not in declared and k not in UI_ONLY_WIDGET_NAMES)
        if unknown:
            raise WorkflowFormatError(
                f"node {node_id} ({node_cls.class_type}): widget values {', '.join(unknown)} are not inputs of "
                f"this node; its widget inputs: {', '.join(sorted(declared)) or 'none'}",
                node_id=node_id,
            )
        return {k: copy.deepcopy(v) for k, v in raw.items() if k in declared}
    if not isinstance(raw, list):
        raise WorkflowFormatError(
            f"node {node_id}: widgets_values must be a list or an object", node_id=node_id
        )
    # Imported on use: importing engine.nodes runs its package init, which registers every node type.
    from engine.nodes.base import SEED_INPUTS

    values: dict[str, Any] = {}
    position = 0
    for widget in widgets:
        if position >= len(raw):
            break  # a file saved before the node gained its last widgets: see _ui_widget_values
        values[widget.name] = copy.deepcopy(raw[position])
        position += 1
        if (
            widget.name in SEED_INPUTS
            and position < len(raw)
            and isinstance(raw[position], str)
            and raw[position] in SEED_CONTROL_VALUES
        ):
            position += 1
        position += widget.trailing_ui_widgets
    if position < len(raw):
        raise WorkflowFormatError(
            f"node {node_id} ({node_cls.class_type}) has {len(raw)} widget values but declares "
            f"{len(widgets)} widget inputs ({', '.join(w.name for w in widgets) or 'none'}); "
            f"unmapped values: {raw[position:]!r}",
            node_id=node_id,
        )
    return values
