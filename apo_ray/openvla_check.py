"""Tiny random-init OpenVLA-shaped model dirs, and the end-to-end check of our path against one.

``write_tiny_prismatic`` writes our own OpenVLA-interface model (apo_ray/tiny_prismatic.py as remote code) for
CI. ``write_tiny_openvla`` writes one from a local checkout of openvla/openvla: that checkout's own
configuration/modeling/processing files, tiny timm ViTs and a 2-layer Llama (scripts/check_openvla.sh; the files
are copied into the model dir at run time, as a hub download would, never into this repo). ``check`` runs our
model-level path on such a dir: LoRA BC steps, APO with the cached reference against the adapter-disabled live
one, our greedy decode against the exported model's own ``predict_action``.

Both tokenizers are Llama-like word-level ones: 32000 base ids (``<unk>``, ``<s>``, ``</s>`` at 0..2, the empty
token ``▁`` at 29871, as OpenVLA's ``predict_action`` hard-codes), an added ``<PAD>`` at 32000, and a text
vocabulary padded to 32064 (``pad_to_multiple_of`` 64): the layout of openvla-7b.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

BASE_VOCAB, EMPTY_ID, MULTIPLE = 32000, 29871, 64
TEXT_VOCAB = BASE_VOCAB + MULTIPLE  # 32001 rounded up to a multiple of 64
# DINOv2 (ImageNet) then SigLIP normalisation: the two blocks of a fused dinosiglip input
MEANS = [[0.485, 0.456, 0.406], [0.5, 0.5, 0.5]]
STDS = [[0.229, 0.224, 0.225], [0.5, 0.5, 0.5]]
PROMPT_WORDS = "In : What action should the robot take to ? Out"


def llama_like_tokenizer(instructions: list[str]):
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    words = " ".join([PROMPT_WORDS, *instructions]).split()
    for w, _ in pre_tokenizers.Whitespace().pre_tokenize_str(" ".join(words).lower() + " " + " ".join(words)):
        vocab.setdefault(w, len(vocab))
    inv = {i: t for t, i in vocab.items()}
    full = {}
    for i in range(BASE_VOCAB):
        full[inv.get(i, "\u2581" if i == EMPTY_ID else f"<t{i}>")] = i
    tok = Tokenizer(WordLevel(full, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   model_input_names=["input_ids", "attention_mask"])  # as Llama's: no type ids
    fast.add_special_tokens({"pad_token": "<PAD>"})
    assert fast.vocab_size == BASE_VOCAB and fast.pad_token_id == BASE_VOCAB and len(fast) == BASE_VOCAB + 1
    return fast


def _action_only_head(lm_head_weight) -> None:
    """Zero the output rows of every id but the 256 action ids: a random-init model then emits action tokens at
    the action positions, as a trained VLA does, so a greedy decode over the whole vocabulary (OpenVLA's
    predict_action, through generate) and one over the action ids (ours) can be compared. EOS is zeroed too:
    generate stops at it, and a random EOS row won the argmax often enough that predict_action read prompt
    tokens as actions (the first check run). LoRA leaves the head frozen, so the rows stay zero."""
    import torch

    with torch.no_grad():
        keep = torch.zeros(lm_head_weight.shape[0], dtype=torch.bool)
        keep[BASE_VOCAB - 256:BASE_VOCAB] = True
        lm_head_weight[~keep] = 0.0


def _preprocessor(out: Path, sizes: list[int], strategy: str = "resize-naive", prismatic_code: bool = False) -> None:
    spec: dict[str, Any] = {
        "image_processor_type": "PrismaticImageProcessor", "use_fused_vision_backbone": True,
        "image_resize_strategy": strategy, "input_sizes": [[3, s, s] for s in sizes],
        "interpolations": ["bicubic", "bicubic"], "means": MEANS, "stds": STDS}
    if prismatic_code:
        spec["auto_map"] = {"AutoImageProcessor": "processing_prismatic.PrismaticImageProcessor",
                            "AutoProcessor": "processing_prismatic.PrismaticProcessor"}
    (out / "preprocessor_config.json").write_text(json.dumps(spec, indent=2))


def _text_config(hidden: int, layers: int) -> dict[str, Any]:
    return dict(vocab_size=TEXT_VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=BASE_VOCAB,
                bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)


def write_tiny_prismatic(out: str | Path, instructions: list[str], image_size: int = 32, hidden: int = 64,
                         layers: int = 2, seed: int = 0) -> Path:
    """Our own OpenVLA-interface model (apo_ray/tiny_prismatic.py) as a remote-code HF dir."""
    import torch

    from apo_ray import tiny_prismatic as T

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    cfg = T.TinyPrismaticConfig(image_sizes=[image_size, image_size], text_config=_text_config(hidden, layers),
                                norm_stats={"base": {"action": {"q01": [-1.0] * 6 + [0.0], "q99": [1.0] * 7,
                                                                "mask": [True] * 6 + [False]}}})
    model = T.TinyPrismatic(cfg)
    _action_only_head(model.language_model.lm_head.weight)
    model.save_pretrained(out, safe_serialization=True)
    shutil.copy2(T.__file__, out / "tiny_prismatic.py")
    c = json.loads((out / "config.json").read_text())
    c["auto_map"] = {"AutoConfig": "tiny_prismatic.TinyPrismaticConfig",
                     "AutoModelForVision2Seq": "tiny_prismatic.TinyPrismatic"}
    (out / "config.json").write_text(json.dumps(c, indent=2))
    llama_like_tokenizer(instructions).save_pretrained(out)
    _preprocessor(out, [image_size, image_size])
    return out


# ------------------------------------------------------------------------------ against OpenVLA's own code
HF_FILES = ("configuration_prismatic.py", "modeling_prismatic.py", "processing_prismatic.py")
# tiny timm ViTs with OpenVLA's structure: a DINOv2 with registers and LayerScale (OpenVLA patches LayerScale),
# and a second patch-14 ViT, so both give the same patch grid, as DINOv2-L + SigLIP-SO400M do at 224 px
TINY_TIMM = ["vit_small_patch14_reg4_dinov2.lvd142m", "vit_small_patch14_dinov2.lvd142m"]


def write_tiny_openvla(out: str | Path, openvla_src: str | Path, instructions: list[str], image_size: int = 56,
                       hidden: int = 64, layers: int = 2, seed: int = 0) -> Path:
    """A random-init OpenVLAForActionPrediction built by the checkout's own code: its config class
    (dinosiglip-vit-so-224px + llama2-7b-pure, then tiny timm ids and sizes), tokenizer layout of openvla-7b."""
    import torch
    from transformers import AutoConfig
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    src = Path(openvla_src) / "prismatic" / "extern" / "hf"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for f in HF_FILES:
        shutil.copy2(src / f, out / f)
    auto_map = {"AutoConfig": "configuration_prismatic.OpenVLAConfig",
                "AutoModelForVision2Seq": "modeling_prismatic.OpenVLAForActionPrediction"}
    (out / "config.json").write_text(json.dumps({
        "model_type": "openvla", "auto_map": auto_map, "vision_backbone_id": "dinosiglip-vit-so-224px",
        "llm_backbone_id": "llama2-7b-pure", "arch_specifier": "no-align+fused-gelu-mlp",
        "use_fused_vision_backbone": True, "image_resize_strategy": "resize-naive",
        "text_config": {k: v for k, v in _text_config(hidden, layers).items() if k != "tie_word_embeddings"},
        "pad_token_id": BASE_VOCAB, "pad_to_multiple_of": MULTIPLE, "n_action_bins": 256,
        "timm_model_ids": TINY_TIMM, "timm_override_act_layers": [None, None],
        "image_sizes": [image_size, image_size],
        "norm_stats": {"base": {"action": {"q01": [-1.0] * 6 + [0.0], "q99": [1.0] * 7,
                                           "mask": [True] * 6 + [False]}}}}))
    cfg = AutoConfig.from_pretrained(out, trust_remote_code=True)
    assert cfg.timm_model_ids == TINY_TIMM and cfg.image_sizes == [image_size, image_size], "config overrides lost"
    cls = get_class_from_dynamic_module(auto_map["AutoModelForVision2Seq"], str(out))
    torch.manual_seed(seed)
    model = cls(cfg)
    _action_only_head(model.language_model.lm_head.weight)
    model.save_pretrained(out, safe_serialization=True)
    c = json.loads((out / "config.json").read_text())
    c["auto_map"] = auto_map
    (out / "config.json").write_text(json.dumps(c, indent=2))
    llama_like_tokenizer(instructions).save_pretrained(out)
    _preprocessor(out, [image_size, image_size], prismatic_code=True)
    return out


def check(openvla_src: str | Path, work: str | Path, steps: int = 4, seed: int = 0) -> dict[str, Any]:
    """Our model-level path on a tiny OpenVLA built from ``openvla_src``; returns the summary the script prints."""
    import torch
    import torchvision  # noqa: F401 - before apo_ray.model, which hides a torchvision that cannot load
    from PIL import Image
    from transformers import AutoModelForVision2Seq, AutoTokenizer
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    from apo_ray import actions as A
    from apo_ray import model as M
    from apo_ray.config import ModelConfig
    from apo_ray.loss import LossParams, Scores, next_in_group, objective_loss
    from apo_ray.vla_policy import VLAPolicy

    work = Path(work)
    inst = "lift the red cube"
    base = write_tiny_openvla(work / "tiny_openvla", openvla_src, [inst])
    rng = np.random.default_rng(seed)
    n, img_px = 8, 64
    images = rng.integers(0, 255, (n, img_px, img_px, 3), dtype=np.uint8)
    raw = rng.uniform(-1, 1, (n, 7)).astype(np.float32)
    raw[:, 6] = np.where(rng.random(n) < 0.5, -1.0, 1.0)  # robosuite gripper: -1 open, +1 closed
    stats = A.action_stats(raw)
    res: dict[str, Any] = {"ok": False, "steps": 0}

    # the checkout's own processor against ours: pixels (6 channels) and prompt ids
    ip_cls = get_class_from_dynamic_module("processing_prismatic.PrismaticImageProcessor", str(base))
    pp_cls = get_class_from_dynamic_module("processing_prismatic.PrismaticProcessor", str(base))
    spec = json.loads((base / "preprocessor_config.json").read_text())
    their_proc = pp_cls(ip_cls(**{k: spec[k] for k in ("use_fused_vision_backbone", "image_resize_strategy",
                                                        "input_sizes", "interpolations", "means", "stds")}),
                        AutoTokenizer.from_pretrained(base))
    model, proc = M.load_hf(ModelConfig(kind="hf", path=str(base), lora_r=8, lora_alpha=16), stats, img_px)
    prompt = f"In: What action should the robot take to {inst}?\nOut:"
    theirs0 = their_proc(prompt, Image.fromarray(images[0]))
    ours0 = proc(images[:1], [inst])
    res["pixel_values_shape"] = list(ours0.pixel_values.shape)
    res["pixel_max_abs_diff"] = float((theirs0["pixel_values"] - ours0.pixel_values).abs().max())
    res["prompt_ids_match"] = theirs0["input_ids"][0].tolist() + [EMPTY_ID] == ours0.input_ids[0].tolist()
    # the other two resize strategies, on a non-square image (openvla-7b letterboxes nothing: resize-naive)
    odd = rng.integers(0, 255, (47, 70, 3), dtype=np.uint8)
    for strategy in ("letterbox", "resize-crop"):
        ip = ip_cls(**{**{k: spec[k] for k in ("use_fused_vision_backbone", "input_sizes", "interpolations",
                                               "means", "stds")}, "image_resize_strategy": strategy})
        ours_px = M.prismatic_pixels(odd[None], {**proc.meta.pixels, "letterbox": strategy == "letterbox",
                                                 "naive": False})
        theirs_px = ip(Image.fromarray(odd), return_tensors="pt")["pixel_values"]
        res[f"pixel_{strategy}_max_abs_diff"] = float((theirs_px - ours_px).abs().max())

    # BC with LoRA: our scoring path, OpenVLA's forward (patches after BOS, its own labels-free logits)
    tokens = torch.as_tensor(A.tokenize(raw, stats, proc.meta.action_offset + A.N_BINS,
                                        convention=proc.meta.action_tokens))
    inp = proc(images, [inst] * n)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-3)
    model.train()
    for _ in range(steps):
        sc = M.score_actions(model, inp, [tokens], proc.meta)[0]
        loss = -sc.token_logp.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        res["steps"] += 1
    res["bc_loss"] = float(loss)
    model.eval()
    ck = M.save_checkpoint(model, proc, work / "bc_ckpt")

    # APO from the BC checkpoint: the reference stage's cached log-probs vs the adapter-disabled live reference
    group = 4
    cached = M.reference_logps(*M.load_policy(ck)[:2], images, [inst] * n, tokens.numpy(), group=group)
    pol, pproc, _ = M.load_policy(ck, trainable=True, fresh_lora=True)
    pol.eval()
    sets = [tokens, next_in_group(tokens, group)]
    with torch.no_grad():
        sc = M.score_actions(pol, pproc(images, [inst] * n), sets, pproc.meta)
        with M.reference_mode(pol):
            rs = M.score_actions(pol, pproc(images, [inst] * n), sets, pproc.meta)
    c = torch.as_tensor(rng.integers(0, 3, n))

    def apo(ref_logp, ref_logp_u, ref_kl) -> float:
        s = Scores(logp=sc[0].logp, logp_u=sc[0].logp_u, token_logp=sc[0].token_logp, c=c,
                   is_expert=torch.zeros(n, dtype=torch.bool), l1=torch.zeros(n), group=group,
                   ref_logp=ref_logp, ref_logp_u=ref_logp_u, kl_logp=sc[1].logp_u, ref_kl_logp=ref_kl)
        return float(objective_loss("apo", s, LossParams())[0])

    l_cached = apo(*(torch.as_tensor(cached[k]) for k in ("ref_logp", "ref_logp_u", "ref_kl_logp")))
    l_live = apo(rs[0].logp, rs[0].logp_u, rs[1].logp_u)
    res["apo_loss"] = l_live
    res["apo_cached_vs_live_gap"] = abs(l_cached - l_live)
    res["ref_logp_max_abs_diff"] = float(np.abs(cached["ref_logp"] - rs[0].logp.numpy()).max())

    # deploy: the merged export through OpenVLA's own loader and predict_action, against our policy
    merged = M.export_hf(ck, work / "merged", merged=True)
    vla = AutoModelForVision2Seq.from_pretrained(merged, trust_remote_code=True).eval()
    ours = VLAPolicy(ck, threads=None).act([{"image": im, "instruction": inst} for im in images])
    theirs = []
    for im in images:
        x = their_proc(prompt, Image.fromarray(im))
        theirs.append(vla.predict_action(**x, unnorm_key="apo_ray", do_sample=False))
    theirs_env = A.model_to_env(np.stack(theirs), A.OPENVLA)
    res["predict_action_max_abs_diff"] = float(np.abs(theirs_env - ours).max())
    import timm
    import transformers

    res["versions"] = {"transformers": transformers.__version__, "timm": timm.__version__,
                       "torch": torch.__version__}
    px = max(res[k] for k in res if k.startswith("pixel_") and k.endswith("_diff"))
    res["ok"] = bool(res["prompt_ids_match"] and px < 1e-4 and np.isfinite(res["bc_loss"])
                     and res["apo_cached_vs_live_gap"] < 1e-4 and res["predict_action_max_abs_diff"] < 1e-5)
    return res


def main(argv: list[str] | None = None) -> int:
    import argparse
    import tempfile

    ap = argparse.ArgumentParser(description="our model.kind hf path against OpenVLA's own code (tiny random init)")
    ap.add_argument("openvla_src", help="a local checkout of openvla/openvla")
    ap.add_argument("--work", help="work dir (default: a temp dir)")
    ap.add_argument("--steps", type=int, default=4)
    a = ap.parse_args(argv)
    if not (Path(a.openvla_src) / "prismatic" / "extern" / "hf" / "modeling_prismatic.py").is_file():
        print(f"error: no prismatic/extern/hf/modeling_prismatic.py under {a.openvla_src} (OPENVLA_SRC); fix: pass "
              "a checkout of github.com/openvla/openvla")
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        try:
            res = check(a.openvla_src, a.work or tmp, a.steps)
        except Exception as e:  # noqa: BLE001 - the summary line comes last whatever failed
            import traceback

            traceback.print_exc()
            res = {"ok": False, "error": f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}",
                   "bc_loss": None, "apo_cached_vs_live_gap": None, "predict_action_max_abs_diff": None, "steps": 0}
    print(json.dumps(res))
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
