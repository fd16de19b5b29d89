"""Typed node declarations and the registry they are registered into.

A node type is a class with declared inputs and outputs (the InvokeAI way) and a ``run`` method. The
declarations drive everything that is not execution: UI-format widget mapping, validation, ComfyUI's
``/object_info``, and the web app's forms. The registry is an object handed around, never a global.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:  # heavy imports stay out of module load
    from engine.nodes.context import NodeContext

WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})
SEED_INPUTS = frozenset({"seed", "noise_seed"})  # followed by a control_after_generate widget in UI files

ChoiceSource = tuple[str, ...] | Callable[["NodeContext | None"], list[str]]


@dataclass(frozen=True)
class Input:
    """One declared input. Widget inputs (INT/FLOAT/STRING/BOOLEAN/COMBO) take literals; others take links."""

    name: str
    type: str
    default: Any = None
    min: float | int | None = None
    max: float | int | None = None
    step: float | int | None = None
    choices: ChoiceSource | None = None  # COMBO only: fixed tuple, or a function listing files at run time
    optional: bool = False
    multiline: bool = False
    tooltip: str = ""
    # Extra UI-only widgets ComfyUI stores after this one in widgets_values (e.g. LoadImage's "upload").
    trailing_ui_widgets: int = 0

    @property
    def is_widget(self) -> bool:
        return self.type in WIDGET_TYPES

    def choice_list(self, ctx: "NodeContext | None" = None) -> list[str]:
        if self.choices is None:
            return []
        if callable(self.choices):
            from engine.nodes.context import read_once

            return list(read_once(ctx, ("choices", self.choices), lambda: tuple(self.choices(ctx))))
        return list(self.choices)

    def comfy_spec(self, ctx: "NodeContext | None" = None) -> list[Any]:
        """This input as ComfyUI's /object_info writes it: ``[type_or_choices, {options}]``."""
        opts: dict[str, Any] = {}
        for key in ("default", "min", "max", "step"):
            value = getattr(self, key)
            if value is not None:
                opts[key] = value
        if self.multiline:
            opts["multiline"] = True
        if self.tooltip:
            opts["tooltip"] = self.tooltip
        if self.name in SEED_INPUTS:
            opts["control_after_generate"] = True
        if self.type == "COMBO":
            return [self.choice_list(ctx), opts]
        return [self.type, opts]


@dataclass(frozen=True)
class Output:
    type: str
    name: str | None = None

    @property
    def label(self) -> str:
        return self.name or self.type


class NodeType:
    """Base class of every node type.

    Subclasses declare ``class_type``, ``inputs``, ``outputs`` and implement :meth:`run`, which returns a
    tuple with one value per declared output (output nodes return a dict ``{"ui": {...}}`` instead).
    """

    class_type: ClassVar[str]
    inputs: ClassVar[tuple[Input, ...]] = ()
    outputs: ClassVar[tuple[Output, ...]] = ()
    output_node: ClassVar[bool] = False
    aliases: ClassVar[tuple[str, ...]] = ()
    category: ClassVar[str] = "sd3"
    description: ClassVar[str] = ""
    # False for nodes whose result must never be reused from the signature cache (e.g. file savers).
    cacheable: ClassVar[bool] = True

    def run(self, ctx: "NodeContext", **inputs: Any) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def check(cls, values: dict[str, Any], ctx: "NodeContext | None") -> list[tuple[str | None, str, str, str]]:
        """Extra cross-field validation beyond declared types/ranges.

        Returns ``(input_name, comfy_error_type, message, details)`` tuples, optionally with a fifth item:
        a dict of the values behind the message (kept in the problem's ``extra_info``). Only literal
        values are in ``values``; linked inputs are absent.
        """
        return []

    @classmethod
    def fingerprint(cls, values: dict[str, Any], ctx: "NodeContext | None") -> str | None:
        """What the node reads besides its inputs (ComfyUI's IS_CHANGED), for the signature cache.

        A node that reads a file returns the file's content hash, so a changed or different file under
        the same name is never served from the cache. ``values`` are the converted literal inputs.
        """
        return None

    @classmethod
    def input(cls, name: str) -> Input | None:
        for spec in cls.inputs:
            if spec.name == name:
                return spec
        return None

    @classmethod
    def widget_inputs(cls) -> list[Input]:
        """Widget inputs in declaration order: required first, then optional (UI widgets_values order)."""
        required = [i for i in cls.inputs if i.is_widget and not i.optional]
        optional = [i for i in cls.inputs if i.is_widget and i.optional]
        return required + optional

    @classmethod
    def object_info(cls, ctx: "NodeContext | None" = None) -> dict[str, Any]:
        required = {i.name: i.comfy_spec(ctx) for i in cls.inputs if not i.optional}
        optional = {i.name: i.comfy_spec(ctx) for i in cls.inputs if i.optional}
        info_input: dict[str, Any] = {"required": required}
        if optional:
            info_input["optional"] = optional
        return {
            "input": info_input,
            "input_order": {
                "required": list(required),
                **({"optional": list(optional)} if optional else {}),
            },
            "output": [o.type for o in cls.outputs],
            "output_is_list": [False for _ in cls.outputs],
            "output_name": [o.label for o in cls.outputs],
            "name": cls.class_type,
            "display_name": cls.class_type,
            "description": cls.description,
            "python_module": "engine.nodes",
            "category": cls.category,
            "output_node": cls.output_node,
        }


@dataclass
class NodeRegistry:
    """Maps class_type names (and aliases) to node classes. Built by :func:`engine.nodes.default_registry`."""

    _types: dict[str, type[NodeType]] = field(default_factory=dict)
    _aliases: dict[str, str] = field(default_factory=dict)

    def register(self, node_cls: type[NodeType]) -> type[NodeType]:
        name = node_cls.class_type
        if name in self._types or name in self._aliases:
            raise ValueError(f"node type {name!r} registered twice")
        self._types[name] = node_cls
        for alias in node_cls.aliases:
            self._aliases[alias] = name
        return node_cls

    def register_all(self, node_classes: Iterable[type[NodeType]]) -> None:
        for cls in node_classes:
            self.register(cls)

    def canonical(self, class_type: str) -> str | None:
        if class_type in self._types:
            return class_type
        return self._aliases.get(class_type)

    def get(self, class_type: str) -> type[NodeType] | None:
        name = self.canonical(class_type)
        return self._types.get(name) if name else None

    def __contains__(self, class_type: str) -> bool:
        return self.canonical(class_type) is not None

    def names(self) -> list[str]:
        return sorted(self._types)

    def object_info(self, ctx: "NodeContext | None" = None) -> dict[str, Any]:
        return {name: cls.object_info(ctx) for name, cls in sorted(self._types.items())}
