"""`evergreen ui`: the MLflow and Prefect UIs on the current home (commands, URLs, or started).

The embedded default keeps MLflow in SQLite under `home` and Prefect's runs in Prefect's own
database (`PREFECT_HOME`, ~/.prefect unless set); `mlflow ui` and `prefect server start` read
those in place, so nothing is copied or exported. With a tracking server or `PREFECT_API_URL`
configured, the UIs already exist and this only prints where.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from evergreen.config import EvergreenConfig


@dataclass(frozen=True)
class UiCommand:
    name: str
    url: str
    shell: str  # what to type; empty when the server already runs elsewhere
    argv: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()  # set for the server besides the caller's environment


def _tool(name: str) -> str:
    """The console script installed beside this interpreter, else the one on PATH."""
    beside = Path(sys.executable).with_name(name)
    return str(beside) if beside.exists() else name


def mlflow_command(cfg: EvergreenConfig, port: int) -> UiCommand:
    uri = cfg.tracking_uri
    model_page = f"#/models/{cfg.registry.name}"
    if uri.startswith(("http://", "https://")):
        return UiCommand("MLflow UI", f"{uri.rstrip('/')}/{model_page}", "(server already running)")
    argv: tuple[str, ...] = (_tool("mlflow"), "ui", "--backend-store-uri", uri)
    argv += ("--host", "127.0.0.1", "--port", str(port))
    return UiCommand("MLflow UI", f"http://127.0.0.1:{port}/{model_page}", shlex.join(argv), argv)


def prefect_command(port: int) -> UiCommand:
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME

    api = PREFECT_API_URL.value()
    if api:
        base = api.rstrip("/").removesuffix("/api")
        return UiCommand("Prefect UI", f"{base}/runs", "(server already running)")
    argv = (_tool("prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port))
    # `--port` alone moves the server, not the API URL its UI calls (still :4200): say both
    env: tuple[tuple[str, str], ...] = (("PREFECT_HOME", str(PREFECT_HOME.value())),)
    env += (("PREFECT_UI_API_URL", f"http://127.0.0.1:{port}/api"),)
    shell = " ".join(f"{key}={shlex.quote(value)}" for key, value in env) + " " + shlex.join(argv)
    return UiCommand("Prefect UI", f"http://127.0.0.1:{port}/runs", shell, argv, env)


def ui_commands(cfg: EvergreenConfig, *, mlflow_port: int, prefect_port: int) -> list[UiCommand]:
    """How to open each UI on this config's stores."""
    return [mlflow_command(cfg, mlflow_port), prefect_command(prefect_port)]


def serve(commands: list[UiCommand], console: Console) -> int:
    """Start the UIs that are not already running; wait until Ctrl-C, then stop them."""
    started = [
        subprocess.Popen(item.argv, env={**os.environ, **dict(item.env)})
        for item in commands
        if item.argv
    ]
    if not started:
        console.print("both UIs are served elsewhere; nothing to start")
        return 0
    console.print("starting… (Ctrl-C stops them)")
    try:
        while all(process.poll() is None for process in started):
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        for process in started:
            process.terminate()
        for process in started:
            process.wait(timeout=30)
    return 0
