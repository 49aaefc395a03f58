"""Fork a lifelong run: a new run dir that starts from another run's completed stages.

A variant of an experiment (another objective setting, more epochs per round, an added scenario) usually shares
round 0 and the shared round-1 data with the run it varies. ``fork_run`` keeps exactly the source's completed
stages that the new config would have produced identically: a stage is kept when its config inputs
(:func:`apo_ray.loop.stage_inputs`) are equal under both configs and every stage it reads is kept too. Kept
stage dirs are hard-linked (copied across filesystems): a completed stage dir is never written again, so
sharing its files is safe. The new dir gets its own ``config.json`` and a journal of the kept stages, and
``apo-ray loop`` with the same config and overrides runs the rest.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Any

from apo_ray import config as config_mod
from apo_ray import fsio
from apo_ray.config import Config
from apo_ray.errors import UserError
from apo_ray.journal import JOURNAL, Journal
from apo_ray.loop import (
    BASE,
    CONFIG_FILE,
    base_policy_digest,
    check_config,
    plan,
    saved_config_dict,
    stage_deps,
    stage_inputs,
    train_key,
)
from apo_ray.storage import is_uri

FORK_FILE = "fork.json"


def saved_config(run_dir: Path) -> Config:
    """The config a run dir was started with (keys added since then take their default or legacy value)."""
    path = run_dir / CONFIG_FILE
    if not path.is_file() or not (run_dir / JOURNAL).is_file():
        raise UserError("no apo_ray run there (config.json or journal.json missing)", str(run_dir),
                        "pass the --run-dir of an existing apo-ray loop as --from")
    try:
        return config_mod.from_dict(saved_config_dict(run_dir))
    except UserError as e:  # a key this version no longer has: the run was made by an older apo_ray
        raise UserError(f"its config.json does not load: {e.what} ({e.where})", str(path),
                        "fork it with the apo_ray version that made it, or start a new run") from None


def reusable_stages(src_cfg: Config, cfg: Config, done: set[str]) -> list[str]:
    """The stage keys of ``cfg``'s plan that a fork may take from a run of ``src_cfg`` that completed ``done``."""
    src_plan = {st.key: st for st in plan(src_cfg)}
    kept: list[str] = []
    for st in plan(cfg):
        src = src_plan.get(st.key)
        if (src is not None and st.key in done and all(k in kept for k in stage_deps(cfg, st))
                and stage_inputs(src_cfg, src) == stage_inputs(cfg, st)):
            kept.append(st.key)
    return kept


def _link_tree(src: Path, dst: Path) -> None:
    def link(s: str, d: str) -> None:
        try:
            os.link(s, d)
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                raise
            shutil.copy2(s, d)

    shutil.copytree(src, dst, copy_function=link, symlinks=True)


def fork_run(src_dir: str | os.PathLike[str], cfg: Config, run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Create ``run_dir`` from ``src_dir``'s reusable completed stages; the new run's config is ``cfg``."""
    for where, loc in (("--from", src_dir), ("--run-dir", run_dir)):
        if is_uri(str(loc)):
            raise UserError(f"fork works on local run dirs, not {loc}", where,
                            "fork into a local dir, then run the loop with loop.storage set to the URI")
    check_config(cfg)
    src, dst = Path(src_dir), Path(run_dir)
    fsio.refuse_source_tree(dst, "--run-dir")
    src_cfg = saved_config(src)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise UserError("the fork's run dir exists and is not empty", str(dst), "pass a new --run-dir")
    if dst.resolve() == src.resolve():
        raise UserError("--run-dir is the run being forked", str(dst), "pass a new --run-dir")
    journal = Journal(src)
    done = set(journal.order)
    base = train_key(0, BASE)
    if (cfg.loop.base_policy and base in done
            and journal.result(base).get("base_policy_sha256") != base_policy_digest(cfg.loop.base_policy)):
        done.discard(base)  # the source imported other files than those at that path now: another pi0
    kept = reusable_stages(src_cfg, cfg, done)
    # build beside the target and rename it into place: a killed fork leaves no half-made run dir
    tmp = dst.parent / f"{fsio.TMP_PREFIX}fork-{dst.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for key in kept:
        _link_tree(src / key, tmp / key)
    fsio.write_json(tmp / CONFIG_FILE, cfg.to_dict())
    fsio.write_json(tmp / FORK_FILE, {"from": str(src.resolve()), "stages": kept})
    Journal(tmp).adopt(journal, kept)
    if dst.exists():
        dst.rmdir()
    os.replace(tmp, dst)
    total = len(plan(cfg))
    return {"run_dir": str(dst), "from": str(src), "kept": kept, "to_run": total - len(kept), "stages": total}
