"""Intervals and paired tests against slow, obvious references."""

from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest

from loraforge import stats


def _score_test_root(k: int, n: int, lo: float, hi: float) -> float:
    """Bisection for the p in [lo, hi] where (k/n - p)^2 = z^2 p (1 - p) / n."""
    p_hat, z2 = k / n, stats.Z95**2

    def f(p: float) -> float:
        return (p_hat - p) ** 2 - z2 * p * (1 - p) / n

    for _ in range(200):
        mid = (lo + hi) / 2
        if (f(lo) > 0) == (f(mid) > 0):
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


@pytest.mark.parametrize(
    ("k", "n"), [(0, 20), (1, 20), (10, 20), (19, 20), (20, 20), (37, 1319), (3, 7)]
)
def test_wilson_interval_inverts_the_score_test(k: int, n: int) -> None:
    low, high = stats.wilson_interval(k, n)
    p_hat = k / n
    want_low = 0.0 if k == 0 else _score_test_root(k, n, 0.0, p_hat)
    want_high = 1.0 if k == n else _score_test_root(k, n, p_hat, 1.0)
    assert low == pytest.approx(want_low, abs=1e-9)
    assert high == pytest.approx(want_high, abs=1e-9)
    assert 0.0 <= low <= p_hat <= high <= 1.0


def test_wilson_known_value() -> None:
    # 0 of 20: the upper bound is z^2 / (n + z^2) = 0.1611
    assert stats.wilson_interval(0, 20)[1] == pytest.approx(stats.Z95**2 / (20 + stats.Z95**2))


def _mcnemar_by_enumeration(b: int, c: int) -> float:
    """Every one of the 2^(b+c) ways the discordant problems could fall, each with probability
    2^-(b+c) under the null; p = the mass of outcomes at least as far from (b+c)/2."""
    n = b + c
    observed = abs(b - n / 2)
    extreme = sum(
        1 for signs in itertools.product((0, 1), repeat=n) if abs(sum(signs) - n / 2) >= observed
    )
    return extreme / 2**n


@pytest.mark.parametrize(
    ("b", "c"), [(0, 0), (0, 5), (5, 0), (3, 3), (10, 2), (1, 12), (7, 9), (0, 1)]
)
def test_mcnemar_matches_the_exact_binomial_by_enumeration(b: int, c: int) -> None:
    assert stats.mcnemar_exact(b, c) == pytest.approx(_mcnemar_by_enumeration(b, c), rel=1e-12)


def test_mcnemar_known_values_and_large_counts() -> None:
    assert stats.mcnemar_exact(0, 5) == 2 / 32
    assert stats.mcnemar_exact(10, 2) == pytest.approx(2 * (1 + 12 + 66) / 4096)
    # 1319 discordant problems: exact integers, no underflow to 0 or overflow
    p = stats.mcnemar_exact(600, 719)
    tail = sum(math.comb(1319, i) for i in range(601))
    assert p == pytest.approx(2 * tail / 2**1319, rel=1e-12) and 0 < p < 0.01


def _slow_bootstrap(ref: list[bool], other: list[bool], samples: int, seed: int) -> list[float]:
    """One resample at a time, summing in Python."""
    rng = np.random.default_rng(seed)
    n = len(ref)
    out = []
    for _ in range(samples):
        index = rng.integers(0, n, size=n)
        out.append(sum(int(other[i]) - int(ref[i]) for i in index) / n)
    return out


def _slow_quantile(values: list[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy's default, method 7)."""
    xs = sorted(values)
    h = (len(xs) - 1) * q
    lo = math.floor(h)
    return xs[lo] + (h - lo) * (xs[min(lo + 1, len(xs) - 1)] - xs[lo])


def _outcomes(n: int, seed: int) -> tuple[list[bool], list[bool]]:
    rng = random.Random(seed)
    ref = [rng.random() < 0.5 for _ in range(n)]
    other = [r if rng.random() < 0.7 else rng.random() < 0.65 for r in ref]
    return ref, other


def test_paired_bootstrap_equals_the_slow_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    ref, other = _outcomes(60, seed=1)
    slow = _slow_bootstrap(ref, other, 500, seed=42)
    monkeypatch.setattr(stats, "_DRAWS_PER_CHUNK", 7 * 60)  # several chunks, a ragged last one
    fast = stats.bootstrap_differences(ref, other, 500, seed=42)
    np.testing.assert_allclose(fast, slow, rtol=0, atol=1e-12)
    result = stats.paired_bootstrap(ref, other, 500, seed=42)
    assert result.low == pytest.approx(_slow_quantile(slow, 0.025), abs=1e-12)
    assert result.high == pytest.approx(_slow_quantile(slow, 0.975), abs=1e-12)
    assert result.difference == pytest.approx((sum(other) - sum(ref)) / 60)
    b = sum(r and not o for r, o in zip(ref, other, strict=True))
    c = sum(o and not r for r, o in zip(ref, other, strict=True))
    assert (result.only_reference, result.only_other) == (b, c)
    assert result.p_value == pytest.approx(_mcnemar_by_enumeration(b, c))


def test_bootstrap_is_seeded_and_agrees_with_the_normal_approximation() -> None:
    ref, other = _outcomes(1000, seed=2)
    first = stats.paired_bootstrap(ref, other, 4000, seed=9)
    assert stats.paired_bootstrap(ref, other, 4000, seed=9) == first
    assert stats.paired_bootstrap(ref, other, 4000, seed=10) != first
    d = np.asarray(other, float) - np.asarray(ref, float)
    half = stats.Z95 * d.std() / math.sqrt(len(d))
    assert first.low == pytest.approx(d.mean() - half, abs=0.006)
    assert first.high == pytest.approx(d.mean() + half, abs=0.006)


def test_identical_outcomes_give_a_zero_interval_and_p_one() -> None:
    ref = [True, False, True, True]
    result = stats.paired_bootstrap(ref, ref, 200, seed=0)
    assert (result.difference, result.low, result.high, result.p_value) == (0.0, 0.0, 0.0, 1.0)


@pytest.mark.parametrize("n", [1, 7, 100, 1000, 12345])
def test_wilson_interval_holds_the_estimate_at_the_ends(n: int) -> None:
    # k = 0 and k = n: the interval starts at exactly 0 / ends at exactly 1, never an epsilon
    # past the estimate (a negative error bar made the report's plot fail)
    assert stats.wilson_interval(0, n)[0] == 0.0
    assert stats.wilson_interval(n, n)[1] == 1.0
    for k in range(0, n + 1, max(1, n // 50)):
        low, high = stats.wilson_interval(k, n)
        assert low <= k / n <= high
