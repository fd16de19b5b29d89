"""Image input nodes: LoadImage, LoadImageMask, ImageScale, Canny, VAEEncode, VAEEncodeForInpaint and
SetLatentNoiseMask, following ComfyUI's behaviour.

Images are ComfyUI's IMAGE (float [B,H,W,C] in 0..1) and masks its MASK (float [B,H,W] or [H,W], 1 =
repaint). Files are read from the run's input folder (``ctx.input_dir``) only: a name may hold a
subfolder, but never an absolute path, ``..`` or a symlink that leads outside it. Latents come out in the
model space the sampler uses (see :mod:`engine.nodes.types`); a latent with a ``noise_mask`` is
inpainted by the sampler (only the masked region changes).
"""

from __future__ import annotations

import hashlib

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.errors import ExecutionError
from engine.nodes.base import Input, NodeType, Output

if TYPE_CHECKING:
    import torch

    from engine.nodes.context import NodeContext

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
UPSCALE_METHODS = ("nearest-exact", "bilinear", "area", "bicubic", "lanczos")
CROP_METHODS = ("disabled", "center")
MASK_CHANNELS = ("alpha", "red", "green", "blue")
MAX_RESOLUTION = 16384
# The most pixels one LoadImage decodes, every frame counted: an animated PNG, GIF or WebP of a few KB can
# hold hundreds of full-size frames, each decoded to float RGB (12 bytes a pixel). Pillow's own bomb check
# looks at one frame only. 100 million pixels are about 1.2 GB as an IMAGE.
MAX_LOADED_PIXELS = 100_000_000
ANNOTATION = " [input]"  # ComfyUI lets names carry the folder they come from


@dataclass(frozen=True)
class ImageFileInput(Input):
    """A file name from the input folder: a STRING for validation (existence is checked by the node,
    as ComfyUI's LoadImage does), listed like a COMBO of the folder's images in ``/object_info``."""

    def comfy_spec(self, ctx: "NodeContext | None" = None) -> list[Any]:
        files = list_input_images(ctx.input_dir) if ctx is not None and ctx.input_dir is not None else []
        return [files, {"image_upload": True}]


def list_input_images(folder: Path | None) -> list[str]:
    """Image files directly in ``folder`` (ComfyUI lists the top level), sorted."""
    if folder is None or not Path(folder).is_dir():
        return []
    return sorted(e.name for e in os.scandir(folder) if e.is_file() and e.name.lower().endswith(IMAGE_SUFFIXES))


def input_file_problem(input_dir: Path | None, name: Any) -> str | None:
    """Why ``name`` is not a readable file inside ``input_dir``, or None when it is."""
    problem = _input_file_problem(input_dir, name)
    return None if problem is None else problem[1]


def _input_file_problem(input_dir: Path | None, name: Any) -> tuple[str, str] | None:
    """:func:`input_file_problem` as ``(kind, reason)``; kind: no_input_folder, bad_name, outside, missing."""
    if input_dir is None:
        return "no_input_folder", "this engine has no input folder configured"
    if not isinstance(name, str) or not name.strip() or "\x00" in name:
        return "bad_name", f"invalid image file name {name!r}"
    clean = name[: -len(ANNOTATION)] if name.endswith(ANNOTATION) else name
    relative = Path(clean.replace("\\", "/"))
    if relative.is_absolute() or ".." in relative.parts:
        return "outside", f"image file '{name}' is outside the input folder (absolute paths and '..' are refused)"
    root = Path(input_dir).resolve()
    path = (root / relative).resolve()
    if os.path.commonpath((str(root), str(path))) != str(root):
        return "outside", f"image file '{name}' leads outside the input folder"
    if not path.is_file():
        return "missing", f"Invalid image file: {name}"
    return None


def input_file_path(ctx: "NodeContext", name: str) -> Path:
    """The file ``name`` names inside ``ctx.input_dir``; ExecutionError naming the problem otherwise."""
    problem = input_file_problem(ctx.input_dir, name)
    if problem is not None:
        raise ExecutionError(problem, node_id=ctx.node_id, class_type=ctx.class_type, image=name,
                             available=list_input_images(ctx.input_dir)[:50])
    clean = name[: -len(ANNOTATION)] if name.endswith(ANNOTATION) else name
    return (Path(ctx.input_dir).resolve() / clean.replace("\\", "/")).resolve()


def _check_image_name(values: dict[str, Any], ctx: "NodeContext | None") -> list[tuple[Any, ...]]:
    if ctx is None or "image" not in values:
        return []
    problem = _input_file_problem(ctx.input_dir, values["image"])
    if problem is None:
        return []
    kind, reason = problem
    available = list_input_images(ctx.input_dir)[:20]
    return [("image", "value_not_in_list", reason, f"available: {', '.join(available) or 'none'}",
             {"file_problem": kind, "received_value": str(values["image"]), "available": available})]


def _open_image(ctx: "NodeContext", path: Path):
    from PIL import Image, UnidentifiedImageError

    try:
        return Image.open(path)
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise ExecutionError(f"cannot read image '{path.name}': {exc}", node_id=ctx.node_id,
                             class_type=ctx.class_type, image=path.name) from exc


def _eight_bit(frame: Any) -> Any:
    """A greyscale frame of more than 8 bits (16-bit PNGs open as "I;16" or "I") as 8-bit "L".

    ComfyUI divides "I" by 255 and lets Pillow clip the rest, which turns a mid-grey 16-bit photo white;
    the range is scaled here instead: 0-65535 to 0-255 (an "I" frame whose values fit 8 bits is kept).
    """
    import numpy as np
    from PIL import Image

    if frame.mode not in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        return frame
    values = np.asarray(frame).astype(np.float64)
    if frame.mode == "I" and values.size and values.max() <= 255 and values.min() >= 0:
        return Image.fromarray(values.astype(np.uint8))
    return Image.fromarray(np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8))


def load_image_file(ctx: "NodeContext", path: Path) -> tuple["torch.Tensor", "torch.Tensor"]:
    """(IMAGE [F,H,W,3], MASK [F,H,W]) of a file: every frame of the first frame's size, EXIF-rotated.

    The mask is 1 - alpha (ComfyUI's convention); without alpha it is 64x64 zeros, as in ComfyUI.
    """
    import numpy as np
    import torch
    from PIL import Image, ImageOps, ImageSequence

    images, masks = [], []
    size = None
    with _open_image(ctx, path) as img:
        frames, (width, height) = getattr(img, "n_frames", 1), img.size
        if frames * width * height > MAX_LOADED_PIXELS:  # refused before a single frame is decoded
            raise ExecutionError(
                f"image '{path.name}' is {frames} frame(s) of {width}x{height}, more than the "
                f"{MAX_LOADED_PIXELS:,} pixels one image may load", node_id=ctx.node_id, class_type=ctx.class_type,
                image=path.name, frames=frames, width=width, height=height, max_pixels=MAX_LOADED_PIXELS,
            )
        try:
            for frame in ImageSequence.Iterator(img):
                frame = _eight_bit(ImageOps.exif_transpose(frame))
                rgb = frame.convert("RGB")
                if size is None:
                    size = rgb.size
                if rgb.size != size:
                    continue
                images.append(torch.from_numpy(np.array(rgb).astype(np.float32) / 255.0))
                if "A" in frame.getbands():
                    alpha = np.array(frame.getchannel("A")).astype(np.float32) / 255.0
                    masks.append(1.0 - torch.from_numpy(alpha))
                elif frame.mode == "P" and "transparency" in frame.info:
                    alpha = np.array(frame.convert("RGBA").getchannel("A")).astype(np.float32) / 255.0
                    masks.append(1.0 - torch.from_numpy(alpha))
                else:
                    masks.append(torch.zeros((64, 64), dtype=torch.float32))
        except (OSError, Image.DecompressionBombError) as exc:
            raise ExecutionError(f"cannot read image '{path.name}': {exc}", node_id=ctx.node_id,
                                 class_type=ctx.class_type, image=path.name) from exc
    if not images:
        raise ExecutionError(f"image '{path.name}' has no frames", node_id=ctx.node_id, class_type=ctx.class_type)
    if any(m.shape != masks[0].shape for m in masks):
        masks = [m if m.shape == images[0].shape[:2] else torch.zeros(images[0].shape[:2]) for m in masks]
    return torch.stack(images), torch.stack(masks)


def input_file_fingerprint(values: dict[str, Any], ctx: "NodeContext | None") -> str | None:
    """The content hash of the image a loader reads, so the cache never serves another file's pixels."""
    if ctx is None or ctx.input_dir is None:
        return None
    path = input_file_path(ctx, str(values.get("image", "")))
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class LoadImage(NodeType):
    """An image (and its alpha as a mask) from the input folder."""

    class_type = "LoadImage"
    category = "image"
    inputs = (ImageFileInput("image", "STRING", trailing_ui_widgets=1),)  # + ComfyUI's "upload" button
    outputs = (Output("IMAGE"), Output("MASK"))

    @classmethod
    def check(cls, values: dict[str, Any], ctx: "NodeContext | None") -> list[tuple[str | None, str, str, str]]:
        return _check_image_name(values, ctx)

    @classmethod
    def fingerprint(cls, values: dict[str, Any], ctx: "NodeContext | None") -> str | None:
        return input_file_fingerprint(values, ctx)

    def run(self, ctx: "NodeContext", image: str) -> tuple[Any, Any]:
        return load_image_file(ctx, input_file_path(ctx, image))


class LoadImageMask(NodeType):
    """One channel of an image from the input folder as a mask (alpha is inverted: opaque = keep)."""

    class_type = "LoadImageMask"
    category = "mask"
    inputs = (
        ImageFileInput("image", "STRING", trailing_ui_widgets=1),
        Input("channel", "COMBO", default="alpha", choices=MASK_CHANNELS),
    )
    outputs = (Output("MASK"),)

    @classmethod
    def check(cls, values: dict[str, Any], ctx: "NodeContext | None") -> list[tuple[str | None, str, str, str]]:
        return _check_image_name(values, ctx)

    @classmethod
    def fingerprint(cls, values: dict[str, Any], ctx: "NodeContext | None") -> str | None:
        return input_file_fingerprint(values, ctx)

    def run(self, ctx: "NodeContext", image: str, channel: str = "alpha") -> tuple[Any]:
        import numpy as np
        import torch
        from PIL import ImageOps

        path = input_file_path(ctx, image)
        with _open_image(ctx, path) as img:
            frame = _eight_bit(ImageOps.exif_transpose(img))
            if frame.getbands() != ("R", "G", "B", "A"):
                frame = frame.convert("RGBA")
            band = {"alpha": "A", "red": "R", "green": "G", "blue": "B"}[channel]
            mask = torch.from_numpy(np.array(frame.getchannel(band)).astype(np.float32) / 255.0)
        if channel == "alpha":
            mask = 1.0 - mask
        return (mask.unsqueeze(0),)


# --- scaling and edges -------------------------------------------------------------------------------


def scale_images(images: "torch.Tensor", method: str, width: int, height: int, crop: str) -> "torch.Tensor":
    """ComfyUI's ``common_upscale`` on IMAGE [B,H,W,C]; a 0 side keeps the aspect ratio."""
    import torch

    if method not in UPSCALE_METHODS:
        raise ValueError(f"upscale_method {method!r} not supported; supported: {', '.join(UPSCALE_METHODS)}")
    if crop not in CROP_METHODS:
        raise ValueError(f"crop {crop!r} not supported; supported: {', '.join(CROP_METHODS)}")
    if width == 0 and height == 0:
        return images
    samples = images.movedim(-1, 1)
    if width == 0:
        width = max(1, round(samples.shape[3] * height / samples.shape[2]))
    elif height == 0:
        height = max(1, round(samples.shape[2] * width / samples.shape[3]))
    if crop == "center":
        old_w, old_h = samples.shape[3], samples.shape[2]
        old_aspect, new_aspect = old_w / old_h, width / height
        x = y = 0
        if old_aspect > new_aspect:
            x = round((old_w - old_w * (new_aspect / old_aspect)) / 2)
        elif old_aspect < new_aspect:
            y = round((old_h - old_h * (old_aspect / new_aspect)) / 2)
        samples = samples.narrow(-2, y, old_h - y * 2).narrow(-1, x, old_w - x * 2)
    if method == "lanczos":
        scaled = _lanczos(samples, width, height)
    else:
        scaled = torch.nn.functional.interpolate(samples.float(), size=(height, width), mode=method)
    return scaled.movedim(1, -1)


def _lanczos(samples: "torch.Tensor", width: int, height: int) -> "torch.Tensor":
    import numpy as np
    import torch
    from PIL import Image

    out = []
    for image in samples:
        pixels = np.clip(255.0 * image.movedim(0, -1).cpu().numpy(), 0, 255).astype(np.uint8)
        channels = pixels.shape[-1]
        pil = Image.fromarray(pixels[..., 0] if channels == 1 else pixels)
        resized = np.array(pil.resize((width, height), resample=Image.Resampling.LANCZOS)).astype(np.float32) / 255.0
        if resized.ndim == 2:
            resized = resized[..., None]
        out.append(torch.from_numpy(resized).movedim(-1, 0))
    return torch.stack(out).to(samples.device)


class ImageScale(NodeType):
    """Resize images; ``crop: center`` first cuts them to the new aspect ratio."""

    class_type = "ImageScale"
    category = "image/upscaling"
    inputs = (
        Input("image", "IMAGE"),
        Input("upscale_method", "COMBO", default="nearest-exact", choices=UPSCALE_METHODS),
        Input("width", "INT", default=512, min=0, max=MAX_RESOLUTION, step=1),
        Input("height", "INT", default=512, min=0, max=MAX_RESOLUTION, step=1),
        Input("crop", "COMBO", default="disabled", choices=CROP_METHODS),
    )
    outputs = (Output("IMAGE"),)

    def run(self, ctx: "NodeContext", image: Any, upscale_method: str, width: int, height: int,
            crop: str = "disabled") -> tuple[Any]:
        return (scale_images(image, upscale_method, width, height, crop),)


def canny_edges(images: "torch.Tensor", low: float, high: float) -> "torch.Tensor":
    """Canny edges (0 or 1) of IMAGE [B,H,W,C] as [B,H,W], as kornia's ``canny`` that ComfyUI uses.

    Gray -> 5x5 Gaussian (sigma 1) -> normalised Sobel gradients -> non-maximum suppression along the
    gradient direction quantised to 45 degrees -> double threshold -> hysteresis (weak edges kept when
    8-connected to a strong one).
    """
    import numpy as np
    import scipy.ndimage
    import torch
    import torch.nn.functional as F

    x = images.float().movedim(-1, 1)
    if x.shape[1] >= 3:
        gray = 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]
    else:
        gray = x[:, 0:1]
    coords = torch.arange(5, dtype=torch.float32) - 2
    gauss = torch.exp(-(coords**2) / 2)
    gauss = gauss / gauss.sum()
    kernel = (gauss[:, None] * gauss[None, :])[None, None]
    blurred = F.conv2d(F.pad(gray, (2, 2, 2, 2), mode="reflect"), kernel)
    sobel_x = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]) / 8
    padded = F.pad(blurred, (1, 1, 1, 1), mode="replicate")
    gx = F.conv2d(padded, sobel_x[None, None])
    gy = F.conv2d(padded, sobel_x.t()[None, None])
    magnitude = torch.sqrt(gx * gx + gy * gy + 1e-6)
    angle = torch.rad2deg(torch.atan2(gy, gx))
    direction = (torch.round(angle / 45.0) % 8).long()
    # neighbour offsets (dy, dx) for the 8 quantised directions; the opposite one is index + 4
    offsets = [(0, 1), (1, 1), (1, 0), (1, -1), (0, -1), (-1, -1), (-1, 0), (-1, 1)]
    padded_mag = F.pad(magnitude, (1, 1, 1, 1))
    height, width = magnitude.shape[-2:]
    shifted = torch.stack([padded_mag[..., 1 + dy: 1 + dy + height, 1 + dx: 1 + dx + width] for dy, dx in offsets])
    forward = torch.gather(shifted, 0, direction[None]).squeeze(0)
    backward = torch.gather(shifted, 0, ((direction + 4) % 8)[None]).squeeze(0)
    is_max = torch.minimum(magnitude - forward, magnitude - backward) > 0
    magnitude = magnitude * is_max
    weak = (magnitude > low).numpy()[:, 0]
    strong = (magnitude > high).numpy()[:, 0]
    structure = np.ones((3, 3), dtype=bool)
    edges = np.zeros_like(weak, dtype=np.float32)
    for index in range(weak.shape[0]):
        labels, count = scipy.ndimage.label(weak[index], structure=structure)
        if count == 0:
            continue
        keep = np.zeros(count + 1, dtype=bool)
        keep[np.unique(labels[strong[index]])] = True
        keep[0] = False
        edges[index] = keep[labels].astype(np.float32)
    return torch.from_numpy(edges)


class Canny(NodeType):
    """Edge map of an image (white edges on black), e.g. for a canny ControlNet."""

    class_type = "Canny"
    category = "image/preprocessors"
    inputs = (
        Input("image", "IMAGE"),
        Input("low_threshold", "FLOAT", default=0.4, min=0.01, max=0.99, step=0.01),
        Input("high_threshold", "FLOAT", default=0.8, min=0.01, max=0.99, step=0.01),
    )
    outputs = (Output("IMAGE"),)

    @classmethod
    def check(cls, values: dict[str, Any], ctx: "NodeContext | None") -> list[tuple[str | None, str, str, str]]:
        low, high = values.get("low_threshold"), values.get("high_threshold")
        if isinstance(low, float) and isinstance(high, float) and low > high:
            return [("high_threshold", "value_smaller_than_min",
                     f"high_threshold {high} is below low_threshold {low}", f"use high_threshold >= {low}")]
        return []

    def run(self, ctx: "NodeContext", image: Any, low_threshold: float, high_threshold: float) -> tuple[Any]:
        edges = canny_edges(image, low_threshold, high_threshold)
        return (edges[..., None].repeat(1, 1, 1, 3),)


# --- encoding ----------------------------------------------------------------------------------------


def _require_vae(ctx: "NodeContext", vae: Any) -> Any:
    if vae is None:
        raise ExecutionError(
            "vae input is None: the checkpoint loader's file holds no VAE; load one with VAELoader",
            node_id=ctx.node_id, class_type=ctx.class_type,
        )
    return vae


def _crop_offsets(pixels: "torch.Tensor", ratio: int) -> tuple[int, int, int, int]:
    """(height, width, y offset, x offset) of ComfyUI's centred crop to a multiple of ``ratio``."""
    height = (pixels.shape[1] // ratio) * ratio
    width = (pixels.shape[2] // ratio) * ratio
    return height, width, (pixels.shape[1] % ratio) // 2, (pixels.shape[2] % ratio) // 2


def encode_pixels(ctx: "NodeContext", vae: Any, pixels: "torch.Tensor") -> "torch.Tensor":
    """IMAGE -> model-space latents, the image first cropped to a multiple of the VAE's downscale."""
    vae = _require_vae(ctx, vae)
    if pixels.ndim != 4:
        raise ExecutionError(f"pixels must be [batch, height, width, channels], got {tuple(pixels.shape)}",
                             node_id=ctx.node_id, class_type=ctx.class_type)
    height, width, y, x = _crop_offsets(pixels, vae.downscale)
    if height == 0 or width == 0:
        raise ExecutionError(f"image {pixels.shape[2]}x{pixels.shape[1]} is smaller than the VAE's {vae.downscale} pixels",
                             node_id=ctx.node_id, class_type=ctx.class_type)
    pixels = pixels[:, y: y + height, x: x + width, :3]
    return vae.encode(pixels).float().cpu()


class VAEEncode(NodeType):
    """Images -> latents (for img2img: KSampler with denoise < 1)."""

    class_type = "VAEEncode"
    category = "latent"
    inputs = (Input("pixels", "IMAGE"), Input("vae", "VAE"))
    outputs = (Output("LATENT"),)

    def run(self, ctx: "NodeContext", pixels: Any, vae: Any) -> tuple[Any]:
        return ({"samples": encode_pixels(ctx, vae, pixels)},)


def _as_mask_batch(mask: "torch.Tensor") -> "torch.Tensor":
    return mask.float().reshape((-1, 1, mask.shape[-2], mask.shape[-1]))


class VAEEncodeForInpaint(NodeType):
    """Images with the masked region greyed out -> latents carrying a noise mask grown by a few pixels."""

    class_type = "VAEEncodeForInpaint"
    category = "latent/inpaint"
    inputs = (
        Input("pixels", "IMAGE"),
        Input("vae", "VAE"),
        Input("mask", "MASK"),
        Input("grow_mask_by", "INT", default=6, min=0, max=64, step=1),
    )
    outputs = (Output("LATENT"),)

    def run(self, ctx: "NodeContext", pixels: Any, vae: Any, mask: Any, grow_mask_by: int = 6) -> tuple[Any]:
        import torch
        import torch.nn.functional as F

        vae = _require_vae(ctx, vae)
        if not bool((_as_mask_batch(mask) > 0).any()):
            # ComfyUI samples anyway and returns the photo unchanged: a wasted row that looks successful
            raise ExecutionError(
                "the inpaint mask is empty, so nothing would change: the photo has no transparent area; use "
                "a PNG whose background is transparent, or img2img", node_id=ctx.node_id,
                class_type=ctx.class_type,
            )
        height, width, y, x = _crop_offsets(pixels, vae.downscale)
        mask = F.interpolate(_as_mask_batch(mask), size=(pixels.shape[1], pixels.shape[2]), mode="bilinear")
        pixels = pixels.clone().float()[:, y: y + height, x: x + width, :3]
        mask = mask[:, :, y: y + height, x: x + width]
        if grow_mask_by == 0:
            grown = mask
        else:
            kernel = torch.ones((1, 1, grow_mask_by, grow_mask_by))
            padding = math.ceil((grow_mask_by - 1) / 2)
            grown = torch.clamp(F.conv2d(mask.round(), kernel, padding=padding), 0, 1)
        keep = (1.0 - mask.round()).squeeze(1)[..., None]
        pixels = (pixels - 0.5) * keep + 0.5  # masked pixels become neutral grey before encoding
        latents = encode_pixels(ctx, vae, pixels)
        return ({"samples": latents, "noise_mask": grown[:, :, :height, :width].round()},)


class SetLatentNoiseMask(NodeType):
    """Only the masked region of these latents is repainted by the sampler (img2img inpainting)."""

    class_type = "SetLatentNoiseMask"
    category = "latent/inpaint"
    inputs = (Input("samples", "LATENT"), Input("mask", "MASK"))
    outputs = (Output("LATENT"),)

    def run(self, ctx: "NodeContext", samples: dict[str, Any], mask: Any) -> tuple[Any]:
        out = dict(samples)
        out["noise_mask"] = _as_mask_batch(mask)
        return (out,)


class MaskToImage(NodeType):
    """A mask as a grey image (to scale and crop it exactly like the photo it belongs to)."""

    class_type = "MaskToImage"
    category = "mask"
    inputs = (Input("mask", "MASK"),)
    outputs = (Output("IMAGE"),)

    def run(self, ctx: "NodeContext", mask: Any) -> tuple[Any]:
        return (_as_mask_batch(mask).movedim(1, -1).expand(-1, -1, -1, 3),)


class ImageToMask(NodeType):
    """One channel of an image as a mask."""

    class_type = "ImageToMask"
    category = "mask"
    inputs = (Input("image", "IMAGE"), Input("channel", "COMBO", default="red", choices=("red", "green", "blue", "alpha")))
    outputs = (Output("MASK"),)

    def run(self, ctx: "NodeContext", image: Any, channel: str = "red") -> tuple[Any]:
        index = ("red", "green", "blue", "alpha").index(channel)
        if index >= image.shape[-1]:
            raise ExecutionError(f"image has no {channel} channel ({image.shape[-1]} channels)",
                                 node_id=ctx.node_id, class_type=ctx.class_type)
        return (image[..., index],)


IMAGE_INPUT_NODES = (
    LoadImage, LoadImageMask, ImageScale, Canny, VAEEncode, VAEEncodeForInpaint, SetLatentNoiseMask, MaskToImage,
    ImageToMask,
)
