"""Figures render: files exist, are PNGs of sane size, and bad shapes fail loudly."""

import numpy as np
import pytest
from matplotlib.image import imread

from pipeline.io.posterior import write_posterior
from pipeline.metrics.tarp import tarp_summary
from pipeline.plots import plot_coverage, plot_lens, plot_posterior_file


def _png_ok(path, min_w=600, min_h=250):
    assert path.is_file() and path.stat().st_size > 10_000
    img = imread(path)
    assert img.shape[1] >= min_w and img.shape[0] >= min_h
    # not a blank canvas: the panels put many distinct colours on it
    assert np.unique(img.reshape(-1, img.shape[-1])[:, :3], axis=0).shape[0] > 50
    assert not list(path.parent.glob(".*.png"))  # no temp files left


@pytest.mark.slow
def test_lens_figure_from_posterior_file(tmp_path):
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:16, :16] - 7.5
    truth = np.exp(-(xx ** 2 + yy ** 2) / 8.0)
    samples = truth + 0.05 * rng.normal(size=(5, 16, 16))
    obs = rng.normal(size=(20, 20))
    p = write_posterior(tmp_path / "post.fits", samples, truth=truth, obs=obs, src_pixscale=0.05,
                        obs_pixscale=0.1, method="rtb", chi2=np.ones(5), obs_file="obs-0000.fits")
    out = plot_posterior_file(p, tmp_path / "figs" / "lens.png", residual=rng.normal(size=(20, 20)))
    _png_ok(out)
    out2 = plot_lens(tmp_path / "bare.png", mean=truth, std=np.full((16, 16), 0.05), samples=samples,
                     src_pixscale=0.05)
    _png_ok(out2, min_w=400, min_h=200)


def test_coverage_figure(tmp_path):
    rng = np.random.default_rng(1)
    results = {}
    for name, width in (("calibrated", 1.0), ("narrow", 0.3)):
        m = rng.normal(size=(40, 1, 6))
        truths = m[:, 0] + rng.normal(size=(40, 6))
        samples = m + width * rng.normal(size=(40, 50, 6))
        r = tarp_summary(samples, truths, n_bins=10, rng=rng, n_boot=50, n_null=30)
        r["pixel_curve"] = {"levels": [0.2, 0.5, 0.68, 0.95], "all": [0.2, 0.5, 0.7, 0.9],
                            "footprint": [0.1, 0.4, 0.6, 0.8]}
        results[name] = r
    _png_ok(plot_coverage(tmp_path / "coverage.png", results, title="prior set"))
    with pytest.raises((KeyError, ValueError)):
        plot_coverage(tmp_path / "bad.png", {"x": {"alpha": [0, 1]}})
    assert not (tmp_path / "bad.png").exists()


def test_posterior_file_residual_from_problem(tmp_path):
    import torch

    from pipeline.problems import LinearInverseProblem

    class Identity(LinearInverseProblem):
        def __init__(self):
            super().__init__(torch.full((16, 16), 0.5))
            self.x_shape = self.y_shape = (16, 16)

        def A(self, x):
            return x

        def AT(self, r):
            return r

    rng = np.random.default_rng(2)
    s = rng.normal(size=(4, 16, 16))
    p = write_posterior(tmp_path / "p.fits", s, obs=np.zeros((16, 16)), src_pixscale=0.05, method="dps",
                        units="network")
    out = plot_posterior_file(p, tmp_path / "r.png", problem=Identity(), y=torch.zeros(16, 16))
    _png_ok(out)
