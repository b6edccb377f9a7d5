"""Benchmark: per-example diagonal Fisher and the EWC penalty gradient, against plain PyTorch.

Run: `python -m benchmarks.bench_fisher` (add `--quick` for a smoke run). Prints a Markdown table
and writes `benchmarks/results/fisher.json`.

Same process, same models, same data (N=2048 on CPU):
  Fisher  on an MLP, a small transformer, and the same transformer with only its Linear layers
          trainable (as with LoRA adapters):
          (a) baseline: per-example autograd loop (`brute_force_fisher`)
          (b) vmap(grad(functional_call)) for every parameter
          (c) `diagonal_fisher`: closed-form (g∘g)ᵀ(a∘a) for nn.Linear + vmap for the rest
  EWC     (a) baseline: autograd graph of λΣF(θ−θ*)² and backward
          (b) `EWC.add_penalty_grad_`: 2λF(θ−θ*) with torch._foreach ops, no graph
Every fast result is checked against its baseline (max error relative to the largest value).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from continual.ewc import EWC, brute_force_fisher, diagonal_fisher, fisher_paths

RESULTS = Path(__file__).resolve().parent / "results" / "fisher.json"


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


def _mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
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


def _max_rel_error(got: dict[str, Tensor], want: dict[str, Tensor]) -> float:
    scale = max(float(v.abs().max()) for v in want.values())
    return max(float((got[k] - want[k]).abs().max()) for k in want) / scale


def bench_fisher_model(name: str, model: nn.Module, n: int) -> dict[str, Any]:
    """Time the three Fisher implementations on one model and check they agree."""
    gen = torch.Generator().manual_seed(0)
    X, y = torch.randn(n, 64, generator=gen), torch.randint(0, 10, (n,), generator=gen)
    diagonal_fisher(model, X[:8], y[:8], linear_fast_path=False)  # warm-up (lazy imports)
    t_base, base = _timed(lambda: brute_force_fisher(model, X, y))
    t_vmap, vmapped = _timed(lambda: diagonal_fisher(model, X, y, linear_fast_path=False), 2)
    t_ours, ours = _timed(lambda: diagonal_fisher(model, X, y), 2)
    paths = list(fisher_paths(model, X, y).values())
    return {
        "model": name,
        "n_params": sum(p.numel() for p in model.parameters()),
        "params_linear_path": paths.count("linear"),
        "params_vmap_path": paths.count("vmap"),
        "N": n,
        "seconds": {"autograd_loop": t_base, "vmap_all": t_vmap, "diagonal_fisher": t_ours},
        "speedup_vs_loop": {"vmap_all": t_base / t_vmap, "diagonal_fisher": t_base / t_ours},
        "max_rel_error_vs_loop": {
            "vmap_all": _max_rel_error(vmapped, base),
            "diagonal_fisher": _max_rel_error(ours, base),
        },
    }


def _autograd_penalty_grad(model: nn.Module, ewc: EWC) -> None:
    fisher, anchor = ewc.fisher, ewc.anchor
    params = dict(model.named_parameters())
    penalty = sum(ewc.lam * (fisher[n] * (params[n] - anchor[n]).square()).sum() for n in fisher)
    penalty.backward()


def bench_penalty_grad(name: str, model: nn.Module, repeats: int) -> dict[str, Any]:
    """Time the EWC gradient: autograd graph vs foreach, from zeroed grads, and compare."""
    gen = torch.Generator().manual_seed(1)
    X, y = torch.randn(256, 64, generator=gen), torch.randint(0, 10, (256,), generator=gen)
    ewc = EWC.from_model(model, X, y, lam=100.0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.01)

    def run(step: Callable[[], None]) -> list[Tensor]:
        for _ in range(repeats):
            model.zero_grad(set_to_none=False)
            step()
        return [p.grad.clone() for p in model.parameters()]

    for step in (lambda: _autograd_penalty_grad(model, ewc), lambda: ewc.add_penalty_grad_(model)):
        run(step)  # warm-up, builds add_penalty_grad_'s cached plan
    t_graph, graph = _timed(lambda: run(lambda: _autograd_penalty_grad(model, ewc)), 3)
    t_foreach, foreach = _timed(lambda: run(lambda: ewc.add_penalty_grad_(model)), 3)
    scale = max(float(g.abs().max()) for g in graph)
    error = max(float((a - b).abs().max()) for a, b in zip(foreach, graph, strict=True)) / scale
    return {
        "model": name,
        "calls": repeats,
        "ms_per_call": {
            "autograd_graph": 1e3 * t_graph / repeats,
            "add_penalty_grad_": 1e3 * t_foreach / repeats,
        },
        "speedup": t_graph / t_foreach,
        "max_rel_error": error,
    }


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"Fisher, N={result['fisher'][0]['N']}, torch {result['torch']}, "
        f"{result['threads']} threads",
        "",
        "| model | params (tensors on linear/vmap path) | autograd loop s | vmap all s | "
        "diagonal_fisher s | speed-up vmap | speed-up ours | max rel err |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in result["fisher"]:
        s, up, err = row["seconds"], row["speedup_vs_loop"], row["max_rel_error_vs_loop"]
        lines.append(
            f"| {row['model']} | {row['n_params']} ({row['params_linear_path']}/"
            f"{row['params_vmap_path']}) | {s['autograd_loop']:.2f} | {s['vmap_all']:.3f} | "
            f"{s['diagonal_fisher']:.3f} | {up['vmap_all']:.1f}× | {up['diagonal_fisher']:.1f}× | "
            f"{max(err.values()):.1e} |"
        )
    lines += [
        "",
        "| EWC gradient | autograd graph ms | add_penalty_grad_ ms | speed-up | max rel err |",
        "|---|---|---|---|---|",
    ]
    for row in result["penalty_grad"]:
        ms = row["ms_per_call"]
        lines.append(
            f"| {row['model']} | {ms['autograd_graph']:.3f} | {ms['add_penalty_grad_']:.3f} | "
            f"{row['speedup']:.1f}× | {row['max_rel_error']:.1e} |"
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
    n, repeats = (256, 10) if quick else (2048, 50)
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
        "fisher": [bench_fisher_model(name, m, n) for name, m in fisher_models.items()],
        "penalty_grad": [bench_penalty_grad(name, m, repeats) for name, m in models.items()],
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
