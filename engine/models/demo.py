"""The built-in demo checkpoint: a tiny SD3.5-shaped model built deterministically, with no download.

It keeps SD3.5 Medium's structure (MMDiT-X: dual attention in layer 0, RMS q/k norm, a pre-only last
context block, 16-channel latents, patch 2, downscale-8 VAE with a mid-block attention, CLIP-L + CLIP-G
with projections, no T5) at widths of 8-32, so the whole engine runs on a CPU in seconds. Weights are
random but seeded: two builds are bit-identical, and so are the images they make.

The CLIP tokenizer is generated too: byte-level BPE over the 256 byte symbols, plus merges of every
pair of lowercase letters, with CLIP's special tokens last (so the end token has the largest id, as in
the real vocabulary).
"""

from __future__ import annotations

import hashlib
import os
import string
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.settings import DEMO_CHECKPOINT

if TYPE_CHECKING:
    import torch

    from engine.nodes.types import ClipHandle, ModelHandle, VaeHandle

DEMO_SEED = 20240607
DEMO_MARKER = "sd35_demo_tiny/1"  # safetensors metadata "engine.demo": regenerate the demo tokenizer on load
BOS, EOS, PAD_G = "<|startoftext|>", "<|endoftext|>", "!"

TRANSFORMER_CONFIG: dict[str, Any] = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 2,
    # 2 heads of 16 rather than 4 of 8: the same width, but CPU attention over 4096 image tokens runs
    # about 2.5x faster with 16-wide heads, which keeps a 1024x1024 demo run to seconds.
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 96,  # wider than CLIP-L + CLIP-G (64): exercises the zero padding
    "caption_projection_dim": 32,
    "pooled_projection_dim": 64,
    "pos_embed_max_size": 96,  # >= 64 patches a side: 1024x1024 images
    "dual_attention_layers": (0,),
    "qk_norm": "rms_norm",
}
VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (8, 8, 16, 16),
    "layers_per_block": 1,
    "latent_channels": 16,
    "norm_num_groups": 4,
    "sample_size": 1024,
    "scaling_factor": 1.5305,
    "shift_factor": 0.0609,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}
CLIP_COMMON: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "projection_dim": 32,
    "max_position_embeddings": 77,
}
CLIP_L_ACT, CLIP_G_ACT = "quick_gelu", "gelu"  # as in the real CLIP-L and CLIP-G


@lru_cache(maxsize=1)
def demo_vocabulary() -> tuple[tuple[tuple[str, int], ...], tuple[tuple[str, str], ...]]:
    """(vocab items, merges) of the generated CLIP BPE tokenizer; special tokens get the last ids."""
    byte_symbols = list(_bytes_to_unicode().values())
    tokens = byte_symbols + [s + "</w>" for s in byte_symbols]
    merges: list[tuple[str, str]] = []
    for a in string.ascii_lowercase:
        for b in string.ascii_lowercase:
            merges.append((a, b))
            merges.append((a, b + "</w>"))
            tokens.extend([a + b, a + b + "</w>"])
    tokens.extend([BOS, EOS])
    return tuple((tok, i) for i, tok in enumerate(tokens)), tuple(merges)


def demo_tokenizers() -> tuple[Any, Any]:
    """(CLIP-L tokenizer, CLIP-G tokenizer): CLIP-L pads with the end token, CLIP-G with "!" like SD3's."""
    from transformers import CLIPTokenizer

    vocab_items, merges = demo_vocabulary()
    vocab = dict(vocab_items)
    tok_l = CLIPTokenizer(vocab=dict(vocab), merges=list(merges), pad_token=EOS, model_max_length=77)
    tok_g = CLIPTokenizer(vocab=dict(vocab), merges=list(merges), pad_token=PAD_G, model_max_length=77)
    return tok_l, tok_g


def write_demo_tokenizer(folder: str | os.PathLike[str]) -> Path:
    """Save the generated tokenizer (vocab.json + merges.txt + configs) to ``folder``; returns it."""
    folder = Path(folder)
    demo_tokenizers()[0].save_pretrained(folder)
    return folder


def build_demo_components(device: str = "cpu", dtype: "torch.dtype | None" = None) -> dict[str, Any]:
    """The demo model's parts, named like a diffusers StableDiffusion3Pipeline's components.

    Keys: transformer, vae, text_encoder (CLIP-L), text_encoder_2 (CLIP-G), tokenizer, tokenizer_2,
    text_encoder_3/tokenizer_3 (None: no T5). Weights come from a fixed seed, always built in float32 on
    the CPU and only then cast and moved, so every device and dtype starts from the same numbers.
    """
    import torch
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    dtype = dtype or torch.float32
    tok_l, tok_g = demo_tokenizers()
    vocab_size = len(tok_l)
    fork_devices: list[int] = []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(DEMO_SEED)
        transformer = SD3Transformer2DModel(**TRANSFORMER_CONFIG)
        torch.manual_seed(DEMO_SEED + 1)
        vae = AutoencoderKL(**VAE_CONFIG)
        encoders = []
        for offset, act in ((2, CLIP_L_ACT), (3, CLIP_G_ACT)):
            torch.manual_seed(DEMO_SEED + offset)
            config = CLIPTextConfig(
                **CLIP_COMMON,
                vocab_size=vocab_size,
                hidden_act=act,
                bos_token_id=tok_l.bos_token_id,
                eos_token_id=tok_l.eos_token_id,
                pad_token_id=tok_l.pad_token_id if act == CLIP_L_ACT else tok_g.pad_token_id,
            )
            encoders.append(CLIPTextModelWithProjection(config))
    for module in (transformer, vae, *encoders):
        module.eval().requires_grad_(False)
        if dtype != torch.float32:
            module.to(dtype=dtype)
        module.to(device=device)
    return {
        "transformer": transformer,
        "vae": vae,
        "text_encoder": encoders[0],
        "text_encoder_2": encoders[1],
        "text_encoder_3": None,
        "tokenizer": tok_l,
        "tokenizer_2": tok_g,
        "tokenizer_3": None,
    }


def demo_handles(device: str = "cpu", dtype: "torch.dtype | None" = None) -> tuple["ModelHandle", "ClipHandle", "VaeHandle"]:
    """(MODEL, CLIP, VAE) handles of a freshly built demo model."""
    from engine.models.checkpoint import handles_from_components

    components = build_demo_components(device=device, dtype=dtype)
    return handles_from_components(components, DEMO_CHECKPOINT, device=device, is_demo=True)


def demo_state_dict_and_metadata() -> tuple[dict[str, "torch.Tensor"], dict[str, str]]:
    """The demo checkpoint's tensors in ComfyUI's single-file layout, and its safetensors metadata."""
    from engine.models.checkpoint import checkpoint_state_dict, checkpoint_metadata

    components = build_demo_components()
    state = checkpoint_state_dict(
        transformer=components["transformer"],
        vae=components["vae"],
        clip_l=components["text_encoder"],
        clip_g=components["text_encoder_2"],
    )
    metadata = checkpoint_metadata(
        components["transformer"], components["vae"], components["text_encoder"], components["text_encoder_2"]
    )
    metadata["engine.demo"] = DEMO_MARKER
    return state, metadata


def demo_checkpoint_bytes() -> bytes:
    """The demo checkpoint as safetensors bytes; identical on every build (the file hashes the same)."""
    from safetensors.torch import save

    state, metadata = demo_state_dict_and_metadata()
    return _canonical_safetensors(save(state, metadata=metadata))


@lru_cache(maxsize=1)
def demo_sha256() -> str:
    """sha256 of :func:`demo_checkpoint_bytes`: the demo's model hash whether loaded built-in or from file."""
    return hashlib.sha256(demo_checkpoint_bytes()).hexdigest()


def write_demo_checkpoint(path: str | os.PathLike[str]) -> Path:
    """Write the demo as a single-file checkpoint (ComfyUI key layout) to ``path``; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(demo_checkpoint_bytes())
    os.replace(tmp, path)
    return path


def _canonical_safetensors(data: bytes) -> bytes:
    """The same safetensors file with its JSON header's keys sorted.

    safetensors writes the metadata map in hash order, which changes between processes; sorting makes
    the bytes, and so the demo's sha256, reproducible. Tensor offsets are relative to the data section,
    so only the header changes."""
    import json
    import struct

    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # keep the data section 8-byte aligned, as safetensors does
    return struct.pack("<Q", len(text)) + text + data[8 + length :]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode symbol table (the byte-level BPE alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))
