"""Sampling nodes: ModelSamplingSD3, KSampler and KSamplerAdvanced."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from engine.nodes.base import Input, NodeType, Output
from engine.sampling import SAMPLER_NAMES, SCHEDULER_NAMES

if TYPE_CHECKING:
    from engine.nodes.context import NodeContext

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
        raise NotImplementedError


class KSampler(NodeType):
    class_type = "KSampler"
    category = "sampling"
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
        raise NotImplementedError


class KSamplerAdvanced(NodeType):
    class_type = "KSamplerAdvanced"
    category = "sampling"
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
        raise NotImplementedError


SAMPLING_NODES = (ModelSamplingSD3, KSampler, KSamplerAdvanced)
