"""Base class of inference methods. Methods are objects (keyword-only options validated in ``__init__``);
verbs (:func:`ppl_rnn.infer`, :func:`ppl_rnn.fit`) are functions that validate data and dispatch here.

A method implements ``_infer(model, data, seed) -> Posterior`` and/or ``_fit(model, data, seed) -> FitResult``;
callers use the public ``infer_prepared`` / ``fit_prepared``.
``data`` is a validated :class:`ppl_rnn.data.Data`. ``_fit`` receives a copy of the user's model and may
modify it in place.
"""

from __future__ import annotations

import numbers

from .errors import ConfigurationError


class InferenceMethod:
    name: str = "method"
    #: whether ``_infer`` gives smoothing (True) or filtering (False) marginals
    smooths: bool = False

    def infer_prepared(self, model, data, seed):
        """Posterior given already validated :class:`ppl_rnn.data.Data` (what ``pr.infer`` calls; other
        methods and the workbench call it too). Subclasses implement ``_infer``."""
        return self._infer(model, data, seed)

    #: whether ``pr.fit(..., resume=fit)`` can continue a fit of this method (its ``_fit`` takes ``resume=``)
    resumable: bool = False

    def fit_prepared(self, model, data, seed, *, resume=None):
        """Train ``model`` **in place** on validated data (``pr.fit`` passes a copy). Subclasses implement
        ``_fit``. ``resume``: an earlier :class:`~ppl_rnn.FitResult` of the same kind of method on data of the
        same shape, continued from its ``state`` (:func:`check_resume`) up to this method's iterations."""
        if resume is None:
            return self._fit(model, data, seed)
        check_resume(self, resume, data)
        return self._fit(model, data, seed, resume=resume)

    def _infer(self, model, data, seed):
        raise NotImplementedError(
            f"{type(self).__name__} does not infer latent states; use it with pr.fit, or use "
            "ParticleSmoother / KalmanSmoother / ExtendedKalmanSmoother with pr.infer."
        )

    def _fit(self, model, data, seed):
        raise NotImplementedError(
            f"{type(self).__name__} does not train parameters; use it with pr.infer, or use a training method "
            "(MonteCarloEM, KalmanEM, MeanFieldEM, EKFEM, SVI, BPTT) with pr.fit."
        )

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({opts})"


#: the factory of the default trainer (``pr.fit(model, y)`` without ``method``); the inference floor registers
#: its recommended strategy here on import (:mod:`ppl_rnn.inference.search`), so this floor never imports it
_DEFAULT_TRAINER = None


def set_default_trainer(factory) -> None:
    """Make ``factory()`` the trainer ``pr.fit`` uses when no ``method`` is given (a hook, so the contract floor
    needs no import of the inference floor; :mod:`ppl_rnn.inference.search` registers ``Recommended``)."""
    global _DEFAULT_TRAINER
    if not callable(factory):
        raise ConfigurationError(f"set_default_trainer needs a callable returning a method object; found {factory!r}.")
    _DEFAULT_TRAINER = factory


def default_trainer() -> InferenceMethod:
    """A fresh default trainer (see :func:`set_default_trainer`)."""
    if _DEFAULT_TRAINER is None:
        raise ConfigurationError(
            "method: none was given and no default trainer is registered (import ppl_rnn, which registers "
            "ppl_rnn.inference.search.Recommended); pass method=pr.inference.MonteCarloEM() or import ppl_rnn first.")
    return _DEFAULT_TRAINER()


def check_resume(method: InferenceMethod, resume, data) -> None:
    """Raise a :class:`ConfigurationError` unless ``method`` can continue the fit ``resume`` on ``data``: the
    method supports resuming, ``resume`` is a FitResult carrying a state, made by the same kind of method,
    on observations of the same shape."""
    from .results import FitResult

    name = type(method).__name__
    if not getattr(method, "resumable", False):
        raise ConfigurationError(
            f"resume: {name} cannot continue an earlier fit (it keeps no resumable state); found resume="
            f"{type(resume).__name__}. Drop resume= and fit from the start (pass the earlier fit's .model as the "
            "model to warm-start it), or use a method that resumes (MonteCarloEM, BPTT, KalmanEM, MeanFieldEM).")
    if not isinstance(resume, FitResult):
        raise ConfigurationError(
            f"resume must be the FitResult of an earlier pr.fit; found {type(resume).__name__}. Pass e.g. "
            "resume=earlier_fit.")
    st = resume.state
    if st is None:
        raise ConfigurationError(
            f"resume: the earlier fit (method {resume.method!r}) carries no state to continue from (its method "
            "records none, or the run stopped early: diagnostics "
            f"{ {k: v for k, v in resume.diagnostics.items() if k == 'stopped'} }). Fit from the start instead, "
            "e.g. with the earlier fit's .model as the model.")
    if st.method != method.name:
        raise ConfigurationError(
            f"resume: the earlier fit was made by method {st.method!r}; this method is {name} ({method.name!r}). "
            f"A fit resumes only with the same kind of method: pass a {st.method!r} method object, or fit from "
            "the earlier fit's .model without resume=.")
    shape = tuple(data.observations.shape)
    if tuple(st.data_shape) != shape:
        raise ConfigurationError(
            f"resume: the earlier fit was trained on observations of shape {tuple(st.data_shape)}; found "
            f"{shape}. Resume on the same data, or fit from the earlier fit's .model without resume=.")


def check_positive_int(value, name: str, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ConfigurationError(f"{name} must be an int >= {minimum}; found {value!r}.")
    return int(value)


def check_positive_float(value, name: str, *, allow_zero: bool = False) -> float:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and (value >= 0 if allow_zero else value > 0)
    if not ok or value != value:
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigurationError(f"{name} must be a real number {bound}; found {value!r}.")
    return float(value)


def check_choice(value, name: str, choices) -> str:
    if value not in choices:
        raise ConfigurationError(f"{name} must be one of {sorted(choices)}; found {value!r}.")
    return value
