"""The evidence of an observation at any lens, with the source marginalised under the diffusion prior.

Inferring the lens needs ``p(y | theta)`` for lenses theta other than the one an observation file names:
the source integrated out under the prior chain. :func:`problem_at_lens` rebuilds an observation's
:class:`~pipeline.lensing.operator.LensingProblem` for another lens (same pixels, PSF, noise, mask, units
and brightness map), and :class:`DiffusionSourceEvidence` estimates ``log p(y | theta)`` for many lenses at
once by twisted SMC over the source chain (:func:`pipeline.rtb.smc.twisted_smc`). The estimate Z^ is
unbiased in Z (not in log Z), which is what pseudo-marginal Metropolis-Hastings over theta needs
(Andrieu & Roberts 2009): its chain then targets p(theta | y) exactly, however noisy Z^ is, and the noise
only costs mixing (Var(log Z^) of about 1-2 at the posterior mode is the usual target).
"""

from __future__ import annotations

import torch

from pipeline.lensing.amortized import MultiLensProblem
from pipeline.lensing.lens_prior import LensPrior
from pipeline.lensing.operator import LensingProblem, LensParams
from pipeline.rtb.smc import twisted_smc


def problem_at_lens(problem: LensingProblem, meta: dict, lens: LensParams) -> LensingProblem:
    """``problem`` (an observation's, from :func:`pipeline.lensing.observation.load_observation` with its
    ``meta``) with the operator of ``lens`` instead: the image grid, pixel scale [arcsec], PSF, sigma and mask
    [SCI units], flux unit factor and network <-> physical brightness map stay the observation's."""
    return LensingProblem.from_lens(
        lens, image_shape=problem.image_shape, image_pixscale=meta["pixscale"], source_npix=meta["source_npix"],
        source_pixscale=meta["source_pixscale"], supersample=meta["supersample"], psf=meta["psf_used"],
        sigma=problem.sigma, mask=problem.mask, unit_factor=meta["unit_factor"], scale=problem.scale,
        offset=problem.offset, x_shape=problem.x_shape, device=problem.device, meta={"path": meta.get("path")})


class DiffusionSourceEvidence:
    """log Z^(y | theta) [nats, the likelihood's SCI-unit normalisation] for observations under the lens
    prior ``prior`` (theta's columns: ``prior.names``), by ``particles`` particles of twisted SMC over the
    chain of ``posterior``. ``proposal``: ``gaussian`` (default; the full-covariance Gaussian step of the
    posterior's prior-variance model, built from each lens's operator, so nothing is trained per lens) or
    ``policy`` (the posterior's own steps).

    ``observations``: one (problem, y, meta) per observation. :meth:`log_evidence` takes theta (B, p) and
    the observation index of each row (B,), so that it plugs into a Metropolis sampler that passes those
    indices as its "data" (:func:`pipeline.bench.joint_lensing_mh.metropolis`); every call draws fresh,
    independent estimates, ``batch`` lenses per SMC call."""

    def __init__(self, prior: LensPrior, posterior, observations: list, *, particles: int, batch: int = 8,
                 proposal: str = "gaussian", generator: torch.Generator | None = None):
        if particles < 1 or batch < 1:
            raise ValueError(f"particles and batch must be >= 1, got {particles}, {batch}")
        if proposal == "policy" and getattr(posterior, "use_head", False):
            raise ValueError("DiffusionSourceEvidence: the policy proposal with a trained head needs each lens's "
                             "conditioning input, which is not built here; use proposal 'gaussian' or use_head false")
        self.prior, self.posterior, self.obs = prior, posterior, list(observations)
        self.particles, self.batch, self.proposal = int(particles), int(batch), proposal
        self.generator = generator or torch.Generator().manual_seed(0)
        self.calls = 0

    def log_evidence(self, theta: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """log Z^(y_rows | theta) (B,) float64 for theta (B, p) and observation indices ``rows`` (B,)."""
        theta = torch.as_tensor(theta, dtype=torch.float64).reshape(-1, self.prior.dim)
        rows = torch.as_tensor(rows).reshape(-1).long()
        out = torch.empty(theta.shape[0], dtype=torch.float64)
        for s in range(0, theta.shape[0], self.batch):
            sl = slice(s, s + self.batch)
            out[sl] = self._estimate(theta[sl], rows[sl])
        self.calls += theta.shape[0]
        return out

    def _estimate(self, theta: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        problems, ys = [], []
        for t, i in zip(theta, rows.tolist()):
            problem, y, meta = self.obs[i]
            problems.append(problem_at_lens(problem, meta, self.prior.to_lens(t)))
            ys.append(y)
        n = self.particles
        batch = MultiLensProblem(problems).take(torch.arange(len(problems)).repeat_interleave(n))
        y = torch.stack(ys).repeat_interleave(n, 0)
        res = twisted_smc(self.posterior, batch, y, n, runs=len(problems), proposal=self.proposal,
                          generator=self.generator)
        return res.log_z
