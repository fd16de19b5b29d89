"""The precision policy: what the model cache does to every transformer it loads.

:class:`PrecisionPolicy` is the :class:`engine.models.cache.ModelCache` ``transformer_postprocess``
hook. It turns the settings (``precision``, ``fp8_backend``, ``compile``) and the UNETLoader's
``weight_dtype`` into one of:

* no FP8: the transformer stays in the cache's compute dtype (``"fp32"``, ``"bf16"``, ``"fp16"``);
* ``fp8_e4m3fn`` (storage): :func:`quantize_transformer` with the ``weight_only`` backend;
* FP8 compute (settings ``precision=fp8``, or ``fp8_e4m3fn_fast``): the backend
  :func:`choose_backend` finds for the device. Hardware without FP8 GEMMs gets ``weight_only`` and a
  logged warning saying why; the precision string then says ``weight_only``, never what was asked.
  With ``scaled_mm`` each attention's q/k/v projections then run as one FP8 GEMM
  (:func:`engine.fp8.fused.fuse_qkv_projections`; settings ``fp8_fuse_qkv``, on by default).

A transformer that already holds FP8 layers (a ComfyUI ``*_fp8_scaled`` file loaded as is) keeps its
FP8 weights; only its backend is set. Calibrated activation scales are applied from the sidecar of
the checkpoint (:func:`sidecar_location`) when one exists; one calibrated on another checkpoint is
refused with :class:`Fp8Error`.

The precision string, recorded with every generation, reads ``fp8_e4m3fn/<backend>[/<scaling>]``:
``fp8_e4m3fn/weight_only``, ``fp8_e4m3fn/scaled_mm/static`` (every FP8 layer has a calibrated input
scale), ``.../dynamic`` (none has), ``.../mixed``, ``fp8_e4m3fn/transformer_engine``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch
from torch import nn

from engine.errors import Fp8Error
from engine.fp8.backends import (
    BACKEND_CHOICES,
    FP8_MIN_CAPABILITY,
    BackendChoice,
    check_compile_mode,
    choose_backend,
    compile_blocks,
    fp8_compute_problem,
)
from engine.fp8.fused import fuse_qkv_projections
from engine.fp8.linear import Fp8Linear
from engine.fp8.quantize import (
    apply_activation_scales,
    fp8_layers,
    module_bytes,
    quantize_transformer,
    replace_module,
    set_backend,
)
from engine.fp8.sidecar import SIDECAR_SUFFIX, checkpoint_sha256, load_sidecar, sidecar_path_for

if TYPE_CHECKING:
    from engine.models.cache import LoadedTransformer
    from engine.settings import Settings

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "bf16", "fp16", "fp32", "fp8")
FP8_FORMAT = "fp8_e4m3fn"
# UNETLoader weight_dtype values and what they ask for: FP8 storage, or FP8 compute where possible.
WEIGHT_DTYPE_STORAGE = "fp8_e4m3fn"
WEIGHT_DTYPE_COMPUTE = "fp8_e4m3fn_fast"
SUPPORTED_WEIGHT_DTYPES = ("default", WEIGHT_DTYPE_STORAGE, WEIGHT_DTYPE_COMPUTE)
_COMPUTE_BACKENDS = ("scaled_mm", "transformer_engine")

BackendChooser = Callable[[str, "torch.device | str"], BackendChoice]


def check_precision_settings(precision: str, fp8_backend: str) -> None:
    """Raise :class:`Fp8Error` naming the supported values when either setting is unknown."""
    if precision not in PRECISIONS:
        raise Fp8Error(
            f"unknown precision {precision!r}; supported: {', '.join(PRECISIONS)}",
            precision=precision,
            supported=list(PRECISIONS),
        )
    if fp8_backend not in BACKEND_CHOICES:
        raise Fp8Error(
            f"unknown fp8_backend {fp8_backend!r}; supported: {', '.join(BACKEND_CHOICES)}",
            fp8_backend=fp8_backend,
            supported=list(BACKEND_CHOICES),
        )


def sidecar_location(name: str, path: str | Path | None, data_dir: str | Path) -> Path:
    """Where the calibrated scales of a checkpoint live.

    Beside the checkpoint file (or diffusers folder); the built-in demo has no file, so its sidecar
    lives under ``<data_dir>/fp8/``.
    """
    if path is not None:
        return sidecar_path_for(path)
    return Path(data_dir) / "fp8" / f"{name}{SIDECAR_SUFFIX}"


def activation_scaling(model: nn.Module) -> str:
    """``"static"`` when every FP8 layer has a calibrated input scale, ``"dynamic"`` when none, else ``"mixed"``."""
    kinds = {layer.activation_scaling for layer in fp8_layers(model).values()}
    return kinds.pop() if len(kinds) == 1 else "mixed"


def fp8_precision_string(backend: str, model: nn.Module) -> str:
    """The recorded precision of an FP8 model: ``fp8_e4m3fn/<backend>[/<activation scaling>]``."""
    if backend == "weight_only":
        return f"{FP8_FORMAT}/weight_only"  # activations are never quantized: no scaling to name
    if backend == "transformer_engine":
        return f"{FP8_FORMAT}/transformer_engine"  # TE keeps its own delayed-scaling amax history
    return f"{FP8_FORMAT}/{backend}/{activation_scaling(model)}"


def fallback_message(
    requested: str, device: torch.device, compute_dtype: torch.dtype, choice: BackendChoice
) -> str:
    """Why FP8 compute was not possible and what runs instead (logged whenever that happens)."""
    reason = fp8_compute_problem(device) or choice.message
    return (
        f"FP8 compute ({requested}) was requested on {device}, but FP8 compute needs a CUDA GPU with compute "
        f"capability >= {FP8_MIN_CAPABILITY[0]}.{FP8_MIN_CAPABILITY[1]} ({reason}); using {choice.backend}: "
        f"FP8 weight storage, matmuls in {str(compute_dtype).replace('torch.', '')}"
    )


class PrecisionPolicy:
    """The ``transformer_postprocess`` hook of the model cache (see the module docstring).

    ``choose`` picks the backend for a request on a device (:func:`choose_backend`; tests of the
    FP8-compute path on a CPU pass one granting ``scaled_mm``, whose ``torch._scaled_mm`` runs there
    too). ``use_sidecars=False`` ignores calibrated scales (calibration itself loads that way).
    ``fuse_qkv``: fuse q/k/v projections of ``scaled_mm`` models (same weights, one GEMM instead of three).
    """

    def __init__(
        self,
        precision: str = "auto",
        fp8_backend: str = "auto",
        compile: bool = False,
        data_dir: str | Path = "data",
        *,
        compile_mode: str = "default",
        use_sidecars: bool = True,
        choose: BackendChooser = choose_backend,
        fuse_qkv: bool = True,
    ) -> None:
        check_precision_settings(precision, fp8_backend)
        check_compile_mode(compile_mode)
        self.precision = precision
        self.fp8_backend = fp8_backend
        self.compile = compile
        self.compile_mode = compile_mode
        self.data_dir = Path(data_dir)
        self.use_sidecars = use_sidecars
        self.choose = choose
        self.fuse_qkv = fuse_qkv

    @classmethod
    def from_settings(cls, settings: "Settings", **options: Any) -> "PrecisionPolicy":
        """The policy of ``settings.precision``, ``fp8_backend``, ``fp8_fuse_qkv``, ``compile``, ``compile_mode``
        and ``data_dir``."""
        options.setdefault("fuse_qkv", settings.fp8_fuse_qkv)
        return cls(settings.precision, settings.fp8_backend, settings.compile, settings.data_dir,
                   compile_mode=settings.compile_mode, **options)

    def requested_backend(self, weight_dtype: str) -> str | None:
        """The FP8 backend asked for by ``weight_dtype`` and the settings; None when no FP8 is asked."""
        if weight_dtype == "default":
            return self.fp8_backend if self.precision == "fp8" else None
        if weight_dtype == WEIGHT_DTYPE_STORAGE:
            return "weight_only"
        if weight_dtype == WEIGHT_DTYPE_COMPUTE:
            # The workflow asks for FP8 compute: the configured compute backend, else scaled_mm.
            return self.fp8_backend if self.fp8_backend in _COMPUTE_BACKENDS else "scaled_mm"
        raise Fp8Error(
            f"weight_dtype {weight_dtype!r} is not supported; supported: {', '.join(SUPPORTED_WEIGHT_DTYPES)}",
            weight_dtype=weight_dtype,
            supported=list(SUPPORTED_WEIGHT_DTYPES),
        )

    def __call__(self, loaded: "LoadedTransformer") -> "LoadedTransformer":
        transformer = loaded.transformer
        device = _module_device(transformer)
        compute_dtype = _compute_dtype(transformer)
        requested = self.requested_backend(loaded.weight_dtype)
        stored_fp8 = bool(fp8_layers(transformer))
        if requested is None and not stored_fp8:
            self._maybe_compile(transformer, device, loaded.name)
            return loaded
        if requested is None:
            # The file itself stores FP8 weights: keep them (no float copy), compute in the compute dtype.
            requested = "weight_only"
        choice = self.choose(requested, device)
        if choice.fell_back:
            log.warning("%s: %s", loaded.name, fallback_message(requested, device, compute_dtype, choice))
        scales = self._calibrated_scales(loaded) if self.use_sidecars else None
        if stored_fp8:
            _switch_backend(transformer, choice.backend, compute_dtype)
            if scales:
                apply_activation_scales(transformer, scales)
            log.info(
                "%s: FP8 weights from the file kept as %s (%.1f MiB)",
                loaded.name, choice.backend, module_bytes(transformer) / 2**20,
            )
        else:
            report = quantize_transformer(transformer, choice.backend, scales=scales, compute_dtype=compute_dtype)
            log.info("%s: %s", loaded.name, report.summary())
            for note in report.notes:
                log.warning("%s: %s", loaded.name, note)
        transformer.to(device)
        if self.fuse_qkv and choice.backend == "scaled_mm":
            fused = fuse_qkv_projections(transformer)
            log.info("%s: %d q/k/v projection triples run as one FP8 GEMM each", loaded.name, fused)
        self._maybe_compile(transformer, device, loaded.name)
        return replace(loaded, transformer=transformer, precision=fp8_precision_string(choice.backend, transformer))

    def _calibrated_scales(self, loaded: "LoadedTransformer") -> Mapping[str, torch.Tensor] | None:
        location = sidecar_location(loaded.name, loaded.path, self.data_dir)
        if not location.is_file():
            return None
        sha = loaded.sha256 or (checkpoint_sha256(loaded.path) if loaded.path is not None else "")
        scales = load_sidecar(location, sha)  # refuses a sidecar of another checkpoint
        log.info("%s: %d calibrated activation scales from %s", loaded.name, len(scales), location)
        return scales

    def _maybe_compile(self, transformer: nn.Module, device: torch.device, name: str) -> None:
        if not self.compile:
            return
        if device.type != "cuda":
            log.info("%s: compile is for CUDA devices; the transformer runs eagerly on %s", name, device)
            return
        # Inductor keeps compiled graphs and kernels on disk: under data_dir they outlive the process, so a
        # restart loads them instead of compiling again.
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(self.data_dir / "cache" / "torchinductor"))
        count = compile_blocks(transformer, mode=self.compile_mode)
        log.info("%s: compiled %d transformer blocks (%s)", name, count, self.compile_mode)


def _switch_backend(model: nn.Module, backend: str, compute_dtype: torch.dtype) -> None:
    """Put the FP8 layers of ``model`` (loaded as ``weight_only``) on ``backend``."""
    if backend != "transformer_engine":
        set_backend(model, backend)
        return
    # Transformer Engine holds its own weights: rebuild each layer from its FP8 tensors.
    for name, layer in fp8_layers(model).items():
        rebuilt = Fp8Linear.from_fp8(
            layer.weight, layer.weight_scale, layer.bias, backend="transformer_engine", compute_dtype=compute_dtype
        )
        replace_module(model, name, rebuilt)


def _module_device(module: nn.Module) -> torch.device:
    for tensor in list(module.parameters()) + list(module.buffers()):
        return tensor.device
    return torch.device("cpu")


def _compute_dtype(module: nn.Module) -> torch.dtype:
    """The float dtype the module computes in (FP8 storage aside)."""
    for tensor in module.parameters():
        if tensor.is_floating_point() and tensor.element_size() >= 2:
            return tensor.dtype
    return torch.float32
