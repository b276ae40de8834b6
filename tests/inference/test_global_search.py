"""GlobalSearch: CMA-ES, genetic algorithm, simulated annealing, particle swarm on the weight vector, float64.

* every strategy reduces the one-step error of the noise-free network on a noise-free sine well below the initial
  network's (fixed seeds) and returns a model the common evaluator can score (noise floor, ML observation noise);
* the stopping rules of the texts (target error, learnt fraction, maximum generations, stagnation);
* the vectorised population score equals member-by-member evaluation; reproducibility; the caller's RNG state;
* capability errors and option validation.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from ppl_rnn.inference.global_search import STRATEGIES, GlobalSearch
from ppl_rnn.inference.rtrl import FlatWeights
from ppl_rnn.models import ElmanSSM, LinearGaussianSSM

import ppl_rnn as pr
from ppl_rnn.data import prepare
from ppl_rnn.errors import ConfigurationError, ModelCapabilityError

from .toy_models import NoWeights


def _sine(T=60):
    t = torch.arange(T, dtype=torch.float64)
    return (0.8 * torch.sin(2 * math.pi * t / 25)).unsqueeze(-1)


def _init():
    return ElmanSSM(4, 1, seed=1, weight_init="rotation", weight_scale=1.1)


def _driven(T=40):
    """A small input-driven tanh network simulated with tiny noise (nearly deterministic dynamics)."""
    teacher = ElmanSSM(3, 1, input_dim=1, seed=5, process_noise=1e-3, obs_noise=1e-3, init_scale=1e-3)
    u = torch.randn(1, T, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return teacher.simulate(T, 1, inputs=u, seed=0).observations, u


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_reduces_the_training_error(float64, strategy):
    y, u = _driven()
    init = ElmanSSM(3, 1, input_dim=1, seed=1)
    before = init.weights().clone()
    fit = pr.fit(init, y, inputs=u, method=GlobalSearch(strategy=strategy, population_size=16, max_generations=40),
                 seed=0)
    d = fit.diagnostics
    assert d["best_mse"] < 0.4 * d["initial_mse"], d
    assert d["vectorised"]
    mse = fit.trace.mse.values
    assert mse[0] == pytest.approx(d["initial_mse"]) and mse[-1] == pytest.approx(d["best_mse"])
    assert np.all(np.diff(mse) <= 0)  # best so far
    torch.testing.assert_close(init.weights(), before)  # the input model is untouched
    scales = fit.model.noise_scales()
    assert torch.allclose(scales["process"], torch.tensor(1e-4, dtype=torch.float64))
    assert float(scales["obs"][0].detach()) ** 2 == pytest.approx(d["best_mse"], rel=1e-6)
    assert fit.method == f"global_search_{strategy}" and fit.evidence_kind == "approximation"


def test_stopping_rules(float64):
    y = _sine(40)
    init = _init()
    base = dict(strategy="genetic", population_size=8, max_generations=30)
    fit = pr.fit(init, y, method=GlobalSearch(**base), seed=0)
    assert fit.diagnostics["stop_reason"] == "max_generations" and not fit.converged
    assert fit.diagnostics["generations"] == 30 and fit.trace.sizes["iteration"] == 31
    target = 0.9 * fit.diagnostics["initial_mse"]
    fit = pr.fit(init, y, method=GlobalSearch(**base, target_mse=target), seed=0)
    assert fit.diagnostics["stop_reason"] == "target_mse" and fit.converged
    assert fit.diagnostics["best_mse"] <= target and fit.diagnostics["generations"] < 30
    fit = pr.fit(init, y, method=GlobalSearch(**base, target_fraction=1.0, fraction_tolerance=10.0), seed=0)
    assert fit.diagnostics["stop_reason"] == "target_fraction" and fit.diagnostics["generations"] == 1
    fit = pr.fit(init, y, method=GlobalSearch(**base, patience=3, min_improvement=0.99), seed=0)
    assert fit.diagnostics["stop_reason"] == "stagnation" and fit.diagnostics["generations"] == 3


def test_population_score_is_vectorised_and_exact(float64):
    for m in (_init(), LinearGaussianSSM(2, 2, seed=3)):
        y = m.simulate(20, 2, seed=0).observations
        data = prepare(m, y)
        fw = FlatWeights(m, needed_by="test")
        X = fw.vector() + 0.3 * torch.randn(5, fw.num_weights, generator=torch.Generator().manual_seed(0),
                                            dtype=torch.float64)
        pop, vectorised = fw.population_predictions(X, data)
        assert vectorised and pop.shape == (5, 2, 20, m.obs_dim)
        for k in range(5):
            mk = m.copy()
            mk.set_weights(X[k])
            fk = FlatWeights(mk, needed_by="test")
            torch.testing.assert_close(pop[k], fk.predictions(fk.vector(), data).detach(), rtol=1e-12, atol=1e-12)


def test_reproducible_and_leaves_the_callers_rng_alone(float64):
    y = _sine(30)
    np.random.seed(123)
    torch.manual_seed(123)
    state, tstate = np.random.get_state()[1].copy(), torch.get_rng_state().clone()
    a = pr.fit(_init(), y, method=GlobalSearch(strategy="cma", max_generations=5), seed=4)
    b = pr.fit(_init(), y, method=GlobalSearch(strategy="cma", max_generations=5), seed=4)
    torch.testing.assert_close(a.model.weights(), b.model.weights(), rtol=0, atol=0)
    assert np.array_equal(np.random.get_state()[1], state) and torch.equal(torch.get_rng_state(), tstate)




@pytest.mark.parametrize("strategy", STRATEGIES)
def test_model_without_weight_vector_gets_a_capability_error(float64, strategy):
    with pytest.raises(ModelCapabilityError, match=r"GlobalSearch\(strategy=.*needs the model capability weights"):
        pr.fit(NoWeights(), torch.zeros(5, 1), method=GlobalSearch(strategy=strategy, max_generations=1))


def test_options_are_validated():
    for bad in ({"strategy": "hill"}, {"population_size": 1}, {"max_generations": 0}, {"sigma": 0},
                {"target_fraction": 1.5}, {"mutation_rate": 2.0}, {"selection": "rank"},
                {"strategy": "genetic", "population_size": 4, "elite": 4}, {"patience": 0}):
        with pytest.raises(ConfigurationError):
            GlobalSearch(**bad)


def test_roulette_selection_also_learns(float64):
    """Fitness-proportional selection on 1/MSE, the texts' fitness, on a noise-free sine (autonomous oscillator)."""
    fit = pr.fit(_init(), _sine(), method=GlobalSearch(strategy="genetic", selection="roulette",
                                                       population_size=16, max_generations=40), seed=0)
    assert fit.diagnostics["best_mse"] < 0.5 * fit.diagnostics["initial_mse"]


def test_scale_matrix_model_gets_the_residual_covariance(float64):
    """LinearGaussianSSM (observation noise as a Cholesky factor): the fitted R is the residual covariance of the
    noise-free rollout at the best weights."""
    m = LinearGaussianSSM(2, 2, seed=3)
    y = m.simulate(30, 2, seed=0).observations
    fit = pr.fit(m, y, method=GlobalSearch(strategy="genetic", population_size=8, max_generations=10), seed=0)
    assert fit.diagnostics["best_mse"] < fit.diagnostics["initial_mse"]
    data = prepare(m, y)
    fw = FlatWeights(fit.model, needed_by="test")
    r = (fw.predictions(fw.vector(), data).detach() - data.observations).reshape(-1, 2)
    L = fit.model.noise_scales()["obs"].detach()
    torch.testing.assert_close(L @ L.T, r.T @ r / r.shape[0] + 1e-8 * torch.eye(2), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", ["jordan", "echo_state", "gru", "lstm", "ctrnn", "mtrnn", "second_order", "stacked"])
def test_every_suite_model_with_a_weight_vector_is_searched_vectorised(float64, name):
    from tests.inference.test_rtrl import _suite

    m = _suite()[name]()
    u = torch.randn(1, 15, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = m.simulate(15, 1, inputs=u, seed=0).observations
    fit = pr.fit(m, y, inputs=u, method=GlobalSearch(strategy="swarm", population_size=6, max_generations=3),
                 seed=0)
    assert fit.diagnostics["vectorised"] and fit.diagnostics["best_mse"] <= fit.diagnostics["initial_mse"]
    assert fit.model.noise_scales()["process"].detach().max() <= 1e-4 * (1 + 1e-9)
