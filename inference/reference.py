r"""Reference rows for comparisons: persistence and a linear autoregressive model.

Both are written as linear-Gaussian state-space models (companion form, :class:`~ppl_rnn.models.ARStateSpace`),
so the **same yardstick** (:func:`ppl_rnn.workbench.evaluate.evaluate`) scores them like every fitted network,
and scores them *exactly*: it filters their singular form (capability ``singular_linear_gaussian``), so a
reference row's held-out log-evidence is the reference model's own likelihood of the test steps given the
past, :math:`\sum_{t\ge T_1}\log N(y_t;\,c+\phi^\top y_{t-1:t-p},\,\sigma^2)` per dimension, and its forecasts
are that model's. Each observed dimension :math:`d` gets its own AR(p) model fitted by least squares on the
training data:

.. math:: y_{t,d} = c_d + \sum_{i=1}^{p}\phi_{d,i}\,y_{t-i,d} + \varepsilon_{t,d},\qquad
          \varepsilon_{t,d}\sim N(0,\sigma_d^2),

with state :math:`h_t = (y_t, y_{t-1}, \dots, y_{t-p+1})` per dimension (hidden size :math:`pD`), transition
the companion matrix, and emission :math:`y_t = h_{t,0}` (the model's conditionals add a regularising noise of
:math:`10^{-3}` of the series' scale to the lags and the emission; see :mod:`ppl_rnn.models.ar`).
:math:`\sigma_d^2` is the residual variance :math:`\mathrm{RSS}/(n-p-1)` of the :math:`n` training rows.
**Persistence** ("tomorrow equals today") is the random walk
:math:`p=1, \phi=1, c=0` with :math:`\sigma_d^2` the mean squared one-step difference: its k-step predictive
is :math:`N(y_o, k\sigma^2)`. Rows with missing entries are left out of the least-squares fit.

**Order by AIC.** ``LinearAR(order="aic", max_order=30)`` chooses :math:`p` per dimension on the training data
alone: every order :math:`p = 1..p_{max}` is fitted by least squares on the *same* rows (targets from step
:math:`p_{max}` on, so the criteria are comparable) and scored by
:math:`\mathrm{AIC}(p) = n\log\hat\sigma^2_p + 2(p + 2)` (:math:`\hat\sigma^2_p` the maximum-likelihood residual
variance; :math:`p` coefficients, the intercept and the variance); the chosen order is then refitted on all
complete rows. Dimensions with different orders are padded with zero coefficients to the largest.

Use them as methods: ``pr.fit(model, y, method=Persistence())`` ignores ``model`` except for its
``obs_dim`` and returns a fitted reference model.

**AR start for linear state-space models.** :func:`ar_start` writes least-squares AR(:math:`p`) fits,
:math:`p = \lfloor H/D\rfloor`, in companion form as a :class:`~ppl_rnn.LinearGaussianParams` of hidden size
:math:`H` (the :math:`H - pD` remaining states decoupled: zero rows and columns of :math:`A` and :math:`C`, the
regularising noise). That is the AR model's *regularised* form (its ``linear_gaussian``, with the
:math:`10^{-3}`-of-scale noise on the lags and the emission that exact EM needs: with zero noise the M-step
could never move :math:`R` off zero), so exact EM started there (``KalmanEM(init="ar")``) begins at the
regularised AR's log-evidence — near the AR's own conditional likelihood, not equal to it — and only climbs.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import xarray as xr
from ppl_rnn.models.ar import ARStateSpace

from ppl_rnn.errors import ConfigurationError, DataError
from ppl_rnn.method import InferenceMethod, check_positive_int
from ppl_rnn.model import LinearGaussianParams, StateSpaceModel
from ppl_rnn.results import FitResult

__all__ = ["Persistence", "LinearAR", "FixedModel", "is_reference", "ar_start"]


def _design(y: np.ndarray, m: np.ndarray, p: int):
    """Lagged regression rows for one dimension: ``y`` ``(B,T)``. Returns ``X`` ``(n, p)`` (lags 1..p), ``z`` ``(n,)``."""
    B, T = y.shape
    if T <= p:
        raise DataError(f"the training series has {T} steps; an AR({p}) fit needs more than {p}.")
    Xs, zs = [], []
    for b in range(B):
        lags = np.stack([y[b, p - i:T - i] for i in range(1, p + 1)], 1)  # (T-p, p)
        ok = m[b, p:] & np.stack([m[b, p - i:T - i] for i in range(1, p + 1)], 1).all(1)
        Xs.append(lags[ok])
        zs.append(y[b, p:][ok])
    X, z = np.concatenate(Xs), np.concatenate(zs)
    if len(z) < p + 2:
        raise DataError(f"only {len(z)} complete lagged rows in the training data; an AR({p}) fit needs at least {p + 2}.")
    return X, z


class _Reference(InferenceMethod):
    smooths = False

    def _coeffs(self, X, z):  # pragma: no cover - abstract
        raise NotImplementedError

    def _order(self, y, m) -> tuple[int, dict]:
        """The AR order for one dimension (``y``, ``m`` ``(B, T)``) and facts about the choice."""
        return self.order, {}

    def _fit(self, model, data, seed):
        t0 = time.perf_counter()
        ref, orders, info, sig = self._fit_ar(data, model.dtype)
        # training objective: conditional Gaussian log-likelihood of the least-squares residuals (per row)
        obj = float(-0.5 * np.sum(np.log(2 * np.pi * np.square(sig)) + 1.0))
        wall = time.perf_counter() - t0
        trace = xr.Dataset({"objective": (("iteration",), [obj]), "wall_time_s": (("iteration",), [wall])},
                           coords={"iteration": [0]})
        return FitResult(model=ref, trace=trace, posterior=None, wall_time_s=wall, converged=True,
                         method=self.name, evidence_kind="approximation",
                         diagnostics={"phi": ref.phi, "c": ref.c, "sigma": ref.sigma, "order": orders,
                                      "order_selection": info})

    def _fit_ar(self, data, dt):
        """Least-squares fits per output dimension: ``(ARStateSpace, orders, order facts, sigmas)``."""
        y = data.observations.double().numpy()
        m = data.mask.numpy()
        D = y.shape[-1]
        phi, c, sig, scale, level, orders, info = [], [], [], [], [], [], []
        for d in range(D):
            obs = y[..., d][m[..., d]]
            if obs.size < 3:
                raise DataError(f"dimension {d} has {obs.size} observed training values; a reference fit needs at least 3.")
            p, facts = self._order(y[..., d], m[..., d])
            X, z = _design(y[..., d], m[..., d], p)
            ph, cc, s = self._coeffs(X, z)
            phi.append(ph)
            c.append(cc)
            sig.append(max(s, 1e-6 * (obs.std() + 1e-12)))
            scale.append(obs.std() + 1e-12)
            level.append(obs.mean())
            orders.append(p)
            info.append(facts)
        pmax = max(orders)
        phi = [np.concatenate([ph, np.zeros(pmax - len(ph))]) for ph in phi]
        ref = ARStateSpace(np.array(phi), np.array(c), np.array(sig), np.array(scale), np.array(level), dtype=dt)
        return ref, orders, info, sig


class Persistence(_Reference):
    """Random-walk reference: forecast = last observation, spread growing like :math:`\\sqrt{k}\\,\\sigma`."""

    name = "persistence"
    order = 1

    def _coeffs(self, X, z):
        d = z - X[:, 0]
        return np.ones(1), 0.0, float(np.sqrt(np.mean(d**2)))


class LinearAR(_Reference):
    """Least-squares AR(``order``) reference per observed dimension (with intercept).

    ``order``: a positive int, or ``"aic"``: chosen per dimension by AIC on the training data among
    ``1..max_order`` (at most a quarter of the series' length; module docstring); ``FitResult.diagnostics["order"]`` holds the orders used and
    ``["order_selection"]`` the criterion per order.
    """

    name = "linear_ar"

    def __init__(self, *, order: int | str = 5, max_order: int = 30):
        if isinstance(order, str):
            if order != "aic":
                raise ConfigurationError(f"order must be a positive int or 'aic'; found {order!r}.")
            self.order = "aic"
        else:
            self.order = check_positive_int(order, "order")
        self.max_order = check_positive_int(max_order, "max_order")

    def __repr__(self) -> str:
        return f"LinearAR(order={self.order!r}" + (f", max_order={self.max_order})" if self.order == "aic" else ")")

    def _order(self, y, m):
        if self.order != "aic":
            return self.order, {}
        pm = max(1, min(self.max_order, y.shape[1] // 4))  # short series: at most a quarter of their length
        X, z = _design(y, m, pm)  # the same rows for every candidate order
        n = len(z)
        aic = []
        for p in range(1, pm + 1):
            A = np.concatenate([X[:, :p], np.ones((n, 1))], 1)
            coef, *_ = np.linalg.lstsq(A, z, rcond=None)
            resid = z - A @ coef
            s2 = max(float(resid @ resid) / n, 1e-300)
            aic.append(n * np.log(s2) + 2 * (p + 2))
        best = int(np.argmin(aic)) + 1
        return best, {"criterion": "aic", "max_order": pm, "aic": np.asarray(aic), "rows": n}

    def _coeffs(self, X, z):
        A = np.concatenate([X, np.ones((len(z), 1))], 1)
        coef, *_ = np.linalg.lstsq(A, z, rcond=None)
        resid = z - A @ coef
        dof = max(len(z) - A.shape[1], 1)
        return coef[:-1], float(coef[-1]), float(np.sqrt(resid @ resid / dof))


def ar_start(data, hidden_dim: int, *, dtype=None) -> LinearGaussianParams:
    """Companion-form AR(``hidden_dim // D``) least-squares fits on ``data`` (a validated
    :class:`ppl_rnn.data.Data`) padded to ``hidden_dim`` states (module docstring, "AR start"); with inputs
    their terms start at zero (``B = 0``, ``D = 0``: EM learns them). Raises :class:`ConfigurationError` when ``hidden_dim < D``."""
    D = data.observations.shape[-1]
    p = int(hidden_dim) // D
    if p < 1:
        raise ConfigurationError(
            f"an AR start needs at least one lag per output: hidden_dim is {hidden_dim} and the data have {D} "
            f"outputs. Use a model with hidden_dim >= {D}, or start from the model as given (init='model').")
    dt = dtype or data.observations.dtype
    lg = LinearAR(order=p)._fit_ar(data, dt)[0].linear_gaussian()
    H, n = int(hidden_dim), p * D
    tiny = float(lg.Q.diagonal()[1:].min()) if n > 1 else 1e-6 * float(lg.Q[0, 0])

    def pad(M, rows, cols, fill_diag=0.0):
        out = torch.zeros(rows, cols, dtype=dt)
        out[:M.shape[0], :M.shape[1]] = M.to(dt)
        for i in range(M.shape[0], min(rows, cols)):
            out[i, i] = fill_diag
        return out

    pad_v = torch.zeros(H - n, dtype=dt)
    n_in = 0 if data.inputs is None else data.inputs.shape[-1]
    return LinearGaussianParams(
        A=pad(lg.A, H, H), b=torch.cat([lg.b.to(dt), pad_v]), Q=pad(lg.Q, H, H, tiny), C=pad(lg.C, D, H),
        d=lg.d.to(dt), R=lg.R.to(dt), m0=torch.cat([lg.m0.to(dt), pad_v]), P0=pad(lg.P0, H, H, tiny),
        B=torch.zeros(H, n_in, dtype=dt) if n_in else None, D=torch.zeros(D, n_in, dtype=dt) if n_in else None,
        diagonal_noise=True)


def is_reference(method) -> bool:
    """Whether ``method`` is one of the reference rows (they fit instantly; reports label them)."""
    return isinstance(method, (_Reference, FixedModel))



class FixedModel(InferenceMethod):
    """A given model scored as is (no training): e.g. the generating network of simulated data, the ceiling
    every fitted model is measured against. ``pr.fit`` returns a copy of ``model``."""

    name = "fixed_model"
    smooths = False

    def __init__(self, model: StateSpaceModel, *, label: str = "fixed_model"):
        if not isinstance(model, StateSpaceModel):
            raise DataError(f"FixedModel needs a StateSpaceModel; found {type(model).__name__}.")
        self.model = model
        self.label = str(label)

    def __repr__(self) -> str:
        return f"FixedModel({type(self.model).__name__}, label={self.label!r})"

    def _fit(self, model, data, seed):
        trace = xr.Dataset({"objective": (("iteration",), [np.nan])}, coords={"iteration": [0]})
        return FitResult(model=self.model.copy(), trace=trace, posterior=None, wall_time_s=0.0, converged=True,
                         method=self.label, evidence_kind="approximation")
