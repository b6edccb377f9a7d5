"""Deterministic hold-out splits, content hashes and the bounded retention set.

Everything here is keyed on row *content* (a stable 64-bit hash per row), never on row position
or a global random state: rerunning a flow, or receiving the same rows in another order or file
layout, gives the same split, the same data hash and the same retention sample. Numeric values
are hashed as float64, so an integer column read from CSV and the same column read as float from
Parquet hash alike.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pandas as pd

from data_plane.readers import SOURCE_COLUMN

BATCH_COLUMN = "batch_id"
_MISSING = "\x00<missing>"


def _canonical(series: pd.Series) -> pd.Series:
    if pd.api.types.is_numeric_dtype(series.dtype):
        values = series.to_numpy(dtype="float64", na_value=np.nan)
        values = np.where(np.isnan(values), np.nan, values) + 0.0  # one NaN, and -0.0 → 0.0
        return pd.Series(values, index=series.index)
    return series.astype(object).where(series.notna(), _MISSING).map(str)


def row_hashes(df: pd.DataFrame, columns: list[str]) -> np.ndarray:
    """A uint64 hash per row of `df[columns]`, stable across runs, row order and dtypes.

    Raises:
        KeyError: a column is missing (names it).
    """
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise KeyError(f"cannot hash rows: columns {missing} are not in the frame")
    canonical = pd.DataFrame({str(c): _canonical(df[c]) for c in columns}, index=df.index)
    return pd.util.hash_pandas_object(canonical, index=False).to_numpy(dtype=np.uint64)


def _mix(hashes: np.ndarray, salt: str) -> np.ndarray:
    """Re-key hashes by `salt` (splitmix64 finaliser), so different salts give unrelated orders."""
    key = int.from_bytes(hashlib.sha256(salt.encode("utf-8")).digest()[:8], "little")
    z = hashes ^ np.uint64(key)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def split_holdout(
    df: pd.DataFrame, columns: list[str], fraction: float, *, salt: str = ""
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split rows into (train, holdout) by their content hash.

    A row is held out when its salted hash falls in the lowest `fraction` of the 64-bit range:
    stable under reruns and reordering, and exact duplicates always land on the same side (so
    the hold-out never contains a copy of a training row).

    Args:
        df: the batch.
        columns: the columns that identify a row (features/text and label).
        fraction: expected share held out, in (0, 1).
        salt: changes the split (e.g. per pipeline) without changing its properties. It must
            not depend on the batch: the same row landing in two batches must land on the same
            side both times.

    Returns:
        (train, holdout), each keeping the original index and row order.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"holdout fraction must be in (0, 1), got {fraction}")
    held = _uniform(df, columns, salt) < fraction
    return df.loc[~held], df.loc[held]


def _uniform(df: pd.DataFrame, columns: list[str], salt: str) -> np.ndarray:
    """One number in [0, 1) per row, a pure function of the row's content and `salt`."""
    return (_mix(row_hashes(df, columns), salt) >> np.uint64(11)).astype(np.float64) / 2.0**53


@dataclass(frozen=True)
class ThreeWaySplit:
    """A batch split by role: rows that train, rows that select, rows the promotion gate scores.

    Selecting (λ calibration, the LoRA keep/discard check; early stopping, were it added) on the
    rows the gate then scores would bias the gate; three disjoint parts keep the gate honest.
    """

    train: pd.DataFrame
    select: pd.DataFrame
    gate: pd.DataFrame


def split_three_way(
    df: pd.DataFrame,
    columns: list[str],
    *,
    select_fraction: float,
    gate_fraction: float,
    salt: str,
) -> ThreeWaySplit:
    """Split rows into train / select / gate by their content hash (see `split_holdout`).

    The gate takes the lowest `gate_fraction` of the hash range, selection the next
    `select_fraction`, training the rest; a row's role depends only on its content and `salt`
    (never on the batch it arrived in, its position or the other rows).

    Raises:
        ValueError: a fraction is outside (0, 1) or both together leave nothing to train on.
    """
    for name, value in (("select_fraction", select_fraction), ("gate_fraction", gate_fraction)):
        if not 0.0 < value < 1.0:
            raise ValueError(f"{name} must be in (0, 1), got {value}")
    if select_fraction + gate_fraction >= 1.0:
        raise ValueError(
            f"select_fraction + gate_fraction = {select_fraction + gate_fraction:g} leaves no "
            "rows to train on; keep their sum below 1"
        )
    u = _uniform(df, columns, salt)
    gate = u < gate_fraction
    select = ~gate & (u < gate_fraction + select_fraction)
    return ThreeWaySplit(df.loc[~gate & ~select], df.loc[select], df.loc[gate])


def content_hash(df: pd.DataFrame, columns: list[str]) -> str:
    """SHA-256 of the rows of `df[columns]` as a multiset: row order does not matter."""
    digest = hashlib.sha256()
    digest.update("\x1f".join(map(str, columns)).encode("utf-8"))
    digest.update(np.sort(row_hashes(df, columns)).astype("<u8").tobytes())
    return digest.hexdigest()


def _proportional(n: int, caps: np.ndarray) -> np.ndarray:
    """Split `n` over groups in proportion to their sizes (largest remainder), ≤ caps.

    When `n` allows, every group gets at least one, so rare classes stay represented.
    """
    total = int(caps.sum())
    if n >= total:
        return caps.copy()
    exact = n * caps / total
    quota = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - quota), kind="stable")
    quota[order[: n - int(quota.sum())]] += 1
    if n >= len(caps):
        for empty in np.flatnonzero(quota == 0):
            quota[int(np.argmax(quota))] -= 1
            quota[empty] += 1
    return quota


def _equal_shares(total: int, caps: np.ndarray) -> np.ndarray:
    """Water-filling: equal shares ≤ caps; what small groups leave goes to the others.

    An indivisible remainder goes to the last groups (the most recent batches).
    """
    alloc = np.zeros_like(caps)
    while True:
        remaining = total - int(alloc.sum())
        open_ = np.flatnonzero(alloc < caps)
        if remaining <= 0 or open_.size == 0:
            return alloc
        each = remaining // open_.size
        if each == 0:
            alloc[open_[::-1][:remaining]] += 1
            return alloc
        alloc[open_] = np.minimum(caps[open_], alloc[open_] + each)


def _stratified_take(frame: pd.DataFrame, label: str, n: int, salt: str) -> pd.DataFrame:
    """Up to `n` rows, classes in proportion; within a class the lowest salted hashes win."""
    if n >= len(frame):
        return frame
    identity = [c for c in frame.columns if c not in (BATCH_COLUMN, SOURCE_COLUMN)]
    rank = _mix(row_hashes(frame, identity), salt)
    groups = frame.groupby(label, sort=False, dropna=False).indices
    keys = sorted(groups, key=str)
    quotas = _proportional(n, np.array([len(groups[k]) for k in keys], dtype=np.int64))
    picks: list[np.ndarray] = []
    for key, quota in zip(keys, quotas, strict=True):
        positions = np.asarray(groups[key])
        ranked = positions[np.lexsort((positions, rank[positions]))]
        picks.append(ranked[:quota])
    return frame.iloc[np.sort(np.concatenate(picks))]


def update_retention(
    retention: pd.DataFrame | None,
    holdout: pd.DataFrame,
    *,
    batch_id: str,
    label: str,
    per_batch: int,
    max_rows: int,
    seed: int = 0,
) -> pd.DataFrame:
    """Add a stratified sample of this batch's hold-out rows to the retention set, bounded.

    Takes ≤ `per_batch` rows of `holdout` stratified by class and tags them with `batch_id`
    (rerunning a batch replaces its rows). If the set then exceeds `max_rows`, every batch is cut
    to an equal share (batches with fewer rows give their unused share to the others), again
    stratified by class. With more batches than `max_rows`, the most recent batches keep one
    row each. Deterministic: the choice depends on row content, `batch_id` and `seed` only.

    Returns:
        The new retention set (feature/label columns + "batch_id"), ordered by batch.

    Raises:
        KeyError: `label` is not a column of `holdout`.
    """
    if label not in holdout.columns:
        raise KeyError(f"retention: label column {label!r} is not in the hold-out frame")
    fresh = holdout.drop(columns=[SOURCE_COLUMN, BATCH_COLUMN], errors="ignore")
    fresh = _stratified_take(fresh, label, per_batch, f"{seed}:{batch_id}")
    fresh = fresh.assign(**{BATCH_COLUMN: batch_id})
    if retention is not None and len(retention):
        kept = retention[retention[BATCH_COLUMN].astype(str) != batch_id]
        combined = pd.concat([kept, fresh], ignore_index=True)
    else:
        combined = fresh.reset_index(drop=True)
    combined = combined.sort_values(BATCH_COLUMN, kind="stable", key=lambda s: s.astype(str))
    if len(combined) <= max_rows:
        return combined.reset_index(drop=True)
    batches = combined.groupby(BATCH_COLUMN, sort=True).indices
    keys = sorted(batches, key=str)
    caps = np.array([len(batches[k]) for k in keys], dtype=np.int64)
    parts = [
        _stratified_take(combined.iloc[batches[key]], label, int(share), f"{seed}:{key}")
        for key, share in zip(keys, _equal_shares(max_rows, caps), strict=True)
        if share > 0
    ]
    return pd.concat(parts, ignore_index=True)
