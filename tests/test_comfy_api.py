"""A ComfyUI client against the running server: /ws events, /prompt, /history, /view, /queue, /interrupt,
/object_info and /system_stats, with the official SD3.5 API example pointed at the demo model."""

from __future__ import annotations

import base64
import io
import itertools
import json
import os
import socket
import time
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from engine.settings import load_settings
from live_server import live_server
from webapp import comfy_api
from webapp.auth import TokenIssuer

EXAMPLE = Path(__file__).parent / "data" / "comfyui-examples" / "sd3.5_simple_example.api.json"
SECRET = "comfy-signing-key-" + "k" * 40
SEEDS = itertools.count(1000)  # a fresh seed per prompt, so the sampler really runs (and reports steps)


def example_prompt(steps: int = 2) -> dict:
    prompt = json.loads(EXAMPLE.read_text())
    prompt["4"]["inputs"]["ckpt_name"] = "sd35_demo_tiny"
    prompt["53"]["inputs"].update(width=64, height=64)
    prompt["3"]["inputs"].update(steps=steps, seed=next(SEEDS))
    return prompt


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from engine.runtime import Engine
    from webapp.server import create_app

    root = tmp_path_factory.mktemp("comfy")
    settings = load_settings(
        {"data_dir": str(root / "data"), "jwt_secret": SECRET, "row_timeout_s": 60.0}, environ={}
    )
    app, services = create_app(settings, Engine(settings))
    token = TokenIssuer.from_settings(settings).create("comfy-user", "user")
    with live_server(app) as url:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as http:
            yield SimpleNamespace(url=url, ws_url=url.replace("http://", "ws://"), http=http, token=token,
                                  services=services, bridge=app.state.comfy)


def messages_until_done(ws, prompt_id: str, timeout_s: float = 60.0) -> list[dict]:
    """Every message up to ComfyUI's end-of-prompt signal: ``executing`` with ``node: null``."""
    seen = []
    while True:
        message = json.loads(ws.recv(timeout=timeout_s))
        seen.append(message)
        data = message.get("data", {})
        if message["type"] == "executing" and data.get("node") is None and data.get("prompt_id") == prompt_id:
            return seen


def drain(ws, quiet_s: float = 1.0) -> list[dict]:
    """Every message that arrives until the socket has been quiet for ``quiet_s``."""
    seen = []
    while True:
        try:
            seen.append(json.loads(ws.recv(timeout=quiet_s)))
        except TimeoutError:
            return seen


def test_client_flow_prompt_ws_history_view(server):
    prompt = example_prompt()
    with connect(f"{server.ws_url}/ws?clientId=flow-client&token={server.token}") as ws:
        greeting = json.loads(ws.recv(timeout=10))
        assert greeting["type"] == "status" and greeting["data"]["sid"] == "flow-client"
        assert "queue_remaining" in greeting["data"]["status"]["exec_info"]

        answer = server.http.post("/prompt", json={
            "prompt": prompt, "client_id": "flow-client",
            "extra_data": {"extra_pnginfo": {"workflow": {"nodes": [], "links": []}}},
        })
        assert answer.status_code == 200, answer.text
        body = answer.json()
        prompt_id = body["prompt_id"]
        assert body["node_errors"] == {} and body["number"] >= 1
        messages = messages_until_done(ws, prompt_id)

    kinds = [m["type"] for m in messages]
    assert all(m["data"].get("prompt_id") == prompt_id for m in messages if m["type"] != "status")
    order = [kinds.index(k) for k in ("execution_start", "progress", "executed", "execution_success")]
    assert order == sorted(order) and kinds[-1] == "executing"
    executing = [m["data"]["node"] for m in messages if m["type"] == "executing"]
    assert "3" in executing and executing[-1] is None
    steps = [(m["data"]["value"], m["data"]["max"], m["data"]["node"]) for m in messages if m["type"] == "progress"]
    assert steps[-1] == (2, 2, "3")
    executed = next(m["data"] for m in messages if m["type"] == "executed")
    assert executed["node"] == "9"
    image = executed["output"]["images"][0]
    assert image["subfolder"] == prompt_id and image["type"] == "output" and image["filename"].endswith(".png")

    history = server.http.get(f"/history/{prompt_id}").json()[prompt_id]
    assert history["status"] == {"status_str": "success", "completed": True, "messages": history["status"]["messages"]}
    assert [m[0] for m in history["status"]["messages"]] == ["execution_start", "execution_success"]
    assert history["outputs"]["9"]["images"] == [image]
    assert history["prompt"][1] == prompt_id and history["prompt"][4] == ["9"]
    assert history["prompt"][3]["client_id"] == "flow-client"  # as ComfyUI, extra_data names the client
    assert prompt_id in server.http.get("/history").json()

    view = server.http.get("/view", params=image)
    assert view.status_code == 200 and view.headers["content-type"] == "image/png"
    png = Image.open(io.BytesIO(view.content))
    assert png.size == (64, 64)
    assert json.loads(png.text["prompt"])["3"]["inputs"]["seed"] == prompt["3"]["inputs"]["seed"]
    assert json.loads(png.text["workflow"]) == {"nodes": [], "links": []}

    generation = server.services.ledger.rows(prompt_id)[0]  # the same ledger as every batch
    assert generation.status == "done" and generation.user == "comfy-user"

    # History tells when the prompt ran (the ledger's times), not when history was asked for.
    def ms(stamp: str) -> int:
        return int(datetime.fromisoformat(stamp).timestamp() * 1000)

    time.sleep(0.05)
    (_, start), (_, success) = server.http.get(f"/history/{prompt_id}").json()[prompt_id]["status"]["messages"]
    assert start["timestamp"] == ms(generation.started_at)
    assert success["timestamp"] == ms(generation.finished_at)


def test_invalid_prompts_get_comfy_validation_bodies(server):
    bad_model = example_prompt()
    bad_model["4"]["inputs"]["ckpt_name"] = "no_such_model.safetensors"
    bad_model["3"]["inputs"]["sampler_name"] = "no_such_sampler"
    answer = server.http.post("/prompt", json={"prompt": bad_model})
    assert answer.status_code == 400
    body = answer.json()
    assert body["error"]["type"] == "prompt_outputs_failed_validation"
    assert body["node_errors"]["4"]["class_type"] == "CheckpointLoaderSimple"
    assert body["node_errors"]["3"]["errors"][0]["type"] == "value_not_in_list"
    assert body["node_errors"]["3"]["errors"][0]["extra_info"]["input_name"] == "sampler_name"
    # As ComfyUI: the output nodes each failing node holds up, and every problem in the top-level details
    assert body["node_errors"]["4"]["dependent_outputs"] == ["9"] == body["node_errors"]["3"]["dependent_outputs"]
    assert "no_such_sampler" in body["error"]["details"] and "no_such_model" in body["error"]["details"]

    for request in ({"no_prompt": {}}, {"prompt": example_prompt(), "prompt_id": "../../escape"}):
        refused = server.http.post("/prompt", json=request)
        assert refused.status_code == 400 and refused.json()["error"]["type"] == "invalid_prompt"
        assert refused.json()["node_errors"] == {}
    assert server.http.post("/prompt", content=b"{", headers={"content-type": "application/json"}).status_code == 400


def test_queue_delete_and_interrupt(server):
    with connect(f"{server.ws_url}/ws?clientId=queue-client&token={server.token}") as ws:
        ws.recv(timeout=10)
        long_one = server.http.post("/prompt", json={"prompt": example_prompt(steps=5000), "client_id": "queue-client"})
        long_id = long_one.json()["prompt_id"]
        while json.loads(ws.recv(timeout=60))["type"] != "progress":  # sampling has begun
            pass
        waiting_id = server.http.post("/prompt", json={"prompt": example_prompt(), "client_id": "queue-client"}).json()["prompt_id"]

        queue = server.http.get("/queue").json()
        assert [item[1] for item in queue["queue_running"]] == [long_id]
        assert [item[1] for item in queue["queue_pending"]] == [waiting_id]
        assert server.http.get("/prompt").json() == {"exec_info": {"queue_remaining": 2}}

        assert server.http.post("/queue", json={"delete": [waiting_id]}).json() == {}
        assert server.http.get("/queue").json()["queue_pending"] == []
        assert server.http.post("/interrupt", json={}).status_code == 200
        messages = messages_until_done(ws, long_id)

    interrupted = next(m["data"] for m in messages if m["type"] == "execution_interrupted")
    assert interrupted["node_id"] == "3" and interrupted["node_type"] == "KSampler"
    assert isinstance(interrupted["executed"], list) and "3" not in interrupted["executed"]
    history = server.http.get(f"/history/{long_id}").json()[long_id]
    assert history["status"]["status_str"] == "error" and not history["status"]["completed"]
    assert history["status"]["messages"][-1][0] == "execution_interrupted"
    assert {k: v for k, v in history["status"]["messages"][-1][1].items() if k != "timestamp"} == \
        {k: v for k, v in interrupted.items() if k != "timestamp"}
    assert server.http.get(f"/history/{waiting_id}").json() == {}  # deleted before it ran
    assert server.http.get("/queue").json() == {"queue_running": [], "queue_pending": []}


def test_object_info_and_system_stats(server):
    info = server.http.get("/object_info").json()
    sampler = info["KSampler"]["input"]["required"]
    assert "euler" in sampler["sampler_name"][0] and "sgm_uniform" in sampler["scheduler"][0]
    assert "sd35_demo_tiny" in info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0]
    assert list(server.http.get("/object_info/SaveImage").json()) == ["SaveImage"]
    assert server.http.get("/object_info/NoSuchNode").json() == {}

    assert server.http.get("/api/object_info/SaveImage").json() == server.http.get("/object_info/SaveImage").json()

    stats = server.http.get("/system_stats").json()
    assert {"os", "python_version", "pytorch_version", "comfyui_version"} <= set(stats["system"])
    assert stats["devices"] and {"name", "type", "vram_total", "vram_free"} <= set(stats["devices"][0])


def test_view_never_leaves_its_folder(server):
    outputs = Path(server.services.settings.outputs_path)
    existing = next(outputs.rglob("*.png"), None)
    if existing is None:  # this test may run alone: make one image first
        prompt_id = server.http.post("/prompt", json={"prompt": example_prompt()}).json()["prompt_id"]
        server.services.queue.wait(prompt_id, timeout=60)
        existing = next(outputs.rglob("*.png"))
    folder = existing.parent.name
    assert server.http.get("/view", params={"filename": existing.name, "subfolder": folder}).status_code == 200
    attempts = [
        {"filename": "ledger.db", "subfolder": ".."},
        {"filename": "../ledger.db"},
        {"filename": "../../ledger.db", "subfolder": folder},
        {"filename": "passwd", "subfolder": "/etc"},
        {"filename": "/etc/passwd"},
        {"filename": "..\\ledger.db"},
        {"filename": existing.name, "subfolder": f"{folder}/../.."},
        {"filename": "ledger.db", "type": "input", "subfolder": ".."},
        {"filename": "nothing-here.png", "subfolder": folder},
    ]
    for params in attempts:
        assert server.http.get("/view", params=params).status_code in (403, 404), params
    assert server.http.get("/view", params={"filename": existing.name, "type": "bogus"}).status_code == 400


def test_token_applies_to_comfy_routes_and_websocket(server):
    with httpx.Client(base_url=server.url, timeout=30) as anonymous:
        for method, path in (("POST", "/prompt"), ("GET", "/history"), ("GET", "/queue"), ("GET", "/view"),
                             ("POST", "/interrupt"), ("GET", "/object_info"), ("GET", "/system_stats")):
            assert anonymous.request(method, path).status_code == 401, path
        # A token in the query string (which access logs record) is for the WebSocket handshake only.
        for path in ("/queue", "/history", "/api/queue"):
            refused = anonymous.get(path, params={"token": server.token})
            assert refused.status_code == 401 and refused.json()["error"]["details"]["reason"] == "missing_token"
    with pytest.raises(InvalidStatus):
        with connect(f"{server.ws_url}/ws?clientId=intruder"):
            pass
    with pytest.raises(InvalidStatus):
        with connect(f"{server.ws_url}/ws?clientId=intruder&token={server.token[:-3]}abc"):
            pass


def png_bytes(color=(200, 30, 30), size=(32, 32)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def test_upload_image_then_load_it_in_a_prompt(server):
    uploaded = server.http.post("/upload/image", files={"image": ("../../shoe.png", png_bytes(), "image/png")},
                                data={"subfolder": "refs", "type": "input"})
    assert uploaded.status_code == 200, uploaded.text
    assert uploaded.json() == {"name": "shoe.png", "subfolder": "refs", "type": "input"}
    again = server.http.post("/upload/image", files={"image": ("shoe.png", png_bytes((0, 0, 255)), "image/png")},
                             data={"subfolder": "refs"})
    assert again.json()["name"] == "shoe (1).png"  # no overwrite unless asked, as in ComfyUI
    view = server.http.get("/view", params={"filename": "shoe.png", "subfolder": "refs", "type": "input"})
    assert view.status_code == 200 and Image.open(io.BytesIO(view.content)).size == (32, 32)
    top = server.http.post("/upload/image", files={"image": ("logo.png", png_bytes(), "image/png")})
    assert top.json() == {"name": "logo.png", "subfolder": "", "type": "input"}
    choices = server.http.get("/object_info/LoadImage").json()["LoadImage"]["input"]["required"]["image"][0]
    assert "logo.png" in choices  # ComfyUI lists the input folder's top level; subfolders load by path

    prompt = example_prompt()
    prompt["60"] = {"class_type": "LoadImage", "inputs": {"image": "refs/shoe.png"}}
    prompt["61"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["60", 0], "vae": ["4", 2]}}
    prompt["3"]["inputs"].update(latent_image=["61", 0], denoise=0.5)
    answer = server.http.post("/prompt", json={"prompt": prompt})
    assert answer.status_code == 200, answer.text
    prompt_id = answer.json()["prompt_id"]
    deadline = time.monotonic() + 60
    while not (history := server.http.get(f"/history/{prompt_id}").json()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert history[prompt_id]["status"]["status_str"] == "success"


@pytest.mark.parametrize("subfolder", ["../outside", "/abs", "a/../../x", "C:evil"])
def test_upload_image_refuses_paths_outside_the_input_folder(server, subfolder):
    refused = server.http.post("/upload/image", files={"image": ("x.png", png_bytes(), "image/png")},
                               data={"subfolder": subfolder})
    assert refused.status_code == 403


def test_upload_image_refuses_what_is_not_an_image(server):
    refused = server.http.post("/upload/image", files={"image": ("x.png", b"not a png", "image/png")})
    assert refused.status_code == 400 and "not an image" in refused.json()["error"]["message"]


def test_an_upload_named_like_a_page_is_stored_and_served_as_the_image_it_is(server):
    # A real PNG whose text chunk holds markup, uploaded as .html: a browser must never render it as a page.
    buffer = io.BytesIO()
    info = PngInfo()
    info.add_text("comment", "<html><script>alert(document.domain)</script></html>")
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buffer, format="PNG", pnginfo=info)
    uploaded = server.http.post("/upload/image", files={"image": ("poly.html", buffer.getvalue(), "text/html")})
    assert uploaded.status_code == 200 and uploaded.json()["name"] == "poly.png"
    view = server.http.get("/view", params={"filename": "poly.png", "type": "input"})
    assert view.headers["content-type"] == "image/png" and view.headers["x-content-type-options"] == "nosniff"
    jpeg = io.BytesIO()
    Image.new("RGB", (8, 8)).save(jpeg, format="JPEG")
    for name, stored in (("photo.jpeg", "photo.jpeg"), ("photo.png", "photo.jpg"), ("photo", "photo.jpg")):
        answer = server.http.post("/upload/image", files={"image": (name, jpeg.getvalue(), "image/jpeg")},
                                  data={"subfolder": "kinds", "overwrite": "true"})
        assert answer.json()["name"] == stored, name


def test_view_sends_anything_but_a_raster_image_as_a_download(server):
    root = Path(server.services.settings.input_path)
    (root / "page.html").write_text("<script>alert(1)</script>")
    (root / "drawing.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>')
    for name in ("page.html", "drawing.svg"):
        view = server.http.get("/view", params={"filename": name, "type": "input"})
        assert view.status_code == 200
        assert view.headers["content-type"] == "application/octet-stream"
        assert view.headers["content-disposition"].startswith("attachment")
        assert view.headers["x-content-type-options"] == "nosniff"


def test_another_user_can_neither_watch_nor_stop_a_prompt(server):
    """Prompts belong to whoever queued them: another user's socket (even with the same client id) gets
    none of its messages, and their /interrupt and /queue delete leave it alone."""
    other = TokenIssuer.from_settings(server.services.settings).create("someone-else", "user")
    long_prompt = example_prompt(steps=5000)
    with connect(f"{server.ws_url}/ws?clientId=shared-id&token={other}") as intruder, \
            connect(f"{server.ws_url}/ws?clientId=shared-id&token={server.token}") as owner:
        json.loads(intruder.recv(timeout=10)), json.loads(owner.recv(timeout=10))  # greetings
        long_id = server.http.post("/prompt", json={"prompt": long_prompt, "client_id": "shared-id"}).json()["prompt_id"]
        while json.loads(owner.recv(timeout=60))["type"] != "progress":  # sampling has begun
            pass
        waiting_id = server.http.post("/prompt", json={"prompt": example_prompt()}).json()["prompt_id"]
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {other}"}, timeout=30) as them:
            assert them.post("/interrupt", json={}).status_code == 200
            assert them.post("/queue", json={"delete": [waiting_id]}).status_code == 200
        assert server.services.queue.status(long_id).state == "running"
        assert [item[1] for item in server.http.get("/queue").json()["queue_pending"]] == [waiting_id]
        # Nothing of the owner's prompt reached the other user: only the queue's length, which every socket
        # is told (ComfyUI's status broadcast).
        assert {m["type"] for m in drain(intruder)} <= {"status"}
        assert server.http.post("/interrupt", json={"prompt_id": long_id}).status_code == 200
        assert "execution_interrupted" in [m["type"] for m in messages_until_done(owner, long_id)]
    server.services.queue.wait(waiting_id, timeout=60)


def queue_lengths(messages: list[dict]) -> list[int]:
    return [m["data"]["status"]["exec_info"]["queue_remaining"] for m in messages if m["type"] == "status"]


def test_a_finished_prompt_is_no_longer_counted_and_every_socket_hears_the_queue_change(server):
    """ComfyUI's queue_updated: status goes to every socket when a prompt is queued, starts and ends, and
    the status sent after execution_success no longer counts the finished prompt."""
    with connect(f"{server.ws_url}/ws?clientId=count-client&token={server.token}") as ws, \
            connect(f"{server.ws_url}/ws?clientId=bystander&token={server.token}") as bystander:
        ws.recv(timeout=10), bystander.recv(timeout=10)
        prompt_id = server.http.post("/prompt", json={"prompt": example_prompt(), "client_id": "count-client"}).json()["prompt_id"]
        messages = messages_until_done(ws, prompt_id)
        assert server.http.get("/prompt").json() == {"exec_info": {"queue_remaining": 0}}
        heard = drain(bystander)

    kinds = [m["type"] for m in messages]
    after_success = messages[kinds.index("execution_success"):]
    assert queue_lengths(after_success) == [0], "the status after execution_success counts the prompt as done"
    assert kinds[-2:] == ["status", "executing"], "as ComfyUI: the queue's status, then executing with node null"
    assert kinds.index("status") < kinds.index("execution_start")
    # Another client's socket hears every change (queued, started, done), and nothing of the prompt itself.
    assert queue_lengths(heard) == [1, 1, 0] and {m["type"] for m in heard} == {"status"}


def test_queue_lists_the_spreadsheet_batch_a_prompt_waits_for(server):
    rows = [{"product_name": f"queue item {n}", "seed": n, "width": 64, "height": 64, "steps": 150} for n in range(40)]
    answer = server.http.post("/api/batches", json={"template": "product_shot", "rows": rows, "batch_seed": 3})
    assert answer.status_code == 200, answer.text
    batch_id = answer.json()["batch_id"]
    deadline = time.monotonic() + 60
    while server.services.queue.status(batch_id).state != "running" and time.monotonic() < deadline:
        time.sleep(0.05)
    waiting_id = server.http.post("/prompt", json={"prompt": example_prompt()}).json()["prompt_id"]
    try:
        queue = server.http.get("/queue").json()
        running = queue["queue_running"]
        assert [item[1] for item in running] == [batch_id]
        assert running[0][3]["batch"]["template"] == "product_shot" and running[0][2] == {} and running[0][4] == []
        assert [item[1] for item in queue["queue_pending"]] == [waiting_id]
        assert server.http.get("/prompt").json() == {"exec_info": {"queue_remaining": 2}}
        # ComfyUI's delete and clear reach prompts only: a team's spreadsheet batch is stopped elsewhere.
        server.http.post("/queue", json={"delete": [batch_id]})
        server.http.post("/interrupt", json={})
        assert server.services.queue.status(batch_id).state == "running"
    finally:
        server.http.post(f"/api/batches/{batch_id}/cancel")
        server.services.queue.wait(batch_id, timeout=60)
        server.services.queue.wait(waiting_id, timeout=60)


def test_execution_cached_is_one_message_right_after_execution_start(server):
    with connect(f"{server.ws_url}/ws?clientId=cache-client&token={server.token}") as ws:
        ws.recv(timeout=10)
        runs = []
        for _ in range(2):  # the second run finds the loaders, encodings and latent in the cache
            prompt_id = server.http.post("/prompt", json={"prompt": example_prompt(), "client_id": "cache-client"}).json()["prompt_id"]
            runs.append(messages_until_done(ws, prompt_id))
    for messages in runs:
        kinds = [m["type"] for m in messages]
        assert kinds.count("execution_cached") == 1
        assert kinds.index("execution_cached") == kinds.index("execution_start") + 1
    cached = next(m["data"]["nodes"] for m in runs[1] if m["type"] == "execution_cached")
    assert {"4", "16", "40", "53"} <= set(cached) and "3" not in cached  # a new seed: the sampler runs again
    executing = {m["data"]["node"] for m in runs[1] if m["type"] == "executing"}
    assert not executing & set(cached), "a node served from the cache is not announced as executing"


def test_a_failed_prompt_reports_where_and_how_alike_on_the_socket_and_in_history(server):
    inputs = Path(server.services.settings.input_path)
    inputs.mkdir(parents=True, exist_ok=True)
    (inputs / "broken.png").write_bytes(b"this is no image")
    prompt = example_prompt()
    prompt["60"] = {"class_type": "LoadImage", "inputs": {"image": "broken.png"}}
    prompt["61"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["60", 0], "vae": ["4", 2]}}
    prompt["3"]["inputs"].update(latent_image=["61", 0], denoise=0.5)
    with connect(f"{server.ws_url}/ws?clientId=error-client&token={server.token}") as ws:
        ws.recv(timeout=10)
        answer = server.http.post("/prompt", json={"prompt": prompt, "client_id": "error-client"})
        assert answer.status_code == 200, answer.text
        prompt_id = answer.json()["prompt_id"]
        messages = messages_until_done(ws, prompt_id)
    error = next(m["data"] for m in messages if m["type"] == "execution_error")
    assert error["node_id"] == "60" and error["node_type"] == "LoadImage"
    assert error["exception_type"] == "PIL.UnidentifiedImageError"
    assert error["current_inputs"] == {"image": ["broken.png"]}
    assert {"executed", "current_outputs", "traceback", "exception_message"} <= set(error)
    assert "4" in error["executed"] + error["current_outputs"]  # the loader ran (or was cached) before it

    history = server.http.get(f"/history/{prompt_id}").json()[prompt_id]
    kind, recorded = history["status"]["messages"][-1]
    assert kind == "execution_error"
    assert {k: v for k, v in recorded.items() if k != "timestamp"} == {k: v for k, v in error.items() if k != "timestamp"}


def test_preview_images_are_temp_images(server):
    prompt = example_prompt()
    prompt["10"] = {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}}
    with connect(f"{server.ws_url}/ws?clientId=preview-client&token={server.token}") as ws:
        ws.recv(timeout=10)
        prompt_id = server.http.post("/prompt", json={"prompt": prompt, "client_id": "preview-client"}).json()["prompt_id"]
        messages = messages_until_done(ws, prompt_id)
    executed = {m["data"]["node"]: m["data"]["output"]["images"] for m in messages if m["type"] == "executed"}
    preview, saved = executed["10"][0], executed["9"][0]
    assert preview["type"] == "temp" and saved["type"] == "output"
    assert preview["filename"].startswith("ComfyUI_temp_")
    history = server.http.get(f"/history/{prompt_id}").json()[prompt_id]
    assert history["outputs"]["10"]["images"] == [preview] and history["outputs"]["9"]["images"] == [saved]
    view = server.http.get("/view", params=preview)
    assert view.status_code == 200 and view.headers["content-type"] == "image/png"
    assert server.http.get("/view", params={**preview, "type": "output"}).status_code == 404
    outputs = Path(server.services.settings.outputs_path)
    assert not list(outputs.rglob(preview["filename"])), "a preview is not stored among the outputs"


def run_prompt(http: httpx.Client, prompt: dict | None = None) -> str:
    prompt_id = http.post("/prompt", json={"prompt": prompt or example_prompt()}).json()["prompt_id"]
    deadline = time.monotonic() + 60
    while not http.get(f"/history/{prompt_id}").json() and time.monotonic() < deadline:
        time.sleep(0.1)
    return prompt_id


def test_history_limits_count_prompts_not_other_batches(server):
    first, second = run_prompt(server.http), run_prompt(server.http)
    runner = server.services.runner
    for n in range(3):  # newer batches that are not ComfyUI prompts (a CLI run's, waiting)
        runner.start(runner.prepare_workflow(example_prompt(), kind="workflow"))
    assert list(server.http.get("/history", params={"max_items": 2}).json()) == [first, second]
    assert list(server.http.get("/history", params={"max_items": 1}).json()) == [second]
    everything = server.http.get("/history").json()
    assert list(everything)[-2:] == [first, second]


def test_history_reads_the_ledger_as_often_however_many_prompts_it_lists(server, monkeypatch):
    """ComfyUI keeps up to 10,000 prompts in its history: /history reads them together, not three reads a
    prompt (seconds per call on a busy server's ledger)."""
    import threading

    from engine.store import BatchLedger
    from webapp.comfy_api import ComfyBridge

    bridge = ComfyBridge(server.services)  # /history's own code, called here to count only its reads
    server.services.queue.listeners.remove(bridge.on_batch_event)
    reads, read, here = [0], BatchLedger._read, threading.get_ident()

    def counted(self, *args, **kwargs):
        reads[0] += threading.get_ident() == here  # not the server's other threads
        return read(self, *args, **kwargs)

    run_prompt(server.http)
    monkeypatch.setattr(BatchLedger, "_read", counted)
    reads[0] = 0
    listed_before = bridge.history()
    before = reads[0]
    monkeypatch.setattr(BatchLedger, "_read", read)
    added = [run_prompt(server.http) for _ in range(3)]
    monkeypatch.setattr(BatchLedger, "_read", counted)
    reads[0] = 0
    listed = bridge.history()
    after = reads[0]

    assert len(listed) == len(listed_before) + 3 and set(added) <= set(listed)
    assert after == before
    for prompt_id in added:  # the same outputs and messages as the prompt's own entry
        alone = server.http.get(f"/history/{prompt_id}").json()[prompt_id]
        assert (listed[prompt_id]["outputs"], listed[prompt_id]["status"]) == (alone["outputs"], alone["status"])


def test_deleting_history_hides_prompts_but_the_ledger_keeps_them(server):
    other = TokenIssuer.from_settings(server.services.settings).create("history-neighbour", "user")
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {other}"}, timeout=60) as them:
        theirs = run_prompt(them)
    kept, deleted = run_prompt(server.http), run_prompt(server.http)
    assert server.http.post("/history", json={"delete": [deleted, theirs]}).status_code == 200
    history = server.http.get("/history").json()
    assert kept in history and deleted not in history and theirs in history  # only one's own prompts
    assert server.http.get(f"/history/{deleted}").json() == {}
    assert server.services.ledger.rows(deleted)[0].status == "done", "the audit log keeps the row"

    assert server.http.post("/history", json={"clear": True}).status_code == 200
    assert list(server.http.get("/history").json()) == [theirs]
    assert server.services.ledger.rows(kept)[0].status == "done"


def test_comfy_org_credentials_in_extra_data_reach_no_other_user(server):
    """ComfyUI's front end sends its comfy.org key and token in extra_data; every user reads every prompt's
    extra_data in /queue and /history, so they never get there (as ComfyUI keeps them out)."""
    extra = {"api_key_comfy_org": "comfyui-KEY-of-the-owner", "auth_token_comfy_org": "TOKEN-of-the-owner",
             "extra_pnginfo": {"workflow": {"note": "kept"}}}
    prompt_id = server.http.post("/prompt", json={"prompt": example_prompt(), "extra_data": extra}).json()["prompt_id"]
    other = TokenIssuer.from_settings(server.services.settings).create("extra-data-neighbour", "user")
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {other}"}, timeout=60) as them:
        queue = them.get("/queue").text
        deadline = time.monotonic() + 60
        while not (history := them.get(f"/history/{prompt_id}").json()) and time.monotonic() < deadline:
            time.sleep(0.1)
    assert "KEY-of-the-owner" not in queue and "TOKEN-of-the-owner" not in queue
    extra_data = history[prompt_id]["prompt"][3]
    assert "api_key_comfy_org" not in extra_data and "auth_token_comfy_org" not in extra_data
    assert extra_data["extra_pnginfo"] == {"workflow": {"note": "kept"}}


def test_only_a_prompts_owner_adds_files_to_its_output_and_preview_folders(server):
    """An output or temp upload into a prompt's folder shows among that prompt's images (/view, /files)."""
    prompt_id = server.http.post("/prompt", json={"prompt": example_prompt()}).json()["prompt_id"]
    server.services.queue.wait(prompt_id, timeout=60)
    other = TokenIssuer.from_settings(server.services.settings).create("folder-neighbour", "user")
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {other}"}, timeout=30) as them:
        for kind, subfolder in (("output", f"{prompt_id}/deeper"), ("temp", prompt_id),
                                ("output", f"./{prompt_id}"), ("output", f"elsewhere/../{prompt_id}")):
            refused = them.post("/upload/image", files={"image": ("planted.png", png_bytes(), "image/png")},
                                data={"type": kind, "subfolder": subfolder})
            assert refused.status_code == 403 and refused.json()["error"]["details"]["reason"] == "not_owner"
        assert them.post("/upload/image", files={"image": ("mine.png", png_bytes(), "image/png")},
                         data={"type": "output", "subfolder": "their-own-folder"}).status_code == 200
    assert not list(server.services.settings.outputs_path.glob(f"{prompt_id}/**/planted*"))
    owner = server.http.post("/upload/image", files={"image": ("added.png", png_bytes(), "image/png")},
                             data={"type": "output", "subfolder": prompt_id})
    assert owner.status_code == 200 and owner.json()["subfolder"] == prompt_id


def test_an_unknown_node_type_is_refused_as_comfyui_does(server):
    prompt = example_prompt()
    prompt["3"]["class_type"] = "NoSuchNode"
    answer = server.http.post("/prompt", json={"prompt": prompt})
    assert answer.status_code == 400
    assert answer.json() == {"error": {"type": "invalid_prompt", "message": "Cannot execute because node NoSuchNode does not exist.",
                                       "details": "Node ID '#3'", "extra_info": {}}, "node_errors": {}}
    dangling = example_prompt()
    dangling["500"] = {"class_type": "SomeCustomNode", "inputs": {}}  # unconnected: still refused, as ComfyUI
    assert server.http.post("/prompt", json={"prompt": dangling}).json()["error"]["details"] == "Node ID '#500'"


def test_the_outputs_that_validate_run_and_the_others_come_back_as_node_errors(server):
    prompt = example_prompt()
    prompt["100"] = {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 1]}}  # a CLIP as VAE
    prompt["101"] = {"class_type": "SaveImage", "inputs": {"images": ["100", 0], "filename_prefix": "broken"}}
    answer = server.http.post("/prompt", json={"prompt": prompt})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["node_errors"]["100"]["errors"][0]["type"] == "return_type_mismatch"
    assert body["node_errors"]["100"]["dependent_outputs"] == ["101"] and "9" not in body["node_errors"]
    prompt_id = body["prompt_id"]
    server.services.queue.wait(prompt_id, timeout=60)
    history = server.http.get(f"/history/{prompt_id}").json()[prompt_id]
    assert history["status"]["status_str"] == "success"
    assert list(history["outputs"]) == ["9"] and history["prompt"][4] == ["9"]
    assert history["prompt"][2] == prompt  # the prompt as sent, as ComfyUI keeps it

    prompt["9"]["inputs"]["images"] = ["100", 0]  # now no output validates: refused
    refused = server.http.post("/prompt", json={"prompt": prompt})
    assert refused.status_code == 400 and refused.json()["error"]["type"] == "prompt_outputs_failed_validation"


def test_partial_execution_targets_run_only_those_outputs(server):
    prompt = example_prompt()
    prompt["10"] = {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "partial"}}
    answer = server.http.post("/prompt", json={"prompt": prompt, "partial_execution_targets": ["10"]})
    assert answer.status_code == 200, answer.text
    prompt_id = answer.json()["prompt_id"]
    server.services.queue.wait(prompt_id, timeout=60)
    history = server.http.get(f"/history/{prompt_id}").json()[prompt_id]
    assert list(history["outputs"]) == ["10"] and history["prompt"][4] == ["10"]
    assert history["outputs"]["10"]["images"][0]["filename"].startswith("partial_")
    refused = server.http.post("/prompt", json={"prompt": prompt, "partial_execution_targets": ["3"]})  # not an output
    assert refused.status_code == 400 and refused.json()["error"]["type"] == "prompt_no_outputs"
    wrong = server.http.post("/prompt", json={"prompt": prompt, "partial_execution_targets": "10"})
    assert wrong.status_code == 400


def test_front_puts_a_prompt_ahead_of_the_waiting_ones(server):
    with connect(f"{server.ws_url}/ws?clientId=front-client&token={server.token}") as ws:
        ws.recv(timeout=10)
        long_id = server.http.post("/prompt", json={"prompt": example_prompt(steps=5000), "client_id": "front-client"}).json()["prompt_id"]
        while json.loads(ws.recv(timeout=60))["type"] != "progress":  # sampling has begun
            pass
        waiting = [server.http.post("/prompt", json={"prompt": example_prompt()}).json() for _ in range(2)]
        front = server.http.post("/prompt", json={"prompt": example_prompt(), "front": True}).json()
        assert front["number"] < 0 < waiting[0]["number"] < waiting[1]["number"]
        queue = server.http.get("/queue").json()
        assert [item[1] for item in queue["queue_pending"]] == [front["prompt_id"]] + [w["prompt_id"] for w in waiting]
        server.http.post("/interrupt", json={"prompt_id": long_id})
        messages_until_done(ws, long_id)
        started = json.loads(ws.recv(timeout=60))
        while started["type"] != "execution_start":  # the front prompt runs next (its messages go to everyone)
            started = json.loads(ws.recv(timeout=60))
    assert started["data"]["prompt_id"] == front["prompt_id"]
    for item in [front, *waiting]:
        server.services.queue.wait(item["prompt_id"], timeout=60)


def test_embeddings_extensions_and_features_answer_as_comfyui_routes(server):
    for path in ("/embeddings", "/api/embeddings", "/extensions", "/api/extensions"):
        answer = server.http.get(path)
        assert answer.status_code == 200 and answer.json() == [], path
    features = server.http.get("/features").json()
    assert features == server.http.get("/api/features").json()
    assert features["max_upload_size"] == server.services.settings.max_upload_mb * 1024 * 1024
    assert features["supports_preview_metadata"] is False  # no previews are sent over the socket


def test_the_socket_ignores_binary_frames_and_answers_feature_flags(server):
    with connect(f"{server.ws_url}/ws?clientId=flags-client&token={server.token}") as ws:
        ws.recv(timeout=10)
        ws.send(json.dumps({"type": "feature_flags", "data": {"supports_preview_metadata": True}}))
        answer = json.loads(ws.recv(timeout=10))
        assert answer == {"type": "feature_flags", "data": server.http.get("/features").json()}
        ws.send(b"\x00\x01binary")
        ws.send(json.dumps({"type": "feature_flags", "data": {}}))  # only a first message is answered
        prompt_id = server.http.post("/prompt", json={"prompt": example_prompt(), "client_id": "flags-client"}).json()["prompt_id"]
        messages = messages_until_done(ws, prompt_id)  # the socket is still alive and served
    assert "execution_success" in [m["type"] for m in messages]
    assert "feature_flags" not in [m["type"] for m in messages]


def test_a_socket_whose_client_stopped_reading_is_closed_not_fed_forever(server):
    """A ComfyUI client that hangs with its connection open reads nothing: every queue change of every user
    was kept for it in memory, for as long as the server ran. Past a bound the server lets it go."""
    from engine.batch import BatchEvent

    bridge, host, port = server.bridge, *server.url.removeprefix("http://").split(":")
    bridge.max_unsent = 50
    stuck = socket.socket()
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window: the server's sends back up soon
    try:
        stuck.connect((host, int(port)))
        stuck.sendall(f"GET /ws?clientId=stuck-client HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
                      f"Connection: Upgrade\r\nSec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}\r\n"
                      f"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {server.token}\r\n\r\n".encode())
        deadline = time.monotonic() + 30
        while "stuck-client" not in bridge.sockets and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "stuck-client" in bridge.sockets
        # Queue changes, as the queue reports them, far more than the socket's buffers hold (status to everyone)
        for number in range(40_000):
            bridge.on_batch_event(BatchEvent("batch_queued", f"elsewhere-{number}"))
            bridge.on_batch_event(BatchEvent("batch_done", f"elsewhere-{number}"))
        unsent = [box.qsize() for boxes in bridge.sockets.values() for box in boxes]
        assert max(unsent, default=0) <= 50
        stuck.settimeout(60)
        while stuck.recv(1 << 16):  # what the server had sent, then its end of the connection
            pass
        assert "stuck-client" not in bridge.sockets
    finally:
        bridge.max_unsent = comfy_api.MAX_UNSENT_MESSAGES
        stuck.close()


def test_upload_to_temp_and_output_keeps_the_name_of_identical_bytes_and_its_case(server):
    picture = png_bytes((10, 200, 10))
    first = server.http.post("/upload/image", files={"image": ("Mask.PNG", picture, "image/png")},
                             data={"subfolder": "dupes"})
    assert first.json() == {"name": "Mask.PNG", "subfolder": "dupes", "type": "input"}
    again = server.http.post("/upload/image", files={"image": ("Mask.PNG", picture, "image/png")},
                             data={"subfolder": "dupes"})
    assert again.json()["name"] == "Mask.PNG", "the same bytes again: ComfyUI answers with the stored file"
    other = server.http.post("/upload/image", files={"image": ("Mask.PNG", png_bytes((1, 1, 1)), "image/png")},
                             data={"subfolder": "dupes"})
    assert other.json()["name"] == "Mask (1).PNG"

    for kind in ("temp", "output"):
        answer = server.http.post("/upload/image", files={"image": ("edit.png", picture, "image/png")},
                                  data={"type": kind, "subfolder": "uploads"})
        assert answer.json() == {"name": "edit.png", "subfolder": "uploads", "type": kind}
        view = server.http.get("/view", params={**answer.json(), "filename": "edit.png"})
        assert view.status_code == 200 and view.content == picture
    refused = server.http.post("/upload/image", files={"image": ("edit.png", png_bytes((9, 9, 9)), "image/png")},
                               data={"type": "output", "subfolder": "uploads", "overwrite": "true"})
    assert refused.status_code == 403 and "never overwritten" in refused.json()["error"]["message"]
    assert server.http.post("/upload/image", files={"image": ("x.png", picture, "image/png")},
                            data={"type": "elsewhere"}).status_code == 400


def test_view_answers_head_previews_and_channels(server):
    buffer = io.BytesIO()
    Image.new("RGBA", (16, 8), (200, 100, 50, 128)).save(buffer, format="PNG")
    server.http.post("/upload/image", files={"image": ("alpha.png", buffer.getvalue(), "image/png")},
                     data={"overwrite": "true"})
    where = {"filename": "alpha.png", "type": "input"}
    full = server.http.get("/view", params=where)
    head = server.http.head("/view", params=where)
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-type"] == "image/png" and head.headers["content-length"] == str(len(full.content))
    assert server.http.head("/view", params={**where, "filename": "missing.png"}).status_code == 404

    webp = server.http.get("/view", params={**where, "preview": "webp;50"})
    assert webp.headers["content-type"] == "image/webp" and Image.open(io.BytesIO(webp.content)).format == "WEBP"
    jpeg = server.http.get("/view", params={**where, "preview": "jpeg;80"})
    assert Image.open(io.BytesIO(jpeg.content)).format == "JPEG"
    with_alpha = server.http.get("/view", params={**where, "preview": "jpeg", "channel": "a"})
    assert with_alpha.headers["content-type"] == "image/webp"  # as ComfyUI: alpha needs webp
    rgb = Image.open(io.BytesIO(server.http.get("/view", params={**where, "channel": "rgb"}).content))
    assert rgb.mode == "RGB" and rgb.getpixel((0, 0)) == (200, 100, 50)
    alpha = Image.open(io.BytesIO(server.http.get("/view", params={**where, "channel": "a"}).content))
    assert alpha.mode == "RGBA" and alpha.getpixel((0, 0)) == (0, 0, 0, 128)
    assert server.http.get("/view", params={**where, "channel": "rgba"}).content == full.content


def test_an_int_input_given_a_fraction_is_truncated_as_comfyui_does(server):
    prompt = example_prompt()
    prompt["3"]["inputs"]["steps"] = 2.5
    answer = server.http.post("/prompt", json={"prompt": prompt})
    assert answer.status_code == 200, answer.text
    prompt_id = answer.json()["prompt_id"]
    server.services.queue.wait(prompt_id, timeout=60)
    assert server.services.ledger.rows(prompt_id)[0].steps == 2


@pytest.mark.parametrize("node, name, constant", [("3", "seed", "NaN"), ("3", "cfg", "-Infinity"),
                                                  ("3", "note", "Infinity")], ids=repr)
def test_nan_or_infinity_in_a_prompt_is_a_400_not_a_server_error(server, node, name, constant):
    """Python's json reads NaN and Infinity, which JSON has not. A seed of NaN was refused, but the refusal
    quoting it could not be written as JSON: the client got a 500 instead of ComfyUI's 400. They are now
    refused wherever they are in the body (one in an input the node does not declare was kept and shown as
    null)."""
    prompt = example_prompt()
    prompt[node]["inputs"][name] = "@CONSTANT@"
    body = '{"prompt": %s}' % json.dumps(prompt).replace('"@CONSTANT@"', constant)
    answer = server.http.post("/prompt", content=body, headers={"Content-Type": "application/json"})
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["type"] == "invalid_prompt" and f"{constant} is not a JSON number" in error["message"]


def test_history_keeps_the_literals_as_comfyui_validation_converts_them(server):
    """ComfyUI writes each INT, FLOAT and STRING literal it validates back into the prompt that /queue and
    /history show: a client that sent its seed as text reads a number back, steps 2.5 reads 2, cfg 1 reads
    1.0. So does a history read from the ledger (after a restart); a 64-bit seed stays exact."""
    from webapp.comfy_api import ComfyBridge

    prompt = example_prompt()
    prompt["3"]["inputs"].update(seed="123", steps=2.5, cfg=1)
    links = {name: prompt["3"]["inputs"][name] for name in ("model", "positive", "negative", "latent_image")}
    prompt_id = run_prompt(server.http, prompt)
    restarted = ComfyBridge(server.services)  # remembers no prompt: reads the ledger, as after a restart
    server.services.queue.listeners.remove(restarted.on_batch_event)
    for history in (server.http.get(f"/history/{prompt_id}").json(), {prompt_id: restarted.history_entry(prompt_id)}):
        kept = history[prompt_id]["prompt"][2]["3"]["inputs"]
        assert kept["seed"] == 123 and kept["steps"] == 2
        assert kept["cfg"] == 1.0 and isinstance(kept["cfg"], float)
        assert {name: kept[name] for name in links} == links  # links stay as sent

    largest = example_prompt()
    largest["3"]["inputs"]["seed"] = 2**64 - 1
    prompt_id = run_prompt(server.http, largest)
    assert server.http.get(f"/history/{prompt_id}").json()[prompt_id]["prompt"][2]["3"]["inputs"]["seed"] == 2**64 - 1
