"""Shared by the observation-reading tests: a small simulated observation (16x16 at 0.1"/px, Gaussian
source, noise 0.1 electron/s), a way to edit a copy of a FITS file, and the lens seen in a rotated
world frame."""

from __future__ import annotations

import math

import numpy as np
from astropy.io import fits

from pipeline.lensing.config import GeometryConfig, NoiseConfig
from pipeline.lensing.operator import LensParams
from pipeline.lensing.simulate import simulate_observation, write_observation

GEOM = GeometryConfig(image_npix=16, image_pixscale=0.1, source_npix=16, source_pixscale=0.1, supersample=2,
                      psf_npix=7)
LENS = LensParams(x0=0.02, y0=-0.01, q=0.75, phi=0.6, rein=0.5, g1=0.03, g2=-0.02)


def small_source(n=16, pix=0.1) -> np.ndarray:
    """A round Gaussian source [electron/(s arcsec2)], peak 200, sigma 0.15", slightly off centre."""
    c = (np.arange(n) - (n - 1) / 2) * pix
    xx, yy = np.meshgrid(c, c)
    return (200 * np.exp(-((xx - 0.05) ** 2 + (yy + 0.03) ** 2) / (2 * 0.15 ** 2))).astype(np.float32)


def write_small_observation(path):
    """The small observation of :data:`LENS` (seed 1) written to ``path``; returns ``path``."""
    obs = simulate_observation(small_source(), LENS, GEOM, NoiseConfig(sigma=0.1), np.random.default_rng(1))
    write_observation(path, obs)
    return path


def edit_fits(src, dst, fn):
    """Copy FITS ``src`` to ``dst`` with ``fn(hdul)`` applied to the copy; returns ``dst``."""
    with fits.open(src) as f:
        hl = fits.HDUList([h.copy() for h in f])
    fn(hl)
    hl.writeto(dst, overwrite=True)
    return dst


def world_lens(lens: LensParams, Q: np.ndarray) -> LensParams:
    """The array-frame lens in a world frame w = Q a (Q orthogonal; reference pixel at the array centre):
    positions and the directions of phi and of the shear angle map through Q."""
    def turn(angle):
        v = Q @ np.array([math.cos(angle), math.sin(angle)])
        return math.atan2(v[1], v[0])

    x0, y0 = Q @ np.array([lens.x0, lens.y0])
    g = math.hypot(lens.g1, lens.g2)
    theta = turn(0.5 * math.atan2(lens.g2, lens.g1))
    return LensParams(x0=float(x0), y0=float(y0), q=lens.q, phi=turn(lens.phi) % math.pi, rein=lens.rein,
                      g1=g * math.cos(2 * theta), g2=g * math.sin(2 * theta))
