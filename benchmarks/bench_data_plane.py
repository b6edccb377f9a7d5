"""Benchmark: reading + validating a Parquet batch (1M rows × 64 float32 features + int label).

Run: `python -m benchmarks.bench_data_plane [--quick]` (part of `make bench`); writes
`benchmarks/results/data_plane.json` and `data_plane.md`.

One seeded file (10 row groups) in a temporary landing zone, then each path in a fresh
subprocess (so its peak RSS is its own: arrow buffers live outside Python's allocator, where
tracemalloc does not see them), modes interleaved over the repeats so a busy machine slows
every mode alike; medians reported:

- `pandas`: `pandas.read_parquet(path)`, the baseline;
- `read`: `data_plane.landing.read_batch`, what the ingest task does (streams row groups,
  then concatenates one DataFrame for the flow);
- `read+validate`: `read_batch` then `validation.validate_batch` with the generated integrity
  suite (GX Checkpoint, ephemeral context: no Data Docs written) — the ingest + validate tasks;
- `scan`: `data_plane.integrity.scan_integrity`, the same integrity verdict streamed in chunks.

The GX context and checkpoint are started on a 100-row batch before timing (a fixed cost per
process, measured in `bench_speed`); timings are of the batch alone. Peak memory is `ru_maxrss`
of the subprocess minus its `ru_maxrss` just before the timed call (imports, warm-up).
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

# the flows' Arrow pool (the system allocator), inherited by every measured subprocess;
# ARROW_DEFAULT_MEMORY_POOL=mimalloc measures pyarrow's own instead
import evergreen  # noqa: F401

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent
FEATURES = [f"f{i:02d}" for i in range(64)]
CLASSES = list(range(10))
MODES = ("pandas", "read", "read+validate", "scan")
BATCH = "batch-0001"
FILE = "part-00000.parquet"


def _maxrss_mib() -> float:
    """Peak resident set size of this process so far (Linux KiB, macOS bytes) in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def write_file(landing: Path, rows: int, *, row_group: int, seed: int = 0) -> Path:
    """The seeded batch: `rows` × 64 standard-normal float32 features and an int64 label,
    written one row group at a time."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    schema = pa.schema([*(pa.field(f, pa.float32()) for f in FEATURES), ("label", pa.int64())])
    path = landing / BATCH / FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, rows, row_group):
            n = min(row_group, rows - start)
            features = rng.standard_normal((n, len(FEATURES)), dtype=np.float32)
            columns = [pa.array(features[:, i]) for i in range(len(FEATURES))]
            columns.append(pa.array(rng.integers(0, len(CLASSES), n)))
            writer.write_table(pa.Table.from_arrays(columns, schema=schema))
    return path


def _config(landing: Path) -> Any:
    from evergreen.config import DataConfig

    return DataConfig(landing=str(landing), features=FEATURES, label="label", classes=CLASSES)


def _warm_gx(cfg: Any, suite: Path) -> None:
    """Start GX and build the checkpoint on 100 rows, so only the batch is timed."""
    import numpy as np
    import pandas as pd

    from data_plane.validation import validate_batch

    rng = np.random.default_rng(1)
    small = pd.DataFrame(rng.standard_normal((100, len(FEATURES))), columns=FEATURES)
    small["label"] = rng.integers(0, len(CLASSES), 100)
    validate_batch(small, "warm-up", cfg, suite)


def measure(mode: str, landing: Path, home: Path) -> dict[str, Any]:
    """Time one `mode` on the batch in this process; seconds, rows, verdict and peak RSS."""
    import pandas as pd

    from data_plane.gx_suite import ensure_suite
    from data_plane.integrity import scan_integrity
    from data_plane.landing import LocalLandingZone, read_batch
    from data_plane.validation import validate_batch

    cfg, zone = _config(landing), LocalLandingZone(landing)
    suite = ensure_suite(home, cfg)
    if mode == "read+validate":
        _warm_gx(cfg, suite)
    before = _maxrss_mib()
    started = time.perf_counter()
    verdict: bool | None = None
    if mode == "pandas":
        rows = len(pd.read_parquet(landing / BATCH / FILE))
    elif mode == "read":
        rows = len(read_batch(zone, BATCH, cfg))
    elif mode == "read+validate":
        frame = read_batch(zone, BATCH, cfg)
        rows, verdict = len(frame), validate_batch(frame, BATCH, cfg, suite).success
    elif mode == "scan":
        failures = scan_integrity(zone, BATCH, cfg)
        rows, verdict = -1, not failures
    else:
        raise ValueError(f"unknown mode {mode!r}: one of {MODES}")
    seconds = time.perf_counter() - started
    peak = _maxrss_mib()
    return {
        "seconds": seconds,
        "rows": rows,
        "verdict": verdict,
        "rss_before_mib": round(before, 1),
        "peak_rss_mib": round(peak, 1),
        "peak_added_mib": round(peak - before, 1),
    }


def _child(mode: str, landing: Path, home: Path) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GX_ANALYTICS_ENABLED": "false"}
    command = [sys.executable, "-m", "benchmarks.bench_data_plane", "--measure", mode]
    command += ["--landing", str(landing), "--home", str(home)]
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"{mode} failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _summary(runs: list[dict[str, Any]], rows: int) -> dict[str, Any]:
    seconds = statistics.median(r["seconds"] for r in runs)
    return {
        "seconds": round(seconds, 3),
        "rows_per_second": round(rows / seconds),
        "peak_added_mib": statistics.median(r["peak_added_mib"] for r in runs),
        "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in runs),
        "verdicts": sorted({str(r["verdict"]) for r in runs}),
        "runs": [round(r["seconds"], 3) for r in runs],
    }


def run(*, quick: bool = False, repeats: int | None = None) -> dict[str, Any]:
    rows = 100_000 if quick else 1_000_000
    repeats = repeats or (1 if quick else 3)
    with tempfile.TemporaryDirectory(prefix="evergreen-bench-data-") as tmp:
        landing, home = Path(tmp) / "landing", Path(tmp) / "home"
        path = write_file(landing, rows, row_group=max(rows // 10, 1))
        size_mib = path.stat().st_size / 2**20
        runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
        for _ in range(repeats):
            for mode in MODES:
                runs[mode].append(_child(mode, landing, home))
        # memory slope: the same row groups, a quarter of the rows (bounded = flat)
        quarter = Path(tmp) / "quarter"
        write_file(quarter, rows // 4, row_group=max(rows // 10, 1))
        slope = {m: _child(m, quarter, home)["peak_added_mib"] for m in ("read", "scan")}
    modes = {mode: _summary(found, rows) for mode, found in runs.items()}
    for found in modes.values():
        found["time_vs_pandas"] = round(found["seconds"] / modes["pandas"]["seconds"], 2)
    in_memory = rows * (len(FEATURES) * 4 + 8) / 2**20
    result = {
        "rows": rows,
        "columns": len(FEATURES) + 1,
        "row_groups": 10,
        "file_mib": round(size_mib, 1),
        "in_memory_mib": round(in_memory, 1),
        "repeats": repeats,
        "modes": modes,
        "peak_added_mib_at_quarter_rows": slope,
        "platform": f"{platform.python_version()} on {platform.machine()}, {os.cpu_count()} cores",
        "load_average": round(os.getloadavg()[0], 1) if hasattr(os, "getloadavg") else None,
        "arrow_pool": os.environ.get("ARROW_DEFAULT_MEMORY_POOL", "pyarrow's default"),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "data_plane_quick" if quick else "data_plane"
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown(result) + "\n")
    return result


LABELS = {
    "pandas": "`pandas.read_parquet` (baseline)",
    "read": "`read_batch` (ingest)",
    "read+validate": "`read_batch` + `validate_batch` (GX suite)",
    "scan": "`scan_integrity` (chunked, same verdict)",
}


def markdown(result: dict[str, Any]) -> str:
    head = (
        f"{result['rows']:,} rows × {result['columns']} columns (64 float32 + int64 label, "
        f"{result['row_groups']} row groups, {result['file_mib']} MiB on disk, "
        f"{result['in_memory_mib']} MiB as arrays); median of {result['repeats']} runs, one "
        f"fresh process each; {result['platform']}, load average {result['load_average']}, "
        f"Arrow memory pool {result.get('arrow_pool')}\n\n"
        "| path | seconds | rows/s | × pandas time | peak RSS added (MiB) | verdict |\n"
        "|---|---|---|---|---|---|\n"
    )
    lines = []
    for mode, found in result["modes"].items():
        verdict = "/".join(
            "pass" if v == "True" else "fail" if v == "False" else "—" for v in found["verdicts"]
        )
        lines.append(
            f"| {LABELS[mode]} | {found['seconds']:.2f} | {found['rows_per_second']:,} | "
            f"{found['time_vs_pandas']:.2f} | {found['peak_added_mib']:.0f} | {verdict} |"
        )
    slope = result["peak_added_mib_at_quarter_rows"]
    tail = (
        f"\n\nPeak RSS added at a quarter of the rows ({result['rows'] // 4:,}, same row groups, "
        f"one run): `read_batch` {slope['read']:.0f} MiB, `scan_integrity` {slope['scan']:.0f} "
        "MiB — memory that does not grow with the rows is bounded by the row group."
    )
    return head + "\n".join(lines) + tail


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100k rows, one run per path")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--measure", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--landing", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--home", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.landing, args.home)))
        return
    print(markdown(run(quick=args.quick, repeats=args.repeats)))


if __name__ == "__main__":
    main()
