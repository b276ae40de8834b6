r"""Amortised guide: a bidirectional GRU over the observations feeding a combiner, as the inference
network of the Deep Markov Model (Krishnan, Shalit & Sontag 2017).

.. math::
    e_{0:T-1} &= \operatorname{BiGRU}\big([\,y_t\odot o_t,\ o_t,\ u_t\,]_{t=0}^{T-1}\big)
        \quad(\text{missing entries enter as }0\text{ with their mask }o_t) \\
    c_t &= \tfrac12\big(\tanh(W_c h_{t-1} + b_c) + \tanh(W_e e_t + b_e)\big),\qquad h_{-1} = \text{learned} \\
    q_\phi(h_t\mid h_{t-1}, y_{0:T-1}) &= N\big(W_\mu c_t + b_\mu,\ \operatorname{diag}\operatorname{softplus}(W_\sigma c_t + b_\sigma)^2\big)

The bidirectional RNN summarises past *and* future observations — the smoother that a plain
(forward) RNN lacks — and the combiner makes :math:`q` Markov like the posterior. Parameters do not
depend on the number or length of sequences, so a trained guide infers new data without refitting.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from ppl_rnn.method import check_positive_float, check_positive_int

from .base import StateGuide


class AmortizedGuide(StateGuide):
    """DMM-style inference network (see module docstring).

    Args:
        model: optional; the model whose sizes the guide takes.
        rnn_dim: hidden size of each direction of the GRU.
        combiner_dim: size of the combiner state :math:`c_t` (default ``rnn_dim``).
        min_scale: floor added to the softplus scale.
        seed: seed of the network's initial weights.
    """

    amortized = True

    def __init__(self, model=None, *, rnn_dim: int = 32, combiner_dim: int | None = None, min_scale: float = 1e-4,
                 seed: int = 0):
        self.rnn_dim = check_positive_int(rnn_dim, "rnn_dim")
        self.combiner_dim = check_positive_int(combiner_dim if combiner_dim is not None else rnn_dim, "combiner_dim")
        self.min_scale = check_positive_float(min_scale, "min_scale")
        self.seed = int(seed)
        self._nets_built = False
        super().__init__(model)

    def _on_bind(self, model):
        if self._nets_built:
            return
        H, D, I = self._dims
        R, C = self.rnn_dim, self.combiner_dim
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.rnn = nn.GRU(2 * D + I, R, batch_first=True, bidirectional=True).to(self._dtype)
            self.rnn_to_comb = nn.Linear(2 * R, C).to(self._dtype)
            self.h_to_comb = nn.Linear(H, C).to(self._dtype)
            self.comb_to_loc = nn.Linear(C, H).to(self._dtype)
            self.comb_to_scale = nn.Linear(C, H).to(self._dtype)
        with torch.no_grad():  # start with moderate scales
            self.comb_to_scale.weight.mul_(0.1)
            self.comb_to_scale.bias.fill_(-2.0)
        self.h_init = nn.Parameter(torch.zeros(H, dtype=self._dtype))
        self._nets_built = True

    def _sample_states(self, y, mask, u):
        mf = mask.to(y.dtype)
        x = [y * mf, mf] + ([] if u is None else [u])
        e, _ = self.rnn(torch.cat(x, -1))  # (B, T, 2R)
        e = torch.tanh(self.rnn_to_comb(e))  # (B, T, C)
        h = self.h_init.expand(y.shape[0], -1)
        # the per-step loop is the cost: read the weights once; one fused linear map for (loc, scale), with the
        # combiner's 1/2 folded into it (c_t = (tanh(W_c h + b_c) + e_t) / 2 enters only through that map)
        Whc, bhc = self.h_to_comb.weight, self.h_to_comb.bias
        Wout = 0.5 * torch.cat([self.comb_to_loc.weight, self.comb_to_scale.weight], 0).T
        bout = torch.cat([self.comb_to_loc.bias, self.comb_to_scale.bias], 0)
        H = self.comb_to_loc.weight.shape[0]
        hs = []
        for t, e_t in enumerate(e.unbind(1)):
            c2 = torch.tanh(nn.functional.linear(h, Whc, bhc)) + e_t  # 2 c_t
            out = torch.matmul(c2, Wout) + bout
            loc, pre = out[..., :H], out[..., H:]
            h = pyro.sample(f"h_{t}", dist.Normal(loc, nn.functional.softplus(pre) + self.min_scale).to_event(1))
            hs.append(h)
        return hs
