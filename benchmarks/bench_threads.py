"""Thread-count benchmark (not a test): one particle-filter run with 1 vs 2 torch intra-op threads, alone and
next to a busy second process.

Per-time-step loops on small tensors (particle filters and smoothers, Kalman, EKF, the EM E-steps) pay
torch's intra-op thread synchronisation at every operation; with two threads on two cores and another
process busy on one of them, every operation waits for the descheduled worker. The library therefore runs
those loops under :func:`ppl_rnn.scope.threads_for`, which uses one thread below
:data:`ppl_rnn.scope.SMALL_WORK` elements per operation and restores the caller's setting.

Rows: the caller's thread count, and whether the library's choice is active (``threads_for``) or disabled
(``SMALL_WORK = 0``: the loop runs on the caller's count). Columns: wall time of one run alone and with a
busy second process (a subprocess doing single-threaded matrix products for the duration).

Run: ``.venv/bin/python benchmarks/bench_threads.py [--particles N] [--steps T] [--repeats R]``. The
machine's own load adds noise: compare rows measured in the same run.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import torch
from ppl_rnn.inference import ParticleFilter
from ppl_rnn.models import ElmanSSM

import ppl_rnn as pr
import ppl_rnn.scope as scope

_BUSY = "import torch\ntorch.set_num_threads(1)\na = torch.randn(400, 400)\nwhile True:\n    a = torch.tanh(a @ a)\n"


def one_run(model, y, N, proposal):
    t0 = time.perf_counter()
    pr.infer(model, y, method=ParticleFilter(N, proposal=proposal), seed=0)
    return time.perf_counter() - t0


def measure(model, y, N, proposal, caller_threads, library_choice, repeats):
    old_threads, old_small = torch.get_num_threads(), scope.SMALL_WORK
    torch.set_num_threads(caller_threads)
    if not library_choice:
        scope.SMALL_WORK = 0  # threads_for keeps the caller's count
    try:
        one_run(model, y, N, proposal)  # warm-up
        return min(one_run(model, y, N, proposal) for _ in range(repeats))
    finally:
        torch.set_num_threads(old_threads)
        scope.SMALL_WORK = old_small


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--particles", type=int, default=256)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    model = ElmanSSM(8, 1, seed=0, process_noise=0.1, obs_noise=0.1)
    y = model.simulate(a.steps, 1, seed=0).observations
    print(f"# one ParticleFilter run: ElmanSSM(hidden 8, tanh), T={a.steps}, N={a.particles}, float32, "
          f"work per operation N*B*H = {a.particles * 8} elements (SMALL_WORK = {scope.SMALL_WORK}); "
          f"best of {a.repeats}, seconds")
    rows = [(1, True), (2, True), (2, False)]
    results = {}
    for busy in (False, True):
        proc = subprocess.Popen([sys.executable, "-c", _BUSY]) if busy else None
        try:
            if proc is not None:
                time.sleep(1.0)
            for proposal in ("adapted", "bootstrap"):
                for caller, choice in rows:
                    results[(proposal, caller, choice, busy)] = measure(model, y, a.particles, proposal, caller,
                                                                       choice, a.repeats)
        finally:
            if proc is not None:
                proc.kill()
                proc.wait()
    print(f"{'proposal':>10} {'caller threads':>15} {'loop threads':>24} {'alone':>8} {'busy 2nd process':>17}")
    for proposal in ("adapted", "bootstrap"):
        for caller, choice in rows:
            loop = "1 (threads_for)" if choice else f"{caller} (SMALL_WORK = 0)"
            print(f"{proposal:>10} {caller:>15} {loop:>24} {results[(proposal, caller, choice, False)]:>8.3f} "
                  f"{results[(proposal, caller, choice, True)]:>17.3f}")
    print("   (rows 1-2: the library's choice, one thread whatever the caller set; row 3: the caller's two threads "
          "inside the loop, as before threads_for)")


if __name__ == "__main__":
    main()
