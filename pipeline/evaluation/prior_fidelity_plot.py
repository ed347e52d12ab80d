"""The prior-fidelity figure: prior draws beside data galaxies on one asinh stretch, the power-spectrum
ratio draws/data against scale, and the pixel-value histograms of both."""

from __future__ import annotations

import numpy as np

from pipeline.evaluation.prior_fidelity import as_stack
from pipeline.plots.common import asinh_norm, plt, save_figure


def _image_grid(fig, spec, images, norm, title: str) -> None:
    side = int(np.ceil(np.sqrt(len(images))))
    inner = spec.subgridspec(side, side, wspace=0.04, hspace=0.04)
    for i in range(side * side):
        ax = fig.add_subplot(inner[i // side, i % side])
        ax.set_axis_off()
        if i < len(images):
            ax.imshow(images[i], origin="lower", cmap="magma", norm=norm, interpolation="nearest")
        if i == side // 2:
            ax.set_title(title, fontsize=9)


def save_fidelity_png(draws, data, stats: dict, path, n_show: int = 16, title: str = "") -> None:
    """Write the figure to ``path``: the first ``n_show`` draws and data images (same asinh norm), the
    power ratio per radial bin (``stats['power_spectrum']``) and log-density histograms of the pixel values
    (shared bins from the 0.05th to the 99.95th percentile of both sets, even on an asinh axis that is linear
    within the data's background std; unit ``stats['pixel_values']['unit']``)."""
    draws, data = as_stack(draws, "draws"), as_stack(data, "data")
    shown_d, shown_r = draws[:n_show], data[:n_show]
    norm = asinh_norm(shown_d, shown_r)
    fig = plt.figure(figsize=(10, 9))
    outer = fig.add_gridspec(2, 2, height_ratios=[1.15, 1], hspace=0.3, wspace=0.25)
    _image_grid(fig, outer[0, 0], shown_d, norm, "prior draws")
    _image_grid(fig, outer[0, 1], shown_r, norm, "data")

    ps = stats["power_spectrum"]
    ax = fig.add_subplot(outer[1, 0])
    ax.semilogx(ps["scale_pix"], ps["ratio"], "o-", ms=3)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.axvspan(min(ps["scale_pix"]), ps["min_scale_pix"], color="0.9", zorder=0)
    ax.set_xticks([2, 4, 8, 16, 32], ["2", "4", "8", "16", "32"])
    ax.minorticks_off()
    ax.set_xlabel("scale [source pixels]")
    ax.set_ylabel("power draws / data")
    ax.set_title(f"max |ratio - 1| at >= {ps['min_scale_pix']:g} px: {ps['max_abs_dev']:.2f}", fontsize=9)

    ax = fig.add_subplot(outer[1, 1])
    both = np.concatenate([draws.ravel(), data.ravel()])
    lo, hi = np.percentile(both, [0.05, 99.95])
    width = max(float(stats["background_std"]["data"]), 1e-12)  # asinh axis: linear within ~ the sky noise
    bins = width * np.sinh(np.linspace(np.arcsinh(lo / width), np.arcsinh(hi / width), 80))
    for values, label in ((draws, "draws"), (data, "data")):
        ax.hist(np.clip(values.ravel(), bins[0], bins[-1]), bins=bins, density=True, histtype="step", label=label)
    ax.set_xscale("asinh", linear_width=width)
    ticks = [t for t in (-1000, -100, -10, 0, 10, 100, 1000, 10000) if bins[0] <= t <= bins[-1]]
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.minorticks_off()
    ax.set_yscale("log")
    ax.set_xlabel(f"pixel value [{stats['pixel_values'].get('unit', '')}]")
    ax.set_ylabel("density")
    ax.set_title(f"KS distance {stats['pixel_values']['ks']:.3f}", fontsize=9)
    ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    save_figure(fig, path, dpi=100)
