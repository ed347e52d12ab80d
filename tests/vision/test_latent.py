"""Latent-space pipeline: autoencoder shapes, training beats a trivial baseline, LatentProblem round trip."""

import math

import pytest
import torch

from pipeline.errors import InputFileError
from pipeline.vision import autoencoder as A
from pipeline.vision.latent import LatentProblem
from pipeline.vision.operators import make_operator


@pytest.fixture(scope="module")
def mnist_small():
    from pipeline.vision.datasets import load_mnist_bundled

    ds = load_mnist_bundled(seed=0)
    return ds.train[:1500], ds.test[:200]


@pytest.fixture(scope="module")
def trained(mnist_small):
    torch.set_num_threads(1)
    train, test = mnist_small
    ae, hist = A.train_autoencoder(train, base_channels=16, steps=200, batch_size=32, seed=0, valid=test)
    return ae, hist


def test_shapes():
    ae = A.AutoEncoder(in_channels=3, latent_channels=4, base_channels=8, n_down=2, image_size=32)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    z = ae.encode(x)
    assert z.shape == (2, 4, 8, 8) == (2, *ae.latent_shape)
    assert ae.decode(z).shape == x.shape and ae.image_shape == (3, 32, 32)
    with pytest.raises(ValueError):
        A.AutoEncoder(image_size=30, n_down=2)


@pytest.mark.slow
def test_trained_autoencoder_beats_mean_image(trained, mnist_small):
    ae, hist = trained
    train, test = mnist_small
    mean_image_mse = float(((test - train.mean(0)) ** 2).mean())
    constant_bg_mse = float(((test + 1) ** 2).mean())  # predicting the background everywhere
    # measured: ~0.05 after 200 steps vs 0.22 for the mean image; require a 2x margin
    assert hist["valid_mse"] < 0.5 * min(mean_image_mse, constant_bg_mse)
    assert hist["mse"][-1] < hist["mse"][0]
    # normalised latents have unit std on the training set
    z = A.encode_images(ae, train[:512])
    assert abs(float(z.std()) - 1.0) < 0.1


@pytest.mark.slow
def test_save_load_round_trip(trained, tmp_path, mnist_small):
    ae, _ = trained
    path = A.save_autoencoder(ae, tmp_path / "ae.pt", meta={"dataset": "mnist"})
    ae2, meta = A.load_autoencoder(path)
    x = torch.as_tensor(mnist_small[1][:4])
    torch.testing.assert_close(ae2(x), ae(x), rtol=0, atol=0)
    assert meta == {"dataset": "mnist"} and float(ae2.latent_scale) == float(ae.latent_scale)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(InputFileError):
        A.load_autoencoder(tmp_path / "junk.pt")
    with pytest.raises(InputFileError, match="not found"):
        A.load_autoencoder(tmp_path / "missing.pt")


@pytest.mark.slow
@pytest.mark.parametrize("task", ["box_inpaint", "phase_retrieval", "nonlinear_deblur"])
def test_latent_problem_round_trip(trained, mnist_small, task):
    ae, _ = trained
    truth = torch.as_tensor(mnist_small[1][:1])
    img_op = make_operator(task, (1, 32, 32), seed=0)
    lp = LatentProblem(img_op, ae)
    assert lp.x_shape == ae.latent_shape and lp.y_shape == img_op.y_shape and not lp.is_linear
    z = ae.encode(truth).detach()
    # forward through the decoder equals the image operator on the decoded image
    torch.testing.assert_close(lp.forward(z), img_op.forward(ae.decode(z)))
    y = lp.simulate(z, generator=torch.Generator().manual_seed(0))[0]
    # the encoded truth explains y better than a random latent (the likelihood sees the data)
    z_rand = torch.randn((4, *lp.x_shape), generator=torch.Generator().manual_seed(1))
    ll_true, ll_rand = lp.log_likelihood(z, y), lp.log_likelihood(z_rand, y)
    assert ll_true.dtype == torch.float64 and float(ll_true) > float(ll_rand.max())
    # at noise-free y the latent log-likelihood is the image one's normalising constant
    y0 = lp.forward(z)[0]
    assert math.isclose(float(lp.log_likelihood(z, y0)), img_op.log_norm_const(), abs_tol=1e-6)
    # gradient through the decoder matches a finite difference along a random direction
    g = lp.grad_log_likelihood(z_rand[:1], y)
    v = torch.randn(z.shape, generator=torch.Generator().manual_seed(2))
    h = 1e-3
    fd = (lp.log_likelihood(z_rand[:1] + h * v, y) - lp.log_likelihood(z_rand[:1] - h * v, y)) / (2 * h)
    assert float((g * v).sum()) == pytest.approx(float(fd), rel=2e-2)


@pytest.mark.slow
def test_latent_problem_rejects_mismatch(trained):
    ae, _ = trained
    with pytest.raises(ValueError, match="differ"):
        LatentProblem(make_operator("box_inpaint", (3, 32, 32)), ae)


def test_clipped_prior():
    from pipeline.diffusion.prior import GaussianMixturePrior
    from pipeline.vision.clipped_prior import ClippedPrior

    inner = GaussianMixturePrior([0.5, 0.5], [[0.0, 0.0], [3.0, -3.0]], 0.2)
    p = ClippedPrior(inner, -1.0, 1.0)
    x = torch.tensor([[0.1, -0.2], [5.0, -6.0], [0.0, 30.0]], dtype=torch.float64)
    for t in (5, 300, 1000):
        e, e_in = p.eps(x, t), inner.eps(x, t)
        ab = float(inner.schedule.abar(t))
        x0 = (x - math.sqrt(1 - ab) * e) / math.sqrt(ab)
        x0_in = (x - math.sqrt(1 - ab) * e_in) / math.sqrt(ab)
        # the implied denoised estimate is the inner one, clipped to the range
        torch.testing.assert_close(x0, x0_in.clamp(-1, 1), atol=1e-4, rtol=1e-4)
        inside = (x0_in.abs() <= 1).all(1)
        torch.testing.assert_close(e[inside], e_in[inside])
    assert p.meta["clip"] == [-1.0, 1.0]
    with pytest.raises(ValueError):
        ClippedPrior(inner, 1.0, 1.0)


def test_latent_problem_of_an_untrained_autoencoder():
    """The fast-tier check of LatentProblem (the trained round trip above is slow): forward is the image
    operator on the decoded latents, the likelihood is the image one (its normalising constant at
    noise-free y), and a decoder made for other images is refused."""
    torch.manual_seed(0)
    ae = A.AutoEncoder(in_channels=1, latent_channels=2, base_channels=4, n_down=2, image_size=16)
    img_op = make_operator("box_inpaint", (1, 16, 16), seed=0, box=6)
    lp = LatentProblem(img_op, ae)
    assert lp.x_shape == (2, 4, 4) and lp.y_shape == img_op.y_shape and not lp.is_linear
    z = torch.randn((3, *lp.x_shape), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(lp.forward(z), img_op.forward(ae.decode(z)), rtol=0, atol=0)
    y0 = lp.forward(z[:1])[0]
    assert math.isclose(float(lp.log_likelihood(z[:1], y0)), img_op.log_norm_const(), abs_tol=1e-6)
    assert float(lp.log_likelihood(z[1:], y0).max()) < img_op.log_norm_const()
    with pytest.raises(ValueError, match="differ"):
        LatentProblem(make_operator("box_inpaint", (3, 16, 16)), ae)
