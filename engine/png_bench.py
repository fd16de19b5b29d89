"""``python app.py bench --png``: the engine's PNG writer against Pillow's encoder on the same pictures.

Every saved image is encoded on the CPU beside the GPU, so the encoder's CPU time per picture is part of
a row's cost (``bench --e2e`` reports it as CPU-side work). This benchmark times the encoders side by side
on three kinds of 1024² picture, synthesised so the run needs no files:

- ``noise``: uniform random pixels, what random-weight models produce; zlib's worst case.
- ``studio``: a product-shot-like picture: soft gradient backdrop, a shaded object with soft edges, sensor
  grain. Most of what a catalogue batch makes.
- ``flat``: solid background with hard-edged shapes and stripes, like graphics or a cut-out on white.

For each it reports the median wall and CPU milliseconds, the file size, the ratios against Pillow at the
same level, and whether the file decodes to the very same pixels.
"""

from __future__ import annotations

import io
import statistics
import time
from typing import Any

import numpy as np

from engine.png import encode_png, pillow_png

# (label, how, level): "engine" is engine.png.encode_png, "pillow" its Pillow path (pillow_png) at any level
ENCODERS = (
    ("Pillow, level 1", "pillow", 1),
    ("engine, level 1 (default)", "engine", 1),
    ("Pillow, level 4 (ComfyUI's)", "pillow", 4),
)
BASELINE = "Pillow, level 1"


def synthetic_pictures(size: int = 1024, seed: int = 0) -> dict[str, np.ndarray]:
    """The three kinds of picture described in the module docstring, ``size`` × ``size`` RGB uint8."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    backdrop = np.stack([0.92 - 0.25 * y, 0.90 - 0.22 * y, 0.88 - 0.15 * y], axis=-1)
    distance = np.sqrt((x - 0.5) ** 2 + ((y - 0.55) * 1.3) ** 2)
    inside = np.clip((0.28 - distance) * 60.0, 0.0, 1.0)[..., None]  # soft edge over a few pixels
    shading = (0.35 + 0.55 * (1.0 - x) * (1.0 - 0.6 * y))[..., None] * np.array([0.75, 0.18, 0.12], np.float32)
    studio = (1.0 - inside) * backdrop + inside * shading
    studio = studio + rng.normal(0.0, 0.012, studio.shape).astype(np.float32)
    flat = np.ones((size, size, 3), np.float32)
    flat[size // 4 : 3 * size // 4, size // 3 : 2 * size // 3] = (0.1, 0.3, 0.8)
    flat[size // 8 : size // 6, :: 8] = 0.0  # a band of thin stripes, as lettering would make
    return {
        "noise": rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
        "studio": (np.clip(studio, 0.0, 1.0) * 255).astype(np.uint8),
        "flat": (flat * 255).astype(np.uint8),
    }


def _decoded(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def run_png_benchmark(size: int = 1024, repeats: int = 5, *, echo: bool = True) -> dict[str, Any]:
    """Time every encoder of :data:`ENCODERS` on every picture of :func:`synthetic_pictures`."""
    text = {"prompt": '{"3": {"class_type": "KSampler"}}'}
    results = []
    for kind, pixels in synthetic_pictures(size).items():
        baseline_ms = baseline_bytes = None
        for label, how, level in ENCODERS:
            encode = encode_png if how == "engine" else pillow_png
            walls, cpus = [], []
            for _ in range(repeats + 1):  # the first run warms caches and is not counted
                started, started_cpu = time.perf_counter(), time.thread_time()
                data = encode(pixels, text, level)
                walls.append(time.perf_counter() - started)
                cpus.append(time.thread_time() - started_cpu)
            wall_ms, cpu_ms = 1000 * statistics.median(walls[1:]), 1000 * statistics.median(cpus[1:])
            if label == BASELINE:
                baseline_ms, baseline_bytes = cpu_ms, len(data)
            results.append({
                "picture": kind, "encoder": label, "level": level, "wall_ms": round(wall_ms, 2),
                "cpu_ms": round(cpu_ms, 2), "kib": round(len(data) / 1024, 1),
                "cpu_vs_baseline": round(cpu_ms / baseline_ms, 3) if baseline_ms else None,
                "size_vs_baseline": round(len(data) / baseline_bytes, 3) if baseline_bytes else None,
                "same_pixels": bool(np.array_equal(_decoded(data), pixels)),
            })
    report = {"size": size, "repeats": repeats, "baseline": BASELINE, "results": results}
    if echo:
        print(format_png_table(report))
    return report


def format_png_table(report: dict[str, Any]) -> str:
    """The report as a fixed-width table, one line per picture and encoder."""
    lines = [f"PNG encoding, {report['size']}² RGB, median of {report['repeats']}; ratios against {report['baseline']}",
             f"{'picture':8} {'encoder':28} {'wall ms':>8} {'CPU ms':>8} {'KiB':>8} {'CPU x':>6} {'size x':>6} same pixels"]
    ratio = lambda value: "     -" if value is None else f"{value:6.2f}"  # noqa: E731 - a baseline too fast to time
    for r in report["results"]:
        lines.append(f"{r['picture']:8} {r['encoder']:28} {r['wall_ms']:8.1f} {r['cpu_ms']:8.1f} {r['kib']:8.1f} "
                     f"{ratio(r['cpu_vs_baseline'])} {ratio(r['size_vs_baseline'])} "
                     f"{'yes' if r['same_pixels'] else 'NO'}")
    return "\n".join(lines)
