"""Metrics and logs of the assembled server: /metrics moves as batches run, JSON log lines carry the ids."""

from __future__ import annotations

import io
import json
import logging
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from engine.logs import configure_logging
from engine.settings import load_settings
from webapp.auth import TokenIssuer

SECRET = "observability-key-" + "k" * 40
EXAMPLE = Path(__file__).parent / "data" / "comfyui-examples" / "sd3.5_simple_example.api.json"


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    from engine.runtime import Engine
    from webapp.server import create_app

    root = tmp_path_factory.mktemp("observability")
    settings = load_settings(
        {"data_dir": str(root / "data"), "jwt_secret": SECRET, "max_upload_mb": 1, "row_timeout_s": 60.0},
        environ={},
    )
    app, services = create_app(settings, Engine(settings))
    token = TokenIssuer.from_settings(settings).create("bob", "user")
    with TestClient(app, headers={"Authorization": f"Bearer {token}"}) as test_client:
        test_client.services = services
        yield test_client


def scrape(client) -> dict[tuple[str, tuple], float]:
    answer = client.get("/metrics")
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(answer.text)
        for sample in family.samples
    }


def value(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def rows(*names: str, **extra) -> list[dict]:
    return [{"product_name": name, "width": 64, "height": 64, "steps": 2, **extra} for name in names]


def comfy_prompt(steps: int, seed: int) -> dict:
    prompt = json.loads(EXAMPLE.read_text())
    prompt["4"]["inputs"]["ckpt_name"] = "sd35_demo_tiny"
    prompt["53"]["inputs"].update(width=64, height=64)
    prompt["3"]["inputs"].update(steps=steps, seed=seed)
    return prompt


def finished(client, batch_id: str) -> None:
    progress = client.services.queue.wait(batch_id, timeout=60)
    assert progress is not None and progress.state not in {"queued", "running"}


def test_metrics_follow_the_work(client):
    before = scrape(client)
    batch = rows("metric mug", "metric cup") + rows("metric bad", width=9999)
    answer = client.post("/api/batches", json={"template": "product_shot", "rows": batch})
    assert answer.status_code == 200, answer.text
    finished(client, answer.json()["batch_id"])
    after = scrape(client)

    def grew(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew("sd35_generations_total", status="done") == 2
    assert grew("sd35_generations_total", status="skipped") == 1
    assert grew("sd35_generations_total", status="failed") == 0
    assert grew("sd35_row_duration_seconds_count") == 2
    assert grew("sd35_sampler_step_seconds_count") == 2 and grew("sd35_sampler_step_seconds_sum") > 0
    assert value(after, "sd35_resident_models") >= 1
    assert value(after, "sd35_model_load_seconds_count", model="sd35_demo_tiny") == 1
    assert value(after, "sd35_queue_depth") == 0 and value(after, "sd35_batches_running") == 0
    assert grew("sd35_http_requests_total", route="/api/batches", method="POST", status="200") == 1

    # Behind the token like every route once auth is configured
    assert client.get("/metrics", headers={"Authorization": ""}).status_code == 401

    # Refusals are counted too: a 401 under its route template, a 413 before any route matched.
    client.get("/api/batches/some-batch", headers={"Authorization": "Bearer nope"})
    client.post("/api/batches", content=b"x" * (2 * 2**20), headers={"content-type": "application/json"})
    refused = scrape(client)
    assert value(refused, "sd35_http_requests_total", route="/api/batches/{batch_id}", method="GET", status="401") == 1
    assert value(refused, "sd35_http_requests_total", route="unmatched", method="POST", status="413") == 1
    assert value(refused, "sd35_http_request_duration_seconds_count", route="/metrics") >= 2


def test_queue_gauges_while_work_waits(client):
    long_id = client.post("/prompt", json={"prompt": comfy_prompt(steps=5000, seed=1)}).json()["prompt_id"]
    waiting = client.post("/api/batches", json={"template": "product_shot", "rows": rows("queued a", "queued b")})
    batch_id = waiting.json()["batch_id"]
    try:
        deadline = time.monotonic() + 30
        while value(busy := scrape(client), "sd35_batches_running") == 0 and time.monotonic() < deadline:
            time.sleep(0.05)  # the prompt is picked up by the queue thread
        assert value(busy, "sd35_batches_running") == 1
        assert value(busy, "sd35_queue_depth") == 3  # the running prompt's row and the two waiting rows
    finally:
        client.post("/interrupt", json={"prompt_id": long_id})
    finished(client, long_id)
    finished(client, batch_id)
    idle = scrape(client)
    assert value(idle, "sd35_batches_running") == 0 and value(idle, "sd35_queue_depth") == 0
    assert value(idle, "sd35_generations_total", status="cancelled") >= 1


def test_rows_of_a_batch_cancelled_in_the_queue_are_counted_though_they_never_ran(client):
    long_id = client.post("/prompt", json={"prompt": comfy_prompt(steps=5000, seed=2)}).json()["prompt_id"]
    before = scrape(client)
    try:
        sheet = rows("waits a", "waits b", "waits c") + rows("refused", width=9999)
        batch_id = client.post("/api/batches", json={"template": "product_shot", "rows": sheet}).json()["batch_id"]
        cancelled = client.post(f"/api/batches/{batch_id}/cancel")
        assert cancelled.json()["state"] == "removed_from_queue", cancelled.text
    finally:
        client.post("/interrupt", json={"prompt_id": long_id})
    finished(client, long_id)
    resumed = client.post("/api/batches", json={"template": "product_shot", "rows": sheet, "batch_id": batch_id})
    assert resumed.status_code == 200, resumed.text
    finished(client, batch_id)
    after = scrape(client)
    counts = client.services.ledger.batch_summary(batch_id)["counts"]
    assert counts["skipped"] == 1 and counts["done"] == 3

    def grew(status):
        return value(after, "sd35_generations_total", status=status) - value(before, "sd35_generations_total", status=status)

    assert grew("skipped") == 1
    assert grew("done") == 3
    assert grew("cancelled") == 3 + 1  # the three waiting rows, and the interrupted prompt's row


def test_skipped_rows_are_counted_once_however_often_the_batch_is_resumed(client):
    sheet = [{"product_name": "slow", "width": 512, "height": 512, "steps": 150}] + rows("refused twice", width=9999)
    before = scrape(client)
    batch_id = None
    for _ in range(2):  # start, cancel while the first row runs, resume, cancel again
        answer = client.post("/api/batches", json={"template": "product_shot", "rows": sheet,
                                                    **({"batch_id": batch_id} if batch_id else {})})
        assert answer.status_code == 200, answer.text
        batch_id = answer.json()["batch_id"]
        deadline = time.monotonic() + 30
        while (client.services.queue.status(batch_id).state != "running" or client.services.queue.status(batch_id).steps == 0) \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.post(f"/api/batches/{batch_id}/cancel").json()["state"] == "cancelling"
        finished(client, batch_id)
    after = scrape(client)
    assert client.services.ledger.batch_summary(batch_id)["counts"]["skipped"] == 1
    assert value(after, "sd35_generations_total", status="skipped") - value(before, "sd35_generations_total", status="skipped") == 1


@pytest.fixture
def json_logs():
    """The server's JSON log format on the root logger, captured; restored afterwards."""
    root = logging.getLogger()
    level = root.level
    stream = io.StringIO()
    handler = configure_logging("json", "INFO", stream=stream)
    yield lambda: [line for line in stream.getvalue().splitlines() if line.strip()]
    root.removeHandler(handler)
    root.setLevel(level)


def test_log_lines_are_json_and_carry_the_ids(client, json_logs):
    answer = client.post("/api/batches", json={"template": "product_shot", "rows": rows("logged lamp", "logged vase")})
    batch_id = answer.json()["batch_id"]
    finished(client, batch_id)
    prompt_id = client.post("/prompt", json={"prompt": comfy_prompt(steps=2, seed=2)}).json()["prompt_id"]
    finished(client, prompt_id)

    entries = [json.loads(line) for line in json_logs()]  # every line is one JSON object
    assert all({"ts", "level", "logger", "message"} <= set(entry) for entry in entries)

    of_batch = [e for e in entries if e.get("batch_id") == batch_id]
    assert of_batch and all(e["user"] == "bob" for e in of_batch)
    assert sorted(e["row"] for e in of_batch if e["message"].startswith("row ")) == [2, 3]

    queued = [e for e in entries if e.get("prompt_id") == prompt_id]
    assert queued and all(e["user"] == "bob" for e in queued)
    assert any(e.get("batch_id") == prompt_id and e.get("row") == 1 for e in entries)
