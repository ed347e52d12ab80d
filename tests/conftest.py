"""Shared test fixtures (kept small): one torch thread, a tiny training FITS set, a tiny prior config."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from astropy.io import fits

from pipeline.io.fits import write_fits_atomic


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # the project's CPU default (pipeline.runtime.configure_threads)
    yield


def make_blob_images(n: int = 64, size: int = 16, seed: int = 0) -> np.ndarray:
    """(n, size, size) float32 smooth elliptical Gaussian blobs (a stand-in galaxy set)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
    out = np.empty((n, size, size), np.float32)
    for i in range(n):
        cx, cy = rng.normal(0, size / 10, 2)
        s, q, th = rng.uniform(1.5, size / 5), rng.uniform(0.4, 1), rng.uniform(0, np.pi)
        u = (xx - cx) * np.cos(th) + (yy - cy) * np.sin(th)
        v = -(xx - cx) * np.sin(th) + (yy - cy) * np.cos(th)
        out[i] = rng.uniform(0.5, 1.0) * np.exp(-0.5 * (u**2 / s**2 + v**2 / (q * s) ** 2))
    return out


@pytest.fixture
def blob_fits(tmp_path):
    """A training FITS file with HDU TRAIN (64, 16, 16), stored big-endian like real FITS data."""
    path = tmp_path / "sources.fits"
    imgs = make_blob_images().astype(">f4")
    write_fits_atomic(path, [fits.PrimaryHDU(), fits.ImageHDU(imgs, name="TRAIN"),
                             fits.ImageHDU(imgs[:8], name="VALID")])
    return path


TINY_PRIOR = {"unet": "tiny", "base_channels": 8, "steps": 6, "batch_size": 4, "checkpoint_every": 3,
              "log_every": 2, "warmup_steps": 2, "scale": 0.5, "ema_decay": 0.9}


@pytest.fixture
def tiny_config(tmp_path):
    """Write a YAML config with a tiny ``prior:`` section and a 5-step ``chain:``; returns a
    function(**prior overrides) -> path."""
    import yaml

    def make(**overrides):
        section = {**TINY_PRIOR, **overrides}
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump({"prior": section, "chain": {"K": 5}}))
        return path

    return make
