"""Statistics of the eval scorers: bootstrap confidence intervals, length-controlled win rate.

Stage: eval, pure numpy (no Ray, no model).

**Bootstrap.** Percentile bootstrap over the evaluation items (questions, instances, ranked
records): ``resamples`` times draw n items with replacement (``numpy.random.default_rng(seed)``,
so the interval is reproducible), compute the statistic, and report the ``(1 - level) / 2`` and
``(1 + level) / 2`` quantiles. With ``denominators`` the statistic is a ratio of sums (pairs of
a ranked set are clustered by record: records are resampled, not pairs).

**Length-controlled win rate** (AlpacaEval 2, Dubois et al. 2024, arXiv 2404.04475). Fit a
logistic model of the per-question preference p_i in [0, 1] (1 = the model's answer wins,
0.5 = tie) on the length difference, with soft labels::

    P(model wins | i) = sigmoid(theta + phi * tanh(d_i / std(d))),  d_i = len(model_i) - len(ref_i)

lengths in characters, std with ddof = 1 (as AlpacaEval). The length-controlled win rate is the
predicted win rate with no length difference, ``100 * sigmoid(theta)``. Differences from
AlpacaEval's ``length_controlled_v1``: no instruction-difficulty term and no regularisation
toward its "gamed" baselines (both need AlpacaEval's precomputed data from the hub); a small
ridge penalty ``|beta|^2 / (2 C)``, C = 100, replaces its cross-validated L1 penalty and keeps
the fit finite when one side wins everything. With one model and one baseline the difficulty
term only shifts predictions per instruction; the length correction is the same idea.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

_CHUNK = 200  # resamples drawn at once (bounds memory for ~12K Super-NI instances)


def _interval(stats: np.ndarray, level: float) -> tuple[float, float]:
    lo, hi = np.quantile(stats, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def bootstrap_ci(
    values: Sequence[float],
    denominators: Sequence[float] | None = None,
    *,
    resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile interval of ``mean(values)`` (or ``sum(values) / sum(denominators)``).

    >>> bootstrap_ci([1.0, 1.0, 1.0])
    (1.0, 1.0)
    >>> bootstrap_ci([0.0, 1.0] * 50, seed=3) == bootstrap_ci([0.0, 1.0] * 50, seed=3)
    True
    """
    v = np.asarray(values, dtype=float)
    if v.size == 0:
        return math.nan, math.nan
    d = None if denominators is None else np.asarray(denominators, dtype=float)
    rng = np.random.default_rng(seed)
    stats = []
    for start in range(0, resamples, _CHUNK):
        idx = rng.integers(0, v.size, size=(min(_CHUNK, resamples - start), v.size))
        if d is None:
            stats.append(v[idx].mean(axis=1))
        else:
            stats.append(v[idx].sum(axis=1) / np.maximum(d[idx].sum(axis=1), 1e-12))
    return _interval(np.concatenate(stats), level)


def _sigmoid(x: np.ndarray | float) -> np.ndarray | float:
    return np.exp(-np.logaddexp(0.0, -x))


def fit_length_model(
    preferences: np.ndarray, delta: np.ndarray, *, c: float = 100.0, iterations: int = 100
) -> tuple[float, float]:
    """(theta, phi) of the module docstring's model, by Newton's method on the penalised
    soft-label log-likelihood (concave: Newton converges from 0)."""
    p = np.asarray(preferences, dtype=float)
    d = np.asarray(delta, dtype=float)
    std = d.std(ddof=1) if d.size > 1 else 0.0
    x = np.tanh(d / std) if std > 0 else np.zeros_like(d)
    design = np.stack([np.ones_like(x), x], axis=1)
    beta = np.zeros(2)
    for _ in range(iterations):
        q = _sigmoid(design @ beta)
        grad = design.T @ (p - q) - beta / c
        hess = -(design.T * (q * (1 - q))) @ design - np.eye(2) / c
        step = np.linalg.solve(hess, grad)
        beta = beta - step
        if np.abs(step).max() < 1e-10:
            break
    return float(beta[0]), float(beta[1])


def length_controlled_win_rate(
    preferences: Sequence[float],
    model_lengths: Sequence[float],
    reference_lengths: Sequence[float],
) -> float:
    """``100 * sigmoid(theta)``: the win rate predicted at equal lengths (module docstring).

    >>> round(length_controlled_win_rate([1, 0, 1, 0], [10, 10, 10, 10], [10, 10, 10, 10]), 6)
    50.0
    """
    p = np.asarray(preferences, dtype=float)
    if p.size == 0:
        return math.nan
    delta = np.asarray(model_lengths, dtype=float) - np.asarray(reference_lengths, dtype=float)
    theta, _ = fit_length_model(p, delta)
    return 100.0 * float(_sigmoid(theta))


def length_controlled_ci(
    preferences: Sequence[float],
    model_lengths: Sequence[float],
    reference_lengths: Sequence[float],
    *,
    resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``length_controlled_win_rate`` (refit per resample)."""
    p = np.asarray(preferences, dtype=float)
    if p.size == 0:
        return math.nan, math.nan
    m = np.asarray(model_lengths, dtype=float)
    r = np.asarray(reference_lengths, dtype=float)
    rng = np.random.default_rng(seed)
    stats = np.empty(resamples)
    for k in range(resamples):
        idx = rng.integers(0, p.size, size=p.size)
        stats[k] = length_controlled_win_rate(p[idx], m[idx], r[idx])
    return _interval(stats, level)
