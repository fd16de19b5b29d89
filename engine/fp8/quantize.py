"""Replace the linears of an SD3 transformer (or a text encoder) with :class:`Fp8Linear`.

What stays in BF16 by default, and why:

* the embedders (``pos_embed``, ``time_text_embed``, ``context_embedder``): they see raw latents,
  timesteps and text-encoder outputs whose ranges FP8 represents badly, and they are small;
* the final ``norm_out`` / ``proj_out``: their error lands directly in the predicted velocity;
* norms themselves (LayerNorm/RMSNorm are not linears and are never touched).

Weight scales: per output channel, except for the ``scaled_mm`` backend, where each layer gets one scale
per tensor when that costs it no accuracy (:func:`prefers_per_channel`): cuBLAS's tensor-wise FP8 GEMM was
2-3 % faster than the row-wise one for SD3.5 Large and Medium on an H200 (docs/PERFORMANCE.md), while a
layer whose output channels differ a lot in range keeps per-channel scales. The q/k/v projections of one
attention are decided together and share one per-tensor scale (as the original MMDiT's single ``qkv`` tensor
does), so that :mod:`engine.fp8.fused` can run them as one GEMM without requantizing.

The adaLN modulation linears inside the blocks (``norm1.linear``, ``norm1_context.linear``) *are*
quantized: they hold a third of SD3.5 Large's weights, and keeping them in BF16 would miss the
memory target (FP8 transformer <= 55 % of BF16). Pass ``keep_bf16=DEFAULT_KEEP_BF16 + ("*.norm1*",)``
to keep them too.
"""

from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass, field
from typing import Iterable, Mapping

import torch
from torch import nn

from engine.errors import Fp8Error
from engine.fp8.fused import qkv_triples
from engine.fp8.linear import Fp8Linear, check_backend_name, quantize_weight, scale_from_amax

DEFAULT_KEEP_BF16: tuple[str, ...] = ("pos_embed", "time_text_embed", "context_embedder", "norm_out", "proj_out")
# T5's feed-forward output (``wo``) is the layer transformers keeps in float32 for range reasons, and
# its forward casts the hidden states to ``wo.weight.dtype`` (FP8 would destroy them); CLIP's text
# projection is tiny and feeds the pooled embedding directly.
DEFAULT_TEXT_ENCODER_KEEP: tuple[str, ...] = ("*.wo", "text_projection")


@dataclass
class QuantizationReport:
    """What a quantization pass did: layer names, bytes of the module before and after."""

    backend: str
    quantized: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    bytes_before: int = 0
    bytes_after: int = 0
    static_scales: int = 0
    per_channel_layers: list[str] = field(default_factory=list)  # the others have one weight scale per tensor
    notes: list[str] = field(default_factory=list)

    @property
    def memory_ratio(self) -> float:
        return self.bytes_after / self.bytes_before if self.bytes_before else 1.0

    def summary(self) -> str:
        return (
            f"FP8 ({self.backend}): {len(self.quantized)} linears quantized, {len(self.kept)} kept in high "
            f"precision, {len(self.per_channel_layers)} with per-channel weight scales, "
            f"{self.static_scales} static activation scales; "
            f"{self.bytes_before / 2**20:.1f} MiB -> {self.bytes_after / 2**20:.1f} MiB "
            f"({100 * self.memory_ratio:.0f} %)"
        )

    def to_dict(self) -> dict:
        return asdict(self) | {"memory_ratio": self.memory_ratio}


def module_bytes(*modules: nn.Module) -> int:
    """Bytes held by the parameters and buffers of ``modules``, each storage counted once.

    Counted by storage, not by tensor: fused q/k/v projections (:mod:`engine.fp8.fused`) hold row slices
    of one fused weight, and tied weights are one tensor under two names.
    """
    seen: set[tuple] = set()
    total = 0
    for module in modules:
        for tensor in list(module.parameters()) + list(module.buffers()):
            storage = tensor.untyped_storage()
            # Meta tensors (and empty ones) have no address: count those tensor by tensor.
            key = (tensor.device, storage.data_ptr()) if storage.data_ptr() else ("tensor", id(tensor))
            if key in seen:
                continue
            seen.add(key)
            total += storage.nbytes() if storage.data_ptr() else tensor.numel() * tensor.element_size()
    return total


def matches_any(name: str, patterns: Iterable[str]) -> bool:
    """True when ``name`` is a pattern, lies under one (``pattern.``), or fnmatches one."""
    for pattern in patterns:
        if name == pattern or name.startswith(pattern + ".") or fnmatch.fnmatchcase(name, pattern):
            return True
    return False


def quantizable_linears(model: nn.Module, keep: Iterable[str]) -> tuple[list[str], list[str]]:
    """Names of the ``nn.Linear`` modules to quantize and of those kept, in module order."""
    keep = tuple(keep)
    selected, kept = [], []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            (kept if matches_any(name, keep) else selected).append(name)
    return selected, kept


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


# A layer keeps per-channel weight scales when one scale per tensor would raise the quantization error
# of its worst output channel by more than this factor. E4M3 is a float format, so a shared scale costs a
# channel precision only when its range lies far below the tensor's largest (values fall into subnormals):
# a channel 200x smaller than the rest loses 7-10 %, one 30x smaller nothing measurable.
PER_TENSOR_TOLERANCE = 1.05


def prefers_per_channel(weight: torch.Tensor, tolerance: float = PER_TENSOR_TOLERANCE) -> bool:
    """Whether ``weight`` [out, in] quantizes measurably better with one scale per output channel."""
    worst = {}
    reference = weight.detach().to(torch.float32)
    row_norms = reference.norm(dim=1).clamp_min(1e-30)
    for per_channel in (True, False):
        fp8, scale = quantize_weight(reference, per_channel=per_channel)
        restored = fp8.to(torch.float32) * (scale[:, None] if per_channel else scale)
        worst[per_channel] = float(((restored - reference).norm(dim=1) / row_norms).max())
    return worst[False] > tolerance * worst[True]


def shared_qkv_scales(
    model: nn.Module, names: Iterable[str], per_channel: bool | None
) -> dict[str, tuple[bool, torch.Tensor | None]]:
    """``name -> (per_channel, shared per-tensor scale or None)`` for the q/k/v layers among ``names``.

    The three projections of one attention are quantized alike, so that they fuse into one FP8 GEMM
    (:mod:`engine.fp8.fused`) without requantizing: per channel when ``per_channel`` says so, or when it is
    None and :func:`prefers_per_channel` says so for the three weights stacked or for any one of them; else
    one scale per tensor from the largest of the three weights' ranges.
    """
    decisions: dict[str, tuple[bool, torch.Tensor | None]] = {}
    for triple in qkv_triples(names):
        weights = [model.get_submodule(name).weight for name in triple]
        group_per_channel = per_channel
        if group_per_channel is None:
            group_per_channel = prefers_per_channel(torch.cat(weights)) or any(prefers_per_channel(w) for w in weights)
        shared = None
        if not group_per_channel:
            shared = scale_from_amax(torch.stack([w.detach().abs().amax().to(torch.float32) for w in weights]).amax())
        decisions.update({name: (group_per_channel, shared) for name in triple})
    return decisions


def _quantize_linears(
    model: nn.Module,
    *,
    backend: str,
    keep: Iterable[str],
    scales: Mapping[str, torch.Tensor] | None,
    per_channel: bool | None,
    compute_dtype: torch.dtype | None,
    share_qkv_scales: bool = False,
) -> QuantizationReport:
    check_backend_name(backend)
    report = QuantizationReport(backend=backend, bytes_before=module_bytes(model))
    selected, report.kept = quantizable_linears(model, keep)
    scales_given = bool(scales)
    scales = dict(scales or {})
    grouped = shared_qkv_scales(model, selected, per_channel) if share_qkv_scales else {}
    for name in selected:
        linear = model.get_submodule(name)
        input_scale = scales.pop(name, None)
        layer_per_channel, weight_scale = grouped.get(name, (per_channel, None))
        if layer_per_channel is None:
            layer_per_channel = backend != "scaled_mm" or prefers_per_channel(linear.weight)
        new = Fp8Linear.from_linear(
            linear, backend=backend, per_channel=layer_per_channel, input_scale=input_scale,
            compute_dtype=compute_dtype, weight_scale=weight_scale,
        )
        if layer_per_channel and backend != "transformer_engine":
            report.per_channel_layers.append(name)
        replace_module(model, name, new)
        report.quantized.append(name)
        report.static_scales += input_scale is not None
    if scales:
        shown = ", ".join(sorted(scales)[:5])
        report.notes.append(f"{len(scales)} activation scales name no quantized layer (e.g. {shown})")
    missing = len(selected) - report.static_scales
    if scales_given and missing:
        report.notes.append(f"{missing} quantized layers have no calibrated scale and use dynamic scaling")
    report.bytes_after = module_bytes(model)
    return report


def quantize_transformer(
    transformer: nn.Module,
    backend: str = "weight_only",
    scales: Mapping[str, torch.Tensor] | None = None,
    per_channel: bool | None = None,
    keep_bf16: Iterable[str] = DEFAULT_KEEP_BF16,
    compute_dtype: torch.dtype | None = None,
) -> QuantizationReport:
    """Quantize the linears of an ``SD3Transformer2DModel`` in place.

    ``scales`` maps layer names (``transformer_blocks.0.attn.to_q``) to calibrated input scales
    (from :func:`engine.fp8.calibrate` or a sidecar); layers without one scale dynamically.
    ``per_channel``: weight scales per output channel (True), per tensor (False), or None: per channel,
    except per tensor for ``scaled_mm`` layers that lose nothing by it (see the module docstring). For
    ``scaled_mm`` the q/k/v projections of each attention share one decision, and a per-tensor scale
    (:func:`shared_qkv_scales`), so that they fuse into one GEMM exactly.
    ``keep_bf16`` lists module names / fnmatch patterns left in high precision.
    """
    return _quantize_linears(
        transformer,
        backend=backend,
        keep=keep_bf16,
        scales=scales,
        per_channel=per_channel,
        compute_dtype=compute_dtype,
        share_qkv_scales=backend == "scaled_mm",
    )


def quantize_text_encoder(
    encoder: nn.Module,
    backend: str = "weight_only",
    per_channel: bool = True,
    keep: Iterable[str] = DEFAULT_TEXT_ENCODER_KEEP,
    compute_dtype: torch.dtype | None = None,
) -> QuantizationReport:
    """Quantize the linears of a T5 / CLIP text encoder in place (T5-XXL saves the most memory).

    Text encoders run once per prompt on a few hundred tokens, so ``weight_only`` (storage saving,
    BF16 compute) is the sensible backend; embeddings are not linears and stay as they are.
    """
    return _quantize_linears(
        encoder, backend=backend, keep=keep, scales=None, per_channel=per_channel, compute_dtype=compute_dtype
    )


def fp8_layers(model: nn.Module) -> dict[str, Fp8Linear]:
    """Every :class:`Fp8Linear` of ``model`` by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, Fp8Linear)}


def apply_activation_scales(model: nn.Module, scales: Mapping[str, torch.Tensor]) -> int:
    """Set static input scales on the FP8 layers named in ``scales``; returns how many were set.

    A scale naming no FP8 layer of ``model`` is an error (the sidecar belongs to another layout).
    """
    layers = fp8_layers(model)
    unknown = sorted(set(scales) - set(layers))
    if unknown:
        raise Fp8Error(
            f"{len(unknown)} activation scales name no FP8 layer of this model, e.g. {', '.join(unknown[:5])}",
            unknown=unknown[:20],
        )
    for name, scale in scales.items():
        layers[name].set_input_scale(scale)
    return len(scales)


def clear_activation_scales(model: nn.Module) -> int:
    """Back to dynamic activation scaling on every FP8 layer; returns how many layers."""
    layers = fp8_layers(model)
    for layer in layers.values():
        layer.set_input_scale(None)
    return len(layers)


def set_backend(model: nn.Module, backend: str) -> int:
    """Switch every FP8 layer between ``scaled_mm`` and ``weight_only``; returns how many layers."""
    layers = fp8_layers(model)
    for layer in layers.values():
        layer.set_backend(backend)
    return len(layers)
