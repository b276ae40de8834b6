"""Figures (matplotlib, PNG). Every function returns a ``matplotlib.figure.Figure`` and, with ``path=``,
writes it as a PNG. Figures are built without ``pyplot`` (no global state, no GUI backend needed), so they
work headless, in scripts and in notebooks alike.

* :func:`plot_states` — posterior means with 50%/95% bands of the hidden states, against the true states.
* :func:`plot_forecast` — observed series, then forecast median with 50%/90% intervals (a ``Forecast``,
  or the one-step-ahead predictive of a comparison cell).
* :func:`plot_traces` — EM / ELBO / loss traces per method, labelled with what the objective is.
* :func:`plot_ess` — per-step effective sample size of a particle filter, with resampling marks.
* :func:`plot_comparison` — held-out log-evidence per step and CRPS by method, each seed a dot.
* :func:`plot_forecast_difference` — paired forecast-score differences per lead with 95% intervals
  (:func:`ppl_rnn.forecast_difference` results, one or several).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
import xarray as xr
from matplotlib.figure import Figure

__all__ = ["plot_states", "plot_forecast", "plot_traces", "plot_ess", "plot_comparison",
           "plot_forecast_difference", "save"]

_Z50, _Z95 = 0.6744897501960817, 1.959963984540054
_REFERENCE_COLOR = "0.55"


def _np(x):
    if x is None:
        return None
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=float)


def save(fig: Figure, path) -> None:
    """Write ``fig`` as a PNG (150 dpi)."""
    fig.savefig(str(path), dpi=150, bbox_inches="tight")


def _finish(fig, path):
    if path is not None:
        save(fig, path)
    return fig


def _time_axis(n, start, dt):
    t = np.arange(start, start + n, dtype=float)
    return t * dt if dt else t


def plot_states(posterior, truth=None, *, sequence: int = 0, hidden=None, max_hidden: int = 4, dt=None,
                time_unit: str = "step", title: str | None = None, path=None) -> Figure:
    """Posterior mean and 50%/95% Gaussian bands (from ``posterior.mean``/``var``) of each hidden unit,
    with the true states ``truth`` ``(B,T,H)`` where known (simulated data)."""
    mean, var = _np(posterior.mean)[sequence], _np(posterior.var)[sequence]
    T, H = mean.shape
    units = list(range(min(H, max_hidden))) if hidden is None else list(hidden)
    tr = None if truth is None else _np(truth)[sequence]
    t = _time_axis(T, 0, dt)
    fig = Figure(figsize=(9, 1.9 * len(units) + 0.6))
    axes = fig.subplots(len(units), 1, sharex=True, squeeze=False)[:, 0]
    sd = np.sqrt(np.clip(var, 0, None))
    for ax, k in zip(axes, units, strict=True):
        ax.fill_between(t, mean[:, k] - _Z95 * sd[:, k], mean[:, k] + _Z95 * sd[:, k], color="C0", alpha=0.18,
                        lw=0, label="95% band")
        ax.fill_between(t, mean[:, k] - _Z50 * sd[:, k], mean[:, k] + _Z50 * sd[:, k], color="C0", alpha=0.35,
                        lw=0, label="50% band")
        ax.plot(t, mean[:, k], color="C0", lw=1.2, label=f"{posterior.kind} mean")
        if tr is not None:
            ax.plot(t, tr[:, k], color="k", lw=0.9, ls="--", label="true state")
        ax.set_ylabel(f"h[{k}]")
    axes[-1].set_xlabel(f"time ({time_unit})")
    axes[-1].legend(loc="upper center", bbox_to_anchor=(0.5, -0.35 if len(units) > 1 else -0.25), ncol=4,
                    fontsize=8, frameon=False)
    fig.suptitle(title or f"{posterior.method or 'posterior'}: {posterior.kind} distribution of the hidden states",
                 fontsize=11)
    fig.tight_layout()
    return _finish(fig, path)


def plot_forecast(observed, samples, *, start: int | None = None, truth=None, sequence: int = 0, obs: int = 0,
                  history: int | None = 200, dt=None, time_unit: str = "step", title: str | None = None,
                  label: str = "forecast", path=None) -> Figure:
    """Observed series, then the forecast's median and its 50%/90% intervals.

    ``observed``: ``(B,T,D)`` the data up to the forecast origin; ``samples``: a
    :class:`~ppl_rnn.Forecast`, or draws ``(S,B,K,D)`` of the K steps after the origin (e.g. the
    one-step-ahead predictive draws ``onestep_y`` of a comparison cell, ``(S,B,K,D)``);
    ``truth``: ``(B,K,D)`` what really happened (drawn in black). ``start``: the time index of the first
    forecast step (default: the length of ``observed``).
    """
    if hasattr(samples, "samples"):
        samples = samples.samples
    y = _np(observed)
    if y.ndim == 2:
        y = y[None]
    X = _np(samples)[:, sequence, :, obs]
    T = y.shape[1]
    start = T if start is None else int(start)
    K = X.shape[1]
    h0 = 0 if history is None else max(0, T - history)
    fig = Figure(figsize=(9, 3.4))
    ax = fig.subplots()
    ax.plot(_time_axis(T - h0, h0, dt), y[sequence, h0:, obs], color="k", lw=0.9, label="observed")
    tf = _time_axis(K, start, dt)
    q = np.nanquantile(X, [0.05, 0.25, 0.5, 0.75, 0.95], axis=0)
    ax.fill_between(tf, q[0], q[4], color="C1", alpha=0.2, lw=0, label="90% interval")
    ax.fill_between(tf, q[1], q[3], color="C1", alpha=0.4, lw=0, label="50% interval")
    ax.plot(tf, q[2], color="C1", lw=1.3, label=f"{label} median")
    if truth is not None:
        tv = _np(truth)
        tv = tv[sequence, :, obs] if tv.ndim == 3 else tv[:, obs]
        ax.plot(tf[: len(tv)], tv[:K], color="k", lw=0.9, ls=":", label="held-out truth")
    ax.axvline(tf[0] - (dt or 1) * 0.5, color="0.6", lw=0.8)
    ax.set_xlabel(f"time ({time_unit})")
    ax.set_ylabel(f"y[{obs}]")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=5, fontsize=8, frameon=False)
    ax.set_title(title or label, fontsize=11)
    fig.tight_layout()
    return _finish(fig, path)


def plot_traces(traces: Mapping, *, kinds: Mapping | None = None, variable: str = "objective",
                title: str | None = None, path=None) -> Figure:
    """One panel per method: its own training objective per iteration (``FitResult.trace`` or a loaded
    trace). ``kinds``: ``{method: evidence_kind}`` for the panel labels. Objectives of different methods
    are different quantities (ELBO, EKF likelihood, MCEM estimate, loss), so panels do not share a y-axis."""
    items = [(k, tr) for k, tr in traces.items() if tr is not None and variable in getattr(tr, "data_vars", {})]
    n = max(len(items), 1)
    cols = min(3, n)
    rows = int(np.ceil(n / cols))
    fig = Figure(figsize=(3.6 * cols, 2.6 * rows + 0.4))
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False).ravel())
    for ax, (name, tr) in zip(axes, items, strict=False):
        v = np.asarray(tr[variable].values, dtype=float).reshape(len(tr[variable]), -1)[:, 0]
        it = np.asarray(tr["iteration"].values) if "iteration" in tr.coords else np.arange(len(v))
        ax.plot(it, v, color="C2", lw=1.2, marker="." if len(v) < 60 else None)
        kind = (kinds or {}).get(name, "")
        ax.set_title(f"{name}" + (f"  ({kind})" if kind else ""), fontsize=9)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    for ax in axes[len(items):]:
        ax.set_visible(False)
    if not items:
        axes[0].set_visible(True)
        axes[0].text(0.5, 0.5, "no traces", ha="center", va="center", transform=axes[0].transAxes)
    fig.suptitle(title or f"training traces: each method's own {variable}", fontsize=11)
    fig.tight_layout()
    return _finish(fig, path)


def plot_ess(posterior_or_ess, *, num_particles: int | None = None, resampled=None, sequence: int = 0,
             dt=None, time_unit: str = "step", title: str | None = None, path=None) -> Figure:
    """Per-step effective sample size (as a fraction of the particles) of a particle filter, with the
    steps that resampled marked. Accepts a particle ``Posterior`` or an ``(B,T)`` ESS array."""
    if hasattr(posterior_or_ess, "diagnostics"):
        d = posterior_or_ess.diagnostics
        ess = _np(d["ess"])
        resampled = d.get("resampled") if resampled is None else resampled
        num_particles = num_particles or d.get("num_particles")
        name = posterior_or_ess.method
    else:
        ess, name = _np(posterior_or_ess), "particle filter"
    e = ess[sequence]
    t = _time_axis(len(e), 0, dt)
    fig = Figure(figsize=(9, 2.8))
    ax = fig.subplots()
    frac = e / num_particles if num_particles else e
    ax.plot(t, frac, color="C4", lw=0.9, label="ESS / N" if num_particles else "ESS")
    if resampled is not None:
        r = _np(resampled)[sequence].astype(bool)
        ax.plot(t[r], frac[r], "|", color="C3", ms=8, label=f"resampled ({int(r.sum())} of {len(r)} steps)")
    if num_particles:
        ax.set_ylim(0, 1.05)
    ax.set_xlabel(f"time ({time_unit})")
    ax.set_ylabel("ESS / N" if num_particles else "ESS")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=2, fontsize=8, frameon=False)
    ax.set_title(title or f"{name}: effective sample size per step" + (f" (N = {num_particles})" if num_particles
                                                                       else ""), fontsize=11)
    fig.tight_layout()
    return _finish(fig, path)


def plot_comparison(ds, *, reference: tuple = (), title: str | None = None, path=None) -> Figure:
    """Method comparison from a :func:`ppl_rnn.compare` Dataset: held-out log-evidence per step (higher is
    better) and CRPS per horizon (lower is better); one dot per seed, a bar at the mean. ``reference``: the
    labels of reference rows (drawn grey). Error bars: ± 2 Monte Carlo SE of each seed's yardstick. Several
    models: one row per model and method. Failed cells are listed under the figure."""
    from .compare import flatten_models

    ds = flatten_models(ds)
    methods = [str(m) for m in ds["method"].values]
    ll = np.asarray(ds["heldout_logev_per_step"].values, dtype=float)  # (M, S)
    se = (np.asarray(ds["heldout_logev_per_step_se"].values, dtype=float) if "heldout_logev_per_step_se" in ds
          else np.zeros_like(ll))
    crps = np.asarray(ds["crps"].values, dtype=float)  # (M, S, K)
    hs = [int(h) for h in ds["horizon"].values]
    M = len(methods)
    fig = Figure(figsize=(4.0 + 4.2 * 1 + 0.2 * M, 0.45 * M + 2.2))
    ax1, ax2 = fig.subplots(1, 2, sharey=True, gridspec_kw={"width_ratios": [1, 1.3]})
    ypos = np.arange(M)[::-1]
    rng = np.random.default_rng(0)
    for i, m in enumerate(methods):
        col = _REFERENCE_COLOR if (m in reference or m.rpartition(" / ")[2] in reference) else f"C{i % 10}"
        ok = np.isfinite(ll[i])
        v = ll[i][ok]
        if v.size:
            jit = rng.uniform(-0.12, 0.12, v.size)
            ax1.errorbar(v, ypos[i] + jit, xerr=2 * np.nan_to_num(se[i][ok]), fmt="o", color=col, ms=4, alpha=0.8,
                         elinewidth=1, capsize=2)
            ax1.plot([v.mean()] * 2, [ypos[i] - 0.3, ypos[i] + 0.3], color=col, lw=2.2)
        else:
            ax1.text(0.02, ypos[i], "failed", transform=ax1.get_yaxis_transform(), va="center", color="C3", fontsize=8)
        for k, _h in enumerate(hs):
            c = crps[i, :, k][np.isfinite(crps[i, :, k])]
            off = (k - (len(hs) - 1) / 2) * 0.28
            if c.size:
                ax2.plot(c, ypos[i] + off + rng.uniform(-0.05, 0.05, c.size), "os^Dv"[k % 5], color=col, ms=4,
                         alpha=0.8, mfc="none" if k else col)
                ax2.plot([c.mean()] * 2, [ypos[i] + off - 0.1, ypos[i] + off + 0.1], color=col, lw=2)
    ax1.set_yticks(ypos)
    ax1.set_yticklabels(methods)
    ax1.set_xlabel("held-out log-evidence per step (nats) →  better")
    ax2.set_xlabel("←  better   CRPS")
    for k, h in enumerate(hs):
        ax2.plot([], [], "os^Dv"[k % 5], color="0.3", mfc="none" if k else "0.3", label=f"{h}-step")
    ax2.legend(fontsize=8, frameon=False, loc="best")
    for ax in (ax1, ax2):
        ax.grid(axis="x", alpha=0.3)
    evm = str(ds.attrs.get("evidence_method", "")).replace("particle_filter", "particle filter")
    evm = evm.replace(", ", " or ") if evm else "the yardstick"
    fig.suptitle(title or f"method comparison (dots = seeds, bars = means; held-out evidence by {evm})", fontsize=10)
    fig.tight_layout()
    return _finish(fig, path)


def plot_forecast_difference(diffs, *, steps_label=None, relative: bool = False, title: str | None = None,
                             path=None) -> Figure:
    """Paired differences from :func:`ppl_rnn.forecast_difference` (``{label: result}`` or one result): the mean
    difference per lead with its 95% interval (``ci95_low``/``ci95_high``: HAC SE times the fixed-b critical
    value), a line at 0; below 0 the first model forecasts
    better. ``relative``: divide by the second model's mean loss (percent). ``steps_label``: lead -> text."""
    if isinstance(diffs, xr.Dataset) or not isinstance(diffs, Mapping):  # a Dataset is a Mapping too
        diffs = {"": diffs}
    if not diffs:
        from ppl_rnn.errors import ConfigurationError

        raise ConfigurationError("diffs is empty; pass forecast_difference results ({label: result}).")
    lab = steps_label or (lambda h: str(h))
    fig = Figure(figsize=(6.0, 3.4))
    ax = fig.subplots()
    n = len(diffs)
    metric = ""
    for i, (name, d) in enumerate(diffs.items()):
        hs = [int(h) for h in d["horizon"].values]
        scale = 100.0 / np.asarray(d["mean_b"].values, dtype=float) if relative else 1.0
        y = np.asarray(d["difference"].values, dtype=float) * scale
        lo = np.asarray(d["ci95_low"].values, dtype=float) * scale
        hi = np.asarray(d["ci95_high"].values, dtype=float) * scale
        e = np.stack([y - lo, hi - y])
        x = np.arange(len(hs)) + (i - (n - 1) / 2) * min(0.8 / max(n, 1), 0.25)
        ax.errorbar(x, y, yerr=e, fmt="o", color=f"C{i % 10}", ms=4, capsize=3, elinewidth=1.2, label=name or None)
        metric = str(d.attrs.get("metric", ""))
    ax.axhline(0.0, color="0.3", lw=0.8)
    ax.set_xticks(np.arange(len(hs)))
    ax.set_xticklabels([lab(h) for h in hs])
    ax.set_xlabel("lead")
    what = {"crps": "CRPS", "sqerr": "squared error"}.get(metric, metric)
    ax.set_ylabel(f"{what} difference{' (%)' if relative else ''}\n← first model better")
    ax.grid(axis="y", alpha=0.3)
    if any(diffs):
        ax.legend(fontsize=8, frameon=False, loc="best")
    ax.set_title(title or "paired forecast differences, 95% intervals (HAC)", fontsize=10)
    fig.tight_layout()
    return _finish(fig, path)
