"""Scale-out: rows run on Celery workers over a Redis broker; the coordinator stays the single writer.

The only engine module that imports Celery, and only the scale-out path imports it (``--broker``).

Roles::

    coordinator (web app / CLI)                 Redis                      GPU worker (python app.py worker)
    BatchRunner -> CeleryDispatcher.run() --> queue sd35.ckpt.<name> --> run_row task -> RowExecutor
         ledger + output folder  <-- RowResult dict (PNG bytes base64) <-- result backend

Guarantees (see docs/SCALE-OUT.md):

* At-least-once delivery. A task is acknowledged only after it returned (``task_acks_late``); a worker
  that dies mid-row leaves the message unacknowledged and Redis hands it out again after the broker's
  visibility timeout, which is set longer than the longest row. Because that is slow, the dispatcher
  also notices a lost row itself: every worker keeps a heartbeat key with a short TTL naming the task it
  runs; a started task whose worker's heartbeat vanished, or that ran past its deadline plus a margin, is
  sent again as the next attempt (task id ``<row_key>:<attempt>``).
* Exactly-once results. The dispatcher yields at most one result per row (late and repeated results are
  dropped), and the ledger's unique ``row_key`` makes a repeat a no-op at the coordinator as well.
  Before running, a worker skips a task that the dispatcher has superseded (a newer attempt was sent, or
  the row already has its result), so a re-delivered stale message costs no GPU time.
* Poison rows. A row whose attempts lose their worker ``max_attempts`` times is failed, so one bad row
  cannot take down every worker in turn.
* Redis restarts. The dispatcher notices a new Redis ``run_id``, or Redis losing its data without a restart
  (its own key there gone: FLUSHALL, a failover to an empty replica), or reconnects after an outage, and sends
  again every row whose result it does not have; a worker reconnects on its own.
* Coordinator restarts. ``BatchRunner.run`` resumes from the ledger: rows not ``done`` are sent again.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import re
import socket
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from engine.broker import BrokerUrl, check_channels, parse_broker_url, reach_broker, unreachable_errors
from engine.jobs import CANCELLED, FAILED, MAX_ROW_ATTEMPTS, TIMED_OUT, RowJob, RowResult
from engine.models.resolve import KIND_FOLDERS
from engine.rows import RowExecutor
from engine.errors import BrokerError, EngineError
from engine.nodes.context import ProgressEvent

log = logging.getLogger(__name__)

TASK_RUN_ROW = "sd35.run_row"
DEFAULT_QUEUE = "sd35.rows"  # rows whose checkpoint no live worker announces; every worker consumes it
CHECKPOINT_QUEUE_PREFIX = "sd35.ckpt."  # rows for a checkpoint: consumed by the workers holding it loaded
FILE_QUEUE_PREFIX = "sd35.file."  # rows for a checkpoint nobody holds: consumed by workers that have its file
FILES_REFRESH_S = 30.0  # how often a worker lists its model folders again for its announcement
FLEET_CACHE_S = 3.0  # how long the coordinator reuses the workers' announced model names
WORKER_KEY_PREFIX = "sd35:worker:"  # heartbeat: JSON WorkerAnnouncement, TTL = 3 heartbeats
ROW_KEY_PREFIX = "sd35:row:"  # the task id the dispatcher wants for a row, or "done:<task id>"
CANCEL_KEY_PREFIX = "sd35:cancel:"  # set while a batch is being cancelled; workers poll it between steps
# Kept by each coordinator while it sends rows: gone while Redis still runs means Redis lost its data
DISPATCHER_KEY_PREFIX = "sd35:dispatcher:"
ROW_DONE_MARK = "done"
# Added to a row's deadline before the coordinator or the worker's watchdog calls a running row hung:
# model loading on a cold worker and the PNG encode happen outside the sampler's deadline.
DEFAULT_DEADLINE_MARGIN_S = 120.0
TEST_FAULTS = ("exit", "hang", "delay")


def checkpoint_queue(checkpoint: str) -> str:
    """The queue of rows that need ``checkpoint``: workers holding that model consume it."""
    return CHECKPOINT_QUEUE_PREFIX + _queue_safe(checkpoint)


def file_queue(checkpoint: str) -> str:
    """The queue of rows for ``checkpoint`` when no live worker holds it: workers whose models folder has
    the file consume it, so such a row never lands on a worker that would fail it for a missing file."""
    return FILE_QUEUE_PREFIX + _queue_safe(checkpoint)


def _queue_safe(checkpoint: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", checkpoint)


def broker_visibility_timeout_s(row_timeout_s: float, margin_s: float = DEFAULT_DEADLINE_MARGIN_S) -> int:
    """Redis re-delivers an unacknowledged message after this long. It must exceed the longest row
    (deadline plus loading and encoding), or a slow row that is still running is handed to a second worker."""
    return int(max(3600.0, 2 * (row_timeout_s + margin_s)))


def make_celery(
    broker_url: str,
    result_backend: str | None = None,
    *,
    row_timeout_s: float = 600.0,
    worker: "RowWorker | None" = None,
) -> Any:
    """Build the Celery app (no module-level app). ``worker`` is set only inside a worker process: it is
    what the ``run_row`` task runs on; the coordinator's app only sends tasks and reads results. The URLs go
    through :func:`parse_broker_url`, so Celery's clients connect as our own do (TLS verified alike)."""
    from celery import Celery

    broker = parse_broker_url(broker_url).url
    backend = parse_broker_url(result_backend).url if result_backend else broker
    app = Celery("sd35", broker=broker, backend=backend, set_as_current=False)
    visibility = broker_visibility_timeout_s(row_timeout_s)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_acks_late=True,  # acknowledged after the row ran, so a killed worker's row is re-delivered
        task_reject_on_worker_lost=True,
        task_track_started=True,  # the STARTED state names the worker, for the dispatcher's lost-row check
        worker_prefetch_multiplier=1,  # one row reserved at a time: nothing waits behind a busy GPU
        worker_concurrency=1,
        task_default_queue=DEFAULT_QUEUE,
        broker_transport_options={"visibility_timeout": visibility},
        result_backend_transport_options={"visibility_timeout": visibility},
        result_expires=24 * 3600,
        result_extended=False,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,  # a worker outlives a Redis restart
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_hijack_root_logger=False,
        task_send_sent_event=False,
        worker_send_task_events=False,
    )

    # resultrepr_maxsize: the success log line must not carry megabytes of base64 PNG
    @app.task(name=TASK_RUN_ROW, bind=True, resultrepr_maxsize=200)
    def run_row(task: Any, job_data: dict[str, Any]) -> dict[str, Any]:
        if worker is None:
            raise EngineError("this process has no models loaded; rows run only in `python app.py worker`")
        return worker.run_task(task, job_data)

    return app


# --------------------------------------------------------------------------------------- the worker


@dataclass
class WorkerAnnouncement:
    """What a live worker holds and does, kept in Redis under a key that expires unless refreshed."""

    name: str
    models: list[str]
    queues: list[str]
    pid: int
    host: str
    instance: str = ""  # differs on every start, so a restarted worker with the same name is told apart
    task_id: str | None = None  # the row it runs right now
    task_started: float | None = None  # wall clock
    seen: float = field(default_factory=time.time)
    # Model names per kind (checkpoints, loras, ...) this worker can load from its folders: the coordinator
    # validates workflows against them, so it needs no copy of the models.
    files: dict[str, list[str]] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str | bytes) -> "WorkerAnnouncement":
        # Fields this version does not know are dropped: during a rolling upgrade workers and the
        # coordinator run different versions against the same Redis.
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in json.loads(text).items() if k in known})


def live_workers(redis_client: Any) -> list[WorkerAnnouncement]:
    """Workers whose heartbeat has not expired."""
    found = []
    for key in redis_client.scan_iter(match=WORKER_KEY_PREFIX + "*", count=100):
        raw = redis_client.get(key)
        if raw is not None:
            found.append(WorkerAnnouncement.from_json(raw))
    return sorted(found, key=lambda w: w.name)


class RowWorker:
    """The worker side: runs one row job at a time on the resident engine and keeps its heartbeat.

    ``test_faults`` maps a row key to "exit" (the process dies mid-row), "hang" (the row never returns)
    or "delay:<seconds>" (the row starts late). It exists for the scale-out tests only, is passed in by
    code, and has no setting, environment variable or CLI option: nothing in a sheet can reach it.
    """

    def __init__(
        self,
        executor: RowExecutor,
        redis_client: Any,
        *,
        name: str,
        models: list[str],
        queues: list[str],
        heartbeat_s: float = 2.0,
        deadline_margin_s: float = DEFAULT_DEADLINE_MARGIN_S,
        test_faults: dict[str, str] | None = None,
        list_files: Callable[[], dict[str, list[str]]] | None = None,
        files_refresh_s: float = FILES_REFRESH_S,
    ) -> None:
        self.executor = executor
        self.redis = redis_client
        self.name = name
        self.models = list(models)
        self.queues = list(queues)
        self.heartbeat_s = heartbeat_s
        self.deadline_margin_s = deadline_margin_s
        self.test_faults = dict(test_faults or {})
        for row_key, fault in self.test_faults.items():
            if fault.split(":")[0] not in TEST_FAULTS:
                raise ValueError(f"unknown test fault {fault!r} for {row_key}; supported: {', '.join(TEST_FAULTS)}")
        self._lock = threading.Lock()
        self._task_id: str | None = None
        self._task_started: float | None = None
        self._task_deadline: float | None = None  # monotonic; the watchdog stops the process after it
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.instance = uuid.uuid4().hex[:12]
        self._list_files = list_files
        self.files_refresh_s = files_refresh_s
        # Set by run_worker once Celery runs: asks Celery to consume one more queue (a checkpoint file added
        # later), and the queues it consumes now. The request is a broadcast that is lost when Celery is not
        # listening yet (still starting) or Redis blinks, so a queue is announced only once it is consumed.
        self.add_queue: Callable[[str], None] | None = None
        self.consumed_queues: Callable[[], set[str]] | None = None
        self._pending_queues: set[str] = set()  # asked for, not consumed yet: neither they nor their files announced
        self.files = list_files() if list_files is not None else {}
        self._files_listed = time.monotonic()

    # heartbeat + watchdog ------------------------------------------------------------------------

    def start_heartbeat(self) -> None:
        self._safe_beat()  # the broker may blink at start; the loop announces the worker again
        self._thread = threading.Thread(target=self._heartbeat_loop, name="sd35-heartbeat", daemon=True)
        self._thread.start()

    def stop_heartbeat(self) -> None:
        self._stop.set()
        try:
            self.redis.delete(WORKER_KEY_PREFIX + self.name)
        except Exception:  # Redis may be gone at shutdown; the key expires on its own
            pass

    def beat(self) -> None:
        with self._lock:
            announcement = WorkerAnnouncement(
                self.name, self.models, self.queues, os.getpid(), socket.gethostname(), self.instance,
                self._task_id, self._task_started, files=self._announced_files(),
            )
        ttl_ms = int(self.heartbeat_s * 3 * 1000)
        self.redis.set(WORKER_KEY_PREFIX + self.name, announcement.to_json(), px=ttl_ms)

    def _announced_files(self) -> dict[str, list[str]]:
        """The model files, less checkpoints whose file queue is not consumed yet (rows for them would go
        to any worker, which lacks the file). Called under the lock."""
        return {kind: [name for name in names if kind != "checkpoints" or file_queue(name) not in self._pending_queues]
                for kind, names in self.files.items()}

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            with self._lock:
                overdue = self._task_deadline is not None and time.monotonic() > self._task_deadline
                task_id = self._task_id
            if overdue:
                # A row stuck past its deadline (a hung kernel that never reaches the step callback)
                # cannot be interrupted from Python. Stop the process: the row's message is still
                # unacknowledged, the dispatcher sends it again, and the supervisor restarts the worker.
                log.error("row %s ran past its deadline plus %ss; stopping worker %s", task_id,
                          self.deadline_margin_s, self.name)
                os._exit(75)
            self._refresh_files()
            try:
                self.beat()
            except Exception as exc:  # Redis restarting: keep beating, the key comes back when it is up
                log.warning("heartbeat failed: %s", exc)

    def _refresh_files(self) -> None:
        """Model files added to (or removed from) the folders since the last listing reach the announcement:
        a new checkpoint file once this worker consumes its file queue (a worker that announced the queue
        without consuming it would leave the rows sent there waiting for ever)."""
        self._announce_consumed_queues()
        if self._list_files is None or time.monotonic() - self._files_listed < self.files_refresh_s:
            return
        self._files_listed = time.monotonic()
        try:
            files = self._list_files()
        except OSError as exc:  # a network share blinking: keep announcing the last listing
            log.warning("could not list the model folders: %s", exc)
            return
        new_queues = [file_queue(name) for name in files.get("checkpoints", [])
                      if file_queue(name) not in self.queues]
        if new_queues and self.add_queue is not None:
            for queue in new_queues:  # asked again at every listing until consumed: a request may be lost
                try:
                    self.add_queue(queue)
                except Exception as exc:  # the broker blinking: the next listing tries again
                    log.warning("could not start consuming %s: %s", queue, exc)
                    return
                if queue not in self._pending_queues:
                    log.info("a new checkpoint file: asking to consume %s", queue)
        with self._lock:
            if self.add_queue is not None:
                self._pending_queues.update(new_queues)
            self.files = files
        self._announce_consumed_queues()

    def _announce_consumed_queues(self) -> None:
        """Queues asked for that Celery consumes now join the announcement, with their checkpoint files."""
        with self._lock:
            consumed = self.consumed_queues() if self.consumed_queues is not None else set()
            started = sorted(self._pending_queues & consumed)
            if started:
                self._pending_queues.difference_update(started)
                self.queues = [*self.queues[:-1], *started, self.queues[-1]]  # the default queue stays last
                for queue in started:
                    log.info("consuming %s", queue)

    # the task ------------------------------------------------------------------------------------

    def run_task(self, task: Any, job_data: dict[str, Any]) -> dict[str, Any]:
        """Body of the ``run_row`` task: a RowResult as a dict, or ``{"superseded": ...}`` when skipped."""
        job = RowJob.from_dict(job_data)
        task_id = task.request.id
        wanted = self._get(ROW_KEY_PREFIX + job.row_key)
        if wanted is not None and wanted != task_id:
            # A newer attempt was sent, or the row already has its result: a re-delivered stale message.
            log.info("skipping %s: the coordinator wants %s", task_id, wanted)
            return {"superseded": task_id, "row_key": job.row_key, "worker": self.name}
        with self._lock:
            self._task_id, self._task_started = task_id, time.time()
            self._task_deadline = time.monotonic() + job.deadline_s + self.deadline_margin_s
        try:
            self._safe_beat()
            self._report(task, {})  # names this process as the one running the row
            self._apply_test_fault(job)
            last_step = [0.0]
            # Cumulative: the coordinator polls, so each report repeats the latest sampler step as well.
            progress: dict[str, Any] = {}

            def on_progress(row_key: str, event: ProgressEvent) -> None:
                progress.update(node_id=event.node_id, class_type=event.class_type)
                if event.kind == "step":
                    now = time.monotonic()
                    progress.update(step=event.value, steps=event.maximum, step_node=event.node_id)
                    if event.value < event.maximum and now - last_step[0] < 0.2:
                        return  # fewer writes to Redis on fast steps; the last step always goes out
                    last_step[0] = now
                elif event.kind != "node":
                    return
                self._report(task, progress)

            cancel_key = CANCEL_KEY_PREFIX + job.batch_id
            checked = [0.0, False]

            def should_cancel() -> bool:
                now = time.monotonic()
                if now - checked[0] >= 0.5:
                    checked[0] = now
                    checked[1] = self._get(cancel_key) is not None
                return bool(checked[1])

            result = self.executor.execute([job], on_progress=on_progress, should_cancel=should_cancel)[0]
            result.worker = self.name
            settled = self._get(ROW_KEY_PREFIX + job.row_key)
            if settled is not None and settled.startswith(ROW_DONE_MARK + ":"):
                # Another attempt's result was recorded while this one ran (this worker was stalled): nobody
                # will collect this one, so it is not left in Redis (an image's worth) until it expires.
                log.info("dropping %s: the row was settled by %s meanwhile", task_id, settled)
                return {"superseded": task_id, "row_key": job.row_key, "worker": self.name}
            return result.to_dict()
        finally:
            with self._lock:
                self._task_id = self._task_started = self._task_deadline = None
            self._safe_beat()

    def _report(self, task: Any, progress: dict[str, Any]) -> None:
        meta = {"worker": self.name, "instance": self.instance, **progress}
        try:
            task.update_state(state="PROGRESS", meta=meta)
        except Exception as exc:  # progress is best effort; the row goes on
            log.warning("progress report failed: %s", exc)

    def _apply_test_fault(self, job: RowJob) -> None:
        fault = self.test_faults.get(job.row_key)
        if fault is None:
            return
        kind, _, argument = fault.partition(":")
        log.warning("test fault %r on row %s", fault, job.row_key)
        if kind == "exit":
            os._exit(137)  # as if the kernel's OOM killer or a SIGKILL took the worker mid-row
        if kind == "hang":
            while True:
                time.sleep(3600)
        if kind == "delay":
            time.sleep(float(argument or 1.0))

    def _get(self, key: str) -> str | None:
        try:
            raw = self.redis.get(key)
        except Exception as exc:  # Redis down: run the row; the coordinator drops a duplicate result
            log.warning("could not read %s: %s", key, exc)
            return None
        return raw.decode() if isinstance(raw, bytes) else raw

    def _safe_beat(self) -> None:
        try:
            self.beat()
        except Exception as exc:
            log.warning("heartbeat failed: %s", exc)


def _wait_for_broker(redis_client: Any, broker: BrokerUrl, *, retry_s: float = 2.0) -> None:
    """Return once Redis answers; until then say so every few tries (Celery waits for its broker too).
    BrokerError at once when it refuses us (see :func:`engine.broker.reach_broker`): waiting would not
    help, and a supervisor must see the failure."""
    tries = 0
    while (unreachable := reach_broker(redis_client, broker)) is not None:
        if tries % 15 == 0:
            log.warning("waiting for the broker at %s: %s", broker, unreachable)
        tries += 1
        time.sleep(retry_s)


class _NameClaim:
    """Takes ``nodename`` in Redis (:meth:`take`) and keeps it announced, with no models and no queues, until
    the worker's own heartbeat takes over."""

    def __init__(self, redis_client: Any, nodename: str, heartbeat_s: float) -> None:
        self.redis, self.nodename, self.heartbeat_s = redis_client, nodename, heartbeat_s
        self.key = WORKER_KEY_PREFIX + nodename
        self.ttl_ms = int(heartbeat_s * 3000)
        self.claim = WorkerAnnouncement(nodename, [], [], os.getpid(), socket.gethostname(), "starting").to_json()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="sd35-name-claim", daemon=True)

    def take(self) -> None:
        """Claim the name atomically (SET NX), so two workers started under one name at the same moment
        cannot both pass; EngineError naming the holder when a live worker has it (see
        :func:`_refuse_a_taken_name`)."""
        if self.redis.set(self.key, self.claim, nx=True, px=self.ttl_ms):
            return
        _refuse_a_taken_name(self.redis, self.nodename)
        self.redis.set(self.key, self.claim, px=self.ttl_ms)  # the holder was a dead process of this host

    def _announce(self) -> None:
        try:
            self.redis.set(self.key, self.claim, px=self.ttl_ms)
        except unreachable_errors() as exc:
            log.warning("could not announce %s while loading: %s", self.nodename, exc)

    def _loop(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            self._announce()

    def __enter__(self) -> "_NameClaim":
        self._announce()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _refuse_a_taken_name(redis_client: Any, nodename: str) -> None:
    """EngineError when a live worker announces ``nodename``: the two would overwrite each other's
    heartbeat, and the dispatcher would take each one's rows for lost. A stale announcement of a process
    on this host that is gone (the worker being restarted after a crash) does not count."""
    raw = redis_client.get(WORKER_KEY_PREFIX + nodename)
    if raw is None:
        return
    try:
        holder = WorkerAnnouncement.from_json(raw)
    except (ValueError, KeyError, TypeError):
        return
    from engine.batch import process_alive

    # Gone from this host, or this very process: in a container a restarted worker is pid 1 again
    if holder.host == socket.gethostname() and (holder.pid == os.getpid() or not process_alive(holder.pid)):
        return
    raise EngineError(
        f"a worker named {nodename} is already running (pid {holder.pid} on {holder.host}); give this one "
        "another --name", worker=nodename,
    )


def worker_queues(models: list[str], checkpoint_files: list[str] = ()) -> list[str]:
    """A worker consumes the queue of each checkpoint it holds, the file queue of each checkpoint file it
    has, and the default queue."""
    held = [checkpoint_queue(m) for m in models]
    files = [file_queue(name) for name in checkpoint_files]
    return list(dict.fromkeys(held + files)) + [DEFAULT_QUEUE]


def model_files(resolver: Any) -> dict[str, list[str]]:
    """Every model name of every kind ``resolver`` finds in its folders (what a worker announces)."""
    return {kind: resolver.available(kind) for kind in KIND_FOLDERS}


def run_worker(
    settings: Any,
    broker: str,
    models: list[str] | None = None,
    *,
    name: str | None = None,
    engine: Any = None,
    heartbeat_s: float = 2.0,
    test_faults: dict[str, str] | None = None,
    loglevel: str = "INFO",
    files_refresh_s: float = FILES_REFRESH_S,
) -> None:
    """Run a GPU worker until it is stopped: load ``models`` (default: the default checkpoint) once,
    keep them resident, announce them, and take row jobs one at a time from their queues.

    The pool is ``solo``: tasks run in this process, so the resident model is never forked or reloaded.
    """
    import redis

    from engine.runtime import Engine

    if not broker:
        raise EngineError("a worker needs the Redis URL of the broker: --broker redis://HOST:6379/0 "
                          "(or SD35_BROKER)", setting="broker")
    broker_url = parse_broker_url(broker)
    models = list(models or [settings.default_checkpoint])
    name = name or f"sd35-{socket.gethostname()}-{os.getpid()}"
    nodename = name if "@" in name else f"{name}@{socket.gethostname()}"
    redis_client = redis.Redis.from_url(broker_url.url, socket_timeout=10, socket_connect_timeout=5)
    # Before loading anything: a supervisor restarting a worker whose broker is down must not reload the
    # model in a loop, and a second worker under a live worker's name would make its rows look lost.
    _wait_for_broker(redis_client, broker_url)
    check_channels(redis_client, broker_url, "worker")
    name_claim = _NameClaim(redis_client, nodename, heartbeat_s)
    name_claim.take()
    # Announced from now on, holding nothing yet: a second worker under this name started while the models
    # load is refused too, and no row is routed here before the models are ready.
    with name_claim:
        engine = engine or Engine(settings)
        for model in models:
            log.info("loading and warming up %s", model)
            # Resident from now on, compiled and its kernels chosen: the first row pays for none of it.
            warm = engine.warm_up(model, gpu_batch=1)
            log.info("%s ready: loaded in %.1f s, warm-up step %.1f s", model, warm["load_s"], warm["sample_s"])
    list_files = functools.partial(model_files, engine.models.resolver)
    queues = worker_queues(models, list_files()["checkpoints"])
    # One job at a time: a batch of one keeps each worker's rows independent of its neighbours.
    executor = RowExecutor(engine, max_gpu_batch=1, worker_name=nodename)
    worker = RowWorker(executor, redis_client, name=nodename, models=models, queues=queues,
                       heartbeat_s=heartbeat_s, test_faults=test_faults, list_files=list_files,
                       files_refresh_s=files_refresh_s)
    app = make_celery(broker_url.url, row_timeout_s=float(settings.row_timeout_s), worker=worker)
    # A checkpoint file added later: this worker starts consuming its file queue (a remote-control message
    # to itself, handled between rows), and announces it once Celery consumes it (the queues it consumes
    # are Celery's selection, which the message's handler extends).
    worker.add_queue = lambda queue: app.control.add_consumer(queue, destination=[nodename], reply=False)
    worker.consumed_queues = lambda: set(app.amqp.queues.consume_from or ())
    worker.start_heartbeat()
    # Celery's worker_main drops the exit status of the worker it ran: a worker that Celery stops on an
    # unrecoverable error (an ACL user refused Celery's own keys) would exit 0, and a supervisor
    # that restarts on failure would take it for a clean stop. The worker instance says it (celeryd_init
    # is Celery's documented first signal of a worker starting, with the instance).
    from celery.signals import celeryd_init

    started: list[Any] = []

    def keep_instance(sender: Any = None, instance: Any = None, **_: Any) -> None:
        if sender == nodename:
            started.append(instance)

    celeryd_init.connect(keep_instance, weak=False)
    try:
        app.worker_main(
            argv=[
                # Celery's banner is for a person at a terminal; a log collector reading JSON gets the
                # same facts from the "ready" records.
                *(["--quiet"] if getattr(settings, "log_format", "console") == "json" else []),
                "worker", "--pool=solo", "--concurrency=1", f"--hostname={nodename}",
                f"--queues={','.join(queues)}", f"--loglevel={loglevel}",
                "--without-gossip", "--without-mingle", "--without-heartbeat",
            ]
        )
    finally:
        celeryd_init.disconnect(keep_instance)
        worker.stop_heartbeat()
        # Celery turned stdout and stderr into loggers for the worker's run; what is said now is ours
        sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
    status = getattr(started[0], "exitcode", None) if started else None
    if status:
        raise EngineError(f"worker {nodename} stopped: Celery gave up on an error it logged above (exit status "
                          f"{status})", worker=nodename, exit_status=status)


# ----------------------------------------------------------------------------------- the coordinator


@dataclass
class _Flight:
    """One row the dispatcher has sent and still waits for."""

    job: RowJob
    task_ids: list[str]  # every attempt sent; the first result of any of them counts
    sent_at: float
    worker: str | None = None
    instance: str | None = None
    started_at: float | None = None  # monotonic, when the dispatcher first saw it started
    missing_since: float | None = None  # monotonic, when its worker's heartbeat was first missed
    losses: int = 0  # attempts whose worker died or hung
    queue: str = DEFAULT_QUEUE
    cancelled: bool = False
    node_id: str | None = None
    step_node: str | None = None
    step: int = -1

    @property
    def task_id(self) -> str:
        return self.task_ids[-1]


class _OutageLog:
    """Says that Redis is unreachable (or full) when it starts, then every ``every_s`` seconds, and when it
    ends: the coordinator retries once a second, and a line per try would bury the rest of an outage's log."""

    def __init__(self, every_s: float = 30.0) -> None:
        self.every_s = every_s
        self.since: float | None = None
        self.said_at = 0.0
        # Redis refused writes for want of memory at some time in this outage, whatever its last error (a
        # full Redis, then a network blink): the workers' heartbeats and results were refused meanwhile
        self.refused_writes = False

    def failed(self, exc: BaseException) -> None:
        now = time.monotonic()
        full = _redis_full(exc)
        self.refused_writes = self.refused_writes or full
        state = "full" if full else "unreachable"
        if self.since is None:
            self.since = self.said_at = now
            advice = f"; {REDIS_FULL_ADVICE}" if full else ""
            log.warning("Redis %s (%s); retrying every second%s", state, exc, advice)
        elif now - self.said_at >= self.every_s:
            self.said_at = now
            log.warning("Redis still %s after %.0f s (%s); retrying", state, now - self.since, exc)

    def ended(self) -> None:
        if self.since is not None:
            log.warning("Redis %s again after %.0f s", "accepts writes" if self.refused_writes else "reachable",
                        time.monotonic() - self.since)
            self.since, self.refused_writes = None, False


# A Redis at its maxmemory with the noeviction policy (what a broker must have: an evicted queue or
# result is a lost row) refuses every write with "OOM command not allowed". It passes once results are
# collected or memory is added, so the coordinator waits, as for an outage, instead of stopping the batch.
REDIS_FULL_ADVICE = ("it refuses writes at its maxmemory: give it more memory (maxmemory, or a larger plan) or "
                     "free some; rows in flight are sent again once it accepts writes")


def _redis_full(exc: BaseException) -> bool:
    import redis

    return isinstance(exc, redis.exceptions.OutOfMemoryError)


def _waited_errors() -> tuple[type[BaseException], ...]:
    """What the coordinator waits out: Redis unreachable, or full."""
    import redis

    return (*unreachable_errors(), redis.exceptions.OutOfMemoryError)


class CeleryDispatcher:
    """Sends row jobs to Celery workers and yields their results as they complete (see module docs).

    ``max_in_flight`` bounds how many rows sit in Redis at once (default: two per live worker, at least
    four); ``max_attempts`` is how many times a row may lose its worker before it is failed as poison.
    """

    def __init__(
        self,
        broker_url: str,
        *,
        result_backend: str | None = None,
        max_attempts: int = MAX_ROW_ATTEMPTS,
        max_in_flight: int | None = None,
        row_timeout_s: float = 600.0,
        deadline_margin_s: float = DEFAULT_DEADLINE_MARGIN_S,
        poll_interval_s: float = 0.1,
        lost_confirm_s: float = 1.0,
        cancel_grace_s: float = 10.0,
        holder_grace_s: float = 300.0,
    ) -> None:
        import redis

        self.broker = parse_broker_url(broker_url)
        self.max_attempts = max_attempts
        self.max_in_flight = max_in_flight
        self.deadline_margin_s = deadline_margin_s
        self.poll_interval_s = poll_interval_s
        self.lost_confirm_s = lost_confirm_s
        self.cancel_grace_s = cancel_grace_s
        self.holder_grace_s = holder_grace_s
        # Every worker seen lately and when: rows for a model only a worker that just went away has (killed
        # and being restarted, or Redis restarted under everyone) wait in its queue for up to
        # holder_grace_s instead of going to workers that would fail them for want of the file.
        self._seen: dict[str, tuple[float, WorkerAnnouncement]] = {}
        self.app = make_celery(self.broker.url, result_backend, row_timeout_s=row_timeout_s)
        self.redis = redis.Redis.from_url(self.broker.url, socket_timeout=5, socket_connect_timeout=2)
        self._info_refused = False  # an ACL user without INFO (managed Redis): Redis restarts go by our key alone
        self._check_access()
        self._row_key_ttl_s = broker_visibility_timeout_s(row_timeout_s, deadline_margin_s) * 2
        self._data_key = DISPATCHER_KEY_PREFIX + uuid.uuid4().hex
        self._data_token = ""  # the value of _data_key: a new one each time the key had to be written again
        self._unconsumed_since: dict[str, float] = {}  # queue -> when rows waited in it with no live consumer
        self._fleet: tuple[float, list[WorkerAnnouncement]] = (-FLEET_CACHE_S, [])

    # Rows run elsewhere: the coordinator never loads a model (see BatchRunner.switch_checkpoint).
    runs_rows_elsewhere = True

    def _check_access(self) -> None:
        """BrokerError at start-up when Redis refuses us (a wrong password, a certificate that cannot be
        verified, the wrong scheme for the port, an ACL user without the channels Celery needs): a batch
        would otherwise wait for ever, its log saying only that Redis is unreachable. An unreachable Redis
        is no refusal: the coordinator starts, and batches wait for it."""
        try:
            unreachable = reach_broker(self.redis, self.broker)
            if unreachable is None:
                check_channels(self.redis, self.broker, "coordinator")
        except BrokerError:
            self.close()
            raise
        if unreachable is not None:
            log.warning("the broker at %s is unreachable for now (%s); batches wait for it", self.broker,
                        unreachable)

    def workers(self) -> list[WorkerAnnouncement]:
        """The live workers and what they hold."""
        return live_workers(self.redis)

    def fleet_models(self, kind: str) -> list[str]:
        """Model names of ``kind`` that live workers can load: the coordinator's validation accepts them
        beside its own files. Read from Redis at most every few seconds (a batch validates every row);
        empty while Redis is unreachable, so validation then knows only the local files."""
        read_at, fleet = self._fleet
        if time.monotonic() - read_at >= FLEET_CACHE_S:
            try:
                fleet = live_workers(self.redis)
            except unreachable_errors() as exc:
                log.warning("could not read the workers' models from Redis: %s", exc)
                fleet = []
            self._fleet = (time.monotonic(), fleet)
        names: list[str] = []
        for worker in fleet:
            names.extend(name for name in worker.files.get(kind, []) if name not in names)
        return names

    def close(self) -> None:
        self.redis.close()
        self.app.close()

    # run -----------------------------------------------------------------------------------------

    def run(
        self,
        jobs: list[RowJob],
        on_event: Callable[[str, Any], None] | None,
        should_cancel: Callable[[], bool] | None,
    ) -> Iterator[RowResult]:
        """Yield one RowResult per job, in completion order."""
        waiting: deque[RowJob] = deque(jobs)
        flights: dict[str, _Flight] = {}
        run_id: str | None = None
        live: dict[str, WorkerAnnouncement] = {}
        cancelled_at: float | None = None
        batch_ids = {job.batch_id for job in jobs}
        outage = _OutageLog()
        try:
            while waiting or flights:
                try:
                    current_run_id = self._redis_run_id()
                    if outage.refused_writes:
                        # The workers' heartbeats and stored results were refused meanwhile: their rows
                        # would look lost, and a result never stored would be waited for until its deadline.
                        log.warning("sending %d row(s) again after Redis refused writes", len(flights))
                        self._resend_all(flights)
                    outage.ended()
                    if run_id is not None and current_run_id != run_id:
                        log.warning("Redis restarted or lost its data; sending %d row(s) again", len(flights))
                        self._resend_all(flights)
                    run_id = current_run_id
                    live = {w.name: w for w in live_workers(self.redis)}
                    self._note_seen(live)
                    if cancelled_at is None and should_cancel is not None and should_cancel():
                        cancelled_at = time.monotonic()
                        self._cancel(batch_ids, flights)
                    if cancelled_at is not None:
                        while waiting:
                            yield RowResult(waiting.popleft().row_key, CANCELLED, "cancelled before it started")
                        for row_key in [k for k, f in flights.items() if f.started_at is None]:
                            # Revoked and marked done: a worker that still takes its message skips it.
                            self._finish(flights, row_key)
                            yield RowResult(row_key, CANCELLED, "cancelled before it started")
                        if time.monotonic() - cancelled_at > self.cancel_grace_s:
                            for row_key in list(flights):
                                flight = self._finish(flights, row_key)
                                yield RowResult(row_key, CANCELLED, "cancelled while on a worker",
                                                worker=flight.worker or "?")
                            break
                    else:
                        self._fill(waiting, flights, live)
                        self._reroute_orphans(flights, live)
                    for row_key in list(flights):
                        result = self._poll(flights[row_key], live, on_event)
                        if result is not None:
                            self._finish(flights, row_key)
                            yield result
                    for row_key, result in self._check_vanished(flights, live):
                        self._finish(flights, row_key)
                        yield result
                except _waited_errors() as exc:
                    outage.failed(exc)
                    if should_cancel is not None and should_cancel():
                        # Nothing can be revoked while Redis is away, and waiting for it would keep a
                        # SIGTERM (systemd's stop, docker stop) from stopping the coordinator. Rows a worker
                        # still runs are followed again when the batch is resumed.
                        log.warning("stopping with Redis unreachable: %d row(s) not collected", len(flights))
                        while waiting:
                            yield RowResult(waiting.popleft().row_key, CANCELLED, "cancelled before it started")
                        for row_key, flight in list(flights.items()):
                            del flights[row_key]
                            yield RowResult(row_key, CANCELLED, "cancelled while Redis was unreachable",
                                            worker=flight.worker or "?")
                        break
                    time.sleep(1.0)
                    run_id = self._reconnected_run_id(run_id, flights)
                    continue
                if flights or waiting:
                    time.sleep(self.poll_interval_s)
        finally:
            if cancelled_at is not None:
                for batch_id in batch_ids:
                    self._quietly(lambda: self.redis.delete(CANCEL_KEY_PREFIX + batch_id))

    # sending -------------------------------------------------------------------------------------

    def _fill(self, waiting: deque[RowJob], flights: dict[str, _Flight], live: dict[str, WorkerAnnouncement]) -> None:
        limit = self.max_in_flight or max(4, 2 * len(live))
        while waiting and len(flights) < limit:
            job = waiting[0]
            flight = _Flight(job, [], time.monotonic())
            # A coordinator that restarted finds the row's last task id in Redis: the next attempt gets a
            # new id (a worker may remember the old one as revoked), and a result of the old one still counts.
            previous = self._redis_text(ROW_KEY_PREFIX + job.row_key)
            attempt = job.attempt
            if previous is not None:
                previous_task = previous.removeprefix(ROW_DONE_MARK + ":")
                attempt = max(attempt, _attempt_of(previous_task) + 1)
                if previous_task == previous:
                    flight.task_ids.append(previous_task)
                    if self._adopt(flight, previous_task):
                        waiting.popleft()
                        flights[job.row_key] = flight
                        continue
            self._send(flight, live, attempt)
            waiting.popleft()
            flights[job.row_key] = flight

    def _adopt(self, flight: _Flight, task_id: str) -> bool:
        """Whether the row's last attempt (sent before this coordinator restarted) is still worth following:
        its result is stored, a worker runs it, or it waits in a queue. Then it is not sent again, which
        would make a worker redo a finished row in full; a lost one is sent again by the usual checks."""
        state, info = self._task_state(task_id)
        adopted = (state == "SUCCESS" and isinstance(info, dict) and "superseded" not in info) or \
            state in {"STARTED", "PROGRESS"}
        if not adopted:
            for queue in (checkpoint_queue(flight.job.checkpoint), file_queue(flight.job.checkpoint), DEFAULT_QUEUE):
                if task_id in self._queued_task_ids({queue}):
                    flight.queue, adopted = queue, True
                    break
        if adopted:
            flight.job.attempt = _attempt_of(task_id)
            log.info("row %s: following attempt %s sent before the restart", flight.job.row_key, task_id)
        return adopted

    def _send(self, flight: _Flight, live: dict[str, WorkerAnnouncement], attempt: int) -> None:
        job = flight.job
        job.attempt = attempt
        task_id = f"{job.row_key}:{attempt}"
        queue = flight.queue = self._queue_for(job.checkpoint, live)
        # Tell workers which attempt is current before it can be consumed, so stale copies skip.
        self.redis.set(ROW_KEY_PREFIX + job.row_key, task_id, ex=self._row_key_ttl_s)
        self.app.send_task(
            TASK_RUN_ROW, args=[job.to_dict()], task_id=task_id, queue=queue,
            retry=True, retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5},
        )
        if task_id not in flight.task_ids:
            flight.task_ids.append(task_id)
        flight.sent_at = time.monotonic()
        flight.worker = flight.instance = flight.started_at = flight.missing_since = None
        flight.node_id, flight.step_node, flight.step = None, None, -1

    def _reroute_orphans(self, flights: dict[str, _Flight], live: dict[str, WorkerAnnouncement]) -> None:
        """Rows still waiting in a checkpoint's (or a checkpoint file's) queue that no live worker consumes
        any more (its only worker died) are sent again where :meth:`_queue_for` now points: another holder's
        queue, else (once the holder has been gone for holder_grace_s) the default queue, where any worker
        loads the model on demand. The copy left behind is stale: a worker that comes back skips it."""
        now = time.monotonic()
        consumed = {queue for worker in live.values() for queue in worker.queues}
        for queue in list(self._unconsumed_since):
            if queue in consumed:
                del self._unconsumed_since[queue]  # back (or a blip): nothing to reroute
        for flight in flights.values():
            if flight.started_at is not None or flight.queue == DEFAULT_QUEUE or flight.cancelled \
                    or flight.queue in consumed:
                continue
            # Confirmed over time, as a lost worker is: one poll without its key may be a Redis blip
            since = self._unconsumed_since.setdefault(flight.queue, now)
            if now - since >= self.lost_confirm_s and self._queue_for(flight.job.checkpoint, live) != flight.queue:
                log.warning("row %s waited in %s, which no live worker takes from any more; sending it again",
                            flight.job.row_key, flight.queue)
                self._send(flight, live, flight.job.attempt + 1)

    def _queue_for(self, checkpoint: str, live: dict[str, WorkerAnnouncement]) -> str:
        """A live worker holding the checkpoint; else a live one that has its file; else a worker seen within
        holder_grace_s that held it or had it (it is coming back); else any worker (the default queue)."""
        wanted = (checkpoint_queue(checkpoint), file_queue(checkpoint))
        now = time.monotonic()
        recent = [worker for seen, worker in self._seen.values() if now - seen <= self.holder_grace_s]
        for workers in (live.values(), recent):
            consumed = {queue for worker in workers for queue in worker.queues}
            for queue in wanted:
                if queue in consumed:
                    return queue
        return DEFAULT_QUEUE

    def _note_seen(self, live: dict[str, WorkerAnnouncement]) -> None:
        now = time.monotonic()
        for name, worker in live.items():
            if worker.queues:  # a worker still loading (no queues yet) says nothing about where rows go
                self._seen[name] = (now, worker)

    def _resend_all(self, flights: dict[str, _Flight]) -> None:
        for flight in flights.values():
            self._send(flight, {}, flight.job.attempt + 1)

    def _reconnected_run_id(self, run_id: str | None, flights: dict[str, _Flight]) -> str | None:
        """After an outage: if Redis came back as a new instance, what was queued there is gone."""
        try:
            current = self._redis_run_id()
        except _waited_errors():
            return run_id
        if run_id is not None and current != run_id:
            log.warning("Redis restarted or lost its data; sending %d row(s) again", len(flights))
            try:
                self._resend_all(flights)
            except _waited_errors():
                return run_id  # still flaky: try the whole reconciliation again next round
        return current

    def _redis_text(self, key: str) -> str | None:
        raw = self.redis.get(key)
        return raw.decode() if isinstance(raw, bytes) else raw

    def _redis_run_id(self) -> str:
        """Names what Redis holds now; it changes when Redis restarts (its ``run_id``) and when it loses its
        data while running on (FLUSHALL, a failover to an empty replica), which leaves the run id as it was
        but removes this dispatcher's own key. Either way the queued rows, the workers' heartbeats and the
        rows' current attempts are gone: every row in flight is sent again, and none of that counts against
        a row as a lost worker (else the workers' heartbeats, missing until their next beat, would)."""
        run_id = "" if self._info_refused else self._server_run_id()
        if not self.redis.set(self._data_key, self._data_token, xx=True, ex=self._row_key_ttl_s):
            self._data_token = uuid.uuid4().hex
            self.redis.set(self._data_key, self._data_token, ex=self._row_key_ttl_s)
        return f"{run_id}/{self._data_token}"

    def _server_run_id(self) -> str:
        """Redis' ``run_id``, or "" when this user may not run INFO (ACL users of managed Redis often may not:
        it is in the @dangerous category); then a restart is noticed by this dispatcher's key being gone,
        which is all that matters without persistence."""
        import redis

        try:
            return str(self.redis.info("server")["run_id"])
        except redis.exceptions.ResponseError as exc:
            self._info_refused = True
            log.info("Redis refuses INFO (%s): a Redis restart is noticed by the data it lost", exc)
            return ""

    # polling -------------------------------------------------------------------------------------

    def _poll(self, flight: _Flight, live: dict[str, WorkerAnnouncement],
              on_event: Callable[[str, Any], None] | None) -> RowResult | None:
        for task_id in reversed(flight.task_ids):
            state, info = self._task_state(task_id)
            if state == "SUCCESS" and isinstance(info, dict) and "superseded" not in info:
                return RowResult.from_dict(info)
            if state == "REVOKED" and task_id == flight.task_id:
                if flight.cancelled:
                    return RowResult(flight.job.row_key, CANCELLED, "cancelled before it started")
                # Revoked by an earlier run (workers remember revoked ids): send it under a new id.
                self._send(flight, live, flight.job.attempt + 1)
                return None
            if state == "FAILURE" and task_id == flight.task_id:
                # The task itself raised (not a row failure, which comes back as a result): a bug or an
                # unloadable job on the worker. Sending it again would fail the same way.
                return RowResult(flight.job.row_key, FAILED, f"worker error: {info}", worker=flight.worker or "?")
            if task_id == flight.task_id and state in {"STARTED", "PROGRESS"} and isinstance(info, dict):
                self._observe_start(flight, info, on_event)
        return self._check_lost(flight, live)

    def _task_state(self, task_id: str) -> tuple[str, Any]:
        meta = self.app.backend.get_task_meta(task_id, cache=False)
        return meta.get("status", "PENDING"), meta.get("result")

    def _observe_start(self, flight: _Flight, info: dict[str, Any],
                       on_event: Callable[[str, Any], None] | None) -> None:
        worker = info.get("worker") or info.get("hostname")
        if flight.started_at is None:
            flight.started_at = time.monotonic()
        if worker:
            flight.worker = worker
        if info.get("instance"):
            flight.instance = info["instance"]
        if on_event is None:
            return
        # The worker's latest report only: nodes and steps in between polls are not replayed.
        node_id, class_type = info.get("node_id"), info.get("class_type")
        step, steps, step_node = info.get("step"), info.get("steps"), info.get("step_node")
        if step is not None and (step_node, int(step)) != (flight.step_node, flight.step):
            flight.step_node, flight.step = step_node, int(step)
            on_event(flight.job.row_key, ProgressEvent("step", step_node, None, int(step), int(steps or 0)))
        if node_id is not None and node_id != flight.node_id:
            flight.node_id = node_id
            on_event(flight.job.row_key, ProgressEvent("node", node_id=node_id, class_type=class_type))

    def _check_lost(self, flight: _Flight, live: dict[str, WorkerAnnouncement]) -> RowResult | None:
        """A started row whose worker died or hung is sent again, or failed once it used its attempts."""
        now = time.monotonic()
        reason = None
        if flight.worker is not None and flight.started_at is not None:
            holder = live.get(flight.worker)
            if holder is not None and self._same_process(flight, holder):
                flight.missing_since = None
            elif flight.missing_since is None:
                flight.missing_since = now
            elif now - flight.missing_since >= self.lost_confirm_s:
                reason = f"worker {flight.worker} stopped sending heartbeats while running it"
        if flight.started_at is not None and reason is None:
            if now - flight.started_at > flight.job.deadline_s + self.deadline_margin_s:
                reason = f"no result {flight.job.deadline_s + self.deadline_margin_s:.0f}s after it started"
        if reason is None:
            return None
        return self._lost(flight, live, reason)

    @staticmethod
    def _same_process(flight: _Flight, holder: WorkerAnnouncement) -> bool:
        """Whether the worker now announced under the row's worker name is the process that started it. A
        worker killed and started again under its name announces at once, so the name alone says nothing.
        The process running a row announces its task id from the row's start (a restarted one never
        announces the old process's task), and its progress reports carry its instance, which holds too
        when a heartbeat written just before the row started lands late. Celery's STARTED state names only
        the pid, which repeats where a worker restarts as pid 1 in its container: a row known only from
        it, whose worker announces another task or none, is not this process's (else the row would wait
        for its deadline behind the new process's heartbeat)."""
        return holder.task_id == flight.task_id or (flight.instance is not None and holder.instance == flight.instance)

    def _lost(self, flight: _Flight, live: dict[str, WorkerAnnouncement], reason: str) -> RowResult | None:
        if flight.cancelled:
            return RowResult(flight.job.row_key, CANCELLED, f"cancelled; {reason}", worker=flight.worker or "?")
        flight.losses += 1
        log.warning("row %s attempt %s lost (%s); %d of %d attempts used", flight.job.row_key,
                    flight.job.attempt, reason, flight.losses, self.max_attempts)
        if flight.losses >= self.max_attempts:
            status = TIMED_OUT if reason.startswith("no result") else FAILED
            return RowResult(
                flight.job.row_key, status,
                f"failed after {flight.losses} attempts that each lost their worker (last: {reason})",
                worker=flight.worker or "?",
            )
        self._quietly(lambda: self.app.control.revoke(flight.task_id))
        self._send(flight, live, flight.job.attempt + 1)
        return None

    def _check_vanished(
        self, flights: dict[str, _Flight], live: dict[str, WorkerAnnouncement]
    ) -> list[tuple[str, RowResult]]:
        """Rows taken off their queue that never started. A worker reserves a message and starts it
        within milliseconds, so one that has been neither queued nor started for a while was reserved by
        a worker that then died (its message waits in Redis' unacknowledged set for the visibility
        timeout). Such a row is sent again as the next attempt."""
        now = time.monotonic()
        suspects = [f for f in flights.values() if f.started_at is None and now - f.sent_at >= self.lost_confirm_s]
        if not suspects:
            return []
        queued = self._queued_task_ids({f.queue for f in suspects})
        running = {w.task_id for w in live.values() if w.task_id}
        failed: list[tuple[str, RowResult]] = []
        for flight in suspects:
            if flight.task_id in queued or flight.task_id in running:
                flight.missing_since = None
                continue
            if flight.missing_since is None:
                flight.missing_since = now
                continue
            if now - flight.missing_since >= self.lost_confirm_s:
                result = self._lost(flight, live, "taken off its queue by a worker that never started it")
                if result is not None:
                    failed.append((flight.job.row_key, result))
        return failed

    def _queued_task_ids(self, queues: set[str]) -> set[str]:
        """Task ids of the messages waiting in ``queues`` (kombu keeps a Redis list per queue; the window
        of rows in flight keeps these lists short)."""
        found: set[str] = set()
        for queue in queues:
            for raw in self.redis.lrange(queue, 0, -1):
                try:
                    found.add(json.loads(raw)["headers"]["id"])
                except (ValueError, KeyError, TypeError):
                    continue
        return found

    def _finish(self, flights: dict[str, _Flight], row_key: str) -> _Flight:
        """Settle a row, then stop following it. Settling writes to Redis: when that fails (Redis went away,
        or is full) the row is still followed, and its result read again once Redis is back, instead of
        being dropped with the result unyielded."""
        self._settle(flights[row_key])
        return flights.pop(row_key)

    def _settle(self, flight: _Flight) -> None:
        """The row has its result: stale copies of its task skip, and its stored results are freed."""
        self.redis.set(ROW_KEY_PREFIX + flight.job.row_key, f"{ROW_DONE_MARK}:{flight.task_id}",
                       ex=self._row_key_ttl_s)
        for task_id in flight.task_ids:
            self.app.backend.forget(task_id)

    def _cancel(self, batch_ids: set[str], flights: dict[str, _Flight]) -> None:
        for batch_id in batch_ids:
            self.redis.set(CANCEL_KEY_PREFIX + batch_id, "1", ex=3600)
        for flight in flights.values():
            flight.cancelled = True
            self._quietly(lambda: self.app.control.revoke(flight.task_ids))

    @staticmethod
    def _quietly(action: Callable[[], Any]) -> None:
        try:
            action()
        except Exception as exc:  # best-effort housekeeping; correctness does not depend on it
            log.warning("Redis housekeeping failed: %s", exc)


def _attempt_of(task_id: str) -> int:
    """The attempt number at the end of a task id ``<row_key>:<attempt>`` (0 when it has none)."""
    tail = task_id.rsplit(":", 1)[-1]
    return int(tail) if tail.isdigit() else 0


__all__ = [
    "CeleryDispatcher",
    "RowWorker",
    "WorkerAnnouncement",
    "checkpoint_queue",
    "live_workers",
    "make_celery",
    "run_worker",
]
