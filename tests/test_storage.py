"""A full or unwritable disk: the storage probe a run makes before it claims rows, and how the web app waits
for the space to come back (backed off, one log line per try, its state on the progress line and the API).

Real filesystems: a 1 MiB tmpfs (``tiny_disk``; skipped where mounting is not permitted) filled up with a file.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from engine.runtime import Engine
from engine.settings import load_settings
from engine.sheets import read_sheet
from engine.storage import (DEFAULT_IMAGE_BYTES, RetrySchedule, expected_image_bytes, free_bytes, is_storage_problem,
                            probe_folder, row_image_bytes)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return Engine(load_settings({"data_dir": str(tmp_path_factory.mktemp("engine"))}, environ={}))


@pytest.fixture
def make_services(services_factory, engine):
    """Services sharing this module's engine, one row per GPU batch (rows reach the disk one at a time)."""
    return lambda **overrides: services_factory(engine=engine, **{"max_gpu_batch": 1, **overrides})


def started(services, tmp_path: Path, count: int) -> str:
    sheet = tmp_path / "rows.csv"
    sheet.write_text("product_name,color,style,width,height,steps\n"
                     + "".join(f"Item {n},red,minimal,64,64,1\n" for n in range(count)), encoding="utf-8")
    prepared = services.runner.prepare("product_shot", read_sheet(sheet), batch_seed=5)
    return services.runner.start(prepared)


def fill(disk: Path, leave: int) -> Path:
    """Fill ``disk`` with one file until ``leave`` bytes are free; returns the file (delete it for space)."""
    filler = disk / f"filler-{len(list(disk.glob('filler-*')))}"
    filler.write_bytes(b"\0" * max(0, free_bytes(disk) - leave))
    return filler


def warnings_of(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.WARNING and r.name == "engine.batch_queue"]


# --------------------------------------------------------------------------------- the schedule and the probe


def test_the_retry_schedule_doubles_from_one_minute_up_to_half_an_hour():
    schedule = RetrySchedule()
    assert [schedule.delay_s(n) / 60 for n in range(1, 9)] == [1, 2, 4, 8, 16, 30, 30, 30]
    assert schedule.delay_s(10**6) == 1800  # however long the disk stays full
    assert RetrySchedule(first_s=5, cap_s=12).delay_s(3) == 12


def test_the_probe_passes_a_folder_with_room_and_names_the_free_bytes_of_one_without(tmp_path, tiny_disk):
    assert probe_folder(tmp_path / "new" / "folder", 1) is None  # created, written, nothing left behind
    assert list((tmp_path / "new" / "folder").iterdir()) == []

    fill(tiny_disk, 64 * 1024)
    short = probe_folder(tiny_disk, 100 * 1024)
    assert short.error is None and short.short_of_space
    assert short.folder == str(tiny_disk) and 60 * 1024 <= short.free_bytes <= 64 * 1024
    assert short.needed_bytes == 100 * 1024 and f"{short.free_bytes} bytes free" in short.describe()

    fill(tiny_disk, 0)  # statvfs may still count a little: the test write tells
    full = probe_folder(tiny_disk, 1)
    assert full is not None and full.short_of_space
    assert full.error is None or full.error.errno == errno.ENOSPC
    assert not [p for p in tiny_disk.iterdir() if p.name.startswith(".storage-probe-")]


def test_the_probe_tells_a_read_only_folder_from_a_full_one(make_services, tmp_path, tiny_disk):
    services = make_services(output_dir=str(tiny_disk / "out"))
    batch_id = started(services, tmp_path, 1)
    services.runner.output_dir(batch_id).mkdir(parents=True)
    remounted = subprocess.run(["mount", "-o", "remount,ro", str(tiny_disk)], capture_output=True, text=True)
    if remounted.returncode != 0:
        pytest.skip(f"cannot remount the tmpfs read-only here: {remounted.stderr.strip()}")

    problem = services.runner.storage_problem(batch_id)

    assert problem.code == "batch_storage_unwritable" and is_storage_problem(problem)
    assert problem.details["path"] == str(services.runner.output_dir(batch_id))
    assert "Read-only file system" in problem.message


def test_the_size_of_the_next_image_comes_from_the_batchs_own_images_else_from_its_rows(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x" * 1000)
    (tmp_path / "b.png").write_bytes(b"x" * 3000)
    done = [SimpleNamespace(status="done", image_path=str(tmp_path / name), workflow={}) for name in ("a.png", "b.png")]
    pending = SimpleNamespace(status="queued", image_path=None, workflow={
        "5": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 512, "height": 256, "batch_size": 1}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0]}}})

    pending_size = row_image_bytes(pending.workflow, None)

    assert expected_image_bytes(done, [pending_size]) == 3000
    assert expected_image_bytes([SimpleNamespace(image_path=str(tmp_path / "gone.png"))], [pending_size]) == pending_size
    assert pending_size == 512 * 256 * 3 + len(json.dumps(pending.workflow))
    assert expected_image_bytes([], [row_image_bytes({}, None)]) == DEFAULT_IMAGE_BYTES


def test_the_size_of_a_pending_image_counts_the_workflow_its_png_carries():
    """A ComfyUI page sends its UI workflow (hundreds of KB) to go into the PNG: a 64x64 picture of 12 KB
    with it is mostly text, and a disk with room for the picture alone has no room for the file."""
    workflow = {"5": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}}
    ui_workflow = {"nodes": [{"id": n, "widgets_values": ["a long prompt " * 40]} for n in range(200)]}
    plain = row_image_bytes(workflow, {})
    carrying = row_image_bytes(workflow, {"png_extra": {"workflow": ui_workflow}})

    assert carrying - plain == len(json.dumps(ui_workflow))
    assert expected_image_bytes([], [carrying]) > 10 * 64 * 64 * 3


def test_the_probe_before_a_run_reads_the_image_sizes_rows_recorded_not_every_row(make_services, tmp_path):
    """The probe runs before every run and every wait for space: it read and encoded each row's workflow
    (a second for 10,000 rows). Rows record their image size when added; the answer is the same."""
    services = make_services()
    sheet = tmp_path / "rows.csv"
    sheet.write_text("product_name,width,height,second_size\n" + "".join(
        f"Item {n},{64 + 16 * (n % 5)},64,{256 if n == 7 else 0}\n" for n in range(12)), encoding="utf-8")
    batch_id = services.runner.start(services.runner.prepare("product_shot", read_sheet(sheet), batch_seed=5))
    statements = []
    services.ledger.conn.set_trace_callback(statements.append)
    try:
        assert services.runner.storage_problem(batch_id) is None
    finally:
        services.ledger.conn.set_trace_callback(None)
    whole_rows = [sql for sql in statements if sql.lstrip().upper().startswith("SELECT *") and "LIMIT" not in sql]
    assert whole_rows == []
    rows = services.ledger.rows(batch_id)
    sizes = [row_image_bytes(row.workflow, row.row_values) for row in rows if row.status != "done"]
    assert services.ledger.pending_image_bytes(batch_id) == max(sizes) == 256 * 256 * 3 + len(
        json.dumps(rows[7].workflow))



def test_rows_an_older_release_recorded_without_their_image_size_are_sized_from_their_workflows(make_services,
                                                                                               tmp_path):
    services = make_services()
    sheet = tmp_path / "rows.csv"
    sheet.write_text("product_name,width,height,second_size\n" + "".join(
        f"Item {n},64,64,{256 if n == 3 else 0}\n" for n in range(6)), encoding="utf-8")
    batch_id = services.runner.start(services.runner.prepare("product_shot", read_sheet(sheet), batch_seed=5))
    recorded = services.runner._next_image_bytes(batch_id)
    services.ledger._write(lambda conn: conn.execute(
        "UPDATE generations SET image_bytes = NULL WHERE batch_id = ? AND row_number = 5", (batch_id,)))

    assert services.ledger.pending_image_bytes(batch_id) is None
    assert services.runner._next_image_bytes(batch_id) == recorded > 256 * 256 * 3

# ------------------------------------------------------------------------------- the web app's resume


def test_a_batch_on_a_full_disk_waits_without_sampling_and_resumes_as_soon_as_space_is_back(
    make_services, tmp_path, tiny_disk, caplog
):
    from webapp.api import public_progress
    from webapp.server import AbandonedBatchWatch

    services = make_services(output_dir=str(tiny_disk / "out"))
    batch_id = started(services, tmp_path, 2)
    out = services.runner.output_dir(batch_id)
    filler = fill(tiny_disk, 8 * 1024)  # not room for three 64x64 images
    sampled = []
    services.queue.listeners.append(lambda event: sampled.append(event) if event.kind in ("node", "step") else None)
    watch = AbandonedBatchWatch(services)
    caplog.set_level(logging.INFO)

    assert watch.check() == [batch_id]  # what the app does at start and every minute
    progress = services.queue.wait(batch_id, 60)

    assert progress.state == "waiting_for_storage" and progress.error_code == "batch_waiting_for_storage"
    assert progress.error_details["path"] == str(out)
    assert progress.error_details["free_bytes"] < progress.error_details["needed_bytes"]
    assert not sampled  # nothing ran on the GPU
    assert [(r.status, r.attempts, r.crashes) for r in services.ledger.rows(batch_id)] == [("queued", 0, 0)] * 2
    (line,) = warnings_of(caplog)
    assert line.exc_info is None and "Traceback" not in caplog.text
    assert f"{out} has {progress.error_details['free_bytes']} bytes free" in line.getMessage()
    answered = public_progress(services, progress)  # GET /api/batches/{id}
    assert answered["state"] == "waiting_for_storage" and answered["error_code"] == "batch_waiting_for_storage"
    assert 55 < progress.retry_at - time.time() <= 60

    assert watch.check() == []  # a minute later the disk is still full: not tried again yet
    assert watch.check(now=progress.retry_at + 1) == [batch_id]  # its time has come: tried, and waits longer
    progress = services.queue.wait(batch_id, 60)
    assert progress.state == "waiting_for_storage" and 115 < progress.retry_at - time.time() <= 120
    assert len(warnings_of(caplog)) == 2 and not sampled

    filler.unlink()  # space is back: the next round resumes it, long before its next try was due
    assert watch.check() == [batch_id]
    assert services.queue.wait(batch_id, 120).state == "done"
    rows = services.ledger.rows(batch_id)
    assert all(r.status == "done" and Path(r.image_path).is_file() for r in rows)
    assert services.queue.storage_failures(batch_id) == 0


def test_a_disk_that_fills_up_mid_batch_is_waited_for_and_the_rest_runs_once_there_is_space(
    make_services, tmp_path, tiny_disk, caplog
):
    from webapp.server import AbandonedBatchWatch

    services = make_services(output_dir=str(tiny_disk / "out"))
    batch_id = started(services, tmp_path, 5)
    filler = fill(tiny_disk, 40 * 1024)  # enough for the probe (three images), not for five
    watch = AbandonedBatchWatch(services)
    caplog.set_level(logging.INFO)

    assert watch.check() == [batch_id]
    progress = services.queue.wait(batch_id, 120)

    assert progress.state == "waiting_for_storage" and progress.error_code == "batch_stopped_by_storage"
    statuses = [r.status for r in services.ledger.rows(batch_id)]
    assert set(statuses) == {"done", "queued"} and all(r.crashes == 0 for r in services.ledger.rows(batch_id))
    (line,) = warnings_of(caplog)
    assert line.exc_info is None and str(services.runner.output_dir(batch_id)) in line.getMessage()
    assert "bytes free" in line.getMessage() and "Traceback" not in caplog.text
    assert watch.check() == []  # still full

    filler.unlink()
    assert watch.check() == [batch_id]
    assert services.queue.wait(batch_id, 120).state == "done"
    rows = services.ledger.rows(batch_id)
    assert all(r.status == "done" and Path(r.image_path).is_file() for r in rows)
    assert len(list(services.runner.output_dir(batch_id).glob("*.png"))) == 5


def test_a_full_ledger_disk_is_waited_for_on_the_schedule_without_a_traceback(make_services, tmp_path, caplog):
    """SQLite's "database or disk is full" (here from a page limit on the connection), which the probe of
    free bytes cannot see: the batch waits its back-off, then runs."""
    from webapp.server import AbandonedBatchWatch

    services = make_services()
    batch_id = started(services, tmp_path, 3)
    ledger = services.ledger
    ledger.conn.execute(f"PRAGMA max_page_count = {ledger.conn.execute('PRAGMA page_count').fetchone()[0]}")
    watch = AbandonedBatchWatch(services)
    caplog.set_level(logging.INFO)

    assert watch.check() == [batch_id]
    progress = services.queue.wait(batch_id, 120)

    assert progress.state == "waiting_for_storage" and progress.error_code == "ledger_unwritable"
    assert "the disk holding it is full" in progress.error
    (line,) = warnings_of(caplog)
    assert line.exc_info is None and str(Path(services.settings.ledger_path).resolve().parent) in line.getMessage()
    ledger.conn.execute("PRAGMA max_page_count = 1073741823")  # space freed
    assert watch.check() == []  # the probe never saw it: only the schedule says when to try
    assert watch.check(now=progress.retry_at + 1) == [batch_id]
    assert services.queue.wait(batch_id, 120).state == "done"
    assert all(r.status == "done" and r.crashes == 0 for r in ledger.rows(batch_id))


def test_cancelling_a_batch_that_waits_for_space_ends_its_wait(make_services, tmp_path, tiny_disk):
    from webapp.server import AbandonedBatchWatch

    services = make_services(output_dir=str(tiny_disk / "out"))
    batch_id = started(services, tmp_path, 2)
    fill(tiny_disk, 8 * 1024)
    watch = AbandonedBatchWatch(services)
    watch.check()
    assert services.queue.wait(batch_id, 60).state == "waiting_for_storage"

    assert services.queue.cancel(batch_id) == "removed_from_queue"

    assert services.queue.status(batch_id).state == "cancelled"
    assert {r.status for r in services.ledger.rows(batch_id)} == {"cancelled"}
    assert watch.check(now=time.time() + 3600) == []  # a cancelled batch waits for the Resume button


def test_a_run_of_the_command_line_on_a_full_disk_claims_nothing(make_services, tmp_path, tiny_disk):
    from engine.errors import BatchError

    services = make_services(output_dir=str(tiny_disk / "out"))
    batch_id = started(services, tmp_path, 2)
    fill(tiny_disk, 8 * 1024)

    with pytest.raises(BatchError) as stopped:
        services.runner.run(batch_id)

    assert stopped.value.code == "batch_waiting_for_storage" and "free space there" in stopped.value.message
    assert [(r.status, r.worker) for r in services.ledger.rows(batch_id)] == [("queued", None)] * 2
    assert os.listdir(services.runner.output_dir(batch_id)) == []
