"""Image nodes: VAE decoding and the output nodes that write PNGs with ComfyUI metadata.

PNG files follow ComfyUI's SaveImage: ``{prefix}_{counter:05}_.png`` with the counter one past the
highest already in the folder, tEXt chunks ``prompt`` (API JSON) and ``workflow`` (UI JSON) plus any
extra keys of ``ctx.png_metadata``, each JSON-encoded. Files are written to a temporary name, fsynced
and then linked into place, so a reader never sees a half-written image and two writers never take the
same name.

Inside :func:`deferred_saves` (the batch runner's GPU thread) output nodes neither encode nor write: they
hand each image to an :class:`ImageSink` (a :class:`PngEncoder` thread pool) and put a
:class:`PendingImage` into ``ctx.saved_images``; whoever assembles the results waits for the PNG bytes,
so zlib never holds up the next GPU batch. The bytes are the same as a synchronous save's.
"""

from __future__ import annotations

import contextvars
import hashlib
import json
import os
import secrets
import string
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from engine.errors import BadOutput, ExecutionError
from engine.nodes.base import Input, NodeType, Output
from engine.nodes.context import read_once

if TYPE_CHECKING:
    import torch

    from engine.nodes.context import NodeContext
    from engine.nodes.types import VaeHandle

# Decoded images whose pixel values span less than one 8-bit level are blank (all black or one colour).
BLANK_RANGE = 1.0 / 255.0
PREVIEW_COMPRESS_LEVEL = 1


@dataclass(frozen=True)
class SavedImage:
    """One image an output node wrote. ``path`` is absolute; ``filename``/``subfolder``/``type`` are what
    ComfyUI's ``/view`` takes."""

    path: str
    filename: str
    subfolder: str
    type: str  # "output" | "temp"
    node_id: str | None
    width: int
    height: int
    sha256: str

    def to_comfy(self) -> dict[str, str]:
        return {"filename": self.filename, "subfolder": self.subfolder, "type": self.type}


# --- decoding ----------------------------------------------------------------------------------------


def _require_vae(ctx: "NodeContext", vae: "VaeHandle | None") -> "VaeHandle":
    if vae is None:
        raise ExecutionError(
            "vae input is None: the checkpoint loader's file holds no VAE; load one with VAELoader",
            node_id=ctx.node_id,
            class_type=ctx.class_type,
        )
    return vae


def check_images(ctx: "NodeContext", images: "torch.Tensor") -> None:
    """Raise BadOutput if any image holds NaN or is blank (every pixel the same to one 8-bit level)."""
    import torch

    for index, image in enumerate(images):
        if torch.isnan(image).any():
            raise BadOutput(
                f"decoded image {index} contains NaN (numerical overflow in the model or VAE)",
                node_id=ctx.node_id, class_type=ctx.class_type, image_index=index, reason="nan", code="image_nan",
            )
        spread = float(image.max() - image.min())
        if spread < BLANK_RANGE:
            raise BadOutput(
                f"decoded image {index} is blank (every pixel {float(image.mean()):.3f})",
                node_id=ctx.node_id, class_type=ctx.class_type, image_index=index, reason="blank",
                code="image_blank",
            )


def decode_latents(
    ctx: "NodeContext", vae: "VaeHandle", latents: list[dict[str, Any]], tiled: bool, tile_size: int = 512,
    overlap: int = 64,
) -> list["torch.Tensor"]:
    """Decode several LATENTs of one shape in one VAE call; returns one IMAGE per latent."""
    import torch

    samples = [latent["samples"] for latent in latents]
    images = vae.decode(torch.cat(samples), tiled=tiled, tile_size=tile_size, overlap=overlap)
    out = []
    start = 0
    for s in samples:
        part = images[start : start + s.shape[0]]
        start += s.shape[0]
        check_images(ctx, part)
        out.append(part)
    return out


def _decode_batch(ctx: "NodeContext", inputs_list: list[dict[str, Any]], tiled_default: bool) -> list[tuple[Any]]:
    """Group rows by VAE and latent shape; one decode per group."""
    groups: dict[tuple, list[int]] = {}
    for index, inputs in enumerate(inputs_list):
        vae = _require_vae(ctx, inputs["vae"])
        key = (id(vae.vae), tuple(inputs["samples"]["samples"].shape[1:]), inputs.get("tile_size"),
               inputs.get("overlap"))
        groups.setdefault(key, []).append(index)
    results: list[tuple[Any] | None] = [None] * len(inputs_list)
    for indices in groups.values():
        first = inputs_list[indices[0]]
        tiled = tiled_default or ctx.vae_tiled
        images = decode_latents(
            ctx, first["vae"], [inputs_list[i]["samples"] for i in indices], tiled,
            tile_size=first.get("tile_size", 512), overlap=first.get("overlap", 64),
        )
        for i, image in zip(indices, images):
            results[i] = (image,)
    return results  # type: ignore[return-value]


class VAEDecode(NodeType):
    """Latents -> images. Decodes in tiles when the run asks for it (``ctx.vae_tiled``, an OOM retry)."""

    class_type = "VAEDecode"
    category = "latent"
    # Every row decodes its own latent (its own seed): a cached image is never reused, only held.
    cacheable = False
    inputs = (Input("samples", "LATENT"), Input("vae", "VAE"))
    outputs = (Output("IMAGE"),)

    def run(self, ctx: "NodeContext", samples: Any, vae: Any) -> tuple[Any]:
        return _decode_batch(ctx, [{"samples": samples, "vae": vae}], tiled_default=False)[0]

    def run_batch(self, ctx: "NodeContext", inputs_list: list[dict[str, Any]]) -> list[tuple[Any]]:
        return _decode_batch(ctx, inputs_list, tiled_default=False)


class VAEDecodeTiled(NodeType):
    """Decoding in overlapping tiles: less memory for large images. The temporal inputs exist for
    ComfyUI compatibility and concern video VAEs only; images have no time axis to tile."""

    class_type = "VAEDecodeTiled"
    category = "_for_testing"
    cacheable = False  # as VAEDecode
    inputs = (
        Input("samples", "LATENT"),
        Input("vae", "VAE"),
        Input("tile_size", "INT", default=512, min=64, max=4096, step=32),
        Input("overlap", "INT", default=64, min=0, max=4096, step=32),
        Input("temporal_size", "INT", default=64, min=8, max=4096, step=4),
        Input("temporal_overlap", "INT", default=8, min=4, max=4096, step=4),
    )
    outputs = (Output("IMAGE"),)

    @classmethod
    def check(cls, values: dict[str, Any], ctx: "NodeContext | None") -> list[tuple[str | None, str, str, str]]:
        tile, overlap = values.get("tile_size"), values.get("overlap")
        if isinstance(tile, int) and isinstance(overlap, int) and overlap * 2 >= tile:
            return [("overlap", "value_bigger_than_max", f"overlap {overlap} must be less than half of tile_size {tile}",
                     f"tile_size {tile}")]
        return []

    def run(self, ctx: "NodeContext", **inputs: Any) -> tuple[Any]:
        return _decode_batch(ctx, [inputs], tiled_default=True)[0]

    def run_batch(self, ctx: "NodeContext", inputs_list: list[dict[str, Any]]) -> list[tuple[Any]]:
        return _decode_batch(ctx, inputs_list, tiled_default=True)


# --- saving ------------------------------------------------------------------------------------------


def expand_prefix(prefix: str, width: int, height: int, now: time.struct_time | None = None) -> str:
    """ComfyUI's ``%width% %height% %year% %month% %day% %hour% %minute% %second%`` substitutions."""
    if "%" not in prefix:
        return prefix
    now = now or time.localtime()
    for key, value in (
        ("%width%", str(width)),
        ("%height%", str(height)),
        ("%year%", str(now.tm_year)),
        ("%month%", str(now.tm_mon).zfill(2)),
        ("%day%", str(now.tm_mday).zfill(2)),
        ("%hour%", str(now.tm_hour).zfill(2)),
        ("%minute%", str(now.tm_min).zfill(2)),
        ("%second%", str(now.tm_sec).zfill(2)),
    ):
        prefix = prefix.replace(key, value)
    return prefix


def save_prefix_problem(root: Path | None, filename_prefix: str) -> str | None:
    """Why files named by ``filename_prefix`` cannot be saved under ``root``; None when they can.

    The one rule for both validation (:meth:`SaveImage.check`) and saving (:func:`resolve_save_path`).
    Refused: absolute prefixes, prefixes without a file name, and those whose folder leaves ``root``:
    by ``..`` or, when ``root`` is given, through a symlinked subfolder that leads out. The ``%...%``
    variables of :func:`expand_prefix` only ever become digits, so they cannot change the answer.
    """
    normalized = os.path.normpath(filename_prefix.replace("\\", "/"))
    subfolder, filename = os.path.split(normalized)
    if os.path.isabs(normalized) or filename in ("", ".", "..") or subfolder.split("/")[0] == "..":
        return "would save outside the output folder"
    if root is None:
        return None
    root = root.resolve()
    # A symlinked subfolder must not lead out of the output folder either.
    existing = Path(os.path.abspath(os.path.join(root, subfolder)))
    while not existing.exists() and existing != root:
        existing = existing.parent
    if os.path.commonpath((str(root), str(existing.resolve()))) != str(root):
        return "would save outside the output folder (through a linked folder)"
    return None


def resolve_save_path(
    ctx: "NodeContext", root: Path, filename_prefix: str, width: int, height: int
) -> tuple[Path, str, str]:
    """(folder, file name prefix, subfolder) for ``filename_prefix`` under ``root``.

    Refuses (ExecutionError naming the node) what :func:`save_prefix_problem` refuses.
    """
    prefix = expand_prefix(filename_prefix, width, height)
    problem = save_prefix_problem(root, prefix)
    if problem is not None:
        raise ExecutionError(
            f"filename_prefix '{filename_prefix}' {problem}; use a relative prefix such as 'batch/portrait'",
            node_id=ctx.node_id, class_type=ctx.class_type, filename_prefix=filename_prefix,
        )
    subfolder, filename = os.path.split(os.path.normpath(prefix.replace("\\", "/")))
    folder = Path(os.path.abspath(os.path.join(root.resolve(), subfolder)))
    return folder, filename, "" if subfolder in ("", ".") else subfolder.replace(os.sep, "/")


def next_counter(folder: Path, filename: str) -> int:
    """One past the highest ``{filename}_{NNNNN}_.png`` counter in ``folder`` (ComfyUI's rule)."""
    highest = 0
    if folder.is_dir():
        for entry in os.listdir(folder):
            head = entry[: len(filename) + 1]
            if os.path.normcase(head[:-1]) != os.path.normcase(filename) or head[-1:] != "_":
                continue
            try:
                digits = int(entry[len(filename) + 1 :].split("_")[0])
            except ValueError:
                continue
            highest = max(highest, digits)
    return highest + 1


def png_bytes(image: "torch.Tensor", metadata: dict[str, Any], compress_level: int) -> bytes:
    """One IMAGE [H,W,C] in 0..1 as PNG bytes with a tEXt chunk per metadata key (JSON-encoded)."""
    import numpy as np

    from engine.png import encode_png

    pixels = np.clip(255.0 * image.float().cpu().numpy(), 0, 255).astype(np.uint8)
    text = {key: json.dumps(value) for key, value in metadata.items() if value is not None}
    return encode_png(pixels, text, compress_level)


def write_new_file(folder: Path, filename: str, counter: int, data: bytes) -> tuple[Path, int]:
    """Write ``data`` as ``{filename}_{counter:05}_.png`` (the next free counter) atomically.

    The bytes go to a temporary file that is fsynced and then hard-linked to the final name: the link
    fails instead of overwriting when another writer took that name first, and we move to the next one.
    """
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{filename}.{secrets.token_hex(6)}.tmp"
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    try:
        while True:
            final = folder / f"{filename}_{counter:05}_.png"
            try:
                os.link(tmp, final)
                break
            except FileExistsError:
                counter += 1
            except OSError:  # file systems without hard links: check, then rename
                if final.exists():
                    counter += 1
                    continue
                os.replace(tmp, final)
                break
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(folder)
    return final, counter


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot fsync a directory; the file itself is already durable
    finally:
        os.close(fd)


# --- encoding off the GPU thread ---------------------------------------------------------------------


@dataclass(frozen=True)
class EncodedImage:
    """A PNG made in memory by an :class:`ImageSink` (no file): what a deferred output node produced."""

    filename: str
    subfolder: str
    type: str  # "output" | "temp"
    node_id: str | None
    width: int
    height: int
    data: bytes
    sha256: str
    encode_s: float = 0.0  # wall seconds spent on pixels -> PNG bytes -> sha256
    encode_cpu_s: float = 0.0  # CPU seconds of the encoding thread for the same (no waiting for a core)


class PendingImage:
    """An output image handed to an :class:`ImageSink`; :meth:`result` waits for its PNG bytes."""

    def __init__(self, future: "Future[EncodedImage]", filename: str, node_id: str | None) -> None:
        self.future = future
        self.filename = filename
        self.node_id = node_id

    def result(self, timeout: float | None = None) -> EncodedImage:
        """The encoded image; re-raises the encoder's exception if encoding failed."""
        return self.future.result(timeout)


class ImageSink(Protocol):
    """Where deferred output nodes hand their images (see :func:`deferred_saves`)."""

    def submit(
        self, image: "torch.Tensor", metadata: dict[str, Any], compress_level: int, *, filename: str,
        subfolder: str, image_type: str, node_id: str | None,
    ) -> PendingImage: ...


def encode_image(
    image: "torch.Tensor", metadata: dict[str, Any], compress_level: int, *, filename: str, subfolder: str,
    image_type: str, node_id: str | None,
) -> EncodedImage:
    """One IMAGE [H,W,C] as an :class:`EncodedImage`: the same bytes :func:`save_images` writes."""
    started, started_cpu = time.perf_counter(), time.thread_time()
    data = png_bytes(image, metadata, compress_level)
    digest = hashlib.sha256(data).hexdigest()
    return EncodedImage(
        filename=filename, subfolder=subfolder, type=image_type, node_id=node_id, width=int(image.shape[1]),
        height=int(image.shape[0]), data=data, sha256=digest, encode_s=time.perf_counter() - started,
        encode_cpu_s=time.thread_time() - started_cpu,
    )


class PngEncoder:
    """An :class:`ImageSink` encoding PNGs (and their sha256) on a small thread pool.

    zlib, numpy and hashlib release the GIL while they work, so the pool runs beside the thread that
    drives the GPU instead of taking turns with it. Close it (or use it as a context manager) when done.
    """

    def __init__(self, workers: int = 2) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.workers = workers
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="png-encode")

    def submit(
        self, image: "torch.Tensor", metadata: dict[str, Any], compress_level: int, *, filename: str,
        subfolder: str, image_type: str, node_id: str | None,
    ) -> PendingImage:
        future = self._pool.submit(
            encode_image, image.detach(), metadata, compress_level, filename=filename, subfolder=subfolder,
            image_type=image_type, node_id=node_id,
        )
        return PendingImage(future, filename, node_id)

    def close(self) -> None:
        """Finish the queued encodings and stop the pool's threads."""
        self._pool.shutdown(wait=True)

    def __enter__(self) -> "PngEncoder":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class DiscardImages:
    """An :class:`ImageSink` that keeps nothing: runs that want the GPU work only (warm-up, timing)."""

    def submit(
        self, image: "torch.Tensor", metadata: dict[str, Any], compress_level: int, *, filename: str,
        subfolder: str, image_type: str, node_id: str | None,
    ) -> PendingImage:
        future: Future[EncodedImage] = Future()
        future.set_result(EncodedImage(filename, subfolder, image_type, node_id, int(image.shape[1]),
                                       int(image.shape[0]), b"", ""))
        return PendingImage(future, filename, node_id)


@dataclass
class _DeferredSaves:
    sink: ImageSink
    # Deferred images take no file, so names taken in this scope are remembered here instead.
    next_counters: dict[tuple[str, str], int] = field(default_factory=dict)

    def reserve(self, folder: Path, name: str, on_disk: int) -> int:
        key = (str(folder), name)
        counter = max(on_disk, self.next_counters.get(key, 1))
        self.next_counters[key] = counter + 1
        return counter


# Per thread (and per task), never mutated in place: set and reset by deferred_saves only.
_DEFERRED_SAVES: contextvars.ContextVar[_DeferredSaves | None] = contextvars.ContextVar(
    "sd35_deferred_saves", default=None
)


@contextmanager
def deferred_saves(sink: ImageSink) -> Iterator[None]:
    """Within this block, on this thread, output nodes hand images to ``sink`` instead of writing files.

    ``ctx.saved_images`` then holds :class:`PendingImage` entries (names follow the usual counter rule,
    counted within the block), and the ``ui`` dicts name those files although nothing is on disk:
    whoever opened the block stores the bytes (the batch runner writes them atomically itself).
    """
    token = _DEFERRED_SAVES.set(_DeferredSaves(sink))
    try:
        yield
    finally:
        _DEFERRED_SAVES.reset(token)


def save_images(
    ctx: "NodeContext", images: "torch.Tensor", root: Path, filename_prefix: str, image_type: str,
    compress_level: int,
) -> dict[str, Any]:
    """Write every image of the batch; append SavedImage to ``ctx.saved_images``; return the ``ui`` dict.

    Inside :func:`deferred_saves` the images go to its sink and PendingImage entries are appended instead.
    """
    if images.ndim != 4:
        raise ExecutionError(
            f"images must be a [batch, height, width, channels] tensor, got shape {tuple(images.shape)}",
            node_id=ctx.node_id, class_type=ctx.class_type,
        )
    height, width = int(images.shape[1]), int(images.shape[2])
    folder, filename, subfolder = resolve_save_path(ctx, Path(root), filename_prefix, width, height)
    metadata = {"prompt": ctx.png_metadata.get("prompt")}
    metadata.update({k: v for k, v in ctx.png_metadata.items() if k != "prompt"})
    counter = next_counter(folder, filename)
    deferred = _DEFERRED_SAVES.get()
    results = []
    for batch_number, image in enumerate(images):
        name = filename.replace("%batch_num%", str(batch_number))
        if name != filename:
            counter = next_counter(folder, name)
        if deferred is not None:
            counter = deferred.reserve(folder, name, counter)
            final_name = f"{name}_{counter:05}_.png"
            ctx.saved_images.append(deferred.sink.submit(
                image, metadata, compress_level, filename=final_name, subfolder=subfolder, image_type=image_type,
                node_id=ctx.node_id,
            ))
            results.append({"filename": final_name, "subfolder": subfolder, "type": image_type})
            counter += 1
            continue
        data = png_bytes(image, metadata, compress_level)
        path, counter = write_new_file(folder, name, counter, data)
        saved = SavedImage(
            path=str(path), filename=path.name, subfolder=subfolder, type=image_type, node_id=ctx.node_id,
            width=width, height=height, sha256=hashlib.sha256(data).hexdigest(),
        )
        ctx.saved_images.append(saved)
        results.append(saved.to_comfy())
        counter += 1
    return {"ui": {"images": results}}


class SaveImage(NodeType):
    """Writes PNGs under the output folder with ComfyUI's metadata and naming."""

    class_type = "SaveImage"
    category = "image"
    output_node = True
    cacheable = False
    inputs = (
        Input("images", "IMAGE"),
        Input("filename_prefix", "STRING", default="ComfyUI",
              tooltip="May hold a subfolder and %width% %height% %year% %month% %day% %hour% %minute% %second%."),
    )
    outputs = ()

    @classmethod
    def check(cls, values: dict[str, Any], ctx: "NodeContext | None") -> list[tuple[str | None, str, str, str]]:
        """Refuse a prefix that would save outside the output folder before any GPU work starts."""
        prefix = values.get("filename_prefix")
        if not isinstance(prefix, str):
            return []  # linked from another node: known only at run time, where save_images checks it
        expanded = expand_prefix(prefix, 1, 1)
        output_dir = ctx.output_dir if ctx is not None else None
        problem = read_once(ctx, ("save_prefix", output_dir, expanded),
                            lambda: save_prefix_problem(output_dir, expanded))
        if problem is None:
            return []
        # ComfyUI reports a node's own refusal of an input value (its VALIDATE_INPUTS) as
        # "custom_validation_failed"; value_not_in_list is for COMBO lists, invalid_input_type for a value of
        # the wrong type and exception_during_validation for a check that crashed, none of which this is.
        return [("filename_prefix", "custom_validation_failed", f"filename_prefix '{prefix}' {problem}",
                 "use a relative prefix such as 'batch/portrait'")]

    def run(self, ctx: "NodeContext", images: Any, filename_prefix: str = "ComfyUI") -> dict[str, Any]:
        return save_images(ctx, images, ctx.output_dir, filename_prefix, "output", ctx.png_compress_level)


class PreviewImage(NodeType):
    """Writes PNGs to the temporary folder (type "temp"), as ComfyUI's preview does."""

    class_type = "PreviewImage"
    category = "image"
    output_node = True
    cacheable = False
    inputs = (Input("images", "IMAGE"),)
    outputs = ()

    def run(self, ctx: "NodeContext", images: Any) -> dict[str, Any]:
        suffix = "".join(secrets.choice(string.ascii_lowercase) for _ in range(5))
        return save_images(ctx, images, ctx.temp_dir, f"ComfyUI_temp_{suffix}", "temp", PREVIEW_COMPRESS_LEVEL)


IMAGE_NODES = (VAEDecode, VAEDecodeTiled, SaveImage, PreviewImage)
