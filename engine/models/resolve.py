"""Model names -> things that can be loaded: the built-in demo, files under a ComfyUI-style models
folder, local diffusers-format folders, and Hugging Face repo ids already in the local hub cache.

Only names are resolved here; nothing is loaded. Names are what workflows carry (``ckpt_name``,
``unet_name``, ...), so a name is never allowed to point outside its folder.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from engine.errors import ModelNotFound
from engine.settings import DEMO_CHECKPOINT

# kind -> folder names searched under models_dir, in order (ComfyUI's legacy names second)
KIND_FOLDERS: dict[str, tuple[str, ...]] = {
    "checkpoints": ("checkpoints",),
    "diffusion_models": ("diffusion_models", "unet"),
    "text_encoders": ("text_encoders", "clip"),
    "vae": ("vae",),
    "loras": ("loras",),
    "controlnet": ("controlnet",),
}
MODEL_FILE_SUFFIXES = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin")
SIDECAR_SUFFIX = ".fp8scales.safetensors"  # engine.fp8.sidecar's calibrated scales beside a checkpoint
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9][A-Za-z0-9_.\-]*$")


@dataclass(frozen=True)
class ResolvedModel:
    """Where a model name points. ``source``: "demo", "file", "diffusers" (a folder with model_index.json
    or a component folder with config.json) or "hub" (a diffusers snapshot in the local Hugging Face cache)."""

    kind: str
    name: str
    source: str
    path: Path | None = None
    repo_id: str | None = None

    @property
    def is_demo(self) -> bool:
        return self.source == "demo"

    @property
    def key(self) -> str:
        """Identity for caching: the same file reached through two names is one entry."""
        return f"{self.kind}:{self.source}:{self.path.resolve() if self.path else self.name}"


class ModelResolver:
    """Resolves model names of each kind against ``models_dir`` (ComfyUI's layout).

    ``allow_hub``: look up ``org/name`` repo ids in the local Hugging Face cache (never downloads unless
    ``allow_download`` is also set).
    """

    def __init__(
        self,
        models_dir: str | os.PathLike[str],
        allow_hub: bool = True,
        allow_download: bool = False,
        include_demo: bool = True,
    ) -> None:
        self.models_dir = Path(models_dir)
        self.allow_hub = allow_hub
        self.allow_download = allow_download
        self.include_demo = include_demo

    def folders(self, kind: str) -> list[Path]:
        """The folders searched for ``kind``, existing or not."""
        if kind not in KIND_FOLDERS:
            raise ValueError(f"unknown model kind {kind!r}; supported: {', '.join(KIND_FOLDERS)}")
        return [self.models_dir / sub for sub in KIND_FOLDERS[kind]]

    def tokenizer_dirs(self) -> list[Path]:
        """Folders searched for saved tokenizers of real text encoders (``<dir>/clip_l/`` etc.)."""
        return [self.models_dir / "text_encoders" / "tokenizers", self.models_dir / "tokenizers",
                self.models_dir / "clip" / "tokenizers"]

    def available(self, kind: str) -> list[str]:
        """Names of every model of ``kind``: files (relative, '/'-separated), diffusers folders, the demo."""
        names: list[str] = []
        if kind == "checkpoints" and self.include_demo:
            names.append(DEMO_CHECKPOINT)
        seen: set[str] = set(names)
        for folder in self.folders(kind):
            if not folder.is_dir():
                continue
            for name in sorted(_list_models(folder)):
                if name not in seen:
                    seen.add(name)
                    names.append(name)
        return names

    def resolve(self, kind: str, name: str) -> ResolvedModel:
        """Resolve ``name`` of ``kind``; raise ModelNotFound naming where it looked and what exists."""
        folders = self.folders(kind)
        if not isinstance(name, str) or not name.strip():
            raise ModelNotFound(str(name), kind, [str(f) for f in folders], self.available(kind))
        if self.include_demo and kind in ("checkpoints", "diffusion_models") and name == DEMO_CHECKPOINT:
            return ResolvedModel(kind, name, "demo")
        searched: list[str] = []
        for folder in folders:
            candidate = _inside(folder, name)
            if candidate is None:
                # A traversal attempt is refused outright, not searched for elsewhere.
                raise ModelNotFound(name, kind, [f"{folder} (name escapes the folder: refused)"], self.available(kind))
            searched.append(str(candidate))
            found = _existing_model(candidate)
            if found is not None:
                return found_model(kind, name, found)
        if self.allow_hub and _REPO_ID.match(name) and ".." not in name:
            searched.append(f"Hugging Face cache: {name}")
            snapshot = self._hub_snapshot(name)
            if snapshot is not None:
                return ResolvedModel(kind, name, "hub", snapshot, repo_id=name)
        raise ModelNotFound(name, kind, searched, self.available(kind))

    def _hub_snapshot(self, repo_id: str) -> Path | None:
        try:
            from huggingface_hub import snapshot_download
        except ImportError:  # pragma: no cover - huggingface_hub is a dependency of diffusers
            return None
        # Only the parts a diffusers pipeline needs; never the single-file duplicates.
        patterns = ["model_index.json", "*/config.json", "*/*.json", "*/*.txt", "*/*.model", "*.safetensors.index.json",
                    "*/*.safetensors"]
        try:
            folder = snapshot_download(
                repo_id, local_files_only=not self.allow_download, allow_patterns=patterns
            )
        except Exception:  # noqa: BLE001 - offline, unknown repo, gated: all mean "not available here"
            return None
        path = Path(folder)
        return path if (path / "model_index.json").is_file() else None


def found_model(kind: str, name: str, path: Path) -> ResolvedModel:
    source = "file" if path.is_file() else "diffusers"
    return ResolvedModel(kind, name, source, path)


def _inside(folder: Path, name: str) -> Path | None:
    """``folder/name`` if it stays inside ``folder`` (symlinks inside are followed), else None."""
    if "\x00" in name:
        return None
    candidate = Path(name)
    if candidate.is_absolute() or ".." in candidate.parts or ".." in Path(name.replace("\\", "/")).parts:
        if candidate.is_absolute():
            try:
                candidate.resolve().relative_to(folder.resolve())
                return candidate
            except ValueError:
                return None
        return None
    return folder / candidate


def _existing_model(path: Path) -> Path | None:
    if path.is_file():
        return path
    if path.is_dir() and ((path / "model_index.json").is_file() or (path / "config.json").is_file()):
        return path
    return None


def _list_models(folder: Path) -> list[str]:
    names: list[str] = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        root_path = Path(root)
        rel_root = root_path.relative_to(folder)
        is_diffusers = (root_path / "model_index.json").is_file() or (root_path / "config.json").is_file()
        if is_diffusers and root_path != folder:
            names.append(rel_root.as_posix())
            dirs[:] = []  # a diffusers folder is one model, not many files
            continue
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for filename in files:
            # FP8 scale sidecars sit beside their checkpoints but are no model of their own
            if filename.lower().endswith(MODEL_FILE_SUFFIXES) and not filename.lower().endswith(SIDECAR_SUFFIX):
                names.append((rel_root / filename).as_posix())
    return names
