"""ppl_rnn: stochastic recurrent networks (nonlinear state-space models) as Pyro programs, with
interchangeable inference: particle smoothing + Monte Carlo EM, mean-field EM, SVI, EKF, exact Kalman, BPTT.

    import ppl_rnn as pr
    post = pr.infer(model, y, method=pr.inference.KalmanSmoother())
"""

import pyro

# Parameters live on the modules, never in Pyro's global param store (DESIGN.md).
pyro.settings.set(module_local_params=True)

from . import (  # noqa: E402  (floor 2 after the contract; datasets and plots are floor 3)
    datasets,
    errors,  # noqa: E402
    inference,
    models,
    plots,
)

# (floor 3, after inference/models: compare, to_inference_data, evaluate — the workbench)
from .arviz_export import to_inference_data  # noqa: E402
from .compare import compare  # noqa: E402
from .data import Data, prepare  # noqa: E402
from .errors import (  # noqa: E402
    ConfigurationError,
    DataError,
    DegenerateWeightsError,
    DivergenceError,
    ModelCapabilityError,
)
from .evaluate import evaluate  # noqa: E402
from .method import InferenceMethod  # noqa: E402
from .model import LinearGaussianParams, Simulation, StateSpaceModel  # noqa: E402
from .results import FitResult, Forecast, Posterior  # noqa: E402
from .verbs import fit, forecast, infer  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "StateSpaceModel", "LinearGaussianParams", "Simulation", "Posterior", "FitResult", "Forecast",
    "InferenceMethod", "Data", "prepare", "infer", "fit", "forecast", "inference", "models", "errors",
    "ConfigurationError", "DataError", "DegenerateWeightsError", "DivergenceError", "ModelCapabilityError",
    "compare", "to_inference_data", "evaluate", "datasets", "plots",
]
