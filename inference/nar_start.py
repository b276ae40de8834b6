r"""The nonlinear warm start: a least-squares autoregression on random ``tanh`` features of the lags.

Smooth, densely sampled signals (breathing) are fitted well by linear models one step ahead, and the
network's linear warm start (``LinearStart``, :mod:`~ppl_rnn.inference.starts`) inherits that: it forecasts like the linear
model it embeds. Their nonlinearity shows over several steps — the shape of a breathing cycle — and Monte
Carlo EM, whose E-step noise near a noise-free optimum outweighs a weak nonlinear signal, does not find it
from the linear regime (measured on the shipped breathing window: ``benchmarks/README.md``). A nonlinear
autoregression finds it by least squares, as random-feature regression ("extreme learning machine"):

.. math::
    y_t = c + A x_{t-1} + V \tanh(P x_{t-1} + \beta) + e_t,\qquad x_{t-1} = (y_{t-1},\dots,y_{t-p}),
    \qquad e_t\sim N(0, \operatorname{diag}\sigma^2)

with the feature map drawn once, :math:`P_{mj}\sim N\big(0, s^2/(pD\,\overline{y_j^2})\big)` (so each
feature's pre-activation has standard deviation about :math:`s` = ``feature_scale`` over the training data;
:math:`\overline{y_j^2}` the mean square of output :math:`j`), :math:`\beta_m\sim N(0, 0.5^2)`, and
:math:`(c, A, V)` the ridge regression of :math:`y_t` on :math:`(1, x_{t-1}, \tanh(Px_{t-1}+\beta))` with
penalty :math:`\lambda = \text{ridge}\cdot n` (:math:`n` complete rows; the intercept unpenalised);
:math:`\sigma^2` is the residual variance per output. Rows whose window has a missing value are dropped;
sequences are stacked. The model's ``embed_nar`` capability (``ElmanSSM.embed_nar``) turns this into a
network with :math:`pD + M` units that behaves the same, and Monte Carlo EM refines it from there.
"""

from __future__ import annotations

import numpy as np
import torch

from ppl_rnn.data import Data
from ppl_rnn.errors import ConfigurationError, DataError
from ppl_rnn.model import NARParams


def nar_design(data: Data, order: int) -> tuple[np.ndarray, np.ndarray]:
    """Lagged rows over all sequences: ``X`` ``(n, pD)`` (lag-major: columns ``kD..kD+D-1`` hold
    :math:`y_{t-1-k}`) and ``Y`` ``(n, D)``, keeping rows whose target and lags are all observed."""
    y = data.observations.detach().to(torch.float64).cpu().numpy()
    m = data.mask.detach().cpu().numpy().astype(bool)
    B, T, D = y.shape
    p = int(order)
    if T <= p:
        raise DataError(f"the training series has {T} steps; a nonlinear autoregression of order {p} needs more.")
    Xs, Ys = [], []
    for b in range(B):
        lags = np.concatenate([y[b, p - k - 1:T - k - 1] for k in range(p)], 1)  # (T-p, pD)
        ok = m[b, p:].all(1) & np.stack([m[b, p - k - 1:T - k - 1].all(1) for k in range(p)], 1).all(1)
        Xs.append(lags[ok])
        Ys.append(y[b, p:][ok])
    return np.concatenate(Xs), np.concatenate(Ys)


def fit_nar(data: Data, order: int, num_features: int, *, ridge: float = 1e-7, feature_scale: float = 1.0,
            seed: int = 0, dtype: torch.dtype = torch.float64) -> NARParams:
    """Least-squares nonlinear autoregression of ``order`` lags and ``num_features`` random ``tanh`` features
    on ``data`` (module docstring). ``seed`` draws the feature map. Raises :class:`DataError` when the data
    have too few complete rows for the regression."""
    p, M = int(order), int(num_features)
    if p < 1 or M < 1:
        raise ConfigurationError(f"order and num_features must be >= 1; found {order!r} and {num_features!r}.")
    X, Y = nar_design(data, p)
    n, D = Y.shape
    k = 1 + p * D + M
    if n < 2 * k:
        raise DataError(
            f"only {n} complete lagged rows in the training data; a nonlinear autoregression of order {p} with "
            f"{M} features ({k} coefficients per output) needs at least {2 * k}. Use fewer lags or features "
            "(a smaller model), or more training data.")
    rng = np.random.default_rng(seed)
    ms = np.maximum(np.tile((Y ** 2).mean(0), p), 1e-12)  # mean square per lag column
    P = rng.standard_normal((M, p * D)) * feature_scale / np.sqrt(p * D * ms)[None, :]
    beta = 0.5 * rng.standard_normal(M)
    F = np.concatenate([np.ones((n, 1)), X, np.tanh(X @ P.T + beta)], 1)
    pen = np.full(k, ridge * n)
    pen[0] = 0.0
    coef = np.linalg.solve(F.T @ F + np.diag(pen), F.T @ Y)  # (k, D)
    resid = Y - F @ coef
    sigma = np.sqrt(np.maximum(resid.var(0), 1e-24))
    y0, y0_sd, x0, x0_sd = backcast(data, p)
    t = lambda a: torch.as_tensor(np.asarray(a, dtype=np.float64)).to(dtype)  # noqa: E731
    return NARParams(c=t(coef[0]), A=t(coef[1:1 + p * D].T), P=t(P), beta=t(beta), V=t(coef[1 + p * D:].T),
                     sigma=t(sigma), y0=t(y0), y0_sd=t(y0_sd), x0=t(x0), x0_sd=t(x0_sd))


def backcast(data: Data, order: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    r"""The initial state of the autoregression: the first observation :math:`y_0` and the :math:`p` values
    before it, :math:`x_{-1} = (y_{-1},\dots,y_{-p})`, *backcast* by a linear VAR(:math:`p`) fitted by least
    squares on the time-reversed series (a stationary process runs backwards as an AR of the same order),
    with the backcast's standard deviations from its companion form,
    :math:`\Sigma_k = F\Sigma_{k-1}F^\top + Q_r`. Over several sequences: the mean over sequences, the
    between-sequence spread added to the variances. Returns ``(y0, y0_sd, x0, x0_sd)`` (``(D,)``, ``(D,)``,
    ``(pD,)``, ``(pD,)``); a sequence whose first :math:`p` steps are not all observed starts from the series'
    mean and standard deviation instead."""
    y = data.observations.detach().to(torch.float64).cpu().numpy()
    m = data.mask.detach().cpu().numpy().astype(bool)
    B, T, D = y.shape
    p = int(order)
    obs = np.array([y[..., j][m[..., j]].mean() for j in range(D)])
    sd = np.array([y[..., j][m[..., j]].std() + 1e-12 for j in range(D)])
    Xr, Yr = nar_design(Data(torch.as_tensor(y[:, ::-1].copy()), torch.as_tensor(m[:, ::-1].copy()), None), p)
    Fr = np.concatenate([np.ones((len(Yr), 1)), Xr], 1)
    coef, *_ = np.linalg.lstsq(Fr, Yr, rcond=None)  # (1 + pD, D)
    Qr = np.cov((Yr - Fr @ coef).T).reshape(D, D)
    n = p * D
    Fc = np.zeros((n, n))  # companion form of the reversed VAR: s_k = (y_{-k}, y_{-k+1}, ..., y_{-k+p-1})
    Fc[:D] = coef[1:].T
    Fc[D:, :n - D] = np.eye(n - D)
    Sig, var = np.zeros((n, n)), []
    for _ in range(p):
        Sig = Fc @ Sig @ Fc.T
        Sig[:D, :D] += Qr
        var.append(np.diag(Sig)[:D].copy())
    bvar = np.minimum(np.concatenate(var), np.tile(sd ** 2, p))
    miss = ~m[:, :p].all(axis=(1, 2))  # sequences whose first p steps are not all observed
    y0s, x0s = [], []
    for b in range(B):
        if miss[b]:
            y0s.append(obs)
            x0s.append(np.tile(obs, p))
            continue
        s = y[b, :p].reshape(-1)  # (y_0, ..., y_{p-1}): the lags of y_{-1} in reversed time
        back = []
        for _ in range(p):
            nxt = coef[0] + coef[1:].T @ s
            back.append(nxt)
            s = np.concatenate([nxt, s[:-D]])
        y0s.append(y[b, 0])
        x0s.append(np.concatenate(back))
    y0s, x0s = np.array(y0s), np.array(x0s)
    x0_var = bvar + x0s.var(0) + (miss.mean() * np.tile(sd ** 2, p) if miss.any() else 0.0)
    y0_var = y0s.var(0) + (miss.mean() * sd ** 2 if miss.any() else 0.0)
    return y0s.mean(0), np.sqrt(y0_var), x0s.mean(0), np.sqrt(x0_var)
