r"""Proposals for the particle filter: objects with one small interface, which the filter loop calls.

The filter targets :math:`p(h_t\mid y_{0:t})`. At step :math:`t` each particle draws
:math:`h_t \sim q_t(\cdot\mid h_{t-1}, y_t)` and receives the incremental log-weight

.. math::
    \log \omega_t = \log p(y_{t,o}\mid h_t) + \log p(h_t\mid h_{t-1}) - \log q_t(h_t\mid h_{t-1}, y_t)

(at :math:`t=0`, :math:`p(h_0)` replaces the transition). :math:`\log p(y_{t,o}\mid h_t)` is always
``model.observation_log_prob`` (missing entries add nothing).

**Interface.** A proposal is any object with

.. code-block:: python

    def propose(self, model, t, h_prev, y_t, mask_t, u_t) -> tuple[Tensor, Tensor | None]:
        # h_prev: (N, B, H) particles at t-1 (None at t=0)
        # y_t: (B, D) observations (missing entries hold arbitrary finite values), mask_t: (B, D) bool
        # u_t: (B, I) or None
        # returns h_t (N, B, H) and log_q (N, B), the proposal log-density at h_t,
        # or log_q = None to declare q = the model's prior (initial / transition): the filter then
        # skips log p(h_t|h_{t-1}) - log q, which cancel exactly (the bootstrap filter).

and optionally ``setup(model, data, num_particles)``, called once before ``t=0`` (for proposals that
precompute per-run quantities), and ``name`` (recorded in the filter's record). A proposal must be
vectorised over particles and sequences and must not couple sequences. The filter runs the whole pass under
``torch.no_grad()``. A proposal whose ``propose`` also takes ``out=`` (an ``(N,B,H)`` buffer to draw into)
says so with ``fills_out = True``.

**Auxiliary (predictive) proposals.** A proposal may instead expose the *predictive weight*
:math:`\log p(y_t\mid h_{t-1})` and draw from :math:`p(h_t\mid h_{t-1}, y_t)` exactly; the filter then weights
the particles at :math:`t-1` by it, resamples on those weights and propagates (the fully adapted auxiliary
filter, :mod:`~ppl_rnn.inference.adapted`):

.. code-block:: python

    def predictive(self, model, t, h_prev, y_t, mask_t, u_t) -> tuple[Tensor, Any]:
        # log p(y_{t,o} | h_prev) (P, B) (P = 1 at t = 0: every particle shares p(h_0)) and a step object
    def sample(self, step, ancestors, num, out=None) -> Tensor:   # (num, B, H) exact conditional draws

The built-in proposals:

* :class:`Bootstrap` — :math:`q_t = p(h_t\mid h_{t-1})`, weights :math:`p(y_t\mid h_t)`;
* :class:`~ppl_rnn.inference.ekf_proposal.Guided` — a one-step extended Kalman update per particle;
* :class:`~ppl_rnn.inference.adapted.FullyAdapted` — exact predictive weights and exact conditional draws
  (needs the declared capability ``linear_gaussian_emission``);
* :class:`Auto` — resolved per model by :func:`~ppl_rnn.inference.smc.best_proposal` (the default).

Objects are the API; :func:`as_proposal` maps the convenience strings ``"auto"``, ``"bootstrap"``,
``"adapted"`` and ``"ekf"`` to them (one function, no registry).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import pyro
import torch

from ppl_rnn.capabilities import capability
from ppl_rnn.errors import ConfigurationError

from .adapted import FullyAdapted
from .ekf_proposal import Guided


@runtime_checkable
class Proposal(Protocol):
    """See the module docstring."""

    def propose(self, model, t: int, h_prev: torch.Tensor | None, y_t: torch.Tensor, mask_t: torch.Tensor,
                u_t: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]: ...


def draw(d, shape=()) -> torch.Tensor:
    """A draw from ``d``: ``rsample`` where available (the same distribution, and for a Gaussian a fused
    ``loc + scale * eps``, about 3x faster than ``sample`` at small N); the filter runs under no_grad."""
    return d.rsample(shape) if d.has_rsample else d.sample(shape)


class Bootstrap:
    r"""The bootstrap proposal :math:`q_t = p(h_t\mid h_{t-1})`, :math:`q_0 = p(h_0)`; weights are the
    observation likelihoods.

    Fast path (same law): a transition given by the model's ``transition_loc_scale`` capability, or exactly
    ``Normal(loc, scale).to_event(1)``, is drawn as ``loc + scale * eps`` straight into the filter's buffer."""

    name = "bootstrap"
    #: ``propose`` takes ``out=`` (the filter's (N,B,H) buffer)
    fills_out = True

    def __init__(self, num_particles: int | None = None):
        self.num_particles = num_particles
        self._tr_ls = None

    def setup(self, model, data, num_particles):
        self.num_particles = num_particles
        self._tr_ls = capability(model, "transition_loc_scale")

    def propose(self, model, t, h_prev, y_t, mask_t, u_t, out: torch.Tensor | None = None):
        if h_prev is None:
            n = self.num_particles
            if n is None:
                raise ConfigurationError("Bootstrap needs num_particles to draw h_0 (the filter calls setup).")
            return draw(model.initial_batched(u_t, (y_t.shape[0],)), (n,)), None
        if self._tr_ls is not None:
            loc, scale = self._tr_ls(t, h_prev, u_t)
        else:
            d = model.transition(t, h_prev, u_t)
            g = diag_normal(d)
            if g is None:
                return draw(d), None
            loc, scale = g
        if out is not None and loc.shape == out.shape:  # scale broadcasts to loc (Normal broadcast them)
            return torch.addcmul(loc, torch.randn(loc.shape, dtype=loc.dtype, device=loc.device), scale, out=out), None
        shape = torch.broadcast_shapes(loc.shape, scale.shape)
        return torch.addcmul(loc, torch.randn(shape, dtype=loc.dtype, device=loc.device), scale), None

    def __repr__(self) -> str:
        return "Bootstrap()"


class Auto:
    r"""The default proposal: resolved by the filter, per model, with
    :func:`~ppl_rnn.inference.smc.best_proposal` — the fully adapted filter where the declared capabilities give
    it in closed form, the bootstrap filter otherwise (the rule and its reasons are there). The filter records
    the choice and why (``ParticleFilterRecord.proposal`` / ``proposal_reason``)."""

    name = "auto"

    def __repr__(self) -> str:
        return "Auto()"


_NORMAL_TYPES = frozenset({torch.distributions.Normal, pyro.distributions.Normal})
_INDEPENDENT_TYPES = frozenset({torch.distributions.Independent, pyro.distributions.Independent})


def diag_normal(d):
    """``(loc, scale)`` when ``d`` is exactly ``Independent(Normal, 1)`` (a diagonal Gaussian over the last
    dim, e.g. ``Normal(loc, scale).to_event(1)``; subclasses excluded), else None. ``loc`` and ``scale`` are
    broadcast to the full batch-and-event shape by ``Normal``."""
    if type(d) in _INDEPENDENT_TYPES and d.reinterpreted_batch_ndims == 1 and type(d.base_dist) in _NORMAL_TYPES:
        return d.base_dist.loc, d.base_dist.scale
    return None


_NAMES = ("auto", "bootstrap", "adapted", "ekf")


def as_proposal(spec) -> object:
    """A proposal object from ``spec``: an object with ``propose`` (or ``predictive``/``sample``) or an
    :class:`Auto` is returned as is; the convenience strings map to fresh objects: ``"auto"`` ->
    :class:`Auto`, ``"bootstrap"`` -> :class:`Bootstrap`, ``"adapted"`` ->
    :class:`~ppl_rnn.inference.adapted.FullyAdapted`, ``"ekf"`` -> :class:`~ppl_rnn.inference.ekf_proposal.Guided`."""
    if isinstance(spec, str):
        if spec == "auto":
            return Auto()
        if spec == "bootstrap":
            return Bootstrap()
        if spec == "adapted":
            return FullyAdapted()
        if spec == "ekf":
            return Guided()
    elif isinstance(spec, Auto) or callable(getattr(spec, "propose", None)) or (
            callable(getattr(spec, "predictive", None)) and callable(getattr(spec, "sample", None))):
        return spec
    raise ConfigurationError(
        f"proposal must be a proposal object (Bootstrap(), Guided(), FullyAdapted(), Auto(), or any object with a "
        f"propose(model, t, h_prev, y_t, mask_t, u_t) method) or one of the names {list(_NAMES)}; found {spec!r}.")


#: the name under which older code asked for a proposal object
get_proposal = as_proposal

# older names of the built-in proposals
BootstrapProposal = Bootstrap

__all__ = ["Proposal", "Bootstrap", "Auto", "as_proposal", "draw", "diag_normal", "BootstrapProposal", "get_proposal"]
