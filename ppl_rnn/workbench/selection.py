r"""Choose among several fits of one model (seeds, starts) by how well each forecasts the training data's tail.

EM maximises the one-step likelihood, and on chaotic or oscillating data that does not always reward dynamics
that free-run well: on the Santa Fe laser, fits from five seeds that all beat AR(29) on held-out
log-evidence differ by 3x in 5–10-step CRPS, and the fit with the second-best evidence forecasts worst. The
yardstick shows this on the test part; :func:`select_by_forecast` finds it **without** the test part, by
scoring every candidate on the last ``validation_steps`` of the training series conditioned on the steps before
them (:func:`ppl_rnn.workbench.evaluate.evaluate` with ``train = y[:, :T-v]``, ``test = y[:, T-v:]``):

.. math:: \text{score}_m = \frac1{|K|}\sum_{k\in K} \text{CRPS}_k\big(m;\ y_{T-v:T-1}\mid y_{0:T-v-1}\big)
          \quad(\text{``crps''; lower is better}),

or the held-out log-evidence per step of that tail (``"logev"``, higher is better). The candidates saw these
steps while training (an in-sample score): it cannot detect over-fitting, but it does rank free-running
quality, which the one-step likelihood does not (measured on the laser: the training-tail mean CRPS over
leads 1–10 ranks eight fits as their test-part CRPS does, up to one near-tie; the training-tail
log-evidence does not).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import xarray as xr

from ppl_rnn.data import prepare
from ppl_rnn.errors import ConfigurationError, DataError
from ppl_rnn.inference.search import register_tail_scorer
from ppl_rnn.method import check_choice, check_positive_int

from .evaluate import check_horizons, evaluate

__all__ = ["select_by_forecast", "tail_forecast_score"]


def select_by_forecast(candidates: Sequence | Mapping, observations, *, validation_steps: int,
                       horizons: Sequence[int] | int = (1, 5, 10), score: str = "crps", inputs=None,
                       num_particles: int = 500, max_particles: int | None = 16000, num_samples: int = 200,
                       seed: int | None = 0) -> xr.Dataset:
    r"""Score each candidate model on the tail of the training data and name the best.

    Args:
        candidates: fitted models (or ``FitResult`` s, whose ``.model`` is used), as a list or ``{label: model}``.
        observations: the training observations ``(B, T, D)`` (or ``(T, D)``) the candidates were fitted to.
        validation_steps: ``v``, the tail length scored (conditioned on the first ``T - v`` steps).
        horizons: forecast leads for the CRPS.
        score: ``"crps"`` (mean CRPS over ``horizons``, lower is better) or ``"logev"`` (tail log-evidence per
            step, higher is better).
        inputs: ``(B, T, I)`` inputs for models with inputs.
        num_particles, max_particles, num_samples, seed: passed to :func:`~ppl_rnn.workbench.evaluate.evaluate`.

    Returns:
        ``xarray.Dataset`` over ``candidate``: ``tail_logev_per_step`` (± ``tail_logev_per_step_se``), ``crps``
        (candidate, horizon), ``mean_crps``, ``score_rank`` (1 = best by ``score``); attrs ``best`` (the label),
        ``best_index``, ``score``, ``validation_steps``.
    """
    check_choice(score, "score", ("crps", "logev"))
    hs = check_horizons(horizons)
    if isinstance(candidates, Mapping):
        labels, models = [str(k) for k in candidates], list(candidates.values())
    else:
        models = list(candidates)
        labels = [str(i) for i in range(len(models))]
    if not models:
        raise ConfigurationError("candidates is empty; pass the fitted models (or FitResults) to choose among.")
    models = [getattr(m, "model", m) for m in models]
    v = check_positive_int(validation_steps, "validation_steps")
    d = prepare(models[0], observations, inputs)
    T = d.num_steps
    if v >= T - 1 or v < max(hs):
        raise DataError(f"validation_steps = {v} with {T} training steps and horizons up to {max(hs)}: it must be "
                        f"at least the largest horizon and leave at least 2 steps to condition on (at most {T - 2}).")
    y, u = d.observations, d.inputs
    kw = dict(horizons=hs, num_particles=num_particles, max_particles=max_particles, num_samples=num_samples,
              seed=seed)
    logev, se, crps = [], [], []
    for m in models:
        ev = evaluate(m, y[:, :T - v], y[:, T - v:], train_inputs=None if u is None else u[:, :T - v],
                      test_inputs=None if u is None else u[:, T - v:], **kw)
        logev.append(float(ev.heldout_logev_per_step))
        se.append(float(ev.heldout_logev_per_step_se))
        crps.append(ev.crps.values)
    crps = np.asarray(crps)
    mean_crps = crps.mean(1)
    key = mean_crps if score == "crps" else -np.asarray(logev)
    order = np.argsort(key, kind="stable")
    rank = np.empty(len(models), dtype=int)
    rank[order] = np.arange(1, len(models) + 1)
    best = int(order[0])
    ds = xr.Dataset(
        {"tail_logev_per_step": (("candidate",), np.asarray(logev)),
         "tail_logev_per_step_se": (("candidate",), np.asarray(se)),
         "crps": (("candidate", "horizon"), crps),
         "mean_crps": (("candidate",), mean_crps),
         "score_rank": (("candidate",), rank)},
        coords={"candidate": labels, "horizon": list(hs)},
        attrs={"best": labels[best], "best_index": best, "score": score, "validation_steps": v,
               "note": "in-sample: the candidates were fitted to these steps; the score ranks free-running "
                       "forecast quality, not over-fitting"})
    ds["mean_crps"].attrs["long_name"] = "mean CRPS over the horizons on the training tail (lower is better)"
    return ds


def tail_forecast_score(model, data, head_steps: int, *, horizons, num_particles: int, replicates: int,
                        seed) -> dict:
    r"""The start search's ``"crps"`` tail score (:class:`ppl_rnn.inference.search.Recommended`): the yardstick
    (:func:`~ppl_rnn.workbench.evaluate.evaluate`) with ``train = y[:, :T_h]``, ``test = y[:, T_h:]`` of the
    prepared ``data``: the tail's one-step log score (total, with its SE) and the mean CRPS of the forecasts at
    ``horizons`` from every origin in the tail, :math:`\frac1{|K|}\sum_{k\in K}\text{CRPS}_k` (lower is better).
    ``num_particles`` starts the yardstick's adaptive particle count; ``replicates`` is its number of runs."""
    y, u = data.with_nan(), data.inputs
    ev = evaluate(model, y[:, :head_steps], y[:, head_steps:], horizons=tuple(horizons),
                  train_inputs=None if u is None else u[:, :head_steps],
                  test_inputs=None if u is None else u[:, head_steps:], num_particles=num_particles,
                  num_replicates=replicates, seed=seed)
    crps = ev.crps.values.astype(float)
    return {"log_score": float(ev.heldout_logev), "log_score_se": float(ev.heldout_logev_se),
            "crps": float(np.mean(crps)), "crps_by_lead": crps.tolist()}


register_tail_scorer("crps", tail_forecast_score)
