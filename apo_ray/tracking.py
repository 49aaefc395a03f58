"""Experiment trackers for a lifelong run (``train.report_to``): TensorBoard, MLflow, Weights & Biases.

Each gets the resolved config as parameters once, then after every round the round's evaluation success
(``success/<arm>/<scenario>``) and its deployment's interventions (``intervention_episode_rate/<arm>/<scenario>``,
``intervention_step_rate/...``), with the round as the step. The numbers are the report's (read back from the run
dir), so a tracker shows what report.html shows. MLflow and W&B come through Ray's integrations
(``ray.air.integrations.mlflow.setup_mlflow``, ``ray.air.integrations.wandb.setup_wandb``) and are optional extras
(``pip install 'apo_ray[mlflow]'`` / ``'apo_ray[wandb]'``); TensorBoard is a core dependency (the trainer writes
its per-step curves with it) and writes ``RUN_DIR/tb/``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from apo_ray.config import Config
from apo_ray.errors import UserError

BACKENDS = ("tensorboard", "mlflow", "wandb")
EXTRAS = {"mlflow": "mlflow", "wandb": "wandb"}
"""Backend -> the module it needs (installed by the extra of the same name)."""


def flat_params(cfg: Config) -> dict[str, Any]:
    """``section.key`` -> value, lists as strings: what trackers take as run parameters."""
    return {f"{sec}.{k}": (str(list(v)) if isinstance(v, list | tuple) else v)
            for sec, keys in cfg.to_dict().items() for k, v in keys.items()}


def check_backends(cfg: Config) -> None:
    """Before any work: every backend named is known and importable."""
    for name in cfg.train.report_to:
        mod = EXTRAS.get(name)
        if mod and importlib.util.find_spec(mod) is None:
            raise UserError(f"train.report_to names {name}, but {mod} is not installed", "config train.report_to",
                            f"pip install 'apo_ray[{name}]', or drop {name}")


def round_metrics(run_dir: Path) -> dict[int, dict[str, float]]:
    """Round -> the metrics trackers log for it, from the run dir's journal (as the report reads it)."""
    from apo_ray.report import intervention_rows, load_run, success_rows

    run = load_run(run_dir)
    out: dict[int, dict[str, float]] = {}
    for r in success_rows(run):
        out.setdefault(r["round"], {})[f"success/{r['arm']}/{r['scenario']}"] = r["success_rate"]
    for r in intervention_rows(run):
        m = out.setdefault(r["round"], {})
        for name in ("episode_rate", "step_rate"):
            if r[name] == r[name]:  # not NaN (a stage with no steps)
                m[f"intervention_{name}/{r['arm']}/{r['scenario']}"] = r[name]
    return out


class Trackers:
    """The backends of ``train.report_to`` for one loop process; ``log_rounds`` logs each finished round once."""

    def __init__(self, cfg: Config, run_dir: Path) -> None:
        check_backends(cfg)
        self.run_dir, self.names = run_dir, tuple(cfg.train.report_to)
        self.logged: dict[int, dict[str, float]] = {}
        self._tb = self._mlflow = self._wandb = None
        params = flat_params(cfg)
        if "tensorboard" in self.names:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tb"))
            self._tb.add_text("config", "\n".join(f"    {k}: {v}" for k, v in params.items()), 0)
        if "mlflow" in self.names:
            from ray.air.integrations.mlflow import setup_mlflow

            self._mlflow = setup_mlflow(params, tracking_uri=cfg.train.mlflow_uri or (run_dir / "mlruns").as_uri(),
                                        experiment_name="apo_ray", run_name=run_dir.name,
                                        create_experiment_if_not_exists=True)
        if "wandb" in self.names:
            from ray.air.integrations.wandb import setup_wandb

            self._wandb = setup_wandb(params, project="apo_ray", name=run_dir.name, dir=str(run_dir))

    def log_rounds(self) -> dict[int, dict[str, float]]:
        """Log every metric not logged yet (a resumed process starts afresh and logs the finished rounds again,
        at the same steps). Returns what it logged."""
        new: dict[int, dict[str, float]] = {}
        for rnd, metrics in sorted(round_metrics(self.run_dir).items()):
            fresh = {k: v for k, v in metrics.items() if self.logged.get(rnd, {}).get(k) != v}
            if not fresh:
                continue
            new[rnd] = fresh
            self.logged.setdefault(rnd, {}).update(fresh)
            if self._tb is not None:
                for k, v in fresh.items():
                    self._tb.add_scalar(k, v, rnd)
                self._tb.flush()
            if self._mlflow is not None:
                self._mlflow.log_metrics(fresh, step=rnd)
            if self._wandb is not None:
                self._wandb.log({**fresh, "round": rnd})
        return new

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._mlflow is not None:
            self._mlflow.end_run()
        if self._wandb is not None:
            self._wandb.finish()
