"""Batch image production on Stable Diffusion 3.5 from ComfyUI workflows.

The public surface is small: :class:`Engine` (parse, validate, run on resident models), the workflow
model and its parser/validator, the node registry, settings and the error hierarchy. Importing the
package does not import torch.
"""

from engine import errors
from engine.errors import EngineError, WorkflowFormatError, WorkflowInvalid
from engine.nodes import default_registry
from engine.runtime import Engine, RunResult
from engine.settings import Settings, load_settings
from engine.validate import ensure_valid, validate_workflow
from engine.workflow import Workflow, parse_workflow

__all__ = [
    "Engine",
    "EngineError",
    "RunResult",
    "Settings",
    "Workflow",
    "WorkflowFormatError",
    "WorkflowInvalid",
    "default_registry",
    "ensure_valid",
    "errors",
    "load_settings",
    "parse_workflow",
    "validate_workflow",
]
