"""Composition root: settings <- defaults, environment, command line -> engine -> web app or CLI command.

    python app.py                      serve the web app (Gradio + JSON API) on the embedded defaults
    python app.py run ...              run a workflow, or a template over a spreadsheet, unattended
    python app.py validate WF.json     print every problem of a workflow, per node
    python app.py templates            list the workflow templates and their fields
    python app.py demo-checkpoint      write the built-in demo model as a single-file checkpoint
    python app.py calibrate            FP8 activation scales for a checkpoint (sidecar file)
    python app.py bench [--e2e|--png]  FP8 vs BF16 benchmark; end-to-end batch throughput; PNG encoding
    python app.py token create|revoke  issue an API token; refuse one (or all of a user's) from now on
    python app.py users add|remove|entry   add or remove a user in the users file; print an SD35_USERS entry
    python app.py worker --broker URL  a GPU worker for scale-out over Redis

Library errors become one-line messages and a non-zero exit status here, in one place.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from engine.errors import BatchError, EngineError, TemplateError
from engine.settings import SETTINGS, Settings, load_settings

SETTING_ALIASES = {"db_path": ["--db"]}


def _settings_parent() -> argparse.ArgumentParser:
    """Settings flags, accepted before or after the command; unset flags leave the environment's value."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("settings (also SD35_<NAME> environment variables)")
    for spec in SETTINGS:
        flags = ["--" + spec.name.replace("_", "-"), *SETTING_ALIASES.get(spec.name, [])]
        text = spec.help.replace("%", "%%")  # argparse formats help with %: "40 %" would be a format code
        if spec.type is bool:
            group.add_argument(*flags, dest=spec.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                               help=f"{text} (default: {'on' if spec.default else 'off'})")
        else:
            default = repr(spec.default).replace("%", "%%")
            group.add_argument(*flags, dest=spec.name, type=spec.type, default=argparse.SUPPRESS, help=f"{text} (default: {default})")
    return parent


def _settings_from(args: argparse.Namespace) -> Settings:
    return load_settings({spec.name: getattr(args, spec.name, None) for spec in SETTINGS})


# ------------------------------------------------------------------------------------------ commands


def cmd_serve(args: argparse.Namespace) -> int:
    from webapp.server import serve

    serve(_settings_from(args))
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from engine.errors import WorkflowInvalid
    from engine.runtime import Engine

    engine = Engine(_settings_from(args))
    workflow = engine.parse(Path(args.workflow).read_text(encoding="utf-8-sig"))
    try:
        engine.validate(workflow)
    except WorkflowInvalid as exc:
        for problem in exc.problems:
            print(problem.describe())
        print(f"{len(exc.problems)} problem(s)", file=sys.stderr)
        return 1
    print(f"ok: {len(workflow.nodes)} nodes ({workflow.source_format} format)")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    if args.workflow and args.template:
        raise SystemExit("give either --workflow or --template, not both")
    if args.workflow:
        if args.images:
            raise SystemExit("--images goes with --template and --sheet")
        return _run_workflow(args)
    if args.template:
        if not args.sheet:
            raise SystemExit("--template needs --sheet rows.csv|rows.xlsx")
        return _run_batch(args)
    raise SystemExit("give --workflow WF.json or --template NAME --sheet FILE")


def _run_workflow(args: argparse.Namespace) -> int:
    """The source article's `--prompt-file prompts.txt --workflow wf.json`: a batch of one row per prompt
    (or one row for the workflow as it is), recorded in the ledger, resumable like any batch."""
    from engine.services import build_services
    from engine.sheets import decode_text

    services = build_services(_settings_from(args))
    runner = services.runner
    workflow = decode_text(Path(args.workflow).read_bytes())[0]  # JSON text in any of the three formats
    prompts = None
    if args.prompt_file:
        lines = decode_text(Path(args.prompt_file).read_bytes())[0].splitlines()  # UTF-8, or GBK from Chinese Windows
        prompts = {number: line.strip() for number, line in enumerate(lines, start=1) if line.strip()}
    if args.resume and services.ledger.get_batch(args.resume) is None:
        raise BatchError(f"no batch {args.resume!r} to resume", batch_id=args.resume)
    prepared = runner.prepare_workflow(workflow, prompts=prompts, prompts_name=args.prompt_file, user=args.user,
                                       batch_id=args.resume, continue_same_inputs=not args.new_batch)
    if prepared.resumed and not args.resume:
        _say_continued(runner, prepared.batch_id, "workflow and prompts", args.retry_failed)
    zip_path = _zip_path(args.zip, prepared.batch_id, runner.output_dir(prepared.batch_id)) if args.zip else None
    runner.start(prepared)
    return _run_prepared(args, runner, prepared, zip_path, unit="prompt line" if prompts is not None else "row")


def _run_batch(args: argparse.Namespace) -> int:
    from engine.services import build_services
    from engine.sheets import read_sheet

    settings = _settings_from(args)
    services = build_services(settings)
    runner = services.runner
    sheet = read_sheet(Path(args.sheet), sheet_name=args.sheet_name)
    for note in sheet.notes:
        _say(f"note: {note}")
    if args.resume and services.ledger.get_batch(args.resume) is None:
        unfinished = ", ".join(b["id"] for b in runner.unfinished_batches()[:10]) or "none"
        raise BatchError(f"no batch {args.resume!r} to resume; unfinished batches: {unfinished}", batch_id=args.resume)
    batch_id = args.resume or (None if args.new_batch else
                               runner.batch_to_continue(args.template, sheet, batch_seed=args.batch_seed))
    if batch_id and not args.resume:
        _say_continued(runner, batch_id, "template and sheet", args.retry_failed)
    elif not args.resume:
        for other in runner.unfinished_from_another_sheet(args.template, sheet):
            _say(f"note: batch {other} of {args.template} from {sheet.filename} is unfinished, but the sheet has "
                 f"changed since it started, so this run starts a new batch; to finish {other} instead, run "
                 f"it with the original sheet (--resume {other})")
    images = _photos_from(runner, args.images) if args.images else None
    try:
        prepared = runner.prepare(
            args.template, sheet, batch_seed=args.batch_seed, on_invalid=args.on_invalid, user=args.user,
            batch_id=batch_id, images=images,
        )
        if prepared.report.unknown_columns:  # a misspelt column would otherwise quietly take the default
            _say(f"note: columns no field of {args.template} uses (ignored; check their spelling): "
                 f"{', '.join(prepared.report.unknown_columns)}")
        for row in prepared.report.rows:
            if not row.ok:
                for problem in row.problems:
                    _say(f"row {row.number}: {problem.column or '-'}: {problem.reason}")
        # Checked before anything is recorded: a refused path leaves no batch behind to "resume"
        zip_path = _zip_path(args.zip, prepared.batch_id, runner.output_dir(prepared.batch_id)) if args.zip else None
        runner.start(prepared)
    finally:
        if images is not None and not Path(args.images).is_dir():
            runner.discard_staging(images)  # a refused batch leaves no unpacked zip behind
    return _run_prepared(args, runner, prepared, zip_path)


def _say_continued(runner: Any, batch_id: str, inputs: str, retry_failed: bool) -> None:
    """Which batch a command run again continues, and what is left of it to run."""
    left = runner.rows_to_run(batch_id, retry_failed=retry_failed)
    if left:
        print(f"resuming unfinished batch {batch_id} of the same {inputs}")
    else:
        print(f"batch {batch_id} of the same {inputs} already ran: nothing left to run "
              f"({'' if retry_failed else '--retry-failed reruns its failed rows, '}--new-batch starts a new one)")


def _run_prepared(args: argparse.Namespace, runner: Any, prepared: Any, zip_path: Path | None,
                  unit: str = "row") -> int:
    """Run a started batch with progress bars; Ctrl-C cancels between steps; the zip; the summary line."""
    from tqdm import tqdm

    _say(runner.engine.describe_model_banner(), logging.INFO)  # says so when it is the demo model
    summary_before = runner.summary(prepared.batch_id)
    total = summary_before.total - summary_before.skipped
    # Bars redraw themselves with carriage returns and cursor moves: only for a person at a terminal. A
    # cron or CI log (stderr not a terminal) would fill with them, and with JSON logs stderr is for
    # machines, one JSON object per line. The per-row lines on stdout say the same there.
    no_bars = _json_stderr or not _is_terminal(sys.stderr)
    bar = tqdm(total=total, initial=summary_before.done, unit="image", desc=prepared.batch_id, disable=no_bars)
    step_bar = tqdm(total=0, leave=False, unit="step", desc="  row", disable=no_bars)

    def on_event(event: Any) -> None:
        if event.kind == "step":
            step_bar.set_description(f"  row {event.row_number}")
            step_bar.total = event.steps
            step_bar.n = event.step
            step_bar.refresh()
        elif event.kind == "row_done":
            bar.update(1)
            tqdm.write(f"{unit} {event.row_number}: {event.image_path}")
        elif event.kind == "row_failed":
            bar.update(1)
            outcome = "not run" if event.status == "cancelled" else event.status or "failed"
            tqdm.write(f"{unit} {event.row_number} {outcome.replace('_', ' ')}: {event.error}")

    args.recorded_batch_id = prepared.batch_id  # an error from here on stops a batch that can be resumed
    with _stop_signals_cancel(runner, prepared.batch_id) as stopped_by:
        summary = runner.run(prepared.batch_id, on_event=on_event, retry_failed=args.retry_failed)
    step_bar.close()
    bar.close()
    if zip_path is not None:
        runner.write_zip(prepared.batch_id, zip_path)
        print(f"zip: {zip_path}")
    print(
        f"batch {summary.batch_id}: {summary.done} done, {summary.failed} failed, {summary.timed_out} timed out, "
        f"{summary.skipped} skipped, {summary.cancelled} not run"
        + (f", {summary.running} still running in another process" if summary.running else "")
        + f"; images in {summary.output_dir}"
    )
    status = _exit_status(summary, stopped_by)
    if args.summary_json:
        _write_summary_json(args.summary_json, {
            "batch_id": summary.batch_id, "exit_status": status, "total": summary.total,
            "rows": {"done": summary.done, "failed": summary.failed, "timed_out": summary.timed_out,
                     "skipped": summary.skipped, "not_run": summary.cancelled, "running": summary.running},
            # absolute: a script reading the file may not share this command's working directory
            "output_dir": str(Path(summary.output_dir).resolve()),
            "zip": str(zip_path.resolve()) if zip_path is not None else None,
            "stopped_by_signal": stopped_by[0] if stopped_by else None,
        })
    return status


def _write_summary_json(path: str, outcome: dict[str, Any]) -> None:
    """``--summary-json``: written whole or not at all (aside, then renamed), so a script never reads half."""
    target = Path(path)
    partial = target.with_name(f".{target.name}.partial")
    partial.write_text(json.dumps(outcome, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    os.replace(partial, target)


# Exit statuses of `run`, for scripts (README, `run --help`): 2 is also every refusal before the run
# (bad arguments, an unreadable sheet, a library error), so "no image at all" reads the same either way.
EXIT_ALL_DONE = 0
EXIT_SOME_ROWS_NOT_DONE = 1
EXIT_NOTHING_DONE = 2
RUN_EXIT_STATUSES = f"""exit status:
  {EXIT_ALL_DONE}    every row of the batch is done
  {EXIT_SOME_ROWS_NOT_DONE}    some rows are done, others failed, timed out, were skipped as invalid or
       are still running in another process (the summary line counts each)
  {EXIT_NOTHING_DONE}    nothing done: bad arguments, an unreadable sheet or workflow, another error,
       or no row of the batch could run
  130  stopped by Ctrl-C (SIGINT), 143 by SIGTERM (e.g. `timeout`, a CI cancel), 129 by SIGHUP
       (the terminal closed): finished rows are kept; run the same command again to resume"""


def _exit_status(summary: Any, stopped_by: list[int]) -> int:
    if stopped_by:  # the shell's 128 + signal: "stopped, resume me", never mistaken for failed rows
        return 128 + stopped_by[0]
    if summary.ok and summary.skipped == 0 and summary.running == 0:
        return EXIT_ALL_DONE
    if summary.done == 0 and summary.running == 0:
        return EXIT_NOTHING_DONE
    return EXIT_SOME_ROWS_NOT_DONE


def _is_terminal(stream: Any) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # replaced by a test, or closed
        return False


def _zip_path(option: str | bool, batch_id: str, output_dir: Path) -> Path:
    """Where ``--zip [PATH]`` writes: beside the images, PATH, or PATH/<batch>.zip for a folder. Checked
    before the batch runs, so a bad path never costs a run."""
    if option is True:
        return output_dir.parent / f"{batch_id}.zip"  # not with_suffix: batch ids may hold dots
    path = Path(option)
    if path.is_dir():
        return path / f"{batch_id}.zip"
    if not path.parent.is_dir():
        raise BatchError(f"--zip {option}: the folder {path.parent} does not exist")
    return path


STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


@contextlib.contextmanager
def _stop_signals_cancel(runner: Any, batch_id: str) -> Iterator[list[int]]:
    """The first Ctrl-C (SIGINT), SIGTERM or SIGHUP cancels the batch between sampler steps: finished rows
    are kept, the rest are marked cancelled and resume with the same command. The same signal again stops
    at once.

    SIGTERM is what `timeout`, systemd and CI runners send before they kill, SIGHUP what a closed terminal
    or SSH session sends: stopping cleanly keeps the rows being sampled from counting as crashes. Yields
    the signals received, first first."""
    received: list[int] = []
    terminals = [fd for fd in (1, 2) if os.isatty(fd)]  # asked now: a hung-up terminal may not say

    def cancel(signum: int, frame: Any) -> None:
        signal.signal(signum, previous[signum])  # the same signal again is the hard stop
        received.append(signum)
        if signum == getattr(signal, "SIGHUP", None):
            _leave_closed_terminal(terminals)
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        _say(("" if _json_stderr else "\n") + f"{name}: stopping after the current sampler step ({name} again "
             "to quit at once); run the same command again to resume")
        # On a thread of its own: the handler runs between the main thread's bytecodes, maybe while that
        # thread holds the runner's lock, which cancel() takes.
        threading.Thread(target=runner.cancel, args=(batch_id,), daemon=True).start()

    previous = {signum: signal.signal(signum, cancel) for signum in STOP_SIGNALS}
    try:
        yield received
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _leave_closed_terminal(terminals: list[int]) -> None:
    """After a hangup the terminal is gone and every write to it fails (EIO): output that went to it goes
    to the null device instead, so the run can still stop cleanly. Output redirected to files is kept."""
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        for fd in terminals:
            os.dup2(null, fd)
    finally:
        os.close(null)


def _photos_from(runner: Any, source: str) -> Any:
    """``--images``: a folder of photos as it is, or a zip unpacked (the batch keeps its own copy)."""
    from engine.image_refs import ImageLibrary

    path = Path(source)
    if path.is_dir():
        return ImageLibrary.from_folder(path)
    if not path.is_file():
        raise SystemExit(f"--images {source}: no such folder or zip file")
    return runner.unpack_photos(path)


def cmd_templates(args: argparse.Namespace) -> int:
    from engine.runtime import Engine
    from engine.templates import TemplateLibrary

    settings = _settings_from(args)
    if not settings.templates_path.is_dir():  # a mistyped --templates-dir, even with uploaded templates around
        raise TemplateError(f"the templates folder {settings.templates_path} does not exist (setting templates_dir)")
    library = TemplateLibrary.for_settings(settings, validate_workflow=Engine(settings).validate)
    if not library.names() and not library.errors():
        raise TemplateError(f"no templates to list: {library.describe_available()}")
    for template in library.list():
        print(f"{template.name}  ({template.content_hash[:12]})  {template.title}")
        if template.description:
            print(f"    {template.description}")
        print(f"    files named: {template.filename_pattern}")
        for spec in template.fields:
            required = "required" if spec.required else f"default {spec.default!r}"
            choices = f", one of {', '.join(map(str, spec.choices))}" if spec.choices else ""
            print(f"    - {spec.name}: {spec.type}, {required}{choices}  {spec.description}")
    for name, error in library.errors().items():
        print(f"{name}: cannot be loaded: {error.message}", file=sys.stderr)
    return 1 if library.errors() else 0


def cmd_demo_checkpoint(args: argparse.Namespace) -> int:
    from engine.models.demo import write_demo_checkpoint

    path = write_demo_checkpoint(Path(args.out))
    print(f"wrote the demo checkpoint (tiny random SD3.5-shaped model, not a real one) to {path}")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from engine.fp8.calibrate import calibrate_checkpoint

    settings = _settings_from(args)
    encoders = [name.strip() for name in (args.text_encoders or "").split(",") if name.strip()]
    path = calibrate_checkpoint(settings, args.checkpoint, prompts_file=args.prompts, steps=args.steps, size=args.size,
                                text_encoders=encoders)
    print(f"wrote FP8 activation scales to {path}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if args.png:
        from engine.png_bench import run_png_benchmark

        report = run_png_benchmark(size=args.size or 1024, repeats=args.repeats)
    elif args.e2e:
        from engine.throughput import run_e2e_benchmark

        report = run_e2e_benchmark(_settings_from(args), rows=args.rows, size=args.size, steps=args.steps)
    else:
        from engine.bench import run_benchmark

        report = run_benchmark(size=args.model, device=args.device_name, repeats=args.repeats,
                               compile_mode=_settings_from(args).compile_mode, quick=args.quick)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    from engine.store import BatchLedger
    from engine.errors import AccessDenied
    from webapp.auth import ADMIN, TokenIssuer, load_users, signing_key_for
    from webapp.revocation import TokenRevocations

    # The key the server signs with: SD35_JWT_SECRET, or with users configured the one kept in the data folder.
    settings = _settings_from(args)
    users = load_users(settings)
    settings, _ = signing_key_for(settings, users)
    issuer = TokenIssuer(settings.jwt_secret, settings.jwt_issuer, settings.jwt_audience)
    if args.token_command == "create":
        known = users.get(args.user)
        if users.configured and known is None:
            # The server refuses a token whose user is not among its users: issuing one helps nobody.
            raise AccessDenied(f"no user {args.user!r} among the configured users; add them first "
                               f"(python app.py users add {args.user})", status=404, reason="unknown_user")
        if known is not None and known.role != args.role:
            _say(f"{args.user} is a{'n' if known.role == ADMIN else ''} {known.role} in the users file, and a server "
                 f"with users acts with that role whatever the token says (--role {args.role} only tells a "
                 "server without users)")
        # A user of the users file gets a token tied to their password (see User.credential_id), with the role asked
        token = issuer.create(replace(known, role=args.role) if known else args.user, args.role, args.ttl)
        claims = issuer.verify(token)
        print(token)
        print(f"token {claims.jti} for {claims.sub} ({claims.role}) expires {claims.expires_at.isoformat()}",
              file=sys.stderr)
        return 0
    if bool(args.token) == bool(args.user):
        raise SystemExit("give either a TOKEN or --user NAME")
    with BatchLedger(settings.ledger_path) as ledger:
        revocations = TokenRevocations(ledger)
        if args.user:
            cutoff = revocations.revoke_user(args.user, "cli")
            print(f"every token of {args.user} issued before {cutoff.isoformat()} is refused from now on")
            return 0
        claims = issuer.verify(args.token)
        revocations.revoke(claims, "cli")
    print(f"token {claims.jti} of {claims.sub} is refused from now on (it would have expired "
          f"{claims.expires_at.isoformat()})")
    return 0


def cmd_users(args: argparse.Namespace) -> int:
    from webapp.auth import add_user, remove_user, users_entry

    settings = _settings_from(args)
    path = Path(getattr(args, "file", None) or settings.users_file or Path(settings.data_dir) / "users.json")
    if args.users_command == "remove":
        remove_user(path, args.name)
        # A running server re-reads the file on its next request: their sessions and tokens stop working.
        print(f"user {args.name} removed from {path}; their sessions and tokens stop working now")
        return 0
    password = args.password
    if password is None:
        import getpass

        password = getpass.getpass(f"password for {args.name}: ")
    if args.users_command == "entry":
        print(users_entry(args.name, password, args.role))  # join several with "," in SD35_USERS
        return 0
    add_user(path, args.name, password, args.role)
    print(f"user {args.name} ({args.role}) written to {path}")
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from engine.distributed import run_worker

    settings = _settings_from(args)
    models = [m for m in (args.models or "").split(",") if m] or [settings.default_checkpoint]
    return run_worker(settings, broker=settings.broker, models=models, name=args.name) or 0


# ------------------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    settings = _settings_parent()
    parser = argparse.ArgumentParser(
        prog="app.py", description="Batch image production on Stable Diffusion 3.5.", parents=[settings]
    )
    sub = parser.add_subparsers(dest="command")
    add_command = lambda name, **kw: sub.add_parser(name, parents=[settings], **kw)  # noqa: E731

    add_command("serve", help="serve the web app (the default)")

    run = add_command("run", help="run a workflow (or a template over a spreadsheet) unattended",
                      epilog=RUN_EXIT_STATUSES, formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("--workflow", help="ComfyUI workflow JSON (API, UI or list format)")
    run.add_argument("--prompt-file", help="one prompt per line; each replaces the positive prompt text")
    run.add_argument("--template", help="template name (see `python app.py templates`)")
    run.add_argument("--sheet", help="CSV or XLSX file, one row per image")
    run.add_argument("--sheet-name", help="XLSX sheet to read (default: the first)")
    run.add_argument("--images", metavar="DIR_OR_ZIP", help="product photos the sheet's image columns name: a folder or a zip")
    run.add_argument("--zip", nargs="?", const=True, help="also write the batch zip (optionally to this path)")
    run.add_argument("--resume", metavar="BATCH_ID", help="resume this batch (only unfinished rows run)")
    run.add_argument("--retry-failed", action="store_true", help="on resume, also rerun failed and timed-out rows")
    run.add_argument("--new-batch", action="store_true",
                     help="start a new batch even though one of the same inputs exists (without it, running a "
                          "command again continues that batch, finished or not: nothing is made twice)")
    run.add_argument("--batch-seed", type=int, help="seed from which per-row seeds are derived")
    run.add_argument("--on-invalid", choices=["skip", "stop"], default="skip", help="invalid rows: skip them, or stop before queueing anything")
    run.add_argument("--user", help="recorded with every generation")
    run.add_argument("--summary-json", metavar="FILE",
                     help="also write the outcome to FILE as JSON, for scripts: batch id, rows per status, "
                          "images folder, zip, exit status; for a run refused before it started, the error")

    validate = add_command("validate", help="validate a workflow; prints every problem per node")
    validate.add_argument("workflow")

    add_command("templates", help="list templates and their fields")

    demo = add_command("demo-checkpoint", help="write the built-in demo model as a single-file checkpoint")
    demo.add_argument("--out", required=True)

    calibrate = add_command("calibrate", help="calibrate FP8 activation scales for a checkpoint")
    calibrate.add_argument("--checkpoint", default=None,
                           help="checkpoint, or transformer in diffusion_models/ (default: the default checkpoint)")
    calibrate.add_argument("--text-encoders", metavar="CLIP_L,CLIP_G[,T5]",
                           help="text encoder files (models/text_encoders) for a checkpoint without its own")
    calibrate.add_argument("--prompts", help="prompt file (default: the shipped representative set)")
    calibrate.add_argument("--steps", type=int, default=4)
    calibrate.add_argument("--size", type=int, default=512)

    bench = add_command("bench", help="FP8 vs BF16 benchmark (or --e2e batch throughput, --png PNG encoding)")
    bench.add_argument("--e2e", action="store_true", help="end-to-end batch throughput instead")
    bench.add_argument("--png", action="store_true", help="the PNG writer against Pillow's encoder instead (CPU)")
    bench.add_argument("--model", default="auto", help="large, medium or tiny (auto: large on a GPU, tiny on a CPU)")
    bench.add_argument("--device-name", default="auto")
    bench.add_argument("--repeats", type=int, default=5)
    bench.add_argument("--quick", action="store_true", help="only the variants the targets compare")
    bench.add_argument("--rows", type=int, default=16)
    bench.add_argument("--size", type=int, default=None)
    bench.add_argument("--steps", type=int, default=None)
    bench.add_argument("--json", help="also write the report as JSON here")

    token = add_command("token", help="API tokens")
    token_sub = token.add_subparsers(dest="token_command", required=True)
    create = token_sub.add_parser("create", parents=[settings])
    create.add_argument("--user", required=True)
    create.add_argument("--role", choices=["user", "admin"], default="user")
    create.add_argument("--ttl", default="24h", help="lifetime, e.g. 30m, 24h, 7d")
    revoke = token_sub.add_parser("revoke", parents=[settings], help="refuse a token, or all of a user's, from now on")
    revoke.add_argument("token", nargs="?", help="the token to refuse (it must still be valid)")
    revoke.add_argument("--user", help="refuse every token of this user issued so far (browser sessions too)")

    users = add_command("users", help="manage the users file")
    users_sub = users.add_subparsers(dest="users_command", required=True)
    add = users_sub.add_parser("add", parents=[settings],
                               help="add a user, or set a user's password and role again (ending their sessions "
                                    "and tokens)")
    add.add_argument("name")
    add.add_argument("--role", choices=["user", "admin"], default="user")
    add.add_argument("--password", help="(prompted when omitted)")
    add.add_argument("--file", help="users file (default: the users_file setting or <data_dir>/users.json)")
    remove = users_sub.add_parser("remove", parents=[settings],
                                  help="remove a user from the users file (a running server follows at once)")
    remove.add_argument("name")
    remove.add_argument("--file", help="users file (default: the users_file setting or <data_dir>/users.json)")
    entry = users_sub.add_parser("entry", parents=[settings],
                                 help="print a name:role:hash entry for SD35_USERS (e.g. a Space secret)")
    entry.add_argument("name")
    entry.add_argument("--role", choices=["user", "admin"], default="user")
    entry.add_argument("--password", help="(prompted when omitted)")

    worker = add_command("worker", help="a GPU worker taking rows from Redis")
    worker.add_argument("--models", help="comma-separated checkpoints to keep resident")
    worker.add_argument("--name", help="worker name (default: host name and pid)")
    return parser


COMMANDS = {
    None: cmd_serve,
    "serve": cmd_serve,
    "run": cmd_run,
    "validate": cmd_validate,
    "templates": cmd_templates,
    "demo-checkpoint": cmd_demo_checkpoint,
    "calibrate": cmd_calibrate,
    "bench": cmd_bench,
    "token": cmd_token,
    "users": cmd_users,
    "worker": cmd_worker,
}


_json_stderr = False  # set by _configure_logging: stderr then carries only JSON log lines


def _say(message: str, level: int = logging.WARNING) -> None:
    """A message for the person at the terminal, on stderr; a log record when stderr is JSON lines."""
    if _json_stderr:
        logging.getLogger("app").log(level, message)
    else:
        print(message, file=sys.stderr)


def _configure_logging(args: argparse.Namespace) -> None:
    """Logs on stderr in the ``log_format`` setting. The web server sets up its own (uvicorn's records
    included). A worker runs unattended, so it logs from INFO; an interactive command shows warnings
    only next to its progress bars, unless JSON logs were asked for (a log collector wants every row)."""
    if args.command in (None, "serve"):
        return
    from engine.logs import configure_logging

    global _json_stderr
    log_format = _settings_from(args).log_format
    _json_stderr = log_format == "json"
    configure_logging(log_format, "INFO" if args.command == "worker" or log_format == "json" else "WARNING")
    if args.command in MODEL_COMMANDS:
        from engine.runtime import import_model_libraries

        # transformers and diffusers log through handlers of their own (plain "[transformers] ..." lines,
        # e.g. a prompt over 77 tokens): imported now, their records go through the handler above instead.
        import_model_libraries()


MODEL_COMMANDS = ("run", "worker", "calibrate")  # the commands that load models


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _configure_logging(args)
        return COMMANDS[args.command](args)
    except EngineError as exc:
        return _refused(args, exc.message, exc.to_dict())
    except ValueError as exc:  # bad settings values
        return _refused(args, str(exc), {"type": "ValueError", "message": str(exc)})
    except KeyboardInterrupt:
        _say("interrupted")
        return 130
    except OSError as exc:  # a path argument, a full disk, a read-only folder
        message = f"{exc.filename}: {exc.strerror}" if exc.filename else str(exc)
        return _refused(args, message, {"type": type(exc).__name__, "message": message})
    except SystemExit as exc:  # a command's own argument check: a usage error, as argparse's exit 2
        if not isinstance(exc.code, str):
            raise
        return _refused(args, exc.code, {"type": "UsageError", "message": exc.code})


def _refused(args: argparse.Namespace, message: str, error: dict[str, Any]) -> int:
    """A command refused before it could do its work, or a run stopped by an error (a full disk): said on
    stderr, and in ``--summary-json`` for a script waiting for the outcome, with the id of the batch when
    one was recorded (``--resume`` it); exit status 2 (see RUN_EXIT_STATUSES)."""
    _say(f"error: {message}", logging.ERROR)
    if getattr(args, "summary_json", None):
        _write_summary_json(args.summary_json, {"batch_id": getattr(args, "recorded_batch_id", None),
                                                "exit_status": EXIT_NOTHING_DONE, "error": error})
    return EXIT_NOTHING_DONE


def _utf8_command_line() -> list[str] | None:
    """This command again in Python's UTF-8 mode, when the locale's encoding is not UTF-8 (``LANG=en_US``
    is ISO-8859-1 on many servers; ``zh_CN.GBK`` in China; ``PYTHONUTF8=0`` with ``LANG=C``); None otherwise.

    Under such a locale Python names files in the locale's encoding: a cell's Chinese file name either
    cannot be written at all, or is written in bytes that a process under another locale (the web app
    beside a cron job) reads as another name. UTF-8 mode makes every file name and file UTF-8; the
    terminal keeps its own encoding (a character it cannot show is written as an escape, never an error)."""
    if sys.flags.utf8_mode or not sys.executable:
        return None
    if sys.getfilesystemencoding().lower().replace("-", "").replace("_", "") == "utf8":
        return None
    if sys.stdout is not None and sys.stdout.encoding and "PYTHONIOENCODING" not in os.environ:
        os.environ["PYTHONIOENCODING"] = f"{sys.stdout.encoding}:backslashreplace"
    return [sys.executable, "-X", "utf8", *sys.orig_argv[1:]]


if __name__ == "__main__":
    if (again := _utf8_command_line()) is not None:
        os.execv(sys.executable, again)  # the same process (pid) for a supervisor, now in UTF-8 mode
    sys.exit(main())
