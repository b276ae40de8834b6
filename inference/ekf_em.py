r"""EM with the extended Kalman smoother as E-step (Ghahramani & Roweis 1999; Briegel & Tresp 1999).

Iteration :math:`k`:

* **E-step** — the extended Kalman smoother at :math:`\theta_k` gives a Gaussian approximation
  :math:`q_k(h_{0:T-1}) \approx p_{\theta_k}(h_{0:T-1}\mid y)` (its EKF log-likelihood is the reported
  objective, ``evidence_kind="approximation"``).
* **M-step** — maximise the expected complete-data log-likelihood
  :math:`Q(\theta)=E_{q_k}[\log p_\theta(h_{0:T-1},y_{0:T-1})]`. For a general nonlinear model this
  expectation has no closed form, so, as in Briegel & Tresp (1999), it is estimated with ``num_samples``
  trajectories drawn from :math:`q_k` by forward-filter backward-sample,
  :math:`\hat Q(\theta)=\frac1S\sum_s\log p_\theta(h^{(s)},y)`, scored with the model's own conditionals
  (:func:`~ppl_rnn.inference.complete_data.complete_data_log_likelihood`), and increased by
  ``mstep_steps`` Adam steps (generalised EM). ``num_samples=0`` uses the smoothed mean as a plug-in
  trajectory instead (cheaper, but it ignores the posterior spread, which biases noise variances down).

Works for any model with Gaussian conditionals (the EKF's requirement); the draws are fixed during an
M-step, so the M-step objective is a deterministic function of :math:`\theta`.
"""

from __future__ import annotations

import pyro
import torch

from ppl_rnn.method import InferenceMethod, check_positive_float, check_positive_int
from ppl_rnn.results import Posterior

from .complete_data import cached_params, complete_data_log_likelihood
from .ekf import extended_kalman_filter
from .em_common import ConvergenceRule, EMLoop, EMStep
from .kalman import ffbs_sample, final_state_sampler, rts_smoother


class EKFEM(InferenceMethod):
    """EM with the extended Kalman smoother as E-step (see module docstring).

    Args:
        num_iterations: EM iterations.
        num_samples: FFBS trajectories per E-step for the Monte Carlo M-step objective; 0 = plug-in smoothed mean.
        mstep_steps: Adam steps per M-step.
        lr: Adam learning rate (the optimiser state persists across iterations).
        tol: relative tolerance of the convergence rule of :mod:`~ppl_rnn.inference.em_common` (stop when the
            EKF log-likelihood changes by at most ``tol * max(|value|, n_obs)`` per iteration; ``0``: never).
        progress: show a progress bar.
    """

    name = "ekf_em"

    def __init__(self, *, num_iterations: int = 20, num_samples: int = 10, mstep_steps: int = 20, lr: float = 0.01,
                 tol: float = 0.0, progress: bool = False):
        self.num_iterations = check_positive_int(num_iterations, "num_iterations")
        self.num_samples = check_positive_int(num_samples, "num_samples", minimum=0)
        self.mstep_steps = check_positive_int(mstep_steps, "mstep_steps")
        self.lr = check_positive_float(lr, "lr")
        self.tol = check_positive_float(tol, "tol", allow_zero=True)
        self.progress = bool(progress)

    def _fit(self, model, data, seed):
        n_obs = max(data.num_observed, 1)
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=self.lr)

        def evaluate(k):
            with torch.no_grad():
                f = extended_kalman_filter(model, data.observations, data.mask, data.inputs, method="EKFEM")
            ll = float(f.log_evidence.sum())
            return EMStep(value=ll, scalars={"objective": ll, "log_evidence": ll}, state=f)

        def update(k, step):
            f = step.state
            with torch.no_grad():  # trajectories from the EKS Gaussian
                if self.num_samples > 0:
                    traj = ffbs_sample(f.transition_jacobian, f, self.num_samples)
                else:
                    traj = rts_smoother(f.transition_jacobian, f).mean.unsqueeze(0)
            q0 = None
            for _ in range(self.mstep_steps):
                opt.zero_grad()
                with cached_params(model):
                    q = complete_data_log_likelihood(model, traj, data).mean(0).sum() / n_obs
                q0 = float(q.detach()) * n_obs if q0 is None else q0
                (-q).backward()
                opt.step()
            return {"mstep_objective": q0}  # Q_hat(theta_k), on row k

        loop = EMLoop(method=self.name, evidence_kind="approximation", num_iterations=self.num_iterations,
                      rule=ConvergenceRule(self.tol), n_obs=n_obs, progress=self.progress, desc="EKF-EM")
        with pyro.validation_enabled(False):
            return loop.run(model, evaluate=evaluate, update=update, seed=seed,
                            posterior=lambda step: _posterior(step.state))


def _posterior(f) -> Posterior | None:
    if f is None:
        return None
    s = rts_smoother(f.transition_jacobian, f)
    F = f.transition_jacobian
    return Posterior(
        kind="smoothing", mean=s.mean, var=torch.diagonal(s.cov, dim1=-2, dim2=-1), log_evidence=f.log_evidence,
        evidence_kind="approximation", method="eks", cov=s.cov, cross_cov=s.cross_cov,
        diagnostics={"filter": f, "log_lik": f.log_lik}, sampler=lambda num: ffbs_sample(F, f, num),
        final_sampler=final_state_sampler(f),
    )


__all__ = ["EKFEM"]
