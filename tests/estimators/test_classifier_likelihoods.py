"""LinearizedClassifier's ``likelihood=`` option: the ``"auto"`` choice, targets outside a likelihood's support,
Bernoulli and multilabel predictions and scores, the links each likelihood accepts, and saving / loading."""

import warnings

import numpy as np
import pytest
import torch
from models import inputs_for, mlp
from sklearn.base import clone
from sklearn.exceptions import DataConversionWarning

import linadapt as la


class Squeezed(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = mlp(d_out=1, seed=2)

    def forward(self, x):
        return self.net(x)[:, 0]


X = inputs_for("mlp", 16, seed=3)
Xs = inputs_for("mlp", 5, seed=4)
Y01 = (X[:, 0] > 0).long()
YML = (X[:, :3] > 0).long()
FAST = {"prior_var": 1.0, "optimize_hyperparameters": False}


@pytest.mark.parametrize(
    "model,y,expected,n_classes",
    [
        (mlp(), Y01 + (X[:, 1] > 0).long(), "categorical", 3),
        (mlp(d_out=1), Y01, "bernoulli", 2),  # (n, 1) outputs
        (Squeezed(), Y01, "bernoulli", 2),  # (n,) outputs
        (Squeezed(), Y01.reshape(-1, 1), "bernoulli", 2),  # a column of labels
        (Squeezed(), np.where(Y01.numpy() == 1, "yes", "no"), "bernoulli", 2),
        (mlp(), YML, "multilabel", 3),
        (mlp(), YML.bool().numpy(), "multilabel", 3),
    ],
)
def test_auto_picks_the_likelihood_from_outputs_and_targets(model, y, expected, n_classes):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataConversionWarning)
        clf = la.LinearizedClassifier(model, **FAST).fit(X, y)
        explicit = la.LinearizedClassifier(model, likelihood=expected, **FAST).fit(X, y)
    assert clf.likelihood == "auto" and clf.likelihood_.name == expected and clf.n_classes_ == n_classes
    np.testing.assert_array_equal(clf.predict_proba(Xs), explicit.predict_proba(Xs))


def test_bernoulli_predictions_follow_scikit_learns_binary_convention():
    y = np.where(Y01.numpy() == 1, "yes", "no")
    clf = la.LinearizedClassifier(Squeezed(), link="probit", **FAST).fit(X, y)
    assert list(clf.classes_) == ["no", "yes"]
    mean, cov = clf.predict_logits(Xs)
    assert mean.shape == (5, 1) and cov.shape == (5, 1, 1) and bool((cov > 0).all())
    proba = clf.predict_proba(Xs)
    assert proba.shape == (5, 2)
    np.testing.assert_allclose(proba.sum(1), 1.0, rtol=0, atol=1e-15)
    kappa = 1 / np.sqrt(1 + np.pi * cov[:, 0, 0] / 8)
    np.testing.assert_allclose(proba[:, 1], 1 / (1 + np.exp(-kappa * mean[:, 0])), rtol=1e-13)  # column 1: "yes"
    pred = clf.predict(Xs)
    np.testing.assert_array_equal(pred, np.where(proba[:, 1] > proba[:, 0], "yes", "no"))
    assert clf.score(X, y) == pytest.approx(np.mean(clf.predict(X) == y))
    with pytest.raises(ValueError, match="not among the fitted classes"):
        clf.score(X, np.where(Y01.numpy() == 1, "yes", "maybe"))


def test_multilabel_predicts_each_outcome_and_scores_subset_accuracy():
    clf = la.LinearizedClassifier(mlp(), link="probit", **FAST).fit(X, YML)
    proba = clf.predict_proba(Xs)
    assert proba.shape == (5, 3) and not np.allclose(proba.sum(1), 1.0)
    mean, cov = clf.predict_logits(Xs)
    var = np.diagonal(cov, axis1=1, axis2=2)
    np.testing.assert_allclose(proba, 1 / (1 + np.exp(-mean / np.sqrt(1 + np.pi * var / 8))), rtol=1e-13)
    np.testing.assert_array_equal(clf.predict(Xs), (proba > 0.5).astype(int))
    np.testing.assert_array_equal(clf.classes_, [0, 1, 2])
    target = YML.numpy().copy()
    target[:4, 2] = 1 - target[:4, 2]  # some rows wrong in one outcome only
    pred = clf.predict(X)
    exact = (pred == target).all(1)
    assert 0 < exact.mean() < 1  # a score that tells subset accuracy from per-outcome accuracy
    assert clf.score(X, target) == pytest.approx(exact.mean())
    w = np.linspace(0.5, 2.0, 16)
    assert clf.score(X, target, sample_weight=w) == pytest.approx((w * exact).sum() / w.sum())
    with pytest.raises(ValueError, match="contains 2: the multilabel likelihood"):
        clf.score(X, 2 * target)


def test_targets_outside_the_support_are_named():
    clf = la.LinearizedClassifier(Squeezed(), **FAST)
    with pytest.raises(ValueError, match=r"3 distinct labels \(0, 1, 2\): the bernoulli likelihood"):
        clf.fit(X, Y01 + (X[:, 1] > 1).long() * (1 - Y01) * 2)
    with pytest.raises(ValueError, match=r"1 distinct labels \(5\)"):
        clf.fit(X, np.full(16, 5))
    ml = la.LinearizedClassifier(mlp(), **FAST)
    with pytest.raises(ValueError, match=r"y contains 0\.5: the multilabel likelihood takes targets 0 and 1 only"):
        ml.fit(X, YML * 0.5 + (YML == 0) * 1.0)
    bad = YML.clone()
    bad[0, 0], bad[3, 1], bad[5, 2] = 2, -1, 2
    with pytest.raises(ValueError, match=r"y contains -1, 2: the multilabel"):
        ml.fit(X, bad)
    with pytest.raises(ValueError, match=r"shape \(16, 2\).*\(16, 3\)"):  # auto: a 2-column target, 3 outputs
        ml.fit(X, YML[:, :2])
    with pytest.raises(ValueError, match=r"shape \(16,\).*multilabel"):
        clone(ml).set_params(likelihood="multilabel").fit(X, Y01)
    with pytest.raises(ValueError, match="bernoulli likelihood needs a model with one output"):
        la.LinearizedClassifier(mlp(), likelihood="bernoulli").fit(X, Y01)
    with pytest.raises(ValueError, match="c ≥ 2"):
        la.LinearizedClassifier(Squeezed(), likelihood="categorical").fit(X, Y01)
    with pytest.raises(ValueError, match="likelihood must be one of 'auto', 'bernoulli', 'categorical', 'multilabel'"):
        la.LinearizedClassifier(mlp(), likelihood="gaussian").fit(X, Y01)


@pytest.mark.parametrize("kind", ["bernoulli", "multilabel"])
def test_links_work_or_are_refused(kind):
    model, y = (Squeezed(), Y01) if kind == "bernoulli" else (mlp(), YML)
    probas = {}
    for link in ("probit", "mc", "map", "auto"):
        clf = la.LinearizedClassifier(model, link=link, n_samples=20_000, **FAST).fit(X, y)
        probas[link] = clf.predict_proba(Xs)
        assert np.isfinite(probas[link]).all() and ((probas[link] >= 0) & (probas[link] <= 1)).all()
    assert clf.link_ in ("probit", "map") and set(clf.loo_nll_) == {"probit", "map"}
    np.testing.assert_allclose(probas["mc"], probas["probit"], atol=2e-2)
    mean = clf.predict_logits(Xs, return_cov=False)
    sig = 1 / (1 + np.exp(-mean))
    np.testing.assert_allclose(probas["map"][:, -sig.shape[1] :], sig, rtol=1e-13)
    assert not np.allclose(probas["map"], probas["probit"])  # the covariance matters to probit
    with pytest.raises(ValueError, match=f"'bridge' has no meaning for the {kind} likelihood"):
        la.LinearizedClassifier(model, likelihood=kind, link="bridge").fit(X, y)  # refused before the fit
    with pytest.raises(ValueError, match=f"'bridge' has no meaning for the {kind} likelihood"):
        la.LinearizedClassifier(model, link="bridge").fit(X, y)  # auto: refused once the likelihood is known
    with pytest.raises(ValueError, match="'bridge' has no meaning"):
        clf.set_params(link="bridge").predict_proba(Xs)


@pytest.mark.parametrize("kind", ["bernoulli", "multilabel"])
def test_save_and_load_round_trip_the_likelihood(tmp_path, kind):
    model, y = (Squeezed(), np.where(Y01.numpy() == 1, 7, 3)) if kind == "bernoulli" else (mlp(), YML)
    clf = la.LinearizedClassifier(model, link="auto").fit(X, y)
    path = tmp_path / "clf.linadapt"
    clf.save(path)
    back = la.LinearizedClassifier.load(path, model)
    assert back.likelihood_.name == kind and back.link_ == clf.link_ and back.prior_var_ == clf.prior_var_
    np.testing.assert_array_equal(back.classes_, clf.classes_)
    # load runs Newton from a cold start at the saved prior variance: on these separable labels (s² ≈ 80) it stops
    # ~1e-9 from the warm-started MAP of the fit (both within newton_tol)
    np.testing.assert_allclose(back.predict_proba(Xs), clf.predict_proba(Xs), rtol=1e-7, atol=1e-12)
    np.testing.assert_array_equal(back.predict(Xs), clf.predict(Xs))
    if kind == "bernoulli":
        assert set(clf.predict(Xs)) <= {3, 7}
    # an explicit likelihood is restored the same way, and a file without one is categorical (older files)
    state = clf._fitted_state()
    assert state["likelihood_"] == kind
    with pytest.raises(ValueError, match=r"c ≥ 2|shape"):
        clone(clf)._refit_from_state(*clf._train_data, {k: v for k, v in state.items() if k != "likelihood_"})


def test_grouped_prior_with_a_sigmoid_likelihood_saves_and_loads(tmp_path):
    clf = la.LinearizedClassifier(Squeezed(), prior_groups=["*4.*"]).fit(X, Y01)
    assert clf.likelihood_.name == "bernoulli" and set(clf.prior_vars_) == {"*4.*", "rest"}
    clf.save(tmp_path / "g.linadapt")
    back = la.LinearizedClassifier.load(tmp_path / "g.linadapt", clf.model)
    np.testing.assert_allclose(back.predict_proba(Xs), clf.predict_proba(Xs), rtol=1e-10)


def test_categorical_default_is_unchanged_by_the_option():
    y = Y01 + (X[:, 1] > 0).long()
    a = la.LinearizedClassifier(mlp(), **FAST).fit(X, y)
    b = la.LinearizedClassifier(mlp(), likelihood="categorical", link="bridge", **FAST).fit(X, y)
    assert a.likelihood_.name == "categorical" and a.predict_proba(Xs).shape == (5, 3)
    np.testing.assert_allclose(a.predict_proba(Xs).sum(1), 1.0)
    assert b.predict_proba(Xs).shape == (5, 3)
