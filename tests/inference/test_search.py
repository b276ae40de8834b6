"""The recommended strategy (``pr.fit(model, y)`` without a method): the start search on a held-back tail."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from ppl_rnn.inference.search import BelowReferenceWarning, Recommended, split_tail, tail_log_score
from ppl_rnn.models import ElmanSSM

import ppl_rnn as pr
import ppl_rnn.method
from ppl_rnn.data import prepare
from ppl_rnn.errors import ConfigurationError, DataError

from .test_mcem_local_level import LocalLevel, exact_log_lik
from .toy_models import NoWeights


def _small(**kw) -> Recommended:
    """Tiny settings; ranked by the one-step log score unless ``score=`` says otherwise (the CRPS tests below)."""
    opts = dict(num_iterations=1, search_iterations=1, num_particles=200, replicates=4, min_tail=40,
                score="log_score")
    return Recommended(**{**opts, **kw})


def _ar2(T: int = 300, seed: int = 0) -> torch.Tensor:
    """A series where AR(2) is the right model: y_t = 0.3 + 1.5 y_{t-1} - 0.75 y_{t-2} + 0.5 e_t."""
    rng = np.random.default_rng(seed)
    y = np.zeros(T + 100)
    for t in range(2, T + 100):
        y[t] = 0.3 + 1.5 * y[t - 1] - 0.75 * y[t - 2] + 0.5 * rng.standard_normal()
    return torch.tensor(y[100:, None], dtype=torch.float32)


def test_split_tail_holds_back_a_fifth_at_least_min_tail():
    assert split_tail(1000, 0.2, 50) == 800
    assert split_tail(200, 0.2, 50) == 150
    assert split_tail(60, 0.2, 50) == 30  # at most half


def test_tail_log_score_matches_the_exact_kalman_oracle():
    torch.manual_seed(0)
    model = LocalLevel(q=0.5, r=1.0)
    y = model.simulate(200, 1, seed=3).observations
    data = prepare(model, y, None)
    est, se, how = tail_log_score(model, data, 160, num_particles=2000, replicates=4, seed=0)
    yy = y[0, :, 0].double().numpy()
    exact = exact_log_lik(yy, 0.5, 1.0) - exact_log_lik(yy[:160], 0.5, 1.0)
    assert how == "particle_filter" and 0 < se < 0.05 * 40
    assert abs(est - exact) < 6 * se + 1e-3, (est, exact, se)


@pytest.mark.filterwarnings("ignore::ppl_rnn.inference.search.BelowReferenceWarning")
@pytest.mark.parametrize("num_seeds", [1, pytest.param(2, marks=pytest.mark.slow)])  # 2: about 12 s
def test_search_picks_the_best_tail_score_and_records_every_candidate(num_seeds):
    truth = ElmanSSM(3, seed=0)
    T = 160 if num_seeds == 2 else 120
    y = truth.simulate(T, seed=1).observations
    f = pr.fit(ElmanSSM(3, seed=5), y, method=_small(num_seeds=num_seeds, linear_iterations=5, num_particles=100),
               seed=0)
    s = f.diagnostics["search"]
    labels = [str(x) for x in s.label.values]
    # every start the Elman network's capabilities allow, num_seeds seeds of each randomised one, the references
    expect = {"ElmanSSM/given#0", "ElmanSSM/linear#0", "ElmanSSM/nar#0", "ElmanSSM/rotation#1",
              "linear SSM (H=3, KalmanEM)"}
    if num_seeds == 2:
        expect |= {"ElmanSSM/perturb#1", "ElmanSSM/nar#1", "ElmanSSM/rotation#2"}
    assert expect <= set(labels) and any(re.fullmatch(r"AR\(\d+\) by AIC", x) for x in labels), labels
    assert len(labels) == len(expect) + 1
    assert np.isfinite(s.tail_log_score.values).all() and (s.tail_log_score_se.values >= 0).all()
    assert (s.wall_time_s.values > 0).all() and int(s.attrs["tail_steps"]) == 40
    net = s.kind.values == "network"
    assert (s.tail_log_score_se.values[net] > 0).all() and (s.tail_log_score_se.values[~net] == 0).all()
    # successive halving: 7 candidates -> 4 -> 2 -> 1 (4 -> 2 -> 1); each round keeps the better half
    r = s.round_log_score_per_step.values[net]
    rounds = [1, 1, 1, 2, 2, 3, 3] if num_seeds == 2 else [1, 1, 2, 2]
    assert sorted(s.rounds.values[net].tolist()) == rounds and r.shape[1] == max(rounds)
    for j in range(1, max(rounds)):
        kept = np.isfinite(r[:, j])
        assert r[kept, j - 1].min() >= r[np.isfinite(r[:, j - 1]) & ~kept, j - 1].max()
    # the chosen candidate is the network with the best tail score in the last round (references scored beside it)
    last = net & (s.rounds.values == s.rounds.values[net].max())
    best = int(np.argmax(np.where(last, s.tail_log_score.values, -np.inf)))
    assert bool(s.chosen.values[best]) and int(s.chosen.values.sum()) == 1
    assert f.diagnostics["search_choice"] == labels[best]
    assert s.tail_log_score.values[best] != s.tail_log_score.values[last].min()  # distinct: the choice matters
    assert f.diagnostics["search_candidate_models"][0] is not None and isinstance(f.model, ElmanSSM)
    # the final fit ran on the whole training part from the chosen candidate's parameters
    assert f.posterior is None or f.posterior.mean.shape[1] == T


def test_reference_guard_on_an_ar2_series():
    y = _ar2()
    with pytest.warns(BelowReferenceWarning, match="no network candidate beats the best linear reference"):
        f = pr.fit(NoWeights(), y, method=_small(), seed=0)
    d = f.diagnostics
    assert d["search_beats_reference"] is False and isinstance(f.model, NoWeights)
    assert re.fullmatch(r"AR\(\d+\) by AIC", d["reference_label"]) and "below it" in d["search_verdict"]
    # the reference's score is the AR's own conditional likelihood of the tail steps (fitted on the head)
    head = 300 - int(d["search_tail_steps"])
    ar = pr.fit(NoWeights(), y[:head], method=pr.inference.LinearAR(order="aic"), seed=0)
    phi, c, sig = (np.asarray(ar.diagnostics[k], dtype=float).reshape(-1) for k in ("phi", "c", "sigma"))
    yy = y[:, 0].double().numpy()
    p = len(phi)
    mean = np.array([c[0] + phi @ yy[t - p:t][::-1] for t in range(head, 300)])
    exact = float(np.sum(-0.5 * np.log(2 * np.pi * sig[0] ** 2) - 0.5 * (yy[head:] - mean) ** 2 / sig[0] ** 2))
    assert d["reference_tail_log_score"] == pytest.approx(exact, abs=1e-4)  # float32 fit
    s = d["search"]
    assert float(s.tail_log_score.values[0]) < d["reference_tail_log_score"]
    # asked for the reference itself: the AR, refitted on the whole training part
    with pytest.warns(BelowReferenceWarning, match="Returning the reference"):
        g = pr.fit(NoWeights(), y, method=_small(below_reference="reference"), seed=0)
    assert g.method == "linear_ar" and type(g.model).__name__ == "ARStateSpace"
    assert g.diagnostics["search_choice"] == d["reference_label"]


def test_default_trainer_runs_the_search_on_a_user_model_without_capabilities(monkeypatch):
    assert isinstance(ppl_rnn.method.default_trainer(), Recommended)
    monkeypatch.setattr(ppl_rnn.method, "_DEFAULT_TRAINER", lambda: _small(num_iterations=2))
    y = LocalLevel(q=0.5, r=1.0).simulate(150, 1, seed=0).observations
    f = pr.fit(LocalLevel(q=1.0, r=1.0), y, seed=0)  # no method: the default trainer
    s = f.diagnostics["search"]
    assert [str(x) for x in s.kind.values] == ["network", "reference"]  # the model as given, and AR by AIC
    assert str(s.label.values[0]) == "LocalLevel/given#0" and isinstance(f.model, LocalLevel)
    assert set(f.diagnostics["search_skipped"]) == {"LocalLevel/perturb", "LocalLevel/linear", "LocalLevel/nar",
                                                    "LocalLevel/rotation"}
    assert f.trace.sizes["iteration"] == 3  # the final fit: num_iterations=2 on the whole training part
    assert math.isfinite(f.diagnostics["reference_tail_log_score"])


def test_fit_a_list_returns_the_better_model():
    y = LocalLevel(q=0.3, r=0.1).simulate(200, 1, seed=2).observations  # NoWeights (unit noises) is clearly wrong
    f = pr.fit([NoWeights(), LocalLevel(q=0.3, r=0.1)], y, method=_small(), seed=0)
    s = f.diagnostics["search"]
    assert [str(x) for x in s.label.values[:2]] == ["NoWeights/given#0", "LocalLevel/given#0"]
    assert s.tail_log_score.values[1] > s.tail_log_score.values[0] + 20
    assert f.diagnostics["search_choice"] == "LocalLevel/given#0" and isinstance(f.model, LocalLevel)


def test_a_list_needs_a_searching_method():
    y = LocalLevel().simulate(60, 1, seed=0).observations
    with pytest.raises(ConfigurationError, match="fit_models"):
        pr.fit([LocalLevel(), NoWeights()], y, method=pr.inference.MonteCarloEM(num_iterations=1))
    with pytest.raises(ConfigurationError, match="below_reference"):
        Recommended(below_reference="ar")
    with pytest.raises(ConfigurationError, match="tail"):
        Recommended(tail=0.7)
    with pytest.raises(ConfigurationError, match="score must be 'crps'"):
        Recommended(score="mse")
    with pytest.raises(ConfigurationError, match="horizons must be positive integers"):
        Recommended(horizons=[0, 1])
    with pytest.raises(DataError, match=r"holds back the last 8 of 16 training steps.*horizons up to 10"):
        pr.fit(LocalLevel(), LocalLevel().simulate(16, 1, seed=0).observations, method=Recommended(), seed=0)


def test_the_default_ranks_by_tail_crps_with_rounds_that_double():
    assert Recommended().score == "crps" and Recommended().horizons == tuple(range(1, 11))
    truth = ElmanSSM(3, seed=0)
    y = truth.simulate(120, seed=1).observations
    method = _small(score="crps", horizons=(1, 3), num_iterations=4, search_iterations=1, linear_iterations=5,
                    num_particles=100)
    f = pr.fit(ElmanSSM(3, seed=5), y, method=method, seed=0)
    s = f.diagnostics["search"]
    net = s.kind.values == "network"
    crps = s.tail_crps.values
    assert np.isfinite(crps).all() and (crps > 0).all() and s.tail_crps_by_lead.shape == (len(crps), 2)
    np.testing.assert_allclose(crps, s.tail_crps_by_lead.values.mean(1))
    # rounds of 1, 2, 4 iterations (7 -> 4 -> 2 -> 1 candidates): a candidate's iterations are 1, 3 or 7
    assert sorted(s.iterations.values[net].tolist()) == [1, 1, 1, 3, 3, 7, 7] and s.attrs["score"] == "crps"
    # each round keeps the lower tail CRPS; the choice is the best of the last round
    r = s.round_tail_crps.values[net]
    for j in range(1, r.shape[1]):
        kept = np.isfinite(r[:, j])
        assert r[kept, j - 1].max() <= r[np.isfinite(r[:, j - 1]) & ~kept, j - 1].min()
    best = int(np.argmax(s.chosen.values))
    assert s.iterations.values[best] == 7 and f.diagnostics["search_choice"] == str(s.label.values[best])
    # the references' CRPS is the yardstick's on the same split (the AR refitted on the head agrees exactly)
    head = int(s.attrs["head_steps"])
    ar = pr.fit(ElmanSSM(3, seed=5), y[:, :head], method=pr.inference.LinearAR(order="aic"), seed=0)
    ev = pr.evaluate(ar.model, y[:, :head], y[:, head:], horizons=(1, 3), num_particles=100, num_replicates=4,
                     seed=0)
    i_ar = int(np.flatnonzero(~net)[0])  # the first reference row: AR by AIC
    assert str(s.label.values[i_ar]).startswith("AR(")
    np.testing.assert_allclose(s.tail_crps_by_lead.values[i_ar], ev.crps.values, rtol=1e-6)


def test_reference_guard_by_crps_on_an_ar2_series():
    y = _ar2()
    with pytest.warns(BelowReferenceWarning, match="mean CRPS over leads 1-2"):
        f = pr.fit(NoWeights(), y, method=_small(score="crps", horizons=(1, 2)), seed=0)
    d = f.diagnostics
    assert d["search_beats_reference"] is False and d["reference_tail_crps"] < float(d["search"].tail_crps.values[0])
