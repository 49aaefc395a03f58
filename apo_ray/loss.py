"""Training objectives as pure torch functions: tensors in, ``(loss, metrics)`` out; no model, no I/O.

Every objective takes a :class:`Scores` (what the policy and the frozen reference assign to the batch's
action sequences) plus a :class:`LossParams`, and returns a scalar loss and a dict of detached scalar
metrics. The math follows ``shared/docs/apo_spec.md`` §2, "code as written" by default:

* reward ``r_i = log π_θ(a_i|o_i) − log π_ref(a_i|o_i)`` summed over the action tokens; desirable samples
  (c≠0) sum the 7 action tokens + EOS, undesirable ones (c=0) only the 7 action tokens;
* KL estimate ``z = clamp(mean_i(log π_θ(a_{i+1}|o_i) − log π_ref(a_{i+1}|o_i)), ±kl_clamp)``, detached,
  from mismatched pairs (each sample scored with the next sample's actions inside its micro-batch);
  ``kl_nonneg`` clamps it to ``[0, kl_clamp]`` instead;
* ``L_D = 1 − σ(β(r − z))``, ``L_U = 1 − σ(β(z − r))``, weighted by desirable/undesirable weights (and
  ``corrector_weight`` on corrector steps, c=2); ``undesirable_tokens="differ"`` sums an undesirable sample's
  reward only over the tokens that differ from the corrector's action at that step (an extension, not the paper);
  ``undesirable_floor`` F > 0 clamps ``r_U`` at −F inside ``L_U``, so a step already pushed F nats below the
  reference gets no more gradient (an extension, docs/FINDINGS.md §15);
* APO: ``λ_D = 1 − exp(−β_D w)``, ``λ_U = exp(−β_U w)`` with ``w`` the L1 action error normalised per subset
  (``subset_sum``, the paper's code), by the per-subset mean (``subset_mean``, batch-size invariant) or over
  the whole micro-batch (``batch``, the paper's text);
* loss per micro-batch = ``Σ_i λ_i w_i L_i`` (``sum``) or its mean, ``w_i`` the desirable/undesirable (and
  corrector) weight; micro-batches are averaged, which is what gradient accumulation over them computes;
* ``weight_norm="batch"`` (not the paper) rescales each micro-batch's weights ``λ_i w_i`` by one detached factor
  so they sum to its size B: KTO's already do (8 at B=8), APO's λ sum to about 2, so at one lr APO otherwise
  steps ~4x smaller than KTO.

A batch may hold several micro-batches back to back (``group`` samples each); λ, the KL estimate and the
reduction are then computed per micro-batch, exactly as if each were its own step of accumulation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

LAMBDA_NORMS = ("subset_sum", "subset_mean", "batch")
WEIGHT_NORMS = ("none", "batch")
UNDESIRABLE_TOKENS = ("all", "differ")
_EPS = 1e-4  # the paper's code: w_i = (l_i + 1e-4) / (Σ l + 1e-4)


@dataclass
class Scores:
    """Per-sample quantities for one batch of N = G·B samples (G micro-batches of ``group`` = B samples).

    Log-probs are summed over tokens. ``*_u`` = over the 7 action tokens only; the others include EOS.
    ``kl_*`` = the sample's observation scored with the next sample's action tokens (7 tokens), wrapping
    inside its micro-batch. Reference tensors carry no grad. ``token_logp`` is (N, 8) per-token policy
    log-probs of the sample's own 7 action tokens + EOS (for the cross-entropy terms).
    """

    logp: Tensor  # (N,)
    logp_u: Tensor  # (N,)
    token_logp: Tensor  # (N, 8)
    c: Tensor  # (N,) int: 0 undesirable, 1 policy, 2 corrector
    is_expert: Tensor  # (N,) bool
    l1: Tensor  # (N,) detached mean |argmax-decoded − label| over the 7 dims, normalised action space
    group: int = 8
    ref_logp: Tensor | None = None
    ref_logp_u: Tensor | None = None
    kl_logp: Tensor | None = None
    ref_kl_logp: Tensor | None = None
    # DPO's chosen side: the oracle's action tokens + EOS
    oracle_logp: Tensor | None = None
    ref_oracle_logp: Tensor | None = None
    # undesirable_tokens="differ": (N, 7) which action tokens differ from the oracle's at the same step, and the
    # reference's log-prob summed over just those tokens
    differ_mask: Tensor | None = None
    ref_logp_u_differ: Tensor | None = None


@dataclass(frozen=True)
class LossParams:
    beta: float = 0.1
    kl_clamp: float = 5.0
    kl_nonneg: bool = False
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    reweight: bool = True
    beta_d: float = 1.0
    beta_u: float = 1.0
    lambda_norm: str = "subset_sum"
    reduction: str = "sum"
    bc_weight: float = 0.0
    sirius_intervention_weight: float = 2.0
    sirius_preintervention_weight: float = 0.0
    undesirable_tokens: str = "all"
    corrector_weight: float = 1.0
    undesirable_floor: float = 0.0
    weight_norm: str = "none"

    @classmethod
    def from_train_config(cls, t) -> LossParams:
        # every field mirrors a TrainConfig key of the same name (loss.py must not import config); a rename on
        # either side fails here instead of silently falling back to a default
        return cls(**{n: getattr(t, n) for n in cls.__dataclass_fields__})


def _grouped(x: Tensor, group: int) -> Tensor:
    if x.shape[0] % group:
        raise ValueError(f"batch of {x.shape[0]} is not a whole number of micro-batches of {group}")
    return x.reshape(x.shape[0] // group, group, *x.shape[1:])


def kl_estimate(kl_logp: Tensor, ref_kl_logp: Tensor, group: int, clamp: float,
                allreduce: Callable[[Tensor], Tensor] | None = None, nonneg: bool = False) -> Tensor:
    """Per-micro-batch KL estimate (G,): mean mismatched-pair log-ratio, detached, clamped to ±clamp.

    ``allreduce`` (mean over workers) turns the paper code's per-device estimate into a global one.
    ``nonneg`` clamps at 0 from below instead (a KL is never negative; TRL's KTO does this): a negative
    estimate otherwise lowers every desirable sample's target and raises every undesirable one's.
    """
    z = _grouped((kl_logp - ref_kl_logp).detach(), group).mean(dim=1)
    if allreduce is not None:
        z = allreduce(z)
    return z.clamp(*kl_bounds(clamp, nonneg))


def kl_bounds(clamp: float, nonneg: bool) -> tuple[float, float]:
    """The interval the KL estimate is clamped to."""
    return (0.0 if nonneg else -clamp), clamp


def adaptive_lambdas(l1: Tensor, desirable: Tensor, group: int, norm: str = "subset_sum",
                     beta_d: float = 1.0, beta_u: float = 1.0) -> Tensor:
    """λ_i (N,): 1−exp(−β_D w_i) for desirable samples, exp(−β_U w_i) for undesirable ones.

    ``subset_sum``: w_i = (l_i + ε) / (Σ_{j in i's subset} l_j + ε)  (paper code; depends on subset size)
    ``subset_mean``: w_i = (l_i + ε) / (mean_{j in i's subset} l_j + ε)  (invariant to the batch size)
    ``batch``: w_i = (l_i + ε) / (Σ_{j in micro-batch} l_j + ε)  (paper text)
    """
    if norm not in LAMBDA_NORMS:
        raise ValueError(f"lambda_norm must be one of {LAMBDA_NORMS}, got {norm!r}")
    err = _grouped(l1.detach(), group)
    d = _grouped(desirable, group).to(err.dtype)
    u = 1.0 - d
    if norm == "batch":
        denom = err.sum(dim=1, keepdim=True).expand_as(err)
    else:
        sum_d = (err * d).sum(dim=1, keepdim=True)
        sum_u = (err * u).sum(dim=1, keepdim=True)
        if norm == "subset_mean":
            sum_d = sum_d / d.sum(dim=1, keepdim=True).clamp(min=1)
            sum_u = sum_u / u.sum(dim=1, keepdim=True).clamp(min=1)
        denom = d * sum_d + u * sum_u
    w = (err + _EPS) / (denom + _EPS)
    lam = d * (1.0 - torch.exp(-beta_d * w)) + u * torch.exp(-beta_u * w)
    return lam.reshape(-1)


def normalise_weights(weights: Tensor, group: int, norm: str) -> tuple[Tensor, Tensor]:
    """(weights, scale per micro-batch): ``none`` leaves them; ``batch`` rescales each micro-batch's weights by
    one detached factor so they sum to ``group``, the micro-batch size (an all-zero micro-batch stays zero)."""
    if norm not in WEIGHT_NORMS:
        raise ValueError(f"weight_norm must be one of {WEIGHT_NORMS}, got {norm!r}")
    g = _grouped(weights.detach(), group)
    if norm == "none":
        return weights, torch.ones(g.shape[0], dtype=weights.dtype, device=weights.device)
    total = g.sum(dim=1)
    scale = torch.where(total > 0, group / total.clamp(min=1e-12), torch.zeros_like(total))
    return weights * scale.repeat_interleave(group), scale


def _reduce(per_sample: Tensor, group: int, reduction: str) -> Tensor:
    g = _grouped(per_sample, group)
    if reduction == "sum":
        per_group = g.sum(dim=1)
    elif reduction == "mean":
        per_group = g.mean(dim=1)
    else:
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    return per_group.mean()  # micro-batches average, as gradient accumulation does


def token_nll(token_logp: Tensor) -> Tensor:
    """Per-sample mean negative log-likelihood over the 7 action tokens + EOS (N,)."""
    return -token_logp.mean(dim=1)


def _weighted_mean(x: Tensor, w: Tensor) -> Tensor:
    return (x * w).sum() / w.sum().clamp(min=1e-8)


def undesirable_reward(s: Scores, tokens: str = "all") -> Tensor:
    """r_U (N,): policy minus reference log-prob over the 7 action tokens (``all``), or only over the tokens
    that differ from the corrector's action at the same step (``differ``). A relabelled step shares most of its
    gripper tokens with the corrector that took over; pushing those down lowers what the desirable term raises."""
    if tokens == "all":
        return s.logp_u - s.ref_logp_u
    if tokens != "differ":
        raise ValueError(f"undesirable_tokens must be one of {UNDESIRABLE_TOKENS}, got {tokens!r}")
    if s.differ_mask is None or s.ref_logp_u_differ is None:
        raise ValueError("undesirable_tokens='differ' needs the differ mask and the reference's masked log-probs")
    mask = s.differ_mask.to(s.token_logp.dtype)
    return (s.token_logp[:, :7] * mask).sum(dim=1) - s.ref_logp_u_differ


def apo_loss(s: Scores, p: LossParams, allreduce: Callable[[Tensor], Tensor] | None = None) -> tuple[Tensor, dict]:
    """APO (= KTO when ``p.reweight`` is False), optionally plus ``bc_weight`` × NLL on desirable samples."""
    if s.ref_logp is None or s.ref_logp_u is None or s.kl_logp is None or s.ref_kl_logp is None:
        raise ValueError("apo/kto need reference and mismatched-pair log-probs")
    desirable = s.c != 0
    r_d = s.logp - s.ref_logp
    r_u = undesirable_reward(s, p.undesirable_tokens)
    z = kl_estimate(s.kl_logp, s.ref_kl_logp, s.group, p.kl_clamp, allreduce, p.kl_nonneg)
    lo, hi = kl_bounds(p.kl_clamp, p.kl_nonneg)
    z_i = z.repeat_interleave(s.group)
    loss_d = 1.0 - torch.sigmoid(p.beta * (r_d - z_i))
    # the floor stops the push once r_U is F nats down: past it L_U is flat (docs/FINDINGS.md §15)
    r_u_pushed = r_u.clamp(min=-p.undesirable_floor) if p.undesirable_floor > 0 else r_u
    loss_u = 1.0 - torch.sigmoid(p.beta * (z_i - r_u_pushed))
    w_d = torch.where(s.c == 2, p.desirable_weight * p.corrector_weight, p.desirable_weight)
    w = torch.where(desirable, w_d, torch.full_like(w_d, p.undesirable_weight)).to(loss_d.dtype)
    if p.reweight:
        lam = adaptive_lambdas(s.l1, desirable, s.group, p.lambda_norm, p.beta_d, p.beta_u)
    else:
        lam = torch.ones_like(loss_d)
    weight, scale = normalise_weights(lam * w, s.group, p.weight_norm)
    loss = _reduce(weight * torch.where(desirable, loss_d, loss_u), s.group, p.reduction)
    dmask = desirable.to(loss_d.dtype)
    umask = 1.0 - dmask
    n_groups = s.logp.shape[0] // s.group
    metrics = {
        "r_D": _weighted_mean(r_d.detach(), dmask).item() if dmask.sum() > 0 else float("nan"),
        "r_U": _weighted_mean(r_u.detach(), umask).item() if umask.sum() > 0 else float("nan"),
        "kl": z.mean().item(),
        "kl_at_clamp": ((z <= lo + 1e-6) | (z >= hi - 1e-6)).float().mean().item(),
        "sum_lambda_D": ((lam * dmask).sum() / n_groups).item(),
        "sum_lambda_U": ((lam * umask).sum() / n_groups).item(),
        # Σ_i λ_i w_i per micro-batch before and after weight_norm: what sets the step size at a given lr
        "sum_weight_raw": ((lam * w).sum() / n_groups).item(),
        "sum_weight": (weight.detach().sum() / n_groups).item(),
        "weight_scale": scale.mean().item(),
        "loss_D": _weighted_mean(loss_d.detach(), dmask).item() if dmask.sum() > 0 else float("nan"),
        "loss_U": _weighted_mean(loss_u.detach(), umask).item() if umask.sum() > 0 else float("nan"),
    }
    if p.undesirable_floor > 0 and umask.sum() > 0:
        metrics["u_at_floor"] = _weighted_mean((r_u.detach() <= -p.undesirable_floor).float(), umask).item()
    if p.undesirable_tokens == "differ" and umask.sum() > 0:
        metrics["u_tokens_differ"] = _weighted_mean(s.differ_mask.float().mean(dim=1), umask).item()
    if p.bc_weight:
        bc = _weighted_mean(token_nll(s.token_logp), dmask)
        loss = loss + p.bc_weight * bc
        metrics["bc_nll"] = bc.item()
    metrics["loss"] = loss.item()
    return loss, metrics


def kto_loss(s: Scores, p: LossParams, allreduce: Callable[[Tensor], Tensor] | None = None) -> tuple[Tensor, dict]:
    """KTO: APO without the adaptive reweighting (λ ≡ 1)."""
    return apo_loss(s, LossParams(**{**p.__dict__, "reweight": False}), allreduce)


def bc_loss(s: Scores, p: LossParams, mask: Tensor | None = None) -> tuple[Tensor, dict]:
    """Cross-entropy over the 7 action tokens + EOS, mean over tokens and the (masked) samples."""
    w = torch.ones_like(s.logp) if mask is None else mask.to(s.logp.dtype)
    if w.sum() == 0:
        raise ValueError("bc loss on a batch with no selected samples")
    loss = _weighted_mean(token_nll(s.token_logp), w)
    return loss, {"loss": loss.item(), "nll": loss.item()}


def dagger_loss(s: Scores, p: LossParams) -> tuple[Tensor, dict]:
    """BC on expert demos + corrector steps (c=2); policy steps and relabelled steps are left out."""
    mask = s.is_expert | (s.c == 2)
    if not bool(mask.any()):  # a micro-batch without such rows contributes nothing, not NaN
        zero = (s.logp * 0).sum()
        return zero, {"loss": 0.0, "nll": float("nan")}
    return bc_loss(s, p, mask)


def sirius_loss(s: Scores, p: LossParams) -> tuple[Tensor, dict]:
    """Intervention-weighted BC (Liu et al. 2023): expert and policy steps weight 1, corrector steps
    ``sirius_intervention_weight``, pre-intervention (relabelled c=0) steps ``sirius_preintervention_weight``."""
    w = torch.ones_like(s.logp)
    w = torch.where(s.c == 2, torch.full_like(w, p.sirius_intervention_weight), w)
    w = torch.where((s.c == 0) & ~s.is_expert, torch.full_like(w, p.sirius_preintervention_weight), w)
    loss = _weighted_mean(token_nll(s.token_logp), w)
    return loss, {"loss": loss.item(), "nll": loss.item()}


def dpo_loss(s: Scores, p: LossParams) -> tuple[Tensor, dict]:
    """DPO on the relabelled steps (c=0): chosen = the oracle's action, rejected = the policy's action.

    loss = −mean_pairs log σ(β[(log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l))]), both sides
    summed over 7 action tokens + EOS.
    """
    if s.oracle_logp is None or s.ref_oracle_logp is None or s.ref_logp is None:
        raise ValueError("dpo needs oracle-token and reference log-probs")
    pairs = s.c == 0
    if not bool(pairs.any()):
        zero = (s.logp * 0).sum()
        return zero, {"loss": 0.0, "margin": float("nan")}
    chosen = (s.oracle_logp - s.ref_oracle_logp)[pairs]
    rejected = (s.logp - s.ref_logp)[pairs]
    margin = p.beta * (chosen - rejected)
    loss = -F.logsigmoid(margin).mean()
    return loss, {"loss": loss.item(), "margin": margin.detach().mean().item(),
                  "r_D": chosen.detach().mean().item(), "r_U": rejected.detach().mean().item()}


_KTO_PARAMS = ("beta", "kl_clamp", "kl_nonneg", "desirable_weight", "undesirable_weight", "reweight", "beta_d",
               "beta_u", "lambda_norm", "reduction", "bc_weight", "undesirable_tokens", "corrector_weight",
               "undesirable_floor", "weight_norm")
PAIRS = ("", "next", "oracle")


@dataclass(frozen=True)
class Objective:
    """A training objective and everything the trainer needs to run it, so the trainer has no per-objective code.

    ``pair``: the second action set scored for each observation in the same forward: ``next`` = the next
    sample's actions in the micro-batch (KTO's mismatched pairs for the KL estimate), ``oracle`` = the
    corrector's action (DPO's chosen side), ``""`` = none.
    """

    name: str
    loss: Callable[[Scores, LossParams, Callable[[Tensor], Tensor] | None], tuple[Tensor, dict]]
    params: tuple[str, ...] = ()  # the LossParams fields the loss reads (tests check the others cannot change it)
    reference: bool = False  # rewards against a frozen reference π_ref
    undesirable: bool = False  # needs undesirable (c=0) samples
    pair: str = ""

    def __post_init__(self) -> None:
        if self.pair not in PAIRS:
            raise ValueError(f"pair must be one of {PAIRS}, got {self.pair!r}")

    def token_sets(self, own: Tensor, oracle: Tensor, group: int) -> list[Tensor]:
        """The action-token sets (each (N, 7)) to score: the sample's own, then its pair if any."""
        if self.pair == "next":
            return [own, next_in_group(own, group)]
        return [own, oracle] if self.pair == "oracle" else [own]

    def reference_columns(self, p: LossParams) -> set[str]:
        """Reference columns a cached reference must hold beyond ref_logp / ref_logp_u / ref_kl_logp."""
        if self.pair == "oracle":
            return {"ref_logp_oracle"}
        return {"ref_logp_u_differ"} if self.pair == "next" and p.undesirable_tokens == "differ" else set()

    def scores(self, policy: list, own: Tensor, oracle: Tensor, c: Tensor, is_expert: Tensor, l1: Tensor,
               group: int) -> Scores:
        """:class:`Scores` from the policy's scores of :meth:`token_sets` (objects with ``logp``, ``logp_u``,
        ``token_logp``), without the reference's."""
        s = Scores(logp=policy[0].logp, logp_u=policy[0].logp_u, token_logp=policy[0].token_logp, c=c,
                   is_expert=is_expert, l1=l1, group=group)
        if self.pair == "next":
            s.kl_logp, s.differ_mask = policy[1].logp_u, own != oracle
        elif self.pair == "oracle":
            s.oracle_logp = policy[1].logp
        return s

    def add_reference(self, s: Scores, ref: list, own: Tensor, oracle: Tensor) -> None:
        """Fill ``s``'s reference fields from a live reference's scores of the same :meth:`token_sets`."""
        s.ref_logp, s.ref_logp_u = ref[0].logp.float(), ref[0].logp_u.float()
        if self.pair == "next":
            s.ref_kl_logp = ref[1].logp_u.float()
            s.ref_logp_u_differ = logp_where_differ(ref[0].token_logp.float(), own, oracle)
        elif self.pair == "oracle":
            s.ref_oracle_logp = ref[1].logp.float()


CACHED_REFERENCE = {"ref_logp": "ref_logp", "ref_logp_u": "ref_logp_u", "ref_kl_logp": "ref_kl_logp",
                    "ref_logp_oracle": "ref_oracle_logp", "ref_logp_u_differ": "ref_logp_u_differ"}
"""Dataset column → :class:`Scores` field, for a reference precomputed by the dataset stage."""


def add_cached_reference(s: Scores, columns: dict[str, Tensor]) -> None:
    """Fill ``s``'s reference fields from the dataset's reference columns (those present)."""
    for col, field in CACHED_REFERENCE.items():
        if col in columns:
            setattr(s, field, columns[col])


def next_in_group(tokens: Tensor, group: int) -> Tensor:
    """Mismatched pairs: row i gets row i+1's tokens, wrapping inside each micro-batch of ``group`` rows."""
    return _grouped(tokens, group).roll(-1, dims=1).reshape(tokens.shape)


def logp_where_differ(token_logp: Tensor, tokens: Tensor, other: Tensor) -> Tensor:
    """(N,) log-prob summed over the action tokens (of ``token_logp``'s first 7) that differ from ``other``."""
    return (token_logp[:, :7] * (tokens != other).to(token_logp.dtype)).sum(dim=1)


def _no_allreduce(fn: Callable[[Scores, LossParams], tuple[Tensor, dict]]):
    return lambda s, p, allreduce=None: fn(s, p)


REGISTRY: dict[str, Objective] = {o.name: o for o in (
    Objective("apo", apo_loss, _KTO_PARAMS, reference=True, undesirable=True, pair="next"),
    Objective("kto", kto_loss, _KTO_PARAMS, reference=True, undesirable=True, pair="next"),
    Objective("dagger", _no_allreduce(dagger_loss)),
    Objective("sirius", _no_allreduce(sirius_loss), ("sirius_intervention_weight", "sirius_preintervention_weight")),
    Objective("dpo", _no_allreduce(dpo_loss), ("beta",), reference=True, undesirable=True, pair="oracle"),
    Objective("bc", _no_allreduce(bc_loss)),
)}
OBJECTIVES = tuple(REGISTRY)
NEEDS_REFERENCE = {n for n, o in REGISTRY.items() if o.reference}
NEEDS_UNDESIRABLE = {n for n, o in REGISTRY.items() if o.undesirable}
OBJECTIVE_PARAMS: dict[str, tuple[str, ...]] = {n: o.params for n, o in REGISTRY.items()}
"""The :class:`LossParams` fields each objective reads; the rest cannot change its loss (tests check this), so
a run forked with another value of them may keep that objective's trained stages."""


def get_objective(name: str) -> Objective:
    if name not in REGISTRY:
        raise ValueError(f"unknown objective {name!r}; use one of {OBJECTIVES}")
    return REGISTRY[name]


def objective_loss(objective: str, s: Scores, p: LossParams,
                   allreduce: Callable[[Tensor], Tensor] | None = None) -> tuple[Tensor, dict]:
    """The loss of the objective named ``objective`` (one of :data:`OBJECTIVES`)."""
    return get_objective(objective).loss(s, p, allreduce)
