r"""The stochastic Elman network of Unkelbach, Yi & Schmidhuber (2009).

.. math::
    h_0 &\sim N(m_0, \operatorname{diag} s_0^2) \\
    h_t &= \phi(W h_{t-1} + U u_t + b) + e_t, \quad e_t \sim N(0, \operatorname{diag} q^2) \\
    y_t &= C h_t + d + v_t, \quad v_t \sim N(0, \operatorname{diag} r^2)

with :math:`\phi = \tanh` (``activation="tanh"``) or the identity (``activation="identity"``: the model
is then linear-Gaussian and exposes :meth:`ElmanSSM.linear_gaussian`, so every approximate method can be
checked against exact Kalman on it). The noise scales ``q``, ``r``, ``s0`` are positive ``PyroParam`` s.

The output map and noise variances enter the expected complete-data log-likelihood quadratically, so
given smoothed trajectories they have closed-form weighted-least-squares updates (the MCEM M-step;
:meth:`ElmanSSM.closed_form_mstep`).
"""

from __future__ import annotations

import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.nn import PyroParam

from ppl_rnn.errors import ConfigurationError, ModelCapabilityError
from ppl_rnn.model import LinearGaussianParams, StateSpaceModel

_ACTIVATIONS = {"tanh": torch.tanh, "identity": lambda x: x}


def _scale(v, n, name):
    t = torch.as_tensor(v, dtype=torch.get_default_dtype())
    if t.dim() == 0:
        t = t.expand(n)
    t = t.clone()
    if t.shape != (n,) or not bool((t > 0).all()):
        raise ConfigurationError(f"{name} must be a positive scalar or a positive vector of length {n}; found {v!r}.")
    return t


class ElmanSSM(StateSpaceModel):
    """Stochastic Elman network (see module docstring).

    Args:
        hidden_dim, obs_dim, input_dim: sizes.
        activation: ``"tanh"`` or ``"identity"``.
        process_noise: initial ``q`` (scalar or vector).
        obs_noise: initial ``r``.
        init_scale: initial ``s0``.
        weight_scale: recurrent weights ``W`` drawn as ``N(0, weight_scale^2 / hidden_dim)``.
        seed: seed of the random initial weights.
    """

    def __init__(
        self,
        hidden_dim: int,
        obs_dim: int = 1,
        input_dim: int = 0,
        *,
        activation: str = "tanh",
        process_noise=0.1,
        obs_noise=0.1,
        init_scale=1.0,
        weight_scale: float = 0.9,
        seed: int = 0,
    ):
        super().__init__(hidden_dim, obs_dim, input_dim)
        if activation not in _ACTIVATIONS:
            raise ConfigurationError(f"activation must be one of {sorted(_ACTIVATIONS)}; found {activation!r}.")
        self.activation = activation
        H, O, I = hidden_dim, obs_dim, input_dim
        g = torch.Generator().manual_seed(seed)
        dt = torch.get_default_dtype()
        self.W = PyroParam(weight_scale * torch.randn(H, H, generator=g, dtype=dt) / H**0.5)
        self.b = PyroParam(torch.zeros(H, dtype=dt))
        if I > 0:
            self.U = PyroParam(torch.randn(H, I, generator=g, dtype=dt) / max(I, 1) ** 0.5)
        self.C = PyroParam(torch.randn(O, H, generator=g, dtype=dt) / H**0.5)
        self.d = PyroParam(torch.zeros(O, dtype=dt))
        self.q = PyroParam(_scale(process_noise, H, "process_noise"), constraint=constraints.positive)
        self.r = PyroParam(_scale(obs_noise, O, "obs_noise"), constraint=constraints.positive)
        self.m0 = PyroParam(torch.zeros(H, dtype=dt))
        self.s0 = PyroParam(_scale(init_scale, H, "init_scale"), constraint=constraints.positive)

    # ---- conditionals --------------------------------------------------------------------
    def transition_mean(self, t, h_prev, u_t):
        r""":math:`\phi(W h_{t-1} + U u_t + b)`."""
        a = h_prev @ self.W.T + self.b
        if u_t is not None:
            a = a + u_t @ self.U.T
        return _ACTIVATIONS[self.activation](a)

    def initial(self, u0):
        return dist.Normal(self.m0, self.s0).to_event(1)

    def transition(self, t, h_prev, u_t):
        return dist.Normal(self.transition_mean(t, h_prev, u_t), self.q).to_event(1)

    def emission(self, t, h, u_t):
        return dist.Normal(h @ self.C.T + self.d, self.r).to_event(1)

    # ---- capabilities --------------------------------------------------------------------
    def linear_gaussian(self) -> LinearGaussianParams:
        if self.activation != "identity":
            raise ModelCapabilityError(
                f"ElmanSSM(activation={self.activation!r}) is nonlinear, so exact Kalman inference does not apply. "
                "Use ParticleSmoother or ExtendedKalmanSmoother, or build it with activation='identity'."
            )
        O = self.obs_dim
        return LinearGaussianParams(
            A=self.W, b=self.b, Q=torch.diag(self.q**2), C=self.C, d=self.d, R=torch.diag(self.r**2),
            m0=self.m0, P0=torch.diag(self.s0**2),
            B=self.U if self.input_dim else None,
            D=torch.zeros(O, self.input_dim, dtype=self.C.dtype) if self.input_dim else None,
        )
