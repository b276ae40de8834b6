"""Pyro's :class:`pyro.infer.SMCFilter` as a peer: an ``ElmanSSM``'s parameters written as an SMCFilter
model and bootstrap guide (shared by ``bench_smc.py`` and ``bench_peers.py``; not a benchmark itself)."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from ppl_rnn.models import ElmanSSM


class PyroElman:
    """``init``/``step`` model for :class:`pyro.infer.SMCFilter` with the parameters of an ElmanSSM."""

    def __init__(self, m: ElmanSSM):
        with torch.no_grad():
            self.W, self.b, self.q = m.W.detach(), m.b.detach(), m.q.detach()
            self.C, self.d, self.r = m.C.detach(), m.d.detach(), m.r.detach()
            self.m0, self.s0 = m.m0.detach(), m.s0.detach()

    def init(self, state, y0):
        h = pyro.sample("h_0", dist.Normal(self.m0, self.s0).to_event(1))
        pyro.sample("y_0", dist.Normal(h @ self.C.T + self.d, self.r).to_event(1), obs=y0)
        state["h"] = h

    def step(self, state, y, t):
        h = pyro.sample(f"h_{t}", dist.Normal(torch.tanh(state["h"] @ self.W.T + self.b), self.q).to_event(1))
        pyro.sample(f"y_{t}", dist.Normal(h @ self.C.T + self.d, self.r).to_event(1), obs=y)
        state["h"] = h


class PyroElmanGuide(PyroElman):
    """Bootstrap guide: proposes from the transition (SMCFilter weights by p/q, which then cancel)."""

    def init(self, state, y0):
        pyro.sample("h_0", dist.Normal(self.m0, self.s0).to_event(1))

    def step(self, state, y, t):
        pyro.sample(f"h_{t}", dist.Normal(torch.tanh(state["h"] @ self.W.T + self.b), self.q).to_event(1))
