"""linadapt: fast adaptation of trained PyTorch networks by linearization.

A trained network f(x; θ̂) becomes the Gaussian process of its first-order Taylor expansion, whose
kernel is the finite-width neural tangent kernel J(x) J(x')ᵀ; adapting to new data is exact posterior
inference in that GP.
"""

from . import metrics
from .classifier import LinearizedClassifier
from .distributed import DistributedError
from .kernel import NTKKernel
from .linearize import Linearization, LinearizationError
from .model_io import ModelLoadError, load_model
from .operators import NTKOperator, ntk_gram
from .persistence import load, save
from .regressor import LinearizedRegressor
from .selection import select_parameters
from .solvers import ConvergenceWarning

__version__ = "0.1.0"

__all__ = [
    "ConvergenceWarning",
    "DistributedError",
    "Linearization",
    "LinearizationError",
    "LinearizedClassifier",
    "LinearizedRegressor",
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
