"""The calibration report: tables and sentences from the calibration summaries.

Reads every ``summary.json`` below a calibration directory (one per set, as
:func:`pipeline.evaluation.calibration.run_calibration` writes them; later files override earlier
ones for the same set and method), and builds the results table (methods x sets) with every
coverage beside the level an exact sampler reaches with the same number of samples, the truths' own
chi2 per set, TARP against its exact-sampler null (methods are not ranked against each other by
TARP), how many observations each method's posterior predictive check flagged, the acceptance checks on
the prior-drawn set, and the figures, linked relative to the report
so the report directory can be moved together with ``results/``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from pipeline.errors import InputFileError
from pipeline.evaluation.acceptance import (CHI2_RANGE, COVERAGE_CONFIDENCE, HELDOUT_CHI2, acceptance,
                                            coverage_threshold, heldout_acceptance, paired_difference, tarp_ok)
from pipeline.evaluation.comparison import INVERSION_NOTE, inversion_paragraph
from pipeline.evaluation.doc import Doc
from pipeline.io.atomic import atomic_file, write_text
from pipeline.metrics.coverage import exact_coverage_level


COLUMNS = ["set", "method", "n_obs", "n_samples", "TARP max dev", "p (exact null)", "null p95", "TARP ok",
           "cov68 (exact)", "cov95 (exact)", "cov68 fp (exact)", "cov95 fp (exact)", "chi2_nu med",
           "chi2_nu arc med", "PPC flagged", "sharpness", "mean err", "log Z ELBO med", "log Z IW med",
           "sampling s"]

COLUMN_NOTES = (
    "Columns: TARP max dev = max|ECP - alpha| over the fixed alpha grid; p (exact null) = the fraction of "
    "exactly calibrated posteriors of the same size (observations, samples, bins) whose statistic is at least "
    "as large; null p95 = its 95th percentile; TARP ok = max dev <= null p95. cov68/cov95 = rank-based "
    "per-pixel central-interval coverage over all source pixels, 'fp' inside the footprint (pixels where the "
    "pooled mean of the truth and the samples exceeds {frac} x its peak, a rule symmetric in truth and "
    "samples); in brackets the level an exact sampler reaches with the same number of samples under the "
    "same rank rule ({exact_example}, not 0.68 and 0.95). chi2_nu = "
    "sum((y - A(x_s))/sigma)^2 / nu per posterior sample with nu = unmasked image pixels (median over samples "
    "and observations; 'arc' = pixels where the sample's own noiseless model exceeds sigma); compare it with "
    "the truths' own chi2_nu on the same set (below the set's description), the level exact samples reach. "
    "PPC flagged = observations whose posterior predictive check (run by `sample`, the files' PPCWARN) finds "
    "the median chi2 outside the 99.9 % band of exact samples, over the image or in the arc, of those checked "
    "(docs/posterior-files.md). "
    "sharpness = RMS posterior std / RMS prior std and mean err = RMS(posterior mean - truth) per observation, "
    "averaged, both from the equally weighted returned samples (1 = nothing learnt from y; a sampler that "
    "ignores y passes TARP and coverage, so read them together); log Z = median over observations of the "
    "ELBO and of the importance-weighted estimate, n/a where a method has none; sampling s = total sampling "
    "wall time of the set.")

def exact_level_example(n: int) -> str:
    """'for n samples k/(n+1) = ... and ...': the exact-sampler levels of the 68 and 95 % intervals at n."""
    parts = []
    for level in (0.68, 0.95):
        v = exact_coverage_level(n, level)
        parts.append(f"{round(v * (n + 1))}/{n + 1} = {v:.3f}")
    return f"for {n} samples " + " and ".join(parts)


KIND_COLUMNS = ["set", "method", "kind", "n_obs", "chi2_nu med (truths)", "chi2_nu arc med (truths)", "mean err",
                "cov68 (exact)", "cov95 (exact)"]

KIND_NOTE = (
    "Held-out observations are rendered from sources drawn at a finer scale than the inference grid "
    "(`simulate --fine-factor`), so the truths' own chi2_nu (in brackets) exceeds 1 where the source "
    "has structure the inference grid and operator cannot represent; read each method's chi2 against it.")

SNR_COLUMNS = ["set", "method", "data SNR", "n_obs", "cov68 (exact)", "cov95 (exact)", "chi2_nu arc med (truths)"]

SNR_NOTE = (
    "Observations sorted by the signal-to-noise of their data, sqrt(max(sum (y/sigma)^2 - m, 0)) over the m "
    "unmasked pixels, and split into quartiles; coverage is the mean of the quartile's per-observation "
    "coverages. The pooled coverage can meet the exact level while the quartiles sit on either side of it. "
    "The grouping uses the data only: grouped by a property of the truth (such as the noiseless image's "
    "peak), even exact samples cover less than the exact level in the outer groups and more in the middle.")

CONDITIONAL_NOTE = (
    "Posteriors are **conditional on the given lens model** (mass model, PSF, noise map and mask are "
    "taken as known). SCI must be lens-light-subtracted (or carry a lens-light HDU) and its noise "
    "uncorrelated between pixels.")


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
def fmt(v, nd=3):
    """A table cell: n/a for None, yes/no for bools, ``nd`` significant decimals for floats."""
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return f"{v:.{nd}g}" if (v != 0 and abs(v) < 1e-3) or abs(v) >= 1e4 else f"{v:.{nd}f}"
    return str(v)


def logz_median(logz, key: str) -> str:
    """Median of ``key`` over the observations' log Z entries and how many had one, e.g. ``-2.0 (2/3)``;
    n/a when none has it."""
    vals = sorted(e[key] for e in (logz or []) if e and e.get(key) is not None)
    if not vals:
        return "n/a"
    n = len(vals)
    mid = vals[n // 2] if n % 2 else 0.5 * (vals[n // 2 - 1] + vals[n // 2])
    return f"{mid:.1f} ({n}/{len(logz)})"


def logz_summary(logz) -> str:
    """Median ELBO log Z over observations (and how many had one), or n/a."""
    return logz_median(logz, "elbo")


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


def coverage_cell(r: dict, key: str) -> str:
    """A coverage value beside the level an exact sampler reaches with the same number of samples
    (``KEY_ref`` in the summary), e.g. ``0.761 (0.697)``."""
    v, ref = r.get(key), r.get(key + "_ref")
    if ref is None and key.endswith("_footprint"):
        ref = r.get(key[: -len("_footprint")] + "_ref")
    return fmt(v) if ref is None else f"{fmt(v)} ({fmt(ref)})"


def truth_chi2(sets_methods: dict) -> tuple:
    """The truths' own median chi2_nu over the image and in the arc on a set (the level exact
    posterior samples reach), from any method entry that carries it; (None, None) when absent."""
    for r in sets_methods.values():
        if r.get("truth_chi2_median") is not None:
            return r["truth_chi2_median"], r.get("truth_chi2_arc_median")
    return None, None


def ppc_cell(r: dict) -> str:
    """'flagged/checked' observations of the posterior predictive check, n/a when none was checked."""
    if not r.get("ppc_checked"):
        return "n/a"
    return f"{r['ppc_flagged']}/{r['ppc_checked']}"


def results_row(s: str, m: str, r: dict) -> list:
    """One row of the results table (:data:`COLUMNS`) for method ``m`` on set ``s``."""
    return [s, m, r.get("n_obs"), r.get("n_samples"), fmt(r.get("tarp_max_dev")), fmt(r.get("tarp_p_value")),
            fmt(r.get("tarp_null_p95")), fmt(tarp_ok(r)),
            coverage_cell(r, "coverage68"), coverage_cell(r, "coverage95"),
            coverage_cell(r, "coverage68_footprint"), coverage_cell(r, "coverage95_footprint"),
            fmt(r.get("chi2_median")), fmt(r.get("chi2_arc_median")), ppc_cell(r), fmt(r.get("sharpness")),
            fmt(r.get("mean_err")), logz_median(r.get("logz"), "elbo"), logz_median(r.get("logz"), "iw"),
            "n/a" if r.get("seconds") is None else f"{r['seconds']:.1f}"]


def kind_rows(sets: dict, set_order: list) -> list:
    """Rows of the per-source-kind table (:data:`KIND_COLUMNS`), chi2 beside the truths' own."""
    rows = []
    for s in set_order:
        for m in sorted(sets[s]):
            r = sets[s][m]
            for kind, k in sorted(r.get("per_kind", {}).items()):
                rows.append([s, m, kind, k.get("n_obs"),
                             f"{fmt(k.get('chi2_median'))} ({fmt(k.get('truth_chi2_median'))})",
                             f"{fmt(k.get('chi2_arc_median'))} ({fmt(k.get('truth_chi2_arc_median'))})",
                             fmt(k.get("mean_err")),
                             coverage_cell({**k, "coverage68_ref": r.get("coverage68_ref")}, "coverage68"),
                             coverage_cell({**k, "coverage95_ref": r.get("coverage95_ref")}, "coverage95")])
    return rows


def snr_rows(sets: dict, set_order: list) -> list:
    """Rows of the per-data-SNR-quartile table (:data:`SNR_COLUMNS`), coverage beside the exact level."""
    rows = []
    for s in set_order:
        for m in sorted(sets[s]):
            r = sets[s][m]
            for g in r.get("per_data_snr", []):
                rows.append([s, m, f"{g['snr_min']:.1f}-{g['snr_max']:.1f}", g["n_obs"],
                             coverage_cell({**g, "coverage68_ref": r.get("coverage68_ref")}, "coverage68"),
                             coverage_cell({**g, "coverage95_ref": r.get("coverage95_ref")}, "coverage95"),
                             f"{fmt(g.get('chi2_arc_median'))} ({fmt(g.get('truth_chi2_arc_median'))})"])
    return rows


def set_paragraph(s: str, methods: dict, st: dict) -> str:
    """The description of set ``s``: sizes, TARP null and the truths' own chi2_nu (``st``: its settings)."""
    any_r = next(iter(methods.values()))
    tc, tca = truth_chi2(methods)
    truth_part = ("" if tc is None else
                  f" The truths' own chi2_nu under the inference operator (median over observations): "
                  f"**{fmt(tc)}** over the image, **{fmt(tca)}** in the arc.")
    return (f"Set **{s}**: {any_r['n_obs']} observations, {any_r['n_samples']} posterior samples per "
            f"observation and method, TARP with {any_r['n_alpha_bins']} fixed alpha bins "
            f"(null distribution of max|ECP - alpha| for exactly calibrated posteriors of the same size: "
            f"{st.get('n_null', 'n/a')} draws, {st.get('null_method', 'n/a')}; coordinates normalised "
            f"by the {st.get('tarp_norm', 'pooled')} min/max).{truth_part}")


# -------------------------------------------------------------------------------------- writing
def copy_atomic(src: Path, dst: Path) -> None:
    """Copy ``src`` to ``dst`` through a temporary file (readers never see a partial copy)."""
    with atomic_file(dst) as tmp:
        shutil.copyfile(src, tmp)


def _add_tarp_and_acceptance(doc: Doc, sets: dict, set_order: list) -> None:
    doc.h(2, "TARP")
    for s in set_order:
        doc.p(f"**{s}**: {tarp_sentence(sets[s])}")
    if "prior" in sets:
        _add_prior_acceptance(doc, sets["prior"])
    if "heldout" in sets:
        _add_heldout_acceptance(doc, sets["heldout"])


def _add_prior_acceptance(doc: Doc, prior: dict) -> None:
    methods = sorted(m for m in prior if not prior[m].get("baseline"))
    if not methods:
        return
    doc.h(2, "Acceptance on the prior-drawn set")
    lo, hi = CHI2_RANGE
    for m in methods:
        r = prior[m]
        a = acceptance(r)
        doc.p(f"`{m}`: TARP max dev <= null p95: **{fmt(a['tarp'])}**; median chi2_nu (image and arc) in "
              f"[{lo}, {hi}]: **{fmt(a['chi2'])}**; 68 / 95 % pixel coverage within "
              f"{coverage_threshold(r.get('n_obs') or 1):.2f} standard errors of the exact-sampler level: "
              f"**{fmt(a['coverage'])}** (z = {fmt(r.get('coverage68_z'), 2)} / {fmt(r.get('coverage95_z'), 2)}; "
              f"in the footprint {fmt(r.get('coverage68_footprint_z'), 2)} / "
              f"{fmt(r.get('coverage95_footprint_z'), 2)}).")
    doc.p(f"The coverage's standard error comes from the spread of the per-observation coverages (pixels of "
          f"one source are correlated; observations are independent); the bound is Student's t at "
          f"{COVERAGE_CONFIDENCE:.0%} two-sided with n_obs - 1 degrees of freedom. Per-observation coverages "
          f"are skewed, so exact samples exceed it somewhat more often than 1 %: 1.5-3 % per level in sets of "
          f"64 observations of correlated Gaussian posteriors (tests/metrics/test_coverage.py).")
    if any(prior[m].get("n_obs", 0) < 100 for m in methods):
        doc.p("With fewer than ~100 observations TARP is weak (its null band is wide); chi2 carries the "
              "acceptance and TARP is reported with its null distribution.")


def _paired(r: dict, b: dict) -> str:
    pd = paired_difference(r, b)
    return "" if pd is None else f"; paired difference {pd[0]:+.3g} +- {pd[1]:.2g} over {pd[2]}"


def _add_heldout_acceptance(doc: Doc, methods: dict) -> None:
    lo, floor, factor = HELDOUT_CHI2
    baselines = {m: r for m, r in methods.items() if r.get("baseline")}
    judged = sorted(set(methods) - set(baselines))
    if not judged:
        return
    doc.h(2, "Acceptance on the held-out set")
    for m in judged:
        r = methods[m]
        a = heldout_acceptance(r, baselines)
        rms = ("" if a["rms"] is None else
               f"; RMS error of the posterior mean ({fmt(r.get('mean_err'))}) below the baselines' ("
               + ", ".join(f"{b} {fmt(baselines[b].get('mean_err'))}{_paired(r, baselines[b])}"
                           for b in sorted(baselines))
               + f"): **{fmt(a['rms'])}**")
        doc.p(f"`{m}`: median chi2_nu (image and arc) >= {lo} and <= max({floor}, {factor} x the truths' "
              f"own): **{fmt(a['chi2'])}**; TARP max dev <= null p95: **{fmt(a['tarp'])}**{rms}.")


def _add_figures(doc: Doc, figs: dict, set_order: list, extra_figures, link) -> None:
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
    for p in extra_figures:
        if not Path(p).is_file():
            raise InputFileError(p, "figure not found", "--figures")
        doc.h(3, Path(p).stem)
        doc.img(link(p), Path(p).stem)


def build_report(cal_dir, out_path, *, figures=(), sections=(), title="Calibration report",
                 asset_dir=None, preamble=()) -> Doc:
    """The report as a :class:`Doc`. Figures are linked relative to ``out_path``'s directory; with
    ``asset_dir`` they are first copied there (so a page under ``docs/`` does not point into
    ``results/``). ``preamble``: paragraphs placed under the title (provenance); ``sections``:
    markdown files appended at the end."""
    sets, figs, settings, _roots = load_summaries(cal_dir)
    out_dir = Path(out_path).resolve().parent

    def link(p):
        p = Path(p)
        if asset_dir is not None:
            target = Path(asset_dir) / p.name
            copy_atomic(p, target)
            p = target
        return os.path.relpath(p.resolve(), out_dir)

    doc = Doc()
    doc.h(1, title)
    for para in preamble:
        doc.p(para)
    doc.p(CONDITIONAL_NOTE)
    set_order = ([s for s in ("prior", "heldout") if s in sets]
                 + sorted(s for s in sets if s not in ("prior", "heldout")))
    for s in set_order:
        doc.p(set_paragraph(s, sets[s], settings.get(s, {})))
    doc.h(2, "Results")
    doc.table(COLUMNS, [results_row(s, m, sets[s][m]) for s in set_order for m in sorted(sets[s])])
    n_samples = next((r.get("n_samples") for s in set_order for r in sets[s].values() if r.get("n_samples")), 32)
    doc.p(COLUMN_NOTES.format(frac=fmt(next(iter(settings.values()), {}).get("footprint_frac", 0.1)),
                              exact_example=exact_level_example(int(n_samples))))
    paragraphs = [p for p in (inversion_paragraph(s, sets[s]) for s in set_order) if p]
    if paragraphs:
        doc.h(2, "The regularised inversion beside RTB")
        for para in paragraphs:
            doc.p(para)
        doc.p(INVERSION_NOTE)
    rows = kind_rows(sets, set_order)
    if rows:
        doc.h(2, "Per source kind")
        doc.table(KIND_COLUMNS, rows)
        doc.p(KIND_NOTE)
    rows = snr_rows(sets, set_order)
    if rows:
        doc.h(2, "By signal-to-noise of the data")
        doc.table(SNR_COLUMNS, rows)
        doc.p(SNR_NOTE)
    _add_tarp_and_acceptance(doc, sets, set_order)
    _add_figures(doc, figs, set_order, figures, link)
    for sec in sections:
        sp = Path(sec)
        if not sp.is_file():
            raise InputFileError(sp, "section file not found", "--sections")
        doc.raw_md(sp.read_text())
    return doc


def write_report(cal_dir, out_path, *, figures=(), sections=(), title="Calibration report",
                 html_path=None) -> None:
    """Write the markdown report ``out_path`` and, with ``html_path``, its HTML form (built again
    when it lies in another directory, since image links are relative to the page)."""
    out_path = Path(out_path)
    doc = build_report(cal_dir, out_path, figures=figures, sections=sections, title=title)
    write_text(out_path, doc.markdown())
    if html_path:
        hp = Path(html_path)
        if hp.resolve().parent != out_path.resolve().parent:
            doc = build_report(cal_dir, hp, figures=figures, sections=sections, title=title)
        write_text(hp, doc.html(title))
