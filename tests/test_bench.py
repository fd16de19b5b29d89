"""The transformer benchmark runs end to end on a CPU (tiny config) and checks targets from its numbers."""

from __future__ import annotations

import io
import json

import pytest
import torch

from engine.bench import (
    SD35_LARGE_CONFIG,
    SD35_MEDIUM_CONFIG,
    VariantResult,
    check_targets,
    main,
    run_benchmark,
)
from engine.errors import Fp8Error


def test_tiny_benchmark_runs_on_cpu_and_prints_table_and_json():
    out = io.StringIO()
    report = run_benchmark("tiny", "cpu", repeats=2, warmup=1, out=out)
    names = [v["name"] for v in report["variants"]]
    assert names[:2] == ["bf16 eager", "bf16 compiled"]
    assert "fp8 weight_only eager" in names
    measured = [v for v in report["variants"] if v["ms"] is not None]
    assert {v["name"] for v in measured} >= {"bf16 eager", "fp8 weight_only eager"}
    assert all(not v["error"] for v in report["variants"])
    for v in measured:
        assert v["ms"] > 0 and len(v["ms_all"]) == 2 and v["rel_error"] is not None
        assert v["speedup_vs_bf16_eager"] == pytest.approx(measured[0]["ms"] / v["ms"])
    fp8 = [v for v in measured if v["precision"] == "fp8"]
    assert fp8 and all(v["rel_error"] < 0.03 for v in fp8)
    assert all(v["weight_bytes"] < measured[0]["weight_bytes"] for v in fp8)
    compiled = next(v for v in report["variants"] if v["name"] == "bf16 compiled")
    assert compiled["skipped"]  # compile defaults to off on a CPU, and says so
    # Fused q/k/v projections beside the same weights unfused: the same numbers, timed side by side.
    by_name = {v["name"]: v for v in report["variants"]}
    fused, unfused = by_name["fp8 scaled_mm static eager, fused qkv"], by_name["fp8 scaled_mm static eager"]
    assert fused["fused_qkv"] and not unfused["fused_qkv"] and fused["ms"] is not None
    assert fused["rel_error"] == pytest.approx(unfused["rel_error"], rel=0.01)
    assert fused["weight_bytes"] <= unfused["weight_bytes"]  # the three scales of a triple become one
    assert by_name["fp8 scaled_mm static compiled, fused qkv"]["skipped"]

    text = out.getvalue()
    assert "variant" in text and "targets (docs/PERFORMANCE.md)" in text
    assert " K params) on cpu" in text and "0.00 B" not in text  # the tiny model's size, readable
    assert {t["name"] for t in report["targets"]} == {
        "speedup_same_compile", "speedup_vs_bf16_eager", "memory_ratio", "rel_error", "aim_ms_per_step",
    }
    same = next(t for t in report["targets"] if t["name"] == "speedup_same_compile")
    assert same["passed"] is None  # no compiled variants: not decided either way


def test_target_checks_follow_the_measurements():
    def variant(name, precision, backend, compiled, ms, peak, err):
        return VariantResult(name, precision, backend, "static" if backend else "", compiled,
                             ms=ms, peak_bytes=peak, weight_bytes=peak, rel_error=err)

    fast = [
        variant("bf16 eager", "bf16", "", False, 185.0, 15_700, 0.0),
        variant("bf16 compiled", "bf16", "", True, 129.0, 15_500, 0.018),
        variant("fp8 scaled_mm static compiled", "fp8", "scaled_mm", True, 100.0, 8_100, 0.021),
    ]
    checks = {c.name: c for c in check_targets(fast, "large", torch.device("cpu"))}
    assert checks["speedup_same_compile"].passed is True
    assert checks["speedup_vs_bf16_eager"].passed is True
    assert checks["memory_ratio"].passed is True and checks["rel_error"].passed is True
    slow = fast[:2] + [variant("fp8 scaled_mm static compiled", "fp8", "scaled_mm", True, 120.0, 9_000, 0.05)]
    checks = {c.name: c for c in check_targets(slow, "large", torch.device("cpu"))}
    assert checks["speedup_same_compile"].passed is False
    assert checks["speedup_vs_bf16_eager"].passed is False
    assert checks["memory_ratio"].passed is False and checks["rel_error"].passed is False


def test_published_sd35_shapes():
    assert (SD35_LARGE_CONFIG["num_layers"], SD35_LARGE_CONFIG["num_attention_heads"]) == (38, 38)
    assert SD35_LARGE_CONFIG["caption_projection_dim"] == 38 * 64
    assert SD35_MEDIUM_CONFIG["caption_projection_dim"] == 24 * 64
    assert SD35_MEDIUM_CONFIG["dual_attention_layers"] == tuple(range(13))


def test_unknown_backend_and_size_are_errors():
    with pytest.raises(Fp8Error, match="supported"):
        run_benchmark("tiny", "cpu", backends=["int4"], quiet=True)
    with pytest.raises(Fp8Error, match="large, medium, tiny"):
        run_benchmark("huge", "cpu", quiet=True)


def test_cli_writes_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert main(["--size", "tiny", "--device", "cpu", "--repeats", "1", "--warmup", "1",
                 "--backends", "weight_only", "--json", str(path)]) == 0
    reports = json.loads(path.read_text())
    assert [r["size"] for r in reports] == ["tiny"]
    assert "fp8 weight_only eager" in capsys.readouterr().out


def test_quick_run_times_only_what_the_targets_compare():
    report = run_benchmark("tiny", "cpu", repeats=1, warmup=1, quick=True, quiet=True)
    assert [v["name"] for v in report["variants"]] == [
        "bf16 eager", "bf16 compiled", "fp8 scaled_mm static eager", "fp8 scaled_mm static compiled",
        "fp8 scaled_mm static eager, fused qkv", "fp8 scaled_mm static compiled, fused qkv",
    ]
    assert report["compile_mode"] is None  # nothing compiles on a CPU by default


def test_compile_modes_are_checked_everywhere(tmp_path, models_dir):
    from engine.runtime import Engine
    from engine.settings import Settings

    with pytest.raises(Fp8Error, match="supported: default, max-autotune-no-cudagraphs"):
        run_benchmark("tiny", "cpu", repeats=1, compile_mode="fastest", quiet=True)
    with pytest.raises(Fp8Error, match="compile_mode"):
        Engine(Settings(data_dir=str(tmp_path), models_dir=str(models_dir), compile_mode="fastest"))
