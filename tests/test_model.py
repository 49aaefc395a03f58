"""The tiny VLA: tokenizer/prompt layout, action-only scoring, batch independence, save/load round trip,
bad checkpoints, and the kind=hf loader (trust_remote_code + LoRA) on a tiny model saved to disk."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from apo_ray import checkpoint as C
from apo_ray import model as M
from apo_ray.config import ModelConfig
from apo_ray.errors import UserError
from apo_ray.loss import next_in_group

STATS = {"q01": [-0.5] * 7, "q99": [0.5] * 7, "mask": [True] * 6 + [False]}
MC = ModelConfig(hidden_size=32, num_layers=1, num_heads=2, vision_hidden_size=16)


@pytest.fixture(scope="module")
def tiny():
    model, proc = M.build_model(MC, STATS, 64, ["lift the cube"], seed=0)
    return model, proc


def _batch(proc, n=4, seed=0):
    rng = np.random.default_rng(seed)
    imgs = rng.integers(0, 256, (n, 64, 64, 3), dtype=np.uint8)
    instr = ["lift the cube", "pick up the red can"] * (n // 2)
    toks = torch.as_tensor(rng.integers(0, 256, (n, 7)) + proc.meta.action_offset)
    return imgs, instr, proc(imgs, instr), toks


def test_tokenizer_layout_and_prompt(tiny):
    _, proc = tiny
    tok = proc.tokenizer
    assert tok.get_vocab_size() == M.VOCAB_SIZE
    assert tok.token_to_id("<act_0>") == M.VOCAB_SIZE - 256 == proc.meta.action_offset
    assert tok.token_to_id("<act_255>") == M.VOCAB_SIZE - 1
    ids = proc.prompt_ids("lift the cube")
    assert ids[0] == M.BOS_ID
    words = [tok.id_to_token(i) for i in ids[1:]]
    assert words == ["what", "action", "should", "the", "robot", "take", "to", "lift", "the", "cube", "?"]
    assert proc.prompt_ids("zzz unknownword")[-2] == M.UNK_ID


def test_image_tokens_and_left_padding(tiny):
    model, proc = tiny
    _, _, inp, _ = _batch(proc)
    assert model.encode_images(inp.pixel_values).shape == (4, 16, 32)  # 64x64 -> 4x4 grid
    # shorter prompts are left-padded, so every sequence ends at the same position
    assert (inp.attention_mask[:, -1] == 1).all()
    assert inp.attention_mask[0].sum() < inp.attention_mask[1].sum()
    assert (inp.input_ids[0, : int((inp.attention_mask[0] == 0).sum())] == M.PAD_ID).all()


def test_scores_are_action_token_logprobs_of_the_full_forward(tiny):
    """score_actions' (N,8) log-probs = log-softmax of a plain full-sequence forward at the positions that
    predict the 7 action tokens and EOS; nothing else is scored."""
    model, proc = tiny
    model.eval()
    _, _, inp, toks = _batch(proc)
    sc = M.score_actions(model, inp, [toks], proc.meta)[0]
    n = toks.shape[0]
    eos = torch.full((n, 1), M.EOS_ID)
    ids = torch.cat([inp.input_ids, toks, eos], 1)
    mask = torch.cat([inp.attention_mask, torch.ones(n, 8, dtype=torch.long)], 1)
    logits = model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], pixel_values=inp.pixel_values).logits
    want = torch.log_softmax(logits[:, -8:], -1).gather(-1, ids[:, -8:, None]).squeeze(-1)
    torch.testing.assert_close(sc.token_logp, want, atol=1e-5, rtol=1e-5)
    assert sc.token_logp.shape == (n, 8)
    torch.testing.assert_close(sc.logp_u, want[:, :7].sum(1), atol=1e-5, rtol=1e-5)
    assert ((sc.pred_tokens >= proc.meta.action_offset) & (sc.pred_tokens < M.VOCAB_SIZE)).all()


def test_scoring_is_batch_independent_in_train_mode(tiny):
    """BatchNorm keeps fixed statistics: a sample's log-prob does not depend on its batch-mates, so stacked
    scoring sets, cached vs live reference and micro-batch sizes agree."""
    model, proc = tiny
    model.train()
    _, _, inp, toks = _batch(proc)
    both = M.score_actions(model, inp, [toks, next_in_group(toks, 2)], proc.meta)
    one = M.score_actions(model, inp, [toks], proc.meta)[0]
    half = M.score_actions(model, M.VLAInputs(inp.pixel_values[:2], inp.input_ids[:2], inp.attention_mask[:2]),
                           [toks[:2]], proc.meta)[0]
    torch.testing.assert_close(both[0].logp, one.logp, atol=1e-5, rtol=0)
    torch.testing.assert_close(half.logp, one.logp[:2], atol=1e-5, rtol=0)
    assert torch.equal(next_in_group(torch.arange(4)[:, None], 2)[:, 0], torch.tensor([1, 0, 3, 2]))
    model.eval()


@pytest.mark.parametrize("vision,coords", [("resnet", False), ("convnext", False), ("conv", False), ("vit", False),
                                           ("resnet", True), ("conv", True)])
def test_every_vision_kind_gives_16_batch_independent_image_tokens(vision, coords, tmp_path):
    mc = dataclasses.replace(MC, vision=vision, coord_channels=coords)
    model, proc = M.build_model(mc, STATS, 64, ["lift the cube"], seed=0)
    model.train()
    _, _, inp, toks = _batch(proc)
    assert model.encode_images(inp.pixel_values).shape == (4, 16, MC.hidden_size)
    one = M.score_actions(model, inp, [toks], proc.meta)[0].logp
    half = M.score_actions(model, M.VLAInputs(inp.pixel_values[:2], inp.input_ids[:2], inp.attention_mask[:2]),
                           [toks[:2]], proc.meta)[0].logp
    torch.testing.assert_close(half, one[:2], atol=1e-5, rtol=0)
    (-one.sum()).backward()
    stem = next(model.vision.parameters())  # the first conv / patch embedding learns from the action loss
    assert stem.grad is not None and stem.grad.abs().sum() > 0
    conv = next(p for p in model.vision.parameters() if p.dim() == 4)
    assert conv.shape[1] == (5 if coords else 3)  # RGB (+ the x, y coordinate channels)
    m2, p2, _ = M.load_policy(M.save_checkpoint(model.eval(), proc, tmp_path / "ck"))
    torch.testing.assert_close(M.score_actions(m2, inp, [toks], p2.meta)[0].logp,
                               M.score_actions(model, inp, [toks], proc.meta)[0].logp, atol=0, rtol=0)


def test_gradient_flows_only_from_scored_tokens(tiny):
    model, proc = tiny
    _, _, inp, toks = _batch(proc)
    sc = M.score_actions(model, inp, [toks], proc.meta)[0]
    (-sc.logp.sum()).backward()
    assert model.llm.lm_head.weight.grad is not None
    assert model.vision.embedder.embedder.convolution.weight.grad.abs().sum() > 0
    model.zero_grad()


def test_save_load_round_trip(tiny, tmp_path):
    model, proc = tiny
    model.eval()
    d = M.save_checkpoint(model, proc, tmp_path / "ckpt")
    assert {"config.json", "model.safetensors", "tokenizer.json", M.META_FILE} <= {p.name for p in d.iterdir()}
    assert not list(d.glob("*.bin")) and not list(d.glob("*.pt"))  # safetensors only, never pickle
    m2, p2, stats = M.load_policy(d)
    assert stats == STATS and p2.meta == proc.meta
    imgs, instr, inp, toks = _batch(proc)
    a = M.score_actions(model, inp, [toks], proc.meta)[0].logp
    b = M.score_actions(m2, p2(imgs, instr), [toks], p2.meta)[0].logp
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    # de-tokenizing uses the saved statistics: bin 255 → q99 side, gripper passed through at the bin centre
    act = M.tokens_to_actions(np.full((1, 7), M.VOCAB_SIZE - 1), p2.meta)
    np.testing.assert_allclose(act[0, :6], 0.5 * (1 + (1 - 1 / 256)) * 1.0 - 0.5, atol=1e-6)
    np.testing.assert_allclose(act[0, 6], 1 - 1 / 256, atol=1e-6)


def test_proprio_is_standardised_with_the_saved_training_statistics(tmp_path):
    pstats = {"mean": [0.1, -0.2, 0.9, 0, 0, 0, 1, 0.02, -0.02], "std": [0.05, 0.04, 0.1, 1, 1, 1, 1, 0.01, 0.01]}
    mc = dataclasses.replace(MC, use_proprio=True)
    model, proc = M.build_model(mc, STATS, 64, ["lift the cube"], seed=0, proprio_stats=pstats)
    model.eval()
    raw = torch.tensor([[0.15, -0.22, 1.0, 0.1, 0.2, 0.3, 0.9, 0.03, -0.01]])
    z = (raw - torch.tensor(pstats["mean"])) / torch.tensor(pstats["std"])  # by hand: 1, -0.5, 1, ...
    torch.testing.assert_close(z[0, :3], torch.tensor([1.0, -0.5, 1.0]))
    pix = torch.zeros(1, 3, 64, 64)
    with torch.no_grad():
        token = model.encode_images(pix, raw)[0, -1]
        torch.testing.assert_close(token, model.proprio_proj(z)[0])
        d = M.save_checkpoint(model, proc, tmp_path / "ckpt")
        m2, _, _ = M.load_policy(d)
        torch.testing.assert_close(m2.encode_images(pix, raw)[0, -1], token, atol=0, rtol=0)
    assert m2.config.proprio_std == pstats["std"]


def test_bad_checkpoints(tmp_path, tiny):
    with pytest.raises(UserError, match="not a VLA checkpoint"):
        M.load_policy(tmp_path / "missing")
    model, proc = tiny
    d = M.save_checkpoint(model, proc, tmp_path / "ck")
    (d / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(UserError, match="cannot load checkpoint"):
        M.load_policy(d)
    # a config.json that no longer matches its weights: transformers would re-initialise, we refuse
    d2 = M.save_checkpoint(model, proc, tmp_path / "ck2")
    cfg = json.loads((d2 / "config.json").read_text())
    cfg["text_config"]["num_hidden_layers"] += 1
    (d2 / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="weights do not fit the model config: .* missing keys"):
        M.load_policy(d2)
    (d / M.META_FILE).write_text("{not json")
    with pytest.raises(UserError, match="corrupt"):
        M.load_policy(d)


def test_hf_kind_loads_remote_code_with_lora(tiny, tmp_path):
    """kind=hf: a VLA dir with its own modeling code (auto_map, trust_remote_code) loads, gets LoRA adapters
    (only they train), scores like the original, and its checkpoint (adapter only) round-trips."""
    model, proc = tiny
    model.eval()
    src = M.export_hf(M.save_checkpoint(model, proc, tmp_path / "ck"), tmp_path / "hf_vla")
    later = M.save_checkpoint(model, proc, tmp_path / "ck_after")  # a plain checkpoint again: no modeling code
    assert not (later / "model.py").exists() and "auto_map" not in json.loads((later / "config.json").read_text())
    hf_ck = M.save_checkpoint(*M.load_hf(dataclasses.replace(MC, kind="hf", path=str(src)), STATS), tmp_path / "hk")
    # a dataset's token vocabulary without the weights: an HF VLA's tokenizer, a checkpoint's metadata (256 text
    # slots + 256 action bins for the tiny layout both carry)
    assert C.vocab_size(dataclasses.replace(MC, kind="hf", path=str(src)), None) == 512
    assert C.checkpoint_vocab_size(hf_ck) == C.checkpoint_vocab_size(tmp_path / "ck") == C.vocab_size(MC, None) == 512
    assert json.loads((hf_ck / M.META_FILE).read_text())["base_path"] == str(src)  # as given, not resolved
    with pytest.raises(UserError, match="pass --merged"):
        M.export_hf(hf_ck, tmp_path / "again")
    pm, pp = M.build_model(dataclasses.replace(MC, use_proprio=True), STATS, 64, ["lift the cube"], seed=0)
    with pytest.raises(UserError, match="no proprio token; this checkpoint uses proprio"):
        M.export_hf(M.save_checkpoint(pm, pp, tmp_path / "pk"), tmp_path / "again")
    assert not (tmp_path / "again").exists()
    assert (src / "model.py").is_file() and "auto_map" in json.loads((src / "config.json").read_text())
    hm, hp = M.build_model(dataclasses.replace(MC, kind="hf", path=str(src), lora_r=4), STATS, 64)
    assert type(hm).__name__ == "PeftModel"
    trainable = [n for n, p in hm.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert not any("lm_head" in n for n in trainable), "all-linear LoRA must spare the output head"
    imgs, instr, inp, toks = _batch(proc)
    a = M.score_actions(model, inp, [toks], proc.meta)[0].logp
    b = M.score_actions(hm, hp(imgs, instr), [toks], hp.meta)[0].logp
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)  # LoRA B starts at 0
    with torch.no_grad():
        for n, p in hm.named_parameters():
            if "lora_B" in n:
                p.add_(0.05)
    c = M.score_actions(hm, hp(imgs, instr), [toks], hp.meta)[0].logp
    ck = M.save_checkpoint(hm, hp, tmp_path / "hf_ckpt")
    assert (ck / "adapter" / "adapter_model.safetensors").is_file() and not (ck / "model.safetensors").exists()
    hm2, hp2, _ = M.load_policy(ck)
    d = M.score_actions(hm2, hp2(imgs, instr), [toks], hp2.meta)[0].logp
    torch.testing.assert_close(c, d, atol=1e-5, rtol=1e-5)
    # merged export: base + adapter in one set of weights, loadable as a plain hf model that scores the same
    merged = M.export_hf(ck, tmp_path / "merged", merged=True)
    assert json.loads((merged / "config.json").read_text())["norm_stats"]["apo_ray"]["action"]["q01"] == STATS["q01"]
    mm, mp = M.load_hf(dataclasses.replace(MC, kind="hf", path=str(merged), lora_r=0), STATS, 64)
    e = M.score_actions(mm.eval(), mp(imgs, instr), [toks], mp.meta)[0].logp
    torch.testing.assert_close(c, e, atol=1e-4, rtol=1e-4)
    with pytest.raises(UserError, match="no HF model"):
        M.build_model(dataclasses.replace(MC, kind="hf", path=str(tmp_path / "none")), STATS, 64)


def test_driver_side_modules_load_without_torch():
    """The dataset CLI, the loop's planning and checkpoint metadata run on the driver: importing torch or
    transformers there would cost every such process seconds (a bad-input error included)."""
    code = ("import sys, apo_ray.checkpoint, apo_ray.cli.dataset, apo_ray.data, apo_ray.loop; "
            "print([m for m in ('torch', 'transformers', 'deepspeed') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_one_precision_rule_for_every_stage(monkeypatch):
    """Trainer, reference stage and rollouts take their dtype from compute_dtype: bf16 only on a GPU that has it,
    so a GPU without bf16 runs all of them in fp32 rather than the policy in one dtype and its reference in
    another."""
    assert M.compute_dtype("cpu") == M.compute_dtype(torch.device("cpu")) == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert M.compute_dtype("cuda:1") == torch.bfloat16 and M.compute_dtype("cpu") == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert M.compute_dtype("cuda:0") == torch.float32


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bf16_scoring_on_gpu(tiny):
    model, proc = tiny
    dtype = M.compute_dtype("cuda")
    assert dtype == torch.bfloat16  # every GPU this project targets (A100, H100, H200) has bf16
    m = model.to("cuda", dtype).eval()
    _, _, inp, toks = _batch(proc)
    sc = M.score_actions(m, inp.to("cuda", dtype), [toks.cuda()], proc.meta)[0]
    assert torch.isfinite(sc.logp).all()
    model.to("cpu", torch.float32)


@pytest.mark.parametrize("vision", ["resnet", "vit"])
def test_wrist_view_doubles_the_image_tokens_and_is_required(vision, tmp_path):
    mc = dataclasses.replace(MC, vision=vision)
    model, proc = M.build_model(mc, STATS, 64, ["lift the cube"], seed=0, image_views=2)
    rng = np.random.default_rng(0)
    both = rng.integers(0, 256, (3, 64, 128, 3), dtype=np.uint8)
    inp = proc(both, ["lift the cube"] * 3)
    assert inp.pixel_values.shape == (3, 3, 64, 128)
    emb = model.encode_images(inp.pixel_values)
    assert emb.shape == (3, 32, MC.hidden_size) and model.config.n_image_tokens == 32
    # the wrist half reaches the tokens: changing only it changes the embedding
    other = both.copy()
    other[:, :, 64:] = 255 - other[:, :, 64:]
    assert not torch.allclose(model.encode_images(proc(other, ["lift the cube"] * 3).pixel_values), emb)
    # a larger render is resized per view, keeping the 2:1 layout
    assert proc.images(rng.integers(0, 256, (1, 96, 192, 3), dtype=np.uint8)).shape == (1, 3, 64, 128)
    with pytest.raises(UserError, match="takes 2 camera view"):
        proc(both[:, :, :64], ["lift the cube"] * 3)  # agentview alone
    _, one_view = M.build_model(mc, STATS, 64, ["lift the cube"], seed=0)
    with pytest.raises(UserError, match="takes 1 camera view"):
        one_view(both, ["lift the cube"] * 3)
    m2, p2, _ = M.load_policy(M.save_checkpoint(model.eval(), proc, tmp_path / "ck"))
    assert p2.meta.image_views == 2
    toks = torch.randint(M.VOCAB_SIZE - 256, M.VOCAB_SIZE, (3, 7))
    torch.testing.assert_close(M.score_actions(m2, p2(both, ["lift the cube"] * 3), [toks], p2.meta)[0].logp,
                               M.score_actions(model, inp, [toks], proc.meta)[0].logp, atol=0, rtol=0)
