"""Value types passed between nodes: the resident models and the conditioning built from them.

``ModelHandle``, ``ClipHandle`` and ``VaeHandle`` wrap the diffusers/transformers modules held by the
:class:`engine.models.cache.ModelCache`; handles are small immutable views, so a node that changes a
setting (``ModelSamplingSD3``'s shift) makes a copy that shares the same module instead of touching it.

Latent convention: every ``LATENT["samples"]`` tensor in this project is in *model space*, i.e. the
VAE's raw latent already shifted and scaled (``(raw - shift_factor) * scaling_factor``), which is what the
SD3 transformer consumes. :meth:`VaeHandle.encode` returns that space and :meth:`VaeHandle.decode` takes it.

No torch import at module load: the workflow parser and validator import the node package without torch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

CLIP_MAX_TOKENS = 77  # CLIP-L and CLIP-G context length: longer texts are truncated (and logged)
T5_MAX_TOKENS = 256  # diffusers' default max_sequence_length for SD3
EMPTY_PADDING_CHOICES = ("none", "empty_prompt")


@dataclass(frozen=True)
class ModelHandle:
    """The resident SD3/SD3.5 transformer plus its sampling configuration.

    ``patches`` is reserved for LoRA/ControlNet patches applied at sampling time (tuples of immutable
    patch descriptions); loaders always produce an empty tuple.
    """

    transformer: Any = field(repr=False)  # diffusers SD3Transformer2DModel
    name: str
    sha256: str | None = None
    precision: str = "fp32"  # "fp32" | "bf16" | "fp16" | "fp8_e4m3fn" ...
    is_demo: bool = False
    device: str = "cpu"
    dtype: Any = None  # torch.dtype the transformer computes in
    shift: float = 3.0  # flow-matching timestep shift (SD3.5: 3.0)
    latent_channels: int = 16
    vae_scale_factor: int = 8
    patch_size: int = 2
    path: str | None = None
    patches: tuple[Any, ...] = ()

    def with_shift(self, shift: float) -> "ModelHandle":
        """A copy with another flow shift, sharing the same transformer (what ModelSamplingSD3 returns)."""
        return replace(self, shift=float(shift))

    def with_patches(self, *patches: Any) -> "ModelHandle":
        """A copy with extra patches appended, sharing the same transformer."""
        return replace(self, patches=self.patches + tuple(patches))

    @property
    def joint_attention_dim(self) -> int:
        return int(self.transformer.config.joint_attention_dim)

    @property
    def pooled_projection_dim(self) -> int:
        return int(self.transformer.config.pooled_projection_dim)

    def latent_size(self, width: int, height: int) -> tuple[int, int]:
        """(latent_height, latent_width) of an image of ``width`` x ``height`` pixels."""
        return height // self.vae_scale_factor, width // self.vae_scale_factor


@dataclass(frozen=True)
class ClipHandle:
    """Tokenizers and text encoders of SD3: CLIP-L, CLIP-G and (optionally) T5-XXL.

    ``joint_attention_dim`` is the width the transformer's context expects; CLIP hidden states are
    zero-padded to it and, without T5, the T5 part of the sequence is zeros of that width (diffusers'
    behaviour when ``text_encoder_3`` is None).
    """

    tokenizer_l: Any = field(repr=False)
    text_encoder_l: Any = field(repr=False)  # transformers CLIPTextModelWithProjection
    tokenizer_g: Any = field(repr=False)
    text_encoder_g: Any = field(repr=False)  # transformers CLIPTextModelWithProjection
    tokenizer_t5: Any = field(default=None, repr=False)
    text_encoder_t5: Any = field(default=None, repr=False)  # transformers T5EncoderModel
    names: tuple[str, ...] = ()
    joint_attention_dim: int = 4096
    t5_max_tokens: int = T5_MAX_TOKENS
    device: str = "cpu"
    sha256: str | None = None

    @property
    def has_t5(self) -> bool:
        return self.text_encoder_t5 is not None

    def count_tokens(self, text: str) -> int:
        """CLIP-L tokens of ``text`` including BOS/EOS; above 77 the text is truncated by :meth:`encode`."""
        return len(self.tokenizer_l(text, padding=False, truncation=False).input_ids)

    def encode(
        self,
        clip_l_texts: str | list[str],
        clip_g_texts: str | list[str] | None = None,
        t5_texts: str | list[str] | None = None,
        empty_padding: str = "none",
    ) -> tuple["torch.Tensor", "torch.Tensor"]:
        """SD3 text conditioning, as diffusers' ``StableDiffusion3Pipeline.encode_prompt`` computes it.

        Returns ``(prompt_embeds [B, 77 + 256, joint_attention_dim], pooled [B, clip_l_proj + clip_g_proj])``.
        ``clip_g_texts`` and ``t5_texts`` default to ``clip_l_texts``. ``empty_padding``: "none" makes an
        empty text contribute zeros for that encoder (ComfyUI's CLIPTextEncodeSD3 default); "empty_prompt"
        encodes it like any other text (diffusers' behaviour for an empty negative prompt).
        """
        import torch

        if empty_padding not in EMPTY_PADDING_CHOICES:
            raise ValueError(f"empty_padding must be one of {', '.join(EMPTY_PADDING_CHOICES)}, not {empty_padding!r}")
        texts_l = _as_list(clip_l_texts)
        texts_g = _as_list(clip_g_texts) if clip_g_texts is not None else texts_l
        texts_t5 = _as_list(t5_texts) if t5_texts is not None else texts_l
        if not (len(texts_l) == len(texts_g) == len(texts_t5)):
            raise ValueError(
                f"text batches differ in size: clip_l {len(texts_l)}, clip_g {len(texts_g)}, t5 {len(texts_t5)}"
            )
        zero_empty = empty_padding == "none"
        with torch.inference_mode():
            hidden_l, pooled_l = self._clip_embeds(self.tokenizer_l, self.text_encoder_l, texts_l, zero_empty)
            hidden_g, pooled_g = self._clip_embeds(self.tokenizer_g, self.text_encoder_g, texts_g, zero_empty)
            t5_embeds = self._t5_embeds(texts_t5, zero_empty, dtype=hidden_l.dtype)
            clip_embeds = torch.cat([hidden_l, hidden_g], dim=-1)
            if clip_embeds.shape[-1] > t5_embeds.shape[-1]:
                raise ValueError(
                    f"CLIP width {clip_embeds.shape[-1]} exceeds the joint attention width {t5_embeds.shape[-1]}"
                )
            clip_embeds = torch.nn.functional.pad(clip_embeds, (0, t5_embeds.shape[-1] - clip_embeds.shape[-1]))
            prompt_embeds = torch.cat([clip_embeds, t5_embeds.to(clip_embeds.device, clip_embeds.dtype)], dim=-2)
            pooled = torch.cat([pooled_l, pooled_g], dim=-1)
        return prompt_embeds, pooled

    def _clip_embeds(self, tokenizer: Any, encoder: Any, texts: list[str], zero_empty: bool):
        import torch

        device = encoder.device
        ids = tokenizer(
            texts, padding="max_length", max_length=CLIP_MAX_TOKENS, truncation=True, return_tensors="pt"
        ).input_ids
        _log_truncation(tokenizer, texts, CLIP_MAX_TOKENS, "CLIP")
        out = encoder(ids.to(device), output_hidden_states=True)
        pooled = out[0]
        hidden = out.hidden_states[-2].to(dtype=self.text_encoder_l.dtype)  # penultimate layer, like diffusers
        if zero_empty:
            empty = torch.tensor([t == "" for t in texts], device=hidden.device)
            hidden = torch.where(empty[:, None, None], torch.zeros_like(hidden), hidden)
            pooled = torch.where(empty[:, None], torch.zeros_like(pooled), pooled)
        return hidden, pooled

    def _t5_embeds(self, texts: list[str], zero_empty: bool, dtype: Any):
        import torch

        if self.text_encoder_t5 is None:
            return torch.zeros(
                (len(texts), self.t5_max_tokens, self.joint_attention_dim),
                device=self.text_encoder_l.device,
                dtype=dtype,
            )
        ids = self.tokenizer_t5(
            texts,
            padding="max_length",
            max_length=self.t5_max_tokens,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        ).input_ids
        _log_truncation(self.tokenizer_t5, texts, self.t5_max_tokens, "T5")
        embeds = self.text_encoder_t5(ids.to(self.text_encoder_t5.device))[0]
        if zero_empty:
            empty = torch.tensor([t == "" for t in texts], device=embeds.device)
            embeds = torch.where(empty[:, None, None], torch.zeros_like(embeds), embeds)
        return embeds


def _as_list(texts: str | list[str]) -> list[str]:
    return [texts] if isinstance(texts, str) else list(texts)


def _log_truncation(tokenizer: Any, texts: list[str], limit: int, label: str) -> None:
    for text in texts:
        count = len(tokenizer(text, padding=False, truncation=False).input_ids)
        if count > limit:
            log.warning("%s prompt has %d tokens; truncated to %d: %.60r...", label, count, limit, text)


@dataclass(frozen=True)
class VaeHandle:
    """The SD3 VAE (diffusers AutoencoderKL, 16 latent channels) and its latent scaling."""

    vae: Any = field(repr=False)
    name: str
    sha256: str | None = None
    scaling_factor: float = 1.5305
    shift_factor: float = 0.0609
    device: str = "cpu"
    dtype: Any = None
    downscale: int = 8

    def decode(
        self, latents: "torch.Tensor", tiled: bool = False, tile_size: int = 512, overlap: int = 64
    ) -> "torch.Tensor":
        """Model-space latents [B,C,h,w] -> images [B,H,W,C] float in 0..1 on the CPU (ComfyUI's IMAGE).

        ``tiled`` decodes overlapping ``tile_size`` pixel tiles one at a time and blends them with linear
        feathering over ``overlap`` pixels: lower peak memory, nearly the same image.
        """
        import torch

        with torch.inference_mode():
            raw = latents.to(self.vae.device, self.vae.dtype) / self.scaling_factor + self.shift_factor
            if tiled:
                images = self._decode_tiled(raw, tile_size, overlap)
            else:
                images = self.vae.decode(raw).sample
            images = (images.float() / 2 + 0.5).clamp(0, 1)
        return images.permute(0, 2, 3, 1).cpu()

    def encode(self, images: "torch.Tensor") -> "torch.Tensor":
        """Images [B,H,W,C] in 0..1 -> model-space latents [B,C,H/8,W/8] (distribution mean, no sampling)."""
        import torch

        with torch.inference_mode():
            pixels = images.permute(0, 3, 1, 2).to(self.vae.device, self.vae.dtype) * 2 - 1
            raw = self.vae.encode(pixels).latent_dist.mode()
            return (raw - self.shift_factor) * self.scaling_factor

    def _decode_tiled(self, raw: "torch.Tensor", tile_size: int, overlap: int) -> "torch.Tensor":
        import torch

        down = self.downscale
        if tile_size < 2 * down or overlap < 0 or overlap * 2 >= tile_size:
            raise ValueError(f"tile_size {tile_size} and overlap {overlap} need tile_size > 2*overlap >= 0")
        tile = max(tile_size // down, 1)
        lap = overlap // down
        batch, _, height, width = raw.shape
        out = None
        weights = None
        for top in _tile_starts(height, tile, lap):
            for left in _tile_starts(width, tile, lap):
                piece = raw[:, :, top : top + tile, left : left + tile]
                decoded = self.vae.decode(piece).sample.float()
                if out is None:
                    out = torch.zeros(batch, decoded.shape[1], height * down, width * down, device=decoded.device)
                    weights = torch.zeros(1, 1, height * down, width * down, device=decoded.device)
                mask = _feather(decoded.shape[-2], decoded.shape[-1], lap * down, decoded.device)
                y, x = top * down, left * down
                out[:, :, y : y + decoded.shape[-2], x : x + decoded.shape[-1]] += decoded * mask
                weights[:, :, y : y + decoded.shape[-2], x : x + decoded.shape[-1]] += mask
        return out / weights


def _tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Tile origins covering ``size`` with tiles of ``tile`` overlapping by at least ``overlap``."""
    if size <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, size - tile, stride))
    starts.append(size - tile)  # last tile flush with the edge, never a sliver
    return starts


def _feather(height: int, width: int, ramp: int, device: Any) -> "torch.Tensor":
    """Blend weights rising linearly over ``ramp`` pixels from each edge (never zero, so edges still count)."""
    import torch

    def axis(n: int) -> torch.Tensor:
        pos = torch.arange(n, device=device, dtype=torch.float32)
        dist = torch.minimum(pos + 1, n - pos)
        return (dist / max(ramp, 1)).clamp(max=1.0)

    return (axis(height)[:, None] * axis(width)[None, :])[None, None]


@dataclass(frozen=True)
class ConditioningEntry:
    """One conditioning: text embeddings plus where and how strongly it applies.

    ``start``/``end`` are fractions of the sampling run (0 = first step, 1 = last), as in ComfyUI's
    ConditioningSetTimestepRange. ``controlnets`` holds ControlNet hints added by later nodes.
    """

    prompt_embeds: Any  # torch.Tensor [B, seq, joint_attention_dim]
    pooled: Any  # torch.Tensor [B, pooled_projection_dim]
    start: float = 0.0
    end: float = 1.0
    strength: float = 1.0
    controlnets: tuple[Any, ...] = ()
    prompt: str | None = None  # the text it was encoded from, for the run record

    def with_options(self, **changes: Any) -> "ConditioningEntry":
        return replace(self, **changes)


@dataclass(frozen=True)
class Conditioning:
    """ComfyUI's CONDITIONING: a list of entries that the sampler combines (area-free in SD3)."""

    entries: tuple[ConditioningEntry, ...] = field(default_factory=tuple)

    @classmethod
    def single(cls, prompt_embeds: Any, pooled: Any, prompt: str | None = None) -> "Conditioning":
        return cls((ConditioningEntry(prompt_embeds, pooled, prompt=prompt),))

    def __iter__(self):
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def combine(self, other: "Conditioning") -> "Conditioning":
        """ConditioningCombine: both lists' entries."""
        return Conditioning(self.entries + other.entries)

    def with_timestep_range(self, start: float, end: float) -> "Conditioning":
        """ConditioningSetTimestepRange: every entry restricted to [start, end] of the run."""
        return Conditioning(tuple(replace(e, start=float(start), end=float(end)) for e in self.entries))

    def zeroed(self) -> "Conditioning":
        """ConditioningZeroOut: same shapes, all zeros."""
        import torch

        return Conditioning(
            tuple(
                replace(e, prompt_embeds=torch.zeros_like(e.prompt_embeds), pooled=torch.zeros_like(e.pooled))
                for e in self.entries
            )
        )
