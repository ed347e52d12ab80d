"""Image quality against the truth: PSNR and SSIM for images in [-1, 1] (data range 2).

PSNR = 10 log10(range^2 / MSE) in dB per sample. SSIM is scikit-image's ``structural_similarity``
(Gaussian-weighted 7x7-equivalent window, sigma 1.5, as in Wang et al. 2004), averaged over channels,
per sample, computed on (x + 1) / 2 in [0, 1] with data range 1: SSIM's luminance term assumes
non-negative intensities (on [-1, 1] an inverted image would score > 0). Samples are clipped to
[-1, 1] first (generated images can overshoot slightly).
"""

from __future__ import annotations

import numpy as np
import torch
from skimage.metrics import structural_similarity

DATA_RANGE = 2.0


def _as_np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def psnr(x, truth, data_range: float = DATA_RANGE) -> np.ndarray:
    """Per-sample PSNR [dB] of x (B, C, H, W) against truth (C, H, W) or (B, C, H, W). inf if equal."""
    x, t = np.clip(_as_np(x), -1, 1), _as_np(truth)
    t = np.broadcast_to(t, x.shape)
    mse = ((x - t) ** 2).reshape(x.shape[0], -1).mean(1)
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(data_range ** 2 / mse)


def ssim(x, truth) -> np.ndarray:
    """Per-sample SSIM of x (B, C, H, W) against truth (C, H, W) or (B, C, H, W), both in [-1, 1]."""
    x, t = (np.clip(_as_np(x), -1, 1) + 1) / 2, (_as_np(truth) + 1) / 2
    t = np.broadcast_to(t, x.shape)
    out = np.empty(x.shape[0])
    for i in range(x.shape[0]):
        out[i] = structural_similarity(t[i], x[i], data_range=1.0, channel_axis=0,
                                       gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
    return out
