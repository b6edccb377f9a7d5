"""Run every benchmark and print their Markdown tables: `make bench` (`--quick` for a smoke run)."""

from __future__ import annotations

import argparse

from benchmarks import bench_fisher, bench_gate, bench_product_quality, bench_quality


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    quick = parser.parse_args().quick
    print("## Diagonal Fisher and EWC penalty\n")
    print(bench_fisher.markdown(bench_fisher.run(quick=quick)))
    print("\n## Continual-learning quality\n")
    print(bench_quality.markdown(bench_quality.run(quick=quick)))
    print("\n## Promotion gate\n\n" + bench_gate.markdown(bench_gate.run(quick=quick)))
    print("\n## Quality through the product (validation split)\n")
    print(bench_product_quality.markdown(bench_product_quality.run(quick=quick)))


if __name__ == "__main__":
    main()
