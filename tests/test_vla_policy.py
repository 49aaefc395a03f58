"""VLAPolicy: KV-cache greedy decoding equals full recomputation, de-tokenizes with the saved statistics,
follows the instruction, and reproduces what a BC-fitted model learned."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from apo_ray import model as M
from apo_ray.config import ModelConfig
from apo_ray.errors import UserError
from apo_ray.loss import LossParams, Scores, bc_loss
from apo_ray.vla_policy import VLAPolicy, ms_per_action

STATS = {"q01": [-0.2] * 7, "q99": [0.4] * 7, "mask": [True] * 6 + [False]}
MC = ModelConfig(hidden_size=32, num_layers=2, num_heads=2, vision_hidden_size=16)


def _obs(n, seed=0, instruction=None):
    rng = np.random.default_rng(seed)
    out = [{"image": rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), "proprio": np.zeros(9, np.float32)}
           for _ in range(n)]
    if instruction:
        for i, o in enumerate(out):
            o["instruction"] = instruction[i % len(instruction)]
    return out


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    model, proc = M.build_model(MC, STATS, 64, ["lift the cube"], seed=1)
    return M.save_checkpoint(model, proc, tmp_path_factory.mktemp("p") / "ckpt")


def test_kv_cache_decode_equals_recompute(ckpt):
    pol = VLAPolicy(ckpt, threads=1)
    obs = _obs(4, instruction=["lift the cube", "pick up the can and put it in the bin"])  # ragged prompts
    toks = pol.act_tokens(obs)
    inp = pol.proc(np.stack([o["image"] for o in obs]), [o["instruction"] for o in obs]).to(pol.device, pol._dtype())
    ref = pol._decode_no_cache(inp, pol.meta.action_offset, pol.meta.action_offset + 256)
    np.testing.assert_array_equal(toks, ref)
    assert toks.shape == (4, 7) and (toks >= pol.meta.action_offset).all()
    # batched == one at a time
    single = np.concatenate([pol.act_tokens([o]) for o in obs])
    np.testing.assert_array_equal(toks, single)


def test_act_denormalizes_and_instruction_rules(ckpt):
    pol = VLAPolicy(ckpt, threads=1)
    assert pol.instruction == "lift the cube" and pol.version.startswith("vla:")
    pol.reset([0, 1])
    a = pol.act(_obs(3))
    assert a.shape == (3, 7) and a.dtype == np.float32
    assert (a[:, :6] >= -0.2).all() and (a[:, :6] <= 0.4).all() and (np.abs(a[:, 6]) <= 1).all()
    np.testing.assert_allclose(a, M.tokens_to_actions(pol.act_tokens(_obs(3)), pol.meta))
    nameless = VLAPolicy(ckpt, instruction=None, threads=1)
    nameless.instruction = ""
    with pytest.raises(UserError, match="no instruction"):
        nameless.act(_obs(1))
    ms = ms_per_action(pol, batch=2, repeats=2)
    assert 0 < ms < 10_000


def test_policy_reproduces_bc_fitted_actions(tmp_path):
    """Fit two images to two different action-token sequences with the BC loss, save, and decode them back."""
    torch.manual_seed(0)
    model, proc = M.build_model(MC, STATS, 64, ["lift the cube"], seed=2)
    obs = _obs(2, seed=5)
    imgs = np.stack([o["image"] for o in obs])
    target = torch.tensor([[10, 200, 30, 140, 50, 60, 255], [250, 5, 128, 7, 90, 180, 0]]) + proc.meta.action_offset
    inp = proc(imgs, ["lift the cube"] * 2)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        sc = M.score_actions(model, inp, [target], proc.meta)[0]
        s = Scores(logp=sc.logp, logp_u=sc.logp_u, token_logp=sc.token_logp, c=torch.ones(2, dtype=torch.long),
                   is_expert=torch.ones(2, dtype=torch.bool), l1=torch.zeros(2), group=2)
        loss, _ = bc_loss(s, LossParams())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.01:
            break
    d = M.save_checkpoint(model, proc, tmp_path / "bc")
    pol = VLAPolicy(d, threads=1)
    np.testing.assert_array_equal(pol.act_tokens(obs), target.numpy())
