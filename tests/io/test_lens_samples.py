"""The LENSSAMP table: lens samples paired row by row with SAMPLES, with units and marginals."""

import numpy as np
import pytest

from pipeline.io.posterior import read_posterior, write_posterior


def test_round_trip_with_units_and_marginals(tmp_path):
    rng = np.random.default_rng(0)
    n = 6
    lens = np.column_stack([rng.normal(0.7, 0.01, n), rng.uniform(0.6, 0.9, n), rng.normal(0, 0.02, n)])
    path = write_posterior(tmp_path / "p.fits", rng.random((n, 8, 8)), src_pixscale=0.05, method="test",
                           lens_samples=lens, lens_names=["rein", "q", "g1"])
    out = read_posterior(path)["lens_samples"]
    assert out["names"] == ["rein", "q", "g1"]
    assert out["units"] == ["arcsec", "", ""]
    np.testing.assert_array_equal(out["samples"], lens)
    np.testing.assert_allclose(out["mean"], lens.mean(0))
    np.testing.assert_allclose(out["std"], lens.std(0, ddof=1))


def test_absent_when_the_lens_was_given(tmp_path):
    path = write_posterior(tmp_path / "p.fits", np.zeros((2, 4, 4)), src_pixscale=0.05, method="test")
    assert read_posterior(path)["lens_samples"] is None


@pytest.mark.parametrize("lens,names,match", [
    (np.zeros((3, 2)), ["rein", "q"], "pair row by row"),
    (np.zeros((4, 2)), ["rein", "mass"], "unknown lens parameters"),
    (np.full((4, 1), np.nan), ["rein"], "finite"),
])
def test_bad_lens_samples_are_refused_before_writing(tmp_path, lens, names, match):
    with pytest.raises(ValueError, match=match):
        write_posterior(tmp_path / "p.fits", np.zeros((4, 4, 4)), src_pixscale=0.05, method="test",
                        lens_samples=lens, lens_names=names)
    assert not (tmp_path / "p.fits").exists()
