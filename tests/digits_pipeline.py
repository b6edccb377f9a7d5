"""A small real-data pipeline for flow tests: scikit-learn digits in a local landing zone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from sklearn.datasets import load_digits

FEATURES = [f"pixel_{i}" for i in range(64)]


def digits_frame(rows: slice, *, shift: int = 0) -> pd.DataFrame:
    """Rows of the real digits; `shift` moves every image right by that many pixels (drift)."""
    digits = load_digits()
    images = digits.images[rows].copy()
    if shift:
        images = np.roll(images, shift, axis=2)
        images[:, :, :shift] = 0
    frame = pd.DataFrame(images.reshape(len(images), 64), columns=FEATURES)
    frame["label"] = digits.target[rows]
    return frame


def write_batch(landing: Path, batch_id: str, frame: pd.DataFrame, fmt: str = "parquet") -> Path:
    folder = landing / batch_id
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"part-0.{fmt}"
    if fmt == "parquet":
        frame.to_parquet(path, index=False)
    else:
        frame.to_csv(path, index=False)
    (folder / "_SUCCESS").touch()  # the producer's last step: the batch has fully arrived
    return path


def write_config(directory: Path, landing: Path, home: Path, **sections) -> Path:
    """A fast config: tiny MLP-free transformer, few steps, everything under `home`."""
    tree = {
        "home": str(home),
        "data": {
            "landing": str(landing),
            "features": FEATURES,
            "label": "label",
            "classes": list(range(10)),
        },
        "model": {"family": "transformer", "d_model": 16, "n_heads": 2, "n_layers": 1},
        "registry": {"name": "digits-test", "experiment": "digits-test"},
        "bootstrap": {"train": {"steps": 150, "lr": 0.005}},
        "memory": {"replay_capacity": 300, "held_out_per_batch": 100},
        "weekly": {"train": {"steps": 60}, "ewc_lambda": 10.0},
        "monthly": {"train": {"steps": 60}, "ewc_lambda": 10.0},
        "daily": {"train": {"steps": 40}},
        "gate": {"n_bootstrap": 200, "new_data_tolerance": 0.05, "retention_tolerance": 0.05},
    }
    for key, value in sections.items():
        tree[key] = {**tree.get(key, {}), **value}
    path = directory / "evergreen.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path
