"""Small pure-Python node types for the workflow parsing, validation and execution tests.

``arithmetic_registry(calls)`` builds a fresh registry whose nodes append ``(class_type, inputs)`` to
``calls`` each time they run, so tests can see what ran and what came from the cache.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine.nodes.base import Input, NodeRegistry, NodeType, Output
from engine.nodes.context import NodeContext

SEED_MAX = 2**64 - 1


def make_context(tmp_path: Path, events: list | None = None, **extra: Any) -> NodeContext:
    """A context without models (these nodes need none); progress events go to ``events``."""
    return NodeContext(
        models=None,  # type: ignore[arg-type]
        output_dir=tmp_path,
        temp_dir=tmp_path,
        on_progress=events.append if events is not None else None,
        **extra,
    )


def arithmetic_registry(calls: list[tuple[str, dict[str, Any]]] | None = None) -> NodeRegistry:
    calls = calls if calls is not None else []

    def note(node_type: str, inputs: dict[str, Any]) -> None:
        calls.append((node_type, dict(inputs)))

    class Number(NodeType):
        class_type = "Number"
        aliases = ("Integer",)
        inputs = (Input("value", "INT", default=0, min=-1000, max=SEED_MAX),)
        outputs = (Output("INT"),)

        def run(self, ctx: NodeContext, value: int) -> tuple[int]:
            note("Number", {"value": value})
            return (value,)

    class Text(NodeType):
        class_type = "Text"
        inputs = (Input("text", "STRING", default="", multiline=True),)
        outputs = (Output("STRING"),)

        def run(self, ctx: NodeContext, text: str) -> tuple[str]:
            note("Text", {"text": text})
            ctx.record["prompt"] = text
            return (text,)

    class Add(NodeType):
        class_type = "Add"
        inputs = (
            Input("a", "INT", min=-(2**70), max=2**70),
            Input("b", "INT", default=0, min=-(2**70), max=2**70, optional=True),
        )
        outputs = (Output("INT"),)

        def run(self, ctx: NodeContext, a: int, b: int = 0) -> tuple[int]:
            note("Add", {"a": a, "b": b})
            if a == 13:
                raise ValueError("unlucky number")
            return (a + b,)

    class BatchedAdd(NodeType):
        """Like Add, with a run_batch that handles many rows in one call."""

        class_type = "BatchedAdd"
        inputs = (Input("a", "INT", min=-(2**70), max=2**70), Input("b", "INT", default=0))
        outputs = (Output("INT"),)

        def run(self, ctx: NodeContext, a: int, b: int) -> tuple[int]:
            note("BatchedAdd.run", {"a": a, "b": b})
            if a == 13:
                raise ValueError("unlucky number")
            ctx.record["sum"] = a + b
            return (a + b,)

        def run_batch(self, ctx: NodeContext, inputs_list: list[dict[str, Any]]) -> list[dict[str, Any]]:
            """Each row's own record travels in its result, as KSampler's does."""
            note("BatchedAdd.run_batch", {"rows": [dict(i) for i in inputs_list]})
            if any(i["a"] == 13 for i in inputs_list):
                raise ValueError("unlucky number in the batch")
            ctx.record["batched"] = True
            return [{"result": (i["a"] + i["b"],), "record": {"sum": i["a"] + i["b"]}} for i in inputs_list]

    class Pick(NodeType):
        """Two outputs of different types, a COMBO and a seed with its UI control widget."""

        class_type = "Pick"
        inputs = (
            Input("number", "INT"),
            Input("seed", "INT", default=0, min=0, max=SEED_MAX),
            Input("mode", "COMBO", default="sum", choices=("sum", "product")),
            Input("scale", "FLOAT", default=1.0, min=0.0, max=10.0),
            Input("label", "STRING", default="", optional=True),
        )
        outputs = (Output("INT"), Output("STRING", name="LABEL"))

        @classmethod
        def check(cls, values: dict[str, Any], ctx: NodeContext | None) -> list[tuple[Any, str, str, str]]:
            if values.get("mode") == "product" and values.get("scale") == 0.0:
                return [("scale", "value_smaller_than_min", "scale 0 makes every product 0", "")]
            return []

        def run(self, ctx: NodeContext, number: int, seed: int, mode: str, scale: float, label: str = "") -> tuple:
            note("Pick", {"number": number, "seed": seed, "mode": mode, "scale": scale, "label": label})
            value = number + seed if mode == "sum" else number * seed
            return (int(value * scale), label or mode)

    class LoadName(NodeType):
        """A COMBO followed in UI files by an extra upload widget, like LoadImage."""

        class_type = "LoadName"
        inputs = (
            Input("name", "COMBO", choices=("a.png", "b.png"), trailing_ui_widgets=1),
            Input("repeat", "INT", default=1, min=1, max=4),
        )
        outputs = (Output("STRING"),)

        def run(self, ctx: NodeContext, name: str, repeat: int) -> tuple[str]:
            note("LoadName", {"name": name, "repeat": repeat})
            return (name * repeat,)

    class Jitter(NodeType):
        """Not cacheable: its result may change from run to run."""

        class_type = "Jitter"
        cacheable = False
        inputs = (Input("value", "INT"),)
        outputs = (Output("INT"),)

        def run(self, ctx: NodeContext, value: int) -> tuple[int]:
            note("Jitter", {"value": value})
            return (value + len(calls),)

    class Exhaust(NodeType):
        """Raises the way torch reports an exhausted device."""

        class_type = "Exhaust"
        inputs = (Input("value", "INT"),)
        outputs = (Output("INT"),)

        def run(self, ctx: NodeContext, value: int) -> tuple[int]:
            class OutOfMemoryError(RuntimeError):  # torch.cuda.OutOfMemoryError's name
                pass

            if value == 1:
                raise OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            raise RuntimeError("CUDA out of memory. Tried to allocate 4.00 GiB")

    class Box(NodeType):
        """Produces a non-widget type, which only a link can carry."""

        class_type = "Box"
        inputs = (Input("value", "INT"),)
        outputs = (Output("BOX"),)

        def run(self, ctx: NodeContext, value: int) -> tuple[dict[str, int]]:
            note("Box", {"value": value})
            return ({"boxed": value},)

    class ShowBox(NodeType):
        class_type = "ShowBox"
        output_node = True
        inputs = (Input("box", "BOX"),)
        outputs = ()

        def run(self, ctx: NodeContext, box: dict[str, int]) -> dict[str, Any]:
            note("ShowBox", {"box": box})
            return {"ui": {"values": [box["boxed"]]}}

    class Show(NodeType):
        """Output node: remembers each value it was given in ``ctx.saved_images``."""

        class_type = "Show"
        output_node = True
        inputs = (Input("value", "INT"), Input("label", "STRING", default="", optional=True))
        outputs = ()

        def run(self, ctx: NodeContext, value: int, label: str = "") -> dict[str, Any]:
            note("Show", {"value": value, "label": label})
            ctx.saved_images.append((label, value))
            ctx.record["shown"] = value
            return {"ui": {"values": [value]}}

    class ShowText(NodeType):
        class_type = "ShowText"
        output_node = True
        cacheable = False
        inputs = (Input("text", "STRING"),)
        outputs = ()

        def run(self, ctx: NodeContext, text: str) -> dict[str, Any]:
            note("ShowText", {"text": text})
            ctx.saved_images.append(text)
            return {"ui": {"text": [text]}}

    registry = NodeRegistry()
    registry.register_all(
        [Number, Text, Add, BatchedAdd, Pick, LoadName, Jitter, Exhaust, Box, ShowBox, Show, ShowText]
    )
    return registry
