"""Per-lens posterior figure: the image plane on top (data y, the model A(mean) of the posterior mean and
the normalised residual (y - A(mean)) / sigma, with the lens's critical curves), the source plane below
(posterior mean, posterior std, the truth and a few samples when given, with the caustics).

Every panel has arcsec axes (array frame: +x along columns, +y along rows, origin at the array centre;
extent from the pixel scale), brightness panels an asinh stretch (data and model share one, the source
panels another) and a colour bar labelled with its unit. The grid is fixed (no constrained layout).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from astropy.io import fits
from matplotlib.ticker import MaxNLocator

from pipeline.io.posterior import read_posterior
from pipeline.metrics.chi2 import forward_view, normalised_residual
from pipeline.plots.common import asinh_norm, extent, plt, save_figure

CURVE_STYLE = dict(color="#39ff14", lw=0.9, alpha=0.9)   # critical curves and caustics
RESID_LIMIT = 5.0                                         # residual colour range [sigma]
PANEL_INCH = 2.4                                          # panel side [inch]


def _image_panels(obs, model, residual, chi2) -> list[tuple]:
    panels = []
    if obs is not None:
        panels.append(("data y", obs, "img"))
    if model is not None:
        panels.append(("model A(mean)", model, "img"))
    if residual is not None:
        lab = "(y - A(mean)) / sigma" + (f"\nmedian chi2_nu = {chi2:.2f}" if chi2 is not None else "")
        panels.append((lab, residual, "res"))
    return panels


def _source_panels(mean, std, truth, samples, n_show: int) -> list[tuple]:
    panels = [("posterior mean", mean, "src"), ("posterior std", std, "std")]
    if truth is not None:
        panels.append(("truth", truth, "src"))
    panels += [(f"sample {i + 1}", s, "src") for i, s in enumerate(samples[:n_show])]
    return panels


def _draw(fig, ax, img, kind: str, ext, norms: dict, units: dict):
    """One panel: the image on arcsec axes with a colour bar labelled with its unit."""
    img = np.asarray(img, dtype=np.float64)
    kw = dict(origin="lower", extent=ext, interpolation="nearest")
    if kind == "res":
        cmap = plt.get_cmap("RdBu_r").with_extremes(bad="0.6")
        im = ax.imshow(img, cmap=cmap, vmin=-RESID_LIMIT, vmax=RESID_LIMIT, **kw)
    elif kind == "std":
        im = ax.imshow(img, cmap="viridis", vmin=0, **kw)
    else:
        im = ax.imshow(img, cmap="magma", norm=norms[kind], **kw)
    # an inset colour bar keeps every panel the same size; few ticks keep the figure fast to draw
    cb = fig.colorbar(im, cax=ax.inset_axes([1.04, 0.0, 0.06, 1.0]))
    cb.ax.yaxis.set_major_locator(MaxNLocator(5))
    cb.ax.tick_params(labelsize=7)
    cb.set_label(units[kind], fontsize=7)
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_locator(MaxNLocator(4))
    ax.set_xlabel("x [arcsec]", fontsize=8)
    ax.tick_params(labelsize=7)


def _overlay(ax, curves, ext) -> None:
    """Draw (k, 2) curves [arcsec] on ``ax`` without changing its limits (curves outside are clipped)."""
    for c in curves or ():
        ax.plot(c[:, 0], c[:, 1], **CURVE_STYLE)
    ax.set_xlim(ext[0], ext[1])
    ax.set_ylim(ext[2], ext[3])


def plot_lens(path, **panels):
    """Write :func:`lens_figure` of ``panels`` to ``path`` (PNG) and return the path."""
    return save_figure(lens_figure(**panels), path)


def lens_figure(*, mean, std, samples, src_pixscale: float, truth=None, obs=None,
                obs_pixscale: float | None = None, model=None, residual=None, critical=None, caustics=None,
                bunit: str = "", image_bunit: str = "", n_show: int = 2, title: str | None = None,
                chi2: float | None = None):
    """The panel figure (a matplotlib Figure).

    Source plane: ``mean``, ``std``, ``truth`` and ``samples`` (n, ny, nx) in ``bunit`` at ``src_pixscale``
    [arcsec/pixel]; the first ``n_show`` samples are drawn. Image plane: ``obs`` (data y) and ``model``
    (A(mean)) in ``image_bunit`` and ``residual`` ((y - A(mean)) / sigma, dimensionless, NaN where masked)
    at ``obs_pixscale`` [arcsec/pixel; the source scale when not given]. ``critical`` and ``caustics``:
    lists of (k, 2) arrays of (x, y) [arcsec, array frame], drawn over the image- and source-plane panels.
    ``chi2``: the median chi2_nu shown with the residual. Image-plane panels that are None are left out."""
    samples = np.asarray(samples)
    img_row = _image_panels(obs, model, residual, chi2)
    src_row = _source_panels(mean, std, truth, samples, n_show)
    rows = [r for r in (img_row, src_row) if r]
    ncol = max(len(r) for r in rows)
    src_imgs = [mean] + ([truth] if truth is not None else []) + list(samples[:n_show])
    norms = {"src": asinh_norm(*src_imgs)}
    if any(k == "img" for _, _, k in img_row):
        norms["img"] = asinh_norm(*[im for _, im, k in img_row if k == "img"])
    units = {"src": bunit, "std": bunit, "img": image_bunit, "res": "sigma"}
    ext_s = extent(np.shape(mean), src_pixscale)
    first_img = next((im for _, im, _ in img_row), mean)
    ext_i = extent(np.shape(first_img), obs_pixscale or src_pixscale)
    # fixed layout in inches: panel side, gaps for tick labels / colour bars, margins
    gap_w, gap_h, left, right, top, bottom = 1.2, 0.8, 0.65, 0.85, 0.85, 0.6
    width = left + ncol * PANEL_INCH + (ncol - 1) * gap_w + right
    height = top + len(rows) * PANEL_INCH + (len(rows) - 1) * gap_h + bottom
    fig, axes = plt.subplots(len(rows), ncol, figsize=(width, height), squeeze=False)
    fig.subplots_adjust(left=left / width, right=1 - right / width, bottom=bottom / height, top=1 - top / height,
                        wspace=gap_w / PANEL_INCH, hspace=gap_h / PANEL_INCH)
    for r, row in enumerate(rows):
        image_plane = row is img_row
        ext, curves = (ext_i, critical) if image_plane else (ext_s, caustics)
        for ax, (label, img, kind) in zip(axes[r], row):
            _draw(fig, ax, img, kind, ext, norms, units)
            _overlay(ax, curves, ext)
            ax.set_title(label, fontsize=9)
        axes[r][0].set_ylabel("y [arcsec]", fontsize=8)
        for ax in axes[r][len(row):]:
            ax.set_axis_off()
    notes = (["critical curves (image plane)"] if img_row and critical else []) + \
        (["caustics (source plane)"] if caustics else [])
    if notes:
        fig.text(0.5, 0.005, "green lines: " + ", ".join(notes), ha="center", va="bottom", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def read_image_plane(path) -> dict:
    """The image-plane HDUs of a posterior file: {OBS, MODEL, RESID: (array or None)}, ``image_bunit``
    (MODEL's BUNIT, else OBS's) and ``image_pixscale`` [arcsec/pixel] (PIXSCALE of MODEL, RESID or OBS;
    None when absent)."""
    out = {"OBS": None, "MODEL": None, "RESID": None, "image_bunit": "", "image_pixscale": None}
    with fits.open(path, memmap=False) as hdul:
        names = [h.name for h in hdul]
        for name in ("OBS", "MODEL", "RESID"):
            if name in names:
                out[name] = np.asarray(hdul[name].data, dtype=np.float64)
        for name in ("MODEL", "RESID", "OBS"):
            if name in names and out["image_pixscale"] is None and "PIXSCALE" in hdul[name].header:
                out["image_pixscale"] = float(hdul[name].header["PIXSCALE"])
        for name in ("MODEL", "OBS"):
            if name in names and not out["image_bunit"]:
                out["image_bunit"] = str(hdul[name].header.get("BUNIT", ""))
    return out


def _model_image(problem, units: str, mean) -> np.ndarray:
    """A(mean) [data units] on the image grid with the forward model the file's XUNITS names."""
    view = forward_view(problem, units)
    with torch.no_grad():
        x = torch.as_tensor(np.asarray(mean), dtype=torch.float32, device=problem.sigma.device)[None]
        return view.forward(x)[0].double().cpu().numpy()


def plot_posterior_file(posterior_path, out_path, *, problem=None, y=None, residual=None, obs_pixscale=None,
                        n_show: int = 2, lens_curves: Callable | None = None):
    """Plot a posterior FITS file written by :func:`pipeline.io.posterior.write_posterior`.

    The model and residual panels use the file's ``MODEL`` and ``RESID`` HDUs when it has them (a given
    ``residual``, image plane and dimensionless, replaces RESID); else they are computed from ``problem``
    and ``y`` (the file's XUNITS picks ``physical_forward`` or ``forward``); without any of these they are
    left out.
    ``lens_curves``: a function (primary header, file name) -> (critical curves, caustics) or None, e.g.
    :func:`pipeline.lensing.critical.curves_from_header` (the lens keywords LENSMOD, LENS_X0, ...); the
    curves are drawn when it returns them. ``obs_pixscale`` [arcsec/pixel] overrides the file's."""
    d = read_posterior(posterior_path)
    ip = read_image_plane(posterior_path)
    model, resid = ip["MODEL"], residual if residual is not None else ip["RESID"]
    if problem is not None and y is not None:
        model = model if model is not None else _model_image(problem, d["units"], d["mean"])
        if resid is None:
            resid = normalised_residual(forward_view(problem, d["units"]), d["mean"], y)
    curves = lens_curves(d["header"], str(posterior_path)) if lens_curves is not None else None
    critical, caustics = curves if curves is not None else (None, None)
    pix = obs_pixscale if obs_pixscale is not None else (d["obs_pixscale"] or ip["image_pixscale"])
    name = d["obs_file"] or str(posterior_path)
    return plot_lens(out_path, mean=d["mean"], std=d["std"], samples=d["samples"], truth=d["truth"],
                     obs=ip["OBS"], model=model, residual=resid, src_pixscale=d["src_pixscale"], obs_pixscale=pix,
                     critical=critical, caustics=caustics, bunit=d["bunit"], image_bunit=ip["image_bunit"],
                     n_show=n_show, title=f"{d['method']}: {name}", chi2=d["chi2_median"])
