"""LoRAs on FP8 layers (engine/lora.py side branches on engine/fp8/linear.py Fp8Linear).

An FP8 model (settings precision "fp8"; the weight_only backend on a CPU) takes a LoRA as a low-rank
branch beside each FP8 layer, never by rewriting its E4M3 weight; layers kept in high precision
(``proj_out``) take it as a merged weight as before. The LoRA files are written here in the
kohya/ComfyUI and the diffusers/PEFT layouts.
"""

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from test_lora import ALPHA, RANK, factors, kohya_state, peft_state, pixels, run
from test_lora import workflow as lora_workflow
from torch import nn

from engine.fp8.linear import Fp8Linear
from engine.fp8.quantize import fp8_layers
from engine.lora import LoraPatch, parse_lora_state_dict
from engine.runtime import Engine
from engine.settings import DEMO_CHECKPOINT, Settings

INNER = 32  # demo transformer width
OUT_CHANNELS = 16 * 2 * 2  # proj_out: latent channels x patch x patch
# Block linears (quantized to FP8) plus proj_out (kept in high precision, merged as a float weight).
BRAND = {"transformer_blocks.0.attn.to_q": (INNER, INNER), "transformer_blocks.0.attn.to_v": (INNER, INNER),
         "transformer_blocks.1.ff.net.0.proj": (4 * INNER, INNER)}
STYLE = {"transformer_blocks.0.attn.to_q": (INNER, INNER), "proj_out": (OUT_CHANNELS, INNER)}


@pytest.fixture(scope="module")
def models_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_fp8")
    loras = root / "models" / "loras"
    loras.mkdir(parents=True)
    save_file(kohya_state(seed=1, modules=BRAND), str(loras / "brand_kohya.safetensors"))
    save_file(peft_state(seed=20, modules=STYLE), str(loras / "style_peft.safetensors"))
    return root


@pytest.fixture(scope="module")
def fp8_engine(models_root):
    return Engine(Settings(data_dir=str(models_root / "fp8"), models_dir=str(models_root / "models"),
                           device="cpu", precision="fp8"))


@pytest.fixture(scope="module")
def fp32_engine(models_root):
    return Engine(Settings(data_dir=str(models_root / "fp32"), models_dir=str(models_root / "models"), device="cpu"))


def workflow(loras=(), seed=3):
    """The LoRA tests' workflow (2-step KSampler at 64x64) with the clip strength fixed at 1.0."""
    return lora_workflow([(name, strength, 1.0) for name, strength in loras], seed=seed)


def transformer(engine):
    return engine.models.checkpoint(DEMO_CHECKPOINT)[0].transformer


def fp8_layer_outputs(model):
    """Every FP8 layer's output on a fixed input, and every tensor of the model's state."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        outputs = {name: layer(torch.randn(3, layer.in_features, generator=generator))
                   for name, layer in fp8_layers(model).items()}
    return outputs, {k: v.clone() for k, v in model.state_dict().items()}


def branch_output(x, state, module, strength):
    up, down = state[f"transformer.{module}.lora_B.weight"], state[f"transformer.{module}.lora_A.weight"]
    return strength * (ALPHA / RANK) * (x @ down.T) @ up.T


def test_lora_on_the_fp8_model_runs_and_scales_with_strength(fp8_engine):
    base, base_result = run(fp8_engine, workflow())
    half, _ = run(fp8_engine, workflow([("brand_kohya.safetensors", 0.5)]))
    full, result = run(fp8_engine, workflow([("brand_kohya.safetensors", 1.0)]))
    assert base_result.record["precision"] == result.record["precision"] == "fp8_e4m3fn/weight_only"
    assert result.record["loras"][0]["name"] == "brand_kohya.safetensors"
    assert 0 < np.abs(half - base).mean() < np.abs(full - base).mean()
    assert all(isinstance(transformer(fp8_engine).get_submodule(m), Fp8Linear) for m in BRAND)


def test_stacked_branches_add_up_and_zero_strength_changes_nothing(fp8_engine):
    model = transformer(fp8_engine)
    layer = model.get_submodule("transformer_blocks.0.attn.to_q")
    brand = fp8_engine.models.lora("brand_kohya.safetensors")
    style_state = peft_state(seed=20, modules=STYLE)
    style = parse_lora_state_dict(style_state, "style")
    x = torch.randn(5, INNER, generator=torch.Generator().manual_seed(4))
    base = layer(x)
    with LoraPatch.of(brand, 0.0, "model").applied(model):
        assert torch.equal(layer(x), base)
    with LoraPatch.of(brand, 0.7, "model").applied(model):
        brand_only = layer(x)
        with LoraPatch.of(style, -1.2, "model").applied(model):
            assert len(layer.low_rank_branches) == 2
            stacked = layer(x)
        assert len(layer.low_rank_branches) == 1 and torch.equal(layer(x), brand_only)
    up, down = factors(1, INNER, INNER)  # brand's to_q pair (kohya key, seed 1)
    expected_brand = base + 0.7 * (ALPHA / RANK) * (x @ down.T) @ up.T
    expected = expected_brand + branch_output(x, style_state, "transformer_blocks.0.attn.to_q", -1.2)
    assert torch.allclose(brand_only, expected_brand, atol=1e-5)
    assert torch.allclose(stacked, expected, atol=1e-5)
    assert layer.low_rank_branches == () and torch.equal(layer(x), base)


def test_fused_mmdit_qkv_lora_splits_over_fp8_q_k_v(fp8_engine):
    model = transformer(fp8_engine)
    up, down = factors(3, 3 * INNER, INNER)
    mmdit = parse_lora_state_dict({"lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight": up,
                                   "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight": down}, "mmdit")
    x = torch.randn(2, INNER, generator=torch.Generator().manual_seed(5))
    attn = model.transformer_blocks[0].attn
    base = [attn.to_q(x), attn.to_k(x), attn.to_v(x)]
    with LoraPatch.of(mmdit, 1.0, "model").applied(model):
        patched = [attn.to_q(x), attn.to_k(x), attn.to_v(x)]
    for before, after, part in zip(base, patched, up.chunk(3)):
        assert torch.allclose(after, before + (x @ down.T) @ part.T, atol=1e-5)


def test_fp8_layers_compute_bit_identically_after_lora_runs(fp8_engine):
    model = transformer(fp8_engine)
    base_image, _ = run(fp8_engine, workflow(seed=11))
    outputs_before, state_before = fp8_layer_outputs(model)
    stacked = [("brand_kohya.safetensors", 0.8), ("style_peft.safetensors", -1.3)]
    patched, _ = run(fp8_engine, workflow(stacked, seed=11))
    outputs_after, state_after = fp8_layer_outputs(model)
    fp8_engine.executor.clear_cache()  # sample again, not the cached base latent
    again, _ = run(fp8_engine, workflow(seed=11))
    assert not np.array_equal(patched, base_image)
    assert all(layer.low_rank_branches == () for layer in fp8_layers(model).values())
    assert all(torch.equal(outputs_before[name], outputs_after[name]) for name in outputs_before)
    assert state_before.keys() == state_after.keys()
    assert all(torch.equal(state_before[k], state_after[k]) for k in state_before)
    assert np.array_equal(again, base_image)


def test_fp8_lora_image_is_close_to_the_fp32_lora_image(fp8_engine, fp32_engine):
    lora = [("brand_kohya.safetensors", 1.0), ("style_peft.safetensors", 0.6)]
    fp32_base, _ = run(fp32_engine, workflow(seed=7))
    fp32_lora, _ = run(fp32_engine, workflow(lora, seed=7))
    fp8_lora, _ = run(fp8_engine, workflow(lora, seed=7))
    lora_effect = np.abs(fp32_lora - fp32_base).mean()
    assert lora_effect > 1.0
    # E4M3 weights move pixels a little; the LoRA must move them the same way, by much more.
    assert np.abs(fp8_lora - fp32_lora).mean() < 0.25 * lora_effect


def test_switching_lora_between_rows_does_not_reload_the_fp8_model(fp8_engine):
    run(fp8_engine, workflow())  # the checkpoint is resident before counting
    loads_before = fp8_engine.models.load_count
    rows = [workflow([("brand_kohya.safetensors", 1.0)], seed=2), workflow([("brand_kohya.safetensors", 0.4)], seed=2),
            workflow([("style_peft.safetensors", 1.0)], seed=2)]
    batched = fp8_engine.run_batch(rows)
    single = [fp8_engine.run(wf) for wf in rows]
    for together, alone in zip(batched, single):
        assert np.abs(pixels(together) - pixels(alone)).max() <= 1
    assert [r.record["loras"][0]["strength_model"] for r in batched] == [1.0, 0.4, 1.0]
    assert [e["kind"] for e in fp8_engine.models.loaded()].count("checkpoint") == 1
    assert fp8_engine.models.load_count - loads_before <= 2  # at most the two LoRA files


def test_branch_runs_in_the_compute_dtype_and_inside_a_compiled_block():
    torch.manual_seed(0)
    block = nn.Sequential(Fp8Linear.from_linear(nn.Linear(16, 24), compute_dtype=torch.bfloat16))
    up, down = factors(9, 24, 16)
    lora = parse_lora_state_dict({"0.lora_B.weight": up, "0.lora_A.weight": down}, "plain")
    x = torch.randn(4, 16)
    base = block(x)
    # torch.compile ignores forward hooks added after compilation: the branch must still be seen.
    block.compile(backend="eager")
    assert torch.equal(block(x), base)
    with LoraPatch.of(lora, 0.5, "model").applied(block):
        patched = block(x)
    assert patched.dtype == torch.bfloat16
    expected = base.float() + 0.5 * (x @ down.T) @ up.T
    assert torch.allclose(patched.float(), expected, rtol=0.02, atol=0.05)
    assert torch.equal(block(x), base)
