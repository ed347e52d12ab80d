"""Prior chain + importance resampling (``prior_is``) at a stated budget.

Each output sample is one independent run: ``particles`` (M) prior-chain trajectories are drawn, weighted
by ``r = p(y | x0)`` (the proposal is the prior chain itself, so the trajectory ratio p/q is 1), and one is
resampled by its normalised weight. Budget: M * K network evaluations per returned sample.

Returned ``Samples``: the resampled ``x0`` (equally weighted, ``log_w`` = 0) with their ``log_r``;
``info['logz_iw']`` is the importance-sampling estimate of the chain evidence from *all* n*M proposals,
``log Z ~ logmeanexp(log r)`` (unbiased in Z for the chain prior, one observation only), and
``info['ess_mean']`` the mean effective sample size per run, ``info['prior_elbo']`` (``_se``) the prior
proposal's ELBO, mean log r. With ``resample=False`` every proposal is
returned with ``log_w = log r`` and its trajectory log-probs (q = p), so the shared log Z estimators apply.
"""

from __future__ import annotations

import math

import torch

from pipeline.diffusion.sampling import rollout
from pipeline.samplers.base import Sampler, Samples
from pipeline.samplers.common import resolve_device
from pipeline.samplers.guidance import broadcast_y


def _ess(log_w: torch.Tensor) -> torch.Tensor:
    """Effective sample size per row of log-weights (R, M) -> (R,)."""
    w = torch.softmax(log_w, -1)
    return 1.0 / (w * w).sum(-1)


class PriorISSampler(Sampler):
    """Importance resampling of prior-chain proposals, ``particles`` per returned sample."""

    name = "prior_is"

    def __init__(self, prior, chain, *, particles: int = 10, resample: bool = True, device=None,
                 batch_size: int = 2048, cond=None):
        if particles < 1:
            raise ValueError(f"prior_is particles must be >= 1, got {particles}")
        self.prior, self.chain, self.M, self.resample = prior, chain, int(particles), bool(resample)
        self.device, self.batch_size, self.cond = device, batch_size, cond

    def sample(self, problem, y, n, *, generator=None) -> Samples:
        device = resolve_device(self.prior, self.device)
        problem = problem.to(device)
        M = self.M if self.resample else 1
        ys = broadcast_y(problem, y, n)
        runs_per_batch = max(1, self.batch_size // M)
        x_out, lr_out, lq_out, lw_all, ess = [], [], [], [], []
        for start in range(0, n, runs_per_batch):
            R = min(runs_per_batch, n - start)
            yb = ys[start:start + R].to(device)
            traj = rollout(self.prior, self.chain, R * M, generator=generator, device=device,
                           keep_states=False, cond=self.cond)
            yrep = yb.repeat_interleave(M, 0)
            log_r = problem.log_likelihood(traj.x0, yrep).reshape(R, M)
            lw_all.append(log_r.reshape(-1))
            if not self.resample:
                x_out.append(traj.x0)
                lr_out.append(log_r.reshape(-1))
                lq_out.append(traj.log_p)
                continue
            ess.append(_ess(log_r))
            probs = torch.softmax(log_r, 1).float().cpu()
            pick = torch.multinomial(probs, 1, generator=generator).reshape(-1).to(device)
            rows = torch.arange(R, device=device)
            x_out.append(traj.x0.reshape(R, M, *traj.x0.shape[1:])[rows, pick])
            lr_out.append(log_r[rows, pick])
        log_r_all = torch.cat(lw_all)
        info = {"method": self.name, "particles": self.M, "K": self.chain.K,
                "logz_iw": float(torch.logsumexp(log_r_all, 0) - math.log(log_r_all.numel())),
                # the prior proposal's ELBO (q = p): mean log r over all proposals, with its standard error
                "prior_elbo": float(log_r_all.mean()),
                "prior_elbo_se": float(log_r_all.std() / math.sqrt(log_r_all.numel())) if log_r_all.numel() > 1 else None,
                "logz_iw_note": "pooled over all proposals: valid only when y is a single observation"}
        # the registry's "info" log Z: one observation per call, so the estimate over all n*M prior-chain
        # proposals is this observation's log Z, and the ELBO is the prior proposal's (mean log r)
        info["logz"] = {"elbo": info["prior_elbo"], "elbo_se": info["prior_elbo_se"], "iw": info["logz_iw"]}
        x0 = torch.cat(x_out)
        log_r = torch.cat(lr_out)
        if self.resample:
            info["ess_mean"] = float(torch.cat(ess).mean())
            return Samples(x0=x0, log_r=log_r, log_w=torch.zeros_like(log_r), nfe=self.M * self.chain.K, info=info)
        log_p = torch.cat(lq_out)
        return Samples(x0=x0, log_r=log_r, log_q_traj=log_p, log_p_traj=log_p.clone(), log_w=log_r.clone(),
                       nfe=self.chain.K, info=info)
