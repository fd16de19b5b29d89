"""SD3 ControlNets (engine/controlnet.py, engine/nodes/controlnet.py) and the canny preprocessing nodes,
with a tiny SD3ControlNetModel built here to match the demo transformer."""

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from engine.errors import ModelLoadError, ModelNotFound, WorkflowInvalid
from engine.runtime import Engine
from engine.settings import DEMO_CHECKPOINT, Settings

EXAMPLES = Path(__file__).parent / "data" / "comfyui-examples"
CANNY_EXAMPLE = "sd3.5_large_canny_controlnet_example"
SIZE = 128


def tiny_controlnet():
    """One block of the demo transformer's shape, with the zero-initialised parts made random so that the
    ControlNet visibly steers the image."""
    from diffusers import SD3ControlNetModel

    from engine.models.demo import TRANSFORMER_CONFIG

    config = dict(TRANSFORMER_CONFIG, num_layers=1, dual_attention_layers=())
    with torch.random.fork_rng():
        torch.manual_seed(123)
        net = SD3ControlNetModel(**config)
        for module in (*net.controlnet_blocks, net.pos_embed_input.proj):
            torch.nn.init.normal_(module.weight, std=0.3)
            torch.nn.init.normal_(module.bias, std=0.3)
    return net.eval()


def layout_image():
    """A 160x120 photo-like picture: a bright box on a gradient (its edges are the layout)."""
    y, x = np.mgrid[0:120, 0:160]
    image = np.stack([x / 160, y / 120, np.full_like(x, 0.3, dtype=float)], -1) * 120
    image[30:90, 50:110] = [250, 240, 220]
    return Image.fromarray(image.astype(np.uint8))


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("controlnet")
    folder = root / "models" / "controlnet"
    folder.mkdir(parents=True)
    net = tiny_controlnet()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(folder / "tiny_canny.safetensors"))
    net.save_pretrained(str(folder / "tiny_canny_diffusers"))
    save_file({"input_blocks.0.0.weight": torch.zeros(4, 4)}, str(folder / "sd15_canny.safetensors"))
    settings = Settings(data_dir=str(root / "data"), models_dir=str(root / "models"), device="cpu")
    settings.input_path.mkdir(parents=True)
    layout_image().save(settings.input_path / "layout.png")
    return Engine(settings)


def workflow(strength=1.0, controlnet="tiny_canny.safetensors", start=0.0, end=1.0, seed=4, node="ControlNetApplyAdvanced"):
    wf = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": DEMO_CHECKPOINT}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a sneaker on a table"}},
        "3": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["2", 0]}},
        "4": {"class_type": "EmptySD3LatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}},
        "10": {"class_type": "LoadImage", "inputs": {"image": "layout.png", "upload": "image"}},
        "11": {"class_type": "ImageScale", "inputs": {"image": ["10", 0], "upscale_method": "bilinear",
                                                        "width": SIZE, "height": SIZE, "crop": "center"}},
        "12": {"class_type": "Canny", "inputs": {"image": ["11", 0], "low_threshold": 0.1, "high_threshold": 0.3}},
        "13": {"class_type": "ControlNetLoader", "inputs": {"control_net_name": controlnet}},
        "14": {"class_type": node, "inputs": {
            "positive": ["2", 0], "negative": ["3", 0], "control_net": ["13", 0], "image": ["12", 0],
            "vae": ["1", 2], "strength": strength, "start_percent": start, "end_percent": end}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["14", 0], "negative": ["14", 1], "latent_image": ["4", 0],
            "seed": seed, "steps": 2, "cfg": 3.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "controlnet"}},
    }
    return wf


def base_workflow(seed=4):
    wf = workflow(seed=seed)
    wf["5"]["inputs"].update(positive=["2", 0], negative=["3", 0])
    for node in ("10", "11", "12", "13", "14"):
        del wf[node]
    return wf


def pixels(result):
    return np.asarray(Image.open(result.images[0].path)).astype(np.int16)


def test_strength_steers_the_image_and_zero_is_the_base_image(engine):
    base = pixels(engine.run(base_workflow()))
    zero = pixels(engine.run(workflow(strength=0.0)))
    half = pixels(engine.run(workflow(strength=0.5)))
    full = pixels(engine.run(workflow(strength=1.0)))
    assert np.array_equal(zero, base)
    assert 0 < np.abs(half - base).mean() < np.abs(full - base).mean()


def test_single_file_and_diffusers_folder_load_the_same_controlnet(engine):
    from_file = pixels(engine.run(workflow(controlnet="tiny_canny.safetensors", seed=8)))
    from_folder = pixels(engine.run(workflow(controlnet="tiny_canny_diffusers", seed=8)))
    sd3_node = pixels(engine.run(workflow(controlnet="tiny_canny_diffusers", seed=8, node="ControlNetApplySD3")))
    assert np.array_equal(from_file, from_folder)
    assert np.array_equal(from_folder, sd3_node)


def test_window_limits_when_the_controlnet_acts(engine):
    base = pixels(engine.run(base_workflow(seed=9)))
    full = pixels(engine.run(workflow(seed=9)))
    late = pixels(engine.run(workflow(seed=9, start=0.4, end=1.0)))  # sigma 0.75 (step 2) only
    assert not np.array_equal(late, base) and not np.array_equal(late, full)
    missed = pixels(engine.run(workflow(seed=9, start=0.6, end=1.0)))  # starts after sigma 0.75: never acts
    assert np.array_equal(missed, base)


def test_residuals_reach_the_transformer_as_diffusers_computes_them(engine):
    from engine.controlnet import ControlHint
    from engine.nodes.types import Conditioning
    from engine.sampling import FlowSchedule, GuidedDenoiser, RowConditioning

    model, clip, vae = engine.models.checkpoint(DEMO_CHECKPOINT)
    control = engine.models.controlnet("tiny_canny.safetensors")
    embeds, pooled = clip.encode("a lamp")
    image = torch.rand(1, SIZE, SIZE, 3, generator=torch.Generator().manual_seed(0))
    hint = ControlHint(control=control, image=image, vae=vae, strength=0.7)
    positive = Conditioning.single(embeds, pooled).entries[0].with_options(controlnets=(hint,))
    schedule = FlowSchedule(shift=model.shift)
    denoiser = GuidedDenoiser(model, [RowConditioning(Conditioning((positive,)), Conditioning(), 1)], 1.0, schedule)
    x = torch.randn(1, 16, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor(0.8)
    ours = denoiser.predict_velocity(x, sigma, embeds, pooled, [((hint,), x, embeds, pooled)])
    timestep = schedule.timestep(sigma).expand(1)
    cond = vae.encode(image) + vae.shift_factor * vae.scaling_factor  # InstantX-style: unshifted latents
    with torch.inference_mode():
        blocks = control.controlnet(hidden_states=x, controlnet_cond=cond, conditioning_scale=0.7,
                                    encoder_hidden_states=embeds, pooled_projections=torch.zeros_like(pooled),
                                    timestep=timestep, return_dict=False)[0]
        expected = model.transformer(hidden_states=x, encoder_hidden_states=embeds, pooled_projections=pooled,
                                     timestep=timestep, block_controlnet_hidden_states=blocks, return_dict=False)[0]
        plain = model.transformer(hidden_states=x, encoder_hidden_states=embeds, pooled_projections=pooled,
                                  timestep=timestep, return_dict=False)[0]
    assert torch.allclose(ours, expected, atol=1e-5)
    assert not torch.allclose(ours, plain, atol=1e-3)


def test_record_names_the_controlnet(engine):
    result = engine.run(workflow(strength=0.66, start=0.1, end=0.9))
    (entry,) = result.record["controlnets"]
    assert entry["name"] == "tiny_canny.safetensors" and entry["strength"] == 0.66
    assert (entry["start_percent"], entry["end_percent"]) == (0.1, 0.9) and len(entry["sha256"]) == 64


def test_missing_and_wrong_controlnets_are_clear_errors(engine):
    with pytest.raises(WorkflowInvalid) as info:
        engine.validate(workflow(controlnet="missing.safetensors", start=0.8, end=0.2))
    kinds = {(p.input_name, p.type) for p in info.value.problems}
    assert kinds == {("control_net_name", "value_not_in_list"), ("end_percent", "value_smaller_than_min")}
    with pytest.raises(ModelNotFound) as missing:
        engine.models.controlnet("missing.safetensors")
    assert "tiny_canny.safetensors" in missing.value.available
    with pytest.raises(ModelLoadError, match="not an SD3 ControlNet"):
        engine.run(workflow(controlnet="sd15_canny.safetensors"))
    no_vae = workflow()
    del no_vae["14"]["inputs"]["vae"]
    with pytest.raises(Exception, match="connect the 'vae' input"):
        engine.run(no_vae)


def canny_example(kind):
    """The official ComfyUI canny example with our demo checkpoint, tiny ControlNet and small sizes."""
    data = json.loads((EXAMPLES / f"{CANNY_EXAMPLE}.{kind}.json").read_text())
    values = {
        "CheckpointLoaderSimple": {"ckpt_name": DEMO_CHECKPOINT},
        "ControlNetLoader": {"control_net_name": "tiny_canny.safetensors"},
        "LoadImage": {"image": "layout.png"},
        "EmptySD3LatentImage": {"width": SIZE, "height": SIZE},
        "ImageScale": {"width": SIZE, "height": SIZE},
        "KSampler": {"steps": 2},
    }
    if kind == "api":
        for node in data.values():
            node["inputs"].update(values.get(node["class_type"], {}))
        return data
    positions = {  # widget positions in the UI file
        "CheckpointLoaderSimple": {"ckpt_name": 0}, "ControlNetLoader": {"control_net_name": 0},
        "LoadImage": {"image": 0}, "EmptySD3LatentImage": {"width": 0, "height": 1},
        "ImageScale": {"width": 1, "height": 2}, "KSampler": {"steps": 2},
    }
    data = copy.deepcopy(data)
    for node in data["nodes"]:
        for name, index in positions.get(node["type"], {}).items():
            node["widgets_values"][index] = values[node["type"]][name]
    return data


@pytest.mark.parametrize("kind", ["api", "ui"])
def test_comfyui_canny_example_validates_and_runs(engine, kind):
    workflow_data = canny_example(kind)
    engine.validate(workflow_data)
    result = engine.run(workflow_data)
    sizes = sorted((image.width, image.height, image.type) for image in result.images)
    assert sizes == [(SIZE, SIZE, "output"), (SIZE, SIZE, "temp")]
    assert result.record["controlnets"][0]["strength"] == 0.66


def test_controlnet_layout_template_runs(engine):
    from engine.templates import load_template

    template = load_template(Path(__file__).parent.parent / "templates" / "controlnet_layout")
    values = {"prompt": "a bottle", "layout_image": "layout.png", "controlnet": "tiny_canny.safetensors", "seed": 1,
              "width": 256, "height": 256, "steps": 2, "control_strength": 0.5}
    result = engine.run(template.render(values, defaults={"checkpoint": DEMO_CHECKPOINT}))
    assert result.record["controlnets"][0]["strength"] == 0.5
