"""What a VLA checkpoint dir says about itself, read without torch or transformers.

The driver-side stages (dataset CLI, trainer checks, the loop's planning) need a checkpoint's token layout and
metadata but not its weights; importing the model module for them costs seconds per process.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from apo_ray.actions import N_BINS
from apo_ray.config import ModelConfig
from apo_ray.errors import UserError

META_FILE = "apo_vla.json"
TEXT_VOCAB = 256
"""Text slots of the tiny tokenizer (specials + words, padded); the action tokens follow, so ids are stable."""
VOCAB_SIZE = TEXT_VOCAB + N_BINS
"""The tiny VLA's vocabulary: its action tokens are the last ``N_BINS`` ids."""


def checkpoint_dir(ckpt_dir: str | Path) -> Path:
    """The dir holding apo_vla.json: ``ckpt_dir`` itself, or its ``checkpoint/`` (a training out dir)."""
    d = Path(ckpt_dir)
    return d / "checkpoint" if (d / "checkpoint" / META_FILE).is_file() else d


def read_meta(ckpt_dir: str | Path) -> dict[str, Any]:
    """A checkpoint's apo_vla.json (kind, action statistics, token layout, model config); UserError if missing or
    corrupt. Cheap: the one reader of checkpoint metadata for stages that do not need the weights."""
    d = checkpoint_dir(ckpt_dir)
    meta_path = d / META_FILE
    if not meta_path.is_file():
        raise UserError(f"not a VLA checkpoint: {META_FILE} missing", str(d),
                        "pass the checkpoint/ dir written by apo-ray train")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"corrupt {META_FILE}: {e}", str(meta_path), "retrain or restore the checkpoint") from None
    if not isinstance(meta, dict):
        raise UserError(f"corrupt {META_FILE}: not a JSON object", str(meta_path), "retrain or restore the checkpoint")
    return meta


def meta_vocab_size(meta: dict[str, Any]) -> int:
    """The vocabulary a checkpoint's action tokens live in (they are its last ``N_BINS`` ids), from its metadata."""
    return int(meta["action_offset"]) + N_BINS


def checkpoint_vocab_size(ckpt_dir: str | Path) -> int:
    return meta_vocab_size(read_meta(ckpt_dir))


def vocab_size(model: ModelConfig, ref_checkpoint: str | None) -> int:
    """The vocabulary a dataset's action tokens are made for: the reference checkpoint's, else the configured
    model's (the tiny VLA's, or the tokenizer's at ``model.path`` for an HF VLA)."""
    if ref_checkpoint is not None:
        return checkpoint_vocab_size(ref_checkpoint)
    if model.kind == "tiny":
        return VOCAB_SIZE
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(model.path, trust_remote_code=True))
