r"""``pr.compare``: fit a fresh copy of one model with every method and seed, score each fit with the one
yardstick (:func:`ppl_rnn.workbench.evaluate.evaluate`), and collect the grid in an ``xarray.Dataset``.

Grid: ``methods`` :math:`\times` ``seeds`` (:math:`\times` models, when ``model`` is ``{label: model}``:
architectures compared with the same yardstick; a leading dim ``model``); each **cell** is ``fit`` (on
``train``) then ``evaluate`` (on ``test``, conditioning on ``train``). Output dims ``([model,] method, seed,
horizon)``:

============================  ==================================================================
``heldout_logev_per_step``     :math:`\log p(y_\text{test}\mid y_\text{train})` / test steps (the common yardstick)
``heldout_logev_per_obs``      the same per observed test entry
``*_se``                       their Monte Carlo standard errors (0 for exact Kalman); see ``evaluate``
``se_ok``                      0 where the yardstick reached ``max_particles`` with the SE above ``se_tol``
``min_ess``, ``num_particles``  the yardstick filter's smallest ESS and particle count per run
``rmse``, ``crps``             k-step rolling-origin forecast RMSE and CRPS (horizon)
``coverage_50/80/90/95``       empirical coverage of the central 50/80/90/95% predictive intervals
``mase``, ``mean_wql``         MASE (scaled by the training part's one-step naive MAE) and GluonTS's
                               mean_wQuantileLoss (horizon; ``ppl_rnn.workbench.metrics``)
``crps_by_target``,            each forecast's CRPS / squared error by target (horizon, sequence, time,
``sqerr_by_target``            obs): ``pr.forecast_difference(grid.sel({"method": A, "seed": 0}), ...)``
``wall_time_s``                fitting time (the method's own ``FitResult.wall_time_s``)
``own_objective``              the method's own final training objective, **not comparable across
                               methods**: its log-evidence value where its trace records one, else its
                               objective (ELBO, loss); its meaning is ``own_evidence_kind`` (exact /
                               estimate / lower_bound / approximation)
``error``                      empty, or the error that stopped that cell (the grid goes on)
``evidence_method``            per method: ``particle_filter`` or ``kalman`` (exact, linear-Gaussian models)
============================  ==================================================================

Select a method with ``ds.sel({"method": "MCEM"})`` — **not** ``ds.sel(method="MCEM")``, where ``method``
is xarray's interpolation keyword and the selection is silently skipped.

Plus, per cell, the one-step pointwise log-likelihood draws ``onestep_log_lik`` and predictive draws
``onestep_y`` (dims ``draw, sequence, time[, obs]``; equal sizes for every method) that
:func:`ppl_rnn.to_inference_data` turns into one ``InferenceData`` per method (chains = seeds).

Persistence: with ``out=DIR`` every finished cell is written to ``DIR/cells/<method>__seed<seed>.nc``
(with its fit trace ``.trace.nc`` and the fitted model ``.pt``) the moment it finishes; a rerun with the
same configuration loads finished cells instead of refitting (failed cells are retried), so an interrupted
run (Ctrl-C) loses at most the cells in flight. "The same configuration" is a fingerprint of the initial
model (its class and every parameter and buffer value, plus its plain settings such as the activation), the
method, the horizons, the yardstick options and the data: reusing a folder with another model refits.
The assembled grid is saved to ``DIR/compare.nc``.

Scale-out: ``executor="dask"`` runs cells as tasks on a ``distributed.LocalCluster`` (or on the scheduler at
``address=``, e.g. ``"tcp://host:8786"``, a real cluster); results come back to the caller, who writes the
cell files. Workers must be able to import ``ppl_rnn``. The default ``LocalCluster`` uses worker
*processes*: each has its own torch RNG, so every cell is reproducible from its seed exactly as in-process.
Thread workers (``processes=False``) start faster but share one global RNG, so their Monte Carlo
metrics match an in-process run only up to Monte Carlo noise.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import xarray as xr

from ppl_rnn.data import prepare
from ppl_rnn.errors import ConfigurationError
from ppl_rnn.method import InferenceMethod, check_positive_int
from ppl_rnn.model import StateSpaceModel
from ppl_rnn.rng import check_seed

from .evaluate import check_horizons, check_yardstick_options, evaluate, metric_names

__all__ = ["compare", "load_cell_trace", "load_cell_model", "cell_name", "model_fingerprint", "clean_trace",
           "flatten_models"]

SCALARS = ("heldout_logev_per_step", "heldout_logev_per_obs", "heldout_logev_per_step_se", "heldout_logev_per_obs_se",
           "min_ess", "se_ok", "num_particles", "wall_time_s", "eval_time_s", "own_objective")

#: per-target forecast losses kept per cell for paired comparisons (ppl_rnn.workbench.paired)
TARGET_LOSSES = ("crps_by_target", "sqerr_by_target")


def cell_name(method_name: str, seed: int, model: str | None = None) -> str:
    """File stem of one cell: ``<method>__seed<seed>``, or ``<model>__<method>__seed<seed>`` in a comparison of
    several models (labels sanitised for file systems)."""
    safe = lambda x: re.sub(r"[^A-Za-z0-9_.+-]", "_", x)  # noqa: E731
    return (f"{safe(model)}__" if model else "") + f"{safe(method_name)}__seed{seed}"


def model_fingerprint(model) -> str:
    """SHA-1 of a model's class (module and name), every parameter and buffer (names, shapes, dtypes and
    values) and its plain settings (public int/float/str/bool/None attributes, e.g. the activation)."""
    h = hashlib.sha1(f"{type(model).__module__}.{type(model).__qualname__}".encode())
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    for mod_name, mod in sorted(model.named_modules(), key=lambda kv: kv[0]):
        plain = sorted((k, repr(v)) for k, v in vars(mod).items()
                       if not k.startswith("_") and (v is None or isinstance(v, (bool, int, float, str))))
        h.update(repr((mod_name, plain)).encode())
    return h.hexdigest()


def _fingerprint(model_fp, method, horizons, eval_kw, shapes) -> str:
    text = repr((model_fp, repr(method), tuple(horizons), sorted(eval_kw.items()), shapes))
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def final_objective(fit) -> float:
    """The last finite value of the trace's ``log_evidence`` (what ``evidence_kind`` describes) where the method
    records one, else of its ``objective`` (ELBO, loss, ...)."""
    tr = getattr(fit, "trace", None)
    try:
        key = "log_evidence" if "log_evidence" in tr and np.isfinite(tr["log_evidence"].values).any() else "objective"
        v = np.asarray(tr[key].values, dtype=float)
        v = v[np.isfinite(v)]
        return float(v[-1]) if v.size else float("nan")
    except Exception:
        return float("nan")


def run_cell(model, train, test, name: str, method, seed: int, horizons, eval_kw: dict,
             train_inputs=None, test_inputs=None, model_label: str = ""):
    """Fit + evaluate one cell. Never raises for a method failure: the error is recorded.

    Returns ``(cell Dataset, fit trace Dataset | None, fitted model | None)``.
    """
    from ppl_rnn.verbs import fit as _fit

    t0 = time.perf_counter()
    fit = None
    try:
        fit = _fit(model, train, method=method, inputs=train_inputs, seed=seed)
        ev = evaluate(fit.model, train, test, horizons=horizons, train_inputs=train_inputs,
                      test_inputs=test_inputs, seed=seed, **eval_kw)
        ev["wall_time_s"] = ((), float(fit.wall_time_s))
        ev["own_objective"] = ((), final_objective(fit))
        ev["num_particles"] = ((), float(ev.attrs["num_particles"]))
        ev.attrs.update(own_evidence_kind=str(fit.evidence_kind), error="", converged=int(bool(fit.converged)))
    except KeyboardInterrupt:
        raise
    except Exception as e:  # a failed cell records its error and does not stop the grid
        ev = xr.Dataset(attrs={"error": f"{type(e).__name__}: {e}".strip(),
                               "traceback": traceback.format_exc(limit=6),
                               "own_evidence_kind": str(getattr(fit, "evidence_kind", "")) if fit else ""})
        ev["wall_time_s"] = ((), float(fit.wall_time_s) if fit is not None else time.perf_counter() - t0)
        ev["own_objective"] = ((), final_objective(fit) if fit is not None else float("nan"))
    ev.attrs.update(method=name, seed=int(seed), model_label=str(model_label))
    trace = getattr(fit, "trace", None) if fit is not None else None
    fitted = fit.model if fit is not None else None
    return ev, trace, fitted


def _to_netcdf(ds: xr.Dataset, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".part")
    ds.to_netcdf(tmp, engine="h5netcdf")
    os.replace(tmp, path)  # atomic: an interrupted write never leaves a half cell


def clean_trace(trace) -> xr.Dataset | None:
    """The numeric part of a fit trace (what netCDF can store), or None if ``trace`` is not a Dataset."""
    if not isinstance(trace, xr.Dataset):
        return None
    out = xr.Dataset(coords={k: v for k, v in trace.coords.items() if v.dtype.kind in "iufb"})
    for k, v in trace.data_vars.items():
        if v.dtype.kind in "iufb":
            out[k] = v
    out.attrs = {k: v for k, v in trace.attrs.items() if isinstance(v, (int, float, str))}
    return out


def _save_cell(cells_dir: Path, ev: xr.Dataset, trace, fitted) -> None:
    stem = cells_dir / cell_name(ev.attrs["method"], ev.attrs["seed"], ev.attrs.get("model_label") or None)
    tr = clean_trace(trace)
    if tr is not None:
        try:
            _to_netcdf(tr, stem.with_suffix(".trace.nc"))
        except Exception:  # traces with exotic content are a nicety, not a result
            pass
    if fitted is not None:
        try:
            torch.save(fitted, stem.with_suffix(".pt"))
        except Exception:
            pass
    _to_netcdf(ev, stem.with_suffix(".nc"))


def load_cell_trace(out, method_name: str, seed: int, model: str | None = None) -> xr.Dataset | None:
    """The fit trace (dim ``iteration``) of one finished cell of a comparison saved under ``out`` (``model``:
    the model label, in a comparison of several models)."""
    p = Path(out) / "cells" / (cell_name(method_name, seed, model) + ".trace.nc")
    return xr.load_dataset(p, engine="h5netcdf") if p.exists() else None


def load_cell_model(out, method_name: str, seed: int, model: str | None = None):
    """The fitted model of one finished cell (``torch.load``; trusted files only), or None."""
    p = Path(out) / "cells" / (cell_name(method_name, seed, model) + ".pt")
    return torch.load(p, weights_only=False) if p.exists() else None


def _load_cell(cells_dir: Path, name: str, seed: int, fp: str, model: str | None = None) -> xr.Dataset | None:
    p = cells_dir / (cell_name(name, seed, model) + ".nc")
    if not p.exists():
        return None
    try:
        ds = xr.load_dataset(p, engine="h5netcdf")
    except Exception:
        return None
    if ds.attrs.get("fingerprint") != fp or ds.attrs.get("error"):
        return None
    return ds


def assemble_grid(cells: dict, names, seeds, hs, num_samples, B, T1, T2, D, y_test) -> xr.Dataset:
    nm, ns, nh = len(names), len(seeds), len(hs)
    data = {k: np.full((nm, ns), np.nan) for k in SCALARS}
    metr = {k: np.full((nm, ns, nh), np.nan) for k in metric_names}
    ll = np.full((nm, ns, num_samples, B, T2), np.nan)
    yo = np.full((nm, ns, num_samples, B, T2, D), np.nan)
    sig = np.full((nm, ns, num_samples, B, T2, D), np.nan)
    hll = np.full((nm, ns, B, T2), np.nan)
    per_target = {k: np.full((nm, ns, nh, B, T2, D), np.nan) for k in TARGET_LOSSES}
    err = np.full((nm, ns), "", dtype=object)
    kinds = np.full(nm, "", dtype=object)
    evm = np.full(nm, "", dtype=object)
    for i, name in enumerate(names):
        for j, s in enumerate(seeds):
            ev = cells.get((name, s))
            if ev is None:
                err[i, j] = "not run (interrupted)"
                continue
            err[i, j] = str(ev.attrs.get("error", ""))
            if ev.attrs.get("own_evidence_kind"):
                kinds[i] = str(ev.attrs["own_evidence_kind"])
            for k in SCALARS:
                if k in ev:
                    data[k][i, j] = float(ev[k])
            if "eval_time_s" in ev.attrs:
                data["eval_time_s"][i, j] = float(ev.attrs["eval_time_s"])
            if err[i, j]:
                continue
            evm[i] = str(ev.attrs.get("evidence_method", ""))
            for k in metric_names:
                if k in ev:  # cells saved by an older version lack the newer metrics
                    metr[k][i, j] = ev[k].sel(horizon=list(hs)).values
            ll[i, j] = ev["onestep_log_lik"].values
            yo[i, j] = ev["onestep_y"].values
            sig[i, j] = ev["filtered_signal"].values
            hll[i, j] = ev["heldout_log_lik"].values
            for k in TARGET_LOSSES:
                if k in ev:  # cells saved by an older version lack them
                    per_target[k][i, j] = ev[k].sel(horizon=list(hs)).values
    dims = ("method", "seed")
    ds = xr.Dataset(
        {
            **{k: (dims, v) for k, v in data.items()},
            **{k: (dims + ("horizon",), v) for k, v in metr.items()},
            "heldout_log_lik": (dims + ("sequence", "time"), hll),
            **{k: (dims + ("horizon", "sequence", "time", "obs"), v) for k, v in per_target.items()},
            "onestep_log_lik": (dims + ("draw", "sequence", "time"), ll),
            "onestep_y": (dims + ("draw", "sequence", "time", "obs"), yo),
            "filtered_signal": (dims + ("draw", "sequence", "time", "obs"), sig),
            "y_test": (("sequence", "time", "obs"), y_test),
            "error": (dims, err.astype(str)),
            "own_evidence_kind": (("method",), kinds.astype(str)),
            "evidence_method": (("method",), evm.astype(str)),
        },
        coords={"method": list(names), "seed": list(seeds), "horizon": list(hs), "draw": np.arange(num_samples),
                "sequence": np.arange(B), "time": np.arange(T1, T1 + T2), "obs": np.arange(D)},
        attrs={"evidence_method": ", ".join(sorted({str(e) for e in evm if e})),
               "num_train_steps": T1, "num_test_steps": T2,
               "yardstick": "held-out log-evidence by a high-particle filter (or exact Kalman) at the fitted "
                            "parameters; rolling-origin k-step forecasts (ppl_rnn.workbench.evaluate)"},
    )
    ds["heldout_logev_per_step"].attrs["long_name"] = "held-out log-evidence per test step (nats, higher is better)"
    ds["crps"].attrs["long_name"] = "CRPS (lower is better)"
    ds["own_objective"].attrs["note"] = "each method's own training objective; see own_evidence_kind; not comparable"
    return ds


def compare(model, train, test, *, methods: Mapping[str, InferenceMethod], seeds: Sequence[int] = (0,),
            horizons: Sequence[int] | int = (1, 10), train_inputs=None, test_inputs=None,
            num_particles: int = 500, max_particles: int | None = 32000, num_replicates: int = 8,
            se_tol: float | None = 0.01, num_samples: int = 100, executor: str | None = None,
            address: str | None = None, n_workers: int = 2, processes: bool = True, out=None,
            progress: bool = True) -> xr.Dataset:
    """Fit ``model`` with every method and seed on ``train``; score each fit on ``test`` with the one yardstick.

    Args:
        model: the initial model; each cell fits a fresh copy (the input is untouched). Or ``{label: model}``
            for several models (architectures): the grid is then model :math:`\times` method :math:`\times`
            seed and the result gains a leading dim ``model`` (select one with ``ds.sel(model="GRU")``;
            :func:`flatten_models` gives one ``method`` dim labelled ``"<model> / <method>"``).
        train, test: ``(B,T1,D)`` / ``(B,T2,D)``, the test part continues the training sequences.
        methods: ``{label: method}``, e.g. ``{"MCEM": MonteCarloEM(...), "AR(5)": LinearAR(order=5)}``.
        seeds: seeds per method (the spread over seeds is the run-to-run variability).
        horizons: forecast leads in steps.
        num_particles, max_particles, num_replicates, se_tol, num_samples: the yardstick's options, passed to
            :func:`ppl_rnn.workbench.evaluate.evaluate` (particles per run of the first round, their cap,
            independent runs for the standard error, the target SE per test step, predictive draws).
        executor: ``None`` (in-process, sequential) or ``"dask"`` (``distributed``).
        address: scheduler address for ``executor="dask"``; default starts a ``LocalCluster`` of ``n_workers``
            single-threaded workers (threads in this process, or separate processes with ``processes=True``).
        out: directory for the cell files and ``compare.nc`` (None: nothing written, no resume).
        progress: show a progress bar over cells.

    Returns: ``xarray.Dataset`` (dims ``[model,] method, seed, horizon``; see module docstring).
    """
    single = not isinstance(model, Mapping)
    models = {"": model} if single else dict(model)
    if not models:
        raise ConfigurationError("model must be a StateSpaceModel or a non-empty dict {label: model}; found {}.")
    for k, m in models.items():
        if not single and (not isinstance(k, str) or not k):
            raise ConfigurationError(f"model labels must be non-empty strings; found {k!r}.")
        if not isinstance(m, StateSpaceModel):
            where = "model" if single else f"model[{k!r}]"
            raise ConfigurationError(f"{where} must be a ppl_rnn.StateSpaceModel; found {type(m).__name__}.")
    if not isinstance(methods, Mapping) or not methods:
        raise ConfigurationError(f"methods must be a non-empty dict {{label: method}}; found {methods!r}.")
    for k, m in methods.items():
        if not isinstance(k, str) or not k:
            raise ConfigurationError(f"method labels must be non-empty strings; found {k!r}.")
        if not isinstance(m, InferenceMethod):
            raise ConfigurationError(f"methods[{k!r}] must be an inference method object (e.g. "
                                     f"pr.inference.MonteCarloEM()); found {m!r}.")
    if isinstance(seeds, int):
        seeds = [seeds]
    seeds = [check_seed(s, "seeds entry") for s in seeds]
    if not seeds or any(s is None for s in seeds) or len(set(seeds)) != len(seeds):
        raise ConfigurationError(f"seeds must be a non-empty list of distinct non-negative ints; found {seeds!r}.")
    hs = check_horizons(horizons)
    num_samples = check_positive_int(num_samples, "num_samples", minimum=2)
    if executor not in (None, "dask"):
        raise ConfigurationError(f"executor must be None (in-process) or 'dask'; found {executor!r}.")
    if address is not None and executor != "dask":
        raise ConfigurationError("address= is only used with executor='dask'; pass executor='dask' too.")
    for m in models.values():  # every model must accept the data (obs_dim, inputs)
        tr = prepare(m, train, train_inputs)
        te = prepare(m, test, test_inputs)
    B, T1, D = tr.observations.shape
    T2 = te.num_steps
    num_particles, max_particles, num_replicates, se_tol = check_yardstick_options(
        num_particles, max_particles, num_replicates, se_tol)
    eval_kw = {"num_particles": num_particles, "max_particles": max_particles, "num_replicates": num_replicates,
               "se_tol": se_tol, "num_samples": num_samples}
    shapes = (tuple(tr.observations.shape), tuple(te.observations.shape), float(tr.observations.sum()),
              float(te.observations.sum()))
    names = list(methods)
    model_fps = {ml: model_fingerprint(m) for ml, m in models.items()}
    cells_dir = None
    if out is not None:
        out = Path(out)
        cells_dir = out / "cells"
        cells_dir.mkdir(parents=True, exist_ok=True)
    cells: dict = {}
    todo = []
    for ml in models:
        for name in names:
            for s in seeds:
                fp = _fingerprint(model_fps[ml], methods[name], hs, eval_kw, shapes)
                done = _load_cell(cells_dir, name, s, fp, ml or None) if cells_dir is not None else None
                if done is not None:
                    cells[(ml, name, s)] = done
                else:
                    todo.append((ml, name, s, fp))

    bar = None
    if progress and todo:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="compare cells", unit="cell")

    def finish(ev, trace, fitted, fp):
        ev.attrs["fingerprint"] = fp
        cells[(ev.attrs["model_label"], ev.attrs["method"], ev.attrs["seed"])] = ev
        if cells_dir is not None:
            _save_cell(cells_dir, ev, trace, fitted)
        if bar is not None:
            who = (f"{ev.attrs['model_label']} / " if ev.attrs["model_label"] else "") + ev.attrs["method"]
            bar.set_postfix_str(f"{who} seed {ev.attrs['seed']}" + (" FAILED" if ev.attrs.get("error") else ""))
            bar.update(1)

    args = (train, test)
    try:
        if executor is None:
            for ml, name, s, fp in todo:
                ev, trace, fitted = run_cell(models[ml], *args, name, methods[name], s, hs, eval_kw,
                                             train_inputs, test_inputs, ml)
                finish(ev, trace, fitted, fp)
        else:
            _run_dask(models, args, methods, todo, hs, eval_kw, train_inputs, test_inputs, address, n_workers,
                      processes, finish)
    finally:
        if bar is not None:
            bar.close()
    y_test = te.with_nan().double().numpy()
    per_model = [assemble_grid({(n, s): ev for (ml2, n, s), ev in cells.items() if ml2 == ml}, names, seeds, hs,
                           num_samples, B, T1, T2, D, y_test) for ml in models]
    if single:
        ds = per_model[0]
        ds.attrs.update(model=type(model).__name__, model_fingerprint=model_fps[""])
    else:
        ds = xr.concat([d.drop_vars("y_test") for d in per_model], dim="model", data_vars="all", coords="minimal",
                       compat="equals", combine_attrs="drop_conflicts").assign_coords(model=list(models))
        ds["y_test"] = per_model[0]["y_test"]  # the data are the same for every model
        ds.attrs["evidence_method"] = ", ".join(sorted({e for d in per_model
                                                         for e in str(d.attrs["evidence_method"]).split(", ") if e}))
        ds.attrs["model_classes"] = ", ".join(f"{ml}={type(m).__name__}" for ml, m in models.items())
        ds.attrs["model_fingerprints"] = ", ".join(f"{ml}={fp}" for ml, fp in model_fps.items())
    ds.attrs.update(num_particles=num_particles, max_particles=max_particles, num_replicates=num_replicates,
                    se_tol=float("nan") if se_tol is None else se_tol, num_samples=num_samples)
    if out is not None:
        _to_netcdf(ds, out / "compare.nc")
    return ds


def flatten_models(ds: xr.Dataset) -> xr.Dataset:
    """A comparison of several models as one of methods: dim ``model`` folded into ``method``, labelled
    ``"<model> / <method>"`` (what the report, plots and ArviZ export read). A one-model Dataset is returned
    as it is."""
    if "model" not in ds.dims:
        return ds
    parts = []
    for ml in ds["model"].values:
        d = ds.sel(model=ml).drop_vars("model")
        parts.append(d.assign_coords(method=[f"{ml} / {m}" for m in d["method"].values]))
    out = xr.concat(parts, dim="method", data_vars="minimal", coords="minimal", compat="override",
                    combine_attrs="override")
    for k in ("own_evidence_kind", "evidence_method"):  # per-model variables without a model dim
        if k in ds and "method" in ds[k].dims and "model" not in ds[k].dims:
            out[k] = ("method", np.tile(ds[k].values, ds.sizes["model"]))
    return out


def _run_dask(models, args, methods, todo, hs, eval_kw, train_inputs, test_inputs, address, n_workers,
              processes, finish):
    try:
        from distributed import Client, LocalCluster, as_completed
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ConfigurationError("executor='dask' needs the dask extra: pip install 'ppl_rnn[dask]'.") from e
    cluster = None
    if address is None:
        cluster = LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=processes,
                               dashboard_address=None)
        client = Client(cluster)
        if processes:  # one single-threaded torch per worker process (no oversubscription of the cores)
            client.run(torch.set_num_threads, 1)
    else:
        client = Client(address)
    try:
        futs = {}
        scattered = {ml: client.scatter(m, broadcast=True) for ml, m in models.items()}
        for ml, name, s, fp in todo:
            f = client.submit(run_cell, scattered[ml], *args, name, methods[name], s, hs, eval_kw, train_inputs,
                              test_inputs, ml, pure=False, key=f"ppl-rnn-cell-{ml}-{name}-{s}-{fp}")
            futs[f] = fp
        for f in as_completed(list(futs)):
            ev, trace, fitted = f.result()
            finish(ev, trace, fitted, futs[f])
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
