"""Transformer benchmark: BF16 vs FP8 on SD3.5-shaped models with random weights (no downloads).

One CFG forward (batch 2) at 1024x1024 = 4096 image tokens + 333 text tokens, for BF16 eager,
BF16 with each block compiled, and every FP8 backend the device runs (static and dynamic
activation scales, eager and compiled; ``scaled_mm`` with static scales also with fused q/k/v
projections, :mod:`engine.fp8.fused`, beside the same weights unfused): median of ``repeats`` timed forwards after warm-up (CUDA
events on a GPU, ``perf_counter`` on a CPU), peak memory and relative error against BF16 eager on
the same inputs. Targets come from ``docs/PERFORMANCE.md`` and are checked against the measurements.

The end-to-end throughput mode (text encoders, sampler, VAE, PNG, ledger) is a separate function
elsewhere; this module times the transformer alone. CLI: ``python -m engine.bench`` or
``python app.py bench``.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, TextIO

import torch

from engine.errors import Fp8Error
from engine.fp8.backends import (
    check_compile_mode,
    compile_blocks,
    fp8_compute_problem,
    transformer_engine_available,
    uncompile_blocks,
)
from engine.fp8.calibrate import calibrate
from engine.fp8.fused import fuse_qkv_projections, unfuse_qkv_projections
from engine.fp8.quantize import apply_activation_scales, module_bytes, quantize_transformer, set_backend

# Published transformer/config.json of stabilityai/stable-diffusion-3.5-large and -medium.
SD35_LARGE_CONFIG: dict[str, Any] = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "num_layers": 38,
    "attention_head_dim": 64,
    "num_attention_heads": 38,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 2432,
    "pooled_projection_dim": 2048,
    "out_channels": 16,
    "pos_embed_max_size": 192,
    "dual_attention_layers": (),
    "qk_norm": "rms_norm",
}
SD35_MEDIUM_CONFIG: dict[str, Any] = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "num_layers": 24,
    "attention_head_dim": 64,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048,
    "out_channels": 16,
    "pos_embed_max_size": 384,
    "dual_attention_layers": tuple(range(13)),
    "qk_norm": "rms_norm",
}
# Same structure (qk norm, a dual-attention block), widths multiples of 16, seconds on a CPU.
TINY_CONFIG: dict[str, Any] = {
    "sample_size": 16,
    "patch_size": 2,
    "in_channels": 16,
    "num_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 4,
    "joint_attention_dim": 64,
    "caption_projection_dim": 64,
    "pooled_projection_dim": 64,
    "out_channels": 16,
    "pos_embed_max_size": 32,
    "dual_attention_layers": (0,),
    "qk_norm": "rms_norm",
}


@dataclass(frozen=True)
class BenchShape:
    latent_side: int  # 128 latent pixels = 1024 image pixels
    text_tokens: int  # 77 CLIP + 256 T5 = 333
    batch: int = 2  # classifier-free guidance: conditional + unconditional


MODELS: dict[str, tuple[dict[str, Any], BenchShape]] = {
    "large": (SD35_LARGE_CONFIG, BenchShape(128, 333)),
    "medium": (SD35_MEDIUM_CONFIG, BenchShape(128, 333)),
    "tiny": (TINY_CONFIG, BenchShape(16, 21)),
}


@dataclass(frozen=True)
class Targets:
    """docs/PERFORMANCE.md, "Targets for this project" (same GPU, same run)."""

    min_speedup_same_compile: float = 1.25  # FP8 vs BF16 with the same compile setting
    min_speedup_vs_bf16_eager: float = 1.8  # FP8 vs diffusers' default BF16 eager
    max_memory_ratio: float = 0.55  # transformer peak memory, FP8 / BF16
    max_rel_error: float = 0.03  # per forward, against BF16
    aim_ms_per_step: float = 75.0  # Large on an H200: ~2.1 s per 28-step image


TARGETS = Targets()


@dataclass
class VariantResult:
    name: str
    precision: str  # bf16 or fp8
    backend: str  # "" for bf16
    activation_scaling: str  # "", dynamic, static, none (weight_only), delayed (TE)
    compiled: bool
    weight_scales: str = ""  # fp8: how many layers scale their weights per output channel (the rest per tensor)
    fused_qkv: bool = False  # fp8 scaled_mm: each attention's q/k/v projections run as one GEMM
    ms: float | None = None
    ms_all: list[float] = field(default_factory=list)
    warmup_s: float | None = None  # includes compilation for compiled variants
    weight_bytes: int | None = None
    peak_bytes: int | None = None  # device peak during the timed forwards (CUDA only)
    rel_error: float | None = None
    speedup_vs_bf16_eager: float | None = None
    speedup_vs_bf16_compiled: float | None = None
    skipped: str = ""
    error: str = ""

    @property
    def fp8_compute(self) -> bool:
        return self.precision == "fp8" and self.backend in ("scaled_mm", "transformer_engine")


@dataclass
class TargetCheck:
    name: str
    value: float | None
    limit: float
    passed: bool | None  # None: not measurable in this run
    detail: str

    @classmethod
    def judge(cls, name: str, value: float | None, limit: float, higher_is_better: bool, detail: str) -> "TargetCheck":
        """``value`` against ``limit`` (at least it, or at most it); no verdict when the run had no value."""
        passed = None if value is None else (value >= limit if higher_is_better else value <= limit)
        return cls(name, None if value is None else round(value, 4), limit, passed, detail)


VERDICTS = {True: "PASS", False: "FAIL", None: "n/a"}  # TargetCheck.passed as the tables print it


# ----------------------------------------------------------------------------------------- setup


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_size(size: str | None, device: torch.device) -> str:
    if size in (None, "", "auto"):
        return "large" if device.type == "cuda" else "tiny"
    if size not in MODELS:
        raise Fp8Error(f"unknown benchmark model '{size}'; supported: auto, {', '.join(MODELS)}", size=size)
    return size


def runnable_backends(device: torch.device) -> list[str]:
    """FP8 backends that run on ``device`` (on a CPU ``torch._scaled_mm`` runs, slowly, when implemented)."""
    backends = []
    if not fp8_compute_problem(device) or (device.type == "cpu" and _cpu_scaled_mm_works()):
        backends.append("scaled_mm")
    if device.type == "cuda" and not fp8_compute_problem(device) and transformer_engine_available():
        backends.append("transformer_engine")
    backends.append("weight_only")
    return backends


def _cpu_scaled_mm_works() -> bool:
    try:
        a = torch.zeros(16, 16, dtype=torch.float8_e4m3fn)
        one = torch.ones((), dtype=torch.float32)
        torch._scaled_mm(a, a.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
    except (RuntimeError, NotImplementedError, AttributeError):
        return False
    return True


def build_transformer(size: str, device: torch.device, seed: int = 0, dtype: torch.dtype = torch.bfloat16):
    """An SD3.5-shaped ``SD3Transformer2DModel`` with random weights, built directly on ``device``."""
    from diffusers import SD3Transformer2DModel  # noqa: PLC0415

    config, _ = MODELS[size]
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise in the target dtype: no FP32 copy of 8 B parameters
    try:
        with torch.device(device):
            model = SD3Transformer2DModel(**config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval().requires_grad_(False)


def make_inputs(size: str, device: torch.device, seed: int = 1, dtype: torch.dtype = torch.bfloat16) -> dict:
    config, shape = MODELS[size]
    generator = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*dims: int) -> torch.Tensor:
        return torch.randn(*dims, generator=generator).to(device, dtype)

    return {
        "hidden_states": randn(shape.batch, config["in_channels"], shape.latent_side, shape.latent_side),
        "encoder_hidden_states": randn(shape.batch, shape.text_tokens, config["joint_attention_dim"]),
        "pooled_projections": randn(shape.batch, config["pooled_projection_dim"]),
        "timestep": torch.full((shape.batch,), 500.0, device=device),
    }


# ---------------------------------------------------------------------------------------- timing


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _forward(model, inputs: dict) -> torch.Tensor:
    with torch.inference_mode():
        return model(**inputs, return_dict=False)[0]


def time_forward(model, inputs: dict, device: torch.device, repeats: int, warmup: int) -> tuple[list[float], float, int | None, torch.Tensor]:
    """(ms per timed forward, warm-up seconds, peak device bytes or None, last output)."""
    start = time.perf_counter()
    out = None
    for _ in range(max(1, warmup)):
        out = _forward(model, inputs)
    _synchronize(device)
    warmup_s = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    timings = []
    for _ in range(repeats):
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            out = _forward(model, inputs)
            end.record()
            end.synchronize()
            timings.append(begin.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            out = _forward(model, inputs)
            timings.append((time.perf_counter() - t0) * 1000)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return timings, warmup_s, peak, out


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float32 (tensors that track gradients too)."""
    out, ref = out.detach().float(), ref.detach().float()
    return float((out - ref).norm() / ref.norm())


# ----------------------------------------------------------------------------------------- run


def run_benchmark(
    size: str = "auto",
    device: str | None = "auto",
    backends: Iterable[str] | None = None,
    *,
    repeats: int = 5,
    warmup: int = 2,
    compile: bool | None = None,
    seed: int = 0,
    compile_mode: str = "default",
    quick: bool = False,
    out: TextIO | None = None,
    quiet: bool = False,
) -> dict[str, Any]:
    """Benchmark one model size; returns the report as a JSON-ready dict (also printed to ``out``).

    ``backends``: FP8 backends to time (default: every one the device runs). ``compile``: also time
    block-compiled variants (default: on CUDA only; on a CPU compilation needs a C++ toolchain and
    minutes). ``compile_mode``: the torch.compile mode of every compiled variant, BF16 and FP8 alike
    (:data:`engine.fp8.backends.COMPILE_MODES`). ``quick``: only the variants the targets compare (BF16
    eager, BF16 compiled, FP8 static compiled with and without fused q/k/v projections), e.g. to try a
    slow-compiling mode. FP8 weight scales are the
    production default (per tensor where a layer loses nothing by it, see :mod:`engine.fp8.quantize`); on
    CUDA an all-per-channel variant is timed too. Progress, the table and the JSON go to ``out`` (default:
    stdout) unless ``quiet``.
    """
    started = time.perf_counter()
    dev = resolve_device(device)
    size = resolve_size(size, dev)
    available = runnable_backends(dev)
    requested = list(backends) if backends is not None else available
    unknown = [b for b in requested if b not in ("scaled_mm", "transformer_engine", "weight_only")]
    if unknown:
        raise Fp8Error(
            f"unknown FP8 backend(s) {', '.join(unknown)}; supported: scaled_mm, transformer_engine, weight_only",
            backends=unknown,
        )
    do_compile = dev.type == "cuda" if compile is None else compile
    check_compile_mode(compile_mode)
    def say(line: str) -> None:
        if not quiet:
            print(line, file=out or sys.stdout, flush=True)

    say(f"bench: {size} SD3.5-shaped transformer on {describe_device(dev)}; backends {', '.join(requested)}"
        + (f"; compile mode {compile_mode}" if do_compile else ""))

    inputs = make_inputs(size, dev)
    model = build_transformer(size, dev, seed)
    params = sum(p.numel() for p in model.parameters())
    results: list[VariantResult] = []
    reference: dict[str, Any] = {}

    def measure(result: VariantResult, model_now) -> None:
        if result.skipped:
            results.append(result)
            say(f"  {result.name}: skipped ({result.skipped})")
            return
        try:
            if result.compiled:
                compile_blocks(model_now, mode=compile_mode)
            timings, result.warmup_s, result.peak_bytes, output = time_forward(model_now, inputs, dev, repeats, warmup)
            result.ms_all = [round(t, 3) for t in timings]
            result.ms = statistics.median(timings)
            result.weight_bytes = module_bytes(model_now)
            if "output" not in reference:
                reference["output"] = output.float().clone()
            result.rel_error = relative_error(output, reference["output"])
        except Exception as exc:  # one variant failing (a compile error, OOM) must not hide the others
            result.error = f"{type(exc).__name__}: {exc}"[:500]
        finally:
            if result.compiled:
                uncompile_blocks(model_now)
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        results.append(result)
        say(f"  {result.name}: " + (f"{result.ms:.2f} ms" if result.ms is not None else f"error {result.error}"))

    def rebuilt(model_now):
        """A fresh BF16 model with the same weights (same seed), the old one freed first."""
        del model_now
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        return build_transformer(size, dev, seed)

    no_compile = "" if do_compile else "compile disabled (default off on a CPU)"
    measure(VariantResult("bf16 eager", "bf16", "", "", False), model)
    measure(VariantResult("bf16 compiled", "bf16", "", "", True, skipped=no_compile), model)

    weight_scales = {"label": ""}

    def fp8(name: str, backend: str, scaling: str, compiled: bool, **extra) -> VariantResult:
        return VariantResult(name, "fp8", backend, scaling, compiled, weight_scales["label"], **extra)

    def quantize(backend: str, per_channel: bool | None = None) -> None:
        report = quantize_transformer(model, backend, per_channel=per_channel)
        weight_scales["label"] = f"{len(report.per_channel_layers)} of {len(report.quantized)} layers per-channel"
        say(f"  quantized for {backend}: {weight_scales['label']}, the rest per-tensor")

    if quick:
        requested = [b for b in requested if b == "scaled_mm"] or requested[:1]
    quantized_with = None
    for backend in [b for b in ("scaled_mm", "weight_only") if b in requested]:
        if backend not in available:
            measure(fp8(f"fp8 {backend}", backend, "", False, skipped="not supported on this device"), model)
            continue
        if quantized_with is None:
            quantize(backend)
            quantized_with = backend
        else:
            set_backend(model, backend)
        if backend == "weight_only":
            # Activations stay in BF16: static and dynamic scales are the same computation.
            measure(fp8("fp8 weight_only eager", backend, "none", False), model)
            continue
        if not quick:
            measure(fp8(f"fp8 {backend} dynamic eager", backend, "dynamic", False), model)
            measure(fp8(f"fp8 {backend} dynamic compiled", backend, "dynamic", True, skipped=no_compile), model)
        _calibrate_at_shape(model, inputs)
        if not quick or not do_compile:
            measure(fp8(f"fp8 {backend} static eager", backend, "static", False), model)
        measure(fp8(f"fp8 {backend} static compiled", backend, "static", True, skipped=no_compile), model)
        if backend == "scaled_mm":
            # The production default (settings fp8_fuse_qkv): the same weights and scales as the rows above,
            # each attention's q/k/v as one GEMM, timed next to them so one run shows what fusion buys.
            fuse_qkv_projections(model)
            if not quick or not do_compile:
                measure(fp8(f"fp8 {backend} static eager, fused qkv", backend, "static", False, fused_qkv=True), model)
            measure(fp8(f"fp8 {backend} static compiled, fused qkv", backend, "static", True, fused_qkv=True,
                        skipped=no_compile), model)
            unfuse_qkv_projections(model)

    if "scaled_mm" in requested and "scaled_mm" in available and do_compile and not quick:
        # Every layer scaled per output channel (the row-wise FP8 GEMM), against the default above where
        # layers that lose nothing by it use one scale per tensor; quantized again from the same weights.
        model = rebuilt(model)
        quantize("scaled_mm", per_channel=True)
        _calibrate_at_shape(model, inputs)
        measure(fp8("fp8 scaled_mm static compiled, all per-channel", "scaled_mm", "static", True), model)

    if "transformer_engine" in requested:
        if "transformer_engine" not in available:
            measure(fp8("fp8 transformer_engine eager", "transformer_engine", "delayed", False,
                        skipped="Transformer Engine not importable or no FP8 GPU"), model)
        else:
            model = rebuilt(model)
            quantize("transformer_engine")
            measure(fp8("fp8 transformer_engine eager", "transformer_engine", "delayed", False), model)

    _fill_ratios(results)
    report = {
        "size": size,
        "device": describe_device(dev),
        "torch": torch.__version__,
        "parameters": params,
        "shape": asdict(MODELS[size][1]),
        "repeats": repeats,
        "warmup": warmup,
        "compile_mode": compile_mode if do_compile else None,
        "variants": [asdict(r) for r in results],
        "targets": [asdict(c) for c in check_targets(results, size, dev)],
        "wall_s": round(time.perf_counter() - started, 1),
    }
    say(format_table(report))
    return report


def _calibrate_at_shape(model, inputs: dict) -> None:
    """Static activation scales from forwards at a few timesteps of the benchmark's own inputs."""
    scales = calibrate(model, _timestep_runner(model, inputs), ["999", "500", "50"]).scales
    apply_activation_scales(model, scales)


def _timestep_runner(model, inputs: dict) -> Callable[[str], None]:
    """Calibration forwards at a few timesteps: here a "prompt" names the timestep."""

    def run_forward(timestep: str) -> None:
        batch = inputs["timestep"].shape[0]
        _forward(model, inputs | {"timestep": torch.full((batch,), float(timestep), device=inputs["timestep"].device)})

    return run_forward


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} (sm_{major}{minor})"
    return str(device)


def _fill_ratios(results: list[VariantResult]) -> None:
    by_name = {r.name: r for r in results}
    eager, compiled = by_name.get("bf16 eager"), by_name.get("bf16 compiled")
    for r in results:
        if r.ms:
            if eager and eager.ms:
                r.speedup_vs_bf16_eager = eager.ms / r.ms
            if compiled and compiled.ms:
                r.speedup_vs_bf16_compiled = compiled.ms / r.ms


def check_targets(results: list[VariantResult], size: str, device: torch.device, targets: Targets = TARGETS) -> list[TargetCheck]:
    """Compare the measurements with the targets; ``passed`` is None where this run cannot tell."""
    measured = [r for r in results if r.ms is not None]
    bf16_eager = next((r for r in measured if r.name == "bf16 eager"), None)
    fp8 = [r for r in measured if r.fp8_compute] or [r for r in measured if r.precision == "fp8"]
    best = min(fp8, key=lambda r: r.ms, default=None)
    best_compiled = min((r for r in fp8 if r.compiled), key=lambda r: r.ms, default=None)
    bf16_compiled = next((r for r in measured if r.name == "bf16 compiled"), None)
    checks = []

    def check(name: str, value: float | None, limit: float, higher_is_better: bool, detail: str) -> None:
        checks.append(TargetCheck.judge(name, value, limit, higher_is_better, detail))

    same = bf16_compiled.ms / best_compiled.ms if bf16_compiled and best_compiled else None
    check("speedup_same_compile", same, targets.min_speedup_same_compile, True,
          f"{bf16_compiled.name} / {best_compiled.name}" if bf16_compiled and best_compiled
          else "needs compiled BF16 and FP8 variants")
    vs_eager = bf16_eager.ms / best.ms if bf16_eager and best else None
    check("speedup_vs_bf16_eager", vs_eager, targets.min_speedup_vs_bf16_eager, True,
          f"bf16 eager / {best.name}" if best else "no FP8 variant ran")
    if best and bf16_eager and best.peak_bytes and bf16_eager.peak_bytes:
        memory, what = best.peak_bytes / bf16_eager.peak_bytes, "peak device memory"
    elif best and bf16_eager and best.weight_bytes and bf16_eager.weight_bytes:
        memory, what = best.weight_bytes / bf16_eager.weight_bytes, "weight bytes (no device peak on this device)"
    else:
        memory, what = None, "not measured"
    check("memory_ratio", memory, targets.max_memory_ratio, False, f"{best.name if best else 'fp8'} / bf16 eager, {what}")
    check("rel_error", best.rel_error if best else None, targets.max_rel_error, False,
          f"{best.name}" if best else "no FP8 variant ran")
    aim_applies = size == "large" and device.type == "cuda" and "H200" in describe_device(device)
    check("aim_ms_per_step", best.ms if best and aim_applies else None, targets.aim_ms_per_step, False,
          "Large on an H200 (aim, not a target)" if aim_applies else "applies to Large on an H200 only")
    return checks


def format_table(report: dict[str, Any]) -> str:
    """The report as one fixed-width table plus the target checks."""
    head = (f"{'variant':42} {'ms':>9} {'x eager':>8} {'x compiled':>10} {'rel err':>8} "
            f"{'weights MiB':>11} {'peak MiB':>9}")
    lines = [
        f"SD3.5 {report['size']} ({_count(report['parameters'])} params) on {report['device']}, "
        f"one CFG forward, median of {report['repeats']}"
        + (f", compile mode {report['compile_mode']}" if report.get("compile_mode") else ""),
        head,
        "-" * len(head),
    ]

    def num(value: float | None, fmt: str) -> str:
        width = "".join(ch for ch in fmt.split(".")[0] if ch.isdigit())
        return format("-", f">{width}") if value is None else format(value, fmt)

    for v in report["variants"]:
        if v["skipped"] or v["error"]:
            lines.append(f"{v['name']:42} {'skipped: ' + v['skipped'] if v['skipped'] else 'error: ' + v['error'][:80]}")
            continue
        lines.append(
            f"{v['name']:42} {num(v['ms'], '9.2f')} {num(v['speedup_vs_bf16_eager'], '8.2f')} "
            f"{num(v['speedup_vs_bf16_compiled'], '10.2f')} {num(v['rel_error'] and 100 * v['rel_error'], '7.2f')}% "
            f"{num(v['weight_bytes'] and v['weight_bytes'] / 2**20, '11.1f')} {num(v['peak_bytes'] and v['peak_bytes'] / 2**20, '9.1f')}"
        )
    lines.append("targets (docs/PERFORMANCE.md):")
    for c in report["targets"]:
        lines.append(f"  {VERDICTS[c['passed']]:4} {c['name']}: {num(c['value'], '.3f')} (limit {c['limit']}) - {c['detail']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="auto", help="large, medium, tiny or a comma list (auto: large+medium on a GPU, tiny on a CPU)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--backends", default=None, help="comma list of FP8 backends (default: all that run here)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--compile", choices=["auto", "on", "off"], default="auto")
    parser.add_argument("--compile-mode", default="default", help="default or max-autotune-no-cudagraphs")
    parser.add_argument("--quick", action="store_true", help="only BF16 eager, BF16 compiled and FP8 static compiled (q/k/v fused and not)")
    parser.add_argument("--json", help="write the report(s) as JSON here")
    args = parser.parse_args(argv)
    dev = resolve_device(args.device)
    sizes = (["large", "medium"] if dev.type == "cuda" else ["tiny"]) if args.size == "auto" else args.size.split(",")
    compile_flag = {"auto": None, "on": True, "off": False}[args.compile]
    backends = args.backends.split(",") if args.backends else None
    reports = [
        run_benchmark(size, args.device, backends, repeats=args.repeats, warmup=args.warmup, compile=compile_flag,
                      compile_mode=args.compile_mode, quick=args.quick)
        for size in sizes
    ]
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(reports, handle, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())


def _count(number: int) -> str:
    """8.06 B, 2.24 B, 323.9 K: parameter counts of every model size readable."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if number >= size:
            return f"{number / size:.2f} {unit}"
    return str(number)
