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

**The M-step** (:meth:`JordanSSM.closed_form_mstep`). Solving :math:`L z = h_t - m` shows that the correlated
transition factorises on a path: :math:`\log p(h_t\mid h_{t-1}) = \log N(a_t; m_a, \operatorname{diag}q_a^2) +
\log N(c_t; \mu\odot c_{t-1} + C a_t + d, \operatorname{diag}q_c^2)` (:math:`\det L = \prod q_a\prod q_c`). Given smoothed
paths, :math:`\hat Q` therefore splits into the initial state (closed form), the hidden layer :math:`(W, U, b, q_a)`
(an Elman-type regression of :math:`a_t` on :math:`(c_{t-1}, u_t, 1)`: Levenberg-Marquardt steps, :mod:`._lm_mstep`,
:math:`q_a` in closed form) and, per output :math:`k`, the block :math:`(C_k, d_k, \mu_k, q_{c,k}, r_k)` shared by the
context equation and the emission: given the two variances, one weighted least-squares problem in
:math:`(C_k, d_k, \mu_k)` stacking the context rows (weight :math:`1/q_{c,k}^2`, regressors :math:`(a_t, 1, c_{t-1,k})`)
and the observed emission rows (weight :math:`1/r_k^2`, regressors :math:`(a_t, 1, 0)`); :math:`\mu_k` outside
:math:`(0, 1)` is clamped and :math:`(C_k, d_k)` re-solved (the profile of a concave quadratic is concave, so the
clamped value is the constrained maximiser); given the means the variances are closed form. A few such cycles
(ECM) each raise :math:`\hat Q`.

Jacobian (analytic): :math:`\partial m_a/\partial a_{t-1}=0`, :math:`\partial m_a/\partial c_{t-1} =
\operatorname{diag}(\phi'(\cdot))W`, :math:`\partial m_c/\partial c_{t-1} = \operatorname{diag}\mu + C\,\partial m_a/\partial c_{t-1}`.
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.nn import PyroParam

from ppl_rnn.errors import ConfigurationError, ModelCapabilityError
from ppl_rnn.model import LinearGaussianParams, set_param, size_argument
from ppl_rnn.rng import check_seed

from ._lm_mstep import lm_least_squares, merge_rows, weighted_sse
from ._rnn_common import GaussianRNNBase, check_real, initial_scale_mstep, redeclare

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

    def closed_form_mstep(self, trajectories: torch.Tensor, observations: torch.Tensor, mask: torch.Tensor,
                          inputs: torch.Tensor | None = None, *, weights: torch.Tensor | None = None,
                          transition_steps: int = 5, learn_initial: bool = True, context_cycles: int = 5) -> float:
        r"""Increase :math:`\hat Q=\sum_s w_s\log p_\theta(h^{(s)}, y)` in place and return it (module docstring, "The
        M-step"): initial state in closed form, ``transition_steps`` Levenberg-Marquardt steps on the hidden layer,
        ``context_cycles`` ECM cycles on the output/context block. Arguments as
        :meth:`ppl_rnn.models.ElmanSSM.closed_form_mstep`."""
        with torch.no_grad():
            h = trajectories.detach().to(self.dtype)
            S, B, T, H = h.shape
            dt = h.dtype
            n, D = self.hidden_units, self.obs_dim
            w = torch.full((S,), 1.0 / S, dtype=dt) if weights is None else weights.detach().to(dt)
            w = w / w.sum()
            obj = initial_scale_mstep(self, h[:, :, 0], w, learn_mean=learn_initial, learn_scale=learn_initial)
            if T < 2:  # only the emission rows: the context block without context rows
                return obj + self._context_block(h, observations.to(dt), mask, w, context_cycles)
            N, M = B * (T - 1), S * B * (T - 1)
            act = _ACT[self.activation]
            c_prev = h[:, :, :-1, n:].reshape(M, D)
            a_next = h[:, :, 1:, :n].reshape(M, n)
            u = None if inputs is None else inputs[:, 1:T].to(dt).expand(S, B, T - 1, inputs.shape[-1]).reshape(M, -1)
            row_w = w.repeat_interleave(N)
            c_prev, u, a_next, row_w = merge_rows(c_prev, u, a_next, row_w)

            def mean(blocks, x, uu, shift):
                Th = blocks["a"]
                z = torch.cat([x, *(() if uu is None else (uu,)), x.new_ones(x.shape[:-1] + (1,))], -1)
                pre = z @ Th.T
                if shift is None:
                    return act(pre), None
                return act(pre + shift["a"]), {"a": z}

            Th = torch.cat([self.W.detach(), *((self.U.detach(),) if self.input_dim else ()),
                            self.b.detach()[:, None]], 1)
            qa2 = (weighted_sse(mean, {"a": Th}, c_prev, u, a_next, row_w) / N).clamp_min(1e-12)
            blocks, Fa, _ = lm_least_squares(mean, {"a": Th}, {}, c_prev, u, a_next, row_w, 1.0 / qa2,
                                             transition_steps)
        Th = blocks["a"]
        set_param(self, "W", Th[:, :D])
        if self.input_dim:
            set_param(self, "U", Th[:, D:-1])
        set_param(self, "b", Th[:, -1])
        qa2 = (Fa / N).clamp_min(1e-12)
        set_param(self, "q", torch.cat([qa2.sqrt(), self.q.detach()[n:]]))
        obj -= 0.5 * float((Fa / qa2 + N * (torch.log(qa2) + math.log(2 * math.pi))).sum())
        return obj + self._context_block(h, observations.to(dt), mask, w, context_cycles)

    @torch.no_grad()
    def _context_block(self, h, y, mask, w, cycles: int) -> float:
        """The output/context block of the M-step (module docstring); returns its part of Q-hat."""
        S, B, T, H = h.shape
        n, D = self.hidden_units, self.obs_dim
        dt = h.dtype
        a, c = h[..., :n], h[..., n:]
        mf = mask.to(dt)
        y = torch.where(mask, y, torch.zeros((), dtype=dt)).to(dt)
        ones = torch.ones(S, B, T, 1, dtype=dt)
        za = torch.cat([a, ones], -1)  # (S,B,T,n+1): regressors of both equations
        # per output k: sufficient statistics of the emission rows (t >= 0, observed) and the context rows (t >= 1)
        Sy_zz = torch.einsum("s,btk,sbtp,sbtq->kpq", w, mf, za, za)
        Sy_zy = torch.einsum("s,btk,sbtp->kp", w, mf * y, za)
        ny = mf.sum((0, 1))
        zc = torch.cat([za[:, :, 1:].unsqueeze(-2).expand(S, B, T - 1, D, n + 1),
                        c[:, :, :-1].unsqueeze(-1)], -1)  # (S,B,T-1,D,n+2)
        Sc_zz = torch.einsum("s,sbtkp,sbtkq->kpq", w, zc, zc)
        Sc_zy = torch.einsum("s,sbtkp,sbtk->kp", w, zc, c[:, :, 1:])
        Nc = B * (T - 1)
        C, d, mu = self.C.detach().clone(), self.d.detach().clone(), self.mu.detach().clone()
        qc2, r2 = self.q.detach()[n:] ** 2, self.r.detach() ** 2
        lo, hi = 1e-6, 1.0 - 1e-6

        def ssr():
            e_y = torch.einsum("s,btk,sbtk->k", w, mf, (y - a @ C.T - d) ** 2)
            e_c = (torch.einsum("s,sbtk->k", w, (c[:, :, 1:] - mu * c[:, :, :-1] - a[:, :, 1:] @ C.T - d) ** 2)
                   if T > 1 else torch.zeros(D, dtype=dt))
            return e_c, e_y

        def variances():
            e_c, e_y = ssr()
            vc = (e_c / max(Nc, 1)).clamp_min(1e-12) if T > 1 else qc2
            vy = torch.where(ny > 0, (e_y / ny.clamp_min(1)).clamp_min(1e-12), r2)
            return vc, vy

        qc2, r2 = variances()
        eye = torch.eye(n + 2, dtype=dt)
        for _ in range(max(int(cycles), 1)):
            for k in range(D):
                A = Sc_zz[k] / qc2[k]
                bvec = Sc_zy[k] / qc2[k]
                A[:n + 1, :n + 1] += Sy_zz[k] / r2[k]
                bvec[:n + 1] += Sy_zy[k] / r2[k]
                if T < 2:  # no context rows: mu keeps its value
                    A[-1, -1] = 1.0
                    bvec[-1] = mu[k]
                A = A + 1e-12 * torch.diagonal(A).mean().clamp_min(1e-30) * eye
                beta = torch.linalg.solve(A, bvec)
                if not (lo <= float(beta[-1]) <= hi):
                    m = min(max(float(beta[-1]), lo), hi)
                    beta = torch.cat([torch.linalg.solve(A[:n + 1, :n + 1], bvec[:n + 1] - A[:n + 1, -1] * m),
                                      beta.new_tensor([m])])
                C[k], d[k], mu[k] = beta[:n], beta[n], beta[-1]
            qc2, r2 = variances()
        set_param(self, "C", C)
        set_param(self, "d", d)
        set_param(self, "mu", mu)
        set_param(self, "r", r2.sqrt())
        set_param(self, "q", torch.cat([self.q.detach()[:n], qc2.sqrt()]))
        e_c, e_y = ssr()
        log2pi = math.log(2 * math.pi)
        val = -0.5 * float((e_y / r2 + ny * (torch.log(r2) + log2pi)).sum())
        if T > 1:
            val -= 0.5 * float((e_c / qc2 + Nc * (torch.log(qc2) + log2pi)).sum())
        return val

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
