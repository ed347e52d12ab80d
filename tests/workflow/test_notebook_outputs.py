"""The executed copies of the notebooks (docs/notebooks/, outputs kept for readers; nbmake in
test_workflow.py discards its outputs) are current and show their figures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = [pytest.mark.workflow, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = ("01_quickstart.ipynb", "02_your_own_data.ipynb")


def _code_cells(path: Path) -> list[dict]:
    return [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]


def _images(path: Path) -> list[dict]:
    """The outputs of ``path``'s code cells that display a PNG (figures)."""
    return [o for c in _code_cells(path) for o in c.get("outputs", [])
            if o["output_type"] in ("display_data", "execute_result") and "image/png" in o.get("data", {})]


def _source(cell: dict) -> str:
    src = cell["source"]
    return src if isinstance(src, str) else "".join(src)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_executed_copy_matches_the_notebook_and_shows_figures(name):
    executed, source = ROOT / "docs" / "notebooks" / name, ROOT / "notebooks" / name
    cells = _code_cells(executed)
    assert [_source(c) for c in cells] == [_source(c) for c in _code_cells(source)], (
        f"{executed} is stale: re-execute {source} (docs/api.md says how)")
    assert not [o for c in cells for o in c.get("outputs", []) if o["output_type"] == "error"], \
        f"{executed} holds an error"
    images = _images(executed)
    assert images, f"{executed} shows no figure"
    assert _images(source) == []  # the committed notebook is stripped: the check sees no figure there
    assert all(len(o["data"]["image/png"]) > 20_000 for o in images)  # base64 PNGs of real figures
    assert all(c.get("execution_count") for c in cells), f"{executed}: every code cell ran"

