"""The ``Prior`` interface: a noise schedule plus an eps-prediction ``eps(x_t, t)``.

Implemented by the trained network (:class:`pipeline.diffusion.network_prior.NetworkPrior`) and by
the analytic Gaussian mixture below, whose noised eps is exact (the correctness harness).
"""

from __future__ import annotations

import math

import torch

from pipeline.diffusion.schedule import NoiseSchedule


class Prior:
    """Base class. ``event_shape`` is the shape of one sample (``(d,)`` or ``(C, H, W)``)."""

    schedule: NoiseSchedule
    event_shape: tuple[int, ...]

    def eps(self, x: torch.Tensor, t: torch.Tensor | int, cond=None) -> torch.Tensor:
        """eps-prediction at integer training timestep(s) ``t`` (scalar or shape (B,))."""
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")


class GaussianMixturePrior(Prior):
    """p(x0) = sum_j w_j N(m_j, S_j), with the exact eps of the VP-noised mixture.

    Under ``x_t = sqrt(ab) x0 + sqrt(1-ab) e`` the noised law is the mixture of
    ``N(sqrt(ab) m_j, ab S_j + (1-ab) I)``; eps = -sqrt(1-ab) * grad log p_t(x_t).
    Computations run in float64; ``eps`` returns the dtype of ``x``.
    """

    def __init__(self, weights, means, covs, schedule: NoiseSchedule | None = None):
        w = torch.as_tensor(weights, dtype=torch.float64)
        m = torch.as_tensor(means, dtype=torch.float64)
        S = torch.as_tensor(covs, dtype=torch.float64)
        if m.ndim != 2:
            raise ValueError("means must have shape (J, d)")
        J, d = m.shape
        if S.ndim == 0:
            S = S * torch.eye(d, dtype=torch.float64).expand(J, d, d)
        elif S.ndim == 2:
            S = S.expand(J, d, d)
        if w.shape != (J,) or S.shape != (J, d, d):
            raise ValueError(f"weights (J,) and covs (J,d,d) expected; got {tuple(w.shape)}, {tuple(S.shape)}")
        if (w < 0).any() or abs(float(w.sum()) - 1.0) > 1e-6:
            raise ValueError("mixture weights must be non-negative and sum to 1")
        self.weights, self.means, self.covs = w, m, S.clone()
        self.schedule = schedule or NoiseSchedule()
        self.event_shape = (d,)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def _noised(self, ab: torch.Tensor):
        """Component means (J,d) and covariances (B?,J,d,d) at abar ``ab`` (shape (B,))."""
        eye = torch.eye(self.dim, dtype=torch.float64)
        mu = ab.sqrt()[:, None, None] * self.means[None]  # (B,J,d)
        cov = ab[:, None, None, None] * self.covs[None] + (1 - ab)[:, None, None, None] * eye
        return mu, cov

    def responsibilities_and_scores(self, x: torch.Tensor, ab: torch.Tensor):
        """Per-component log-weights log w_j N(x; mu_j, C_j) (B,J) and scores -C_j^{-1}(x-mu_j) (B,J,d)."""
        x64 = x.double()
        mu, cov = self._noised(ab)
        L = torch.linalg.cholesky(cov)
        diff = (x64[:, None, :] - mu)  # (B,J,d)
        sol = torch.cholesky_solve(diff.unsqueeze(-1), L).squeeze(-1)
        logdet = 2 * torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)
        logn = -0.5 * (diff * sol).sum(-1) - 0.5 * logdet - 0.5 * self.dim * math.log(2 * math.pi)
        return torch.log(self.weights)[None] + logn, -sol

    def _abar_batch(self, t, n: int) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.long)
        if t.ndim == 0:
            t = t.expand(n)
        return self.schedule.alpha_bar[t.cpu()]

    def log_prob_noised(self, x: torch.Tensor, t) -> torch.Tensor:
        ab = self._abar_batch(t, x.shape[0])
        logits, _ = self.responsibilities_and_scores(x.cpu(), ab)
        return torch.logsumexp(logits, 1)

    def score(self, x: torch.Tensor, t) -> torch.Tensor:
        ab = self._abar_batch(t, x.shape[0])
        logits, comp_scores = self.responsibilities_and_scores(x.cpu(), ab)
        r = torch.softmax(logits, 1)
        return (r[..., None] * comp_scores).sum(1)

    def eps(self, x: torch.Tensor, t, cond=None) -> torch.Tensor:
        ab = self._abar_batch(t, x.shape[0])
        s = self.score(x, t)
        return (-(1 - ab).sqrt()[:, None] * s).to(dtype=x.dtype, device=x.device)

    def sample(self, n: int, generator=None) -> torch.Tensor:
        """Exact samples of the analytic (not chain) prior, float64."""
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        L = torch.linalg.cholesky(self.covs)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.means[comp] + (L[comp] @ z[..., None]).squeeze(-1)

    def component_of(self, x: torch.Tensor) -> torch.Tensor:
        """Most responsible component of each clean sample (for mode-weight distances)."""
        logits, _ = self.responsibilities_and_scores(x.cpu(), torch.ones(x.shape[0], dtype=torch.float64))
        return logits.argmax(1)
