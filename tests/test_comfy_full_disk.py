"""A ComfyUI client whose prompt meets a full output disk: the engine keeps the prompt and runs it again by
itself once there is space, so the client is told what ComfyUI tells of a prompt still to run (pending in
/queue, no history, no end-of-prompt message) until it really ends: completed or interrupted.

Real processes and files: a live server, a ComfyUI client over HTTP and its WebSocket, and its output
folder on a real 1 MiB tmpfs (``tiny_disk``) filled up with a file, as tests/test_storage.py does.
"""

from __future__ import annotations

import base64
import json
import os
import random
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from websockets.sync.client import connect

from engine.settings import load_settings
from engine.storage import free_bytes
from live_server import live_server
from test_comfy_api import SECRET, example_prompt, messages_until_done
from webapp.auth import TokenIssuer

END_MESSAGES = {"execution_success", "execution_error", "execution_interrupted"}


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from engine.runtime import Engine

    return Engine(load_settings({"data_dir": str(tmp_path_factory.mktemp("engine"))}, environ={}))


@pytest.fixture
def server(tmp_path, tiny_disk, engine):
    """The app with its outputs on the tiny disk, and a signed-in ComfyUI client of it."""
    from webapp.server import create_app

    settings = load_settings({"data_dir": str(tmp_path / "data"), "output_dir": str(tiny_disk / "out"),
                              "jwt_secret": SECRET, "row_timeout_s": 60.0}, environ={})
    app, services = create_app(settings, engine)
    token = TokenIssuer.from_settings(settings).create("comfy-user", "user")
    with live_server(app) as url:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as http:
            yield SimpleNamespace(http=http, services=services, disk=tiny_disk,
                                  ws_url=f"{url.replace('http://', 'ws://')}/ws?clientId=disk-client&token={token}")


def fill(disk: Path, leave: int) -> Path:
    """Fill ``disk`` with one file until ``leave`` bytes are free; delete the file for space."""
    filler = disk / f"filler-{len(list(disk.glob('filler-*')))}"
    filler.write_bytes(b"\0" * max(0, free_bytes(disk) - leave))
    return filler


def submit_on_full_disk(server, when: str) -> tuple[str, Path]:
    """Queue a prompt that a full disk stops ``before`` it runs (no room for its images), ``before_text`` it
    runs (room for its picture, not for the UI workflow its client puts into the PNG, as ComfyUI's page
    does), or ``writing`` its image (the disk fills up while it samples); returns its id, once it waits for
    space, and the file that fills the disk."""
    body = {"prompt": example_prompt(), "client_id": "disk-client"}
    filled: list[Path] = []
    if when == "before":
        filled.append(fill(server.disk, 8 * 1024))
    elif when == "before_text":
        filled.append(fill(server.disk, 64 * 1024))
        noise = base64.b64encode(random.Random(7).randbytes(200_000)).decode()  # PNG text: ~270 KB
        body["extra_data"] = {"extra_pnginfo": {"workflow": {"nodes": [], "links": [], "note": noise}}}
    else:
        def fill_while_sampling(event):  # another writer takes the space once the prompt has begun
            if event.kind == "node" and not filled:
                filled.append(fill(server.disk, 8 * 1024))

        server.services.queue.listeners.append(fill_while_sampling)
    answer = server.http.post("/prompt", json=body)
    assert answer.status_code == 200, answer.text
    prompt_id = answer.json()["prompt_id"]
    progress = server.services.queue.wait(prompt_id, 120)
    assert progress.state == "waiting_for_storage"
    assert progress.error_code == ("batch_stopped_by_storage" if when == "writing" else "batch_waiting_for_storage")
    return prompt_id, filled[0]


def ends(messages: list[dict], prompt_id: str) -> list[str]:
    """The prompt's end messages, each end-of-prompt ``executing`` (node null) as ``executing null``."""
    found = []
    for message in messages:
        data = message.get("data", {})
        if data.get("prompt_id") != prompt_id:
            continue
        if message["type"] in END_MESSAGES:
            found.append(message["type"])
        elif message["type"] == "executing" and data.get("node") is None:
            found.append("executing null")
    return found


def assert_still_to_run(server, prompt_id: str) -> None:
    """What a ComfyUI client and the app's own views see of a prompt that waits for space."""
    queue = server.http.get("/queue").json()
    assert queue["queue_running"] == [] and [item[1] for item in queue["queue_pending"]] == [prompt_id]
    assert server.http.get("/prompt").json() == {"exec_info": {"queue_remaining": 1}}
    assert server.http.get(f"/history/{prompt_id}").json() == {}
    assert prompt_id not in server.http.get("/history").json()
    # The JSON API and the page say what the prompt waits for, as for any batch.
    answered = server.http.get(f"/api/batches/{prompt_id}", params={"rows": "false"}).json()
    assert answered["progress"]["state"] == "waiting_for_storage"
    from webapp import handlers

    view = handlers.batch_view(server.services, prompt_id, "en")
    assert "waiting for disk space" in view.status_line and not view.finished


@pytest.mark.parametrize("when", ["before", "before_text", "writing"])
def test_a_prompt_stopped_by_a_full_disk_stays_queued_and_its_client_hears_its_end_once_when_it_completes(
    server, when
):
    from webapp.server import AbandonedBatchWatch

    with connect(server.ws_url) as ws:
        ws.recv(timeout=10)  # the greeting
        prompt_id, filler = submit_on_full_disk(server, when)
        assert_still_to_run(server, prompt_id)

        filler.unlink()  # space is back: the app's probe sees it and runs the prompt again at once
        assert AbandonedBatchWatch(server.services).check() == [prompt_id]
        messages = messages_until_done(ws, prompt_id)  # everything since the prompt was queued

    assert ends(messages, prompt_id) == ["execution_success", "executing null"]
    kinds = [m["type"] for m in messages]
    executed = next(m["data"] for m in messages if m["type"] == "executed")
    assert kinds.index("executed") < kinds.index("execution_success")
    image = executed["output"]["images"][0]
    assert server.http.get("/view", params=image).status_code == 200
    history = server.http.get(f"/history/{prompt_id}").json()[prompt_id]
    assert history["status"]["status_str"] == "success" and history["outputs"]["9"]["images"] == [image]
    assert server.http.get("/queue").json() == {"queue_running": [], "queue_pending": []}


@pytest.mark.parametrize("route, body", [("/queue", "delete"), ("/interrupt", "prompt_id")])
def test_a_prompt_stopped_writing_its_image_and_cancelled_while_it_waits_ends_interrupted(server, route, body):
    with connect(server.ws_url) as ws:
        ws.recv(timeout=10)
        prompt_id, _ = submit_on_full_disk(server, "writing")
        assert_still_to_run(server, prompt_id)

        request = {"delete": [prompt_id]} if body == "delete" else {"prompt_id": prompt_id}
        assert server.http.post(route, json=request).status_code == 200
        messages = messages_until_done(ws, prompt_id)

    assert "execution_start" in [m["type"] for m in messages]  # it had begun: its client must hear its end
    assert ends(messages, prompt_id) == ["execution_interrupted", "executing null"]
    interrupted = next(m["data"] for m in messages if m["type"] == "execution_interrupted")
    history = server.http.get(f"/history/{prompt_id}").json()[prompt_id]
    assert history["status"]["status_str"] == "error" and history["outputs"] == {}
    assert [m[0] for m in history["status"]["messages"]] == ["execution_start", "execution_interrupted"]
    assert {k: v for k, v in history["status"]["messages"][-1][1].items() if k != "timestamp"} == \
        {k: v for k, v in interrupted.items() if k != "timestamp"}
    assert prompt_id in server.http.get("/history").json()
    assert server.http.get("/queue").json() == {"queue_running": [], "queue_pending": []}
    assert [r.status for r in server.services.ledger.rows(prompt_id)] == ["cancelled"]
    assert os.listdir(server.services.runner.output_dir(prompt_id)) == []


def test_a_prompt_that_never_began_leaves_the_queue_as_a_pending_one_when_deleted_while_it_waits(server):
    """As ComfyUI deletes a pending prompt: gone from /queue, no history, no message but the queue's status."""
    with connect(server.ws_url) as ws:
        ws.recv(timeout=10)
        prompt_id, _ = submit_on_full_disk(server, "before")

        assert server.http.post("/queue", json={"delete": [prompt_id]}).status_code == 200

        assert server.services.queue.status(prompt_id).state == "cancelled"
        assert server.http.get("/queue").json() == {"queue_running": [], "queue_pending": []}
        assert server.http.get(f"/history/{prompt_id}").json() == {}
        assert [r.status for r in server.services.ledger.rows(prompt_id)] == ["cancelled"]
        # Every message up to the cancel's queue status (queue_remaining 0): nothing but status.
        heard = []
        while not heard or heard[-1]["data"].get("status", {}).get("exec_info", {}).get("queue_remaining") != 0:
            heard.append(json.loads(ws.recv(timeout=30)))
    assert {m["type"] for m in heard} == {"status"}


def test_a_prompt_waiting_for_space_is_remembered_however_many_prompts_come_after_it(server, monkeypatch):
    """The bridge forgets the oldest prompts that have ended (MAX_REMEMBERED_PROMPTS): never one that waits
    for space, whose client still expects its images."""
    from webapp import comfy_api
    from webapp.server import AbandonedBatchWatch

    monkeypatch.setattr(comfy_api, "MAX_REMEMBERED_PROMPTS", 1)
    with connect(server.ws_url) as ws:
        ws.recv(timeout=10)
        first, filler = submit_on_full_disk(server, "before")
        second, _ = submit_on_full_disk(server, "before")  # one more than the bridge remembers of ended prompts
        assert [item[1] for item in server.http.get("/queue").json()["queue_pending"]] == [first, second]
        assert server.http.get("/queue").json()["queue_pending"][0][3]["client_id"] == "disk-client"

        filler.unlink()
        assert AbandonedBatchWatch(server.services).check() == [first, second]
        messages = messages_until_done(ws, first)

    assert ends(messages, first) == ["execution_success", "executing null"]
