"""One-way imports: envs (simulation, oracle, corrector) is the lower layer and imports nothing from apo_ray."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module))
    return out


def test_envs_imports_nothing_from_apo_ray() -> None:
    bad = [f"{p.relative_to(ROOT)}:{line} imports {mod}" for p in sorted((ROOT / "envs").rglob("*.py"))
           for line, mod in _imports(p) if mod == "apo_ray" or mod.startswith("apo_ray.")]
    assert not bad, bad


def test_pipeline_imports_no_bench_module() -> None:
    """Benches and proof runs (apo_ray.bench) sit above the pipeline: only the bench CLI reaches them."""
    mods = [p for p in sorted((ROOT / "apo_ray").rglob("*.py")) if "bench" not in p.relative_to(ROOT / "apo_ray").parts
            and p.name != "bench.py"]
    bad = [f"{p.relative_to(ROOT)}:{line} imports {mod}" for p in mods for line, mod in _imports(p)
           if mod == "apo_ray.bench" or mod.startswith("apo_ray.bench.")]
    assert mods and not bad, bad


def test_importing_envs_loads_no_apo_ray_module() -> None:
    # also catches an import hidden from the AST (importlib, __import__)
    code = "import sys, envs, envs.oracle_eval; print(sorted(m for m in sys.modules if m.split('.')[0] == 'apo_ray'))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert r.stdout.strip() == "[]", r.stdout


def test_one_error_class_for_both_layers() -> None:
    from apo_ray.errors import UserError
    from envs.errors import UserError as EnvsUserError

    assert UserError is EnvsUserError
    import envs

    try:
        envs.get_task("lfit")
    except UserError as e:  # apo_ray's handler catches what envs raises, with the same line
        assert e.line().startswith("error: unknown task 'lfit'")
