"""Benchmark: continual-learning quality and training cost on permuted digits, vs plain PyTorch.

Run: `python -m benchmarks.bench_quality` (`--quick` for a smoke run). Prints Markdown tables and
writes `benchmarks/results/quality.json`.

A 5-task permuted-digits sequence (scikit-learn's real digits, a fixed pixel permutation per
task) is learned in order by the same MLP with: naive fine-tuning (the plain PyTorch baseline),
online EWC, reservoir replay, and both. Reported: average accuracy and forgetting (max-based)
from the accuracy matrix, and seconds per training step relative to the plain loop measured in
the same run (EWC's analytic foreach penalty gradient vs the textbook autograd penalty).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits

from continual.ewc import EWC
from continual.inference import accuracy
from continual.metrics import AccuracyMatrix, average_accuracy, forgetting
from continual.models import ModelSpec, build_model, fit_standardizer
from continual.replay import ReservoirBuffer
from continual.training import TrainSettings, train

RESULTS = Path(__file__).resolve().parent / "results" / "quality.json"


def permuted_tasks(n_tasks: int, seed: int = 0):
    digits = load_digits()
    X = digits.data.astype("float32")
    y = digits.target.astype("int64")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(X))
    train_idx, test_idx = order[:1300], order[1300:]
    tasks = []
    for t in range(n_tasks):
        perm = np.arange(64) if t == 0 else rng.permutation(64)
        Xp = X[:, perm]
        tasks.append(
            (
                (torch.from_numpy(Xp[train_idx]), torch.from_numpy(y[train_idx])),
                (torch.from_numpy(Xp[test_idx]), torch.from_numpy(y[test_idx])),
            )
        )
    return tasks, X


def run_method(method: str, tasks, X_all, steps: int, lam: float, seed: int = 0) -> dict:
    mean, std = fit_standardizer(X_all)
    spec = ModelSpec(
        family="mlp", n_features=64, n_classes=10, hidden=[128, 64], input_mean=mean, input_std=std
    )
    torch.manual_seed(seed)
    model = build_model(spec)
    R = AccuracyMatrix(len(tasks))
    ewc, buffer = None, None
    if "replay" in method:
        buffer = ReservoirBuffer(600, 64, seed=seed)
    started = time.perf_counter()
    total_steps = 0
    for i, ((Xtr, ytr), _) in enumerate(tasks):
        settings = TrainSettings(steps=steps, batch_size=64, lr=1e-3, seed=seed + i)
        ratio = 0.5 if buffer is not None and len(buffer) else 0.0
        train(
            model, Xtr, ytr, settings, ewc=ewc, replay=buffer if ratio else None, replay_ratio=ratio
        )
        total_steps += steps
        if "ewc" in method:
            if ewc is None:
                ewc = EWC.from_model(model, Xtr, ytr, lam=lam, gamma=1.0)
            else:
                ewc.consolidate(model, Xtr, ytr)
        if buffer is not None:
            buffer.add(Xtr, ytr, batch_id=str(i))
        for j, (_, (Xte, yte)) in enumerate(tasks[: i + 1]):
            R.set(i, j, accuracy(model, Xte, yte))
    seconds = time.perf_counter() - started
    return {
        "method": method,
        "average_accuracy": average_accuracy(R.values),
        "forgetting": forgetting(R.values),
        "seconds": seconds,
        "ms_per_step": 1000 * seconds / total_steps,
        "matrix": R.values.round(4).tolist(),
    }


def penalty_step_cost(steps: int = 200) -> dict:
    """ms per training step: plain loop, + EWC autograd penalty (textbook), + EWC foreach."""
    digits = load_digits()
    X = torch.tensor(digits.data, dtype=torch.float32)
    y = torch.tensor(digits.target)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 512),
        torch.nn.ReLU(),
        torch.nn.Linear(512, 512),
        torch.nn.ReLU(),
        torch.nn.Linear(512, 10),
    )
    ewc = EWC.from_model(model, X[:256], y[:256], lam=100.0)
    fisher, anchor = ewc.fisher, ewc.anchor
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def loop(mode: str) -> float:
        generator = torch.Generator().manual_seed(0)
        start = time.perf_counter()
        for _ in range(steps):
            idx = torch.randint(0, len(X), (64,), generator=generator)
            optimizer.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(model(X[idx]), y[idx])
            if mode == "autograd":
                loss = loss + 100.0 * sum(
                    (fisher[n] * (p - anchor[n]) ** 2).sum() for n, p in model.named_parameters()
                )
            loss.backward()
            if mode == "foreach":
                ewc.add_penalty_grad_(model)
            optimizer.step()
        return 1000 * (time.perf_counter() - start) / steps

    loop("plain")  # warm-up
    plain, autograd, foreach = loop("plain"), loop("autograd"), loop("foreach")
    return {
        "ms_per_step": {"plain": plain, "ewc_autograd": autograd, "ewc_foreach": foreach},
        "overhead_vs_plain": {"ewc_autograd": autograd / plain, "ewc_foreach": foreach / plain},
    }


def run(quick: bool = False) -> dict:
    torch.set_num_threads(2)
    n_tasks, steps = (3, 60) if quick else (5, 300)
    tasks, X_all = permuted_tasks(n_tasks)
    run_method("naive", tasks[:1], X_all, 20, lam=100.0)  # warm-up: first-call overheads
    methods = [
        run_method(m, tasks, X_all, steps, lam=100.0)
        for m in ("naive", "ewc", "replay", "ewc+replay")
    ]
    result = {
        "benchmark": "quality",
        "quick": quick,
        "tasks": n_tasks,
        "steps_per_task": steps,
        "methods": methods,
        "penalty": penalty_step_cost(50 if quick else 300),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2))
    return result


def markdown(result: dict) -> str:
    naive = next(m for m in result["methods"] if m["method"] == "naive")
    lines = [
        f"Permuted digits, {result['tasks']} tasks × {result['steps_per_task']} steps (MLP 128-64)",
        "",
        "| method | avg accuracy | forgetting | ms/step | time vs naive |",
        "|---|---|---|---|---|",
    ]
    for m in result["methods"]:
        lines.append(
            f"| {m['method']} | {m['average_accuracy']:.3f} | {m['forgetting']:.3f} | "
            f"{m['ms_per_step']:.2f} | {m['seconds'] / naive['seconds']:.2f}× |"
        )
    p = result["penalty"]
    lines += [
        "",
        "| EWC penalty gradient (MLP 64-512-512-10, batch 64) | ms/step | vs plain step |",
        "|---|---|---|",
        f"| plain PyTorch step (baseline) | {p['ms_per_step']['plain']:.2f} | 1.00× |",
        f"| + autograd penalty λΣF(θ−θ*)² | {p['ms_per_step']['ewc_autograd']:.2f} | "
        f"{p['overhead_vs_plain']['ewc_autograd']:.2f}× |",
        f"| + analytic foreach 2λF(θ−θ*) | {p['ms_per_step']['ewc_foreach']:.2f} | "
        f"{p['overhead_vs_plain']['ewc_foreach']:.2f}× |",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    print(markdown(run(quick=parser.parse_args().quick)))
