"""Benchmark: what the product costs against plain PyTorch, and its fixed cost per run.

Run: `python -m benchmarks.bench_speed [--quick]` (part of `make bench`); writes
`benchmarks/results/speed.json` and `speed.md`. Ratios are measured in one process, interleaved,
medians of repeats, so a busy machine slows both sides alike.

- replay step vs plain step (`continual.training.train`, 1.1M-parameter MLP, batch 64, one mixed
  forward pass with half of each batch from a reservoir buffer). Target ≤ 1.3×.
- a whole `daily-lora` flow run on the embedded default (ephemeral Prefect, SQLite MLflow, GX)
  vs the same LoRA training + evaluation as a bare script (pandas → tensors → peft → `train` →
  accuracies); ratio and fixed cost, and where the flow's time goes (its task runs, from the
  Prefect API). Target ≤ 1.3× at demo scale.
- `evergreen run daily-lora` with nothing pending (wall and CPU of the process, median of 3)
  before (the flow path: a Prefect flow run that finds nothing) and after the ledger fast path;
  and the CPU cost of importing each flow module. Target: no-op under 5 s.
The EWC step and the per-example Fisher ratios are in `bench_fisher` (same `make bench`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.bench_fisher import _data, _medians, _mlp

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent


def bench_replay_step(steps: int, repeats: int) -> dict[str, Any]:
    """ms per `train` step, plain vs replay (ratio 0.5 from a full 5000-row reservoir)."""
    from continual.replay import ReservoirBuffer
    from continual.training import TrainSettings, train

    torch.manual_seed(0)
    model = _mlp(hidden=1024)
    X, y = _data(2048, seed=2)
    buffer = ReservoirBuffer(capacity=5000, n_features=X.shape[1], seed=0)
    old_X, old_y = _data(5000, seed=3)
    buffer.add(old_X, old_y, batch_id="old")
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    settings = TrainSettings(steps=steps, batch_size=64, lr=1e-3, seed=0)

    def run(ratio: float) -> None:
        model.load_state_dict(start)
        train(model, X, y, settings, replay=buffer if ratio else None, replay_ratio=ratio)

    seconds = _medians({"plain": lambda: run(0.0), "replay": lambda: run(0.5)}, repeats)
    ms = {name: 1e3 * value / steps for name, value in seconds.items()}
    return {
        "model": "mlp 64-1024-1024-10",
        "n_params": sum(p.numel() for p in model.parameters()),
        "batch": 64,
        "replay_ratio": 0.5,
        "ms_per_step": ms,
        "ratio_vs_plain": ms["replay"] / ms["plain"],
    }


def _pipeline(root: Path, n_daily: int) -> tuple[str, list[str]]:
    from evergreen.cadences import run_flow
    from tests.digits_pipeline import digits_frame, write_batch, write_config

    landing = root / "landing"
    write_batch(landing, "2026-01-01", digits_frame(slice(0, 700)))
    daily = [f"2026-01-{2 + i:02d}" for i in range(n_daily)]
    for i, batch_id in enumerate(daily):
        write_batch(landing, batch_id, digits_frame(slice(700 + 200 * i, 900 + 200 * i)))
    config = str(write_config(root, landing, root / "home"))
    run_flow("bootstrap", config_path=config, batch_ids=["2026-01-01"])
    return config, daily


def _bare_daily(config: str, batch_id: str) -> float:
    """The same LoRA update + evaluation, no Prefect, no MLflow, no GX; returns seconds."""
    import pandas as pd

    from continual.inference import correct_mask
    from continual.lora import LoraSettings, attach_lora
    from continual.training import TrainSettings, train
    from evergreen.config import load_config
    from tasks.promote import load_champion

    cfg = load_config(config)
    champion = load_champion.fn(cfg)
    cpu_started = time.process_time()
    started = time.perf_counter()
    frame = pd.read_parquet(Path(cfg.data.landing) / batch_id)
    X = torch.tensor(frame[cfg.data.features].to_numpy("float32"))
    y = torch.tensor(frame[cfg.data.label].to_numpy("int64"))
    cut = int(0.65 * len(X))
    d = cfg.daily
    model = attach_lora(champion.clone_model(), LoraSettings(r=d.lora_r, alpha=d.lora_alpha))
    settings = TrainSettings(steps=d.train.steps, batch_size=d.train.batch_size, lr=d.train.lr)
    train(model, X[:cut], y[:cut], settings)
    correct_mask(model, X[cut:], y[cut:]).mean()
    correct_mask(champion.model, X[cut:], y[cut:]).mean()
    _LAST_CPU[0] = time.process_time() - cpu_started
    return time.perf_counter() - started


_LAST_CPU = [0.0]  # CPU seconds of the last `_bare_daily`: wall times swing with the load


def _task_times(flow_run_id: Any) -> dict[str, float]:
    """Seconds per task of one flow run (summed by task name), from the Prefect API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
    times: dict[str, float] = {}
    for task_run in runs:
        name = task_run.name.rsplit("-", 1)[0]
        times[name] = times.get(name, 0.0) + task_run.total_run_time.total_seconds()
    return dict(sorted(times.items(), key=lambda item: -item[1]))


def bench_flow_vs_script(root: Path, runs: int) -> dict[str, Any]:
    """daily-lora flow runs vs the bare script on the same batches (medians)."""
    from evergreen.cadences import cadence

    started = time.perf_counter()
    config, daily = _pipeline(root, runs)  # every batch is processed: then nothing is pending
    setup = time.perf_counter() - started  # includes the ephemeral Prefect server's start
    item = cadence("daily-lora")
    flow, params = item.flow(), item.params_model()
    flow_seconds: list[float] = []
    bare_seconds: list[float] = []
    flow_cpu: list[float] = []
    bare_cpu: list[float] = []
    tasks: dict[str, float] = {}
    _bare_daily(config, daily[0])  # warm-up: peft import, the champion's download
    for batch_id in daily[:runs]:  # interleaved: script, then the flow, on the same batch
        bare_seconds.append(_bare_daily(config, batch_id))
        bare_cpu.append(_LAST_CPU[0])
        cpu_start = time.process_time()  # this process only: not the Prefect server's
        start = time.perf_counter()
        arguments = params(config_path=config, batch_ids=[batch_id]).model_dump()
        state = flow(**arguments, return_state=True)
        flow_seconds.append(time.perf_counter() - start)
        flow_cpu.append(time.process_time() - cpu_start)
        tasks = _task_times(state.state_details.flow_run_id)
    flow_median, bare_median = statistics.median(flow_seconds), statistics.median(bare_seconds)
    return {
        "flow_seconds": flow_seconds,
        "bare_seconds": bare_seconds,
        "flow_median": flow_median,
        "bare_median": bare_median,
        "ratio": flow_median / bare_median,
        "flow_cpu_seconds": flow_cpu,
        "bare_cpu_seconds": bare_cpu,
        "cpu_ratio": statistics.median(flow_cpu) / statistics.median(bare_cpu),
        "fixed_cost_seconds": flow_median - bare_median,
        "bootstrap_and_prefect_start_seconds": setup,
        "last_flow_task_seconds": tasks,
        "config": config,
    }


def _timed_process(command: list[str], cwd: Path) -> tuple[float, float]:
    """(wall, CPU of the process and its children) of one command."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(command, cwd=cwd, check=True, capture_output=True, env=_env())
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def _median_pair(samples: list[tuple[float, float]]) -> dict[str, float]:
    return {
        "wall_seconds": statistics.median(s[0] for s in samples),
        "cpu_seconds": statistics.median(s[1] for s in samples),
    }


def bench_fixed_cost(config: str, repeats: int) -> dict[str, Any]:
    """No-op `evergreen run daily-lora` (fast path) vs the flow path; flow import costs."""
    cwd = Path(config).parent
    fast = [sys.executable, "-m", "evergreen.cli", "run", "daily-lora", "--config", config]
    flow_path = [
        sys.executable,
        "-c",
        "from evergreen.cadences import run_flow; "
        f"assert run_flow('daily-lora', config_path={config!r})['decision'] == 'skipped'",
    ]
    result: dict[str, Any] = {
        "noop_fast_path": _median_pair([_timed_process(fast, cwd) for _ in range(repeats)]),
        "noop_flow_run": _median_pair([_timed_process(flow_path, cwd) for _ in range(repeats)]),
        "imports": {},
    }
    modules = [
        "evergreen.cli",
        "flows.daily_lora",
        "flows.weekly_replay",
        "torch",
        "mlflow",
        "prefect",
        "peft",
        "great_expectations",
    ]
    for module in modules:
        samples = [
            _timed_process([sys.executable, "-c", f"import {module}"], cwd) for _ in range(repeats)
        ]
        result["imports"][module] = _median_pair(samples)
    return result


def markdown(result: dict[str, Any]) -> str:
    replay, flow, fixed = result["replay_step"], result["flow_vs_script"], result["fixed_cost"]
    ms = replay["ms_per_step"]
    load = result.get("load_average")
    lines = [
        f"torch {result['torch']}, {result['threads']} thread(s) for the step timings and the "
        "flow-vs-script runs; "
        "medians of interleaved repeats"
        + (f"; load average at the end {load[0]:.1f} on {result['cpus']} cores" if load else "")
        + (
            f" (at the start {result['load_average_at_start'][0]:.1f})"
            if result.get("load_average_at_start")
            else ""
        ),
        "",
        f"Replay step vs plain step ({replay['model']}, {replay['n_params']} params, batch "
        f"{replay['batch']}, replay ratio {replay['replay_ratio']}): plain {ms['plain']:.2f} ms, "
        f"replay {ms['replay']:.2f} ms → **{replay['ratio_vs_plain']:.2f}×** (target ≤ 1.3×)",
        "",
        "`daily-lora` flow run (embedded default) vs the same training + evaluation as a bare "
        f"script: flow {flow['flow_median']:.1f} s, script {flow['bare_median']:.2f} s → "
        f"**{flow['ratio']:.1f}×**, fixed cost **{flow['fixed_cost_seconds']:.1f} s** per run "
        f"(bootstrap + ephemeral Prefect start: {flow['bootstrap_and_prefect_start_seconds']:.0f}"
        " s, once per process); CPU seconds of this process "
        f"{statistics.median(flow['flow_cpu_seconds']):.1f} vs "
        f"{statistics.median(flow['bare_cpu_seconds']):.2f} → **{flow['cpu_ratio']:.1f}×** (the "
        "Prefect server is a subprocess, not counted). Where one flow run's time goes (task "
        "runs, wall):",
        "",
        "| task | seconds |",
        "|---|---|",
        *[f"| {name} | {s:.2f} |" for name, s in flow["last_flow_task_seconds"].items()],
        "",
        "No-op `evergreen run daily-lora` (nothing pending), median of "
        f"{result['repeats']} processes:",
        "",
        "| path | wall s | CPU s |",
        "|---|---|---|",
    ]
    for label, key in (
        ("before: a Prefect flow run that finds nothing", "noop_flow_run"),
        ("after: ledger check in the CLI, no flow run", "noop_fast_path"),
    ):
        f = fixed[key]
        lines.append(f"| {label} | {f['wall_seconds']:.1f} | {f['cpu_seconds']:.1f} |")
    lines += ["", "| import | wall s | CPU s |", "|---|---|---|"]
    for module, f in fixed["imports"].items():
        lines.append(f"| `{module}` | {f['wall_seconds']:.1f} | {f['cpu_seconds']:.1f} |")
    return "\n".join(lines)


def run(quick: bool = False) -> dict[str, Any]:
    """Run every part, write speed.json and speed.md, return the results."""
    steps, step_repeats, flow_runs, repeats = (10, 3, 1, 1) if quick else (30, 15, 3, 3)
    load_at_start = os.getloadavg()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        replay = bench_replay_step(steps, step_repeats)
    finally:
        torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory(prefix="evergreen-speed-") as folder:
        # one intra-op thread on both sides: with torch's default (every core) a tiny model's
        # steps wait on OpenMP barriers whenever another process takes a core, ~10× slower on
        # a busy 2-core machine, and the flow's own Prefect server and log threads take cores
        # during its training — the comparison then measured contention, not the product
        torch.set_num_threads(1)
        try:
            flow = bench_flow_vs_script(Path(folder), flow_runs)
        finally:
            torch.set_num_threads(threads)
        fixed = bench_fixed_cost(flow.pop("config"), repeats)
    result = {
        "benchmark": "speed",
        "quick": quick,
        "torch": torch.__version__,
        "threads": 1,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "load_average_at_start": load_at_start,
        "load_average": os.getloadavg(),
        "repeats": repeats,
        "replay_step": replay,
        "flow_vs_script": flow,
        "fixed_cost": fixed,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "speed.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (RESULTS / "speed.md").write_text(markdown(result) + "\n")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one repeat of everything")
    print(markdown(run(quick=parser.parse_args().quick)))


if __name__ == "__main__":
    main()
