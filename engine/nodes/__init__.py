"""Built-in node types and the registry factory.

Node modules import no torch at module load, so building a registry (for parsing, validation and
``/object_info``) stays cheap.
"""

from __future__ import annotations

from engine.nodes.base import Input, NodeRegistry, NodeType, Output
from engine.nodes.conditioning import CONDITIONING_NODES
from engine.nodes.image import IMAGE_NODES
from engine.nodes.latent import LATENT_NODES
from engine.nodes.loaders import LOADER_NODES
from engine.nodes.sampling import SAMPLING_NODES
from engine.nodes.controlnet import CONTROLNET_NODES
from engine.nodes.image_input import IMAGE_INPUT_NODES
from engine.nodes.lora import LORA_NODES

BUILTIN_NODES: tuple[type[NodeType], ...] = (
    *LOADER_NODES, *CONDITIONING_NODES, *LATENT_NODES, *SAMPLING_NODES, *IMAGE_NODES,
    *LORA_NODES, *CONTROLNET_NODES, *IMAGE_INPUT_NODES,
)

__all__ = ["BUILTIN_NODES", "Input", "NodeRegistry", "NodeType", "Output", "default_registry"]


def default_registry() -> NodeRegistry:
    """A fresh registry holding every built-in node type."""
    registry = NodeRegistry()
    registry.register_all(BUILTIN_NODES)
    return registry
