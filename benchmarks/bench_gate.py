"""Benchmark: operating characteristics of the promotion gate: the product's rule, the per-step
tests alone, and the old rule.

Run: `python -m benchmarks.bench_gate` (`--quick` for a smoke run). Prints Markdown tables and
writes `benchmarks/results/gate.json` and `benchmarks/results/gate.md`.

Paired correctness with KNOWN true effects is simulated (`continual.gate_power`): champion
accuracy 0.80 on new data and 0.90 on retention, churn d (the discordance of a successor with no
net effect; a true effect δ adds |δ|, so discordance = d + |δ|), and P(promote) is measured over
many trials for a grid of retention effect × new-data effect × n_new × n_retention × d. Rules:

- "product": `continual.gating.decide` at its defaults WITH `retention_groups` (one batch) and
  `references` = {batch: the champion's observed retention accuracy in that trial}. In the
  product every retention row belongs to a batch with a reference, so this is the rule applied;
  reference = current champion is its first-step (most lenient) situation.
- "new": `decide` at its defaults without references: the per-step tests alone.
- "old": the gate before non-inferiority, reimplemented here as the baseline: per set, reject iff
  (diff < −tol and two-sided McNemar p < 0.05) or the two-sided 95% Newcombe interval lies below
  −tol, with its tolerances 1 pt (new data) and 2 pts (retention).

Targets (from the issue): A = P(promote | true retention loss ≥ tolerance + 1 pt) ≤ 5 %, and
B = P(promote | +5 pts on new data, retention unchanged, n_new ≥ 200, n_retention ≥ 500) ≥ 80 %.
Also reported: P(promote) of a challenger that certainly loses 2, 3 or 4 pts of retention (true
effect, and an exactly realised loss), and a chain of promotions that each lose 1 pt of
retention: per-step gates pass every step, the fixed-reference forgetting budget stops the
accumulation.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
from scipy import special

from continual.gate_policy import GatePolicy
from continual.gate_power import (
    Scenario,
    Trial,
    exact_paired_correctness,
    gate_rule,
    paired_correctness,
    promotion_rates,
    successor,
)
from continual.gating import decide
from continual.paired_tests import newcombe_paired_ci

RESULTS = Path(__file__).resolve().parent / "results" / "gate.json"
RESULTS_MD = RESULTS.with_suffix(".md")
OLD_NEW_TOLERANCE, OLD_RETENTION_TOLERANCE, OLD_ALPHA = 0.01, 0.02, 0.05

RETENTION_EFFECTS = (0.0, -0.01, -0.02, -0.03, -0.04, -0.05, -0.06, -0.08)
NEW_EFFECTS = (0.0, 0.02, 0.05)
N_NEW = (50, 200, 1000)
N_RETENTION = (200, 500, 2000)
CHURNS = (0.03, 0.06, 0.10)
RULES = ("product", "new", "old")
CERTAIN_LOSSES = (0.02, 0.03, 0.04)  # the certain-loss table: n_new = 200, new data +5 pts
CERTAIN_N_RETENTION = (200, 500, 2000)
CERTAIN_CHURNS = (0.03, 0.06)


def _old_set_passes(champion: np.ndarray, challenger: np.ndarray, tolerance: float) -> bool:
    """The old per-set rule: reject iff (beyond tolerance and p < α) or ci_high < −tolerance."""
    n = champion.size
    b = int(np.count_nonzero(champion & ~challenger))
    c = int(np.count_nonzero(~champion & challenger))
    both = int(np.count_nonzero(champion & challenger))
    if b + c == 0:
        p_value = 1.0
    elif b + c < 25:
        p_value = min(1.0, 2.0 * float(special.bdtr(min(b, c), b + c, 0.5)))
    else:
        p_value = float(special.chdtrc(1, max(abs(b - c) - 1, 0) ** 2 / (b + c)))
    _, high = newcombe_paired_ci(both, c, b, n - both - b - c, 1 - OLD_ALPHA)
    diff = (c - b) / n
    return not ((diff < -tolerance and p_value < OLD_ALPHA) or high < -tolerance)


def old_rule(trial: Trial) -> bool:
    """The gate before non-inferiority (baseline)."""
    return _old_set_passes(
        trial.champion_new, trial.challenger_new, OLD_NEW_TOLERANCE
    ) and _old_set_passes(
        trial.champion_retention, trial.challenger_retention, OLD_RETENTION_TOLERANCE
    )


def _rules(policy: GatePolicy) -> dict:
    """The three rules compared (names as in `RULES`)."""
    return {
        "product": gate_rule(policy, references=True),
        "new": gate_rule(policy),
        "old": old_rule,
    }


def grid(policy: GatePolicy, trials: int) -> list[dict]:
    rules = _rules(policy)
    cells = []
    combos = itertools.product(RETENTION_EFFECTS, NEW_EFFECTS, N_NEW, N_RETENTION, CHURNS)
    for seed, (ret, new, n_new, n_ret, churn) in enumerate(combos):
        scenario = Scenario(n_new, n_ret, new, ret, new_churn=churn, retention_churn=churn)
        rates = promotion_rates(scenario, rules, trials=trials, seed=seed)
        cells.append({**asdict(scenario), "churn": churn, **rates})
    return cells


def certain_losses(policy: GatePolicy, trials: int, cells: list[dict]) -> list[dict]:
    """P(promote) of a challenger that certainly loses retention (n_new = 200, new data +5 pts).

    "true": the true retention effect is −loss and the observed loss is sampled (the grid's
    cells); "exact": the observed loss is exactly `loss` in every trial — the challenger breaks
    round(n·d/2) + n·loss of the champion's right rows and fixes round(n·d/2) of its wrong ones.
    """
    rules = _rules(policy)
    rows = []
    combos = itertools.product(CERTAIN_LOSSES, CERTAIN_N_RETENTION, CERTAIN_CHURNS)
    for seed, (loss, n_ret, churn) in enumerate(combos, start=20_000):
        rng = np.random.default_rng(seed)
        champion_new, challenger_new = paired_correctness(
            rng, trials=trials, n=200, accuracy=0.80, discordance=churn + 0.05, effect=0.05
        )
        half = round(n_ret * churn / 2)
        champion_ret, challenger_ret = exact_paired_correctness(
            rng,
            trials=trials,
            n=n_ret,
            accuracy=0.90,
            only_champion=half + round(n_ret * loss),
            only_challenger=half,
        )
        draws = [
            Trial(champion_new[t], challenger_new[t], champion_ret[t], challenger_ret[t])
            for t in range(trials)
        ]
        exact = {name: float(np.mean([rule(d) for d in draws])) for name, rule in rules.items()}
        sampled = _cell(
            cells,
            churn=churn,
            retention_effect=-loss,
            new_effect=0.05,
            n_new=200,
            n_retention=n_ret,
        )
        rows.append(
            {
                "loss": loss,
                "n_new": 200,
                "n_retention": n_ret,
                "churn": churn,
                "true": {name: sampled[name] for name in RULES},
                "exact": exact,
            }
        )
    return rows


def chain(
    policy: GatePolicy, trials: int, *, steps: int = 6, loss: float = 0.01, churn: float = 0.05
) -> list[dict]:
    """P(promote) at step k of a lineage whose every step loses `loss` on the same 500 rows.

    "product" is `decide` with the batch's reference fixed at the first model's measured accuracy
    (the champion that learned the batch), "new" the per-step tests alone.
    """
    rng = np.random.default_rng(10_000)
    n_new, n_ret, accuracy = 200, 500, 0.90
    current = rng.random((trials, n_ret)) < accuracy
    references = current.mean(axis=1)  # measured once, by the model that learned the batch
    groups = np.full(n_ret, "b0")
    per_step = gate_rule(policy)
    rows = []
    for step in range(1, steps + 1):
        true_accuracy = accuracy - (step - 1) * loss
        nxt = successor(
            rng, current, accuracy=true_accuracy, discordance=churn + loss, effect=-loss
        )
        new_old = rng.random((trials, n_new)) < 0.8
        new_next = successor(rng, new_old, accuracy=0.8, discordance=churn + 0.05, effect=0.05)
        counts = dict.fromkeys(RULES, 0)
        for t in range(trials):
            trial = Trial(new_old[t], new_next[t], current[t], nxt[t])
            counts["old"] += old_rule(trial)
            counts["new"] += per_step(trial)
            counts["product"] += decide(
                challenger_new_correct=trial.challenger_new,
                champion_new_correct=trial.champion_new,
                challenger_retention_correct=trial.challenger_retention,
                champion_retention_correct=trial.champion_retention,
                retention_groups=groups,
                references={"b0": float(references[t])},
                policy=policy,
            ).promote
        rows.append({"step": step, "cumulative_loss": step * loss, **_rates(counts, trials)})
        current = nxt
    return rows


def _rates(counts: dict[str, int], trials: int) -> dict[str, float]:
    return {name: count / trials for name, count in counts.items()}


def _worst(cells: list[dict], rule: str, pick) -> dict:
    """The cell where `rule` promotes most (pick = max) or least (pick = min)."""
    cell = pick(cells, key=lambda c: c[rule])
    where = ("retention_effect", "new_effect", "n_new", "n_retention")
    return {"rate": cell[rule], **{k: cell[k] for k in where}}


def targets(cells: list[dict], policy: GatePolicy) -> list[dict]:
    """Per churn and rule: worst P(promote) where each target applies.

    A uses the rule's per-step retention tolerance (product and new: `retention_tolerance`; old:
    its 2 pts); "beyond_budget" is the same worst case over losses ≥ forgetting_budget + 1 pt,
    the margin the product's budget aims at.
    """
    tolerance = {
        "product": policy.retention_tolerance,
        "new": policy.retention_tolerance,
        "old": OLD_RETENTION_TOLERANCE,
    }
    rows = []
    for churn in CHURNS:
        row: dict = {"churn": churn}
        here = [c for c in cells if c["churn"] == churn]
        power = [
            c
            for c in here
            if c["new_effect"] == 0.05
            and c["retention_effect"] == 0.0
            and c["n_new"] >= 200
            and c["n_retention"] >= 500
        ]
        beyond_budget = [
            c for c in here if -c["retention_effect"] >= policy.forgetting_budget + 0.01 - 1e-9
        ]
        for rule in RULES:
            losses = [c for c in here if -c["retention_effect"] >= tolerance[rule] + 0.01 - 1e-9]
            false_promotion = _worst(losses, rule, max)
            weakest = _worst(power, rule, min)
            row[rule] = {
                "tolerance": tolerance[rule],
                "false_promotion_max": false_promotion["rate"],
                "false_promotion_worst": false_promotion,
                "power_min": weakest["rate"],
                "power_worst": weakest,
                "false_promotion_max_beyond_budget": _worst(beyond_budget, rule, max)["rate"],
                "met": false_promotion["rate"] <= 0.05 and weakest["rate"] >= 0.80,
            }
        rows.append(row)
    return rows


def run(quick: bool = False) -> dict:
    policy = GatePolicy()
    trials = 150 if quick else 1000
    started = time.perf_counter()
    cells = grid(policy, trials)
    result = {
        "benchmark": "gate",
        "quick": quick,
        "trials": trials,
        "policy": asdict(policy),
        "rules": {
            "product": "decide at the defaults, one retention batch whose reference is the "
            "champion's observed retention accuracy in the trial",
            "new": "decide at the defaults, no references (per-step tests only)",
            "old": "the old rule (baseline)",
        },
        "old_rule": {
            "new_data_tolerance": OLD_NEW_TOLERANCE,
            "retention_tolerance": OLD_RETENTION_TOLERANCE,
            "alpha": OLD_ALPHA,
        },
        "grid": cells,
        "targets": targets(cells, policy),
        "certain_losses": certain_losses(policy, trials, cells),
        "chain": chain(policy, trials),
    }
    result["seconds"] = time.perf_counter() - started
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2))
    RESULTS_MD.write_text(markdown(result) + "\n")
    return result


def _cell(cells: list[dict], **where) -> dict:
    return next(c for c in cells if all(abs(c[k] - v) < 1e-12 for k, v in where.items()))


def _pct(value: float) -> str:
    return f"{value * 100:.1f}%"


def _verdict(met: bool) -> str:
    return "met" if met else "**NOT met**"


def markdown(result: dict) -> str:
    cells, policy = result["grid"], result["policy"]
    tolerance, budget = policy["retention_tolerance"], policy["forgetting_budget"]
    lines = [
        f"P(promote) over {result['trials']} seeded trials per cell. product = `decide` at its "
        f"defaults (one-sided {policy['confidence']:g}, tolerances new "
        f"{policy['new_data_tolerance'] * 100:g} / retention {tolerance * 100:g} pts, forgetting "
        f"budget {budget * 100:g} pts) with one retention batch whose reference is the champion's "
        "observed retention accuracy (the first step after the batch was learned); new = the "
        "same without references (per-step tests only); old = tolerances 1 / 2 pts, reject only "
        "if beyond tolerance AND significant (or whole CI beyond).",
        "",
        "Targets: A = worst P(promote | true retention loss ≥ tolerance + 1 pt, i.e. "
        f"≥ {(tolerance + 0.01) * 100:g} pts for product and new, "
        f"≥ {(OLD_RETENTION_TOLERANCE + 0.01) * 100:g} pts for old) over the whole grid (≤ 5%); "
        "B = worst P(promote | +5 pts on new data, retention unchanged, n_new ≥ 200, "
        "n_retention ≥ 500) (≥ 80%). A′ = worst P(promote | true retention loss ≥ budget + 1 pt "
        f"= {(budget + 0.01) * 100:g} pts, i.e. the grid's losses of "
        f"{-max(e for e in RETENTION_EFFECTS if -e >= budget + 0.01 - 1e-9) * 100:g} pts or more), "
        "for reference only.",
        "",
        "| churn d | product A | product A′ | product B | product | new A | new A′ | new B | new "
        "| old A | old A′ | old B | old |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["targets"]:
        parts = [f"{row['churn']:.2f}"]
        for rule in RULES:
            r = row[rule]
            parts += [
                _pct(r["false_promotion_max"]),
                _pct(r["false_promotion_max_beyond_budget"]),
                _pct(r["power_min"]),
                _verdict(r["met"]),
            ]
        lines.append("| " + " | ".join(parts) + " |")
    lines += [
        "",
        *_certain_table(result, "true"),
        "",
        *_certain_table(result, "exact"),
        "",
        *_retention_table(cells),
        "",
        *_new_data_table(cells),
        "",
        *_chain_table(result),
    ]
    return "\n".join(lines)


def _triple(values: dict) -> str:
    return " / ".join(f"{values[rule]:.2f}" for rule in RULES)


def _certain_table(result: dict, kind: str) -> list[str]:
    intro = {
        "true": "TRUE retention effect −loss (observed loss sampled)",
        "exact": "observed retention loss EXACTLY = loss in every trial",
    }[kind]
    header = " | ".join(f"−{loss * 100:g} pts" for loss in CERTAIN_LOSSES)
    lines = [
        f"P(promote) product / new / old of a challenger that certainly loses retention, {intro} "
        "(new data +5 pts, n_new = 200):",
        "",
        f"| n_retention | churn d | {header} |",
        "|---|---|" + "---|" * len(CERTAIN_LOSSES),
    ]
    rows = result["certain_losses"]
    for n_ret, churn in itertools.product(CERTAIN_N_RETENTION, CERTAIN_CHURNS):
        rates = [
            _triple(
                next(
                    r[kind]
                    for r in rows
                    if r["n_retention"] == n_ret
                    and abs(r["churn"] - churn) < 1e-12
                    and abs(r["loss"] - loss) < 1e-12
                )
            )
            for loss in CERTAIN_LOSSES
        ]
        lines.append(f"| {n_ret} | {churn:.2f} | {' | '.join(rates)} |")
    return lines


def _retention_table(cells: list[dict]) -> list[str]:
    header = " | ".join(f"{e * 100:+g} pts" for e in RETENTION_EFFECTS)
    lines = [
        "P(promote) product / new / old by TRUE retention effect (new data +5 pts, n_new = 200):",
        "",
        f"| n_retention | churn d | {header} |",
        "|---|---|" + "---|" * len(RETENTION_EFFECTS),
    ]
    for n_ret, churn in itertools.product(N_RETENTION, CHURNS):
        rates = [
            _triple(
                _cell(
                    cells,
                    churn=churn,
                    retention_effect=effect,
                    new_effect=0.05,
                    n_new=200,
                    n_retention=n_ret,
                )
            )
            for effect in RETENTION_EFFECTS
        ]
        lines.append(f"| {n_ret} | {churn:.2f} | {' | '.join(rates)} |")
    return lines


def _new_data_table(cells: list[dict]) -> list[str]:
    header = " | ".join(f"{e * 100:+g} pts" for e in NEW_EFFECTS)
    lines = [
        "P(promote) product / new / old by TRUE new-data effect (retention unchanged, "
        "n_retention = 500):",
        "",
        f"| n_new | churn d | {header} |",
        "|---|---|" + "---|" * len(NEW_EFFECTS),
    ]
    for n_new, churn in itertools.product(N_NEW, CHURNS):
        rates = [
            _triple(
                _cell(
                    cells,
                    churn=churn,
                    retention_effect=0.0,
                    new_effect=effect,
                    n_new=n_new,
                    n_retention=500,
                )
            )
            for effect in NEW_EFFECTS
        ]
        lines.append(f"| {n_new} | {churn:.2f} | {' | '.join(rates)} |")
    return lines


def _chain_table(result: dict) -> list[str]:
    lines = [
        "A lineage losing 1 pt of retention per promotion (n_retention = 500, churn 0.05, "
        f"+5 pts new at n_new = 200; product = budget {result['policy']['forgetting_budget'] * 100:g} "
        "pts against the first model's measured accuracy):",
        "",
        "| step | true cumulative loss | old rule | new (per-step only) | product (+ budget) |",
        "|---|---|---|---|---|",
    ]
    for row in result["chain"]:
        lines.append(
            f"| {row['step']} | {row['cumulative_loss'] * 100:.0f} pts | {row['old']:.2f} | "
            f"{row['new']:.2f} | {row['product']:.2f} |"
        )
    return lines


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    print(markdown(run(quick=parser.parse_args().quick)))
