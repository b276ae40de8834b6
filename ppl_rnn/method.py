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

    def fit_prepared(self, model, data, seed):
        """Train ``model`` **in place** on validated data (``pr.fit`` passes a copy). Subclasses implement
        ``_fit``."""
        return self._fit(model, data, seed)

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
