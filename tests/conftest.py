"""Shared fixtures: the tiny demo SD3.5 model, built once per session."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest


@pytest.fixture(scope="session")
def demo_components():
    """The demo model's diffusers-pipeline-named components (float32, CPU). Do not modify them."""
    from engine.models.demo import build_demo_components

    return build_demo_components()


@pytest.fixture(scope="session")
def demo_checkpoint_file(tmp_path_factory):
    """The demo written as a single-file checkpoint in ComfyUI's key layout."""
    from engine.models.demo import write_demo_checkpoint

    return write_demo_checkpoint(tmp_path_factory.mktemp("demo_ckpt") / "sd35_demo_tiny.safetensors")


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory, demo_checkpoint_file):
    """A ComfyUI-style models folder with the demo checkpoint file in checkpoints/. Read-only for tests."""
    root = tmp_path_factory.mktemp("models")
    for kind in ("checkpoints", "diffusion_models", "text_encoders", "vae", "loras", "controlnet"):
        (root / kind).mkdir()
    shutil.copyfile(demo_checkpoint_file, root / "checkpoints" / "sd35_demo_tiny.safetensors")
    return root


@pytest.fixture
def services_factory(tmp_path):
    """Builds the web app's services (ledger, runner, queue) on a data folder under ``tmp_path`` and the shipped
    templates, closing each afterwards. ``engine``: an Engine to share between tests (building one costs a
    model load); otherwise a new ``engine_cls`` from the same settings. Other keywords are settings."""
    from engine.runtime import Engine
    from engine.services import build_services
    from engine.settings import load_settings

    made = []
    templates = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "templates")

    def make(engine=None, engine_cls=Engine, **overrides):
        settings = load_settings({"data_dir": str(tmp_path / "data"), "templates_dir": templates, **overrides},
                                 environ={})
        services = build_services(settings, engine=engine if engine is not None else engine_cls(settings))
        made.append(services)
        return services

    yield make
    for services in made:
        services.close()


@pytest.fixture
def as_ordinary_user() -> list[str]:
    """A command prefix under which file permissions hold (root ignores them, so it drops those powers with
    util-linux's setpriv); empty for an ordinary user. Skips where neither is possible."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without util-linux's setpriv: file permissions cannot be made to hold")
    caps = "-dac_override,-dac_read_search"
    return ["setpriv", f"--bounding-set={caps}", f"--inh-caps={caps}"]


@pytest.fixture
def tiny_disk(tmp_path):
    """A real 1 MiB filesystem (tmpfs), unmounted afterwards; skips where mounting is not permitted."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root and mount rights): {mounted.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
