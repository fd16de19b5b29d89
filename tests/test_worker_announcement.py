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


def test_rows_for_a_model_only_a_departed_worker_had_wait_for_it_within_the_grace_then_go_to_any_worker():
    """Killed and restarted by its supervisor, or Redis restarted under everyone: for a while the holder is
    not live, and rows sent then must not land on workers that would fail them for want of the file."""
    import time

    from engine.distributed import CeleryDispatcher

    holder = WorkerAnnouncement("w1@a", [], worker_queues([], ["brand.safetensors"]), pid=1, host="a")
    other = WorkerAnnouncement("w2@b", ["sd35_demo_tiny"], worker_queues(["sd35_demo_tiny"]), pid=2, host="b")
    dispatcher = CeleryDispatcher("redis://127.0.0.1:1/0", holder_grace_s=0.3)  # never connects here
    try:
        dispatcher._note_seen({"w1@a": holder, "w2@b": other})
        assert dispatcher._queue_for("brand.safetensors", {"w1@a": holder}) == file_queue("brand.safetensors")
        assert dispatcher._queue_for("brand.safetensors", {"w2@b": other}) == file_queue("brand.safetensors")
        assert dispatcher._queue_for("sd35_demo_tiny", {}) == checkpoint_queue("sd35_demo_tiny")  # Redis restarted
        time.sleep(0.4)
        assert dispatcher._queue_for("brand.safetensors", {"w2@b": other}) == DEFAULT_QUEUE  # gone for good
    finally:
        dispatcher.close()
