"""q_phi(theta | y) with correlations: a mixture of full-covariance normals mapped onto the lens prior's support.

Lens parameters are strongly correlated in their posterior (the axis ratio and the external shear trade
off, and so do the position angle and the shear's direction: correlations of 0.8-0.95 at a peak SNR of 8),
which a mixture of product densities (:class:`~pipeline.lensing.lens_head.LensThetaHead`) can only follow
with many components; fitted by RTB's objective it keeps each parameter's conditional spread instead,
too narrow by sqrt(1 - rho^2). :class:`CorrelatedLensHead` draws u ~ N(mu_c, L_c L_c^T) in R^p and maps it
by a fixed bijection T onto the prior's support:

* u_0 = phi - phi_lo wrapped onto one period, when phi's range is one whole period (pi); the density of
  phi is the wrapped normal, a sum over the shifts u_0 + k pi (k = -4..4, missing about 1e-9 of the mass at most, because the
  sd of u_0 is at most pi / 2 and its mean lies in [0, pi));
* a uniform parameter on [lo, hi] (centre, Einstein radius, axis ratio, slope, and phi on a shorter
  range) is lo + (hi - lo) sigmoid(u_i);
* the shear (g1, g2) is gmax tanh(|u|) u / |u| on its 2-vector (:func:`~pipeline.lensing.lens_head.disc_inverse`).

log q(theta) = log sum_c w_c N(T^-1(theta); mu_c, Sigma_c) - log |det dT/du|, in nats per unit of theta's
coordinates (those of ``LensPrior.names``). Sigma_c = L_c L_c^T with L_c = diag(s) C: s the marginal sds
(bounded, so that no draw reaches where a map onto the support rounds to its edge) and C the lower
Cholesky factor of a correlation matrix, its row i (a_i1, ..., a_i,i-1, 1) over that row's norm, so the
a_ij set the correlations whatever the scales (phi's coordinate comes first). Same interface as ``LensThetaHead`` (``raw``, ``params``, ``log_prob``, ``sample``), so
:func:`~pipeline.lensing.lens_head.refine` and :func:`~pipeline.lensing.lens_head.importance_check` take it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pipeline.lensing.lens_head import LensThetaHead, disc_inverse, pick_components, support_parts
from pipeline.lensing.lens_prior import LensPrior

_WRAPS = torch.arange(-4, 5, dtype=torch.float64)


class CorrelatedLensHead(nn.Module):
    """q_phi(theta | h): C full-covariance normal components in u-space, mapped onto ``prior``'s support (see
    the module docstring); their parameters are an MLP of the observation's embedding h (B, embed_dim).

    Bounds in u-space: the uniform coordinates' means in [-10, 10] (logits), phi's in [0, pi) (its raw value
    modulo pi, so that a mean can move across the period's ends), the shear's
    in [-3, 3]; the marginal sds s in [``min_d``, 3] (uniform coordinates), [``min_d``, 2] (shear) and
    [``min_d``, pi / 2] (phi), so that draws stay where the maps onto the support are not saturated; the
    a_ij in [-30, 30]. At
    initialisation the components are broad (d = 1, phi's pi / 2, no correlation) and spread over the box."""

    def __init__(self, prior: LensPrior, embed_dim: int, components: int = 4, hidden: int = 128,
                 min_d: float = 1e-4):
        super().__init__()
        self.prior, self.C = prior, components
        box = prior.box
        self.circular_phi, self.box_names = support_parts(prior)
        self.col = {k: i for i, k in enumerate(prior.names)}
        order = (["phi"] if self.circular_phi else []) + self.box_names + (["g1", "g2"] if prior.has_shear else [])
        self.register_buffer("cols", torch.tensor([self.col[k] for k in order]))   # u coordinate i -> theta column
        self.p, self.n_phi, self.nb = len(order), int(self.circular_phi), len(self.box_names)
        self.register_buffer("lo", torch.tensor([box[k][0] for k in self.box_names], dtype=torch.float64))
        self.register_buffer("hi", torch.tensor([box[k][1] for k in self.box_names], dtype=torch.float64))
        self.log_d_lo = math.log(min_d)
        self.log_d_hi = torch.tensor([math.log(math.pi / 2)] * self.n_phi + [math.log(3.0)] * self.nb
                                     + [math.log(2.0)] * (self.p - self.n_phi - self.nb), dtype=torch.float64)
        self.tril = torch.tril_indices(self.p, self.p, -1)
        self.size = 2 * self.p + self.tril.shape[1] + 1
        self.net = nn.Sequential(nn.Linear(embed_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, components * self.size)).double()
        nn.init.zeros_(self.net[-1].weight)
        with torch.no_grad():
            bias = self.net[-1].bias.view(components, self.size)
            bias.zero_()
            spread = torch.linspace(-1.0, 1.0, components)[:, None]
            bias[:, self.n_phi:self.n_phi + self.nb] = spread                  # box means at logits -1..1
            if self.circular_phi:
                bias[:, 0] = math.pi * (torch.arange(components) + 0.5) / components     # phi spread on its period
            d0 = torch.tensor([math.pi / 2] * self.n_phi + [1.0] * (self.p - self.n_phi), dtype=torch.float64)
            bias[:, self.p:2 * self.p] = torch.logit((d0.log() - self.log_d_lo) / (self.log_d_hi - self.log_d_lo)
                                                     ).clamp(-8, 8)

    def raw(self, h: torch.Tensor) -> torch.Tensor:
        """The network's output for embeddings h (B, embed_dim): (B, C * per-component size), unconstrained."""
        return self.net(h.double())

    def params(self, h: torch.Tensor | None = None, raw: torch.Tensor | None = None) -> dict:
        """Mixture parameters for embeddings h, or for ``raw`` outputs (:meth:`raw`), not both: ``mean`` (B, C, p),
        ``scale_tril`` (B, C, p, p), ``log_w`` (B, C), in u-space (coordinates in the order of ``cols``)."""
        if (h is None) == (raw is None):
            raise ValueError("give the embeddings h or the raw outputs, not both or neither")
        if raw is not None and raw.shape[-1] != self.C * self.size:
            raise ValueError(f"raw outputs must have {self.C * self.size} columns, got {raw.shape[-1]}")
        out = (self.raw(h) if raw is None else raw.double()).reshape(-1, self.C, self.size)
        p, n_phi = self.p, self.n_phi
        m = out[..., :p]
        mean = torch.cat([torch.remainder(m[..., :n_phi], math.pi), 10 * torch.tanh(m[..., n_phi:n_phi + self.nb] / 10),
                          3 * torch.tanh(m[..., n_phi + self.nb:])], -1)
        hi = self.log_d_hi.to(out.device)
        log_d = self.log_d_lo + (hi - self.log_d_lo) * torch.sigmoid(out[..., p:2 * p])
        # L = diag(s) C, C the Cholesky factor of a correlation matrix: row i is (a_i1, ..., a_i,i-1, 1) / its norm
        C = torch.diag_embed(torch.ones_like(log_d))
        C[..., self.tril[0], self.tril[1]] = 30 * torch.tanh(out[..., 2 * p:-1] / 30)
        L = log_d.exp().unsqueeze(-1) * C / torch.linalg.vector_norm(C, dim=-1, keepdim=True)
        return {"mean": mean, "scale_tril": L, "log_w": torch.log_softmax(out[..., -1], -1)}

    def _to_u(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """T^-1(theta) (B, p) with phi's coordinate in [0, pi), and log |det dT/du| there (B,)."""
        t = theta[:, self.cols]
        parts, log_jac = [], torch.zeros(t.shape[0], dtype=torch.float64, device=t.device)
        if self.circular_phi:
            parts.append(torch.remainder(t[:, :1] - self.prior.box["phi"][0], math.pi))
        s = ((t[:, self.n_phi:self.n_phi + self.nb] - self.lo) / (self.hi - self.lo)).clamp(1e-300, 1 - 1e-16)
        parts.append(torch.log(s) - torch.log1p(-s))
        log_jac = log_jac + (torch.log(self.hi - self.lo) + torch.log(s) + torch.log1p(-s)).sum(-1)
        if self.prior.has_shear:
            u_g, lj = disc_inverse(t[:, -2:], self.prior.config.shear_max)
            parts.append(u_g)
            log_jac = log_jac + lj
        return torch.cat(parts, -1), log_jac

    def _from_u(self, u: torch.Tensor) -> torch.Tensor:
        """T(u): theta (B, dim) in the columns of ``prior.names`` for u (B, p) in the order of ``cols``."""
        theta = torch.empty(u.shape[0], self.prior.dim, dtype=torch.float64, device=u.device)
        t = []
        if self.circular_phi:
            lo, hi = self.prior.box["phi"]
            t.append((lo + torch.remainder(u[:, :1], math.pi)).clamp(lo, hi))
        # sigmoid rounds to 1 for u above ~37, and lo + (hi - lo) * 1 can exceed hi by one ulp: keep [lo, hi]
        box = self.lo + (self.hi - self.lo) * torch.sigmoid(u[:, self.n_phi:self.n_phi + self.nb])
        t.append(torch.minimum(torch.maximum(box, self.lo), self.hi))
        if self.prior.has_shear:
            ug = u[:, -2:]
            r = torch.linalg.vector_norm(ug, dim=-1, keepdim=True)
            scale = torch.where(r < 1e-12, torch.ones_like(r), torch.tanh(r).clamp(max=1 - 1e-15) / r.clamp(min=1e-300))
            t.append(self.prior.config.shear_max * ug * scale)
        theta[:, self.cols] = torch.cat(t, -1)
        return theta

    def log_prob(self, theta: torch.Tensor, h: torch.Tensor | None = None, raw: torch.Tensor | None = None
                 ) -> torch.Tensor:
        """log q(theta | h) (or given ``raw``), (B,); -inf outside the prior's support."""
        theta = theta.double()
        q = self.params(h, raw)
        u, log_jac = self._to_u(theta)
        L = q["scale_tril"]                                                                  # (B, C, p, p)
        z = torch.linalg.solve_triangular(L, (u[:, None, :] - q["mean"]).unsqueeze(-1), upper=False)[..., 0]
        z = z[:, None]                                                                       # (B, 1, C, p)
        if self.circular_phi:   # phi's coordinate shifted by k pi moves z by k pi L^-1 e_0
            e0 = torch.zeros_like(q["mean"])
            e0[..., 0] = math.pi
            step = torch.linalg.solve_triangular(L, e0.unsqueeze(-1), upper=False)[..., 0]  # (B, C, p)
            z = z + _WRAPS.to(u.device)[None, :, None, None] * step[:, None]                  # (B, 9, C, p)
        log_det = torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)                    # (B, C)
        log_n = -0.5 * (z * z).sum(-1) - log_det[:, None] - 0.5 * self.p * math.log(2 * math.pi)
        lp = torch.logsumexp(q["log_w"][:, None] + log_n, dim=(1, 2)) - log_jac
        return torch.where(torch.isfinite(self.prior.log_prob(theta)), lp,
                           torch.tensor(-math.inf, dtype=lp.dtype, device=lp.device))

    @torch.no_grad()
    def sample(self, h: torch.Tensor | None = None, generator=None, raw: torch.Tensor | None = None,
               widen: float = 1.0) -> torch.Tensor:
        """One theta per row of h (or of ``raw``), (B, dim), in the columns of ``prior.names``; ``widen`` >= 1
        draws with every component's L times widen (exploration; :meth:`log_prob` stays the head's own)."""
        if widen < 1:
            raise ValueError(f"widen must be >= 1, got {widen}")
        q = self.params(h, raw)
        rows, c = pick_components(q["log_w"], generator)
        eps = torch.randn(len(rows), self.p, generator=generator, dtype=torch.float64).to(rows.device)
        u = q["mean"][rows, c] + widen * (q["scale_tril"][rows, c] @ eps.unsqueeze(-1))[..., 0]
        return self._from_u(u)


def make_head(kind: str, prior: LensPrior, embed_dim: int, **kw) -> nn.Module:
    """``product``: :class:`~pipeline.lensing.lens_head.LensThetaHead`; ``correlated``: :class:`CorrelatedLensHead`."""
    heads = {"product": LensThetaHead, "correlated": CorrelatedLensHead}
    if kind not in heads:
        raise ValueError(f"lens head must be one of {sorted(heads)}, got {kind!r}")
    return heads[kind](prior, embed_dim, **kw)


def raw_from_gaussian(head: CorrelatedLensHead, mean: torch.Tensor, cov: torch.Tensor, spread: float = 0.1
                      ) -> torch.Tensor:
    """Head outputs (G, C * size) whose mixture is, up to ``spread``, the normal N(mean, cov) in u-space
    (coordinates in the order of ``head.cols``; ``mean`` (G, p), ``cov`` (G, p, p) positive semi-definite:
    1e-9 is added to its correlation matrix's diagonal before the Cholesky factorisation).

    The inverse of :meth:`CorrelatedLensHead.params` within the head's bounds (module docstring), to which
    larger values are clipped: means, sds, and the a_ij (|a| < 29.97, so correlations past about 0.9994 come
    back weaker); phi's mean is taken modulo pi. Every component gets the same covariance and equal weight,
    its mean moved by ``spread`` L z_c (L the clipped covariance's Cholesky factor, z_c a fixed standard
    normal draw per component), a Mahalanobis distance of about ``spread`` sqrt(p), so that a later fit can
    pull the components apart (identical components would get identical gradients forever)."""
    mean, cov = mean.double(), cov.double()
    G, p, C = mean.shape[0], head.p, head.C
    sd = torch.diagonal(cov, dim1=-2, dim2=-1).clamp(min=1e-300).sqrt()
    R = cov / (sd[:, :, None] * sd[:, None, :])
    Lr = torch.linalg.cholesky(R + 1e-9 * torch.eye(p, dtype=R.dtype, device=R.device))
    Lr = Lr / torch.linalg.vector_norm(Lr, dim=-1, keepdim=True)                 # rows of unit norm
    a = (30 * torch.atanh((Lr / torch.diagonal(Lr, dim1=-2, dim2=-1)[:, :, None] / 30).clamp(-0.999, 0.999)))
    hi = head.log_d_hi.to(mean.device)
    frac = ((sd.log() - head.log_d_lo) / (hi - head.log_d_lo)).clamp(1e-6, 1 - 1e-6)
    s = (head.log_d_lo + (hi - head.log_d_lo) * frac).exp()                     # the sds, clipped
    z = torch.randn(C, p, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(mean.device)
    m = mean[:, None, :] + spread * torch.einsum("gij,cj->gci", s[:, :, None] * Lr, z)
    n_phi, nb = head.n_phi, head.nb
    raw_mean = torch.cat([torch.remainder(m[..., :n_phi], math.pi),
                          10 * torch.atanh((m[..., n_phi:n_phi + nb] / 10).clamp(-0.999, 0.999)),
                          torch.atanh((m[..., n_phi + nb:] / 3).clamp(-0.999, 0.999))], -1)
    raw = torch.cat([raw_mean, frac.logit()[:, None].expand(G, C, p),
                     a[:, head.tril[0], head.tril[1]][:, None].expand(G, C, head.tril.shape[1]),
                     torch.zeros(G, C, 1, dtype=torch.float64, device=mean.device)], -1)
    return raw.reshape(G, C * head.size)


def weighted_moments(head: CorrelatedLensHead, theta: torch.Tensor, w: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted mean (G, p) and covariance (G, p, p) in u-space of theta (G, n, dim) with normalised weights
    w (G, n); phi's coordinate is unwrapped around its weighted circular mean (period pi) first."""
    G, n = w.shape
    u = head._to_u(theta.reshape(G * n, -1))[0].view(G, n, head.p)
    if head.circular_phi:
        ang = 2 * u[..., 0]
        centre = torch.atan2((w * ang.sin()).sum(1), (w * ang.cos()).sum(1)) / 2               # (G,)
        u = u.clone()
        u[..., 0] = centre[:, None] + torch.remainder(u[..., 0] - centre[:, None] + math.pi / 2, math.pi) - math.pi / 2
    mean = (w[..., None] * u).sum(1)
    d = u - mean[:, None]
    return mean, torch.einsum("gn,gni,gnj->gij", w, d, d)
