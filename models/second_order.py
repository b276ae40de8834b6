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
the contract cannot express, so no linear special case is declared there; without inputs the model is an Elman
network (:math:`W = w_{\cdot\cdot0}`) and declares ``linear_gaussian`` / ``set_linear_gaussian`` (identity) and
``linear_special_case`` / ``embed_linear`` (the linear warm start). The mean is affine in
:math:`(w, b)` given the features :math:`h_{t-1}\otimes\tilde u_t`, so the Levenberg-Marquardt M-step
(``closed_form_mstep``, :mod:`ppl_rnn.models._lm_mstep`; with the identity one step is the least-squares solution up
to the damping) applies; ``rotation_restart`` redraws the first-order slice.
"""

from __future__ import annotations

import torch
from pyro.nn import PyroParam

from ppl_rnn.errors import ConfigurationError, ModelCapabilityError
from ppl_rnn.model import LinearGaussianParams, set_param
from ppl_rnn.rng import check_seed

from ._rnn_common import GaussianRNNBase, check_real, embed_linear_frame, redeclare, rotation

_ACT = {"tanh": torch.tanh, "identity": lambda x: x}


@redeclare("transition_loc_scale", "closed_form_mstep")
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
    transition_params = ("W3", "b")

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

    def recurrent_matrix(self, u_t, W3=None):
        r""":math:`M(\tilde u_t)_{ij} = \sum_k w_{ijk}\tilde u_{t,k}`, ``(..., H, H)``."""
        W3 = self.W3 if W3 is None else W3
        if u_t is None:
            return W3[..., 0]
        ut = torch.cat([torch.ones(u_t.shape[:-1] + (1,), dtype=u_t.dtype), u_t], -1)
        return torch.einsum("ijk,...k->...ij", W3, ut)

    def transition_parts(self, p, h_prev, u_t, shift=None):
        r""":math:`\phi(M(\tilde u_t) h_{t-1} + b)` with parameters ``p``. One affine block ``"a"`` =
        ``[W3.reshape(H, H(I+1)), b]``, features :math:`(h_{t-1}\otimes\tilde u_t, 1)`."""
        M = self.recurrent_matrix(u_t, p["W3"])
        a = (M @ h_prev.unsqueeze(-1)).squeeze(-1) + p["b"]
        if shift is None:
            return _ACT[self.activation](a)
        a = a + shift["a"]
        ut = h_prev.new_ones(h_prev.shape[:-1] + (1,))
        if u_t is not None:
            ut = torch.cat([ut, u_t.expand(h_prev.shape[:-1] + u_t.shape[-1:])], -1)
        x = (h_prev.unsqueeze(-1) * ut.unsqueeze(-2)).flatten(-2)
        return _ACT[self.activation](a), {"a": torch.cat([x, h_prev.new_ones(h_prev.shape[:-1] + (1,))], -1)}

    def blocks_from(self, p):
        H = self.hidden_dim
        return {"a": torch.cat([p["W3"].reshape(H, -1), p["b"][:, None]], 1)}, {}

    def params_from(self, blocks):
        H, a = self.hidden_dim, blocks["a"]
        return {"W3": a[:, :-1].reshape(H, H, self.input_dim + 1), "b": a[:, -1]}

    # ---- the linear special case (no inputs: the first-order slice is an Elman network's W) -----------------
    def capability_applies(self, name: str) -> bool:
        """Without inputs the model is an Elman network: ``linear_gaussian`` / ``set_linear_gaussian`` hold with
        ``activation="identity"``, ``linear_special_case`` / ``embed_linear`` for either activation. With inputs
        the linear form is time-varying (module docstring) and none of the four applies."""
        if name in ("linear_gaussian", "set_linear_gaussian"):
            return self.activation == "identity" and self.input_dim == 0
        if name in ("linear_special_case", "embed_linear"):
            return self.input_dim == 0
        return True

    def _check_linear(self, what: str) -> None:
        if self.input_dim:
            raise ModelCapabilityError(
                f"SecondOrderSSM.{what}: with {self.input_dim} inputs the recurrent matrix depends on the input, a "
                "time-varying linear model the linear-Gaussian form cannot express. Build the model without inputs or "
                "start from the model as given.")

    def linear_gaussian(self) -> LinearGaussianParams:
        r"""With ``activation="identity"`` and no inputs: :math:`A = w_{\cdot\cdot0}`, ``b``, :math:`Q=\operatorname{diag}q^2`,
        ``C``, ``d``, :math:`R=\operatorname{diag}r^2`, ``m0``, :math:`P_0=\operatorname{diag}s_0^2`."""
        self._check_linear("linear_gaussian")
        if self.activation != "identity":
            raise ModelCapabilityError(
                "SecondOrderSSM(activation='tanh') is nonlinear, so it has no linear-Gaussian form. Use "
                "linear_special_case() / embed_linear() for a linear warm start.")
        return LinearGaussianParams(A=self.W3[..., 0], b=self.b, Q=torch.diag(self.q**2), C=self.C, d=self.d,
                                    R=torch.diag(self.r**2), m0=self.m0, P0=torch.diag(self.s0**2),
                                    diagonal_noise=True)

    @torch.no_grad()
    def set_linear_gaussian(self, params: LinearGaussianParams) -> None:
        """Set from a linear-Gaussian fit, keeping the diagonals of ``Q``, ``R``, ``P0`` (the model's family)."""
        self._check_linear("set_linear_gaussian")
        self._set_from(params, 1.0)

    def linear_special_case(self) -> SecondOrderSSM:
        """A new ``SecondOrderSSM(activation="identity")`` of the same sizes (its parameters: this model's)."""
        self._check_linear("linear_special_case")
        lin = SecondOrderSSM(self.hidden_dim, self.obs_dim, 0, activation="identity")
        lin.load_state_dict(self.state_dict())
        return lin

    @torch.no_grad()
    def embed_linear(self, params: LinearGaussianParams, *, gain: float = 0.1) -> None:
        r"""As :meth:`ppl_rnn.models.ElmanSSM.embed_linear` (states scaled by :math:`g` = ``gain``):
        :math:`w_{\cdot\cdot0} = A`, :math:`b' = g b`, :math:`q' = g\sqrt{\operatorname{diag}Q}`, :math:`C' = C/g`,
        :math:`m_0' = g m_0`, :math:`s_0' = g\sqrt{\operatorname{diag}P_0}`; in ``tanh``'s linear regime the network
        behaves as the linear model."""
        self._check_linear("embed_linear")
        self._set_from(params, float(gain))

    def _set_from(self, p: LinearGaussianParams, gain: float) -> None:
        if not gain > 0:
            raise ConfigurationError(f"gain must be > 0; found {gain!r}. Use e.g. 0.1.")
        dt = self.W3.dtype

        def c(x):
            return torch.as_tensor(x).detach().to(dt)

        W3 = self.W3.detach().clone()
        W3[..., 0] = c(p.A)
        set_param(self, "W3", W3)
        embed_linear_frame(self, p, gain)

    @torch.no_grad()
    def rotation_restart(self, generator: torch.Generator, *, gain: float = 1.1, rotation_scale: float = 0.25) -> None:
        r"""Redraw the first-order recurrent matrix ``W3[:, :, 0]`` (the one every input shares) as a random rotation
        near the identity times ``gain`` (:func:`~._rnn_common.rotation`); the multiplicative slices stay."""
        W3 = self.W3.detach().clone()
        W3[..., 0] = rotation(self.hidden_dim, generator, gain=gain, scale=rotation_scale, dtype=W3.dtype)
        set_param(self, "W3", W3)

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
