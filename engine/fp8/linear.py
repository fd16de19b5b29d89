"""``Fp8Linear``: an ``nn.Linear`` replacement holding E4M3 weights.

Scale convention (ComfyUI's and Transformer Engine's): ``real = fp8 * scale``, so
``scale = amax / 448``. The weight scale is one value per tensor or one per output channel; the
activation (input) scale is either computed from each call's input (dynamic) or fixed from
calibration (static, stored in the ``input_scale`` buffer).

Backends (one attribute, switchable on a built layer between the two that share storage):

* ``scaled_mm`` - real FP8 GEMMs through ``torch._scaled_mm``; the input is quantized on the fly and
  the token rows are padded to a multiple of 16 as the FP8 kernels require.
* ``weight_only`` - FP8 storage, the matmul runs in the compute dtype (CPUs, GPUs without FP8 units).
* ``transformer_engine`` - a ``transformer_engine.pytorch.Linear`` child run under ``fp8_autocast``
  with a delayed-scaling recipe; it keeps its own scales (calibrated through TE's calibrating mode).

The FP8 tensors are buffers, not parameters, and keep their dtype through ``module.to(dtype)``:
moving a quantized model to BF16 must never silently upcast its weights.

``low_rank_branches`` carries LoRAs for the length of one run (see :mod:`engine.lora`): each
``(down, up)`` pair adds ``(x @ down.T) @ up.T`` to the output in the compute dtype, so the FP8
weight itself is never rewritten. It is a plain attribute rather than a forward hook because
``torch.compile`` (``settings.compile``) ignores hooks added after compilation but guards on
attributes the forward reads; an empty tuple leaves the output bit for bit what it was.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

import torch
from torch import nn
import torch.nn.functional as F

from engine.errors import Fp8Error

FP8_DTYPE = torch.float8_e4m3fn
E4M3_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448
# Smallest scale we accept: an all-zero tensor would otherwise divide by zero.
MIN_SCALE = 1e-12
# FP8 GEMM kernels want every matrix dimension a multiple of 16.
GEMM_ROW_MULTIPLE = 16

BACKENDS = ("scaled_mm", "transformer_engine", "weight_only")
_SHARED_STORAGE_BACKENDS = ("scaled_mm", "weight_only")


def check_backend_name(backend: str) -> str:
    """Return ``backend`` if it names an FP8 backend, else raise :class:`Fp8Error` listing them."""
    if backend not in BACKENDS:
        raise Fp8Error(
            f"unknown FP8 backend '{backend}'; supported: {', '.join(BACKENDS)}",
            backend=backend,
            supported=list(BACKENDS),
        )
    return backend


def scale_from_amax(amax: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    """``amax * margin / 448`` as float32, never below :data:`MIN_SCALE`."""
    return (amax.to(torch.float32) * margin / E4M3_MAX).clamp(min=MIN_SCALE)


def quantize_weight(
    weight: torch.Tensor, per_channel: bool = True, scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a ``[out, in]`` weight to E4M3.

    Returns ``(fp8_weight, scale)``; ``scale`` is float32, shape ``[out]`` per channel or ``[]`` per
    tensor. Computed in float32 one layer at a time, so the transient copy is one layer's size.
    ``scale`` imposes a per-tensor scale instead of the weight's own (one shared by several layers,
    which must then cover this weight's range: values beyond it saturate).
    """
    w = weight.detach().to(torch.float32)
    if scale is not None:
        if per_channel:
            raise Fp8Error("a given weight scale is one per tensor; per_channel must be False", per_channel=True)
        scale = scale.detach().to(w.device, torch.float32).reshape(()).clamp(min=MIN_SCALE)
    else:
        amax = w.abs().amax(dim=1) if per_channel else w.abs().amax()
        scale = scale_from_amax(amax)
    divisor = scale[:, None] if per_channel else scale
    fp8 = (w / divisor).clamp(-E4M3_MAX, E4M3_MAX).to(FP8_DTYPE)
    return fp8, scale


def quantize_activation(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x / scale`` saturated to the E4M3 range (a plain cast would turn overflow into NaN on CUDA)."""
    return (x / scale.to(x.dtype)).clamp(-E4M3_MAX, E4M3_MAX).to(FP8_DTYPE)


def scaled_mm_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    input_scale: torch.Tensor | None,
    compute_dtype: torch.dtype,
) -> torch.Tensor:
    """``x @ (weight * weight_scale).T + bias`` as one FP8 GEMM (``torch._scaled_mm``), in ``compute_dtype``.

    ``x`` is ``[..., in]``; ``weight`` ``[out, in]`` E4M3 with a per-tensor (``[]``) or per-output-channel
    (``[out]``) scale. ``input_scale`` is the static activation scale, or None to take one from this call's
    input. A function rather than a method because an :class:`Fp8Linear` and a fused q/k/v projection
    (:mod:`engine.fp8.fused`) run the same GEMM on their own tensors.
    """
    out_features, in_features = weight.shape
    per_channel = weight_scale.dim() == 1
    lead_shape = x.shape[:-1]
    x2 = x.reshape(-1, in_features).to(compute_dtype)
    rows = x2.shape[0]
    scale_in = input_scale if input_scale is not None else scale_from_amax(x2.abs().amax())
    padding = (-rows) % GEMM_ROW_MULTIPLE
    if padding:
        x2 = F.pad(x2, (0, 0, 0, padding))
    xq = quantize_activation(x2, scale_in)
    out_dtype = torch.bfloat16 if per_channel else compute_dtype
    fuse_bias = bias is not None and bias.dtype == out_dtype == torch.bfloat16
    if per_channel and rowwise_scaling_supported(x2.device):
        y = torch._scaled_mm(
            xq,
            weight.t(),
            scale_a=scale_in.reshape(1, 1).expand(xq.shape[0], 1).contiguous(),
            scale_b=weight_scale.reshape(1, -1),
            bias=bias if fuse_bias else None,
            out_dtype=out_dtype,
        )
    elif per_channel:
        # Row-wise scaled GEMMs need sm90+: run per-tensor and scale the output columns instead.
        one = torch.ones((), dtype=torch.float32, device=xq.device)
        y = torch._scaled_mm(xq, weight.t(), scale_a=scale_in, scale_b=one, out_dtype=out_dtype)
        y = y * weight_scale.to(out_dtype)
        fuse_bias = False
    else:
        y = torch._scaled_mm(
            xq,
            weight.t(),
            scale_a=scale_in,
            scale_b=weight_scale,
            bias=bias if fuse_bias else None,
            out_dtype=out_dtype,
        )
    if padding:
        y = y[:rows]
    y = y.to(compute_dtype)
    if bias is not None and not fuse_bias:
        y = y + bias
    return y.reshape(*lead_shape, out_features)


def rowwise_scaling_supported(device: torch.device) -> bool:
    """Whether ``torch._scaled_mm`` takes per-row/per-column scales on ``device`` (CPUs, CUDA sm90+)."""
    if device.type != "cuda":
        return True
    return torch.cuda.get_device_capability(device) >= (9, 0)


def import_transformer_engine() -> Any:
    """``transformer_engine.pytorch``, or :class:`Fp8Error` saying how to get it."""
    try:
        import transformer_engine.pytorch as te_pytorch  # noqa: PLC0415 - optional GPU extra
    except Exception as exc:  # ImportError, or a broken CUDA build raising at import
        raise Fp8Error(
            "the transformer_engine FP8 backend needs NVIDIA Transformer Engine "
            f"(pip install transformer_engine[pytorch] on a CUDA machine); import failed: {exc}",
            backend="transformer_engine",
        ) from exc
    return te_pytorch


def transformer_engine_recipe() -> Any:
    """The inference recipe: E4M3 forward, delayed scaling over a short amax history."""
    from transformer_engine.common.recipe import DelayedScaling, Format  # noqa: PLC0415

    return DelayedScaling(fp8_format=Format.E4M3, amax_history_len=16, amax_compute_algo="max")


class Fp8Linear(nn.Module):
    """A linear layer with E4M3 weights, BF16 (compute dtype) bias and output.

    Build one with :meth:`from_linear` (quantize a float layer) or :meth:`from_fp8` (weights already
    in FP8, e.g. from an fp8_scaled checkpoint). State dict keys follow ComfyUI's newer layout:
    ``weight`` (float8_e4m3fn), ``weight_scale``, ``input_scale`` (only when static), ``bias``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        weight: torch.Tensor | None,
        weight_scale: torch.Tensor | None,
        bias: torch.Tensor | None,
        input_scale: torch.Tensor | None = None,
        backend: str = "weight_only",
        compute_dtype: torch.dtype = torch.bfloat16,
        te_linear: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.backend = check_backend_name(backend)
        self.compute_dtype = compute_dtype
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale", weight_scale)
        self.register_buffer("input_scale", input_scale)
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(compute_dtype), requires_grad=False)
        self.te_linear = te_linear
        # Set by calibration: TE layers then record amax in high precision instead of running FP8.
        self.te_calibrating = False
        # (down [rank, in], up [out, rank]) pairs in the compute dtype, set and cleared by engine.lora.
        self.low_rank_branches: tuple[tuple[torch.Tensor, torch.Tensor], ...] = ()

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        backend: str = "weight_only",
        per_channel: bool = True,
        input_scale: torch.Tensor | None = None,
        compute_dtype: torch.dtype | None = None,
        weight_scale: torch.Tensor | None = None,
    ) -> "Fp8Linear":
        """Quantize a float ``nn.Linear`` (its weight is not kept).

        ``weight_scale``: a per-tensor scale to quantize with instead of the weight's own (see
        :func:`quantize_weight`); q/k/v projections share one so that they fuse without requantizing.
        """
        check_backend_name(backend)
        dtype = compute_dtype or (linear.weight.dtype if linear.weight.dtype.is_floating_point else torch.bfloat16)
        if backend == "transformer_engine":
            return cls._from_weight_te(linear.weight.detach(), linear.bias, dtype)
        fp8, scale = quantize_weight(linear.weight, per_channel=per_channel, scale=weight_scale)
        return cls(
            linear.in_features,
            linear.out_features,
            weight=fp8,
            weight_scale=scale,
            bias=None if linear.bias is None else linear.bias.detach(),
            input_scale=None if input_scale is None else input_scale.detach().to(fp8.device, torch.float32).reshape(()),
            backend=backend,
            compute_dtype=dtype,
        )

    @classmethod
    def from_fp8(
        cls,
        weight: torch.Tensor,
        weight_scale: torch.Tensor,
        bias: torch.Tensor | None = None,
        input_scale: torch.Tensor | None = None,
        *,
        backend: str = "weight_only",
        compute_dtype: torch.dtype = torch.bfloat16,
    ) -> "Fp8Linear":
        """Wrap an E4M3 weight as is (no float copy is made)."""
        check_backend_name(backend)
        if weight.dtype != FP8_DTYPE:
            raise Fp8Error(f"expected a float8_e4m3fn weight, got {weight.dtype}", dtype=str(weight.dtype))
        out_features, in_features = weight.shape
        scale = weight_scale.detach().to(torch.float32)
        if scale.numel() == 1:
            scale = scale.reshape(())
        elif scale.numel() == out_features:
            scale = scale.reshape(out_features)
        else:
            raise Fp8Error(
                f"weight scale of shape {tuple(weight_scale.shape)} fits neither per-tensor nor "
                f"per-output-channel ({out_features}) scaling",
                shape=list(weight_scale.shape),
            )
        if backend == "transformer_engine":
            dequantized = weight.to(compute_dtype) * (scale[:, None] if scale.dim() else scale).to(compute_dtype)
            return cls._from_weight_te(dequantized, bias, compute_dtype)
        return cls(
            in_features,
            out_features,
            weight=weight,
            weight_scale=scale,
            bias=bias,
            input_scale=None if input_scale is None else input_scale.detach().to(weight.device, torch.float32).reshape(()),
            backend=backend,
            compute_dtype=compute_dtype,
        )

    @classmethod
    def _from_weight_te(cls, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> "Fp8Linear":
        te = import_transformer_engine()
        if not torch.cuda.is_available():
            raise Fp8Error("the transformer_engine FP8 backend needs a CUDA GPU", backend="transformer_engine")
        out_features, in_features = weight.shape
        # FP8 parameters (no BF16 master copy) where this TE version offers it.
        model_init = getattr(te, "fp8_model_init", None) or getattr(te, "quantized_model_init", None)
        with model_init(enabled=True) if model_init else contextlib.nullcontext():
            te_linear = te.Linear(in_features, out_features, bias=bias is not None, params_dtype=dtype, device="cuda")
        with torch.no_grad():
            te_linear.weight.copy_(weight.to("cuda", dtype))
            if bias is not None:
                te_linear.bias.copy_(bias.detach().to("cuda", dtype))
        return cls(
            in_features,
            out_features,
            weight=None,
            weight_scale=None,
            bias=None,
            backend="transformer_engine",
            compute_dtype=dtype,
            te_linear=te_linear,
        )

    # ----------------------------------------------------------------- properties
    @property
    def per_channel(self) -> bool:
        return self.weight_scale is not None and self.weight_scale.dim() == 1

    @property
    def activation_scaling(self) -> str:
        """``"static"`` when a calibrated input scale is set, else ``"dynamic"``."""
        return "static" if self.input_scale is not None else "dynamic"

    def set_input_scale(self, scale: torch.Tensor | float | None) -> None:
        """Fix the activation scale (static), or ``None`` to go back to per-call (dynamic) scales."""
        if scale is None:
            self.input_scale = None
            return
        value = torch.as_tensor(scale, dtype=torch.float32).reshape(())
        device = self.weight.device if self.weight is not None else value.device
        self.input_scale = value.to(device)

    def set_backend(self, backend: str) -> None:
        """Switch between ``scaled_mm`` and ``weight_only`` (same FP8 storage)."""
        check_backend_name(backend)
        if backend not in _SHARED_STORAGE_BACKENDS or self.backend not in _SHARED_STORAGE_BACKENDS:
            raise Fp8Error(
                f"cannot switch an FP8 layer from {self.backend} to {backend} in place; "
                f"in-place switches work between {', '.join(_SHARED_STORAGE_BACKENDS)} only",
                backend=backend,
            )
        self.backend = backend

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight in ``dtype`` (a full float copy: for checks and export, not for inference)."""
        if self.weight is None:
            raise Fp8Error("a transformer_engine layer keeps its weight inside TE", backend=self.backend)
        scale = self.weight_scale[:, None] if self.per_channel else self.weight_scale
        return (self.weight.to(torch.float32) * scale).to(dtype or self.compute_dtype)

    def extra_repr(self) -> str:
        scaling = "per_channel" if self.per_channel else "per_tensor"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"backend={self.backend}, weight={scaling}, activation={self.activation_scaling}, "
            f"compute_dtype={self.compute_dtype}"
        )

    def comfy_quant_config(self) -> dict[str, Any]:
        """The per-layer ``comfy_quant`` entry written next to the weight in fp8_scaled files."""
        return {"format": "float8_e4m3fn"}

    def comfy_quant_tensor(self) -> torch.Tensor:
        return torch.tensor(list(json.dumps(self.comfy_quant_config()).encode("utf-8")), dtype=torch.uint8)

    # ----------------------------------------------------------------- dtype safety
    def _apply(self, fn, recurse=True):  # noqa: ANN001 - nn.Module signature
        # Learn the target float dtype from a probe so the compute dtype follows model.to(dtype),
        # while FP8 weights and float32 scales keep their dtypes (only their device moves).
        probe = fn(torch.empty(0, dtype=self.compute_dtype, device=self._device()))
        kept = {name: t.dtype for name, t in self._buffers.items() if t is not None}
        super()._apply(fn, recurse)
        for name, dtype in kept.items():
            tensor = self._buffers[name]
            if tensor is not None and tensor.dtype != dtype:
                self._buffers[name] = tensor.to(dtype)
        if probe.dtype.is_floating_point and probe.dtype.itemsize >= 2:
            self.compute_dtype = probe.dtype
        return self

    def _device(self) -> torch.device:
        for tensor in (self.weight, self.bias):
            if tensor is not None:
                return tensor.device
        return torch.device("cpu")

    # ----------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "weight_only":
            y = self._forward_weight_only(x)
        elif self.backend == "scaled_mm":
            y = self._forward_scaled_mm(x)
        else:
            y = self._forward_transformer_engine(x)
        return self.add_low_rank_branches(x, y)

    def add_low_rank_branches(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``y``, this layer's output for ``x``, with its LoRA branches added (:attr:`low_rank_branches`);
        also used by :class:`engine.fp8.fused.FusedQkv`, which computes ``y`` for three layers at once."""
        for down, up in self.low_rank_branches:
            y = y + F.linear(F.linear(x.to(down.dtype), down), up)
        return y

    def _forward_weight_only(self, x: torch.Tensor) -> torch.Tensor:
        # x @ (q * s)^T == (x @ q^T) * s for per-row s: scale the output, never build a scaled weight.
        x = x.to(self.compute_dtype)
        y = F.linear(x, self.weight.to(self.compute_dtype))
        y = y * self.weight_scale.to(self.compute_dtype)
        if self.bias is not None:
            y = y + self.bias
        return y

    def _forward_scaled_mm(self, x: torch.Tensor) -> torch.Tensor:
        return scaled_mm_linear(x, self.weight, self.weight_scale, self.bias, self.input_scale, self.compute_dtype)

    def _forward_transformer_engine(self, x: torch.Tensor) -> torch.Tensor:
        te = import_transformer_engine()
        lead_shape = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(self.compute_dtype)
        rows = x2.shape[0]
        padding = (-rows) % GEMM_ROW_MULTIPLE
        if padding:
            x2 = F.pad(x2, (0, 0, 0, padding))
        if self.te_calibrating:
            context = te.fp8_autocast(enabled=False, calibrating=True, fp8_recipe=transformer_engine_recipe())
        else:
            context = te.fp8_autocast(enabled=True, fp8_recipe=transformer_engine_recipe())
        with context:
            y = self.te_linear(x2)
        if padding:
            y = y[:rows]
        return y.reshape(*lead_shape, self.out_features)
