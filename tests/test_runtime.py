"""The Engine facade (engine/runtime.py): parse, validate, run, run_batch, introspection."""

import json
from pathlib import Path

import pytest
from PIL import Image

import engine as engine_package
from engine.errors import ModelNotFound, WorkflowFormatError, WorkflowInvalid
from engine.runtime import Engine, RunResult
from engine.settings import DEMO_CHECKPOINT, Settings

EXAMPLE = Path(__file__).parent / "data" / "comfyui-examples" / "sd3.5_simple_example.api.json"


@pytest.fixture(scope="module")
def engine(tmp_path_factory, models_dir):
    root = tmp_path_factory.mktemp("runtime")
    return Engine(Settings(data_dir=str(root / "data"), models_dir=str(models_dir), device="cpu"))


def small_example(seed=1, ckpt=DEMO_CHECKPOINT, text=None):
    workflow = json.loads(EXAMPLE.read_text())
    workflow["4"]["inputs"]["ckpt_name"] = ckpt
    workflow["53"]["inputs"].update(width=64, height=64)
    workflow["3"]["inputs"].update(steps=2, seed=seed)
    if text is not None:
        workflow["16"]["inputs"]["text"] = text
    return workflow


def test_public_surface():
    assert {"Engine", "errors", "parse_workflow", "validate_workflow", "WorkflowInvalid"} <= set(engine_package.__all__)


def test_parse_and_validate(engine):
    with pytest.raises(WorkflowFormatError):
        engine.parse("[1, 2")
    bad = small_example(ckpt="nope.safetensors")
    bad["3"]["inputs"]["steps"] = 0
    with pytest.raises(WorkflowInvalid) as info:
        engine.validate(bad)
    kinds = {(p.input_name, p.type) for p in info.value.problems}
    assert kinds == {("ckpt_name", "value_not_in_list"), ("steps", "value_smaller_than_min")}
    assert engine.problems(small_example()) == []
    # a checkpoint file on disk is a valid choice (the demo written as a file)
    engine.validate(small_example(ckpt="sd35_demo_tiny.safetensors"))


def test_object_info_lists_model_files(engine):
    info = engine.object_info()
    choices = info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0]
    assert choices[0] == DEMO_CHECKPOINT and "sd35_demo_tiny.safetensors" in choices
    ksampler = info["KSampler"]["input"]["required"]
    assert ksampler["seed"][1]["max"] == 2**64 - 1 and "euler" in ksampler["sampler_name"][0]
    assert info["KSampler"]["input_order"]["required"][:4] == ["model", "seed", "steps", "cfg"]
    assert list(engine.object_info("KSampler")) == ["KSampler"]
    assert engine.object_info("LoadCheckpoint") == {"CheckpointLoaderSimple": info["CheckpointLoaderSimple"]}


def test_run_result_and_png_extra(engine, tmp_path):
    events = []
    result = engine.run(small_example(), output_dir=tmp_path, on_progress=events.append,
                        png_extra={"batch_id": "B7", "row": 3})
    assert isinstance(result, RunResult)
    assert result.timings["steps"] == 2 and result.timings["sampler_s"] > 0
    assert set(result.timings["per_node"]) == {"3", "4", "8", "9", "16", "40", "53"}
    assert [(e.value, e.maximum) for e in events if e.kind == "step"] == [(1, 2), (2, 2)]
    assert all(e.row_index == 0 for e in events)
    with Image.open(result.images[0].path) as image:
        assert json.loads(image.text["batch_id"]) == "B7" and json.loads(image.text["row"]) == 3
        assert "workflow" not in image.text  # an API-format run has no UI JSON to embed


def test_run_batch_keeps_rows_apart(engine, tmp_path):
    rows = [small_example(seed=1, text="a lighthouse"), {"not": "a workflow"},
            small_example(seed=2, text="a harbour"), small_example(ckpt="missing.safetensors")]
    events = []
    results = engine.run_batch(rows, output_dir=tmp_path, on_progress=events.append,
                               png_extra=[{"row": i} for i in range(4)])
    assert isinstance(results[0], RunResult) and isinstance(results[2], RunResult)
    assert isinstance(results[1], WorkflowFormatError) and isinstance(results[3], WorkflowInvalid)
    assert (results[0].record["seed"], results[2].record["seed"]) == (1, 2)
    assert results[2].record["prompt"] == "a harbour"
    assert {e.row_index for e in events if e.kind == "step"} == {0, 2}
    with Image.open(results[2].images[0].path) as image:
        assert json.loads(image.text["row"]) == 2


def test_vae_tiled_run(engine, tmp_path):
    workflow = small_example()
    workflow["53"]["inputs"].update(width=128, height=128)
    plain = engine.run(workflow, output_dir=tmp_path)
    tiled = engine.run(workflow, output_dir=tmp_path, vae_tiled=True)
    assert tiled.images[0].width == plain.images[0].width == 128


def test_system_info_and_switch_model(engine):
    engine.run(small_example(), output_dir=engine.settings.outputs_path)
    info = engine.system_info()
    assert info["device"] == "cpu" and info["demo_in_use"] is True
    assert {"torch", "diffusers", "transformers", "python"} <= set(info["versions"])
    assert any(m["name"] == DEMO_CHECKPOINT for m in info["loaded_models"])
    assert DEMO_CHECKPOINT in engine.available_checkpoints()
    with pytest.raises(ModelNotFound):
        engine.switch_model("absent.safetensors")
    engine.switch_model("sd35_demo_tiny.safetensors")
    assert engine.default_checkpoint == "sd35_demo_tiny.safetensors" and not engine.system_info()["demo_in_use"]
    assert all(m["name"] != DEMO_CHECKPOINT for m in engine.models.loaded() if m["kind"] == "checkpoint")
    assert "sd35_demo_tiny.safetensors" in engine.describe_model_banner()


@pytest.mark.gpu
def test_workflow_on_cuda(tmp_path, models_dir):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    gpu = Engine(Settings(data_dir=str(tmp_path / "data"), models_dir=str(models_dir), device="cuda"))
    cpu = Engine(Settings(data_dir=str(tmp_path / "cpu"), models_dir=str(models_dir), device="cpu",
                          precision="fp32"))
    workflow = small_example(seed=77)
    on_gpu = gpu.run(workflow, output_dir=tmp_path / "gpu")
    assert on_gpu.record["precision"] == "bf16" and gpu.system_info()["gpu"]["name"]
    gpu32 = Engine(Settings(data_dir=str(tmp_path / "d32"), models_dir=str(models_dir), device="cuda",
                            precision="fp32"))
    a = gpu32.run(workflow, output_dir=tmp_path / "g32")
    b = cpu.run(workflow, output_dir=tmp_path / "c32")
    import numpy

    pa, pb = (numpy.asarray(Image.open(r.images[0].path), dtype=numpy.int16) for r in (a, b))
    assert numpy.abs(pa - pb).max() <= 8  # same seed, same image on any device (up to float rounding)


def test_png_compress_level_changes_the_file_not_the_picture(tmp_path, models_dir):
    import numpy as np

    from engine.errors import EngineError

    sizes, pixels = {}, {}
    for level in (0, 9):
        engine = Engine(Settings(data_dir=str(tmp_path / str(level)), models_dir=str(models_dir), png_compress_level=level))
        (image,) = engine.run(small_example(seed=5), output_dir=tmp_path / f"out{level}").images
        sizes[level] = Path(image.path).stat().st_size
        with Image.open(image.path) as png:
            pixels[level] = np.asarray(png.convert("RGB"))
            assert "prompt" in png.info  # the ComfyUI metadata rides along at any level
    assert sizes[0] > sizes[9]
    assert np.array_equal(pixels[0], pixels[9])
    with pytest.raises(EngineError, match="png_compress_level"):
        Engine(Settings(data_dir=str(tmp_path / "bad"), models_dir=str(models_dir), png_compress_level=12))


def test_switching_to_a_file_that_cannot_load_keeps_the_default_and_sidecars_are_no_models(tmp_path, models_dir):
    import shutil

    from engine.errors import ModelLoadError

    models = tmp_path / "models"
    shutil.copytree(models_dir, models)
    good = (models / "checkpoints" / "sd35_demo_tiny.safetensors").read_bytes()
    (models / "checkpoints" / "trunc.safetensors").write_bytes(good[: len(good) // 3])
    (models / "checkpoints" / "sd35_demo_tiny.fp8scales.safetensors").write_bytes(good[:64])
    engine = Engine(Settings(data_dir=str(tmp_path / "data"), models_dir=str(models), device="cpu"))
    assert "sd35_demo_tiny.fp8scales.safetensors" not in engine.available_checkpoints()
    assert "trunc.safetensors" in engine.available_checkpoints()
    before = engine.default_checkpoint
    with pytest.raises(ModelLoadError):
        engine.switch_model("trunc.safetensors")
    assert engine.default_checkpoint == before
    engine.run(small_example(), output_dir=engine.settings.outputs_path)  # rows still run
