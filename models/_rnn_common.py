r"""Shared pieces of the recurrent model suite (private).

Most suite models share the Elman network's Gaussian frame and differ only in the transition mean:

.. math::
    h_0 \sim N(m_0, \operatorname{diag} s_0^2),\qquad
    h_t = f_\theta(h_{t-1}, u_t) + e_t,\ e_t\sim N(0,\operatorname{diag} q^2),\qquad
    y_t = C\,h_{t}[a{:}b] + d + v_t,\ v_t\sim N(0,\operatorname{diag} r^2)

where :math:`h_t[a{:}b]` is the part of the state the readout sees (``readout``: the whole state, an LSTM's
``h`` half, a stack's top layer). :class:`GaussianRNNBase` implements the frame, the emission's capabilities,
the noise scales, the flat weight vector and the generic Levenberg-Marquardt / closed-form M-step
(:meth:`GaussianRNNBase.closed_form_mstep`, maths in :mod:`._lm_mstep`); a subclass writes the mean as one pure
function of its parameters, ``transition_parts`` (with the affine blocks the M-step moves: ``blocks_from`` /
``params_from``), or just ``transition_mean`` (no M-step then), and, where cheap, an analytic
``transition_jacobian``.

**The defining-class rule** (:mod:`ppl_rnn.capabilities`): a capability that reads the transition is valid
only when defined by the class that defines the transition (or one of its parts, ``transition_mean`` and
``transition_parts``). A subclass that writes its own mean therefore re-declares the frame's transition
capabilities with :func:`redeclare`, explicitly, naming each one it vouches for (``closed_form_mstep`` among them
where its ``transition_parts`` and blocks are written).
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.nn import PyroParam
from torch.distributions import transform_to

from ppl_rnn.errors import ConfigurationError
from ppl_rnn.model import StateSpaceModel, pack_params, set_param, unpack_params

NOISE_ROLES = {"initial": "s0", "process": "q", "obs": "r"}


def positive_vector(v, n: int, name: str) -> torch.Tensor:
    """A positive scalar or length-``n`` vector as a float tensor of shape ``(n,)`` (ConfigurationError else)."""
    try:
        t = torch.as_tensor(v, dtype=torch.get_default_dtype())
    except (TypeError, ValueError, RuntimeError):
        raise ConfigurationError(f"{name} must be a positive scalar or vector of length {n}; found {v!r}.") from None
    if t.dim() == 0:
        t = t.expand(n)
    t = t.clone()
    if t.shape != (n,) or not bool(torch.isfinite(t).all()) or not bool((t > 0).all()):
        raise ConfigurationError(f"{name} must be a positive scalar or a positive vector of length {n}; found {v!r}.")
    return t


def check_real(v, name: str, *, low: float = 0.0, high: float = math.inf, open_low: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v > high or (
            v <= low if open_low else v < low):
        lo = "(" if open_low else "["
        raise ConfigurationError(f"{name} must be a real number in {lo}{low}, {high}]; found {v!r}.")
    return float(v)


def redeclare(*names: str):
    """Class decorator: copy the named capabilities from the nearest base into this class's own namespace.

    Used by a subclass that defines its own transition (or ``transition_mean``): the defining-class rule then
    accepts those base implementations, because the subclass states here that they describe its conditionals.
    Only name capabilities the subclass's conditionals really keep (e.g. ``transition_loc_scale`` for a
    diagonal-Gaussian transition ``N(transition_mean, diag q^2)``)."""

    def deco(cls):
        for n in names:
            for k in cls.__mro__[1:]:
                if n in k.__dict__:
                    setattr(cls, n, k.__dict__[n])
                    break
            else:  # pragma: no cover - programming error
                raise TypeError(f"no base of {cls.__name__} defines {n}")
        return cls

    return deco


class GaussianRNNBase(StateSpaceModel):
    """The Gaussian frame (module docstring). Subclasses call :meth:`_init_frame` and write ``transition_mean``.

    Class attributes a subclass sets: ``recurrent_params`` (names :meth:`perturb` redraws).
    """

    conditional_parts = {"transition": ("transition_mean", "transition_parts")}
    recurrent_params: tuple[str, ...] = ()
    #: every parameter or buffer the transition mean reads (by :meth:`transition_with`); names a model lacks
    #: (``U`` without inputs) are skipped
    transition_params: tuple[str, ...] = ()

    def _init_frame(self, g: torch.Generator, *, readout: tuple[int, int] | None = None, process_noise=0.1,
                    obs_noise=0.1, init_scale=1.0, learn_process_noise: bool = True,
                    learn_initial_mean: bool = True) -> None:
        """Readout ``C`` (small random), ``d``, noise scales ``q``, ``r``, ``s0`` and initial mean ``m0``."""
        H, D = self.hidden_dim, self.obs_dim
        a, b = (0, H) if readout is None else readout
        if not (0 <= a < b <= H):
            raise ConfigurationError(f"readout must be a slice (a, b) of the state with 0 <= a < b <= {H}; found {readout!r}.")
        self.readout = (a, b)
        dt = torch.get_default_dtype()
        self.C = PyroParam(torch.randn(D, b - a, generator=g, dtype=dt) / (b - a) ** 0.5)
        self.d = PyroParam(torch.zeros(D, dtype=dt))
        q = positive_vector(process_noise, H, "process_noise")
        if learn_process_noise:
            self.q = PyroParam(q, constraint=constraints.positive)
        else:
            self.register_buffer("q", q)
        self.r = PyroParam(positive_vector(obs_noise, D, "obs_noise"), constraint=constraints.positive)
        if learn_initial_mean:
            self.m0 = PyroParam(torch.zeros(H, dtype=dt))
        else:
            self.register_buffer("m0", torch.zeros(H, dtype=dt))
        self.s0 = PyroParam(positive_vector(init_scale, H, "init_scale"), constraint=constraints.positive)

    # ---- conditionals ----------------------------------------------------------------------
    def transition_parts(self, p: dict, h_prev, u_t, shift: dict | None = None):  # pragma: no cover - abstract
        r"""The transition mean :math:`f_\theta(h_{t-1}, u_t)` with parameter values ``p`` (name -> tensor, the names of
        ``transition_params``): one pure function, read by the conditional and by the Levenberg-Marquardt M-step
        (:mod:`._lm_mstep`). With ``shift`` (name -> ``(..., K_g)``, the M-step's probe) the mean's affine
        pre-activations :math:`a_g = X_g\Theta_g^\top` get ``shift[g]`` added and the call returns
        ``(mean, features)`` with ``features[g] = X_g``; without, it returns the mean."""
        raise NotImplementedError

    def transition_values(self) -> dict:
        """name -> current value of each of ``transition_params`` the model has (with gradients)."""
        return {n: getattr(self, n) for n in self.transition_params if hasattr(self, n)}

    def transition_mean(self, t, h_prev, u_t):
        """:meth:`transition_parts` at the model's current parameters."""
        return self.transition_parts(self.transition_values(), h_prev, u_t)

    def initial(self, u0):
        return dist.Normal(self.m0, self.s0).to_event(1)

    def transition(self, t, h_prev, u_t):
        return dist.Normal(self.transition_mean(t, h_prev, u_t), self.q).to_event(1)

    def _readout_state(self, h):
        a, b = self.readout
        return h if (a, b) == (0, self.hidden_dim) else h[..., a:b]

    def emission(self, t, h, u_t):
        return dist.Normal(self._readout_state(h) @ self.C.T + self.d, self.r).to_event(1)

    # ---- capabilities ----------------------------------------------------------------------
    def transition_loc_scale(self, t, h_prev, u_t):
        r"""``(loc, scale)`` of :meth:`transition`: ``(transition_mean(t, h_prev, u_t), q)``."""
        return self.transition_mean(t, h_prev, u_t), self.q

    def emission_loc_scale(self, t, h, u_t):
        r"""``(loc, scale)`` of :meth:`emission`: :math:`(C h[a{:}b] + d,\ r)`."""
        return self._readout_state(h) @ self.C.T + self.d, self.r

    def _full_C(self) -> torch.Tensor:
        a, b = self.readout
        C = self.C
        if (a, b) == (0, self.hidden_dim):
            return C
        D = self.obs_dim
        return torch.cat([C.new_zeros(D, a), C, C.new_zeros(D, self.hidden_dim - b)], -1)

    def emission_jacobian(self, t, h, u_t):
        r""":math:`\partial g/\partial h = [0,\ C,\ 0]` (``C`` in the readout's columns), ``(..., D, H)``."""
        C = self._full_C()
        return C.expand(h.shape[:-1] + C.shape)

    def linear_gaussian_emission(self, t, u_t):
        r""":math:`y_t = [0, C, 0] h_t + d + v_t`: ``(C_full, d, diag r^2)``."""
        return self._full_C(), self.d, torch.diag(self.r**2)

    def noise_scales(self) -> dict[str, torch.Tensor]:
        """Standard deviations: ``initial`` = s0, ``process`` = q, ``obs`` = r (vectors)."""
        return {role: getattr(self, n) for role, n in NOISE_ROLES.items()}

    @torch.no_grad()
    def set_noise_scales(self, **scales: torch.Tensor) -> None:
        for role, v in scales.items():
            if role not in NOISE_ROLES:
                raise ConfigurationError(f"noise role must be one of {sorted(NOISE_ROLES)}; found {role!r}.")
            n = NOISE_ROLES[role]
            cur = getattr(self, n)
            v = torch.as_tensor(v, dtype=cur.dtype).expand(cur.shape)
            if n in self._pyro_params:
                set_param(self, n, v)
            else:  # a fixed (buffer) scale
                cur.copy_(v)

    def _weight_names(self) -> tuple[str, ...]:
        noise = set(NOISE_ROLES.values())
        real = type(constraints.real)  # by type: model.copy() (a deepcopy) copies the constraint objects
        return tuple(n for n, (c, _) in self._pyro_params.items() if n not in noise and type(c) is real)

    def weights(self) -> torch.Tensor:
        """Every unconstrained trained parameter except the noise scales, flattened in declaration order (detached
        copy), so any real vector is a valid :meth:`set_weights` argument. Constrained network parameters (a CTRNN's
        time constants, a Jordan context's self-connections) are left out."""
        return pack_params(self, self._weight_names())

    @torch.no_grad()
    def set_weights(self, vector: torch.Tensor) -> None:
        unpack_params(self, self._weight_names(), vector)

    @torch.no_grad()
    def perturb(self, scale: float, generator: torch.Generator) -> None:
        """Each recurrent weight array ``w`` (``recurrent_params``) becomes ``(1 - scale) w + scale * rms(w) * N(0, 1)``:
        a restart candidate near this network (``scale=1``: a fresh draw at the same size)."""
        for n in self.recurrent_params:
            old = getattr(self, n).detach()
            rms = float(old.pow(2).mean().sqrt()) or 1.0
            noise = torch.randn(old.shape, generator=generator, dtype=torch.float64).to(old.dtype)
            set_param(self, n, (1.0 - scale) * old + scale * rms * noise)


    # ---- the generic Levenberg-Marquardt / closed-form M-step (models/_lm_mstep.py) --------------------------
    def blocks_from(self, p: dict) -> tuple[dict, dict]:  # pragma: no cover - abstract
        r"""``(blocks, masks)``: the affine blocks :math:`\Theta_g` ``(K_g, L_g)`` of the trained transition parameters
        (free coordinates) at parameter values ``p``, and bool masks of their free entries (absent: all free)."""
        raise NotImplementedError

    def params_from(self, blocks: dict) -> dict:  # pragma: no cover - abstract
        """Inverse of :meth:`blocks_from`: name -> value of every entry of ``transition_params`` (fixed ones kept)."""
        raise NotImplementedError

    def lm_blocks(self) -> tuple[dict, dict]:
        """:meth:`blocks_from` at the current (detached) parameters."""
        return self.blocks_from({n: v.detach() for n, v in self.transition_values().items()})

    def lm_mean(self, blocks: dict, h_prev, u_t, shift: dict | None):
        """``(mean, features)`` (``features`` None without ``shift``) at the parameters of ``blocks``."""
        out = self.transition_parts(self.params_from(blocks), h_prev, u_t, shift)
        return out if shift is not None else (out, None)

    def lm_admissible(self, blocks: dict) -> bool:
        r"""Whether ``blocks`` give finite parameters, constrained ones strictly inside their support (a CTRNN's
        :math:`\tau = \mathrm{dt} + e^z` overflows to inf, or rounds to dt, for a wild step in :math:`z`)."""
        for n, v in self.params_from(blocks).items():
            if not bool(torch.isfinite(v).all()):
                return False
            if n in self._pyro_params and not bool(
                    torch.isfinite(transform_to(self._pyro_params[n][0]).inv(v)).all()):
                return False
        return True

    @torch.no_grad()
    def lm_write(self, blocks: dict) -> None:
        """Set the trained transition parameters from ``blocks``."""
        for n, v in self.params_from(blocks).items():
            if n in self._pyro_params:
                set_param(self, n, v)

    def learnable_process_noise(self) -> torch.Tensor:
        """``(H,)`` bool: which process-noise scales the M-step re-estimates (the others are fixed buffers)."""
        return torch.full((self.hidden_dim,), "q" in self._pyro_params, dtype=torch.bool)

    def closed_form_mstep(self, trajectories: torch.Tensor, observations: torch.Tensor, mask: torch.Tensor,
                          inputs: torch.Tensor | None = None, *, weights: torch.Tensor | None = None,
                          transition_steps: int = 5, learn_initial: bool = True) -> float:
        r"""Increase :math:`\hat Q=\sum_s w_s\log p_\theta(h^{(s)}, y)` in place and return it (generalised EM):
        readout and observation noise by weighted least squares, initial state in closed form, the transition's
        parameters by ``transition_steps`` Levenberg-Marquardt steps with the process noise in closed form
        (:mod:`ppl_rnn.models._lm_mstep` has the maths). ``trajectories`` ``(S,B,T,H)``; ``observations``, ``mask``
        ``(B,T,D)``; ``inputs`` ``(B,T,I)`` or None; ``weights`` ``(S,)`` (default uniform; normalised)."""
        from ._lm_mstep import transition_mstep

        with torch.no_grad():
            h = trajectories.detach().to(self.dtype)
            S, B, T, H = h.shape
            dt = h.dtype
            w = torch.full((S,), 1.0 / S, dtype=dt) if weights is None else weights.detach().to(dt)
            w = w / w.sum()
            obj = readout_mstep(self, h, observations.to(dt), mask, w)
            obj += initial_scale_mstep(self, h[:, :, 0], w, learn_mean=learn_initial and "m0" in self._pyro_params,
                                       learn_scale=learn_initial)
        if T < 2:
            return obj
        return obj + transition_mstep(self, h, inputs, w, transition_steps)


# ---- closed-form blocks of the Monte Carlo EM objective (weighted least squares) ---------------------------
def readout_mstep(model: GaussianRNNBase, h: torch.Tensor, y: torch.Tensor, mask: torch.Tensor,
                  w: torch.Tensor) -> float:
    r"""Maximise :math:`\sum_s w_s\sum_{t}\log N(y_{t,o}; C h^{(s)}_t[a{:}b] + d, \operatorname{diag} r^2)` over
    ``C, d, r`` in place (per output: weighted least squares over the steps where it is observed; an output
    never observed keeps its values). ``h`` ``(S,B,T,H)``, ``y``/``mask`` ``(B,T,D)``, ``w`` ``(S,)`` summing to 1.
    Returns the maximised value."""
    dt = h.dtype
    S, B, T, _ = h.shape
    x = model._readout_state(h)
    K = x.shape[-1]
    mf = mask.to(dt)
    y = torch.where(mask, y, torch.zeros((), dtype=dt)).to(dt)
    z = torch.cat([x, torch.ones(S, B, T, 1, dtype=dt)], -1)
    Szz = torch.einsum("s,btk,sbtp,sbtq->kpq", w, mf, z, z)
    Syz = torch.einsum("s,btk,sbtp->kp", w, mf * y, z)
    n = mf.sum((0, 1))
    ridge = 1e-10 * torch.diagonal(Szz, dim1=-2, dim2=-1).mean(-1).clamp_min(1e-30)
    theta = torch.linalg.solve(Szz + ridge[:, None, None] * torch.eye(K + 1, dtype=dt), Syz.unsqueeze(-1)).squeeze(-1)
    seen = n > 0
    # the residuals themselves, not Syy - theta.Syz (which cancels catastrophically for large states)
    ssr = torch.einsum("s,btk,sbtk->k", w, mf, (y - z @ theta.T) ** 2)
    r2 = torch.where(seen, (ssr / n.clamp_min(1)).clamp_min(1e-12), model.r.detach() ** 2)
    set_param(model, "C", torch.where(seen[:, None], theta[:, :K], model.C.detach()))
    set_param(model, "d", torch.where(seen, theta[:, K], model.d.detach()))
    set_param(model, "r", r2.sqrt())
    return -0.5 * float((n * (1 + torch.log(r2) + math.log(2 * math.pi))).sum())


def initial_scale_mstep(model: GaussianRNNBase, h0: torch.Tensor, w: torch.Tensor, *, learn_mean: bool,
                        learn_scale: bool = True) -> float:
    r"""Maximise :math:`\sum_s w_s \log N(h^{(s)}_0; m_0, \operatorname{diag}s_0^2)` over ``m0`` (if
    ``learn_mean``) and ``s0`` in place; ``h0`` ``(S,B,H)``. Returns the value at the new parameters."""
    B = h0.shape[1]
    if learn_mean:
        set_param(model, "m0", torch.einsum("s,sbh->h", w, h0) / B)
    m0 = model.m0.detach()
    if learn_scale:
        set_param(model, "s0", (torch.einsum("s,sbh->h", w, (h0 - m0) ** 2) / B).clamp_min(1e-12).sqrt())
    s02 = model.s0.detach() ** 2
    return -0.5 * float((torch.einsum("s,sbh->h", w, (h0 - m0) ** 2) / s02
                         + B * (torch.log(s02) + math.log(2 * math.pi))).sum())


def embed_linear_frame(model: StateSpaceModel, p, gain: float) -> None:
    r"""The part of ``embed_linear`` every Elman-framed network shares: bias, noise scales, readout and initial
    state of the linear-Gaussian fit ``p`` with the states scaled by ``gain`` (:math:`b, q, m_0, s_0` times the
    gain, :math:`C` divided by it; :math:`d, r` as fitted). The recurrent matrix is the caller's."""
    dt = model.dtype

    def c(x):
        return torch.as_tensor(x).detach().to(dt)

    def sd(cov):
        return torch.diagonal(c(cov)).clamp_min(1e-24).sqrt()

    set_param(model, "b", gain * c(p.b))
    set_param(model, "q", gain * sd(p.Q))
    set_param(model, "C", c(p.C) / gain)
    set_param(model, "d", c(p.d))
    set_param(model, "r", sd(p.R))
    set_param(model, "m0", gain * c(p.m0))
    set_param(model, "s0", gain * sd(p.P0))


def rotation(n: int, generator: torch.Generator, *, gain: float = 1.1, scale: float = 0.25,
             dtype: torch.dtype | None = None) -> torch.Tensor:
    r""":math:`\text{gain}\cdot\exp\big(s(A - A^\top)\big)`, :math:`A_{ij}\sim N(0,1)` from ``generator``: a random
    rotation near the identity times a gain (eigenvalues :math:`\text{gain}\,e^{\pm i\omega}`, small :math:`\omega`;
    ``rotation_restart``'s draw, as ``ElmanSSM(weight_init="rotation")``)."""
    A = torch.randn(n, n, generator=generator, dtype=torch.float64)
    return (gain * torch.linalg.matrix_exp(scale * (A - A.T))).to(dtype or torch.get_default_dtype())


__all__ = ["GaussianRNNBase", "redeclare", "positive_vector", "check_real", "readout_mstep", "initial_scale_mstep",
           "rotation"]
