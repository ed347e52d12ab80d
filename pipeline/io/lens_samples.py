"""Lens-parameter samples in a posterior file: the ``LENSSAMP`` binary table.

A posterior that infers the lens pairs every source sample with the lens it was drawn under: row i of
``LENSSAMP`` is the lens of plane i of ``SAMPLES``. One column per free lens parameter (``TTYPEn`` its
name, ``TUNITn`` its unit: arcsec for x0, y0, rein; rad for phi; dimensionless q, t, g1, g2). The
table header carries each parameter's posterior mean and standard deviation as ``LMEANn`` / ``LSTDn``
(n the column number, in the column's unit) and the parameters' names in order as ``LPARAMS``.
"""

from __future__ import annotations

import numpy as np
from astropy.io import fits

EXTNAME = "LENSSAMP"
# the unit of each lens parameter ('' dimensionless)
UNITS = {"x0": "arcsec", "y0": "arcsec", "rein": "arcsec", "q": "", "phi": "rad", "t": "", "g1": "", "g2": ""}


def lens_samples_hdu(samples, names: list[str]) -> fits.BinTableHDU:
    """The ``LENSSAMP`` table of ``samples`` (n, p) with columns ``names`` (p)."""
    arr = np.asarray(samples, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != len(names):
        raise ValueError(f"lens samples must be (n, {len(names)}) for {names}, got {arr.shape}")
    unknown = [k for k in names if k not in UNITS]
    if unknown:
        raise ValueError(f"unknown lens parameters {unknown}; known: {sorted(UNITS)}")
    if not np.isfinite(arr).all():
        raise ValueError("lens samples must be finite")
    cols = [fits.Column(name=k, format="D", unit=UNITS[k] or None, array=arr[:, j]) for j, k in enumerate(names)]
    hdu = fits.BinTableHDU.from_columns(cols, name=EXTNAME)
    hdu.header["LPARAMS"] = (",".join(names), "free lens parameters, in column order")
    for j, k in enumerate(names, start=1):
        unit = f" [{UNITS[k]}]" if UNITS[k] else ""
        hdu.header[f"LMEAN{j}"] = (float(arr[:, j - 1].mean()), f"posterior mean of {k}{unit}")
        hdu.header[f"LSTD{j}"] = (float(arr[:, j - 1].std(ddof=1)) if len(arr) > 1 else 0.0,
                                  f"posterior std of {k}{unit}")
    return hdu


def read_lens_samples(hdul: fits.HDUList) -> dict | None:
    """``{"names", "units", "samples" (n, p) float64, "mean", "std"}`` of a file's ``LENSSAMP``, or None."""
    if EXTNAME not in [h.name for h in hdul]:
        return None
    hdu = hdul[EXTNAME]
    names = [c.name for c in hdu.columns]
    samples = np.stack([np.asarray(hdu.data[k], dtype=np.float64) for k in names], 1)
    return {"names": names, "units": [c.unit or "" for c in hdu.columns], "samples": samples,
            "mean": [hdu.header.get(f"LMEAN{j}") for j in range(1, len(names) + 1)],
            "std": [hdu.header.get(f"LSTD{j}") for j in range(1, len(names) + 1)]}
