"""The default fit, measured: ``pr.fit(ElmanSSM(8, seed=s), y)`` (no method: the start search of
:mod:`ppl_rnn.inference.search`) on the Santa Fe laser (steps 0-999 train, 1000-1499 test, scaled by the training
part's statistics), scored by the yardstick (:func:`ppl_rnn.evaluate`) beside AR by AIC, with its wall time.

    OMP_NUM_THREADS=1 python benchmarks/default_fit.py --seeds 0,1 [--search-iterations 10]
    OMP_NUM_THREADS=1 python benchmarks/default_fit.py --problem synthetic --seeds 0,1,2,3,4

``--problem synthetic``: ``pr.fit(ElmanSSM(4, seed=s), y)`` on the synthetic benchmark's data seed ``s`` (1000
training, 500 fresh test steps), its held-out Δ to the generating network on the same yardstick, and the cost.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
from ppl_rnn.models import ElmanSSM

import ppl_rnn as pr


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--search-iterations", type=int, default=None,
                    help="Recommended(search_iterations=...) instead of the default method")
    ap.add_argument("--problem", choices=("laser", "synthetic"), default="laser")
    a = ap.parse_args()
    torch.set_num_threads(1)
    if a.problem == "synthetic":
        return synthetic(map(int, a.seeds.split(",")))
    rec = pr.datasets.load("santafe-laser", scale="standard", train_steps=1000)
    y = rec.values
    tr, te = y[:, :1000], y[:, 1000:1500]
    hs = (1, 5, 10)
    ar = pr.fit(ElmanSSM(8, seed=0), tr, method=pr.inference.LinearAR(order="aic"), seed=0)
    ev_ar = pr.evaluate(ar.model, tr, te, horizons=hs, seed=0)
    print(f"AR({ar.diagnostics['order']}) by AIC: held-out {float(ev_ar.heldout_logev_per_step):+.3f} nats/step, "
          f"CRPS {[round(float(v), 3) for v in ev_ar.crps.values]} at leads {hs}", flush=True)
    for s in map(int, a.seeds.split(",")):
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            if a.search_iterations is None:
                f = pr.fit(ElmanSSM(8, seed=s), tr, seed=s)  # the default: no method
            else:
                f = pr.fit(ElmanSSM(8, seed=s), tr, seed=s,
                           method=pr.inference.Recommended(search_iterations=a.search_iterations))
        wall = time.perf_counter() - t0
        ev = pr.evaluate(f.model, tr, te, horizons=hs, seed=0)
        d = f.diagnostics
        print(d["search"][["label", "tail_log_score_per_step", "tail_log_score_per_step_se", "rounds",
                                 "wall_time_s", "chosen"]].to_dataframe().to_string(), flush=True)
        print(f"seed {s}: fit {wall:.0f} s (search {d['search_wall_time_s']:.0f} s), choice {d['search_choice']}; "
              f"held-out {float(ev.heldout_logev_per_step):+.3f} ± {float(ev.heldout_logev_per_step_se):.3f} "
              f"nats/step vs AR {float(ev_ar.heldout_logev_per_step):+.3f} "
              f"(Δ {float(ev.heldout_logev_per_step - ev_ar.heldout_logev_per_step):+.3f}); "
              f"CRPS {[round(float(v), 3) for v in ev.crps.values]}; verdict: {d['search_verdict']}; "
              f"warnings: {[str(x.message)[:80] for x in w if 'Reference' in type(x.message).__name__]}", flush=True)


def synthetic(seeds) -> None:
    for s in seeds:
        rec = pr.datasets.load("unkelbach-synthetic", seed=s, train_steps=1000, test_steps=500)
        tr, te = (x.values for x in rec.split())
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            f = pr.fit(ElmanSSM(4, seed=s), tr, seed=s)  # the default: no method
        wall = time.perf_counter() - t0
        ev = pr.evaluate(f.model, tr, te, horizons=(1, 5), seed=0)
        ev0 = pr.evaluate(rec.true_model, tr, te, horizons=(1, 5), seed=0)
        d = float(ev.heldout_logev_per_step - ev0.heldout_logev_per_step)
        se = float((ev.heldout_logev_per_step_se ** 2 + ev0.heldout_logev_per_step_se ** 2) ** 0.5)
        print(f"synthetic seed {s}: fit {wall:.0f} s (search {f.diagnostics['search_wall_time_s']:.0f} s), choice "
              f"{f.diagnostics['search_choice']}; held-out Δ to the generating network {d:+.4f} ± {se:.4f} "
              f"nats/step ({'within' if d >= -0.02 else 'outside'} 0.02)", flush=True)


if __name__ == "__main__":
    main()
