"""Single-file SD3/SD3.5 checkpoints in ComfyUI's key layout: read them into diffusers/transformers
modules, and write them from those modules.

Layout (what ComfyUI and Stability AI ship):

    model.diffusion_model.*                   MMDiT transformer, original SD3 key names (joint_blocks...)
    first_stage_model.*                       VAE, original LDM key names (encoder.down.0.block.0...)
    text_encoders.clip_l.transformer.*        CLIP-L, transformers' key names (text_model..., text_projection)
    text_encoders.clip_g.transformer.*        CLIP-G, same
    text_encoders.t5xxl.transformer.*         T5-XXL encoder, transformers' key names

Reading converts with diffusers' own functions (``convert_sd3_transformer_checkpoint_to_diffusers``,
``convert_ldm_vae_checkpoint``) and infers every config from tensor shapes, so real SD3.5 Large, Medium
and Turbo files load offline. The few settings shapes cannot tell (VAE group-norm groups, CLIP head
count and activation) default to the real models' values; files this module writes carry them in the
``engine.config`` metadata entry. Writing is the exact inverse of that conversion.

ComfyUI's ``*_fp8_scaled`` files (float8 weights with ``scale_weight``/``weight_scale`` and a
``scaled_fp8`` marker) are dequantized into the compute dtype by default; pass ``fp8_state={}`` to also
receive the original FP8 tensors and scales, keyed by diffusers module name. With ``keep_fp8=True`` the
transformer is built without weights and its FP8 weights go straight into ``engine.fp8.Fp8Linear``
layers (``weight_only`` backend, no float copy); the model cache does this when the FP8 module is on.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.errors import ModelLoadError

if TYPE_CHECKING:
    import torch

    from engine.nodes.types import ClipHandle, ModelHandle, VaeHandle

log = logging.getLogger(__name__)

TRANSFORMER_PREFIX = "model.diffusion_model."
VAE_PREFIXES = ("first_stage_model.", "vae.")
TEXT_ENCODER_PREFIX = "text_encoders.{role}.transformer."
TEXT_ENCODER_ROLES = ("clip_l", "clip_g", "t5xxl")
CONFIG_METADATA_KEY = "engine.config"
ROLE_METADATA_KEY = "engine.text_encoder"
SD3_VAE_SCALING = (1.5305, 0.0609)  # SD3/SD3.5 VAE scaling_factor, shift_factor
FP8_MARKER = "scaled_fp8"
# Where a real checkpoint's tokenizers come from when none is saved locally (Hugging Face cache only).
TOKENIZER_REPOS: dict[str, tuple[tuple[str, str | None], ...]] = {
    "clip_l": (("openai/clip-vit-large-patch14", None), ("stabilityai/stable-diffusion-3.5-large", "tokenizer"),
               ("stabilityai/stable-diffusion-3.5-medium", "tokenizer")),
    "clip_g": (("laion/CLIP-ViT-bigG-14-laion2B-39B-b160k", None),
               ("stabilityai/stable-diffusion-3.5-large", "tokenizer_2"),
               ("stabilityai/stable-diffusion-3.5-medium", "tokenizer_2")),
    "t5xxl": (("google/t5-v1_1-xxl", None), ("stabilityai/stable-diffusion-3.5-large", "tokenizer_3"),
              ("stabilityai/stable-diffusion-3.5-medium", "tokenizer_3")),
}
# Defaults for what tensor shapes cannot tell, per text encoder role (the real SD3 encoders' values).
CLIP_DEFAULTS = {"clip_l": {"hidden_act": "quick_gelu"}, "clip_g": {"hidden_act": "gelu"}}


@dataclass(frozen=True)
class TextEncoderPart:
    """One loaded text encoder: its role ("clip_l", "clip_g", "t5xxl"), module and tokenizer."""

    role: str
    module: Any
    tokenizer: Any
    path: Path | None = None


# ---------------------------------------------------------------------------------------------------
# handles


def handles_from_components(
    components: dict[str, Any],
    name: str,
    device: str = "cpu",
    is_demo: bool = False,
    path: Path | None = None,
) -> tuple["ModelHandle", "ClipHandle | None", "VaeHandle | None"]:
    """(MODEL, CLIP, VAE) handles from diffusers-pipeline-named components (missing parts -> None)."""
    from engine.nodes.types import ClipHandle

    transformer = components["transformer"]
    vae = components.get("vae")
    model = model_handle(transformer, name, device, vae=vae, is_demo=is_demo, path=path)
    clip = None
    if components.get("text_encoder") is not None and components.get("text_encoder_2") is not None:
        t5 = components.get("text_encoder_3")
        clip = ClipHandle(
            tokenizer_l=components["tokenizer"],
            text_encoder_l=components["text_encoder"],
            tokenizer_g=components["tokenizer_2"],
            text_encoder_g=components["text_encoder_2"],
            tokenizer_t5=components.get("tokenizer_3") if t5 is not None else None,
            text_encoder_t5=t5,
            names=(name,),
            joint_attention_dim=int(transformer.config.joint_attention_dim),
            device=device,
        )
    return model, clip, (_vae_handle(vae, name, device) if vae is not None else None)


def model_handle(transformer: Any, name: str, device: str, vae: Any = None, is_demo: bool = False,
                 path: Path | None = None) -> "ModelHandle":
    from engine.nodes.types import ModelHandle

    config = transformer.config
    return ModelHandle(
        transformer=transformer,
        name=name,
        precision=dtype_name(transformer.dtype),
        is_demo=is_demo,
        device=device,
        dtype=transformer.dtype,
        latent_channels=int(config.in_channels),
        vae_scale_factor=_vae_downscale(vae) if vae is not None else 8,
        patch_size=int(config.patch_size),
        path=str(path) if path else None,
    )


def dtype_name(dtype: Any) -> str:
    """"fp32", "bf16", "fp16", "fp8_e4m3fn", ... for a torch dtype."""
    import torch

    names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    return names.get(dtype, str(dtype).replace("torch.", "").replace("float8", "fp8"))


def _vae_downscale(vae: Any) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


# ---------------------------------------------------------------------------------------------------
# writing


def transformer_to_original(state: dict[str, "torch.Tensor"]) -> dict[str, "torch.Tensor"]:
    """diffusers SD3Transformer2DModel state dict -> original MMDiT key names (no prefix).

    The exact inverse of diffusers' ``convert_sd3_transformer_checkpoint_to_diffusers``: q/k/v are fused
    into ``qkv``, and the pre-only last context norm and the final norm get shift/scale swapped back.
    """
    import torch
    from diffusers.loaders.single_file_utils import swap_scale_shift

    sd = dict(state)
    out: dict[str, torch.Tensor] = {}

    def move(dst: str, src: str) -> None:
        out[dst] = sd.pop(src)

    move("pos_embed", "pos_embed.pos_embed")
    move("x_embedder.proj.weight", "pos_embed.proj.weight")
    move("x_embedder.proj.bias", "pos_embed.proj.bias")
    for n, sub in ((0, "linear_1"), (2, "linear_2")):
        for p in ("weight", "bias"):
            move(f"t_embedder.mlp.{n}.{p}", f"time_text_embed.timestep_embedder.{sub}.{p}")
            move(f"y_embedder.mlp.{n}.{p}", f"time_text_embed.text_embedder.{sub}.{p}")
    move("context_embedder.weight", "context_embedder.weight")
    move("context_embedder.bias", "context_embedder.bias")
    layers = sorted({int(k.split(".")[1]) for k in sd if k.startswith("transformer_blocks.")})
    last = layers[-1] if layers else -1
    for i in layers:
        src, dst = f"transformer_blocks.{i}.", f"joint_blocks.{i}."
        for p in ("weight", "bias"):
            out[f"{dst}x_block.attn.qkv.{p}"] = torch.cat([sd.pop(f"{src}attn.to_{c}.{p}") for c in "qkv"])
            out[f"{dst}context_block.attn.qkv.{p}"] = torch.cat(
                [sd.pop(f"{src}attn.add_{c}_proj.{p}") for c in "qkv"]
            )
            move(f"{dst}x_block.attn.proj.{p}", f"{src}attn.to_out.0.{p}")
            move(f"{dst}x_block.adaLN_modulation.1.{p}", f"{src}norm1.linear.{p}")
            move(f"{dst}x_block.mlp.fc1.{p}", f"{src}ff.net.0.proj.{p}")
            move(f"{dst}x_block.mlp.fc2.{p}", f"{src}ff.net.2.{p}")
            context_norm = sd.pop(f"{src}norm1_context.linear.{p}")
            if i == last:  # pre-only context block: AdaLayerNormContinuous, (scale, shift) order in diffusers
                out[f"{dst}context_block.adaLN_modulation.1.{p}"] = swap_scale_shift(context_norm, 0)
            else:
                out[f"{dst}context_block.adaLN_modulation.1.{p}"] = context_norm
                move(f"{dst}context_block.attn.proj.{p}", f"{src}attn.to_add_out.{p}")
                move(f"{dst}context_block.mlp.fc1.{p}", f"{src}ff_context.net.0.proj.{p}")
                move(f"{dst}context_block.mlp.fc2.{p}", f"{src}ff_context.net.2.{p}")
            if f"{src}attn2.to_q.{p}" in sd:
                out[f"{dst}x_block.attn2.qkv.{p}"] = torch.cat([sd.pop(f"{src}attn2.to_{c}.{p}") for c in "qkv"])
                move(f"{dst}x_block.attn2.proj.{p}", f"{src}attn2.to_out.0.{p}")
        for norm, block, attn, ln in (
            ("norm_q", "x_block", "attn", "ln_q"),
            ("norm_k", "x_block", "attn", "ln_k"),
            ("norm_added_q", "context_block", "attn", "ln_q"),
            ("norm_added_k", "context_block", "attn", "ln_k"),
            ("norm_q", "x_block", "attn2", "ln_q"),
            ("norm_k", "x_block", "attn2", "ln_k"),
        ):
            key = f"{src}{attn}.{norm}.weight"
            if key in sd:
                move(f"{dst}{block}.{attn}.{ln}.weight", key)
    for p in ("weight", "bias"):
        move(f"final_layer.linear.{p}", f"proj_out.{p}")
        out[f"final_layer.adaLN_modulation.1.{p}"] = swap_scale_shift(sd.pop(f"norm_out.linear.{p}"), 0)
    if sd:
        raise ModelLoadError(
            f"transformer has tensors the SD3 layout cannot hold: {', '.join(sorted(sd)[:8])}", keys=sorted(sd)
        )
    return out


def vae_to_ldm(state: dict[str, "torch.Tensor"]) -> dict[str, "torch.Tensor"]:
    """diffusers AutoencoderKL state dict -> original LDM key names (no prefix); inverse of
    diffusers' ``convert_ldm_vae_checkpoint`` (attention projections become 1x1 convolutions)."""
    out: dict[str, Any] = {}
    num_up = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("decoder.up_blocks."))
    renames = [
        (r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out."),
        (r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2."),
        (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample."),
        (r"^(encoder|decoder)\.mid_block\.attentions\.0\.", r"\1.mid.attn_1."),
    ]
    for key, tensor in state.items():
        new = key
        for pattern, repl in renames:
            new = re.sub(pattern, repl, new)
        up = re.match(r"^decoder\.up_blocks\.(\d+)\.(resnets|upsamplers)\.(\d+)\.(.*)$", new)
        if up:
            block = num_up - 1 - int(up.group(1))
            new = (f"decoder.up.{block}.block.{up.group(3)}.{up.group(4)}" if up.group(2) == "resnets"
                   else f"decoder.up.{block}.upsample.{up.group(4)}")
        mid = re.match(r"^(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)$", new)
        if mid:
            new = f"{mid.group(1)}.mid.block_{int(mid.group(2)) + 1}.{mid.group(3)}"
        if ".mid.attn_1." in new:
            new = (new.replace("group_norm.", "norm.").replace("to_q.", "q.").replace("to_k.", "k.")
                   .replace("to_v.", "v.").replace("to_out.0.", "proj_out."))
            if new.endswith("weight") and tensor.ndim == 2:
                tensor = tensor[:, :, None, None]
        new = new.replace("conv_shortcut", "nin_shortcut")
        out[new] = tensor
    return out


def checkpoint_state_dict(
    transformer: Any = None, vae: Any = None, clip_l: Any = None, clip_g: Any = None, t5: Any = None
) -> dict[str, "torch.Tensor"]:
    """Tensors of the given modules in ComfyUI's single-file layout (contiguous, ready for safetensors)."""
    out: dict[str, Any] = {}
    if transformer is not None:
        for k, v in transformer_to_original(transformer.state_dict()).items():
            out[TRANSFORMER_PREFIX + k] = v
    if vae is not None:
        for k, v in vae_to_ldm(vae.state_dict()).items():
            out[VAE_PREFIXES[0] + k] = v
    for role, module in (("clip_l", clip_l), ("clip_g", clip_g), ("t5xxl", t5)):
        if module is None:
            continue
        prefix = TEXT_ENCODER_PREFIX.format(role=role)
        for k, v in _without_tied(module.state_dict()).items():
            out[prefix + k] = v
    return {k: v.detach().contiguous().cpu() for k, v in out.items()}


def _without_tied(state: dict[str, "torch.Tensor"]) -> dict[str, "torch.Tensor"]:
    """``state`` without the later names of tied tensors (T5's ``encoder.embed_tokens.weight`` is
    ``shared.weight``): safetensors refuses shared storage, and the loader ties them again."""
    seen: set[tuple[int, tuple[int, ...], Any]] = set()
    out: dict[str, Any] = {}
    for key, tensor in state.items():
        identity = (tensor.data_ptr(), tuple(tensor.shape), tensor.dtype)
        if tensor.numel() and identity in seen:
            continue
        seen.add(identity)
        out[key] = tensor
    return out


def checkpoint_metadata(transformer: Any = None, vae: Any = None, clip_l: Any = None, clip_g: Any = None) -> dict[str, str]:
    """safetensors metadata: the architecture, and the settings tensor shapes cannot tell."""
    config: dict[str, Any] = {}
    if transformer is not None:
        config["transformer"] = {
            "attention_head_dim": int(transformer.config.attention_head_dim),
            # lets text encoders saved apart from this model pad to its context width
            "joint_attention_dim": int(transformer.config.joint_attention_dim),
        }
    if vae is not None:
        config["vae"] = {
            "norm_num_groups": int(vae.config.norm_num_groups),
            "scaling_factor": float(vae.config.scaling_factor),
            "shift_factor": float(vae.config.shift_factor or 0.0),
        }
    for role, module in (("clip_l", clip_l), ("clip_g", clip_g)):
        if module is not None:
            config[role] = _clip_config_extras(module.config)
    return {"modelspec.architecture": "stable-diffusion-v3.5", CONFIG_METADATA_KEY: json.dumps(config, sort_keys=True)}


def _clip_config_extras(config: Any) -> dict[str, Any]:
    return {
        "num_attention_heads": int(config.num_attention_heads),
        "hidden_act": str(config.hidden_act),
        "eos_token_id": int(config.eos_token_id),
        "bos_token_id": int(config.bos_token_id),
        "pad_token_id": int(config.pad_token_id),
        "layer_norm_eps": float(config.layer_norm_eps),
    }


def write_checkpoint(
    path: str | os.PathLike[str],
    transformer: Any = None,
    vae: Any = None,
    clip_l: Any = None,
    clip_g: Any = None,
    t5: Any = None,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write the given modules as one ComfyUI-layout safetensors file (atomically); returns the path."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = checkpoint_metadata(transformer, vae, clip_l, clip_g)
    meta.update(metadata or {})
    tmp = path.with_name(path.name + ".tmp")
    save_file(checkpoint_state_dict(transformer, vae, clip_l, clip_g, t5), str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------------------------------
# reading


class _SafetensorsFile:
    """Lazy access to one safetensors file: keys and metadata up front, tensors on demand."""

    def __init__(self, path: Path) -> None:
        from safetensors import safe_open

        self.path = Path(path)
        if self.path.suffix.lower() not in (".safetensors", ".sft"):
            raise ModelLoadError(
                f"'{self.path.name}' is not a safetensors file; supported: .safetensors, .sft "
                "(pickled .ckpt/.pt files are refused: they can run code)",
                path=str(self.path),
            )
        try:
            self._handle = safe_open(str(self.path), framework="pt", device="cpu")
        except Exception as exc:  # noqa: BLE001 - any parse failure is a load error naming the file
            raise ModelLoadError(f"cannot read '{self.path.name}': {exc}", path=str(self.path)) from exc
        self.keys = list(self._handle.keys())
        self.metadata = self._handle.metadata() or {}

    def config(self) -> dict[str, Any]:
        raw = self.metadata.get(CONFIG_METADATA_KEY)
        return json.loads(raw) if raw else {}

    def is_demo(self) -> bool:
        from engine.models.demo import DEMO_MARKER

        return self.metadata.get("engine.demo") == DEMO_MARKER

    def part(self, prefix: str) -> dict[str, "torch.Tensor"]:
        return {k[len(prefix):]: self._handle.get_tensor(k) for k in self.keys if k.startswith(prefix)}

    def has_prefix(self, prefix: str) -> bool:
        return any(k.startswith(prefix) for k in self.keys)


def load_checkpoint(
    path: str | os.PathLike[str],
    device: str = "cpu",
    dtype: "torch.dtype | None" = None,
    fp8_state: dict[str, dict[str, Any]] | None = None,
    tokenizer_dirs: Sequence[Path] = (),
    keep_fp8: bool = False,
) -> tuple["ModelHandle", "ClipHandle | None", "VaeHandle | None"]:
    """Load a single-file checkpoint: (MODEL, CLIP or None, VAE or None) for the parts present.

    ``keep_fp8``: an fp8_scaled transformer keeps its FP8 weights in FP8 layers (see the module docstring).
    """
    import torch

    dtype = dtype or torch.float32
    f = _SafetensorsFile(Path(path))
    if not f.has_prefix(TRANSFORMER_PREFIX):
        raise ModelLoadError(
            f"'{f.path.name}' has no diffusion model (no '{TRANSFORMER_PREFIX}' tensors); "
            "a text encoder or VAE file belongs in text_encoders/ or vae/",
            path=str(f.path),
        )
    config = f.config()
    transformer = _build_transformer(
        f.part(TRANSFORMER_PREFIX), device, dtype, config, fp8_state, f.path, keep_fp8=keep_fp8, metadata=f.metadata
    )
    vae_prefix = next((p for p in VAE_PREFIXES if f.has_prefix(p + "decoder.")), None)
    vae = _build_vae_ldm(f.part(vae_prefix), device, dtype, config.get("vae", {}), f.path) if vae_prefix else None
    parts = {}
    tokenizer_dirs = list(tokenizer_dirs) + [f.path.parent / "tokenizers"]
    for role in TEXT_ENCODER_ROLES:
        prefix = TEXT_ENCODER_PREFIX.format(role=role)
        if f.has_prefix(prefix):
            parts[role] = _build_text_encoder(
                role, f.part(prefix), device, dtype, config.get(role, {}), f.path, f.is_demo(), tokenizer_dirs
            )
    name = f.path.name
    model, _, vae_handle = handles_from_components(
        {"transformer": transformer, "vae": vae}, name, device=device, is_demo=f.is_demo(), path=f.path
    )
    clip = None
    if "clip_l" in parts and "clip_g" in parts:
        clip = clip_from_parts(list(parts.values()), device, joint_attention_dim=model.joint_attention_dim)
        from dataclasses import replace

        clip = replace(clip, names=(name,))
    elif parts:
        log.warning("'%s' holds only %s; CLIP needs clip_l and clip_g, so it is not returned", name, ", ".join(parts))
    return model, clip, vae_handle


def load_diffusion_model(
    path: str | os.PathLike[str],
    device: str = "cpu",
    dtype: "torch.dtype | None" = None,
    fp8_state: dict[str, dict[str, Any]] | None = None,
    keep_fp8: bool = False,
) -> "ModelHandle":
    """UNETLoader: the transformer of a file with original keys (prefixed or bare) or diffusers keys.

    ``keep_fp8``: an fp8_scaled file keeps its FP8 weights in FP8 layers (see the module docstring).
    """
    import torch

    dtype = dtype or torch.float32
    f = _SafetensorsFile(Path(path))
    prefix = TRANSFORMER_PREFIX if f.has_prefix(TRANSFORMER_PREFIX) else ""
    state = f.part(prefix)
    if not any(k.startswith(("joint_blocks.", "transformer_blocks.")) for k in state):
        raise ModelLoadError(f"'{f.path.name}' holds no SD3 transformer", path=str(f.path))
    transformer = _build_transformer(
        state, device, dtype, f.config(), fp8_state, f.path, keep_fp8=keep_fp8, metadata=f.metadata
    )
    return model_handle(transformer, f.path.name, device, is_demo=f.is_demo(), path=f.path)


def load_vae(path: str | os.PathLike[str], device: str = "cpu", dtype: "torch.dtype | None" = None) -> "VaeHandle":
    """VAELoader: a VAE file in LDM key names (bare or ``first_stage_model.``-prefixed) or diffusers names."""
    import torch

    dtype = dtype or torch.float32
    f = _SafetensorsFile(Path(path))
    prefix = next((p for p in VAE_PREFIXES if f.has_prefix(p + "decoder.")), "")
    state = f.part(prefix)
    extras = f.config().get("vae", {})
    if any(k.startswith("decoder.up_blocks.") for k in state):
        vae = _build_vae_diffusers(state, device, dtype, extras, f.path)
    elif any(k.startswith("decoder.up.") for k in state):
        vae = _build_vae_ldm(state, device, dtype, extras, f.path)
    else:
        raise ModelLoadError(f"'{f.path.name}' holds no VAE decoder", path=str(f.path))
    return _vae_handle(vae, f.path.name, device)


def _vae_handle(vae: Any, name: str, device: str) -> "VaeHandle":
    from engine.nodes.types import VaeHandle

    return VaeHandle(
        vae=vae,
        name=name,
        scaling_factor=float(vae.config.scaling_factor),
        shift_factor=float(vae.config.shift_factor or 0.0),
        device=device,
        dtype=vae.dtype,
        downscale=_vae_downscale(vae),
    )


def text_encoder_role(path: str | os.PathLike[str]) -> str | None:
    """"clip_l", "clip_g" or "t5xxl" from a text encoder file's prefix, metadata or shapes; None when
    a CLIP file's width is neither CLIP-L's nor CLIP-G's and nothing else names it."""
    f = _SafetensorsFile(Path(path))
    for role in TEXT_ENCODER_ROLES:
        if f.has_prefix(TEXT_ENCODER_PREFIX.format(role=role)):
            return role
    if f.metadata.get(ROLE_METADATA_KEY) in TEXT_ENCODER_ROLES:
        return f.metadata[ROLE_METADATA_KEY]
    if any(k == "shared.weight" or k.startswith("encoder.block.") for k in f.keys):
        return "t5xxl"
    key = next((k for k in f.keys if k.endswith("text_model.embeddings.token_embedding.weight")), None)
    if key is None:
        raise ModelLoadError(f"'{f.path.name}' is not a CLIP or T5 text encoder", path=str(f.path))
    width = f.part(key)[""].shape[1]
    return {768: "clip_l", 1280: "clip_g"}.get(int(width))


def load_text_encoder(
    path: str | os.PathLike[str],
    device: str = "cpu",
    dtype: "torch.dtype | None" = None,
    role: str | None = None,
    tokenizer_dirs: Sequence[Path] = (),
) -> TextEncoderPart:
    """One separate text encoder file (clip_l / clip_g / t5xxl) in transformers' key names, bare or
    under ``text_encoders.<role>.transformer.``. ``role`` defaults to :func:`text_encoder_role`."""
    import torch

    dtype = dtype or torch.float32
    role = role or text_encoder_role(path)
    if role not in TEXT_ENCODER_ROLES:
        raise ModelLoadError(
            f"cannot tell which text encoder '{Path(path).name}' is; supported roles: {', '.join(TEXT_ENCODER_ROLES)}",
            path=str(path),
        )
    f = _SafetensorsFile(Path(path))
    prefix = TEXT_ENCODER_PREFIX.format(role=role)
    state = f.part(prefix if f.has_prefix(prefix) else "")
    return _build_text_encoder(role, state, device, dtype, f.config().get(role, {}), f.path, f.is_demo(), tokenizer_dirs)


def load_text_encoders(
    paths: Sequence[str | os.PathLike[str]],
    device: str = "cpu",
    dtype: "torch.dtype | None" = None,
    tokenizer_dirs: Sequence[Path] = (),
    joint_attention_dim: int | None = None,
) -> "ClipHandle":
    """CLIPLoader/DualCLIPLoader/TripleCLIPLoader: a ClipHandle from separate files.

    CLIP files whose role cannot be told are taken in order (CLIP-L first, then CLIP-G), as ComfyUI's
    loaders list them."""
    roles = [text_encoder_role(p) for p in paths]
    unassigned = [r for r in ("clip_l", "clip_g") if r not in roles]
    for i, role in enumerate(roles):
        if role is None:
            if not unassigned:
                raise ModelLoadError(f"cannot tell which text encoder '{Path(paths[i]).name}' is", path=str(paths[i]))
            roles[i] = unassigned.pop(0)
    parts = [load_text_encoder(p, device, dtype, role=r, tokenizer_dirs=tokenizer_dirs) for p, r in zip(paths, roles)]
    if joint_attention_dim is None:  # files written with their model say its context width
        widths = {_SafetensorsFile(Path(p)).config().get("transformer", {}).get("joint_attention_dim") for p in paths}
        widths.discard(None)
        joint_attention_dim = widths.pop() if len(widths) == 1 else None
    return clip_from_parts(parts, device, joint_attention_dim=joint_attention_dim)


def clip_from_parts(parts: Sequence[TextEncoderPart], device: str, joint_attention_dim: int | None = None) -> "ClipHandle":
    """Assemble a ClipHandle; SD3 needs CLIP-L and CLIP-G (T5 optional)."""
    from engine.nodes.types import ClipHandle

    by_role: dict[str, TextEncoderPart] = {}
    for part in parts:
        if part.role in by_role:
            raise ModelLoadError(f"two {part.role} text encoders given", role=part.role)
        by_role[part.role] = part
    missing = [r for r in ("clip_l", "clip_g") if r not in by_role]
    if missing:
        raise ModelLoadError(
            f"SD3 text conditioning needs clip_l and clip_g; missing: {', '.join(missing)}",
            missing=missing,
            given=sorted(by_role),
        )
    t5 = by_role.get("t5xxl")
    if joint_attention_dim is None:
        joint_attention_dim = int(t5.module.config.d_model) if t5 else 4096  # SD3's context width
    return ClipHandle(
        tokenizer_l=by_role["clip_l"].tokenizer,
        text_encoder_l=by_role["clip_l"].module,
        tokenizer_g=by_role["clip_g"].tokenizer,
        text_encoder_g=by_role["clip_g"].module,
        tokenizer_t5=t5.tokenizer if t5 else None,
        text_encoder_t5=t5.module if t5 else None,
        names=tuple(str(p.path.name) if p.path else p.role for p in parts),
        joint_attention_dim=joint_attention_dim,
        device=device,
    )


def load_diffusers_folder(
    path: str | os.PathLike[str], device: str = "cpu", dtype: "torch.dtype | None" = None
) -> tuple["ModelHandle", "ClipHandle | None", "VaeHandle | None"]:
    """A diffusers-format SD3 folder (model_index.json with transformer/, vae/, text_encoder*/)."""
    import torch
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel

    dtype = dtype or torch.float32
    root = Path(path)
    if not (root / "transformer").is_dir():
        raise ModelLoadError(f"'{root}' is not a diffusers SD3 folder (no transformer/)", path=str(root))
    try:
        components: dict[str, Any] = {
            "transformer": SD3Transformer2DModel.from_pretrained(root / "transformer", torch_dtype=dtype),
            "vae": AutoencoderKL.from_pretrained(root / "vae", torch_dtype=dtype) if (root / "vae").is_dir() else None,
        }
        for sub, cls in (("text_encoder", CLIPTextModelWithProjection), ("text_encoder_2", CLIPTextModelWithProjection),
                         ("text_encoder_3", T5EncoderModel)):
            components[sub] = cls.from_pretrained(root / sub, torch_dtype=dtype) if (root / sub).is_dir() else None
        for sub in ("tokenizer", "tokenizer_2", "tokenizer_3"):
            components[sub] = AutoTokenizer.from_pretrained(root / sub) if (root / sub).is_dir() else None
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load diffusers folder '{root}': {exc}", path=str(root)) from exc
    for module in components.values():
        if hasattr(module, "eval"):
            module.eval().requires_grad_(False).to(device)
    return handles_from_components(components, root.name, device=device, path=root)


def load_diffusers_vae(path: str | os.PathLike[str], device: str = "cpu", dtype: "torch.dtype | None" = None) -> "VaeHandle":
    """A diffusers AutoencoderKL folder (config.json + weights), or a full pipeline folder's vae/."""
    from diffusers import AutoencoderKL

    root = Path(path)
    folder = root / "vae" if (root / "model_index.json").is_file() else root
    try:
        vae = AutoencoderKL.from_pretrained(folder, torch_dtype=dtype)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load VAE folder '{folder}': {exc}", path=str(folder)) from exc
    vae.eval().requires_grad_(False).to(device)
    return _vae_handle(vae, root.name, device)


# ---------------------------------------------------------------------------------------------------
# module construction


def _build_transformer(state, device, dtype, config_meta, fp8_state, path: Path, keep_fp8: bool = False,
                       metadata: dict[str, str] | None = None):
    from diffusers import SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    original = not any(k.startswith("transformer_blocks.") for k in state)
    quantized = _fp8_weight_keys(state)
    if quantized and keep_fp8:
        return _build_fp8_transformer(state, device, dtype, config_meta, fp8_state, path, original, metadata or {})
    if quantized:
        if fp8_state is not None:
            fp8_state.update(_fp8_state(state, quantized, original))
        state = _dequantize_fp8(state, quantized, dtype)
    if original:
        try:
            state = convert_sd3_transformer_checkpoint_to_diffusers(dict(state))
        except (KeyError, IndexError, RuntimeError) as exc:
            raise ModelLoadError(f"'{path.name}': not an SD3 MMDiT state dict ({exc})", path=str(path)) from exc
    config = infer_transformer_config(state, config_meta.get("transformer", {}))
    with _empty_weights():
        module = SD3Transformer2DModel(**config)
    return _load_into(module, state, device, dtype, path, "transformer")


def _build_fp8_transformer(state, device, dtype, config_meta, fp8_state, path: Path, original: bool,
                           metadata: dict[str, str]):
    """An fp8_scaled transformer built without weights, its FP8 weights wrapped as they are in
    ``Fp8Linear`` layers (``weight_only``; the FP8 module's policy picks the backend afterwards)."""
    import torch
    from diffusers import SD3Transformer2DModel

    from engine.errors import Fp8Error
    from engine.fp8 import convert_sd3_fp8_scaled_to_diffusers, fp8_layers, load_fp8_scaled_into

    try:
        # Renaming splits fused qkv weights as FP8 (byte views), never through a float copy.
        diffusers_state = convert_sd3_fp8_scaled_to_diffusers(state) if original else dict(state)
    except (KeyError, IndexError, RuntimeError) as exc:
        raise ModelLoadError(f"'{path.name}': not an SD3 MMDiT state dict ({exc})", path=str(path)) from exc
    config = infer_transformer_config(diffusers_state, config_meta.get("transformer", {}))
    with _empty_weights():
        module = SD3Transformer2DModel(**config)
    try:
        report = load_fp8_scaled_into(module, diffusers_state, backend="weight_only", compute_dtype=dtype,
                                      metadata=metadata)
    except Fp8Error as exc:
        details = {k: v for k, v in exc.details.items() if k != "path"}
        raise ModelLoadError(f"'{path.name}': {exc.message}", path=str(path), **details) from exc
    for note in report.notes:
        log.info("'%s': %s", path.name, note)
    module.eval().requires_grad_(False)
    module = module.to(device=torch.device(device))
    if fp8_state is not None:
        fp8_state.update({
            name: {"weight": layer.weight, "scale_weight": layer.weight_scale, "scale_input": layer.input_scale,
                   "source": name}
            for name, layer in fp8_layers(module).items()
        })
    return module


def infer_transformer_config(state: dict[str, "torch.Tensor"], extras: dict[str, Any] | None = None) -> dict[str, Any]:
    """SD3Transformer2DModel config from a diffusers-named state dict's tensor shapes."""
    extras = extras or {}
    proj = state["pos_embed.proj.weight"]  # [inner, in_channels, patch, patch]
    inner, in_channels, patch = proj.shape[0], proj.shape[1], proj.shape[2]
    if "transformer_blocks.0.attn.norm_q.weight" in state:
        head_dim = state["transformer_blocks.0.attn.norm_q.weight"].shape[0]
        qk_norm = "layer_norm" if "transformer_blocks.0.attn.norm_q.bias" in state else "rms_norm"
    else:
        head_dim, qk_norm = extras.get("attention_head_dim", 64), None  # SD3's heads are 64 wide
    layers = sorted({int(k.split(".")[1]) for k in state if k.startswith("transformer_blocks.")})
    dual = tuple(sorted({int(k.split(".")[1]) for k in state if k.startswith("transformer_blocks.") and ".attn2." in k}))
    pos = state["pos_embed.pos_embed"]
    max_size = int(round(pos.shape[1] ** 0.5))
    return {
        "sample_size": 128,
        "patch_size": int(patch),
        "in_channels": int(in_channels),
        "out_channels": int(state["proj_out.weight"].shape[0] // (patch * patch)),
        "num_layers": len(layers),
        "attention_head_dim": int(head_dim),
        "num_attention_heads": int(inner // head_dim),
        "joint_attention_dim": int(state["context_embedder.weight"].shape[1]),
        "caption_projection_dim": int(state["context_embedder.weight"].shape[0]),
        "pooled_projection_dim": int(state["time_text_embed.text_embedder.linear_1.weight"].shape[1]),
        "pos_embed_max_size": max_size,
        "dual_attention_layers": dual,
        "qk_norm": qk_norm,
    }


def _build_vae_ldm(state, device, dtype, extras, path: Path):
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    config = infer_vae_config(state, extras)
    converted = convert_ldm_vae_checkpoint(state, config)
    return _build_vae_diffusers(converted, device, dtype, extras, path, config)


def _build_vae_diffusers(state, device, dtype, extras, path: Path, config: dict | None = None):
    from diffusers import AutoencoderKL

    if config is None:
        blocks = sorted({int(k.split(".")[2]) for k in state if k.startswith("encoder.down_blocks.")})
        widths = [state[f"encoder.down_blocks.{i}.resnets.0.conv2.weight"].shape[0] for i in blocks]
        resnets = {int(k.split(".")[4]) for k in state if k.startswith("encoder.down_blocks.0.resnets.")}
        config = _vae_config(state, widths, len(resnets), "quant_conv.weight" in state,
                             "encoder.mid_block.attentions.0.to_q.weight" in state, extras)
    with _empty_weights():
        module = AutoencoderKL(**config)
    return _load_into(module, state, device, dtype, path, "VAE")


def infer_vae_config(state: dict[str, "torch.Tensor"], extras: dict[str, Any] | None = None) -> dict[str, Any]:
    """AutoencoderKL config from an LDM-named VAE state dict's tensor shapes."""
    blocks = sorted({int(k.split(".")[2]) for k in state if k.startswith("encoder.down.")})
    widths = [state[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] for i in blocks]
    resnets = {int(k.split(".")[4]) for k in state if k.startswith("encoder.down.0.block.")}
    return _vae_config(state, widths, len(resnets), "quant_conv.weight" in state,
                       any(k.startswith("encoder.mid.attn_1.") for k in state), extras or {})


def _vae_config(state, widths, layers_per_block, quant_conv, mid_attention, extras) -> dict[str, Any]:
    latent = int(state["decoder.conv_in.weight"].shape[1])
    default_scaling = SD3_VAE_SCALING if latent == 16 else (0.18215, 0.0)
    groups = int(extras.get("norm_num_groups", 32))
    if any(w % groups for w in widths):
        raise ModelLoadError(
            f"VAE widths {widths} are not divisible by {groups} group-norm groups; "
            f"the file must name its groups in the '{CONFIG_METADATA_KEY}' metadata"
        )
    return {
        "in_channels": int(state["encoder.conv_in.weight"].shape[1]),
        "out_channels": int(state["decoder.conv_out.weight"].shape[0]),
        "down_block_types": ["DownEncoderBlock2D"] * len(widths),
        "up_block_types": ["UpDecoderBlock2D"] * len(widths),
        "block_out_channels": [int(w) for w in widths],
        "layers_per_block": layers_per_block,
        "latent_channels": latent,
        "norm_num_groups": groups,
        "sample_size": 1024,
        "scaling_factor": float(extras.get("scaling_factor", default_scaling[0])),
        "shift_factor": float(extras.get("shift_factor", default_scaling[1])),
        "use_quant_conv": quant_conv,
        "use_post_quant_conv": quant_conv,
        "mid_block_add_attention": mid_attention,
    }


def _build_text_encoder(role, state, device, dtype, extras, path: Path, is_demo: bool, tokenizer_dirs) -> TextEncoderPart:
    quantized = _fp8_weight_keys(state)
    if quantized:
        state = _dequantize_fp8(state, quantized, dtype)
    if role == "t5xxl":
        module = _build_t5(state, device, dtype, path)
    else:
        module = _build_clip(role, state, device, dtype, extras, path)
    tokenizer = _demo_tokenizer(role) if is_demo else find_tokenizer(role, tokenizer_dirs)
    return TextEncoderPart(role, module, tokenizer, path)


def _build_clip(role, state, device, dtype, extras, path: Path):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    state = {k: v for k, v in state.items() if not k.endswith(("position_ids", "logit_scale"))}
    emb = state["text_model.embeddings.token_embedding.weight"]
    vocab, hidden = emb.shape
    if "text_projection" in state:  # open_clip style: a bare matrix, transposed
        state["text_projection.weight"] = state.pop("text_projection").t().contiguous()
    if "text_projection.weight" not in state:
        # ComfyUI computes CLIP-L's pooled output with an identity projection when the file has none.
        log.info("'%s' has no text_projection; using the identity, as ComfyUI does", path.name)
        state["text_projection.weight"] = torch.eye(hidden, dtype=emb.dtype)
    layers = {int(k.split(".")[3]) for k in state if k.startswith("text_model.encoder.layers.")}
    defaults = CLIP_DEFAULTS[role]
    config = CLIPTextConfig(
        vocab_size=int(vocab),
        hidden_size=int(hidden),
        intermediate_size=int(state["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0]),
        num_hidden_layers=len(layers),
        # Real CLIPs use 64-wide heads; a file narrower than one head (a tiny test model) has one head
        num_attention_heads=int(extras.get("num_attention_heads", max(1, hidden // 64))),
        max_position_embeddings=int(state["text_model.embeddings.position_embedding.weight"].shape[0]),
        projection_dim=int(state["text_projection.weight"].shape[0]),
        hidden_act=extras.get("hidden_act", defaults["hidden_act"]),
        layer_norm_eps=float(extras.get("layer_norm_eps", 1e-5)),
        # The real vocabularies end with <|endoftext|> = 49407; pooling takes the first end token.
        bos_token_id=int(extras.get("bos_token_id", vocab - 2)),
        eos_token_id=int(extras.get("eos_token_id", vocab - 1)),
        pad_token_id=int(extras.get("pad_token_id", vocab - 1 if role == "clip_l" else 0)),
    )
    with _empty_weights():
        module = CLIPTextModelWithProjection(config)
    return _load_into(module, state, device, dtype, path, role)


def _build_t5(state, device, dtype, path: Path):
    from transformers import T5Config, T5EncoderModel

    if "shared.weight" not in state and "encoder.embed_tokens.weight" in state:
        state["shared.weight"] = state["encoder.embed_tokens.weight"]
    state.pop("encoder.embed_tokens.weight", None)  # tied to shared.weight in T5EncoderModel
    vocab, d_model = state["shared.weight"].shape
    rel = state["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    heads = rel.shape[1]
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in state
    wi = state["encoder.block.0.layer.1.DenseReluDense.wi_0.weight" if gated else "encoder.block.0.layer.1.DenseReluDense.wi.weight"]
    config = T5Config(
        vocab_size=int(vocab),
        d_model=int(d_model),
        d_kv=int(state["encoder.block.0.layer.0.SelfAttention.q.weight"].shape[0] // heads),
        d_ff=int(wi.shape[0]),
        num_layers=len({int(k.split(".")[2]) for k in state if k.startswith("encoder.block.")}),
        num_heads=int(heads),
        relative_attention_num_buckets=int(rel.shape[0]),
        feed_forward_proj="gated-gelu" if gated else "relu",
        is_encoder_decoder=False,
        use_cache=False,
    )
    with _empty_weights():
        module = T5EncoderModel(config)
    return _load_into(module, state, device, dtype, path, "t5xxl", tied=("encoder.embed_tokens.weight",))


def _demo_tokenizer(role: str):
    from engine.models.demo import demo_tokenizers

    tok_l, tok_g = demo_tokenizers()
    if role == "t5xxl":
        raise ModelLoadError("the demo model has no T5 tokenizer")
    return tok_l if role == "clip_l" else tok_g


def find_tokenizer(role: str, tokenizer_dirs: Sequence[Path] = ()) -> Any:
    """The tokenizer of a real text encoder: ``<dir>/<role>/`` in ``tokenizer_dirs``, else the Hugging
    Face cache (never downloaded). Raises ModelLoadError naming every place looked at."""
    from transformers import AutoTokenizer

    looked: list[str] = []
    for folder in tokenizer_dirs:
        candidate = Path(folder) / role
        looked.append(str(candidate))
        if candidate.is_dir():
            try:
                return AutoTokenizer.from_pretrained(candidate)
            except (OSError, ValueError) as exc:
                raise ModelLoadError(f"tokenizer folder '{candidate}' cannot be read: {exc}", path=str(candidate)) from exc
    for repo, sub in TOKENIZER_REPOS[role]:
        looked.append(f"Hugging Face cache: {repo}{'/' + sub if sub else ''}")
        try:
            return AutoTokenizer.from_pretrained(repo, subfolder=sub or "", local_files_only=True)
        except (OSError, ValueError):
            continue
    raise ModelLoadError(
        f"no {role} tokenizer found; looked in: {'; '.join(looked)}. Save one with "
        f"tokenizer.save_pretrained('<models>/text_encoders/tokenizers/{role}')",
        role=role,
        searched=looked,
    )


def _empty_weights():
    """Build modules without allocating or randomly initialising parameters (weights come from the file)."""
    try:
        from accelerate import init_empty_weights
    except ImportError:  # pragma: no cover - accelerate is a dependency
        return nullcontext()
    return init_empty_weights()


def _load_into(module, state, device, dtype, path: Path, what: str, tied: tuple[str, ...] = ()):
    import torch

    state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state.items()}
    try:
        result = module.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as exc:
        raise ModelLoadError(f"'{path.name}': {what} weights do not fit the inferred shape: {exc}", path=str(path)) from exc
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        raise ModelLoadError(
            f"'{path.name}': {what} weights do not match: missing {missing[:6]}, unexpected {result.unexpected_keys[:6]}",
            path=str(path),
            missing=missing,
            unexpected=list(result.unexpected_keys),
        )
    if tied and hasattr(module, "tie_weights"):
        module.tie_weights()
    for name, buf in list(module.named_buffers()):
        if buf.device.type == "meta":
            raise ModelLoadError(f"'{path.name}': {what} buffer {name} was not initialised", path=str(path))
    module.eval().requires_grad_(False)
    # Parameters already have ``dtype`` (assigned from the cast state dict); casting again through
    # diffusers' ``to(dtype=...)`` only triggers its keep-in-fp32 warning.
    return module.to(device=torch.device(device))


# ---------------------------------------------------------------------------------------------------
# ComfyUI fp8_scaled


_SCALE_SUFFIXES = (("scale_weight", "weight_scale"), ("scale_input", "input_scale"))


def _fp8_weight_keys(state: dict[str, "torch.Tensor"]) -> list[str]:
    import torch

    fp8 = (torch.float8_e4m3fn, torch.float8_e5m2)
    return [k for k, v in state.items() if k.endswith(".weight") and v.dtype in fp8]


def _scales(state, weight_key: str) -> tuple[Any, Any]:
    base = weight_key[: -len(".weight")]
    weight_scale = next((state[f"{base}.{s}"] for s in _SCALE_SUFFIXES[0] if f"{base}.{s}" in state), None)
    input_scale = next((state[f"{base}.{s}"] for s in _SCALE_SUFFIXES[1] if f"{base}.{s}" in state), None)
    return weight_scale, input_scale


def _is_scale_key(key: str) -> bool:
    last = key.rsplit(".", 1)[-1]
    return key == FP8_MARKER or last in ("scale_weight", "weight_scale", "scale_input", "input_scale", "comfy_quant")


def _dequantize_fp8(state, quantized: list[str], dtype) -> dict[str, "torch.Tensor"]:
    """FP8 weights -> ``fp8.float() * scale`` in ``dtype``; scale tensors and markers dropped."""
    out = {k: v for k, v in state.items() if not _is_scale_key(k)}
    for key in quantized:
        scale, _ = _scales(state, key)
        weight = state[key].float()
        if scale is not None:
            scale = scale.float()
            if scale.numel() > 1:  # per-output-channel scales
                scale = scale.reshape(-1, *([1] * (weight.ndim - 1)))
            weight = weight * scale
        out[key] = weight.to(dtype)
    return out


def _fp8_state(state, quantized: list[str], original: bool) -> dict[str, dict[str, Any]]:
    """The file's FP8 tensors and scales keyed by diffusers module name.

    Fused original layers (``qkv``) are split like their weights; scales are per tensor in ComfyUI's
    files, so each part keeps its layer's scale. Splitting runs diffusers' converter on the raw bytes
    (uint8 views: the converter only chunks and concatenates) and on a key-tag state dict that records
    which source layer each converted weight came from.
    """
    import torch
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    plain = {k: v for k, v in state.items() if not _is_scale_key(k)}
    fp8_dtype = state[quantized[0]].dtype
    if original:
        raw = {k: (v.view(torch.uint8) if k in quantized else v) for k, v in plain.items()}
        converted = convert_sd3_transformer_checkpoint_to_diffusers(raw)
        source_keys = list(plain)
        # Tags of 6 elements survive both chunk(3) (qkv) and chunk(2) (shift/scale swaps).
        tags = {k: torch.full((6,), float(i)) for i, k in enumerate(source_keys)}
        tag_map = convert_sd3_transformer_checkpoint_to_diffusers(tags)
        source_of = {k: source_keys[int(v[0])] for k, v in tag_map.items()}
    else:
        converted = {k: (v.view(torch.uint8) if k in quantized else v) for k, v in plain.items()}
        source_of = {k: k for k in converted}
    out: dict[str, dict[str, Any]] = {}
    for key, tensor in converted.items():
        if tensor.dtype != torch.uint8 or not key.endswith(".weight"):
            continue
        weight_scale, input_scale = _scales(state, source_of[key])
        out[key[: -len(".weight")]] = {
            "weight": tensor.view(fp8_dtype),
            "scale_weight": weight_scale,
            "scale_input": input_scale,
            "source": source_of[key],
        }
    return out
