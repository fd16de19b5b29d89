"""The unit of work: one rendered sheet row (:class:`RowJob`) and what running it produced
(:class:`RowResult` with its PNGs). Both travel as JSON, so a Celery worker on another machine runs exactly
what the coordinator rendered, and nothing a worker returns needs the ledger.
"""

from __future__ import annotations

import base64
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from engine.errors import BatchError

DONE, FAILED, TIMED_OUT, CANCELLED, QUEUED, SKIPPED = "done", "failed", "timed_out", "cancelled", "queued", "skipped"
RUNNING = "running"
# How many times a row may take its process (or its worker) down before it is failed instead of retried.
MAX_ROW_ATTEMPTS = 3


@dataclass
class RowJob:
    """One rendered sheet row: everything a worker needs, nothing it must look up in the ledger."""

    row_key: str
    batch_id: str
    row_number: int
    workflow: dict[str, Any]
    png_extra: dict[str, Any]
    deadline_s: float
    checkpoint: str
    attempt: int = 1
    input_dir: str | None = None  # where LoadImage reads (the batch's photos); None: the uploads folder
    input_files: dict[str, str] = field(default_factory=dict)  # wire form: file name -> base64 bytes

    def to_dict(self) -> dict[str, Any]:
        """The wire form for workers. It carries the bytes of the input images the workflow reads, so a
        worker on another machine, without the coordinator's uploads folder, finds the row's photos."""
        data = asdict(self)
        if self.input_dir and not self.input_files:
            from engine.image_refs import workflow_image_names

            folder = Path(self.input_dir)
            data["input_files"] = {
                name: base64.b64encode((folder / name).read_bytes()).decode("ascii")
                for name in workflow_image_names(self.workflow)
                if plain_file_name(name) and (folder / name).is_file()
            }
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RowJob":
        return cls(**data)

    def materialize_inputs(self, folder: Path) -> Path | None:
        """The folder LoadImage reads for this job: its carried files written into ``folder``, else
        its ``input_dir`` (None: the engine's uploads folder)."""
        if not self.input_files:
            return Path(self.input_dir) if self.input_dir else None
        folder.mkdir(parents=True, exist_ok=True)
        for name, encoded in self.input_files.items():
            if not plain_file_name(name):
                raise BatchError(f"row {self.row_key}: refused input file name {name!r}", batch_id=self.batch_id)
            (folder / name).write_bytes(base64.b64decode(encoded))
        return folder


def plain_file_name(name: str) -> bool:
    """A bare file name: no folder part, not hidden, nothing that could leave the folder it is written to."""
    return bool(name) and Path(name).name == name and "\\" not in name and not name.startswith(".")


@dataclass
class RowImage:
    filename: str
    data: bytes
    sha256: str
    width: int
    height: int
    node_id: str = ""
    subfolder: str = ""  # the output node's filename_prefix folder, kept for ready workflows (ComfyUI)
    type: str = "output"  # "output" (SaveImage) or "temp" (PreviewImage: kept apart from the outputs)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "data": base64.b64encode(self.data).decode("ascii")}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RowImage":
        return cls(**{**data, "data": base64.b64decode(data["data"])})


@dataclass
class RowResult:
    row_key: str
    status: str
    error: str | None = None
    images: list[RowImage] = field(default_factory=list)
    record: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, Any] = field(default_factory=dict)
    worker: str = "local"
    # A failed row: where and how, as ComfyUI's execution_error reports it (node_id, node_type,
    # exception_type, executed, current_outputs, current_inputs); empty when unknown.
    failure: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "row_key": self.row_key,
            "status": self.status,
            "error": self.error,
            "images": [image.to_dict() for image in self.images],
            "record": jsonable(self.record),
            "timings": jsonable(self.timings),
            "worker": self.worker,
            "failure": jsonable(self.failure),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RowResult":
        return cls(
            row_key=data["row_key"],
            status=data["status"],
            error=data.get("error"),
            images=[RowImage.from_dict(i) for i in data.get("images", [])],
            record=data.get("record", {}),
            timings=data.get("timings", {}),
            worker=data.get("worker", "?"),
            failure=data.get("failure") or {},
        )


def jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))



__all__ = ["jsonable", "plain_file_name", "CANCELLED", "DONE", "FAILED", "QUEUED", "RUNNING", "SKIPPED", "TIMED_OUT", "RowImage", "RowJob", "RowResult"]
