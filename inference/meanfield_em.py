r"""Mean-field EM for recurrent networks (Ma & Ji 1998), generalised to the stochastic Elman network.

Model (:class:`~ppl_rnn.models.ElmanSSM`): :math:`z_t = g(W z_{t-1} + U u_t + b) + e_t`,
:math:`e_t\sim N(0,\operatorname{diag}q^2)`, :math:`y_t = C z_t + d + v_t`, :math:`v_t\sim N(0,\operatorname{diag}r^2)`
with :math:`g=\tanh` or the identity; the hidden states :math:`z_t` are the "desired hidden targets" of
Ma & Ji, treated as missing data.

**E-step (deterministic mean-field recursion).** The self-consistent mean-field approximation
:math:`p(z_t\mid z_{t-1}, y_t) \approx p(z_t\mid \tilde z_{t-1}, y_t)` replaces the previous state by its
expected value, so each step is one Gaussian update with prior :math:`N(\tilde h_t, Q)`:

.. math::
    \tilde h_t = g(W\tilde z_{t-1} + U u_t + b),\quad
    K_t = Q C^\top (C Q C^\top + R)^{-1},\quad
    \tilde z_t = \tilde h_t + K_t\,(y_t - C\tilde h_t - d),\quad \Sigma_t = Q - K_t C Q

(Ma & Ji's eq. :math:`\tilde z_j = \tilde h_j + \lambda_2 w_j/(\lambda_1+\lambda_2\|w\|^2)\,\tilde c` for one
output, :math:`Q=\lambda_1^{-1}I`, :math:`R=\lambda_2^{-1}`), started from :math:`N(m_0, \operatorname{diag}s_0^2)`.
Only observed entries of :math:`y_t` enter :math:`K_t` (a fully missing step gives :math:`\tilde z_t=\tilde h_t`).

**M-step (one weighted linear regression per neuron).**

* output map: least squares of :math:`y_{t,k}` on :math:`(\tilde z_t, 1)` over the observed steps, with
  :math:`E[zz^\top] = \tilde z\tilde z^\top + \Sigma_t` (the :math:`E_p` penalty of Ma & Ji); :math:`r_k^2` the
  mean squared residual (the KalmanEM formula with the mean-field moments);
* recurrent weights, per hidden unit :math:`j`: the single-neuron problem
  :math:`\min_\theta\sum_t(\tilde z_{t,j} - g(x_t^\top\theta))^2`, :math:`x_t = (\tilde z_{t-1}, u_t, 1)`, is
  linearised through the inverse activation (Ma & Ji eq. 47): with :math:`v_t=\tilde z_{t,j}`,
  :math:`g(x^\top\theta) \approx v + g'(g^{-1}(v))(x^\top\theta - g^{-1}(v))`, so
  :math:`\theta_j = (X^\top G^2 X)^{-1}X^\top G^2 g^{-1}(v)` with :math:`G=\operatorname{diag}(1-v_t^2)` for
  :math:`\tanh` (targets clipped to :math:`|v|\le 1-10^{-6}`), plain least squares for the identity;
* :math:`q_j^2 = \overline{(\tilde z_{t,j} - g(x_t^\top\theta_j))^2 + \Sigma_{t,jj}}`;
  :math:`m_0, s_0^2` from :math:`\tilde z_0, \Sigma_0`.

**Objective.** The trace's ``objective`` (= ``log_evidence``, ``evidence_kind="approximation"``) is the
*mean-field log-likelihood surrogate* :math:`\sum_t \log N(y_t;\ C\tilde h_t + d,\ CQC^\top + R)`: the
evidence of a filter that propagates only the mean. It is not a bound, and EM is not guaranteed to
increase it.

**When it fails.** (1) *Saturation*: targets near :math:`\pm1` make :math:`g^{-1}` explode and their
weights :math:`(1-v^2)^2` vanish, so the regression is dominated by few points or ill-conditioned.
(2) *Large process noise*: the recursion ignores the uncertainty of :math:`z_{t-1}` (it pushes a point
through :math:`g`), and the E-step is a filter, not a smoother (only :math:`y_t`, not future observations,
informs :math:`\tilde z_t`), so the targets are biased and :math:`W`, :math:`q` are misestimated — the method
is exact only in the limit :math:`q\to0` of a linear model. (3) *Multimodal posteriors*: a single mean path
can sit between modes, where no trajectory of the model goes. Use :class:`~ppl_rnn.inference.MonteCarloEM`
when these matter; mean-field EM is fast (no sampling) and a good initialiser.
"""

from __future__ import annotations

import dataclasses

import torch

from ppl_rnn.capabilities import require
from ppl_rnn.errors import ModelCapabilityError
from ppl_rnn.gaussian import kalman_update
from ppl_rnn.results import Posterior

from .em_common import ClosedFormEM, ConvergenceRule, EMLoop, EMStep, load_resumed_parameters
from .kalman_em import emission_mstep_diag

_ACT = {"tanh": (torch.tanh, torch.atanh), "identity": (lambda x: x, lambda x: x)}


def _check_model(model):
    for name in ("elman_form", "set_elman_form"):
        require(model, name, needed_by="MeanFieldEM (defined for the stochastic Elman network)",
                alternative="use MonteCarloEM (generic M-step) for other models")
    act = model.elman_form().activation
    if act not in _ACT:
        raise ModelCapabilityError(f"MeanFieldEM supports the activations {sorted(_ACT)}; the model's "
                                   f"elman_form() has {act!r}. Use MonteCarloEM.")


@torch.no_grad()
def meanfield_estep(model, data):
    r"""The mean-field recursion. Returns ``(z (B,T,H), Sigma (B,T,H,H), log_lik (B,T))``."""
    f = model.elman_form()
    g = _ACT[f.activation][0]
    y, mask, u = data.observations, data.mask, data.inputs
    B, T, _ = y.shape
    H = model.hidden_dim
    C, d, R = f.C, f.d, torch.diag(f.r**2)
    Q = torch.diag(f.q**2).expand(B, H, H)
    zs, Ss, lls = [], [], []
    z = None
    for t in range(T):
        if t == 0:
            h_pred = f.m0.expand(B, H)
            P_pred = torch.diag(f.s0**2).expand(B, H, H)
        else:
            a = z @ f.W.T + f.b
            if f.U is not None:
                a = a + u[:, t] @ f.U.T
            h_pred, P_pred = g(a), Q
        z, S, ll = kalman_update(h_pred, P_pred, y[:, t], mask[:, t], C, d, R)
        zs.append(z)
        Ss.append(S)
        lls.append(ll)
    return torch.stack(zs, 1), torch.stack(Ss, 1), torch.stack(lls, 1)


@torch.no_grad()
def meanfield_mstep(model, data, z, S, *, clip: float = 1e-6, learn_initial: bool = True):
    """Per-neuron weighted linear regressions (module docstring); updates ``model`` in place."""
    f = model.elman_form()
    g, ginv = _ACT[f.activation]
    y, mask, u = data.observations, data.mask, data.inputs
    B, T, H = z.shape
    dt = z.dtype
    C, dd, r2 = emission_mstep_diag(z, S, y, mask, f.C, f.d, f.r)
    new = {"C": C, "d": dd, "r": r2.sqrt()}
    Sd = torch.diagonal(S, dim1=-2, dim2=-1)
    if learn_initial:
        m0 = z[:, 0].mean(0)
        new.update(m0=m0, s0=(((z[:, 0] - m0) ** 2 + Sd[:, 0]).mean(0)).clamp_min(1e-12).sqrt())
    if T < 2:
        model.set_elman_form(dataclasses.replace(f, **new))
        return
    n_in = 0 if f.U is None else f.U.shape[1]
    parts = [z[:, :-1]]
    if n_in:
        parts.append(u[:, 1:T])
    parts.append(torch.ones(B, T - 1, 1, dtype=dt))
    X = torch.cat(parts, -1).reshape(-1, parts[0].shape[-1] + n_in + 1)
    V = z[:, 1:].reshape(-1, H)
    if f.activation == "tanh":
        V = V.clamp(-1 + clip, 1 - clip)
        G2 = (1 - V * V) ** 2  # (M, H) weights c(n)^2
    else:
        G2 = torch.ones_like(V)
    target = ginv(V)
    P_ = X.shape[1]
    A = torch.einsum("mj,mp,mq->jpq", G2, X, X)
    rhs = torch.einsum("mj,mp->jp", G2 * target, X)
    ridge = 1e-8 * torch.diagonal(A, dim1=-2, dim2=-1).mean(-1).clamp_min(1e-30)
    Th = torch.linalg.solve(A + ridge[:, None, None] * torch.eye(P_, dtype=dt), rhs.unsqueeze(-1)).squeeze(-1)
    new.update(W=Th[:, :H], b=Th[:, -1])
    if n_in:
        new["U"] = Th[:, H:H + n_in]
    resid = z[:, 1:].reshape(-1, H) - g(X @ Th.T)
    q2 = (resid**2).mean(0) + Sd[:, 1:].reshape(-1, H).mean(0)
    new["q"] = q2.clamp_min(1e-12).sqrt()
    model.set_elman_form(dataclasses.replace(f, **new))


class MeanFieldEM(ClosedFormEM):
    """Mean-field EM of Ma & Ji (1998) for :class:`~ppl_rnn.models.ElmanSSM` (module docstring: the
    approximation, the objective reported and when it fails).

    Args:
        num_iterations: maximum EM iterations.
        tol: relative tolerance of the convergence rule of :mod:`~ppl_rnn.inference.em_common` (the
            surrogate is deterministic: stop when it changes by at most ``tol * max(|surrogate|, n_obs)`` per
            iteration; ``0``: run all iterations).
        learn_initial: update ``m0``, ``s0``.
        progress: progress bar.

    ``FitResult.evidence_kind == "approximation"``; ``trace.objective`` is the mean-field surrogate at
    :math:`\\theta_k` (row 0 = initial model); ``posterior`` holds the mean-field targets (a filtering-type
    point approximation, ``kind="filtering"``).
    """

    name = "meanfield_em"

    default_tol = 1e-6

    def _fit(self, model, data, seed, resume=None):
        _check_model(model)
        if resume is not None:  # pr.fit(..., resume=fit): continue from its parameters
            load_resumed_parameters(model, resume, self.name)

        def evaluate(k):
            z, S, ll = meanfield_estep(model, data)
            obj = float(ll.sum())
            return EMStep(value=obj, scalars={"log_evidence": obj, "objective": obj}, state=(z, S, ll))

        def update(k, step):
            meanfield_mstep(model, data, *step.state[:2], learn_initial=self.learn_initial)

        def posterior(step):
            z, S, ll = step.state
            return Posterior(kind="filtering", mean=z, var=torch.diagonal(S, dim1=-2, dim2=-1),
                             log_evidence=ll.sum(-1), evidence_kind="approximation", method=self.name, cov=S,
                             diagnostics={"log_lik": ll})

        loop = EMLoop(method=self.name, evidence_kind="approximation", num_iterations=self.num_iterations,
                      rule=ConvergenceRule(self.tol), n_obs=data.num_observed, progress=self.progress,
                      desc="MeanFieldEM")
        return loop.run(model, evaluate=evaluate, update=update, seed=seed, posterior=posterior,
                        attrs={"objective": "mean-field log-likelihood surrogate"},
                        diagnostics={"objective": "sum_t log N(y_t; C h~_t + d, C Q C^T + R) (mean-field)"},
                        resume=resume, data_shape=tuple(data.observations.shape))


__all__ = ["MeanFieldEM", "meanfield_estep", "meanfield_mstep"]
