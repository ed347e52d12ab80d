"""Guidance terms for training-free posterior samplers (pure functions, per sample).

Every function works on one chain state ``x`` = x_k of shape (B, *x_shape) at chain index k (2..K for
the reverse transitions) and an observation ``y`` of shape ``y_shape`` or (B, *y_shape). Guidance is
computed **per sample**: norms and solves never mix batch members.

Two forms are returned, and the docstrings say which:

* a **score** ``g ~ grad_{x_k} log p_t(y | x_k)``. It enters the chain as ``eps~ = eps - sqrt(1-abar_k) g``,
  which shifts the reverse mean by ``(b_k / sqrt(a_k)) g`` (:func:`score_to_mean_shift`). A score has
  scale 1 when it is principled (CLA, exact guidance); heuristic methods multiply it by a tuned scale.
* a **mean shift** added directly to the reverse mean of p(x_{k-1} | x_k) (DPS's own convention:
  ``x_{k-1} = mean - zeta grad ||.||``, with no schedule factor).

Linear-Gaussian algebra (CLA, DPS+CLA, FPS) goes through one thin SVD of the whitened operator
``W = Sigma^{-1/2} A`` restricted to unmasked pixels (:class:`LinearGaussianAlgebra`): every covariance
of the form ``beta Sigma + gamma A A^T`` is then diagonal in the basis U, for every t. This is the
exact ``A A^T`` form (no diagonal approximation); at lensing size (d = 64^2) the SVD is one O(d^3) call,
cached per problem.

Nonlinear problems: DPS works (autograd through A). CLA and DPS+CLA need ``A A^T`` and refuse with a
clear :class:`~pipeline.errors.PipelineError` (no silent linearisation).
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch

from pipeline.errors import PipelineError
from pipeline.samplers.reward import RewardProblem


# ----------------------------------------------------------------------------------------------
# conversions between score, eps and mean shifts
# ----------------------------------------------------------------------------------------------
def score_to_mean_shift(chain, k: int, score: torch.Tensor) -> torch.Tensor:
    """Mean shift of p(x_{k-1} | x_k) produced by adding ``score`` to grad log p_t: (b_k/sqrt(a_k)) g."""
    return (float(chain.b[k]) / math.sqrt(float(chain.a[k]))) * score


def score_to_eps_shift(chain, k: int, score: torch.Tensor) -> torch.Tensor:
    """Change of eps for a score ``g``: eps~ = eps + this = eps - sqrt(1 - abar_k) g."""
    return -math.sqrt(1.0 - float(chain.abar[k])) * score


def require_linear(problem, method: str):
    """Refuse methods that need A A^T on a nonlinear operator (one clear line)."""
    if not getattr(problem, "is_linear", False):
        raise PipelineError(
            f"method '{method}' needs a linear inverse problem (A A^T); {type(problem).__name__} is nonlinear "
            f"- use 'dps' or an 'rtb' posterior instead")


def broadcast_y(problem, y: torch.Tensor, n: int, device=None) -> torch.Tensor:
    """Return y as (n, *y_shape): a single observation is broadcast, a batch must have n rows."""
    y = torch.as_tensor(y)
    ys = tuple(problem.y_shape)
    if tuple(y.shape) == ys:
        y = y.unsqueeze(0).expand(n, *ys)
    elif tuple(y.shape[1:]) != ys or y.shape[0] != n:
        raise PipelineError(f"observation y has shape {tuple(y.shape)}; expected {ys} or ({n}, *{ys})")
    return y.to(device) if device is not None else y


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1)


# ----------------------------------------------------------------------------------------------
# linear-Gaussian algebra through one SVD of the whitened operator
# ----------------------------------------------------------------------------------------------
def forward_offset(problem) -> torch.Tensor:
    """b = forward(0), flattened over all pixels (float64, CPU): the constant part of an affine model
    ``forward(x) = A x + b`` (zero for a purely linear operator). Closed-form algebra uses ``y - b``."""
    zero = torch.zeros((1, *problem.x_shape), dtype=torch.float32, device=problem.sigma.device)
    with torch.no_grad():
        return problem.forward(zero).reshape(-1).double().cpu()


class LinearGaussianAlgebra:
    """Thin SVD ``Sigma^{-1/2} A_m = U diag(s) V^T`` of a linear problem on its m unmasked pixels.

    Observations are taken relative to ``forward(0)`` (affine models such as lensing with a brightness
    offset); ``A`` is ``problem.dense_matrix()``, the linear part.

    U: (m, r), s: (r,), V: (d, r) with r = min(m, d), float64 on ``device``. Gives, for any
    (alpha, beta, gamma), the score in x of ``log N(alpha y; A x, beta Sigma + gamma A A^T)``
    without forming an m x m matrix, and the pieces FPS needs. Built from ``problem.dense_matrix()``.
    """

    def __init__(self, problem, device=None):
        require_linear(problem, "linear-Gaussian guidance")
        device = torch.device(device) if device is not None else problem.sigma.device
        M = problem.dense_matrix().double().cpu()  # (m_all, d)
        mask = problem.mask.reshape(-1).cpu()
        sig = problem.sigma.reshape(-1).double().cpu()[mask]
        # an affine forward model A x + b (e.g. lensing's brightness offset): the algebra works on y - b
        self.offset_m = forward_offset(problem)[mask].to(device)
        W = M[mask] / sig[:, None]
        U, s, Vh = torch.linalg.svd(W, full_matrices=False)
        self.device = device
        self.U, self.s, self.V = U.to(device), s.to(device), Vh.T.contiguous().to(device)
        self.mask = mask.to(device)
        self.sigma_m = sig.to(device)
        self.m, self.d = W.shape
        self.r = s.shape[0]
        self.log_sigma_sum = float(torch.log(sig).sum())

    # -- coordinates ----------------------------------------------------------------------------
    def whiten(self, y: torch.Tensor) -> torch.Tensor:
        """Sigma^{-1/2} y on unmasked pixels, (B, m) float64."""
        yf = torch.as_tensor(y).double().to(self.device).reshape(-1, self.mask.numel())
        return (yf[:, self.mask] - self.offset_m) / self.sigma_m

    def project_y(self, y: torch.Tensor):
        """(U^T y~ (B, r), ||y~||^2 (B,)) of whitened observations."""
        yw = self.whiten(y)
        return yw @ self.U, (yw * yw).sum(1)

    def to_v(self, x: torch.Tensor) -> torch.Tensor:
        """V^T x (B, r) for x of shape (B, *x_shape)."""
        return _flat(x).double().to(self.device) @ self.V

    def from_v(self, c: torch.Tensor) -> torch.Tensor:
        """V c (B, d)."""
        return c @ self.V.T

    # -- Gaussian likelihood scores ----------------------------------------------------------------
    def score(self, x: torch.Tensor, yU: torch.Tensor, alpha, beta, gamma) -> torch.Tensor:
        """grad_x log N(alpha y; A x, beta Sigma + gamma A A^T), shape (B, d) float64.

        In the SVD basis: V diag(s / (beta + gamma s^2)) (alpha U^T y~ - s * V^T x). ``yU`` = U^T y~.
        """
        s = self.s
        xv = self.to_v(x)
        coef = s / (beta + gamma * s * s)
        return self.from_v(coef * (alpha * yU - s * xv))

    def log_prob(self, xv: torch.Tensor, yU: torch.Tensor, ynorm2: torch.Tensor, alpha, beta, gamma):
        """log N(alpha y; A x, beta Sigma + gamma A A^T) as a density of y (unwhitened), (B,) float64.

        ``xv`` = V^T x, ``(yU, ynorm2)`` from :meth:`project_y`. Uses A x = Sigma^{1/2} U (s * V^T x), exact
        since the SVD is thin and complete.
        """
        perp2 = (alpha * alpha) * (ynorm2 - (yU * yU).sum(1))
        # the density of alpha*y becomes one of y by m log|alpha|
        return self.log_prob_parts(xv, alpha * yU, perp2, beta, gamma) + self.m * math.log(abs(alpha))

    def log_prob_parts(self, xv: torch.Tensor, zU: torch.Tensor, perp2: torch.Tensor, beta, gamma):
        """log N(z; A x, beta Sigma + gamma A A^T) for a data vector z given by its whitened coordinates:
        ``zU`` = U^T z~ (B, r) and ``perp2`` = squared norm of z~ outside range(U) (B,). Density of z."""
        s = self.s
        rho_u = zU - s * xv
        lam = beta + gamma * s * s
        quad = (rho_u * rho_u / lam).sum(1) + perp2.clamp_min(0.0) / beta
        logdet = torch.log(lam).sum() + (self.m - self.r) * math.log(beta)
        return -0.5 * quad - 0.5 * logdet - 0.5 * self.m * math.log(2 * math.pi) - self.log_sigma_sum


_ALGEBRA_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _fingerprint(problem) -> tuple:
    """Cheap identity of the operator's current state: forward of a fixed probe, sigma and mask."""
    g = torch.Generator().manual_seed(12345)
    probe = torch.randn((1, *problem.x_shape), generator=g).to(problem.sigma.device)
    with torch.no_grad():
        fx = problem.forward(probe).double().cpu()
    return fx, problem.sigma.double().cpu().clone(), problem.mask.cpu().clone()


def _same(a: tuple, b: tuple) -> bool:
    return all(x.shape == y.shape and torch.allclose(x.double(), y.double(), rtol=1e-6, atol=0) for x, y in zip(a, b))


def linear_algebra_for(problem, device=None) -> LinearGaussianAlgebra:
    """Cached :class:`LinearGaussianAlgebra` of ``problem`` (one SVD per problem and device).

    The cache is checked against a fingerprint (operator on a fixed probe, sigma, mask), so a problem that
    is changed in place (e.g. a new brightness scale) gets a fresh SVD rather than a stale one.
    """
    require_linear(problem, "linear-Gaussian guidance")
    device = torch.device(device) if device is not None else problem.sigma.device
    per = _ALGEBRA_CACHE.setdefault(problem, {})
    fp = _fingerprint(problem)
    hit = per.get(str(device))
    if hit is None or not _same(hit[0], fp):
        per[str(device)] = (fp, LinearGaussianAlgebra(problem, device))
    return per[str(device)][1]


# ----------------------------------------------------------------------------------------------
# DPS (Chung et al. 2023) and DPS+CLA, through the network
# ----------------------------------------------------------------------------------------------
@dataclass
class GuidanceOut:
    shift: torch.Tensor  # mean shift of p(x_{k-1} | x_k), same shape/dtype as x
    eps: torch.Tensor    # the prior eps at x (detached), computed on the way
    x0_hat: torch.Tensor  # Tweedie estimate (detached)


def _eps_with_grad(prior, chain, x, k, cond):
    t = torch.full((x.shape[0],), int(chain.t[k]), dtype=torch.long, device=x.device)
    xg = x.detach().requires_grad_(True)
    eps = prior.eps(xg, t, cond)
    x0 = chain.x0_from_eps(xg, eps, k)
    return xg, eps, x0


def dps_residual_norm(problem, x0: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample ||(y - A(x0)) / sigma|| over unmasked pixels, (B,) (differentiable in x0)."""
    sig = problem.sigma.to(x0.device)
    mask = problem.mask.to(x0.device)
    r = (y.to(x0.device, x0.dtype) - problem.forward(x0)) / sig * mask
    return torch.sqrt((_flat(r) ** 2).sum(1) + 1e-30)


def dps_guidance(prior, chain, problem, y, x, k: int, scale: float, cond=None) -> GuidanceOut:
    """DPS mean shift ``-scale * grad_{x_k} ||(y - A(x0_hat(x_k)))/sigma||`` through the eps-network.

    The **unsquared** noise-weighted residual norm, per sample (the DPS code's convention; equivalent
    to zeta_t = zeta / ||r|| on the squared norm). The gradient backpropagates through ``prior.eps``
    (one VJP). Any differentiable operator works, linear or not.
    """
    if isinstance(problem, RewardProblem):
        # a reward of one's own: scale * grad_{x_k} log r(x0_hat(x_k)), its x0-gradient pulled back by one VJP
        with torch.enable_grad():
            xg, eps, x0 = _eps_with_grad(prior, chain, x, k, cond)
            g0 = problem.grad_log_likelihood(x0.detach(), y).to(x0.dtype)
            (g,) = torch.autograd.grad(x0, xg, grad_outputs=g0)
        return GuidanceOut((scale * g).to(x.dtype), eps.detach(), x0.detach())
    with torch.enable_grad():
        xg, eps, x0 = _eps_with_grad(prior, chain, x, k, cond)
        norm = dps_residual_norm(problem, x0, y)
        (g,) = torch.autograd.grad(norm.sum(), xg)  # sum of per-sample norms: gradients do not mix
    return GuidanceOut((-scale * g).to(x.dtype), eps.detach(), x0.detach())


def dps_cla_guidance(prior, chain, problem, y, x, k: int, scale: float, cond=None,
                     algebra: LinearGaussianAlgebra | None = None) -> GuidanceOut:
    """DPS+CLA (PiGDM-like) mean shift: ``scale * (b_k/sqrt(a_k)) * grad_{x_k} log N(y; A x0_hat, Sigma + r_k^2 A A^T)``.

    ``r_k^2 = (1 - abar_k)/abar_k``; the gradient goes through the eps-network (VJP of the closed-form
    x0-gradient). Linear problems only (refuses otherwise). At scale 1 this is a score.
    """
    require_linear(problem, "dps_cla")
    alg = algebra or linear_algebra_for(problem, x.device)
    ab = float(chain.abar[k])
    r2 = (1.0 - ab) / ab
    yU, _ = alg.project_y(y)
    with torch.enable_grad():
        xg, eps, x0 = _eps_with_grad(prior, chain, x, k, cond)
        g0 = alg.score(x0.detach(), yU, 1.0, 1.0, r2).reshape(x0.shape).to(x0.dtype)
        (g,) = torch.autograd.grad(x0, xg, grad_outputs=g0)
    shift = scale * score_to_mean_shift(chain, k, g)
    return GuidanceOut(shift.to(x.dtype), eps.detach(), x0.detach())


# ----------------------------------------------------------------------------------------------
# Frozen-x0_hat (Jacobian-free) variants for RTB+DPS: no network backprop
# ----------------------------------------------------------------------------------------------
def dps_frozen_guidance(chain, problem, y, x0_hat: torch.Tensor, k: int, scale: float) -> torch.Tensor:
    """DPS mean shift with the **frozen prior's** x0_hat, detached, and a Jacobian-free chain rule.

    Approximation: d x0_hat / d x_k ~ I / sqrt(abar_k) (the eps-network's Jacobian is dropped; exact for
    a flat prior). So the shift is ``-scale / sqrt(abar_k) * grad_{x0} ||(y - A(x0))/sigma||`` at
    x0 = x0_hat, which needs only the operator's gradient, not a network backward. RTB's learned
    correction absorbs the difference; ``x0_hat`` comes from the eps cached in the rollout.
    """
    with torch.enable_grad():
        x0 = x0_hat.detach().requires_grad_(True)
        norm = dps_residual_norm(problem, x0, y)
        (g0,) = torch.autograd.grad(norm.sum(), x0)
    return (-scale / math.sqrt(float(chain.abar[k])) * g0).to(x0_hat.dtype)


def dps_cla_frozen_guidance(chain, problem, y, x0_hat: torch.Tensor, k: int, scale: float,
                            algebra: LinearGaussianAlgebra | None = None) -> torch.Tensor:
    """DPS+CLA mean shift with a frozen, detached x0_hat and d x0_hat/d x_k ~ I/sqrt(abar_k).

    ``scale * (b_k/sqrt(a_k)) / sqrt(abar_k) * grad_{x0} log N(y; A x0, Sigma + r_k^2 A A^T)`` at x0_hat.
    Linear problems only.
    """
    require_linear(problem, "rtb_dps_cla")
    alg = algebra or linear_algebra_for(problem, x0_hat.device)
    ab = float(chain.abar[k])
    yU, _ = alg.project_y(y)
    g0 = alg.score(x0_hat, yU, 1.0, 1.0, (1.0 - ab) / ab).reshape(x0_hat.shape)
    return (scale * score_to_mean_shift(chain, k, g0) / math.sqrt(ab)).to(x0_hat.dtype)


# ----------------------------------------------------------------------------------------------
# CLA (Adam et al. 2022) for the VP process: a score, no network
# ----------------------------------------------------------------------------------------------
def cla_score(chain, problem, y, x, k: int, algebra: LinearGaussianAlgebra | None = None) -> torch.Tensor:
    """CLA score ``grad_{x_k} log N(sqrt(abar_k) y; A x_k, abar_k Sigma + (1 - abar_k) A A^T)``.

    The convolved likelihood of Adam et al. 2022 written for the VP process: the noisy state itself
    with a flat-prior covariance; no network evaluation. Scale 1 (it is a score). Linear problems only.
    """
    require_linear(problem, "cla")
    alg = algebra or linear_algebra_for(problem, x.device)
    ab = float(chain.abar[k])
    yU, _ = alg.project_y(y)
    return alg.score(x, yU, math.sqrt(ab), ab, 1.0 - ab).reshape(x.shape).to(x.dtype)


def frozen_guidance_shift(method: str, chain, problem, y, x: torch.Tensor, eps_prior: torch.Tensor,
                          k: int, scale: float) -> torch.Tensor:
    """Mean shift for RTB's guided parameterisations from the state and the cached prior eps.

    ``method`` is ``"dps"`` or ``"dps_cla"``; uses the detached x0_hat of the frozen prior (no backprop).
    """
    x0_hat = chain.x0_from_eps(x, eps_prior, k).detach()
    if hasattr(problem, "map_per_lens"):  # several lenses in one batch: each row under its own operator
        return problem.map_per_lens(y, x0_hat, lambda p, x0, yy: _frozen_shift(method, chain, p, yy, x0, k, scale))
    return _frozen_shift(method, chain, problem, y, x0_hat, k, scale)


def _frozen_shift(method, chain, problem, y, x0_hat, k, scale):
    if method == "dps":
        return dps_frozen_guidance(chain, problem, y, x0_hat, k, scale)
    if method == "dps_cla":
        return dps_cla_frozen_guidance(chain, problem, y, x0_hat, k, scale)
    raise PipelineError(f"unknown frozen guidance {method!r} (dps, dps_cla)")
