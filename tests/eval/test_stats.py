"""Bootstrap intervals and the length-controlled win rate (tuna_ray/eval/stats.py)."""

from __future__ import annotations

import numpy as np
import pytest

from tuna_ray.eval.stats import (
    bootstrap_ci,
    fit_length_model,
    length_controlled_ci,
    length_controlled_win_rate,
)


def test_bootstrap_is_seeded_reproducible_and_brackets_the_mean():
    values = [1.0] * 30 + [0.5] * 10 + [0.0] * 20  # mean 7/12
    a = bootstrap_ci(values, resamples=500, seed=7)
    assert a == bootstrap_ci(values, resamples=500, seed=7)  # same seed, same interval
    assert a != bootstrap_ci(values, resamples=500, seed=8)
    assert a[0] < 7 / 12 < a[1]
    # The percentile interval of a mean of 60 items is about mean +- 1.96 * sd / sqrt(60).
    half = 1.96 * np.std(values) / np.sqrt(len(values))
    assert a[1] - a[0] == pytest.approx(2 * half, rel=0.2)
    assert bootstrap_ci([0.25] * 5) == (0.25, 0.25)
    assert all(np.isnan(bootstrap_ci([])))


def test_ratio_bootstrap_resamples_whole_records():
    # Record-level ratio: 3 of 3 pairs agree in one record, 0 of 1 in the other.
    lo, hi = bootstrap_ci([3.0, 0.0], [3.0, 1.0], resamples=2000, seed=0)
    # Every resample is one of {both first: 1.0, mixed: 0.75, both second: 0.0}.
    assert lo == 0.0 and hi == 1.0
    lo, hi = bootstrap_ci([3.0, 0.0], [3.0, 1.0], resamples=2000, seed=0, level=0.4)
    assert lo == hi == 0.75


def test_length_model_fit_is_the_penalised_optimum():
    rng = np.random.default_rng(0)
    delta = rng.normal(0, 300, size=200)
    p = (
        rng.random(200) < 1 / (1 + np.exp(-(0.4 + 1.5 * np.tanh(delta / delta.std(ddof=1)))))
    ) * 1.0
    theta, phi = fit_length_model(p, delta)
    # First-order condition of  sum(p log q + (1-p) log(1-q)) - |beta|^2 / 200:
    x = np.tanh(delta / delta.std(ddof=1))
    q = 1 / (1 + np.exp(-(theta + phi * x)))
    grad = np.array([np.sum(p - q), np.sum((p - q) * x)]) - np.array([theta, phi]) / 100
    assert np.abs(grad).max() < 1e-8
    assert 0.0 < theta < 1.0 and 0.8 < phi < 2.5  # near the generating (0.4, 1.5)


def test_length_controlled_win_rate_removes_a_pure_length_effect():
    # Preferences that length alone explains (soft labels from the model's own form, theta = 0):
    # the model is mostly longer, so its raw win rate is high, but at equal length it is 50.
    delta = np.array([300.0] * 30 + [-200.0] * 10 + [50.0] * 10)
    x = np.tanh(delta / delta.std(ddof=1))
    prefs = 1 / (1 + np.exp(-1.5 * x))
    raw = 100 * prefs.mean()
    lc = length_controlled_win_rate(prefs, delta, np.zeros_like(delta))
    assert raw > 60 and lc == pytest.approx(50.0, abs=0.5)
    # Without a length difference there is nothing to correct: the LC rate is the raw one.
    flat = length_controlled_win_rate([1.0] * 3 + [0.5, 0.0], [100.0] * 5, [100.0] * 5)
    assert flat == pytest.approx(70.0, abs=0.5)  # ridge shrinks theta a hair toward 0
    lo, hi = length_controlled_ci(prefs, delta, np.zeros_like(delta), resamples=200, seed=1)
    assert lo <= lc <= hi
    assert (lo, hi) == length_controlled_ci(
        prefs, delta, np.zeros_like(delta), resamples=200, seed=1
    )
