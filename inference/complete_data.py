r"""The complete-data log-likelihood of hidden trajectories, scored with the model's own conditionals.

For trajectories :math:`h^{(s)}_{0:T-1}` (from a smoother: particle paths, EKS/FFBS draws, or a plug-in
mean) and data :math:`y` with mask :math:`o`,

.. math::
    \ell(\theta; h^{(s)}, y) = \log p_\theta(h^{(s)}_0) + \sum_{t\ge1}\log p_\theta(h^{(s)}_t\mid h^{(s)}_{t-1}, u_t)
    + \sum_t \log p_\theta(y_{t,o}\mid h^{(s)}_t, u_t)

(``initial``, ``transition`` and :meth:`~ppl_rnn.StateSpaceModel.observation_log_prob`, so missing entries
count exactly as everywhere else). Averaging over :math:`s` gives the Monte Carlo estimate of the EM
objective :math:`Q(\theta)=E_{p(h\mid y,\theta_{old})}[\log p_\theta(h,y)]`; its gradient in
:math:`\theta` is the generic M-step used by EKF-EM and Monte Carlo EM.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from ppl_rnn.errors import DataError
from ppl_rnn.model import input_at


def complete_data_log_likelihood(model, trajectories: torch.Tensor, data, *, split: bool = False):
    r"""``(S, B)`` values of :math:`\log p_\theta(h^{(s)}_{0:T-1}, y_{0:T-1})` for ``trajectories`` ``(S,B,T,H)``.

    ``data`` is a :class:`ppl_rnn.data.Data` (``observations``, ``mask``, ``inputs``). Vectorised over
    trajectories and sequences; differentiable in the model's parameters (the trajectories are treated as
    given — pass detached draws for an EM M-step). With ``split=True`` returns the pair
    ``(log p(h), log p(y|h))``, each ``(S, B)``.
    """
    y, mask, u = data.observations, data.mask, data.inputs
    B, T, _ = y.shape
    if trajectories.dim() != 4 or trajectories.shape[1:3] != (B, T) or trajectories.shape[-1] != model.hidden_dim:
        raise DataError(
            f"trajectories have shape {tuple(trajectories.shape)}; expected (S, {B}, {T}, {model.hidden_dim}) "
            "= (num_paths, num_sequences, num_steps, hidden_dim) matching the data and the model."
        )
    # one unbind, not a slice per step: a slice's backward is a full-size gradient (O(T^2) per pass)
    h = trajectories.to(model.dtype).unbind(2)
    ys, ms = y.unbind(1), mask.unbind(1)
    # a step observed everywhere passes mask None (the contract's "all observed"): no masking op to differentiate
    full = mask.reshape(B, T, -1).all(-1).all(0).tolist()
    u0 = input_at(u, 0)
    lh = model.initial_batched(u0, (B,)).log_prob(h[0])
    ly = model.observation_log_prob(0, h[0], ys[0], None if full[0] else ms[0], u0)
    for t in range(1, T):
        u_t = input_at(u, t)
        lh = lh + model.transition(t, h[t - 1], u_t).log_prob(h[t])
        ly = ly + model.observation_log_prob(t, h[t], ys[t], None if full[t] else ms[t], u_t)
    S = trajectories.shape[0]
    if split:
        return lh.expand(S, B), ly.expand(S, B)
    return (lh + ly).expand(S, B)


@contextlib.contextmanager
def cached_params(*modules) -> Iterator[None]:
    """Read every ``PyroParam`` of ``modules`` once (its constrained value) and serve it from the instance
    ``__dict__`` inside the block, so repeated conditionals skip ``PyroModule.__getattr__`` (a constraint
    transform per access, the dominant per-step overhead of small particle filters). The one parameter cache
    of the library: the particle filter enters it inside ``torch.no_grad()`` (values without a graph); an
    optimisation step enters it with gradients on (values *with* their autograd graph, so enter it once per
    step: the values are those of the parameters at entry). The cache is removed on exit."""
    added = []
    try:
        for module in modules:
            for mod in module.modules():
                names = mod.__dict__.get("_pyro_params", None)
                if not names:
                    continue
                for name in names:
                    if name in mod.__dict__:
                        continue
                    mod.__dict__[name] = getattr(mod, name)
                    added.append((mod, name))
        yield
    finally:
        for mod, name in added:
            mod.__dict__.pop(name, None)


__all__ = ["complete_data_log_likelihood", "cached_params"]
