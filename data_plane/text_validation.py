"""Checks of a text column: what breaks a text model blocks, how the text changes informs.

Integrity (blocking, `critical`): rows a tokenizer cannot take or that carry nothing —
empty or whitespace-only strings, values that are not valid UTF-8 (undecodable bytes, lone
surrogates left by a lenient decoder), non-string values, and rows longer than
`data.max_text_chars` (a whole file pasted into one cell). Nulls and labels outside
`data.classes` are already blocked by the GX suite (`data_plane.validation`).

Change (informing, `warning`): the length distribution (PSI of character lengths against the
accepted data) and the vocabulary (share of the batch's word occurrences never seen in the
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

if TYPE_CHECKING:
    from data_plane.validation import Failure
    from evergreen.config import DataConfig

_WORD = re.compile(r"\w+", re.UNICODE)
NEW_VOCABULARY_SHARE = 0.3  # share of word occurrences unseen before that is worth reporting
LENGTH_PSI = 0.25  # PSI of character lengths worth reporting


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


def _failure(column: str, rows: pd.Series, message: str) -> Failure:
    from data_plane.validation import Failure

    sample = [repr(v)[:80] for v in rows.head(5).tolist()]
    first = ", ".join(map(str, rows.index[:5].tolist()))
    return Failure("text_integrity", column, len(rows), sample, f"{message} (rows {first}, …)")


def text_failures(frame: pd.DataFrame, data_cfg: DataConfig) -> list[Failure]:
    """Blocking problems of the text column (see the module docstring); [] when clean."""
    column = data_cfg.text
    if not column or column not in frame.columns:
        return []
    values = frame[column].dropna()  # nulls: the GX suite reports them
    failures: list[Failure] = []
    not_text = values[~values.map(lambda v: isinstance(v, str | bytes))]
    if len(not_text):
        failures.append(
            _failure(column, not_text, f"{len(not_text)} rows of {column!r} are not text")
        )
    bad_utf8 = values[~values.map(_is_utf8)]
    if len(bad_utf8):
        message = f"{len(bad_utf8)} rows of {column!r} are not valid UTF-8 — re-export as UTF-8"
        failures.append(_failure(column, bad_utf8, message))
    text = values.map(lambda v: v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v))
    blank = text[text.str.strip() == ""]
    if len(blank):
        message = f"{len(blank)} rows of {column!r} are empty or whitespace only"
        failures.append(_failure(column, blank, message))
    long = text[text.str.len() > data_cfg.max_text_chars]
    if len(long):
        message = (
            f"{len(long)} rows of {column!r} are longer than data.max_text_chars="
            f"{data_cfg.max_text_chars} characters (longest {int(long.str.len().max())}) — a "
            "broken export or a pasted file; split it, or raise data.max_text_chars"
        )
        failures.append(_failure(column, long, message))
    return failures


def vocabulary(texts: pd.Series) -> Counter[str]:
    """Lower-cased word counts of a text column."""
    counts: Counter[str] = Counter()
    for text in texts.dropna().astype(str):
        counts.update(word.lower() for word in _WORD.findall(text))
    return counts


def text_change(frame: pd.DataFrame, reference: pd.DataFrame, column: str) -> dict[str, Any]:
    """How a batch's text differs from accepted text: length PSI and unseen-vocabulary share.

    Returns:
        {"length_psi", "median_chars", "reference_median_chars", "new_vocabulary_share",
        "new_words" (the most frequent unseen words, up to 10)}.
    """
    lengths = frame[column].dropna().astype(str).str.len().to_numpy(dtype=float)
    reference_lengths = reference[column].dropna().astype(str).str.len().to_numpy(dtype=float)
    seen = vocabulary(reference[column])
    batch = vocabulary(frame[column])
    total = sum(batch.values())
    unseen = Counter({w: c for w, c in batch.items() if w not in seen})
    return {
        "length_psi": float(psi(reference_lengths, lengths)),
        "median_chars": float(np.median(lengths)) if len(lengths) else 0.0,
        "reference_median_chars": float(np.median(reference_lengths))
        if len(reference_lengths)
        else 0.0,
        "new_vocabulary_share": sum(unseen.values()) / total if total else 0.0,
        "new_words": [w for w, _ in unseen.most_common(10)],
    }


def text_change_failures(stats: dict[str, Any], data_cfg: DataConfig) -> list[Failure]:
    """The informing findings of `text_change` (blocking if "text_drift" is in change.block)."""
    from data_plane.validation import Failure

    findings = []
    if stats["length_psi"] >= LENGTH_PSI:
        findings.append(
            f"text lengths changed: PSI {stats['length_psi']:.2f}, median "
            f"{stats['reference_median_chars']:.0f} → {stats['median_chars']:.0f} characters"
        )
    if stats["new_vocabulary_share"] >= NEW_VOCABULARY_SHARE:
        findings.append(
            f"{stats['new_vocabulary_share']:.0%} of the words were never seen in accepted "
            f"text (e.g. {', '.join(stats['new_words'][:5])}): a new topic or source"
        )
    severity = "critical" if "text_drift" in data_cfg.change.block else "warning"
    return [Failure("text_drift", data_cfg.text, None, [], m, severity) for m in findings]
