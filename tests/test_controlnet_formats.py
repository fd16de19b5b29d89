"""Stability's original SD3.5 ControlNet file layout (sd3.5_large_controlnet_{blur,canny,depth}), loaded by
engine/controlnet.py. The files are written here from a tiny SD3.5-Large-style SD3ControlNetModel with the
original MMDiT names (ComfyUI's ControlNetEmbedder / DismantledBlock), spelled out independently of the
loader's mapping."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from engine.controlnet import load_controlnet, preprocess_control_image
from engine.errors import ModelLoadError
from engine.runtime import Engine
from engine.settings import DEMO_CHECKPOINT, Settings

EXAMPLE = Path(__file__).parent / "data" / "comfyui-examples" / "sd3.5_large_canny_controlnet_example.api.json"
SIZE = 64
CANNY = 1  # the file's control_type scalar: 0 blur, 1 canny, 2 depth


def tiny_sd35_controlnet(width=32, heads=2, layers=2, seed=7):
    """An SD3.5 Large ControlNet in miniature: no patch embedding, no text input, no zero pooled
    projections; the zero-initialised parts are made random so the outputs say something."""
    from diffusers import SD3ControlNetModel

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = SD3ControlNetModel(
            patch_size=2, in_channels=16, out_channels=16, num_layers=layers, attention_head_dim=width // heads,
            num_attention_heads=heads, joint_attention_dim=None, caption_projection_dim=width,
            pooled_projection_dim=64, pos_embed_max_size=None, pos_embed_type=None, use_pos_embed=False,
            force_zeros_for_pooled_projection=False,
        )
        for module in (*net.controlnet_blocks, net.pos_embed_input.proj):
            torch.nn.init.normal_(module.weight, std=0.3)
            torch.nn.init.normal_(module.bias, std=0.3)
    return net.eval()


def original_layout(net, control_type=CANNY, embedder_names="diffusers"):
    """The tensors of ``net`` as Stability's original files name them.

    Blocks are MMDiT DismantledBlocks: one fused ``attn.qkv`` (rows q, k, v), ``attn.proj``, ``mlp.fc1``/
    ``mlp.fc2`` and ``adaLN_modulation.1`` (the Linear after the SiLU). The embedders keep diffusers'
    ``time_text_embed`` names in Stability's files; ComfyUI also reads its own ``t_embedder``/``y_embedder``.
    """
    out = {}
    for index, block in enumerate(net.transformer_blocks):
        attn = block.attn
        for kind in ("weight", "bias"):
            prefix = f"transformer_blocks.{index}."
            out[prefix + f"attn.qkv.{kind}"] = torch.cat(
                [getattr(attn.to_q, kind), getattr(attn.to_k, kind), getattr(attn.to_v, kind)])
            out[prefix + f"attn.proj.{kind}"] = getattr(attn.to_out[0], kind)
            out[prefix + f"mlp.fc1.{kind}"] = getattr(block.ff.net[0].proj, kind)
            out[prefix + f"mlp.fc2.{kind}"] = getattr(block.ff.net[2], kind)
            out[prefix + f"adaLN_modulation.1.{kind}"] = getattr(block.norm1.linear, kind)
    for kind in ("weight", "bias"):
        for index, linear in enumerate(net.controlnet_blocks):
            out[f"controlnet_blocks.{index}.{kind}"] = getattr(linear, kind)
        out[f"pos_embed_input.proj.{kind}"] = getattr(net.pos_embed_input.proj, kind)
        embedders = net.time_text_embed
        names = {
            "diffusers": ("time_text_embed.timestep_embedder.linear_1", "time_text_embed.timestep_embedder.linear_2",
                          "time_text_embed.text_embedder.linear_1", "time_text_embed.text_embedder.linear_2"),
            "comfyui": ("t_embedder.mlp.0", "t_embedder.mlp.2", "y_embedder.mlp.0", "y_embedder.mlp.2"),
        }[embedder_names]
        modules = (embedders.timestep_embedder.linear_1, embedders.timestep_embedder.linear_2,
                   embedders.text_embedder.linear_1, embedders.text_embedder.linear_2)
        for name, module in zip(names, modules):
            out[f"{name}.{kind}"] = getattr(module, kind)
    if control_type is not None:
        out["control_type"] = torch.tensor(float(control_type))
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def write(path, tensors, head_dim=16):
    metadata = {"attention_head_dim": str(head_dim)} if head_dim is not None else None
    save_file(tensors, str(path), metadata=metadata)
    return path


def controlnet_inputs(width, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(2, 16, width, generator=generator),  # 4x4 patches, already embedded
        controlnet_cond=torch.randn(2, 16, 8, 8, generator=generator),
        pooled_projections=torch.randn(2, 64, generator=generator),
        timestep=torch.tensor([800.0, 300.0]),
        conditioning_scale=0.8,
    )


def run(net, inputs):
    with torch.inference_mode():
        return net(**inputs, return_dict=False)[0]


@pytest.mark.parametrize("embedder_names", ["diffusers", "comfyui"])
def test_original_layout_loads_to_a_bit_identical_controlnet(tmp_path, embedder_names):
    net = tiny_sd35_controlnet()
    path = write(tmp_path / "sd3.5_tiny_controlnet_canny.safetensors", original_layout(net, CANNY, embedder_names))
    handle = load_controlnet(path, path.name, "cpu", torch.float32)
    config = handle.controlnet.config
    assert (config.num_layers, config.num_attention_heads, config.attention_head_dim) == (2, 2, 16)
    assert config.joint_attention_dim is None and not config.use_pos_embed
    assert not config.force_zeros_for_pooled_projection and config.pooled_projection_dim == 64
    assert handle.control_type == "canny" and not handle.has_patch_embed and not handle.uses_text
    expected = net.state_dict()
    loaded = handle.controlnet.state_dict()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)
    inputs = controlnet_inputs(32)
    for ours, theirs in zip(run(handle.controlnet, inputs), run(net, inputs), strict=True):
        assert torch.equal(ours, theirs)


def mmdit_controlnet_reference(tensors, tokens, hint, pooled, timestep, heads, scale):
    """ComfyUI's ControlNetEmbedder forward over the original tensors (tokens already patch-embedded)."""
    F = torch.nn.functional

    def linear(name, x):
        return F.linear(x, tensors[f"{name}.weight"], tensors[f"{name}.bias"])

    half = 128  # 256 sinusoidal frequencies, cos first (MMDiT's TimestepEmbedder)
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = timestep[:, None].float() * freqs[None]
    t_freq = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    timestep_mlp, text_mlp = "time_text_embed.timestep_embedder", "time_text_embed.text_embedder"
    c = linear(f"{timestep_mlp}.linear_2", F.silu(linear(f"{timestep_mlp}.linear_1", t_freq)))
    c = c + linear(f"{text_mlp}.linear_2", F.silu(linear(f"{text_mlp}.linear_1", pooled)))
    w = tensors["pos_embed_input.proj.weight"]
    x = tokens + F.conv2d(hint, w, tensors["pos_embed_input.proj.bias"], stride=w.shape[-1]).flatten(2).transpose(1, 2)
    outs = []
    index = 0
    while f"transformer_blocks.{index}.attn.qkv.weight" in tensors:
        block = f"transformer_blocks.{index}"
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = linear(
            f"{block}.adaLN_modulation.1", F.silu(c)).chunk(6, dim=1)
        normed = F.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + scale_msa[:, None]) + shift_msa[:, None]
        qkv = linear(f"{block}.attn.qkv", normed)
        q, k, v = qkv.reshape(*qkv.shape[:2], 3, heads, -1).movedim(2, 0).transpose(2, 3)
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        x = x + gate_msa[:, None] * linear(f"{block}.attn.proj", attended)
        normed = F.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        mlp = linear(f"{block}.mlp.fc2", F.gelu(linear(f"{block}.mlp.fc1", normed), approximate="tanh"))
        x = x + gate_mlp[:, None] * mlp
        outs.append(linear(f"controlnet_blocks.{index}", x) * scale)
        index += 1
    return outs


def test_loaded_controlnet_computes_what_the_original_mmdit_blocks_compute(tmp_path):
    net = tiny_sd35_controlnet(seed=11)
    tensors = original_layout(net)
    handle = load_controlnet(write(tmp_path / "cn.safetensors", tensors), "cn.safetensors", "cpu", torch.float32)
    inputs = controlnet_inputs(32, seed=3)
    reference = mmdit_controlnet_reference(
        tensors, inputs["hidden_states"], inputs["controlnet_cond"], inputs["pooled_projections"],
        inputs["timestep"], heads=2, scale=inputs["conditioning_scale"])
    ours = run(handle.controlnet, inputs)
    assert len(ours) == len(reference) == 2
    for got, want in zip(ours, reference):
        assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    swapped = dict(tensors)  # the q/k/v order matters: k first gives other outputs
    for index in range(2):
        q, k, v = tensors[f"transformer_blocks.{index}.attn.qkv.weight"].chunk(3)
        swapped[f"transformer_blocks.{index}.attn.qkv.weight"] = torch.cat([k, q, v])
    other = load_controlnet(write(tmp_path / "swapped.safetensors", swapped), "swapped", "cpu", torch.float32)
    assert not torch.allclose(run(other.controlnet, inputs)[1], reference[1], atol=1e-3)


def test_head_width_is_64_unless_the_file_names_it(tmp_path):
    wide = tiny_sd35_controlnet(width=128, heads=2, layers=1)
    path = write(tmp_path / "wide.safetensors", original_layout(wide), head_dim=None)
    config = load_controlnet(path, "wide", "cpu", torch.float32).controlnet.config
    assert (config.num_attention_heads, config.attention_head_dim) == (2, 64)
    narrow = write(tmp_path / "narrow.safetensors", original_layout(tiny_sd35_controlnet()), head_dim=None)
    with pytest.raises(ModelLoadError, match="attention_head_dim"):
        load_controlnet(narrow, "narrow", "cpu", torch.float32)


def test_parts_the_diffusers_model_cannot_run_are_clear_errors(tmp_path):
    tensors = original_layout(tiny_sd35_controlnet())
    cases = {
        "control_type 7 is unknown": dict(tensors, control_type=torch.tensor(7.0)),
        r"no place for: \['transformer_blocks.0.attn.ln_q.weight'\]": dict(
            tensors, **{"transformer_blocks.0.attn.ln_q.weight": torch.ones(16)}),
        "second pooled-text embedder": dict(tensors, **{"orig_y_embedder.mlp.0.weight": torch.ones(32, 64)}),
        "17 channels": dict(tensors, **{"pos_embed_input.proj.weight": torch.ones(32, 17, 2, 2)}),
    }
    for message, broken in cases.items():
        path = write(tmp_path / "broken.safetensors", broken)
        with pytest.raises(ModelLoadError, match=message):
            load_controlnet(path, "broken", "cpu", torch.float32)
    del tensors["time_text_embed.text_embedder.linear_2.bias"]
    with pytest.raises(ModelLoadError, match="missing"):
        load_controlnet(write(tmp_path / "short.safetensors", tensors), "short", "cpu", torch.float32)


def test_stored_patch_embedding_is_not_used(tmp_path):
    """ComfyUI replaces a stored x_embedder with the transformer's; the loader leaves it out."""
    net = tiny_sd35_controlnet()
    tensors = original_layout(net)
    tensors.update({"pos_embed.proj.weight": torch.ones(32, 16, 2, 2), "pos_embed.proj.bias": torch.ones(32)})
    handle = load_controlnet(write(tmp_path / "with_x.safetensors", tensors), "with_x", "cpu", torch.float32)
    assert not handle.has_patch_embed
    inputs = controlnet_inputs(32)
    assert torch.equal(run(handle.controlnet, inputs)[0], run(net, inputs)[0])


def test_preprocessing_follows_the_control_type():
    image = torch.rand(1, 8, 8, 3, generator=torch.Generator().manual_seed(2))
    assert torch.equal(preprocess_control_image(image, "canny"), image * 255 * 0.5 + 0.5)
    assert torch.equal(preprocess_control_image(image, "depth"), 1.0 - image)
    assert preprocess_control_image(image, "blur") is image and preprocess_control_image(image, None) is image
    with pytest.raises(ValueError, match="canny"):
        preprocess_control_image(image, "pose")


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("controlnet_formats")
    folder = root / "models" / "controlnet"
    folder.mkdir(parents=True)
    net = tiny_sd35_controlnet()
    write(folder / "sd3.5_large_controlnet_canny.safetensors", original_layout(net, CANNY))
    write(folder / "sd3.5_large_controlnet_blur.safetensors", original_layout(net, 0))
    settings = Settings(data_dir=str(root / "data"), models_dir=str(root / "models"), device="cpu")
    settings.input_path.mkdir(parents=True)
    y, x = np.mgrid[0:96, 0:96]
    picture = np.stack([x / 96, y / 96, np.full_like(x, 0.3, dtype=float)], -1) * 120
    picture[24:72, 30:70] = [250, 240, 220]
    Image.fromarray(picture.astype(np.uint8)).save(settings.input_path / "layout.png")
    return Engine(settings)


def canny_example(controlnet="sd3.5_large_controlnet_canny.safetensors", strength=None):
    data = json.loads(EXAMPLE.read_text())
    values = {
        "CheckpointLoaderSimple": {"ckpt_name": DEMO_CHECKPOINT},
        "ControlNetLoader": {"control_net_name": controlnet},
        "LoadImage": {"image": "layout.png"},
        "EmptySD3LatentImage": {"width": SIZE, "height": SIZE},
        "ImageScale": {"width": SIZE, "height": SIZE},
        "KSampler": {"steps": 2},
        "ControlNetApplyAdvanced": {} if strength is None else {"strength": strength},
    }
    for node in data.values():
        node["inputs"].update(values.get(node["class_type"], {}))
    return data


def saved(result):
    (image,) = [i for i in result.images if i.type == "output"]
    return np.asarray(Image.open(image.path)).astype(np.int16)


def test_comfyui_canny_example_runs_with_the_original_layout_file(engine):
    workflow = canny_example()
    engine.validate(workflow)
    result = engine.run(workflow)
    assert sorted((i.width, i.height, i.type) for i in result.images) == [(SIZE, SIZE, "output"), (SIZE, SIZE, "temp")]
    (entry,) = result.record["controlnets"]
    assert entry["name"] == "sd3.5_large_controlnet_canny.safetensors" and entry["strength"] == 0.66
    canny = saved(result)
    assert not np.array_equal(canny, saved(engine.run(canny_example(strength=0.0))))
    # the same weights typed "blur" see the edges without the canny scaling: another image
    assert not np.array_equal(canny, saved(engine.run(canny_example("sd3.5_large_controlnet_blur.safetensors"))))


def test_canny_hint_is_encoded_after_the_canny_scaling(engine):
    from engine.controlnet import ControlHint

    _, _, vae = engine.models.checkpoint(DEMO_CHECKPOINT)
    control = engine.models.controlnet("sd3.5_large_controlnet_canny.safetensors")
    assert control.control_type == "canny"
    image = torch.rand(1, SIZE, SIZE, 3, generator=torch.Generator().manual_seed(5))
    hint = ControlHint(control=control, image=image, vae=vae)
    latent = hint.latent(SIZE // 8, SIZE // 8, 1, "cpu", torch.float32)
    assert torch.equal(latent, vae.encode(image * 255 * 0.5 + 0.5).float())
    assert not torch.allclose(latent, vae.encode(image).float())
