"""DPS (Chung et al. 2023): the chain's reverse mean minus ``zeta * grad ||(y - A(x0_hat))/sigma||``.

The gradient is taken per sample through the eps-network (:func:`pipeline.samplers.guidance.dps_guidance`).
``scale`` (zeta) is a heuristic: tune it on a separate seed with :mod:`pipeline.samplers.tuning`, then
freeze and record it. Steps are Gaussian, so the sampler reports its trajectory log-probabilities.

Cost per sample: K forward evaluations (eps at x_K..x_1) and K-1 vector-Jacobian products; the eps and its
VJP come from the same network call (:func:`guided_step` returns both), so no forward is repeated.
``nfe`` counts forwards plus VJPs (2K - 1); ``info`` has both counts.
"""

from __future__ import annotations

from pipeline.samplers.base import Sampler, Samples
from pipeline.samplers.common import guided_samples, resolve_device
from pipeline.samplers.guidance import dps_guidance


def guided_step(chain, guide):
    """The rollout step ``(x_k, k) -> (prior eps, guided mean)`` of a network guidance ``guide(x, k) ->``
    :class:`~pipeline.samplers.guidance.GuidanceOut`: the eps and the mean shift come from one call."""

    def step(x, k):
        out = guide(x, k)
        return out.eps, chain.reverse_mean(x, out.eps, k) + out.shift

    return step


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
            return None, guided_step(self.chain, self.guide_fn(problem, yb, device))

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
