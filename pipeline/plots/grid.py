"""A grid of sample images (e.g. prior draws), each with its own colour range."""

from __future__ import annotations

import numpy as np

from pipeline.plots.common import plt, save_figure


def save_grid_png(images: np.ndarray, path, max_images: int = 64, title: str | None = None) -> None:
    """Square grid of (n, H, W) or (n, C, H, W) images (first channel; 3 channels as RGB scaled to
    their maximum), each with its own colour range, 1.2 inch per image at 100 dpi."""
    imgs = images[:max_images]
    if imgs.ndim == 4:
        imgs = imgs[:, 0] if imgs.shape[1] != 3 else np.clip(imgs.transpose(0, 2, 3, 1), 0, None)
    n = len(imgs)
    cols = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(1.2 * cols, 1.2 * rows + (0.3 if title else 0)), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if i < n:
            img = imgs[i]
            if img.ndim == 3:
                img = img / max(float(img.max()), 1e-12)
            ax.imshow(img, origin="lower", cmap="magma", interpolation="nearest")
    if title:
        fig.suptitle(title, fontsize=8)
    fig.subplots_adjust(left=0.005, right=0.995, bottom=0.005, wspace=0.04, hspace=0.04,
                        top=1 - (0.3 / (1.2 * rows + 0.3) if title else 0.005))
    save_figure(fig, path, dpi=100)
