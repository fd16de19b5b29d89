"""Sampling nodes: ModelSamplingSD3, KSampler and KSamplerAdvanced.

KSampler follows ComfyUI's ``common_ksampler``: the empty latent is adapted to the model, noise comes from
the seed on the CPU, the sigmas from the scheduler (``denoise``/step window applied), and the sampler runs
with classifier-free guidance. ``run_batch`` samples several rows as one batch: each row keeps its own
noise (from its own seed), its own conditioning and its own ancestral noise generator, so a row's image
is the one it gets alone.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from engine.errors import ExecutionError
from engine.nodes.base import Input, NodeType, Output
from engine.nodes.conditioning import conditioning_prompt
from engine.sampling import SAMPLER_NAMES, SCHEDULER_NAMES

if TYPE_CHECKING:
    import torch

    from engine.nodes.context import NodeContext
    from engine.nodes.types import Conditioning, ModelHandle

SEED_MAX = 0xFFFFFFFFFFFFFFFF
ENABLE_DISABLE = ("enable", "disable")
DISABLE_ENABLE = ("disable", "enable")


def _check_sampler_and_scheduler(values: dict[str, Any]) -> list[tuple[str | None, str, str, str]]:
    problems = []
    for name, supported in (("sampler_name", SAMPLER_NAMES), ("scheduler", SCHEDULER_NAMES)):
        value = values.get(name)
        if value is not None and value not in supported:
            problems.append((
                name,
                "value_not_in_list",
                f"{name}: '{value}' not in list (this engine samples rectified-flow models faithfully only with these)",
                "supported: " + ", ".join(supported),
            ))
    return problems


class ModelSamplingSD3(NodeType):
    """Sets the flow shift of the model's sigma schedule (SD3.5 default 3.0)."""

    class_type = "ModelSamplingSD3"
    category = "advanced/model"
    inputs = (Input("model", "MODEL"), Input("shift", "FLOAT", default=3.0, min=0.0, max=100.0, step=0.01))
    outputs = (Output("MODEL"),)

    def run(self, ctx: "NodeContext", model: Any, shift: float) -> tuple[Any]:
        return (model.with_shift(shift),)


class KSampler(NodeType):
    class_type = "KSampler"
    category = "sampling"
    # Each row samples its own seed: a cached latent would only hold memory, never be reused by a batch.
    cacheable = False
    inputs = (
        Input("model", "MODEL"),
        Input("seed", "INT", default=0, min=0, max=SEED_MAX),
        Input("steps", "INT", default=20, min=1, max=10000),
        Input("cfg", "FLOAT", default=8.0, min=0.0, max=100.0, step=0.1),
        Input("sampler_name", "COMBO", choices=SAMPLER_NAMES),
        Input("scheduler", "COMBO", choices=SCHEDULER_NAMES),
        Input("positive", "CONDITIONING"),
        Input("negative", "CONDITIONING"),
        Input("latent_image", "LATENT"),
        Input("denoise", "FLOAT", default=1.0, min=0.0, max=1.0, step=0.01),
    )
    outputs = (Output("LATENT"),)

    @classmethod
    def check(cls, values: dict[str, Any], ctx: "NodeContext | None") -> list[tuple[str | None, str, str, str]]:
        return _check_sampler_and_scheduler(values)

    def run(self, ctx: "NodeContext", **inputs: Any) -> tuple[Any]:
        return self.run_batch(ctx, [inputs])[0]["result"]

    def run_batch(self, ctx: "NodeContext", inputs_list: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Rows that share model and sampling settings are sampled together; see the module docstring."""
        jobs = [
            SamplingJob(
                model=i["model"], seed=i["seed"], steps=i["steps"], cfg=i["cfg"], sampler=i["sampler_name"],
                scheduler=i["scheduler"], positive=i["positive"], negative=i["negative"],
                latent=i["latent_image"], denoise=i.get("denoise", 1.0),
            )
            for i in inputs_list
        ]
        return sample_jobs(ctx, jobs)


class KSamplerAdvanced(NodeType):
    class_type = "KSamplerAdvanced"
    category = "sampling"
    cacheable = False  # as KSampler
    inputs = (
        Input("model", "MODEL"),
        Input("add_noise", "COMBO", default="enable", choices=ENABLE_DISABLE),
        Input("noise_seed", "INT", default=0, min=0, max=SEED_MAX),
        Input("steps", "INT", default=20, min=1, max=10000),
        Input("cfg", "FLOAT", default=8.0, min=0.0, max=100.0, step=0.1),
        Input("sampler_name", "COMBO", choices=SAMPLER_NAMES),
        Input("scheduler", "COMBO", choices=SCHEDULER_NAMES),
        Input("positive", "CONDITIONING"),
        Input("negative", "CONDITIONING"),
        Input("latent_image", "LATENT"),
        Input("start_at_step", "INT", default=0, min=0, max=10000),
        Input("end_at_step", "INT", default=10000, min=0, max=10000),
        Input("return_with_leftover_noise", "COMBO", default="disable", choices=DISABLE_ENABLE),
    )
    outputs = (Output("LATENT"),)

    @classmethod
    def check(cls, values: dict[str, Any], ctx: "NodeContext | None") -> list[tuple[str | None, str, str, str]]:
        return _check_sampler_and_scheduler(values)

    def run(self, ctx: "NodeContext", **inputs: Any) -> tuple[Any]:
        return self.run_batch(ctx, [inputs])[0]["result"]

    def run_batch(self, ctx: "NodeContext", inputs_list: list[dict[str, Any]]) -> list[dict[str, Any]]:
        jobs = [
            SamplingJob(
                model=i["model"], seed=i["noise_seed"], steps=i["steps"], cfg=i["cfg"],
                sampler=i["sampler_name"], scheduler=i["scheduler"], positive=i["positive"],
                negative=i["negative"], latent=i["latent_image"], denoise=1.0,
                add_noise=i.get("add_noise", "enable") == "enable",
                start_step=i.get("start_at_step", 0), last_step=i.get("end_at_step", 10000),
                # ComfyUI: a run cut short by end_at_step ends at sigma 0 unless leftover noise is asked for
                force_full_denoise=i.get("return_with_leftover_noise", "disable") != "enable",
            )
            for i in inputs_list
        ]
        return sample_jobs(ctx, jobs)


@dataclass
class SamplingJob:
    """One row's KSampler inputs."""

    model: "ModelHandle"
    seed: int
    steps: int
    cfg: float
    sampler: str
    scheduler: str
    positive: "Conditioning"
    negative: "Conditioning"
    latent: dict[str, Any]
    denoise: float = 1.0
    add_noise: bool = True
    start_step: int | None = None
    last_step: int | None = None
    force_full_denoise: bool = False

    def batch_signature(self) -> tuple:
        """Rows with equal signatures can share one transformer batch."""
        samples = self.latent["samples"]
        return (
            id(self.model.transformer), self.model.shift, self.model.patches, self.steps, float(self.cfg),
            self.sampler, self.scheduler, float(self.denoise), self.start_step, self.last_step,
            self.force_full_denoise, tuple(samples.shape[1:]), self.latent.get("pixel_size"),
        )


def sample_jobs(ctx: "NodeContext", jobs: list[SamplingJob]) -> list[dict[str, Any]]:
    """Sample every job; returns per job ``{"result": (latent,), "record": {...}}``.

    ``record`` holds the row's own generation parameters (seed, prompt, ...); they are also written into
    ``ctx.record`` when there is a single job.
    """
    groups: dict[tuple, list[int]] = {}
    for index, job in enumerate(jobs):
        groups.setdefault(job.batch_signature(), []).append(index)
    results: list[dict[str, Any] | None] = [None] * len(jobs)
    for indices in groups.values():
        latents = _sample_group(ctx, [jobs[i] for i in indices])
        for i, latent in zip(indices, latents):
            results[i] = {"result": (latent,), "record": generation_record(jobs[i], latent)}
    if len(jobs) == 1:
        ctx.record.update(results[0]["record"])
    return results  # type: ignore[return-value]


def generation_record(job: SamplingJob, latent: dict[str, Any]) -> dict[str, Any]:
    """The ledger's generation parameters of one sampled row."""
    model = job.model
    height, width = latent["samples"].shape[-2:]
    return {
        "prompt": conditioning_prompt(job.positive),
        "negative_prompt": conditioning_prompt(job.negative),
        "seed": int(job.seed),
        "steps": int(job.steps),
        "cfg": float(job.cfg),
        "sampler": job.sampler,
        "scheduler": job.scheduler,
        "denoise": float(job.denoise),
        "width": int(width) * model.vae_scale_factor,
        "height": int(height) * model.vae_scale_factor,
        "model_name": model.name,
        "model_hash": model.sha256,
        "precision": model.precision,
    }


def adapt_latent(model: "ModelHandle", latent: dict[str, Any]) -> "torch.Tensor":
    """The latent in the model's shape (ComfyUI's ``fix_empty_latent_channels``, extended to spatial size).

    An all-zero latent (an empty latent) whose channels or size do not match the model is replaced by
    zeros of the model's channel count at ``pixel_size / vae_scale_factor``; a non-empty latent that does
    not match is an error, never resized.
    """
    import torch

    samples = latent["samples"].float()
    batch, channels, height, width = samples.shape
    if "pixel_size" in latent:
        pixel_w, pixel_h = latent["pixel_size"]
        want_h, want_w = model.latent_size(pixel_w, pixel_h)
    else:
        want_h, want_w = height, width
    if (channels, height, width) != (model.latent_channels, want_h, want_w):
        if torch.count_nonzero(samples) != 0:
            raise ExecutionError(
                f"latent of shape {tuple(samples.shape)} does not fit model '{model.name}' "
                f"({model.latent_channels} channels, {want_h}x{want_w})",
                latent_shape=list(samples.shape),
                model_channels=model.latent_channels,
            )
        samples = torch.zeros([batch, model.latent_channels, want_h, want_w], dtype=torch.float32)
    patch = model.patch_size
    if want_h % patch or want_w % patch:
        raise ExecutionError(
            f"latent size {want_h}x{want_w} is not a multiple of the model's patch size {patch}: "
            f"use width and height that are multiples of {patch * model.vae_scale_factor}",
            latent_shape=list(samples.shape),
        )
    return samples


def _sample_group(ctx: "NodeContext", jobs: list[SamplingJob]) -> list[dict[str, Any]]:
    """Sample rows sharing one signature as one batch; returns each row's output LATENT."""
    import torch

    from engine.sampling import (
        ANCESTRAL_SAMPLERS, AncestralNoise, FlowSchedule, GuidedDenoiser, InpaintDenoiser, RowConditioning,
        ksampler_sigmas, noise_mask_batch, run_sampler, seeded_noise, trim_sigmas,
    )

    first = jobs[0]
    if first.sampler not in SAMPLER_NAMES or first.scheduler not in SCHEDULER_NAMES:
        raise ExecutionError(
            f"sampler '{first.sampler}' / scheduler '{first.scheduler}' not supported; samplers: "
            f"{', '.join(SAMPLER_NAMES)}; schedulers: {', '.join(SCHEDULER_NAMES)}",
            node_id=ctx.node_id, class_type=ctx.class_type,
        )
    model = first.model
    device = model.device
    samples = [adapt_latent(model, job.latent) for job in jobs]
    schedule = FlowSchedule(shift=model.shift)
    sigmas = ksampler_sigmas(schedule, first.scheduler, first.steps, first.sampler, first.denoise)
    sigmas = trim_sigmas(sigmas, first.start_step, first.last_step, first.force_full_denoise)
    if sigmas is None or len(sigmas) == 0:  # nothing to do: ComfyUI hands the latent back
        return [_output_latent(job.latent, s) for job, s in zip(jobs, samples)]

    noise = torch.cat([
        seeded_noise(job.seed, s.shape) if job.add_noise else torch.zeros_like(s) for job, s in zip(jobs, samples)
    ]).to(device)
    latent = torch.cat(samples).to(device)
    ancestral = None
    if first.sampler in ANCESTRAL_SAMPLERS:
        ancestral = AncestralNoise([job.seed for job in jobs], [s.shape for s in samples], device)
    for job in jobs:
        _check_conditioning_fits(ctx, model, job.positive, "positive")
        _check_conditioning_fits(ctx, model, job.negative, "negative")
    rows = [RowConditioning(job.positive, job.negative, s.shape[0]) for job, s in zip(jobs, samples)]
    denoiser = GuidedDenoiser(model, rows, first.cfg, schedule)
    masks = [job.latent.get("noise_mask") for job in jobs]
    if any(mask is not None for mask in masks):  # inpainting: only the masked region changes
        mask = noise_mask_batch(masks, [s.shape for s in samples]).to(device)
        denoiser = InpaintDenoiser(denoiser, mask, latent, noise)
    total = len(sigmas) - 1

    def after_step(i: int) -> None:
        ctx.progress("step", i + 1, total)

    ctx.start_sampler_clock()
    # LoRA patches go onto the resident transformer for this run only and always come off again.
    with contextlib.ExitStack() as patches:
        for patch in model.patches:
            patches.enter_context(patch.applied(model.transformer))
        out = run_sampler(
            first.sampler, denoiser, noise, latent, sigmas, ancestral,
            before_step=lambda i: ctx.check_interrupt(), after_step=after_step,
        )
    out = out.float().cpu()
    results = []
    start = 0
    for job, s in zip(jobs, samples):
        results.append(_output_latent(job.latent, out[start : start + s.shape[0]]))
        start += s.shape[0]
    return results


def _check_conditioning_fits(ctx: "NodeContext", model: "ModelHandle", conditioning: "Conditioning", name: str) -> None:
    """Text encoders and transformer must agree on widths; say so instead of failing inside a matmul."""
    want_context, want_pooled = model.joint_attention_dim, model.pooled_projection_dim
    for entry in conditioning:
        context, pooled = int(entry.prompt_embeds.shape[-1]), int(entry.pooled.shape[-1])
        if (context, pooled) != (want_context, want_pooled):
            raise ExecutionError(
                f"{name} conditioning (text width {context}, pooled {pooled}) does not fit model '{model.name}' "
                f"(expects {want_context} and {want_pooled}): the text encoders belong to another model",
                node_id=ctx.node_id, class_type=ctx.class_type, input_name=name,
            )


def _output_latent(latent: dict[str, Any], samples: "torch.Tensor") -> dict[str, Any]:
    out = {k: v for k, v in latent.items() if k not in ("samples", "empty", "pixel_size")}
    out["samples"] = samples
    return out


SAMPLING_NODES = (ModelSamplingSD3, KSampler, KSamplerAdvanced)
