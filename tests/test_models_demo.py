"""The built-in demo model: deterministic, SD3.5-shaped, encodes and decodes sensibly."""

from __future__ import annotations

import pytest
import torch

from engine.models.demo import build_demo_components, demo_checkpoint_bytes, demo_handles, demo_sha256
from engine.nodes.types import Conditioning


@pytest.fixture(scope="module")
def demo(demo_components):
    from engine.models.checkpoint import handles_from_components

    return handles_from_components(demo_components, "sd35_demo_tiny", is_demo=True)


def test_two_builds_have_identical_weights(demo_components):
    again = build_demo_components()
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        first, second = demo_components[name].state_dict(), again[name].state_dict()
        assert first.keys() == second.keys()
        assert all(torch.equal(first[k], second[k]) for k in first), name
    assert demo_checkpoint_bytes() == demo_checkpoint_bytes()
    assert len(demo_sha256()) == 64


def test_demo_keeps_sd35_structure(demo_components):
    config = demo_components["transformer"].config
    assert (config.in_channels, config.out_channels, config.patch_size) == (16, 16, 2)
    assert config.qk_norm == "rms_norm" and 0 in config.dual_attention_layers
    assert config.pos_embed_max_size * config.patch_size * 8 >= 1024  # 1024x1024 images fit
    assert config.joint_attention_dim > 64  # wider than CLIP-L + CLIP-G: the padding path runs
    vae = demo_components["vae"].config
    assert vae.latent_channels == 16 and len(vae.block_out_channels) == 4
    assert demo_components["text_encoder_3"] is None


def test_encode_shapes_padding_and_pooled(demo, demo_components):
    model, clip, _ = demo
    embeds, pooled = clip.encode(["a red fox in the snow", "a lighthouse"])
    assert embeds.shape == (2, 77 + 256, model.joint_attention_dim)
    assert pooled.shape == (2, model.pooled_projection_dim)
    clip_width = 32 + 32
    assert embeds[:, :77, :clip_width].abs().sum() > 0
    assert torch.count_nonzero(embeds[:, :77, clip_width:]) == 0  # CLIP zero-padded to the joint width
    assert torch.count_nonzero(embeds[:, 77:]) == 0  # no T5: zeros, as diffusers does
    assert not torch.equal(embeds[0], embeds[1])


def test_encode_matches_diffusers_encode_prompt(demo, demo_components):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), **demo_components)
    ours, ours_pooled = demo[1].encode(["a castle on a hill"], ["oil painting"], empty_padding="empty_prompt")
    ref, _, ref_pooled, _ = pipe.encode_prompt(
        "a castle on a hill", "oil painting", None, do_classifier_free_guidance=False
    )
    assert torch.equal(ours, ref)
    assert torch.equal(ours_pooled, ref_pooled)


def test_empty_text_none_padding_gives_zeros_and_empty_prompt_does_not(demo):
    clip = demo[1]
    zeros, zero_pooled = clip.encode([""], empty_padding="none")
    assert torch.count_nonzero(zeros) == 0 and torch.count_nonzero(zero_pooled) == 0
    encoded, encoded_pooled = clip.encode([""], empty_padding="empty_prompt")
    assert torch.count_nonzero(encoded) > 0 and torch.count_nonzero(encoded_pooled) > 0
    with pytest.raises(ValueError, match="empty_prompt"):
        clip.encode(["x"], empty_padding="zeros")


def test_long_prompt_is_truncated_to_77_tokens(demo, caplog):
    clip = demo[1]
    long_text = " ".join(["word"] * 120)
    assert clip.count_tokens(long_text) > 77
    with caplog.at_level("WARNING"):
        embeds, _ = clip.encode([long_text])
    assert embeds.shape[1] == 77 + 256
    assert "truncated" in caplog.text


def test_decode_image_convention_and_tiled_matches_untiled(demo):
    vae = demo[2]
    latents = torch.randn(1, 16, 48, 40, generator=torch.Generator().manual_seed(0))
    image = vae.decode(latents)
    assert image.shape == (1, 384, 320, 3)
    assert torch.isfinite(image).all() and 0.0 <= image.min() and image.max() <= 1.0
    assert image.std() > 0.02  # not a flat (black) image
    tiled = vae.decode(latents, tiled=True, tile_size=192, overlap=64)
    assert (tiled - image).abs().mean() < 0.03


def test_encode_decode_round_trip_shapes(demo):
    vae = demo[2]
    images = torch.rand(2, 64, 96, 3)
    latents = vae.encode(images)
    assert latents.shape == (2, 16, 8, 12)
    assert vae.decode(latents).shape == (2, 64, 96, 3)


def test_conditioning_helpers(demo):
    embeds, pooled = demo[1].encode(["a"])
    cond = Conditioning.single(embeds, pooled, prompt="a")
    both = cond.combine(cond.with_timestep_range(0.2, 0.8))
    assert len(both) == 2 and [e.start for e in both] == [0.0, 0.2]
    zeroed = both.zeroed()
    assert all(torch.count_nonzero(e.prompt_embeds) == 0 for e in zeroed)
    assert torch.count_nonzero(cond.entries[0].prompt_embeds) > 0  # the original is untouched


def test_with_shift_shares_the_transformer():
    model = demo_handles()[0]
    shifted = model.with_shift(6.0)
    assert shifted.shift == 6.0 and model.shift == 3.0
    assert shifted.transformer is model.transformer


def test_full_resolution_forward_is_finite(demo):
    model, clip, _ = demo
    embeds, pooled = clip.encode(["a", ""])
    latents = torch.randn(2, 16, 128, 128, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        out = model.transformer(
            hidden_states=latents, encoder_hidden_states=embeds, pooled_projections=pooled,
            timestep=torch.tensor([500.0, 500.0]),
        ).sample
    assert out.shape == latents.shape and torch.isfinite(out).all()
