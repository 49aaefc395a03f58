"""The config tree: choices checked at load, removed keys, every key documented, old run dirs still resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from apo_ray import config as C
from apo_ray.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"


@pytest.mark.parametrize("override, match", [
    ("train.lambda_norm=subset_summ", "did you mean 'subset_sum'"),
    ("train.reduction=avg", "use sum or mean"),
    ("train.reference=cache", "did you mean 'cached'"),
    ("train.objective=ppo", "unknown train.objective 'ppo'"),
    ("model.vision=resnt", "did you mean 'resnet'"),
    ("model.kind=hugging", "use tiny or hf"),
    ("train.zero_stage=4", "unknown train.zero_stage '4'"),
    ("loop.base_objective=bcc", "did you mean 'bc'"),
])
def test_choices_fail_at_load(override: str, match: str) -> None:
    with pytest.raises(UserError, match=match):
        C.load(SMOKE, [override])


def test_every_choice_value_loads() -> None:
    for key, allowed in C.CHOICES.items():
        for v in allowed:
            if key == "model.kind" and v == "hf":
                continue  # model.path is checked where the model loads
            C.load(None, [f"{key}={v}"])


def test_choices_agree_with_the_code_that_reads_them() -> None:
    from apo_ray import loss

    assert C.CHOICES["train.lambda_norm"] == loss.LAMBDA_NORMS
    assert C.OBJECTIVES == loss.OBJECTIVES


@pytest.mark.parametrize("key", sorted(C.REMOVED))
def test_removed_keys_are_refused_with_what_to_use(key: str, tmp_path: Path) -> None:
    sec, name = key.split(".")
    f = tmp_path / "c.yaml"
    f.write_text(f"{sec}:\n  {name}: 1\n")
    with pytest.raises(UserError, match=f"config key '{key}' was removed"):
        C.load(f)
    with pytest.raises(UserError, match="was removed"):
        C.load(None, [f"{key}=1"])
    assert not hasattr(getattr(C.Config(), sec), name)


def test_a_run_dir_saved_with_removed_keys_resumes(tmp_path: Path) -> None:
    from apo_ray.loop import prepare_run_dir
    from apo_ray.storage import RunStorage

    st = RunStorage(tmp_path / "run")
    prepare_run_dir(C.load(SMOKE), st, resume=False)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    saved["collect"].update(policy="oracle", episodes=8, round=0)
    saved["env"]["camera"] = True
    (tmp_path / "run" / "config.json").write_text(json.dumps(saved))
    prepare_run_dir(C.load(SMOKE), st, resume=True)
    assert C.from_dict(saved) == C.load(SMOKE)


def test_every_key_has_a_doc_and_its_default() -> None:
    keys = C.describe_keys()
    default = C.Config().to_dict()
    assert len(keys) == sum(len(v) for v in default.values())
    for key, value, doc in keys:
        sec, name = key.split(".")
        assert doc, f"{key} has no doc"
        assert value == default[sec][name]


def test_a_recipe_sits_under_the_file_and_the_overrides(tmp_path: Path) -> None:
    """defaults <- recipe <- --config <- overrides; a command takes only the recipe's sections it reads."""
    f = tmp_path / "c.yaml"
    f.write_text("train: {epochs: 5}\n")
    cfg = C.load(f, ["train.lr=0.002"], sections=("train", "model"), recipe_name="base-policy")
    base = C.RECIPES["base-policy"]
    assert cfg.train.epochs == 5 and cfg.train.lr == 0.002  # the file and the override win
    assert cfg.train.objective == "bc" and cfg.train.warmup_steps == base["train"]["warmup_steps"]
    assert cfg.model.use_proprio is True
    assert cfg.env.wrist is False and cfg.data.batch_size == C.DataConfig.batch_size  # sections it does not read
    assert C.load(recipe_name="base-policy").env.wrist is True
    with pytest.raises(UserError, match="unknown recipe 'nope'"):
        C.load(recipe_name="nope")
