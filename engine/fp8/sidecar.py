"""Calibrated activation scales stored beside their checkpoint.

A sidecar is a safetensors file ``<checkpoint stem>.fp8scales.safetensors`` next to the checkpoint
(for a diffusers folder: ``<folder>.fp8scales.safetensors`` beside it) holding one float32 scalar
``<layer>.input_scale`` per layer, in diffusers module naming. Its metadata names the sha256 of the
checkpoint it was calibrated on; scales from another checkpoint are refused, since they would
silently clip (or waste the range of) that model's activations.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Mapping

import torch

from engine.errors import Fp8Error
from engine.models.resolve import SIDECAR_SUFFIX

SIDECAR_FORMAT = "sd35-fp8-activation-scales"
SIDECAR_VERSION = "1"
_KEY_SUFFIX = ".input_scale"


def sidecar_path_for(checkpoint_path: str | Path) -> Path:
    """Where the sidecar of ``checkpoint_path`` lives: ``model.safetensors`` -> ``model.fp8scales.safetensors``."""
    path = Path(checkpoint_path)
    stem = path.name if path.is_dir() else path.stem
    return path.with_name(stem + SIDECAR_SUFFIX)


def checkpoint_sha256(path: str | Path, chunk_bytes: int = 16 * 2**20) -> str:
    """sha256 of a checkpoint file, or of a folder's files (relative names and contents, sorted)."""
    path = Path(path)
    digest = hashlib.sha256()
    if path.is_dir():
        for file in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.endswith(SIDECAR_SUFFIX)):
            digest.update(file.relative_to(path).as_posix().encode("utf-8") + b"\0")
            _hash_file(file, digest, chunk_bytes)
    else:
        _hash_file(path, digest, chunk_bytes)
    return digest.hexdigest()


def _hash_file(path: Path, digest: "hashlib._Hash", chunk_bytes: int) -> None:
    try:
        with path.open("rb") as handle:
            while chunk := handle.read(chunk_bytes):
                digest.update(chunk)
    except OSError as exc:
        raise Fp8Error(f"cannot read checkpoint {path}: {exc}", path=str(path)) from exc


def save_sidecar(
    path: str | Path,
    scales: Mapping[str, torch.Tensor],
    checkpoint_sha256: str,
    *,
    extra_metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write ``scales`` (layer name -> input scale) tied to ``checkpoint_sha256``; returns the path."""
    from safetensors.torch import save_file  # noqa: PLC0415

    if not scales:
        raise Fp8Error("no activation scales to save", path=str(path))
    tensors = {
        f"{name}{_KEY_SUFFIX}": torch.as_tensor(scale, dtype=torch.float32).reshape(()).cpu().contiguous()
        for name, scale in scales.items()
    }
    metadata = {
        "format": SIDECAR_FORMAT,
        "version": SIDECAR_VERSION,
        "checkpoint_sha256": checkpoint_sha256,
        "fp8_format": "float8_e4m3fn",
        "layers": str(len(tensors)),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    metadata.update({k: str(v) for k, v in (extra_metadata or {}).items()})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return path


def read_sidecar_metadata(path: str | Path) -> dict[str, str]:
    from safetensors import safe_open  # noqa: PLC0415

    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except Exception as exc:  # missing file, not safetensors
        raise Fp8Error(f"cannot read FP8 scale sidecar {path}: {exc}", path=str(path)) from exc


def load_sidecar(path: str | Path, expected_sha256: str) -> dict[str, torch.Tensor]:
    """The scales of the sidecar at ``path``, refusing one calibrated on another checkpoint."""
    from safetensors.torch import load_file  # noqa: PLC0415

    metadata = read_sidecar_metadata(path)
    if metadata.get("format") != SIDECAR_FORMAT:
        raise Fp8Error(
            f"{path} is not an FP8 scale sidecar (format {metadata.get('format')!r})",
            path=str(path),
            format=metadata.get("format"),
        )
    found = metadata.get("checkpoint_sha256", "")
    if found != expected_sha256:
        raise Fp8Error(
            f"FP8 scale sidecar {path} was calibrated for checkpoint {found[:12] or 'unknown'}, "
            f"not for {expected_sha256[:12]}; recalibrate (python app.py calibrate) or remove it",
            path=str(path),
            expected_sha256=expected_sha256,
            found_sha256=found,
        )
    tensors = load_file(str(path))
    # Copies, not views of the memory-mapped file, which a later calibration may rewrite
    return {key[: -len(_KEY_SUFFIX)]: value.clone() for key, value in tensors.items() if key.endswith(_KEY_SUFFIX)}


def find_sidecar(checkpoint_path: str | Path, checkpoint_sha: str) -> dict[str, torch.Tensor] | None:
    """The scales beside ``checkpoint_path`` if a sidecar exists (None otherwise; a mismatch raises)."""
    path = sidecar_path_for(checkpoint_path)
    if not path.is_file():
        return None
    return load_sidecar(path, checkpoint_sha)


def describe_sidecar(path: str | Path) -> str:
    """One line for logs and the CLI: layers, checkpoint hash, creation time."""
    meta = read_sidecar_metadata(path)
    return json.dumps({k: meta.get(k) for k in ("layers", "checkpoint_sha256", "created", "prompts")})
