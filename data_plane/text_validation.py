"""Checks of a text column: what breaks a text model blocks, how the text changes informs.

Integrity (blocking, `critical`): rows a tokenizer cannot take or that carry nothing —
empty or whitespace-only strings, values that are not valid UTF-8 (undecodable bytes, lone
surrogates left by a lenient decoder), non-string values, and rows longer than
`data.max_text_chars` (a whole file pasted into one cell). Nulls and labels outside
`data.classes` are already blocked by the GX suite (`data_plane.validation`).

Change (informing, `warning`): the length distribution (median character length against the
accepted data, reported when it moves by 1.5× either way; the PSI of lengths is recorded too,
but on batches of a few dozen rows it is too noisy to report on) and the vocabulary (share of the batch's word occurrences never seen in the
accepted data). New topics are what continual learning is for, so they are reported, never
blocking, unless the user lists "text_drift" in `data.change.block`.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from data_plane.drift import population_stability_index as psi
from data_plane.messages import Failure, row_count

if TYPE_CHECKING:
    from evergreen.config import DataConfig

_WORD = re.compile(r"\w+", re.UNICODE)
NEW_VOCABULARY_EXCESS = 0.15  # unseen-word share above the baseline worth reporting
LENGTH_RATIO = 1.5  # change of the median length (either way) worth reporting


def _is_utf8(value: Any) -> bool:
    if isinstance(value, bytes):
        try:
            value.decode("utf-8")
        except UnicodeDecodeError:
            return False
        return True
    try:
        str(value).encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates ("\udcff" from errors="surrogateescape")
        return False
    return True


def _rows_of(count: int, column: str, what: str) -> str:
    """ "1 row of 'text' is …", "3 rows of 'text' are …"."""
    return f"{row_count(count)} of {column!r} {'is' if count == 1 else 'are'} {what}"


def _failure(column: str, rows: list[tuple[Any, Any]], message: str) -> Failure:
    sample = [repr(value)[:80] for _, value in rows[:5]]
    first = ", ".join(str(index) for index, _ in rows[:5])
    return Failure("text_integrity", column, len(rows), sample, f"{message} (rows {first}, …)")


def _as_text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def text_failures(frame: pd.DataFrame, data_cfg: DataConfig) -> list[Failure]:
    """Blocking problems of the text column (see the module docstring); [] when clean.

    Works on plain Python values: pandas would store strings in pyarrow, which raises on the
    very values (lone surrogates) this check exists to report.
    """
    column = data_cfg.text
    if not column or column not in frame.columns:
        return []
    rows = [
        (i, v) for i, v in zip(frame.index, frame[column].tolist(), strict=True) if not _null(v)
    ]
    checks: list[tuple[list[tuple[Any, Any]], str]] = []
    not_text = [(i, v) for i, v in rows if not isinstance(v, str | bytes)]
    checks.append((not_text, _rows_of(len(not_text), column, "not text")))
    bad = [(i, v) for i, v in rows if isinstance(v, str | bytes) and not _is_utf8(v)]
    checks.append((bad, _rows_of(len(bad), column, "not valid UTF-8 — re-export as UTF-8")))
    blank = [(i, v) for i, v in rows if not _as_text(v).strip()]
    checks.append((blank, _rows_of(len(blank), column, "empty or whitespace only")))
    long = [(i, v) for i, v in rows if len(_as_text(v)) > data_cfg.max_text_chars]
    longest = max((len(_as_text(v)) for _, v in long), default=0)
    checks.append(
        (
            long,
            _rows_of(len(long), column, "longer than data.max_text_chars=")
            + f"{data_cfg.max_text_chars} characters (longest {longest}) — a broken export or a "
            "pasted file; split it, or raise data.max_text_chars",
        )
    )
    return [_failure(column, found, message) for found, message in checks if found]


def _null(value: Any) -> bool:
    """None/NaN (reported by the GX null check, not here)."""
    return value is None or (isinstance(value, float) and value != value)


def gx_safe(frame: pd.DataFrame, data_cfg: DataConfig) -> pd.DataFrame:
    """`frame` with invalid UTF-8 text replaced by a decodable stand-in (U+FFFD), for the GX
    suite only: GX hashes rows through pyarrow, which raises on lone surrogates. The batch is
    blocked by `text_failures` anyway; the files are never touched."""
    column = data_cfg.text
    if not column or column not in frame.columns:
        return frame
    values = frame[column].tolist()
    if all(_null(v) or _is_utf8(v) for v in values):
        return frame
    safe = frame.copy()
    safe[column] = pd.Series(
        [v if _null(v) or _is_utf8(v) else _replaced(v) for v in values],
        index=frame.index,
        dtype=object,
    )
    return safe


def _replaced(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value).encode("utf-8", "replace").decode("utf-8")


def vocabulary(texts: pd.Series) -> Counter[str]:
    """Lower-cased word counts of a text column."""
    counts: Counter[str] = Counter()
    for text in texts.dropna().astype(str):
        counts.update(word.lower() for word in _WORD.findall(text))
    return counts


def _unseen_share(batch: Counter[str], seen: Counter[str]) -> float:
    total = sum(batch.values())
    return sum(c for w, c in batch.items() if w not in seen) / total if total else 0.0


def text_change(frame: pd.DataFrame, reference: pd.DataFrame, column: str) -> dict[str, Any]:
    """How a batch's text differs from accepted text: lengths and unseen vocabulary.

    The unseen-word share depends strongly on how much text the reference holds (short
    sentences bring many rare words), so it is compared with a baseline: the share of the
    reference's second half that its first half never saw. Only the excess over that baseline
    says "new vocabulary" (measured on docstring sentences of 4 packages, 40-120 rows: a batch
    of a new package scores about the baseline, ~0.44, so such small topic shifts do not show
    in words; text of another kind, e.g. licences, does).

    Returns:
        {"length_psi", "median_chars", "reference_median_chars", "new_vocabulary_share",
        "baseline_vocabulary_share", "new_words" (the most frequent unseen words, up to 10)}.
    """
    lengths = frame[column].dropna().astype(str).str.len().to_numpy(dtype=float)
    reference_lengths = reference[column].dropna().astype(str).str.len().to_numpy(dtype=float)
    seen = vocabulary(reference[column])
    batch = vocabulary(frame[column])
    half = len(reference) // 2
    baseline = _unseen_share(
        vocabulary(reference[column].iloc[half:]), vocabulary(reference[column].iloc[:half])
    )
    unseen = Counter({w: c for w, c in batch.items() if w not in seen})
    both = len(lengths) and len(reference_lengths)
    return {
        "length_psi": float(psi(reference_lengths, lengths)) if both else 0.0,
        "median_chars": float(np.median(lengths)) if len(lengths) else 0.0,
        "reference_median_chars": float(np.median(reference_lengths))
        if len(reference_lengths)
        else 0.0,
        "new_vocabulary_share": _unseen_share(batch, seen),
        "baseline_vocabulary_share": baseline,
        "new_words": [w for w, _ in unseen.most_common(10)],
    }


def text_change_failures(stats: dict[str, Any], data_cfg: DataConfig) -> list[Failure]:
    """The informing findings of `text_change` (blocking if "text_drift" is in change.block)."""
    findings = []
    ratio = (stats["median_chars"] + 1) / (stats["reference_median_chars"] + 1)
    if max(ratio, 1 / ratio) >= LENGTH_RATIO:
        findings.append(
            f"text lengths changed: PSI {stats['length_psi']:.2f}, median "
            f"{stats['reference_median_chars']:.0f} → {stats['median_chars']:.0f} characters"
        )
    excess = stats["new_vocabulary_share"] - stats["baseline_vocabulary_share"]
    if excess >= NEW_VOCABULARY_EXCESS:
        findings.append(
            f"{stats['new_vocabulary_share']:.0%} of the words were never seen in accepted "
            f"text (baseline {stats['baseline_vocabulary_share']:.0%}; e.g. "
            f"{', '.join(stats['new_words'][:5])}): a new topic or source"
        )
    severity = "critical" if "text_drift" in data_cfg.change.block else "warning"
    return [Failure("text_drift", data_cfg.text, None, [], m, severity) for m in findings]
