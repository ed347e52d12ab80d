"""CLA (Adam et al. 2022) and DPS+CLA samplers for linear problems.

* ``cla``: the convolved-likelihood score of the noisy state itself, VP form
  ``p_t(y | x_t) ~ N(sqrt(abar) y; A x_t, abar Sigma + (1 - abar) A A^T)`` (flat-prior covariance), scale 1,
  no network backprop. Exact only for a flat prior.
* ``dps_cla``: DPS's Tweedie mean with the CLA covariance inflation, ``N(y; A x0_hat, Sigma + r_t^2 A A^T)``,
  ``r_t^2 = (1 - abar)/abar`` (PiGDM-like), gradient through the eps-network, heuristic scale (tuned).

Both refuse nonlinear problems (:func:`pipeline.samplers.guidance.require_linear`); the ``A A^T`` algebra is
exact through one SVD of the whitened operator.
"""

from __future__ import annotations

from pipeline.samplers.base import Sampler, Samples
from pipeline.samplers.common import guided_samples, resolve_device
from pipeline.samplers.dps import NetworkGuidedSampler
from pipeline.samplers.guidance import (cla_score, dps_cla_guidance, linear_algebra_for, require_linear,
                                        score_to_mean_shift)


class CLASampler(Sampler):
    """Guided chain with the CLA score (scale 1 by definition; ``scale`` kept for ablations)."""

    name = "cla"

    def __init__(self, prior, chain, *, scale: float = 1.0, device=None, batch_size: int = 1024, cond=None):
        self.prior, self.chain, self.scale = prior, chain, float(scale)
        self.device, self.batch_size, self.cond = device, batch_size, cond

    def sample(self, problem, y, n, *, generator=None) -> Samples:
        require_linear(problem, self.name)
        device = resolve_device(self.prior, self.device)
        problem = problem.to(device)
        alg = linear_algebra_for(problem, device)
        chain, scale = self.chain, self.scale

        def make_policy(yb):
            def mean_fn(x, k, eps_p):
                g = cla_score(chain, problem, yb, x, k, algebra=alg)
                return chain.reverse_mean(x, eps_p, k) + scale * score_to_mean_shift(chain, k, g)
            return mean_fn, None

        return guided_samples(self.prior, chain, problem, y, n, make_policy, generator=generator, device=device,
                              batch_size=self.batch_size, cond=self.cond, nfe=chain.K,
                              info={"method": self.name, "scale": scale, "K": chain.K})


class DPSCLASampler(NetworkGuidedSampler):
    """DPS+CLA; ``nfe`` counts K forwards + K-1 VJPs."""

    name = "dps_cla"

    def sample(self, problem, y, n, *, generator=None) -> Samples:
        require_linear(problem, self.name)
        return super().sample(problem, y, n, generator=generator)

    def guide_fn(self, problem, y_batch, device):
        alg = linear_algebra_for(problem, device)
        return lambda x, k: dps_cla_guidance(self.prior, self.chain, problem, y_batch, x, k, self.scale,
                                             self.cond, algebra=alg)
