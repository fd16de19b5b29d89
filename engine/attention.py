"""Which fused attention kernel the transformer runs: PyTorch's SDPA backend priority.

About a third of an SD3.5 Large step on Hopper is attention (head dim 64, 4,429 tokens at 1024²), and
PyTorch's default order picks FlashAttention-2 there although cuDNN's kernel can be faster. The setting
``attention``:

- ``auto``: on CUDA, time each fused backend once per (GPU, heads, head dim, dtype) at SD3.5's own shape
  (batch 2, 1024² image + 333 text tokens) and use them fastest first; the others stay behind it as
  fallbacks for shapes the fastest does not take. On a CPU: torch's default.
- ``default``: torch's own order.
- ``cudnn``, ``flash``, ``efficient``, ``math``: that kernel only; an input it cannot take is an error
  from torch that names why, not a quiet switch to another kernel.

The choice is a tuple of backend names kept on the model handle (:attr:`ModelHandle.attention`) and put
in force around each transformer call with :func:`attention_priority`. Compiled blocks bake the kernel
in when they are traced, which happens inside that scope, so eager and compiled calls agree.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
from typing import Any, Iterator

from engine.errors import ModelError

log = logging.getLogger(__name__)

ATTENTION_CHOICES = ("auto", "default", "cudnn", "flash", "efficient", "math")
_BACKEND_NAMES = {
    "cudnn": "CUDNN_ATTENTION",
    "flash": "FLASH_ATTENTION",
    "efficient": "EFFICIENT_ATTENTION",
    "math": "MATH",
}
_FUSED = ("cudnn", "flash", "efficient")
# SD3.5 at 1024²: (1024 / 8 / 2)² = 4096 image tokens + 77 CLIP + 256 T5 tokens, CFG batch 2.
_TUNE_BATCH, _TUNE_TOKENS = 2, 4096 + 333


def check_attention_choice(choice: str) -> None:
    if choice not in ATTENTION_CHOICES:
        raise ModelError(
            f"unknown attention {choice!r}; supported: {', '.join(ATTENTION_CHOICES)}",
            attention=choice,
            supported=list(ATTENTION_CHOICES),
        )


def choose_attention(choice: str, transformer: Any, device: Any, dtype: Any) -> tuple[str, ...]:
    """The SDPA backends, in priority order, for ``transformer`` on ``device``; () means torch's default."""
    check_attention_choice(choice)
    if choice == "default":
        return ()
    if choice != "auto":
        return (choice,)
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return ()
    config = getattr(transformer, "config", None)
    heads = int(getattr(config, "num_attention_heads", 0) or 0)
    head_dim = int(getattr(config, "attention_head_dim", 0) or 0)
    if not heads or not head_dim:
        return ()
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _fastest_first(index, heads, head_dim, dtype or torch.bfloat16)


@functools.lru_cache(maxsize=None)
def _fastest_first(device_index: int, heads: int, head_dim: int, dtype: Any) -> tuple[str, ...]:
    timings = time_backends(f"cuda:{device_index}", heads, head_dim, dtype)
    usable = sorted((ms, name) for name, ms in timings.items() if ms is not None)
    order = tuple(name for _, name in usable)
    if not order:
        return ()
    described = ", ".join(f"{name} {ms:.2f} ms" for ms, name in usable)
    log.info("attention: %s first (one SD3.5 attention at 1024²: %s)", order[0], described)
    return order + ("math",)


def time_backends(device: str, heads: int, head_dim: int, dtype: Any, repeats: int = 5) -> dict[str, float | None]:
    """Median milliseconds of one attention at SD3.5's 1024² shape per fused backend; None: cannot run it."""
    import torch
    import torch.nn.functional as F

    shape = (_TUNE_BATCH, heads, _TUNE_TOKENS, head_dim)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype) for _ in range(3))
    timings: dict[str, float | None] = {}
    for name in _FUSED:
        try:
            with attention_priority((name,)), torch.inference_mode():
                for _ in range(2):
                    F.scaled_dot_product_attention(q, k, v)
                samples = []
                for _ in range(repeats):
                    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    begin.record()
                    F.scaled_dot_product_attention(q, k, v)
                    end.record()
                    end.synchronize()
                    samples.append(begin.elapsed_time(end))
            timings[name] = sorted(samples)[len(samples) // 2]
        except RuntimeError as exc:  # this kernel does not take these inputs on this GPU
            log.debug("attention: %s cannot run here: %s", name, exc)
            timings[name] = None
    return timings


@contextlib.contextmanager
def attention_priority(backends: tuple[str, ...]) -> Iterator[None]:
    """Run the enclosed SDPA calls on ``backends`` (names from :data:`ATTENTION_CHOICES`), in that order."""
    if not backends:
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kernels = [getattr(SDPBackend, _BACKEND_NAMES[name]) for name in backends]
    if len(kernels) > 1 and _sdpa_kernel_takes_priority():
        with sdpa_kernel(kernels, set_priority=True):
            yield
    else:
        with sdpa_kernel(kernels):
            yield


@functools.lru_cache(maxsize=1)
def _sdpa_kernel_takes_priority() -> bool:
    from torch.nn.attention import sdpa_kernel

    return "set_priority" in inspect.signature(sdpa_kernel).parameters
