"""Result records: frozen dataclasses, one line of maths per field. No algorithm stores results on itself."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from .errors import ConfigurationError
from .rng import check_seed, seeded

POSTERIOR_KINDS = ("filtering", "smoothing")
EVIDENCE_KINDS = ("exact", "estimate", "lower_bound", "approximation")


@dataclass(frozen=True)
class Posterior:
    r"""Posterior over the hidden states of ``B`` sequences of ``T`` steps.

    kind: ``"filtering"`` (:math:`p(h_t\mid y_{0:t})`) or ``"smoothing"`` (:math:`p(h_t\mid y_{0:T-1})`)
    mean: ``(B,T,H)`` :math:`E[h_t \mid \cdot]`
    var: ``(B,T,H)`` :math:`\operatorname{diag}\operatorname{Var}[h_t \mid \cdot]`
    log_evidence: ``(B,)`` :math:`\log p(y_{0:T-1})` (or its estimate / bound, see ``evidence_kind``)
    evidence_kind: ``"exact"`` | ``"estimate"`` (unbiased for :math:`p`, not :math:`\log p`) | ``"lower_bound"`` | ``"approximation"``
    method: name of the method that produced it
    cov: ``(B,T,H,H)`` :math:`\operatorname{Cov}[h_t\mid\cdot]` where the method has it, else None
    cross_cov: ``(B,T,H,H)`` :math:`\operatorname{Cov}[h_t, h_{t-1}\mid\cdot]` (index 0 unused) where available
    diagnostics: per-method extras (per-step ESS, resampling flags, filtered moments, ...)
    model: a copy of the model it was computed with (set by :func:`ppl_rnn.infer`), or None
    data: the validated :class:`~ppl_rnn.data.Data` it was computed from (set by the verbs), or None

    ``model`` and ``data`` let :func:`ppl_rnn.to_inference_data` build ``observed_data`` and
    ``log_likelihood`` from the result alone.
    """

    kind: str
    mean: torch.Tensor
    var: torch.Tensor
    log_evidence: torch.Tensor
    evidence_kind: str
    method: str = ""
    cov: torch.Tensor | None = None
    cross_cov: torch.Tensor | None = None
    diagnostics: Mapping[str, Any] = field(default_factory=dict)
    sampler: Callable[[int], torch.Tensor] | None = field(default=None, repr=False, compare=False)
    final_sampler: Callable[[int], torch.Tensor] | None = field(default=None, repr=False, compare=False)
    model: Any = field(default=None, repr=False, compare=False)
    data: Any = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if self.kind not in POSTERIOR_KINDS:
            raise ValueError(f"Posterior.kind must be one of {POSTERIOR_KINDS}; found {self.kind!r}")
        if self.evidence_kind not in EVIDENCE_KINDS:
            raise ValueError(f"Posterior.evidence_kind must be one of {EVIDENCE_KINDS}; found {self.evidence_kind!r}")

    @property
    def num_sequences(self) -> int:
        return self.mean.shape[0]

    @property
    def num_steps(self) -> int:
        return self.mean.shape[1]

    @property
    def hidden_dim(self) -> int:
        return self.mean.shape[2]

    def sample(self, num: int, seed: int | None = None) -> torch.Tensor:
        """Draw ``num`` joint trajectories ``(num, B, T, H)`` from the posterior."""
        if not isinstance(num, int) or num < 1:
            raise ConfigurationError(f"num must be a positive int; found {num!r}.")
        check_seed(seed)
        if self.sampler is None:
            raise NotImplementedError(
                f"this {self.kind} posterior from {self.method or 'this method'} has no trajectory sampler; "
                "use a smoother (ParticleSmoother, KalmanSmoother, ExtendedKalmanSmoother)."
            )
        with seeded(seed):
            return self.sampler(num)

    def sample_final(self, num: int, seed: int | None = None) -> torch.Tensor:
        r"""Draw ``num`` states ``(num, B, H)`` from :math:`p(h_{T-1}\mid y_{0:T-1})` (the start of a forecast)."""
        if self.final_sampler is None:
            return self.sample(num, seed)[:, :, -1]
        if not isinstance(num, int) or num < 1:
            raise ConfigurationError(f"num must be a positive int; found {num!r}.")
        with seeded(check_seed(seed)):
            return self.final_sampler(num)


@dataclass(frozen=True)
class FitState:
    r"""Where an iterative fit stands after its last accepted evaluation: enough to continue it exactly
    (``pr.fit(..., resume=fit)``; :class:`~ppl_rnn.inference.em_common.EMLoop`).

    method: name of the trainer that made it (a fit resumes only with the same kind of method)
    iteration: :math:`k`, the updates done so far; the parameters are :math:`\theta_k`
    parameters: the working model's ``state_dict`` at :math:`\theta_k` (in the dtype the trainer ran in)
    rng_state: torch's RNG state just before the evaluation of :math:`\theta_k` (the resumed run redraws
        that evaluation from it, bit for bit, and goes on as the uninterrupted run would)
    values, ses: the convergence rule's history :math:`\ell_0..\ell_k` and standard errors :math:`s_0..s_k`
    data_shape: ``(B, T, D)`` of the observations it was trained on
    trainer: the trainer's own state (e.g. :class:`~ppl_rnn.inference.mcem.MCEMState`; an optimiser's state)
    """

    method: str
    iteration: int
    parameters: Mapping[str, torch.Tensor] = field(repr=False)
    rng_state: torch.Tensor = field(repr=False)
    values: tuple = field(repr=False)
    ses: tuple = field(repr=False)
    data_shape: tuple = ()
    trainer: Any = field(default=None, repr=False)


@dataclass(frozen=True)
class FitResult:
    """Outcome of :func:`ppl_rnn.fit`.

    model: the fitted **copy** (the input model is untouched)
    trace: ``xarray.Dataset`` over dim ``iteration``: ``objective``, ``log_evidence``, parameters, ``wall_time_s``
    posterior: final E-step posterior, where the method has one
    wall_time_s: total fitting time in seconds
    converged: whether the method's convergence criterion was met
    method: name of the method
    evidence_kind: what ``trace.objective`` is (``"exact"``, ``"estimate"``, ``"lower_bound"``, ``"approximation"``)
    diagnostics: per-method extras
    data: the validated :class:`~ppl_rnn.data.Data` it was trained on (set by :func:`ppl_rnn.fit`), or None
    state: the :class:`FitState` that ``pr.fit(..., resume=this)`` continues from, where the method records
        one (iterative trainers that ran to their last iteration or converged), else None
    """

    model: Any
    trace: Any
    posterior: Posterior | None
    wall_time_s: float
    converged: bool
    method: str = ""
    evidence_kind: str = "estimate"
    diagnostics: Mapping[str, Any] = field(default_factory=dict)
    data: Any = field(default=None, repr=False, compare=False)
    state: FitState | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class Forecast:
    r"""Predictive draws :math:`y_{T:T+k-1} \mid y_{0:T-1}`.

    samples: ``(S, B, horizon, D)`` draws of future observations
    state_samples: ``(S, B, horizon, H)`` the matching hidden states
    mean: ``(B, horizon, D)`` :math:`E[y_{T+k}\mid y_{0:T-1}]` (Monte Carlo)
    method: name of the filtering method used for :math:`p(h_{T-1}\mid y_{0:T-1})`
    model: the model that forecast (set by :func:`ppl_rnn.forecast`), or None
    data: the validated :class:`~ppl_rnn.data.Data` the forecast conditions on, or None
    """

    samples: torch.Tensor
    state_samples: torch.Tensor
    mean: torch.Tensor
    method: str = ""
    model: Any = field(default=None, repr=False, compare=False)
    data: Any = field(default=None, repr=False, compare=False)

    @property
    def horizon(self) -> int:
        return self.samples.shape[2]

    def quantile(self, q: float) -> torch.Tensor:
        """``(B, horizon, D)`` pointwise predictive quantile."""
        return torch.quantile(self.samples, q, dim=0)


@dataclass(frozen=True)
class ParameterPosterior:
    r"""Draws from the posterior :math:`p(\theta\mid y_{0:T-1})` over a Bayesian model's parameters (its
    ``PyroSample`` sites, :mod:`ppl_rnn.priors`), ``C`` chains of ``S`` draws each (particle MCMC: PMMH, particle
    Gibbs).

    draws: ``{site: (C, S, *shape)}`` constrained draws :math:`\theta^{(c,s)}`
    sample_stats: ``{name: (C, S) or (C, S, T)}`` per-draw sampler statistics (e.g. ``acceptance_rate``
        :math:`\min(1,\alpha)`, ``accepted``, ``log_likelihood_estimate`` :math:`\log\hat p(y\mid\theta)`, ``lp``
        :math:`\log p(\theta)+\log\hat p(y\mid\theta)`, ``step_size``, a particle-Gibbs update rate per step)
    method: name of the sampler
    model: the Bayesian model (with priors) the draws are of
    paths: ``(C, S, B, T, H)`` latent paths :math:`h^{(c,s)}_{0:T-1}` drawn with the parameters, or None
    log_likelihood: ``(C, S, B, T)`` pointwise :math:`\log\hat p(y_t\mid y_{0:t-1},\theta^{(c,s)})`, or None
    diagnostics: per-method extras (proposal covariance, warm-up length, ...)
    wall_time_s: sampling time in seconds
    evidence_kind: what ``log_likelihood`` is (``"estimate"``: particle-filter increments; ``"exact"``)
    data: the validated :class:`~ppl_rnn.data.Data` it conditions on (set by :func:`ppl_rnn.infer`), or None

    The posterior predictive of :func:`ppl_rnn.forecast` and :func:`ppl_rnn.evaluate` is the linear pool
    :math:`\frac1K\sum_k p(y\mid\theta^{(k)})` over ``K`` draws thinned evenly from all chains (:meth:`models`;
    :func:`ppl_rnn.workbench.forecasting.posterior_ensemble`).
    """

    draws: Mapping[str, torch.Tensor]
    sample_stats: Mapping[str, torch.Tensor]
    method: str
    model: Any = field(default=None, repr=False, compare=False)
    paths: torch.Tensor | None = field(default=None, repr=False)
    log_likelihood: torch.Tensor | None = field(default=None, repr=False)
    diagnostics: Mapping[str, Any] = field(default_factory=dict, repr=False)
    wall_time_s: float = 0.0
    evidence_kind: str = "estimate"
    data: Any = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if not self.draws:
            raise ValueError("ParameterPosterior.draws is empty; expected {site: (chains, draws, *shape)}.")
        shapes = {n: tuple(v.shape[:2]) for n, v in self.draws.items()}
        if len(set(shapes.values())) != 1:
            raise ValueError(f"ParameterPosterior.draws must share (chains, draws); found {shapes}.")

    @property
    def num_chains(self) -> int:
        return next(iter(self.draws.values())).shape[0]

    @property
    def num_draws(self) -> int:
        return next(iter(self.draws.values())).shape[1]

    def model_at(self, chain: int, draw: int):
        r"""A plain-tensor copy of the model at :math:`\theta^{(chain, draw)}` (filter, forecast or score it)."""
        from .priors import ParameterSpace

        C, S = self.num_chains, self.num_draws
        if not (isinstance(chain, int) and -C <= chain < C and isinstance(draw, int) and -S <= draw < S):
            raise ConfigurationError(f"model_at: chain and draw must be ints indexing {C} chains x {S} draws; "
                                     f"found chain={chain!r}, draw={draw!r}.")
        if self.model is None:
            raise ConfigurationError("model_at: this posterior carries no model; get it from pr.infer.")
        space = ParameterSpace(self.model)
        z = space.unconstrain({n: self.draws[n][chain, draw] for n in space.names})
        return space.fixed(self.model, z)

    def models(self, num: int | None = None) -> list:
        """Models at ``num`` draws thinned evenly over all chains and draws (all draws when None)."""
        total = self.num_chains * self.num_draws
        num = total if num is None else num
        if isinstance(num, bool) or not isinstance(num, int) or num < 1:
            raise ConfigurationError(f"num must be a positive int or None; found {num!r}.")
        num = min(num, total)
        flat = torch.linspace(0, total - 1, num).round().long().tolist()
        return [self.model_at(i // self.num_draws, i % self.num_draws) for i in flat]



def remember(result, *, data, model=None):
    """``result`` with ``data`` (and, for a Posterior, a copy of ``model``) filled in where the method left
    them unset: what the verbs return, so a result carries what it was computed from. A FitResult's
    posterior gets the data too (its ``model`` stays unset: it was computed at the last E-step's
    parameters, not necessarily the fitted ones)."""
    if isinstance(result, Posterior):
        changes = {"data": data} if result.data is None else {}
        if result.model is None and model is not None:
            changes["model"] = model.copy() if hasattr(model, "copy") else model
        return replace(result, **changes) if changes else result
    if isinstance(result, ParameterPosterior):
        return replace(result, data=data) if result.data is None else result
    if isinstance(result, FitResult):
        changes = {"data": data} if result.data is None else {}
        if isinstance(result.posterior, Posterior) and result.posterior.data is None:
            changes["posterior"] = replace(result.posterior, data=data)
        return replace(result, **changes) if changes else result
    return result


def params_snapshot(model) -> dict[str, torch.Tensor]:
    """Constrained parameter values of a model, detached copies (for traces)."""
    out = {}
    for name, _ in model.named_parameters():
        parts = name.split(".")
        obj = model
        for p in parts[:-1]:
            obj = getattr(obj, p)
        leaf = parts[-1]
        if leaf.endswith("_unconstrained"):
            leaf = leaf[: -len("_unconstrained")]
        out[".".join(parts[:-1] + [leaf])] = getattr(obj, leaf).detach().clone()
    return out
