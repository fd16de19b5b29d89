import json
import re
from pathlib import Path

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from engine.errors import EngineError
from webapp.metrics import GpuCollector, HttpMetricsMiddleware, Metrics

DASHBOARD = Path(__file__).resolve().parent.parent / "grafana" / "dashboard.json"


def _samples(metrics: Metrics) -> dict[tuple, float]:
    body, _ = metrics.render()
    found = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def _value(metrics, name, **labels):
    return _samples(metrics).get((name, tuple(sorted(labels.items()))))


def test_render_names_and_content_type():
    metrics = Metrics(gpu="none")
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    text = body.decode()
    for name in (
        "sd35_generations_total", "sd35_row_duration_seconds", "sd35_sampler_step_seconds", "sd35_queue_depth",
        "sd35_batches_running", "sd35_model_load_seconds", "sd35_resident_models", "sd35_http_requests_total",
        "sd35_http_request_duration_seconds",
    ):
        assert f"# TYPE {name} " in text
    assert _value(metrics, "sd35_generations_total", status="failed") == 0.0
    assert "sd35_gpu_memory_used_bytes" not in text


def test_metrics_change_after_observations():
    metrics = Metrics(gpu="none")
    metrics.observe_generation("done", duration_s=3.0, sampler_s=2.0, steps=20)
    metrics.observe_generation("done", duration_s=5.0)
    metrics.observe_generation("timed_out")
    metrics.set_queue_depth(7)
    metrics.set_batches_running(2)
    metrics.observe_model_load("sd3.5_large_fp8_scaled", 42.0)
    metrics.set_resident_models(1)
    metrics.observe_http("/history/{prompt_id}", "get", 200, 0.02)
    metrics.observe_http("/prompt", "POST", 429, 0.001)

    assert _value(metrics, "sd35_generations_total", status="done") == 2
    assert _value(metrics, "sd35_generations_total", status="timed_out") == 1
    assert _value(metrics, "sd35_row_duration_seconds_count") == 2
    assert _value(metrics, "sd35_row_duration_seconds_sum") == pytest.approx(8.0)
    assert _value(metrics, "sd35_row_duration_seconds_bucket", le="4.0") == 1
    assert _value(metrics, "sd35_sampler_step_seconds_count") == 1
    assert _value(metrics, "sd35_sampler_step_seconds_sum") == pytest.approx(0.1)
    assert _value(metrics, "sd35_queue_depth") == 7
    assert _value(metrics, "sd35_batches_running") == 2
    assert _value(metrics, "sd35_model_load_seconds_sum", model="sd3.5_large_fp8_scaled") == 42.0
    assert _value(metrics, "sd35_resident_models") == 1
    assert _value(metrics, "sd35_http_requests_total", route="/history/{prompt_id}", method="GET", status="200") == 1
    assert _value(metrics, "sd35_http_requests_total", route="/prompt", method="POST", status="429") == 1
    assert _value(metrics, "sd35_http_request_duration_seconds_count", route="/prompt") == 1


def test_own_registry_not_the_global_one():
    first, second = Metrics(gpu="none"), Metrics(gpu="none")
    first.observe_generation("done")
    assert _value(second, "sd35_generations_total", status="done") == 0
    assert REGISTRY.get_sample_value("sd35_generations_total", {"status": "done"}) is None


def test_unknown_values_are_named():
    metrics = Metrics(gpu="none")
    with pytest.raises(EngineError, match="supported: done, failed, timed_out, skipped, cancelled"):
        metrics.observe_generation("ok")
    with pytest.raises(EngineError, match="supported: auto, nvml, torch, none"):
        Metrics(gpu="rocm")


def test_gpu_collector_exposes_what_it_reads():
    collector = GpuCollector("test", lambda: [{"index": 0, "used": 3e9, "total": 8e10, "utilization": 0.5}])
    metrics = Metrics(gpu="none")
    metrics.registry.register(collector)
    assert _value(metrics, "sd35_gpu_memory_used_bytes", gpu="0") == 3e9
    assert _value(metrics, "sd35_gpu_memory_total_bytes", gpu="0") == 8e10
    assert _value(metrics, "sd35_gpu_utilization_ratio", gpu="0") == 0.5


def test_auto_gpu_matches_this_host():
    import torch

    metrics = Metrics()  # auto: NVML, else torch.cuda, else no GPU gauges
    text = metrics.render()[0].decode()
    if metrics.gpu is None:
        assert not torch.cuda.is_available()
        assert "sd35_gpu_memory" not in text
    else:
        total = _value(metrics, "sd35_gpu_memory_total_bytes", gpu="0")
        assert total and total > 1e9
        assert 0 < _value(metrics, "sd35_gpu_memory_used_bytes", gpu="0") <= total


def test_http_middleware_labels_by_route_template():
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    app = FastAPI()

    @app.get("/history/{prompt_id}")
    def history(prompt_id: str):
        return {}

    metrics = Metrics(gpu="none")
    client = TestClient(HttpMetricsMiddleware(app, metrics))
    client.get("/history/abc")
    client.get("/history/def")
    client.get("/no/such/path")
    assert _value(metrics, "sd35_http_requests_total", route="/history/{prompt_id}", method="GET", status="200") == 2
    assert _value(metrics, "sd35_http_requests_total", route="unmatched", method="GET", status="404") == 1


def test_dashboard_reads_only_metrics_that_exist():
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 15
    used = {re.sub(r"_(bucket|sum|count)$", "", n) for e in exprs for n in re.findall(r"\bsd35_[a-z_]+", e)}
    metrics = Metrics(gpu="none")
    metrics.registry.register(GpuCollector("test", lambda: [{"index": 0, "used": 1, "total": 2, "utilization": 0}]))
    metrics.observe_model_load("m", 1.0)  # labelled series appear once observed
    metrics.observe_http("/prompt", "POST", 200, 0.1)
    exposed = {re.sub(r"_(bucket|sum|count)$", "", name) for name, _ in _samples(metrics)}
    assert used <= exposed, used - exposed
    assert {"sd35_generations_total", "sd35_row_duration_seconds", "sd35_sampler_step_seconds", "sd35_queue_depth",
            "sd35_gpu_memory_used_bytes", "sd35_gpu_utilization_ratio"} <= used
    assert any("histogram_quantile" in e and "sd35_row_duration_seconds_bucket" in e for e in exprs)
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
