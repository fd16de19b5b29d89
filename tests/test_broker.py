"""The broker URL as operators of managed Redis write it (ElastiCache, Upstash, Redis Cloud, Azure Cache):
TLS (``rediss://``), a password with URL-encoded characters, a database other than 0, an ACL user that may
not run INFO, CONFIG or KEYS, and a password that is wrong. A real redis-server with TLS, ``requirepass``,
ACL users and ``rename-command CONFIG ""`` is started by the tests; they skip only where the binary (or
openssl, to make its certificate) is missing or lacks TLS."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.broker import parse_broker_url, redact_broker_url
from engine.errors import BrokerError

ROOT = Path(__file__).resolve().parents[1]
REDIS_SERVER = shutil.which("redis-server")
OPENSSL = shutil.which("openssl")
ADMIN_PASSWORD = "admin-secret-1"
APP_PASSWORD = "p@ss:word/1"  # written %-encoded in URLs
APP_PASSWORD_IN_URL = "p%40ss%3Aword%2F1"
OTHER_PASSWORD = "other-secret-2"


# ------------------------------------------------------------------------------------------ the URL


@pytest.mark.parametrize("url, shown, db, tls", [
    ("rediss://:PASSWORD@host:6380/0", "rediss://:***@host:6380/0?ssl_cert_reqs=required", 0, True),
    ("rediss://USER:PASSWORD@host:6380/2?ssl_cert_reqs=required", "rediss://USER:***@host:6380/2?ssl_cert_reqs=required",
     2, True),
    ("redis://default:p%40ss%3Aword@host:6379/3", "redis://default:***@host:6379/3", 3, False),
    ("rediss://u:PASSWORD@host/1?ssl_cert_reqs=CERT_REQUIRED&ssl_ca_certs=/etc/ca.pem",
     "rediss://u:***@host/1?ssl_cert_reqs=required&ssl_ca_certs=/etc/ca.pem", 1, True),
    ("redis://PASSWORD@host", "redis://***@host/0", 0, False),  # a password written where the user goes
    ("redis://host:6379", "redis://host:6379/0", 0, False),
])
def test_the_url_forms_of_managed_redis_are_read_and_shown_without_their_password(url, shown, db, tls):
    broker = parse_broker_url(url)
    assert (broker.redacted, str(broker), broker.db, broker.tls) == (shown, shown, db, tls)
    assert "PASSWORD" not in repr(broker) and "p%40ss" not in repr(broker)


@pytest.mark.parametrize("url, says", [
    ("amqp://u:S3CRET@host//", "must start with redis://"),
    ("redis://u:S3CRET@host/cache", "database number"),
    ("redis://u:S3#CRET@host/0", "percent-encoded"),  # '#' unencoded: the rest reads as a fragment
    ("redis://u:S3/CRET@host:6379/0", "percent-encoded"),  # '/' unencoded: the port would read "S3"
    ("redis://u:S3CRET@host/0?ssl_ca_certs=/etc/ca.pem", "write rediss://"),
    ("rediss://u:S3CRET@host/0?ssl_cert_reqs=yes", "ssl_cert_reqs=yes"),
    ("redis://u:S3CRET@host/1²", "database number"),  # a digit to str.isdigit, a traceback from int()
    ("redis://u:S3CRET@host/٣", "database number"),  # an Arabic-Indic 3: the number is written 0-9
])
def test_a_malformed_broker_url_is_refused_in_one_line_without_its_password(url, says):
    with pytest.raises(BrokerError) as refused:
        parse_broker_url(url)
    message = refused.value.message
    assert says in message and "\n" not in message
    assert "S3" not in message and "CRET" not in message and "S3" not in refused.value.details["broker"]


@pytest.mark.parametrize("url, shown", [
    ("redis://u:S3#CRET@host/0", "redis://u:***@host/0"),  # '#', '/', '@' unencoded: still blanked
    ("redis://u:S3/CRET@host/0", "redis://u:***@host/0"),
    ("redis://:S3@CRET@host/0", "redis://:***@host/0"),
    ("redis://host/0?password=S3CRET", "redis://host/0?password=***"),
])
def test_a_password_is_blanked_even_where_the_url_does_not_parse(url, shown):
    assert redact_broker_url(url) == shown


def test_celerys_clients_verify_a_tls_brokers_certificate_as_redis_py_does_without_ssl_cert_reqs_in_the_url():
    """Without ssl_cert_reqs Celery's result backend refused the URL (in a worker: after loading its models)
    and kombu's broker connection silently skipped the certificate check (CERT_NONE)."""
    from engine.distributed import make_celery

    app = make_celery("rediss://:PASSWORD@broker.example:6380/4")
    assert app.backend.connparams["ssl_cert_reqs"] == ssl.CERT_REQUIRED and app.backend.connparams["db"] == 4
    with app.connection_for_write() as connection:
        assert connection.ssl == {"ssl_cert_reqs": ssl.CERT_REQUIRED}
        assert connection.virtual_host == "4"
    app.close()


# --------------------------------------------------------------------- a managed-style redis-server


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _make_certificates(folder: Path) -> None:
    """A throwaway CA and a server certificate for localhost signed by it."""
    def openssl(*args: str) -> None:
        subprocess.run([OPENSSL, *args], cwd=folder, check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
            "-subj", "/CN=Test broker CA")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
            "-subj", "/CN=localhost")
    (folder / "san.cnf").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "server.crt", "-days", "2", "-extfile", "san.cnf")


class ManagedRedis:
    """redis-server set up as managed services are: TLS, a password for the default user, CONFIG
    renamed away, and ACL users without the @dangerous commands (INFO, KEYS, FLUSHALL, CONFIG, ...):
    ``app`` (all keys and channels), ``nochannels`` (no Pub/Sub channels, Redis 7's default for a new
    user), ``controlonly`` (only the channel of Celery's remote control in database 2, not its results')
    and ``sd35keys`` (only keys under sd35:). It also listens without TLS on ``plain_port``, as a server
    offering both does (Redis Cloud, a self-hosted one moving to TLS): URLs with the wrong scheme for a port."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.port, self.plain_port = folder, _free_port(), _free_port()
        self.ca = folder / "ca.crt"
        _make_certificates(folder)
        users = {"app": "~* &*", "nochannels": "~* resetchannels", "controlonly": "~* resetchannels &/2.celery.pidbox",
                 "sd35keys": "~sd35:* &*"}
        acl = "".join(f"user {name} on >{APP_PASSWORD if name == 'app' else OTHER_PASSWORD} {rules} +@all -@dangerous\n"
                      for name, rules in users.items())
        (folder / "redis.conf").write_text(
            f"port {self.plain_port}\ntls-port {self.port}\nbind 127.0.0.1\ntls-cert-file {folder}/server.crt\n"
            f"tls-key-file {folder}/server.key\ntls-ca-cert-file {self.ca}\ntls-auth-clients no\n"
            f"save \"\"\nappendonly no\ndir {folder}\nrequirepass {ADMIN_PASSWORD}\nrename-command CONFIG \"\"\n{acl}"
        )
        self.process = subprocess.Popen([REDIS_SERVER, str(folder / "redis.conf")], stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        output = self.process.stdout.read() if self.process.poll() is not None else ""
        self.stop()
        if "tls" in output.lower():  # "Bad directive or wrong number of arguments": built without TLS
            pytest.skip(f"this redis-server has no TLS support: {output.strip()[-300:]}")
        raise RuntimeError(f"redis-server did not start: {output[-2000:]}")

    def url(self, user: str = "app", password: str = APP_PASSWORD_IN_URL, db: int = 2, query: str = "") -> str:
        return f"rediss://{user}:{password}@localhost:{self.port}/{db}?ssl_ca_certs={self.ca}{query}"

    def admin(self, db: int):
        import redis

        return redis.Redis(host="localhost", port=self.port, db=db, password=ADMIN_PASSWORD, ssl=True,
                           ssl_ca_certs=str(self.ca))

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


@pytest.fixture(scope="module")
def managed_redis(tmp_path_factory):
    if REDIS_SERVER is None or OPENSSL is None:
        pytest.skip("needs redis-server and openssl (Debian packages redis-server, openssl)")
    server = ManagedRedis(tmp_path_factory.mktemp("managed-redis"))
    yield server
    server.stop()


def _worker_command(tmp_path: Path, broker: str, name: str) -> list[str]:
    return [sys.executable, str(ROOT / "app.py"), "--data-dir", str(tmp_path / name), "worker", "--broker", broker,
            "--name", name]


@pytest.mark.redis
@pytest.mark.slow
def test_a_batch_runs_over_tls_as_an_acl_user_without_info_with_an_encoded_password_in_database_two(
        managed_redis, tmp_path):
    """End to end, with the URL an operator copies from the console: no ssl_cert_reqs, a %-encoded
    password, database 2, a user that may not run INFO (the coordinator's Redis-restart check used it)."""
    broker = managed_redis.url()
    sheet = tmp_path / "rows.csv"
    sheet.write_text("product_name,color,style,width,height,steps\nMug,blue,minimal,64,64,2\n"
                     "Cup,red,minimal,64,64,2\n", encoding="utf-8")
    worker_log = tmp_path / "worker.log"
    with open(worker_log, "w") as log:
        worker = subprocess.Popen(_worker_command(tmp_path, broker, "tls-worker"), cwd=tmp_path, stdout=log,
                                  stderr=subprocess.STDOUT)
    try:
        coordinator = subprocess.run(
            [sys.executable, str(ROOT / "app.py"), "--data-dir", str(tmp_path / "coordinator"), "--broker", broker,
             "run", "--template", "product_shot", "--sheet", str(sheet)],
            cwd=tmp_path, capture_output=True, text=True, timeout=300,
        )
        assert worker.poll() is None, worker_log.read_text()[-3000:]
    finally:
        worker.terminate()
        worker.wait(timeout=60)
    output = coordinator.stdout + coordinator.stderr + worker_log.read_text()
    assert coordinator.returncode == 0, output[-3000:]
    assert "2 done, 0 failed" in coordinator.stdout
    assert APP_PASSWORD not in output and APP_PASSWORD_IN_URL not in output
    assert managed_redis.admin(0).dbsize() == 0 and managed_redis.admin(2).dbsize() > 0  # all in database 2


@pytest.mark.redis
def test_the_coordinators_redis_restart_check_works_for_a_user_without_info(managed_redis):
    from engine.distributed import CeleryDispatcher

    dispatcher = CeleryDispatcher(managed_redis.url())
    try:
        first = dispatcher._redis_run_id()
        assert dispatcher._redis_run_id() == first  # nothing lost: the same
        managed_redis.admin(2).flushdb()  # Redis lost its data (a failover to an empty replica)
        assert dispatcher._redis_run_id() != first
    finally:
        dispatcher.close()


@pytest.mark.redis
def test_celerys_spelling_of_ssl_cert_reqs_connects_our_own_clients_too(managed_redis):
    """Celery's documentation writes ssl_cert_reqs=CERT_REQUIRED; redis-py refused that spelling."""
    from engine.distributed import CeleryDispatcher

    dispatcher = CeleryDispatcher(managed_redis.url(query="&ssl_cert_reqs=CERT_REQUIRED"))
    try:
        assert dispatcher.workers() == [] and dispatcher.redis.ping()
    finally:
        dispatcher.close()


@pytest.mark.redis
@pytest.mark.parametrize("url_of, says", [
    (lambda server: server.url(password="wrong-" + OTHER_PASSWORD), "refused the user name or password"),
    (lambda server: server.url(user="", password="wrong-" + OTHER_PASSWORD), "refused the user name or password"),
    (lambda server: f"rediss://app:{APP_PASSWORD_IN_URL}@localhost:{server.port}/2", "cannot be verified"),
])
def test_a_coordinator_the_broker_refuses_says_so_at_start_up_naming_the_host(managed_redis, url_of, says):
    """Instead of starting, then logging "Redis unreachable ... retrying" for as long as a batch runs."""
    from engine.distributed import CeleryDispatcher

    with pytest.raises(BrokerError) as refused:
        CeleryDispatcher(url_of(managed_redis))
    message = refused.value.message
    assert says in message and f"localhost:{managed_redis.port}/2" in message and "\n" not in message
    assert OTHER_PASSWORD not in message and APP_PASSWORD_IN_URL not in message


@pytest.mark.redis
@pytest.mark.parametrize("user, channel", [("nochannels", "/2.celery.pidbox"), ("controlonly", "celery-task-meta-*")])
def test_a_coordinator_whose_acl_user_lacks_a_channel_celery_needs_is_refused_at_start_up(managed_redis, user, channel):
    """Without the control channel its revokes (cancel, a lost row) failed as "Redis housekeeping failed";
    without the results' channels Celery's result listener was refused in silence. It started either way."""
    from engine.distributed import CeleryDispatcher

    with pytest.raises(BrokerError) as refused:
        CeleryDispatcher(managed_redis.url(user, OTHER_PASSWORD))
    message = refused.value.message
    assert f"may not use the channel {channel}" in message and "&*" in message and "\n" not in message
    assert "&/2.celery.pidbox &celery-task-meta-*" in message and OTHER_PASSWORD not in message


def _wrong_scheme_urls(server: ManagedRedis) -> list[tuple[str, str]]:
    """(URL, what the refusal says): rediss:// at the port without TLS, redis:// at the TLS port."""
    return [
        (f"rediss://app:{APP_PASSWORD_IN_URL}@localhost:{server.plain_port}/2?ssl_ca_certs={server.ca}",
         f"the server at localhost:{server.plain_port} answered without TLS; use redis://"),
        (f"redis://app:{APP_PASSWORD_IN_URL}@localhost:{server.port}/2",
         f"the server at localhost:{server.port} speaks TLS; use rediss://"),
    ]


@pytest.mark.redis
@pytest.mark.parametrize("which", [0, 1], ids=["rediss-at-a-plain-port", "redis-at-a-tls-port"])
def test_a_coordinator_whose_url_has_the_wrong_scheme_for_the_port_is_told_which_to_use(managed_redis, which):
    """It looked like an outage: "Timeout connecting to server" or "Connection reset by peer", retried."""
    from engine.distributed import CeleryDispatcher

    url, says = _wrong_scheme_urls(managed_redis)[which]
    assert CeleryDispatcher(managed_redis.url()).close() is None  # the right URL is no refusal
    with pytest.raises(BrokerError) as refused:
        CeleryDispatcher(url)
    assert says in refused.value.message and "\n" not in refused.value.message
    assert APP_PASSWORD_IN_URL not in refused.value.message


@pytest.mark.redis
@pytest.mark.slow
@pytest.mark.parametrize("which", [0, 1], ids=["rediss-at-a-plain-port", "redis-at-a-tls-port"])
def test_a_worker_whose_url_has_the_wrong_scheme_for_the_port_exits_saying_which_to_use(managed_redis, tmp_path, which):
    """It waited for ever, saying every 30 s that it was waiting for the broker."""
    url, says = _wrong_scheme_urls(managed_redis)[which]
    refused = subprocess.run(_worker_command(tmp_path, url, "w"), cwd=tmp_path, capture_output=True, text=True,
                             timeout=120)
    assert refused.returncode == 2 and says in refused.stderr, (refused.stdout + refused.stderr)[-2000:]
    assert "loading and warming up" not in refused.stderr and APP_PASSWORD_IN_URL not in refused.stderr


@pytest.mark.redis
def test_a_worker_with_a_wrong_password_exits_with_one_line_that_names_the_host_not_the_password(
        managed_redis, tmp_path):
    refused = subprocess.run(_worker_command(tmp_path, managed_redis.url(password="wrong-" + OTHER_PASSWORD), "w"),
                             cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert "refused the user name or password" in refused.stderr and f"localhost:{managed_redis.port}" in refused.stderr
    assert OTHER_PASSWORD not in refused.stdout + refused.stderr and "Traceback" not in refused.stderr
    assert "loading and warming up" not in refused.stderr  # refused before any model was loaded


@pytest.mark.redis
def test_a_worker_waiting_for_its_broker_does_not_log_the_password(managed_redis, tmp_path):
    """A TLS certificate it cannot verify is a refusal too, said once, not waited for."""
    url = f"rediss://app:{APP_PASSWORD_IN_URL}@localhost:{managed_redis.port}/2"  # no ssl_ca_certs
    refused = subprocess.run(_worker_command(tmp_path, url, "w"), cwd=tmp_path, capture_output=True, text=True,
                             timeout=120)
    output = refused.stdout + refused.stderr
    assert refused.returncode == 2 and "certificate cannot be verified" in refused.stderr, output[-2000:]
    assert APP_PASSWORD_IN_URL not in output and "rediss://app:***@localhost" in refused.stderr


@pytest.mark.redis
@pytest.mark.slow
def test_a_worker_whose_acl_user_has_no_channels_is_refused_before_it_loads_its_models(managed_redis, tmp_path):
    """Celery's remote control needs a Pub/Sub channel; without it Celery stopped the worker after its
    models were loaded, with a traceback and exit status 0."""
    refused = subprocess.run(_worker_command(tmp_path, managed_redis.url("nochannels", OTHER_PASSWORD), "w"),
                             cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert "may not use the channel /2.celery.pidbox" in refused.stderr and "&*" in refused.stderr
    assert "loading and warming up" not in refused.stderr and OTHER_PASSWORD not in refused.stderr


@pytest.mark.redis
@pytest.mark.slow
def test_a_worker_whose_acl_user_has_only_the_control_channel_is_refused_before_it_loads_its_models(
        managed_redis, tmp_path):
    """Celery announces every stored result on a channel of its own; refused it, the worker started, then
    died with a traceback on its first row (the result's SET is refused with it), every row in turn."""
    refused = subprocess.run(_worker_command(tmp_path, managed_redis.url("controlonly", OTHER_PASSWORD), "w"),
                             cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert "may not use the channel celery-task-meta-*" in refused.stderr
    assert "loading and warming up" not in refused.stderr and OTHER_PASSWORD not in refused.stderr


@pytest.mark.redis
@pytest.mark.slow
def test_a_worker_that_celery_stops_on_an_error_exits_with_a_failure_status(managed_redis, tmp_path):
    """A user that may touch only sd35:* keys passes our checks; Celery's own keys are refused and Celery
    gives up. The worker exited 0 then, which a supervisor restarting on failure takes for a clean stop."""
    stopped = subprocess.run(_worker_command(tmp_path, managed_redis.url("sd35keys", OTHER_PASSWORD), "w"),
                             cwd=tmp_path, capture_output=True, text=True, timeout=180)
    output = stopped.stdout + stopped.stderr
    assert "no permissions to access one of the keys" in output, output[-3000:]
    assert stopped.returncode == 2 and "Celery gave up" in output, output[-3000:]


def test_a_coordinator_asked_to_stop_while_redis_is_unreachable_stops(tmp_path):
    """SIGTERM (systemd's stop, docker stop) or Cancel during an outage: the dispatcher retried Redis for ever
    and never asked whether it should stop, so only SIGKILL ended the coordinator."""
    import threading

    from engine.distributed import CeleryDispatcher
    from engine.jobs import CANCELLED, RowJob

    dispatcher = CeleryDispatcher(f"redis://127.0.0.1:{_free_port()}/0")  # nothing listens there
    jobs = [RowJob(f"bstop:{n}", "bstop", n, {}, {}, 60.0, "sd35_demo_tiny") for n in (2, 3)]
    stop = threading.Event()
    results: list = []
    runner = threading.Thread(target=lambda: results.extend(dispatcher.run(jobs, None, stop.is_set)), daemon=True)
    runner.start()
    stop.set()
    runner.join(timeout=60)  # a bound for a hang, not a measurement: it returns within a retry or two
    dispatcher.close()
    assert not runner.is_alive(), "still retrying Redis after it was asked to stop"
    assert sorted((r.row_key, r.status) for r in results) == [("bstop:2", CANCELLED), ("bstop:3", CANCELLED)]
