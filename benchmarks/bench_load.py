"""Load: the four batch-consuming cadences started at once on a Prefect server with a process
worker, round after round.

Run: `python -m benchmarks.bench_load [--rounds 20]` (not part of `make bench`: it starts a
Prefect server and a worker); writes `benchmarks/results/load.json` and `load.md`. The
integration test `tests/integration/test_load.py` runs the same harness for a few rounds.

Set-up, once: a real `prefect server start` on a free loopback port, `evergreen run bootstrap` on
a first batch, `evergreen deploy` of the four cadences that consume batches (monthly-finetune,
weekly-replay, daily-lora, stream-monitor; prefect.yaml as shipped, so each deployment keeps its
own concurrency limit and collision strategy), and one `prefect worker start` on the process
pool. Each round lands one new (small) batch, then creates one flow run per deployment through
the REST API within a fraction of a second, and waits until every flow run of the four
deployments is final (a drift-triggered weekly-replay run included).

What is measured, and what the test asserts:

- no deadlock: every round finishes within `round_timeout` seconds;
- every flow run completed (none failed, crashed or was cancelled);
- no leaked concurrency slot: after the last round the pipeline's global limits (training,
  promotion) hold 0 active slots;
- exactly once: for each cadence, every round's batch has exactly one ledger entry that counts
  as done (promoted, rejected, quarantined or skipped) and no second one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tests.digits_pipeline import digits_frame, write_batch, write_config
from tests.integration.servers import BIN, background, prefect_env, prefect_request, prefect_server

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent
CADENCES = ("monthly-finetune", "weekly-replay", "daily-lora", "stream-monitor")
FINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
DONE = ("promoted", "rejected", "quarantined", "skipped")
BATCH_ROWS = 120
# small and fast: the load is in the orchestration (4 worker subprocesses, MLflow, slots)
LOAD_SECTIONS: dict[str, dict[str, Any]] = {
    "bootstrap": {"train": {"steps": 40, "lr": 0.005}},
    "weekly": {"train": {"steps": 10}},
    "monthly": {"train": {"steps": 10}},
    "daily": {"train": {"steps": 10}},
    "gate": {"n_bootstrap": 100},
    "memory": {"held_out_per_batch": 30},
}


@dataclass
class Round:
    """One round: its batch, its wall time, and the final state of every flow run it saw."""

    batch_id: str
    seconds: float
    states: dict[str, list[str]] = field(default_factory=dict)  # cadence → final state types
    errors: list[str] = field(default_factory=list)  # "cadence: state message" of runs that failed


@dataclass
class LoadResult:
    """The whole load run (what load.json holds)."""

    rounds: list[Round]
    active_slots: dict[str, int]  # limit name → active slots after the last round
    done_entries: dict[str, dict[str, int]]  # cadence → batch → done ledger entries
    setup_seconds: float
    deadlocked: str | None = None  # the round that did not finish in time, if any

    @property
    def flow_runs(self) -> int:
        return sum(len(states) for r in self.rounds for states in r.states.values())

    @property
    def failures(self) -> list[str]:
        return [
            f"{r.batch_id}/{cadence}: {state}"
            for r in self.rounds
            for cadence, states in r.states.items()
            for state in states
            if state != "COMPLETED"
        ]

    def not_exactly_once(self) -> list[str]:
        """`cadence/batch: n` for every round batch not processed exactly once per cadence."""
        return [
            f"{cadence}/{r.batch_id}: {self.done_entries.get(cadence, {}).get(r.batch_id, 0)}"
            for cadence in CADENCES
            for r in self.rounds
            if self.done_entries.get(cadence, {}).get(r.batch_id, 0) != 1
        ]


def _check(env: dict[str, str], cwd: Path, command: list[str]) -> None:
    done = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"{command}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")


def _deployment_ids(api: str) -> dict[str, str]:
    ids = {}
    for name in CADENCES:
        response = prefect_request("GET", f"{api}/deployments/name/{name}/{name}", timeout=60)
        response.raise_for_status()
        ids[name] = response.json()["id"]
    return ids


def _start(api: str, deployment_id: str, batch_id: str) -> str:
    body = {
        "parameters": {"config_path": "evergreen.yaml", "batch_ids": [batch_id]},
        "idempotency_key": f"load-{deployment_id}-{batch_id}",  # a retried POST: the same run
    }
    response = prefect_request(
        "POST", f"{api}/deployments/{deployment_id}/create_flow_run", json=body, timeout=60
    )
    if response.status_code not in (200, 201):  # 200: the idempotency key's existing run
        raise RuntimeError(f"create_flow_run: {response.status_code} {response.text}")
    return str(response.json()["id"])


def _due_runs(api: str, ids: dict[str, str]) -> list[dict[str, Any]]:
    """Flow runs of the four deployments that are due now (not the cron schedule's future ones)."""
    runs = prefect_request(
        "POST",
        f"{api}/flow_runs/filter",
        json={
            "deployments": {"id": {"any_": list(ids.values())}},
            "flow_runs": {"expected_start_time": {"before_": _in_seconds(120)}},
            "limit": 200,
        },
        timeout=60,
    ).json()
    return list(runs)


def _in_seconds(seconds: float) -> str:
    from datetime import UTC, datetime, timedelta

    return (datetime.now(UTC) + timedelta(seconds=seconds)).isoformat()


def run_round(api: str, ids: dict[str, str], landing: Path, index: int, timeout: float) -> Round:
    """Land one batch, start the four cadences at once on it, wait until every due run is final.

    Raises:
        TimeoutError: a flow run was still not final after `timeout` seconds (a deadlock).
    """
    batch_id = f"2026-03-{index + 1:02d}" if index < 28 else f"2026-04-{index - 27:02d}"
    start = 600 + (index * BATCH_ROWS) % 1100
    write_batch(landing, batch_id, digits_frame(slice(start, start + BATCH_ROWS)))
    # runs that were final before this round (a late drift-triggered run counts in this one)
    seen_before = {r["id"] for r in _due_runs(api, ids) if r["state_type"] in FINAL}
    began = time.monotonic()
    with ThreadPoolExecutor(len(ids)) as pool:  # all four within a fraction of a second
        started = list(pool.map(lambda d: _start(api, d, batch_id), ids.values()))
    by_deployment = {v: k for k, v in ids.items()}
    while True:
        runs = [r for r in _due_runs(api, ids) if r["id"] not in seen_before]
        pending = set(started) - {r["id"] for r in runs}
        if not pending and all(r["state_type"] in FINAL for r in runs):
            break
        if time.monotonic() - began > timeout:
            stuck = [f"{by_deployment[r['deployment_id']]}: {r['state_type']}" for r in runs]
            raise TimeoutError(f"round {index} ({batch_id}) not final after {timeout}s: {stuck}")
        time.sleep(2)
    states: dict[str, list[str]] = {}
    errors: list[str] = []
    for run in runs:
        cadence = by_deployment[run["deployment_id"]]
        states.setdefault(cadence, []).append(run["state_type"])
        if run["state_type"] != "COMPLETED":  # why: the final state's message names the error
            message = (run.get("state") or {}).get("message") or "(no message)"
            errors.append(f"{cadence} {run['id']}: {message}")
    return Round(batch_id, round(time.monotonic() - began, 1), states, errors)


def active_slots(api: str, pipeline: str) -> dict[str, int]:
    """Active slots of the pipeline's global concurrency limits (tasks.limits names)."""
    from tasks.limits import promotion_limit, training_limit

    slots = {}
    for name in (training_limit(pipeline), promotion_limit(pipeline)):
        response = prefect_request("GET", f"{api}/v2/concurrency_limits/{name}", timeout=60)
        response.raise_for_status()
        slots[name] = int(response.json()["active_slots"])
    return slots


def done_entries(config: Path) -> dict[str, dict[str, int]]:
    """cadence → batch → how many ledger entries count it as done (exactly once: 1)."""
    from evergreen.config import load_config
    from model_registry.ledger import Ledger

    ledger = Ledger.from_config(load_config(config))
    counts: dict[str, dict[str, int]] = {}
    for cadence in CADENCES:
        per_batch = counts.setdefault(cadence, {})
        for entry in ledger.entries(cadence, limit=100_000):
            if entry.outcome in DONE:
                per_batch[entry.batch_id] = per_batch.get(entry.batch_id, 0) + 1
    return counts


def run_load(root: Path, rounds: int, round_timeout: float = 900) -> LoadResult:
    """Server, bootstrap, deploy, worker; then `rounds` rounds; then slots and ledger read back."""
    began = time.monotonic()
    landing = root / "landing"
    write_batch(landing, "2026-02-01", digits_frame(slice(0, 600)))
    config = write_config(root, landing, root / "home", **LOAD_SECTIONS)
    with prefect_server(root / "prefect", backend="postgresql") as api:
        env = prefect_env(root / "prefect", api)
        _check(env, root, [str(BIN / "evergreen"), "run", "bootstrap", "--batch", "2026-02-01"])
        names = [arg for name in CADENCES for arg in ("--name", name)]
        prefect_file = str(ROOT / "prefect.yaml")
        _check(
            env, root, [str(BIN / "evergreen"), "deploy", "--prefect-file", prefect_file, *names]
        )
        ids = _deployment_ids(api)
        worker = [str(BIN / "prefect"), "worker", "start", "--pool", "evergreen-process"]
        with background(worker, env=env, log=root / "worker.log", cwd=root):
            setup = round(time.monotonic() - began, 1)
            done: list[Round] = []
            deadlocked = None
            for index in range(rounds):
                try:
                    done.append(run_round(api, ids, landing, index, round_timeout))
                    states = {c: s for c, s in sorted(done[-1].states.items())}
                    print(f"round {index + 1}: {done[-1].seconds}s {states}", flush=True)
                    for error in done[-1].errors:
                        print(f"  not completed: {error}", flush=True)
                except TimeoutError as error:
                    deadlocked = str(error)
                    break
            from evergreen.config import load_config

            slots = active_slots(api, load_config(config).registry.name)
    return LoadResult(done, slots, done_entries(config), setup, deadlocked)


def _markdown(result: LoadResult, rounds: int) -> str:
    seconds = [r.seconds for r in result.rounds]
    lines = [
        "# Load: four cadences at once on a Prefect server with a process worker",
        "",
        f"Written by `python -m benchmarks.bench_load --rounds {rounds}` on "
        f"{platform.machine()}, {os.cpu_count()} cores (shared), Python "
        f"{platform.python_version()}.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| rounds completed | {len(result.rounds)} of {rounds} |",
        f"| flow runs | {result.flow_runs} |",
        f"| flow runs not COMPLETED | {len(result.failures)} |",
        f"| deadlock (a round not final in time) | {result.deadlocked or 'none'} |",
        f"| active slots after | {result.active_slots} |",
        f"| batches not processed exactly once per cadence | {len(result.not_exactly_once())} |",
        f"| set-up (server, bootstrap, deploy, worker) s | {result.setup_seconds} |",
    ]
    if seconds:
        lines += [
            f"| round wall time s: min / median / max | {min(seconds)} / "
            f"{sorted(seconds)[len(seconds) // 2]} / {max(seconds)} |",
        ]
    lines += ["", "| round | batch | seconds | runs per cadence |", "|---|---|---|---|"]
    for i, r in enumerate(result.rounds):
        runs = ", ".join(f"{c} {len(s)}" for c, s in sorted(r.states.items()))
        lines.append(f"| {i + 1} | {r.batch_id} | {r.seconds} | {runs} |")
    errors = [(r.batch_id, e) for r in result.rounds for e in r.errors]
    if errors:
        lines += ["", "Flow runs that did not complete (final state message):", ""]
        lines += [f"- {batch}: {error}" for batch, error in errors]
    expected = len(result.rounds)
    lines += ["", "| cadence | batches processed once (expected) |", "|---|---|"]
    for cadence in CADENCES:
        once = sum(1 for r in result.rounds if result.done_entries[cadence].get(r.batch_id) == 1)
        lines.append(f"| {cadence} | {once} ({expected}) |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--round-timeout", type=float, default=900)
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the run's folder (worker.log, home) for a post-mortem",
    )
    args = parser.parse_args(argv)
    tmp = tempfile.mkdtemp(prefix="evergreen-load-")
    try:
        result = run_load(Path(tmp), args.rounds, args.round_timeout)
    finally:
        if args.keep:
            print(f"kept: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    RESULTS.mkdir(exist_ok=True)
    payload = {
        **asdict(result),
        "flow_runs": result.flow_runs,
        "failures": result.failures,
        "not_exactly_once": result.not_exactly_once(),
        "rounds_requested": args.rounds,
    }
    (RESULTS / "load.json").write_text(json.dumps(payload, indent=1) + "\n")
    (RESULTS / "load.md").write_text(_markdown(result, args.rounds))
    print(_markdown(result, args.rounds))
    ok = not (result.failures or result.deadlocked or result.not_exactly_once())
    return 0 if ok and not any(result.active_slots.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
