"""Benchmark: continual pre-training of a causal LM through the product, per-domain perplexity.

Run: `python -m benchmarks.bench_causal_lm` (4 domains; writes benchmarks/results/causal_lm.json
and causal_lm.md); `--quick` (2 domains, fewer sentences and steps, prints only; 179 s at load 8);
`--threads N` (torch intra-op threads, default 1: see below); `--keep` keeps the homes.

Domains (`benchmarks.lm_domains`): the module docstrings of four installed packages, in order
torch → sympy → mlflow → scipy; 700 sentences each, 20 % held out by hash (never landed). Model:
a randomly initialised Llama (hidden 64, 2 layers, 4 heads, tied embeddings) with a byte-level
BPE tokenizer of 1024 tokens trained on the landed text of all domains, saved to a local folder.

Each product method runs as a new user would: a fresh home, `evergreen init`, `--set` overrides
(data, model, the same training budget for every section: batch 16, lr 3e-3 — the daily LoRA's
default —, bootstrap 300 steps, each update 150 steps), the gate as shipped. Domain 1 is landed
and `evergreen run bootstrap` trains the first champion; each later domain is landed as a new
batch and `evergreen run <cadence>` processes it. After every step `models:/<name>@champion`
and the step's registered version (the challenger, promoted or not) are loaded with
`mlflow.pyfunc` and score every domain's held-out text (all domains, seen or not) →
log-perplexity matrices.

- naive: `weekly-replay` with `weekly.replay_ratio: 0` and `weekly.ewc_lambda: 0` (and no
  distillation, the default): plain fine-tuning on the new domain through the flow;
- replay: `weekly-replay` with the family's default replay mixing (50 % new / 50 % old text),
  `ewc_lambda: 0` — replay mixing alone;
- replay-20: the same at 80 % new / 20 % old, the family's default before its learning-rate
  schedule (what the schedule alone does);
- replay-ewc: `weekly-replay` as it ships for this family: replay 50 % and online EWC with λ
  chosen from `lambda_grid` [0, 1, 10, 100] on the select rows (one challenger per λ);
- distill: `weekly-replay` with `weekly.distill_weight: 1.0` (T = 2, the default) on top of
  replay mixing, `ewc_lambda: 0` — the knob a user would turn;
- daily-lora: `daily-lora` with its defaults (LoRA r 8 on q_proj/v_proj, replay 20 %);
- joint: plain PyTorch (`continual.training.train`): the same base trained from scratch on
  every domain's product training rows (each batch minus its select and gate rows) with the
  total step budget (bootstrap + one update per later domain) and the bootstrap section's
  learning-rate schedule over the whole run; final row only. joint-constant-lr: the same at a
  constant rate (the reference before the family had a schedule).

Every run uses the family's schedule (`hf-causal-lm`: warm-up 5 %, cosine to 0.1 × lr).
`--packages P1 P2 … [--per-domain N]` runs another domain sequence (prints only): the recipe
was chosen on one (`benchmarks.causal_lm_recipe`), never on the reported one.

Threads: on 2 cores shared with other jobs, torch's default of one OpenMP thread per core made
a training step 10–50× slower (threads spinning against each other); one thread is the
default here. Measured wall times are in the JSON and the Markdown.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from benchmarks.bench_product_quality import (
    _code_state,
    batch_ids,
    cli,
    cli_main,
    land,
    last_json,
    serving_uri,
)
from benchmarks.lm_domains import (
    Domain,
    ModelSize,
    build_domains,
    build_tiny_llama,
    corpus_log_perplexity,
    pretrain_tiny_llama,
    scores,
    target_checks,
)
from evergreen.config_families import CAUSAL_LM_DAILY_REPLAY_RATIO, CAUSAL_LM_REPLAY_RATIO

if TYPE_CHECKING:
    from evergreen.config import EvergreenConfig

RESULTS = Path(__file__).resolve().parent / "results" / "causal_lm.json"
METHODS: dict[str, tuple[str, tuple[str, ...]]] = {  # name: (cadence, extra --set overrides)
    "naive": ("weekly-replay", ("weekly.replay_ratio=0", "weekly.ewc_lambda=0")),
    "replay": ("weekly-replay", ("weekly.ewc_lambda=0",)),
    # the family's replay mix before this recipe (80/20), with the learning-rate schedule
    "replay-20": ("weekly-replay", ("weekly.ewc_lambda=0", "weekly.replay_ratio=0.2")),
    "replay-ewc": ("weekly-replay", ()),  # the family's weekly as shipped: λ from the grid
    "distill": ("weekly-replay", ("weekly.ewc_lambda=0", "weekly.distill_weight=1.0")),
    "daily-lora": ("daily-lora", ()),
}


@dataclass(frozen=True)
class Budget:
    """What one run measures: the domains, the text per domain, the steps, the model."""

    packages: tuple[str, ...]
    per_domain: int
    bootstrap_steps: int
    update_steps: int
    batch_size: int = 16
    lr: float = 3e-3
    size: ModelSize = field(default_factory=ModelSize)
    # > 0: each update trains at least this many passes over its new rows at its replay mix
    # (replay-aware step counts, tried and not shipped: docs/CAUSAL_LM.md) instead of
    # `update_steps` steps; `replay_aware_sets` turns them into the product's `epochs`
    update_epochs: float = 0.0
    joint_steps: int = 0  # joint training's budget; 0: bootstrap + one update per later domain
    # > 0: the base is pre-trained on `general_sentences()` for this many steps before domain 1
    # (a general-purpose LM that the sequence continues, as continual pre-training of an LLM
    # does) instead of starting from random weights; joint training starts from it too
    pretrain_steps: int = 0

    def joint_budget(self, domains: int) -> int:
        return self.joint_steps or self.bootstrap_steps + (domains - 1) * self.update_steps


FULL = Budget(("torch", "sympy", "mlflow", "scipy"), 700, 300, 150)
# never in the pre-training corpus: both domain sequences, the project itself, and packages
# whose docstrings are mostly another sequence's (torch's functorch, numpy's f2py)
NOT_PRETRAINED = {
    *FULL.packages, "networkx", "numpy", "transformers", "sqlalchemy", "evergreen", "continual",
    "tasks", "flows", "data_plane", "model_registry", "demo", "benchmarks", "tests",
    "functorch", "torchgen",
}  # fmt: skip
QUICK = Budget(("torch", "sympy"), 300, 60, 40)


def overrides(root: Path, name: str, model_dir: Path, budget: Budget) -> list[str]:
    """The data and model keys, home, registry and one training budget for every section."""
    steps = {"bootstrap": budget.bootstrap_steps, "weekly": budget.update_steps}
    steps["daily"] = budget.update_steps
    epochs = dict.fromkeys(steps, 0.0)
    if budget.update_epochs:  # `epochs` decide each update's steps (`replay_aware_sets`)
        steps["weekly"] = steps["daily"] = 1
        epochs["weekly"] = epochs["daily"] = budget.update_epochs
    return [
        f"home={root / 'home'}",
        f"registry.name={name}",
        f"registry.experiment={name}",
        f"data.landing={root / 'landing'}",
        "data.text=text",
        "data.features=[]",
        "data.classes=[]",
        "model.family=hf-causal-lm",
        f"model.hf_path={model_dir}",
        f"model.max_length={budget.size.max_length}",
        # the family's default replay mix, set explicitly: the file `evergreen init` writes
        # pins the classifiers' 0.75 for both sections, which the family default does not override
        f"weekly.replay_ratio={CAUSAL_LM_REPLAY_RATIO}",
        f"daily.replay_ratio={CAUSAL_LM_DAILY_REPLAY_RATIO}",
        *(
            f"{section}.train={{steps: {n}, epochs: {epochs[section]}, "
            f"batch_size: {budget.batch_size}, "
            f"lr: {budget.lr}}}"
            for section, n in steps.items()
        ),
    ]


def replay_aware_sets(cfg: EvergreenConfig, budget: Budget) -> list[str]:
    """`budget.update_epochs` passes over an update's new rows at its section's replay mix, as
    the product's `epochs`: a batch of B rows at `replay_ratio` r holds
    k = B − round(r·B) new rows (`evergreen.config_families.new_rows_per_step`), so the product's
    ⌈epochs · n / B⌉ steps equal ⌈update_epochs · n / k⌉ when epochs = update_epochs · B / k
    (n: the update's new rows, carried ones included; up to float rounding). Assumes every
    update replays: the buffer holds the bootstrap's rows from the first update on. Empty
    without `update_epochs`."""
    from evergreen.config_families import new_rows_per_step

    if not budget.update_epochs:
        return []
    sets = []
    for name in ("weekly", "daily"):
        section = getattr(cfg, name)
        B = section.train.batch_size
        k = new_rows_per_step(B, section.replay_ratio)
        sets.append(f"{name}.train.epochs={budget.update_epochs * B / k}")
    return sets


def registry_name(method: str) -> str:
    """The registered model (and experiment) of a method's home."""
    return f"lm-{method}"


def set_args(sets: list[str]) -> list[str]:
    return [arg for assignment in sets for arg in ("--set", assignment)]


def predicted_tokens(model_dir: Path, max_length: int, texts: list[str]) -> np.ndarray:
    """Tokens each row predicts as the served model scores it (non-pad tokens − 1)."""
    from continual.text import encode_texts, load_tokenizer

    tokenizer = load_tokenizer(str(model_dir))
    ids = encode_texts(tokenizer, texts, max_length)
    counts = ((ids != tokenizer.pad_token_id).sum(dim=1) - 1).clamp(min=0)
    return np.asarray(counts.numpy(), dtype=np.int64)


def served_log_ppl(
    cfg: EvergreenConfig, ref: str, domains: list[Domain], counts: list[np.ndarray]
) -> list[float]:
    """Log-perplexity of `models:/<name><ref>` (pyfunc, as served) on each domain's held-out
    text; `ref` is "@champion" or "/<version>"."""
    import mlflow

    with serving_uri(cfg.tracking_uri):
        model = mlflow.pyfunc.load_model(f"models:/{cfg.registry.name}{ref}")
    row = []
    for domain, n in zip(domains, counts, strict=True):
        out = model.predict(pd.DataFrame({"text": domain.held_out}))
        row.append(corpus_log_perplexity(out["log_likelihood"].to_numpy(), n))
    return row


def _step(
    flow: str, batch_id: str, code: int, out: str, seconds: float, error: str | None
) -> dict[str, Any]:
    outcome = last_json(out)
    return {
        "flow": flow,
        "batch_id": batch_id,
        "exit_code": code,
        "decision": outcome.get("decision", "error"),
        "version": outcome.get("version"),
        "champion": outcome.get("champion"),
        "reasons": outcome.get("reasons", []) + ([error] if error else []),
        "seconds": round(seconds, 2),
    }


def run_method(
    method: str,
    domains: list[Domain],
    counts: list[np.ndarray],
    model_dir: Path,
    budget: Budget,
    workdir: Path,
) -> dict[str, Any]:
    """Bootstrap on domain 1, one `evergreen run <cadence>` per later domain; score each step's
    champion and challenger on every domain's held-out text."""
    from evergreen.config import load_config

    cadence, extra = METHODS[method]
    root = workdir / method
    root.mkdir(parents=True)
    sets = overrides(root, registry_name(method), model_dir, budget) + list(extra)
    config = str(root / "evergreen.yaml")
    with contextlib.redirect_stdout(io.StringIO()):
        assert cli_main()(["init", "--path", config]) == 0  # type: ignore[no-untyped-call]
    cfg = load_config(config, sets)
    if budget.update_epochs:
        sets += replay_aware_sets(cfg, budget)
        cfg = load_config(config, sets)
    n = len(domains)
    champion, challenger = np.full((n, n), np.nan), np.full((n, n), np.nan)
    steps: list[dict[str, Any]] = []
    started = time.perf_counter()
    for i, (domain, batch_id) in enumerate(zip(domains, batch_ids(cadence, n), strict=True)):
        land(root, batch_id, pd.DataFrame({"text": domain.train}))
        flow = "bootstrap" if i == 0 else cadence
        step = _step(flow, batch_id, *cli("run", flow, "--config", config, *set_args(sets)))
        refs = [(champion, "@champion")]
        if step["version"] and step["version"] != step["champion"]:
            refs.append((challenger, f"/{step['version']}"))
        for matrix, ref in refs:
            try:
                matrix[i] = served_log_ppl(cfg, ref, domains, counts)
            except Exception as exc:  # no champion (bootstrap failed): the row stays NaN
                step["score_error"] = f"{ref}: {type(exc).__name__}: {exc}"[:800]
                traceback.print_exc(file=sys.stderr)
        if step["version"] and step["version"] == step["champion"]:
            challenger[i] = champion[i]  # the step's version is the champion: scored once
        steps.append(step)
        print(f"  {method} {flow}: {step['decision']} ({step['seconds']:.0f} s)", file=sys.stderr)
    return {
        "cadence": cadence,
        "overrides": list(extra),
        "steps": steps,
        "champion": champion,
        "challenger": challenger,
        "seconds": round(time.perf_counter() - started, 1),
    }


def product_training_rows(cfg: EvergreenConfig, texts: list[str]) -> list[str]:
    """The rows of a landed batch the product trains on: minus the select and gate rows its
    row-hash split reserves (`data_plane.splits.split_three_way`, as `tasks.validate` calls it
    on the frame `read_batch` returns, placeholder label included)."""
    from data_plane.landing import data_columns
    from data_plane.splits import split_three_way

    frame = pd.DataFrame({cfg.data.text: texts, cfg.data.label: cfg.data.classes[0]})
    split = split_three_way(
        frame,
        data_columns(cfg.data),
        select_fraction=cfg.data.select_fraction,
        gate_fraction=cfg.data.gate_fraction,
        salt=cfg.data.split_salt,
    )
    return [str(t) for t in split.train[cfg.data.text]]


def run_joint(
    cfg: EvergreenConfig,
    domains: list[Domain],
    counts: list[np.ndarray],
    model_dir: Path,
    budget: Budget,
    schedule_from_config: bool = True,
) -> dict[str, Any]:
    """The base trained from scratch on every domain's training rows, total step budget, with
    the family's bootstrap learning-rate schedule (warm-up and decay over the whole run), or
    with a constant learning rate (`schedule_from_config` False: the recipe before it had one)."""
    from continual.causal_lm import HFCausalLM, token_log_likelihood
    from continual.training import TrainSettings, train
    from evergreen.config import TrainConfig

    started = time.perf_counter()
    model = HFCausalLM(model_dir, max_length=budget.size.max_length)
    texts = [t for d in domains for t in product_training_rows(cfg, d.train)]
    X = model.tokenize(texts)
    total = budget.joint_budget(len(domains))
    schedule = cfg.bootstrap.train if schedule_from_config else TrainConfig(steps=total)
    settings = TrainSettings(
        steps=total,
        batch_size=budget.batch_size,
        lr=budget.lr,
        seed=0,
        lr_schedule=schedule.lr_schedule,
        warmup_steps=round(schedule.warmup_fraction * total),
        min_lr_ratio=schedule.min_lr_ratio,
    )
    result = train(model, X, torch.zeros(len(X), dtype=torch.long), settings, device="cpu")
    L = np.full((len(domains), len(domains)), np.nan)
    for j, (domain, n) in enumerate(zip(domains, counts, strict=True)):
        ll = token_log_likelihood(model, model.tokenize(domain.held_out))
        L[-1, j] = corpus_log_perplexity(ll, n)
    return {
        "champion": L,
        "rows": len(texts),
        "train_steps": result.steps,
        "seconds": round(time.perf_counter() - started, 1),
    }


def run(
    budget: Budget = FULL,
    quick: bool = False,
    threads: int = 1,
    keep: bool = False,
    methods: tuple[str, ...] = tuple(METHODS),
) -> dict[str, Any]:
    """Run `methods` (default: every method) on the domain sequence with `threads` torch
    threads; returns the result (saved unless quick)."""
    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _run(budget, quick, keep, methods)
    finally:
        torch.set_num_threads(threads_before)  # `benchmarks.run` goes on with other benchmarks


def _run(budget: Budget, quick: bool, keep: bool, methods: tuple[str, ...]) -> dict[str, Any]:
    from evergreen.config import load_config

    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "EVERGREEN_HOME", "EVERGREEN_CONFIG"):
        if os.environ.pop(key, None) is not None:  # each method must use its own home
            print(f"ignoring {key} from the environment", file=sys.stderr)
    workdir = Path(tempfile.mkdtemp(prefix="evergreen-causal-lm-"))
    os.environ.setdefault("PREFECT_HOME", str(workdir / "prefect"))
    started, code = time.perf_counter(), _code_state()
    domains = build_domains(budget.packages, budget.per_domain)
    model_dir = base_model(workdir / "tiny-llama", domains, budget)
    counts = [predicted_tokens(model_dir, budget.size.max_length, d.held_out) for d in domains]
    runs = {}
    for method in methods:
        print(f"[{time.perf_counter() - started:5.0f}s] {method}…", file=sys.stderr)
        runs[method] = run_method(method, domains, counts, model_dir, budget, workdir)
    cfg = load_config(
        workdir / methods[0] / "evergreen.yaml", overrides(workdir, "x", model_dir, budget)
    )
    runs["joint"] = run_joint(cfg, domains, counts, model_dir, budget)
    if set(methods) == set(METHODS):
        runs["joint-constant-lr"] = run_joint(cfg, domains, counts, model_dir, budget, False)
    if keep:
        print(f"homes kept under {workdir}", file=sys.stderr)
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    result = _result(budget, quick, domains, counts, runs, code)
    result["total_seconds"] = round(time.perf_counter() - started, 1)
    if not quick:
        path = results_path(budget)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2))
        path.with_suffix(".md").write_text(markdown(result) + "\n")
    return result


def base_model(directory: Path, domains: list[Domain], budget: Budget) -> Path:
    """The tiny Llama every method (joint training included) starts from: random weights with a
    tokenizer trained on the landed text, or (`budget.pretrain_steps`) pre-trained on other
    packages' text, its tokenizer trained on that text and the landed text."""
    landed = [t for d in domains for t in d.train]
    if not budget.pretrain_steps:
        return build_tiny_llama(directory, landed, budget.size)
    seen = set(landed) | {t for d in domains for t in d.held_out}
    general = [t for t in general_sentences() if t not in seen]
    build_tiny_llama(directory, general + landed, budget.size)
    print(
        f"pre-training on {len(general)} sentences, {budget.pretrain_steps} steps", file=sys.stderr
    )
    pretrain_tiny_llama(
        directory,
        general,
        budget.pretrain_steps,
        budget.size.max_length,
        batch_size=budget.batch_size,
        lr=budget.lr,
    )
    return directory


def general_sentences() -> list[str]:
    """The pre-training corpus: the module-docstring sentences of every installed package
    outside `NOT_PRETRAINED`, in package-name order (deterministic for one environment)."""
    import pkgutil

    from demo.text_timeline import package_sentences

    names = sorted(
        {m.name for m in pkgutil.iter_modules() if m.ispkg and not m.name.startswith("_")}
        - NOT_PRETRAINED
    )
    sentences: list[str] = []
    for name in names:
        try:
            sentences += package_sentences(name)
        except (ModuleNotFoundError, OSError, ValueError):
            continue
    return list(dict.fromkeys(sentences))


def results_path(budget: Budget) -> Path:
    """causal_lm.json, or causal_lm_pretrained.json for a pre-trained base."""
    return RESULTS.with_name("causal_lm_pretrained.json") if budget.pretrain_steps else RESULTS


def targets(methods: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """The issue's targets on the methods' last challengers (each method's own last update,
    whether the gate shipped it or not) against joint training; None without replay or naive."""
    if "replay" not in methods or "naive" not in methods:
        return None
    return target_checks(
        methods["replay"]["challenger_scores"],
        methods["joint"]["scores"],
        methods["naive"]["challenger_scores"],
    )


def _matrix(L: np.ndarray) -> list[list[float | None]]:
    return [[None if np.isnan(v) else round(float(v), 4) for v in row] for row in L]


def _result(
    budget: Budget,
    quick: bool,
    domains: list[Domain],
    counts: list[np.ndarray],
    runs: dict[str, dict[str, Any]],
    code: dict[str, Any],
) -> dict[str, Any]:
    methods: dict[str, dict[str, Any]] = {}
    for name, r in runs.items():
        entry = {k: v for k, v in r.items() if k not in ("champion", "challenger")}
        entry["log_ppl"] = _matrix(r["champion"])
        entry["scores"] = scores(r["champion"])
        if "challenger" in r:
            entry["challenger_log_ppl"] = _matrix(r["challenger"])
            entry["challenger_scores"] = scores(r["challenger"])
        methods[name] = entry
    return {
        "benchmark": "causal_lm",
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "quick": quick,
        "budget": asdict(budget),
        "domains": [
            {
                "name": d.name,
                "landed": len(d.train),
                "held_out": len(d.held_out),
                "tokens": int(n.sum()),
            }
            for d, n in zip(domains, counts, strict=True)
        ],
        "machine": {
            "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            **code,
        },
        "methods": methods,
        "targets": targets(methods),
    }


def _ppl(value: float | None) -> str:
    return "—" if value is None or np.isnan(value) else f"{value:.1f}"


def _decisions(steps: list[dict[str, Any]]) -> str:
    letters = {"promoted": "P", "rejected": "R", "quarantined": "Q", "skipped": "S"}
    return " ".join(letters.get(s["decision"], "E") for s in steps[1:]) or "—"


def _score_row(label: str, s: dict[str, Any], decisions: str, seconds: float) -> str:
    lost = s["forgetting_nats"]
    return (
        f"| {label} | {_ppl(s['average_ppl'])} | {_ppl(s['old_ppl'])} | {_ppl(s['new_ppl'])} | "
        f"{'—' if np.isnan(lost) else f'{lost:+.3f}'} | {decisions} | "
        f"{f'{seconds:.0f}' if seconds else ''} |"
    )


def _matrix_table(
    title: str, L: list[list[float | None]], names: list[str], steps: list[dict[str, Any]]
) -> list[str]:
    lines = [title, "", "| after | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for k, row in enumerate(L):
        if all(v is None for v in row):
            continue  # joint training has only its final row
        step = f" ({steps[k]['flow']}: {steps[k]['decision']})" if steps else ""
        cells = " | ".join(_ppl(None if v is None else float(np.exp(v))) for v in row)
        lines.append(f"| {k + 1}. {names[k]}{step} | {cells} |")
    return [*lines, ""]


def _base(b: dict[str, Any]) -> str:
    if b.get("pretrain_steps"):
        return f"base pre-trained {b['pretrain_steps']} steps on other packages' text"
    return "random initial weights"


def _update_budget(b: dict[str, Any]) -> str:
    if b.get("update_epochs"):
        return f"{b['update_epochs']:g} passes over the new rows per update at its replay mix"
    return f"{b['update_steps']} per update"


def markdown(result: dict[str, Any]) -> str:
    """The headline table, the per-step perplexity matrices and the gate's decisions."""
    names = [d["name"] for d in result["domains"]]
    methods, b = result["methods"], result["budget"]
    lines = [
        f"## Causal LM continual pre-training: {' → '.join(names)} "
        f"({result['total_seconds']:.0f} s on {result['machine']['cpus']} CPUs, "
        f"{result['machine']['threads']} torch thread(s), commit "
        f"{result['machine']['commit'][:7]}{', quick' if result['quick'] else ''})",
        "",
        f"Held-out perplexity after the last domain (geometric mean over domains; tiny Llama "
        f"hidden {b['size']['hidden']}, {b['size']['layers']} layers, BPE "
        f"{b['size']['vocab']}, {_base(b)}; bootstrap {b['bootstrap_steps']} steps, "
        f"{_update_budget(b)}, batch {b['batch_size']}, lr {b['lr']:g}). "
        "Forgetting: mean log-perplexity increase on the earlier domains since their best "
        "(nats). Decisions of the gate as shipped, one letter per update.",
        "",
        "| method | all domains | earlier domains | newest domain | forgetting (nats) "
        "| decisions | s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, m in methods.items():
        steps = m.get("steps", [])
        lines.append(_score_row(name, m["scores"], _decisions(steps), m["seconds"]))
        if "challenger_scores" in m and any(s["decision"] != "promoted" for s in steps[1:]):
            lines.append(_score_row(f"{name}, last challenger", m["challenger_scores"], "", 0))
    t = result["targets"]
    lines += (
        []
        if t is None
        else [
            "",
            f"Targets (issue 9), on the last challengers: replay's earlier-domain perplexity vs joint "
            f"{t['replay_old_vs_joint']:+.1%} (≤ {t['margin']:.0%}: "
            f"{'met' if t['old_within_margin'] else 'not met'}); replay's newest-domain "
            f"perplexity vs naive fine-tuning {t['replay_new_vs_naive']:+.1%} "
            f"(≤ {t['margin']:.0%}: {'met' if t['new_within_margin'] else 'not met'}).",
        ]
    )
    lines.append("")
    for name, m in methods.items():
        steps = m.get("steps", [])
        title = f"### {name}: champion's perplexity (rows: after domain k; columns: domain j)"
        lines += _matrix_table(title, m["log_ppl"], names, steps)
        if "challenger_log_ppl" in m and any(s["decision"] != "promoted" for s in steps[1:]):
            lines += _matrix_table(
                f"### {name}: each step's challenger", m["challenger_log_ppl"], names, steps
            )
    lines += ["### Gate reasons of the rejected updates", ""]
    for name, m in methods.items():
        for s in m.get("steps", [])[1:]:
            if s["decision"] != "promoted":
                failed = [r for r in s["reasons"] if "rejected" in r or "error" in r.lower()]
                lines.append(
                    f"- {name}, {s['batch_id']}: " + " ".join(failed or s["reasons"])[:400]
                )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 domains, small: prints only")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--keep", action="store_true", help="keep the homes (printed)")
    parser.add_argument(
        "--packages", nargs="+", help="the domain sequence's packages (default: the reported one)"
    )
    parser.add_argument("--per-domain", type=int, help="sentences per domain (default 700)")
    parser.add_argument(
        "--methods", nargs="+", choices=list(METHODS), help="a subset (prints only)"
    )
    parser.add_argument(
        "--update-epochs",
        type=float,
        help="each update: at least this many passes over its new rows at its replay mix "
        "instead of a fixed step count (prints only)",
    )
    parser.add_argument("--joint-steps", type=int, help="joint training's budget (prints only)")
    parser.add_argument(
        "--pretrain-steps",
        type=int,
        default=0,
        help="pre-train the base on other packages' text for this many steps first "
        "(writes causal_lm_pretrained.json)",
    )
    args = parser.parse_args()
    budget = replace(QUICK if args.quick else FULL, pretrain_steps=args.pretrain_steps)
    if args.packages or args.per_domain:  # a validation sequence: prints only, as --quick
        budget = replace(
            budget,
            packages=tuple(args.packages or budget.packages),
            per_domain=args.per_domain or budget.per_domain,
        )
        args.quick = True
    if args.update_epochs or args.joint_steps or args.methods:  # a variant: prints only
        budget = replace(
            budget, update_epochs=args.update_epochs or 0.0, joint_steps=args.joint_steps or 0
        )
        args.quick = True
    methods = tuple(args.methods or METHODS)
    print(markdown(run(budget, args.quick, args.threads, args.keep, methods)))


if __name__ == "__main__":
    main()
