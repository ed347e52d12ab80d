"""Per-observation posteriors of the lens parameters by tempered sequential Monte Carlo.

Lens posteriors at useful signal-to-noise are narrow, strongly correlated and, tempered, far from normal
(the axis ratio trades off against the shear, the angle against the shear's direction, and at low
temperature whole ranges of the angle fit about as well): a normal refitted by importance sampling stalls
there. Tempered SMC (Del Moral, Doucet & Jasra 2006) follows the path p(theta) p(y | theta)^beta from the
prior (beta = 0) to the posterior (beta = 1) with a cloud of particles that can take any shape: each
stage raises beta as far as keeps the effective sample size of the incremental weights at ``min_ess`` n
(bisection), resamples, and moves every particle by random-walk Metropolis steps that leave the tempered
posterior invariant. It runs in the unconstrained coordinates u of
:class:`~pipeline.lensing.lens_head_mvn.CorrelatedLensHead` (theta = T(u)), where the tempered density is
p(T(u)) |det dT/du| p(y | T(u))^beta and random-walk steps never leave the support; the walk's
covariance is the particles' own, times 2.38^2 / p, its scale adapted to the acceptance rate.

The product is the particle cloud at beta = 1 (equally weighted draws from the posterior, up to the
finite number of moves) and the evidence estimate log Z = sum over stages of log mean(incremental
weights): unbiased in Z for a fixed schedule and walk, consistent (with a small bias) when, as here, both
are chosen from the particles. :func:`smc_start` turns the cloud into head outputs for
:func:`~pipeline.lensing.lens_head.refine`.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

from pipeline.lensing.lens_head_mvn import CorrelatedLensHead, raw_from_gaussian, weighted_moments
from pipeline.rtb.smc import systematic_resample

log = logging.getLogger(__name__)


def _ess(log_w: torch.Tensor) -> torch.Tensor:
    """Kish effective sample size of each row of log weights (G, n), 1 / sum w^2 with w normalised, (G,); 0
    where no weight is finite."""
    w = torch.softmax(log_w, 1)
    return torch.nan_to_num(1.0 / (w * w).sum(1), nan=0.0, posinf=0.0)


def _next_beta(beta: torch.Tensor, log_l: torch.Tensor, target: float) -> torch.Tensor:
    """Per row, the largest beta' in [beta, 1] whose incremental weights (beta' - beta) log_l keep Kish's
    ESS >= target (bisection; 1 where even beta' = 1 does); rows already at 1 stay there."""
    lo, hi = beta.clone(), torch.ones_like(beta)
    done = _ess((hi - beta)[:, None] * log_l) >= target
    for _ in range(50):
        mid = (lo + hi) / 2
        good = _ess((mid - beta)[:, None] * log_l) >= target
        lo, hi = torch.where(good, mid, lo), torch.where(good, hi, mid)
    # at least a small step, so that a stage always makes progress (the resampling then absorbs the loss)
    step = torch.maximum(lo, torch.minimum(beta + 1e-12, torch.ones_like(beta)))
    return torch.where(done, torch.ones_like(beta), step)


def tempered_smc(head: CorrelatedLensHead, log_likelihood, G: int, *, n: int = 256, moves: int = 5,
                 final_moves: int = 0, min_ess: float = 0.5, max_stages: int = 500, seed: int = 0) -> dict:
    """Tempered SMC for the lens parameters of G observations at once (the module docstring).

    ``head`` supplies the prior (``head.prior``) and the map T between theta and u; its network is not used.
    ``log_likelihood(theta (N, dim), rows (N,) int64) -> (N,)``: log p(y_row | theta) in nats, a constant per
    observation allowed; NaN and +inf count as -inf. ``moves`` random-walk steps per stage, and ``final_moves``
    more at the stage that reaches beta = 1 (resampling leaves duplicates, which a few moves do not
    decorrelate: the cloud's spread and mean then vary from run to run more than draws would); ``max_stages`` bounds
    the stages. A row whose particles all have likelihood -inf is given up (``failed``, log Z = -inf); a row
    that has not reached beta = 1 after ``max_stages`` keeps its beta and a warning is logged. Where resampling
    left fewer effective particles than p + 2, the walk keeps the previous stage's covariance rather than
    the collapsed cloud's (``collapsed`` counts those stages).

    Returns a dict: ``theta`` (G, n, dim) particles at the final beta, ``beta`` (G,), ``log_z`` (G,) nats (up to
    ``log_likelihood``'s constant; -inf where failed), ``failed`` (G,) bool, ``collapsed`` (G,) int, ``stages``
    (int, the most any row took), ``acceptance`` (G,) mean acceptance rate of each row's last stage's moves,
    ``evaluations`` (G,) int64 likelihood evaluations per observation. A row that has reached beta = 1 and
    made that stage's moves is finished: it is not moved or evaluated again while other rows go on."""
    if n < 4 or moves < 1 or final_moves < 0 or not 0 < min_ess < 1 or max_stages < 1:
        raise ValueError(f"tempered_smc needs n >= 4, moves >= 1, final_moves >= 0, 0 < min_ess < 1 and "
                         f"max_stages >= 1, got {n}, {moves}, {final_moves}, {min_ess}, {max_stages}")
    gen = torch.Generator().manual_seed(seed)
    prior, p = head.prior, head.p

    def evaluate(u, sel):   # (S, n, p) for rows sel (S,) -> log p(T(u)) + log|det dT/du|, log p(y | T(u)), theta
        theta = head._from_u(u.reshape(-1, p))
        log_jac = head._to_u(theta)[1]
        with torch.no_grad():
            ll = log_likelihood(theta, sel.repeat_interleave(n)).double()
        ll = torch.where(torch.isnan(ll) | (ll == math.inf), torch.full_like(ll, -math.inf), ll)
        S = len(sel)
        return ((prior.log_prob(theta) + log_jac).view(S, n), ll.view(S, n), theta.view(S, n, -1))

    theta0 = prior.sample(G * n, np.random.default_rng(seed))
    u = head._to_u(theta0)[0].view(G, n, p)
    base, ll, theta = evaluate(u, torch.arange(G))
    beta = torch.zeros(G, dtype=torch.float64)
    log_z = torch.zeros(G, dtype=torch.float64)
    scale = torch.full((G,), 2.38 / math.sqrt(p), dtype=torch.float64)
    failed = ~torch.isfinite(ll).any(1)
    collapsed = torch.zeros(G, dtype=torch.long)
    L = None
    evaluations, stages, acc = torch.full((G,), n, dtype=torch.long), 0, torch.zeros(G, dtype=torch.float64)
    for _ in range(max_stages):
        # rows at beta = 1 are finished: their particles no longer change and cost no evaluations
        sel = torch.nonzero((beta < 1) & ~failed).flatten()
        if len(sel) == 0:
            break
        new = _next_beta(beta[sel], ll[sel], min_ess * n)
        inc = (new - beta[sel])[:, None] * ll[sel]
        inc = torch.where((new > beta[sel])[:, None], inc, torch.zeros_like(inc))
        log_z[sel] = log_z[sel] + torch.logsumexp(inc, 1) - math.log(n)
        beta[sel] = new
        ess_inc = _ess(inc)
        idx = systematic_resample(inc, gen)
        u_s, theta_s = (torch.gather(v[sel], 1, idx[..., None].expand_as(v[sel])) for v in (u, theta))
        base_s, ll_s = torch.gather(base[sel], 1, idx), torch.gather(ll[sel], 1, idx)
        stages += 1
        _, cov = weighted_moments(head, theta_s, torch.full((len(sel), n), 1.0 / n, dtype=torch.float64))
        jitter = 1e-12 * (1 + torch.diagonal(cov, dim1=-2, dim2=-1).mean(-1))[:, None, None]
        L_new = torch.linalg.cholesky_ex(cov + jitter * torch.eye(p, dtype=torch.float64))[0]
        few = ess_inc < p + 2
        collapsed[sel] += few.long()
        L_s = L_new if L is None else torch.where(few[:, None, None], L[sel], L_new)
        L = L_new.new_zeros(G, p, p) if L is None else L
        L[sel] = L_s
        budget = moves + final_moves * (beta[sel] >= 1).long()     # moves per row at this stage
        acc_s = torch.zeros(len(sel), dtype=torch.float64)
        for i in range(int(budget.max())):
            go = budget > i                                           # rows still moving at this step
            z = torch.randn(len(sel), n, p, generator=gen, dtype=torch.float64)
            u_new = u_s + scale[sel][:, None, None] * torch.einsum("gij,gnj->gni", L_s, z)
            base_new, ll_new, theta_new = (torch.full_like(base_s, -math.inf), torch.full_like(ll_s, -math.inf),
                                           theta_s.clone())
            base_new[go], ll_new[go], theta_new[go] = evaluate(u_new[go], sel[go])
            evaluations[sel[go]] += n
            b = beta[sel][:, None]
            log_a = (base_new + b * ll_new) - (base_s + b * ll_s)
            take = torch.log(torch.rand(len(sel), n, generator=gen, dtype=torch.float64)) < torch.nan_to_num(log_a, nan=-math.inf)
            take &= go[:, None]
            u_s = torch.where(take[..., None], u_new, u_s)
            base_s, ll_s = torch.where(take, base_new, base_s), torch.where(take, ll_new, ll_s)
            theta_s = torch.where(take[..., None], theta_new, theta_s)
            acc_s = acc_s + take.double().mean(1) / budget
        u[sel], theta[sel], base[sel], ll[sel], acc[sel] = u_s, theta_s, base_s, ll_s, acc_s
        scale[sel] = scale[sel] * torch.exp(acc_s - 0.3)             # towards about 30 % acceptance
        log.info("tempered SMC stage %d: %d of %d observations moving, beta median %.3g (min %.3g), acceptance "
                 "median %.2f", stages, len(sel), G, float(beta.median()), float(beta.min()), float(acc_s.median()))
    log_z = torch.where(failed, torch.full_like(log_z, -math.inf), log_z)
    if bool((failed | (beta < 1)).any()):
        log.warning("tempered SMC: %d observation(s) with no finite likelihood among %d prior draws, %d stopped "
                    "at beta < 1 after %d stages", int(failed.sum()), n, int(((beta < 1) & ~failed).sum()), stages)
    return {"theta": theta, "beta": beta, "log_z": log_z, "failed": failed, "collapsed": collapsed,
            "stages": stages, "acceptance": acc,
            "evaluations": evaluations}


def pool_runs(theta: torch.Tensor, log_z: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One cloud (m, p) from R independent SMC runs of one target: ``theta`` (R, m, p), their log evidence
    estimates ``log_z`` (R,) nats. Run j contributes round(m w_j) of its particles (a random subset; the
    rounding by largest remainders), w_j = Z_j / sum_i Z_i: each run's cloud estimates the posterior and its Z
    the mass it found, so a run that lost the mode holding most of the posterior gets a weight near 0 (and
    the spread of log_z flags that it happened). A run whose log Z is not finite (NaN, +-inf) gets weight 0.
    One run is returned as it is, whatever its log Z. ValueError if R > 1 and no log Z is finite."""
    R, m, _ = theta.shape
    if R == 1:
        return theta[0]
    log_z = log_z.double()
    log_z = torch.where(torch.isfinite(log_z), log_z, torch.full_like(log_z, -math.inf))
    if not bool(torch.isfinite(log_z).any()):
        raise ValueError("pool_runs: no run has a finite evidence")
    share = torch.softmax(log_z, 0) * m
    counts = share.floor().long()
    counts[torch.argsort(share - counts, descending=True)[:m - int(counts.sum())]] += 1
    parts = [theta[j, torch.randperm(m, generator=generator)[:int(counts[j])]] for j in range(R)]
    return torch.cat(parts)


def smc_start(head: CorrelatedLensHead, log_likelihood, G: int, **kw) -> tuple[torch.Tensor, dict]:
    """Head outputs (G, R) for :func:`~pipeline.lensing.lens_head.refine`: per observation the normal in u-space
    with the mean and covariance of its :func:`tempered_smc` particles (keywords ``kw``); and the SMC's
    result (:func:`tempered_smc`: check ``failed`` and ``beta`` < 1, where the start is the tempered cloud's
    or the prior's, not the posterior's)."""
    out = tempered_smc(head, log_likelihood, G, **kw)
    n = out["theta"].shape[1]
    mean, cov = weighted_moments(head, out["theta"], torch.full((G, n), 1.0 / n, dtype=torch.float64))
    return raw_from_gaussian(head, mean, cov), out
