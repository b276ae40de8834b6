"""The verbs ``infer`` and ``fit``: they validate data once and dispatch to method objects, inside the
library's scope (:mod:`ppl_rnn.scope`). ``forecast`` lives with the workbench
(:mod:`ppl_rnn.workbench.forecasting`), since its default filter comes from the inference floor."""

from __future__ import annotations

import dataclasses

from .data import prepare
from .errors import ConfigurationError
from .method import InferenceMethod, default_trainer
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
class _Default:
    """The sentinel of an omitted ``method``: the default trainer (an explicit ``method=None`` stays an error)."""

    def __repr__(self) -> str:
        return "<the default trainer>"


DEFAULT = _Default()


def fit(model: StateSpaceModel | list[StateSpaceModel], observations, *, method: InferenceMethod = DEFAULT,
        inputs=None, seed: int | None = None, resume: FitResult | None = None, start=None) -> FitResult:
    """Train a **copy** of ``model`` on ``observations`` with ``method``; the input model is untouched.

    ``method`` omitted: the library's recommended strategy, the default trainer
    (:class:`ppl_rnn.inference.search.Recommended`: a start search chosen on a held-back tail of the training
    data, guarded by the linear references). ``model`` may then be a list of models: the same search runs over
    the starts of all of them and returns the best (a method given explicitly must have ``fit_models``).

    ``resume=earlier_fit`` continues ``earlier_fit`` (made by the same kind of method on data of the same
    shape) from its recorded state up to ``method``'s number of iterations, exactly as an uninterrupted run
    would have gone on (its RNG state is in the record, so ``seed`` is not used again); warm starts and
    restarts are not re-run. The result's trace is the whole run, the earlier iterations included. A method
    that keeps no resumable state raises :class:`ppl_rnn.errors.ConfigurationError`.

    ``start``: a start object (:mod:`ppl_rnn.inference.starts`: ``LinearStart()``, ``NARStart()``,
    ``MultiStart(...)``) applied to the copy before a trainer that has no ``start`` option of its own (its
    diagnostics join the result's); a trainer that has one (``MonteCarloEM(start=...)``) takes it there, and
    passing it here too raises :class:`ppl_rnn.errors.ConfigurationError` (one route per trainer). A resumed fit
    does not re-run the start."""
    if method is DEFAULT:
        method = default_trainer()
    if isinstance(model, (list, tuple)):
        return _fit_models(list(model), observations, method, inputs, seed, resume, start)
    check_model_and_method(model, method)
    check_seed(seed)
    data = prepare(model, observations, inputs)
    work, info = model.copy(), {}
    if start is not None:
        if not callable(getattr(start, "apply", None)):
            raise ConfigurationError(
                f"start must be a start object such as pr.inference.MultiStart() (with apply(model, data, seed, "
                f"trainer)); found {start!r}.")
        if hasattr(method, "start"):
            raise ConfigurationError(
                f"start: {type(method).__name__} takes its start itself; pass {type(method).__name__}(start="
                f"{start!r}) instead of pr.fit(..., start=...).")
        if resume is None:
            info = dict(start.apply(work, data, seed, method))
    if resume is None:
        res = method.fit_prepared(work, data, seed)
    else:
        res = method.fit_prepared(work, data, seed, resume=resume)
    if info:
        res = dataclasses.replace(res, diagnostics={**info, **dict(res.diagnostics)})
    return remember(res, data=data)


def _fit_models(models, observations, method, inputs, seed, resume, start) -> FitResult:
    """``pr.fit([m1, m2, ...], y)``: one search over several models (a method with ``fit_models``)."""
    if not models:
        raise ConfigurationError("model: found an empty list; pass a model or a non-empty list of models.")
    for m in models:
        check_model_and_method(m, method)
    if not callable(getattr(method, "fit_models", None)):
        raise ConfigurationError(
            f"model: a list of {len(models)} models needs a method that searches over models (with fit_models), such "
            f"as the default (omit method=, or pr.inference.Recommended()); found {type(method).__name__}. Fit the "
            "models one by one instead.")
    if resume is not None or start is not None:
        raise ConfigurationError("resume/start: not taken with a list of models (the search sets the starts); drop "
                                 "them, or fit one model.")
    check_seed(seed)
    data = prepare(models[0], observations, inputs)
    for m in models[1:]:
        prepare(m, observations, inputs)  # every model must accept the data
    res = method.fit_models([m.copy() for m in models], data, seed)
    return remember(res, data=data)


__all__ = ["infer", "fit", "check_model_and_method"]
