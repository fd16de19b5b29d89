"""The assembled library: one object holding the engine, ledger, templates, runner and queue.

Built once by the composition root (app.py) and handed to the CLI, the web app, the API and workers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.errors import StoreError
from engine.settings import Settings


@dataclass
class Services:
    settings: Settings
    engine: Any  # engine.runtime.Engine
    ledger: Any  # engine.store.BatchLedger
    templates: Any  # engine.templates.TemplateLibrary
    runner: Any  # engine.batch.BatchRunner
    queue: Any  # engine.batch_queue.BatchQueue
    idempotency: Any  # engine.idempotency.IdempotencyKeys

    def close(self, wait_s: float = 0.0) -> bool:
        """Stop the batch queue and the run it has going (between sampler steps; its batch is left to
        resume), waiting up to ``wait_s`` for that run to end; returns whether it did."""
        stopped = self.queue.stop(wait_s)
        close = getattr(self.runner.dispatcher, "close", None)
        if close is not None:
            close()
        return stopped


def build_services(settings: Settings, engine: Any = None, dispatcher: Any = None) -> Services:
    """Wire the library from settings. ``engine`` and ``dispatcher`` may be passed in (tests, workers)."""
    from engine.batch import BatchRunner
    from engine.batch_queue import BatchQueue
    from engine.idempotency import IdempotencyKeys
    from engine.runtime import Engine
    from engine.store import BatchLedger
    from engine.templates import TemplateLibrary

    for folder, setting in ((settings.data_path, "data_dir"), (settings.outputs_path, "output_dir"),
                            (settings.uploads_path, "data_dir")):
        try:
            Path(folder).mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # a read-only working folder (a relative data_dir), a disk mounted read-only
            if setting == "output_dir" and not settings.output_dir:
                setting = "data_dir"
            raise StoreError(
                f"cannot create the folder {os.path.abspath(folder)}: {exc.strerror or exc}; give this user a "
                f"folder it may write with the {setting} setting (--{setting.replace('_', '-')}, "
                f"SD35_{setting.upper()})", path=os.path.abspath(folder), setting=setting,
            ) from exc
    engine = engine or Engine(settings)
    if dispatcher is None and settings.broker:  # rows go to Celery workers instead of this process
        from engine.distributed import CeleryDispatcher

        dispatcher = CeleryDispatcher(settings.broker, row_timeout_s=settings.row_timeout_s)
    if hasattr(dispatcher, "fleet_models"):  # workflows may name models only the workers have
        engine.models.remote_catalog = dispatcher.fleet_models
    ledger = BatchLedger(settings.ledger_path)
    templates = TemplateLibrary.for_settings(settings, validate_workflow=engine.validate)
    runner = BatchRunner(engine, ledger, templates, settings, dispatcher=dispatcher)
    queue = BatchQueue(runner)
    idempotency = IdempotencyKeys(ledger, claimant=runner.worker_id)
    return Services(settings, engine, ledger, templates, runner, queue, idempotency)
