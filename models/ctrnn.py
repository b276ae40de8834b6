r"""Continuous-time recurrent networks as stochastic state-space models: CTRNN and MTRNN.

**CTRNN** (Beer 1995; the equation as given in the encyclopedia article "Recurrent neural network",
"Continuous-time RNN"; ``docs/references.md``): for neuron :math:`i` with activation :math:`y_i`,

.. math:: \tau_i\,\dot y_i = -y_i + \sum_j w_{ji}\,\sigma(y_j + \Theta_j) + I_i(t),
          \qquad \sigma(x) = 1/(1+e^{-x}),

with time constant :math:`\tau_i`, weight :math:`w_{ji}` from neuron :math:`j` to :math:`i`, bias
:math:`\Theta_j` and input current :math:`I_i(t) = (U u_t)_i + b_i` (``U``: input weights; ``b``: a constant
current, zero at start). Stored as the matrix ``W[i, j]`` :math:`= w_{ji}`. The explicit **Euler step** of
length ``dt`` (the sampling interval of the data, in the units of :math:`\tau`) plus Gaussian process noise is
the transition of the state :math:`h_t = y(t\,\mathrm{dt})`:

.. math::
    h_t = h_{t-1} + \alpha\odot\big(-h_{t-1} + W\sigma(h_{t-1} + \Theta) + U u_t + b\big) + e_t,\qquad
    \alpha_i = \mathrm{dt}/\tau_i,\ e_t\sim N(0,\operatorname{diag}q^2),

and the observation is a linear Gaussian readout of the activations, :math:`y_t = C h_t + d + v_t`,
:math:`v_t\sim N(0,\operatorname{diag} r^2)`; :math:`h_0\sim N(m_0,\operatorname{diag}s_0^2)`. The time constants are
constrained to :math:`\tau_i > \mathrm{dt}` (so :math:`0<\alpha_i<1`: the Euler step of the leak is stable) and
learnt by default (``learn_tau``). Jacobian of the mean (analytic):

.. math:: \partial f/\partial h_{t-1} = \operatorname{diag}(1-\alpha) + \operatorname{diag}(\alpha)\,W\,
          \operatorname{diag}\big(\sigma'(h_{t-1}+\Theta)\big).

**MTRNN** (Yamashita & Tani 2008, reference [20] of text ``001``, "Multiple Timescales Recurrent Neural
Network"): a CTRNN whose neurons form a *fast* group and a *slow* group with fixed time constants
``tau_fast`` < ``tau_slow``; inputs drive and the readout sees only the fast group (the input-output layer of
the original is the readout here), and the slow group talks to the world only through the fast one, so slow
context units can encode the sequence's slow structure. State: ``(fast, slow)`` concatenated.

Neither has a linear special case (the sigmoid has no identity regime), so neither declares
``linear_special_case``; both declare the diagonal-Gaussian shortcuts, the linear-Gaussian emission, analytic
Jacobians, noise scales, the weight vector, ``perturb``, the Levenberg-Marquardt M-step ``closed_form_mstep``
(:mod:`ppl_rnn.models._lm_mstep`: readout and noises in closed form; ``W, U, b`` with features
:math:`(\sigma(h_{t-1}+\Theta), u_t, 1)`, :math:`\Theta` and, where learnt, :math:`\log(\tau - \mathrm{dt})` by LM
steps) and ``rotation_restart`` (``W``).
"""

from __future__ import annotations

import torch
from pyro.distributions import constraints
from pyro.nn import PyroParam

from ppl_rnn.errors import ConfigurationError
from ppl_rnn.model import set_param
from ppl_rnn.rng import check_seed

from ._rnn_common import GaussianRNNBase, check_real, positive_vector, redeclare, rotation


@redeclare("transition_loc_scale", "closed_form_mstep")
class CTRNNSSM(GaussianRNNBase):
    """Stochastic Euler-discretised CTRNN (module docstring).

    Args:
        hidden_dim, obs_dim, input_dim: sizes.
        dt: the Euler step (time between observations, in the units of ``tau``).
        tau: initial time constants (scalar or per neuron), each > ``dt``.
        learn_tau: learn the time constants (else fixed buffers).
        weight_scale: ``W`` entries start as ``N(0, weight_scale^2 / H)``.
        process_noise, obs_noise, init_scale: initial ``q``, ``r``, ``s0``.
        seed: seed of the random initial weights.
    """

    recurrent_params = ("W", "theta")
    transition_params = ("W", "theta", "b", "U", "tau", "input_mask")

    def __init__(self, hidden_dim: int, obs_dim: int = 1, input_dim: int = 0, *, dt: float = 1.0, tau=2.0,
                 learn_tau: bool = True, weight_scale: float = 2.0, process_noise=0.1, obs_noise=0.1,
                 init_scale=1.0, seed: int = 0, _readout=None, _input_mask=None):
        super().__init__(hidden_dim, obs_dim, input_dim)
        self.dt = check_real(dt, "dt", open_low=True)
        weight_scale = check_real(weight_scale, "weight_scale")
        tau_v = positive_vector(tau, hidden_dim, "tau")
        if not bool((tau_v > self.dt).all()):
            raise ConfigurationError(f"tau must exceed dt={self.dt} (stable Euler step); found {tau!r}.")
        g = torch.Generator().manual_seed(check_seed(seed) or 0)
        H, I = hidden_dim, input_dim
        dtp = torch.get_default_dtype()
        self.W = PyroParam(weight_scale * torch.randn(H, H, generator=g, dtype=dtp) / H**0.5)
        self.theta = PyroParam(torch.zeros(H, dtype=dtp))
        self.b = PyroParam(torch.zeros(H, dtype=dtp))
        if I > 0:
            self.U = PyroParam(torch.randn(H, I, generator=g, dtype=dtp) / I**0.5)
            self.register_buffer("input_mask", torch.ones(H, 1, dtype=dtp) if _input_mask is None
                                 else _input_mask.to(dtp).reshape(H, 1))
        if learn_tau:
            self.tau = PyroParam(tau_v, constraint=constraints.greater_than(self.dt))
        else:
            self.register_buffer("tau", tau_v)
        self._init_frame(g, readout=_readout, process_noise=process_noise, obs_noise=obs_noise,
                         init_scale=init_scale)

    def transition_parts(self, p, h_prev, u_t, shift=None):
        r""":math:`h_{t-1} + \alpha\odot(-h_{t-1} + W\sigma(h_{t-1}+\Theta) + U u_t + b)`, :math:`\alpha=\mathrm{dt}/\tau`, with
        parameters ``p``. Affine blocks: ``"a"`` = ``[W, U, b]`` (features :math:`(\sigma(h_{t-1}+\Theta), u_t, 1)`;
        an MTRNN's slow rows of ``U`` are not free), ``"theta"`` = :math:`\Theta` and (when learnt) ``"tau"`` =
        :math:`\log(\tau-\mathrm{dt})`, each with the feature 1."""
        th = p["theta"] if shift is None else p["theta"] + shift["theta"]
        s = torch.sigmoid(h_prev + th)
        a = s @ p["W"].T + p["b"]
        if u_t is not None:
            a = a + u_t @ (p["U"] * p["input_mask"]).T
        tau = p["tau"]
        if shift is not None:
            a = a + shift["a"]
            if "tau" in shift:
                tau = self.dt + torch.exp(torch.log(tau - self.dt) + shift["tau"])
        mean = h_prev + (self.dt / tau) * (a - h_prev)
        if shift is None:
            return mean
        one = h_prev.new_ones(h_prev.shape[:-1] + (1,))
        feats = {"a": torch.cat([s, *(() if u_t is None else (u_t,)), one], -1), "theta": one}
        if "tau" in shift:
            feats["tau"] = one
        return mean, feats

    def blocks_from(self, p):
        blocks = {"a": torch.cat([p["W"], *((p["U"],) if self.input_dim else ()), p["b"][:, None]], 1),
                  "theta": p["theta"][:, None]}
        masks = {}
        if self.input_dim:
            m = torch.ones(blocks["a"].shape, dtype=torch.bool)
            m[:, self.hidden_dim:-1] = p["input_mask"].expand(self.hidden_dim, self.input_dim) != 0
            masks["a"] = m
        if "tau" in self._pyro_params:
            blocks["tau"] = torch.log(p["tau"] - self.dt)[:, None]
        return blocks, masks

    def params_from(self, blocks):
        H = self.hidden_dim
        a = blocks["a"]
        out = {"W": a[:, :H], "b": a[:, -1], "theta": blocks["theta"][:, 0],
               "tau": self.dt + torch.exp(blocks["tau"][:, 0]) if "tau" in blocks else self.tau.detach()}
        if self.input_dim:
            out["U"] = a[:, H:-1]
            out["input_mask"] = self.input_mask
        return out

    @torch.no_grad()
    def rotation_restart(self, generator: torch.Generator, *, gain: float = 1.1, rotation_scale: float = 0.25) -> None:
        r"""Redraw the recurrent matrix ``W`` as a random rotation near the identity times ``gain``
        (:func:`~._rnn_common.rotation`) scaled by 4, the inverse of the sigmoid's slope at 0: the linearised
        drive :math:`W\sigma'(0)` then has eigenvalues :math:`\text{gain}\,e^{\pm i\omega}`."""
        set_param(self, "W", 4.0 * rotation(self.hidden_dim, generator, gain=gain, scale=rotation_scale,
                                              dtype=self.W.dtype))

    def transition_jacobian(self, t, h_prev, u_t, mean=None):
        r""":math:`\operatorname{diag}(1-\alpha) + \operatorname{diag}(\alpha) W \operatorname{diag}(\sigma'(h_{t-1}+\Theta))`."""
        s = torch.sigmoid(h_prev + self.theta)
        alpha = self.dt / self.tau
        J = alpha.unsqueeze(-1) * self.W * (s * (1 - s)).unsqueeze(-2)
        return J + torch.diag_embed((1 - alpha).expand(J.shape[:-1]))

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(hidden_dim={self.hidden_dim}, obs_dim={self.obs_dim}, "
                f"input_dim={self.input_dim}, dt={self.dt})")


class MultipleTimescalesSSM(CTRNNSSM):
    """MTRNN: a CTRNN with a fast and a slow group of fixed time constants (module docstring).

    A model with two sizes: ``MultipleTimescalesSSM(fast_dim, slow_dim)``, or ``hidden_dim=N`` (keyword) for
    ``N`` neurons of which ``max(1, N // 3)`` are slow (the split ``ppl-rnn --model mtrnn --hidden N`` uses).

    Args:
        fast_dim, slow_dim: group sizes (state = fast then slow; ``hidden_dim = fast_dim + slow_dim``).
        hidden_dim: instead of ``fast_dim`` and ``slow_dim``: the total ``N >= 2``, split as above.
        obs_dim, input_dim: sizes.
        tau_fast, tau_slow: the groups' time constants (fixed; both > ``dt``, ``tau_fast < tau_slow``).
        dt, weight_scale, process_noise, obs_noise, init_scale, seed: as :class:`CTRNNSSM`.
    """

    def __init__(self, fast_dim: int | None = None, slow_dim: int | None = None, obs_dim: int = 1,
                 input_dim: int = 0, *, hidden_dim: int | None = None, tau_fast: float = 2.0, tau_slow: float = 20.0,
                 dt: float = 1.0, weight_scale: float = 2.0, process_noise=0.1, obs_noise=0.1, init_scale=1.0,
                 seed: int = 0):
        if hidden_dim is not None:
            if fast_dim is not None or slow_dim is not None:
                raise ConfigurationError(
                    f"MultipleTimescalesSSM takes its size either as hidden_dim (total, split fast/slow) or as "
                    f"fast_dim and slow_dim; found hidden_dim={hidden_dim!r}, fast_dim={fast_dim!r}, "
                    f"slow_dim={slow_dim!r}. Pass one form.")
            if isinstance(hidden_dim, bool) or not isinstance(hidden_dim, int) or hidden_dim < 2:
                raise ConfigurationError(f"MultipleTimescalesSSM: hidden_dim (fast + slow neurons) must be an int >= 2; "
                                         f"found {hidden_dim!r}.")
            slow_dim = max(1, hidden_dim // 3)
            fast_dim = hidden_dim - slow_dim
        elif fast_dim is None or slow_dim is None:
            raise ConfigurationError(f"MultipleTimescalesSSM needs fast_dim and slow_dim, or hidden_dim=N alone; found "
                                     f"fast_dim={fast_dim!r}, slow_dim={slow_dim!r}. Pass e.g. "
                                     "MultipleTimescalesSSM(4, 2) or MultipleTimescalesSSM(hidden_dim=6).")
        for nm, v in (("fast_dim", fast_dim), ("slow_dim", slow_dim)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigurationError(f"{nm} must be an int >= 1; found {v!r}.")
        tau_fast = check_real(tau_fast, "tau_fast", open_low=True)
        tau_slow = check_real(tau_slow, "tau_slow", open_low=True)
        if not tau_fast < tau_slow:
            raise ConfigurationError(f"tau_fast must be below tau_slow; found {tau_fast} and {tau_slow}.")
        tau = torch.cat([torch.full((fast_dim,), tau_fast), torch.full((slow_dim,), tau_slow)])
        mask = torch.cat([torch.ones(fast_dim), torch.zeros(slow_dim)])
        super().__init__(fast_dim + slow_dim, obs_dim, input_dim, dt=dt, tau=tau, learn_tau=False,
                         weight_scale=weight_scale, process_noise=process_noise, obs_noise=obs_noise,
                         init_scale=init_scale, seed=seed, _readout=(0, fast_dim), _input_mask=mask)
        self.fast_dim, self.slow_dim = fast_dim, slow_dim

    def __repr__(self) -> str:
        return (f"MultipleTimescalesSSM(fast_dim={self.fast_dim}, slow_dim={self.slow_dim}, obs_dim={self.obs_dim}, "
                f"input_dim={self.input_dim}, dt={self.dt})")


__all__ = ["CTRNNSSM", "MultipleTimescalesSSM"]
