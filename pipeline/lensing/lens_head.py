"""q_phi(theta | y) over the support of a lens prior, with exact log-prob.

:class:`LensThetaHead` is a mixture of C product densities, one factor per kind of parameter of a
:class:`~pipeline.lensing.lens_prior.LensPrior`:

* a uniform parameter on [lo, hi] (centre, Einstein radius, axis ratio, slope) gets a normal
  truncated to [lo, hi] (:func:`~pipeline.rtb.joint.truncnorm_log_prob`);
* the position angle phi, when its range is one whole period (pi: an ellipse at phi and phi + pi is
  the same), gets a von Mises density in the angle 2 phi, so that mass near 0 and near pi is one
  mode; on a shorter range it is a truncated normal like the others;
* the shear (g1, g2), whose prior lives on the disc |g| <= gmax, gets a normal in R^2 pushed onto the
  open disc by g = gmax tanh(|u|) u / |u|, with the Jacobian
  |dg/du| = gmax^2 sech^2(|u|) tanh(|u|) / |u| (smooth at u = 0, where it is gmax^2).

Each factor is normalised on the prior's support, so the mixture is, and its support is the
prior's. The network maps an embedding of the observation, (B, embed_dim), to the C components'
parameters; ``log_prob`` is in nats per unit of theta's coordinates (those of ``LensPrior.names``).
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
from torch import nn

from pipeline.lensing.lens_prior import LensPrior
from pipeline.rtb.joint import AdamCosine, truncnorm_log_prob, truncnorm_sample

log = logging.getLogger(__name__)
_LOG_2PI = math.log(2 * math.pi)


def von_mises_log_prob(psi: torch.Tensor, mu: torch.Tensor, kappa: torch.Tensor) -> torch.Tensor:
    """log VM(psi; mu, kappa) = kappa cos(psi - mu) - log(2 pi I0(kappa)), per radian of psi."""
    return kappa * (torch.cos(psi - mu) - 1) - _LOG_2PI - torch.log(torch.special.i0e(kappa))


def von_mises_sample(mu: torch.Tensor, kappa: torch.Tensor, generator=None) -> torch.Tensor:
    """Draws of VM(mu, kappa) in (-pi, pi] around mu (Best and Fisher 1979, vectorised rejection)."""
    kappa = kappa.clamp(min=1e-12)
    root = torch.sqrt(1 + 4 * kappa * kappa)
    tau = 1 + root
    rho = 2 * kappa * tau / ((root + 1) * (tau + torch.sqrt(2 * tau)))  # (tau - sqrt(2 tau)) / (2 kappa), stably
    r = (1 + rho * rho) / (2 * rho)
    out = torch.empty_like(mu)
    todo = torch.ones_like(mu, dtype=torch.bool)
    while bool(todo.any()):
        u1, u2, u3 = (torch.rand(mu.shape, generator=generator, dtype=mu.dtype).to(mu.device) for _ in range(3))
        z = torch.cos(math.pi * u1)
        f = (1 + r * z) / (r + z)
        c = kappa * (r - f)
        ok = todo & ((c * (2 - c) - u2 > 0) | (torch.log(c / u2) + 1 - c >= 0))
        theta = torch.sign(u3 - 0.5) * torch.acos(f.clamp(-1, 1))
        out = torch.where(ok, theta, out)
        todo = todo & ~ok
    return torch.remainder(out + mu + math.pi, 2 * math.pi) - math.pi


def disc_inverse(g: torch.Tensor, gmax: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of u -> g = gmax tanh(|u|) u/|u| (R^2 onto the open disc |g| < gmax) for g (..., 2): u (..., 2)
    and log |det dg/du| (...,) = log(gmax^2 sech^2(|u|) tanh(|u|) / |u|)."""
    rho = torch.linalg.vector_norm(g, dim=-1).clamp(min=1e-300)
    ratio = (rho / gmax).clamp(max=1 - 1e-15)
    r = torch.atanh(ratio)
    u = g * (r / rho).unsqueeze(-1)
    u = torch.where((rho < 1e-12).unsqueeze(-1), g / gmax, u)      # atanh(x)/x -> 1 at the centre
    tanh_over_r = torch.where(r < 1e-6, 1 - r * r / 3, ratio / r.clamp(min=1e-300))
    return u, 2 * math.log(gmax) + torch.log1p(-ratio * ratio) + torch.log(tanh_over_r)


def disc_log_prob(g: torch.Tensor, mean: torch.Tensor, log_s: torch.Tensor, gmax: float) -> torch.Tensor:
    """log-density on the disc |g| < gmax of g = gmax tanh(|u|) u/|u|, u ~ N(mean, diag exp(log_s)^2)
    (g, mean, log_s: (..., 2); returns (...,), per unit^2 of g)."""
    u, log_jac = disc_inverse(g, gmax)
    z = (u - mean) / log_s.exp()
    return (-0.5 * z * z - log_s).sum(-1) - _LOG_2PI - log_jac


def disc_sample(mean: torch.Tensor, log_s: torch.Tensor, gmax: float, generator=None) -> torch.Tensor:
    """Draws (..., 2) of the disc density of :func:`disc_log_prob`."""
    u = mean + log_s.exp() * torch.randn(mean.shape, generator=generator, dtype=mean.dtype).to(mean.device)
    r = torch.linalg.vector_norm(u, dim=-1, keepdim=True)
    # |g| < gmax strictly: tanh rounds to 1 for |u| above about 19, which the prior's open disc would refuse
    scale = torch.where(r < 1e-12, torch.ones_like(r), torch.tanh(r).clamp(max=1 - 1e-15) / r.clamp(min=1e-300))
    return gmax * u * scale


def support_parts(prior: LensPrior) -> tuple[bool, list[str]]:
    """(circular_phi, box_names): whether phi's range is one whole period (pi), so that phi lives on a circle,
    and the parameters that live on an interval [lo, hi] (phi among them when its range is shorter)."""
    box = prior.box
    phi_lo, phi_hi = box.get("phi", (0.0, 0.0))
    circular = "phi" in box and abs((phi_hi - phi_lo) - math.pi) < 1e-9
    return circular, [k for k in box if not (k == "phi" and circular)]


def pick_components(log_w: torch.Tensor, generator=None) -> tuple[torch.Tensor, torch.Tensor]:
    """One mixture component per row drawn from the log-weights log_w (B, C): (rows (B,), components (B,))."""
    c = torch.multinomial(log_w.exp().cpu(), 1, generator=generator)[:, 0].to(log_w.device)
    return torch.arange(log_w.shape[0], device=log_w.device), c


def _logit_within(value: float, bounds: tuple[float, float]) -> float:
    """The pre-activation x with lo + (hi - lo) sigmoid(x) = value."""
    u = (value - bounds[0]) / (bounds[1] - bounds[0])
    return math.log(u / (1 - u))


class LensThetaHead(nn.Module):
    """q_phi(theta | h): a C-component mixture of product densities over ``prior``'s support (see the
    module docstring), its parameters an MLP of the observation's embedding h (B, embed_dim).

    The truncated normals' means lie inside their box (so no box edge is further than the box width from
    a mean, and the inverse-CDF sampler stays accurate at any std down to ``min_std_frac`` x the width),
    their stds in [``min_std_frac``, 2] x the width; the von Mises concentration in [0, ``max_kappa``]; the shear's
    normal has mean in [-3, 3]^2 and std in [0.01, 2] in u-space. At initialisation the components are
    broad (std half the width, phi uniform, the shear's u ~ N(0, I)) and spread over the box."""

    def __init__(self, prior: LensPrior, embed_dim: int, components: int = 4, hidden: int = 128,
                 min_std_frac: float = 1e-3, max_kappa: float = 1e4):
        super().__init__()
        self.prior, self.C = prior, components
        box = prior.box
        self.circular_phi, self.box_names = support_parts(prior)
        self.register_buffer("lo", torch.tensor([box[k][0] for k in self.box_names], dtype=torch.float64))
        self.register_buffer("hi", torch.tensor([box[k][1] for k in self.box_names], dtype=torch.float64))
        self.col = {k: i for i, k in enumerate(prior.names)}
        self.log_s_range = (math.log(min_std_frac), math.log(2.0))
        self.max_kappa = max_kappa
        nb = len(self.box_names)
        self.sizes = [2 * nb, 2 if self.circular_phi else 0, 4 if prior.has_shear else 0, 1]
        self.net = nn.Sequential(nn.Linear(embed_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, components * sum(self.sizes))).double()
        nn.init.zeros_(self.net[-1].weight)
        with torch.no_grad():
            bias = self.net[-1].bias.view(components, sum(self.sizes))
            bias.zero_()
            bias[:, :nb] = torch.linspace(-0.5, 0.5, components)[:, None]      # spread over the box,
            bias[:, nb:2 * nb] = _logit_within(math.log(0.5), self.log_s_range)  # std half the width
            if self.circular_phi:
                bias[:, 2 * nb] = torch.linspace(-math.pi, math.pi, components + 1)[:-1]
                bias[:, 2 * nb + 1] = -6.0                                         # kappa ~ 0: uniform
            if prior.has_shear:                                                    # u ~ N(0, I): broad
                bias[:, -3:-1] = _logit_within(0.0, (math.log(0.01), math.log(2.0)))

    def raw(self, h: torch.Tensor) -> torch.Tensor:
        """The network's output for embeddings h (B, embed_dim): (B, C * per-component size), unconstrained.
        :meth:`params` maps it to the mixture; :func:`refine` optimises it per observation."""
        return self.net(h.double())

    def params(self, h: torch.Tensor | None = None, raw: torch.Tensor | None = None) -> dict:
        """The mixture's parameters for embeddings h, or for given ``raw`` outputs (:meth:`raw`), not both."""
        if (h is None) == (raw is None):
            raise ValueError("give the embeddings h or the raw outputs, not both or neither")
        if raw is not None and raw.shape[-1] != self.C * sum(self.sizes):
            raise ValueError(f"raw outputs must have {self.C * sum(self.sizes)} columns, got {raw.shape[-1]}")
        out = (self.raw(h) if raw is None else raw).reshape(-1, self.C, sum(self.sizes))
        parts = torch.split(out, self.sizes, dim=-1)
        nb, p = len(self.box_names), {}
        width = self.hi - self.lo
        lo_s, hi_s = self.log_s_range
        p["mean"] = 0.5 * (self.lo + self.hi) + 0.5 * width * torch.tanh(parts[0][..., :nb])
        p["log_s"] = lo_s + (hi_s - lo_s) * torch.sigmoid(parts[0][..., nb:]) + torch.log(width)
        if self.circular_phi:
            p["mu"] = parts[1][..., 0]
            p["kappa"] = self.max_kappa * torch.sigmoid(parts[1][..., 1] - math.log(self.max_kappa))
        if self.prior.has_shear:
            p["g_mean"] = 3 * torch.tanh(parts[2][..., :2])
            p["g_log_s"] = math.log(0.01) + (math.log(2.0) - math.log(0.01)) * torch.sigmoid(parts[2][..., 2:])
        p["log_w"] = torch.log_softmax(parts[3][..., 0], -1)
        return p

    def _phi_origin(self) -> float:
        return self.prior.box["phi"][0]

    def log_prob(self, theta: torch.Tensor, h: torch.Tensor | None = None, raw: torch.Tensor | None = None
                 ) -> torch.Tensor:
        """log q(theta | h) (or given ``raw``: :meth:`params`), (B,); -inf outside the prior's support."""
        theta = theta.double()
        p = self.params(h, raw)
        idx = [self.col[k] for k in self.box_names]
        lp = truncnorm_log_prob(theta[:, None, idx], p["mean"], p["log_s"], self.lo, self.hi).sum(-1)
        if self.circular_phi:  # psi = 2 (phi - phi_lo) in [0, 2 pi]; density in phi is 2 VM(psi)
            psi = 2 * (theta[:, None, self.col["phi"]] - self._phi_origin())
            lp = lp + von_mises_log_prob(psi, p["mu"], p["kappa"]) + math.log(2.0)
        if self.prior.has_shear:
            g = theta[:, None, -2:]
            lp = lp + disc_log_prob(g, p["g_mean"], p["g_log_s"], self.prior.config.shear_max)
        lp = torch.logsumexp(p["log_w"] + lp, -1)
        return torch.where(torch.isfinite(self.prior.log_prob(theta)), lp,
                           torch.tensor(-math.inf, dtype=lp.dtype, device=lp.device))

    @torch.no_grad()
    def sample(self, h: torch.Tensor | None = None, generator=None, raw: torch.Tensor | None = None,
               widen: float = 1.0) -> torch.Tensor:
        """One theta per row of h (or of ``raw``), (B, dim), in the columns of ``prior.names``.

        ``widen`` >= 1 draws from a broader density for exploration (each component's stds times widen, the
        shear's in its u-space, which piles mass towards |g| = gmax; its von Mises concentration over
        widen^2); :meth:`log_prob` stays that of the head itself."""
        if widen < 1:
            raise ValueError(f"widen must be >= 1, got {widen}")
        p = self.params(h, raw)
        B, dev = p["log_w"].shape[0], p["log_w"].device
        rows, c = pick_components(p["log_w"], generator)
        lw = math.log(widen)
        theta = torch.empty(B, self.prior.dim, dtype=torch.float64, device=dev)
        idx = [self.col[k] for k in self.box_names]
        theta[:, idx] = truncnorm_sample(p["mean"][rows, c], p["log_s"][rows, c] + lw, self.lo, self.hi, generator)
        if self.circular_phi:
            psi = von_mises_sample(p["mu"][rows, c], p["kappa"][rows, c] / widen ** 2, generator)
            theta[:, self.col["phi"]] = self._phi_origin() + torch.remainder(psi, 2 * math.pi) / 2
        if self.prior.has_shear:
            theta[:, -2:] = disc_sample(p["g_mean"][rows, c], p["g_log_s"][rows, c] + lw,
                                        self.prior.config.shear_max, generator)
        return theta


def vargrad_loss(log_q: torch.Tensor, log_target: torch.Tensor, groups: int) -> torch.Tensor:
    """Per observation, the mean of 1/2 delta^2 over its group of draws, (groups,): delta = log q - log target
    less its group mean (VarGrad's log Z; detached, which leaves the gradient unchanged). log_q and log_target
    (groups * n,) are ordered group by group; only log_q carries gradients."""
    delta = (log_q - log_target).view(groups, -1)
    delta = delta - delta.mean(1, keepdim=True).detach()
    return 0.5 * (delta ** 2).mean(1)


def refine(head: LensThetaHead, h: torch.Tensor, log_likelihood, *, steps: int, group_size: int = 16,
           lr: float = 0.05, widen: float = 1.0, beta0: float = 1.0, seed: int = 0, raw: torch.Tensor | None = None):
    """Fit q(theta | y) to each of G observations on its own, starting from the amortized head.

    The free parameters are the head's outputs (:meth:`LensThetaHead.raw`) for the embeddings h (G, embed_dim),
    or ``raw`` (G, R) to continue a refinement; the network itself is not changed. The loss is the one joint
    RTB trains the head with: per observation, 1/2 delta^2 over ``group_size`` draws of theta, with
    delta = log q(theta | y) - log p(theta) - beta log p(y | theta) less its group mean (VarGrad log Z),
    summed over the observations, so that each observation's parameters see only their own loss.
    ``log_likelihood(theta (N, p), rows (N,) int64) -> (N,)`` returns log p(y_row | theta) in nats, up to a
    constant per observation (called without gradients); log p(theta) is ``head.prior``'s.

    Two ways out of a local optimum of a fit started in the wrong place, both over the first half of the
    steps and both gone in the second half, where the fit is plain on-policy RTB to the posterior:

    * tempering: beta rises geometrically from ``beta0`` to 1, so that early targets are broad posteriors
      that keep every mode within reach of q (annealed variational inference);
    * widened draws: theta drawn from the head widened by a factor that falls linearly from ``widen`` to 1
      (off-policy exploration, :meth:`LensThetaHead.sample`).

    Adam with cosine decay, ``lr`` on the raw outputs. The optimisation is per observation; the random draws
    share one generator (``seed``). Returns (raw (G, R) detached, losses (steps, G): each observation's mean
    1/2 delta^2 per step, at that step's beta and, in the first half, on the widened draws)."""
    if not 0 < beta0 <= 1 or widen < 1:
        raise ValueError(f"refine needs 0 < beta0 <= 1 and widen >= 1, got beta0 {beta0}, widen {widen}")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        start = head.raw(h) if raw is None else raw.double()
    free = start.clone().requires_grad_(True)
    optim = AdamCosine([free], lr, steps, clip=None)
    G = free.shape[0]
    rows = torch.arange(G).repeat_interleave(group_size)
    losses = []
    for step in range(steps):
        early = max(0.0, 1 - 2 * step / max(1, steps))          # 1 at the start, 0 from half-way on
        beta = beta0 ** early
        theta = head.sample(raw=free.detach()[rows], generator=gen, widen=1 + (widen - 1) * early)
        with torch.no_grad():
            target = head.prior.log_prob(theta) + beta * log_likelihood(theta, rows)
        loss = vargrad_loss(head.log_prob(theta, raw=free[rows]), target, G)
        optim.step(loss.sum())
        losses.append(loss.detach().cpu().numpy())
        if (step + 1) % max(1, steps // 10) == 0:
            log.info("refine step %d/%d: median over %d observations of 1/2 delta^2 %.3f", step + 1, steps, G,
                     float(np.median(np.mean(losses[-max(1, steps // 10):], 0))))
    return free.detach(), np.array(losses).reshape(steps, G)


def importance_check(head: LensThetaHead, raw: torch.Tensor, log_likelihood, *, n: int = 256, seed: int = 0,
                     min_ess_fraction: float = 0.5) -> dict:
    """How well q(theta | y) (the head outputs ``raw``, (G, R)) matches each observation's posterior, from n
    draws of q per observation and their log importance weights log w = log p(theta) + log p(y | theta) -
    log q(theta | y) (``log_likelihood`` as for :func:`refine`, a constant per observation allowed).

    Returns numpy arrays over the G observations:

    * ``ess_fraction``: Kish's effective sample size over n, (sum w)^2 / (n sum w^2), in [1/n, 1]; 1 when q
      equals the posterior, about exp(-s^2) for log-normal weights of log-sd s;
    * ``log_z``: the importance-weighted log evidence, log mean w (nats, up to ``log_likelihood``'s
      constant), a lower bound in expectation;
    * ``log_w_sd``: the sd of log w (nats; 0 for an exact q);
    * ``flagged``: ``ess_fraction < min_ess_fraction`` or not a number, a fit not to be trusted.

    Weights can only judge where q draws: a posterior mode that q never visits leaves them untouched, so a
    passing observation is not proof that q found every mode."""
    if n < 2 or not 0 < min_ess_fraction <= 1:
        raise ValueError(f"importance_check needs n >= 2 and 0 < min_ess_fraction <= 1, got {n}, {min_ess_fraction}")
    gen = torch.Generator().manual_seed(seed)
    G = raw.shape[0]
    rows = torch.arange(G).repeat_interleave(n)
    with torch.no_grad():
        theta = head.sample(raw=raw[rows], generator=gen)
        log_w = (head.prior.log_prob(theta) + log_likelihood(theta, rows) - head.log_prob(theta, raw=raw[rows]))
        log_w = log_w.view(G, n).double()
    log_z = torch.logsumexp(log_w, 1) - math.log(n)
    ess = torch.exp(2 * torch.logsumexp(log_w, 1) - torch.logsumexp(2 * log_w, 1)) / n
    return {"ess_fraction": ess.cpu().numpy(), "log_z": log_z.cpu().numpy(), "log_w_sd": log_w.std(1).cpu().numpy(),
            "flagged": (~(ess >= min_ess_fraction)).cpu().numpy()}          # NaN weights are flagged too
