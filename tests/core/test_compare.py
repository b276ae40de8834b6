"""pr.compare: the grid, failures recorded per cell, resume from cell files, Dask, reference rows."""

import numpy as np
import pytest
import torch
import xarray as xr
from ppl_rnn.inference.reference import LinearAR, Persistence
from ppl_rnn.models import ElmanSSM

import ppl_rnn as pr
from ppl_rnn.errors import ConfigurationError
from ppl_rnn.results import FitResult
from ppl_rnn.workbench.compare import load_cell_model, load_cell_trace


class CountingFit(pr.InferenceMethod):
    """Stand-in training method: nudges W by the seed and counts its calls."""

    name = "counting"
    calls = 0

    def _fit(self, model, data, seed):
        type(self).calls += 1
        with torch.no_grad():
            model.W = model.W * (1.0 - 0.01 * seed)
        trace = xr.Dataset({"objective": ("iteration", [-3.0, -2.0])}, coords={"iteration": [0, 1]})
        return FitResult(model=model, trace=trace, posterior=None, wall_time_s=0.01, converged=True,
                         method=self.name, evidence_kind="lower_bound")


class Broken(pr.InferenceMethod):
    name = "broken"

    def _fit(self, model, data, seed):
        raise RuntimeError("diverged on purpose")


@pytest.fixture
def problem():
    m = ElmanSSM(2, 1, activation="identity", process_noise=0.3, obs_noise=0.3, seed=1)
    y = m.simulate(200, 1, seed=0).observations
    return m, y[:, :140], y[:, 140:]


@pytest.mark.slow  # about 10 s: a grid run twice (resume); test_ctrl_c_keeps_finished_cells stays fast
def test_grid_records_failures_and_resumes_from_cells(problem, tmp_path):
    m, tr, te = problem
    methods = {"counting": CountingFit(), "broken": Broken(), "persistence": Persistence()}
    CountingFit.calls = 0
    ds = pr.compare(m, tr, te, methods=methods, seeds=[0, 1], horizons=[1, 5], num_samples=20,
                    out=tmp_path, progress=False)
    assert dict(ds.sizes)["method"] == 3 and dict(ds.sizes)["seed"] == 2 and dict(ds.sizes)["horizon"] == 2
    assert list(ds.error.sel({"method": "broken"}).values) == ["RuntimeError: diverged on purpose"] * 2
    assert np.isnan(ds.crps.sel({"method": "broken"})).all()
    ok = ds.sel({"method": ["counting", "persistence"]})
    assert (ok.error == "").all() and np.isfinite(ok.crps).all() and np.isfinite(ok.heldout_logev_per_step).all()
    assert ds.own_evidence_kind.sel({"method": "counting"}).item() == "lower_bound"
    assert float(ds.own_objective.sel({"method": "counting", "seed": 0})) == -2.0
    # seeds matter: different fitted models -> different scores
    assert float(ds.heldout_logev_per_step.sel({"method": "counting", "seed": 0})) != float(
        ds.heldout_logev_per_step.sel({"method": "counting", "seed": 1}))
    # the grid keeps each cell's per-target losses, so two cells can be compared target by target
    d = pr.forecast_difference(ds.sel({"method": "counting", "seed": 0}), ds.sel({"method": "persistence", "seed": 0}))
    assert list(d.horizon.values) == [1, 5] and np.isfinite(d.difference_se).all()
    assert float(d.mean_a.sel(horizon=5)) == pytest.approx(float(ds.crps.sel({"method": "counting", "seed": 0,
                                                                               "horizon": 5})), rel=1e-12)
    with pytest.raises(pr.DataError, match="all NaN"):  # a failed cell has nothing to compare
        pr.forecast_difference(ds.sel({"method": "broken", "seed": 0}), ds.sel({"method": "persistence", "seed": 0}))
    # whole rows: each target's loss averaged over the finished seeds
    from ppl_rnn.workbench.paired import grid_difference

    g = grid_difference(ds, "counting", "persistence", metric="sqerr")
    mean_a = ds.sqerr_by_target.sel({"method": "counting"}).mean("seed").sel(horizon=5)
    assert float(g.mean_a.sel(horizon=5)) == pytest.approx(float(mean_a.mean()), rel=1e-12)
    with pytest.raises(pr.DataError, match="no seed of 'broken' finished"):
        grid_difference(ds, "broken", "persistence")
    with pytest.raises(ConfigurationError, match="not a method of the grid"):
        grid_difference(ds, "counting", "nope")
    # saved grid, cell files, traces and fitted models
    saved = xr.load_dataset(tmp_path / "compare.nc", engine="h5netcdf")
    xr.testing.assert_allclose(saved.crps, ds.crps)
    assert load_cell_trace(tmp_path, "counting", 1).objective.values.tolist() == [-3.0, -2.0]
    assert isinstance(load_cell_model(tmp_path, "persistence", 0), pr.StateSpaceModel)
    # rerun: finished cells are loaded, not refitted; the failed ones are retried
    assert CountingFit.calls == 2
    ds2 = pr.compare(m, tr, te, methods=methods, seeds=[0, 1], horizons=[1, 5], num_samples=20,
                     out=tmp_path, progress=False)
    assert CountingFit.calls == 2
    xr.testing.assert_identical(ds2.crps, ds.crps)
    # an interrupted run: a missing cell file is recomputed, the rest are kept
    (tmp_path / "cells" / "counting__seed1.nc").unlink()
    pr.compare(m, tr, te, methods=methods, seeds=[0, 1], horizons=[1, 5], num_samples=20, out=tmp_path,
               progress=False)
    assert CountingFit.calls == 3
    # a changed configuration invalidates the cells
    pr.compare(m, tr, te, methods={"counting": CountingFit()}, seeds=[0], horizons=[1, 6], num_samples=20,
               out=tmp_path, progress=False)
    assert CountingFit.calls == 4


def test_dask_two_worker_cluster_matches_in_process(problem):
    m, tr, te = problem
    methods = {"persistence": Persistence(), "AR(2)": LinearAR(order=2)}
    kw = dict(methods=methods, seeds=[0, 1], horizons=[1, 3], num_samples=20, progress=False)
    local = pr.compare(m, tr, te, **kw)
    # threads (processes=False) keep the test fast; they share torch's global RNG, so the Monte Carlo
    # metrics agree up to noise while the exact (Kalman) held-out evidence agrees exactly
    dist = pr.compare(m, tr, te, executor="dask", n_workers=2, processes=False, **kw)
    assert (dist.error == "").all()
    xr.testing.assert_allclose(local.heldout_logev_per_step, dist.heldout_logev_per_step)
    xr.testing.assert_allclose(local.crps, dist.crps, rtol=0.25)


def test_reference_rows(float64):
    # AR(2) data: the linear AR row recovers the coefficients; persistence is the random walk
    g = torch.Generator().manual_seed(0)
    T = 1500
    e = torch.randn(T, generator=g, dtype=torch.float64) * 0.5
    y = torch.zeros(T, dtype=torch.float64)
    for t in range(2, T):
        y[t] = 0.2 + 1.2 * y[t - 1] - 0.5 * y[t - 2] + e[t]
    y = y[:, None]
    m = ElmanSSM(2, 1, activation="identity")
    ar = pr.fit(m, y, method=LinearAR(order=2))
    np.testing.assert_allclose(ar.model.phi[0].numpy(), [1.2, -0.5], atol=0.05)
    assert float(ar.model.sigma) == pytest.approx(0.5, rel=0.05)
    p = pr.fit(m, y[:1000], method=Persistence())
    assert float(p.model.sigma) == pytest.approx(float(torch.sqrt((y[1:1000] - y[:999]).pow(2).mean())), rel=1e-6)
    ev = pr.evaluate(p.model, y[:1000], y[1000:], horizons=[1], num_samples=2000, seed=0)
    rw_rmse = float(torch.sqrt((y[1000:] - y[999:-1]).pow(2).mean()))  # forecast = last value
    assert float(ev.rmse.sel(horizon=1)) == pytest.approx(rw_rmse, rel=0.02)
    ev_ar = pr.evaluate(ar.model, y[:1000], y[1000:], horizons=[1], num_samples=200, seed=0)
    assert float(ev_ar.heldout_logev_per_step) > float(ev.heldout_logev_per_step)
    assert float(ev_ar.heldout_logev_per_step) == pytest.approx(-0.5 * np.log(2 * np.pi * 0.25) - 0.5, abs=0.08)


def test_bad_configurations(problem):
    m, tr, te = problem
    with pytest.raises(ConfigurationError, match="methods"):
        pr.compare(m, tr, te, methods={})
    with pytest.raises(ConfigurationError, match="inference method"):
        pr.compare(m, tr, te, methods={"x": "MCEM"})
    with pytest.raises(ConfigurationError, match="executor"):
        pr.compare(m, tr, te, methods={"p": Persistence()}, executor="ray")
    with pytest.raises(ConfigurationError, match="seeds"):
        pr.compare(m, tr, te, methods={"p": Persistence()}, seeds=[0, 0])


class InterruptOnSeed1(pr.InferenceMethod):
    name = "interrupting"

    def _fit(self, model, data, seed):
        if seed == 1:
            raise KeyboardInterrupt
        return Persistence().fit_prepared(model, data, seed)


def test_ctrl_c_keeps_finished_cells(problem, tmp_path):
    m, tr, te = problem
    methods = {"p": Persistence(), "x": InterruptOnSeed1()}
    with pytest.raises(KeyboardInterrupt):
        pr.compare(m, tr, te, methods=methods, seeds=[0, 1], horizons=[1], num_samples=10, out=tmp_path,
                   progress=False)
    done = sorted(p.name for p in (tmp_path / "cells").glob("*.nc") if not p.name.endswith(".trace.nc"))
    assert done == ["p__seed0.nc", "p__seed1.nc", "x__seed0.nc"]


def test_resume_fingerprint_includes_the_initial_model(problem, tmp_path):
    # issue 11, bug 3: reusing an output folder with another initial model must refit, not reuse old cells
    m, tr, te = problem
    kw = dict(methods={"counting": CountingFit()}, seeds=[0], horizons=[1], num_samples=10, out=tmp_path,
              progress=False)
    CountingFit.calls = 0
    first = pr.compare(m, tr, te, **kw)
    other = ElmanSSM(2, 1, activation="identity", process_noise=0.3, obs_noise=0.3, seed=2)  # other weights
    second = pr.compare(other, tr, te, **kw)
    assert CountingFit.calls == 2
    assert second.heldout_logev_per_step.item() != first.heldout_logev_per_step.item()
    # same weights and noise, another setting (the activation): another model too
    tanh = ElmanSSM(2, 1, activation="tanh", process_noise=0.3, obs_noise=0.3, seed=2)
    pr.compare(tanh, tr, te, **kw)
    assert CountingFit.calls == 3
    pr.compare(ElmanSSM(2, 1, activation="tanh", process_noise=0.3, obs_noise=0.3, seed=2), tr, te, **kw)
    assert CountingFit.calls == 3  # an equal model (a fresh object) resumes
    assert second.attrs["model_fingerprint"] != first.attrs["model_fingerprint"]


class FailsOnSeed1(pr.InferenceMethod):
    name = "fails_on_seed1"

    def _fit(self, model, data, seed):
        if seed == 1:
            raise RuntimeError("seed 1 diverged")
        return Persistence().fit_prepared(model, data, seed)


def test_report_says_how_many_seeds_failed_and_prints_se(problem):
    # issue 11, bug 4: a row averaged over the surviving seeds must say how many failed
    from ppl_rnn.workbench.report import comparison_table, summarise, text_table, verdict

    m, tr, te = problem
    ds = pr.compare(m, tr, te, methods={"flaky": FailsOnSeed1(), "persistence": Persistence()}, seeds=[0, 1, 2],
                    horizons=[1], num_samples=10, progress=False)
    rows = {r["method"]: r for r in summarise(ds)}
    assert (rows["flaky"]["n_ok"], rows["flaky"]["n_failed"], rows["flaky"]["n_seeds"]) == (2, 1, 3)
    md = comparison_table(ds)
    flaky_line = next(line for line in md.splitlines() if line.startswith("| flaky"))
    assert "| 2/3 |" in flaky_line and "finished seeds only" in md
    assert "3/3" in next(line for line in md.splitlines() if line.startswith("| persistence"))
    assert "2/3" in text_table(ds)
    # every log-evidence carries its Monte Carlo SE (0 here: the persistence model is scored by exact Kalman)
    assert "± 0.000" in flaky_line
    assert "1 failed" in verdict(ds, reference=("persistence",)) or "seed 1 diverged" in verdict(ds)


def test_compare_records_the_yardstick_se(problem):
    m, tr, te = problem
    ds = pr.compare(m, tr, te, methods={"counting": CountingFit()}, seeds=[0], horizons=[1], num_samples=10,
                    progress=False)
    assert float(ds.heldout_logev_per_step_se.squeeze()) == 0.0  # linear model: exact Kalman
    assert int(ds.se_ok.squeeze()) == 1 and ds.attrs["se_tol"] == 0.01 and ds.attrs["num_replicates"] == 8


def test_several_models_grid_model_by_method_by_seed(problem, tmp_path):
    # issue 12: architectures compared with the same yardstick; dims model x method x seed
    from ppl_rnn.workbench.report import comparison_table, summarise

    m, tr, te = problem
    models = {"linear": m, "tanh": ElmanSSM(2, 1, activation="tanh", process_noise=0.3, obs_noise=0.3, seed=1)}
    methods = {"counting": CountingFit(), "AR(2)": LinearAR(order=2)}
    CountingFit.calls = 0
    ds = pr.compare(models, tr, te, methods=methods, seeds=[0, 1], horizons=[1, 2], num_samples=10, out=tmp_path,
                    progress=False)
    for v in ("heldout_logev_per_step", "crps", "own_evidence_kind", "onestep_log_lik"):  # equal or not across models
        assert ds[v].dims[:2] == ("model", "method"), v
    assert ds.y_test.dims == ("sequence", "time", "obs")
    assert list(ds.model.values) == ["linear", "tanh"] and CountingFit.calls == 4
    assert (ds.error == "").all() and np.isfinite(ds.heldout_logev_per_step).all()
    # the same method on different models differs; the AR reference ignores the initial model
    cell = lambda v, k, meth: ds[v].sel({"model": k, "method": meth})  # noqa: E731 (sel(method=) is a keyword)
    assert (cell("heldout_logev_per_step", "linear", "counting") != cell("heldout_logev_per_step", "tanh",
                                                                          "counting")).all()
    np.testing.assert_allclose(cell("heldout_logev_per_step", "linear", "AR(2)").values,
                               cell("heldout_logev_per_step", "tanh", "AR(2)").values)
    assert cell("evidence_method", "tanh", "counting").item() == "particle_filter"
    assert cell("evidence_method", "linear", "counting").item() == "kalman"
    assert (tmp_path / "cells" / "tanh__counting__seed1.nc").exists()
    assert isinstance(load_cell_model(tmp_path, "counting", 1, model="tanh"), pr.StateSpaceModel)
    # resume per model; the report and ArviZ export read the grid as rows "<model> / <method>"
    pr.compare(models, tr, te, methods=methods, seeds=[0, 1], horizons=[1, 2], num_samples=10, out=tmp_path,
               progress=False)
    assert CountingFit.calls == 4
    assert {r["method"] for r in summarise(ds)} == {"linear / counting", "linear / AR(2)", "tanh / counting",
                                                     "tanh / AR(2)"}
    assert "tanh / AR(2) *" in comparison_table(ds, reference=("AR(2)",))
    assert set(pr.to_inference_data(ds)) == {"linear / counting", "linear / AR(2)", "tanh / counting",
                                             "tanh / AR(2)"}
    with pytest.raises(ConfigurationError, match=r"model\['bad'\]"):
        pr.compare({"bad": "GRU"}, tr, te, methods=methods)


def test_own_objective_is_the_log_evidence_where_the_trace_has_one():
    from types import SimpleNamespace

    from ppl_rnn.workbench.compare import final_objective

    both = xr.Dataset({"objective": ("iteration", [np.nan, 9e5]), "log_evidence": ("iteration", [10.0, 11.0])})
    assert final_objective(SimpleNamespace(trace=both)) == 11.0  # what evidence_kind describes (MCEM, KalmanEM)
    elbo = xr.Dataset({"objective": ("iteration", [-5.0, -4.0, np.nan])})
    assert final_objective(SimpleNamespace(trace=elbo)) == -4.0
    assert np.isnan(final_objective(SimpleNamespace(trace=None)))
