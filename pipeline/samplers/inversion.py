"""``inversion``: the classic regularised pixelated linear inversion (Warren & Dye 2003; Suyu et al. 2006).

No diffusion prior: the source on the problem's own pixel grid (network units, like every sampler) gets a
zero-mean Gaussian prior with the PROPER precision

    P = lam_g R + lam_0 I,

``R = D^T D`` with ``D`` the first differences of horizontally and vertically adjacent pixels
(``regularisation="gradient"``) or the second differences ``x[i-1] - 2 x[i] + x[i+1]`` along rows and
columns (``"curvature"``); ``lam_0 I`` makes the prior full rank, so the evidence is defined. ``lam_g``
and ``lam_0`` are in 1 / (network unit)^2.

The likelihood is the problem's own fully normalised Gaussian over the m unmasked pixels (affine models
``forward(x) = A x + b`` use ``y - b``). With ``N = diag(sigma^2)``, ``F = A^T N^-1 A``, ``C = F + P`` and
``mu = C^-1 A^T N^-1 (y - b)`` the posterior is ``N(mu, C^-1)`` and the log evidence (nats, float64) is

    log Z = -1/2 (y-b)^T N^-1 (y-b) + 1/2 mu^T C mu + 1/2 log det P - 1/2 log det C
            - sum log sigma - m/2 log 2 pi.

Hyperparameters. The hyperprior is uniform in (log10 lam_g, log10 lam_0) on the rectangle ``lam_g_range``
x ``lam_0_range`` (decades). For one lam_g, one tridiagonal reduction ``F + lam_g R = Q T Q^T`` gives
log Z for every lam_0 in O(d) (``L D L^T`` of ``T + lam_0 I``; ``log det P`` from the eigenvalues of R), so
lam_0 is scanned on a fine grid (``LAM0_STEP`` dex) and lam_g on a grid that starts at ``LAM_G_STEP`` dex
and is halved around the best lam_g until the estimates settle, then refined by one parabolic step.

* ``type2``: log Z at the evidence-maximising (lam_g, lam_0), a type-II maximum likelihood, optimistic by
  about the Occam factor of the two tuned hyperparameters;
* ``marginal``: log of the integral of Z over the hyperprior (log Z interpolated linearly between the grid
  points in both directions), the evidence of the model with the hyperparameters marginalised. It is the value
  returned as ``info["logz"]["elbo"]`` and ``["iw"]`` (exact, so ``elbo_se`` is 0), the number comparable
  with the other methods' log Z under a stated hyperprior.

Samples are exact draws ``mu + L^-T z`` from the posterior at the evidence-maximising hyperparameters
(``L L^T = C``). Cost per observation: forming F (one (d, m) x (m, d) product) and one O(d^3)
tridiagonal reduction per evaluated lam_g (7 to 14 of them on the demo lenses): about 2 s at d = 1024 on one CPU thread.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from scipy.linalg import lapack
from threadpoolctl import threadpool_limits

from pipeline.errors import PipelineError
from pipeline.samplers.base import Sampler, Samples
from pipeline.samplers.exact_guidance import _dense_masked
from pipeline.samplers.guidance import broadcast_y, require_linear

log = logging.getLogger(__name__)

LOG_2PI = math.log(2.0 * math.pi)
REGULARISATIONS = ("gradient", "curvature")
LAM0_STEP = 0.02       # dex: the lam_0 grid (every lam_g evaluation gives all of it at O(d) per value)
LAM_G_STEP = 3.0       # dex: the first lam_g grid, halved around the maximum down to LAM_G_MIN_STEP
LAM_G_MIN_STEP = 0.125
SETTLE = 0.02          # nats: stop halving when type-II and marginal log Z move less than this


def source_grid(problem) -> tuple[int, ...]:
    """The pixel grid the regularisation acts on: (ny, nx) for an image source, (d,) for a 1-D vector."""
    d = math.prod(problem.x_shape)
    n = getattr(problem, "source_npix", None)
    if n and n * n == d:
        return (int(n), int(n))
    shape = tuple(int(s) for s in problem.x_shape if s != 1)
    if len(shape) > 2:
        raise PipelineError(f"method 'inversion' regularises one 1-D or 2-D grid; x_shape {problem.x_shape} has "
                            f"several channels")
    return shape or (d,)


@functools.lru_cache(maxsize=4)
def regularisation_matrix(grid: tuple[int, ...], kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(R = D^T D (d, d), eigenvalues of R (d,) clipped at 0), float64, for ``kind`` on ``grid``.

    ``gradient``: one row of D per pair of adjacent pixels (x[j] - x[i]); ``curvature``: one row per
    interior pixel and axis (x[i-1] - 2 x[i] + x[i+1]). No wrap-around; pixels are dimensionless steps."""
    if kind not in REGULARISATIONS:
        raise PipelineError(f"method 'inversion': regularisation {kind!r} is not one of {', '.join(REGULARISATIONS)}")
    idx = torch.arange(math.prod(grid)).reshape(grid)
    stencil = (1.0, -1.0) if kind == "gradient" else (1.0, -2.0, 1.0)
    w = len(stencil)
    d = idx.numel()
    R = torch.zeros(d, d, dtype=torch.float64)
    for axis in range(len(grid)):
        n = grid[axis]
        if n < w:
            continue
        cols = [idx.narrow(axis, k, n - w + 1).reshape(-1) for k in range(w)]
        for a in range(w):
            for b in range(w):
                R.index_put_((cols[a], cols[b]), torch.full((cols[a].numel(),), stencil[a] * stencil[b],
                                                             dtype=torch.float64), accumulate=True)
    return R, torch.linalg.eigvalsh(R).clamp_min(0.0)


@dataclass
class GaussianData:
    """One observation's sufficient statistics for the linear-Gaussian algebra (float64, CPU).

    ``F = A^T N^-1 A`` (d, d), ``g = A^T N^-1 (y - b)`` (d,), ``chi0 = (y-b)^T N^-1 (y-b)`` and
    ``log_norm = -sum log sigma - m/2 log 2 pi`` over the unmasked pixels (data units of y)."""

    F: torch.Tensor
    g: torch.Tensor
    chi0: float
    log_norm: float


def gaussian_data(problem, y: torch.Tensor) -> GaussianData:
    """The sufficient statistics of observation ``y`` (shape y_shape) under ``problem``."""
    A, sig, mask, offset = _dense_masked(problem)
    r = (torch.as_tensor(y).double().cpu().reshape(-1) - offset)[mask] / sig
    W = A / sig[:, None]
    return GaussianData(F=W.T @ W, g=W.T @ r, chi0=float(r @ r),
                        log_norm=float(-torch.log(sig).sum() - 0.5 * sig.numel() * LOG_2PI))


def log_evidence(data: GaussianData, R: torch.Tensor, lam_g: float, lam_0: float) -> float:
    """log Z (nats) at one (lam_g, lam_0) by a Cholesky factorisation of C = F + lam_g R + lam_0 I."""
    d = data.g.numel()
    P = lam_g * R + lam_0 * torch.eye(d, dtype=torch.float64)
    L = torch.linalg.cholesky(data.F + P)
    v = torch.linalg.solve_triangular(L, data.g[:, None], upper=False)[:, 0]   # mu^T C mu = |L^-1 g|^2
    logdet_p = torch.linalg.slogdet(P)[1]
    return float(-0.5 * data.chi0 + 0.5 * (v @ v) + 0.5 * logdet_p - torch.log(torch.diagonal(L)).sum()
                 + data.log_norm)


def tridiagonal(data: GaussianData, R: torch.Tensor, lam_g: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(a, b, h): ``F + lam_g R = Q T Q^T`` with T tridiagonal (diagonal a (d,), off-diagonal b (d-1,)) by
    one Householder reduction (LAPACK dsytrd, a third of a full eigen-decomposition), and h = Q^T g."""
    K = (data.F + lam_g * R).numpy()
    lwork = int(lapack.dsytrd_lwork(K.shape[0], lower=1)[0])
    # scipy's BLAS follows torch's thread count (the package's policy, pipeline.runtime), not all cores
    with threadpool_limits(limits=torch.get_num_threads(), user_api="blas"):
        c, a, b, tau, info = lapack.dsytrd(K, lower=1, lwork=max(lwork, K.shape[0]))
    if info != 0:
        raise PipelineError(f"method 'inversion': the tridiagonal reduction failed (LAPACK info {info})")
    h = data.g.numpy().copy()
    for i in range(len(tau)):             # Q^T = H(d-1) ... H(1), H(i) = I - tau v v^T, v = (0.., 1, c[i+2:, i])
        v = np.concatenate(([1.0], c[i + 2:, i]))
        h[i + 1:] -= tau[i] * v * (v @ h[i + 1:])
    return a, b, h


def log_evidence_lam0(data: GaussianData, r_eig: torch.Tensor, lam_g: float, tri, lam_0: torch.Tensor
                      ) -> torch.Tensor:
    """log Z (nats) at one lam_g for every lam_0 in the 1-D tensor ``lam_0``, from ``tri = tridiagonal(...)``.

    ``T + lam_0 I = L D L^T`` (unit bidiagonal L) gives log det C = sum log D and g^T C^-1 g = w^T D^-1 w
    with L w = h, for all lam_0 at once; a non-positive pivot (rounding at a singular T) gives -inf."""
    a, b, h = tri
    lam = lam_0.double().numpy()
    piv = np.empty((len(a), len(lam)))
    w = np.empty_like(piv)
    piv[0], w[0] = a[0] + lam, h[0]
    for i in range(1, len(a)):
        ratio = b[i - 1] / piv[i - 1]
        piv[i] = a[i] + lam - ratio * b[i - 1]
        w[i] = h[i] - ratio * w[i - 1]
    ok = (piv > 0).all(0)
    piv = np.where(ok[None], piv, 1.0)
    quad = (w * w / piv).sum(0)
    logdet_c = np.log(piv).sum(0)
    logdet_p = torch.log(lam_g * r_eig[None] + lam_0.double()[:, None]).sum(1).numpy()
    out = -0.5 * data.chi0 + 0.5 * quad + 0.5 * logdet_p - 0.5 * logdet_c + data.log_norm
    return torch.from_numpy(np.where(ok, out, -np.inf))


def _log_integral(x: torch.Tensor, logf: torch.Tensor) -> float:
    """log of the integral of exp(logf) over sorted abscissae x, with logf linear between the nodes (exact
    for exponential tails, where a trapezoid in exp(logf) overestimates at coarse spacing)."""
    if x.numel() == 1:
        return float(logf[0])
    f1, f2 = logf[:-1], logf[1:]
    top = torch.maximum(f1, f2)
    a = (f2 - f1).abs().nan_to_num(nan=0.0)
    shape = torch.where(a > 1e-8, torch.log(-torch.expm1(-a)) - torch.log(a), -0.5 * a)   # log((1 - e^-a) / a)
    return float(torch.logsumexp(torch.log(x[1:] - x[:-1]) + top + shape, 0))


@dataclass
class EvidenceFit:
    """The hyperparameter search of one observation: the maximum, the marginal and where it looked."""

    lam_g: float              # 1/(network unit)^2, at the type-II maximum
    lam_0: float              # 1/(network unit)^2, at the type-II maximum
    type2: float              # nats: max log Z over the searched hyperparameters
    marginal: float           # nats: log Z with (log10 lam_g, log10 lam_0) marginalised over the hyperprior
    evaluations: int          # tridiagonal reductions (lam_g values) used
    bound: str | None         # which search bound the maximum lies on, if any


def fit_hyperparameters(data: GaussianData, R: torch.Tensor, r_eig: torch.Tensor, lam_g_range=(-6.0, 6.0),
                        lam_0_range=(-8.0, 4.0)) -> EvidenceFit:
    """Maximise and marginalise log Z over (log10 lam_g, log10 lam_0) in the given ranges (decades).

    lam_0 is scanned on a ``LAM0_STEP``-dex grid at every evaluated lam_g; lam_g on a ``LAM_G_STEP``-dex grid,
    halved around the current best until the type-II and marginal log Z move less than ``SETTLE`` nats (once
    the step is at most 0.75 dex) or the step reaches ``LAM_G_MIN_STEP``, then one parabolic step on the
    profile max_{lam_0} log Z. The marginal integrates Z over the uniform hyperprior density
    1 / ((hi_g - lo_g) (hi_0 - lo_0)) per dex^2, log Z interpolated linearly between the evaluated points."""
    (lo_g, hi_g), (lo_0, hi_0) = (tuple(map(float, r)) for r in (lam_g_range, lam_0_range))
    l0 = torch.linspace(lo_0, hi_0, int(round((hi_0 - lo_0) / LAM0_STEP)) + 1, dtype=torch.float64)
    lam0 = 10.0 ** l0
    evals: dict[float, tuple] = {}      # log10 lam_g -> (max log Z, log10 lam_0 there, log inner integral, tri)

    def evaluate(lg: float):
        lg = min(max(lg, lo_g), hi_g)
        if lg not in evals:
            tri = tridiagonal(data, R, 10.0 ** lg)
            z = log_evidence_lam0(data, r_eig, 10.0 ** lg, tri, lam0)
            k = int(torch.argmax(z))
            evals[lg] = (float(z[k]), float(l0[k]), _log_integral(l0, z), tri)

    def estimates():
        xs = sorted(evals)
        best = max(xs, key=lambda v: evals[v][0])
        marg = _log_integral(torch.tensor(xs, dtype=torch.float64), torch.tensor([evals[v][2] for v in xs]))
        return best, evals[best][0], marg - math.log((hi_g - lo_g) * (hi_0 - lo_0))

    n_coarse = max(1, int(math.ceil((hi_g - lo_g) / LAM_G_STEP)))
    for lg in torch.linspace(lo_g, hi_g, n_coarse + 1, dtype=torch.float64).tolist():
        evaluate(lg)
    step = (hi_g - lo_g) / n_coarse
    best, t2, marg = estimates()
    while step / 2 >= LAM_G_MIN_STEP - 1e-12:
        step /= 2
        evaluate(best - step)
        evaluate(best + step)
        new = estimates()
        settled = abs(new[1] - t2) < SETTLE and abs(new[2] - marg) < SETTLE and step <= 0.75
        best, t2, marg = new
        if settled:
            break
    best = _parabolic_step(evals, best, evaluate)
    best, t2, marg = estimates()
    lam0_best = _refine_lam0(data, r_eig, best, evals[best], lo_0, hi_0)
    t2 = max(t2, lam0_best[1])
    bound = _bound_hit(best, lam0_best[0], lo_g, hi_g, lo_0, hi_0)
    return EvidenceFit(lam_g=10.0 ** best, lam_0=10.0 ** lam0_best[0], type2=t2, marginal=marg,
                       evaluations=len(evals), bound=bound)


def _parabolic_step(evals: dict, best: float, evaluate) -> float:
    """One parabola through the profile at ``best`` and its two neighbours; evaluate its vertex if inside."""
    xs = sorted(evals)
    i = xs.index(best)
    if 0 < i < len(xs) - 1:
        (a, b, c), (fa, fb, fc) = xs[i - 1:i + 2], (evals[v][0] for v in xs[i - 1:i + 2])
        den = (b - a) * (fb - fc) - (b - c) * (fb - fa)
        if den != 0:
            v = b - 0.5 * ((b - a) ** 2 * (fb - fc) - (b - c) ** 2 * (fb - fa)) / den
            if a < v < c:
                evaluate(v)
    return max(evals, key=lambda v: evals[v][0])


def _refine_lam0(data, r_eig, lg: float, ev: tuple, lo_0: float, hi_0: float) -> tuple[float, float]:
    """(log10 lam_0, log Z) at the maximum over lam_0 within one grid step of the grid's best, at lam_g = 10^lg
    (a 41-point grid on the kept tridiagonal form: no new reduction)."""
    l0 = torch.linspace(max(lo_0, ev[1] - LAM0_STEP), min(hi_0, ev[1] + LAM0_STEP), 41, dtype=torch.float64)
    z = log_evidence_lam0(data, r_eig, 10.0 ** lg, ev[3], 10.0 ** l0)
    k = int(torch.argmax(z))
    return float(l0[k]), float(z[k])


def _bound_hit(lg: float, l0: float, lo_g: float, hi_g: float, lo_0: float, hi_0: float) -> str | None:
    """Which search bound the maximum sits on (None when interior)."""
    for value, lo, hi, name in ((lg, lo_g, hi_g, "lam_g"), (l0, lo_0, hi_0, "lam_0")):
        if value <= lo + LAM0_STEP / 2:
            return f"{name} at its lower bound 1e{lo:g}"
        if value >= hi - LAM0_STEP / 2:
            return f"{name} at its upper bound 1e{hi:g}"
    return None


def posterior_factor(data: GaussianData, R: torch.Tensor, lam_g: float, lam_0: float
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(mu (d,), L (d, d)) with C = F + lam_g R + lam_0 I = L L^T and mu = C^-1 g: the posterior N(mu, C^-1)."""
    C = data.F + lam_g * R + lam_0 * torch.eye(data.g.numel(), dtype=torch.float64)
    L = torch.linalg.cholesky(C)
    return torch.cholesky_solve(data.g[:, None], L)[:, 0], L


def header_cards(regularisation: str, fit: EvidenceFit) -> dict:
    """FITS cards (key -> (value, comment)) that record the inversion in a posterior file."""
    return {"REGFORM": (regularisation, "inversion: source regularisation (D^T D)"),
            "REGLAMG": (fit.lam_g, "[1/net unit^2] regularisation weight, evidence max"),
            "REGLAM0": (fit.lam_0, "[1/net unit^2] zeroth-order weight, evidence max"),
            "LOGZT2": (fit.type2, "[nats] type-II max log evidence"),
            "LOGZMARG": (fit.marginal, "[nats] log evidence, hyperparameters marginalised")}


class InversionSampler(Sampler):
    """Regularised linear inversion with evidence-chosen hyperparameters (see the module docstring).

    ``prior`` and ``chain`` are accepted like every training-free method and not used. Options:
    ``regularisation`` (``gradient`` or ``curvature``), ``lam_g_range`` / ``lam_0_range`` (log10 bounds of
    lam_g and lam_0 [1/(network unit)^2], the support of the log-uniform hyperprior) and ``device`` (where
    the samples are returned; the algebra is float64 on the CPU)."""

    name = "inversion"

    def __init__(self, prior=None, chain=None, *, regularisation: str = "gradient", lam_g_range=(-6.0, 6.0),
                 lam_0_range=(-8.0, 4.0), device=None):
        if regularisation not in REGULARISATIONS:
            raise PipelineError(f"method 'inversion': regularisation {regularisation!r} is not one of "
                                f"{', '.join(REGULARISATIONS)}")
        for label, rng in (("lam_g_range", lam_g_range), ("lam_0_range", lam_0_range)):
            if len(rng) != 2 or not float(rng[0]) < float(rng[1]):
                raise PipelineError(f"method 'inversion': {label} must be (low, high) decades with low < high, "
                                    f"got {rng}")
        self.prior, self.chain, self.regularisation = prior, chain, regularisation
        self.lam_g_range, self.lam_0_range = tuple(map(float, lam_g_range)), tuple(map(float, lam_0_range))
        self.device = device

    def fit(self, problem, y) -> tuple[GaussianData, EvidenceFit]:
        """The statistics and hyperparameter fit of one observation ``y`` (shape y_shape)."""
        data = gaussian_data(problem, y)
        R, r_eig = regularisation_matrix(source_grid(problem), self.regularisation)
        fit = fit_hyperparameters(data, R, r_eig, self.lam_g_range, self.lam_0_range)
        if fit.bound:
            log.warning("inversion: the evidence maximum has %s (widen lam_g_range / lam_0_range)", fit.bound)
        return data, fit

    def sample(self, problem, y, n, *, generator=None) -> Samples:
        require_linear(problem, self.name)
        if n < 1:
            raise ValueError(f"number of samples must be >= 1, got {n}")
        device = torch.device(self.device) if self.device is not None else problem.sigma.device
        ys = broadcast_y(problem, y, n)
        observations, which = torch.unique(ys.reshape(n, -1), dim=0, return_inverse=True)
        R, _ = regularisation_matrix(source_grid(problem), self.regularisation)
        d = math.prod(problem.x_shape)
        z = torch.randn((n, d), generator=generator, dtype=torch.float64)
        x = torch.empty(n, d, dtype=torch.float64)
        fits = []
        for k in range(observations.shape[0]):
            data, fit = self.fit(problem, observations[k].reshape(problem.y_shape))
            mu, L = posterior_factor(data, R, fit.lam_g, fit.lam_0)
            rows = (which == k).nonzero()[:, 0]
            x[rows] = mu + torch.linalg.solve_triangular(L.T, z[rows].T, upper=True).T   # N(mu, C^-1)
            fits.append(fit)
        x0 = x.to(torch.float32).reshape(n, *problem.x_shape).to(device)
        log_r = problem.log_likelihood(x0, ys.to(device))
        info = {"method": self.name, "regularisation": self.regularisation, "lam_g_range": self.lam_g_range,
                "lam_0_range": self.lam_0_range, "fits": [asdict(f) for f in fits]}
        if len(fits) == 1:
            f = fits[0]
            info["logz"] = {"elbo": f.marginal, "elbo_se": 0.0, "iw": f.marginal, "type2": f.type2,
                            "lam_g": f.lam_g, "lam_0": f.lam_0}
            info["header"] = header_cards(self.regularisation, f)
        else:
            info["logz"] = None
            info["logz_note"] = "one call held several observations: each one's log Z is in info['fits']"
        return Samples(x0=x0, log_r=log_r, nfe=0, info=info)
