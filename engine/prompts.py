"""Prompt substitution for the source article's `--prompt-file` runs: each line replaces the text of the
CLIPTextEncode that feeds the sampler's ``positive`` input."""

from __future__ import annotations

from engine.errors import WorkflowInvalid, NodeProblem
from engine.nodes.base import NodeRegistry
from engine.workflow import Link, Workflow

SAMPLERS = ("KSampler", "KSamplerAdvanced")
TEXT_INPUTS = {"CLIPTextEncode": ("text",), "CLIPTextEncodeSD3": ("clip_l", "clip_g", "t5xxl")}
PASS_THROUGH = ("ConditioningSetTimestepRange", "ControlNetApplySD3", "ControlNetApplyAdvanced", "ConditioningCombine")


def positive_text_node(workflow: Workflow, registry: NodeRegistry) -> str:
    """The id of the text-encode node whose output reaches a sampler's ``positive`` input."""
    for node in workflow.nodes.values():
        if registry.canonical(node.class_type) not in SAMPLERS:
            continue
        link = node.inputs.get("positive")
        seen: set[str] = set()
        while isinstance(link, Link) and link.node_id not in seen:
            seen.add(link.node_id)
            source = workflow.nodes.get(link.node_id)
            if source is None:
                break
            kind = registry.canonical(source.class_type)
            if kind in TEXT_INPUTS:
                return source.id
            if kind in PASS_THROUGH:
                link = source.inputs.get("conditioning") or source.inputs.get("positive") or source.inputs.get("conditioning_1")
                continue
            break
    raise WorkflowInvalid(
        [NodeProblem(None, None, "invalid_prompt", "no CLIPTextEncode feeds a sampler's positive input",
                     "a prompt file needs a workflow whose KSampler positive comes from a text encode node")]
    )


def replace_positive_prompt(workflow: Workflow, text: str, registry: NodeRegistry) -> Workflow:
    """A copy of ``workflow`` with the positive prompt text replaced (all text inputs of that node)."""
    node_id = positive_text_node(workflow, registry)
    copy = workflow.copy()
    node = copy.nodes[node_id]
    for name in TEXT_INPUTS[registry.canonical(node.class_type)]:
        node.inputs[name] = text
    copy.ui = None  # the UI graph no longer matches the prompt that ran
    return copy
