"""Throughput: GPU batch sizing from free memory, and the end-to-end batch benchmark.

:func:`choose_gpu_batch` decides how many same-shape rows share one GPU batch (the batch runner asks it
before every batch). :func:`run_e2e_benchmark` runs a real batch of rows end to end through
:class:`engine.batch.BatchRunner` (template, ledger, PNG files, zip) and compares its throughput with the
GPU work alone (the same rows as bare :meth:`Engine.run_batch` calls, nothing stored)::

    python app.py bench --e2e [--rows 16] [--size 1024] [--steps 28]

On a CPU it runs the built-in demo model at a small size. On a CUDA GPU it builds an SD3.5 Large-shaped
pipeline from the published configs with random weights (transformer, CLIP-L, CLIP-G, T5-XXL and VAE at
their real sizes; no download; tokenizers are the demo's generated ones, so the token counts are real
but the words are not) and measures BF16 and FP8 side by side. Targets (docs/PERFORMANCE.md): end-to-end
throughput >= 95 % of the GPU work alone, CPU-side work per row <= 5 % of the row's time, memory flat.
"""

from __future__ import annotations

import csv
import dataclasses
import gc
import resource
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, TextIO

from engine.errors import EngineError
from engine.settings import DEMO_CHECKPOINT, Settings

if TYPE_CHECKING:
    from engine.runtime import Engine
    from engine.workflow import Workflow

__all__ = [
    "E2E_TARGETS",
    "E2eTargets",
    "RANDOM_WEIGHT_CHECKPOINT",
    "choose_gpu_batch",
    "estimate_row_bytes",
    "format_table",
    "random_weight_components",
    "run_e2e_benchmark",
]

# --- GPU batch size from free memory -----------------------------------------------------------------

# Per-row device memory of sampling + decoding, measured on SD3.5 Large in BF16 (docs/PERFORMANCE.md): the
# VAE decoder peaks at 2.6 GB for a 1024x1024 image; the transformer's activations at ~0.7 GB for one
# CFG pair of 4096 + 333 tokens, i.e. ~80 KiB per token (rounded up: other widths stay below).
VAE_DECODE_BYTES_PER_PIXEL = 2560
TRANSFORMER_BYTES_PER_TOKEN = 96 * 1024
TEXT_TOKENS = 333  # 77 CLIP + 256 T5
PATCH_PIXELS = 16  # VAE downscale 8 x transformer patch 2
MEMORY_RESERVE_BYTES = 2 * 1024**3  # allocator fragmentation, text encoders' activations, cuDNN workspaces
DEFAULT_PIXELS = 1024 * 1024  # when a workflow's image size cannot be read (img2img from an uploaded file)
LATENT_NODES = frozenset({"EmptySD3LatentImage", "EmptyLatentImage"})


def estimate_row_bytes(width: int, height: int, images: int = 1, dtype_bytes: int = 2) -> int:
    """Device memory one row of ``images`` images of ``width`` x ``height`` needs beyond the weights."""
    pixels = width * height
    tokens = pixels // (PATCH_PIXELS * PATCH_PIXELS) + TEXT_TOKENS
    per_image = 2 * tokens * TRANSFORMER_BYTES_PER_TOKEN + pixels * VAE_DECODE_BYTES_PER_PIXEL
    return int(images * per_image * dtype_bytes / 2)


def _workflow_pixels(workflow: "Workflow") -> tuple[int, int, int]:
    """(width, height, images) of the largest empty latent the workflow samples."""
    from engine.workflow import Link

    best = (0, 0, 0)
    for node in workflow.nodes.values():
        if node.class_type not in LATENT_NODES:
            continue
        values = [node.inputs.get(k) for k in ("width", "height", "batch_size")]
        if any(isinstance(v, Link) for v in values):
            continue
        width, height, images = (int(v) if isinstance(v, (int, float)) else d for v, d in zip(values, (1024, 1024, 1)))
        if width * height * images > best[0] * best[1] * best[2]:
            best = (width, height, images)
    if best == (0, 0, 0):
        return 1024, DEFAULT_PIXELS // 1024, 1
    return best


def choose_gpu_batch(engine: Any, workflow: "Workflow", cap: int) -> int:
    """How many rows shaped like ``workflow`` to sample as one GPU batch: 1..``cap``.

    On CUDA: the free device memory (``torch.cuda.mem_get_info`` plus what PyTorch's allocator holds
    unused), less a reserve, divided by :func:`estimate_row_bytes` of the workflow's largest empty latent.
    Anywhere else memory is not the limit: ``cap``. Call it when the batch is about to start, after the
    models are resident, so the weights are already counted as used.
    """
    cap = max(1, int(cap))
    models = getattr(engine, "models", None)
    device = str(getattr(models, "device", "cpu"))
    if cap == 1 or not device.startswith("cuda"):
        return cap
    import torch

    index = torch.device(device).index
    index = torch.cuda.current_device() if index is None else index
    free, _total = torch.cuda.mem_get_info(index)
    free += torch.cuda.memory_reserved(index) - torch.cuda.memory_allocated(index)
    dtype = getattr(models, "dtype", None)
    dtype_bytes = torch.tensor([], dtype=dtype).element_size() if isinstance(dtype, torch.dtype) else 2
    width, height, images = _workflow_pixels(workflow)
    per_row = estimate_row_bytes(width, height, images, dtype_bytes)
    return max(1, min(cap, int((free - MEMORY_RESERVE_BYTES) // per_row)))


# --- targets ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class E2eTargets:
    """docs/PERFORMANCE.md, "End to end"."""

    min_ratio_to_gpu_only: float = 0.95  # end-to-end images/hour over GPU-work-only images/hour
    max_cpu_side_share: float = 0.05  # CPU-side seconds per row over the row's wall seconds
    max_rss_growth_mib: float = 32.0  # resident memory growth over the batch ("flat")


E2E_TARGETS = E2eTargets()

STAGES = {
    "text": frozenset({"CLIPTextEncode", "CLIPTextEncodeSD3"}),
    "sampler": frozenset({"KSampler", "KSamplerAdvanced"}),
    "vae": frozenset({"VAEDecode", "VAEDecodeTiled"}),
}
BATCHED_STAGES = ("sampler", "vae")  # one call serves the whole GPU batch: its time is shared

RANDOM_WEIGHT_CHECKPOINT = "sd35_large_random_weights"
CPU_DEFAULTS = {"size": 128, "steps": 4}
GPU_DEFAULTS = {"size": 1024, "steps": 28}
GPU_ONLY_ROWS_ON_CUDA = 4  # the GPU-only baseline is per image; a few rows keep the run under 10 minutes
PRODUCTS = ("Neon Jacket", "Leather Bag", "Ceramic Mug", "Running Shoe", "Desk Lamp", "Wrist Watch")
COLORS = ("red", "blue", "green", "black", "white", "orange", "teal", "purple")
STYLES = ("cyberpunk", "minimal", "studio", "futuristic", "vintage")


# --- the benchmark ---------------------------------------------------------------------------------


def run_e2e_benchmark(
    settings: Settings,
    rows: int = 16,
    size: int | None = None,
    steps: int | None = None,
    *,
    out: TextIO | None = None,
    quiet: bool = False,
) -> dict[str, Any]:
    """Run ``rows`` rows end to end and report throughput; returns the report (also printed to ``out``).

    ``size``/``steps`` default to 128 px / 4 steps on a CPU (the demo model) and 1024 px / 28 steps on
    CUDA (SD3.5 Large-shaped random weights, BF16 then FP8). Everything is written under a temporary
    data folder that is removed afterwards. The table, then the JSON, go to ``out`` (stdout) unless
    ``quiet``.
    """
    import torch

    if rows < 1:
        raise ValueError(f"rows must be >= 1, got {rows}")
    started = time.perf_counter()

    def say(line: str) -> None:
        if not quiet:
            print(line, file=out or sys.stdout, flush=True)

    from engine.models.cache import resolve_device

    device = resolve_device(settings.device)
    on_cuda = device.startswith("cuda")
    defaults = GPU_DEFAULTS if on_cuda else CPU_DEFAULTS
    size = int(size or defaults["size"])
    steps = int(steps or defaults["steps"])
    with tempfile.TemporaryDirectory(prefix="sd35-e2e-") as tmp:
        bench_settings = dataclasses.replace(
            settings, data_dir=str(Path(tmp) / "data"), db_path="", output_dir="", device=device,
        )
        if on_cuda:
            model = "SD3.5 Large-shaped pipeline, random weights at real size (transformer, CLIP-L, CLIP-G, T5-XXL, VAE)"
            say(f"bench --e2e: {model} on {device}; {rows} rows at {size}x{size}, {steps} steps")
            results = _random_weight_runs(bench_settings, "large", ("bf16", "fp8"), rows, size, steps, say)
        else:
            model = f"built-in demo model ({DEMO_CHECKPOINT}), tiny random weights"
            say(f"bench --e2e: {model} on {device}; {rows} rows at {size}x{size}, {steps} steps")
            demo_settings = dataclasses.replace(bench_settings, default_checkpoint=DEMO_CHECKPOINT)
            from engine.runtime import Engine

            engine = Engine(demo_settings)
            results = [_measure_pipeline(engine, demo_settings, rows, size, steps, rows, say)]
    report = {
        "device": _describe_device(device),
        "model": model,
        "torch": torch.__version__,
        "rows": rows,
        "size": size,
        "steps": steps,
        "max_gpu_batch": settings.max_gpu_batch,
        "compile": settings.compile and on_cuda,  # blocks compile on CUDA only
        "compile_mode": settings.compile_mode,
        "results": results,
        "targets": asdict(E2E_TARGETS),
        "wall_s": round(time.perf_counter() - started, 1),
    }
    if len(results) == 2 and results[0]["images_per_hour"] and results[1]["images_per_hour"]:
        report["fp8_over_bf16"] = round(results[1]["images_per_hour"] / results[0]["images_per_hour"], 3)
    say(format_table(report))
    return report


def _measure_pipeline(
    engine: "Engine", settings: Settings, rows: int, size: int, steps: int, gpu_only_rows: int,
    say: Callable[[str], None], label: str | None = None,
) -> dict[str, Any]:
    """Warm up, run ``gpu_only_rows`` rows as bare GPU batches, then all rows through the batch runner."""
    import psutil

    from engine.batch import BatchRunner
    from engine.jobs import RowJob
    from engine.rows import LocalDispatcher, RowExecutor
    from engine.sheets import read_sheet
    from engine.store import BatchLedger
    from engine.templates import TemplateLibrary

    data = Path(settings.data_path)
    for folder in (data, settings.outputs_path, settings.uploads_path):
        Path(folder).mkdir(parents=True, exist_ok=True)
    checkpoint = engine.default_checkpoint
    warm = engine.warm_up(checkpoint, size)
    say(f"  [{label or 'run'}] warm-up: load {warm['load_s']} s, one step {warm['sample_s']} s "
        f"at batch sizes {', '.join(map(str, warm.get('batch_sizes', [1])))}")
    compiled_at_warm_up = _compiled_graphs()

    sheet = read_sheet(_write_sheet(data / "rows.csv", rows, size, steps))
    ledger = BatchLedger(settings.ledger_path)
    templates = TemplateLibrary(settings.templates_path, validate_workflow=engine.validate)
    executor = RowExecutor(engine, max_gpu_batch=settings.max_gpu_batch)
    dispatcher = LocalDispatcher(executor)
    collected: list[Any] = []
    rss_after: list[int] = []  # resident memory as each row's result arrives
    process = psutil.Process()

    def on_result(result: Any) -> None:
        collected.append(result)
        rss_after.append(process.memory_info().rss)

    runner = BatchRunner(engine, ledger, templates, settings, dispatcher=dispatcher, on_result=on_result)
    try:
        prepared = runner.prepare("product_shot", sheet, batch_seed=0, on_invalid="stop")
        jobs = [
            RowJob(f"gpu-only:{r['row_number']}", "gpu-only", r["row_number"], r["workflow"], {}, 3600.0, checkpoint)
            for r in prepared.rows[:gpu_only_rows]
        ]

        # GPU work alone: the same rows, same grouping, nothing encoded or stored.
        gpu_only_s = _on_own_thread(lambda: _gpu_work_alone(engine, executor, jobs, data / "gpu-only"))
        say(f"  [{label or 'run'}] GPU work alone: {len(jobs)} rows in {gpu_only_s:.2f} s")

        # End to end: ledger, PNG encoding, atomic writes, ledger commits, then the zip.
        engine.executor.clear_cache()
        runner.start(prepared)
        rss_after.clear()
        rss_start, peak_start = process.memory_info().rss, _peak_rss()
        if str(engine.models.device).startswith("cuda"):
            import torch

            torch.cuda.reset_peak_memory_stats()
        began = time.perf_counter()
        summary = runner.run(prepared.batch_id)
        run_s = time.perf_counter() - began
        zipped = time.perf_counter()
        runner.write_zip(prepared.batch_id, data / "batch.zip")
        zip_s = time.perf_counter() - zipped
        rss_end, peak_end = process.memory_info().rss, _peak_rss()
        cuda_peak = None
        if str(engine.models.device).startswith("cuda"):
            import torch

            cuda_peak = torch.cuda.max_memory_allocated()
        cached = engine.executor.cached_signatures
        workflow_of = {row.row_key: row.workflow for row in ledger.rows(prepared.batch_id)}
    finally:
        executor.close()
        ledger.close()

    stats = dispatcher.last_stats
    assert stats is not None  # set by the run above
    first_batch = max(1, min(settings.max_gpu_batch, rows))
    done = [r for r in collected if r.status == "done"]
    wall_s = run_s + zip_s
    stage_s = _stage_seconds(done, workflow_of)
    png_s = sum(float(r.timings.get("png_s") or 0.0) for r in done)
    png_cpu_s = sum(float(r.timings.get("png_cpu_s") or 0.0) for r in done)
    count = max(len(done), 1)
    cpu_side = {
        "png_encode_hash_s": png_s / count,
        "store_s": stats.store_s / count,  # write + fsync + rename + ledger commit + events
        "zip_s": zip_s / count,
    }
    cpu_side["total_s"] = sum(cpu_side.values())
    row_wall = wall_s / count
    e2e_per_hour = len(done) / wall_s * 3600 if wall_s > 0 and done else 0.0
    gpu_only_per_hour = len(jobs) / gpu_only_s * 3600 if gpu_only_s > 0 else 0.0
    precision = done[0].record.get("precision") if done else None
    result = {
        "label": label or precision or "run",
        "precision": precision,
        "rows": rows,
        "done": summary.done,
        "failed": summary.failed + summary.timed_out,
        "run_s": round(run_s, 3),
        "zip_s": round(zip_s, 3),
        "wall_s": round(wall_s, 3),
        "images_per_hour": round(e2e_per_hour, 1),
        "gpu_s": round(stats.gpu_s, 3),
        "gpu_busy_share": round(stats.gpu_s / wall_s, 4) if wall_s > 0 else None,
        "gpu_blocked_s": round(stats.gpu_blocked_s, 3),
        "stage_s_per_row": {k: round(v / count, 4) for k, v in stage_s.items()},
        "cpu_side_s_per_row": {k: round(v, 4) for k, v in cpu_side.items()},
        "cpu_side_share": round(cpu_side["total_s"] / row_wall, 4) if row_wall > 0 else None,
        # The encoder threads' CPU seconds for the PNG work above, which counts their wall time (waiting
        # for a core included): how much CPU a row really costs.
        "png_encode_hash_cpu_s_per_row": round(png_cpu_s / count, 4),
        "gpu_only": {
            "rows": len(jobs),
            "seconds": round(gpu_only_s, 3),
            "images_per_hour": round(gpu_only_per_hour, 1),
        },
        "ratio_to_gpu_only": round(e2e_per_hour / gpu_only_per_hour, 4) if gpu_only_per_hour else None,
        "rss_start_mib": round(rss_start / 2**20, 1),
        # Growth once the first GPU batch is stored: what a long batch would keep adding (the first batch
        # also pays one-off buffers: pinned memory, encoder threads, SQLite's page cache).
        "rss_after_first_batch_mib": (
            round(rss_after[first_batch - 1] / 2**20, 1) if len(rss_after) > first_batch else None
        ),
        "rss_end_mib": round(rss_end / 2**20, 1),
        "peak_rss_start_mib": round(peak_start / 2**20, 1),
        "peak_rss_end_mib": round(peak_end / 2**20, 1),
        "cuda_max_allocated_mib": round(cuda_peak / 2**20, 1) if cuda_peak is not None else None,
        "executor_cache_entries": len(cached),
        "gpu_batches": stats.batches,
        "warm_up": warm,
        # Graphs torch.compile made after the warm-up: each is a compile a user's rows waited for.
        "compiles_after_warm_up": _compiled_graphs() - compiled_at_warm_up,
        "pipeline": stats.to_dict(),
    }
    result["checks"] = _checks(result)
    say(
        f"  [{result['label']}] end to end: {summary.done}/{rows} rows in {wall_s:.2f} s "
        f"({e2e_per_hour:.0f} images/hour; GPU alone {gpu_only_per_hour:.0f})"
    )
    return result


def _gpu_work_alone(engine: "Engine", executor: Any, jobs: list[Any], output_dir: Path) -> float:
    """Seconds to run ``jobs`` as bare GPU batches (the dispatcher's grouping), nothing encoded or stored.

    The first group runs once more, untimed, before the rest, so first-shape costs (compiling the batch
    shape, allocator growth) are not counted; text encodings are computed, not reused from earlier runs.
    """
    from engine.nodes.image import DiscardImages, deferred_saves

    groups = list(executor.groups(jobs))
    seconds = 0.0
    for index, group in enumerate([groups[0], *groups]):
        engine.executor.clear_cache()
        began = time.perf_counter()
        with deferred_saves(DiscardImages()):
            outcomes = engine.run_batch([job.workflow for job in group], output_dir=output_dir)
        _synchronize(engine)
        if index > 0:
            seconds += time.perf_counter() - began
        failed = [o for o in outcomes if isinstance(o, EngineError)]
        if failed:
            raise failed[0]
    engine.executor.clear_cache()
    return seconds


def _on_own_thread(work: Callable[[], Any]) -> Any:
    """``work()`` on a new thread, as the dispatcher's GPU work runs (CPU kernels' threading differs
    between the main thread and others, so the comparison runs both the same way)."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = work()
        except BaseException as exc:  # re-raised on the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=target, name="gpu-only")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def _stage_seconds(done: list[Any], workflow_of: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Seconds per stage summed over rows; a batched stage's call is shared by its GPU batch."""
    totals = {stage: 0.0 for stage in STAGES}
    for result in done:
        workflow = workflow_of.get(result.row_key) or {}
        batch = max(int(result.timings.get("gpu_batch") or 1), 1)
        for node_id, seconds in (result.timings.get("per_node") or {}).items():
            class_type = (workflow.get(node_id) or {}).get("class_type")
            for stage, classes in STAGES.items():
                if class_type in classes:
                    totals[stage] += float(seconds) / (batch if stage in BATCHED_STAGES else 1)
    return totals


def _checks(result: dict[str, Any], targets: E2eTargets = E2E_TARGETS) -> list[dict[str, Any]]:
    """PASS/FAIL of each target from the measured numbers (None: not measurable in this run)."""
    from engine.bench import TargetCheck

    def check(name: str, value: float | None, limit: float, higher_is_better: bool, detail: str) -> dict[str, Any]:
        return asdict(TargetCheck.judge(name, value, limit, higher_is_better, detail))

    settled = result.get("rss_after_first_batch_mib")
    growth = None if settled is None else round(result["rss_end_mib"] - settled, 1)
    return [
        check("ratio_to_gpu_only", result["ratio_to_gpu_only"], targets.min_ratio_to_gpu_only, True,
              "end-to-end images/hour / GPU-work-only images/hour"),
        check("cpu_side_share", result["cpu_side_share"], targets.max_cpu_side_share, False,
              "PNG encode + hash + write + ledger commit + zip, per row, over the row's wall time"),
        check("rss_growth_mib", growth, targets.max_rss_growth_mib, False,
              "resident memory growth after the first GPU batch" if growth is not None
              else "needs more rows than one GPU batch"),
    ]


def format_table(report: dict[str, Any]) -> str:
    """The report as one fixed-width table plus the target checks."""
    head = (f"{'run':24} {'img/h e2e':>10} {'img/h GPU':>10} {'ratio':>6} {'GPU busy':>8} "
            f"{'CPU-side/row':>13} {'share':>6} {'RSS MiB start->end':>19} {'CUDA peak MiB':>13}")
    lines = [
        f"{report['model']} on {report['device']}: {report['rows']} rows, {report['size']}x{report['size']}, "
        f"{report['steps']} steps, GPU batch <= {report['max_gpu_batch']}, compile {report['compile']}"
        + (f" ({report['compile_mode']})" if report["compile"] else ""),
        head,
        "-" * len(head),
    ]

    def num(value: float | None, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    for r in report["results"]:
        lines.append(
            f"{str(r['label'])[:24]:24} {num(r['images_per_hour'], '10.0f')} {num(r['gpu_only']['images_per_hour'], '10.0f')} "
            f"{num(r['ratio_to_gpu_only'], '6.3f')} {num(r['gpu_busy_share'] and 100 * r['gpu_busy_share'], '7.1f')}% "
            f"{num(1000 * r['cpu_side_s_per_row']['total_s'], '10.1f')} ms {num(r['cpu_side_share'] and 100 * r['cpu_side_share'], '5.1f')}% "
            f"{r['rss_start_mib']:>9.0f}->{r['rss_end_mib']:<9.0f} {num(r['cuda_max_allocated_mib'], '13.0f')}"
        )
    for r in report["results"]:
        stages = ", ".join(f"{k} {1000 * v:.1f} ms" for k, v in r["stage_s_per_row"].items())
        side = ", ".join(f"{k.removesuffix('_s')} {1000 * v:.1f} ms" for k, v in r["cpu_side_s_per_row"].items() if k != "total_s")
        lines.append(f"  {r['label']}: GPU stages per row: {stages}; CPU side per row: {side}; "
                     f"(PNG CPU time {1000 * r['png_encode_hash_cpu_s_per_row']:.1f} ms); "
                     f"{r['done']}/{r['rows']} done in {r['gpu_batches']} GPU batches; "
                     f"{r['compiles_after_warm_up']} compiles after warm-up")
    if "fp8_over_bf16" in report:
        lines.append(f"FP8 / BF16 end-to-end images/hour: {report['fp8_over_bf16']:.3f}x")
    from engine.bench import VERDICTS

    lines.append("targets (docs/PERFORMANCE.md, end to end):")
    for r in report["results"]:
        for c in r["checks"]:
            lines.append(f"  {VERDICTS[c['passed']]:4} {r['label']}: {c['name']} {num(c['value'], '.3f')} (limit {c['limit']}) - {c['detail']}")
    return "\n".join(lines)


def _write_sheet(path: Path, rows: int, size: int, steps: int) -> Path:
    """A product_shot sheet: distinct prompts, fixed seeds, one size."""
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["product_name", "color", "style", "seed", "width", "height", "steps"])
        for i in range(rows):
            writer.writerow([
                f"{PRODUCTS[i % len(PRODUCTS)]} {i + 1}", COLORS[i % len(COLORS)], STYLES[i % len(STYLES)],
                1000 + i, size, size, steps,
            ])
    return path


def _compiled_graphs() -> int:
    """How many graphs torch.compile has made in this process so far."""
    if "torch._dynamo" not in sys.modules:  # nothing compiled, and no reason to import dynamo
        return 0
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _peak_rss() -> int:
    """Peak resident set size of this process so far, in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _synchronize(engine: Any) -> None:
    device = str(getattr(getattr(engine, "models", None), "device", "cpu"))
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)


def _describe_device(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} (sm_{major}{minor})"
    return device


# --- random weights at real size (CUDA) ----------------------------------------------------------------

# Published configs of stabilityai/stable-diffusion-3.5-large (text_encoder*/config.json, vae/config.json).
CLIP_L_CONFIG = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                 "projection_dim": 768, "hidden_act": "quick_gelu", "max_position_embeddings": 77, "vocab_size": 49408}
CLIP_G_CONFIG = {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20,
                 "projection_dim": 1280, "hidden_act": "gelu", "max_position_embeddings": 77, "vocab_size": 49408}
T5_XXL_CONFIG = {"d_model": 4096, "d_ff": 10240, "d_kv": 64, "num_heads": 64, "num_layers": 24,
                 "feed_forward_proj": "gated-gelu", "vocab_size": 32128, "relative_attention_num_buckets": 32}
SD3_VAE_CONFIG = {"in_channels": 3, "out_channels": 3, "down_block_types": ("DownEncoderBlock2D",) * 4,
                  "up_block_types": ("UpDecoderBlock2D",) * 4, "block_out_channels": (128, 256, 512, 512),
                  "layers_per_block": 2, "latent_channels": 16, "norm_num_groups": 32, "sample_size": 1024,
                  "scaling_factor": 1.5305, "shift_factor": 0.0609, "use_quant_conv": False, "use_post_quant_conv": False}
# The same structure at demo widths: CPU tests of this code path.
TINY_T5_CONFIG = {"d_model": 64, "d_ff": 128, "d_kv": 16, "num_heads": 4, "num_layers": 2,
                  "feed_forward_proj": "gated-gelu", "vocab_size": 32128, "relative_attention_num_buckets": 32}


def random_weight_components(shape: str, device: str, dtype: Any) -> dict[str, Any]:
    """Pipeline components (diffusers names) with random weights, built on ``device`` in ``dtype``.

    ``shape``: "large" (SD3.5 Large's published configs, every part at its real size) or "tiny" (the
    same parts at demo widths). Tokenizers are the demo's generated CLIP tokenizers (T5 uses the CLIP-L
    one): real sequence lengths, made-up vocabulary.
    """
    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from engine.bench import build_transformer
    from engine.models.demo import CLIP_COMMON, VAE_CONFIG, demo_tokenizers

    if shape not in ("large", "tiny"):
        raise ValueError(f"unknown shape {shape!r}; supported: large, tiny")
    tok_l, tok_g = demo_tokenizers()
    if shape == "large":
        clip_configs, t5_config, vae_config = (CLIP_L_CONFIG, CLIP_G_CONFIG), T5_XXL_CONFIG, SD3_VAE_CONFIG
    else:
        tiny_clip = {**CLIP_COMMON, "vocab_size": len(tok_l)}
        clip_configs = ({**tiny_clip, "hidden_act": "quick_gelu"}, {**tiny_clip, "hidden_act": "gelu"})
        t5_config, vae_config = TINY_T5_CONFIG, VAE_CONFIG
    transformer = build_transformer(shape, torch.device(device), seed=0, dtype=dtype)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise in the target dtype: no float32 copy of T5-XXL's 4.7 B
    try:
        with torch.device(device):
            torch.manual_seed(1)
            encoders = [
                CLIPTextModelWithProjection(CLIPTextConfig(
                    **config, bos_token_id=tok_l.bos_token_id, eos_token_id=tok_l.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id,
                ))
                for config, tokenizer in zip(clip_configs, (tok_l, tok_g))
            ]
            t5 = T5EncoderModel(T5Config(**t5_config))
            vae = AutoencoderKL(**vae_config)
    finally:
        torch.set_default_dtype(previous)
    for module in (*encoders, t5, vae):
        module.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return {
        "transformer": transformer, "vae": vae, "text_encoder": encoders[0], "text_encoder_2": encoders[1],
        "text_encoder_3": t5, "tokenizer": tok_l, "tokenizer_2": tok_g, "tokenizer_3": tok_l,
    }


def _random_weight_models(settings: Settings, handles: tuple[Any, Any, Any]) -> Any:
    """A ModelCache that also serves ``handles`` under :data:`RANDOM_WEIGHT_CHECKPOINT` (no file)."""
    from engine.models.cache import ModelCache
    from engine.models.resolve import ModelResolver

    class RandomWeightModels(ModelCache):
        def available(self, kind: str) -> list[str]:
            names = super().available(kind)
            return [RANDOM_WEIGHT_CHECKPOINT, *names] if kind == "checkpoints" else names

        def checkpoint(self, name: str) -> tuple[Any, Any, Any]:
            if name == RANDOM_WEIGHT_CHECKPOINT:
                return handles
            return super().checkpoint(name)

    return RandomWeightModels(ModelResolver(settings.models_dir), device=settings.device, dtype=handles[0].dtype)


def _random_weight_runs(
    settings: Settings, shape: str, precisions: tuple[str, ...], rows: int, size: int, steps: int,
    say: Callable[[str], None],
) -> list[dict[str, Any]]:
    """Build the pipeline once; measure it per precision. FP8 quantizes the same transformer in place
    (the production PrecisionPolicy), with activation scales calibrated at this shape for ``scaled_mm``."""
    import torch

    from engine.fp8.backends import compile_blocks, uncompile_blocks
    from engine.models.checkpoint import handles_from_components
    from engine.runtime import Engine

    device = settings.device
    dtype = torch.bfloat16
    began = time.perf_counter()
    components = random_weight_components(shape, device, dtype)
    model, clip, vae = handles_from_components(components, RANDOM_WEIGHT_CHECKPOINT, device=device)
    say(f"  built random-weight components in {time.perf_counter() - began:.1f} s")
    on_cuda = device.startswith("cuda")
    gpu_only_rows = min(rows, GPU_ONLY_ROWS_ON_CUDA) if on_cuda else rows
    results = []
    for precision in precisions:
        transformer = model.transformer
        if precision == "fp8":
            transformer, recorded = _quantize(settings, transformer, shape, device)
        elif precision == "bf16":
            recorded = "bf16"
        else:
            raise ValueError(f"unknown precision {precision!r}; supported: bf16, fp8")
        if settings.compile and on_cuda:
            compile_blocks(transformer, mode=settings.compile_mode)
        handles = (dataclasses.replace(model, transformer=transformer, precision=recorded), clip, vae)
        run_settings = dataclasses.replace(
            settings, precision=precision, default_checkpoint=RANDOM_WEIGHT_CHECKPOINT,
            data_dir=str(Path(settings.data_dir) / precision),
        )
        engine = Engine(run_settings, models=_random_weight_models(run_settings, handles))
        try:
            results.append(_measure_pipeline(engine, run_settings, rows, size, steps, gpu_only_rows, say, label=recorded))
        finally:
            if settings.compile and on_cuda:
                uncompile_blocks(transformer)
            engine.executor.clear_cache()
            del engine
            gc.collect()
            if on_cuda:
                torch.cuda.empty_cache()
        model = dataclasses.replace(model, transformer=transformer)
    return results


def _quantize(settings: Settings, transformer: Any, shape: str, device: str) -> tuple[Any, str]:
    """The transformer through the production precision policy (fp8), calibrated when it computes in FP8."""
    import torch

    from engine.bench import make_inputs
    from engine.fp8.calibrate import calibrate
    from engine.fp8.policy import PrecisionPolicy, fp8_precision_string
    from engine.fp8.quantize import apply_activation_scales
    from engine.models.cache import LoadedTransformer

    policy = PrecisionPolicy("fp8", settings.fp8_backend, compile=False, data_dir=settings.data_dir,
                             fuse_qkv=settings.fp8_fuse_qkv)
    loaded = policy(LoadedTransformer(transformer, RANDOM_WEIGHT_CHECKPOINT, None, "default", "bf16"))
    transformer = loaded.transformer
    backend = loaded.precision.split("/")[1] if "/" in loaded.precision else ""
    if backend == "scaled_mm":
        inputs = make_inputs(shape, torch.device(device))

        def forward_at(timestep: str) -> None:
            batch = inputs["timestep"].shape[0]
            with torch.inference_mode():
                transformer(**{**inputs, "timestep": torch.full((batch,), float(timestep), device=device)},
                            return_dict=False)

        apply_activation_scales(transformer, calibrate(transformer, forward_at, ["999", "500", "50"]).scales)
        return transformer, fp8_precision_string(backend, transformer)
    return transformer, loaded.precision
