"""Particle MCMC speed: one particle-Gibbs sweep (conditional SMC with ancestor sampling + one θ-step) against
one particle-filter pass with the same number of particles, one thread, the same model and data.

    python benchmarks/bench_pmcmc.py [--quick]

Prints, per model and N, the median wall time of a filter pass (``ParticleFilter``: the default proposal,
ESS-adaptive resampling, no history) and of a particle-Gibbs sweep (``ParticleGibbs`` with its defaults: the
per-sweep wall times the sampler records, ``diagnostics["sweep_seconds"]``, set-up excluded), timed
interleaved, and their ratio (the issue's target: <= 2); then the cost of one PMMH iteration (one filter pass
at the proposed θ plus the accept step) and its ratio to the filter pass.
"""

from __future__ import annotations

import argparse
import statistics
import time

import pyro.distributions as dist
import torch
from ppl_rnn.inference import ParticleFilter
from ppl_rnn.inference.particle_gibbs import ParticleGibbs
from ppl_rnn.inference.pmmh import PMMH
from ppl_rnn.models import ElmanSSM
from pyro.nn import PyroSample

import ppl_rnn as pr
from ppl_rnn.data import prepare
from ppl_rnn.rng import seeded


class NoisyAR1(pr.StateSpaceModel):
    """h_t = 0.9 h_{t-1} + N(0, q^2), y_t = h_t + N(0, r^2), q, r ~ HalfNormal(1) (a user model, no capability)."""

    def __init__(self):
        super().__init__(1, 1)
        self.q = PyroSample(dist.HalfNormal(torch.tensor(1.0)))
        self.r = PyroSample(dist.HalfNormal(torch.tensor(1.0)))

    def initial(self, u0):
        return dist.Normal(torch.zeros(1), torch.ones(1)).to_event(1)

    def transition(self, t, h_prev, u_t):
        return dist.Normal(0.9 * h_prev, self.q * torch.ones_like(h_prev)).to_event(1)

    def emission(self, t, h, u_t):
        return dist.Normal(h, self.r * torch.ones_like(h)).to_event(1)


def _median_time(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _cases(quick: bool):
    T = 200 if quick else 500
    ar = NoisyAR1()
    sim = pr.models.LinearGaussianSSM(1, 1, A=[[0.9]], C=[[1.0]], Q=[[0.25]], R=[[0.09]], m0=[0.0], P0=[[1.0]])
    y1 = sim.simulate(T, 1, seed=0).observations.float()
    elman = ElmanSSM(4, 1, seed=0)
    y2 = elman.simulate(T, 1, seed=0).observations
    yield "NoisyAR1 (user model, bootstrap)", ar, y1
    yield "with_priors(ElmanSSM(4))", pr.with_priors(elman, scale=1.0), y2


def main(quick: bool = False) -> None:
    torch.set_num_threads(1)
    Ns = (100,) if quick else (100, 1000)
    reps = 5 if quick else 7
    sweeps = 5 if quick else 10
    print(f"{'model':36s} {'N':>5s} {'T':>4s} {'filter pass':>12s} {'PG sweep':>10s} {'ratio':>6s} "
          f"{'PMMH iter':>11s} {'ratio':>6s}")
    for label, model, y in _cases(quick):
        from ppl_rnn.priors import ParameterSpace

        fixed = ParameterSpace(model).fixed(model)
        data = prepare(fixed, y)
        T = y.shape[1]
        for N in Ns:
            pf = ParticleFilter(N)

            def filt(pf=pf, fixed=fixed, data=data):
                with seeded(0):
                    pf.run(fixed, data)

            # interleaved (the machine's load drifts): a filter pass, then a short chain, `reps` times; the chain's
            # own per-sweep wall times (diagnostics["sweep_seconds"], set-up excluded)
            t_fs, t_pgs = [], []
            filt()
            for rep in range(reps):
                t0 = time.perf_counter()
                filt()
                t_fs.append(time.perf_counter() - t0)
                post = pr.infer(model, y, method=ParticleGibbs(sweeps, num_chains=1, num_particles=N, warmup=0),
                                seed=rep)
                t_pgs.extend(post.diagnostics["sweep_seconds"].flatten().tolist())
            t_f, t_pg = statistics.median(t_fs), statistics.median(t_pgs)
            # one PMMH iteration (a filter pass at the proposed θ plus the accept step): the wall time of 2k
            # iterations minus that of k, over k
            t_mh = []
            for rep in range(max(1, reps // 2)):
                w = [pr.infer(model, y, method=PMMH(k, num_chains=1, warmup=0, num_particles=N), seed=rep).wall_time_s
                     for k in (sweeps, 2 * sweeps)]
                t_mh.append((w[1] - w[0]) / sweeps)
            t_mh = statistics.median(t_mh)
            print(f"{label:36s} {N:5d} {T:4d} {1e3 * t_f:10.2f}ms {1e3 * t_pg:8.2f}ms {t_pg / t_f:6.2f} "
                  f"{1e3 * t_mh:9.2f}ms {t_mh / t_f:6.2f}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="T = 200, N = 100 only")
    main(ap.parse_args().quick)
