"""A trained VLA checkpoint as a rollout policy: batched greedy decoding of 7 action tokens with a KV cache.

``VLAPolicy(ckpt_dir).act(obs_batch)`` takes the rollout actors' observation dicts (``image`` (H,W,3) uint8,
``proprio`` (9,) float32, optional ``instruction``) and returns a (B, 7) float32 array of de-normalized
continuous actions. Decoding is greedy over the 256 action tokens only, so every output is a valid bin.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from apo_ray import fsio
from apo_ray.errors import UserError
from apo_ray.model import (
    ACTION_DIM,
    META_FILE,
    N_BINS,
    TinyVLA,
    checkpoint_dir,
    compute_dtype,
    decode_hf,
    load_policy,
    tokens_to_actions,
)


class VLAPolicy:
    def __init__(self, ckpt_dir: str | Path, instruction: str | None = None, device: str | None = None,
                 threads: int | None = None) -> None:
        if threads:
            torch.set_num_threads(threads)
        self.model, self.proc, self.action_stats = load_policy(ckpt_dir)
        self.meta = self.proc.meta
        cuda = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else None
        self.device = torch.device(device or cuda or "cpu")
        # acts in the precision the trainer and the reference stage use on this device
        self.model.to(self.device, compute_dtype(self.device)).eval()
        self.instruction = instruction or self.meta.default_instruction
        d = checkpoint_dir(ckpt_dir)
        weights = next((p for p in (d / "model.safetensors", d / "adapter" / "adapter_model.safetensors")
                        if p.is_file()), d / META_FILE)
        self.version = f"vla:{fsio.sha256_file(weights)[:12]}"
        self._tiny = isinstance(self.model, TinyVLA)

    def reset(self, seeds: list[int] | None = None) -> None:
        """Greedy decoding keeps no per-episode state."""

    def _instructions(self, obs_batch: list[dict]) -> list[str]:
        out = []
        for ob in obs_batch:
            s = ob.get("instruction") or self.instruction
            if not s:
                raise UserError("no instruction for the VLA policy", "VLAPolicy",
                                "pass instruction= or put 'instruction' in the observations")
            out.append(s)
        return out

    @torch.inference_mode()
    def act_tokens(self, obs_batch: list[dict]) -> np.ndarray:
        """Greedy 7-token decode → (B, 7) action token ids."""
        images = np.stack([ob["image"] for ob in obs_batch])
        proprio = np.stack([ob["proprio"] for ob in obs_batch]) if self.meta.use_proprio else None
        inp = self.proc(images, self._instructions(obs_batch), proprio).to(self.device, self._dtype())
        lo, hi = self.meta.action_offset, self.meta.action_offset + N_BINS
        if not self._tiny:  # an HF VLA: its own KV cache, prompts unpadded (Prismatic puts patches after BOS)
            return decode_hf(self.model, inp, self.meta).cpu().numpy()
        img = self.model.encode_images(inp.pixel_values, inp.proprio)
        mask = torch.cat([inp.attention_mask.new_ones(img.shape[:2]), inp.attention_mask], dim=1)
        out = self.model(input_ids=inp.input_ids, attention_mask=inp.attention_mask, image_embeds=img,
                         use_cache=True, logits_to_keep=1)
        toks = []
        pos = mask.sum(dim=1, keepdim=True) - 1
        for i in range(ACTION_DIM):
            nxt = out.logits[:, -1, lo:hi].argmax(dim=-1, keepdim=True) + lo
            toks.append(nxt)
            if i == ACTION_DIM - 1:
                break
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            pos = pos + 1
            out = self.model(input_ids=nxt, attention_mask=mask, cache=out.cache, use_cache=True,
                             position_ids=pos, logits_to_keep=1)
        return torch.cat(toks, dim=1).cpu().numpy()

    def _decode_no_cache(self, inp, lo: int, hi: int) -> np.ndarray:
        # recomputing 7 short steps without a cache: the reference the cached decoders are tested against
        ids, mask = inp.input_ids, inp.attention_mask
        for _ in range(ACTION_DIM):
            logits = self.model(input_ids=ids, attention_mask=mask, pixel_values=inp.pixel_values).logits
            nxt = logits[:, -1, lo:hi].argmax(dim=-1, keepdim=True) + lo
            ids = torch.cat([ids, nxt], dim=1)
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        return ids[:, -ACTION_DIM:].cpu().numpy()

    def act(self, obs_batch: list[dict]) -> np.ndarray:
        return tokens_to_actions(self.act_tokens(obs_batch), self.meta)

    def _dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


def ms_per_action(policy: VLAPolicy, batch: int = 1, repeats: int = 20, seed: int = 0) -> float:
    """Wall-clock milliseconds per returned action (one observation's 7-D action) at the given batch size."""
    rng = np.random.default_rng(seed)
    s = policy.meta.image_size
    obs = [{"image": rng.integers(0, 256, (s, s * policy.meta.image_views, 3), dtype=np.uint8),
            "proprio": rng.standard_normal(9).astype(np.float32)} for _ in range(batch)]
    policy.act(obs)  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        policy.act(obs)
    return (time.perf_counter() - t0) * 1000.0 / (repeats * batch)
