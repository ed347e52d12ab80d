"""Per-lens posterior figure: truth, observation, posterior mean, std, a few samples and the
normalised residual (y - A(mean)) / sigma of the posterior mean."""

from __future__ import annotations

import numpy as np

from pipeline.io.posterior import read_posterior
from pipeline.metrics.chi2 import forward_view, normalised_residual
from pipeline.plots.common import asinh_norm, extent, plt, save_figure


def plot_lens(path, *, mean, std, samples, src_pixscale: float, truth=None, obs=None,
              obs_pixscale: float | None = None, residual=None, n_show: int = 3, title: str | None = None,
              chi2: float | None = None):
    """Write the panel figure to ``path`` (PNG). Source-plane images (ny, nx) in one unit; ``obs``
    and ``residual`` are image-plane maps at ``obs_pixscale`` (arcsec/pixel; defaults to the source
    scale when not given). Truth, mean and samples share one asinh norm; std is linear; the
    residual uses a diverging map clipped at +-5 sigma."""
    samples = np.asarray(samples)
    src = [np.asarray(mean)] + ([np.asarray(truth)] if truth is not None else []) + list(samples[:n_show])
    norm = asinh_norm(*src)
    ext_s = extent(np.shape(mean), src_pixscale)
    ext_i = extent(np.shape(obs if obs is not None else residual if residual is not None else mean),
                   obs_pixscale or src_pixscale)
    panels = []
    if truth is not None:
        panels.append(("truth", truth, "src"))
    if obs is not None:
        panels.append(("observation", obs, "obs"))
    panels += [("posterior mean", mean, "src"), ("posterior std", std, "std")]
    panels += [(f"sample {i + 1}", s, "src") for i, s in enumerate(samples[:n_show])]
    if residual is not None:
        lab = "(y - A(mean)) / sigma" + (f"\nmedian chi2_nu = {chi2:.2f}" if chi2 is not None else "")
        panels.append((lab, residual, "res"))
    ncol = 4
    nrow = int(np.ceil(len(panels) / ncol))
    # a fixed grid: constrained_layout costs ~1 s per figure with eight colour bars
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.1 * ncol, 2.9 * nrow + 0.3), squeeze=False)
    fig.subplots_adjust(left=0.06, right=0.95, bottom=0.08, top=0.88 if nrow == 1 else 0.92, wspace=0.55,
                        hspace=0.45)
    for ax, (label, img, kind) in zip(axes.flat, panels):
        img = np.asarray(img, dtype=np.float64)
        if kind == "src":
            im = ax.imshow(img, origin="lower", extent=ext_s, norm=norm, cmap="magma", interpolation="nearest")
        elif kind == "std":
            im = ax.imshow(img, origin="lower", extent=ext_s, cmap="viridis", vmin=0, interpolation="nearest")
        elif kind == "obs":
            im = ax.imshow(img, origin="lower", extent=ext_i, norm=asinh_norm(img), cmap="magma",
                           interpolation="nearest")
        else:
            im = ax.imshow(img, origin="lower", extent=ext_i, cmap="RdBu_r", vmin=-5, vmax=5,
                           interpolation="nearest")
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("x [arcsec]", fontsize=8)
        ax.set_ylabel("y [arcsec]", fontsize=8)
        ax.tick_params(labelsize=7)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def plot_posterior_file(posterior_path, out_path, *, problem=None, y=None, residual=None, obs_pixscale=None,
                        n_show: int = 3):
    """Plot a posterior FITS file written by :func:`pipeline.io.posterior.write_posterior`.

    The residual panel (y - A(mean)) / sigma needs the forward model: pass ``problem`` and ``y``
    (e.g. from ``load_observation``; the file's XUNITS picks ``physical_forward`` or ``forward``),
    or a precomputed image-plane ``residual``; without either the panel is left out."""
    d = read_posterior(posterior_path)
    if residual is None and problem is not None and y is not None:
        residual = normalised_residual(forward_view(problem, d["units"]), d["mean"], y)
    pix = obs_pixscale if obs_pixscale is not None else d["obs_pixscale"]
    name = d["obs_file"] or str(posterior_path)
    return plot_lens(out_path, mean=d["mean"], std=d["std"], samples=d["samples"], truth=d["truth"],
                     obs=d["obs"], src_pixscale=d["src_pixscale"], obs_pixscale=pix, residual=residual,
                     n_show=n_show, title=f"{d['method']}: {name}", chi2=d["chi2_median"])
