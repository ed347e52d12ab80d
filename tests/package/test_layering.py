"""The package's import structure: lower layers never import higher ones, and inference code loads a
trained posterior without the training machinery.

Layers, low to high: shared plumbing (errors, config, runtime, distributed, problems, io, metrics, plots)
< diffusion < samplers and rtb < lensing and vision < bench and evaluation < commands and cli. Every
``import`` of a ``pipeline`` module counts, at module top or inside a function.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "pipeline"
LAYER = {"errors": 0, "config": 0, "config_renames": 0, "config_docs": 0, "runtime": 0, "distributed": 0,
         "problems": 0, "io": 0, "metrics": 0, "plots": 0, "diffusion": 1, "samplers": 2, "rtb": 2, "lensing": 3,
         "vision": 3, "bench": 4,
         "evaluation": 4,
         "settings": 5, "api": 5, "commands": 5, "cli": 5, "__main__": 5, "__init__": 5}


def _top(module: str) -> str:
    return module.split(".")[1] if module.startswith("pipeline.") else "__init__"


def _pipeline_imports(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pipeline"):
            names = [node.module] if node.module != "pipeline" else [f"pipeline.{a.name}" for a in node.names]
            out += [(node.lineno, n) for n in names]
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("pipeline.")]
    return out


def test_no_import_runs_upward():
    bad = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent)
        here = rel.parts[1].removesuffix(".py")
        for line, target in _pipeline_imports(path):
            there = _top(target)
            if there in LAYER and here in LAYER and LAYER[there] > LAYER[here]:
                bad.append(f"{rel}:{line} imports {target} ({here} is below {there})")
    assert not bad, "imports running upward:\n" + "\n".join(bad)


@pytest.mark.slow
def test_inference_does_not_import_the_trainer():
    code = ("import sys, pipeline.rtb.loading, pipeline.diffusion.network_prior, pipeline.lensing.sample, "
            "pipeline.lensing.checks, pipeline.lensing.tuning; "
            "print('pipeline.rtb.trainer' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=ROOT.parent).stdout.strip()
    assert out == "False"


def test_io_builds_no_network():
    """Checkpoint I/O is generic: the network classes are built beside the models."""
    for path in (ROOT / "io").glob("*.py"):
        for line, target in _pipeline_imports(path):
            assert _top(target) in ("errors", "io"), f"{path.name}:{line} imports {target}"
