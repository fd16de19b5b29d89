"""Which FP8 backend the hardware can run, and regional compilation of transformer blocks.

FP8 pays only when the activation scale/cast is fused into the GEMM's neighbours (see
``PERF-BASELINE.md``): ``scaled_mm`` is meant to run with every transformer block compiled
(:func:`compile_blocks`), and Transformer Engine fuses on its own.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from engine.errors import Fp8Error
from engine.fp8.linear import BACKENDS

log = logging.getLogger(__name__)

FP8_MIN_CAPABILITY = (8, 9)  # Ada; Hopper (9.0) and Blackwell (10.x) too
BACKEND_CHOICES = ("auto",) + BACKENDS


@dataclass(frozen=True)
class BackendChoice:
    """The backend to use and why; ``message`` is set whenever the request could not be honoured."""

    backend: str
    requested: str
    device: str
    fp8_compute: bool  # True when the matmuls themselves run in FP8
    message: str = ""

    @property
    def fell_back(self) -> bool:
        return bool(self.message)


def transformer_engine_available() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401, PLC0415 - optional GPU extra
    except Exception:  # ImportError, or a CUDA build that fails at import
        return False
    return True


def fp8_compute_problem(device: torch.device | str) -> str:
    """Why ``device`` cannot run FP8 GEMMs, or ``""`` when it can."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"{device.type} has no FP8 matrix units"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    if not hasattr(torch, "_scaled_mm"):
        return f"this torch ({torch.__version__}) has no torch._scaled_mm"
    capability = torch.cuda.get_device_capability(device)
    if capability < FP8_MIN_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        return (
            f"{name} is compute capability {capability[0]}.{capability[1]}; FP8 GEMMs need "
            f"{FP8_MIN_CAPABILITY[0]}.{FP8_MIN_CAPABILITY[1]} or newer (Ada, Hopper, Blackwell)"
        )
    return ""


def choose_backend(requested: str = "auto", device: torch.device | str = "cpu") -> BackendChoice:
    """Pick the FP8 backend for ``device``.

    ``auto`` means ``scaled_mm`` where FP8 GEMMs run (CUDA >= 8.9), else ``weight_only``.
    A request the hardware cannot honour falls back to ``weight_only`` with a message (also logged
    as a warning); it never raises for hardware reasons. An unknown name raises :class:`Fp8Error`.
    """
    if requested not in BACKEND_CHOICES:
        raise Fp8Error(
            f"unknown FP8 backend '{requested}'; supported: {', '.join(BACKEND_CHOICES)}",
            backend=requested,
            supported=list(BACKEND_CHOICES),
        )
    device_name = str(torch.device(device))
    problem = fp8_compute_problem(device)
    if requested == "weight_only":
        return BackendChoice("weight_only", requested, device_name, fp8_compute=False)
    if requested == "transformer_engine" and not problem and not transformer_engine_available():
        problem = "Transformer Engine is not installed (pip install transformer_engine[pytorch])"
    if not problem:
        backend = "scaled_mm" if requested == "auto" else requested
        return BackendChoice(backend, requested, device_name, fp8_compute=True)
    message = f"FP8 compute unavailable ({problem}); using weight_only: FP8 weights, matmuls in BF16"
    if requested != "auto":
        log.warning("FP8 backend %s requested on %s: %s", requested, device_name, message)
    return BackendChoice("weight_only", requested, device_name, fp8_compute=False, message=message)


def transformer_blocks(transformer: nn.Module) -> list[nn.Module]:
    """The repeated blocks of an SD3 transformer (``transformer_blocks``)."""
    blocks = getattr(transformer, "transformer_blocks", None)
    if blocks is None:
        raise Fp8Error(
            f"{type(transformer).__name__} has no transformer_blocks to compile", model=type(transformer).__name__
        )
    return list(blocks)


COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")


def check_compile_mode(mode: str) -> None:
    if mode not in COMPILE_MODES:
        raise Fp8Error(f"unknown compile_mode {mode!r}; supported: {', '.join(COMPILE_MODES)}",
                       compile_mode=mode, supported=list(COMPILE_MODES))


def compile_blocks(transformer: nn.Module, *, mode: str | None = None, dynamic: bool = False) -> int:
    """``torch.compile`` each transformer block in place (regional compilation); returns the count.

    Compiling blocks instead of the whole model costs seconds instead of minutes for the same speed.
    All blocks share one forward, so dynamo counts their variants (last block, dual-attention
    blocks, each resolution) against a single recompile limit: the limit is raised to cover them,
    and hitting it raises instead of silently running a block eagerly. Module names and state dict
    keys stay unchanged (``nn.Module.compile``). Meant for CUDA; on a CPU it needs a C++ compiler.
    """
    import torch._dynamo.config as dynamo_config  # noqa: PLC0415

    blocks = transformer_blocks(transformer)
    # Room for every block variant at several resolutions and batch sizes.
    needed = max(64, 8 * len(blocks))
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), needed))
    for name in ("accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), 4 * needed))
    if hasattr(dynamo_config, "fail_on_recompile_limit_hit"):
        dynamo_config.fail_on_recompile_limit_hit = True
    if mode is not None:
        check_compile_mode(mode)
    for block in blocks:
        block.compile(mode=None if mode in (None, "default") else mode, dynamic=dynamic)
    return len(blocks)


def uncompile_blocks(transformer: nn.Module) -> int:
    """Undo :func:`compile_blocks` (blocks run eagerly again) and drop dynamo's caches."""
    blocks = transformer_blocks(transformer)
    for block in blocks:
        block._compiled_call_impl = None  # what nn.Module.compile sets; None restores eager calls
    torch._dynamo.reset()
    return len(blocks)


def blocks_compiled(transformer: nn.Module) -> bool:
    return all(getattr(b, "_compiled_call_impl", None) is not None for b in transformer_blocks(transformer))
