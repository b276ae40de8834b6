"""EKF / EKS against the exact Kalman oracle, EKF-EM, capability errors, numerical safety."""

import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from ppl_rnn.inference.complete_data import complete_data_log_likelihood
from ppl_rnn.inference.ekf import extended_kalman_filter
from ppl_rnn.inference.kalman import kalman_filter, rts_smoother
from ppl_rnn.models import ElmanSSM, LinearGaussianSSM

import ppl_rnn as pr
from ppl_rnn.errors import DataError, ModelCapabilityError
from ppl_rnn.gaussian import NumericalJitterWarning, ensure_pd, linearize

from .gradcheck import assert_gradient_matches


def _lg_with_inputs():
    g = torch.Generator().manual_seed(3)
    H, D, I = 3, 2, 2
    A = 0.5 * torch.randn(H, H, generator=g, dtype=torch.float64)
    Q = torch.eye(H) * 0.2 + 0.05
    R = torch.eye(D) * 0.3 + 0.1
    return LinearGaussianSSM(H, D, I, A=A, B=torch.randn(H, I, generator=g), D=torch.randn(D, I, generator=g),
                             b=torch.randn(H, generator=g), d=torch.randn(D, generator=g), Q=Q, R=R,
                             m0=torch.randn(H, generator=g), P0=torch.eye(H) * 0.7)


def _missing(y, frac=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = y.clone()
    y[torch.rand(y.shape, generator=g) < frac] = float("nan")
    y[:, 4] = float("nan")  # one fully missing step
    return y


@pytest.mark.parametrize("kind", ["lg_inputs", "elman_identity", "elman_identity_scalar_obs"])
def test_ekf_eks_equal_kalman(float64, kind):
    if kind == "lg_inputs":
        model = _lg_with_inputs()
        u = torch.randn(2, 30, 2, generator=torch.Generator().manual_seed(1))
    elif kind == "elman_identity":
        model = ElmanSSM(3, 2, activation="identity", process_noise=0.3, obs_noise=0.4, seed=2)
        u = None
    else:  # obs_dim 1: the EKF's scalar update (analytic Jacobians) against the Kalman filter's Cholesky update
        model = ElmanSSM(3, 1, 2, activation="identity", process_noise=0.3, obs_noise=0.4, seed=2)
        u = torch.randn(2, 30, 2, generator=torch.Generator().manual_seed(1))
    sim = model.simulate(30, num_sequences=2, inputs=u, seed=0)
    y = _missing(sim.observations)
    data = pr.prepare(model, y, u)
    with torch.no_grad():
        p = model.linear_gaussian()
        kf = kalman_filter(p, data.observations, data.mask, data.inputs)
        ks = rts_smoother(p.A, kf)
    post_f = pr.infer(model, y, inputs=u, method=pr.inference.ExtendedKalmanFilter())
    post_s = pr.infer(model, y, inputs=u, method=pr.inference.ExtendedKalmanSmoother())
    tol = dict(atol=1e-8, rtol=0)
    torch.testing.assert_close(post_f.mean, kf.filt_mean, **tol)
    torch.testing.assert_close(post_f.cov, kf.filt_cov, **tol)
    torch.testing.assert_close(post_f.diagnostics["pred_mean"], kf.pred_mean, **tol)
    torch.testing.assert_close(post_f.diagnostics["pred_cov"], kf.pred_cov, **tol)
    torch.testing.assert_close(post_f.log_evidence, kf.log_evidence, **tol)
    torch.testing.assert_close(post_f.diagnostics["log_lik"], kf.log_lik, **tol)
    torch.testing.assert_close(post_s.mean, ks.mean, **tol)
    torch.testing.assert_close(post_s.cov, ks.cov, **tol)
    torch.testing.assert_close(post_s.cross_cov, ks.cross_cov, **tol)
    torch.testing.assert_close(post_s.log_evidence, kf.log_evidence, **tol)
    assert post_f.evidence_kind == post_s.evidence_kind == "approximation"
    assert post_s.kind == "smoothing" and post_f.kind == "filtering"
    # FFBS draws: right shape, mean within 6 SE of the smoothed mean
    S = 2000
    paths = post_s.sample(S, seed=0)
    assert paths.shape == (S, 2, 30, model.hidden_dim)
    se = (post_s.var / S).sqrt()
    assert ((paths.mean(0) - post_s.mean).abs() < 6 * se).all()


def test_ekf_jacobian_of_nonlinear_model(float64):
    model = ElmanSSM(3, 2, weight_scale=1.5, seed=4)
    h = torch.randn(5, 3, dtype=torch.float64)
    mu, J, cov = linearize(lambda z: model.transition(1, z, None), h)
    for b in range(5):
        ref = torch.autograd.functional.jacobian(lambda x: model.transition_mean(1, x, None), h[b])
        torch.testing.assert_close(J[b], ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(cov[0], torch.diag(model.q.detach() ** 2))


class _AutogradElman(ElmanSSM):
    """ElmanSSM without its analytic-Jacobian capability: the EKF differentiates its conditionals by autograd."""

    transition_jacobian = None
    emission_jacobian = None


@pytest.mark.parametrize("cls", [ElmanSSM, _AutogradElman])
def test_ekf_log_lik_gradient_equals_finite_difference(float64, cls):
    """The autograd gradient of the EKF log-likelihood of a tanh network (analytic Jacobians, or autograd
    Jacobians with a double-backward graph) equals its central finite difference along random directions."""
    model = cls(3, 2, 1, weight_scale=1.5, process_noise=0.2, obs_noise=0.3, seed=4)
    u = torch.randn(2, 12, 1, generator=torch.Generator().manual_seed(0))
    y = _missing(model.simulate(12, num_sequences=2, inputs=u, seed=0).observations, frac=0.2)
    data = pr.prepare(model, y, u)
    params = [p for p in model.parameters() if p.requires_grad]

    def loglik():
        return extended_kalman_filter(model, data.observations, data.mask, data.inputs).log_evidence.sum()

    assert_gradient_matches(loglik(), loglik, params)


@pytest.mark.parametrize("D", [1, 2])
def test_ekf_gradient_on_linear_model_equals_finite_difference_of_exact_evidence(float64, D):
    """On a linear-Gaussian model (ElmanSSM, identity activation, scalar and vector observations) the EKF
    log-likelihood is the exact log-evidence: its autograd gradient equals the finite difference of the exact
    Kalman log-evidence (an independent code path), missing entries and inputs included."""
    model = ElmanSSM(3, D, 2, activation="identity", process_noise=0.3, obs_noise=0.4, seed=2)
    u = torch.randn(2, 15, 2, generator=torch.Generator().manual_seed(1))
    y = _missing(model.simulate(15, num_sequences=2, inputs=u, seed=0).observations, frac=0.2)
    data = pr.prepare(model, y, u)
    params = [p for p in model.parameters() if p.requires_grad]
    ekf = extended_kalman_filter(model, data.observations, data.mask, data.inputs).log_evidence.sum()

    def exact():
        p = model.linear_gaussian()
        return kalman_filter(p, data.observations, data.mask, data.inputs).log_evidence.sum()

    assert_gradient_matches(ekf, exact, params, seeds=(0, 1))


@pytest.mark.parametrize("obs_dim", [1, 2])
def test_analytic_jacobians_equal_autograd_path(float64, obs_dim):
    """The ElmanSSM capability (diag(1 - tanh^2) W, C) gives the same EKF, values and parameter gradients."""
    kw = dict(weight_scale=1.5, process_noise=0.2, obs_noise=0.3, seed=4)
    fast, slow = ElmanSSM(3, obs_dim, 2, **kw), _AutogradElman(3, obs_dim, 2, **kw)
    slow.load_state_dict(fast.state_dict())
    u = torch.randn(2, 25, 2, generator=torch.Generator().manual_seed(0))
    y = _missing(fast.simulate(25, num_sequences=2, inputs=u, seed=1).observations, frac=0.2)
    h = torch.randn(5, 3, dtype=torch.float64)
    u5 = torch.randn(5, 2, dtype=torch.float64)
    _, J, _ = linearize(lambda z: slow.transition(1, z, u5), h)
    torch.testing.assert_close(fast.transition_jacobian(1, h, u5), J, atol=1e-10, rtol=0)
    _, G, _ = linearize(lambda z: slow.emission(1, z, u5), h)
    torch.testing.assert_close(fast.emission_jacobian(1, h, u5), G, atol=1e-10, rtol=0)
    assert slow.transition_jacobian is None  # the subclass really takes the autograd path
    out = []
    for model in (fast, slow):
        data = pr.prepare(model, y, u)
        f = extended_kalman_filter(model, data.observations, data.mask, data.inputs)
        loss = f.log_evidence.sum() + f.filt_cov.sum() + f.transition_jacobian.pow(2).sum()
        grads = torch.autograd.grad(loss, [model.W_unconstrained, model.U_unconstrained, model.C_unconstrained,
                                           model.q_unconstrained, model.r_unconstrained])
        out.append((f, grads))
    (fa, ga), (fs, gs) = out
    for name in ("pred_mean", "pred_cov", "filt_mean", "filt_cov", "log_lik", "transition_jacobian"):
        torch.testing.assert_close(getattr(fa, name), getattr(fs, name), atol=1e-10, rtol=0, msg=name)
    for a, b in zip(ga, gs, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


class _OverriddenTransition(ElmanSSM):
    def transition(self, t, h_prev, u_t):
        return dist.Normal(torch.sin(h_prev @ self.W.T), self.q).to_event(1)


def test_analytic_jacobian_not_used_for_a_subclass_that_overrides_the_transition(float64):
    model = _OverriddenTransition(2, 1, seed=0)
    from ppl_rnn.capabilities import capability

    assert capability(model, "transition_jacobian") is None and capability(model, "emission_jacobian") is not None
    assert capability(ElmanSSM(2, 1), "transition_jacobian") is not None
    y = model.simulate(10, seed=0).observations
    data = pr.prepare(model, y)
    with torch.no_grad():
        f = extended_kalman_filter(model, data.observations, data.mask)
    m = f.filt_mean[:, 3]
    ref = torch.cos(m @ model.W.T).unsqueeze(-1) * model.W
    torch.testing.assert_close(f.transition_jacobian[:, 4], ref, atol=1e-12, rtol=0)


class _PoissonEmission(ElmanSSM):
    def emission(self, t, h, u_t):
        return dist.Poisson(torch.exp(h @ self.C.T)).to_event(1)


def test_non_gaussian_emission_raises():
    model = _PoissonEmission(2, 1)
    y = torch.ones(1, 5, 1)
    with pytest.raises(ModelCapabilityError, match="emission.*Poisson"):
        pr.infer(model, y, method=pr.inference.ExtendedKalmanSmoother())


def test_ensure_pd_adds_jitter_with_warning(float64):
    P = torch.tensor([[1.0, 1.0], [1.0, 1.0 - 1e-14]])
    with pytest.warns(NumericalJitterWarning):
        Pj = ensure_pd(P)
    torch.linalg.cholesky(Pj)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ensure_pd(torch.eye(2)).equal(torch.eye(2))


def test_complete_data_log_likelihood_matches_pyro_trace(float64):
    model = ElmanSSM(2, 2, seed=1)
    sim = model.simulate(6, num_sequences=3, seed=1)
    y = sim.observations.clone()
    y[0, 2, 1] = float("nan")
    data = pr.prepare(model, y)
    traj = sim.states.unsqueeze(0)
    lp = complete_data_log_likelihood(model, traj, data)
    cond = pyro.poutine.condition(model, data={f"h_{t}": sim.states[:, t] for t in range(6)})
    tr = pyro.poutine.trace(cond).get_trace(y)
    tr.compute_log_prob()
    ref = sum(s["log_prob"] for s in tr.nodes.values() if s["type"] == "sample")
    torch.testing.assert_close(lp[0], ref)


@pytest.mark.parametrize("num_samples", [10, 0])
def test_ekf_em_increases_ekf_log_lik(num_samples):
    truth = ElmanSSM(2, 1, process_noise=0.2, obs_noise=0.2, weight_scale=1.2, seed=7)
    y = truth.simulate(60, num_sequences=2, seed=3).observations
    init = ElmanSSM(2, 1, process_noise=0.5, obs_noise=0.5, seed=11)
    before = {k: v.clone() for k, v in init.state_dict().items()}
    fit = pr.fit(init, y, method=pr.inference.EKFEM(num_iterations=8, num_samples=num_samples, mstep_steps=15,
                                                    lr=0.05), seed=0)
    obj = fit.trace["objective"].values
    assert fit.evidence_kind == "approximation"
    assert len(obj) == 9 and obj[-1] > obj[0] + 5.0, obj
    post = pr.infer(fit.model, y, method=pr.inference.ExtendedKalmanFilter())
    assert abs(float(post.log_evidence.sum()) - obj[-1]) < 1e-4
    assert "W" in fit.trace and fit.trace["W"].dims == ("iteration", "W_dim_0", "W_dim_1")
    assert all(torch.equal(v, init.state_dict()[k]) for k, v in before.items())  # input model untouched
    assert fit.posterior is not None and fit.posterior.kind == "smoothing"
    assert len(pyro.get_param_store().keys()) == 0


@pytest.mark.parametrize("activation", ["identity", "tanh"])
def test_ekf_eks_huge_observations_raise_data_error(activation):
    """float32 EKF/EKS on data around 1e19 and above: a DataError naming the scale and the fix, not -inf."""
    m = ElmanSSM(2, 1, activation=activation, seed=0)
    base = torch.randn(20, 1, generator=torch.Generator().manual_seed(0))
    for method in (pr.inference.ExtendedKalmanFilter(), pr.inference.ExtendedKalmanSmoother()):
        for scale in (1e19, 1e25):
            with pytest.raises(DataError, match=r"(?s)reach \|y\| = .*float32.*standardise.*double"):
                pr.infer(m, base * scale, method=method)
        assert torch.isfinite(pr.infer(m, base * 1e3, method=method).log_evidence).all()
        assert torch.isfinite(pr.infer(m.copy().double(), (base * 1e19).double(), method=method).log_evidence).all()
