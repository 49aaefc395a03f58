"""Action statistics, normalization and tokenization on arrays whose answers can be worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from apo_ray import actions as A


def _ramp() -> np.ndarray:
    """101 steps; dim 0 runs 0..100 so q01 = 1 and q99 = 99 exactly (numpy's linear quantile)."""
    n = 101
    a = np.zeros((n, 7))
    a[:, 0] = np.arange(n)
    a[:, 1] = -np.arange(n) / 100.0  # 0 .. -1: q01 = -0.99, q99 = -0.01
    a[:, 6] = np.where(np.arange(n) % 2 == 0, -1.0, 1.0)  # gripper
    return a


def test_stats_known_array() -> None:
    s = A.action_stats(_ramp())
    assert s["q01"][0] == pytest.approx(1.0) and s["q99"][0] == pytest.approx(99.0)
    assert s["q01"][1] == pytest.approx(-0.99) and s["q99"][1] == pytest.approx(-0.01)
    assert s["min"][0] == 0 and s["max"][0] == 100 and s["mean"][0] == pytest.approx(50.0)
    assert s["mask"] == [True] * 6 + [False]


def test_normalize_maps_quantiles_to_unit_range_and_passes_gripper() -> None:
    s = A.action_stats(_ramp())
    x = np.array([[1.0, -0.5, 0, 0, 0, 0, 1.0], [99.0, -0.01, 0, 0, 0, 0, -1.0], [150.0, 3.0, 0, 0, 0, 0, 0.3]])
    n = A.normalize(x, s)
    np.testing.assert_allclose(n[0, :2], [-1.0, 2 * (-0.5 + 0.99) / 0.98 - 1], atol=1e-6)
    np.testing.assert_allclose(n[1, :2], [1.0, 1.0], atol=1e-6)
    np.testing.assert_allclose(n[2, :2], [1.0, 1.0])  # beyond q99: clipped
    np.testing.assert_allclose(n[:, 6], [1.0, -1.0, 0.3], atol=1e-7)  # gripper untouched
    np.testing.assert_allclose(n[:, 2:6], -1.0)  # constant dims map to -1, no division by zero


def test_bins_and_tokens() -> None:
    np.testing.assert_array_equal(A.to_bins(np.array([-1.0, -0.999, 0.0, 0.999, 1.0])), [0, 0, 128, 255, 255])
    np.testing.assert_allclose(A.bin_centers(np.array([0, 255])), [-1 + 1 / 256, 1 - 1 / 256])
    tok = A.bins_to_tokens(np.array([0, 255]), vocab_size=32000)
    np.testing.assert_array_equal(tok, [32000 - 256, 31999])
    np.testing.assert_array_equal(A.tokens_to_bins(tok, 32000), [0, 255])


def test_round_trip_within_half_a_bin() -> None:
    rng = np.random.default_rng(0)
    raw = rng.uniform(-1, 1, size=(2000, 7)) * np.array([0.3, 0.5, 1, 1, 1, 1, 1])
    raw[:, 6] = np.sign(raw[:, 6])
    s = A.action_stats(raw)
    norm = A.normalize(raw, s)
    back_norm = A.bin_centers(A.tokens_to_bins(A.tokenize(raw, s, 300), 300))
    assert np.abs(back_norm - norm).max() <= 1 / 256 + 1e-6  # half of a 2/256-wide bin
    # in raw units, half a bin is (q99 - q01) / 256 for every action inside [q01, q99]
    lo, hi = np.array(s["q01"]), np.array(s["q99"])
    inside = np.all((raw >= lo) & (raw <= hi), axis=1)
    err = np.abs(A.detokenize(A.tokenize(raw, s, 300), s, 300) - raw)[inside]
    half = np.where(s["mask"], (hi - lo) / 256, 1 / 256)
    assert np.all(err <= half + 1e-6)
