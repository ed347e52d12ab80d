"""Twisted sequential Monte Carlo over the reverse chain: posterior samples and an unbiased evidence.

A sampler of the chain's posterior ``p(x_K..x_1 | y) ∝ p(x_K) prod_k p(x_{k-1} | x_k) r(f(x_1))`` by
importance sampling alone (draw a trajectory from the policy q, weight it by ``p r / q``) degrades
with the mismatch accumulated over all K steps: on lensing the log-weights of today's default spread
by tens of nats, so one trajectory of hundreds carries the weight. Sequential Monte Carlo instead
weights and resamples a cloud of n particles after every step, so a step's mismatch is corrected
before the next one builds on it (the twisted diffusion sampler of Wu et al. 2023, here with the
policy's closed-form steps as proposals).

The intermediate targets are ``p(x_k..) psi_k(x_k)`` with a *twist* ``psi_k``, an estimate of the
likelihood of y given the state x_k. This module's twist is the model the step mean uses
(:mod:`pipeline.rtb.step_variance`): x_0 given x_k is normal around the prior's Tweedie estimate x0hat
with variance ``c_k`` per pixel. The chain's x_0 is the final denoise f(x_1), itself the Tweedie
estimate at x_1, so the variance that remains is ``v_k = c_k - c_1`` (zero at k = 1) and y given x_k is
normal with covariance ``sigma^2 + v_k A A^T``:

    log psi_k(x_k) = -1/2 r^T (I + v_k W A A^T W)^-1 r,   r = W (y - A x0hat(x_k)),  W = diag(mask / sigma),

from :func:`~pipeline.rtb.step_variance.cg_solve` (the constant normalisers cancel in every estimate
below, so they are left out). The weight of a particle moved from x_k to x_{k-1} by the policy is

    w = p(x_{k-1} | x_k) psi_{k-1}(x_{k-1}) / (q(x_{k-1} | x_k) psi_k(x_k)),

the first weight is ``psi_K(x_K)`` (x_K from N(0, I), the chain's own start) and the last
``r(f(x_1)) / psi_1(x_1)``. Along a path these multiply to ``p r / q``, whatever the twist, so the
product over steps of the mean weight is an unbiased estimate of Z = p(y) when particles are resampled
at fixed steps (Del Moral 2004; every step by default), and the final weighted particles approximate
the posterior, exactly as n grows. The twist and the policy only decide how small the variance is.
Everything is in the chain's network units; ``log_z`` is in nats, with ``problem.log_likelihood``'s
normalisation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pipeline.diffusion.sampling import prior_eps
from pipeline.diffusion.schedule import gaussian_log_prob
from pipeline.rtb.objective import expand_obs
from pipeline.rtb.step_variance import cg_solve, gain_and_variance, prior_variance, tweedie_x0


def systematic_resample(log_w: torch.Tensor, generator=None) -> torch.Tensor:
    """Systematic resampling of each row of log-weights (G, n): the (G, n) indices of the particles kept,
    in order. A row with no finite weight keeps all its particles."""
    G, n = log_w.shape
    w = torch.softmax(log_w.double(), 1)
    w = torch.where(torch.isfinite(w).all(1, keepdim=True), w, torch.full_like(w, 1.0 / n))
    cdf = torch.cumsum(w, 1)
    cdf[:, -1] = 1.0
    pos = (torch.rand(G, 1, generator=generator, dtype=torch.float64) + torch.arange(n, dtype=torch.float64)) / n
    return torch.searchsorted(cdf, pos.to(cdf.device)).clamp(max=n - 1)


def ess_fraction(log_w: torch.Tensor) -> torch.Tensor:
    """Kish's effective sample size over n of each row of log-weights (G, n): (G,), in (0, 1]."""
    w = torch.softmax(log_w.double(), 1)
    return 1.0 / (w * w).sum(1) / log_w.shape[1]


def log_twist(problem, y, x: torch.Tensor, eps: torch.Tensor, abar, abar_1, tau2: float, mode: str,
              cg_iters: int) -> torch.Tensor:
    """``log psi(x_k)`` (module docstring) at states x (B, ...) of chain index k, float64 (B,), without
    its constant normaliser. ``eps``: the prior's eps at x; ``abar``: abar_k and ``abar_1`` the chain's last
    (floats); ``tau2``, ``mode``: the model's prior variance (:func:`~pipeline.rtb.step_variance.prior_variance`);
    ``cg_iters``: CG iterations (0: the twist is constant, i.e. plain SMC with the policy's steps).

    The chain's x_0 is f(x_1), the prior's Tweedie estimate at x_1, not a draw around it, so the variance
    in the twist is that of f(x_1) given x_k: ``c_k - c_1`` by the law of total variance (zero at k = 1,
    where the twist is then the likelihood of f(x_1) itself, up to its constant)."""
    x0hat = tweedie_x0(x, eps, abar)
    t2 = prior_variance(mode, tau2, x, eps, abar)
    c = gain_and_variance(abar, t2, x, abar_end=abar_1)[1]
    v, r = cg_solve(problem, x0hat, y, c, cg_iters)
    return -0.5 * (r.double() * v.double()).flatten(1).sum(1)


@dataclass
class SMCResult:
    """R independent runs of n particles. ``x0`` (R, n, *x_shape): the final particles f(x_1); ``log_w``
    (R, n): their final log-weights (normalise within a run); ``log_z`` (R,): each run's log Z^ (nats);
    ``ess`` (K, R): Kish's ESS / n of each step's weights before its resampling (row 0: the first, at
    x_K); ``nfe``: prior network evaluations per particle."""

    x0: torch.Tensor
    log_w: torch.Tensor
    log_z: torch.Tensor
    ess: torch.Tensor
    nfe: int

    def draw(self, m: int, generator=None) -> torch.Tensor:
        """m samples per run by systematic resampling of the final weights: (R, m, *x_shape). Samples of
        one run share ancestors, so they are correlated; draw from several runs for independent ones."""
        R, n = self.log_w.shape
        if m > n:
            raise ValueError(f"cannot draw {m} samples from {n} particles per run")
        idx = systematic_resample(self.log_w, generator)
        pick = idx[:, torch.randperm(n, generator=generator)[:m]]
        return torch.stack([self.x0[r, pick[r].to(self.x0.device)] for r in range(R)])


@torch.no_grad()
def twisted_smc(posterior, problem, y, n: int, *, runs: int = 1, cond=None, cg_iters: int | None = None,
                ess_min: float = 1.0, generator=None, dtype=torch.float32) -> SMCResult:
    """``runs`` independent twisted SMC runs of ``n`` particles over ``posterior``'s chain for the
    observation ``y`` of ``problem`` (one observation; ``cond``: its conditioning input for an amortized
    head). Proposals are the posterior's own steps (``step_params``: head, closed-form steps, guidance);
    the twist uses the posterior's prior-variance model (``step_variance_tau2``, ``step_variance_mode``)
    with ``cg_iters`` CG iterations (default the posterior's ``step_mean_cg_iters``).

    ``ess_min``: resample a run when its ESS falls below ``ess_min * n``; 1 (the default) resamples at
    every step, which keeps Z^ unbiased; a smaller value resamples less often (consistent, not unbiased)."""
    if n < 1 or runs < 1:
        raise ValueError(f"particles and runs must be >= 1, got {n}, {runs}")
    if not 0.0 <= ess_min <= 1.0:
        raise ValueError(f"ess_min must be in [0, 1], got {ess_min!r}")
    if posterior.step_variance_tau2 is None:
        raise ValueError("the twist needs the posterior's prior-variance model (rtb.policy.step_variance_tau2)")
    chain, prior, K = posterior.chain, posterior.prior, posterior.chain.K
    iters = posterior.step_mean_cg_iters if cg_iters is None else int(cg_iters)
    if iters < 0:
        raise ValueError(f"cg_iters must be >= 0, got {iters}")
    B, dev = n * runs, prior.device
    y_b = expand_obs(problem, torch.as_tensor(y), B).to(dev)
    cond_b = None if cond is None else torch.as_tensor(cond).to(dev).unsqueeze(0).expand(B, *tuple(cond.shape))

    def twist(x, eps, k):
        return log_twist(problem, y_b, x, eps, float(chain.abar[k]), float(chain.abar[1]),
                         posterior.step_variance_tau2, posterior.step_variance_mode, iters)

    x = torch.randn((B, *prior.event_shape), generator=generator, dtype=dtype).to(dev)
    eps = prior_eps(prior, chain, x, K)
    lt = twist(x, eps, K)
    log_w, log_z, ess = lt.reshape(runs, n), torch.zeros(runs, dtype=torch.float64), []
    for k in range(K, 1, -1):
        ess.append(ess_fraction(log_w))
        again = ess[-1] < ess_min - 1e-12
        if bool(again.any()):
            log_z = log_z + torch.where(again, torch.logsumexp(log_w, 1) - math.log(n), torch.zeros_like(log_z))
            keep = systematic_resample(log_w, generator)
            keep = torch.where(again[:, None], keep, torch.arange(n).expand(runs, n))
            flat = (keep + n * torch.arange(runs)[:, None]).reshape(-1).to(dev)
            x, eps, lt = x[flat], eps[flat], lt[flat]
            log_w = torch.where(again[:, None], torch.zeros_like(log_w), log_w)
        with torch.enable_grad():
            guide = posterior.guide(x, k, eps, y_b, problem)
        mean, std = posterior.step_params(x, k, eps, y_b, cond_b, guide, problem)
        x_new = (mean + std * torch.randn(x.shape, generator=generator, dtype=dtype).to(dev)).detach()
        step = (gaussian_log_prob(x_new, chain.reverse_mean(x, eps, k), chain.reverse_std(k))
                - gaussian_log_prob(x_new, mean, std)).double().cpu()
        eps = prior_eps(prior, chain, x_new, k - 1)
        lt_new = twist(x_new, eps, k - 1)
        log_w = log_w + (step + (lt_new - lt).cpu()).reshape(runs, n)
        x, lt = x_new, lt_new
    ess.append(ess_fraction(log_w))
    x0 = chain.final_denoise(x, eps)
    log_w = log_w + (problem.log_likelihood(x0, y_b).double() - lt).cpu().reshape(runs, n)
    log_z = log_z + torch.logsumexp(log_w, 1) - math.log(n)
    return SMCResult(x0=x0.reshape(runs, n, *x0.shape[1:]), log_w=log_w, log_z=log_z, ess=torch.stack(ess),
                     nfe=K)
