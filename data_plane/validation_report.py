"""The outcome of validating one batch (`ValidationReport`, its `Failure`s) and how it is written
down: strict JSON for the record, Markdown for the person, a few log lines for the run.

`data_plane.messages` builds the failures from a Great Expectations result and re-exports these
names.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from data_plane.readers import BatchReadError


@dataclass
class Failure:
    """One failed check, phrased for the person who has to fix the data."""

    expectation: str
    column: str | None
    unexpected_count: int | None
    sample_values: list[Any] = field(default_factory=list)
    message: str = ""
    severity: str = "critical"  # "critical" blocks, "warning" informs


@dataclass
class ValidationReport:
    """The outcome of validating one batch (or of failing to read it)."""

    batch_id: str
    success: bool
    n_rows: int
    failures: list[Failure]
    statistics: dict[str, Any]
    gx_result: dict[str, Any] | None = None
    warnings: list[Failure] = field(default_factory=list)

    def to_json(self) -> str:
        """Strict JSON (non-finite floats become strings such as "inf")."""
        return json.dumps(_json_safe(asdict(self)), indent=2, allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> ValidationReport:
        data = json.loads(text)
        data["failures"] = [Failure(**f) for f in data.get("failures", [])]
        data["warnings"] = [Failure(**f) for f in data.get("warnings", [])]
        return cls(**data)

    @classmethod
    def from_read_error(cls, batch_id: str, error: BatchReadError) -> ValidationReport:
        """A failed report for a batch that could not even be read."""
        failure = Failure("read_batch", None, None, [], str(error))
        stats = {"read_error": {"file": error.file, "reason": error.reason}}
        return cls(batch_id, False, 0, [failure], stats, None)

    def headline(self) -> str:
        """One line for logs and flow failure messages."""
        if self.success:
            checks = self.statistics.get("gx", {}).get("evaluated_expectations", "all")
            changes = f", {len(self.warnings)} change warning(s)" if self.warnings else ""
            return f"batch {self.batch_id}: valid ({self.n_rows} rows, {checks} checks{changes})"
        first = self.failures[0].message if self.failures else "failed"
        more = f" (+{len(self.failures) - 1} more)" if len(self.failures) > 1 else ""
        return f"batch {self.batch_id}: INVALID — {first}{more}"

    def summary(self) -> str:
        """A Markdown report: what failed, where, how many rows, samples, what was expected."""
        return render_summary(self)


RANGE_CHANGE = "beyond the range accepted so far"
CHANGE_LINE_COLUMNS = 6


def change_lines(
    report: ValidationReport, report_file: str = "the batch's validation report"
) -> list[str]:
    """The batch's change warnings as log lines: one per warning, except that range changes
    (often dozens of columns when writers or sensors shift) share one line naming the columns
    that moved most. The report keeps every warning in full; a log that prints one line per
    column hides the one warning that matters among forty that do not."""
    ranges = [w for w in report.warnings if RANGE_CHANGE in w.message]
    lines = [w.message for w in report.warnings if RANGE_CHANGE not in w.message]
    if len(ranges) == 1:
        lines.insert(0, ranges[0].message)
    elif ranges:
        lines.insert(0, _range_line(ranges, report.n_rows, report_file))
    return lines


def _range_line(ranges: list[Failure], n_rows: int, report_file: str) -> str:
    ranked = sorted(ranges, key=lambda w: -(w.unexpected_count or 0))
    shown = ", ".join(
        f"{w.column} ({(w.unexpected_count or 0) / max(n_rows, 1):.1%})"
        for w in ranked[:CHANGE_LINE_COLUMNS]
    )
    hidden = len(ranges) - CHANGE_LINE_COLUMNS
    more = f", … {hidden} more" if hidden > 0 else ""
    return (
        f"{len(ranges)} columns have values {RANGE_CHANGE} (share of rows): {shown}{more} — "
        "change, learned from unless data.change.block lists 'range'; every column and value "
        f"is in {report_file}"
    )


def clip_middle(text: str, limit: int) -> str:
    """`text` cut to at most `limit` characters by dropping its middle: a message's end is often
    what to do about it (the command to run, the report's path), so a head-only cut loses it."""
    if len(text) <= limit:
        return text
    marker = " … "
    head = (limit - len(marker)) * 2 // 3
    tail = limit - len(marker) - head
    return text[:head] + marker + text[-tail:]


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def render_summary(report: ValidationReport) -> str:
    """Markdown: verdict, one table row per failure, the statistics."""
    verdict = "valid" if report.success else "INVALID"
    lines = [f"# Batch `{report.batch_id}`: {verdict}", "", f"- rows: {report.n_rows}"]
    stats = report.statistics
    if "gx" in stats:
        gx_stats = stats["gx"]
        lines.append(
            f"- checks: {gx_stats.get('evaluated_expectations')} evaluated, "
            f"{gx_stats.get('unsuccessful_expectations')} failed (suite `{stats.get('suite')}`)"
        )
    if report.failures:
        lines += ["", "## What to fix", "", "| check | column | rows | sample values | problem |"]
        lines.append("|---|---|---|---|---|")
        for failure in report.failures:
            rows = "" if failure.unexpected_count is None else failure.unexpected_count
            lines.append(
                f"| {_cell(failure.expectation)} | {_cell(failure.column or '—')} | {rows} | "
                f"{_cell(failure.sample_values)} | {_cell(failure.message)} |"
            )
    if report.warnings:
        lines += ["", "## Changes (informational: learned from, not blocked)", ""]
        lines += [
            "| check | column | rows | sample values | what changed |",
            "|---|---|---|---|---|",
        ]
        for warning in report.warnings:
            rows = "" if warning.unexpected_count is None else warning.unexpected_count
            lines.append(
                f"| {_cell(warning.expectation)} | {_cell(warning.column or '—')} | {rows} | "
                f"{_cell(warning.sample_values)} | {_cell(warning.message)} |"
            )
    lines += ["", "## Statistics", ""]
    for key, value in stats.items():
        if key not in ("gx",):
            lines.append(f"- {key}: {_cell(value)}")
    return "\n".join(lines) + "\n"
