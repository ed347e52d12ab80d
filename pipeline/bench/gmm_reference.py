"""Reference posteriors of the GMM benchmark, exact under the **chain** prior (the law RTB targets).

2-D: importance sampling of plain prior-chain trajectories (log w = log r). Higher dimension: sequential
importance resampling of chain trajectories with exact-guidance proposals and twist
(:func:`twisted_smc_pool`); plain importance sampling with those proposals kept only 3 % of them as ESS
on ``8d_y4`` (K = 30). :func:`chain_reference` returns two independent reference sets, so the distance
between them (the Monte-Carlo floor) shows the reference's own quality. log Z in nats.
"""

from __future__ import annotations

import torch

from pipeline.bench.gmm_cases import GMMCase
from pipeline.diffusion.sampling import prior_eps
from pipeline.metrics.logz import logmeanexp
from pipeline.samplers.exact_guidance import ExactGuidance
from pipeline.samplers.guidance import score_to_mean_shift


@torch.no_grad()
def prior_chain_samples(prior, chain, n: int, generator) -> torch.Tensor:
    """x0 = f(x_1) of n prior-chain trajectories (the lean loop of ``rollout``, without log-probs)."""
    x = torch.randn(n, *prior.event_shape, generator=generator)
    for k in range(chain.K, 1, -1):
        eps = prior_eps(prior, chain, x, k)
        x = chain.reverse_mean(x, eps, k) + chain.reverse_std(k) * torch.randn(x.shape, generator=generator)
    return chain.final_denoise(x, prior_eps(prior, chain, x, 1))


def _kish(log_w) -> float:
    """Kish effective sample size of log-weights."""
    w = torch.softmax(log_w, 0)
    return float(1.0 / (w * w).sum())


@torch.no_grad()
def twisted_smc_pool(case: GMMCase, chain, y, n_particles: int, generator, chunk: int = 8192) -> dict:
    """One pool of chain-posterior particles by sequential importance resampling of CHAIN trajectories.

    Proposal: the exact-guidance chain (mean shifted by grad log h_k, h_k(x) = p_{t_k}(y | x) under the
    analytic mixture, the chain's own step std). Twist: h_k. Incremental log-weight of step k -> k-1:
    ``log p_theta(x_{k-1}|x_k) - log q(x_{k-1}|x_k) + log h_{k-1}(x_{k-1}) - log h_k(x_k)``, starting from
    ``log h_K(x_K)`` with x_K ~ N(0, I) and ending with ``log r(f(x_1)) - log h_1(x_1)``, so the product of
    the increments is the chain-posterior importance weight ``p_theta(tau) r(x0) / q(tau)`` whatever h is;
    h only decides how early degenerate paths are pruned. Multinomial resampling when the Kish ESS falls
    below half the particles; log Z is the product of the mean weights between resamplings (unbiased).
    """
    guide = ExactGuidance(case.prior, chain, case.problem)
    P = n_particles

    def score_logh(x, k):
        outs = [guide.score_and_log_likelihood_t(x[i:i + chunk], y, k) for i in range(0, x.shape[0], chunk)]
        return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])

    x = torch.randn(P, *case.prior.event_shape, generator=generator)
    g_x, log_h = score_logh(x, chain.K)
    log_w = log_h.clone()
    log_z, resamples, min_ess = 0.0, 0, 1.0
    for k in range(chain.K, 1, -1):
        std = chain.reverse_std(k)
        mean_p = chain.reverse_mean(x, prior_eps(case.prior, chain, x, k), k)
        shift = score_to_mean_shift(chain, k, g_x)
        noise = torch.randn(x.shape, generator=generator)
        x_new = mean_p + shift + std * noise
        # log N(x'; mean_p, s^2) - log N(x'; mean_p + shift, s^2), with x' - mean_p - shift = s * noise
        d_p = (shift.double() + std * noise.double()).reshape(P, -1)
        log_ratio = (-0.5 * (d_p * d_p).sum(1) + 0.5 * (noise.double().reshape(P, -1) ** 2).sum(1) * std ** 2) / std ** 2
        g_new, log_h_new = score_logh(x_new, k - 1)
        log_w = log_w + log_ratio + log_h_new - log_h
        x, g_x, log_h = x_new, g_new, log_h_new
        ess = _kish(log_w) / P
        min_ess = min(min_ess, ess)
        if ess < 0.5 and k > 2:
            log_z += logmeanexp(log_w)
            idx = torch.multinomial(torch.softmax(log_w, 0).float(), P, replacement=True, generator=generator)
            x, g_x, log_h = x[idx], g_x[idx], log_h[idx]
            log_w = torch.zeros(P, dtype=torch.float64)
            resamples += 1
    x0 = chain.final_denoise(x, prior_eps(case.prior, chain, x, 1))
    log_w = log_w + case.problem.log_likelihood(x0, y).double() - log_h
    log_z += logmeanexp(log_w)
    return {"x0": x0, "log_w": log_w, "log_z": log_z, "resamples": resamples, "min_ess_frac": min_ess,
            "final_ess": _kish(log_w)}


def _prior_chain_pool(case: GMMCase, chain, y, n_prop: int, generator, batch: int) -> tuple:
    """(x0, log w, log Z) of ``n_prop`` plain prior-chain trajectories weighted by the likelihood."""
    xs, lws = [], []
    for i in range(0, n_prop, batch):
        x0 = prior_chain_samples(case.prior, chain, min(batch, n_prop - i), generator)
        xs.append(x0)
        lws.append(case.problem.log_likelihood(x0, y).double())
    x, lw = torch.cat(xs), torch.cat(lws)
    return x, lw, logmeanexp(lw)


def chain_reference(case: GMMCase, chain, y, n: int, n_prop: int, seed: int, batch: int = 50_000) -> dict:
    """Two independent reference sets of size n from the posterior under the CHAIN prior.

    2-D: importance sampling of plain prior-chain trajectories, ``n_prop`` per pool. Higher dimension:
    :func:`twisted_smc_pool` with ``n_prop`` particles per pool, redone with twice as many (up to
    4 n_prop) while its final Kish ESS is below 10 n. Each set is n draws (with replacement) from its
    pool's final weights. Returns ref1, ref2, logz_ref (mean of the two pools' estimates, nats), ref_ess
    (the smaller final Kish ESS), proposal counts and SMC diagnostics.
    """
    g = torch.Generator().manual_seed(20_000 + seed)
    pools, extra = [], {}
    for _rep in range(2):
        if case.d_x == 2:
            pools.append(_prior_chain_pool(case, chain, y, n_prop, g, batch))
            continue
        particles = n_prop
        pool = twisted_smc_pool(case, chain, y, particles, g)
        while _kish(pool["log_w"]) < 10 * n and particles < 4 * n_prop:  # too few: redo it twice as large
            particles *= 2
            pool = twisted_smc_pool(case, chain, y, particles, g)
        extra["n_proposals"] = extra.get("n_proposals", 0) + particles
        pools.append((pool["x0"], pool["log_w"], pool["log_z"]))
        extra.setdefault("resamples", []).append(pool["resamples"])
        extra.setdefault("min_ess_frac", []).append(pool["min_ess_frac"])
    refs, esses = [], []
    for x, lw, _ in pools:
        esses.append(_kish(lw))
        idx = torch.multinomial(torch.softmax(lw, 0).float(), n, replacement=True, generator=g)
        refs.append(x[idx])
    logz = 0.5 * (pools[0][2] + pools[1][2])
    return {"ref1": refs[0], "ref2": refs[1], "logz_ref": logz, "ref_ess": min(esses),
            "logz_ref_pools": [p[2] for p in pools], "n_proposals": 2 * n_prop,
            "proposal": "prior_chain_is" if case.d_x == 2 else "exact_guidance_smc", **extra}  # SMC: its own count
