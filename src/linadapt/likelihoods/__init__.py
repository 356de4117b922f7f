"""Likelihoods p(y | f) of the linearized model's outputs, behind one interface (:class:`Likelihood`).

``LIKELIHOODS`` maps a name to the likelihood's class; adding a likelihood is one module implementing
:class:`~linadapt.likelihoods.base.Likelihood` and one line here. The Laplace machinery
(:mod:`linadapt.inference.laplace`, :mod:`linadapt.inference.loo`) uses only that interface.
"""

from linadapt.likelihoods.base import Curvature, Likelihood
from linadapt.likelihoods.bernoulli import Bernoulli
from linadapt.likelihoods.categorical import Categorical
from linadapt.likelihoods.gaussian import Gaussian
from linadapt.likelihoods.multilabel import Multilabel

__all__ = ["LIKELIHOODS", "Bernoulli", "Categorical", "Curvature", "Gaussian", "Likelihood", "Multilabel"]

LIKELIHOODS: dict[str, type[Likelihood]] = {
    "bernoulli": Bernoulli,
    "categorical": Categorical,
    "gaussian": Gaussian,
    "multilabel": Multilabel,
}
