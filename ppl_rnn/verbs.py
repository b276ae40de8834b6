"""The verbs ``infer`` and ``fit``: they validate data once and dispatch to method objects, inside the
library's scope (:mod:`ppl_rnn.scope`). ``forecast`` lives with the workbench
(:mod:`ppl_rnn.workbench.forecasting`), since its default filter comes from the inference floor."""

from __future__ import annotations

from .data import prepare
from .errors import ConfigurationError
from .method import InferenceMethod
from .model import StateSpaceModel
from .results import FitResult, Posterior, remember
from .rng import check_seed
from .scope import in_library_scope


def check_model_and_method(model, method, *, optional: bool = False) -> None:
    """Raise a clear :class:`ConfigurationError` unless ``model`` is a model and ``method`` a method object
    (or None where ``optional``)."""
    if not isinstance(model, StateSpaceModel):
        raise ConfigurationError(
            f"model must be a ppl_rnn.StateSpaceModel; found {type(model).__name__}. Subclass StateSpaceModel "
            "and write initial/transition/emission."
        )
    if not (optional and method is None) and not isinstance(method, InferenceMethod):
        raise ConfigurationError(
            f"method must be an inference method object such as pr.inference.KalmanSmoother(); found {method!r}."
        )


@in_library_scope
def infer(model: StateSpaceModel, observations, *, method: InferenceMethod, inputs=None,
          seed: int | None = None) -> Posterior:
    """Posterior over the hidden states of ``model`` given ``observations`` ``(B,T,D)`` (NaN = missing)."""
    check_model_and_method(model, method)
    check_seed(seed)
    data = prepare(model, observations, inputs)
    return remember(method.infer_prepared(model, data, seed), data=data, model=model)


@in_library_scope
def fit(model: StateSpaceModel, observations, *, method: InferenceMethod, inputs=None,
        seed: int | None = None, resume: FitResult | None = None) -> FitResult:
    """Train a **copy** of ``model`` on ``observations`` with ``method``; the input model is untouched.

    ``resume=earlier_fit`` continues ``earlier_fit`` (made by the same kind of method on data of the same
    shape) from its recorded state up to ``method``'s number of iterations, exactly as an uninterrupted run
    would have gone on (its RNG state is in the record, so ``seed`` is not used again); warm starts and
    restarts are not re-run. The result's trace is the whole run, the earlier iterations included. A method
    that keeps no resumable state raises :class:`ppl_rnn.errors.ConfigurationError`."""
    check_model_and_method(model, method)
    check_seed(seed)
    data = prepare(model, observations, inputs)
    if resume is None:
        return remember(method.fit_prepared(model.copy(), data, seed), data=data)
    return remember(method.fit_prepared(model.copy(), data, seed, resume=resume), data=data)


__all__ = ["infer", "fit", "check_model_and_method"]
