"""The ``sinusoids`` experiment: few-shot regression on the meta-learning sinusoid family.

Task family: y = A sin(ω x + b) with A ~ U[0.1, 5], b ~ U[0, 2π], ω ~ U[0.5, 2], x ~ U[−5, 5], observation
noise of standard deviation 0.01·A. Per seed:

* ``family``: a 1-40-40-1 tanh network is trained on 1,000 points of one task of the family and adapted to
  another task of the family;
* ``phase``: the network is trained on y = sin(x) and adapted to y = sin(x + b), b ~ U[0, 2π] — the shift
  where a plain RBF-kernel GP is known to compete (the source network's features still fit the target).

For each number of target points (``shots``; 5, 10 and 20 by default) the same draw of target points feeds
every method: the unadapted source network, fine-tuning (all weights, last layer, biases; Adam, early
stopping on 20% of the points), a GP with an ARD RBF kernel on the raw inputs, ABLR on the network's
last-layer features, linadapt (all weights; last layer), and ``linadapt-rbf``: linadapt's GP with an
ARD RBF kernel term added, every scale chosen by the marginal likelihood (the within-method fix for targets
the tangent features cannot express). Metrics on 500 fresh noisy test points of
the target task: RMSE and the Gaussian NLL. Point predictors (source, fine-tuning) get a constant
predictive std: their RMS residual on the target points they were given (floored at 10⁻³).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from linadapt.experiments.compare import compare_regression
from linadapt.experiments.source import Step

__all__ = ["SHOTS", "make_mlp", "sample_task", "sinusoids"]

SHOTS = (5, 10, 20)


def make_mlp() -> nn.Module:
    """The 1-40-40-1 tanh network of the sinusoid literature (float64)."""
    return nn.Sequential(nn.Linear(1, 40), nn.Tanh(), nn.Linear(40, 40), nn.Tanh(), nn.Linear(40, 1)).double()


def sample_task(gen: torch.Generator) -> tuple[float, float, float]:
    """(A, b, ω) from the family: A ~ U[0.1, 5], b ~ U[0, 2π], ω ~ U[0.5, 2]."""
    u = torch.rand(3, generator=gen, dtype=torch.float64)
    return 0.1 + 4.9 * float(u[0]), 2 * math.pi * float(u[1]), 0.5 + 1.5 * float(u[2])


def _points(task: tuple[float, float, float], n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    amp, phase, freq = task
    x = torch.rand(n, 1, generator=gen, dtype=torch.float64) * 10 - 5
    y = amp * torch.sin(freq * x + phase) + 0.01 * amp * torch.randn(n, 1, generator=gen, dtype=torch.float64)
    return x, y


def _train(task: tuple[float, float, float], seed: int, steps: int) -> nn.Module:
    """Adam (lr 3e-3, full batch, cosine decay) on 1,000 points of ``task``."""
    gen = torch.Generator().manual_seed(10_000 + seed)
    torch.manual_seed(seed)
    net = make_mlp()
    x, y = _points(task, 1000, gen)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.mse_loss(net(x), y).backward()
        opt.step()
        sched.step()
    return net.eval()


def sinusoids(seed: int = 0, shots: int | None = None, quick: bool = False, step: Step | None = None) -> list[dict]:
    """Records of one seed (both variants, every number of shots; see the module docstring).

    ``shots``: one number of target points instead of 5, 10 and 20. ``quick``: a smoke-test size (shorter
    source training and fine-tuning, 10 shots only); its numbers are not meant to be quoted.
    """
    step = step or (lambda _msg: None)
    shot_list = (shots,) if shots else ((10,) if quick else SHOTS)
    gen = torch.Generator().manual_seed(seed)
    source_task, target_task = sample_task(gen), sample_task(gen)
    phase_shift = 2 * math.pi * float(torch.rand(1, generator=gen, dtype=torch.float64))
    variants = {
        "family": (source_task, target_task),
        "phase": ((1.0, 0.0, 1.0), (1.0, phase_shift, 1.0)),
    }
    steps = 300 if quick else 3000
    records: list[dict] = []
    for variant, (src_task, tgt_task) in variants.items():
        step(f"sinusoids/{variant}: training the source network (seed {seed})")
        net = _train(src_task, seed, steps)
        for n_shots in shot_list:
            data_gen = torch.Generator().manual_seed(100 * seed + n_shots)
            train = _points(tgt_task, n_shots, data_gen)
            test = _points(tgt_task, 500, data_gen)
            tag = {"experiment": "sinusoids", "variant": variant, "seed": seed, "shots": n_shots}
            records += compare_regression(
                net,
                train,
                test,
                tag,
                seed,
                quick,
                lambda m, v=variant, k=n_shots: step(f"sinusoids/{v}, {k} shots: {m}"),
            )
    return records
