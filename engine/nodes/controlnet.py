"""ControlNet nodes for SD3/SD3.5: ControlNetLoader, ControlNetApplyAdvanced and ControlNetApplySD3.

The apply nodes attach a :class:`engine.controlnet.ControlHint` to every entry of the positive and the
negative conditioning (ComfyUI shares one ControlNet between both); the sampler adds the ControlNet's
residuals inside the transformer call while the hint's window is active. Strength 0 returns the
conditionings untouched, so the image is exactly the one without the ControlNet. Each apply node adds
``{name, strength, start_percent, end_percent, sha256}`` to ``ctx.record["controlnets"]``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

from engine.errors import ExecutionError
from engine.nodes.base import Input, NodeType, Output
from engine.nodes.loaders import model_choices

if TYPE_CHECKING:
    from engine.nodes.context import NodeContext
    from engine.nodes.types import Conditioning


class ControlNetLoader(NodeType):
    """An SD3 ControlNet from models/controlnet (a single file or a diffusers folder)."""

    class_type = "ControlNetLoader"
    category = "loaders"
    inputs = (Input("control_net_name", "COMBO", choices=model_choices("controlnet")),)
    outputs = (Output("CONTROL_NET"),)

    def run(self, ctx: "NodeContext", control_net_name: str) -> tuple[Any]:
        return (ctx.models.controlnet(control_net_name),)


def _check_window(values: dict[str, Any]) -> list[tuple[str | None, str, str, str]]:
    start, end = values.get("start_percent"), values.get("end_percent")
    if isinstance(start, float) and isinstance(end, float) and start > end:
        return [("end_percent", "value_smaller_than_min",
                 f"end_percent {end} is before start_percent {start}: the ControlNet would never apply",
                 f"use end_percent >= {start}")]
    return []


def apply_controlnet(
    ctx: "NodeContext", positive: "Conditioning", negative: "Conditioning", control_net: Any, image: Any,
    vae: Any, strength: float, start_percent: float, end_percent: float,
) -> tuple["Conditioning", "Conditioning"]:
    """Both conditionings with the ControlNet hint added to each entry (shared by ComfyUI's apply nodes)."""
    from engine.controlnet import ControlHint
    from engine.nodes.types import Conditioning

    if strength == 0:
        return positive, negative
    if vae is None:
        raise ExecutionError(
            f"ControlNet '{control_net.name}' is an SD3 ControlNet: its image is VAE-encoded, so connect the "
            "'vae' input (the checkpoint loader's VAE)",
            node_id=ctx.node_id, class_type=ctx.class_type,
        )
    if image.ndim != 4:
        raise ExecutionError(f"image must be [batch, height, width, channels], got {tuple(image.shape)}",
                             node_id=ctx.node_id, class_type=ctx.class_type)
    hint = ControlHint(control=control_net, image=image, vae=vae, strength=float(strength),
                       start=float(start_percent), end=float(end_percent))

    def attach(conditioning: "Conditioning") -> "Conditioning":
        return Conditioning(tuple(replace(e, controlnets=e.controlnets + (hint,)) for e in conditioning))

    ctx.record["controlnets"] = [*ctx.record.get("controlnets", []), hint.describe()]
    return attach(positive), attach(negative)


_WINDOW = (
    Input("strength", "FLOAT", default=1.0, min=0.0, max=10.0, step=0.01),
    Input("start_percent", "FLOAT", default=0.0, min=0.0, max=1.0, step=0.001),
    Input("end_percent", "FLOAT", default=1.0, min=0.0, max=1.0, step=0.001),
)


class ControlNetApplyAdvanced(NodeType):
    """ComfyUI's "Apply ControlNet": strength and a start/end window; SD3 ControlNets need the VAE."""

    class_type = "ControlNetApplyAdvanced"
    category = "conditioning/controlnet"
    inputs = (
        Input("positive", "CONDITIONING"),
        Input("negative", "CONDITIONING"),
        Input("control_net", "CONTROL_NET"),
        Input("image", "IMAGE"),
        *_WINDOW,
        Input("vae", "VAE", optional=True),
    )
    outputs = (Output("CONDITIONING", "positive"), Output("CONDITIONING", "negative"))

    @classmethod
    def check(cls, values: dict[str, Any], ctx: "NodeContext | None") -> list[tuple[str | None, str, str, str]]:
        return _check_window(values)

    def run(self, ctx: "NodeContext", positive: Any, negative: Any, control_net: Any, image: Any,
            strength: float = 1.0, start_percent: float = 0.0, end_percent: float = 1.0,
            vae: Any = None) -> tuple[Any, Any]:
        return apply_controlnet(ctx, positive, negative, control_net, image, vae, strength, start_percent,
                                end_percent)


class ControlNetApplySD3(NodeType):
    """ComfyUI's SD3 variant ("Apply Controlnet with VAE"): the same, with the VAE required."""

    class_type = "ControlNetApplySD3"
    category = "conditioning/controlnet"
    inputs = (
        Input("positive", "CONDITIONING"),
        Input("negative", "CONDITIONING"),
        Input("control_net", "CONTROL_NET"),
        Input("vae", "VAE"),
        Input("image", "IMAGE"),
        *_WINDOW,
    )
    outputs = (Output("CONDITIONING", "positive"), Output("CONDITIONING", "negative"))

    @classmethod
    def check(cls, values: dict[str, Any], ctx: "NodeContext | None") -> list[tuple[str | None, str, str, str]]:
        return _check_window(values)

    def run(self, ctx: "NodeContext", positive: Any, negative: Any, control_net: Any, vae: Any, image: Any,
            strength: float = 1.0, start_percent: float = 0.0, end_percent: float = 1.0) -> tuple[Any, Any]:
        return apply_controlnet(ctx, positive, negative, control_net, image, vae, strength, start_percent,
                                end_percent)


CONTROLNET_NODES = (ControlNetLoader, ControlNetApplyAdvanced, ControlNetApplySD3)
