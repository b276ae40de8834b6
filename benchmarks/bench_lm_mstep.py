"""Fast M-steps for every architecture (issue 27 point 3): the generic Levenberg-Marquardt M-step against the
gradient M-steps, on the Santa Fe laser (steps 0-999, standard-scaled with training statistics), one thread.

``python benchmarks/bench_lm_mstep.py mstep``: one set of 100 smoothed paths of ``GRUSSM(8)`` (its start, particle
smoother 500 particles, MCMC backward kernel), then each M-step from the same start on those paths: time and
Q-hat reached (per observation).
``python benchmarks/bench_lm_mstep.py mcem gru|jordan adam|lbfgs|lm``: 10 Monte Carlo EM iterations with the library's
default smoother: wall time and the last iteration's training log-evidence estimate (per step).
Results: benchmarks/README.md, "Fast M-steps for every architecture".
"""

from __future__ import annotations

import sys
import time

import torch

torch.set_num_threads(1)
torch.set_default_dtype(torch.float64)

from ppl_rnn.inference import MonteCarloEM, ParticleSmoother  # noqa: E402
from ppl_rnn.inference.complete_data import complete_data_log_likelihood  # noqa: E402
from ppl_rnn.inference.msteps import ClosedFormMStep, GradientMStep  # noqa: E402
from ppl_rnn.models import GRUSSM, JordanSSM  # noqa: E402

import ppl_rnn as pr  # noqa: E402
from ppl_rnn.data import Data  # noqa: E402
from ppl_rnn.workbench import datasets  # noqa: E402


def laser():
    ds = datasets.load("santafe-laser", scale="standard", train_steps=1000)
    return ds.values[:, :1000].to(torch.float64)


def q_hat(m, h, data, w):
    with torch.no_grad():
        return float((w * complete_data_log_likelihood(m, h, data).sum(-1)).sum())


def bench_mstep():
    y = laser()
    mask = torch.isfinite(y)
    data = Data(y, mask, None)
    start = GRUSSM(8, 1, seed=0)
    post = pr.infer(start, y, method=ParticleSmoother(500, 100, backward="mcmc"), seed=0)
    h = post.diagnostics["paths"].detach().to(torch.float64)
    S = h.shape[0]
    w = torch.full((S,), 1.0 / S)
    n = float(mask.sum())
    print(f"GRUSSM(8), laser 1000 steps, {S} paths; Q-hat per observation (start {q_hat(start, h, data, w) / n:+.4f})")
    rows = [("Adam, 10 steps (lr 0.01; the old default)", GradientMStep(optimizer="adam", steps=10, lr=0.01)),
            ("L-BFGS, <= 10 iterations (GradientMStep default)", GradientMStep()),
            ("Levenberg-Marquardt, 3 steps", ClosedFormMStep(transition_steps=3)),
            ("Levenberg-Marquardt, 10 steps (ClosedFormMStep default)", ClosedFormMStep(transition_steps=10))]
    for label, step in rows:
        m = start.copy()
        step = step.resolve(m)
        state = step.start(None)
        t0 = time.perf_counter()
        step(m, h, w, data, state)
        dt = time.perf_counter() - t0
        print(f"  {label:58s} {dt:7.2f} s   Q-hat/obs {q_hat(m, h, data, w) / n:+.4f}")


def bench_mcem(arch: str, kind: str):
    y = laser()
    model = GRUSSM(8, 1, seed=0) if arch == "gru" else JordanSSM(8, 1, seed=0)
    mstep = {"adam": GradientMStep(optimizer="adam", steps=10, lr=0.01), "lbfgs": GradientMStep(),
             "lm": ClosedFormMStep(transition_steps=10)}[kind]
    t0 = time.perf_counter()
    fit = pr.fit(model, y, method=MonteCarloEM(num_iterations=10, mstep=mstep), seed=0)
    dt = time.perf_counter() - t0
    le = fit.trace.log_evidence.values
    print(f"{type(model).__name__}(8) MCEM 10 iterations, M-step {kind:5s}: {dt:6.1f} s, training log-evidence "
          f"per step {le[-1] / y.shape[1]:+.3f} (start {le[0] / y.shape[1]:+.3f}; best {le.max() / y.shape[1]:+.3f})")


if __name__ == "__main__":
    if sys.argv[1] == "mstep":
        bench_mstep()
    else:
        bench_mcem(sys.argv[2], sys.argv[3])
