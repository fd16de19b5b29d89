"""What a node sees while it runs: models, folders, progress, cancellation, deadline, the run's record."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.errors import Cancelled, DeadlineExceeded

if TYPE_CHECKING:
    from engine.models.cache import ModelCache


@dataclass(frozen=True)
class ProgressEvent:
    """One progress report. ``kind`` is "cached" (once, before any node runs: ``nodes`` lists those the
    cache will serve), "node" (a node started), "step" (a sampler step) or "done"."""

    kind: str
    node_id: str | None = None
    class_type: str | None = None
    value: int = 0
    maximum: int = 0
    row_index: int | None = None  # set by the batch runner when several rows share one GPU batch
    preview: Any = None  # optional PIL image of the current latent (step events)
    nodes: tuple[str, ...] = ()  # "cached" events: the node ids served from the cache


@dataclass
class NodeContext:
    models: "ModelCache"
    output_dir: Path
    temp_dir: Path
    device: str = "cpu"
    on_progress: Callable[[ProgressEvent], None] | None = None
    should_cancel: Callable[[], bool] | None = None
    deadline: float | None = None  # time.monotonic() value after which samplers stop between steps
    # A sampler's time limit: the clock starts when sampling starts (start_sampler_clock), so time spent
    # loading a model or waiting for the GPU never counts against a row.
    sampler_time_limit_s: float | None = None
    # ComfyUI PNG metadata: {"prompt": api_json, "workflow": ui_json?, ...extra audit chunks}
    png_metadata: dict[str, Any] = field(default_factory=dict)
    node_id: str | None = None  # set by the executor before each node runs
    class_type: str | None = None
    # Generation parameters nodes record for the ledger (prompt, seed, steps, model hash, ...).
    record: dict[str, Any] = field(default_factory=dict)
    # Images the output nodes wrote during this run, in order (engine.nodes.image.SavedImage).
    saved_images: list[Any] = field(default_factory=list)
    input_dir: Path | None = None  # where LoadImage looks for files
    vae_tiled: bool = False  # set on an out-of-memory retry: VAEDecode decodes in tiles
    png_compress_level: int = 4  # SaveImage's zlib level (ComfyUI's default; the engine passes its setting)
    # What validation read from disk (model folder listings, whether a save folder stays inside the output
    # folder) and worked out from a graph's links alone, kept while one context checks many workflows: a
    # batch's 10,000 rows look at the disk and at each graph shape once, not once a row. None: read afresh
    # every time (a context that runs nodes).
    lookups: dict[Any, Any] | None = None

    def read_once(self, key: Any, read: Callable[[], Any]) -> Any:
        """``read()``, or what it gave the first time ``key`` was asked for while ``lookups`` is kept."""
        if self.lookups is None:
            return read()
        if key not in self.lookups:
            self.lookups[key] = read()
        return self.lookups[key]

    def progress(self, kind: str, value: int = 0, maximum: int = 0, **extra: Any) -> None:
        if self.on_progress is not None:
            self.on_progress(
                ProgressEvent(kind, self.node_id, self.class_type, value, maximum, **extra)
            )

    def start_sampler_clock(self) -> None:
        """Called when a sampler starts: from now on it has ``sampler_time_limit_s`` seconds."""
        if self.sampler_time_limit_s is not None:
            self.deadline = time.monotonic() + self.sampler_time_limit_s

    def check_interrupt(self) -> None:
        """Called between sampler steps: raise if the caller cancelled or the deadline passed."""
        if self.should_cancel is not None and self.should_cancel():
            raise Cancelled("cancelled by the user", node_id=self.node_id, class_type=self.class_type,
                            code="cancelled")
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise DeadlineExceeded(
                "sampler ran past its deadline", node_id=self.node_id, class_type=self.class_type,
                code="sampler_deadline", limit_s=f"{self.sampler_time_limit_s or 0:g}",
            )


def read_once(ctx: NodeContext | None, key: Any, read: Callable[[], Any]) -> Any:
    """:meth:`NodeContext.read_once` of ``ctx``; ``read()`` when there is no context (a check made outside
    any run or batch, e.g. a template's example)."""
    return read() if ctx is None else ctx.read_once(key, read)

