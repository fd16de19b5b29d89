"""Prometheus metrics of the service, on a registry owned by one :class:`Metrics` object.

Every name starts with ``sd35_`` (the Grafana dashboard in ``grafana/dashboard.json`` reads these)::

    sd35_generations_total{status}                    rows finished, by ledger status
    sd35_row_duration_seconds                         histogram: one row, start to saved image
    sd35_sampler_step_seconds                         histogram: mean seconds per sampler step of each row
    sd35_queue_depth                                  gauge: rows waiting
    sd35_batches_running                              gauge
    sd35_model_load_seconds{model}                    histogram: loading a model into the cache
    sd35_resident_models                              gauge: models held by the model cache
    sd35_gpu_memory_used_bytes{gpu}                   read at scrape time (NVML, else torch.cuda)
    sd35_gpu_memory_total_bytes{gpu}
    sd35_gpu_utilization_ratio{gpu}                   0..1, NVML only
    sd35_http_requests_total{route,method,status}
    sd35_http_request_duration_seconds{route}         histogram

Usage: ``metrics = Metrics()``; the engine's callers report events (``observe_generation``,
``set_queue_depth``, ...); the ``/metrics`` route answers ``body, content_type = metrics.render()``.
:class:`HttpMetricsMiddleware` records the HTTP metrics of any ASGI app by its route templates.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from engine.errors import EngineError

__all__ = ["GENERATION_STATUSES", "GPU_SOURCES", "GpuCollector", "HttpMetricsMiddleware", "Metrics"]

PREFIX = "sd35"
# The ledger's final row statuses (engine/store.py); queued/running rows are not finished generations.
GENERATION_STATUSES = ("done", "failed", "timed_out", "skipped", "cancelled")
GPU_SOURCES = ("auto", "nvml", "torch", "none")

ROW_BUCKETS = (0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300, 600)
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
LOAD_BUCKETS = (0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    """The service's metrics on their own CollectorRegistry (never the process-global one).

    ``gpu`` picks where GPU gauges come from: "auto" (NVML if ``pynvml`` imports, else torch.cuda if CUDA
    is available, else no GPU gauges), "nvml", "torch" or "none".
    """

    def __init__(self, registry: CollectorRegistry | None = None, *, gpu: str = "auto") -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.generations = Counter(
            f"{PREFIX}_generations", "Rows finished, by final status.", ["status"], registry=r
        )
        for status in GENERATION_STATUSES:  # every series exists from the start, so rates are 0, not absent
            self.generations.labels(status=status)
        self.row_duration = Histogram(
            f"{PREFIX}_row_duration_seconds", "Seconds one row took, start to saved image.",
            buckets=ROW_BUCKETS, registry=r,
        )
        self.sampler_step = Histogram(
            f"{PREFIX}_sampler_step_seconds", "Mean seconds per sampler step, one observation per row.",
            buckets=STEP_BUCKETS, registry=r,
        )
        self.queue_depth = Gauge(f"{PREFIX}_queue_depth", "Rows waiting to run.", registry=r)
        self.batches_running = Gauge(f"{PREFIX}_batches_running", "Batches currently running.", registry=r)
        self.model_load = Histogram(
            f"{PREFIX}_model_load_seconds", "Seconds to load a model into the cache.", ["model"],
            buckets=LOAD_BUCKETS, registry=r,
        )
        self.resident_models = Gauge(f"{PREFIX}_resident_models", "Models held by the model cache.", registry=r)
        self.http_requests = Counter(
            f"{PREFIX}_http_requests", "HTTP requests answered.", ["route", "method", "status"], registry=r
        )
        self.http_duration = Histogram(
            f"{PREFIX}_http_request_duration_seconds", "Seconds to answer an HTTP request.", ["route"],
            buckets=HTTP_BUCKETS, registry=r,
        )
        self.gpu = GpuCollector.detect(gpu)
        if self.gpu is not None:
            r.register(self.gpu)

    def observe_generation(
        self,
        status: str,
        duration_s: float | None = None,
        sampler_s: float | None = None,
        steps: int | None = None,
    ) -> None:
        """One finished row. Durations are recorded when given; step time needs both sampler_s and steps."""
        if status not in GENERATION_STATUSES:
            raise EngineError(
                f"unknown generation status '{status}'; supported: {', '.join(GENERATION_STATUSES)}",
                status=status,
            )
        self.generations.labels(status=status).inc()
        if duration_s is not None:
            self.row_duration.observe(duration_s)
        if sampler_s is not None and steps:
            self.sampler_step.observe(sampler_s / steps)

    def set_queue_depth(self, rows: int) -> None:
        self.queue_depth.set(rows)

    def set_batches_running(self, batches: int) -> None:
        self.batches_running.set(batches)

    def observe_model_load(self, model: str, seconds: float) -> None:
        self.model_load.labels(model=model).observe(seconds)

    def set_resident_models(self, count: int) -> None:
        self.resident_models.set(count)

    def observe_http(self, route: str, method: str, status: int, duration_s: float) -> None:
        """One answered request. ``route`` is the route template (``/history/{prompt_id}``), not the raw
        path, so the number of series stays bounded."""
        self.http_requests.labels(route=route, method=method.upper(), status=str(status)).inc()
        self.http_duration.labels(route=route).observe(duration_s)

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition of every metric, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class GpuCollector(Collector):
    """Reads GPU memory and utilisation when Prometheus scrapes, from NVML or torch.cuda."""

    def __init__(self, source: str, read: Callable[[], list[dict[str, float]]]) -> None:
        self.source = source
        self._read = read

    @classmethod
    def detect(cls, gpu: str = "auto") -> GpuCollector | None:
        """The collector for ``gpu`` (see :class:`Metrics`); None when "none", or "auto" finds no GPU."""
        if gpu not in GPU_SOURCES:
            raise EngineError(f"unknown GPU metrics source '{gpu}'; supported: {', '.join(GPU_SOURCES)}", gpu=gpu)
        if gpu == "none":
            return None
        if gpu in ("auto", "nvml"):
            reader = _nvml_reader(required=gpu == "nvml")
            if reader is not None:
                return cls("nvml", reader)
        if gpu in ("auto", "torch"):
            reader = _torch_reader(required=gpu == "torch")
            if reader is not None:
                return cls("torch", reader)
        return None

    def describe(self) -> list[Any]:
        return []  # values exist only at scrape time; nothing to pre-register

    def collect(self) -> Iterator[GaugeMetricFamily]:
        used = GaugeMetricFamily(f"{PREFIX}_gpu_memory_used_bytes", "GPU memory in use.", labels=["gpu"])
        total = GaugeMetricFamily(f"{PREFIX}_gpu_memory_total_bytes", "GPU memory in all.", labels=["gpu"])
        util = GaugeMetricFamily(
            f"{PREFIX}_gpu_utilization_ratio", "Fraction of the last sample period the GPU was busy.",
            labels=["gpu"],
        )
        has_util = False
        for device in self._read():
            index = str(int(device["index"]))
            used.add_metric([index], device["used"])
            total.add_metric([index], device["total"])
            if "utilization" in device:
                util.add_metric([index], device["utilization"])
                has_util = True
        yield used
        yield total
        if has_util:
            yield util


def _nvml_reader(required: bool) -> Callable[[], list[dict[str, float]]] | None:
    try:
        import pynvml  # from nvidia-ml-py (requirements-gpu.txt)

        pynvml.nvmlInit()
        count = pynvml.nvmlDeviceGetCount()
    except Exception as exc:  # not installed, no driver, no device: all mean "no NVML here"
        if required:
            raise EngineError(f"NVML is not available: {exc}", gpu="nvml") from exc
        return None
    if count == 0:
        if required:
            raise EngineError("NVML found no GPU", gpu="nvml")
        return None

    def read() -> list[dict[str, float]]:
        devices = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            rates = pynvml.nvmlDeviceGetUtilizationRates(handle)
            devices.append(
                {"index": index, "used": memory.used, "total": memory.total, "utilization": rates.gpu / 100.0}
            )
        return devices

    return read


def _torch_reader(required: bool) -> Callable[[], list[dict[str, float]]] | None:
    import torch  # heavy; only reached when NVML is missing

    if not torch.cuda.is_available():
        if required:
            raise EngineError("torch finds no CUDA device", gpu="torch")
        return None

    def read() -> list[dict[str, float]]:
        devices = []
        for index in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(index)  # device-wide, like NVML, not only this process
            devices.append({"index": index, "used": total - free, "total": total})
        return devices

    return read


class HttpMetricsMiddleware:
    """ASGI middleware recording ``observe_http`` for every HTTP request.

    The route label is the matched route's template (Starlette/FastAPI put the route in the scope), or
    ``"unmatched"`` so unknown paths cannot grow the number of series.
    """

    def __init__(self, app: Callable[..., Any], metrics: Metrics, clock: Callable[[], float] = time.perf_counter):
        self.app = app
        self.metrics = metrics
        self._clock = clock

    async def __call__(self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = self._clock()
        status = 500  # what the client gets if the app raises before answering

        async def recording_send(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.observe_http(route, scope.get("method", "GET"), status, self._clock() - started)
