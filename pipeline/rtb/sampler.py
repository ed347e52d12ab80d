"""A :class:`~pipeline.samplers.base.Sampler` for trained RTB posteriors.

Names: ``rtb`` (one observation), ``rtb_amortized`` (conditioned on y through ``cond_fn``),
``rtb_dps`` / ``rtb_dps_cla`` (guidance from the frozen prior inside the parameterisation). The
returned :class:`Samples` carry ``log_q_traj`` / ``log_p_traj`` (start term N(x_K; 0, I) included in
both) and the fully normalised ``log_r``, so log Z is estimated like every other Gaussian-step sampler.
"""

from __future__ import annotations

import torch

from pipeline.rtb.objective import policy_rollout
from pipeline.samplers.base import Sampler, Samples

RTB_NAMES = ("rtb", "rtb_amortized", "rtb_dps", "rtb_dps_cla")


class RTBSampler(Sampler):
    """Samples x0 = f(x_1) from a trained :class:`~pipeline.rtb.posterior.RTBPosterior`.

    ``cond_fn(y (1, *y_shape)) -> cond (1, ...)`` for amortized posteriors. ``batch_size`` bounds the
    number of trajectories rolled out at once.
    """

    def __init__(self, posterior, name: str = "rtb", cond_fn=None, batch_size: int = 4096):
        if name not in RTB_NAMES:
            raise ValueError(f"RTB sampler name must be one of {RTB_NAMES}, got {name!r}")
        if name == "rtb_amortized" and cond_fn is None:
            raise ValueError("rtb_amortized needs cond_fn (observation -> conditioning input)")
        self.post, self.name, self.cond_fn, self.batch_size = posterior, name, cond_fn, batch_size

    def sample(self, problem, y: torch.Tensor, n: int, *, generator=None) -> Samples:
        if n < 1:
            raise ValueError(f"number of samples must be >= 1, got {n}")
        post = self.post
        if problem is not None:
            post.problem = problem
        y = torch.as_tensor(y)
        cond = None
        if self.cond_fn is not None:
            cond = self.cond_fn(y.reshape(1, *post.problem.y_shape))[0]
        x0, lr, lq, lp = [], [], [], []
        for s in range(0, n, self.batch_size):
            m = min(self.batch_size, n - s)
            b = policy_rollout(post, m, y, cond, generator=generator)
            start = _start_log_prob(b.xs[post.chain.K])
            x0.append(b.x0)
            lr.append(b.log_r)
            lq.append(start + b.log_q())
            lp.append(start + b.log_p())
        K = post.chain.K
        # network evaluations per sample: K prior eps (k = 1..K) + K-1 posterior model calls
        return Samples(x0=torch.cat(x0), log_r=torch.cat(lr), log_q_traj=torch.cat(lq), log_p_traj=torch.cat(lp),
                       nfe=2 * K - 1, info={"method": self.name, "K": K, "mode": post.mode})


def _start_log_prob(xK: torch.Tensor) -> torch.Tensor:
    from pipeline.diffusion.schedule import gaussian_log_prob

    return gaussian_log_prob(xK, torch.zeros_like(xK), 1.0)
