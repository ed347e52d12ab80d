"""``python -m pipeline report``: the markdown (and optional HTML) report of the calibration.

Parses the options and calls :func:`pipeline.evaluation.report.write_report` (the results table of
every ``summary.json`` below ``--calibration``, TARP against its exact-sampler null, the acceptance
checks on the prior-drawn set and the figures) or, with ``--results-page``,
:func:`pipeline.evaluation.results_page.write_results_page` (the same tables as a page for
``docs/results/``, provenance on top, figures and summary JSONs copied beside it).
"""

from __future__ import annotations

import logging
import shlex
import sys
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.evaluation.report import write_report
from pipeline.evaluation.results_page import write_results_page

log = logging.getLogger(__name__)


def add_arguments(parser) -> None:
    parser.add_argument("--calibration", required=True, metavar="DIR",
                        help="directory holding calibrate outputs (every summary.json below it is read)")
    parser.add_argument("--out", required=True, metavar="FILE.md", help="markdown report (written atomically)")
    parser.add_argument("--figures", nargs="*", default=[], metavar="PNG",
                        help="extra figures to include (e.g. the closed-form check)")
    parser.add_argument("--sections", nargs="*", default=[], metavar="MD",
                        help="extra markdown files appended as sections (e.g. benchmark tables)")
    parser.add_argument("--html", metavar="FILE.html", help="also write a self-contained-layout HTML version")
    parser.add_argument("--title", default="Lensed-source posteriors: calibration report")
    parser.add_argument("--results-page", action="store_true",
                        help="write a results page for docs/ instead: provenance (command, commit, machine, "
                             "JSON) on top, figures and summary JSONs copied into OUT's stem directory beside it")
    parser.add_argument("--command", default=None,
                        help="with --results-page: the command to name as the page's origin (default: this "
                             "command line)")


def run(args) -> int:
    out = Path(args.out)
    if out.suffix.lower() not in (".md", ".markdown"):
        raise PipelineError(f"--out {out}: the report is markdown (.md); use --html for HTML")
    if args.results_page:
        command = args.command or "python -m pipeline " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        write_results_page(args.calibration, out, title=args.title, command=command)
    else:
        write_report(args.calibration, out, figures=args.figures, sections=args.sections, title=args.title,
                     html_path=args.html)
    log.info("wrote %s", out)
    return 0
