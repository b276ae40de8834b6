r"""Stacked (hierarchical) stochastic recurrent layers: the recurrent multilayer perceptron as a state-space model.

The encyclopedia article "Recurrent neural network" (``docs/references.md``; "Recurrent multilayer perceptron", "Hierarchical RNN"): a
series of cascaded subnetworks connected by feed-forward connections, each with feedback among itself. With
layers :math:`l = 1..L` of sizes :math:`n_l` and noise in every layer:

.. math::
    h^1_t &= \phi(W_1 h^1_{t-1} + U u_t + b_1) + e^1_t\\
    h^l_t &= \phi(W_l h^l_{t-1} + V_l h^{l-1}_{t-1} + b_l) + e^l_t,\qquad l = 2..L\\
    y_t &= C h^L_t + d + v_t,\qquad e^l_t\sim N(0,\operatorname{diag}q_l^2),\ v_t\sim N(0,\operatorname{diag}r^2)

State: the layers concatenated, :math:`h_t = (h^1_t, \dots, h^L_t)` (``hidden_dim`` :math:`=\sum_l n_l`); the
readout sees the top layer only. **Each layer is driven by the layer below at the previous step**
(:math:`h^{l-1}_{t-1}`): the transition is then a diagonal Gaussian whose mean depends on :math:`h_{t-1}` alone
(block-bidiagonal recurrent matrix), so the ``(loc, scale)`` shortcuts, analytic Jacobians and the EKF apply; an
input reaches layer :math:`l` after :math:`l-1` steps. (Driving layer :math:`l` by :math:`h^{l-1}_t` of the same
step would make the transition a non-Gaussian composition of the layers' noises.)

Stored as one block matrix ``A`` (``H x H``) times a fixed 0/1 ``structure`` buffer (blocks :math:`W_l` on the
diagonal, :math:`V_l` below it), so :math:`h_t = \phi((A\odot S) h_{t-1} + [U; 0] u_t + b) + e_t` and the Jacobian
is :math:`\operatorname{diag}(\phi')(A\odot S)`. With ``activation="identity"`` the model is linear-Gaussian and
declares ``linear_gaussian`` (exact Kalman); it has no ``set_linear_gaussian`` / ``linear_special_case`` (a
general linear fit does not project onto the cascade). The Levenberg-Marquardt M-step (``closed_form_mstep``,
:mod:`ppl_rnn.models._lm_mstep`) moves the entries of ``A`` inside the structure, ``U`` and ``b``; ``rotation_restart``
redraws each layer's own recurrent block.
"""

from __future__ import annotations

import torch
from pyro.nn import PyroParam

from ppl_rnn.errors import ConfigurationError, ModelCapabilityError
from ppl_rnn.model import LinearGaussianParams, set_param, size_argument
from ppl_rnn.rng import check_seed

from ._rnn_common import GaussianRNNBase, check_real, redeclare, rotation

_ACT = {"tanh": torch.tanh, "identity": lambda x: x}


@redeclare("transition_loc_scale", "closed_form_mstep")
class StackedSSM(GaussianRNNBase):
    """Stacked stochastic recurrent layers (module docstring).

    Args:
        hidden_dim: the layer sizes :math:`(n_1, \\dots, n_L)` (bottom first; keyword alias ``layer_sizes``), or
            one int ``N`` for two layers ``(N, max(1, N // 2))`` (what ``ppl-rnn --model stacked --hidden N``
            builds). The state dimension, the attribute ``self.hidden_dim``, is :math:`\\sum_k n_k`.
        obs_dim, input_dim: sizes.
        activation: ``"tanh"`` or ``"identity"``.
        weight_scale: entries of each block start as ``N(0, weight_scale^2 / n)`` (``n``: the block's input size).
        process_noise, obs_noise, init_scale: initial ``q``, ``r``, ``s0``.
        seed: seed of the random initial weights.
    """

    recurrent_params = ("A",)
    transition_params = ("A", "U", "b", "structure")

    def __init__(self, hidden_dim=None, obs_dim: int = 1, input_dim: int = 0, *, layer_sizes=None,
                 activation: str = "tanh", weight_scale: float = 0.9, process_noise=0.1, obs_noise=0.1,
                 init_scale=1.0, seed: int = 0):
        layer_sizes = size_argument("StackedSSM", hidden_dim, "layer_sizes", layer_sizes, check=False)
        if isinstance(layer_sizes, int) and not isinstance(layer_sizes, bool) and layer_sizes >= 1:
            layer_sizes = (layer_sizes, max(1, layer_sizes // 2))
        sizes = tuple(layer_sizes) if isinstance(layer_sizes, (list, tuple)) else None
        if not sizes or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in sizes):
            raise ConfigurationError(f"StackedSSM: hidden_dim (alias layer_sizes) must be an int >= 1 or a non-empty "
                                     f"sequence of ints >= 1 (the layer sizes); found {layer_sizes!r}.")
        super().__init__(sum(sizes), obs_dim, input_dim)
        if activation not in _ACT:
            raise ConfigurationError(f"activation must be one of {sorted(_ACT)}; found {activation!r}.")
        weight_scale = check_real(weight_scale, "weight_scale")
        self.layer_sizes, self.activation = sizes, activation
        H, I = self.hidden_dim, input_dim
        g = torch.Generator().manual_seed(check_seed(seed) or 0)
        dt = torch.get_default_dtype()
        starts = [sum(sizes[:k]) for k in range(len(sizes))]
        S = torch.zeros(H, H, dtype=dt)
        A = torch.zeros(H, H, dtype=dt)
        for k, (s, n) in enumerate(zip(starts, sizes, strict=True)):
            S[s:s + n, s:s + n] = 1
            A[s:s + n, s:s + n] = weight_scale * torch.randn(n, n, generator=g, dtype=dt) / n**0.5
            if k:
                p, m = starts[k - 1], sizes[k - 1]
                S[s:s + n, p:p + m] = 1
                A[s:s + n, p:p + m] = torch.randn(n, m, generator=g, dtype=dt) / m**0.5
        self.register_buffer("structure", S)
        self.A = PyroParam(A)
        if I > 0:
            self.U = PyroParam(torch.randn(sizes[0], I, generator=g, dtype=dt) / I**0.5)
        self.b = PyroParam(torch.zeros(H, dtype=dt))
        self._init_frame(g, readout=(starts[-1], H), process_noise=process_noise, obs_noise=obs_noise,
                         init_scale=init_scale)

    def recurrent_matrix(self) -> torch.Tensor:
        """:math:`A\\odot S`: the block-bidiagonal recurrent matrix."""
        return self.A * self.structure

    def _input_matrix(self, U=None) -> torch.Tensor:
        n1 = self.layer_sizes[0]
        U = self.U if U is None else U
        return torch.cat([U, U.new_zeros(self.hidden_dim - n1, self.input_dim)], 0)

    def transition_parts(self, p, h_prev, u_t, shift=None):
        r""":math:`\phi((A\odot S) h_{t-1} + [U; 0] u_t + b)` with parameters ``p``. One affine block ``"a"`` =
        ``[A, [U; 0], b]``, features :math:`(h_{t-1}, u_t, 1)`; free: the entries of the structure and of ``U``."""
        a = h_prev @ (p["A"] * p["structure"]).T + p["b"]
        if u_t is not None:
            a = a + u_t @ self._input_matrix(p["U"]).T
        if shift is None:
            return _ACT[self.activation](a)
        one = h_prev.new_ones(h_prev.shape[:-1] + (1,))
        x = torch.cat([h_prev, *(() if u_t is None else (u_t.expand(h_prev.shape[:-1] + u_t.shape[-1:]),)), one], -1)
        return _ACT[self.activation](a + shift["a"]), {"a": x}

    def blocks_from(self, p):
        H, I = self.hidden_dim, self.input_dim
        blk = torch.cat([p["A"], *((self._input_matrix(p["U"]),) if I else ()), p["b"][:, None]], 1)
        mask = torch.ones(blk.shape, dtype=torch.bool)
        mask[:, :H] = p["structure"] != 0
        if I:
            mask[self.layer_sizes[0]:, H:H + I] = False
        return {"a": blk}, {"a": mask}

    def params_from(self, blocks):
        H, I, a = self.hidden_dim, self.input_dim, blocks["a"]
        out = {"A": a[:, :H], "b": a[:, -1], "structure": self.structure}
        if I:
            out["U"] = a[:self.layer_sizes[0], H:H + I]
        return out

    @torch.no_grad()
    def rotation_restart(self, generator: torch.Generator, *, gain: float = 1.1, rotation_scale: float = 0.25) -> None:
        r"""Redraw each layer's own recurrent block :math:`W_l` (the diagonal blocks of ``A``) as a random rotation
        near the identity times ``gain`` (:func:`~._rnn_common.rotation`); the feed-forward blocks stay."""
        A, s = self.A.detach().clone(), 0
        for n in self.layer_sizes:
            A[s:s + n, s:s + n] = rotation(n, generator, gain=gain, scale=rotation_scale, dtype=A.dtype)
            s += n
        set_param(self, "A", A)

    def transition_jacobian(self, t, h_prev, u_t, mean=None):
        r""":math:`\operatorname{diag}(\phi'(\cdot))(A\odot S)`."""
        M = self.recurrent_matrix()
        if self.activation == "identity":
            return M.expand(h_prev.shape[:-1] + M.shape)
        m = self.transition_mean(t, h_prev, u_t) if mean is None else mean
        return (1 - m * m).unsqueeze(-1) * M

    def capability_applies(self, name: str) -> bool:
        if name == "linear_gaussian":
            return self.activation == "identity"
        return True

    def linear_gaussian(self) -> LinearGaussianParams:
        if self.activation != "identity":
            raise ModelCapabilityError(
                "StackedSSM(activation='tanh') is nonlinear, so it has no linear-Gaussian form. Use ParticleSmoother "
                "or ExtendedKalmanSmoother, or build it with activation='identity'.")
        return LinearGaussianParams(
            A=self.recurrent_matrix(), b=self.b, Q=torch.diag(self.q**2), C=self._full_C(), d=self.d,
            R=torch.diag(self.r**2), m0=self.m0, P0=torch.diag(self.s0**2),
            B=self._input_matrix() if self.input_dim else None, D=None, diagonal_noise=True)

    def __repr__(self) -> str:
        return (f"StackedSSM(layer_sizes={self.layer_sizes}, obs_dim={self.obs_dim}, input_dim={self.input_dim}, "
                f"activation={self.activation!r})")


__all__ = ["StackedSSM"]
