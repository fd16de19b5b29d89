"""ComfyUI fp8_scaled checkpoints: loaded into FP8 layers with no float copy; written back."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.bench import TINY_CONFIG, build_transformer, make_inputs, relative_error
from engine.errors import Fp8Error
from engine.fp8 import (
    FP8_DTYPE,
    Fp8Linear,
    convert_sd3_fp8_scaled_to_diffusers,
    is_fp8_scaled,
    load_fp8_scaled_file,
    load_fp8_scaled_into,
    quantize_transformer,
    quantize_weight,
    save_fp8_scaled,
)


def meta_transformer():
    """The model as the loader builds it: structure only, no weights allocated."""
    from diffusers import SD3Transformer2DModel

    with torch.device("meta"):
        return SD3Transformer2DModel(**TINY_CONFIG)


@pytest.fixture(scope="module")
def tiny():
    model = build_transformer("tiny", torch.device("cpu"), seed=0, dtype=torch.bfloat16)
    inputs = make_inputs("tiny", torch.device("cpu"), dtype=torch.bfloat16)
    return model, inputs


def assert_no_float_copy(model):
    fp8 = {n: m for n, m in model.named_modules() if isinstance(m, Fp8Linear)}
    assert fp8
    sizes = {m.in_features * m.out_features for m in fp8.values()}
    for layer in fp8.values():
        assert layer.weight.dtype == FP8_DTYPE
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        assert not tensor.is_meta, name
        owner = name.rsplit(".", 1)[0]
        if owner in fp8 and name.endswith(".weight"):
            continue
        # No full-size float weight of any quantized layer is held anywhere else.
        assert not (tensor.is_floating_point() and tensor.dtype != FP8_DTYPE and tensor.dim() == 2
                    and tensor.numel() in sizes and owner in fp8), name


def test_legacy_comfy_layout_loads_into_fp8_layers_without_float_copy(tiny, tmp_path):
    model, inputs = tiny
    quantized = copy.deepcopy(model)
    quantize_transformer(quantized, "weight_only", per_channel=False)
    # ComfyUI's legacy layout: scale_weight / scale_input (1.0 = none) and a scaled_fp8 marker.
    state = {}
    for key, value in quantized.state_dict().items():
        state[key.replace(".weight_scale", ".scale_weight")] = value
    first = "transformer_blocks.0.attn.to_q"
    state[f"{first}.scale_input"] = torch.tensor(0.02)
    state["transformer_blocks.0.attn.to_k.scale_input"] = torch.tensor(1.0)
    state["scaled_fp8"] = torch.empty(0, dtype=FP8_DTYPE)
    path = tmp_path / "tiny_fp8_scaled.safetensors"
    save_file(state, str(path))

    raw = load_file(str(path))
    assert is_fp8_scaled(raw)
    loaded = meta_transformer()
    report = load_fp8_scaled_into(loaded, raw, backend="weight_only")
    assert_no_float_copy(loaded)
    assert len(report.quantized) == len([m for m in quantized.modules() if isinstance(m, Fp8Linear)])
    assert loaded.get_submodule(first).input_scale.item() == pytest.approx(0.02)
    assert loaded.transformer_blocks[0].attn.to_k.input_scale is None  # 1.0 placeholder ignored
    assert torch.equal(loaded.get_submodule(first).weight.view(torch.uint8), quantized.get_submodule(first).weight.view(torch.uint8))
    assert report.bytes_after < report.bytes_before
    with torch.no_grad():
        reference = model(**inputs).sample
        out = loaded(**inputs).sample
    assert relative_error(out, reference) < 0.03


def test_save_and_reload_current_layout_keeps_static_scales(tiny, tmp_path):
    model, inputs = tiny
    quantized = copy.deepcopy(model)
    quantize_transformer(quantized, "scaled_mm", scales={"transformer_blocks.1.ff.net.2": torch.tensor(0.05)})
    path = save_fp8_scaled(quantized, tmp_path / "saved.safetensors")
    raw = load_file(str(path))
    assert raw["transformer_blocks.0.attn.to_q.weight"].dtype == FP8_DTYPE
    assert "transformer_blocks.0.attn.to_q.weight_scale" in raw
    assert bytes(raw["transformer_blocks.0.attn.to_q.comfy_quant"].tolist()) == b'{"format": "float8_e4m3fn"}'
    loaded = meta_transformer()
    load_fp8_scaled_file(loaded, path, backend="scaled_mm")
    assert_no_float_copy(loaded)
    assert loaded.transformer_blocks[1].ff.net[2].input_scale.item() == pytest.approx(0.05)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).sample, quantized(**inputs).sample)


def test_unsupported_quant_format_is_refused(tiny):
    model, _ = tiny
    quantized = copy.deepcopy(model)
    quantize_transformer(quantized, "weight_only")
    state = dict(quantized.state_dict())
    state["transformer_blocks.0.attn.to_q.comfy_quant"] = torch.tensor(list(b'{"format": "int8_blockwise"}'), dtype=torch.uint8)
    with pytest.raises(Fp8Error) as info:
        load_fp8_scaled_into(meta_transformer(), state)
    assert info.value.details["supported"] == ["float8_e4m3fn"]


def test_shape_mismatch_is_refused():
    state = {"transformer_blocks.0.attn.to_q.weight": torch.zeros(8, 8, dtype=FP8_DTYPE),
             "transformer_blocks.0.attn.to_q.weight_scale": torch.tensor(1.0)}
    with pytest.raises(Fp8Error, match="expects"):
        load_fp8_scaled_into(meta_transformer(), state)


def swap_scale_shift(weight):
    shift, scale = weight.chunk(2, dim=0)
    return torch.cat([scale, shift], dim=0)


def to_original_sd3_names(sd, num_layers, dual_layers):
    """The inverse of diffusers' SD3 converter, enough for the tiny model (test helper)."""
    out = {"pos_embed": sd["pos_embed.pos_embed"]}

    def move(dst, src):
        for suffix in ("weight", "bias"):
            if f"{src}.{suffix}" in sd:
                out[f"{dst}.{suffix}"] = sd[f"{src}.{suffix}"]

    def fuse(dst, srcs):
        for suffix in ("weight", "bias"):
            out[f"{dst}.{suffix}"] = torch.cat([sd[f"{s}.{suffix}"] for s in srcs])

    move("x_embedder.proj", "pos_embed.proj")
    move("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1")
    move("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2")
    move("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1")
    move("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2")
    move("context_embedder", "context_embedder")
    for i in range(num_layers):
        x, c, d = f"joint_blocks.{i}.x_block", f"joint_blocks.{i}.context_block", f"transformer_blocks.{i}"
        last = i == num_layers - 1
        fuse(f"{x}.attn.qkv", [f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v"])
        fuse(f"{c}.attn.qkv", [f"{d}.attn.add_q_proj", f"{d}.attn.add_k_proj", f"{d}.attn.add_v_proj"])
        out[f"{x}.attn.ln_q.weight"] = sd[f"{d}.attn.norm_q.weight"]
        out[f"{x}.attn.ln_k.weight"] = sd[f"{d}.attn.norm_k.weight"]
        out[f"{c}.attn.ln_q.weight"] = sd[f"{d}.attn.norm_added_q.weight"]
        out[f"{c}.attn.ln_k.weight"] = sd[f"{d}.attn.norm_added_k.weight"]
        move(f"{x}.attn.proj", f"{d}.attn.to_out.0")
        if i in dual_layers:
            fuse(f"{x}.attn2.qkv", [f"{d}.attn2.to_q", f"{d}.attn2.to_k", f"{d}.attn2.to_v"])
            out[f"{x}.attn2.ln_q.weight"] = sd[f"{d}.attn2.norm_q.weight"]
            out[f"{x}.attn2.ln_k.weight"] = sd[f"{d}.attn2.norm_k.weight"]
            move(f"{x}.attn2.proj", f"{d}.attn2.to_out.0")
        move(f"{x}.adaLN_modulation.1", f"{d}.norm1.linear")
        move(f"{x}.mlp.fc1", f"{d}.ff.net.0.proj")
        move(f"{x}.mlp.fc2", f"{d}.ff.net.2")
        if last:
            for suffix in ("weight", "bias"):
                out[f"{c}.adaLN_modulation.1.{suffix}"] = swap_scale_shift(sd[f"{d}.norm1_context.linear.{suffix}"])
        else:
            move(f"{c}.adaLN_modulation.1", f"{d}.norm1_context.linear")
            move(f"{c}.attn.proj", f"{d}.attn.to_add_out")
            move(f"{c}.mlp.fc1", f"{d}.ff_context.net.0.proj")
            move(f"{c}.mlp.fc2", f"{d}.ff_context.net.2")
    move("final_layer.linear", "proj_out")
    for suffix in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{suffix}"] = swap_scale_shift(sd[f"norm_out.linear.{suffix}"])
    return {"model.diffusion_model." + k: v for k, v in out.items()}


def test_original_sd3_naming_converts_with_fused_qkv_scales(tiny):
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    model, inputs = tiny
    float_sd = model.state_dict()
    original = to_original_sd3_names(float_sd, TINY_CONFIG["num_layers"], TINY_CONFIG["dual_attention_layers"])
    # The helper itself is right: diffusers' converter maps it back to the model's own keys.
    assert convert_sd3_transformer_checkpoint_to_diffusers(dict(original)).keys() == float_sd.keys()

    # Quantize it as ComfyUI does: per-tensor, on the fused original layers of the joint blocks.
    fp8_original = {}
    for key, value in original.items():
        if ".joint_blocks." in key and key.endswith(".weight") and value.dim() == 2:
            fp8, scale = quantize_weight(value, per_channel=False)
            fp8_original[key] = fp8
            fp8_original[key.replace(".weight", ".scale_weight")] = scale
        else:
            fp8_original[key] = value
    qkv = "model.diffusion_model.joint_blocks.0.x_block.attn.qkv"
    fp8_original[f"{qkv}.scale_input"] = torch.tensor(0.03)
    fp8_original["model.diffusion_model.scaled_fp8"] = torch.empty(0, dtype=FP8_DTYPE)
    fp8_original["text_encoders.clip_l.transformer.dummy.weight"] = torch.zeros(2, 2)  # other components: dropped

    converted = convert_sd3_fp8_scaled_to_diffusers(fp8_original)
    loaded = meta_transformer()
    load_fp8_scaled_into(loaded, converted)
    assert_no_float_copy(loaded)

    rows = model.transformer_blocks[0].attn.to_q.out_features
    fused = fp8_original[f"{qkv}.weight"].view(torch.uint8)
    for index, name in enumerate(("to_q", "to_k", "to_v")):
        layer = getattr(loaded.transformer_blocks[0].attn, name)
        assert torch.equal(layer.weight.view(torch.uint8), fused[index * rows:(index + 1) * rows])
        assert layer.weight_scale.item() == fp8_original[f"{qkv}.scale_weight"].item()
        assert layer.input_scale.item() == pytest.approx(0.03)
    assert loaded.transformer_blocks[0].attn.add_q_proj.input_scale is None
    with torch.no_grad():
        reference = model(**inputs).sample
        out = loaded(**inputs).sample
    assert relative_error(out, reference) < 0.03
