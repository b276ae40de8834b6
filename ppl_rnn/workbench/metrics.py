r"""Forecast metrics from predictive draws, under the names the forecasting libraries use (GluonTS, sktime,
darts). Every function takes draws ``samples`` ``(S, ...)`` of the predictive of targets ``y`` ``(...)`` and,
where it pools, a boolean ``mask`` ``(...)`` of the observed targets (NaN targets are never scored).

* **CRPS** (:func:`crps_samples`), per target: :math:`E|X-y| - \tfrac12 E|X-X'|`, the pair term averaged over the
  :math:`S(S-1)` ordered pairs of distinct draws (the "fair" ensemble estimator, unbiased for the CRPS of the
  distribution the draws come from; ``scoringrules.crps_ensemble(..., estimator="fair")``).
* **Interval coverage** (:func:`interval_coverage`) at nominal level :math:`\alpha`: the fraction of observed
  targets inside the central interval :math:`[\hat q_{(1-\alpha)/2},\ \hat q_{(1+\alpha)/2}]` (ends included)
  of the draws; :math:`\alpha` for a calibrated forecast.
* **Weighted quantile loss** (:func:`weighted_quantile_loss`, GluonTS ``wQuantileLoss[q]`` and its mean over the
  levels ``mean_wQuantileLoss``): with :math:`\hat q_i` the draws' :math:`q`-quantile for target :math:`i`,
  :math:`\mathrm{wQL}_q = 2\sum_i \rho_q(y_i - \hat q_i) / \sum_i |y_i|`, :math:`\rho_q(u) = u\,(q -
  \mathbb 1\{u<0\})` the pinball loss, sums over all observed targets (sequences, times, outputs pooled);
  ``mean_wql`` averages :math:`\mathrm{wQL}_q` over :data:`WQL_LEVELS` (0.1, ..., 0.9, GluonTS's default).
  Scale-free, but relative to the level of :math:`y`: unstable for series that hover around zero.
* **MASE** (:func:`mase`, Hyndman & Koehler 2006): the point forecast :math:`\hat y_i` is the draws' median
  (as in GluonTS); each error is scaled by its series' in-sample naive MAE,
  :math:`s_{b,d} = \operatorname{mean}_t |y_{b,t,d} - y_{b,t-m,d}|` over the **training** part (pairs with both
  ends observed; :math:`m` = ``season``, 1 = the non-seasonal naive forecast, the yardstick's choice), and
  :math:`\mathrm{MASE} = \operatorname{mean}_i |y_i - \hat y_i| / s_{b(i),d(i)}` over the observed targets
  (equal to GluonTS's mean over series when every series has the same number of targets). Below 1: better
  than the in-sample one-step naive forecast. The scale is the one-step naive error whatever the lead.

Quantiles of draws are :func:`torch.quantile`'s (linear interpolation, like ``numpy.quantile``).
"""

from __future__ import annotations

import math

import torch

from ppl_rnn.errors import ConfigurationError

__all__ = ["replicate_log_evidence", "crps_samples", "interval_coverage", "weighted_quantile_loss", "naive_scale", "mase", "WQL_LEVELS",
           "COVERAGE_LEVELS"]

#: quantile levels of ``mean_wql`` (GluonTS's default ``Evaluator`` quantiles)
WQL_LEVELS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
#: nominal levels of the central intervals whose coverage the yardstick reports (``coverage_50`` ...)
COVERAGE_LEVELS = (0.5, 0.8, 0.9, 0.95)


def crps_samples(samples: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    r"""Energy-form CRPS :math:`E|X-y| - \tfrac12 E|X-X'|` per entry from draws ``samples`` ``(S, ...)``.

    :math:`E|X-X'|` uses the sorted-sample identity
    :math:`\sum_{i<j}|x_{(j)}-x_{(i)}| = \sum_i (2i - S + 1)\,x_{(i)}` (0-based :math:`i`), averaged over the
    :math:`S(S-1)/2` distinct pairs (unbiased). Returns a tensor of shape ``samples.shape[1:]``.
    """
    S = samples.shape[0]
    term1 = (samples - y).abs().mean(0)
    if S < 2:
        return term1
    xs, _ = torch.sort(samples, dim=0)
    i = torch.arange(S, dtype=samples.dtype, device=samples.device).reshape((S,) + (1,) * (samples.dim() - 1))
    pair_sum = ((2 * i - S + 1) * xs).sum(0)  # sum over i<j of |x_j - x_i|
    term2 = pair_sum / (S * (S - 1) / 2)
    return term1 - 0.5 * term2


def _quantiles(samples: torch.Tensor, levels) -> torch.Tensor:
    return torch.quantile(samples, torch.tensor(list(levels), dtype=samples.dtype, device=samples.device), dim=0)


def interval_coverage(samples: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, level: float) -> float:
    r"""Fraction of the observed targets inside the draws' central ``level`` interval (module docstring);
    NaN when no target is observed."""
    lo, hi = _quantiles(samples, ((1 - level) / 2, (1 + level) / 2))
    inside = (y >= lo) & (y <= hi)
    return float(inside[mask].double().mean()) if bool(mask.any()) else float("nan")


def weighted_quantile_loss(samples: torch.Tensor, y: torch.Tensor, mask: torch.Tensor,
                           levels=WQL_LEVELS) -> torch.Tensor:
    r""":math:`\mathrm{wQL}_q = 2\sum_i\rho_q(y_i-\hat q_i)/\sum_i|y_i|` per level ``q`` in ``levels`` (a
    ``(len(levels),)`` float64 tensor; its mean is GluonTS's ``mean_wQuantileLoss``), over the observed
    targets; NaN when none is observed or :math:`\sum_i|y_i| = 0`."""
    q = _quantiles(samples, levels).double()  # (L, ...)
    yd = y.double()
    lv = torch.tensor(list(levels), dtype=torch.float64).reshape((-1,) + (1,) * yd.dim())
    u = yd - q
    pinball = torch.where(u >= 0, lv * u, (lv - 1) * u)  # rho_q(u) = u (q - 1{u < 0})
    denom = yd[mask].abs().sum()
    if not bool(mask.any()) or float(denom) == 0.0:
        return torch.full((len(levels),), float("nan"), dtype=torch.float64)
    return 2 * pinball[:, mask].sum(-1) / denom


def naive_scale(train: torch.Tensor, mask: torch.Tensor, season: int = 1) -> torch.Tensor:
    r""":math:`s_{b,d} = \operatorname{mean}_t |y_{b,t,d} - y_{b,t-m,d}|` over the training series ``train``
    ``(B, T1, D)`` (``mask`` the observed entries; pairs with both ends observed), ``m`` = ``season``: the
    in-sample MAE of the (seasonal) naive forecast, MASE's denominator. ``(B, D)`` float64; NaN where a
    series has no such pair."""
    y = train.double()
    B, T, D = y.shape
    if T <= season:
        return torch.full((B, D), float("nan"), dtype=torch.float64)
    ok = mask[:, season:] & mask[:, :-season]
    d = (y[:, season:] - y[:, :-season]).abs().masked_fill(~ok, 0.0)
    n = ok.sum(1)
    return torch.where(n > 0, d.sum(1) / n.clamp_min(1), torch.full(n.shape, float("nan"), dtype=torch.float64))


def mase(samples: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, scale: torch.Tensor) -> float:
    r"""MASE of the draws' median (module docstring). ``samples`` ``(S, ..., B, D)``, ``y``/``mask``
    ``(..., B, D)``, ``scale`` ``(B, D)`` from :func:`naive_scale`; targets whose series has no positive finite
    scale are left out; NaN when none is left."""
    med = torch.quantile(samples.double(), 0.5, dim=0)
    ok = mask & torch.isfinite(scale) & (scale > 0)
    if not bool(ok.any()):
        return float("nan")
    err = (y.double() - med).abs() / scale
    return float(err[ok].mean())


def replicate_log_evidence(log_z: torch.Tensor) -> tuple[float, float]:
    r"""Bias-corrected log-evidence and its standard error from ``R`` independent runs.

    ``log_z`` ``(R, B)``: :math:`\ell_{rb}`, run :math:`r`'s log-evidence estimate for sequence :math:`b`.
    Returns :math:`(\hat L, \operatorname{SE})` with :math:`\hat L = \sum_b(\bar\ell_b + s_b^2/2)` and
    :math:`\operatorname{SE}^2 = \sum_b (s_b^2/R + s_b^4/(2(R-1)))` (log-normal CLT; see the module docstring).
    """
    R = log_z.shape[0]
    if R < 2:
        raise ConfigurationError(f"replicate_log_evidence needs at least 2 runs; found {R}.")
    x = log_z.double()
    m, s2 = x.mean(0), x.var(0, unbiased=True)
    est = float((m + 0.5 * s2).sum())
    var = float((s2 / R + s2.square() / (2 * (R - 1))).sum())
    return est, math.sqrt(var)
