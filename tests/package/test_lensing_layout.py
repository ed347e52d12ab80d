"""The lensing data modules stay readable: no module of pipeline/lensing over 400 lines, and the
functions that build, simulate and read files (sources, simulate, held-out sets, observation reading, units, conventions, rebinning)
under 60 lines each."""

from __future__ import annotations

import ast
from pathlib import Path

LENSING = Path(__file__).resolve().parents[2] / "pipeline" / "lensing"
DATA_MODULES = ("sources", "sources_galsim", "sources_hst", "sources_user", "grids", "simulate", "heldout",
                "observation", "units", "conventions", "rebin")


def test_no_lensing_module_over_400_lines():
    long = {p.name: n for p in sorted(LENSING.glob("*.py")) if (n := len(p.read_text().splitlines())) > 400}
    assert not long, f"modules over 400 lines: {long}"


def test_data_module_functions_under_60_lines():
    paths = [LENSING / f"{name}.py" for name in DATA_MODULES]
    assert all((LENSING / f"{name}.py").is_file() for name in ("sources", "simulate", "observation"))
    long = []
    for path in (p for p in paths if p.is_file()):
        name, tree = path.stem, ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n >= 60:
                    long.append(f"{name}.{node.name}: {n} lines")
    assert not long, "functions of 60 lines or more:\n" + "\n".join(long)
