"""Held-out observations: sources rendered with a finer forward model than inference uses.

Each source is re-rendered ``factor`` (>= 2) times finer than the source grid (GalSim from its
parameters, HDF objects re-cut from the deep field), ray-traced with the image supersampled
``supersample * factor`` times and the PSF sampled at that scale, and averaged onto the image pixels;
TRUTH is the fine source's block average onto the source grid. Each file then records its source kind
(SRCKIND) and the truth's own chi2_nu under the inference operator over the image (TRCHI2) and in the
truth's arc (TRCHI2A, pixels where the truth's model exceeds NOISE; TRNARC of them), which exceed 1 by
the forward-model mismatch. The file layout is that of :mod:`pipeline.lensing.simulate`.
"""

from __future__ import annotations

import json

import numpy as np
import torch
from tqdm import tqdm

from pipeline.errors import InputFileError
from pipeline.io.atomic import atomic_directory
from pipeline.lensing.config import GeometryConfig, LensingConfig, NoiseConfig
from pipeline.lensing.grids import block_average
from pipeline.lensing.observation import load_observation
from pipeline.lensing.operator import LensParams, build_simulator, caustics_forward, gaussian_psf
from pipeline.lensing.simulate import (Observation, add_noise, default_psf, draw_lens, noise_keywords,
                                       write_observation)
from pipeline.lensing.sources import render_source_fine
from pipeline.lensing.sources_hst import HDF_PER_SOURCE_PIXEL
from pipeline.metrics.chi2 import chi2_per_sample, forward_view
from pipeline.runtime import tqdm_disable


def fine_psf(geometry: GeometryConfig, factor: int) -> tuple[np.ndarray, float]:
    """The configured Gaussian PSF at the held-out rendering's sub-pixel scale image_pixscale /
    (supersample * factor) [arcsec/px], over the same angular extent as
    :func:`pipeline.lensing.simulate.default_psf`, and that scale."""
    samp = geometry.image_pixscale / (geometry.supersample * factor)
    return gaussian_psf(geometry.psf_fwhm, samp, 2 * (geometry.psf_npix // 2) * factor + 1), samp


def fine_model(fine: np.ndarray, lens: LensParams, geometry: GeometryConfig, factor: int) -> np.ndarray:
    """Noiseless image (ny, nx) float64 [flux per image pixel] of a source (f n_s, f n_s) [surface
    brightness] on the grid ``factor`` times finer than the source grid (pixel source_pixscale / f):
    ray-traced on the image supersampled supersample * f times, convolved with :func:`fine_psf` and
    averaged over each image pixel (times its area, so flux is conserved)."""
    n, nf = geometry.image_npix, geometry.source_npix * factor
    if np.shape(fine) != (nf, nf):
        raise ValueError(f"fine source shape {np.shape(fine)} != ({nf}, {nf})")
    psf, _ = fine_psf(geometry, factor)
    sim = build_simulator(lens, (n, n), geometry.image_pixscale, nf, geometry.source_pixscale / factor,
                          geometry.supersample * factor, psf)
    x = torch.as_tensor(np.asarray(fine, np.float32))[None]
    return caustics_forward(sim, x)[0].double().numpy() * geometry.image_pixscale ** 2


def simulate_heldout_observation(fine: np.ndarray, lens: LensParams, geometry: GeometryConfig, factor: int,
                                 noise: NoiseConfig, rng: np.random.Generator,
                                 source_bunit: str = "electron/(s arcsec2)") -> Observation:
    """A held-out observation of the fine source ``fine`` (f n_s, f n_s) [surface brightness]: SCI =
    :func:`fine_model` + noise (as :func:`pipeline.lensing.simulate.simulate_observation`) [flux per
    pixel], TRUTH = the block average of ``fine`` onto the source grid, PSF = the inference PSF
    (:func:`pipeline.lensing.simulate.default_psf`)."""
    if noise.sigma is None:
        raise ValueError("noise.sigma must be resolved before simulating (see typical_noise_sigma)")
    if int(factor) != factor or factor < 2:
        raise ValueError(f"the held-out rendering factor must be an integer >= 2, got {factor}")
    model = fine_model(fine, lens, geometry, factor)
    sci, sd, peak_snr = add_noise(model, noise, rng)
    psf, samp = default_psf(geometry)
    header = noise_keywords(noise, peak_snr, geometry.supersample * factor)
    header["FINEFAC"] = (int(factor), "source rendered this many times finer")
    header["TRUTHAVG"] = (True, "TRUTH = block average of the fine source")
    return Observation(sci=sci.astype(np.float32), noise=sd.astype(np.float32), psf=psf.astype(np.float32),
                       psfsamp=samp, lens=lens, pixscale=geometry.image_pixscale,
                       source_npix=geometry.source_npix, source_pixscale=geometry.source_pixscale,
                       truth=block_average(fine, factor).astype(np.float32), bunit=noise.bunit,
                       source_bunit=source_bunit, header=header)


def truth_chi2(path, config: LensingConfig) -> dict:
    """The TRUTH's own chi2_nu in the observation at ``path`` under the inference operator that
    :func:`pipeline.lensing.observation.load_observation` builds from the file (as calibration does):
    {'chi2_nu', 'chi2_arc_nu' (None without arc pixels), 'n_arc', 'nu'}; the arc is where the truth's
    model exceeds NOISE (:func:`pipeline.metrics.chi2.chi2_per_sample`)."""
    problem, y, meta = load_observation(path, config)
    if meta["truth"] is None:
        raise InputFileError(path, "no TRUTH on the source grid", field="TRUTH")
    c = chi2_per_sample(forward_view(problem, "physical"), torch.as_tensor(meta["truth"])[None], y)
    arc = float(c["chi2_arc_nu"][0])
    return {"chi2_nu": float(c["chi2_nu"][0]), "chi2_arc_nu": arc if np.isfinite(arc) else None,
            "n_arc": int(c["n_arc"][0]), "nu": int(c["nu"])}


def _write_with_truth_chi2(path, obs: Observation, hdr: dict, config: LensingConfig) -> dict:
    """Write ``obs`` with the primary keywords ``hdr``, measure :func:`truth_chi2` on the file and write
    it again with TRCHI2 / TRCHI2A / TRNARC added to ``hdr``; returns the chi2 record."""
    write_observation(path, obs, hdr)
    c = truth_chi2(path, config)
    hdr["TRCHI2"] = (round(c["chi2_nu"], 5), "TRUTH chi2_nu, inference operator, image")
    if c["chi2_arc_nu"] is not None:
        hdr["TRCHI2A"] = (round(c["chi2_arc_nu"], 5), "TRUTH chi2_nu in its arc (model > NOISE)")
    hdr["TRNARC"] = (c["n_arc"], "arc pixels of TRCHI2A")
    write_observation(path, obs, hdr)
    return c


def simulate_heldout_set(sources: np.ndarray, records: list[dict], n: int, out_dir, config: LensingConfig,
                         seed: int, factor: int = 2, extra: dict | None = None,
                         source_bunit: str = "electron/(s arcsec2)", sources_path=None) -> list[dict]:
    """``n`` held-out observations (:func:`simulate_heldout_observation`) of sources drawn as in
    :func:`pipeline.lensing.simulate.simulate_set` (same seed: same source indices and lenses) from
    ``sources`` (N, n_s, n_s) [surface brightness], each re-rendered ``factor`` times finer from its
    record (:func:`pipeline.lensing.sources.read_source_records`). ``config.noise.sigma`` must be set.
    Every file and manifest entry records SRCKIND and the truth's chi2 (:func:`truth_chi2`); the
    manifest adds a summary per kind. Returns the manifest entries."""
    if len(sources) == 0:
        raise ValueError("no sources in the chosen split")
    if len(records) != len(sources):
        raise ValueError(f"{len(records)} source records for {len(sources)} sources")
    geometry, noise = config.geometry, config.noise
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(sources), size=n, replace=n > len(sources))
    entries = []
    with atomic_directory(out_dir) as tmp:  # the directory appears whole or not at all
        for i in tqdm(range(n), desc="simulate", disable=tqdm_disable()):
            lens = draw_lens(config.lens, rng)
            j = int(idx[i])
            kind = records[j]["KIND"]
            fine = render_source_fine(records[j], sources[j], geometry.source_pixscale, factor, path=sources_path,
                                      index=j)
            obs = simulate_heldout_observation(fine, lens, geometry, factor, noise, rng, source_bunit=source_bunit)
            name = f"obs-{i:04d}.fits"
            hdr = {"OBSID": (name[:-5], "observation id"), "SRCIDX": (j, "index in the source split"),
                   "SRCKIND": (kind, "source kind (galsim, hst, user)"),
                   "SIMSEED": (seed, "simulation seed"), **(extra or {})}
            if kind == "hst":
                hdr["HDFSCALE"] = (HDF_PER_SOURCE_PIXEL, "HDF pixels per source pixel")
            c = _write_with_truth_chi2(tmp / name, obs, hdr, config)
            entries.append({"file": name, "source_index": j, "kind": kind, "lens": lens.as_dict(),
                            "peak_snr": obs.header["PEAKSNR"][0], "truth_chi2_nu": c["chi2_nu"],
                            "truth_chi2_arc_nu": c["chi2_arc_nu"], "truth_n_arc": c["n_arc"]})
        with open(tmp / "manifest.json", "w") as fh:
            json.dump({"n": n, "seed": seed, "noise_sigma": noise.sigma, "fine_factor": int(factor),
                       "hdf_pixels_per_source_pixel": HDF_PER_SOURCE_PIXEL,
                       "per_kind": heldout_kind_summary(entries), "observations": entries}, fh, indent=1)
    return entries


def heldout_kind_summary(entries: list[dict]) -> dict:
    """Per source kind: the number of observations, the median and mean of the truths' chi2_nu over
    the image and in the arc (observations with arc pixels) and the median peak SNR."""
    out = {}
    for kind in sorted({e["kind"] for e in entries}):
        es = [e for e in entries if e["kind"] == kind]
        c = np.array([e["truth_chi2_nu"] for e in es], float)
        a = np.array([e["truth_chi2_arc_nu"] for e in es if e["truth_chi2_arc_nu"] is not None], float)
        out[kind] = {"n": len(es), "truth_chi2_nu_median": float(np.median(c)), "truth_chi2_nu_mean": float(c.mean()),
                     "truth_chi2_arc_nu_median": float(np.median(a)) if len(a) else None,
                     "truth_chi2_arc_nu_mean": float(a.mean()) if len(a) else None,
                     "peak_snr_median": float(np.median([e["peak_snr"] for e in es]))}
    return out
