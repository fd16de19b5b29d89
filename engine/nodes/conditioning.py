"""Conditioning nodes: text encoding and the ComfyUI operations on conditioning lists."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from engine.nodes.base import Input, NodeType, Output

if TYPE_CHECKING:
    from engine.nodes.context import NodeContext

EMPTY_PADDING_CHOICES = ("none", "empty_prompt")


class CLIPTextEncode(NodeType):
    """One prompt through every text encoder of the CLIP handle."""

    class_type = "CLIPTextEncode"
    category = "conditioning"
    inputs = (
        Input("text", "STRING", default="", multiline=True),
        Input("clip", "CLIP"),
    )
    outputs = (Output("CONDITIONING"),)

    def run(self, ctx: "NodeContext", text: str, clip: Any) -> tuple[Any]:
        return (clip.encode(text),)


class CLIPTextEncodeSD3(NodeType):
    """Separate prompts for CLIP-L, CLIP-G and T5-XXL."""

    class_type = "CLIPTextEncodeSD3"
    category = "conditioning"
    inputs = (
        Input("clip", "CLIP"),
        Input("clip_l", "STRING", default="", multiline=True),
        Input("clip_g", "STRING", default="", multiline=True),
        Input("t5xxl", "STRING", default="", multiline=True),
        Input("empty_padding", "COMBO", default="none", choices=EMPTY_PADDING_CHOICES),
    )
    outputs = (Output("CONDITIONING"),)

    def run(self, ctx: "NodeContext", clip: Any, clip_l: str, clip_g: str, t5xxl: str,
            empty_padding: str = "none") -> tuple[Any]:
        return (clip.encode_sd3(clip_l, clip_g, t5xxl, empty_padding=empty_padding),)


class ConditioningZeroOut(NodeType):
    """Zeroes the embeddings (SD3's usual negative): same shapes, all values 0."""

    class_type = "ConditioningZeroOut"
    category = "conditioning"
    inputs = (Input("conditioning", "CONDITIONING"),)
    outputs = (Output("CONDITIONING"),)

    def run(self, ctx: "NodeContext", conditioning: Any) -> tuple[Any]:
        return (conditioning.zeroed(),)


class ConditioningCombine(NodeType):
    """Both lists' entries together; the sampler averages their predictions."""

    class_type = "ConditioningCombine"
    category = "conditioning"
    inputs = (Input("conditioning_1", "CONDITIONING"), Input("conditioning_2", "CONDITIONING"))
    outputs = (Output("CONDITIONING"),)

    def run(self, ctx: "NodeContext", conditioning_1: Any, conditioning_2: Any) -> tuple[Any]:
        return (conditioning_1.combined(conditioning_2),)


class ConditioningSetTimestepRange(NodeType):
    """Restricts the entries to a part of sampling: ``start``/``end`` are fractions of the schedule."""

    class_type = "ConditioningSetTimestepRange"
    category = "conditioning"
    inputs = (
        Input("conditioning", "CONDITIONING"),
        Input("start", "FLOAT", default=0.0, min=0.0, max=1.0, step=0.001),
        Input("end", "FLOAT", default=1.0, min=0.0, max=1.0, step=0.001),
    )
    outputs = (Output("CONDITIONING"),)

    def run(self, ctx: "NodeContext", conditioning: Any, start: float, end: float) -> tuple[Any]:
        return (conditioning.with_timestep_range(start, end),)


CONDITIONING_NODES = (
    CLIPTextEncode, CLIPTextEncodeSD3, ConditioningZeroOut, ConditioningCombine, ConditioningSetTimestepRange,
)
