r"""Start objects: where a trainer begins, usable by any trainer through capabilities.

A start has one method, ``start.apply(model, data, seed, trainer=None) -> dict``: it sets the given model's
parameters **in place** (``data`` is validated :class:`ppl_rnn.data.Data`) and returns diagnostics for
``FitResult.diagnostics``. What it needs of the model is a declared capability (named in the
:class:`~ppl_rnn.errors.ModelCapabilityError` when missing); what it needs of the trainer (only
:class:`MultiStart`) is ``fit_prepared`` and a short version of itself (:func:`short_trainer`).

**Where a start is passed** (one route per trainer): a trainer that owns a ``start=`` option
(:class:`~ppl_rnn.inference.mcem.MonteCarloEM`) takes it there; for every other trainer
``pr.fit(model, y, method=..., start=...)`` applies it to the fit's copy of the model before training (and
refuses a start given there to a trainer that has its own). A resumed fit never re-runs its start.

* :class:`FromModel` (the default): the model as given.
* :class:`LinearStart` (the linear warm start): exact :class:`~ppl_rnn.inference.kalman_em.KalmanEM` (float64,
  ``iterations``) on the model's ``linear_special_case()`` (a linear-Gaussian model of the same sizes), begun at
  least-squares AR fits in companion form (``begin="ar"``: :func:`~ppl_rnn.inference.reference.ar_start`;
  ``"model"``: the model's own parameters); then the model's ``embed_linear(params, gain=gain)`` sets it to behave
  like that linear fit in its activation's linear regime (states scaled by the gain, where
  :math:`\tanh x\approx x` within 0.3 % for :math:`|x|\lesssim 0.1`; the output map scaled by its inverse). A
  companion-form start passes each lag through the activation once per step, so the distortion compounds over
  the lags, hence the small default gain. Right for nearly linear signals; for strongly nonlinear ones EM from it
  stays in the linear basin (measured in ``benchmarks/README.md``, "Monte Carlo EM's options, measured").
  Diagnostics: ``init="linear"``, ``init_linear``, ``init_exact_log_evidence`` (KalmanEM's exact value),
  ``init_iterations``, ``init_gain``, ``init_wall_time_s``, ``initial_model`` (the embedded start).
* :class:`NARStart` (the nonlinear warm start): a least-squares autoregression on random ``tanh`` features of the
  lags (:mod:`~ppl_rnn.inference.nar_start`: ``order`` lags, by default the AIC order of a linear AR on the
  data; :math:`M = H - pD` features; the feature map drawn from the fit's seed), embedded through the model's
  ``embed_nar`` capability (the lags ride in the activation's linear regime at ``gain``, the features are tanh
  units, and the network behaves exactly as the autoregression). Diagnostics: ``init="nar"``, ``init_order``,
  ``init_features``, ``init_sigma``, ``init_gain``, ``init_wall_time_s``, ``initial_model``.
* :class:`MultiStart` (multi-start): EM-type trainers climb to a local maximum of :math:`\log p_\theta(y)`, and a
  recurrent network's surface has many. Candidate 0 is the ``base`` start's model; candidates
  :math:`1..k-1` redraw its recurrent weights: ``kind="perturb"`` (the model's ``perturb``: Gaussian entries with
  the same root-mean-square as the given ones, biases jittered) or ``kind="rotation"`` (the model's
  ``rotation_restart``: a random rotation near the identity times 1.1, slow oscillatory modes in the saturating
  regime, the basin a Gaussian start misses on oscillating data), with generators seeded from ``seed`` and the
  candidate index. Each candidate gets ``iterations`` iterations of the trainer's short version
  (:func:`short_trainer`); the one with the largest score — the mean of its last two accepted ``log_evidence``
  trace rows (``objective`` where the trace has none) — is kept. Diagnostics: ``restart_log_evidence`` (the
  scores), ``restart_chosen`` (the index), ``restart_models`` (the candidates' fitted models, None where one
  diverged), ``restart_wall_time_s``, and the base start's.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time

import torch

from ppl_rnn.capabilities import require
from ppl_rnn.data import Data
from ppl_rnn.errors import ConfigurationError, DegenerateWeightsError, DivergenceError
from ppl_rnn.method import check_choice, check_positive_float, check_positive_int

__all__ = ["Start", "FromModel", "LinearStart", "NARStart", "MultiStart", "short_trainer"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Start:
    """Base of the start objects (module docstring)."""

    def apply(self, model, data: Data, seed: int | None, trainer=None) -> dict:
        """Set ``model`` in place to this start; returns diagnostics."""
        raise NotImplementedError


@dataclasses.dataclass(frozen=True, kw_only=True)
class FromModel(Start):
    """The model as given (no change, no diagnostics)."""

    def apply(self, model, data: Data, seed: int | None, trainer=None) -> dict:
        return {}


def _data64(data: Data) -> Data:
    return Data(data.observations.to(torch.float64), data.mask,
                None if data.inputs is None else data.inputs.to(torch.float64))


@dataclasses.dataclass(frozen=True, kw_only=True)
class LinearStart(Start):
    """The linear warm start (module docstring).

    Args:
        iterations: KalmanEM iterations on the linear special case.
        begin: where KalmanEM begins: ``"ar"`` (least-squares AR fits in companion form) or ``"model"`` (the
            model's own parameters).
        gain: the state scale of the embedding (``embed_linear(params, gain=gain)``).
    """

    iterations: int = 200
    begin: str = "ar"
    gain: float = 0.01

    def __post_init__(self):
        object.__setattr__(self, "iterations", check_positive_int(self.iterations, "LinearStart iterations"))
        object.__setattr__(self, "begin", check_choice(self.begin, "LinearStart begin", ("ar", "model")))
        object.__setattr__(self, "gain", check_positive_float(self.gain, "LinearStart gain"))

    def apply(self, model, data: Data, seed: int | None, trainer=None) -> dict:
        from .kalman_em import KalmanEM

        t0 = time.perf_counter()
        alt = "use start=FromModel() (start from the model as given)"
        lin = require(model, "linear_special_case", needed_by="LinearStart", alternative=alt)()
        embed = require(model, "embed_linear", needed_by="LinearStart", alternative=alt)
        lin = lin.to(torch.float64)
        fit = KalmanEM(num_iterations=self.iterations, tol=1e-9, init=self.begin).fit_prepared(lin, _data64(data), seed)
        embed(require(lin, "linear_gaussian", needed_by="LinearStart", alternative=alt)(), gain=self.gain)
        return {"init": "linear", "init_linear": self.begin,
                "init_exact_log_evidence": float(fit.trace.log_evidence.values[-1]),
                "init_iterations": int(fit.diagnostics["num_iterations"]), "init_gain": self.gain,
                "init_wall_time_s": time.perf_counter() - t0, "initial_model": model.copy()}


@dataclasses.dataclass(frozen=True, kw_only=True)
class NARStart(Start):
    """The nonlinear warm start (module docstring; maths in :mod:`~ppl_rnn.inference.nar_start`).

    Args:
        order: lags :math:`p` (None: the AIC order of a linear AR on the data, ``LinearAR(order="aic")``); the
            features are the remaining units, :math:`M = H - pD`.
        gain: the state scale of the embedding (``embed_nar(params, gain=gain)``).
        ridge: ridge penalty per regression row.
        feature_scale: the standard deviation of each random feature's pre-activation.
    """

    order: int | None = None
    gain: float = 0.01
    ridge: float = 1e-7
    feature_scale: float = 1.0

    def __post_init__(self):
        if self.order is not None:
            object.__setattr__(self, "order", check_positive_int(self.order, "NARStart order"))
        object.__setattr__(self, "gain", check_positive_float(self.gain, "NARStart gain"))
        object.__setattr__(self, "ridge", check_positive_float(self.ridge, "NARStart ridge", allow_zero=True))
        object.__setattr__(self, "feature_scale", check_positive_float(self.feature_scale, "NARStart feature_scale"))

    def apply(self, model, data: Data, seed: int | None, trainer=None) -> dict:
        from .nar_start import fit_nar
        from .reference import LinearAR

        t0 = time.perf_counter()
        embed = require(model, "embed_nar", needed_by="NARStart",
                        alternative="use start=LinearStart() or start=FromModel()")
        D, H = data.observations.shape[-1], model.hidden_dim
        p = self.order
        if p is None:
            ar = LinearAR(order="aic", max_order=max(1, min(30, (H - 1) // D)))
            p = int(max(ar._fit_ar(data, torch.float64)[1]))
        M = H - p * D
        if M < 1:
            raise ConfigurationError(
                f"NARStart with {p} lags on {D} outputs needs hidden_dim > {p * D} (the lags) to leave units for "
                f"the tanh features; the model has hidden_dim={H}. Use a model with hidden_dim = {p * D} + the "
                f"number of features (e.g. {p * D + 20}), or set NARStart(order=...) below {H // D}.")
        params = fit_nar(data, p, M, ridge=self.ridge, feature_scale=self.feature_scale,
                         seed=0 if seed is None else int(seed), dtype=model.dtype)
        embed(params, gain=self.gain)
        return {"init": "nar", "init_order": p, "init_features": M, "init_sigma": params.sigma.tolist(),
                "init_gain": self.gain, "init_wall_time_s": time.perf_counter() - t0, "initial_model": model.copy()}


def short_trainer(trainer, iterations: int):
    """The short version of ``trainer`` that :class:`MultiStart` runs on each candidate: the trainer's own
    ``shortened(iterations)`` where it has one (``MonteCarloEM.shortened``: same E-step, M-step and acceptance,
    no schedule, averaging, annealing or start, never stopping early); otherwise a copy with its iteration
    count (``num_iterations``, or ``num_steps`` for gradient trainers) set to ``iterations``."""
    fn = getattr(trainer, "shortened", None)
    if callable(fn):
        return fn(iterations)
    for name in ("num_iterations", "num_steps"):
        if hasattr(trainer, name):
            short = copy.copy(trainer)
            setattr(short, name, int(iterations))
            if hasattr(short, "progress"):
                short.progress = False
            return short
    raise ConfigurationError(
        f"MultiStart: the trainer {type(trainer).__name__} has neither shortened(iterations) nor a num_iterations / "
        "num_steps option, so it cannot be run short on each candidate; use an iterative trainer (e.g. "
        "MonteCarloEM, KalmanEM, BPTT).")


def _score(fit) -> float:
    tr = fit.trace
    name = "log_evidence" if "log_evidence" in tr else "objective"
    v = tr[name].values
    if "rejected" in tr:
        v = v[tr.rejected.values == 0]
    return float(v[-2:].mean())


@dataclasses.dataclass(frozen=True, kw_only=True)
class MultiStart(Start):
    """Multi-start (module docstring): ``num_starts`` candidates, each trained ``iterations`` iterations by the
    trainer's short version; the best is kept.

    Args:
        num_starts: candidates (``>= 1``; candidate 0 is the ``base`` start itself).
        iterations: iterations of the short run given to each candidate.
        kind: ``"perturb"`` (the model's ``perturb``) or ``"rotation"`` (the model's ``rotation_restart``).
        base: the start the candidates are drawn around (default :class:`FromModel`).
    """

    num_starts: int = 8
    iterations: int = 10
    kind: str = "perturb"
    base: Start = dataclasses.field(default_factory=FromModel)

    def __post_init__(self):
        object.__setattr__(self, "num_starts", check_positive_int(self.num_starts, "MultiStart num_starts"))
        object.__setattr__(self, "iterations", check_positive_int(self.iterations, "MultiStart iterations"))
        object.__setattr__(self, "kind", check_choice(self.kind, "MultiStart kind", ("perturb", "rotation")))
        if not isinstance(self.base, Start) or isinstance(self.base, MultiStart):
            raise ConfigurationError(
                f"MultiStart base must be a start object other than MultiStart (FromModel(), LinearStart(), "
                f"NARStart()); found {self.base!r}.")

    def _redraw(self, model):
        if self.kind == "rotation":
            fn = require(model, "rotation_restart", needed_by="MultiStart(kind='rotation')",
                         alternative="use kind='perturb' or no MultiStart")
            return lambda g: fn(g)
        fn = require(model, "perturb", needed_by="MultiStart", alternative="use no MultiStart")
        return lambda g: fn(1.0, g)

    def candidate(self, model, seed: int, r: int):
        """Candidate ``r`` (a copy): the model itself (``r = 0``) or its recurrent weights redrawn by ``kind``,
        from a generator seeded by ``seed`` and ``r``."""
        cand = model.copy()
        if r == 0:
            return cand
        self._redraw(cand)(torch.Generator().manual_seed((int(seed) * 1_000_003 + 7919 * r) % (2**63 - 1)))
        return cand

    def apply(self, model, data: Data, seed: int | None, trainer=None) -> dict:
        if trainer is None:
            raise ConfigurationError("MultiStart.apply needs the trainer that runs each candidate short (trainer=...).")
        if self.num_starts > 1:
            self._redraw(model)  # the capability is checked before any candidate is trained
        info = dict(self.base.apply(model, data, seed, trainer))
        t0 = time.perf_counter()
        base = int(torch.randint(0, 2**31 - 1, ()).item()) if seed is None else int(seed)
        short = short_trainer(trainer, self.iterations)
        scores, fits = [], []
        for r in range(self.num_starts):
            cand = self.candidate(model, base, r)
            try:
                fr = short.fit_prepared(cand, data, (base + 104_729 * (r + 1)) % (2**31 - 1))
            except (DivergenceError, DegenerateWeightsError):
                scores.append(-math.inf)
                fits.append(None)
                continue
            scores.append(_score(fr))
            fits.append(fr.model)
        best = max(range(len(scores)), key=lambda i: scores[i])
        if fits[best] is None:
            raise DivergenceError(
                f"MultiStart: every one of the {self.num_starts} candidates diverged. Use more particles or no "
                "MultiStart.", iteration=0, last_good=None)
        model.load_state_dict(fits[best].state_dict())
        info.update({"restart_log_evidence": scores, "restart_chosen": best, "restart_models": tuple(fits),
                     "restart_wall_time_s": time.perf_counter() - t0})
        return info
