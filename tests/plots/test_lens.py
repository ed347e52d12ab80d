"""The per-lens posterior figure: its panels, what they show, their arcsec extents and units, and the
critical curves / caustics drawn from a posterior file's lens keywords."""

import numpy as np
import pytest
from astropy.io import fits
from matplotlib.lines import Line2D

import pipeline.plots.lens as lens_plot
from pipeline.io.posterior import write_posterior
from pipeline.lensing.critical import curves_from_header
from pipeline.plots.lens import plot_lens, plot_posterior_file

LENS_CARDS = {"LENSMOD": "SIE+SHEAR", "LENSFRAM": "ARRAY", "LENS_X0": 0.05, "LENS_Y0": -0.05, "LENS_Q": 0.7,
              "LENS_PHI": 0.3, "LENS_RE": 0.6, "SHEAR_G1": 0.03, "SHEAR_G2": -0.02}
SRC_PIX, IMG_PIX, NS, NI = 0.05, 0.1, 16, 20
IMAGE_TITLES = ["data y", "model A(mean)", "(y - A(mean)) / sigma\nmedian chi2_nu = 1.00"]
SOURCE_TITLES = ["posterior mean", "posterior std", "truth", "sample 1", "sample 2"]


@pytest.fixture
def figures(monkeypatch):
    """The figures the module saves, captured before they are written and closed."""
    seen = []
    real = lens_plot.save_figure

    def capture(fig, path, **kw):
        seen.append(fig)
        return real(fig, path, **kw)

    monkeypatch.setattr(lens_plot, "save_figure", capture)
    return seen


def posterior_file(path, *, lens=True, image_plane=True):
    """A small posterior FITS as the sampling rule writes it: OBS, and optionally MODEL / RESID HDUs
    and the lens keywords in the primary header."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:NS, :NS] - (NS - 1) / 2
    truth = np.exp(-(xx ** 2 + yy ** 2) / 8.0)
    samples = truth + 0.05 * rng.normal(size=(4, NS, NS))
    write_posterior(path, samples, truth=truth, obs=rng.normal(size=(NI, NI)), src_pixscale=SRC_PIX,
                    obs_pixscale=IMG_PIX, method="rtb", chi2=np.ones(4), obs_file="obs-0000.fits",
                    bunit="electron/(s arcsec2)", extra_header=LENS_CARDS if lens else None)
    model = rng.normal(size=(NI, NI))
    resid = rng.normal(size=(NI, NI))
    if image_plane:
        with fits.open(path) as hdul:
            hdus = [h.copy() for h in hdul]
        for name, data, unit in (("MODEL", model, "electron/s"), ("RESID", resid, "")):
            h = fits.ImageHDU(data.astype(np.float32), name=name)
            h.header["PIXSCALE"] = IMG_PIX
            h.header["BUNIT"] = unit
            hdus.append(h)
        fits.HDUList(hdus).writeto(path, overwrite=True, checksum=True)
    return path, model, resid


def _image_axes(fig):
    """The panels (not the colour bars, which are inset children of the panels), visible ones only."""
    return [ax for ax in fig.axes if ax.axison and ax.images and ax not in
            [c for a in fig.axes for c in a.child_axes]]


def test_posterior_file_with_lens_keys_draws_every_panel_and_the_curves(tmp_path, figures):
    path, model, resid = posterior_file(tmp_path / "post.fits")
    out = plot_posterior_file(path, tmp_path / "lens.png", lens_curves=curves_from_header)
    assert out.is_file() and out.stat().st_size > 10_000
    (fig,) = figures
    panels = _image_axes(fig)
    assert [ax.get_title() for ax in panels] == IMAGE_TITLES + SOURCE_TITLES
    by_title = {ax.get_title(): ax for ax in panels}
    # the MODEL and RESID HDUs are shown as they are, on arcsec axes from the image pixel scale
    np.testing.assert_allclose(by_title["model A(mean)"].images[0].get_array(), model.astype(np.float32))
    np.testing.assert_allclose(by_title[IMAGE_TITLES[2]].images[0].get_array(), resid.astype(np.float32))
    half_i, half_s = NI * IMG_PIX / 2, NS * SRC_PIX / 2
    for title in IMAGE_TITLES:
        assert by_title[title].images[0].get_extent() == pytest.approx([-half_i, half_i, -half_i, half_i])
        assert by_title[title].get_xlim() == pytest.approx((-half_i, half_i))
    for title in SOURCE_TITLES:
        assert by_title[title].images[0].get_extent() == pytest.approx([-half_s, half_s, -half_s, half_s])
    # residual: diverging, +-5 sigma
    assert by_title[IMAGE_TITLES[2]].images[0].get_clim() == (-5.0, 5.0)
    # colour bars carry the units
    labels = {t: by_title[t].child_axes[0].get_ylabel() for t in by_title}
    assert labels["data y"] == labels["model A(mean)"] == "electron/s"
    assert labels[IMAGE_TITLES[2]] == "sigma"
    assert labels["posterior mean"] == labels["posterior std"] == "electron/(s arcsec2)"
    # critical curves on the image-plane panels, caustics on the source-plane ones, the lens's own
    crit, caus = curves_from_header(fits.getheader(path), str(path))
    for title in IMAGE_TITLES + SOURCE_TITLES:
        lines = [ln for ln in by_title[title].lines if isinstance(ln, Line2D)]
        assert len(lines) == 1, title
        expected = crit[0] if title in IMAGE_TITLES else caus[0]
        np.testing.assert_allclose(lines[0].get_xydata(), expected)
    # the critical curve of this SIE encloses pi Rein^2 (shear changes it by ~1e-3 here)
    x, y = crit[0][:, 0], crit[0][:, 1]
    area = 0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))
    assert area == pytest.approx(np.pi * 0.6 ** 2, rel=0.01)


def test_posterior_file_without_lens_or_model_leaves_them_out(tmp_path, figures):
    path, _, _ = posterior_file(tmp_path / "post.fits", lens=False, image_plane=False)
    plot_posterior_file(path, tmp_path / "lens.png", lens_curves=curves_from_header, n_show=1)
    (fig,) = figures
    panels = _image_axes(fig)
    assert [ax.get_title() for ax in panels] == ["data y", "posterior mean", "posterior std", "truth", "sample 1"]
    assert not any(ax.lines for ax in panels)
    # lens keys present but no curve function: no curves either
    path2, _, _ = posterior_file(tmp_path / "post2.fits")
    plot_posterior_file(path2, tmp_path / "lens2.png")
    assert not any(ax.lines for ax in _image_axes(figures[1]))


def test_model_and_residual_from_the_problem_when_the_file_has_none(tmp_path, figures):
    import torch

    from pipeline.problems import LinearInverseProblem

    class Doubling(LinearInverseProblem):
        def __init__(self):
            super().__init__(torch.full((NS, NS), 0.5))
            self.x_shape = self.y_shape = (NS, NS)

        def A(self, x):
            return 2 * x

        def AT(self, r):
            return 2 * r

    path, _, _ = posterior_file(tmp_path / "post.fits", lens=False, image_plane=False)
    mean = fits.getdata(path, "MEAN").astype(np.float64)
    y = torch.ones(NS, NS)
    plot_posterior_file(path, tmp_path / "lens.png", problem=Doubling(), y=y)
    by_title = {ax.get_title(): ax for ax in _image_axes(figures[0])}
    np.testing.assert_allclose(by_title["model A(mean)"].images[0].get_array(), 2 * mean, rtol=1e-6)
    np.testing.assert_allclose(by_title[IMAGE_TITLES[2]].images[0].get_array(), (1 - 2 * mean) / 0.5,
                               rtol=1e-5, atol=1e-5)


def test_plot_lens_source_plane_only(tmp_path, figures):
    mean = np.ones((8, 8))
    out = plot_lens(tmp_path / "bare.png", mean=mean, std=0.1 * mean, samples=np.ones((3, 8, 8)),
                    src_pixscale=0.1, caustics=[np.array([[0.0, 0.0], [0.1, 0.1]])], bunit="Jy")
    assert out.is_file()
    panels = _image_axes(figures[0])
    assert [ax.get_title() for ax in panels] == ["posterior mean", "posterior std", "sample 1", "sample 2"]
    assert all(len(ax.lines) == 1 for ax in panels)
    assert panels[0].child_axes[0].get_ylabel() == "Jy"
