"""Particle filters side by side with peers, one thread, same models and data, one run (not a test).

Sections (ratios = peer time / ppl_rnn time; > 1 means ppl_rnn is faster):

1. Bootstrap filter of the hidden-8 Elman network (``ElmanSSM(8, 1, tanh)``, float32, T = 500) at N = 1024:
   ``ParticleFilter(N, proposal=Bootstrap())`` vs a plain JAX ``lax.scan`` bootstrap filter (same parameters,
   ESS-adaptive systematic resampling at 0.5, compiled once; target ratio <= 1.0, i.e. ours at least as fast)
   and vs ``pyro.infer.SMCFilter`` (goal >= 10x).
2. The Gordon-Salmond-Smith benchmark written as a user model (no capabilities), T = 100, N = 1000:
   ``ParticleFilter(N)`` (the default proposal) vs the ``particles`` library's bootstrap filter (target >= 2x),
   log Z-hat of both over independent runs (agreement within 3 SE).
3. The same model: time x Var(log Z-hat) of the default filter, the bootstrap filter and the EKF proposal
   (``Guided()``) over independent runs (target default / bootstrap <= 1.25).

The peers (``jax``, ``particles``) are never project dependencies: they run in a subprocess of their own venv,
``--peers-python PATH`` (default ``/tmp/peers/bin/python`` where it exists), e.g.::

    python3 -m venv /tmp/peers && /tmp/peers/bin/pip install -q jax particles

Without it, sections 1-2 print ppl_rnn's times and skip the peers. Pyro's SMCFilter runs in this process (pyro is
a project dependency).

Run: ``.venv/bin/python benchmarks/bench_peers.py [--quick] [--peers-python PATH] [--runs R] [--repeats R]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import time
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from ppl_rnn.inference import Bootstrap, Guided, ParticleFilter
from ppl_rnn.models import ElmanSSM
from pyro_peer import PyroElman, PyroElmanGuide  # same folder: the SMCFilter adapter

import ppl_rnn as pr
from ppl_rnn.model import StateSpaceModel


class GSS(StateSpaceModel):
    """Gordon, Salmond & Smith (1993) as a user writes it: x_t = x/2 + 25x/(1+x^2) + 8 cos(1.2t) + N(0, 10),
    y_t = x_t^2/20 + N(0, 1), x_0 ~ N(0, 5). No capabilities declared."""

    def __init__(self):
        super().__init__(1, 1)

    def initial(self, u0):
        return dist.Normal(torch.zeros(1), math.sqrt(5.0) * torch.ones(1)).to_event(1)

    def transition(self, t, h, u_t):
        return dist.Normal(0.5 * h + 25 * h / (1 + h * h) + 8 * math.cos(1.2 * t), math.sqrt(10.0)).to_event(1)

    def emission(self, t, h, u_t):
        return dist.Normal(h * h / 20, 1.0).to_event(1)


# ---- the peers' side: run by the peers' python (jax, particles), parameters and data as JSON on stdin -------
PEER_SCRIPT = r'''
import json, math, sys, time
import numpy as np
job = json.load(sys.stdin)
out = {}

def best(fn, repeats):
    b = float("inf")
    for _ in range(repeats):
        t0 = time.process_time(); fn(); b = min(b, time.process_time() - t0)
    return b

if "elman" in job:
    import jax, jax.numpy as jnp
    e = job["elman"]
    W, b, q = jnp.array(e["W"]), jnp.array(e["b"]), jnp.array(e["q"])
    C, d, r = jnp.array(e["C"]), jnp.array(e["d"]), jnp.array(e["r"])
    m0, s0 = jnp.array(e["m0"]), jnp.array(e["s0"])
    y = jnp.array(e["y"], dtype=jnp.float32)  # (T, D)
    N = e["N"]

    def loglik(h, yt):
        z = (yt - (h @ C.T + d)) / r
        return -0.5 * jnp.sum(z * z, -1) - jnp.sum(jnp.log(r)) - 0.5 * z.shape[-1] * math.log(2 * math.pi)

    def systematic(key, w):
        u = (jnp.arange(N) + jax.random.uniform(key)) / N
        return jnp.clip(jnp.searchsorted(jnp.cumsum(w), u), 0, N - 1)

    @jax.jit
    def pf(key):
        k0, key = jax.random.split(key)
        h = m0 + s0 * jax.random.normal(k0, (N, m0.shape[0]))
        a = loglik(h, y[0]); l0 = jax.nn.logsumexp(a); lw = a - l0

        def step(carry, yt):
            key, h, lw = carry
            key, k1, k2 = jax.random.split(key, 3)
            w = jnp.exp(lw)
            ess = 1.0 / jnp.sum(w * w)
            h, lw = jax.lax.cond(ess < 0.5 * N, lambda: (h[systematic(k1, w)], jnp.full((N,), -math.log(N))),
                                 lambda: (h, lw))
            h = jnp.tanh(h @ W.T + b) + q * jax.random.normal(k2, h.shape)
            a = lw + loglik(h, yt)
            l = jax.nn.logsumexp(a)
            return (key, h, a - l), (l, jnp.sum(jnp.exp(a - l)[:, None] * h, 0))

        _, (ls, means) = jax.lax.scan(step, (key, h, lw), y[1:])
        return l0 + jnp.sum(ls), means

    key = jax.random.PRNGKey(0)
    t0 = time.perf_counter(); jax.block_until_ready(pf(key)); compile_s = time.perf_counter() - t0
    sec = best(lambda: jax.block_until_ready(pf(key)), e["repeats"])
    out["jax"] = {"seconds": sec, "compile_seconds": compile_s, "log_z": float(pf(key)[0]),
                  "version": jax.__version__}

if "gss" in job:
    import particles
    import particles.distributions as dists
    import particles.state_space_models as ssm
    g = job["gss"]

    class GSSp(ssm.StateSpaceModel):
        def PX0(self):
            return dists.Normal(loc=0.0, scale=math.sqrt(5.0))
        def PX(self, t, xp):
            return dists.Normal(loc=0.5 * xp + 25 * xp / (1 + xp ** 2) + 8 * np.cos(1.2 * t), scale=math.sqrt(10.0))
        def PY(self, t, xp, x):
            return dists.Normal(loc=x ** 2 / 20, scale=1.0)

    data = [np.array([v]) for v in g["y"]]
    fk = ssm.Bootstrap(ssm=GSSp(), data=data)

    def run(seed):
        np.random.seed(seed)
        pf = particles.SMC(fk=fk, N=g["N"], resampling="systematic", ESSrmin=0.5, store_history=False)
        pf.run()
        return pf.logLt

    run(0)
    times, lz = [], []
    for s in range(g["runs"]):
        t0 = time.process_time(); lz.append(float(run(s))); times.append(time.process_time() - t0)
    out["particles"] = {"seconds": min(times), "log_z": lz, "version": particles.__version__}

json.dump(out, sys.stdout)
'''


def run_peers(python: str | None, job: dict) -> dict:
    """The peers' results (empty where no peers' python is available or it fails)."""
    if not python:
        return {}
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
               XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1",
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([python, "-c", PEER_SCRIPT], input=json.dumps(job), capture_output=True, text=True,
                          env=env, timeout=1800)
    if proc.returncode != 0:
        print(f"   (peers failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode})")
        return {}
    return json.loads(proc.stdout)


def best_time(fn, repeats: int) -> float:
    """Best process CPU time over ``repeats`` runs (one thread: the stabler measure on a shared machine)."""
    best = math.inf
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        best = min(best, time.process_time() - t0)
    return best


# ---- Pyro's SMCFilter on the same Elman network ------------------------------------------------------------
def run_smcfilter(m: ElmanSSM, y: torch.Tensor, N: int, seed: int = 0) -> None:
    """y: (T, D). pyro.infer.SMCFilter with a bootstrap guide (ESS threshold 0.5, its default). Its float32
    systematic resampler can index one past the end; such a run is repeated with another seed."""
    for attempt in range(10):
        torch.manual_seed(seed + 1000 * attempt)
        smc = pyro.infer.SMCFilter(PyroElman(m), PyroElmanGuide(m), num_particles=N, max_plate_nesting=0)
        try:
            with torch.no_grad():
                smc.init(y0=y[0])
                for t in range(1, y.shape[0]):
                    smc.step(y[t], t)
            return
        except IndexError:
            continue
    raise RuntimeError("SMCFilter failed 10 times")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer runs and steps (smoke run)")
    ap.add_argument("--peers-python", default="/tmp/peers/bin/python" if Path("/tmp/peers/bin/python").exists()
                    else None, help="python of a venv with jax and particles (default /tmp/peers/bin/python)")
    ap.add_argument("--runs", type=int, default=None, help="independent runs for the log Z statistics")
    ap.add_argument("--repeats", type=int, default=10,
                    help="timed runs of ppl_rnn and JAX in section 1, best kept (SMCFilter: a quarter of them)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    runs = args.runs or (10 if args.quick else 50)
    T = 100 if args.quick else 500
    print(f"# peers benchmark: one thread, torch {torch.__version__}, pyro {pyro.__version__}, peers python "
          f"{args.peers_python or '(none)'}")

    # 1. Elman hidden 8, bootstrap, N = 1024
    N = 1024
    model = ElmanSSM(8, 1, seed=0, process_noise=0.1, obs_noise=0.1)
    y = model.simulate(T, 1, seed=0).observations  # (1, T, 1)
    pf = ParticleFilter(N, proposal=Bootstrap())
    ours = best_time(lambda: pr.infer(model, y, method=pf, seed=0), args.repeats)
    smc = best_time(lambda: run_smcfilter(model, y[0], N), max(1, args.repeats // 4))
    with torch.no_grad():
        e = {k: getattr(model, k).detach().tolist() for k in ("W", "b", "q", "C", "d", "r", "m0", "s0")}
    peers = run_peers(args.peers_python, {"elman": dict(e, y=y[0].tolist(), N=N, repeats=args.repeats)})
    print(f"\n## 1. Bootstrap filter, ElmanSSM(8, 1, tanh), T={T}, N={N} (CPU ms per step, best; ratio = peer / ppl_rnn)")
    print(f"{'filter':>28} {'ms/step':>9} {'ratio':>8}")
    print(f"{'ppl_rnn ParticleFilter':>28} {1e3 * ours / T:>9.4f} {1.0:>7.2f}x")
    if "jax" in peers:
        j = peers["jax"]
        print(f"{'JAX lax.scan ' + j['version']:>28} {1e3 * j['seconds'] / T:>9.4f} {j['seconds'] / ours:>7.2f}x"
              f"   (compile {j['compile_seconds']:.1f} s, not counted; target >= 1.0x)")
    print(f"{'pyro.infer.SMCFilter':>28} {1e3 * smc / T:>9.4f} {smc / ours:>7.2f}x   (goal >= 10x)")

    # 2. GSS user model vs particles, N = 1000
    N, Tg = 1000, 100
    gss = GSS()
    yg = gss.simulate(Tg, 1, seed=0).observations  # (1, Tg, 1)
    default = ParticleFilter(N)
    times, lz = [], []
    for s in range(runs):
        t0 = time.process_time()
        post = pr.infer(gss, yg, method=default, seed=s)
        times.append(time.process_time() - t0)
        lz.append(float(post.log_evidence[0]))
    chosen = post.diagnostics["proposal"]
    lz = torch.tensor(lz, dtype=torch.float64)
    peers = run_peers(args.peers_python, {"gss": {"y": yg[0, :, 0].tolist(), "N": N, "runs": runs}})
    print(f"\n## 2. Gordon-Salmond-Smith user model, T={Tg}, N={N}, {runs} runs each (CPU ms per run, best; log Z mean +- SE)")
    print(f"{'filter':>28} {'ms/run':>9} {'ratio':>8} {'log Z':>20}")
    se = float(lz.std() / math.sqrt(runs))
    print(f"{'ppl_rnn default (' + chosen + ')':>28} {1e3 * min(times):>9.3f} {1.0:>7.2f}x "
          f"{float(lz.mean()):>11.3f} +- {se:.3f}")
    if "particles" in peers:
        p = peers["particles"]
        plz = torch.tensor(p["log_z"], dtype=torch.float64)
        pse = float(plz.std() / math.sqrt(runs))
        z = (float(lz.mean()) - float(plz.mean())) / math.sqrt(se ** 2 + pse ** 2)
        print(f"{'particles ' + p['version']:>28} {1e3 * p['seconds']:>9.3f} {p['seconds'] / min(times):>7.2f}x "
              f"{float(plz.mean()):>11.3f} +- {pse:.3f}   (target >= 2x; log Z difference {z:+.2f} SE, target |z| <= 3)")

    # 3. GSS: time x Var(log Z) of default, bootstrap and EKF proposal
    print(f"\n## 3. Gordon-Salmond-Smith: time x Var(log Z-hat), T={Tg}, N={N}, {runs} runs each "
          "(relative to the bootstrap filter)")
    print(f"{'proposal':>14} {'ms/run':>9} {'Var log Z':>10} {'time x var':>11} {'relative':>9}")
    rows = {}
    for label, prop in (("default", "auto"), ("bootstrap", Bootstrap()), ("EKF (Guided)", Guided())):
        f = ParticleFilter(N, proposal=prop)
        ts, ls = [], []
        for s in range(runs if label != "EKF (Guided)" else max(10, runs // 2)):
            t0 = time.process_time()
            le = pr.infer(gss, yg, method=f, seed=1000 + s).log_evidence
            ts.append(time.process_time() - t0)
            ls.append(float(le[0]))
        v = float(torch.tensor(ls, dtype=torch.float64).var())
        rows[label] = (sorted(ts)[len(ts) // 2], v)
    base = rows["bootstrap"][0] * rows["bootstrap"][1]
    for label, (t, v) in rows.items():
        print(f"{label:>14} {1e3 * t:>9.3f} {v:>10.4f} {t * v:>11.3e} {t * v / base:>8.2f}x")
    print("   (time = median CPU time per run; target default / bootstrap <= 1.25)")


if __name__ == "__main__":
    main()
