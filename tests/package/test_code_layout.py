"""Size and layering of the package, read from the source (AST): commands only parse and call (no
function in ``pipeline/commands/`` over 60 lines), library modules stay readable (no module in
``pipeline/evaluation/`` or ``pipeline/commands/`` over 400 lines), and the evaluation library does
not import the command layer."""

import ast
from pathlib import Path

import pytest

import pipeline

PKG = Path(pipeline.__file__).parent
MAX_COMMAND_FUNCTION_LINES = 60
MAX_MODULE_LINES = 400


def _modules(sub: str) -> list[Path]:
    return sorted((PKG / sub).rglob("*.py"))


def _label(path: Path) -> str:
    return str(path.relative_to(PKG.parent)) if path.is_relative_to(PKG.parent) else str(path)


def long_functions(path: Path, limit: int) -> list[str]:
    """'path:line name (N lines)' for every function or method in ``path`` longer than ``limit`` lines
    (from ``def`` to its last line: docstring and comments included, decorators not)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    return [f"{_label(path)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > limit]


def test_long_functions_names_the_offender_and_its_length(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("def short():\n    return 1\n\n\nclass C:\n    def long(self):\n"
                   + "        x = 1\n" * 60 + "        return x\n")
    assert long_functions(src, 61) == [f"{src}:6 long (62 lines)"]
    assert long_functions(src, 62) == []


def test_the_packages_exist():
    assert _modules("commands") and _modules("evaluation")


@pytest.mark.parametrize("path", _modules("commands"), ids=lambda p: p.name)
def test_command_functions_are_short(path):
    offenders = long_functions(path, MAX_COMMAND_FUNCTION_LINES)
    assert not offenders, (f"functions in pipeline/commands/ over {MAX_COMMAND_FUNCTION_LINES} lines (move the "
                           f"logic into a library module): " + "; ".join(offenders))


@pytest.mark.parametrize("path", _modules("commands") + _modules("evaluation"),
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_modules_at_most_400_lines(path):
    n = len(path.read_text().splitlines())
    assert n <= MAX_MODULE_LINES, f"{path.relative_to(PKG.parent)} has {n} lines (limit {MAX_MODULE_LINES})"


@pytest.mark.parametrize("path", _modules("evaluation"), ids=lambda p: p.name)
def test_evaluation_does_not_import_commands(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    upward = [m for m in imported if m.startswith(("pipeline.commands", "pipeline.cli"))]
    assert not upward, f"{path.relative_to(PKG.parent)} imports the command layer: {', '.join(upward)}"


def test_no_package_module_over_400_lines():
    """Every module of the package is at most 400 lines (split by concern past that)."""
    root = Path(__file__).resolve().parents[2] / "pipeline"
    long = [f"{p.relative_to(root.parent)} has {n} lines" for p in sorted(root.rglob("*.py"))
            if (n := len(p.read_text().splitlines())) > 400]
    assert not long, "\n".join(long)


def test_no_reference_to_outside_documents_or_work_logs():
    """Code, tests, workflow, configs and docs explain themselves: no citation of a design document that is
    not in the repository, and no issue or session numbers."""
    import re

    root = Path(__file__).resolve().parents[2]
    pattern = re.compile(r"design(\.md| section| §| [0-9]|:| units)|session [0-9]|issue [0-9]|the issue's", re.IGNORECASE)
    places = [root / d for d in ("pipeline", "tests", "workflow", "config", "docs", "notebooks")]
    files = [f for d in places for f in d.rglob("*") if f.is_file() and f.suffix in {".py", ".md", ".yaml", ".smk",
                                                                                      ".ipynb", ".txt"}]
    files += [root / "README.md", root / "data" / "pretrained" / "README.md", root / "workflow" / "Snakefile"]
    hits = [f"{f.relative_to(root)}:{i}" for f in files if f.is_file() and f.name != "test_code_layout.py"
            for i, line in enumerate(f.read_text(errors="replace").splitlines(), 1) if pattern.search(line)]
    assert not hits, "references to outside documents or work logs:\n" + "\n".join(hits)


# Imports that may stay inside a function (a dotted prefix matches its submodules): heavy dependencies
# that only some processes need. GalSim (~1 s) renders only in the ``sources`` step, lenstronomy only
# cross-checks, matplotlib must pick its backend before pyplot loads (~1 s) and ``pipeline.plots`` loads
# pyplot, caustics (~2 s) is needed only where a lens is ray-traced, scikit-learn (~2.5 s) only serves two
# stand-in photos.
LAZY_IMPORTS = ("galsim", "lenstronomy", "matplotlib", "pipeline.plots", "caustics", "sklearn")
# Entry points that import their implementation when called, so ``python -m pipeline [CMD] --help`` stays
# fast: each command's run(), and the CLI's main() (which loads the whole config tree only for --config).
LAZY_ENTRY_POINTS = {"run"}
CLI_ENTRY = ("cli.py", "main")


def imports_in_functions(path: Path) -> list[str]:
    """'path:line module' for every import inside a function body of ``path`` other than the allowed lazy
    ones (``LAZY_IMPORTS`` anywhere; anything in ``run()`` of a ``pipeline/commands/`` module and in the
    CLI's ``main()``)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    entry = path.parent.name == "commands"
    found = {}
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) or (entry and fn.name in LAZY_ENTRY_POINTS):
            continue
        if (path.name, fn.name) == CLI_ENTRY and path.parent.name == "pipeline":
            continue
        for node in ast.walk(fn):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = ["." * node.level + (node.module or "")]
            else:
                continue
            for name in names:
                if not any(name == lazy or name.startswith(lazy + ".") for lazy in LAZY_IMPORTS):
                    found[(node.lineno, name)] = f"{_label(path)}:{node.lineno} {name}"
    return [found[k] for k in sorted(found)]


def test_imports_in_functions_finds_nested_and_spares_allowed(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("import os\n\n\ndef f():\n    import json\n    import matplotlib.pyplot as plt\n\n"
                   "    def g():\n        from pipeline.io import atomic\n    return g\n\n\ndef run(args):\n"
                   "    import torch\n")
    assert imports_in_functions(src) == [f"{src}:5 json", f"{src}:9 pipeline.io", f"{src}:14 torch"]
    commands = tmp_path / "commands"
    commands.mkdir()
    (commands / "c.py").write_text(src.read_text())
    assert imports_in_functions(commands / "c.py") == [f"{commands / 'c.py'}:5 json",
                                                        f"{commands / 'c.py'}:9 pipeline.io"]


def test_imports_at_module_top():
    """Modules import what they use at the top, so their dependencies read at a glance and import cycles
    show at import time; only ``LAZY_IMPORTS`` and command ``run()`` bodies import inside functions."""
    offenders = [hit for path in sorted(PKG.rglob("*.py")) for hit in imports_in_functions(path)]
    assert not offenders, "imports inside functions (move them to the module top):\n" + "\n".join(offenders)
