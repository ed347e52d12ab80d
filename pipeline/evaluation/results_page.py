"""A results page for ``docs/results/``: the report's tables with provenance (command, commit, machine,
summary JSON) on top, and its figures and summary JSONs copied into a directory beside the page.

``calibrate`` stamps each set of its summary with the commit and machine it ran on
(:func:`stamp_provenance`), so a page rendered later, or at another commit, still names where its
figures were computed."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from pathlib import Path

from pipeline.errors import InputFileError
from pipeline.evaluation.report import build_report, copy_atomic, load_summaries
from pipeline.io.atomic import write_json, write_text


def git_commit(repo_dir=".") -> str:
    """Short commit hash of ``repo_dir``'s checkout, '+ uncommitted changes' when the tracked files differ
    from it, or 'unknown' outside a git checkout."""
    def git(*args):
        return subprocess.run(["git", "-C", str(repo_dir), *args], capture_output=True, text=True,
                              timeout=30, check=True).stdout.strip()
    try:
        head = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + (" + uncommitted changes" if dirty else "")


def machine_description() -> str:
    """CPU model, core count and Python of the machine running this command, e.g. for a results page."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, {platform.system()}, Python {platform.python_version()}"


def provenance_record(command: str) -> dict:
    """Where a result is being computed: ``command``, short commit, machine and UTC date (ISO)."""
    return {"command": command, "commit": git_commit(), "machine": machine_description(),
            "date": datetime.datetime.now(datetime.timezone.utc).date().isoformat()}


def stamp_provenance(summary_path, set_name: str, command: str = "calibrate") -> None:
    """Record :func:`provenance_record` as ``settings.SET.provenance`` of a calibrate summary (rewritten
    atomically; every other entry, and so every figure, is left as it was)."""
    summary_path = Path(summary_path)
    try:
        summary = json.loads(summary_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputFileError(summary_path, f"cannot read the calibrate summary ({exc})", "settings") from None
    summary.setdefault("settings", {}).setdefault(set_name, {})["provenance"] = provenance_record(command)
    write_json(summary_path, summary, indent=1, allow_nan=False)


def calibration_origin(settings: dict, commit: str, machine: str) -> str:
    """A sentence naming where the calibration summaries were computed, per set (``settings``: set ->
    its summary settings), when that is not ``commit`` on ``machine``; '' when every set was."""
    made, unknown = {}, []
    for set_name, st in sorted(settings.items()):
        rec = st.get("provenance")
        if not rec:
            unknown.append(set_name)
        elif (rec.get("commit"), rec.get("machine")) != (commit, machine):
            made.setdefault((rec.get("command", "calibrate"), rec.get("commit"), rec.get("machine"),
                             rec.get("date")), []).append(set_name)
    parts = [f"for set{'s' if len(sets) > 1 else ''} {', '.join(sets)} by `{cmd}` at commit `{c}` on {m}, on {d}"
             for (cmd, c, m, d), sets in made.items()]
    text = ("The calibration summaries were computed " + "; ".join(parts) + ". ") if parts else ""
    if len(unknown) == 1:
        text += f"The summary of set {unknown[0]} records no commit or machine of its own."
    elif unknown:
        text += f"The summaries of sets {', '.join(unknown)} record no commit or machine of their own."
    return text.strip()


def results_page_preamble(cal_dir, out_path, command: str) -> list[str]:
    """Provenance paragraphs of a results page: the command, commit, machine and JSON it came from (and
    the commit and machine of the calibration summaries, where they differ)."""
    out_dir = Path(out_path).resolve().parent
    jsons = [os.path.relpath(f.resolve(), out_dir) for f in sorted(Path(cal_dir).rglob("summary.json"))]
    commit, machine = git_commit(), machine_description()
    origin = calibration_origin(load_summaries(cal_dir)[2], commit, machine)
    return [
        "This page is generated; do not edit it by hand. "
        f"Made by `{command}` at commit `{commit}` on {machine}, "
        f"on {datetime.date.today().isoformat()}, from the calibration summaries "
        + ", ".join(f"`{j}`" for j in jsons) + " (copied beside this page with its figures). "
        + (origin + " " if origin else "")
        + f"Every figure below is recomputed by `{command}`.",
        "Summary keys behind the columns (per set and method in `sets.SET.METHOD`): `coverage68`, "
        "`coverage95` and their `_footprint` forms, each with the exact-sampler level for the same number of "
        "samples in `coverage68_ref`, `coverage95_ref` (and `_footprint_ref`), the standard error from the "
        "spread between observations in `coverage68_se` and z = (coverage - exact) / se in `coverage68_z` "
        "(and the 95 % and `_footprint` forms); `baseline`: the row is a `baselines:` run; `truth_chi2_median`, "
        "`truth_chi2_arc_median`: the truths' own median chi2_nu over the image and in the arc under the "
        "inference operator; `tarp_max_dev`, `tarp_p_value`, `tarp_null_p95`; `chi2_median`, "
        "`chi2_arc_median`; `sharpness`, `mean_err`; `logz` (per observation: `elbo`, `elbo_se`, `iw`).",
    ]


def summary_copies(cal_dir, assets: Path) -> list[tuple[Path, Path]]:
    """(summary.json below ``cal_dir``, its copy in ``assets``): ``summary.json`` for the top-level one,
    ``summary_SUBDIR.json`` for one in a subdirectory (path parts joined by ``_``)."""
    pairs = []
    for f in sorted(Path(cal_dir).rglob("summary.json")):
        rel = f.relative_to(cal_dir)
        name = "summary.json" if rel.parent == Path(".") else f"summary_{'_'.join(rel.parent.parts)}.json"
        pairs.append((f, assets / name))
    return pairs


def write_results_page(cal_dir, out_path, *, command: str, title: str) -> None:
    """Render ``out_path`` (e.g. ``docs/results/lensing.md``) with its figures and summary JSONs copied
    into ``out_path``'s stem directory beside it."""
    out_path = Path(out_path)
    pairs = summary_copies(cal_dir, out_path.parent / out_path.stem)
    doc = build_report(cal_dir, out_path, title=title, asset_dir=out_path.parent / out_path.stem,
                       preamble=results_page_preamble(cal_dir, out_path, command))
    for f, dst in pairs:
        copy_atomic(f, dst)
    # the preamble names the copies, not the results/ originals
    page_dir = out_path.resolve().parent
    text = doc.markdown()
    for f, dst in pairs:
        original, copy = os.path.relpath(f.resolve(), page_dir), os.path.relpath(dst.resolve(), page_dir)
        text = text.replace(f"`{original}`", f"`{copy}`")
    write_text(out_path, text)
