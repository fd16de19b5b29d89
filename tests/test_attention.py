"""The attention kernel setting: validated, kept on the model handle, enforced around every transformer call."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from engine.attention import ATTENTION_CHOICES, attention_priority, check_attention_choice, choose_attention
from engine.errors import EngineError, ModelError
from engine.runtime import Engine
from engine.settings import Settings


def small_workflow(text: str = "a red jacket") -> dict:
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd35_demo_tiny"}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["4", 1]}},
        "7": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["6", 0]}},
        "5": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "3": {"class_type": "KSampler", "inputs": {
            "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0],
            "seed": 7, "steps": 2, "cfg": 4.5, "sampler_name": "euler", "scheduler": "sgm_uniform", "denoise": 1.0}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "attn"}},
    }


def test_unknown_choice_names_the_supported_ones():
    with pytest.raises(ModelError) as caught:
        check_attention_choice("xformers")
    assert "xformers" in str(caught.value)
    for name in ATTENTION_CHOICES:
        assert name in str(caught.value)


def test_choices_resolve_to_backend_priorities_on_a_cpu(demo_components):
    transformer = demo_components["transformer"]
    assert choose_attention("auto", transformer, "cpu", torch.float32) == ()  # nothing to time on a CPU
    assert choose_attention("default", transformer, "cpu", torch.float32) == ()
    assert choose_attention("math", transformer, "cpu", torch.float32) == ("math",)
    assert choose_attention("flash", transformer, "cpu", torch.float32) == ("flash",)


def test_the_priority_is_enforced_not_advisory():
    q = k = v = torch.randn(1, 2, 16, 8)
    with attention_priority(("math",)):
        math_out = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(math_out, F.scaled_dot_product_attention(q, k, v))
    # cuDNN's kernel does not exist on a CPU: asked for alone, torch refuses instead of quietly using another.
    with pytest.raises(RuntimeError, match="No viable backend"), attention_priority(("cudnn",)):
        F.scaled_dot_product_attention(q, k, v)


def test_engine_runs_on_the_configured_kernel(tmp_path, models_dir):
    engine = Engine(Settings(data_dir=str(tmp_path), models_dir=str(models_dir), device="cpu", attention="math"))
    result = engine.run(json.loads(json.dumps(small_workflow())), output_dir=tmp_path / "out")
    assert result.images and engine.models.checkpoint("sd35_demo_tiny")[0].attention == ("math",)


def test_a_kernel_the_device_lacks_fails_the_run_with_torchs_reason(tmp_path, models_dir):
    engine = Engine(Settings(data_dir=str(tmp_path), models_dir=str(models_dir), device="cpu", attention="cudnn"))
    with pytest.raises(EngineError, match="No viable backend") as caught:
        engine.run(json.loads(json.dumps(small_workflow())), output_dir=tmp_path / "out")
    assert caught.value.details.get("node_id") == "3"  # the KSampler


def test_unknown_attention_setting_is_refused_when_the_engine_is_built(tmp_path, models_dir):
    with pytest.raises(ModelError, match="supported: auto"):
        Engine(Settings(data_dir=str(tmp_path), models_dir=str(models_dir), device="cpu", attention="fast"))
