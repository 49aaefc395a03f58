"""Interval estimates for success rates: pure functions, shared by evaluation and the report."""

from __future__ import annotations

import math


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score 95% interval for a binomial proportion; well-behaved at 0/n and n/n."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def newcombe_interval(s1: int, n1: int, s2: int, n2: int, z: float = 1.959964) -> tuple[float, float]:
    """95% interval for p1 - p2 of two independent proportions: Newcombe's hybrid score method (1998, method 10).

    Built from the two Wilson intervals, so it stays inside [-1, 1] and behaves at 0/n and n/n, where the Wald
    interval collapses. For two policies scored on the same seeds it is conservative when their outcomes correlate
    positively; ``mcnemar_exact_p`` is the paired test.
    """
    p1, p2 = (s1 / n1 if n1 else 0.0), (s2 / n2 if n2 else 0.0)
    (l1, u1), (l2, u2) = wilson_interval(s1, n1, z), wilson_interval(s2, n2, z)
    d = p1 - p2
    return (d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2), d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2))


def mcnemar_exact_p(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value for two policies scored on the same seeds.

    Only the discordant seeds (one succeeds, the other fails) carry information; under "no difference" each is a
    fair coin, so the p-value is a two-sided binomial tail at 1/2.
    """
    n = only_a + only_b
    if n == 0:
        return 1.0
    k = min(only_a, only_b)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)
