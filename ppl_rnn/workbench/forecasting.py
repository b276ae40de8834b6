r"""Forecasting by simulation from the filtering distribution.

.. math:: p(y_{T+k}\mid y_{0:T-1}) = \int p(y_{T+k}\mid h_{T+k}) \prod_{j=0}^{k} p(h_{T+j}\mid h_{T+j-1})\,
          p(h_{T-1}\mid y_{0:T-1})\, dh

Draws of :math:`h_{T-1}` come from the method's posterior (``Posterior.sample_final``); the future is
rolled forward with the model's own ``transition`` and ``emission``, vectorised over draws and sequences.
"""

from __future__ import annotations

import torch

from ppl_rnn.capabilities import capability
from ppl_rnn.data import Data, validate_inputs, validate_observations
from ppl_rnn.errors import ConfigurationError, DataError
from ppl_rnn.method import check_positive_int
from ppl_rnn.model import input_at
from ppl_rnn.results import Forecast, ParameterPosterior
from ppl_rnn.rng import check_seed, seeded
from ppl_rnn.scope import in_library_scope
from ppl_rnn.verbs import check_model_and_method


def posterior_ensemble(posterior: ParameterPosterior, num: int = 20):
    r"""The posterior predictive of a parameter posterior as an equal-weight :class:`~ppl_rnn.Ensemble`:
    :math:`\frac1K\sum_{k} p(y\mid\theta^{(k)})` over ``num`` draws thinned evenly over all chains and draws
    (``posterior.models(num)``), each model forecasting and scored with its own filter."""
    from .ensemble import Ensemble

    if not isinstance(posterior, ParameterPosterior):
        raise ConfigurationError(f"posterior_ensemble needs a ParameterPosterior (pr.infer with PMMH or "
                                 f"ParticleGibbs); found {type(posterior).__name__}.")
    return Ensemble(posterior.models(check_positive_int(num, "num")))


def default_filter(model):
    """Exact Kalman where the model is linear-Gaussian, else a 2000-particle bootstrap filter."""
    from ppl_rnn.inference import KalmanFilter, ParticleFilter

    if capability(model, "linear_gaussian") is not None:
        return KalmanFilter()
    return ParticleFilter(num_particles=2000)


@in_library_scope
@torch.no_grad()
def forecast(model, observations, *, horizon: int, method=None, num_samples: int = 500, inputs=None,
             seed: int | None = None) -> Forecast:
    r"""Predictive draws of the next ``horizon`` observations after ``observations`` (``pr.forecast``).

    The filtering distribution :math:`p(h_{T-1}\mid y_{0:T-1})` comes from ``method`` (default:
    :func:`default_filter`); the future is simulated forward with the model's own transition and emission.
    ``inputs`` (if the model has them) must cover T + horizon steps. An :class:`~ppl_rnn.Ensemble` forecasts
    with its linear pool: draw ``s`` comes from member ``k`` in proportion to its weight (stratified), each
    member filtering with ``method`` on its own; ``state_samples`` is NaN in units a member does not have. A
    :class:`~ppl_rnn.results.ParameterPosterior` forecasts with its posterior predictive, the linear pool of the
    models at 20 draws thinned evenly over its chains (:func:`posterior_ensemble`; pass
    ``posterior_ensemble(post, num)`` for another number).
    """
    from .ensemble import Ensemble

    if isinstance(model, ParameterPosterior):
        model = posterior_ensemble(model)
    if isinstance(model, Ensemble):
        return _forecast_pool(model, observations, horizon=horizon, method=method, num_samples=num_samples,
                              inputs=inputs, seed=seed)
    check_model_and_method(model, method, optional=True)
    check_seed(seed)
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
        post = method.infer_prepared(model, data, None)
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
                    method=getattr(method, "name", type(method).__name__), model=model, data=data)


def _forecast_pool(ens, observations, *, horizon, method, num_samples, inputs, seed) -> Forecast:
    r"""The pool's draws :math:`y_{T+k}\sim\sum_k w_k\,p_k(y_{T+k}\mid y_{0:T-1})` (see :func:`forecast`)."""
    check_seed(seed)
    num_samples = check_positive_int(num_samples, "num_samples")
    counts = torch.bincount(ens.draw_members(num_samples), minlength=len(ens))  # draws are sorted by member
    fcs = [forecast(m, observations, horizon=horizon, method=method, num_samples=int(n), inputs=inputs,
                    seed=None if seed is None else seed + k)
           for k, (m, n) in enumerate(zip(ens.models, counts, strict=True)) if n > 0]
    samples = torch.cat([f.samples for f in fcs])
    H = max(f.state_samples.shape[-1] for f in fcs)
    states = torch.cat([torch.nn.functional.pad(f.state_samples, (0, H - f.state_samples.shape[-1]),
                                                value=float("nan")) for f in fcs])
    return Forecast(samples=samples, state_samples=states, mean=samples.mean(0),
                    method="linear pool of " + ", ".join(f.method for f in fcs), model=ens, data=fcs[0].data)
