"""Real-data tables of issue 10: breathing-motion forecasting and the Santa Fe laser.

    .venv/bin/python benchmarks/real_tables.py [--problem breathing|laser|all] [--seeds 0 1 2]
        [--cache DIR] [--stage fit|score|table|all] [--paired] [--select-tail STEPS] [--quick]

Every row is scored by the library's one yardstick, :func:`ppl_rnn.workbench.evaluate.evaluate` (exact Kalman
for the linear rows; for the networks ``R = 8`` independent particle-filter runs with the library's default
proposal, particles raised until the Monte Carlo SE of the held-out log-evidence is below 0.01 nats/step),
on data preprocessed from the training part only (:mod:`ppl_rnn.workbench.datasets`).

(a) **Breathing** (``respiration``, the regular window ``REGULAR_BREATHING_WINDOW`` = 730-910 s of the
    recording, 25 Hz, robust-scaled on the training part): 120 s (3000 steps) of training, the next 60 s
    (1500 steps) held out; leads 5/10/15 steps = 0.2/0.4/0.6 s. Rows: AR(p) with p by AIC on the training
    part (``LinearAR(order="aic", max_order=30)``); KalmanEM's linear state-space model
    (``ElmanSSM(H, activation="identity")`` with H the AIC order, exact EM begun at that AR fit in companion
    form, ``KalmanEM(init="ar")``, ``--kem-iterations``); the tanh network (``ElmanSSM(H)``) trained by Monte
    Carlo EM from the **linear warm start**: the KalmanEM row's fit embedded in tanh's linear regime
    (``embed_linear(..., gain=0.01)``, what ``MonteCarloEM(start=LinearStart())`` does by default, here reusing the
    KalmanEM row instead of fitting it twice). ``--breathing-hidden 6 --kem-init model --init-gain 0.1`` gives
    the earlier rows (hidden 6, KalmanEM from the random network).
(b) **Santa Fe laser** (``santafe-laser``, standard-scaled on the training part): steps 0-999 train, 1000-1499
    test; leads 1..10. Rows: AR(p by AIC); KalmanEM hidden 8; MCEM tanh networks hidden 8 and 16 from the
    default random start (``ElmanSSM(H, seed=seed)``), at several iteration counts (checkpoints).
    ``--laser-init rotation`` starts from ``ElmanSSM(H, seed=seed, weight_init="rotation", weight_scale=1.1)``
    instead (row key ``mcem_h{H}_rot``); ``--laser-restarts K --laser-restart-iterations M`` makes the first
    chunk ``MonteCarloEM(start=MultiStart(num_starts=K, iterations=M))`` (K candidates, M iterations each, the best by
    training evidence continued; row key suffix ``_r{K}x{M}``; the first checkpoint is M + ``--laser-chunk``).

Fits are run in chunks (KalmanEM 50 iterations, MCEM ``--chunk``/``--laser-chunk`` iterations): one fit (seed
``1000 * seed`` for MCEM) continued chunk by chunk with ``pr.fit(..., resume=fit)``, so the chunked run is the
uninterrupted one, and every chunk is saved under ``--cache`` with its fit state, so long runs can be continued
by a later process, stopped at any checkpoint and scored at several iteration counts (the tables recorded in
``benchmarks/README.md`` before 2026-12-07 were made with chunks that were fresh fits, seed
``1000 * seed + iterations done``; a cache of that version cannot be continued). ``--stage fit`` only trains, ``score`` only scores what is cached, ``table`` prints.
``--paired`` keeps every row's per-target forecast losses (re-scoring cached rows that lack them) and prints,
under each margin, the paired CRPS and squared-error differences per lead with HAC standard errors
(``pr.forecast_difference``), for the mean over seeds and per seed. ``--select-tail STEPS`` (laser) chooses
among a row's seeds by ``pr.select_by_forecast`` on the last STEPS training steps and reports whether the
chosen fit, and the choice from every pair of seeds, beats AR at every lead.
The tables measured for the README are in ``benchmarks/README.md`` (with the machine and settings).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import xarray as xr
from ppl_rnn.inference import (
    Acceptance,
    AutoMStep,
    ClosedFormMStep,
    ConvergenceRule,
    KalmanEM,
    MonteCarloEM,
    MultiStart,
    NARStart,
    ParticleSmoother,
)
from ppl_rnn.inference.reference import LinearAR
from ppl_rnn.models import ElmanSSM

import ppl_rnn as pr
from ppl_rnn.capabilities import capability
from ppl_rnn.data import Data
from ppl_rnn.workbench import datasets
from ppl_rnn.workbench.evaluate import evaluate

KEM_CHUNK = 50


# ---------------------------------------------------------------------------------------------
# problems


def load_problem(name: str, quick: bool = False):
    """``(train, test, horizons, lead_label)`` as float64 tensors ``(1, T, 1)``."""
    if name == "breathing":
        if quick:
            rec = datasets.load("respiration", window=(730.0, 40.0), train_s=30.0, dtype=torch.float64)
        else:
            rec = datasets.load("respiration", window=datasets.REGULAR_BREATHING_WINDOW,
                                train_s=datasets.REGULAR_BREATHING_TRAIN_S, dtype=torch.float64)
        tr, te = rec.split()
        return tr.values, te.values, (5, 10, 15), lambda k: f"{k * 0.04:.1f} s"
    if name == "laser":
        n_tr, n_te = (300, 100) if quick else (1000, 500)
        rec = datasets.load("santafe-laser", scale="standard", train_steps=n_tr, dtype=torch.float64)
        y = rec.values
        return y[:, :n_tr], y[:, n_tr:n_tr + n_te], tuple(range(1, 11)), lambda k: f"{k}"
    raise ValueError(name)


def breathing_hidden(choice, tr) -> int:
    """The hidden size: an int, or ``"aic"``: the order ``LinearAR(order="aic", max_order=30)`` picks on the
    training part (the AR start then puts that AR fit in companion form)."""
    if str(choice) != "aic":
        return int(choice)
    fit = pr.fit(ElmanSSM(1, 1).double(), tr, method=LinearAR(order="aic", max_order=30))
    return int(fit.diagnostics["order"][0])


def rows_for(problem: str, args) -> list[dict]:
    """The rows of a problem: key, label, kind, hidden size, iteration checkpoints to score."""
    if problem == "breathing":
        H = args.breathing_hidden
        ini = "" if args.kem_init == "model" else f"_{args.kem_init}"
        start = "AR start" if args.kem_init == "ar" else "random start"
        asc = "" if args.ascent_z is None else f"_asc{args.ascent_z:g}"
        asc_label = "" if args.ascent_z is None else f", ascent test z = {args.ascent_z:g}"
        rows = [
            dict(key="ar", label="AR(p by AIC)", kind="ar"),
            dict(key=f"kem{ini}_h{H}", label=f"KalmanEM linear SSM (h{H}, {start})", kind="kem", H=H,
                 its=[args.kem_iterations], init=args.kem_init),
        ]
        if args.breathing_init == "nar":
            M = args.nar_features
            li = "" if args.learn_initial else ", initial state held"
            rows.append(dict(key=f"mcem_nar_h{H}+{M}{asc}{'' if args.learn_initial else '_s0held'}",
                             label=f"MCEM tanh (h{H + M} = {H} lags + {M} features, nonlinear start{asc_label}{li})",
                             kind="mcem_nar", H=H + M, order=H, its=sorted(set(args.mcem_iterations)),
                             gain=args.init_gain))
        else:
            rows.append(dict(key=f"mcem{ini}_h{H}{asc}", label=f"MCEM tanh (h{H}, linear start{asc_label})",
                             kind="mcem_linear", H=H, its=sorted(set(args.mcem_iterations)), base=f"kem{ini}_h{H}",
                             base_it=args.kem_iterations, gain=args.init_gain))
        return rows
    rows = [dict(key="ar", label="AR(p by AIC)", kind="ar"),
            dict(key="kem_h8", label="KalmanEM linear SSM (h8)", kind="kem", H=8, its=[args.laser_kem_iterations])]
    K, M = args.laser_restarts, args.laser_restart_iterations
    rs = "" if K == 1 else f"_r{K}x{M}"
    rs_label = "" if K == 1 else f", best of {K} starts after {M} it"
    rot = args.laser_init == "rotation"
    for H in args.laser_hidden:
        rows.append(dict(key=f"mcem_h{H}{'_rot' if rot else ''}{rs}",
                         label=f"MCEM tanh (h{H}, {'rotation' if rot else 'random'} start{rs_label})", kind="mcem",
                         H=H, its=sorted(set(args.laser_iterations)), restarts=K, restart_iterations=M,
                         weight_init=args.laser_init))
    return rows


# ---------------------------------------------------------------------------------------------
# fitting with checkpoints


def _path(cache: Path, problem: str, key: str, seed: int, it: int | None = None) -> Path:
    return cache / problem / (f"{key}_s{seed}" + ("" if it is None else f"_it{it}") + ".pt")


def _save(path: Path, model, meta: dict, fit=None) -> None:
    """A checkpoint: the model's state, its metadata and (for resuming) the fit without its posterior."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state": model.state_dict(), "meta": meta,
                "fit": None if fit is None else dataclasses.replace(fit, posterior=None)}, path)


def _load(path: Path):
    d = torch.load(path, weights_only=False)
    m = d["meta"]
    model = ElmanSSM(m["H"], 1, activation=m["activation"]).double()
    model.load_state_dict(d["state"])
    return model, m


def _load_fit(path: Path):
    """The FitResult a checkpoint was saved with (None for a start checkpoint); a checkpoint written before the
    fits were resumed holds none, and cannot be continued."""
    d = torch.load(path, weights_only=False)
    if d.get("fit") is None and d["meta"].get("iterations", 0) > 0:
        raise SystemExit(f"{path} holds no fit state to resume (written by an earlier version of this script, which "
                         "chunked fits by hand); use a fresh --cache directory.")
    return d.get("fit")


def _latest(cache, problem, key, seed, upto):
    best = None
    for p in (cache / problem).glob(f"{key}_s{seed}_it*.pt"):
        k = int(p.stem.rsplit("_it", 1)[1])
        if k <= upto and (best is None or k > best[0]):
            best = (k, p)
    return best


def default_proposal() -> str:
    from ppl_rnn.inference.proposals import get_proposal

    from ppl_rnn.errors import ConfigurationError

    try:
        get_proposal("auto")
        return "auto"
    except ConfigurationError:
        return "ekf"


def fit_row(problem, row, seed, y, args, log=print):
    """Train a row to its largest checkpoint: one fit, continued chunk by chunk with ``pr.fit(..., resume=fit)``
    (so a chunked run is the uninterrupted one: SAEM's bank, the particle boost, omega and the RNG carry over),
    every checkpoint saved with its fit so a later process continues it."""
    cache = Path(args.cache)
    kind = row["kind"]
    if kind == "ar":
        return
    target = max(row["its"])
    have = _latest(cache, problem, row["key"], seed, target)
    if have is not None and have[0] >= target:
        return
    if kind == "kem":
        if have is None:
            model, done, fit = ElmanSSM(row["H"], 1, activation="identity", seed=seed).double(), 0, None
        else:
            done, model, fit = have[0], _load(have[1])[0], _load_fit(have[1])
        while done < target:
            t0 = time.perf_counter()
            done = min(done + KEM_CHUNK, target)
            fit = pr.fit(model, y, method=KalmanEM(num_iterations=done, tol=0, init=row.get("init", "model")),
                         seed=seed, resume=fit)  # the AR start only before iteration 1 (a resumed fit skips it)
            _save(_path(cache, problem, row["key"], seed, done), fit.model,
                  dict(H=row["H"], activation="identity", iterations=done, method="KalmanEM"), fit)
            log(f"[{problem}] {row['label']} seed {seed}: {done} iterations ({time.perf_counter() - t0:.0f} s), "
                f"exact log-evidence/step {float(fit.trace['objective'].values[-1]) / y.shape[1]:+.4f}")
        return
    # MCEM
    prop = args.proposal or default_proposal()
    K = row.get("restarts", 1)
    M = row.get("restart_iterations", 10) if K > 1 else 0  # multi-start iterations, counted in the checkpoints
    if have is None:
        if kind == "mcem_linear":
            base = _path(cache, problem, row["base"], seed, row["base_it"])
            if not base.exists():
                raise SystemExit(f"{base} is missing: fit the KalmanEM row first (same --cache).")
            lin, _ = _load(base)
            model = ElmanSSM(row["H"], 1, activation="tanh", seed=seed).double()
            # the linear warm start (LinearStart) from the KalmanEM row's cached fit instead of fitting it twice
            capability(model, "embed_linear")(capability(lin, "linear_gaussian")(), gain=row["gain"])
        elif kind == "mcem_nar":  # the library's nonlinear warm start, applied here so the start is checkpoint 0
            model = ElmanSSM(row["H"], 1, activation="tanh", seed=seed).double()
            NARStart(order=row["order"], gain=row["gain"]).apply(model, Data(y, torch.isfinite(y), None), seed)
        else:
            rot = dict(weight_init="rotation", weight_scale=1.1) if row.get("weight_init") == "rotation" else {}
            model = ElmanSSM(row["H"], 1, activation="tanh", seed=seed, **rot).double()
        done, fit = 0, None
        _save(_path(cache, problem, row["key"], seed, 0), model,
              dict(H=row["H"], activation="tanh", iterations=0, method="start", proposal=prop))
    else:
        done, model, fit = have[0], _load(have[1])[0], _load_fit(have[1])
    if target - M < 1:
        raise SystemExit(f"--laser-restart-iterations {M} must be below the largest of --laser-iterations ({target}).")
    while done < target:
        t0 = time.perf_counter()
        # the first chunk: M iterations per multi-start candidate, then --chunk more; a resumed one: --chunk more
        done = min(target, done + args.chunk + (M if fit is None else 0))
        start = MultiStart(num_starts=K, iterations=M) if K > 1 else None
        method = MonteCarloEM(
            num_iterations=done - M, stopping=ConvergenceRule(tol=0.0), start=start,
            mstep=AutoMStep(closed_form=ClosedFormMStep(learn_initial=args.learn_initial)),
            acceptance=Acceptance(ascent_z=args.ascent_z if problem == "breathing" else None, max_boost=args.max_boost),
            smoother=ParticleSmoother(num_particles=args.num_particles, num_paths=100, backward="mcmc", proposal=prop))
        first = fit is None
        fit = pr.fit(model, y, method=method, seed=1000 * seed, resume=fit)
        if first and K > 1:
            log(f"[{problem}] {row['label']} seed {seed}: restart training log-evidence "
                f"{[round(v, 1) for v in fit.diagnostics['restart_log_evidence']]}, chosen "
                f"{fit.diagnostics['restart_chosen']}")
        meta = dict(H=row["H"], activation="tanh", iterations=done, method="MonteCarloEM", proposal=prop,
                    num_particles=args.num_particles, num_paths=100)
        if fit.state is None:  # stopped (e.g. rejections at the largest boost): its last parameters stand for
            log(f"[{problem}] {row['label']} seed {seed}: stopped ({fit.diagnostics.get('stopped')}) after "
                f"{fit.diagnostics['num_iterations']} iterations; its model stands for the later checkpoints")
            for it in [done] + [i for i in row["its"] if i > done]:  # every later checkpoint
                _save(_path(cache, problem, row["key"], seed, it), fit.model, {**meta, "iterations": it,
                                                                              "stopped": True})
            return
        _save(_path(cache, problem, row["key"], seed, done), fit.model, meta, fit)
        log(f"[{problem}] {row['label']} seed {seed}: {done} iterations ({time.perf_counter() - t0:.0f} s), "
            f"r = {float(fit.model.r.detach()[0]):.4g}"
            + (f", ascent steps kept {int(np.nansum(fit.trace.ascent_kept.values))}/{done - M}"
               if "ascent_kept" in fit.trace else ""))


# ---------------------------------------------------------------------------------------------
# scoring


def _losses_path(score_path: Path) -> Path:
    return score_path.with_name(score_path.name.replace(".score.json", ".losses.nc"))


def _score_model(model, tr, te, hs, args, score_path: Path) -> dict:
    """Score with the yardstick; the per-target losses (for the paired margins) go beside ``score_path``."""
    t0 = time.perf_counter()
    ev = evaluate(model, tr, te, horizons=hs, num_particles=args.eval_particles, max_particles=args.max_particles,
                  num_replicates=8, se_tol=0.01, num_samples=args.samples, seed=0)
    score_path.parent.mkdir(parents=True, exist_ok=True)
    ev[["crps_by_target", "sqerr_by_target"]].to_netcdf(_losses_path(score_path))
    return {"logev": float(ev.heldout_logev_per_step), "se": float(ev.heldout_logev_per_step_se),
            "se_ok": int(ev.se_ok), "min_ess": float(ev.min_ess),
            "particles": int(ev.attrs.get("num_particles", 0)), "evidence": ev.attrs["evidence_method"],
            "rmse": ev.rmse.values.tolist(), "crps": ev.crps.values.tolist(),
            "cov90": ev.coverage_90.values.tolist(), "eval_s": time.perf_counter() - t0}


def score_row(problem, row, seed, tr, te, hs, args, log=print) -> list[tuple[int | None, dict]]:
    """Score every checkpoint of the row (cached in ``*.score.json``)."""
    cache = Path(args.cache)
    out = []
    if row["kind"] == "ar":  # the AR fit and its score do not depend on the seed: one file serves all
        sp = cache / problem / "ar_s0.score.json"
        if sp.exists() and (_losses_path(sp).exists() or not args.paired):
            return [(None, json.loads(sp.read_text()))]
        fit = pr.fit(ElmanSSM(1, 1).double(), tr, method=LinearAR(order="aic", max_order=30))
        s = _score_model(fit.model, tr, te, hs, args, sp)
        s["order"] = int(fit.diagnostics["order"][0])
        sp.write_text(json.dumps(s))
        return [(None, s)]
    for it in row["its"]:
        p = _path(cache, problem, row["key"], seed, it)
        if not p.exists():
            continue
        sp = p.with_suffix(".score.json")
        if sp.exists() and (_losses_path(sp).exists() or not args.paired):
            out.append((it, json.loads(sp.read_text())))
            continue
        model, meta = _load(p)
        s = _score_model(model, tr, te, hs, args, sp)
        s.update({k: meta.get(k) for k in ("proposal", "num_particles")})
        s["r"] = float(model.r.detach()[0])
        sp.write_text(json.dumps(s))
        log(f"[{problem}] scored {p.name}: {s['logev']:+.3f} ± {s['se']:.3f} ({s['eval_s']:.0f} s)")
        out.append((it, s))
    return out


# ---------------------------------------------------------------------------------------------
# the tables


def _fmt_logev(vals, ses):
    m = float(np.mean(vals))
    mc = math.sqrt(sum(s * s for s in ses)) / len(ses)
    if len(vals) > 1:
        spread = float(np.std(vals, ddof=1) / math.sqrt(len(vals)))
        return f"{m:+.3f} ± {mc:.4f} (seeds ± {spread:.3f})"
    return f"{m:+.3f} ± {mc:.4f}"


def table(problem, rows, seeds, hs, lab, args) -> str:
    tr, te, _, _ = load_problem(problem, args.quick)
    res = {}  # (label, it) -> {seed: score}
    loss_files = {}  # the same -> {seed: per-target losses file}
    cache = Path(args.cache)
    for row in rows:
        for s in seeds:
            for it, sc in score_row(problem, row, s, tr, te, hs, args):
                sp = (cache / problem / "ar_s0.score.json" if row["kind"] == "ar"
                      else _path(cache, problem, row["key"], s, it).with_suffix(".score.json"))
                name = row["label"] + ("" if it is None or len(row["its"]) == 1 else f" @{it} it")
                if row["kind"] == "ar":
                    name = f"AR({sc['order']}) by AIC"
                elif len(row["its"]) == 1:
                    name += f" ({it} it)"
                res.setdefault(name, {})[s] = sc
                if _losses_path(sp).exists():
                    loss_files.setdefault(name, {})[s] = _losses_path(sp)
    metric = "crps"
    lines = [f"## {problem}: train {tr.shape[1]} steps, test {te.shape[1]} steps; seeds {list(seeds)}",
             "held-out log-evidence per test step (mean over seeds ± Monte Carlo SE of that mean; seeds ± = "
             "between-seed SE), " + ("CRPS and RMSE" if problem == "breathing" else "CRPS") + " per lead "
             "(mean over seeds; lower is better)", ""]
    head = "| method | seeds | log-ev/step | " + " | ".join(f"CRPS {lab(k)}" for k in hs)
    if problem == "breathing":
        head += " | " + " | ".join(f"RMSE {lab(k)}" for k in hs)
    else:
        head += " | RMSE 1 | RMSE 5 | RMSE 10"
    lines += [head + " |", "|" + "---|" * (head.count("|") - 0)]
    for name, by_seed in res.items():
        sc = list(by_seed.values())
        flag = "" if all(x["se_ok"] for x in sc) else " (SE above tol)"
        cells = [name, ",".join(str(s) for s in by_seed), _fmt_logev([x["logev"] for x in sc], [x["se"] for x in sc])
                 + flag]
        crps = np.mean([x[metric] for x in sc], 0)
        rmse = np.mean([x["rmse"] for x in sc], 0)
        cells += [f"{v:.4f}" for v in crps]
        idx = range(len(hs)) if problem == "breathing" else [0, 4, 9]
        cells += [f"{rmse[i]:.4f}" for i in idx]
        lines.append("| " + " | ".join(cells) + " |")
    # margins: each network row minus each linear row, paired by seed where both have it
    lin = {n: v for n, v in res.items() if n.startswith(("AR(", "KalmanEM"))}
    for ref_name in sorted(lin, key=lambda n: -np.mean([x["logev"] for x in lin[n].values()])):
        lines += ["", f"Margins against {ref_name} (log-ev/step; CRPS per lead, negative = the network is better), "
                      "paired by seed:"]
        for name, by_seed in res.items():
            if name in lin:
                continue
            d = []
            for s, x in by_seed.items():
                ref = lin[ref_name].get(s) or next(iter(lin[ref_name].values()))
                d.append((x["logev"] - ref["logev"], math.hypot(x["se"], ref["se"]),
                          np.array(x["crps"]) - np.array(ref["crps"])))
            m = np.mean([a for a, _, _ in d])
            mc = math.sqrt(sum(b * b for _, b, _ in d)) / len(d)
            spread = np.std([a for a, _, _ in d], ddof=1) / math.sqrt(len(d)) if len(d) > 1 else float("nan")
            dc = np.mean([c for _, _, c in d], 0)
            lines.append(f"- {name}: {m:+.3f} nats/step (MC SE {mc:.4f}, between seeds {spread:.3f}); CRPS "
                         f"{', '.join(f'{v:+.4f}' for v in dc)} "
                         f"({'better' if (dc < 0).all() else 'not better'} at every lead)")
            if name in loss_files and ref_name in loss_files:
                lines += paired_lines(loss_files[name], loss_files[ref_name], hs, lab)
    if problem == "laser" and args.select_tail and len(seeds) > 1:
        ar = next(v for n, v in res.items() if n.startswith("AR("))
        for row in rows:
            if row["kind"] == "mcem":
                lines += selection_lines(problem, row, seeds, tr, hs, args, res, ar)
    return "\n".join(lines)


def selection_lines(problem, row, seeds, tr, hs, args, res, ar) -> list[str]:
    """Choose among the row's seeds by ``pr.select_by_forecast`` on the last ``--select-tail`` training steps
    (mean CRPS over the leads), and say whether the chosen fit beats AR at every lead on the test part; the
    same for every pair of seeds (best of two)."""
    import itertools

    cache = Path(args.cache)
    v = args.select_tail
    it = max(row["its"])
    have = [s for s in seeds if _path(cache, problem, row["key"], s, it).exists()]
    if len(have) < 2:
        return []
    sp = cache / problem / f"{row['key']}_it{it}_seeds{'-'.join(map(str, have))}_tail{v}.select.nc"
    if sp.exists():
        sel = xr.load_dataset(sp)
    else:
        models = {str(s): _load(_path(cache, problem, row["key"], s, it))[0] for s in have}
        sel = pr.select_by_forecast(models, tr, validation_steps=v, horizons=hs, num_particles=args.eval_particles,
                                    max_particles=args.max_particles, num_samples=args.samples)
        sel.to_netcdf(sp)
    name = next(n for n in res if n.startswith(row["label"]) and (len(row["its"]) == 1 or f"@{it} it" in n))
    ar_crps = np.array(next(iter(ar.values()))["crps"])
    beats = {s: bool((np.array(res[name][s]["crps"]) < ar_crps).all()) for s in have}
    tail = {int(c): float(m) for c, m in zip(sel.candidate.values, sel.mean_crps.values, strict=True)}
    best = int(sel.attrs["best"])
    pairs = list(itertools.combinations(have, 2))
    good = sum(beats[min(p, key=tail.get)] for p in pairs)
    return ["", f"Choosing among the seeds of {name} without the test part (`pr.select_by_forecast`, mean CRPS "
                f"over leads 1-{max(hs)} on training steps {tr.shape[1] - v}-{tr.shape[1] - 1}, conditioned on "
                "the steps before):",
            "- training-tail mean CRPS by seed: " + ", ".join(f"{s}: {tail[s]:.4f}" for s in have)
            + "; test-part mean CRPS: " + ", ".join(f"{s}: {np.mean(res[name][s]['crps']):.4f}" for s in have),
            f"- chosen: seed {best}, which {'beats' if beats[best] else 'does not beat'} AR at every lead on the "
            f"test part; best of two (every pair of seeds): {good} of {len(pairs)} pairs choose a fit that beats "
            f"AR at every lead (a random pick: {np.mean([beats[s] for s in have]):.0%})"]


def _mean_losses(files: dict) -> xr.Dataset:
    """The per-target losses averaged over the seeds' fits (the seed-averaged model's forecast losses)."""
    dss = [xr.load_dataset(f) for f in files.values()]
    return sum(dss[1:], dss[0]) / len(dss)


def paired_lines(net: dict, ref: dict, hs, lab) -> list[str]:
    """Paired CRPS and squared-error margins per lead with HAC standard errors (``pr.forecast_difference``):
    the mean over the network's seeds, and each seed alone (against the reference at the same seed, or its
    only fit)."""
    out = []
    cases = [("mean of seeds " + ",".join(map(str, net)), _mean_losses(net),
              _mean_losses({s: ref[s] for s in net if s in ref} or ref))]
    if len(net) > 1:
        for s, f in net.items():
            cases.append((f"seed {s}", xr.load_dataset(f), xr.load_dataset(ref.get(s, next(iter(ref.values()))))))
    for label, a, b in cases:
        parts = []
        for metric in ("crps", "sqerr"):
            r = pr.forecast_difference(a, b, metric=metric)
            worse = [lab(int(h)) for h, lo in zip(r.horizon.values, r.ci95_low.values, strict=True) if lo > 0]
            cells = ", ".join(f"{d:+.4f}±{e:.4f}" for d, e in zip(r.difference.values, r.difference_se.values,
                                                                   strict=True))
            parts.append(f"{'CRPS' if metric == 'crps' else 'MSE'} {cells}"
                         + (f" (significantly worse at {', '.join(worse)})" if worse else
                            " (nowhere significantly worse)"))
        out.append(f"    - paired, {label}: " + "; ".join(parts))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--problem", choices=["breathing", "laser", "all"], default="all")
    p.add_argument("--stage", choices=["fit", "score", "table", "all"], default="all")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--laser-seeds", type=int, nargs="+", default=[0])
    p.add_argument("--cache", default="/tmp/ppl_rnn_real_tables")
    p.add_argument("--quick", action="store_true", help="tiny settings (a smoke run)")
    p.add_argument("--breathing-hidden", default="aic",
                   help="breathing: hidden size of the linear SSM and the network (an int, or 'aic': the AR order "
                        "AIC picks on the training part)")
    p.add_argument("--kem-init", choices=["ar", "model"], default="ar",
                   help="breathing: KalmanEM begins at AR fits in companion form ('ar') or at the random model")
    p.add_argument("--init-gain", type=float, default=0.01,
                   help="breathing: the embedding gain of the linear warm start (embed_linear)")
    p.add_argument("--kem-iterations", type=int, default=25)
    p.add_argument("--breathing-init", choices=["linear", "nar"], default="linear",
                   help="breathing network's start: the KalmanEM fit embedded (linear) or a least-squares "
                        "autoregression on random tanh features embedded (nar: hidden = AIC order + --nar-features)")
    p.add_argument("--nar-features", type=int, default=20, help="breathing, --breathing-init nar: tanh features")
    p.add_argument("--hold-initial", dest="learn_initial", action="store_false",
                   help="MCEM: hold the initial-state parameters (learn_initial=False)")
    p.add_argument("--mcem-iterations", type=int, nargs="+", default=[10, 30, 50, 100])
    p.add_argument("--laser-hidden", type=int, nargs="+", default=[8, 16])
    p.add_argument("--laser-iterations", type=int, nargs="+", default=[60, 120, 260])
    p.add_argument("--laser-kem-iterations", type=int, default=200)
    p.add_argument("--chunk", type=int, default=5, help="breathing: MCEM iterations per saved checkpoint")
    p.add_argument("--max-boost", type=int, default=8,
                   help="Acceptance(max_boost=...): the largest factor rejections may multiply particles and paths by")
    p.add_argument("--ascent-z", type=float, default=None,
                   help="breathing: Acceptance(ascent_z=...) for the network row (the ascent test; its paths "
                        "double after each refused step within a chunk)")
    p.add_argument("--num-particles", type=int, default=300, help="breathing: particles of MCEM's E-step smoother")
    p.add_argument("--laser-chunk", type=int, default=20, help="laser: MCEM iterations per saved checkpoint")
    p.add_argument("--laser-init", choices=["gaussian", "rotation"], default="gaussian",
                   help="laser: the network's random start (ElmanSSM(weight_init=...); rotation: gain 1.1)")
    p.add_argument("--laser-restarts", type=int, default=1,
                   help="laser: MultiStart(num_starts=...) in the first chunk (multi-start; 1 = off)")
    p.add_argument("--laser-restart-iterations", type=int, default=10,
                   help="laser: iterations per restart candidate; the first checkpoint is this plus --laser-chunk")
    p.add_argument("--laser-num-particles", type=int, default=500, help="laser: particles of MCEM's E-step")
    p.add_argument("--proposal", default=None, help="E-step proposal (default: 'auto' where registered, else 'ekf')")
    p.add_argument("--eval-particles", type=int, default=500)
    p.add_argument("--max-particles", type=int, default=16000)
    p.add_argument("--samples", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--select-tail", type=int, default=0,
                   help="laser: also choose among the seeds by pr.select_by_forecast on this many last training "
                        "steps (0: off)")
    p.add_argument("--paired", action="store_true",
                   help="re-score cached rows that lack per-target losses, so the table prints paired margins "
                        "(mean difference per lead ± HAC SE, pr.forecast_difference)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.kem_iterations, args.mcem_iterations, args.laser_kem_iterations = 4, [0, 2], 4
        args.laser_iterations, args.laser_hidden, args.chunk = [2], [4], 2
        args.num_particles, args.eval_particles, args.max_particles, args.samples = 100, 100, 200, 30
        args.laser_chunk, args.laser_num_particles = 2, 100
    problems = ["breathing", "laser"] if args.problem == "all" else [args.problem]
    for prob in problems:
        tr, te, hs, lab = load_problem(prob, args.quick)
        if prob == "breathing":
            args.breathing_hidden = breathing_hidden(args.breathing_hidden, tr)
        seeds = args.seeds if prob == "breathing" else args.laser_seeds
        rows = rows_for(prob, args)
        if args.stage in ("fit", "all"):
            a = args if prob == "breathing" else argparse.Namespace(
                **{**vars(args), "chunk": args.laser_chunk, "num_particles": args.laser_num_particles})
            for s in seeds:
                for row in rows:
                    fit_row(prob, row, s, tr, a)
        if args.stage in ("score", "all"):
            for s in seeds:
                for row in rows:
                    score_row(prob, row, s, tr, te, hs, args)
        if args.stage in ("table", "all", "score"):
            print(table(prob, rows, seeds, hs, lab, args), flush=True)


if __name__ == "__main__":
    main()
