"""The command line as an unattended user runs it: real subprocesses, real files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = Path(__file__).parent / "data" / "comfyui-examples"


def app(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "app.py"), *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def small_example(tmp_path: Path) -> Path:
    """The official SD3.5 API example pointed at the demo model, small enough for a CPU."""
    source = EXAMPLES / "sd3.5_simple_example.api.json"
    workflow = json.loads(source.read_text())
    for node in workflow.values():
        if node["class_type"] == "CheckpointLoaderSimple":
            node["inputs"]["ckpt_name"] = "sd35_demo_tiny"
        if node["class_type"] == "EmptySD3LatentImage":
            node["inputs"].update(width=64, height=64)
        if node["class_type"] == "KSampler":
            node["inputs"]["steps"] = 2
    path = tmp_path / "wf.json"
    path.write_text(json.dumps(workflow))
    return path


def test_run_workflow_once_per_prompt_line(tmp_path):
    workflow = small_example(tmp_path)
    prompts = tmp_path / "prompts.txt"
    texts = ["a red jacket on a hanger", "", "a white boot, studio light", "a green lamp", "a blue mug",
             "a yellow scarf", "a black hat"]  # six prompts: more than one GPU batch of four
    prompts.write_text("\n".join(texts) + "\n", encoding="utf-8")
    out = tmp_path / "batch_out"
    result = app(
        "--data-dir", str(tmp_path / "data"), "run", "--workflow", str(workflow),
        "--prompt-file", str(prompts), "--output-dir", str(out), cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    files = sorted(out.rglob("*.png"))  # in the batch's folder: the SaveImage prefix and the line number
    lines = [n for n, t in enumerate(texts, start=1) if t]
    assert sorted(f.name for f in files) == sorted(f"ComfyUI_{n}.png" for n in lines)  # none overwritten
    for line in lines:
        file = next(f for f in files if f.name == f"ComfyUI_{line}.png")
        prompt = json.loads(Image.open(file).text["prompt"])
        assert any(n["inputs"].get("text") == texts[line - 1] for n in prompt.values()
                   if n["class_type"] == "CLIPTextEncode")
        assert file.name in result.stdout + result.stderr
    # Recorded like any batch: one generation per prompt, numbered by its line (line 2 is blank)
    assert ledger_statuses(tmp_path / "data") == {n: "done" for n in lines}


def test_a_prompt_file_run_killed_resumes_without_redoing_finished_prompts(tmp_path):
    workflow = small_example(tmp_path)
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes("一只红色的杯子\na white boot\na green lamp\n".encode("gb18030"))  # Chinese Notepad
    base = ["--data-dir", str(tmp_path / "data"), "run", "--workflow", str(workflow), "--prompt-file", str(prompts)]
    first = app(*base, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    import sqlite3

    with sqlite3.connect(tmp_path / "data" / "ledger.db") as conn:
        texts = [json.loads(v)["prompt"] for (v,) in conn.execute("SELECT row_values FROM generations ORDER BY row_number")]
        assert texts == ["一只红色的杯子", "a white boot", "a green lamp"]
        # as if the process had died after the first prompt: the others back to queued
        conn.execute("UPDATE generations SET status = 'queued', image_path = NULL WHERE row_number > 1")
        conn.execute("UPDATE batches SET status = 'running'")
    resumed = app(*base, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming unfinished batch" in resumed.stdout
    assert "prompt line 1:" not in resumed.stdout and "prompt line 2:" in resumed.stdout


def test_validate_prints_every_problem_and_fails(tmp_path):
    workflow = json.loads(small_example(tmp_path).read_text())
    for node in workflow.values():
        if node["class_type"] == "KSampler":
            node["inputs"].update(sampler_name="no_such_sampler", steps=0)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(workflow))
    result = app("validate", str(bad), cwd=tmp_path)
    assert result.returncode == 1
    assert "sampler_name" in result.stdout and "euler" in result.stdout  # names the supported ones
    assert "steps" in result.stdout
    good = app("validate", str(small_example(tmp_path)), cwd=tmp_path)
    assert good.returncode == 0 and "ok" in good.stdout


def test_templates_lists_fields(tmp_path):
    result = app("--templates-dir", str(ROOT / "templates"), "templates", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "product_shot" in result.stdout and "product_name: string, required" in result.stdout


def test_batch_exit_status_and_summary(tmp_path):
    sheet = tmp_path / "rows.csv"
    sheet.write_text("product_name,width,height,steps\nJacket,64,64,2\nBoots,64,64,oops\n", encoding="utf-8")
    result = app(
        "--data-dir", str(tmp_path / "data"), "--templates-dir", str(ROOT / "templates"),
        "run", "--template", "product_shot", "--sheet", str(sheet), "--zip", cwd=tmp_path,
    )
    assert result.returncode == 1  # a skipped row makes the run non-zero
    assert "row 3: steps" in result.stderr
    assert "built-in demo model" in result.stderr  # an unattended log says what made the pictures
    assert "1 done, 0 failed, 0 timed out, 1 skipped" in result.stdout
    assert list((tmp_path / "data" / "outputs").glob("*.zip"))


def test_demo_checkpoint_file_runs_through_the_single_file_loader(tmp_path):
    models = tmp_path / "models" / "checkpoints"
    result = app("demo-checkpoint", "--out", str(models / "demo.safetensors"), cwd=tmp_path)
    assert result.returncode == 0 and "not a real one" in result.stdout
    workflow = json.loads(small_example(tmp_path).read_text())
    for node in workflow.values():
        if node["class_type"] == "CheckpointLoaderSimple":
            node["inputs"]["ckpt_name"] = "demo.safetensors"
    path = tmp_path / "file.json"
    path.write_text(json.dumps(workflow))
    run = app(
        "--models-dir", str(tmp_path / "models"), "--data-dir", str(tmp_path / "data"),
        "run", "--workflow", str(path), cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr
    assert list((tmp_path / "data" / "outputs").rglob("*.png"))


def test_token_and_users_commands(tmp_path):
    secret = "s" * 48
    token = app("token", "create", "--user", "alice", "--role", "admin", "--ttl", "1h", cwd=tmp_path, env={"SD35_JWT_SECRET": secret})
    assert token.returncode == 0, token.stderr
    from webapp.auth import TokenIssuer

    claims = TokenIssuer(secret, "sd35-batch", "sd35-batch-api").verify(token.stdout.strip())
    assert (claims.sub, claims.role) == ("alice", "admin")
    assert claims.jti in token.stderr  # what `token revoke` and the audit trail know it by
    refused = app("token", "create", "--user", "alice", cwd=tmp_path, env={"SD35_JWT_SECRET": ""})
    assert refused.returncode == 2 and "SD35_JWT_SECRET" in refused.stderr

    revoked = app("token", "revoke", token.stdout.strip(), cwd=tmp_path, env={"SD35_JWT_SECRET": secret})
    assert revoked.returncode == 0 and claims.jti in revoked.stdout, revoked.stderr
    from engine.errors import AccessDenied
    from engine.store import BatchLedger
    from webapp.revocation import TokenRevocations

    with BatchLedger(tmp_path / "data" / "ledger.db") as ledger, pytest.raises(AccessDenied, match="revoked"):
        TokenRevocations(ledger).check(claims)
    forged = app("token", "revoke", "not-a-token", cwd=tmp_path, env={"SD35_JWT_SECRET": secret})
    assert forged.returncode == 2 and "token is invalid" in forged.stderr

    users = tmp_path / "users.json"
    added = app("users", "add", "bob", "--role", "user", "--password", "correct horse", "--file", str(users), cwd=tmp_path)
    assert added.returncode == 0, added.stderr
    from webapp.auth import UserStore

    store = UserStore.from_file(users)
    assert store.authenticate("bob", "correct horse") is not None
    assert store.authenticate("bob", "wrong") is None


def test_token_create_refuses_a_name_the_server_would_refuse(tmp_path):
    """With users configured the server answers a token of someone not among them with 401 unknown_user:
    the command says so at once instead of printing a token that never works."""
    users = tmp_path / "users.json"
    assert app("users", "add", "bob", "--password", "pw", "--file", str(users), cwd=tmp_path).returncode == 0
    env = {"SD35_USERS_FILE": str(users), "SD35_JWT_SECRET": "s" * 48}
    ghost = app("token", "create", "--user", "ghost", cwd=tmp_path, env=env)
    assert ghost.returncode == 2 and "no user 'ghost'" in ghost.stderr and not ghost.stdout.strip()
    bob = app("token", "create", "--user", "bob", "--role", "admin", cwd=tmp_path, env=env)
    assert bob.returncode == 0 and bob.stdout.strip()
    assert "bob is a user in the users file" in bob.stderr  # the server acts with that role, not the token's


def test_library_errors_become_one_line_and_exit_2(tmp_path):
    missing = app("run", "--template", "no_such_template", "--sheet", str(tmp_path / "x.csv"), cwd=tmp_path)
    assert missing.returncode == 2 and missing.stderr.startswith("error: ")
    assert "Traceback" not in missing.stderr


def test_resume_of_an_unknown_batch_is_an_error_not_a_new_batch(tmp_path):
    sheet = tmp_path / "rows.csv"
    sheet.write_text("product_name,width,height,steps\nJacket,64,64,1\n", encoding="utf-8")
    result = app(
        "--data-dir", str(tmp_path / "data"), "--templates-dir", str(ROOT / "templates"),
        "run", "--template", "product_shot", "--sheet", str(sheet), "--resume", "b-typo", cwd=tmp_path,
    )
    assert result.returncode == 2 and "no batch 'b-typo' to resume" in result.stderr
    assert not list((tmp_path / "data").rglob("*.png"))


def test_python_app_py_serves_the_page_and_warms_up_cleanly(tmp_path):
    """`python app.py` as the README starts it: the page answers while the model warms up on its own thread,
    and the warm-up finishes without an error (two threads importing diffusers/transformers at once once
    broke it: "cannot import name 'AutoModel'")."""
    import socket
    import time

    import httpx

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log_path = tmp_path / "serve.log"
    env = {**os.environ, "SD35_DATA_DIR": str(tmp_path / "data"), "SD35_PORT": str(port)}
    with open(log_path, "w") as log:
        server = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        page = None
        while time.monotonic() < deadline and server.poll() is None:
            try:
                page = httpx.get(f"http://127.0.0.1:{port}/", timeout=5)
                break
            except httpx.TransportError:
                time.sleep(0.2)
        assert page is not None and page.status_code == 200, log_path.read_text()
        assert httpx.get(f"http://127.0.0.1:{port}/api/system", timeout=10).json()["demo_in_use"] is True
        while time.monotonic() < deadline and "model warmed up" not in log_path.read_text():
            time.sleep(0.2)
        text = log_path.read_text()
        assert "model warmed up" in text and "Traceback" not in text and "warm-up failed" not in text, text
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.parametrize("command", [[], ["serve"], ["run"], ["validate"], ["templates"], ["demo-checkpoint"],
                                     ["calibrate"], ["bench"], ["token", "create"], ["token", "revoke"],
                                     ["users", "add"], ["users", "remove"], ["worker"]])
def test_every_help_page_prints_with_every_settings_text(tmp_path, command):
    from engine.settings import SETTINGS

    result = app(*command, "--help", cwd=tmp_path, timeout=60)
    assert result.returncode == 0, result.stderr
    page = " ".join(result.stdout.split())  # argparse wraps lines
    for spec in SETTINGS:  # help texts hold "%", which argparse would read as a format code
        assert " ".join(spec.help.split()) in page, spec.name


def ledger_statuses(data: Path) -> dict[int, str]:
    import sqlite3

    with sqlite3.connect(data / "ledger.db") as conn:
        return dict(conn.execute("SELECT row_number, status FROM generations"))


def test_ctrl_c_stops_between_steps_keeps_finished_rows_and_the_same_command_resumes(tmp_path):
    import signal

    (tmp_path / "s.csv").write_text("product_name,width,height,steps\n" + "".join(
        f"{name},512,512,60\n" for name in "ABCD"))
    command = [sys.executable, str(ROOT / "app.py"), "--data-dir", "d", "run", "--template", "product_shot",
               "--sheet", "s.csv", "--max-gpu-batch", "1"]
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = process.stdout.readline()  # the first finished row; the second is being sampled
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert first.startswith("row 2: ") and process.returncode == 130, err[-2000:]  # not 1: nothing failed
    assert "stopping after the current sampler step" in err and "Traceback" not in err
    assert "1 done" in out and "3 not run" in out
    assert ledger_statuses(tmp_path / "d") == {2: "done", 3: "cancelled", 4: "cancelled", 5: "cancelled"}

    again = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "resuming unfinished batch" in again.stdout, again.stderr[-2000:]
    assert set(ledger_statuses(tmp_path / "d").values()) == {"done"}
    assert len(list((tmp_path / "d" / "outputs").rglob("*.png"))) == 4


def test_path_arguments_that_are_missing_or_folders_get_one_line_errors(tmp_path):
    for args in (["validate", "missing.json"], ["validate", str(tmp_path)], ["run", "--workflow", "missing.json"],
                 ["run", "--template", "product_shot", "--sheet", str(tmp_path)]):
        result = app("--data-dir", str(tmp_path / "d"), *args, cwd=tmp_path)
        assert result.returncode == 2, (args, result.stderr)
        assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr, (args, result.stderr)


def test_zip_into_a_folder_and_a_bad_zip_path_refused_before_the_run(tmp_path):
    (tmp_path / "s.csv").write_text("product_name,width,height,steps\nmug,64,64,1\n")
    (tmp_path / "zips").mkdir()
    base = ["--data-dir", str(tmp_path / "d"), "run", "--template", "product_shot", "--sheet", "s.csv"]
    refused = app(*base, "--zip", str(tmp_path / "nowhere" / "x.zip"), cwd=tmp_path)
    assert refused.returncode == 2 and "does not exist" in refused.stderr
    assert not (tmp_path / "d" / "outputs").exists() or not list((tmp_path / "d" / "outputs").rglob("*.png"))
    assert ledger_statuses(tmp_path / "d") == {}  # nothing recorded: the next run is not a "resume"
    done = app(*base, "--zip", str(tmp_path / "zips"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert len(list((tmp_path / "zips").glob("b*.zip"))) == 1


def test_stop_on_invalid_rows_says_what_is_wrong_with_each_and_sheet_notes_are_printed(tmp_path):
    (tmp_path / "s.csv").write_bytes("product_name,seed,width,,steps\n一只猫,1,64,x,1\nB,abc,64,,1\nC,1,9999,,1\n"
                                     .encode("gb18030"))
    result = app("--data-dir", str(tmp_path / "d"), "run", "--template", "product_shot", "--sheet", "s.csv",
                 "--on-invalid", "stop", cwd=tmp_path)
    assert result.returncode == 2
    assert "row 3: seed: " in result.stderr and "row 4: width: " in result.stderr
    assert "note: column D has no name in row 1" in result.stderr


def test_templates_are_found_from_any_working_directory(tmp_path):
    listed = app("templates", cwd=tmp_path)
    assert listed.returncode == 0 and "product_shot" in listed.stdout
    # An uploaded template (kept in the data folder) is listed beside the shipped ones.
    mine = tmp_path / "data" / "templates" / "shot_mine"
    mine.mkdir(parents=True)
    schema = json.loads((ROOT / "templates" / "product_shot" / "template.json").read_text(encoding="utf-8"))
    (mine / "template.json").write_text(json.dumps({**schema, "name": "shot_mine"}), encoding="utf-8")
    (mine / "workflow.json.j2").write_bytes((ROOT / "templates" / "product_shot" / "workflow.json.j2").read_bytes())
    listed = app("templates", cwd=tmp_path)
    assert listed.returncode == 0 and "shot_mine" in listed.stdout and "product_shot" in listed.stdout
    missing = app("--templates-dir", str(tmp_path / "none"), "templates", cwd=tmp_path)
    assert missing.returncode == 2 and "does not exist" in missing.stderr


def test_on_off_settings_can_be_turned_off_from_the_command_line():
    sys.path.insert(0, str(ROOT))
    import app as cli

    parse = lambda *args: cli._settings_from(cli.build_parser().parse_args([*args, "templates"]))  # noqa: E731
    assert parse("--no-compile").compile is False
    assert parse("--compile").compile is True
    assert parse().compile is True  # the default


def test_users_entry_prints_an_sd35_users_entry_the_app_accepts(tmp_path):
    result = app("users", "entry", "alice", "--role", "admin", "--password", "pa55word!", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    from webapp.auth import load_users
    from engine.settings import load_settings

    users = load_users(load_settings({}, environ={}), environ={"SD35_USERS": result.stdout.strip()})
    assert users.authenticate("alice", "pa55word!").role == "admin"
    assert users.authenticate("alice", "wrong") is None


def test_the_zip_beside_the_images_keeps_a_dotted_batch_id_whole(tmp_path):
    sys.path.insert(0, str(ROOT))
    import app as cli

    assert cli._zip_path(True, "v1.2", tmp_path / "outputs" / "v1.2") == tmp_path / "outputs" / "v1.2.zip"
    assert cli._zip_path(str(tmp_path), "v1.2", tmp_path / "x") == tmp_path / "v1.2.zip"


def test_a_hugging_face_repo_id_in_the_local_cache_passes_validation(tmp_path):
    # The cache layout huggingface_hub reads offline: refs/main names the snapshot folder
    repo = tmp_path / "hf" / "hub" / "models--acme--tiny-sd35"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "model_index.json").write_text('{"_class_name": "StableDiffusion3Pipeline"}')
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    workflow = json.loads(small_example(tmp_path).read_text())
    for repo_id, expected in (("acme/tiny-sd35", 0), ("acme/not-cached", 1)):
        for node in workflow.values():
            if node["class_type"] == "CheckpointLoaderSimple":
                node["inputs"]["ckpt_name"] = repo_id
        path = tmp_path / f"{repo_id.replace('/', '_')}.json"
        path.write_text(json.dumps(workflow))
        result = app("validate", str(path), cwd=tmp_path, env=env)
        assert result.returncode == expected, (repo_id, result.stdout, result.stderr)
    assert "acme/not-cached" in result.stdout and "Value not in list" in result.stdout


def test_the_cli_names_columns_no_field_uses(tmp_path):
    (tmp_path / "s.csv").write_text("Product Name,Colr,width,height,steps\nMug,red,64,64,1\n")
    result = app("--data-dir", str(tmp_path / "d"), "run", "--template", "product_shot", "--sheet", "s.csv",
                 cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "note: columns no field of product_shot uses (ignored; check their spelling): Colr" in result.stderr


def _json_lines(text: str) -> list[dict]:
    """Every non-empty line parsed as JSON: one that is not fails the test with the line itself."""
    records = []
    for line in text.splitlines():
        if line.strip():
            try:
                records.append(json.loads(line))
            except ValueError:
                pytest.fail(f"not a JSON log line on stderr: {line!r}")
    return records


def test_json_logs_make_a_batch_runs_stderr_pure_json_lines_with_its_rows_and_problems(tmp_path):
    sheet = tmp_path / "rows.csv"
    sheet.write_text("product_name,width,height,steps,colour\nJacket,64,64,2,red\nBoots,64,64,oops,\n",
                     encoding="utf-8")
    result = app("--data-dir", "d", "--log-format", "json", "run", "--template", "product_shot",
                 "--sheet", str(sheet), cwd=tmp_path)
    assert result.returncode == 1
    records = _json_lines(result.stderr)  # no progress bars in between
    messages = [r["message"] for r in records]
    assert any("built-in demo model" in m for m in messages)
    assert any(m.startswith("row 3: steps") and r["level"] == "WARNING" for m, r in zip(messages, records))
    assert any("colour" in m for m in messages)  # the column no field uses
    assert "batch started: 1 row(s) to run" in messages and "batch ended: 1 done, 0 failed" in messages
    assert "1 done, 0 failed, 0 timed out, 1 skipped" in result.stdout  # the summary stays on stdout

    failed = app("--data-dir", "d", "--log-format", "json", "run", "--template", "product_shot",
                 "--sheet", "missing.csv", cwd=tmp_path)
    assert failed.returncode == 2
    (error,) = _json_lines(failed.stderr)
    assert error["level"] == "ERROR" and "missing.csv" in error["message"]


def test_a_worker_logs_in_the_log_format_setting(tmp_path):
    """A worker runs unattended under a supervisor: what it says (here, that its broker is down) must reach
    the log collector as JSON lines, and in console format when that is the setting."""
    import socket
    import threading

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for log_format in ("json", "console"):
        process = subprocess.Popen(
            [sys.executable, str(ROOT / "app.py"), "--data-dir", "d", "--log-format", log_format, "worker",
             "--broker", f"redis://127.0.0.1:{port}/0"],
            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        # Read until the worker has said it waits (its start-up takes longer on a loaded machine), then stop it
        lines: list[str] = []
        watchdog = threading.Timer(120, process.kill)  # a worker that never says it ends the wait, and fails below
        watchdog.start()
        try:
            for line in process.stderr:
                lines.append(line)
                if "waiting for the broker" in line:
                    break
        finally:
            watchdog.cancel()
            process.kill()
            process.communicate()
        stderr = "".join(lines)
        if log_format == "json":
            records = _json_lines(stderr)
            assert any(r["level"] == "WARNING" and "waiting for the broker" in r["message"] for r in records)
        else:
            assert "waiting for the broker" in stderr and not stderr.lstrip().startswith("{")


def test_an_output_folder_that_would_serve_the_ledger_is_refused(tmp_path):
    result = app("--data-dir", "d", "--output-dir", ".", "templates", cwd=tmp_path)
    assert result.returncode == 2
    assert "would serve the data folder d to every user" in result.stderr
    assert not (tmp_path / "d").exists()  # refused before anything was created
    users = app("--output-dir", "out", "--users-file", "out/users.json", "templates", cwd=tmp_path)
    assert users.returncode == 2 and "would serve the users file out/users.json" in users.stderr


def test_sigterm_stops_a_run_cleanly_with_its_own_exit_status(tmp_path):
    """`timeout`, systemd and CI runners send SIGTERM: the run stops between steps like Ctrl-C, prints its
    summary, leaves no row claimed as running, and exits 143 (128 + SIGTERM), which a script tells apart from
    failed rows (1)."""
    import signal

    (tmp_path / "s.csv").write_text("product_name,width,height,steps\n" + "".join(
        f"{name},512,512,60\n" for name in "ABC"))
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "app.py"), "--data-dir", "d", "run", "--template", "product_shot",
         "--sheet", "s.csv", "--max-gpu-batch", "1"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = process.stdout.readline()
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert first.startswith("row 2: ") and process.returncode == 143, err[-2000:]
    assert "SIGTERM: stopping after the current sampler step" in err and "Traceback" not in err
    assert "1 done" in out and "2 not run" in out
    assert ledger_statuses(tmp_path / "d") == {2: "done", 3: "cancelled", 4: "cancelled"}


def test_a_closed_terminal_stops_a_run_cleanly(tmp_path):
    """Closing the terminal (or the SSH session) a run was started from sends SIGHUP and makes every
    later write to that terminal fail: the run stops between steps like SIGTERM, finishes its
    bookkeeping with nobody to read it, leaves no row claimed, and exits 129 (128 + SIGHUP)."""
    import pty
    import signal

    (tmp_path / "s.csv").write_text("product_name,width,height,steps\n" + "".join(
        f"{name},512,512,60\n" for name in "ABC"))
    command = [sys.executable, str(ROOT / "app.py"), "--data-dir", "d", "run", "--template", "product_shot",
               "--sheet", "s.csv", "--max-gpu-batch", "1"]
    terminal, child_side = pty.openpty()
    process = subprocess.Popen(command, cwd=tmp_path, stdout=child_side, stderr=subprocess.PIPE)
    os.close(child_side)
    seen = b""
    while b"row 2: " not in seen:
        chunk = os.read(terminal, 4096)
        assert chunk, seen
        seen += chunk
    os.close(terminal)  # the terminal is gone: writing to it fails from now on
    process.send_signal(signal.SIGHUP)
    _, err = process.communicate(timeout=120)
    err = err.decode()
    assert process.returncode == 129, err[-2000:]
    assert "SIGHUP: stopping after the current sampler step" in err and "Traceback" not in err
    assert ledger_statuses(tmp_path / "d") == {2: "done", 3: "cancelled", 4: "cancelled"}  # resumable


@pytest.mark.parametrize("read_only", ["the ledger file", "its folder"])
def test_a_ledger_this_user_cannot_write_is_refused_naming_file_and_folder(tmp_path, read_only, as_ordinary_user):
    """SQLite opens a file it may not write read-only without a word (so the first batch found out), and
    in WAL mode it also needs the folder, for ledger.db-wal and -shm: the refusal says both."""
    (tmp_path / "s.csv").write_text("product_name,width,height,steps\nMug,64,64,1\n")
    assert app("--data-dir", "d", "run", "--template", "product_shot", "--sheet", "s.csv", cwd=tmp_path).returncode == 0
    data = tmp_path / "d"
    locked = data / "ledger.db" if read_only == "the ledger file" else data
    locked.chmod(0o444 if locked.is_file() else 0o555)
    try:
        result = subprocess.run(
            [*as_ordinary_user, sys.executable, str(ROOT / "app.py"), "--data-dir", "d", "run", "--template",
             "product_shot", "--sheet", "s.csv", "--new-batch"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    finally:
        locked.chmod(0o644 if locked.is_file() else 0o755)
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"the ledger {data / 'ledger.db'} cannot be written" in result.stderr
    assert f"its folder {data}" in result.stderr and "Traceback" not in result.stderr
    assert ledger_statuses(data) == {2: "done"}  # nothing recorded, nothing run


def test_a_data_folder_that_cannot_be_created_is_named_with_the_setting_to_change(tmp_path, as_ordinary_user):
    """The default data_dir is relative: started from a read-only folder (a service's working directory,
    a deployed copy of the code), the app must say where it tried and how to point it elsewhere."""
    (tmp_path / "s.csv").write_text("product_name,width,height,steps\nMug,64,64,1\n")
    (tmp_path / "code").mkdir(mode=0o555)
    try:
        result = subprocess.run([*as_ordinary_user, sys.executable, str(ROOT / "app.py"), "run", "--template",
                                 "product_shot", "--sheet", "../s.csv"], cwd=tmp_path / "code", capture_output=True,
                                text=True, timeout=300)
    finally:
        (tmp_path / "code").chmod(0o755)
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"cannot create the folder {tmp_path / 'code' / 'data'}: Permission denied" in result.stderr
    assert "SD35_DATA_DIR" in result.stderr and "Traceback" not in result.stderr


def test_chinese_file_names_are_written_in_utf8_whatever_the_locale(tmp_path):
    """A server whose locale is not UTF-8 (LANG=en_US is ISO-8859-1; LANG=C with PYTHONUTF8=0 is ASCII, as
    here): Python would name files in the locale's encoding, so a Chinese cell's file could not be written
    at all, or a process under another locale would read its name as another one."""
    (tmp_path / "s.csv").write_text("product_name,color,width,height,steps\n红色夹克,红,64,64,1\n", encoding="utf-8")
    result = app("--data-dir", "d", "run", "--template", "product_shot", "--sheet", "s.csv", cwd=tmp_path,
                 env={"LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0"})
    assert result.returncode == 0, result.stderr[-2000:]
    folder = next((tmp_path / "d" / "outputs").iterdir())
    assert os.listdir(bytes(folder)) == ["红色夹克_红.png".encode("utf-8")]
    assert ledger_statuses(tmp_path / "d") == {2: "done"} and "row 2: " in result.stdout


def test_a_run_where_no_row_can_run_exits_2_and_its_help_lists_the_exit_statuses(tmp_path):
    (tmp_path / "s.csv").write_text("product_name,width,height,steps\nA,64,64,x\nB,64,64,y\n")
    result = app("--data-dir", "d", "run", "--template", "product_shot", "--sheet", "s.csv", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "0 done, 0 failed, 0 timed out, 2 skipped" in result.stdout
    page = app("run", "--help", cwd=tmp_path).stdout
    assert "exit status:" in page and "143 by SIGTERM" in page and "no row of the batch could run" in page


def test_an_unattended_runs_stderr_holds_no_progress_bars_and_json_logs_hold_only_json(tmp_path):
    """A cron or CI log is not a terminal: no carriage-return bars there. With JSON logs, the tokenizer's own
    warning about a long prompt is a JSON record too, not a plain "[transformers] ..." line."""
    long_name = " ".join(["waterproof"] * 90)  # far over CLIP's 77 tokens
    (tmp_path / "s.csv").write_text(f"product_name,width,height,steps\nMug,64,64,1\n{long_name},64,64,1\n")
    plain = app("--data-dir", "d", "run", "--template", "product_shot", "--sheet", "s.csv", cwd=tmp_path)
    assert plain.returncode == 0, plain.stderr
    assert "\r" not in plain.stderr and "\x1b" not in plain.stderr, plain.stderr[-2000:]
    assert "row 2: " in plain.stdout and "row 3: " in plain.stdout  # the per-row lines stay
    logged = app("--data-dir", "d2", "--log-format", "json", "run", "--template", "product_shot",
                 "--sheet", "s.csv", cwd=tmp_path)
    assert logged.returncode == 0, logged.stderr
    records = _json_lines(logged.stderr)
    assert any(r["logger"].startswith("transformers") and "sequence length" in r["message"] for r in records)


def _batch_ids(data: Path) -> list[str]:
    import sqlite3

    with sqlite3.connect(data / "ledger.db") as conn:
        return [batch_id for (batch_id,) in conn.execute("SELECT id FROM batches ORDER BY created_at")]


def test_the_same_command_run_again_makes_nothing_twice_and_retries_failed_rows_of_its_batch(tmp_path):
    """A cron job run twice, or a CI retry after a row failed: the finished batch is continued, not made
    again from scratch in a new batch; --retry-failed reruns only its failed rows; --new-batch starts over."""
    import sqlite3

    (tmp_path / "s.csv").write_text("product_name,width,height,steps\nMug,64,64,1\nLamp,64,64,1\n")
    command = ["--data-dir", "d", "run", "--template", "product_shot", "--sheet", "s.csv"]
    first = app(*command, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    (batch,) = _batch_ids(tmp_path / "d")

    again = app(*command, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert f"batch {batch} of the same template and sheet already ran: nothing left to run" in again.stdout
    assert "row 2:" not in again.stdout and _batch_ids(tmp_path / "d") == [batch]

    with sqlite3.connect(tmp_path / "d" / "ledger.db") as conn:  # as if Lamp had failed
        conn.execute("UPDATE generations SET status = 'failed', error = 'boom', image_path = NULL, images = NULL "
                     "WHERE row_number = 3")
    failed = app(*command, cwd=tmp_path)
    assert failed.returncode == 1 and "--retry-failed reruns its failed rows" in failed.stdout
    retried = app(*command, "--retry-failed", cwd=tmp_path)
    assert retried.returncode == 0, retried.stderr
    assert "row 3: " in retried.stdout and "row 2: " not in retried.stdout
    assert _batch_ids(tmp_path / "d") == [batch] and ledger_statuses(tmp_path / "d") == {2: "done", 3: "done"}

    fresh = app(*command, "--new-batch", cwd=tmp_path)
    assert fresh.returncode == 0 and "row 2: " in fresh.stdout and len(_batch_ids(tmp_path / "d")) == 2


def test_a_second_copy_of_a_running_command_is_refused_and_an_edited_sheet_is_named(tmp_path):
    """Overlapping cron runs: the second one must not make every image again in a batch of its own. A sheet
    edited after a stopped run starts a new batch, and says which unfinished batch it leaves alone."""
    import signal

    sheet = tmp_path / "s.csv"
    sheet.write_text("product_name,width,height,steps\n" + "".join(f"{name},512,512,60\n" for name in "ABC"))
    command = ["--data-dir", "d", "run", "--template", "product_shot", "--sheet", "s.csv", "--max-gpu-batch", "1"]
    process = subprocess.Popen([sys.executable, str(ROOT / "app.py"), *command], cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().startswith("row 2: ")  # the second row is being sampled
        second = app(*command, cwd=tmp_path)
        assert second.returncode == 2, second.stderr
        assert "is being run by another process" in second.stderr and "not starting a second copy" in second.stderr
        (batch,) = _batch_ids(tmp_path / "d")
    finally:
        process.send_signal(signal.SIGINT)
        process.communicate(timeout=120)

    sheet.write_text("product_name,width,height,steps\nA,64,64,1\n")  # edited between runs
    edited = app(*command, cwd=tmp_path)
    assert edited.returncode == 0, edited.stderr
    assert f"note: batch {batch} of product_shot from s.csv is unfinished, but the sheet has changed" in edited.stderr
    assert len(_batch_ids(tmp_path / "d")) == 2


def test_summary_json_tells_a_script_the_outcome_and_why_a_run_was_refused(tmp_path):
    (tmp_path / "s.csv").write_text("product_name,width,height,steps\nMug,64,64,1\nBad,64,64,x\n")
    result = app("--data-dir", "d", "run", "--template", "product_shot", "--sheet", "s.csv", "--zip",
                 "--summary-json", "outcome.json", cwd=tmp_path)
    assert result.returncode == 1, result.stderr  # one row done, one skipped as invalid
    outcome = json.loads((tmp_path / "outcome.json").read_text())
    assert outcome["exit_status"] == 1 and outcome["total"] == 2
    assert outcome["rows"] == {"done": 1, "failed": 0, "timed_out": 0, "skipped": 1, "not_run": 0, "running": 0}
    assert outcome["batch_id"] in _batch_ids(tmp_path / "d")
    assert Path(outcome["output_dir"]).is_absolute() and Path(outcome["zip"]).is_file()
    assert len(list(Path(outcome["output_dir"]).glob("*.png"))) == 1
    assert not list(tmp_path.glob(".outcome.json*"))  # written aside, then renamed

    refused = app("--data-dir", "d", "run", "--template", "no_such_template", "--sheet", "s.csv",
                  "--summary-json", "refused.json", cwd=tmp_path)
    assert refused.returncode == 2
    outcome = json.loads((tmp_path / "refused.json").read_text())
    assert outcome["exit_status"] == 2 and outcome["batch_id"] is None
    assert outcome["error"]["code"] == "template_not_found" and "product_shot" in outcome["error"]["details"]["available"]


def test_a_disk_filling_up_mid_batch_stops_it_naming_the_file_and_the_same_command_resumes(tmp_path, tiny_disk):
    rows = "".join(f"商品{n},红,64,64,1\n" for n in range(6))
    (tmp_path / "s.csv").write_text("product_name,color,width,height,steps\n" + rows, encoding="utf-8")
    free = os.statvfs(tiny_disk).f_bavail * os.statvfs(tiny_disk).f_frsize
    (tiny_disk / "filler").write_bytes(b"\0" * (free - 40 * 1024))  # room for two or three images
    command = ["--data-dir", "d", "--output-dir", str(tiny_disk / "out"), "run", "--template", "product_shot",
               "--sheet", "s.csv", "--summary-json", "outcome.json"]

    full = app(*command, cwd=tmp_path)

    assert full.returncode == 2 and "No space left on device" in full.stderr and "Traceback" not in full.stderr
    stopped_at = next(line for line in full.stderr.splitlines() if "cannot write" in line)
    assert str(tiny_disk / "out") in stopped_at and "resume" in stopped_at
    outcome = json.loads((tmp_path / "outcome.json").read_text())
    assert outcome["batch_id"] in _batch_ids(tmp_path / "d") and outcome["exit_status"] == 2
    statuses = ledger_statuses(tmp_path / "d")
    assert "running" not in statuses.values() and 0 < list(statuses.values()).count("done") < 6
    for key, path in _done_images(tmp_path / "d"):
        assert Path(path).is_file(), key  # no row done without its file

    (tiny_disk / "filler").unlink()  # space is back
    again = app(*command, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert set(ledger_statuses(tmp_path / "d").values()) == {"done"}
    assert len(list((tiny_disk / "out" / outcome["batch_id"]).glob("*.png"))) == 6


def _done_images(data: Path) -> list[tuple[str, str]]:
    import sqlite3

    with sqlite3.connect(data / "ledger.db") as conn:
        return conn.execute("SELECT row_key, image_path FROM generations WHERE status = 'done'").fetchall()


def test_a_command_given_the_wrong_arguments_exits_2_and_says_why_in_its_summary(tmp_path):
    """run --help promises exit status 2 for bad arguments; a run without --template or --workflow is one."""
    result = app("--data-dir", "d", "run", "--sheet", "s.csv", "--summary-json", "outcome.json", cwd=tmp_path)
    assert result.returncode == 2 and "give --workflow WF.json or --template NAME" in result.stderr
    outcome = json.loads((tmp_path / "outcome.json").read_text())
    assert outcome["exit_status"] == 2 and outcome["error"]["type"] == "UsageError"
    missing = app("--data-dir", "d", "run", "--template", "product_shot", "--sheet", "none.csv",
                  "--summary-json", "missing.json", cwd=tmp_path)
    assert missing.returncode == 2 and json.loads((tmp_path / "missing.json").read_text())["exit_status"] == 2
