"""Benchmark: CPU time per optimiser step of `continual.training.train` under the `train.*`
device knobs (docs/SCALING.md), on the digits MLP and the tiny Llama of the tests.

Run: `python -m benchmarks.bench_train_step [knob=value ...]`, e.g. `sync_every=16`,
`precision=bf16`, `grad_accum_steps=4`, `gradient_checkpointing=true`. Process CPU time with one
torch thread (a busy machine inflates wall time far more than CPU time), median and min of 8
runs after a warm-up run. Compare two trees by running the same command in each, interleaved.
Not part of `make bench`: a check that the loop's bookkeeping costs nothing, not a product figure.
"""

from __future__ import annotations

import copy
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from sklearn.datasets import load_digits  # type: ignore[import-untyped]

from continual.models import CAUSAL_LM, ModelSpec, build_model, fit_standardizer
from continual.training import TrainSettings, train
from tests.tiny_llama import sentences, tiny_llama

REPEATS = 8


def _knobs(args: list[str]) -> dict[str, Any]:
    """`name=value` pairs: integers, true/false, else strings."""
    knobs: dict[str, Any] = {}
    for arg in args:
        name, value = arg.split("=", 1)
        knobs[name] = (
            int(value) if value.isdigit() else {"true": True, "false": False}.get(value, value)
        )
    return knobs


def _cpu_ms_per_step(run: Callable[[], int]) -> tuple[float, float]:
    run()  # warm-up
    times = []
    for _ in range(REPEATS):
        started = time.process_time()
        steps = run()
        times.append(1e3 * (time.process_time() - started) / steps)
    return statistics.median(times), min(times)


def main(args: list[str]) -> None:
    torch.set_num_threads(1)
    knobs = _knobs(args)
    digits = load_digits()
    X, y = torch.tensor(digits.data, dtype=torch.float32), torch.tensor(digits.target)
    mean, std = fit_standardizer(digits.data[:1200])
    spec = ModelSpec("mlp", 64, 10, hidden=[64], input_mean=mean, input_std=std)

    def mlp() -> int:
        torch.manual_seed(0)
        settings = TrainSettings(steps=400, batch_size=64, seed=0, **knobs)
        return train(build_model(spec), X, y, settings, device="cpu").steps

    with tempfile.TemporaryDirectory() as tmp:
        path = tiny_llama(Path(tmp) / "m")
        lm = build_model(
            ModelSpec(family=CAUSAL_LM, n_features=16, n_classes=42, hf_path=str(path))
        )
    ids = lm.tokenize(sentences("kitchen", 128, seed=1))  # type: ignore[operator]
    labels = torch.zeros(len(ids), dtype=torch.long)

    def llama() -> int:
        settings = TrainSettings(steps=40, batch_size=16, lr=1e-2, seed=0, **knobs)
        return train(copy.deepcopy(lm), ids, labels, settings, device="cpu").steps

    for name, run in (("digits MLP, 400 steps x 64 rows", mlp), ("tiny Llama, 40 x 16", llama)):
        median, least = _cpu_ms_per_step(run)
        print(f"{knobs or 'defaults'} {name}: {median:.3f} CPU-ms/step median (min {least:.3f})")


if __name__ == "__main__":
    main(sys.argv[1:])
