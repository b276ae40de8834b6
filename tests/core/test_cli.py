"""The ppl-rnn command line: help that teaches, one-line errors with exit 2, run directories."""

import re
import subprocess
import sys

import pytest
import xarray as xr
from ppl_rnn.models import MODELS

from ppl_rnn.workbench.cli import build_parser, main, make_model


def test_help_teaches(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for word in ("examples:", "ppl-rnn demo", "persistence", "report.md"):
        assert word in out
    from ppl_rnn.inference.registry import METHODS, method_names

    for name in method_names(("train", "reference")):  # the CLI lists the one registry, with descriptions
        assert f"  {name} " in out and METHODS[name].description in out
    assert "  particle_filter " not in out  # filters are not training methods
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    out = capsys.readouterr().out
    assert "[methods.MCEM]" in out and "--executor" in out


@pytest.mark.parametrize("argv", [
    ["simulate", "--steps", "-3"],
    ["fit", "--method", "nope"],
    ["compare", "--horizons", "a,b"],
    ["compare", "--config", "/nonexistent/cfg.toml"],
    ["fit", "--data", "/nonexistent.csv", "--method", "linear_ar"],
    ["fit", "--method", "linear_ar", "--set", "bogus=1", "--max-steps", "300"],
    ["fit", "--method", "ekf-em", "--max-steps", "300"],  # one spelling: ekf_em
    ["fit", "--method", "kalman_filter", "--max-steps", "300"],  # a filter, not a training method
    ["fit", "--method", "linear_ar", "--se-tol", "-1", "--max-steps", "300"],
    ["frobnicate"],
])
def test_bad_arguments_one_line_exit_2(argv, capsys, tmp_path):
    argv = argv + (["--out", str(tmp_path / "o")] if argv[0] in ("simulate", "fit", "compare") else [])
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "error" in err


def test_simulate_writes_run_directory(tmp_path, capsys):
    out = tmp_path / "sim"
    assert main(["simulate", "--hidden", "3", "--steps", "60", "--sequences", "2", "--out", str(out)]) == 0
    ds = xr.load_dataset(out / "simulation.nc", engine="h5netcdf")
    assert ds.observations.shape == (2, 60, 1) and ds.states.shape == (2, 60, 3)
    for f in ("states.png", "observations.png", "report.md"):
        assert (out / f).exists()
    assert "sd(y)" in capsys.readouterr().out


def test_compare_with_toml_config_resumes(tmp_path, capsys):
    cfg = tmp_path / "cmp.toml"
    cfg.write_text('[data]\nname = "unkelbach-synthetic"\nmax_steps = 160\ntrain_steps = 120\n'
                   '[model]\nhidden = 2\n[compare]\nseeds = [0, 1]\nhorizons = [1, 3]\nnum_particles = 200\n'
                   '[methods.persist]\ntype = "persistence"\n[methods."AR(2)"]\ntype = "linear_ar"\norder = 2\n')
    out = tmp_path / "run"
    assert main(["compare", "--config", str(cfg), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "AR(2)" in text and "persist" in text and "held-out log-ev/step" in text
    ds = xr.load_dataset(out / "compare.nc", engine="h5netcdf")
    assert list(ds.method.values) == ["persist", "AR(2)"] and list(ds.seed.values) == [0, 1]
    report = (out / "report.md").read_text()
    assert "| method |" in report and "comparison.png" in report and "Winner" in report or "No trained" in report
    assert (out / "comparison.png").exists()
    stamp = (out / "cells" / "persist__seed0.nc").stat().st_mtime_ns
    assert main(["compare", "--config", str(cfg), "--out", str(out)]) == 0  # resumes: cells not rewritten
    assert (out / "cells" / "persist__seed0.nc").stat().st_mtime_ns == stamp


def test_fit_and_forecast_commands(tmp_path, capsys):
    common = ["--data", "unkelbach-synthetic", "--max-steps", "160", "--train-steps", "120", "--method", "linear_ar",
              "--set", "order=3", "--num-particles", "200"]
    assert main(["fit", *common, "--horizons", "1,4", "--out", str(tmp_path / "fit")]) == 0
    ev = xr.load_dataset(tmp_path / "fit" / "evaluation.nc", engine="h5netcdf")
    assert list(ev.horizon.values) == [1, 4]
    assert (tmp_path / "fit" / "report.md").exists() and (tmp_path / "fit" / "onestep.png").exists()
    assert main(["forecast", *common, "--horizon", "6", "--out", str(tmp_path / "fc")]) == 0
    out = capsys.readouterr().out
    assert "90% interval" in out and (tmp_path / "fc" / "forecast.png").exists()
    assert "± " in (tmp_path / "fit" / "report.md").read_text()  # the log-evidence with its SE


def test_entry_point_is_installed():
    r = subprocess.run([sys.executable, "-m", "ppl_rnn.workbench.cli", "simulate", "--steps", "0"], capture_output=True,
                       text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1


def test_cli_and_demo_do_not_import_each_other():
    # issue 11: the cli <-> demo import circle is gone (both take method names from the registry)
    import ast
    from pathlib import Path

    import ppl_rnn.workbench.cli as cli
    import ppl_rnn.workbench.demo as demo

    def imports(mod):
        tree = ast.parse(Path(mod.__file__).read_text())
        return {(n.module or "") for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)} | {
            a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}

    assert not {m for m in imports(demo) if m.endswith("cli")}
    assert "ppl_rnn.inference.registry" in imports(demo) and "ppl_rnn.inference.registry" in imports(cli)
    assert "inspect" not in imports(cli)


@pytest.mark.slow  # about 30 s: the whole demo pipeline at tiny settings
def test_demo_quick_writes_report_with_winner_and_figures(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--workers", "1", "--no-respiration", "--out", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert "**Winner:" in report and "| method |" in report and "true network" in report
    for png in ("comparison.png", "traces.png", "forecast.png", "onestep.png", "ess.png", "states.png"):
        assert (out / "synthetic" / png).exists(), png
        assert f"synthetic/{png}" in report
    ds = xr.load_dataset(out / "synthetic" / "compare.nc", engine="h5netcdf")
    assert {"MCEM", "mean-field EM", "SVI (Markov guide)", "SVI (mean-field guide)", "EKF-EM", "BPTT", "AR(5)",
            "persistence", "true network"} == set(ds.method.values)
    assert "held-out log-ev/step" in capsys.readouterr().out


# ---- issue 12: every model of the suite by name ----------------------------------------------------------------


def test_models_command_lists_every_model_with_its_docstring(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name, cls in MODELS.items():
        line = next(ln for ln in out.splitlines() if ln.split()[:1] == [name])
        first = cls.__doc__.split("(")[0].split(".")[0].strip()  # e.g. "Stochastic GRU"
        assert cls.__name__ in line and first in line, (name, line)
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    help_text = capsys.readouterr().out
    assert all(name in help_text for name in MODELS)  # the help names them too


@pytest.mark.parametrize("name", list(MODELS))
def test_fit_accepts_every_model(name):
    # the fit command's parser and model builder, then a tiny fit (SVI, 2 steps) of what it built
    import torch
    from ppl_rnn.inference.registry import make_method

    import ppl_rnn as pr
    from ppl_rnn.workbench.cli import MODEL_SIZES

    args = build_parser().parse_args(["fit", "--model", name, "--method", "svi_mean_field", "--model-seed", "3"])
    model = make_model(args.model, args, obs_dim=2)
    assert type(model) is MODELS[name] and model.obs_dim == 2
    default_state = {"jordan": 4 + 2, "lstm": 2 * 2, "stacked": 4 + 2}.get(name, MODEL_SIZES[name][1])
    assert model.hidden_dim == default_state
    bigger = make_model(name, {"hidden": 6}, obs_dim=2)
    assert bigger.hidden_dim == {"jordan": 6 + 2, "lstm": 12, "stacked": 6 + 3}.get(name, 6)
    y = torch.sin(0.3 * torch.arange(40.0))[:, None].repeat(1, 2) + 0.1 * torch.randn(40, 2,
                                                                                      generator=torch.Generator().manual_seed(0))
    if name == "deep_markov":
        y = torch.sigmoid(y)
    f = pr.fit(model, y, method=make_method("svi_mean_field", num_steps=2), seed=0)
    assert type(f.model) is MODELS[name]
    assert torch.isfinite(torch.as_tensor(f.trace["objective"].values)).all()


def test_fit_command_end_to_end_with_a_suite_model(tmp_path, capsys):
    import torch

    out = tmp_path / "fit"
    assert main(["fit", "--model", "gru", "--hidden", "3", "--max-steps", "60", "--train-steps", "48", "--method",
                 "svi_mean_field", "--set", "num_steps=2", "--num-particles", "100", "--max-particles", "100",
                 "--se-tol", "10", "--horizons", "1", "--out", str(out)]) == 0
    fitted = torch.load(out / "model.pt", weights_only=False)
    assert type(fitted) is MODELS["gru"] and fitted.hidden_dim == 3
    assert "gru" in (out / "report.md").read_text().splitlines()[0]


@pytest.mark.parametrize("argv, words", [
    (["fit", "--model", "gur"], ("Did you mean 'gru'?", "echo_state", "linear_gaussian")),
    (["compare", "--model", "elman,lstn"], ("Did you mean 'lstm'?", "deep_markov")),
    (["fit", "--model", "hopfield"], ("unknown model 'hopfield'", "mtrnn")),
    (["fit", "--model", "gru", "--activation", "identity"], ("does not apply to model 'gru'", "elman")),
    (["compare", "--model", "gru,lstm", "--emission", "student_t"], ("applies to none", "deep_markov")),
    (["compare", "--model", "gru", "--model", "gru"], ("named twice",)),
    (["fit", "--model", "elman,gru"], ("takes one model",)),
])
def test_unknown_or_misused_model_one_line_exit_2(argv, words, capsys, tmp_path):
    out = tmp_path / "o"
    assert main([*argv, "--max-steps", "60", "--method" if argv[0] == "fit" else "--methods", "persistence",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("ppl-rnn: error:")
    for w in words:
        assert w in err, (w, err)
    assert not (out / "evaluation.nc").exists() and not (out / "compare.nc").exists()


@pytest.mark.slow  # about 12 s: two full compare grids through the CLI
def test_compare_several_models_by_flag_and_by_config(tmp_path, capsys):
    from ppl_rnn.workbench.compare import load_cell_model

    p = build_parser()
    assert p.parse_args(["compare", "--model", "elman", "--model", "gru,lstm"]).model == ["elman", "gru,lstm"]
    base = ('[data]\nname = "unkelbach-synthetic"\nmax_steps = 60\ntrain_steps = 48\n'
            '[compare]\nseeds = [0]\nhorizons = [1]\nnum_particles = 100\nmax_particles = 100\nse_tol = 10.0\n'
            '[methods.svi]\ntype = "svi_mean_field"\nnum_steps = 2\n[methods.persist]\ntype = "persistence"\n')
    cfg = tmp_path / "two.toml"
    cfg.write_text('model = ["elman", "gru"]\n' + base)  # a top-level model = ... (no [model] table)
    out = tmp_path / "two"
    assert main(["compare", "--config", str(cfg), "--out", str(out)]) == 0
    ds = xr.load_dataset(out / "compare.nc", engine="h5netcdf")
    assert list(ds["model"].values) == ["elman", "gru"] and list(ds["method"].values) == ["svi", "persist"]
    assert ds["heldout_logev_per_step"].dims[:2] == ("model", "method")
    assert type(load_cell_model(out, "svi", 0, model="gru")) is MODELS["gru"]
    assert type(load_cell_model(out, "svi", 0, model="elman")) is MODELS["elman"]
    assert "gru / svi" in (out / "report.md").read_text()
    assert "2 models x 2 methods" in capsys.readouterr().out
    # labelled models with their own options; a --model flag overrides the config's models
    cfg.write_text('[model]\nhidden = 3\n[models.small]\ntype = "gru"\n[models.big]\ntype = "lstm"\nhidden = 5\n'
                   + base.replace('[methods.persist]\ntype = "persistence"\n', ""))
    out = tmp_path / "labelled"
    assert main(["compare", "--config", str(cfg), "--out", str(out)]) == 0
    ds = xr.load_dataset(out / "compare.nc", engine="h5netcdf")
    assert list(ds["model"].values) == ["small", "big"]
    small, big = (load_cell_model(out, "svi", 0, model=m) for m in ("small", "big"))
    assert type(small) is MODELS["gru"] and small.hidden_dim == 3
    assert type(big) is MODELS["lstm"] and big.hidden_dim == 10


# ---- issue 27, point 4: the fit report speaks to the user (scaling, reference rows, verdict, raw units) ------------

_VERDICT = re.compile(r"\*\*(\S+) (beats|does not beat|ties with) the best reference, (AR\(\d+\) by AIC|persistence)\*\*"
                      r"[^.]*?(\d+\.\d{3}) ± (\d+\.\d{3}) nats/step")


def _laser_train(n):
    from ppl_rnn.workbench import datasets

    return datasets.load("santafe-laser").values[0, :n, 0].double().numpy()  # raw counts


def test_fit_report_has_reference_rows_scaling_and_verdict(tmp_path, capsys):
    pytest.importorskip("reservoirpy")
    import numpy as np

    out = tmp_path / "fit"
    assert main(["fit", "--data", "santafe-laser", "--max-steps", "300", "--train-steps", "200", "--set",
                 "num_iterations=2", "--set", "num_seeds=1", "--set", "num_particles=200", "--horizons", "1,5",
                 "--num-particles", "200", "--out", str(out)]) == 0
    term = capsys.readouterr().out
    report = (out / "report.md").read_text()
    # the scaling sentence, with the training part's own mean and standard deviation (steps 0-199)
    x = _laser_train(200)
    sentence = (f"Scaled by the training part's mean {np.mean(x):.4g} and standard deviation {np.std(x):.4g} "
                "(steps 0-199 only")
    assert sentence in report and sentence in term and "`--scale none` keeps raw units" in report
    # the reference rows beside the fitted network, on the same yardstick
    grid = xr.load_dataset(out / "references.nc", engine="h5netcdf")
    names = [str(m) for m in grid.method.values]
    # no --method: the default trainer (the start search), its candidates and verdict printed
    assert names[0] == "recommended" and names[1] == "persistence" and re.fullmatch(r"AR\(\d+\) by AIC", names[2])
    assert "ElmanSSM/given#0" in term and "tail_log_score_per_step" in term and "held-back tail" in term
    assert "tail_crps" in term and "mean CRPS over leads" in term
    assert (grid.heldout_logev_per_step_se.values[0, 1:] == 0).all()  # reference rows are scored exactly
    for row in ("| persistence * |", f"| {names[2]} * |", "| recommended |"):
        assert row in report, row
    assert "persistence *" in term and f"{names[2]} *" in term
    # the verdict sentence: beats the best reference or not, by how much ± SE, and the paired CRPS per lead
    m = _VERDICT.search(report)
    assert m and m.group(1) == "recommended", report
    lev = grid.heldout_logev_per_step.values[:, 0]
    best = int(np.argmax(lev[1:])) + 1
    assert m.group(3) == names[best] and float(m.group(4)) == pytest.approx(abs(lev[0] - lev[best]), abs=1e-3)
    assert m.group(2) == ("beats" if lev[0] > lev[best] else "does not beat")
    assert "paired CRPS, recommended minus" in report and "1-step" in report and "5-step" in report
    assert m.group(0).replace("**", "") in term  # the same sentence on the terminal
    # scores also in the data's units: RMSE and CRPS times sigma, log-evidence minus log sigma
    assert "RMSE 1 (raw units)" in report and f"−log σ = {-np.log(np.std(x)):.4f}" in report
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    helptext = " ".join(capsys.readouterr().out.split())
    assert "--scale {standard,robust,none}" in helptext and "beside persistence and AR by AIC" in helptext


def test_scale_none_keeps_raw_units_and_the_raw_columns_agree(tmp_path, capsys):
    pytest.importorskip("reservoirpy")
    import numpy as np

    common = ["fit", "--data", "santafe-laser", "--max-steps", "300", "--train-steps", "200", "--method", "linear_ar",
              "--set", "order=3", "--horizons", "1,5"]
    assert main([*common, "--scale", "none", "--out", str(tmp_path / "raw")]) == 0
    term = capsys.readouterr().out
    report = (tmp_path / "raw" / "report.md").read_text()
    assert "Scaled by" not in report and "Scaled by" not in term and "(raw units)" not in report
    assert "Raw units (`--scale none`)" in report
    raw = xr.load_dataset(tmp_path / "raw" / "evaluation.nc", engine="h5netcdf")
    assert raw.attrs["scaling"] == "none"
    assert main([*common, "--out", str(tmp_path / "std")]) == 0  # the default: standard scaling
    std = xr.load_dataset(tmp_path / "std" / "evaluation.nc", engine="h5netcdf")
    sd = float(std.attrs["scaling_scale"])
    assert std.attrs["scaling"] == "standard" and sd == pytest.approx(np.std(_laser_train(200)), rel=1e-12)
    # an AR fit is affine-equivariant: the raw run's numbers are the scaled run's converted to raw units
    np.testing.assert_allclose(raw.rmse.values, std.rmse.values * sd, rtol=1e-5)
    assert float(raw.heldout_logev_per_step) == pytest.approx(float(std.heldout_logev_per_step) - np.log(sd), abs=1e-5)
    assert float(raw.rmse.sel(horizon=1)) > 5 * float(std.rmse.sel(horizon=1))  # raw counts, not scaled units
    table = (tmp_path / "std" / "report.md").read_text().split("RMSE 5 (raw units) |")[1]
    row = next(ln for ln in table.splitlines() if ln.startswith("| linear_ar |")).split("|")
    assert float(row[2]) == pytest.approx(float(raw.heldout_logev_per_step), abs=2e-3)
    assert float(row[-2]) == pytest.approx(float(raw.rmse.sel(horizon=5)), rel=1e-3)


def test_scaling_statistics_come_from_the_training_part_only(tmp_path):
    import numpy as np
    import torch

    rng = np.random.default_rng(0)
    y = np.cumsum(rng.normal(size=160)) + 5.0
    other = y.copy()
    other[120:] = 10 * other[120:] + 100  # only the test part changes
    runs = {}
    for label, series in (("a", y), ("b", other)):
        path = tmp_path / f"{label}.csv"
        np.savetxt(path, series[:, None], delimiter=",")
        out = tmp_path / label
        assert main(["fit", "--data", str(path), "--train-steps", "120", "--method", "linear_ar", "--set", "order=2",
                     "--horizons", "1", "--out", str(out)]) == 0
        ev = xr.load_dataset(out / "evaluation.nc", engine="h5netcdf")
        runs[label] = (float(ev.attrs["scaling_offset"]), float(ev.attrs["scaling_scale"]),
                       torch.load(out / "model.pt", weights_only=False).state_dict())
    (oa, sa, pa), (ob, sb, pb) = runs["a"], runs["b"]
    assert (oa, sa) == (ob, sb)
    assert oa == pytest.approx(np.mean(y[:120]), rel=1e-6) and sa == pytest.approx(np.std(y[:120]), rel=1e-6)
    assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)  # the same fitted parameters


@pytest.mark.slow
def test_fit_model_auto_searches_the_architectures(tmp_path, capsys):
    from ppl_rnn.workbench.cli import AUTO_MODELS

    out = tmp_path / "auto"
    assert main(["fit", "--model", "auto", "--data", "unkelbach-synthetic", "--max-steps", "160", "--train-steps",
                 "120", "--set", "num_iterations=1", "--set", "num_seeds=1", "--set", "num_particles=100",
                 "--horizons", "1,4", "--num-particles", "200", "--out", str(out)]) == 0
    term = capsys.readouterr().out
    assert AUTO_MODELS == ("elman", "gru", "linear_gaussian")
    for label in ("ElmanSSM/given#0", "GRUSSM/given#0", "LinearGaussianSSM/given#0", "by AIC"):
        assert label in term, label
    chosen = re.search(r"chose (\S+) \((\w+)\)", term)
    assert chosen and chosen.group(1).split("/")[0] == chosen.group(2)  # the returned model is the chosen one's
    assert (out / "report.md").exists()
    assert main(["fit", "--model", "auto", "--method", "mcem", "--max-steps", "60", "--out", str(tmp_path / "x")]) == 2
    assert "needs a method that searches over models" in capsys.readouterr().err
