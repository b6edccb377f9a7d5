"""The demo's references in a worker process beside the flows: `python -m demo.references DIR`.

The joint and naive references (`demo.baselines`) need nothing from the flows but the data and the
first champion, while the demo's own process trains at one thread (`evergreen.cli.DEMO_DEFAULTS`)
and leaves the second core idle: they were ≈ 150 of the text demo's ≈ 400 s, after the flows.
Here they run in a child process while the flows run. Nothing crosses the process boundary as a
pickle (docs/RELIABILITY.md): the parent writes the held-out rows as Parquet, the job as JSON and
the first champion as a checkpoint (`continual.checkpoint`); the child writes its accuracy rows as
JSON. The worker trains joint first (it needs no flow), then waits for the first champion
(`naive-start/READY`, written by the parent after the bootstrap flow) and trains naive.

Layout of DIR: `job.json` ({"config", "order", "skip"}), `rows/<batch>.{train,gate}.parquet`,
`naive-start/` (a checkpoint, then READY), and the results `joint.json` / `naive.json`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd

from continual.files import atomic_write_text
from demo.baselines import HeldOut

Rows = dict[str, dict[str, float]]


def write_inputs(directory: Path, config_path: str, held_out: HeldOut, skip: list[str]) -> None:
    """The held-out rows and the job, for `joint` and `naive` workers started on `directory`."""
    rows = directory / "rows"
    rows.mkdir(parents=True, exist_ok=True)
    for batch_id in held_out.gate:
        held_out.train[batch_id].to_parquet(rows / f"{batch_id}.train.parquet", index=False)
        held_out.gate[batch_id].to_parquet(rows / f"{batch_id}.gate.parquet", index=False)
    job = {"config": config_path, "order": list(held_out.gate), "skip": skip}
    (directory / "job.json").write_text(json.dumps(job))


READY = "READY"


def start(directory: Path) -> subprocess.Popen[bytes]:
    """Start the worker on `directory`; it inherits the environment (one thread, the demo's
    quiet defaults)."""
    return subprocess.Popen([sys.executable, "-m", "demo.references", str(directory)])


def results(directory: Path, process: subprocess.Popen[bytes]) -> tuple[Rows, Rows]:
    """Wait for the worker; the (joint, naive) accuracy rows.

    Raises:
        RuntimeError: the worker failed (its traceback went to stderr).
    """
    code = process.wait()
    if code != 0:
        raise RuntimeError(f"the demo's reference worker failed (exit code {code}); see above")
    joint: Rows = json.loads((directory / "joint.json").read_text())
    naive: Rows = json.loads((directory / "naive.json").read_text())
    return joint, naive


def _wait_for_start(directory: Path, parent: int) -> None:
    """Until the parent has saved the first champion; exit if the parent is gone."""
    while not (directory / "naive-start" / READY).exists():
        if os.getppid() != parent:
            raise SystemExit("the demo stopped before its bootstrap champion was saved")
        time.sleep(0.2)


def _read(directory: Path) -> tuple[dict[str, Any], HeldOut]:
    job: dict[str, Any] = json.loads((directory / "job.json").read_text())
    held_out = HeldOut()
    for batch_id in job["order"]:
        held_out.train[batch_id] = pd.read_parquet(directory / "rows" / f"{batch_id}.train.parquet")
        held_out.gate[batch_id] = pd.read_parquet(directory / "rows" / f"{batch_id}.gate.parquet")
    return job, held_out


def run(directory: Path, kind: str) -> Rows:
    """The worker: joint training from scratch at each batch (the first champion's spec from the
    bootstrap's own rule), or the naive fine-tune of the checkpoint in `naive-start/`."""
    from continual.checkpoint import load_checkpoint
    from demo.baselines import joint_rows, naive_rows
    from evergreen.config import load_config
    from tasks.state import ModelState
    from tasks.train_bootstrap import new_spec

    job, held_out = _read(directory)
    cfg = load_config(job["config"])
    order: list[str] = job["order"]
    if kind == "joint":
        spec = new_spec(cfg, held_out.train[order[0]])  # as the bootstrap flow's
        return joint_rows(cfg, spec, held_out, order, skip=job["skip"])
    model, spec = load_checkpoint(directory / "naive-start")
    return naive_rows(cfg, ModelState(model=model, spec=spec), held_out, order[1:])


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        raise SystemExit("usage: python -m demo.references DIR")
    directory, parent = Path(argv[0]), os.getppid()
    for kind in ("joint", "naive"):
        if kind == "naive":
            _wait_for_start(directory, parent)
        atomic_write_text(directory / f"{kind}.json", json.dumps(run(directory, kind)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
