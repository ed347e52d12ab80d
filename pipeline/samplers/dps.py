"""DPS (Chung et al. 2023): the chain's reverse mean minus ``zeta * grad ||(y - A(x0_hat))/sigma||``.

The gradient is taken per sample through the eps-network (:func:`pipeline.samplers.guidance.dps_guidance`).
``scale`` (zeta) is a heuristic: tune it on a separate seed with :mod:`pipeline.samplers.tuning`, then
freeze and record it. Steps are Gaussian, so the sampler reports its trajectory log-probabilities.

Cost per sample: K forward evaluations (eps at x_K..x_1) and K-1 vector-Jacobian products; the eps and its
VJP come from the same network call (a wrapper prior computes both), so no forward is repeated.
``nfe`` counts forwards plus VJPs (2K - 1); ``info`` has both counts.
"""

from __future__ import annotations

import torch

from pipeline.diffusion.prior import Prior
from pipeline.samplers.base import Sampler, Samples
from pipeline.samplers.common import guided_samples, resolve_device
from pipeline.samplers.guidance import dps_guidance


class GuidedEpsPrior(Prior):
    """Wraps a prior so that each eps call at a reverse index k >= 2 also computes the guidance shift.

    The rollout calls ``eps(x_k)`` and then ``mean_fn(x_k, k, eps)`` on the same state; the shift is
    stashed in between. ``guide(x, k)`` returns a :class:`~pipeline.samplers.guidance.GuidanceOut`.
    """

    def __init__(self, prior, chain, guide):
        self.inner, self.chain, self.guide = prior, chain, guide
        self.schedule, self.event_shape = prior.schedule, prior.event_shape
        self.k_of_t = {int(t): k for k, t in enumerate(chain.t.tolist())}
        self.shift: dict[int, torch.Tensor] = {}

    @property
    def device(self):
        return self.inner.device

    def eps(self, x, t, cond=None):
        k = self.k_of_t[int(torch.as_tensor(t).reshape(-1)[0])]
        if k < 2:  # final denoise: no guidance needed
            return self.inner.eps(x, t, cond)
        out = self.guide(x, k)
        self.shift[k] = out.shift
        return out.eps

    def mean_fn(self, x, k, eps_p):
        return self.chain.reverse_mean(x, eps_p, k) + self.shift.pop(k)


class NetworkGuidedSampler(Sampler):
    """Common code of DPS and DPS+CLA (guidance through the network, heuristic ``scale``)."""

    def __init__(self, prior, chain, *, scale: float = 1.0, device=None, batch_size: int = 256, cond=None,
                 tuning_record: dict | None = None):
        if not float(scale) >= 0:
            raise ValueError(f"guidance scale must be >= 0, got {scale}")
        self.prior, self.chain, self.scale = prior, chain, float(scale)
        self.device, self.batch_size, self.cond = device, batch_size, cond
        self.tuning_record = tuning_record

    def guide_fn(self, problem, y_batch, device):
        """Return ``guide(x, k) -> GuidanceOut`` for one batch of observations."""
        raise NotImplementedError

    def sample(self, problem, y, n, *, generator=None) -> Samples:
        device = resolve_device(self.prior, self.device)
        problem = problem.to(device)

        def make_policy(yb):
            wrapper = GuidedEpsPrior(self.prior, self.chain, self.guide_fn(problem, yb, device))
            return wrapper.mean_fn, wrapper

        K = self.chain.K
        info = {"method": self.name, "scale": self.scale, "K": K, "forward_evals": K, "vjp_evals": K - 1}
        if self.tuning_record is not None:
            info["tuning"] = self.tuning_record
        return guided_samples(self.prior, self.chain, problem, y, n, make_policy, generator=generator,
                              device=device, batch_size=self.batch_size, cond=self.cond, nfe=2 * K - 1, info=info)


class DPSSampler(NetworkGuidedSampler):
    """DPS with the unsquared, noise-weighted residual norm; works for any differentiable operator."""

    name = "dps"

    def guide_fn(self, problem, y_batch, device):
        return lambda x, k: dps_guidance(self.prior, self.chain, problem, y_batch, x, k, self.scale, self.cond)
