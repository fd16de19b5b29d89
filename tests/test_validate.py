"""Validation: every problem, per node, with ComfyUI's error types (engine.validate)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from arithmetic_nodes import arithmetic_registry, make_context
from engine.errors import WorkflowInvalid
from engine.nodes.base import Input, NodeType, Output
from engine.validate import LiteralProblem, coerce_literal, ensure_valid, output_ancestors, validate_workflow
from engine.workflow import parse_workflow

EXAMPLES = Path(__file__).parent / "data" / "comfyui-examples"
VALID = {
    "1": {"class_type": "Number", "inputs": {"value": 5}},
    "2": {"class_type": "Number", "inputs": {"value": 7}},
    "3": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": ["2", 0]}},
    "4": {"class_type": "Pick", "inputs": {"number": ["3", 0], "seed": 123, "mode": "sum", "scale": 2.0}},
    "5": {"class_type": "Show", "inputs": {"value": ["4", 0], "label": ["4", 1]}},
}


@pytest.fixture
def registry():
    return arithmetic_registry()


def problems_of(registry, changes: dict[str, Any] | None = None, ctx=None, base=VALID):
    """Problems of the VALID graph with ``changes`` ({node_id: node or {input: value}}) applied."""
    api = copy.deepcopy(base)
    for node_id, change in (changes or {}).items():
        if change is None:
            del api[node_id]
        elif "class_type" in change:
            api[node_id] = change
        else:
            api[node_id]["inputs"].update(change)
    return validate_workflow(parse_workflow(api, registry), registry, ctx)


def only(problems):
    assert len(problems) == 1, [p.describe() for p in problems]
    return problems[0]


def test_a_valid_workflow_has_no_problems(registry):
    assert problems_of(registry) == []


def test_no_output_node(registry):
    problem = only(problems_of(registry, {"5": None}))
    assert (problem.node_id, problem.type) == (None, "prompt_no_outputs")


def test_unknown_class_type_lists_the_supported_ones(registry):
    problem = only(problems_of(registry, {"9": {"class_type": "Teleport", "inputs": {}}}))
    assert (problem.node_id, problem.class_type, problem.type) == ("9", "Teleport", "invalid_prompt")
    assert "Add, BatchedAdd, Box" in problem.message


def test_required_input_missing(registry):
    api = copy.deepcopy(VALID)
    del api["4"]["inputs"]["seed"]
    problem = only(validate_workflow(parse_workflow(api, registry), registry))
    assert (problem.node_id, problem.type, problem.input_name) == ("4", "required_input_missing", "seed")


def test_missing_optional_input_is_fine(registry):
    assert problems_of(registry, {"3": {"class_type": "Add", "inputs": {"a": ["1", 0]}}}) == []


@pytest.mark.parametrize("link", [["8", 0], ["1", 1]], ids=["missing node", "output out of range"])
def test_bad_linked_input(registry, link):
    problem = only(problems_of(registry, {"3": {"a": link}}))
    assert (problem.node_id, problem.type, problem.input_name) == ("3", "bad_linked_input", "a")
    assert problem.extra_info["linked_node"] == link


def test_return_type_mismatch(registry):
    problem = only(problems_of(registry, {"5": {"value": ["4", 1]}}))
    assert problem.type == "return_type_mismatch"
    assert "received_type(STRING) mismatch input_type(INT)" in problem.details


def test_a_link_only_input_refuses_literals_and_wrong_types(registry):
    base = {"1": {"class_type": "Number", "inputs": {"value": 1}},
            "2": {"class_type": "ShowBox", "inputs": {"box": ["1", 0]}}}
    assert only(problems_of(registry, base=base)).type == "return_type_mismatch"
    problem = only(problems_of(registry, {"2": {"box": "a box"}}, base=base))
    assert (problem.type, problem.input_name) == ("invalid_input_type", "box")


@pytest.mark.parametrize(
    "node_id, name, value, kind",
    [
        ("1", "value", "abc", "invalid_input_type"),
        ("1", "value", True, "invalid_input_type"),  # bools are not ints
        ("1", "value", float("inf"), "invalid_input_type"),
        ("1", "value", "2.5", "invalid_input_type"),  # ComfyUI's int("2.5") fails too
        ("1", "value", [1], "invalid_input_type"),
        ("4", "scale", "fast", "invalid_input_type"),
        ("4", "scale", float("nan"), "invalid_input_type"),
        ("1", "value", -1001, "value_smaller_than_min"),
        ("4", "scale", 10.5, "value_bigger_than_max"),
        ("4", "seed", 2**64, "value_bigger_than_max"),
        ("4", "mode", "median", "value_not_in_list"),
        ("4", "mode", 3, "value_not_in_list"),
    ],
)
def test_bad_literals(registry, node_id, name, value, kind):
    problem = only(problems_of(registry, {node_id: {name: value}}))
    assert (problem.node_id, problem.type, problem.input_name) == (node_id, kind, name)


@pytest.mark.parametrize("value, expected", [(2.5, 2), (-2.7, -2), (7.0, 7)])
def test_int_truncates_a_float_as_comfyui_does(value, expected):
    assert coerce_literal(Input("steps", "INT", min=-10, max=10), value) == expected


@pytest.mark.parametrize("spec, value", [
    (Input("n", "INT"), "1e5000"),  # "1e999999999" held the server for minutes building the number
    (Input("n", "INT", min=0, max=2**64 - 1), "-1e99999"),
    (Input("cfg", "FLOAT"), 10**400),  # was "exception_during_validation": OverflowError
], ids=["int exponent", "int exponent with range", "float from a huge int"])
def test_a_number_too_large_for_any_input_is_a_wrong_type_before_it_is_built(spec, value):
    with pytest.raises(LiteralProblem) as refused:
        coerce_literal(spec, value)
    assert refused.value.type == "invalid_input_type"


def test_value_not_in_list_names_the_allowed_values(registry):
    problem = only(problems_of(registry, {"4": {"mode": "median"}}))
    assert "[sum, product]" in problem.message


@pytest.mark.parametrize("value", [12345.0, "12", " 12 ", 2**64 - 1, "18446744073709551615"])
def test_int_accepts_integral_values_without_mutating(registry, value):
    api = copy.deepcopy(VALID)
    api["4"]["inputs"]["seed"] = value
    wf = parse_workflow(api, registry)
    before = copy.deepcopy(wf)
    assert validate_workflow(wf, registry) == []
    kept = wf.nodes["4"].inputs["seed"]
    assert wf == before and kept == value and type(kept) is type(value)


def test_combo_choices_may_depend_on_the_context(registry, tmp_path):
    (tmp_path / "here.txt").write_text("x")

    class ListFiles(NodeType):
        class_type = "ListFiles"
        inputs = (Input("name", "COMBO", choices=lambda ctx: sorted(p.name for p in ctx.input_dir.iterdir())
                        if ctx else []),)
        outputs = (Output("STRING"),)

    registry.register(ListFiles)
    base = {"1": {"class_type": "ListFiles", "inputs": {"name": "here.txt"}},
            "2": {"class_type": "ShowText", "inputs": {"text": ["1", 0]}}}
    assert problems_of(registry, base=base, ctx=make_context(tmp_path, input_dir=tmp_path)) == []
    problem = only(problems_of(registry, base=base))  # without a context no file is known
    assert problem.type == "value_not_in_list"


def test_node_check_adds_its_own_problems(registry):
    problem = only(problems_of(registry, {"4": {"mode": "product", "scale": 0.0}}))
    assert (problem.type, problem.input_name, problem.message) == (
        "value_smaller_than_min", "scale", "scale 0 makes every product 0"
    )


def test_a_failing_check_is_reported_not_raised(registry):
    class Fragile(NodeType):
        class_type = "Fragile"
        output_node = True
        inputs = (Input("n", "INT"),)

        @classmethod
        def check(cls, values, ctx):
            raise KeyError("boom")

    registry.register(Fragile)
    problem = only(problems_of(registry, base={"1": {"class_type": "Fragile", "inputs": {"n": 1}}}))
    assert problem.type == "exception_during_validation"


def test_every_problem_is_reported(registry):
    problems = problems_of(registry, {
        "1": {"value": "abc"},
        "3": {"b": ["77", 0]},
        "4": {"mode": "median", "scale": -1},
        "9": {"class_type": "Teleport", "inputs": {}},
    })
    found = sorted((p.node_id, p.type) for p in problems)
    assert found == [
        ("1", "invalid_input_type"), ("3", "bad_linked_input"), ("4", "value_not_in_list"),
        ("4", "value_smaller_than_min"), ("9", "invalid_prompt"),
    ]
    with pytest.raises(WorkflowInvalid) as caught:
        api = copy.deepcopy(VALID)
        api["1"]["inputs"]["value"] = "abc"
        ensure_valid(parse_workflow(api, registry), registry)
    body = caught.value.to_comfy()
    assert body["error"]["type"] == "prompt_outputs_failed_validation"
    assert body["node_errors"]["1"]["errors"][0]["type"] == "invalid_input_type"


def test_only_ancestors_of_outputs_are_checked(registry):
    stray = {"class_type": "Add", "inputs": {"a": "not a number", "b": ["404", 0]}}
    assert problems_of(registry, {"8": stray}) == []


def test_a_cycle_is_reported_with_its_nodes(registry):
    problems = problems_of(registry, {"3": {"a": ["4", 0]}})
    cycle = only([p for p in problems if p.node_id is None])
    assert cycle.type == "invalid_prompt"
    assert cycle.extra_info["nodes"] == ["3", "4"]
    assert "3 (Add), 4 (Pick)" in cycle.message
    with pytest.raises(WorkflowInvalid, match="cycle"):
        self_loop = {**VALID, "3": {"class_type": "Add", "inputs": {"a": ["3", 0]}}}
        output_ancestors(parse_workflow(self_loop, registry), registry)


def test_output_ancestors_in_deterministic_topological_order(registry):
    api = copy.deepcopy(VALID)
    api["10"] = {"class_type": "Number", "inputs": {"value": 1}}
    api["0"] = {"class_type": "Show", "inputs": {"value": ["10", 0]}}
    api["6"] = {"class_type": "Number", "inputs": {"value": 1}}  # feeds no output
    wf = parse_workflow(api, registry)
    assert output_ancestors(wf, registry) == ["1", "2", "3", "4", "5", "10", "0"]
    reordered = parse_workflow(dict(reversed(list(api.items()))), registry)
    assert output_ancestors(reordered, registry) == output_ancestors(wf, registry)


# --- the real node registry ------------------------------------------------------------------------------


def real_registry():
    return pytest.importorskip("engine.nodes").default_registry()


def test_source_article_example_validates():
    from engine.settings import DEMO_CHECKPOINT
    from test_workflow_parse import SOURCE_ARTICLE_EXAMPLE

    registry = real_registry()
    wf = parse_workflow(SOURCE_ARTICLE_EXAMPLE, registry)
    # Its checkpoint is not on this machine: that is the only problem.
    problem = only(validate_workflow(wf, registry))
    assert (problem.node_id, problem.type, problem.input_name) == ("1", "value_not_in_list", "ckpt_name")
    wf.nodes["1"].inputs["ckpt_name"] = DEMO_CHECKPOINT
    assert validate_workflow(wf, registry) == []


@pytest.mark.parametrize("class_type", ["EmptySD3LatentImage", "EmptyLatentImage"])
def test_a_size_sd3_cannot_sample_is_refused_before_anything_runs(class_type):
    from engine.settings import DEMO_CHECKPOINT
    from test_workflow_parse import SOURCE_ARTICLE_EXAMPLE

    registry = real_registry()
    wf = parse_workflow(SOURCE_ARTICLE_EXAMPLE, registry)
    wf.nodes["1"].inputs["ckpt_name"] = DEMO_CHECKPOINT
    latent = next(n for n in wf.nodes.values() if n.class_type in ("EmptySD3LatentImage", "EmptyLatentImage"))
    latent.class_type = class_type
    latent.inputs.update(width=72, height=1024)
    problem = only(validate_workflow(wf, registry))
    assert (problem.node_id, problem.type, problem.input_name) == (latent.id, "custom_validation_failed", "width")
    assert problem.message == "width 72 is not a multiple of 16" and "use 64 or 80" in problem.details
    latent.inputs.update(width=80)
    assert validate_workflow(wf, registry) == []


MODEL_FILE_INPUTS = {"ckpt_name", "clip_name", "clip_name1", "clip_name2", "clip_name3", "vae_name", "unet_name",
                     "control_net_name"}


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.json")), ids=lambda p: p.name)
def test_comfyui_examples_validate_apart_from_missing_files_and_controlnet(path):
    registry = real_registry()
    for problem in validate_workflow(parse_workflow(path.read_text(), registry), registry):
        if problem.type == "invalid_prompt":
            assert "canny" in path.name, problem.describe()  # ControlNet nodes are not built in yet
        else:
            assert problem.type == "value_not_in_list", problem.describe()
            assert problem.input_name in MODEL_FILE_INPUTS, problem.describe()


def test_a_context_that_keeps_lookups_finds_what_a_fresh_one_finds_for_each_graph(registry, tmp_path):
    """A batch validates its rows on one context that keeps what it worked out of each graph's shape; graphs
    of one shape with other values, and graphs of other shapes (a cycle, a link to a missing node or output,
    an unknown node, no output) checked after it, must each get exactly the problems a fresh context gives."""
    changes: list[dict[str, Any]] = [
        {},
        {"4": {"seed": -1, "mode": "median"}},  # same shape, other literals
        {"4": {"scale": "big"}},
        {"1": {"value": ["3", 0]}},  # a cycle 1 -> 3 -> 1
        {"3": {"b": ["9", 0]}},  # a link to a node that is not there
        {"3": {"b": ["2", 5]}},  # to an output the node does not have
        {"9": {"class_type": "Teleport", "inputs": {}}},
        {"5": None},  # no output node
        {"5": None, "9": {"class_type": "Teleport", "inputs": {}}},
        {"4": {"seed": -1}},  # the first shape again, after the others
    ]
    kept = make_context(tmp_path, lookups={})
    for change in changes:
        fresh = problems_of(registry, change, ctx=make_context(tmp_path))
        assert problems_of(registry, change, ctx=kept) == fresh, change
    assert any(key[0] == "graph shape" for key in kept.lookups)


def test_a_context_that_keeps_lookups_works_out_each_graph_shape_once(registry, tmp_path, monkeypatch):
    """10,000 rows of one template are a few graph shapes: their order and links are worked out once each."""
    import engine.validate as validate

    analysed = []
    real = validate._ancestor_order
    monkeypatch.setattr(validate, "_ancestor_order", lambda *args: analysed.append(1) or real(*args))
    kept = make_context(tmp_path, lookups={})
    for seed in range(20):
        problems_of(registry, {"4": {"seed": seed}}, ctx=kept)
    for value in range(5):  # another shape: node 2 feeds both inputs of the sum
        problems_of(registry, {"2": {"value": value}, "3": {"a": ["2", 0]}}, ctx=kept)
    assert len(analysed) == 2
