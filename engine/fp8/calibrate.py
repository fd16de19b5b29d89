"""Static activation scales from representative prompts.

:func:`calibrate` hooks every layer that is (or will be) quantized, lets the caller run a few
sampler steps per prompt, and turns the largest input magnitude each layer saw into its input
scale (``amax / 448``). The caller owns the sampling: ``run_forward(prompt)`` may be anything that
pushes the prompt through the transformer (:func:`make_prompt_runner` adapts an engine callable).

:func:`calibrate_checkpoint` is the whole job behind ``python app.py calibrate``: load a checkpoint
through the engine, sample every prompt with the real nodes, write the sidecar tied to its sha256.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import torch
from torch import nn

from engine.errors import Fp8Error, ModelNotFound
from engine.fp8.linear import Fp8Linear, import_transformer_engine, scale_from_amax, transformer_engine_recipe
from engine.fp8.quantize import DEFAULT_KEEP_BF16, quantizable_linears

if TYPE_CHECKING:
    from engine.settings import Settings

DEFAULT_PROMPTS_PATH = Path(__file__).with_name("calibration_prompts.txt")


@dataclass
class CalibrationResult:
    """Per-layer input scales (float32 scalars) and the maxima they came from."""

    scales: dict[str, torch.Tensor]
    amax: dict[str, torch.Tensor]
    prompts: int
    calls: dict[str, int] = field(default_factory=dict)
    uncovered: list[str] = field(default_factory=list)  # target layers no forward reached

    def summary(self) -> str:
        tail = f"; {len(self.uncovered)} layers never ran and stay dynamic" if self.uncovered else ""
        return f"calibrated {len(self.scales)} layers over {self.prompts} prompts{tail}"


def load_calibration_prompts(path: str | Path | None = None) -> list[str]:
    """Prompts from ``path`` (one a line; blank lines and ``#`` comments skipped), default: shipped set."""
    source = Path(path) if path is not None else DEFAULT_PROMPTS_PATH
    try:
        text = source.read_text(encoding="utf-8")
    except OSError as exc:
        raise Fp8Error(f"cannot read calibration prompts {source}: {exc}", path=str(source)) from exc
    prompts = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise Fp8Error(f"calibration prompt file {source} holds no prompts", path=str(source))
    return prompts


def make_prompt_runner(
    generate: Callable[..., Any], *, steps: int = 8, seed: int = 0, **fixed: Any
) -> Callable[[str], None]:
    """Adapt ``generate(prompt=..., steps=..., seed=..., **fixed)`` into ``run_forward(prompt)``.

    ``generate`` is whatever samples with the model being calibrated (an engine call, a diffusers
    pipeline wrapper); a few steps spanning the schedule cover the activation ranges that matter.
    """

    def run_forward(prompt: str) -> None:
        generate(prompt=prompt, steps=steps, seed=seed, **fixed)

    return run_forward


def calibration_targets(model: nn.Module, keep_bf16: Iterable[str] = DEFAULT_KEEP_BF16) -> dict[str, nn.Module]:
    """The FP8 layers of ``model``, or, before quantization, the linears quantization would replace."""
    fp8 = {name: m for name, m in model.named_modules() if isinstance(m, Fp8Linear)}
    if fp8:
        return fp8
    selected, _ = quantizable_linears(model, keep_bf16)
    return {name: model.get_submodule(name) for name in selected}


def calibrate(
    transformer: nn.Module,
    run_forward: Callable[[str], Any],
    prompts: Sequence[str],
    *,
    keep_bf16: Iterable[str] = DEFAULT_KEEP_BF16,
    margin: float = 1.0,
) -> CalibrationResult:
    """Record each target layer's input amax over ``run_forward(p)`` for every prompt.

    Works on a float transformer (targets = the linears :func:`quantize_transformer` would replace)
    or an already quantized one (targets = its FP8 layers; TE layers also record through TE's own
    calibrating mode). ``margin`` > 1 leaves headroom above the largest value seen.
    """
    if not prompts:
        raise Fp8Error("calibration needs at least one prompt")
    targets = calibration_targets(transformer, keep_bf16)
    if not targets:
        raise Fp8Error("the model has no layers to calibrate", model=type(transformer).__name__)
    amax: dict[str, torch.Tensor] = {}
    calls: dict[str, int] = {}

    def recorder(name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple) -> None:
            # A device-side running max: no .item(), so recording never synchronises the GPU.
            seen = args[0].detach().abs().amax().to(torch.float32)
            amax[name] = torch.maximum(amax[name], seen) if name in amax else seen
            calls[name] = calls.get(name, 0) + 1

        return hook

    handles = [module.register_forward_pre_hook(recorder(name)) for name, module in targets.items()]
    te_layers = [m for m in targets.values() if isinstance(m, Fp8Linear) and m.backend == "transformer_engine"]
    try:
        for layer in te_layers:
            layer.te_calibrating = True
        with torch.no_grad(), _te_calibration_context(te_layers):
            for prompt in prompts:
                run_forward(prompt)
    finally:
        for handle in handles:
            handle.remove()
        for layer in te_layers:
            layer.te_calibrating = False
    scales = {name: scale_from_amax(value, margin).cpu() for name, value in amax.items()}
    uncovered = [name for name in targets if name not in amax]
    return CalibrationResult(
        scales=scales,
        amax={k: v.cpu() for k, v in amax.items()},
        prompts=len(prompts),
        calls=calls,
        uncovered=uncovered,
    )


def _te_calibration_context(te_layers: list) -> contextlib.AbstractContextManager:
    if not te_layers:
        return contextlib.nullcontext()
    te = import_transformer_engine()
    return te.fp8_autocast(enabled=False, calibrating=True, fp8_recipe=transformer_engine_recipe())


def calibrate_checkpoint(
    settings: "Settings",
    checkpoint: str | None = None,
    prompts_file: str | Path | None = None,
    steps: int = 4,
    size: int = 512,
    *,
    seed: int = 0,
    cfg: float = 4.0,
    margin: float = 1.0,
    progress: bool = True,
    text_encoders: Sequence[str] = (),
) -> Path:
    """Calibrate the FP8 activation scales of ``checkpoint`` (default: the default checkpoint).

    ``checkpoint`` is a file of ``models/checkpoints`` or, like SD3.5 Large and Medium as published (the
    transformer alone), of ``models/diffusion_models``. ``text_encoders`` (two or three names from
    ``models/text_encoders``: CLIP-L, CLIP-G and optionally T5-XXL, as TripleCLIPLoader takes them) encode
    the prompts instead of the checkpoint's own, which a transformer-only file does not have.

    The checkpoint loads through the model cache the settings describe, in high precision
    (``precision=fp8`` counts as ``auto`` here, and existing sidecars are ignored). Each prompt (the
    shipped set, or one a line from ``prompts_file``) goes through the real nodes, CLIPTextEncode and
    KSampler (euler, sgm_uniform, ``cfg``), for ``steps`` steps at ``size`` x ``size``; no image is
    decoded, since only the transformer's activations matter. The per-layer input maxima become the
    sidecar, beside the checkpoint file (under ``<data_dir>/fp8/`` for the built-in demo) and tied to
    the checkpoint's sha256. Returns its path; the next FP8 load of that checkpoint applies the scales.
    """
    import dataclasses

    from tqdm import tqdm

    from engine.fp8.policy import sidecar_location
    from engine.fp8.sidecar import checkpoint_sha256, save_sidecar
    from engine.nodes import default_registry
    from engine.nodes.context import NodeContext
    from engine.runtime import build_model_cache

    if steps < 1:
        raise Fp8Error(f"calibration needs at least one sampler step, got {steps}", steps=steps)
    if size < 16 or size % 16:
        raise Fp8Error(f"calibration size must be a positive multiple of 16, got {size}", size=size)
    name = checkpoint or settings.default_checkpoint
    prompts = load_calibration_prompts(prompts_file)
    calibration_settings = dataclasses.replace(
        settings, precision="auto" if settings.precision == "fp8" else settings.precision, compile=False
    )
    models = build_model_cache(calibration_settings, use_sidecars=False)
    if len(text_encoders) not in (0, 2, 3):
        raise Fp8Error(f"give two or three text encoders (CLIP-L, CLIP-G, optionally T5-XXL), not "
                       f"{len(text_encoders)}", text_encoders=list(text_encoders))
    registry = default_registry()
    temp_dir = Path(settings.data_dir) / "temp"
    ctx = NodeContext(models=models, output_dir=temp_dir, temp_dir=temp_dir, device=models.device)

    def node(class_type: str) -> Any:
        return registry.get(class_type)()

    try:
        ref = models.resolver.resolve("checkpoints", name)
        model, clip, _vae = node("CheckpointLoaderSimple").run(ctx, ckpt_name=name)
    except ModelNotFound:  # the transformer alone, as SD3.5 is published: UNETLoader's folder
        ref = models.resolver.resolve("diffusion_models", name)
        (model,) = node("UNETLoader").run(ctx, unet_name=name, weight_dtype="default")
        clip = None
    if text_encoders:
        names = dict(zip(("clip_name1", "clip_name2", "clip_name3"), text_encoders))
        if len(text_encoders) == 3:
            (clip,) = node("TripleCLIPLoader").run(ctx, **names)
        else:
            (clip,) = node("DualCLIPLoader").run(ctx, **names, type="sd3")
    if clip is None:
        raise Fp8Error(
            f"'{name}' holds no text encoders; name the ones to encode the calibration prompts with "
            "(--text-encoders clip_l.safetensors,clip_g.safetensors,t5xxl_fp16.safetensors)",
            checkpoint=name,
        )
    encode, sampler = node("CLIPTextEncode"), node("KSampler")
    (negative,) = encode.run(ctx, text="", clip=clip)
    (latent,) = node("EmptySD3LatentImage").run(ctx, width=size, height=size, batch_size=1)

    with tqdm(total=len(prompts), unit="prompt", desc=f"calibrating {name}", disable=not progress) as bar:

        def generate(prompt: str, steps: int, seed: int) -> None:
            (positive,) = encode.run(ctx, text=prompt, clip=clip)
            sampler.run(
                ctx, model=model, seed=seed, steps=steps, cfg=cfg, sampler_name="euler", scheduler="sgm_uniform",
                positive=positive, negative=negative, latent_image=latent, denoise=1.0,
            )
            bar.update(1)

        result = calibrate(model.transformer, make_prompt_runner(generate, steps=steps, seed=seed), prompts, margin=margin)
    sha = model.sha256 or checkpoint_sha256(ref.path)
    path = save_sidecar(
        sidecar_location(ref.name, ref.path, settings.data_dir),
        result.scales,
        sha,
        extra_metadata={"checkpoint": name, "prompts": len(prompts), "steps": steps, "size": size,
                        "uncovered": len(result.uncovered)},
    )
    if progress:
        tqdm.write(result.summary())
    return path
