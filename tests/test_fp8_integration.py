"""FP8 wired end to end: settings precision, UNETLoader weight_dtype, fp8_scaled files, calibration sidecars."""

from __future__ import annotations

import copy
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import app
from engine.errors import Fp8Error, ModelLoadError
from engine.fp8 import (
    FP8_DTYPE,
    BackendChoice,
    Fp8Linear,
    PrecisionPolicy,
    calibrate_checkpoint,
    fp8_layers,
    quantize_transformer,
    save_fp8_scaled,
    save_sidecar,
    sidecar_path_for,
)
from engine.fp8.sidecar import read_sidecar_metadata
from engine.models import ModelCache, ModelResolver
from engine.models.checkpoint import checkpoint_metadata, write_checkpoint
from engine.runtime import Engine, build_model_cache
from engine.settings import DEMO_CHECKPOINT, Settings

FALLBACK_MESSAGE = "FP8 compute needs a CUDA GPU with compute capability >= 8.9"


def grant_scaled_mm(requested, device):
    """A backend chooser that lets FP8 compute run on the CPU (``torch._scaled_mm`` runs there, slowly)."""
    backend = "scaled_mm" if requested == "auto" else requested
    return BackendChoice(backend, requested, str(device), fp8_compute=backend != "weight_only")


def settings_for(tmp_path, models, **overrides) -> Settings:
    return Settings(data_dir=str(tmp_path / "data"), models_dir=str(models), device="cpu", **overrides)


def engine_with(settings: Settings, choose=None) -> Engine:
    """The engine the settings describe; ``choose`` swaps the hardware's backend choice."""
    if choose is None:
        return Engine(settings)
    policy = PrecisionPolicy.from_settings(settings, choose=choose)
    cache = ModelCache(ModelResolver(settings.models_dir, allow_hub=False), device="cpu", transformer_postprocess=policy)
    return Engine(settings, models=cache)


def txt2img(ckpt=DEMO_CHECKPOINT, unet=None, weight_dtype="default", seed=1):
    """SD3.5's basic graph at 64x64, 2 steps; ``unet`` takes the transformer from a UNETLoader."""
    workflow = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red shoe on a table", "clip": ["1", 1]}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "5": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {
            "model": ["2", 0] if unet else ["1", 0], "positive": ["3", 0], "negative": ["4", 0],
            "latent_image": ["5", 0], "seed": seed, "steps": 2, "cfg": 4.0, "sampler_name": "euler",
            "scheduler": "sgm_uniform", "denoise": 1.0}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "fp8"}},
    }
    if unet:
        workflow["2"] = {"class_type": "UNETLoader", "inputs": {"unet_name": unet, "weight_dtype": weight_dtype}}
    return workflow


def pixels(result) -> np.ndarray:
    with Image.open(result.images[0].path) as image:
        return np.asarray(image.convert("RGB")).astype(np.float32)


@pytest.fixture(scope="module")
def models(tmp_path_factory, demo_checkpoint_file, demo_components):
    """A writable models folder: the demo checkpoint, its bare transformer as a UNET file, an fp8_scaled UNET."""
    root = tmp_path_factory.mktemp("fp8_models")
    (root / "checkpoints").mkdir()
    (root / "diffusion_models").mkdir()
    shutil.copyfile(demo_checkpoint_file, root / "checkpoints" / "sd35_demo_tiny.safetensors")
    write_checkpoint(root / "diffusion_models" / "demo_unet.safetensors", transformer=demo_components["transformer"])
    quantized = copy.deepcopy(demo_components["transformer"])
    quantize_transformer(quantized, "weight_only")
    save_fp8_scaled(quantized, root / "diffusion_models" / "demo_unet_fp8_scaled.safetensors")
    _write_comfy_fp8_scaled(demo_checkpoint_file, root / "checkpoints" / "demo_fp8_scaled.safetensors")
    return root


@pytest.fixture(scope="module")
def fp32_image(tmp_path_factory, models):
    engine = Engine(settings_for(tmp_path_factory.mktemp("fp32"), models, precision="fp32"))
    return pixels(engine.run(txt2img()))


def _write_comfy_fp8_scaled(source: Path, dest: Path) -> Path:
    """The demo checkpoint with its joint-block linears stored as ComfyUI's legacy fp8_scaled files do."""
    state = load_file(str(source))
    fmax = torch.finfo(FP8_DTYPE).max
    for key in list(state):
        if key.startswith("model.diffusion_model.joint_blocks.") and key.endswith(".weight") and state[key].ndim == 2:
            base = key[: -len(".weight")]
            scale = state[key].abs().max().float() / fmax
            state[key] = (state[key] / scale).to(FP8_DTYPE)
            state[f"{base}.scale_weight"] = scale
            state[f"{base}.scale_input"] = torch.tensor(1.0)  # legacy "no static scale"
    state["model.diffusion_model.scaled_fp8"] = torch.empty(0, dtype=FP8_DTYPE)
    with safe_open(str(source), "pt") as handle:
        metadata = handle.metadata()
    save_file(state, str(dest), metadata=metadata)
    return dest


# ------------------------------------------------------------------------------- settings precision


def test_precision_fp8_on_cpu_is_weight_only_with_a_message(tmp_path, models, fp32_image, caplog):
    engine = Engine(settings_for(tmp_path, models, precision="fp8"))
    with caplog.at_level(logging.WARNING, logger="engine.fp8"):
        result = engine.run(txt2img())
    assert result.record["precision"] == "fp8_e4m3fn/weight_only"
    assert FALLBACK_MESSAGE in caplog.text and "weight_only" in caplog.text
    model = engine.models.checkpoint(DEMO_CHECKPOINT)[0]
    layers = fp8_layers(model.transformer)
    assert layers and all(layer.backend == "weight_only" for layer in layers.values())
    assert not isinstance(model.transformer.proj_out, Fp8Linear)  # sensitive layers stay high precision
    assert engine.models.loaded()[0]["precision"] == "fp8_e4m3fn/weight_only"
    image = pixels(result)
    assert image.std() > 1.0 and np.abs(image - fp32_image).mean() < 2.0  # valid, and close to fp32


def test_unknown_precision_settings_name_the_supported_ones(tmp_path, models):
    with pytest.raises(ModelLoadError, match="supported: auto, bf16, fp16, fp32, fp8"):
        build_model_cache(settings_for(tmp_path, models, precision="int8"))
    with pytest.raises(Fp8Error, match="supported: auto, scaled_mm, transformer_engine, weight_only"):
        build_model_cache(settings_for(tmp_path, models, precision="fp8", fp8_backend="cublas"))


def test_compile_on_cpu_is_skipped_with_a_message(tmp_path, models, caplog):
    engine = Engine(settings_for(tmp_path, models, precision="fp32", compile=True))
    with caplog.at_level(logging.INFO, logger="engine.fp8"):
        model = engine.models.checkpoint(DEMO_CHECKPOINT)[0]
    assert model.precision == "fp32" and "compile is for CUDA devices" in caplog.text


# ------------------------------------------------------------------------------- UNETLoader weight_dtype


def test_unet_loader_weight_dtypes_record_truthful_precision(tmp_path, models, fp32_image, caplog):
    engine = Engine(settings_for(tmp_path, models))  # precision auto: FP8 only where the workflow asks
    assert engine.run(txt2img(unet="demo_unet.safetensors")).record["precision"] == "fp32"
    storage = engine.run(txt2img(unet="demo_unet.safetensors", weight_dtype="fp8_e4m3fn"))
    assert storage.record["precision"] == "fp8_e4m3fn/weight_only"
    assert "compute capability" not in caplog.text  # storage only: nothing was refused
    with caplog.at_level(logging.WARNING, logger="engine.fp8"):
        fast = engine.run(txt2img(unet="demo_unet.safetensors", weight_dtype="fp8_e4m3fn_fast"))
    assert fast.record["precision"] == "fp8_e4m3fn/weight_only"  # the CPU fallback, said as it is
    assert FALLBACK_MESSAGE in caplog.text and "fp8_e4m3fn_fast" not in fast.record["precision"]
    # weight_dtype is part of the cache key: three transformers, each loaded once
    kinds = [e["precision"] for e in engine.models.loaded() if e["kind"] == "diffusion_model"]
    assert sorted(kinds) == ["fp32", "fp8_e4m3fn/weight_only", "fp8_e4m3fn/weight_only"]
    before = engine.models.load_count
    engine.models.diffusion_model("demo_unet.safetensors", weight_dtype="fp8_e4m3fn_fast")
    assert engine.models.load_count == before
    assert np.abs(pixels(fast) - fp32_image).mean() < 2.0


def test_unet_loader_fast_runs_fp8_compute_where_the_hardware_can(tmp_path, models, fp32_image):
    engine = engine_with(settings_for(tmp_path, models), choose=grant_scaled_mm)
    result = engine.run(txt2img(unet="demo_unet.safetensors", weight_dtype="fp8_e4m3fn_fast"))
    assert result.record["precision"] == "fp8_e4m3fn/scaled_mm/dynamic"
    assert np.abs(pixels(result) - fp32_image).mean() < 4.0


def test_unet_loader_refuses_e5m2(tmp_path, models):
    from engine.errors import WorkflowInvalid

    engine = Engine(settings_for(tmp_path, models))
    with pytest.raises(WorkflowInvalid, match="fp8_e5m2"):
        engine.run(txt2img(unet="demo_unet.safetensors", weight_dtype="fp8_e5m2"))


# ------------------------------------------------------------------------------- fp8_scaled files


def assert_fp8_without_float_copy(transformer):
    layers = fp8_layers(transformer)
    assert layers
    for layer in layers.values():
        assert layer.weight.dtype == FP8_DTYPE
        float_tensors = [t for t in list(layer.parameters()) + list(layer.buffers()) if t.element_size() >= 2]
        assert all(t.numel() < layer.in_features * layer.out_features for t in float_tensors)  # bias, scales
    assert not any(t.is_meta for t in list(transformer.parameters()) + list(transformer.buffers()))


@pytest.fixture()
def no_dequantizing(monkeypatch):
    """Fail if any load dequantizes FP8 weights into a float copy."""
    import engine.models.checkpoint as checkpoint

    def refuse(*args, **kwargs):
        raise AssertionError("FP8 weights were dequantized into a float copy")

    monkeypatch.setattr(checkpoint, "_dequantize_fp8", refuse)


def test_comfy_fp8_scaled_checkpoint_loads_into_fp8_layers(tmp_path, models, fp32_image, no_dequantizing):
    engine = Engine(settings_for(tmp_path, models))
    model, clip, vae = engine.models.checkpoint("demo_fp8_scaled.safetensors")
    assert model.precision == "fp8_e4m3fn/weight_only" and clip is not None and vae is not None
    transformer = model.transformer
    assert_fp8_without_float_copy(transformer)
    assert isinstance(transformer.transformer_blocks[0].attn.to_q, Fp8Linear)  # split from the fused qkv
    assert not isinstance(transformer.context_embedder, Fp8Linear)  # stored in float by the file
    result = engine.run(txt2img(ckpt="demo_fp8_scaled.safetensors"))
    assert result.record["precision"] == "fp8_e4m3fn/weight_only"
    assert np.abs(pixels(result) - fp32_image).mean() < 2.0


def test_fp8_scaled_unet_file_keeps_fp8_and_takes_the_compute_backend(tmp_path, models, fp32_image,
                                                                       no_dequantizing):
    engine = engine_with(settings_for(tmp_path, models, precision="fp8"), choose=grant_scaled_mm)
    result = engine.run(txt2img(unet="demo_unet_fp8_scaled.safetensors"))
    assert result.record["precision"] == "fp8_e4m3fn/scaled_mm/dynamic"
    transformer = engine.models.diffusion_model("demo_unet_fp8_scaled.safetensors").transformer
    assert_fp8_without_float_copy(transformer)
    assert {layer.backend for layer in fp8_layers(transformer).values()} == {"scaled_mm"}
    assert np.abs(pixels(result) - fp32_image).mean() < 4.0


def test_cache_without_fp8_module_still_dequantizes(models):
    cache = ModelCache(ModelResolver(models, allow_hub=False), device="cpu")
    model = cache.checkpoint("demo_fp8_scaled.safetensors")[0]
    assert model.precision == "fp32" and not fp8_layers(model.transformer)


# ------------------------------------------------------------------------------- calibration sidecars


def test_calibrate_file_round_trip_static_scales(tmp_path, models, fp32_image):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# two prompts\na red shoe\na glass bottle on stone\n")
    ckpt = models / "checkpoints" / "sd35_demo_tiny.safetensors"
    settings = settings_for(tmp_path, models, precision="fp8")
    path = calibrate_checkpoint(settings, "sd35_demo_tiny.safetensors", prompts_file=prompts, steps=2, size=32,
                                progress=False)
    try:
        assert path == sidecar_path_for(ckpt)
        meta = read_sidecar_metadata(path)
        assert meta["prompts"] == "2" and meta["checkpoint_sha256"] == Engine(settings).models.file_sha256(ckpt)

        computed = engine_with(settings, choose=grant_scaled_mm)
        result = computed.run(txt2img(ckpt="sd35_demo_tiny.safetensors"))
        assert result.record["precision"] == "fp8_e4m3fn/scaled_mm/static"
        assert np.abs(pixels(result) - fp32_image).mean() < 4.0

        # On this CPU: weight_only, the scales loaded (checked against the hash) but not used by the matmuls.
        stored = Engine(settings).models.checkpoint("sd35_demo_tiny.safetensors")[0]
        assert stored.precision == "fp8_e4m3fn/weight_only"
        assert {layer.activation_scaling for layer in fp8_layers(stored.transformer).values()} == {"static"}
    finally:
        path.unlink()


def test_calibrate_command_for_the_demo(tmp_path, models):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a lighthouse at dusk\n")
    flags = ["--data-dir", str(tmp_path / "data"), "--models-dir", str(models), "--device", "cpu"]
    code = app.main(["calibrate", "--checkpoint", DEMO_CHECKPOINT, "--prompts", str(prompts), "--steps", "1",
                     "--size", "32", *flags])
    sidecar = tmp_path / "data" / "fp8" / f"{DEMO_CHECKPOINT}.fp8scales.safetensors"
    assert code == 0 and sidecar.is_file()
    engine = engine_with(settings_for(tmp_path, models, precision="fp8"), choose=grant_scaled_mm)
    assert engine.run(txt2img()).record["precision"] == "fp8_e4m3fn/scaled_mm/static"


def test_sidecar_of_another_checkpoint_is_refused(tmp_path, models):
    other = models / "checkpoints" / "other.safetensors"
    shutil.copyfile(models / "checkpoints" / "demo_fp8_scaled.safetensors", other)
    save_sidecar(sidecar_path_for(other), {"transformer_blocks.0.attn.to_q": torch.tensor(0.01)}, "ab" * 32)
    try:
        engine = Engine(settings_for(tmp_path, models, precision="fp8"))
        with pytest.raises(Fp8Error, match="was calibrated for checkpoint abababababab") as info:
            engine.run(txt2img(ckpt="other.safetensors"))
        assert "recalibrate" in info.value.message and info.value.details["found_sha256"] == "ab" * 32
    finally:
        sidecar_path_for(other).unlink()
        other.unlink()


# ------------------------------------------------------------------------------- model-layer fixes


def test_write_checkpoint_with_tied_t5_weights(tmp_path, demo_components):
    from transformers import T5Config, T5EncoderModel

    from engine.models.checkpoint import _SafetensorsFile, _build_t5

    torch.manual_seed(0)
    t5 = T5EncoderModel(T5Config(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2)).eval()
    path = write_checkpoint(tmp_path / "with_t5.safetensors", transformer=demo_components["transformer"], t5=t5)
    part = _SafetensorsFile(path).part("text_encoders.t5xxl.transformer.")
    assert "shared.weight" in part and "encoder.embed_tokens.weight" not in part
    loaded = _build_t5(part, "cpu", torch.float32, path)
    ids = torch.tensor([[3, 5, 7, 1]])
    with torch.no_grad():
        assert torch.allclose(loaded(ids).last_hidden_state, t5(ids).last_hidden_state, atol=1e-6)
    config = json.loads(checkpoint_metadata(demo_components["transformer"])["engine.config"])
    assert config["transformer"]["joint_attention_dim"] == 96


def test_text_encoders_find_tokenizers_saved_under_models(tmp_path, demo_checkpoint_file):
    from engine.models.demo import write_demo_tokenizer

    state = load_file(str(demo_checkpoint_file))
    with safe_open(str(demo_checkpoint_file), "pt") as handle:
        # without the demo marker the tokenizer must come from models/text_encoders/tokenizers/<role>/
        metadata = {k: v for k, v in handle.metadata().items() if k != "engine.demo"}
    (tmp_path / "text_encoders").mkdir()
    for role in ("clip_l", "clip_g"):
        prefix = f"text_encoders.{role}.transformer."
        part = {k: v for k, v in state.items() if k.startswith(prefix)}
        save_file(part, str(tmp_path / "text_encoders" / f"{role}.safetensors"), metadata=metadata)
        write_demo_tokenizer(tmp_path / "text_encoders" / "tokenizers" / role)
    cache = ModelCache(ModelResolver(tmp_path, allow_hub=False), device="cpu")
    clip = cache.text_encoders(["clip_l.safetensors", "clip_g.safetensors"])
    assert clip.tokenizer_l("a shoe").input_ids[0] == clip.tokenizer_l.bos_token_id


def test_a_transformer_only_file_calibrates_with_text_encoders_named_beside_it(models, demo_checkpoint_file, tmp_path):
    from engine.fp8.calibrate import calibrate_checkpoint
    from engine.models.demo import write_demo_tokenizer

    state = load_file(str(demo_checkpoint_file))
    with safe_open(str(demo_checkpoint_file), "pt") as handle:
        metadata = {k: v for k, v in handle.metadata().items() if k != "engine.demo"}
    (models / "text_encoders").mkdir(exist_ok=True)
    for role in ("clip_l", "clip_g"):
        prefix = f"text_encoders.{role}.transformer."
        part = {k: v for k, v in state.items() if k.startswith(prefix)}
        save_file(part, str(models / "text_encoders" / f"{role}.safetensors"), metadata=metadata)
        write_demo_tokenizer(models / "text_encoders" / "tokenizers" / role)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red shoe\na blue mug\n")
    settings = Settings(data_dir=str(tmp_path / "data"), models_dir=str(models), device="cpu")
    with pytest.raises(Fp8Error, match="--text-encoders"):  # as SD3.5 Large is published: no CLIP inside
        calibrate_checkpoint(settings, "demo_unet.safetensors", prompts_file=prompts, steps=1, size=32, progress=False)
    path = calibrate_checkpoint(settings, "demo_unet.safetensors", prompts_file=prompts, steps=1, size=32,
                                progress=False, text_encoders=["clip_l.safetensors", "clip_g.safetensors"])
    assert path == models / "diffusion_models" / "demo_unet.fp8scales.safetensors"
    assert read_sidecar_metadata(path)["checkpoint"] == "demo_unet.safetensors"
    path.unlink()  # the module's models folder is shared: later FP8 loads must not pick these scales up
