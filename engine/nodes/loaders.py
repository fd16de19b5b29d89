"""Loader nodes: checkpoints, diffusion models, text encoders and VAEs, in ComfyUI's declarations.

Every loader asks the resident model cache (``ctx.models``) for its handle, so a model is read from disk
once and stays resident across runs. The COMBO choices of file names come from the model resolver at run
time; the built-in demo checkpoint is always offered so a fresh install runs without any download.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from engine.errors import EngineError, ModelLoadError
from engine.nodes.base import Input, NodeType, Output
from engine.settings import DEMO_CHECKPOINT

if TYPE_CHECKING:
    from engine.nodes.context import NodeContext

# ComfyUI 0.3.64's UNETLoader weight_dtype values, in its order.
UNET_WEIGHT_DTYPES = ("default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2")
# CLIPLoader "type" values of ComfyUI 0.3.64 (order kept for UI widget compatibility); only sd3 loads SD3 encoders.
CLIP_LOADER_TYPES = (
    "stable_diffusion", "stable_cascade", "sd3", "stable_audio", "mochi", "ltxv", "pixart", "cosmos",
    "lumina2", "wan", "hidream", "chroma", "ace", "omnigen2", "qwen_image", "hunyuan_image",
)
DUAL_CLIP_LOADER_TYPES = ("sdxl", "sd3", "flux", "hunyuan_video", "hidream", "hunyuan_image")
CLIP_DEVICES = ("default", "cpu")
SUPPORTED_CLIP_TYPE = "sd3"


def model_choices(kind: str, include_demo: bool = False) -> Callable[["NodeContext | None"], list[str]]:
    """A COMBO choice source listing the files of ``kind`` (checkpoints, vae, ...) the resolver finds.

    Without a context (e.g. a static /object_info) only the demo name is known.
    """

    def choices(ctx: "NodeContext | None") -> list[str]:
        names: list[str] = [DEMO_CHECKPOINT] if include_demo else []
        if ctx is not None and ctx.models is not None:
            for name in ctx.models.available(kind):
                if name not in names:
                    names.append(name)
        return names

    def accepts(ctx: "NodeContext | None", value: Any) -> bool:
        """A name no folder lists but the resolver finds: a Hugging Face repo id in the local cache."""
        if ctx is None or ctx.models is None or not isinstance(value, str) or "/" not in value:
            return False
        try:
            return ctx.models.resolver.resolve(kind, value).source == "hub"
        except EngineError:
            return False

    def where(ctx: "NodeContext | None") -> str:
        """The folders a file of this kind goes in, for the message when none is there."""
        if ctx is None or ctx.models is None:
            return f"models/{kind}"
        return " or ".join(str(folder) for folder in ctx.models.resolver.folders(kind))

    choices.accepts = accepts  # type: ignore[attr-defined] - read by validation (engine/validate.py)
    choices.where = where  # type: ignore[attr-defined]
    return choices


def _refuse_clip_type(clip_type: str) -> list[tuple[str | None, str, str, str]]:
    if clip_type == SUPPORTED_CLIP_TYPE:
        return []
    return [(
        "type",
        "value_not_in_list",
        f"CLIP type '{clip_type}' is not supported by this SD3.5 engine",
        f"supported: {SUPPORTED_CLIP_TYPE}",
    )]


def _check_device(ctx: "NodeContext", device: str) -> None:
    """ComfyUI's ``device=cpu`` keeps text encoders off the GPU; the cache places every model on one device."""
    if device == "default" or (device == "cpu" and ctx.models.device == "cpu"):
        return
    raise ModelLoadError(
        f"text encoder device '{device}' is not supported with models on {ctx.models.device}",
        device=device,
        supported=["default"],
    )


class CheckpointLoaderSimple(NodeType):
    """A single-file checkpoint (or the built-in demo): transformer, text encoders and VAE."""

    class_type = "CheckpointLoaderSimple"
    aliases = ("LoadCheckpoint",)  # the source article's name for it
    category = "loaders"
    inputs = (Input("ckpt_name", "COMBO", choices=model_choices("checkpoints", include_demo=True)),)
    outputs = (Output("MODEL"), Output("CLIP"), Output("VAE"))

    def run(self, ctx: "NodeContext", ckpt_name: str) -> tuple[Any, Any, Any]:
        # CLIP or VAE is None when the file holds none (sd3.5_large.safetensors); like ComfyUI, that is
        # an error only in a node that uses it (see CLIPTextEncode / VAEDecode).
        model, clip, vae = ctx.models.checkpoint(ckpt_name)
        return model, clip, vae


class UNETLoader(NodeType):
    """A diffusion model (transformer) file without text encoders or VAE."""

    class_type = "UNETLoader"
    category = "loaders"
    inputs = (
        Input("unet_name", "COMBO", choices=model_choices("diffusion_models")),
        Input("weight_dtype", "COMBO", default="default", choices=UNET_WEIGHT_DTYPES),
    )
    outputs = (Output("MODEL"),)

    @classmethod
    def check(cls, values: dict[str, Any], ctx: "NodeContext | None") -> list[tuple[str | None, str, str, str]]:
        if values.get("weight_dtype") == "fp8_e5m2":
            return [(
                "weight_dtype",
                "value_not_in_list",
                "weight_dtype 'fp8_e5m2' is not supported: SD3.5 FP8 inference here uses E4M3",
                "supported: " + ", ".join(d for d in UNET_WEIGHT_DTYPES if d != "fp8_e5m2"),
            )]
        return []

    def run(self, ctx: "NodeContext", unet_name: str, weight_dtype: str = "default") -> tuple[Any]:
        if weight_dtype == "fp8_e5m2":
            raise ModelLoadError(
                "weight_dtype 'fp8_e5m2' is not supported",
                weight_dtype=weight_dtype,
                supported=[d for d in UNET_WEIGHT_DTYPES if d != "fp8_e5m2"],
            )
        # fp8_e4m3fn: FP8 storage (weight_only); fp8_e4m3fn_fast: FP8 compute where the GPU can, else
        # weight_only with a logged message. The cache's precision policy decides, and the handle's
        # precision string (recorded with the generation) says what actually runs.
        return (ctx.models.diffusion_model(unet_name, weight_dtype=weight_dtype),)


class TripleCLIPLoader(NodeType):
    """SD3's three text encoders: CLIP-L, CLIP-G and T5-XXL."""

    class_type = "TripleCLIPLoader"
    category = "loaders"
    inputs = (
        Input("clip_name1", "COMBO", choices=model_choices("text_encoders")),
        Input("clip_name2", "COMBO", choices=model_choices("text_encoders")),
        Input("clip_name3", "COMBO", choices=model_choices("text_encoders")),
    )
    outputs = (Output("CLIP"),)

    def run(self, ctx: "NodeContext", clip_name1: str, clip_name2: str, clip_name3: str) -> tuple[Any]:
        return (ctx.models.text_encoders([clip_name1, clip_name2, clip_name3], type=SUPPORTED_CLIP_TYPE),)


class DualCLIPLoader(NodeType):
    """Two of SD3's text encoders (CLIP-L and CLIP-G); T5 is then absent and its embedding zero."""

    class_type = "DualCLIPLoader"
    category = "loaders"
    inputs = (
        Input("clip_name1", "COMBO", choices=model_choices("text_encoders")),
        Input("clip_name2", "COMBO", choices=model_choices("text_encoders")),
        Input("type", "COMBO", default="sdxl", choices=DUAL_CLIP_LOADER_TYPES),
        Input("device", "COMBO", default="default", choices=CLIP_DEVICES, optional=True),
    )
    outputs = (Output("CLIP"),)

    @classmethod
    def check(cls, values: dict[str, Any], ctx: "NodeContext | None") -> list[tuple[str | None, str, str, str]]:
        return _refuse_clip_type(values["type"]) if "type" in values else []

    def run(self, ctx: "NodeContext", clip_name1: str, clip_name2: str, type: str = "sd3",
            device: str = "default") -> tuple[Any]:
        _check_device(ctx, device)
        return (ctx.models.text_encoders([clip_name1, clip_name2], type=type),)


class CLIPLoader(NodeType):
    """One text encoder file; for SD3 usually T5-XXL alone."""

    class_type = "CLIPLoader"
    category = "loaders"
    inputs = (
        Input("clip_name", "COMBO", choices=model_choices("text_encoders")),
        Input("type", "COMBO", default="stable_diffusion", choices=CLIP_LOADER_TYPES),
        Input("device", "COMBO", default="default", choices=CLIP_DEVICES, optional=True),
    )
    outputs = (Output("CLIP"),)

    @classmethod
    def check(cls, values: dict[str, Any], ctx: "NodeContext | None") -> list[tuple[str | None, str, str, str]]:
        return _refuse_clip_type(values["type"]) if "type" in values else []

    def run(self, ctx: "NodeContext", clip_name: str, type: str = "sd3", device: str = "default") -> tuple[Any]:
        _check_device(ctx, device)
        return (ctx.models.text_encoders([clip_name], type=type),)


class VAELoader(NodeType):
    """A VAE file (or the demo's VAE)."""

    class_type = "VAELoader"
    category = "loaders"
    inputs = (Input("vae_name", "COMBO", choices=model_choices("vae")),)
    outputs = (Output("VAE"),)

    def run(self, ctx: "NodeContext", vae_name: str) -> tuple[Any]:
        return (ctx.models.vae(vae_name),)


LOADER_NODES = (CheckpointLoaderSimple, UNETLoader, TripleCLIPLoader, DualCLIPLoader, CLIPLoader, VAELoader)
