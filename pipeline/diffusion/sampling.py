"""Ancestral sampling of a strided chain, with exact per-step log-probabilities.

A *policy* is anything that gives the reverse-step mean at chain index k; the prior's policy uses
its eps-prediction. Samplers in ``pipeline.samplers`` and the RTB posterior reuse :func:`rollout`
with their own mean functions, so there is one loop and one way to score a step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from pipeline.diffusion.prior import Prior
from pipeline.diffusion.schedule import Chain, gaussian_log_prob


@dataclass
class Trajectory:
    """States ``xs[k]`` for k = 1..K (``xs[0]`` is the final x0 = f(x_1)), per-step log-probs.

    ``log_q_steps[k]``/``log_p_steps[k]`` hold log q(x_{k-1}|x_k) and log p_prior(x_{k-1}|x_k) for
    k = 2..K (shape (B,) each, float64). ``log_start`` is log N(x_K; 0, I).
    ``eps_prior[k]`` caches the frozen prior's eps at x_k (k = 1..K), reusable by trainers.
    """

    xs: dict[int, torch.Tensor]
    log_q_steps: dict[int, torch.Tensor] = field(default_factory=dict)
    log_p_steps: dict[int, torch.Tensor] = field(default_factory=dict)
    log_start: torch.Tensor | None = None
    eps_prior: dict[int, torch.Tensor] = field(default_factory=dict)

    @property
    def x0(self) -> torch.Tensor:
        return self.xs[0]

    @property
    def log_q(self) -> torch.Tensor:
        """log q(tau) including the N(0, I) start."""
        return self.log_start + sum(self.log_q_steps.values())

    @property
    def log_p(self) -> torch.Tensor:
        """log p_prior(tau) including the N(0, I) start."""
        return self.log_start + sum(self.log_p_steps.values())


MeanFn = Callable[[torch.Tensor, int, torch.Tensor], torch.Tensor]
"""mean_fn(x_k, k, eps_prior_at_x_k) -> mean of the policy's p(x_{k-1} | x_k)."""


def prior_eps(prior: Prior, chain: Chain, x: torch.Tensor, k: int, cond=None) -> torch.Tensor:
    t = torch.full((x.shape[0],), int(chain.t[k]), dtype=torch.long, device=x.device)
    return prior.eps(x, t, cond)


@torch.no_grad()
def rollout(prior: Prior, chain: Chain, n: int, mean_fn: MeanFn | None = None, *, generator=None,
            device=None, dtype=torch.float32, x_start: torch.Tensor | None = None,
            std_scale: float = 1.0, keep_states: bool = True, cond=None, guided_step=None) -> Trajectory:
    """Roll out ``x_K -> ... -> x_1`` and return the trajectory with x0 = f(x_1) (frozen prior's f).

    ``mean_fn`` defines the behaviour policy's mean (default: the prior's); ``guided_step(x_k, k) ->
    (eps_prior, mean)`` replaces both the prior call and ``mean_fn`` at k >= 2, for a policy whose mean
    comes from the same network call as the eps (DPS: one forward and its VJP). The step noise can be
    tempered by ``std_scale`` (exploration); log-probs are always those of the *untempered*
    policy (``log_q_steps``) and of the prior (``log_p_steps``), so off-policy losses stay exact.
    States are detached (no gradient ever flows through the chain).
    """
    device = torch.device(device) if device is not None else prior.device
    shape = (n, *prior.event_shape)
    if x_start is None:
        x = torch.randn(shape, generator=generator, dtype=dtype).to(device)
    else:
        x = x_start.to(device=device, dtype=dtype)
    zeros = torch.zeros_like(x)
    traj = Trajectory(xs={}, log_start=gaussian_log_prob(x, zeros, 1.0))
    for k in range(chain.K, 1, -1):
        if guided_step is not None:
            eps_p, mean_q = guided_step(x, k)
            mean_p = chain.reverse_mean(x, eps_p, k)
        else:
            eps_p = prior_eps(prior, chain, x, k, cond)
            mean_p = chain.reverse_mean(x, eps_p, k)
            mean_q = mean_p if mean_fn is None else mean_fn(x, k, eps_p)
        std = chain.reverse_std(k)
        noise = torch.randn(shape, generator=generator, dtype=dtype).to(device)
        x_new = (mean_q + std_scale * std * noise).detach()
        traj.log_q_steps[k] = gaussian_log_prob(x_new, mean_q, std)
        traj.log_p_steps[k] = gaussian_log_prob(x_new, mean_p, std)
        if keep_states:
            traj.xs[k] = x
            traj.eps_prior[k] = eps_p
        x = x_new
    eps1 = prior_eps(prior, chain, x, 1, cond)
    traj.xs[1] = x
    traj.eps_prior[1] = eps1
    traj.xs[0] = chain.final_denoise(x, eps1)
    return traj


def sample_prior(prior: Prior, chain: Chain, n: int, *, generator=None, batch_size: int = 256,
                 device=None, return_trajectory: bool = False):
    """Ancestral samples x0 of the prior chain, in batches. With ``return_trajectory`` the (single
    batch) Trajectory with per-step ``log p_theta(x_{k-1} | x_k)`` is returned instead."""
    if return_trajectory:
        return rollout(prior, chain, n, generator=generator, device=device)
    out = []
    for start in range(0, n, batch_size):
        m = min(batch_size, n - start)
        out.append(rollout(prior, chain, m, generator=generator, device=device, keep_states=False).x0)
    return torch.cat(out)
