"""The contract every registered sampling method keeps, checked for each name in the registry.

The problem is linear-Gaussian in d = 2 (Gaussian prior, one noisy linear measurement), where the
chain's log Z is exact (forward propagation of the prior chain, and the discrete h-transform). RTB
methods use an untrained posterior: its head is zero-initialised, so q is the prior chain (plus the
frozen guidance for rtb_dps / rtb_dps_cla), a valid proposal whose estimates must keep the same bounds.
"""

import math

import pytest
import torch

from pipeline.diffusion.gaussian_chain import (final_denoise_affine, gaussian_linear_posterior,
                                               propagate_gaussian_chain, reverse_step_affine)
from pipeline.diffusion.prior import GaussianMixturePrior
from pipeline.diffusion.schedule import gaussian_log_prob
from pipeline.errors import PipelineError
from pipeline.metrics.logz import estimate_logz_samples
from pipeline.problems import DenseLinearProblem
from pipeline.rtb.config import RTBConfig
from pipeline.rtb.htransform import LinearGaussianHTransform
from pipeline.rtb.posterior import make_posterior
from pipeline.samplers import METHODS, REGISTRY, make_sampler
from pipeline.samplers.base import Sampler, Samples
from pipeline.samplers.registry import LOGZ_KINDS

K = 8
N = 4000         # samples per method for the log Z checks
N_GN = 400       # the Gauss-Newton last step solves one small system per sample: fewer
IW_TOL = 0.15    # nats: |IW log Z - exact| at N, for proposals whose weights are usable (below)
ESS_MIN = N // 100  # Kish ESS below this: the weights are too heavy-tailed for IW to converge at N (CLA,
                    # FPS given its bridge, frozen DPS inside RTB on this problem); IW is then checked
                    # as what it is in expectation, a lower bound
NO_CHAIN = ("inversion",)  # its own Gaussian prior, not the diffusion chain's: tests/samplers/test_inversion.py
OPTS = {"dps": {"scale": 0.3}, "dps_cla": {"scale": 1.0}, "prior_is": {"particles": 8},
        "fps_smc": {"particles": 8}, "rtb_amortized_is": {"particles": 8}, "rtb_amortized_smc": {"particles": 8}}
# twisted SMC's twist needs the policy's prior-variance model (the prior's variance is about 1 here)
FIELDS = {"rtb_amortized_smc": {"step_variance_tau2": 1.0, "step_mean_shift": True, "step_mean_cg_iters": 2}}

MU = torch.tensor([0.5, -0.3], dtype=torch.float64)
S = torch.tensor([[1.0, 0.3], [0.3, 0.6]], dtype=torch.float64)
A = torch.tensor([[1.0, 0.5]], dtype=torch.float64)
SIGMA = torch.tensor([0.5], dtype=torch.float64)
Y = torch.tensor([0.8])


@pytest.fixture(scope="module")
def case():
    prior = GaussianMixturePrior([1.0], MU[None], S[None])
    chain = prior.schedule.chain(K)
    problem = DenseLinearProblem(A.float(), SIGMA.float())
    law = propagate_gaussian_chain(chain, MU, S)
    logz = float(gaussian_linear_posterior(law["x0_mean"], law["x0_cov"], A, SIGMA ** 2, Y.double())[2])
    return prior, chain, problem, logz


def build(name, prior, chain, problem):
    """The registry's sampler for ``name``; RTB methods get an untrained posterior of the right kind."""
    spec = REGISTRY[name]
    if not spec.trained:
        return make_sampler(name, prior, chain, **OPTS.get(name, {}))
    guidance = {"rtb_dps": "dps", "rtb_dps_cla": "dps_cla"}.get(name, "none")
    # DPS+CLA is a score at scale 1; the frozen DPS shift grows like 1/sqrt(abar_k) at high noise
    cfg = RTBConfig().with_fields(guidance=guidance, guidance_scale=0.01 if guidance == "dps" else 1.0,
                                  learn_variance=False, head_hidden=8, head_layers=1, amortized=spec.amortized,
                                  logz="vargrad" if spec.amortized else "scalar", **FIELDS.get(name, {}))
    torch.manual_seed(0)
    post = make_posterior(prior, chain, cfg, cond_dim=1 if spec.amortized else 0)
    opts = {"cond_fn": lambda _problem, yy: yy.reshape(yy.shape[0], -1)} if spec.amortized else {}
    return make_sampler(name, prior, chain, posterior=post, batch_size=N * 8, **opts, **OPTS.get(name, {}))


def test_every_method_declares_its_properties():
    assert set(METHODS) == set(REGISTRY)
    for name, spec in REGISTRY.items():
        assert spec.logz in LOGZ_KINDS
        assert not (spec.amortized and not spec.trained)
        assert spec.particle == (spec.logz != "trajectory") or name in NO_CHAIN
        assert spec.sampler_class() is not None


@pytest.mark.parametrize("name", [m for m in METHODS if m not in NO_CHAIN])
def test_contract(case, name):
    prior, chain, problem, logz_exact = case
    spec = REGISTRY[name]
    n = N_GN if name == "rtb_amortized_gn" else N
    s = build(name, prior, chain, problem)
    assert isinstance(s, Sampler) and s.name == name
    out = s.sample(problem, Y, n, generator=torch.Generator().manual_seed(1))
    assert isinstance(out, Samples) and out.x0.shape == (n, 2)
    assert out.log_r.shape == (n,) and out.log_r.dtype == torch.float64 and torch.isfinite(out.log_r).all()
    assert out.nfe >= K
    if spec.logz == "trajectory":
        assert out.has_trajectory_density and out.log_w is None
        assert out.log_q_traj.dtype == out.log_p_traj.dtype == torch.float64
        assert torch.isfinite(out.log_q_traj).all() and torch.isfinite(out.log_p_traj).all()
        est = estimate_logz_samples(out)
        elbo, se, iw, usable = est.elbo, est.elbo_se, est.iw, est.ess >= ESS_MIN
    elif spec.logz == "info":
        rec = out.info["logz"]
        elbo, se, iw, usable = rec["elbo"], rec["elbo_se"], rec["iw"], True
        assert torch.equal(out.log_w, torch.zeros(n, dtype=torch.float64))
    else:
        assert out.info["logz"] is None and out.info["logz_note"] and out.log_w.shape == (n,)
        assert not out.has_trajectory_density
        with pytest.raises(ValueError, match="not available"):
            estimate_logz_samples(out)
        return
    assert math.isfinite(elbo) and math.isfinite(iw) and se > 0
    assert elbo <= logz_exact + 3 * se, (elbo, se, logz_exact)
    assert elbo <= iw + 1e-9  # mean <= logmeanexp of the same weights
    assert iw < logz_exact + IW_TOL, (iw, logz_exact)
    if usable:
        assert abs(iw - logz_exact) < IW_TOL, (iw, logz_exact)


@pytest.mark.parametrize("name", [m for m in METHODS if REGISTRY[m].logz == "trajectory" and m != "fps"])
def test_trajectory_log_probs_include_the_start_term(name):
    """At K = 2 the trajectory is (x_2, x_1): x_2 is the generator's first N(0, I) draw and
    x_1 = f^-1(x0) (f is affine for a Gaussian prior), so log p_theta(tau) is recomputed exactly,
    start term log N(x_2; 0, I) included. (FPS starts from N(0, I) conditioned on its bridge y_K,
    not from the first draw; its log_p also includes the N(0, I) start, by its own code.)"""
    prior = GaussianMixturePrior([1.0], MU[None], S[None])
    chain = prior.schedule.chain(2)
    problem = DenseLinearProblem(A.float(), SIGMA.float())
    n = 64
    out = build(name, prior, chain, problem).sample(problem, Y, n, generator=torch.Generator().manual_seed(3))
    x2 = torch.randn((n, 2), generator=torch.Generator().manual_seed(3)).double()
    F, f = final_denoise_affine(chain, MU, S)
    x1 = torch.linalg.solve(F, (out.x0.double() - f).T).T
    M, c = reverse_step_affine(chain, MU, S, 2)
    expect = gaussian_log_prob(x2, torch.zeros_like(x2), 1.0) + gaussian_log_prob(x1, x2 @ M.T + c,
                                                                                  chain.reverse_std(2))
    assert torch.allclose(out.log_p_traj, expect, atol=2e-3), (out.log_p_traj - expect).abs().max()


def test_the_exact_sampler_gives_log_z_to_1e6(case):
    """The discrete h-transform's weights log r + log p - log q equal the chain's log Z on every
    trajectory, and that log Z equals the one of the forward-propagated chain used above."""
    prior, chain, problem, logz_exact = case
    h = LinearGaussianHTransform(chain, MU, S, A, SIGMA ** 2 * torch.eye(1, dtype=torch.float64), Y.double())
    assert abs(h.log_z() - logz_exact) < 1e-6
    out = h.sample(500, generator=torch.Generator().manual_seed(2))
    xs = out["xs"]
    log_p = gaussian_log_prob(xs[K], torch.zeros_like(xs[K]), 1.0)
    for k in range(K, 1, -1):
        M, c = reverse_step_affine(chain, MU, S, k)
        log_p = log_p + gaussian_log_prob(xs[k - 1], xs[k] @ M.T + c, chain.reverse_std(k))
    resid = (Y.double() - out["x0"] @ A.T[:, 0]) / SIGMA[0]  # float64 log r of the linear-Gaussian likelihood
    log_r = -0.5 * resid ** 2 - math.log(float(SIGMA[0])) - 0.5 * math.log(2 * math.pi)
    lw = log_r + log_p - out["log_q"]
    assert (lw - logz_exact).abs().max() < 1e-6


def test_trained_methods_need_their_posterior(case):
    prior, chain, _, _ = case
    for name in (m for m in METHODS if REGISTRY[m].trained):
        with pytest.raises(PipelineError, match="posterior="):
            make_sampler(name, prior, chain)
    with pytest.raises(PipelineError, match="unknown option.*last_step"):
        make_sampler("rtb", prior, chain, posterior=object(), last_step="gauss_newton")
