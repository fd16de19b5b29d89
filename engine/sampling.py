"""Flow-matching (rectified flow) sigma schedules and samplers, faithful to ComfyUI's for SD3.

placeholder: declarations first, implementation follows.
"""

from __future__ import annotations

SCHEDULER_NAMES = (
    "simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal", "linear_quadratic",
    "kl_optimal",
)
SAMPLER_NAMES = ("euler", "euler_ancestral", "heun", "dpm_2", "dpmpp_2m", "ddim")
