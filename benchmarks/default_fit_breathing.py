"""The default fit on breathing, two windows: ``pr.fit(ElmanSSM(8, seed=s), y)`` (no method: the start search of
:mod:`ppl_rnn.inference.search`) against the best linear reference (AR by AIC, the linear SSM by KalmanEM) on
forecast CRPS at 0.2 / 0.4 / 0.6 s (5 / 10 / 15 steps at 25 Hz), scored by the yardstick.

    OMP_NUM_THREADS=1 python benchmarks/default_fit_breathing.py --window 730 --seeds 0,1,2

Windows of 180 s (120 s train, 60 s test, scaling statistics from the training part): the shipped regular
window starts at 730 s (``datasets.REGULAR_BREATHING_WINDOW``); the second window, chosen before any of its
results were looked at, starts at 1630 s (15 minutes later in the same recording).
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
from ppl_rnn.models import ElmanSSM, LinearGaussianSSM

import ppl_rnn as pr

HORIZONS = (5, 10, 15)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--window", type=float, default=730.0, help="start of the 180 s window (s)")
    ap.add_argument("--seeds", default="0")
    a = ap.parse_args()
    torch.set_num_threads(1)
    rec = pr.datasets.load("respiration", window=(a.window, 180.0), train_s=120.0)
    tr, te = (x.values for x in rec.split())
    print(f"window {a.window:.0f}-{a.window + 180:.0f} s: train {tuple(tr.shape)}, test {tuple(te.shape)}", flush=True)
    refs = {}
    ar = pr.fit(ElmanSSM(8, seed=0), tr, method=pr.inference.LinearAR(order="aic"), seed=0)
    refs[f"AR({ar.diagnostics['order']}) by AIC"] = ar.model
    lin = pr.fit(LinearGaussianSSM(8, 1, seed=0).to(torch.float64), tr.double(), method=pr.inference.KalmanEM(num_iterations=100, init="ar"), seed=0)
    refs["linear SSM (H=8, KalmanEM 100)"] = lin.model
    crps_ref = {}
    for name, m in refs.items():
        ev = pr.evaluate(m, tr, te, horizons=HORIZONS, seed=0)
        crps_ref[name] = ev.crps.values
        print(f"{name}: held-out {float(ev.heldout_logev_per_step):+.3f} nats/step, CRPS "
              f"{[round(float(v), 4) for v in ev.crps.values]} at 0.2/0.4/0.6 s", flush=True)
    best = torch.tensor([min(v[i] for v in crps_ref.values()) for i in range(len(HORIZONS))])
    for s in map(int, a.seeds.split(",")):
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            f = pr.fit(ElmanSSM(8, seed=s), tr, seed=s)  # the default: no method
        wall = time.perf_counter() - t0
        ev = pr.evaluate(f.model, tr, te, horizons=HORIZONS, seed=0)
        c = torch.tensor(ev.crps.values)
        d = f.diagnostics
        print(d["search"][["label", "tail_crps", "tail_log_score_per_step", "rounds", "iterations",
                                 "wall_time_s", "chosen"]].to_dataframe().to_string(), flush=True)
        print(f"window {a.window:.0f} seed {s}: fit {wall:.0f} s (search {d['search_wall_time_s']:.0f} s), choice "
              f"{d['search_choice']}; held-out {float(ev.heldout_logev_per_step):+.3f} nats/step; CRPS "
              f"{[round(float(v), 4) for v in c]} vs best linear {[round(float(v), 4) for v in best]}: "
              f"{[f'{float(x):+.1%}' for x in (c - best) / best]}; verdict: {d['search_verdict']}; warnings: "
              f"{[str(x.message)[:60] for x in w if 'Reference' in type(x.message).__name__]}", flush=True)


if __name__ == "__main__":
    main()
