"""Screenshots of the MLflow and Prefect UIs on a demo home: `make screenshots` → docs/img/.

On an existing home (default `.evergreen/demo`, written by `make demo`) this starts `mlflow server`
on the home's tracking store and a `prefect server` on a Prefect home of its own (default
`<home>/screenshots/prefect`, so `evergreen deploy` does not add scheduled deployments to your
`~/.prefect`), registers the deployments there, checks through the same HTTP APIs the two UIs
call that the pages will hold what they should (`version_page`, `run_form`: the tests assert the
same), then has headless Chromium (driven over DevTools) take each picture once the rendered page
shows the texts that prove it holds them (`shots`):

- `mlflow-model-version.png`: the champion's model version page (aliases, lineage tags, source run);
- `mlflow-run.png`: that version's run (parameters, metrics, the datasets it used by role);
- `mlflow-logged-model.png`: the logged model with the gate and evaluation metrics linked to it;
- `prefect-custom-run.png`: the "Custom run" form of the `daily-lora` deployment.

Needs Chromium (Debian/Ubuntu: `apt-get install -y chromium`; elsewhere Google Chrome, passed
with `--chromium PATH` or `$CHROMIUM`). Both servers listen on 127.0.0.1 only and are stopped at
the end.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import httpx

from evergreen.config import EvergreenConfig, load_config
from tests.integration.servers import background, free_port, wait_http

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
INSTALL_HINT = (
    "headless Chromium not found: install it (Debian/Ubuntu: `apt-get install -y chromium`; "
    "macOS/Windows: Google Chrome) or name it with --chromium PATH or $CHROMIUM"
)
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# What a version page must show to explain the version (DATASET_ROLES: `tasks/tracking.py`).
LINEAGE_TAGS = ("parent_version", "cadence", "method", "batch_ids", "data_hash", "gate_decision")
DATASET_ROLES = ("train", "selection", "gate", "retention")
FORM_DEPLOYMENT = "daily-lora"
# The browser reaches the MLflow server under this name (mapped to 127.0.0.1 by Chromium), as a
# team's tracking server is reached: on `localhost`/`127.0.0.1` MLflow's UI opens its local-only
# Assistant panel by itself, over a third of the page.
MLFLOW_HOST = "mlflow.evergreen.test"


@dataclass(frozen=True)
class VersionPage:
    """What the MLflow UI shows for one registered version, read from the APIs the UI calls."""

    name: str
    version: str
    aliases: list[str]
    tags: dict[str, str]
    run_id: str
    experiment_id: str
    model_id: str | None
    datasets: dict[str, str]  # context (train, gate, …) -> dataset name
    run_metrics: dict[str, float]
    model_metrics: dict[str, float]  # linked to the logged model (MLflow 3 `model_id`)
    params: dict[str, str] = field(default_factory=dict)

    def problems(self) -> list[str]:
        """Why the page would not explain the version (empty when it does)."""
        found = [f"no lineage tag evergreen.{key}" for key in LINEAGE_TAGS if not self._has(key)]
        if "train" not in self.datasets:
            found.append(f"no train dataset among the run's inputs {sorted(self.datasets)}")
        if not self.params:
            found.append("no parameters on the run")
        if self.model_id is None:
            found.append("the version links to no logged model")
        elif not self.model_metrics:
            found.append("no metrics linked to the logged model")
        return found

    def _has(self, key: str) -> bool:
        return f"evergreen.{key}" in self.tags


RETRIED_STATUS = (429, 502, 503)  # a busy server (SQLite locked): retried, as Prefect's client does


def fetch_json(url: str, **params: str) -> dict:
    """GET `url` as the UIs' pages do; a busy server's 429/502/503 is retried with backoff."""
    for attempt in range(6):
        response = httpx.get(url, params=params, timeout=30)
        if response.status_code not in RETRIED_STATUS:
            break
        time.sleep(0.5 * 2**attempt)
    response.raise_for_status()
    return response.json()


def _get(base: str, path: str, **params: str) -> dict:
    """One of MLflow's REST endpoints under `/ajax-api` (the prefix the UI's pages call)."""
    return fetch_json(f"{base}/ajax-api/2.0/mlflow/{path}", **params)


def version_page(base: str, name: str, version_or_alias: str) -> VersionPage:
    """The version page's content: the version (by number or alias), its run and logged model."""
    if version_or_alias.isdigit():
        found = _get(base, "model-versions/get", name=name, version=version_or_alias)
    else:
        found = _get(base, "registered-models/alias", name=name, alias=version_or_alias)
    version = found["model_version"]
    run = _get(base, "runs/get", run_id=version["run_id"])["run"]
    model_id = version.get("model_id") or _logged_model_id(version.get("source", ""))
    model_metrics: dict[str, float] = {}
    if model_id:
        model = _get(base, f"logged-models/{model_id}")["model"]
        model_metrics = {m["key"]: m["value"] for m in model.get("data", {}).get("metrics", [])}
    data = run["data"]
    return VersionPage(
        name=name,
        version=version["version"],
        aliases=list(version.get("aliases", [])),
        tags={t["key"]: t["value"] for t in version.get("tags", [])},
        run_id=run["info"]["run_id"],
        experiment_id=run["info"]["experiment_id"],
        model_id=model_id,
        datasets=_datasets(run.get("inputs", {})),
        run_metrics={m["key"]: m["value"] for m in data.get("metrics", [])},
        model_metrics=model_metrics,
        params={p["key"]: p["value"] for p in data.get("params", [])},
    )


def _logged_model_id(source: str) -> str | None:
    """`m-…` of a version registered from `models:/m-…` (the SQL store leaves `model_id` empty
    and keeps the link in `source`, which the UI follows)."""
    found = source.removeprefix("models:/")
    return found if found != source and found.startswith("m-") and "/" not in found else None


def _datasets(inputs: dict) -> dict[str, str]:
    """The run's logged datasets by their `mlflow.data.context` (train, selection, gate, …)."""
    found = {}
    for item in inputs.get("dataset_inputs", []):
        tags = {t["key"]: t["value"] for t in item.get("tags", [])}
        found[tags.get("mlflow.data.context", "")] = item["dataset"]["name"]
    return found


@dataclass(frozen=True)
class RunForm:
    """The deployment's "Custom run" form: the server's parameter schema and the defaults."""

    deployment_id: str
    schema: dict
    defaults: dict

    @property
    def fields(self) -> dict[str, dict]:
        return self.schema.get("properties", {})

    def problems(self) -> list[str]:
        """What would make the form unusable for someone who never read the code."""
        found = ["a nested object in the form"] if self.schema.get("definitions") else []
        for name, spec in self.fields.items():
            if not spec.get("description"):
                found.append(f"{name}: no description")
            if "type" not in spec and "anyOf" not in spec:
                found.append(f"{name}: untyped")
            if name not in self.schema.get("required", []) and "default" not in spec:
                found.append(f"{name}: optional without a visible default")
        return found


def run_form(api: str, deployment: str) -> RunForm:
    """The form the Prefect UI renders for `deployment` (flow and deployment share the name)."""
    found = fetch_json(f"{api}/deployments/name/{deployment}/{deployment}")
    return RunForm(found["id"], found["parameter_openapi_schema"], found["parameters"])


def find_chromium(explicit: str | None = None) -> str:
    """The Chromium (or Chrome) binary, else SystemExit with how to install it."""
    for candidate in (explicit, os.environ.get("CHROMIUM"), *CHROMIUM_NAMES):
        if candidate and (path := shutil.which(candidate)):
            return path
    raise SystemExit(INSTALL_HINT)


# Pages are pictured at rest: no fade or slide caught half-way (Prefect's router fades pages).
NO_MOTION = """
addEventListener("DOMContentLoaded", () => {
  const style = document.createElement("style");
  style.textContent = "*, *::before, *::after { transition: none !important; "
    + "animation: none !important; }";
  document.head.append(style);
});
"""


@dataclass(frozen=True)
class Shot:
    """One picture: the page, the window size, and texts the rendered page must show."""

    name: str
    url: str
    size: tuple[int, int]
    shows: tuple[str, ...]


class DevTools:
    """Just enough of the Chrome DevTools Protocol: commands on one page, answers by id."""

    def __init__(self, socket_url: str) -> None:
        from websockets.sync.client import connect

        self._socket = connect(socket_url, max_size=None, open_timeout=30)
        self._next = 0

    def __call__(self, method: str, **params: object) -> dict:
        self._next += 1
        self._socket.send(json.dumps({"id": self._next, "method": method, "params": params}))
        while True:
            message = json.loads(self._socket.recv(timeout=60))
            if message.get("id") == self._next:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def close(self) -> None:
        self._socket.close()


@contextmanager
def browser(chromium: str, profile: Path) -> Iterator[DevTools]:
    """Headless Chromium with a fresh profile; its first page, driven over DevTools."""
    port = free_port()
    command = [
        chromium,
        "--headless",
        "--no-sandbox",  # run as root in containers and CI
        "--disable-gpu",
        "--hide-scrollbars",
        "--no-first-run",
        f"--remote-debugging-port={port}",
        f"--user-data-dir={profile}",
        f"--host-resolver-rules=MAP {MLFLOW_HOST} 127.0.0.1",
        "about:blank",
    ]
    with serving(
        command, dict(os.environ), profile / "chromium.log", f"http://127.0.0.1:{port}/json/version"
    ):
        pages = fetch_json(f"http://127.0.0.1:{port}/json/list")
        tools = DevTools(next(p for p in pages if p["type"] == "page")["webSocketDebuggerUrl"])
        try:
            tools("Page.enable")
            tools("Page.addScriptToEvaluateOnNewDocument", source=NO_MOTION)
            yield tools
        finally:
            tools.close()


def screenshot(tools: DevTools, shot: Shot, out: Path, timeout: float = 90) -> Path:
    """The page once it shows every text of `shot.shows` (SPAs render after their API calls),
    and two more seconds for the rest to settle; fails if it never does."""
    width, height = shot.size
    tools(
        "Emulation.setDeviceMetricsOverride",
        width=width,
        height=height,
        deviceScaleFactor=1,
        mobile=False,
    )
    tools("Page.navigate", url=shot.url)
    check = f"{json.dumps(list(shot.shows))}.filter(t => !document.body.innerText.includes(t))"
    deadline, missing = time.monotonic() + timeout, list(shot.shows)
    while time.monotonic() < deadline:
        time.sleep(1)
        found = tools("Runtime.evaluate", expression=check, returnByValue=True)["result"]
        missing = found.get("value", missing)
        if not missing:
            break
    else:
        raise RuntimeError(f"{shot.url} never showed {missing} in {timeout:.0f}s")
    time.sleep(2)
    data = tools("Page.captureScreenshot", format="png")["data"]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(base64.b64decode(data))
    return out


@contextmanager
def serving(command: list[str], env: dict[str, str], log: Path, health: str) -> Iterator[None]:
    """Run a server in its own process group until the block ends; wait for `health` first
    (the integration tests' `background` and `wait_http`)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with background(command, env=env, log=log) as process:
        wait_http(health, 240, process, log)
        yield


def mlflow_server(cfg: EvergreenConfig, port: int, log: Path) -> tuple[str, list[str], dict]:
    """`mlflow server` on the home's own tracking store (local artifacts are read in place)."""
    command = [str(BIN / "mlflow"), "server", "--backend-store-uri", cfg.tracking_uri]
    command += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    hosts = (f"{name}:{port}" for name in ("127.0.0.1", "localhost", MLFLOW_HOST))
    command += ["--allowed-hosts", ",".join(hosts)]
    command += ["--cors-allowed-origins", f"http://{MLFLOW_HOST}:{port}"]  # else POSTs get 403
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    return f"http://127.0.0.1:{port}", command, env


def prefect_env(prefect_home: Path, port: int) -> dict[str, str]:
    """The server's and its clients' settings. The UI is told its API's URL: `--port` alone
    leaves the page calling the default port 4200 ("Oops. Something went wrong")."""
    api = f"http://127.0.0.1:{port}/api"
    return {
        **os.environ,
        "PREFECT_HOME": str(prefect_home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "true",
        "PREFECT_UI_API_URL": api,
        "PREFECT_API_URL": api,
    }


def deploy(config: Path, env: dict[str, str], cwd: Path) -> None:
    """`evergreen deploy` unless the form's deployment is already registered there."""
    try:
        run_form(env["PREFECT_API_URL"], FORM_DEPLOYMENT)
        return
    except httpx.HTTPStatusError:
        pass
    command = [str(BIN / "evergreen"), "--quiet", "deploy", "--config", str(config)]
    command += ["--prefect-file", str(ROOT / "prefect.yaml"), "--name", FORM_DEPLOYMENT]
    done = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"evergreen deploy failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")


def take_all(args: argparse.Namespace) -> list[Path]:
    """Start both servers, check the pages' content, take the pictures, stop the servers."""
    chromium = find_chromium(args.chromium)
    config = Path(args.home).resolve() / "evergreen.yaml"
    if not config.is_file():
        raise SystemExit(f"{config} not found: run `make demo` first (or pass --home)")
    cfg = load_config(config)
    prefect_home = Path(args.prefect_home or cfg.home_path / "screenshots" / "prefect").resolve()
    with ExitStack() as stack:
        mlflow_url = _start_mlflow(stack, cfg, prefect_home.parent)
        page = version_page(mlflow_url, cfg.registry.name, args.version)
        if problems := page.problems():
            raise SystemExit(f"version {page.version}'s page would not explain it: {problems}")
        prefect_url, env = _start_prefect(stack, prefect_home)
        deploy(config, env, cfg.home_path)
        form = run_form(env["PREFECT_API_URL"], FORM_DEPLOYMENT)
        if problems := form.problems():
            raise SystemExit(f"the {FORM_DEPLOYMENT} run form is not usable: {problems}")
        profile = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="chromium-")))
        tools = stack.enter_context(browser(chromium, profile))
        out = Path(args.out)
        taken = [
            screenshot(tools, shot, out / shot.name)
            for shot in shots(mlflow_url, prefect_url, page, form)
        ]
    _summary(page, form, taken)
    return taken


def _start_mlflow(stack: ExitStack, cfg: EvergreenConfig, logs: Path) -> str:
    url, command, env = mlflow_server(cfg, free_port(), logs / "mlflow.log")
    stack.enter_context(serving(command, env, logs / "mlflow.log", f"{url}/health"))
    return url


def _start_prefect(stack: ExitStack, prefect_home: Path) -> tuple[str, dict[str, str]]:
    """A Prefect server with its UI on `prefect_home`; its URL and the clients' settings."""
    prefect_home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    command = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1"]
    command += ["--port", str(port)]
    env = prefect_env(prefect_home, port)
    health = f"{env['PREFECT_API_URL']}/health"
    stack.enter_context(serving(command, env, prefect_home / "server.log", health))
    return f"http://127.0.0.1:{port}", env


def shots(mlflow_url: str, prefect: str, page: VersionPage, form: RunForm) -> list[Shot]:
    """The four pictures, each with texts that prove the page rendered what it should."""
    mlflow = mlflow_url.replace("127.0.0.1", MLFLOW_HOST)
    experiment = f"{mlflow}/#/experiments/{page.experiment_id}"
    train = page.datasets["train"]
    return [
        Shot(
            "mlflow-model-version.png",
            f"{mlflow}/#/models/{quote(page.name)}/versions/{page.version}",
            (1280, 1000),
            (f"Version {page.version}", "champion", "evergreen.batch_ids", "Source Run"),
        ),
        Shot(
            "mlflow-run.png",
            f"{experiment}/runs/{page.run_id}",
            (1280, 1500),
            ("Datasets", train, "evergreen.parent_version", "gate.forgetting", "method"),
        ),
        Shot(
            "mlflow-logged-model.png",
            f"{experiment}/models/{page.model_id}",
            (1280, 1300),
            ("Datasets used", page.datasets.get("gate", train), f"v{page.version}", "gate."),
        ),
        Shot(
            "prefect-custom-run.png",
            f"{prefect}/deployments/deployment/{form.deployment_id}/run",
            (1280, 1400),
            tuple(form.fields) + tuple(f["description"][:40] for f in form.fields.values()),
        ),
    ]


def _summary(page: VersionPage, form: RunForm, taken: list[Path]) -> None:
    summary = {
        "version": page.version,
        "aliases": page.aliases,
        "datasets": page.datasets,
        "model_metrics": len(page.model_metrics),
        "form_fields": list(form.fields),
        "screenshots": {p.name: p.stat().st_size for p in taken},
    }
    print(json.dumps(summary, indent=2))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--home", default=".evergreen/demo", help="the demo home (make demo)")
    parser.add_argument("--version", default="champion", help="version number or alias")
    parser.add_argument("--out", default=str(ROOT / "docs" / "img"))
    parser.add_argument("--prefect-home", help="Prefect home for the server (default: in home)")
    parser.add_argument("--chromium", help="Chromium/Chrome binary (default: found on PATH)")
    take_all(parser.parse_args(argv))


if __name__ == "__main__":
    main()
