"""Action statistics, normalization and tokenization (pure numpy, no model needed).

The OpenVLA recipe the paper's code uses: per-dimension q01/q99 statistics map the six arm dimensions to
[-1, 1] (clipped); the gripper (last dim) is already in [-1, 1] and is passed through, never normalized.
Two token conventions, both on the last ``n_bins`` ids of the vocabulary (``vocab_size`` = the action
vocabulary, the base text vocabulary without added or padding tokens):
- ``ascending`` (the tiny VLA): [-1, 1] is cut into ``n_bins`` uniform bins; bin ``b`` is token
  ``vocab_size - n_bins + b`` and decodes to its centre.
- ``openvla`` (OpenVLA / Prismatic checkpoints, ``prismatic/vla/action_tokenizer.py``): token
  ``vocab_size - digitize(x, linspace(-1, 1, n_bins))``, descending; digitize gives 1..n_bins (n_bins only for
  x = 1.0), decoded through the ``n_bins - 1`` centres of those edges with index ``clip(vocab_size - t - 1, 0,
  n_bins - 2)``. A pretrained OpenVLA's tokens read the ascending way would be mirrored.
Either way a round trip is off by at most half a bin. The convention is a checkpoint's, recorded in its metadata.

The ``openvla`` convention also carries OpenVLA's gripper: its data wrapper standardises the gripper to 0..1 with
1 = open (never normalised, mask False), while robosuite commands -1 = open, +1 = closed. So the model's gripper
``g = (1 - a) / 2`` for a robosuite command ``a``, and ``a = 1 - 2 g`` back (OpenVLA's LIBERO eval does the same:
``2 g - 1`` then a sign flip; it also binarises, we keep the bin centre).
"""

from __future__ import annotations

from typing import Any

import numpy as np

N_BINS = 256
GRIPPER_DIM = 6
ASCENDING, OPENVLA = "ascending", "openvla"
CONVENTIONS = (ASCENDING, OPENVLA)


def action_stats(actions: np.ndarray) -> dict[str, Any]:
    """Per-dimension statistics of ``actions`` (N, D) as JSON-ready lists; ``mask`` marks normalized dims."""
    a = np.asarray(actions, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] == 0:
        raise ValueError(f"action_stats needs a non-empty (N, D) array, got shape {a.shape}")
    mask = np.ones(a.shape[1], dtype=bool)
    if a.shape[1] > GRIPPER_DIM:
        mask[GRIPPER_DIM] = False  # gripper: binary open/close, normalizing it would distort the two levels
    return {
        "q01": np.quantile(a, 0.01, axis=0).tolist(),
        "q99": np.quantile(a, 0.99, axis=0).tolist(),
        "mean": a.mean(axis=0).tolist(),
        "std": a.std(axis=0).tolist(),
        "min": a.min(axis=0).tolist(),
        "max": a.max(axis=0).tolist(),
        "mask": mask.tolist(),
    }


def _bounds(stats: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    lo = np.asarray(stats["q01"], dtype=np.float64)
    hi = np.asarray(stats["q99"], dtype=np.float64)
    return lo, hi, np.asarray(stats["mask"], dtype=bool)


def normalize(actions: np.ndarray, stats: dict[str, Any]) -> np.ndarray:
    """Raw actions (..., D) -> [-1, 1]; masked dims via q01/q99 (clipped), the gripper only clipped."""
    a = np.asarray(actions, dtype=np.float64)
    lo, hi, mask = _bounds(stats)
    span = np.maximum(hi - lo, 1e-8)  # a constant dimension maps to -1 instead of dividing by zero
    out = np.where(mask, 2.0 * (a - lo) / span - 1.0, a)
    return np.clip(out, -1.0, 1.0).astype(np.float32)


def unnormalize(norm: np.ndarray, stats: dict[str, Any]) -> np.ndarray:
    """Inverse of :func:`normalize` inside [q01, q99] (what a deployed policy executes)."""
    x = np.asarray(norm, dtype=np.float64)
    lo, hi, mask = _bounds(stats)
    return np.where(mask, (x + 1.0) / 2.0 * (hi - lo) + lo, x).astype(np.float32)


def to_bins(norm: np.ndarray, n_bins: int = N_BINS) -> np.ndarray:
    """[-1, 1] -> uniform bin index 0..n_bins-1 (1.0 falls in the last bin)."""
    x = np.clip(np.asarray(norm, dtype=np.float64), -1.0, 1.0)
    return np.clip(np.floor((x + 1.0) / 2.0 * n_bins), 0, n_bins - 1).astype(np.int16)


def bin_centers(bins: np.ndarray, n_bins: int = N_BINS) -> np.ndarray:
    """Bin index -> the centre of its [-1, 1] interval."""
    return (-1.0 + (np.asarray(bins, dtype=np.float64) + 0.5) * (2.0 / n_bins)).astype(np.float32)


def bins_to_tokens(bins: np.ndarray, vocab_size: int, n_bins: int = N_BINS) -> np.ndarray:
    if vocab_size < n_bins:
        raise ValueError(f"vocab_size {vocab_size} is smaller than the {n_bins} action bins")
    return (np.asarray(bins, dtype=np.int64) + (vocab_size - n_bins)).astype(np.int32)


def tokens_to_bins(tokens: np.ndarray, vocab_size: int, n_bins: int = N_BINS) -> np.ndarray:
    """Token ids -> bins; ids below the action range (text tokens) clip to bin 0, as a decoder must."""
    return np.clip(np.asarray(tokens, dtype=np.int64) - (vocab_size - n_bins), 0, n_bins - 1).astype(np.int16)


def _check_convention(convention: str) -> None:
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown action-token convention {convention!r}; one of {CONVENTIONS}")


def norm_to_tokens(norm: np.ndarray, vocab_size: int, convention: str = ASCENDING,
                   n_bins: int = N_BINS) -> np.ndarray:
    """Normalised actions in [-1, 1] (..., D) -> token ids (..., D) int32 under ``convention``."""
    _check_convention(convention)
    if convention == ASCENDING:
        return bins_to_tokens(to_bins(norm, n_bins), vocab_size, n_bins)
    x = np.clip(np.asarray(norm, dtype=np.float64), -1.0, 1.0)
    return (vocab_size - np.digitize(x, np.linspace(-1.0, 1.0, n_bins))).astype(np.int32)


def tokens_to_norm(tokens: np.ndarray, vocab_size: int, convention: str = ASCENDING,
                   n_bins: int = N_BINS) -> np.ndarray:
    """Token ids (..., D) -> normalised actions at the bin centres (ids outside the action range clip)."""
    _check_convention(convention)
    if convention == ASCENDING:
        return bin_centers(tokens_to_bins(tokens, vocab_size, n_bins), n_bins)
    edges = np.linspace(-1.0, 1.0, n_bins)
    centers = (edges[:-1] + edges[1:]) / 2.0
    idx = np.clip(vocab_size - np.asarray(tokens, dtype=np.int64) - 1, 0, n_bins - 2)
    return centers[idx].astype(np.float32)


def env_to_model(actions: np.ndarray, convention: str) -> np.ndarray:
    """robosuite actions (..., D) -> the model's action space (``openvla``: gripper -1 open -> 1 open)."""
    a = np.array(actions, dtype=np.float64)
    if convention == OPENVLA and a.shape[-1] > GRIPPER_DIM:
        a[..., GRIPPER_DIM] = (1.0 - a[..., GRIPPER_DIM]) / 2.0
    return a


def model_to_env(actions: np.ndarray, convention: str) -> np.ndarray:
    """Inverse of :func:`env_to_model`."""
    a = np.array(actions, dtype=np.float32)
    if convention == OPENVLA and a.shape[-1] > GRIPPER_DIM:
        a[..., GRIPPER_DIM] = 1.0 - 2.0 * a[..., GRIPPER_DIM]
    return a


def tokenize(actions: np.ndarray, stats: dict[str, Any], vocab_size: int, n_bins: int = N_BINS,
             convention: str = ASCENDING) -> np.ndarray:
    """Raw robosuite actions (..., D) -> token ids (..., D) int32; ``stats`` are of the model's action space."""
    return norm_to_tokens(normalize(env_to_model(actions, convention), stats), vocab_size, convention, n_bins)


def detokenize(tokens: np.ndarray, stats: dict[str, Any], vocab_size: int, n_bins: int = N_BINS,
               convention: str = ASCENDING) -> np.ndarray:
    """Token ids (..., D) -> raw robosuite actions at the bin centres."""
    return model_to_env(unnormalize(tokens_to_norm(tokens, vocab_size, convention, n_bins), stats), convention)
