"""Sliced Wasserstein, 1-D Wasserstein and mixture-weight TV against closed forms."""

import math

import pytest
import torch

from pipeline.metrics.distances import component_weights, mode_tv, sliced_wasserstein, wasserstein_1d


def test_w1_of_shift_is_the_shift():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5000, generator=g, dtype=torch.float64)
    assert float(wasserstein_1d(x, x + 0.7)) == pytest.approx(0.7, abs=1e-12)
    assert float(wasserstein_1d(x, x + 0.7, p=2)) == pytest.approx(0.7, abs=1e-12)


def test_w1_unequal_sizes_uses_quantiles():
    x = torch.tensor([0.0, 1.0])
    y = torch.tensor([0.0, 0.0, 1.0, 1.0])
    assert float(wasserstein_1d(x, y)) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.slow
def test_sliced_w2_of_gaussian_shift():
    # SW_2 between N(0, I) and N(m, I): E_theta (theta.m)^2 = |m|^2 / d, so SW_2 = |m| / sqrt(d)
    g = torch.Generator().manual_seed(1)
    d = 4
    x = torch.randn(10000, d, generator=g, dtype=torch.float64)
    m = torch.tensor([3.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    sw = sliced_wasserstein(x, x + m, n_projections=1000, seed=3)
    assert sw == pytest.approx(3.0 / math.sqrt(d), rel=0.05)


def test_row_space_projection():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4000, 3, generator=g, dtype=torch.float64)
    y = x.clone()
    y[:, 2] += 5.0  # differs only orthogonally to the row space of A
    A = torch.tensor([[1.0, 1.0, 0.0]])
    assert sliced_wasserstein(x, y, row_space=A) == pytest.approx(0.0, abs=1e-12)
    y2 = x.clone()
    y2[:, 0] += 1.0  # shift along e1: projection onto a = (1,1)/sqrt2 moves by 1/sqrt2
    assert sliced_wasserstein(x, y2, row_space=A) == pytest.approx(1 / math.sqrt(2), abs=1e-9)


def test_too_few_projections_refused():
    with pytest.raises(ValueError, match="100"):
        sliced_wasserstein(torch.zeros(5, 2), torch.zeros(5, 2), n_projections=50)


def test_mode_tv():
    wa = component_weights(torch.tensor([0, 0, 1, 2]), 4)
    assert wa.tolist() == [0.5, 0.25, 0.25, 0.0]
    assert mode_tv(wa, torch.tensor([0.25, 0.25, 0.25, 0.25])) == pytest.approx(0.25)
    assert mode_tv(wa, wa) == 0.0
