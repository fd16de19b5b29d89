"""Spreadsheets that name product photos: the photos zip/folder (engine/image_refs.py), the validation
report's image problems, batches whose rows read the photos (local and on a worker without the uploads
folder), the shipped templates on a fresh install, the CLI's --images and the web handlers."""

from __future__ import annotations

import io
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.jobs import RowJob
from engine.rows import RowExecutor
from engine.errors import BatchMismatch, SheetError, TemplateError
from engine.image_refs import ImageLibrary, ImageLimits, workflow_image_names
from engine.runtime import Engine
from engine.services import build_services
from engine.settings import Settings, load_settings
from engine.sheets import read_sheet
from engine.templates import TemplateLibrary, parse_template

ROOT = Path(__file__).resolve().parents[1]

PHOTO_TEMPLATE = {
    "name": "photo_restyle",
    "title": "Restyle a product photo (img2img)",
    "filename_pattern": "{product_name}",
    "fields": [
        {"name": "product_name", "type": "string", "required": True},
        {"name": "product_photo", "type": "image", "required": True, "example": "sneaker.png"},
        {"name": "seed", "type": "seed"},
        {"name": "checkpoint", "type": "checkpoint"},
    ],
}
PHOTO_WORKFLOW = """{
  "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": {{ checkpoint }}}},
  "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": {{ "photo of " ~ product_name }}}},
  "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
  "10": {"class_type": "LoadImage", "inputs": {"image": {{ product_photo }}, "upload": "image"}},
  "11": {"class_type": "ImageScale", "inputs": {"image": ["10", 0], "upscale_method": "bilinear",
         "width": 64, "height": 64, "crop": "center"}},
  "12": {"class_type": "VAEEncode", "inputs": {"pixels": ["11", 0], "vae": ["1", 2]}},
  "5": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0],
        "latent_image": ["12", 0], "seed": {{ seed }}, "steps": 2, "cfg": 3.0, "sampler_name": "euler",
        "scheduler": "simple", "denoise": 0.6}},
  "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
  "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "photo"}}
}"""


def photo_bytes(color: tuple[int, int, int], fmt: str = "PNG", size: int = 48) -> bytes:
    pixels = np.zeros((size, size, 3), dtype=np.uint8)
    pixels[...] = color
    pixels[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = [255 - c for c in color]
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def make_zip(members: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def photos_zip() -> bytes:
    return make_zip({
        "Photos/Sneaker.PNG": photo_bytes((200, 40, 40)),
        "Photos/mug.jpg": photo_bytes((40, 40, 200), "JPEG"),
        "Photos/broken.png": b"\x89PNG\r\n\x1a\n not really a png",
        "Photos/notes.txt": b"not a photo",
        "__MACOSX/Photos/._mug.jpg": b"resource fork",
    })


SHEET = """product_name,Product_Photo
Red sneaker,sneaker.png
Blue mug,photos\\MUG.JPG
Lamp,lamp.png
Broken,broken.png
"""


# ----------------------------------------------------------------------------------- the photo library


def test_zip_keeps_readable_photos_and_matches_names_by_basename_ignoring_case(tmp_path):
    library = ImageLibrary.from_zip(photos_zip(), tmp_path / "images")

    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["Sneaker.PNG", "mug.jpg"]
    assert library.names() == ["mug.jpg", "Sneaker.PNG"]
    assert library.check("sneaker.png") is None and library.resolve("SNEAKER.png") == "Sneaker.PNG"
    assert library.resolve("shop/Mug.JPG") == "mug.jpg" and library.resolve("shop\\mug.jpg") == "mug.jpg"
    assert library.path("mug.jpg") == tmp_path / "images" / "mug.jpg"
    assert "cannot be read as an image" in library.check("broken.png")
    missing = library.check("lamp.png")
    assert "'lamp.png' is not in the uploaded photos" in missing and "mug.jpg, Sneaker.PNG" in missing
    assert "supported" in library.check("notes.txt")
    assert "Photos/notes.txt" in library.skipped and "__MACOSX/Photos/._mug.jpg" in library.skipped
    with pytest.raises(SheetError, match="lamp.png"):
        library.resolve("lamp.png")


def test_folder_library_reads_the_photos_directly_inside(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.webp").write_bytes(photo_bytes((1, 2, 3), "WEBP"))
    (tmp_path / "sub" / "b.png").write_bytes(photo_bytes((1, 2, 3)))
    library = ImageLibrary.from_folder(tmp_path)
    assert library.names() == ["a.webp"] and library.check("b.png") is not None
    with pytest.raises(SheetError, match="does not exist"):
        ImageLibrary.from_folder(tmp_path / "nowhere")


@pytest.mark.parametrize("name", ["../evil.png", "photos/../../evil.png", "/etc/evil.png", "C:/evil.png",
                                  "C:evil.png", "..\\evil.png", "\\\\server\\share\\evil.png"])
def test_zip_slip_names_are_refused_before_anything_is_written(tmp_path, name):
    data = make_zip({"ok.png": photo_bytes((9, 9, 9)), name: photo_bytes((9, 9, 9))})
    with pytest.raises(SheetError, match="refused"):
        ImageLibrary.from_zip(data, tmp_path / "images")
    assert not (tmp_path / "images").exists() and not (tmp_path / "evil.png").exists()


def test_zip_bombs_are_refused(tmp_path):
    zeros = make_zip({"bomb.png": b"\0" * (3 * 1024 * 1024)}, zipfile.ZIP_DEFLATED)
    with pytest.raises(SheetError, match="zip bomb"):
        ImageLibrary.from_zip(zeros, tmp_path / "a")
    many = make_zip({f"p{i}.png": b"x" for i in range(12)})
    with pytest.raises(SheetError, match="12 entries"):
        ImageLibrary.from_zip(many, tmp_path / "b", ImageLimits(max_members=10))
    big = make_zip({f"p{i}.png": photo_bytes((i, i, i)) for i in range(3)})
    with pytest.raises(SheetError, match="unpacks to more than"):
        ImageLibrary.from_zip(big, tmp_path / "c", ImageLimits(max_total_bytes=2 * len(photo_bytes((0, 0, 0)))))
    with pytest.raises(SheetError, match="not a valid zip"):
        ImageLibrary.from_zip(b"PK\x03\x04 truncated", tmp_path / "d")
    assert not any((tmp_path / n).exists() for n in "abcd")


def test_an_animated_photo_counts_the_pixels_of_every_frame(tmp_path):
    """LoadImage decodes every frame of an animated photo, so the pixel limit counts them all."""
    frames = [Image.new("RGB", (48, 48), (i * 40, 0, 0)) for i in range(5)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="PNG", save_all=True, append_images=frames[1:], duration=40)
    archive = make_zip({"flipbook.png": buffer.getvalue(), "still.png": photo_bytes((1, 2, 3))})
    library = ImageLibrary.from_zip(archive, tmp_path / "photos", ImageLimits(max_pixels=48 * 48 * 3))
    assert library.names() == ["still.png"]
    assert "5 frames of 48x48" in library.check("flipbook.png")
    assert not (tmp_path / "photos" / "flipbook.png").exists()


def test_names_equal_ignoring_case_and_folders_are_refused(tmp_path):
    data = make_zip({"a/shoe.png": photo_bytes((1, 1, 1)), "b/SHOE.png": photo_bytes((2, 2, 2))})
    with pytest.raises(SheetError, match="both named"):
        ImageLibrary.from_zip(data, tmp_path / "images")


# ------------------------------------------------------------------------------------- the templates


@pytest.fixture(scope="module")
def fresh_engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("fresh")
    return Engine(Settings(data_dir=str(root / "data"), models_dir=str(root / "models"), device="cpu"))


def test_every_shipped_template_loads_on_a_fresh_install(fresh_engine):
    library = TemplateLibrary(ROOT / "templates", validate_workflow=fresh_engine.validate)
    assert library.errors() == {}
    assert {"product_in_scene", "controlnet_layout", "brand_lora"} <= set(library.names())


def test_the_example_check_still_refuses_every_other_problem(fresh_engine):
    schema = json.dumps(PHOTO_TEMPLATE)
    parse_template(schema, PHOTO_WORKFLOW, validate_workflow=fresh_engine.validate)  # the photo is missing: fine
    bad_steps = PHOTO_WORKFLOW.replace('"steps": 2', '"steps": 0')
    with pytest.raises(TemplateError, match="steps"):
        parse_template(schema, bad_steps, validate_workflow=fresh_engine.validate)
    outside = PHOTO_WORKFLOW.replace("{{ product_photo }}", '{{ "../" ~ product_photo }}')
    with pytest.raises(TemplateError, match="outside the input folder"):
        parse_template(schema, outside, validate_workflow=fresh_engine.validate)


# ----------------------------------------------------------------------------------------- batches


@pytest.fixture
def services(tmp_path, models_dir):
    templates = tmp_path / "templates"
    shutil.copytree(ROOT / "templates", templates)
    (templates / "photo_restyle").mkdir()
    (templates / "photo_restyle" / "template.json").write_text(json.dumps(PHOTO_TEMPLATE))
    (templates / "photo_restyle" / "workflow.json.j2").write_text(PHOTO_WORKFLOW)
    settings = load_settings({"data_dir": str(tmp_path / "data"), "templates_dir": str(templates),
                              "models_dir": str(models_dir), "device": "cpu"})
    built = build_services(settings)
    yield built
    built.close()


def test_a_sheet_naming_photos_reports_the_missing_and_runs_the_rest(services, tmp_path):
    runner = services.runner
    sheet = read_sheet(SHEET.encode(), "rows.csv")
    images = runner.unpack_photos(photos_zip())
    staging = images.folder.parent
    prepared = runner.prepare("photo_restyle", sheet, batch_seed=3, images=images)

    bad = {r.number: r.problems for r in prepared.report.rows if not r.ok}
    assert sorted(bad) == [4, 5]
    assert [(p.row, p.column) for p in bad[4]] == [(4, "Product_Photo")]
    assert "not in the uploaded photos" in bad[4][0].reason and "Sneaker.PNG" in bad[4][0].reason
    assert "cannot be read as an image" in bad[5][0].reason
    assert [r["status"] for r in prepared.rows] == ["queued", "queued", "skipped", "skipped"]
    assert workflow_image_names(prepared.rows[1]["workflow"]) == ["mug.jpg"]  # the stored name

    batch_id = runner.start(prepared)
    assert not staging.exists()
    folder = runner.images_dir(batch_id)
    assert sorted(p.name for p in folder.iterdir()) == ["Sneaker.PNG", "mug.jpg"]
    summary = runner.run(batch_id)
    assert (summary.done, summary.skipped, summary.failed) == (2, 2, 0)

    rows = {r.row_number: r for r in services.ledger.rows(batch_id)}
    assert rows[2].status == rows[3].status == "done"
    assert rows[2].row_values["product_photo"] == "Sneaker.PNG"
    assert rows[4].status == "skipped" and "lamp.png" in rows[4].error
    first, second = (np.asarray(Image.open(rows[n].image_path)) for n in (2, 3))
    assert first.shape == (64, 64, 3) and not np.array_equal(first, second)
    assert runner.reference_images(batch_id, rows[2].row_values) == [folder / "Sneaker.PNG"]

    # Resume keeps the batch's own photos; other photos under the same batch id are refused.
    again = runner.prepare("photo_restyle", sheet, batch_id=batch_id)
    assert again.resumed and again.images.folder == folder and again.rows[0]["status"] == "queued"
    other = ImageLibrary.from_zip(make_zip({"sneaker.png": photo_bytes((1, 1, 1))}), tmp_path / "other")
    with pytest.raises(BatchMismatch, match="other photos"):
        runner.prepare("photo_restyle", sheet, batch_id=batch_id, images=other)


def cut_out_bytes(size: int = 48) -> bytes:
    """A product photo as inpainting wants it: the product opaque, the background transparent."""
    pixels = np.zeros((size, size, 4), dtype=np.uint8)
    pixels[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = (200, 40, 40, 255)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_the_shipped_product_in_scene_template_runs_on_uploaded_photos(services):
    photos = make_zip({"cutout.png": cut_out_bytes(), "mug.jpg": photo_bytes((40, 40, 200), "JPEG")})
    sheet = read_sheet(b"product_name,product_photo,width,height,steps,mode\n"
                       b"Shoe,cutout.png,256,256,1,inpaint\nMug,MUG.jpg,256,256,1,img2img\n"
                       b"Cup,mug.jpg,256,256,1,inpaint\n", "rows.csv")
    prepared = services.runner.prepare("product_in_scene", sheet, images=services.runner.unpack_photos(photos))
    summary = services.runner.run(services.runner.start(prepared))
    assert (summary.done, summary.failed) == (2, 1)
    # An opaque photo has nothing to repaint: the row says so instead of returning the photo as a "result"
    cup = next(r for r in services.ledger.rows(prepared.batch_id) if r.row_number == 4)
    assert cup.status == "failed" and "inpaint mask is empty" in cup.error and "transparent" in cup.error


def test_without_photos_an_image_row_is_refused_by_the_engine_check(services):
    sheet = read_sheet(b"product_name,product_photo\nShoe,shoe.png\n", "rows.csv")
    prepared = services.runner.prepare("photo_restyle", sheet)
    assert prepared.rows[0]["status"] == "skipped" and "shoe.png" in prepared.rows[0]["error"]


def test_a_worker_without_the_uploads_folder_gets_the_photos_in_the_job(services, tmp_path):
    runner = services.runner
    sheet = read_sheet(SHEET.encode(), "rows.csv")
    batch_id = runner.start(runner.prepare("photo_restyle", sheet, batch_seed=3, images=runner.unpack_photos(photos_zip())))
    batch = services.ledger.get_batch(batch_id)
    job = runner._job(batch, services.ledger.rows(batch_id)[0])
    assert job.input_dir == str(runner.images_dir(batch_id))

    wire = json.loads(json.dumps(job.to_dict()))
    assert set(wire["input_files"]) == {"Sneaker.PNG"}
    wire["input_dir"] = str(tmp_path / "not-on-this-machine")
    result = RowExecutor(services.engine).execute([RowJob.from_dict(wire)])[0]
    assert result.status == "done", result.error

    wire["input_files"] = {"../escape.png": wire["input_files"]["Sneaker.PNG"]}
    refused = RowExecutor(services.engine).execute([RowJob.from_dict(wire)])[0]
    assert refused.status == "failed" and "refused input file name" in refused.error


# ------------------------------------------------------------------------------------ CLI and web app


def test_cli_run_with_images(services, tmp_path, capsys):
    import app

    settings = services.settings
    sheet = tmp_path / "rows.csv"
    sheet.write_text(SHEET, encoding="utf-8")
    (tmp_path / "photos.zip").write_bytes(photos_zip())
    common = ["--data-dir", settings.data_dir, "--templates-dir", settings.templates_dir,
              "--models-dir", settings.models_dir, "--device", "cpu"]
    code = app.main(["run", "--template", "photo_restyle", "--sheet", str(sheet),
                     "--images", str(tmp_path / "photos.zip"), "--batch-seed", "5", *common])
    captured = capsys.readouterr()
    assert code == 1  # two rows were skipped
    assert "row 4: Product_Photo: image 'lamp.png' is not in the uploaded photos" in captured.err
    assert "2 done, 0 failed" in captured.out and "2 skipped" in captured.out
    assert not any((Path(settings.uploads_path) / ".staging").iterdir())


def test_web_handlers_check_and_start_a_batch_with_a_photos_zip(services, tmp_path):
    from webapp import handlers
    from webapp.guard import Caller

    sheet = tmp_path / "rows.csv"
    sheet.write_text(SHEET, encoding="utf-8")
    (tmp_path / "photos.zip").write_bytes(photos_zip())
    check = handlers.check_sheet(services, Caller("ann", "admin"), "photo_restyle", sheet,
                                 images_path=tmp_path / "photos.zip")
    assert (check.ok_rows, check.bad_rows) == (2, 2) and check.can_start
    assert "lamp.png" in check.rows[2][2]

    batch_id = handlers.start_batch(services, check.prepared)
    assert services.queue.wait(batch_id, timeout=120).state == "done"
    view = handlers.batch_view(services, batch_id)
    assert len(view.images) == 2
    assert sorted(Path(p[0]).name for p in view.references.values()) == ["Sneaker.PNG", "mug.jpg"]
    done = [r for r in services.ledger.rows(batch_id) if r.status == "done"]
    detail = handlers.generation_detail(services, done[0].row_key)
    assert [Path(p).name for p in detail["reference_images"]] == ["Sneaker.PNG"]
    assert handlers.reference_data_url(detail["reference_images"][0]).startswith("data:image/jpeg;base64,")


def test_api_upload_takes_a_photos_zip(services, tmp_path):
    from fastapi.testclient import TestClient

    from webapp.server import create_app

    app, _ = create_app(services.settings, services=services)
    with TestClient(app) as client:
        answer = client.post(
            "/api/batches/upload",
            data={"template": "photo_restyle", "start": "false"},
            files={"sheet": ("rows.csv", SHEET.encode(), "text/csv"),
                   "images": ("photos.zip", photos_zip(), "application/zip")},
        )
        assert answer.status_code == 200, answer.text
        report = {row["row"]: row for row in answer.json()["report"]["rows"]}
        assert answer.json()["queued_rows"] == 2 and not answer.json()["started"]
        assert [(p["row"], p["column"]) for p in report[4]["problems"]] == [(4, "Product_Photo")]
        slip = client.post(
            "/api/batches/upload", data={"template": "photo_restyle", "start": "false"},
            files={"sheet": ("rows.csv", SHEET.encode(), "text/csv"),
                   "images": ("photos.zip", make_zip({"../x.png": photo_bytes((1, 1, 1))}), "application/zip")},
        )
        assert slip.status_code == 400 and "refused" in slip.json()["error"]["message"]
    assert not any((Path(services.settings.uploads_path) / ".staging").iterdir())  # nothing kept


def test_a_later_batch_with_another_photo_of_the_same_name_uses_its_own_photo(services):
    runner = services.runner
    sheet = read_sheet(b"product_name,product_photo,seed\nShoe,shoe.png,1\n", "rows.csv")
    outputs = []
    for color in ((255, 0, 0), (0, 0, 255)):
        images = runner.unpack_photos(make_zip({"shoe.png": photo_bytes(color)}))
        batch_id = runner.start(runner.prepare("photo_restyle", sheet, images=images))
        runner.run(batch_id)
        outputs.append(np.asarray(Image.open(services.ledger.rows(batch_id)[0].image_path)))
    assert not np.array_equal(*outputs)


def test_a_zip_from_chinese_windows_with_gbk_names_matches_the_sheet(services):
    name = "产品图片ab.png"
    gbk = name.encode("gb18030")
    stand_in = b"X" * (len(gbk) - len(b"ab.png")) + b"ab.png"  # ASCII: written without the UTF-8 flag
    data = make_zip({stand_in.decode(): photo_bytes((10, 200, 10))}).replace(stand_in, gbk)
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        assert archive.infolist()[0].flag_bits & 0x800 == 0 and archive.namelist() != [name]  # cp437 garble
    library = services.runner.unpack_photos(data)
    try:
        assert library.check(name) is None and (library.folder / library.resolve(name)).is_file()
    finally:
        services.runner.discard_staging(library)
