"""``python -m pipeline calibrate``: calibration of posterior samplers on one observation set.

For every method (one posterior FITS per observation, :mod:`pipeline.io.posterior`) it computes
TARP expected coverage with bootstrap bands, the null distribution of max|ECP - alpha| for the
same (n_obs, n_samples, alpha bins) and the p-value of the observed value under it, rank-based
per-pixel 68 %/95 % interval coverage (all pixels and inside the footprint of the pooled mean of
truth and samples) beside the level an exact sampler reaches with the same number of samples,
chi2_nu per sample over the image and inside the arc (and the truth's own chi2_nu as its
reference), sharpness (posterior std / prior std) and the posterior-mean error from the equally
weighted samples, log Z per observation, and the figures.

Output (one JSON per set; ``report`` merges every ``summary.json`` below its ``--calibration`` dir):
``OUT/summary.json`` = ``{"sets": {SET: {METHOD: {...metrics...}}}, "truth_chi2": {SET: {...}},
"figures": {SET: {...}}, "settings": {...}}``; with ``--merge`` an existing ``OUT/summary.json``
keeps its other sets (one job at a time: the read-modify-write is not safe under concurrent jobs). Figures:
``OUT/coverage_SET.png`` and ``OUT/lenses/SET_METHOD_OBS.png``.
"""

from __future__ import annotations

import glob
import json
import logging
import time
from pathlib import Path

import numpy as np

from pipeline.errors import InputFileError, PipelineError

log = logging.getLogger(__name__)

# nominal levels of the per-pixel coverage curve (0.68 and 0.95 are the reported ones)
PIXEL_LEVELS = sorted({round(float(c), 2) for c in np.linspace(0.05, 0.95, 19)} | {0.68, 0.95})


def add_arguments(parser) -> None:
    parser.add_argument("--posteriors", nargs="+", required=True, metavar="DIR_OR_GLOB",
                        help="posterior FITS files, directories of them or globs; several methods at once "
                             "(the method is the file's METHOD keyword, else its directory name)")
    parser.add_argument("--observations", required=True, metavar="DIR",
                        help="directory of the observation FITS files the posteriors were drawn for "
                             "(matched by the posterior's OBSFILE keyword, else by file name)")
    parser.add_argument("--set", required=True, choices=["prior", "heldout"], dest="set_name",
                        help="prior: truths drawn from the trained prior's chain; heldout: held-out galaxies")
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory (summary.json, PNGs)")
    parser.add_argument("--config", metavar="FILE", help="pipeline YAML (its lensing: section reads observations)")
    parser.add_argument("--prior-samples", metavar="FITS_OR_DIR",
                        help="prior draws for the sharpness denominator: a FITS file with a SAMPLES HDU "
                             "(sample-prior output) or a directory of observations whose TRUTH HDUs are prior "
                             "draws. Default: for --set prior, the truths of this set; else sharpness is null")
    parser.add_argument("--alpha-bins", type=int, default=10, help="number of TARP alpha bins (fixed; default 10)")
    parser.add_argument("--n-boot", type=int, default=500, help="bootstrap resamples for TARP bands (default 500)")
    parser.add_argument("--n-null", type=int, default=None,
                        help="draws of the TARP null distribution (default 2000 from the exact rank law with pooled "
                             "normalisation; 300 Gaussian simulations with --tarp-norm truths)")
    parser.add_argument("--tarp-norm", default="pooled", choices=["pooled", "truths", "none"],
                        help="TARP coordinate normalisation: pooled min/max of samples and truths (default; keeps "
                             "the null exact for few observations), truths only (the tarp package), or none")
    parser.add_argument("--footprint-frac", type=float, default=0.1,
                        help="footprint = pooled mean of truth and samples > FRAC * its peak, per observation "
                             "(default 0.1)")
    parser.add_argument("--lens-figures", type=int, default=2,
                        help="per-lens figures per method (first N observations; default 2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the TARP references, bootstrap and null")
    parser.add_argument("--merge", action="store_true",
                        help="merge into an existing OUT/summary.json instead of replacing it")


# ------------------------------------------------------------------------------------------ inputs
def expand_posteriors(specs) -> list[Path]:
    """Files from directories (``*.fits`` inside), globs or plain paths; sorted, unique."""
    files: list[Path] = []
    for spec in specs:
        p = Path(spec)
        if p.is_dir():
            found = sorted(p.glob("*.fits"))
        elif p.is_file():
            found = [p]
        else:
            found = sorted(Path(f) for f in glob.glob(str(spec)) if f.endswith(".fits"))
        if not found:
            raise InputFileError(spec, "no posterior FITS files found", "--posteriors")
        files.extend(found)
    seen, out = set(), []
    for f in files:
        if f.resolve() not in seen:
            seen.add(f.resolve())
            out.append(f)
    return out


def default_loader(config_path=None):
    """Observation loader: path -> (problem, y (torch), truth (numpy or None)).

    Uses :func:`pipeline.lensing.observation.load_observation` with the config's ``lensing:``
    section, and the observation's TRUTH HDU when present."""
    from pipeline.io.fits import hdu_names, read_image_hdu
    from pipeline.lensing.config import LensingConfig, load_lensing_config
    from pipeline.lensing.observation import load_observation

    cfg = load_lensing_config(config_path) if config_path else LensingConfig()

    def load(path):
        problem, y, _meta = load_observation(path, cfg)
        truth = read_image_hdu(path, "TRUTH") if "TRUTH" in hdu_names(path) else None
        return problem, y, truth

    return load


def load_prior_samples(spec) -> np.ndarray:
    from pipeline.io.fits import hdu_names, read_image_hdu

    p = Path(spec)
    if p.is_dir():
        files = sorted(p.glob("*.fits"))
        arr = [read_image_hdu(f, "TRUTH") for f in files if "TRUTH" in hdu_names(f)]
        if len(arr) < 2:
            raise InputFileError(p, "need >= 2 observation files with a TRUTH HDU", "--prior-samples")
        return np.stack(arr)
    arr = read_image_hdu(p, "SAMPLES")
    if arr.ndim == 4 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 3 or arr.shape[0] < 2:
        raise InputFileError(p, f"SAMPLES must be (n>=2, ny, nx), got {arr.shape}", "SAMPLES")
    return arr


# ---------------------------------------------------------------------------------------- metrics
def _nan_to_none(obj):
    if isinstance(obj, float):
        return obj if np.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_nan_to_none(v) for v in obj]
    if isinstance(obj, np.generic):
        return _nan_to_none(obj.item())
    return obj


def _median_or_none(values, nan_ok: bool = False):
    """Median of the non-None values (NaN-ignoring with ``nan_ok``), None when there are none."""
    v = np.array([x for x in values if x is not None], dtype=np.float64)
    if nan_ok:
        v = v[np.isfinite(v)]
    return float(np.median(v)) if v.size else None


def evaluate_method(records: list[dict], *, prior_std, n_bins: int, rng: np.random.Generator,
                    n_boot: int, null, footprint_frac: float, tarp_norm: str = "pooled") -> dict:
    """Metrics of one method on one set. ``records``: per observation, dicts with samples
    (n_s, ny, nx), truth, chi2 (dict from chi2_per_sample or None), truth_chi2 (the truth's own
    chi2_nu and chi2_arc_nu as floats, or None), logz, seconds, obs.

    Every metric is computed from the equally weighted samples (a file's MEAN/STD are not read):
    coverage beside ``exact_coverage_level(n_s, level)`` (keys ``*_ref``), mean error and sharpness
    from the samples' mean and std (ddof 1)."""
    from pipeline.metrics.coverage import exact_coverage_curve, exact_coverage_level, footprint, interval_coverage
    from pipeline.metrics.sharpness import mean_error, sample_moments, sharpness
    from pipeline.metrics.tarp import tarp_summary

    samples = np.stack([r["samples"] for r in records])
    truths = np.stack([r["truth"] for r in records])
    n_obs, n_s = samples.shape[:2]
    t = tarp_summary(samples.reshape(n_obs, n_s, -1), truths.reshape(n_obs, -1), n_bins=n_bins, rng=rng,
                     n_boot=n_boot, null=null, norm=tarp_norm)
    fp = footprint(truths, footprint_frac, samples=samples)
    cov = interval_coverage(samples, truths, levels=PIXEL_LEVELS)
    cov_fp = interval_coverage(samples, truths, levels=PIXEL_LEVELS, mask=fp)
    ref = exact_coverage_curve(n_s, PIXEL_LEVELS).tolist()
    t["pixel_curve"] = {"levels": PIXEL_LEVELS, "all": [cov[c] for c in PIXEL_LEVELS],
                        "footprint": [cov_fp[c] for c in PIXEL_LEVELS], "ref": ref}
    chis = [r["chi2"] for r in records if r.get("chi2") is not None]
    chi_all = np.concatenate([c["chi2_nu"] for c in chis]) if chis else np.array([])
    chi_arc = np.concatenate([c["chi2_arc_nu"] for c in chis]) if chis else np.array([])
    truth_chi = [r.get("truth_chi2") or {} for r in records]
    means, stds = sample_moments(samples)
    err = mean_error(means, truths)
    ref68, ref95 = exact_coverage_level(n_s, 0.68), exact_coverage_level(n_s, 0.95)
    out = {
        "n_obs": int(n_obs),
        "n_samples": int(n_s),
        "n_alpha_bins": int(n_bins),
        "tarp_max_dev": t["tarp_max_dev"],
        "tarp_p_value": t["tarp_p_value"],
        "tarp_null_p50": t["tarp_null_p50"],
        "tarp_null_p95": t["tarp_null_p95"],
        "coverage68": cov[0.68],
        "coverage95": cov[0.95],
        "coverage68_ref": ref68,
        "coverage95_ref": ref95,
        "coverage68_footprint": cov_fp[0.68],
        "coverage95_footprint": cov_fp[0.95],
        "coverage68_footprint_ref": ref68,
        "coverage95_footprint_ref": ref95,
        "footprint_frac": footprint_frac,
        "footprint_pixels": int(fp.sum()),
        "chi2_median": float(np.median(chi_all)) if chi_all.size else None,
        "chi2_arc_median": float(np.nanmedian(chi_arc)) if np.isfinite(chi_arc).any() else None,
        "chi2_n_obs": len(chis),
        "truth_chi2_median": _median_or_none([c.get("chi2_nu") for c in truth_chi]),
        "truth_chi2_arc_median": _median_or_none([c.get("chi2_arc_nu") for c in truth_chi], nan_ok=True),
        "sharpness": None,
        "mean_err": float(np.mean(err)),
        "mean_err_rel": None,
        "logz": [r["logz"] for r in records],
        "seconds": (float(np.sum([r["seconds"] for r in records]))
                    if all(r["seconds"] is not None for r in records) else None),
        "observations": [r["obs"] for r in records],
        "per_obs": {
            "mean_err": err.tolist(),
            "chi2_median": [float(np.median(r["chi2"]["chi2_nu"])) if r.get("chi2") else None for r in records],
            "chi2_arc_median": [float(np.nanmedian(r["chi2"]["chi2_arc_nu"]))
                                if r.get("chi2") and np.isfinite(r["chi2"]["chi2_arc_nu"]).any() else None
                                for r in records],
            "truth_chi2": [c.get("chi2_nu") for c in truth_chi],
            "truth_chi2_arc": [c.get("chi2_arc_nu") for c in truth_chi],
        },
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
    return out


def per_kind_summary(kinds: list, per_obs: dict, samples: np.ndarray, truths: np.ndarray) -> dict:
    """Held-out figures per source kind (the observation's ``SRCKIND``): observations, median chi2_nu
    of the samples and of the truths (image and arc), mean error [source units] and per-pixel coverage
    at 68 / 95 % (beside the same exact-sampler level as the whole set)."""
    from pipeline.metrics.coverage import interval_coverage

    out = {}
    for kind in sorted({k for k in kinds if k is not None}):
        idx = [i for i, k in enumerate(kinds) if k == kind]
        cov = interval_coverage(samples[idx], truths[idx], levels=(0.68, 0.95))
        out[kind] = {
            "n_obs": len(idx),
            "chi2_median": _median_or_none([per_obs["chi2_median"][i] for i in idx]),
            "chi2_arc_median": _median_or_none([per_obs["chi2_arc_median"][i] for i in idx], nan_ok=True),
            "truth_chi2_median": _median_or_none([per_obs["truth_chi2"][i] for i in idx]),
            "truth_chi2_arc_median": _median_or_none([per_obs["truth_chi2_arc"][i] for i in idx], nan_ok=True),
            "mean_err": float(np.mean([per_obs["mean_err"][i] for i in idx])),
            "coverage68": cov[0.68],
            "coverage95": cov[0.95],
        }
    return out


def _source_kind(obs_path) -> str | None:
    """The observation's source kind (primary ``SRCKIND``, written by ``simulate``), or None."""
    from astropy.io import fits

    try:
        kind = fits.getval(obs_path, "SRCKIND", ext=0)
    except (KeyError, OSError):
        return None
    return str(kind).strip() or None


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
    return {"truth_chi2_median": _median_or_none([v["chi2_nu"] for v in vals]),
            "truth_chi2_arc_median": _median_or_none([v["chi2_arc_nu"] for v in vals], nan_ok=True),
            "n_obs": len(vals)}


def _write_json_atomic(path: Path, data) -> None:
    from pipeline.io.atomic import write_json

    write_json(path, _nan_to_none(data), indent=1, allow_nan=False)


def run_calibration(posteriors, observations, set_name: str, out_dir, *, loader=None, config=None,
                    prior_samples=None, n_bins: int = 10, n_boot: int = 500, n_null: int | None = None,
                    footprint_frac: float = 0.1, lens_figures: int = 2, seed: int = 0,
                    merge: bool = False, tarp_norm: str = "pooled") -> dict:
    """Library form of the command; ``loader(path) -> (problem, y, truth)`` reads an observation
    (default: :func:`default_loader`). Returns the summary written to ``out_dir/summary.json``."""
    import torch

    from pipeline.io.posterior import read_posterior
    from pipeline.metrics.chi2 import chi2_per_sample, forward_view, normalised_residual
    from pipeline.metrics.sharpness import prior_std_map
    from pipeline.metrics.tarp import null_distribution
    from pipeline.plots import plot_coverage, plot_lens

    t0 = time.time()
    out_dir = Path(out_dir)
    obs_dir = Path(observations)
    if not obs_dir.is_dir():
        raise InputFileError(obs_dir, "observation directory not found", "--observations")
    if n_bins < 1:
        raise PipelineError(f"--alpha-bins must be >= 1, got {n_bins}")
    files = expand_posteriors(posteriors)
    loader = loader or default_loader(config)
    by_method: dict[str, list[dict]] = {}
    by_obs: dict[Path, list[dict]] = {}
    for f in files:
        d = read_posterior(f)
        method = d["method"] or f.parent.name
        obs_path = obs_dir / (d["obs_file"] or f.name)
        if not obs_path.is_file():
            raise InputFileError(f, f"its observation {obs_path.name} is not in {obs_dir}", "OBSFILE")
        rec = {"samples": d["samples"], "mean": d["mean"], "std": d["std"], "truth": d["truth"], "chi2": None,
               "truth_chi2": None, "logz": (d["logz"] if d["logz_available"] else None), "seconds": d["seconds"],
               "obs": obs_path.name, "file": f, "src_pixscale": d["src_pixscale"], "units": d["units"],
               "method": method, "residual": None, "obs_img": None, "obs_pix": None,
               "kind": _source_kind(obs_path)}
        by_method.setdefault(method, []).append(rec)
        by_obs.setdefault(obs_path, []).append(rec)
    # per-lens figures: the first N observations (sorted by name) of every method
    figure_obs = {(m, o) for m, recs in by_method.items()
                  for o in sorted(r["obs"] for r in recs)[:max(0, lens_figures)]}
    # observation-major: each operator is built once and dropped before the next (a 64x64 sparse
    # lensing operator can take hundreds of MB, so they are not all kept)
    for obs_path in sorted(by_obs):
        problem, y, obs_truth = loader(obs_path)
        for rec in by_obs[obs_path]:
            if rec["truth"] is None:
                rec["truth"] = obs_truth
            if rec["truth"] is None:
                continue
            rec["truth"] = np.asarray(rec["truth"], np.float32)
            if rec["truth"].shape != rec["samples"].shape[1:]:
                raise InputFileError(rec["file"], f"TRUTH {rec['truth'].shape} and SAMPLES "
                                     f"{rec['samples'].shape[1:]} differ", "TRUTH")
            if problem is None:
                continue
            view = forward_view(problem, rec["units"])
            rec["chi2"] = chi2_per_sample(view, torch.from_numpy(rec["samples"]), y)
            # the truth as if it were one sample: the reference for the samples' chi2
            tc = chi2_per_sample(view, torch.from_numpy(rec["truth"][None]), y)
            rec["truth_chi2"] = {"chi2_nu": float(tc["chi2_nu"][0]), "chi2_arc_nu": float(tc["chi2_arc_nu"][0])}
            if (rec["method"], rec["obs"]) in figure_obs:
                img = np.asarray(y.detach().cpu() if hasattr(y, "detach") else y, dtype=np.float64)
                if img.ndim == 2:  # an image (not a vector-valued toy problem)
                    rec["residual"] = normalised_residual(view, rec["mean"], y)
                    rec["obs_img"] = img
                    rec["obs_pix"] = (problem.meta.get("image_pixscale")
                                      if isinstance(getattr(problem, "meta", None), dict) else None)
        del problem
    for method in list(by_method):
        kept = [r for r in by_method[method] if r["truth"] is not None]
        for r in by_method[method]:
            if r["truth"] is None:
                log.warning("%s: no truth (TRUTH HDU) in the posterior or the observation: skipped", r["file"])
        if kept:
            by_method[method] = kept
        else:
            del by_method[method]
    if not by_method:
        raise PipelineError("no posterior with a known truth: nothing to calibrate")

    prior_source = None
    prior_std = None
    if prior_samples:
        prior_std = prior_std_map(load_prior_samples(prior_samples))
        prior_source = str(prior_samples)
    elif set_name == "prior":
        truths = {r["obs"]: r["truth"] for recs in by_method.values() for r in recs}
        if len(truths) >= 2:
            prior_std = prior_std_map(np.stack(list(truths.values())))
            prior_source = "truths of the prior set"

    rng = np.random.default_rng(seed)
    nulls: dict[tuple, tuple] = {}
    results, lens_pngs = {}, {}
    for method, recs in sorted(by_method.items()):
        recs.sort(key=lambda r: r["obs"])
        n_s = min(r["samples"].shape[0] for r in recs)
        if n_s < 2:
            short = next(r for r in recs if r["samples"].shape[0] < 2)
            raise InputFileError(short["file"], "needs at least 2 samples for coverage and sharpness", "SAMPLES")
        if any(r["samples"].shape[0] != n_s for r in recs):
            log.warning("%s: sample counts differ between observations; using the first %d of each", method, n_s)
            for r in recs:
                r["samples"] = r["samples"][:n_s]
        key = (len(recs), n_s, int(np.prod(recs[0]["truth"].shape)))
        if key not in nulls:  # methods on the same set share one null distribution
            nulls[key] = null_distribution(key[0], key[1], key[2], n_bins=n_bins, rng=rng, norm=tarp_norm,
                                           n_sim=n_null)
        log.info("%s: %d observations x %d samples", method, len(recs), n_s)
        results[method] = evaluate_method(recs, prior_std=prior_std, n_bins=n_bins, rng=rng, n_boot=n_boot,
                                          null=nulls[key], footprint_frac=footprint_frac, tarp_norm=tarp_norm)
        results[method]["prior_std_source"] = prior_source
        pngs = []
        for r in recs:
            if (method, r["obs"]) not in figure_obs:
                continue
            res, obs_img, obs_pix = r["residual"], r["obs_img"], r["obs_pix"]
            med = np.median(r["chi2"]["chi2_nu"]) if r["chi2"] is not None else None
            png = out_dir / "lenses" / f"{set_name}_{method}_{Path(r['obs']).stem}.png"
            plot_lens(png, mean=r["mean"], std=r["std"], samples=r["samples"], truth=r["truth"], obs=obs_img,
                      obs_pixscale=obs_pix, residual=res, src_pixscale=r["src_pixscale"],
                      title=f"{set_name} set, {method}: {r['obs']}", chi2=med)
            pngs.append(str(png.relative_to(out_dir)))
        lens_pngs[method] = pngs
    cov_png = out_dir / f"coverage_{set_name}.png"
    plot_coverage(cov_png, {m: {**r["tarp"], **{k: r[k] for k in ("tarp_max_dev", "tarp_null_p95", "tarp_p_value",
                                                                   "n_obs", "n_samples", "n_alpha_bins")}}
                            for m, r in results.items()},
                  title=f"{set_name} set")
    summary_path = out_dir / "summary.json"
    summary = {"sets": {}, "figures": {}, "settings": {}}
    if merge and summary_path.is_file():
        try:
            summary = json.loads(summary_path.read_text())
        except json.JSONDecodeError:
            raise InputFileError(summary_path, "existing summary is not valid JSON (remove it or drop --merge)")
    summary.setdefault("sets", {})[set_name] = results
    summary.setdefault("truth_chi2", {})[set_name] = truth_chi2_summary(by_method)
    summary.setdefault("figures", {})[set_name] = {"coverage": cov_png.name, "lenses": lens_pngs}
    summary.setdefault("settings", {})[set_name] = {
        "n_alpha_bins": n_bins, "tarp_norm": tarp_norm, "n_boot": n_boot,
        "n_null": int(next(iter(nulls.values()))[1].size),
        "null_method": ("Gaussian simulation" if tarp_norm == "truths" else
                        "exact rank law (uniform ranks; checked against Gaussian simulation in the tests)"),
        "seed": seed, "footprint_frac": footprint_frac,
        "footprint_rule": "pooled mean of truth and samples > footprint_frac x its peak, per observation",
        "coverage_reference": "exact_coverage_level(n_samples, level): rank uniform on {0..n}, mid-rank rule",
        "tarp_p_value": "fraction of null draws of max|ECP - alpha| >= the observed value",
        "pixel_levels": PIXEL_LEVELS, "tarp_band_percentiles": [2.5, 97.5], "prior_std_source": prior_source,
        "seconds_calibrate": round(time.time() - t0, 2),
    }
    _write_json_atomic(summary_path, summary)
    log.info("wrote %s (%d methods, %.1f s)", summary_path, len(results), time.time() - t0)
    return summary


def run(args) -> int:
    from pipeline.runtime import configure_threads

    configure_threads()
    run_calibration(args.posteriors, args.observations, args.set_name, args.out, config=args.config,
                    prior_samples=args.prior_samples, n_bins=args.alpha_bins, n_boot=args.n_boot,
                    n_null=args.n_null, footprint_frac=args.footprint_frac, lens_figures=args.lens_figures,
                    seed=args.seed, merge=args.merge, tarp_norm=args.tarp_norm)
    return 0
