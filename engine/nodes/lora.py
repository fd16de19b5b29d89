"""LoRA nodes: LoraLoader (model and text encoders) and LoraLoaderModelOnly, stackable.

The LoRA file is parsed once and kept by the model cache; these nodes only return handles that carry a
:class:`engine.lora.LoraPatch`. The patch is applied to the resident weights right before sampling (or
text encoding) and taken off right after, so switching LoRA between rows never reloads the base model
and a cached model is never left modified. Each node adds ``{name, strength_model, strength_clip,
sha256}`` to ``ctx.record["loras"]`` for the ledger.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from engine.errors import ExecutionError
from engine.nodes.base import Input, NodeType, Output
from engine.nodes.loaders import model_choices

if TYPE_CHECKING:
    from engine.nodes.context import NodeContext

STRENGTH_RANGE = (-100.0, 100.0)  # ComfyUI's


def _strength(name: str) -> Input:
    return Input(name, "FLOAT", default=1.0, min=STRENGTH_RANGE[0], max=STRENGTH_RANGE[1], step=0.01)


def _record(ctx: "NodeContext", lora: Any, strength_model: float, strength_clip: float | None) -> None:
    entry = {"name": lora.name, "strength_model": float(strength_model), "sha256": lora.sha256}
    if strength_clip is not None:
        entry["strength_clip"] = float(strength_clip)
    # A new list, never an in-place append: the executor caches each node's record entries.
    ctx.record["loras"] = [*ctx.record.get("loras", []), entry]


def model_with_lora(ctx: "NodeContext", model: Any, lora: Any, strength: float) -> Any:
    """``model`` with ``lora`` at ``strength`` as a patch; its keys are checked against the transformer now.

    FP8 models take LoRAs too: their FP8 layers run the LoRA as a side branch (see :mod:`engine.lora`).
    """
    from engine.lora import LoraPatch

    lora.resolve(model.transformer, "transformer")
    return model.with_patches(LoraPatch.of(lora, strength, "model"))


class LoraLoader(NodeType):
    """A LoRA on the diffusion model and the text encoders, each with its own strength."""

    class_type = "LoraLoader"
    category = "loaders"
    inputs = (
        Input("model", "MODEL"),
        Input("clip", "CLIP"),
        Input("lora_name", "COMBO", choices=model_choices("loras")),
        _strength("strength_model"),
        _strength("strength_clip"),
    )
    outputs = (Output("MODEL"), Output("CLIP"))

    def run(self, ctx: "NodeContext", model: Any, clip: Any, lora_name: str, strength_model: float = 1.0,
            strength_clip: float = 1.0) -> tuple[Any, Any]:
        from engine.lora import clip_with_lora

        lora = ctx.models.lora(lora_name)
        _record(ctx, lora, strength_model, strength_clip)
        if strength_model != 0:
            model = model_with_lora(ctx, model, lora, strength_model)
        if strength_clip != 0:
            if clip is None:
                raise ExecutionError(
                    "clip input is None: the checkpoint holds no text encoders; set strength_clip to 0 or "
                    "use LoraLoaderModelOnly",
                    node_id=ctx.node_id, class_type=ctx.class_type,
                )
            clip = clip_with_lora(clip, lora, strength_clip)
        return model, clip


class LoraLoaderModelOnly(NodeType):
    """A LoRA on the diffusion model only (text-encoder weights in the file are not used)."""

    class_type = "LoraLoaderModelOnly"
    category = "loaders"
    inputs = (
        Input("model", "MODEL"),
        Input("lora_name", "COMBO", choices=model_choices("loras")),
        _strength("strength_model"),
    )
    outputs = (Output("MODEL"),)

    def run(self, ctx: "NodeContext", model: Any, lora_name: str, strength_model: float = 1.0) -> tuple[Any]:
        lora = ctx.models.lora(lora_name)
        _record(ctx, lora, strength_model, None)
        if strength_model == 0:
            return (model,)
        return (model_with_lora(ctx, model, lora, strength_model),)


LORA_NODES = (LoraLoader, LoraLoaderModelOnly)

__all__ = ["LORA_NODES", "LoraLoader", "LoraLoaderModelOnly", "model_with_lora"]
