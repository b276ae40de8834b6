r"""The exact oracle of the particle-MCMC tests (PMMH, particle Gibbs): a 1-D linear-Gaussian user model with
``PyroSample`` priors on its two noise scales, and its exact parameter posterior by 2-D quadrature.

.. math:: h_0\sim N(0, 1),\quad h_t = 0.9\,h_{t-1} + N(0, q^2),\quad y_t = h_t + N(0, r^2),\quad
          q, r \sim \text{HalfNormal}(1)

The marginal likelihood :math:`p(y\mid q, r)` is the scalar Kalman filter's (float64, vectorised over a grid of
:math:`(q, r)`); the posterior :math:`p(q, r\mid y)\propto p(y\mid q,r)\,p(q)\,p(r)` is integrated on a fine grid
(trapezoid rule) over the region where it is not negligible, giving posterior means and standard deviations far
more accurate than any Monte Carlo tolerance.
"""

from __future__ import annotations

import math

import numpy as np
import pyro.distributions as dist
import torch
from pyro.nn import PyroSample

from ppl_rnn import StateSpaceModel

A = 0.9
TRUE_Q, TRUE_R = 0.5, 0.3


class LinearGaussian1D(StateSpaceModel):
    r""":math:`h_t = 0.9 h_{t-1} + N(0,q^2)`, :math:`y_t = h_t + N(0,r^2)`, :math:`h_0\sim N(0,1)`; ``q``, ``r``
    are ``PyroSample(HalfNormal(1))`` priors (a user model: it declares no capability)."""

    def __init__(self):
        super().__init__(1, 1)
        self.q = PyroSample(dist.HalfNormal(torch.tensor(1.0)))
        self.r = PyroSample(dist.HalfNormal(torch.tensor(1.0)))

    def initial(self, u0):
        return dist.Normal(torch.zeros(1), torch.ones(1)).to_event(1)

    def transition(self, t, h_prev, u_t):
        return dist.Normal(A * h_prev, self.q * torch.ones_like(h_prev)).to_event(1)

    def emission(self, t, h, u_t):
        return dist.Normal(h, self.r * torch.ones_like(h)).to_event(1)


def oracle_data(seed: int = 0, T: int = 60, q: float = TRUE_Q, r: float = TRUE_R) -> torch.Tensor:
    """``(1, T, 1)`` float32 observations simulated from the model at ``(q, r)``."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn((), generator=g, dtype=torch.float64)
    ys = []
    for t in range(T):
        if t > 0:
            h = A * h + q * torch.randn((), generator=g, dtype=torch.float64)
        ys.append(h + r * torch.randn((), generator=g, dtype=torch.float64))
    return torch.stack(ys).reshape(1, T, 1).float()


def kalman_log_likelihood(y: np.ndarray, q: np.ndarray, r: np.ndarray) -> np.ndarray:
    """:math:`\\log p(y\\mid q, r)` for a 1-D series ``y`` ``(T,)``, vectorised over arrays ``q``, ``r`` (float64)."""
    q2, r2 = np.asarray(q, dtype=np.float64) ** 2, np.asarray(r, dtype=np.float64) ** 2
    m = np.zeros(np.broadcast(q2, r2).shape)
    P = np.ones_like(m)
    ll = np.zeros_like(m)
    for t, yt in enumerate(np.asarray(y, dtype=np.float64)):
        if t > 0:
            m = A * m
            P = A * A * P + q2
        S = P + r2
        e = yt - m
        ll += -0.5 * (math.log(2 * math.pi) + np.log(S) + e * e / S)
        K = P / S
        m = m + K * e
        P = (1 - K) * P
    return ll


def _log_half_normal(x: np.ndarray) -> np.ndarray:
    return 0.5 * math.log(2 / math.pi) - 0.5 * x * x


def exact_posterior(y: torch.Tensor, grid: int = 501) -> dict[str, tuple[float, float]]:
    """``{"q": (mean, sd), "r": (mean, sd)}`` of :math:`p(q, r\\mid y)` by 2-D quadrature: a coarse grid finds the
    region holding the mass, a ``grid x grid`` trapezoid rule integrates it."""
    yy = y.reshape(-1).double().numpy()

    def moments(qs, rs):
        Q, R = np.meshgrid(qs, rs, indexing="ij")
        lp = kalman_log_likelihood(yy, Q, R) + _log_half_normal(Q) + _log_half_normal(R)
        w = np.exp(lp - lp.max())
        wq = np.trapezoid(w, rs, axis=1)  # marginal of q (unnormalised)
        wr = np.trapezoid(w, qs, axis=0)
        z = np.trapezoid(wq, qs)
        out = {}
        for name, xs, wx in (("q", qs, wq), ("r", rs, wr)):
            mean = np.trapezoid(xs * wx, xs) / z
            var = np.trapezoid((xs - mean) ** 2 * wx, xs) / z
            out[name] = (float(mean), float(math.sqrt(var)))
        return out, w, Q, R

    qs = np.linspace(1e-4, 4.0, 400)
    rs = np.linspace(1e-4, 4.0, 400)
    _, w, Q, R = moments(qs, rs)
    keep = w > 1e-14
    lo_q, hi_q = max(1e-6, Q[keep].min() * 0.8), Q[keep].max() * 1.2 + 0.01
    lo_r, hi_r = max(1e-6, R[keep].min() * 0.8), R[keep].max() * 1.2 + 0.01
    out, _, _, _ = moments(np.linspace(lo_q, hi_q, grid), np.linspace(lo_r, hi_r, grid))
    return out


def mc_se(draws) -> float:
    """Monte Carlo standard error of the posterior mean of ``draws`` ``(chains, draws)``: sd / sqrt(ESS), with
    the bulk ESS of ArviZ (rank-normalised, over chains)."""
    import arviz as az

    x = np.asarray(draws.detach().cpu().double() if isinstance(draws, torch.Tensor) else draws, dtype=np.float64)
    ess = float(az.ess(x, method="bulk"))
    return float(x.std(ddof=1) / math.sqrt(ess))


def rhat(draws) -> float:
    """ArviZ's rank-normalised split R-hat of ``draws`` ``(chains, draws)``."""
    import arviz as az

    x = np.asarray(draws.detach().cpu().double() if isinstance(draws, torch.Tensor) else draws, dtype=np.float64)
    return float(az.rhat(x))
