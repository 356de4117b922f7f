"""Kernel-product benchmark (ratios to one forward+backward pass); the code lives in ``linadapt.bench``.

python benchmarks/bench_kernel_products.py [--reps 9] [--n 1024] [--threads 2]    (same as `linadapt bench`)
"""

from __future__ import annotations

import argparse

from linadapt.bench import format_table, run_bench


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    print(format_table(run_bench(args.reps, args.n, args.threads), args.reps, args.n, args.threads))


if __name__ == "__main__":
    main()
