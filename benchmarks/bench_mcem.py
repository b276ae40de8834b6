"""Benchmark: one Monte Carlo EM iteration at defaults vs one default particle-filter pass (same model, data and
number of particles), measured in the same run.

Issue 26 asks that one MCEM iteration costs at most 2x one particle-filter pass (laser-sized problem: hidden 8,
T = 1000, N = 500 particles, 100 paths). One iteration = one M-step (``ElmanSSM``'s closed-form blocks with
Levenberg-Marquardt steps for the tanh weights) + one E-step (particle smoother: forward filter with history +
backward pass) + the standard error of its log-evidence. The iteration is timed inside a real ``pr.fit``: the
difference between consecutive rows of the trace's ``wall_time_s`` (the best of the ``--iterations``
differences of ``--repeats`` fits, interleaved with particle-filter passes; the ratio uses the best of each), so
everything the loop does is counted. The parts are timed alone, and the standard error both
ways: from the E-step's own genealogy (the default since issue 26) and from the four extra filters of
``N / 4`` particles it replaced (``se_runs``), so the printout shows the before/after of that change.
``--rounds R`` repeats the whole comparison (PF pass and fit back to back) and prints the median ratio, so a
loaded machine moves both sides of each ratio alike.

``--local-level`` (issue 26's second figure): a 1-D local-level *user* model (``q``, ``r`` positive
``PyroParam`` s, no capability declared, so the gradient M-step) on 100 steps, fitted by
``pr.fit(model, y, method=MonteCarloEM())`` at defaults from ``q = r = 1``; printed: the wall time of the fit
(in this process, after a first warm-up fit so one-off imports are not counted, and that first fit's time too)
and the gap to the exact maximum likelihood (the library's Kalman filter on the same linear-Gaussian model,
maximised by scipy). Target: gap <= 0.01 nats in <= 10 s. ``--variants`` adds the same fit with the M-step
before issue 26 (10 Adam steps), with a particle schedule growing to 4000 particles and 200 paths, and with
SAEM averaging.

    python benchmarks/bench_mcem.py [--repeats 3] [--rounds 3] [--threads 1] [--backward mcmc simulation]
                                    [--local-level [--data-seeds 0 1 2] [--variants]] [--no-laser]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time

import numpy as np
import pyro.distributions as dist
import torch
from ppl_rnn.inference import ParticleFilter, ParticleSmoother
from ppl_rnn.inference.em_common import ConvergenceRule
from ppl_rnn.inference.evidence_se import genealogy_log_evidence_var
from ppl_rnn.inference.kalman import kalman_filter
from ppl_rnn.inference.mcem import SAEM, MonteCarloEM, ParticleSchedule
from ppl_rnn.inference.msteps import GradientMStep
from ppl_rnn.models import ElmanSSM
from pyro.distributions import constraints
from pyro.nn import PyroParam

import ppl_rnn as pr
from ppl_rnn import StateSpaceModel
from ppl_rnn.data import prepare
from ppl_rnn.model import LinearGaussianParams


def best_of(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--particles", type=int, default=500)
    ap.add_argument("--paths", type=int, default=100)
    ap.add_argument("--hidden", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=1, help="repeat the PF-vs-iteration comparison; median ratio")
    ap.add_argument("--iterations", type=int, default=4, help="MCEM iterations of the timed fit")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--backward", nargs="+", default=["mcmc"], choices=["simulation", "mcmc"],
                    help="smoother backward pass(es) to time (default: mcmc, MonteCarloEM's default)")
    ap.add_argument("--no-laser", action="store_true", help="skip the laser-sized iteration timing")
    ap.add_argument("--local-level", action="store_true", help="fit the 1-D local-level user model (see docstring)")
    ap.add_argument("--data-seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--variants", action="store_true",
                    help="also the local-level fit with the old Adam M-step, a growing schedule and SAEM(0.7)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    if not a.no_laser:
        true = ElmanSSM(a.hidden, 1, process_noise=0.2, obs_noise=0.2, weight_scale=1.2, seed=1)
        y = true.simulate(a.steps, 1, seed=0).observations
        model = ElmanSSM(a.hidden, 1, seed=2)
        pf = ParticleFilter(num_particles=a.particles)
        ratios = {b: [] for b in a.backward}
        for r in range(a.rounds):
            pf_t = best_of(lambda: pr.infer(model, y, method=pf, seed=0), a.repeats)
            print(f"round {r + 1}/{a.rounds}: T={a.steps} N={a.particles} paths={a.paths} hidden={a.hidden} "
                  f"threads={a.threads} (best of {a.repeats})")
            print(f"default particle filter pass ({model.dtype})        : {pf_t:8.3f} s")
            m64 = model.copy().to(torch.float64)
            pf64_t = best_of(lambda m64=m64: pr.infer(m64, y.to(torch.float64), method=pf, seed=0), a.repeats)
            print(f"the same pass in float64 (MCEM's working dtype)     : {pf64_t:8.3f} s  ({pf64_t / pf_t:.2f}x)")
            for backward in a.backward:
                ratios[backward].append(time_backward(backward, model, y, pf_t, a))
        for backward, rs in ratios.items():
            med = float(np.median(rs))
            print(f"[{backward:>10}] MCEM iteration / PF pass, median of {len(rs)} rounds: {med:.2f}x "
                  f"(rounds: {', '.join(f'{x:.2f}' for x in rs)})  target <= 2x: {'PASS' if med <= 2 else 'FAIL'}")
    if a.local_level:
        local_level(a)


def time_backward(backward, model, y, pf_t, a):
    """Time one MCEM iteration (in ``pr.fit``) and its parts with the ``backward`` smoother; print them."""
    sm = ParticleSmoother(num_particles=a.particles, num_paths=a.paths, backward=backward)
    mcem = MonteCarloEM(smoother=sm, num_iterations=a.iterations, stopping=ConvergenceRule(tol=0))  # else defaults
    lm_steps = mcem.mstep.resolve(model).transition_steps  # the closed-form M-step's Levenberg-Marquardt steps
    pf = ParticleFilter(num_particles=a.particles)
    its, pfs = [], [pf_t]
    for _ in range(a.repeats):  # fits and PF passes interleaved: a change of load moves both sides alike
        fit = pr.fit(model, y, method=mcem, seed=0)
        its.append(float(np.min(np.diff(fit.trace.wall_time_s.values))))
        pfs.append(best_of(lambda: pr.infer(model, y, method=pf, seed=0), 1))
    it_t, pf_t = min(its), min(pfs)
    print(f"[{backward:>10}] PF pass, best of the interleaved  : {pf_t:8.3f} s")
    w64 = model.copy().to(torch.float64)
    d64 = prepare(w64, y.to(torch.float64))
    post, paths, _ = mcem._estep(w64, d64, a.particles, a.paths)
    e_t = best_of(lambda: mcem._estep(w64, d64, a.particles, a.paths), a.repeats)
    rec = post.diagnostics["record"]
    gen_t = best_of(lambda: genealogy_log_evidence_var(rec), a.repeats)
    bare = dataclasses.replace(post, diagnostics={})  # no genealogy: the four extra filters
    flt_t = best_of(lambda: mcem._evidence_se(w64, d64, bare, a.particles), a.repeats)
    m_t = best_of(lambda: w64.copy().closed_form_mstep(paths, d64.observations, d64.mask, d64.inputs,
                                                       transition_steps=lm_steps), a.repeats)
    before = it_t - gen_t + flt_t
    print(f"[{backward:>10}] E-step (smoother, float64)      : {e_t:8.3f} s  ({e_t / pf_t:.2f}x PF)")
    print(f"[{backward:>10}] M-step (closed form, {lm_steps} LM steps): {m_t:8.3f} s  ({m_t / pf_t:.2f}x PF)")
    print(f"[{backward:>10}] SE from the genealogy           : {gen_t:8.3f} s  ({gen_t / pf_t:.2f}x PF)")
    print(f"[{backward:>10}] SE from 4 filters of N/4 (old)  : {flt_t:8.3f} s  ({flt_t / pf_t:.2f}x PF)")
    print(f"[{backward:>10}] MCEM iteration in pr.fit        : {it_t:8.3f} s  ({it_t / pf_t:.2f}x PF)  target <= 2x: "
          f"{'PASS' if it_t <= 2 * pf_t else 'FAIL'}")
    print(f"[{backward:>10}]   with the old SE (derived)     : {before:8.3f} s  ({before / pf_t:.2f}x PF)")
    return it_t / pf_t


class LocalLevel(StateSpaceModel):
    """A user's 1-D local-level model: three conditionals, two positive parameters, no capability."""

    def __init__(self, q: float = 1.0, r: float = 1.0):
        super().__init__(1, 1)
        self.q = PyroParam(torch.tensor([q]), constraint=constraints.positive)
        self.r = PyroParam(torch.tensor([r]), constraint=constraints.positive)

    def initial(self, u0):
        return dist.Normal(torch.zeros(1), 10.0).to_event(1)

    def transition(self, t, h_prev, u_t):
        return dist.Normal(h_prev, self.q).to_event(1)

    def emission(self, t, h, u_t):
        return dist.Normal(h, self.r).to_event(1)


def _exact_log_lik(y: torch.Tensor, q: float, r: float) -> float:
    """The local-level model's exact log-likelihood: the library's Kalman filter on the same linear-Gaussian model."""
    one = torch.ones(1, 1, dtype=torch.float64)
    p = LinearGaussianParams(A=one, b=torch.zeros(1, dtype=torch.float64), Q=q * q * one, C=one,
                             d=torch.zeros(1, dtype=torch.float64), R=r * r * one,
                             m0=torch.zeros(1, dtype=torch.float64), P0=100.0 * one)
    return float(kalman_filter(p, y, torch.ones_like(y, dtype=torch.bool)).log_evidence.sum())


def local_level(a):
    """Fit the local-level user model at MonteCarloEM's defaults; print the time and the gap to the exact MLE."""
    from scipy.optimize import minimize

    torch.set_default_dtype(torch.float64)
    variants = {"MonteCarloEM()": lambda: MonteCarloEM()}
    if a.variants:
        variants["10 Adam steps (the M-step before)"] = lambda: MonteCarloEM(mstep=GradientMStep(optimizer="adam"))
        variants["particles 500->4000, paths 100->200"] = lambda: MonteCarloEM(
            schedule=ParticleSchedule(particles=(500, 4000), paths=(100, 200)))
        variants["SAEM(0.7)"] = lambda: MonteCarloEM(averaging=SAEM(0.7))
    warm = LocalLevel(q=0.5, r=1.0).simulate(100, 1, seed=99).observations
    t0 = time.perf_counter()
    pr.fit(LocalLevel(), warm, method=MonteCarloEM(num_iterations=2), seed=0)
    print(f"local level: warm-up fit (2 iterations, one-off imports): {time.perf_counter() - t0:.2f} s")
    for ds in a.data_seeds:
        y = LocalLevel(q=0.5, r=1.0).simulate(100, 1, seed=ds).observations.to(torch.float64)
        f = lambda x, y=y: -_exact_log_lik(y, math.exp(x[0]), math.exp(x[1]))  # noqa: E731
        best = min((minimize(f, x0, method="Nelder-Mead", options={"xatol": 1e-9, "fatol": 1e-11})
                    for x0 in ([0.0, 0.0], [-2.0, 0.0])), key=lambda r: r.fun)
        ll_max = -best.fun
        for name, make in variants.items():
            t0 = time.perf_counter()
            fit = pr.fit(LocalLevel(), y, method=make(), seed=0)
            wall = time.perf_counter() - t0
            q, r = float(fit.model.q.detach()), float(fit.model.r.detach())
            gap = ll_max - _exact_log_lik(y, q, r)
            print(f"local level, data seed {ds}, {name}: {wall:6.2f} s, {fit.trace.sizes['iteration'] - 1} "
                  f"iterations, gap to the exact MLE {gap:.4f} nats (q={q:.4f} r={r:.4f}; MLE "
                  f"q={math.exp(best.x[0]):.4f} r={math.exp(best.x[1]):.4f})  target <= 0.01 nats in <= 10 s: "
                  f"{'PASS' if gap <= 0.01 and wall <= 10 else 'FAIL'}")
    torch.set_default_dtype(torch.float32)

if __name__ == "__main__":
    main()
