"""``python -m pipeline report``: the markdown (and optional HTML) report of the calibration.

Reads every ``summary.json`` below ``--calibration`` (one per set, as ``calibrate`` writes them;
later files override earlier ones for the same set and method), and writes the results table
(methods x sets) with every coverage beside the level an exact sampler reaches with the same number
of samples, the truths' own chi2 per set, TARP against its exact-sampler null (methods are not ranked
against each other by TARP), the acceptance checks on the prior-drawn set, and the figures, linked
relative to the report so the report directory can be moved together with ``results/``.

``--results-page`` writes the same tables as a page for ``docs/results/`` instead: the command, commit,
machine and summary JSON it came from on top, and the figures and JSONs copied beside it.
"""

from __future__ import annotations

import datetime
import html
import json
import logging
import os
import platform
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from pipeline.errors import InputFileError, PipelineError

log = logging.getLogger(__name__)

CHI2_RANGE = (0.8, 1.25)  # acceptance band for the median chi2_nu (image and arc) on the prior-drawn set


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


# --------------------------------------------------------------------------------------- loading
def load_summaries(cal_dir) -> tuple[dict, dict, dict, dict]:
    """Merge every summary.json below ``cal_dir``: returns (sets, figures, settings, roots) where
    roots[set] is the directory its figures are relative to."""
    cal_dir = Path(cal_dir)
    if not cal_dir.is_dir():
        raise InputFileError(cal_dir, "calibration directory not found", "--calibration")
    files = sorted(cal_dir.rglob("summary.json"))
    if not files:
        raise InputFileError(cal_dir, "no summary.json below it (run calibrate first)", "--calibration")
    sets, figures, settings, roots = {}, {}, {}, {}
    for f in files:
        try:
            data = json.loads(f.read_text())
        except json.JSONDecodeError as exc:
            raise InputFileError(f, f"not valid JSON (line {exc.lineno})") from None
        if not isinstance(data, dict) or not isinstance(data.get("sets"), dict):
            raise InputFileError(f, "no 'sets' mapping: not a calibrate summary", "sets")
        for set_name, methods in data["sets"].items():
            sets.setdefault(set_name, {}).update(methods)
            figs = data.get("figures", {}).get(set_name)
            if figs:
                figures.setdefault(set_name, {"coverage": None, "lenses": {}})
                figures[set_name]["coverage"] = str(f.parent / figs["coverage"]) if figs.get("coverage") else None
                for m, pngs in figs.get("lenses", {}).items():
                    figures[set_name]["lenses"][m] = [str(f.parent / p) for p in pngs]
            if set_name in data.get("settings", {}):
                settings[set_name] = data["settings"][set_name]
            roots[set_name] = str(f.parent)
    return sets, figures, settings, roots


# ------------------------------------------------------------------------------------- analysis
def _fmt(v, nd=3):
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return f"{v:.{nd}g}" if (v != 0 and abs(v) < 1e-3) or abs(v) >= 1e4 else f"{v:.{nd}f}"
    return str(v)


def logz_summary(logz) -> str:
    """Median ELBO log Z over observations (and how many had one), or n/a."""
    vals = [e["elbo"] for e in (logz or []) if e and e.get("elbo") is not None]
    if not vals:
        return "n/a"
    vals = sorted(vals)
    mid = vals[len(vals) // 2] if len(vals) % 2 else 0.5 * (vals[len(vals) // 2 - 1] + vals[len(vals) // 2])
    return f"{mid:.1f} ({len(vals)}/{len(logz)})"


def tarp_sentence(methods: dict) -> str:
    """What TARP says on one set: each method's max|ECP - alpha| against the exact-sampler null.

    Methods are not ranked against each other: the null test is valid per method, but overlapping or
    disjoint intervals of a maximum say nothing about which of two methods is better calibrated (a
    comparison needs a paired test on the same observations)."""
    items = [(m, r) for m, r in sorted(methods.items()) if r.get("tarp_max_dev") is not None]
    if not items:
        return "no TARP figures."
    passed = [m for m, r in items if tarp_ok(r)]
    failed = [m for m, r in items if not tarp_ok(r)]
    parts = []
    if passed:
        parts.append("inside the exact-sampler null's 95th percentile: " + ", ".join(f"`{m}`" for m in passed))
    if failed:
        parts.append("outside it: " + ", ".join(f"`{m}`" for m in failed))
    return "; ".join(parts) + ". Methods are not ranked by TARP against each other."


def tarp_ok(r: dict) -> bool:
    """max|ECP - alpha| at or below the 95th percentile of its exact-sampler null."""
    return (r.get("tarp_max_dev") is not None and r.get("tarp_null_p95") is not None
            and r["tarp_max_dev"] <= r["tarp_null_p95"])


def acceptance(r: dict) -> dict:
    """Acceptance checks for one method on the prior-drawn set: TARP inside its null p95, and the median
    chi2_nu over the image and in the arc inside CHI2_RANGE."""
    lo, hi = CHI2_RANGE
    chi_ok = all(r.get(k) is not None and lo <= r[k] <= hi for k in ("chi2_median", "chi2_arc_median"))
    return {"tarp": tarp_ok(r), "chi2": chi_ok}


def coverage_cell(r: dict, key: str) -> str:
    """A coverage value beside the level an exact sampler reaches with the same number of samples
    (``KEY_ref`` in the summary), e.g. ``0.761 (0.697)``."""
    v, ref = r.get(key), r.get(key + "_ref")
    if ref is None and key.endswith("_footprint"):
        ref = r.get(key[: -len("_footprint")] + "_ref")
    return _fmt(v) if ref is None else f"{_fmt(v)} ({_fmt(ref)})"


def truth_chi2(sets_methods: dict) -> tuple:
    """The truths' own median chi2_nu over the image and in the arc on a set (the level exact
    posterior samples reach), from any method entry that carries it; (None, None) when absent."""
    for r in sets_methods.values():
        if r.get("truth_chi2_median") is not None:
            return r["truth_chi2_median"], r.get("truth_chi2_arc_median")
    return None, None


# -------------------------------------------------------------------------------------- writing
class Doc:
    """Blocks rendered both to markdown and to HTML."""

    def __init__(self):
        self.blocks: list[tuple] = []

    def h(self, level, text):
        self.blocks.append(("h", level, text))

    def p(self, text):
        self.blocks.append(("p", text))

    def table(self, header, rows):
        self.blocks.append(("table", header, rows))

    def img(self, path, alt):
        self.blocks.append(("img", path, alt))

    def raw_md(self, text):
        self.blocks.append(("raw", text))

    def markdown(self) -> str:
        out = []
        for b in self.blocks:
            if b[0] == "h":
                out.append("#" * b[1] + " " + b[2])
            elif b[0] == "p":
                out.append(b[1])
            elif b[0] == "table":
                out.append("| " + " | ".join(b[1]) + " |")
                out.append("|" + "|".join("---" for _ in b[1]) + "|")
                out += ["| " + " | ".join(str(c) for c in row) + " |" for row in b[2]]
            elif b[0] == "img":
                out.append(f"![{b[2]}]({b[1]})")
            else:
                out.append(b[1].rstrip())
            out.append("")
        return "\n".join(out)

    def html(self, title) -> str:
        def inline(t):  # **bold** and `code` only
            t = html.escape(t)
            parts = t.split("**")
            t = "".join(f"<b>{s}</b>" if i % 2 else s for i, s in enumerate(parts))
            parts = t.split("`")
            return "".join(f"<code>{s}</code>" if i % 2 else s for i, s in enumerate(parts))

        out = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
               "<style>body{font-family:sans-serif;max-width:1200px;margin:auto}table{border-collapse:collapse;"
               "font-size:12px}td,th{border:1px solid #bbb;padding:3px 6px}img{max-width:100%}</style>"
               "</head><body>"]
        for b in self.blocks:
            if b[0] == "h":
                out.append(f"<h{b[1]}>{inline(b[2])}</h{b[1]}>")
            elif b[0] == "p":
                out.append(f"<p>{inline(b[1])}</p>")
            elif b[0] == "table":
                out.append("<table><tr>" + "".join(f"<th>{inline(c)}</th>" for c in b[1]) + "</tr>")
                out += ["<tr>" + "".join(f"<td>{inline(str(c))}</td>" for c in row) + "</tr>" for row in b[2]]
                out.append("</table>")
            elif b[0] == "img":
                out.append(f"<p><img src='{html.escape(b[1])}' alt='{html.escape(b[2])}'></p>")
            else:
                out.append(f"<pre>{html.escape(b[1])}</pre>")
        out.append("</body></html>")
        return "\n".join(out)


def _write_atomic(path: Path, text: str) -> None:
    from pipeline.io.atomic import write_text

    write_text(path, text)


COLUMNS = ["set", "method", "n_obs", "n_samples", "TARP max dev", "p (exact null)", "null p95", "TARP ok",
           "cov68 (exact)", "cov95 (exact)", "cov68 fp (exact)", "cov95 fp (exact)", "chi2_nu med",
           "chi2_nu arc med", "sharpness", "mean err", "log Z ELBO med", "log Z IW med", "sampling s"]

COLUMN_NOTES = (
    "Columns: TARP max dev = max|ECP - alpha| over the fixed alpha grid; p (exact null) = the fraction of "
    "exactly calibrated posteriors of the same size (observations, samples, bins) whose statistic is at least "
    "as large; null p95 = its 95th percentile; TARP ok = max dev <= null p95. cov68/cov95 = rank-based "
    "per-pixel central-interval coverage over all source pixels, 'fp' inside the footprint (pixels where the "
    "pooled mean of the truth and the samples exceeds {frac} x its peak, a rule symmetric in truth and "
    "samples); in brackets the level an exact sampler reaches with the same number of samples under the "
    "same rank rule (for 32 samples 23/33 = 0.697 and 31/33 = 0.939, not 0.68 and 0.95). chi2_nu = "
    "sum((y - A(x_s))/sigma)^2 / nu per posterior sample with nu = unmasked image pixels (median over samples "
    "and observations; 'arc' = pixels where the sample's own noiseless model exceeds sigma); compare it with "
    "the truths' own chi2_nu on the same set (below the set's description), the level exact samples reach. "
    "sharpness = RMS posterior std / RMS prior std and mean err = RMS(posterior mean - truth) per observation, "
    "averaged, both from the equally weighted returned samples (1 = nothing learnt from y; a sampler that "
    "ignores y passes TARP and coverage, so read them together); log Z = median over observations of the "
    "ELBO and of the importance-weighted estimate, n/a where a method has none; sampling s = total sampling "
    "wall time of the set.")


def _logz_median(logz, key: str) -> str:
    vals = sorted(e[key] for e in (logz or []) if e and e.get(key) is not None)
    if not vals:
        return "n/a"
    n = len(vals)
    mid = vals[n // 2] if n % 2 else 0.5 * (vals[n // 2 - 1] + vals[n // 2])
    return f"{mid:.1f} ({n}/{len(logz)})"


def _row(s: str, m: str, r: dict) -> list:
    p = r.get("tarp_p_value")
    return [s, m, r.get("n_obs"), r.get("n_samples"), _fmt(r.get("tarp_max_dev")), _fmt(p),
            _fmt(r.get("tarp_null_p95")), _fmt(tarp_ok(r)),
            coverage_cell(r, "coverage68"), coverage_cell(r, "coverage95"),
            coverage_cell(r, "coverage68_footprint"), coverage_cell(r, "coverage95_footprint"),
            _fmt(r.get("chi2_median")), _fmt(r.get("chi2_arc_median")), _fmt(r.get("sharpness")),
            _fmt(r.get("mean_err")), _logz_median(r.get("logz"), "elbo"), _logz_median(r.get("logz"), "iw"),
            "n/a" if r.get("seconds") is None else f"{r['seconds']:.1f}"]


def build_report(cal_dir, out_path, *, figures=(), sections=(), title="Calibration report",
                 asset_dir=None, preamble=()) -> Doc:
    """The report as a :class:`Doc`. Figures are linked relative to ``out_path``'s directory; with
    ``asset_dir`` they are first copied there (so a page under ``docs/`` does not point into
    ``results/``). ``preamble``: paragraphs placed under the title (provenance)."""
    sets, figs, settings, _roots = load_summaries(cal_dir)
    out_dir = Path(out_path).resolve().parent

    def link(p):
        p = Path(p)
        if asset_dir is not None:
            target = Path(asset_dir) / p.name
            _copy_atomic(p, target)
            p = target
        return os.path.relpath(p.resolve(), out_dir)

    doc = Doc()
    doc.h(1, title)
    for para in preamble:
        doc.p(para)
    doc.p("Posteriors are **conditional on the given lens model** (mass model, PSF, noise map and mask are "
          "taken as known). SCI must be lens-light-subtracted (or carry a lens-light HDU) and its noise "
          "uncorrelated between pixels.")
    set_order = [s for s in ("prior", "heldout") if s in sets] + sorted(s for s in sets if s not in ("prior", "heldout"))
    for s in set_order:
        any_r = next(iter(sets[s].values()))
        st = settings.get(s, {})
        tc, tca = truth_chi2(sets[s])
        truth_part = ("" if tc is None else
                      f" The truths' own chi2_nu under the inference operator (median over observations): "
                      f"**{_fmt(tc)}** over the image, **{_fmt(tca)}** in the arc.")
        doc.p(f"Set **{s}**: {any_r['n_obs']} observations, {any_r['n_samples']} posterior samples per "
              f"observation and method, TARP with {any_r['n_alpha_bins']} fixed alpha bins "
              f"(null distribution of max|ECP - alpha| for exactly calibrated posteriors of the same size: "
              f"{st.get('n_null', 'n/a')} draws, {st.get('null_method', 'n/a')}; coordinates normalised "
              f"by the {st.get('tarp_norm', 'pooled')} min/max).{truth_part}")
    doc.h(2, "Results")
    doc.table(COLUMNS, [_row(s, m, sets[s][m]) for s in set_order for m in sorted(sets[s])])
    frac = _fmt(next(iter(settings.values()), {}).get("footprint_frac", 0.1))
    doc.p(COLUMN_NOTES.format(frac=frac))
    kind_rows = [[s, m, kind, k.get("n_obs"), f"{_fmt(k.get('chi2_median'))} ({_fmt(k.get('truth_chi2_median'))})",
                  f"{_fmt(k.get('chi2_arc_median'))} ({_fmt(k.get('truth_chi2_arc_median'))})", _fmt(k.get("mean_err")),
                  coverage_cell({**k, "coverage68_ref": sets[s][m].get("coverage68_ref")}, "coverage68"),
                  coverage_cell({**k, "coverage95_ref": sets[s][m].get("coverage95_ref")}, "coverage95")]
                 for s in set_order for m in sorted(sets[s]) for kind, k in sorted(sets[s][m].get("per_kind", {}).items())]
    if kind_rows:
        doc.h(2, "Per source kind")
        doc.table(["set", "method", "kind", "n_obs", "chi2_nu med (truths)", "chi2_nu arc med (truths)", "mean err",
                   "cov68 (exact)", "cov95 (exact)"], kind_rows)
        doc.p("Held-out observations are rendered from sources drawn at a finer scale than the inference grid "
              "(`simulate --fine-factor`), so the truths' own chi2_nu (in brackets) exceeds 1 where the source "
              "has structure the inference grid and operator cannot represent; read each method's chi2 against it.")
    doc.h(2, "TARP")
    for s in set_order:
        doc.p(f"**{s}**: {tarp_sentence(sets[s])}")
    if "prior" in sets:
        doc.h(2, "Acceptance on the prior-drawn set")
        lo, hi = CHI2_RANGE
        for m in sorted(sets["prior"]):
            a = acceptance(sets["prior"][m])
            doc.p(f"`{m}`: TARP max dev <= null p95: **{_fmt(a['tarp'])}**; median chi2_nu (image and arc) in "
                  f"[{lo}, {hi}]: **{_fmt(a['chi2'])}**.")
        if any(sets["prior"][m].get("n_obs", 0) < 100 for m in sets["prior"]):
            doc.p("With fewer than ~100 observations TARP is weak (its null band is wide); chi2 carries the "
                  "acceptance and TARP is reported with its null distribution.")
    doc.h(2, "Figures")
    for s in set_order:
        f = figs.get(s, {})
        if f.get("coverage"):
            doc.h(3, f"Coverage, {s} set")
            doc.img(link(f["coverage"]), f"coverage {s}")
        for m, pngs in sorted(f.get("lenses", {}).items()):
            for p in pngs[:1]:
                doc.h(3, f"{m}, {s} set: {Path(p).stem}")
                doc.img(link(p), f"{m} {s}")
    for p in figures:
        if not Path(p).is_file():
            raise InputFileError(p, "figure not found", "--figures")
        doc.h(3, Path(p).stem)
        doc.img(link(p), Path(p).stem)
    for sec in sections:
        sp = Path(sec)
        if not sp.is_file():
            raise InputFileError(sp, "section file not found", "--sections")
        doc.raw_md(sp.read_text())
    return doc


# ---------------------------------------------------------------------------------- results page
def _copy_atomic(src: Path, dst: Path) -> None:
    from pipeline.io.atomic import atomic_file

    with atomic_file(dst) as tmp:
        shutil.copyfile(src, tmp)


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


def results_page_preamble(cal_dir, out_path, command: str) -> list[str]:
    """Provenance paragraphs of a results page: the command, commit, machine and JSON it came from."""
    out_dir = Path(out_path).resolve().parent
    jsons = [os.path.relpath(f.resolve(), out_dir) for f in sorted(Path(cal_dir).rglob("summary.json"))]
    return [
        "This page is generated; do not edit it by hand. "
        f"Made by `{command}` at commit `{git_commit()}` on {machine_description()}, "
        f"on {datetime.date.today().isoformat()}, from the calibration summaries "
        + ", ".join(f"`{j}`" for j in jsons) + " (copied beside this page with its figures). "
        "Every figure below is recomputed by `make demo`, which renders this page at its end.",
        "Summary keys behind the columns (per set and method in `sets.SET.METHOD`): `coverage68`, "
        "`coverage95` and their `_footprint` forms, each with the exact-sampler level for the same number of "
        "samples in `coverage68_ref`, `coverage95_ref` (and `_footprint_ref`); `truth_chi2_median`, "
        "`truth_chi2_arc_median`: the truths' own median chi2_nu over the image and in the arc under the "
        "inference operator; `tarp_max_dev`, `tarp_p_value`, `tarp_null_p95`; `chi2_median`, "
        "`chi2_arc_median`; `sharpness`, `mean_err`; `logz` (per observation: `elbo`, `elbo_se`, `iw`).",
    ]


def write_results_page(cal_dir, out_path, *, command: str, title: str) -> None:
    """Render ``out_path`` (e.g. ``docs/results/lensing.md``) with its figures and summary JSONs copied
    into ``out_path``'s stem directory beside it."""
    out_path = Path(out_path)
    assets = out_path.parent / out_path.stem
    summaries = sorted(Path(cal_dir).rglob("summary.json"))
    copied = []
    for f in summaries:
        rel = f.relative_to(cal_dir)
        name = "summary.json" if rel.parent == Path(".") else f"summary_{'_'.join(rel.parent.parts)}.json"
        copied.append(assets / name)
    doc = build_report(cal_dir, out_path, title=title, asset_dir=assets,
                       preamble=results_page_preamble(cal_dir, out_path, command))
    for f, dst in zip(summaries, copied):
        _copy_atomic(f, dst)
    # the preamble names the copies, not the results/ originals
    rels = {os.path.relpath(f.resolve(), out_path.resolve().parent): os.path.relpath(d.resolve(), out_path.resolve().parent)
            for f, d in zip(summaries, copied)}
    text = doc.markdown()
    for a, b in rels.items():
        text = text.replace(f"`{a}`", f"`{b}`")
    _write_atomic(out_path, text)


def run(args) -> int:
    out = Path(args.out)
    if out.suffix.lower() not in (".md", ".markdown"):
        raise PipelineError(f"--out {out}: the report is markdown (.md); use --html for HTML")
    if args.results_page:
        command = args.command or "python -m pipeline " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        write_results_page(args.calibration, out, title=args.title, command=command)
        log.info("wrote %s", out)
        return 0
    doc = build_report(args.calibration, out, figures=args.figures, sections=args.sections, title=args.title)
    _write_atomic(out, doc.markdown())
    if args.html:
        hp = Path(args.html)
        if hp.resolve().parent != out.resolve().parent:
            # image paths are relative to the markdown's directory
            doc = build_report(args.calibration, hp, figures=args.figures, sections=args.sections, title=args.title)
        _write_atomic(hp, doc.html(args.title))
    log.info("wrote %s", out)
    return 0
