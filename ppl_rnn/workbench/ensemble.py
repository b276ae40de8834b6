r"""Ensembles of fitted models, scored and forecast as the **linear pool** of their predictives.

Why. A stochastic RNN's likelihood has many optima that training evidence does not rank by how well they
generalise (on ``unkelbach-synthetic`` fits from different random starts reach equal training evidence and
differ on fresh data; see ``benchmarks/README.md``, the synthetic benchmark). Averaging over optima is
the remedy of deep ensembles: fit the same architecture from :math:`K` starts and pool the predictives.

The pool. With fitted models :math:`p_1,\dots,p_K` and fixed weights :math:`w_k\ge 0`,
:math:`\sum_k w_k = 1` (equal by default), every one-step predictive is the mixture

.. math:: p(y_t\mid y_{0:t-1}) = \sum_k w_k\, p_k(y_t\mid y_{0:t-1}),

each :math:`p_k(y_t\mid y_{0:t-1})` from member :math:`k`'s own filter. The product of these conditionals is
a proper joint density of the sequence (a prequential forecaster), so its log-score
:math:`L = \sum_t\log p(y_t\mid y_{0:t-1})` is on the same scale as a single model's held-out log-evidence; by
concavity of :math:`\log` it is at least :math:`\sum_k w_k \log p_k` step by step.

Its estimate (:func:`pooled_log_evidence`, what ``evaluate`` reports) is exact when every member is scored by
Kalman; otherwise it comes from the members' particle-filter runs with the **same** log-normal bias correction
and standard error as a single model's held-out log-evidence, so pooled and single scores carry the same
Monte Carlo error model and can be compared with their SEs (see that function for the small bias that remains).

It is **not** Bayesian model averaging: BMA's weights would follow :math:`w_k\,p_k(y_{0:t-1})`, and on the
synthetic benchmark they concentrate on the member with the best training evidence, which is not the one that
generalises best (measured in ``benchmarks/README.md``, "What the methods do on the synthetic benchmark").
Nor is it one Pyro
program: no single state-space model has these conditionals, so an ensemble is scored and forecast (:func:`ppl_rnn.workbench.evaluate.evaluate` accepts
it in place of a model) but not filtered, smoothed or fitted as a whole.

k-step forecasts are mixtures too: :math:`p(y_{o+k}\mid y_{0:o}) = \sum_k w_k p_k(y_{o+k}\mid y_{0:o})`;
``evaluate`` draws its forecast sample :math:`s` from member :math:`k` in proportion to :math:`w_k`
(stratified).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ppl_rnn.errors import ConfigurationError
from ppl_rnn.method import InferenceMethod
from ppl_rnn.model import StateSpaceModel
from ppl_rnn.rng import check_seed

__all__ = ["Ensemble", "fit_ensemble", "pooled_log_evidence"]


@dataclass(frozen=True, init=False)
class Ensemble:
    r"""Fitted models pooled as :math:`\sum_k w_k p_k(y_t\mid y_{0:t-1})` (module docstring).

    models: the :math:`K` member models (same ``obs_dim``, ``input_dim`` and dtype; hidden sizes may differ)
    weights: :math:`w_k`, normalised to sum to 1 (equal when not given)
    fits: the members' ``FitResult`` when built by :func:`fit_ensemble`, else empty
    """

    models: tuple
    weights: tuple
    fits: tuple = field(default=(), repr=False, compare=False)

    def __init__(self, models: Sequence[StateSpaceModel], weights: Sequence[float] | None = None,
                 fits: Sequence[Any] = ()):
        models = tuple(models) if isinstance(models, Sequence) else models
        if not isinstance(models, tuple) or not models:
            raise ConfigurationError(f"Ensemble needs a non-empty sequence of models; found {models!r}. Pass e.g. "
                                     "Ensemble([fit1.model, fit2.model]).")
        for i, m in enumerate(models):
            if not isinstance(m, StateSpaceModel):
                raise ConfigurationError(f"Ensemble models[{i}] is a {type(m).__name__}, not a ppl_rnn.StateSpaceModel; "
                                         "pass fitted models (FitResult.model), not FitResults.")
        first = models[0]
        for i, m in enumerate(models[1:], 1):
            for attr in ("obs_dim", "input_dim", "dtype"):
                if getattr(m, attr) != getattr(first, attr):
                    raise ConfigurationError(
                        f"Ensemble models[{i}].{attr} is {getattr(m, attr)} but models[0].{attr} is "
                        f"{getattr(first, attr)}; every member must score the same data (convert with "
                        "model.double() / model.float() where the dtype differs).")
        K = len(models)
        if weights is None:
            w = (1.0 / K,) * K
        else:
            w = tuple(float(x) for x in weights)
            if len(w) != K or not all(math.isfinite(x) and x >= 0 for x in w) or sum(w) <= 0:
                raise ConfigurationError(f"Ensemble weights must be {K} finite non-negative numbers with a positive "
                                         f"sum (one per model); found {weights!r}.")
            w = tuple(x / sum(w) for x in w)
        object.__setattr__(self, "models", models)
        object.__setattr__(self, "weights", w)
        object.__setattr__(self, "fits", tuple(fits))

    def __len__(self) -> int:
        return len(self.models)

    def draw_members(self, num_draws: int):
        """``(num_draws,)`` member index of each draw, member ``k`` for a fraction :math:`w_k` of them (stratified:
        draw ``s`` takes the member whose cumulative-weight interval holds :math:`(s + 1/2)/S`)."""
        import torch

        cw = torch.cumsum(torch.tensor(self.weights, dtype=torch.float64), 0)
        u = (torch.arange(num_draws, dtype=torch.float64) + 0.5) / num_draws
        return torch.clamp(torch.searchsorted(cw, u), max=len(self.models) - 1)

    @property
    def obs_dim(self) -> int:
        return self.models[0].obs_dim

    @property
    def input_dim(self) -> int:
        return self.models[0].input_dim

    @property
    def dtype(self):
        return self.models[0].dtype


def fit_ensemble(models: Sequence[StateSpaceModel], observations, *, method: InferenceMethod, inputs=None,
                 seed: int | Sequence[int] | None = 0, progress: bool = False) -> Ensemble:
    """Fit every start in ``models`` with ``method`` (``pr.fit``, one copy each) and pool them equally.

    Args:
        models: the initial models, e.g. ``[ElmanSSM(4, 1, seed=s) for s in (1, 2, 3)]`` (different random
            starts are the point: they reach different optima).
        observations, inputs: as for :func:`ppl_rnn.fit`.
        method: the training method, shared by all members.
        seed: the fit seed of member ``i``: ``seed + i`` for an int, ``seed[i]`` for a sequence, None for none.
        progress: a progress bar over the members.

    Returns:
        an :class:`Ensemble` with equal weights and the members' ``FitResult`` in ``fits``.
    """
    from ppl_rnn.verbs import fit

    starts = list(models) if isinstance(models, Sequence) else None
    if not starts:
        raise ConfigurationError(f"fit_ensemble needs a non-empty sequence of initial models; found {models!r}.")
    if seed is None or isinstance(seed, int):
        seeds = [None if seed is None else seed + i for i in range(len(starts))]
    else:
        seeds = list(seed)
        if len(seeds) != len(starts):
            raise ConfigurationError(f"fit_ensemble got {len(starts)} models but {len(seeds)} seeds; pass one seed "
                                     "per model, or an int (member i uses seed + i).")
    for s in seeds:
        check_seed(s)
    from tqdm.auto import tqdm

    fits = [fit(m, observations, method=method, inputs=inputs, seed=s)
            for m, s in tqdm(list(zip(starts, seeds, strict=True)), disable=not progress, desc="ensemble members")]
    return Ensemble([f.model for f in fits], fits=fits)


def pooled_log_evidence(increments, weights: Sequence[float], first_test: int, *, exact: bool = False):
    r"""The pool's held-out log-evidence :math:`L=\sum_b\sum_{t\ge T_1}\log\sum_k w_k p_k(y_{b,t}\mid y_{b,0:t-1})`
    from its members' filter runs, with its Monte Carlo standard error.

    Args:
        increments: ``(K, R, B, T)`` float64, member :math:`k`'s run :math:`r`:
            :math:`\log\hat p_{krbt} = \log\hat p_k(y_{b,t}\mid y_{b,0:t-1})` (an exact member repeats its
            increments over the runs).
        weights: :math:`w_k` (summing to 1).
        first_test: :math:`T_1`, the first held-out step.
        exact: every member exact (Kalman): then :math:`L` itself and SE 0.

    Returns:
        ``(pooled, L_hat, se)``: the pooled per-step increments :math:`\log\hat q_{rbt}`, ``(R, B, T)``, with
        :math:`\hat q_{rbt} = \sum_k w_k\hat p_{krbt}`; the estimate and its SE.

    Run :math:`r`'s pooled held-out total :math:`\ell_{rb} = \sum_{t\ge T_1}\log\hat q_{rbt}` is treated like a
    single model's :math:`\log\hat p(y_{b,T_1:}\mid y_{b,0:T_1-1})`: :math:`\hat L` and SE come from
    :func:`ppl_rnn.workbench.metrics.replicate_log_evidence` (:math:`\hat L=\sum_b(\bar\ell_b+s_b^2/2)`,
    :math:`\operatorname{SE}^2=\sum_b(s_b^2/R+s_b^4/(2(R-1)))`, a :math:`t_{R-1}` interval). Why the log-normal
    correction applies: write :math:`\hat p_{kt}=p_{kt}(1+\varepsilon_{kt})` and
    :math:`\pi_{kt}=w_kp_{kt}/q_t` (member :math:`k`'s share of the pooled predictive). Then
    :math:`\prod_t\hat q_t/q_t=\prod_t(1+\sum_k\pi_{kt}\varepsilon_{kt})`, and to second order (members'
    filters independent, :math:`C_k(s,t)=\operatorname{Cov}(\varepsilon_{ks},\varepsilon_{kt})`, and each
    member's own product :math:`\prod_{s\le t}(1+\varepsilon_{ks})` unbiased, so
    :math:`E\varepsilon_{kt}\approx-\sum_{s<t}C_k(s,t)`)

    .. math:: E\prod_t\frac{\hat q_t}{q_t} \approx 1 - \sum_k\sum_{s<t}\pi_{kt}(1-\pi_{ks})\,C_k(s,t).

    So the pooled product is an unbiased estimate of :math:`\prod_t q_t` up to the covariance of a member's
    errors across steps where the pool's weight moves away from it: exactly unbiased for :math:`K=1` (then this
    is the single model's estimate) and for members whose shares :math:`\pi_{kt}` stay put, :math:`O(1/N)` in
    the particle count otherwise, against an SE of :math:`O(N^{-1/2})`. The uncorrected mean
    :math:`\sum_b\bar\ell_b` (the pool's estimate before this correction) is biased low by about
    :math:`\sum_b\sigma_b^2/2`, the whole Jensen gap, whatever :math:`N` (the cause of its under-covering
    intervals). Forecast draws and one-step draws are pooled by ``evaluate`` (module docstring).
    """
    import torch

    from .metrics import replicate_log_evidence

    inc = torch.as_tensor(increments, dtype=torch.float64)
    K = inc.shape[0]
    if len(weights) != K:
        raise ConfigurationError(f"pooled_log_evidence got increments of {K} members but {len(weights)} weights; "
                                 "pass one weight per member (Ensemble.weights).")
    logw = torch.tensor(weights, dtype=torch.float64).log()
    pooled = torch.logsumexp(inc + logw.view(K, 1, 1, 1), 0)  # (R,B,T)
    tot = pooled[:, :, first_test:].sum(-1)  # (R,B)
    if exact:
        return pooled, float(tot.mean(0).sum()), 0.0
    est, se = replicate_log_evidence(tot)
    return pooled, est, se
