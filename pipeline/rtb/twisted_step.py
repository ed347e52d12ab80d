"""The last reverse step x_2 -> x_1 as the prior kernel twisted by a linear-Gaussian likelihood.

For a trained posterior whose marginal of x_2 is right, the best last step is the prior's own kernel
times the likelihood of the final sample, ``q*(x_1 | x_2) ∝ p(x_1 | x_2) r(f(x_1))``, with
``f`` the frozen prior's final denoise. On lensing the policy's isotropic last step
leaves the samples' arc χ² well above the truths' (docs/results/experiments.md, "Where the rest sits"), and a
per-pixel variance cannot reach the smooth directions the arc constrains.

With a linear forward model ``A`` (lensing: ``A(s·x + b)``), whitened by ``W = diag(mask/σ)``, and
``f`` linearised at a point ``x̄`` with Jacobian ``J``, the product is Gaussian in x_1:

    G = W A J,   P = I/s² + GᵀG,   m = μ + P⁻¹ Gᵀ (ρ − G (μ − x̄)),   ρ = W (y − A f(x̄)),

where ``N(μ, s² I)`` is the prior's step from x_2. Gauss–Newton: the first linearisation is at the
policy's own step mean, each further one at the previous ``m`` (``iterations`` Jacobians per sample).
The step is drawn as ``x_1 = m + L⁻ᵀ z`` (``P = L Lᵀ``) and scored exactly under that Gaussian, so log
q, the ELBO and log Z stay exact for what is sampled; only the *optimality* of the step rests on the
linearisation (exact when ``f`` is linear, e.g. a Gaussian prior).

Cost: one dense (d × d) Jacobian of ``f`` per sample and iteration (d backward passes, vectorised) and
one Cholesky of a d × d matrix: seconds per sample on a GPU at d = 1024, minutes on two CPU cores.
"""

from __future__ import annotations

import math

import torch

from pipeline.rtb.objective import prior_eps


class GaussNewtonLastStep:
    """Callable last step for :func:`pipeline.rtb.objective.policy_rollout` (``last_step=``).

    ``problem`` is the observation's linear inverse problem (``dense_matrix()``, ``forward``, ``sigma``,
    ``mask``) and ``y`` its data, both unpacked (one observation).
    """

    def __init__(self, prior, chain, problem, y, *, iterations: int = 2):
        if not getattr(problem, "is_linear", False) or not hasattr(problem, "dense_matrix"):
            raise ValueError(f"the Gauss-Newton last step needs a linear forward model with a dense matrix; "
                             f"{type(problem).__name__} has none")
        if int(iterations) < 1:
            raise ValueError(f"iterations must be >= 1, got {iterations}")
        self.prior, self.chain, self.problem, self.iterations = prior, chain, problem, int(iterations)
        dev = prior.device
        w = (problem.mask.to(torch.float64) / problem.sigma.to(torch.float64)).reshape(-1).to(dev)
        self.w = w
        self.WA = problem.dense_matrix().to(dev) * w[:, None]          # (m, d) whitened linear part
        self.yw = torch.as_tensor(y, dtype=torch.float64).reshape(-1).to(dev) * w
        self.d = self.WA.shape[1]
        self.event_shape = tuple(prior.event_shape)

    def _f(self, v: torch.Tensor) -> torch.Tensor:
        """f on one flattened state (d,) -> (d,), differentiable."""
        x = v.reshape(1, *self.event_shape)
        return self.chain.final_denoise(x, prior_eps(self.prior, self.chain, x, 1)).reshape(-1)

    def _linearise(self, xbar: torch.Tensor):
        """(G, rho) at one point: G = W A J_f(xbar) (m, d), rho = W (y - A f(xbar)) (m,), float64."""
        xbar = xbar.detach().to(torch.float32)
        with torch.enable_grad():
            J = torch.autograd.functional.jacobian(self._f, xbar, vectorize=True).to(torch.float64)
        with torch.no_grad():
            fx = self._f(xbar).reshape(1, *self.event_shape)
            model = self.problem.forward(fx).to(torch.float64).reshape(-1).to(self.w.device)
        return self.WA @ J, self.yw - model * self.w

    def _product(self, mu: torch.Tensor, s: float, xbar: torch.Tensor):
        """(mean, Cholesky factor of the precision) of N(mu, s^2 I) x the likelihood linearised at xbar."""
        G, rho = self._linearise(xbar)
        P = G.T @ G
        P.diagonal().add_(1.0 / s ** 2)
        L = torch.linalg.cholesky(P)
        rhs = G.T @ (rho - G @ (mu - xbar.to(torch.float64)))
        return mu + torch.cholesky_solve(rhs[:, None], L)[:, 0], L

    @torch.no_grad()
    def __call__(self, x2: torch.Tensor, eps2: torch.Tensor, policy_mean: torch.Tensor, noise: torch.Tensor):
        """Draw x_1 for each of the n states x_2 (n, ...) with the standard normals ``noise``.

        Returns (x_1 shaped like x2, log q(x_1 | x_2) (n,) float64)."""
        n = x2.shape[0]
        mu_all = self.chain.reverse_mean(x2, eps2, 2).reshape(n, -1).to(torch.float64)
        s = self.chain.reverse_std(2)
        lin = policy_mean.reshape(n, -1)
        z = noise.reshape(n, -1).to(torch.float64)
        out, log_q = torch.empty_like(mu_all), torch.empty(n, dtype=torch.float64, device=mu_all.device)
        for b in range(n):
            xbar = lin[b]
            for _ in range(self.iterations):
                m, L = self._product(mu_all[b], s, xbar)
                xbar = m
            out[b] = m + torch.linalg.solve_triangular(L.T, z[b][:, None], upper=True)[:, 0]
            # log N(x; m, P^-1) at x = m + L^-T z: -|z|^2/2 + log det(L) - d/2 log 2 pi
            log_q[b] = -0.5 * (z[b] ** 2).sum() + torch.log(torch.diagonal(L)).sum() - 0.5 * self.d * math.log(2 * math.pi)
        return out.to(x2.dtype).reshape(x2.shape), log_q
