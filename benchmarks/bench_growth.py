"""Benchmark: does a daily cycle get slower or bigger as history grows?

Run: `nice -n 10 python -m benchmarks.bench_growth [--cycles 100] [--process-per-run]` (writes
`benchmarks/results/growth[-process].json` and `.md`). The embedded default (ephemeral Prefect,
SQLite MLflow): bootstrap on the first batch of real digits, then `cycles` consecutive
`daily-lora` runs, one new ~150-row batch each (digits rows with a little pixel noise, so no two
batches hold the same rows). Per run: wall time, resident memory, the ledger and registry sizes.
Targets: run N ≤ 1.2× run 1, flat memory.

Two ways to run the cycles, because they answer different questions:
- one process for every run (default): does anything accumulate *in a process* across runs?
- `--process-per-run`: each run in a fresh Python process, as Prefect's process worker runs
  every flow run of a deployment: does a run get slower or bigger as the *stores* (registry,
  ledger, memory, GX) grow? Memory is then the run's own peak resident set.
"""

from __future__ import annotations

import argparse
import json
import math
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

import numpy as np

nan = math.nan  # runs recorded before CPU time was
RESULTS = Path(__file__).resolve().parent / "results"
CHECKPOINTS = (1, 10, 20, 30, 50, 100)


def _rss_mb() -> float:
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:  # pragma: no cover - psutil ships with the dev extras' dependencies
        return float("nan")


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _store_mb(home: Path) -> dict[str, float]:
    """Bytes on disk under `home` (MLflow database + artifacts, caches), in MB, by top folder."""
    sizes: dict[str, float] = {}
    for path in home.rglob("*"):
        if path.is_file():
            top = path.relative_to(home).parts[0]
            sizes[top] = sizes.get(top, 0.0) + path.stat().st_size / 2**20
    return {"total": sum(sizes.values()), **sizes}


def _landing(root: Path, cycles: int) -> list[str]:
    from tests.digits_pipeline import digits_frame, write_batch

    rng = np.random.default_rng(0)
    write_batch(root / "landing", "2026-01-01T00-00", digits_frame(slice(0, 600)))
    batch_ids = []
    for i in range(cycles):
        start = 600 + (i * 150) % 1100
        frame = digits_frame(slice(start, start + 150))
        pixels = frame.columns[:-1]
        frame[pixels] = frame[pixels] + rng.uniform(0, 0.01, size=(len(frame), len(pixels)))
        batch_id = f"2026-01-{2 + i // 24:02d}T{i % 24:02d}-00"
        write_batch(root / "landing", batch_id, frame)
        batch_ids.append(batch_id)
    return batch_ids


def one_run(config: str, batch_id: str) -> dict[str, Any]:
    """One daily-lora run in this process: its wall time, CPU time (this process's threads: a
    load-robust figure on a shared machine; the ephemeral Prefect server's own process is not
    in it), decision and resident memory."""
    from evergreen.cadences import run_flow

    started, cpu_started = time.perf_counter(), time.process_time()
    outcome = run_flow("daily-lora", config_path=config, batch_ids=[batch_id])
    return {
        "seconds": time.perf_counter() - started,
        "cpu_seconds": time.process_time() - cpu_started,
        "decision": outcome["decision"],
        "rss_mb": _rss_mb(),
        "peak_rss_mb": _peak_mb(),
    }


def _run_in_fresh_process(config: str, batch_id: str) -> dict[str, Any]:
    """`one_run` in a new interpreter (what a process worker does); the wall time is the whole
    process's, imports included, and memory is that process's own peak."""
    started, children = time.perf_counter(), _children_cpu()
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_growth", "--one", config, batch_id],
        capture_output=True,
        text=True,
        check=True,
    )
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    figures["flow_seconds"] = figures["seconds"]
    figures["seconds"] = time.perf_counter() - started
    figures["cpu_seconds"] = _children_cpu() - children  # the whole process, imports included
    return figures


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(cycles: int = 100, *, process_per_run: bool = False) -> dict[str, Any]:
    """Bootstrap, then `cycles` daily-lora runs; returns (and writes) per-run figures."""
    from evergreen.cadences import run_flow
    from evergreen.config import load_config
    from model_registry.ledger import Ledger
    from tests.digits_pipeline import write_config

    load_at_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="evergreen-growth-") as folder:
        root = Path(folder)
        batch_ids = _landing(root, cycles)
        config = str(write_config(root, root / "landing", root / "home"))
        cfg = load_config(config)
        run_flow("bootstrap", config_path=config, batch_ids=["2026-01-01T00-00"])
        runs = []
        for i, batch_id in enumerate(batch_ids, start=1):
            if process_per_run:
                figures = _run_in_fresh_process(config, batch_id)
            else:
                figures = one_run(config, batch_id)
            runs.append({"run": i, **figures, "store_mb": _store_mb(root / "home")})
            print(
                f"run {i}: {figures['seconds']:.1f}s {figures['decision']} "
                f"rss {figures['rss_mb']:.0f} MB peak {figures['peak_rss_mb']:.0f} MB"
            )
            # after every run: a stopped benchmark keeps its data
            result = _write(cycles, runs, load_at_start, process_per_run)
        result["ledger_entries_daily"] = len(Ledger.from_config(cfg).entries("daily-lora", 10**6))
    return result


def _write(
    cycles: int,
    runs: list[dict[str, Any]],
    load_at_start: tuple[float, ...],
    process_per_run: bool,
) -> dict[str, Any]:
    result = {
        "benchmark": "growth",
        "process_per_run": process_per_run,
        "cycles": cycles,
        "completed": len(runs),
        "machine": platform.machine(),
        "load_average_start": load_at_start,
        "load_average": os.getloadavg(),
        "runs": runs,
        "summary": _summary(runs),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "growth-process" if process_per_run else "growth"
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{stem}.md").write_text(markdown(result) + "\n")
    return result


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median of 3 runs around each checkpoint (a single run is noisy on a shared machine)."""
    out = {}
    for k in sorted({*(c for c in CHECKPOINTS if c <= len(runs)), len(runs)}):
        window = runs[max(0, k - 2) : k + 1]
        out[str(k)] = {
            "seconds_median3": statistics.median(r["seconds"] for r in window),
            # the fastest of 5 runs around k: what the run costs when the machine is not busy
            "seconds_min5": min(r["seconds"] for r in runs[max(0, k - 3) : k + 2]),
            "cpu_seconds_median3": statistics.median(r.get("cpu_seconds", nan) for r in window),
            "rss_mb": runs[k - 1]["rss_mb"],
            "peak_rss_mb": runs[k - 1]["peak_rss_mb"],
            "store_mb": runs[k - 1].get("store_mb", {}),
        }
    first, fastest = out["1"]["seconds_median3"], out["1"]["seconds_min5"]
    first_cpu = out["1"]["cpu_seconds_median3"]
    for figures in out.values():
        figures["cpu_ratio_vs_run_1"] = figures["cpu_seconds_median3"] / first_cpu
        figures["ratio_vs_run_1"] = figures["seconds_median3"] / first
        figures["min5_ratio_vs_run_1"] = figures["seconds_min5"] / fastest
    return out


def markdown(result: dict[str, Any]) -> str:
    where = (
        "each in a fresh process (time = the whole process, imports included; memory = its peak)"
        if result.get("process_per_run")
        else "in one process"
    )
    lines = [
        f"{result['completed']} of {result['cycles']} consecutive daily-lora cycles {where} "
        "(embedded default); time = median of the runs k-1, k, k+1; load average (1, 5, 15 min) "
        f"{_load(result.get('load_average_start'))} at the start, "
        f"{_load(result['load_average'])} at the end, on {os.cpu_count()} cores",
        "",
        "| run | median s (k±1) | vs run 1 | fastest s (k±2) | vs run 1 | median CPU s (k±1) | "
        "vs run 1 | RSS after run MB | peak RSS MB | store MB (mlartifacts / gx / cache) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for k, f in result["summary"].items():
        lines.append(
            f"| {k} | {f['seconds_median3']:.1f} | {f['ratio_vs_run_1']:.2f}× | "
            f"{f['seconds_min5']:.1f} | {f['min5_ratio_vs_run_1']:.2f}× | "
            f"{f.get('cpu_seconds_median3', nan):.1f} | {f.get('cpu_ratio_vs_run_1', nan):.2f}× | "
            f"{f['rss_mb']:.0f} | {f['peak_rss_mb']:.0f} | {_store(f.get('store_mb', {}))} |"
        )
    return "\n".join(lines)


def _load(load: Any) -> str:
    return "unknown" if not load else ", ".join(f"{x:.1f}" for x in load)


def _store(sizes: dict[str, float]) -> str:
    if not sizes:
        return "–"
    parts = " / ".join(f"{sizes.get(k, 0.0):.1f}" for k in ("mlartifacts", "gx", "cache"))
    return f"{sizes['total']:.1f} ({parts})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=100)
    parser.add_argument(
        "--process-per-run",
        action="store_true",
        help="run every cycle in a fresh process, as a Prefect process worker does",
    )
    parser.add_argument("--one", nargs=2, metavar=("CONFIG", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    from evergreen.cli import QUIET_DEFAULTS

    for key, value in QUIET_DEFAULTS.items():  # what `evergreen run` sets (e.g. Prefect's
        os.environ.setdefault(key, value)  # ephemeral start-up timeout on a busy machine)
    if args.one:  # the child of --process-per-run: one run, figures as the last stdout line
        print(json.dumps(one_run(*args.one)))
        return
    print(markdown(run(args.cycles, process_per_run=args.process_per_run)))


if __name__ == "__main__":
    main()
