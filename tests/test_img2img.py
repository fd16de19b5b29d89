"""The product's own photo: LoadImage, ImageScale, Canny, VAEEncode, img2img with denoise < 1, and
inpainting with VAEEncodeForInpaint / SetLatentNoiseMask (engine/nodes/image_input.py), on the demo model."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine.errors import ExecutionError, WorkflowInvalid
from engine.nodes.context import NodeContext
from engine.nodes.image_input import (
    Canny, ImageScale, LoadImage, SetLatentNoiseMask, VAEEncode, VAEEncodeForInpaint, canny_edges,
)
from engine.nodes.sampling import KSampler
from engine.runtime import Engine
from engine.settings import DEMO_CHECKPOINT, Settings

SIZE = 64


def product_photo(size=SIZE):
    """A product-like picture: a warm object on a cool background, with an alpha hole in one corner."""
    y, x = np.mgrid[0:size, 0:size]
    rgba = np.zeros((size, size, 4), dtype=np.uint8)
    rgba[..., 0] = 40 + x * 2
    rgba[..., 1] = 90 + y
    rgba[..., 2] = 200
    rgba[size // 4: 3 * size // 4, size // 4: 3 * size // 4, :3] = [230, 120, 40]
    rgba[..., 3] = 255
    rgba[:24, :24, 3] = 0
    return Image.fromarray(rgba, "RGBA")


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("img2img")
    settings = Settings(data_dir=str(root / "data"), models_dir=str(root / "models"), device="cpu")
    (settings.input_path / "shop").mkdir(parents=True)
    product_photo().save(settings.input_path / "shop" / "sneaker.png")
    (root / "data" / "secret.png").write_bytes(b"not for workflows")
    return Engine(settings)


@pytest.fixture()
def ctx(engine, tmp_path):
    return NodeContext(models=engine.models, output_dir=tmp_path, temp_dir=tmp_path,
                       input_dir=engine.settings.input_path)


def img2img(denoise, seed=6, inpaint=None):
    wf = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": DEMO_CHECKPOINT}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a sneaker in a jungle"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "10": {"class_type": "LoadImage", "inputs": {"image": "shop/sneaker.png", "upload": "image"}},
        "11": {"class_type": "VAEEncode", "inputs": {"pixels": ["10", 0], "vae": ["1", 2]}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["11", 0],
            "seed": seed, "steps": 4, "cfg": 3.0, "sampler_name": "euler", "scheduler": "simple",
            "denoise": denoise}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "img2img"}},
    }
    if inpaint == "set_mask":
        wf["12"] = {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["11", 0], "mask": ["10", 1]}}
        wf["5"]["inputs"]["latent_image"] = ["12", 0]
    elif inpaint == "vae_encode":
        wf["11"] = {"class_type": "VAEEncodeForInpaint",
                    "inputs": {"pixels": ["10", 0], "vae": ["1", 2], "mask": ["10", 1], "grow_mask_by": 6}}
    return wf


def pixels(result):
    return np.asarray(Image.open(result.images[0].path)).astype(np.float32)


def roundtrip(engine):
    """The input photo through the demo VAE (its random weights do not reproduce the photo itself)."""
    return pixels(engine.run(img2img(denoise=0.0)))


def test_lower_denoise_stays_closer_to_the_input(engine):
    reference = roundtrip(engine)
    half = pixels(engine.run(img2img(denoise=0.5)))
    full = pixels(engine.run(img2img(denoise=1.0)))
    assert 0 < np.abs(half - reference).mean() < np.abs(full - reference).mean()


def test_noise_mask_keeps_the_latent_outside_the_mask(engine, ctx):
    model, clip, vae = engine.models.checkpoint(DEMO_CHECKPOINT)
    image = torch.rand(1, SIZE, SIZE, 3, generator=torch.Generator().manual_seed(2))
    (latent,) = VAEEncode().run(ctx, pixels=image, vae=vae)
    mask = torch.zeros(1, SIZE, SIZE)
    mask[:, :, : SIZE // 2] = 1.0  # repaint the left half
    (masked,) = SetLatentNoiseMask().run(ctx, samples=latent, mask=mask)
    embeds, pooled = clip.encode("a sneaker")
    from engine.nodes.types import Conditioning

    cond = Conditioning.single(embeds, pooled)
    (out,) = KSampler().run(ctx, model=model, seed=1, steps=3, cfg=2.0, sampler_name="euler",
                            scheduler="simple", positive=cond, negative=cond.zeroed(), latent_image=masked,
                            denoise=1.0)
    half = latent["samples"].shape[-1] // 2
    # the last Euler step lands on the kept latent up to rounding (x - (x - denoised))
    assert torch.allclose(out["samples"][..., half:], latent["samples"][..., half:], atol=1e-5)
    assert (out["samples"][..., :half] - latent["samples"][..., :half]).abs().mean() > 0.1


@pytest.mark.parametrize("inpaint", ["set_mask", "vae_encode"])
def test_inpaint_keeps_pixels_outside_the_mask_close(engine, inpaint):
    reference = roundtrip(engine)
    out = pixels(engine.run(img2img(denoise=1.0, inpaint=inpaint)))
    # the photo's transparent corner (top-left 24x24) is the mask; compare far from it
    outside = np.abs(out[40:, 40:] - reference[40:, 40:]).mean()
    inside = np.abs(out[:16, :16] - reference[:16, :16]).mean()
    plain = np.abs(pixels(engine.run(img2img(denoise=1.0)))[40:, 40:] - reference[40:, 40:]).mean()
    # The latent outside the mask is kept exactly (see above); in pixels the demo VAE's mid-block
    # attention spreads some of the repainted corner over the whole image, so "close" is relative.
    assert outside < inside / 2 and outside < plain


def test_vae_encode_for_inpaint_greys_the_masked_pixels_and_grows_the_mask(engine, ctx):
    vae = engine.models.checkpoint(DEMO_CHECKPOINT)[2]
    image = torch.rand(1, SIZE + 5, SIZE + 3, 3, generator=torch.Generator().manual_seed(3))
    mask = torch.zeros(1, SIZE + 5, SIZE + 3)
    mask[:, 30:34, 30:34] = 1.0
    (latent,) = VAEEncodeForInpaint().run(ctx, pixels=image, vae=vae, mask=mask, grow_mask_by=6)
    assert latent["samples"].shape[-2:] == (SIZE // 8, SIZE // 8)  # cropped to a multiple of 8
    grown = latent["noise_mask"]
    assert grown.shape == (1, 1, SIZE, SIZE) and set(grown.unique().tolist()) == {0.0, 1.0}
    assert 16 < grown.sum() <= 10 * 10
    greyed = image.clone()[:, 2: 2 + SIZE, 1: 1 + SIZE]
    greyed[:, 28:32, 29:33] = 0.5
    assert torch.allclose(latent["samples"], vae.encode(greyed), atol=1e-5)


def test_load_image_gives_the_alpha_as_an_inverted_mask(ctx):
    image, mask = LoadImage().run(ctx, image="shop/sneaker.png")
    assert image.shape == (1, SIZE, SIZE, 3) and mask.shape == (1, SIZE, SIZE)
    assert mask[0, :24, :24].min() == 1.0 and mask[0, 24:, 24:].max() == 0.0
    assert torch.allclose(image[0, 20, 20], torch.tensor([230, 120, 40]) / 255.0)


def test_load_image_refuses_paths_outside_the_input_folder(engine, ctx):
    for name in ("../secret.png", "/etc/passwd", "shop/../../secret.png"):
        wf = img2img(denoise=0.5)
        wf["10"]["inputs"]["image"] = name
        with pytest.raises(WorkflowInvalid) as info:
            engine.validate(wf)
        (problem,) = info.value.problems
        assert (problem.input_name, problem.type) == ("image", "value_not_in_list")
        assert "outside the input folder" in problem.message
        with pytest.raises(ExecutionError, match="outside the input folder"):
            LoadImage().run(ctx, image=name)
    wf = img2img(denoise=0.5)
    wf["10"]["inputs"]["image"] = "missing.png"
    with pytest.raises(WorkflowInvalid, match="Invalid image file: missing.png"):
        engine.validate(wf)


def test_image_scale_methods_and_center_crop(ctx):
    wide = torch.rand(2, 40, 80, 3)
    for method in ("nearest-exact", "bilinear", "area", "bicubic", "lanczos"):
        (out,) = ImageScale().run(ctx, image=wide, upscale_method=method, width=32, height=32, crop="center")
        assert out.shape == (2, 32, 32, 3)
    (cropped,) = ImageScale().run(ctx, image=wide, upscale_method="nearest-exact", width=40, height=40, crop="center")
    assert torch.equal(cropped, wide[:, :, 20:60])  # the centre square, untouched at the same scale
    (kept,) = ImageScale().run(ctx, image=wide, upscale_method="bilinear", width=0, height=20, crop="disabled")
    assert kept.shape == (2, 20, 40, 3)


def test_canny_finds_the_outline_of_a_box(ctx):
    image = torch.zeros(1, 48, 48, 3)
    image[:, 12:36, 12:36] = 1.0
    (edges,) = Canny().run(ctx, image=image, low_threshold=0.1, high_threshold=0.3)
    assert edges.shape == (1, 48, 48, 3) and set(edges.unique().tolist()) == {0.0, 1.0}
    ring = edges[0, 9:39, 9:39, 0].clone()
    ring[6:24, 6:24] = 0
    assert edges[0, ..., 0].sum() == ring.sum() > 40  # every edge lies on the box outline
    assert edges[0, 20:28, 20:28].sum() == 0
    weak_only = canny_edges(image * 0.05, 0.1, 0.3)  # gradients below the thresholds: no edges
    assert weak_only.sum() == 0
    with pytest.raises(WorkflowInvalid):
        from engine.nodes import default_registry
        from engine.validate import ensure_valid
        from engine.workflow import parse_workflow

        registry = default_registry()
        ensure_valid(parse_workflow({
            "1": {"class_type": "LoadImage", "inputs": {"image": "shop/sneaker.png"}},
            "2": {"class_type": "Canny", "inputs": {"image": ["1", 0], "low_threshold": 0.8, "high_threshold": 0.2}},
            "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}},
        }, registry), registry, ctx)


@pytest.mark.parametrize("mode", ["inpaint", "img2img"])
def test_product_in_scene_template_runs_with_the_uploaded_photo(engine, mode):
    from pathlib import Path

    from engine.templates import load_template

    template = load_template(Path(__file__).parent.parent / "templates" / "product_in_scene")
    wf = template.render({"product_name": "sneaker", "product_photo": "shop/sneaker.png", "mode": mode, "seed": 1,
                          "width": 256, "height": 256, "steps": 2}, defaults={"checkpoint": DEMO_CHECKPOINT})
    result = engine.run(wf)
    assert (result.images[0].width, result.images[0].height) == (256, 256)
    assert result.record["denoise"] == (1.0 if mode == "inpaint" else 0.6)


def test_a_16_bit_png_loads_at_its_grey_levels_not_clipped_to_white(ctx):
    from PIL import Image

    from engine.nodes.image_input import LoadImageMask

    levels = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (8, 1))  # black to white across
    path = Path(ctx.input_dir) / "sixteen_bit.png"
    Image.fromarray(levels).save(path)
    assert Image.open(path).mode in ("I;16", "I")  # as Pillow opens 16-bit greyscale PNGs
    image, _mask = LoadImage().run(ctx, image="sixteen_bit.png")
    row = image[0, 0, :, 0].numpy()
    assert row[0] == 0.0 and row[-1] == 1.0 and abs(float(image.mean()) - 0.5) < 0.02
    (mask,) = LoadImageMask().run(ctx, image="sixteen_bit.png", channel="red")
    assert abs(float(mask.mean()) - 0.5) < 0.02


def test_an_animated_image_of_many_full_size_frames_is_refused_before_it_is_decoded(ctx):
    """A few KB of animated PNG can hold frame after frame of a large picture; decoding them all as float RGB
    took a server past its memory (Pillow checks each frame, not their sum). Here 2 frames of 56 million
    pixels: each under Pillow's own limit, together over what one LoadImage may load."""
    first = Image.new("L", (8000, 7000), 10)
    second = first.copy()
    second.putpixel((0, 0), 200)  # only one pixel differs: the file stays small
    path = Path(ctx.input_dir) / "flipbook.png"
    first.save(path, save_all=True, append_images=[second], duration=40)
    assert path.stat().st_size < 200_000
    with pytest.raises(ExecutionError, match="2 frame\\(s\\) of 8000x7000"):
        LoadImage().run(ctx, image="flipbook.png")
