"""The ``bikeshare`` experiment: a real temporal shift in regression, winter → summer.

The offline stand-in for the paper's malaria 2012 → 2016 experiment. ISLP's Bikeshare data (8,645 hourly
records of Washington D.C.'s Capital Bikeshare in 2011, shipped inside the ISLP package) gives the number of
riders per hour with the hour, weekday, working day, holiday, weather situation, temperature, felt
temperature, humidity and wind speed. A 14-64-64-1 tanh MLP (5,185 parameters) is trained on the winter
months (December, January, February; 2,000+ hours) to predict log(1 + riders), then adapted to summer
(June, July, August)
from ``shots`` labelled hours (10, 50 and 200 by default) and scored on 1,000 other summer hours. RMSE and
NLL are reported in log(1 + riders). Methods: see :func:`linadapt.experiments.compare.compare_regression`.

Inputs: sin/cos of the hour and of the weekday, working day, holiday, weather situation one-hot (4),
temperature, felt temperature, humidity, wind speed (14 numbers); standardised with the winter statistics. Targets are
standardised with the winter mean and std (the unit in which errors are reported is restored).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from linadapt.experiments.compare import compare_regression
from linadapt.experiments.source import Step

__all__ = ["SHOTS", "bikeshare", "load_bikeshare"]

SHOTS = (10, 50, 200)
WINTER, SUMMER = ("Dec", "Jan", "Feb"), ("June", "July", "Aug")


def load_bikeshare() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(features (8645, 14) float64 before standardisation, log(1 + riders) (8645,), month names (8645,)).

    Needs the ISLP package (``pip install --no-deps ISLP``; `make setup` installs it); reads the CSV that ships
    inside it."""
    try:
        from ISLP import load_data
    except ImportError as exc:  # pragma: no cover - exercised only without the optional package
        raise ImportError(
            "the bikeshare experiment needs ISLP's bundled data: pip install --no-deps ISLP==0.6.0 "
            "(its declared dependencies are not needed to read the data)"
        ) from exc
    df = load_data("Bikeshare")
    hour = df["hr"].astype(int).to_numpy()
    weekday = df["weekday"].astype(int).to_numpy()
    weather = df["weathersit"].astype(str).to_numpy()
    kinds = sorted(set(weather))
    feats = [
        np.sin(2 * np.pi * hour / 24),
        np.cos(2 * np.pi * hour / 24),
        np.sin(2 * np.pi * weekday / 7),
        np.cos(2 * np.pi * weekday / 7),
        df["workingday"].astype(float).to_numpy(),
        df["holiday"].astype(float).to_numpy(),
        *[(weather == k).astype(float) for k in kinds],
        *[df[c].astype(float).to_numpy() for c in ("temp", "atemp", "hum", "windspeed")],
    ]
    X = np.stack(feats, axis=1)
    y = np.log1p(df["bikers"].astype(float).to_numpy())
    return X, y, df["mnth"].astype(str).to_numpy()


def make_mlp(d_in: int = 14) -> nn.Module:
    return nn.Sequential(nn.Linear(d_in, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))


def _train(X: torch.Tensor, y: torch.Tensor, seed: int, steps: int) -> nn.Module:
    """Full-batch Adam on the mean squared error, seeded."""
    torch.manual_seed(seed)
    net = make_mlp(X.shape[1])
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.mse_loss(net(X), y).backward()
        opt.step()
    return net.eval()


def bikeshare(seed: int = 0, shots: int | None = None, quick: bool = False, step: Step | None = None) -> list[dict]:
    """Records of one seed for every number of shots (see the module docstring). ``quick``: 300 source
    steps, 10 shots, 300 test hours, shorter fine-tuning; not for quoting."""
    step = step or (lambda _msg: None)
    step("bikeshare: loading ISLP's 2011 hourly records (offline)")
    X, y, month = load_bikeshare()
    winter, summer = np.isin(month, WINTER), np.isin(month, SUMMER)
    mu, sd = X[winter].mean(0), X[winter].std(0)
    sd[sd == 0] = 1.0
    y_mu, y_sd = y[winter].mean(), y[winter].std()
    Xn = torch.from_numpy((X - mu) / sd).float()
    yn = torch.from_numpy((y - y_mu) / y_sd).float().unsqueeze(1)
    src = torch.from_numpy(np.nonzero(winter)[0])
    tgt = torch.from_numpy(np.nonzero(summer)[0])
    gen = torch.Generator().manual_seed(3000 + seed)
    tgt = tgt[torch.randperm(tgt.numel(), generator=gen)]
    step(f"bikeshare: training the MLP on {src.numel():,} winter hours (seed {seed})")
    net = _train(Xn[src], yn[src], seed, 300 if quick else 3000)
    n_test = 300 if quick else 1000
    test = (Xn[tgt[:n_test]], yn[tgt[:n_test]])
    pool = tgt[n_test:]
    records: list[dict] = []
    for n_shots in (shots,) if shots else ((10,) if quick else SHOTS):
        pick = pool[torch.randperm(pool.numel(), generator=torch.Generator().manual_seed(100 * seed + n_shots))]
        pick = pick[:n_shots]
        tag = {"experiment": "bikeshare", "seed": seed, "shots": n_shots}
        records += compare_regression(
            net,
            (Xn[pick], yn[pick]),
            test,
            tag,
            seed,
            quick,
            lambda m, k=n_shots: step(f"bikeshare, {k} shots: {m}"),
            unit=float(y_sd),
        )
    return records
