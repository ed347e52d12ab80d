"""The RTB objective and its two-pass gradient.

For a trajectory tau = (x_K -> ... -> x_1), sample x0 = f(x_1):

    delta(tau) = log Z + sum_{k=2..K} [log q_phi(x_{k-1}|x_k) - log p_theta(x_{k-1}|x_k)] - beta log r(f(x_1))
    loss       = mean_b rho(delta_b),  rho(d) = 1/2 d^2
                 (optionally with a dead-zone, 1/2 relu(d^2 - c), and a Huber bound h: rho linear with
                 slope h beyond |d| = h, so one trajectory's weight in the gradient is at most h / B)

The start terms log N(x_K; 0, I) of q and p cancel. States are always detached: only log q_phi of
fixed transitions is differentiated.

Two-pass gradient (memory independent of K): pass 1 computes delta per trajectory without grad;
pass 2 recomputes each step's log q_phi with grad, a chunk of steps at a time, and backprops
``(delta_b / B) * log q_phi(step)``. log Z's gradient ``mean_b delta_b`` is added once, after the
chunk loop (not once per chunk). ``sync_context(is_last)`` lets a DDP wrapper skip the all-reduce
for every chunk but the last.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from pipeline.diffusion.sampling import prior_eps, rollout
from pipeline.diffusion.schedule import gaussian_log_prob


@dataclass
class RTBBatch:
    """Detached trajectories with everything both passes need (O(K B d) memory).

    ``xs[k]`` k = 1..K states (``xs[0]`` = f(x_1)); ``eps_p[k]`` the frozen prior's eps at x_k;
    ``guide[k]`` the cached guidance offset of q's mean (or None); ``log_p_steps``/``log_q_steps``
    for k = 2..K (float64, no grad); ``log_r`` = log p(y | f(x_1)) at beta = 1 (float64);
    ``y``/``cond`` per sample (B, ...) or None; ``problem`` the inverse problem the batch was scored
    under (one for all rows, or per sample: then it has ``repeat``/``cat`` like ``y``, so the gradient
    pass scores each row with its own operator); ``groups`` the observation index per sample.
    """

    xs: dict
    eps_p: dict
    guide: dict
    log_p_steps: dict
    log_q_steps: dict
    log_r: torch.Tensor
    y: torch.Tensor | None = None
    cond: torch.Tensor | None = None
    groups: torch.Tensor | None = None
    problem: object = None
    source: str = "policy"
    info: dict = field(default_factory=dict)

    @property
    def n(self) -> int:
        return self.xs[1].shape[0]

    @property
    def K(self) -> int:
        return max(self.xs)

    @property
    def x0(self) -> torch.Tensor:
        return self.xs[0]

    @property
    def x1(self) -> torch.Tensor:
        return self.xs[1]

    def log_ratio(self) -> torch.Tensor:
        """sum_k (log q - log p), (B,) float64."""
        return sum(self.log_q_steps[k] - self.log_p_steps[k] for k in self.log_q_steps)

    def log_q(self) -> torch.Tensor:
        return sum(self.log_q_steps.values())

    def log_p(self) -> torch.Tensor:
        return sum(self.log_p_steps.values())

    @staticmethod
    def cat(batches: list["RTBBatch"]) -> "RTBBatch":
        """Concatenate batches along the sample axis (all must share K and y/cond presence)."""
        def cat_d(name):
            keys = getattr(batches[0], name).keys()
            out = {}
            for k in keys:
                vals = [getattr(b, name)[k] for b in batches]
                out[k] = None if vals[0] is None else torch.cat(vals)
            return out

        def cat_t(name):
            vals = [getattr(b, name) for b in batches]
            return None if vals[0] is None else torch.cat(vals)

        problem = batches[0].problem
        if is_per_sample(problem):
            problem = type(problem).cat([b.problem for b in batches])
        return RTBBatch(xs=cat_d("xs"), eps_p=cat_d("eps_p"), guide=cat_d("guide"),
                        log_p_steps=cat_d("log_p_steps"), log_q_steps=cat_d("log_q_steps"),
                        log_r=cat_t("log_r"), y=cat_t("y"), cond=cat_t("cond"), groups=cat_t("groups"),
                        problem=problem, source="+".join(sorted({b.source for b in batches})))


def is_per_sample(problem) -> bool:
    """True for a problem whose rows differ (it stacks like ``y``: ``repeat``, ``cat``; ``index`` per row)."""
    return hasattr(problem, "repeat") and hasattr(problem, "cat")


def repeat_problem(problem, r: int):
    """The problem of ``y.repeat(r, ...)``: a per-sample problem repeated, a shared one as it is."""
    return problem.repeat(r) if is_per_sample(problem) else problem


def _expand(v, n, shape=None):
    """Per-sample copy (n, *shape) of a conditioning given once (``shape``) or per sample ((n, *shape)).

    ``shape`` is one observation's conditioning shape (``RTBPosterior.cond_shape``); with it the two
    forms cannot be confused, also when the batch size equals the conditioning's first axis (a lensing
    map of 2 channels sampled 2 at a time). Without it (a model that does not say), a tensor of 2+
    dimensions whose first axis is n is taken as per sample."""
    if v is None:
        return None
    if shape is not None and shape != ():
        if tuple(v.shape) == tuple(shape):
            return v.unsqueeze(0).expand(n, *v.shape)
        if tuple(v.shape) == (n, *shape):
            return v
        raise ValueError(f"conditioning has shape {tuple(v.shape)}; expected {tuple(shape)} (one observation) "
                         f"or {(n, *shape)} (one per sample)")
    return v if v.shape[0] == n and v.ndim >= 2 else v.unsqueeze(0).expand(n, *v.shape)


def expand_obs(problem, y, n):
    """y of shape y_shape or (n, *y_shape) -> (n, *y_shape)."""
    if y is None:
        return None
    y = torch.as_tensor(y)
    if problem is not None and tuple(y.shape) == tuple(problem.y_shape):
        return y.unsqueeze(0).expand(n, *y.shape)
    if y.shape[0] != n:
        raise ValueError(f"y has batch {y.shape[0]}, expected {n}")
    return y


@torch.no_grad()
def evaluate_states(posterior, xs: dict, y=None, cond=None, *, problem=None, eps_p=None, guide=None,
                    log_p_steps=None, log_q_steps=None, groups=None, source="offpolicy") -> RTBBatch:
    """Score given detached states x_K..x_1 under p_theta and the current q_phi (no grad), for the
    observation ``y`` of ``problem`` (None: no likelihood, log r = 0).

    Missing cached pieces are computed: prior eps at every state, guidance offsets, step log-probs,
    x0 = f(x_1) and log r(x0) at beta = 1.
    """
    chain, prior = posterior.chain, posterior.prior
    K = chain.K
    n = xs[1].shape[0]
    y = expand_obs(problem, y, n)
    cond = _expand(cond, n, getattr(posterior, "cond_shape", None)) if cond is not None else None
    eps_p = dict(eps_p or {})
    for k in range(1, K + 1):
        if k not in eps_p:
            eps_p[k] = prior_eps(prior, chain, xs[k], k)
    guide = dict(guide or {})
    for k in range(2, K + 1):
        if k not in guide:
            with torch.enable_grad():
                guide[k] = posterior.guide(xs[k], k, eps_p[k], y, problem)
    log_p_steps = dict(log_p_steps or {})
    log_q_steps = dict(log_q_steps or {})
    for k in range(2, K + 1):
        std = chain.reverse_std(k)
        if k not in log_p_steps:
            log_p_steps[k] = gaussian_log_prob(xs[k - 1], chain.reverse_mean(xs[k], eps_p[k], k), std)
        if k not in log_q_steps:
            log_q_steps[k] = posterior.log_q_step(xs[k], xs[k - 1], k, eps_p[k], y, cond, guide[k], problem)
    xs = dict(xs)
    xs[0] = chain.final_denoise(xs[1], eps_p[1])
    log_r = problem.log_likelihood(xs[0], y) if problem is not None else torch.zeros(n, dtype=torch.float64)
    return RTBBatch(xs=xs, eps_p=eps_p, guide=guide, log_p_steps=log_p_steps, log_q_steps=log_q_steps,
                    log_r=log_r.double(), y=y, cond=cond, groups=groups, problem=problem, source=source)


@torch.no_grad()
def policy_rollout(posterior, n: int, y=None, cond=None, *, problem=None, generator=None, std_scale: float = 1.0,
                   behaviour=None, groups=None, device=None, source=None, dtype=torch.float32,
                   last_step=None) -> RTBBatch:
    """Roll out q_phi from x_K ~ N(0, I) for the observation ``y`` of ``problem`` and score every step
    under q_phi and p_theta.

    ``std_scale`` tempers the step noise (exploration); ``behaviour``: an optional extra mean offset
    ``(x, k, eps_p, y, problem) -> offset`` (e.g. DPS guidance) used during this rollout only. In both cases
    log q is that of the untempered, unguided q_phi, so the off-policy loss stays exact.
    ``last_step``: an optional replacement of the step x_2 -> x_1, ``(x_2, eps_p, q's mean, noise, q's std) ->
    (x_1, log q)`` (e.g. :class:`pipeline.rtb.twisted_step.GaussNewtonLastStep`); the trajectory is
    then scored under that step's own density (sampling only, not with tempering or behaviour).
    (This is :func:`pipeline.diffusion.sampling.rollout`'s loop with a per-step std, which q_phi
    has when it learns its variance.)
    """
    chain, prior = posterior.chain, posterior.prior
    if last_step is not None and (std_scale != 1.0 or behaviour is not None):
        raise ValueError("a replaced last step is for sampling; it does not combine with tempering or behaviour")
    device = torch.device(device) if device is not None else prior.device
    y_n = expand_obs(problem, y, n)
    y_n = None if y_n is None else y_n.to(device)
    cond_n = _expand(cond, n, getattr(posterior, "cond_shape", None)) if cond is not None else None
    cond_n = None if cond_n is None else cond_n.to(device)
    shape = (n, *prior.event_shape)
    x = torch.randn(shape, generator=generator, dtype=dtype).to(device)
    xs, eps_c, guides, log_q, log_p = {}, {}, {}, {}, {}
    for k in range(chain.K, 1, -1):
        eps_p = prior_eps(prior, chain, x, k)
        with torch.enable_grad():
            g = posterior.guide(x, k, eps_p, y_n, problem)
        mean, std = posterior.step_params(x, k, eps_p, y_n, cond_n, g, problem)
        centre = mean
        if behaviour is not None:
            with torch.enable_grad():
                centre = mean + behaviour(x, k, eps_p, y_n, problem).detach()
        noise = torch.randn(shape, generator=generator, dtype=dtype).to(device)
        if k == 2 and last_step is not None:
            x_new, log_q[k] = last_step(x, eps_p, mean, noise, std)
        else:
            x_new = (centre + std_scale * std * noise).detach()
            log_q[k] = gaussian_log_prob(x_new, mean, std)
        log_p[k] = gaussian_log_prob(x_new, chain.reverse_mean(x, eps_p, k), chain.reverse_std(k))
        xs[k], eps_c[k], guides[k] = x, eps_p, g
        x = x_new
    xs[1] = x
    src = source or ("policy" if std_scale == 1.0 and behaviour is None else "explore")
    return evaluate_states(posterior, xs, y_n, cond_n, problem=problem, eps_p=eps_c, guide=guides, log_p_steps=log_p,
                           log_q_steps=log_q, groups=groups, source=src)


@torch.no_grad()
def prior_rollout(posterior, n: int, y=None, cond=None, *, problem=None, generator=None, groups=None, device=None,
                  dtype=torch.float32) -> RTBBatch:
    """Trajectories of the frozen prior chain, scored under q_phi for the observation ``y`` of
    ``problem`` (off-policy exploration)."""
    traj = rollout(posterior.prior, posterior.chain, n, generator=generator, device=device, dtype=dtype)
    xs = {k: v for k, v in traj.xs.items() if k >= 1}
    return evaluate_states(posterior, xs, y, cond, problem=problem, eps_p=traj.eps_prior, log_p_steps=traj.log_p_steps,
                           groups=groups, source="prior")


# -- deltas -----------------------------------------------------------------------------------
def deltas_scalar(batch: RTBBatch, log_z: torch.Tensor | float, beta: float = 1.0) -> torch.Tensor:
    """delta_b = log Z + sum(log q - log p) - beta log r, float64 (B,), detached."""
    return (torch.as_tensor(log_z, dtype=torch.float64).detach() + batch.log_ratio() - beta * batch.log_r).detach()


def deltas_vargrad(batch: RTBBatch, beta: float = 1.0, groups=None, huber: float = 0.0
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """VarGrad: per y-group, log Z_g is the loss-minimising constant (detached) and
    delta_b = log Z_g + sum(log q - log p) - beta log r. Returns (delta (B,), log Z per group (G,)).

    For the squared loss log Z_g = mean_g(beta log r - sum(log q - log p)). With a Huber bound ``huber``
    (nats) it is the Huber M-estimate of that location (the root of sum_g clamp(delta, -h, h) = 0), so a
    trajectory far off moves its group's log Z by at most h / (n_g - 1) and the others' deltas stay
    small; without a dead zone the clamped weights sum to zero per group. Groups with a single
    trajectory give delta = 0 (no signal)."""
    g = batch.groups if groups is None else groups
    if g is None:
        g = torch.zeros(batch.n, dtype=torch.long)
    g = torch.as_tensor(g, dtype=torch.long).cpu()
    s = (batch.log_ratio() - beta * batch.log_r).cpu()
    _, inv = torch.unique(g, return_inverse=True)
    G = int(inv.max()) + 1
    sums = torch.zeros(G, dtype=torch.float64).index_add_(0, inv, s)
    counts = torch.zeros(G, dtype=torch.float64).index_add_(0, inv, torch.ones_like(s))
    log_z = -sums / counts
    if huber > 0:
        log_z = _huber_location(s, inv, G, huber)
    return (s + log_z[inv]).to(batch.log_r.device), log_z


def _huber_location(s: torch.Tensor, inv: torch.Tensor, G: int, h: float) -> torch.Tensor:
    """Per group, L with sum_b clamp(s_b + L, -h, h) = 0: the middle of the set of roots (an interval when
    the group splits into clusters more than 2h apart), by two bisections (the sum is nondecreasing in
    L: -n h at L = -max s - h, +n h at L = -min s + h). A single-trajectory group gets L = -s exactly."""
    lo = -torch.full((G,), float("-inf"), dtype=torch.float64).scatter_reduce(0, inv, s, "amax") - h
    hi = -torch.full((G,), float("inf"), dtype=torch.float64).scatter_reduce(0, inv, s, "amin") + h

    def root(upper: bool) -> torch.Tensor:
        a, b = lo.clone(), hi.clone()
        for _ in range(200):
            mid = 0.5 * (a + b)
            f = torch.zeros(G, dtype=torch.float64).index_add_(0, inv, (s + mid[inv]).clamp(-h, h))
            left = f <= 0 if upper else f < 0
            a, b = torch.where(left, mid, a), torch.where(left, b, mid)
            if bool(((b - a) <= 1e-12 * (1.0 + b.abs())).all()):
                break
        return 0.5 * (a + b)

    out = 0.5 * (root(False) + root(True))
    counts = torch.zeros(G, dtype=torch.float64).index_add_(0, inv, torch.ones_like(s))
    single = torch.zeros(G, dtype=torch.float64).index_add_(0, inv, s)
    return torch.where(counts == 1, -single, out)


def dead_zone_mask(delta: torch.Tensor, dead_zone: float) -> torch.Tensor:
    """1 where delta^2 > dead_zone (the gradient of 1/2 relu(delta^2 - c) is delta there)."""
    if dead_zone <= 0:
        return torch.ones_like(delta)
    return (delta * delta > dead_zone).to(delta.dtype)


def trajectory_weights(delta: torch.Tensor, dead_zone: float = 0.0, huber: float = 0.0) -> torch.Tensor:
    """d rho / d delta per trajectory: delta, zero inside the dead zone, clamped to [-huber, huber] when
    ``huber`` > 0 (nats). The loss's minimiser, every delta equal, does not depend on either."""
    w = delta.double() * dead_zone_mask(delta.double(), dead_zone)
    return w.clamp(-huber, huber) if huber > 0 else w


def trajectory_loss(delta: torch.Tensor, dead_zone: float = 0.0, huber: float = 0.0) -> torch.Tensor:
    """rho(delta_b) per trajectory, float64 (B,): 1/2 relu(min(d^2, h^2) - c) + h relu(|d| - h)
    (h = ``huber``, infinite when 0; c = ``dead_zone``; continuous with slope h beyond |d| = h while h^2 > c)."""
    d = delta.double()
    if huber <= 0:
        return 0.5 * torch.clamp(d * d - dead_zone, min=0.0)
    inner = torch.clamp(torch.clamp(d * d, max=huber * huber) - dead_zone, min=0.0)
    return 0.5 * inner + huber * torch.clamp(d.abs() - huber, min=0.0)


def loss_value(delta: torch.Tensor, dead_zone: float = 0.0, huber: float = 0.0) -> float:
    """mean_b rho(delta_b) (:func:`trajectory_loss`)."""
    return float(trajectory_loss(delta, dead_zone, huber).mean())


# -- gradients --------------------------------------------------------------------------------
def _stack_chunk(batch: RTBBatch, ks: list[int]):
    x = torch.cat([batch.xs[k] for k in ks])
    x_prev = torch.cat([batch.xs[k - 1] for k in ks])
    eps = torch.cat([batch.eps_p[k] for k in ks])
    kk = torch.cat([torch.full((batch.n,), k, dtype=torch.long, device=x.device) for k in ks])
    guide = None if batch.guide.get(ks[0]) is None else torch.cat([batch.guide[k] for k in ks])
    y = None if batch.y is None else batch.y.repeat(len(ks), *([1] * (batch.y.ndim - 1)))
    cond = None if batch.cond is None else batch.cond.repeat(len(ks), *([1] * (batch.cond.ndim - 1)))
    return x, x_prev, eps, kk, guide, y, cond, repeat_problem(batch.problem, len(ks))


def two_pass_backward(posterior, batch: RTBBatch, delta: torch.Tensor, *, chunk_size: int = 8,
                      dead_zone: float = 0.0, huber: float = 0.0, learn_log_z: bool = True,
                      sync_context=None) -> float:
    """Accumulate the exact gradient of mean_b rho(delta_b) into the parameters (pass 2); rho is
    1/2 delta^2 with the optional dead zone and Huber bound (:func:`trajectory_weights`).

    ``delta`` comes from pass 1 (detached, (B,)). Steps k = 2..K are processed ``chunk_size`` at a
    time (stacked into one batch of chunk_size * B), each chunk's graph freed after its backward, so
    activation memory does not grow with K. ``learn_log_z``: add d loss / d log Z = mean(delta)
    once (False for VarGrad, where log Z is not a parameter). ``sync_context(is_last)`` returns a
    context manager (DDP ``no_sync`` for all but the last chunk). Returns the loss value.
    """
    if chunk_size < 1:
        raise ValueError("chunk_size must be >= 1")
    B = batch.n
    w = (trajectory_weights(delta, dead_zone, huber) / B).detach()
    ks = list(range(batch.K, 1, -1))
    chunks = [ks[i:i + chunk_size] for i in range(0, len(ks), chunk_size)]
    ctx = sync_context or (lambda is_last: contextlib.nullcontext())
    for i, ck in enumerate(chunks):
        with ctx(i == len(chunks) - 1):
            x, x_prev, eps, kk, guide, y, cond, problem = _stack_chunk(batch, ck)
            lq = posterior.log_q_step(x, x_prev, kk, eps, y, cond, guide, problem)  # (c*B,)
            surrogate = (lq.reshape(len(ck), B) * w[None, :]).sum()
            surrogate.backward()
    if learn_log_z:
        g = w.sum().to(posterior.log_z.dtype)
        posterior.log_z.grad = g.clone() if posterior.log_z.grad is None else posterior.log_z.grad + g
    return loss_value(delta, dead_zone, huber)


def naive_loss(posterior, batch: RTBBatch, beta: float = 1.0, log_z=None, huber: float = 0.0) -> torch.Tensor:
    """One graph for mean_b rho(log Z + sum log q - sum log p - beta log r), detached states; rho is
    1/2 d^2, or the Huber loss of bound ``huber`` (nats) when it is > 0.

    The reference the two-pass gradient is tested against, and the "naive" arm of the memory
    benchmark. ``log_z``: a tensor (default: the posterior's learnable scalar).
    """
    log_z = posterior.log_z if log_z is None else log_z
    total = 0.0
    for k in range(batch.K, 1, -1):
        kk = torch.full((batch.n,), k, dtype=torch.long, device=batch.xs[k].device)
        lq = posterior.log_q_step(batch.xs[k], batch.xs[k - 1], kk, batch.eps_p[k], batch.y,
                                  batch.cond, batch.guide.get(k), batch.problem)
        total = total + lq - batch.log_p_steps[k]
    delta = log_z + total - beta * batch.log_r
    if huber > 0:
        return torch.nn.functional.huber_loss(delta, torch.zeros_like(delta), delta=huber)
    return 0.5 * (delta ** 2).mean()
