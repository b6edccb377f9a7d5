"""Run every benchmark and print their Markdown tables: `make bench` (`--quick` for a smoke run).

Each writes JSON (and most a Markdown table) under benchmarks/results/. The growth benchmark
(100 daily cycles, long) runs on its own: `make bench-growth`.
"""

from __future__ import annotations

import argparse

from benchmarks import (
    bench_causal_lm,
    bench_data_plane,
    bench_fisher,
    bench_gate,
    bench_product_quality,
    bench_quality,
    bench_speed,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    quick = parser.parse_args().quick
    print("## Diagonal Fisher and EWC penalty\n")
    print(bench_fisher.markdown(bench_fisher.run(quick=quick)))
    print("\n## Speed against plain PyTorch and fixed cost per run\n")
    print(bench_speed.markdown(bench_speed.run(quick=quick)))
    print("\n## Continual-learning quality\n")
    print(bench_quality.markdown(bench_quality.run(quick=quick)))
    print("\n## Promotion gate\n\n" + bench_gate.markdown(bench_gate.run(quick=quick)))
    print("\n## Quality through the product (validation split)\n")
    print(bench_product_quality.markdown(bench_product_quality.run(quick=quick)))
    print("\n## Data plane: reading + validating Parquet (1M rows × 64 columns)\n")
    print(bench_data_plane.markdown(bench_data_plane.run(quick=quick)))
    print("\n## Causal LM continual pre-training: per-domain perplexity\n")
    budget = bench_causal_lm.QUICK if quick else bench_causal_lm.FULL
    print(bench_causal_lm.markdown(bench_causal_lm.run(budget, quick=quick)))


if __name__ == "__main__":
    main()
