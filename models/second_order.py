r"""The stochastic second-order recurrent network: multiplicative input-by-state weights :math:`w_{ijk}`.

Giles et al. (1992; ``docs/references.md``), as quoted in the encyclopedia article "Recurrent neural network"
("Second Order Recurrent Neural Network"): *second order RNNs use higher order weights* :math:`w_{ijk}` *instead of the standard*
:math:`w_{ij}` *weights, and inputs and states can be a product*. With the input augmented by a constant,
:math:`\tilde u_t = (1, u_t)` (so the :math:`k=0` slice is an ordinary first-order recurrent matrix and the model
runs without inputs too):

.. math::
    h_t &= \phi\Big(\sum_{j,k} w_{ijk}\, h_{t-1,j}\,\tilde u_{t,k} + b_i\Big) + e_t,\quad e_t\sim N(0,\operatorname{diag}q^2)\\
    y_t &= C h_t + d + v_t,\quad v_t\sim N(0,\operatorname{diag}r^2),\qquad h_0\sim N(m_0,\operatorname{diag}s_0^2)

:math:`\phi=\tanh`: each input selects (mixes) a recurrent matrix :math:`M(\tilde u_t) = \sum_k w_{\cdot\cdot k}\tilde u_{t,k}`,
the direct mapping to a finite-state machine's input-dependent transitions. Jacobian (analytic):
:math:`\operatorname{diag}(1-h^2)\,M(\tilde u_t)` with :math:`h` the mean. With ``activation="identity"`` and inputs the
model is linear but time-varying (:math:`A_t = M(\tilde u_t)`), which the time-invariant linear-Gaussian form of
the contract cannot express, so no linear special case is declared.
"""

from __future__ import annotations

import torch
from pyro.nn import PyroParam

from ppl_rnn.errors import ConfigurationError
from ppl_rnn.rng import check_seed

from ._rnn_common import GaussianRNNBase, check_real, redeclare

_ACT = {"tanh": torch.tanh, "identity": lambda x: x}


@redeclare("transition_loc_scale")
class SecondOrderSSM(GaussianRNNBase):
    """Stochastic second-order RNN (module docstring).

    Args:
        hidden_dim, obs_dim, input_dim: sizes.
        activation: ``"tanh"`` or ``"identity"``.
        weight_scale: the first-order slice ``w[:, :, 0]`` starts as ``N(0, weight_scale^2 / H)``, the
            multiplicative slices as ``N(0, 0.5^2 / (H I))``.
        process_noise, obs_noise, init_scale: initial ``q``, ``r``, ``s0``.
        seed: seed of the random initial weights.
    """

    recurrent_params = ("W3",)

    def __init__(self, hidden_dim: int, obs_dim: int = 1, input_dim: int = 0, *, activation: str = "tanh",
                 weight_scale: float = 0.9, process_noise=0.1, obs_noise=0.1, init_scale=1.0, seed: int = 0):
        super().__init__(hidden_dim, obs_dim, input_dim)
        if activation not in _ACT:
            raise ConfigurationError(f"activation must be one of {sorted(_ACT)}; found {activation!r}.")
        weight_scale = check_real(weight_scale, "weight_scale")
        self.activation = activation
        H, I = hidden_dim, input_dim
        g = torch.Generator().manual_seed(check_seed(seed) or 0)
        dt = torch.get_default_dtype()
        W3 = torch.randn(H, H, I + 1, generator=g, dtype=dt)
        W3[..., 0] *= weight_scale / H**0.5
        W3[..., 1:] *= 0.5 / (H * max(I, 1)) ** 0.5
        self.W3 = PyroParam(W3)
        self.b = PyroParam(torch.zeros(H, dtype=dt))
        self._init_frame(g, process_noise=process_noise, obs_noise=obs_noise, init_scale=init_scale)

    def recurrent_matrix(self, u_t):
        r""":math:`M(\tilde u_t)_{ij} = \sum_k w_{ijk}\tilde u_{t,k}`, ``(..., H, H)``."""
        if u_t is None:
            return self.W3[..., 0]
        ut = torch.cat([torch.ones(u_t.shape[:-1] + (1,), dtype=u_t.dtype), u_t], -1)
        return torch.einsum("ijk,...k->...ij", self.W3, ut)

    def transition_mean(self, t, h_prev, u_t):
        r""":math:`\phi(M(\tilde u_t) h_{t-1} + b)`."""
        M = self.recurrent_matrix(u_t)
        return _ACT[self.activation]((M @ h_prev.unsqueeze(-1)).squeeze(-1) + self.b)

    def transition_jacobian(self, t, h_prev, u_t, mean=None):
        r""":math:`\operatorname{diag}(\phi'(\cdot))\,M(\tilde u_t)`, ``(..., H, H)``."""
        M = self.recurrent_matrix(u_t)
        if self.activation == "identity":
            return M.expand(h_prev.shape[:-1] + M.shape[-2:])
        m = self.transition_mean(t, h_prev, u_t) if mean is None else mean
        return (1 - m * m).unsqueeze(-1) * M

    def __repr__(self) -> str:
        return (f"SecondOrderSSM(hidden_dim={self.hidden_dim}, obs_dim={self.obs_dim}, input_dim={self.input_dim}, "
                f"activation={self.activation!r})")


__all__ = ["SecondOrderSSM"]
