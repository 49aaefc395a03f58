"""train.report_to: the loop's trackers get the config once and each round's success and interventions, read back
from the run dir. TensorBoard (a core dependency) is exercised for real; MLflow where it is installed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from apo_ray import config as C
from apo_ray.errors import UserError
from apo_ray.journal import Journal
from apo_ray.tracking import Trackers, check_backends, round_metrics

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"


def _run(root: Path, rounds: int) -> None:
    """A journal with round 0's evals and, per later round, apo's deployment and evals."""
    root.mkdir(exist_ok=True)
    (root / "config.json").write_text(json.dumps(C.load(SMOKE).to_dict()))
    j = Journal(root)

    def rec(key: str, result: dict) -> None:
        (root / key).mkdir(parents=True, exist_ok=True)
        j.record(key, result, 1.0)

    for sc, k in (("position", 3), ("nominal", 9)):
        rec(f"r0/base/eval/{sc}", {"success_rate": k / 10, "episodes": 10, "successes": k})
    for r in range(1, rounds + 1):
        rec(f"r{r}/apo/collect/position", {"episodes": 4, "steps": 200, "intervention_episodes": 5 - r,
                                           "intervention_steps": 60 // r})
        for sc in ("position", "nominal"):
            rec(f"r{r}/apo/eval/{sc}", {"success_rate": (3 + r) / 10, "episodes": 10, "successes": 3 + r})


def _scalars(tb: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def test_tensorboard_gets_each_round_once_through_the_loops_report_hook(tmp_path: Path) -> None:
    from apo_ray.loop import Loop
    from apo_ray.storage import RunStorage

    run = tmp_path / "run"
    _run(run, rounds=1)
    m = round_metrics(run)
    assert m[0] == {"success/base/position": 0.3, "success/base/nominal": 0.9}
    assert m[1] == {"success/apo/position": 0.4, "success/apo/nominal": 0.4,
                    "intervention_episode_rate/apo/position": 1.0, "intervention_step_rate/apo/position": 0.3}
    cfg = C.load(SMOKE, ["train.report_to=[tensorboard]"])
    trackers = Trackers(cfg, run)
    loop = Loop(cfg, RunStorage(run), trackers=trackers)
    loop.write_report()  # the loop calls this after every round
    assert trackers.log_rounds() == {}  # nothing new: each value goes once
    _run(run, rounds=2)  # round 2 finished
    loop.write_report()
    trackers.close()
    got = _scalars(run / "tb")
    assert got["success/base/position"] == {0: pytest.approx(0.3)}
    assert got["success/apo/position"] == {1: pytest.approx(0.4), 2: pytest.approx(0.5)}
    assert got["intervention_step_rate/apo/position"] == {1: pytest.approx(0.3), 2: pytest.approx(0.15)}
    assert got["intervention_episode_rate/apo/position"] == {1: pytest.approx(1.0), 2: pytest.approx(0.75)}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "train.report_to: ['tensorboard']" in text and "loop.rounds: 2" in text


def test_unknown_or_missing_backend_fails_at_load(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="did you mean 'tensorboard'"):
        C.load(SMOKE, ["train.report_to=[tensorbord]"])
    import importlib.util

    if importlib.util.find_spec("wandb") is None:
        with pytest.raises(UserError, match=r"wandb is not installed.*apo_ray\[wandb\]"):
            check_backends(C.load(SMOKE, ["train.report_to=[tensorboard, wandb]"]))


def test_mlflow_gets_params_and_round_metrics(tmp_path: Path) -> None:
    mlflow = pytest.importorskip("mlflow")
    run = tmp_path / "run"
    _run(run, rounds=1)
    cfg = C.load(SMOKE, ["train.report_to=[mlflow]", f"train.mlflow_uri={(tmp_path / 'ml').as_uri()}"])
    t = Trackers(cfg, run)
    t.log_rounds()
    t.close()
    client = mlflow.tracking.MlflowClient((tmp_path / "ml").as_uri())
    (r,) = client.search_runs([client.get_experiment_by_name("apo_ray").experiment_id])
    assert r.data.params["train.lr"] == str(cfg.train.lr)
    hist = client.get_metric_history(r.info.run_id, "success/apo/position")
    assert [(h.step, h.value) for h in hist] == [(1, pytest.approx(0.4))]
