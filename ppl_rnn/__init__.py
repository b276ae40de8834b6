"""ppl_rnn: stochastic recurrent networks (nonlinear state-space models) as Pyro programs, with
interchangeable inference: particle smoothing + Monte Carlo EM, mean-field EM, SVI, EKF, exact Kalman, BPTT.

    import ppl_rnn as pr
    post = pr.infer(model, y, method=pr.inference.KalmanSmoother())

Three floors: the contract (this package's top-level modules: model, capabilities, data, masking, results,
errors, rng, scope, method, verbs) <- ``ppl_rnn.models`` and ``ppl_rnn.inference`` <- ``ppl_rnn.workbench``
(evaluate, compare, ensembles, forecast, report, ArviZ export, datasets, CLI, demo; plots load matplotlib on use).
Importing the package changes no global setting: the library's Pyro settings apply inside its own calls.
"""

# floor 1: the contract; floor 2: models and inference; floor 3: the workbench
from . import capabilities, errors, inference, models, workbench
from .data import Data, prepare
from .errors import (
    ConfigurationError,
    DataError,
    DegenerateWeightsError,
    DivergenceError,
    ModelCapabilityError,
)
from .method import InferenceMethod
from .model import ElmanForm, LinearGaussianParams, NARParams, Simulation, StateSpaceModel
from .priors import ParameterSpace, parameter_priors, with_priors
from .results import FitResult, FitState, Forecast, ParameterPosterior, Posterior
from .verbs import fit, infer
from .workbench import datasets
from .workbench.arviz_export import to_inference_data
from .workbench.compare import compare
from .workbench.ensemble import Ensemble, fit_ensemble
from .workbench.evaluate import evaluate
from .workbench.forecasting import forecast
from .workbench.paired import forecast_difference
from .workbench.selection import select_by_forecast

__version__ = "0.2.0"

__all__ = [
    "StateSpaceModel", "LinearGaussianParams", "NARParams", "ElmanForm", "Simulation", "Posterior", "FitResult", "FitState", "Forecast",
    "InferenceMethod", "Data", "prepare", "infer", "fit", "forecast", "inference", "models", "errors",
    "capabilities", "ConfigurationError", "DataError", "DegenerateWeightsError", "DivergenceError",
    "ModelCapabilityError", "compare", "to_inference_data", "evaluate", "forecast_difference", "datasets",
    "select_by_forecast", "workbench", "Ensemble", "fit_ensemble", "ParameterPosterior", "with_priors",
    "parameter_priors", "ParameterSpace",
]
