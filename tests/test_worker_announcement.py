"""What a scale-out worker announces in Redis, and which queues it consumes (no Redis needed)."""

from __future__ import annotations

import json

from engine.distributed import (
    DEFAULT_QUEUE, WorkerAnnouncement, checkpoint_queue, file_queue, model_files, worker_queues,
)
from engine.models.resolve import ModelResolver
from engine.settings import DEMO_CHECKPOINT


def test_an_announcement_from_another_version_is_read_without_its_unknown_fields():
    newer = {"name": "w@h", "models": [], "queues": [], "pid": 1, "host": "h", "gpu_memory_free": 123}
    older = {"name": "w@h", "models": ["a"], "queues": [], "pid": 1, "host": "h"}  # before "files" existed
    assert WorkerAnnouncement.from_json(json.dumps(newer)).name == "w@h"
    assert WorkerAnnouncement.from_json(json.dumps(older)).files == {}


def test_a_worker_consumes_its_held_checkpoints_then_its_checkpoint_files_then_the_default_queue():
    queues = worker_queues(["big model.safetensors"], ["big model.safetensors", "other.safetensors"])
    assert queues == [checkpoint_queue("big model.safetensors"), file_queue("big model.safetensors"),
                      file_queue("other.safetensors"), DEFAULT_QUEUE]
    assert " " not in "".join(queues)


def test_a_worker_announces_every_model_of_every_kind_in_its_folders(tmp_path):
    (tmp_path / "checkpoints" / "brand").mkdir(parents=True)
    (tmp_path / "checkpoints" / "brand" / "v2.safetensors").write_bytes(b"")
    (tmp_path / "loras").mkdir()
    (tmp_path / "loras" / "style.safetensors").write_bytes(b"")
    (tmp_path / "loras" / "notes.txt").write_text("not a model")

    files = model_files(ModelResolver(tmp_path))

    assert files["checkpoints"] == [DEMO_CHECKPOINT, "brand/v2.safetensors"]
    assert files["loras"] == ["style.safetensors"] and files["vae"] == []
