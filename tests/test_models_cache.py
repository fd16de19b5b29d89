"""ModelResolver (names -> files, traversal refused) and ModelCache (load once, report, free)."""

from __future__ import annotations

import os
import threading

import pytest

from engine.errors import ModelLoadError, ModelNotFound
from engine.models import ModelCache, ModelResolver
from engine.settings import DEMO_CHECKPOINT


@pytest.fixture()
def resolver(models_dir):
    return ModelResolver(models_dir, allow_hub=False)


def test_available_lists_demo_and_files_including_legacy_folders(tmp_path, demo_checkpoint_file):
    (tmp_path / "checkpoints" / "sub").mkdir(parents=True)
    os.link(demo_checkpoint_file, tmp_path / "checkpoints" / "sub" / "copy.safetensors")
    (tmp_path / "checkpoints" / "notes.txt").write_text("not a model")
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "legacy.safetensors").write_bytes(b"")
    resolver = ModelResolver(tmp_path, allow_hub=False)
    assert resolver.available("checkpoints") == [DEMO_CHECKPOINT, "sub/copy.safetensors"]
    assert resolver.available("diffusion_models") == ["legacy.safetensors"]
    assert resolver.resolve("diffusion_models", "legacy.safetensors").path == tmp_path / "unet" / "legacy.safetensors"
    assert resolver.resolve("checkpoints", "sub/copy.safetensors").source == "file"
    assert resolver.resolve("checkpoints", DEMO_CHECKPOINT).is_demo


@pytest.mark.parametrize("name", ["../secret.safetensors", "sub/../../secret.safetensors", "/etc/passwd"])
def test_path_traversal_is_refused(resolver, models_dir, name):
    (models_dir.parent / "secret.safetensors").write_bytes(b"")
    with pytest.raises(ModelNotFound) as info:
        resolver.resolve("checkpoints", name)
    assert "refused" in str(info.value)


def test_not_found_lists_what_was_searched_and_available(resolver, models_dir):
    with pytest.raises(ModelNotFound) as info:
        resolver.resolve("checkpoints", "sd3.5_large.safetensors")
    error = info.value
    assert error.available == [DEMO_CHECKPOINT, "sd35_demo_tiny.safetensors"]
    assert str(models_dir / "checkpoints" / "sd3.5_large.safetensors") in error.searched
    assert "sd35_demo_tiny.safetensors" in str(error)
    with pytest.raises(ValueError, match="supported"):
        resolver.available("upscalers")


def test_unknown_repo_id_offline_is_not_found(models_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    resolver = ModelResolver(models_dir, allow_hub=True)
    with pytest.raises(ModelNotFound) as info:
        resolver.resolve("checkpoints", "nobody/no-such-model")
    assert any("Hugging Face cache" in s for s in info.value.searched)


def test_diffusers_folder_resolves(tmp_path):
    folder = tmp_path / "checkpoints" / "my-sd35"
    folder.mkdir(parents=True)
    (folder / "model_index.json").write_text("{}")
    resolver = ModelResolver(tmp_path, allow_hub=False)
    assert "my-sd35" in resolver.available("checkpoints")
    assert resolver.resolve("checkpoints", "my-sd35").source == "diffusers"


def test_cache_loads_once_reports_and_frees(resolver, tmp_path, demo_checkpoint_file):
    cache = ModelCache(resolver, device="cpu", hash_cache_path=tmp_path / "hashes.json")
    first = cache.checkpoint("sd35_demo_tiny.safetensors")
    assert cache.checkpoint("sd35_demo_tiny.safetensors") is first
    assert cache.load_count == 1
    model, clip, vae = first
    assert model.sha256 == cache.file_sha256(demo_checkpoint_file)
    from engine.models.demo import demo_sha256

    assert model.sha256 == demo_sha256()  # the file and the built-in demo hash the same
    demo = cache.checkpoint(DEMO_CHECKPOINT)
    assert demo[0].sha256 == model.sha256 and demo[0].is_demo and cache.load_count == 2
    entries = {e["name"]: e for e in cache.loaded()}
    assert entries["sd35_demo_tiny.safetensors"]["bytes"] > 0
    assert entries["sd35_demo_tiny.safetensors"]["precision"] == "fp32"
    assert entries["sd35_demo_tiny.safetensors"]["device"] == "cpu"
    assert cache.memory_bytes() == sum(e["bytes"] for e in entries.values())
    assert (tmp_path / "hashes.json").is_file()

    assert cache.free("sd35_demo_tiny.safetensors") == 1
    assert [e["name"] for e in cache.loaded()] == [DEMO_CHECKPOINT]
    again = cache.checkpoint("sd35_demo_tiny.safetensors")
    assert again is not first and cache.load_count == 3
    assert cache.free() == 2 and cache.loaded() == [] and cache.memory_bytes() == 0


def test_concurrent_requests_load_once(resolver):
    cache = ModelCache(resolver, device="cpu")
    results = []
    threads = [threading.Thread(target=lambda: results.append(cache.checkpoint(DEMO_CHECKPOINT))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert cache.load_count == 1 and all(r is results[0] for r in results)


def test_diffusion_model_weight_dtype_and_postprocess_hook(resolver):
    cache = ModelCache(resolver, device="cpu")
    with pytest.raises(ModelLoadError, match="supported"):
        cache.diffusion_model(DEMO_CHECKPOINT, weight_dtype="int4")
    with pytest.raises(ModelLoadError, match="FP8 module"):
        cache.diffusion_model(DEMO_CHECKPOINT, weight_dtype="fp8_e4m3fn")

    seen = []

    def postprocess(loaded):
        seen.append((loaded.name, loaded.weight_dtype))
        loaded.precision = "fp8_e4m3fn"
        return loaded

    hooked = ModelCache(resolver, device="cpu", transformer_postprocess=postprocess)
    model = hooked.diffusion_model(DEMO_CHECKPOINT, weight_dtype="fp8_e4m3fn")
    assert model.precision == "fp8_e4m3fn" and seen == [(DEMO_CHECKPOINT, "fp8_e4m3fn")]
    assert hooked.diffusion_model(DEMO_CHECKPOINT, weight_dtype="fp8_e4m3fn") is model


def test_unsupported_device_names_the_supported_ones(resolver):
    with pytest.raises(ModelLoadError, match="supported: auto, cpu"):
        ModelCache(resolver, device="tpu")


def test_cache_loads_separate_text_encoders_and_vae(tmp_path, demo_checkpoint_file):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    state = load_file(str(demo_checkpoint_file))
    with safe_open(str(demo_checkpoint_file), "pt") as f:
        metadata = f.metadata()
    (tmp_path / "text_encoders").mkdir()
    (tmp_path / "vae").mkdir()
    for role in ("clip_l", "clip_g"):
        prefix = f"text_encoders.{role}.transformer."
        part = {k: v for k, v in state.items() if k.startswith(prefix)}  # prefixed: the role is in the keys
        save_file(part, str(tmp_path / "text_encoders" / f"{role}.safetensors"), metadata=metadata)
    vae_part = {k: v for k, v in state.items() if k.startswith("first_stage_model.")}
    save_file(vae_part, str(tmp_path / "vae" / "demo_vae.safetensors"), metadata=metadata)

    cache = ModelCache(ModelResolver(tmp_path, allow_hub=False), device="cpu")
    clip = cache.text_encoders(["clip_g.safetensors", "clip_l.safetensors"])
    assert clip.names == ("clip_g.safetensors", "clip_l.safetensors") and not clip.has_t5
    assert cache.text_encoders(["clip_g.safetensors", "clip_l.safetensors"]) is clip and cache.load_count == 1
    assert clip.encode(["a"])[0].shape == (1, 333, 96)
    vae = cache.vae("demo_vae.safetensors")
    assert vae.sha256 and vae.downscale == 8
    assert {e["kind"] for e in cache.loaded()} == {"text_encoders", "vae"}
    with pytest.raises(ModelLoadError, match="supported: sd3"):
        cache.text_encoders(["clip_l.safetensors"], type="flux")
