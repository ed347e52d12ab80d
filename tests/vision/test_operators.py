"""Vision operators: shapes, determinism, adjoints, phase-retrieval padding and alignment, PSNR/SSIM."""

import math

import numpy as np
import pytest
import torch

from pipeline.vision import operators as O
from pipeline.vision.config import LINEAR_TASKS, TASKS
from pipeline.vision.metrics import psnr, ssim

SHAPES = [(1, 32, 32), (3, 32, 32)]


def _images(shape, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, *shape), generator=g) * 2 - 1


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("shape", SHAPES)
def test_shapes_and_determinism(task, shape):
    op = O.make_operator(task, shape, seed=3)
    op2 = O.make_operator(task, shape, seed=3)
    x = _images(shape)
    y = op.forward(x)
    assert op.x_shape == shape
    assert y.shape == (3, *op.y_shape) and op.sigma.shape == op.y_shape and op.mask.shape == op.y_shape
    # the same operator gives the same output twice, and a rebuilt one with the same seed too
    torch.testing.assert_close(op.forward(x), y, rtol=0, atol=0)
    torch.testing.assert_close(op2.forward(x), y, rtol=0, atol=0)
    assert torch.isfinite(y).all()
    ll = op.log_likelihood(x, y[0])
    assert ll.shape == (3,) and ll.dtype == torch.float64
    # at x = truth with y noise-free, log lik = the normalising constant exactly
    assert math.isclose(float(ll[0]), op.log_norm_const(), rel_tol=0, abs_tol=1e-6)
    assert op.sigma.unique().tolist() == [pytest.approx(0.05)]


@pytest.mark.parametrize("task", ["box_inpaint", "random_inpaint", "nonlinear_deblur"])
def test_seed_changes_operator(task):
    x = _images((1, 32, 32))
    a = O.make_operator(task, (1, 32, 32), seed=0).forward(x)
    b = O.make_operator(task, (1, 32, 32), seed=1).forward(x)
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("task", LINEAR_TASKS)
@pytest.mark.parametrize("shape", [SHAPES[0], pytest.param(SHAPES[1], marks=pytest.mark.slow)])
def test_adjoint(task, shape):
    op = O.make_operator(task, shape, seed=5)
    assert op.is_linear
    x = _images(shape, 4, 1).double()
    y = torch.randn(4, *op.y_shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    lhs = (op.A(x) * y).sum()
    rhs = (x * op.AT(y)).sum()
    assert abs(float(lhs - rhs)) <= 1e-10 * float(abs(lhs)) + 1e-10
    # dense matrix agrees with A on a vector, and diag(AA^T) is the mask form
    M = op.dense_matrix()
    torch.testing.assert_close((M @ x[0].reshape(-1)).reshape(op.y_shape), op.A(x[:1])[0])
    torch.testing.assert_close(torch.diag(M @ M.T).float().reshape(op.y_shape), op.diag_AAT())


def test_box_and_random_fractions():
    box = O.BoxInpainting((3, 32, 32), box=16, seed=0)
    assert int((~box.keep[0]).sum()) == 256 and (box.keep[0] == box.keep[2]).all()
    r0, c0 = box.corner
    assert 2 <= r0 <= 32 - 2 - 16 and 2 <= c0 <= 32 - 2 - 16
    rnd = O.RandomInpainting((1, 32, 32), p_missing=0.7, seed=0)
    assert abs(rnd.n_data / 1024 - 0.3) < 1e-3
    assert box.n_data == 3 * (1024 - 256)


def test_grad_linear_matches_autograd():
    op = O.make_operator("random_inpaint", (1, 32, 32), seed=0)
    x, truth = _images((1, 32, 32), 2, 3), _images((1, 32, 32), 1, 4)
    y = op.simulate(truth, generator=torch.Generator().manual_seed(0))[0]
    g_lin = op.grad_log_likelihood(x, y)
    g_auto = O.InverseProblem.grad_log_likelihood(op, x, y)
    torch.testing.assert_close(g_lin, g_auto.float(), rtol=1e-4, atol=1e-3)


def test_phase_retrieval_padding_scales():
    assert O.phase_retrieval_pad(256) == 64  # the DPS value at 256 px
    assert O.phase_retrieval_pad(32) == 8
    assert O.phase_retrieval_pad(64) == 16
    assert O.phase_retrieval_pad(32, oversample=1.0) == 4
    for size in (16, 32, 64):
        op = O.PhaseRetrieval((1, size, size))
        assert op.y_shape == (1, size + 2 * (size // 4), size + 2 * (size // 4))


def test_phase_retrieval_orthonormal_and_invariances():
    op = O.PhaseRetrieval((1, 32, 32))
    x = _images((1, 32, 32), 1, 7)
    y = op.forward(x)
    # Parseval with norm="ortho": ||y||^2 = ||pad((x+1)/2)||^2
    torch.testing.assert_close((y ** 2).sum(), (((x + 1) / 2) ** 2).sum(), rtol=1e-5, atol=1e-4)
    # |FFT| cannot tell 180-degree rotations apart
    torch.testing.assert_close(op.forward(torch.flip(x, (-2, -1))), y, rtol=1e-4, atol=1e-4)


def test_phase_retrieval_alignment_recovers_truth():
    shape = (1, 32, 32)
    op = O.PhaseRetrieval(shape)
    p = op.pad
    truth = -torch.ones(shape)
    truth[:, 6:26, 10:22] = _images((1, 20, 12), 1, 9)[0]  # content with a support margin
    # a shifted copy (within the padded canvas) and a 180-degree rotated, shifted copy
    canvas = torch.nn.functional.pad((truth + 1) / 2, (p, p, p, p))
    shifted = torch.roll(canvas, shifts=(3, -5), dims=(-2, -1))[:, p:p + 32, p:p + 32] * 2 - 1
    rot = torch.roll(torch.flip(canvas, (-2, -1)), shifts=(-2, 4), dims=(-2, -1))[:, p:p + 32, p:p + 32] * 2 - 1
    x = torch.stack([shifted, rot, truth])
    torch.testing.assert_close(op.forward(x), op.forward(truth[None]).expand(3, -1, -1, -1), atol=1e-4, rtol=1e-4)
    assert psnr(x[:2], truth).max() < 20
    aligned = O.align_phase_retrieval(x, truth, p)
    torch.testing.assert_close(aligned, truth.expand(3, -1, -1, -1), atol=1e-5, rtol=0)


def test_nonlinear_deblur_kernel_and_response():
    k = O.motion_blur_kernel(9, seed=0)
    assert k.shape == (9, 9) and abs(float(k.sum()) - 1) < 1e-6 and (k >= 0).all()
    assert not torch.equal(k, O.motion_blur_kernel(9, seed=1))
    op = O.NonlinearDeblur((3, 32, 32), seed=0)
    # constants pass the blur unchanged: g(0) = -1, g(1) = +1, monotone in between
    assert torch.allclose(op.forward(-torch.ones(1, 3, 32, 32)), -torch.ones(1, 3, 32, 32), atol=1e-6)
    assert torch.allclose(op.forward(torch.ones(1, 3, 32, 32)), torch.ones(1, 3, 32, 32), atol=1e-6)
    mid = op.forward(torch.zeros(1, 3, 32, 32))  # u = 0.5 -> g > 0 (saturating curve lifts mid-tones)
    expected = 2 * (1 - math.exp(-1.5)) / (1 - math.exp(-3)) - 1
    assert torch.allclose(mid, torch.full_like(mid, expected), atol=1e-6)
    # it is not linear: A(x1 + x2) != A(x1) + A(x2) - A(0) in general
    x1, x2 = _images((3, 32, 32), 1, 1), _images((3, 32, 32), 1, 2) * 0.5
    z = torch.zeros_like(x1)
    assert (op.forward(x1 + x2) - op.forward(x1) - op.forward(x2) + op.forward(z)).abs().max() > 1e-2
    g = op.grad_log_likelihood(x1, op.forward(x2)[0])
    assert g.shape == x1.shape and torch.isfinite(g).all()


def test_bad_arguments():
    with pytest.raises(ValueError, match="task"):
        O.make_operator("superres", (1, 32, 32))
    with pytest.raises(ValueError, match="sigma_y"):
        O.make_operator("box_inpaint", (1, 32, 32), sigma_y=0.0)
    with pytest.raises(ValueError, match="p_missing"):
        O.RandomInpainting((1, 32, 32), p_missing=1.0)
    with pytest.raises(ValueError, match="box"):
        O.BoxInpainting((1, 32, 32), box=40)


def test_psnr_ssim_sanity():
    t = _images((3, 32, 32), 1, 0)[0]
    assert psnr(t[None], t)[0] == np.inf
    assert ssim(t[None], t)[0] == pytest.approx(1.0, abs=1e-9)
    # MSE 0.01 on a range of 2 -> 10 log10(4 / 0.01) = 26.02 dB
    noisy = t + 0.1 * torch.sign(torch.randn(t.shape, generator=torch.Generator().manual_seed(1)))
    noisy = noisy.clamp(-1, 1)
    mse = float(((noisy - t) ** 2).mean())
    assert psnr(noisy[None], t)[0] == pytest.approx(10 * math.log10(4 / mse), rel=1e-6)
    g = torch.Generator().manual_seed(3)
    x = torch.stack([t + 0.02 * torch.randn(t.shape, generator=g), t + 0.3 * torch.randn(t.shape, generator=g), -t])
    s, p = ssim(x, t), psnr(x, t)
    assert s[0] > s[1] > s[2] and p[0] > p[1] > p[2]
    assert s[2] < 0  # an inverted image is anti-correlated
