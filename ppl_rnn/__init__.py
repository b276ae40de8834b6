"""ppl_rnn: stochastic recurrent networks (nonlinear state-space models) as Pyro programs, with
interchangeable inference: particle smoothing + Monte Carlo EM, mean-field EM, SVI, EKF, exact Kalman, BPTT.

    import ppl_rnn as pr
    post = pr.infer(model, y, method=pr.inference.KalmanSmoother())

Three floors: the contract (this package's top-level modules: model, capabilities, data, masking, results,
errors, rng, scope, method, verbs) <- ``ppl_rnn.models`` and ``ppl_rnn.inference`` <- ``ppl_rnn.workbench``
(evaluate, compare, forecast, report, ArviZ export, datasets, CLI, demo; plots load matplotlib on use).
Importing the package changes no global setting: the library's Pyro settings apply inside its own calls.
"""

from . import (  # floor 1: the contract  # noqa: E402,I001  floor 2
    capabilities,
    errors,
    inference,
    models,
    workbench,  # noqa: E402  floor 3
)
from .data import Data, prepare
from .errors import (
    ConfigurationError,
    DataError,
    DegenerateWeightsError,
    DivergenceError,
    ModelCapabilityError,
)
from .method import InferenceMethod
from .model import ElmanForm, LinearGaussianParams, Simulation, StateSpaceModel
from .results import FitResult, Forecast, Posterior
from .verbs import fit, infer
from .workbench import datasets  # noqa: E402
from .workbench.arviz_export import to_inference_data  # noqa: E402
from .workbench.compare import compare  # noqa: E402
from .workbench.evaluate import evaluate  # noqa: E402
from .workbench.forecasting import forecast  # noqa: E402

__version__ = "0.2.0"

__all__ = [
    "StateSpaceModel", "LinearGaussianParams", "ElmanForm", "Simulation", "Posterior", "FitResult", "Forecast",
    "InferenceMethod", "Data", "prepare", "infer", "fit", "forecast", "inference", "models", "errors",
    "capabilities", "ConfigurationError", "DataError", "DegenerateWeightsError", "DivergenceError",
    "ModelCapabilityError", "compare", "to_inference_data", "evaluate", "datasets", "workbench",
]
