"""The FITS file of prior draws written by ``sample-prior``: HDU SAMPLES, (n, H, W) or (n, C, H, W)
in physical units (``SCALE * x_net + OFFSET``, BUNIT and PIXSCALE [arcsec/pixel] from the training
data when known), provenance of the checkpoint and chain in the primary header."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from astropy.io import fits

from pipeline import __version__
from pipeline.io.fits import write_fits_atomic


def write_prior_samples(path, samples: np.ndarray, prior, *, checkpoint, seed: int, K: int, variance: str,
                        timesteps=None) -> Path:
    """Write ``samples`` (physical units) drawn from ``prior`` (its ``meta``, ``scale`` and ``offset``
    go into the headers) with a ``K``-step chain of ``variance`` ('small' or 'large') and ``seed``;
    ``timesteps``, the chain's grid t_0 = 0 < t_1 < ... < t_K (training steps), goes into ``CHAINGRD``."""
    hdr = fits.Header()
    hdr["ORIGIN"] = ("lensing-rtb-pipeline", "software that wrote this file")
    hdr["PKGVER"] = (__version__, "pipeline package version")
    hdr["COMMAND"] = "sample-prior"
    hdr["CKPT"] = str(Path(checkpoint).resolve())  # may be long: no comment, CONTINUE cards
    hdr["CKSTEP"] = (int(prior.meta.get("step", -1)), "training step of the checkpoint")
    hdr["CFGHASH"] = (str(prior.meta.get("config_hash", "")), "prior config hash")
    hdr["SEED"] = (seed, "sampling seed")
    hdr["CHAIN_K"] = (K, "reverse chain length")
    hdr["CHAINVAR"] = (variance, "reverse variance: small=beta-tilde, large=beta")
    if timesteps is not None:  # may be long: no comment, CONTINUE cards
        hdr["CHAINGRD"] = ",".join(str(int(t)) for t in timesteps)
    hdr["NSAMPLE"] = len(samples)
    hdr["SCALE"] = (prior.scale, "x_phys = SCALE * x_net + OFFSET")
    hdr["OFFSET"] = prior.offset
    data_meta = prior.meta.get("data") or {}
    shdr = fits.Header()
    if data_meta.get("bunit"):
        shdr["BUNIT"] = data_meta["bunit"]
    if data_meta.get("pixscale") is not None:
        shdr["PIXSCALE"] = (float(data_meta["pixscale"]), "arcsec/pixel (from the training data)")
    return write_fits_atomic(path, [fits.PrimaryHDU(header=hdr), fits.ImageHDU(samples, header=shdr, name="SAMPLES")])
