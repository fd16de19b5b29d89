"""The Engine facade: parse, validate and run workflows on the resident models.

One ``Engine`` per process holds the node registry, the model cache (models stay loaded between runs)
and the executor (whose signature cache keeps loaders and unchanged text encodings). The batch runner,
the web app, the HTTP API and the CLI all go through it.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.errors import EngineError, ModelLoadError, NodeProblem, WorkflowInvalid
from engine.nodes import default_registry
from engine.nodes.context import NodeContext, ProgressEvent
from engine.settings import DEMO_CHECKPOINT, Settings
from engine.workflow import Workflow, parse_workflow

if TYPE_CHECKING:
    from engine.execute import ExecutionOutcome
    from engine.models.cache import ModelCache
    from engine.nodes.base import NodeRegistry

__all__ = ["Engine", "RunResult", "SAMPLER_CLASS_TYPES", "WorkflowValidator"]

SAMPLER_CLASS_TYPES = frozenset({"KSampler", "KSamplerAdvanced"})
PRECISION_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}

ProgressCallback = Callable[[ProgressEvent], None]


@dataclass
class RunResult:
    """What one workflow run produced.

    ``images``: SavedImage per written file; ``record``: generation parameters for the ledger;
    ``timings``: ``{"total_s", "sampler_s", "steps", "per_node": {node_id: s}, "cache_hits": [...]}``;
    ``outputs``: per output node, the ``ui`` dict ComfyUI's history shows.
    """

    images: list[Any]
    record: dict[str, Any]
    timings: dict[str, Any]
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)


class Engine:
    """Parses, validates and runs ComfyUI workflows (API, UI or list format) on resident SD3 models."""

    warming_up: bool = False  # True while warm_up() runs: the web app shows "warming up"

    def __init__(
        self, settings: Settings, registry: "NodeRegistry | None" = None, models: "ModelCache | None" = None
    ) -> None:
        from engine.execute import Executor

        if not 0 <= settings.png_compress_level <= 9:
            raise EngineError(
                f"png_compress_level must be a zlib level from 0 to 9, got {settings.png_compress_level}",
                setting="png_compress_level",
            )
        self.settings = settings
        self.registry = registry if registry is not None else default_registry()
        self.models = models if models is not None else build_model_cache(settings)
        self.executor = Executor(self.registry)
        self.default_checkpoint = settings.default_checkpoint
        # One GPU: runs take turns. The lock is re-entrant so a node may call back into the engine.
        self._run_lock = threading.RLock()

    # --- workflows -----------------------------------------------------------------------------------

    def parse(self, data: Workflow | dict[str, Any] | str) -> Workflow:
        """A Workflow from JSON text or an object in any of the three formats (WorkflowFormatError)."""
        if isinstance(data, Workflow):
            return data
        return parse_workflow(data, self.registry)

    def validate(self, workflow: Workflow | dict[str, Any] | str, input_dir: str | Path | None = None) -> Workflow:
        """Raise WorkflowInvalid listing every problem; returns the parsed workflow when valid.

        ``input_dir``: where LoadImage looks (default: the input folder), e.g. a batch's photos.
        """
        return self.validator(input_dir).validate(workflow)

    def problems(self, workflow: Workflow | dict[str, Any] | str, input_dir: str | Path | None = None) -> list[Any]:
        """Every validation problem (NodeProblem) of ``workflow``; empty when it is valid.

        A file that is not there (a model file, or an image in the input folder) is a ``value_not_in_list``
        problem whose ``extra_info["missing_file"]`` names the kind: ``"model"`` or ``"image"``.
        """
        return self.validator(input_dir).problems(workflow)

    def validator(self, input_dir: str | Path | None = None) -> "WorkflowValidator":
        """A :class:`WorkflowValidator` for many workflows checked at one moment (a batch's rows)."""
        ctx = self._context(Path(self.settings.outputs_path), input_dir=input_dir)
        ctx.lookups = {}
        return WorkflowValidator(self, ctx)

    def runnable_part(
        self, workflow: Workflow | dict[str, Any] | str, targets: list[str] | None = None
    ) -> tuple[Workflow, list[Any]]:
        """ComfyUI's validate_prompt: (the part of ``workflow`` that runs, the problems of what is left out).

        The part that runs is every output node that validates (only those among ``targets`` when given,
        ComfyUI's partial execution) with its ancestors; the problems (NodeProblem) are those of the output
        nodes that do not. Raises WorkflowInvalid when nothing can run.
        """
        from engine.validate import output_subgraph, runnable_outputs

        parsed = self.parse(workflow)
        ctx = self._context(Path(self.settings.outputs_path))
        try:
            outputs, problems = runnable_outputs(parsed, self.registry, ctx, targets)
        except WorkflowInvalid as invalid:
            raise WorkflowInvalid([_mark_missing_file(p, parsed, self.registry) for p in invalid.problems]) from None
        return output_subgraph(parsed, outputs), [_mark_missing_file(p, parsed, self.registry) for p in problems]

    def batch_key(self, workflow: Workflow) -> str:
        """Workflows with equal keys have the same graph shape and can share a GPU batch."""
        from engine.execute import batch_key

        return batch_key(workflow)

    # --- running -------------------------------------------------------------------------------------

    def run(
        self,
        workflow: Workflow | dict[str, Any] | str,
        output_dir: str | Path | None = None,
        on_progress: ProgressCallback | None = None,
        should_cancel: Callable[[], bool] | None = None,
        deadline_s: float | None = None,
        png_extra: dict[str, Any] | None = None,
        vae_tiled: bool = False,
        input_dir: str | Path | None = None,
    ) -> RunResult:
        """Validate and run one workflow; raise the EngineError of the node that failed."""
        result = self.run_batch(
            [workflow], output_dir=output_dir, on_progress=on_progress, should_cancel=should_cancel,
            deadline_s=deadline_s, png_extra=[png_extra or {}], vae_tiled=vae_tiled, input_dir=[input_dir],
        )[0]
        if isinstance(result, EngineError):
            raise result
        return result

    def run_batch(
        self,
        workflows: Sequence[Workflow | dict[str, Any] | str],
        output_dir: str | Path | None = None,
        on_progress: ProgressCallback | None = None,
        should_cancel: Callable[[], bool] | None = None,
        deadline_s: float | None = None,
        png_extra: Sequence[dict[str, Any]] | dict[str, Any] | None = None,
        vae_tiled: bool = False,
        input_dir: str | Path | Sequence[str | Path | None] | None = None,
    ) -> list[RunResult | EngineError]:
        """Run several workflows; rows of the same shape are sampled as one GPU batch.

        Returns one RunResult or EngineError per workflow, in order. ``png_extra`` is one dict for every
        row or one per row (extra PNG text chunks, e.g. batch id and row). ``input_dir`` is where
        LoadImage reads: one folder for every row or one per row (None: the uploads folder). Progress
        events carry the row's index in ``row_index``. ``deadline_s`` bounds each sampler, counted from when
        it starts sampling (model loading and waiting for the GPU do not count).
        """
        parsed: list[Workflow | EngineError] = []
        for workflow in workflows:
            try:
                parsed.append(self.parse(workflow))
            except EngineError as exc:
                parsed.append(exc)
        extras = _per_row(png_extra, len(parsed))
        input_dirs = list(input_dir) if isinstance(input_dir, (list, tuple)) else [input_dir] * len(parsed)
        out_dir = Path(output_dir) if output_dir is not None else Path(self.settings.outputs_path)
        runnable = [(i, wf) for i, wf in enumerate(parsed) if isinstance(wf, Workflow)]
        contexts = []
        for index, workflow in runnable:
            ctx = self._context(out_dir, _row_progress(on_progress, index), should_cancel, deadline_s, vae_tiled,
                                input_dirs[index])
            ctx.png_metadata = _png_metadata(workflow, extras[index])
            contexts.append(ctx)
        with self._run_lock:
            outcomes = self.executor.execute_batch([wf for _, wf in runnable], contexts) if runnable else []
        results: list[RunResult | EngineError] = [
            item if isinstance(item, EngineError) else None for item in parsed  # type: ignore[misc]
        ]
        for (index, workflow), outcome in zip(runnable, outcomes):
            results[index] = outcome if isinstance(outcome, EngineError) else _run_result(workflow, outcome)
        return results

    def warm_up(self, checkpoint: str | None = None, size: int | None = None, gpu_batch: int | None = None) -> dict[str, Any]:
        """Load ``checkpoint`` (default: the engine's) and sample one step, so that no user's first row pays
        for loading, compilation (``settings.compile``) or first-call kernel selection.

        ``size``: the square image side to warm up at (compiled blocks are specialised to a shape): 1024 on
        CUDA, where the templates' default size is, and 64 on the CPU, where nothing compiles. Nothing is
        saved. With compiled blocks on CUDA the GPU batch the runner will form (at most ``gpu_batch``, default
        ``settings.max_gpu_batch``; 1 for a worker that runs rows one by one) is warmed up too. ``warming_up``
        is True meanwhile. Returns ``{"checkpoint", "size", "load_s", "sample_s", "sampled", "batch_sizes"}``;
        ``sampled`` is False when the checkpoint holds no text encoders or VAE to sample with.
        Raises the EngineError of a checkpoint that does not load.
        """
        from engine.nodes.image import DiscardImages, deferred_saves

        name = checkpoint or self.default_checkpoint
        side = size or (1024 if str(self.models.device).startswith("cuda") else 64)
        self.warming_up = True
        try:
            started = time.perf_counter()
            with self._run_lock:
                _, clip, vae = self.models.checkpoint(name)
            load_s = time.perf_counter() - started
            sampled = clip is not None and vae is not None
            batch_sizes = [1]
            if sampled:
                temp = Path(self.settings.data_path) / "temp"
                one_row = _warm_up_workflow(name, side, 1)
                with deferred_saves(DiscardImages()):
                    self.run(one_row, output_dir=temp)
                    # Compiled blocks are specialised to their batch size too: compile the GPU batch the
                    # runner will form from such rows now, not on a user's first full batch.
                    if self.settings.compile and str(self.models.device).startswith("cuda"):
                        from engine.throughput import choose_gpu_batch

                        batch = choose_gpu_batch(self, self.parse(one_row), gpu_batch or self.settings.max_gpu_batch)
                        if batch > 1:
                            self.run(_warm_up_workflow(name, side, batch), output_dir=temp)
                            batch_sizes.append(batch)
            return {
                "checkpoint": name,
                "size": side,
                "load_s": round(load_s, 3),
                "sample_s": round(time.perf_counter() - started - load_s, 3),
                "sampled": sampled,
                "batch_sizes": batch_sizes,
            }
        finally:
            self.warming_up = False

    # --- introspection -------------------------------------------------------------------------------

    def object_info(self, class_type: str | None = None) -> dict[str, Any]:
        """ComfyUI's ``/object_info`` (or one node's entry), with model file choices from disk."""
        ctx = self._context(Path(self.settings.outputs_path))
        if class_type is None:
            return self.registry.object_info(ctx)
        node_cls = self.registry.get(class_type)
        return {node_cls.class_type: node_cls.object_info(ctx)} if node_cls is not None else {}

    def available_checkpoints(self) -> list[str]:
        """Checkpoint names found under models/ (the demo first)."""
        return self.models.available("checkpoints")

    def switch_model(self, name: str) -> None:
        """Make ``name`` the default checkpoint, loaded now; other resident checkpoints are freed first
        (one GPU holds one model).

        Raises ModelNotFound when ``name`` resolves to nothing, and the load's error when it cannot load:
        then the default stays what it was (it loads again when next used), so a bad file never becomes
        the model every row is sent to.
        """
        self.models.resolver.resolve("checkpoints", name)
        with self._run_lock:
            for entry in self.models.loaded():
                if entry["kind"] in ("checkpoint", "diffusion_model") and entry["name"] != name:
                    self.models.free(entry["name"])
            self.executor.clear_cache()  # cached node outputs hold the freed modules
            self.models.checkpoint(name)
            self.default_checkpoint = name

    def free_models(self) -> int:
        """Drop every resident model and the node outputs that hold them; they load again when next used."""
        with self._run_lock:  # never pull a model from under a running row
            self.executor.clear_cache()
            return self.models.free()

    def system_info(self) -> dict[str, Any]:
        """Device, GPU name and memory (CUDA), resident models, whether the demo is in use, versions."""
        import diffusers
        import torch
        import transformers

        device = self.models.device
        info: dict[str, Any] = {
            "device": device,
            "dtype": str(self.models.dtype).replace("torch.", ""),
            "precision": self.settings.precision,
            "default_checkpoint": self.default_checkpoint,
            "demo_in_use": self.default_checkpoint == DEMO_CHECKPOINT,
            "loaded_models": self.models.loaded(),
            "model_memory_bytes": self.models.memory_bytes(),
            "versions": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "diffusers": diffusers.__version__,
                "transformers": transformers.__version__,
            },
        }
        if device.startswith("cuda"):
            index = torch.device(device).index or 0
            props = torch.cuda.get_device_properties(index)
            free, total = torch.cuda.mem_get_info(index)
            info["gpu"] = {
                "name": props.name,
                "compute_capability": f"{props.major}.{props.minor}",
                "memory_total_bytes": int(total),
                "memory_free_bytes": int(free),
                "memory_allocated_bytes": int(torch.cuda.memory_allocated(index)),
                "memory_reserved_bytes": int(torch.cuda.memory_reserved(index)),
            }
        return info

    def describe(self) -> dict[str, Any]:
        """Same as :meth:`system_info` (the web app's system panel)."""
        return self.system_info()

    def describe_model_banner(self) -> str:
        """One line for the console at start-up: which model and device."""
        demo = " (built-in demo model: no checkpoint configured)" if self.default_checkpoint == DEMO_CHECKPOINT else ""
        return f"model: {self.default_checkpoint}{demo}; device: {self.models.device}"

    # --- internals -----------------------------------------------------------------------------------

    def _context(
        self,
        output_dir: Path,
        on_progress: ProgressCallback | None = None,
        should_cancel: Callable[[], bool] | None = None,
        sampler_time_limit_s: float | None = None,
        vae_tiled: bool = False,
        input_dir: str | Path | None = None,
    ) -> NodeContext:
        data = Path(self.settings.data_path)
        return NodeContext(
            models=self.models,
            output_dir=Path(output_dir),
            temp_dir=data / "temp",
            device=self.models.device,
            on_progress=on_progress,
            should_cancel=should_cancel,
            sampler_time_limit_s=sampler_time_limit_s,
            input_dir=Path(input_dir) if input_dir is not None else Path(self.settings.input_path),
            vae_tiled=vae_tiled,
            png_compress_level=self.settings.png_compress_level,
        )


class WorkflowValidator:
    """Validates workflows as :meth:`Engine.validate` does, reading what it needs from disk once.

    The model files a loader may name and whether a save folder stays inside the output folder are looked
    up the first time a workflow needs them and then kept (:attr:`NodeContext.lookups`), so checking a
    10,000-row batch lists the models folder once instead of 10,000 times. Files that appear meanwhile are
    seen by the next validator; a model that went missing is still reported when its row loads it.
    """

    def __init__(self, engine: Engine, ctx: NodeContext) -> None:
        self._engine = engine
        self._ctx = ctx

    def validate(self, workflow: Workflow | dict[str, Any] | str) -> Workflow:
        """Raise WorkflowInvalid listing every problem; returns the parsed workflow when valid."""
        parsed = self._engine.parse(workflow)
        problems = self.problems(parsed)
        if problems:
            raise WorkflowInvalid(problems)
        return parsed

    def problems(self, workflow: Workflow | dict[str, Any] | str) -> list[Any]:
        """Every validation problem (NodeProblem) of ``workflow``, as :meth:`Engine.problems` says them."""
        from engine.validate import validate_workflow

        parsed = self._engine.parse(workflow)
        registry = self._engine.registry
        return [_mark_missing_file(p, parsed, registry) for p in validate_workflow(parsed, registry, self._ctx)]


def _mark_missing_file(problem: NodeProblem, workflow: Workflow, registry: "NodeRegistry") -> NodeProblem:
    """Tag a "value not in list" problem of a file input (model files, input images) as a missing file,
    so callers that check a workflow before its files exist (a template's example) can tell it apart."""
    if problem.type != "value_not_in_list" or problem.node_id is None or problem.input_name is None:
        return problem
    node_cls = registry.get(problem.class_type or "")
    spec = node_cls.input(problem.input_name) if node_cls is not None else None
    if spec is None:
        return problem
    from engine.nodes.image_input import ImageFileInput

    if isinstance(spec, ImageFileInput):
        value = workflow.nodes[problem.node_id].inputs.get(problem.input_name)
        parts = Path(str(value).replace("\\", "/")).parts
        if not isinstance(value, str) or Path(value).is_absolute() or ".." in parts:
            return problem  # a path out of the input folder is never just "missing"
        kind = "image"
    elif spec.type == "COMBO" and callable(spec.choices):  # choices listed from the models folder
        kind = "model"
    else:
        return problem
    return dataclasses.replace(problem, extra_info={**problem.extra_info, "missing_file": kind})


def import_model_libraries() -> None:
    """Import the diffusers, transformers and peft classes the engine uses, in the calling thread.

    Their lazy modules are not safe to import from two threads at once: one thread can be handed the
    other's half-initialised module ("cannot import name 'AutoModel' from 'transformers'"). Servers call
    this before they start the warm-up and batch threads. Their log records then go through our handler.
    """
    from diffusers import AutoencoderKL, SD3ControlNetModel, SD3Transformer2DModel  # noqa: F401
    from transformers import AutoModel, CLIPTextModelWithProjection, T5EncoderModel  # noqa: F401

    from engine.logs import adopt_library_loggers

    adopt_library_loggers()  # their warnings (e.g. prompts over 77 tokens) in our log format


def build_model_cache(settings: Settings, *, use_sidecars: bool = True) -> "ModelCache":
    """The model cache the settings describe: device, compute dtype, models folder, sha256 memo file,
    and the precision policy (FP8 quantization, calibrated scales, compile) applied to every transformer.

    ``precision``: auto (bf16 on CUDA, fp32 on the CPU), bf16, fp16, fp32, or fp8 (FP8 weights; FP8
    compute where the device can, else weight_only with a logged message). ``use_sidecars=False``
    ignores calibrated activation scales (calibration loads that way).
    """
    import torch

    from engine.fp8.policy import PRECISIONS, PrecisionPolicy
    from engine.models.cache import ModelCache
    from engine.models.resolve import ModelResolver

    precision = settings.precision
    if precision not in PRECISIONS:
        raise ModelLoadError(
            f"unknown precision {precision!r}; supported: {', '.join(PRECISIONS)}",
            precision=precision,
            supported=list(PRECISIONS),
        )
    # fp8 computes in the automatic dtype: FP8 only replaces the weights of the quantized linears.
    dtype = getattr(torch, PRECISION_DTYPES[precision]) if precision in PRECISION_DTYPES else None
    policy = PrecisionPolicy.from_settings(settings, use_sidecars=use_sidecars)
    resolver = ModelResolver(settings.models_dir)
    return ModelCache(
        resolver,
        device=settings.device,
        dtype=dtype,
        hash_cache_path=Path(settings.data_path) / "model_hashes.json",
        transformer_postprocess=policy,
    )


def _per_row(png_extra: Sequence[dict[str, Any]] | dict[str, Any] | None, count: int) -> list[dict[str, Any]]:
    if png_extra is None:
        return [{} for _ in range(count)]
    if isinstance(png_extra, dict):
        return [dict(png_extra) for _ in range(count)]
    extras = [dict(e or {}) for e in png_extra]
    if len(extras) != count:
        raise ValueError(f"png_extra has {len(extras)} entries for {count} workflows")
    return extras


def _row_progress(on_progress: ProgressCallback | None, index: int) -> ProgressCallback | None:
    if on_progress is None:
        return None

    def report(event: ProgressEvent) -> None:
        on_progress(dataclasses.replace(event, row_index=index))

    return report


def _png_metadata(workflow: Workflow, extra: dict[str, Any]) -> dict[str, Any]:
    """ComfyUI's chunks: ``prompt`` (API JSON), ``workflow`` (UI JSON when the run came from one), extras."""
    metadata: dict[str, Any] = {"prompt": workflow.to_api()}
    if workflow.ui is not None:
        metadata["workflow"] = workflow.ui
    for key, value in extra.items():
        if key in ("prompt",):
            raise ValueError("png_extra may not replace the 'prompt' chunk")
        metadata[key] = value
    json.dumps(metadata)  # fail here, not half-way through writing a PNG, if something is not JSON
    return metadata


def _run_result(workflow: Workflow, outcome: "ExecutionOutcome") -> RunResult:
    sampler_s = sum(
        seconds for node_id, seconds in outcome.timings.items()
        if node_id in workflow.nodes and workflow.nodes[node_id].class_type in SAMPLER_CLASS_TYPES
    )
    timings = {
        "total_s": round(outcome.total_s, 4),
        "sampler_s": round(sampler_s, 4),
        "steps": outcome.record.get("steps"),
        "per_node": {k: round(v, 4) for k, v in outcome.timings.items()},
        "cache_hits": list(outcome.cache_hits),
    }
    return RunResult(
        images=list(outcome.saved_images), record=dict(outcome.record), timings=timings, outputs=outcome.outputs
    )


def _warm_up_workflow(checkpoint: str, side: int, batch_size: int) -> dict[str, Any]:
    """One sampling step at ``side``² for ``batch_size`` images, previews only (nothing saved)."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "warm-up", "clip": ["1", 1]}},
        "3": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["2", 0]}},
        "4": {"class_type": "EmptySD3LatentImage", "inputs": {"width": side, "height": side, "batch_size": batch_size}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "seed": 0, "steps": 1, "cfg": 4.5, "sampler_name": "euler",
            "scheduler": "sgm_uniform", "positive": ["2", 0], "negative": ["3", 0],
            "latent_image": ["4", 0], "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "PreviewImage", "inputs": {"images": ["6", 0]}},
    }
