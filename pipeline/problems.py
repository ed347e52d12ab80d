"""The ``InverseProblem`` interface that lensing, vision and the analytic benchmarks share.

``y = forward(x) + n``, ``n ~ N(0, diag(sigma^2))`` on the unmasked pixels. ``log_likelihood`` is the
*fully normalised* Gaussian log-density over unmasked pixels:
``-1/2 sum((y - A(x))/sigma)^2 - sum(log sigma) - (m/2) log(2 pi)``, computed in float64.
"""

from __future__ import annotations

import math

import torch

LOG_2PI = math.log(2.0 * math.pi)


class InverseProblem:
    """One fixed measurement operator with its noise map and mask.

    ``x`` has shape (B, *x_shape); ``y`` has shape (B, *y_shape) or (*y_shape) (broadcast).
    ``sigma`` and ``mask`` have shape ``y_shape``; masked-out pixels (mask False) are ignored.
    """

    is_linear: bool = False
    x_shape: tuple[int, ...]
    y_shape: tuple[int, ...]

    def __init__(self, sigma: torch.Tensor, mask: torch.Tensor | None = None):
        sigma = torch.as_tensor(sigma, dtype=torch.float32)
        if mask is None:
            mask = torch.ones(sigma.shape, dtype=torch.bool)
        mask = torch.as_tensor(mask, dtype=torch.bool)
        if sigma.shape != mask.shape:
            raise ValueError(f"sigma {tuple(sigma.shape)} and mask {tuple(mask.shape)} differ in shape")
        if not torch.isfinite(sigma[mask]).all() or (sigma[mask] <= 0).any():
            raise ValueError("noise sigma must be finite and > 0 on unmasked pixels")
        self.sigma, self.mask = sigma, mask

    # -- to implement ---------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Noise-free model image A(x), shape (B, *y_shape)."""
        raise NotImplementedError

    # -- shared -----------------------------------------------------------------------------
    @property
    def n_data(self) -> int:
        """m: number of unmasked measurements."""
        return int(self.mask.sum())

    def log_norm_const(self) -> float:
        """-sum(log sigma) - (m/2) log 2pi over unmasked pixels."""
        s = self.sigma.double()[self.mask]
        return float(-torch.log(s).sum() - 0.5 * self.n_data * LOG_2PI)

    def residual_chi2(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """sum over unmasked pixels of ((y - A x)/sigma)^2, shape (B,), float64."""
        r = (y.double() - self.forward(x).double()) / self.sigma.double().to(x.device)
        r = r * self.mask.to(x.device)
        return (r * r).reshape(r.shape[0], -1).sum(1)

    def log_likelihood(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Fully normalised log p(y | x), shape (B,), float64."""
        return -0.5 * self.residual_chi2(x, y) + self.log_norm_const()

    def grad_log_likelihood(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """d log p(y|x) / dx by autograd (linear problems override with A^T)."""
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            ll = self.log_likelihood(xg, y).sum()
            (g,) = torch.autograd.grad(ll, xg)
        return g

    def simulate(self, x: torch.Tensor, generator=None) -> torch.Tensor:
        """Noisy observation y = A(x) + sigma * n (masked pixels set to 0)."""
        mean = self.forward(x)
        n = torch.randn(mean.shape, generator=generator, dtype=mean.dtype).to(mean.device)
        return (mean + self.sigma.to(mean.device) * n) * self.mask.to(mean.device)

    def to(self, device) -> "InverseProblem":
        self.sigma, self.mask = self.sigma.to(device), self.mask.to(device)
        return self


class LinearInverseProblem(InverseProblem):
    """A linear operator. Subclasses give ``A`` and ``AT``; the dense helpers below serve the
    closed-form samplers (FPS, CLA, exact guidance) for problems small enough to form matrices."""

    is_linear = True

    def A(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def AT(self, r: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.A(x)

    def grad_log_likelihood(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        s2 = (self.sigma.to(x.device) ** 2)
        r = (y - self.A(x)) / s2 * self.mask.to(x.device)
        return self.AT(r.to(x.dtype))

    # whitened operator W A, W = diag(mask / sigma): what a solver of the linearised data term iterates on
    def whitened_residual(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """W (y - forward(x)) for sources x (B, *x_shape), in units of sigma (0 on masked pixels)."""
        w = self.mask.to(x.device) / self.sigma.to(x.device)
        return (y.to(x.dtype) - self.forward(x)) * w.to(x.dtype)

    def whitened_A(self, u: torch.Tensor) -> torch.Tensor:
        """W A u for source-space u (B, *x_shape)."""
        return self.A(u) * (self.mask.to(u.device) / self.sigma.to(u.device)).to(u.dtype)

    def whitened_AT(self, w: torch.Tensor) -> torch.Tensor:
        """A^T W w for image-space w (B, *y_shape): the adjoint of :meth:`whitened_A`."""
        return self.AT((w * (self.mask.to(w.device) / self.sigma.to(w.device)).to(w.dtype)))

    def dense_matrix(self) -> torch.Tensor:
        """A as a dense (m_all, d) float64 matrix (rows for every pixel, masked ones included)."""
        d = math.prod(self.x_shape)
        eye = torch.eye(d, dtype=torch.float64).reshape(d, *self.x_shape)
        cols = self.A(eye.to(self.sigma.device)).reshape(d, -1).double()
        return cols.T.contiguous()


class DenseLinearProblem(LinearInverseProblem):
    """y = M x + n with a dense matrix M (d_y, d_x); used by the analytic benchmarks and tests."""

    def __init__(self, matrix, sigma, mask=None):
        M = torch.as_tensor(matrix, dtype=torch.float64)
        if M.ndim != 2:
            raise ValueError("matrix must be 2-D (d_y, d_x)")
        sigma = torch.as_tensor(sigma, dtype=torch.float32)
        if sigma.ndim == 0:
            sigma = sigma.expand(M.shape[0]).clone()
        super().__init__(sigma, mask)
        self.M = M
        self.x_shape, self.y_shape = (M.shape[1],), (M.shape[0],)

    def A(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.M.to(device=x.device, dtype=x.dtype).T

    def AT(self, r: torch.Tensor) -> torch.Tensor:
        return r @ self.M.to(device=r.device, dtype=r.dtype)

    def dense_matrix(self) -> torch.Tensor:
        return self.M.clone()

    def diag_precision(self, y: torch.Tensor) -> torch.Tensor:
        """diag(M^T diag(mask / sigma^2) M), one row per observation in y (B, d_y): (B, d_x)."""
        w = (self.mask.to(torch.float64) / self.sigma.to(torch.float64) ** 2)
        d = ((self.M ** 2) * w[:, None]).sum(0)
        return d.to(y.device, torch.float32).expand(y.reshape(-1, *self.y_shape).shape[0], *self.x_shape)

    def row_precision(self, y: torch.Tensor) -> torch.Tensor:
        """Row sums of |M|^T diag(mask / sigma^2) |M| (>= the diagonal; a Gershgorin bound on every
        eigenvalue of M^T M / sigma^2), one row per observation in y (B, d_y): (B, d_x)."""
        w = (self.mask.to(torch.float64) / self.sigma.to(torch.float64) ** 2)
        a = self.M.abs()
        r = a.T @ (w * a.sum(1))
        return r.to(y.device, torch.float32).expand(y.reshape(-1, *self.y_shape).shape[0], *self.x_shape)
