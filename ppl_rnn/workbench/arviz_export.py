r"""ArviZ export: every result type becomes an ``arviz.InferenceData`` with the schema of ``docs/results.md``.

All xarray group building lives in this module (groups are plain ``xarray.Dataset`` s, so a port to
arviz 1.x touches only this file). Sample dims are always ``(chain, draw)``; ``chain`` is an MCMC chain or
an independent run (a seed). Data dims: ``sequence``, ``time``, ``hidden``, ``obs``.

Groups

* ``posterior``: ``h`` (chain, draw, sequence, time, hidden) — smoothed trajectories where the method has a
  sampler (attrs ``h_draws="trajectories"``), else independent draws of the Gaussian marginals
  (``"marginals"``). For a comparison (whose methods may differ in hidden size) it holds ``signal``, the
  filtering draws of the noise-free signal :math:`E[y_t\mid h_t]` on the test steps.
* ``posterior_predictive``: ``y`` draws of :math:`p(y_t\mid h_t^{(s)})` at the posterior draws;
  for a comparison, the one-step-ahead predictive draws; for a forecast, the forecast draws (and ``h``).
* ``log_likelihood``: ``y`` pointwise :math:`\log p(y_t\mid h_t^{(s)})` (per step, summed over observed
  entries; 0 at fully missing steps), ``y_onestep`` :math:`\log p(y_t\mid h_{t-1}^{(s)})` with :math:`h_t`
  integrated out at draws of :math:`p(h_{t-1}\mid y_{0:t})` where the model's emission is linear-Gaussian and
  its transition Gaussian, else :math:`\log p(y_t\mid h_t^{(s)})` at filtering draws (see
  :mod:`ppl_rnn.workbench.evaluate`): PSIS-LOO's reweighting by the inverse density turns them into draws
  given :math:`y_{0:t-1}`, so
  ``az.loo(idata, var_name="y_onestep").elpd_loo`` estimates the one-step-ahead log score
  :math:`\sum_t \log p(y_t\mid y_{0:t-1})` and ``az.compare`` ranks methods by it.
* ``observed_data``: ``y`` (sequence, time, obs), NaN where missing.
* ``sample_stats``: ``lp_onestep`` (chain, draw) the per-draw sum of ``y_onestep``.
* ``particles``: per-step ESS, resampling flags, per-step log-evidence increments, log-evidence, final
  weighted particles and log-weights (particle methods).
* ``em_trace`` (EM methods) / ``optimization`` (SVI, BPTT, others): the ``FitResult.trace`` (dim ``iteration``).
* ``gaussian_posterior``: means, variances (and covariances where the method has them).

A :class:`~ppl_rnn.results.ParameterPosterior` (PMMH, particle Gibbs) gives ``posterior`` = its parameter draws
(dims ``chain, draw, <site>_dim_k``; ``h`` where it kept latent paths), ``sample_stats`` = its per-draw
statistics (``chain, draw[, time]``: acceptance rate, log-likelihood estimate, step size, ...),
``log_likelihood.y_onestep`` = the filter's :math:`\log\hat p(y_t\mid y_{0:t-1},\theta^{(c,s)})` and
``observed_data``; ``az.summary``, ``az.rhat``, ``az.ess``, ``az.plot_trace`` and ``az.loo`` apply as to any MCMC run.

Root attrs: ``inference_method``, ``model``, ``seed``, ``wall_time_s``, ``evidence_kind``, ``posterior_draws``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import xarray as xr

from ppl_rnn.capabilities import capability
from ppl_rnn.data import prepare, validate_observations
from ppl_rnn.errors import ConfigurationError
from ppl_rnn.results import FitResult, Forecast, ParameterPosterior, Posterior

__all__ = ["to_inference_data"]


def _az():
    import arviz as az

    return az


def _np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype == torch.bool:
            return x.numpy()
        return x.double().numpy()
    return np.asarray(x)


def _sample_coords(chains: int, draws: int) -> dict:
    return {"chain": np.arange(chains), "draw": np.arange(draws)}


def _observed(obs_nan: np.ndarray, time0: int = 0) -> xr.Dataset:
    B, T, D = obs_nan.shape
    return xr.Dataset({"y": (("sequence", "time", "obs"), obs_nan)},
                      coords={"sequence": np.arange(B), "time": np.arange(time0, time0 + T), "obs": np.arange(D)})


def _root_attrs(method: str, model, seed, wall, kind, draws) -> dict:
    return {"inference_method": str(method or ""), "model": type(model).__name__ if model is not None else "",
            "seed": -1 if seed is None else int(seed), "wall_time_s": float(wall if wall is not None else np.nan),
            "evidence_kind": str(kind or ""), "posterior_draws": int(draws)}


def _h_draws(post: Posterior, num_draws: int, seed) -> tuple[torch.Tensor, str]:
    if post.sampler is not None:
        return post.sample(num_draws, seed), "trajectories"
    paths = post.diagnostics.get("paths") if post.diagnostics else None
    if isinstance(paths, torch.Tensor) and paths.shape[0] >= num_draws:
        return paths[:num_draws], "trajectories"
    g = torch.Generator().manual_seed(0 if seed is None else int(seed))
    eps = torch.randn((num_draws,) + tuple(post.mean.shape), generator=g, dtype=post.mean.dtype)
    return post.mean + post.var.clamp_min(0).sqrt() * eps, "marginals"


@torch.no_grad()
def _pointwise(model, h: torch.Tensor, data) -> tuple[np.ndarray, np.ndarray]:
    """``h`` (S,B,T,H) -> log p(y_t|h_t) (S,B,T) and draws of y_t (S,B,T,D)."""
    S, B, T, H = h.shape
    h = h.to(model.dtype)
    u = data.inputs
    lps, ys = [], []
    for t in range(T):
        u_t = None if u is None else u[:, t]
        lps.append(model.observation_log_prob(t, h[:, :, t], data.observations[:, t], data.mask[:, t], u_t))
        ys.append(model.emission(t, h[:, :, t], u_t).sample())
    return _np(torch.stack(lps, 2)), _np(torch.stack(ys, 2))


def _posterior_groups(post: Posterior, *, model, observations, inputs, num_draws, seed, onestep,
                      num_particles) -> dict:
    B, T, H = post.mean.shape
    h, how = _h_draws(post, num_draws, seed)
    S = h.shape[0]
    cs = _sample_coords(1, S)
    base = {"sequence": np.arange(B), "time": np.arange(T), "hidden": np.arange(H)}
    groups = {
        "posterior": xr.Dataset({"h": (("chain", "draw", "sequence", "time", "hidden"), _np(h)[None])},
                                coords={**cs, **base}, attrs={"h_draws": how, "kind": post.kind}),
    }
    gp = {"mean": (("sequence", "time", "hidden"), _np(post.mean)), "var": (("sequence", "time", "hidden"), _np(post.var)),
          "log_evidence": (("sequence",), _np(post.log_evidence))}
    coords = dict(base)
    if post.cov is not None:
        gp["cov"] = (("sequence", "time", "hidden", "hidden2"), _np(post.cov))
        coords["hidden2"] = np.arange(H)
    groups["gaussian_posterior"] = xr.Dataset(gp, coords=coords, attrs={"kind": post.kind,
                                                                         "evidence_kind": post.evidence_kind})
    diag = post.diagnostics or {}
    if "ess" in diag:
        pv = {"ess": (("sequence", "time"), _np(diag["ess"])),
              "log_evidence": (("sequence",), _np(post.log_evidence))}
        pc = {"sequence": np.arange(B), "time": np.arange(T)}
        if "resampled" in diag:
            pv["resampled"] = (("sequence", "time"), _np(diag["resampled"]).astype(np.int8))
        if "log_lik" in diag:
            pv["log_lik"] = (("sequence", "time"), _np(diag["log_lik"]))
        fp, fw = diag.get("particles"), diag.get("log_weights")
        if isinstance(fp, torch.Tensor) and fp.dim() == 3 and isinstance(fw, torch.Tensor):
            pv["final_particles"] = (("particle", "sequence", "hidden"), _np(fp))
            pv["final_log_weights"] = (("particle", "sequence"), _np(fw))
            pc.update(particle=np.arange(fp.shape[0]), hidden=np.arange(H))
        groups["particles"] = xr.Dataset(pv, coords=pc)
    if observations is not None:
        if model is None:
            raise ConfigurationError("observations given without model: pass model= (the fitted model) so the "
                                     "pointwise log-likelihood and predictive draws can be computed.")
        data = prepare(model, observations, inputs)
        if data.observations.shape[:2] != (B, T):
            raise ConfigurationError(f"observations have {tuple(data.observations.shape[:2])} (sequences, steps); the "
                                     f"posterior has {(B, T)}.")
        lp, yd = _pointwise(model, h, data)
        groups["observed_data"] = _observed(_np(data.with_nan()))
        pcoords = {**cs, "sequence": np.arange(B), "time": np.arange(T), "obs": np.arange(data.obs_dim)}
        groups["posterior_predictive"] = xr.Dataset({"y": (("chain", "draw", "sequence", "time", "obs"), yd[None])},
                                                    coords=pcoords)
        ll = {"y": (("chain", "draw", "sequence", "time"), lp[None])}
        if onestep:
            from .evaluate import onestep_predictive

            lp1, _, _ = onestep_predictive(model, observations, inputs=inputs, num_samples=S,
                                           num_particles=num_particles, seed=seed)
            ll["y_onestep"] = (("chain", "draw", "sequence", "time"), _np(lp1)[None])
            groups["sample_stats"] = xr.Dataset(
                {"lp_onestep": (("chain", "draw"), _np(lp1).sum((1, 2))[None])}, coords=cs)
        groups["log_likelihood"] = xr.Dataset(ll, coords={k: v for k, v in pcoords.items() if k != "obs"})
    return groups


def _trace_group(trace, method_name: str) -> tuple[str, xr.Dataset] | None:
    from .compare import clean_trace

    if not isinstance(trace, xr.Dataset) or "iteration" not in trace.dims:
        return None
    keep = clean_trace(trace)
    lname = method_name.lower()
    name = "em_trace" if ("em" in lname.replace("_", " ").split() or lname.endswith("em")) else "optimization"
    return name, keep


def _default_smoother(model, num_draws):
    if capability(model, "linear_gaussian") is not None:
        from ppl_rnn.inference import KalmanSmoother

        return KalmanSmoother()
    from ppl_rnn.inference import ParticleSmoother

    return ParticleSmoother(num_particles=max(4 * num_draws, 500), num_paths=num_draws)


def _from_fit(fit: FitResult, *, observations, inputs, num_draws, seed, onestep, num_particles) -> dict:
    post = fit.posterior
    if post is None and observations is not None:
        sm = _default_smoother(fit.model, num_draws)
        if sm is not None:
            from ppl_rnn.verbs import infer

            post = infer(fit.model, observations, method=sm, inputs=inputs, seed=seed)
    groups = {}
    if post is not None:
        groups = _posterior_groups(post, model=fit.model, observations=observations, inputs=inputs,
                                   num_draws=num_draws, seed=seed, onestep=onestep, num_particles=num_particles)
    tg = _trace_group(fit.trace, fit.method)
    if tg is not None:
        groups[tg[0]] = tg[1]
    return groups


def _from_parameter_posterior(post: ParameterPosterior, *, observations) -> dict:
    r"""Groups of a parameter posterior (particle MCMC): ``posterior`` = the parameter draws (dims ``chain, draw,
    <site>_dim_k``) and the latent paths ``h`` where kept; ``sample_stats`` = the sampler's per-draw statistics
    (``chain, draw[, time]``); ``log_likelihood.y_onestep`` = the filter's pointwise
    :math:`\log\hat p(y_t\mid y_{0:t-1},\theta)` (chain, draw, sequence, time); ``observed_data``."""
    C, S = post.num_chains, post.num_draws
    coords = _sample_coords(C, S)
    pv = {}
    for name, v in post.draws.items():
        a = _np(v)
        pv[name] = (("chain", "draw") + tuple(f"{name}_dim_{k}" for k in range(a.ndim - 2)), a)
    if post.paths is not None:
        pv["h"] = (("chain", "draw", "sequence", "time", "hidden"), _np(post.paths))
    groups = {"posterior": xr.Dataset(pv, coords=coords)}
    ss = {}
    for name, v in post.sample_stats.items():
        a = _np(v)
        if a.shape[:2] == (C, S) and a.ndim in (2, 3):
            ss[name] = (("chain", "draw") + (("time",) if a.ndim == 3 else ()), a)
    if ss:
        groups["sample_stats"] = xr.Dataset(ss, coords=coords)
    if post.log_likelihood is not None:
        groups["log_likelihood"] = xr.Dataset(
            {"y_onestep": (("chain", "draw", "sequence", "time"), _np(post.log_likelihood))}, coords=coords)
    if observations is not None:
        groups["observed_data"] = _observed(_np(validate_observations(observations)[0]))
    return groups


def _from_forecast(fc: Forecast, *, observations, time0) -> dict:
    S, B, K, D = fc.samples.shape
    H = fc.state_samples.shape[-1]
    cs = _sample_coords(1, S)
    t = np.arange(time0, time0 + K)
    groups = {"posterior_predictive": xr.Dataset(
        {"y": (("chain", "draw", "sequence", "time", "obs"), _np(fc.samples)[None]),
         "h": (("chain", "draw", "sequence", "time", "hidden"), _np(fc.state_samples)[None])},
        coords={**cs, "sequence": np.arange(B), "time": t, "obs": np.arange(D), "hidden": np.arange(H)},
        attrs={"forecast_start": int(time0)})}
    if observations is not None:
        y, m = validate_observations(observations)
        groups["observed_data"] = _observed(_np(y.masked_fill(~m, float("nan"))))
    return groups


def _from_compare(ds: xr.Dataset) -> dict:
    from .compare import flatten_models

    ds = flatten_models(ds)  # several models: one InferenceData per "<model> / <method>"
    out = {}
    az = _az()
    seeds = ds["seed"].values
    for name in ds["method"].values:
        cell = ds.sel({"method": name})  # not sel(method=...): that is the interpolation keyword
        ok = np.array([not str(e) for e in cell["error"].values])
        if not ok.any():
            continue
        cell = cell.isel(seed=np.nonzero(ok)[0])
        ch = np.arange(int(ok.sum()))
        S = cell.sizes["draw"]
        cs = {"chain": ch, "draw": np.arange(S)}
        st = {"sequence": cell["sequence"].values, "time": cell["time"].values}
        lp = cell["onestep_log_lik"].values  # (chain, draw, sequence, time)
        groups = {
            "posterior": xr.Dataset(
                {"signal": (("chain", "draw", "sequence", "time", "obs"), cell["filtered_signal"].values)},
                coords={**cs, **st, "obs": cell["obs"].values},
                attrs={"kind": "filtering draws of the noise-free signal E[y_t | h_t], h_t ~ p(h_t | y_0:t)"}),
            "log_likelihood": xr.Dataset({"y_onestep": (("chain", "draw", "sequence", "time"), lp)}, coords={**cs, **st}),
            "posterior_predictive": xr.Dataset(
                {"y": (("chain", "draw", "sequence", "time", "obs"), cell["onestep_y"].values)},
                coords={**cs, **st, "obs": cell["obs"].values}, attrs={"kind": "one-step-ahead predictive"}),
            "observed_data": xr.Dataset({"y": (("sequence", "time", "obs"), ds["y_test"].values)},
                                        coords={**st, "obs": ds["obs"].values}),
            "sample_stats": xr.Dataset({"lp_onestep": (("chain", "draw"), lp.sum((2, 3)))}, coords=cs),
        }
        idata = az.InferenceData(**groups)
        idata.attrs.update(_root_attrs(str(name), None, None, float(np.nanmean(cell["wall_time_s"].values)),
                                       str(cell["own_evidence_kind"].values), S))
        idata.attrs["seeds"] = [int(s) for s in seeds[ok]]
        idata.attrs["heldout_logev_per_step"] = float(np.nanmean(cell["heldout_logev_per_step"].values))
        out[str(name)] = idata
    return out


def _concat_chains(group_lists: list[dict]) -> dict:
    out = {}
    for g in group_lists[0]:
        dss = [gl[g] for gl in group_lists if g in gl]
        if len(dss) != len(group_lists):
            continue
        if "chain" in dss[0].dims:
            cat = xr.concat([d.assign_coords(chain=[i]) for i, d in enumerate(dss)], dim="chain",
                            combine_attrs="drop_conflicts")
            out[g] = cat
        elif g in ("observed_data",):
            out[g] = dss[0]
        else:  # per-run groups without sample dims: stack over a 'run' dim
            out[g] = xr.concat([d.expand_dims(run=[i]) for i, d in enumerate(dss)], dim="run",
                               combine_attrs="drop_conflicts")
    return out


def to_inference_data(result, *, model=None, observations=None, inputs=None, num_draws: int = 200,
                      seed: int | None = 0, onestep: bool = True, num_particles: int = 2000, forecast_start=None):
    """Convert a result to ``arviz.InferenceData`` (see the module docstring for the groups).

    Args:
        result: a :class:`~ppl_rnn.Posterior`, :class:`~ppl_rnn.ParameterPosterior` (chains of parameter draws),
            :class:`~ppl_rnn.FitResult`, :class:`~ppl_rnn.Forecast`, the
            ``xarray.Dataset`` returned by :func:`ppl_rnn.compare` (gives ``{method: InferenceData}``, chains =
            seeds, equal (chain, draw) sizes), or a list of Posteriors / FitResults of the same shape (one
            chain each: e.g. one per seed, so ``az.rhat`` measures run-to-run agreement).
        model: the model the result refers to; needed, with ``observations``, for ``log_likelihood`` and
            ``posterior_predictive``. Default: the one the result remembers (results made by ``pr.infer``,
            ``pr.fit`` and ``pr.forecast`` carry their model and data; a FitResult's is the fitted model).
        observations, inputs: the data the result was computed from (default: the data it remembers), for
            ``observed_data`` and the groups above.
        num_draws: posterior draws per chain.
        seed: seed of the draws.
        onestep: also compute ``log_likelihood.y_onestep`` (runs a filter with ``num_particles``, or Kalman).
        forecast_start: time index of a forecast's first step (default: the length of ``observations``, or 0).
    """
    az = _az()
    model, observations, inputs = _remembered(result, model, observations, inputs)
    if isinstance(result, xr.Dataset):
        if "onestep_log_lik" not in result:
            raise ConfigurationError("this Dataset is not a pr.compare result (no 'onestep_log_lik'); pass the "
                                     "Dataset returned by pr.compare, or a Posterior / FitResult / Forecast.")
        return _from_compare(result)
    if isinstance(result, Sequence) and not isinstance(result, str):
        if not result:
            raise ConfigurationError("to_inference_data got an empty list of results.")
        seeds = [seed if seed is None else seed + i for i in range(len(result))]
        parts = [_groups_of(r, model, observations, inputs, num_draws, s, onestep, num_particles, forecast_start)
                 for r, s in zip(result, seeds, strict=True)]
        groups = _concat_chains([p[0] for p in parts])
        idata = az.InferenceData(**groups)
        idata.attrs.update(parts[0][1])
        idata.attrs["seed"] = -1 if seed is None else int(seed)
        idata.attrs["chains"] = len(result)
        return idata
    groups, attrs = _groups_of(result, model, observations, inputs, num_draws, seed, onestep, num_particles,
                               forecast_start)
    idata = az.InferenceData(**groups)
    idata.attrs.update(attrs)
    return idata


def _remembered(result, model, observations, inputs):
    """Fill ``model`` / ``observations`` / ``inputs`` the caller left None from what ``result`` remembers
    (a result made by the verbs carries its data and model; see :func:`ppl_rnn.results.remember`)."""
    if isinstance(result, (list, tuple)) or isinstance(result, xr.Dataset):
        return model, observations, inputs
    data = getattr(result, "data", None)
    if observations is None and data is not None:
        observations = data.with_nan()
        if inputs is None:
            inputs = data.inputs
    if model is None and not isinstance(result, FitResult):
        model = getattr(result, "model", None)
    return model, observations, inputs


def _groups_of(result, model, observations, inputs, num_draws, seed, onestep, num_particles, forecast_start):
    model, observations, inputs = _remembered(result, model, observations, inputs)
    if isinstance(result, FitResult) and isinstance(result.model, ParameterPosterior):  # pr.fit with a sampler
        result = result.model
    if isinstance(result, ParameterPosterior):
        groups = _from_parameter_posterior(result, observations=observations)
        attrs = _root_attrs(result.method, result.model, seed, result.wall_time_s, result.evidence_kind,
                            result.num_draws)
    elif isinstance(result, Posterior):
        groups = _posterior_groups(result, model=model, observations=observations, inputs=inputs,
                                   num_draws=num_draws, seed=seed, onestep=onestep, num_particles=num_particles)
        attrs = _root_attrs(result.method, model, seed, None, result.evidence_kind, num_draws)
    elif isinstance(result, FitResult):
        groups = _from_fit(result, observations=observations, inputs=inputs, num_draws=num_draws, seed=seed,
                           onestep=onestep, num_particles=num_particles)
        attrs = _root_attrs(result.method, result.model, seed, result.wall_time_s, result.evidence_kind, num_draws)
        attrs["converged"] = int(bool(result.converged))
    elif isinstance(result, Forecast):
        if forecast_start is None:
            forecast_start = 0 if observations is None else int(validate_observations(observations)[0].shape[1])
        groups = _from_forecast(result, observations=observations, time0=forecast_start)
        attrs = _root_attrs(result.method, model, seed, None, "", result.samples.shape[0])
    else:
        raise ConfigurationError(
            f"to_inference_data takes a Posterior, ParameterPosterior, FitResult, Forecast, a pr.compare Dataset or a list of "
            f"Posteriors/FitResults; found {type(result).__name__}.")
    return groups, attrs
