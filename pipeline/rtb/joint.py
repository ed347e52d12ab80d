"""Joint RTB over lens-like parameters theta and the source x, and its pseudo-marginal reference.

The trajectory is (theta, x_K -> ... -> x_1), with x0 = f(x_1):

    q_phi(tau | y) = q_phi(theta | y) prod_k q_phi(x_{k-1} | x_k, theta, y)
    p(tau, y)      = p(theta) prod_k p(x_{k-1} | x_k) p(y | f(x_1), theta)

so theta is the trajectory's first step and log Z is the evidence with theta marginalised. The start
terms log N(x_K; 0, I) of q and p cancel. The objective is RTB's 1/2 delta^2 with VarGrad log Z per
observation (:func:`pipeline.rtb.objective.deltas_vargrad`, theta's log-ratio entered as step K+1);
only log q_phi of detached states is differentiated.

The theta head (:class:`BoundedThetaHead`) is a conditional mixture of normals truncated to the prior's
box [lo, hi]^p: exact log-prob, support equal to that of a uniform prior. The reference (:func:`pmmh`) is
pseudo-marginal Metropolis-Hastings over theta with the importance-weighted estimate Z^(y | theta) of a
theta-conditional sampler; the current state's Z^ is stored and reused, never re-estimated.

Prior chains here are affine Gaussian chains (:class:`AffineChain`, built from
:func:`pipeline.diffusion.gaussian_chain.propagate_gaussian_chain`); log-likelihoods are callables
``log_lik(x0 (B, d), theta (B, p), y (B, m)) -> (B,)`` in nats.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pipeline.diffusion.gaussian_chain import gaussian_eps_affine, propagate_gaussian_chain
from pipeline.diffusion.schedule import gaussian_log_prob
from pipeline.rtb.objective import RTBBatch, deltas_vargrad


class AffineChain:
    """The frozen prior chain of a Gaussian source prior: x_{k-1} = M_k x_k + c_k + std_k z, x0 = F x_1 + f.

    ``chain``: a :class:`pipeline.diffusion.schedule.Chain`; ``prior_mean`` (d,), ``prior_cov`` (d, d).
    ``x0hat(x, k)`` is the prior's exact denoised estimate E[x0 | x_k] (a feature for the policy).
    Everything is float64."""

    def __init__(self, chain, prior_mean, prior_cov):
        law = propagate_gaussian_chain(chain, prior_mean, prior_cov)
        self.K, self.d = chain.K, law["F"].shape[0]
        self.M, self.c, self.std = law["M"], law["c"], law["std"]
        self.F, self.f = law["F"], law["f"]
        self.x0_mean, self.x0_cov = law["x0_mean"], law["x0_cov"]
        self._hat = {}
        for k in range(1, self.K + 1):
            ab = float(chain.abar[k])
            E, e = gaussian_eps_affine(prior_mean, prior_cov, ab)
            eye = torch.eye(self.d, dtype=torch.float64)
            self._hat[k] = ((eye - math.sqrt(1 - ab) * E) / math.sqrt(ab), -math.sqrt(1 - ab) * e / math.sqrt(ab))

    def step_mean(self, x: torch.Tensor, k: int) -> torch.Tensor:
        return x @ self.M[k].T + self.c[k]

    def final(self, x1: torch.Tensor) -> torch.Tensor:
        return x1 @ self.F.T + self.f

    def x0hat(self, x: torch.Tensor, k: int) -> torch.Tensor:
        H, h = self._hat[k]
        return x @ H.T + h

    def rollout(self, n: int, generator=None) -> dict:
        """States x_K..x_1 of the prior chain (n, d) each, and x0 at key 0."""
        x = torch.randn(n, self.d, generator=generator, dtype=torch.float64)
        xs = {self.K: x}
        for k in range(self.K, 1, -1):
            x = self.step_mean(x, k) + self.std[k] * torch.randn(n, self.d, generator=generator, dtype=torch.float64)
            xs[k - 1] = x
        xs[0] = self.final(x)
        return xs


class UniformBox:
    """Uniform prior on the box [lo, hi]^p (lo, hi: sequences of length p, in theta's units)."""

    def __init__(self, lo, hi):
        self.lo = torch.as_tensor(lo, dtype=torch.float64).reshape(-1)
        self.hi = torch.as_tensor(hi, dtype=torch.float64).reshape(-1)
        if self.lo.shape != self.hi.shape or not bool((self.hi > self.lo).all()):
            raise ValueError(f"UniformBox needs lo < hi of equal length, got lo={lo}, hi={hi}")
        self.p = self.lo.shape[0]

    def log_prob(self, theta: torch.Tensor) -> torch.Tensor:
        inside = ((theta >= self.lo) & (theta <= self.hi)).all(-1)
        lp = -torch.log(self.hi - self.lo).sum()
        return torch.where(inside, lp, torch.tensor(-math.inf, dtype=torch.float64))

    def sample(self, n: int, generator=None) -> torch.Tensor:
        u = torch.rand(n, self.p, generator=generator, dtype=torch.float64)
        return self.lo + (self.hi - self.lo) * u


def _mlp(n_in: int, n_out: int, hidden: int) -> nn.Sequential:
    net = nn.Sequential(nn.Linear(n_in, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                        nn.Linear(hidden, n_out)).double()
    nn.init.zeros_(net[-1].weight)
    nn.init.zeros_(net[-1].bias)
    return net


def _log_mass(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """log(Phi(b) - Phi(a)) for a < b, stable in both tails (the upper tail is mirrored to the lower)."""
    flip = (a + b) > 0
    lo, hi = torch.where(flip, -b, a), torch.where(flip, -a, b)
    log_hi, log_lo = torch.special.log_ndtr(hi), torch.special.log_ndtr(lo)
    return log_hi + torch.log1p(-torch.exp(log_lo - log_hi).clamp(max=1 - 1e-16))


def truncnorm_log_prob(x, mean, log_s, lo, hi) -> torch.Tensor:
    """Elementwise log-density of N(mean, exp(log_s)^2) truncated to [lo, hi] at x inside it
    (1/units of x; broadcasting)."""
    s = log_s.exp()
    z = (x - mean) / s
    return -0.5 * z * z - log_s - 0.5 * math.log(2 * math.pi) - _log_mass((lo - mean) / s, (hi - mean) / s)


def truncnorm_sample(mean, log_s, lo, hi, generator=None) -> torch.Tensor:
    """Elementwise draws of N(mean, exp(log_s)^2) truncated to [lo, hi], by the inverse CDF (on the
    mirrored side for upper tails, so it stays accurate to about 25 std in float64)."""
    s = log_s.exp()
    a, b = (lo - mean) / s, (hi - mean) / s
    flip = (a + b) > 0
    a, b = torch.where(flip, -b, a), torch.where(flip, -a, b)
    u = torch.rand(mean.shape, generator=generator, dtype=mean.dtype).to(mean.device)
    z = torch.special.ndtri(torch.special.ndtr(a) + u * (torch.special.ndtr(b) - torch.special.ndtr(a)))
    z = torch.where(flip, -z, z)
    return torch.minimum(torch.maximum(mean + s * z, torch.as_tensor(lo, dtype=mean.dtype, device=mean.device)),
                         torch.as_tensor(hi, dtype=mean.dtype, device=mean.device))


class BoundedThetaHead(nn.Module):
    """q_phi(theta | y): a mixture of ``components`` diagonal normals truncated to the box [lo, hi]^p.

    Each component's mean lies in the box widened by a quarter of its width on each side and its std in
    [``min_std_frac``, 2] x the box width, so the box stays within 25 std of every mean (the inverse-CDF
    sampler stays accurate in float64). The log-prob
    (1/theta-units^p) is exact and normalised on the box, whose edges keep a non-zero density (a
    posterior cut by a uniform prior's edge is one such a head can fit)."""

    def __init__(self, box: UniformBox, y_dim: int, components: int = 2, hidden: int = 64, y_scale: float = 1.0,
                 min_std_frac: float = 0.01):
        super().__init__()
        self.box, self.C, self.y_scale = box, components, y_scale
        self.log_s_range = (math.log(min_std_frac), math.log(2.0))
        self.net = _mlp(y_dim, components * (2 * box.p + 1), hidden)
        with torch.no_grad():  # start broad, the components spread over the box
            bias = self.net[-1].bias.view(components, 2 * box.p + 1)
            bias[:, :box.p] = torch.linspace(-0.5, 0.5, components)[:, None]
            bias[:, box.p:2 * box.p] = -1.0

    def params(self, y: torch.Tensor):
        """Per component (B, C, p): mean and log std in theta units, and log weights (B, C)."""
        out = self.net(y / self.y_scale).view(y.shape[0], self.C, 2 * self.box.p + 1)
        p, width = self.box.p, self.box.hi - self.box.lo
        mean = 0.5 * (self.box.lo + self.box.hi) + 0.75 * width * torch.tanh(out[..., :p])
        lo_s, hi_s = self.log_s_range
        log_s = lo_s + (hi_s - lo_s) * torch.sigmoid(out[..., p:2 * p]) + torch.log(width)
        return mean, log_s, torch.log_softmax(out[..., -1], -1)

    def log_prob(self, theta: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """log q(theta | y), (B,) for theta (B, p) inside the box (-inf outside)."""
        mean, log_s, log_w = self.params(y)
        log_n = truncnorm_log_prob(theta[:, None, :], mean, log_s, self.box.lo, self.box.hi).sum(-1)
        lp = torch.logsumexp(log_w + log_n, -1)
        inside = ((theta >= self.box.lo) & (theta <= self.box.hi)).all(-1)
        return torch.where(inside, lp, torch.tensor(-math.inf, dtype=torch.float64))

    @torch.no_grad()
    def sample(self, y: torch.Tensor, generator=None) -> torch.Tensor:
        """One theta per row of y, (B, p), by the inverse CDF (on the mirrored side for upper tails)."""
        mean, log_s, log_w = self.params(y)
        c = torch.multinomial(log_w.exp(), 1, generator=generator)[:, 0]
        rows = torch.arange(y.shape[0])
        mean, log_s = mean[rows, c], log_s[rows, c]
        return truncnorm_sample(mean, log_s, self.box.lo, self.box.hi, generator)


class JointPolicy(nn.Module):
    """q_phi over (theta, x_K..x_1): a theta head and a step head.

    The step head corrects the prior chain's step, q(x_{k-1} | x_k, theta, y) = N(M_k x_k + c_k + g, (std_k e^h)^2),
    with (g, h) an MLP of (x_k, features(x_k, k, theta, y), theta, y, one-hot k); it starts at g = h = 0
    (q's x-steps equal the prior's). ``features``: a callable giving (B, feat_dim) extra inputs (e.g. the
    likelihood gradient at the prior's denoised estimate)."""

    def __init__(self, prior_chain: AffineChain, box: UniformBox, y_dim: int, features=None, feat_dim: int = 0,
                 hidden: int = 64, components: int = 2, y_scale: float = 1.0):
        super().__init__()
        self.chain, self.box, self.features, self.y_scale = prior_chain, box, features, y_scale
        self.theta_head = BoundedThetaHead(box, y_dim, components, hidden, y_scale)
        d = prior_chain.d
        self.step_head = _mlp(d + feat_dim + box.p + y_dim + prior_chain.K, d + 1, hidden)

    def step_params(self, x: torch.Tensor, k: int, theta: torch.Tensor, y: torch.Tensor):
        t = 2 * (theta - self.box.lo) / (self.box.hi - self.box.lo) - 1
        onehot = torch.zeros(x.shape[0], self.chain.K, dtype=x.dtype)
        onehot[:, k - 1] = 1
        parts = [x] + ([self.features(x, k, theta, y)] if self.features is not None else []) + \
                [t, y / self.y_scale, onehot]
        out = self.step_head(torch.cat(parts, -1))
        return self.chain.step_mean(x, k) + out[:, :-1], self.chain.std[k] * out[:, -1:].clamp(-5, 2).exp()

    def x_log_q(self, xs: dict, theta: torch.Tensor, y: torch.Tensor) -> dict:
        """log q(x_{k-1} | x_k, theta, y) per step k = 2..K for fixed states (differentiable in phi)."""
        out = {}
        for k in range(self.chain.K, 1, -1):
            mean, std = self.step_params(xs[k], k, theta, y)
            out[k] = gaussian_log_prob(xs[k - 1], mean, std)
        return out

    @torch.no_grad()
    def rollout_x(self, theta: torch.Tensor, y: torch.Tensor, generator=None) -> dict:
        """States x_K..x_1 (and x0 at key 0) of q's x-steps given theta and y, one per row."""
        n, d = theta.shape[0], self.chain.d
        x = torch.randn(n, d, generator=generator, dtype=torch.float64)
        xs = {self.chain.K: x}
        for k in range(self.chain.K, 1, -1):
            mean, std = self.step_params(x, k, theta, y)
            x = mean + std * torch.randn(n, d, generator=generator, dtype=torch.float64)
            xs[k - 1] = x
        xs[0] = self.chain.final(x)
        return xs


def prior_x_log_p(chain: AffineChain, xs: dict) -> dict:
    """log p(x_{k-1} | x_k) per step k = 2..K under the frozen prior chain."""
    return {k: gaussian_log_prob(xs[k - 1], chain.step_mean(xs[k], k), chain.std[k]) for k in range(chain.K, 1, -1)}


@torch.no_grad()
def joint_rollout(policy: JointPolicy, log_lik, y: torch.Tensor, groups=None, generator=None) -> RTBBatch:
    """On-policy joint trajectories, one per row of y (B, m), scored under q_phi and p.

    theta's terms are stored as step K+1 of ``log_q_steps`` / ``log_p_steps`` (so
    :meth:`RTBBatch.log_ratio` and :func:`deltas_vargrad` see the whole trajectory); theta is in
    ``info['theta']``."""
    theta = policy.theta_head.sample(y, generator)
    xs = policy.rollout_x(theta, y, generator)
    K = policy.chain.K
    log_q = policy.x_log_q(xs, theta, y)
    log_q[K + 1] = policy.theta_head.log_prob(theta, y)
    log_p = prior_x_log_p(policy.chain, xs)
    log_p[K + 1] = policy.box.log_prob(theta)
    return RTBBatch(xs=xs, eps_p={}, guide={}, log_p_steps=log_p, log_q_steps=log_q, log_r=log_lik(xs[0], theta, y),
                    y=y, groups=groups, info={"theta": theta})


def joint_loss(policy: JointPolicy, batch: RTBBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """RTB loss mean_b 1/2 delta_b^2 with VarGrad log Z per group (detached); differentiable in phi
    through log q of the batch's fixed states. Returns (loss, log Z per group)."""
    delta0, log_z = deltas_vargrad(batch)
    theta = batch.info["theta"]
    lq = policy.theta_head.log_prob(theta, batch.y) + sum(policy.x_log_q(batch.xs, theta, batch.y).values())
    lq_fixed = batch.log_q()
    delta = delta0.detach() + lq - lq_fixed.detach()  # same value as delta0, gradient that of log q
    return 0.5 * (delta ** 2).mean(), log_z


class AdamCosine:
    """Adam on ``params`` (a module or leaf tensors), lr cosine-decayed to 5 %, gradient norm clipped (None: not)."""

    def __init__(self, params, lr: float, steps: int, clip: float | None = 10.0):
        self.params, self.clip = list(params.parameters() if isinstance(params, nn.Module) else params), clip
        self.opt = torch.optim.Adam(self.params, lr=lr)
        self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, max(1, steps), eta_min=0.05 * lr)

    def step(self, loss: torch.Tensor) -> float:  # one optimisation step; returns the loss as a float
        self.opt.zero_grad()
        loss.backward()
        if self.clip is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.opt.step()
        self.sched.step()
        return float(loss.detach())


def train_joint(policy: JointPolicy, log_lik, observations: torch.Tensor, *, steps: int, groups: int = 4,
                group_size: int = 32, lr: float = 1e-2, seed: int = 0) -> list[float]:
    """Train q_phi amortized over ``observations`` (G, m): every step draws ``groups`` of them and
    ``group_size`` on-policy trajectories for each (VarGrad log Z per observation). Adam with a cosine
    decay to 5% of ``lr``. Returns the loss per step."""
    if observations.ndim != 2 or observations.shape[0] < 1:
        raise ValueError(f"observations must be (G, m) with G >= 1, got shape {tuple(observations.shape)}")
    gen = torch.Generator().manual_seed(seed)
    optim = AdamCosine(policy, lr, steps)
    losses = []
    for _ in range(steps):
        idx = torch.randint(observations.shape[0], (groups,), generator=gen)
        y = observations[idx].double().repeat_interleave(group_size, 0)
        g = torch.arange(groups).repeat_interleave(group_size)
        batch = joint_rollout(policy, log_lik, y, groups=g, generator=gen)
        loss, _ = joint_loss(policy, batch)
        losses.append(optim.step(loss))
    return losses


@torch.no_grad()
def joint_log_z(policy: JointPolicy, log_lik, y: torch.Tensor, n: int, seed: int = 0) -> float:
    """Importance estimate of log p(y) with theta marginalised, from n joint trajectories of q_phi (nats)."""
    batch = joint_rollout(policy, log_lik, y.reshape(1, -1).expand(n, -1).double(),
                          generator=torch.Generator().manual_seed(seed))
    return importance_log_z(batch.log_r - batch.log_ratio())


# -- pseudo-marginal reference -------------------------------------------------------------------
def importance_log_z(log_w: torch.Tensor) -> float:
    """log of the unbiased importance estimate Z^ = mean_i exp(log_w_i) (nats)."""
    return float(torch.logsumexp(log_w.double(), 0) - math.log(log_w.shape[0]))


def prior_chain_log_weights(chain: AffineChain, log_lik, y: torch.Tensor):
    """Theta-conditional sampler = the prior chain: log weights are log p(y | f(x_1), theta).
    Returns ``fn(theta (p,), n, generator) -> (n,)``."""
    def fn(theta, n, generator):
        xs = chain.rollout(n, generator)
        return log_lik(xs[0], theta.reshape(1, -1).expand(n, -1), y.reshape(1, -1).expand(n, -1))
    return fn


def policy_log_weights(policy: JointPolicy, log_lik, y: torch.Tensor):
    """Theta-conditional sampler = q_phi's x-steps at a fixed theta: log weights
    log p(x-steps) + log p(y | f(x_1), theta) - log q(x-steps | theta, y). Returns ``fn(theta, n, generator)``."""
    @torch.no_grad()
    def fn(theta, n, generator):
        th, yy = theta.reshape(1, -1).expand(n, -1), y.reshape(1, -1).expand(n, -1).double()
        xs = policy.rollout_x(th, yy, generator)
        ratio = sum(prior_x_log_p(policy.chain, xs).values()) - sum(policy.x_log_q(xs, th, yy).values())
        return ratio + log_lik(xs[0], th, yy)
    return fn


def log_z_hat_variance(log_weights, theta: torch.Tensor, n: int, reps: int = 100, seed: int = 0) -> float:
    """Var(log Z^) over ``reps`` independent estimates from n trajectories each, at theta (nats^2)."""
    gen = torch.Generator().manual_seed(seed)
    vals = torch.tensor([importance_log_z(log_weights(theta, n, gen)) for _ in range(reps)])
    return float(vals.var())


def choose_n_trajectories(log_weights, theta: torch.Tensor, target_var: float = 2.0, n0: int = 8,
                          n_max: int = 65536, reps: int = 100, seed: int = 0) -> tuple[int, float]:
    """Smallest n = n0 * 2^j with Var(log Z^) <= target_var at theta. Returns (n, variance)."""
    n = n0
    while True:
        var = log_z_hat_variance(log_weights, theta, n, reps, seed)
        if var <= target_var or n >= n_max:
            return n, var
        n *= 2


def pmmh(log_prior, log_weights, theta0: torch.Tensor, *, n_traj: int, step: float, n_iter: int,
         seed: int = 0) -> dict:
    """Pseudo-marginal random-walk Metropolis-Hastings over theta.

    Target p(theta) Z^(y | theta) with Z^ the importance estimate from ``n_traj`` trajectories of the
    theta-conditional sampler ``log_weights``; the current state's log Z^ is stored and reused. The
    proposal is theta + step * N(0, I) (``step`` in theta's units). Returns dict(theta (n_iter, p),
    acceptance, trajectories (the cost: theta-conditional trajectories simulated))."""
    gen = torch.Generator().manual_seed(seed)
    theta = torch.as_tensor(theta0, dtype=torch.float64).reshape(-1)
    lp = float(log_prior(theta[None])[0])
    if not math.isfinite(lp):
        raise ValueError(f"pmmh: theta0={theta.tolist()} is outside the prior's support")
    lz = importance_log_z(log_weights(theta, n_traj, gen))
    out = torch.empty(n_iter, theta.shape[0], dtype=torch.float64)
    accepted, cost = 0, n_traj
    for i in range(n_iter):
        prop = theta + step * torch.randn(theta.shape, generator=gen, dtype=torch.float64)
        lp_new = float(log_prior(prop[None])[0])
        u = math.log(float(torch.rand((), generator=gen, dtype=torch.float64)))
        if math.isfinite(lp_new):
            lz_new = importance_log_z(log_weights(prop, n_traj, gen))
            cost += n_traj
            if u < lp_new + lz_new - lp - lz:
                theta, lp, lz = prop, lp_new, lz_new
                accepted += 1
        out[i] = theta
    return {"theta": out, "acceptance": accepted / n_iter, "trajectories": cost}


def integrated_autocorr_time(x: torch.Tensor, c: float = 5.0) -> float:
    """Integrated autocorrelation time of a 1-D chain, Sokal's automatic window (M >= c tau)."""
    x = torch.as_tensor(x, dtype=torch.float64).reshape(-1)
    n = x.shape[0]
    x = x - x.mean()
    f = torch.fft.rfft(x, n=2 * n)
    acf = torch.fft.irfft(f * f.conj(), n=2 * n)[:n]
    acf = acf / acf[0]
    tau = 2 * torch.cumsum(acf, 0) - 1
    for m in range(1, n):
        if m >= c * float(tau[m]):
            return float(tau[m])
    return float(tau[-1])


def ess(x: torch.Tensor) -> float:
    """Effective sample size n / tau_int of a 1-D chain."""
    return x.reshape(-1).shape[0] / integrated_autocorr_time(x)
