"""Flow-matching schedules and samplers (engine/sampling.py) against ComfyUI's formulas.

Expected values are computed here from the formulas of ComfyUI's ``ModelSamplingDiscreteFlow`` and
``comfy/samplers.py`` in plain Python, independently of the implementation under test.
"""

import math

import pytest
import torch

from engine.sampling import (
    SAMPLER_FUNCTIONS,
    SAMPLER_NAMES,
    SCHEDULER_NAMES,
    AncestralNoise,
    FlowSchedule,
    ksampler_sigmas,
    run_sampler,
    scheduler_sigmas,
    seeded_noise,
    trim_sigmas,
)

SHIFT = 3.0


def flow_sigma(t: float, shift: float = SHIFT) -> float:
    return shift * t / (1 + (shift - 1) * t)


SIGMA_MIN = flow_sigma(1 / 1000)  # 0.0029940119760479044
SIGMA_MAX = 1.0


def expected(scheduler: str, steps: int) -> list[float]:
    """ComfyUI's schedules for SD3 (shift 3), written out from the formulas."""
    if scheduler == "simple":
        stride = 1000 / steps
        return [flow_sigma((1000 - int(i * stride)) / 1000) for i in range(steps)] + [0.0]
    if scheduler in ("sgm_uniform", "normal"):
        start, end = 1000 * SIGMA_MAX, 1000 * SIGMA_MIN
        count = steps + 1 if scheduler == "sgm_uniform" else steps
        ts = [start + (end - start) * i / (count - 1) for i in range(count)]
        if scheduler == "sgm_uniform":
            ts = ts[:-1]
        return [flow_sigma(t / 1000) for t in ts] + [0.0]
    if scheduler == "karras":
        rho = 7.0
        lo, hi = SIGMA_MIN ** (1 / rho), SIGMA_MAX ** (1 / rho)
        return [(hi + i / (steps - 1) * (lo - hi)) ** rho for i in range(steps)] + [0.0]
    if scheduler == "exponential":
        a, b = math.log(SIGMA_MAX), math.log(SIGMA_MIN)
        return [math.exp(a + (b - a) * i / (steps - 1)) for i in range(steps)] + [0.0]
    if scheduler == "ddim_uniform":
        stride = 1000 // steps
        return [flow_sigma((i + 1) / 1000) for i in range(1, 1000, stride)][::-1] + [0.0]
    if scheduler == "kl_optimal":
        out = []
        for i in range(steps):
            a = i / (steps - 1)
            out.append(math.tan(a * math.atan(SIGMA_MIN) + (1 - a) * math.atan(SIGMA_MAX)))
        return out + [0.0]
    if scheduler == "linear_quadratic":
        threshold, linear_steps = 0.025, steps // 2
        diff = linear_steps - threshold * steps
        quadratic_steps = steps - linear_steps
        qc = diff / (linear_steps * quadratic_steps**2)
        lc = threshold / linear_steps - 2 * diff / quadratic_steps**2
        const = qc * linear_steps**2
        sched = [i * threshold / linear_steps for i in range(linear_steps)]
        sched += [qc * i**2 + lc * i + const for i in range(linear_steps, steps)]
        return [1.0 - x for x in sched + [1.0]]
    if scheduler == "beta":
        import numpy
        import scipy.stats

        ts = numpy.rint(scipy.stats.beta.ppf(1 - numpy.linspace(0, 1, steps, endpoint=False), 0.6, 0.6) * 999)
        out, last = [], -1
        for t in ts:
            if t != last:
                out.append(flow_sigma((int(t) + 1) / 1000))
            last = t
        return out + [0.0]
    raise AssertionError(scheduler)


def test_flow_schedule_table_matches_comfyui():
    schedule = FlowSchedule(shift=SHIFT)
    table = schedule.sigmas()
    assert len(table) == 1000
    assert float(table[0]) == pytest.approx(SIGMA_MIN, rel=1e-6)
    assert float(table[-1]) == 1.0
    assert float(table[499]) == pytest.approx(0.75, rel=1e-6)
    assert float(schedule.timestep(torch.tensor(0.5))) == pytest.approx(500.0)
    assert schedule.percent_to_sigma(0.0) == 1.0 and schedule.percent_to_sigma(1.0) == 0.0
    assert schedule.percent_to_sigma(0.5) == pytest.approx(0.75)


@pytest.mark.parametrize("scheduler", SCHEDULER_NAMES)
@pytest.mark.parametrize("steps", [4, 9, 20])
def test_scheduler_values_monotone_and_bounded(scheduler, steps):
    sigmas = scheduler_sigmas(FlowSchedule(SHIFT), scheduler, steps)
    want = expected(scheduler, steps)
    assert sigmas.dtype == torch.float32
    assert len(sigmas) == len(want)
    assert sigmas.tolist() == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert float(sigmas[-1]) == 0.0
    assert float(sigmas[0]) <= 1.0 + 1e-6
    assert all(a > b for a, b in zip(sigmas.tolist(), sigmas.tolist()[1:])), sigmas
    if scheduler != "beta":  # beta merges repeated timesteps
        assert len(sigmas) == steps + 1


def test_simple_schedule_literal_values():
    sigmas = scheduler_sigmas(FlowSchedule(SHIFT), "simple", 4)
    assert sigmas.tolist() == pytest.approx([1.0, 0.9, 0.75, 0.5, 0.0], rel=1e-6)
    sgm = scheduler_sigmas(FlowSchedule(SHIFT), "sgm_uniform", 4)
    assert sgm.tolist() == pytest.approx([1.0, 0.900359, 0.751121, 0.502985, 0.0], rel=1e-5)


def test_shift_changes_schedule():
    low = scheduler_sigmas(FlowSchedule(1.0), "simple", 4)
    assert low.tolist() == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])


def test_denoise_keeps_last_steps_plus_one():
    schedule = FlowSchedule(SHIFT)
    sigmas = ksampler_sigmas(schedule, "simple", 4, "euler", denoise=0.5)
    # int(4 / 0.5) = 8 steps scheduled, the last 5 sigmas kept
    assert sigmas.tolist() == pytest.approx(expected("simple", 8)[-5:], rel=1e-6)
    assert sigmas.tolist() == pytest.approx([0.75, 0.642857, 0.5, 0.3, 0.0], rel=1e-5)
    odd = ksampler_sigmas(schedule, "normal", 10, "euler", denoise=0.3)
    assert len(odd) == 11 and odd.tolist() == pytest.approx(expected("normal", 33)[-11:], rel=1e-5)
    assert len(ksampler_sigmas(schedule, "simple", 4, "euler", denoise=0.0)) == 0
    assert ksampler_sigmas(schedule, "simple", 4, "euler", denoise=1.0).tolist() == pytest.approx(expected("simple", 4))


def test_dpm_2_discards_penultimate_sigma():
    sigmas = ksampler_sigmas(FlowSchedule(SHIFT), "simple", 4, "dpm_2")
    full = expected("simple", 5)
    assert sigmas.tolist() == pytest.approx(full[:-2] + full[-1:], rel=1e-6)


def test_advanced_step_window():
    sigmas = ksampler_sigmas(FlowSchedule(SHIFT), "simple", 4, "euler")
    window = trim_sigmas(sigmas, 1, 3, force_full_denoise=True)
    assert window.tolist() == pytest.approx([0.9, 0.75, 0.0])
    leftover = trim_sigmas(sigmas, 0, 2, force_full_denoise=False)
    assert leftover.tolist() == pytest.approx([1.0, 0.9, 0.75])
    assert trim_sigmas(sigmas, 4, 10000, force_full_denoise=True) is None
    assert trim_sigmas(sigmas, 0, 10000, force_full_denoise=True).tolist() == sigmas.tolist()
    assert sigmas.tolist() == pytest.approx(expected("simple", 4))  # trimming never edits the input


def test_unknown_names_are_refused():
    with pytest.raises(ValueError, match="supported: simple"):
        scheduler_sigmas(FlowSchedule(), "bogus", 4)
    with pytest.raises(ValueError, match="supported: euler"):
        run_sampler("uni_pc", lambda x, s: x, torch.zeros(1), torch.zeros(1), torch.tensor([1.0, 0.0]))
    assert set(SAMPLER_FUNCTIONS) == set(SAMPLER_NAMES)


def test_seeded_noise_is_comfyui_noise():
    seed = 2**64 - 1  # the largest seed KSampler accepts
    expected_noise = torch.randn((1, 4, 8, 8), generator=torch.manual_seed(seed))
    assert torch.equal(seeded_noise(seed, (1, 4, 8, 8)), expected_noise)
    assert not torch.equal(seeded_noise(1, (1, 4, 8, 8)), seeded_noise(2, (1, 4, 8, 8)))


@pytest.mark.parametrize("sampler", SAMPLER_NAMES)
def test_every_sampler_recovers_x0_from_an_ideal_denoiser(sampler):
    """A denoiser that always predicts the true x0 keeps every sampler on the flow x_t = s*n + (1-s)*x0,
    so the run must end exactly at x0 (this pins signs and step formulas)."""
    x0 = torch.linspace(-1, 1, 2 * 4 * 4 * 4).reshape(2, 4, 4, 4)
    noise = seeded_noise(7, x0.shape)
    calls = []

    def denoiser(x, sigma):
        calls.append(float(sigma))
        return x0.clone()

    sigmas = ksampler_sigmas(FlowSchedule(SHIFT), "karras", 6, sampler)
    ancestral = AncestralNoise([7], [x0.shape], "cpu")
    before, after = [], []
    out = run_sampler(sampler, denoiser, noise, torch.zeros_like(x0), sigmas, ancestral, before.append, after.append)
    assert torch.allclose(out, x0, atol=1e-5)
    assert before == after == list(range(len(sigmas) - 1))
    assert calls[0] == pytest.approx(1.0)


def test_leftover_noise_round_trip():
    """Stopping at sigma s returns x/(1-s); continuing without new noise re-scales it back (ComfyUI's
    inverse_noise_scaling), so two half runs equal one full run."""
    torch.manual_seed(0)
    weight = torch.randn(4, 4) * 0.1

    def denoiser(x, sigma):  # some non-trivial model
        return torch.einsum("ij,bjhw->bihw", weight, x) * (1 - sigma)

    sigmas = ksampler_sigmas(FlowSchedule(SHIFT), "simple", 6, "euler")
    noise = seeded_noise(3, (1, 4, 4, 4))
    latent = torch.zeros(1, 4, 4, 4)
    full = run_sampler("euler", denoiser, noise, latent, sigmas)
    first = run_sampler("euler", denoiser, noise, latent, trim_sigmas(sigmas, 0, 3, False))
    second = run_sampler("euler", denoiser, torch.zeros_like(noise), first, trim_sigmas(sigmas, 3, 10000, True))
    assert torch.allclose(full, second, atol=1e-5)


def test_ancestral_noise_is_per_row():
    shapes = [(1, 2, 3, 3), (2, 2, 3, 3)]
    together = AncestralNoise([5, 9], shapes, "cpu")
    alone = [AncestralNoise([5], shapes[:1], "cpu"), AncestralNoise([9], shapes[1:], "cpu")]
    for _ in range(3):
        assert torch.equal(together(), torch.cat([alone[0](), alone[1]()]))
    # ComfyUI seeds the CPU noise sampler with seed + 1 (wrapping at 2**64 here)
    assert torch.equal(AncestralNoise([4], [(1, 3)], "cpu")(), torch.randn((1, 3), generator=torch.manual_seed(5)))
    assert torch.equal(
        AncestralNoise([2**64 - 1], [(1, 3)], "cpu")(), torch.randn((1, 3), generator=torch.manual_seed(0))
    )
