"""Flow-matching (rectified flow) sigma schedules and samplers, faithful to ComfyUI's for SD3.

ComfyUI models SD3 as ``ModelSamplingDiscreteFlow`` with the ``CONST`` prediction type:

* a table of 1000 sigmas, ``sigma(t) = shift*t / (1 + (shift-1)*t)`` for ``t = 1/1000 .. 1000/1000``;
* the transformer gets ``timestep = sigma * 1000`` and predicts a velocity ``v``;
  the denoised estimate is ``x - sigma * v``;
* noising is ``x_t = sigma*noise + (1-sigma)*x0``; after sampling, ``x / (1 - sigma_last)`` undoes the
  scaling when a run stops with leftover noise (a no-op when the last sigma is 0).

Schedulers and samplers below follow ``comfy/samplers.py`` and ``comfy/k_diffusion/sampling.py`` line
for line where it matters for the numbers, so a seed gives the image ComfyUI gives on a CPU. Only the
names in :data:`SAMPLER_NAMES` and :data:`SCHEDULER_NAMES` exist: any other name is refused by
validation (``KSampler.check``), never replaced by a look-alike.

Torch is imported inside functions so that the node declarations (which import the name lists) stay
cheap to import.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from engine.nodes.types import Conditioning, ConditioningEntry, ModelHandle

SCHEDULER_NAMES = (
    "simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal", "linear_quadratic",
    "kl_optimal",
)
# "ddim" is ComfyUI's euler (its only difference, random inpainting noise, needs a noise mask).
SAMPLER_NAMES = ("euler", "euler_ancestral", "heun", "dpm_2", "dpmpp_2m", "ddim")
# ComfyUI computes one extra step for these and drops the second-to-last sigma.
DISCARD_PENULTIMATE_SIGMA_SAMPLERS = frozenset({"dpm_2"})
ANCESTRAL_SAMPLERS = frozenset({"euler_ancestral"})
SEED_MODULUS = 2**64  # torch.Generator accepts seeds 0 .. 2**64-1


@dataclass(frozen=True)
class FlowSchedule:
    """ComfyUI's ``ModelSamplingDiscreteFlow``: the sigma table of a rectified-flow model with a shift."""

    shift: float = 3.0
    timesteps: int = 1000
    multiplier: float = 1000.0

    def sigma(self, timestep: "torch.Tensor | float") -> "torch.Tensor":
        import torch

        t = torch.as_tensor(timestep, dtype=torch.float32) / self.multiplier
        return time_snr_shift(self.shift, t)

    def timestep(self, sigma: "torch.Tensor | float") -> "torch.Tensor":
        """What the transformer receives for ``sigma``."""
        return sigma * self.multiplier

    def sigmas(self) -> "torch.Tensor":
        """The 1000-entry table, ascending (``sigmas[0]`` = sigma_min, ``sigmas[-1]`` = sigma_max = 1)."""
        import torch

        return self.sigma((torch.arange(1, self.timesteps + 1, 1) / self.timesteps) * self.multiplier)

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas()[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas()[-1])

    def percent_to_sigma(self, percent: float) -> float:
        """Sigma at a fraction of the run (ConditioningSetTimestepRange's start/end)."""
        if percent <= 0.0:
            return 1.0
        if percent >= 1.0:
            return 0.0
        return float(time_snr_shift(self.shift, 1.0 - percent))


def time_snr_shift(shift: float, t: Any) -> Any:
    if shift == 1.0:
        return t
    return shift * t / (1 + (shift - 1) * t)


# --- schedulers --------------------------------------------------------------------------------------


def scheduler_sigmas(schedule: FlowSchedule, scheduler: str, steps: int) -> "torch.Tensor":
    """``steps + 1`` descending sigmas ending in 0 (ComfyUI's ``calculate_sigmas``), float32 on the CPU.

    ``beta`` may merge repeated timesteps and return fewer, as ComfyUI's does.
    """
    import torch

    if scheduler not in SCHEDULER_NAMES:
        raise ValueError(f"unknown scheduler {scheduler!r}; supported: {', '.join(SCHEDULER_NAMES)}")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, not {steps}")
    if scheduler == "simple":
        return _simple(schedule, steps)
    if scheduler == "sgm_uniform":
        return _normal(schedule, steps, sgm=True)
    if scheduler == "normal":
        return _normal(schedule, steps)
    if scheduler == "ddim_uniform":
        return _ddim_uniform(schedule, steps)
    if scheduler == "beta":
        return _beta(schedule, steps)
    if scheduler == "linear_quadratic":
        return _linear_quadratic(schedule, steps)
    sigma_min, sigma_max = schedule.sigma_min, schedule.sigma_max
    if scheduler == "karras":
        rho = 7.0
        ramp = torch.linspace(0, 1, steps)
        min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
        return _append_zero((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho)
    if scheduler == "exponential":
        return _append_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), steps).exp())
    # kl_optimal; ComfyUI divides by steps-1, which is 0/0 for one step: that step is sigma_max.
    adj = torch.arange(steps, dtype=torch.float).div_(max(steps - 1, 1))
    sigmas = adj.new_zeros(steps + 1)
    sigmas[:-1] = (adj * math.atan(sigma_min) + (1 - adj) * math.atan(sigma_max)).tan_()
    return sigmas


def _append_zero(x: "torch.Tensor") -> "torch.Tensor":
    import torch

    return torch.cat([x, x.new_zeros([1])])


def _simple(schedule: FlowSchedule, steps: int) -> "torch.Tensor":
    import torch

    table = schedule.sigmas()
    stride = len(table) / steps
    sigs = [float(table[-(1 + int(i * stride))]) for i in range(steps)]
    return torch.FloatTensor(sigs + [0.0])


def _ddim_uniform(schedule: FlowSchedule, steps: int) -> "torch.Tensor":
    import torch

    table = schedule.sigmas()
    stride = max(len(table) // steps, 1)
    sigs = []
    x = 1
    while x < len(table):
        sigs.append(float(table[x]))
        x += stride
    return torch.FloatTensor(sigs[::-1] + [0.0])


def _normal(schedule: FlowSchedule, steps: int, sgm: bool = False) -> "torch.Tensor":
    import torch

    start = float(schedule.timestep(schedule.sigma_max))
    end = float(schedule.timestep(schedule.sigma_min))
    append_zero = True
    if sgm:
        timesteps = torch.linspace(start, end, steps + 1)[:-1]
    else:
        if math.isclose(float(schedule.sigma(end)), 0, abs_tol=0.00001):
            steps += 1
            append_zero = False
        timesteps = torch.linspace(start, end, steps)
    sigs = [float(schedule.sigma(ts)) for ts in timesteps]
    if append_zero:
        sigs.append(0.0)
    return torch.FloatTensor(sigs)


def _beta(schedule: FlowSchedule, steps: int, alpha: float = 0.6, beta: float = 0.6) -> "torch.Tensor":
    import numpy
    import scipy.stats
    import torch

    table = schedule.sigmas()
    total = len(table) - 1
    ts = 1 - numpy.linspace(0, 1, steps, endpoint=False)
    ts = numpy.rint(scipy.stats.beta.ppf(ts, alpha, beta) * total)
    sigs: list[float] = []
    last_t = -1
    for t in ts:
        if t != last_t:
            sigs.append(float(table[int(t)]))
        last_t = t
    return torch.FloatTensor(sigs + [0.0])


def _linear_quadratic(schedule: FlowSchedule, steps: int, threshold_noise: float = 0.025) -> "torch.Tensor":
    import torch

    if steps == 1:
        sigma_schedule = [1.0, 0.0]
    else:
        linear_steps = steps // 2
        linear = [i * threshold_noise / linear_steps for i in range(linear_steps)]
        threshold_noise_step_diff = linear_steps - threshold_noise * steps
        quadratic_steps = steps - linear_steps
        quadratic_coef = threshold_noise_step_diff / (linear_steps * quadratic_steps**2)
        linear_coef = threshold_noise / linear_steps - 2 * threshold_noise_step_diff / (quadratic_steps**2)
        const = quadratic_coef * (linear_steps**2)
        quadratic = [quadratic_coef * (i**2) + linear_coef * i + const for i in range(linear_steps, steps)]
        sigma_schedule = [1.0 - x for x in linear + quadratic + [1.0]]
    return torch.FloatTensor(sigma_schedule) * schedule.sigma_max


def ksampler_sigmas(
    schedule: FlowSchedule, scheduler: str, steps: int, sampler: str, denoise: float = 1.0
) -> "torch.Tensor":
    """The sigmas ComfyUI's KSampler runs (``KSampler.set_steps``).

    ``denoise < 1``: schedule ``int(steps / denoise)`` steps and keep the last ``steps + 1`` sigmas.
    ``denoise <= 0``: no sigmas (the latent passes through unchanged).
    """
    import torch

    def calculate(n: int) -> torch.Tensor:
        if sampler in DISCARD_PENULTIMATE_SIGMA_SAMPLERS:
            sigmas = scheduler_sigmas(schedule, scheduler, n + 1)
            return torch.cat([sigmas[:-2], sigmas[-1:]])
        return scheduler_sigmas(schedule, scheduler, n)

    if denoise is None or denoise > 0.9999:
        return calculate(steps)
    if denoise <= 0.0:
        return torch.FloatTensor([])
    return calculate(int(steps / denoise))[-(steps + 1):]


def trim_sigmas(
    sigmas: "torch.Tensor", start_step: int | None, last_step: int | None, force_full_denoise: bool
) -> "torch.Tensor | None":
    """KSamplerAdvanced's window: sigmas[start_step : last_step + 1].

    Returns None when ``start_step`` is at or past the end: ComfyUI then returns the input latent as is.
    ``force_full_denoise`` sets the last sigma of a shortened run to 0 (no leftover noise).
    """
    if last_step is not None and last_step < len(sigmas) - 1:
        sigmas = sigmas[: last_step + 1].clone()
        if force_full_denoise:
            sigmas[-1] = 0
    if start_step is not None:
        if start_step < len(sigmas) - 1:
            sigmas = sigmas[start_step:]
        else:
            return None
    return sigmas


# --- noise -------------------------------------------------------------------------------------------


def seeded_noise(seed: int, shape: Sequence[int]) -> "torch.Tensor":
    """ComfyUI's ``prepare_noise``: float32 normal noise from a CPU generator seeded with ``seed``.

    Generated on the CPU whatever the device, so a seed gives the same image everywhere.
    """
    import torch

    generator = torch.Generator(device="cpu")
    generator.manual_seed(int(seed) % SEED_MODULUS)
    return torch.randn(tuple(shape), dtype=torch.float32, generator=generator, device="cpu")


class AncestralNoise:
    """The extra per-step noise of ancestral samplers, one CPU generator per batch row.

    ComfyUI seeds it with ``seed + 1`` on the CPU (so it differs from the initial noise); we always
    generate on the CPU, so that is the seed on every device (wrapping past 2**64-1). Rows keep their own
    generators, so sampling several rows together draws for each row exactly what it draws alone.
    """

    def __init__(self, seeds: Sequence[int], shapes: Sequence[Sequence[int]], device: Any) -> None:
        import torch

        self.shapes = [tuple(s) for s in shapes]
        self.device = device
        self.generators = []
        for seed in seeds:
            generator = torch.Generator(device="cpu")
            generator.manual_seed((int(seed) + 1) % SEED_MODULUS)
            self.generators.append(generator)

    def __call__(self) -> "torch.Tensor":
        import torch

        parts = [
            torch.randn(shape, dtype=torch.float32, generator=g, device="cpu")
            for g, shape in zip(self.generators, self.shapes)
        ]
        return torch.cat(parts).to(self.device)


# --- guidance: the denoiser the samplers call -------------------------------------------------------


@dataclass(frozen=True)
class RowConditioning:
    """One row of a sampling batch: its conditionings and how many latents it has."""

    positive: "Conditioning"
    negative: "Conditioning"
    batch_size: int


class GuidedDenoiser:
    """``denoised = uncond + (cond - uncond) * cfg`` for every row, in one transformer call per step.

    Each conditioning entry applies only while the current sigma is inside its timestep range (as in
    ComfyUI's ``get_area_and_mult``); several active entries are averaged with their strengths as
    weights. With ``cfg == 1`` the negative is not evaluated at all (ComfyUI's cfg1 optimisation).
    """

    def __init__(
        self, model: "ModelHandle", rows: Sequence[RowConditioning], cfg: float, schedule: FlowSchedule
    ) -> None:
        self.model = model
        self.rows = list(rows)
        self.cfg = float(cfg)
        self.schedule = schedule
        self.use_negative = not math.isclose(self.cfg, 1.0)
        self.model_evaluations = 0

    def _active(self, entry: "ConditioningEntry", sigma: float) -> bool:
        start_sigma = self.schedule.percent_to_sigma(entry.start)
        end_sigma = self.schedule.percent_to_sigma(entry.end)
        return not (sigma > start_sigma or sigma < end_sigma)

    def __call__(self, x: "torch.Tensor", sigma: "torch.Tensor") -> "torch.Tensor":
        import torch

        sigma_value = float(sigma)
        # chunks: (row, is_negative, strength, x_slice, embeds, pooled, controlnet hints)
        chunks = []
        offset = 0
        for row_index, row in enumerate(self.rows):
            x_row = x[offset : offset + row.batch_size]
            offset += row.batch_size
            groups = [(False, row.positive)] + ([(True, row.negative)] if self.use_negative else [])
            for is_negative, conditioning in groups:
                for entry in conditioning:
                    if self._active(entry, sigma_value):
                        embeds = _repeat_to_batch(entry.prompt_embeds, row.batch_size)
                        pooled = _repeat_to_batch(entry.pooled, row.batch_size)
                        chunks.append((row_index, is_negative, float(entry.strength), x_row, embeds, pooled,
                                       entry.controlnets))
        sums = {}
        weights = {}
        for key, denoised in self._evaluate(chunks, sigma):
            sums[key] = sums.get(key, 0) + denoised[0] * denoised[1]
            weights[key] = weights.get(key, 0) + denoised[1]
        out = []
        for row_index, row in enumerate(self.rows):
            shape = (row.batch_size, *x.shape[1:])
            cond = _weighted(sums.get((row_index, False)), weights.get((row_index, False)), shape, x)
            if not self.use_negative:
                out.append(cond)
                continue
            uncond = _weighted(sums.get((row_index, True)), weights.get((row_index, True)), shape, x)
            out.append(uncond + (cond - uncond) * self.cfg)
        return torch.cat(out)

    def _evaluate(self, chunks: list, sigma: "torch.Tensor"):
        """Run the transformer on every chunk, batching chunks whose text lengths match."""
        import torch

        by_length: dict[tuple[int, ...], list] = {}
        for chunk in chunks:
            by_length.setdefault(tuple(chunk[4].shape[1:]), []).append(chunk)
        for group in by_length.values():
            x_in = torch.cat([c[3] for c in group])
            embeds = torch.cat([c[4] for c in group])
            pooled = torch.cat([c[5] for c in group])
            controls = [(c[6], c[3], c[4], c[5]) for c in group] if any(c[6] for c in group) else None
            velocity = self.predict_velocity(x_in, sigma, embeds, pooled, controls)
            denoised = x_in - velocity * sigma.to(x_in.dtype)
            start = 0
            for c in group:
                size = c[3].shape[0]
                yield (c[0], c[1]), (denoised[start : start + size], c[2])
                start += size

    def predict_velocity(
        self, x: "torch.Tensor", sigma: "torch.Tensor", embeds: "torch.Tensor", pooled: "torch.Tensor",
        controls: list | None = None,
    ) -> "torch.Tensor":
        """One transformer call: latents [N,C,h,w] at ``sigma`` -> velocity, float32 like ``x``.

        ``controls``: per consecutive chunk of the batch, ``(ControlNet hints, x, embeds, pooled)``; their
        residuals go into the call as ``block_controlnet_hidden_states`` (see :mod:`engine.controlnet`).
        """
        import torch

        transformer = self.model.transformer
        dtype = self.model.dtype or next(transformer.parameters()).dtype
        device = x.device
        timestep = self.schedule.timestep(sigma).to(device=device, dtype=dtype).expand(x.shape[0])
        extra = {}
        with torch.inference_mode():
            if controls:
                from engine.controlnet import block_residuals

                residuals = block_residuals(transformer, controls, sigma, timestep, self.schedule, dtype)
                if residuals is not None:
                    extra["block_controlnet_hidden_states"] = residuals
            out = transformer(
                hidden_states=x.to(dtype),
                encoder_hidden_states=embeds.to(device=device, dtype=dtype),
                pooled_projections=pooled.to(device=device, dtype=dtype),
                timestep=timestep,
                return_dict=False,
                **extra,
            )[0]
        self.model_evaluations += 1
        return out.to(x.dtype)


class InpaintDenoiser:
    """ComfyUI's ``KSamplerX0Inpaint``: where ``mask`` is 0 the latent stays the input's.

    Before each model call the unmasked region is reset to the input latent noised to the current sigma
    (``sigma*noise + (1-sigma)*latent``, the flow model's noising); after it, the unmasked region of the
    prediction is the input latent, so a run that ends at sigma 0 returns it there exactly.
    """

    def __init__(self, inner: "Denoiser", mask: "torch.Tensor", latent: "torch.Tensor", noise: "torch.Tensor") -> None:
        self.inner = inner
        self.mask = mask
        self.latent = latent
        self.noise = noise

    def __call__(self, x: "torch.Tensor", sigma: "torch.Tensor") -> "torch.Tensor":
        keep = 1.0 - self.mask
        x = x * self.mask + (sigma * self.noise + (1.0 - sigma) * self.latent) * keep
        return self.inner(x, sigma) * self.mask + self.latent * keep


def noise_mask_batch(masks: Sequence["torch.Tensor | None"], shapes: Sequence[Sequence[int]]) -> "torch.Tensor":
    """One denoise mask for a batch of rows (ComfyUI's ``prepare_mask``; a row without a mask is all ones).

    Each mask [N,1,H,W] or [H,W] is resized bilinearly to its row's latent size, spread over the channels
    and repeated to the row's batch size.
    """
    import torch

    parts = []
    for mask, shape in zip(masks, shapes):
        batch, channels, height, width = shape
        if mask is None:
            parts.append(torch.ones((batch, channels, height, width), dtype=torch.float32))
            continue
        mask = mask.float().reshape((-1, 1, mask.shape[-2], mask.shape[-1]))
        mask = torch.nn.functional.interpolate(mask, size=(height, width), mode="bilinear")
        parts.append(_repeat_to_batch(mask.expand(-1, channels, -1, -1), batch))
    return torch.cat(parts)


def _repeat_to_batch(tensor: "torch.Tensor", batch_size: int) -> "torch.Tensor":
    """ComfyUI's ``repeat_to_batch_size``: repeat (or cut) a conditioning to the latent batch."""
    import torch

    if tensor.shape[0] > batch_size:
        return tensor[:batch_size]
    if tensor.shape[0] < batch_size:
        reps = math.ceil(batch_size / tensor.shape[0])
        return torch.cat([tensor] * reps)[:batch_size]
    return tensor


def _weighted(total: Any, weight: Any, shape: tuple[int, ...], like: "torch.Tensor") -> "torch.Tensor":
    import torch

    if total is None:  # no entry active at this sigma: ComfyUI's prediction is then zeros
        return torch.zeros(shape, dtype=like.dtype, device=like.device)
    return total / (weight + 1e-37)


# --- samplers (comfy/k_diffusion/sampling.py) --------------------------------------------------------

Denoiser = Callable[["torch.Tensor", "torch.Tensor"], "torch.Tensor"]
StepHook = Callable[[int], None]


def _to_d(x: "torch.Tensor", sigma: "torch.Tensor", denoised: "torch.Tensor") -> "torch.Tensor":
    return (x - denoised) / sigma


def sample_euler(model: Denoiser, x, sigmas, noise: AncestralNoise | None, before: StepHook, after: StepHook):
    for i in range(len(sigmas) - 1):
        before(i)
        sigma_hat = sigmas[i]
        denoised = model(x, sigma_hat)
        d = _to_d(x, sigma_hat, denoised)
        x = x + d * (sigmas[i + 1] - sigma_hat)
        after(i)
    return x


def sample_euler_ancestral_rf(model: Denoiser, x, sigmas, noise: AncestralNoise | None, before: StepHook,
                              after: StepHook, eta: float = 1.0, s_noise: float = 1.0):
    """ComfyUI's ``sample_euler_ancestral_RF``: what ``euler_ancestral`` runs for CONST (flow) models."""
    for i in range(len(sigmas) - 1):
        before(i)
        denoised = model(x, sigmas[i])
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            downstep_ratio = 1 + (sigmas[i + 1] / sigmas[i] - 1) * eta
            sigma_down = sigmas[i + 1] * downstep_ratio
            alpha_ip1 = 1 - sigmas[i + 1]
            alpha_down = 1 - sigma_down
            renoise_coeff = (sigmas[i + 1] ** 2 - sigma_down**2 * alpha_ip1**2 / alpha_down**2) ** 0.5
            sigma_down_i_ratio = sigma_down / sigmas[i]
            x = sigma_down_i_ratio * x + (1 - sigma_down_i_ratio) * denoised
            if eta > 0:
                x = (alpha_ip1 / alpha_down) * x + noise() * s_noise * renoise_coeff
        after(i)
    return x


def sample_heun(model: Denoiser, x, sigmas, noise: AncestralNoise | None, before: StepHook, after: StepHook):
    for i in range(len(sigmas) - 1):
        before(i)
        sigma_hat = sigmas[i]
        denoised = model(x, sigma_hat)
        d = _to_d(x, sigma_hat, denoised)
        dt = sigmas[i + 1] - sigma_hat
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            denoised_2 = model(x_2, sigmas[i + 1])
            d_2 = _to_d(x_2, sigmas[i + 1], denoised_2)
            x = x + (d + d_2) / 2 * dt
        after(i)
    return x


def sample_dpm_2(model: Denoiser, x, sigmas, noise: AncestralNoise | None, before: StepHook, after: StepHook):
    for i in range(len(sigmas) - 1):
        before(i)
        sigma_hat = sigmas[i]
        denoised = model(x, sigma_hat)
        d = _to_d(x, sigma_hat, denoised)
        if sigmas[i + 1] == 0:
            x = x + d * (sigmas[i + 1] - sigma_hat)
        else:
            sigma_mid = sigma_hat.log().lerp(sigmas[i + 1].log(), 0.5).exp()
            x_2 = x + d * (sigma_mid - sigma_hat)
            denoised_2 = model(x_2, sigma_mid)
            d_2 = _to_d(x_2, sigma_mid, denoised_2)
            x = x + d_2 * (sigmas[i + 1] - sigma_hat)
        after(i)
    return x


def sample_dpmpp_2m(model: Denoiser, x, sigmas, noise: AncestralNoise | None, before: StepHook, after: StepHook):
    def sigma_fn(t):
        return t.neg().exp()

    def t_fn(sigma):
        return sigma.log().neg()

    old_denoised = None
    for i in range(len(sigmas) - 1):
        before(i)
        denoised = model(x, sigmas[i])
        t, t_next = t_fn(sigmas[i]), t_fn(sigmas[i + 1])
        h = t_next - t
        if old_denoised is None or sigmas[i + 1] == 0:
            x = (sigma_fn(t_next) / sigma_fn(t)) * x - (-h).expm1() * denoised
        else:
            h_last = t - t_fn(sigmas[i - 1])
            r = h_last / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigma_fn(t_next) / sigma_fn(t)) * x - (-h).expm1() * denoised_d
        old_denoised = denoised
        after(i)
    return x


SAMPLER_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "euler": sample_euler,
    "ddim": sample_euler,
    "euler_ancestral": sample_euler_ancestral_rf,
    "heun": sample_heun,
    "dpm_2": sample_dpm_2,
    "dpmpp_2m": sample_dpmpp_2m,
}


def run_sampler(
    sampler: str,
    denoiser: Denoiser,
    noise: "torch.Tensor",
    latent: "torch.Tensor",
    sigmas: "torch.Tensor",
    ancestral_noise: AncestralNoise | None = None,
    before_step: StepHook | None = None,
    after_step: StepHook | None = None,
) -> "torch.Tensor":
    """ComfyUI's ``KSAMPLER.sample`` for a CONST model: noise the latent to ``sigmas[0]``, integrate,
    and undo the noise scaling at ``sigmas[-1]``. Empty ``sigmas`` return ``latent`` unchanged."""
    if sampler not in SAMPLER_FUNCTIONS:
        raise ValueError(f"unknown sampler {sampler!r}; supported: {', '.join(SAMPLER_NAMES)}")
    if len(sigmas) == 0:
        return latent
    sigmas = sigmas.to(latent.device)
    x = sigmas[0] * noise + (1.0 - sigmas[0]) * latent
    x = SAMPLER_FUNCTIONS[sampler](
        denoiser, x, sigmas, ancestral_noise, before_step or _no_hook, after_step or _no_hook
    )
    return x / (1.0 - sigmas[-1])


def _no_hook(i: int) -> None:
    return None
