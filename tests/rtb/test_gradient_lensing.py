"""The two-pass gradient the default lensing posterior trains with equals one-graph backprop (float32,
as trained): U-Net correction head, learned variance, VarGrad groups of several lenses, the default rtb: features."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.config import load_section
from pipeline.diffusion.network_prior import NetworkPrior
from pipeline.diffusion.schedule import NoiseSchedule
from pipeline.diffusion.unet import build_unet
from pipeline.lensing.amortized import MultiLensProblem, lens_features
from pipeline.lensing.config import GeometryConfig, LensConfig
from pipeline.lensing.simulate import draw_lens, make_problem
from pipeline.rtb.config import RTBConfig
from pipeline.rtb.objective import deltas_vargrad, naive_loss, policy_rollout, two_pass_backward
from pipeline.rtb.posterior import build_posterior, posterior_spec

GEOM = GeometryConfig(image_npix=12, image_pixscale=0.2, source_npix=12, source_pixscale=0.1, supersample=1,
                      psf_fwhm=0.3, psf_npix=5)


@pytest.mark.parametrize("tau2,shift,cg", [(None, False, 0), (0.05, False, 0), (0.05, True, 0), (0.05, True, 10)])
def test_two_pass_equals_naive_on_the_default_lensing_head(tau2, shift, cg):
    """Also with the likelihood-informed step variance (``tau2``) and step mean (``shift``, damped diagonal
    or by ``cg`` iterations on each row's own lens), with the head sampled (what training one needs)."""
    rcfg = load_section("config/config.yaml", "rtb", RTBConfig)
    torch.manual_seed(0)
    prior = NetworkPrior(build_unet("tiny", in_channels=1, image_size=12), NoiseSchedule(), (1, 12, 12), scale=2.0)
    rng = np.random.default_rng(0)
    probs = [make_problem(draw_lens(LensConfig(), rng), GEOM, sigma=0.05) for _ in range(3)]
    for p in probs:
        p.set_brightness(2.0, 0.0)
    pool = MultiLensProblem(probs)
    chain = prior.schedule.chain(5)  # shorter than the configured chain, for time; head, features, VarGrad as configured
    spec = {**posterior_spec(prior, chain, rcfg, cond_channels=2), "step_variance_tau2": tau2,
            "step_mean_shift": shift, "step_mean_cg_iters": cg, "use_head": True}
    assert spec["model"]["type"] == "unet_head" and spec["learn_variance"] and rcfg.objective.logz == "vargrad"
    post = build_posterior(prior, spec)
    assert post.step_variance_tau2 == tau2 and post.step_mean_shift is shift and post.step_mean_cg_iters == cg
    with torch.no_grad():  # move the zero-initialised output off zero: q != p, so the test is not vacuous
        for prm in post.model.parameters():
            prm.add_(0.05 * torch.randn_like(prm))
    gen = torch.Generator().manual_seed(1)
    G, m = 3, 4  # one observation per lens, 4 trajectories each
    truths = torch.randn(G, 1, 12, 12, generator=gen) * 0.3
    ys = torch.stack([pool.problems[i].simulate(truths[i][None].float(), generator=gen)[0] for i in range(G)])
    ys = ys.repeat_interleave(m, 0)
    groups = torch.arange(G).repeat_interleave(m)
    lenses = pool.take(groups)  # observation g uses lens g
    batch = policy_rollout(post, G * m, ys, lens_features(lenses, ys), groups=groups, problem=lenses, generator=gen,
                           dtype=torch.float32)
    delta, logz = deltas_vargrad(batch)
    assert float(batch.log_ratio().abs().max()) > 1e-3 and float(delta.abs().max()) > 1e-3
    post.zero_grad()
    two_pass_backward(post, batch, delta, chunk_size=3, learn_log_z=False)
    g2 = {n: p.grad.detach().clone() for n, p in post.model.named_parameters() if p.grad is not None}
    post.zero_grad()
    naive_loss(post, batch, log_z=logz[groups].to(batch.log_r)).backward()
    g1 = {n: p.grad.detach().clone() for n, p in post.model.named_parameters() if p.grad is not None}
    assert g1.keys() == g2.keys() and len(g1) == len(list(post.model.parameters()))
    assert max(float(g.abs().max()) for g in g1.values()) > 1e-3
    # float32 (the U-Net runs in float32, as in training): agreement to 3e-5 of the largest gradient
    # (measured: 4e-6)
    scale = max(float(g.abs().max()) for g in g1.values())
    for n in g1:
        torch.testing.assert_close(g2[n], g1[n], rtol=1e-4, atol=3e-5 * scale, msg=n)
