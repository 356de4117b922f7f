"""linadapt: fast adaptation of trained PyTorch networks by linearization.

A trained network f(x; θ̂) becomes the Gaussian process of its first-order Taylor expansion, whose
kernel is the finite-width neural tangent kernel J(x) J(x')ᵀ; adapting to new data is exact posterior
inference in that GP.
"""

from linadapt import metrics
from linadapt._memory import MemoryBudgetError
from linadapt._version import __version__
from linadapt.distributed import DistributedError
from linadapt.estimators.classifier import LinearizedClassifier
from linadapt.estimators.persistence import load, save
from linadapt.estimators.regressor import LinearizedRegressor
from linadapt.inference.solvers import ConvergenceWarning
from linadapt.io.models import ModelLoadError, load_model
from linadapt.jacobian.linearization import Linearization, LinearizationError
from linadapt.jacobian.selection import select_parameters
from linadapt.kernels.gpytorch_kernel import NTKKernel
from linadapt.kernels.operator import NTKOperator, ntk_gram

__all__ = [
    "ConvergenceWarning",
    "DistributedError",
    "Linearization",
    "LinearizationError",
    "LinearizedClassifier",
    "LinearizedRegressor",
    "MemoryBudgetError",
    "ModelLoadError",
    "NTKKernel",
    "NTKOperator",
    "__version__",
    "load",
    "load_model",
    "metrics",
    "ntk_gram",
    "save",
    "select_parameters",
]
