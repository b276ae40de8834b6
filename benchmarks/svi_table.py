"""The SVI / EKF-EM rows of the training-method table on ``unkelbach-synthetic`` (issue 5).

Same data, initial network and yardstick as ``benchmarks/synthetic_table.py``: every method starts from
``ElmanSSM(4, 1, seed=init_seed, weight_init="rotation", weight_scale=1.1)`` (float64; ``--init gaussian`` for the
classical Gaussian draw with weight_scale 0.9) and the fitted model is scored by
:func:`ppl_rnn.workbench.evaluate.evaluate` (held-out log-evidence per step from a 10000-particle filter over train+test at
the fitted parameters; rolling-origin 1- and 10-step forecast CRPS / RMSE / coverage on the 500 test steps).
Methods: EKF-EM (:class:`~ppl_rnn.inference.EKFEM`) and SVI (model and guide trained jointly by ``pr.fit``) with
each of the four guides. A method's own objective is shown beside it with its evidence kind: for SVI the final
ELBO (``num_eval_particles`` draws, a lower bound), for EKF-EM the EKF log-likelihood (an approximation).

The budgets (steps, learning rates) are chosen so that each method trains in under ten minutes on one core.
Measured on noise seed 0 (held-out nats/step; truth 0.017), from the rotation init / from ``--init gaussian``
(where MCEM reaches -0.039): EKF-EM -0.116 / -0.045; SVI with EKFGuide (200 steps) -0.021 / -0.041;
MarkovGaussianGuide (600 steps) -0.059 / -0.065 (-0.104 after 300); MeanFieldGuide (800 steps) -0.070 / -0.070
(-0.115 after 400); AmortizedGuide (500 steps, lr 0.02) -0.056 / -0.079 (-0.292 after 200 at lr 0.01).
The guides with per-step parameters (mean-field, Markov) and the amortised network still gain with more steps;
the EKF guide has nothing to learn but the model. From the rotation init EKF-EM ends with two units' process
noise large (q = 0.74, 2.37; a noise-dominated basin), while SVI with the EKF guide from the same start does not
(q = 0.11..0.13). Those numbers were measured on a float32 copy of the network (the initial network was built
before the switch to float64). Re-measured 2026-11-30 in float64 with the SE yardstick (``--eval-particles
2000``; truth 0.019 +- 0.000): from the rotation init EKF-EM -0.117 +- 0.000 (same q = 0.74, 2.37), SVI with the
EKF guide -0.020 +- 0.000, amortised -0.056 +- 0.000, Markov -0.061 +- 0.000, mean-field -0.070 +- 0.000
(each run alone with ``--only``, the three in parallel on the loaded machine, 1284-1336 s each).

    python benchmarks/svi_table.py              # prints the markdown table (about 40 minutes on one core)
    python benchmarks/svi_table.py --quick      # small settings (smoke test)
    python benchmarks/svi_table.py --only ekf_em,svi_ekf --json rows.json
"""

from __future__ import annotations

import argparse
import json
import time

from ppl_rnn.inference import EKFEM, SVI
from ppl_rnn.inference.guides import AmortizedGuide, EKFGuide, MarkovGaussianGuide, MeanFieldGuide
from synthetic_setup import (  # same folder: the shared set-up, not a benchmark
    add_common_args,
    initial_network,
    print_rows,
    score,
    synthetic_split,
    truth_row,
)

import ppl_rnn as pr

KEYS = ("ekf_em", "svi_meanfield", "svi_markov", "svi_amortized", "svi_ekf")


def methods(a) -> dict:
    """``{key: (row label, method)}`` with the budgets of ``a``."""
    def svi(guide, steps, lr):
        return SVI(guide=guide, num_steps=steps, lr=lr, lr_decay=a.lr_decay, num_particles=a.particles,
                   num_eval_particles=a.elbo_particles, num_posterior_samples=50, progress=a.progress)

    return {
        "ekf_em": (f"EKF-EM (EKS E-step, {a.ekfem_samples} FFBS paths, {a.ekfem_iters} iterations x "
                   f"{a.ekfem_mstep} Adam steps)",
                   EKFEM(num_iterations=a.ekfem_iters, num_samples=a.ekfem_samples, mstep_steps=a.ekfem_mstep,
                         lr=a.ekfem_lr, progress=a.progress)),
        "svi_meanfield": (f"SVI, MeanFieldGuide (init='eks'), {a.mf_steps} steps",
                          svi(MeanFieldGuide(init="eks"), a.mf_steps, a.mf_lr)),
        "svi_markov": (f"SVI, MarkovGaussianGuide (full, init='eks'), {a.markov_steps} steps",
                       svi(MarkovGaussianGuide(covariance="full", init="eks"), a.markov_steps, a.markov_lr)),
        "svi_amortized": (f"SVI, AmortizedGuide (BiGRU {a.rnn_dim}), {a.amortized_steps} steps",
                          svi(AmortizedGuide(rnn_dim=a.rnn_dim, seed=0), a.amortized_steps, a.amortized_lr)),
        "svi_ekf": (f"SVI, EKFGuide, {a.ekf_steps} steps", svi(EKFGuide(), a.ekf_steps, a.ekf_lr)),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    add_common_args(ap)
    ap.add_argument("--ekfem-iters", type=int, default=20)
    ap.add_argument("--ekfem-samples", type=int, default=10)
    ap.add_argument("--ekfem-mstep", type=int, default=20)
    ap.add_argument("--ekfem-lr", type=float, default=0.02)
    ap.add_argument("--mf-steps", type=int, default=800)
    ap.add_argument("--mf-lr", type=float, default=0.03)
    ap.add_argument("--markov-steps", type=int, default=600)
    ap.add_argument("--markov-lr", type=float, default=0.03)
    ap.add_argument("--amortized-steps", type=int, default=500)
    ap.add_argument("--amortized-lr", type=float, default=0.02)
    ap.add_argument("--rnn-dim", type=int, default=16)
    ap.add_argument("--ekf-steps", type=int, default=200)
    ap.add_argument("--ekf-lr", type=float, default=0.02)
    ap.add_argument("--lr-decay", type=float, default=0.1, help="SVI: total learning-rate decay over the run")
    ap.add_argument("--particles", type=int, default=1, help="SVI: ELBO draws per step")
    ap.add_argument("--elbo-particles", type=int, default=64, help="SVI: draws for the reported final ELBO")
    ap.add_argument("--only", default=None, help=f"comma-separated subset of methods: {','.join(KEYS)}")
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                    help="print the table from rows written by earlier --json runs (in this order) and exit")
    a = ap.parse_args(argv)
    if a.merge:
        initial_network(a)  # fills in the default weight_scale for the header
        rows = []
        for path in a.merge:
            with open(path) as f:
                rows += [(r["name"], r, r["own"], r["kind"], r["wall"] if r["wall"] is not None else float("nan"))
                         for r in json.load(f)]
        _print_table(rows, a, None, None)
        return
    if a.quick:
        a.ekfem_iters, a.ekfem_samples, a.ekfem_mstep = 2, 2, 3
        a.mf_steps = a.markov_steps = a.amortized_steps = a.ekf_steps = 3
        a.rnn_dim, a.elbo_particles, a.eval_particles = 4, 4, 500
    train, test, true_model = synthetic_split(a, quick_steps=(100, 40))
    init = initial_network(a)  # after synthetic_split: float64 like the data
    T1 = train.shape[1]
    ms = methods(a)
    keys = KEYS if a.only is None else tuple(a.only.split(","))
    bad = [k for k in keys if k not in ms]
    if bad:
        ap.error(f"--only: unknown {bad}; choose from {','.join(KEYS)}")
    rows = [] if a.no_truth else [truth_row(true_model, train, test, a)]
    for k in keys:
        name, method = ms[k]
        t0 = time.perf_counter()
        fit = pr.fit(init, train, method=method, seed=0)
        wall = time.perf_counter() - t0
        s = score(fit.model, train, test, a)
        if isinstance(method, SVI):  # the final ELBO with elbo_particles draws
            own = float(fit.posterior.log_evidence.sum()) / T1
        else:
            own = float(fit.trace.log_evidence.values[-1]) / T1
        rows.append((name, s, own, fit.evidence_kind, wall))
        m = fit.model
        print(f"# done {name}: {s} own={own:.3f} wall={wall:.0f}s q={m.q.detach().numpy().round(3)} "
              f"r={m.r.detach().numpy().round(3)}", flush=True)
    _print_table(rows, a, T1, test.shape[1])
    if a.json:
        with open(a.json, "w") as f:
            json.dump([{"name": r[0], **r[1], "own": r[2], "kind": r[3], "wall": r[4]} for r in rows], f, indent=1)


def _print_table(rows, a, T1, T2):
    steps = "" if T1 is None else f": {T1} training + {T2} test steps"
    print(f"\nunkelbach-synthetic, noise seed {a.seed}{steps}; initial network "
          f"ElmanSSM(4, 1, seed={a.init_seed}, weight_init={a.init!r}, weight_scale={a.init_weight_scale}); scored by "
          "ppl_rnn.workbench.evaluate.evaluate "
          f"({a.eval_particles} particles per run in the first round, 8 runs, SE target 0.01 nats/step).\n")
    print_rows(rows)

if __name__ == "__main__":
    main()
