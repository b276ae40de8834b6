"""Benchmark: one Monte Carlo EM iteration at defaults vs one default particle-filter pass (same model, data and
number of particles), measured in the same run.

Issue 26 asks that one MCEM iteration costs at most 2x one particle-filter pass (laser-sized problem: hidden 8,
T = 1000, N = 500 particles, 100 paths). One iteration = one M-step (``ElmanSSM``'s closed-form blocks with
Levenberg-Marquardt steps for the tanh weights) + one E-step (particle smoother: forward filter with history +
backward pass) + the standard error of its log-evidence. The iteration is timed inside a real ``pr.fit``: the
difference between consecutive rows of the trace's ``wall_time_s`` (the best of the ``--iterations``
differences), so everything the loop does is counted. The parts are timed alone, and the standard error both
ways: from the E-step's own genealogy (the default since issue 26) and from the four extra filters of
``N / 4`` particles it replaced (``se_runs``), so the printout shows the before/after of that change.

    python benchmarks/bench_mcem.py [--repeats 3] [--threads 1] [--backward mcmc simulation]
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
import torch
from ppl_rnn.inference import ParticleFilter, ParticleSmoother
from ppl_rnn.inference.evidence_se import genealogy_log_evidence_var
from ppl_rnn.inference.mcem import MonteCarloEM
from ppl_rnn.models import ElmanSSM

import ppl_rnn as pr
from ppl_rnn.data import prepare


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
    ap.add_argument("--iterations", type=int, default=4, help="MCEM iterations of the timed fit")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--backward", nargs="+", default=["mcmc"], choices=["simulation", "mcmc"],
                    help="smoother backward pass(es) to time (default: mcmc, MonteCarloEM's default)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    true = ElmanSSM(a.hidden, 1, process_noise=0.2, obs_noise=0.2, weight_scale=1.2, seed=1)
    y = true.simulate(a.steps, 1, seed=0).observations
    model = ElmanSSM(a.hidden, 1, seed=2)
    pf = ParticleFilter(num_particles=a.particles)
    pf_t = best_of(lambda: pr.infer(model, y, method=pf, seed=0), a.repeats)
    print(f"T={a.steps} N={a.particles} paths={a.paths} hidden={a.hidden} threads={a.threads} (best of {a.repeats})")
    print(f"default particle filter pass ({model.dtype})        : {pf_t:8.3f} s")
    m64 = model.copy().to(torch.float64)
    pf64_t = best_of(lambda: pr.infer(m64, y.to(torch.float64), method=pf, seed=0), a.repeats)
    print(f"the same pass in float64 (MCEM's working dtype)     : {pf64_t:8.3f} s  ({pf64_t / pf_t:.2f}x)")
    for backward in a.backward:
        time_backward(backward, model, y, pf_t, a)


def time_backward(backward, model, y, pf_t, a):
    """Time one MCEM iteration (in ``pr.fit``) and its parts with the ``backward`` smoother; print them."""
    sm = ParticleSmoother(num_particles=a.particles, num_paths=a.paths, backward=backward)
    mcem = MonteCarloEM(smoother=sm, num_iterations=a.iterations, tol=0)  # otherwise the defaults
    fit = pr.fit(model, y, method=mcem, seed=0)
    it_t = float(np.min(np.diff(fit.trace.wall_time_s.values)))
    w64 = model.copy().to(torch.float64)
    d64 = prepare(w64, y.to(torch.float64))
    post, paths, _ = mcem._estep(w64, d64, a.particles, a.paths)
    e_t = best_of(lambda: mcem._estep(w64, d64, a.particles, a.paths), a.repeats)
    rec = post.diagnostics["record"]
    gen_t = best_of(lambda: genealogy_log_evidence_var(rec), a.repeats)
    bare = dataclasses.replace(post, diagnostics={})  # no genealogy: the four extra filters
    flt_t = best_of(lambda: mcem._evidence_se(w64, d64, bare, a.particles), a.repeats)
    m_t = best_of(lambda: w64.copy().closed_form_mstep(paths, d64.observations, d64.mask, d64.inputs,
                                                       transition_steps=mcem.gradient_steps), a.repeats)
    before = it_t - gen_t + flt_t
    print(f"[{backward:>10}] E-step (smoother, float64)      : {e_t:8.3f} s  ({e_t / pf_t:.2f}x PF)")
    print(f"[{backward:>10}] M-step (closed form, {mcem.gradient_steps} LM steps): {m_t:8.3f} s  ({m_t / pf_t:.2f}x PF)")
    print(f"[{backward:>10}] SE from the genealogy           : {gen_t:8.3f} s  ({gen_t / pf_t:.2f}x PF)")
    print(f"[{backward:>10}] SE from 4 filters of N/4 (old)  : {flt_t:8.3f} s  ({flt_t / pf_t:.2f}x PF)")
    print(f"[{backward:>10}] MCEM iteration in pr.fit        : {it_t:8.3f} s  ({it_t / pf_t:.2f}x PF)  target <= 2x: "
          f"{'PASS' if it_t <= 2 * pf_t else 'FAIL'}")
    print(f"[{backward:>10}]   with the old SE (derived)     : {before:8.3f} s  ({before / pf_t:.2f}x PF)")

if __name__ == "__main__":
    main()
