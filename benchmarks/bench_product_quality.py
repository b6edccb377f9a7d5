"""Benchmark: continual-learning quality measured through the product, vs plain-PyTorch bounds.

Run: `python -m benchmarks.bench_product_quality` (validation split, weekly-replay, 3 seeds);
options: `--split test` (the final check: never tune on it), `--families rotate gain`,
`--seeds 0 1`, `--cadence daily-lora|monthly-finetune`, `--declare-bounds`, `--quick` (1 seed,
2 tasks, prints only), `--set KEY=VALUE` (repeatable: a config override, as the CLI's `--set`,
for every `evergreen run` and the bounds; a variant of the recipe, recorded in the entry and its
key). Writes `benchmarks/results/product_quality.json` (one entry per split/cadence[/overrides],
earlier entries kept) and `product_quality.md`.

Per sequence (`benchmarks/sequences.py`) and seed, exactly as a new user would: a fresh home and
landing folder, `evergreen init`, then only data keys (+ home, registry.name) set with `--set`, so
the shipped defaults (or the benchmark's `--set` variant) do the rest. Task 0 is landed and
`evergreen run bootstrap` trains the first champion; each later task is landed as a new batch and
`evergreen run <cadence>` processes it.
After every step `models:/<name>@champion` is loaded with `mlflow.pyfunc` and scored on the test
frame of every task seen so far → accuracy matrix R (average accuracy, forgetting:
`continual.metrics`).

Plain-PyTorch bounds on exactly the product's training rows (each batch minus the select and
gate rows the product splits off by row hash, `data_plane.splits`) with the model the config
builds (`continual.models`, `continual.training.train`), seeded and stepped like the product
(a step count is max(`steps`, `epochs` passes over the rows), read from the written config):
- joint: retrained from scratch at each step on every training row seen so far, with the
  product's step budget so far (bootstrap steps + one update's steps per later task) — the bound;
- naive: the bootstrap model fine-tuned on each new batch only (the cadence's steps and lr, no
  EWC, replay or gate) — the forgetting baseline. Its first row is the product's bootstrap.

Recorded per step: the flow's decision (promoted / rejected / quarantined / skipped / error), its
reasons and wall time (the first flow of a process includes the ephemeral Prefect start-up).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import shutil
import sys
import tempfile
import time
import traceback
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from benchmarks.sequences import LABEL, SPLITS, TaskSequence, build_sequence
from continual.metrics import AccuracyMatrix, average_accuracy, forgetting

RESULTS = Path(__file__).resolve().parent / "results" / "product_quality.json"
CADENCES = {
    "weekly-replay": ("weekly", 7),
    "daily-lora": ("daily", 1),
    "monthly-finetune": ("monthly", 28),
}
FIRST_BATCH = date(2026, 1, 5)
MAIN_DECISIONS = ("promoted", "rejected", "quarantined")


def batch_ids(cadence: str, n: int) -> list[str]:
    """Sortable batch ids spaced by the cadence (2026-01-05, 2026-01-12, … for weekly)."""
    days = CADENCES[cadence][1]
    return [(FIRST_BATCH + timedelta(days=days * i)).isoformat() for i in range(n)]


def cli_main():
    """The `evergreen` command's `main` (`evergreen.cli`; `flows.cli` before the move)."""
    import importlib
    import importlib.util

    for name in ("evergreen.cli", "flows.cli"):
        if importlib.util.find_spec(name) is not None:
            return importlib.import_module(name).main
    raise ImportError("cannot find the evergreen CLI module (evergreen.cli or flows.cli)")


def cli(*argv: str) -> tuple[int, str, float, str | None]:
    """`evergreen ARGV…` in this process: (exit code, stdout, seconds, error if it raised)."""
    main = cli_main()
    out, started, error = io.StringIO(), time.perf_counter(), None
    try:
        with contextlib.redirect_stdout(out):
            code = main(list(argv))
    except (ImportError, SyntaxError):
        raise  # the product's code is broken (or mid-edit): nothing would be measured
    except Exception as exc:  # a crashed flow is a result to record, not the end of the run
        code, error = -1, f"{type(exc).__name__}: {exc}"[:800]
        traceback.print_exc(file=sys.stderr)
    return code, out.getvalue(), time.perf_counter() - started, error


def last_json(text: str) -> dict:
    """The last JSON object printed at the start of a line (the CLI's flow outcome)."""
    decoder = json.JSONDecoder()
    starts = [i for i, ch in enumerate(text) if ch == "{" and (i == 0 or text[i - 1] == "\n")]
    for start in reversed(starts):
        with contextlib.suppress(json.JSONDecodeError):
            return decoder.raw_decode(text[start:])[0]
    return {}


def overrides_for(root: Path, name: str, sequence: TaskSequence, declare_bounds: bool) -> list[str]:
    """Only data keys, home and registry.name: the shipped defaults do the rest."""
    features = list(sequence.features)
    sets = [
        f"home={root / 'home'}",
        f"registry.name={name}",
        f"data.landing={root / 'landing'}",
        f"data.features=[{', '.join(features)}]",
        f"data.label={LABEL}",
        f"data.classes={list(sequence.classes)}",
    ]
    if declare_bounds:  # what a user who knows the whole range would declare ([0, top] for pixels)
        values = [t.train[features].to_numpy() for t in sequence.tasks]
        low = min(0.0, float(np.floor(min(v.min() for v in values))))
        top = float(np.ceil(max(v.max() for v in values)))
        bounds = ", ".join(f"{f}: [{low}, {top}]" for f in features)
        sets.append("data.feature_bounds={" + bounds + "}")
    return sets


def land(root: Path, batch_id: str, frame: pd.DataFrame) -> None:
    folder = root / "landing" / batch_id
    folder.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(folder / "part-0.parquet", index=False)
    (folder / "_SUCCESS").touch()  # the producer's last step: the batch has fully arrived


@contextlib.contextmanager
def serving_uri(uri: str):
    """Point MLflow's fluent API at `uri` as the README's serving recipe does, then undo it.

    `mlflow.set_tracking_uri` also exports MLFLOW_TRACKING_URI, which evergreen's config reads
    when `registry.tracking_uri` is null: left set, the next in-process flow (another home)
    would use this store. In a process that has run a flow the registry URI is pinned (the
    product's `fluent_tracking` restores it explicitly), so it is set too.
    """
    import mlflow

    keys = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    saved_env = {k: os.environ.get(k) for k in keys}
    saved = (mlflow.get_tracking_uri(), mlflow.get_registry_uri())
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved[0])
        mlflow.set_registry_uri(saved[1])
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def served_row(cfg, sequence: TaskSequence, seen: int, ref: str = "@champion") -> list[float]:
    """Accuracy of `models:/<name><ref>` (pyfunc, as served) on each seen task's test frame;
    `ref` is "@champion" or "/<version>"."""
    import mlflow

    with serving_uri(cfg.tracking_uri):
        model = mlflow.pyfunc.load_model(f"models:/{cfg.registry.name}{ref}")
    row = []
    for task in sequence.tasks[:seen]:
        predicted = model.predict(task.test[list(sequence.features)])["prediction"]
        predicted = predicted.astype(int).to_numpy()
        row.append(float(np.mean(predicted == task.test[LABEL].to_numpy())))
    return row


def run_product(root: Path, sequence: TaskSequence, cadence: str, sets: list[str], cfg) -> dict:
    """Bootstrap on task 0, then one `evergreen run <cadence>` per later task; score each step."""
    config = str(root / "evergreen.yaml")
    ids = batch_ids(cadence, len(sequence.tasks))
    R, steps = AccuracyMatrix(len(sequence.tasks)), []
    challengers = AccuracyMatrix(len(sequence.tasks))  # each step's registered version
    for i, (task, batch_id) in enumerate(zip(sequence.tasks, ids, strict=True)):
        land(root, batch_id, task.train)
        flow = "bootstrap" if i == 0 else cadence
        code, out, seconds, error = cli("run", flow, "--config", config, *_set_args(sets))
        outcome = last_json(out)
        step = {
            "flow": flow,
            "batch_id": batch_id,
            "exit_code": code,
            "decision": outcome.get("decision", "error"),
            "version": outcome.get("version"),
            "champion": outcome.get("champion"),
            "reasons": outcome.get("reasons", []) + ([error] if error else []),
            "seconds": round(seconds, 2),
        }
        refs = [(R, "@champion")] + (
            [(challengers, f"/{step['version']}")] if step["version"] else []
        )
        for matrix, ref in refs:
            try:
                for j, value in enumerate(served_row(cfg, sequence, i + 1, ref)):
                    matrix.set(i, j, value)
            except Exception as exc:  # no champion (bootstrap failed): the row stays NaN
                step["score_error"] = f"{ref}: {type(exc).__name__}: {exc}"[:800]
                traceback.print_exc(file=sys.stderr)
        steps.append(step)
    code, out, _, _ = cli("status", "--json", "--config", config, *_set_args(sets))
    status = last_json(out) if code == 0 else {}
    keys = ("cadence", "batch_id", "outcome")
    ledger = [{k: e.get(k) for k in keys} for e in status.get("ledger", [])]
    return {"matrix": R.values, "challengers": challengers.values, "steps": steps, "ledger": ledger}


def _set_args(sets: list[str]) -> list[str]:
    return [arg for assignment in sets for arg in ("--set", assignment)]


def training_rows(cfg, sequence: TaskSequence) -> list[pd.DataFrame]:
    """Each batch's rows the product trains on: the batch minus the select and gate rows its
    row-hash split reserves (`data_plane.splits.split_three_way`, as `tasks.validate` calls it)."""
    from data_plane.landing import data_columns
    from data_plane.splits import split_three_way

    columns, data = data_columns(cfg.data), cfg.data
    return [
        split_three_way(
            task.train[columns],
            columns,
            select_fraction=data.select_fraction,
            gate_fraction=data.gate_fraction,
            salt=data.split_salt,
        ).train
        for task in sequence.tasks
    ]


def _tensors(cfg, frame: pd.DataFrame) -> tuple[torch.Tensor, torch.Tensor]:
    index = {c: i for i, c in enumerate(cfg.data.classes)}
    X = torch.from_numpy(frame[cfg.data.features].to_numpy(dtype=np.float32, copy=True))
    y = torch.tensor([index[v] for v in frame[cfg.data.label].tolist()], dtype=torch.long)
    return X, y


def bootstrap_train(cfg):
    """The first champion's training settings (`bootstrap.train`; `bootstrap_train` before)."""
    return cfg.bootstrap.train if hasattr(cfg, "bootstrap") else cfg.bootstrap_train


def _fresh_model(cfg, frame: pd.DataFrame) -> torch.nn.Module:
    """The model the product's bootstrap builds (`tasks.train_bootstrap.new_spec`: sizes from the config,
    standardisation from `frame`), seeded like it."""
    from continual.models import build_model
    from tasks.train_bootstrap import new_spec

    torch.manual_seed(bootstrap_train(cfg).seed)
    return build_model(new_spec(cfg, frame))


def _settings(train_cfg, n_rows: int, steps: int | None = None):
    """The product's rule: at least `steps`, and at least `epochs` passes over `n_rows`."""
    from continual.training import TrainSettings

    return TrainSettings(
        steps=steps or _steps(train_cfg, n_rows),
        batch_size=train_cfg.batch_size,
        lr=train_cfg.lr,
        weight_decay=train_cfg.weight_decay,
        seed=train_cfg.seed,
    )


def _steps(train_cfg, n_rows: int) -> int:
    epochs = getattr(train_cfg, "epochs", 0) or 0  # `epochs` is newer than `steps`
    return max(train_cfg.steps, math.ceil(epochs * n_rows / train_cfg.batch_size))


def run_baselines(cfg, sequence: TaskSequence, cadence: str) -> dict[str, np.ndarray]:
    """Joint (retrained from scratch, product's step budget so far) on the product's training
    rows and on every landed row (`joint_all`: the bound a user compares with, which also
    learns the rows the product holds out to select and gate), and naive fine-tuning."""
    from continual.inference import accuracy
    from continual.training import train

    rows = training_rows(cfg, sequence)
    landed = [task.train for task in sequence.tasks]
    first, update = bootstrap_train(cfg), getattr(cfg, CADENCES[cadence][0]).train
    tests = [_tensors(cfg, task.test) for task in sequence.tasks]
    joint, joint_all, naive = (AccuracyMatrix(len(rows)) for _ in range(3))
    naive_model = None
    budget = 0
    for i, frame in enumerate(rows):
        step_cfg = first if i == 0 else update
        budget += _steps(step_cfg, len(frame))  # the product's steps so far
        for matrix, source in ((joint, rows), (joint_all, landed)):
            seen = pd.concat(source[: i + 1], ignore_index=True)
            model = _fresh_model(cfg, seen)
            train(model, *_tensors(cfg, seen), _settings(first, 0, budget))
            for j, (X, y) in enumerate(tests[: i + 1]):
                matrix.set(i, j, accuracy(model, X, y))
        if naive_model is None:
            naive_model = _fresh_model(cfg, frame)
        train(naive_model, *_tensors(cfg, frame), _settings(step_cfg, len(frame)))
        for j, (X, y) in enumerate(tests[: i + 1]):
            naive.set(i, j, accuracy(naive_model, X, y))
    return {"joint": joint.values, "joint_all": joint_all.values, "naive": naive.values}


def run_sequence(
    family: str,
    seed: int,
    cadence: str,
    n_tasks: int,
    declare_bounds: bool,
    workdir: Path,
    overrides: list[str] | None = None,
) -> dict:
    """One sequence through the product and the two baselines (`overrides`: `--set` values
    after the benchmark's own, for every `evergreen run` and the config the bounds read)."""
    from evergreen.config import load_config

    sequence = build_sequence(family, seed, n_tasks)
    root = Path(tempfile.mkdtemp(prefix=f"pq-{family}-{seed}-", dir=workdir))
    name = f"pq-{family}-s{seed}"
    sets = overrides_for(root, name, sequence, declare_bounds) + list(overrides or [])
    with contextlib.redirect_stdout(io.StringIO()):
        assert cli_main()(["init", "--path", str(root / "evergreen.yaml")]) == 0
    cfg = load_config(root / "evergreen.yaml", sets)
    started = time.perf_counter()
    product = run_product(root, sequence, cadence, sets, cfg)
    product_seconds = time.perf_counter() - started
    started = time.perf_counter()
    bounds = run_baselines(cfg, sequence, cadence)
    matrices = {"product": product["matrix"], **bounds, "challenger": product["challengers"]}
    return {
        "family": family,
        "seed": seed,
        "tasks": [t.name for t in sequence.tasks],
        "home": f"<workdir>/{root.name}",  # where it ran (kept with --keep)
        "steps": product["steps"],
        "ledger": product["ledger"],
        "product_seconds": round(product_seconds, 1),
        "baseline_seconds": round(time.perf_counter() - started, 1),
        "methods": {m: _scores(R) for m, R in matrices.items()},
    }


def _scores(R: np.ndarray) -> dict:
    """Scores after the last step (NaN when nothing was measured then, e.g. no challenger)."""
    T = len(R) - 1
    measured = not np.isnan(R[T]).all()
    return {
        "average_accuracy": average_accuracy(R) if measured else float("nan"),
        "forgetting": forgetting(R) if measured else float("nan"),
        "newest_accuracy": float(R[T, T]),
        "matrix": [[None if np.isnan(v) else round(float(v), 4) for v in row] for row in R],
    }


def _mean_std(values: list[float]) -> dict:
    array = np.array(values, dtype=float)
    array = array[~np.isnan(array)]
    std = float(array.std(ddof=1)) if len(array) > 1 else 0.0
    return {"mean": float(array.mean()) if len(array) else None, "std": std, "n": len(array)}


def summarise(runs: list[dict]) -> dict:
    """Per family: mean ± std over seeds of each method's scores, gap to joint, decisions."""
    summary = {}
    for family in dict.fromkeys(r["family"] for r in runs):
        mine = [r for r in runs if r["family"] == family]
        entry: dict = {"seeds": [r["seed"] for r in mine]}
        for method in ("product", "joint", "joint_all", "naive", "challenger"):
            entry[method] = {
                key: _mean_std([r["methods"][method][key] for r in mine])
                for key in ("average_accuracy", "forgetting", "newest_accuracy")
            }
        entry["gap_to_joint"] = _mean_std(
            [
                r["methods"]["product"]["average_accuracy"]
                - r["methods"]["joint"]["average_accuracy"]
                for r in mine
            ]
        )
        entry["gap_to_joint_all"] = _mean_std(
            [
                r["methods"]["product"]["average_accuracy"]
                - r["methods"]["joint_all"]["average_accuracy"]
                for r in mine
            ]
        )
        updates = [s for r in mine for s in r["steps"] if s["flow"] != "bootstrap"]
        entry["decisions"] = {d: sum(s["decision"] == d for s in updates) for d in _decisions(runs)}
        entry["rejected_by"] = _rejected_by(updates)
        entry["seconds_per_flow"] = _median_seconds([s for r in mine for s in r["steps"]])
        summary[family] = entry
    return summary


def _rejected_by(steps: list[dict]) -> dict[str, int]:
    """How often each gate check said "rejected" (a step may fail several)."""
    names = {"retention": "retention", "new-data": "new data", "cumulative": "forgetting budget"}
    counts: dict[str, int] = {}
    for step in steps:
        if step["decision"] != "rejected":  # a promotion by exchange failed 2b/2c on purpose
            if any("promoted by exchange" in r for r in step["reasons"]):
                counts["promoted by exchange"] = counts.get("promoted by exchange", 0) + 1
            continue
        failed = {r.split(" ")[0] for r in step["reasons"] if r.rstrip(". ").endswith("rejected")}
        for check in failed:
            counts[names.get(check, check)] = counts.get(names.get(check, check), 0) + 1
    return counts


def _median_seconds(steps: list[dict]) -> dict[str, float]:
    """Median wall time of each flow (the first includes the ephemeral Prefect start-up)."""
    flows = dict.fromkeys(s["flow"] for s in steps)
    return {f: float(np.median([s["seconds"] for s in steps if s["flow"] == f])) for f in flows}


def _decisions(runs: list[dict]) -> list[str]:
    seen = {s["decision"] for r in runs for s in r["steps"] if s["flow"] != "bootstrap"}
    return [*MAIN_DECISIONS, *sorted(seen - set(MAIN_DECISIONS))]


def run(
    split: str = "validation",
    families: list[str] | None = None,
    seeds: list[int] | None = None,
    cadence: str = "weekly-replay",
    quick: bool = False,
    declare_bounds: bool = False,
    keep: bool = False,
    overrides: list[str] | None = None,
) -> dict:
    """Run the benchmark; returns the result (written to RESULTS unless quick). `overrides`:
    `KEY=VALUE` config overrides (the CLI's `--set`) — a variant of the shipped recipe."""
    overrides = list(overrides or [])
    malformed = [o for o in overrides if "=" not in o]
    if malformed:
        raise ValueError(f"overrides must be KEY=VALUE: {malformed}")
    chosen = SPLITS[split]
    families = families or list(chosen.families)
    outside = [f for f in families if f not in chosen.families]
    if outside:
        raise ValueError(f"families {outside} are not in the {split} split {chosen.families}")
    seeds = seeds if seeds is not None else list(chosen.seeds)[: 1 if quick else None]
    n_tasks = 2 if quick else 4
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "EVERGREEN_HOME", "EVERGREEN_CONFIG"):
        if os.environ.pop(key, None) is not None:  # each sequence must use its own home
            print(f"ignoring {key} from the environment", file=sys.stderr)
    workdir = Path(tempfile.mkdtemp(prefix="evergreen-product-quality-"))
    os.environ.setdefault("PREFECT_HOME", str(workdir / "prefect"))
    started, code = time.perf_counter(), _code_state()
    partial = workdir.parent / f"{workdir.name}.runs.jsonl"  # survives a kill; removed at the end
    runs = []
    for family in families:
        for seed in seeds:
            print(f"[{time.perf_counter() - started:6.0f}s] {family} seed {seed}…", file=sys.stderr)
            runs.append(
                run_sequence(family, seed, cadence, n_tasks, declare_bounds, workdir, overrides)
            )
            with partial.open("a") as lines:
                lines.write(json.dumps(runs[-1], default=str) + "\n")
    if keep:
        print(f"homes kept under {workdir} (<workdir> in the JSON)", file=sys.stderr)
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    result = {
        "benchmark": "product_quality",
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "split": split,
        "cadence": cadence,
        "declare_bounds": declare_bounds,
        **({"overrides": overrides} if overrides else {}),  # a variant, not the shipped recipe
        "quick": quick,
        "families": families,
        "seeds": seeds,
        "n_tasks": n_tasks,
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, **code},
        "total_seconds": round(time.perf_counter() - started, 1),
        "summary": summarise(runs),
        "runs": runs,
    }
    if not quick:
        save(result)
    partial.unlink(missing_ok=True)  # the result holds every run now
    return result


def _code_state() -> dict:
    """The commit measured and how many files differed from it (the tree may be mid-change)."""
    import subprocess

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], capture_output=True, text=True, cwd=RESULTS.parent)
        return done.stdout.strip()

    return {
        "commit": git("rev-parse", "HEAD"),
        "changed_files": len(git("status", "--porcelain").splitlines()),
    }


def result_key(result: dict) -> str:
    """split/cadence[/declared-bounds][/families][/seeds:…][/set:overrides] — a run of some
    families or seeds does not replace one of others (each is named only when the run left some
    of the split's out), nor does a variant (`--set`) replace the shipped recipe's entry."""
    key = f"{result['split']}/{result['cadence']}" + (
        "/declared-bounds" if result["declare_bounds"] else ""
    )
    split = SPLITS[result["split"]]
    if set(result["families"]) != set(split.families):
        key += "/" + "+".join(result["families"])
    if list(result["seeds"]) != list(split.seeds):
        key += "/seeds:" + ",".join(str(seed) for seed in result["seeds"])
    if result.get("overrides"):
        key += "/set:" + ",".join(result["overrides"])
    return key


def save(result: dict) -> None:
    """Add (or replace) this split/cadence entry in the JSON; rewrite the Markdown from all."""
    everything = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    everything[result_key(result)] = result
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(everything, indent=2))
    write_markdown(everything)


def write_markdown(everything: dict) -> None:
    """The Markdown page of every saved entry (entries older than a column show "—" there)."""
    RESULTS.with_suffix(".md").write_text(
        "# Continual-learning quality through the product\n\n"
        "Written by `python -m benchmarks.bench_product_quality`; see its docstring.\n\n"
        + "\n\n".join(markdown(r) for r in everything.values())
        + "\n"
    )


def _pm(stat: dict | None, signed: bool = False) -> str:
    if not stat or stat["mean"] is None:
        return "—"
    sign = "+" if signed else ""
    return f"{stat['mean']:{sign}.3f} ± {stat['std']:.3f}"


def markdown(result: dict) -> str:
    """The per-family table (mean ± std over seeds)."""
    s = result["summary"]
    lines = [
        f"## {result_key(result)}: {result['n_tasks']} tasks, seeds {result['seeds']}"
        f"{', declared bounds' if result['declare_bounds'] else ''} "
        f"({result['total_seconds']:.0f} s, {result['machine']['cpus']} CPUs, "
        f"commit {result['machine'].get('commit', '?')[:7]}, finished {result.get('finished', '?')[:16]})",
        "",
        "| sequence | product avg acc | joint (product's rows) | joint (all rows) | naive avg acc"
        " | gap to joint (product's rows) | gap to joint (all rows) | product forgetting | "
        "naive forgetting | product newest | joint newest | "
        "last challenger avg acc | promoted / rejected / quarantined / other | s per update |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for family, e in s.items():
        d = e["decisions"]
        other = sum(v for k, v in d.items() if k not in MAIN_DECISIONS)
        flow_seconds = [v for k, v in e["seconds_per_flow"].items() if k != "bootstrap"]
        lines.append(
            f"| {family} | {_pm(e['product']['average_accuracy'])} | "
            f"{_pm(e['joint']['average_accuracy'])} | "
            f"{_pm(e.get('joint_all', {}).get('average_accuracy'))} | "
            f"{_pm(e['naive']['average_accuracy'])} | {_pm(e['gap_to_joint'], signed=True)} | "
            f"{_pm(e.get('gap_to_joint_all'), signed=True)} | {_pm(e['product']['forgetting'])} | "
            f"{_pm(e['naive']['forgetting'])} | {_pm(e['product']['newest_accuracy'])} | "
            f"{_pm(e['joint']['newest_accuracy'])} | {_pm(e['challenger']['average_accuracy'])} | "
            f"{d['promoted']} / {d['rejected']} / {d['quarantined']} / {other} | "
            f"{np.mean(flow_seconds):.1f} |"
        )
    lines += [
        "",
        "Decisions per update (seed: one letter per later task; P promoted, R rejected, "
        "Q quarantined, S skipped, E error):",
        "",
    ]
    for family in s:
        traces = [
            f"seed {r['seed']}: " + " ".join(_letter(st) for st in r["steps"][1:])
            for r in result["runs"]
            if r["family"] == family
        ]
        blocked = ", ".join(f"{k} {v}×" for k, v in s[family]["rejected_by"].items())
        lines.append(
            f"- {family}: " + "; ".join(traces) + (f" (gate: {blocked})" if blocked else "")
        )
    return "\n".join(lines)


def _letter(step: dict) -> str:
    return {"promoted": "P", "rejected": "R", "quarantined": "Q", "skipped": "S"}.get(
        step["decision"], "E"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", choices=sorted(SPLITS), default="validation")
    parser.add_argument("--families", nargs="+", help="default: every family of the split")
    parser.add_argument("--seeds", nargs="+", type=int, help="default: the split's seeds")
    parser.add_argument("--cadence", choices=sorted(CADENCES), default="weekly-replay")
    parser.add_argument("--quick", action="store_true", help="1 seed, 2 tasks, nothing written")
    parser.add_argument(
        "--declare-bounds",
        action="store_true",
        help="declare data.feature_bounds [min(0, min), max] over the sequence for every feature",
    )
    parser.add_argument("--keep", action="store_true", help="keep the homes (printed)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config override for every `evergreen run` (as the CLI's --set; repeatable); "
        "recorded in the result's entry and key",
    )
    args = parser.parse_args()
    result = run(
        args.split,
        args.families,
        args.seeds,
        args.cadence,
        args.quick,
        args.declare_bounds,
        args.keep,
        args.overrides,
    )
    print(markdown(result))


if __name__ == "__main__":
    main()
