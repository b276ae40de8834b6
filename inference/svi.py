r"""Stochastic variational inference on the model's own Pyro program.

The model is :meth:`ppl_rnn.StateSpaceModel.forward` (sites ``h_t``, ``y_t``; missing entries masked);
a guide :math:`q_\phi(h_{0:T-1}\mid y)` from :mod:`ppl_rnn.inference.guides` samples the ``h_t``. The
objectives, per sequence and summed over sequences, are

* ``elbo="trace"`` (``pyro.infer.Trace_ELBO``):
  :math:`\mathcal L = E_q[\log p_\theta(h,y) - \log q_\phi(h)] \le \log p_\theta(y)`, estimated with
  ``num_particles`` reparameterised draws;
* ``elbo="meanfield"`` (``pyro.infer.TraceMeanField_ELBO``): the same bound with analytic
  :math:`\mathrm{KL}(q(h_t\mid\cdot)\,\|\,p(h_t\mid h_{t-1}))` terms where available (guides that sample in
  model order only);
* ``elbo="iwae"``: the importance-weighted bound
  :math:`\mathcal L_K = E\big[\log \tfrac1K\sum_k p_\theta(h^k,y)/q_\phi(h^k)\big]`, per sequence
  (:math:`\mathcal L \le \mathcal L_K \le \log p_\theta(y)`), with ``K = num_particles``.

``kl_annealing=n`` multiplies the latent terms :math:`\log p(h)-\log q(h)` by
:math:`\beta_s=\min(1, (s+1)/n)` at step :math:`s` (warm-up; the reported objective at :math:`\beta<1` is
then not a bound).

``pr.fit`` optimises the model's parameters :math:`\theta` and the guide's :math:`\phi` jointly
(``evidence_kind="lower_bound"``). Row :math:`k` of ``FitResult.trace`` holds the ELBO estimate of step
:math:`k` (``objective``) beside the parameters :math:`\theta_k` it was computed at, i.e. before step
:math:`k` moved them; the returned model has :math:`\theta_K` after the last step (its bound is the
posterior's ``log_evidence``).
``pr.infer`` keeps the model fixed and fits :math:`\phi` only; the smoothing ``Posterior`` has means and
variances from ``num_posterior_samples`` guide draws, ``log_evidence`` = the ELBO estimated with
``num_eval_particles`` draws (``diagnostics["elbo_se"]`` its standard error, ``diagnostics["iwae"]`` the
importance-weighted bound from the same draws), and ``sample`` draws from the guide.

Parameters live on the modules (``pyro.settings`` ``module_local_params``); the optimiser is a
``torch.optim`` optimiser over ``model.parameters()`` and ``guide.parameters()`` stepping
``elbo.differentiable_loss``, so nothing enters Pyro's global param store. The loss is divided by the
number of observed entries before the gradient step (the reported ELBO is not).

``program`` chooses how :math:`\log p_\theta(h,y)` is scored for the guide's draws:
``"pyro"`` replays the guide's draws through the model's Pyro program (``Trace_ELBO`` /
``TraceMeanField_ELBO`` / a vectorised IWAE over ``poutine`` traces); ``"conditionals"`` scores them with
the model's three conditionals directly
(:func:`~ppl_rnn.inference.complete_data.complete_data_log_likelihood`), the same density by the model
contract (``forward`` is composed from those conditionals) without Pyro's per-site messaging, which is
2-3x faster; ``"auto"`` (default) uses ``"conditionals"`` unless the model overrides ``forward`` (extra
sites, priors on weights) or ``elbo="meanfield"``. Both give identical values (tested).

One optimisation step costs :math:`O(T)` (forwards and backwards: the guides and the complete-data score take
per-step tensors by one ``unbind``, never a slice per step) and runs single-threaded on small problems
(:func:`ppl_rnn.scope.threads_for`).
"""

from __future__ import annotations

import copy
import math
import time

import pyro
import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from pyro.poutine.messenger import Messenger
from tqdm.auto import tqdm

from ppl_rnn.errors import ConfigurationError, DivergenceError
from ppl_rnn.method import InferenceMethod, check_choice, check_positive_float, check_positive_int
from ppl_rnn.model import StateSpaceModel
from ppl_rnn.results import FitResult, Posterior
from ppl_rnn.rng import seeded
from ppl_rnn.scope import threads_for

from .complete_data import cached_params, complete_data_log_likelihood
from .em_common import TraceRecorder
from .guides import AmortizedGuide, EKFGuide, MarkovGaussianGuide, MeanFieldGuide, StateGuide

GUIDES = {"mean_field": MeanFieldGuide, "markov_gaussian": MarkovGaussianGuide, "amortized": AmortizedGuide,
          "ekf": EKFGuide}
_OPTIMIZERS = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD, "rmsprop": torch.optim.RMSprop,
               "adagrad": torch.optim.Adagrad}


class _ScaleLatents(Messenger):
    """Multiply the log-density of every latent (unobserved) sample site by ``beta`` (KL annealing)."""

    def __init__(self, beta: float):
        super().__init__()
        self.beta = beta

    def _process_message(self, msg):
        if msg["type"] == "sample" and not msg["is_observed"]:
            msg["scale"] = self.beta * msg["scale"]


def log_weights(model, guide, args, kwargs, num: int, num_sequences: int):
    r"""Vectorised importance log-weights :math:`\log p(h^k,y)-\log q(h^k)` of ``num`` guide draws.

    Returns ``(local (num, B), global (num, 1))``: terms of sites inside the ``sequences`` plate per
    sequence, and terms of any site outside it. Each site's ``scale`` (e.g. KL annealing) and ``mask``
    (``poutine.mask``, ``obs_mask``) apply, as in Pyro's ELBOs: a masked-out element adds nothing. A latent
    site of the model that the guide does not sample (e.g. the ``_unobserved`` half of an ``obs_mask`` site) is
    drawn from its prior in the model, so its density is also its proposal density: the two cancel and it
    adds nothing either.
    """
    B = num_sequences
    with pyro.plate("_particles", num, dim=-2):
        gtr = poutine.trace(guide).get_trace(*args, **kwargs)
        mtr = poutine.trace(poutine.replay(model, trace=gtr)).get_trace(*args, **kwargs)
    ref = None
    local, glob = 0.0, 0.0
    for tr, sign in ((mtr, 1.0), (gtr, -1.0)):
        for name, site in tr.nodes.items():
            if site["type"] != "sample" or (sign < 0 and site["is_observed"]):
                continue
            if sign > 0 and not site["is_observed"] and name not in gtr.nodes:
                continue  # sampled from its prior in the model: p / q = 1
            lp = _site_log_prob(site) * sign
            ref = lp if ref is None else ref
            if lp.dim() >= 1 and lp.shape[-1] == B and lp.numel() in (B, num * B):
                local = local + lp.reshape(-1, B)
            elif lp.numel() in (1, num):  # a site outside the sequences plate (e.g. a global weight)
                glob = glob + lp.reshape(-1, 1)
            else:
                glob = glob + lp.sum()
    dt = ref.dtype if ref is not None else torch.get_default_dtype()
    local = torch.as_tensor(local, dtype=dt).expand(num, B)
    glob = torch.as_tensor(glob, dtype=dt).reshape(-1, 1).expand(num, 1)
    return local, glob


def _site_log_prob(site) -> torch.Tensor:
    """``log_prob`` of a trace site with its ``scale`` and ``mask`` applied (masked-out elements: 0)."""
    return scale_and_mask(site["fn"].log_prob(site["value"]), site["scale"], site["mask"])


def _iwae(local, glob):
    K = local.shape[0]
    if bool((glob != 0).any()):
        return torch.logsumexp(local.sum(-1) + glob[:, 0], 0) - math.log(K)
    return (torch.logsumexp(local, 0) - math.log(K)).sum()


def conditional_log_weights(model, guide, data, args, kwargs, num: int, beta: float = 1.0) -> torch.Tensor:
    r"""``(num, B)`` log-weights :math:`\log p(y\mid h)+\beta(\log p(h)-\log q(h))` of ``num`` guide draws,
    scored with the model's conditionals (``program="conditionals"``)."""
    B, T = data.num_sequences, data.num_steps
    with pyro.plate("_particles", num, dim=-2):
        gtr = poutine.trace(guide).get_trace(*args, **kwargs)
    H = model.hidden_dim
    hs = torch.stack([gtr.nodes[f"h_{t}"]["value"].expand(num, B, H) for t in range(T)], 2)
    lq = 0.0
    for site in gtr.nodes.values():
        if site["type"] == "sample" and not site["is_observed"]:
            lq = lq + _site_log_prob(site)
    lh, ly = complete_data_log_likelihood(model, hs, data, split=True)
    return ly + beta * (lh - lq)


class SVI(InferenceMethod):
    """Stochastic variational inference (see module docstring).

    Args:
        guide: ``"mean_field"``, ``"markov_gaussian"`` (default), ``"amortized"``, ``"ekf"``, or a guide object from
            :mod:`ppl_rnn.inference.guides` (copied for every run; the trained copy is returned in
            ``diagnostics["guide"]``).
        num_steps: optimisation steps (0: evaluate the guide as initialised, e.g. ``"ekf"`` or ``init="eks"``).
        optimizer: ``"adam"``, ``"sgd"``, ``"rmsprop"`` or ``"adagrad"`` (``torch.optim``).
        lr: learning rate.
        lr_decay: total factor by which the learning rate decays (exponentially) over ``num_steps`` (1 = constant);
            Adam's steps near the optimum are ~``lr`` in size whatever the gradient, so decay matters for tight bounds.
        elbo: ``"trace"``, ``"meanfield"`` or ``"iwae"``.
        num_particles: draws per step (vectorised).
        kl_annealing: None, or the number of warm-up steps over which the latent terms' weight rises to 1.
        num_eval_particles: draws for the final ELBO estimate (``Posterior.log_evidence``).
        num_posterior_samples: guide draws for the posterior means and variances.
        clip_norm: optional gradient-norm clipping.
        program: ``"auto"``, ``"pyro"`` or ``"conditionals"`` (how the model is scored; see module docstring).
        progress: show a progress bar.
    """

    name = "svi"
    smooths = True

    def __init__(self, *, guide="markov_gaussian", num_steps: int = 1000, optimizer: str = "adam", lr: float = 0.01, lr_decay: float = 1.0,
                 elbo: str = "trace", num_particles: int = 1, kl_annealing: int | None = None,
                 num_eval_particles: int = 64, num_posterior_samples: int = 200, clip_norm: float | None = None,
                 program: str = "auto", progress: bool = False):
        if isinstance(guide, str):
            check_choice(guide, "guide", GUIDES)
        elif not isinstance(guide, StateGuide):
            raise ConfigurationError(
                f"guide must be one of {sorted(GUIDES)} or a guide object from ppl_rnn.inference.guides; found {guide!r}."
            )
        self.guide = guide
        self.num_steps = check_positive_int(num_steps, "num_steps", minimum=0)
        self.optimizer = check_choice(optimizer, "optimizer", _OPTIMIZERS)
        self.lr = check_positive_float(lr, "lr")
        self.lr_decay = check_positive_float(lr_decay, "lr_decay")
        self.elbo = check_choice(elbo, "elbo", ("trace", "meanfield", "iwae"))
        self.num_particles = check_positive_int(num_particles, "num_particles")
        self.kl_annealing = None if kl_annealing is None else check_positive_int(kl_annealing, "kl_annealing")
        self.num_eval_particles = check_positive_int(num_eval_particles, "num_eval_particles")
        self.num_posterior_samples = check_positive_int(num_posterior_samples, "num_posterior_samples")
        self.clip_norm = None if clip_norm is None else check_positive_float(clip_norm, "clip_norm")
        self.program = check_choice(program, "program", ("auto", "pyro", "conditionals"))
        if self.program == "conditionals" and self.elbo == "meanfield":
            raise ConfigurationError("elbo='meanfield' runs Pyro's TraceMeanField_ELBO; use program='pyro' or 'auto'.")
        self.progress = bool(progress)
        if self.elbo == "meanfield" and self._guide_order() == "backward":
            raise ConfigurationError(
                "elbo='meanfield' needs a guide that samples h_t in model order (its analytic KL terms condition on "
                "h_{t-1}); EKFGuide samples backwards in time. Use elbo='trace' or 'iwae' with EKFGuide."
            )

    def _guide_order(self):
        g = GUIDES[self.guide] if isinstance(self.guide, str) else self.guide
        return g.sample_order

    def _new_guide(self) -> StateGuide:
        return GUIDES[self.guide]() if isinstance(self.guide, str) else copy.deepcopy(self.guide)

    # ---- the optimisation loop -----------------------------------------------------------------
    def _run(self, model, data, seed, train_model: bool):
        t0 = time.perf_counter()
        guide = self._new_guide()
        guide.setup(model, data)
        args = (data.with_nan(),)
        kwargs = {"inputs": data.inputs}
        B = data.num_sequences
        n_obs = max(data.num_observed, 1)
        K = self.num_particles
        if self.elbo != "iwae":
            cls = Trace_ELBO if self.elbo == "trace" else TraceMeanField_ELBO
            elbo = cls(num_particles=K, vectorize_particles=K > 1, max_plate_nesting=1)
        params = list(guide.parameters()) + (list(model.parameters()) if train_model else [])
        params = [p for p in params if p.requires_grad]
        rec = TraceRecorder()
        step = 0

        direct = self.program == "conditionals" or (
            self.program == "auto" and self.elbo != "meanfield" and type(model).forward is StateSpaceModel.forward)

        def loss_fn(beta):
            if direct:
                with cached_params(model, guide):
                    lw = conditional_log_weights(model, guide, data, args, kwargs, K, beta)
                if self.elbo == "iwae":
                    return -(torch.logsumexp(lw, 0) - math.log(K)).sum()
                return -lw.mean(0).sum()
            m, g = (model, guide) if beta == 1.0 else (_ScaleLatents(beta)(model), _ScaleLatents(beta)(guide))
            if self.elbo == "iwae":
                return -_iwae(*log_weights(m, g, args, kwargs, K, B))
            return elbo.differentiable_loss(m, g, *args, **kwargs)

        def result_so_far(conv=False):
            return self._result(model, guide, data, rec, t0, conv, args, kwargs)

        # the guides and the model's conditionals run per time step on (K, B, H)-sized tensors: one thread is
        # faster for small problems (ppl_rnn.scope.threads_for)
        work = K * B * max(model.hidden_dim, model.obs_dim) ** 2
        with seeded(seed), pyro.validation_enabled(False), threads_for(work):
            if params and self.num_steps > 0:
                opt = _OPTIMIZERS[self.optimizer](params, lr=self.lr)
                gamma = self.lr_decay ** (1.0 / max(self.num_steps, 1))
                sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma)
                for step in tqdm(range(self.num_steps), disable=not self.progress, desc="SVI"):
                    beta = 1.0 if self.kl_annealing is None else min(1.0, (step + 1) / self.kl_annealing)
                    opt.zero_grad()
                    loss = loss_fn(beta)
                    (loss / n_obs).backward()
                    loss = loss.detach()
                    bad = not math.isfinite(float(loss)) or any(
                        p.grad is not None and not bool(torch.isfinite(p.grad).all()) for p in params)
                    if bad:
                        raise DivergenceError(
                            f"SVI diverged at step {step}: non-finite ELBO ({float(loss)}) or gradient. The last finite "
                            "parameters are in the exception's .last_good FitResult. Fixes: lower lr, set clip_norm, "
                            "use more num_particles, or kl_annealing.",
                            iteration=step, last_good=result_so_far(),
                        )
                    # row k: the parameters theta_k at which this step's ELBO estimate was computed (before the step)
                    if train_model:
                        rec.record(model, objective=-float(loss), log_evidence=-float(loss), beta=beta)
                    else:
                        rec.scalars.setdefault("objective", []).append(-float(loss))
                        rec.n += 1
                    if self.clip_norm is not None:
                        torch.nn.utils.clip_grad_norm_(params, self.clip_norm)
                    opt.step()
                    sched.step()
            return result_so_far(conv=True), guide

    def _result(self, model, guide, data, rec, t0, converged, args, kwargs):
        post = self._posterior(model, guide, data, args, kwargs, rec)
        return FitResult(model=model, trace=rec.dataset(attrs={"evidence_kind": "lower_bound", "method": self.name}),
                         posterior=post, wall_time_s=time.perf_counter() - t0, converged=converged, method=self.name,
                         evidence_kind="lower_bound", diagnostics={"guide": guide})

    def _posterior(self, model, guide, data, args, kwargs, rec) -> Posterior:
        B = data.num_sequences
        K = self.num_eval_particles
        with torch.no_grad():
            local, glob = log_weights(model, guide, args, kwargs, K, B)
            lw = local + glob / B
            elbo = lw.mean(0)
            se = lw.std(0) / math.sqrt(K) if K > 1 else torch.full_like(elbo, float("nan"))
            iwae = torch.logsumexp(lw, 0) - math.log(K)
            draws = _sample_guide(guide, args, kwargs, self.num_posterior_samples)

        def sampler(num):
            with torch.no_grad():
                return _sample_guide(guide, args, kwargs, num)

        trace = torch.as_tensor(rec.column("objective"))
        return Posterior(
            kind="smoothing", mean=draws.mean(0), var=draws.var(0), log_evidence=elbo, evidence_kind="lower_bound",
            method=f"svi[{type(guide).__name__}]",
            diagnostics={"elbo_se": se, "iwae": iwae, "elbo_trace": trace, "guide": guide},
            sampler=sampler,
        )

    def _infer(self, model, data, seed):
        model = model.copy()
        for p in model.parameters():
            p.requires_grad_(False)
        res, _ = self._run(model, data, seed, train_model=False)
        return res.posterior

    def _fit(self, model, data, seed):
        res, _ = self._run(model, data, seed, train_model=True)
        return res


def _sample_guide(guide, args, kwargs, num: int) -> torch.Tensor:
    """``(num, B, T, H)`` joint draws from the guide (vectorised)."""
    with pyro.plate("_draws", num, dim=-2):
        hs = guide(*args, **kwargs)
    B, T = args[0].shape[0], args[0].shape[1]
    return hs.expand(num, B, T, hs.shape[-1])


__all__ = ["SVI", "GUIDES", "log_weights"]
