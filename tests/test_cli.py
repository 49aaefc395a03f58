"""The command line itself: help on every flag, bare invocation, --version, `apo-ray config`, overrides on every
command that takes --config (keys of a section it does not read refused), `loop --dry-run`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import yaml

from apo_ray import config as C
from apo_ray.cli import _all_parsers, build_parser, main

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"


def test_every_flag_has_help_with_its_default() -> None:
    for parser in _all_parsers(build_parser()):
        text = parser.format_help()
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction | argparse._SubParsersAction | argparse._VersionAction):
                continue
            assert action.help, f"{parser.prog} {action.option_strings or action.dest} has no help"
            if action.option_strings and action.default not in (None, False, [], argparse.SUPPRESS) \
                    and "default" not in (action.help or ""):
                assert f"(default: {action.default})" in " ".join(text.split()), \
                    f"{parser.prog} {action.option_strings[0]} does not show its default {action.default}"


def test_bare_command_prints_the_help(capsys) -> None:
    assert main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: apo-ray") and "collect" in out and "exit codes" in out


def test_version(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("apo-ray 0.")


def test_config_prints_the_resolved_config(capsys) -> None:
    assert main(["config", "--config", str(SMOKE), "train.lr=3e-4", "loop.arms=[apo, dagger]"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed == C.load(SMOKE, ["train.lr=3e-4", "loop.arms=[apo, dagger]"]).to_dict()
    assert printed["train"]["lr"] == 3e-4 and printed["loop"]["arms"] == ["apo", "dagger"]


def test_config_keys_lists_every_key_with_default_and_doc(capsys) -> None:
    assert main(["config", "--keys"]) == 0
    out = capsys.readouterr().out
    for key, _, doc in C.describe_keys():
        assert f"  {key} = " in out and doc in out


def test_config_bad_override_is_one_line(capsys) -> None:
    assert main(["config", "train.lambda_norm=subset"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown train.lambda_norm 'subset'" in err[0]


@pytest.mark.parametrize("argv, section", [
    (["collect", "--task", "lift", "--out", "{out}", "--config", str(SMOKE)], "env"),
    (["collect", "--task", "lift", "--out", "{out}", "train.lr=0.1"], "train"),
    (["dataset", "--episodes", "{out}", "--out", "{out}2", "env.wrist=true"], "env"),
    (["dataset", "--episodes", "{out}", "--out", "{out}2", "--config", str(SMOKE)], "env"),
    (["train", "--data", "{out}", "--init", "scratch", "--out", "{out}2", "loop.rounds=3"], "loop"),
])
def test_a_key_the_command_does_not_read_is_refused(argv: list[str], section: str, tmp_path: Path,
                                                    capsys) -> None:
    argv = [a.format(out=tmp_path / "o") for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"does not read the config's {section} section" in err[0], err
    assert not (tmp_path / "o").exists() and not (tmp_path / "o2").exists()


def test_dataset_overrides_after_a_dir_list_are_overrides(tmp_path: Path, capsys) -> None:
    # nargs="+" would take `data.k=-3` as one more episode dir; it is an override (refused by validation here)
    assert main(["dataset", "--episodes", str(tmp_path), "data.k=-3", "--out", str(tmp_path / "o")]) == 2
    assert "data.k must be positive" in capsys.readouterr().err


def test_loop_dry_run_prints_the_plan_and_writes_nothing(tmp_path: Path, capsys) -> None:
    from apo_ray.loop import plan

    run_dir = tmp_path / "run"
    assert main(["loop", "--config", str(SMOKE), "--run-dir", str(run_dir), "--dry-run", "loop.rounds=1"]) == 0
    out = capsys.readouterr().out.splitlines()
    stages = plan(C.load(SMOKE, ["loop.rounds=1"]))
    assert out[0].startswith(f"{len(stages)} stages, 0 done")
    assert [ln.split()[1] for ln in out[1:]] == [s.key for s in stages]
    assert not run_dir.exists()
    # a run dir's finished stages are marked
    run_dir.mkdir()
    (run_dir / "journal.json").write_text(json.dumps({"stages": {stages[0].key: {}}, "order": [stages[0].key]}))
    assert main(["loop", "--config", str(SMOKE), "--run-dir", str(run_dir), "--dry-run", "loop.rounds=1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{len(stages)} stages, 1 done") and out[1].split()[1] == "done"


def test_dataset_and_train_take_the_recipe_under_their_config_and_flags(tmp_path: Path) -> None:
    """``--recipe base-policy`` reaches the resolved config of dataset and train (the documented π0 commands),
    under --config, the overrides and the command's own flags (train dropped it once and trained APO)."""
    from apo_ray.cli import load_config
    from apo_ray.cli.train import resolved_config

    parse = build_parser().parse_args
    train = ["train", "--data", "d", "--init", "scratch", "--out", "o", "--recipe", "base-policy"]
    cfg = resolved_config(parse(train))
    assert (cfg.train.objective, cfg.train.lr, cfg.train.warmup_steps, cfg.model.use_proprio) == ("bc", 3e-4, 50, True)
    assert cfg.train.epochs == C.RECIPES["base-policy"]["train"]["epochs"]
    (f := tmp_path / "t.yaml").write_text("train: {lr: 0.001, warmup_steps: 7}\n")
    cfg = resolved_config(parse([*train, "--epochs", "3", "--config", str(f), "train.lr=0.002"]))
    assert (cfg.train.epochs, cfg.train.lr, cfg.train.warmup_steps, cfg.train.objective) == (3, 0.002, 7, "bc")
    cfg = load_config(parse(["dataset", "--demos", "d", "--out", "o", "--recipe", "base-policy"]), "dataset")
    assert (cfg.data.batch_size, cfg.data.idle_threshold) == (64, 0.05)
