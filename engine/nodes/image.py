"""Image nodes: VAE decoding and the output nodes that write PNGs with ComfyUI metadata."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from engine.nodes.base import Input, NodeType, Output

if TYPE_CHECKING:
    from engine.nodes.context import NodeContext


class VAEDecode(NodeType):
    class_type = "VAEDecode"
    category = "latent"
    inputs = (Input("samples", "LATENT"), Input("vae", "VAE"))
    outputs = (Output("IMAGE"),)

    def run(self, ctx: "NodeContext", samples: Any, vae: Any) -> tuple[Any]:
        raise NotImplementedError


class VAEDecodeTiled(NodeType):
    class_type = "VAEDecodeTiled"
    category = "_for_testing"
    inputs = (
        Input("samples", "LATENT"),
        Input("vae", "VAE"),
        Input("tile_size", "INT", default=512, min=64, max=4096, step=32),
        Input("overlap", "INT", default=64, min=0, max=4096, step=32),
        Input("temporal_size", "INT", default=64, min=8, max=4096, step=4),
        Input("temporal_overlap", "INT", default=8, min=4, max=4096, step=4),
    )
    outputs = (Output("IMAGE"),)

    def run(self, ctx: "NodeContext", **inputs: Any) -> tuple[Any]:
        raise NotImplementedError


class SaveImage(NodeType):
    class_type = "SaveImage"
    category = "image"
    output_node = True
    cacheable = False
    inputs = (Input("images", "IMAGE"), Input("filename_prefix", "STRING", default="ComfyUI"))
    outputs = ()

    def run(self, ctx: "NodeContext", images: Any, filename_prefix: str = "ComfyUI") -> dict[str, Any]:
        raise NotImplementedError


class PreviewImage(NodeType):
    class_type = "PreviewImage"
    category = "image"
    output_node = True
    cacheable = False
    inputs = (Input("images", "IMAGE"),)
    outputs = ()

    def run(self, ctx: "NodeContext", images: Any) -> dict[str, Any]:
        raise NotImplementedError


IMAGE_NODES = (VAEDecode, VAEDecodeTiled, SaveImage, PreviewImage)
