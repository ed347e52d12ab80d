"""Parametric source galaxies drawn with GalSim.

A Sersic bulge + exponential disk + RandomKnots clumps with random flux, sizes, ellipticity, orientation
and offset, convolved with a small Gaussian (the knots are delta functions) and drawn without pixel
response (``method='no_pixel'``). Values are surface brightness [flux / arcsec^2]: drawn flux per pixel
/ pixscale^2. The parameters of each galaxy are kept (:data:`GALSIM_PARAMS`) so that it can be redrawn
at another pixel scale.
"""

from __future__ import annotations

import functools
import math
import multiprocessing

import numpy as np
from tqdm import tqdm

from pipeline.lensing.config import GalSimConfig
from pipeline.runtime import tqdm_disable

# Per-galaxy generation parameters, the galsim columns of the sources file's KINDS table.
GALSIM_PARAMS = ("FLUX", "BULGE_F", "BULGE_N", "BULGE_HLR", "DISK_HLR", "KNOT_F", "N_KNOTS", "KNOT_SEED", "G",
                 "BETA", "DX", "DY", "SMOOTH")


def loguniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    """One draw log-uniform in [lo, hi] (any positive unit; the result has the same unit)."""
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def draw_galsim_params(rng: np.random.Generator, cfg: GalSimConfig) -> dict:
    """The parameters of one parametric galaxy: FLUX [flux], BULGE_F, BULGE_N (NaN without bulge),
    BULGE_HLR / DISK_HLR [arcsec], KNOT_F, N_KNOTS, KNOT_SEED (GalSim seed of the knot positions, -1
    without knots), G (reduced shear of the disk; the bulge gets G/2), BETA [rad], DX / DY [arcsec] and
    SMOOTH (FWHM of the Gaussian convolved in) [arcsec]."""
    flux = loguniform(rng, *cfg.flux)
    fb = rng.uniform(*cfg.bulge_fraction)
    fk = rng.uniform(*cfg.knots_fraction)
    nk = int(rng.integers(cfg.n_knots[0], cfg.n_knots[1] + 1))
    hd = rng.uniform(*cfg.disk_hlr)
    hb = min(rng.uniform(*cfg.bulge_hlr), hd)
    e = rng.uniform(*cfg.ellipticity)
    beta = rng.uniform(0.0, math.pi)
    dx, dy = rng.uniform(-cfg.offset, cfg.offset, size=2)
    n = rng.uniform(*cfg.bulge_n) if fb > 0 else float("nan")
    seed = int(rng.integers(1, 2**31 - 1)) if fb < 1 and fk > 0 else -1
    return {"FLUX": flux, "BULGE_F": float(fb), "BULGE_N": float(n), "BULGE_HLR": float(hb), "DISK_HLR": float(hd),
            "KNOT_F": float(fk), "N_KNOTS": nk, "KNOT_SEED": seed, "G": float(e), "BETA": float(beta),
            "DX": float(dx), "DY": float(dy), "SMOOTH": float(cfg.smooth_fwhm)}


def render_galsim(p: dict, npix: int, pixscale: float) -> np.ndarray:
    """The galaxy of parameters ``p`` (:func:`draw_galsim_params`) point-sampled on an npix x npix grid
    of ``pixscale`` [arcsec/px]: (npix, npix) float64 surface brightness [flux / arcsec^2]."""
    import galsim  # heavy: imported by the processes that render

    flux, fb, fk = p["FLUX"], p["BULGE_F"], p["KNOT_F"]
    hd, e = p["DISK_HLR"], p["G"]
    beta = p["BETA"] * galsim.radians
    parts = []
    if fb > 0:  # the bulge is rounder than the disk and shares its orientation
        parts.append(galsim.Sersic(n=p["BULGE_N"], half_light_radius=p["BULGE_HLR"], flux=flux * fb)
                     .shear(g=0.5 * e, beta=beta))
    disk_flux = flux * (1 - fb)
    if disk_flux > 0:
        disk = []
        if fk < 1:
            disk.append(galsim.Exponential(half_light_radius=hd, flux=disk_flux * (1 - fk)))
        if fk > 0:  # RandomKnots refuses flux=: the flux is set on its profile
            prof = galsim.Exponential(half_light_radius=hd, flux=disk_flux * fk)
            disk.append(galsim.RandomKnots(npoints=int(p["N_KNOTS"]), profile=prof,
                                           rng=galsim.BaseDeviate(int(p["KNOT_SEED"]))))
        parts.append(galsim.Add(disk).shear(g=e, beta=beta))
    gal = galsim.Add(parts).shift(p["DX"], p["DY"])
    gal = galsim.Convolve(gal, galsim.Gaussian(fwhm=p["SMOOTH"]))
    img = gal.drawImage(nx=npix, ny=npix, scale=pixscale, method="no_pixel").array
    return img.astype(np.float64) / pixscale ** 2


def galsim_galaxy(rng: np.random.Generator, cfg: GalSimConfig, npix: int, pixscale: float) -> np.ndarray:
    """One parametric galaxy on an npix x npix grid of ``pixscale`` [arcsec/px]: (npix, npix) float64
    surface brightness [flux / arcsec^2]."""
    return render_galsim(draw_galsim_params(rng, cfg), npix, pixscale)


def galsim_sources(n: int, cfg: GalSimConfig, npix: int, pixscale: float, seed: int,
                   return_params: bool = False, workers: int = 1):
    """``n`` parametric galaxies (n, npix, npix) float32 [flux / arcsec^2] on a grid of ``pixscale``
    [arcsec/px], reproducible from ``seed``; with ``return_params`` also their parameters (list of
    dicts, :func:`draw_galsim_params`).

    All parameters are drawn first, in order, from one generator; rendering is a pure function of them,
    so ``workers`` > 1 processes give the same images bit for bit."""
    rng = np.random.default_rng(seed)
    params = [draw_galsim_params(rng, cfg) for _ in range(n)]
    out = np.zeros((n, npix, npix), np.float32)
    render = functools.partial(render_galsim, npix=npix, pixscale=pixscale)
    if workers > 1 and n > 1:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            images = pool.imap(render, params, chunksize=max(1, n // (8 * workers)))
            for i, img in enumerate(tqdm(images, total=n, desc="galsim", disable=tqdm_disable())):
                out[i] = img
    else:
        for i, p in enumerate(tqdm(params, desc="galsim", disable=tqdm_disable())):
            out[i] = render(p)
    return (out, params) if return_params else out
