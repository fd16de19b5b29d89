"""ComfyUI's HTTP and WebSocket API, served from the same engine and recorded in the same ledger.

Existing ComfyUI clients (scripts, plugins, other apps) talk to this server unchanged: ``POST /prompt``,
``GET /history[/{id}]``, ``GET /view``, ``GET /queue``, ``POST /queue``, ``POST /interrupt``,
``GET /object_info[/{class}]``, ``GET /system_stats`` and ``/ws`` progress events. Each prompt is a
one-row batch in the ledger whose batch id is the prompt id; it runs on the same GPU queue as batches.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import mimetypes
import platform
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from engine.batch import BatchEvent
from engine.errors import AccessDenied, EngineError, WorkflowFormatError, WorkflowInvalid
from webapp.guard import ApiGuard, fastapi_dependency
from webapp.files import resolve_inside

COMFY_KIND = "comfy"


class ComfyBridge:
    """Prompt numbers, the prompt -> client map and the WebSocket fan-out of batch events."""

    def __init__(self, services: Any) -> None:
        self.services = services
        self._numbers = itertools.count(1)
        self._lock = threading.Lock()
        self.prompts: dict[str, dict[str, Any]] = {}  # prompt_id -> {number, client_id, prompt, extra_data}
        self.sockets: dict[str, set[Any]] = {}  # client_id -> websockets
        self.loop: asyncio.AbstractEventLoop | None = None
        services.queue.listeners.append(self.on_batch_event)

    # ------------------------------------------------------------------ submission

    def submit(self, body: dict[str, Any], user: str) -> dict[str, Any]:
        prompt = body.get("prompt")
        if not isinstance(prompt, dict):
            raise WorkflowFormatError("the request body needs a 'prompt' object in ComfyUI's API format")
        extra_data = body.get("extra_data") or {}
        png_extra: dict[str, Any] = {}
        extra_pnginfo = extra_data.get("extra_pnginfo") if isinstance(extra_data, dict) else None
        if isinstance(extra_pnginfo, dict):
            png_extra.update({str(k): v for k, v in extra_pnginfo.items()})
        prompt_id = str(body.get("prompt_id") or uuid.uuid4())
        if self.services.ledger.get_batch(prompt_id) is not None:
            raise WorkflowFormatError(f"prompt_id {prompt_id} was already used")
        runner = self.services.runner
        prepared = runner.prepare_workflow(prompt, user=user, batch_id=prompt_id, png_extra=png_extra, kind=COMFY_KIND)
        runner.start(prepared)
        with self._lock:
            number = next(self._numbers)
            self.prompts[prompt_id] = {
                "number": number,
                "client_id": body.get("client_id"),
                "prompt": prompt,
                "extra_data": extra_data,
                "outputs": self._output_nodes(prompt),
            }
        self.services.queue.submit(prompt_id)
        return {"prompt_id": prompt_id, "number": number, "node_errors": {}}

    def _output_nodes(self, prompt: dict[str, Any]) -> list[str]:
        registry = self.services.engine.registry
        outputs = []
        for node_id, node in prompt.items():
            cls = registry.get(node.get("class_type", "")) if isinstance(node, dict) else None
            if cls is not None and cls.output_node:
                outputs.append(str(node_id))
        return outputs

    # --------------------------------------------------------------------- history

    def history_entry(self, prompt_id: str) -> dict[str, Any] | None:
        batch = self.services.ledger.get_batch(prompt_id)
        if batch is None:
            return None
        rows = self.services.ledger.rows(prompt_id)
        row = rows[0] if rows else {}
        meta = self.prompts.get(prompt_id) or {}
        workflow = row.get("workflow")
        if isinstance(workflow, str):
            workflow = json.loads(workflow)
        status = row.get("status", "queued")
        outputs: dict[str, Any] = {}
        for image in _images_of(row):
            node = image.get("node_id") or "9"
            outputs.setdefault(node, {"images": []})["images"].append(
                {"filename": image["filename"], "subfolder": prompt_id, "type": "output"}
            )
        messages: list[Any] = []
        if status == "done":
            messages = [["execution_start", {"prompt_id": prompt_id}], ["execution_success", {"prompt_id": prompt_id}]]
        elif status in {"failed", "timed_out", "cancelled"}:
            messages = [
                ["execution_start", {"prompt_id": prompt_id}],
                ["execution_error", {"prompt_id": prompt_id, "exception_message": row.get("error") or status}],
            ]
        completed = status == "done"
        return {
            "prompt": [
                meta.get("number", 0),
                prompt_id,
                workflow or {},
                meta.get("extra_data", {}),
                meta.get("outputs") or self._output_nodes(workflow or {}),
            ],
            "outputs": outputs,
            "status": {
                "status_str": "success" if completed else ("error" if status not in {"queued", "running"} else status),
                "completed": completed,
                "messages": messages,
            },
        }

    def history(self, max_items: int | None = None) -> dict[str, Any]:
        batches = [b for b in self.services.ledger.list_batches(limit=max_items or 200) if _is_comfy(b)]
        result = {}
        for batch in batches:
            entry = self.history_entry(batch["id"])
            if entry is not None and entry["status"]["status_str"] in {"success", "error"}:
                result[batch["id"]] = entry
        return result

    def queue_state(self) -> dict[str, Any]:
        running, pending = [], []
        for batch_id in [*self._running_ids(), *self.services.queue.queued()]:
            meta = self.prompts.get(batch_id)
            if meta is None:
                continue
            item = [meta["number"], batch_id, meta["prompt"], meta["extra_data"], meta["outputs"]]
            progress = self.services.queue.status(batch_id)
            (running if progress is not None and progress.state == "running" else pending).append(item)
        return {"queue_running": running, "queue_pending": pending}

    def _running_ids(self) -> list[str]:
        return [b for b in self.prompts if (p := self.services.queue.status(b)) is not None and p.state == "running"]

    # ------------------------------------------------------------------ websockets

    def on_batch_event(self, event: BatchEvent) -> None:
        """Called on the queue thread: translate to ComfyUI messages and hand them to the event loop."""
        meta = self.prompts.get(event.batch_id)
        if meta is None or self.loop is None:
            return
        for message in self._messages(event, meta):
            self._send(meta.get("client_id"), message)

    def _messages(self, event: BatchEvent, meta: dict[str, Any]) -> list[dict[str, Any]]:
        pid = event.batch_id
        if event.kind == "batch_started":
            return [{"type": "execution_start", "data": {"prompt_id": pid, "timestamp": int(time.time() * 1000)}}]
        if event.kind == "node":
            return [{"type": "executing", "data": {"node": event.node_id, "display_node": event.node_id, "prompt_id": pid}}]
        if event.kind == "cached":
            return [{"type": "execution_cached", "data": {"nodes": [event.node_id], "prompt_id": pid}}]
        if event.kind == "step":
            return [{"type": "progress", "data": {"value": event.step, "max": event.steps, "prompt_id": pid, "node": event.node_id}}]
        if event.kind == "row_done":
            entry = self.history_entry(pid) or {"outputs": {}}
            executed = [
                {"type": "executed", "data": {"node": node, "display_node": node, "output": output, "prompt_id": pid}}
                for node, output in entry["outputs"].items()
            ]
            return [
                *executed,
                {"type": "execution_success", "data": {"prompt_id": pid, "timestamp": int(time.time() * 1000)}},
                {"type": "executing", "data": {"node": None, "prompt_id": pid}},
                self._status(),
            ]
        if event.kind == "row_failed":
            kind = "execution_interrupted" if (event.error or "").startswith("cancelled") else "execution_error"
            return [
                {
                    "type": kind,
                    "data": {
                        "prompt_id": pid,
                        "node_id": event.node_id,
                        "exception_message": event.error,
                        "exception_type": "ExecutionError",
                        "traceback": [],
                        "timestamp": int(time.time() * 1000),
                    },
                },
                self._status(),
            ]
        return []

    def _status(self) -> dict[str, Any]:
        remaining = len(self.services.queue.queued()) + len(self._running_ids())
        return {"type": "status", "data": {"status": {"exec_info": {"queue_remaining": remaining}}}}

    def _send(self, client_id: str | None, message: dict[str, Any]) -> None:
        targets = self.sockets.get(client_id, set()) if client_id else set().union(*self.sockets.values()) if self.sockets else set()
        for socket in list(targets):
            asyncio.run_coroutine_threadsafe(_safe_send(socket, message), self.loop)  # type: ignore[arg-type]


async def _safe_send(socket: Any, message: dict[str, Any]) -> None:
    try:
        await socket.send_json(message)
    except Exception:  # the client went away; its socket is dropped on disconnect
        pass


def _is_comfy(batch: dict[str, Any]) -> bool:
    return batch.get("template_name") == f"({COMFY_KIND})"


def _images_of(row: dict[str, Any]) -> list[dict[str, Any]]:
    record = row.get("record") or {}
    if isinstance(record, str):
        record = json.loads(record)
    images = record.get("images") if isinstance(record, dict) else None
    if images:
        return [{"filename": Path(i["file"]).name, "node_id": i.get("node_id")} for i in images]
    if row.get("image_path"):
        return [{"filename": Path(row["image_path"]).name, "node_id": None}]
    return []


def comfy_router(services: Any, guard: ApiGuard) -> Any:
    """The ComfyUI-compatible routes as a FastAPI router (mounted at the server's root)."""
    from fastapi import APIRouter, Depends, Query, Request, WebSocket, WebSocketDisconnect
    from fastapi.responses import FileResponse, JSONResponse

    router = APIRouter(tags=["ComfyUI-compatible"])
    bridge = ComfyBridge(services)
    router.bridge = bridge  # type: ignore[attr-defined]
    user = Depends(fastapi_dependency(guard))

    @router.post("/prompt")
    async def post_prompt(request: Request, caller: Any = user) -> Any:
        bridge.loop = asyncio.get_running_loop()
        try:
            body = await request.json()
        except ValueError:
            return JSONResponse({"error": {"type": "invalid_prompt", "message": "body is not JSON", "details": "", "extra_info": {}}, "node_errors": {}}, 400)
        try:
            return await asyncio.to_thread(bridge.submit, body, caller.name)
        except WorkflowInvalid as exc:
            return JSONResponse(exc.to_comfy(), 400)
        except WorkflowFormatError as exc:
            error = {"type": "invalid_prompt", "message": exc.message, "details": "", "extra_info": {}}
            return JSONResponse({"error": error, "node_errors": {}}, 400)

    @router.get("/prompt")
    def get_prompt_info(caller: Any = user) -> Any:
        remaining = len(services.queue.queued()) + len(bridge._running_ids())
        return {"exec_info": {"queue_remaining": remaining}}

    @router.get("/history")
    def get_history(max_items: int | None = Query(None), caller: Any = user) -> Any:
        return bridge.history(max_items)

    @router.get("/history/{prompt_id}")
    def get_history_one(prompt_id: str, caller: Any = user) -> Any:
        entry = bridge.history_entry(prompt_id)
        return {prompt_id: entry} if entry is not None else {}

    @router.get("/queue")
    def get_queue(caller: Any = user) -> Any:
        return bridge.queue_state()

    @router.post("/queue")
    async def post_queue(request: Request, caller: Any = user) -> Any:
        body = await request.json()
        targets = list(body.get("delete", [])) if isinstance(body, dict) else []
        if isinstance(body, dict) and body.get("clear"):
            targets += [b for b in services.queue.queued() if b in bridge.prompts]
        for prompt_id in targets:
            if prompt_id in bridge.prompts:
                services.queue.cancel(prompt_id)
        return {}

    @router.post("/interrupt")
    async def post_interrupt(request: Request, caller: Any = user) -> Any:
        try:
            body = await request.json()
        except ValueError:
            body = {}
        wanted = body.get("prompt_id") if isinstance(body, dict) else None
        for prompt_id in bridge._running_ids():
            if wanted is None or wanted == prompt_id:
                services.queue.cancel(prompt_id)
        return {}

    @router.get("/object_info")
    def get_object_info(caller: Any = user) -> Any:
        return services.engine.object_info()

    @router.get("/object_info/{node_class}")
    def get_object_info_one(node_class: str, caller: Any = user) -> Any:
        info = services.engine.object_info()
        return {node_class: info[node_class]} if node_class in info else {}

    @router.get("/system_stats")
    def get_system_stats(caller: Any = user) -> Any:
        return system_stats(services)

    @router.get("/view")
    def get_view(filename: str, subfolder: str = "", type: str = "output", caller: Any = user) -> Any:
        roots = {"output": services.settings.outputs_path, "temp": Path(services.settings.data_dir) / "temp", "input": services.settings.uploads_path}
        if type not in roots:
            raise AccessDenied(f"type must be one of {', '.join(roots)}", status=400, reason="bad_type")
        path = resolve_inside(Path(roots[type]), subfolder, filename)
        media = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return FileResponse(path, media_type=media, filename=path.name, content_disposition_type="inline")

    @router.websocket("/ws")
    async def websocket(socket: WebSocket, clientId: str | None = None, token: str | None = None) -> None:  # noqa: N803
        try:
            caller = guard.identify(socket.headers.get("authorization"), token)
        except AccessDenied:
            await socket.close(code=4401)
            return
        bridge.loop = asyncio.get_running_loop()
        client = clientId or uuid.uuid4().hex
        await socket.accept()
        bridge.sockets.setdefault(client, set()).add(socket)
        try:
            status = bridge._status()
            status["data"]["sid"] = client
            await socket.send_json(status)
            while True:
                await socket.receive_text()
        except WebSocketDisconnect:
            pass
        finally:
            bridge.sockets.get(client, set()).discard(socket)
            _ = caller

    return router


def system_stats(services: Any) -> dict[str, Any]:
    import torch

    from engine import __version__ as version

    try:
        import psutil

        memory = psutil.virtual_memory()
        ram_total, ram_free = memory.total, memory.available
    except ImportError:  # psutil comes with gradio; keep the route alive without it
        ram_total = ram_free = 0
    devices = []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(index)
            devices.append(
                {
                    "name": torch.cuda.get_device_name(index),
                    "type": "cuda",
                    "index": index,
                    "vram_total": total,
                    "vram_free": free,
                    "torch_vram_total": torch.cuda.memory_reserved(index),
                    "torch_vram_free": torch.cuda.memory_reserved(index) - torch.cuda.memory_allocated(index),
                }
            )
    else:
        devices.append({"name": "cpu", "type": "cpu", "index": None, "vram_total": ram_total, "vram_free": ram_free, "torch_vram_total": 0, "torch_vram_free": 0})
    return {
        "system": {
            "os": platform.system().lower(),
            "ram_total": ram_total,
            "ram_free": ram_free,
            "comfyui_version": f"sd35-batch {version}",
            "python_version": platform.python_version(),
            "pytorch_version": torch.__version__,
            "embedded_python": False,
            "argv": ["app.py"],
        },
        "devices": devices,
    }


__all__ = ["ComfyBridge", "comfy_router", "system_stats"]
_ = EngineError
