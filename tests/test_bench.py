"""`apo-ray bench train` runs each variant in its own process and compares like with like."""

from __future__ import annotations

import json

import pytest


@pytest.mark.parametrize("lora_r", [0, 4])
def test_bench_train_variants_compute_the_same_loss(lora_r, capsys):
    from apo_ray.cli import main

    rc = main(["bench", "train", "--steps", "1", "--warmup", "0", "--hidden", "32", "--layers", "1", "--threads", "1",
               "--lora-r", str(lora_r)])
    assert rc == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["config"]["lora_r"] == lora_r
    # first step, same weights and batch: the cached reference columns equal the live replica's scores (the
    # paper's step differs on an untrained model: its argmax for l_i spans the whole vocabulary)
    assert r["cached"]["loss"] == pytest.approx(r["live"]["loss"], abs=1e-5)
    for k in ("cached_vs_live_speed", "cached_vs_live_memory", "ours_vs_paper_speed"):
        assert r[k] > 0
