"""The process-wide resident model cache: each model is loaded once and reused by every run.

The cache is an object handed in (``Engine`` builds one), never a global. Loaders run under one lock, so
two threads asking for the same checkpoint load it once; the lock is held while loading because one
device cannot usefully load two models at the same time anyway.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.errors import ModelLoadError
from engine.models.resolve import ModelResolver, ResolvedModel

if TYPE_CHECKING:
    from engine.controlnet import ControlNetHandle
    from engine.lora import LoraWeights
    from engine.nodes.types import ClipHandle, ModelHandle, VaeHandle

UNET_WEIGHT_DTYPES = ("default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2")
CLIP_TYPES = ("sd3",)


@dataclass
class LoadedTransformer:
    """What :attr:`ModelCache.transformer_postprocess` receives and returns for a freshly loaded transformer.

    ``fp8_state`` maps module names (diffusers naming, e.g. ``transformer_blocks.0.attn.to_q``) to the
    checkpoint's own FP8 tensors: ``{"weight": float8 tensor, "scale_weight": tensor, "scale_input":
    tensor | None}``; empty when the file was not FP8-scaled. With a postprocess hook the cache loads
    such files straight into FP8 layers, and these tensors are those layers' own (no copy).
    ``sha256`` is the checkpoint's hash (None for a diffusers folder); ``path`` is None for the demo.
    """

    transformer: Any
    name: str
    path: Path | None
    weight_dtype: str
    precision: str
    fp8_state: dict[str, dict[str, Any]] = field(default_factory=dict)
    sha256: str | None = None


@dataclass
class _Entry:
    kind: str
    name: str
    value: Any
    modules: tuple[Any, ...]
    device: str
    precision: str
    load_seconds: float
    sha256: str | None


class ModelCache:
    """Resident models by name: ``checkpoint``, ``diffusion_model``, ``text_encoders``, ``vae``.

    ``device="auto"`` is CUDA when available, else the CPU; ``dtype`` defaults to bf16 on CUDA and float32
    on the CPU. ``hash_cache_path``: a JSON file remembering file sha256 per (path, size, mtime) across
    processes (in memory only when None). ``transformer_postprocess`` is applied to every freshly loaded
    transformer (the FP8 module's hook, :class:`engine.fp8.policy.PrecisionPolicy`) and returns a
    :class:`LoadedTransformer`; with it, ComfyUI ``*_fp8_scaled`` files load straight into FP8 layers
    (no float copy of their weights), without it they are dequantized into the compute dtype.
    """

    def __init__(
        self,
        resolver: ModelResolver,
        device: str = "auto",
        dtype: Any = None,
        hash_cache_path: str | os.PathLike[str] | None = None,
        transformer_postprocess: Callable[[LoadedTransformer], LoadedTransformer] | None = None,
    ) -> None:
        import torch

        self.resolver = resolver
        self.device = resolve_device(device)
        self.dtype = dtype if dtype is not None else (torch.bfloat16 if self.device.startswith("cuda") else torch.float32)
        self.hash_cache_path = Path(hash_cache_path) if hash_cache_path else None
        self.transformer_postprocess = transformer_postprocess
        self.load_count = 0  # loads actually performed (cache misses)
        self._lock = threading.RLock()
        self._entries: dict[tuple, _Entry] = {}
        self._loading: dict[tuple, threading.Lock] = {}
        self._hashes: dict[str, str] = {}
        self._hashes_loaded = False
        # Names other machines can load (scale-out: what live workers announce), offered and accepted by
        # validation beside the local files, so a coordinator needs no copy of the models folder.
        self.remote_catalog: Callable[[str], list[str]] | None = None

    # -- public API -----------------------------------------------------------------------------------

    def available(self, kind: str) -> list[str]:
        """Names a loader node may offer for ``kind`` (see :meth:`ModelResolver.available`), then the
        names of the remote catalog that are not local."""
        names = self.resolver.available(kind)
        if self.remote_catalog is not None:
            names.extend(name for name in self.remote_catalog(kind) if name not in names)
        return names

    def checkpoint(self, name: str) -> tuple["ModelHandle", "ClipHandle | None", "VaeHandle | None"]:
        """CheckpointLoaderSimple: (MODEL, CLIP, VAE) of a single-file checkpoint, diffusers folder or the demo.

        CLIP or VAE is None when the file does not contain them (e.g. ``sd3.5_large.safetensors``)."""
        ref = self.resolver.resolve("checkpoints", name)
        return self._get(("checkpoint", ref.key), "checkpoint", name, lambda: self._load_checkpoint(ref, "default"))

    def diffusion_model(self, name: str, weight_dtype: str = "default") -> "ModelHandle":
        """UNETLoader: the transformer only (from diffusion_models/, or the transformer of a checkpoint)."""
        if weight_dtype not in UNET_WEIGHT_DTYPES:
            raise ModelLoadError(
                f"weight_dtype {weight_dtype!r} is not supported; supported: {', '.join(UNET_WEIGHT_DTYPES)}",
                name=name,
                weight_dtype=weight_dtype,
                supported=list(UNET_WEIGHT_DTYPES),
            )
        if weight_dtype != "default" and self.transformer_postprocess is None:
            raise ModelLoadError(
                f"weight_dtype {weight_dtype!r} needs the FP8 module, which is not enabled; supported here: default",
                name=name,
                weight_dtype=weight_dtype,
                supported=["default"],
            )
        ref = self.resolver.resolve("diffusion_models", name)
        key = ("diffusion_model", ref.key, weight_dtype)
        return self._get(key, "diffusion_model", name, lambda: self._load_diffusion_model(ref, weight_dtype))

    def text_encoders(self, names: Sequence[str], type: str = "sd3") -> "ClipHandle":
        """CLIPLoader / DualCLIPLoader / TripleCLIPLoader: one ClipHandle from separate encoder files.

        SD3 needs CLIP-L and CLIP-G; T5-XXL is optional (zeros without it, like diffusers)."""
        if type not in CLIP_TYPES:
            raise ModelLoadError(
                f"text encoder type {type!r} is not supported; supported: {', '.join(CLIP_TYPES)}",
                type=type,
                supported=list(CLIP_TYPES),
            )
        refs = [self.resolver.resolve("text_encoders", n) for n in names]
        # Order is part of the key: files whose role cannot be told are assigned by position.
        key = ("text_encoders", type, tuple(r.key for r in refs))
        return self._get(key, "text_encoders", "+".join(names), lambda: self._load_text_encoders(refs))

    def vae(self, name: str) -> "VaeHandle":
        """VAELoader: a VAE file (LDM or diffusers key names) or a diffusers VAE folder."""
        ref = self.resolver.resolve("vae", name)
        return self._get(("vae", ref.key), "vae", name, lambda: self._load_vae(ref))

    def lora(self, name: str) -> "LoraWeights":
        """LoraLoader: a LoRA file from models/loras, parsed once; applied per run, never merged in."""
        ref = self.resolver.resolve("loras", name)
        # The file's size and time are part of the key: a LoRA exported again under its name is read again
        stat = ref.path.stat() if ref.path is not None else None
        stamp = (stat.st_size, stat.st_mtime_ns) if stat is not None else None
        return self._get(("lora", ref.key, stamp), "lora", name, lambda: self._load_lora(ref))

    def controlnet(self, name: str) -> "ControlNetHandle":
        """ControlNetLoader: an SD3 ControlNet from models/controlnet (single file or diffusers folder)."""
        ref = self.resolver.resolve("controlnet", name)
        return self._get(("controlnet", ref.key), "controlnet", name, lambda: self._load_controlnet(ref))

    def loaded(self) -> list[dict[str, Any]]:
        """One dict per resident entry: name, kind, bytes, device, precision, load_seconds, sha256."""
        with self._lock:
            return [
                {
                    "name": e.name,
                    "kind": e.kind,
                    "bytes": _module_bytes(e.modules),
                    "device": e.device,
                    "precision": e.precision,
                    "load_seconds": round(e.load_seconds, 3),
                    "sha256": e.sha256,
                }
                for e in self._entries.values()
            ]

    def memory_bytes(self) -> int:
        """Bytes of parameters and buffers of every resident module (shared modules counted once)."""
        with self._lock:
            modules = [m for e in self._entries.values() for m in e.modules]
        return _module_bytes(modules)

    def free(self, name: str | None = None) -> int:
        """Drop the entries named ``name`` (every entry when None); returns how many were dropped.

        Handles still held by callers keep their modules alive until released."""
        with self._lock:
            keys = [k for k, e in self._entries.items() if name is None or e.name == name]
            for key in keys:
                del self._entries[key]
        import gc

        gc.collect()
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()
        return len(keys)

    def file_sha256(self, path: str | os.PathLike[str]) -> str:
        """sha256 of a file, computed once per (path, size, mtime) and remembered."""
        path = Path(path).resolve()
        stat = path.stat()
        key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
        with self._lock:
            self._read_hash_cache()
            if key in self._hashes:
                return self._hashes[key]
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                digest.update(chunk)
        value = digest.hexdigest()
        with self._lock:
            self._hashes[key] = value
            self._write_hash_cache()
        return value

    # -- loading --------------------------------------------------------------------------------------

    def _get(self, key: tuple, kind: str, name: str, load: Callable[[], tuple[Any, str, str | None]]) -> Any:
        # The load itself runs outside the cache-wide lock (a real checkpoint takes minutes), so status
        # readers (loaded(), memory_bytes(), /metrics, the System page) never wait for it; a per-key lock
        # makes concurrent requests for the same model load it once.
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                return entry.value
            key_lock = self._loading.setdefault(key, threading.Lock())
        with key_lock:
            with self._lock:
                entry = self._entries.get(key)
                if entry is not None:
                    return entry.value
            started = time.perf_counter()
            value, precision, sha = load()
            entry = _Entry(
                kind=kind,
                name=name,
                value=value,
                modules=_modules_of(value),
                device=self.device,
                precision=precision,
                load_seconds=time.perf_counter() - started,
                sha256=sha,
            )
            with self._lock:
                self.load_count += 1
                self._entries[key] = entry
                self._loading.pop(key, None)
            return value

    def _sha(self, ref: ResolvedModel) -> str | None:
        if ref.is_demo:
            from engine.models.demo import demo_sha256

            return demo_sha256()
        if ref.path is not None and ref.path.is_file():
            return self.file_sha256(ref.path)
        return None  # diffusers folders have no single file to hash

    @property
    def _keep_fp8(self) -> bool:
        # FP8 layers need the FP8 module's hook to pick their backend; without it, dequantize.
        return self.transformer_postprocess is not None

    def _postprocess(self, handle: "ModelHandle", ref: ResolvedModel, weight_dtype: str, fp8_state: dict) -> "ModelHandle":
        if self.transformer_postprocess is None:
            return handle
        result = self.transformer_postprocess(
            LoadedTransformer(
                handle.transformer, ref.name, ref.path, weight_dtype, handle.precision, fp8_state, handle.sha256
            )
        )
        return replace(handle, transformer=result.transformer, precision=result.precision)

    def _load_checkpoint(self, ref: ResolvedModel, weight_dtype: str):
        from engine.models import checkpoint as ckpt

        sha = self._sha(ref)
        fp8_state: dict[str, dict[str, Any]] = {}
        if ref.is_demo:
            from engine.models.demo import demo_handles

            model, clip, vae = demo_handles(device=self.device, dtype=self.dtype)
        elif ref.source == "file":
            model, clip, vae = ckpt.load_checkpoint(
                ref.path, self.device, self.dtype, fp8_state=fp8_state, tokenizer_dirs=self.resolver.tokenizer_dirs(),
                keep_fp8=self._keep_fp8,
            )
        else:
            model, clip, vae = ckpt.load_diffusers_folder(ref.path, self.device, self.dtype)
        model = replace(model, name=ref.name, sha256=sha)
        model = self._postprocess(model, ref, weight_dtype, fp8_state)
        clip = replace(clip, sha256=sha) if clip is not None else None
        vae = replace(vae, name=ref.name, sha256=sha) if vae is not None else None
        return (model, clip, vae), model.precision, sha

    def _load_diffusion_model(self, ref: ResolvedModel, weight_dtype: str):
        from engine.models import checkpoint as ckpt

        sha = self._sha(ref)
        fp8_state: dict[str, dict[str, Any]] = {}
        if ref.is_demo:
            from engine.models.demo import demo_handles

            model = demo_handles(device=self.device, dtype=self.dtype)[0]
        elif ref.source == "file":
            model = ckpt.load_diffusion_model(
                ref.path, self.device, self.dtype, fp8_state=fp8_state, keep_fp8=self._keep_fp8
            )
        else:
            model = ckpt.load_diffusers_folder(ref.path, self.device, self.dtype)[0]
        model = replace(model, name=ref.name, sha256=sha)
        model = self._postprocess(model, ref, weight_dtype, fp8_state)
        return model, model.precision, sha

    def _load_text_encoders(self, refs: list[ResolvedModel]):
        from engine.models import checkpoint as ckpt

        for ref in refs:
            if ref.source != "file":
                raise ModelLoadError(
                    f"text encoder '{ref.name}' is a folder; text encoders load from single files",
                    name=ref.name,
                )
        clip = ckpt.load_text_encoders(
            [r.path for r in refs], self.device, self.dtype, tokenizer_dirs=self.resolver.tokenizer_dirs()
        )
        digest = hashlib.sha256("".join(self.file_sha256(r.path) for r in refs).encode()).hexdigest()
        clip = replace(clip, names=tuple(r.name for r in refs), sha256=digest)
        return clip, _dtype_name(self.dtype), digest

    def _load_vae(self, ref: ResolvedModel):
        from engine.models import checkpoint as ckpt

        sha = self._sha(ref)
        if ref.source == "file":
            vae = ckpt.load_vae(ref.path, self.device, self.dtype)
        else:
            vae = ckpt.load_diffusers_vae(ref.path, self.device, self.dtype)
        vae = replace(vae, name=ref.name, sha256=sha)
        return vae, _dtype_name(vae.dtype), sha

    def _load_lora(self, ref: ResolvedModel):
        from engine.lora import load_lora_file

        if ref.source != "file":
            raise ModelLoadError(f"LoRA '{ref.name}' is a folder; LoRAs load from single files", name=ref.name)
        sha = self._sha(ref)
        return load_lora_file(ref.path, name=ref.name, sha256=sha), "lora", sha

    def _load_controlnet(self, ref: ResolvedModel):
        from engine.controlnet import load_controlnet

        sha = self._sha(ref)
        handle = load_controlnet(ref.path, ref.name, self.device, self.dtype, sha256=sha)
        return handle, _dtype_name(self.dtype), sha

    # -- hash cache on disk ---------------------------------------------------------------------------

    def _read_hash_cache(self) -> None:
        if self._hashes_loaded:
            return
        self._hashes_loaded = True
        if self.hash_cache_path is not None and self.hash_cache_path.is_file():
            try:
                self._hashes.update(json.loads(self.hash_cache_path.read_text()))
            except (OSError, ValueError):
                pass  # a damaged hash cache only costs re-hashing

    def _write_hash_cache(self) -> None:
        if self.hash_cache_path is None:
            return
        self.hash_cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.hash_cache_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._hashes, indent=0, sort_keys=True))
        os.replace(tmp, self.hash_cache_path)


def resolve_device(device: str) -> str:
    """"auto" -> "cuda" when available else "cpu"; "cuda", "cuda:N" and "cpu" as given."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" or device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit()):
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ModelLoadError(f"device {device!r} requested but CUDA is not available", device=device)
        return device
    raise ModelLoadError(f"unsupported device {device!r}; supported: auto, cpu, cuda, cuda:N", device=device)


def _dtype_name(dtype: Any) -> str:
    import torch

    names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    return names.get(dtype, str(dtype).replace("torch.", ""))


def _modules_of(value: Any) -> tuple[Any, ...]:
    """The torch modules a cached value holds (handles hold several)."""
    values = value if isinstance(value, tuple) else (value,)
    modules: list[Any] = []
    for handle in values:
        if handle is None:
            continue
        for attr in ("transformer", "vae", "text_encoder_l", "text_encoder_g", "text_encoder_t5", "controlnet"):
            module = getattr(handle, attr, None)
            if module is not None:
                modules.append(module)
    return tuple(modules)


def _module_bytes(modules: Sequence[Any]) -> int:
    from engine.fp8.quantize import module_bytes

    return module_bytes(*modules)
