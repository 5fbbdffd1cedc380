"""Statistics for accuracies measured on the same problems: intervals and paired tests.

- `wilson_interval`: the 95% Wilson score interval of one accuracy (k of n); unlike the normal
  approximation it stays inside [0, 1] and is sensible at 0% and 100%.
- `paired_bootstrap`: the difference of two accuracies on the same problems, with a percentile
  interval from resampling problems (each resample keeps a problem's pair of outcomes together).
- `mcnemar_exact`: the exact two-sided McNemar test: of the problems where exactly one of the two
  is right, the count for each side is Binomial(b + c, 1/2) if neither is better.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

Z95 = 1.959963984540054  # standard normal quantile at 0.975
_DRAWS_PER_CHUNK = 2**22  # resampled indices held at once (32 MiB of int64)


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Score interval for a proportion k/n: the p where |k/n - p| = z * sqrt(p(1-p)/n)."""
    if n <= 0 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n and n > 0, got k={k}, n={n}")
    p_hat = k / n
    z2 = z * z
    center = (p_hat + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p_hat * (1 - p_hat) / n + z2 / (4 * n * n))
    # exactly 0 at k = 0 and 1 at k = n (rounding can leave center - half at 1e-18)
    low = 0.0 if k == 0 else max(0.0, center - half)
    high = 1.0 if k == n else min(1.0, center + half)
    return low, high


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p: 2 * P(X <= min(b, c)), X ~ Binomial(b + c, 1/2), capped at 1.

    b: problems only the first gets right; c: problems only the second gets right. Exact
    rational arithmetic: the sum of binomial coefficients over 2^n, no float underflow.
    """
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got b={b}, c={c}")
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1))
    return float(min(Fraction(1), Fraction(2 * tail, 2**n)))


@dataclass(frozen=True)
class PairedDifference:
    """`other` minus `reference` accuracy on the same problems, with its bootstrap interval."""

    difference: float
    low: float
    high: float
    only_reference: int  # b: the reference right, the other wrong
    only_other: int  # c: the other right, the reference wrong
    p_value: float  # exact McNemar
    samples: int
    seed: int


def bootstrap_differences(
    reference: Sequence[bool], other: Sequence[bool], samples: int, seed: int
) -> np.ndarray:
    """`samples` resampled mean differences (other - reference) of the paired outcomes.

    Resample r draws n problem indices uniformly with replacement from numpy's PCG64 seeded
    with `seed`; the draws are taken in chunks of whole resamples, which gives the same stream
    as drawing one resample at a time.
    """
    d = np.asarray(other, dtype=np.int8) - np.asarray(reference, dtype=np.int8)  # (n,) in {-1,0,1}
    n = len(d)
    if n == 0 or len(reference) != len(other):
        raise ValueError("need two outcome lists of the same, non-zero length")
    rng = np.random.default_rng(seed)
    out = np.empty(samples, dtype=np.float64)
    per_chunk = max(1, _DRAWS_PER_CHUNK // n)
    for start in range(0, samples, per_chunk):
        rows = min(per_chunk, samples - start)
        index = rng.integers(0, n, size=(rows, n))  # (rows, n)
        out[start : start + rows] = d[index].sum(axis=1, dtype=np.int64) / n
    return out


def paired_bootstrap(
    reference: Sequence[bool], other: Sequence[bool], samples: int, seed: int, level: float = 0.95
) -> PairedDifference:
    """Difference with a percentile bootstrap interval and the exact McNemar p."""
    diffs = bootstrap_differences(reference, other, samples, seed)
    alpha = (1 - level) / 2
    low, high = np.quantile(diffs, [alpha, 1 - alpha])  # linear interpolation (numpy default)
    b = sum(1 for r, o in zip(reference, other, strict=True) if r and not o)
    c = sum(1 for r, o in zip(reference, other, strict=True) if o and not r)
    return PairedDifference(
        difference=(sum(map(bool, other)) - sum(map(bool, reference))) / len(reference),
        low=float(low),
        high=float(high),
        only_reference=b,
        only_other=c,
        p_value=mcnemar_exact(b, c),
        samples=samples,
        seed=seed,
    )
