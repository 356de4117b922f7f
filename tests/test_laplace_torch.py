"""Agreement with laplace-torch's full-Hessian GLM Laplace (optional: skipped when laplace-torch is absent).

Post-hoc Laplace in laplace-torch sits at the network's weights, assumed to be the MAP under the prior
θ ~ N(0, s² I). With a network trained to that MAP exactly, our linearized Laplace with
``prior_mean="zero"`` has δ* = 0 and must give the same posterior, probit probabilities and evidence.
"""

import copy

import numpy as np
import pytest
import torch

import linadapt as la

laplace = pytest.importorskip("laplace", reason="laplace-torch is not installed (optional; see the Makefile)")
curvature = pytest.importorskip("laplace.curvature")

PRIOR_PRECISION = 2.0


def trained_to_the_map():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[2.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0], [0.0, 0.0, 2.0, 0.0]], dtype=torch.float64)
    y = torch.arange(60) % 3
    X = centres[y] + 1.2 * torch.randn(60, 4, generator=g, dtype=torch.float64)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).double()
    params = list(model.parameters())
    opt = torch.optim.LBFGS(params, lr=1.0, max_iter=2000, tolerance_grad=1e-13, tolerance_change=0, history_size=50)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(X), y, reduction="sum")
        loss = loss + 0.5 * PRIOR_PRECISION * sum((p**2).sum() for p in params)
        loss.backward()
        return loss

    for _ in range(5):
        opt.step(closure)
    closure()
    grad_norm = torch.cat([p.grad.reshape(-1) for p in params]).norm()
    assert float(grad_norm) < 1e-8, "the test network must sit at the MAP"
    return model, X, y


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
def test_probit_probabilities_and_evidence_match_laplace_torch():
    model, X, y = trained_to_the_map()
    Xs = torch.randn(25, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 2
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=32)
    ref = laplace.Laplace(
        copy.deepcopy(model),
        "classification",
        subset_of_weights="all",
        hessian_structure="full",
        prior_precision=PRIOR_PRECISION,
        backend=curvature.AsdlGGN,
    )
    ref.fit(loader)
    with torch.no_grad():
        ref_proba = ref(Xs, pred_type="glm", link_approx="probit").numpy()
    ref_evidence = float(ref.log_marginal_likelihood())

    for space in ("function", "parameter"):
        clf = la.LinearizedClassifier(
            model, prior_var=1.0 / PRIOR_PRECISION, optimize_hyperparameters=False, prior_mean="zero", space=space
        ).fit(X, y)
        assert float(clf.posterior_.delta.abs().max()) < 1e-7  # the MAP of the linearized model is θ̂ itself
        np.testing.assert_allclose(clf.predict_proba(Xs), ref_proba, rtol=0, atol=1e-4)
        np.testing.assert_allclose(clf.predict_proba(Xs), ref_proba, rtol=0, atol=1e-7)  # in fact far tighter
        assert clf.log_marginal_likelihood_value_ == pytest.approx(ref_evidence, rel=1e-8)
