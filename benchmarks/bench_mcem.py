"""Benchmark: one Monte Carlo EM iteration vs one particle-filter pass with the same number of particles.

Issue 4 asks that one MCEM iteration (T=1000, N=500 particles, 100 paths, hidden 8) costs at most 3x one
bootstrap particle-filter pass with the same N, measured in the same run. One MCEM iteration = one E-step
(particle smoother: forward filter with history + backward simulation of the paths) + one M-step
(ElmanSSM closed-form block updates with Levenberg-Marquardt steps for the tanh weights).

    python benchmarks/bench_mcem.py [--repeats 3] [--threads 1] [--backward mcmc simulation]

Both backward passes of the smoother are timed: ``mcmc`` (backward Metropolis-Hastings from the genealogy,
O(P) per step) and ``simulation`` (FFBSi, O(N P) per step: the (P, N) transition-density matrix at every step).
"""

from __future__ import annotations

import argparse
import time

import torch
from ppl_rnn.inference import ParticleFilter, ParticleSmoother
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
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--backward", nargs="+", default=["mcmc", "simulation"], choices=["simulation", "mcmc"],
                    help="smoother backward pass(es) to time (default: both)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    true = ElmanSSM(a.hidden, 1, process_noise=0.2, obs_noise=0.2, weight_scale=1.2, seed=1)
    y = true.simulate(a.steps, 1, seed=0).observations
    model = ElmanSSM(a.hidden, 1, seed=2)
    data = prepare(model, y)
    pf = ParticleFilter(num_particles=a.particles)
    pf_t = best_of(lambda: pr.infer(model, y, method=pf, seed=0), a.repeats)
    print(f"T={a.steps} N={a.particles} paths={a.paths} hidden={a.hidden} threads={a.threads} (best of {a.repeats})")
    print(f"particle filter pass                 : {pf_t:8.3f} s")
    for backward in a.backward:
        sm = ParticleSmoother(num_particles=a.particles, num_paths=a.paths, backward=backward)
        mcem = MonteCarloEM(smoother=sm, num_iterations=1, tol=0, gradient_steps=5)

        def one_iteration(mcem=mcem):
            # E-step + M-step of one iteration (what _fit does per iteration), without the final E-step
            post, paths, le = mcem._estep(model.copy(), data, a.particles, a.paths)
            model.copy().closed_form_mstep(paths, data.observations, data.mask, data.inputs, transition_steps=5)

        e_t = best_of(lambda mcem=mcem: mcem._estep(model, data, a.particles, a.paths), a.repeats)
        it_t = best_of(one_iteration, a.repeats)
        se_t = best_of(lambda mcem=mcem: mcem._evidence_se(model, data, pr.infer(model, y, method=pf, seed=0),
                                                           a.particles), a.repeats) - pf_t
        print(f"[{backward:>10}] MCEM E-step (smoother) : {e_t:8.3f} s  ({e_t / pf_t:.2f}x PF)")
        print(f"[{backward:>10}] MCEM iteration (E + M) : {it_t:8.3f} s  ({it_t / pf_t:.2f}x PF)  target <= 3x: "
              f"{'PASS' if it_t <= 3 * pf_t else 'FAIL'}")
        print(f"[{backward:>10}] + log-evidence SE (4 filters of N/4): {se_t:8.3f} s  ({se_t / pf_t:.2f}x PF)")


if __name__ == "__main__":
    main()
