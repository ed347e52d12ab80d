"""Prior-fidelity statistics and the classifier two-sample test on images whose answers are known."""

import numpy as np
import pytest

from pipeline.evaluation.prior_classifier import (ClassifierBudget, auc, auc_null, classifier_two_sample_test,
                                                  split_halves)
from pipeline.evaluation.prior_fidelity import (background_std, corner_std, fidelity_statistics, fraction_below,
                                                half_light_radius, ks_two_sample, power_spectrum_ratio,
                                                radial_power_spectrum, total_flux)
from tests.conftest import make_blob_images


def _gaussian(size=32, sigma=3.0, cx=0.0, cy=0.0, peak=1000.0):
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
    return peak * np.exp(-0.5 * ((xx - cx) ** 2 + (yy - cy) ** 2) / sigma**2)


def test_background_std_pools_the_pixels_below_one_percent_of_each_peak():
    img = np.zeros((32, 32))
    img[::2, :] = 1.0
    img[1::2, :] = -1.0  # background: +-1, std exactly 1
    img[10:14, 10:14] = 50.0  # above 1 % of the peak: not background
    img[12, 12] = 1000.0
    other = 3 * img  # its own peak (3000) sets its own threshold; background +-3
    assert background_std(img[None]) == pytest.approx(1.0, abs=1e-12)
    expect = np.sqrt((1.0 + 9.0) / 2)  # pooled: half the pixels +-1, half +-3, mean 0
    assert background_std(np.stack([img, other])) == pytest.approx(expect, rel=1e-3)


def test_corner_std_uses_the_four_4x4_corners_only():
    img = np.full((32, 32), 500.0)
    for sl in [(slice(0, 4), slice(0, 4)), (slice(0, 4), slice(-4, None))]:
        img[sl] = 3.0
    for sl in [(slice(-4, None), slice(0, 4)), (slice(-4, None), slice(-4, None))]:
        img[sl] = -3.0
    assert corner_std(img[None]) == pytest.approx(3.0, abs=1e-12)
    with pytest.raises(ValueError, match="corner size"):
        corner_std(np.zeros((1, 6, 6)))


def test_fraction_below_is_strict_and_pooled():
    imgs = np.zeros((2, 4, 4))
    imgs[0, 0, :3] = -6.0
    imgs[1, 0, 0] = -5.0  # not strictly below -5
    assert fraction_below(imgs, -5.0) == pytest.approx(3 / 32)


def test_ks_two_sample_distance_and_p_value():
    rng = np.random.default_rng(0)
    a = rng.normal(size=2000)
    same = ks_two_sample(a, a)
    assert same["ks"] == 0.0 and same["p"] == pytest.approx(1.0)
    shifted = ks_two_sample(a, rng.normal(size=2000) + 1.0)
    assert shifted["ks"] == pytest.approx(0.383, abs=0.04)  # 2 Phi(1/2) - 1 for a unit shift
    assert shifted["p"] < 1e-50
    assert ks_two_sample([1.0, np.nan, 2.0], [1.0, 2.0])["ks"] == 0.0  # NaNs dropped


def test_power_spectrum_puts_a_cosine_in_its_bin_and_keeps_parseval():
    yy, xx = np.mgrid[:32, :32]
    img = np.cos(2 * np.pi * 4 * xx / 32)[None]
    k, scale, power = radial_power_spectrum(img)
    assert k.tolist() == list(range(1, 17)) and scale[3] == 8.0
    assert np.argmax(power) == 3 and np.all(power[np.arange(16) != 3] < 1e-20)
    white = np.random.default_rng(1).normal(size=(50, 32, 32))
    full = (np.abs(np.fft.fft2(white)) ** 2).mean(0) / 1024
    assert full.sum() == pytest.approx((white**2).sum(axis=(1, 2)).mean(), rel=1e-10)  # Parseval, our normalisation
    _, _, pw = radial_power_spectrum(white)
    np.testing.assert_allclose(pw, 1.0, rtol=0.15)  # white noise of unit variance: flat at 1


def test_power_ratio_of_doubled_noise_is_four_and_max_deviation_over_large_scales():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(200, 32, 32))
    res = power_spectrum_ratio(2 * a, a)
    np.testing.assert_allclose(res["ratio"], 4.0, rtol=1e-10)
    assert res["max_abs_dev"] == pytest.approx(3.0)
    b = rng.normal(size=(200, 32, 32))
    res = power_spectrum_ratio(a + 0.0 * b, b, min_scale=4.0)
    assert max(res["scale_pix"]) == 32 and min(res["scale_pix"]) == 2
    keep = np.asarray(res["scale_pix"]) >= 4
    assert res["max_abs_dev"] == pytest.approx(np.max(np.abs(np.asarray(res["ratio"])[keep] - 1)))
    assert res["max_abs_dev"] < 0.2  # two independent white-noise sets


def test_total_flux_is_the_sum_times_the_pixel_area():
    imgs = np.full((3, 32, 32), 2.0)
    np.testing.assert_allclose(total_flux(imgs, 0.05), 2.0 * 1024 * 0.05**2)


def test_half_light_radius_of_a_gaussian_and_a_disk_in_arcsec():
    s = 3.0
    hlr = half_light_radius(np.stack([_gaussian(sigma=s), _gaussian(sigma=s, cx=4.3, cy=-2.7)]), 0.05)
    expect = s * np.sqrt(2 * np.log(2)) * 0.05  # continuous Gaussian: sigma sqrt(2 ln 2)
    np.testing.assert_allclose(hlr, expect, rtol=0.04)  # off-centre too: around its own centroid
    # (pixel-centre growth curve: a few per cent discretisation error at radii of ~3 pixels)
    yy, xx = np.mgrid[:64, :64] - 31.5
    disk = (np.hypot(xx, yy) < 20).astype(float)
    assert half_light_radius(disk[None], 1.0)[0] == pytest.approx(20 / np.sqrt(2), rel=0.03)
    noisy = _gaussian(sigma=s) + np.where(np.arange(1024).reshape(32, 32) % 2, -50.0, 0.0)
    assert half_light_radius(noisy[None], 1.0)[0] < half_light_radius(_gaussian(sigma=s)[None], 1.0)[0] * 1.01
    assert np.isnan(half_light_radius(-np.ones((1, 8, 8)), 1.0)[0])


def test_fidelity_statistics_of_a_set_against_itself_and_against_a_noisier_copy():
    rng = np.random.default_rng(3)
    data = np.zeros((200, 32, 32))
    data[:, 8:24, 8:24] = 1000 * make_blob_images(200, 16, seed=1)  # galaxies in the middle, sky in the corners
    data += rng.normal(0, 2.0, data.shape)
    draws = data + rng.normal(0, 8.0, data.shape)
    same = fidelity_statistics(data, data, 0.05)
    assert same["corner_std"]["ratio"] == 1.0 and same["pixel_values"]["ks"] == 0.0
    assert same["power_spectrum"]["max_abs_dev"] == 0.0 and same["half_light_radius"]["ks"] == 0.0
    st = fidelity_statistics(draws, data, 0.05, neg_threshold=-5.0)
    assert st["corner_std"]["ratio"] == pytest.approx(np.sqrt(68 / 4), rel=0.05)  # sqrt(2^2 + 8^2) / 2
    assert st["fraction_below"]["draws"] > 0.2 and st["fraction_below"]["data"] < 0.01
    assert st["total_flux"]["unit"] == "electron/s" and st["half_light_radius"]["unit"] == "arcsec"
    with pytest.raises(ValueError, match="draws are"):
        fidelity_statistics(draws[:, :16, :16], data, 0.05)


def test_auc_is_the_mann_whitney_probability():
    assert auc([3, 4, 5], [0, 1, 2]) == 1.0 and auc([0, 1], [2, 3]) == 0.0
    assert auc([1, 1], [1, 1]) == 0.5  # ties count one half
    rng = np.random.default_rng(4)
    p, q = rng.normal(size=37), rng.normal(size=41) + 0.3
    brute = np.mean([(a > b) + 0.5 * (a == b) for a in p for b in q])
    assert auc(p, q) == pytest.approx(brute, abs=1e-12)


def test_auc_null_matches_the_permutation_law_of_exchangeable_scores():
    rng = np.random.default_rng(5)
    n1, n2 = 60, 60
    scores = rng.normal(size=n1 + n2)
    perm = np.array([auc(*np.split(rng.permutation(scores), [n1])) for _ in range(4000)])
    null = auc_null(n1, n2, 0.6)
    assert perm.mean() == pytest.approx(0.5, abs=0.005)
    assert perm.std() == pytest.approx(null["sd"], rel=0.05)
    assert np.quantile(perm, 0.95) == pytest.approx(null["p95"], abs=0.01)
    assert null["p_value"] == pytest.approx(np.mean(perm >= 0.6), abs=0.01)


def test_split_halves_is_fixed_disjoint_and_equal_sized():
    a, b = split_halves(30, 11, seed=7), split_halves(30, 11, seed=7)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert len(a["train_draws"]) == len(a["train_data"]) == 5 and len(a["held_draws"]) == len(a["held_data"]) == 6
    assert not set(a["train_draws"]) & set(a["held_draws"]) and not set(a["train_data"]) & set(a["held_data"])
    assert max(a["train_data"].max(), a["held_data"].max()) < 11


@pytest.mark.slow
def test_classifier_test_rejects_added_noise_and_keeps_its_size_on_blobs_vs_blobs():
    """Power: blobs vs the same kind of blobs with white noise are told apart. Size: two independent blob
    sets are not (their AUC lies below the null's 95th percentile), and the result is seeded."""
    budget = ClassifierBudget(epochs=15)
    blobs_a = make_blob_images(160, 16, seed=11)
    blobs_b = make_blob_images(160, 16, seed=12)
    noisy = blobs_b + np.random.default_rng(13).normal(0, 0.05, blobs_b.shape)
    power = classifier_two_sample_test(noisy, blobs_a, seed=0, budget=budget)
    assert power["auc"] > 0.9 and power["p_value"] < 1e-6 and power["rejects_at_0.05"]
    size = classifier_two_sample_test(blobs_b, blobs_a, seed=0, budget=budget)
    assert size["auc"] < size["null_p95"] and not size["rejects_at_0.05"]
    assert size["n_heldout_per_set"] == 80 and size["null_sd"] == pytest.approx(np.sqrt(161 / (12 * 80 * 80)))
    again = classifier_two_sample_test(blobs_b, blobs_a, seed=0, budget=budget)
    assert again["auc"] == size["auc"]


def test_classifier_subsamples_the_larger_set_and_rejects_tiny_sets():
    res = classifier_two_sample_test(make_blob_images(40, 8, seed=1), make_blob_images(10, 8, seed=2), seed=1,
                                     budget=ClassifierBudget(epochs=1, channels=(4, 4)))
    assert res["n_train_per_set"] == 5 and res["n_heldout_per_set"] == 5 and 0.0 <= res["auc"] <= 1.0
    with pytest.raises(ValueError, match=">= 4 images"):
        classifier_two_sample_test(np.zeros((3, 8, 8)), np.zeros((10, 8, 8)))
