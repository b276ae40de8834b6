"""The verbs: ``infer``, ``fit``, ``forecast``. They validate data once and dispatch to method objects."""

from __future__ import annotations

from .data import prepare
from .errors import ConfigurationError
from .method import InferenceMethod
from .model import StateSpaceModel
from .results import FitResult, Posterior
from .rng import check_seed


def _check(model, method):
    if not isinstance(model, StateSpaceModel):
        raise ConfigurationError(
            f"model must be a ppl_rnn.StateSpaceModel; found {type(model).__name__}. Subclass StateSpaceModel "
            "and write initial/transition/emission."
        )
    if not isinstance(method, InferenceMethod):
        raise ConfigurationError(
            f"method must be an inference method object such as pr.inference.KalmanSmoother(); found {method!r}."
        )


def infer(model: StateSpaceModel, observations, *, method: InferenceMethod, inputs=None,
          seed: int | None = None) -> Posterior:
    """Posterior over the hidden states of ``model`` given ``observations`` ``(B,T,D)`` (NaN = missing)."""
    _check(model, method)
    check_seed(seed)
    data = prepare(model, observations, inputs)
    return method._infer(model, data, seed)


def fit(model: StateSpaceModel, observations, *, method: InferenceMethod, inputs=None,
        seed: int | None = None) -> FitResult:
    """Train a **copy** of ``model`` on ``observations`` with ``method``; the input model is untouched."""
    _check(model, method)
    check_seed(seed)
    data = prepare(model, observations, inputs)
    return method._fit(model.copy(), data, seed)


def forecast(model: StateSpaceModel, observations, *, horizon: int, method: InferenceMethod | None = None,
             num_samples: int = 500, inputs=None, seed: int | None = None):
    """Predictive draws of the next ``horizon`` observations after ``observations``.

    The filtering distribution :math:`p(h_{T-1}\\mid y_{0:T-1})` comes from ``method`` (default: exact
    Kalman for linear-Gaussian models, else a 2000-particle filter); the future is simulated forward with
    the model's own transition and emission. ``inputs`` (if the model has them) must cover T + horizon steps.
    """
    from .forecasting import forecast as _forecast

    _check(model, method) if method is not None else None
    check_seed(seed)
    return _forecast(model, observations, horizon=horizon, method=method, num_samples=num_samples,
                     inputs=inputs, seed=seed)


__all__ = ["infer", "fit", "forecast"]
