"""Priors the Pyro way (ppl_rnn.priors): with_priors, parameter_priors, the unconstrained ParameterSpace and the
fixed models the particle filter runs on."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from ppl_rnn.inference.complete_data import complete_data_log_likelihood
from pyro.nn import PyroSample

import ppl_rnn as pr
from ppl_rnn.data import prepare
from ppl_rnn.errors import ConfigurationError
from ppl_rnn.priors import FIXED_ATTR, ParameterSpace, parameter_priors, with_priors
from tests.inference.pmcmc_oracle import LinearGaussian1D


def _elman(activation="tanh"):
    return pr.models.ElmanSSM(2, 1, activation=activation, seed=0).double()


def test_with_priors_gives_every_parameter_a_default_prior_and_leaves_the_input_alone():
    m = _elman()
    b = with_priors(m, scale=2.0)
    pri = parameter_priors(b)
    assert set(pri) == {"W", "b", "C", "d", "q", "r", "m0", "s0"}
    assert parameter_priors(m) == {}  # the input model keeps its PyroParams
    assert isinstance(pri["q"].base_dist, dist.HalfNormal) and bool((pri["q"].base_dist.scale == 2.0).all())
    assert isinstance(pri["W"].base_dist, dist.Normal) and bool((pri["W"].base_dist.scale == 2.0).all())
    for name, d in pri.items():  # one event per parameter, with the parameter's shape
        assert d.batch_shape == () and d.event_shape == getattr(m, name).shape, name
    assert list(b.parameters()) == []


def test_with_priors_mapping_overrides_and_fixes():
    m = _elman()
    b = with_priors(m, priors={"q": dist.Gamma(2.0, 4.0), "W": None}, others="fixed")
    pri = parameter_priors(b)
    assert set(pri) == {"q"}
    assert isinstance(pri["q"].base_dist, dist.Gamma) and pri["q"].event_shape == (2,)
    assert torch.equal(b.W, m.W)  # kept fixed at its value (still a parameter)
    b2 = with_priors(m, priors={"W": None})
    assert "W" not in parameter_priors(b2) and "q" in parameter_priors(b2)


def test_with_priors_errors_name_the_argument():
    m = _elman()
    with pytest.raises(ConfigurationError, match="not parameters of ElmanSSM"):
        with_priors(m, priors={"nope": dist.Normal(0.0, 1.0)})
    with pytest.raises(ConfigurationError, match="has shape"):
        with_priors(m, priors={"W": dist.Normal(torch.zeros(3), 1.0).to_event(1)})
    with pytest.raises(ConfigurationError, match="scale must be a positive number"):
        with_priors(m, scale=0.0)
    with pytest.raises(ConfigurationError, match="no parameter priors"):
        ParameterSpace(m)


def test_pyro_trace_has_parameter_sites_with_their_own_shapes():
    """The Bayesian model is a Pyro program whose parameter sites are sampled once, outside the plate of
    sequences (a prior read first inside the plate would be broadcast over it)."""
    b = with_priors(_elman())
    y = torch.randn(3, 5, 1, dtype=torch.float64)
    tr = pyro.poutine.trace(b).get_trace(y)
    for name, d in parameter_priors(b).items():
        assert tr.nodes[name]["type"] == "sample"
        assert tr.nodes[name]["value"].shape == d.event_shape, name
    assert tr.nodes["h_4"]["value"].shape == (3, 2)


def test_parameter_space_round_trip_and_log_prior_is_prior_plus_log_jacobian():
    m = LinearGaussian1D()
    sp = ParameterSpace(m)
    assert sp.names == ("q", "r") and sp.dim == 2
    z = torch.tensor([[-0.3, 0.7], [1.2, -2.0]], dtype=torch.float64)
    vals = sp.values(z)
    assert torch.allclose(vals["q"], z[:, 0].exp()) and torch.allclose(vals["r"], z[:, 1].exp())
    assert torch.allclose(sp.unconstrain(vals), z)
    hn = dist.HalfNormal(torch.tensor(1.0, dtype=torch.float64))
    want = (hn.log_prob(z.exp()) + z).sum(-1)  # log p(exp z) + log|d exp z / dz|
    assert torch.allclose(sp.log_prior(z), want)
    assert torch.allclose(sp.log_prior(z[1]), want[1])
    # the density of z integrates to 1 (trapezoid rule on a wide 2-D grid)
    g = torch.linspace(-20, 4, 1201, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1)  # (G, G, 2)
    dens = sp.log_prior(grid).exp()
    assert abs(float(torch.trapezoid(torch.trapezoid(dens, g), g)) - 1.0) < 1e-6


def test_start_values_are_the_former_parameters():
    m = _elman()
    b = with_priors(m)
    sp = ParameterSpace(b)
    f = sp.fixed(b)
    for n in sp.names:
        assert torch.allclose(getattr(f, n), getattr(m, n)), n
    user = LinearGaussian1D()
    assert ParameterSpace(user).to_unconstrained(user).tolist() == [0.0, 0.0]  # T(0) = 1 for HalfNormal sites
    with pytest.raises(ConfigurationError, match="no prior sites"):
        sp.to_unconstrained(user)


def test_fixed_model_scores_exactly_like_the_plain_model():
    """The fixed copy at the former values is the same model: exact Kalman log-evidence to rounding."""
    m = _elman("identity")
    b = with_priors(m)
    sp = ParameterSpace(b)
    f = sp.fixed(b)
    assert parameter_priors(f) == {} and getattr(f, FIXED_ATTR) == sp.names
    y = m.simulate(30, seed=1).observations
    le_m = pr.infer(m, y, method=pr.inference.KalmanFilter()).log_evidence
    le_f = pr.infer(f, y, method=pr.inference.KalmanFilter()).log_evidence
    assert torch.allclose(le_m, le_f, rtol=0, atol=1e-10)
    # the particle filter runs the fixed copy in the model's dtype (float64 buffers, no parameters): same draws
    pf = pr.inference.ParticleFilter(50, proposal="bootstrap")
    pf_m = pr.infer(m, y, method=pf, seed=4).log_evidence
    pf_f = pr.infer(f, y, method=pf, seed=4).log_evidence
    assert pf_f.dtype == torch.float64 and torch.allclose(pf_m, pf_f, rtol=0, atol=1e-10)
    # moving z moves the model (in place for a fixed model, a copy for the Bayesian one)
    z = sp.to_unconstrained(f)
    z2 = z.clone()
    assert sp.names[0] == "W"
    z2[0] += 0.5  # the first entry is W[0, 0] (real: T is the identity)
    g = sp.load(f, z2)
    assert g is f and float(f.W[0, 0]) == pytest.approx(float(m.W[0, 0].detach()) + 0.5)
    assert sp.load(b, z) is not b
    le_g = pr.infer(f, y, method=pr.inference.KalmanFilter()).log_evidence
    assert not torch.allclose(le_g, le_m)
    assert len(sp.load(b, torch.stack([z, z2]))) == 2


def test_load_is_differentiable_in_z():
    """log p(h, y | theta(z)) by autograd through load equals a central finite difference."""
    m = _elman()
    b = with_priors(m)
    sp = ParameterSpace(b)
    work = sp.fixed(b)
    sim = m.simulate(12, num_sequences=2, seed=3)
    data = prepare(m, sim.observations)
    paths = sim.states.unsqueeze(0)

    def f(z):
        return complete_data_log_likelihood(sp.load(work, z), paths, data).sum()

    z = sp.to_unconstrained(b).requires_grad_(True)
    (grad,) = torch.autograd.grad(f(z), z)
    eps = 1e-6
    for i in range(sp.dim):
        e = torch.zeros(sp.dim, dtype=torch.float64)
        e[i] = eps
        with torch.no_grad():
            fd = (f(z.detach() + e) - f(z.detach() - e)) / (2 * eps)
        assert float(grad[i]) == pytest.approx(float(fd), rel=1e-5, abs=1e-6), sp.names


def test_user_pyrosample_model_filter_runs_on_plain_tensors():
    m = LinearGaussian1D()
    m.extra = PyroSample(dist.Normal(0.0, 1.0))  # an unused site is still a parameter of the program
    assert list(parameter_priors(m)) == ["q", "r", "extra"]
    del m.extra
    sp = ParameterSpace(m)
    f = sp.fixed(m, sp.unconstrain({"q": torch.tensor(0.5), "r": torch.tensor(0.3)}))
    assert float(f.q) == pytest.approx(0.5) and float(f.r) == pytest.approx(0.3)
    assert float(f.q) == float(f.q)  # a plain tensor: reading it twice draws nothing
    y = torch.randn(1, 10, 1)
    post = pr.infer(f, y, method=pr.inference.ParticleFilter(64), seed=0)
    assert torch.isfinite(post.log_evidence).all()
    assert math.isfinite(float(sp.log_prior(sp.to_unconstrained(f))))
