"""The ``active`` experiment: labelling rounds on the rotated-digit shift of ``rotated-mnist``, by ``query`` or at
random from the same pool.

The source CNN of :mod:`linadapt.experiments.rotated_mnist` (trained on 3,500 upright MNIST digits) is adapted by
:class:`~linadapt.LinearizedClassifier` (all weights, probit readout) to the other 1,500 digits rotated by 60°:
1,000 of them are the test set, 300 of the other 500 the unlabelled pool (sized so that 5 seeds run in minutes on
2 CPU cores). Both strategies start from the same 10
random labels of the pool and add 10 per round for 5 rounds (60 labels at the end): ``query`` adds the picks of
``clf.query(pool, 10)`` (BALD, greedy joint choice), ``random`` 10 pool points drawn at random. After every round the
classifier is refitted (its prior variance by the evidence) and scored on the test digits (accuracy, NLL). Records:
``method`` ``query`` / ``random``, ``shots`` the number of labels. ``quick``: one source epoch, 2 rounds, 300 test
digits.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from linadapt import metrics
from linadapt.estimators.classifier import LinearizedClassifier
from linadapt.experiments.rotated_mnist import source_and_rotated
from linadapt.experiments.source import Step

__all__ = ["active"]

POOL, TEST, START, BATCH, ROUNDS = 300, 1000, 10, 10, 5


def active(seed: int = 0, shots: int | None = None, quick: bool = False, step: Step | None = None) -> list[dict]:
    """One seed of the active-labelling experiment (see the module docstring); ``shots``: labels added per round
    (default 10)."""
    step = step or (lambda _msg: None)
    batch = int(shots or BATCH)
    rounds = 2 if quick else ROUNDS
    net, Xr, yr = source_and_rotated(seed, 60.0, quick, step, "active")
    order = torch.randperm(Xr.shape[0], generator=torch.Generator().manual_seed(seed))
    test, pool = order[: 300 if quick else TEST], order[TEST : TEST + POOL]
    Xt, yt, Xp, yp = Xr[test], yr[test], Xr[pool], yr[pool]
    rng = np.random.default_rng(seed)
    start = rng.choice(Xp.shape[0], START, replace=False)
    records = []
    for method in ("query", "random"):
        labelled = list(start)
        pick_rng = np.random.default_rng(10_000 + seed)
        for r in range(rounds + 1):
            step(f"active: {method}, round {r} ({len(labelled)} labels)")
            t = time.perf_counter()
            clf = LinearizedClassifier(net, params="all", link="probit").fit(Xp[labelled], yp[labelled])
            fit_seconds = time.perf_counter() - t
            proba = clf.predict_proba(Xt)
            scores = {"accuracy": metrics.accuracy(proba, yt), "nll": metrics.nll(proba, yt)}
            record = {
                "experiment": "active",
                "method": method,
                "seed": seed,
                "shots": len(labelled),
                "shots_unit": "labels (all classes)",
            }
            query_seconds = 0.0
            if r < rounds:
                rest = np.setdiff1d(np.arange(Xp.shape[0]), labelled)
                t = time.perf_counter()
                if method == "query":
                    chosen = rest[clf.query(Xp[rest], batch)]
                else:
                    chosen = pick_rng.choice(rest, batch, replace=False)
                query_seconds = time.perf_counter() - t
                labelled += [int(i) for i in chosen]
            records.append({**record, "metrics": scores, "fit_seconds": fit_seconds, "query_seconds": query_seconds})
    return records
