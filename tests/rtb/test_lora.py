"""Full-network posteriors (copy of the prior U-Net, optionally LoRA): q = p at init; exact two-pass gradient."""

import pytest
import torch

from pipeline.diffusion.network_prior import NetworkPrior
from pipeline.diffusion.schedule import NoiseSchedule
from pipeline.diffusion.unet import build_unet
from pipeline.problems import InverseProblem
from pipeline.rtb.config import RTBConfig
from pipeline.rtb.lora import LoRAConv2d, LoRALinear, apply_lora
from pipeline.rtb.objective import deltas_scalar, naive_loss, policy_rollout, two_pass_backward
from pipeline.rtb.posterior import make_posterior


class _Mask(InverseProblem):
    def __init__(self, n=8):
        m = torch.zeros(1, n, n, dtype=torch.bool)
        m[..., ::2] = True
        super().__init__(torch.full((1, n, n), 0.5), m)
        self.x_shape = self.y_shape = (1, n, n)

    def forward(self, x):
        return x * self.mask.to(x.device)


def _prior():
    torch.manual_seed(0)
    return NetworkPrior(build_unet("tiny", in_channels=1, image_size=8), NoiseSchedule(), (1, 8, 8))


def test_lora_starts_as_the_original_and_trains_only_adapters():
    net = build_unet("tiny", in_channels=1, image_size=8)
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([10, 500, 900])
    ref = net(x, t).detach()
    apply_lora(net, rank=2)
    torch.testing.assert_close(net(x, t), ref)
    n_lora = sum(isinstance(m, (LoRALinear, LoRAConv2d)) for m in net.modules())
    assert n_lora > 5
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable and all(".down." in n or ".up." in n for n in trainable)


@pytest.mark.slow
def test_full_and_lora_posteriors_equal_prior_at_init_and_two_pass_is_exact():
    prior, problem = _prior(), _Mask()
    y = torch.zeros(1, 8, 8)
    for rank in (0, 2):
        cfg = RTBConfig().with_fields(parameterisation="full", lora_rank=rank)
        post = make_posterior(prior, prior.schedule.chain(6), cfg)
        b = policy_rollout(post, 4, y, problem=problem, generator=torch.Generator().manual_seed(1))
        # the copy starts as the prior: log q = log p on every step
        assert float(b.log_ratio().abs().max()) < 1e-3
        with torch.no_grad():  # perturb the trainable weights so the gradient test is not vacuous
            for p in post.trainable_parameters():
                p.add_(0.05 * torch.randn_like(p))
        b = policy_rollout(post, 4, y, problem=problem, generator=torch.Generator().manual_seed(2))
        delta = deltas_scalar(b, post.log_z)
        post.zero_grad()
        two_pass_backward(post, b, delta, chunk_size=2)
        g2 = [p.grad.clone() for p in post.trainable_parameters()]
        post.zero_grad()
        naive_loss(post, b).backward()
        g1 = [p.grad.clone() for p in post.trainable_parameters()]
        assert any(float(g.abs().max()) > 0 for g in g1)
        for a, c in zip(g2, g1):
            # float32 network (its time embedding is float32): agreement to float32 round-off
            torch.testing.assert_close(a, c, rtol=2e-3, atol=1e-3 * float(c.abs().max()))
