"""Benchmark: per-example diagonal Fisher and the EWC penalty, against plain PyTorch.

Run: `python -m benchmarks.bench_fisher` (add `--quick` for a smoke run). Prints Markdown tables
and writes `benchmarks/results/fisher.json`. Times are medians of interleaved repeats in one
process (single-threaded by default), so ratios compare like with like on a busy machine.

Models: an MLP, a small transformer, and the same transformer with only its Linear layers
trainable (as with LoRA adapters); N=2048 random examples, 10 classes, CPU.
  (a) Fisher vs the per-example autograd loop (`brute_force_fisher`): empirical kind timed at N
      against the loop and against vmap(grad) for every parameter; every kind ("empirical",
      "true", "sampled") checked against the loop of the same kind on the first 128 examples.
  (b) every kind of `diagonal_fisher` against the cheap biased estimate most libraries ship
      (square the gradient of each mini-batch mean; |B| = 64 and 256, the latter being the
      forward batch `diagonal_fisher` uses). Target: ≤ 2× its time.
  (c) one training step of `continual.training.train` (AdamW, clipping, batch 64) on a 1.1M
      parameter MLP: plain vs EWC "proximal" (default) vs EWC "gradient". Target: ≤ 1.15×.
  EWC penalty gradient micro-benchmark: autograd graph of λΣF̂(θ−θ*)² vs `add_penalty_grad_`
  (foreach, no graph), plus the cost of one `proximal_step_`.
Every fast result is checked against its baseline (max error relative to the largest value).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from continual.ewc import EWC
from continual.fisher import diagonal_fisher, fisher_paths
from continual.fisher_reference import brute_force_fisher
from continual.training import TrainSettings, train

RESULTS = Path(__file__).resolve().parent / "results" / "fisher.json"
KINDS = ("empirical", "sampled", "true")


class _Attention(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:
        n, t, d = x.shape

        def split(z: Tensor) -> Tensor:
            return z.view(n, t, self.heads, d // self.heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)))
        return self.o(out.transpose(1, 2).reshape(n, t, d))


class TinyTransformer(nn.Module):
    """64 features → 8 tokens of 8 → Linear embed + position → 2 pre-LN blocks → head."""

    def __init__(self, d: int = 32, heads: int = 4, blocks: int = 2, classes: int = 10) -> None:
        super().__init__()
        self.embed = nn.Linear(8, d)
        self.position = nn.Parameter(torch.randn(8, d) * 0.02)
        self.blocks = nn.ModuleList(
            nn.ModuleDict(
                {
                    "norm1": nn.LayerNorm(d),
                    "attn": _Attention(d, heads),
                    "norm2": nn.LayerNorm(d),
                    "fc1": nn.Linear(d, 2 * d),
                    "fc2": nn.Linear(2 * d, d),
                }
            )
            for _ in range(blocks)
        )
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x.view(x.shape[0], 8, 8)) + self.position
        for b in self.blocks:
            h = h + b["attn"](b["norm1"](h))
            h = h + b["fc2"](F.gelu(b["fc1"](b["norm2"](h))))
        return self.head(self.norm(h.mean(dim=1)))


def _mlp(hidden: int = 256) -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, 10),
    )


def _linear_only(model: nn.Module) -> nn.Module:
    """Freeze every non-Linear parameter: the situation of LoRA adapters on a transformer."""
    for module in model.modules():
        if not isinstance(module, nn.Linear):
            for p in module.parameters(recurse=False):
                p.requires_grad_(False)
    return model


def _timed(fn: Callable[[], Any], repeats: int = 1) -> tuple[float, Any]:
    """Best wall time of `repeats` runs (seconds) and the last result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def _medians(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median wall time (seconds) of each function over `repeats` interleaved rounds."""
    for fn in fns.values():
        fn()  # warm-up: lazy imports, caches, allocator
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def _max_rel_error(got: dict[str, Tensor], want: dict[str, Tensor]) -> float:
    scale = max(float(v.abs().max()) for v in want.values())
    return max(float((got[k] - want[k]).abs().max()) for k in want) / scale


def _data(n: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 64, generator=gen), torch.randint(0, 10, (n,), generator=gen)


def squared_batch_gradients(model: nn.Module, X: Tensor, y: Tensor, batch: int) -> list[Tensor]:
    """The cheap, biased estimate: mean over mini-batches of (∇ mean-batch loss)² (≈ F/|B|)."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    for start in range(0, len(X), batch):
        loss = F.cross_entropy(model(X[start : start + batch]), y[start : start + batch])
        for acc, g in zip(total, torch.autograd.grad(loss, params), strict=True):
            acc.add_(g.square())
    return total


def bench_fisher_model(name: str, model: nn.Module, n: int, repeats: int) -> dict[str, Any]:
    """(a) and (b) on one model: times, ratios and errors against the loop of the same kind."""
    X, y = _data(n)
    t_loop, base = _timed(lambda: brute_force_fisher(model, X, y, kind="empirical"))
    fns: dict[str, Callable[[], Any]] = {
        "biased_batch64": lambda: squared_batch_gradients(model, X, y, 64),
        "biased_batch256": lambda: squared_batch_gradients(model, X, y, 256),
        "vmap_all_empirical": lambda: diagonal_fisher(
            model, X, y, kind="empirical", linear_fast_path=False
        ),
    }
    fns |= {kind: lambda kind=kind: diagonal_fisher(model, X, y, kind=kind) for kind in KINDS}
    seconds = _medians(fns, repeats)
    vmapped = diagonal_fisher(model, X, y, kind="empirical", linear_fast_path=False)
    ours = diagonal_fisher(model, X, y, kind="empirical")
    small = slice(0, 128)
    errors = {
        kind: _max_rel_error(
            diagonal_fisher(model, X[small], y[small], kind=kind),
            brute_force_fisher(model, X[small], y[small], kind=kind),
        )
        for kind in KINDS
    }
    paths = list(fisher_paths(model, X, y).values())
    return {
        "model": name,
        "n_params": sum(p.numel() for p in model.parameters()),
        "params_linear_path": paths.count("linear"),
        "params_vmap_path": paths.count("vmap"),
        "N": n,
        "seconds": {"autograd_loop_empirical": t_loop, **seconds},
        "speedup_vs_loop": {
            "vmap_all": t_loop / seconds["vmap_all_empirical"],
            "diagonal_fisher": t_loop / seconds["empirical"],
        },
        "max_rel_error_vs_loop": {
            "vmap_all": _max_rel_error(vmapped, base),
            "diagonal_fisher": _max_rel_error(ours, base),
            **{f"{kind} (N=128)": error for kind, error in errors.items()},
        },
        "ratio_vs_biased": {
            f"{kind}/batch{b}": seconds[kind] / seconds[f"biased_batch{b}"]
            for kind in KINDS
            for b in (64, 256)
        },
    }


def _autograd_penalty_grad(model: nn.Module, ewc: EWC) -> None:
    fisher, anchor, scale = ewc.fisher, ewc.anchor, ewc.fisher_scale
    params = dict(model.named_parameters())
    penalty = sum(
        ewc.lam / scale * (fisher[n] * (params[n] - anchor[n]).square()).sum() for n in fisher
    )
    penalty.backward()


def bench_penalty_grad(name: str, model: nn.Module, repeats: int) -> dict[str, Any]:
    """Time the EWC gradient (autograd graph vs foreach, from zeroed grads) and the proximal
    step, and compare the gradients."""
    X, y = _data(256, seed=1)
    ewc = EWC.from_model(model, X, y, lam=100.0, mode="gradient")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.01)

    def run(step: Callable[[], None]) -> list[Tensor]:
        for _ in range(repeats):
            model.zero_grad(set_to_none=False)
            step()
        return [p.grad.clone() for p in model.parameters()]

    graph = run(lambda: _autograd_penalty_grad(model, ewc))
    foreach = run(lambda: ewc.add_penalty_grad_(model))
    state = {n: p.detach().clone() for n, p in model.named_parameters()}
    times = _medians(
        {
            "autograd_graph": lambda: run(lambda: _autograd_penalty_grad(model, ewc)),
            "add_penalty_grad_": lambda: run(lambda: ewc.add_penalty_grad_(model)),
            "proximal_step_": lambda: [ewc.proximal_step_(model, 1e-9) for _ in range(repeats)],
        },
        3,
    )
    model.load_state_dict(state, strict=False)
    scale = max(float(g.abs().max()) for g in graph)
    error = max(float((a - b).abs().max()) for a, b in zip(foreach, graph, strict=True)) / scale
    return {
        "model": name,
        "calls": repeats,
        "ms_per_call": {k: 1e3 * v / repeats for k, v in times.items()},
        "speedup": times["autograd_graph"] / times["add_penalty_grad_"],
        "max_rel_error": error,
    }


def bench_train_step(steps: int, repeats: int) -> dict[str, Any]:
    """(c) ms per step of `train` (AdamW, clip 5.0, batch 64): plain vs the two EWC modes."""
    torch.manual_seed(0)
    model = _mlp(hidden=1024)
    X, y = _data(2048, seed=2)
    ewc = {
        mode: EWC.from_model(model, X[:512], y[:512], lam=100.0, mode=mode)
        for mode in ("proximal", "gradient")
    }
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    settings = TrainSettings(steps=steps, batch_size=64, lr=1e-3, seed=0)

    def run(method: EWC | None) -> None:
        model.load_state_dict(start)
        train(model, X, y, settings, ewc=method, device="cpu")

    seconds = _medians(
        {"plain": lambda: run(None), **{f"ewc_{m}": lambda m=m: run(ewc[m]) for m in ewc}},
        repeats,
    )
    ms = {name: 1e3 * value / steps for name, value in seconds.items()}
    return {
        "model": "mlp 64-1024-1024-10",
        "n_params": sum(p.numel() for p in model.parameters()),
        "batch": 64,
        "steps": steps,
        "ms_per_step": ms,
        "ratio_vs_plain": {k: v / ms["plain"] for k, v in ms.items() if k != "plain"},
    }


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"Fisher, N={result['fisher'][0]['N']}, torch {result['torch']}, "
        f"{result['threads']} threads; times are medians",
        "",
        "(a) | model | params (tensors on linear/vmap path) | autograd loop s | vmap all s | "
        "diagonal_fisher s | speed-up vmap | speed-up ours | max rel err (all kinds) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in result["fisher"]:
        s, up, err = row["seconds"], row["speedup_vs_loop"], row["max_rel_error_vs_loop"]
        lines.append(
            f"| {row['model']} | {row['n_params']} ({row['params_linear_path']}/"
            f"{row['params_vmap_path']}) | {s['autograd_loop_empirical']:.2f} | "
            f"{s['vmap_all_empirical']:.3f} | {s['empirical']:.3f} | {up['vmap_all']:.1f}× | "
            f"{up['diagonal_fisher']:.1f}× | {max(err.values()):.1e} |"
        )
    lines += [
        "",
        "(b) | model | biased |B|=64 s | biased |B|=256 s | "
        + " | ".join(f"{k} s (vs 64 / 256)" for k in KINDS)
        + " |",
        "|---|---|---|" + "---|" * len(KINDS),
    ]
    for row in result["fisher"]:
        s, r = row["seconds"], row["ratio_vs_biased"]
        cells = [
            f"{s[k]:.3f} ({r[f'{k}/batch64']:.1f}× / {r[f'{k}/batch256']:.1f}×)" for k in KINDS
        ]
        lines.append(
            f"| {row['model']} | {s['biased_batch64']:.3f} | {s['biased_batch256']:.3f} | "
            + " | ".join(cells)
            + " |"
        )
    step = result["train_step"]
    ms, ratio = step["ms_per_step"], step["ratio_vs_plain"]
    lines += [
        "",
        f"(c) training step, {step['model']} ({step['n_params']} params), batch {step['batch']}",
        "",
        "| plain ms | EWC proximal ms | EWC gradient ms | proximal vs plain | gradient vs plain |",
        "|---|---|---|---|---|",
        f"| {ms['plain']:.2f} | {ms['ewc_proximal']:.2f} | {ms['ewc_gradient']:.2f} | "
        f"{ratio['ewc_proximal']:.3f}× | {ratio['ewc_gradient']:.3f}× |",
        "",
        "| EWC penalty | autograd graph ms | add_penalty_grad_ ms | proximal_step_ ms | "
        "speed-up | max rel err |",
        "|---|---|---|---|---|---|",
    ]
    for row in result["penalty_grad"]:
        ms = row["ms_per_call"]
        lines.append(
            f"| {row['model']} | {ms['autograd_graph']:.3f} | {ms['add_penalty_grad_']:.3f} | "
            f"{ms['proximal_step_']:.3f} | {row['speedup']:.1f}× | {row['max_rel_error']:.1e} |"
        )
    return "\n".join(lines)


def run(quick: bool = False, threads: int | None = 1) -> dict[str, Any]:
    """Run the benchmark, write `benchmarks/results/fisher.json`, return the results.

    Args:
        quick: N=256 and fewer repeats (a smoke run).
        threads: torch intra-op threads for the run (None: leave as is). One by default:
            per-example work is many small ops that intra-op threads barely speed up, and
            single-threaded timings stay stable on a shared machine.

    Raises:
        AssertionError: a fast implementation disagrees with its baseline (rel. error > 1e-4).
    """
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _run(quick)
    finally:
        torch.set_num_threads(previous_threads)


def _run(quick: bool) -> dict[str, Any]:
    torch.manual_seed(0)
    n, repeats, calls, steps = (256, 3, 10, 10) if quick else (2048, 7, 50, 30)
    step_repeats = 3 if quick else 15  # a whole step is short: more rounds for a stable median
    models = {"mlp 64-256-256-10": _mlp(), "tiny transformer": TinyTransformer()}
    fisher_models = {
        **models,
        "tiny transformer, Linear-only trainable": _linear_only(TinyTransformer()),
    }
    result: dict[str, Any] = {
        "benchmark": "fisher",
        "quick": quick,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "fisher": [bench_fisher_model(name, m, n, repeats) for name, m in fisher_models.items()],
        "train_step": bench_train_step(steps, step_repeats),
        "penalty_grad": [bench_penalty_grad(name, m, calls) for name, m in models.items()],
    }
    for row in result["fisher"]:
        assert max(row["max_rel_error_vs_loop"].values()) < 1e-4, row
    for row in result["penalty_grad"]:
        assert row["max_rel_error"] < 1e-4, row
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N=256 and fewer repeats")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1)")
    args = parser.parse_args()
    result = run(quick=args.quick, threads=args.threads)
    print(markdown(result))
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
