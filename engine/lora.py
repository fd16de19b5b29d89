"""LoRA files and their application as weight deltas on the resident SD3 models.

A LoRA never changes the cached model permanently. :class:`LoraPatch` is an immutable description
(file, strength, which model) carried by a ``ModelHandle.patches`` tuple or a :class:`PatchedClipHandle`;
the sampler (for the transformer) and :meth:`PatchedClipHandle.encode` (for the text encoders) apply the
patches right before they compute and take them off right after. Nothing is reloaded, and afterwards the
base model computes bit for bit what it did before:

* a float layer (``nn.Linear`` and the like) gets its weight swapped for ``W + strength * scale * up @ down``
  (a new tensor); taking the patch off puts the original tensor object back;
* an FP8 layer (:class:`engine.fp8.Fp8Linear`) keeps its E4M3 weight untouched (dequantizing, merging and
  requantizing would be lossy, slow and not exactly undoable); the LoRA runs beside it as a low-rank
  branch, ``y = fp8_linear(x) + strength * scale * (x @ down.T) @ up.T`` in the layer's compute dtype,
  appended to its ``low_rank_branches`` and removed again afterwards. Stacked LoRAs add up either way.

Key layouts understood (the ones ComfyUI and diffusers users have):

* kohya / ComfyUI: ``lora_unet_<module>`` (or OneTrainer's ``lora_transformer_<module>``) for the
  transformer and ``lora_te1_`` / ``lora_te2_`` / ``lora_te3_`` for CLIP-L / CLIP-G / T5, with
  ``.lora_down.weight``, ``.lora_up.weight`` and ``.alpha``. ``<module>`` is the diffusers module path
  with dots as underscores, or the original MMDiT path (``joint_blocks_0_x_block_attn_qkv``, whose fused
  qkv is split over ``to_q``/``to_k``/``to_v``).
* diffusers / PEFT: ``transformer.<module>.lora_A.weight`` / ``lora_B.weight`` (``text_encoder.``,
  ``text_encoder_2.``, ``text_encoder_3.`` for the encoders; ``base_model.model.`` or no prefix means the
  transformer), optional ``.alpha``.

``scale`` is ``alpha / rank`` when the file has an alpha, else 1 (diffusers' convention).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.errors import ExecutionError, ModelLoadError
from engine.nodes.types import ClipHandle

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

TARGETS = ("transformer", "clip_l", "clip_g", "t5")
CLIP_TARGETS = ("clip_l", "clip_g", "t5")
SUPPORTED_LAYOUTS = (
    "kohya/ComfyUI (lora_unet_*/lora_te1_*/lora_te2_*/lora_te3_* with .lora_up/.lora_down/.alpha)",
    "diffusers/PEFT (transformer.*/text_encoder*.* with .lora_A/.lora_B)",
)
_UP_SUFFIXES = (".lora_up.weight", ".lora_B.weight", ".lora.up.weight")
_DOWN_SUFFIXES = (".lora_down.weight", ".lora_A.weight", ".lora.down.weight")
_ALPHA_SUFFIX = ".alpha"
_KOHYA_PREFIXES = {
    "lora_unet_": "transformer",
    "lora_transformer_": "transformer",
    "lora_te1_": "clip_l",
    "lora_te2_": "clip_g",
    "lora_te3_": "t5",
}
_DOTTED_PREFIXES = {
    "transformer.": "transformer",
    "base_model.model.": "transformer",
    "text_encoder.": "clip_l",
    "text_encoder_2.": "clip_g",
    "text_encoder_3.": "t5",
}
# Original MMDiT (SAI/ComfyUI) block names -> diffusers SD3Transformer2DModel modules.
_MMDIT_BLOCK = re.compile(
    r"^joint_blocks[._](\d+)[._](x_block|context_block)[._](attn2|attn|mlp|adaLN_modulation)[._](qkv|proj|fc1|fc2|1)$"
)
_MMDIT_TARGETS = {
    ("x_block", "attn", "qkv"): ("attn.to_q", "attn.to_k", "attn.to_v"),
    ("x_block", "attn", "proj"): ("attn.to_out.0",),
    ("x_block", "attn2", "qkv"): ("attn2.to_q", "attn2.to_k", "attn2.to_v"),
    ("x_block", "attn2", "proj"): ("attn2.to_out.0",),
    ("x_block", "mlp", "fc1"): ("ff.net.0.proj",),
    ("x_block", "mlp", "fc2"): ("ff.net.2",),
    ("x_block", "adaLN_modulation", "1"): ("norm1.linear",),
    ("context_block", "attn", "qkv"): ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    ("context_block", "attn", "proj"): ("attn.to_add_out",),
    ("context_block", "mlp", "fc1"): ("ff_context.net.0.proj",),
    ("context_block", "mlp", "fc2"): ("ff_context.net.2",),
    ("context_block", "adaLN_modulation", "1"): ("norm1_context.linear",),
}


@dataclass(frozen=True)
class LoraPair:
    """One low-rank update as stored in the file: ``delta = scale * up @ down`` on one weight."""

    key: str  # the file's key stem, for error messages
    target: str  # one of TARGETS
    module: str  # dotted diffusers/transformers path, or "~" + underscored path still to be resolved
    up: Any = field(repr=False)
    down: Any = field(repr=False)
    scale: float = 1.0
    chunk: tuple[int, int] | None = None  # (index, count): rows of ``up`` for one of a fused qkv's parts


@dataclass(frozen=True)
class LoraWeights:
    """A loaded LoRA file: its low-rank pairs, name and file hash."""

    name: str
    sha256: str | None
    pairs: tuple[LoraPair, ...] = field(repr=False)
    path: str | None = None

    def targets(self) -> set[str]:
        return {pair.target for pair in self.pairs}

    def resolve(self, module: Any, target: str) -> list[tuple[str, LoraPair]]:
        """``(module path, pair)`` for every pair of ``target`` in ``module``.

        Raises ModelLoadError naming the keys that match no layer of the model (a LoRA for another
        architecture, or a mis-named file).
        """
        pairs = [p for p in self.pairs if p.target == target]
        if not pairs:
            return []
        from engine.fp8.linear import Fp8Linear

        tensor = _tensor_type()
        # A transformer_engine FP8 layer keeps its weight inside TE (``weight`` is None) but takes a branch too.
        names = {
            name for name, sub in module.named_modules()
            if isinstance(sub, Fp8Linear) or isinstance(getattr(sub, "weight", None), tensor)
        }
        underscored = {name.replace(".", "_"): name for name in names}
        resolved, unmatched = [], []
        for pair in pairs:
            if pair.module.startswith("~"):
                path = underscored.get(pair.module[1:])
            else:
                path = pair.module if pair.module in names else None
            if path is None:
                unmatched.append(pair.key)
            else:
                resolved.append((path, pair))
        if unmatched:
            shown = ", ".join(unmatched[:5]) + (f" (+{len(unmatched) - 5} more)" if len(unmatched) > 5 else "")
            raise ModelLoadError(
                f"LoRA '{self.name}' has {len(unmatched)} key(s) that match no layer of the {target}: {shown}; "
                "it was probably made for another model",
                name=self.name, target=target, unmatched=unmatched[:20],
            )
        return resolved


@dataclass(frozen=True)
class LoraPatch:
    """A LoRA at a strength on one part of the model (``part``: "model" or "clip").

    Equality and hashing use name, file hash, strength and part only, so sampling groups compare cheaply.
    """

    lora: LoraWeights = field(compare=False, repr=False)
    name: str
    sha256: str | None
    strength: float
    part: str  # "model" | "clip"

    @classmethod
    def of(cls, lora: LoraWeights, strength: float, part: str) -> "LoraPatch":
        return cls(lora, lora.name, lora.sha256, float(strength), part)

    @contextlib.contextmanager
    def applied(self, module: Any, target: str = "transformer") -> Iterator[None]:
        """Within the block, ``module`` computes with this LoRA; afterwards exactly as before.

        Float layers get a merged weight, FP8 layers a low-rank side branch (see the module docstring).
        """
        with apply_pairs(module, self.lora.resolve(module, target), self.strength, self.name):
            yield


@contextlib.contextmanager
def apply_pairs(module: Any, resolved: list[tuple[str, LoraPair]], strength: float, name: str) -> Iterator[None]:
    """Patch every touched layer of ``module`` for the block; restore each one exactly on exit.

    Float weights are swapped for ``W + strength * delta``; :class:`~engine.fp8.Fp8Linear` layers get
    one low-rank branch per layer (all of this LoRA's pairs on that layer, concatenated along the rank).
    """
    import torch

    from engine.fp8.linear import Fp8Linear

    originals: list[tuple[Any, Any]] = []
    branches: list[tuple[Any, tuple[Any, Any]]] = []
    try:
        deltas: dict[str, Any] = {}
        factors: dict[str, list[tuple[Any, Any]]] = {}
        for path, pair in resolved:
            layer = module.get_submodule(path)
            if isinstance(layer, Fp8Linear):
                factors.setdefault(path, []).append(_pair_factors(pair, layer, strength))
                continue
            weight = layer.weight
            if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
                raise ExecutionError(
                    f"LoRA '{name}' cannot patch layer '{path}' stored as {weight.dtype}; LoRAs apply to "
                    "float32/bf16/fp16 weights and to FP8 layers built by the FP8 loader (Fp8Linear)",
                    lora=name, layer=path, dtype=str(weight.dtype),
                )
            delta = _pair_delta(pair, weight)
            deltas[path] = deltas[path] + delta if path in deltas else delta
        with torch.no_grad():
            for path, delta in deltas.items():
                weight = module.get_submodule(path).weight
                original = weight.data
                originals.append((weight, original))
                weight.data = (original.to(torch.float32) + strength * delta).to(original.dtype)
            for path, pairs in factors.items():
                layer = module.get_submodule(path)
                branch = (torch.cat([down for down, _ in pairs], dim=0), torch.cat([up for _, up in pairs], dim=1))
                branches.append((layer, branch))
                layer.low_rank_branches = layer.low_rank_branches + (branch,)
        yield
    finally:
        for weight, original in reversed(originals):
            weight.data = original
        for layer, branch in reversed(branches):
            # By identity: another LoRA's branch on the same layer stays, whatever the exit order.
            layer.low_rank_branches = tuple(b for b in layer.low_rank_branches if b is not branch)


def _pair_delta(pair: LoraPair, weight: Any) -> "torch.Tensor":
    import torch

    up = pair.up.to(device=weight.device, dtype=torch.float32)
    down = pair.down.to(device=weight.device, dtype=torch.float32)
    if pair.chunk is not None:
        index, count = pair.chunk
        up = up.chunk(count, dim=0)[index]
    up, down = up.flatten(1), down.flatten(1)
    # The factors' own shape must match the layer's, not just their product's size: a LoRA stored the
    # wrong way round has as many numbers and would be applied as noise.
    expected = (weight.shape[0], weight[0].numel())
    if (up.shape[0], down.shape[1]) != expected or up.shape[1] != down.shape[0]:
        raise ModelLoadError(
            f"LoRA key '{pair.key}' makes a {(up.shape[0], down.shape[1])} update (rank {down.shape[0]}); the "
            f"layer's weight is {tuple(weight.shape)}",
            key=pair.key, lora_shape=[up.shape[0], down.shape[1]], weight_shape=list(weight.shape),
        )
    return ((up @ down) * pair.scale).reshape(weight.shape)


def _pair_factors(pair: LoraPair, layer: Any, strength: float) -> tuple["torch.Tensor", "torch.Tensor"]:
    """``(down, up)`` of one pair for an FP8 layer's branch: ``strength * scale`` folded into ``up``,
    both on the layer's device in its compute dtype (the branch adds to the layer's output there)."""
    import torch

    device = (layer.weight if layer.weight is not None else next(layer.te_linear.parameters())).device
    up = pair.up.to(device=device, dtype=torch.float32).flatten(1)
    down = pair.down.to(device=device, dtype=torch.float32).flatten(1)
    if pair.chunk is not None:
        index, count = pair.chunk
        up = up.chunk(count, dim=0)[index]
    if up.shape[0] != layer.out_features or down.shape[1] != layer.in_features or up.shape[1] != down.shape[0]:
        raise ModelLoadError(
            f"LoRA key '{pair.key}' makes a {(up.shape[0], down.shape[1])} update (rank {down.shape[0]}); the "
            f"layer is ({layer.out_features}, {layer.in_features})",
            key=pair.key, lora_shape=[up.shape[0], down.shape[1]],
            weight_shape=[layer.out_features, layer.in_features],
        )
    return down.to(layer.compute_dtype), (up * (strength * pair.scale)).to(layer.compute_dtype)


# --- files -------------------------------------------------------------------------------------------


def read_state_dict(path: Path) -> dict[str, "torch.Tensor"]:
    """Tensors of a ``.safetensors`` file, or of a ``.pt``/``.ckpt``/``.bin`` file (weights only)."""
    import torch

    if path.suffix.lower() in (".safetensors", ".sft"):
        from safetensors.torch import load_file

        try:
            # Copied out of the memory map: a LoRA stays cached for the life of the process, and a file
            # replaced under it would change its tensors in place, or crash the process if it shrank.
            return {key: tensor.clone() for key, tensor in load_file(str(path), device="cpu").items()}
        except Exception as exc:  # noqa: BLE001 - any parse failure means "not a readable file"
            raise ModelLoadError(f"cannot read '{path.name}': {exc}", path=str(path)) from exc
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"cannot read '{path.name}': {exc}", path=str(path)) from exc
    if isinstance(data, dict) and "state_dict" in data and isinstance(data["state_dict"], dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise ModelLoadError(f"'{path.name}' holds no tensor dictionary", path=str(path))
    return {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}


def load_lora_file(path: str | os.PathLike[str], name: str | None = None, sha256: str | None = None) -> LoraWeights:
    """Parse a LoRA file into :class:`LoraWeights`; ModelLoadError when it is no LoRA we understand."""
    path = Path(path)
    name = name or path.name
    return parse_lora_state_dict(read_state_dict(path), name=name, sha256=sha256, path=str(path))


def parse_lora_state_dict(
    state: dict[str, "torch.Tensor"], name: str, sha256: str | None = None, path: str | None = None
) -> LoraWeights:
    """The pairs of a LoRA state dict in either supported layout (see the module docstring)."""
    stems: dict[str, dict[str, Any]] = {}
    unknown: list[str] = []
    for key, tensor in state.items():
        for role, suffixes in (("up", _UP_SUFFIXES), ("down", _DOWN_SUFFIXES), ("alpha", (_ALPHA_SUFFIX,))):
            suffix = next((s for s in suffixes if key.endswith(s)), None)
            if suffix is not None:
                stems.setdefault(key[: -len(suffix)], {})[role] = tensor
                break
        else:
            unknown.append(key)
    if unknown:
        raise ModelLoadError(
            f"LoRA '{name}' has keys of no supported layout (e.g. {', '.join(sorted(unknown)[:3])}); "
            f"supported: {'; '.join(SUPPORTED_LAYOUTS)}",
            name=name, unknown_keys=sorted(unknown)[:20], supported=list(SUPPORTED_LAYOUTS),
        )
    pairs: list[LoraPair] = []
    for stem, parts in sorted(stems.items()):
        if "up" not in parts or "down" not in parts:
            missing = "up (lora_up/lora_B)" if "up" not in parts else "down (lora_down/lora_A)"
            raise ModelLoadError(f"LoRA '{name}': key '{stem}' has no {missing} weight", name=name, key=stem)
        up, down = parts["up"], parts["down"]
        _check_factors(name, stem, up, down, parts.get("alpha"))
        rank = int(down.shape[0])
        scale = float(parts["alpha"]) / rank if "alpha" in parts else 1.0
        for target, module, chunk in _locate(stem, name):
            pairs.append(LoraPair(stem, target, module, up, down, scale, chunk))
    if not pairs:
        raise ModelLoadError(f"LoRA '{name}' holds no LoRA weights", name=name, supported=list(SUPPORTED_LAYOUTS))
    return LoraWeights(name=name, sha256=sha256, pairs=tuple(pairs), path=path)


def _check_factors(name: str, stem: str, up: Any, down: Any, alpha: Any) -> None:
    """A pair that can form a low-rank product at all: matrices (or conv kernels) of one rank, a single alpha.
    Said per key here, before any layer is touched, instead of a tensor error mid-sampling."""
    for role, tensor in (("up (lora_up/lora_B)", up), ("down (lora_down/lora_A)", down)):
        if tensor.ndim < 2:
            raise ModelLoadError(
                f"LoRA '{name}': key '{stem}' has a {role} weight of shape {tuple(tensor.shape)}; it must be a "
                "matrix", name=name, key=stem)
    if up.shape[1] != down.shape[0]:
        raise ModelLoadError(
            f"LoRA '{name}': key '{stem}' has an up weight of rank {up.shape[1]} {tuple(up.shape)} and a down "
            f"weight of rank {down.shape[0]} {tuple(down.shape)}; they must match", name=name, key=stem)
    if alpha is not None and alpha.numel() != 1:
        raise ModelLoadError(
            f"LoRA '{name}': key '{stem}' has an alpha of shape {tuple(alpha.shape)}; it must be one number",
            name=name, key=stem)


def _locate(stem: str, name: str) -> list[tuple[str, str, tuple[int, int] | None]]:
    """``(target, module, chunk)`` for one key stem; a fused MMDiT qkv gives three."""
    for prefix, target in _KOHYA_PREFIXES.items():
        if stem.startswith(prefix):
            rest = stem[len(prefix):]
            if target == "transformer":
                mmdit = _mmdit_modules(rest)
                if mmdit is not None:
                    return mmdit
            return [(target, "~" + rest, None)]
    for prefix, target in _DOTTED_PREFIXES.items():
        if stem.startswith(prefix):
            rest = stem[len(prefix):]
            if target == "transformer" and rest.startswith("diffusion_model."):
                rest = rest[len("diffusion_model."):]
            mmdit = _mmdit_modules(rest) if target == "transformer" else None
            return mmdit if mmdit is not None else [(target, rest, None)]
    if stem.startswith("diffusion_model."):
        mmdit = _mmdit_modules(stem[len("diffusion_model."):])
        if mmdit is not None:
            return mmdit
    # PEFT saves a transformer adapter without a prefix.
    return [("transformer", stem, None)]


def _mmdit_modules(path: str) -> list[tuple[str, str, tuple[int, int] | None]] | None:
    match = _MMDIT_BLOCK.match(path)
    if match is None:
        return None
    index, block, layer, kind = match.groups()
    modules = _MMDIT_TARGETS.get((block, layer, kind))
    if modules is None:
        return None
    count = len(modules)
    return [
        ("transformer", f"transformer_blocks.{index}.{module}", (i, count) if count > 1 else None)
        for i, module in enumerate(modules)
    ]


def _tensor_type() -> type:
    import torch

    return torch.Tensor


# --- text encoders -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PatchedClipHandle(ClipHandle):
    """A CLIP handle whose text encoders carry LoRA patches while (and only while) they encode."""

    patches: tuple[LoraPatch, ...] = ()

    def encoders(self) -> dict[str, Any]:
        return {"clip_l": self.text_encoder_l, "clip_g": self.text_encoder_g, "t5": self.text_encoder_t5}

    def encode(self, *args: Any, **kwargs: Any) -> Any:
        with contextlib.ExitStack() as stack:
            for patch in self.patches:
                for target, encoder in self.encoders().items():
                    if encoder is not None:
                        stack.enter_context(patch.applied(encoder, target))
            return super().encode(*args, **kwargs)


def clip_with_lora(clip: ClipHandle, lora: LoraWeights, strength: float) -> PatchedClipHandle:
    """``clip`` plus a LoRA on its text encoders (checked against them now, applied when encoding)."""
    import dataclasses

    encoders = {"clip_l": clip.text_encoder_l, "clip_g": clip.text_encoder_g, "t5": clip.text_encoder_t5}
    for target in CLIP_TARGETS:
        if target not in lora.targets():
            continue
        if encoders[target] is None:
            log.warning("LoRA '%s' has %s weights but no %s encoder is loaded; they are not used",
                        lora.name, target, target)
            continue
        lora.resolve(encoders[target], target)
    patch = LoraPatch.of(lora, strength, "clip")
    values = {f.name: getattr(clip, f.name) for f in dataclasses.fields(ClipHandle)}
    previous = clip.patches if isinstance(clip, PatchedClipHandle) else ()
    return PatchedClipHandle(**values, patches=previous + (patch,))
