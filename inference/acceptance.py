r"""The acceptance policy of Monte Carlo EM: which M-steps are kept, and what a refused one means.

One object, :class:`Acceptance`, owns the three mechanisms that judge a step
:math:`\theta_k\to\theta_{k+1}` and the one state they share (:class:`AcceptanceState`: the particle boost
and over-relaxation's :math:`\omega`).

**Standard error.** Each log-evidence estimate :math:`\hat\ell_k` gets a Monte Carlo standard error
:math:`s_k`. With a particle smoother it comes from the E-step filter's own genealogy at no extra filtering
(the Lee & Whiteley 2018 estimator, :mod:`~ppl_rnn.inference.evidence_se`). For an E-step without a genealogy
it comes from ``se_runs`` (:math:`R`) *independent* particle filters with :math:`N/R` particles each, run as
one batched filter on :math:`R` copies of the data: :math:`s_k = \mathrm{sd}_R\sqrt{(N/R)/N}`, since the
variance of :math:`\log\hat Z` falls like :math:`1/N`. An exact E-step (``KalmanSmoother``) has :math:`s_k=0`.
``se_runs=0`` runs no such filters: those E-steps get :math:`s_k=0` and so can never be rejected, which is
allowed only together with ``reject_se=None`` (it would otherwise turn rejection off silently).

**Rejection** (``reject_se``, after the E-step at :math:`\theta_{k+1}`): the step is refused when
:math:`\hat\ell_{k+1} < \hat\ell_k - r\sqrt{s_k^2+s_{k+1}^2}` or the E-step degenerates (the rule of
:class:`~ppl_rnn.inference.em_common.EMLoop`; an exact E-step after an over-relaxed step is refused as soon
as its evidence falls at all).

**Ascent test** (``ascent_z=z``, before :math:`\theta_{k+1}` is accepted; Caffo, Jank & Jones 2005). Fresh paths
:math:`x^{(s)}` at :math:`\theta_k` give :math:`d_s=\log p_{\theta'}(x^{(s)},y)-\log p_{\theta_k}(x^{(s)},y)`; since
:math:`\ell(\theta')-\ell(\theta_k)\ge\Delta Q \approx \bar d`, the step is kept if
:math:`\bar d - z\,\mathrm{sd}(d)/\sqrt S > 0`, else refused. It costs one more E-step per iteration.

**Over-relaxation** (``overrelax`` :math:`=\omega_{\max}`, 1: plain EM). The kept step is stretched,
:math:`\theta_{k+1}=\theta_k+\omega\,(M(\theta_k)-\theta_k)` in the model's unconstrained parametrisation
(Lange 1995; Salakhutdinov & Roweis 2003): near a maximum EM's rate along an eigendirection with missing-information
fraction :math:`\lambda` becomes :math:`1-\omega(1-\lambda)`, so slow directions speed up by :math:`\omega`, and
every direction still contracts for :math:`0<\omega<2`. :math:`\omega` grows by the factor 1.1 per accepted
stretched step up to ``overrelax``.

**A refused step** — by rejection or by the ascent test — has one meaning (:meth:`AcceptanceWork.refuse`):
the parameters return to :math:`\theta_k`; if the refused step was stretched (:math:`\omega>1`) the stretch is
the suspect, so the next step from :math:`\theta_k` is a plain EM step (:math:`\omega=1`, growing again by 1.1
per accepted step) with the *same* particles; otherwise the Monte Carlo sample is the suspect and the particles
and paths of the following E-steps double, up to ``max_boost``. When they cannot double any more the refusal
is final: rejection then stops the run at :math:`\theta_k` (``diagnostics["stopped"] = "rejected"``), the ascent
test keeps :math:`\theta_k` and goes on at the largest sample. Where the two differ is only *when* they judge:
rejection judges :math:`\theta_{k+1}` after its E-step, so the refused row is recorded (``rejected = 1``) and
:math:`\theta_k` is evaluated again as iteration :math:`k`; the ascent test judges before, so the iteration
counts, row :math:`k+1` holds :math:`\theta_k` again and its ``objective`` is NaN (no M-step kept).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ppl_rnn.errors import ConfigurationError
from ppl_rnn.method import check_positive_float, check_positive_int

__all__ = ["Acceptance", "AcceptanceState", "AcceptanceWork"]

_OMEGA_GROWTH = 1.1  # after a fallback to plain EM, omega grows by this factor per accepted step


@dataclasses.dataclass(frozen=True)
class AcceptanceState:
    r"""The acceptance policy's part of a fit's state (in :class:`~ppl_rnn.inference.mcem.MCEMState`).

    boost: the factor on the particles and paths that refusals have raised (1, 2, 4, ... ``max_boost``)
    omega: :math:`\omega` of the next over-relaxed M-step; grow: whether it grows first (not right after a
        fallback to plain EM)
    omega_of, prev_omega_of: the :math:`\omega` that produced the current / the previous parameters
    """

    boost: int = 1
    omega: float = 1.0
    grow: bool = False
    omega_of: float = math.nan
    prev_omega_of: float = math.nan


@dataclasses.dataclass(frozen=True, kw_only=True)
class Acceptance:
    """The acceptance policy (module docstring has the maths and the meaning of a refused step).

    Args:
        reject_se: refuse a step whose log-evidence estimate falls by more than this many standard errors of the
            difference (``None``: never reject).
        max_boost: the largest factor by which refusals may multiply the particles and paths (a power of 2 is
            reached: 1, 2, 4, ...).
        ascent_z: ``None`` (off) or :math:`z \\ge 0` of the ascent test.
        overrelax: :math:`\\omega_{\\max}` in (0, 2) of the over-relaxed step (1: plain EM).
        se_runs: independent filters giving the standard error of an E-step without a filter genealogy
            (``>= 2``; ``0``: none, allowed only with ``reject_se=None``).
    """

    reject_se: float | None = 3.0
    max_boost: int = 8
    ascent_z: float | None = None
    overrelax: float = 1.0
    se_runs: int = 4

    def __post_init__(self):
        if self.reject_se is not None:
            object.__setattr__(self, "reject_se", check_positive_float(self.reject_se, "Acceptance reject_se"))
        object.__setattr__(self, "max_boost", check_positive_int(self.max_boost, "Acceptance max_boost"))
        if self.ascent_z is not None:
            object.__setattr__(self, "ascent_z",
                               check_positive_float(self.ascent_z, "Acceptance ascent_z", allow_zero=True))
        o = self.overrelax
        if isinstance(o, bool) or not isinstance(o, (int, float)) or not (0 < o < 2):
            raise ConfigurationError(
                f"Acceptance overrelax must be a real number in (0, 2) (1: plain EM; 2 and above make exact EM "
                f"diverge along its fast directions); found {o!r}. Use e.g. overrelax=1.8.")
        object.__setattr__(self, "overrelax", float(o))
        s = self.se_runs
        if isinstance(s, bool) or not isinstance(s, int) or s == 1 or s < 0:
            raise ConfigurationError(
                f"Acceptance se_runs must be 0 or an int >= 2 (independent filters whose spread gives the standard "
                f"error); found {s!r}. Use e.g. se_runs=4.")
        if s == 0 and self.reject_se is not None:
            raise ConfigurationError(
                f"Acceptance se_runs=0 gives E-steps without a filter genealogy no standard error, so reject_se="
                f"{self.reject_se!r} could never reject them; pass reject_se=None as well to turn rejection off, "
                "or keep se_runs >= 2.")

    def start(self, saved: AcceptanceState | None = None) -> AcceptanceWork:
        """The policy's mutable working state for a run (``saved``: a resumed fit's :class:`AcceptanceState`)."""
        return AcceptanceWork(self, AcceptanceState(omega=self.overrelax) if saved is None else saved)


class AcceptanceWork:
    """The mutable working copy of an :class:`AcceptanceState` during a run, with the policy's rules."""

    def __init__(self, policy: Acceptance, state: AcceptanceState):
        self.policy = policy
        self.boost, self.omega, self.grow = state.boost, state.omega, state.grow
        self.omega_of, self.prev_omega_of = state.omega_of, state.prev_omega_of

    def freeze(self) -> AcceptanceState:
        return AcceptanceState(boost=self.boost, omega=self.omega, grow=self.grow, omega_of=self.omega_of,
                               prev_omega_of=self.prev_omega_of)

    @property
    def stretching(self) -> bool:
        return self.policy.overrelax != 1.0

    def scalars(self) -> dict:
        """Trace columns of the current row: ``overrelax``, the :math:`\\omega` that produced its parameters."""
        return {"overrelax": self.omega_of} if self.stretching else {}

    def strict(self, evidence_kind: str) -> bool:
        """Whether an exact evidence must not fall at all (after an over-relaxed step; module docstring)."""
        return evidence_kind == "exact" and self.stretching

    def before_mstep(self, model) -> dict | None:
        """The unconstrained parameters before the M-step (what the stretch starts from), or None."""
        if not self.stretching:
            return None
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def stretch(self, model, old: dict | None) -> bool:
        r"""Over-relax the M-step's move in place, :math:`\theta\leftarrow\theta_\text{old}+\omega(\theta-\theta_\text{old})`
        (``old`` from :meth:`before_mstep`); True when it stretched (so :math:`\hat Q` must be recomputed)."""
        if old is None:
            return False
        if self.grow:  # the last stretched step was accepted: omega grows back towards overrelax
            self.omega = min(self.policy.overrelax, self.omega * _OMEGA_GROWTH)
        self.grow, self.prev_omega_of, self.omega_of = True, self.omega_of, self.omega
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in old:
                    p.copy_(old[n] + self.omega * (p - old[n]))
        return True

    def refuse(self) -> bool:
        """A refused step (module docstring): falls back to plain EM if it was stretched, else doubles the
        boost. Returns False when neither is possible (the refusal is final)."""
        stretched = self.omega_of > 1.0
        self.omega_of = self.prev_omega_of  # the parameters are back at theta_k
        if stretched:
            self.omega, self.grow = 1.0, False
            return True
        if self.boost * 2 > self.policy.max_boost:
            return False
        self.boost *= 2
        return True

    def ascent(self, model, before, fresh: torch.Tensor, data) -> tuple[bool, dict]:
        r"""The ascent test on ``fresh`` paths drawn at :math:`\theta_k` (``before``) for the M-step's
        :math:`\theta'` (``model``); on refusal ``model`` is reset to :math:`\theta_k` and :meth:`refuse` applied.
        Returns (kept, trace columns ``ascent_dq``, ``ascent_se``, ``ascent_kept``)."""
        from .complete_data import complete_data_log_likelihood

        with torch.no_grad():
            d = (complete_data_log_likelihood(model, fresh, data).sum(-1)
                 - complete_data_log_likelihood(before, fresh, data).sum(-1)).reshape(-1).to(torch.float64)
        dq = float(d.mean())
        se = float(d.std() / math.sqrt(d.numel())) if d.numel() > 1 else math.inf
        ok = dq - self.policy.ascent_z * se > 0
        if not ok:
            model.load_state_dict(before.state_dict())
            self.refuse()  # a final refusal keeps theta_k and goes on at the largest sample
        return ok, {"ascent_dq": dq, "ascent_se": se, "ascent_kept": int(ok)}
