"""A checked batch set aside on disk until it is started (engine.parked): what the page keeps between
Check and Start, through the real runner, ledger and files."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from engine.errors import BatchError
from engine.sheets import read_sheet

SHEET = ("product_name,color,seed,width,height,steps\n"
         "霓虹夹克,red,18446744073709551615,64,64,1\n"
         "\"a \"\"quoted\"\" mug\",,,64,64,1\n"
         "too tall,blue,5,64,9999,1\n")


@pytest.fixture
def services(services_factory):
    return services_factory()


@pytest.fixture
def sheet(tmp_path) -> Path:
    path = tmp_path / "rows.csv"
    path.write_text(SHEET, encoding="utf-8")
    return path


def recorded(services, batch_id: str) -> list[tuple]:
    return [(row.row_number, row.row_values, row.seed, row.workflow, row.prompt, row.status, row.error, row.extra,
             row.image_bytes) for row in services.ledger.rows(batch_id)]


def test_a_parked_batch_records_exactly_what_the_prepared_batch_would(services, sheet):
    """The rows round-trip through the file: Chinese text, quotes, a seed of 2^64-1, a skipped row's problems."""
    kept = services.runner.prepare("product_shot", read_sheet(sheet), batch_seed=3)
    parked = services.runner.park(services.runner.prepare("product_shot", read_sheet(sheet), batch_seed=3))

    assert not hasattr(parked, "rows") and not hasattr(parked, "sheet") and not hasattr(parked, "report")
    assert (parked.row_count, parked.runnable) == (3, 2)
    direct, from_disk = services.runner.start(kept), services.runner.start(parked)

    assert recorded(services, from_disk) == recorded(services, direct)
    assert recorded(services, from_disk)[0][2] == 2**64 - 1
    made, parked_batch = services.ledger.get_batch(direct), services.ledger.get_batch(from_disk)
    for key in ("template_name", "template_hash", "sheet_name", "sheet_hash", "batch_seed", "options"):
        assert parked_batch[key] == made[key], key
    assert not parked.rows_file.exists()  # recorded: nothing left on disk


@pytest.mark.parametrize("damage", ["removed", "altered", "started"])
def test_rows_that_are_gone_or_not_the_ones_checked_start_nothing(services, sheet, damage):
    parked = services.runner.park(services.runner.prepare("product_shot", read_sheet(sheet)))
    if damage == "removed":
        parked.rows_file.unlink()
    elif damage == "altered":
        data = bytearray(parked.rows_file.read_bytes())
        data[-1] ^= 1
        parked.rows_file.write_bytes(bytes(data))
    else:
        services.runner.start(parked)  # a second click on Start

    with pytest.raises(BatchError) as refused:
        services.runner.start(parked)
    assert refused.value.code == "batch_check_expired" and refused.value.details["batch_id"] == parked.batch_id
    if damage != "started":
        assert services.ledger.get_batch(parked.batch_id) is None  # nothing half-recorded


def test_the_staging_folder_keeps_checked_rows_a_week_and_unpacked_photos_a_day(services, sheet):
    runner = services.runner
    week_old = runner.park(runner.prepare("product_shot", read_sheet(sheet)))
    days_old = runner.park(runner.prepare("product_shot", read_sheet(sheet)))
    photos = week_old.rows_file.parent / "photos-left"
    photos.mkdir()
    now = time.time()
    os.utime(week_old.rows_file, (now - 8 * 86400, now - 8 * 86400))
    os.utime(days_old.rows_file, (now - 2 * 86400, now - 2 * 86400))
    os.utime(photos, (now - 2 * 86400, now - 2 * 86400))

    fresh = runner.park(runner.prepare("product_shot", read_sheet(sheet)))  # parking clears what is past its age

    assert not week_old.rows_file.exists() and not photos.exists()
    assert days_old.rows_file.exists() and fresh.rows_file.exists()
    assert runner.ledger.get_batch(runner.start(days_old)) is not None


def test_a_disk_too_full_for_the_rows_is_said_plainly(services, sheet, tiny_disk):
    staging = Path(services.settings.uploads_path) / ".staging"
    staging.parent.mkdir(parents=True, exist_ok=True)
    (tiny_disk / "staging").mkdir()
    staging.symlink_to(tiny_disk / "staging")
    free = os.statvfs(tiny_disk).f_bavail * os.statvfs(tiny_disk).f_frsize
    (tiny_disk / "filler").write_bytes(b"\0" * free)
    prepared = services.runner.prepare("product_shot", read_sheet(sheet))

    with pytest.raises(BatchError) as refused:
        services.runner.park(prepared)
    assert refused.value.code == "batch_check_unwritable" and refused.value.details["path"] == str(staging)
    assert list(staging.iterdir()) == []  # no half-written rows left behind


def test_a_check_whose_unpacked_photos_were_cleared_is_refused_at_start_not_half_recorded(services):
    """Photos unpacked for a check are kept a day, its rows a week: Start after the photos went says so and
    records nothing (it used to fail inside the copy with a FileNotFoundError)."""
    import io
    import shutil
    import zipfile

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 40, 40)).save(buffer, format="PNG")
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as photos:
        photos.writestr("shoe.png", buffer.getvalue())
    runner = services.runner
    sheet = read_sheet(b"product_name,product_photo,width,height,steps\nShoe,shoe.png,64,64,1\n", "rows.csv")
    parked = runner.park(runner.prepare("product_in_scene", sheet, images=runner.unpack_photos(archive.getvalue())))
    shutil.rmtree(parked.images.folder)  # what the staging's daily clearing does

    with pytest.raises(BatchError) as refused:
        runner.start(parked)
    assert refused.value.code == "batch_photos_expired"
    assert refused.value.details == {"batch_id": parked.batch_id, "count": 1, "example": "shoe.png"}
    assert services.ledger.get_batch(parked.batch_id) is None


def test_only_as_many_checks_wait_on_disk_as_the_page_keeps_sessions(services_factory, sheet):
    """A script opening session after session (each dropped by Gradio past page_sessions, with no callback)
    would leave a file per check for a week: the oldest checks beyond that many go, and say so at Start."""
    runner = services_factory(page_sessions=3).runner
    checks = []
    for n in range(5):
        checks.append(runner.park(runner.prepare("product_shot", read_sheet(sheet))))
        written = time.time() - 60 + n
        os.utime(checks[-1].rows_file, (written, written))  # written in this order, a second apart

    assert sorted(p.name for p in checks[0].rows_file.parent.glob("*.rows.json.z")) == sorted(
        c.rows_file.name for c in checks[2:])
    with pytest.raises(BatchError) as refused:
        runner.start(checks[1])
    assert refused.value.code == "batch_check_expired"
    assert runner.start(checks[4]) == checks[4].batch_id


def test_a_staging_folder_gone_read_only_is_said_as_unwritable_not_a_raw_os_error(services_factory, sheet, tiny_disk):
    """The clearing of old checks meets a read-only disk first: Check must still answer with the refusal people
    understand (batch_check_unwritable), not an OSError from the housekeeping."""
    import subprocess

    data = tiny_disk.parent / "data"
    data.mkdir()
    (data / "uploads").symlink_to(tiny_disk, target_is_directory=True)  # only the uploads on the small disk
    runner = services_factory(data_dir=str(data)).runner
    old = runner.park(runner.prepare("product_shot", read_sheet(sheet)))
    week_ago = time.time() - 8 * 86400
    os.utime(old.rows_file, (week_ago, week_ago))  # due for clearing at the next check
    remounted = subprocess.run(["mount", "-o", "remount,ro", str(tiny_disk)], capture_output=True, text=True)
    if remounted.returncode != 0:
        pytest.skip(f"cannot remount the tmpfs read-only here: {remounted.stderr.strip()}")
    try:
        with pytest.raises(BatchError) as refused:
            runner.park(runner.prepare("product_shot", read_sheet(sheet)))
        assert refused.value.code == "batch_check_unwritable"
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(tiny_disk)], check=False)
