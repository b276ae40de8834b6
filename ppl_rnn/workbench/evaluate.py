r"""The one yardstick: every fitted model is scored the same way, whatever trained it.

Given training observations :math:`y_{0:T_1-1}` and their continuation :math:`y_{T_1:T-1}` (the test part,
the same sequences), :func:`evaluate` filters the whole series at the fitted parameters and reports

* **held-out log-evidence** :math:`L = \log p(y_{T_1:T-1}\mid y_{0:T_1-1}) = \sum_b\sum_{t\ge T_1}
  \log p(y_{b,t}\mid y_{b,0:t-1})` **with its Monte Carlo standard error**. For linear-Gaussian models the
  exact Kalman filter gives it (``evidence_method="kalman"``, SE 0). Otherwise the library's particle filter
  (:func:`ppl_rnn.inference.smc.run_particle_filter`) with **its default proposal** (whatever
  ``ParticleFilter()`` uses: the best exact-weight proposal the model allows) estimates it
  (``"particle_filter"``) from :math:`R` (``num_replicates``) independent runs, batched as extra sequences
  of one filter call. Per sequence :math:`b`, run :math:`r` gives :math:`\ell_{rb} = \log\hat p(y_{b,T_1:}\mid
  y_{b,0:T_1-1})` (the sum of its test-step increments). :math:`\hat p` is unbiased for :math:`p`, so
  :math:`\ell_{rb}` is biased low by Jensen's inequality; the log-normal CLT for particle estimates of
  normalising constants (Bérard, Del Moral & Doucet 2014), :math:`\ell_{rb}\approx\mathcal N(L_b -
  \sigma_b^2/2, \sigma_b^2)`, gives the bias-corrected estimator and its standard error

  .. math:: \hat L = \sum_b \Big(\bar\ell_b + \tfrac12 s_b^2\Big),\qquad
            \operatorname{SE}(\hat L)^2 = \sum_b \Big(\frac{s_b^2}{R} + \frac{s_b^4}{2(R-1)}\Big),

  with :math:`\bar\ell_b, s_b^2` the mean and sample variance over the :math:`R` runs (for normal
  :math:`\ell`, :math:`\bar\ell` and :math:`s^2` are independent and :math:`\operatorname{Var}(s^2) =
  2\sigma^4/(R-1)`). SE is estimated with :math:`R-1` degrees of freedom: a 95% interval is
  :math:`\hat L\pm t_{0.975,R-1}\operatorname{SE}` (2.36 SE at the default :math:`R=8`; see
  :func:`interval_halfwidth`). **Particle count**: pilot rounds start at ``num_particles`` per run; while a
  pilot's SE per test step exceeds ``0.75 * se_tol`` (``se_tol`` = 0.01 nats/step by default; the margin
  keeps the reported round, whose SE scatters around the pilot's, below ``se_tol``) the count is multiplied
  by the smallest power of two that the :math:`1/N` variance law predicts is enough (at least 2), up to
  ``max_particles``; a pilot whose filter degenerates counts as infinite SE. The reported estimate and SE
  then come from a **fresh** round at the chosen count: reporting the pilot that stopped the search would
  report an SE biased low (it was accepted *because* it came out small: optional stopping). A cell whose
  reported SE per step is above ``se_tol`` (the cap was reached, or the SE estimate itself is unstable:
  look at ``min_ess``) is marked ``se_ok = 0``. ``min_ess`` is the smallest effective sample
  size of the reported round (over runs,
  sequences and all steps: the held-out score also depends on tracking the training part).
  Normalisations: ``*_per_step`` divides by the number of test steps (sequences :math:`\times` steps, each
  carrying ``obs_dim`` entries), ``*_per_obs`` by the number of observed (non-NaN) test entries.
  ``heldout_log_lik`` (sequence, time) is the mean over runs of the per-step increments (its sum is
  :math:`\sum_b\bar\ell_b`, without the correction).

  **Singular linear-Gaussian forms.** A model that declares ``singular_linear_gaussian`` (the reference rows'
  :class:`~ppl_rnn.models.ARStateSpace`: an AR(p) in companion form, exact lags, no observation noise) is
  scored, unless ``filter="particle"``, by exact Kalman filtering of *that* form, not of its regularised
  conditionals: once the last :math:`p` values are observed the state is known, so the increments are the AR's
  own conditional densities :math:`N(y_t;\,c+\phi^\top y_{t-1:t-p},\,\sigma^2)` (missing lags marginalised
  exactly), and the forecasts below roll that form forward (its zero variances copy the mean exactly).
* **k-step forecasts from rolling origins**: at every origin :math:`o = T_1-1,\dots,T-1-k` draws of
  :math:`h_o\sim p(h_o\mid y_{0:o})` (draw :math:`s` from run :math:`s \bmod R`) are rolled forward ``k``
  steps with the model's own transition and emission — vectorised over origins, draws and sequences in one
  pass — giving draws :math:`X\sim p(y_{o+k}\mid y_{0:o})`. Per horizon, over all observed entries:

  - RMSE of the predictive mean, :math:`\sqrt{\overline{(\bar X - y)^2}}`;
  - CRPS in the energy form :math:`E|X-y| - \tfrac12 E|X-X'|` (sample estimate with the unbiased
    :math:`S(S-1)` pair average), lower is better, in the units of :math:`y`;
  - ``coverage_50``, ``coverage_80``, ``coverage_90``, ``coverage_95``: the fraction of targets inside the
    central 50/80/90/95% interval of the draws (should be the nominal level);
  - ``mase``: :math:`\operatorname{mean}|y-\operatorname{median}X|/s_{b,d}`, :math:`s_{b,d}` the in-sample
    (training part) MAE of the one-step naive forecast of series :math:`(b,d)` (non-seasonal, :math:`m=1`);
  - ``mean_wql``: GluonTS's ``mean_wQuantileLoss``, the mean over :math:`q=0.1,\dots,0.9` of
    :math:`2\sum\rho_q(y-\hat q_q)/\sum|y|` (:math:`\rho_q` the pinball loss, :math:`\hat q_q` the draws'
    quantile). Exact definitions in :mod:`ppl_rnn.workbench.metrics`.

  The per-target CRPS and squared errors are kept (``crps_by_target``, ``sqerr_by_target``), so two models
  scored on the same data can be compared target by target with a standard error that respects the serial
  correlation of forecast errors (:func:`ppl_rnn.workbench.paired.forecast_difference`).

* **one-step pointwise log-likelihood draws** ``onestep_log_lik``: where the model declares
  ``linear_gaussian_emission`` and its transition is Gaussian, :math:`\log p(y_t\mid h_{t-1}^{(s)})` with
  :math:`h_t` integrated out, :math:`N(y_t;\,Cf(h_{t-1})+c,\,CQC^\top+R)`, at draws
  :math:`h_{t-1}^{(s)}\sim p(h_{t-1}\mid y_{0:t})` (filtering draws of :math:`h_{t-1}` resampled in proportion to
  it); otherwise :math:`\log p(y_t\mid h_t^{(s)})` at filtering draws :math:`h_t^{(s)}\sim p(h_t\mid y_{0:t})`.
  Pareto-smoothed importance sampling leave-one-out (``az.loo``) reweights each draw by the inverse density,
  which turns the draws into ones given :math:`y_{0:t-1}`, so ``elpd_loo`` estimates the one-step-ahead log
  score :math:`\sum_t\log p(y_t\mid y_{0:t-1})` and ``az.compare`` ranks methods by it. The integrated form
  matters for near-noise-free emissions: :math:`1/p(y_t\mid h_t)` then has no finite variance (measured in
  ``benchmarks/README.md``, "The yardstick's one-step draws, measured"). They fill
  ``log_likelihood.y_onestep`` of the ArviZ export; ``onestep_y`` holds one-step-ahead predictive draws of
  :math:`y_t` (the posterior predictive), ``filtered_signal`` the noise-free signal :math:`E[y_t\mid h_t^{(s)}]`
  at the filtering draws (a posterior quantity with the same dims for every model, whatever its hidden size).

An :class:`~ppl_rnn.workbench.ensemble.Ensemble` is scored as the linear pool of its members: each member
gets the pass above (its own filter rounds and draws), then the per-step increments are pooled per run,
:math:`\log\sum_k w_k\hat p_k(y_t\mid y_{0:t-1})`, the runs' held-out totals give :math:`\hat L` and SE with
the same log-normal correction as a single model's (the pooled product is an unbiased estimate up to
:math:`O(1/N)`: :func:`ppl_rnn.workbench.ensemble.pooled_log_evidence`), and the forecast and one-step draws
are the mixture's (``_pool``).

The rolling-origin forecast passes one time index per lead ``j`` (that of the first origin,
:math:`T_1-1+j`) to ``transition``/``emission``; inputs are taken at each origin's own times. Models
whose conditionals depend on ``t`` other than through inputs therefore get forecasts at shifted ``t``.

Cost: one filter round is :math:`O(R N B T H^2)`; the rounds' total is below twice the last one's; the
forecast pass is :math:`O(k_{max} S T_2 H^2)`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import numpy as np
import pyro
import torch
import xarray as xr
from pyro.distributions import Independent, MultivariateNormal, Normal

from ppl_rnn.capabilities import capability
from ppl_rnn.data import Data, prepare
from ppl_rnn.errors import ConfigurationError, DataError, DegenerateWeightsError, ModelCapabilityError
from ppl_rnn.gaussian import gaussian_moments, psd_cholesky
from ppl_rnn.inference.resampling import systematic
from ppl_rnn.masking import masked_log_prob
from ppl_rnn.method import check_choice, check_positive_float, check_positive_int
from ppl_rnn.model import LinearGaussianParams, StateSpaceModel, input_at
from ppl_rnn.results import ParameterPosterior
from ppl_rnn.rng import check_seed, seeded

from .metrics import (
    COVERAGE_LEVELS,
    WQL_LEVELS,
    crps_samples,
    interval_coverage,
    mase,
    naive_scale,
    replicate_log_evidence,
    weighted_quantile_loss,
)

__all__ = ["evaluate", "onestep_predictive", "crps_samples", "metric_names", "check_horizons",
           "replicate_log_evidence", "interval_halfwidth", "default_proposal"]

#: scalar metrics reported per horizon (formulas in :mod:`ppl_rnn.workbench.metrics`)
metric_names = ("rmse", "crps", "coverage_50", "coverage_90", "mase", "mean_wql", "coverage_80", "coverage_95")
#: pilot rounds aim at this fraction of ``se_tol`` (the reported fresh round's SE scatters around the pilot's)
PILOT_MARGIN = 0.75


def interval_halfwidth(se: float, num_replicates: int, level: float = 0.95) -> float:
    r""":math:`t_{(1+\text{level})/2,\,R-1}\cdot\operatorname{SE}`: the half-width of the ``level`` interval
    for an SE estimated from ``num_replicates`` runs (Student t with :math:`R-1` degrees of freedom)."""
    from scipy.stats import t

    return float(t.ppf((1 + level) / 2, num_replicates - 1)) * float(se)


def default_proposal():
    """The particle filter's default proposal (:func:`ppl_rnn.inference.smc.default_proposal`): the yardstick
    follows it."""
    from ppl_rnn.inference.smc import default_proposal as filter_default

    return filter_default()


def _is_linear_gaussian(model) -> bool:
    return capability(model, "linear_gaussian") is not None


@torch.no_grad()
def _particle_filter(model, y, mask, u, num_particles, first_origin, num_samples, *, replicates=1,
                     proposal=None, ess_threshold=0.5, progress=False):
    r"""``replicates`` independent runs of the library's particle filter over ``y`` ``(B,T,D)``, batched as
    ``R*B`` sequences of one call. Returns per-step log-likelihood increments ``(R,B,T)`` (float64), the ESS
    ``(R,B,T)``, ``num_samples`` equally weighted draws of :math:`p(h_o\mid y_{0:o})` for
    ``o >= first_origin``: ``(S, T - first_origin, B, H)`` (draw ``s`` from run ``s % R``), taken by
    systematic resampling at every step through the filter's ``on_step`` hook (no particle history is kept)."""
    from ppl_rnn.inference.smc import run_particle_filter, take

    R = replicates
    B, T, _ = y.shape
    rep = (lambda x: x) if R == 1 else (lambda x: x.repeat(R, *([1] * (x.dim() - 1))))
    data = Data(rep(y), rep(mask), None if u is None else rep(u))
    pick = torch.arange(num_samples) % R
    arange_s = torch.arange(num_samples)
    draws = []

    def keep(t, h, lw):
        if t >= first_origin:
            d = take(h, systematic(lw, num_samples))  # (S, R*B, H)
            draws.append(d.reshape(num_samples, R, B, -1)[arange_s, pick])

    proposal = default_proposal() if proposal is None else proposal
    rec = run_particle_filter(model, data, num_particles, proposal=proposal, ess_threshold=ess_threshold,
                              progress=progress, on_step=keep)
    used = str(getattr(rec, "proposal", None) or getattr(proposal, "name", proposal))
    return rec.log_lik.double().reshape(R, B, T), rec.ess.double().reshape(R, B, T), torch.stack(draws, 1), used


def _adaptive_particle_filter(model, y, mask, u, *, first_origin, T1, num_samples, num_particles, max_particles,
                              replicates, se_tol, proposal, progress):
    """Pilot rounds of :func:`_particle_filter` raise the particle count until the SE per test step is at most
    ``PILOT_MARGIN * se_tol`` or the count reaches ``max_particles``; then a **fresh** round at that count gives the reported
    estimate and SE (a round accepted *because* its SE came out small would report an SE biased low: optional
    stopping). Pilots aim at ``PILOT_MARGIN * se_tol`` so that the fresh round, whose SE scatters around the
    pilot's, usually stays below ``se_tol``. Returns that round's increments, ESS, draws, estimate and SE
    (totals over the test steps), the particle count, the proposal used and the ``[(N, SE per step)]`` rounds
    (pilots, then the reported one)."""
    B, T, _ = y.shape
    n_test = B * (T - T1)

    def run(N):
        inc, ess, draws, used = _particle_filter(model, y, mask, u, N, first_origin, num_samples,
                                                 replicates=replicates, proposal=proposal, progress=progress)
        est, se = replicate_log_evidence(inc[:, :, T1:].sum(-1))
        return inc, ess, draws, est, se, used

    N, rounds = num_particles, []
    target = None if se_tol is None else PILOT_MARGIN * se_tol
    while target is not None:
        try:
            se_step = run(N)[4] / n_test
        except DegenerateWeightsError:
            if N >= max_particles:
                raise
            se_step = float("inf")
        rounds.append((N, se_step))
        if se_step <= target or N >= max_particles:
            break
        factor = 2 if not math.isfinite(se_step) else 2 ** max(1, math.ceil(math.log2((se_step / target) ** 2)))
        N = min(max_particles, N * factor)
    inc, ess, draws, est, se, used = run(N)
    rounds.append((N, se / n_test))
    return inc, ess, draws, est, se, N, used, rounds


@torch.no_grad()
def _kalman(model, y, mask, u, first_origin, num_samples):
    """Exact Kalman increments ``(B,T)`` and draws ``(S, T - first_origin, B, H)`` of the filtering marginals
    (through a Cholesky factor with a 1e-12 jitter, which also serves a singular covariance: a state known
    exactly, e.g. the lags of an autoregression, is drawn within 1e-6 of itself; where round-off defeats the
    jitter, a symmetric root with the negative eigenvalues set to zero). A :class:`_LinearGaussianProcess`
    is filtered in its float64."""
    from ppl_rnn.inference.kalman import kalman_filter

    p = capability(model, "linear_gaussian")()
    if isinstance(model, _LinearGaussianProcess):
        y, u = y.to(p.A.dtype), None if u is None else u.to(p.A.dtype)
    f = kalman_filter(p, y, mask, u)
    m = f.filt_mean[:, first_origin:].transpose(0, 1)  # (O,B,H)
    P = f.filt_cov[:, first_origin:].transpose(0, 1)
    H = m.shape[-1]
    Ps = 0.5 * (P + P.transpose(-1, -2))
    L, info = torch.linalg.cholesky_ex(Ps + 1e-12 * torch.eye(H, dtype=P.dtype))
    if bool((info != 0).any()):  # round-off below -1e-12 on a singular covariance: a clipped symmetric root
        w, V = torch.linalg.eigh(Ps)
        L = torch.where((info != 0)[..., None, None], V * w.clamp_min(0).sqrt().unsqueeze(-2), L)
    eps = torch.randn((num_samples,) + m.shape, dtype=m.dtype)
    draws = m + (L @ eps.unsqueeze(-1)).squeeze(-1)
    return f.log_lik.double(), draws


def _gaussian(loc, cov: torch.Tensor, diagonal: bool):
    """``N(loc, cov)`` over the last dim, sampleable when ``cov`` is singular: a diagonal one as independent
    normals whose zero variances copy the mean exactly, a full one through a jittered Cholesky factor."""
    if diagonal:
        return Normal(loc, cov.diagonal().clamp_min(0).sqrt().expand_as(loc), validate_args=False).to_event(1)
    return MultivariateNormal(loc, scale_tril=psd_cholesky(cov), validate_args=False)


class _LinearGaussianProcess(StateSpaceModel):
    r"""A model's ``singular_linear_gaussian`` form as the three conditionals the yardstick rolls forward, in
    float64: :math:`h_0\sim N(m_0,P_0)`, :math:`h_t\sim N(Ah_{t-1}+b+Bu_t,\,Q)`, :math:`y_t\sim N(Ch_t+d+Du_t,\,R)`,
    where :math:`Q`, :math:`R` (and :math:`P_0`) may be singular (:func:`_gaussian`). It declares
    ``linear_gaussian`` (the form itself: exact Kalman) and ``linear_gaussian_emission`` (the integrated one-step
    pointwise values); its densities are not used where a variance is zero."""

    def __init__(self, p: LinearGaussianParams):
        D, H = p.C.shape
        super().__init__(hidden_dim=H, obs_dim=D, input_dim=0 if p.B is None else p.B.shape[-1])
        f64 = torch.float64
        for k in ("A", "b", "Q", "C", "d", "R", "m0", "P0"):
            self.register_buffer(k, getattr(p, k).detach().to(f64).clone())
        self.Bu = None if p.B is None else p.B.detach().to(f64)
        self.Du = None if p.D is None else p.D.detach().to(f64)
        self.diag = {k: bool((M == torch.diag(M.diagonal())).all()) for k, M in
                     (("Q", self.Q), ("R", self.R), ("P0", self.P0))}
        self.diagonal_noise = p.diagonal_noise

    def _off(self, base, M, u):
        return base if u is None or M is None else base + u.to(base.dtype) @ M.T

    def initial(self, u0):
        return _gaussian(self.m0, self.P0, self.diag["P0"])

    def transition(self, t, h_prev, u_t):
        return _gaussian(h_prev @ self.A.T + self._off(self.b, self.Bu, u_t), self.Q, self.diag["Q"])

    def emission(self, t, h, u_t):
        return _gaussian(h @ self.C.T + self._off(self.d, self.Du, u_t), self.R, self.diag["R"])

    def linear_gaussian(self) -> LinearGaussianParams:
        return LinearGaussianParams(A=self.A, b=self.b, Q=self.Q, C=self.C, d=self.d, R=self.R, m0=self.m0,
                                    P0=self.P0, B=self.Bu, D=self.Du, diagonal_noise=self.diagonal_noise)

    def linear_gaussian_emission(self, t, u_t):
        return self.C, self._off(self.d, self.Du, u_t), self.R


def _scored_form(model, filter: str):
    """The model the yardstick filters and rolls forward: a model's exact singular linear-Gaussian form
    (capability ``singular_linear_gaussian``) unless ``filter="particle"``, else the model itself."""
    form = None if filter == "particle" else capability(model, "singular_linear_gaussian")
    return model if form is None else _LinearGaussianProcess(form())


def _signal(model, t, h, u):
    """Noise-free signal :math:`E[y_t\\mid h_t]` at draws ``h`` (NaN where the emission has no mean)."""
    em = model.emission(t, h, u)
    try:
        return em.mean
    except NotImplementedError:
        return torch.full(em.batch_shape + em.event_shape, float("nan"), dtype=h.dtype)


def check_horizons(horizons) -> tuple[int, ...]:
    """Validate forecast leads: a positive int or a non-empty sequence of distinct positive ints -> tuple."""
    if isinstance(horizons, int):
        horizons = (horizons,)
    try:
        hs = tuple(check_positive_int(k, "horizons entry") for k in horizons)
    except TypeError as e:
        raise ConfigurationError(f"horizons must be a positive int or a sequence of them; found {horizons!r}.") from e
    if not hs:
        raise ConfigurationError("horizons is empty; pass e.g. horizons=(1, 10).")
    if len(set(hs)) != len(hs):
        raise ConfigurationError(f"horizons has duplicates: {horizons!r}.")
    return hs


def check_yardstick_options(num_particles, max_particles, num_replicates, se_tol) -> tuple:
    """Validate the particle-count options of :func:`evaluate`; returns them normalised."""
    num_particles = check_positive_int(num_particles, "num_particles")
    max_particles = num_particles if max_particles is None else check_positive_int(max_particles, "max_particles")
    if max_particles < num_particles:
        raise ConfigurationError(f"max_particles ({max_particles}) is below num_particles ({num_particles}); pass "
                                 "max_particles >= num_particles (or None to never raise the count).")
    num_replicates = check_positive_int(num_replicates, "num_replicates", minimum=2)
    se_tol = None if se_tol is None else check_positive_float(se_tol, "se_tol")
    return num_particles, max_particles, num_replicates, se_tol


@torch.no_grad()
def evaluate(model, train, test, *, horizons: Sequence[int] | int = (1, 10), num_particles: int = 500,
             max_particles: int | None = 32000, num_replicates: int = 8, se_tol: float | None = 0.01,
             proposal=None, num_samples: int = 200, train_inputs=None, test_inputs=None, filter: str = "auto",
             seed: int | None = 0, progress: bool = False) -> xr.Dataset:
    """Score ``model`` (at its current parameters) on ``test``, the continuation of ``train``.

    Args:
        model: a :class:`ppl_rnn.StateSpaceModel` (typically ``FitResult.model``), or a
            :class:`ppl_rnn.workbench.ensemble.Ensemble` of them, scored as the linear pool of its members'
            predictives (see that module), or a :class:`ppl_rnn.results.ParameterPosterior`, scored by its
            posterior predictive (the pool of the models at 20 draws thinned over its chains:
            :func:`ppl_rnn.workbench.forecasting.posterior_ensemble`).
        train: ``(B, T1, D)`` (or ``(T1, D)``) observations the forecasts condition on; NaN = missing.
        test: ``(B, T2, D)`` the held-out continuation of the same sequences.
        horizons: forecast leads ``k`` (steps) for RMSE / CRPS / coverage.
        num_particles: particles per run of the yardstick filter in the first round (ignored by Kalman).
        max_particles: cap of the particle count per run (None: ``num_particles``, a single round).
        num_replicates: independent filter runs ``R`` (>= 2) whose spread gives the standard error.
        se_tol: target standard error of the held-out log-evidence per test step, in nats (None: one round).
        proposal: the filter's proposal (None: ``ParticleFilter()``'s default).
        num_samples: predictive draws per origin for the forecast metrics and the one-step draws.
        train_inputs, test_inputs: ``(B, T1, I)`` / ``(B, T2, I)`` for models with inputs.
        filter: ``"auto"`` (Kalman for linear-Gaussian models, else particle), ``"particle"``, ``"kalman"``.
        seed: seed of every random draw.

    Returns:
        ``xarray.Dataset`` with scalars ``heldout_logev``, ``heldout_logev_per_step``, ``heldout_logev_per_obs``,
        their standard errors ``*_se``, ``min_ess`` and ``se_ok`` (0 when the reported SE per step is above ``se_tol``);
        ``heldout_log_lik`` (sequence, time); ``rmse``, ``crps``, ``coverage_50``, ``coverage_80``,
        ``coverage_90``, ``coverage_95``, ``mase``, ``mean_wql``, ``num_forecasts`` (horizon); ``crps_by_target`` and ``sqerr_by_target`` (horizon, sequence, time, obs:
        each forecast's CRPS and squared error, indexed by its target time; NaN where there is none) for
        paired comparisons (:func:`ppl_rnn.workbench.paired.forecast_difference`); ``onestep_log_lik`` (draw,
        sequence, time), ``onestep_y`` and ``filtered_signal`` (draw, sequence, time, obs); attrs ``evidence_method``, ``num_particles`` (of the
        last round), ``num_replicates``, ``se_tol``, ``particle_rounds``, ``num_samples``, ``seed``
        (an ensemble adds ``ensemble_size``, ``ensemble_weights`` and ``pool``).
    """
    from .ensemble import Ensemble
    from .forecasting import posterior_ensemble

    if isinstance(model, ParameterPosterior):  # the posterior predictive: the pool of 20 draws' models
        model = posterior_ensemble(model)
    hs = check_horizons(horizons)
    num_particles, max_particles, num_replicates, se_tol = check_yardstick_options(
        num_particles, max_particles, num_replicates, se_tol)
    num_samples = check_positive_int(num_samples, "num_samples", minimum=2)
    check_choice(filter, "filter", ("auto", "particle", "kalman"))
    check_seed(seed)
    members = model.models if isinstance(model, Ensemble) else (model,)
    tr = prepare(members[0], train, train_inputs)
    te = prepare(members[0], test, test_inputs)
    if tr.num_sequences != te.num_sequences:
        raise DataError(
            f"train has {tr.num_sequences} sequences and test has {te.num_sequences}; test must continue the "
            "same sequences (shape (B, T2, D) with the same B).")
    T1, T2 = tr.num_steps, te.num_steps
    kmax = max(hs)
    if kmax > T2:
        raise ConfigurationError(f"the largest horizon ({kmax}) exceeds the test length ({T2} steps); "
                                 "use shorter horizons or a longer test set.")
    y = torch.cat([tr.observations, te.observations], 1)
    mask = torch.cat([tr.mask, te.mask], 1)
    u = None if tr.inputs is None else torch.cat([tr.inputs, te.inputs], 1)
    opts = dict(T1=T1, hs=hs, filter=filter, num_particles=num_particles, max_particles=max_particles,
                num_replicates=num_replicates, se_tol=se_tol, proposal=proposal, num_samples=num_samples,
                progress=progress)
    t0 = time.perf_counter()
    with seeded(seed):
        parts = [_score_pass(m, y, mask, u, **opts) for m in members]
        if isinstance(model, Ensemble):
            p = _pool(parts, model, T1, num_samples)
        else:
            p = parts[0]
    ds = _dataset(p, y, mask, te, hs, T1, se_tol, num_samples, num_replicates, seed)
    ds.attrs["eval_time_s"] = time.perf_counter() - t0
    if isinstance(model, Ensemble):
        ds.attrs.update(ensemble_size=len(members), ensemble_weights=", ".join(f"{w:.4g}" for w in model.weights),
                        pool="linear pool of the members' predictives: p(y_t | y_0:t-1) = sum_k w_k "
                             "p_k(y_t | y_0:t-1); forecast draw s from member k with probability w_k")
    return ds


def _score_pass(model, y, mask, u, *, T1, hs, filter, num_particles, max_particles, num_replicates, se_tol,
                proposal, num_samples, progress) -> dict:
    """Filter the whole series once (Kalman or the adaptive particle yardstick) and roll the forecasts forward.

    Returns ``inc`` ``(R,B,T)`` per-run increments (``(1,B,T)`` when exact), ``exact``, ``total`` and ``se``
    (held-out totals), ``min_ess``, ``n_used``, ``used``, ``rounds``, ``ys_at`` (lead -> draws ``(S,O,B,D)`` of
    :math:`y_{o+k}` for origins :math:`o = T_1-1..T-2`), ``onestep_lp`` ``(S,O,B)`` and ``signal`` ``(S,O,B,D)``.
    """
    model = _scored_form(model, filter)
    dtype = model.dtype
    B, T, D = y.shape
    T2 = T - T1
    kmax = max(hs)
    use_kalman = filter == "kalman" or (filter == "auto" and _is_linear_gaussian(model))
    first_origin = T1 - 1
    if use_kalman:
        log_lik, draws = _kalman(model, y, mask, u, first_origin, num_samples)
        inc, total, se, min_ess, n_used, rounds, used = log_lik.unsqueeze(0), float(log_lik[:, T1:].sum()), 0.0, \
            float("nan"), 0, [], ""
    else:
        with pyro.validation_enabled(False):
            inc, ess, draws, total, se, n_used, used, rounds = _adaptive_particle_filter(
                model, y, mask, u, first_origin=first_origin, T1=T1, num_samples=num_samples,
                num_particles=num_particles, max_particles=max_particles, replicates=num_replicates,
                se_tol=se_tol, proposal=proposal, progress=progress)
        min_ess = float(ess.min())
    # draws: (S, O, B, H) at origins o = T1-1 .. T-1; drop the last (nothing to forecast from it)
    h = draws[:, :T2].to(dtype)  # origins T1-1 .. T-2
    origins = torch.arange(T1 - 1, T - 1)
    ys_at = {}
    onestep_lp = signal = None
    for j in range(1, kmax + 1):
        tt = torch.clamp(origins + j, max=T - 1)  # target times (clamped ones are discarded)
        u_j = None if u is None else u[:, tt].transpose(0, 1)  # (O,B,I)
        t_first = T1 - 1 + j
        h = model.transition(t_first, h, u_j).sample()
        if j in hs or j == 1:
            ys_at[j] = model.emission(t_first, h, u_j).sample()  # (S,O,B,D)
        if j == 1:  # filtering draws at the targets T1..T-1 are the origins shifted by one
            y_t = y[:, tt].transpose(0, 1)  # (O,B,D)
            m_t = mask[:, tt].transpose(0, 1)
            hf = draws[:, 1:].to(dtype)
            onestep_lp = _integrated_onestep(model, draws[:, :T2].to(dtype), y_t, m_t, u_j, t_first)
            if onestep_lp is None:
                onestep_lp = model.observation_log_prob(t_first, hf, y_t, m_t, u_j).double()
            signal = _signal(model, t_first, hf, u_j)  # (S,O,B,D)
    return dict(inc=inc.double(), exact=use_kalman, total=total, se=se, min_ess=min_ess, n_used=n_used, used=used,
                rounds=rounds, ys_at=ys_at, onestep_lp=onestep_lp.double(), signal=signal.double())


def _pool(parts: list[dict], ens, T1: int, num_samples: int) -> dict:
    r"""Combine members' passes into the linear pool :math:`\sum_k w_k p_k` (see :mod:`.ensemble`).

    Increments per run :math:`r`: :math:`\log\sum_k w_k \hat p_k(y_t\mid y_{0:t-1})` from each member's run
    :math:`r` (exact members repeat); held-out total and SE as for a single model, from the pooled runs'
    totals with the log-normal correction (:func:`ppl_rnn.workbench.ensemble.pooled_log_evidence`).
    Forecast draw :math:`s` comes from member :math:`k` in proportion to
    :math:`w_k` (stratified), so the draws are the pool's predictive; the one-step pointwise draws and the
    filtered signal at target :math:`t` come from member :math:`k` with its posterior weight
    :math:`\propto w_k\,p_k(y_t\mid y_{0:t-1})` (then PSIS-LOO's harmonic mean returns the pool's one-step score).
    """
    from .ensemble import pooled_log_evidence

    K, S = len(parts), num_samples
    logw = torch.tensor(ens.weights, dtype=torch.float64).log()
    R = max(p["inc"].shape[0] for p in parts)
    inc = torch.stack([p["inc"].expand(R, -1, -1) for p in parts])  # (K,R,B,T)
    exact = all(p["exact"] for p in parts)
    pooled, total, se = pooled_log_evidence(inc, ens.weights, T1, exact=exact)  # (R,B,T), log-normal corrected
    # forecast draws: stratified member per draw (the pool's predictive)
    comp = ens.draw_members(S)
    ar = torch.arange(S)
    ys_at = {j: torch.stack([p["ys_at"][j].double() for p in parts])[comp, ar] for j in parts[0]["ys_at"]}
    # one-step draws given y_t: member k with probability prop. to w_k p_k(y_t | y_0:t-1)
    post = (inc.mean(1)[:, :, T1:] + logw.view(K, 1, 1)).permute(2, 1, 0)  # (O,B,K)
    O, B = post.shape[:2]
    pick = torch.multinomial(torch.softmax(post, -1).reshape(O * B, K), S, replacement=True)
    pick = pick.reshape(O, B, S).permute(2, 0, 1)  # (S,O,B)
    s_i, o_i, b_i = torch.meshgrid(ar, torch.arange(O), torch.arange(B), indexing="ij")
    lp = torch.stack([p["onestep_lp"] for p in parts])[pick, s_i, o_i, b_i]
    signal = torch.stack([p["signal"] for p in parts])[pick, s_i, o_i, b_i]
    ess = [p["min_ess"] for p in parts if not math.isnan(p["min_ess"])]
    return dict(inc=pooled, exact=exact, total=total, se=se, min_ess=min(ess, default=float("nan")),
                n_used=max(p["n_used"] for p in parts), used="; ".join(str(p["used"]) for p in parts),
                rounds=[r for p in parts for r in p["rounds"]], ys_at=ys_at, onestep_lp=lp, signal=signal)


def _dataset(p: dict, y, mask, te, hs, T1, se_tol, num_samples, num_replicates, seed) -> xr.Dataset:
    """The metrics of one pass (or a pooled one) as the documented ``xarray.Dataset``."""
    B, T, D = y.shape
    T2 = T - T1
    origins = torch.arange(T1 - 1, T - 1)
    use_kalman, total, se, rounds = p["exact"], p["total"], p["se"], p["rounds"]
    test_ll = p["inc"].mean(0)[:, T1:]  # (B,T2)
    n_obs = int(te.mask.sum())
    se_step = se / (B * T2)
    se_ok = bool(use_kalman or se_tol is None or se_step <= se_tol)
    rows = {k: [] for k in metric_names}
    scale = naive_scale(y[:, :T1], mask[:, :T1])  # (B, D): MASE's in-sample naive MAE
    n_fc = []
    # per-target losses (horizon, sequence, test time, obs): the paired comparisons of ppl_rnn.workbench.paired
    by_target = {k: np.full((len(hs), B, T2, D), np.nan) for k in ("crps", "sqerr")}
    for ih, k in enumerate(hs):
        n_orig = T2 - k + 1
        X = p["ys_at"][k][:, :n_orig].double()  # (S,n,B,D)
        tt = origins[:n_orig] + k
        yt = y[:, tt].transpose(0, 1).double()
        mt = mask[:, tt].transpose(0, 1)
        nm = int(mt.sum())
        n_fc.append(nm)
        if nm == 0:
            for key in rows:
                rows[key].append(float("nan"))
            continue
        mean = X.mean(0)
        sq = (mean - yt) ** 2
        cr = crps_samples(X, yt)
        for key, v in (("crps", cr), ("sqerr", sq)):  # targets T1-1+k .. T-1 = test indices k-1 .. T2-1
            by_target[key][ih, :, k - 1:] = torch.where(mt, v, torch.nan).permute(1, 0, 2).numpy()
        rows["rmse"].append(float(torch.sqrt(sq[mt].mean())))
        rows["crps"].append(float(cr[mt].mean()))
        for lvl in COVERAGE_LEVELS:
            rows[f"coverage_{round(100 * lvl)}"].append(interval_coverage(X, yt, mt, lvl))
        rows["mase"].append(mase(X, yt, mt, scale))
        rows["mean_wql"].append(float(weighted_quantile_loss(X, yt, mt, WQL_LEVELS).mean()))

    ds = xr.Dataset(
        {
            "heldout_logev": ((), total),
            "heldout_logev_per_step": ((), total / (B * T2)),
            "heldout_logev_per_obs": ((), total / max(n_obs, 1)),
            "heldout_logev_se": ((), se),
            "heldout_logev_per_step_se": ((), se_step),
            "heldout_logev_per_obs_se": ((), se / max(n_obs, 1)),
            "min_ess": ((), p["min_ess"]),
            "se_ok": ((), np.int8(se_ok)),
            "heldout_log_lik": (("sequence", "time"), test_ll.numpy()),
            **{k: (("horizon",), np.asarray(v)) for k, v in rows.items()},
            "num_forecasts": (("horizon",), np.asarray(n_fc)),
            "crps_by_target": (("horizon", "sequence", "time", "obs"), by_target["crps"]),
            "sqerr_by_target": (("horizon", "sequence", "time", "obs"), by_target["sqerr"]),
            "onestep_log_lik": (("draw", "sequence", "time"), p["onestep_lp"].permute(0, 2, 1).numpy()),
            "onestep_y": (("draw", "sequence", "time", "obs"),
                          p["ys_at"][1].permute(0, 2, 1, 3).double().numpy()),
            "filtered_signal": (("draw", "sequence", "time", "obs"),
                                p["signal"].permute(0, 2, 1, 3).double().numpy()),
        },
        coords={"horizon": list(hs), "time": np.arange(T1, T), "sequence": np.arange(B),
                "draw": np.arange(num_samples), "obs": np.arange(D)},
        attrs={
            "evidence_method": "kalman" if use_kalman else "particle_filter",
            "evidence_kind": "exact" if use_kalman else "estimate",
            "proposal": p["used"],
            "num_particles": p["n_used"],
            "num_replicates": 0 if use_kalman else num_replicates,
            "se_tol": float("nan") if se_tol is None else se_tol,
            "particle_rounds": ", ".join(f"N={n}: SE/step {s:.4g}" for n, s in rounds),
            "num_samples": num_samples,
            "seed": -1 if seed is None else int(seed),
            "num_train_steps": T1,
            "num_test_steps": T2,
            "num_observed_test_entries": n_obs,
            "normalisation": "heldout_logev_per_step = log p(y_test | y_train) / (num_sequences * num_test_steps); "
                             "heldout_logev_per_obs = the same / number of observed test entries",
            "estimator": "particle filter: sum_b (mean_r l_rb + s_b^2/2) over R independent runs (log-normal "
                         "bias correction); SE^2 = sum_b (s_b^2/R + s_b^4/(2(R-1))); Kalman: exact, SE 0 (of the "
                         "singular_linear_gaussian form where the model declares one)",
        },
    )
    ds["heldout_logev_per_step"].attrs["long_name"] = "held-out log-evidence per test step (nats)"
    ds["heldout_logev_per_step_se"].attrs["long_name"] = "Monte Carlo standard error of heldout_logev_per_step"
    ds["se_ok"].attrs["long_name"] = "1 if heldout_logev_per_step_se <= se_tol (or exact), else 0"
    ds["crps"].attrs["long_name"] = "CRPS (energy form), units of y"
    ds["mase"].attrs["long_name"] = ("MASE: mean |y - median forecast| / in-sample (training part) MAE of the "
                                     "one-step naive forecast, per series")
    ds["mean_wql"].attrs["long_name"] = ("mean_wQuantileLoss (GluonTS): mean over q = 0.1..0.9 of "
                                         "2 sum pinball_q / sum |y|")
    for lvl in COVERAGE_LEVELS:
        ds[f"coverage_{round(100 * lvl)}"].attrs["long_name"] = f"coverage of the central {lvl:.0%} predictive interval"
    return ds


@torch.no_grad()
def _integrated_onestep(model, prev, y_t, m_t, u_t, t: int):
    r"""``(S,n,B)`` pointwise values :math:`\log p(y_t\mid h_{t-1}^{(s)})` (:math:`h_t` integrated out) at draws
    :math:`h_{t-1}^{(s)}\sim p(h_{t-1}\mid y_{0:t})`, from filtering draws ``prev`` ``(S,n,B,H)`` of
    :math:`h_{t-1}` for ``n`` targets ``y_t``/``m_t`` ``(n,B,D)`` (inputs ``u_t`` ``(n,B,I)``, time index ``t``
    passed to the conditionals); None where the model does not declare ``linear_gaussian_emission`` or its
    transition is not Gaussian.

    With a linear-Gaussian emission :math:`N(Ch+c, R)` and a Gaussian transition :math:`N(f(h), Q(h))`,
    :math:`p(y_t\mid h_{t-1}) = N(y_t;\,Cf(h_{t-1})+c,\ CQ(h_{t-1})C^\top+R)` in closed form. The filtering draws
    of :math:`h_{t-1}` are resampled in proportion to it (importance resampling of :math:`p(h_{t-1}\mid
    y_{0:t-1})` into :math:`p(h_{t-1}\mid y_{0:t})`), so PSIS-LOO's reweighting by :math:`1/p(y_t\mid
    h_{t-1}^{(s)})` returns them to :math:`p(h_{t-1}\mid y_{0:t-1})` and ``elpd_loo`` estimates the one-step log
    score as with :math:`\log p(y_t\mid h_t^{(s)})` — but the weights now vary like a density whose variance
    includes the process noise, not like the (possibly tiny) observation noise alone, so the estimate keeps a
    finite variance for near-noise-free emissions (where :math:`1/p(y_t\mid h_t)` has none).
    """
    lge = capability(model, "linear_gaussian_emission")
    if lge is None:
        return None
    try:
        C, off, R = lge(t, u_t)
        tr = model.transition(t, prev, u_t)
        if isinstance(tr, Independent) and tr.reinterpreted_batch_ndims == 1 and isinstance(tr.base_dist, Normal):
            f, q2 = torch.broadcast_tensors(tr.base_dist.loc, tr.base_dist.scale.pow(2))  # never form (H, H)
            Q = None
        else:
            f, Q = gaussian_moments(tr)
    except ModelCapabilityError:  # a non-Gaussian transition: the caller keeps log p(y_t | h_t)
        return None
    dt = torch.float64
    C, off, R = C.to(dt), off.to(dt), R.to(dt)
    Ct = C.transpose(-1, -2)
    mu = (f.to(dt).unsqueeze(-2) @ Ct).squeeze(-2) + off  # (S,n,B,D)
    if Q is None:
        cov = (C * q2.to(dt).unsqueeze(-2)) @ Ct + R
    else:
        cov = C @ Q.to(dt) @ Ct + R
    lw = masked_log_prob(MultivariateNormal(mu, covariance_matrix=cov, validate_args=False), y_t.to(dt), m_t)
    S = lw.shape[0]
    flat = lw.permute(1, 2, 0).reshape(-1, S)  # one resampling per (target, sequence)
    idx = torch.multinomial(torch.softmax(flat, -1), S, replacement=True)
    return torch.gather(flat, 1, idx).reshape(lw.shape[1], lw.shape[2], S).permute(2, 0, 1)


def onestep_predictive(model, observations, *, inputs=None, num_samples: int = 200, num_particles: int = 2000,
                       filter: str = "auto", seed: int | None = 0):
    r"""Pointwise log-likelihood draws for ``log_likelihood.y_onestep`` and one-step predictive draws.

    Returns ``(log_lik, y_draws, increments)``: ``log_lik`` ``(S,B,T)`` the pointwise values of the module
    docstring (:math:`\log p(y_t\mid h_{t-1}^{(s)})` with :math:`h_t` integrated out where the model allows,
    else :math:`\log p(y_t\mid h_t^{(s)})` at filtering draws; :math:`\log p(y_0\mid h_0^{(s)})` at t = 0; PSIS-LOO
    turns them into the one-step log score), ``y_draws`` ``(S,B,T,D)`` draws of :math:`y_t\mid y_{0:t-1}`
    (:math:`p(h_0)` at t=0), ``increments`` ``(B,T)`` the filter's :math:`\log p(y_t\mid y_{0:t-1})`.
    """
    num_samples = check_positive_int(num_samples, "num_samples", minimum=2)
    check_choice(filter, "filter", ("auto", "particle", "kalman"))
    data = prepare(model, observations, inputs)
    y, mask, u = data.observations, data.mask, data.inputs
    B, T, _ = y.shape
    model = _scored_form(model, filter)
    use_kalman = filter == "kalman" or (filter == "auto" and _is_linear_gaussian(model))
    with seeded(seed), pyro.validation_enabled(False):
        if use_kalman:
            log_lik, draws = _kalman(model, y, mask, u, 0, num_samples)
        else:
            inc, _, draws, _ = _particle_filter(model, y, mask, u, check_positive_int(num_particles, "num_particles"),
                                                0, num_samples)
            log_lik = inc[0]
        draws = draws.to(model.dtype)  # (S,T,B,H) filtering draws
        u_all = None if u is None else u.transpose(0, 1)
        if isinstance(model, _LinearGaussianProcess):  # a singular emission has no density given h_t: use the
            lp = log_lik.double().T.expand(num_samples, T, B).clone()  # exact log p(y_t | y_0:t-1) (t > 0 replaced)
        else:
            lp = model.observation_log_prob(0, draws, y.transpose(0, 1), mask.transpose(0, 1), u_all).double()
        if T > 1:
            u_n = None if u is None else u[:, 1:].transpose(0, 1)
            lp1 = _integrated_onestep(model, draws[:, :T - 1], y[:, 1:].transpose(0, 1), mask[:, 1:].transpose(0, 1),
                                      u_n, 1)
            if lp1 is not None:
                lp[:, 1:] = lp1
        h0 = model.initial_batched(input_at(u, 0), (num_samples, B)).sample().unsqueeze(1)  # (S,1,B,H)
        if T > 1:
            u_n = None if u is None else u[:, 1:].transpose(0, 1)  # (T-1,B,I)
            h = torch.cat([h0, model.transition(1, draws[:, :T - 1], u_n).sample()], 1)
        else:
            h = h0
        yd = model.emission(0, h, u_all).sample()
    return lp.permute(0, 2, 1), yd.permute(0, 2, 1, 3), log_lik
