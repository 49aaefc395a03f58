"""The VLA: an OpenVLA-shaped model built from ``transformers`` configs (no download), or a local HF VLA + LoRA.

Tiny kind (default, CPU-trainable): a small transformers vision model (ResNet, or ViT) → MLP projector → image
tokens, an optional proprio token, then the tokenized prompt "What action should the robot take to
{instruction}?", fed as ``inputs_embeds`` to a small ``LlamaForCausalLM``. The answer is 7 action tokens + EOS;
action tokens are the last 256 ids of the vocabulary (``vocab_size − 256 + bin``), and only they (and EOS) are
scored. The tokenizer is a word-level ``tokenizers`` model built locally and saved beside the weights.

Both kinds present one interface — ``forward(input_ids, attention_mask, pixel_values, proprio) -> logits`` with
the prompt left-padded and the action tokens at the end — so scoring, training and decoding share one code path.

A checkpoint dir holds ``config.json`` + ``model.safetensors`` (or a LoRA ``adapter/`` for kind ``hf``),
the tokenizer files, and ``apo_vla.json`` (kind, action statistics, token layout, model config).
"""

from __future__ import annotations

import contextlib
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

# robomimic pulls a PyPI torchvision that cannot load next to torch 2.13+cpu; transformers imports it eagerly
# when it is found. The VLA needs no torchvision, so hide it unless something already imported it fine.
if "torchvision" not in sys.modules:
    sys.modules["torchvision"] = None  # type: ignore[assignment]

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from transformers import (  # noqa: E402
    ConvNextConfig,
    ConvNextModel,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    ResNetConfig,
    ResNetModel,
    ViTConfig,
    ViTModel,
)

from apo_ray import actions, fsio  # noqa: E402
from apo_ray.checkpoint import META_FILE, TEXT_VOCAB, VOCAB_SIZE, checkpoint_dir, read_meta  # noqa: E402,F401
from apo_ray.config import ModelConfig  # noqa: E402
from apo_ray.errors import UserError  # noqa: E402
from apo_ray.loss import logp_where_differ, next_in_group  # noqa: E402
from apo_ray.schema import image_views  # noqa: E402

ACTION_DIM = 7
N_BINS = actions.N_BINS
N_SCORED = ACTION_DIM + 1  # 7 action tokens + EOS
PROMPT = "What action should the robot take to {instruction}?"
SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
# Words the tiny tokenizer always knows; instructions seen at build time are added. Others map to <unk>.
BASE_WORDS = (
    "what action should the robot take to lift pick up place put push insert stack move open close grasp "
    "cube block can bin box square nut peg stick round wooden red green blue yellow and onto into on in of "
    "from a an it its top bottom left right drawer door coffee make pod mug tool hang handle three pieces"
)


# ---------------------------------------------------------------------------------------------- tokenizer
def build_tokenizer(instructions: list[str] | tuple[str, ...] = ()):
    """Word-level tokenizer: 4 specials, words, ``<extra_i>`` padding to TEXT_VOCAB, then ``<act_0..255>``."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel

    words: list[str] = []
    pre = pre_tokenizers.Whitespace()
    text = " ".join([BASE_WORDS, PROMPT.format(instruction=""), *instructions]).lower()
    for w, _ in pre.pre_tokenize_str(text):
        if w not in words:
            words.append(w)
    if len(SPECIALS) + len(words) > TEXT_VOCAB:
        raise UserError(f"instructions need {len(words)} distinct words, more than the tiny tokenizer's "
                        f"{TEXT_VOCAB - len(SPECIALS)} text slots", "dataset instructions",
                        "use fewer distinct instructions or a kind: hf model")
    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for w in words:
        vocab[w] = len(vocab)
    while len(vocab) < TEXT_VOCAB:
        vocab[f"<extra_{len(vocab)}>"] = len(vocab)
    for b in range(N_BINS):
        vocab[f"<act_{b}>"] = len(vocab)
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre
    return tok


def _wrap_fast(tok):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")


# -------------------------------------------------------------------------------------------------- model
class ConvStem(nn.Module):
    """Plain stride-2 3x3 convs with GroupNorm: one halving per layer, no pooling, batch-independent."""

    def __init__(self, widths: list[int], num_channels: int = 3) -> None:
        super().__init__()
        layers, c = [], num_channels
        for w in widths:
            layers += [nn.Conv2d(c, w, 3, stride=2, padding=1), nn.GroupNorm(min(8, w), w), nn.GELU()]
            c = w
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TinyVLAConfig(PretrainedConfig):
    model_type = "apo_tiny_vla"

    def __init__(self, vision_kind: str = "resnet", vision_config: dict | None = None,
                 text_config: dict | None = None, image_size: int = 64, use_proprio: bool = False,
                 proprio_dim: int = 9, n_image_tokens: int = 16, proprio_mean: list[float] | None = None,
                 proprio_std: list[float] | None = None, coord_channels: bool = False, image_views: int = 1,
                 **kwargs: Any) -> None:
        self.vision_kind = vision_kind
        self.vision_config = vision_config or {}
        self.text_config = text_config or {}
        self.image_size = image_size
        self.use_proprio = use_proprio
        self.proprio_dim = proprio_dim
        self.n_image_tokens = n_image_tokens
        self.coord_channels = coord_channels
        self.image_views = image_views  # views tiled side by side: the image is (S, views·S)
        # the training data's proprio statistics: raw eef positions vary by centimetres around a ~1 m offset,
        # which a linear layer cannot resolve without standardising first
        self.proprio_mean = list(proprio_mean) if proprio_mean is not None else [0.0] * proprio_dim
        self.proprio_std = list(proprio_std) if proprio_std is not None else [1.0] * proprio_dim
        super().__init__(**kwargs)


class TinyVLA(PreTrainedModel):
    """Vision model → projector → (proprio) → Llama. Sequence: [image][proprio][left-padded prompt][actions]."""

    config_class = TinyVLAConfig
    base_model_prefix = "vla"
    main_input_name = "input_ids"
    _supports_sdpa = True

    def __init__(self, config: TinyVLAConfig) -> None:
        super().__init__(config)
        h = config.text_config["hidden_size"]
        if config.vision_kind == "resnet":
            self.vision = ResNetModel(ResNetConfig(**config.vision_config))
            vdim = config.vision_config["hidden_sizes"][-1]
        elif config.vision_kind == "convnext":
            self.vision = ConvNextModel(ConvNextConfig(**config.vision_config))
            vdim = config.vision_config["hidden_sizes"][-1]
        elif config.vision_kind == "conv":
            self.vision = ConvStem(**config.vision_config)
            vdim = config.vision_config["widths"][-1]
        elif config.vision_kind == "vit":
            self.vision = ViTModel(ViTConfig(**config.vision_config), add_pooling_layer=False)
            vdim = config.vision_config["hidden_size"]
        else:
            raise ValueError(f"unknown vision_kind {config.vision_kind!r}")
        self.projector = nn.Sequential(nn.Linear(vdim, h), nn.GELU(), nn.Linear(h, h))
        self.proprio_proj = (nn.Sequential(nn.Linear(config.proprio_dim, h), nn.LayerNorm(h))
                             if config.use_proprio else None)
        self.llm = LlamaForCausalLM(LlamaConfig(**config.text_config))
        self.post_init()
        self.train(self.training)  # nn.Module.__init__ does not go through train(): freeze BN stats now

    def train(self, mode: bool = True) -> TinyVLA:
        # BatchNorm keeps its fixed statistics: a sample's log-prob must not depend on what else is in the
        # batch (cached vs live reference, stacked scoring sets, micro-batch 8 vs 64). Its affine part trains.
        super().train(mode)
        for m in self.vision.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        return self

    # peft's "all-linear" spares the output head and its adapter save finds the embeddings through these two
    def get_input_embeddings(self) -> nn.Module:
        return self.llm.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.llm.get_output_embeddings()

    def encode_images(self, pixel_values: torch.Tensor, proprio: torch.Tensor | None = None) -> torch.Tensor:
        """(B,3,H,W) in [-1,1] (+ (B,9) proprio) → (B, T, hidden) prefix embeddings."""
        if self.config.coord_channels:
            # CoordConv: the pixel's own (x, y) as two more input channels, so the encoder can report where the
            # object is, not only that it is there (the policy must place the gripper to ~1 cm)
            b, _, hh, ww = pixel_values.shape
            ys = torch.linspace(-1, 1, hh, device=pixel_values.device, dtype=pixel_values.dtype)
            xs = torch.linspace(-1, 1, ww, device=pixel_values.device, dtype=pixel_values.dtype)
            grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij")).expand(b, 2, hh, ww)
            pixel_values = torch.cat([pixel_values, grid], dim=1)
        if self.config.vision_kind in ("resnet", "convnext"):
            feats = self.vision(pixel_values).last_hidden_state.flatten(2).transpose(1, 2)
        elif self.config.vision_kind == "conv":
            feats = self.vision(pixel_values).flatten(2).transpose(1, 2)
        else:
            feats = self.vision(pixel_values).last_hidden_state[:, 1:]
        x = self.projector(feats)
        if self.proprio_proj is not None:
            if proprio is None:
                raise ValueError("this model was built with use_proprio; pass proprio")
            # from the config, not buffers: they travel in config.json and never meet from_pretrained's meta init
            mean = torch.tensor(self.config.proprio_mean, device=proprio.device)
            std = torch.tensor(self.config.proprio_std, device=proprio.device)
            z = (proprio.float() - mean) / std
            x = torch.cat([x, self.proprio_proj(z.to(x.dtype)).unsqueeze(1)], dim=1)
        return x

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None, proprio: torch.Tensor | None = None,
                image_embeds: torch.Tensor | None = None, logits_to_keep: int = 0,
                cache: Any = None, use_cache: bool = False, position_ids: torch.Tensor | None = None,
                **_: Any):
        """HF-style forward. With ``cache`` set, ``input_ids`` are the next tokens only (decoding)."""
        tok = self.llm.get_input_embeddings()(input_ids)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if cache is None:
            img = image_embeds if image_embeds is not None else self.encode_images(pixel_values, proprio)
            embeds = torch.cat([img.to(tok.dtype), tok], dim=1)
            mask = torch.cat([attention_mask.new_ones(img.shape[:2]), attention_mask], dim=1)
        else:
            embeds, mask = tok, attention_mask
        if position_ids is None:
            position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -embeds.shape[1]:]
        return self.llm(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids,
                        logits_to_keep=logits_to_keep, cache=cache, use_cache=use_cache)


def tiny_config(mc: ModelConfig, image_size: int = 64, proprio_stats: dict | None = None,
                image_views: int = 1) -> TinyVLAConfig:
    """Default: 64×64 image → ResNet stages to a 4×4 grid = 16 image tokens; hidden 128, 4-layer Llama.
    With ``image_views`` views tiled side by side the grid is 4×(4·views), the same encoder over every view."""
    grid = image_size // mc.patch_size
    if grid < 1 or image_size % mc.patch_size:
        raise UserError(f"image_size {image_size} is not a multiple of model.patch_size {mc.patch_size}",
                        "config model.patch_size", "use a patch size that divides the image size")
    chans = 5 if mc.coord_channels else 3
    if mc.vision == "resnet":
        # stem (conv s2 + maxpool s2) gives /4, then one stride-2 stage per further halving
        n_stages = 1 + int(round(math.log2(mc.patch_size / 4)))
        v = mc.vision_hidden_size
        widths = [max(8, v >> (n_stages - 1 - i)) for i in range(n_stages)]
        vision = dict(num_channels=chans, embedding_size=widths[0], hidden_sizes=widths,
                      depths=[max(1, mc.vision_layers // 2)] * n_stages, layer_type="basic",
                      downsample_in_first_stage=False, hidden_act="relu")
    elif mc.vision == "convnext":
        # patchify stem /4, then one stride-2 stage per further halving; LayerNorm keeps samples independent
        n_stages = 1 + int(round(math.log2(mc.patch_size / 4)))
        v = mc.vision_hidden_size
        widths = [max(8, v >> (n_stages - 1 - i)) for i in range(n_stages)]
        vision = dict(num_channels=chans, patch_size=4, num_stages=n_stages, hidden_sizes=widths,
                      depths=[max(1, mc.vision_layers // 2)] * n_stages, hidden_act="gelu", drop_path_rate=0.0)
    elif mc.vision == "conv":
        n = int(round(math.log2(mc.patch_size)))
        v = mc.vision_hidden_size
        vision = dict(widths=[max(8, v >> (n - 1 - i)) for i in range(n)], num_channels=chans)
    else:
        vision = dict(image_size=[image_size, image_size * image_views], patch_size=mc.patch_size, num_channels=chans,
                      hidden_size=mc.vision_hidden_size, num_hidden_layers=mc.vision_layers,
                      num_attention_heads=max(1, mc.vision_hidden_size // 32),
                      intermediate_size=4 * mc.vision_hidden_size)
    text = dict(vocab_size=VOCAB_SIZE, hidden_size=mc.hidden_size, intermediate_size=4 * mc.hidden_size,
                num_hidden_layers=mc.num_layers, num_attention_heads=mc.num_heads,
                num_key_value_heads=mc.num_heads, max_position_embeddings=256, pad_token_id=PAD_ID,
                bos_token_id=BOS_ID, eos_token_id=EOS_ID, tie_word_embeddings=False)
    return TinyVLAConfig(vision_kind=mc.vision, vision_config=vision, text_config=text, image_size=image_size,
                         use_proprio=mc.use_proprio, n_image_tokens=grid * grid * image_views,
                         proprio_mean=(proprio_stats or {}).get("mean"), proprio_std=(proprio_stats or {}).get("std"),
                         coord_channels=mc.coord_channels, image_views=image_views)


# ----------------------------------------------------------------------------------------- inputs/meta
@dataclass(frozen=True)
class VLAMeta:
    """What turns observations into model inputs and tokens back into actions (saved as apo_vla.json)."""

    kind: str
    image_size: int
    use_proprio: bool
    action_offset: int
    """Token id of bin 0: vocab_size − 256."""
    eos_id: int
    pad_id: int
    bos_id: int
    action_stats: dict
    default_instruction: str = ""
    image_views: int = 1
    """Camera views tiled side by side in one image: agentview (1) or agentview + wrist (2)."""
    base_path: str = ""
    """kind hf: the base model directory the LoRA adapter belongs to, as given (a relative path stays relative,
    resolved against the working directory, so a run dir and its base can move together)."""
    model: dict | None = None
    action_tokens: str = actions.ASCENDING
    """The action-token convention (``apo_ray.actions``): ``ascending`` (tiny VLA) or ``openvla``; recorded
    here and read back, never re-derived from the tokenizer."""
    unnorm_key: str = ""
    """The key this checkpoint's action statistics take in an exported ``norm_stats``."""
    pixels: dict | None = None
    """kind hf: the model's own image preprocessing (Prismatic: ``sizes``, ``means``, ``stds``,
    ``interpolations``, ``letterbox``): one 3-channel block per vision backbone, stacked (6 for DINOv2 +
    SigLIP). None = the tiny VLA's single [-1, 1] block."""
    prompt: str = ""
    """kind hf: the model's prompt template ({instruction}); its ids are followed by ``prompt_suffix``."""
    prompt_suffix: list | None = None
    """Token ids after the prompt (OpenVLA: the empty token ``▁`` that ``predict_action`` appends)."""
    base_adapters: list | None = None
    """kind hf: LoRA adapters merged into the base, in order, before this checkpoint's own ``adapter/`` (a warm
    start merges its init's adapters and trains a fresh one, so the live reference is the adapter-disabled
    model). Saved inside the checkpoint as ``base_adapters/<i>``; absolute paths while in memory."""

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class VLAInputs:
    """A batch of N prompts. pixel_values (N,3,S,views·S) float in [-1,1]; input_ids/attention_mask (N,P) prompt,
    left-padded, starting with BOS; proprio (N,9) float32 or None."""

    pixel_values: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    proprio: torch.Tensor | None = None

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> VLAInputs:
        px = self.pixel_values.to(device)
        pr = self.proprio.to(device) if self.proprio is not None else None
        if dtype is not None:
            px = px.to(dtype)
            pr = pr.to(dtype) if pr is not None else None
        return VLAInputs(px, self.input_ids.to(device), self.attention_mask.to(device), pr)


class Processor:
    """Tokenizes prompts (cached per instruction) and converts uint8 images to pixel tensors."""

    def __init__(self, tokenizer, meta: VLAMeta) -> None:
        self.tokenizer = tokenizer  # a tokenizers.Tokenizer or an HF tokenizer
        self.meta = meta
        self._cache: dict[str, list[int]] = {}

    def prompt_ids(self, instruction: str) -> list[int]:
        ids = self._cache.get(instruction)
        if ids is None:
            inst = instruction.strip().rstrip("?.").strip()
            if self.meta.prompt:  # the model's own template; OpenVLA lower-cases instructions in training
                text = self.meta.prompt.format(instruction=inst.lower())
            else:
                text = PROMPT.format(instruction=inst)
            if hasattr(self.tokenizer, "encode") and hasattr(self.tokenizer, "get_vocab_size"):
                ids = [self.meta.bos_id, *self.tokenizer.encode(text, add_special_tokens=False).ids]
            else:
                ids = [self.meta.bos_id, *self.tokenizer(text, add_special_tokens=False)["input_ids"]]
            ids += list(self.meta.prompt_suffix or [])
            self._cache[instruction] = ids
        return ids

    def images(self, images: np.ndarray) -> torch.Tensor:
        if self.meta.pixels is not None:
            return prismatic_pixels(images, self.meta.pixels)
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
        views, (h, w) = self.meta.image_views, x.shape[-2:]
        if image_views(h, w) != views:
            have = {1: "one view", 2: "agentview + wrist"}.get(image_views(h, w), "neither layout")
            raise UserError(f"the policy takes {views} camera view(s) per image, the env gives {w}x{h} ({have})",
                            "env.wrist / --wrist", f"{'set' if views > 1 else 'unset'} wrist to match the policy")
        size = self.meta.image_size
        if h != size:
            x = F.interpolate(x, size=(size, size * views), mode="bilinear", align_corners=False, antialias=True)
        return x

    def __call__(self, images: np.ndarray, instructions: list[str], proprio: np.ndarray | None = None) -> VLAInputs:
        seqs = [self.prompt_ids(s) for s in instructions]
        p = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), p), self.meta.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), p), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, p - len(s):] = torch.tensor(s)
            mask[i, p - len(s):] = 1
        pr = torch.from_numpy(np.asarray(proprio, dtype=np.float32)) if (
            self.meta.use_proprio and proprio is not None) else None
        return VLAInputs(self.images(images), ids, mask, pr)


# ------------------------------------------------------------------------------------- actions <-> bins
def prismatic_pixels(images: np.ndarray, spec: dict) -> torch.Tensor:
    """(N,H,W,3) uint8 → (N, 3·backbones, S, S) as Prismatic's image processor makes them: letterbox (or not),
    PIL resize per backbone size and interpolation (resize-naive: to S × S; else the shorter edge to S and a
    centre crop), /255, normalise by that backbone's mean/std, blocks stacked on channels (OpenVLA-7B: DINOv2
    then SigLIP, 6 channels at 224 px)."""
    from PIL import Image

    modes = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}
    out = []
    for img in np.asarray(images):
        im = Image.fromarray(np.ascontiguousarray(img)).convert("RGB")
        if spec.get("letterbox") and im.size[0] != im.size[1]:
            # as Prismatic: int((max - side) / 2) on both sides, filled with the last backbone's mean
            w, h = im.size
            hp, vp = int((max(w, h) - w) / 2), int((max(w, h) - h) / 2)
            pad = Image.new("RGB", (w + 2 * hp, h + 2 * vp), tuple(int(m * 255) for m in spec["means"][-1]))
            pad.paste(im, (hp, vp))
            im = pad
        blocks = []
        for i, size in enumerate(spec["sizes"]):
            mean, std = np.asarray(spec["means"][i], np.float32), np.asarray(spec["stds"][i], np.float32)
            b, (w, h) = im, im.size
            mode = modes[(spec.get("interpolations") or ["bicubic"] * 8)[i]]
            if spec.get("naive"):  # resize-naive: straight to size × size
                b = b.resize((size, size), mode) if b.size != (size, size) else b
            elif min(w, h) != size or w != h:  # shorter edge to size, then a centre crop (letterbox's path)
                nw, nh = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
                b = b.resize((nw, nh), mode)
                top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
                b = b.crop((left, top, left + size, top + size))
            x = np.asarray(b, np.float32) / 255.0
            blocks.append(((x - mean) / std).transpose(2, 0, 1))
        out.append(np.concatenate(blocks, axis=0))
    return torch.from_numpy(np.stack(out))


def action_stats_for(meta: VLAMeta) -> dict:
    if "q01" not in meta.action_stats or "q99" not in meta.action_stats:
        raise UserError("action statistics lack q01/q99", META_FILE, "rebuild the dataset and retrain")
    return {"mask": [True] * (ACTION_DIM - 1) + [False], **meta.action_stats}


def tokens_to_actions(tokens: np.ndarray, meta: VLAMeta) -> np.ndarray:
    """Action token ids (..., 7) → raw robosuite actions at the bin centres, in the checkpoint's convention."""
    return actions.detokenize(tokens, action_stats_for(meta), meta.action_offset + N_BINS,
                              convention=meta.action_tokens)


# ------------------------------------------------------------------------------------------- scoring
@dataclass
class TokenScores:
    """For one set of 7 action tokens per sample: per-token log-probs of the 7 tokens + EOS (N,8) and the
    argmax action token at each of the 7 positions (N,7), restricted to the action range."""

    token_logp: torch.Tensor
    pred_tokens: torch.Tensor

    @property
    def logp(self) -> torch.Tensor:  # 7 action tokens + EOS
        return self.token_logp.sum(dim=1)

    @property
    def logp_u(self) -> torch.Tensor:  # 7 action tokens
        return self.token_logp[:, :ACTION_DIM].sum(dim=1)


def score_actions(model: nn.Module, inputs: VLAInputs, token_sets: list[torch.Tensor], meta: VLAMeta) -> list[TokenScores]:
    """Score several action-token sets (each (N,7)) for the same observations in one LLM forward.

    The image encoder runs once (tiny kind) and its embeddings are shared across the sets; the K sets are
    stacked along the batch. Logits are only computed for the 8 scored positions.
    """
    k, n = len(token_sets), inputs.input_ids.shape[0]
    dev = inputs.input_ids.device
    eos = torch.full((n, 1), meta.eos_id, dtype=torch.long, device=dev)
    ids = torch.cat([torch.cat([inputs.input_ids, t.long().to(dev), eos], dim=1) for t in token_sets], dim=0)
    amask = torch.cat([inputs.attention_mask, inputs.attention_mask.new_ones(n, N_SCORED)], dim=1).repeat(k, 1)
    core = _core(model)
    if isinstance(core, TinyVLA) and k > 1:
        return _score_shared_prefix(model, core, inputs, token_sets, meta)
    if isinstance(core, TinyVLA):
        img = core.encode_images(inputs.pixel_values, inputs.proprio)
        out = model(input_ids=ids[:, :-1], attention_mask=amask[:, :-1], image_embeds=img.repeat(k, 1, 1),
                    logits_to_keep=N_SCORED)
        logits = out.logits
    else:
        return _score_right_padded(model, inputs, token_sets, meta)
    logp = torch.log_softmax(logits.float(), dim=-1)
    targets = ids[:, -N_SCORED:]
    tok_logp = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    lo, hi = meta.action_offset, meta.action_offset + N_BINS
    pred = logits[:, :ACTION_DIM, lo:hi].argmax(dim=-1) + lo
    return [TokenScores(tok_logp[i * n:(i + 1) * n], pred[i * n:(i + 1) * n]) for i in range(k)]


def right_padded(inputs: VLAInputs, suffix: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded prompts + a (N, T) suffix → right-padded ``[prompt_i, suffix_i, pad...]`` ids, mask and each
    prompt's length. Prismatic inserts the image patches after position 0 (which must be BOS, not a pad) and
    its LLM numbers positions from 0 regardless of the mask, so pads go last, as OpenVLA's collator puts them."""
    lens = inputs.attention_mask.sum(dim=1)
    n, p = inputs.input_ids.shape
    t = suffix.shape[1]
    width = int(lens.max()) + t
    ids = torch.full((n, width), pad_id, dtype=torch.long, device=suffix.device)
    mask = torch.zeros((n, width), dtype=inputs.attention_mask.dtype, device=suffix.device)
    for i in range(n):
        li = int(lens[i])
        ids[i, :li] = inputs.input_ids[i, p - li:]
        ids[i, li:li + t] = suffix[i]
        mask[i, :li + t] = 1
    return ids, mask, lens


def _score_right_padded(model: nn.Module, inputs: VLAInputs, token_sets: list[torch.Tensor],
                        meta: VLAMeta) -> list[TokenScores]:
    """An HF VLA (Prismatic): score each set as ``[prompt, actions]`` right-padded, reading every sample's 8
    logits at its own positions (shifted by the image patches the model inserts after BOS)."""
    k, n = len(token_sets), inputs.input_ids.shape[0]
    dev = inputs.input_ids.device
    suffix = torch.cat([t.long().to(dev) for t in token_sets], dim=0)  # (k·n, 7)
    rep = VLAInputs(inputs.pixel_values.repeat(k, 1, 1, 1), inputs.input_ids.repeat(k, 1),
                    inputs.attention_mask.repeat(k, 1))
    ids, mask, lens = right_padded(rep, suffix, meta.pad_id)
    logits = model(input_ids=ids, attention_mask=mask, pixel_values=rep.pixel_values).logits
    patches = logits.shape[1] - ids.shape[1]
    pos = patches + lens.unsqueeze(1) - 1 + torch.arange(N_SCORED, device=dev)  # (k·n, 8)
    logits = logits.gather(1, pos.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))
    targets = torch.cat([suffix, torch.full((k * n, 1), meta.eos_id, dtype=torch.long, device=dev)], dim=1)
    tok_logp = torch.log_softmax(logits.float(), -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    lo = meta.action_offset
    pred = logits[:, :ACTION_DIM, lo:lo + N_BINS].argmax(-1) + lo
    return [TokenScores(tok_logp[i * n:(i + 1) * n], pred[i * n:(i + 1) * n]) for i in range(k)]


@contextlib.contextmanager
def reference_mode(model: nn.Module):
    """The live reference under LoRA: the same model with its adapters disabled (peft), no second copy.
    Yields the model to score with; raises if ``model`` carries no peft adapters."""
    m = model
    for _ in range(4):
        if hasattr(m, "disable_adapter") and hasattr(m, "peft_config"):
            with m.disable_adapter():
                yield model
            return
        m = getattr(m, "module", None)
        if m is None:
            break
    raise ValueError("reference_mode needs a peft (LoRA) model")


def has_lora(model: nn.Module) -> bool:
    m = model
    for _ in range(4):
        if hasattr(m, "peft_config"):
            return True
        m = getattr(m, "module", None)
        if m is None:
            return False
    return False


def decode_hf(model: nn.Module, inputs: VLAInputs, meta: VLAMeta) -> torch.Tensor:
    """Greedy decode of 7 action tokens for an HF VLA with its KV cache: one prompt pass, then one token per
    step, restricted to the action ids. One sample at a time, as Prismatic's cached forward only takes batch 1."""
    lo, hi = meta.action_offset, meta.action_offset + N_BINS
    if isinstance(_core(model), TinyVLA):  # an exported tiny VLA: its remote code keeps its own cache API
        ids, mask = inputs.input_ids, inputs.attention_mask
        for _ in range(ACTION_DIM):
            logits = model(input_ids=ids, attention_mask=mask, pixel_values=inputs.pixel_values).logits
            ids = torch.cat([ids, logits[:, -1, lo:hi].argmax(dim=-1, keepdim=True) + lo], dim=1)
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        return ids[:, -ACTION_DIM:]
    out_rows = []
    p = inputs.input_ids.shape[1]
    for i in range(inputs.input_ids.shape[0]):
        li = int(inputs.attention_mask[i].sum())
        ids = inputs.input_ids[i:i + 1, p - li:]
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=inputs.pixel_values[i:i + 1],
                    use_cache=True)
        toks = []
        for step in range(ACTION_DIM):
            nxt = out.logits[:, -1, lo:hi].argmax(dim=-1, keepdim=True) + lo
            toks.append(nxt)
            if step == ACTION_DIM - 1:
                break
            out = model(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True)
        out_rows.append(torch.cat(toks, dim=1))
    return torch.cat(out_rows, dim=0)


def _score_shared_prefix(model: nn.Module, core: TinyVLA, inputs: VLAInputs, token_sets: list[torch.Tensor],
                         meta: VLAMeta) -> list[TokenScores]:
    """K token sets share the observation prefix (image + prompt, ~80% of the sequence): run it once with a
    KV cache, repeat the cache K times and run only the 7-token suffixes. Gradients flow through the cache."""
    k, n = len(token_sets), inputs.input_ids.shape[0]
    dev = inputs.input_ids.device
    img = core.encode_images(inputs.pixel_values, inputs.proprio)
    pre = model(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask, image_embeds=img,
                use_cache=True, logits_to_keep=1)
    cache = pre.cache
    cache.batch_repeat_interleave(k)  # sample-major: row i*k + j = sample i, set j
    suffix = torch.stack([t.long().to(dev) for t in token_sets], dim=1).reshape(n * k, ACTION_DIM)
    pmask = torch.cat([inputs.attention_mask.new_ones(img.shape[:2]), inputs.attention_mask], 1).repeat_interleave(k, 0)
    mask = torch.cat([pmask, pmask.new_ones(n * k, ACTION_DIM)], 1)
    pos = pmask.sum(1, keepdim=True) + torch.arange(ACTION_DIM, device=dev)
    out = model(input_ids=suffix, attention_mask=mask, cache=cache, use_cache=True, position_ids=pos)
    logits = torch.cat([pre.logits[:, -1:].repeat_interleave(k, 0), out.logits], 1)  # (n*k, 8, V)
    targets = torch.cat([suffix, torch.full((n * k, 1), meta.eos_id, dtype=torch.long, device=dev)], 1)
    tok_logp = torch.log_softmax(logits.float(), -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    lo = meta.action_offset
    pred = logits[:, :ACTION_DIM, lo:lo + N_BINS].argmax(-1) + lo
    tok_logp, pred = tok_logp.reshape(n, k, N_SCORED), pred.reshape(n, k, ACTION_DIM)
    return [TokenScores(tok_logp[:, j], pred[:, j]) for j in range(k)]


@torch.no_grad()
def reference_logps(model: nn.Module, proc: Processor, images: np.ndarray, instructions: list[str],
                    action_tokens: np.ndarray, oracle_tokens: np.ndarray | None = None,
                    proprio: np.ndarray | None = None, group: int = 8) -> dict[str, np.ndarray]:
    """The reference stage's columns for N = G·group samples (one or more micro-batches):
    ``ref_logp`` (7 action tokens + EOS), ``ref_logp_u`` (7 tokens), ``ref_kl_logp`` (row i+1's 7 tokens,
    wrapping in the micro-batch) and, with oracle tokens, ``ref_logp_oracle`` (oracle tokens + EOS) and
    ``ref_logp_u_differ`` (the action tokens that differ from the oracle's). The trainer's live reference
    computes the same numbers with the same function calls."""
    model.eval()
    dev = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    inp = proc(images, instructions, proprio).to(dev, dtype)
    own = torch.as_tensor(np.asarray(action_tokens), dtype=torch.long, device=dev)
    sets = [own, next_in_group(own, group)]
    if oracle_tokens is not None:
        sets.append(torch.as_tensor(np.asarray(oracle_tokens), dtype=torch.long, device=dev))
    sc = score_actions(model, inp, sets, proc.meta)
    out = {"ref_logp": sc[0].logp, "ref_logp_u": sc[0].logp_u, "ref_kl_logp": sc[1].logp_u}
    if oracle_tokens is not None:
        out["ref_logp_oracle"] = sc[2].logp
        out["ref_logp_u_differ"] = logp_where_differ(sc[0].token_logp, own, sets[2])
    return {k: v.float().cpu().numpy().astype(np.float32) for k, v in out.items()}


def compute_dtype(device: torch.device | str) -> torch.dtype:
    """The one precision a policy trains, acts and is scored in on ``device``: bf16 on a GPU that has it, else fp32.
    Trainer, reference stage and rollouts all ask here, since a reference scored in another dtype than the policy
    would offset every log-ratio."""
    if torch.device(device).type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def reference_logp_fn(checkpoint: str | Path):
    """``fn(micro_batch, token_sets) -> [(B,8)]`` per-token reference log-probs of each set of (B,7) tokens + EOS
    (the dataset's reference stage, :data:`apo_ray.data.LogpFn`); same scoring code as the trainer's live
    reference."""
    ref, proc, _ = load_policy(checkpoint)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = compute_dtype(dev)
    ref.to(dev, dtype).eval()

    @torch.no_grad()
    def fn(mb: dict[str, np.ndarray], token_sets: list[np.ndarray]) -> list[np.ndarray]:
        inp = proc(mb["image"], [str(x) for x in mb["instruction"]], mb.get("proprio")).to(dev, dtype)
        sets = [torch.as_tensor(np.asarray(t), dtype=torch.long, device=dev) for t in token_sets]
        return [sc.token_logp.float().cpu().numpy() for sc in score_actions(ref, inp, sets, proc.meta)]

    return fn


def decoded_l1(pred_tokens: torch.Tensor, label_tokens: torch.Tensor, meta: VLAMeta) -> torch.Tensor:
    """Mean |bin centre(pred) − bin centre(label)| over the 7 dims, in normalised action space (N,)."""
    lo = meta.action_offset
    table = actions.tokens_to_norm(np.arange(lo, lo + N_BINS), lo + N_BINS, meta.action_tokens)
    centers = torch.as_tensor(table, dtype=torch.float32, device=pred_tokens.device)
    p = centers[(pred_tokens - lo).clamp(0, N_BINS - 1)]
    t = centers[(label_tokens.long() - lo).clamp(0, N_BINS - 1)]
    return (p - t).abs().mean(dim=1)


def _core(model: nn.Module) -> nn.Module:
    """The model behind DeepSpeed / peft wrappers (stops at a TinyVLA or when nothing wraps further)."""
    m = model
    for _ in range(8):
        if isinstance(m, TinyVLA):
            return m
        nxt = next((v for v in (getattr(m, a, None) for a in ("module", "base_model", "model"))
                    if isinstance(v, nn.Module) and v is not m), None)
        if nxt is None:
            return m
        m = nxt
    return m


# ------------------------------------------------------------------------------------ build/save/load
def build_model(mc: ModelConfig, action_stats: dict, image_size: int = 64, instructions: list[str] | tuple = (),
                seed: int = 0, proprio_stats: dict | None = None, image_views: int = 1):
    """A fresh model + processor. kind tiny: from configs; kind hf: the local VLA at ``mc.path`` (+ LoRA)."""
    if mc.kind == "hf":
        if image_views != 1:
            raise UserError("model.kind hf takes one camera view; the data has agentview + wrist images",
                            "config env.wrist", "collect the data with env.wrist: false")
        return load_hf(mc, action_stats, image_size)
    if mc.kind != "tiny":
        raise UserError(f"unknown model.kind '{mc.kind}'", "config model.kind", "use tiny or hf")
    torch.manual_seed(seed)
    model = TinyVLA(tiny_config(mc, image_size, proprio_stats, image_views))
    tok = build_tokenizer(list(instructions))
    uniq = sorted(set(instructions))
    meta = VLAMeta(kind="tiny", image_size=image_size, use_proprio=mc.use_proprio, action_offset=VOCAB_SIZE - N_BINS,
                   eos_id=EOS_ID, pad_id=PAD_ID, bos_id=BOS_ID, action_stats=_plain(action_stats),
                   default_instruction=uniq[0] if len(uniq) == 1 else "", image_views=image_views, model=asdict(mc))
    return model, Processor(tok, meta)


def with_lora(model: nn.Module, r: int, alpha: int) -> nn.Module:
    """``model`` with rank-``r`` LoRA adapters on every linear layer (peft); only the adapters train."""
    import warnings

    from peft import LoraConfig, get_peft_model

    # every linear layer but the output head, by full name: peft's "all-linear" spares the head by name only in
    # recent versions (peft 0.11, OpenVLA's era, adapts OpenVLA's lm_head and then saves the embeddings too)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    targets = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head]
    with warnings.catch_warnings():  # peft calls a transformers property deprecated in v5 (FutureWarning)
        warnings.simplefilter("ignore", FutureWarning)
        return get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0,
                                                target_modules=targets, init_lora_weights="gaussian"))


OPENVLA_PROMPT = "In: What action should the robot take to {instruction}?\nOut:"
"""OpenVLA's prompt (its PurePromptBuilder; README); ``predict_action`` appends the empty token ``▁``."""


def _prismatic_pixels(path: Path, cfg: Any) -> dict | None:
    """The image preprocessing of a Prismatic dir (config.image_sizes + preprocessor_config.json), or None."""
    sizes = getattr(cfg, "image_sizes", None)
    if not sizes:
        return None
    pp = path / "preprocessor_config.json"
    if not pp.is_file():
        raise UserError("a Prismatic model dir needs its preprocessor_config.json (image means/stds)", str(pp),
                        "copy the model's preprocessor_config.json beside its config.json")
    import json

    spec = json.loads(pp.read_text())
    n = len(spec.get("means") or [])
    if n != len(sizes) or len(spec.get("stds") or []) != n:
        raise UserError(f"preprocessor_config.json has {n} means for {len(sizes)} vision backbones", str(pp),
                        "use the preprocessor_config.json released with the model")
    return {"sizes": [int(x) for x in sizes], "means": spec["means"], "stds": spec["stds"],
            "interpolations": spec.get("interpolations") or ["bicubic"] * n,
            "letterbox": spec.get("image_resize_strategy", "letterbox") == "letterbox",
            "naive": spec.get("image_resize_strategy") == "resize-naive"}


def _dtype_kw(dtype: torch.dtype) -> dict:
    import transformers

    return {"dtype": dtype} if int(transformers.__version__.split(".")[0]) >= 5 else {"torch_dtype": dtype}


def load_hf(mc: ModelConfig, action_stats: dict | None, image_size: int = 224, unnorm_key: str = "apo_ray"):
    """Load a local HF VLA directory (``trust_remote_code``), wrapped with LoRA (``model.lora_rank``) via peft.

    Its token layout (action vocabulary, convention) comes from its config.json (:func:`hf_token_layout`), its
    pixels from its own processor config, its prompt from its family. Without ``action_stats`` an OpenVLA's
    ``norm_stats[unnorm_key]`` are used."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    from apo_ray.checkpoint import hf_token_layout

    path = Path(mc.path)
    if not (path / "config.json").is_file():
        raise UserError(f"no HF model at '{path}' (config.json missing)", "config model.path",
                        "point model.path at a local HF VLA directory")
    layout = hf_token_layout(path, mc.action_tokens)
    dtype = compute_dtype("cuda" if torch.cuda.is_available() else "cpu")
    cfg = AutoConfig.from_pretrained(path, trust_remote_code=True)
    auto_map = getattr(cfg, "auto_map", {}) or {}
    # OpenVLA registers AutoModelForVision2Seq, which transformers 5 no longer has: load its class directly
    key = next((k for k in ("AutoModelForVision2Seq", "AutoModelForImageTextToText", "AutoModelForCausalLM",
                            "AutoModel") if k in auto_map), None)
    if key is not None:
        cls = get_class_from_dynamic_module(auto_map[key], str(path))
        model = cls.from_pretrained(path, **_dtype_kw(dtype))
    else:
        model = AutoModelForCausalLM.from_pretrained(path, **_dtype_kw(dtype))
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
    if mc.lora_rank > 0:
        model = with_lora(model, mc.lora_rank, mc.lora_alpha)
    if not action_stats:
        stats = (getattr(cfg, "norm_stats", None) or {}).get(unnorm_key, {}).get("action")
        if stats is None:
            raise UserError(f"no action statistics: none given and no norm_stats['{unnorm_key}'] in the model",
                            str(path / "config.json"), "build a dataset first, or pass an unnorm key the model has")
        action_stats = {k: stats[k] for k in ("q01", "q99", "mask") if k in stats}
    openvla = layout["action_tokens"] == actions.OPENVLA
    suffix = None
    if openvla:
        empty = tok.convert_tokens_to_ids("\u2581")
        if empty is None or empty == tok.unk_token_id:
            raise UserError("the tokenizer has no empty token '\u2581' to end OpenVLA's prompt", str(path),
                            "use the tokenizer released with the model")
        suffix = [int(empty)]
    pixels = _prismatic_pixels(path, cfg)
    size = int(pixels["sizes"][0] if pixels else (getattr(cfg, "image_size", 0) or image_size))
    meta = VLAMeta(kind="hf", image_size=size, use_proprio=False, action_offset=layout["vocab_size"] - N_BINS,
                   eos_id=int(tok.eos_token_id), pad_id=int(tok.pad_token_id if tok.pad_token_id is not None else 0),
                   bos_id=int(tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id),
                   action_stats=_plain(action_stats), base_path=str(mc.path), model=asdict(mc),
                   action_tokens=layout["action_tokens"], unnorm_key=unnorm_key, pixels=pixels,
                   prompt=OPENVLA_PROMPT if openvla else "", prompt_suffix=suffix)
    return model, Processor(tok, meta)


def save_checkpoint(model: nn.Module, proc: Processor, out_dir: str | Path, state_dict: dict | None = None) -> Path:
    """Write an HF-format checkpoint dir (safetensors + tokenizer + apo_vla.json). Atomic: temp dir, rename."""
    out = Path(out_dir)
    with fsio.atomic_dir(out) as tmp:
        m = model.module if hasattr(model, "module") and not isinstance(model, PreTrainedModel) else model
        if proc.meta.kind == "hf" and hasattr(m, "peft_config"):
            m.save_pretrained(tmp / "adapter", state_dict=state_dict, safe_serialization=True)
        else:
            m.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        _save_tokenizer(proc.tokenizer, tmp)
        meta = proc.meta.to_json()
        if proc.meta.base_adapters:  # copied in: a checkpoint must not depend on its ancestors' dirs
            import shutil

            meta["base_adapters"] = []
            for i, a in enumerate(proc.meta.base_adapters):
                shutil.copytree(a, tmp / "base_adapters" / str(i))
                meta["base_adapters"].append(f"base_adapters/{i}")
        fsio.write_json(tmp / META_FILE, meta)
    return out


def _save_tokenizer(tok, out: Path) -> None:
    (_wrap_fast(tok) if hasattr(tok, "get_vocab_size") else tok).save_pretrained(out)


def export_hf(ckpt_dir: str | Path, out_dir: str | Path, merged: bool = False) -> Path:
    """Write a checkpoint as a self-contained HF VLA directory.

    A tiny checkpoint: config.json with an ``auto_map`` + the modeling code beside it (``trust_remote_code``),
    safetensors and the tokenizer, its layout stated (``apo_action_tokens``, ``apo_action_vocab_size``), the dir
    ``model.kind: hf`` loads; it exercises the hf path end to end without a model hub (the code imports apo_ray).
    An hf checkpoint (``merged``): the base with the LoRA adapter merged in, saved beside the base's own code,
    tokenizer and processor files, with ``norm_stats[unnorm_key]`` = this checkpoint's action statistics, so
    the model's own ``predict_action(..., unnorm_key=...)`` loads and runs it."""
    d = checkpoint_dir(ckpt_dir)
    meta = read_meta(d)
    if meta.get("kind") == "hf":
        if not merged:
            raise UserError("an hf checkpoint exports merged (base + adapter in one set of weights)", str(d),
                            "pass --merged")
        return _export_merged(d, Path(out_dir))
    if meta.get("kind") != "tiny":
        raise UserError(f"unknown checkpoint kind {meta.get('kind')}", str(d), "pass a checkpoint of apo-ray train")
    if meta.get("image_views", 1) != 1 or meta.get("use_proprio"):
        raise UserError("model.kind hf takes one camera view and no proprio token; this checkpoint uses "
                        + ("the wrist view" if meta.get("image_views", 1) != 1 else "proprio"), str(d),
                        "export a checkpoint trained with env.wrist: false and model.use_proprio: false")
    model, proc, _ = load_policy(d)
    model.config.apo_action_tokens = proc.meta.action_tokens
    model.config.apo_action_vocab_size = proc.meta.action_offset + N_BINS
    # registration is class state: undo it, or every later checkpoint of this process would carry the code too
    TinyVLAConfig.register_for_auto_class()
    TinyVLA.register_for_auto_class("AutoModelForCausalLM")
    out = Path(out_dir)
    try:
        with fsio.atomic_dir(out) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            _save_tokenizer(proc.tokenizer, tmp)
    finally:
        TinyVLAConfig._auto_class = TinyVLA._auto_class = None
    return out


def _export_merged(d: Path, out: Path) -> Path:
    import json
    import shutil

    model, proc, _ = load_policy(d)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    meta = proc.meta
    base = Path(meta.base_path)
    stats = action_stats_for(meta)
    with fsio.atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        for f in base.iterdir():  # the base's own code, tokenizer and processor files
            if f.is_file() and (f.suffix == ".py" or f.name in (
                    "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                    "added_tokens.json", "preprocessor_config.json", "processor_config.json",
                    "generation_config.json")) and not (tmp / f.name).exists():
                shutil.copy2(f, tmp / f.name)
        cfg = json.loads((tmp / "config.json").read_text())
        base_cfg = json.loads((base / "config.json").read_text())
        if "auto_map" in base_cfg:
            cfg["auto_map"] = base_cfg["auto_map"]
        norm = dict(cfg.get("norm_stats") or {})
        norm[meta.unnorm_key or "apo_ray"] = {"action": {k: _plain(stats[k]) for k in ("q01", "q99", "mask")}}
        cfg["norm_stats"] = norm
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


def check_checkpoint(ckpt_dir: str | Path) -> None:
    """Raise UserError if ``ckpt_dir`` would not load. A tiny checkpoint is loaded once (about a second); of an hf
    one only the metadata is read, since loading a 7B base on the driver costs minutes."""
    if read_meta(ckpt_dir).get("kind") != "hf":
        load_policy(ckpt_dir)


def load_policy(ckpt_dir: str | Path, trainable: bool = False, fresh_lora: bool = False):
    """Load a checkpoint dir → (model, processor, action_stats). Missing/corrupt dirs raise UserError.

    kind hf with ``fresh_lora`` (a warm start): the checkpoint's adapter is merged into the base too and a new
    zero-initialised one is added, so the model with its adapters disabled is exactly the checkpoint."""
    d = checkpoint_dir(ckpt_dir)
    try:
        meta = VLAMeta(**read_meta(d))
    except TypeError as e:
        raise UserError(f"corrupt {META_FILE}: {e}", str(d / META_FILE), "retrain or restore the checkpoint") from None
    try:
        if meta.kind == "tiny":
            from tokenizers import Tokenizer
            from transformers.utils import logging as hf_logging

            level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
            hf_logging.set_verbosity_error()  # its load report and progress bar would reach stderr
            hf_logging.disable_progress_bar()
            try:
                model, info = TinyVLA.from_pretrained(d, output_loading_info=True)
            except RuntimeError as e:
                if "ignore_mismatched_sizes" not in str(e):
                    raise
                raise UserError("weights do not fit the model config (tensor shapes differ)",
                                str(d / "model.safetensors"),
                                "the weights come from another model config; restore the checkpoint or retrain") from None
            finally:
                hf_logging.set_verbosity(level)
                if bars:
                    hf_logging.enable_progress_bar()
            # transformers re-initialises missing or mismatched weights with only a warning: never serve those
            bad = [(k, sorted(info.get(k) or [], key=str)) for k in ("mismatched_keys", "missing_keys", "unexpected_keys")]
            bad = [(k, v) for k, v in bad if v]
            if bad:
                first = bad[0][1][0]
                name = first[0] if isinstance(first, tuple | list) else first
                raise UserError(f"weights do not fit the model config: {len(bad[0][1])} {bad[0][0].replace('_', ' ')}"
                                f", e.g. {name}", str(d / "model.safetensors"),
                                "the weights come from another model config; restore the checkpoint or retrain")
            tok = Tokenizer.from_file(str(d / "tokenizer.json"))
            vocab = model.config.text_config["vocab_size"]
            if tok.get_vocab_size() != vocab or tok.token_to_id("<act_0>") != meta.action_offset:
                raise UserError(f"tokenizer does not match the model: {tok.get_vocab_size()} ids, <act_0> at "
                                f"{tok.token_to_id('<act_0>')}; the model has {vocab} ids, actions at "
                                f"{meta.action_offset}", str(d / "tokenizer.json"),
                                "restore the checkpoint's own tokenizer.json or retrain")
        else:
            mc = ModelConfig(**{**(meta.model or {}), "kind": "hf", "path": meta.base_path, "lora_r": 0})
            model, proc = load_hf(mc, meta.action_stats, meta.image_size, meta.unnorm_key or "apo_ray")
            if (proc.meta.action_tokens, proc.meta.action_offset) != (meta.action_tokens, meta.action_offset):
                raise UserError(f"the base model's action tokens ({proc.meta.action_tokens} from "
                                f"{proc.meta.action_offset}) differ from the checkpoint's ({meta.action_tokens} from "
                                f"{meta.action_offset})", str(d / META_FILE), "point base_path at the checkpoint's base")
            from peft import PeftModel

            chain = [d / a for a in (meta.base_adapters or [])]
            for a in chain:
                model = PeftModel.from_pretrained(model, a).merge_and_unload()
            if (d / "adapter").is_dir():
                if fresh_lora:
                    model = PeftModel.from_pretrained(model, d / "adapter").merge_and_unload()
                    chain.append(d / "adapter")
                    model = with_lora(model, ModelConfig(**(meta.model or {"kind": "hf"})).lora_rank or 32,
                                      (meta.model or {}).get("lora_alpha", 16))
                else:
                    model = PeftModel.from_pretrained(model, d / "adapter", is_trainable=trainable)
            meta = VLAMeta(**{**meta.to_json(), "base_adapters": [str(a.resolve()) for a in chain] or None})
            tok = proc.tokenizer
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - safetensors/transformers/peft raise many types for a bad dir
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load checkpoint: {first}", str(d), "retrain or restore the checkpoint") from None
    model.train(trainable)
    if not trainable:
        model.requires_grad_(False)
    return model, Processor(tok, meta), meta.action_stats


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple | np.ndarray):
        return [_plain(v) for v in (x.tolist() if isinstance(x, np.ndarray) else x)]
    if isinstance(x, np.generic):
        return x.item()
    return x
