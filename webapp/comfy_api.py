"""ComfyUI's HTTP and WebSocket API, served from the same engine and recorded in the same ledger.

Existing ComfyUI clients (scripts, plugins, other apps) talk to this server unchanged: ``POST /prompt``,
``GET /prompt``, ``GET|POST /history[/{id}]``, ``GET|HEAD /view``, ``POST /upload/image``, ``GET /queue``,
``POST /queue``, ``POST /interrupt``, ``GET /object_info[/{class}]``, ``GET /system_stats``, ``GET /embeddings``,
``GET /extensions``, ``GET /features`` and ``/ws`` progress events (request and response shapes). Each prompt
is a one-row batch in the ledger whose batch id is the prompt id; it runs on the same GPU queue as
spreadsheet batches, and its images land in ``<outputs>/<prompt_id>/`` (previews in
``<data>/temp/<prompt_id>/``), so ``/view`` gets ``subfolder=<prompt_id>``.

Where this server cannot do what ComfyUI does it says so rather than pretend: ``executed`` messages are sent
when the prompt's images are on disk (the end of its row), not as each output node finishes, because the
PNGs are encoded off the GPU thread and stored with the ledger row; a /view URL sent earlier could 404.

A prompt that a full or unwritable disk stops (before it runs, or when its image cannot be written) is not
over: the engine runs it again by itself once there is space. ComfyUI has no message for that, so a client
is told only what ComfyUI would tell of a prompt that waits its turn: it is listed in ``/queue`` as pending
(and counted in ``queue_remaining``, sent in a ``status`` message), it has no ``/history`` entry and no
end-of-prompt message is sent, until it really ends: ``executed``, ``execution_success`` and ``executing``
with node null when it completes, or, deleted from the queue or interrupted by its id while it waits,
``execution_interrupted`` when it had begun executing (nothing, as for any pending prompt, when it had not).
The server's log says why it waits.
"""

# No postponed annotations here: FastAPI reads the route signatures (Request, UploadFile) at runtime.
import asyncio
import contextlib
import itertools
import json
import logging
import platform
import posixpath
import threading
import time
import uuid
from collections import OrderedDict
from datetime import datetime
from pathlib import Path
from typing import Any

from engine.batch import BatchEvent
from engine.errors import (
    AccessDenied,
    DeadlineExceeded,
    EngineError,
    ExecutionError,
    WorkflowFormatError,
    WorkflowInvalid,
)
from engine.execute import full_type_name
from engine.logs import log_context
from engine.store import check_batch_id, row_key
from engine.validate import prompt_as_comfyui_keeps_it
from webapp import handlers
from webapp.files import file_response, resolve_inside
from webapp.guard import ApiGuard, fastapi_dependency
from webapp.ratelimit import UploadLimit

log = logging.getLogger(__name__)

COMFY_KIND = "comfy"
COMFY_TEMPLATE_NAME = f"({COMFY_KIND})"  # how prepare_workflow records the batch's template
FINISHED = {"done", "failed", "timed_out", "cancelled"}
MAXIMUM_HISTORY_SIZE = 10000  # ComfyUI's: /history lists at most the last this many prompts
MAX_REMEMBERED_PROMPTS = 1000  # prompt bodies kept for /queue and /history; older ones are read from the ledger
VIEW_TYPES = ("output", "temp", "input")
# Queue events after which every socket is told the queue's new length (ComfyUI's queue_updated).
QUEUE_EVENTS = {"batch_queued", "batch_started", "batch_done", "batch_cancelled", "batch_failed",
                "batch_waiting_for_storage"}
# Queue states of a batch that is not over: a prompt in one of them is in /queue and has no history yet.
UNFINISHED_STATES = {"queued", "running", "waiting_for_storage"}
# Messages a socket may have waiting to be sent: a client that stops reading (a hung script whose
# connection stays open) is let go past this, instead of its messages piling up in memory for as long as
# the server runs. A prompt makes a few dozen messages; ComfyUI's own client reconnects when let go.
MAX_UNSENT_MESSAGES = 2000
# The ComfyUI release whose API this server answers like (clients gate features on this version).
COMFYUI_COMPAT_VERSION = "0.3.64"
# Credentials ComfyUI's front end puts into a prompt's extra_data for its paid API nodes (a comfy.org key or
# sign-in token). Every user reads every prompt's extra_data in /queue and /history, so they are dropped as
# the prompt arrives, as ComfyUI keeps them out of both; this server has no node that would use them.
SENSITIVE_EXTRA_DATA_KEYS = ("auth_token_comfy_org", "api_key_comfy_org")


def _now_ms() -> int:
    return int(time.time() * 1000)


def _ledger_ms(stamp: str) -> int:
    """A ledger timestamp (ISO 8601, UTC) in ComfyUI's unit: milliseconds since the epoch."""
    return int(datetime.fromisoformat(stamp).timestamp() * 1000)


# The exception type of a failed row recorded before rows kept how they failed.
LEGACY_EXCEPTION_TYPES = {"timed_out": full_type_name(DeadlineExceeded), "failed": full_type_name(ExecutionError)}


def failure_message(row: Any, timestamp: int) -> tuple[str, dict[str, Any]]:
    """ComfyUI's execution_interrupted or execution_error for a row that ended without an image: the same
    message on the socket and in /history, from what the ledger recorded of the failure."""
    failure = (row.extra or {}).get("failure") or {}
    data: dict[str, Any] = {
        "prompt_id": row.batch_id,
        "node_id": failure.get("node_id"),
        "node_type": failure.get("node_type"),
        "executed": list(failure.get("executed", [])),
        "timestamp": timestamp,
    }
    if row.status == "cancelled":
        return "execution_interrupted", data
    data.update(
        exception_message=row.error or row.status,
        exception_type=failure.get("exception_type") or LEGACY_EXCEPTION_TYPES.get(row.status, row.status),
        traceback=[],  # the engine reports errors by node and type, not by Python frames
        current_inputs=dict(failure.get("current_inputs", {})),
        current_outputs=list(failure.get("current_outputs", [])),
    )
    return "execution_error", data


def server_features(upload_limit: "UploadLimit") -> dict[str, Any]:
    """ComfyUI's server feature flags (GET /features, and the answer to a socket's feature_flags), saying
    only what this server does: it sends no preview images, so no preview metadata either, and it has no
    ComfyUI-Manager extension."""
    return {"supports_preview_metadata": False, "max_upload_size": upload_limit.max_bytes}


def view_roots(settings: Any) -> dict[str, Path]:
    """The folders ComfyUI's image types name: where /view reads and where each kind of image lives."""
    return {
        "output": Path(settings.outputs_path),
        "temp": Path(settings.data_path) / "temp",  # previews; BatchRunner.temp_dir puts them here
        "input": Path(settings.input_path),
    }


def comfy_error(exc: EngineError) -> dict[str, Any]:
    """ComfyUI's 400 body for a refused prompt: ``{"error": {...}, "node_errors": {...}}``."""
    if isinstance(exc, WorkflowInvalid):
        return exc.to_comfy()
    error = {"type": "invalid_prompt", "message": exc.message, "details": "", "extra_info": {}}
    return {"error": error, "node_errors": {}}


class Outbox:
    """A socket's messages waiting to be sent, in order, at most ``limit`` of them: one more means its client
    has stopped reading, and the outbox gives up (``given_up`` is set, the messages dropped), so the socket
    is closed. Used on the server's event loop only."""

    def __init__(self, limit: int = MAX_UNSENT_MESSAGES) -> None:
        self.limit = limit
        self.messages: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.given_up = asyncio.Event()

    def put(self, message: dict[str, Any]) -> None:
        if self.given_up.is_set():
            return
        if self.messages.qsize() >= self.limit:
            self.given_up.set()
            while not self.messages.empty():  # nobody will read them: free them now
                self.messages.get_nowait()
            return
        self.messages.put_nowait(message)

    async def get(self) -> dict[str, Any]:
        return await self.messages.get()

    def qsize(self) -> int:
        return self.messages.qsize()


class ComfyBridge:
    """Prompt numbers, the prompt -> client map, history in ComfyUI's shape and the WebSocket fan-out.

    Batch events arrive on the queue thread (:meth:`on_batch_event`); each connected socket has its own
    asyncio queue drained by one task on the server's loop, so its messages keep their order.
    """

    def __init__(self, services: Any) -> None:
        self.services = services
        self._numbers = itertools.count(1)
        self._lock = threading.Lock()
        self.prompts: OrderedDict[str, dict[str, Any]] = OrderedDict()  # prompt_id -> number, client, prompt
        self.batch_numbers: dict[str, int] = {}  # other batches on the queue -> their number in /queue
        self.sockets: dict[str, set[Outbox]] = {}  # client_id -> outboxes
        self.socket_users: dict[Outbox, str] = {}  # outbox -> the user who opened it
        self.max_unsent = MAX_UNSENT_MESSAGES
        self.loop: asyncio.AbstractEventLoop | None = None
        services.queue.listeners.append(self.on_batch_event)

    # ------------------------------------------------------------------ submission

    def submit(self, body: Any, user: str) -> dict[str, Any]:
        """Validate and queue a prompt; WorkflowInvalid / WorkflowFormatError / BatchError when refused.

        As ComfyUI: the output nodes that validate run and the others come back in ``node_errors`` (the
        prompt is refused only when none validates); ``partial_execution_targets`` limits the run to those
        output nodes; ``front`` queues the prompt ahead of every waiting batch (its number is negative).
        """
        if not isinstance(body, dict) or not isinstance(body.get("prompt"), dict):
            raise WorkflowFormatError("the request body needs a 'prompt' object in ComfyUI's API format")
        prompt = body["prompt"]
        extra_data = dict(body["extra_data"]) if isinstance(body.get("extra_data"), dict) else {}
        if body.get("client_id") is not None:
            extra_data["client_id"] = body["client_id"]  # as ComfyUI: the client travels in extra_data
        for key in SENSITIVE_EXTRA_DATA_KEYS:
            extra_data.pop(key, None)
        targets = body.get("partial_execution_targets")
        if targets is not None and not (isinstance(targets, list) and all(isinstance(t, (str, int)) for t in targets)):
            raise WorkflowFormatError("partial_execution_targets must be a list of node ids")
        extra_pnginfo = extra_data.get("extra_pnginfo")
        # 'prompt' is always the API JSON the engine ran; a client cannot replace that chunk.
        png_extra = {str(k): v for k, v in extra_pnginfo.items() if k != "prompt"} if isinstance(extra_pnginfo, dict) else {}
        prompt_id = check_batch_id(str(body.get("prompt_id") or uuid.uuid4()))
        if self.services.ledger.get_batch(prompt_id) is not None:
            raise WorkflowFormatError(f"prompt_id {prompt_id} was already used")
        client_id = extra_data.get("client_id")
        front = bool(body.get("front"))
        with log_context(prompt_id=prompt_id, user=user):
            runnable, problems = self.services.engine.runnable_part(
                prompt, [str(t) for t in targets] if targets is not None else None
            )
            runner = self.services.runner
            prepared = runner.prepare_workflow(
                runnable, user=user, batch_id=prompt_id, png_extra=png_extra or None, kind=COMFY_KIND
            )
            runner.start(prepared)
            with self._lock:
                number = -next(self._numbers) if front else next(self._numbers)
                self.prompts[prompt_id] = {
                    "number": number,
                    "client_id": client_id,
                    # with its literals as ComfyUI's validation writes them back ("123" -> 123): /queue and
                    # /history show it so
                    "prompt": prompt_as_comfyui_keeps_it(prompt, self.services.engine.registry, targets),
                    "extra_data": extra_data,
                    "outputs": self._output_nodes(runnable.to_api()),
                }
                self._forget_old()
            self.services.queue.submit(prompt_id, front=front)
            log.info("prompt queued (number %d)", number)
        node_errors = WorkflowInvalid(problems).node_errors() if problems else {}
        return {"prompt_id": prompt_id, "number": number, "node_errors": node_errors}

    def _forget_old(self) -> None:
        """Keep at most MAX_REMEMBERED_PROMPTS, dropping the oldest finished ones (caller holds the lock)."""
        excess = len(self.prompts) - MAX_REMEMBERED_PROMPTS
        for prompt_id in list(self.prompts):
            if excess <= 0:
                break
            progress = self.services.queue.status(prompt_id)
            if progress is None or progress.state not in UNFINISHED_STATES:
                del self.prompts[prompt_id]
                excess -= 1

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
        """ComfyUI's history entry of a finished prompt; None while it is unknown, queued or running."""
        batch = self.services.ledger.get_batch(prompt_id)
        if batch is None or batch.get("template_name") != COMFY_TEMPLATE_NAME:
            return None
        if self.services.ledger.hidden_from_history(prompt_id):
            return None  # deleted from history by a client (the ledger keeps it)
        rows = self.services.ledger.rows(prompt_id)
        return self._history_entry(batch, rows[0] if rows else None, self._view_roots())

    def _history_entry(self, batch: dict[str, Any], row: Any, roots: dict[str, Path]) -> dict[str, Any] | None:
        """The history entry of the prompt ``batch`` whose (only) row is ``row``, once it has ended."""
        prompt_id = batch["id"]
        if row is None or row.status not in FINISHED:
            return None
        began_at = row.started_at or batch.get("started_at")  # a full disk stopping the row clears its start
        if row.status == "cancelled" and began_at is None:
            return None  # deleted from the queue before it ran: ComfyUI keeps no history of it
        meta = self.prompts.get(prompt_id) or {}
        workflow = row.workflow or {}
        outputs: dict[str, Any] = {}
        for image in self.images_of(row, roots):
            outputs.setdefault(image.pop("node_id") or "output", {"images": []})["images"].append(image)
        # When it ran, as the ledger recorded it. A row refused before it ran has no start: it ended then.
        finished_at = row.finished_at or began_at
        started = {"prompt_id": prompt_id, "timestamp": _ledger_ms(began_at or finished_at)}
        ended = {"prompt_id": prompt_id, "timestamp": _ledger_ms(finished_at)}
        if row.status == "done":
            messages = [["execution_start", started], ["execution_success", ended]]
        else:
            kind, failure = failure_message(row, ended["timestamp"])
            messages = [["execution_start", started], [kind, failure]]
        return {
            "prompt": [
                meta.get("number", 0),
                prompt_id,
                meta.get("prompt") or prompt_as_comfyui_keeps_it(workflow, self.services.engine.registry),
                meta.get("extra_data", {}),
                meta.get("outputs") or self._output_nodes(workflow),
            ],
            "outputs": outputs,
            "status": {
                "status_str": "success" if row.status == "done" else "error",
                "completed": row.status == "done",
                "messages": messages,
            },
            "meta": {node: {"node_id": node, "display_node": node} for node in outputs},
        }

    def _view_roots(self) -> dict[str, Path]:
        return {kind: root.resolve() for kind, root in view_roots(self.services.settings).items()}

    def images_of(self, row: Any, roots: dict[str, Path] | None = None) -> list[dict[str, Any]]:
        """A row's images as ComfyUI addresses them: filename, subfolder (under the type's folder) and type,
        "output" (SaveImage) or "temp" (PreviewImage), the folders /view serves. ``roots``: those folders,
        resolved (:meth:`_view_roots`), when the caller lists many rows."""
        roots = roots or self._view_roots()
        images = row.images or ([{"path": row.image_path, "node_id": None}] if row.image_path else [])
        found = []
        for image in images:
            kind = image.get("type", "output")
            path, root = Path(image["path"]), roots[kind]
            if ".." in path.parts or not path.is_relative_to(root):  # the engine writes resolved paths: rare
                path = path.resolve()
            subfolder = path.parent.relative_to(root).as_posix() if path.parent.is_relative_to(root) else ""
            found.append({"filename": path.name, "subfolder": subfolder, "type": kind, "node_id": image.get("node_id")})
        return found

    def history(self, max_items: int | None = None) -> dict[str, Any]:
        """Finished prompts in the order they ended, oldest first: the most recent ``max_items`` when given,
        else all of the last MAXIMUM_HISTORY_SIZE, as ComfyUI keeps them. The ledger picks ComfyUI's prompts
        that have ended, so other batches and unfinished prompts never take a place of the limit."""
        limit = MAXIMUM_HISTORY_SIZE if max_items is None else max(0, min(max_items, MAXIMUM_HISTORY_SIZE))
        batches = self.services.ledger.ended_batches(COMFY_TEMPLATE_NAME, limit=limit) if limit else []
        # One read of every prompt's row, not three reads a prompt: ComfyUI keeps up to 10,000 of them.
        first_rows = self.services.ledger.first_rows([batch["id"] for batch in batches])
        roots = self._view_roots()
        result = {}
        for batch in reversed(batches):
            entry = self._history_entry(batch, first_rows.get(batch["id"]), roots)
            if entry is not None:
                result[batch["id"]] = entry
        return result

    def hide_history(self, prompt_ids: list[str] | None, caller: Any) -> int:
        """ComfyUI's POST /history: ``prompt_ids`` (None: every finished prompt) leave /history. The ledger
        is an audit log, so nothing is deleted: they are only hidden from history, and only those the
        caller may control (their own, or any for an admin)."""
        ledger = self.services.ledger
        if prompt_ids is None:
            prompt_ids = [b["id"] for b in ledger.ended_batches(COMFY_TEMPLATE_NAME)]
        mine = [p for p in prompt_ids if self.history_entry(p) is not None
                and handlers.may_control(self.services, caller, p)]
        return ledger.hide_from_history(mine, hidden_by=caller.name)

    def queue_state(self) -> dict[str, Any]:
        """ComfyUI's ``/queue``: everything on the shared GPU queue, running and waiting, in queue order.

        Spreadsheet batches share the queue with prompts, so they are listed too (a client then sees what
        its prompt waits for): as items with an empty prompt, no outputs and the batch in ``extra_data``.
        Batches waiting for disk space come last among the pending ones: they run again by themselves.
        """
        queue = self.services.queue
        running, pending = queue.running(), queue.queued() + queue.waiting_for_storage()
        return {"queue_running": [self._queue_item(b) for b in running],
                "queue_pending": [self._queue_item(b) for b in dict.fromkeys(pending) if b not in running]}

    def _queue_item(self, batch_id: str) -> list[Any]:
        meta = self.prompts.get(batch_id)
        if meta is not None:
            return [meta["number"], batch_id, meta["prompt"], meta["extra_data"], meta["outputs"]]
        batch = self.services.ledger.get_batch(batch_id) or {}
        about = {"id": batch_id, "template": batch.get("template_name"), "user": batch.get("user"),
                 "rows": batch.get("row_count")}
        return [self.batch_numbers.get(batch_id, 0), batch_id, {}, {"batch": about}, []]

    def running_ids(self) -> list[str]:
        """The ComfyUI prompts running now (what /interrupt may stop; a spreadsheet batch never)."""
        return [p for p in self.services.queue.running() if p in self.prompts]

    def pending_ids(self) -> list[str]:
        """The ComfyUI prompts waiting now, for their turn or for disk space (what POST /queue may delete; a
        spreadsheet batch never)."""
        queue = self.services.queue
        return [p for p in queue.queued() + queue.waiting_for_storage() if p in self.prompts]

    def waiting_for_storage_ids(self) -> list[str]:
        """The ComfyUI prompts a full or unwritable disk holds up (an /interrupt naming one ends its wait: its
        client may have seen it begin)."""
        return [p for p in self.services.queue.waiting_for_storage() if p in self.prompts]

    def queue_remaining(self) -> int:
        state = self.queue_state()
        return len(state["queue_running"]) + len(state["queue_pending"])

    # ------------------------------------------------------------------ websockets

    def on_batch_event(self, event: BatchEvent) -> None:
        """Called on the queue thread: translate to ComfyUI messages and hand them to the event loop.

        Every change of the queue (a batch or prompt queued, started, finished, failed or deleted) sends
        ``status`` to every socket, as ComfyUI's ``queue_updated`` does; a prompt's own messages go to its
        client only.
        """
        meta = self.prompts.get(event.batch_id)
        if meta is None:
            with self._lock:
                if event.kind == "batch_queued":
                    self.batch_numbers[event.batch_id] = next(self._numbers)
                elif event.kind in {"batch_done", "batch_cancelled", "batch_failed"}:
                    self.batch_numbers.pop(event.batch_id, None)
        if self.loop is None:
            return
        if meta is None:
            if event.kind in QUEUE_EVENTS:
                self._send(None, self.status_message())
            return
        batch = self.services.ledger.get_batch(event.batch_id)
        owner = batch.get("user") if batch is not None else None
        if event.kind in QUEUE_EVENTS:  # before execution_start and before the end's executing: null
            self._send(None, self.status_message())
        for message in self._messages(event):
            self._send(meta.get("client_id"), message, owner)

    def _messages(self, event: BatchEvent) -> list[dict[str, Any]]:
        pid = event.batch_id
        finished = {"type": "executing", "data": {"node": None, "prompt_id": pid}}
        if event.kind == "batch_started":
            return [{"type": "execution_start", "data": {"prompt_id": pid, "timestamp": _now_ms()}}]
        if event.kind == "node":
            return [{"type": "executing", "data": {"node": event.node_id, "display_node": event.node_id, "prompt_id": pid}}]
        if event.kind == "cached":  # once, before any node runs, as ComfyUI sends it
            return [{"type": "execution_cached", "data": {"nodes": list(event.nodes), "prompt_id": pid, "timestamp": _now_ms()}}]
        if event.kind == "step":
            return [{"type": "progress", "data": {"value": event.step, "max": event.steps, "prompt_id": pid, "node": event.node_id}}]
        if event.kind == "row_done":
            entry = self.history_entry(pid) or {"outputs": {}}
            executed = [
                {"type": "executed", "data": {"node": node, "display_node": node, "output": output, "prompt_id": pid}}
                for node, output in entry["outputs"].items()
            ]
            return [*executed, {"type": "execution_success", "data": {"prompt_id": pid, "timestamp": _now_ms()}}]
        if event.kind == "row_failed":
            row = self.services.ledger.get_generation(row_key(pid, event.row_number or 1))
            if row is None:
                return []
            kind, data = failure_message(row, _now_ms())
            return [{"type": kind, "data": data}]
        if event.kind in {"batch_done", "batch_failed"}:
            # As ComfyUI's worker: the queue's status first, then the prompt's end, executing with node null.
            return [finished]
        if event.kind == "batch_cancelled":
            # Deleted while it waited: a prompt that had begun executing (then a full disk stopped it) ends as
            # interrupted, as in its history; one that never began leaves the queue without a word, as in ComfyUI.
            entry = self.history_entry(pid)
            if entry is None:
                return []
            kind, data = entry["status"]["messages"][-1]
            return [{"type": kind, "data": data}, finished]
        # batch_waiting_for_storage: the prompt is not over (it runs again once there is space); the status
        # message already told every socket the queue changed, and ComfyUI has no word for the rest.
        return []

    def status_message(self) -> dict[str, Any]:
        return {"type": "status", "data": {"status": {"exec_info": {"queue_remaining": self.queue_remaining()}}}}

    def _send(self, client_id: str | None, message: dict[str, Any], owner: str | None = None) -> None:
        """Queue ``message`` for the client's sockets (every socket when the prompt named no client), as
        ComfyUI does, but only sockets opened by the prompt's ``owner``: another user never sees its progress,
        whatever client id they connect with. A prompt without an owner (no sign-in) goes to everyone."""
        with self._lock:
            if client_id:
                outboxes = list(self.sockets.get(client_id, ()))
            else:
                outboxes = [box for boxes in self.sockets.values() for box in boxes]
            if owner:
                outboxes = [box for box in outboxes if self.socket_users.get(box) == owner]
        loop = self.loop
        if loop is None or loop.is_closed():
            return
        for outbox in outboxes:
            loop.call_soon_threadsafe(outbox.put, message)

    def connect(self, client_id: str, user: str) -> Outbox:
        outbox = Outbox(self.max_unsent)
        with self._lock:
            self.sockets.setdefault(client_id, set()).add(outbox)
            self.socket_users[outbox] = user
        return outbox

    def disconnect(self, client_id: str, outbox: Outbox) -> None:
        with self._lock:
            self.socket_users.pop(outbox, None)
            boxes = self.sockets.get(client_id)
            if boxes is not None:
                boxes.discard(outbox)
                if not boxes:
                    del self.sockets[client_id]


def image_variant(path: Path, preview: str | None, channel: str) -> tuple[bytes, str]:
    """(bytes, format) of ComfyUI's /view variants of an image: ``preview`` "webp;90" / "jpeg;80" re-encodes
    (webp whenever alpha is asked for, quality 90 unless given), else ``channel`` "rgb" (no alpha) or "a"
    (the alpha alone, on transparent black) as PNG."""
    import io

    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
    except (UnidentifiedImageError, OSError) as exc:
        raise AccessDenied(f"'{path.name}' is not an image: it has no preview or channels", status=400,
                           reason="not_an_image") from exc
    buffer = io.BytesIO()
    if preview is not None:
        parts = preview.split(";")
        image_format = parts[0] if parts[0] in ("webp", "jpeg") and "a" not in channel else "webp"
        quality = int(parts[-1]) if parts[-1].isdigit() else 90
        if image_format == "jpeg" or channel == "rgb":
            image = image.convert("RGB")
        image.save(buffer, format=image_format, quality=min(quality, 100))
        return buffer.getvalue(), image_format
    if channel == "rgb":
        image.convert("RGB").save(buffer, format="PNG")
    else:
        alpha = image.getchannel("A") if image.mode == "RGBA" else Image.new("L", image.size, 255)
        only_alpha = Image.new("RGBA", image.size)
        only_alpha.putalpha(alpha)
        only_alpha.save(buffer, format="PNG")
    return buffer.getvalue(), "png"


def save_uploaded_image(
    root: Path, filename: str, subfolder: str, data: bytes, overwrite: bool, may_overwrite: bool = True
) -> Path:
    """Store an uploaded image under ``root`` (the input, temp or output folder) under a safe name, as
    ComfyUI does: a clash gets ``name (1).png`` unless ``overwrite``, and a file with the same bytes already
    under the name is the answer itself (nothing is written twice). Only files that really are images are
    kept; where ``may_overwrite`` is False (the outputs, which the ledger vouches for) overwrite is refused."""
    import io

    from PIL import Image, UnidentifiedImageError

    from engine.naming import safe_filename

    try:
        with Image.open(io.BytesIO(data)) as probe:
            probe.verify()
            image_format = probe.format
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise AccessDenied(f"'{filename[:80]}' is not an image file", status=400, reason="not_an_image") from exc
    if subfolder.startswith(("/", "\\")):
        raise AccessDenied("subfolder must stay inside its folder", status=403, reason="bad_path")
    folder = root.resolve()
    for part in Path(subfolder.rstrip("/")).parts:
        if part in {"..", ""} or ":" in part or "\\" in part:
            raise AccessDenied("subfolder must stay inside its folder", status=403, reason="bad_path")
        folder = folder / part
    if folder != root.resolve() and root.resolve() not in folder.parents:
        raise AccessDenied("subfolder must stay inside its folder", status=403, reason="bad_path")
    if overwrite and not may_overwrite:
        raise AccessDenied("images in the output folder are never overwritten; upload without overwrite",
                           status=403, reason="no_overwrite")
    folder.mkdir(parents=True, exist_ok=True)
    suffix = image_suffix(Path(filename).suffix, image_format)
    name = safe_filename(Path(Path(filename).name).stem or "image", set(), suffix=suffix)
    target = folder / name
    counter = 1
    while target.exists() and not overwrite:
        if target.is_file() and target.read_bytes() == data:
            return target  # ComfyUI's duplicate check: the same image is not stored again
        target = folder / f"{Path(name).stem} ({counter}){suffix}"
        counter += 1
    temp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    temp.write_bytes(data)
    temp.replace(target)
    return target


# The extension an upload is stored under when its own name's does not fit what the file really is.
FORMAT_SUFFIXES = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tiff"}
SAME_FORMAT = {"MPO": "JPEG"}  # phone cameras' multi-picture JPEGs are JPEG files to everyone but Pillow


def image_suffix(suffix: str, image_format: str | None) -> str:
    """The extension an uploaded image is stored under: its own when that is one of its format's, else the
    format's own. A PNG named ``photo.html`` is stored as ``photo.png``, so no upload is ever served as a
    page, and every stored name says what the file is."""
    from PIL import Image

    image_format = SAME_FORMAT.get(image_format or "", image_format or "")
    if suffix and Image.registered_extensions().get(suffix.lower()) == image_format:
        return suffix  # as the client named it, case and all
    return FORMAT_SUFFIXES.get(image_format, f".{image_format.lower() or 'png'}")


def client_feature_flags(text: str) -> dict[str, Any] | None:
    """The flags in a client's ``{"type": "feature_flags", "data": {...}}`` message; None for any other."""
    try:
        message = json.loads(text)
    except ValueError:
        return None
    if not isinstance(message, dict) or message.get("type") != "feature_flags":
        return None
    return message.get("data") if isinstance(message.get("data"), dict) else {}


class _NotJsonNumber(ValueError):
    """NaN, Infinity or -Infinity in a request body: Python's json reads them, JSON has no such numbers."""


def _refuse_constant(name: str) -> Any:
    raise _NotJsonNumber(f"{name} is not a JSON number")


def _prompt_body(data: bytes) -> Any:
    """A /prompt request's JSON, refusing NaN and Infinity anywhere in it (_NotJsonNumber): no JSON client sends
    them (a browser writes null), and a refusal quoting one (a seed of NaN) cannot be written as JSON."""
    return json.loads(data, parse_constant=_refuse_constant)


async def _json_object(request: Any) -> dict[str, Any]:
    """The request's JSON object; anything else (no body, not JSON, a list) reads as ``{}``, as ComfyUI's
    optional bodies do."""
    try:
        body = await request.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def comfy_router(services: Any, guard: ApiGuard, upload_limit: "UploadLimit") -> Any:
    """The ComfyUI-compatible routes as a FastAPI router (mounted at the server's root); ``.bridge`` is its
    :class:`ComfyBridge`."""
    from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile, WebSocket, WebSocketDisconnect
    from fastapi.responses import JSONResponse

    router = APIRouter(tags=["ComfyUI-compatible"])
    bridge = ComfyBridge(services)
    router.bridge = bridge  # type: ignore[attr-defined]
    user = Depends(fastapi_dependency(guard))

    @router.post("/prompt")
    async def post_prompt(request: Request, caller: Any = user) -> Any:
        bridge.loop = asyncio.get_running_loop()
        try:
            body = _prompt_body(await request.body())
        except _NotJsonNumber as exc:
            return JSONResponse(comfy_error(WorkflowFormatError(f"the request body is not JSON: {exc}")), 400)
        except ValueError:
            return JSONResponse(comfy_error(WorkflowFormatError("the request body is not JSON")), 400)
        try:
            return await asyncio.to_thread(bridge.submit, body, caller.name)
        except AccessDenied:
            raise
        except EngineError as exc:  # ComfyUI answers every refused prompt with a 400 in its own shape
            return JSONResponse(comfy_error(exc), 400)

    @router.get("/prompt")
    def get_prompt_info(caller: Any = user) -> Any:
        return {"exec_info": {"queue_remaining": bridge.queue_remaining()}}

    @router.get("/history")
    def get_history(max_items: int | None = Query(None), caller: Any = user) -> Any:
        return bridge.history(max_items)

    @router.post("/history")
    async def post_history(request: Request, caller: Any = user) -> Any:
        """ComfyUI's history clear and delete: hides prompts from /history; the ledger keeps them."""
        body = await _json_object(request)
        if body.get("clear"):
            await asyncio.to_thread(bridge.hide_history, None, caller)
        if isinstance(body.get("delete"), list):
            await asyncio.to_thread(bridge.hide_history, [str(p) for p in body["delete"]], caller)
        return {}

    @router.get("/history/{prompt_id}")
    def get_history_one(prompt_id: str, caller: Any = user) -> Any:
        entry = bridge.history_entry(prompt_id)
        return {prompt_id: entry} if entry is not None else {}

    @router.get("/queue")
    def get_queue(caller: Any = user) -> Any:
        return bridge.queue_state()

    @router.post("/queue")
    async def post_queue(request: Request, caller: Any = user) -> Any:
        body = await _json_object(request)
        targets = [str(p) for p in body.get("delete", [])] if isinstance(body.get("delete"), list) else []
        pending = set(bridge.pending_ids())
        if body.get("clear"):
            targets += list(pending)
        for prompt_id in targets:
            # ComfyUI deletes queued prompts only (running ones need /interrupt); a user only their own. A
            # spreadsheet batch listed in /queue is left alone: it is stopped from the batch pages or /api.
            if prompt_id in pending and handlers.may_control(services, caller, prompt_id):
                services.queue.cancel(prompt_id)
        return {}

    @router.post("/interrupt")
    async def post_interrupt(request: Request, caller: Any = user) -> Any:
        wanted = (await _json_object(request)).get("prompt_id")
        # A prompt a full disk holds up is stopped only when named: it is not what runs now.
        named = [wanted] if wanted in bridge.waiting_for_storage_ids() else []
        for prompt_id in bridge.running_ids() + named:
            if (wanted is None or wanted == prompt_id) and handlers.may_control(services, caller, prompt_id):
                services.queue.cancel(prompt_id)
        return {}

    @router.get("/object_info")
    def get_object_info(caller: Any = user) -> Any:
        return services.engine.object_info()

    @router.get("/object_info/{node_class}")
    def get_object_info_one(node_class: str, caller: Any = user) -> Any:
        return services.engine.object_info(node_class)

    @router.get("/system_stats")
    def get_system_stats(caller: Any = user) -> Any:
        return system_stats(services)

    @router.get("/embeddings")
    def get_embeddings(caller: Any = user) -> Any:
        """ComfyUI's textual-inversion embeddings: the engine loads none, so there are none to name."""
        return []

    @router.get("/extensions")
    def get_extensions(caller: Any = user) -> Any:
        """ComfyUI's front-end extension scripts: this server serves none (its pages are its own)."""
        return []

    @router.get("/features")
    def get_features(caller: Any = user) -> Any:
        return server_features(upload_limit)

    @router.get("/view")
    @router.head("/view", include_in_schema=False)  # ComfyUI's routes answer HEAD as GET without the body
    def get_view(
        filename: str, subfolder: str = "", type: str = "output",  # noqa: A002 - ComfyUI's parameter names
        preview: str | None = None, channel: str | None = None, caller: Any = user,
    ) -> Any:
        """The file, or as ComfyUI: ``preview=webp;90`` (or ``jpeg;Q``) a re-encoded copy, ``channel=rgb``
        the image without alpha, ``channel=a`` its alpha alone (``rgba``, the default: the file itself)."""
        from fastapi.responses import Response

        roots = view_roots(services.settings)
        if type not in roots:
            raise AccessDenied(f"type must be one of {', '.join(VIEW_TYPES)}", status=400, reason="bad_type")
        path = resolve_inside(roots[type], subfolder, filename)
        if preview is None and channel not in ("rgb", "a"):
            return file_response(path)  # ComfyUI serves the file itself for rgba and any unknown channel too
        data, image_format = image_variant(path, preview, channel or "")
        name = Path(path.name).with_suffix(f".{image_format}").name
        return Response(data, media_type=f"image/{image_format}",
                        headers={"Content-Disposition": f'inline; filename="{name}"', "X-Content-Type-Options": "nosniff"})

    @router.post("/upload/image")
    async def upload_image(
        request: Request,
        image: UploadFile = File(...),
        subfolder: str = Form(""),
        type: str = Form("input"),  # noqa: A002 - ComfyUI's field name
        overwrite: str = Form("false"),
        caller: Any = user,
    ) -> Any:
        """ComfyUI's image upload: into the input folder (for LoadImage), or with ``type`` temp or output
        into those folders, never outside them. An output is never overwritten."""
        roots = view_roots(services.settings)
        if type not in roots:
            raise AccessDenied(f"type must be one of {', '.join(VIEW_TYPES)}", status=400, reason="bad_type")
        # Outputs and previews live in a folder per batch or prompt: a file added there shows among its
        # owner's images (/view, /files), so only whoever may control that batch adds one.
        # normalised first, as the file will be saved: "./<id>" and "x/../<id>" name the same folder
        folder = posixpath.normpath(subfolder.replace("\\", "/")).strip("/").split("/")[0]
        if type != "input" and folder not in ("", ".") and services.ledger.get_batch(folder) is not None \
                and not handlers.may_control(services, caller, folder):
            raise AccessDenied(f"{type} folder {folder} belongs to another user's batch", status=403,
                               reason="not_owner", batch_id=folder)
        data = await image.read(upload_limit.max_bytes + 1)
        if len(data) > upload_limit.max_bytes:
            raise upload_limit.too_large(len(data), declared=False)
        saved = await asyncio.to_thread(
            save_uploaded_image, roots[type], image.filename or "image.png", subfolder, data,
            overwrite.strip().lower() in {"1", "true", "yes"}, type != "output",
        )
        return {"name": saved.name, "subfolder": subfolder.rstrip("/"), "type": type}

    @router.websocket("/ws")
    async def websocket(socket: WebSocket, clientId: str | None = None, token: str | None = None) -> None:  # noqa: N803
        try:
            who = guard.identify(socket.headers.get("authorization"), token)
        except AccessDenied:
            await socket.close(code=4401)  # before accept: the handshake is refused
            return
        bridge.loop = asyncio.get_running_loop()
        client = clientId or uuid.uuid4().hex
        await socket.accept()
        outbox = bridge.connect(client, who.name)
        greeting = bridge.status_message()
        greeting["data"]["sid"] = client
        await socket.send_json(greeting)

        async def forward() -> None:
            while True:
                await socket.send_json(await outbox.get())

        async def read() -> None:
            first = True
            while True:  # clients may send nothing; reading notices the disconnect
                received = await socket.receive()
                if received["type"] == "websocket.disconnect":
                    return
                if received.get("text") is None:
                    continue  # as ComfyUI: a binary frame is ignored
                if first and client_feature_flags(received["text"]) is not None:
                    # ComfyUI answers a client's first message, its feature flags, with the server's own
                    outbox.put({"type": "feature_flags", "data": server_features(upload_limit)})
                first = False

        sender, reader = asyncio.create_task(forward()), asyncio.create_task(read())
        giving_up = asyncio.create_task(outbox.given_up.wait())
        try:
            await asyncio.wait({reader, giving_up}, return_when=asyncio.FIRST_COMPLETED)
            if giving_up.done():
                log.warning("ComfyUI client %s stopped reading its WebSocket (%d messages unsent): closing it; "
                            "a client reconnects", client, outbox.limit)
        finally:
            for task in (sender, reader, giving_up):
                task.cancel()
            bridge.disconnect(client, outbox)
        if reader.done() and not reader.cancelled():
            with contextlib.suppress(WebSocketDisconnect):
                reader.result()  # what else stopped reading is raised, as before

    return router


def system_stats(services: Any) -> dict[str, Any]:
    """ComfyUI's ``/system_stats``: OS, RAM, versions and one entry per device."""
    import torch

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
        devices.append(
            {"name": "cpu", "type": "cpu", "index": None, "vram_total": ram_total, "vram_free": ram_free,
             "torch_vram_total": 0, "torch_vram_free": 0}
        )
    return {
        "system": {
            "os": platform.system().lower(),
            "ram_total": ram_total,
            "ram_free": ram_free,
            "comfyui_version": COMFYUI_COMPAT_VERSION,
            "server": "sd35-batch",
            "python_version": platform.python_version(),
            "pytorch_version": torch.__version__,
            "embedded_python": False,
            "argv": ["app.py"],
        },
        "devices": devices,
    }


__all__ = ["ComfyBridge", "comfy_error", "comfy_router", "system_stats"]
