"""The inputs of a calibration: posterior FITS files matched to their observations, prior draws.

A *record* is one posterior file (one method, one observation) as a dict: ``samples`` (n_s, ny, nx)
in the file's physical source units, ``mean``/``std`` from the file, ``truth`` (from the posterior
or its observation), ``chi2`` (per-sample chi2_nu over the image and in the arc, dimensionless),
``truth_chi2`` (the truth's own chi2_nu and chi2_arc_nu), ``logz``, ``seconds`` (sampling wall
time [s]), ``obs`` (observation file name), ``kind`` (the observation's SRCKIND), ``data_snr`` (the
signal-to-noise of its data alone, :func:`pipeline.metrics.chi2.data_snr`; None without an operator), ``ppc`` (the file's
posterior predictive check, None when it has none) and, for the
observations drawn as lens figures, ``residual``/``obs_img``/``obs_pix`` (arcsec per image pixel).
"""

from __future__ import annotations

import glob
import logging
from pathlib import Path

import numpy as np
import torch
from astropy.io import fits

from pipeline.errors import InputFileError, PipelineError
from pipeline.io.fits import hdu_names, read_image_hdu
from pipeline.io.posterior import read_posterior
from pipeline.lensing.config import LensingConfig, load_lensing_config
from pipeline.lensing.critical import lens_from_header
from pipeline.lensing.observation import load_observation
from pipeline.metrics.chi2 import chi2_per_sample, data_snr, forward_view, normalised_residual

log = logging.getLogger(__name__)


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
    cfg = load_lensing_config(config_path) if config_path else LensingConfig()

    def load(path):
        problem, y, _meta = load_observation(path, cfg)
        truth = read_image_hdu(path, "TRUTH") if "TRUTH" in hdu_names(path) else None
        return problem, y, truth

    return load


def load_prior_samples(spec) -> np.ndarray:
    """Prior draws (n, ny, nx) in physical source units: the SAMPLES HDU of a ``sample-prior`` FITS
    file, or the TRUTH HDUs of a directory of observations whose truths are prior draws."""
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


def source_kind(obs_path) -> str | None:
    """The observation's source kind (primary ``SRCKIND``, written by ``simulate``), or None."""
    try:
        kind = fits.getval(obs_path, "SRCKIND", ext=0)
    except (KeyError, OSError):
        return None
    return str(kind).strip() or None


def true_lens(obs_path):
    """The lens in an observation's keywords (array frame), or None when it has none or they cannot be read
    (a warning says why)."""
    try:
        return lens_from_header(fits.getheader(obs_path, 0), obs_path)
    except (OSError, InputFileError) as exc:
        log.warning("%s: no usable true lens (%s): left out of the lens calibration", obs_path, exc)
        return None


def read_records(files, obs_dir: Path) -> tuple[dict, dict]:
    """Read every posterior file into a record; returns ``(by_method, by_obs)``: the same records
    grouped by method (the file's LABEL, else its METHOD, else its directory name) and by observation path (the
    file's OBSFILE, else its own name, inside ``obs_dir``). A posterior that inferred the lens
    (``LENSSAMP``) gets its observation's true lens (its lens keywords) as ``lens_truth``."""
    by_method: dict[str, list[dict]] = {}
    by_obs: dict[Path, list[dict]] = {}
    for f in files:
        d = read_posterior(f)
        method = d["label"] or d["method"] or f.parent.name
        obs_path = obs_dir / (d["obs_file"] or f.name)
        if not obs_path.is_file():
            raise InputFileError(f, f"its observation {obs_path.name} is not in {obs_dir}", "OBSFILE")
        rec = {"samples": d["samples"], "mean": d["mean"], "std": d["std"], "truth": d["truth"], "chi2": None,
               "truth_chi2": None, "logz": (d["logz"] if d["logz_available"] else None), "seconds": d["seconds"],
               "obs": obs_path.name, "file": f, "src_pixscale": d["src_pixscale"], "units": d["units"],
               "method": method, "label": d["label"], "residual": None, "obs_img": None, "obs_pix": None,
               "kind": source_kind(obs_path), "data_snr": None, "model": d.get("model"), "lens_cards": d.get("lens"),
               "bunit": d.get("bunit", ""), "data_unit": d.get("data_unit", ""), "ppc": d["ppc"],
               "lens_samples": d["lens_samples"],
               "lens_truth": true_lens(obs_path) if d["lens_samples"] is not None else None}
        by_method.setdefault(method, []).append(rec)
        by_obs.setdefault(obs_path, []).append(rec)
    return by_method, by_obs


def figure_pairs(by_method: dict, lens_figures: int) -> set:
    """(method, observation) pairs drawn as lens figures: the first ``lens_figures`` observations
    (sorted by name) of every method."""
    return {(m, o) for m, recs in by_method.items()
            for o in sorted(r["obs"] for r in recs)[:max(0, lens_figures)]}


def score_observations(by_obs: dict, loader, figure_obs: set) -> None:
    """Fill each record's truth (from its observation when the posterior has none), chi2,
    truth_chi2 and data_snr, and the residual map of figure records. Observation-major: each operator is built
    once and dropped before the next (a 64x64 sparse lensing operator can take hundreds of MB)."""
    for obs_path in sorted(by_obs):
        problem, y, obs_truth = loader(obs_path)
        snr = data_snr(problem, y) if problem is not None else None
        for rec in by_obs[obs_path]:
            rec["data_snr"] = snr
            if rec["truth"] is None:
                rec["truth"] = obs_truth
            if rec["truth"] is None:
                continue
            rec["truth"] = np.asarray(rec["truth"], np.float32)
            if rec["truth"].shape != rec["samples"].shape[1:]:
                raise InputFileError(rec["file"], f"TRUTH {rec['truth'].shape} and SAMPLES "
                                     f"{rec['samples'].shape[1:]} differ", "TRUTH")
            if problem is not None:
                _score_record(rec, problem, y, (rec["method"], rec["obs"]) in figure_obs)
        del problem


def _score_record(rec: dict, problem, y, figure: bool) -> None:
    view = forward_view(problem, rec["units"])
    rec["chi2"] = chi2_per_sample(view, torch.from_numpy(rec["samples"]), y)
    # the truth as if it were one sample: the reference for the samples' chi2
    tc = chi2_per_sample(view, torch.from_numpy(rec["truth"][None]), y)
    rec["truth_chi2"] = {"chi2_nu": float(tc["chi2_nu"][0]), "chi2_arc_nu": float(tc["chi2_arc_nu"][0])}
    if not figure:
        return
    img = np.asarray(y.detach().cpu() if hasattr(y, "detach") else y, dtype=np.float64)
    if img.ndim == 2:  # an image (not a vector-valued toy problem)
        rec["residual"] = normalised_residual(view, rec["mean"], y)
        rec["obs_img"] = img
        rec["obs_pix"] = (problem.meta.get("image_pixscale")
                          if isinstance(getattr(problem, "meta", None), dict) else None)


def drop_truthless(by_method: dict) -> None:
    """Remove records without a truth (warning for each) and methods left with none; raise when no
    method is left."""
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
