r"""The EKF proposal for the particle filter: a one-step extended Kalman update per particle.

For particle :math:`i` with ancestor :math:`h^i_{t-1}`, the prior is
:math:`p(h_t\mid h^i_{t-1}) = N(\mu^i, Q^i)` with :math:`\mu^i=f_t(h^i_{t-1})` (at :math:`t=0`:
:math:`N(m_0,P_0)`). Linearising the emission mean around :math:`\mu^i`,
:math:`g_t(h)\approx g_t(\mu^i)+G^i(h-\mu^i)`, :math:`G^i=\partial g_t/\partial h\,(\mu^i)`, makes
:math:`p(h_t\mid h^i_{t-1}, y_t)` Gaussian:

.. math::
    q(h_t\mid h^i_{t-1}, y_t) = N\big(\mu^i + K^i(y_t - g_t(\mu^i)),\ (I-K^iG^i)Q^i\big),\qquad
    K^i = Q^iG^{i\top}(G^iQ^iG^{i\top}+R^i)^{-1}

(observed entries only; a fully missing step gives back the prior). The filter weights each draw by
:math:`p(y_{t,o}\mid h_t)\,p(h_t\mid h^i_{t-1})/q(h_t\mid h^i_{t-1},y_t)`, so the evidence estimate stays
unbiased whatever the linearisation error. For a linear-Gaussian emission this *is* the locally optimal
proposal :math:`p(h_t\mid h_{t-1},y_t)`. Vectorised over particles and sequences (Jacobians by
:func:`torch.func.jacrev` of the emission mean summed over particles and sequences, or the model's analytic
``emission_jacobian`` capability where it has one).

``inflation`` (>= 1) widens the proposal covariance, a common safeguard when the linearisation is poor.

The Gaussian maths is :mod:`ppl_rnn.gaussian` (:func:`~ppl_rnn.gaussian.linearize`,
:func:`~ppl_rnn.gaussian.safe_update`). Use ``ParticleFilter(proposal=Guided())`` (or the string ``"ekf"``).
It costs one Jacobian and one :math:`H\times H` factorisation per particle and step, several times the
bootstrap filter's step, and where the linearisation fails its weights are unbounded: the default
``proposal="auto"`` never chooses it (:func:`~ppl_rnn.inference.smc.best_proposal`); pass it explicitly
where it pays.
"""

from __future__ import annotations

from pyro.distributions import MultivariateNormal

from ppl_rnn.capabilities import capability
from ppl_rnn.errors import ConfigurationError
from ppl_rnn.gaussian import cholesky_pd, gaussian_moments, linearize, matvec, safe_update
from ppl_rnn.method import check_positive_float


class Guided:
    """Per-particle one-step EKF proposal (see module docstring). Use ``ParticleFilter(proposal=Guided())``."""

    name = "ekf"

    def __init__(self, num_particles: int | None = None, *, inflation: float = 1.0):
        self.num_particles = num_particles
        self.inflation = check_positive_float(inflation, "inflation")

    def setup(self, model, data, num_particles):
        self.num_particles = num_particles

    def propose(self, model, t, h_prev, y_t, mask_t, u_t):
        if h_prev is None:
            n = self.num_particles
            if n is None:
                raise ConfigurationError("Guided needs num_particles to draw h_0 (ParticleFilter calls setup).")
            B = y_t.shape[0]
            mu, P = gaussian_moments(model.initial_batched(u_t, (B,)), role="initial", model=model,
                                     method="the EKF proposal")
            H = mu.shape[-1]
            mu = mu.expand(n, B, H)
            P = P.expand(n, B, H, H)
        else:
            mu, P = gaussian_moments(model.transition(t, h_prev, u_t), role="transition", model=model,
                                     method="the EKF proposal")
            mu = mu.expand(h_prev.shape)
            P = P.expand(h_prev.shape + h_prev.shape[-1:])
        ej = capability(model, "emission_jacobian")  # analytic capability; autograd when absent or None
        g, G, R = linearize(lambda z: model.emission(t, z, u_t), mu, role="emission", model=model,
                            method="the EKF proposal", jacobian=None if ej is None else (lambda z: ej(t, z, u_t)))
        m, Pq, _ = safe_update(mu, P, y_t, mask_t, G, g - matvec(G, mu), R, t=t, who="EKF proposal")
        if self.inflation != 1.0:
            Pq = Pq * self.inflation
        L = cholesky_pd(Pq, what="EKF proposal covariance", t=t, who="EKF proposal")
        q = MultivariateNormal(m, scale_tril=L, validate_args=False)
        h = q.sample()
        return h, q.log_prob(h)

    def __repr__(self) -> str:
        return f"Guided(inflation={self.inflation})"


#: the older name of :class:`Guided`
EKFProposal = Guided

__all__ = ["Guided", "EKFProposal"]
