"""ComfyUI's official SD3/SD3.5 example workflows and the source article's list-format workflow, run
end to end on the demo model (checkpoint names rewritten, small sizes and few steps for the CPU)."""

import copy
import json
from pathlib import Path

import pytest
from PIL import Image
from test_workflow_parse import SOURCE_ARTICLE_EXAMPLE

from engine.errors import ModelLoadError
from engine.runtime import Engine
from engine.settings import DEMO_CHECKPOINT, Settings

EXAMPLES = Path(__file__).parent / "data" / "comfyui-examples"
RUNNABLE_API_EXAMPLES = sorted(p.name for p in EXAMPLES.glob("*.api.json") if "controlnet" not in p.name)
SIZE, STEPS = 64, 2



@pytest.fixture(scope="module")
def engine(tmp_path_factory, models_dir):
    root = tmp_path_factory.mktemp("workflows")
    return Engine(Settings(data_dir=str(root / "data"), models_dir=str(models_dir), device="cpu"))


def shrink_api(workflow: dict) -> dict:
    """Point checkpoints at the demo and make the run small."""
    workflow = copy.deepcopy(workflow)
    for node in workflow.values():
        inputs = node["inputs"]
        if node["class_type"] == "CheckpointLoaderSimple":
            inputs["ckpt_name"] = DEMO_CHECKPOINT
        if node["class_type"] in ("EmptySD3LatentImage", "EmptyLatentImage"):
            inputs.update(width=SIZE, height=SIZE)
        if node["class_type"] == "KSampler":
            inputs["steps"] = STEPS
    return workflow


def read_text_chunks(path: str) -> dict:
    with Image.open(path) as image:
        return {k: json.loads(v) for k, v in image.text.items()}


@pytest.mark.parametrize("name", [n for n in RUNNABLE_API_EXAMPLES if "text_encoders" not in n])
def test_official_api_example_runs(engine, tmp_path, name):
    workflow = shrink_api(json.loads((EXAMPLES / name).read_text()))
    result = engine.run(workflow, output_dir=tmp_path)
    assert len(result.images) == 1
    image = result.images[0]
    assert Path(image.path).is_file() and image.filename == "ComfyUI_00001_.png"
    assert (image.width, image.height) == (SIZE, SIZE)
    assert result.outputs["9"] == {"images": [{"filename": "ComfyUI_00001_.png", "subfolder": "", "type": "output"}]}
    sampler = next(n for n in workflow.values() if n["class_type"] == "KSampler")["inputs"]
    assert result.record["seed"] == sampler["seed"] and result.record["scheduler"] == sampler["scheduler"]
    chunks = read_text_chunks(image.path)
    assert chunks["prompt"] == engine.parse(workflow).to_api()


def demo_sized_ui_example() -> dict:
    """ComfyUI's SD3.5 UI example on the demo model, small and quick."""
    ui = json.loads((EXAMPLES / "sd3.5_simple_example.ui.json").read_text())
    for node in ui["nodes"]:
        if node["type"] == "CheckpointLoaderSimple":
            node["widgets_values"][0] = DEMO_CHECKPOINT
        if node["type"] == "EmptySD3LatentImage":
            node["widgets_values"][:2] = [SIZE, SIZE]
        if node["type"] == "KSampler":
            node["widgets_values"][2] = STEPS  # [seed, control_after_generate, steps, ...]
    return ui


def test_official_ui_example_runs_and_embeds_the_ui_json(engine, tmp_path):
    ui = demo_sized_ui_example()
    result = engine.run(ui, output_dir=tmp_path)
    chunks = read_text_chunks(result.images[0].path)
    assert chunks["workflow"] == ui
    assert chunks["prompt"]["3"]["inputs"]["steps"] == STEPS
    assert result.record["sampler"] == "euler" and result.record["scheduler"] == "sgm_uniform"


def test_ui_node_saved_before_its_last_widgets_existed_runs_with_their_defaults(engine, tmp_path):
    """A VAEDecodeTiled saved before temporal_size and temporal_overlap were added: [tile_size, overlap]."""
    ui = demo_sized_ui_example()
    for node in ui["nodes"]:
        if node["type"] == "VAEDecode":
            node.update(type="VAEDecodeTiled", widgets_values=[512, 64])
    result = engine.run(ui, output_dir=tmp_path)
    assert (result.images[0].width, result.images[0].height) == (SIZE, SIZE)
    decode = read_text_chunks(result.images[0].path)["prompt"]["8"]
    assert decode["class_type"] == "VAEDecodeTiled"
    widgets = {k: v for k, v in decode["inputs"].items() if k not in ("samples", "vae")}
    assert widgets == {"tile_size": 512, "overlap": 64, "temporal_size": 64, "temporal_overlap": 8}


def test_ui_workflow_with_a_subgraph_runs_its_inner_nodes(engine, tmp_path):
    """The positive prompt's encoder inside a subgraph whose text is a widget on the instance, as the
    frontend saves it after "Convert to Subgraph" and promoting the text widget."""
    ui = demo_sized_ui_example()
    encoder = next(n for n in ui["nodes"] if n["id"] == 16)
    subgraph_id = "5d2a7c1e-8b3f-4e6a-9c0d-1f2e3a4b5c6d"
    ui["nodes"].remove(encoder)
    ui["nodes"].append({
        "id": 16, "type": subgraph_id, "mode": 0,
        "inputs": [{"name": "clip", "type": "CLIP", "link": 101},
                   {"name": "text", "type": "STRING", "link": None, "widget": {"name": "text"}}],
        "outputs": [{"name": "CONDITIONING", "type": "CONDITIONING", "links": [21]}],
        "widgets_values": ["a lighthouse at dusk"],
    })
    inner = {**encoder, "id": 1, "inputs": [{"name": "clip", "type": "CLIP", "link": 1},
                                            {"name": "text", "type": "STRING", "link": 2, "widget": {"name": "text"}}],
             "outputs": [{"name": "CONDITIONING", "type": "CONDITIONING", "links": [3]}]}
    ui["definitions"] = {"subgraphs": [{
        "id": subgraph_id, "name": "Prompt", "nodes": [inner],
        "inputs": [{"name": "clip", "type": "CLIP"}, {"name": "text", "type": "STRING"}],
        "outputs": [{"name": "CONDITIONING", "type": "CONDITIONING"}],
        "links": [{"id": 1, "origin_id": -10, "origin_slot": 0, "target_id": 1, "target_slot": 0, "type": "CLIP"},
                  {"id": 2, "origin_id": -10, "origin_slot": 1, "target_id": 1, "target_slot": 1, "type": "STRING"},
                  {"id": 3, "origin_id": 1, "origin_slot": 0, "target_id": -20, "target_slot": 0,
                   "type": "CONDITIONING"}],
    }]}
    result = engine.run(ui, output_dir=tmp_path)
    assert result.record["prompt"] == "a lighthouse at dusk"
    chunks = read_text_chunks(result.images[0].path)
    assert chunks["prompt"]["3"]["inputs"]["positive"] == ["16:1", 0]
    assert chunks["prompt"]["16:1"]["inputs"]["text"] == "a lighthouse at dusk"
    assert chunks["workflow"] == ui


def test_source_article_list_workflow_runs(engine, tmp_path):
    workflow = copy.deepcopy(SOURCE_ARTICLE_EXAMPLE)
    for node in workflow["nodes"]:
        if node["type"] == "LoadCheckpoint":
            node["values"]["ckpt_name"] = DEMO_CHECKPOINT
        if node["type"] == "EmptyLatentImage":
            node["values"].update(width=SIZE, height=SIZE)  # 4-channel placeholder, adapted by KSampler
        if node["type"] == "KSampler":
            node["values"]["steps"] = STEPS
    result = engine.run(workflow, output_dir=tmp_path)
    assert [i.filename for i in result.images] == ["SD35_FP8_Batch_00001_.png"]
    assert result.record["prompt"] == result.record["negative_prompt"] == "cyberpunk city, neon lights, raining"
    assert (result.record["width"], result.record["height"]) == (SIZE, SIZE)


@pytest.fixture(scope="module")
def separate_files_models(tmp_path_factory, demo_components):
    """A models folder like the text-encoder example expects: a checkpoint without text encoders and
    separate clip_l / clip_g / t5xxl files (the T5 a tiny random one)."""
    import torch
    from safetensors.torch import save_file
    from transformers import T5Config, T5EncoderModel

    from engine.models.checkpoint import (
        CONFIG_METADATA_KEY,
        checkpoint_metadata,
        write_checkpoint,
    )
    from engine.models.demo import DEMO_MARKER

    root = tmp_path_factory.mktemp("separate_models")
    demo = {"engine.demo": DEMO_MARKER}
    write_checkpoint(root / "checkpoints" / "sd3.5_large.safetensors", transformer=demo_components["transformer"],
                     vae=demo_components["vae"], metadata=demo)
    for role, module in (("clip_l", demo_components["text_encoder"]), ("clip_g", demo_components["text_encoder_2"])):
        # the demo transformer's context is 96 wide (real SD3: 4096); the files say so for the loader
        metadata = checkpoint_metadata(**{role: module})
        config = json.loads(metadata[CONFIG_METADATA_KEY])
        config["transformer"] = {"joint_attention_dim": int(demo_components["transformer"].config.joint_attention_dim)}
        metadata.update(demo, **{CONFIG_METADATA_KEY: json.dumps(config)})
        write_checkpoint(root / "text_encoders" / f"{role}.safetensors", **{role: module}, metadata=metadata)
    torch.manual_seed(0)
    t5 = T5EncoderModel(T5Config(vocab_size=64, d_model=96, d_kv=8, d_ff=32, num_layers=1, num_heads=2))
    # ComfyUI's t5xxl files store the embedding once (shared.weight), without the tied copy
    state = {k: v.contiguous() for k, v in t5.state_dict().items() if k != "encoder.embed_tokens.weight"}
    save_file(state, str(root / "text_encoders" / "t5xxl_fp16.safetensors"))
    return root


def test_text_encoders_example_with_clip_files(tmp_path, separate_files_models):
    """The official text-encoder example's graph (checkpoint without encoders + TripleCLIPLoader)."""
    engine = Engine(Settings(data_dir=str(tmp_path / "data"), models_dir=str(separate_files_models), device="cpu"))
    workflow = json.loads((EXAMPLES / "sd3.5_text_encoders_example.api.json").read_text())
    for node in workflow.values():
        if node["class_type"] == "EmptySD3LatentImage":
            node["inputs"].update(width=SIZE, height=SIZE)
        if node["class_type"] == "KSampler":
            node["inputs"]["steps"] = STEPS
    engine.validate(workflow)  # every model name resolves to a file
    try:
        result = engine.run(workflow, output_dir=tmp_path)
    except ModelLoadError as exc:
        # A real T5 needs its tokenizer; the tiny random T5 here has none on disk.
        assert "t5xxl tokenizer" in exc.message
        without_t5 = copy.deepcopy(workflow)
        without_t5["43"] = {"class_type": "DualCLIPLoader", "inputs": {
            "clip_name1": "clip_l.safetensors", "clip_name2": "clip_g.safetensors", "type": "sd3"}}
        result = engine.run(without_t5, output_dir=tmp_path)
    assert result.record["model_name"] == "sd3.5_large.safetensors"
    assert len(result.record["model_hash"]) == 64
    assert Path(result.images[0].path).is_file()


def test_checkpoint_without_clip_used_for_text_is_a_clear_error(tmp_path, separate_files_models):
    engine = Engine(Settings(data_dir=str(tmp_path / "data"), models_dir=str(separate_files_models), device="cpu"))
    workflow = shrink_api(json.loads((EXAMPLES / "sd3.5_simple_example.api.json").read_text()))
    workflow["4"]["inputs"]["ckpt_name"] = "sd3.5_large.safetensors"
    with pytest.raises(Exception, match="holds no text encoders") as info:
        engine.run(workflow, output_dir=tmp_path)
    assert info.value.class_type == "CLIPTextEncode"
