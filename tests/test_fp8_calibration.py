"""Calibration: per-layer activation maxima -> static scales -> sidecar tied to the checkpoint hash."""

from __future__ import annotations

import copy

import pytest
import torch

from engine.bench import build_transformer, make_inputs, relative_error
from engine.errors import Fp8Error
from engine.fp8 import (
    DEFAULT_PROMPTS_PATH,
    calibrate,
    checkpoint_sha256,
    find_sidecar,
    load_calibration_prompts,
    load_sidecar,
    make_prompt_runner,
    quantize_transformer,
    save_sidecar,
    sidecar_path_for,
)


@pytest.fixture(scope="module")
def tiny():
    model = build_transformer("tiny", torch.device("cpu"), seed=0, dtype=torch.float32)
    inputs = make_inputs("tiny", torch.device("cpu"), dtype=torch.float32)
    return model, inputs


def timestep_runner(model, inputs):
    """A stand-in sampler: each "prompt" is a timestep, as a few sampler steps would visit."""

    def run_forward(prompt: str) -> None:
        model(**inputs | {"timestep": torch.full((2,), float(prompt))})

    return run_forward


def test_calibrated_scales_round_trip_through_the_sidecar(tiny, tmp_path):
    model, inputs = tiny
    checkpoint = tmp_path / "tiny.safetensors"
    checkpoint.write_bytes(b"stand-in checkpoint bytes")
    sha = checkpoint_sha256(checkpoint)

    result = calibrate(model, timestep_runner(model, inputs), ["999", "500", "20"])
    assert not result.uncovered and result.prompts == 3
    assert "transformer_blocks.0.attn.to_q" in result.scales
    assert "proj_out" not in result.scales  # kept in BF16: not a quantization target
    assert all(calls == 3 for calls in result.calls.values())

    path = save_sidecar(sidecar_path_for(checkpoint), result.scales, sha, extra_metadata={"prompts": "3"})
    assert path.name == "tiny.fp8scales.safetensors"
    loaded = load_sidecar(path, sha)
    assert loaded.keys() == result.scales.keys()
    assert all(torch.equal(loaded[k], result.scales[k]) for k in loaded)
    assert find_sidecar(checkpoint, sha).keys() == loaded.keys()

    quantized = copy.deepcopy(model)
    report = quantize_transformer(quantized, "scaled_mm", scales=loaded, compute_dtype=torch.float32)
    assert report.static_scales == len(report.quantized) == len(loaded)
    assert quantized.transformer_blocks[0].attn.to_q.activation_scaling == "static"
    with torch.no_grad():
        reference = model(**inputs).sample
        out = quantized(**inputs).sample
    assert relative_error(out, reference) < 0.03


def test_calibrating_a_quantized_model_hooks_its_fp8_layers(tiny):
    model, inputs = tiny
    quantized = copy.deepcopy(model)
    quantize_transformer(quantized, "weight_only", compute_dtype=torch.float32)
    result = calibrate(quantized, timestep_runner(quantized, inputs), ["500"])
    assert set(result.scales) == {n for n, m in quantized.named_modules() if type(m).__name__ == "Fp8Linear"}


def test_sidecar_of_another_checkpoint_is_refused(tmp_path):
    path = save_sidecar(tmp_path / "a.fp8scales.safetensors", {"layer": torch.tensor(0.01)}, "a" * 64)
    with pytest.raises(Fp8Error) as info:
        load_sidecar(path, "b" * 64)
    assert info.value.details["expected_sha256"] == "b" * 64
    assert info.value.details["found_sha256"] == "a" * 64
    assert "recalibrate" in info.value.message


def test_a_file_that_is_not_a_sidecar_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(Fp8Error, match="not an FP8 scale sidecar"):
        load_sidecar(tmp_path / "other.safetensors", "a" * 64)
    assert find_sidecar(tmp_path / "missing.safetensors", "a" * 64) is None


def test_checkpoint_hash_covers_folder_contents(tmp_path):
    folder = tmp_path / "model"
    (folder / "transformer").mkdir(parents=True)
    (folder / "transformer" / "w.safetensors").write_bytes(b"1")
    before = checkpoint_sha256(folder)
    (folder / "transformer" / "w.safetensors").write_bytes(b"2")
    assert checkpoint_sha256(folder) != before
    assert sidecar_path_for(folder) == tmp_path / "model.fp8scales.safetensors"


def test_default_prompt_set_and_runner(tmp_path):
    prompts = load_calibration_prompts()
    assert DEFAULT_PROMPTS_PATH.name == "calibration_prompts.txt"
    assert len(prompts) == 32 and all(len(p) > 20 for p in prompts)
    own = tmp_path / "mine.txt"
    own.write_text("# comment\n\nfirst prompt\nsecond prompt\n")
    assert load_calibration_prompts(own) == ["first prompt", "second prompt"]
    own.write_text("# only a comment\n")
    with pytest.raises(Fp8Error, match="no prompts"):
        load_calibration_prompts(own)

    calls = []
    run = make_prompt_runner(lambda **kw: calls.append(kw), steps=4, seed=7, width=512)
    run("a red shoe")
    assert calls == [{"prompt": "a red shoe", "steps": 4, "seed": 7, "width": 512}]


def test_calibrate_needs_prompts(tiny):
    with pytest.raises(Fp8Error, match="at least one prompt"):
        calibrate(tiny[0], lambda p: None, [])
