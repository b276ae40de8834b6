r"""The Deep Markov Model: a gated nonlinear transition and an MLP emission, with non-Gaussian emissions.

Krishnan, Shalit & Sontag, "Structured Inference Networks for Nonlinear State Space Models" (AAAI 2017), as
in Pyro's DMM example (``GatedTransition`` and ``Emitter``). With :math:`\operatorname{relu}` hidden layers,
:math:`\sigma` the logistic function and :math:`\operatorname{softplus}(x)=\log(1+e^x)`:

.. math::
    g_t &= \sigma\big(W_{g2}\operatorname{relu}(W_{g1} z_{t-1} + V_g u_t + b_{g1}) + b_{g2}\big)
        &&\text{(gate)}\\
    \tilde z_t &= W_{p2}\operatorname{relu}(W_{p1} z_{t-1} + V_p u_t + b_{p1}) + b_{p2}
        &&\text{(proposed mean)}\\
    \mu_t &= (1-g_t)\odot(W_\ell z_{t-1} + b_\ell) + g_t\odot\tilde z_t,\qquad
    \sigma_t = \operatorname{softplus}\big(W_s\operatorname{relu}(\tilde z_t) + b_s\big)\\
    z_t &\sim N(\mu_t, \operatorname{diag}\sigma_t^2),\qquad z_0\sim N(m_0,\operatorname{diag}s_0^2)\\
    \eta_t &= E_3\operatorname{relu}\big(E_2\operatorname{relu}(E_1 z_t + c_1) + c_2\big) + c_3
        &&\text{(emission MLP)}

and, by ``emission``:

* ``"gaussian"``: :math:`y_t\sim N(\eta_t, \operatorname{diag} r^2)`;
* ``"bernoulli"``: :math:`y_{t,k}\sim\operatorname{Bernoulli}(\operatorname{logit}=\eta_{t,k})` (binary data, e.g. the
  polyphonic music of the DMM paper);
* ``"student_t"``: :math:`y_{t,k}\sim t_\nu(\eta_{t,k}, r_k)` with learnt degrees of freedom :math:`\nu>0`
  (heavy-tailed noise).

``W_\ell`` starts at the identity (the DMM's linear skip). The process noise :math:`\sigma_t` depends on the
state, so the model declares no ``noise_scales`` (BPTT, which sets a global process noise, does not apply); the
transition is still a diagonal Gaussian given :math:`z_{t-1}`, so it declares ``transition_loc_scale``, and with
the Gaussian emission ``emission_loc_scale``. The EKF (autograd Jacobians) applies only with
``emission="gaussian"``; particle filters/smoothers, Monte Carlo EM (gradient M-step) and SVI apply to all three.
"""

from __future__ import annotations

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.distributions import constraints
from pyro.nn import PyroParam

from ppl_rnn.errors import ConfigurationError
from ppl_rnn.model import StateSpaceModel, size_argument
from ppl_rnn.rng import check_seed

from ._rnn_common import positive_vector

EMISSIONS = ("gaussian", "bernoulli", "student_t")


def _uniform(g, shape, bound, dt):
    return (2 * torch.rand(shape, generator=g, dtype=torch.float64) - 1).mul_(bound).to(dt)


class DeepMarkovSSM(StateSpaceModel):
    """Deep Markov Model (module docstring).

    Args:
        hidden_dim: the latent dimension (keyword alias ``latent_dim``).
        obs_dim, input_dim: sizes.
        emission: ``"gaussian"``, ``"bernoulli"`` or ``"student_t"``.
        transition_hidden, emission_hidden: widths of the MLPs' hidden layers.
        obs_noise: initial ``r`` (Gaussian and Student-t).
        df: initial degrees of freedom of the Student-t emission.
        init_scale: initial ``s0``.
        seed: seed of the random initial weights.
    """

    conditional_parts = {"transition": ("transition_loc_scale",), "emission": ("emission_params",)}

    def __init__(self, hidden_dim: int | None = None, obs_dim: int = 1, input_dim: int = 0, *,
                 latent_dim: int | None = None, emission: str = "gaussian", transition_hidden: int = 16,
                 emission_hidden: int = 16, obs_noise=0.1, df: float = 5.0, init_scale=1.0, seed: int = 0):
        latent_dim = size_argument("DeepMarkovSSM", hidden_dim, "latent_dim", latent_dim)
        super().__init__(latent_dim, obs_dim, input_dim)
        if emission not in EMISSIONS:
            raise ConfigurationError(f"emission must be one of {EMISSIONS}; found {emission!r}.")
        for nm, v in (("transition_hidden", transition_hidden), ("emission_hidden", emission_hidden)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigurationError(f"{nm} must be an int >= 1; found {v!r}.")
        self.emission_kind = emission
        Z, D, I, Ht, He = latent_dim, obs_dim, input_dim, transition_hidden, emission_hidden
        g = torch.Generator().manual_seed(check_seed(seed) or 0)
        dt = torch.get_default_dtype()
        # affine layers name -> (in, out, bias), initialised like torch.nn.Linear: U(-1/sqrt(in), 1/sqrt(in))
        layers = {"gate1": (Z, Ht, True), "gate2": (Ht, Z, True), "prop1": (Z, Ht, True), "prop2": (Ht, Z, True),
                  "lin": (Z, Z, True), "scale": (Z, Z, True), "emit1": (Z, He, True), "emit2": (He, He, True),
                  "emit3": (He, D, True)}
        if I:
            layers.update(gate_u=(I, Ht, False), prop_u=(I, Ht, False))
        for name, (n_in, n_out, bias) in layers.items():
            bound = 1.0 / n_in**0.5
            setattr(self, f"{name}_w", PyroParam(_uniform(g, (n_out, n_in), bound, dt)))
            if bias:
                setattr(self, f"{name}_b", PyroParam(_uniform(g, (n_out,), bound, dt)))
        self.lin_w = torch.eye(Z, dtype=dt)  # the linear skip starts at the identity
        self.lin_b = torch.zeros(Z, dtype=dt)
        self.m0 = PyroParam(torch.zeros(Z, dtype=dt))
        self.s0 = PyroParam(positive_vector(init_scale, Z, "init_scale"), constraint=constraints.positive)
        if emission != "bernoulli":
            self.r = PyroParam(positive_vector(obs_noise, D, "obs_noise"), constraint=constraints.positive)
        if emission == "student_t":
            self.df = PyroParam(positive_vector(df, 1, "df")[0], constraint=constraints.positive)

    def _affine(self, name: str, x: torch.Tensor, bias: bool = True) -> torch.Tensor:
        y = x @ getattr(self, f"{name}_w").T
        return y + getattr(self, f"{name}_b") if bias else y

    # ---- conditionals ------------------------------------------------------------------------
    def initial(self, u0):
        return dist.Normal(self.m0, self.s0).to_event(1)

    def transition_loc_scale(self, t, h_prev, u_t):
        r"""``(loc, scale)`` of :meth:`transition`: :math:`(\mu_t, \sigma_t)` (module docstring)."""
        a_g, a_p = self._affine("gate1", h_prev), self._affine("prop1", h_prev)
        if u_t is not None:
            a_g = a_g + self._affine("gate_u", u_t, bias=False)
            a_p = a_p + self._affine("prop_u", u_t, bias=False)
        gate = torch.sigmoid(self._affine("gate2", F.relu(a_g)))
        prop = self._affine("prop2", F.relu(a_p))
        loc = (1 - gate) * self._affine("lin", h_prev) + gate * prop
        scale = F.softplus(self._affine("scale", F.relu(prop))).clamp_min(1e-6)
        return loc, scale

    def transition(self, t, h_prev, u_t):
        loc, scale = self.transition_loc_scale(t, h_prev, u_t)
        return dist.Normal(loc, scale).to_event(1)

    def emission_params(self, t, h, u_t) -> torch.Tensor:
        r""":math:`\eta_t`: the emission MLP's output."""
        return self._affine("emit3", F.relu(self._affine("emit2", F.relu(self._affine("emit1", h)))))

    def emission(self, t, h, u_t):
        eta = self.emission_params(t, h, u_t)
        if self.emission_kind == "gaussian":
            return dist.Normal(eta, self.r).to_event(1)
        if self.emission_kind == "bernoulli":
            return dist.Bernoulli(logits=eta).to_event(1)
        return dist.StudentT(self.df, eta, self.r).to_event(1)

    def emission_loc_scale(self, t, h, u_t):
        r"""``(loc, scale)`` of the Gaussian :meth:`emission`: :math:`(\eta_t, r)` (``emission="gaussian"`` only)."""
        return self.emission_params(t, h, u_t), self.r

    def capability_applies(self, name: str) -> bool:
        if name == "emission_loc_scale":
            return self.emission_kind == "gaussian"
        return True

    def __repr__(self) -> str:
        return (f"DeepMarkovSSM(latent_dim={self.hidden_dim}, obs_dim={self.obs_dim}, input_dim={self.input_dim}, "
                f"emission={self.emission_kind!r})")


__all__ = ["DeepMarkovSSM", "EMISSIONS"]
