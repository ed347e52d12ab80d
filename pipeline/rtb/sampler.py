"""The one :class:`~pipeline.samplers.base.Sampler` for trained RTB posteriors.

Every RTB method samples through :class:`RTBSampler` (built by name with
:func:`pipeline.samplers.make_sampler`): ``rtb`` (one observation), ``rtb_amortized`` (conditioned on y
through ``cond_fn``), ``rtb_dps`` / ``rtb_dps_cla`` (guidance from the frozen prior inside the
parameterisation), ``rtb_amortized_is`` (``particles`` trajectories per returned sample, one drawn by
importance weight within its group), ``rtb_amortized_smc`` (one twisted SMC run of ``particles``
particles per returned sample, :mod:`pipeline.rtb.smc`, one particle drawn from its final weights) and
``rtb_amortized_gn`` (the last step x_2 -> x_1 replaced by the Gauss-Newton twisted step,
:mod:`pipeline.rtb.twisted_step`).

Conventions (:class:`~pipeline.samplers.base.Samples`): ``log_q_traj`` / ``log_p_traj`` include the
start term log N(x_K; 0, I); ``nfe`` per returned sample is K prior evaluations (k = 1..K) plus K - 1
posterior-network calls, times ``particles``; the Gauss-Newton step adds, per iteration, one
vectorised Jacobian of the prior's final denoise (counted as d VJPs) and one forward call.
"""

from __future__ import annotations

import torch

from pipeline.diffusion.schedule import gaussian_log_prob
from pipeline.metrics.logz import estimate_logz
from pipeline.rtb.objective import expand_obs, policy_rollout
from pipeline.rtb.smc import twisted_smc
from pipeline.rtb.twisted_step import GaussNewtonLastStep
from pipeline.samplers.base import Sampler, Samples
from pipeline.samplers.registry import RTB_METHODS
# Gauss-Newton iterations of the twisted last step: the second linearisation, at the first one's mean,
# is what brought the ELBO above the policy's own last step on the shipped lensing posterior
# (docs/results/experiments.md, "A twisted last step")
GN_ITERATIONS = 2


def resample_within_groups(log_w: torch.Tensor, n: int, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampling importance resampling in ``n`` independent groups (rows of ``log_w.reshape(n, -1)``).

    Each group's weights are normalised on their own and one member is drawn from them, so the ``n``
    returned indices (into the flat ``log_w``) are independent draws, each from its own group's SIR
    approximation of the target, and never duplicates of one heavy particle across groups. Returns
    (indices (n,), weights normalised within each group (n, m), float64)."""
    lw = log_w.detach().double().cpu().reshape(n, -1)
    if not torch.isfinite(lw).any(1).all():
        raise ValueError("a group of importance weights has no finite member")
    w = torch.softmax(lw, 1)
    pick = torch.multinomial(w, 1, generator=generator)[:, 0]
    return torch.arange(n) * lw.shape[1] + pick, w


class RTBSampler(Sampler):
    """Samples x0 = f(x_1) from a trained :class:`~pipeline.rtb.posterior.RTBPosterior`.

    ``sample(problem, y, n)`` passes the observation's own inverse problem with every call of the
    posterior (the ``grad`` feature, guidance, log r). Options: ``cond_fn(problem, y (1, *y_shape)) ->
    cond (1, ...)`` for amortized posteriors; ``batch_size``
    bounds the trajectories rolled out at once; ``particles`` (m >= 1) trajectories per returned
    sample, one drawn from each group of m by its weight r p / q (``info["particles"]`` keeps all
    n m of them with their within-group weights, ``info["logz"]`` the estimate over all of them); for
    ``rtb_amortized_smc`` each group is one twisted SMC run, and ``info["logz"]`` holds the mean of the
    runs' log Z^ (``elbo``: a lower bound on log Z in expectation) and the log of their mean Z^ (``iw``);
    ``last_step``: ``"policy"`` (the network's own) or ``"gauss_newton"`` (needs a linear problem with
    a dense matrix).
    """

    def __init__(self, posterior, name: str = "rtb", *, cond_fn=None, batch_size: int = 4096, particles: int = 1,
                 last_step: str = "policy"):
        if name not in RTB_METHODS:
            raise ValueError(f"RTB sampler name must be one of {RTB_METHODS}, got {name!r}")
        if name.startswith("rtb_amortized") and cond_fn is None:
            raise ValueError(f"{name} needs cond_fn (observation -> conditioning input)")
        if int(particles) < 1 or int(batch_size) < 1:
            raise ValueError(f"particles and batch_size must be >= 1, got {particles}, {batch_size}")
        if last_step not in ("policy", "gauss_newton"):
            raise ValueError(f"last_step must be 'policy' or 'gauss_newton', got {last_step!r}")
        gn, is_ = last_step == "gauss_newton", int(particles) > 1
        if gn != (name == "rtb_amortized_gn") or (is_ and name not in ("rtb_amortized_is", "rtb_amortized_smc")):
            raise ValueError(f"{name}: last_step {last_step!r} / particles {particles} belong to rtb_amortized_gn / "
                             f"rtb_amortized_is / rtb_amortized_smc")
        if name == "rtb_amortized_smc" and getattr(posterior, "step_variance_tau2", None) is None:
            raise ValueError("rtb_amortized_smc's twist needs the posterior's prior-variance model "
                             "(rtb.policy.step_variance_tau2)")
        self.post, self.name, self.cond_fn, self.batch_size = posterior, name, cond_fn, int(batch_size)
        self.particles, self.last_step = int(particles), last_step

    def sample(self, problem, y: torch.Tensor, n: int, *, generator=None) -> Samples:
        if n < 1:
            raise ValueError(f"number of samples must be >= 1, got {n}")
        post, m = self.post, self.particles
        post.eval()
        y = torch.as_tensor(y)
        step = self._last_step(problem, y)
        cond = None
        if self.cond_fn is not None:
            cond = self.cond_fn(problem, y.reshape(1, *problem.y_shape))[0]
        if self.name == "rtb_amortized_smc":
            return self._smc(problem, y, n, cond, generator)
        x0, lr, lq, lp, start = [], [], [], [], []
        for s in range(0, n * m, self.batch_size):
            b = policy_rollout(post, min(self.batch_size, n * m - s), y, cond, problem=problem, generator=generator,
                               last_step=step)
            x0.append(b.x0)
            lr.append(b.log_r)
            lq.append(b.log_q())
            lp.append(b.log_p())
            start.append(gaussian_log_prob(b.xs[post.chain.K], torch.zeros_like(b.xs[post.chain.K]), 1.0))
        x0, lr, lq, lp, start = (torch.cat(v) for v in (x0, lr, lq, lp, start))
        info = {"method": self.name, "K": post.chain.K, "mode": post.mode, "particles": m,
                "last_step": self.last_step}
        if self.name != "rtb_amortized_is":
            return Samples(x0=x0, log_r=lr, log_q_traj=start + lq, log_p_traj=start + lp, nfe=self._nfe(), info=info)
        # the start term cancels in the weights: they are formed from the step sums
        lw = lr + lp - lq
        idx, w = resample_within_groups(lw, n, generator)
        est = estimate_logz(lw)
        info["logz"] = {"elbo": est.elbo, "elbo_se": est.elbo_se, "iw": est.iw}
        info["particles_x0"], info["particles_weights"], info["particles_index"] = x0, w, idx
        sel = idx.to(x0.device)
        return Samples(x0=x0[sel], log_r=lr[sel.to(lr.device)], log_w=torch.zeros(n, dtype=torch.float64),
                       nfe=self._nfe(), info=info)

    def _smc(self, problem, y, n, cond, generator) -> Samples:
        """n independent twisted SMC runs of ``particles`` particles, as many whole runs per call as
        ``batch_size`` particles hold (at least one); one sample drawn from each run's final weights."""
        m = self.particles
        per_call = max(1, self.batch_size // m)
        x0, lw, lz = [], [], []
        for s in range(0, n, per_call):
            res = twisted_smc(self.post, problem, y, m, runs=min(per_call, n - s), cond=cond, generator=generator)
            x0.append(res.x0.reshape(-1, *res.x0.shape[2:]))
            lw.append(res.log_w)
            lz.append(res.log_z)
        x0, lw, lz = torch.cat(x0), torch.cat(lw), torch.cat(lz)
        idx, w = resample_within_groups(lw.reshape(-1), n, generator)
        sel = idx.to(x0.device)
        lr = problem.log_likelihood(x0[sel], expand_obs(problem, y, n).to(x0.device)).double()
        info = {"method": self.name, "K": self.post.chain.K, "mode": self.post.mode, "particles": m,
                "last_step": self.last_step, "particles_x0": x0, "particles_weights": w, "particles_index": idx,
                "logz": {"elbo": float(lz.mean()), "elbo_se": float(lz.std() / n ** 0.5) if n > 1 else float("nan"),
                         "iw": float(torch.logsumexp(lz, 0) - torch.log(torch.tensor(float(n), dtype=torch.float64)))}}
        return Samples(x0=x0[sel], log_r=lr, log_w=torch.zeros(n, dtype=torch.float64), nfe=self._nfe(), info=info)

    def _last_step(self, problem, y):
        if self.last_step == "policy":
            return None
        return GaussNewtonLastStep(self.post.prior, self.post.chain, problem, y, iterations=GN_ITERATIONS)

    def _nfe(self) -> int:
        K, d = self.post.chain.K, 1
        for s in self.post.prior.event_shape:
            d *= int(s)
        extra = GN_ITERATIONS * (d + 1) if self.last_step == "gauss_newton" else 0
        return self.particles * (2 * K - 1 + extra)
