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
from ppl_rnn.model import (
    ElmanForm,
    LinearGaussianParams,
    NARParams,
    StateSpaceModel,
    pack_params,
    set_param,
    unpack_params,
)
from ppl_rnn.rng import check_seed

from ._rnn_common import embed_linear_frame

_ACTIVATIONS = {"tanh": torch.tanh, "identity": lambda x: x}


def _scale(v, n, name):
    t = torch.as_tensor(v, dtype=torch.get_default_dtype())
    if t.dim() == 0:
        t = t.expand(n)
    t = t.clone()
    if t.shape != (n,) or not bool((t > 0).all()) or not bool(torch.isfinite(t).all()):
        raise ConfigurationError(f"{name} must be a positive scalar or a positive vector of length {n}; found {v!r}.")
    return t


def _merge_equal_columns(X: torch.Tensor, Y: torch.Tensor, w: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Merge the equal columns of the regression ``X (P, M)``, ``Y (H, M)`` with weights ``w (M,)``: returns
    ``(X', Y', w')`` over the distinct columns, each weight the sum of its copies', so every weighted sum
    :math:`\sum_m w_m f(x_m, y_m)` is unchanged (up to the order of summation).

    Smoothed particle paths share states (the backward pass draws from the same :math:`N` filter particles at
    every step; at laser size about one row in five is distinct), so the Levenberg-Marquardt steps then work on
    a fraction of the rows. Equal columns are found by an exact hash of their bits (integer arithmetic, so
    equal columns get equal keys), grouped by ``torch.unique`` and checked equal to their group's first member;
    where the check fails (a hash collision) or nothing repeats, the inputs are returned as they are."""
    M = X.shape[1]
    if M < 2 or X.dtype not in (torch.float64, torch.float32) or Y.dtype != X.dtype:
        return X, Y, w
    itype = torch.int64 if X.dtype == torch.float64 else torch.int32
    mult = (torch.arange(X.shape[0] + Y.shape[0], dtype=torch.int64) * 2 + 1) * -7046029254386353131
    key = None  # sum_p mix(c_p bits_p) (mod 2^64) over the rows of X and Y, odd c_p, mix(x) = x ^ (x >> 29)
    for A, c in ((X, mult[:X.shape[0]]), (Y, mult[X.shape[0]:])):
        part = A.contiguous().view(itype).to(torch.int64) * c[:, None]
        part = part.bitwise_xor_(part >> 29).sum(0)  # the mix: no cancellation of e.g. a sign flip of a column
        key = part if key is None else key.add_(part)
    uniq, inv = torch.unique(key, return_inverse=True)
    G = uniq.shape[0]
    if G > 0.9 * M:  # little to gain
        return X, Y, w
    first = torch.full((G,), M, dtype=torch.long).scatter_reduce_(0, inv, torch.arange(M), "amin")
    rep = first[inv]  # the first column of each column's group; merging needs every column equal to it
    for A in (X, Y):
        for row in A:
            if not bool((row.index_select(0, rep) == row).all()):
                return X, Y, w  # a collision (or a NaN): merge nothing
    wu = torch.zeros(G, dtype=w.dtype).index_add_(0, inv, w)
    return X.index_select(1, first), Y.index_select(1, first), wu


def _rotation(A: torch.Tensor, scale: float) -> torch.Tensor:
    r""":math:`\exp\big(s(A-A^\top)\big)`: a random rotation, close to the identity for small ``scale``."""
    return torch.linalg.matrix_exp(scale * (A - A.T))


class ElmanSSM(StateSpaceModel):
    r"""Stochastic Elman network (see module docstring).

    Args:
        hidden_dim, obs_dim, input_dim: sizes.
        activation: ``"tanh"`` or ``"identity"``.
        process_noise: initial ``q`` (scalar or vector).
        obs_noise: initial ``r``.
        init_scale: initial ``s0``.
        weight_init: how the random recurrent weights are drawn (:math:`A_{ij}\sim N(0,1)` i.i.d.):

            * ``"gaussian"`` (default): :math:`W = \text{weight\_scale}\cdot A/\sqrt{H}`;
            * ``"rotation"``: :math:`W = \text{weight\_scale}\cdot\exp\big(s(A - A^\top)\big)`, a random
              rotation close to the identity (:math:`s` = ``rotation_scale``) times a gain: eigenvalues
              :math:`\text{weight\_scale}\,e^{\pm i\theta_k}` with small random :math:`\theta_k`, i.e. slowly
              rotating oscillatory modes that ``tanh`` limits (with ``weight_scale`` a little above 1). Training a
              network on oscillating data from it lets EM tune the modes' frequencies; from ``"gaussian"`` it tends
              to waste modes on fast or decaying dynamics (measured on ``unkelbach-synthetic``: see
              ``benchmarks/synthetic_table.py``).
        weight_scale: the scale (``"gaussian"``) or gain (``"rotation"``) of ``W``.
        rotation_scale: :math:`s` of ``weight_init="rotation"`` (typical rotation angles grow with it).
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
        weight_init: str = "gaussian",
        rotation_scale: float = 0.25,
        seed: int = 0,
    ):
        super().__init__(hidden_dim, obs_dim, input_dim)
        if activation not in _ACTIVATIONS:
            raise ConfigurationError(f"activation must be one of {sorted(_ACTIVATIONS)}; found {activation!r}.")
        if isinstance(weight_scale, bool) or not isinstance(weight_scale, (int, float)) or not (
            0 <= weight_scale < float("inf")
        ):
            raise ConfigurationError(f"weight_scale must be a finite real number >= 0; found {weight_scale!r}.")
        if weight_init not in ("gaussian", "rotation"):
            raise ConfigurationError(f"weight_init must be 'gaussian' or 'rotation'; found {weight_init!r}.")
        if isinstance(rotation_scale, bool) or not isinstance(rotation_scale, (int, float)) or not (
            0 <= rotation_scale < float("inf")
        ):
            raise ConfigurationError(
                f"rotation_scale must be a finite real number >= 0; found {rotation_scale!r}. Use e.g. 0.25.")
        seed = check_seed(seed) or 0
        self.activation = activation
        H, O, I = hidden_dim, obs_dim, input_dim
        g = torch.Generator().manual_seed(seed)
        dt = torch.get_default_dtype()
        A = torch.randn(H, H, generator=g, dtype=dt)
        if weight_init == "rotation":
            W = weight_scale * _rotation(A, rotation_scale)
        else:
            W = weight_scale * A / H**0.5
        self.W = PyroParam(W)
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

    # ---- diagonal-Gaussian shortcuts (the particle filter's fast path; same law as above) ----
    def transition_loc_scale(self, t, h_prev, u_t):
        r"""``(loc, scale)`` of :meth:`transition`: :math:`(\phi(W h_{t-1} + U u_t + b),\ q)`."""
        return self.transition_mean(t, h_prev, u_t), self.q

    def emission_loc_scale(self, t, h, u_t):
        r"""``(loc, scale)`` of :meth:`emission`: :math:`(C h_t + d,\ r)`."""
        return h @ self.C.T + self.d, self.r

    # ---- capabilities (declared in ppl_rnn.capabilities) ------------------------------------
    conditional_parts = {"transition": ("transition_mean",)}

    def capability_applies(self, name: str) -> bool:
        """``linear_gaussian`` / ``set_linear_gaussian`` hold only with ``activation="identity"``."""
        if name in ("linear_gaussian", "set_linear_gaussian"):
            return self.activation == "identity"
        return True

    def __repr__(self) -> str:
        return (f"ElmanSSM(hidden_dim={self.hidden_dim}, obs_dim={self.obs_dim}, input_dim={self.input_dim}, "
                f"activation={self.activation!r})")

    def transition_jacobian(self, t, h_prev, u_t, mean=None):
        r"""Analytic :math:`\partial f_t/\partial h_{t-1} = \operatorname{diag}(\phi'(a_t))\,W` ``(..., H, H)``,
        :math:`a_t = W h_{t-1} + U u_t + b` (:math:`\phi'=1-\tanh^2` or 1): the EKF's fast path.
        ``mean``: optional, :math:`f_t(h_{t-1})` if the caller has it already (saves recomputing it)."""
        W = self.W
        if self.activation == "identity":
            return W.expand(h_prev.shape[:-1] + W.shape)
        a = self.transition_mean(t, h_prev, u_t) if mean is None else mean
        return (1.0 - a * a).unsqueeze(-1) * W

    def emission_jacobian(self, t, h, u_t):
        r"""Analytic :math:`\partial g_t/\partial h_t = C` ``(..., D, H)``."""
        C = self.C
        return C.expand(h.shape[:-1] + C.shape)

    def linear_gaussian_emission(self, t, u_t):
        r""":math:`y_t = C h_t + d + v_t,\ v_t\sim N(0, \operatorname{diag} r^2)`: ``(C, d, diag r^2)``."""
        return self.C, self.d, torch.diag(self.r**2)

    def _check_linear(self) -> None:
        if self.activation != "identity":
            raise ModelCapabilityError(
                f"ElmanSSM(activation={self.activation!r}) is nonlinear, so it has no linear-Gaussian form. Use "
                "ParticleSmoother or ExtendedKalmanSmoother, build it with activation='identity', or use "
                "linear_special_case() / embed_linear() for a linear warm start.")

    def linear_gaussian(self) -> LinearGaussianParams:
        self._check_linear()
        return LinearGaussianParams(
            A=self.W, b=self.b, Q=torch.diag(self.q**2), C=self.C, d=self.d, R=torch.diag(self.r**2),
            m0=self.m0, P0=torch.diag(self.s0**2), B=self.U if self.input_dim else None, D=None,
            diagonal_noise=True,
        )

    @torch.no_grad()
    def set_linear_gaussian(self, params: LinearGaussianParams) -> None:
        """Set from a linear-Gaussian fit, keeping the diagonals of ``Q``, ``R``, ``P0`` (the model's family)
        and ignoring an input term ``D`` of the emission (the Elman emission has none)."""
        self._check_linear()
        self._set_from(params, gain=1.0)

    def linear_special_case(self) -> ElmanSSM:
        """A new ``ElmanSSM(activation="identity")`` of the same sizes (its parameters: this model's)."""
        lin = ElmanSSM(self.hidden_dim, self.obs_dim, self.input_dim, activation="identity")
        lin.load_state_dict(self.state_dict())
        return lin

    @torch.no_grad()
    def embed_linear(self, params: LinearGaussianParams, *, gain: float = 0.1) -> None:
        r"""Embed a linear-Gaussian model in the activation's linear regime: with states :math:`h' = g h`
        (:math:`g` = ``gain``), :math:`W = A`, :math:`b' = g b`, :math:`U' = g B`, :math:`q' = g\sqrt{\operatorname{diag} Q}`,
        :math:`C' = C/g`, :math:`m_0' = g m_0`, :math:`s_0' = g \sqrt{\operatorname{diag} P_0}`; since
        :math:`\tanh(x)\approx x` for small :math:`x`, the network then behaves like the linear model."""
        self._set_from(params, gain=float(gain))

    @torch.no_grad()
    def embed_nar(self, params: NARParams, *, gain: float = 0.01) -> None:
        r"""Set the network to behave as the nonlinear autoregression ``params`` (:class:`~ppl_rnn.NARParams`,
        :math:`y_t = c + A x_{t-1} + V\tanh(P x_{t-1}+\beta) + e_t`, :math:`x_{t-1}=(y_{t-1},\dots,y_{t-p})`):
        the nonlinear warm start. Needs ``hidden_dim`` :math:`= pD + M` and no inputs. The state is

        .. math:: h_t = \big(\ell_t,\ z^{(1)}_t, \dots, z^{(p-1)}_t,\ f_t\big),\quad
                  \ell_t = g\,(c + A x_{t-1}) + g e_t,\quad z^{(k)}_t = g\, y_{t-k},\quad
                  f_t = \tanh(P x_{t-1} + \beta),\quad y_t = \ell_t/g + V f_t

        (:math:`g` = ``gain``): the linear part and the lags ride in ``tanh``'s linear regime (scaled by
        :math:`g`), the features are ``tanh`` units of their own. Every quantity the next step needs is linear in
        :math:`h_{t-1}` — :math:`y_{t-1} = C h_{t-1}` with :math:`C = (I/g, 0, \dots, 0, V)` and
        :math:`y_{t-1-k} = z^{(k)}_{t-1}/g` — so with :math:`x_{t-1} = L h_{t-1}` the weights are
        :math:`W = (gAL;\ gL_{0};\ \dots;\ gL_{p-2};\ PL)`, :math:`b = (gc, 0, \dots, 0, \beta)`. The
        innovation enters through :math:`q_\ell = g\sigma`; the other units get :math:`10^{-3}` of that scale,
        the emission :math:`r = 0.05\,\sigma` (the autoregression has none; EM re-estimates both). The initial state
        puts the lags at ``params.x0`` (backcast before the first observation ``params.y0``) and :math:`\ell_0`
        so that :math:`C h_0 = y_0`: a wide prior on the lags would cost the particle filter its first
        :math:`p` steps (they are copied, not observed, so no proposal can correct them)."""
        if self.input_dim:
            raise ModelCapabilityError(
                f"embed_nar: this ElmanSSM has {self.input_dim} inputs; the nonlinear autoregression has no input "
                "terms. Use the linear warm start, MonteCarloEM(start=LinearStart()), for a model with inputs.")
        if self.activation != "tanh":
            raise ModelCapabilityError(
                f"embed_nar needs activation='tanh' (the features are tanh units); this model's is "
                f"{self.activation!r}. Use embed_linear / set_linear_gaussian for a linear model.")
        D, H = self.obs_dim, self.hidden_dim
        if params.A.shape[0] != D:
            raise ConfigurationError(
                f"embed_nar: params describe {params.A.shape[0]} outputs; the model has obs_dim={D}.")
        p, M = params.order, params.num_features
        n = p * D
        if H != n + M:
            raise ConfigurationError(
                f"embed_nar: an autoregression of order {p} with {M} features on {D} outputs needs hidden_dim = "
                f"{p} x {D} + {M} = {n + M}; this model has hidden_dim={H}. Build ElmanSSM({n + M}, {D}) or choose "
                f"{H - n} features.")
        g = float(gain)
        if not g > 0:
            raise ConfigurationError(f"gain must be > 0; found {gain!r}. Use e.g. 0.01.")
        dt = self.C.dtype

        def c(x):
            return torch.as_tensor(x).detach().to(dt)

        A, P, V, beta, cc, sig = c(params.A), c(params.P), c(params.V), c(params.beta), c(params.c), c(params.sigma)
        eye = torch.eye(D, dtype=dt)
        L = torch.zeros(n, H, dtype=dt)  # x_{t-1} = L h_{t-1}
        L[:D, :D] = eye / g
        L[:D, n:] = V
        L[D:n, D:n] = torch.eye(n - D, dtype=dt) / g  # y_{t-1-k} = z^(k)_{t-1} / g
        W = torch.zeros(H, H, dtype=dt)
        W[:D] = g * A @ L
        W[D:n] = g * L[:n - D]  # z^(k)_t = g y_{t-k}: the lags shift by one block
        W[n:] = P @ L
        b = torch.zeros(H, dtype=dt)
        b[:D] = g * cc
        b[n:] = beta
        q = torch.full((H,), 1e-3 * g * float(sig.min()), dtype=dt)
        q[:D] = g * sig
        q[n:] = 1e-3 * float(sig.min())
        f0 = torch.tanh(P @ c(params.x0) + beta)
        m0 = torch.cat([g * (c(params.y0) - V @ f0), g * c(params.x0)[:n - D], f0])
        s0 = torch.cat([g * torch.sqrt(c(params.y0_sd) ** 2 + sig ** 2), g * c(params.x0_sd)[:n - D].clamp_min(1e-3 * float(sig.min())),
                        torch.full((M,), 1e-3 * float(sig.min()), dtype=dt)])
        for name, v in (("W", W), ("b", b), ("C", L[:D].clone()), ("d", torch.zeros(D, dtype=dt)), ("q", q),
                        ("r", 0.05 * sig), ("m0", m0), ("s0", s0)):
            set_param(self, name, v)

    def _set_from(self, p: LinearGaussianParams, *, gain: float) -> None:
        dt = self.C.dtype

        def c(x):
            return x.detach().to(dt)

        set_param(self, "W", c(p.A))
        if self.input_dim and p.B is not None:
            set_param(self, "U", gain * c(p.B))
        embed_linear_frame(self, p, gain)

    def elman_form(self) -> ElmanForm:
        return ElmanForm(W=self.W, b=self.b, C=self.C, d=self.d, q=self.q, r=self.r, m0=self.m0, s0=self.s0,
                         activation=self.activation, U=self.U if self.input_dim else None)

    @torch.no_grad()
    def set_elman_form(self, form: ElmanForm) -> None:
        if form.activation != self.activation:
            raise ConfigurationError(f"form.activation is {form.activation!r}; this model's is {self.activation!r}.")
        for name in ("W", "b", "C", "d", "q", "r", "m0", "s0") + (("U",) if self.input_dim else ()):
            set_param(self, name, getattr(form, name).detach().to(self.C.dtype))

    def noise_scales(self) -> dict[str, torch.Tensor]:
        """Standard deviations: ``initial`` = s0, ``process`` = q, ``obs`` = r (vectors)."""
        return {"initial": self.s0, "process": self.q, "obs": self.r}

    @torch.no_grad()
    def set_noise_scales(self, **scales: torch.Tensor) -> None:
        names = {"initial": "s0", "process": "q", "obs": "r"}
        for role, v in scales.items():
            if role not in names:
                raise ConfigurationError(f"noise role must be one of {sorted(names)}; found {role!r}.")
            cur = getattr(self, names[role])
            set_param(self, names[role], torch.as_tensor(v, dtype=cur.dtype).expand(cur.shape))

    def _weight_names(self) -> tuple[str, ...]:
        return ("W",) + (("U",) if self.input_dim else ()) + ("b", "C", "d", "m0")

    def weights(self) -> torch.Tensor:
        """``(W, U, b, C, d, m0)`` flattened (detached copy)."""
        return pack_params(self, self._weight_names())

    def set_weights(self, vector: torch.Tensor) -> None:
        unpack_params(self, self._weight_names(), vector)

    @torch.no_grad()
    def perturb(self, scale: float, generator: torch.Generator) -> None:
        """Redraw ``W`` (and ``U``) at their current RMS times ``scale`` around zero plus the old value times
        ``1 - scale``, and move ``b`` by ``N(0, (0.1 scale)^2)``: a restart candidate near this network."""
        for n in ("W",) + (("U",) if self.input_dim else ()):
            old = getattr(self, n).detach()
            rms = float(old.pow(2).mean().sqrt()) or 1.0
            noise = torch.randn(old.shape, generator=generator, dtype=torch.float64).to(old.dtype)
            set_param(self, n, (1.0 - scale) * old + scale * rms * noise)
        old = self.b.detach()
        set_param(self, "b", old + 0.1 * scale * torch.randn(old.shape, generator=generator, dtype=torch.float64).to(old.dtype))

    @torch.no_grad()
    def rotation_restart(self, generator: torch.Generator, *, gain: float = 1.1, rotation_scale: float = 0.25) -> None:
        r"""Redraw ``W`` as ``weight_init="rotation"`` does, :math:`W=\text{gain}\cdot\exp\big(s(A-A^\top)\big)`
        with :math:`A_{ij}\sim N(0,1)` from ``generator``: slow oscillatory modes (eigenvalues
        :math:`\text{gain}\,e^{\pm i\omega}`, small :math:`\omega`) in the activation's saturating regime, a
        restart candidate in another basin than a damped or linear-regime fit; the other parameters stay."""
        H = self.hidden_dim
        A = torch.randn(H, H, generator=generator, dtype=torch.float64)
        set_param(self, "W", (gain * _rotation(A, rotation_scale)).to(self.W.dtype))

    # ---- closed-form (generalised) M-step: the MCEM fast path ------------------------------
    def closed_form_mstep(
        self,
        trajectories: torch.Tensor,
        observations: torch.Tensor,
        mask: torch.Tensor,
        inputs: torch.Tensor | None = None,
        *,
        weights: torch.Tensor | None = None,
        transition_steps: int = 5,
        learn_initial: bool = True,
    ) -> float:
        r"""Maximise (or, for ``W, U, b`` under ``tanh``, increase) the Monte Carlo EM objective in place.

        With trajectories :math:`h^{(s)}` ``(S,B,T,H)`` of weight :math:`w_s` (``weights``, default uniform;
        normalised to sum to one), the objective is

        .. math:: \hat Q(\theta) = \sum_s w_s \log p_\theta(h^{(s)}, y_{obs}),

        which separates into blocks, each solved given the trajectories:

        * output map, per output dim :math:`k` over the steps where :math:`y_{t,k}` is observed: weighted
          least squares of :math:`y_{t,k}` on :math:`(h_t, 1)` gives :math:`(C_k, d_k)`, and
          :math:`r_k^2` is the weighted mean squared residual;
        * initial state: :math:`m_0` and :math:`s_0^2` are the weighted mean and variance of :math:`h_0`;
        * recurrent weights, per hidden unit :math:`j`, regressors :math:`x_t = (h_{t-1}, u_t, 1)`:
          identity activation — weighted least squares of :math:`h_{t,j}` on :math:`x_t` (exact);
          ``tanh`` — ``transition_steps`` Levenberg-Marquardt (damped Gauss-Newton) steps on
          :math:`F_j = \sum w_s (h_{t,j} - \tanh(x_t^\top\theta_j))^2`, started at the current weights and
          accepted only where :math:`F_j` decreases (a generalised EM step: :math:`\hat Q` never decreases);
        * process noise given the new weights: :math:`q_j^2 = F_j / (B(T-1))` (closed form).

        Args:
            trajectories: ``(S,B,T,H)`` smoothed paths (detached).
            observations, mask: ``(B,T,D)`` (missing entries: any finite value, mask False).
            inputs: ``(B,T,I)`` or None.
            weights: ``(S,)`` non-negative path weights (e.g. SAEM averaging over iterations).
            transition_steps: Levenberg-Marquardt steps for ``tanh`` (ignored for the identity).
            learn_initial: update ``m0``, ``s0``.

        Returns:
            :math:`\hat Q` at the new parameters (a float).
        """
        import math

        with torch.no_grad():
            dt = self.C.dtype
            h = trajectories.detach().to(dt)
            S, B, T, H = h.shape
            y = observations.to(dt)
            mf = mask.to(dt)
            w = torch.full((S,), 1.0 / S, dtype=dt) if weights is None else weights.detach().to(dt)
            w = w / w.sum()
            log2pi = math.log(2 * math.pi)
            obj = 0.0
            # output map: per output dim WLS over observed steps
            # Szz[k] = sum_{s,b,t} w_s m_{btk} z z^T and Syz[k] = sum_{b,t} m_{btk} y_{btk} sum_s w_s z, z = (h_t, 1):
            # GEMMs over the (s, b, t) rows (no (S,B,T,D,H+1) temporaries)
            D = y.shape[-1]
            Z = torch.cat([h, torch.ones(S, B, T, 1, dtype=dt)], -1).reshape(S, B * T, H + 1)
            Zw = Z * w[:, None, None]
            v = mf.reshape(B * T, D)
            Szz = torch.empty(D, H + 1, H + 1, dtype=dt)
            full = None  # the sum over every row, shared by the output dims observed everywhere
            for k in range(D):
                if bool(v[:, k].all()):
                    if full is None:
                        full = Zw.reshape(-1, H + 1).T @ Z.reshape(-1, H + 1)
                    Szz[k] = full
                else:
                    Szz[k] = (Zw * v[:, k, None]).reshape(-1, H + 1).T @ Z.reshape(-1, H + 1)
            Syz = (mf * y).reshape(B * T, D).T @ (w @ Z.reshape(S, -1)).view(B * T, H + 1)
            Syy = (mf * y * y).sum((0, 1))
            n = mf.sum((0, 1))
            eye = torch.eye(H + 1, dtype=dt)
            ridge = 1e-10 * torch.diagonal(Szz, dim1=-2, dim2=-1).mean(-1).clamp_min(1e-30)
            theta = torch.linalg.solve(Szz + ridge[:, None, None] * eye, Syz.unsqueeze(-1)).squeeze(-1)
            seen = n > 0
            ssr = (Syy - (theta * Syz).sum(-1)).clamp_min(0.0)
            r2 = torch.where(seen, (ssr / n.clamp_min(1)).clamp_min(1e-12), self.r.detach() ** 2)
            self.C = torch.where(seen[:, None], theta[:, :H], self.C.detach())
            self.d = torch.where(seen, theta[:, H], self.d.detach())
            self.r = r2.sqrt()
            obj -= 0.5 * float((n * (1 + torch.log(r2) + log2pi)).sum())
            # initial state
            h0 = h[:, :, 0]
            if learn_initial:
                m0 = torch.einsum("s,sbh->h", w, h0) / B
                s02 = (torch.einsum("s,sbh->h", w, (h0 - m0) ** 2) / B).clamp_min(1e-12)
                self.m0 = m0
                self.s0 = s02.sqrt()
            s02 = self.s0.detach() ** 2
            obj -= 0.5 * float((torch.einsum("s,sbh->h", w, (h0 - self.m0.detach()) ** 2) / s02
                                + B * (torch.log(s02) + log2pi)).sum())
            if T < 2:
                return obj
            # recurrent weights
            wm = w[:, None].expand(S, B * (T - 1)).reshape(-1)  # (M,)
            P_ = H + self.input_dim + 1
            th = [self.W.detach()]
            if self.input_dim:
                th.append(self.U.detach())
            th.append(self.b.detach()[:, None])
            Th = torch.cat(th, 1)  # (H, P)
            eyeP = torch.eye(P_, dtype=dt)
            if self.activation == "identity":
                parts = [h[:, :, :-1]]
                if self.input_dim:
                    parts.append(inputs[:, 1:T].to(dt).expand(S, B, T - 1, self.input_dim))
                parts.append(torch.ones(S, B, T - 1, 1, dtype=dt))
                X = torch.cat(parts, -1).reshape(-1, P_)  # (M, P): rows x_t = (h_{t-1}, u_t, 1)
                Yt = h[:, :, 1:].reshape(-1, H)  # (M, H)
                Sxx = torch.einsum("m,mp,mq->pq", wm, X, X)
                Syx = torch.einsum("m,mj,mp->jp", wm, Yt, X)
                rid = 1e-10 * torch.diagonal(Sxx).mean().clamp_min(1e-30)
                Th = torch.linalg.solve(Sxx + rid * eyeP, Syx.T).T
                F = (wm[:, None] * (Yt - X @ Th.T) ** 2).sum(0)
            else:
                # unit-major layout (P, M) / (H, M), m = (s, b, t): a unit's activations and residuals are one
                # contiguous row, so the per-unit acceptance below copies rows; the path weights are folded into
                # the regressors once
                lam = torch.full((H,), 1e-3, dtype=dt)
                M_ = S * B * (T - 1)
                hT = h.permute(3, 0, 1, 2).contiguous()  # (H,S,B,T)
                Xt = torch.empty(P_, M_, dtype=dt)  # rows: h_{t-1}, u_t, 1
                Xt[:H].view(H, S, B, T - 1).copy_(hT[..., :-1])
                if self.input_dim:
                    Xt[H:-1].view(-1, S, B, T - 1).copy_(inputs[:, 1:T].to(dt).permute(2, 0, 1).unsqueeze(1))
                Xt[-1] = 1.0
                Yh = hT[..., 1:].reshape(H, M_)  # (H, M): h_t
                del hT
                if transition_steps:  # equal rows (x_m, h_m) merged, their weights summed: F_j is unchanged
                    Xt, Yh, wm = _merge_equal_columns(Xt, Yh, wm)
                    M_ = Xt.shape[1]
                a = torch.tanh(Th @ Xt)  # (H,M) at the current weights
                R = Yh - a  # residuals
                F = R.square() @ wm  # (H,)
                one = torch.ones((), dtype=dt)
                Xwt = Xt * wm  # (P,M): w x
                # J^T W J = sum_m w g_j^2 x x^T with x = (features, 1): the feature block from the products w x_p x_q
                # of the pairs p <= q of feature columns (shared by every LM step when they fit in ~128 MB of
                # float32), the last row/column (the constant regressor) from sum_m w g_j^2 x
                nf = P_ - 1
                iu = torch.triu_indices(nf, nf)
                upper, lower = iu[0] * P_ + iu[1], iu[1] * P_ + iu[0]
                XXw = None  # (nf(nf+1)/2, M), rows in the order of iu
                if transition_steps and M_ * iu.shape[1] <= 1 << 25:
                    XXw = torch.empty(iu.shape[1], M_, dtype=dt)
                    r0 = 0
                    for p in range(nf):
                        torch.mul(Xwt[p:p + 1], Xt[p:nf], out=XXw[r0:r0 + nf - p])
                        r0 += nf - p
                # (H,M) work buffers, allocated once (fresh multi-MB temporaries cost page faults every step);
                # a/R and a_new/R_new swap roles after each step
                g, gR, sq = torch.empty_like(a), torch.empty_like(a), torch.empty_like(a)
                a_new, R_new = torch.empty_like(a), torch.empty_like(a)
                for _ in range(int(transition_steps)):
                    torch.addcmul(one, a, a, value=-1.0, out=g)  # tanh' = 1 - a^2, (H,M)
                    torch.mul(g, R, out=gR)
                    c = g.square_()  # g^2
                    if XXw is not None:  # one GEMM: (H,M) @ (M, nf(nf+1)/2), then the symmetric fill
                        tri = c @ XXw.T
                        JtJ = torch.empty(H, P_ * P_, dtype=dt)
                        JtJ[:, upper] = tri
                        JtJ[:, lower] = tri
                        JtJ = JtJ.view(H, P_, P_)
                        cx = c @ Xwt.T  # (H,P): sum_m w g_j^2 x
                        JtJ[:, -1, :] = cx
                        JtJ[:, :, -1] = cx
                    else:  # blocks of units, so the (units, P, M) temporary stays under ~128 MB
                        JtJ = torch.empty(H, P_, P_, dtype=dt)
                        blk = max(1, (1 << 24) // max(M_ * P_, 1))
                        for j0 in range(0, H, blk):
                            JtJ[j0:j0 + blk] = (Xwt.unsqueeze(0) * c[j0:j0 + blk].unsqueeze(1)) @ Xt.T
                    Jtr = gR @ Xwt.T  # (H,P): sum_m w g_j (h_j - a_j) x
                    diag = torch.diagonal(JtJ, dim1=-2, dim2=-1)
                    A = JtJ + (lam[:, None] * (diag + 1e-12))[..., None] * eyeP
                    step = torch.linalg.solve(A, Jtr.unsqueeze(-1)).squeeze(-1)
                    Th_new = Th + step
                    torch.mm(Th_new, Xt, out=a_new).tanh_()
                    torch.sub(Yh, a_new, out=R_new)
                    F_new = torch.square(R_new, out=sq) @ wm  # (H,)
                    ok = torch.isfinite(F_new) & (F_new <= F)
                    if bool(ok.all()):  # every unit accepts
                        Th, F = Th_new, F_new
                    else:  # per hidden unit (row): keep the rejected units' rows
                        for j in (~ok).nonzero().flatten().tolist():
                            a_new[j] = a[j]
                            R_new[j] = R[j]
                        Th = torch.where(ok[:, None], Th_new, Th)
                        F = torch.where(ok, F_new, F)
                    a, a_new, R, R_new = a_new, a, R_new, R
                    lam = torch.where(ok, lam * 0.3, lam * 10.0).clamp(1e-9, 1e9)
            self.W = Th[:, :H]
            if self.input_dim:
                self.U = Th[:, H:H + self.input_dim]
            self.b = Th[:, -1]
            N = B * (T - 1)
            q2 = (F / N).clamp_min(1e-12)
            self.q = q2.sqrt()
            obj -= 0.5 * float((N * (1 + torch.log(q2) + log2pi)).sum())
            return obj
