r"""The stochastic Jordan network: context units fed back from the output layer.

Jordan (1986), as described in the encyclopedia article "Recurrent neural network" (``docs/references.md``; "Elman networks and
Jordan networks"): like the Elman network, but *the context units are fed from the output layer instead of the
hidden layer*, and each context unit has a recurrent connection to itself. With :math:`n` hidden units and a
context of the output's size :math:`D`:

.. math::
    a_t &= \phi(W c_{t-1} + U u_t + b) + e^a_t,            &&e^a_t\sim N(0,\operatorname{diag}q_a^2)\\
    c_t &= \mu\odot c_{t-1} + (C a_t + d) + e^c_t,          &&e^c_t\sim N(0,\operatorname{diag}q_c^2)\\
    y_t &= C a_t + d + v_t,                                  &&v_t\sim N(0,\operatorname{diag}r^2)

— the hidden layer :math:`a_t` sees the context :math:`c_{t-1}` (not its own past), the output layer is
:math:`o_t = C a_t + d` (the observation's mean), and the context integrates the outputs with self-connections
:math:`\mu\in(0,1)^D`.

**How the state is made Markov.** The context is a function of past *outputs*, so it is put in the state:
:math:`h_t = (a_t, c_t)` (``hidden_dim = n + D``, hidden units first). The context is fed from the network's
output :math:`o_t` (its noise-free output layer), not from the noisy observation :math:`y_t`, so the
observation stays a conditionally independent emission. Since :math:`c_t` depends on :math:`a_t` of the same
step, the transition is a *correlated* Gaussian given :math:`h_{t-1}`:

.. math::
    h_t\mid h_{t-1} \sim N\!\left(\begin{pmatrix} m_a \\ \mu\odot c_{t-1} + C m_a + d\end{pmatrix},\ L L^\top\right),
    \quad m_a = \phi(W c_{t-1} + U u_t + b),\quad
    L = \begin{pmatrix}\operatorname{diag} q_a & 0\\ C\operatorname{diag}q_a & \operatorname{diag} q_c\end{pmatrix}

(a ``MultivariateNormal`` with that lower-triangular ``scale_tril``), so the model has **no** diagonal
``transition_loc_scale`` shortcut; the EKF, particle methods and SVI take the distribution as it is. The
``process`` noise scales are the innovation scales :math:`(q_a, q_c)`. With ``activation="identity"`` the model
is linear-Gaussian and declares ``linear_gaussian`` (exact Kalman); it has no ``set_linear_gaussian`` /
``linear_special_case`` (a general linear-Gaussian fit does not project onto the Jordan structure).

Jacobian (analytic): :math:`\partial m_a/\partial a_{t-1}=0`, :math:`\partial m_a/\partial c_{t-1} =
\operatorname{diag}(\phi'(\cdot))W`, :math:`\partial m_c/\partial c_{t-1} = \operatorname{diag}\mu + C\,\partial m_a/\partial c_{t-1}`.
"""

from __future__ import annotations

import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.nn import PyroParam

from ppl_rnn.errors import ConfigurationError, ModelCapabilityError
from ppl_rnn.model import LinearGaussianParams, size_argument
from ppl_rnn.rng import check_seed

from ._rnn_common import GaussianRNNBase, check_real, redeclare

_ACT = {"tanh": torch.tanh, "identity": lambda x: x}


@redeclare("noise_scales", "set_noise_scales", "weights", "set_weights", "perturb")
class JordanSSM(GaussianRNNBase):
    """Stochastic Jordan network (module docstring). State ``(a, c)``: ``hidden_units`` hidden then ``obs_dim``
    context units.

    Args:
        hidden_dim: the number of hidden units ``n`` (keyword alias ``hidden_units``); the state dimension, the
            attribute ``self.hidden_dim``, is ``n + obs_dim`` (hidden then context units).
        obs_dim, input_dim: sizes.
        activation: ``"tanh"`` or ``"identity"`` (linear-Gaussian).
        context_decay: initial self-connection :math:`\\mu` of the context units, in (0, 1).
        weight_scale: ``W`` entries start as ``N(0, weight_scale^2 / D)``.
        process_noise, obs_noise, init_scale: initial ``(q_a, q_c)``, ``r``, ``s0``.
        seed: seed of the random initial weights.
    """

    recurrent_params = ("W",)

    def __init__(self, hidden_dim: int | None = None, obs_dim: int = 1, input_dim: int = 0, *,
                 hidden_units: int | None = None, activation: str = "tanh", context_decay: float = 0.5,
                 weight_scale: float = 1.0, process_noise=0.1, obs_noise=0.1, init_scale=1.0, seed: int = 0):
        hidden_units = size_argument("JordanSSM", hidden_dim, "hidden_units", hidden_units)
        if isinstance(obs_dim, bool) or not isinstance(obs_dim, int) or obs_dim < 1:
            raise ConfigurationError(f"obs_dim must be an int >= 1; found {obs_dim!r}.")
        super().__init__(hidden_units + obs_dim, obs_dim, input_dim)
        if activation not in _ACT:
            raise ConfigurationError(f"activation must be one of {sorted(_ACT)}; found {activation!r}.")
        check_real(context_decay, "context_decay", low=0.0, high=1.0, open_low=True)
        if context_decay >= 1:
            raise ConfigurationError(f"context_decay must be below 1; found {context_decay!r}.")
        weight_scale = check_real(weight_scale, "weight_scale")
        self.activation = activation
        self.hidden_units = n = hidden_units
        D, I = obs_dim, input_dim
        g = torch.Generator().manual_seed(check_seed(seed) or 0)
        dt = torch.get_default_dtype()
        self.W = PyroParam(weight_scale * torch.randn(n, D, generator=g, dtype=dt) / D**0.5)
        if I > 0:
            self.U = PyroParam(torch.randn(n, I, generator=g, dtype=dt) / I**0.5)
        self.b = PyroParam(torch.zeros(n, dtype=dt))
        self.mu = PyroParam(torch.full((D,), float(context_decay), dtype=dt), constraint=constraints.unit_interval)
        self._init_frame(g, readout=(0, n), process_noise=process_noise, obs_noise=obs_noise, init_scale=init_scale)

    def _hidden_pre(self, c, u_t):
        z = c @ self.W.T + self.b
        if u_t is not None:
            z = z + u_t @ self.U.T
        return z

    def transition_mean(self, t, h_prev, u_t):
        r""":math:`(m_a,\ \mu\odot c_{t-1} + C m_a + d)` with :math:`m_a = \phi(W c_{t-1} + U u_t + b)`."""
        n = self.hidden_units
        c = h_prev[..., n:]
        ma = _ACT[self.activation](self._hidden_pre(c, u_t))
        return torch.cat([ma, self.mu * c + ma @ self.C.T + self.d], -1)

    def transition_scale_tril(self) -> torch.Tensor:
        r""":math:`L = [[\operatorname{diag}q_a, 0], [C\operatorname{diag}q_a, \operatorname{diag}q_c]]`."""
        n, q = self.hidden_units, self.q
        qa, qc = q[:n], q[n:]
        top = torch.cat([torch.diag(qa), qa.new_zeros(n, self.obs_dim)], -1)
        bot = torch.cat([self.C * qa, torch.diag(qc)], -1)
        return torch.cat([top, bot], -2)

    def transition(self, t, h_prev, u_t):
        loc = self.transition_mean(t, h_prev, u_t)
        return dist.MultivariateNormal(loc, scale_tril=self.transition_scale_tril())

    conditional_parts = {"transition": ("transition_mean", "transition_scale_tril")}

    def transition_jacobian(self, t, h_prev, u_t, mean=None):
        """Analytic Jacobian of :meth:`transition_mean` (module docstring), ``(..., H, H)``."""
        n, D = self.hidden_units, self.obs_dim
        c = h_prev[..., n:]
        if self.activation == "identity":
            dma = self.W.expand(h_prev.shape[:-1] + self.W.shape)
        else:
            ma = torch.tanh(self._hidden_pre(c, u_t)) if mean is None else mean[..., :n]
            dma = (1 - ma * ma).unsqueeze(-1) * self.W  # (..., n, D)
        dmc = torch.diag_embed(self.mu.expand(c.shape)) + self.C @ dma  # (..., D, D)
        z = h_prev.new_zeros(h_prev.shape[:-1] + (n + D, n))
        return torch.cat([z, torch.cat([dma, dmc], -2)], -1)

    def capability_applies(self, name: str) -> bool:
        if name == "linear_gaussian":
            return self.activation == "identity"
        return True

    def linear_gaussian(self) -> LinearGaussianParams:
        r"""With ``activation="identity"``: :math:`A = [[0, W], [0, \operatorname{diag}\mu + CW]]`,
        :math:`b = (b, Cb + d)`, :math:`B = (U, CU)`, :math:`Q = LL^\top`, emission ``[C, 0]``, ``d``, ``diag r^2``."""
        if self.activation != "identity":
            raise ModelCapabilityError(
                "JordanSSM(activation='tanh') is nonlinear, so it has no linear-Gaussian form. Use ParticleSmoother "
                "or ExtendedKalmanSmoother, or build it with activation='identity'.")
        n, D = self.hidden_units, self.obs_dim
        W, C = self.W, self.C
        A = torch.cat([torch.cat([W.new_zeros(n, n), W], -1),
                       torch.cat([W.new_zeros(D, n), torch.diag(self.mu) + C @ W], -1)], -2)
        b = torch.cat([self.b, C @ self.b + self.d])
        Bm = torch.cat([self.U, C @ self.U], -2) if self.input_dim else None
        L = self.transition_scale_tril()
        return LinearGaussianParams(A=A, b=b, Q=L @ L.T, C=self._full_C(), d=self.d, R=torch.diag(self.r**2),
                                    m0=self.m0, P0=torch.diag(self.s0**2), B=Bm, D=None)

    def __repr__(self) -> str:
        return (f"JordanSSM(hidden_units={self.hidden_units}, obs_dim={self.obs_dim}, input_dim={self.input_dim}, "
                f"activation={self.activation!r})")


__all__ = ["JordanSSM"]
