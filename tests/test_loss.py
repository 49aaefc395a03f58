"""Hand-computed values for every loss term and objective (apo_spec.md §2), gradient signs, and the
equivalence of one 8·k batch (per-micro-batch λ/KL) with gradient accumulation over k micro-batches."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from apo_ray.loss import (
    LossParams,
    Scores,
    adaptive_lambdas,
    apo_loss,
    bc_loss,
    dagger_loss,
    dpo_loss,
    kl_estimate,
    kto_loss,
    objective_loss,
    sirius_loss,
)

EPS = 1e-4


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def t(*v, requires_grad=False):
    return torch.tensor(v, dtype=torch.float64, requires_grad=requires_grad)


def tiny(group: int = 4, **kw) -> Scores:
    """One micro-batch of 4: samples 0,1 desirable (c=1 expert, c=2), samples 2,3 undesirable (c=0).

    r_D = logp − ref_logp = [0.5, 0.0];  r_U = logp_u − ref_logp_u = [−0.5, 0.4]
    KL pairs: kl_logp − ref_kl_logp = [0.4, −0.2, 0.0, 0.2] → z = 0.1;  l1 = [0.1, 0.3, 0.2, 0.6]
    token_logp rows are constant: sample i has 8 tokens of log-prob −(i+1)/8 → per-sample NLL (i+1)/8.
    """
    token_logp = torch.stack([torch.full((8,), -(i + 1) / 8, dtype=torch.float64) for i in range(4)])
    base = dict(
        logp=t(-2.0, -3.0, -4.0, -5.0, requires_grad=True),
        logp_u=t(-1.8, -2.9, -3.5, -4.6, requires_grad=True),
        token_logp=token_logp.requires_grad_(True),
        c=torch.tensor([1, 2, 0, 0]),
        is_expert=torch.tensor([True, False, False, False]),
        l1=t(0.1, 0.3, 0.2, 0.6),
        group=group,
        ref_logp=t(-2.5, -3.0, -3.0, -6.0),
        ref_logp_u=t(-2.0, -2.9, -3.0, -5.0),
        kl_logp=t(-3.0, -3.0, -3.0, -3.0, requires_grad=True),
        ref_kl_logp=t(-3.4, -2.8, -3.0, -3.2),
        oracle_logp=t(-1.0, -1.5, -2.0, -2.5, requires_grad=True),
        ref_oracle_logp=t(-1.2, -1.5, -2.6, -2.0),
    )
    base.update(kw)
    return Scores(**base)


# per-sample KTO terms of tiny(), β = 0.1, z = 0.1
Z = 0.1
L = [1 - sig(0.1 * (0.5 - Z)), 1 - sig(0.1 * (0.0 - Z)), 1 - sig(0.1 * (Z + 0.5)), 1 - sig(0.1 * (Z - 0.4))]


def test_kl_estimate_mean_detached_clamped():
    """z = clamp(mean(kl_logp − ref_kl_logp), ±5), per micro-batch, no gradient."""
    s = tiny()
    z = kl_estimate(s.kl_logp, s.ref_kl_logp, 4, 5.0)
    assert_close(z, t(0.1))
    assert not z.requires_grad
    big = kl_estimate(t(0.0, 0.0, 10.0, 10.0), t(-8.0, -8.0, 0.0, 0.0), 2, 5.0)
    assert_close(big, t(5.0, 5.0))
    assert_close(kl_estimate(t(0, 0, 0, 0), t(7, 7, 7, 7), 4, 5.0), t(-5.0))
    # all-reduce hook: here a fake "other device" with z = 0.3 averaged in
    assert_close(kl_estimate(s.kl_logp, s.ref_kl_logp, 4, 5.0, lambda x: (x + 0.3) / 2), t(0.2))


def test_kl_nonneg_floors_the_estimate_at_zero():
    """kl_nonneg: z = clamp(mean(...), 0, 5); a negative estimate counts as at the clamp, and KTO then scores
    the samples against z = 0: L_D = 1 − σ(β r), L_U = 1 − σ(−β r)."""
    neg = dict(ref_kl_logp=t(-2.0, -2.0, -2.0, -2.0))  # kl_logp − ref = −1 each → z = −1, floored to 0
    assert_close(kl_estimate(t(-3, -3, -3, -3), t(-2, -2, -2, -2), 4, 5.0, nonneg=True), t(0.0))
    assert_close(kl_estimate(t(-3, -3, -3, -3), t(-2, -2, -2, -2), 4, 5.0), t(-1.0))
    assert_close(kl_estimate(t(0, 0, 0, 0), t(-9, -9, -9, -9), 4, 5.0, nonneg=True), t(5.0))
    loss, m = kto_loss(tiny(**neg), LossParams(kl_nonneg=True))
    want = (1 - sig(0.1 * 0.5)) + (1 - sig(0.0)) + (1 - sig(0.1 * 0.5)) + (1 - sig(-0.1 * 0.4))
    assert_close(loss, t(want)[0])
    assert m["kl"] == 0.0 and m["kl_at_clamp"] == 1.0
    assert kto_loss(tiny(**neg), LossParams())[1]["kl_at_clamp"] == 0.0  # −1 is inside ±5


def test_adaptive_lambdas_three_normalisations():
    """subset_sum: w = (l+ε)/(Σ_subset l+ε); subset_mean: /(mean_subset l+ε); batch: /(Σ_all l+ε).
    λ_D = 1 − e^{−β_D w} (c≠0), λ_U = e^{−β_U w} (c=0)."""
    s = tiny()
    d = s.c != 0
    l1 = [0.1, 0.3, 0.2, 0.6]
    for norm, den in (("subset_sum", [0.4, 0.4, 0.8, 0.8]), ("subset_mean", [0.2, 0.2, 0.4, 0.4]),
                      ("batch", [1.2] * 4)):
        w = [(li + EPS) / (di + EPS) for li, di in zip(l1, den, strict=True)]
        want = t(1 - math.exp(-w[0]), 1 - math.exp(-w[1]), math.exp(-w[2]), math.exp(-w[3]))
        assert_close(adaptive_lambdas(s.l1, d, 4, norm), want)
    # β_D, β_U scale w
    w = [(0.1 + EPS) / (0.4 + EPS), (0.2 + EPS) / (0.8 + EPS)]
    lam = adaptive_lambdas(s.l1, d, 4, "subset_sum", beta_d=2.0, beta_u=3.0)
    assert_close(lam[[0, 2]], t(1 - math.exp(-2 * w[0]), math.exp(-3 * w[1])))


def test_lambda_sums_depend_on_batch_size_only_for_subset_sum():
    """probes.md: with equal l, Σλ_U grows with the undesirable count under subset_sum... and stays n·e^{-1}
    per subset under subset_mean (w ≡ 1)."""
    for n in (8, 64):
        d = torch.tensor([True] * (3 * n // 4) + [False] * (n // 4))
        lam_sum = adaptive_lambdas(torch.full((n,), 0.5), d, n, "subset_sum")
        lam_mean = adaptive_lambdas(torch.full((n,), 0.5), d, n, "subset_mean")
        n_u = n // 4
        assert_close(lam_sum[~d].sum().item(), n_u * math.exp(-1 / n_u), atol=1e-3, rtol=0)
        assert_close(lam_mean[~d], torch.full((n_u,), math.exp(-1.0)), atol=1e-3, rtol=0)


def test_apo_hand_computed_sum_and_mean():
    """loss = Σ_i λ_i L_i with L_D = 1 − σ(β(r−z)), L_U = 1 − σ(β(z−r)), subset_sum λ."""
    w = [(0.1 + EPS) / (0.4 + EPS), (0.3 + EPS) / (0.4 + EPS), (0.2 + EPS) / (0.8 + EPS), (0.6 + EPS) / (0.8 + EPS)]
    lam = [1 - math.exp(-w[0]), 1 - math.exp(-w[1]), math.exp(-w[2]), math.exp(-w[3])]
    want = sum(a * b for a, b in zip(lam, L, strict=True))
    loss, m = apo_loss(tiny(), LossParams())
    assert_close(loss, t(want)[0])
    assert_close(m["r_D"], 0.25)
    assert_close(m["r_U"], -0.05)
    assert_close(m["kl"], 0.1)
    assert m["kl_at_clamp"] == 0.0
    assert_close(m["sum_lambda_D"], lam[0] + lam[1])
    assert_close(m["sum_lambda_U"], lam[2] + lam[3])
    loss_mean, _ = apo_loss(tiny(), LossParams(reduction="mean"))
    assert_close(loss_mean, t(want / 4)[0])
    # desirable/undesirable weights multiply their terms
    lw, _ = apo_loss(tiny(), LossParams(desirable_weight=2.0, undesirable_weight=0.5))
    assert_close(lw, t(2 * (lam[0] * L[0] + lam[1] * L[1]) + 0.5 * (lam[2] * L[2] + lam[3] * L[3]))[0])


def test_kto_is_apo_without_reweighting_and_bc_weight():
    """KTO: λ ≡ 1 → Σ L_i. bc_weight adds bc_weight × mean NLL over desirable samples ((1/8 + 2/8)/2)."""
    assert_close(kto_loss(tiny(), LossParams())[0], t(sum(L))[0])
    assert_close(objective_loss("kto", tiny(), LossParams())[0], t(sum(L))[0])
    with_bc, m = kto_loss(tiny(), LossParams(bc_weight=0.5))
    assert_close(with_bc, t(sum(L) + 0.5 * (1 / 8 + 2 / 8) / 2)[0])
    assert_close(m["bc_nll"], 3 / 16)


def test_undesirable_tokens_differ_and_corrector_weight_hand_computed():
    """``differ``: sample 2's first 2 tokens differ from the oracle's → r_U = 2·(−3/8) − (−1.0) = 0.25; sample 3
    matches the oracle everywhere → r_U = 0 and no gradient. corrector_weight 3 triples sample 1's (c=2) L_D."""
    mask = torch.zeros(4, 7, dtype=torch.bool)
    mask[2, :2] = True
    s = tiny(differ_mask=mask, ref_logp_u_differ=t(9.0, 9.0, -1.0, 0.0))  # desirable rows' values are unused
    p = LossParams(reweight=False, undesirable_tokens="differ", corrector_weight=3.0)
    loss, m = apo_loss(s, p)
    lu = [1 - sig(0.1 * (Z - 0.25)), 1 - sig(0.1 * (Z - 0.0))]
    assert_close(loss, t(L[0] + 3 * L[1] + lu[0] + lu[1])[0])
    assert_close(m["r_U"], 0.125)
    assert_close(m["u_tokens_differ"], (2 / 7 + 0) / 2)
    loss.backward()
    g = s.token_logp.grad
    assert (g[2, :2] > 0).all() and (g[2, 2:] == 0).all() and (g[3] == 0).all()
    assert s.logp_u.grad is None or (s.logp_u.grad == 0).all()
    with pytest.raises(ValueError, match="differ mask"):
        apo_loss(tiny(), p)
    # the defaults are the paper's loss
    assert_close(apo_loss(tiny(), LossParams(undesirable_tokens="all", corrector_weight=1.0))[0],
                 apo_loss(tiny(), LossParams())[0])


def test_undesirable_floor_hand_computed():
    """Floor 0.3: sample 2 (r_U = −0.5) is past it, so L_U uses −0.3 and it gets no gradient; sample 3
    (r_U = 0.4) is untouched. The r_U metric stays unclamped."""
    s = tiny()
    loss, m = kto_loss(s, LossParams(undesirable_floor=0.3))
    assert_close(loss, t(L[0] + L[1] + (1 - sig(0.1 * (Z + 0.3))) + L[3])[0])
    assert_close(m["r_U"], -0.05)
    assert_close(m["u_at_floor"], 0.5)
    loss.backward()
    assert s.logp_u.grad[2] == 0 and s.logp_u.grad[3] > 0
    # a floor deeper than every undesirable reward changes nothing
    assert_close(kto_loss(tiny(), LossParams(undesirable_floor=10.0))[0], kto_loss(tiny(), LossParams())[0])


def test_beta_to_zero_limit():
    """β → 0: every L_i → 1/2, so KTO → N/2."""
    assert_close(kto_loss(tiny(), LossParams(beta=1e-9))[0], t(2.0)[0])


def test_gradient_signs():
    """Raising a desirable sample's log-prob lowers the loss; raising an undesirable one's raises it; the
    KL pairs get no gradient (detached)."""
    s = tiny()
    loss, _ = apo_loss(s, LossParams())
    loss.backward()
    assert (s.logp.grad[:2] < 0).all() and (s.logp.grad[2:] == 0).all()
    assert (s.logp_u.grad[2:] > 0).all() and (s.logp_u.grad[:2] == 0).all()
    assert s.kl_logp.grad is None or (s.kl_logp.grad == 0).all()
    s = tiny()
    dpo_loss(s, LossParams())[0].backward()
    assert (s.oracle_logp.grad[2:] < 0).all() and (s.logp.grad[2:] > 0).all()


def test_bc_dagger_sirius_hand_computed():
    """Per-sample NLL = (i+1)/8. bc: mean over all = 10/32. dagger: expert (0) + corrector (1) → 3/16.
    sirius (w_intv 2, w_preint 0): (1·1/8 + 2·2/8 + 0 + 0) / 3 = 5/24."""
    assert_close(bc_loss(tiny(), LossParams())[0], t(10 / 32)[0])
    assert_close(dagger_loss(tiny(), LossParams())[0], t(3 / 16)[0])
    assert_close(sirius_loss(tiny(), LossParams())[0], t(5 / 24)[0])
    assert_close(sirius_loss(tiny(), LossParams(sirius_intervention_weight=1.0,
                                                sirius_preintervention_weight=1.0))[0], t(10 / 32)[0])
    none = tiny(c=torch.tensor([1, 1, 0, 0]), is_expert=torch.tensor([False] * 4))
    assert dagger_loss(none, LossParams())[0].item() == 0.0


def test_dpo_hand_computed():
    """Pairs at c=0 (samples 2, 3): chosen log-ratio [0.6, −0.5], rejected (logp − ref_logp) [−1, 1];
    loss = −mean log σ(0.1·(chosen − rejected)) = −(log σ(0.16) + log σ(−0.15)) / 2."""
    want = -(math.log(sig(0.16)) + math.log(sig(-0.15))) / 2
    assert_close(dpo_loss(tiny(), LossParams())[0], t(want)[0])


def test_objective_dispatch_and_unknown():
    for name in ("apo", "kto", "dagger", "sirius", "dpo", "bc"):
        loss, m = objective_loss(name, tiny(), LossParams())
        assert torch.isfinite(loss) and "loss" in m
    with pytest.raises(ValueError):
        objective_loss("ppo", tiny(), LossParams())


@pytest.mark.parametrize("norm", ["subset_sum", "subset_mean", "batch"])
@pytest.mark.parametrize("k", [1, 3])
def test_grad_accumulation_8xk_equals_per_micro_batch(norm, k):
    """One batch of 8·k samples with group=8 (λ, KL, Σ per micro-batch, then averaged) gives the same
    gradient as the paper's per-micro-batch steps accumulated (mean of k per-micro-batch gradients)."""
    torch.manual_seed(0)
    n, feat = 8 * k, 5
    x = torch.randn(n, 4, feat, dtype=torch.float64)
    c = torch.tensor([1, 1, 1, 1, 2, 2, 0, 0] * k)
    theta = torch.randn(feat, dtype=torch.float64, requires_grad=True)
    ref = torch.randn(n, 4, dtype=torch.float64)
    l1 = torch.rand(n, dtype=torch.float64)

    def scores(idx):
        f = torch.nn.functional.logsigmoid(x[idx] @ theta)  # (m, 4) "token log-probs"
        kl = torch.nn.functional.logsigmoid(x[idx].roll(-1, 0) @ theta).sum(1)
        return Scores(logp=f.sum(1), logp_u=f[:, :3].sum(1), token_logp=f.repeat(1, 2), c=c[idx],
                      is_expert=torch.zeros(len(idx), dtype=torch.bool), l1=l1[idx], group=8,
                      ref_logp=ref[idx].sum(1), ref_logp_u=ref[idx, :3].sum(1), kl_logp=kl,
                      ref_kl_logp=ref[idx].sum(1) - 0.3)

    p = LossParams(lambda_norm=norm, bc_weight=0.5)
    # the KL pairs roll inside each micro-batch: build the x roll per micro-batch for the big batch too
    x = torch.cat([x[i * 8:(i + 1) * 8] for i in range(k)])
    idx_all = torch.arange(n)

    def scores_grouped(idx):
        s = scores(idx)
        f_kl = torch.cat([torch.nn.functional.logsigmoid(x[idx[i * 8:(i + 1) * 8]].roll(-1, 0) @ theta).sum(1)
                          for i in range(len(idx) // 8)])
        s.kl_logp = f_kl
        return s

    big, _ = apo_loss(scores_grouped(idx_all), p)
    (g_big,) = torch.autograd.grad(big, theta)
    g_acc = torch.zeros_like(theta)
    for i in range(k):
        small, _ = apo_loss(scores_grouped(idx_all[i * 8:(i + 1) * 8]), p)
        (g,) = torch.autograd.grad(small, theta)
        g_acc += g / k  # DeepSpeed/torch accumulation divides each micro-batch loss by k
    assert_close(g_big, g_acc)
    if k > 1 and norm != "batch":
        # treating the 8·k samples as one micro-batch (λ over 8·k) is what differs: the test can fail
        s = scores_grouped(idx_all)
        s.group = n
        naive, _ = apo_loss(s, p)
        assert not torch.allclose(torch.autograd.grad(naive, theta)[0], g_big)


def test_loss_params_mirror_train_config():
    """Every LossParams field is read from the TrainConfig key of the same name (no silent defaults)."""
    from apo_ray.config import TrainConfig
    from apo_ray.loss import LossParams

    p = LossParams.from_train_config(TrainConfig(beta=0.3, lambda_norm="subset_mean", bc_weight=0.5))
    assert (p.beta, p.lambda_norm, p.bc_weight) == (0.3, "subset_mean", 0.5)
    assert set(LossParams.__dataclass_fields__) <= set(TrainConfig.__dataclass_fields__)


def _perturbed(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, str):
        return {"subset_sum": "batch", "sum": "mean", "all": "differ", "none": "batch"}[value]
    return value * 1.7 + 0.3


def test_objective_params_list_every_param_an_objective_reads():
    """A fork keeps an objective's trained stages when only parameters outside OBJECTIVE_PARAMS changed: so
    changing any unlisted parameter must leave that objective's loss (and its gradient) bitwise unchanged."""
    from apo_ray.loss import OBJECTIVE_PARAMS, OBJECTIVES

    fields = LossParams.__dataclass_fields__
    assert set(OBJECTIVE_PARAMS) == set(OBJECTIVES)
    for name, read in OBJECTIVE_PARAMS.items():
        assert set(read) <= set(fields), name
        base, _ = objective_loss(name, tiny(), LossParams())
        for f in set(fields) - set(read):
            s = tiny()
            p = LossParams(**{f: _perturbed(getattr(LossParams(), f))})
            loss, _ = objective_loss(name, s, p)
            assert loss.item() == base.item(), (name, f)
    # and the listed ones are read: the APO loss moves with each of its weights
    for f in ("beta", "desirable_weight", "undesirable_weight", "bc_weight", "beta_d", "reduction", "weight_norm"):
        moved, _ = objective_loss("apo", tiny(), LossParams(**{f: _perturbed(getattr(LossParams(), f))}))
        assert moved.item() != objective_loss("apo", tiny(), LossParams())[0].item(), f


def test_weight_norm_batch_by_hand():
    """train.weight_norm=batch: each micro-batch's weights λ_i·w_i are rescaled to sum to B, computed by hand on
    the tiny micro-batch (B=4) with the Lift variant's undesirable_weight 0.5; ``none`` is the paper's sum."""
    beta, z = 0.1, 0.1
    loss_i = [1 - sig(beta * (0.5 - z)), 1 - sig(beta * (0.0 - z)),  # L_D of r_D = 0.5, 0.0
              1 - sig(beta * (z + 0.5)), 1 - sig(beta * (z - 0.4))]  # L_U of r_U = -0.5, 0.4
    w_d = [(0.1 + 1e-4) / (0.4 + 1e-4), (0.3 + 1e-4) / (0.4 + 1e-4)]  # l1 over its subset's sum (subset_sum)
    w_u = [(0.2 + 1e-4) / (0.8 + 1e-4), (0.6 + 1e-4) / (0.8 + 1e-4)]
    lam = [1 - math.exp(-w) for w in w_d] + [math.exp(-w) for w in w_u]
    weights = [lam[0], lam[1], 0.5 * lam[2], 0.5 * lam[3]]
    raw = sum(wt * li for wt, li in zip(weights, loss_i, strict=True))
    scale = 4 / sum(weights)
    p_none = LossParams(undesirable_weight=0.5)
    p_batch = LossParams(undesirable_weight=0.5, weight_norm="batch")
    loss, m = apo_loss(tiny(), p_none)
    assert loss.item() == pytest.approx(raw, abs=1e-9) and m["sum_weight"] == pytest.approx(sum(weights), abs=1e-9)
    loss, m = apo_loss(tiny(), p_batch)
    assert loss.item() == pytest.approx(raw * scale, abs=1e-9)
    assert m["sum_weight"] == pytest.approx(4.0, abs=1e-9) and m["weight_scale"] == pytest.approx(scale, abs=1e-9)
    assert m["sum_weight_raw"] == pytest.approx(sum(weights), abs=1e-9)
    # KTO's weights already sum to B (all 1): batch leaves it exactly; with undesirable_weight 0.5 they sum to 3
    kto = [1 - sig(beta * (0.5 - z)), 1 - sig(beta * (0.0 - z)), 1 - sig(beta * (z + 0.5)), 1 - sig(beta * (z - 0.4))]
    assert kto_loss(tiny(), LossParams(weight_norm="batch"))[0].item() == pytest.approx(sum(kto), abs=1e-9)
    got = kto_loss(tiny(), LossParams(undesirable_weight=0.5, weight_norm="batch"))[0].item()
    assert got == pytest.approx(4 / 3 * (kto[0] + kto[1] + 0.5 * (kto[2] + kto[3])), abs=1e-9)
    # the rescale is per micro-batch: two micro-batches of 4 each sum to 4, whatever the other holds
    two = tiny(group=4, **{k: torch.cat([getattr(tiny(), k), getattr(tiny(), k)]) for k in
                           ("logp", "logp_u", "token_logp", "c", "is_expert", "l1", "ref_logp", "ref_logp_u",
                            "kl_logp", "ref_kl_logp")})
    two.l1 = torch.cat([tiny().l1, 3 * tiny().l1])  # the second micro-batch: other errors, same λ after norm
    loss2, m2 = apo_loss(two, p_batch)
    assert m2["sum_weight"] == pytest.approx(4.0, abs=1e-9)
    with pytest.raises(ValueError, match="weight_norm"):
        apo_loss(tiny(), LossParams(weight_norm="sum"))


def test_registry_objectives_score_and_reference_their_pairs() -> None:
    """Each registered objective gets the token sets it declares, and its Scores carry the policy's and the
    reference's log-probs of those sets in the fields its loss reads: the loss through the registry equals the
    loss function called on Scores assembled by hand."""
    from types import SimpleNamespace

    from apo_ray.loss import NEEDS_REFERENCE, REGISTRY, get_objective, logp_where_differ, next_in_group

    g, n = 4, 8
    torch.manual_seed(0)
    own, oracle = torch.randint(0, 256, (n, 7)), torch.randint(0, 256, (n, 7))
    oracle[:, :3] = own[:, :3]
    c = torch.tensor([0, 1, 2, 1, 0, 1, 1, 2])
    is_expert, l1 = torch.zeros(n, dtype=torch.bool), torch.rand(n)

    def fake(k: int) -> list:
        return [SimpleNamespace(logp=torch.randn(n), logp_u=torch.randn(n), token_logp=torch.randn(n, 8))
                for _ in range(k)]

    assert {"apo", "kto", "dpo"} == NEEDS_REFERENCE
    for name, obj in REGISTRY.items():
        sets = obj.token_sets(own, oracle, g)
        want = {"next": [own, next_in_group(own, g)], "oracle": [own, oracle], "": [own]}[obj.pair]
        assert len(sets) == len(want) and all(torch.equal(a, b) for a, b in zip(sets, want, strict=True)), name
        pol, ref = fake(len(sets)), fake(len(sets))
        s = obj.scores(pol, own, oracle, c, is_expert, l1, g)
        if obj.reference:
            obj.add_reference(s, ref, own, oracle)
        hand = Scores(logp=pol[0].logp, logp_u=pol[0].logp_u, token_logp=pol[0].token_logp, c=c, is_expert=is_expert,
                      l1=l1, group=g)
        if obj.pair == "next":
            hand.kl_logp, hand.differ_mask = pol[1].logp_u, own != oracle
            hand.ref_kl_logp = ref[1].logp_u
            hand.ref_logp_u_differ = logp_where_differ(ref[0].token_logp, own, oracle)
        if obj.pair == "oracle":
            hand.oracle_logp, hand.ref_oracle_logp = pol[1].logp, ref[1].logp
        if obj.reference:
            hand.ref_logp, hand.ref_logp_u = ref[0].logp, ref[0].logp_u
        for p in (LossParams(), LossParams(undesirable_tokens="differ")):
            fn = {"apo": apo_loss, "kto": kto_loss, "dpo": dpo_loss, "bc": bc_loss, "dagger": dagger_loss,
                  "sirius": sirius_loss}[name]
            assert_close(get_objective(name).loss(s, p, None)[0], fn(hand, p)[0])
        assert obj.reference_columns(LossParams(undesirable_tokens="differ")) == (
            {"ref_logp_oracle"} if obj.pair == "oracle" else {"ref_logp_u_differ"} if obj.pair == "next" else set())
    with pytest.raises(ValueError, match="unknown objective"):
        get_objective("ppo")
