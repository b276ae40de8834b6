r"""Markdown reports and plain-text tables of a comparison (:func:`ppl_rnn.compare` Dataset).

:func:`comparison_table` (markdown) and :func:`text_table` (terminal) show one row per method: the common
yardstick first (held-out log-evidence per step, forecast RMSE/CRPS per horizon, interval coverage), then
wall time and the method's own objective with its ``evidence_kind`` (never mixed with the yardstick).
:func:`verdict` names the winner on the yardstick, with the margins that support it, and
:func:`against_references` (part of the verdict) says in one sentence whether it beats the best reference row
(persistence, AR, ...) and by how much (± the yardstick's Monte Carlo SE; paired CRPS per lead).

Every log-evidence is printed as ``mean ± SE``: the mean over the seeds that finished and the Monte Carlo
standard error of that mean, :math:`\sqrt{\sum_s \mathrm{SE}_s^2}/n` (each seed's yardstick SE from
:func:`ppl_rnn.workbench.evaluate.evaluate`; 0 for exact Kalman). The spread over seeds (run-to-run
variability of the *training*) is its own column. A row whose seeds did not all finish says so
(``seeds ok`` = finished/total, and the mean is over the finished ones only); a cell whose yardstick SE
stayed above its tolerance at the particle cap is marked ``†``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ppl_rnn.errors import ConfigurationError, DataError

from .compare import flatten_models
from .paired import grid_difference

__all__ = ["summarise", "comparison_table", "text_table", "verdict", "against_references", "logev_margin", "write_report"]

#: why a method behaves as it does (used in verdicts); keyed by a lower-case substring of the label or class
WHY = {
    "mcem": "its E-step is a particle smoother, which represents the non-Gaussian posterior of the tanh network "
            "without linearising, so the M-step fits process and observation noise to what the data support",
    "mean": "its mean-field E-step propagates only posterior means through tanh (the variance of h_t is ignored "
            "inside the nonlinearity), an approximation that is good when the posterior is narrow",
    "svi": "SVI maximises an ELBO whose gap depends on the guide; a structured guide tracks the smoothing "
           "posterior better than a factorised one",
    "ekf": "the EKF linearises tanh around the current mean: accurate when the posterior is narrow relative "
           "to the curvature, biased when it is not",
    "bptt": "BPTT trains deterministic dynamics (process noise fixed near zero): the filter cannot correct the "
            "hidden state when the signal's phase drifts, so the whole mismatch must be explained as observation noise",
    "persistence": "persistence only repeats the last value",
    "ar": "a linear AR model captures the series' second-order (autocorrelation) structure but not a nonlinearity",
    "true": "the generating network itself: the ceiling any fitted model can approach",
}


def _why(name: str) -> str:
    n = name.lower().replace("-", "").replace("_", "").replace(" ", "")
    for key in ("true", "mcem", "bptt", "persistence", "ekf", "svi", "mean", "ar"):
        if key in n:
            return WHY[key]
    return ""


def summarise(ds) -> list[dict]:
    """One dict per method: means over the seeds that finished (``n_ok`` of ``n_seeds``; ``n_failed``), the
    Monte Carlo SE of the mean log-evidence (``heldout_logev_per_step_se``), standard deviations over seeds
    (``*_sd``), and ``se_flagged`` (cells whose yardstick SE stayed above tolerance)."""
    ds = flatten_models(ds)
    rows = []
    hs = [int(h) for h in ds["horizon"].values]
    for i, m in enumerate(ds["method"].values):
        err = [str(e) for e in ds["error"].values[i] if str(e)]
        n_seeds = int(ds["error"].values[i].size)
        r = {"method": str(m), "errors": err, "n_ok": n_seeds - len(err), "n_failed": len(err), "n_seeds": n_seeds}
        for k in ("heldout_logev_per_step", "wall_time_s", "own_objective"):
            v = np.asarray(ds[k].values[i], dtype=float)
            v = v[np.isfinite(v)]
            r[k] = float(v.mean()) if v.size else float("nan")
            r[k + "_sd"] = float(v.std(ddof=1)) if v.size > 1 else float("nan")
        ok = np.array([not str(e) for e in ds["error"].values[i]])
        if "heldout_logev_per_step_se" in ds and ok.any():
            se = np.asarray(ds["heldout_logev_per_step_se"].values[i], dtype=float)[ok]
            r["heldout_logev_per_step_se"] = float(np.sqrt(np.sum(se ** 2)) / se.size)
        else:
            r["heldout_logev_per_step_se"] = float("nan")
        flags = np.asarray(ds["se_ok"].values[i], dtype=float)[ok] if "se_ok" in ds else np.ones(0)
        r["se_flagged"] = int(np.sum(flags == 0))
        for k in ("rmse", "crps", "coverage_50", "coverage_90"):
            for j, h in enumerate(hs):
                v = np.asarray(ds[k].values[i, :, j], dtype=float)
                v = v[np.isfinite(v)]
                r[f"{k}@{h}"] = float(v.mean()) if v.size else float("nan")
        r["own_evidence_kind"] = str(ds["own_evidence_kind"].values[i])
        rows.append(r)
    return rows


def _f(x, nd=3, sd=None):
    if x is None or not np.isfinite(x):
        return "—"
    s = f"{x:.{nd}f}"
    if sd is not None and np.isfinite(sd):
        s += f" ± {sd:.{nd}f}"
    return s


def _logev(r) -> str:
    """``mean ± SE`` of the held-out log-evidence per step, ``†`` if a cell's SE stayed above tolerance."""
    se = r["heldout_logev_per_step_se"]
    nd = 3 if not np.isfinite(se) or se == 0 or se >= 5e-4 else 4
    return _f(r["heldout_logev_per_step"], nd, se) + (" †" if r["se_flagged"] else "")


def _is_ref(name: str, reference: Sequence[str]) -> bool:
    """A reference row: its label, or (several models) its method part after ``" / "``, is in ``reference``."""
    return name in reference or name.rpartition(" / ")[2] in reference


def _columns(ds, steps_label=None):
    hs = [int(h) for h in ds["horizon"].values]
    lab = (lambda h: steps_label(h)) if steps_label else (lambda h: f"{h}-step")
    cols = [("held-out log-ev/step ± SE", _logev),
            ("sd over seeds", lambda r: _f(r["heldout_logev_per_step_sd"])),
            ("seeds ok", lambda r: f"{r['n_ok']}/{r['n_seeds']}")]
    for h in hs:
        cols.append((f"CRPS {lab(h)}", lambda r, h=h: _f(r[f"crps@{h}"])))
    for h in hs:
        cols.append((f"RMSE {lab(h)}", lambda r, h=h: _f(r[f"rmse@{h}"])))
    h0 = hs[0]
    cols.append((f"cov50/90 {lab(h0)}", lambda r: f"{_f(r[f'coverage_50@{h0}'], 2)}/{_f(r[f'coverage_90@{h0}'], 2)}"))
    cols.append(("fit time (s)", lambda r: _f(r["wall_time_s"], 1)))
    cols.append(("own objective (kind)", lambda r: f"{_f(r['own_objective'], 1)} ({r['own_evidence_kind'] or '—'})"))
    return cols


def _footnotes(rows) -> str:
    notes = []
    if any(0 < r["n_failed"] < r["n_seeds"] for r in rows):
        notes.append("seeds ok < total: the row's means are over the finished seeds only (failures listed below "
                     "the table)")
    if any(r["se_flagged"] for r in rows):
        notes.append("† the yardstick's standard error stayed above its tolerance at the particle cap in "
                     "at least one seed")
    return "; ".join(notes)


def comparison_table(ds, *, reference: Sequence[str] = (), steps_label=None) -> str:
    """Markdown table, methods sorted by held-out log-evidence (best first); reference rows marked *."""
    rows = sorted(summarise(ds), key=lambda r: -r["heldout_logev_per_step"] if np.isfinite(
        r["heldout_logev_per_step"]) else np.inf)
    cols = _columns(ds, steps_label)
    out = ["| method | " + " | ".join(c for c, _ in cols) + " |", "|---|" + "---|" * len(cols)]
    for r in rows:
        name = r["method"] + (" *" if _is_ref(r["method"], reference) else "")
        if r["n_ok"] == 0:
            out.append(f"| {name} | failed: {r['errors'][0][:80]} |" + " |" * (len(cols) - 1))
            continue
        out.append(f"| {name} | " + " | ".join(fn(r) for _, fn in cols) + " |")
    notes = _footnotes(rows)
    return "\n".join(out) + (f"\n\n{notes}." if notes else "")


def text_table(ds, *, reference: Sequence[str] = (), steps_label=None) -> str:
    """The same table as fixed-width text for the terminal."""
    rows = sorted(summarise(ds), key=lambda r: -r["heldout_logev_per_step"] if np.isfinite(
        r["heldout_logev_per_step"]) else np.inf)
    cols = _columns(ds, steps_label)[:-1]
    header = ["method"] + [c for c, _ in cols]
    body = []
    for r in rows:
        name = r["method"] + (" *" if _is_ref(r["method"], reference) else "")
        if r["n_ok"] == 0:
            body.append([name, "FAILED: " + r["errors"][0][:60]] + [""] * (len(cols) - 1))
        else:
            body.append([name] + [fn(r) for _, fn in cols])
    widths = [max(len(str(x[i])) for x in [header] + body) for i in range(len(header))]
    line = lambda xs: "  ".join(str(x).ljust(w) for x, w in zip(xs, widths, strict=True))  # noqa: E731
    notes = _footnotes(rows)
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(b) for b in body]) + (
        f"\n({notes})" if notes else "")


def verdict(ds, *, reference: Sequence[str] = (), steps_label=None) -> str:
    """Plain-language verdict: the winner on held-out log-evidence, its margins, the CRPS winner at the
    longest horizon, and the reasons (from what each method does)."""
    rows = [r for r in summarise(ds) if r["n_ok"] > 0 and np.isfinite(r["heldout_logev_per_step"])]
    cands = [r for r in rows if not _is_ref(r["method"], reference)]
    refs = [r for r in rows if _is_ref(r["method"], reference)]
    failed = [r for r in summarise(ds) if r["errors"]]
    if not cands:
        return "No trained method finished; see the errors in the table."
    hs = [int(h) for h in ds["horizon"].values]
    hl = hs[-1]
    lab = steps_label(hl) if steps_label else f"{hl}-step"
    cands.sort(key=lambda r: -r["heldout_logev_per_step"])
    w = cands[0]
    head = f"**Winner: {w['method']}**, with" if len(cands) > 1 else f"**{w['method']}** (the one trained row) has"
    parts = [f"{head} a held-out log-evidence of {_logev(w)} nats per step"]
    if w["n_failed"]:
        parts.append(f" (mean over the {w['n_ok']} of {w['n_seeds']} seeds that finished; {w['n_failed']} failed)")
    if len(cands) > 1:
        r2 = cands[1]
        gap = w["heldout_logev_per_step"] - r2["heldout_logev_per_step"]
        sd = max(w["heldout_logev_per_step_sd"] if np.isfinite(w["heldout_logev_per_step_sd"]) else 0,
                 r2["heldout_logev_per_step_sd"] if np.isfinite(r2["heldout_logev_per_step_sd"]) else 0)
        se = float(np.hypot(*(x if np.isfinite(x) else 0.0 for x in (w["heldout_logev_per_step_se"],
                                                                    r2["heldout_logev_per_step_se"]))))
        if gap <= 2 * se:
            clear = "a margin within the Monte Carlo error of the yardstick"
        else:
            clear = "a clear margin" if (sd == 0 or gap > 2 * sd) else "a margin within the spread over seeds"
        parts.append(f", {gap:.3f} nats/step ahead of {r2['method']} ({clear})")
    parts.append(". ")
    best_crps = min(cands + refs, key=lambda r: r[f"crps@{hl}"] if np.isfinite(r[f"crps@{hl}"]) else np.inf)
    if best_crps["method"] == w["method"]:
        parts.append(f"It also has the lowest CRPS on {lab} forecasts ({w[f'crps@{hl}']:.3f}). ")
    else:
        parts.append(f"On {lab} forecasts the lowest CRPS is {best_crps['method']}'s ({best_crps[f'crps@{hl}']:.3f}"
                     f"; {w['method']}: {w[f'crps@{hl}']:.3f}")
        parts.append(_paired_words(ds, w["method"], best_crps["method"], hl) + "). ")
    for r in refs:
        d = w["heldout_logev_per_step"] - r["heldout_logev_per_step"]
        rel = "above" if d > 0 else "below"
        parts.append(f"Reference {r['method']}: {_logev(r)} nats/step "
                     f"({w['method']} is {abs(d):.3f} {rel}). ")
    versus = against_references(ds, w["method"], reference=reference, steps_label=steps_label)
    if versus:
        parts.append(f"\n\n{versus}")
    better_refs = [r for r in refs if r["heldout_logev_per_step"] > w["heldout_logev_per_step"]
                   and "true" not in r["method"].lower()]
    if better_refs and versus:
        parts.append(" With this compute budget and model size the networks have not learned more than the "
                     "reference's linear structure.")
    elif better_refs:
        b = max(better_refs, key=lambda r: r["heldout_logev_per_step"])
        parts.append(f"\n\n**No trained network beats the {b['method']} reference here** "
                     f"({b['heldout_logev_per_step'] - w['heldout_logev_per_step']:.3f} nats/step better than "
                     f"{w['method']}; {lab} CRPS {b[f'crps@{hl}']:.3f}): with this compute budget and model size the "
                     "networks have not learned more than the reference's linear structure. ")
    why = _why(w["method"])
    if why and (len(cands) > 1 or not better_refs):  # one trained row that loses to a reference "wins" nothing
        parts.append(f"\n\nWhy {w['method']} wins: {why}.")
    worst = cands[-1] if len(cands) > 1 else None
    if worst is not None and _why(worst["method"]):
        parts.append(f" Last among the trained methods, {worst['method']}: {_why(worst['method'])}.")
    if failed:
        parts.append("\n\nFailed cells: " + "; ".join(f"{r['method']} ({r['errors'][0][:120]})" for r in failed) + ".")
    return "".join(parts)


def logev_margin(a: dict, b: dict) -> tuple[float, float]:
    r""":math:`(\ell_a - \ell_b,\ \sqrt{SE_a^2 + SE_b^2})`: the held-out log-evidence per step of summary row
    ``a`` minus row ``b`` (rows of :func:`summarise`) and its standard error (runs independent; a NaN SE, e.g.
    of an exact row, counts as 0)."""
    d = a["heldout_logev_per_step"] - b["heldout_logev_per_step"]
    se = float(np.hypot(*(x if np.isfinite(x) else 0.0 for x in (a["heldout_logev_per_step_se"],
                                                                b["heldout_logev_per_step_se"]))))
    return d, se


def against_references(ds, method: str, *, reference: Sequence[str] = (), steps_label=None) -> str:
    """One sentence: does ``method`` beat the best reference row (by held-out log-evidence; rows whose label
    contains "true", the generating model, are a ceiling, not a reference), and by how much.

    The margin is :math:`\\Delta = \\ell_{method} - \\ell_{ref}` nats/step with the Monte Carlo SE
    :math:`\\sqrt{SE_{method}^2 + SE_{ref}^2}` of the two yardstick estimates (an exact reference row has SE 0);
    it counts as a win or a loss only beyond 2 SE. Then the paired CRPS difference per lead (``method`` minus
    the reference, HAC SE over the test targets, :func:`ppl_rnn.workbench.paired.grid_difference`) where the
    grid keeps per-target losses, and which of the two forecasts better at every lead, if one does. ''
    without a finished reference row."""
    rows = {r["method"]: r for r in summarise(ds) if r["n_ok"] > 0 and np.isfinite(r["heldout_logev_per_step"])}
    refs = [r for n, r in rows.items() if _is_ref(n, reference) and "true" not in n.lower() and n != method]
    if method not in rows or not refs:
        return ""
    w = rows[method]
    b = max(refs, key=lambda r: r["heldout_logev_per_step"])
    d, se = logev_margin(w, b)
    if d > 2 * se:
        word = f"**{method} beats the best reference, {b['method']}**, by {d:.3f} ± {se:.3f} nats/step held out"
    elif d < -2 * se:
        word = (f"**{method} does not beat the best reference, {b['method']}**: it scores {-d:.3f} ± {se:.3f} "
                "nats/step below it held out")
    else:
        word = (f"**{method} ties with the best reference, {b['method']}**: {d:+.3f} ± {se:.3f} nats/step held "
                "out, within the Monte Carlo error")
    text = (f"{word} ({method} {_logev(w)}, {b['method']} {_logev(b)} nats/step; ± the yardstick's Monte Carlo SE)")
    hs = [int(h) for h in ds["horizon"].values]
    lab = steps_label or (lambda h: f"{h}-step")
    try:
        diff = grid_difference(ds, method, b["method"], horizons=hs)
    except (DataError, ConfigurationError):
        return text + "."
    dv, sv = np.asarray(diff.difference, float), np.asarray(diff.difference_se, float)
    lo, hi = np.asarray(diff.ci95_low, float), np.asarray(diff.ci95_high, float)
    leads = ", ".join(f"{lab(h)} {x:+.4f} ± {e:.4f}" for h, x, e in zip(hs, dv, sv, strict=True))
    if (hi < 0).all():
        who = f"{method} forecasts better at every lead"
    elif (lo > 0).all():
        who = f"{b['method']} forecasts better at every lead"
    elif (dv < 0).all():
        who = f"{method}'s CRPS is lower at every lead, not significantly at all of them"
    elif (dv > 0).all():
        who = f"{b['method']}'s CRPS is lower at every lead, not significantly at all of them"
    else:
        who = "neither forecasts better at every lead"
    return text + f"; paired CRPS, {method} minus {b['method']}: {leads} (HAC SE): {who}."


def _paired_words(ds, a: str, b: str, h: int) -> str:
    """'; paired over the test targets, a - b: d ± se (HAC), ...' at lead ``h``, or '' (same row, or the grid
    keeps no per-target losses)."""
    if a == b:
        return ""
    try:
        d = grid_difference(ds, a, b, horizons=[h])
    except (DataError, ConfigurationError):
        return ""
    diff, se = float(d.difference[0]), float(d.difference_se[0])
    if d.ci95_high[0] < 0 or d.ci95_low[0] > 0:
        word = "a significant difference"
    else:
        word = "within the noise of this test set"
    return f"; paired over the test targets, {a} minus {b}: {diff:+.4f} ± {se:.4f} (HAC SE), {word}"


def write_report(path, *, title: str, sections: Sequence[dict], preamble: str = "") -> None:
    """Write a markdown report. ``sections``: dicts with ``heading``, ``text`` (markdown) and ``figures``
    (list of ``(caption, relative_png_path)``)."""
    lines = [f"# {title}", ""]
    if preamble:
        lines += [preamble, ""]
    for s in sections:
        lines += [f"## {s['heading']}", ""]
        if s.get("text"):
            lines += [s["text"], ""]
        for cap, fig in s.get("figures", []):
            lines += [f"![{cap}]({fig})", "", f"*{cap}*", ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))
