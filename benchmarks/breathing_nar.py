"""Is there nonlinear structure in the breathing trace for a network to find? A least-squares check.

    .venv/bin/python benchmarks/breathing_nar.py

Data and split as ``real_tables.py --problem breathing`` (the regular-breathing window, 3000 training and 1500
test steps at 25 Hz, robust-scaled on the training part). Each row is a nonlinear autoregression

.. math::  y_t = w^\\top \\phi(y_{t-1},\\dots,y_{t-27}) + e_t,\\quad e_t\\sim N(0,\\sigma^2),

fitted by least squares on the training part (:math:`\\sigma^2` = the training residual variance), with
:math:`\\phi` = the 27 lags (AR(27), the AIC order) plus the products :math:`y_{t-i}y_{t-j}` of the last
``q`` lags (and their cubes). Printed: the held-out one-step Gaussian log-likelihood per step, the one-step
RMSE, and the RMSE of iterated 5/10/15-step forecasts (the mean of 100 simulated paths, every third origin;
"diverges" where a simulated path of the polynomial recursion blew up).
The last rows replace the products by ``M`` random ``tanh`` features of the 27 lags,
:math:`V\tanh(Px+\beta)`, drawn and fitted by :func:`ppl_rnn.inference.nar_start.fit_nar` (the regression of
the nonlinear warm start, ``NARStart`` of ``MonteCarloEM(start=NARStart())``; seeds 0-2 draw the feature map): bounded features, so
the iterated recursion cannot blow up.
This is not one of the library's models (it is not a state-space model and has no yardstick row); it says how
much a nonlinear one-step predictor gains on this signal, i.e. what a network trained by MCEM could find.
"""

from __future__ import annotations

import numpy as np
import torch
from ppl_rnn.inference.nar_start import fit_nar

from ppl_rnn.data import Data
from ppl_rnn.workbench import datasets

P = 27  # the AIC order on the training part


def features(lags: np.ndarray, q: int, cubes: bool) -> np.ndarray:
    """``(n, P)`` lag rows -> ``(n, F)`` features: 1, the lags, products of the first ``q`` lags, cubes."""
    cols = [np.ones((lags.shape[0], 1)), lags]
    a = lags[:, :q]
    if q:
        cols.append(np.stack([a[:, i] * a[:, j] for i in range(q) for j in range(i, q)], 1))
    if cubes:
        cols.append(a ** 3)
    return np.concatenate(cols, 1)


def lag_matrix(y: np.ndarray, times: np.ndarray) -> np.ndarray:
    return np.stack([y[t - P:t][::-1] for t in times])


def score_row(name, n_features, predict, s2, y, T1, hs, rng) -> str:
    """One table row: held-out one-step Gaussian log-likelihood (variance ``s2``), one-step RMSE and the RMSE
    of iterated forecasts (the mean of 100 simulated paths, every third origin); ``predict``: lag rows -> means."""
    e = y[T1:] - predict(lag_matrix(y, np.arange(T1, len(y))))
    ll = float(np.mean(-0.5 * np.log(2 * np.pi * s2) - 0.5 * e ** 2 / s2))
    errs = {k: [] for k in hs}
    for o in range(T1 - 1, len(y) - 1 - max(hs), 3):  # origins in the test part
        hist = np.tile(y[o - P + 1:o + 1], (100, 1))
        for k in range(1, max(hs) + 1):
            nxt = predict(hist[:, ::-1][:, :P]) + rng.normal(0, np.sqrt(s2), 100)
            hist = np.concatenate([hist[:, 1:], nxt[:, None]], 1)
            if k in hs:
                errs[k].append(nxt.mean() - y[o + k])
    rmse = [float(np.sqrt(np.mean(np.square(errs[k])))) for k in hs]
    return (f"| {name} | {n_features} | {ll:+.4f} | {np.sqrt(np.mean(e ** 2)):.5f} | "
            + " | ".join(f"{v:.4f}" if v < 10 else "diverges" for v in rmse) + " |")


def main() -> None:
    torch.set_num_threads(1)
    # the split of real_tables.py --problem breathing (the regular-breathing window), leads 0.2/0.4/0.6 s
    rec = datasets.load("respiration", window=datasets.REGULAR_BREATHING_WINDOW,
                        train_s=datasets.REGULAR_BREATHING_TRAIN_S, dtype=torch.float64)
    tr, te = (part.values for part in rec.split())
    hs = (5, 10, 15)
    ytr, yte = tr[0, :, 0].numpy(), te[0, :, 0].numpy()
    y, T1 = np.concatenate([ytr, yte]), len(ytr)
    rng = np.random.default_rng(0)
    print("| predictor | features | held-out log-lik/step | 1-step RMSE | " + " | ".join(
        f"RMSE {k * 0.04:.1f} s" for k in hs) + " |")
    print("|---|---|---|---|" + "---|" * len(hs))
    for q, cubes in ((0, False), (3, False), (5, False), (5, True), (8, False)):
        X = features(lag_matrix(y, np.arange(P, T1)), q, cubes)
        w = np.linalg.lstsq(X, y[P:T1], rcond=None)[0]
        s2 = float(np.var(y[P:T1] - X @ w))
        name = "AR(27)" if q == 0 else f"AR(27) + products of {q} lags" + (" + cubes" if cubes else "")
        print(score_row(name, X.shape[1], lambda L, q=q, cubes=cubes, w=w: features(L, q, cubes) @ w, s2, y, T1,
                        hs, rng), flush=True)
    # random tanh features of the lags (the nonlinear warm start's regression, NARStart)
    data = Data(tr, torch.isfinite(tr), None)
    for M in (10, 20, 50):
        for seed in (0, 1, 2):
            prm = fit_nar(data, P, M, seed=seed)
            c, A, Pm, b, V = (prm.c.numpy(), prm.A.numpy()[0], prm.P.numpy(), prm.beta.numpy(), prm.V.numpy()[0])
            print(score_row(f"AR(27) + {M} random tanh features, seed {seed}", 1 + P + M,
                            lambda L, c=c, A=A, Pm=Pm, b=b, V=V: c[0] + L @ A + np.tanh(L @ Pm.T + b) @ V,
                            float(prm.sigma[0]) ** 2, y, T1, hs, rng), flush=True)


if __name__ == "__main__":
    main()
