r"""Forecasting by simulation from the filtering distribution.

.. math:: p(y_{T+k}\mid y_{0:T-1}) = \int p(y_{T+k}\mid h_{T+k}) \prod_{j=0}^{k} p(h_{T+j}\mid h_{T+j-1})\,
          p(h_{T-1}\mid y_{0:T-1})\, dh

Draws of :math:`h_{T-1}` come from the method's posterior (``Posterior.sample_final``); the future is
rolled forward with the model's own ``transition`` and ``emission``, vectorised over draws and sequences.
"""

from __future__ import annotations

import torch

from .data import Data, validate_inputs, validate_observations
from .errors import DataError, ModelCapabilityError
from .method import check_positive_int
from .model import input_at
from .results import Forecast
from .rng import seeded


def default_filter(model):
    """Exact Kalman where the model is linear-Gaussian, else a 2000-particle bootstrap filter."""
    from ppl_rnn.inference import KalmanFilter, ParticleFilter

    try:
        model.linear_gaussian()
        return KalmanFilter()
    except ModelCapabilityError:
        return ParticleFilter(num_particles=2000)


@torch.no_grad()
def forecast(model, observations, *, horizon: int, method=None, num_samples: int = 500, inputs=None,
             seed: int | None = None) -> Forecast:
    horizon = check_positive_int(horizon, "horizon")
    num_samples = check_positive_int(num_samples, "num_samples")
    y, mask = validate_observations(observations, obs_dim=model.obs_dim, dtype=model.dtype)
    B, T = y.shape[0], y.shape[1]
    u_all = None
    if model.input_dim:
        if inputs is None:
            raise DataError(f"inputs is None but the model takes inputs: pass inputs of shape "
                            f"({B}, {T + horizon}, {model.input_dim}) covering T + horizon steps.")
        u_all = validate_inputs(inputs, num_sequences=B, num_steps=T + horizon, input_dim=model.input_dim,
                                dtype=y.dtype)
    elif inputs is not None:
        validate_inputs(inputs, num_sequences=B, num_steps=T + horizon, input_dim=0)  # raises the usual error
    data = Data(y, mask, None if u_all is None else u_all[:, :T].clone())
    method = default_filter(model) if method is None else method
    with seeded(seed):
        post = method._infer(model, data, None)
        h = post.sample_final(num_samples).to(data.observations.dtype)  # (S,B,H)
        hs, ys = [], []
        for k in range(horizon):
            t = T + k
            u_t = input_at(u_all, t)
            h = model.transition(t, h, u_t).sample()
            ys.append(model.emission(t, h, u_t).sample())
            hs.append(h)
    samples = torch.stack(ys, 2)
    return Forecast(samples=samples, state_samples=torch.stack(hs, 2), mean=samples.mean(0),
                    method=getattr(method, "name", type(method).__name__))
