"""Empty latent nodes.

Latent shapes depend on the model (channels, VAE scale factor), which these nodes do not see: like
ComfyUI they build a placeholder and the sampler adapts it. EmptySD3LatentImage makes a 16-channel
latent at 1/8 resolution (ComfyUI's SD3 layout); EmptyLatentImage makes ComfyUI's 4-channel one. Both
are all zeros, so the sampler replaces an all-zero latent whose channel count differs from the model's
with zeros of the model's channel count (ComfyUI's ``fix_empty_latent_channels``); a non-empty latent
with the wrong channel count is an error. The pixel size is kept in ``"pixel_size"`` so a model whose
VAE scale factor is not 8 (the tiny demo) still samples the requested width and height.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from engine.nodes.base import Input, NodeType, Output

if TYPE_CHECKING:
    from engine.nodes.context import NodeContext

MAX_RESOLUTION = 16384
COMFY_LATENT_SCALE = 8  # ComfyUI's placeholder scale; the sampler rescales to the model's own
SD3_PLACEHOLDER_CHANNELS = 16
SD15_PLACEHOLDER_CHANNELS = 4


# SD3 models sample 2×2 patches of a latent at 1/8 of the pixel size: a side must be a multiple of 16 pixels.
SD3_PIXEL_MULTIPLE = 16


def size_problems(values: dict[str, Any]) -> list[tuple[str | None, str, str, str]]:
    """Width or height that an SD3 model cannot sample, found before any row runs (not at sampling)."""
    problems = []
    for name in ("width", "height"):
        value = values.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value % SD3_PIXEL_MULTIPLE:
            lower = value - value % SD3_PIXEL_MULTIPLE
            problems.append((name, "custom_validation_failed",
                             f"{name} {value} is not a multiple of {SD3_PIXEL_MULTIPLE}",
                             f"SD3 models work on {SD3_PIXEL_MULTIPLE}-pixel blocks: use {lower or SD3_PIXEL_MULTIPLE} "
                             f"or {lower + SD3_PIXEL_MULTIPLE}"))
    return problems


def empty_latent(width: int, height: int, batch_size: int, channels: int) -> dict[str, Any]:
    """A zero latent in ComfyUI's placeholder layout, remembering the requested pixel size."""
    import torch

    samples = torch.zeros(
        [batch_size, channels, height // COMFY_LATENT_SCALE, width // COMFY_LATENT_SCALE], dtype=torch.float32
    )
    return {"samples": samples, "pixel_size": (width, height), "empty": True}


class EmptySD3LatentImage(NodeType):
    class_type = "EmptySD3LatentImage"
    category = "latent"
    inputs = (
        Input("width", "INT", default=1024, min=16, max=MAX_RESOLUTION, step=16),
        Input("height", "INT", default=1024, min=16, max=MAX_RESOLUTION, step=16),
        Input("batch_size", "INT", default=1, min=1, max=4096),
    )
    outputs = (Output("LATENT"),)

    @classmethod
    def check(cls, values: dict[str, Any], ctx: "NodeContext | None") -> list[tuple[str | None, str, str, str]]:
        return size_problems(values)

    def run(self, ctx: "NodeContext", width: int, height: int, batch_size: int = 1) -> tuple[Any]:
        return (empty_latent(width, height, batch_size, SD3_PLACEHOLDER_CHANNELS),)


class EmptyLatentImage(NodeType):
    class_type = "EmptyLatentImage"
    category = "latent"
    inputs = (
        Input("width", "INT", default=512, min=16, max=MAX_RESOLUTION, step=8),
        Input("height", "INT", default=512, min=16, max=MAX_RESOLUTION, step=8),
        Input("batch_size", "INT", default=1, min=1, max=4096),
    )
    outputs = (Output("LATENT"),)

    @classmethod
    def check(cls, values: dict[str, Any], ctx: "NodeContext | None") -> list[tuple[str | None, str, str, str]]:
        return size_problems(values)  # ComfyUI allows steps of 8; the SD3 models this engine runs need 16

    def run(self, ctx: "NodeContext", width: int, height: int, batch_size: int = 1) -> tuple[Any]:
        return (empty_latent(width, height, batch_size, SD15_PLACEHOLDER_CHANNELS),)


LATENT_NODES = (EmptySD3LatentImage, EmptyLatentImage)
