r"""Gated recurrent cells as stochastic transitions: GRU and LSTM.

**GRU** (Cho et al. 2014), with :math:`\sigma` the logistic function and Gaussian process noise:

.. math::
    z_t &= \sigma(W_z u_t + U_z h_{t-1} + b_z), \qquad r_t = \sigma(W_r u_t + U_r h_{t-1} + b_r)\\
    \tilde h_t &= \tanh\big(W_h u_t + U_h (r_t\odot h_{t-1}) + b_h\big)\\
    h_t &= (1-z_t)\odot h_{t-1} + z_t\odot\tilde h_t + e_t,\quad e_t\sim N(0,\operatorname{diag}q^2)\\
    y_t &= C h_t + d + v_t,\quad v_t\sim N(0,\operatorname{diag}r^2),\qquad h_0\sim N(m_0,\operatorname{diag}s_0^2).

**LSTM** (Hochreiter & Schmidhuber 1997, with the forget gate of Gers et al.; the equations of S. Mohamed's
"Recurrent nets and dynamical systems", ``docs/references.md``, without its peephole terms :math:`Dc, Gc, Mc`):

.. math::
    i_t,f_t,o_t &= \sigma(W_{i,f,o} u_t + U_{i,f,o} h_{t-1} + b_{i,f,o}),\quad g_t = \tanh(W_g u_t + U_g h_{t-1} + b_g)\\
    c_t &= f_t\odot c_{t-1} + i_t\odot g_t + e^c_t,\qquad h_t = o_t\odot\tanh(f_t\odot c_{t-1} + i_t\odot g_t) + e^h_t\\
    y_t &= C h_t + d + v_t.

The state is :math:`(h_t, c_t)` concatenated (``hidden_dim = 2 * units``, ``h`` first); the readout sees ``h``.
Both means are functions of the previous state only (``h_t`` uses the noise-free new cell), so the transition
is a diagonal Gaussian given :math:`(h_{t-1}, c_{t-1})`.

**Where the process noise goes** (``noise_on``):

* ``"both"`` (default): learnt scales :math:`q = (q_h, q_c)` on both halves. Every method sees a proper
  ``2 * units``-dimensional Gaussian transition density.
* ``"hidden"``: learnt :math:`q_h` on ``h``; the cell gets a fixed tiny scale ``cell_noise`` (a buffer, default
  ``1e-3``), i.e. the cell is (numerically almost) the deterministic memory of the original LSTM, so the only
  randomness enters through ``h``. Consequences: the bootstrap particle filter and the EKF are unaffected
  (prediction uses the density only through sampling / its covariance, which the EKF keeps positive
  definite); but methods that *evaluate* the transition density between states not generated from each other —
  backward-simulation smoothers (hence the MCEM E-step), Markov and amortised SVI guides — face a near point
  mass in ``c``: backward kernels collapse onto each particle's own ancestor (the smoother degenerates to the
  filter's genealogy) and guide samples of ``c`` that miss :math:`c_t(h_{t-1}, c_{t-1})` get huge negative
  log-densities. Prefer ``"both"`` for smoothing and learning; ``"hidden"`` for filtering a trained LSTM.

Both cells declare the diagonal-Gaussian shortcuts, the linear-Gaussian emission, analytic Jacobians
(written out in :meth:`GRUSSM.transition_jacobian` / :meth:`LSTMSSM.transition_jacobian`), noise scales, the weight
vector, ``perturb``, the Levenberg-Marquardt M-step ``closed_form_mstep`` (readout and noises in closed form, the
gates' weights by LM steps: :mod:`ppl_rnn.models._lm_mstep`; affine blocks: a GRU's gates ``(h, u, 1)`` and
candidate ``(r * h, u, 1)``, an LSTM's four gates ``(h, u, 1)``) and ``rotation_restart`` (the candidate's / cell
input's recurrent matrix as a rotation times a gain); they have no linear special case (the gates multiply the
state, so no setting of the weights makes the mean an arbitrary linear map of the state).
"""

from __future__ import annotations

import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.nn import PyroParam

from ppl_rnn.errors import ConfigurationError
from ppl_rnn.model import set_param, size_argument
from ppl_rnn.rng import check_seed

from ._rnn_common import GaussianRNNBase, check_real, positive_vector, redeclare, rotation


def _gate_params(module, n_gates: int, units: int, input_dim: int, g: torch.Generator, weight_scale: float):
    dt = torch.get_default_dtype()
    module.Uh = PyroParam(weight_scale * torch.randn(n_gates * units, units, generator=g, dtype=dt) / units**0.5)
    if input_dim:
        module.Wu = PyroParam(torch.randn(n_gates * units, input_dim, generator=g, dtype=dt) / input_dim**0.5)
    module.bg = PyroParam(torch.zeros(n_gates * units, dtype=dt))


def _check_units(units):
    if isinstance(units, bool) or not isinstance(units, int) or units < 1:
        raise ConfigurationError(f"LSTMSSM: hidden_dim (alias units) must be an int >= 1; found {units!r}.")
    return units


@redeclare("transition_loc_scale", "closed_form_mstep")
class GRUSSM(GaussianRNNBase):
    """Stochastic GRU (module docstring). Parameters: ``Uh`` ``(3n, n)`` rows (z, r, h~), ``Wu`` ``(3n, I)``,
    ``bg`` ``(3n,)``.

    Args:
        hidden_dim, obs_dim, input_dim: sizes.
        weight_scale: ``Uh`` entries start as ``N(0, weight_scale^2 / n)``.
        process_noise, obs_noise, init_scale: initial ``q``, ``r``, ``s0``.
        seed: seed of the random initial weights.
    """

    recurrent_params = ("Uh",)
    transition_params = ("Uh", "Wu", "bg")

    def __init__(self, hidden_dim: int, obs_dim: int = 1, input_dim: int = 0, *, weight_scale: float = 1.0,
                 process_noise=0.1, obs_noise=0.1, init_scale=1.0, seed: int = 0):
        super().__init__(hidden_dim, obs_dim, input_dim)
        g = torch.Generator().manual_seed(check_seed(seed) or 0)
        _gate_params(self, 3, hidden_dim, input_dim, g, check_real(weight_scale, "weight_scale"))
        self._init_frame(g, process_noise=process_noise, obs_noise=obs_noise, init_scale=init_scale)

    def _gates(self, h, u_t, p=None, shift=None):
        n = self.hidden_dim
        p = self.transition_values() if p is None else p
        Uh, bg = p["Uh"], p["bg"]
        x = bg if u_t is None else u_t @ p["Wu"].T + bg
        azr = x[..., :2 * n] + h @ Uh[:2 * n].T
        if shift is not None:
            azr = azr + shift["zr"]
        z, r = torch.sigmoid(azr[..., :n]), torch.sigmoid(azr[..., n:])
        ah = x[..., 2 * n:] + (r * h) @ Uh[2 * n:].T
        if shift is not None:
            ah = ah + shift["h"]
        return z, r, torch.tanh(ah)

    def transition_parts(self, p, h_prev, u_t, shift=None):
        r""":math:`(1-z_t)\odot h_{t-1} + z_t\odot\tilde h_t` with parameters ``p`` (``Uh``, ``Wu``, ``bg``). Affine
        blocks: ``"zr"`` (the gates' rows of ``[Uh, Wu, bg]``, features :math:`(h_{t-1}, u_t, 1)`) and ``"h"`` (the
        candidate's rows, features :math:`(r_t\odot h_{t-1}, u_t, 1)`)."""
        z, r, ht = self._gates(h_prev, u_t, p, shift)
        mean = h_prev + z * (ht - h_prev)
        if shift is None:
            return mean
        one = h_prev.new_ones(h_prev.shape[:-1] + (1,))
        uu = () if u_t is None else (u_t,)
        return mean, {"zr": torch.cat([h_prev, *uu, one], -1), "h": torch.cat([r * h_prev, *uu, one], -1)}

    def blocks_from(self, p):
        n = self.hidden_dim
        Th = torch.cat([p["Uh"], *((p["Wu"],) if "Wu" in p else ()), p["bg"][:, None]], 1)
        return {"zr": Th[:2 * n], "h": Th[2 * n:]}, {}

    def params_from(self, blocks):
        n = self.hidden_dim
        Th = torch.cat([blocks["zr"], blocks["h"]], 0)
        out = {"Uh": Th[:, :n], "bg": Th[:, -1]}
        if self.input_dim:
            out["Wu"] = Th[:, n:-1]
        return out

    @torch.no_grad()
    def rotation_restart(self, generator: torch.Generator, *, gain: float = 1.1, rotation_scale: float = 0.25) -> None:
        r"""Redraw the candidate state's recurrent matrix :math:`U_h` (rows ``2n:3n`` of ``Uh``) as a random rotation
        near the identity times ``gain`` (:func:`~._rnn_common.rotation`); the gates' matrices stay."""
        n = self.hidden_dim
        Uh = self.Uh.detach().clone()
        Uh[2 * n:] = rotation(n, generator, gain=gain, scale=rotation_scale, dtype=Uh.dtype)
        set_param(self, "Uh", Uh)

    def transition_jacobian(self, t, h_prev, u_t, mean=None):
        r""":math:`\operatorname{diag}(1-z) + \operatorname{diag}(\tilde h - h)\,\partial z + \operatorname{diag}(z)\,\partial\tilde h`,
        :math:`\partial z = \operatorname{diag}(z(1-z))U_z`, :math:`\partial\tilde h = \operatorname{diag}(1-\tilde h^2)\,U_h
        \big(\operatorname{diag}(r) + \operatorname{diag}(h)\operatorname{diag}(r(1-r))U_r\big)`."""
        n = self.hidden_dim
        Uz, Ur, Uhh = self.Uh[:n], self.Uh[n:2 * n], self.Uh[2 * n:]
        z, r, ht = self._gates(h_prev, u_t)
        dz = (z * (1 - z)).unsqueeze(-1) * Uz
        dr = (r * (1 - r)).unsqueeze(-1) * Ur
        da = Uhh * r.unsqueeze(-2) + Uhh @ (h_prev.unsqueeze(-1) * dr)
        dht = (1 - ht * ht).unsqueeze(-1) * da
        return torch.diag_embed(1 - z) + (ht - h_prev).unsqueeze(-1) * dz + z.unsqueeze(-1) * dht

    def __repr__(self) -> str:
        return f"GRUSSM(hidden_dim={self.hidden_dim}, obs_dim={self.obs_dim}, input_dim={self.input_dim})"


@redeclare("weights", "set_weights", "perturb", "closed_form_mstep")
class LSTMSSM(GaussianRNNBase):
    """Stochastic LSTM (module docstring). State ``(h, c)``, ``hidden_dim = 2 * units``. Parameters: ``Uh``
    ``(4n, n)`` rows (i, f, g, o), ``Wu`` ``(4n, I)``, ``bg`` ``(4n,)`` (forget-gate bias starts at 1).

    Args:
        hidden_dim: the number of units ``n`` (keyword alias ``units``); the state dimension, the attribute
            ``self.hidden_dim``, is ``2n`` (``h`` then ``c``).
        obs_dim, input_dim: sizes.
        noise_on: ``"both"`` or ``"hidden"`` (module docstring: the choice and its consequences).
        cell_noise: the fixed cell-noise scale with ``noise_on="hidden"``.
        weight_scale, process_noise, obs_noise, init_scale, seed: as :class:`GRUSSM` (``process_noise`` sets the
            learnt scales: both halves, or ``h`` only).
    """

    recurrent_params = ("Uh",)
    transition_params = ("Uh", "Wu", "bg")

    def __init__(self, hidden_dim: int | None = None, obs_dim: int = 1, input_dim: int = 0, *,
                 units: int | None = None, noise_on: str = "both", cell_noise: float = 1e-3, weight_scale: float = 1.0,
                 process_noise=0.1, obs_noise=0.1, init_scale=1.0, seed: int = 0):
        n = _check_units(size_argument("LSTMSSM", hidden_dim, "units", units, check=False))
        super().__init__(2 * n, obs_dim, input_dim)
        if noise_on not in ("both", "hidden"):
            raise ConfigurationError(f"noise_on must be 'both' or 'hidden'; found {noise_on!r}.")
        self.units, self.noise_on = n, noise_on
        g = torch.Generator().manual_seed(check_seed(seed) or 0)
        _gate_params(self, 4, n, input_dim, g, check_real(weight_scale, "weight_scale"))
        with torch.no_grad():
            bg = self.bg.detach().clone()
            bg[n:2 * n] = 1.0
            self.bg = bg
        if noise_on == "both":
            self._init_frame(g, readout=(0, n), process_noise=process_noise, obs_noise=obs_noise,
                             init_scale=init_scale)
        else:
            self._init_frame(g, readout=(0, n), process_noise=1.0, obs_noise=obs_noise, init_scale=init_scale,
                             learn_process_noise=False)
            del self.q
            self.q_h = PyroParam(positive_vector(process_noise, n, "process_noise"), constraint=constraints.positive)
            self.register_buffer("q_c", positive_vector(check_real(cell_noise, "cell_noise", open_low=True), n,
                                                        "cell_noise"))

    @property
    def process_scale(self) -> torch.Tensor:
        return self.q if self.noise_on == "both" else torch.cat([self.q_h, self.q_c])

    def _cell(self, h_prev, u_t, p=None, shift=None):
        n = self.units
        p = self.transition_values() if p is None else p
        h, c = h_prev[..., :n], h_prev[..., n:]
        x = h @ p["Uh"].T + p["bg"]
        if u_t is not None:
            x = x + u_t @ p["Wu"].T
        if shift is not None:
            x = x + shift["x"]
        i, f = torch.sigmoid(x[..., :n]), torch.sigmoid(x[..., n:2 * n])
        gg, o = torch.tanh(x[..., 2 * n:3 * n]), torch.sigmoid(x[..., 3 * n:])
        cn = f * c + i * gg
        return i, f, gg, o, c, cn, torch.tanh(cn)

    def transition_parts(self, p, h_prev, u_t, shift=None):
        r""":math:`(o_t\odot\tanh(\bar c_t),\ \bar c_t)`, :math:`\bar c_t = f_t\odot c_{t-1} + i_t\odot g_t`, with
        parameters ``p`` (``Uh``, ``Wu``, ``bg``). One affine block ``"x"``: ``[Uh, Wu, bg]``, features
        :math:`(h_{t-1}, u_t, 1)`."""
        *_, o, _, cn, tc = self._cell(h_prev, u_t, p, shift)
        mean = torch.cat([o * tc, cn], -1)
        if shift is None:
            return mean
        h = h_prev[..., :self.units]
        return mean, {"x": torch.cat([h, *(() if u_t is None else (u_t,)), h.new_ones(h.shape[:-1] + (1,))], -1)}

    def blocks_from(self, p):
        return {"x": torch.cat([p["Uh"], *((p["Wu"],) if "Wu" in p else ()), p["bg"][:, None]], 1)}, {}

    def params_from(self, blocks):
        n, Th = self.units, blocks["x"]
        out = {"Uh": Th[:, :n], "bg": Th[:, -1]}
        if self.input_dim:
            out["Wu"] = Th[:, n:-1]
        return out

    def learnable_process_noise(self) -> torch.Tensor:
        """Both halves with ``noise_on="both"``; only ``h``'s with ``"hidden"`` (the cell scale is a fixed buffer)."""
        n = self.units
        return torch.cat([torch.ones(n, dtype=torch.bool), torch.full((n,), self.noise_on == "both")])

    @torch.no_grad()
    def rotation_restart(self, generator: torch.Generator, *, gain: float = 1.1, rotation_scale: float = 0.25) -> None:
        r"""Redraw the cell input's recurrent matrix :math:`U_g` (rows ``2n:3n`` of ``Uh``) as a random rotation near
        the identity times ``gain`` (:func:`~._rnn_common.rotation`); the gates' matrices stay."""
        n = self.units
        Uh = self.Uh.detach().clone()
        Uh[2 * n:3 * n] = rotation(n, generator, gain=gain, scale=rotation_scale, dtype=Uh.dtype)
        set_param(self, "Uh", Uh)

    def transition(self, t, h_prev, u_t):
        return dist.Normal(self.transition_mean(t, h_prev, u_t), self.process_scale).to_event(1)

    def transition_loc_scale(self, t, h_prev, u_t):
        """``(transition_mean, (q_h, q_c))``: the ``(loc, scale)`` of :meth:`transition`."""
        return self.transition_mean(t, h_prev, u_t), self.process_scale

    def transition_jacobian(self, t, h_prev, u_t, mean=None):
        r"""Blocks :math:`[[\partial h/\partial h, \partial h/\partial c], [\partial c/\partial h, \operatorname{diag} f]]` with
        :math:`\partial\bar c/\partial h = \operatorname{diag}(c f(1-f))U_f + \operatorname{diag}(g\,i(1-i))U_i +
        \operatorname{diag}(i(1-g^2))U_g`, :math:`\partial h/\partial h = \operatorname{diag}(\tanh\bar c\; o(1-o))U_o +
        \operatorname{diag}(o(1-\tanh^2\bar c))\,\partial\bar c/\partial h`, :math:`\partial h/\partial c =
        \operatorname{diag}(o(1-\tanh^2\bar c) f)`."""
        n = self.units
        i, f, gg, o, c, _, tc = self._cell(h_prev, u_t)
        U = self.Uh
        Ui, Uf, Ug, Uo = U[:n], U[n:2 * n], U[2 * n:3 * n], U[3 * n:]
        dc_dh = ((c * f * (1 - f)).unsqueeze(-1) * Uf + (gg * i * (1 - i)).unsqueeze(-1) * Ui
                 + (i * (1 - gg * gg)).unsqueeze(-1) * Ug)
        k = o * (1 - tc * tc)
        dh_dh = (tc * o * (1 - o)).unsqueeze(-1) * Uo + k.unsqueeze(-1) * dc_dh
        top = torch.cat([dh_dh, torch.diag_embed(k * f)], -1)
        bot = torch.cat([dc_dh, torch.diag_embed(f)], -1)
        return torch.cat([top, bot], -2)

    def noise_scales(self) -> dict[str, torch.Tensor]:
        """``initial`` = s0, ``process`` = (q_h, q_c) (``2 * units``), ``obs`` = r."""
        return {"initial": self.s0, "process": self.process_scale, "obs": self.r}

    @torch.no_grad()
    def set_noise_scales(self, **scales) -> None:
        """As the frame's; with ``noise_on="hidden"`` the ``process`` vector's cell half is written to the fixed
        cell scale too (so BPTT's noise floor and restored scales round-trip)."""
        if self.noise_on == "hidden" and "process" in scales:
            v = torch.as_tensor(scales.pop("process"), dtype=self.dtype).expand(2 * self.units)
            set_param(self, "q_h", v[:self.units])
            self.q_c.copy_(v[self.units:])
        GaussianRNNBase.set_noise_scales(self, **scales)

    def __repr__(self) -> str:
        return (f"LSTMSSM(units={self.units}, obs_dim={self.obs_dim}, input_dim={self.input_dim}, "
                f"noise_on={self.noise_on!r})")


__all__ = ["GRUSSM", "LSTMSSM"]
