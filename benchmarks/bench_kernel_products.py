"""Kernel-product benchmark (ratios to one forward+backward pass); the code lives in ``linadapt.app.bench``.

python benchmarks/bench_kernel_products.py [--reps 9] [--n 1024] [--threads 2] [--no-dense] [--no-plain]
(same as `linadapt bench`)
"""

from __future__ import annotations

import argparse

from linadapt.app.bench import format_dense_table, format_table, run_bench, run_dense_bench


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-dense", action="store_true", help="skip the dense-kernel table")
    parser.add_argument("--no-plain", action="store_true", help="skip the per-example Jacobian contraction")
    args = parser.parse_args()
    print(format_table(run_bench(args.reps, args.n, args.threads), args.reps, args.n, args.threads))
    if not args.no_dense:
        reps = max(1, min(args.reps, 5))
        print()
        print(format_dense_table(run_dense_bench(reps, args.threads, not args.no_plain), reps, args.threads))


if __name__ == "__main__":
    main()
