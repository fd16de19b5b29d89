"""The production line: a template over a spreadsheet on the tiny demo model, with every fault the
batch must survive (bad rows, timeouts, out of memory, NaN output, cancel, kill -9 and resume)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from engine.errors import BatchError, BatchMismatch, OutOfMemory
from engine.runtime import Engine
from engine.sheets import read_sheet

ROOT = Path(__file__).resolve().parents[1]
HEADER = "product_name,color,style,width,height,steps\n"


def write_sheet(path: Path, rows: list[str]) -> Path:
    path.write_text(HEADER + "".join(r + "\n" for r in rows), encoding="utf-8")
    return path


def pixels(path) -> bytes:
    from PIL import Image

    with Image.open(path) as image:
        return image.tobytes()


def small_rows(count: int, size: int = 64, steps: int = 2) -> list[str]:
    return [f"Item {i},color{i},minimal,{size},{size},{steps}" for i in range(count)]


def run_batch(services, sheet_path, **prepare):
    runner = services.runner
    prepared = runner.prepare("product_shot", read_sheet(sheet_path), **prepare)
    runner.start(prepared)
    return prepared, runner.run(prepared.batch_id)


def test_a_batch_claims_all_its_rows_in_one_ledger_write_before_its_first_row_runs(services_factory, tmp_path):
    """Claimed one by one, each claim a synced commit, a batch of 10,000 rows spent most of a minute in the
    ledger before its first image; the writes before the first row starts must not grow with the rows."""
    services = services_factory()
    runner, ledger = services.runner, services.ledger
    prepared = runner.prepare("product_shot", read_sheet(write_sheet(tmp_path / "rows.csv", small_rows(80, steps=1))))
    runner.start(prepared)
    writes, before_first_row = [0], []
    real_write = ledger._write

    def counted_write(operation):
        writes[0] += 1
        return real_write(operation)

    def on_event(event):
        if event.kind in ("node", "step") and not before_first_row:
            before_first_row.append(writes[0])

    ledger._write = counted_write
    try:  # stop after the first row begins: the claims are what is measured
        summary = runner.run(prepared.batch_id, on_event=on_event, should_cancel=lambda: bool(before_first_row))
    finally:
        ledger._write = real_write
    assert before_first_row and before_first_row[0] < 10, before_first_row
    assert summary.done + summary.cancelled == 80 and summary.running == 0  # every claim was settled


def test_a_cancel_stores_the_rows_it_stopped_before_they_began_in_one_ledger_write(services_factory, tmp_path):
    """Cancelled one by one, each a synced commit and a recount of the batch, 8,000 waiting rows kept a
    cancelled batch "running" for seconds (45 s in a busy server); the writes must not grow with the rows.
    The row that was running when the cancel came ends as before, with where it stopped."""
    services = services_factory()
    runner, ledger = services.runner, services.ledger
    prepared = runner.prepare("product_shot", read_sheet(write_sheet(tmp_path / "rows.csv", small_rows(60, steps=2))))
    runner.start(prepared)
    writes, at_cancel, events = [0], [], []
    real_write = ledger._write

    def counted_write(operation):
        writes[0] += 1
        return real_write(operation)

    def on_event(event):
        events.append(event)
        if event.kind == "step" and not at_cancel:  # the first row is sampling: the user cancels now
            at_cancel.append(writes[0])

    ledger._write = counted_write
    try:
        summary = runner.run(prepared.batch_id, on_event=on_event, should_cancel=lambda: bool(at_cancel))
    finally:
        ledger._write = real_write
    assert summary.cancelled == 60 and summary.done == 0 and summary.running == 0
    assert writes[0] - at_cancel[0] < 10, (at_cancel, writes)
    rows = ledger.rows(prepared.batch_id)
    assert {row.status for row in rows} == {"cancelled"} and all(row.finished_at for row in rows)
    assert ledger.batch_summary(prepared.batch_id)["cancelled_count"] == 60  # the batch's counts, recounted
    assert sum(e.kind == "row_failed" and e.status == "cancelled" for e in events) == 60
    assert events[-1].kind == "batch_done" and events[-1].remaining == 0


def test_batch_runs_every_row_records_it_and_zips(services_factory, tmp_path):
    services = services_factory()
    sheet = write_sheet(tmp_path / "rows.csv", small_rows(3) + ["Broken,red,minimal,abc,64,2"])
    prepared, summary = run_batch(services, sheet, batch_seed=7)

    assert (summary.done, summary.skipped, summary.failed) == (3, 1, 0)
    bad = [r for r in prepared.report.rows if not r.ok]
    assert [r.number for r in bad] == [5]
    assert any(p.column == "width" for p in bad[0].problems)

    rows = services.ledger.rows(prepared.batch_id)
    done = [r for r in rows if r.status == "done"]
    assert len(done) == 3
    for row in done:
        data = Path(row.image_path).read_bytes()
        assert hashlib.sha256(data).hexdigest() == row.image_sha256
        assert row.seed is not None and row.prompt and "Item" in row.prompt
        assert row.model_name == "sd35_demo_tiny" and row.model_hash and row.precision
        assert (row.width, row.height, row.steps) == (64, 64, 2)
        assert row.template_hash == services.templates.get("product_shot").content_hash
    skipped = [r for r in rows if r.status == "skipped"]
    assert "width" in skipped[0].error

    zip_path = tmp_path / "out.zip"
    services.runner.write_zip(prepared.batch_id, zip_path)
    import zipfile

    names = zipfile.ZipFile(zip_path).namelist()
    assert {"manifest.csv", "manifest.json", "failed_rows.csv"} <= set(names)
    assert sum(n.endswith(".png") for n in names) == 3


def test_zip_names_are_the_file_names_even_when_a_skipped_row_took_a_name_first(services_factory, tmp_path):
    services = services_factory()
    sheet = write_sheet(tmp_path / "rows.csv", ["Item,red,minimal,9999,64,2", "Item,red,minimal,64,64,2",
                                                 "item,red,minimal,64,64,2"])  # the first row is refused
    prepared, summary = run_batch(services, sheet, batch_seed=7)
    assert (summary.done, summary.skipped) == (2, 1)
    on_disk = sorted(Path(r.image_path).name for r in services.ledger.rows(prepared.batch_id) if r.status == "done")
    import zipfile

    services.runner.write_zip(prepared.batch_id, tmp_path / "out.zip")
    archive = zipfile.ZipFile(tmp_path / "out.zip")
    in_zip = sorted(n.removeprefix("images/") for n in archive.namelist() if n.startswith("images/"))
    assert in_zip == on_disk
    manifest = json.loads(archive.read("manifest.json"))
    for row in manifest["rows"]:
        if row["status"] == "done":
            assert row["files"] == ["images/" + Path(row["image_path"]).name]


def test_seeds_are_derived_from_the_batch_seed_and_reproducible(services_factory, tmp_path):
    services = services_factory()
    sheet = write_sheet(tmp_path / "rows.csv", small_rows(2))
    first, _ = run_batch(services, sheet, batch_seed=123)
    second, _ = run_batch(services, sheet, batch_seed=123)
    first_rows, second_rows = services.ledger.rows(first.batch_id), services.ledger.rows(second.batch_id)
    assert [r.seed for r in first_rows] == [r.seed for r in second_rows]
    assert first_rows[0].seed != first_rows[1].seed
    # The PNG files differ only in their audit chunks (batch id): the pixels are identical.
    a, b = [pixels(r.image_path) for r in first_rows], [pixels(r.image_path) for r in second_rows]
    assert a == b and a[0] != a[1]


def test_gpu_batching_does_not_change_images(services_factory, tmp_path):
    sheet = write_sheet(tmp_path / "rows.csv", small_rows(3))
    batched = services_factory(max_gpu_batch=4)
    single = services_factory(max_gpu_batch=1, data_dir=str(tmp_path / "single"))
    one, _ = run_batch(batched, sheet, batch_seed=5)
    two, _ = run_batch(single, sheet, batch_seed=5)
    assert [r.seed for r in batched.ledger.rows(one.batch_id)] == [r.seed for r in single.ledger.rows(two.batch_id)]
    # Batched and single runs agree to within float noise: decoded pixels may differ by a level at most.
    from PIL import Image
    import numpy as np

    for x, y in zip(batched.ledger.rows(one.batch_id), single.ledger.rows(two.batch_id)):
        diff = np.abs(np.asarray(Image.open(x.image_path), dtype=int) - np.asarray(Image.open(y.image_path), dtype=int))
        assert diff.max() <= 2


def test_stop_on_invalid_queues_nothing(services_factory, tmp_path):
    services = services_factory()
    sheet = write_sheet(tmp_path / "rows.csv", small_rows(1) + ["Broken,red,minimal,64,64,notanumber"])
    with pytest.raises(BatchError, match="row") as info:
        services.runner.prepare("product_shot", read_sheet(sheet), on_invalid="stop")
    assert info.value.details["rows"] == [3]
    assert services.ledger.list_batches() == []


def test_preparing_a_batch_reads_the_disk_and_each_graph_shape_once_not_once_a_row(
    services_factory, tmp_path, monkeypatch
):
    """Every row of a 10,000-row sheet listed the models folder, checked the save folder on disk and worked
    out its graph's order again: seconds before the validation report. They are looked up once a batch,
    and each row still gets the problems it gets validated on its own."""
    import engine.nodes.image as image_nodes
    import engine.validate as validate

    services = services_factory()
    runner, engine = services.runner, services.engine
    services.templates.get("product_shot")  # loading the template validates its example once, before the rows
    calls = {"listings": 0, "save folders": 0, "graph orders": 0}

    def counted(name, real):
        def call(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)
        return call

    monkeypatch.setattr(engine.models.resolver, "available", counted("listings", engine.models.resolver.available))
    monkeypatch.setattr(image_nodes, "save_prefix_problem", counted("save folders", image_nodes.save_prefix_problem))
    monkeypatch.setattr(validate, "_ancestor_order", counted("graph orders", validate._ancestor_order))
    sheet = tmp_path / "rows.csv"
    lines = ["product_name,checkpoint,width,tiled,second_size"]
    for i in range(40):  # four graph shapes (tiled or not, a second square image or not), two save prefixes
        checkpoint = "missing.safetensors" if i % 5 == 1 else ""
        lines.append(f"Item {i},{checkpoint},{1000 if i % 7 == 3 else 64},{i % 2 == 0},{512 if i % 3 == 0 else 0}")
    sheet.write_text("\n".join(lines) + "\n", encoding="utf-8")

    prepared = runner.prepare("product_shot", read_sheet(sheet), batch_seed=7)

    assert calls == {"listings": 1, "save folders": 2, "graph orders": 4}
    for row in prepared.rows:
        i = row["row_number"] - 2
        if i % 5 == 1 or i % 7 == 3:
            assert row["status"] == "skipped" and row["workflow"] is None
            assert ("'missing.safetensors' not in" in row["error"]) == (i % 5 == 1), row["error"]
            assert ("width 1000 is not a multiple of 16" in row["error"]) == (i % 7 == 3), row["error"]
        else:
            assert row["status"] == "queued" and row["error"] is None
            assert engine.validate(row["workflow"]).nodes["2"].inputs["text"] == row["prompt"]
            assert ("VAEDecodeTiled" in json.dumps(row["workflow"])) == (i % 2 == 0)


def test_missing_required_column_is_reported_before_any_work(services_factory, tmp_path):
    services = services_factory()
    sheet = tmp_path / "rows.csv"
    sheet.write_text("color,style\nred,cyberpunk\n", encoding="utf-8")
    with pytest.raises(BatchError, match="product_name"):
        services.runner.prepare("product_shot", read_sheet(sheet))


def test_row_past_its_deadline_times_out_and_the_batch_goes_on(services_factory, tmp_path):
    services = services_factory(row_timeout_s=0.0)
    sheet = write_sheet(tmp_path / "rows.csv", small_rows(2, steps=3))
    prepared, summary = run_batch(services, sheet)
    assert summary.timed_out == 2 and summary.done == 0
    rows = services.ledger.rows(prepared.batch_id)
    assert all(r.status == "timed_out" and "deadline" in r.error for r in rows)


class OutOfMemoryOnce(Engine):
    """Fault injection: the first untiled attempt of every run fails the way a CUDA OOM does."""

    always = False

    def run_batch(self, workflows, *args, vae_tiled=False, **kwargs):
        if not vae_tiled or self.always:
            return [OutOfMemory("CUDA out of memory. Tried to allocate 2.00 GiB") for _ in workflows]
        return super().run_batch(workflows, *args, vae_tiled=vae_tiled, **kwargs)


def test_out_of_memory_retries_alone_with_tiled_vae(services_factory, tmp_path):
    services = services_factory(engine_cls=OutOfMemoryOnce)
    sheet = write_sheet(tmp_path / "rows.csv", small_rows(2))
    prepared, summary = run_batch(services, sheet)
    assert summary.done == 2
    for row in services.ledger.rows(prepared.batch_id):
        assert row.extra["vae_tiled"] is True and row.extra["oom_retry"] is True


def test_out_of_memory_twice_fails_the_row(services_factory, tmp_path):
    class AlwaysOutOfMemory(OutOfMemoryOnce):
        always = True

    services = services_factory(engine_cls=AlwaysOutOfMemory)
    sheet = write_sheet(tmp_path / "rows.csv", small_rows(1))
    prepared, summary = run_batch(services, sheet)
    row = services.ledger.rows(prepared.batch_id)[0]
    assert summary.failed == 1 and row.status == "failed" and "out of memory" in row.error


def test_nan_output_fails_the_row_not_the_batch(services_factory, tmp_path, caplog):
    import logging

    import torch

    services = services_factory()
    _, _, vae = services.engine.models.checkpoint("sd35_demo_tiny")
    with torch.no_grad():
        vae.vae.decoder.conv_out.bias.fill_(float("nan"))  # this engine's own resident copy only
    sheet = write_sheet(tmp_path / "rows.csv", small_rows(2))
    prepared, summary = run_batch(services, sheet)
    rows = services.ledger.rows(prepared.batch_id)
    assert summary.failed == 2 and all(r.status == "failed" and "VAEDecode" in r.error for r in rows)
    assert not list(services.runner.output_dir(prepared.batch_id).glob("*.png"))
    # An alert on warnings sees each failed row, with why.
    failed = [r for r in caplog.records if r.name == "engine.batch" and r.getMessage() == "row failed"]
    assert len(failed) == 2 and all(r.levelno == logging.WARNING and "VAEDecode" in r.error for r in failed)


def test_cancel_keeps_finished_rows_and_resume_finishes_the_rest(services_factory, tmp_path):
    services = services_factory(max_gpu_batch=1)
    sheet = write_sheet(tmp_path / "rows.csv", small_rows(4, steps=2))
    runner = services.runner
    prepared = runner.prepare("product_shot", read_sheet(sheet))
    runner.start(prepared)

    def cancel_after_first(event):
        if event.kind == "row_done":
            runner.cancel(prepared.batch_id)

    summary = runner.run(prepared.batch_id, on_event=cancel_after_first)
    assert 1 <= summary.done < 4 and summary.cancelled == 4 - summary.done
    finished = {r.row_key: r.image_sha256 for r in services.ledger.rows(prepared.batch_id) if r.status == "done"}

    summary = runner.run(prepared.batch_id)
    assert summary.done == 4
    rows = services.ledger.rows(prepared.batch_id)
    assert {r.row_key: r.image_sha256 for r in rows if r.row_key in finished} == finished


def test_resume_with_a_changed_sheet_is_refused(services_factory, tmp_path):
    services = services_factory()
    sheet = write_sheet(tmp_path / "rows.csv", small_rows(1))
    prepared, _ = run_batch(services, sheet)
    changed = write_sheet(tmp_path / "changed.csv", small_rows(2))
    with pytest.raises(BatchMismatch, match="spreadsheet changed"):
        services.runner.prepare("product_shot", read_sheet(changed), batch_id=prepared.batch_id)


def test_identical_rows_are_still_separate_generations(services_factory, tmp_path):
    services = services_factory()
    sheet = write_sheet(tmp_path / "rows.csv", ["Same,red,minimal,64,64,2"] * 2)
    prepared, summary = run_batch(services, sheet)
    rows = services.ledger.rows(prepared.batch_id)
    assert summary.done == 2 and rows[0].image_path != rows[1].image_path
    assert Path(rows[0].image_path).name != Path(rows[1].image_path).name


def test_the_queue_runs_batches_in_the_background_in_order(services_factory, tmp_path):
    services = services_factory()
    ids = []
    for index in range(2):
        sheet = write_sheet(tmp_path / f"rows{index}.csv", small_rows(1))
        prepared = services.runner.prepare("product_shot", read_sheet(sheet))
        services.runner.start(prepared)
        services.queue.submit(prepared.batch_id)
        ids.append(prepared.batch_id)
    finals = [services.queue.wait(batch_id, timeout=120) for batch_id in ids]
    assert [p.state for p in finals] == ["done", "done"]
    assert finals[0].recent_images and Path(finals[0].recent_images[0]).exists()
    started = [services.ledger.get_batch(b)["started_at"] for b in ids]
    assert started[0] <= started[1]


def test_the_queue_keeps_the_progress_of_only_the_batches_that_ended_last(services_factory, tmp_path):
    """A server left running for weeks ends a batch per ComfyUI prompt and per API call: the queue must not
    keep a progress snapshot (with its image paths) of every one of them for the life of the process."""
    from engine.batch_queue import BatchQueue

    services = services_factory()
    queue = BatchQueue(services.runner, keep_ended=3)
    try:
        ids = []
        for index in range(5):
            prepared = services.runner.prepare("product_shot", read_sheet(
                write_sheet(tmp_path / f"rows{index}.csv", small_rows(1, steps=1))))
            services.runner.start(prepared)
            queue.submit(prepared.batch_id)
            ids.append(prepared.batch_id)
            assert queue.wait(prepared.batch_id, timeout=120).state == "done"
        cancelled = services.runner.prepare("product_shot", read_sheet(write_sheet(tmp_path / "last.csv", small_rows(1))))
        services.runner.start(cancelled)
        queue.submit(cancelled.batch_id)
        queue.cancel(cancelled.batch_id)  # taken off the queue before it ran, or stopped: it ends either way
        assert queue.wait(cancelled.batch_id, timeout=120).state == "cancelled"
        known = [batch_id for batch_id in [*ids, cancelled.batch_id] if queue.status(batch_id) is not None]
        assert known == [*ids[-2:], cancelled.batch_id]  # the three that ended last
        assert queue.wait(ids[0], timeout=120) is None  # forgotten: nothing to wait for
        assert services.ledger.batch_summary(ids[0])["counts"]["done"] == 1  # the ledger still has it all
    finally:
        queue.stop(wait_s=30)


@pytest.mark.slow
def test_sigkill_mid_batch_then_resume_runs_each_row_exactly_once(tmp_path):
    """kill -9 the CLI in the middle of a batch; the same command again finishes it, each row once."""
    rows = 6
    sheet = write_sheet(tmp_path / "rows.csv", small_rows(rows, size=64, steps=6))
    data = tmp_path / "data"
    command = [
        sys.executable, str(ROOT / "app.py"), "--data-dir", str(data), "--templates-dir", str(ROOT / "templates"),
        "--max-gpu-batch", "1", "run", "--template", "product_shot", "--sheet", str(sheet), "--batch-seed", "99",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    ledger = data / "ledger.db"
    deadline = time.monotonic() + 300  # model load and two rows: minutes on a starved CPU
    done = 0
    while time.monotonic() < deadline:
        if ledger.exists():
            try:
                with sqlite3.connect(ledger) as conn:
                    done = conn.execute("SELECT count(*) FROM generations WHERE status = 'done'").fetchone()[0]
            except sqlite3.Error:
                done = 0
        if done >= 2 or process.poll() is not None:
            break
        time.sleep(0.05)
    assert process.poll() is None, "the batch finished before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    with sqlite3.connect(ledger) as conn:
        killed_at = conn.execute("SELECT count(*) FROM generations WHERE status = 'done'").fetchone()[0]
        before = dict(conn.execute("SELECT row_key, image_sha256 FROM generations WHERE status = 'done'").fetchall())
    assert 2 <= killed_at < rows

    finish = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert finish.returncode == 0, finish.stdout + finish.stderr
    assert "resuming unfinished batch" in finish.stdout

    with sqlite3.connect(ledger) as conn:
        statuses = conn.execute("SELECT status, count(*) FROM generations GROUP BY status").fetchall()
        after = dict(conn.execute("SELECT row_key, image_sha256 FROM generations").fetchall())
        stored = conn.execute("SELECT image_path, image_sha256 FROM generations").fetchall()
        batches = conn.execute("SELECT count(*) FROM batches").fetchone()[0]
    assert statuses == [("done", rows)] and batches == 1
    assert all(after[key] == sha for key, sha in before.items()), "a finished row was generated again"
    files = sorted(p for p in (data / "outputs").rglob("*") if p.is_file())
    assert len(files) == rows and not [p for p in files if ".tmp" in p.name]
    assert sorted(Path(path) for path, _ in stored) == files
    for path, sha in stored:
        assert hashlib.sha256(Path(path).read_bytes()).hexdigest() == sha


def test_two_runners_never_store_the_same_row_twice(services_factory, tmp_path):
    """A late duplicate result (e.g. a re-delivered job) is a no-op: the ledger keeps one image."""
    services = services_factory()
    sheet = write_sheet(tmp_path / "rows.csv", small_rows(1))
    prepared, _ = run_batch(services, sheet)
    row = services.ledger.rows(prepared.batch_id)[0]
    again = services.runner.run(prepared.batch_id)
    assert again.done == 1
    assert services.ledger.rows(prepared.batch_id)[0].image_sha256 == row.image_sha256
    assert len(list(services.runner.output_dir(prepared.batch_id).glob("*.png"))) == 1


def test_progress_events_reach_the_listener(services_factory, tmp_path):
    services = services_factory()
    sheet = write_sheet(tmp_path / "rows.csv", small_rows(2, steps=3))
    prepared = services.runner.prepare("product_shot", read_sheet(sheet))
    services.runner.start(prepared)
    events = []
    lock = threading.Lock()

    def listen(event):
        with lock:
            events.append(event)

    services.runner.run(prepared.batch_id, on_event=listen)
    kinds = [e.kind for e in events]
    assert kinds[0] == "batch_started" and kinds[-1] == "batch_done"
    assert kinds.count("row_done") == 2
    steps = [e for e in events if e.kind == "step"]
    assert steps and max(e.step for e in steps) == 3 and all(e.steps == 3 for e in steps)
    assert events[-1].done == 2 and events[-1].remaining == 0


def test_second_outputs_never_take_another_rows_file(services_factory, tmp_path):
    """Two rows with the same name, each saving two images: four distinct files, each matching the ledger."""
    services = services_factory()
    sheet = tmp_path / "rows.csv"
    sheet.write_text(
        "product_name,color,width,height,steps,second_size\n"
        "Jacket,red,64,64,1,64\nJacket,red,64,64,1,64\n",
        encoding="utf-8",
    )
    prepared, summary = run_batch(services, sheet)
    assert summary.done == 2
    files = []
    for row in services.ledger.rows(prepared.batch_id):
        assert len(row.images) == 2
        for image in row.images:
            assert hashlib.sha256(Path(image["path"]).read_bytes()).hexdigest() == image["sha256"]
            files.append(Path(image["path"]).name.lower())
    assert len(set(files)) == 4, files


def test_a_row_claimed_by_another_live_process_is_left_to_it(services_factory, tmp_path):
    import socket

    services = services_factory()
    sheet = write_sheet(tmp_path / "rows.csv", small_rows(2))
    prepared = services.runner.prepare("product_shot", read_sheet(sheet))
    services.runner.start(prepared)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        first = services.ledger.rows(prepared.batch_id)[0]
        assert services.ledger.claim_row(first.row_key, worker=f"{socket.gethostname()}:{other.pid}")
        summary = services.runner.run(prepared.batch_id)
        assert summary.done == 1  # the other process's row was not generated here
        assert summary.running == 1  # and the summary says it is still being generated elsewhere
        assert services.ledger.get_generation(first.row_key).status == "running"
    finally:
        other.kill()
        other.wait()
    summary = services.runner.run(prepared.batch_id)  # its claimant is gone now: the row runs, once
    assert summary.done == 2
    assert services.ledger.get_generation(first.row_key).attempts == 1  # it began once: here


def test_a_start_that_died_before_its_rows_were_written_resumes(services_factory, tmp_path):
    services = services_factory()
    sheet = write_sheet(tmp_path / "rows.csv", small_rows(2))
    prepared = services.runner.prepare("product_shot", read_sheet(sheet), batch_seed=3)
    template = prepared.template
    services.ledger.create_batch(  # what a process killed between the two writes of start() leaves behind
        template.name, template.content_hash, prepared.sheet_hash, prepared.batch_seed,
        batch_id=prepared.batch_id, options={"filename_pattern": template.filename_pattern},
    )
    resumed = services.runner.prepare("product_shot", read_sheet(sheet), batch_id=prepared.batch_id)
    services.runner.start(resumed)
    assert services.runner.run(prepared.batch_id).done == 2


@pytest.mark.parametrize("bad", ["../escape", "/abs", ".hidden", "a/b", "x" * 65])
def test_batch_ids_that_could_leave_the_outputs_folder_are_refused(services_factory, bad):
    services = services_factory()
    with pytest.raises(BatchError, match="not allowed"):
        services.ledger.create_batch("t", "h", "s", 1, batch_id=bad)


def test_batch_ids_name_the_time_in_utc_whatever_the_machines_time_zone(monkeypatch):
    from datetime import datetime, timezone

    from engine.batch import new_batch_id

    monkeypatch.setenv("TZ", "Asia/Shanghai")  # eight hours ahead of UTC, no summer time
    time.tzset()
    try:
        before = datetime.now(timezone.utc).replace(microsecond=0)
        stamp = datetime.strptime(new_batch_id()[1:16], "%Y%m%d-%H%M%S").replace(tzinfo=timezone.utc)
        after = datetime.now(timezone.utc)
    finally:
        monkeypatch.undo()
        time.tzset()
    assert before <= stamp <= after


def test_a_killed_claimant_that_is_still_a_zombie_counts_as_gone():
    from engine.batch import process_alive

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert process_alive(child.pid)
        child.kill()
        deadline = time.monotonic() + 10
        # Not reaped yet (no wait()): the process is a zombie, which still answers signal 0.
        while process_alive(child.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(child.pid, 0)  # the zombie is still there...
        assert not process_alive(child.pid)  # ...and holds no rows
    finally:
        child.kill()
        child.wait()
    assert not process_alive(child.pid)


def test_a_resume_removes_temp_files_of_writers_killed_mid_write(services_factory, tmp_path):
    services = services_factory()
    prepared = services.runner.prepare("product_shot", read_sheet(write_sheet(tmp_path / "rows.csv", small_rows(1))))
    services.runner.start(prepared)
    out_dir = services.runner.output_dir(prepared.batch_id)
    out_dir.mkdir(parents=True, exist_ok=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    abandoned = out_dir / f".Item 0.png.{dead.pid}.tmp"
    in_progress = out_dir / f".Item 9.png.{os.getpid()}.tmp"  # a live writer's: not ours to delete
    abandoned.write_bytes(b"half a png")
    in_progress.write_bytes(b"being written")
    assert services.runner.run(prepared.batch_id).done == 1
    assert not abandoned.exists() and in_progress.exists()


def test_a_row_shows_its_prompt_before_it_runs_and_after_it_fails(services_factory, tmp_path):
    from engine.errors import OutOfMemory

    services = services_factory()
    sheet = write_sheet(tmp_path / "rows.csv", ["Teapot,green,minimal,64,64,2"])
    prepared = services.runner.prepare("product_shot", read_sheet(sheet))
    services.runner.start(prepared)
    queued = services.ledger.rows(prepared.batch_id)[0]
    assert queued.status == "queued" and "Teapot" in queued.prompt  # searchable in History already
    services.runner.engine.run_batch = lambda workflows, *a, **k: [OutOfMemory("CUDA out of memory") for _ in workflows]
    services.runner.run(prepared.batch_id)
    failed = services.ledger.rows(prepared.batch_id)[0]
    assert failed.status == "failed" and failed.prompt == queued.prompt
    assert [r.row_key for r in services.ledger.search(text="Teapot")] == [failed.row_key]


def test_a_cli_workflow_run_never_resumes_a_comfyui_prompt_of_the_same_workflow(services_factory):
    from engine.settings import DEMO_CHECKPOINT

    services = services_factory()
    workflow = json.loads((ROOT / "tests" / "data" / "comfyui-examples" / "sd3.5_simple_example.api.json").read_text())
    workflow["4"]["inputs"]["ckpt_name"] = DEMO_CHECKPOINT
    prompt = services.runner.prepare_workflow(workflow, kind="comfy", batch_id="comfy-prompt-1")
    services.runner.start(prompt)
    services.ledger.cancel_batch(prompt.batch_id)  # taken off the queue: unfinished for good
    assert services.runner.find_unfinished_workflow(workflow, None, kind="comfy") == "comfy-prompt-1"
    assert services.runner.find_unfinished_workflow(workflow) is None  # a CLI run starts its own batch


def test_a_workflow_problem_names_the_column_that_fed_it(services_factory, tmp_path):
    services = services_factory()
    sheet = tmp_path / "rows.csv"
    sheet.write_text("product_name,Width,height,steps\nMug,72,64,2\n", encoding="utf-8")
    prepared = services.runner.prepare("product_shot", read_sheet(sheet))
    problem = prepared.report.rows[0].problems[-1]
    assert problem.column == "Width" and "width 72 is not a multiple of 16" in problem.reason


def _started(services, rows: list[str], tmp_path) -> str:
    runner = services.runner
    prepared = runner.prepare("product_shot", read_sheet(write_sheet(tmp_path / "rows.csv", rows)), batch_seed=3)
    return runner.start(prepared)


def test_an_image_that_cannot_be_written_stops_the_batch_naming_row_and_file_and_the_same_process_resumes(
    services_factory, tmp_path
):
    import shutil

    services = services_factory(max_gpu_batch=1)
    runner = services.runner
    batch_id = _started(services, [f"Item{i},red,minimal,64,64,1" for i in range(4)], tmp_path)
    blocker = runner.output_dir(batch_id) / "Item2_red.png"
    (blocker / "in the way").mkdir(parents=True)  # the OS refuses to put row 4's image where a folder is

    with pytest.raises(BatchError) as stopped:
        runner.run(batch_id)

    assert "row 4" in stopped.value.message and str(blocker) in stopped.value.message
    assert "resume" in stopped.value.message
    statuses = {r.row_number: r.status for r in services.ledger.rows(batch_id)}
    assert statuses == {2: "done", 3: "done", 4: "queued", 5: "queued"}  # nothing left "running"
    assert not list(runner.output_dir(batch_id).glob(".*.tmp"))

    shutil.rmtree(blocker)
    summary = runner.run(batch_id)  # the same process and runner, as the web app's resume button does
    assert (summary.done, summary.running) == (4, 0)
    assert services.ledger.get_batch(batch_id)["status"] == "finished"


def test_rows_this_process_claimed_in_an_earlier_run_are_run_again_on_resume(services_factory, tmp_path):
    """A run that stopped, or a process restarted with the same pid (pid 1 in a container), left rows
    claimed under this process's name: a resume here runs them instead of calling the batch finished."""
    services = services_factory()
    batch_id = _started(services, small_rows(2, steps=1), tmp_path)
    for row in services.ledger.rows(batch_id):
        services.ledger.claim_row(row.row_key, worker=services.runner.worker_id)

    summary = services.runner.run(batch_id)

    assert (summary.done, summary.running) == (2, 0)
    with pytest.raises(BatchError, match="already running in this process"):
        with services.runner._lock:
            services.runner._active.add(batch_id)
        try:
            services.runner.run(batch_id)
        finally:
            services.runner._active.discard(batch_id)


def test_a_row_that_killed_its_process_three_times_is_failed_not_retried_forever(services_factory, tmp_path):
    import socket

    services = services_factory()
    batch_id = _started(services, small_rows(2, steps=1), tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_claimant = f"{socket.gethostname()}:{int(dead.stdout)}"
    killer = services.ledger.rows(batch_id)[0].row_key
    for attempt in range(3):
        services.ledger.claim_row(killer, worker=dead_claimant)
        services.ledger.mark_began(killer)  # the process died with the row running
        if attempt < 2:
            services.ledger.reset_stale_running(batch_id, worker=dead_claimant)

    summary = services.runner.run(batch_id)

    row = services.ledger.get_generation(killer)
    assert row.status == "failed" and "died while running it 3 time(s)" in row.error
    assert (summary.done, summary.failed) == (1, 1)


def test_a_batch_another_live_process_still_works_on_is_not_called_finished(services_factory, tmp_path):
    import socket

    services = services_factory()
    batch_id = _started(services, small_rows(2, steps=1), tmp_path)
    elsewhere = f"{socket.gethostname()}:{os.getppid()}"  # alive: the process that started these tests
    services.ledger.claim_row(services.ledger.rows(batch_id)[0].row_key, worker=elsewhere)

    summary = services.runner.run(batch_id)

    assert (summary.done, summary.running) == (1, 1)
    assert services.ledger.get_batch(batch_id)["status"] == "running"


def _live_process():
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])


def test_a_claim_whose_pid_now_belongs_to_a_newer_process_is_gone(services_factory, tmp_path):
    """After a reboot the claimant's pid may be some other program's: the claim is older than that process."""
    import socket

    services = services_factory()
    batch_id = _started(services, small_rows(1, steps=1), tmp_path)
    stranger = _live_process()
    try:
        key = services.ledger.rows(batch_id)[0].row_key
        services.ledger.claim_row(key, worker=f"{socket.gethostname()}:{stranger.pid}")
        services.ledger.conn.execute("UPDATE generations SET started_at = '2026-01-01T00:00:00.000+00:00'")
        summary = services.runner.run(batch_id)
        assert (summary.done, summary.running) == (1, 0)
    finally:
        stranger.kill()
        stranger.wait()


def test_the_web_apps_watch_resumes_a_batch_once_the_process_working_on_it_is_gone(services_factory, tmp_path):
    import socket

    from webapp.server import AbandonedBatchWatch

    services = services_factory()
    batch_id = _started(services, small_rows(2, steps=1), tmp_path)
    services.ledger.set_batch_status(batch_id, "running")
    cli = _live_process()  # a CLI run of the batch, in the middle of its first row
    first = services.ledger.rows(batch_id)[0].row_key
    services.ledger.claim_row(first, worker=f"{socket.gethostname()}:{cli.pid}")
    watch = AbandonedBatchWatch(services)
    try:
        assert watch.check() == []  # left to the live process
        services.queue.submit(batch_id)  # a user presses Resume anyway: the other process's row is left alone
        progress = services.queue.wait(batch_id, timeout=60)
        assert progress.state == "running_elsewhere" and progress.remaining == 1
    finally:
        cli.kill()
        cli.wait()
    assert watch.check() == [batch_id]  # its process is gone: the batch resumes
    assert services.queue.wait(batch_id, timeout=60).state == "done"
    assert all(row.status == "done" for row in services.ledger.rows(batch_id))


def _ledger_and_files(services, batch_id):
    rows = [(r.row_number, r.status, r.finished_at, r.image_path, r.crashes) for r in services.ledger.rows(batch_id)]
    return rows, sorted(p.name for p in services.runner.output_dir(batch_id).iterdir())


def test_shutting_down_stops_the_running_batch_before_its_rows_are_given_back(services_factory, tmp_path):
    """What the web app does when it stops: the batch stops between sampler steps, the queue's thread ends,
    and only then are its rows given back; nothing is written afterwards, and the batch is left to resume
    (not cancelled)."""
    services = services_factory(max_gpu_batch=1)
    batch_id = _started(services, small_rows(3, steps=60), tmp_path)
    second_row_sampling = threading.Event()
    services.queue.listeners.append(
        lambda event: second_row_sampling.set() if event.kind == "step" and event.row_number == 3 else None)
    services.queue.submit(batch_id)
    assert second_row_sampling.wait(120)

    assert services.close(wait_s=30) is True  # the run ended between two steps of row 3
    services.runner.release_claims()

    rows, files = _ledger_and_files(services, batch_id)
    assert [(number, status) for number, status, *_ in rows] == [(2, "done"), (3, "queued"), (4, "queued")]
    assert all(crashes == 0 for *_, crashes in rows) and files == [Path(rows[0][3]).name]
    assert services.queue.status(batch_id).state == "interrupted"
    assert services.ledger.get_batch(batch_id)["status"] == "running"  # resumed by the next start
    time.sleep(1.0)
    assert _ledger_and_files(services, batch_id) == (rows, files)  # nothing written after the give-back
    resumed = services_factory(max_gpu_batch=1)  # the next start, on the same data folder
    assert batch_id in resumed.runner.abandoned_batches()
    assert resumed.runner.run(batch_id).done == 3
    assert len(list(resumed.runner.output_dir(batch_id).glob("*.png"))) == 3


def test_a_run_that_does_not_stop_in_time_stores_nothing_after_its_rows_are_given_back(services_factory, tmp_path):
    """A step that outlasts the shutdown's wait (a model load, a compile): the rows are given back anyway,
    and the row that finishes afterwards is not stored, since another process may be running it by then."""
    services = services_factory(max_gpu_batch=1)
    batch_id = _started(services, small_rows(1, steps=1), tmp_path)
    in_step, go_on = threading.Event(), threading.Event()

    def slow_step(event):
        if event.kind == "step":
            in_step.set()
            go_on.wait(60)

    services.queue.listeners.append(slow_step)
    services.queue.submit(batch_id)
    assert in_step.wait(120)

    assert services.close(wait_s=0.2) is False  # still inside its step
    services.runner.release_claims()
    given_back = _ledger_and_files(services, batch_id)
    go_on.set()  # the step ends and the row is finished
    services.queue._thread.join(60)

    assert not services.queue._thread.is_alive()
    assert _ledger_and_files(services, batch_id) == given_back
    assert [status for _, status, *_ in given_back[0]] == ["queued"] and given_back[1] == []


def test_cancelling_a_batch_that_waits_also_ends_rows_a_dead_process_left_claimed(services_factory, tmp_path):
    import socket

    services = services_factory()
    batch_id = _started(services, small_rows(2, steps=1), tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    services.ledger.claim_row(services.ledger.rows(batch_id)[0].row_key,
                              worker=f"{socket.gethostname()}:{int(dead.stdout)}")

    assert services.runner.cancel_waiting(batch_id) == 2
    assert {row.status for row in services.ledger.rows(batch_id)} == {"cancelled"}


def test_a_ui_workflow_run_as_a_batch_embeds_its_ui_json_in_the_png(services_factory):
    from PIL import Image

    from engine.settings import DEMO_CHECKPOINT

    services = services_factory()
    ui = json.loads((ROOT / "tests" / "data" / "comfyui-examples" / "sd3.5_simple_example.ui.json").read_text())
    for node in ui["nodes"]:
        if node["type"] == "CheckpointLoaderSimple":
            node["widgets_values"][0] = DEMO_CHECKPOINT
        if node["type"] == "EmptySD3LatentImage":
            node["widgets_values"][:2] = [64, 64]
        if node["type"] == "KSampler":
            node["widgets_values"][2] = 2  # [seed, control_after_generate, steps, ...]
    prepared = services.runner.prepare_workflow(ui)  # what `app.py run --workflow wf.json` does
    services.runner.start(prepared)
    assert services.runner.run(prepared.batch_id).done == 1
    (row,) = services.ledger.rows(prepared.batch_id)
    with Image.open(row.images[0]["path"]) as image:
        chunks = dict(image.text)
    assert json.loads(chunks["workflow"]) == ui  # the file opens in ComfyUI with its own layout
    assert json.loads(chunks["prompt"]) == services.runner.engine.parse(ui).to_api()


def test_a_copy_of_the_ledger_file_alone_holds_every_finished_batch(services_factory, tmp_path):
    """Until SQLite checkpoints (every thousand pages), recent commits live only in ledger.db-wal: a backup
    that copies ledger.db alone, or a -wal deleted by mistake, would lose whole batches. A finished run is
    in the ledger file itself."""
    import shutil

    services = services_factory()
    prepared, summary = run_batch(services, write_sheet(tmp_path / "rows.csv", small_rows(2, steps=1)))
    assert summary.done == 2
    (tmp_path / "backup").mkdir()
    shutil.copyfile(services.settings.ledger_path, tmp_path / "backup" / "ledger.db")  # no -wal beside it

    with sqlite3.connect(tmp_path / "backup" / "ledger.db") as copy:
        batch = copy.execute("SELECT status, done_count FROM batches WHERE id = ?", (prepared.batch_id,)).fetchone()
    assert batch == ("finished", 2)


def test_a_ledger_that_cannot_take_a_write_stops_the_run_and_its_rows_are_no_crashes(services_factory, tmp_path):
    """The disk under the ledger full mid-batch (SQLite's own "database or disk is full", here from a page
    limit on the connection): the run stops naming the ledger, its claimed rows go back to the queue with no
    crash counted (three would fail a row as "died while running it"), and once there is room it resumes."""
    from engine.errors import StoreError

    services = services_factory(max_gpu_batch=1)
    batch_id = _started(services, small_rows(4, steps=1), tmp_path)
    ledger = services.ledger
    limit = ledger.conn.execute("PRAGMA page_count").fetchone()[0]
    ledger.conn.execute(f"PRAGMA max_page_count = {limit}")

    with pytest.raises(StoreError, match="the disk holding it is full") as stopped:
        services.runner.run(batch_id)

    assert str(services.settings.ledger_path) in stopped.value.message and "free space" in stopped.value.message
    rows = ledger.rows(batch_id)
    assert {r.status for r in rows} <= {"done", "queued"} and all(r.crashes == 0 for r in rows)
    ledger.conn.execute("PRAGMA max_page_count = 1073741823")  # space freed
    assert services.runner.run(batch_id).done == 4
    assert all(r.crashes == 0 for r in ledger.rows(batch_id))


def test_rows_this_process_left_claimed_mid_row_are_no_crashes_when_it_resumes(services_factory, tmp_path):
    """When even giving the rows back fails (the ledger refuses every write), they stay claimed under this
    process's name while they were being sampled: its own resume takes them back without blaming them."""
    services = services_factory()
    batch_id = _started(services, small_rows(2, steps=1), tmp_path)
    for row in services.ledger.rows(batch_id):
        services.ledger.claim_row(row.row_key, worker=services.runner.worker_id)
        services.ledger.mark_began(row.row_key)

    assert services.runner.run(batch_id).done == 2
    assert [r.crashes for r in services.ledger.rows(batch_id)] == [0, 0]


def _other_batches(services, count):
    """``count`` newer batches of other sheets, as months of other people's work leave them."""
    for number in range(count):
        services.ledger.create_batch("product_shot", "t" * 64, f"{number:064d}", batch_seed=number, user="bob")


def test_a_command_run_again_continues_its_batch_however_many_batches_came_after(services_factory, tmp_path):
    """A monthly cron job on a busy install: hundreds of batches since its last run. Looking only among the
    newest 200 batches, it started a new batch and made every image again."""
    services = services_factory()
    sheet = read_sheet(write_sheet(tmp_path / "rows.csv", small_rows(2)))
    prepared = services.runner.prepare("product_shot", sheet, batch_seed=5)
    services.runner.start(prepared)
    _other_batches(services, 201)
    assert services.runner.batch_to_continue("product_shot", sheet, batch_seed=5) == prepared.batch_id
    assert services.runner.batch_to_continue("product_shot", sheet, batch_seed=6) is None


def test_an_interrupted_batch_is_offered_for_resume_however_many_batches_came_after(services_factory, tmp_path):
    """The web page's "interrupted batches" (and the CLI's list of them) looked at the newest 200 batches
    only: an older unfinished batch could no longer be picked to resume."""
    services = services_factory()
    prepared = services.runner.prepare("product_shot", read_sheet(write_sheet(tmp_path / "rows.csv", small_rows(2))))
    services.runner.start(prepared)
    _other_batches(services, 201)  # recorded, no rows: nothing to resume in them
    assert [b["id"] for b in services.runner.unfinished_batches()] == [prepared.batch_id]
    assert services.queue.interrupted()[0]["id"] == prepared.batch_id


def draft_sheet(path: Path, count: int) -> Path:
    path.write_text("prompt,width,height,steps\n" + "".join(f"cat {n},64,64,1\n" for n in range(count)),
                    encoding="utf-8")
    return path


def test_row_numbers_in_file_names_are_padded_so_files_list_in_row_order(services_factory, tmp_path):
    """turbo_draft names files draft_{row}_{prompt}: over a batch of rows 2 to 12, row 10 came before row 2
    in a file browser and in the zip. {row} now has the digits of the batch's largest row number."""
    services = services_factory()
    runner = services.runner
    prepared = runner.prepare("turbo_draft", read_sheet(draft_sheet(tmp_path / "rows.csv", 11)))
    runner.start(prepared)
    assert runner.run(prepared.batch_id).done == 11
    rows = sorted(services.ledger.rows(prepared.batch_id), key=lambda r: int(r.row_number))
    on_disk = [Path(r.image_path).name for r in rows]
    assert on_disk[0] == "draft_02_cat 0.png" and on_disk[-1] == "draft_12_cat 10.png"
    assert on_disk == sorted(on_disk)

    import zipfile

    runner.write_zip(prepared.batch_id, tmp_path / "out.zip")
    archive = zipfile.ZipFile(tmp_path / "out.zip")
    assert [n.removeprefix("images/") for n in archive.namelist() if n.startswith("images/")] == on_disk
    manifest = json.loads(archive.read("manifest.json"))
    assert sorted(f for row in manifest["rows"] for f in row["files"]) == ["images/" + n for n in on_disk]


def test_a_batch_recorded_before_names_were_padded_resumes_with_the_names_it_had(services_factory, tmp_path):
    """A batch an earlier version started (no row_digits in its options) keeps unpadded names when it
    resumes: its finished rows are neither renamed nor run again, and the rest are named alike."""
    services = services_factory(max_gpu_batch=1)
    runner = services.runner
    prepared = runner.prepare("turbo_draft", read_sheet(draft_sheet(tmp_path / "rows.csv", 11)))
    runner.start(prepared)
    services.ledger.conn.execute("UPDATE batches SET options = json_remove(options, '$.row_digits') WHERE id = ?",
                                 (prepared.batch_id,))
    services.ledger.conn.commit()

    def cancel_after_first(event):
        if event.kind == "row_done":
            runner.cancel(prepared.batch_id)

    first = runner.run(prepared.batch_id, on_event=cancel_after_first)
    assert 1 <= first.done < 11
    finished = {r.row_key: (r.image_path, r.image_sha256)
                for r in services.ledger.rows(prepared.batch_id) if r.status == "done"}
    assert runner.run(prepared.batch_id).done == 11
    rows = sorted(services.ledger.rows(prepared.batch_id), key=lambda r: int(r.row_number))
    assert {r.row_key: (r.image_path, r.image_sha256) for r in rows if r.row_key in finished} == finished
    assert [Path(r.image_path).name for r in rows][:2] == ["draft_2_cat 0.png", "draft_3_cat 1.png"]
    assert Path(rows[-1].image_path).name == "draft_12_cat 10.png"
    assert len({r.image_path for r in rows}) == 11 and all(Path(r.image_path).is_file() for r in rows)
