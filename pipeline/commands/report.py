"""``python -m pipeline report``: the markdown (and optional HTML) report of the calibration.

Reads every ``summary.json`` below ``--calibration`` (one per set, as ``calibrate`` writes them;
later files override earlier ones for the same set and method), and writes the results table
(methods x sets), the acceptance checks of issue 5, the TARP ranking rule (methods whose bootstrap
intervals of max|ECP - alpha| overlap are not ranked), and the figures, linked relative to the
report so the report directory can be moved together with ``results/``.
"""

from __future__ import annotations

import html
import json
import logging
import os
from pathlib import Path

from pipeline.errors import InputFileError, PipelineError

log = logging.getLogger(__name__)

CHI2_RANGE = (0.8, 1.25)  # issue 5 acceptance band for the median chi2_nu (image and arc)


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


def tarp_ranking(methods: dict) -> tuple[list[list[str]], str]:
    """Order methods by tarp_max_dev, but only where their bootstrap intervals are disjoint.

    Methods are grouped into tiers: a method joins the current tier when its interval overlaps the
    interval of any method already in it. Returns (tiers, sentence)."""
    items = [(m, r["tarp_max_dev"], r.get("tarp_max_dev_ci")) for m, r in methods.items()
             if r.get("tarp_max_dev") is not None and r.get("tarp_max_dev_ci")]
    items.sort(key=lambda t: t[1])
    tiers: list[list[tuple]] = []
    for it in items:
        if tiers and any(it[2][0] <= other[2][1] and other[2][0] <= it[2][1] for other in tiers[-1]):
            tiers[-1].append(it)
        else:
            tiers.append([it])
    names = [[t[0] for t in tier] for tier in tiers]
    if len(items) < 2:
        return names, "fewer than two methods: no ranking."
    if len(names) == 1:
        return names, ("all methods' 95 % bootstrap intervals of max|ECP - alpha| overlap: "
                       "they are **not ranked** by TARP.")
    parts = [" = ".join(t) if len(t) == 1 else "{" + ", ".join(t) + "} (not ranked among themselves)"
             for t in names]
    return names, "TARP order (closest to calibrated first; tiers with disjoint intervals): " + " < ".join(parts) + "."


def acceptance(r: dict) -> dict:
    """Issue 5 checks for one method on the prior set."""
    tarp_ok = (r.get("tarp_max_dev") is not None and r.get("tarp_null_p95") is not None
               and r["tarp_max_dev"] <= r["tarp_null_p95"])
    lo, hi = CHI2_RANGE
    chi_ok = all(r.get(k) is not None and lo <= r[k] <= hi for k in ("chi2_median", "chi2_arc_median"))
    return {"tarp": tarp_ok, "chi2": chi_ok}


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


COLUMNS = ["set", "method", "n_obs", "n_samples", "TARP max dev [95% CI]", "null p95", "TARP ok",
           "cov68", "cov95", "cov68 fp", "cov95 fp", "chi2_nu med", "chi2_nu arc med", "sharpness",
           "mean err", "log Z (ELBO, med)", "sampling s"]


def build_report(cal_dir, out_path, *, figures=(), sections=(), title="Calibration report") -> Doc:
    sets, figs, settings, _roots = load_summaries(cal_dir)
    out_dir = Path(out_path).resolve().parent

    def rel(p):
        return os.path.relpath(Path(p).resolve(), out_dir)

    doc = Doc()
    doc.h(1, title)
    doc.p("Posteriors are **conditional on the given lens model** (mass model, PSF, noise map and mask are "
          "taken as known). SCI must be lens-light-subtracted (or carry a lens-light HDU) and its noise "
          "uncorrelated between pixels.")
    set_order = [s for s in ("prior", "heldout") if s in sets] + sorted(s for s in sets if s not in ("prior", "heldout"))
    for s in set_order:
        any_r = next(iter(sets[s].values()))
        doc.p(f"Set **{s}**: {any_r['n_obs']} observations, {any_r['n_samples']} posterior samples per "
              f"observation and method, TARP with {any_r['n_alpha_bins']} fixed alpha bins "
              f"(null distribution of max|ECP - alpha| for exactly calibrated posteriors of the same size: "
              f"{settings.get(s, {}).get('n_null', 'n/a')} draws, {settings.get(s, {}).get('null_method', 'n/a')}; bands are 95 % bootstrap intervals over observations; coordinates normalised "
              f"by the {settings.get(s, {}).get('tarp_norm', 'pooled')} min/max).")
    doc.h(2, "Results")
    rows = []
    for s in set_order:
        for m in sorted(sets[s]):
            r = sets[s][m]
            ci = r.get("tarp_max_dev_ci") or [None, None]
            acc = acceptance(r)
            rows.append([s, m, r.get("n_obs"), r.get("n_samples"),
                         f"{_fmt(r.get('tarp_max_dev'))} [{_fmt(ci[0])}, {_fmt(ci[1])}]", _fmt(r.get("tarp_null_p95")),
                         _fmt(acc["tarp"]), _fmt(r.get("coverage68")), _fmt(r.get("coverage95")),
                         _fmt(r.get("coverage68_footprint")), _fmt(r.get("coverage95_footprint")),
                         _fmt(r.get("chi2_median")), _fmt(r.get("chi2_arc_median")), _fmt(r.get("sharpness")),
                         _fmt(r.get("mean_err")), logz_summary(r.get("logz")), "n/a" if r.get("seconds") is None else f"{r['seconds']:.1f}"])
    doc.table(COLUMNS, rows)
    doc.p("Columns: TARP max dev = max|ECP - alpha| over the alpha grid (its 95 % bootstrap interval in brackets); "
          "null p95 = 95th percentile of the same statistic for exactly calibrated posteriors with this many "
          "observations and samples; cov68/cov95 = rank-based per-pixel central-interval coverage over all source "
          "pixels, 'fp' inside the truth's footprint (truth > "
          f"{_fmt(next(iter(settings.values()), {}).get('footprint_frac', 0.1))} x its peak); chi2_nu = "
          "sum((y - A(x_s))/sigma)^2 / nu per posterior sample with nu = unmasked image pixels (median over samples "
          "and observations; 'arc' = pixels where the sample's own noiseless model exceeds sigma), 1 for exact "
          "posteriors; sharpness = RMS posterior std / RMS prior std (1 = nothing learnt from y; a sampler that "
          "ignores y passes TARP and coverage, so read them together); mean err = RMS(posterior mean - truth) per "
          "observation, averaged; log Z = median over observations of the ELBO estimate (how many had one), "
          "n/a for particle methods; sampling s = total sampling wall time of the set.")
    doc.h(2, "Ranking rule")
    for s in set_order:
        _tiers, sentence = tarp_ranking(sets[s])
        doc.p(f"**{s}**: {sentence}")
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
            doc.img(rel(f["coverage"]), f"coverage {s}")
        for m, pngs in sorted(f.get("lenses", {}).items()):
            for p in pngs[:1]:
                doc.h(3, f"{m}, {s} set: {Path(p).stem}")
                doc.img(rel(p), f"{m} {s}")
    for p in figures:
        if not Path(p).is_file():
            raise InputFileError(p, "figure not found", "--figures")
        doc.h(3, Path(p).stem)
        doc.img(rel(p), Path(p).stem)
    for sec in sections:
        sp = Path(sec)
        if not sp.is_file():
            raise InputFileError(sp, "section file not found", "--sections")
        doc.raw_md(sp.read_text())
    return doc


def run(args) -> int:
    out = Path(args.out)
    if out.suffix.lower() not in (".md", ".markdown"):
        raise PipelineError(f"--out {out}: the report is markdown (.md); use --html for HTML")
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
