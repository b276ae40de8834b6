"""The shared set-up of the synthetic-benchmark scripts (``synthetic_table.py``, ``svi_table.py``,
``deterministic_table.py``, ``synthetic_basins.py``): the data split, the one random initial network, the
table's MCEM, the yardstick call, the fresh-data scores and the table printer. Not a benchmark itself (no
``main``): the experiment's settings in one place, so every table starts from the same network and scores the
same way. Everything it computes goes through the library.
"""

from __future__ import annotations

import argparse

import torch
from ppl_rnn.inference import (
    SAEM,
    Acceptance,
    AutoMStep,
    ClosedFormMStep,
    ConvergenceRule,
    FromModel,
    GradientMStep,
    MonteCarloEM,
    MultiStart,
    ParticleFilter,
    ParticleSchedule,
    ParticleSmoother,
)
from ppl_rnn.models import ElmanSSM

import ppl_rnn as pr
from ppl_rnn.workbench.datasets import load
from ppl_rnn.workbench.evaluate import evaluate


def score(model, train, test, args):
    ev = evaluate(model, train, test, horizons=(1, 10), num_particles=args.eval_particles, num_samples=200,
                  seed=0)
    return {
        "heldout": float(ev.heldout_logev_per_step), "heldout_se": float(ev.heldout_logev_per_step_se),
        "particles": int(ev.attrs["num_particles"]),
        "rmse1": float(ev.rmse.sel(horizon=1)), "crps1": float(ev.crps.sel(horizon=1)),
        "rmse10": float(ev.rmse.sel(horizon=10)), "crps10": float(ev.crps.sel(horizon=10)),
        "cov90_10": float(ev.coverage_90.sel(horizon=10)),
    }


HEADER = ("| model / training method | held-out log-evidence ± SE (nats/step) | Δ vs truth ± SE | "
          "CRPS 1-step | CRPS 10-step | RMSE 10-step | 90% coverage 10-step | method's own objective "
          "(training, nats/step, kind) | fit wall time (s) |")


def print_rows(rows) -> None:
    """The markdown table of ``rows`` = ``(name, score, own, kind, wall)``; Δ against the row named
    "true generating model" (its SE and the row's combined: the two filters are independent)."""
    print(HEADER)
    print("|" + "---|" * 9)
    t = next((r[1] for r in rows if r[0] == "true generating model"), None)
    for name, s, own, kind, wall in rows:
        se = s.get("heldout_se", float("nan"))
        if t is None:
            delta = "–"
        elif s is t:
            delta = "0"
        else:
            dse = (se ** 2 + t.get("heldout_se", float("nan")) ** 2) ** 0.5
            delta = f"{s['heldout'] - t['heldout']:+.3f} ± {dse:.3f}"
        print(f"| {name} | {s['heldout']:.3f} ± {se:.3f} | {delta} | {s['crps1']:.4f} | {s['crps10']:.4f} | "
              f"{s['rmse10']:.4f} | {s['cov90_10']:.2f} | {'–' if own != own else f'{own:.3f} ({kind})'} | "
              f"{'-' if wall != wall else f'{wall:.0f}'} |")


def fresh_scores(models: dict, true_model, a) -> dict:
    r"""``--fresh-test B T``: each model and the generating network scored on ``B`` fresh sequences of ``T`` steps
    drawn from the generating network (after 200 steps of context, seed 12345) by the per-step increments
    :math:`\log\hat p(y_t\mid y_{<t})` of one default particle filter of 2000 particles (seed 0) over context and
    test; returns ``name -> (mean of log p_fit(y_t|y_<t) - log p_true(y_t|y_<t), its HAC SE over the B x T
    steps)``. An :class:`ppl_rnn.Ensemble` is scored as its linear pool (each member filters on its own). With the table's 500 held-out steps the data SE of that difference is about 0.0095 nats/step; at
    20 x 1000 steps 0.0015 (the filters' Monte Carlo error, a few 1e-4, is well below it). The same increments as
    ``evaluate``'s held-out log-likelihood at 2000 particles (seed 2's restart fit: -0.0255 here, -0.0251 through
    ``evaluate``), in under a minute per model instead of six: no forecast draws, no SE pilot rounds."""
    from ppl_rnn.workbench.ensemble import pooled_log_evidence
    from ppl_rnn.workbench.paired import mean_interval

    B, T = a.fresh_test
    y = true_model.simulate(200 + T, B, seed=12345).observations

    def increments(m):
        return pr.infer(m, y, method=ParticleFilter(2000), seed=0).diagnostics["log_lik"][:, 200:].double()

    ll = {}
    for name, m in {"true generating model": true_model, **models}.items():
        if isinstance(m, pr.Ensemble):  # the linear pool, log sum_k w_k p_k(y_t | y_<t), by the library's pool
            inc = torch.stack([increments(k) for k in m.models])[:, None]  # (K, R=1, B, T)
            # one run per member: only the pooled increments are read (exact=True skips the replicate SE, R >= 2)
            ll[name] = pooled_log_evidence(inc, m.weights, 0, exact=True)[0][0].numpy()
        else:
            ll[name] = increments(m).numpy()
    out = {}
    for name in models:
        d = ll[name] - ll["true generating model"]
        iv = mean_interval(d)
        mean, se = float(iv.mean), float(iv.se)
        out[name] = (mean, se)
        print(f"# fresh test ({B} x {T} steps from the generating network): {name}: "
              f"delta vs truth {mean:+.4f} +- {se:.4f} nats/step (data SE, paired)", flush=True)
    return out


def truth_row(true_model, train, test, a):
    """The generating network's row: the yardstick's score and its training log-evidence per step (PF)."""
    t = score(true_model, train, test, a)
    tl = float(pr.infer(true_model, train, method=ParticleFilter(a.eval_particles), seed=0).log_evidence.sum())
    print(f"# done truth: {t}", flush=True)
    return ("true generating model", t, tl / train.shape[1], "estimate, PF", float("nan"))


def add_common_args(ap: argparse.ArgumentParser) -> None:
    """The options every table script shares (data seed, initial network, yardstick, threads, output)."""
    ap.add_argument("--seed", type=int, default=0, help="noise seed of the data set")
    ap.add_argument("--init-seed", type=int, default=1, help="seed of the random initial network")
    ap.add_argument("--init", default="rotation", choices=("rotation", "gaussian"),
                    help="weight_init of the initial network (default rotation: a random rotation near the identity)")
    ap.add_argument("--init-weight-scale", type=float, default=None,
                    help="weight_scale of the initial network (default 1.1 for rotation, 0.9 for gaussian)")
    ap.add_argument("--eval-particles", type=int, default=10000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default=None, help="also write the numbers here")
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--no-truth", action="store_true", help="skip the true-model row")


def synthetic_split(a, quick_steps: tuple[int, int] | None = None):
    """Threads and float64 as ``a`` asks; the ``unkelbach-synthetic`` train and test values (cut to
    ``quick_steps`` = (train, test) steps under ``--quick``) and the generating network."""
    torch.set_num_threads(a.threads)
    torch.set_default_dtype(torch.float64)
    ds = load("unkelbach-synthetic", seed=a.seed, dtype=torch.float64)
    tr, te = ds.split()
    train, test = tr.values, te.values
    if a.quick and quick_steps is not None:
        train, test = train[:, :quick_steps[0]], test[:, :quick_steps[1]]
    return train, test, ds.true_model


def initial_network(a) -> ElmanSSM:
    """The one random initial network every method of the tables starts from."""
    if a.init_weight_scale is None:
        a.init_weight_scale = 1.1 if a.init == "rotation" else 0.9
    return ElmanSSM(4, 1, seed=a.init_seed, weight_init=a.init, weight_scale=a.init_weight_scale)


def mcem_start(a) -> MultiStart | FromModel:
    """The table's MCEM start: ``--mcem-restarts K`` candidates (``--mcem-restart-kind``, ``--mcem-restart-iters``
    iterations each) around the given network, or the network itself."""
    if a.mcem_restarts <= 1:
        return FromModel()
    return MultiStart(num_starts=a.mcem_restarts, iterations=a.mcem_restart_iters, kind=a.mcem_restart_kind)


def mcem_method(a, multistart: bool = True) -> MonteCarloEM:
    """The table's MCEM: 200 -> 1000 particles (50 -> 200 paths), SAEM averaging over the last 40 %
    (``multistart=False``: without the restarts, from the given network)."""
    n = max(a.mcem_iters - 1, 1)
    gs = a.gradient_steps
    return MonteCarloEM(
        smoother=ParticleSmoother(num_particles=200, num_paths=50), num_iterations=a.mcem_iters,
        stopping=ConvergenceRule(tol=0), schedule=ParticleSchedule(particles=(200, 1000), paths=(50, 200)),
        averaging=SAEM(lambda k: 1.0 if k < 0.6 * n else (k - 0.6 * n + 1) ** -0.7),
        mstep=AutoMStep(closed_form=ClosedFormMStep(transition_steps=gs), gradient=GradientMStep(steps=gs),
                        anneal_noise=None if a.mcem_anneal is None else (a.mcem_anneal[0], int(a.mcem_anneal[1]))),
        acceptance=Acceptance(overrelax=a.mcem_overrelax), start=mcem_start(a) if multistart else FromModel(),
        progress=a.progress)
