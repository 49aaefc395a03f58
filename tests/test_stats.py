"""Interval estimates against published worked examples."""

from __future__ import annotations

import pytest

from apo_ray.stats import mcnemar_exact_p, newcombe_interval, wilson_interval


@pytest.mark.parametrize("k,n,lo,hi", [
    (81, 263, 0.2553, 0.3662),  # Newcombe (1998a), Table I
    (0, 20, 0.0, 0.1611),       # 0/n: Wald gives [0, 0]
    (20, 20, 0.8389, 1.0),
])
def test_wilson_matches_published_values(k: int, n: int, lo: float, hi: float) -> None:
    got = wilson_interval(k, n)
    assert got == pytest.approx((lo, hi), abs=1e-4)


@pytest.mark.parametrize("a,m,b,n,lo,hi", [
    # Newcombe (1998b), "Interval estimation for the difference between independent proportions", Table II, method 10
    (56, 70, 48, 80, 0.0524, 0.3339),
    (9, 10, 3, 10, 0.1705, 0.8090),
    (6, 7, 2, 5, -0.0658, 0.7629),
    (5, 56, 0, 29, -0.0381, 0.1926),
])
def test_newcombe_matches_published_values(a: int, m: int, b: int, n: int, lo: float, hi: float) -> None:
    assert newcombe_interval(a, m, b, n) == pytest.approx((lo, hi), abs=1e-4)
    # swapping the arms mirrors the interval
    assert newcombe_interval(b, n, a, m) == pytest.approx((-hi, -lo), abs=1e-4)


@pytest.mark.parametrize("a,b,p", [
    (1, 5, 2 * (1 + 6) / 64),                     # 2·P(X ≤ 1), X ~ Bin(6, 1/2)
    (5, 1, 2 * (1 + 6) / 64),
    (0, 10, 2 / 1024),
    (3, 3, 1.0),                                  # the doubled tail passes 1: capped
    (0, 0, 1.0),
])
def test_mcnemar_exact_hand_computed(a: int, b: int, p: float) -> None:
    assert mcnemar_exact_p(a, b) == pytest.approx(p)
