"""Execution: topological runs, the signature cache, batches and error mapping (engine.execute)."""

from __future__ import annotations

import copy
import sys

import pytest

from arithmetic_nodes import arithmetic_registry, make_context
from engine.errors import Cancelled, ExecutionError, ModelNotFound, OutOfMemory, WorkflowInvalid
from engine.execute import Executor, batch_key, is_out_of_memory
from engine.nodes.base import Input, NodeType, Output
from engine.workflow import parse_workflow

GRAPH = {
    "1": {"class_type": "Number", "inputs": {"value": 5}},
    "2": {"class_type": "Number", "inputs": {"value": 7}},
    "3": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": ["2", 0]}},
    "4": {"class_type": "Pick", "inputs": {"number": ["3", 0], "seed": "123", "mode": "sum", "scale": 2.0}},
    "5": {"class_type": "Show", "inputs": {"value": ["4", 0], "label": ["4", 1]}},
    "9": {"class_type": "Number", "inputs": {"value": 99}},  # feeds no output: never runs
}


@pytest.fixture
def calls():
    return []


@pytest.fixture
def registry(calls):
    return arithmetic_registry(calls)


def graph(registry, **inputs_by_node):
    api = copy.deepcopy(GRAPH)
    for node_id, inputs in inputs_by_node.items():
        api[node_id.lstrip("n")]["inputs"].update(inputs)
    return parse_workflow(api, registry)


def ran(calls):
    return [name for name, _ in calls]


def test_runs_ancestors_of_outputs_in_order(registry, calls, tmp_path):
    events = []
    ctx = make_context(tmp_path, events)
    outcome = Executor(registry).execute(graph(registry), ctx)
    assert ran(calls) == ["Number", "Number", "Add", "Pick", "Show"]
    assert outcome.outputs == {"5": {"values": [(5 + 7 + 123) * 2]}}
    assert outcome.saved_images == [("sum", 270)] and outcome.record == {"shown": 270}
    assert set(outcome.timings) == {"1", "2", "3", "4", "5"} and outcome.cache_hits == []
    node_events = [(e.kind, e.node_id, e.class_type) for e in events]
    assert node_events == [("cached", None, None), ("node", "1", "Number"), ("node", "2", "Number"),
                           ("node", "3", "Add"), ("node", "4", "Pick"), ("node", "5", "Show"), ("done", None, None)]


def test_literals_are_converted_exactly_and_optional_inputs_left_out(registry, calls, tmp_path):
    wf = graph(registry, n4={"seed": "18446744073709551615", "scale": 1}, n3={"b": None})
    del wf.nodes["3"].inputs["b"]
    Executor(registry).execute(wf, make_context(tmp_path))
    pick = dict(calls)["Pick"]
    assert pick["seed"] == 2**64 - 1 and type(pick["seed"]) is int
    assert pick["scale"] == 1.0 and type(pick["scale"]) is float
    assert dict(calls)["Add"] == {"a": 5, "b": 0}  # Add's own default, not passed by the executor
    assert wf.nodes["4"].inputs["seed"] == "18446744073709551615", "execution never mutates the workflow"


def test_invalid_workflow_is_refused_before_anything_runs(registry, calls, tmp_path):
    with pytest.raises(WorkflowInvalid):
        Executor(registry).execute(graph(registry, n4={"mode": "median"}), make_context(tmp_path))
    assert calls == []


def test_cache_serves_unchanged_nodes_but_outputs_always_run(registry, calls, tmp_path):
    executor = Executor(registry)
    executor.execute(graph(registry), make_context(tmp_path))
    calls.clear()
    events = []
    ctx = make_context(tmp_path, events)
    outcome = executor.execute(graph(registry), ctx)
    assert ran(calls) == ["Show"], "identical run: only the output node runs again"
    assert outcome.cache_hits == ["1", "2", "3", "4"] and executor.cache_hits == 4
    # one event, before anything runs, naming every node the cache serves (ComfyUI's execution_cached)
    assert [e.nodes for e in events if e.kind == "cached"] == [("1", "2", "3", "4")]
    assert [e.kind for e in events][:2] == ["cached", "node"]
    assert ctx.saved_images == [("sum", 270)], "the output still saves"

    calls.clear()
    outcome = executor.execute(graph(registry, n2={"value": 8}), make_context(tmp_path))
    assert ran(calls) == ["Number", "Add", "Pick", "Show"], "only nodes downstream of the change run"
    assert outcome.cache_hits == ["1"]

    executor.clear_cache()
    calls.clear()
    executor.execute(graph(registry), make_context(tmp_path))
    assert ran(calls) == ["Number", "Number", "Add", "Pick", "Show"]


def test_cache_hits_replay_the_record(registry, tmp_path):
    api = {"1": {"class_type": "Text", "inputs": {"text": "a fox"}},
           "2": {"class_type": "ShowText", "inputs": {"text": ["1", 0]}}}
    executor = Executor(registry)
    executor.execute(parse_workflow(api, registry), make_context(tmp_path))
    second = executor.execute(parse_workflow(api, registry), make_context(tmp_path))
    assert second.cache_hits == ["1"] and second.record == {"prompt": "a fox"}


def test_uncacheable_nodes_and_their_dependents_always_run(registry, calls, tmp_path):
    api = copy.deepcopy(GRAPH)
    api["6"] = {"class_type": "Jitter", "inputs": {"value": ["1", 0]}}
    api["3"]["inputs"]["a"] = ["6", 0]
    executor = Executor(registry)
    executor.execute(parse_workflow(api, registry), make_context(tmp_path))
    calls.clear()
    executor.execute(parse_workflow(api, registry), make_context(tmp_path))
    assert ran(calls) == ["Jitter", "Add", "Pick", "Show"]


def test_lru_cache_is_bounded(registry, calls, tmp_path):
    executor = Executor(registry, cache_size=2)
    executor.execute(graph(registry, n2={"value": 5}), make_context(tmp_path))  # both Numbers: one entry
    assert len(executor.cached_signatures) == 2  # Number(5) and Add were pushed out by Pick
    calls.clear()
    executor.execute(graph(registry, n2={"value": 5}, n4={"seed": 1}), make_context(tmp_path))
    assert ran(calls) == ["Number", "Add", "Pick", "Show"]
    assert Executor(registry, cache_size=0).execute(graph(registry), make_context(tmp_path)).cache_hits == []


def test_node_errors_name_the_node(registry, tmp_path):
    with pytest.raises(ExecutionError) as caught:
        Executor(registry).execute(graph(registry, n1={"value": 13}, n2={"value": 0}), make_context(tmp_path))
    error = caught.value
    assert type(error) is ExecutionError
    assert (error.node_id, error.class_type) == ("3", "Add")
    assert "unlucky number" in error.message and isinstance(error.__cause__, ValueError)


def test_engine_errors_pass_through_with_the_node_filled_in(registry, tmp_path):
    class LoadMissing(NodeType):
        class_type = "LoadMissing"
        inputs = (Input("name", "STRING"),)
        outputs = (Output("INT"),)

        def run(self, ctx, name):
            raise ModelNotFound(name, "checkpoint", ["models/checkpoints"], [])

    registry.register(LoadMissing)
    api = {"1": {"class_type": "LoadMissing", "inputs": {"name": "x.safetensors"}},
           "2": {"class_type": "Show", "inputs": {"value": ["1", 0]}}}
    with pytest.raises(ModelNotFound) as caught:
        Executor(registry).execute(parse_workflow(api, registry), make_context(tmp_path))
    assert caught.value.node_id == "1" and caught.value.details["class_type"] == "LoadMissing"


@pytest.mark.parametrize("value", [1, 2], ids=["OutOfMemoryError class", "CUDA message"])
def test_out_of_memory_becomes_engine_out_of_memory(registry, tmp_path, value):
    api = {"1": {"class_type": "Exhaust", "inputs": {"value": value}},
           "2": {"class_type": "Show", "inputs": {"value": ["1", 0]}}}
    with pytest.raises(OutOfMemory) as caught:
        Executor(registry).execute(parse_workflow(api, registry), make_context(tmp_path))
    assert (caught.value.node_id, caught.value.class_type) == ("1", "Exhaust")


def test_torch_out_of_memory_is_recognised():
    torch = pytest.importorskip("torch")
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))


def test_module_imports_no_torch():
    import subprocess

    code = "import engine.execute, engine.validate, engine.workflow, sys; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_cancel_between_nodes(registry, calls, tmp_path):
    ctx = make_context(tmp_path, should_cancel=lambda: len(calls) >= 2)
    with pytest.raises(Cancelled) as caught:
        Executor(registry).execute(graph(registry), ctx)
    assert ran(calls) == ["Number", "Number"] and caught.value.node_id == "3"


# --- batches ---------------------------------------------------------------------------------------------


def test_batch_key_is_the_shape_not_the_literals(registry):
    assert batch_key(graph(registry)) == batch_key(graph(registry, n4={"seed": 5}))
    assert batch_key(graph(registry)) != batch_key(graph(registry, n5={"label": "fixed"}))


def test_batch_rows_share_equal_nodes_and_run_outputs_per_row(registry, calls, tmp_path):
    rows = [graph(registry, n4={"seed": seed}) for seed in (1, 1, 2)]
    ctxs = [make_context(tmp_path) for _ in rows]
    results = Executor(registry).execute_batch(rows, ctxs)
    assert [r.outputs["5"]["values"] for r in results] == [[26], [26], [28]]
    # Numbers and Add shared by all rows; Pick once per distinct seed (no run_batch); Show per row.
    assert ran(calls) == ["Number", "Number", "Add", "Pick", "Pick", "Show", "Show", "Show"]
    assert [c.saved_images for c in ctxs] == [[("sum", 26)], [("sum", 26)], [("sum", 28)]]
    assert [c.record["shown"] for c in ctxs] == [26, 26, 28]


def batched_graph(registry, a: int, b: int = 1):
    api = {"1": {"class_type": "Number", "inputs": {"value": a}},
           "2": {"class_type": "BatchedAdd", "inputs": {"a": ["1", 0], "b": b}},
           "3": {"class_type": "Show", "inputs": {"value": ["2", 0]}}}
    return parse_workflow(api, registry)


def test_batch_uses_run_batch_for_rows_with_different_inputs(registry, calls, tmp_path):
    rows = [batched_graph(registry, a) for a in (1, 2, 2, 3)]
    executor = Executor(registry)
    results = executor.execute_batch(rows, [make_context(tmp_path) for _ in rows])
    assert [r.outputs["3"]["values"][0] for r in results] == [2, 3, 3, 4]
    batch_calls = [inputs for name, inputs in calls if name.startswith("BatchedAdd")]
    assert ran(calls).count("BatchedAdd.run_batch") == 1 and "BatchedAdd.run" not in ran(calls)
    assert batch_calls[0]["rows"] == [{"a": 1, "b": 1}, {"a": 2, "b": 1}, {"a": 3, "b": 1}]
    # Each row gets its own record entries out of the one call, plus what the call wrote for all.
    assert [r.record for r in results] == [{"sum": s, "batched": True, "shown": s} for s in (2, 3, 3, 4)]
    again = executor.execute(batched_graph(registry, 3), make_context(tmp_path))
    assert again.cache_hits == ["1", "2"] and again.record == {"sum": 4, "batched": True, "shown": 4}


def test_batch_failure_is_isolated_to_its_row(registry, calls, tmp_path):
    rows = [batched_graph(registry, a) for a in (1, 13, 3)]
    rows.append(graph(registry, n1={"value": 13}, n2={"value": 0}))  # other shape, fails in Add
    rows.append(graph(registry, n4={"mode": "median"}))  # invalid
    results = Executor(registry).execute_batch(rows, [make_context(tmp_path) for _ in rows])
    assert results[0].outputs["3"]["values"] == [2] and results[2].outputs["3"]["values"] == [4]
    assert isinstance(results[1], ExecutionError) and results[1].node_id == "2"
    assert isinstance(results[3], ExecutionError) and results[3].class_type == "Add"
    assert isinstance(results[4], WorkflowInvalid)
    # The failed run_batch call was retried row by row; the failing row went no further.
    assert ran(calls).count("BatchedAdd.run") == 3
    assert [inputs["value"] for name, inputs in calls if name == "Show"] == [2, 4]


def test_batch_rows_report_progress_to_their_own_context(registry, tmp_path):
    rows = [batched_graph(registry, a) for a in (1, 2)]
    events = [[], []]
    Executor(registry).execute_batch(rows, [make_context(tmp_path, e) for e in events])
    for row_events in events:
        kinds = [(e.kind, e.node_id) for e in row_events]
        assert kinds == [("cached", None), ("node", "1"), ("node", "2"), ("node", "3"), ("done", None)]


def test_batch_needs_one_context_per_row(registry, tmp_path):
    with pytest.raises(ValueError):
        Executor(registry).execute_batch([graph(registry)], [])
