"""Layout of the benchmark code: benchmarks sit above the library (nothing below them imports
pipeline.bench) and their modules stay readable (at most 400 lines each)."""

import ast
from pathlib import Path

import pytest

import pipeline

ROOT = Path(pipeline.__file__).parent
BENCH_MODULES = sorted(ROOT.glob("bench/*.py")) + sorted(ROOT.glob("vision/*.py")) + \
    [ROOT / "lensing" / "gaussian_check.py", ROOT / "commands" / "bench.py"]


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_only_benchmarks_and_commands_import_the_benchmarks():
    offenders = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in ("bench", "commands"):
            continue
        offenders += [f"{rel}: {m}" for m in _imported_modules(path) if m == "pipeline.bench" or
                      m.startswith("pipeline.bench.")]
    assert offenders == []


@pytest.mark.parametrize("path", BENCH_MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_benchmark_modules_are_at_most_400_lines(path):
    assert len(path.read_text().splitlines()) <= 400
