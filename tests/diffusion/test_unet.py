"""U-Net shapes with and without conditioning, presets, zero-init head, rebuild from hparams."""

import pytest
import torch

from pipeline.diffusion.unet import PRESETS, UNet, build_unet, count_parameters, timestep_embedding


@pytest.mark.parametrize("C,size,preset", [(1, 16, "tiny"), (3, 32, "small"), (1, 32, "small")])
def test_shapes_without_conditioning(C, size, preset):
    net = build_unet(preset, in_channels=C, image_size=size)
    x = torch.randn(3, C, size, size)
    assert net(x, torch.tensor([1, 500, 1000])).shape == (3, C, size, size)
    assert net(x, 7).shape == (3, C, size, size)  # scalar timestep broadcasts


def test_shapes_with_image_and_vector_conditioning():
    net = build_unet("tiny", in_channels=1, out_channels=2, cond_channels=3, cond_dim=5, attn_levels=[1])
    x, ci, cv = torch.randn(2, 1, 16, 16), torch.randn(2, 3, 16, 16), torch.randn(2, 5)
    out = net(x, torch.tensor([3, 4]), cond_image=ci, cond_vec=cv)
    assert out.shape == (2, 2, 16, 16)
    # the conditioning is used: changing it changes the output
    assert not torch.allclose(out, net(x, torch.tensor([3, 4]), cond_image=ci + 1, cond_vec=cv))
    assert not torch.allclose(out, net(x, torch.tensor([3, 4]), cond_image=ci, cond_vec=cv + 1))
    with pytest.raises(ValueError, match="cond_vec"):
        net(x, 3, cond_image=ci)
    with pytest.raises(ValueError, match="cond_image"):
        net(x, 3, cond_vec=cv)


def test_timestep_changes_output_and_embedding_is_sinusoidal():
    net = build_unet("tiny")
    x = torch.randn(1, 1, 16, 16)
    assert not torch.allclose(net(x, 10), net(x, 900))
    e = timestep_embedding(torch.tensor([0, 5]), 8)
    torch.testing.assert_close(e[0], torch.tensor([1.0, 1, 1, 1, 0, 0, 0, 0]))
    torch.testing.assert_close(e[1, 0], torch.cos(torch.tensor(5.0)))


def test_zero_init_output_and_gradients():
    net = build_unet("tiny", zero_init_output=True)
    x = torch.randn(2, 1, 16, 16)
    out = net(x, 100)
    assert float(out.detach().abs().max()) == 0.0
    out.sum().backward()  # the head still receives gradient, so it can learn away from zero
    assert float(net.conv_out.weight.grad.abs().sum()) > 0


def test_presets_sizes_and_rebuild_from_hparams():
    n_small = count_parameters(build_unet("small"))
    assert 0.5e6 < n_small < 1.5e6
    paper = build_unet("paper", image_size=64)
    assert count_parameters(paper) > 10 * n_small
    assert paper(torch.randn(1, 1, 64, 64), 10).shape == (1, 1, 64, 64)
    net = build_unet("tiny", base_channels=8, cond_dim=2)
    clone = UNet(**net.hparams())
    clone.load_state_dict(net.state_dict())
    x, cv = torch.randn(2, 1, 16, 16), torch.randn(2, 2)
    torch.testing.assert_close(clone(x, 5, cond_vec=cv), net(x, 5, cond_vec=cv), rtol=0, atol=0)
    assert set(PRESETS) >= {"small", "paper"}


def test_bad_sizes_are_rejected():
    with pytest.raises(ValueError, match="divisible"):
        build_unet("small", image_size=30)
    with pytest.raises(ValueError, match="divisible"):
        build_unet("small")(torch.randn(1, 1, 30, 30), 1)
    with pytest.raises(ValueError, match="preset"):
        build_unet("huge")
    with pytest.raises(ValueError, match="attn_levels"):
        build_unet("tiny", attn_levels=[5])
