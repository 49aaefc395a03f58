"""OpenVLA conventions (prismatic/vla/action_tokenizer.py, modeling_prismatic.py), checked by their defining
values, not by a copy of OpenVLA's code: descending action tokens over the base vocabulary, 255 bin centres,
the 0..1 gripper, the layout read from an OpenVLA config.json, and the prompt's right padding."""

from __future__ import annotations

import json

import numpy as np
import pytest

from apo_ray import actions as A
from apo_ray import checkpoint as C
from apo_ray.config import ModelConfig
from apo_ray.errors import UserError

V = 32000  # Llama-2's base vocabulary: OpenVLA-7B's text_config.vocab_size 32064 less pad_to_multiple_of 64


def test_openvla_tokens_descend_from_the_base_vocabulary():
    x = np.array([-1.0, 0.0, 1.0, -0.999, 0.999])
    tok = A.norm_to_tokens(x, V, A.OPENVLA)
    # digitize over linspace(-1, 1, 256): -1 -> 1, 0 -> 128, 1.0 -> 256 (the one value past the last edge)
    np.testing.assert_array_equal(tok, [V - 1, V - 128, V - 256, V - 1, V - 255])
    assert tok.min() >= V - 256 and tok.max() < V  # the same 256 ids as the ascending layout, never PAD (= V)
    edges = np.linspace(-1, 1, 256)
    centres = (edges[:-1] + edges[1:]) / 2
    back = A.tokens_to_norm(tok, V, A.OPENVLA)
    np.testing.assert_allclose(back, [centres[0], centres[127], centres[254], centres[0], centres[254]], atol=1e-6)
    # mirrored against the ascending reading: a pretrained OpenVLA's "-1" would read as about +1
    assert A.tokens_to_norm(tok[:1], V, A.ASCENDING)[0] > 0.99
    rng = np.random.default_rng(0)
    u = rng.uniform(-1, 1, 1000)
    assert np.abs(A.tokens_to_norm(A.norm_to_tokens(u, V, A.OPENVLA), V, A.OPENVLA) - u).max() <= 1 / 255 + 1e-6


def test_gripper_maps_robosuite_to_oxe_and_back():
    stats = A.action_stats(np.random.default_rng(0).uniform(-1, 1, (200, 7)))
    a = np.array([[0.1, -0.2, 0.3, 0.0, 0.0, 0.0, -1.0], [0.1, -0.2, 0.3, 0.0, 0.0, 0.0, 1.0]])
    m = A.env_to_model(a, A.OPENVLA)
    assert m[0, 6] == 1.0 and m[1, 6] == 0.0  # robosuite -1 (open) -> OXE 1 (open); +1 (closed) -> 0
    back = A.detokenize(A.tokenize(a, stats, V, convention=A.OPENVLA), stats, V, convention=A.OPENVLA)
    np.testing.assert_allclose(back[:, 6], [-1 + 2 / 255, 1.0], atol=1e-5)  # bin centres (0 is one), right sign
    np.testing.assert_allclose(back[:, :3], a[:, :3], atol=0.02)


def _openvla_config(d, vocab=32064, multiple=64):
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps({"model_type": "openvla", "pad_to_multiple_of": multiple,
                                               "text_config": {"vocab_size": vocab}, "image_sizes": [224, 224]}))
    return d


def test_layout_of_an_openvla_dir_is_read_not_guessed(tmp_path):
    d = _openvla_config(tmp_path / "ovla")
    assert C.hf_token_layout(d) == {"vocab_size": 32000, "action_tokens": "openvla"}
    mc = ModelConfig(kind="hf", path=str(d))
    assert C.token_layout(mc, None) == {"vocab_size": 32000, "action_tokens": "openvla"}
    assert mc.lora_rank == 32 and ModelConfig().lora_rank == 0
    with pytest.raises(UserError, match="model.action_tokens is ascending"):
        C.hf_token_layout(d, "ascending")
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llava", "vocab_size": 32064}))
    with pytest.raises(UserError, match="states no action-token convention"):
        C.hf_token_layout(other)
    assert C.hf_token_layout(other, "ascending") == {"vocab_size": 32064, "action_tokens": "ascending"}


@pytest.mark.ray
def test_tiny_openvla_interface_end_to_end(tmp_path, ray_local):
    """model.kind hf on a tiny random-init VLA with OpenVLA's interface (model_type openvla, 6-channel fused
    pixels at image_sizes, <PAD> + pad_to_multiple_of, norm_stats, descending tokens, predict_action): a dataset
    in its token layout, BC + LoRA (default rank) under ZeRO-2, the dataset's reference stage, APO with the
    cached reference and with the adapter-disabled live one (equal losses, no model copy), a rollout policy, and
    the merged export's own predict_action giving our policy's actions."""
    import dataclasses

    import torch
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    from apo_ray import config as Cfg
    from apo_ray import model as M
    from apo_ray import openvla_check as O
    from apo_ray.bench.data import synth_episodes
    from apo_ray.data import build_dataset
    from apo_ray.trainer import train
    from apo_ray.vla_policy import VLAPolicy

    src = O.write_tiny_prismatic(tmp_path / "ovla", ["lift the red cube"], hidden=32, layers=1)
    synth_episodes(tmp_path / "episodes", episodes=2, steps=24, image_size=64)
    cfg = Cfg.from_dict({"model": {"kind": "hf", "path": str(src)},
                         "train": {"lr": 1e-3, "warmup_steps": 1, "checkpoint_every": 100, "torch_threads": 1,
                                   "workers": 1, "epochs": 1, "max_steps": 2, "zero_stage": 2}})
    assert cfg.model.lora_rank == 32
    layout = C.token_layout(cfg.model, None)
    assert layout == {"vocab_size": 32000, "action_tokens": "openvla"}
    build_dataset([tmp_path / "episodes"], [], tmp_path / "ds0", Cfg.DataConfig(), **layout)
    bc = train(tmp_path / "ds0", "scratch", tmp_path / "bc", dataclasses.replace(
        cfg, train=dataclasses.replace(cfg.train, objective="bc")))
    assert bc["step"] == 2 and np.isfinite(bc["loss"])
    ck = tmp_path / "bc" / "checkpoint"
    meta = C.read_meta(ck)
    assert (meta["action_tokens"], C.meta_vocab_size(meta), meta["base_path"]) == ("openvla", 32000, str(src))
    build_dataset([tmp_path / "episodes"], [], tmp_path / "ds1", Cfg.DataConfig(), ref_checkpoint=str(ck),
                  **C.token_layout(cfg.model, str(ck)))

    def apo(reference: str) -> dict:
        return train(tmp_path / "ds1", str(ck), tmp_path / f"apo_{reference}", dataclasses.replace(
            cfg, train=dataclasses.replace(cfg.train, objective="apo", lr=0.0, reference=reference)))

    cached, live = apo("cached"), apo("live")
    assert cached["reference"] == "cached" and live["reference"] == "live"
    assert abs(cached["r_D"]) < 1e-4 and abs(live["r_D"]) < 1e-4
    assert cached["loss"] == pytest.approx(live["loss"], abs=1e-5)
    out = tmp_path / "apo_live" / "checkpoint"
    assert (out / "base_adapters" / "0" / "adapter_model.safetensors").is_file()  # the init's adapter, merged

    pol = VLAPolicy(out, threads=1)
    rng = np.random.default_rng(1)
    obs = [{"image": rng.integers(0, 255, (64, 64, 3), dtype=np.uint8), "instruction": "lift the red cube"}
           for _ in range(2)]
    ours = pol.act(obs)
    assert ours.shape == (2, 7) and np.isfinite(ours).all()
    merged = M.export_hf(out, tmp_path / "merged", merged=True)
    cls = get_class_from_dynamic_module(json.loads((merged / "config.json").read_text())["auto_map"][
        "AutoModelForVision2Seq"], str(merged))
    vla = cls.from_pretrained(merged).eval()
    inp = pol.proc(np.stack([o["image"] for o in obs]), [o["instruction"] for o in obs])
    theirs = np.stack([vla.predict_action(inp.input_ids[i:i + 1], unnorm_key="apo_ray",
                                          pixel_values=inp.pixel_values[i:i + 1]) for i in range(2)])
    assert not torch.is_tensor(theirs)
    np.testing.assert_allclose(A.model_to_env(theirs, A.OPENVLA), ours, atol=1e-5)
