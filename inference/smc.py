r"""The particle filter (sequential Monte Carlo) with ESS-adaptive resampling and a correct log-evidence.

For each sequence :math:`b` independently (weights are never shared between sequences), with
normalised log-weights :math:`\ell^n_{t-1}` (:math:`\sum_n e^{\ell^n_{t-1}} = 1`):

1. **Resample** (adaptive): if :math:`\mathrm{ESS}_{t-1} = 1/\sum_n e^{2\ell^n_{t-1}} < \tau N`, draw
   ancestors :math:`a^n_t` by the chosen scheme (:mod:`~ppl_rnn.inference.resampling`) and set
   :math:`\tilde\ell^n_{t-1} = -\log N`; otherwise :math:`a^n_t = n`, :math:`\tilde\ell^n_{t-1} = \ell^n_{t-1}`.
2. **Propagate**: :math:`h^n_t \sim q_t(\cdot\mid h^{a^n_t}_{t-1}, y_t)` (:mod:`~ppl_rnn.inference.proposals`;
   the bootstrap proposal is the transition).
3. **Weight**: :math:`\log\omega^n_t = \log p(y_{t,o}\mid h^n_t) + \log p(h^n_t\mid h^{a^n_t}_{t-1})
   - \log q_t(h^n_t\mid\cdot)` (only the first term for the bootstrap proposal; missing entries add nothing,
   through ``model.observation_log_prob``).
4. **Evidence increment**: :math:`\log\hat p(y_t\mid y_{0:t-1}) = \operatorname{logsumexp}_n(\tilde\ell^n_{t-1}
   + \log\omega^n_t)`, then :math:`\ell^n_t = \tilde\ell^n_{t-1} + \log\omega^n_t - \log\hat p(y_t\mid y_{0:t-1})`.

(:math:`t=0`: :math:`\tilde\ell^n_{-1} = -\log N`, :math:`q_0` targets :math:`p(h_0)`.) A fully missing step
adds :math:`\log p(h_t\mid h_{t-1}) - \log q_t` only, so its increment is exactly 0 for the bootstrap
proposal and an estimate of 0 (with weights to normalise) for a guided one.

**Fully adapted filter.** With an *adapted* proposal (:mod:`~ppl_rnn.inference.adapted`; chosen by the
default ``proposal="auto"`` when the transition is Gaussian and the emission declared linear-Gaussian) step t
instead weights the particles at :math:`t-1` by the exact predictive :math:`p(y_t\mid h^n_{t-1})`, takes the
increment :math:`\operatorname{logsumexp}_n(\ell^n_{t-1} + \log p(y_t\mid h^n_{t-1}))`, resamples on those
weights (ESS-adaptive) and then draws :math:`h_t` exactly from :math:`p(h_t\mid h_{t-1}, y_t)`. Because the
increment uses the *carried* weights :math:`\tilde\ell_{t-1}` whether or not the step resampled,
:math:`\hat Z = \prod_t \hat p(y_t\mid y_{0:t-1})` is an unbiased estimate of :math:`p(y_{0:T-1})` under
adaptive resampling (Del Moral 2004; Chopin & Papaspiliopoulos 2020, ch. 10); :math:`\log\hat Z` is biased
low (Jensen), so ``evidence_kind="estimate"``.

Filtered moments: :math:`E[h_t\mid y_{0:t}] \approx \sum_n e^{\ell^n_t} h^n_t` and the weighted variance.

If every particle of a sequence gets zero weight (or a NaN/inf weight) the filter raises
:class:`~ppl_rnn.errors.DegenerateWeightsError` naming the sequence and the step; it never returns NaN.

**One loop.** :func:`run_particle_filter` is the only time loop: a proposal object
(:mod:`~ppl_rnn.inference.proposals`) with a predictive weight (``predictive``/``sample``) has steps 3-4 done
first, on the particles at :math:`t-1` with :math:`\log p(y_t\mid h_{t-1})`, then 1-2 (resample on those
weights, draw exactly); any other proposal runs 1-4 in order. The default ``proposal="auto"`` is resolved by :func:`best_proposal`, which records its reason.

:func:`run_particle_filter` is the functional core (used by the smoother, the EM E-step and the evaluator);
:class:`ParticleFilter` is the method object for :func:`ppl_rnn.infer`. With ``keep_history=True`` the
record holds the particle history ``(T, N, B, H)``, the log-weights ``(T, N, B)`` and the ancestors
``(T, N, B)``: memory :math:`T N B (H + 1)` floats plus :math:`T N B` int64.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import math
import warnings
from dataclasses import dataclass

import pyro
import torch

from ppl_rnn.capabilities import capability
from ppl_rnn.data import Data
from ppl_rnn.errors import ConfigurationError, DegenerateWeightsError
from ppl_rnn.method import InferenceMethod, check_positive_int
from ppl_rnn.model import StateSpaceModel, input_at
from ppl_rnn.results import Posterior
from ppl_rnn.rng import seeded
from ppl_rnn.scope import threads_for

from .adapted import FullyAdapted, gaussian_factor, is_gaussian
from .complete_data import cached_params
from .proposals import Auto, Bootstrap, as_proposal, diag_normal
from .resampling import get_resampler, multinomial, systematic, systematic_from_weights, take

_DTYPES = {None: None, "float32": torch.float32, "float64": torch.float64,
           torch.float32: torch.float32, torch.float64: torch.float64}


@dataclass(frozen=True)
class ParticleFilterRecord:
    r"""Output of :func:`run_particle_filter` (``B`` sequences, ``T`` steps, ``N`` particles).

    log_evidence: ``(B,)`` :math:`\log\hat p(y_{0:T-1}) = \sum_t` ``log_lik``
    log_lik: ``(B,T)`` :math:`\log\hat p(y_t\mid y_{0:t-1})`
    ess: ``(B,T)`` effective sample size of the filtering weights at t
    resampled: ``(B,T)`` bool, whether step t resampled before propagating (always False at t=0)
    filt_mean, filt_var: ``(B,T,H)`` weighted mean and variance of :math:`p(h_t\mid y_{0:t})`
    final_particles: ``(N,B,H)`` :math:`h^n_{T-1}`; final_log_weights: ``(N,B)`` normalised :math:`\ell^n_{T-1}`
    particles: ``(T,N,B,H)`` :math:`h^n_t` or None (``keep_history=False``)
    log_weights: ``(T,N,B)`` normalised :math:`\ell^n_t` or None
    ancestors: ``(T,N,B)`` int64 :math:`a^n_t` (index into ``particles[t-1]``; identity at t=0) or None
    proposal: the proposal used (``"bootstrap"``, ``"adapted"``, ``"ekf"`` or a custom proposal's name)
    proposal_reason: why (for ``proposal="auto"``: :func:`best_proposal`'s reason; else ``"given"``)

    With the fully adapted proposal (:mod:`~ppl_rnn.inference.adapted`) ``ess`` is the ESS of the
    auxiliary weights :math:`\ell_{t-1} + \log p(y_t\mid h_{t-1})` on which step t resamples (the filtering
    weights are uniform after a resampling, which would hide the degeneracy), ``resampled[t]`` whether they
    were resampled, and ``log_weights`` the filtering weights of :math:`h_t` (uniform after a resampling).
    """

    log_evidence: torch.Tensor
    log_lik: torch.Tensor
    ess: torch.Tensor
    resampled: torch.Tensor
    filt_mean: torch.Tensor
    filt_var: torch.Tensor
    final_particles: torch.Tensor
    final_log_weights: torch.Tensor
    particles: torch.Tensor | None = None
    log_weights: torch.Tensor | None = None
    ancestors: torch.Tensor | None = None
    proposal: str = "bootstrap"
    proposal_reason: str = "given"

    @property
    def num_particles(self) -> int:
        return self.final_particles.shape[0]


def _degenerate(a: torch.Tensor, l_t: torch.Tensor, t: int, data: Data) -> DegenerateWeightsError:
    bad = torch.nonzero(~torch.isfinite(l_t)).flatten()
    b = int(bad[0])
    col = a[:, b]
    n_obs = int(data.mask[b, t].sum())
    if torch.isnan(col).any():
        cause = ("some particle weights are NaN: the model produced NaN (overflow in transition/emission, NaN "
                 "parameters, or a proposal returning NaN). Check the parameters and scales of the model")
    elif (col == float("inf")).any():
        cause = ("some particle weights are +inf: a degenerate density (e.g. an observation noise of 0). Give "
                 "the emission a positive noise scale")
    else:
        cause = (f"every particle has zero likelihood for the {n_obs} observed entr{'y' if n_obs == 1 else 'ies'} "
                 f"y[{b}, {t}] = {data.observations[b, t].tolist()}: the observation noise is probably too small "
                 "for the particle spread, the observation is an outlier, or the model is misspecified. Increase "
                 "num_particles or the observation noise, remove the outlier (set it to NaN), or use a guided "
                 "proposal")
    return DegenerateWeightsError(
        f"particle filter weights degenerate for sequence {b} at time step {t} "
        f"({bad.numel()} sequence(s) affected): {cause}.", sequence=b, time_step=t)


def _cast(model, data: Data, dtype, device):
    """A copy of model/data in ``dtype``/``device`` when they differ (the caller's objects are untouched)."""
    p = next(iter(model.parameters()), None)
    if p is None:  # a model with fixed (buffer) parameters only, e.g. a parameter-posterior draw's
        p = next((b for b in model.buffers() if b.is_floating_point()), None)
    cur_dtype = p.dtype if p is not None else torch.get_default_dtype()
    cur_device = p.device if p is not None else torch.device("cpu")
    dtype = cur_dtype if dtype is None else dtype
    device = cur_device if device is None else torch.device(device)
    if dtype != cur_dtype or device != cur_device:
        model = model.copy().to(dtype=dtype, device=device)
    if data.observations.dtype != dtype or data.observations.device != device:
        data = Data(data.observations.to(dtype=dtype, device=device), data.mask.to(device),
                    None if data.inputs is None else data.inputs.to(dtype=dtype, device=device))
    return model, data


@contextlib.contextmanager
def _gc_paused():
    """Pause Python's cyclic garbage collector (per-step distribution objects otherwise trigger collections
    of the whole heap inside the loop); reference counting still frees every tensor at once."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _denormals_flushed() -> bool:
    return (torch.tensor([1e-38]) * torch.tensor([0.01])).item() == 0.0


@contextlib.contextmanager
def _denormals_flushed_to_zero():
    """Flush denormal floats (below ~1e-38 in float32) to zero on this thread for the block (restored on
    exit): products of tiny weights with particles are otherwise denormal and 10-100x slower on x86. The
    values affected are far below any weight or moment the filter reports."""
    before = _denormals_flushed()
    changed = not before and torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if changed:
            torch.set_flush_denormal(False)


@contextlib.contextmanager
def fast_context(model=None):
    """No autograd, no distribution argument validation, no cyclic GC, denormals flushed to zero and cached
    parameters inside the particle loops."""
    with torch.no_grad(), pyro.validation_enabled(False), _gc_paused(), _denormals_flushed_to_zero():
        if model is None:
            yield
        else:
            with cached_params(model):
                yield


#: steps whose particles are held back to compute filtered moments in one batched pass (bounded memory)
_MOMENT_BLOCK_ELEMENTS = 1 << 18

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def exp_clamp_bounds(dtype: torch.dtype) -> tuple[int, float]:
    """``(log_tiny, tiny)`` for exponentiating log-weights in ``dtype``: exponents are clamped at ``log_tiny``
    (torch's ``exp`` is 10-30x slower below it, the denormal range) and results at or below ``tiny`` (a little
    above ``exp(log_tiny)``, within rounding) are set to 0."""
    log_tiny = math.ceil(math.log(torch.finfo(dtype).tiny))
    return log_tiny, 1.001 * math.exp(log_tiny)


def _flush_moments(w, h, mean, var, t0):
    """Weighted means and variances of ``K`` pending steps into ``mean``/``var`` ``(B,T,H)`` at ``t0..t0+K-1``:
    ``w (K,N,B)`` normalised weights, ``h (K,N,B,H)`` particles (two-pass: centred second moment)."""
    K, N, B, H = h.shape
    if B == 1 and H > 1:  # batched (1,N)@(N,H) products, no copies (with H = 1 bmm is ~5x slower than mul-sum)
        wt = w.view(K, 1, N)
        hk = h.view(K, N, H)
        m = torch.bmm(wt, hk)  # (K,1,H)
        v = torch.bmm(wt, (hk - m).square_())
        mean[0, t0:t0 + K] = m.squeeze(1)
        var[0, t0:t0 + K] = v.squeeze(1)
        return
    ww = w.unsqueeze(-1)  # (K,N,B,1)
    m = (ww * h).sum(1)  # (K,B,H)
    v = (h - m.unsqueeze(1)).square_().mul_(ww).sum(1)
    mean[:, t0:t0 + K] = m.transpose(0, 1)
    var[:, t0:t0 + K] = v.transpose(0, 1)


@dataclass(frozen=True)
class ProposalChoice:
    """What :func:`best_proposal` chose (``proposal``, a proposal object) and why (``reason``, one sentence)."""

    proposal: object
    reason: str


def _probe(model, data):
    """``(gaussian_initial, gaussian_transition, gaussian_emission)``: the laws probed once at the initial
    mean (no random numbers drawn)."""
    with torch.no_grad(), pyro.validation_enabled(False):
        if data is not None:
            B, T = data.observations.shape[0], data.observations.shape[1]
            u0, u1 = input_at(data.inputs, 0), input_at(data.inputs, 1 if T > 1 else 0)
        else:
            B, T, u0, u1 = 1, 2, None, None
        d0 = model.initial_batched(u0, (B,))
        g_init = gaussian_factor(d0) is not None
        h0 = d0.mean.expand((2,) + tuple(d0.mean.shape[-2:])) if d0.mean.dim() >= 2 else d0.mean
        if capability(model, "transition_loc_scale") is not None or T < 2:
            g_tr = True
        else:
            g_tr = gaussian_factor(model.transition(1, h0, u1)) is not None
        g_em = capability(model, "emission_loc_scale") is not None or is_gaussian(model.emission(0, h0, u0))
    return g_init, g_tr, g_em


def best_proposal(model, data: Data | None = None) -> ProposalChoice:
    r"""The proposal of the default ``"auto"`` filter, a plain function of the model's declared capabilities:
    never more costly per unit of precision (time :math:`\times\operatorname{Var}\log\hat Z`) than the
    bootstrap filter.

    1. **Exact-weight full adaptation** (:class:`~ppl_rnn.inference.adapted.FullyAdapted`) where the declared
       capabilities give it in closed form: Gaussian initial and transition laws, the capability
       ``linear_gaussian_emission``, and ``observation_log_prob`` not overridden. Its weights
       :math:`p(y_t\mid h_{t-1})` are exact and bounded and its draws :math:`p(h_t\mid h_{t-1},y_t)` exact, so no
       proposal has a lower variance with the same particles, at a step cost close to the bootstrap filter's.
    2. **The bootstrap filter** (:class:`~ppl_rnn.inference.proposals.Bootstrap`) otherwise, including a
       Gaussian emission that is not declared linear. The rule: the EKF proposal
       (:class:`~ppl_rnn.inference.ekf_proposal.Guided`) is never chosen automatically. Its step costs 5-7
       bootstrap steps, and its weights :math:`p(y\mid h)p(h\mid h')/q(h)` are unbounded wherever the
       linearisation fails (:math:`q` is narrower than the target there), so their variance can be infinite and no
       short pilot can certify it; the bootstrap weights :math:`p(y\mid h)` are bounded (its time x variance
       against the bootstrap filter's is measured in ``benchmarks/README.md``, "Proposals, warm starts and restarts").
       Pass ``proposal=Guided()`` where it pays.

    If the laws cannot be probed (a user law raising on the initial mean), a ``RuntimeWarning`` says why and the
    bootstrap filter (always exact-weight) is used. ``data`` (optional) supplies the inputs and batch of the probe.

    Returns a :class:`ProposalChoice`: the proposal object and the reason, which the filter records as
    ``ParticleFilterRecord.proposal_reason`` / ``Posterior.diagnostics["proposal_reason"]``.
    """
    plain_obs = type(model).observation_log_prob is StateSpaceModel.observation_log_prob
    try:
        g_init, g_tr, g_em = _probe(model, data)
    except Exception as err:  # noqa: BLE001 - any user law that cannot be probed: say so, stay exact-weight
        warnings.warn(
            f"proposal='auto': probing {type(model).__name__}'s initial/transition/emission laws at the initial mean "
            f"raised {type(err).__name__}: {err}; falling back to the bootstrap filter (always exact-weight, maybe "
            "less precise). Pass proposal=Bootstrap() (or another proposal object) to choose explicitly.",
            RuntimeWarning, stacklevel=3)
        return ProposalChoice(Bootstrap(), f"bootstrap: the model's laws could not be probed ({type(err).__name__}: "
                                           f"{err})")
    if not (g_init and g_tr):
        which = "initial" if not g_init else "transition"
        return ProposalChoice(Bootstrap(), f"bootstrap: the {which} law is not Gaussian, so no closed-form adaptation")
    if not plain_obs:
        return ProposalChoice(Bootstrap(), "bootstrap: observation_log_prob is overridden, so no closed-form "
                                           "adaptation")
    if capability(model, "linear_gaussian_emission") is not None:
        return ProposalChoice(FullyAdapted(), "adapted: Gaussian transition and declared linear-Gaussian emission give "
                                              "exact predictive weights and conditional draws in closed form")
    if g_em:
        return ProposalChoice(Bootstrap(), "bootstrap: Gaussian emission not declared linear (linear_gaussian_emission "
                                           "absent); the EKF proposal is never chosen automatically (unbounded "
                                           "weights, 5-7x the step cost)")
    return ProposalChoice(Bootstrap(), "bootstrap: the emission is not Gaussian, so no closed-form adaptation")


def _resolve(proposal, model, data) -> tuple[object, str]:
    prop = as_proposal(proposal)
    if isinstance(prop, Auto):
        choice = best_proposal(model, data)
        return choice.proposal, choice.reason
    return prop, "given"


class _Conditional:
    r"""The conditional SMC hook of :func:`run_particle_filter` (``reference=``, particle Gibbs): the last
    particle slot carries the reference path :math:`x^\star_{0:T-1}` ``(B,T,H)``.

    The filter then resamples at every step, multinomially (the other :math:`N-1` ancestors stay i.i.d. given
    the reference's, as conditional SMC needs; systematic resampling would couple them), and at :math:`t\ge1`
    the reference's ancestor is drawn

    * with ancestor sampling (Lindsten, Jordan & Schön 2014): :math:`P(a^N_t = i) \propto W^i_{t-1}\,
      f_t(x^\star_t\mid h^i_{t-1})`, :math:`W_{t-1}` the *filtering* weights at :math:`t-1`. With the fully
      adapted proposal the pair (ancestor :math:`i`, particle :math:`x`) has the joint weight
      :math:`W^i_{t-1} f_t(x\mid h^i_{t-1})\, g_t(y_t\mid x)` exactly as in the bootstrap filter, and
      :math:`g_t(y_t\mid x^\star_t)` is common to every :math:`i`, so the same formula holds; the loop's
      auxiliary weights :math:`W^i_{t-1} p(y_t\mid h^i_{t-1})` are divided by the predictive first;
    * without it, :math:`a^N_t = N-1` (the reference keeps its own past);

    and after propagation :math:`h^N_t = x^\star_t`. Only proposals whose weight does not involve the
    proposal density of the pinned particle qualify: the bootstrap and the fully adapted one."""

    def __init__(self, model, reference, ancestor_sampling: bool, N: int, shape, prop, aux: bool, dt, dev):
        if not isinstance(reference, torch.Tensor) or tuple(reference.shape) != tuple(shape):
            found = tuple(reference.shape) if isinstance(reference, torch.Tensor) else type(reference).__name__
            raise ConfigurationError(
                f"reference must be a tensor of shape (num_sequences, num_steps, hidden_dim) = {tuple(shape)}; "
                f"found {found}. Pass one path per sequence (e.g. a draw of a particle smoother).")
        if not bool(torch.isfinite(reference).all()):
            raise ConfigurationError("reference holds NaN or inf entries; expected a finite path (B, T, H).")
        if not (aux or isinstance(prop, Bootstrap)):
            raise ConfigurationError(
                f"conditional SMC (reference=) needs the bootstrap or the fully adapted proposal; found "
                f"{getattr(prop, 'name', type(prop).__name__)!r}. Pass proposal='bootstrap', 'adapted' or 'auto'.")
        if N < 2:
            raise ConfigurationError(f"conditional SMC needs num_particles >= 2; found {N}.")
        self.steps = reference.to(dtype=dt, device=dev).unbind(1)  # (B,H) per step
        self.ancestor_sampling = bool(ancestor_sampling)
        self.last = N - 1
        self.tr_ls = capability(model, "transition_loc_scale")
        self.neg_gumbel = None

    def ancestors(self, model, t: int, idx: torch.Tensor, h_prev: torch.Tensor, log_w: torch.Tensor, u_t,
                  pstep=None):
        """``idx (N,B)`` with the reference's ancestor in the last row; ``log_w (N,B)``: filtering log-weights
        at t-1 (up to a constant per sequence); ``pstep``: the fully adapted proposal's step, whose diagonal
        transition ``(mu, factor)`` at every ``h_prev`` is reused."""
        if not self.ancestor_sampling:
            idx[self.last] = self.last
            return idx
        x = self.steps[t]
        g = None
        if pstep is not None and getattr(pstep, "diagonal", False) and getattr(pstep, "mu", None) is not None:
            g = (pstep.mu, pstep.factor)  # the transition's loc and scale at every h_prev, already computed
        elif self.tr_ls is not None:
            g = self.tr_ls(t, h_prev, u_t)
        if g is None:
            d = model.transition(t, h_prev, u_t)
            g = diag_normal(d)
        if g is None:
            lf = d.log_prob(x.expand_as(h_prev))
        else:  # log N(x; loc, scale) up to a constant
            loc, scale = g
            z = (x - loc).div_(scale).square_().mul_(-0.5).sub_(scale.log())
            lf = z[..., 0] if z.shape[-1] == 1 else z.sum(-1)
        # one categorical draw per sequence by the Gumbel-max trick, argmax_i (log_w_i + lf_i + G_i) with
        # G_i = -log E_i, E_i ~ Exp(1) (drawn for every step at once)
        if self.neg_gumbel is None:
            self.neg_gumbel = torch.empty((len(self.steps),) + tuple(lf.shape), dtype=lf.dtype,
                                          device=lf.device).exponential_().log_()
        idx[self.last] = (log_w + lf).sub_(self.neg_gumbel[t]).argmax(0)
        return idx

    def pin(self, t: int, h: torch.Tensor) -> None:
        h[self.last] = self.steps[t]


def run_particle_filter(
    model,
    data: Data,
    num_particles: int,
    *,
    proposal="bootstrap",
    resampling="systematic",
    ess_threshold: float = 0.5,
    keep_history: bool = False,
    progress: bool = False,
    on_step=None,
    reference: torch.Tensor | None = None,
    ancestor_sampling: bool = True,
) -> ParticleFilterRecord:
    r"""Run the particle filter (see module docstring) on validated ``data``; returns a
    :class:`ParticleFilterRecord`. Uses the global torch RNG (wrap in :func:`ppl_rnn.rng.seeded`).

    The model and data must share dtype and device. Gradients are not tracked.

    ``proposal``: a proposal object (:mod:`~ppl_rnn.inference.proposals`), an
    :class:`~ppl_rnn.inference.proposals.Auto` (resolved by :func:`best_proposal`, choice and reason recorded) or one of the names
    ``"auto"``, ``"bootstrap"``, ``"adapted"``, ``"ekf"``. One loop serves every proposal: a proposal with a
    predictive weight (``predictive``/``sample``, the fully adapted filter) is weighted on
    :math:`\log p(y_t\mid h_{t-1})` *before* resampling and propagating; any other is propagated first and
    weighted after.

    ``on_step(t, particles, log_weights)``, if given, is called after step ``t`` is weighted with
    :math:`h^n_t` ``(N,B,H)`` and the normalised :math:`\ell^n_t` ``(N,B)`` (e.g. to draw from
    :math:`p(h_t\mid y_{0:t})` at every step without keeping the history). Both are buffers the filter
    reuses: copy what you keep. With the bootstrap or fully adapted proposal it runs under
    ``torch.inference_mode()``: tensors it creates are inference tensors (use them in functional operations, e.g. ``torch.stack``, or ``clone()`` them outside the filter
    before an in-place change or an autograd graph).

    ``reference`` ``(B,T,H)``: conditional SMC for particle Gibbs (:class:`_Conditional`): the last particle
    slot is pinned to this path, every step resamples multinomially, and with ``ancestor_sampling`` (default)
    the reference's ancestor is redrawn at every step; keep the history to draw the next path from it.

    Fast paths (same law, fewer operations): the bootstrap proposal draws a transition that is exactly
    ``Normal(loc, scale).to_event(1)`` (or given by the model's ``transition_loc_scale`` shortcut, see
    :mod:`ppl_rnn.model`) as ``loc + scale * eps`` straight into the output buffers; with an emission of that
    form (or ``emission_loc_scale``, and ``observation_log_prob`` not overridden) the log-likelihood of the
    observed entries is computed from ``loc``/``scale`` directly; systematic resampling works from the
    normalised weights; filtered moments are computed in blocks of steps. Every other model/proposal/resampler
    takes the generic path through the distribution objects. The loop runs under
    :func:`ppl_rnn.scope.threads_for` (one torch thread for small particle clouds, the caller's setting
    restored).
    """
    N = check_positive_int(num_particles, "num_particles")
    if not (0.0 <= float(ess_threshold) <= 1.0):
        raise ConfigurationError(f"ess_threshold must be in [0, 1]; found {ess_threshold!r}.")
    prop, reason = _resolve(proposal, model, data)
    resample = get_resampler(resampling)
    resample_w = systematic_from_weights if resample is systematic else None
    prop_name = str(getattr(prop, "name", type(prop).__name__))
    aux = callable(getattr(prop, "predictive", None)) and callable(getattr(prop, "sample", None))
    fills_out = bool(getattr(prop, "fills_out", False))
    fast_obs = type(model).observation_log_prob is StateSpaceModel.observation_log_prob
    em_ls = capability(model, "emission_loc_scale") if fast_obs else None
    y, mask, u = data.observations, data.mask, data.inputs
    B, T, _ = y.shape
    H = model.hidden_dim
    dev, dt = y.device, y.dtype
    if hasattr(prop, "setup"):
        prop.setup(model, data, N)
    step_full = mask.all(-1).all(0).tolist()  # every entry of step t observed in every sequence
    step_any = mask.any(-1).any(0).tolist()
    seq_none = ~mask.any(-1)  # (B,T): sequence b has nothing observed at step t (its increment is exactly 0)
    step_some_none = seq_none.any(0).tolist()
    missing = ~mask
    log_n = math.log(N)
    log_tiny, tiny = exp_clamp_bounds(dt)
    obs_shape = torch.Size((N, B, y.shape[-1]))  # emission log-density terms, one per particle and entry
    thr = float(ess_threshold) * N
    inv_thr = 1.0 / thr if thr > 0 else math.inf  # resample where sum_n w_n^2 > 1 / thr
    cond = None
    if reference is not None:  # conditional SMC (particle Gibbs): multinomial resampling at every step
        cond = _Conditional(model, reference, ancestor_sampling, N, (B, T, H), prop, aux, dt, dev)
        resample, resample_w, inv_thr = multinomial, None, -1.0
    arange_nb = torch.arange(N, device=dev).unsqueeze(1).expand(N, B)
    offsets = torch.arange(B, device=dev)
    never_list = [False] * B
    uniform_lw = torch.full((N, B), -log_n, dtype=dt, device=dev)  # read-only
    uniform_w = torch.full((N, B), 1.0 / N, dtype=dt, device=dev)  # read-only

    # outputs are written in place; filtered moments are computed once per block of K steps (fewer small
    # ops at small N*B; one step at large N*B)
    K = max(1, min(16, _MOMENT_BLOCK_ELEMENTS // max(1, N * B * H)))
    filt_mean = torch.empty((B, T, H), dtype=dt, device=dev)
    filt_var = torch.empty((B, T, H), dtype=dt, device=dev)
    w_block = torch.empty((K, N, B), dtype=dt, device=dev)
    if keep_history:  # preallocated: the peak memory is the history itself
        hist_h = torch.empty((T, N, B, H), dtype=dt, device=dev)
        hist_lw = torch.empty((T, N, B), dtype=dt, device=dev)
        hist_anc = torch.empty((T, N, B), dtype=torch.long, device=dev)
        h_block = None
    else:
        hist_h = hist_lw = hist_anc = None
        # two slots at least: with K = 1, h_t must not overwrite h_{t-1} (a proposal may still read it)
        h_block = torch.empty((max(K, 2), N, B, H), dtype=dt, device=dev)
    lls, sw2s, flags = [], [], []
    h = lw = w = sum_w2 = None
    y_steps = y.unbind(1)
    mask_steps = mask.unbind(1)
    w_slots = w_block.unbind(0)
    hist_slots = hist_h.unbind(0) if keep_history else None
    h_slots = None if keep_history else h_block.unbind(0)
    t0 = 0  # first step of the pending moment block
    scale_seen = log_c = seen_version = None  # the emission scale of the last full step, its log-normaliser
    if resample_w is not None:  # the systematic resampler's buffers
        counts = torch.empty((N + 1, B), dtype=torch.long, device=dev)
        ones = torch.ones((N, B), dtype=torch.long, device=dev)

    def normalise(a, t, out_lw, out_w):
        """``(l_t, lw, w, sum w^2, sum w^2 as a list)`` from unnormalised log-weights ``a (N,B)``: the increment
        logsumexp_n a, normalised log-weights and weights (several sequences: normalised in (B, N) layout, fast
        reductions; exponents clamped at log(tiny): torch's exp is 10-30x slower below it; weights at the clamp, below
        ~1e-38 in float32, set to 0). ``l_t`` is finite exactly where ``sum w^2`` is (the weights are NaN
        otherwise), so one host read of ``sum w^2`` checks the step and decides the next resampling."""
        if B == 1:  # one sequence: the same reductions along the particles, without transposes (2x faster)
            mx = a.amax(0)
            ex = (a - mx).clamp_min_(log_tiny).exp_()
            sx = ex.sum(0)
            l_t = sx.log().add_(mx)
        else:
            at = a.T.contiguous()
            mx = at.amax(1, keepdim=True)
            ex = (at - mx).clamp_min_(log_tiny).exp_()
            sx = ex.sum(1)
            l_t = torch.log(sx).add_(mx.squeeze(1))
        if step_some_none[t] and exact_none:  # log sum_n exp(lw_prev) = 0 exactly, not to rounding
            l_t = l_t.masked_fill_(seq_none[:, t], 0.0)
        ex = torch.nn.functional.threshold_(ex, tiny, 0.0)
        w_t = torch.div(ex if B == 1 else ex.T, sx, out=out_w)
        sw2 = torch.linalg.vecdot(w_t, w_t, dim=0)  # sum w^2 = 1 / ESS
        sw2_list = sw2.tolist()
        if not all(map(math.isfinite, sw2_list)):
            raise _degenerate(a, l_t, t, data)
        lw_t = torch.sub(a, l_t, out=out_lw) if out_lw is not None else a - l_t
        return l_t, lw_t, w_t, sw2, sw2_list

    # a sequence with nothing observed at t keeps its weights (increment exactly 0) with the prior as proposal
    # and with predictive weights; with a guided proposal the weights p/q are not 1 there
    exact_none = True
    steps = range(T)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc=f"particle filter ({prop_name})", leave=False)
    # inference mode (no autograd bookkeeping at all, ~15% less per-op overhead than no_grad) inside the loop
    # only, and only for the built-in proposals that never differentiate (a guided proposal may linearise by
    # autograd): the outputs are buffers allocated above, and what the loop creates is copied out below
    inference = torch.inference_mode() if type(prop) in (Bootstrap, FullyAdapted) else contextlib.nullcontext()
    with fast_context(model), threads_for(N * B * H), inference:
        for t in steps:
            u_t = input_at(u, t)
            y_t = y_steps[t]
            mask_t = mask_steps[t]
            k = t - t0
            k_h = k if K > 1 else t % 2
            slot = hist_slots[t] if keep_history else h_slots[k_h]  # where h_t goes
            # 1. predictive weights (auxiliary proposals): weight the particles at t-1 on log p(y_t | h_{t-1})
            if aux:
                log_pred, pstep = prop.predictive(model, t, h, y_t, mask_t, u_t)  # (P,B)
                if t == 0:  # every particle shares p(h_0): the increment is log p(y_0) exactly
                    l_t, lw, w = log_pred[0].clone(), uniform_lw, uniform_w
                    sum_w2 = uniform_w[0].clone()
                elif step_any[t]:
                    l_t, lw, w, sum_w2, sw2_list = normalise(lw + log_pred, t, None, None)
                else:  # nothing observed anywhere: weights unchanged, increment 0
                    l_t = torch.zeros(B, dtype=dt, device=dev)
                    sum_w2 = torch.linalg.vecdot(w, w, dim=0)
                    sw2_list = sum_w2.tolist()
            # 2. resample (ESS-adaptive) on the current weights
            if t == 0:
                anc, need_list = None, never_list
                lw_prev = uniform_lw
            else:
                need_list = [s > inv_thr for s in sw2_list]  # ESS < thr, on the host (B floats)
                n_need = sum(need_list)
                if n_need:
                    if resample_w is not None:  # systematic, from the weights, into the loop's buffers
                        idx = resample_w(w, N, counts=counts, ones=ones)
                    else:
                        idx = resample(lw, N)
                    if cond is not None:  # the reference's ancestor (filtering weights at t-1)
                        idx = cond.ancestors(model, t, idx, h, lw - log_pred if aux else lw, u_t, pstep if aux else None)
                    if n_need == B:
                        anc, lw_prev, w_prev = idx, uniform_lw, uniform_w
                    else:
                        need = torch.tensor(need_list, device=dev)
                        anc = torch.where(need, idx, arange_nb)
                        lw_prev = torch.where(need, -log_n, lw)
                        w_prev = torch.where(need, 1.0 / N, w) if aux else None
                else:
                    anc, lw_prev, w_prev = None, lw, w
            # 3. propagate (and 4. weight by the likelihood, for non-auxiliary proposals)
            if aux:
                h = prop.sample(pstep, anc, N, out=slot)
                if t > 0:
                    lw, w = lw_prev, w_prev
                if h is not slot:
                    slot.copy_(h)
                    h = slot
                if cond is not None:
                    cond.pin(t, h)
                if keep_history:
                    hist_lw[t] = lw
                w_slots[k].copy_(w)
            else:
                h_prev = None if t == 0 else (h if anc is None else take(h, anc, offsets))
                if fills_out:
                    h, log_q = prop.propose(model, t, h_prev, y_t, mask_t, u_t, out=slot)
                else:
                    h, log_q = prop.propose(model, t, h_prev, y_t, mask_t, u_t)
                if h is not slot:
                    slot.copy_(h)
                    h = slot
                if cond is not None:
                    cond.pin(t, h)
                if not step_any[t]:
                    a = lw_prev
                else:
                    e = None
                    if em_ls is not None:
                        e = em_ls(t, h, u_t)
                    elif fast_obs:
                        e = diag_normal(model.emission(t, h, u_t))
                    if e is None:
                        a = lw_prev + model.observation_log_prob(t, h, y_t, None if step_full[t] else mask_t, u_t)
                    else:  # -log N(y; loc, scale) = 0.5 z^2 + log scale + log(2 pi)/2, over observed entries
                        loc, scale = e
                        if scale.dim() == 3 and scale.stride(0) == 0:  # one scale for all particles (a Normal
                            scale = scale[:1]  # broadcast a float): its log once, not N times
                        z = y_t - loc
                        z = z.div_(scale) if z.shape == obs_shape else z / scale
                        if step_full[t]:  # a = lw_prev - sum_d (log scale_d + log(2 pi)/2) - |z|^2 / 2
                            if scale is not scale_seen or scale.is_inference() or scale._version != seen_version:
                                # (a parameter is the same unchanged tensor at every step: its log once)
                                scale_seen, log_c = scale, scale.log().add_(_HALF_LOG_2PI)
                                seen_version = None if scale.is_inference() else scale._version
                                log_c = log_c[..., 0] if log_c.shape[-1] == 1 else log_c.sum(-1)
                            if z.shape[-1] == 1:
                                z = z[..., 0]
                                a = torch.addcmul(lw_prev - log_c, z, z, value=-0.5)
                            else:
                                a = (lw_prev - log_c).sub_(torch.linalg.vecdot(z, z), alpha=0.5)
                        else:
                            nlp = torch.addcmul(scale.log().add_(_HALF_LOG_2PI), z, z, value=0.5)
                            nlp = nlp.masked_fill_(missing[:, t], 0.0)
                            nlp = nlp[..., 0] if nlp.shape[-1] == 1 else nlp.sum(-1)
                            a = lw_prev - nlp
                exact_none = log_q is None
                if log_q is not None:
                    prior = model.initial_batched(u_t, (B,)) if t == 0 else model.transition(t, h_prev, u_t)
                    a = a + prior.log_prob(h) - log_q
                l_t, lw, w, sum_w2, sw2_list = normalise(a, t, hist_lw[t] if keep_history else None, w_slots[k])
            if on_step is not None:
                on_step(t, h, lw)
            lls.append(l_t)
            sw2s.append(sum_w2)
            flags.append(need_list)
            if keep_history:
                hist_anc[t] = arange_nb if anc is None else anc
            if k == K - 1 or t == T - 1:
                hb = hist_h[t0:t + 1] if keep_history else h_block[k_h - k:k_h + 1]
                _flush_moments(w_block[:k + 1], hb, filt_mean, filt_var, t0)
                t0 = t + 1
    log_lik = torch.stack(lls, 1)
    return ParticleFilterRecord(
        log_evidence=log_lik.sum(1), log_lik=log_lik, ess=torch.stack(sw2s, 1).reciprocal_(),
        resampled=torch.tensor(flags, dtype=torch.bool, device=dev).T.contiguous(),
        filt_mean=filt_mean, filt_var=filt_var, final_particles=h.clone(),
        final_log_weights=lw.clone(),
        particles=hist_h, log_weights=hist_lw, ancestors=hist_anc, proposal=prop_name, proposal_reason=reason,
    )


def weighted_draws(particles: torch.Tensor, log_weights: torch.Tensor, num: int) -> torch.Tensor:
    """``num`` i.i.d. draws ``(num, B, H)`` from the weighted particles ``(N,B,H)``, ``(N,B)``."""
    return take(particles, multinomial(log_weights, num))


def _check_dtype(dtype):
    if dtype not in _DTYPES:
        raise ConfigurationError(f"dtype must be None, torch.float32 or torch.float64; found {dtype!r}.")
    return _DTYPES[dtype]


class ParticleFilter(InferenceMethod):
    """Particle filter: filtering marginals, an unbiased evidence estimate, per-step ESS and resampling flags.

    Args:
        num_particles: particles per sequence.
        proposal: a proposal object (:mod:`ppl_rnn.inference.proposals`): ``Auto()`` (the default: resolved per
            model by :func:`best_proposal` — the fully adapted filter where the declared capabilities give it in
            closed form, the bootstrap filter otherwise), ``Bootstrap()``, ``FullyAdapted()``, ``Guided()`` or any object implementing the
            interface; the names ``"auto"``, ``"bootstrap"``, ``"adapted"``, ``"ekf"`` are accepted as
            conveniences (:func:`~ppl_rnn.inference.proposals.as_proposal`). Stored as the object.
        resampling: ``"systematic"`` | ``"stratified"`` | ``"multinomial"`` | ``"residual"`` or a callable.
        ess_threshold: resample a sequence when its ESS falls below ``ess_threshold * num_particles``
            (1 = every step, 0 = never).
        dtype: compute dtype (None = the model's; float64 on request: the filter casts a copy of the model).
        device: compute device (None = the model's), e.g. ``"cuda"``.
        progress: show a progress bar.

    ``pr.infer`` returns a filtering :class:`~ppl_rnn.results.Posterior` with ``log_evidence`` (B,)
    (``evidence_kind="estimate"``), ``diagnostics["ess"]`` (B,T), ``["resampled"]`` (B,T), ``["log_lik"]``
    (B,T), ``["proposal"]`` (the proposal used, e.g. ``"adapted"``), ``["proposal_reason"]`` (why),
    ``["record"]`` (the :class:`ParticleFilterRecord`) and a ``final_sampler``.
    """

    name = "particle_filter"

    def __init__(self, num_particles: int = 1000, *, proposal="auto", resampling="systematic",
                 ess_threshold: float = 0.5, dtype=None, device=None, progress: bool = False):
        self.num_particles = check_positive_int(num_particles, "num_particles")
        self.proposal = as_proposal(proposal)
        get_resampler(resampling)
        self.resampling = resampling
        if isinstance(ess_threshold, bool) or not isinstance(ess_threshold, (int, float)) or not (
                0.0 <= ess_threshold <= 1.0):
            raise ConfigurationError(f"ess_threshold must be a number in [0, 1]; found {ess_threshold!r}.")
        self.ess_threshold = float(ess_threshold)
        self.dtype = _check_dtype(dtype)
        self.device = device
        self.progress = bool(progress)

    def resized(self, num_particles: int) -> ParticleFilter:
        """A copy of this filter with ``num_particles`` particles (every other option shared; ``self`` is
        unchanged)."""
        new = copy.copy(self)
        new.num_particles = check_positive_int(num_particles, "num_particles")
        return new

    def run(self, model, data: Data, *, keep_history: bool = False, on_step=None):
        """``(model, data, record)``: the filter on validated ``data`` (model and data cast to this filter's
        dtype/device, copies where they differ) with the global RNG; :class:`ParticleFilterRecord`."""
        model, data = _cast(model, data, self.dtype, self.device)
        rec = run_particle_filter(model, data, self.num_particles, proposal=self.proposal,
                                  resampling=self.resampling, ess_threshold=self.ess_threshold,
                                  keep_history=keep_history, progress=self.progress, on_step=on_step)
        return model, data, rec

    def _run(self, model, data, keep_history):
        return self.run(model, data, keep_history=keep_history)

    def _infer(self, model, data, seed):
        with seeded(seed):
            _, _, rec = self.run(model, data, keep_history=False)
        fp, fw = rec.final_particles, rec.final_log_weights
        return Posterior(
            kind="filtering", mean=rec.filt_mean, var=rec.filt_var, log_evidence=rec.log_evidence,
            evidence_kind="estimate", method=self.name,
            diagnostics={"ess": rec.ess, "resampled": rec.resampled, "log_lik": rec.log_lik,
                         "num_particles": self.num_particles, "particles": fp, "log_weights": fw, "record": rec,
                         "proposal": rec.proposal, "proposal_reason": rec.proposal_reason},
            final_sampler=lambda num: weighted_draws(fp, fw, num),
        )


def default_proposal() -> Auto:
    """The particle filter's default proposal, :class:`~ppl_rnn.inference.proposals.Auto` (resolved per model
    by :func:`best_proposal`)."""
    return Auto()


__all__ = ["ParticleFilter", "ParticleFilterRecord", "run_particle_filter", "weighted_draws", "take", "diag_normal",
           "fast_context", "exp_clamp_bounds", "best_proposal", "ProposalChoice", "default_proposal"]
