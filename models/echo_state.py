r"""The stochastic echo state network: a fixed random reservoir, a trained linear readout.

Jaeger (2001, 2004; ``docs/references.md``; the encyclopedia article's "Echo state network"): *a
recurrent network with a sparsely connected random hidden layer; the weights of the output neurons are the only
part of the network that can change and be trained*. With the leaky-integrator reservoir of Jaeger, Lukoševičius,
Popovici & Siewert (2007) and Gaussian noise:

.. math::
    x_t &= (1-a)\,x_{t-1} + a\tanh(W x_{t-1} + W_{in} u_t + b_{res}) + e_t,  &&e_t\sim N(0,\operatorname{diag} q^2)\\
    y_t &= C x_t + d + v_t,                                                   &&v_t\sim N(0,\operatorname{diag} r^2)\\
    x_0 &\sim N(0, \operatorname{diag} s_0^2)

* ``W`` (``H x H``): each entry non-zero with probability ``connectivity`` (standard normal), then scaled so
  its **spectral radius** (largest :math:`|\lambda|`) is ``spectral_radius``; ``W_in`` has entries
  :math:`\text{input\_scale}\cdot U(-1, 1)`; ``b_res`` :math:`\sim 0.1\,N(0,1)`; ``a`` = ``leak_rate`` in (0, 1].
  All four are **buffers** (fixed at construction; never parameters, never trained).
* Trained: the readout ``C, d`` and the noise scales ``q, r, s0``.

Because the reservoir is fixed, every parameter of the expected complete-data log-likelihood
:math:`\hat Q(\theta)=\sum_s w_s\log p_\theta(x^{(s)}, y)` has a closed-form maximiser given smoothed reservoir
trajectories (:meth:`EchoStateSSM.closed_form_mstep`): the readout is a weighted least-squares regression of
the observations on the reservoir states (per output, over observed entries), :math:`r^2` its residual
variance, :math:`q^2` the mean squared reservoir innovation :math:`x_t - f(x_{t-1})`, and :math:`s_0^2` the
second moment of :math:`x_0`. This is the ESN's "train the readout by linear regression", with the reservoir
states inferred instead of driven by teacher forcing.

Capabilities: diagonal-Gaussian shortcuts, linear-Gaussian emission, analytic Jacobians
(:math:`\operatorname{diag}(1-a) + a\operatorname{diag}(1-\tanh^2)W`), noise scales, the readout as ``weights``, the
closed-form M-step. No ``perturb`` (the recurrent weights are fixed) and no linear special case.
"""

from __future__ import annotations

import torch

from ppl_rnn.errors import ConfigurationError
from ppl_rnn.model import size_argument
from ppl_rnn.rng import check_seed

from ._rnn_common import GaussianRNNBase, check_real, initial_scale_mstep, readout_mstep, redeclare


@redeclare("transition_loc_scale")
class EchoStateSSM(GaussianRNNBase):
    """Stochastic leaky echo state network (module docstring).

    Args:
        hidden_dim: the reservoir size (keyword alias ``reservoir_dim``).
        obs_dim, input_dim: sizes.
        spectral_radius: of the reservoir matrix ``W`` (> 0; below about 1 for the echo state property).
        leak_rate: ``a`` in (0, 1].
        connectivity: probability that an entry of ``W`` is non-zero (each row keeps at least one).
        input_scale: scale of ``W_in``.
        process_noise, obs_noise, init_scale: initial ``q``, ``r``, ``s0``.
        seed: seed of the reservoir and the initial readout.
    """

    #: the reservoir is fixed, so there is nothing to perturb for a restart
    perturb = None

    def __init__(self, hidden_dim: int | None = None, obs_dim: int = 1, input_dim: int = 0, *,
                 reservoir_dim: int | None = None, spectral_radius: float = 0.9, leak_rate: float = 0.5,
                 connectivity: float = 0.2, input_scale: float = 1.0, process_noise=0.1, obs_noise=0.1,
                 init_scale=0.5, seed: int = 0):
        reservoir_dim = size_argument("EchoStateSSM", hidden_dim, "reservoir_dim", reservoir_dim)
        super().__init__(reservoir_dim, obs_dim, input_dim)
        self.spectral_radius = check_real(spectral_radius, "spectral_radius", open_low=True)
        self.leak_rate = check_real(leak_rate, "leak_rate", high=1.0, open_low=True)
        self.connectivity = check_real(connectivity, "connectivity", high=1.0, open_low=True)
        input_scale = check_real(input_scale, "input_scale")
        H, I = reservoir_dim, input_dim
        g = torch.Generator().manual_seed(check_seed(seed) or 0)
        dt = torch.get_default_dtype()
        mask = torch.rand(H, H, generator=g, dtype=torch.float64) < self.connectivity
        mask[torch.arange(H), torch.randint(0, H, (H,), generator=g)] = True
        W = torch.randn(H, H, generator=g, dtype=torch.float64) * mask
        rho = float(torch.linalg.eigvals(W).abs().max())
        if rho < 1e-12:
            raise ConfigurationError("the random reservoir is nilpotent (spectral radius 0); use another seed or a "
                                     "larger connectivity.")
        self.register_buffer("W_res", (W * (self.spectral_radius / rho)).to(dt))
        self.register_buffer("W_in", (input_scale * (2 * torch.rand(H, I, generator=g, dtype=torch.float64) - 1)).to(dt))
        self.register_buffer("b_res", (0.1 * torch.randn(H, generator=g, dtype=torch.float64)).to(dt))
        self._init_frame(g, process_noise=process_noise, obs_noise=obs_noise, init_scale=init_scale,
                         learn_initial_mean=False)

    def _act(self, x, u_t):
        z = x @ self.W_res.T + self.b_res
        if u_t is not None:
            z = z + u_t @ self.W_in.T
        return torch.tanh(z)

    def transition_mean(self, t, h_prev, u_t):
        r""":math:`(1-a)x_{t-1} + a\tanh(W x_{t-1} + W_{in}u_t + b_{res})`."""
        a = self.leak_rate
        return (1 - a) * h_prev + a * self._act(h_prev, u_t)

    def transition_jacobian(self, t, h_prev, u_t, mean=None):
        r""":math:`\operatorname{diag}(1-a) + a\operatorname{diag}(1-\tanh^2(\cdot))W`."""
        a = self.leak_rate
        s = self._act(h_prev, u_t)
        J = a * (1 - s * s).unsqueeze(-1) * self.W_res
        return J + (1 - a) * torch.eye(self.hidden_dim, dtype=J.dtype)

    @torch.no_grad()
    def closed_form_mstep(self, trajectories, observations, mask, inputs=None, *, weights=None,
                          transition_steps: int = 5, learn_initial: bool = True) -> float:
        r"""The exact maximiser of :math:`\hat Q` over the readout and the noise (module docstring), in place;
        returns :math:`\hat Q` at the new parameters. ``transition_steps`` is unused (the reservoir is fixed)."""
        h = trajectories.detach().to(self.dtype)
        S, B, T, H = h.shape
        dt = h.dtype
        w = torch.full((S,), 1.0 / S, dtype=dt) if weights is None else weights.detach().to(dt)
        w = w / w.sum()
        obj = readout_mstep(self, h, observations.to(dt), mask, w)
        obj += initial_scale_mstep(self, h[:, :, 0], w, learn_mean=False, learn_scale=learn_initial)
        if T < 2:
            return obj
        u = None if inputs is None else inputs[:, 1:T].to(dt)
        mean = self.transition_mean(None, h[:, :, :-1], u)
        N = B * (T - 1)
        q2 = (torch.einsum("s,sbth->h", w, (h[:, :, 1:] - mean) ** 2) / N).clamp_min(1e-12)
        self.set_noise_scales(process=q2.sqrt())
        obj -= 0.5 * float((N * (1 + torch.log(q2) + torch.log(torch.tensor(2 * torch.pi, dtype=dt)))).sum())
        return obj

    def __repr__(self) -> str:
        return (f"EchoStateSSM(reservoir_dim={self.hidden_dim}, obs_dim={self.obs_dim}, input_dim={self.input_dim}, "
                f"spectral_radius={self.spectral_radius}, leak_rate={self.leak_rate})")


__all__ = ["EchoStateSSM"]
