"""Exact guidance for Gaussian and Gaussian-mixture priors with a linear-Gaussian likelihood.

For a mixture prior ``p(x0) = sum_j w_j N(m_j, S_j)`` and the VP state ``x_t = sqrt(ab) x0 + sqrt(1-ab) e``,
component j has Tweedie moments

    Cov_j[x0 | x_t] = P_j = (S_j^{-1} + c I)^{-1},  c = ab / (1 - ab)
    E_j[x0 | x_t]   = P_j (S_j^{-1} m_j + sqrt(ab)/(1-ab) x_t)  (affine in x_t)

so ``p_j(y | x_t) = N(y; A E_j[x0|x_t], Sigma_y + A P_j A^T)`` exactly, and
``p_t(y | x_t) = sum_j pi_j(x_t) p_j(y | x_t)`` with the prior responsibilities ``pi_j(x_t)``. Its score

    g = sum_j rho_j (grad log p_j(x_t) + grad log p_j(y|x_t)) - sum_j pi_j grad log p_j(x_t),
    rho_j ∝ w_j p_j(x_t) p_j(y | x_t),

enters with scale 1: ``eps~ = eps - sqrt(1-ab) g``. With the prior's exact eps this is the exact eps of the
noised posterior ``p_t(x_t | y)``, the yardstick of the guidance machinery and the proposal
for the high-dimensional importance-sampling references. The *chain* it drives is not the
chain posterior (it differs by the discretisation), so references judge it against its own propagated law.

All algebra in float64; per-step matrices are computed once per chain index (shared by the batch).
"""

from __future__ import annotations

import math

import torch

from pipeline.diffusion.prior import GaussianMixturePrior
from pipeline.errors import PipelineError
from pipeline.samplers.base import Sampler, Samples
from pipeline.samplers.common import guided_samples, resolve_device
from pipeline.samplers.guidance import _flat, forward_offset, require_linear, score_to_mean_shift

LOG_2PI = math.log(2 * math.pi)


def _dense_masked(problem):
    """(A_m (m, d), sigma_m (m,), mask flat, offset b (all pixels)) on the unmasked pixels, float64 CPU.

    ``forward(x) = A x + b``; the Gaussian algebra uses y - b."""
    A = problem.dense_matrix().double().cpu()
    mask = problem.mask.reshape(-1).cpu()
    return A[mask], problem.sigma.reshape(-1).double().cpu()[mask], mask, forward_offset(problem)


class ExactGuidance:
    """Closed-form ``grad_{x_t} log p_t(y | x_t)`` for a :class:`GaussianMixturePrior` and a linear problem."""

    def __init__(self, prior: GaussianMixturePrior, chain, problem):
        if not isinstance(prior, GaussianMixturePrior):
            raise PipelineError(f"exact guidance needs an analytic Gaussian(-mixture) prior, got "
                                f"{type(prior).__name__} - use dps, cla or rtb for network priors")
        require_linear(problem, "exact_guidance")
        self.prior, self.chain, self.problem = prior, chain, problem
        self.A, self.sig, self.mask, offset = _dense_masked(problem)
        self.offset_m = offset[self.mask]
        covs = prior.covs
        # diagonal covariances (the benchmarks' unit-covariance mixtures): eigenbasis = identity, O(B J d) per step
        self.diagonal = bool((covs - torch.diag_embed(torch.diagonal(covs, dim1=-2, dim2=-1))).abs().max() == 0)
        if self.diagonal:
            lam = torch.diagonal(covs, dim1=-2, dim2=-1).clone()
            Q = torch.eye(covs.shape[-1], dtype=torch.float64).expand_as(covs)
        else:
            lam, Q = torch.linalg.eigh(covs)  # (J, d), (J, d, d)
        if (lam <= 0).any():
            raise PipelineError("exact guidance needs positive-definite component covariances")
        self.lam, self.Q = lam, Q
        self.logw = torch.log(prior.weights)
        self._cache: dict[int, dict] = {}

    def _step(self, k: int) -> dict:
        """Per-index matrices (shared by all samples)."""
        if k in self._cache:
            return self._cache[k]
        ab = float(self.chain.abar[k])
        lam, Q, m = self.lam, self.Q, self.prior.means
        c = ab / (1.0 - ab)
        Qt = Q.transpose(-1, -2)
        P = (Q * (lam / (1 + c * lam))[:, None, :]) @ Qt                     # Cov[x0|x_t, j]
        a0 = ((Q * (1.0 / (1 + c * lam))[:, None, :]) @ Qt @ m[..., None])[..., 0]  # E[x0|x_t=0, j]
        J = (math.sqrt(ab) / (1.0 - ab)) * P                                   # d E / d x_t (symmetric)
        A = self.A
        G = A @ J                                                              # (J, m, d)
        Mcov = torch.diag(self.sig ** 2) + A @ P @ A.T                         # (J, m, m)
        Lm = torch.linalg.cholesky(Mcov)
        lcn = ab * lam + (1.0 - ab)                                            # noised component eigenvalues
        st = {"Aa0": a0 @ A.T, "G": G, "Lm": Lm,
              "logdetM": 2 * torch.log(torch.diagonal(Lm, dim1=-2, dim2=-1)).sum(-1),
              "Q": Q, "lcn": lcn, "mu": math.sqrt(ab) * m, "logdetC": torch.log(lcn).sum(-1)}
        self._cache[k] = st
        return st

    def parts(self, x: torch.Tensor, y: torch.Tensor, k: int):
        """Per-component prior log-densities (B,J), prior scores (B,J,d), log p_j(y|x_t) (B,J) and
        their gradients (B,J,d), all float64."""
        st = self._step(k)
        x64 = _flat(x).double().cpu()
        B, d = x64.shape
        y64 = torch.as_tensor(y).double().cpu().reshape(-1, self.mask.numel())[:, self.mask] - self.offset_m
        if y64.shape[0] == 1 and B > 1:
            y64 = y64.expand(B, -1)
        # prior component terms in each component's eigenbasis
        diff = x64[:, None, :] - st["mu"][None]                                 # (B,J,d)
        if self.diagonal:
            z = diff
            sol = diff / st["lcn"][None]
        else:
            z = torch.einsum("jdi,bjd->bji", st["Q"], diff)                     # Q^T diff
            sol = torch.einsum("jdi,bji->bjd", st["Q"], z / st["lcn"][None])   # C^{-1} diff
        logp = -0.5 * (z * z / st["lcn"][None]).sum(-1) - 0.5 * st["logdetC"][None] - 0.5 * d * LOG_2PI
        score = -sol
        # likelihood terms
        res = y64[:, None, :] - st["Aa0"][None] - torch.einsum("jmd,bd->bjm", st["G"], x64)  # (B,J,m)
        Lm = st["Lm"][None].expand(B, -1, -1, -1)
        v = torch.cholesky_solve(res.unsqueeze(-1), Lm).squeeze(-1)             # M^{-1} res
        m_dim = res.shape[-1]
        logy = -0.5 * (res * v).sum(-1) - 0.5 * st["logdetM"][None] - 0.5 * m_dim * LOG_2PI
        gy = torch.einsum("jmd,bjm->bjd", st["G"], v)                           # G^T M^{-1} res
        return logp, score, logy, gy

    def _score_and_log_h_diagonal(self, x: torch.Tensor, y: torch.Tensor, k: int):
        """The diagonal-covariance case by matrix products only: no (B, J, d) tensor (80-D mixtures)."""
        st = self._step(k)
        if "Minv" not in st:
            eye = torch.eye(st["Lm"].shape[-1], dtype=torch.float64)
            st["Minv"] = torch.cholesky_solve(eye.expand_as(st["Lm"]), st["Lm"])
            st["inv_l"] = 1.0 / st["lcn"]                                          # (J, d)
            st["mu_l"] = st["mu"] * st["inv_l"]                                   # (J, d)
            st["mu2_l"] = (st["mu"] * st["mu_l"]).sum(-1)                          # (J,)
            st["G2"] = st["G"].reshape(-1, st["G"].shape[-1])                     # (J m, d)
        x64 = _flat(x).double().cpu()
        B, d = x64.shape
        y64 = torch.as_tensor(y).double().cpu().reshape(-1, self.mask.numel())[:, self.mask] - self.offset_m
        if y64.shape[0] == 1 and B > 1:
            y64 = y64.expand(B, -1)
        quad = (x64 * x64) @ st["inv_l"].T - 2.0 * x64 @ st["mu_l"].T + st["mu2_l"][None]   # (B, J)
        logp = -0.5 * quad - 0.5 * st["logdetC"][None] - 0.5 * d * LOG_2PI
        J, m_dim = st["Aa0"].shape
        res = y64[:, None, :] - st["Aa0"][None] - (x64 @ st["G2"].T).reshape(B, J, m_dim)
        v = torch.einsum("jmn,bjn->bjm", st["Minv"], res)
        logy = -0.5 * (res * v).sum(-1) - 0.5 * st["logdetM"][None] - 0.5 * m_dim * LOG_2PI
        lw = self.logw[None] + logp
        pi = torch.softmax(lw, 1)
        rho = torch.softmax(lw + logy, 1)
        c = rho - pi
        # sum_j c_j score_j with score_j = -(x - mu_j) / l_j, plus sum_j rho_j G_j^T v_j
        g = -x64 * (c @ st["inv_l"]) + c @ st["mu_l"] + (rho[..., None] * v).reshape(B, -1) @ st["G2"]
        log_h = torch.logsumexp(lw + logy, 1) - torch.logsumexp(lw, 1)
        return g.reshape(x.shape).to(dtype=x.dtype, device=x.device), log_h

    def score_and_log_likelihood_t(self, x: torch.Tensor, y: torch.Tensor, k: int):
        """(grad_{x_t} log p_t(y | x_t) shaped like x, log p_t(y | x_t) (B,) float64) from one pass."""
        if self.diagonal:
            return self._score_and_log_h_diagonal(x, y, k)
        logp, score, logy, gy = self.parts(x, y, k)
        lw = self.logw[None] + logp
        pi = torch.softmax(lw, 1)
        rho = torch.softmax(lw + logy, 1)
        g = (rho[..., None] * (score + gy)).sum(1) - (pi[..., None] * score).sum(1)
        log_h = torch.logsumexp(lw + logy, 1) - torch.logsumexp(lw, 1)
        return g.reshape(x.shape).to(dtype=x.dtype, device=x.device), log_h

    def score(self, x: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
        """grad_{x_t} log p_t(y | x_t) at chain index k, shape and dtype of x (device of x)."""
        return self.score_and_log_likelihood_t(x, y, k)[0]

    def log_likelihood_t(self, x: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
        """log p_t(y | x_t) (B,) float64: the exact noised likelihood (a mixture over components)."""
        return self.score_and_log_likelihood_t(x, y, k)[1]


def analytic_posterior(prior: GaussianMixturePrior, problem, y) -> tuple[GaussianMixturePrior, float]:
    """The analytic-prior posterior (a Gaussian mixture) and log Z = log sum_j w_j N(y; A m_j, A S_j A^T + Sigma).

    For one observation ``y`` (shape y_shape). Component updates are Kalman updates; the result shares the
    prior's schedule so its ``eps`` is the exact noised posterior eps.
    """
    require_linear(problem, "analytic posterior")
    A, sig, mask, offset = _dense_masked(problem)
    yv = (torch.as_tensor(y).double().cpu().reshape(-1) - offset)[mask]
    Sy = torch.diag(sig ** 2)
    S, m = prior.covs, prior.means
    SAt = S @ A.T                                                # (J, d, m)
    Ccov = A @ SAt + Sy                                          # (J, m, m)
    L = torch.linalg.cholesky(Ccov)
    r = yv[None] - m @ A.T                                       # (J, m)
    Kt = torch.cholesky_solve(SAt.transpose(-1, -2), L)          # C^{-1} A S  (J, m, d)
    post_m = m + (Kt.transpose(-1, -2) @ r[..., None])[..., 0]
    post_S = S - SAt @ Kt
    post_S = 0.5 * (post_S + post_S.transpose(-1, -2))
    alpha = torch.cholesky_solve(r[..., None], L)[..., 0]
    logn = (-0.5 * (r * alpha).sum(-1) - torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)
            - 0.5 * yv.shape[0] * LOG_2PI)
    lw = torch.log(prior.weights) + logn
    log_z = torch.logsumexp(lw, 0)
    post = GaussianMixturePrior(torch.softmax(lw, 0), post_m, post_S, prior.schedule)
    return post, float(log_z)


class ExactGuidanceSampler(Sampler):
    """Guided chain with the exact noised likelihood score (scale 1, no tuning)."""

    name = "exact_guidance"

    def __init__(self, prior, chain, *, device=None, batch_size: int = 4096, cond=None):
        self.prior, self.chain = prior, chain
        self.device, self.batch_size, self.cond = device, batch_size, cond
        self._guides: dict[int, ExactGuidance] = {}

    def guidance(self, problem) -> ExactGuidance:
        key = id(problem)
        if key not in self._guides:
            self._guides = {key: ExactGuidance(self.prior, self.chain, problem)}
        return self._guides[key]

    def mean_fn_for(self, problem, y_batch):
        guide, chain = self.guidance(problem), self.chain

        def mean_fn(x, k, eps_p):
            return chain.reverse_mean(x, eps_p, k) + score_to_mean_shift(chain, k, guide.score(x, y_batch, k))
        return mean_fn

    def sample(self, problem, y, n, *, generator=None) -> Samples:
        device = resolve_device(self.prior, self.device)
        self.guidance(problem)
        return guided_samples(self.prior, self.chain, problem, y, n, lambda yb: (self.mean_fn_for(problem, yb), None),
                              generator=generator, device=device, batch_size=self.batch_size, cond=self.cond,
                              nfe=self.chain.K, info={"method": self.name, "scale": 1.0, "K": self.chain.K})
