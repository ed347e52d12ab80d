"""The exact posterior sampler of a linear-Gaussian chain: the discrete h-transform.

For a Gaussian prior N(mu0, S0) the chain's eps is affine, so every reverse step is
``p(x_{k-1} | x_k) = N(M_k x_k + c_k, s_k^2 I)`` and ``x0 = f(x_1) = F x_1 + f`` is affine. With a
linear-Gaussian likelihood ``r(x0) = N(y; A x0, Sigma_y)`` the functions
``h_1(x_1) = r(f(x_1))``, ``h_k(x_k) = E_p[h_{k-1}(x_{k-1}) | x_k]`` are Gaussian-shaped,
``h_k(x) ~ exp(-1/2 x^T P_k x + x^T eta_k)``, computed by a backward (Kalman/information-form)
recursion. The h-transformed chain

    q(x_K) = N(x_K; 0, I) h_K(x_K) / Z,     q(x_{k-1} | x_k) = p(x_{k-1} | x_k) h_{k-1}(x_{k-1}) / h_k(x_k)

has trajectory law exactly ``p_theta(tau) r(f(x_1)) / Z``, so ``log r + log p(tau) - log q(tau) = log Z``
for every trajectory: the test case for the log Z estimators (with the plain N(0, I) start instead
of the tilted one, the weights vary by log h_K(x_K)). Everything is float64.
"""

from __future__ import annotations

import math

import torch

from pipeline.diffusion.schedule import Chain, gaussian_log_prob


def _gauss_logpdf(x, mean, cov):
    """log N(x; mean, cov) for x (n, d), full covariance, float64."""
    L = torch.linalg.cholesky(cov)
    diff = (x - mean).T
    sol = torch.linalg.solve_triangular(L, diff, upper=False)
    d = x.shape[1]
    return -0.5 * (sol * sol).sum(0) - torch.log(torch.diagonal(L)).sum() - 0.5 * d * math.log(2 * math.pi)


class LinearGaussianHTransform:
    """Exact posterior chain for prior N(mu0, S0) on ``chain`` and ``y = A x0 + n``, n ~ N(0, Sigma_y)."""

    def __init__(self, chain: Chain, mu0, S0, A, Sigma_y, y):
        f64 = torch.float64
        self.chain = chain
        self.mu0 = torch.as_tensor(mu0, dtype=f64)
        self.S0 = torch.as_tensor(S0, dtype=f64)
        self.A = torch.as_tensor(A, dtype=f64)
        self.Sy = torch.as_tensor(Sigma_y, dtype=f64)
        self.y = torch.as_tensor(y, dtype=f64).reshape(-1)
        d = self.mu0.shape[0]
        self.d = d
        eye = torch.eye(d, dtype=f64)
        K = chain.K
        # affine eps(x) = E x + e at chain index k
        self.M, self.c, self.s2 = {}, {}, {}
        for k in range(1, K + 1):
            ab = float(chain.abar[k])
            C = ab * self.S0 + (1 - ab) * eye
            Ci = torch.linalg.inv(C)
            E = math.sqrt(1 - ab) * Ci
            e = -math.sqrt(1 - ab) * math.sqrt(ab) * Ci @ self.mu0
            if k == 1:
                self.F = (eye - math.sqrt(1 - ab) * E) / math.sqrt(ab)
                self.f = -math.sqrt(1 - ab) * e / math.sqrt(ab)
            else:
                a, b = float(chain.a[k]), float(chain.b[k])
                coef = b / math.sqrt(1 - ab)
                self.M[k] = (eye - coef * E) / math.sqrt(a)
                self.c[k] = -coef * e / math.sqrt(a)
                self.s2[k] = float(chain.reverse_var[k])
        # backward recursion in information form
        Syi = torch.linalg.inv(self.Sy)
        AF = self.A @ self.F
        self.P = {1: AF.T @ Syi @ AF}
        self.eta = {1: AF.T @ Syi @ (self.y - self.A @ self.f)}
        self.Cq, self.Lq = {}, {}
        for k in range(2, K + 1):
            s2 = self.s2[k]
            Lam = eye / s2 + self.P[k - 1]
            Cq = torch.linalg.inv(Lam)
            Cq = 0.5 * (Cq + Cq.T)
            self.Cq[k] = Cq
            self.Lq[k] = torch.linalg.cholesky(Cq)
            Q = Cq / s2 ** 2 - eye / s2  # quadratic form of m = M x + c
            M, c = self.M[k], self.c[k]
            self.P[k] = -M.T @ Q @ M
            self.eta[k] = M.T @ (Q @ c + Cq @ self.eta[k - 1] / s2)
        Lam0 = eye + self.P[K]
        self.start_cov = 0.5 * (torch.linalg.inv(Lam0) + torch.linalg.inv(Lam0).T)
        self.start_mean = self.start_cov @ self.eta[K]

    def step_mean(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """Mean of q(x_{k-1} | x_k) for x (n, d)."""
        m = x @ self.M[k].T + self.c[k]
        return (m / self.s2[k] + self.eta[k - 1]) @ self.Cq[k].T

    def log_z(self) -> float:
        """log p(y) under the chain, by forward propagation of the x_1 marginal (independent of h)."""
        eye = torch.eye(self.d, dtype=torch.float64)
        mean, cov = torch.zeros(self.d, dtype=torch.float64), eye.clone()
        for k in range(self.chain.K, 1, -1):
            mean = self.M[k] @ mean + self.c[k]
            cov = self.M[k] @ cov @ self.M[k].T + self.s2[k] * eye
        m0, C0 = self.F @ mean + self.f, self.F @ cov @ self.F.T
        my, Cy = self.A @ m0, self.A @ C0 @ self.A.T + self.Sy
        return float(_gauss_logpdf(self.y[None], my, Cy)[0])

    @torch.no_grad()
    def sample(self, n: int, generator=None, tilted_start: bool = True) -> dict:
        """Trajectories of the h-transform; returns dict with ``xs`` {k: (n, d)} for k = 1..K, ``x0``
        and ``log_q`` (the sampler's own trajectory density, start included), float64."""
        f64 = torch.float64
        K = self.chain.K
        z = torch.randn(n, self.d, generator=generator, dtype=f64)
        if tilted_start:
            Ls = torch.linalg.cholesky(self.start_cov)
            x = self.start_mean + z @ Ls.T
            log_q = _gauss_logpdf(x, self.start_mean, self.start_cov)
        else:
            x = z
            log_q = gaussian_log_prob(x, torch.zeros_like(x), 1.0)
        xs = {K: x}
        for k in range(K, 1, -1):
            mean = self.step_mean(x, k)
            x = mean + torch.randn(n, self.d, generator=generator, dtype=f64) @ self.Lq[k].T
            log_q = log_q + _rows_logpdf(x, mean, self.Cq[k])
            xs[k - 1] = x
        return {"xs": xs, "x0": xs[1] @ self.F.T + self.f, "log_q": log_q}


def _rows_logpdf(x, mean, cov):
    """log N(x_i; mean_i, cov) row-wise (mean per row)."""
    return _gauss_logpdf(x - mean, torch.zeros(x.shape[1], dtype=x.dtype), cov)
