"""What a VLA checkpoint dir says about itself, read without torch or transformers.

The driver-side stages (dataset CLI, trainer checks, the loop's planning) need a checkpoint's token layout and
metadata but not its weights; importing the model module for them costs seconds per process.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from apo_ray.actions import ASCENDING, CONVENTIONS, N_BINS, OPENVLA
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
    """The action vocabulary a checkpoint's action tokens live in (they are its last ``N_BINS`` ids), from its
    metadata: the one source of truth for dataset, trainer, reference and decoder."""
    return int(meta["action_offset"]) + N_BINS


def meta_action_tokens(meta: dict[str, Any]) -> str:
    """A checkpoint's action-token convention; checkpoints written before it was recorded were all ascending."""
    return str(meta.get("action_tokens", ASCENDING))


def checkpoint_vocab_size(ckpt_dir: str | Path) -> int:
    return meta_vocab_size(read_meta(ckpt_dir))


def hf_token_layout(path: str | Path, declared: str = "") -> dict[str, Any]:
    """``{"vocab_size", "action_tokens"}`` of the HF VLA dir at ``path``, from its config.json (no torch).

    An OpenVLA (``model_type: openvla``) decodes with ``text_config.vocab_size - pad_to_multiple_of``
    (``OpenVLAForActionPrediction.vocab_size``), which is the Llama tokenizer's base ``vocab_size``: the added
    ``<PAD>`` and the padding rows are not action ids (``len(tokenizer)`` would put bin 255 on PAD). A dir
    exported by ``apo-ray export-hf`` states both fields; any other model must be declared (``declared``)."""
    p = Path(path) / "config.json"
    try:
        cfg = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read the HF model's config.json: {e}", str(p),
                        "point model.path at a local HF VLA directory") from None
    if "apo_action_tokens" in cfg:
        layout = {"vocab_size": int(cfg["apo_action_vocab_size"]), "action_tokens": cfg["apo_action_tokens"]}
    elif cfg.get("model_type") == "openvla" or declared == OPENVLA:
        text = cfg.get("text_config") or {}
        if "vocab_size" not in text or "pad_to_multiple_of" not in cfg:
            raise UserError("an OpenVLA config.json needs text_config.vocab_size and pad_to_multiple_of", str(p),
                            "use the config.json the model was released with")
        layout = {"vocab_size": int(text["vocab_size"]) - int(cfg["pad_to_multiple_of"]), "action_tokens": OPENVLA}
    elif declared:
        text = cfg.get("text_config") or cfg
        layout = {"vocab_size": int(text["vocab_size"]), "action_tokens": declared}
    else:
        raise UserError("the HF model states no action-token convention (not an OpenVLA config, no "
                        "apo_action_tokens)", str(p), f"set model.action_tokens to one of {', '.join(CONVENTIONS)}")
    if declared and declared != layout["action_tokens"]:
        raise UserError(f"model.action_tokens is {declared}, the model's config says {layout['action_tokens']}",
                        "config model.action_tokens", "drop model.action_tokens")
    if layout["action_tokens"] not in CONVENTIONS or layout["vocab_size"] < N_BINS:
        raise UserError(f"bad action-token layout {layout}", str(p), "re-export the model")
    return layout


def token_layout(model: ModelConfig, ref_checkpoint: str | None) -> dict[str, Any]:
    """``{"vocab_size", "action_tokens"}`` a dataset's action tokens are made for: the reference checkpoint's,
    else the configured model's (the tiny VLA's, or the HF VLA's at ``model.path``)."""
    if ref_checkpoint is not None:
        meta = read_meta(ref_checkpoint)
        return {"vocab_size": meta_vocab_size(meta), "action_tokens": meta_action_tokens(meta)}
    if model.kind == "tiny":
        return {"vocab_size": VOCAB_SIZE, "action_tokens": ASCENDING}
    return hf_token_layout(model.path, model.action_tokens)


def vocab_size(model: ModelConfig, ref_checkpoint: str | None) -> int:
    return int(token_layout(model, ref_checkpoint)["vocab_size"])
