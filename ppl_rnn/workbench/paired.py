r"""Is model A's forecast really better than model B's? Paired differences of forecast scores with an interval
that respects serial correlation (the Diebold–Mariano comparison).

Two models scored by :func:`ppl_rnn.workbench.evaluate.evaluate` on the same ``train``/``test`` split forecast
the same targets. Per horizon :math:`k` and target :math:`t` (per sequence, over the observed targets),
the loss differential is

.. math:: d_t = L^A_t - L^B_t, \qquad \bar d = \frac1n \sum_t d_t \quad(\text{negative: A is better}),

with :math:`L` the CRPS (``metric="crps"``) or the squared error of the predictive mean (``"sqerr"``; its
mean is the MSE, the square of ``evaluate``'s RMSE). Rolling-origin forecast errors are serially
correlated — :math:`k`-step errors overlap by construction, and on smooth signals the errors of nearby
origins are alike for many more steps — so :math:`\operatorname{Var}(\bar d)` is the long-run variance over
:math:`n`. :func:`mean_interval` estimates it in three parts, each for a way the plain Newey–West interval
(Andrews' lag, :math:`\pm 1.96` SE) under-covers when :math:`d` is persistent:

1. **A bandwidth that grows with persistence.** The Bartlett (Newey–West) estimator with lag :math:`\ell`
   (window :math:`M = \ell + 1`), summed over independent sequences :math:`b` and centred at the overall mean,

   .. math:: \hat V = \sum_b \sum_{|j|\le \ell}\Big(1-\frac{|j|}{M}\Big)\sum_t (d_{b,t}-\bar d)(d_{b,t-j}-\bar d)
             = \sum_b \frac1M \sum_{s} \Big(\sum_{t=s}^{s+M-1} (d_{b,t}-\bar d)\Big)^2

   (windows clipped to the sequence; computed from FFT autocovariance sums). Its lag is
   :math:`\ell = \lceil (4\,\hat\delta\,\bar m)^{1/2}\rceil` with :math:`\hat\delta = 2|\tilde\rho|/(1-\tilde\rho^2)`
   the AR(1) plug-in of the Bartlett bias constant :math:`\sum_j |j|\gamma_j / \sum_j\gamma_j` and
   :math:`\bar m` the mean sequence length: the :math:`\sqrt n` rate of bandwidths chosen for testing
   rather than for the mean squared error of :math:`\hat V` (Sun, Phillips & Jin 2008; Andrews' MSE-optimal
   :math:`n^{1/3}` lag is too short for tests), at least :math:`k-1` (the overlap of :math:`k`-step forecasts)
   and at most the longest sequence. :math:`\tilde\rho = \hat\rho + (1+3\hat\rho)/\bar m` is the pooled lag-one
   autocorrelation (each sequence centred at its own mean) with Kendall's bias correction, clipped to
   :math:`[-0.97, 0.99]`.
2. **Its finite-sample bias removed** under the same AR(1) plug-in: centring at :math:`\bar d` and truncating
   at :math:`\ell` make :math:`E\hat V = \kappa\, n^2\operatorname{Var}(\bar d)` with :math:`\kappa < 1`, and
   :math:`\kappa` is computed exactly for an AR(1) with coefficient :math:`\tilde\rho` and the actual sequence
   lengths (closed forms of the expected centred lag sums, ``_ar1_kappa``), so

   .. math:: \operatorname{SE} = \sqrt{\hat V/\kappa}\,/\,n .

3. **Fixed-b critical values** for the sampling variability of :math:`\hat V` (Kiefer & Vogelsang 2005):
   with :math:`b = M/m` the statistic :math:`\bar d/\operatorname{SE}` behaves like :math:`Z/\sqrt{Q}`, with
   :math:`Z\sim\mathcal N(0,1)` independent of :math:`Q`, the Bartlett functional of Brownian bridges (one per
   sequence, weighted by length) normalised to mean 1 (the mean is part 2's job). :math:`Q` is simulated once
   per :math:`(m, M)` (4000 iid Gaussian paths of :math:`\min(m, 200)` steps, a fixed internal seed), the
   critical value :math:`c` solves :math:`E_Q[\operatorname{erfc}(c\sqrt{Q/2})] = 1 - \text{level}` and the
   two-sided p-value of :math:`z = \bar d/\operatorname{SE}` is :math:`E_Q[\operatorname{erfc}(|z|\sqrt{Q/2})]`;
   :math:`c` is 1.96 for short lags and grows with :math:`b`.

The 95% interval is :math:`\bar d \pm c\,\operatorname{SE}`; its coverage of AR(1) differences is tested in
``tests/core/test_paired.py`` (at least 0.9 for :math:`\rho\le 0.95`, :math:`n\ge 300`). The AR(1) plug-in is a
working model for the bias and the bandwidth, not an assumption the interval needs: parts 1 and 3 are
nonparametric, and on differences that are not AR(1) (a persistent AR(1) plus white noise, the MA(k-1)
overlap of k-step forecasts) the interval covers better than the plain Newey–West one. The Monte Carlo noise
of the sample CRPS (``num_samples`` draws per origin) is part of :math:`d_t`, so it is inside the SE.

"At least as good" is then a statement with a margin: :math:`\bar d \le 0` is shown if the interval lies
below 0; a :math:`\bar d > 0` whose interval covers 0 is parity within the evidence of this test set.
:func:`hac_mean_se` (plain Newey–West at a given lag) and :func:`andrews_lag` (Andrews' 1991 MSE-optimal
lag) are kept as building blocks.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import xarray as xr

from ppl_rnn.errors import ConfigurationError, DataError
from ppl_rnn.method import check_choice

__all__ = ["forecast_difference", "grid_difference", "mean_interval", "MeanInterval", "hac_mean_se", "andrews_lag"]

_DIMS = ("horizon", "sequence", "time", "obs")


def andrews_lag(d: np.ndarray, n: int) -> int:
    r"""Andrews' (1991) AR(1) plug-in lag for the Bartlett kernel from the series ``d`` (rows: sequences,
    NaN = no target), :math:`\lfloor 1.1447(\hat\alpha n)^{1/3}\rfloor`."""
    num = den = 0.0
    for row in d:
        x = row[np.isfinite(row)]
        if len(x) < 3:
            continue
        x = x - x.mean()
        num += float(x[1:] @ x[:-1])
        den += float(x @ x)
    if den <= 0:
        return 0
    rho = min(max(num / den, -0.97), 0.97)
    alpha = 4 * rho ** 2 / ((1 - rho) ** 2 * (1 + rho) ** 2)
    return int(math.floor(1.1447 * (alpha * n) ** (1 / 3)))


def hac_mean_se(d: np.ndarray, lag: int) -> tuple[float, float, int]:
    r"""Mean of ``d`` ``(sequences, time)`` over its finite entries and its Newey–West standard error with
    Bartlett lag ``lag`` (sequences independent; gaps (NaN) are skipped, the remaining entries of a sequence
    taken as consecutive). Returns ``(mean, se, n)``."""
    rows = [row[np.isfinite(row)] for row in np.atleast_2d(d)]
    n = sum(len(r) for r in rows)
    if n == 0:
        return float("nan"), float("nan"), 0
    mean = float(sum(r.sum() for r in rows) / n)
    total = 0.0
    for r in rows:
        x = r - mean
        m = len(x)
        s = float(x @ x)
        for j in range(1, min(lag, m - 1) + 1):
            s += 2 * (1 - j / (lag + 1)) * float(x[j:] @ x[:-j])
        total += s
    return mean, math.sqrt(max(total, 0.0)) / n, n


class MeanInterval(NamedTuple):
    """:func:`mean_interval`'s answer (arrays over the leading batch dims; floats for one problem)."""

    mean: Any           #: :math:`\bar d` over the finite entries
    se: Any             #: :math:`\sqrt{\hat V/\kappa}/n`
    n: Any              #: number of finite entries
    lag: Any            #: Bartlett lag :math:`\ell`
    rho: Any            #: :math:`\tilde\rho`, the bias-corrected lag-one autocorrelation (the AR(1) plug-in)
    kappa: Any          #: :math:`E\hat V / (n^2\operatorname{Var}\bar d)` under the plug-in
    critical_value: Any  #: fixed-b :math:`c` at ``level``
    p_value: Any        #: two-sided fixed-b p-value of :math:`\bar d/\operatorname{SE}` against 0
    level: float


#: paths and grid of the fixed-b simulation (part 3 of the module docstring), and its fixed seed
_FB_PATHS, _FB_GRID, _FB_SEED = 4000, 200, 20050101


@functools.lru_cache(maxsize=16)
def _fixed_b_paths(grid: int, which: int) -> np.ndarray:
    r"""Autocovariance sums :math:`\sum_t z_t z_{t+j}`, :math:`j < ` ``grid``, of ``_FB_PATHS`` demeaned iid
    N(0,1) paths of ``grid`` steps (by FFT); ``which`` picks an independent bank."""
    rng = np.random.default_rng([_FB_SEED, grid, which])
    z = rng.standard_normal((_FB_PATHS, grid))
    z -= z.mean(1, keepdims=True)
    f = np.fft.rfft(z, 2 * grid, axis=1)
    return np.fft.irfft(f * f.conj(), 2 * grid, axis=1)[:, :grid]


def _fixed_b_q(grid: int, window: int, which: int) -> np.ndarray:
    """``_FB_PATHS`` draws of the Bartlett sums (window ``window``) of demeaned iid N(0,1) paths of ``grid``
    steps, divided by ``grid`` (mean about :math:`1-b+b^2/3`, :math:`b` = window/grid)."""
    j = np.arange(window)
    w = np.where(j == 0, 1.0, 2 * (1 - j / window))
    return _fixed_b_paths(grid, which)[:, :window] @ w / grid


def _fixed_b_key(m: np.ndarray, window: int) -> tuple:
    r"""Cache key of :func:`_fixed_b_bank`: ``((grid, grid window, length), ...)`` per non-empty sequence, the
    grid :math:`\min(m, 200)` and the grid window at the same :math:`b = M/m`."""
    out = []
    for v in m:
        v = int(v)
        if v > 0:
            g = min(v, _FB_GRID)
            out.append((g, int(min(g, max(1, round(window * g / v)))), v))
    return tuple(out)


@functools.lru_cache(maxsize=1024)
def _fixed_b_bank(key: tuple) -> np.ndarray:
    r"""Draws of :math:`Q/E Q` for ``key`` (:func:`_fixed_b_key`): the length-weighted sum of one independent
    Bartlett functional per sequence (each on its grid at the same :math:`b = M/m`), divided by its mean."""
    n = sum(v for _, _, v in key)
    q = np.zeros(_FB_PATHS)
    for i, (g, w, v) in enumerate(key):
        q += (v / n) * _fixed_b_q(g, w, i)
    return q / q.mean()


@functools.lru_cache(maxsize=1024)
def _fixed_b_cv(key: tuple, level: float) -> float:
    r"""Critical value :math:`c` with :math:`E_Q[\operatorname{erfc}(c\sqrt{Q/2})] = 1 - \text{level}`."""
    from scipy.optimize import brentq
    from scipy.special import erfc

    s = np.sqrt(_fixed_b_bank(key) / 2)
    return float(brentq(lambda c: float(erfc(c * s).mean()) - (1 - level), 1e-6, 1e4, xtol=1e-10))


def _bartlett_weights(window: np.ndarray, T: int) -> np.ndarray:
    """``(P, T)`` weights of lags :math:`j = 0..T-1`: 1 at 0, :math:`2(1 - j/M)` for :math:`0 < j < M`, else 0."""
    j = np.arange(T)[None, :]
    M = window[:, None]
    return np.where(j == 0, 1.0, 2 * np.clip(1 - j / M, 0.0, None))


def _bartlett_sums(x: np.ndarray, m: np.ndarray, window: np.ndarray) -> np.ndarray:
    r""":math:`\hat V_b = \sum_{|j|<M}(1-|j|/M)\sum_t x_{b,t}x_{b,t+j}` per problem and sequence (the window
    form of the module docstring): ``x`` ``(P, B, T)`` (zero past each sequence's length ``m`` ``(P, B)``),
    ``window`` ``(P,)`` :math:`M`. Autocovariance sums by FFT. Returns ``(P, B)``."""
    T = x.shape[-1]
    f = np.fft.rfft(x, 2 * T, axis=-1)
    g = np.fft.irfft(f * f.conj(), 2 * T, axis=-1)[..., :T]  # (P, B, T): sum_t x_t x_{t+j}
    return (g * _bartlett_weights(window, T)[:, None, :]).sum(-1)


def _ar1_kappa(rho: np.ndarray, m: np.ndarray, window: np.ndarray) -> np.ndarray:
    r""":math:`\kappa = E\sum_b\hat V_b/\operatorname{Var}(\sum d)` for a stationary AR(1) with coefficient
    ``rho`` ``(P,)`` (unit variance), sequence lengths ``m`` ``(P, B)``, window ``(P,)``, centring at the overall
    mean, exactly. With row sums :math:`r_t=\sum_{s<m}\rho^{|t-s|}` (prefix sums :math:`R`),
    :math:`F = \operatorname{Var}(\sum d) = \sum_b\sum_t r_{b,t}` and :math:`n = \sum_b m_b`,

    .. math:: E\sum_{t<m-j}(d_t-\bar d)(d_{t+j}-\bar d) = (m-j)\rho^j - \frac{R_{m-j} + R_m - R_j}{n}
              + (m-j)\frac{F}{n^2},

    weighted by the Bartlett weights of lag :math:`j`."""
    P, B = m.shape
    T = int(m.max())
    r = np.where(np.abs(rho) < 1e-12, 1e-12, rho)[:, None, None]
    t = np.arange(T)[None, None, :]
    mm = m[..., None]
    pw = np.broadcast_to(r ** np.arange(T + 1)[None, None, :], (P, B, T + 1))  # rho^k
    back = np.take_along_axis(pw, np.clip(mm - 1 - t, 0, T), -1)
    row = np.where(t < mm, 1 + (r * (1 - pw[..., :T]) + r * (1 - back)) / (1 - r), 0.0)
    R = np.concatenate([np.zeros((P, B, 1)), np.cumsum(row, -1)], -1)  # R[k] = sum of the first k
    n = m.sum(-1)[:, None, None].astype(float)
    F = R[..., -1:].sum(1, keepdims=True)
    left = np.clip(mm - t, 0, None)  # m - j terms, j = t
    cross = np.take_along_axis(R, left, -1) + R[..., -1:] - np.take_along_axis(R, np.minimum(t, mm), -1)
    e = left * pw[..., :T] - cross / n + left * F / n ** 2
    e = np.where(left > 0, e, 0.0)
    V = (e * _bartlett_weights(window, T)[:, None, :]).sum((1, 2))
    return V / F[:, 0, 0]


def mean_interval(d, *, lag: int | None = None, min_lag: int = 0, level: float = 0.95) -> MeanInterval:
    r"""Mean of ``d`` and an interval for it that respects serial correlation (module docstring, parts 1-3).

    Args:
        d: ``(..., sequences, time)`` (or ``(time,)``); leading dims are independent problems (vectorised),
            sequences within a problem are independent, NaN entries are skipped (the remaining entries of a
            sequence taken as consecutive).
        lag: the Bartlett lag (default: :math:`\lceil(4\hat\delta\bar m)^{1/2}\rceil`, part 1), an int >= 0.
        min_lag: a floor for the default lag (``k - 1`` for ``k``-step forecasts).
        level: of the interval :math:`\bar d\pm c\,\operatorname{SE}`.

    Returns:
        :class:`MeanInterval` (NaN fields where a problem has no finite entry).
    """
    if lag is not None and (isinstance(lag, bool) or not isinstance(lag, (int, np.integer)) or lag < 0):
        raise ConfigurationError(f"lag must be an integer >= 0 or None; found {lag!r}.")
    if not (isinstance(min_lag, (int, np.integer)) and not isinstance(min_lag, bool) and min_lag >= 0):
        raise ConfigurationError(f"min_lag must be an integer >= 0; found {min_lag!r}.")
    if not (isinstance(level, float | int) and 0 < level < 1):
        raise ConfigurationError(f"level must be in (0, 1), e.g. 0.95; found {level!r}.")
    x = np.asarray(d, dtype=float)
    if x.ndim == 0:
        raise DataError("d must have a time axis: shape (time,), (sequences, time) or (..., sequences, time); "
                        "found a scalar.")
    x = x.reshape((1,) * max(0, 2 - x.ndim) + x.shape)
    batch, (B, T) = x.shape[:-2], x.shape[-2:]
    x = x.reshape((-1, B, T))
    ok = np.isfinite(x)
    order = np.argsort(~ok, axis=-1, kind="stable")  # finite entries first, in time order
    m = ok.sum(-1)  # (P, B) sequence lengths
    x = np.where(np.arange(T) < m[..., None], np.take_along_axis(x, order, -1), 0.0)
    P = x.shape[0]
    fields = {k: np.full(P, np.nan) for k in ("mean", "se", "rho", "kappa", "critical_value", "p_value")}
    lags = np.zeros(P, dtype=int)
    n = m.sum(-1)
    todo = np.flatnonzero(n > 0)
    step = max(1, int(4e6 // (B * (2 * T + 1))))  # bounded memory: problems per block
    for start in range(0, len(todo), step):
        idx = todo[start:start + step]
        out = _interval_block(x[idx], m[idx], lag, min_lag, float(level))
        for k, v in out.items():
            if k == "lag":
                lags[idx] = v
            else:
                fields[k][idx] = v
    res = dict(mean=fields["mean"], se=fields["se"], n=n, lag=lags, rho=fields["rho"], kappa=fields["kappa"],
               critical_value=fields["critical_value"], p_value=fields["p_value"])
    res = {k: (v.reshape(batch) if batch else v[0].item()) for k, v in res.items()}
    return MeanInterval(**res, level=float(level))


def _interval_block(x: np.ndarray, m: np.ndarray, lag, min_lag: int, level: float) -> dict:
    """:func:`mean_interval` on problems ``x`` ``(P, B, T)`` (finite entries first, zero after) with lengths
    ``m`` ``(P, B)``, every problem holding at least one entry."""
    from scipy.special import erfc

    T = x.shape[-1]
    valid = np.arange(T) < m[..., None]
    n = m.sum(-1)
    mu = x.sum((1, 2)) / n
    # part 1: pooled lag-one autocorrelation (each sequence centred at its own mean), Kendall-corrected
    use = m >= 3
    own = np.where(valid & use[..., None], x - (x.sum(-1) / np.maximum(m, 1))[..., None], 0.0)
    num = (own[..., 1:] * own[..., :-1]).sum((1, 2))
    den = (own ** 2).sum((1, 2))
    nseq = use.sum(-1)
    mbar = np.where(nseq > 0, (m * use).sum(-1) / np.maximum(nseq, 1), n)
    r0 = num / np.where(den > 0, den, 1.0)
    r = np.clip(np.where(den > 0, r0 + (1 + 3 * r0) / mbar, 0.0), -0.97, 0.99)
    if lag is None:
        L = np.maximum(np.ceil(np.sqrt(8 * np.abs(r) / (1 - r ** 2) * mbar)).astype(int), min_lag)
    else:
        L = np.full(len(n), int(lag))
    L = np.clip(L, 0, np.maximum(m.max(-1) - 1, 0))
    window = L + 1
    # part 2: Bartlett sums around the overall mean, divided by their AR(1) expectation factor
    V = _bartlett_sums(np.where(valid, x - mu[:, None, None], 0.0), m, window).sum(-1)
    kappa = _ar1_kappa(r, m, window)
    se = np.sqrt(np.maximum(V, 0.0) / kappa) / n
    # part 3: fixed-b critical value and p-value
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(se > 0, np.abs(mu) / np.where(se > 0, se, 1.0), np.where(mu == 0, 0.0, np.inf))
    cv, pv = np.empty(len(n)), np.empty(len(n))
    groups: dict[tuple, list[int]] = {}
    for i in range(len(n)):
        groups.setdefault(_fixed_b_key(m[i], int(window[i])), []).append(i)
    for key, idx in groups.items():
        cv[idx] = _fixed_b_cv(key, level)
        zi = z[idx]
        fin = np.isfinite(zi)
        pv[idx] = np.where(fin, erfc(np.where(fin, zi, 0.0)[:, None] * np.sqrt(_fixed_b_bank(key) / 2)).mean(-1), 0.0)
    return dict(mean=mu, se=se, rho=r, kappa=kappa, critical_value=cv, p_value=pv, lag=L)


def _losses(ev: xr.Dataset, name: str, metric: str) -> xr.DataArray:
    var = f"{metric}_by_target"
    if not isinstance(ev, xr.Dataset):
        raise ConfigurationError(f"{name} must be the xarray.Dataset that ppl_rnn.evaluate returns; found "
                                 f"{type(ev).__name__}.")
    if var not in ev:
        raise DataError(f"{name} has no {var!r}: it was scored by an older ppl_rnn or is not an evaluate() "
                        "result. Score the model again with ppl_rnn.evaluate (it keeps the per-target losses).")
    da = ev[var]
    extra = [d for d in da.dims if d not in _DIMS]
    if extra:
        raise ConfigurationError(
            f"{name}[{var!r}] has the extra dims {extra}: select one cell first, e.g. "
            "grid.sel({'method': 'MCEM', 'seed': 0}) for a compare() grid.")
    if not np.isfinite(da.values).any():
        raise DataError(f"{name}[{var!r}] holds no forecast loss (all NaN): a compare() cell that failed or was "
                        "saved by an older ppl_rnn, or a test part without observed targets. Re-run that cell "
                        "(or ppl_rnn.evaluate) with this version.")
    return da.transpose(*_DIMS)


def _obs_mean(x: np.ndarray) -> np.ndarray:
    """Mean over the observed entries of each target (last axis); NaN where none is observed."""
    ok = np.isfinite(x)
    cnt = ok.sum(-1)
    tot = np.where(ok, x, 0.0).sum(-1)
    return np.where(cnt > 0, tot / np.maximum(cnt, 1), np.nan)


def forecast_difference(a: xr.Dataset, b: xr.Dataset, *, metric: str = "crps",
                        horizons: Sequence[int] | None = None, max_lag: int | None = None) -> xr.Dataset:
    r"""Paired difference of forecast scores, model ``a`` minus model ``b``, with an interval that respects the
    serial correlation of the differences (:func:`mean_interval`; module docstring).

    Args:
        a, b: :func:`ppl_rnn.evaluate` results of two models on the same ``train``/``test`` data (or one
            cell of a :func:`ppl_rnn.compare` grid each).
        metric: ``"crps"`` or ``"sqerr"`` (squared error of the predictive mean; mean = MSE).
        horizons: the leads to compare (default: those both were scored at).
        max_lag: the Bartlett lag (default: the persistence-dependent lag of :func:`mean_interval`, at least
            ``k - 1``).

    Returns:
        ``xarray.Dataset`` over ``horizon``: ``mean_a``, ``mean_b`` (mean loss, :math:`\bar L`),
        ``difference`` (:math:`\bar d = \bar L^A - \bar L^B`, negative: ``a`` better), ``difference_se``
        (HAC, bias-corrected: :func:`mean_interval`), ``relative_difference`` (:math:`\bar d/\bar L^B`), ``z``
        (:math:`\bar d/\text{SE}`), ``p_value`` (two-sided, fixed-b), ``critical_value`` (:math:`c`, 1.96 for
        short lags, more for long ones), ``ci95_low``/``ci95_high`` (:math:`\bar d\pm c\,\text{SE}`),
        ``num_targets``, ``lag``, ``rho`` (the AR(1) plug-in :math:`\tilde\rho`).
    """
    check_choice(metric, "metric", ("crps", "sqerr"))
    la, lb = _losses(a, "a", metric), _losses(b, "b", metric)
    if la.sizes["time"] != lb.sizes["time"] or not np.array_equal(la["time"].values, lb["time"].values):
        raise DataError("a and b were scored on different test parts (their 'time' coordinates differ); score "
                        "both models with ppl_rnn.evaluate on the same train/test split.")
    if la.sizes["sequence"] != lb.sizes["sequence"] or la.sizes["obs"] != lb.sizes["obs"]:
        raise DataError(f"a has (sequence, obs) sizes ({la.sizes['sequence']}, {la.sizes['obs']}) and b "
                        f"({lb.sizes['sequence']}, {lb.sizes['obs']}); score both on the same data.")
    hb = {int(x) for x in lb["horizon"].values}
    common = [int(h) for h in la["horizon"].values if int(h) in hb]
    if horizons is None:
        hs = common
    else:
        hs = [int(h) for h in np.atleast_1d(horizons)]
        missing = [h for h in hs if h not in common]
        if missing:
            raise ConfigurationError(f"horizons {missing} were not scored for both models (common horizons: "
                                     f"{common}); evaluate both with these horizons or choose among {common}.")
    if not hs:
        raise DataError("a and b share no forecast horizon; evaluate both with the same horizons.")
    if max_lag is not None and (isinstance(max_lag, bool) or not isinstance(max_lag, (int, np.integer))
                                or max_lag < 0):
        raise ConfigurationError(f"max_lag must be an integer >= 0 or None; found {max_lag!r}.")
    out = {k: [] for k in ("mean_a", "mean_b", "difference", "difference_se", "relative_difference", "z",
                           "p_value", "critical_value", "ci95_low", "ci95_high", "num_targets", "lag", "rho")}
    for h in hs:
        xa, xb = _obs_mean(la.sel(horizon=h).values), _obs_mean(lb.sel(horizon=h).values)  # (sequence, time)
        if not np.array_equal(np.isfinite(xa), np.isfinite(xb)):
            raise DataError(f"a and b have forecasts at different targets at horizon {h} (their missing-data "
                            "patterns differ): score both models on the same data.")
        d = xa - xb
        n = int(np.isfinite(d).sum())
        if n == 0:
            raise DataError(f"no observed target at horizon {h}: nothing to compare there; choose other horizons.")
        iv = mean_interval(d, lag=None if max_lag is None else int(max_lag), min_lag=h - 1, level=0.95)
        mean, se, n, c = iv.mean, iv.se, iv.n, iv.critical_value
        ma, mb = float(np.nanmean(xa)), float(np.nanmean(xb))
        z = mean / se if se > 0 else (0.0 if mean == 0 else math.copysign(math.inf, mean))
        p = iv.p_value if se > 0 else (1.0 if mean == 0 else 0.0)
        for key, v in (("mean_a", ma), ("mean_b", mb), ("difference", mean), ("difference_se", se),
                       ("relative_difference", mean / mb if mb else float("nan")), ("z", z), ("p_value", p),
                       ("critical_value", c), ("ci95_low", mean - c * se), ("ci95_high", mean + c * se),
                       ("num_targets", n), ("lag", iv.lag), ("rho", iv.rho)):
            out[key].append(v)
    ds = xr.Dataset({k: (("horizon",), np.asarray(v)) for k, v in out.items()}, coords={"horizon": hs},
                    attrs={"metric": metric, "sign": "difference = a - b; negative: a forecasts better",
                           "variance": "Bartlett HAC over targets, lag ceil(sqrt(8|rho| n / (1 - rho^2))) "
                                       "(at least k-1), divided by its AR(1) bias factor; sequences "
                                       "independent; z against fixed-b critical values (Kiefer-Vogelsang)"})
    ds["difference"].attrs["long_name"] = f"mean {metric} of a minus b"
    ds["difference_se"].attrs["long_name"] = "HAC standard error of difference"
    return ds


def grid_difference(grid: xr.Dataset, a: str, b: str, *, metric: str = "crps",
                    horizons: Sequence[int] | None = None, max_lag: int | None = None) -> xr.Dataset:
    """:func:`forecast_difference` of two rows (methods; ``"<model> / <method>"`` for several models) of a
    :func:`ppl_rnn.compare` grid, each row's per-target losses averaged over its finished seeds (the
    seed-averaged loss of each target). Raises :class:`~ppl_rnn.errors.DataError` where a row has no finished
    seed or the grid keeps no per-target losses."""
    from .compare import flatten_models

    check_choice(metric, "metric", ("crps", "sqerr"))
    var = f"{metric}_by_target"
    if not isinstance(grid, xr.Dataset) or "method" not in grid.dims:
        raise ConfigurationError("grid must be the xarray.Dataset that ppl_rnn.compare returns (dim 'method').")
    grid = flatten_models(grid)
    if var not in grid:
        raise DataError(f"the grid has no {var!r}: it was made by an older ppl_rnn; run compare again.")
    names = [str(m) for m in grid["method"].values]
    cells = []
    for label, name in (("a", a), ("b", b)):
        if name not in names:
            raise ConfigurationError(f"{label} = {name!r} is not a method of the grid; choose among {names}.")
        row = grid.sel({"method": name})
        ok = [s for s in row["seed"].values if str(row["error"].sel(seed=s).item()) == ""]
        if not ok:
            raise DataError(f"no seed of {name!r} finished; nothing to compare.")
        loss = row[var].sel(seed=ok).mean("seed", skipna=False)
        cells.append(loss.to_dataset(name=var))
    return forecast_difference(cells[0], cells[1], metric=metric, horizons=horizons, max_lag=max_lag)
