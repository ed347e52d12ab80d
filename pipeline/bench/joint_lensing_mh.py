"""Metropolis-Hastings reference for the Gaussian-source lensing check (:mod:`pipeline.bench.joint_lensing_gaussian`).

Random-walk MH over the lens parameters theta with the exact log p(theta) + log p(y | theta) of the model, for
many observations at once; the position angle phi, whose period is pi, is moved modulo pi, and the helpers
below read it on its circle."""

from __future__ import annotations

import math

import torch


def metropolis(model, y: torch.Tensor, theta0: torch.Tensor, step: torch.Tensor, *,
               n_iter: int, burn: int, seed: int) -> dict:
    """Random-walk MH over theta for each row of y (B, m) at once, target p(theta) p(y | theta) (exact;
    ``model`` gives ``prior``, a LensPrior, and ``log_evidence(theta, y)``, log p(y | theta) in nats);
    ``step`` (B, p): the starting per-parameter proposal sds; phi (if free) is wrapped into its period.

    During the first ``burn`` iterations the proposal adapts every 100 iterations: its covariance becomes
    2.38^2 / p times each chain's covariance over the latter half of the iterations so far (Haario et al.
    2001; phi unwrapped around its circular mean), so strongly correlated parameters (|rho| ~ 0.9 between
    q and the shear) move along their ridge, and a scale is tuned towards acceptance 0.25. After ``burn``
    the proposal is fixed, so the kept iterations are a plain MH chain. Returns dict(theta
    (n_iter - burn, B, p), acceptance (B,) of the kept iterations, step (B, p): the final proposal sds)."""
    gen = torch.Generator().manual_seed(seed)
    names, box = model.prior.names, model.prior.box
    phi = names.index("phi") if "phi" in box and abs(box["phi"][1] - box["phi"][0] - math.pi) < 1e-9 else None
    theta = theta0.clone()
    chol = torch.diag_embed(step.clone().double())                       # (B, p, p) proposal factor
    lp = model.prior.log_prob(theta) + model.log_evidence(theta, y)
    out = torch.empty(n_iter, *theta.shape, dtype=torch.float64)
    acc = torch.zeros(n_iter, theta.shape[0])
    scale = torch.ones(theta.shape[0], 1, dtype=torch.float64)
    for i in range(n_iter):
        z = torch.randn(theta.shape, generator=gen, dtype=torch.float64)
        prop = theta + scale * (chol @ z[..., None])[..., 0]
        if phi is not None:
            prop[:, phi] = box["phi"][0] + torch.remainder(prop[:, phi] - box["phi"][0], math.pi)
        lp_new = model.prior.log_prob(prop)
        ok = torch.isfinite(lp_new)
        if ok.any():
            lp_new[ok] = lp_new[ok] + model.log_evidence(prop[ok], y[ok])
        take = ok & (torch.log(torch.rand(theta.shape[0], generator=gen, dtype=torch.float64)) < lp_new - lp)
        theta[take], lp[take] = prop[take], lp_new[take]
        acc[i] = take.double()
        out[i] = theta
        if i < burn and (i + 1) % 100 == 0:
            chol = _adapted_factor(out[(i + 1) // 2:i + 1], chol, phi)
            rate = acc[i - 99:i + 1].mean(0)[:, None].double()
            scale = scale * torch.exp(rate - 0.25).clamp(0.5, 2.0)
    sds = (scale[:, :, None] * chol).pow(2).sum(-1).sqrt()
    return {"theta": out[burn:], "acceptance": acc[burn:].mean(0).tolist(), "step": sds.tolist()}


def _adapted_factor(window: torch.Tensor, chol: torch.Tensor, phi: int | None) -> torch.Tensor:
    """Cholesky factor of 2.38^2 / p times each chain's covariance over ``window`` (n, B, p); a parameter
    that has not moved keeps half its previous proposal sd, uncorrelated with the others."""
    window = window.clone()
    if phi is not None:  # unwrap each chain's phi around its own circular mean before its spread
        for b in range(window.shape[1]):
            w = window[:, b, phi]
            window[:, b, phi] = circular_unwrap(w, circular_mean(w, math.pi), math.pi)
    n, B, p = window.shape
    x = window - window.mean(0)
    cov = torch.einsum("nbi,nbj->bij", x, x) / max(n - 1, 1) * (2.38 ** 2 / p)
    var = torch.diagonal(cov, dim1=-2, dim2=-1)
    still = var <= 0
    prev_var = torch.diagonal(chol @ chol.transpose(-1, -2), dim1=-2, dim2=-1)
    keep = torch.where(still, 0.25 * prev_var, var)
    cov = torch.where(still[:, :, None] | still[:, None, :], torch.zeros_like(cov), cov)
    cov = cov + torch.diag_embed(torch.where(still, keep, 1e-10 * keep))
    return torch.linalg.cholesky(cov)


def circular_unwrap(values: torch.Tensor, centre: float, period: float) -> torch.Tensor:
    """values moved by whole periods to lie within period / 2 of centre."""
    return centre + torch.remainder(values - centre + period / 2, period) - period / 2


def circular_mean(values: torch.Tensor, period: float) -> float:
    a = values * (2 * math.pi / period)
    return float(torch.atan2(torch.sin(a).mean(), torch.cos(a).mean())) * period / (2 * math.pi)


def reference_chains(model, y: torch.Tensor, truth: torch.Tensor, *, n_iter: int, burn: int,
                     seed: int) -> dict:
    """MH chains for the rows of y (:func:`metropolis`) started at the true theta, in the posterior's bulk;
    a posterior's other, separated modes would be missed (and q's mass there counted against it)."""
    start_sd = 1e-3 * torch.tensor([hi - lo for lo, hi in model.prior.box.values()]
                                   + [model.prior.config.shear_sigma] * (2 * model.prior.has_shear))
    return metropolis(model, y, truth, start_sd.expand_as(truth), n_iter=n_iter, burn=burn, seed=seed)
