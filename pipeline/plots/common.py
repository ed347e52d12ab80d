"""Shared plotting helpers: atomic PNG writes, asinh norms, arcsec extents.

The matplotlib backend is left alone here (a notebook keeps its inline backend); the command line picks
the non-interactive Agg backend before any command plots (:func:`pipeline.cli.main`)."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from astropy.visualization import AsinhStretch, ImageNormalize, ManualInterval

from pipeline.io.atomic import atomic_file


def extent(shape, pixscale: float):
    """imshow extent in arcsec with the origin at the array centre (+x along columns)."""
    ny, nx = shape[-2:]
    return [-nx * pixscale / 2, nx * pixscale / 2, -ny * pixscale / 2, ny * pixscale / 2]


def asinh_norm(*images, a: float = 0.1, percent: float = 99.5) -> ImageNormalize:
    """One asinh norm for several images: from the lowest 0.5th-percentile-ish value to the
    ``percent`` percentile over all of them (so truth, mean and samples share a colour scale)."""
    vals = np.concatenate([np.asarray(im, dtype=np.float64)[np.isfinite(im)].ravel() for im in images])
    lo = np.percentile(vals, 100 - percent) if vals.size else 0.0
    hi = np.percentile(vals, percent) if vals.size else 1.0
    if not hi > lo:
        hi = lo + 1.0
    return ImageNormalize(vmin=lo, vmax=hi, interval=ManualInterval(lo, hi), stretch=AsinhStretch(a=a))


def save_figure(fig, path, dpi: int = 110, **savefig_kw) -> Path:
    """Write ``fig`` to ``path`` atomically (see :mod:`pipeline.io.atomic`) and close it."""
    path = Path(path)
    try:
        with atomic_file(path) as tmp:
            fig.savefig(tmp, dpi=dpi, format=(path.suffix or ".png")[1:], **savefig_kw)
    finally:
        plt.close(fig)
    return path
