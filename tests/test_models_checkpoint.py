"""Single-file checkpoints in ComfyUI's key layout: write -> read round trips, fp8_scaled, separate parts."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from engine.errors import ModelLoadError
from engine.models.checkpoint import (
    load_checkpoint,
    load_diffusion_model,
    load_text_encoders,
    load_vae,
    transformer_to_original,
    vae_to_ldm,
)


def _forward(transformer, seed=0):
    g = torch.Generator().manual_seed(seed)
    config = transformer.config
    with torch.inference_mode():
        return transformer(
            hidden_states=torch.randn(1, config.in_channels, 32, 32, generator=g),
            encoder_hidden_states=torch.randn(1, 20, config.joint_attention_dim, generator=g),
            pooled_projections=torch.randn(1, config.pooled_projection_dim, generator=g),
            timestep=torch.tensor([700.0]),
        ).sample


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_file_uses_comfyui_key_layout(demo_checkpoint_file):
    with safe_open(str(demo_checkpoint_file), "pt") as f:
        keys = set(f.keys())
        metadata = f.metadata()
    assert "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight" in keys
    assert "model.diffusion_model.joint_blocks.0.x_block.attn2.qkv.weight" in keys  # MMDiT-X dual attention
    assert "model.diffusion_model.joint_blocks.0.x_block.attn.ln_q.weight" in keys
    assert "model.diffusion_model.joint_blocks.1.context_block.attn.proj.weight" not in keys  # pre-only last block
    assert "first_stage_model.decoder.up.0.block.0.conv1.weight" in keys
    assert "first_stage_model.encoder.mid.attn_1.q.weight" in keys
    assert "text_encoders.clip_l.transformer.text_model.embeddings.token_embedding.weight" in keys
    assert "text_encoders.clip_g.transformer.text_projection.weight" in keys
    assert metadata["engine.demo"] and metadata["modelspec.architecture"]


def test_inverse_conversions_round_trip_through_diffusers(demo_components):
    from diffusers.loaders.single_file_utils import (
        convert_ldm_vae_checkpoint,
        convert_sd3_transformer_checkpoint_to_diffusers,
    )

    state = demo_components["transformer"].state_dict()
    back = convert_sd3_transformer_checkpoint_to_diffusers(transformer_to_original(state))
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    vae_state = demo_components["vae"].state_dict()
    vae_back = convert_ldm_vae_checkpoint(vae_to_ldm(vae_state), dict(demo_components["vae"].config))
    assert vae_back.keys() == vae_state.keys() and all(torch.equal(vae_back[k], vae_state[k]) for k in vae_state)


def test_write_read_round_trip_is_bit_exact(demo_components, demo_checkpoint_file):
    model, clip, vae = load_checkpoint(demo_checkpoint_file)
    assert model.is_demo and model.latent_channels == 16 and model.vae_scale_factor == 8 and model.patch_size == 2
    assert _same_weights(model.transformer, demo_components["transformer"])
    assert _same_weights(vae.vae, demo_components["vae"])
    assert _same_weights(clip.text_encoder_l, demo_components["text_encoder"])
    assert _same_weights(clip.text_encoder_g, demo_components["text_encoder_2"])
    assert torch.equal(_forward(model.transformer), _forward(demo_components["transformer"]))
    assert (vae.scaling_factor, vae.shift_factor) == (1.5305, 0.0609)
    from engine.models.checkpoint import handles_from_components

    reference = handles_from_components(demo_components, "ref")[1]
    ours, ref = clip.encode(["a small boat"]), reference.encode(["a small boat"])
    assert torch.equal(ours[0], ref[0]) and torch.equal(ours[1], ref[1])


def test_bf16_load_casts_every_part(demo_checkpoint_file):
    model, clip, vae = load_checkpoint(demo_checkpoint_file, dtype=torch.bfloat16)
    assert model.precision == "bf16" and model.dtype == torch.bfloat16
    assert clip.text_encoder_l.dtype == torch.bfloat16 and vae.vae.dtype == torch.bfloat16


def _fp8_scaled_copy(source, dest, newer_names: bool):
    """Quantize every 2-D transformer weight the way ComfyUI's *_fp8_scaled files store them."""
    state = load_file(str(source))
    reference = dict(state)
    fmax = torch.finfo(torch.float8_e4m3fn).max
    for key in list(state):
        if key.startswith("model.diffusion_model.") and key.endswith(".weight") and state[key].ndim == 2:
            weight = state[key]
            scale = weight.abs().max().float() / fmax
            fp8 = (weight / scale).to(torch.float8_e4m3fn)
            base = key[: -len(".weight")]
            state[key] = fp8
            state[f"{base}.{'weight_scale' if newer_names else 'scale_weight'}"] = scale
            state[f"{base}.{'input_scale' if newer_names else 'scale_input'}"] = torch.tensor(1.0)
            reference[key] = fp8.float() * scale
    state["model.diffusion_model.scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    with safe_open(str(source), "pt") as f:
        metadata = f.metadata()
    save_file(state, str(dest), metadata=metadata)
    reference_path = dest.with_name("reference_" + dest.name)
    save_file(reference, str(reference_path), metadata=metadata)
    return dest, reference_path


@pytest.mark.parametrize("newer_names", [False, True])
def test_fp8_scaled_file_loads_dequantized_and_keeps_fp8_tensors(demo_checkpoint_file, tmp_path, newer_names):
    fp8_path, reference_path = _fp8_scaled_copy(demo_checkpoint_file, tmp_path / "demo_fp8_scaled.safetensors", newer_names)
    fp8_state: dict = {}
    model, clip, vae = load_checkpoint(fp8_path, fp8_state=fp8_state)
    reference, _, _ = load_checkpoint(reference_path)
    assert _same_weights(model.transformer, reference.transformer)
    assert torch.equal(_forward(model.transformer), _forward(reference.transformer))
    # FP8 tensors reachable by diffusers module name, fused qkv split like the weights
    entry = fp8_state["transformer_blocks.0.attn.to_q"]
    assert entry["weight"].dtype == torch.float8_e4m3fn
    assert entry["source"] == "joint_blocks.0.x_block.attn.qkv.weight"
    dequantized = entry["weight"].float() * entry["scale_weight"]
    assert torch.equal(dequantized, model.transformer.transformer_blocks[0].attn.to_q.weight)
    assert entry["scale_input"] is not None
    assert "transformer_blocks.0.attn2.to_v" in fp8_state and "proj_out" in fp8_state


def test_separate_parts_load(demo_components, demo_checkpoint_file, tmp_path):
    state = load_file(str(demo_checkpoint_file))
    with safe_open(str(demo_checkpoint_file), "pt") as f:
        metadata = f.metadata()
    bare_unet = {k[len("model.diffusion_model."):]: v for k, v in state.items() if k.startswith("model.diffusion_model.")}
    save_file(bare_unet, str(tmp_path / "unet.safetensors"), metadata=metadata)
    vae_only = {k[len("first_stage_model."):]: v for k, v in state.items() if k.startswith("first_stage_model.")}
    save_file(vae_only, str(tmp_path / "vae.safetensors"), metadata=metadata)
    for role in ("clip_l", "clip_g"):
        prefix = f"text_encoders.{role}.transformer."
        part = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        # no role in the metadata: demo widths (32) name neither CLIP, so order decides (L, then G)
        save_file(part, str(tmp_path / f"{role}.safetensors"), metadata=metadata)

    model = load_diffusion_model(tmp_path / "unet.safetensors")
    assert _same_weights(model.transformer, demo_components["transformer"])
    vae = load_vae(tmp_path / "vae.safetensors")
    assert _same_weights(vae.vae, demo_components["vae"])
    clip = load_text_encoders([tmp_path / "clip_l.safetensors", tmp_path / "clip_g.safetensors"])
    assert _same_weights(clip.text_encoder_l, demo_components["text_encoder"])
    assert _same_weights(clip.text_encoder_g, demo_components["text_encoder_2"])
    assert clip.encode(["x"])[0].shape == (1, 333, 96)  # context width read from the files' metadata
    with pytest.raises(ModelLoadError, match="clip_g"):
        load_text_encoders([tmp_path / "clip_l.safetensors"])


def test_unusable_files_are_load_errors(tmp_path, demo_checkpoint_file):
    pickled = tmp_path / "model.ckpt"
    pickled.write_bytes(b"not a pickle")
    with pytest.raises(ModelLoadError, match="safetensors"):
        load_checkpoint(pickled)
    garbage = tmp_path / "broken.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(ModelLoadError, match="cannot read"):
        load_checkpoint(garbage)
    state = load_file(str(demo_checkpoint_file))
    save_file({k: v for k, v in state.items() if k.startswith("first_stage_model.")}, str(tmp_path / "vae_only.safetensors"))
    with pytest.raises(ModelLoadError, match="no diffusion model"):
        load_checkpoint(tmp_path / "vae_only.safetensors")


def test_real_tokenizer_missing_offline_names_what_was_looked_for(tmp_path, monkeypatch):
    from engine.models.checkpoint import find_tokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelLoadError) as info:
        find_tokenizer("clip_g", [tmp_path / "tokenizers"])
    message = str(info.value)
    assert "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k" in message and str(tmp_path / "tokenizers" / "clip_g") in message


def test_saved_tokenizer_folder_is_used(tmp_path):
    from engine.models.checkpoint import find_tokenizer
    from engine.models.demo import write_demo_tokenizer

    write_demo_tokenizer(tmp_path / "tokenizers" / "clip_l")
    tokenizer = find_tokenizer("clip_l", [tmp_path / "tokenizers"])
    assert tokenizer("a cat").input_ids[0] == tokenizer.bos_token_id
