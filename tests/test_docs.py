"""The README stays short and true to its sources: its figures are read back from the files they describe."""
from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_readme_is_short() -> None:
    assert len(README.splitlines()) <= 200


def test_readme_case_count_matches_the_corpus() -> None:
    cases = yaml.safe_load((ROOT / "tests" / "bad_inputs" / "cases.yaml").read_text())
    stated = re.findall(r"(\d+) cases in `tests/bad_inputs/cases.yaml`", README)
    assert stated == [str(len(cases))]


def _local_links(md: str) -> list[str]:
    return [t.split("#")[0] for t in re.findall(r"\]\(([^)\s]+)\)", md) if not re.match(r"[a-z]+://", t)]


def test_readme_and_study_links_resolve() -> None:
    missing = [t for t in _local_links(README) if t and not (ROOT / t).exists()]
    for doc in [*(ROOT / "docs").glob("*.md"), *(ROOT / "docs" / "experiments").glob("*.md")]:
        missing += [f"{doc.name}: {t}" for t in _local_links(doc.read_text()) if t and not (doc.parent / t).exists()]
    assert not missing, missing


def test_readme_names_only_existing_configs_and_make_targets() -> None:
    for path in set(re.findall(r"configs/[\w.-]+\.yaml", README)):
        assert (ROOT / path).is_file(), path
    targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), flags=re.M))
    for t in set(re.findall(r"\bmake ([\w-]+)", README)):
        assert t in targets, t


def test_readme_carries_no_commit_hashes() -> None:
    assert not re.findall(r"\b(?=[0-9a-f]*\d)(?=[0-9a-f]*[a-f])[0-9a-f]{7,40}\b", README)
