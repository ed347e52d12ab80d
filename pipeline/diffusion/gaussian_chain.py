"""Exact laws of the strided reverse chain for a Gaussian prior.

With a Gaussian prior N(m, S) the exact noised eps at abar is affine in x:
``eps(x) = sqrt(1-abar) C^{-1} (x - sqrt(abar) m)``, ``C = abar S + (1-abar) I``. Every reverse step
``x_{k-1} = M_k x_k + c_k + std_k z`` and the final denoise ``x0 = F x_1 + f`` are then affine, so
the chain's marginals are Gaussian and follow exactly by propagating means and covariances from
``x_K ~ N(0, I)``. These are the references RTB and the baselines are judged against: the chain is
NOT the analytic prior (its x0 covariance differs, by a lot at small K).

All computations in float64 on CPU; inputs may be tensors or arrays, vectors of dimension d.
"""

from __future__ import annotations

import math

import torch

from pipeline.diffusion.schedule import Chain


def _f64(x) -> torch.Tensor:
    return torch.as_tensor(x, dtype=torch.float64).cpu()


def affine_gaussian_step(mean, cov, M, c=None, noise_cov=None):
    """Law of ``M x + c + n`` for ``x ~ N(mean, cov)`` and independent ``n ~ N(0, noise_cov)``.

    ``noise_cov`` may be None, a scalar variance (isotropic) or a (d, d) matrix. Returns (mean, cov).
    """
    mean, cov, M = _f64(mean), _f64(cov), _f64(M)
    new_mean = M @ mean + (0 if c is None else _f64(c))
    new_cov = M @ cov @ M.T
    if noise_cov is not None:
        nc = _f64(noise_cov)
        new_cov = new_cov + (nc * torch.eye(new_cov.shape[0], dtype=torch.float64) if nc.ndim == 0 else nc)
    return new_mean, 0.5 * (new_cov + new_cov.T)


def gaussian_eps_affine(prior_mean, prior_cov, abar: float):
    """(E, e) with exact eps(x) = E x + e at ``abar`` for the prior N(prior_mean, prior_cov)."""
    m, S = _f64(prior_mean), _f64(prior_cov)
    d = m.shape[0]
    C = abar * S + (1 - abar) * torch.eye(d, dtype=torch.float64)
    Cinv = torch.linalg.inv(C)
    E = math.sqrt(1 - abar) * Cinv
    return E, -math.sqrt(abar) * (E @ m)


def reverse_step_affine(chain: Chain, prior_mean, prior_cov, k: int):
    """(M, c) with mean of p(x_{k-1} | x_k) = M x_k + c, k = 2..K, under the exact Gaussian eps."""
    ab, a, b = float(chain.abar[k]), float(chain.a[k]), float(chain.b[k])
    E, e = gaussian_eps_affine(prior_mean, prior_cov, ab)
    d = E.shape[0]
    g = b / math.sqrt(1 - ab)
    M = (torch.eye(d, dtype=torch.float64) - g * E) / math.sqrt(a)
    return M, -g * e / math.sqrt(a)


def final_denoise_affine(chain: Chain, prior_mean, prior_cov):
    """(F, f) with f(x_1) = F x_1 + f, the deterministic final denoise at chain index 1."""
    ab = float(chain.abar[1])
    E, e = gaussian_eps_affine(prior_mean, prior_cov, ab)
    d = E.shape[0]
    s = math.sqrt(1 - ab)
    return (torch.eye(d, dtype=torch.float64) - s * E) / math.sqrt(ab), -s * e / math.sqrt(ab)


def _reverse_var(chain: Chain, k: int, variance: str | None) -> float:
    variance = variance or chain.variance
    if variance == "small":
        return float(chain.var_small[k])
    if variance == "large":
        return float(chain.b[k])
    raise ValueError(f"variance must be 'small' or 'large', got {variance!r}")


def propagate_gaussian_chain(chain: Chain, prior_mean, prior_cov, variance: str | None = None,
                             start_mean=None, start_cov=None) -> dict:
    """Exact marginals of the prior chain built from the exact eps of N(prior_mean, prior_cov).

    ``variance``: reverse-step variance, 'small' (beta-tilde) or 'large' (beta); default the chain's.
    The start is ``x_K ~ N(start_mean, start_cov)``, default N(0, I).

    Returns a dict with ``mean[k]``, ``cov[k]`` for k = K..1 and 0 (k = 0 is x0 = f(x_1)),
    ``x0_mean``, ``x0_cov``, the step maps ``M[k]``, ``c[k]``, ``std[k]`` (k = 2..K) and ``F``, ``f``.
    """
    m = _f64(prior_mean).reshape(-1)
    d = m.shape[0]
    S = _f64(prior_cov)
    if S.ndim == 0:
        S = S * torch.eye(d, dtype=torch.float64)
    elif S.ndim == 1:
        S = torch.diag(S)
    mean = torch.zeros(d, dtype=torch.float64) if start_mean is None else _f64(start_mean)
    cov = torch.eye(d, dtype=torch.float64) if start_cov is None else _f64(start_cov)
    out = {"mean": {chain.K: mean}, "cov": {chain.K: cov}, "M": {}, "c": {}, "std": {}}
    for k in range(chain.K, 1, -1):
        M, c = reverse_step_affine(chain, m, S, k)
        var = _reverse_var(chain, k, variance)
        mean, cov = affine_gaussian_step(mean, cov, M, c, var)
        out["M"][k], out["c"][k], out["std"][k] = M, c, math.sqrt(var)
        out["mean"][k - 1], out["cov"][k - 1] = mean, cov
    F_, f_ = final_denoise_affine(chain, m, S)
    mean, cov = affine_gaussian_step(mean, cov, F_, f_)
    out["mean"][0], out["cov"][0] = mean, cov
    out["F"], out["f"] = F_, f_
    out["x0_mean"], out["x0_cov"] = mean, cov
    return out


def gaussian_linear_posterior(mean, cov, A, noise_cov, y):
    """Posterior of x ~ N(mean, cov) given y = A x + n, n ~ N(0, noise_cov); and log p(y).

    Use with the chain's x0 law (``propagate_gaussian_chain(...)['x0_mean'/'x0_cov']``) for the exact
    posterior and evidence *under the chain*. Returns (post_mean, post_cov, log_z) in float64.
    """
    mean, cov, A, y = _f64(mean), _f64(cov), _f64(A), _f64(y).reshape(-1)
    N = _f64(noise_cov)
    if N.ndim == 0:
        N = N * torch.eye(A.shape[0], dtype=torch.float64)
    elif N.ndim == 1:
        N = torch.diag(N)
    Sy = A @ cov @ A.T + N
    L = torch.linalg.cholesky(0.5 * (Sy + Sy.T))
    r = y - A @ mean
    K = torch.cholesky_solve(A @ cov, L).T  # cov A^T Sy^{-1}
    post_mean = mean + K @ r
    post_cov = cov - K @ A @ cov
    alpha = torch.cholesky_solve(r[:, None], L)[:, 0]
    log_z = (-0.5 * (r @ alpha) - torch.log(torch.diagonal(L)).sum() - 0.5 * y.shape[0] * math.log(2 * math.pi))
    return post_mean, 0.5 * (post_cov + post_cov.T), float(log_z)


def gaussian_w2(mean1, cov1, mean2, cov2) -> float:
    """2-Wasserstein distance between two Gaussians (float64, via symmetric square roots)."""
    m1, C1, m2, C2 = _f64(mean1), _f64(cov1), _f64(mean2), _f64(cov2)

    def sqrtm(C):
        w, V = torch.linalg.eigh(0.5 * (C + C.T))
        return (V * w.clamp_min(0).sqrt()) @ V.T

    r2 = sqrtm(C2)
    cross = sqrtm(r2 @ C1 @ r2)
    val = ((m1 - m2) ** 2).sum() + torch.trace(C1 + C2 - 2 * cross)
    return float(val.clamp_min(0).sqrt())
