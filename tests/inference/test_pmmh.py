"""PMMH, plain and correlated (inference/pmmh.py), against the exact oracle of pmcmc_oracle.py; the parameter
posterior's ArviZ export and posterior predictive."""

from __future__ import annotations

import math

import arviz as az
import numpy as np
import pytest
import torch
from ppl_rnn.inference.pmmh import PMMH, AuxiliaryNormals, RandomWalk, log_likelihood_estimate

import ppl_rnn as pr
from ppl_rnn.data import prepare
from ppl_rnn.errors import ConfigurationError, ModelCapabilityError
from ppl_rnn.priors import ParameterSpace
from ppl_rnn.rng import seeded

from .pmcmc_oracle import LinearGaussian1D, exact_posterior, kalman_log_likelihood, mc_se, oracle_data, rhat


def _fixed(q=0.6, r=0.33):
    m = LinearGaussian1D()
    sp = ParameterSpace(m)
    return m, sp, sp.fixed(m, sp.unconstrain({"q": torch.tensor(q), "r": torch.tensor(r)}))


def test_options_are_validated():
    with pytest.raises(ConfigurationError, match="correlation"):
        PMMH(correlation=1.0)
    with pytest.raises(ConfigurationError, match="num_particles"):
        PMMH(num_particles=0)
    with pytest.raises(ConfigurationError, match="init"):
        PMMH(init="somewhere")
    with pytest.raises(ConfigurationError, match="target_accept"):
        RandomWalk(target_accept=1.5)
    with pytest.raises(ConfigurationError, match="walk must be a RandomWalk"):
        PMMH(walk=0.1)
    with pytest.raises(ConfigurationError, match="no parameter priors"):
        pr.infer(pr.models.ElmanSSM(1, 1), oracle_data(T=5), method=PMMH(5, warmup=0, num_chains=1), seed=0)


def test_correlated_estimate_is_a_function_of_theta_and_u_and_unbiased():
    """Given the normals U the estimate is deterministic (no other randomness); over U, E[Z-hat] = Z (Kalman):
    the mean of Z-hat / Z over independent U is 1 within 4 standard errors."""
    _, _, f = _fixed()
    y = oracle_data()
    data = prepare(f, y)
    with seeded(0):
        aux = AuxiliaryNormals.draw(60, 100, 1, 1)
        a = log_likelihood_estimate(f, data, 100, aux=aux).log_evidence
        torch.rand(5)  # moving the global RNG changes nothing
        b = log_likelihood_estimate(f, data, 100, aux=aux).log_evidence
        assert torch.equal(a, b)
        exact = float(kalman_log_likelihood(y.reshape(-1).numpy(), np.array(0.6), np.array(0.33)))
        lls = torch.stack([log_likelihood_estimate(f, data, 100, aux=AuxiliaryNormals.draw(60, 100, 1, 1)).log_evidence
                           for _ in range(200)]).double().reshape(-1)
    ratio = (lls - exact).exp()
    se = float(ratio.std()) / math.sqrt(ratio.numel())
    assert abs(float(ratio.mean()) - 1.0) < 4 * se, (float(ratio.mean()), se)


def test_correlated_estimates_at_fixed_theta_are_correlated():
    """Acceptance: at fixed theta, the log-likelihood estimates at U and at its Crank-Nicolson move U' (rho = 0.99)
    have correlation >= 0.9 (over 60 independent pairs, U ~ N(0, I)); with a fresh U' (plain PMMH) it is near 0,
    so the statistic can fail."""
    _, _, f = _fixed()
    data = prepare(f, oracle_data())
    a, b, fresh = [], [], []
    with seeded(1):
        for _ in range(60):
            aux = AuxiliaryNormals.draw(60, 100, 1, 1)
            a.append(float(log_likelihood_estimate(f, data, 100, aux=aux).log_evidence.sum()))
            b.append(float(log_likelihood_estimate(f, data, 100, aux=aux.crank_nicolson(0.99)).log_evidence.sum()))
            fresh.append(float(log_likelihood_estimate(f, data, 100, aux=AuxiliaryNormals.draw(60, 100, 1, 1))
                               .log_evidence.sum()))
    assert np.corrcoef(a, b)[0, 1] >= 0.9
    assert abs(np.corrcoef(a, fresh)[0, 1]) < 0.35


@pytest.mark.parametrize(("dims", "bits"), [(2, 3), (3, 2), (4, 2)])
def test_hilbert_index_is_a_bijection_through_neighbouring_cells(dims, bits):
    """The sort key of correlated resampling for H > 1: every cell of the grid gets its own index, and cells with
    consecutive indices are neighbours (Manhattan distance 1)."""
    import itertools

    from ppl_rnn.inference.pmmh import hilbert_index

    cells = torch.tensor(list(itertools.product(range(1 << bits), repeat=dims)))
    key = hilbert_index(cells, bits)
    assert sorted(key.tolist()) == list(range((1 << bits) ** dims))
    walk = cells[torch.argsort(key)]
    assert int((walk[1:] - walk[:-1]).abs().sum(-1).max()) == 1


def test_correlated_needs_gaussian_laws():
    class StudentT1D(LinearGaussian1D):
        def transition(self, t, h_prev, u_t):
            import pyro.distributions as dist

            return dist.StudentT(3.0, 0.9 * h_prev, self.q * torch.ones_like(h_prev)).to_event(1)

    m = StudentT1D()
    with pytest.raises(ModelCapabilityError, match="Gaussian transition"):
        pr.infer(m, oracle_data(T=8), method=PMMH(2, warmup=0, num_chains=1, correlation=0.9, num_particles=8,
                                                  init="model"), seed=0)


def test_correlated_acceptance_beats_plain_at_the_same_particles():
    """Acceptance: with the same fixed random walk (no adaptation) and N = 30 particles, correlated PMMH
    (rho = 0.99) accepts more often than plain PMMH (its estimate's noise at theta and theta' largely cancels)."""
    m = LinearGaussian1D()
    y = oracle_data()
    opts = dict(num_chains=1, warmup=0, num_particles=30, walk=RandomWalk(0.15, adapt=False), init="model",
                init_scale=0.0, proposal="bootstrap")
    plain = pr.infer(m, y, method=PMMH(200, **opts), seed=3)
    corr = pr.infer(m, y, method=PMMH(200, correlation=0.99, **opts), seed=3)
    a_plain = float(plain.sample_stats["accepted"].double().mean())
    a_corr = float(corr.sample_stats["accepted"].double().mean())
    assert a_corr > a_plain + 0.1, (a_plain, a_corr)


@pytest.fixture(scope="module")
def short_posterior():
    m = LinearGaussian1D()
    y = oracle_data(T=30)
    return pr.infer(m, y, method=PMMH(60, num_chains=2, warmup=30, num_particles=32, keep_paths=True), seed=0)


def test_result_shapes_and_seed(short_posterior):
    post = short_posterior
    assert post.num_chains == 2 and post.num_draws == 60 and post.method == "pmmh"
    assert post.draws["q"].shape == (2, 60) and bool((post.draws["r"] > 0).all())
    assert post.log_likelihood.shape == (2, 60, 1, 30) and post.paths.shape == (2, 60, 1, 30, 1)
    for k in ("acceptance_rate", "accepted", "log_likelihood_estimate", "lp", "step_size"):
        assert post.sample_stats[k].shape == (2, 60), k
    # the pointwise increments sum to the estimate the chain carried
    assert torch.allclose(post.log_likelihood.sum((-2, -1)), post.sample_stats["log_likelihood_estimate"],
                          atol=1e-3)
    f = post.model_at(1, 7)
    assert float(f.q) == pytest.approx(float(post.draws["q"][1, 7]), rel=1e-6)
    assert len(post.models(5)) == 5
    again = pr.infer(LinearGaussian1D(), oracle_data(T=30),
                     method=PMMH(60, num_chains=2, warmup=30, num_particles=32, keep_paths=True), seed=0)
    assert torch.equal(again.draws["q"], post.draws["q"])


@pytest.mark.filterwarnings("ignore:Estimated shape parameter of Pareto")  # 120 draws of a short run
def test_arviz_summary_rhat_ess_trace_loo(short_posterior):
    idata = pr.to_inference_data(short_posterior)
    for g in ("posterior", "sample_stats", "log_likelihood", "observed_data"):
        assert g in idata.groups(), g
    assert idata.posterior["q"].dims == ("chain", "draw") and idata.posterior["h"].sizes["time"] == 30
    assert idata.log_likelihood["y_onestep"].dims == ("chain", "draw", "sequence", "time")
    assert idata.sample_stats["acceptance_rate"].dims == ("chain", "draw")
    summ = az.summary(idata, var_names=["q", "r"])
    assert list(summ.index) == ["q", "r"] and {"r_hat", "ess_bulk", "mcse_mean"} <= set(summ.columns)
    assert float(az.rhat(idata, var_names=["q"])["q"]) > 0
    assert float(az.ess(idata, var_names=["r"])["r"]) > 0
    assert np.isfinite(az.loo(idata, pointwise=False).elpd_loo)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes = az.plot_trace(idata, var_names=["q", "r"])
    assert axes.shape == (2, 2)
    plt.close("all")


def test_posterior_predictive_forecast_evaluate_and_fit(short_posterior):
    y = oracle_data(T=40)
    fc = pr.forecast(short_posterior, y[:, :30], horizon=4, num_samples=60, seed=0)
    assert fc.samples.shape == (60, 1, 4, 1) and fc.method.startswith("linear pool")
    ev = pr.evaluate(short_posterior, y[:, :30], y[:, 30:], horizons=(1, 2), num_particles=200, max_particles=None,
                     num_replicates=2, se_tol=None, num_samples=20, seed=0)
    assert ev.attrs["ensemble_size"] == 20 and np.isfinite(float(ev["heldout_logev_per_step"]))
    fit = pr.fit(LinearGaussian1D(), y[:, :30], method=PMMH(10, num_chains=1, warmup=5, num_particles=16), seed=0)
    assert isinstance(fit.model, pr.ParameterPosterior) and fit.trace.sizes["iteration"] == 10
    assert "posterior" in pr.to_inference_data(fit).groups()
    grid = pr.compare(LinearGaussian1D(), y[:, :30], y[:, 30:], methods={"PMMH": PMMH(10, num_chains=1, warmup=5,
                      num_particles=16)}, seeds=[0], horizons=(1, 2), num_particles=100, max_particles=None,
                      num_replicates=2, se_tol=None, num_samples=10)
    assert str(grid["error"].values.item()) == "" and np.isfinite(grid["heldout_logev_per_step"].values).all()


class AdaptedLinearGaussian1D(LinearGaussian1D):
    """The oracle model declaring its linear-Gaussian emission, so the default filter is fully adapted."""

    def linear_gaussian_emission(self, t, u_t):
        return torch.ones(1, 1), torch.zeros(1), (self.r**2).reshape(1, 1)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["plain", "correlated"])
def test_exact_oracle_posterior_means_and_rhat(variant):
    """Acceptance: PMMH's posterior means of q and r within 4 MC SE (ESS-based) of the exact posterior (2-D
    quadrature of the Kalman likelihood); R-hat <= 1.05 over 4 chains. Plain PMMH with the fully adapted filter
    (the model declares its linear-Gaussian emission; 50 particles), correlated PMMH (rho = 0.99) with the
    bootstrap filter on its normals (100 particles)."""
    y = oracle_data()
    exact = exact_posterior(y)
    if variant == "plain":
        model, method = AdaptedLinearGaussian1D(), PMMH(1000, num_chains=4, warmup=500, num_particles=50)
    else:
        model, method = LinearGaussian1D(), PMMH(1500, num_chains=4, warmup=750, num_particles=100, correlation=0.99)
    post = pr.infer(model, y, method=method, seed=0)
    for k in ("q", "r"):
        d = post.draws[k]
        se = mc_se(d)
        assert abs(float(d.double().mean()) - exact[k][0]) < 4 * se, (k, float(d.mean()), exact[k], se)
        assert se < 0.25 * exact[k][1]  # the tolerance is informative: ESS >= 16
        assert rhat(d) <= 1.05, (k, rhat(d))


@pytest.mark.slow
def test_nuts_on_the_program_agrees_with_the_oracle():
    """Pyro's NUTS on the Bayesian model's own Pyro program (latent h_0..h_59 and q, r; JIT-compiled): posterior
    means of q and r within 4 MC SE of the quadrature. (The centred program mixes slowly in r, whose small values
    pin h to y: its ESS is a few dozen at most, so the r check is the weaker one.)"""
    from pyro.infer import MCMC, NUTS

    y = oracle_data()
    exact = exact_posterior(y)
    with seeded(0):
        kernel = NUTS(LinearGaussian1D(), max_tree_depth=6, jit_compile=True, ignore_jit_warnings=True)
        mcmc = MCMC(kernel, num_samples=300, warmup_steps=200, num_chains=1, disable_progbar=True)
        mcmc.run(y)
    s = mcmc.get_samples(group_by_chain=True)
    for k in ("q", "r"):
        d = s[k].reshape(1, -1)
        se = mc_se(d)
        assert abs(float(d.double().mean()) - exact[k][0]) < 4 * se, (k, float(d.mean()), exact[k], se)
    assert mc_se(s["q"].reshape(1, -1)) < 0.25 * exact["q"][1]
