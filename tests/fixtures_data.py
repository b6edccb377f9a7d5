"""Shared test data helpers for the data plane: seeded batches, configs, landing-zone snapshots."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from data_plane.landing import LandingZone, LocalLandingZone, S3LandingZone
from evergreen.config import DataConfig

CLASSES = [0, 1, 2]


def feature_names(n: int) -> list[str]:
    return [f"f{i}" for i in range(n)]


def make_config(n_features: int = 4, **overrides: Any) -> DataConfig:
    """A DataConfig for `make_batch` data (classes 0-2, label column `label`)."""
    fields: dict[str, Any] = {
        "landing": "unused",
        "features": feature_names(n_features),
        "label": "label",
        "classes": CLASSES,
        "min_rows": 20,
        "max_duplicate_fraction": 0.2,
    }
    fields.update(overrides)
    return DataConfig(**fields)


def make_batch(
    n_rows: int = 60, n_features: int = 4, *, seed: int = 0, shift: float = 0.0
) -> pd.DataFrame:
    """Seeded Gaussian features (f0..), the first shifted by `shift`, and labels 0-2."""
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(n_rows, n_features))
    features[:, 0] += shift
    frame = pd.DataFrame(features, columns=feature_names(n_features))
    frame["label"] = rng.integers(0, len(CLASSES), size=n_rows)
    return frame


def make_empty_batch(zone: LandingZone, batch_id: str) -> None:
    """A batch "folder" without files: an empty directory, or an S3 zero-byte folder marker."""
    if isinstance(zone, LocalLandingZone):
        (zone.root / batch_id).mkdir(parents=True, exist_ok=True)
    elif isinstance(zone, S3LandingZone):
        zone.client.put_object(Bucket=zone.bucket, Key=f"{zone.prefix}{batch_id}/", Body=b"")
    else:  # pragma: no cover - a new zone type must teach the tests how
        raise TypeError(type(zone))


def snapshot(zone: LandingZone) -> dict[str, bytes]:
    """Every object/file under the zone (data or not, hidden included) → its bytes."""
    if isinstance(zone, LocalLandingZone):
        return {
            str(p.relative_to(zone.root)): p.read_bytes()
            for p in sorted(zone.root.rglob("*"))
            if p.is_file()
        }
    assert isinstance(zone, S3LandingZone)
    contents = {}
    paginator = zone.client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=zone.bucket, Prefix=zone.prefix):
        for obj in page.get("Contents", []):
            body = zone.client.get_object(Bucket=zone.bucket, Key=obj["Key"])["Body"]
            contents[obj["Key"]] = body.read()
    return contents
