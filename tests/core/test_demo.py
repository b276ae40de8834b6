"""The demo's breathing section (tiny settings) and its linear-special-case row."""

from __future__ import annotations

import pytest
import torch
from ppl_rnn.inference import KalmanEM
from ppl_rnn.models import ElmanSSM

import ppl_rnn as pr
from ppl_rnn.errors import ConfigurationError, ModelCapabilityError
from ppl_rnn.workbench.demo import (
    LINEAR_ROW,
    NETWORK_ROW,
    LinearSpecialCase,
    breathing_methods,
    linear_or_nonlinear,
    run_demo,
)


def test_linear_special_case_fits_the_identity_network():
    """KalmanEM through LinearSpecialCase on a tanh network = KalmanEM on the same weights with identity
    activation (exact evidence identical), and the tanh model given is untouched."""
    net = ElmanSSM(2, 1, seed=3).double()
    y = net.simulate(120, seed=0).observations.double()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    fit = pr.fit(net, y, method=LinearSpecialCase(KalmanEM(num_iterations=5, tol=0.0)), seed=0)
    assert fit.model.activation == "identity" and fit.model.dtype == torch.float64
    direct = ElmanSSM(2, 1, activation="identity").double()
    direct.load_state_dict(net.state_dict())
    ref = pr.fit(direct, y, method=KalmanEM(num_iterations=5, tol=0.0), seed=0)
    torch.testing.assert_close(fit.trace["objective"].values, ref.trace["objective"].values)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())
    with pytest.raises(ConfigurationError):
        LinearSpecialCase("kalman_em")


def test_linear_special_case_names_the_missing_capability():
    from ppl_rnn.inference.reference import LinearAR

    ar = pr.fit(ElmanSSM(2, 1).double(), torch.randn(1, 60, 1, dtype=torch.float64),
                method=LinearAR(order=2)).model
    with pytest.raises(ModelCapabilityError, match="linear_special_case"):
        pr.fit(ar, torch.randn(1, 60, 1, dtype=torch.float64), method=LinearSpecialCase(KalmanEM()))


def test_breathing_section_quick(tmp_path):
    pytest.importorskip("biopeaks")
    methods = breathing_methods(quick=True)
    assert set(methods) == {"AR(p by AIC)", "persistence", LINEAR_ROW, NETWORK_ROW}
    assert methods["AR(p by AIC)"].order == "aic" and isinstance(methods[NETWORK_ROW].start, pr.inference.NARStart)
    res = run_demo(tmp_path, quick=True, workers=1, synthetic=False, echo=lambda *a: None)
    ds = res["respiration"]
    assert set(map(str, ds.method.values)) == set(methods)
    assert not any(str(e) for e in ds.error.values.ravel()), ds.error.values
    text = (tmp_path / "report.md").read_text()
    assert "regular breathing" in text and "730-770 s" in text
    assert "Linear or nonlinear?" in text and "AR(p by AIC)" in text
    para = linear_or_nonlinear(ds, steps_label=lambda h: f"{h * 0.04:.2g} s")
    assert para.startswith("**Linear or nonlinear?**") and ("linear model is enough" in para
                                                            or "earns its keep" in para)
    assert "(paired over targets, HAC SE)" in para  # the grid keeps per-target losses


def _fake_compare(logev: dict, crps: dict, se=0.01):
    """A compare-like Dataset with the fields the report reads (one seed, horizons 5 and 10)."""
    import numpy as np
    import xarray as xr

    names = list(logev)
    M, H = len(names), 2
    one = lambda v: (("method", "seed"), np.asarray(v, dtype=float).reshape(M, 1))  # noqa: E731
    per_h = lambda v: (("method", "seed", "horizon"), np.asarray(v, dtype=float).reshape(M, 1, H))  # noqa: E731
    return xr.Dataset(
        {"heldout_logev_per_step": one([logev[n] for n in names]),
         "heldout_logev_per_step_se": one([se] * M), "se_ok": one([1] * M),
         "wall_time_s": one([1.0] * M), "own_objective": one([0.0] * M),
         "error": (("method", "seed"), np.asarray([[""]] * M, dtype=object)),
         "own_evidence_kind": (("method",), np.asarray(["exact"] * M, dtype=object)),
         "crps": per_h([crps[n] for n in names]), "rmse": per_h([crps[n] for n in names]),
         "coverage_50": per_h([[0.5, 0.5]] * M), "coverage_90": per_h([[0.9, 0.9]] * M)},
        coords={"method": names, "seed": [0], "horizon": [5, 10]})


def test_linear_or_nonlinear_verdicts():
    lin = {"AR(p by AIC)": 1.0, LINEAR_ROW: 1.1}
    good = _fake_compare({**lin, NETWORK_ROW: 1.5},
                         {"AR(p by AIC)": [0.2, 0.3], LINEAR_ROW: [0.2, 0.3], NETWORK_ROW: [0.1, 0.2]})
    text = linear_or_nonlinear(good)
    assert "earns its keep: the network is better" in text and f"best linear model ({LINEAR_ROW})" in text
    assert "+0.400 nats/step" in text
    bad = _fake_compare({"AR(p by AIC)": 1.3, LINEAR_ROW: 1.1, NETWORK_ROW: 1.15},
                        {"AR(p by AIC)": [0.1, 0.2], LINEAR_ROW: [0.2, 0.3], NETWORK_ROW: [0.15, 0.25]})
    text = linear_or_nonlinear(bad)
    assert "a linear model is enough, and better" in text and "best linear model (AR(p by AIC))" in text
    tie = _fake_compare({"AR(p by AIC)": 1.0, LINEAR_ROW: 1.1, NETWORK_ROW: 1.11},
                        {"AR(p by AIC)": [0.2, 0.3], LINEAR_ROW: [0.2, 0.3], NETWORK_ROW: [0.19, 0.31]})
    assert "without a clear gain" in linear_or_nonlinear(tie)
    assert linear_or_nonlinear(_fake_compare({"AR(p by AIC)": 1.0}, {"AR(p by AIC)": [0.2, 0.3]})) == ""


def test_linear_or_nonlinear_pairs_the_forecasts_when_the_grid_keeps_losses():
    import numpy as np

    rng = np.random.default_rng(0)
    ds = _fake_compare({"AR(p by AIC)": 1.0, LINEAR_ROW: 1.1, NETWORK_ROW: 1.5},
                       {"AR(p by AIC)": [0.2, 0.3], LINEAR_ROW: [0.2, 0.3], NETWORK_ROW: [0.1, 0.2]})
    base = rng.gamma(2.0, 0.1, (1, 1, 2, 1, 400, 1))
    shift = np.asarray([0.0, 0.0, -0.05]).reshape(3, 1, 1, 1, 1, 1)  # the network is better by 0.05 per target
    ds["crps_by_target"] = (("method", "seed", "horizon", "sequence", "time", "obs"), base + shift)
    text = linear_or_nonlinear(ds)
    assert "5-step -0.0500 ± 0.0000, 10-step -0.0500 ± 0.0000 (paired over targets, HAC SE)" in text
    assert "earns its keep" in text


def test_verdict_pairs_the_winner_with_the_best_forecaster():
    import numpy as np

    from ppl_rnn.workbench.report import verdict

    rng = np.random.default_rng(1)
    ds = _fake_compare({"AR(p by AIC)": 1.0, NETWORK_ROW: 1.5}, {"AR(p by AIC)": [0.2, 0.3], NETWORK_ROW: [0.25, 0.35]})
    base = rng.gamma(2.0, 0.1, (1, 1, 2, 1, 300, 1))
    ds["crps_by_target"] = (("method", "seed", "horizon", "sequence", "time", "obs"),
                            base + np.asarray([0.0, 0.05]).reshape(2, 1, 1, 1, 1, 1))
    text = verdict(ds, reference=("AR(p by AIC)",))
    assert (f"paired over the test targets, {NETWORK_ROW} minus AR(p by AIC): +0.0500 ± 0.0000 (HAC SE), "
            "a significant difference") in text
    noisy = ds.copy()
    noisy["crps_by_target"] = (noisy["crps_by_target"].dims,
                               base + np.stack([np.zeros_like(base[0]), rng.normal(0, 0.5, base[0].shape)]))
    assert "within the noise of this test set" in verdict(noisy, reference=("AR(p by AIC)",))
