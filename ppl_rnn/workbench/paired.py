r"""Is model A's forecast really better than model B's? Paired differences of forecast scores with a standard
error that respects serial correlation (the Diebold–Mariano comparison).

Two models scored by :func:`ppl_rnn.workbench.evaluate.evaluate` on the same ``train``/``test`` split forecast
the same targets. Per horizon :math:`k` and target :math:`t` (per sequence, over the observed targets),
the loss differential is

.. math:: d_t = L^A_t - L^B_t, \qquad \bar d = \frac1n \sum_t d_t \quad(\text{negative: A is better}),

with :math:`L` the CRPS (``metric="crps"``) or the squared error of the predictive mean (``"sqerr"``; its
mean is the MSE, the square of ``evaluate``'s RMSE). Rolling-origin forecast errors are serially
correlated — :math:`k`-step errors overlap by construction, and on smooth signals the errors of nearby
origins are alike for many more steps — so :math:`\operatorname{Var}(\bar d)` is the long-run variance over
:math:`n`, estimated with the Newey–West (Bartlett-kernel) HAC estimator

.. math:: \widehat{\operatorname{Var}}(\bar d) = \frac1{n^2}\sum_b \sum_{|j|\le \ell}
          \Big(1-\frac{|j|}{\ell+1}\Big)\sum_t (d_{b,t}-\bar d)(d_{b,t-j}-\bar d),

summed over independent sequences :math:`b`. The lag :math:`\ell` is Andrews' (1991) AR(1) plug-in for
the Bartlett kernel, :math:`\ell = \lfloor 1.1447\,(\hat\alpha n)^{1/3}\rfloor`,
:math:`\hat\alpha = 4\hat\rho^2/\big((1-\hat\rho)^2(1+\hat\rho)^2\big)` from the lag-one autocorrelation
:math:`\hat\rho` of :math:`d` (clipped to :math:`\pm0.97`), and at least :math:`k-1` (the overlap of
:math:`k`-step forecasts); pass ``max_lag`` to fix it. The statistic :math:`z = \bar d/\operatorname{SE}` is
referred to the standard normal (Diebold & Mariano 1995): a two-sided ``p_value`` and the 95% interval
:math:`\bar d \pm 1.96\,\operatorname{SE}`. The Monte Carlo noise of the sample CRPS (``num_samples`` draws per
origin) is part of :math:`d_t`, so it is inside the SE.

"At least as good" is then a statement with a margin: :math:`\bar d \le 0` is shown if the interval lies
below 0; a :math:`\bar d > 0` whose interval covers 0 is parity within the evidence of this test set.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import xarray as xr

from ppl_rnn.errors import ConfigurationError, DataError
from ppl_rnn.method import check_choice

__all__ = ["forecast_difference", "grid_difference", "hac_mean_se", "andrews_lag"]

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
    r"""Paired difference of forecast scores, model ``a`` minus model ``b``, with HAC standard errors.

    Args:
        a, b: :func:`ppl_rnn.evaluate` results of two models on the same ``train``/``test`` data (or one
            cell of a :func:`ppl_rnn.compare` grid each).
        metric: ``"crps"`` or ``"sqerr"`` (squared error of the predictive mean; mean = MSE).
        horizons: the leads to compare (default: those both were scored at).
        max_lag: the Bartlett lag (default: Andrews' plug-in, at least ``k - 1``).

    Returns:
        ``xarray.Dataset`` over ``horizon``: ``mean_a``, ``mean_b`` (mean loss, :math:`\bar L`),
        ``difference`` (:math:`\bar d = \bar L^A - \bar L^B`, negative: ``a`` better), ``difference_se``
        (HAC), ``relative_difference`` (:math:`\bar d/\bar L^B`), ``z`` (:math:`\bar d/\text{SE}`),
        ``p_value`` (two-sided, normal), ``ci95_low``/``ci95_high`` (:math:`\bar d\pm1.96\,\text{SE}`),
        ``num_targets``, ``lag``.
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
                           "p_value", "ci95_low", "ci95_high", "num_targets", "lag")}
    for h in hs:
        xa, xb = _obs_mean(la.sel(horizon=h).values), _obs_mean(lb.sel(horizon=h).values)  # (sequence, time)
        if not np.array_equal(np.isfinite(xa), np.isfinite(xb)):
            raise DataError(f"a and b have forecasts at different targets at horizon {h} (their missing-data "
                            "patterns differ): score both models on the same data.")
        d = xa - xb
        n = int(np.isfinite(d).sum())
        if n == 0:
            raise DataError(f"no observed target at horizon {h}: nothing to compare there; choose other horizons.")
        lag = (max(andrews_lag(d, n), h - 1) if max_lag is None else int(max_lag))
        mean, se, n = hac_mean_se(d, lag)
        ma, mb = float(np.nanmean(xa)), float(np.nanmean(xb))
        z = mean / se if se > 0 else (0.0 if mean == 0 else math.copysign(math.inf, mean))
        p = math.erfc(abs(z) / math.sqrt(2)) if math.isfinite(z) else 0.0
        for key, v in (("mean_a", ma), ("mean_b", mb), ("difference", mean), ("difference_se", se),
                       ("relative_difference", mean / mb if mb else float("nan")), ("z", z), ("p_value", p),
                       ("ci95_low", mean - 1.96 * se), ("ci95_high", mean + 1.96 * se), ("num_targets", n),
                       ("lag", lag)):
            out[key].append(v)
    ds = xr.Dataset({k: (("horizon",), np.asarray(v)) for k, v in out.items()}, coords={"horizon": hs},
                    attrs={"metric": metric, "sign": "difference = a - b; negative: a forecasts better",
                           "variance": "Newey-West (Bartlett) HAC over targets, Andrews AR(1) plug-in lag "
                                       "(at least k-1); sequences independent; z against N(0, 1)"})
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
