"""``python -m pipeline config``: check config files, and regenerate the schema and reference page.

``config check FILE [FILE ...]`` validates each file as the pipeline reads it (one line per error,
naming the file and the field) and says which sections it leaves to defaults.
``config schema --write`` regenerates ``workflow/schemas/config.schema.yaml`` and ``docs/config.md``
from the config dataclasses; ``config schema --check`` fails if the committed copies are stale.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.config_docs import DOCS_PATH, SCHEMA_PATH, reference_markdown, schema_text
from pipeline.errors import PipelineError
from pipeline.io.atomic import write_text
from pipeline.settings import PipelineConfig, load_config

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[2]


def add_arguments(parser) -> None:
    parser.add_argument("action", choices=["check", "schema"],
                        help="check: validate config files; schema: the generated schema and reference page")
    parser.add_argument("files", nargs="*", metavar="FILE", help="config files to check (action check)")
    parser.add_argument("--write", action="store_true", help="schema: rewrite the committed copies")
    parser.add_argument("--check", action="store_true", help="schema: exit 1 if a committed copy is stale")


def generated() -> dict[Path, str]:
    """The generated text of each committed copy, by path."""
    return {ROOT / SCHEMA_PATH: schema_text(PipelineConfig), ROOT / DOCS_PATH: reference_markdown(PipelineConfig) + "\n"}


def run(args) -> int:
    if args.action == "check":
        if not args.files:
            raise PipelineError("config check: name at least one config file")
        for path in args.files:
            load_config(path)
            print(f"{path}: ok")
        return 0
    stale = [p for p, text in generated().items() if not p.is_file() or p.read_text() != text]
    if args.write:
        for path, text in generated().items():
            write_text(path, text)
            print(f"wrote {path.relative_to(ROOT)}")
        return 0
    for path in stale:
        print(f"stale: {path.relative_to(ROOT)} (run `python -m pipeline config schema --write`)")
    return 1 if (stale and args.check) else 0
