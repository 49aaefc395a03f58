"""One frozen dataclass tree for every stage.

YAML files hold only overrides of the defaults below; ``a.b=c`` CLI overrides go on top. Unknown keys,
wrong types and inconsistent values raise :class:`UserError` naming the key (and the closest valid one).
The resolved tree (``to_dict``) is saved beside every output so a run can be reproduced and resumed.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from apo_ray.errors import UserError
from envs.corrector import CorrectorConfig  # the corrector section: envs defines it (one-way imports)

OBJECTIVES = ("apo", "kto", "dagger", "sirius", "dpo", "bc")
"""The training objectives (apo_ray.loss.OBJECTIVES, kept here so loading a config needs no torch)."""
CHOICES: dict[str, tuple[Any, ...]] = {
    "model.kind": ("tiny", "hf"),
    "model.vision": ("resnet", "convnext", "conv", "vit"),
    "data.demo_label": ("action", "oracle"),
    "train.objective": OBJECTIVES,
    "train.lambda_norm": ("subset_sum", "subset_mean", "batch"),
    "train.weight_norm": ("none", "batch"),
    "train.reduction": ("sum", "mean"),
    "train.undesirable_tokens": ("all", "differ"),
    "train.reference": ("auto", "cached", "live"),
    "train.zero_stage": (0, 1, 2, 3),
    "loop.base_objective": OBJECTIVES,
}
"""Keys whose value is one of a fixed set: checked when the config loads, so a typo fails there and not in a
Ray worker an hour later."""
REMOVED: dict[str, str] = {
    "collect.policy": "apo-ray collect takes --policy; the loop deploys its own policies",
    "collect.episodes": "apo-ray collect takes --episodes; the loop uses loop.demos and loop.rollouts_per_round",
    "collect.round": "apo-ray collect takes --round; the loop numbers its rounds itself",
    "env.camera": "observations always carry camera images",
}
"""Keys that were read by nothing and are gone, with what to use instead. A user's config naming one is refused
with this line; a run dir's saved config.json drops them (they never changed an output)."""


@dataclass(frozen=True)
class EnvConfig:
    task: str = "lift"
    """Task name (``apo-ray tasks`` lists them)."""
    scenario: str = "nominal"
    """A scenario name or a composition like ``position+texture``."""
    image_size: int = 64
    """Square agentview RGB size in pixels (64..224)."""
    wrist: bool = False
    """Add the eye-in-hand camera: images become agentview and wrist side by side, (S, 2S, 3)."""
    horizon: int = 0
    """Max control steps per episode; 0 = the task's default."""
    cheap_render: bool = True
    """Drop reflections/shadows/MSAA and size the offscreen buffer to the image (3x faster on CPU)."""


@dataclass(frozen=True)
class CollectConfig:
    workers: int = 2
    """Parallel rollout actors of the loop's collect stages."""
    seed: int = 0
    """First seed of the loop's demos; deployment seeds follow from round and scenario (docs/LOOP.md)."""
    videos: int = 0
    """MP4s of the first N episodes of each deployment stage."""
    envs_per_worker: int = 8
    """Envs each rollout actor (env runner) steps. With a checkpoint policy behind the inference service, a runner
    steps one env while the others' observations are decoded; scripted and per-actor policies step one at a time.
    Never changes an episode (each is a pure function of its seed)."""
    gpus_per_worker: float = 0.0
    """GPU share of each rollout actor, for the policy's forward pass in bf16 (0.25: four actors per GPU); 0 =
    CPU. Used where the cluster has GPUs or its autoscaler can add them; elsewhere the actors run the policy on
    CPU, as train.use_gpu falls back. A 7B VLA needs it: on CPU one action takes seconds. With the inference
    service (``inference.enabled``) it is the replicas' share unless ``inference.gpus_per_replica`` is set."""
    oracle_version: int = 2
    """Revision of the scripted oracle that collects demos and corrects: 1 as first shipped; 2 also turns its
    grasp to clear a bin wall and retries a grasp that holds nothing (docs/FINDINGS.md §19). A run made
    before the key existed keeps 1, so it resumes unchanged."""


@dataclass(frozen=True)
class DataConfig:
    k: int = 5
    """Policy steps before each intervention start relabelled undesirable (c=0)."""
    ratios: tuple[float, float, float] = (0.5, 0.25, 0.25)
    """Per-batch share of the correct / interaction / incorrect pools."""
    max_abs_action: float = 1.0
    """Steps with any |action| above this are dropped as out of range."""
    idle_threshold: float = 0.05
    """Steps with sum(|a[:6]|) below this are dropped as near-idle."""
    batch_size: int = 8
    """Samples per micro-batch (one training-set row)."""
    demo_label: str = "action"
    """What expert demos train on: ``action`` (the executed action) or ``oracle`` (the clean oracle action recorded
    beside it, for demos collected with ``dart-oracle:<sigma>``)."""
    n_bins: int = 256
    """Action tokens per dimension (the last ``n_bins`` ids of the vocabulary)."""
    seed: int = 0
    """Seed of the shuffle and the pool sampling."""
    rows_per_shard: int = 4096
    """Training-set rows per Parquet shard."""
    epochs: int = 0
    """Balanced schedules the training set holds, one per training epoch, each drawn afresh (seeded by ``seed`` and
    the epoch) as the paper's sampler reshuffles every epoch. 0 = in ``apo-ray loop``, as many as the stage's
    training epochs (``train.epochs``, ``loop.base_epochs`` in round 0); ``apo-ray dataset`` then builds 1.
    Training past the last schedule cycles back to the first."""


@dataclass(frozen=True)
class ModelConfig:
    kind: str = "tiny"
    """``tiny`` (built from transformers configs) or ``hf`` (a local HF VLA directory)."""
    path: str = ""
    """For ``hf``: local directory of the pretrained VLA (``trust_remote_code``)."""
    hidden_size: int = 128
    """Tiny kind: width of the language model."""
    num_layers: int = 4
    """Tiny kind: transformer layers."""
    num_heads: int = 4
    """Tiny kind: attention heads."""
    vision: str = "resnet"
    """Tiny kind's vision model: ``resnet``, ``convnext`` (transformers models), ``conv`` (a plain stride-2 conv
    stem like the probe that learned Lift) or ``vit``."""
    vision_hidden_size: int = 64
    """Tiny kind: width of the vision model."""
    vision_layers: int = 2
    """Tiny kind: depth of the vision model."""
    patch_size: int = 16
    """Image pixels per image token side: 64 px / 16 = 4x4 = 16 image tokens."""
    use_proprio: bool = False
    """Tiny kind: a proprio token (eef pos, quat, gripper), standardised with the BC data's statistics."""
    coord_channels: bool = False
    """Tiny kind: append the pixel coordinates as 2 input channels (CoordConv) for finer localisation."""
    lora_r: int = -1
    """LoRA rank (0 = train every weight); -1 = the kind's default: 32 for ``hf`` (a 7B trains rank-32 adapters
    on a frozen base, and its live reference is that base with the adapters disabled), 0 for ``tiny``."""
    lora_alpha: int = 16
    """LoRA scale numerator (scale = alpha / r)."""
    action_tokens: str = ""
    """``hf``: the action-token convention (``ascending`` or ``openvla``) of a model whose config.json does not
    state it; an OpenVLA config and an ``apo-ray export-hf`` dir state it themselves."""

    @property
    def lora_rank(self) -> int:
        return self.lora_r if self.lora_r >= 0 else (32 if self.kind == "hf" else 0)


@dataclass(frozen=True)
class TrainConfig:
    objective: str = "apo"
    """``apo``, ``kto``, ``dagger``, ``sirius``, ``dpo`` or ``bc``."""
    lr: float = 1e-4
    """Peak learning rate (AdamW, linear warmup)."""
    epochs: int = 1
    """Passes over the training set."""
    max_steps: int = 0
    """Stop after this many optimizer steps (0 = run all epochs)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step. A micro-batch is one dataset row, so its size is ``data.batch_size``."""
    workers: int = 1
    """Ray Train workers (data-parallel ranks)."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage: 0, 1, 2 or 3."""
    warmup_steps: int = 10
    """Linear learning-rate warmup steps."""
    grad_clip: float = 1.0
    """Gradient-norm clip."""
    seed: int = 1
    """Seed of torch's RNG and of the weights when training from scratch. The data order is the dataset's
    (``data.seed``), so a warm-started run on a built dataset does not depend on it (docs/experiments/demo_pi0.md)."""
    beta: float = 0.1
    """APO/KTO/DPO temperature of the log-ratio rewards."""
    kl_clamp: float = 5.0
    """Bound of the KL reference-point estimate."""
    kl_nonneg: bool = False
    """Clamp the KL estimate to [0, kl_clamp] (TRL's KTO) instead of the paper code's [-kl_clamp, kl_clamp]."""
    desirable_weight: float = 1.0
    """KTO/APO weight of the desirable loss term."""
    undesirable_weight: float = 1.0
    """KTO/APO weight of the undesirable loss term."""
    reweight: bool = True
    """APO's adaptive per-sample weights lambda (false = KTO)."""
    beta_d: float = 1.0
    """APO: temperature of the desirable samples' lambda."""
    beta_u: float = 1.0
    """APO: temperature of the undesirable samples' lambda."""
    lambda_norm: str = "subset_sum"
    """``subset_sum`` (the paper's code), ``subset_mean`` (batch-size invariant) or ``batch`` (the paper's text)."""
    weight_norm: str = "none"
    """APO/KTO: ``none`` (the paper's code: each sample's weight λ_i·w_i as it falls, so under Σ reduction KTO's sum
    to 8 per micro-batch and APO's λ to about 2) or ``batch``: rescale them (a detached factor per micro-batch) to
    sum to the micro-batch size, so every objective and weighting takes comparable steps at one lr."""
    reduction: str = "sum"
    """``sum`` (the paper's code) or ``mean``."""
    kl_allreduce: bool = False
    """Average the KL estimate over the workers (default: each worker's own, as the paper's code)."""
    bc_weight: float = 0.0
    """Extra NLL on desirable samples (the paper's unused ``bc_weight`` knob)."""
    undesirable_tokens: str = "all"
    """APO/KTO: ``all`` 7 action tokens in an undesirable sample's reward (the paper), or ``differ``: only those
    that differ from the corrector's action at the same step (docs/FINDINGS.md §12)."""
    corrector_weight: float = 1.0
    """APO/KTO: weight of corrector steps (c=2) among the desirable samples, relative to policy steps and demos."""
    undesirable_floor: float = 0.0
    """APO/KTO: stop pushing an undesirable sample once its reward r_U is this many nats below the reference
    (clamped inside L_U); 0 = off, the paper. docs/FINDINGS.md §15."""
    checkpoint_every: int = 50
    """Optimizer steps between Ray Train checkpoints (a killed training resumes from the last)."""
    pass_cache_mb: int = 1024
    """A worker keeps a pass over its batches (``data.epochs`` schedules) in memory up to this size and replays it
    for the next passes instead of reading the shards again (each re-read stalled a BC epoch ~20 s on 2 cores);
    0 reads every pass."""
    sirius_intervention_weight: float = 2.0
    """Sirius: weight of corrector steps."""
    sirius_preintervention_weight: float = 0.0
    """Sirius: weight of the policy steps before an intervention."""
    reference: str = "auto"
    """``auto`` (the dataset's cached ref log-prob columns when they come from ``--init``'s checkpoint, matched by
    path or file content; else a live replica), ``cached``, ``live``."""
    cpus_per_worker: float = 0.5
    """Ray CPUs per train worker; 0.5 leaves room for Ray Data on a 2-core box."""
    torch_threads: int = 0
    """Torch threads per worker; 0 = cores / workers."""
    use_gpu: bool = True
    """Use CUDA (bf16) when the cluster has GPUs."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    log_every: int = 1
    """Optimizer steps between metric records."""
    max_failures: int = 1
    """Worker-group restarts (from the last checkpoint) before the run fails."""
    mlflow_uri: str = ""
    """MLflow tracking URI: the trainer also logs its per-step metrics there, and ``report_to: [mlflow]`` logs the
    loop's there (empty: RUN_DIR/mlruns). Needs the mlflow extra."""
    report_to: tuple[str, ...] = ()
    """Experiment trackers the loop logs the config and each round's success and interventions to: any of
    tensorboard (RUN_DIR/tb), mlflow, wandb (extras: pip install 'apo_ray[mlflow]'), through Ray's integrations."""


@dataclass(frozen=True)
class EvalConfig:
    episodes: int = 50
    """Held-out episodes per evaluation cell."""
    seed: int = 100_000
    """First seed of the held-out evaluation list; never overlaps collection seeds."""
    workers: int = 2
    """Parallel evaluation actors."""
    videos: int = 0
    """MP4s of the first N episodes of each evaluation stage."""
    envs_per_worker: int = 8
    """Envs each evaluation actor steps (as ``collect.envs_per_worker``)."""
    gpus_per_worker: float = 0.0
    """GPU share of each evaluation actor (as ``collect.gpus_per_worker``)."""


@dataclass(frozen=True)
class InferenceConfig:
    """The batched policy-inference service of checkpoint policies (apo_ray.inference, docs/LOOP.md)."""

    enabled: bool = True
    """Checkpoint policies act through shared replicas that batch requests across env runners; false: each rollout
    actor loads its own copy and decodes at batch 1 (the path before the service)."""
    max_batch: int = 8
    """Rows of every decode. Fewer requests are padded to this fixed shape, so a row's result never depends on its
    batch mates; like ``threads``, part of the policy's numerics (a change may move low-order bits)."""
    max_wait_ms: float = 150.0
    """The longest a replica holds its oldest request waiting for a full batch (0: decode what is queued at once);
    it decodes sooner once every open episode is waiting. On CPU a padded row costs nearly what a real one does,
    so a full batch is worth a wait while the runners step their other envs (docs/LOOP.md: 150 ms filled 7.9 of 8
    rows, 50 ms 4.5)."""
    replicas: int = 1
    """Replicas (model copies) on CPU; on a cluster with GPUs, one per GPU (``gpus_per_replica: 1``) is the rule."""
    gpus_per_replica: float = 0.0
    """GPU share of each replica, which then runs in bf16 on the GPU nodes; 0 = ``collect/eval.gpus_per_worker``."""
    threads: int = 1
    """Torch threads of a CPU replica (the env runners keep the other cores)."""


@dataclass(frozen=True)
class LoopConfig:
    rounds: int = 2
    """Refinement rounds after the round-0 base policy."""
    demos: int = 50
    """Expert demos of round 0."""
    rollouts_per_round: int = 20
    """Deployment episodes per arm, scenario and round."""
    arms: tuple[str, ...] = ("apo",)
    """Objectives compared, one policy lineage each: apo, kto, dagger, sirius, dpo."""
    scenarios: tuple[str, ...] = ("position",)
    """Disruption scenarios deployed in and evaluated on (the original scenario is evaluated too)."""
    share_round1: bool = False
    """Deploy pi0 once in round 1 and give every arm the same round-1 data (a cheaper comparison)."""
    base_objective: str = "bc"
    """Objective of the round-0 base policy pi0, trained from scratch on the expert demos."""
    base_epochs: int = 0
    """Round-0 epochs (0 = ``train.epochs``)."""
    base_max_steps: int = 0
    """Round-0 optimizer-step cap (0 = ``train.max_steps``)."""
    base_lr: float = 0.0
    """Round-0 learning rate (0 = ``train.lr``)."""
    demo_policy: str = "oracle"
    """Round-0 demo collector: ``oracle``, or ``dart-oracle:<sigma>`` with ``data.demo_label: oracle``."""
    base_batch_size: int = 0
    """Round-0 (BC) batch size (0 = ``data.batch_size``); BC learns best at 64, APO's micro-batch is 8."""
    base_idle_threshold: float = -1.0
    """Round-0 near-idle filter (< 0 = ``data.idle_threshold``). 0 keeps the oracle's hold steps after a grasp,
    which teach the policy to stall there (docs/FINDINGS.md §8)."""
    storage: str = ""
    """Run-dir storage URI (local path or ``s3://``); empty = the ``--run-dir`` given on the CLI."""
    base_policy: str = ""
    """A trained pi0 checkpoint dir (e.g. ``assets/pi0_lift``): round 0 copies it in instead of training BC on
    the demos (which it still collects: later rounds' datasets hold them). Empty = train pi0."""


@dataclass(frozen=True)
class Config:
    env: EnvConfig = field(default_factory=EnvConfig)
    corrector: CorrectorConfig = field(default_factory=CorrectorConfig)
    collect: CollectConfig = field(default_factory=CollectConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))

    def validate(self) -> Config:
        for key, allowed in CHOICES.items():
            sec, name = key.split(".")
            value = getattr(getattr(self, sec), name)
            if value not in allowed:
                close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
                names = [str(a) for a in allowed]
                fix = (f"did you mean '{close[0]}'? " if close else "") + \
                    f"use {', '.join(names[:-1])} or {names[-1]}"
                raise UserError(f"unknown {key} '{value}'", f"config {key}", fix)
        for name in self.train.report_to:
            if name not in ("tensorboard", "mlflow", "wandb"):
                close = difflib.get_close_matches(name, ["tensorboard", "mlflow", "wandb"], n=1)
                raise UserError(f"unknown train.report_to '{name}'", "config train.report_to",
                                (f"did you mean '{close[0]}'? " if close else "") + "use tensorboard, mlflow or wandb")
        r = self.data.ratios
        if len(r) != 3 or any(x < 0 for x in r) or abs(sum(r) - 1.0) > 1e-6:
            raise UserError(f"data.ratios must be 3 non-negative shares summing to 1, got {list(r)} "
                            f"(sum {sum(r):.3f})", "config data.ratios", "e.g. [0.5, 0.25, 0.25]")
        if not 64 <= self.env.image_size <= 224:
            raise UserError(f"env.image_size {self.env.image_size} out of range", "config env.image_size",
                            "use a value in 64..224")
        for name in ("k", "batch_size", "rows_per_shard"):
            if getattr(self.data, name) < (0 if name == "k" else 1):
                raise UserError(f"data.{name} must be positive", f"config data.{name}", "set a positive integer")
        if self.data.epochs < 0:
            raise UserError("data.epochs must be >= 0", "config data.epochs",
                            "use 0 (one schedule per training epoch) or the number of schedules to build")
        if self.train.undesirable_floor < 0:
            raise UserError("train.undesirable_floor must be >= 0", "config train.undesirable_floor",
                            "use 0 (off) or the nats below the reference at which the push stops, e.g. 14")
        if self.train.pass_cache_mb < 0:
            raise UserError("train.pass_cache_mb must be >= 0", "config train.pass_cache_mb",
                            "use 0 (read every pass) or a size in MB, e.g. 1024")
        if self.train.corrector_weight < 0:
            raise UserError("train.corrector_weight must be >= 0", "config train.corrector_weight",
                            "set a non-negative weight (1.0 = the paper)")
        if self.collect.oracle_version not in (1, 2):
            raise UserError(f"collect.oracle_version {self.collect.oracle_version} does not exist",
                            "config collect.oracle_version", "use 2 (current) or 1 (as first shipped)")
        for sec in ("collect", "eval"):
            g = getattr(self, sec).gpus_per_worker
            if g < 0:
                raise UserError(f"{sec}.gpus_per_worker must be >= 0", f"config {sec}.gpus_per_worker",
                                "use 0 (CPU) or a share of a GPU, e.g. 0.25")
            if g > 1 and g != int(g):  # Ray packs fractions onto one GPU only
                raise UserError(f"{sec}.gpus_per_worker {g} is neither a share of one GPU nor whole GPUs",
                                f"config {sec}.gpus_per_worker", "use a share in (0, 1] or a whole number")
            if getattr(self, sec).envs_per_worker < 1:
                raise UserError(f"{sec}.envs_per_worker must be >= 1", f"config {sec}.envs_per_worker",
                                "use 1 or more envs per rollout actor, e.g. 8")
        inf = self.inference
        for name, low, fix in (("max_batch", 1, "e.g. 8"), ("replicas", 1, "e.g. 1 on CPU, one per GPU on a cluster"),
                               ("threads", 1, "e.g. 1")):
            if getattr(inf, name) < low:
                raise UserError(f"inference.{name} must be >= {low}, got {getattr(inf, name)}",
                                f"config inference.{name}", f"set a positive integer, {fix}")
        if inf.max_wait_ms < 0:
            raise UserError(f"inference.max_wait_ms must be >= 0, got {inf.max_wait_ms:g}", "config inference.max_wait_ms",
                            "use 0 (no waiting) or a few milliseconds, e.g. 4")
        g = inf.gpus_per_replica
        if g < 0 or (g > 1 and g != int(g)):
            raise UserError(f"inference.gpus_per_replica {g:g} is neither 0, a share of one GPU nor whole GPUs",
                            "config inference.gpus_per_replica", "use 0 (CPU), a share in (0, 1] or a whole number, e.g. 1")
        if self.loop.base_batch_size < 0:
            raise UserError("loop.base_batch_size must be >= 0", "config loop.base_batch_size",
                            "set 0 (use data.batch_size) or a positive batch size")
        return self


def _to_plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_to_plain(v) for v in obj]
    return obj


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against annotation ``tp``; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise UserError(f"'{key}' must be a mapping, got {type(value).__name__}", f"config key {key}",
                            "write it as a YAML mapping")
        return _build(tp, value, key + ".")
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise UserError(f"'{key}' must be a list, got {type(value).__name__}", f"config key {key}",
                            "write it as a YAML list")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise UserError(f"'{key}' needs {len(args)} items, got {len(value)}", f"config key {key}",
                            f"give exactly {len(args)} values")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if origin in (typing.Union, types.UnionType):
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads "3e-4" (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if tp in (int, float, str, bool) and (not isinstance(value, tp) or (tp is int and isinstance(value, bool))):
        raise UserError(f"'{key}' must be {tp.__name__}, got {type(value).__name__} {value!r}",
                        f"config key {key}", f"give a {tp.__name__}")
    return value


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if f"{prefix}{key}" in REMOVED:
            raise UserError(f"config key '{prefix}{key}' was removed: {REMOVED[prefix + key]}",
                            f"config key {prefix}{key}", "delete it from the config")
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"did you mean '{prefix}{close[0]}'?" if close else f"valid keys: {', '.join(names)}"
            raise UserError(f"unknown config key '{prefix}{key}'", f"config key {prefix}{key}", hint)
        kwargs[key] = _coerce(value, hints[key], prefix + key)
    return cls(**kwargs)


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise UserError(f"override '{item}' is not key=value", "command line", "write e.g. train.lr=3e-4")
    key, raw = item.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw)


def drop_removed(data: dict[str, Any]) -> dict[str, Any]:
    """A saved config dict without the keys in REMOVED (a run dir written before they went)."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for key in REMOVED:
        sec, name = key.split(".")
        if isinstance(out.get(sec), dict):
            out[sec].pop(name, None)
    return out


def from_dict(data: dict[str, Any]) -> Config:
    """A config from a saved dict (``to_dict`` of a run dir or a stage); keys since removed are dropped."""
    return _build(Config, drop_removed(data)).validate()


def field_docs(cls: type) -> dict[str, str]:
    """Each field's docstring (the string literal under it in the class body), from the source."""
    import ast
    import inspect
    import textwrap

    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:], strict=False):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def describe_keys() -> list[tuple[str, Any, str]]:
    """(dotted key, default, doc) for every key, in declaration order: ``apo-ray config --keys``."""
    default = Config().to_dict()
    out = []
    for sec in dataclasses.fields(Config):
        cls = sec.default_factory  # type: ignore[misc]
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            key = f"{sec.name}.{f.name}"
            doc = docs.get(f.name, "")
            if key in CHOICES and "``" not in doc:
                doc = (doc + " " if doc else "") + "One of: " + ", ".join(map(str, CHOICES[key])) + "."
            out.append((key, default[sec.name][f.name], doc))
    return out


RECIPES: dict[str, dict[str, dict[str, Any]]] = {
    # The base policy that meets the learnability bar (>= 80% Lift nominal from 200 oracle demos in <= 15 min of
    # training on 2 CPU cores): agentview + wrist camera, the near-idle hold steps dropped, BC at batch 64, the
    # proprio token, 22 epochs at lr 3e-4 (docs/experiments/base_policy.md).
    "base-policy": {
        "env": {"wrist": True},
        "data": {"batch_size": 64, "idle_threshold": 0.05},
        "model": {"use_proprio": True},
        "train": {"objective": "bc", "epochs": 22, "lr": 3e-4, "warmup_steps": 50, "torch_threads": 2,
                  "cpus_per_worker": 1.0},
    },
}
"""Named recipes (``--recipe``): config layers spanning the stages; each command takes the sections it reads."""


def recipe(name: str | None, sections: tuple[str, ...] | None = None) -> dict[str, dict[str, Any]]:
    """The recipe's config layer, cut to ``sections`` (None: all); ``{}`` for no recipe."""
    if name is None:
        return {}
    if name not in RECIPES:
        raise UserError(f"unknown recipe '{name}'", "--recipe", f"use one of {', '.join(RECIPES)}")
    return {k: dict(v) for k, v in RECIPES[name].items() if sections is None or k in sections}


def load(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), *,
         sections: tuple[str, ...] | None = None, command: str = "this command", recipe_name: str | None = None) -> Config:
    """Defaults <- recipe <- YAML file <- ``a.b=c`` overrides, validated. With ``sections`` (the ones a command
    reads), a key of any other section in the file or the overrides is refused rather than silently ignored (a
    recipe spans the stages: each command takes its sections of it)."""
    data: dict[str, Any] = recipe(recipe_name, sections)
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"config file not found: {p}", str(p), "pass an existing YAML file, e.g. configs/smoke.yaml")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{p}:{mark.line + 1}" if mark else str(p)
            raise UserError("config is not valid YAML", where, "fix the YAML syntax") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise UserError("config must be a YAML mapping at top level", str(p), "start the file with section keys")
        for k, v in loaded.items():
            data[k] = {**data[k], **v} if isinstance(v, dict) and isinstance(data.get(k), dict) else v
    for item in overrides:
        keys, value = _parse_override(item)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise UserError(f"override '{item}' descends into a non-mapping", "command line", "check the key path")
        node[keys[-1]] = value
    cfg = _build(Config, data).validate()
    if sections is not None:
        given = [(str(k), str(path)) for k in (loaded if path is not None else {})]
        given += [(item.split("=", 1)[0].strip().split(".")[0], "command line") for item in overrides]
        for sec, where in given:
            if sec not in sections:
                reads = " and ".join(sections)
                raise UserError(f"{command} does not read the config's {sec} section", where,
                                f"drop the {sec} keys; it reads only {reads} (apo-ray loop reads every section)")
    return cfg
