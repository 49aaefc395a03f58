"""A tiny random-init VLA with OpenVLA's interface, for tests without OpenVLA's code or weights.

It follows what ``model.kind: hf`` relies on in ``openvla/openvla-7b`` (read from OpenVLA's
``prismatic/extern/hf``; none of its code is copied): ``model_type: openvla``; a fused vision input of 6 channels
(two 3-channel blocks, one per backbone, each under its own normalisation) at ``config.image_sizes``; image
patches inserted right after BOS; a Llama text model whose vocabulary is the tokenizer's base vocabulary + an
added ``<PAD>``, padded to ``pad_to_multiple_of``; ``norm_stats``; descending action tokens decoded by
``predict_action(input_ids, unnorm_key, pixel_values=...)``, which appends the empty token first.

This file is self-contained (torch, numpy, transformers): it is copied beside the weights as remote code.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn as nn
from transformers import LlamaConfig, LlamaForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast


class TinyPrismaticConfig(PretrainedConfig):
    model_type = "openvla"

    def __init__(self, image_sizes: list[int] | None = None, patch_size: int = 8, vision_dim: int = 32,
                 use_fused_vision_backbone: bool = True, text_config: dict | None = None,
                 pad_token_id: int = 32000, pad_to_multiple_of: int = 64, norm_stats: dict | None = None,
                 n_action_bins: int = 256, empty_token_id: int = 29871, **kwargs: Any) -> None:
        self.image_sizes = list(image_sizes or [32, 32])
        self.patch_size, self.vision_dim = patch_size, vision_dim
        self.use_fused_vision_backbone = use_fused_vision_backbone
        self.text_config = dict(text_config or {})
        self.pad_to_multiple_of = pad_to_multiple_of
        self.norm_stats = norm_stats or {}
        self.n_action_bins = n_action_bins
        self.empty_token_id = empty_token_id
        super().__init__(pad_token_id=pad_token_id, **kwargs)


class _Featurizer(nn.Module):
    def __init__(self, dim: int, patch: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, stride=patch)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


class TinyPrismatic(PreTrainedModel):
    config_class = TinyPrismaticConfig
    base_model_prefix = "model"
    _supports_sdpa = True

    def __init__(self, config: TinyPrismaticConfig) -> None:
        super().__init__(config)
        d = config.vision_dim
        self.featurizer = _Featurizer(d, config.patch_size)
        self.fused_featurizer = _Featurizer(d, config.patch_size) if config.use_fused_vision_backbone else None
        vdim = d * (2 if config.use_fused_vision_backbone else 1)
        h = config.text_config["hidden_size"]
        self.projector = nn.Sequential(nn.Linear(vdim, 4 * vdim), nn.GELU(), nn.Linear(4 * vdim, h), nn.GELU(),
                                       nn.Linear(h, h))
        self.language_model = LlamaForCausalLM(LlamaConfig(**config.text_config))
        # decoding reverts the "multiple of" padding, as OpenVLA's predict_action does
        self.vocab_size = config.text_config["vocab_size"] - config.pad_to_multiple_of
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def patches(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.fused_featurizer is None:
            return self.featurizer(pixel_values)
        a, b = torch.split(pixel_values, [3, 3], dim=1)
        return torch.cat([self.featurizer(a), self.fused_featurizer(b)], dim=2)

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                past_key_values: Any = None, use_cache: bool | None = None, **_: Any) -> CausalLMOutputWithPast:
        if past_key_values is not None and input_ids.shape[1] == 1:  # cached generation
            out = self.language_model(input_ids=input_ids, past_key_values=past_key_values, use_cache=True)
            return CausalLMOutputWithPast(logits=out.logits, past_key_values=out.past_key_values)
        proj = self.projector(self.patches(pixel_values.to(self.projector[0].weight.dtype)))
        emb = self.get_input_embeddings()(input_ids)
        embeds = torch.cat([emb[:, :1], proj.to(emb.dtype), emb[:, 1:]], dim=1)  # patches after BOS
        mask = None
        if attention_mask is not None:
            ones = attention_mask.new_ones(proj.shape[:2])
            mask = torch.cat([attention_mask[:, :1], ones, attention_mask[:, 1:]], dim=1)
        lab = None
        if labels is not None:
            lab = torch.cat([labels[:, :1], labels.new_full(proj.shape[:2], -100), labels[:, 1:]], dim=1)
        out = self.language_model(inputs_embeds=embeds, attention_mask=mask, labels=lab,
                                  use_cache=bool(use_cache) and not self.training)
        return CausalLMOutputWithPast(loss=out.loss, logits=out.logits, past_key_values=out.past_key_values)

    def _stats(self, unnorm_key: str | None) -> dict:
        if unnorm_key is None:
            assert len(self.config.norm_stats) == 1, f"pass unnorm_key, one of {list(self.config.norm_stats)}"
            unnorm_key = next(iter(self.config.norm_stats))
        return self.config.norm_stats[unnorm_key]["action"]

    @torch.no_grad()
    def predict_action(self, input_ids: torch.Tensor, unnorm_key: str | None = None,
                       pixel_values: torch.Tensor | None = None, **_: Any) -> np.ndarray:
        """Greedy over the whole vocabulary (as ``generate(do_sample=False)``), batch 1, then the descending
        token → bin centre → q01/q99 (masked dims) decoding of OpenVLA."""
        empty = self.config.empty_token_id
        if not bool((input_ids[:, -1] == empty).all()):
            input_ids = torch.cat([input_ids, input_ids.new_full((input_ids.shape[0], 1), empty)], dim=1)
        stats = self._stats(unnorm_key)
        dim = len(stats["q01"])
        out = self(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), pixel_values=pixel_values,
                   use_cache=True)
        toks = []
        for i in range(dim):
            nxt = out.logits[:, -1].argmax(dim=-1, keepdim=True)
            toks.append(int(nxt[0, 0]))
            if i < dim - 1:
                out = self(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True)
        bins = np.linspace(-1, 1, self.config.n_action_bins)
        centres = (bins[:-1] + bins[1:]) / 2.0
        idx = np.clip(self.vocab_size - np.asarray(toks) - 1, 0, centres.shape[0] - 1)
        norm = centres[idx]
        lo, hi = np.asarray(stats["q01"]), np.asarray(stats["q99"])
        mask = np.asarray(stats.get("mask", np.ones_like(lo, dtype=bool)), dtype=bool)
        return np.where(mask, 0.5 * (norm + 1) * (hi - lo) + lo, norm)
