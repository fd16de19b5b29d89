"""The assembled library: one object holding the engine, ledger, templates, runner and queue.

Built once by the composition root (app.py) and handed to the CLI, the web app, the API and workers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

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

    def close(self) -> None:
        self.queue.stop()
        close = getattr(self.runner.dispatcher, "close", None)
        if close is not None:
            close()


def build_services(settings: Settings, engine: Any = None, dispatcher: Any = None) -> Services:
    """Wire the library from settings. ``engine`` and ``dispatcher`` may be passed in (tests, workers)."""
    from engine.batch import BatchRunner
    from engine.batch_queue import BatchQueue
    from engine.idempotency import IdempotencyKeys
    from engine.runtime import Engine
    from engine.store import BatchLedger
    from engine.templates import TemplateLibrary

    for folder in (settings.data_path, settings.outputs_path, settings.uploads_path):
        Path(folder).mkdir(parents=True, exist_ok=True)
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
