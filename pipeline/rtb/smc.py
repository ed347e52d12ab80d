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
with a variance per pixel. The chain's x_0 is the final denoise f(x_1), itself the Tweedie estimate at
x_1 with no noise after it, so the variance is that of f(x_1) given x_k, ``v_k`` =
:func:`~pipeline.rtb.step_variance.chain_x0_variance` (zero at k = 1), and y given x_k is normal with
covariance ``sigma^2 + v_k A A^T``:

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
from pipeline.rtb.objective import _expand, expand_obs
from pipeline.rtb.step_variance import cg_solve, chain_x0_variance, gain_and_variance, prior_variance, tweedie_x0


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


def log_twist(problem, y, x: torch.Tensor, eps: torch.Tensor, chain, k: int, tau2: float, mode: str,
              cg_iters: int) -> torch.Tensor:
    """``log psi(x_k)`` (module docstring) at states x (B, ...) of chain index k, float64 (B,), without
    its constant normaliser. ``eps``: the prior's eps at x; ``tau2``, ``mode``: the model's prior variance
    (:func:`~pipeline.rtb.step_variance.prior_variance`); ``cg_iters``: CG iterations (0: the twist is
    constant, i.e. plain SMC with the policy's steps). The variance v_k of the chain's x_0 given x_k is
    :func:`~pipeline.rtb.step_variance.chain_x0_variance` (zero at k = 1, where the twist is the likelihood
    of f(x_1) itself, up to its constant)."""
    abar = float(chain.abar[k])
    x0hat = tweedie_x0(x, eps, abar)
    t2 = prior_variance(mode, tau2, x, eps, abar)
    v, r = cg_solve(problem, x0hat, y, chain_x0_variance(chain, k, t2, x), cg_iters)
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


class PolicyProposal:
    """The posterior's own steps (``step_params``: head, closed-form steps, guidance) as proposals, with the
    twist of :func:`log_twist` by ``cg_iters`` CG iterations."""

    def __init__(self, posterior, problem, y_b, cond_b, cg_iters: int):
        self.post, self.problem, self.y, self.cond, self.iters = posterior, problem, y_b, cond_b, int(cg_iters)

    def twist(self, x, eps, k):
        return log_twist(self.problem, self.y, x, eps, self.post.chain, k, self.post.step_variance_tau2,
                         self.post.step_variance_mode, self.iters)

    def step(self, x, eps, k, generator):
        with torch.enable_grad():
            guide = self.post.guide(x, k, eps, self.y, self.problem)
        mean, std = self.post.step_params(x, k, eps, self.y, self.cond, guide, self.problem)
        x_new = (mean + std * torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)).detach()
        return x_new, gaussian_log_prob(x_new, mean, std).double()


class GaussianStepProposal:
    """Every step the exact posterior step of the linear-Gaussian model, with its full covariance.

    Under the model of :mod:`pipeline.rtb.step_variance` with the chain's own x_0 (prior variance ``tau2``
    per pixel, network units^2), the chain's x_0 given x_{k-1} is N(x0hat + g (x_{k-1} - mu), c I) with
    c = v_{k-1} (:func:`~pipeline.rtb.step_variance.chain_x0_variance`), so the data given x_{k-1} are
    N(W A (x0hat + g (x_{k-1} - mu)), I + c B B^T) in
    whitened units (B = W A, dense). Its product with the prior's step N(mu, s^2 I) is Gaussian with

        precision P = I / s^2 + g^2 B^T (I + c B B^T)^-1 B,   mean mu + s^2 g B^T (I + alpha B B^T)^-1 r,

    r = W (y - A x0hat), alpha = c + g^2 s^2. The step is drawn from it and scored exactly (Cholesky of P).
    The twist at x_k is -1/2 r^T (I + alpha_k B B^T)^-1 r with step k's alpha (0 at x_1, where it is the
    likelihood of f(x_1) up to its constant; alpha_k = v_k), so that a step the model describes exactly has
    weight 1.
    Dense linear algebra per lens and step (float64): for d source and m image pixels, Choleskys of
    (m, m) and (d, d) matrices; a prior variance per sample (``step_variance_mode`` other than
    ``prior``) would need one per particle and is not supported."""

    def __init__(self, prior, chain, problem, y_b, tau2: float):
        self.prior, self.chain, self.problem, self.y, self.tau2 = prior, chain, problem, y_b, float(tau2)
        B = y_b.shape[0]
        if hasattr(problem, "pool") and hasattr(problem, "index"):  # a per-row LensBatch
            self.index, probs = problem.index.cpu(), dict(enumerate(problem.pool.problems))
            probs = {i: probs[i] for i in torch.unique(self.index).tolist()}
        else:
            self.index, probs = torch.zeros(B, dtype=torch.long), {0: problem}
        self.B = {}
        for i, p in probs.items():
            w = (p.mask.double() / p.sigma.double()).reshape(-1, 1).cpu()
            self.B[i] = w * p.dense_matrix().cpu()           # (m, d) whitened operator, network units
        self._cache = {}

    def _model(self, k: int):
        """(g, s, c, alpha) of step k (k >= 2); alpha = 0 at k = 1."""
        if k == 1:
            return None, None, 0.0, 0.0
        like = torch.zeros((), dtype=torch.float64)
        g, _ = gain_and_variance(float(self.chain.abar[k - 1]), self.tau2, like)
        c = chain_x0_variance(self.chain, k - 1, self.tau2, like)
        s = float(self.chain.reverse_std(k))
        return float(g), s, float(c), float(c) + float(g) ** 2 * s * s

    def _factors(self, k: int, lens: int):
        key = (k, lens)
        if key not in self._cache:
            g, s, c, alpha = self._model(k)
            Bm = self.B[lens]
            eye_m = torch.eye(Bm.shape[0], dtype=torch.float64)
            BBt = Bm @ Bm.T
            f = {"LG": torch.linalg.cholesky(eye_m + alpha * BBt)}
            if k >= 2:
                X = torch.cholesky_solve(Bm, torch.linalg.cholesky(eye_m + c * BBt))
                P = torch.eye(Bm.shape[1], dtype=torch.float64) / (s * s) + g * g * (Bm.T @ X)
                f["LP"] = torch.linalg.cholesky(0.5 * (P + P.T))
            self._cache[key] = f
        return self._cache[key]

    def _solve(self, x, eps, k):
        """Per row: r (m,) and (I + alpha_k B B^T)^-1 r, float64 on the CPU."""
        x0hat = tweedie_x0(x, eps, float(self.chain.abar[k]))
        r = self.problem.whitened_residual(x0hat, self.y).double().reshape(x.shape[0], -1).cpu()
        v = torch.empty_like(r)
        for i in self.B:
            rows = self.index == i
            v[rows] = torch.cholesky_solve(r[rows].T, self._factors(k, i)["LG"]).T
        return r, v

    def twist(self, x, eps, k):
        r, v = self._solve(x, eps, k)
        return (-0.5 * (r * v).sum(1)).to(x.device)

    def step(self, x, eps, k, generator):
        g, s, _, _ = self._model(k)
        _, v = self._solve(x, eps, k)
        mean = self.chain.reverse_mean(x, eps, k).double().reshape(x.shape[0], -1).cpu()
        z = torch.randn(mean.shape, generator=generator, dtype=torch.float64)
        x_new, log_q = torch.empty_like(mean), torch.empty(x.shape[0], dtype=torch.float64)
        d = mean.shape[1]
        for i, Bm in self.B.items():
            rows, LP = self.index == i, self._factors(k, i)["LP"]
            m_i = mean[rows] + s * s * g * (v[rows] @ Bm)
            x_i = (m_i + torch.linalg.solve_triangular(LP.T, z[rows].T, upper=True).T).to(x.dtype).double()
            zz = (x_i - m_i) @ LP                          # the drawn point's own standardised offset
            x_new[rows] = x_i
            log_q[rows] = (-0.5 * (zz * zz).sum(1) + torch.log(torch.diagonal(LP)).sum()
                           - 0.5 * d * math.log(2 * math.pi))
        return x_new.to(x.dtype).reshape(x.shape).to(x.device), log_q.to(x.device)


PROPOSALS = ("policy", "gaussian")


def _check_one_observation_per_run(problem, y_b, runs: int, n: int) -> None:
    """Resampling permutes particles within a run: every row of a run must hold the same data and lens."""
    y = y_b.reshape(runs, n, -1)
    if not bool((y == y[:, :1]).all()):
        raise ValueError("twisted_smc: the rows of one run hold different data; give each run of n rows one y")
    index = getattr(problem, "index", None)
    if index is not None and not bool((index.reshape(runs, n) == index.reshape(runs, n)[:, :1]).all()):
        raise ValueError("twisted_smc: the rows of one run use different lenses; give each run of n rows one lens")


@torch.no_grad()
def twisted_smc(posterior, problem, y, n: int, *, runs: int = 1, cond=None, cg_iters: int | None = None,
                ess_min: float = 1.0, proposal: str = "policy", generator=None, dtype=torch.float32) -> SMCResult:
    """``runs`` independent twisted SMC runs of ``n`` particles over ``posterior``'s chain for the
    observation ``y`` of ``problem`` (one observation, or, with a per-row problem and y (runs n, ...), one
    observation and lens per run of n consecutive rows; ``cond``: the conditioning input of an amortized
    head). ``proposal``: ``policy`` (:class:`PolicyProposal`:
    the posterior's own steps, the twist by ``cg_iters`` CG iterations, default the posterior's
    ``step_mean_cg_iters``) or ``gaussian`` (:class:`GaussianStepProposal`: the full-covariance Gaussian
    step of the posterior's prior-variance model, dense; needs ``step_variance_mode: prior``).

    ``ess_min``: resample a run when its ESS falls below ``ess_min * n``; 1 (the default) resamples at
    every step, which keeps Z^ unbiased; a smaller value resamples less often (consistent, not unbiased)."""
    if n < 1 or runs < 1:
        raise ValueError(f"particles and runs must be >= 1, got {n}, {runs}")
    if not 0.0 <= ess_min <= 1.0:
        raise ValueError(f"ess_min must be in [0, 1], got {ess_min!r}")
    if proposal not in PROPOSALS:
        raise ValueError(f"proposal must be one of {PROPOSALS}, got {proposal!r}")
    if posterior.step_variance_tau2 is None:
        raise ValueError("the twist needs the posterior's prior-variance model (rtb.policy.step_variance_tau2)")
    chain, prior, K = posterior.chain, posterior.prior, posterior.chain.K
    iters = posterior.step_mean_cg_iters if cg_iters is None else int(cg_iters)
    if iters < 0:
        raise ValueError(f"cg_iters must be >= 0, got {iters}")
    B, dev = n * runs, prior.device
    y_b = expand_obs(problem, torch.as_tensor(y), B).to(dev)
    _check_one_observation_per_run(problem, y_b, runs, n)
    if proposal == "gaussian":
        if posterior.step_variance_mode != "prior":
            raise ValueError("the Gaussian step proposal needs one prior variance for every pixel and sample "
                             f"(step_variance_mode 'prior', got {posterior.step_variance_mode!r})")
        prop = GaussianStepProposal(prior, chain, problem, y_b, posterior.step_variance_tau2)
    else:
        cond_b = None if cond is None else _expand(torch.as_tensor(cond).to(dev), B, posterior.cond_shape)
        prop = PolicyProposal(posterior, problem, y_b, cond_b, iters)

    x = torch.randn((B, *prior.event_shape), generator=generator, dtype=dtype).to(dev)
    eps = prior_eps(prior, chain, x, K)
    lt = prop.twist(x, eps, K)
    log_w, log_z, ess = lt.cpu().reshape(runs, n), torch.zeros(runs, dtype=torch.float64), []
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
        x_new, log_q = prop.step(x, eps, k, generator)
        step = (gaussian_log_prob(x_new, chain.reverse_mean(x, eps, k), chain.reverse_std(k)).double()
                - log_q).cpu()
        eps = prior_eps(prior, chain, x_new, k - 1)
        lt_new = prop.twist(x_new, eps, k - 1)
        log_w = log_w + (step + (lt_new - lt).cpu()).reshape(runs, n)
        x, lt = x_new, lt_new
    ess.append(ess_fraction(log_w))
    x0 = chain.final_denoise(x, eps)
    log_w = log_w + (problem.log_likelihood(x0, y_b).double() - lt).cpu().reshape(runs, n)
    log_z = log_z + torch.logsumexp(log_w, 1) - math.log(n)
    return SMCResult(x0=x0.reshape(runs, n, *x0.shape[1:]), log_w=log_w, log_z=log_z, ess=torch.stack(ess),
                     nfe=K)
