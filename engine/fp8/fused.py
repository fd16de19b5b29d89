"""Fused q/k/v projections for the ``scaled_mm`` FP8 backend: one GEMM instead of three.

Every SD3 attention projects the same normalised input three times (``to_q``, ``to_k``, ``to_v``; the text
stream likewise with ``add_q_proj``/``add_k_proj``/``add_v_proj``), and with FP8 each projection also
quantizes that input on its own. :func:`fuse_qkv_projections` gives each such triple one :class:`FusedQkv`
layer: one activation quantization and one ``[3N, K]`` E4M3 GEMM whose output is split into q, k and v.
diffusers' own ``fuse_qkv_projections`` does not fit: it builds float layers, and its fused processor skips
SD3.5's QK norms. :class:`FusedJointAttnProcessor` is diffusers' ``JointAttnProcessor2_0`` line for line,
except for where q/k/v come from; the QK norms apply to the split outputs exactly as there.

No extra weight memory, and nothing outside the attention sees the fusion:

* ``FusedQkv`` owns one ``[3N, K]`` weight, the bias and (per channel) the scales; ``to_q``/``to_k``/``to_v``
  stay :class:`Fp8Linear` modules whose tensors are row slices (views) of those. The fused layer's own
  tensors are non-persistent buffers, so the state dict keeps its keys and bytes, and fp8_scaled files,
  calibration sidecars, LoRA key matching and the model cache keep working by layer name.
* LoRA branches stay on the three layers (:mod:`engine.lora`); the fused layer adds each layer's branches to
  that layer's slice of its output.
* The fused GEMM runs only while it stands for the three layers: they are still the attention's
  projections, all on ``scaled_mm``, none with forward hooks (calibration records inputs through hooks).
  Otherwise the processor calls the three layers as diffusers does, so a backend switch, a replaced layer or
  a hook never meets stale or bypassed weights.

Weight scales: the fused GEMM takes one scale per tensor or one per output row. If any of the three layers
scales per channel, they fuse exactly: each layer's scale, expanded to its rows, becomes the fused per-row
scale. Three per-tensor layers need one common scale. :func:`engine.fp8.quantize.quantize_transformer`
already quantizes each q/k/v triple with one scale for ``scaled_mm`` (the original MMDiT stores it as one
``qkv`` tensor, and so do ComfyUI's fp8_scaled files), so fusing changes no byte. Layers whose per-tensor
scales differ (an FP8 file quantized layer by layer) are requantized to the largest of the three scales:
the only lossy case, where the smaller-scaled layers round to a coarser grid (E4M3 keeps its relative
precision except for values pushed into its subnormal range; ``tests/test_fp8_fused.py`` measures it) and
their state dict entries change with them.

Activation scales: the three layers see one input, so calibration gives them one scale. The fused GEMM uses
the largest of the three static scales, read at every call so that scales applied after fusion count, or a
per-call (dynamic) scale when any of the three has none.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Iterable, Sequence

import torch
from torch import nn
import torch.nn.functional as F

from engine.errors import Fp8Error
from engine.fp8.linear import Fp8Linear, quantize_weight, scaled_mm_linear

log = logging.getLogger(__name__)

# (attribute of the fused layer on the attention module, the projections whose GEMMs it runs as one)
QKV_PROJECTIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("fused_qkv", ("to_q", "to_k", "to_v")),
    ("fused_added_qkv", ("add_q_proj", "add_k_proj", "add_v_proj")),
)
FUSED_BACKEND = "scaled_mm"


def qkv_triples(names: Iterable[str]) -> list[tuple[str, ...]]:
    """The q/k/v triples among the qualified layer ``names`` (all three present), in order of appearance."""
    names = list(names)
    present = set(names)
    triples = []
    for name in names:
        parent, _, leaf = name.rpartition(".")
        for _, projections in QKV_PROJECTIONS:
            if leaf == projections[0]:
                triple = tuple(f"{parent}.{p}" if parent else p for p in projections)
                if all(member in present for member in triple):
                    triples.append(triple)
    return triples


def fusion_problem(layers: Sequence[Any]) -> str:
    """Why ``layers`` cannot share one fused GEMM, or ``""`` when they can."""
    if not all(isinstance(layer, Fp8Linear) for layer in layers):
        return "not all of them are FP8 layers"
    if any(layer.backend != FUSED_BACKEND for layer in layers):
        return f"not all of them run {FUSED_BACKEND}"
    for what, values in (
        ("input widths", {layer.in_features for layer in layers}),
        ("compute dtypes", {layer.compute_dtype for layer in layers}),
        ("devices", {layer.weight.device for layer in layers}),
    ):
        if len(values) > 1:
            return f"their {what} differ"
    if len({layer.bias is None for layer in layers}) > 1:
        return "some have a bias and some do not"
    return ""


class FusedQkv(nn.Module):
    """One FP8 GEMM standing for several :class:`Fp8Linear` layers that read the same input.

    Build it from the layers (``FusedQkv([to_q, to_k, to_v])``): it takes over their weights, and the layers
    keep working on row slices of its tensors (see the module docstring). ``forward(x)`` returns one output
    per layer, each with that layer's LoRA branches added. ``requantized`` counts the layers whose weights
    had to be requantized to a common scale (0 whenever they already shared one).
    """

    def __init__(self, layers: Sequence[Fp8Linear]) -> None:
        super().__init__()
        problem = fusion_problem(layers)
        if problem:
            raise Fp8Error(f"cannot fuse these projections into one FP8 GEMM: {problem}", problem=problem)
        # A plain tuple, not submodules: the layers keep their one name and add no state dict keys here.
        self.parts: tuple[Fp8Linear, ...] = tuple(layers)
        self.sizes = tuple(layer.out_features for layer in layers)
        self.in_features = layers[0].in_features
        self.out_features = sum(self.sizes)
        weight, weight_scale, self.requantized = _fused_weight(self.parts)
        bias = None if layers[0].bias is None else torch.cat([layer.bias.detach() for layer in layers])
        # Non-persistent: the state dict holds these bytes once, under the layers' own names.
        self.register_buffer("weight", weight, persistent=False)
        self.register_buffer("weight_scale", weight_scale, persistent=False)
        self.register_buffer("bias", bias, persistent=False)
        self._share_storage()

    def _share_storage(self) -> None:
        """Point each layer's weight, bias and (shared or per-channel) scale at its rows of the fused tensors."""
        start = 0
        for layer, size in zip(self.parts, self.sizes):
            rows = slice(start, start + size)
            layer.weight = self.weight[rows]
            if self.bias is not None:
                layer.bias = nn.Parameter(self.bias[rows], requires_grad=False)
            if self.weight_scale.dim() == 0:
                layer.weight_scale = self.weight_scale.view(())
            elif layer.per_channel:
                layer.weight_scale = self.weight_scale[rows]
            # A per-tensor layer fused with per-channel ones keeps its own scalar: its row scales here are copies.
            start += size

    def _apply(self, fn, recurse=True):  # noqa: ANN001 - nn.Module signature
        # Module._apply moves every tensor on its own: the layers (earlier children of the attention) got
        # copies of their slices. Keep the FP8/float32 dtypes as Fp8Linear does, then share storage again.
        kept = {name: self._buffers[name].dtype for name in ("weight", "weight_scale")}
        super()._apply(fn, recurse)
        for name, dtype in kept.items():
            if self._buffers[name].dtype != dtype:
                self._buffers[name] = self._buffers[name].to(dtype)
        self._share_storage()
        return self

    def input_scale(self) -> torch.Tensor | None:
        """The largest of the layers' static activation scales, or None (dynamic) when one has none."""
        scales = [layer.input_scale for layer in self.parts]
        if any(scale is None for scale in scales):
            return None
        return functools.reduce(torch.maximum, scales)

    def serves(self, *layers: nn.Module) -> bool:
        """Whether the fused GEMM may compute for ``layers`` now (the three checks of the module docstring)."""
        return (
            len(layers) == len(self.parts)
            and all(layer is part for layer, part in zip(layers, self.parts))
            and all(
                part.backend == FUSED_BACKEND and not part._forward_pre_hooks and not part._forward_hooks
                for part in self.parts
            )
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        compute_dtype = self.parts[0].compute_dtype
        y = scaled_mm_linear(x, self.weight, self.weight_scale, self.bias, self.input_scale(), compute_dtype)
        # Each layer's LoRA branches go on its own slice of the fused output, as its own forward adds them
        outputs = y.split(self.sizes, dim=-1)
        return tuple(layer.add_low_rank_branches(x, out) for layer, out in zip(self.parts, outputs))

    def extra_repr(self) -> str:
        scaling = "per_channel" if self.weight_scale.dim() else "per_tensor"
        return (
            f"in_features={self.in_features}, out_features={'+'.join(map(str, self.sizes))}, "
            f"bias={self.bias is not None}, weight={scaling}"
        )


def _fused_weight(layers: Sequence[Fp8Linear]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(weight [sum out, in], scale, layers requantized)`` for :class:`FusedQkv`."""
    if any(layer.per_channel for layer in layers):
        # Exact: each layer's scale, repeated for each of its rows, is the fused per-row scale.
        scale = torch.cat([
            layer.weight_scale if layer.per_channel else layer.weight_scale.expand(layer.out_features)
            for layer in layers
        ]).to(torch.float32)
        return torch.cat([layer.weight for layer in layers]), scale, 0
    common = functools.reduce(torch.maximum, [layer.weight_scale for layer in layers]).to(torch.float32)
    chunks, requantized = [], 0
    for layer in layers:
        if torch.equal(layer.weight_scale, common):
            chunks.append(layer.weight)
        else:
            real = layer.dequantized_weight(torch.float32)
            chunks.append(quantize_weight(real, per_channel=False, scale=common)[0])
            requantized += 1
    return torch.cat(chunks), common.clone(), requantized


class FusedJointAttnProcessor:
    """diffusers' ``JointAttnProcessor2_0`` (SD3's joint attention) with q/k/v from fused FP8 GEMMs.

    The attention's ``fused_qkv`` / ``fused_added_qkv`` (:class:`FusedQkv`) compute q, k and v when they
    stand for the projections (:meth:`FusedQkv.serves`); otherwise the projections run one by one. The rest,
    QK norms included, is diffusers' code. ``unfused`` is the processor it replaced, which
    :func:`unfuse_qkv_projections` puts back.
    """

    def __init__(self, unfused: Any) -> None:
        self.unfused = unfused

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.FloatTensor,
        encoder_hidden_states: torch.FloatTensor = None,
        attention_mask: torch.FloatTensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.FloatTensor:
        residual = hidden_states

        batch_size = hidden_states.shape[0]

        # `sample` projections.
        query, key, value = _project(attn, 0, hidden_states)

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads

        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        # `context` projections.
        if encoder_hidden_states is not None:
            (
                encoder_hidden_states_query_proj,
                encoder_hidden_states_key_proj,
                encoder_hidden_states_value_proj,
            ) = _project(attn, 1, encoder_hidden_states)

            encoder_hidden_states_query_proj = encoder_hidden_states_query_proj.view(
                batch_size, -1, attn.heads, head_dim
            ).transpose(1, 2)
            encoder_hidden_states_key_proj = encoder_hidden_states_key_proj.view(
                batch_size, -1, attn.heads, head_dim
            ).transpose(1, 2)
            encoder_hidden_states_value_proj = encoder_hidden_states_value_proj.view(
                batch_size, -1, attn.heads, head_dim
            ).transpose(1, 2)

            if attn.norm_added_q is not None:
                encoder_hidden_states_query_proj = attn.norm_added_q(encoder_hidden_states_query_proj)
            if attn.norm_added_k is not None:
                encoder_hidden_states_key_proj = attn.norm_added_k(encoder_hidden_states_key_proj)

            query = torch.cat([query, encoder_hidden_states_query_proj], dim=2)
            key = torch.cat([key, encoder_hidden_states_key_proj], dim=2)
            value = torch.cat([value, encoder_hidden_states_value_proj], dim=2)

        hidden_states = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        if encoder_hidden_states is not None:
            # Split the attention outputs.
            hidden_states, encoder_hidden_states = (
                hidden_states[:, : residual.shape[1]],
                hidden_states[:, residual.shape[1] :],
            )
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)

        # linear proj
        hidden_states = attn.to_out[0](hidden_states)
        # dropout
        hidden_states = attn.to_out[1](hidden_states)

        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        else:
            return hidden_states


def _project(attn: nn.Module, group: int, states: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """q, k, v of ``states`` through projection group ``group`` of :data:`QKV_PROJECTIONS`."""
    fused_name, names = QKV_PROJECTIONS[group]
    layers = [getattr(attn, name) for name in names]
    fused = getattr(attn, fused_name, None)
    if fused is not None and fused.serves(*layers):
        return fused(states)
    return tuple(layer(states) for layer in layers)


def fuse_qkv_projections(model: nn.Module) -> int:
    """Fuse the q/k/v projections of every SD3 joint attention in ``model``; returns how many triples.

    A triple fuses when its three layers are :class:`Fp8Linear` on ``scaled_mm`` (others stay as they are).
    Only attentions running diffusers' ``JointAttnProcessor2_0`` are touched: another processor (IP-Adapter,
    PAG, a user's) is not what :class:`FusedJointAttnProcessor` reproduces. Fusing again fuses nothing more.
    """
    from diffusers.models.attention_processor import JointAttnProcessor2_0  # noqa: PLC0415

    fused = requantized = 0
    for name, module in list(model.named_modules()):
        processor = getattr(module, "processor", None)
        if type(processor) is not JointAttnProcessor2_0:
            continue
        layers = {}
        for attr, projections in QKV_PROJECTIONS:
            triple = [getattr(module, projection, None) for projection in projections]
            problem = fusion_problem(triple)
            if problem:
                log.debug("%s: %s not fused: %s", name, "/".join(projections), problem)
                continue
            layers[attr] = FusedQkv(triple)
        if not layers:
            continue
        for attr, layer in layers.items():
            # Registered after the projections, so Module._apply moves it after them (see FusedQkv._apply).
            module.add_module(attr, layer)
            requantized += layer.requantized
        module.set_processor(FusedJointAttnProcessor(processor))
        fused += len(layers)
    if requantized:
        log.warning(
            "%d q/k/v projections had per-tensor weight scales that differ from their siblings' and were "
            "requantized to a common scale to share one FP8 GEMM", requantized,
        )
    return fused


def unfuse_qkv_projections(model: nn.Module) -> int:
    """Undo :func:`fuse_qkv_projections`: the projections run one by one again; returns how many triples.

    The layers keep their tensors (the row slices): no weight is copied or changed back.
    """
    count = 0
    for module in model.modules():
        processor = getattr(module, "processor", None)
        if not isinstance(processor, FusedJointAttnProcessor):
            continue
        for attr, _ in QKV_PROJECTIONS:
            if attr in module._modules:
                del module._modules[attr]
                count += 1
        module.set_processor(processor.unfused)
    return count


def fused_qkv_layers(model: nn.Module) -> dict[str, FusedQkv]:
    """Every :class:`FusedQkv` of ``model`` by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, FusedQkv)}
