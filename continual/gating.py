"""The promotion gate: paired non-inferiority tests of challenger vs champion, and `decide`.

Both models are scored on the same examples, so the comparison is paired: per-example
correctness goes to McNemar's test and Newcombe's interval (only discordant examples carry
information), other per-example scores to a paired bootstrap of the mean difference
(`continual.paired_tests` defines these tests, their intervals and the SE behind the MDE).

Decision rule (`decide`), with diff = challenger − champion on the same examples and
α = 1 − `confidence` (a ONE-SIDED level; 0.95 gives α = 0.05):

1. No champion: promote iff the challenger's accuracy on the new data ≥ `min_accuracy`.
2. Otherwise promote iff every check passes:
   a. new data: the lower confidence bound LCB of diff is above −`new_data_tolerance`
      (`new_data_rule="non_inferior"`) or above 0 (`"superior"`);
   b. retention (when both models are scored on it): LCB > −`retention_tolerance`;
   c. cumulative forgetting (when the retention rows carry batch ids and some batch has a fixed
      reference accuracy ref_b): Σ_b n_b·(ref_b − acc_b) / Σ_b n_b ≤ `forgetting_budget`, with
      acc_b the challenger's accuracy on batch b's retention rows and n_b their number.
      One-row floor (0/1 correctness only): a limit finer than one row of the set it is
      measured on, 1 / Σ_b n_b, is one row — on 14 retention rows one row is 7.1 pts, and a
      2.5-pt budget would reject every update that changes a single old prediction, forever.
   The LCB is the lower end of the two-sided interval at level 1 − 2α: Newcombe's hybrid score
   interval for 0/1 correctness, the paired-bootstrap percentile interval for other scores. A drop
   beyond the tolerance that is not significant is NOT noise: "not shown worse" is not "shown not
   worse", and such a challenger is rejected.
2d. Exchange (`exchange_gain`, None disables): a challenger that passes 2a but fails only 2b
   and/or 2c is still promoted when its new-data gain is PROVEN large (LCB of the new-data diff
   ≥ `exchange_gain`, 10 pts by default), the trade is a net gain on every held-out row (diff
   over the new and retention rows together > 0, a point estimate like the losses: the
   pipeline's own objective, accuracy on everything seen — a class learned on 60 rows cannot
   pay for 8 pts lost on 2,000), and what it gives up is bounded: the point estimates of its
   retention loss and of its cumulative forgetting are each ≤ `exchange_max_loss` (10 pts;
   `retention_tolerance` when that is larger). The same one-row floor applies to both point
   limits. This is the class-arrival / strong-drift case: a model that learns ten classes
   where the champion knew four cannot keep the four-class specialist's accuracy on them
   (joint training on everything loses it too: 4-9 pts per arriving class on overlapping
   tabular classes), and without the exchange such updates are rejected forever — the
   champion stays safe and useless. The reason line says "exchange". After an exchange the
   traded loss is accepted: the earlier batches' references fall to what the challenger keeps
   (`continual.gate_policy.rebased_references`), so the next update is not charged for it
   again (with fixed references every later class arrival was rejected, forever).
3. Power, reported but never blocking: for each paired check, the minimum detectable effect at
   80% power, MDE = (z_{1−α} + z_{0.8})·SE, where SE is that of the paired difference. A
   check is underpowered when n < `min_examples` or MDE > its tolerance: then even an unchanged
   challenger passes a non-inferiority check less than 80% of the time (for the superiority
   rule: a true gain of `new_data_tolerance` is detected less than 80% of the time). It adds a
   reason line and sets `GateDecision.underpowered`.

Error rates. Each of 2a/2b is a level-α test of its own null ("the challenger is worse by the
tolerance or more"), and promotion requires all of them to reject: an intersection–union test,
so P(promote | any null true) ≤ α with no multiplicity correction, up to the intervals'
approximate coverage. The price is power (roughly the product of the checks' powers: each added
check raises the false-rejection rate). Check 2c can only add rejections, so it keeps the bound.
The exchange 2d is the one deliberate exception: P(promote | retention loss ≥ tolerance + 1 pt)
stays ≤ α for updates whose new-data gain is not proven ≥ `exchange_gain` (every cell of
`benchmarks/bench_gate.py`, whose challengers gain 5 pts); with a proven large gain and a
net gain a point loss up to `exchange_max_loss` is accepted by design, in the open (the
reason says so, `GateDecision.exchanged`), never as noise.

Why 2c. Each gate compares with the current champion only, so losses within the tolerance
would pile up across promotions (five promotions that each lose 1 pt can each pass, losing 5 pts
in all; `benchmarks/bench_gate.py` simulates such a lineage). The reference of a batch does not
move (e.g. the accuracy reached on it by the champion that first learned it), so the budget
bounds the accumulated loss. It uses the point estimate: the reference is a fixed number, not a
competing model. It is deliberately not the max over all champions so far (the max-based
forgetting of the metrics): a max over repeated noisy measurements on the same rows is biased
upwards by about 1-2 standard errors per batch and would block everything.

Every check adds one reason — a full sentence with the means, the difference (in points for 0/1
correctness, in the score's own unit otherwise: nats for a causal LM), the one-sided bound, the
tolerance, n and the MDE — whether it accepts or rejects.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike

from continual.gate_policy import GateDecision, GatePolicy
from continual.paired_tests import (
    MDE_POWER,
    PairedTestResult,
    is_binary,
    mcnemar_test,
    minimum_detectable_effect,
    paired_bootstrap,
)


class _Check(NamedTuple):
    passed: bool
    reasons: list[str]
    mde: float | None = None
    underpowered: bool = False


def _scores(values: ArrayLike, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64).ravel()
    if array.size == 0 or not np.isfinite(array).all():
        raise ValueError(f"{name} must be a non-empty array of finite per-example scores")
    return array


def _paired(
    champion: np.ndarray, challenger: np.ndarray, name: str, policy: GatePolicy
) -> PairedTestResult:
    level = 2.0 * policy.confidence - 1.0  # two-sided level whose lower end is the one-sided LCB
    if is_binary(champion, challenger):
        return mcnemar_test(champion, challenger, confidence=level, name=name)
    return paired_bootstrap(
        champion,
        challenger,
        n_resamples=policy.n_bootstrap,
        confidence=level,
        seed=policy.seed,
        name=name,
    )


def format_points(value: float, signed: bool = True) -> str:
    """A difference of fractions as the reasons print it: 0.067 → "+6.7" (points, "−" sign)."""
    text = f"{value * 100:+.1f}" if signed else f"{value * 100:.1f}"
    return text.replace("-", "−")


def format_difference(value: float, binary: bool, signed: bool = True) -> str:
    """A difference of scores as the reasons print it: of 0/1 correctness in points
    (0.067 → "+6.7 pts"), of any other score as itself (a causal LM's mean token
    log-likelihood, in nats: 0.067 → "+0.067") — "pts" of a log-likelihood would read as
    accuracy."""
    if binary:
        return f"{format_points(value, signed)} pts"
    text = f"{value:+.3f}" if signed else f"{value:.3f}"
    return text.replace("-", "−")


def _limit(value: float, binary: bool, noun: str) -> str:
    """ "5.0-pt tolerance" for 0/1 correctness, "0.050 tolerance" for other scores."""
    return f"{format_points(value, False)}-pt {noun}" if binary else f"{value:.3f} {noun}"


def _check(
    test: PairedTestResult, label: str, tolerance: float, superior: bool, policy: GatePolicy
) -> _Check:
    """Rule 2a/2b and the power note (rule 3) for one paired test."""
    binary = test.on_correctness
    metric = "accuracy" if binary else "mean score"
    change = test.diff
    verb = (
        f"fell {format_difference(-change, binary, False)}"
        if change < 0
        else f"rose {format_difference(change, binary, False)}"
    )
    if change == 0:
        verb = "was unchanged"
    margin, bound = (
        (0.0, "0") if superior else (-tolerance, f"−{_limit(tolerance, binary, 'tolerance')}")
    )
    passed = test.ci_low > margin
    mde = minimum_detectable_effect(test.se, confidence=policy.confidence)
    kind = "superior" if superior else "non-inferior"
    reason = (
        f"{label} {metric} {verb} ({test.champion_mean:.3f} → {test.challenger_mean:.3f}, "
        f"{policy.confidence * 100:g}% lower bound {format_difference(test.ci_low, binary)} "
        f"{'>' if passed else '≤'} {bound}, n={test.n}, MDE {format_difference(mde, binary, False)}) — "
        + (f"{kind}." if passed else f"not shown {kind}: rejected.")
    )
    problems = []
    if test.n < policy.min_examples:
        problems.append(f"n={test.n} < min_examples {policy.min_examples}")
    if mde > tolerance:
        consequence = (
            f"an improvement of {format_difference(tolerance, binary, False)} is detected"
            if superior
            else "even an unchanged challenger passes it"
        )
        problems.append(
            f"MDE {format_difference(mde, binary, False)} > {_limit(tolerance, binary, 'tolerance')}, so "
            f"{consequence} less than {MDE_POWER:.0%} of the time"
        )
    if not problems:
        return _Check(passed, [reason], mde, False)
    note = f"The {label} check is underpowered ({'; '.join(problems)}); this alone does not block."
    if not passed and change >= 0:  # no loss was seen: the rows are too few to show there is none
        note = (
            f"The {label} check is underpowered ({'; '.join(problems)}): it failed for want of "
            "evidence, not on an observed loss; more gate rows decide it (larger batches or a "
            "larger data.gate_fraction; the rows of batches not yet learned accumulate)."
        )
    return _Check(passed, [reason, note], mde, True)


def accuracy_by_batch(scores: ArrayLike, groups: ArrayLike) -> dict[str, tuple[float, int]]:
    """{batch id: (mean score over the batch's rows, number of rows)}, ids sorted.

    Raises:
        ValueError: `groups` does not have one batch id per score.
    """
    values = np.asarray(scores, dtype=np.float64).ravel()
    ids = np.asarray(groups, dtype=object).ravel()
    if ids.size != values.size:
        raise ValueError(
            f"retention_groups has {ids.size} batch ids but the retention set has {values.size} "
            "examples (one batch id per retention example)"
        )
    names, inverse = np.unique(ids.astype(str), return_inverse=True)
    counts = np.bincount(inverse)
    sums = np.bincount(inverse, weights=values)
    return {str(b): (float(s / k), int(k)) for b, s, k in zip(names, sums, counts, strict=True)}


def _by_batch(
    retained: np.ndarray | None,
    groups: ArrayLike | None,
    references: Mapping[str, float] | None,
) -> dict[str, tuple[float, int]]:
    if groups is None:
        if references:
            raise ValueError(
                "references were given without retention_groups: give the batch id of each "
                "retention example so the challenger can be compared per batch"
            )
        return {}
    if retained is None:
        raise ValueError("retention_groups was given without challenger_retention_correct")
    for batch, value in (references or {}).items():
        if not math.isfinite(value):
            raise ValueError(f"references[{batch!r}] must be a finite accuracy, got {value}")
    return accuracy_by_batch(retained, groups)


def point_limit(limit: float, rows: int, binary: bool) -> float:
    """A point-estimate limit on 0/1 correctness, at least one row of the `rows` it is measured
    on: a finer limit cannot tell a lost row from noise, and rejects every update that changes
    one old prediction (one row of 14 is 7.1 pts). Other scores (log-likelihoods) keep it."""
    return max(limit, 1.0 / rows) if binary and rows > 0 else limit


_ROUNDING = 1e-9  # a loss of exactly one row must pass a one-row limit despite float rounding


def _forgetting_check(
    by_batch: dict[str, tuple[float, int]],
    references: Mapping[str, float],
    budget: float,
    binary: bool,
) -> tuple[float | None, int, _Check]:
    """Rule 2c: (forgetting, or None when no batch has a reference; its rows; the check)."""
    covered = [b for b in by_batch if b in references]
    if not covered:
        return None, 0, _Check(True, [_NO_REFERENCE])
    rows = sum(by_batch[b][1] for b in covered)
    losses = {b: references[b] - by_batch[b][0] for b in covered}
    forgetting = sum(by_batch[b][1] * losses[b] for b in covered) / rows
    worst = max(covered, key=losses.__getitem__)
    limit = point_limit(budget, rows, binary)
    passed = forgetting <= limit + _ROUNDING
    verdict = "within" if passed else "beyond"
    bound = _limit(budget, binary, "budget")
    if limit > budget:
        bound += f" (one row of {rows}: {format_difference(limit, binary, False)})"
    reason = (
        f"cumulative forgetting {format_difference(forgetting, binary)} against the fixed references of "
        f"{len(covered)} earlier batch(es) (n={rows}; largest loss: batch {worst!r} "
        f"{references[worst]:.3f} → {by_batch[worst][0]:.3f}) — {verdict} the "
        f"{bound}" + ("." if passed else ": rejected.")
    )
    missing = [b for b in by_batch if b not in references]
    if missing:
        reason += f" Batches without a reference, not counted: {', '.join(missing)}."
    return forgetting, rows, _Check(passed, [reason])


def _exchange_check(
    new_test: PairedTestResult,
    retention_test: PairedTestResult | None,
    net: tuple[float, int],
    forgetting: tuple[float | None, int],
    policy: GatePolicy,
    binary: bool,
) -> _Check:
    """Rule 2d: a proven large new-data gain may buy a bounded retention loss when the trade is
    a net gain on every held-out row (`net`: the mean change over the new and retention rows
    together, and their number). `forgetting` is (the cumulative loss or None, its rows); each loss has the one-row floor of
    its own rows."""
    if policy.exchange_gain is None:
        return _Check(False, [])
    # never stricter than the plain rule: a pipeline that tolerates more per promotion trades more
    cap = max(policy.exchange_max_loss, policy.retention_tolerance)
    losses = [(0.0, cap)]
    if retention_test is not None:
        losses.append((-retention_test.diff, point_limit(cap, retention_test.n, binary)))
    if forgetting[0] is not None:
        losses.append((forgetting[0], point_limit(cap, forgetting[1], binary)))
    lost, limit = max(losses, key=lambda pair: pair[0] - pair[1])  # the nearest to its limit
    within = all(loss <= bound + _ROUNDING for loss, bound in losses)
    gain_proven = new_test.ci_low >= policy.exchange_gain
    net_change, net_rows = net
    net_gain = net_change > 0
    passed = gain_proven and within and net_gain
    verdict = "promoted by exchange" if passed else "no exchange"
    floor = f" (one row: {format_difference(limit, binary, False)})" if limit > cap else ""
    reason = (
        f"exchange: new-data gain lower bound {format_difference(new_test.ci_low, binary)} "
        f"{'≥' if gain_proven else '<'} {format_difference(policy.exchange_gain, binary, False)}, "
        f"retention given up {format_difference(lost, binary, False)} (point estimate, retention "
        f"and cumulative) {'≤' if within else '>'} {format_difference(cap, binary, False)}{floor}, "
        f"net change on all {net_rows} held-out rows "
        f"{format_difference(net_change, binary)} {'>' if net_gain else '≤'} 0 "
        f"— {verdict}."
    )
    return _Check(passed, [reason])


_NO_REFERENCE = (
    "No retention batch has a reference accuracy: cumulative forgetting was not checked."
)
_NO_RETENTION = "No retention set was scored for both models: retention was not compared."


def decide(
    *,
    challenger_new_correct: ArrayLike,
    champion_new_correct: ArrayLike | None = None,
    challenger_retention_correct: ArrayLike | None = None,
    champion_retention_correct: ArrayLike | None = None,
    retention_groups: ArrayLike | None = None,
    references: Mapping[str, float] | None = None,
    policy: GatePolicy = GatePolicy(),
    floor_score: str = "accuracy",
) -> GateDecision:
    """Promote or reject a challenger (the rule is in the module docstring).

    Args:
        challenger_new_correct: per-example correctness (or scores) on the new batch's
            held-out split.
        champion_new_correct: the champion's on the same examples; None when there is no champion.
        challenger_retention_correct, champion_retention_correct: the same on the retention set
            (the champion's only together with the challenger's).
        retention_groups: the batch id (a string) of each retention example, same length as the
            retention arrays; gives `GateDecision.retention_by_batch`.
        references: fixed reference accuracy per batch id (e.g. the accuracy the champion that
            first learned the batch reached on it), for the cumulative forgetting budget; needs
            `retention_groups`. Batches without a reference are not counted.
        policy: tolerances and test settings.
        floor_score: what a first champion's `challenger_new_correct` measures, as its reason
            names it against `policy.min_accuracy` (a causal LM's is not an accuracy).

    Returns:
        The decision with its reasons, test results and metrics.

    Raises:
        ValueError: arrays of different lengths, empty or non-finite, non-finite references, or
            an inconsistent set of arguments (a champion's retention scores without the
            challenger's, batch ids without retention scores, and so on).
    """
    new = _scores(challenger_new_correct, "challenger_new_correct")
    retained = None
    if challenger_retention_correct is not None:
        retained = _scores(challenger_retention_correct, "challenger_retention_correct")
    by_batch = _by_batch(retained, retention_groups, references)
    if champion_new_correct is None:
        if champion_retention_correct is not None:
            raise ValueError("champion_retention_correct was given without champion_new_correct")
        return _first_champion(new, retained, by_batch, policy, floor_score)
    champion_new = _scores(champion_new_correct, "champion_new_correct")
    new_test = _paired(champion_new, new, "new-data", policy)
    superior = policy.new_data_rule == "superior"
    checks = [_check(new_test, "new-data", policy.new_data_tolerance, superior, policy)]
    flips = (champion_new, new)
    retention_test = None
    if champion_retention_correct is not None:
        if retained is None:
            raise ValueError(
                "champion_retention_correct was given but challenger_retention_correct was not: "
                "score both models on the retention set"
            )
        flips = (_scores(champion_retention_correct, "champion_retention_correct"), retained)
        retention_test = _paired(*flips, "retention", policy)
        checks.append(
            _check(retention_test, "retention", policy.retention_tolerance, False, policy)
        )
    forgetting, forgetting_rows = None, 0
    binary = retained is not None and is_binary(retained)  # 0/1 correctness: rows are counts
    if by_batch:
        forgetting, forgetting_rows, budget_check = _forgetting_check(
            by_batch, references or {}, policy.forgetting_budget, binary
        )
        checks.append(budget_check)
    reasons = [reason for check in checks for reason in check.reasons]
    promote = all(check.passed for check in checks)
    exchanged = False
    if not promote and checks[0].passed:
        before, after = (champion_new, new)
        if retention_test is not None:  # flips holds the retention scores then
            before, after = np.concatenate([before, flips[0]]), np.concatenate([after, flips[1]])
        net = (float(np.mean(after - before)), len(after))
        exchange = _exchange_check(
            new_test, retention_test, net, (forgetting, forgetting_rows), policy, binary
        )
        promote = exchanged = exchange.passed
        # the rule that decided comes first: a promotion by exchange would otherwise read as
        # "retention … rejected" wherever the reasons are cut short (tables, tags)
        reasons = exchange.reasons + reasons if promote else reasons + exchange.reasons
    nfr = None
    if is_binary(*flips):
        nfr = float(np.mean(flips[0].astype(bool) & ~flips[1].astype(bool)))
    return GateDecision(
        promote=promote,
        reasons=tuple(reasons + ([] if retention_test else [_NO_RETENTION])),
        new_data=new_test,
        retention=retention_test,
        challenger_new_accuracy=float(new.mean()),
        challenger_retention_accuracy=None if retained is None else float(retained.mean()),
        negative_flip_rate=nfr,
        new_data_mde=checks[0].mde,
        retention_mde=checks[1].mde if retention_test else None,
        underpowered=any(check.underpowered for check in checks),
        forgetting=forgetting,
        retention_by_batch={b: mean for b, (mean, _) in by_batch.items()},
        policy=policy,
        exchanged=exchanged,
    )


def _first_champion(
    new: np.ndarray,
    retained: np.ndarray | None,
    by_batch: dict[str, tuple[float, int]],
    policy: GatePolicy,
    floor_score: str,
) -> GateDecision:
    accuracy = float(new.mean())
    promote = accuracy >= policy.min_accuracy
    verdict = "meets" if promote else "is below"
    reason = (
        f"No champion yet: new-data {floor_score} {accuracy:.3f} {verdict} the "
        f"{policy.min_accuracy:.3f} floor (min_accuracy)."
    )
    return GateDecision(
        promote=promote,
        reasons=(reason,),
        new_data=None,
        retention=None,
        challenger_new_accuracy=accuracy,
        challenger_retention_accuracy=None if retained is None else float(retained.mean()),
        negative_flip_rate=None,
        retention_by_batch={b: mean for b, (mean, _) in by_batch.items()},
        policy=policy,
    )
