"""Fine-tuning baselines: the standard way to adapt a trained network, to compare linadapt against.

``finetune`` copies the network and trains the chosen parameters (all, the last layer, or biases — the same
``params`` choices as linadapt) with Adam on the target data, early-stopping on a held-out part of it. Inputs
are a tensor or keyword inputs (a :class:`~linadapt._inputs.KeywordInputs`: the network is called as
``model(**X)``); the network's return value is read as linadapt reads it (a tensor, a dict's ``"logits"``, an
object's ``.logits``).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from linadapt.estimators.regressor import LinearizedRegressor
from linadapt.inference.evidence import single_threaded_blas
from linadapt.jacobian.inputs import forward_outputs
from linadapt.jacobian.selection import ParamSpec, select_parameters
from linadapt.kernels.gpytorch_kernel import NTKKernel

__all__ = [
    "FineTuned",
    "GaussianPredictor",
    "LaplaceTorchBaseline",
    "ablr",
    "finetune",
    "laplace_torch",
    "last_layer_features",
    "ntk_plus_rbf_gp",
    "rbf_gp",
]


@dataclass
class FineTuned:
    """A fine-tuned copy of a network: ``model`` (eval mode), the epoch kept, and the epochs run."""

    model: nn.Module
    best_epoch: int
    epochs_run: int

    @torch.no_grad()
    def logits(self, X: Any, batch: int = 1024) -> torch.Tensor:
        """The fine-tuned network's outputs at X, (m, c), in batches."""
        return torch.cat([forward_outputs(self.model, X[i : i + batch]) for i in range(0, X.shape[0], batch)])

    def predict_proba(self, X: torch.Tensor) -> np.ndarray:
        """Softmax of the logits, (m, c), float64."""
        return torch.softmax(self.logits(X).double(), 1).numpy()

    def predict(self, X: torch.Tensor) -> np.ndarray:
        """The outputs at X, (m, c), float64 (a regression network's predictions)."""
        return self.logits(X).double().numpy()


def finetune(
    model: nn.Module,
    X: Any,
    y: torch.Tensor,
    task: str = "classification",
    params: ParamSpec = "all",
    epochs: int = 200,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    batch_size: int = 64,
    val_fraction: float = 0.2,
    patience: int = 20,
    seed: int = 0,
) -> FineTuned:
    """Fine-tune a copy of ``model`` on (X, y) and return the weights with the best held-out loss.

    Args:
        model: the trained network (not modified).
        X: target inputs: a tensor, or keyword inputs (:class:`~linadapt._inputs.KeywordInputs`).
        y: class labels (classification), 0/1 labels (n,) (binary: a one-output network), a 0/1 matrix (n, c)
            (multilabel), or targets shaped like the output (regression).
        task: ``"classification"`` (cross-entropy), ``"binary"`` or ``"multilabel"`` (binary cross-entropy
            with logits, a sigmoid per output) or ``"regression"`` (mean squared error).
        params: which parameters are trained (as in linadapt); the others stay frozen.
        epochs: the budget.
        lr: Adam's learning rate.
        weight_decay: Adam's weight decay.
        batch_size: examples per step.
        val_fraction: share of (X, y) held out for early stopping (at least one example; none when n < 5,
            in which case the last epoch is kept).
        patience: stop after this many epochs without held-out improvement.
        seed: seeds the split, the batches and dropout.

    BatchNorm layers stay in eval mode (running statistics are not updated from a few target examples);
    dropout is active during training.
    """
    if task not in ("classification", "regression", "binary", "multilabel"):
        raise ValueError(f"task must be 'classification', 'regression', 'binary' or 'multilabel', got {task!r}")
    net = copy.deepcopy(model)
    names = set(select_parameters(net, params))
    trainable = []
    for name, p in net.named_parameters():
        p.requires_grad_(name in names)
        if name in names:
            trainable.append(p)
    gen = torch.Generator().manual_seed(seed)
    n = X.shape[0]
    n_val = max(1, round(val_fraction * n)) if n >= 5 and val_fraction > 0 else 0
    perm = torch.randperm(n, generator=gen)
    val, tr = perm[:n_val], perm[n_val:]

    def loss_fn(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if task == "classification":
            return nn.functional.cross_entropy(out, target)
        if task in ("binary", "multilabel"):
            return nn.functional.binary_cross_entropy_with_logits(out.reshape(target.shape), target.to(out.dtype))
        return nn.functional.mse_loss(out.reshape(target.shape), target.to(out.dtype))

    def set_mode() -> None:
        net.train()
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()

    opt = torch.optim.Adam(trainable, lr=lr, weight_decay=weight_decay)
    best, best_state, best_epoch, since = math.inf, copy.deepcopy(net.state_dict()), 0, 0
    epoch = 0
    for epoch in range(1, epochs + 1):
        set_mode()
        order = tr[torch.randperm(tr.numel(), generator=gen)]
        for i in range(0, order.numel(), batch_size):
            idx = order[i : i + batch_size]
            opt.zero_grad()
            loss_fn(forward_outputs(net, X[idx]), y[idx]).backward()
            opt.step()
        if n_val:
            net.eval()
            with torch.no_grad():
                score = float(loss_fn(forward_outputs(net, X[val]), y[val]))
            if score < best:
                best, best_state, best_epoch, since = score, copy.deepcopy(net.state_dict()), epoch, 0
            else:
                since += 1
                if since >= patience:
                    break
    if n_val:
        net.load_state_dict(best_state)
    else:
        best_epoch = epoch
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return FineTuned(net, best_epoch, epoch)


# ---------------------------------------------------------------------------------------------- GP baselines
@dataclass
class GaussianPredictor:
    """A fitted Gaussian regression baseline: ``predict(X)`` → (mean, std) of y (noise included), shaped (m,)."""

    name: str
    predict_fn: object
    hyperparameters: dict

    def predict(self, X: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Predictive mean and variance at X, each (m,) (float64 numpy arrays)."""
        mean, var = self.predict_fn(X)  # type: ignore[operator]
        return mean.numpy(), np.sqrt(np.maximum(var.numpy(), 1e-300))


def _as_2d(X: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(X).reshape(X.shape[0], -1).to(torch.float64)


def _mean_std(T: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation over the rows of T (std floored at 1e-8; 1 when there is a single row),
    for standardising GP inputs and targets."""
    sd = T.std(0).clamp_min(1e-8) if T.shape[0] > 1 else torch.ones(T.shape[1:], dtype=T.dtype)
    return T.mean(0), sd


def rbf_gp(X: torch.Tensor, y: torch.Tensor, iters: int = 300, lr: float = 0.05, seed: int = 0) -> GaussianPredictor:
    """Exact GP regression on the raw inputs with a scaled RBF kernel with one length scale per input
    dimension (ARD), a constant mean and Gaussian noise, all learned by maximising the marginal likelihood
    (GPyTorch, Adam, ``iters`` steps). Inputs and targets are standardised with the training statistics.

    Args: X (n, ...) inputs (flattened to (n, d)); y (n,) or (n, 1) targets.
    """
    import gpytorch

    torch.manual_seed(seed)
    Xf = _as_2d(X)
    yf = torch.as_tensor(y, dtype=torch.float64).reshape(-1)
    if Xf.shape[0] != yf.shape[0]:
        raise ValueError(f"X has {Xf.shape[0]} rows but y has {yf.shape[0]} targets")
    (x_mu, x_sd), (y_mu, y_sd) = _mean_std(Xf), _mean_std(yf)
    Xs, ys = (Xf - x_mu) / x_sd, (yf - y_mu) / y_sd

    class _GP(gpytorch.models.ExactGP):
        def __init__(self, likelihood):
            super().__init__(Xs, ys, likelihood)
            self.mean_module = gpytorch.means.ConstantMean()
            self.covar_module = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel(ard_num_dims=Xs.shape[1]))

        def forward(self, x):
            return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))

    likelihood = gpytorch.likelihoods.GaussianLikelihood().double()
    model = _GP(likelihood).double()
    model.train()
    likelihood.train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
    for _ in range(iters):
        opt.zero_grad()
        loss = -mll(model(Xs), ys)
        loss.backward()
        opt.step()
    model.eval()
    likelihood.eval()

    def predict(Xn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad(), gpytorch.settings.fast_pred_var(False):
            out = likelihood(model((_as_2d(Xn) - x_mu) / x_sd))
            return out.mean * y_sd + y_mu, out.variance * y_sd**2

    hyper = {
        "noise_var": float(likelihood.noise.detach()) * float(y_sd) ** 2,
        "outputscale": float(model.covar_module.outputscale.detach()),
        "lengthscales": model.covar_module.base_kernel.lengthscale.detach().reshape(-1).tolist(),
    }
    return GaussianPredictor("rbf-gp", predict, hyper)


def last_layer_features(model: nn.Module, X: torch.Tensor) -> torch.Tensor:
    """The inputs of the model's last ``nn.Linear`` layer (its penultimate features), (n, d), float64."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer: no last-layer features for ABLR")
    captured: list[torch.Tensor] = []
    handle = linears[-1].register_forward_hook(lambda _m, inp, _out: captured.append(inp[0].detach()))
    try:
        with torch.no_grad():
            model.eval()
            model(X)
    finally:
        handle.remove()
    return captured[0].reshape(X.shape[0], -1).to(torch.float64)


def ablr(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> GaussianPredictor:
    """Adaptive Bayesian linear regression (Perrone et al., 2018) on the network's last-layer features:
    y = [φ(x), 1] w + ε, w ~ N(0, α⁻¹ I), ε ~ N(0, β⁻¹), with α and β maximising the evidence.

    The evidence is computed from one SVD of the n × (d + 1) design Φ = U S Vᵀ: with A = β ΦᵀΦ + α I,
    log p(y) = ½(D log α + n log β − β‖y − Φm‖² − α‖m‖² − log det A − n log 2π), m = β A⁻¹ Φᵀ y,
    maximised over (log α, log β) by L-BFGS-B. Predictions: mean φ*ᵀm, variance φ*ᵀA⁻¹φ* + β⁻¹.
    """
    from scipy.optimize import minimize

    Phi = torch.cat([last_layer_features(model, X), torch.ones(X.shape[0], 1, dtype=torch.float64)], 1).numpy()
    t = np.asarray(torch.as_tensor(y, dtype=torch.float64).reshape(-1))
    if Phi.shape[0] != t.shape[0]:
        raise ValueError(f"X has {Phi.shape[0]} rows but y has {t.shape[0]} targets")
    n, D = Phi.shape
    U, S, _ = np.linalg.svd(Phi, full_matrices=False)
    s2 = S**2
    Ut_y = U.T @ t
    resid_out = float(t @ t - Ut_y @ Ut_y)  # the part of y outside the column space of Φ

    def neg_evidence(z: np.ndarray) -> float:
        alpha, beta = np.exp(z)
        # in the right-singular basis A is diagonal on the first r directions: β s² + α, and α elsewhere
        m_coef = beta * S * Ut_y / (beta * s2 + alpha)
        fit = float(np.sum((Ut_y - S * m_coef) ** 2)) + resid_out
        logdet = float(np.sum(np.log(beta * s2 + alpha))) + (D - S.size) * np.log(alpha)
        ev = D * np.log(alpha) + n * np.log(beta) - beta * fit - alpha * float(m_coef @ m_coef) - logdet
        return -0.5 * (ev - n * np.log(2 * np.pi))

    var_y = float(np.var(t)) if n > 1 else 1.0
    starts = [np.log([a, 1.0 / (f * max(var_y, 1e-12))]) for a in (1e-2, 1.0, 1e2) for f in (0.01, 0.1, 1.0)]
    with single_threaded_blas():
        results = [minimize(neg_evidence, z0, method="L-BFGS-B", bounds=[(-20, 20)] * 2) for z0 in starts]
    best = min(results, key=lambda r: r.fun)
    alpha, beta = np.exp(best.x)
    A = beta * Phi.T @ Phi + alpha * np.eye(D)
    A_inv = np.linalg.inv(A)
    A_inv = 0.5 * (A_inv + A_inv.T)
    m = beta * A_inv @ Phi.T @ t

    def predict(Xn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        P = torch.cat([last_layer_features(model, Xn), torch.ones(Xn.shape[0], 1, dtype=torch.float64)], 1).numpy()
        var = np.einsum("id,de,ie->i", P, A_inv, P) + 1.0 / beta
        return torch.from_numpy(P @ m), torch.from_numpy(var)

    return GaussianPredictor("ablr", predict, {"alpha": float(alpha), "beta": float(beta), "evidence": -best.fun})


def ntk_plus_rbf_gp(
    model: nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    params: ParamSpec = "all",
    iters: int = 300,
    lr: float = 0.05,
    seed: int = 0,
) -> GaussianPredictor:
    """linadapt's GP with an extra kernel term chosen by the marginal likelihood: mean f(x; θ̂), kernel
    s²·J(x)J(x')ᵀ + a²·RBF_ARD(x, x'), Gaussian noise σ² — all of s², a², the length scales and σ² learned
    by maximising the exact marginal likelihood (GPyTorch, Adam, ``iters`` steps; s² and σ² start from
    linadapt's own type-II estimates). The RBF term lets the GP explain what the network's tangent
    features cannot, instead of forcing it into the NTK with a collapsed noise. One-output models.

    Built from the public pieces: :class:`~linadapt.NTKKernel` inside a GPyTorch ``ExactGP``.
    """
    import gpytorch

    torch.manual_seed(seed)
    X = torch.as_tensor(X)
    yf = torch.as_tensor(y, dtype=torch.float64).reshape(-1)
    start = LinearizedRegressor(model, params=params).fit(X, yf)
    input_shape = tuple(X.shape[1:])
    Xf = _as_2d(X)
    x_mu, x_sd = _mean_std(Xf)
    net_dtype = next(model.parameters()).dtype

    def network(xflat: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(xflat.reshape(-1, *input_shape).to(net_dtype)).reshape(-1).to(torch.float64)

    class _Mean(gpytorch.means.Mean):
        def forward(self, x):
            return network(x)

    class _Scaled(gpytorch.kernels.Kernel):
        """The RBF term on standardised inputs."""

        def __init__(self):
            super().__init__()
            self.rbf = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel(ard_num_dims=Xf.shape[1]))

        def forward(self, x1, x2, diag=False, **kw):
            return self.rbf.forward((x1 - x_mu) / x_sd, (x2 - x_mu) / x_sd, diag=diag, **kw)

    class _GP(gpytorch.models.ExactGP):
        def __init__(self, likelihood):
            super().__init__(Xf, yf, likelihood)
            self.mean_module = _Mean()
            self.ntk = gpytorch.kernels.ScaleKernel(NTKKernel(model, params, input_shape=input_shape))
            self.extra = _Scaled()

        def forward(self, x):
            cov = self.ntk(x) + self.extra(x)
            return gpytorch.distributions.MultivariateNormal(self.mean_module(x), cov)

    likelihood = gpytorch.likelihoods.GaussianLikelihood(
        noise_constraint=gpytorch.constraints.GreaterThan(1e-8)
    ).double()
    gp = _GP(likelihood).double()
    resid_var = float((yf - network(Xf)).var()) if yf.numel() > 1 else 1.0
    gp.ntk.outputscale = start.prior_var_
    likelihood.noise = max(start.noise_var_, 1e-6 * max(resid_var, 1e-12))
    gp.extra.rbf.outputscale = max(resid_var, 1e-6)
    gp.train()
    likelihood.train()
    opt = torch.optim.Adam(gp.parameters(), lr=lr)
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, gp)
    with gpytorch.settings.max_cholesky_size(10_000):
        for _ in range(iters):
            opt.zero_grad()
            (-mll(gp(Xf), yf)).backward()
            opt.step()
    with torch.no_grad(), gpytorch.settings.max_cholesky_size(10_000):
        log_evidence = float(mll(gp(Xf), yf)) * yf.numel()  # GPyTorch reports it per data point
    gp.eval()
    likelihood.eval()

    def predict(Xn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad(), gpytorch.settings.max_cholesky_size(10_000), gpytorch.settings.fast_pred_var(False):
            out = likelihood(gp(_as_2d(torch.as_tensor(Xn))))
            return out.mean, out.variance

    hyper = {
        "ntk_scale": float(gp.ntk.outputscale.detach()),
        "rbf_scale": float(gp.extra.rbf.outputscale.detach()),
        "noise_var": float(likelihood.noise.detach()),
        "lengthscales": gp.extra.rbf.base_kernel.lengthscale.detach().reshape(-1).tolist(),
        "log_evidence": log_evidence,
    }
    return GaussianPredictor("linadapt-rbf", predict, hyper)


# ---------------------------------------------------------------------------------------------- laplace-torch
@dataclass
class LaplaceTorchBaseline:
    """laplace-torch's post-hoc Laplace on a fine-tuned copy of the network (see :func:`laplace_torch`).

    ``predict(X)`` → (mean, std) of y (regression, shapes (m,)); ``predict_proba(X)`` → (m, c) probit GLM
    predictive (classification). ``hyperparameters``: the prior precision (and noise std) it learned, the
    Hessian structure, the subset of weights and the fine-tuning epoch kept.
    """

    laplace: object
    task: str
    hyperparameters: dict
    batch: int = 8  # laplace-torch forms Jacobians by jacrev over the whole batch: cost quadratic in it

    def _chunks(self, X: torch.Tensor) -> list[torch.Tensor]:
        return [X[i : i + self.batch] for i in range(0, X.shape[0], self.batch)]

    def predict_proba(self, X: torch.Tensor) -> np.ndarray:
        """Class probabilities (m, c) from laplace-torch's predictive (its probit link)."""
        la = self.laplace
        out = [la(x, pred_type="glm", link_approx="probit").detach() for x in self._chunks(X)]  # type: ignore[operator]
        return torch.cat(out).double().numpy()

    def predict(self, X: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Predictive mean and variance at X, each (m,), from laplace-torch's GLM predictive."""
        la = self.laplace
        means, variances = [], []
        for x in self._chunks(X):
            f_mu, f_var = la(x, pred_type="glm")  # type: ignore[operator]
            means.append(f_mu.detach()[:, 0].double())
            variances.append(f_var.detach().reshape(x.shape[0], -1)[:, 0].double())
        noise = float(la.sigma_noise) ** 2  # type: ignore[attr-defined]
        return torch.cat(means).numpy(), np.sqrt(torch.cat(variances).numpy() + noise)


def laplace_torch(
    model: nn.Module,
    X: Any,
    y: torch.Tensor,
    task: str = "classification",
    subset: str = "all",
    hessian: str = "kron",
    epochs: int = 300,
    lr: float = 1e-3,
    batch_size: int = 64,
    patience: int = 20,
    weight_decay: float = 1e-4,
    marglik_steps: int = 100,
    seed: int = 0,
) -> LaplaceTorchBaseline:
    """laplace-torch (optional dependency) as an adaptation baseline: its usual recipe on the target data.

    Post-hoc Laplace assumes the network sits at a MAP of the data it is applied to, so the network is first
    fine-tuned on (X, y) (:func:`finetune`, Adam with weight decay, early stopping; all weights, or the last
    layer with ``subset="last_layer"``), then ``laplace.Laplace(model, task, subset_of_weights=subset,
    hessian_structure=hessian)`` is fitted on (X, y) — K-FAC by default (``"full"``: the exact GGN, whose
    log-determinant costs ~0.1 s per marginal-likelihood step already at 1,800 weights) — and its prior
    precision (and, for regression, the noise std) are set by maximising its marginal likelihood (Adam,
    ``marglik_steps`` steps of lr 0.1 on the logarithms). Predictions use the linearized (GLM) predictive,
    with the probit link for classification.

    Raises:
        ImportError: laplace-torch is not installed (``pip install --no-deps laplace-torch==0.3`` plus its
            runtime needs; `make setup` does it).
    """
    try:
        from laplace import Laplace
    except ImportError as exc:
        raise ImportError("the laplace-torch baseline needs laplace-torch (see the Makefile's LAPLACE_PKGS)") from exc
    if subset not in ("all", "last_layer"):
        raise ValueError(f"subset must be 'all' or 'last_layer', got {subset!r}")
    tuned = finetune(
        model,
        X,
        y,
        task=task,
        params="all" if subset == "all" else "last",
        epochs=epochs,
        lr=lr,
        weight_decay=weight_decay,
        batch_size=batch_size,
        patience=patience,
        seed=seed,
    )
    net = tuned.model
    for p in net.parameters():
        p.requires_grad_(True)
    targets = y if task == "classification" else y.reshape(y.shape[0], -1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, targets), batch_size=256)
    likelihood = "classification" if task == "classification" else "regression"
    la = Laplace(net, likelihood, subset_of_weights=subset, hessian_structure=hessian)
    la.fit(loader)
    log_prior = torch.zeros(1, requires_grad=True)
    log_sigma = torch.zeros(1, requires_grad=True)
    opt = torch.optim.Adam([log_prior, log_sigma] if task == "regression" else [log_prior], lr=0.1)
    for _ in range(marglik_steps):
        opt.zero_grad()
        if task == "regression":
            loss = -la.log_marginal_likelihood(log_prior.exp(), log_sigma.exp())
        else:
            loss = -la.log_marginal_likelihood(log_prior.exp())
        loss.backward()
        opt.step()
    la.prior_precision = float(log_prior.detach().exp())
    if task == "regression":
        la.sigma_noise = float(log_sigma.detach().exp())
    info = {
        "prior_precision": float(log_prior.detach().exp()),
        "hessian": hessian,
        "subset": subset,
        "best_epoch": tuned.best_epoch,
    }
    if task == "regression":
        info["noise_std"] = float(log_sigma.detach().exp())
    return LaplaceTorchBaseline(la, task, info)
