"""Model resolution, loading and the resident cache.

``ModelResolver`` turns names into files/folders, ``ModelCache`` loads each once and keeps it resident,
``engine.models.checkpoint`` reads and writes single-file checkpoints in ComfyUI's key layout, and
``engine.models.demo`` builds the tiny deterministic SD3.5-shaped demo model. Importing this package does
not import torch; the loaders do, when called.
"""

from engine.models.cache import LoadedTransformer, ModelCache
from engine.models.resolve import ModelResolver, ResolvedModel

__all__ = ["LoadedTransformer", "ModelCache", "ModelResolver", "ResolvedModel"]
