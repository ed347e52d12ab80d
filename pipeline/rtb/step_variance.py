"""Likelihood-informed step variance: each reverse step's per-pixel variance narrowed by the data.

The RTB policy's step x_k -> x_{k-1} is Gaussian with the prior chain's std ``s_k`` times the head's
learned factor. Where the data constrain a pixel, the posterior's step is narrower than the prior's;
training learns that slowly, because the gradient of a per-pixel log-variance is a noisy product of a
trajectory's residual with that pixel's squared noise. This module gives the narrowing in closed form
under a diagonal Gaussian model, so the head only learns what remains:

* each source pixel of x_0 has prior variance ``tau2`` (network units), independent of the others;
* the forward process gives ``x_{k-1} = sqrt(abar) x_0 + sqrt(1 - abar) eps`` (``abar = abar_{k-1}``),
  so with ``v = (1 - abar) / abar``

      E[x_0 | x_{k-1}] = g x_{k-1} + const,  g = tau2 / (sqrt(abar) (tau2 + v)),
      Var[x_0 | x_{k-1}] = c = tau2 v / (tau2 + v);

* the data give pixel ``i`` of x_0 a Gaussian likelihood of precision ``h_i = diag(A^T A / sigma^2)_i``
  (network units: the lens operator's own ``diag_precision``).

Integrating x_0 out, the likelihood of x_{k-1} has precision ``lambda = g^2 h / (1 + h c)`` per pixel,
and its Gaussian product with a step of std ``s`` has std ``s / sqrt(1 + s_k^2 lambda)`` (``s_k`` the
prior chain's std: the product is taken with the prior's step, then the head's factor applies). The
policy's mean is left as the network gives it. With ``mode="tweedie"`` the
prior variance is per pixel and per state, ``x0hat^2 + tau2`` (:func:`local_tau2`; ``tau2`` is then the
floor); with ``mode="galaxy"`` it is one value per sample, the mean over pixels of ``x0hat^2`` plus
``tau2`` (:func:`galaxy_tau2`): prior galaxies span three decades in mean square brightness, so one
prior-wide value over-narrows the faint ones and under-narrows the bright. The narrowed std is used both to draw and to score
(log q), so log q, the ELBO and log Z stay exact for what is sampled; only how close the step is to the
posterior's rests on the approximation (pixels are not independent: the PSF and the lens couple them).
"""

from __future__ import annotations

import torch


MODES = ("prior", "tweedie", "galaxy")


def data_precision_on_state(h: torch.Tensor, abar_prev, tau2) -> torch.Tensor:
    """Per-pixel likelihood precision on x_{k-1}, ``g^2 h / (1 + h c)`` (network units^-2).

    ``h``: diag(A^T A / sigma^2) on the source grid (network units^-2), any shape; ``abar_prev``:
    abar_{k-1} in (0, 1], a float or a tensor broadcastable to ``h``; ``tau2`` > 0: the prior's per-pixel
    variance of x_0 (network units^2), a float or a tensor broadcastable to ``h``. Returns a tensor shaped
    like ``h`` (float64 where ``h`` is)."""
    tau2 = torch.as_tensor(tau2, dtype=h.dtype, device=h.device)
    if not bool((tau2 > 0).all()):
        raise ValueError(f"tau2 must be > 0, got {tau2.min().item()!r}")
    ab = torch.as_tensor(abar_prev, dtype=h.dtype, device=h.device)
    v = (1.0 - ab) / ab
    g = tau2 / (ab.sqrt() * (tau2 + v))
    c = tau2 * v / (tau2 + v)
    return g * g * h / (1.0 + h * c)


def narrowing(h: torch.Tensor, abar_prev, step_std, tau2) -> torch.Tensor:
    """Factor ``(1 + s_k^2 lambda)^(-1/2)`` in (0, 1] on a step's std (dimensionless), shaped like ``h``.

    ``step_std``: the prior chain's std ``s_k`` of the step (network units), a float or a tensor
    broadcastable to ``h``; the rest as in :func:`data_precision_on_state`."""
    s2 = torch.as_tensor(step_std, dtype=h.dtype, device=h.device) ** 2
    return (1.0 + s2 * data_precision_on_state(h, abar_prev, tau2)).rsqrt()


def local_tau2(x: torch.Tensor, eps: torch.Tensor, abar, floor: float) -> torch.Tensor:
    """Per-pixel prior variance from the state itself: ``x0hat^2 + floor`` (network units^2), with
    ``x0hat = (x - sqrt(1 - abar) eps) / sqrt(abar)`` the prior's Tweedie estimate at x_k (``abar`` =
    abar_k, broadcastable to x; ``eps``: the prior's eps there). A function of x_k only, so a step whose
    std uses it stays a Gaussian in x_{k-1} with exact log q. Where the estimate is bright the prior's
    variance there is large, where it is faint (a faint galaxy, the background) small, which a single
    prior-wide ``tau2`` cannot follow."""
    ab = torch.as_tensor(abar, dtype=x.dtype, device=x.device)
    x0hat = (x - (1.0 - ab).sqrt() * eps) / ab.sqrt()
    return x0hat.detach() ** 2 + floor


def galaxy_tau2(x: torch.Tensor, eps: torch.Tensor, abar, floor: float) -> torch.Tensor:
    """One prior variance per sample: the mean over its pixels of ``x0hat^2`` plus ``floor`` (network
    units^2), shaped (B, 1, ..., 1) to broadcast against ``x`` (B, ...); ``x0hat`` as in
    :func:`local_tau2`. For x_0 itself this is the galaxy's mean square brightness, which is what the
    per-pixel variance of prior draws of that brightness scales with; a function of x_k only, so log q
    stays exact."""
    x0sq = local_tau2(x, eps, abar, 0.0)
    return x0sq.mean(dim=tuple(range(1, x.ndim)), keepdim=True) + floor
