"""Scale-out over Celery + Redis: a real redis-server, two real worker processes on the demo model, and
the faults the issue names (a worker SIGKILLed mid-row, Redis restarted mid-batch, a poison row)."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from engine.services import build_services
from engine.settings import load_settings
from engine.sheets import read_sheet

pytestmark = [pytest.mark.redis, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
REDIS_SERVER = shutil.which("redis-server")
HEADER = "product_name,color,style,width,height,steps\n"
HEARTBEAT_S = 0.5
FLEET_WAIT_S = 3.5  # the coordinator reads the workers' model names again after this long
POISON_ROW = "bpoison:3"  # the sheet's first data row is row 2
SLOW_ROW = "bkill:4"  # delayed so the test can kill its worker while the row is running


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """A throwaway redis-server on a free localhost port, without persistence: a restart loses everything."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.port = folder, free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.folder)],
            stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None


class WorkerPool:
    """Worker processes kept alive the way systemd's Restart=always would: a dead one is started again."""

    def __init__(self, broker: str, data_dir: Path, logs: Path, faults: dict[str, str],
                 settings: dict[str, str] | None = None, files_refresh_s: float = 30.0) -> None:
        self.broker, self.data_dir, self.logs, self.faults = broker, data_dir, logs, faults
        self.settings = settings or {}
        self.files_refresh_s = files_refresh_s
        self.processes: dict[str, subprocess.Popen] = {}
        self.restarts = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._supervise, daemon=True)

    def start(self, names: list[str]) -> None:
        for name in names:
            self._spawn(name)
        self._thread.start()

    def _spawn(self, name: str) -> None:
        settings = {"data_dir": str(self.data_dir / name), "templates_dir": str(ROOT / "templates"), **self.settings}
        code = (
            "import logging; logging.basicConfig(level=logging.INFO)\n"
            "from engine.distributed import run_worker\n"
            "from engine.settings import load_settings\n"
            f"run_worker(load_settings({settings!r}), {self.broker!r}, name={name!r}, "
            f"heartbeat_s={HEARTBEAT_S}, test_faults={self.faults!r}, files_refresh_s={self.files_refresh_s})\n"
        )
        log = open(self.logs / f"{name}.log", "a")
        self.processes[name] = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=log, stderr=log)

    def _supervise(self) -> None:
        while not self._stop.wait(0.2):
            for name, process in list(self.processes.items()):
                if process.poll() is not None:
                    self.restarts += 1
                    self._spawn(name)

    def kill(self, name: str) -> None:
        self.processes[name].send_signal(signal.SIGKILL)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        for process in self.processes.values():
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed (Debian package redis-server)")
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def workers(redis_server, tmp_path_factory):
    """Two workers on the demo model, ready (announced) before the first test sends anything."""
    from engine.distributed import live_workers
    import redis

    pool = WorkerPool(
        redis_server.url, tmp_path_factory.mktemp("workers"), tmp_path_factory.mktemp("worker-logs"),
        {POISON_ROW: "exit", SLOW_ROW: "delay:3"},
    )
    pool.start(["alpha", "beta"])
    client = redis.Redis.from_url(redis_server.url)
    deadline = time.monotonic() + 120
    while len([w for w in live_workers(client) if w.models]) < 2:  # loaded, not just claiming their names
        if time.monotonic() > deadline:
            logs = "\n".join(p.read_text()[-2000:] for p in pool.logs.glob("*.log"))
            pool.stop()
            pytest.fail(f"workers did not announce themselves:\n{logs}")
        time.sleep(0.2)
    yield pool
    pool.stop()


def wait_for_worker(client, name: str, timeout_s: float = 120) -> None:
    """Until the worker ``name`` announces loaded models (ready for rows)."""
    from engine.distributed import live_workers

    deadline = time.monotonic() + timeout_s
    while not any(w.name.startswith(f"{name}@") and w.models for w in live_workers(client)):
        assert time.monotonic() < deadline, f"worker {name} did not start"
        time.sleep(0.2)


def write_sheet(path: Path, count: int) -> Path:
    rows = [f"Item {i},color{i},minimal,64,64,2" for i in range(count)]
    path.write_text(HEADER + "".join(r + "\n" for r in rows), encoding="utf-8")
    return path


def coordinator(tmp_path, name: str, dispatcher=None, **overrides):
    settings = load_settings({"data_dir": str(tmp_path / name), "templates_dir": str(ROOT / "templates"), **overrides})
    return build_services(settings, dispatcher=dispatcher)


def celery_dispatcher(redis_server, **options):
    from engine.distributed import CeleryDispatcher

    return CeleryDispatcher(redis_server.url, lost_confirm_s=0.5, **options)


class Recording:
    """Wraps a dispatcher to count what it yields: exactly one result per row is the contract."""

    def __init__(self, inner) -> None:
        self.inner, self.yielded, self.workers = inner, [], {}

    def __getattr__(self, name):  # everything else is the wrapped dispatcher's (fleet_models, ...)
        return getattr(self.inner, name)

    def run(self, jobs, on_event, should_cancel):
        for result in self.inner.run(jobs, on_event, should_cancel):
            self.yielded.append(result.row_key)
            self.workers[result.row_key] = result.worker.split("@")[0]
            yield result


def start_batch(services, sheet: Path, batch_id: str, batch_seed: int = 11) -> str:
    prepared = services.runner.prepare("product_shot", read_sheet(sheet), batch_seed=batch_seed, batch_id=batch_id)
    return services.runner.start(prepared)


def assert_each_row_once(services, batch_id: str, count: int) -> list:
    rows = services.ledger.rows(batch_id)
    assert len(rows) == count and all(r.status == "done" for r in rows), [(r.row_key, r.status, r.error) for r in rows]
    files = sorted(services.runner.output_dir(batch_id).glob("*.png"))
    assert len(files) == count and not list(services.runner.output_dir(batch_id).glob(".*.tmp"))
    assert len({r.image_path for r in rows}) == count
    return rows


def test_rows_spread_over_two_workers_match_the_in_process_runner(redis_server, workers, tmp_path):
    sheet = write_sheet(tmp_path / "rows.csv", 8)
    remote = coordinator(tmp_path, "remote", Recording(celery_dispatcher(redis_server)))
    events = []
    batch_id = start_batch(remote, sheet, "bsame")
    summary = remote.runner.run(batch_id, on_event=events.append)

    assert (summary.done, summary.failed) == (8, 0)
    rows = assert_each_row_once(remote, batch_id, 8)
    assert set(remote.runner.dispatcher.workers.values()) == {"alpha", "beta"}  # both workers took rows
    # The audit trail names the worker that made each image, not the coordinator that claimed the row.
    assert {r.row_key: r.worker.split("@")[0] for r in rows} == remote.runner.dispatcher.workers
    # A coordinator that dies is no crash of the rows workers run: it never marks them begun here.
    assert all(r.began_at is None and r.crashes == 0 for r in rows)
    assert sorted(remote.runner.dispatcher.yielded) == sorted(r.row_key for r in rows)
    # Remote progress reaches listeners like local progress does (polled: the latest step of a fast row
    # may be overtaken by its result, so any step of the row counts).
    assert {e.kind for e in events} >= {"batch_started", "node", "step", "row_done", "batch_done"}
    assert any(e.kind == "step" and e.steps == 2 and 1 <= e.step <= 2 for e in events)

    # A worker runs one row at a time, so the in-process runner does too: batched CPU matmuls may round
    # differently in the last bit, and the comparison here is of the exact PNG bytes.
    local = coordinator(tmp_path, "local", max_gpu_batch=1)
    start_batch(local, sheet, "bsame")
    local.runner.run("bsame")
    local_sha = {r.row_number: r.image_sha256 for r in local.ledger.rows("bsame")}
    assert {r.row_number: r.image_sha256 for r in rows} == local_sha


def test_worker_killed_mid_row_every_row_still_finishes_exactly_once(redis_server, workers, tmp_path):
    from engine.distributed import live_workers
    import redis

    client = redis.Redis.from_url(redis_server.url)
    sheet = write_sheet(tmp_path / "rows.csv", 8)
    services = coordinator(tmp_path, "kill", Recording(celery_dispatcher(redis_server)))
    batch_id = start_batch(services, sheet, "bkill")
    killed: list[str] = []

    def kill_the_slow_rows_worker() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not killed:
            for worker in live_workers(client):
                if worker.task_id == f"{SLOW_ROW}:1":
                    workers.kill(worker.name.split("@")[0])
                    killed.append(worker.name)
                    return
            time.sleep(0.02)

    killer = threading.Thread(target=kill_the_slow_rows_worker)
    killer.start()
    summary = services.runner.run(batch_id)
    killer.join()

    assert killed, "the slow row never started"
    assert (summary.done, summary.failed) == (8, 0)
    rows = assert_each_row_once(services, batch_id, 8)
    assert sorted(services.runner.dispatcher.yielded) == sorted(r.row_key for r in rows)
    # Ran again on the other worker: the lost row is sent again about two seconds after the kill, while the
    # killed worker's replacement (same name) is still loading its model. Recording keeps names without "@host".
    assert services.runner.dispatcher.workers[SLOW_ROW] != killed[0].split("@")[0]


def test_a_row_whose_worker_restarted_under_its_name_before_reporting_progress_is_sent_again(redis_server):
    """A worker killed right after Celery marked its row STARTED (before the row's first progress report,
    which names the process instance) and started again under the same name announces itself at once.
    The pid in Celery's STARTED state tells the new process from the one that took the row; without it the
    row waited for its deadline behind the new heartbeat."""
    import redis

    from engine.distributed import WORKER_KEY_PREFIX, WorkerAnnouncement, _Flight
    from engine.jobs import RowJob

    dispatcher = celery_dispatcher(redis_server)
    client = redis.Redis.from_url(redis_server.url)
    job = RowJob("brestarted:2", "brestarted", 2, {}, {}, deadline_s=600.0, checkpoint="sd35_demo_tiny")
    dispatcher.app.backend.store_result("brestarted:2:1", {"pid": 4242, "hostname": "gamma@vm"}, "STARTED")
    flight = _Flight(job, ["brestarted:2:1"], sent_at=time.monotonic())
    restarted = WorkerAnnouncement("gamma@vm", ["sd35_demo_tiny"], ["sd35.rows"], pid=5151, host="vm",
                                   instance="starting")
    client.set(WORKER_KEY_PREFIX + "gamma@vm", restarted.to_json(), px=60_000)
    live = {w.name: w for w in dispatcher.workers()}

    assert dispatcher._poll(flight, live, None) is None
    assert flight.worker == "gamma@vm" and flight.losses == 0
    deadline = time.monotonic() + 10
    while flight.losses == 0 and time.monotonic() < deadline:  # confirmed after lost_confirm_s, not at once
        time.sleep(0.1)
        assert dispatcher._poll(flight, live, None) is None
    assert flight.losses == 1 and flight.task_id == "brestarted:2:2"  # sent again as the next attempt

    # The process that took the row, announcing it as its task, keeps it: nothing is sent twice.
    alive = _Flight(job, ["brestarted:2:1"], sent_at=time.monotonic())
    same = WorkerAnnouncement("gamma@vm", ["sd35_demo_tiny"], ["sd35.rows"], pid=4242, host="vm", instance="x",
                              task_id="brestarted:2:1")
    for _ in range(10):
        time.sleep(0.1)
        assert dispatcher._poll(alive, {"gamma@vm": same}, None) is None
    assert alive.losses == 0 and alive.task_id == "brestarted:2:1"


def test_a_row_whose_worker_restarted_as_the_same_pid_before_reporting_progress_is_sent_again(redis_server):
    """In a container a worker restarted after a crash is pid 1 again, as the process that took the row
    was: the pid in Celery's STARTED state cannot tell them apart. The new process does not announce the
    row as its task, so the row is sent again instead of waiting for its deadline."""
    import redis

    from engine.distributed import WORKER_KEY_PREFIX, WorkerAnnouncement, _Flight
    from engine.jobs import RowJob

    dispatcher = celery_dispatcher(redis_server)
    client = redis.Redis.from_url(redis_server.url)
    job = RowJob("bcontainer:2", "bcontainer", 2, {}, {}, deadline_s=600.0, checkpoint="sd35_demo_tiny")
    dispatcher.app.backend.store_result("bcontainer:2:1", {"pid": 1, "hostname": "epsilon@pod"}, "STARTED")
    running = WorkerAnnouncement("epsilon@pod", ["sd35_demo_tiny"], ["sd35.rows"], pid=1, host="pod",
                                 instance="first", task_id="bcontainer:2:1")
    restarted = WorkerAnnouncement("epsilon@pod", ["sd35_demo_tiny"], ["sd35.rows"], pid=1, host="pod",
                                   instance="second")

    # The process running it announces it as its task: it keeps the row, nothing is sent twice.
    kept = _Flight(job, ["bcontainer:2:1"], sent_at=time.monotonic())
    for _ in range(10):
        time.sleep(0.1)
        assert dispatcher._poll(kept, {running.name: running}, None) is None
    assert kept.losses == 0 and kept.task_id == "bcontainer:2:1"

    client.set(WORKER_KEY_PREFIX + restarted.name, restarted.to_json(), px=60_000)
    live = {w.name: w for w in dispatcher.workers()}
    lost = _Flight(job, ["bcontainer:2:1"], sent_at=time.monotonic())
    deadline = time.monotonic() + 10
    while lost.losses == 0 and time.monotonic() < deadline:  # confirmed after lost_confirm_s
        assert dispatcher._poll(lost, live, None) is None
        time.sleep(0.1)
    assert lost.losses == 1 and lost.task_id == "bcontainer:2:2", "the row waits behind the restarted worker"
    client.delete(WORKER_KEY_PREFIX + restarted.name)
    dispatcher.close()


def test_redis_restart_mid_batch_is_reconciled(redis_server, workers, tmp_path):
    sheet = write_sheet(tmp_path / "rows.csv", 8)
    services = coordinator(tmp_path, "restart", Recording(celery_dispatcher(redis_server)))
    batch_id = start_batch(services, sheet, "brestart")
    restarted = threading.Event()

    def restart_after_two_rows(event) -> None:
        if event.kind == "row_done" and event.done == 2 and not restarted.is_set():
            restarted.set()
            redis_server.stop()
            time.sleep(1.0)
            redis_server.start()

    summary = services.runner.run(batch_id, on_event=restart_after_two_rows)

    assert restarted.is_set()
    assert (summary.done, summary.failed) == (8, 0)
    rows = assert_each_row_once(services, batch_id, 8)
    assert sorted(services.runner.dispatcher.yielded) == sorted(r.row_key for r in rows)


def test_redis_losing_its_data_mid_batch_is_reconciled_without_counting_lost_workers(redis_server, workers, tmp_path):
    """FLUSHALL (or a failover to an empty replica) keeps Redis' run id but empties its queues, results and
    the workers' heartbeats: every row in flight is sent again, as after a restart, and none of that counts
    as an attempt that lost its worker (with one attempt allowed, such a count fails the row)."""
    import redis

    client = redis.Redis.from_url(redis_server.url)
    sheet = write_sheet(tmp_path / "rows.csv", 8)
    services = coordinator(tmp_path, "flushed",
                           Recording(celery_dispatcher(redis_server, max_attempts=1, max_in_flight=6)))
    batch_id = start_batch(services, sheet, "bflushed")
    flushed = threading.Event()

    def flush_after_the_first_row(event) -> None:
        if event.kind == "row_done" and not flushed.is_set():
            flushed.set()
            client.flushall()

    summary = services.runner.run(batch_id, on_event=flush_after_the_first_row)

    assert flushed.is_set()
    assert (summary.done, summary.failed) == (8, 0), [r.error for r in services.ledger.rows(batch_id)]
    rows = assert_each_row_once(services, batch_id, 8)
    assert sorted(services.runner.dispatcher.yielded) == sorted(r.row_key for r in rows)


def test_a_redis_full_at_its_maxmemory_mid_batch_is_waited_for_and_no_row_is_lost(redis_server, workers, tmp_path,
                                                                                 caplog):
    """A Redis at its maxmemory (noeviction) refuses every write with "OOM command not allowed": the
    coordinator stopped with that traceback, the batch half done. It waits now, saying why, and once
    Redis accepts writes again every row finishes once, none charged an attempt for the heartbeats and
    results Redis refused meanwhile (with one attempt allowed, such a charge fails the row)."""
    import redis

    client = redis.Redis.from_url(redis_server.url)
    sheet = write_sheet(tmp_path / "rows.csv", 8)
    services = coordinator(tmp_path, "full",
                           Recording(celery_dispatcher(redis_server, max_attempts=1, max_in_flight=6)))
    batch_id = start_batch(services, sheet, "bfull")
    filled = threading.Event()

    def room_again_once_the_coordinator_said_so() -> None:
        deadline = time.monotonic() + 120  # a bound for a hang, not a measurement
        while time.monotonic() < deadline and not any("Redis full" in r.getMessage() for r in caplog.records):
            time.sleep(0.1)
        client.config_set("maxmemory", 0)

    def fill_redis_after_the_first_row(event) -> None:
        if event.kind == "row_done" and not filled.is_set():
            filled.set()
            client.config_set("maxmemory", 1)  # below what it uses: every write is refused
            threading.Thread(target=room_again_once_the_coordinator_said_so, daemon=True).start()

    try:
        with caplog.at_level("WARNING", logger="engine.distributed"):
            summary = services.runner.run(batch_id, on_event=fill_redis_after_the_first_row)
    finally:
        client.config_set("maxmemory", 0)

    assert filled.is_set()
    said = [r.getMessage() for r in caplog.records if r.name == "engine.distributed"]
    assert any("Redis full" in line and "maxmemory" in line for line in said), said
    assert (summary.done, summary.failed) == (8, 0), [r.error for r in services.ledger.rows(batch_id)]
    rows = assert_each_row_once(services, batch_id, 8)
    assert sorted(services.runner.dispatcher.yielded) == sorted(r.row_key for r in rows)


def test_cancel_then_resume_sends_only_the_rows_not_done(redis_server, workers, tmp_path):
    sheet = write_sheet(tmp_path / "rows.csv", 6)
    first = Recording(celery_dispatcher(redis_server, max_in_flight=2))
    services = coordinator(tmp_path, "resume", first)
    batch_id = start_batch(services, sheet, "bresume")

    def cancel_after_first_row(event) -> None:
        if event.kind == "row_done":
            services.runner.cancel(batch_id)

    services.runner.run(batch_id, on_event=cancel_after_first_row)
    done_before = {r.row_key for r in services.ledger.rows(batch_id, status="done")}
    assert 1 <= len(done_before) < 6

    # A coordinator restarted on the same ledger resumes: rows already done are not sent again.
    second = Recording(celery_dispatcher(redis_server))
    resumed = coordinator(tmp_path, "resume", second)
    summary = resumed.runner.run(batch_id)
    assert summary.done == 6
    assert not done_before & set(second.yielded)
    assert_each_row_once(resumed, batch_id, 6)


def test_poison_row_is_failed_after_bounded_attempts_and_the_rest_finish(redis_server, workers, tmp_path):
    # Last in the file: the workers it takes down are still restarting when it ends.
    sheet = write_sheet(tmp_path / "rows.csv", 4)
    services = coordinator(tmp_path, "poison", celery_dispatcher(redis_server, max_attempts=2))
    batch_id = start_batch(services, sheet, "bpoison")
    restarts_before = workers.restarts

    summary = services.runner.run(batch_id)

    assert (summary.done, summary.failed) == (3, 1)
    poison = services.ledger.get_generation(POISON_ROW)
    assert poison.status == "failed" and "2 attempts" in poison.error
    assert poison.worker.split("@")[0] in {"alpha", "beta"}  # the last worker it took down
    assert workers.restarts - restarts_before == 2  # each attempt took a worker down, no third one ran
    assert len(list(services.runner.output_dir(batch_id).glob("*.png"))) == 3


def test_a_worker_waits_for_an_unreachable_broker_and_refuses_a_live_workers_name(redis_server, workers, tmp_path):
    from engine.distributed import live_workers
    import redis

    base = [sys.executable, str(ROOT / "app.py"), "--data-dir", str(tmp_path / "w"), "worker"]
    nowhere = f"redis://127.0.0.1:{free_port()}/0"
    waiting = subprocess.Popen([*base, "--broker", nowhere, "--name", "gamma"], cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(waiting.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 60  # the worker imports the model libraries first: seconds on a busy CPU
        while not any("waiting for the broker" in line for line in lines) and time.monotonic() < deadline:
            assert waiting.poll() is None, "".join(lines)[-2000:]  # still waiting, not crashed
            time.sleep(0.2)
        time.sleep(1.5)  # and it goes on waiting, retrying
        assert waiting.poll() is None, "".join(lines)[-2000:]
    finally:
        waiting.kill()
        reader.join(timeout=10)
    output = "".join(lines)
    assert "waiting for the broker" in output and "Traceback" not in output, output[-2000:]

    twin = subprocess.run([*base, "--broker", redis_server.url, "--name", "alpha"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert twin.returncode == 2 and "a worker named alpha@" in twin.stderr and "already running" in twin.stderr
    assert len(live_workers(redis.Redis.from_url(redis_server.url))) == 2  # the real alpha is untouched


def test_a_restarted_coordinator_follows_rows_workers_finished_meanwhile_instead_of_redoing_them(
        redis_server, workers, tmp_path):
    from engine.distributed import ROW_KEY_PREFIX
    import redis

    client = redis.Redis.from_url(redis_server.url)
    sheet = write_sheet(tmp_path / "rows.csv", 8)
    command = [sys.executable, str(ROOT / "app.py"), "--data-dir", str(tmp_path / "coordinator"),
               "--templates-dir", str(ROOT / "templates"), "--broker", redis_server.url,
               "run", "--template", "product_shot", "--sheet", str(sheet)]
    first = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = first.stdout.readline()  # the first row is stored: others are on the workers or queued
    first.kill()
    first.wait()
    assert line.startswith("row "), line

    services = coordinator(tmp_path, "coordinator")
    batch_id = services.ledger.list_batches(limit=1)[0]["id"]
    row_keys = [r.row_key for r in services.ledger.rows(batch_id) if r.status != "done"]
    services.close()
    time.sleep(6)  # the workers finish what they had taken
    finished_meanwhile = []
    for row_key in row_keys:
        task = (client.get(ROW_KEY_PREFIX + row_key) or b"").decode()
        if task and not task.startswith("done:") and b'"SUCCESS"' in (client.get(f"celery-task-meta-{task}") or b""):
            finished_meanwhile.append((row_key, task))
    assert finished_meanwhile, "no row finished while the coordinator was down"

    again = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming unfinished batch" in again.stdout
    services = coordinator(tmp_path, "coordinator")
    assert_each_row_once(services, batch_id, 8)
    for row_key, task in finished_meanwhile:  # recorded from the attempt that ran, not run a second time
        assert client.get(ROW_KEY_PREFIX + row_key).decode() == f"done:{task}", row_key


def test_rows_waiting_for_a_checkpoint_whose_only_worker_died_go_to_any_worker(redis_server, workers, tmp_path):
    from engine.distributed import WORKER_KEY_PREFIX, WorkerAnnouncement, checkpoint_queue, worker_queues
    import redis

    models = tmp_path / "models" / "checkpoints"
    made = subprocess.run([sys.executable, str(ROOT / "app.py"), "demo-checkpoint", "--out",
                           str(models / "special.safetensors")], cwd=tmp_path, capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    # A worker that holds special.safetensors, announced for three seconds and then gone (killed for good)
    ghost = WorkerAnnouncement("ghost@elsewhere", ["special.safetensors"], worker_queues(["special.safetensors"]),
                               pid=1, host="elsewhere", instance="ghost")
    client = redis.Redis.from_url(redis_server.url)
    client.set(WORKER_KEY_PREFIX + ghost.name, ghost.to_json(), px=3000)
    services = coordinator(tmp_path, "orphans", celery_dispatcher(redis_server, holder_grace_s=1.0),
                           models_dir=str(tmp_path / "models"), default_checkpoint="special.safetensors")
    batch_id = start_batch(services, write_sheet(tmp_path / "rows.csv", 2), "borphan")
    outcome: list = []
    runner = threading.Thread(target=lambda: outcome.append(services.runner.run(batch_id)), daemon=True)
    runner.start()
    time.sleep(1)
    assert client.llen(checkpoint_queue("special.safetensors")) == 2  # routed to the checkpoint's own queue
    runner.join(timeout=90)
    assert outcome, "the rows still wait for a worker that is gone"
    # alpha and beta do not have the file: the rows end with their reason instead of waiting forever
    rows = services.ledger.rows(batch_id)
    assert all(r.status == "failed" and "special.safetensors" in (r.error or "") for r in rows), \
        [(r.status, r.error) for r in rows]


def test_a_worker_the_broker_refuses_exits_with_the_reason_instead_of_waiting(tmp_path):
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed (Debian package redis-server)")
    port = free_port()
    server = subprocess.Popen([REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                               "--appendonly", "no", "--requirepass", "the-right-one", "--dir", str(tmp_path)],
                              stdout=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        refused = subprocess.run([sys.executable, str(ROOT / "app.py"), "--data-dir", str(tmp_path / "w"), "worker",
                                  "--broker", f"redis://:wrong-password@127.0.0.1:{port}/0", "--name", "delta"],
                                 cwd=tmp_path, capture_output=True, text=True, timeout=60)
    finally:
        server.kill()
        server.wait()
    assert refused.returncode == 2 and "refused the user name or password" in refused.stderr, refused.stderr[-2000:]
    assert "wrong-password" not in refused.stderr and f"redis://:***@127.0.0.1:{port}/0" in refused.stderr


def test_a_result_finished_after_its_row_was_settled_elsewhere_is_not_kept(redis_server, workers, tmp_path):
    """A stalled worker that finishes a row another attempt already settled stores a small note, not the
    image, which nobody would collect before it expired."""
    from engine.distributed import DEFAULT_QUEUE, ROW_KEY_PREFIX, TASK_RUN_ROW
    import redis

    client = redis.Redis.from_url(redis_server.url)
    services = coordinator(tmp_path, "late")
    batch_id = start_batch(services, write_sheet(tmp_path / "rows.csv", 3), SLOW_ROW.split(":")[0])
    row = next(r for r in services.ledger.rows(batch_id) if r.row_key == SLOW_ROW)  # its worker waits 3 s first
    job = services.runner._job(services.ledger.get_batch(batch_id), row)
    dispatcher = celery_dispatcher(redis_server)
    task_id = f"{SLOW_ROW}:1"
    client.set(ROW_KEY_PREFIX + SLOW_ROW, task_id)
    dispatcher.app.send_task(TASK_RUN_ROW, args=[job.to_dict()], task_id=task_id, queue=DEFAULT_QUEUE)
    deadline = time.monotonic() + 30
    while dispatcher._task_state(task_id)[0] != "PROGRESS" and time.monotonic() < deadline:
        time.sleep(0.05)
    client.set(ROW_KEY_PREFIX + SLOW_ROW, f"done:{SLOW_ROW}:2")  # another attempt was recorded meanwhile
    while dispatcher._task_state(task_id)[0] != "SUCCESS" and time.monotonic() < deadline:
        time.sleep(0.1)
    state, info = dispatcher._task_state(task_id)
    assert state == "SUCCESS" and info == {"superseded": task_id, "row_key": SLOW_ROW, "worker": info["worker"]}
    dispatcher.app.backend.forget(task_id)
    dispatcher.close()


def test_a_coordinator_without_the_model_file_accepts_and_routes_rows_by_what_the_workers_have(
    redis_server, workers, tmp_path
):
    """The web app runs on a small machine without the models: it validates checkpoint names against what
    live workers announce, sends such rows only to a worker that has the file, and an admin's switch of
    the default checkpoint loads nothing on the coordinator."""
    from engine.models.demo import write_demo_checkpoint
    import redis

    models = tmp_path / "gamma-models"
    write_demo_checkpoint(models / "checkpoints" / "brand_v2.safetensors")
    gamma = WorkerPool(redis_server.url, tmp_path, tmp_path, {}, settings={"models_dir": str(models)})
    gamma.start(["gamma"])
    client = redis.Redis.from_url(redis_server.url)
    sheet = tmp_path / "rows.csv"
    sheet.write_text("product_name,checkpoint,width,height,steps\n" + "".join(
        f"Item {i},brand_v2.safetensors,64,64,2\n" for i in range(4)), encoding="utf-8")
    services = coordinator(tmp_path, "fleet", Recording(celery_dispatcher(redis_server)),
                           models_dir=str(tmp_path / "no-models"))
    try:
        wait_for_worker(client, "gamma")
        assert "brand_v2.safetensors" not in services.engine.models.resolver.available("checkpoints")
        assert "brand_v2.safetensors" in services.runner.allowed_checkpoints()

        batch_id = start_batch(services, sheet, "bfleet")
        summary = services.runner.run(batch_id)

        assert (summary.done, summary.failed) == (4, 0), [r.error for r in services.ledger.rows(batch_id)]
        rows = assert_each_row_once(services, batch_id, 4)
        assert set(services.runner.dispatcher.workers.values()) == {"gamma"}  # alpha and beta lack the file
        assert all(r.model_name == "brand_v2.safetensors" and r.worker.startswith("gamma@") for r in rows)

        services.runner.switch_checkpoint("brand_v2.safetensors")
        assert services.runner.default_checkpoint == "brand_v2.safetensors"
        assert services.engine.models.loaded() == []  # the coordinator loads no model
    finally:
        gamma.stop()

    # Gone with its worker: the name is refused again, naming the row and the model.
    time.sleep(3 * HEARTBEAT_S + 3.5)  # the heartbeat key expires, then the coordinator reads Redis again
    prepared = services.runner.prepare("product_shot", read_sheet(sheet), batch_seed=1, batch_id="bgone")
    problems = [p for row in prepared.report.rows for p in row.problems]
    assert not any(row.ok for row in prepared.report.rows) and "brand_v2.safetensors" in problems[0].reason


def test_a_worker_with_json_logs_writes_only_json_records_from_start_to_ready(redis_server, tmp_path):
    """Under a supervisor a worker's output goes to a log collector: no Celery banner, no raw warnings."""
    import json

    process = subprocess.Popen(
        [sys.executable, str(ROOT / "app.py"), "--data-dir", str(tmp_path / "d"), "--log-format", "json",
         "worker", "--broker", redis_server.url, "--name", "jsonlogs"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    records, deadline = [], time.monotonic() + 120
    try:
        for line in process.stderr:  # one record per line, until Celery says the worker is ready
            records.append(json.loads(line))
            if records[-1]["message"].endswith(" ready.") or time.monotonic() > deadline:
                break
    finally:
        process.terminate()
        stdout, rest = process.communicate(timeout=30)
    records += [json.loads(line) for line in rest.splitlines() if line.strip()]
    messages = [r["message"] for r in records]
    assert any(m.startswith("loading and warming up") for m in messages)
    assert any(m.endswith(" ready.") for m in messages), messages
    assert "[queues]" not in stdout  # the banner is left out


def test_two_workers_started_at_once_under_one_name_cannot_both_run(redis_server, tmp_path):
    base = [sys.executable, str(ROOT / "app.py"), "worker", "--broker", redis_server.url, "--name", "twin"]
    twins = [subprocess.Popen([*base[:2], "--data-dir", str(tmp_path / f"d{n}"), *base[2:]], cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for n in (1, 2)]
    try:
        deadline = time.monotonic() + 60
        while all(t.poll() is None for t in twins) and time.monotonic() < deadline:
            time.sleep(0.1)
        refused = [t for t in twins if t.poll() is not None]
        assert len(refused) == 1, "both ran, or neither"
        assert refused[0].returncode == 2 and "already running" in refused[0].stderr.read()
        time.sleep(2)
        assert sum(t.poll() is None for t in twins) == 1  # the other one runs on
    finally:
        for t in twins:
            t.kill()
            t.wait()


def test_a_checkpoint_file_added_to_a_running_worker_is_consumed_from_its_own_queue(redis_server, workers, tmp_path):
    """Announced within a refresh, accepted by the coordinator, and its rows reach only the worker that has
    it (alpha and beta, which lack it, would fail them)."""
    from engine.distributed import file_queue, live_workers
    from engine.models.demo import write_demo_checkpoint
    import redis

    models = tmp_path / "delta-models"
    (models / "checkpoints").mkdir(parents=True)
    delta = WorkerPool(redis_server.url, tmp_path, tmp_path, {}, settings={"models_dir": str(models)},
                       files_refresh_s=1.0)
    delta.start(["delta"])
    client = redis.Redis.from_url(redis_server.url)
    services = coordinator(tmp_path, "late", Recording(celery_dispatcher(redis_server)),
                           models_dir=str(tmp_path / "no-models"))
    try:
        wait_for_worker(client, "delta")
        write_demo_checkpoint(models / "checkpoints" / "late.safetensors")  # dropped in while it runs
        deadline = time.monotonic() + 60
        while not any(file_queue("late.safetensors") in w.queues for w in live_workers(client)):
            assert time.monotonic() < deadline, "the new file's queue was never announced"
            time.sleep(0.2)
        time.sleep(FLEET_WAIT_S)
        sheet = tmp_path / "rows.csv"
        sheet.write_text("product_name,checkpoint,width,height,steps\n" + "".join(
            f"Item {i},late.safetensors,64,64,2\n" for i in range(3)), encoding="utf-8")
        batch_id = start_batch(services, sheet, "blate")
        summary = services.runner.run(batch_id)
        assert (summary.done, summary.failed) == (3, 0), [r.error for r in services.ledger.rows(batch_id)]
        assert set(services.runner.dispatcher.workers.values()) == {"delta"}
    finally:
        delta.stop()



def test_a_new_checkpoint_files_queue_is_announced_only_once_celery_consumes_it(redis_server):
    """A worker asks its Celery to consume a new checkpoint file's queue with a broadcast, which nobody hears
    while Celery is still starting (or Redis blinks). Announcing the queue (and the file) at once left the
    rows sent there waiting for ever; the worker announces them once Celery consumes the queue."""
    from engine.distributed import (
        WORKER_KEY_PREFIX, RowWorker, WorkerAnnouncement, file_queue, make_celery, worker_queues,
    )
    import redis

    client = redis.Redis.from_url(redis_server.url)
    app = make_celery(redis_server.url)
    files = {"checkpoints": ["sd35_demo_tiny"], "loras": []}
    worker = RowWorker(None, client, name="eta@vm", models=["sd35_demo_tiny"],
                       queues=worker_queues(["sd35_demo_tiny"], ["sd35_demo_tiny"]), heartbeat_s=HEARTBEAT_S,
                       list_files=lambda: {kind: list(names) for kind, names in files.items()}, files_refresh_s=0)
    requests: list[str] = []

    def ask_to_consume(queue: str) -> None:  # no Celery listens under this name: the broadcast is lost
        requests.append(queue)
        app.control.add_consumer(queue, destination=[worker.name], reply=False)

    worker.add_queue = ask_to_consume
    app.amqp.queues.select(worker.queues)  # what Celery consumes, as the worker's own Celery selects it
    worker.consumed_queues = lambda: set(app.amqp.queues.consume_from or ())
    new_queue = file_queue("brand_v3.safetensors")

    def announced() -> WorkerAnnouncement:
        worker._refresh_files()
        worker.beat()
        return WorkerAnnouncement.from_json(client.get(WORKER_KEY_PREFIX + worker.name))

    files["checkpoints"].append("brand_v3.safetensors")
    for _ in range(2):
        now = announced()
        assert new_queue not in now.queues and "brand_v3.safetensors" not in now.files["checkpoints"]
    assert requests == [new_queue, new_queue]  # asked again at every listing until consumed

    app.amqp.queues.select_add(new_queue)  # a request heard at last: Celery's handler adds it to its selection
    now = announced()
    assert now.queues[-2:] == [new_queue, "sd35.rows"] and "brand_v3.safetensors" in now.files["checkpoints"]
    assert requests == [new_queue, new_queue]
    client.delete(WORKER_KEY_PREFIX + worker.name)
    app.close()


def test_an_outage_in_which_redis_was_full_for_a_while_sends_its_rows_again_whatever_its_last_error(caplog):
    """Redis full (its writes, workers' heartbeats and results among them, refused), then a network blink
    before it is back: the rows in flight are still sent again, and the end of the outage says writes are
    accepted again."""
    import redis

    from engine.distributed import _OutageLog

    outage = _OutageLog()
    with caplog.at_level("WARNING", logger="engine.distributed"):
        outage.failed(redis.exceptions.OutOfMemoryError("OOM command not allowed when used memory > 'maxmemory'."))
        outage.failed(redis.exceptions.ConnectionError("Connection reset by peer"))
        assert outage.refused_writes
        outage.ended()
    assert not outage.refused_writes  # the next outage starts afresh
    said = [r.getMessage() for r in caplog.records]
    assert said[0].startswith("Redis full") and said[-1].startswith("Redis accepts writes again after"), said


def test_an_outage_of_redis_is_logged_when_it_starts_now_and_then_and_when_it_ends(caplog):
    """The coordinator retries once a second; a warning per try would bury everything else in the log."""
    from engine.distributed import _OutageLog

    outage = _OutageLog(every_s=0.3)
    with caplog.at_level("WARNING", logger="engine.distributed"):
        for _ in range(5):  # five tries within the first 0.3 s: one line
            outage.failed(ConnectionError("refused"))
        time.sleep(0.35)
        outage.failed(ConnectionError("refused"))
        outage.ended()
        outage.ended()  # nothing more to say once it said so
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 3, said
    assert said[0].startswith("Redis unreachable (refused)") and said[1].startswith("Redis still unreachable after")
    assert said[2].startswith("Redis reachable again after")
