"""Distances between sample sets: 1-D Wasserstein, sliced Wasserstein, mixture-weight TV.

Conventions: samples are (n, d) tensors (any float dtype; computed in float64). The sliced
Wasserstein distance is SW_p = (E_theta W_p^p(theta^T X, theta^T Y))^(1/p) with theta uniform on the
unit sphere, estimated with a fixed number of random projections (>= 100) from a seeded generator so
two calls with the same seed use the same directions. ``row_space=A`` restricts the directions to the
row space of A (the data-informed subspace of a linear problem y = A x + n).
"""

from __future__ import annotations

import torch

MIN_PROJECTIONS = 100


def _quantiles(v: torch.Tensor, n_q: int) -> torch.Tensor:
    """Empirical quantile function of a 1-D sample at the midpoints (i + 1/2)/n_q (B, n) -> (B, n_q)."""
    v = torch.sort(v, dim=-1).values
    n = v.shape[-1]
    if n == n_q:
        return v
    # The empirical quantile function is a step function: sample i covers (i/n, (i+1)/n].
    levels = (torch.arange(n_q, dtype=torch.float64, device=v.device) + 0.5) / n_q
    idx = torch.clamp((levels * n).long(), max=n - 1)
    return v[..., idx]


def wasserstein_1d(x, y, p: int = 1) -> torch.Tensor:
    """W_p between 1-D empirical laws along the last axis (exact for equal sizes; otherwise on the
    quantile grid of the larger set). Batched: (..., n), (..., m) -> (...)."""
    x = torch.as_tensor(x).double()
    y = torch.as_tensor(y).double()
    n_q = max(x.shape[-1], y.shape[-1])
    qx, qy = _quantiles(x, n_q), _quantiles(y, n_q)
    return (qx - qy).abs().pow(p).mean(-1).pow(1.0 / p)


def _row_space_basis(A) -> torch.Tensor:
    """Orthonormal basis (d, r) of the row space of A (r = rank)."""
    A = torch.as_tensor(A).double()
    U, S, Vh = torch.linalg.svd(A, full_matrices=False)
    r = int((S > S.max() * 1e-10).sum())
    return Vh[:r].T


def sliced_wasserstein(x, y, n_projections: int = 256, p: int = 2, seed: int = 0, row_space=None) -> float:
    """Sliced W_p distance between sample sets x (n, d) and y (m, d).

    ``row_space``: a matrix A (d_y, d); the samples are first projected onto an orthonormal basis of
    its row space (in 1-D that subspace gives the exact W_p of the projections).
    """
    if n_projections < MIN_PROJECTIONS:
        raise ValueError(f"sliced Wasserstein needs >= {MIN_PROJECTIONS} projections, got {n_projections}")
    x = torch.as_tensor(x).double().reshape(len(x), -1)
    y = torch.as_tensor(y).double().reshape(len(y), -1)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"dimension mismatch: {x.shape[1]} vs {y.shape[1]}")
    if row_space is not None:
        Q = _row_space_basis(row_space).to(x.device)
        x, y = x @ Q, y @ Q
    d = x.shape[1]
    if d == 1:
        return float(wasserstein_1d(x[:, 0], y[:, 0], p))
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(d, n_projections, generator=g, dtype=torch.float64).to(x.device)
    theta = theta / theta.norm(dim=0, keepdim=True)
    px, py = (x @ theta).T, (y @ theta).T  # (P, n), (P, m)
    wp = wasserstein_1d(px, py, p).pow(p)
    return float(wp.mean().pow(1.0 / p))


def component_weights(components, n_components: int) -> torch.Tensor:
    """Empirical weights of mixture-component labels (n,) -> (J,), float64."""
    c = torch.as_tensor(components).long().reshape(-1)
    counts = torch.bincount(c, minlength=n_components).double()
    return counts / max(1, c.numel())


def mode_tv(weights_a, weights_b) -> float:
    """Total-variation distance 1/2 sum_j |a_j - b_j| between two component-weight vectors."""
    a = torch.as_tensor(weights_a).double()
    b = torch.as_tensor(weights_b).double()
    if a.shape != b.shape:
        raise ValueError(f"weight vectors differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    return float(0.5 * (a - b).abs().sum())
