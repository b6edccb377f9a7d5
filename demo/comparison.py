"""Where the demo ends: the final champion against joint training and naive fine-tuning.

The timeline shows each flow's decision and accuracy on the batch it learned; this is the last
line of it read the other way, per batch: after the whole calendar, how much of every batch seen
does the champion still get right, next to a model trained jointly on every training row (the
bound) and a naive fine-tune of the first champion on each batch in turn (forgetting). The
summary figure is the average accuracy over the batches (each batch counts once, as in the
continual-learning literature's average accuracy), and the champion's gap to joint training in
points: the number the quality target ("within N points of joint") is about.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import rich.table


@dataclass(frozen=True)
class FinalComparison:
    """Accuracy per batch (gate rows) of the final champion, joint training and naive fine-tuning.

    Attributes:
        batches: the batches compared, in timeline order (those the champion was scored on).
        champion, joint, naive: batch → accuracy; a missing batch was not measured (naive has
            no model before the first update).
    """

    batches: list[str]
    champion: dict[str, float]
    joint: dict[str, float]
    naive: dict[str, float]

    def average(self, model: str) -> float:
        """Mean accuracy over `batches` of "champion", "joint" or "naive" (NaN if any is missing:
        an average over fewer batches would not be comparable)."""
        row: dict[str, float] = getattr(self, model)
        if not self.batches or any(b not in row for b in self.batches):
            return math.nan
        return sum(row[b] for b in self.batches) / len(self.batches)

    def gap_to_joint(self) -> float:
        """Joint training's average accuracy minus the champion's, in points (positive: behind)."""
        return (self.average("joint") - self.average("champion")) * 100


def final_comparison(
    champion: dict[str, float],
    joint: dict[str, dict[str, float]],
    naive: dict[str, dict[str, float]],
) -> FinalComparison:
    """The final comparison from the champion's last accuracy row and the references' rows.

    Args:
        champion: batch → accuracy of the champion after the last flow run.
        joint: batch → accuracy row of the joint model trained up to that batch.
        naive: the same for the naive fine-tune (no row for the bootstrap batch).
    """
    batches = list(champion)
    last = batches[-1] if batches else None
    return FinalComparison(
        batches=batches,
        champion=dict(champion),
        joint=dict(joint.get(last, {})) if last else {},
        naive=dict(naive.get(last, {})) if last else {},
    )


def _fmt(value: float | None) -> str:
    return "—" if value is None or math.isnan(value) else f"{value:.3f}"


def _rows(final: FinalComparison) -> list[list[str]]:
    rows = [
        [b, _fmt(final.champion.get(b)), _fmt(final.joint.get(b)), _fmt(final.naive.get(b))]
        for b in final.batches
    ]
    averages = [final.average(m) for m in ("champion", "joint", "naive")]
    rows.append(["average", *(_fmt(a) for a in averages)])
    return rows


_HEADER = ["batch", "champion", "joint training", "naive fine-tune"]


def comparison_markdown(final: FinalComparison, *, seconds: float | None = None) -> str:
    """A "## Final accuracy" section: the per-batch table, the gap to joint, the wall time."""
    lines = ["## Final accuracy on every batch seen", ""]
    lines += ["| " + " | ".join(_HEADER) + " |", "|" + "---|" * len(_HEADER)]
    lines += ["| " + " | ".join(row) + " |" for row in _rows(final)]
    gap = final.gap_to_joint()
    if not math.isnan(gap):
        lines += ["", f"Champion vs joint training, average over the batches: {gap:+.1f} pts."]
    if seconds is not None:
        lines.append(f"Wall time of the demo (flows and references): {seconds:.0f} s.")
    return "\n".join(lines)


def comparison_table(final: FinalComparison) -> rich.table.Table:
    """The same table for the terminal, the gap to joint in its caption."""
    from rich.table import Table

    gap = final.gap_to_joint()
    caption = None if math.isnan(gap) else f"champion vs joint (average): {gap:+.1f} pts"
    table = Table(title="final accuracy on every batch seen (gate rows)", caption=caption)
    for i, name in enumerate(_HEADER):
        table.add_column(name, justify="left" if i == 0 else "right")
    for row in _rows(final):
        table.add_row(*row, style="bold" if row[0] == "average" else None)
    return table
