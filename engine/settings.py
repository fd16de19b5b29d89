"""Settings: one declarative table ``(name, default, help)`` that drives defaults, environment
variables (``SD35_<NAME>``), ``python app.py --help`` and the docs test.

Defaults are the embedded workstation setup: a SQLite file and outputs under ``./data``, the built-in demo
model when no real checkpoint is configured, no Redis.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parents[1]  # where app.py and the shipped templates/ live

DEMO_CHECKPOINT = "sd35_demo_tiny"


@dataclass(frozen=True)
class SettingSpec:
    name: str
    default: Any
    help: str
    type: type = str


SETTINGS: tuple[SettingSpec, ...] = (
    SettingSpec("data_dir", "data", "Folder for the ledger, outputs, uploads, ComfyUI's input folder and the compile cache (/data on Spaces).", str),
    SettingSpec("models_dir", "models", "ComfyUI-style models folder (checkpoints/, diffusion_models/, text_encoders/, vae/, loras/, controlnet/).", str),
    SettingSpec("templates_dir", "templates", "Folder of the shipped (read-only) workflow templates. A relative path that does not exist in the working directory is taken beside app.py, where the shipped templates are. Templates admins upload or edit are kept in <data_dir>/templates.", str),
    SettingSpec("db_path", "", "SQLite ledger file; empty means <data_dir>/ledger.db.", str),
    SettingSpec("output_dir", "", "Where images are written; empty means <data_dir>/outputs.", str),
    SettingSpec("default_checkpoint", DEMO_CHECKPOINT, "Checkpoint used by templates that do not name one.", str),
    SettingSpec("device", "auto", "auto, cuda, cuda:N or cpu.", str),
    SettingSpec("precision", "auto", "Transformer precision: auto (bf16 on CUDA, fp32 on CPU), bf16, fp16, fp32, or fp8 (E4M3 weights; FP8 compute on CUDA >= 8.9, else weight_only with a logged message; calibrated scales from the checkpoint's sidecar).", str),
    SettingSpec("fp8_backend", "auto", "FP8 backend for precision fp8 and UNETLoader fp8_e4m3fn_fast: auto (scaled_mm where the GPU can), scaled_mm, transformer_engine, weight_only (FP8 storage, high-precision matmuls).", str),
    SettingSpec("fp8_fuse_qkv", True, "With the scaled_mm FP8 backend, run each attention's q, k and v projections (and the text stream's) as one FP8 GEMM with one activation quantization instead of three. The weights stay the same bytes under the same names (the three layers become row slices of one FP8 tensor), so checkpoints, calibration sidecars and LoRAs are unaffected; off runs three GEMMs as before.", bool),
    SettingSpec("compile", True, "torch.compile each transformer block at load, after FP8 quantization, and warm up at the GPU batch sizes (CUDA only; the CPU runs eagerly). FP8 is faster than BF16 only compiled.", bool),
    SettingSpec("compile_mode", "default", "torch.compile mode of the transformer blocks: default, or max-autotune-no-cudagraphs (Inductor tunes its kernels: minutes more compile per shape, once, then cached on disk).", str),
    SettingSpec("png_compress_level", 1, "zlib level (0-9) of saved PNGs. 0-1 use the engine's own writer (one Up filter for the whole picture, zlib's run-length strategy): about 40 % of Pillow's CPU at level 1 on photographs (25 % on noise) for files of about the same size. 2-9 use Pillow's encoder at that level (ComfyUI's is 4). Pixels and metadata are the same at every level.", int),
    SettingSpec("max_gpu_batch", 4, "Most rows of the same shape sampled together (at least 1; on CUDA also limited by free memory).", int),
    SettingSpec("row_timeout_s", 600.0, "Per-row deadline for sampling, in seconds.", float),
    SettingSpec("host", "127.0.0.1", "Address the web app listens on (0.0.0.0 on Spaces).", str),
    SettingSpec("port", 7860, "Port of the web app.", int),
    SettingSpec("forwarded_allow_ips", "", "Peers whose forwarded headers (the client address and scheme a reverse proxy such as nginx passes on) are believed, as comma-separated addresses or networks, e.g. \"10.0.0.5\" or \"10.0.0.0/8\". The client address they name keys the sign-in and token rate limits, and https makes the session cookie Secure. Empty: loopback only (uvicorn's default) on a workstation; on a Hugging Face Space the private networks its proxy connects from.", str),
    SettingSpec("users_file", "", "JSON file of users with hashed passwords and roles; empty means no login.", str),
    SettingSpec("jwt_secret", "", "Signing key of API tokens and browser sessions (HS256). Empty with users configured: a key generated once and kept in the data folder, readable by its owner only.", str),
    SettingSpec("jwt_issuer", "sd35-batch", "Issuer claim of API tokens.", str),
    SettingSpec("jwt_audience", "sd35-batch-api", "Audience claim of API tokens.", str),
    SettingSpec("rate_limit_per_minute", 120, "Requests per user per route per minute on the API.", int),
    SettingSpec("route_rate_limits", "", "Per-route limits overriding rate_limit_per_minute, as METHOD PATH=REQUESTS_PER_MINUTE pairs, e.g. \"POST /prompt=10,POST /api/batches=5,POST /login=5\" (ComfyUI routes under /api are separate routes: \"POST /api/prompt\").", str),
    SettingSpec("max_token_ttl", "7d", "Longest token lifetime POST /api/token grants (e.g. 12h, 7d); `python app.py token create --ttl` may issue longer ones.", str),
    SettingSpec("max_upload_mb", 50, "Largest accepted upload, in MiB.", int),
    SettingSpec("upload_retention_s", 86400, "Seconds the web page's uploads (sheets, photo zips, template files, in Gradio's cache, GRADIO_TEMP_DIR) are kept before they are deleted; 0 keeps them. A batch keeps its own copy of what it needs from the moment it is checked.", int),
    SettingSpec("page_sessions", 500, "Web page sessions (a browser tab, or a script calling the page's Gradio API) whose state the server keeps in memory (at least 1), about 0.25 MB each (a checked sheet's rows wait on disk, the newest this many checks); past this many, the one used least recently is dropped. An open tab polls every second, so it stays among the most recent; a closed one is otherwise kept until 10,000 have piled up.", int),
    SettingSpec("broker", "", "Redis URL of the Celery broker; empty means rows run in this process.", str),
    SettingSpec("log_format", "console", "console or json.", str),
    SettingSpec("allowed_models", "", "Comma-separated checkpoint names admins may switch to; empty means any found.", str),
)


@dataclass(frozen=True)
class Settings:
    data_dir: str = "data"
    models_dir: str = "models"
    templates_dir: str = "templates"
    db_path: str = ""
    output_dir: str = ""
    default_checkpoint: str = DEMO_CHECKPOINT
    device: str = "auto"
    precision: str = "auto"
    fp8_backend: str = "auto"
    fp8_fuse_qkv: bool = True
    compile: bool = True
    compile_mode: str = "default"
    png_compress_level: int = 1
    max_gpu_batch: int = 4
    row_timeout_s: float = 600.0
    host: str = "127.0.0.1"
    port: int = 7860
    forwarded_allow_ips: str = ""
    users_file: str = ""
    jwt_secret: str = ""
    jwt_issuer: str = "sd35-batch"
    jwt_audience: str = "sd35-batch-api"
    rate_limit_per_minute: int = 120
    route_rate_limits: str = ""
    max_token_ttl: str = "7d"
    max_upload_mb: int = 50
    upload_retention_s: int = 86400
    page_sessions: int = 500
    broker: str = ""
    log_format: str = "console"
    allowed_models: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir)

    @property
    def ledger_path(self) -> Path:
        return Path(self.db_path) if self.db_path else self.data_path / "ledger.db"

    @property
    def templates_path(self) -> Path:
        """The templates folder: ``templates_dir``, or for a relative one missing here, the project's own."""
        path = Path(self.templates_dir)
        if path.is_absolute() or path.is_dir():
            return path
        beside_code = PROJECT_ROOT / path
        return beside_code if beside_code.is_dir() else path

    @property
    def user_templates_path(self) -> Path:
        """Where templates admins upload or edit are kept: the data folder, not the code's templates/."""
        return self.data_path / "templates"

    @property
    def outputs_path(self) -> Path:
        return Path(self.output_dir) if self.output_dir else self.data_path / "outputs"

    @property
    def uploads_path(self) -> Path:
        return self.data_path / "uploads"

    @property
    def input_path(self) -> Path:
        """ComfyUI's input folder: where LoadImage looks when a workflow is not a batch with its own photos.

        Kept apart from the uploads folder, so a workflow can never read another batch's photos."""
        return self.data_path / "input"


def _coerce(spec: SettingSpec, raw: Any) -> Any:
    if spec.type is bool and isinstance(raw, str):
        return raw.strip().lower() in {"1", "true", "yes", "on"}
    return spec.type(raw)


def load_settings(overrides: dict[str, Any] | None = None, environ: dict[str, str] | None = None) -> Settings:
    """Defaults ← environment (``SD35_NAME``; Spaces' ``SPACE_ID``, Gradio's ``GRADIO_SERVER_NAME`` and
    ``GRADIO_SERVER_PORT``, and ``PORT`` too) ← explicit overrides."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    if env.get("SPACE_ID"):  # running as a Hugging Face Space: persistent storage and public bind
        values.update(data_dir="/data" if Path("/data").is_dir() else "data", host="0.0.0.0")
    # Where a Gradio app listens, as Gradio's own launch() reads it (a Gradio Space sets both)
    if env.get("GRADIO_SERVER_NAME"):
        values["host"] = env["GRADIO_SERVER_NAME"]
    for name in ("GRADIO_SERVER_PORT", "PORT"):
        if env.get(name):
            values["port"] = env[name]
    for spec in SETTINGS:
        key = f"SD35_{spec.name.upper()}"
        if key in env:
            values[spec.name] = env[key]
    for name, value in (overrides or {}).items():
        if value is not None:
            values[name] = value
    known = {f.name for f in fields(Settings)}
    by_name = {s.name: s for s in SETTINGS}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"unknown settings: {', '.join(sorted(unknown))}")
    settings = Settings(**{k: _coerce(by_name[k], v) if k in by_name else v for k, v in values.items()})
    _check_outputs_hold_no_private_files(settings)
    return settings


def _check_outputs_hold_no_private_files(settings: Settings) -> None:
    """The outputs folder is served to users (/files, /view): the ledger, the signing key, the uploads and
    the users file (password hashes) must not be inside it."""
    outputs = settings.outputs_path.resolve()
    private_files = [("data folder", settings.data_path), ("ledger", settings.ledger_path)]
    if settings.users_file:
        private_files.append(("users file", Path(settings.users_file)))
    for label, private in private_files:
        if private.resolve().is_relative_to(outputs):
            raise ValueError(
                f"output_dir {settings.outputs_path} would serve the {label} {private} to every user; give the "
                f"images a folder of their own (the default is {settings.data_path / 'outputs'})"
            )
