"""Shared plumbing for Gaussian-step samplers: batched rollouts with a guidance mean function.

Each sampler supplies ``make_policy(y_batch) -> (mean_fn, guided_step)``: a
:data:`pipeline.diffusion.sampling.MeanFn`, or a ``guided_step(x_k, k) -> (eps_prior, mean)`` that
computes the prior's eps itself (the other one None);
:func:`guided_samples` runs :func:`pipeline.diffusion.sampling.rollout` batch by batch, so every
sampler reports the trajectory log-probabilities of its own law (``log_q_traj``), of the prior
chain (``log_p_traj``) and the fully normalised ``log_r = log p(y | x0)``.
"""

from __future__ import annotations

import torch

from pipeline.diffusion.sampling import rollout
from pipeline.samplers.base import Samples
from pipeline.samplers.guidance import broadcast_y


def resolve_device(prior, device):
    return torch.device(device) if device is not None else prior.device


def guided_samples(prior, chain, problem, y, n: int, make_policy, *, generator=None, device=None,
                   batch_size: int = 1024, cond=None, nfe: int, info: dict) -> Samples:
    """Roll out ``n`` trajectories in batches; ``make_policy(y_batch) -> (mean_fn, guided_step)``.

    A ``guided_step`` replaces the rollout's prior call and mean at k >= 2 (DPS computes eps and its VJP
    in one network call that way); it must return the prior's eps, so log p stays that of the prior chain.
    """
    device = resolve_device(prior, device)
    if n < 1:
        raise ValueError(f"number of samples must be >= 1, got {n}")
    ys = broadcast_y(problem, y, n)
    problem = problem.to(device) if hasattr(problem, "to") else problem
    x0s, logr, logq, logp = [], [], [], []
    for start in range(0, n, batch_size):
        m = min(batch_size, n - start)
        yb = ys[start:start + m].to(device)
        mean_fn, guided_step = make_policy(yb)
        traj = rollout(prior, chain, m, mean_fn, generator=generator, device=device, keep_states=False, cond=cond,
                       guided_step=guided_step)
        x0s.append(traj.x0)
        logr.append(problem.log_likelihood(traj.x0, yb))
        logq.append(traj.log_q)
        logp.append(traj.log_p)
    return Samples(x0=torch.cat(x0s), log_r=torch.cat(logr), log_q_traj=torch.cat(logq),
                   log_p_traj=torch.cat(logp), nfe=nfe, info=dict(info))
