"""The model suite: ElmanSSM and LinearGaussianSSM read like their equations; configuration errors."""

from __future__ import annotations

import pyro.distributions as dist
import pytest
import torch
from ppl_rnn.inference import KalmanSmoother
from ppl_rnn.models import ElmanSSM, LinearGaussianSSM

import ppl_rnn as pr
from ppl_rnn.errors import ConfigurationError, ModelCapabilityError


def test_elman_conditionals_are_the_equations(float64):
    torch.manual_seed(0)
    m = ElmanSSM(3, 2, 2, process_noise=[0.1, 0.2, 0.3], obs_noise=0.4, init_scale=2.0, seed=1)
    h = torch.randn(5, 4, 3)  # (particles, sequences, hidden)
    u = torch.randn(4, 2)
    tr = m.transition(1, h, u)
    assert isinstance(tr, dist.Independent) and tr.batch_shape == (5, 4) and tr.event_shape == (3,)
    torch.testing.assert_close(tr.mean, torch.tanh(h @ m.W.T + u @ m.U.T + m.b))
    torch.testing.assert_close(tr.stddev, torch.tensor([0.1, 0.2, 0.3]).expand(5, 4, 3))
    torch.testing.assert_close(m.transition_mean(1, h, u), tr.mean)
    em = m.emission(1, h, u)
    assert em.batch_shape == (5, 4) and em.event_shape == (2,)
    torch.testing.assert_close(em.mean, h @ m.C.T + m.d)
    torch.testing.assert_close(em.stddev, torch.full((5, 4, 2), 0.4))
    d0 = m.initial(None)
    torch.testing.assert_close(d0.stddev, torch.full((3,), 2.0))
    assert m.initial_batched(None, (4,)).batch_shape == (4,)
    lin = ElmanSSM(3, 2, activation="identity", seed=1)
    torch.testing.assert_close(lin.transition(1, h, None).mean, h @ lin.W.T + lin.b)


def test_elman_linear_gaussian_form(float64):
    m = ElmanSSM(3, 2, 1, activation="identity", process_noise=[0.1, 0.2, 0.3], obs_noise=[0.4, 0.5],
                 init_scale=2.0, seed=1)
    p = m.linear_gaussian()
    torch.testing.assert_close(p.A, m.W)
    torch.testing.assert_close(p.Q, torch.diag(torch.tensor([0.01, 0.04, 0.09])))
    torch.testing.assert_close(p.R, torch.diag(torch.tensor([0.16, 0.25])))
    torch.testing.assert_close(p.P0, 4.0 * torch.eye(3))
    torch.testing.assert_close(p.B, m.U)
    assert p.D is None and p.diagonal_noise  # the Elman emission has no input term
    with pytest.raises(ModelCapabilityError, match="nonlinear"):
        ElmanSSM(3, 2).linear_gaussian()


def test_linear_gaussian_model(float64):
    Q = torch.tensor([[0.5, 0.1], [0.1, 0.3]])
    R = torch.tensor([[0.2]])
    m = LinearGaussianSSM(2, 1, 1, A=0.5 * torch.eye(2), B=torch.ones(2, 1), D=2 * torch.ones(1, 1), Q=Q, R=R,
                          m0=torch.tensor([1.0, -1.0]))
    p = m.linear_gaussian()
    torch.testing.assert_close(p.Q, Q)
    torch.testing.assert_close(p.R, R)
    torch.testing.assert_close(p.P0, torch.eye(2))
    h, u = torch.randn(3, 2), torch.randn(3, 1)
    tr = m.transition(1, h, u)
    torch.testing.assert_close(tr.loc, 0.5 * h + u @ torch.ones(1, 2))
    torch.testing.assert_close(tr.covariance_matrix, Q.expand(3, 2, 2))
    torch.testing.assert_close(m.emission(1, h, u).loc, h @ m.C.T + 2 * u)
    torch.testing.assert_close(m.initial(None).mean, torch.tensor([1.0, -1.0]))
    # default A is stable with spectral radius 0.9
    assert abs(float(torch.linalg.eigvals(LinearGaussianSSM(4, 2, seed=3).A.detach()).abs().max()) - 0.9) < 1e-6


def test_parameters_live_on_the_module_and_can_be_set(float64):
    m = ElmanSSM(2, 1, seed=0)
    names = {k for k, _ in m.named_parameters()}
    assert {"W_unconstrained", "q_unconstrained", "r_unconstrained", "s0_unconstrained"} <= names
    m.q = torch.tensor([0.7, 0.8])
    torch.testing.assert_close(m.q, torch.tensor([0.7, 0.8]))
    # the positivity constraint: the unconstrained value is the log
    torch.testing.assert_close(dict(m.named_parameters())["q_unconstrained"].detach(), torch.log(m.q.detach()))
    lg = LinearGaussianSSM(2, 1, seed=0)
    lg.Q_tril = torch.tensor([[2.0, 0.0], [0.5, 1.0]])
    torch.testing.assert_close(lg.linear_gaussian().Q, torch.tensor([[4.0, 1.0], [1.0, 1.25]]))
    # every unconstrained value is a valid model
    with torch.no_grad():
        for _, prm in lg.named_parameters():
            prm.normal_()
    torch.linalg.cholesky(lg.linear_gaussian().Q)


def test_weights_are_deterministic_in_seed():
    a, b, c = ElmanSSM(3, seed=5), ElmanSSM(3, seed=5), ElmanSSM(3, seed=6)
    assert torch.equal(a.W, b.W) and not torch.equal(a.W, c.W)
    assert torch.equal(LinearGaussianSSM(2, 1, seed=1).A, LinearGaussianSSM(2, 1, seed=1).A)


def test_float32_default_and_double():
    m = ElmanSSM(2, 1)
    assert m.dtype == torch.get_default_dtype()
    y = m.simulate(5, seed=0).observations
    assert y.dtype == m.dtype
    m64 = ElmanSSM(2, 1, activation="identity").double()
    assert m64.dtype == torch.float64
    post = pr.infer(m64, y, method=KalmanSmoother())
    assert post.mean.dtype == torch.float64


@pytest.mark.parametrize(
    "build,match",
    [
        (lambda: ElmanSSM(0), "hidden_dim"),
        (lambda: ElmanSSM(2.5), "hidden_dim"),
        (lambda: ElmanSSM(True), "hidden_dim"),
        (lambda: ElmanSSM(2, 0), "obs_dim"),
        (lambda: ElmanSSM(2, 1, -1), "input_dim"),
        (lambda: ElmanSSM(2, activation="relu"), "activation"),
        (lambda: ElmanSSM(2, process_noise=0.0), "process_noise"),
        (lambda: ElmanSSM(2, process_noise=[0.1, -0.1]), "process_noise"),
        (lambda: ElmanSSM(2, obs_noise=[0.1, 0.2]), "obs_noise"),
        (lambda: ElmanSSM(2, obs_noise=float("inf")), "obs_noise"),
        (lambda: ElmanSSM(2, init_scale=float("nan")), "init_scale"),
        (lambda: ElmanSSM(2, weight_scale=-1.0), "weight_scale"),
        (lambda: ElmanSSM(2, weight_scale=float("nan")), "weight_scale"),
        (lambda: ElmanSSM(2, seed=-1), "seed"),
        (lambda: ElmanSSM(2, seed="a"), "seed"),
        (lambda: LinearGaussianSSM(2, 1, A=torch.eye(3)), "A has shape"),
        (lambda: LinearGaussianSSM(2, 1, A=torch.full((2, 2), float("nan"))), "A must be finite"),
        (lambda: LinearGaussianSSM(2, 1, Q=-torch.eye(2)), "Q must be symmetric positive definite"),
        (lambda: LinearGaussianSSM(2, 1, Q=torch.tensor([[1.0, 0.5], [0.4, 1.0]])), "Q must be symmetric"),
        (lambda: LinearGaussianSSM(2, 1, R=torch.eye(2)), "R has shape"),
        (lambda: LinearGaussianSSM(2, 1, R=torch.tensor([[float("inf")]])), "R must be finite"),
        (lambda: LinearGaussianSSM(2, 1, B=torch.ones(2, 1)), "input_dim"),
        (lambda: LinearGaussianSSM(2, 1, 1, B=torch.ones(2, 2)), "B has shape"),
        (lambda: LinearGaussianSSM(2, 1, seed=-3), "seed"),
    ],
)
def test_bad_configurations(build, match):
    with pytest.raises(ConfigurationError, match=match):
        build()


def test_elman_rotation_init_is_a_scaled_rotation_near_identity(float64):
    """weight_init="rotation": W = gain * expm(s (A - A^T)) is gain times an orthogonal matrix with small
    rotation angles (they grow with rotation_scale); seeded; bad options raise ConfigurationError."""
    m = ElmanSSM(6, 2, seed=3, weight_init="rotation", weight_scale=1.1, rotation_scale=0.1)
    W = m.W.detach()
    torch.testing.assert_close(W @ W.T, 1.21 * torch.eye(6), atol=1e-10, rtol=0)
    ang = torch.linalg.eigvals(W).angle().abs()
    wide = torch.linalg.eigvals(ElmanSSM(6, 2, seed=3, weight_init="rotation", rotation_scale=0.5).W.detach())
    assert ang.max() < 1.0 and ang.max() < wide.angle().abs().max()
    torch.testing.assert_close(ElmanSSM(6, 2, seed=3, weight_init="rotation", weight_scale=1.1,
                                        rotation_scale=0.1).W.detach(), W)
    g = ElmanSSM(6, 2, seed=3).W.detach()  # the default draw is unchanged: Gaussian, scale 0.9/sqrt(H)
    torch.testing.assert_close(g, 0.9 * torch.randn(6, 6, generator=torch.Generator().manual_seed(3)) / 6**0.5)
    with pytest.raises(ConfigurationError, match="weight_init"):
        ElmanSSM(2, 1, weight_init="orthogonal")
    with pytest.raises(ConfigurationError, match="rotation_scale"):
        ElmanSSM(2, 1, weight_init="rotation", rotation_scale=-1.0)
