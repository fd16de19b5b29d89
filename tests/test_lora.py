"""LoRA files and nodes (engine/lora.py, engine/nodes/lora.py) on the tiny demo model.

The LoRAs are written here, in the kohya/ComfyUI layout and the diffusers/PEFT layout, from the same
random low-rank factors, so both layouts must give the same image.
"""

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from engine.errors import ModelLoadError, ModelNotFound, WorkflowInvalid
from engine.lora import LoraPatch, parse_lora_state_dict
from engine.runtime import Engine
from engine.settings import DEMO_CHECKPOINT, Settings

RANK = 4
ALPHA = 2.0
INNER = 32  # demo transformer width (2 heads of 16)
CLIP_WIDTH = 32
TARGETS = ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_v", "transformer_blocks.1.ff.net.0.proj")


def factors(seed, out_features, in_features, scale=0.6):
    generator = torch.Generator().manual_seed(seed)
    up = torch.randn(out_features, RANK, generator=generator) * scale
    down = torch.randn(RANK, in_features, generator=generator) * scale
    return up, down


def shapes():
    return {"transformer_blocks.0.attn.to_q": (INNER, INNER), "transformer_blocks.0.attn.to_v": (INNER, INNER),
            "transformer_blocks.1.ff.net.0.proj": (4 * INNER, INNER)}


def kohya_state(seed=1, with_clip=False, modules=None):
    """A LoRA in ComfyUI/kohya keys over ``modules`` ({diffusers module: (out, in)}; default: shapes())."""
    state = {}
    for i, (module, (out_f, in_f)) in enumerate((modules or shapes()).items()):
        up, down = factors(seed + i, out_f, in_f)
        stem = "lora_unet_" + module.replace(".", "_")
        state.update({f"{stem}.lora_up.weight": up, f"{stem}.lora_down.weight": down,
                      f"{stem}.alpha": torch.tensor(ALPHA)})
    if with_clip:
        up, down = factors(seed + 50, CLIP_WIDTH, CLIP_WIDTH, scale=1.5)
        stem = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
        state.update({f"{stem}.lora_up.weight": up, f"{stem}.lora_down.weight": down,
                      f"{stem}.alpha": torch.tensor(float(RANK))})
    return state


def peft_state(seed=1, modules=None):
    """The same LoRA in diffusers/PEFT keys."""
    state = {}
    for i, (module, (out_f, in_f)) in enumerate((modules or shapes()).items()):
        up, down = factors(seed + i, out_f, in_f)
        state.update({f"transformer.{module}.lora_B.weight": up, f"transformer.{module}.lora_A.weight": down,
                      f"transformer.{module}.alpha": torch.tensor(ALPHA)})
    return state


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    loras = root / "models" / "loras"
    loras.mkdir(parents=True)
    save_file(kohya_state(), str(loras / "brand_kohya.safetensors"))
    save_file(peft_state(), str(loras / "brand_peft.safetensors"))
    save_file(kohya_state(seed=7, with_clip=True), str(loras / "style_clip.safetensors"))
    bad = {"lora_unet_not_a_layer.lora_up.weight": torch.ones(4, 2), "lora_unet_not_a_layer.lora_down.weight": torch.ones(2, 4)}
    save_file(bad, str(loras / "other_model.safetensors"))
    return Engine(Settings(data_dir=str(root / "data"), models_dir=str(root / "models"), device="cpu"))


def workflow(loras=(), seed=3, text="a red jacket on a mannequin", model_only=False):
    """Demo checkpoint -> LoRA chain -> prompts -> 2-step KSampler at 64x64 -> SaveImage."""
    wf = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": DEMO_CHECKPOINT}}}
    model, clip = ["1", 0], ["1", 1]
    for index, (name, strength_model, strength_clip) in enumerate(loras):
        node = str(20 + index)
        if model_only:
            wf[node] = {"class_type": "LoraLoaderModelOnly",
                        "inputs": {"model": model, "lora_name": name, "strength_model": strength_model}}
            model = [node, 0]
        else:
            wf[node] = {"class_type": "LoraLoader",
                        "inputs": {"model": model, "clip": clip, "lora_name": name,
                                   "strength_model": strength_model, "strength_clip": strength_clip}}
            model, clip = [node, 0], [node, 1]
    wf.update({
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": text}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": ""}},
        "4": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": model, "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "seed": seed,
            "steps": 2, "cfg": 4.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "lora"}},
    })
    return wf


def pixels(result):
    return np.asarray(Image.open(result.images[0].path)).astype(np.int16)


def run(engine, wf):
    result = engine.run(wf)
    return pixels(result), result


def transformer_snapshot(engine):
    model = engine.models.checkpoint(DEMO_CHECKPOINT)[0]
    return {k: v.clone() for k, v in model.transformer.state_dict().items()}


def test_both_file_layouts_give_the_same_image(engine):
    kohya, _ = run(engine, workflow([("brand_kohya.safetensors", 1.0, 1.0)]))
    peft, _ = run(engine, workflow([("brand_peft.safetensors", 1.0, 1.0)]))
    base, _ = run(engine, workflow())
    assert np.array_equal(kohya, peft)
    assert np.abs(kohya - base).mean() > 1.0


def test_strength_scales_the_change_and_zero_is_the_base_image(engine):
    base, _ = run(engine, workflow())
    zero, _ = run(engine, workflow([("brand_kohya.safetensors", 0.0, 0.0)]))
    half, _ = run(engine, workflow([("brand_kohya.safetensors", 0.5, 1.0)]))
    full, _ = run(engine, workflow([("brand_kohya.safetensors", 1.0, 1.0)]))
    assert np.array_equal(zero, base)
    assert 0 < np.abs(half - base).mean() < np.abs(full - base).mean()


def test_unapply_restores_the_base_model_bit_for_bit(engine):
    base, _ = run(engine, workflow(seed=11))
    before = transformer_snapshot(engine)
    loads_before = engine.models.load_count
    stacked = [("brand_kohya.safetensors", 0.8, 1.0), ("style_clip.safetensors", -1.3, 0.7),
               ("brand_peft.safetensors", 0.3, 1.0)]
    patched, _ = run(engine, workflow(stacked, seed=11))
    after = transformer_snapshot(engine)
    engine.executor.clear_cache()  # sample again, not the cached base latent
    again, _ = run(engine, workflow(seed=11))
    assert not np.array_equal(patched, base)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert np.array_equal(again, base)
    # switching LoRAs never reloads the checkpoint: at most the LoRA files themselves were read
    kinds = [e["kind"] for e in engine.models.loaded()]
    assert kinds.count("checkpoint") == 1
    assert engine.models.load_count - loads_before <= 3


def test_clip_strength_changes_the_text_encoding_only_while_encoding(engine):
    clip = engine.models.checkpoint(DEMO_CHECKPOINT)[1]
    weight = clip.text_encoder_l.text_model.encoder.layers[0].self_attn.q_proj.weight
    original = weight.detach().clone()
    base, _ = run(engine, workflow(seed=5))
    clip_only, _ = run(engine, workflow([("style_clip.safetensors", 0.0, 1.0)], seed=5))
    model_only, _ = run(engine, workflow([("style_clip.safetensors", 1.0, 1.0)], seed=5, model_only=True))
    assert np.abs(clip_only - base).mean() > 0.5
    assert not np.array_equal(model_only, clip_only)
    assert torch.equal(clip.text_encoder_l.text_model.encoder.layers[0].self_attn.q_proj.weight, original)


def test_rows_with_different_loras_in_one_batch_match_single_runs(engine):
    rows = [workflow([("brand_kohya.safetensors", 1.0, 1.0)], seed=2), workflow([("brand_kohya.safetensors", 0.4, 1.0)], seed=2)]
    batched = engine.run_batch(rows)
    single = [engine.run(wf) for wf in rows]
    for together, alone in zip(batched, single):
        # rows with different LoRAs sample in separate groups, but same-shape decoding and float
        # reduction order may move a pixel by one 8-bit level
        assert np.abs(pixels(together) - pixels(alone)).max() <= 1
    assert batched[0].record["loras"][0]["strength_model"] == 1.0
    assert batched[1].record["loras"][0]["strength_model"] == 0.4


def test_record_names_loras_with_strengths_and_file_hashes(engine):
    _, result = run(engine, workflow([("brand_kohya.safetensors", 0.7, 0.2), ("brand_peft.safetensors", 0.5, 1.0)]))
    folder = engine.models.resolver.folders("loras")[0]
    digest = hashlib.sha256((folder / "brand_kohya.safetensors").read_bytes()).hexdigest()
    assert result.record["loras"][0] == {"name": "brand_kohya.safetensors", "strength_model": 0.7,
                                         "strength_clip": 0.2, "sha256": digest}
    assert [entry["name"] for entry in result.record["loras"]] == ["brand_kohya.safetensors", "brand_peft.safetensors"]


def test_fused_mmdit_qkv_keys_split_over_q_k_v(engine):
    up, down = factors(3, 3 * INNER, INNER)
    mmdit = parse_lora_state_dict({"lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight": up,
                                   "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight": down}, "mmdit")
    parts = up.chunk(3)
    diffusers = parse_lora_state_dict({
        f"transformer.transformer_blocks.0.attn.{name}.{kind}.weight": tensor
        for name, part in zip(("to_q", "to_k", "to_v"), parts)
        for kind, tensor in (("lora_B", part), ("lora_A", down))
    }, "diffusers")
    transformer = engine.models.checkpoint(DEMO_CHECKPOINT)[0].transformer
    weights = []
    for lora in (mmdit, diffusers):
        with LoraPatch.of(lora, 1.0, "model").applied(transformer):
            weights.append([transformer.transformer_blocks[0].attn.to_k.weight.clone(),
                            transformer.transformer_blocks[0].attn.to_v.weight.clone()])
    assert all(torch.equal(a, b) for a, b in zip(*weights))
    assert not torch.equal(weights[0][0], transformer.transformer_blocks[0].attn.to_k.weight)


def test_missing_and_foreign_lora_files_are_clear_errors(engine):
    with pytest.raises(WorkflowInvalid) as info:
        engine.validate(workflow([("missing.safetensors", 1.0, 1.0)]))
    problem = info.value.problems[0]
    assert (problem.input_name, problem.type) == ("lora_name", "value_not_in_list")
    assert "brand_kohya.safetensors" in problem.message
    assert problem.details.startswith("files are looked up in ") and "loras" in problem.details  # where to put it
    with pytest.raises(ModelNotFound) as missing:
        engine.models.lora("missing.safetensors")
    assert "brand_peft.safetensors" in missing.value.available
    with pytest.raises(ModelLoadError, match="match no layer"):
        engine.run(workflow([("other_model.safetensors", 1.0, 1.0)]))
    with pytest.raises(ModelLoadError, match="supported"):
        parse_lora_state_dict({"model.diffusion_model.weight": torch.ones(2)}, "not_a_lora")


def test_brand_lora_template_applies_the_row_strength(engine):
    from pathlib import Path

    from engine.templates import load_template

    template = load_template(Path(__file__).parent.parent / "templates" / "brand_lora")
    values = {"product_name": "tote bag", "lora": "brand_kohya.safetensors", "lora_strength": 0.25, "seed": 1,
              "width": 256, "height": 256, "steps": 2}
    result = engine.run(template.render(values, defaults={"checkpoint": DEMO_CHECKPOINT}))
    assert result.record["loras"][0]["strength_model"] == 0.25
    plain = template.render({**values, "lora": ""}, defaults={"checkpoint": DEMO_CHECKPOINT})
    assert "LoraLoader" not in {node["class_type"] for node in plain.values()}


def test_a_lora_stored_the_wrong_way_round_is_refused_not_applied_as_noise(engine):
    up, down = factors(3, 4 * INNER, INNER)
    # (128 × 32) as up 32 × 4 and down 4 × 128: as many numbers as the layer, in the wrong shape
    stem = "lora_unet_transformer_blocks_1_ff_net_0_proj"
    state = {f"{stem}.lora_up.weight": down.T.contiguous(), f"{stem}.lora_down.weight": up.T.contiguous(),
             f"{stem}.alpha": torch.tensor(ALPHA)}
    save_file(state, str(Path(engine.settings.models_dir) / "loras" / "transposed.safetensors"))
    with pytest.raises(ModelLoadError, match=r"makes a \(32, 128\) update \(rank 4\); the layer's weight is \(128, 32\)"):
        engine.run(workflow([("transposed.safetensors", 1.0, 0.0)], model_only=True))


@pytest.mark.parametrize("broken, message", [
    ({"lora_down.weight": torch.ones(32)}, r"down \(lora_down/lora_A\) weight of shape \(32,\); it must be a matrix"),
    ({"lora_up.weight": torch.ones(128, 3)}, r"up weight of rank 3 \(128, 3\) and a down weight of rank 4"),
    ({"alpha": torch.ones(4)}, r"alpha of shape \(4,\); it must be one number"),
])
def test_a_malformed_lora_pair_is_refused_naming_its_key_before_any_layer_is_touched(broken, message):
    from engine.lora import parse_lora_state_dict

    stem = "lora_unet_transformer_blocks_1_ff_net_0_proj"
    up, down = factors(3, 4 * INNER, INNER)
    state = {f"{stem}.lora_up.weight": up, f"{stem}.lora_down.weight": down, f"{stem}.alpha": torch.tensor(ALPHA)}
    state.update({f"{stem}.{suffix}": tensor for suffix, tensor in broken.items()})
    with pytest.raises(ModelLoadError, match=message) as refused:
        parse_lora_state_dict(state, name="bad.safetensors")
    assert stem in refused.value.message and "bad.safetensors" in refused.value.message


def test_a_lora_file_replaced_under_its_name_is_read_again_and_never_crashes(engine):
    folder = Path(engine.settings.models_dir) / "loras"
    save_file(kohya_state(seed=11), str(folder / "live.safetensors"))
    first = engine.models.lora("live.safetensors")
    before = first.pairs[0].up.clone()
    small = {k: v for k, v in kohya_state(seed=12, modules={"transformer_blocks.0.attn.to_q": (INNER, INNER)}).items()}
    save_file(small, str(folder / "live.safetensors"))  # shorter: a mapped file would now end mid-tensor
    assert torch.equal(first.pairs[0].up, before)  # what was loaded is a copy, untouched
    second = engine.models.lora("live.safetensors")
    assert second is not first and len(second.pairs) == 1 and second.sha256 != first.sha256
