"""Conditioning nodes: text encoding and the ComfyUI operations on conditioning lists."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from engine.errors import ExecutionError
from engine.nodes.base import Input, NodeType, Output

if TYPE_CHECKING:
    from engine.nodes.context import NodeContext
    from engine.nodes.types import ClipHandle, Conditioning

EMPTY_PADDING_CHOICES = ("none", "empty_prompt")


def _require_clip(ctx: "NodeContext", clip: "ClipHandle | None") -> "ClipHandle":
    if clip is None:
        raise ExecutionError(
            "clip input is None: the checkpoint loader's file holds no text encoders; "
            "load them with TripleCLIPLoader (clip_l, clip_g, t5xxl) and wire its CLIP here",
            node_id=ctx.node_id,
            class_type=ctx.class_type,
        )
    return clip


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
        from engine.nodes.types import Conditioning

        # ComfyUI's CLIPTextEncode encodes an empty text as text (empty_prompt), not as zeros.
        embeds, pooled = _require_clip(ctx, clip).encode(text, empty_padding="empty_prompt")
        return (Conditioning.single(embeds, pooled, prompt=text),)


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
        from engine.nodes.types import Conditioning

        embeds, pooled = _require_clip(ctx, clip).encode(clip_l, clip_g, t5xxl, empty_padding=empty_padding)
        return (Conditioning.single(embeds, pooled, prompt=_sd3_prompt_text(clip_l, clip_g, t5xxl)),)


class ConditioningZeroOut(NodeType):
    """Zeroes the embeddings (SD3's usual negative): same shapes, all values 0."""

    class_type = "ConditioningZeroOut"
    category = "conditioning"
    inputs = (Input("conditioning", "CONDITIONING"),)
    outputs = (Output("CONDITIONING"),)

    def run(self, ctx: "NodeContext", conditioning: Any) -> tuple[Any]:
        from engine.nodes.types import Conditioning

        zeroed: Conditioning = conditioning.zeroed()
        # The text no longer applies: record it as an empty negative, not as the positive's words.
        return (Conditioning(tuple(e.with_options(prompt="") for e in zeroed)),)


class ConditioningCombine(NodeType):
    """Both lists' entries together; the sampler averages their predictions."""

    class_type = "ConditioningCombine"
    category = "conditioning"
    inputs = (Input("conditioning_1", "CONDITIONING"), Input("conditioning_2", "CONDITIONING"))
    outputs = (Output("CONDITIONING"),)

    def run(self, ctx: "NodeContext", conditioning_1: Any, conditioning_2: Any) -> tuple[Any]:
        return (conditioning_1.combine(conditioning_2),)


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


def _sd3_prompt_text(clip_l: str, clip_g: str, t5xxl: str) -> str:
    """One text for the run record: the prompt when all three agree, else each labelled."""
    if clip_l == clip_g == t5xxl:
        return clip_l
    return f"clip_l: {clip_l} | clip_g: {clip_g} | t5xxl: {t5xxl}"


def conditioning_prompt(conditioning: "Conditioning | None") -> str | None:
    """The text(s) a conditioning was encoded from, for the run record ("a | b" after a combine)."""
    if conditioning is None:
        return None
    texts = [e.prompt for e in conditioning if e.prompt is not None]
    if not texts:
        return None
    unique = list(dict.fromkeys(texts))
    return " | ".join(unique)


CONDITIONING_NODES = (
    CLIPTextEncode, CLIPTextEncodeSD3, ConditioningZeroOut, ConditioningCombine, ConditioningSetTimestepRange,
)
