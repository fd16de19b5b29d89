"""SaveImage / PreviewImage / VAEDecode: file naming, refusals, metadata, blank-output detection."""

import json
import re
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from engine.errors import BadOutput, ExecutionError, WorkflowInvalid
from engine.nodes import default_registry
from engine.nodes.context import NodeContext
from engine.nodes.image import PreviewImage, SaveImage, check_images, expand_prefix
from engine.validate import validate_workflow
from engine.workflow import parse_workflow


@pytest.fixture
def ctx(tmp_path):
    context = NodeContext(models=None, output_dir=tmp_path / "out", temp_dir=tmp_path / "temp")
    context.node_id, context.class_type = "9", "SaveImage"
    context.png_metadata = {"prompt": {"1": {"class_type": "X", "inputs": {"a": 1}}},
                            "workflow": {"nodes": []}, "batch_id": "b-1"}
    return context


def gradient(batch=1, height=24, width=32):
    ramp = torch.linspace(0, 1, width).repeat(height, 1)
    return torch.stack([ramp, ramp.flip(1), ramp * 0.5], dim=-1).repeat(batch, 1, 1, 1)


def test_names_counters_and_ui(ctx):
    first = SaveImage().run(ctx, gradient(batch=2), filename_prefix="run")
    second = SaveImage().run(ctx, gradient(), filename_prefix="run")
    names = [i["filename"] for i in first["ui"]["images"] + second["ui"]["images"]]
    assert names == ["run_00001_.png", "run_00002_.png", "run_00003_.png"]
    assert first["ui"]["images"][0] == {"filename": "run_00001_.png", "subfolder": "", "type": "output"}
    saved = ctx.saved_images[0]
    assert (saved.width, saved.height, saved.node_id, saved.type) == (32, 24, "9", "output")
    assert len(saved.sha256) == 64 and Path(saved.path).parent == ctx.output_dir.resolve()
    (ctx.output_dir / "run_00041_.png").write_bytes(b"")  # ComfyUI continues after the highest counter
    assert SaveImage().run(ctx, gradient(), "run")["ui"]["images"][0]["filename"] == "run_00042_.png"
    assert not [p for p in ctx.output_dir.iterdir() if p.name.endswith(".tmp")]


def test_subfolder_and_variables(ctx):
    result = SaveImage().run(ctx, gradient(), filename_prefix="batch/%width%x%height%/img_%year%")
    entry = result["ui"]["images"][0]
    assert entry["subfolder"] == "batch/32x24"
    assert re.fullmatch(rf"img_{time.localtime().tm_year}_00001_\.png", entry["filename"])
    assert (ctx.output_dir / "batch" / "32x24" / entry["filename"]).is_file()
    now = time.struct_time((2025, 3, 4, 5, 6, 7, 0, 0, 0))
    assert expand_prefix("%year%-%month%-%day% %hour%:%minute%:%second%", 1, 2, now) == "2025-03-04 05:06:07"


@pytest.mark.parametrize("prefix", ["../escape", "a/../../escape", "/tmp/absolute", "..", "sub/.."])
def test_paths_outside_the_output_folder_are_refused(ctx, prefix):
    with pytest.raises(ExecutionError) as info:
        SaveImage().run(ctx, gradient(), filename_prefix=prefix)
    assert info.value.node_id == "9" and "outside the output folder" in info.value.message
    assert not ctx.saved_images


def test_symlinked_subfolder_leading_out_is_refused(ctx, tmp_path):
    ctx.output_dir.mkdir(parents=True)
    (ctx.output_dir / "link").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(ExecutionError):
        SaveImage().run(ctx, gradient(), filename_prefix="link/x")


def save_problems(prefix, ctx=None):
    """Validation problems of a LoadImage -> SaveImage workflow saving under ``prefix``."""
    registry = default_registry()
    api = {"1": {"class_type": "LoadImage", "inputs": {"image": "x.png"}},
           "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": prefix}}}
    return [p for p in validate_workflow(parse_workflow(api, registry), registry, ctx) if p.node_id == "2"]


@pytest.mark.parametrize("prefix", ["../escape", "a/../../escape", "/etc/x", "..", "sub/..", "..\\x"])
def test_unsafe_prefixes_are_refused_by_validation_before_anything_runs(prefix):
    problems = save_problems(prefix)
    assert [(p.type, p.input_name) for p in problems] == [("custom_validation_failed", "filename_prefix")]
    assert "outside the output folder" in problems[0].message and prefix in problems[0].message
    body = WorkflowInvalid(problems).to_comfy()  # what ComfyUI's /prompt answers with (a 400)
    error = body["node_errors"]["2"]["errors"][0]
    assert error["type"] == "custom_validation_failed" and error["extra_info"]["input_name"] == "filename_prefix"


def test_validation_and_saving_apply_one_rule(ctx, tmp_path):
    assert save_problems("batch/%width%x%height%/img_%year%", ctx) == []
    assert save_problems("ComfyUI", ctx) == []
    ctx.output_dir.mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (ctx.output_dir / "link").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    problem, = save_problems("link/x", ctx)  # the output folder on disk is checked when validation knows it
    assert problem.type == "custom_validation_failed" and "linked folder" in problem.message
    with pytest.raises(ExecutionError, match="linked folder"):
        SaveImage().run(ctx, gradient(), filename_prefix="link/x")


def test_png_metadata_round_trip(ctx):
    SaveImage().run(ctx, gradient(), filename_prefix="meta")
    with Image.open(ctx.saved_images[0].path) as image:
        chunks = dict(image.text)
        pixels = torch.from_numpy(__import__("numpy").array(image))
    assert list(chunks) == ["prompt", "workflow", "batch_id"]  # prompt first, as ComfyUI writes it
    assert json.loads(chunks["prompt"]) == ctx.png_metadata["prompt"]
    assert json.loads(chunks["workflow"]) == {"nodes": []}
    assert json.loads(chunks["batch_id"]) == "b-1"
    assert torch.allclose(pixels.float() / 255, gradient()[0], atol=1 / 255 + 1e-6)


def test_preview_writes_to_temp(ctx):
    result = PreviewImage().run(ctx, gradient())
    entry = result["ui"]["images"][0]
    assert entry["type"] == "temp" and entry["filename"].startswith("ComfyUI_temp_")
    assert (ctx.temp_dir / entry["filename"]).is_file()
    assert not ctx.output_dir.exists()
    assert not SaveImage.cacheable and not PreviewImage.cacheable


def test_blank_and_nan_images_are_bad_output(ctx):
    with pytest.raises(BadOutput, match="blank"):
        check_images(ctx, torch.zeros(1, 8, 8, 3))
    with pytest.raises(BadOutput, match="blank"):
        check_images(ctx, torch.full((1, 8, 8, 3), 0.7))
    nan = gradient()
    nan[0, 0, 0, 0] = float("nan")
    with pytest.raises(BadOutput, match="NaN") as info:
        check_images(ctx, torch.cat([gradient(), nan]))
    assert info.value.details["image_index"] == 1
    check_images(ctx, gradient())  # a real image passes
