"""Parsing the three workflow formats into one graph model (engine.workflow)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from arithmetic_nodes import arithmetic_registry
from engine.errors import WorkflowFormatError
from engine.workflow import GraphNode, Link, Workflow, parse_workflow

EXAMPLES = Path(__file__).parent / "data" / "comfyui-examples"
SOURCE_ARTICLE_EXAMPLE = {
    "nodes": [
        {"id": 1, "type": "LoadCheckpoint", "inputs": {}, "values": {"ckpt_name": "sd3.5_fp8.safetensors"}},
        {"id": 2, "type": "CLIPTextEncode", "inputs": {"clip": [1, "CLIP"]},
         "values": {"text": "cyberpunk city, neon lights, raining"}},
        {"id": 3, "type": "KSampler",
         "inputs": {"model": [1, "MODEL"], "positive": [2, 0], "negative": [2, 0], "latent_image": [4, 0]},
         "values": {"seed": 12345, "steps": 30, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal"}},
        {"id": 4, "type": "EmptyLatentImage", "values": {"width": 1024, "height": 1024}},
        {"id": 5, "type": "VAEDecode", "inputs": {"vae": [1, "VAE"], "samples": [3, 0]}},
        {"id": 6, "type": "SaveImage", "inputs": {"images": [5, 0]},
         "values": {"filename_prefix": "SD35_FP8_Batch"}},
    ]
}

# One graph, written in each format: 5 + 7 -> Pick(seed 123, sum, x2, label "x") -> Show(value, label).
API = {
    "1": {"class_type": "Number", "inputs": {"value": 5}},
    "2": {"class_type": "Number", "inputs": {"value": 7}},
    "3": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": ["2", 0]}},
    "4": {"class_type": "Pick",
          "inputs": {"number": ["3", 0], "seed": 123, "mode": "sum", "scale": 2.0, "label": "x"}},
    "5": {"class_type": "Show", "inputs": {"value": ["4", 0], "label": ["4", 1]}, "_meta": {"title": "Result"}},
}
LIST = {
    "nodes": [
        {"id": 1, "type": "Integer", "values": {"value": 5}},
        {"id": 2, "type": "Number", "inputs": {}, "values": {"value": 7}},
        {"id": 3, "type": "Add", "inputs": {"a": [1, "INT"], "b": [2, 0]}},
        {"id": 4, "type": "Pick", "inputs": {"number": [3, "INT"]},
         "values": {"seed": 123, "mode": "sum", "scale": 2.0, "label": "x"}},
        {"id": 5, "type": "Show", "title": "Result", "inputs": {"value": [4, 0], "label": [4, "LABEL"]}},
    ]
}


def ui_node(node_id, node_type, inputs=(), widgets=None, outputs=(), mode=0, **extra):
    node = {
        "id": node_id, "type": node_type, "mode": mode, "flags": {}, "order": 0, "pos": [0, 0],
        "inputs": [dict(i) for i in inputs],
        "outputs": [{"name": t, "type": t, "links": links} for t, links in outputs],
        "properties": {},
        **extra,
    }
    if widgets is not None:
        node["widgets_values"] = widgets
    return node


def ui_fixture() -> dict:
    """The API graph above as the editor saves it: a Note, a Reroute, converted widgets, a seed control."""
    return {
        "last_node_id": 11,
        "last_link_id": 6,
        "nodes": [
            ui_node(1, "Number", widgets=[5], outputs=[("INT", [1])]),
            ui_node(2, "Integer", widgets=[7], outputs=[("INT", [2])]),
            # Both of Add's INT widgets were converted to inputs and linked; their stale values stay.
            ui_node(3, "Add", inputs=[{"name": "a", "type": "INT", "link": 1, "widget": {"name": "a"}},
                                      {"name": "b", "type": "INT", "link": 2, "widget": {"name": "b"}}],
                    widgets=[0, 0], outputs=[("INT", [3])]),
            ui_node(10, "Reroute", inputs=[{"name": "", "type": "*", "link": 3}], outputs=[("INT", [4])]),
            ui_node(4, "Pick",
                    inputs=[{"name": "number", "type": "INT", "link": 4, "widget": {"name": "number"}}],
                    widgets=[0, 123, "randomize", "sum", 2.0, "x"], outputs=[("INT", [5]), ("STRING", [6])]),
            ui_node(5, "Show", inputs=[{"name": "value", "type": "INT", "link": 5},
                                       {"name": "label", "type": "STRING", "link": 6}], title="Result"),
            ui_node(11, "Note", widgets=["a note for people, never run"]),
        ],
        "links": [
            [1, 1, 0, 3, 0, "INT"], [2, 2, 0, 3, 1, "INT"], [3, 3, 0, 10, 0, "INT"],
            [4, 10, 0, 4, 0, "INT"], [5, 4, 0, 5, 0, "INT"], [6, 4, 1, 5, 1, "STRING"],
        ],
        "groups": [], "config": {}, "extra": {}, "version": 0.4,
    }


@pytest.fixture
def registry():
    return arithmetic_registry()


def test_three_formats_parse_to_the_same_graph(registry):
    from_api = parse_workflow(API, registry)
    from_ui = parse_workflow(ui_fixture(), registry)
    from_list = parse_workflow(LIST, registry)
    assert (from_api.source_format, from_ui.source_format, from_list.source_format) == ("api", "ui", "list")
    assert from_api.nodes["4"] == GraphNode(
        "4", "Pick", {"number": Link("3", 0), "seed": 123, "mode": "sum", "scale": 2.0, "label": "x"}
    )
    assert from_api.nodes["5"].title == "Result"
    assert from_ui == from_api
    assert from_list == from_api


def test_text_input_is_parsed_as_json(registry):
    assert parse_workflow(json.dumps(API), registry) == parse_workflow(API, registry)


@pytest.mark.parametrize("source", [API, LIST, None])
def test_to_api_round_trips(registry, source):
    wf = parse_workflow(source if source is not None else ui_fixture(), registry)
    api = wf.to_api()
    json.dumps(api)  # plain JSON, ready for PNG metadata and /prompt
    assert parse_workflow(api, registry) == wf


def test_api_literal_lists_and_numeric_link_ids(registry):
    wf = parse_workflow(
        {"7": {"class_type": "Show", "inputs": {"value": [3, 0], "label": {"__value__": ["a", "b"]}}}}, registry
    )
    assert wf.nodes["7"].inputs == {"value": Link("3", 0), "label": ["a", "b"]}
    assert wf.to_api()["7"]["inputs"]["label"] == {"__value__": ["a", "b"]}
    assert parse_workflow(wf.to_api(), registry) == wf


def test_aliases_are_normalised(registry):
    wf = parse_workflow({"1": {"class_type": "Integer", "inputs": {"value": 1}}}, registry)
    assert wf.nodes["1"].class_type == "Number"


def test_ui_keeps_the_original_json(registry):
    data = ui_fixture()
    wf = parse_workflow(data, registry)
    assert wf.ui == data
    data["nodes"].clear()
    assert wf.ui["nodes"], "the kept UI JSON is a copy"
    assert parse_workflow(API, registry).ui is None


@pytest.mark.parametrize(
    "text, expected",
    [
        ('{"1": {"class_type": "Number", ', "not valid JSON"),
        ("[1, 2]", "a workflow is a JSON object, got list"),
        ('{"1": {"inputs": {}}}', "key '1' holds no class_type"),
        ('{"prompt": {"1": {"class_type": "Number", "inputs": {}}}, "client_id": "x"}', "/prompt request body"),
    ],
)
def test_unknown_shapes_are_format_errors(registry, text, expected):
    with pytest.raises(WorkflowFormatError) as caught:
        parse_workflow(text, registry)
    assert expected in caught.value.message


def test_bad_json_error_names_the_position(registry):
    with pytest.raises(WorkflowFormatError) as caught:
        parse_workflow('{\n  "1": oops\n}', registry)
    assert caught.value.details == {"line": 2, "column": 8}


def test_a_two_element_list_that_is_not_a_link_is_refused(registry):
    with pytest.raises(WorkflowFormatError, match="__value__"):
        parse_workflow({"1": {"class_type": "Show", "inputs": {"value": ["a", "b"]}}}, registry)


# --- UI format details -----------------------------------------------------------------------------------


def test_ui_muted_node_drops_its_dependents(registry):
    data = ui_fixture()
    data["nodes"][2]["mode"] = 2  # mute Add: the Reroute, Pick and Show depend on it
    wf = parse_workflow(data, registry)
    assert sorted(wf.nodes) == ["1", "2"]


def test_ui_bypassed_node_passes_its_same_typed_input_through(registry):
    data = ui_fixture()
    data["nodes"][4]["mode"] = 4  # bypass Pick
    wf = parse_workflow(data, registry)
    assert "4" not in wf.nodes
    # value (INT) gets Pick's INT input, through the reroute; label (STRING) has no STRING to take.
    assert wf.nodes["5"].inputs == {"value": Link("3", 0)}


def test_ui_bypass_prefers_the_input_at_the_used_output_slot(registry):
    data = ui_fixture()
    data["nodes"][2]["mode"] = 4  # bypass Add: its output slot 0 -> input slot 0 ("a", from node 1)
    wf = parse_workflow(data, registry)
    assert wf.nodes["4"].inputs["number"] == Link("1", 0)


def test_ui_primitive_node_supplies_a_literal(registry):
    data = ui_fixture()
    data["nodes"].append(ui_node(12, "PrimitiveNode", widgets=[2**64 - 1, "fixed"], outputs=[("INT", [7])]))
    data["nodes"][4]["inputs"].append({"name": "seed", "type": "INT", "link": 7, "widget": {"name": "seed"}})
    data["links"].append([7, 12, 0, 4, 1, "INT"])
    wf = parse_workflow(data, registry)
    assert "12" not in wf.nodes
    assert wf.nodes["4"].inputs["seed"] == 2**64 - 1


def test_ui_seed_control_widget_is_skipped_only_when_present(registry):
    data = ui_fixture()
    data["nodes"][4]["widgets_values"] = [0, 123, "sum", 2.0, "x"]  # a file without the control entry
    assert parse_workflow(data, registry).nodes["4"] == parse_workflow(ui_fixture(), registry).nodes["4"]
    data["nodes"][4]["widgets_values"] = [0, 123, "increment", "product", 2.0]
    literals = parse_workflow(data, registry).nodes["4"].literals()
    assert literals == {"seed": 123, "mode": "product", "scale": 2.0}


def test_ui_trailing_upload_widget_is_skipped(registry):
    data = {"nodes": [ui_node(1, "LoadName", widgets=["b.png", "image", 3])], "links": []}
    assert parse_workflow(data, registry).nodes["1"].inputs == {"name": "b.png", "repeat": 3}


def test_ui_required_widgets_a_file_holds_no_value_for_take_their_defaults(registry):
    # Saved before Pick gained mode and scale (or with no widgets_values): ComfyUI's editor gives them
    # their defaults; the optional label stays out, and number (no default) is left for validation.
    data = {"nodes": [ui_node(1, "Pick", widgets=[4, 9, "fixed"]), ui_node(2, "Pick")], "links": []}
    wf = parse_workflow(data, registry)
    assert wf.nodes["1"].inputs == {"number": 4, "seed": 9, "mode": "sum", "scale": 1.0}
    assert wf.nodes["2"].inputs == {"seed": 0, "mode": "sum", "scale": 1.0}


def test_ui_widget_values_may_be_a_dict(registry):
    data = {"nodes": [ui_node(1, "Pick", widgets={"seed": 5, "control_after_generate": "fixed", "mode": "sum",
                                                  "scale": 1.5})], "links": []}
    assert parse_workflow(data, registry).nodes["1"].inputs == {"seed": 5, "mode": "sum", "scale": 1.5}
    data["nodes"][0]["widgets_values"]["speed"] = 3
    with pytest.raises(WorkflowFormatError, match="speed"):
        parse_workflow(data, registry)


def test_ui_more_widget_values_than_widgets_is_refused(registry):
    data = {"nodes": [ui_node(1, "Number", widgets=[1, 2])], "links": []}
    with pytest.raises(WorkflowFormatError, match="2 widget values but declares 1"):
        parse_workflow(data, registry)


def test_ui_unknown_node_is_kept_with_its_links(registry):
    data = ui_fixture()
    data["nodes"][4]["type"] = "FancyPick"
    wf = parse_workflow(data, registry)
    assert wf.nodes["4"] == GraphNode("4", "FancyPick", {"number": Link("3", 0)})


def test_ui_unsupported_mode_is_refused(registry):
    data = ui_fixture()
    data["nodes"][0]["mode"] = 1
    with pytest.raises(WorkflowFormatError, match="supported modes"):
        parse_workflow(data, registry)


SUBGRAPH_ID = "9f1c2e3d-4b5a-4c6d-8e7f-0a1b2c3d4e5f"


def subgraph_fixture() -> dict:
    """The UI fixture with Add and Pick made into a subgraph (instance 20); Pick's scale is an input of
    the subgraph shown as a widget on the instance, its value 3.5 saved there."""
    return {
        "version": 1,
        "state": {"lastNodeId": 20, "lastLinkId": 9},
        "nodes": [
            ui_node(1, "Number", widgets=[5], outputs=[("INT", [1])]),
            ui_node(2, "Integer", widgets=[7], outputs=[("INT", [2])]),
            ui_node(20, SUBGRAPH_ID, inputs=[{"name": "a", "type": "INT", "link": 1},
                                             {"name": "b", "type": "INT", "link": 2},
                                             {"name": "scale", "type": "FLOAT", "link": None,
                                              "widget": {"name": "scale"}}],
                    widgets=[3.5], outputs=[("INT", [5]), ("STRING", [6])]),
            ui_node(5, "Show", inputs=[{"name": "value", "type": "INT", "link": 5},
                                       {"name": "label", "type": "STRING", "link": 6}], title="Result"),
        ],
        "links": [{"id": i, "origin_id": s, "origin_slot": ss, "target_id": t, "target_slot": ts, "type": ty}
                  for i, s, ss, t, ts, ty in [(1, 1, 0, 20, 0, "INT"), (2, 2, 0, 20, 1, "INT"),
                                              (5, 20, 0, 5, 0, "INT"), (6, 20, 1, 5, 1, "STRING")]],
        "definitions": {"subgraphs": [{
            "id": SUBGRAPH_ID, "name": "Add and pick",
            "inputNode": {"id": -10}, "outputNode": {"id": -20},
            "inputs": [{"name": "a", "type": "INT"}, {"name": "b", "type": "INT"}, {"name": "scale", "type": "FLOAT"}],
            "outputs": [{"name": "number", "type": "INT"}, {"name": "label", "type": "STRING"}],
            "nodes": [
                ui_node(3, "Add", inputs=[{"name": "a", "type": "INT", "link": 1, "widget": {"name": "a"}},
                                          {"name": "b", "type": "INT", "link": 2, "widget": {"name": "b"}}],
                        widgets=[0, 0], outputs=[("INT", [3])]),
                ui_node(4, "Pick", inputs=[{"name": "number", "type": "INT", "link": 3, "widget": {"name": "number"}},
                                           {"name": "scale", "type": "FLOAT", "link": 4, "widget": {"name": "scale"}}],
                        widgets=[0, 123, "randomize", "sum", 1.0, "x"], outputs=[("INT", [5]), ("STRING", [6])]),
            ],
            "links": [{"id": i, "origin_id": s, "origin_slot": ss, "target_id": t, "target_slot": ts, "type": ty}
                      for i, s, ss, t, ts, ty in [(1, -10, 0, 3, 0, "INT"), (2, -10, 1, 3, 1, "INT"),
                                                  (3, 3, 0, 4, 0, "INT"), (4, -10, 2, 4, 1, "FLOAT"),
                                                  (5, 4, 0, -20, 0, "INT"), (6, 4, 1, -20, 1, "STRING")]],
        }]},
    }


def test_ui_subgraph_instances_expand_into_their_inner_nodes(registry):
    wf = parse_workflow(subgraph_fixture(), registry)
    # The inner nodes take the frontend's ids (instance id, inner id), their links cross the boundary
    expected = copy.deepcopy(API)
    expected["20:3"] = expected.pop("3")
    expected["20:4"] = expected.pop("4")
    expected["20:4"]["inputs"].update(number=["20:3", 0], scale=3.5)  # scale: the instance's widget value
    expected["5"]["inputs"].update(value=["20:4", 0], label=["20:4", 1])
    assert wf == parse_workflow(expected, registry)


def test_ui_subgraph_inside_a_subgraph_and_an_unconnected_input_keep_inner_values(registry):
    data = subgraph_fixture()
    outer_id = "0c0c0c0c-1111-4222-8333-444444444444"
    instance = data["nodes"][2]
    instance["inputs"][2].pop("widget")  # scale is no widget of the instance: Pick keeps its own value
    instance["widgets_values"] = []
    inner_instance = {**copy.deepcopy(instance), "id": 7}
    for slot, ui_input in enumerate(inner_instance["inputs"][:2]):
        ui_input["link"] = 11 + slot
    instance["type"] = outer_id
    data["definitions"]["subgraphs"].append({
        "id": outer_id, "name": "Wrapper", "nodes": [inner_instance],
        "links": [{"id": 11, "origin_id": -10, "origin_slot": 0, "target_id": 7, "target_slot": 0, "type": "INT"},
                  {"id": 12, "origin_id": -10, "origin_slot": 1, "target_id": 7, "target_slot": 1, "type": "INT"},
                  {"id": 13, "origin_id": 7, "origin_slot": 0, "target_id": -20, "target_slot": 0, "type": "INT"},
                  {"id": 14, "origin_id": 7, "origin_slot": 1, "target_id": -20, "target_slot": 1, "type": "STRING"}],
    })
    wf = parse_workflow(data, registry)
    assert sorted(wf.nodes) == ["1", "2", "20:7:3", "20:7:4", "5"]
    assert wf.nodes["20:7:3"].inputs == {"a": Link("1", 0), "b": Link("2", 0)}
    assert wf.nodes["20:7:4"].literals()["scale"] == 1.0
    assert wf.nodes["5"].inputs == {"value": Link("20:7:4", 0), "label": Link("20:7:4", 1)}


def test_ui_muted_or_bypassed_subgraph_instances_act_as_one_node(registry):
    data = subgraph_fixture()
    data["nodes"][2]["mode"] = 2
    assert sorted(parse_workflow(data, registry).nodes) == ["1", "2"]
    data["nodes"][2]["mode"] = 4  # bypassed: Show's INT input takes the instance's first INT input
    assert parse_workflow(data, registry).nodes["5"].inputs == {"value": Link("1", 0)}


def test_ui_subgraph_that_contains_itself_and_legacy_group_nodes_are_refused_by_node(registry):
    data = subgraph_fixture()
    data["definitions"]["subgraphs"][0]["nodes"].append(ui_node(9, SUBGRAPH_ID))
    with pytest.raises(WorkflowFormatError, match="node 20:9: subgraph 'Add and pick' contains itself"):
        parse_workflow(data, registry)
    data = {"nodes": [ui_node(1, "workflow>Adders")], "links": [], "extra": {"groupNodes": {"Adders": {}}}}
    with pytest.raises(WorkflowFormatError, match=r"node 1 \(workflow>Adders\) is a legacy group node"):
        parse_workflow(data, registry)


# --- list format details ---------------------------------------------------------------------------------


def test_list_output_named_by_type_must_exist_once(registry):
    bad = copy.deepcopy(LIST)
    bad["nodes"][4]["inputs"]["label"] = [4, "IMAGE"]
    with pytest.raises(WorkflowFormatError, match="outputs: INT, LABEL"):
        parse_workflow(bad, registry)


def test_list_link_by_type_to_a_missing_node_is_refused(registry):
    bad = copy.deepcopy(LIST)
    bad["nodes"][4]["inputs"]["value"] = [9, "INT"]
    with pytest.raises(WorkflowFormatError, match="node 9, which does not exist"):
        parse_workflow(bad, registry)


def test_list_missing_widgets_take_their_defaults(registry):
    wf = parse_workflow({"nodes": [{"id": "p", "type": "Pick", "inputs": {"number": ["n", 0]}}]}, registry)
    assert wf.nodes["p"].inputs == {"number": Link("n", 0), "seed": 0, "mode": "sum", "scale": 1.0, "label": ""}


# --- the real node registry ------------------------------------------------------------------------------


def real_registry():
    nodes = pytest.importorskip("engine.nodes")
    return nodes.default_registry()


def test_source_article_example_parses():
    wf = parse_workflow(SOURCE_ARTICLE_EXAMPLE, real_registry())
    assert wf.nodes["1"].class_type == "CheckpointLoaderSimple"
    sampler = wf.nodes["3"].inputs
    assert sampler["positive"] == sampler["negative"] == Link("2", 0)
    assert sampler["model"] == Link("1", 0)
    assert wf.nodes["2"].inputs["clip"] == Link("1", 1)
    assert wf.nodes["5"].inputs["vae"] == Link("1", 2)


@pytest.mark.parametrize("ui_file", sorted(EXAMPLES.glob("*.ui.json")), ids=lambda p: p.name)
def test_comfyui_example_ui_files_match_their_api_twins(ui_file):
    registry = real_registry()
    from_ui = parse_workflow(ui_file.read_text(), registry)
    from_api = parse_workflow(ui_file.with_name(ui_file.name.replace(".ui.", ".api.")).read_text(), registry)
    assert sorted(from_ui.nodes) == sorted(from_api.nodes)
    for node_id, api_node in from_api.nodes.items():
        ui_node_ = from_ui.nodes[node_id]
        assert ui_node_.class_type == api_node.class_type
        assert ui_node_.links() == api_node.links()
        node_cls = registry.get(api_node.class_type)
        if node_cls is None:
            continue  # no declaration to map the UI widgets onto (reported by validation)
        declared = {spec.name for spec in node_cls.inputs}
        api_literals = {k: v for k, v in api_node.literals().items() if k in declared}
        assert ui_node_.literals() == api_literals, node_id


def test_workflow_equality_ignores_where_the_graph_came_from():
    nodes = {"1": GraphNode("1", "Number", {"value": 1})}
    assert Workflow(nodes, "api") == Workflow(copy.deepcopy(nodes), "ui", ui={"nodes": []})
    assert Workflow(nodes, "api") != Workflow({"1": GraphNode("1", "Number", {"value": 2})}, "api")
