"""KSampler / KSamplerAdvanced / conditioning / latent nodes on the tiny demo model, through the Engine."""

import time

import numpy
import pytest
import torch
from PIL import Image

from engine.errors import Cancelled, DeadlineExceeded, WorkflowInvalid
from engine.nodes.latent import empty_latent
from engine.nodes.sampling import adapt_latent
from engine.runtime import Engine
from engine.sampling import SAMPLER_NAMES
from engine.settings import DEMO_CHECKPOINT, Settings


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("sampling")
    return Engine(Settings(data_dir=str(root / "data"), models_dir=str(root / "models"), device="cpu"))


def sd3_workflow(seed=1, steps=3, sampler="euler", scheduler="simple", cfg=4.0, size=64, prompt="a red fox",
                 negative="blurry", denoise=1.0, batch_size=1, prefix="t"):
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": DEMO_CHECKPOINT}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": prompt, "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": negative, "clip": ["4", 1]}},
        "5": {"class_type": "EmptySD3LatentImage", "inputs": {"width": size, "height": size, "batch_size": batch_size}},
        "3": {"class_type": "KSampler", "inputs": {
            "model": ["4", 0], "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": sampler,
            "scheduler": scheduler, "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0],
            "denoise": denoise}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": prefix}},
    }


def pixels(result, index=0):
    """The decoded pixels (file hashes also cover the PNG metadata, which holds the workflow)."""
    return torch.from_numpy(numpy.array(Image.open(result.images[index].path))).float()


def same_pixels(a, b, index=0):
    return torch.equal(pixels(a, index), pixels(b, index))


def test_same_seed_same_image_different_seed_different(engine, tmp_path):
    a = engine.run(sd3_workflow(seed=11), output_dir=tmp_path)
    engine.executor.clear_cache()  # recompute everything: the equality must not come from the cache
    b = engine.run(sd3_workflow(seed=11), output_dir=tmp_path)
    c = engine.run(sd3_workflow(seed=12), output_dir=tmp_path)
    assert a.images[0].sha256 == b.images[0].sha256
    assert a.images[0].path != b.images[0].path  # identical rows are still separate files
    assert c.images[0].sha256 != a.images[0].sha256
    assert a.record["seed"] == 11 and c.record["seed"] == 12


@pytest.mark.parametrize("sampler", SAMPLER_NAMES)
def test_every_sampler_runs(engine, tmp_path, sampler):
    steps = []
    result = engine.run(
        sd3_workflow(sampler=sampler, scheduler="karras", steps=3), output_dir=tmp_path,
        on_progress=lambda e: steps.append((e.value, e.maximum)) if e.kind == "step" else None,
    )
    assert result.record["sampler"] == sampler and result.record["scheduler"] == "karras"
    assert steps == [(1, 3), (2, 3), (3, 3)]
    assert result.images[0].width == 64


def test_unsupported_sampler_is_a_validation_error_naming_supported(engine):
    with pytest.raises(WorkflowInvalid) as info:
        engine.validate(sd3_workflow(sampler="uni_pc", scheduler="turbo"))
    problems = {p.input_name: p for p in info.value.problems}
    assert problems["sampler_name"].type == "value_not_in_list"
    assert "euler" in problems["sampler_name"].message and "dpmpp_2m" in problems["sampler_name"].message
    assert problems["scheduler"].type == "value_not_in_list"
    assert "sgm_uniform" in problems["scheduler"].message


def test_record_holds_generation_parameters(engine, tmp_path):
    result = engine.run(sd3_workflow(seed=2**64 - 1, cfg=1.0, denoise=0.5, steps=2), output_dir=tmp_path)
    record = result.record
    assert record["prompt"] == "a red fox" and record["negative_prompt"] == "blurry"
    assert record["seed"] == 2**64 - 1
    assert (record["steps"], record["cfg"], record["denoise"]) == (2, 1.0, 0.5)
    assert (record["width"], record["height"]) == (64, 64)
    assert record["model_name"] == DEMO_CHECKPOINT and len(record["model_hash"]) == 64
    assert record["precision"] == "fp32"


def test_cfg_one_skips_the_negative(engine, tmp_path):
    """With cfg 1 ComfyUI never evaluates the negative: changing it cannot change the image."""
    a = engine.run(sd3_workflow(cfg=1.0, negative="one"), output_dir=tmp_path)
    b = engine.run(sd3_workflow(cfg=1.0, negative="something else entirely"), output_dir=tmp_path)
    c = engine.run(sd3_workflow(cfg=3.0, negative="something else entirely"), output_dir=tmp_path)
    assert same_pixels(a, b)
    assert not same_pixels(a, c)


def test_run_batch_equals_single_runs(engine, tmp_path):
    rows = [sd3_workflow(seed=21, prompt="a cat", sampler="euler_ancestral"),
            sd3_workflow(seed=22, prompt="a dog", sampler="euler_ancestral")]
    batched = engine.run_batch(rows, output_dir=tmp_path / "batch")
    engine.executor.clear_cache()
    singles = [engine.run(row, output_dir=tmp_path / "single") for row in rows]
    for together, alone in zip(batched, singles):
        assert torch.allclose(pixels(together), pixels(alone), atol=2.0)  # 8-bit levels
    assert not torch.equal(pixels(batched[0]), pixels(batched[1]))
    assert [(r.record["seed"], r.record["prompt"]) for r in batched] == [(21, "a cat"), (22, "a dog")]


def test_sampler_run_batch_latents_match_single_runs(engine, tmp_path):
    """KSampler.run_batch directly: the latents of a two-row batch equal each row sampled alone."""
    from engine.nodes.context import NodeContext
    from engine.nodes.sampling import KSampler
    from engine.nodes.types import Conditioning

    model, clip, _ = engine.models.checkpoint(DEMO_CHECKPOINT)
    ctx = NodeContext(models=engine.models, output_dir=tmp_path, temp_dir=tmp_path)

    def row(seed, text):
        embeds, pooled = clip.encode(text, empty_padding="empty_prompt")
        negative = Conditioning.single(*clip.encode("", empty_padding="empty_prompt"), prompt="")
        return {"model": model, "seed": seed, "steps": 3, "cfg": 3.5, "sampler_name": "dpmpp_2m",
                "scheduler": "sgm_uniform", "positive": Conditioning.single(embeds, pooled, prompt=text),
                "negative": negative, "latent_image": empty_latent(64, 48, 1, 16), "denoise": 1.0}

    inputs = [row(1, "red"), row(2, "blue")]
    together = KSampler().run_batch(ctx, inputs)
    alone = [KSampler().run(ctx, **i)[0]["samples"] for i in inputs]
    for result, single in zip(together, alone):
        assert torch.allclose(result["result"][0]["samples"], single, atol=1e-5)
    assert [r["record"]["seed"] for r in together] == [1, 2]
    assert together[1]["record"]["prompt"] == "blue" and together[0]["record"]["height"] == 48


def test_cancellation_between_steps(engine, tmp_path):
    seen = []

    def cancel():
        return len(seen) >= 2

    with pytest.raises(Cancelled) as info:
        engine.run(sd3_workflow(steps=6, seed=99), output_dir=tmp_path,
                   on_progress=lambda e: seen.append(e.value) if e.kind == "step" else None,
                   should_cancel=cancel)
    assert seen == [1, 2]
    assert info.value.class_type == "KSampler"
    assert not list(tmp_path.glob("*.png"))


def test_deadline_stops_the_sampler(engine, tmp_path):
    engine.run(sd3_workflow(steps=1), output_dir=tmp_path)  # models loaded and encodings cached

    def slow(event):
        if event.kind == "step":
            time.sleep(0.3)

    with pytest.raises(DeadlineExceeded) as info:
        engine.run(sd3_workflow(steps=8, seed=5), output_dir=tmp_path, on_progress=slow, deadline_s=0.5)
    assert info.value.node_id == "3"


def test_advanced_two_stages_equal_one_run(engine, tmp_path):
    """KSamplerAdvanced: steps 0-2 with leftover noise, then 2-4 without new noise == one 4-step run."""
    wf = sd3_workflow(steps=4, seed=8, sampler="euler", scheduler="simple")
    single = engine.run(wf, output_dir=tmp_path)
    staged = sd3_workflow()
    common = {"model": ["4", 0], "steps": 4, "cfg": 4.0, "sampler_name": "euler", "scheduler": "simple",
              "positive": ["6", 0], "negative": ["7", 0], "noise_seed": 8}
    staged["3"] = {"class_type": "KSamplerAdvanced", "inputs": {
        **common, "add_noise": "enable", "latent_image": ["5", 0], "start_at_step": 0, "end_at_step": 2,
        "return_with_leftover_noise": "enable"}}
    staged["10"] = {"class_type": "KSamplerAdvanced", "inputs": {
        **common, "add_noise": "disable", "latent_image": ["3", 0], "start_at_step": 2, "end_at_step": 10000,
        "return_with_leftover_noise": "disable"}}
    staged["8"]["inputs"]["samples"] = ["10", 0]
    result = engine.run(staged, output_dir=tmp_path)
    assert torch.allclose(pixels(result), pixels(single), atol=2.0)
    partial = sd3_workflow()
    partial["3"] = {"class_type": "KSamplerAdvanced", "inputs": {
        **common, "add_noise": "enable", "latent_image": ["5", 0], "start_at_step": 0, "end_at_step": 2,
        "return_with_leftover_noise": "disable"}}
    cut = engine.run(partial, output_dir=tmp_path)
    assert not torch.allclose(pixels(cut), pixels(single), atol=2.0)


def test_timestep_range_and_combine(engine, tmp_path):
    wf = sd3_workflow(steps=4, seed=3, prompt="a castle")
    base = engine.run(wf, output_dir=tmp_path)
    wf["11"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "the sea", "clip": ["4", 1]}}
    wf["12"] = {"class_type": "ConditioningSetTimestepRange", "inputs": {"conditioning": ["11", 0], "start": 0.5, "end": 1.0}}
    wf["13"] = {"class_type": "ConditioningSetTimestepRange", "inputs": {"conditioning": ["6", 0], "start": 0.0, "end": 0.5}}
    wf["14"] = {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["13", 0], "conditioning_2": ["12", 0]}}
    wf["3"]["inputs"]["positive"] = ["14", 0]
    switched = engine.run(wf, output_dir=tmp_path)
    assert switched.record["prompt"] == "a castle | the sea"
    assert not same_pixels(switched, base)
    # a range covering the whole run is the plain conditioning again
    wf["13"]["inputs"]["end"] = 1.0
    wf["3"]["inputs"]["positive"] = ["13", 0]
    full = engine.run(wf, output_dir=tmp_path)
    assert same_pixels(full, base)


def test_zero_out_negative(engine, tmp_path):
    wf = sd3_workflow(steps=2)
    wf["7"] = {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["6", 0]}}
    result = engine.run(wf, output_dir=tmp_path)
    assert result.record["negative_prompt"] == ""


def test_model_sampling_sd3_shift_changes_the_image(engine, tmp_path):
    wf = sd3_workflow(steps=3, seed=4)
    base = engine.run(wf, output_dir=tmp_path)
    wf["20"] = {"class_type": "ModelSamplingSD3", "inputs": {"model": ["4", 0], "shift": 3.0}}
    wf["3"]["inputs"]["model"] = ["20", 0]
    same = engine.run(wf, output_dir=tmp_path)
    wf["20"]["inputs"]["shift"] = 6.0
    shifted = engine.run(wf, output_dir=tmp_path)
    assert same_pixels(same, base)  # the demo's own shift is 3.0
    assert not same_pixels(shifted, base)


def test_empty_latent_image_adapts_to_the_model(engine, tmp_path):
    """EmptyLatentImage makes ComfyUI's 4-channel placeholder; the sampler swaps in the model's channels."""
    model = engine.models.checkpoint(DEMO_CHECKPOINT)[0]
    latent = empty_latent(96, 64, 2, 4)
    samples = adapt_latent(model, latent)
    assert tuple(samples.shape) == (2, model.latent_channels, 64 // model.vae_scale_factor, 96 // model.vae_scale_factor)
    wf = sd3_workflow()
    wf["5"] = {"class_type": "EmptyLatentImage", "inputs": {"width": 96, "height": 64, "batch_size": 2}}
    result = engine.run(wf, output_dir=tmp_path)
    assert [(i.width, i.height) for i in result.images] == [(96, 64), (96, 64)]
    assert not torch.equal(pixels(result, 0), pixels(result, 1))  # one noise tensor for the batch, not repeated
    bad = {"samples": torch.ones(1, 4, 8, 8)}
    with pytest.raises(Exception, match="does not fit model"):
        adapt_latent(model, bad)
