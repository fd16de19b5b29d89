"""SD3 ControlNets: loading (diffusers folders and single files) and their residuals during sampling.

A ControlNet reaches the sampler as a :class:`ControlHint` inside a conditioning entry
(``ConditioningEntry.controlnets``), added by ControlNetApplyAdvanced / ControlNetApplySD3. At each
transformer call the sampler asks :func:`block_residuals` for the per-block hidden states to add, and
passes them as ``block_controlnet_hidden_states``, as diffusers' ``StableDiffusion3ControlNetPipeline``
does:

* the control image is VAE-encoded into the model's latent space (``(raw - shift) * scale``; InstantX
  ControlNets, marked by ``force_zeros_for_pooled_projection``, skip the shift and get zero pooled
  projections, as in diffusers); the distribution's mode is used so a seed always gives the same image;
* SD3.5's own ControlNets have no patch embedding and no text input: they take the transformer's
  patch-embedded latents and no ``encoder_hidden_states``;
* a hint is active while the sigma lies inside its ``[start_percent, end_percent]`` window (ComfyUI's
  rule); several hints on one entry are summed.

Single files in diffusers' key layout are read with a config from the file's ``config`` metadata or,
without it, inferred from the tensor shapes. Stability's own SD3.5 ControlNet files
(``sd3.5_large_controlnet_{blur,canny,depth}.safetensors``) keep the original MMDiT names inside the
blocks; they are recognised as ComfyUI does (``transformer_blocks.0.adaLN_modulation.1.bias``) and
converted on load (:func:`sd35_original_to_diffusers`). Their ``control_type`` scalar selects ComfyUI's
image preprocessing before the VAE encode (canny ``x * 127.5 + 0.5``, depth ``1 - x``, blur none). Files
in other layouts are refused naming the supported ones.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.errors import ExecutionError, ModelLoadError

if TYPE_CHECKING:
    import torch

    from engine.nodes.types import VaeHandle
    from engine.sampling import FlowSchedule

SUPPORTED_LAYOUTS = (
    "a diffusers SD3ControlNetModel folder (config.json + weights)",
    "a single .safetensors file with diffusers SD3ControlNetModel keys (controlnet_blocks.*, pos_embed_input.*)",
    "a single file in Stability's original SD3.5 ControlNet layout "
    "(transformer_blocks.*.attn.qkv, *.mlp.fc1, *.adaLN_modulation.1; e.g. sd3.5_large_controlnet_canny)",
)
DEFAULT_HEAD_DIM = 64  # every released SD3/SD3.5 ControlNet; files with q/k norms carry their own
# Without q/k norms a file has no per-head tensor, so the head width is not in its shapes; a file may name
# it in this safetensors metadata key, otherwise DEFAULT_HEAD_DIM applies (ComfyUI's rule for SD3.5).
HEAD_DIM_METADATA = "attention_head_dim"
UPSCALE_FOR_HINT = "bilinear"

# Stability's original SD3.5 layout (ComfyUI's ``load_controlnet_sd35``).
ORIGINAL_SD35_MARKER = "transformer_blocks.0.adaLN_modulation.1.bias"
ORIGINAL_CONTROL_TYPES = {0: "blur", 1: "canny", 2: "depth"}  # the file's ``control_type`` scalar
SD35_CONTROL_LATENT_CHANNELS = 16  # ComfyUI builds pos_embed_input for the 16-channel SD3 latent only
# Embedders: diffusers name -> the names an original file may use (diffusers' own names, or ComfyUI's).
_ORIGINAL_EMBEDDERS = {
    "time_text_embed.timestep_embedder.linear_1": ("t_embedder.mlp.0",),
    "time_text_embed.timestep_embedder.linear_2": ("t_embedder.mlp.2",),
    "time_text_embed.text_embedder.linear_1": ("y_embedder.mlp.0",),
    "time_text_embed.text_embedder.linear_2": ("y_embedder.mlp.2",),
}
# Inside transformer_blocks.N (MMDiT's DismantledBlock -> diffusers' SD3SingleTransformerBlock). The
# adaLN chunks are in the same order (shift, scale, gate for attention, then for the MLP) in both.
_ORIGINAL_BLOCK_PARTS = {
    "attn.proj": "attn.to_out.0",
    "mlp.fc1": "ff.net.0.proj",
    "mlp.fc2": "ff.net.2",
    "adaLN_modulation.1": "norm1.linear",
}
# The ControlNet runs on the transformer's patch embedding (ComfyUI loads the model's x_embedder over
# these), so a patch embedding stored in the file is never used.
_ORIGINAL_UNUSED_PREFIXES = ("pos_embed.", "x_embedder.")


@dataclass(frozen=True)
class ControlNetHandle:
    """A resident SD3 ControlNet (diffusers ``SD3ControlNetModel``)."""

    controlnet: Any = field(repr=False)
    name: str
    sha256: str | None = None
    device: str = "cpu"
    dtype: Any = None
    control_type: str | None = None  # "blur"/"canny"/"depth" from an original SD3.5 file: image preprocessing

    @property
    def uses_text(self) -> bool:
        return self.controlnet.config.joint_attention_dim is not None

    @property
    def zero_pooled(self) -> bool:
        """InstantX ControlNets were trained with zero pooled projections and unshifted latents."""
        return bool(self.controlnet.config.force_zeros_for_pooled_projection)

    @property
    def has_patch_embed(self) -> bool:
        return self.controlnet.pos_embed is not None

    def check_fits(self, transformer: Any) -> None:
        """Raise ExecutionError when this ControlNet was made for a transformer of another shape."""
        inner = int(self.controlnet.config.num_attention_heads * self.controlnet.config.attention_head_dim)
        model_inner = int(transformer.config.num_attention_heads * transformer.config.attention_head_dim)
        problems = []
        if inner != model_inner:
            problems.append(f"width {inner} vs the model's {model_inner}")
        if self.uses_text and self.controlnet.config.joint_attention_dim != transformer.config.joint_attention_dim:
            problems.append(
                f"text width {self.controlnet.config.joint_attention_dim} vs {transformer.config.joint_attention_dim}"
            )
        if self.controlnet.config.patch_size != transformer.config.patch_size:
            problems.append(f"patch size {self.controlnet.config.patch_size} vs {transformer.config.patch_size}")
        if problems:
            raise ExecutionError(
                f"ControlNet '{self.name}' does not fit this model: {'; '.join(problems)}",
                controlnet=self.name,
            )


@dataclass(frozen=True, eq=False)
class ControlHint:
    """One ControlNet applied to a conditioning: its image, strength and active window.

    ``image`` is ComfyUI's IMAGE ([B,H,W,C], 0..1). It is encoded by ``vae`` at the sampled latent's
    size the first time it is needed (the encoding is remembered per size and device).
    """

    control: ControlNetHandle
    image: Any = field(repr=False)
    vae: "VaeHandle" = field(repr=False)
    strength: float = 1.0
    start: float = 0.0
    end: float = 1.0
    _encoded: dict = field(default_factory=dict, repr=False)

    def describe(self) -> dict[str, Any]:
        """What the ledger records of this ControlNet."""
        return {
            "name": self.control.name,
            "strength": self.strength,
            "start_percent": self.start,
            "end_percent": self.end,
            "sha256": self.control.sha256,
        }

    def active(self, sigma: float, schedule: "FlowSchedule") -> bool:
        return not (sigma > schedule.percent_to_sigma(self.start) or sigma < schedule.percent_to_sigma(self.end))

    def latent(self, height: int, width: int, batch: int, device: Any, dtype: Any) -> "torch.Tensor":
        """The control image as model-space latents of ``height`` x ``width`` for ``batch`` rows."""
        import torch

        key = (height, width, str(device), str(dtype))
        if key not in self._encoded:
            pixels = self.image.float()
            size = (height * self.vae.downscale, width * self.vae.downscale)
            if tuple(pixels.shape[1:3]) != size:
                pixels = torch.nn.functional.interpolate(
                    pixels.movedim(-1, 1), size=size, mode=UPSCALE_FOR_HINT, align_corners=False
                ).movedim(1, -1).clamp(0, 1)
            pixels = preprocess_control_image(pixels, self.control.control_type)
            latents = self.vae.encode(pixels[..., :3]).float()
            if self.control.zero_pooled:
                latents = latents + self.vae.shift_factor * self.vae.scaling_factor  # no shift (InstantX)
            self._encoded[key] = latents.to(device=device, dtype=dtype)
        latents = self._encoded[key]
        if latents.shape[0] != batch:
            latents = latents.repeat((batch + latents.shape[0] - 1) // latents.shape[0], 1, 1, 1)[:batch]
        return latents


def preprocess_control_image(pixels: "torch.Tensor", control_type: str | None) -> "torch.Tensor":
    """The control image as Stability's SD3.5 ControlNets of ``control_type`` were trained to see it.

    ComfyUI's ``load_controlnet_sd35`` rules, applied to 0..1 pixels before the VAE encode: canny edges
    become ``x * 255 * 0.5 + 0.5``, depth maps are inverted, blur (and every ControlNet without a type)
    is used as it is.
    """
    if control_type is None or control_type == "blur":
        return pixels
    if control_type == "canny":
        return pixels * 255 * 0.5 + 0.5
    if control_type == "depth":
        return 1.0 - pixels
    raise ValueError(f"control_type must be one of {sorted(ORIGINAL_CONTROL_TYPES.values())} or None, "
                     f"not {control_type!r}")


def block_residuals(
    transformer: Any,
    chunks: list[tuple[tuple[ControlHint, ...], "torch.Tensor", "torch.Tensor", "torch.Tensor"]],
    sigma: "torch.Tensor",
    timestep: "torch.Tensor",
    schedule: "FlowSchedule",
    dtype: Any,
) -> list["torch.Tensor"] | None:
    """Per transformer block, the ControlNet hidden states to add for a batch made of ``chunks``.

    Each chunk is ``(hints, x, prompt_embeds, pooled)`` for consecutive rows of the batch; rows without
    an active hint get zeros. Returns None when no hint is active at ``sigma`` (the plain transformer call).
    """
    import torch

    sigma_value = float(sigma)
    if not any(h.active(sigma_value, schedule) for hints, *_ in chunks for h in hints):
        return None
    blocks = len(transformer.transformer_blocks)
    per_chunk: list[list[torch.Tensor] | None] = []
    token_shape = None
    for hints, x, embeds, pooled in chunks:
        summed: list[torch.Tensor] | None = None
        for hint in hints:
            if not hint.active(sigma_value, schedule):
                continue
            residuals = _hint_residuals(transformer, hint, x, embeds, pooled, timestep[: x.shape[0]], dtype)
            expanded = _per_block(residuals, blocks)
            summed = expanded if summed is None else [a + b for a, b in zip(summed, expanded)]
        per_chunk.append(summed)
        if summed is not None:
            token_shape = summed[0].shape[1:]
    out = []
    for index in range(blocks):
        parts = []
        for (hints, x, *_), summed in zip(chunks, per_chunk):
            if summed is None:
                parts.append(torch.zeros((x.shape[0], *token_shape), device=x.device, dtype=dtype))
            else:
                parts.append(summed[index])
        out.append(torch.cat(parts))
    return out


def _hint_residuals(
    transformer: Any, hint: ControlHint, x: "torch.Tensor", embeds: "torch.Tensor", pooled: "torch.Tensor",
    timestep: "torch.Tensor", dtype: Any,
) -> list["torch.Tensor"]:
    import torch

    control = hint.control
    net = control.controlnet
    device = x.device
    cond = hint.latent(x.shape[-2], x.shape[-1], x.shape[0], device, dtype)
    hidden = x.to(dtype)
    with torch.inference_mode():
        if not control.has_patch_embed:
            hidden = transformer.pos_embed(hidden)  # SD3.5 ControlNets share the transformer's embedding
        pooled_in = torch.zeros_like(pooled) if control.zero_pooled else pooled
        out = net(
            hidden_states=hidden,
            controlnet_cond=cond,
            conditioning_scale=float(hint.strength),
            encoder_hidden_states=embeds.to(device=device, dtype=dtype) if control.uses_text else None,
            pooled_projections=pooled_in.to(device=device, dtype=dtype),
            timestep=timestep.to(device=device, dtype=dtype),
            return_dict=False,
        )[0]
    return list(out)


def _per_block(residuals: list["torch.Tensor"], blocks: int) -> list["torch.Tensor"]:
    """Spread a ControlNet's outputs over the transformer's blocks with diffusers' interval rule."""
    interval = blocks / len(residuals)
    return [residuals[int(i / interval)] for i in range(blocks)]


# --- loading -----------------------------------------------------------------------------------------


def load_controlnet(
    path: str | os.PathLike[str], name: str, device: str, dtype: Any, sha256: str | None = None
) -> ControlNetHandle:
    """An SD3 ControlNet from a diffusers folder or a single file (see :data:`SUPPORTED_LAYOUTS`)."""
    from diffusers import SD3ControlNetModel

    path = Path(path)
    control_type = None
    try:
        if path.is_dir():
            net = SD3ControlNetModel.from_pretrained(str(path), torch_dtype=dtype, local_files_only=True)
        else:
            state, metadata = _read_file(path)
            if is_original_sd35_layout(state):
                state, control_type = sd35_original_to_diffusers(state, name)
            config = controlnet_config(state, metadata, name)
            net = SD3ControlNetModel.from_config(config)
            missing, unexpected = net.load_state_dict(state, strict=False)
            unexpected = [k for k in unexpected if not k.endswith("pos_embed.pos_embed")]
            missing = [k for k in missing if not k.endswith("pos_embed.pos_embed")]
            if missing or unexpected:
                raise ModelLoadError(
                    f"ControlNet '{name}': the file does not match an SD3ControlNetModel "
                    f"(missing {missing[:3]}, unexpected {unexpected[:3]})",
                    name=name, missing=missing[:20], unexpected=unexpected[:20],
                )
    except ModelLoadError:
        raise
    except Exception as exc:  # noqa: BLE001 - a broken file or folder is a load error naming it
        raise ModelLoadError(f"cannot load ControlNet '{name}': {type(exc).__name__}: {exc}", name=name) from exc
    net = net.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return ControlNetHandle(controlnet=net, name=name, sha256=sha256, device=device, dtype=dtype,
                            control_type=control_type)


def _read_file(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    from engine.lora import read_state_dict

    metadata: dict[str, str] = {}
    if path.suffix.lower() in (".safetensors", ".sft"):
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as fh:
                metadata = dict(fh.metadata() or {})
        except Exception as exc:  # noqa: BLE001
            raise ModelLoadError(f"cannot read '{path.name}': {exc}", path=str(path)) from exc
    return read_state_dict(path), metadata


def controlnet_config(state: dict[str, Any], metadata: dict[str, str], name: str) -> dict[str, Any]:
    """The SD3ControlNetModel config of a diffusers-layout state dict (metadata ``config`` wins)."""
    if not any(k.startswith("controlnet_blocks.") for k in state) or "pos_embed_input.proj.weight" not in state:
        sd_family = "an SD1.5/SDXL ControlNet" if any(k.startswith(("input_blocks.", "control_model.",
                                                                      "down_blocks.")) for k in state) else None
        raise ModelLoadError(
            f"'{name}' is not an SD3 ControlNet in a supported layout"
            + (f" (it looks like {sd_family})" if sd_family else "")
            + f"; supported: {'; '.join(SUPPORTED_LAYOUTS)}",
            name=name, supported=list(SUPPORTED_LAYOUTS),
        )
    if "config" in metadata:
        try:
            return json.loads(metadata["config"])
        except ValueError as exc:
            raise ModelLoadError(f"ControlNet '{name}': unreadable config metadata: {exc}", name=name) from exc
    inner = int(state["controlnet_blocks.0.weight"].shape[0])
    layers = sorted({int(m.group(1)) for k in state if (m := re.match(r"transformer_blocks\.(\d+)\.", k))})
    cond_in = state["pos_embed_input.proj.weight"]
    patch = int(cond_in.shape[-1])
    use_pos_embed = "pos_embed.proj.weight" in state
    in_channels = int(state["pos_embed.proj.weight"].shape[1]) if use_pos_embed else int(cond_in.shape[1])
    norm_q = state.get("transformer_blocks.0.attn.norm_q.weight")
    head_dim = int(norm_q.shape[0]) if norm_q is not None else _metadata_head_dim(metadata, name)
    if head_dim <= 0 or inner % head_dim:
        raise ModelLoadError(
            f"ControlNet '{name}': width {inner} is not a whole number of {head_dim}-wide attention heads; "
            f"a file whose heads are not {DEFAULT_HEAD_DIM} wide must name the width in its "
            f"'{HEAD_DIM_METADATA}' metadata",
            name=name, width=inner, attention_head_dim=head_dim,
        )
    context = state.get("context_embedder.weight")
    config: dict[str, Any] = {
        "patch_size": patch,
        "in_channels": in_channels,
        "out_channels": in_channels,
        "num_layers": len(layers),
        "attention_head_dim": head_dim,
        "num_attention_heads": inner // head_dim,
        "joint_attention_dim": int(context.shape[1]) if context is not None else None,
        "caption_projection_dim": int(context.shape[0]) if context is not None else inner,
        "pooled_projection_dim": int(state["time_text_embed.text_embedder.linear_1.weight"].shape[1]),
        "extra_conditioning_channels": int(cond_in.shape[1]) - in_channels,
        "dual_attention_layers": tuple(i for i in layers if f"transformer_blocks.{i}.attn2.to_q.weight" in state),
        "qk_norm": None if norm_q is None else (
            "layer_norm" if "transformer_blocks.0.attn.norm_q.bias" in state else "rms_norm"
        ),
        "use_pos_embed": use_pos_embed,
        # InstantX (with text input) used zero pooled projections; SD3.5's own ControlNets do not.
        "force_zeros_for_pooled_projection": context is not None,
    }
    table = state.get("pos_embed.pos_embed")
    if table is not None:
        config["pos_embed_max_size"] = int(round(table.shape[1] ** 0.5))
    return config


def _metadata_head_dim(metadata: dict[str, str], name: str) -> int:
    if HEAD_DIM_METADATA not in metadata:
        return DEFAULT_HEAD_DIM
    try:
        return int(metadata[HEAD_DIM_METADATA])
    except ValueError as exc:
        raise ModelLoadError(
            f"ControlNet '{name}': metadata '{HEAD_DIM_METADATA}' must be a whole number, "
            f"not {metadata[HEAD_DIM_METADATA]!r}",
            name=name,
        ) from exc


# --- Stability's original SD3.5 layout ---------------------------------------------------------------


def is_original_sd35_layout(state: dict[str, Any]) -> bool:
    """True for a state dict in Stability's original SD3.5 ControlNet layout (ComfyUI's test for it)."""
    return (
        "controlnet_blocks.0.weight" in state
        and "pos_embed_input.proj.weight" in state
        and ORIGINAL_SD35_MARKER in state
    )


def sd35_original_to_diffusers(state: dict[str, Any], name: str) -> tuple[dict[str, Any], str | None]:
    """Stability's original SD3.5 ControlNet tensors under diffusers ``SD3ControlNetModel`` names.

    Returns ``(state_dict, control_type)``; ``control_type`` is "blur", "canny", "depth" or None when
    the file has no ``control_type`` scalar. Each block's fused ``attn.qkv`` is split into ``to_q``,
    ``to_k`` and ``to_v`` (its rows are q, then k, then v, as MMDiT's attention reads them); the
    embedders may use diffusers' names or ComfyUI's (``t_embedder``/``y_embedder``); a stored patch
    embedding is dropped because the transformer's is used. Raises ModelLoadError for the parts
    ``SD3ControlNetModel`` cannot run: the "double y embedder" variant, an unknown ``control_type``, a
    control input that is not the 16-channel SD3 latent, and any other tensor (q/k norms among them).
    """
    source = dict(state)
    control_type = _pop_control_type(source, name)
    if any(k.startswith("orig_y_embedder.") for k in source) or _is_square(
        source.get("time_text_embed.text_embedder.linear_1.weight", source.get("y_embedder.mlp.0.weight"))
    ):
        raise ModelLoadError(
            f"ControlNet '{name}' is the SD3.5 variant with a second pooled-text embedder (ComfyUI's "
            "'double_y_emb': blocks fed in parallel, no position embedding); SD3ControlNetModel cannot run "
            f"it. Supported: {'; '.join(SUPPORTED_LAYOUTS)}",
            name=name, supported=list(SUPPORTED_LAYOUTS),
        )
    converted: dict[str, Any] = {}
    unknown: list[str] = []
    for key, tensor in source.items():
        target = _original_key_target(key)
        if target is None:
            unknown.append(key)
        elif target == "":
            continue  # an unused patch embedding (see _ORIGINAL_UNUSED_PREFIXES)
        elif key.endswith((".attn.qkv.weight", ".attn.qkv.bias")):
            if tensor.shape[0] % 3:
                raise ModelLoadError(f"ControlNet '{name}': {key} has {tensor.shape[0]} rows, not 3 equal parts",
                                     name=name, key=key)
            for part, piece in zip(("to_q", "to_k", "to_v"), tensor.chunk(3, dim=0)):
                converted[target.replace(".attn.qkv.", f".attn.{part}.")] = piece
        else:
            converted[target] = tensor
    if unknown:
        raise ModelLoadError(
            f"ControlNet '{name}' is in the original SD3.5 layout but has tensors SD3ControlNetModel has no "
            f"place for: {sorted(unknown)[:5]}" + (f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else ""),
            name=name, unexpected=sorted(unknown)[:20],
        )
    channels = int(converted["pos_embed_input.proj.weight"].shape[1])
    if channels != SD35_CONTROL_LATENT_CHANNELS:
        raise ModelLoadError(
            f"ControlNet '{name}': its control input has {channels} channels; original-layout SD3.5 "
            f"ControlNets take the {SD35_CONTROL_LATENT_CHANNELS}-channel SD3 latent",
            name=name, channels=channels,
        )
    return converted, control_type


def _pop_control_type(state: dict[str, Any], name: str) -> str | None:
    value = state.pop("control_type", None)
    if value is None:
        return None
    if value.numel() != 1:
        raise ModelLoadError(f"ControlNet '{name}': control_type must be one number, got shape "
                             f"{tuple(value.shape)}", name=name)
    number = round(float(value.reshape(())))
    if number not in ORIGINAL_CONTROL_TYPES:
        raise ModelLoadError(
            f"ControlNet '{name}': control_type {number} is unknown; known: "
            + ", ".join(f"{k} ({v})" for k, v in ORIGINAL_CONTROL_TYPES.items()),
            name=name, control_type=number, supported=dict(ORIGINAL_CONTROL_TYPES),
        )
    return ORIGINAL_CONTROL_TYPES[number]


def _is_square(weight: Any) -> bool:
    return weight is not None and weight.ndim == 2 and weight.shape[0] == weight.shape[1]


def _original_key_target(key: str) -> str | None:
    """The diffusers name of an original-layout key; "" for a tensor that is not used; None if unknown."""
    if key.startswith(("controlnet_blocks.", "pos_embed_input.proj.")):
        return key
    if key.startswith(_ORIGINAL_UNUSED_PREFIXES):
        return ""
    for diffusers_prefix, other_prefixes in _ORIGINAL_EMBEDDERS.items():
        for prefix in (diffusers_prefix, *other_prefixes):
            if key in (f"{prefix}.weight", f"{prefix}.bias"):
                return diffusers_prefix + key[len(prefix):]
    match = re.fullmatch(r"(transformer_blocks\.\d+\.)(.+)\.(weight|bias)", key)
    if match is None:
        return None
    block, part, kind = match.groups()
    if part == "attn.qkv":
        return key
    if part in _ORIGINAL_BLOCK_PARTS:
        return f"{block}{_ORIGINAL_BLOCK_PARTS[part]}.{kind}"
    return None
