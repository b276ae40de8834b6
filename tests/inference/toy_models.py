"""Small models shared by the inference tests."""

from __future__ import annotations

import pyro.distributions as dist
import torch

from ppl_rnn import StateSpaceModel


class NoWeights(StateSpaceModel):
    """A 1-D linear model that declares no capability (no ``weights``/``set_weights``)."""

    def __init__(self):
        super().__init__(1, 1)
        self.a = torch.nn.Parameter(torch.zeros(1))

    def initial(self, u0):
        return dist.Normal(torch.zeros(1), 1.0).to_event(1)

    def transition(self, t, h_prev, u_t):
        return dist.Normal(self.a * h_prev, 1.0).to_event(1)

    def emission(self, t, h, u_t):
        return dist.Normal(h, 1.0).to_event(1)
