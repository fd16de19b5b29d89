"""Batch zips: the images under their file names, manifests, failed rows, streaming."""

import csv
import hashlib
import io
import json
import zipfile

import pytest

from engine.archive import iter_zip_stream, neutralise_csv_cell, write_batch_zip
from engine.sheets import read_sheet
from engine.store import BatchLedger

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64


@pytest.fixture
def batch(tmp_path):
    """A batch of five rows: three done (two named Cat/cat, one '../CON'), one failed, one skipped."""
    ledger = BatchLedger(tmp_path / "ledger.db")
    batch_id = ledger.create_batch("product_shot", "t" * 64, "s" * 64, batch_seed=7,
                                   options={"columns": ["product_name", "color", "note"]})
    cells = {
        2: {"product_name": "Cat", "color": "red", "note": "=HYPERLINK(\"http://evil\")"},
        3: {"product_name": "cat", "color": "red", "note": "+1"},
        4: {"product_name": "../CON", "color": "", "note": "@SUM(A1)"},
        5: {"product_name": "Boots", "color": "blue", "note": "-2"},
        6: {"product_name": "", "color": "green", "note": "fine"},
    }
    ledger.add_rows(batch_id, [{"row_number": n, "values": v, "seed": 2**64 - n} for n, v in cells.items() if n != 6])
    ledger.add_rows(batch_id, [{"row_number": 6, "values": cells[6], "status": "skipped",
                                "error": "product_name: required value is empty"}])
    images = tmp_path / "outputs"
    images.mkdir()
    names = {2: "Cat_red.png", 3: "cat_red_2.png", 4: "_CON.png"}  # as the runner names them
    for n in (2, 3, 4):
        row = ledger.claim_next(batch_id)
        assert row.row_number == n
        data = PNG + bytes([n]) * (3 << 20 if n == 2 else 10)  # row 2 spans several copy chunks
        (images / names[n]).write_bytes(data)
        ledger.complete_row(row.row_key, {"prompt": f"=cmd|' /C calc'!A{n}", "seed": 2**64 - n, "steps": 28},
                            image_path=names[n], image_sha256=hashlib.sha256(data).hexdigest())
    failed = ledger.claim_next(batch_id)
    ledger.fail_row(failed.row_key, "failed", "CUDA out of memory after a tiled retry")
    yield ledger, batch_id, images
    ledger.close()


def read_csv(data: bytes):
    return list(csv.DictReader(io.StringIO(data.decode("utf-8-sig"))))


def test_zip_names_manifest_and_failed_rows(batch, tmp_path):
    ledger, batch_id, images = batch
    out = tmp_path / "batch.zip"
    summary = write_batch_zip(ledger, batch_id, out, image_root=images)
    assert summary.problems == []
    archive = zipfile.ZipFile(out)
    assert archive.testzip() is None
    names = archive.namelist()
    assert summary.images == ["images/Cat_red.png", "images/cat_red_2.png", "images/_CON.png"]
    assert set(names) == set(summary.images) | {"manifest.csv", "manifest.xlsx", "manifest.json", "failed_rows.csv"}
    assert archive.read("images/Cat_red.png") == (images / "Cat_red.png").read_bytes()
    assert not list(tmp_path.glob(".batch.zip.*"))  # temp file renamed into place

    manifest = read_csv(archive.read("manifest.csv"))
    assert [m["row"] for m in manifest] == ["2", "3", "4", "5", "6"]
    assert [m["status"] for m in manifest] == ["done", "done", "done", "failed", "skipped"]
    assert manifest[0]["file"] == "images/Cat_red.png"
    assert manifest[0]["seed"] == str(2**64 - 2)  # exact, as text
    assert manifest[0]["prompt"].startswith("'=cmd")  # CSV injection neutralised
    assert manifest[0]["note"].startswith("'=HYPERLINK") and manifest[1]["note"] == "'+1"
    assert manifest[2]["note"] == "'@SUM(A1)" and manifest[3]["note"] == "'-2"
    assert manifest[3]["error"] == "CUDA out of memory after a tiled retry"

    data = json.loads(archive.read("manifest.json"))
    assert data["summary"]["done"] == 3 and data["summary"]["failed"] == 1 and data["summary"]["skipped"] == 1
    assert data["rows"][0]["seed"] == str(2**64 - 2) and data["rows"][0]["prompt"].startswith("=cmd")
    assert data["batch"]["batch_seed"] == "7"

    failed = archive.read("failed_rows.csv")
    sheet = read_sheet(failed, "failed_rows.csv")  # re-uploadable as a sheet
    assert sheet.columns == ["product_name", "color", "note", "error"]
    assert [r.cells["product_name"] for r in sheet.rows] == ["Boots", ""]
    assert sheet.rows[0].cells["error"] == "CUDA out of memory after a tiled retry"
    # Guarded against formulas in the file, and read back as the value the row had
    assert "'-2" in failed.decode("utf-8-sig") and sheet.rows[0].cells["note"] == "-2"


def test_the_excel_manifest_keeps_seeds_and_codes_exact_and_runs_no_formula(batch, tmp_path):
    """Excel opening manifest.csv turns a 20-digit seed into 1.2E+19 and a product code 00123 into 123."""
    from openpyxl import load_workbook

    ledger, batch_id, images = batch
    out = tmp_path / "batch.zip"
    write_batch_zip(ledger, batch_id, out, image_root=images)
    data = zipfile.ZipFile(out).read("manifest.xlsx")
    sheet = load_workbook(io.BytesIO(data)).active
    header = [cell.value for cell in sheet[1]]
    rows = [dict(zip(header, (cell for cell in line))) for line in sheet.iter_rows(min_row=2)]
    assert [r["row"].value for r in rows] == [2, 3, 4, 5, 6]  # numbers stay numbers
    first = rows[0]
    assert first["seed"].value == str(2**64 - 2) and first["seed"].data_type == "s"
    assert first["prompt"].value == "=cmd|' /C calc'!A2" and first["prompt"].data_type == "s"  # text, not a formula
    assert first["note"].value.startswith("=HYPERLINK") and first["note"].data_type == "s"
    assert rows[3]["error"].value == "CUDA out of memory after a tiled retry"
    # It reads back as a sheet, with the same cells as the CSV manifest
    as_sheet = read_sheet(data, "manifest.xlsx")
    csv_rows = read_csv(zipfile.ZipFile(out).read("manifest.csv"))
    assert [r.cells["seed"] for r in as_sheet.rows] == [m["seed"] for m in csv_rows]


def test_product_codes_with_leading_zeros_stay_text_in_the_excel_manifest(tmp_path):
    from openpyxl import load_workbook

    ledger = BatchLedger(tmp_path / "ledger.db")
    batch_id = ledger.create_batch("product_shot", "t" * 64, "s" * 64, batch_seed=7, options={"columns": ["sku"]})
    ledger.add_rows(batch_id, [{"row_number": 2, "values": {"sku": "00123"}, "status": "skipped", "error": "x"}])
    out = tmp_path / "b.zip"
    write_batch_zip(ledger, batch_id, out, image_root=tmp_path)
    sheet = load_workbook(io.BytesIO(zipfile.ZipFile(out).read("manifest.xlsx"))).active
    header = [cell.value for cell in sheet[1]]
    assert sheet.cell(row=2, column=header.index("sku") + 1).value == "00123"
    ledger.close()


def test_streamed_zip_equals_a_readable_archive(batch):
    ledger, batch_id, images = batch
    chunks = list(iter_zip_stream(ledger, batch_id, image_root=images))
    assert len(chunks) > 3 and max(len(c) for c in chunks) <= (1 << 20) + 4096  # never the whole batch at once
    archive = zipfile.ZipFile(io.BytesIO(b"".join(chunks)))
    assert archive.testzip() is None
    assert archive.read("images/Cat_red.png") == (images / "Cat_red.png").read_bytes()
    assert len(read_csv(archive.read("manifest.csv"))) == 5


def test_zip_to_a_file_object_and_missing_or_changed_images_are_reported(batch):
    ledger, batch_id, images = batch
    (images / "cat_red_2.png").unlink()
    (images / "_CON.png").write_bytes(PNG + b"tampered")
    buffer = io.BytesIO()
    summary = write_batch_zip(ledger, batch_id, buffer, image_root=images)
    assert any("row 3: image file missing" in p for p in summary.problems)
    assert any("row 4" in p and "sha256" in p for p in summary.problems)
    archive = zipfile.ZipFile(buffer)
    manifest = {m["row"]: m for m in read_csv(archive.read("manifest.csv"))}
    assert manifest["3"]["file"] == "" and "missing" in manifest["3"]["error"]
    assert "sha256 mismatch" in manifest["4"]["error"]


def test_files_of_several_folders_with_one_name_stay_apart_in_the_zip(batch, tmp_path):
    ledger, batch_id, images = batch
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "Cat_red.png").write_bytes(PNG)
    row = next(r for r in ledger.rows(batch_id) if r.row_number == 3)
    ledger.conn.execute("UPDATE generations SET image_path = ?, images = NULL, image_sha256 = NULL WHERE row_key = ?",
                        (str(other / "Cat_red.png"), row.row_key))
    summary = write_batch_zip(ledger, batch_id, io.BytesIO(), image_root=images)
    assert summary.images == ["images/Cat_red.png", "images/Cat_red_2.png", "images/_CON.png"]


def test_neutralise_csv_cell():
    for dangerous in ("=1+1", "+1", "-1", "@x", "\tx", "\rx"):
        assert neutralise_csv_cell(dangerous) == "'" + dangerous
    assert neutralise_csv_cell("safe = fine") == "safe = fine"
    assert neutralise_csv_cell(None) == "" and neutralise_csv_cell(5) == "5"
