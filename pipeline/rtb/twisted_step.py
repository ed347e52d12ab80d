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
    def __call__(self, x2: torch.Tensor, eps2: torch.Tensor, policy_mean: torch.Tensor, noise: torch.Tensor,
                 policy_std=None):
        """Draw x_1 for each of the n states x_2 (n, ...) with the standard normals ``noise`` (the policy's
        own step, ``policy_mean`` and ``policy_std``, only seeds the linearisation).

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


class SharedGaussNewtonLastStep(GaussNewtonLastStep):
    """The twisted last step with ONE linearisation per observation, shared by all its samples.

    The per-sample step above pays a d x d Jacobian for every sample. Here f is linearised once per
    Gauss-Newton iteration at the mean over the batch (first the policy's step means, then the previous
    iteration's means), and every sample takes the exact Gaussian product of its own prior step
    N(mu_i, s^2 I) with that one linear-Gaussian likelihood. Log q stays exact for what is sampled; only
    how close the step is to optimal depends on one linearisation serving every sample.

    ``rank``: None uses the dense Jacobian (d vector-Jacobian products per iteration). An integer k keeps
    the likelihood's action on a k-dimensional subspace Q of the source: a randomized range finder with
    one power step on G^T G (k Jacobian-vector and k vector-Jacobian products, vectorised) gives Q, and
    H = G Q (k more Jacobian-vector products). The likelihood exp(-|rho - H Q^T (x - xbar)|^2 / 2) is
    then exactly linear-Gaussian, so the step is an exact Gaussian: in Q's coordinates precision
    I/s^2 + H^T H; outside Q (``outside``) the prior's step N(mu, s^2 I) projected there (``"prior"``), or
    the policy's own step N(policy mean, diag policy std^2) projected there (``"policy"``: the network's
    learned step is kept where the likelihood is not used; the complement's covariance is then factored
    per sample).
    """

    def __init__(self, prior, chain, problem, y, *, iterations: int = 2, rank: int | None = None, seed: int = 0,
                 outside: str = "prior"):
        super().__init__(prior, chain, problem, y, iterations=iterations)
        if rank is not None and not 1 <= int(rank) < self.d:
            raise ValueError(f"rank must be in [1, {self.d - 1}] or None, got {rank}")
        if outside not in ("prior", "policy") or (outside == "policy" and rank is None):
            raise ValueError(f"outside must be 'prior' or, with a rank, 'policy'; got {outside!r}")
        self.rank, self.seed, self.outside = (None if rank is None else int(rank)), seed, outside

    def _jvp(self, xbar: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
        """J_f(xbar) V for V (d, k) -> (d, k), float64."""
        x32 = xbar.detach().to(torch.float32)
        cols = torch.func.vmap(lambda v: torch.func.jvp(self._f, (x32,), (v,))[1])(V.T.to(torch.float32))
        return cols.T.to(torch.float64)

    def _vjp(self, xbar: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
        """J_f(xbar)^T U for U (d, k) -> (d, k), float64."""
        _, pullback = torch.func.vjp(self._f, xbar.detach().to(torch.float32))
        rows = torch.func.vmap(lambda u: pullback(u)[0])(U.T.to(torch.float32))
        return rows.T.to(torch.float64)

    def _subspace(self, xbar: torch.Tensor):
        """(Q (d, k), H = W A J Q (m, k), rho (m,)) at xbar."""
        gen = torch.Generator().manual_seed(self.seed)
        omega = torch.randn(self.d, self.rank, generator=gen, dtype=torch.float64).to(xbar.device)
        G_omega = self.WA @ self._jvp(xbar, omega)                              # (m, k)
        Q, _ = torch.linalg.qr(self._vjp(xbar, self.WA.T @ G_omega))            # range of G^T G omega
        H = self.WA @ self._jvp(xbar, Q)
        with torch.no_grad():
            fx = self._f(xbar.detach().to(torch.float32)).reshape(1, *self.event_shape)
            model = self.problem.forward(fx).to(torch.float64).reshape(-1).to(self.w.device)
        return Q, H, self.yw - model * self.w

    def _means(self, mu: torch.Tensor, s: float, xbar: torch.Tensor, pi=None):
        """Per-sample means (n, d) and what sampling needs, for the likelihood linearised at xbar; ``pi``:
        the policy's step means (n, d), used outside the subspace when ``outside="policy"``."""
        if self.rank is None:
            G, rho = self._linearise(xbar)
            P = G.T @ G
            P.diagonal().add_(1.0 / s ** 2)
            L = torch.linalg.cholesky(P)
            rhs = (rho[None] - (mu - xbar) @ G.T) @ G                            # (n, d)
            return mu + torch.cholesky_solve(rhs.T, L).T, (None, L)
        Q, H, rho = self._subspace(xbar)
        Pk = H.T @ H
        Pk.diagonal().add_(1.0 / s ** 2)
        L = torch.linalg.cholesky(Pk)
        rhs = (rho[None] - (mu - xbar) @ Q @ H.T) @ H                            # (n, k)
        base = mu if pi is None else mu @ Q @ Q.T + pi - pi @ Q @ Q.T          # outside Q: mu's or pi's part
        return base + torch.cholesky_solve(rhs.T, L).T @ Q.T, (Q, L)

    @torch.no_grad()
    def __call__(self, x2: torch.Tensor, eps2: torch.Tensor, policy_mean: torch.Tensor, noise: torch.Tensor,
                 policy_std=None):
        n = x2.shape[0]
        mu = self.chain.reverse_mean(x2, eps2, 2).reshape(n, -1).to(torch.float64)
        s = self.chain.reverse_std(2)
        pi = policy_mean.reshape(n, -1).to(torch.float64)
        xbar = pi.mean(0)
        keep_policy = self.outside == "policy"
        for _ in range(self.iterations):
            m, (Q, L) = self._means(mu, s, xbar, pi if keep_policy else None)
            xbar = m.mean(0)
        z = noise.reshape(n, -1).to(torch.float64)
        const = -0.5 * self.d * math.log(2 * math.pi) - 0.5 * (z * z).sum(1)
        if Q is None:  # x = m + L^-T z under N(m, P^-1)
            x = m + torch.linalg.solve_triangular(L.T, z.T, upper=True).T
            return x.to(x2.dtype).reshape(x2.shape), const + torch.log(torch.diagonal(L)).sum()
        k = Q.shape[1]
        zq = z @ Q
        x = m + torch.linalg.solve_triangular(L.T, zq.T, upper=True).T @ Q.T    # in Q: m + L^-T z_Q
        log_q = const + torch.log(torch.diagonal(L)).sum()
        if not keep_policy:  # outside Q: the prior step's noise s z_perp
            return (x + s * (z - zq @ Q.T)).to(x2.dtype).reshape(x2.shape), log_q - (self.d - k) * math.log(s)
        # outside Q: N(pi, diag(sd^2)) projected on the complement C, covariance C^T diag(sd^2) C per sample
        C = torch.linalg.qr(Q, mode="complete")[0][:, k:]                        # (d, d - k)
        sd = torch.as_tensor(policy_std, dtype=torch.float64, device=m.device).expand(policy_mean.shape).reshape(n, -1)
        zc = z @ C
        for i in range(n):
            Lc = torch.linalg.cholesky(C.T @ (sd[i, :, None] ** 2 * C))
            x[i] += C @ (Lc @ zc[i])
            log_q[i] -= torch.log(torch.diagonal(Lc)).sum()
        return x.to(x2.dtype).reshape(x2.shape), log_q
