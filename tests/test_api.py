"""The Python API (pipeline.api.reconstruct): arrays, CCDData, HDUList and files in, a Reconstruction out,
on the sample command's code path (bit-identical samples for the same observation and seed); bad inputs
refused with one line; the docs example runs."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from astropy.io import fits
from astropy.nddata import CCDData, InverseVariance, StdDevUncertainty

import pipeline
from pipeline.api import (Reconstruction, _file_hdul, example_observation, find_checkpoints, find_config,
                          observation_hdul, reconstruct)
from pipeline.cli import main
from pipeline.errors import InputFileError
from pipeline.io.posterior import read_posterior
from pipeline.lensing.interop import to_pyautolens
from pipeline.lensing.operator import gaussian_psf
from pipeline.lensing.sample import sample_observations

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "config" / "config.yaml"
CKPT = ROOT / "data" / "pretrained"


@pytest.fixture(scope="module")
def example():
    return example_observation(seed=1)


@pytest.fixture(scope="module")
def obs_file(tmp_path_factory, example):
    """The example as an observation file in the project's format (SCI, NOISE, PSF, lens keywords)."""
    path = tmp_path_factory.mktemp("obs") / "example.fits"
    observation_hdul(example["image"], example["noise"], example["psf"], example["lens"],
                     pixel_scale=example["pixel_scale"], unit="electron/s").writeto(path)
    return path


def _arrays(example):
    return {k: example[k] for k in ("noise", "psf", "lens", "pixel_scale")}


@pytest.mark.slow
def test_arrays_in_reconstruction_out(example):
    res = reconstruct(example["image"], **_arrays(example), method="inversion", n=4, seed=0)
    assert isinstance(res, Reconstruction)
    assert res.samples.shape == (4, 32, 32) and res.mean.shape == res.std.shape == (32, 32)
    assert res.model.shape == res.residual.shape == res.data.shape == (32, 32)
    assert np.isfinite(res.samples).all() and (res.std >= 0).all()
    # the inversion is the exact Gaussian posterior: the fit is good on a peak-SNR-25 image
    assert 0.8 < res.chi2["image"] < 1.3
    assert res.chi2["image_per_sample"].shape == (4,)
    assert res.source_unit == "electron/(s arcsec2)" and res.data_unit == "electron/s"
    assert res.lens.rein == pytest.approx(0.7) and res.warnings == []
    assert res.ppc["flag"] is False  # and a misfit would add a warning (below)
    assert "inversion: 4 samples" in res.summary()
    # the source flux (electron/s) is recovered within its posterior spread
    truth_flux = example["truth"].sum() * 0.05 ** 2
    flux = res.source_stats["flux"]
    assert abs(flux["mean"] - truth_flux) < 3 * (flux["hi"] - flux["lo"]) + 0.05 * truth_flux


@pytest.mark.slow
@pytest.mark.parametrize("method", ["rtb_amortized", "inversion"])
def test_same_samples_as_the_sample_command(tmp_path, example, obs_file, method):
    """reconstruct (from the file, and from its arrays) and the sample command give bit-identical samples,
    and to_fits writes the same posterior file."""
    out = tmp_path / "cmd.fits"
    sample_observations(CONFIG, method, CKPT / "prior", CKPT / "posterior", [obs_file], out_file=out, n=4, seed=3)
    cmd = read_posterior(out)
    from_file = reconstruct(obs_file, method=method, n=4, seed=3)
    from_arrays = reconstruct(example["image"], **_arrays(example), method=method, n=4, seed=3)
    for res in (from_file, from_arrays):
        np.testing.assert_array_equal(res.samples, cmd["samples"])
        np.testing.assert_array_equal(res.mean, cmd["mean"])
    from_file.to_fits(tmp_path / "api.fits")
    back = read_posterior(tmp_path / "api.fits")
    for key in ("samples", "mean", "std", "obs", "chi2"):
        np.testing.assert_array_equal(back[key], cmd[key])
    assert back["method"] == method and back["logz"] == cmd["logz"] and back["lens"] == cmd["lens"]


@pytest.mark.slow
def test_ccddata_and_hdulist_in(example, obs_file):
    base = reconstruct(example["image"], **_arrays(example), method="inversion", n=4)
    bad = np.zeros((32, 32), bool)
    bad[0, :4] = True
    ccd = CCDData(example["image"], unit="electron/s", mask=bad,
                  uncertainty=InverseVariance(1 / np.asarray(example["noise"], np.float64) ** 2),
                  meta={"EXPTIME": 1000.0})
    res = reconstruct(ccd, psf=example["psf"], lens=example["lens"], pixel_scale=0.1, method="inversion", n=4)
    assert np.isnan(res.residual[0, :4]).all() and np.isfinite(res.residual[1:]).all()
    assert res.chi2["nu"] == 32 * 32 - 4
    # counts with EXPTIME: the image and its noise are converted to electron/s (the same numbers here)
    ccd_counts = CCDData(example["image"] * 1000.0, unit="electron",
                         uncertainty=StdDevUncertainty(example["noise"] * 1000.0), meta={"EXPTIME": 1000.0})
    counts = reconstruct(ccd_counts, psf=example["psf"], lens=example["lens"], pixel_scale=0.1, method="inversion", n=4)
    np.testing.assert_allclose(counts.mean, base.mean, rtol=1e-4, atol=1e-3 * np.abs(base.mean).max())
    with fits.open(obs_file) as hdul:
        res = reconstruct(hdul, method="inversion", n=4)
    np.testing.assert_array_equal(res.samples, base.samples)


def test_lens_given_with_a_file_replaces_the_files(obs_file):
    hdul, name = _file_hdul(obs_file, {"model": "SIE", "x0": 0.1, "y0": 0.0, "q": 0.9, "phi": 0.0, "rein": 0.6}, None)
    assert name == str(obs_file) and hdul[0].header["LENS_RE"] == 0.6 and "SHEAR_G1" in hdul[0].header


@pytest.mark.parametrize("change,field,text", [
    ({"noise": np.ones((31, 32))}, "noise", "shape (31, 32) != image shape (32, 32)"),
    ({"pixel_scale": None}, "pixel_scale", "required for an array image without a WCS"),
    ({"noise": 0.0}, "noise", "must be finite and > 0"),
    ({"noise": None}, "noise", "required"),
    ({"psf": None}, "psf", "required"),
    ({"lens": None}, "lens", "required"),
    ({"lens": {"model": "NFW", "x0": 0}}, "LENSMOD", "unsupported lens model"),
    ({"mask": np.zeros((3, 3), bool)}, "mask", "shape (3, 3)"),
])
def test_bad_inputs_are_one_line_errors_naming_the_argument(example, change, field, text):
    kw = {**_arrays(example), **change}
    with pytest.raises(InputFileError) as exc:
        reconstruct(example["image"], **kw, method="inversion", n=4)
    msg = str(exc.value)
    assert "\n" not in msg and f"[{field}]" in msg and text in msg


def test_bad_image_and_n_and_file_arguments(example, obs_file):
    with pytest.raises(InputFileError, match=r"reconstruct \[image\]: expected a 2-D image, got shape \(32,\)"):
        reconstruct(example["image"][0], **_arrays(example))
    with pytest.raises(InputFileError, match=r"\[n\]: must be >= 2"):
        reconstruct(example["image"], **_arrays(example), n=1)
    with pytest.raises(InputFileError, match=r"\[noise\]: comes from the observation file"):
        reconstruct(obs_file, noise=1.0)


def test_checkpoints_and_config_are_found_in_order(tmp_path, monkeypatch):
    monkeypatch.delenv("LENSING_RTB_CHECKPOINTS", raising=False)
    assert find_checkpoints() == CKPT
    with pytest.raises(InputFileError, match=r"\[checkpoints\]: no prior/ checkpoint directory inside"):
        find_checkpoints(tmp_path)
    (tmp_path / "prior").mkdir()
    monkeypatch.setenv("LENSING_RTB_CHECKPOINTS", str(tmp_path))
    assert find_checkpoints() == tmp_path
    assert find_config(None, tmp_path) == CONFIG
    (tmp_path / "config.yaml").write_text("device: cpu\n")
    assert find_config(None, tmp_path) == tmp_path / "config.yaml"
    with pytest.raises(InputFileError, match=r"\[config\]: config file not found"):
        find_config(tmp_path / "missing.yaml", tmp_path)


@pytest.mark.slow
def test_plot_returns_a_figure_with_arcsec_axes_and_units(example):
    res = reconstruct(example["image"], **_arrays(example), method="inversion", n=4)
    fig = res.plot(n_show=2)
    labels = {ax.get_xlabel() for ax in fig.axes}
    assert "x [arcsec]" in labels
    colour_bars = {cb.get_ylabel() for ax in fig.axes for cb in ax.child_axes}
    assert colour_bars == {"electron/s", "sigma", "electron/(s arcsec2)"}
    titles = [ax.get_title() for ax in fig.axes]
    assert "posterior mean" in titles and "posterior std" in titles and "sample 2" in titles


@pytest.mark.slow
def test_import_pipeline_stays_light_and_exports_reconstruct_lazily():
    code = ("import sys, pipeline; print('torch' in sys.modules, 'pipeline.api' in sys.modules); "
            "f = pipeline.reconstruct; print('pipeline.api' in sys.modules, f.__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT,
                         timeout=120).stdout.split()
    assert out == ["False", "False", "True", "pipeline.api"]
    assert pipeline.reconstruct is reconstruct
    with pytest.raises(AttributeError):
        pipeline.no_such_name  # noqa: B018


@pytest.mark.slow
def test_importing_plots_or_the_api_leaves_the_matplotlib_backend_alone():
    """Only the command line picks Agg: a notebook importing the package keeps its own backend."""
    code = ("import matplotlib, pipeline.plots, pipeline.api; "
            "print(matplotlib.rcParams._get_backend_or_none())")
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT,
                         env=env, timeout=120).stdout.strip()
    assert out == "None"


def test_the_command_line_picks_agg(monkeypatch):
    monkeypatch.setattr(matplotlib, "use", lambda name: calls.append(name))
    calls = []
    assert main(["config", "schema", "--check"]) == 0
    assert calls == ["Agg"]


def _python_block(text: str, heading: str | None = None) -> str | None:
    """The first ```python block of ``text`` (after ``heading`` when given), or None."""
    if heading is not None:
        if heading not in text:
            return None
        text = text.split(heading, 1)[1]
    m = re.search(r"```python\n(.*?)```", text, re.S)
    return m.group(1) if m else None


@pytest.mark.slow
def test_the_docs_example_runs_and_the_readme_shows_the_same(tmp_path):
    example = _python_block((ROOT / "docs" / "api.md").read_text())
    assert example is not None and len(example.strip().splitlines()) <= 15
    readme = _python_block((ROOT / "README.md").read_text(), "## Python")
    if readme is not None:
        assert readme == example, "README's ## Python example differs from docs/api.md's"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-c", example], capture_output=True, text=True, cwd=tmp_path, env=env,
                         timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert (tmp_path / "reconstruction.png").stat().st_size > 10_000
    assert read_posterior(tmp_path / "reconstruction.fits")["method"] == "rtb_amortized"



def _lenstronomy_observation():
    """A peak-SNR-25 image made with lenstronomy in its RA-left frame (transform_pix2angle = diag(-0.1, 0.1)):
    an elliptical Sersic source behind an SIE + shear given in lenstronomy's parameters (e1/e2,
    gamma1/gamma2). Returns (image [electron/s per pixel], noise, kwargs_lens, kwargs_data)."""
    lenstronomy = pytest.importorskip("lenstronomy")  # noqa: F841
    from lenstronomy.Data.imaging_data import ImageData
    from lenstronomy.Data.psf import PSF
    from lenstronomy.ImSim.image_model import ImageModel
    from lenstronomy.LensModel.lens_model import LensModel
    from lenstronomy.LightModel.light_model import LightModel


    n, pix, sigma = 32, 0.1, 0.2573
    c = (n - 1) / 2 * pix
    kwargs_data = {"image_data": np.zeros((n, n)), "ra_at_xy_0": c, "dec_at_xy_0": -c,
                   "transform_pix2angle": np.diag([-pix, pix])}
    kwargs_lens = [{"theta_E": 0.7, "e1": 0.08, "e2": 0.06, "center_x": 0.08, "center_y": -0.03},
                   {"gamma1": 0.03, "gamma2": -0.02, "ra_0": 0, "dec_0": 0}]
    kwargs_source = [{"amp": 1.0, "R_sersic": 0.12, "n_sersic": 1.5, "e1": 0.1, "e2": -0.05, "center_x": 0.05,
                      "center_y": 0.02}]
    psf = PSF(psf_type="PIXEL", kernel_point_source=gaussian_psf(0.15, pix / 2, 11), point_source_supersampling_factor=2)
    model = ImageModel(ImageData(**kwargs_data), psf, lens_model_class=LensModel(["SIE", "SHEAR"]),
                       source_model_class=LightModel(["SERSIC_ELLIPSE"]),
                       kwargs_numerics={"supersampling_factor": 2, "supersampling_convolution": True})
    image = model.image(kwargs_lens=kwargs_lens, kwargs_source=kwargs_source)
    image *= 25 * sigma / image.max()
    image = image + sigma * np.random.default_rng(0).standard_normal(image.shape)
    return image, sigma, kwargs_lens, kwargs_data


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_lens_in_lenstronomy_parameters_fits_a_lenstronomy_image():
    """The lens given as lenstronomy kwargs_lens (with its RA-left kwargs_data) fits the image lenstronomy
    made to the noise; the same numbers read naively as array-frame keywords do not."""
    image, sigma, kwargs_lens, kwargs_data = _lenstronomy_observation()
    res = reconstruct(image, noise=sigma, psf=0.15, lens=kwargs_lens, lens_models=["SIE", "SHEAR"],
                      kwargs_data=kwargs_data, method="inversion", n=4)
    assert res.image_pixscale == pytest.approx(0.1)
    assert res.chi2["image"] < 1.3, res.chi2
    q, phi = 1 - 2 * 0.1 / (1 + 0.1), 0.5 * np.arctan2(0.06, 0.08)
    naive = {"model": "SIE+SHEAR", "x0": 0.08, "y0": -0.03, "q": q, "phi": phi, "rein": 0.7, "g1": 0.03,
             "g2": -0.02}
    wrong = reconstruct(image, noise=sigma, psf=0.15, lens=naive, pixel_scale=0.1, method="inversion", n=4)
    assert wrong.chi2["image"] > res.chi2["image"] + 0.5, (wrong.chi2, res.chi2)


@pytest.mark.slow
def test_lens_as_pyautolens_profiles_gives_the_same_reconstruction(example):
    _name, mass, shear = to_pyautolens(example["lens"])
    base = reconstruct(example["image"], **_arrays(example), method="inversion", n=4)
    res = reconstruct(example["image"], **{**_arrays(example), "lens": (mass, shear)}, method="inversion", n=4)
    for a, b in zip(dataclasses.astuple(res.lens), dataclasses.astuple(base.lens)):
        assert a == pytest.approx(b, abs=1e-9)
    np.testing.assert_allclose(res.mean, base.mean, rtol=1e-4, atol=1e-4 * np.abs(base.mean).max())


def test_a_missing_file_is_a_one_line_error():
    with pytest.raises(InputFileError, match=r"nope.fits: FITS file not found"):
        reconstruct("nope.fits", lens={"model": "SIE", "x0": 0, "y0": 0, "q": 0.8, "phi": 0, "rein": 0.7})


@pytest.mark.slow
def test_a_fit_the_model_cannot_make_carries_the_predictive_check_warning(example):
    """The example image blurred again by 1.5 pixels (arcs wider than the given PSF makes them, the noise
    smoothed below the stated sigma): the residuals are inconsistent with the noise model, and the result's
    ``ppc`` flag and warnings say so."""
    from scipy.ndimage import gaussian_filter

    blurred = gaussian_filter(example["image"], 1.5) + 0.0  # extra blur of 1.5 pixels, noise unchanged
    res = reconstruct(blurred, **_arrays(example), method="inversion", n=4, seed=0)
    assert res.ppc["flag"] is True
    assert any(w.startswith("posterior predictive check:") for w in res.warnings)
