"""The lifelong-learning loop (apo_spec.md §3, the paper's Algorithm 1), as a journal of idempotent stages.

Round 0 (shared by every arm)::

    r0/demos/collect/<orig>      oracle expert demos in the original scenario
    r0/base/dataset              BC training set from the demos
    r0/base/train                π0, trained from scratch with objective ``loop.base_objective``
    r0/base/eval/<scenario>      held-out seeds, every disruption scenario + the original one

Round r ≥ 1, for each arm (= training objective: apo, kto, dagger, sirius, dpo)::

    r<r>/<arm>/collect/<sc>      deploy the arm's π(r-1) with the corrector, in each disruption scenario
    r<r>/<arm>/dataset           all the arm's interaction data of rounds 1..r + the expert demos,
                                 reference log-probs of π(r-1) precomputed
    r<r>/<arm>/train             warm start from π(r-1), reference = π(r-1)
    r<r>/<arm>/eval/<sc>         held-out seeds, disruption scenarios + the original scenario

With ``loop.share_round1`` the round-1 deployment and dataset are built once (``r1/shared/...``) from π0 and
used by every arm. Each stage owns the directory named by its key; :mod:`apo_ray.journal` makes each one
atomic, so a rerun (or ``--resume``) continues after the last completed stage, and a SIGKILL anywhere loses and
duplicates nothing. Seeds come from coordinates: demos ``collect.seed + i``, round-r deployment in scenario j
``collect.seed + 10000·r + 1000·j + i``, evaluation ``eval.seed + i`` (the same held-out list every round).
``report/report.html`` is rewritten after every round.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from apo_ray import fsio
from apo_ray.checkpoint import checkpoint_dir, token_layout
from apo_ray.config import Config
from apo_ray.errors import UserError
from apo_ray.journal import Journal, run_lock, run_stage, set_progress
from apo_ray.storage import RunStorage

ROUND_SEED_STRIDE = 10_000
SCENARIO_SEED_STRIDE = 1_000
BASE = "base"
SHARED = "shared"
DEMOS = "demos"
CONFIG_FILE = "config.json"
LOG_FILE = "loop.log"
RESUMABLE_CONFIG_KEYS = ("loop.rounds", "eval.videos", "collect.videos", "collect.workers", "eval.workers",
                         "collect.envs_per_worker", "eval.envs_per_worker", "inference.replicas", "inference.max_wait_ms",
                         "train.workers", "loop.storage", "train.report_to")
"""Keys that may change between a run and its resume: they do not change any completed stage's output."""
LEGACY_VALUES = {"corrector": {"off_target_steps": 0}, "collect": {"oracle_version": 1}}
"""What a key meant in a run saved before it existed, where that differs from today's default (the trigger was
not there, so it was off): resuming such a run with the new default is a config change, not a silent one."""


@dataclass(frozen=True)
class Stage:
    key: str
    kind: str
    round: int
    arm: str
    scenario: str = ""

    @property
    def label(self) -> str:
        return self.key


def original_scenario(cfg: Config) -> str:
    return cfg.env.scenario


def eval_scenarios(cfg: Config) -> list[str]:
    out = list(cfg.loop.scenarios)
    if original_scenario(cfg) not in out:
        out.append(original_scenario(cfg))
    return out


def deploy_arm(cfg: Config, rnd: int, arm: str) -> str:
    """Whose deployment data the arm uses in round ``rnd``."""
    return SHARED if (rnd == 1 and cfg.loop.share_round1) else arm


def train_key(rnd: int, arm: str) -> str:
    """The stage that trains π(rnd) of ``arm``: round 0 is the shared base policy."""
    return f"r{rnd}/{BASE if rnd == 0 else arm}/train"


def episode_keys(cfg: Config, rnd: int, src: str) -> list[str]:
    """The collect stages whose episodes an arm's (or the shared) round-``rnd`` dataset holds: rounds 1..rnd."""
    out = []
    for r in range(1, rnd + 1):
        who = deploy_arm(cfg, r, src) if src != SHARED else SHARED
        out += [f"r{r}/{who}/collect/{sc}" for sc in cfg.loop.scenarios]
    return out


def policy_arm(cfg: Config, st: Stage) -> str:
    """Whose π(r-1) a round-r collect or dataset stage deploys or scores (the shared round 1's is π0)."""
    return cfg.loop.arms[0] if st.arm == SHARED else st.arm


def stage_train_config(cfg: Config, st: Stage) -> Any:
    """The TrainConfig a train stage runs with: round 0 applies the ``loop.base_*`` overrides."""
    if st.round == 0:
        lp = cfg.loop
        return dataclasses.replace(cfg.train, objective=lp.base_objective,
                                   epochs=lp.base_epochs or cfg.train.epochs,
                                   max_steps=lp.base_max_steps or cfg.train.max_steps,
                                   lr=lp.base_lr or cfg.train.lr)
    return dataclasses.replace(cfg.train, objective=st.arm)


def stage_data_config(cfg: Config, st: Stage) -> Any:
    """The DataConfig a dataset stage builds with: round 0 applies the ``loop.base_*`` batch and filter; with
    ``data.epochs`` 0 it holds one fresh balanced schedule per epoch its training stage runs."""
    dc, lp = cfg.data, cfg.loop
    dc = dataclasses.replace(dc, epochs=dc.epochs or max(1, stage_train_config(cfg, st).epochs))
    if st.round > 0:
        return dc
    return dataclasses.replace(dc, batch_size=lp.base_batch_size or dc.batch_size,
                               idle_threshold=dc.idle_threshold if lp.base_idle_threshold < 0
                               else lp.base_idle_threshold)


def plan(cfg: Config) -> list[Stage]:
    """Every stage of the run, in execution order."""
    orig = original_scenario(cfg)
    stages = [Stage(f"r0/{DEMOS}/collect/{orig}", "collect", 0, DEMOS, orig),
              Stage(f"r0/{BASE}/dataset", "dataset", 0, BASE),
              Stage(f"r0/{BASE}/train", "train", 0, BASE)]
    if cfg.loop.base_policy:  # pi0 is given: its train stage imports it, and no BC set is built
        del stages[1]
    stages += [Stage(f"r0/{BASE}/eval/{sc}", "eval", 0, BASE, sc) for sc in eval_scenarios(cfg)]
    for rnd in range(1, cfg.loop.rounds + 1):
        for arm in cfg.loop.arms:
            src = deploy_arm(cfg, rnd, arm)
            for sc in cfg.loop.scenarios:
                st = Stage(f"r{rnd}/{src}/collect/{sc}", "collect", rnd, src, sc)
                if st not in stages:
                    stages.append(st)
            ds = Stage(f"r{rnd}/{src}/dataset", "dataset", rnd, src)
            if ds not in stages:
                stages.append(ds)
            stages.append(Stage(f"r{rnd}/{arm}/train", "train", rnd, arm))
            stages += [Stage(f"r{rnd}/{arm}/eval/{sc}", "eval", rnd, arm, sc) for sc in eval_scenarios(cfg)]
    return stages


def stage_deps(cfg: Config, st: Stage) -> list[str]:
    """The stages whose outputs ``st`` reads (the same keys its body reads through :meth:`Loop.dir`)."""
    orig = original_scenario(cfg)
    if st.kind == "collect":
        return [] if st.round == 0 else [train_key(st.round - 1, policy_arm(cfg, st))]
    if st.kind == "dataset":
        if st.round == 0:
            return [f"r0/{DEMOS}/collect/{orig}"]
        return [f"r0/{DEMOS}/collect/{orig}", train_key(st.round - 1, policy_arm(cfg, st)),
                *episode_keys(cfg, st.round, st.arm)]
    if st.kind == "train":
        if st.round == 0:
            return [] if cfg.loop.base_policy else [f"r0/{BASE}/dataset"]
        return [train_key(st.round - 1, st.arm), f"r{st.round}/{deploy_arm(cfg, st.round, st.arm)}/dataset"]
    return [train_key(st.round, st.arm)]


NO_OUTPUT_EFFECT = (*RESUMABLE_CONFIG_KEYS, "train.log_every", "train.mlflow_uri", "train.max_failures",
                    "train.cpus_per_worker", "train.pass_cache_mb")
"""Keys that change how a stage runs or what it logs, never the data or weights it writes."""


def stage_inputs(cfg: Config, st: Stage) -> dict[str, Any]:
    """Everything of the config that can change ``st``'s output, plus the stages it reads. Two configs that
    give a stage equal inputs (with equal inputs upstream) give it the same output: a fork may reuse it.
    Deliberately coarse (whole config sections), so an unlisted dependency errs towards rerunning."""
    from apo_ray.loss import NEEDS_REFERENCE, OBJECTIVE_PARAMS, LossParams

    d = cfg.to_dict()

    def section(name: str, values: dict[str, Any] | None = None) -> dict[str, Any]:
        return {k: v for k, v in (values if values is not None else d[name]).items()
                if f"{name}.{k}" not in NO_OUTPUT_EFFECT}

    lp = cfg.loop
    out: dict[str, Any] = {"kind": st.kind, "deps": stage_deps(cfg, st)}
    if st.kind in ("collect", "eval"):
        out["env"] = section("env")
        out["oracle_version"] = cfg.collect.oracle_version  # eval episodes carry its oracle_action labels
        out["inference"] = section("inference")  # the decode's fixed shape and device are the policy's numerics
    if st.kind == "collect":
        out["collect"] = section("collect")
        if st.round == 0:
            out["loop"] = {"demos": lp.demos, "demo_policy": lp.demo_policy}
        else:  # the seed list depends on the scenario's position in loop.scenarios
            out["corrector"] = section("corrector")
            out["loop"] = {"rollouts_per_round": lp.rollouts_per_round,
                           "scenario_index": lp.scenarios.index(st.scenario)}
    elif st.kind == "dataset":
        out["data"] = section("data", dataclasses.asdict(stage_data_config(cfg, st)))
        out["model"] = section("model")
    elif st.kind == "train" and st.round == 0 and lp.base_policy:
        out["base_policy"] = base_policy_digest(lp.base_policy)  # its content, not its path, is pi0
    elif st.kind == "train":
        tc = dataclasses.asdict(stage_train_config(cfg, st))
        unread = set(LossParams.__dataclass_fields__) - set(OBJECTIVE_PARAMS[tc["objective"]])
        if tc["objective"] not in NEEDS_REFERENCE:
            unread |= {"reference", "kl_allreduce"}
        out["train"] = {k: v for k, v in section("train", tc).items() if k not in unread}
        out["model"] = section("model")
    else:
        out["eval"] = section("eval")
    return json.loads(json.dumps(out))  # tuples and lists compare equal after a JSON round trip


def base_policy_files(path: str) -> list[Path]:
    """The files of a given pi0 that loading reads (a shipped dir's README is not pi0)."""
    d = checkpoint_dir(path)
    return sorted(p for p in d.rglob("*") if p.is_file() and p.suffix != ".md")


def base_policy_digest(path: str) -> str:
    """sha256 over a given pi0's files (names and contents): the identity that fork and resume compare."""
    import hashlib

    d = checkpoint_dir(path)
    h = hashlib.sha256()
    for p in base_policy_files(path):
        h.update(f"{p.relative_to(d)}\0{fsio.sha256_file(p)}\0".encode())
    return h.hexdigest()


def check_base_policy(cfg: Config) -> None:
    """loop.base_policy must be a checkpoint that fits the run: its camera views and model as configured, since
    later rounds collect with env.wrist and warm-start with cfg.model from it."""
    from apo_ray.checkpoint import read_meta

    where, path = "config loop.base_policy", cfg.loop.base_policy
    if not Path(path).is_dir():
        raise UserError(f"loop.base_policy '{path}' is not a directory", where,
                        "pass a checkpoint dir written by apo-ray train (or a shipped one, e.g. assets/pi0_lift), "
                        "relative to the working directory")
    try:
        meta = read_meta(path)
    except UserError as e:
        raise UserError(f"loop.base_policy is {e.what}" if e.what.startswith("not a") else
                        f"loop.base_policy: {e.what}", where, e.fix) from None
    d = checkpoint_dir(path)
    if meta.get("kind", "tiny") == "tiny" and not (d / "model.safetensors").is_file():
        raise UserError("loop.base_policy is not a checkpoint: model.safetensors missing", where,
                        "copy the checkpoint's model.safetensors beside its apo_vla.json")
    views = int(meta.get("image_views", 1))
    if views != (2 if cfg.env.wrist else 1):
        raise UserError(f"loop.base_policy takes {views} camera view(s) but env.wrist is {cfg.env.wrist}", where,
                        f"set env.wrist: {str(views > 1).lower()}")
    from apo_ray.trainer import ARCH_FIELDS

    built, want = meta.get("model") or {}, dataclasses.asdict(cfg.model)
    for k in ARCH_FIELDS if built.get("kind", "tiny") == "tiny" else ("kind",):
        if k in built and built[k] != want[k]:
            raise UserError(f"loop.base_policy was built with model.{k}={built[k]}, the config has {want[k]}", where,
                            f"set model.{k}: {json.dumps(built[k])} (later rounds warm-start from it)")


def check_config(cfg: Config) -> None:
    """Loop-level consistency the config tree cannot check field by field."""
    lp = cfg.loop
    import envs

    if lp.rounds < 0:
        raise UserError(f"loop.rounds must be >= 0, got {lp.rounds}", "config loop.rounds", "use 0..10")
    if lp.demos < 1 or lp.demos > ROUND_SEED_STRIDE:
        raise UserError(f"loop.demos must be in 1..{ROUND_SEED_STRIDE}, got {lp.demos}", "config loop.demos",
                        "collect at least one expert demo")
    if not 1 <= lp.rollouts_per_round <= SCENARIO_SEED_STRIDE:
        raise UserError(f"loop.rollouts_per_round must be in 1..{SCENARIO_SEED_STRIDE}, got "
                        f"{lp.rollouts_per_round}", "config loop.rollouts_per_round", "the paper uses 20")
    if not lp.arms and lp.rounds > 0:
        raise UserError("loop.arms is empty", "config loop.arms", "list objectives, e.g. [apo, dagger]")
    from apo_ray.loss import OBJECTIVES

    for arm in lp.arms:
        if arm not in OBJECTIVES or arm == "bc":
            raise UserError(f"unknown arm '{arm}'", "config loop.arms",
                            f"use objectives among {', '.join(o for o in OBJECTIVES if o != 'bc')}")
    if len(set(lp.arms)) != len(lp.arms) or {BASE, SHARED, DEMOS} & set(lp.arms):
        raise UserError(f"loop.arms must be distinct objectives, got {list(lp.arms)}", "config loop.arms",
                        "list each objective once")
    if lp.base_objective not in OBJECTIVES:
        raise UserError(f"unknown loop.base_objective '{lp.base_objective}'", "config loop.base_objective",
                        "use bc")
    if lp.demo_policy != "oracle":
        if not lp.demo_policy.startswith("dart-oracle:"):
            raise UserError(f"loop.demo_policy '{lp.demo_policy}' is not an expert", "config loop.demo_policy",
                            "use oracle, or dart-oracle:<sigma> with data.demo_label: oracle")
        from apo_ray.policies import check_policy_spec

        check_policy_spec(lp.demo_policy)
        if cfg.data.demo_label != "oracle":
            raise UserError("loop.demo_policy perturbs the demos but data.demo_label is 'action': pi0 would "
                            "imitate the noise", "config data.demo_label", "set data.demo_label: oracle")
    if not lp.scenarios and lp.rounds > 0:
        raise UserError("loop.scenarios is empty", "config loop.scenarios", "name a disruption, e.g. [position]")
    for sc in (*lp.scenarios, cfg.env.scenario):
        envs.parse_scenario(sc)
    if lp.base_policy:
        check_base_policy(cfg)
    if cfg.env.task not in envs.TASKS:
        import difflib

        close = difflib.get_close_matches(cfg.env.task, list(envs.TASKS), n=1)
        raise UserError(f"unknown task '{cfg.env.task}'", "config env.task",
                        f"did you mean '{close[0]}'?" if close else f"use one of {', '.join(envs.TASKS)}")
    top = cfg.collect.seed + ROUND_SEED_STRIDE * (lp.rounds + 1)
    if cfg.collect.seed <= cfg.eval.seed < top or cfg.eval.seed <= cfg.collect.seed < cfg.eval.seed + cfg.eval.episodes:
        raise UserError(f"evaluation seeds {cfg.eval.seed}.. overlap collection seeds {cfg.collect.seed}..{top}",
                        "config eval.seed", f"use eval.seed >= {top}")


# ------------------------------------------------------------------------------------------- progress


class _Ticker:
    """A live one-line progress display for stages that print none of their own (dataset, train)."""

    def __init__(self, label: str, probe: Callable[[], str] | None, enabled: bool) -> None:
        self.label, self.probe = label, probe
        self.enabled = enabled and sys.stderr.isatty()
        self.t0 = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True) if self.enabled else None

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            extra = ""
            if self.probe is not None:
                try:
                    extra = self.probe()
                except Exception:  # noqa: BLE001 - a display must never break a stage
                    extra = ""
            sys.stderr.write(f"\r[{self.label}] {time.monotonic() - self.t0:6.0f} s {extra}\033[K")
            sys.stderr.flush()

    def __enter__(self) -> _Ticker:
        if self._thread is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


def _summary_line(stage: Stage, result: dict[str, Any]) -> str:
    if stage.kind == "eval":
        lo, hi = result.get("ci95", (0, 0))
        return (f"success {100 * result['success_rate']:.0f}% [{100 * lo:.0f}–{100 * hi:.0f}] "
                f"over {result['episodes']} episodes")
    if stage.kind == "collect":
        return (f"{result['episodes']} episodes, {result['steps']} steps, "
                f"{result.get('intervention_episodes', 0)} with interventions "
                f"({result.get('intervention_steps', 0)} corrector steps)")
    if stage.kind == "dataset":
        per = result.get("counts", {}).get("per_class", {})
        return f"{result['rows']} steps (c=0/1/2: {per.get('0')}/{per.get('1')}/{per.get('2')})"
    shown = {k: result[k] for k in ("steps", "loss") if k in result}
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items())


class RunLog:
    """The loop's progress lines: echoed (stdout by default) and appended to ``RUN_DIR/loop.log`` with a UTC
    timestamp. Appended line by line, not rewritten atomically: a kill loses at most the line being written, and a
    resumed run continues the same file."""

    def __init__(self, path: Path, echo: Callable[[str], None] = print) -> None:
        self.path, self.echo = path, echo

    def __call__(self, line: str) -> None:
        self.echo(line)
        self.write(line)

    def write(self, line: str) -> None:
        """To the file only."""
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(f"{stamp} {line}\n")


# ------------------------------------------------------------------------------------------- the loop


@dataclass
class Loop:
    cfg: Config
    storage: RunStorage
    address: str | None = None
    progress: bool = True
    log: Callable[[str], None] = print
    trackers: Any = None
    """apo_ray.tracking.Trackers of ``train.report_to``, or None."""

    @property
    def run_dir(self) -> Path:
        return self.storage.local

    def dir(self, key: str) -> Path:
        return self.run_dir / key

    def checkpoint(self, rnd: int, arm: str) -> str:
        """π(rnd) of ``arm``: round 0 is the shared base policy."""
        return str(self.dir(train_key(rnd, arm)) / "checkpoint")

    # ---- stage bodies: each writes only into ``work`` and returns a JSON-able summary

    def _collect(self, st: Stage, work: Path) -> dict[str, Any]:
        from apo_ray.rollout import RolloutSpec, RunOptions, collect

        c, e = self.cfg.collect, self.cfg.env
        if st.round == 0:
            policy, corrector, seed, n, videos = self.cfg.loop.demo_policy, None, c.seed, self.cfg.loop.demos, 0
        else:
            j = self.cfg.loop.scenarios.index(st.scenario)
            policy = self.checkpoint(st.round - 1, policy_arm(self.cfg, st))
            corrector = self.cfg.corrector
            seed = c.seed + ROUND_SEED_STRIDE * st.round + SCENARIO_SEED_STRIDE * j
            n, videos = self.cfg.loop.rollouts_per_round, c.videos
        spec = RolloutSpec(e.task, st.scenario, policy, str(work), round_=st.round, corrector=corrector,
                           image_size=e.image_size, horizon=e.horizon, wrist=e.wrist, oracle_version=c.oracle_version)
        run = RunOptions(workers=c.workers, envs_per_worker=c.envs_per_worker, gpus=c.gpus_per_worker,
                         inference=self.cfg.inference, address=self.address, videos=videos, progress=self.progress,
                         label=st.key)
        return collect(spec, range(seed, seed + n), run, resume=True)

    def _dataset(self, st: Stage, work: Path) -> dict[str, Any]:
        from apo_ray.data import build_dataset

        demos = [str(self.dir(f"r0/{DEMOS}/collect/{original_scenario(self.cfg)}") / "episodes")]
        ref = None if st.round == 0 else self.checkpoint(st.round - 1, policy_arm(self.cfg, st))
        # all interaction data the arm has gathered so far: data accumulates across rounds
        episode_dirs = [str(self.dir(k) / "episodes") for k in episode_keys(self.cfg, st.round, st.arm)]
        dc = stage_data_config(self.cfg, st)
        with _Ticker(st.key, None, self.progress):
            summary = build_dataset(episode_dirs, demos, work, dc, ref_checkpoint=ref,
                                    **token_layout(self.cfg.model, ref), address=self.address)
        manifest = json.loads((work / "manifest.json").read_text())
        return {**summary, "counts": manifest["counts"]}

    def _import_base(self, work: Path) -> dict[str, Any]:
        """Round 0 with loop.base_policy: copy the given pi0 in, so the run dir holds every policy it used."""
        import shutil

        src, dst = checkpoint_dir(self.cfg.loop.base_policy), work / "checkpoint"
        if dst.exists():  # a copy killed half-way
            shutil.rmtree(dst)
        for p in base_policy_files(self.cfg.loop.base_policy):
            (dst / p.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(p, dst / p.relative_to(src))
        return {"steps": 0, "base_policy": self.cfg.loop.base_policy,
                "base_policy_sha256": base_policy_digest(self.cfg.loop.base_policy)}

    def _train(self, st: Stage, work: Path) -> dict[str, Any]:
        from apo_ray.trainer import train

        if st.round == 0 and self.cfg.loop.base_policy:
            return self._import_base(work)
        if st.round == 0:
            init = "scratch"
            data = self.dir(f"r0/{BASE}/dataset")
        else:
            init = self.checkpoint(st.round - 1, st.arm)
            data = self.dir(f"r{st.round}/{deploy_arm(self.cfg, st.round, st.arm)}/dataset")
        cfg = dataclasses.replace(self.cfg, train=stage_train_config(self.cfg, st))
        with _Ticker(st.key, None, self.progress):
            return train(str(data), init, str(work), cfg, address=self.address)

    def _eval(self, st: Stage, work: Path) -> dict[str, Any]:
        from apo_ray.evaluate import eval_seeds, evaluate
        from apo_ray.rollout import RolloutSpec, RunOptions

        ev, e = self.cfg.eval, self.cfg.env
        spec = RolloutSpec(e.task, st.scenario, self.checkpoint(st.round, st.arm), str(work), round_=st.round,
                           image_size=e.image_size, horizon=e.horizon, wrist=e.wrist,
                           oracle_version=self.cfg.collect.oracle_version)
        run = RunOptions(workers=ev.workers, envs_per_worker=ev.envs_per_worker, gpus=ev.gpus_per_worker,
                         inference=self.cfg.inference, address=self.address, videos=ev.videos, progress=self.progress)
        return evaluate(spec, eval_seeds(ev.seed, ev.episodes), run, resume=True)

    # ---- driver

    def run_stage(self, journal: Journal, st: Stage) -> dict[str, Any]:
        if journal.done(st.key):
            return journal.result(st.key)
        body = {"collect": self._collect, "dataset": self._dataset, "train": self._train, "eval": self._eval}[st.kind]
        set_progress(self.run_dir, st.key, round=st.round, arm=st.arm, kind=st.kind)
        if self.progress:
            self.log(f"[{st.key}] started")
        t0 = time.monotonic()
        # collection and evaluation keep the episodes finished before a kill (each episode file is atomic and
        # seeded by its coordinates); training continues from its last Ray Train checkpoint in the work dir
        # (same config, init and dataset, or it starts over); a dataset build restarts clean
        result = run_stage(journal, st.key, lambda work: body(st, work),
                           resumable=st.kind in ("collect", "eval", "train"),
                           on_done=self._push)
        self.log(f"[{st.key}] done in {time.monotonic() - t0:.1f} s: {_summary_line(st, result)}")
        return result

    def _push(self, key: str) -> None:
        if self.storage.remote:
            self.storage.push(key)
            self.storage.push("journal.json")
            if (self.run_dir / LOG_FILE).exists():
                self.storage.push(LOG_FILE)

    def write_report(self) -> Path:
        from apo_ray.report import write_report

        set_progress(self.run_dir, "report", kind="report")
        path = write_report(self.run_dir)
        if self.storage.remote:
            self.storage.push("report")
        if self.trackers is not None:  # train.report_to: the round's success and interventions
            self.trackers.log_rounds()
        return path

    def run(self) -> dict[str, Any]:
        stages = plan(self.cfg)
        journal = Journal(self.run_dir)
        if self.storage.remote:  # stages finished locally but killed before their upload
            for key in journal.order:
                if not self.storage.remote_exists(f"{key}/_stage.json"):
                    self.storage.push(key)
            self.storage.push("journal.json")
        done_before = sum(journal.done(s.key) for s in stages)
        base_key = train_key(0, BASE)
        if self.cfg.loop.base_policy and journal.done(base_key):
            had = journal.result(base_key).get("base_policy_sha256")
            if had != base_policy_digest(self.cfg.loop.base_policy):
                raise UserError("loop.base_policy's files changed since this run imported them", "config loop.base_policy",
                                "restore that checkpoint, or start a new --run-dir (apo-ray fork keeps what still fits)")
        if done_before:
            self.log(f"resuming {self.storage.location}: {done_before}/{len(stages)} stages already complete")
        from apo_ray.ray_utils import ray_session, under_autoscaler
        from apo_ray.rollout import keep_actors, release_actors

        if self.progress:  # Ray Data's per-dataset INFO lines would bury the stage lines
            import logging

            logging.getLogger("ray.data").setLevel(logging.WARNING)
        t0 = time.monotonic()
        with ray_session(self.address), keep_actors():
            # idle actors on CPUs would starve a dataset build or a training; under an autoscaler any idle actor
            # keeps its rollout node up through a training that may take hours
            cpu_only = not under_autoscaler()
            rnd = 0
            for st in stages:
                if st.round != rnd:
                    self.write_report()
                    rnd = st.round
                if st.kind not in ("collect", "eval") and not journal.done(st.key):
                    release_actors(cpu_only=cpu_only)
                self.run_stage(journal, st)
        report = self.write_report()
        set_progress(self.run_dir, None, finished=True)
        evals = {s.key: journal.result(s.key) for s in stages if s.kind == "eval"}
        return {"run_dir": str(self.run_dir), "storage": self.storage.location, "stages": len(stages),
                "ran": len(stages) - done_before, "seconds": round(time.monotonic() - t0, 1),
                "report": str(report), "eval": {k: v["success_rate"] for k, v in evals.items()}}


def _diff(a: Any, b: Any, prefix: str = "") -> Iterator[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            yield from _diff(a.get(k), b.get(k), f"{prefix}{k}.")
    elif a != b:
        yield prefix.rstrip(".")


def _with_defaults(saved: Any, defaults: Any) -> Any:
    if isinstance(saved, dict) and isinstance(defaults, dict):
        return {**defaults, **{k: _with_defaults(v, defaults.get(k)) for k, v in saved.items()}}
    return saved


def saved_config_dict(run_dir: Path) -> dict[str, Any]:
    """The config a run dir was started with. A run saved before a config key existed ran with that key's
    default (or its LEGACY_VALUES entry)."""
    from apo_ray.config import drop_removed

    return _with_defaults(drop_removed(json.loads((run_dir / CONFIG_FILE).read_text())),
                          _with_defaults(LEGACY_VALUES, Config().to_dict()))


def prepare_run_dir(cfg: Config, storage: RunStorage, resume: bool) -> Config:
    """Check the run dir against the config; save the config on a new run. Returns the config to run."""
    run_dir = storage.local
    if storage.remote and not (run_dir / "journal.json").exists() and storage.remote_exists("journal.json"):
        storage.pull()
    saved_path = run_dir / CONFIG_FILE
    has_journal = (run_dir / "journal.json").exists()
    if saved_path.exists():
        saved = saved_config_dict(run_dir)
        diffs = [k for k in _diff(saved, cfg.to_dict()) if k not in RESUMABLE_CONFIG_KEYS]
        old_arms, new_arms = saved.get("loop", {}).get("arms", []), list(cfg.loop.arms)
        if "loop.arms" in diffs and set(old_arms) <= set(new_arms):
            # arms only added: each arm's stages are its own and round 1's shared data comes from pi0
            diffs.remove("loop.arms")
        if diffs:
            raise UserError(f"the run dir was started with a different config: '{diffs[0]}' differs "
                            f"({_get(saved, diffs[0])!r} there, {_get(cfg.to_dict(), diffs[0])!r} now)",
                            str(run_dir), "pass the same config (and overrides) to resume, or use a new --run-dir")
    elif has_journal:
        raise UserError(f"{CONFIG_FILE} is missing beside the journal", str(run_dir),
                        "restore it, or start over in a new run dir")
    elif resume:
        raise UserError("nothing to resume: the run dir holds no run", str(run_dir),
                        "drop --resume to start a new run")
    elif any(p.name not in (".lock",) for p in run_dir.iterdir()):
        raise UserError("the run dir is not empty and holds no apo_ray run", str(run_dir),
                        "pass a new or empty --run-dir")
    fsio.write_json(saved_path, cfg.to_dict())
    if storage.remote:
        storage.push(CONFIG_FILE)
    return cfg


def _get(d: dict[str, Any], dotted: str) -> Any:
    for k in dotted.split("."):
        d = d.get(k) if isinstance(d, dict) else None
    return d


def run_loop(cfg: Config, run_dir: str | os.PathLike[str] | None = None, *, resume: bool = False,
             address: str | None = None, progress: bool = True, log: Callable[[str], None] = print
             ) -> dict[str, Any]:
    """Run (or continue) the lifelong loop in ``run_dir`` (a local path or a URI; default ``loop.storage``)."""
    check_config(cfg)
    from apo_ray.tracking import Trackers, check_backends

    check_backends(cfg)
    location = str(run_dir) if run_dir else cfg.loop.storage
    storage = RunStorage(location)
    fsio.refuse_source_tree(storage.local, "--run-dir")
    with run_lock(storage.local):
        cfg = prepare_run_dir(cfg, storage, resume)
        runlog = RunLog(storage.local / LOG_FILE, log)
        runlog.write(f"apo-ray loop (pid {os.getpid()}) in {storage.location}: task {cfg.env.task}, arms "
                     f"{', '.join(cfg.loop.arms)}, {cfg.loop.rounds} rounds")
        trackers = Trackers(cfg, storage.local) if cfg.train.report_to else None
        try:
            result = Loop(cfg, storage, address=address, progress=progress, log=runlog, trackers=trackers).run()
        except BaseException as e:  # the file says where and why it stopped; the CLI prints the error itself
            with contextlib.suppress(OSError, ValueError):  # a full disk must not hide the error itself
                prog = storage.local / "progress.json"
                stage = json.loads(prog.read_text()).get("stage") if prog.exists() else None
                first = (str(e).strip().splitlines() or [""])[0]
                runlog.write(f"stopped{f' in {stage}' if stage else ''}: {type(e).__name__}: {first}")
            raise
        finally:
            if trackers is not None:
                trackers.close()
        runlog.write(f"finished: {result['ran']} stages run, {result['seconds']} s; report {result['report']}")
        return result

