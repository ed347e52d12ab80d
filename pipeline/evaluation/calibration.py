"""Calibration of posterior samplers on one observation set.

For every method (one posterior FITS per observation, :mod:`pipeline.io.posterior`) it computes
TARP expected coverage with bootstrap bands, the null distribution of max|ECP - alpha| for the
same (n_obs, n_samples, alpha bins) and the p-value of the observed value under it, rank-based
per-pixel 68 %/95 % interval coverage (all pixels and inside the footprint of the pooled mean of
truth and samples) beside the level an exact sampler reaches with the same number of samples,
chi2_nu per sample over the image and inside the arc (and the truth's own chi2_nu as its
reference), sharpness (posterior std / prior std) and the posterior-mean error [source units]
from the equally weighted samples, log Z per observation, how many observations the sampler's posterior
predictive check flagged (the files' ``PPCWARN``), and the figures. For a method that inferred the lens
(``LENSSAMP`` in its files) the summary adds ``lens``: per-parameter coverage against the exact sampler's
bands, bias and TARP over the lens parameters (:mod:`pipeline.metrics.lens_calibration`), against the
true lens in each observation's keywords.

Output: ``OUT/summary.json`` = ``{"sets": {SET: {METHOD: {...metrics...}}}, "figures": {SET: {...}},
"settings": {SET: {...}}, "truth_chi2": {SET: {...}}}``; with ``merge`` an existing
``OUT/summary.json`` keeps its other sets (one job at a time: the read-modify-write is not safe under
concurrent jobs). Figures: ``OUT/coverage_SET.png`` and ``OUT/lenses/SET_METHOD_OBS.png``.
"""

from __future__ import annotations

import json
import logging
import time
import zlib
from pathlib import Path

import numpy as np

from pipeline.errors import InputFileError, PipelineError
from pipeline.evaluation.groups import SNR_GROUPS, median_or_none, per_kind_summary, snr_groups
from pipeline.evaluation.records import (default_loader, drop_truthless, expand_posteriors, figure_pairs,
                                         load_prior_samples, read_records, score_observations)
from pipeline.io.atomic import write_json
from pipeline.lensing.critical import curves_from_header
from pipeline.metrics.coverage import (coverage_z, exact_coverage_curve, exact_coverage_level, footprint,
                                       interval_coverage)
from pipeline.metrics.lens_calibration import lens_calibration
from pipeline.metrics.sharpness import mean_error, prior_std_map, sample_moments, sharpness
from pipeline.metrics.tarp import null_distribution, tarp_summary
from pipeline.plots import plot_coverage, plot_lens

log = logging.getLogger(__name__)

# nominal levels of the per-pixel coverage curve (0.68 and 0.95 are the reported ones)
PIXEL_LEVELS = sorted({round(float(c), 2) for c in np.linspace(0.05, 0.95, 19)} | {0.68, 0.95})


def nan_to_none(obj):
    """``obj`` with non-finite floats replaced by None (recursively; numpy scalars become Python)."""
    if isinstance(obj, float):
        return obj if np.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [nan_to_none(v) for v in obj]
    if isinstance(obj, np.generic):
        return nan_to_none(obj.item())
    return obj


# ---------------------------------------------------------------------------------------- metrics
def evaluate_method(records: list[dict], *, prior_std, n_bins: int, rng: np.random.Generator,
                    n_boot: int, null, footprint_frac: float, tarp_norm: str = "pooled") -> dict:
    """Metrics of one method on one set. ``records``: per observation, dicts with samples
    (n_s, ny, nx), truth, chi2 (dict from chi2_per_sample or None), truth_chi2 (the truth's own
    chi2_nu and chi2_arc_nu as floats, or None), logz, seconds, obs.

    Every metric is computed from the equally weighted samples (a file's MEAN/STD are not read):
    coverage beside ``exact_coverage_level(n_s, level)`` (keys ``*_ref``), mean error [source units]
    and sharpness (dimensionless) from the samples' mean and std (ddof 1)."""
    samples = np.stack([r["samples"] for r in records])
    truths = np.stack([r["truth"] for r in records])
    n_obs, n_s = samples.shape[:2]
    t = tarp_summary(samples.reshape(n_obs, n_s, -1), truths.reshape(n_obs, -1), n_bins=n_bins, rng=rng,
                     n_boot=n_boot, null=null, norm=tarp_norm)
    fp = footprint(truths, footprint_frac, samples=samples)
    cov = interval_coverage(samples, truths, levels=PIXEL_LEVELS)
    cov_fp = interval_coverage(samples, truths, levels=PIXEL_LEVELS, mask=fp)
    t["pixel_curve"] = {"levels": PIXEL_LEVELS, "all": [cov[c] for c in PIXEL_LEVELS],
                        "footprint": [cov_fp[c] for c in PIXEL_LEVELS],
                        "ref": exact_coverage_curve(n_s, PIXEL_LEVELS).tolist()}
    means, stds = sample_moments(samples)
    err = mean_error(means, truths)
    se_fields, obs_coverage = _coverage_se_fields(samples, truths, fp)
    out = {
        "n_obs": int(n_obs), "n_samples": int(n_s), "n_alpha_bins": int(n_bins),
        "baseline": any(r.get("label") for r in records),
        **{k: t[k] for k in ("tarp_max_dev", "tarp_p_value", "tarp_null_p50", "tarp_null_p95")},
        **_coverage_fields(cov, cov_fp, n_s),
        **se_fields,
        "footprint_frac": footprint_frac, "footprint_pixels": int(fp.sum()),
        **_chi2_fields(records),
        **_ppc_fields(records),
        "sharpness": None, "mean_err": float(np.mean(err)), "mean_err_rel": None,
        "logz": [r["logz"] for r in records],
        "seconds": (float(np.sum([r["seconds"] for r in records]))
                    if all(r["seconds"] is not None for r in records) else None),
        "observations": [r["obs"] for r in records],
        "per_obs": {**_per_obs_fields(records, err), **obs_coverage},
        "tarp": {k: t[k] for k in ("alpha", "ecp", "ecp_band", "null_band", "f", "pixel_curve")},
    }
    if prior_std is not None:
        sh = sharpness(stds, prior_std)
        out["sharpness"] = float(np.median(sh))
        out["per_obs"]["sharpness"] = sh.tolist()
        out["mean_err_rel"] = float(np.mean(err) / np.sqrt(np.mean(np.asarray(prior_std, float) ** 2)))
    kinds = [r.get("kind") for r in records]
    if any(k is not None for k in kinds):
        out["per_kind"] = per_kind_summary(kinds, out["per_obs"], samples, truths)
    snr = [r.get("data_snr") for r in records]
    if len(snr) >= SNR_GROUPS and all(v is not None for v in snr):
        out["per_data_snr"] = snr_groups(out["per_obs"], snr)
    lens = lens_arrays(records)
    if lens is not None:
        out["lens"] = lens_calibration(*lens, rng=rng, n_bins=n_bins)
    return out


def lens_arrays(records: list[dict]):
    """(samples (n_obs, S, p), truths (n_obs, p), names) of the lens parameters of records whose
    posterior inferred the lens and whose observation states the true lens; None when none did.
    Records without a true lens are left out with a warning."""
    recs = [r for r in records if r.get("lens_samples") is not None]
    if not recs:
        return None
    names = recs[0]["lens_samples"]["names"]
    kept = []
    for r in recs:
        if r["lens_samples"]["names"] != names:
            raise InputFileError(r["file"], f"lens parameters {r['lens_samples']['names']} differ from {names}",
                                 "LENSSAMP")
        if len(r["lens_samples"]["samples"]) != len(recs[0]["lens_samples"]["samples"]):
            raise InputFileError(r["file"], f"{len(r['lens_samples']['samples'])} lens samples, the set's first "
                                 f"file has {len(recs[0]['lens_samples']['samples'])}", "LENSSAMP")
        if r.get("lens_truth") is None:
            log.warning("%s: its observation has no lens keywords: left out of the lens calibration", r["file"])
            continue
        kept.append(r)
    if not kept:
        return None
    samples = np.stack([r["lens_samples"]["samples"] for r in kept])
    truths = np.array([[float(getattr(r["lens_truth"], k)) for k in names] for r in kept])
    return samples, truths, names


def _coverage_fields(cov: dict, cov_fp: dict, n_s: int) -> dict:
    ref68, ref95 = exact_coverage_level(n_s, 0.68), exact_coverage_level(n_s, 0.95)
    return {"coverage68": cov[0.68], "coverage95": cov[0.95], "coverage68_ref": ref68, "coverage95_ref": ref95,
            "coverage68_footprint": cov_fp[0.68], "coverage95_footprint": cov_fp[0.95],
            "coverage68_footprint_ref": ref68, "coverage95_footprint_ref": ref95}


def _coverage_se_fields(samples: np.ndarray, truths: np.ndarray, fp: np.ndarray) -> tuple[dict, dict]:
    """Standard error of each pooled coverage from the spread between observations and
    z = (coverage - exact level) / se (:func:`pipeline.metrics.coverage.coverage_z`; None with one
    observation), keys ``coverage68_se``, ``coverage68_z``, ``coverage68_footprint_se``, ...; and each
    observation's own 68 / 95 % coverage over all pixels (off on every observation, or on a few?)."""
    out, per_obs = {}, {}
    for level, name in ((0.68, "coverage68"), (0.95, "coverage95")):
        for suffix, mask in (("", None), ("_footprint", fp)):
            r = coverage_z(samples, truths, level, mask=mask)
            out[f"{name}{suffix}_se"] = r["se"] if np.isfinite(r["se"]) else None
            out[f"{name}{suffix}_z"] = r["z"]
            if mask is None:
                per_obs[name] = r["per_obs"].tolist()
    return out, per_obs


def _chi2_fields(records: list[dict]) -> dict:
    """Medians over samples and observations of chi2_nu (image, arc) and of the truths' own."""
    chis = [r["chi2"] for r in records if r.get("chi2") is not None]
    chi_all = np.concatenate([c["chi2_nu"] for c in chis]) if chis else np.array([])
    chi_arc = np.concatenate([c["chi2_arc_nu"] for c in chis]) if chis else np.array([])
    truth_chi = [r.get("truth_chi2") or {} for r in records]
    return {
        "chi2_median": float(np.median(chi_all)) if chi_all.size else None,
        "chi2_arc_median": float(np.nanmedian(chi_arc)) if np.isfinite(chi_arc).any() else None,
        "chi2_n_obs": len(chis),
        "truth_chi2_median": median_or_none([c.get("chi2_nu") for c in truth_chi]),
        "truth_chi2_arc_median": median_or_none([c.get("chi2_arc_nu") for c in truth_chi], nan_ok=True),
    }


def _ppc_fields(records: list[dict]) -> dict:
    """How many observations the sampler's posterior predictive check flagged (``PPCWARN`` of the files,
    :mod:`pipeline.metrics.ppc`) out of those checked; ``ppc_flagged`` is None when no file carries a check."""
    checked = [r["ppc"]["flag"] for r in records if r.get("ppc") is not None]
    return {"ppc_flagged": int(sum(checked)) if checked else None, "ppc_checked": len(checked)}


def _per_obs_fields(records: list[dict], err: np.ndarray) -> dict:
    truth_chi = [r.get("truth_chi2") or {} for r in records]
    return {
        "mean_err": err.tolist(),
        "chi2_median": [float(np.median(r["chi2"]["chi2_nu"])) if r.get("chi2") else None for r in records],
        "chi2_arc_median": [float(np.nanmedian(r["chi2"]["chi2_arc_nu"]))
                            if r.get("chi2") and np.isfinite(r["chi2"]["chi2_arc_nu"]).any() else None
                            for r in records],
        "truth_chi2": [c.get("chi2_nu") for c in truth_chi],
        "truth_chi2_arc": [c.get("chi2_arc_nu") for c in truth_chi],
        "ppc_warn": [None if r.get("ppc") is None else r["ppc"]["flag"] for r in records],
    }


def truth_chi2_summary(by_method: dict) -> dict:
    """The truths' own chi2_nu under the inference operator, per set: one value per observation
    (the first record that has it), medians over observations. Exact posterior samples are
    exchangeable with the truth given y, so their chi2 medians should match these, not 1 exactly."""
    per_obs: dict[str, dict] = {}
    for recs in by_method.values():
        for r in recs:
            if r.get("truth_chi2") is not None and r["obs"] not in per_obs:
                per_obs[r["obs"]] = r["truth_chi2"]
    vals = list(per_obs.values())
    return {"truth_chi2_median": median_or_none([v["chi2_nu"] for v in vals]),
            "truth_chi2_arc_median": median_or_none([v["chi2_arc_nu"] for v in vals], nan_ok=True),
            "n_obs": len(vals)}


def prior_std_for(by_method: dict, set_name: str, prior_samples=None) -> tuple:
    """(per-pixel prior std [source units] or None, where it came from): from ``prior_samples``
    (see :func:`load_prior_samples`), else on the prior set from its >= 2 distinct truths."""
    if prior_samples:
        return prior_std_map(load_prior_samples(prior_samples)), str(prior_samples)
    if set_name == "prior":
        truths = {r["obs"]: r["truth"] for recs in by_method.values() for r in recs}
        if len(truths) >= 2:
            return prior_std_map(np.stack(list(truths.values()))), "truths of the prior set"
    return None, None


def equalise_sample_counts(method: str, recs: list[dict]) -> int:
    """Sort ``recs`` by observation and cut every record to the smallest sample count; returns it."""
    recs.sort(key=lambda r: r["obs"])
    n_s = min(r["samples"].shape[0] for r in recs)
    if n_s < 2:
        short = next(r for r in recs if r["samples"].shape[0] < 2)
        raise InputFileError(short["file"], "needs at least 2 samples for coverage and sharpness", "SAMPLES")
    if any(r["samples"].shape[0] != n_s for r in recs):
        log.warning("%s: sample counts differ between observations; using the first %d of each", method, n_s)
        for r in recs:
            r["samples"] = r["samples"][:n_s]
    return n_s


def evaluate_methods(by_method: dict, *, prior_std, n_bins: int, n_boot: int, n_null: int | None,
                     footprint_frac: float, tarp_norm: str, seed: int) -> tuple[dict, dict]:
    """:func:`evaluate_method` for every method (sorted); methods of the same size share one TARP null.
    Each method and each null draws from its own random stream, seeded by ``seed`` and the method's name
    (or the null's size), so a method's figures do not depend on which other methods are evaluated beside
    it. Returns (results, nulls by (n_obs, n_s, n_dims))."""
    nulls: dict[tuple, tuple] = {}
    results = {}
    for method, recs in sorted(by_method.items()):
        n_s = equalise_sample_counts(method, recs)
        key = (len(recs), n_s, int(np.prod(recs[0]["truth"].shape)))
        if key not in nulls:
            nulls[key] = null_distribution(key[0], key[1], key[2], n_bins=n_bins, rng=np.random.default_rng(
                [seed, *key]), norm=tarp_norm, n_sim=n_null)
        log.info("%s: %d observations x %d samples", method, len(recs), n_s)
        rng = np.random.default_rng([seed, zlib.crc32(method.encode())])
        results[method] = evaluate_method(recs, prior_std=prior_std, n_bins=n_bins, rng=rng, n_boot=n_boot,
                                          null=nulls[key], footprint_frac=footprint_frac, tarp_norm=tarp_norm)
    return results, nulls


# ---------------------------------------------------------------------------------------- figures
def plot_lens_figures(by_method: dict, figure_obs: set, set_name: str, out_dir: Path) -> dict:
    """``out_dir/lenses/SET_METHOD_OBS.png`` for the (method, observation) pairs in ``figure_obs``;
    returns {method: [paths relative to out_dir]}."""
    lens_pngs = {}
    for method, recs in sorted(by_method.items()):
        pngs = []
        for r in recs:
            if (method, r["obs"]) not in figure_obs:
                continue
            med = np.median(r["chi2"]["chi2_nu"]) if r["chi2"] is not None else None
            png = out_dir / "lenses" / f"{set_name}_{method}_{Path(r['obs']).stem}.png"
            curves = curves_from_header(r["lens_cards"], r["file"]) if r.get("lens_cards") else None
            critical, caustics = curves if curves is not None else (None, None)
            plot_lens(png, mean=r["mean"], std=r["std"], samples=r["samples"], truth=r["truth"], obs=r["obs_img"],
                      obs_pixscale=r["obs_pix"], model=r.get("model"), residual=r["residual"],
                      src_pixscale=r["src_pixscale"], critical=critical, caustics=caustics,
                      bunit=r.get("bunit", ""), image_bunit=r.get("data_unit", ""),
                      title=f"{set_name} set, {method}: {r['obs']}", chi2=med)
            pngs.append(str(png.relative_to(out_dir)))
        lens_pngs[method] = pngs
    return lens_pngs


def plot_set_coverage(results: dict, set_name: str, out_dir: Path) -> Path:
    """``out_dir/coverage_SET.png``: TARP and per-pixel coverage of every method."""
    keys = ("tarp_max_dev", "tarp_null_p95", "tarp_p_value", "n_obs", "n_samples", "n_alpha_bins")
    png = out_dir / f"coverage_{set_name}.png"
    plot_coverage(png, {m: {**r["tarp"], **{k: r[k] for k in keys}} for m, r in results.items()},
                  title=f"{set_name} set")
    return png


# ---------------------------------------------------------------------------------------- summary
def calibration_settings(*, n_bins: int, tarp_norm: str, n_boot: int, n_null: int, seed: int,
                         footprint_frac: float, prior_source, seconds: float) -> dict:
    """The ``settings.SET`` entry of the summary (``seconds``: wall time of the calibration [s])."""
    return {
        "n_alpha_bins": n_bins, "tarp_norm": tarp_norm, "n_boot": n_boot, "n_null": n_null,
        "null_method": ("Gaussian simulation" if tarp_norm == "truths" else
                        "exact rank law (uniform ranks; checked against Gaussian simulation in the tests)"),
        "seed": seed, "footprint_frac": footprint_frac,
        "footprint_rule": "pooled mean of truth and samples > footprint_frac x its peak, per observation",
        "coverage_reference": "exact_coverage_level(n_samples, level): rank uniform on {0..n}, mid-rank rule",
        "tarp_p_value": "fraction of null draws of max|ECP - alpha| >= the observed value",
        "pixel_levels": PIXEL_LEVELS, "tarp_band_percentiles": [2.5, 97.5], "prior_std_source": prior_source,
        "seconds_calibrate": round(seconds, 2),
    }


def write_summary(summary_path: Path, set_name: str, *, results: dict, truth_chi2: dict, figures: dict,
                  settings: dict, merge: bool) -> dict:
    """Write (with ``merge``: into the existing file, keeping its other sets) ``summary_path``;
    non-finite floats become null. Returns the summary as built (before that replacement)."""
    summary = {"sets": {}, "figures": {}, "settings": {}}
    if merge and summary_path.is_file():
        try:
            summary = json.loads(summary_path.read_text())
        except json.JSONDecodeError:
            raise InputFileError(summary_path, "existing summary is not valid JSON (remove it or drop --merge)")
    summary.setdefault("sets", {})[set_name] = results
    summary.setdefault("truth_chi2", {})[set_name] = truth_chi2
    summary.setdefault("figures", {})[set_name] = figures
    summary.setdefault("settings", {})[set_name] = settings
    write_json(summary_path, nan_to_none(summary), indent=1, allow_nan=False)
    return summary


def run_calibration(posteriors, observations, set_name: str, out_dir, *, loader=None, config=None,
                    prior_samples=None, n_bins: int = 10, n_boot: int = 500, n_null: int | None = None,
                    footprint_frac: float = 0.1, lens_figures: int = 2, seed: int = 0,
                    merge: bool = False, tarp_norm: str = "pooled") -> dict:
    """Calibrate every method in ``posteriors`` (files, directories or globs) against the observations
    in the directory ``observations``; ``loader(path) -> (problem, y, truth)`` reads an observation
    (default: :func:`default_loader` with the YAML ``config``). Returns the summary written to
    ``out_dir/summary.json``."""
    t0 = time.time()
    out_dir, obs_dir = Path(out_dir), Path(observations)
    if not obs_dir.is_dir():
        raise InputFileError(obs_dir, "observation directory not found", "--observations")
    if n_bins < 1:
        raise PipelineError(f"--alpha-bins must be >= 1, got {n_bins}")
    by_method, by_obs = read_records(expand_posteriors(posteriors), obs_dir)
    figure_obs = figure_pairs(by_method, lens_figures)
    score_observations(by_obs, loader or default_loader(config), figure_obs)
    drop_truthless(by_method)
    prior_std, prior_source = prior_std_for(by_method, set_name, prior_samples)
    results, nulls = evaluate_methods(by_method, prior_std=prior_std, n_bins=n_bins, n_boot=n_boot, n_null=n_null,
                                      footprint_frac=footprint_frac, tarp_norm=tarp_norm, seed=seed)
    for r in results.values():
        r["prior_std_source"] = prior_source
    lens_pngs = plot_lens_figures(by_method, figure_obs, set_name, out_dir)
    cov_png = plot_set_coverage(results, set_name, out_dir)
    settings = calibration_settings(n_bins=n_bins, tarp_norm=tarp_norm, n_boot=n_boot,
                                    n_null=int(next(iter(nulls.values()))[1].size), seed=seed,
                                    footprint_frac=footprint_frac, prior_source=prior_source,
                                    seconds=time.time() - t0)
    summary = write_summary(out_dir / "summary.json", set_name, results=results,
                            truth_chi2=truth_chi2_summary(by_method),
                            figures={"coverage": cov_png.name, "lenses": lens_pngs}, settings=settings, merge=merge)
    log.info("wrote %s (%d methods, %.1f s)", out_dir / "summary.json", len(results), time.time() - t0)
    return summary
