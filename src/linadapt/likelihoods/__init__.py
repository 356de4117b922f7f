"""Likelihoods p(y | f) of the linearized model's outputs, behind one interface (:class:`Likelihood`).

``LIKELIHOODS`` maps a name to the likelihood's class; adding a likelihood is one module implementing
:class:`~linadapt.likelihoods.base.Likelihood` and one line here. The Laplace machinery
(:mod:`linadapt.inference.laplace`, :mod:`linadapt.inference.loo`) uses only that interface.
"""

from linadapt.likelihoods.base import Curvature, Likelihood
from linadapt.likelihoods.categorical import Categorical
from linadapt.likelihoods.gaussian import Gaussian

__all__ = ["LIKELIHOODS", "Categorical", "Curvature", "Gaussian", "Likelihood"]

LIKELIHOODS: dict[str, type[Likelihood]] = {
    "categorical": Categorical,
    "gaussian": Gaussian,
}
