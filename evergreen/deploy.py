"""`evergreen deploy`: register prefect.yaml's deployments on the configured Prefect server."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL
from rich.console import Console

from evergreen.automations import ensure_automations
from evergreen.config import EvergreenConfig
from evergreen.deployments import CONFIG_VARIABLE, WORK_POOL
from evergreen.errors import UsageError
from tasks.limits import ensure_limits


def ensure_work_pool(name: str = WORK_POOL, pool_type: str = "process") -> bool:
    """Create the work pool if it does not exist; True when it was created."""
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
            return False
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=name, type=pool_type))
            return True


def ensure_config_variable(config_path: Path) -> bool:
    """Create the Prefect Variable the deployments read their config from (`CONFIG_VARIABLE`),
    holding this config's path, unless it exists (an operator may have edited it in the UI:
    replace the path by the YAML text itself to keep the config on the server). True if created.
    """
    from prefect.variables import Variable

    if Variable.get(CONFIG_VARIABLE, default=None) is not None:
        return False
    Variable.set(CONFIG_VARIABLE, str(config_path.resolve()))
    return True


def deploy_all(
    cfg: EvergreenConfig,
    prefect_file: Path,
    *,
    names: list[str] | None,
    console: Console,
    config_path: Path | None = None,
    notify: str | None = None,
) -> int:
    """Work pool, concurrency limits, config Variable, automations (with `notify`), then
    `prefect deploy` of every (or the named) deployment."""
    if not PREFECT_API_URL.value():
        raise UsageError(
            "deploy needs a Prefect server: run `prefect server start` and "
            "`export PREFECT_API_URL=http://127.0.0.1:4200/api` (README, 'From the embedded "
            "default to servers and S3')"
        )
    if not prefect_file.exists():
        raise UsageError(f"{prefect_file} not found (--prefect-file)")
    if ensure_work_pool():
        console.print(f"created work pool {WORK_POOL} (process)")
    for name in ensure_limits(cfg.registry.name):
        console.print(f"created concurrency limit {name} (limit 1)")
    if config_path is not None and ensure_config_variable(config_path):
        console.print(f"created Prefect Variable {CONFIG_VARIABLE} = {config_path.resolve()}")
    if notify:
        for name in ensure_automations(notify):
            console.print(f"created automation {name!r} → {notify}")
    selection = [arg for name in names for arg in ("--name", name)] if names else ["--all"]
    env = {**os.environ, "EVERGREEN_WORKDIR": str(Path.cwd())}
    command = [
        str(Path(sys.executable).with_name("prefect")),
        "--no-prompt",
        "deploy",
        "--prefect-file",
        str(prefect_file),
        *selection,
    ]
    done = subprocess.run(command, env=env, text=True, capture_output=True, check=False)
    console.print(done.stdout[-4000:])
    if done.returncode != 0:  # the command ran and failed: exit 1, prefect's reasons above
        console.print(f"[red]prefect deploy failed[/red]:\n{done.stderr[-4000:]}")
        return 1
    where = [f"working directory {Path.cwd()}", f"home {cfg.home_path}"]
    if config_path is not None:
        where.insert(1, f"config {config_path.resolve()}")
    console.print(
        f"deployments registered; start a worker: prefect worker start --pool {WORK_POOL}  "
        f"({', '.join(where)})"
    )
    return 0
