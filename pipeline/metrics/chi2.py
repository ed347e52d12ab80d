"""chi2_nu of residuals per posterior sample, over the image and inside the arc.

chi2_nu(x_s) = sum_{unmasked} ((y - A(x_s)) / sigma)^2 / nu with nu = the number of unmasked image
pixels (not nu minus parameters: by exchangeability of exact posterior samples with the truth,
E[chi2] = nu for any prior and operator). The arc is defined PER SAMPLE from its own noiseless
model: unmasked pixels with A(x_s) > sigma; a mask from the data (y > sigma) would select positive
noise and inflate chi2. ``problem`` is any :class:`pipeline.problems.InverseProblem` (``forward``,
``sigma``, ``mask``); samples are in the units ``problem.forward`` expects.
"""

from __future__ import annotations

import numpy as np
import torch


class PhysicalView:
    """The forward model on physical-unit sources (x_phys = s*x + b): a ``LensingProblem``'s
    ``physical_forward`` with the same ``sigma`` and ``mask``."""

    def __init__(self, problem):
        self.problem, self.sigma, self.mask = problem, problem.sigma, problem.mask

    def forward(self, x):
        x = x.reshape(x.shape[0], *self.problem.x_shape)
        return self.problem.physical_forward(x).reshape(x.shape[0], *self.sigma.shape)


def forward_view(problem, units: str = "physical"):
    """What to call ``forward`` on for sources in ``units`` (a posterior file's ``XUNITS``):
    physical units use ``physical_forward`` when the problem has one; otherwise the problem itself."""
    if units == "physical" and hasattr(problem, "physical_forward"):
        return PhysicalView(problem)
    return problem


@torch.no_grad()
def chi2_per_sample(problem, samples, y, *, batch: int = 64) -> dict:
    """y: (*y_shape), shared by all samples, or (n, *y_shape), one per sample.
    Returns numpy float64 arrays (n,): ``chi2_nu``, ``chi2_arc_nu`` (NaN where a sample has no
    arc pixel) and ``n_arc``; plus ``nu`` (int)."""
    sigma = problem.sigma
    device = sigma.device
    x = torch.as_tensor(np.asarray(samples) if not torch.is_tensor(samples) else samples)
    x = x.to(device=device, dtype=torch.float32)
    y = torch.as_tensor(y).to(device=device).double()
    mask = problem.mask.to(device)
    s64 = sigma.double()
    nu = int(mask.sum())
    per_sample_y = y.dim() == mask.dim() + 1
    chi, chi_arc, n_arc = [], [], []
    for i in range(0, x.shape[0], batch):
        model = problem.forward(x[i:i + batch]).double()
        yb = y[i:i + batch] if per_sample_y else y
        r2 = ((yb - model) / s64) ** 2
        r2 = torch.where(mask, r2, torch.zeros((), dtype=r2.dtype, device=device))
        arc = (model > s64) & mask
        flat = r2.reshape(r2.shape[0], -1)
        chi.append(flat.sum(1) / nu)
        na = arc.reshape(arc.shape[0], -1).sum(1)
        sa = (flat * arc.reshape(arc.shape[0], -1)).sum(1)
        chi_arc.append(torch.where(na > 0, sa / na.clamp(min=1), torch.full_like(sa, float("nan"))))
        n_arc.append(na)
    return {
        "chi2_nu": torch.cat(chi).cpu().numpy(),
        "chi2_arc_nu": torch.cat(chi_arc).cpu().numpy(),
        "n_arc": torch.cat(n_arc).cpu().numpy(),
        "nu": nu,
    }


@torch.no_grad()
def data_snr(problem, y) -> float:
    """Signal-to-noise of an observation's data alone (dimensionless): sqrt(max(sum_m (y/sigma)^2 - m, 0))
    over the m unmasked pixels, the usual estimate of ||A x|| / sigma (the expected sum is ||A x / sigma||^2
    + m). A function of y, sigma and the mask only, so observations grouped by it keep an exact sampler's
    coverage in every group; grouping by a property of the truth (e.g. the noiseless image's peak) does not.
    """
    mask = problem.mask
    r2 = (torch.as_tensor(y).to(mask.device).double() / problem.sigma.double()) ** 2
    total = float(torch.where(mask, r2, torch.zeros((), dtype=r2.dtype, device=mask.device)).sum())
    return float(np.sqrt(max(total - int(mask.sum()), 0.0)))


def normalised_residual(problem, x, y) -> np.ndarray:
    """(y - A(x)) / sigma for one source x (*x_shape), masked pixels set to NaN (for plots)."""
    with torch.no_grad():
        xt = torch.as_tensor(np.asarray(x), dtype=torch.float32, device=problem.sigma.device)[None]
        model = problem.forward(xt)[0].double()
        r = (torch.as_tensor(y).to(model.device).double() - model) / problem.sigma.double()
        r = torch.where(problem.mask.to(model.device), r, torch.full_like(r, float("nan")))
    return r.cpu().numpy()
