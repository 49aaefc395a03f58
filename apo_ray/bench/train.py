"""``apo-ray bench train``: APO training-step throughput and peak memory, three ways, at equal batch.

* ``cached`` — our step with the reference log-probs read from the dataset (no reference model in memory);
* ``live`` — our step with a frozen reference replica scored every step (same fused scoring);
* ``paper`` — a straightforward implementation of the paper code's published step (``APOTrainer``): policy and
  reference models, four full-sequence forwards (policy/reference × own labels/the KL batch's rolled labels),
  log-probs gathered over the label positions, argmax tokens copied to the host and decoded per sample to
  continuous actions for l_i, λ per sample in Python, loss = Σ λ·L.

Ours: one vision encoding shared by the own and rolled token sets, one stacked LLM forward, logits only at the
8 scored positions, l_i/λ/KL vectorised on the device. Each variant runs in a fresh process so its peak memory
is its own; on CPU memory is peak RSS (and its rise over the process's post-import baseline), on GPU
``torch.cuda.max_memory_allocated``. The cached variant's reference columns come from a process of their own,
as the dataset's reference stage writes them in production.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import resource
import time
from typing import Any

GOALS = {"cached_vs_live_speed": 1.25, "cached_vs_live_memory": 0.7, "ours_vs_paper_speed": 1.5}


TRAIN_OPTIONS = ("micro_batch", "grad_accum", "steps", "warmup", "hidden", "layers", "image_size", "threads",
                 "lora_r", "variants")


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _paper_step(policy, ref, proc, batch, p, group: int):
    """The published APOTrainer step, written plainly: two models, four forwards, host-side decoding."""
    import numpy as np
    import torch

    from apo_ray import actions
    from apo_ray.model import EOS_ID, N_BINS

    inp, own, c = batch["inputs"], batch["own"], batch["c"]
    n = own.shape[0]
    vocab = proc.meta.action_offset + N_BINS

    def seq(tokens):
        ids = torch.cat([inp.input_ids, tokens, torch.full((n, 1), EOS_ID, device=own.device)], 1)
        mask = torch.cat([inp.attention_mask, torch.ones_like(tokens), torch.ones(n, 1, dtype=torch.long,
                                                                                  device=own.device)], 1)
        return ids, mask

    def token_logps(model, ids, mask):
        """Full-sequence forward (HF trainers compute every position's logits), gather at the 8 labels."""
        logits = model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], pixel_values=inp.pixel_values).logits
        labels = ids[:, -8:]
        lp = torch.log_softmax(logits[:, -8:].float(), -1).gather(-1, labels[..., None]).squeeze(-1)
        return lp, logits

    kl_tokens = torch.cat([own[i * group:(i + 1) * group].roll(-1, 0) for i in range(n // group)])
    ids, mask = seq(own)
    kids, kmask = seq(kl_tokens)
    lp, logits = token_logps(policy, ids, mask)
    logp, logp_u = lp.sum(-1), lp[:, :7].sum(-1)
    kl_logp = token_logps(policy, kids, kmask)[0][:, :7].sum(-1)
    with torch.no_grad():
        rlp = token_logps(ref, ids, mask)[0]
        ref_logp, ref_logp_u = rlp.sum(-1), rlp[:, :7].sum(-1)
        ref_kl = token_logps(ref, kids, kmask)[0][:, :7].sum(-1)
    # l_i: argmax tokens to the host, decoded per sample to bin centres
    pred = logits[:, -8:-1].argmax(-1).cpu().numpy()
    labels = own.cpu().numpy()
    l1 = []
    for i in range(n):
        a = actions.bin_centers(actions.tokens_to_bins(pred[i], vocab))
        b = actions.bin_centers(actions.tokens_to_bins(labels[i], vocab))
        l1.append(float(np.abs(a - b).mean()))
    c_host = c.cpu().numpy()
    total = 0.0
    for g in range(n // group):
        sl = slice(g * group, (g + 1) * group)
        kl = (kl_logp[sl] - ref_kl[sl]).mean().detach().clamp(-p.kl_clamp, p.kl_clamp)
        des = [i for i in range(sl.start, sl.stop) if c_host[i] != 0]
        und = [i for i in range(sl.start, sl.stop) if c_host[i] == 0]
        sum_d = sum(l1[i] for i in des)
        sum_u = sum(l1[i] for i in und)
        for i in des:
            lam = 1 - math.exp(-(l1[i] + 1e-4) / (sum_d + 1e-4))
            total = total + lam * (1 - torch.sigmoid(p.beta * (logp[i] - ref_logp[i] - kl)))
        for i in und:
            lam = math.exp(-(l1[i] + 1e-4) / (sum_u + 1e-4))
            total = total + lam * (1 - torch.sigmoid(p.beta * (kl - (logp_u[i] - ref_logp_u[i]))))
    return total / (n // group)


def _our_step(policy, ref, proc, batch, p, group: int, cached: dict | None):
    """The trainer's step (``trainer._score``): the objective's token sets in one stacked forward, the reference
    from the dataset's columns or a live replica, through the objective registry."""
    import torch

    from apo_ray import model as M
    from apo_ray.loss import add_cached_reference, get_objective

    obj = get_objective("apo")
    inp, own, c = batch["inputs"], batch["own"], batch["c"]
    oracle = own  # the synthetic batch has no corrector labels; undesirable_tokens=all never reads them
    sets = obj.token_sets(own, oracle, group)
    sc = M.score_actions(policy, inp, sets, proc.meta)
    s = obj.scores(sc, own, oracle, c, torch.zeros_like(c, dtype=torch.bool),
                   M.decoded_l1(sc[0].pred_tokens, own, proc.meta), group)
    if cached is not None:
        add_cached_reference(s, cached)
    else:
        with torch.no_grad():
            rs = M.score_actions(ref, inp, sets, proc.meta)
        obj.add_reference(s, rs, own, oracle)
    return obj.loss(s, p, None)[0]


def _setup(opts: dict):
    """The model, processor and one batch; deterministic, so every process builds the same ones."""
    import numpy as np
    import torch

    from apo_ray import model as M
    from apo_ray.config import ModelConfig

    if opts["threads"]:
        torch.set_num_threads(opts["threads"])
    n, group, size = opts["micro_batch"] * opts["grad_accum"], opts["micro_batch"], opts["image_size"]
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    c_pattern = np.array([1] * (group // 2) + [2] * (group // 4) + [0] * (group - group // 2 - group // 4))
    stats = {"q01": [-1.0] * 7, "q99": [1.0] * 7}
    mc = ModelConfig(hidden_size=opts["hidden"], num_layers=opts["layers"])
    policy, proc = M.build_model(mc, stats, size, ["lift the cube"], seed=0)
    if opts["lora_r"]:  # as model.kind hf fine-tunes: frozen base, trainable adapters
        policy = M.with_lora(policy, opts["lora_r"], 2 * opts["lora_r"])
    tokens = rng.integers(0, 256, (n, 7)) + proc.meta.action_offset
    return policy, proc, images, tokens, np.tile(c_pattern, n // group)


def _reference_columns(opts: dict, q) -> None:
    """What the dataset's reference stage writes: run in its own process, as in production, so the cached
    variant's peak memory never holds a reference model."""
    from apo_ray import model as M

    policy, proc, images, tokens, _ = _setup(opts)
    q.put(M.reference_logps(policy.eval(), proc, images, ["lift the cube"] * len(images), tokens,
                            group=opts["micro_batch"]))


def _run_variant(variant: str, opts: dict, cached_cols: dict | None, q) -> None:
    import copy

    import numpy as np
    import torch

    from apo_ray import model as _  # noqa: F401  (imported before the baseline: the rise is the step's memory)
    from apo_ray.loss import LossParams

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base_rss = _rss_mb()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    policy, proc, images, tokens, c = _setup(opts)
    n, group = len(images), opts["micro_batch"]
    policy.to(dev)
    batch = {"inputs": proc(images, ["lift the cube"] * n).to(dev),
             "own": torch.as_tensor(tokens, device=dev), "c": torch.as_tensor(c, device=dev)}
    cached = None
    ref = None
    if variant == "cached":
        cached = {k: torch.as_tensor(v, device=dev) for k, v in cached_cols.items()}
    else:
        ref = copy.deepcopy(policy).eval().requires_grad_(False)
    policy.train()
    opt = torch.optim.AdamW([q for q in policy.parameters() if q.requires_grad], lr=1e-5)
    p = LossParams()
    times = []
    for i in range(opts["warmup"] + opts["steps"]):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        if variant == "paper":
            loss = _paper_step(policy, ref, proc, batch, p, group)
        else:
            loss = _our_step(policy, ref, proc, batch, p, group, cached)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if i >= opts["warmup"]:
            times.append(time.perf_counter() - t0)
    out = {"samples_per_s": n / float(np.median(times)), "step_ms": 1000 * float(np.median(times)),
           "loss": float(loss.item()), "device": dev.type}
    if dev.type == "cuda":
        out["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        out["peak_mem_mb"] = _peak_rss_mb()
        out["peak_mem_rise_mb"] = _peak_rss_mb() - base_rss
    q.put(out)


def _spawn(ctx, target, args: tuple) -> Any:
    """Run ``target(*args, queue)`` in a fresh process (its own peak memory) and return what it puts."""
    q = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, q))
    proc.start()
    got = q.get()
    proc.join()
    return got


def bench_train(args: argparse.Namespace) -> dict[str, Any]:
    opts = {k: getattr(args, k) for k in TRAIN_OPTIONS}
    variants = [v.strip() for v in opts.pop("variants").split(",") if v.strip()]
    ctx = mp.get_context("spawn")
    res: dict[str, Any] = {}
    cols = _spawn(ctx, _reference_columns, (opts,)) if "cached" in variants else None
    for v in variants:
        res[v] = _spawn(ctx, _run_variant, (v, opts, cols if v == "cached" else None))
    out: dict[str, Any] = {"config": opts, **res}
    if "cached" in res and "live" in res:
        out["cached_vs_live_speed"] = res["cached"]["samples_per_s"] / res["live"]["samples_per_s"]
        out["cached_vs_live_memory"] = res["cached"]["peak_mem_mb"] / res["live"]["peak_mem_mb"]
        if "peak_mem_rise_mb" in res["cached"]:
            out["cached_vs_live_memory_rise"] = res["cached"]["peak_mem_rise_mb"] / max(1e-9, res["live"]["peak_mem_rise_mb"])
    if "paper" in res:
        for v in ("cached", "live"):
            if v in res:
                out[f"{v}_vs_paper_speed"] = res[v]["samples_per_s"] / res["paper"]["samples_per_s"]
        if "cached" in res:
            out["ours_vs_paper_speed"] = out["cached_vs_paper_speed"]
    out["goals"] = GOALS
    return out
