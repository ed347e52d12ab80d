"""The evidence p(y | theta) of an observation at any lens, with the source marginalised under a Gaussian.

Inferring the lens needs log p(y | theta) for many lenses theta, each in milliseconds. Under the diffusion
prior only a noisy estimate exists (:mod:`pipeline.lensing.lens_evidence`); under a Gaussian source prior
it is exact and cheap. This is the evidence that classic pixelated lens modelling maximises over the lens
(Warren & Dye 2003; Suyu et al. 2006), here with a source prior learnt from galaxies:

* :class:`SourceGaussian` is N(m0, S0) in network units with S0 = B B^T of rank r: the mean and the
  leading r principal components of a set of galaxy images (the prior's training set, with the 8 dihedral
  symmetries), so that the Gaussian has the galaxies' first two moments within the r components. Optionally
  it is a scale mixture x = a g, g ~ N(m0, S0), with the amplitude a on K log-spaced values of prior
  weights pi_k: the images' fluxes spread over decades, and a single Gaussian would then favour lenses
  whose magnification makes the reconstructed source's flux typical. (x = a g scales network units; with
  the prior's offset 0, as shipped, a scales the brightness.) Optionally g is itself a mixture over C
  shapes, g = m0 + B (mu_c + L_c z): a Gaussian mixture fitted to the components' whitened coefficients,
  so that the source's density need not be one ellipsoid (compact and extended, round and elongated
  galaxies), with joint weights pi_ck over shapes and amplitudes.
* :class:`GaussianSourceEvidence` gives, for an observation y = A(theta)(scale x + offset) + n with
  n ~ N(0, diag(sigma^2)) on the unmasked pixels and one amplitude a,

      log p(y | theta, a) = log N(y; A (scale a m0 + offset), scale^2 a^2 A S0 A^T + diag(sigma^2)),

  by Woodbury in the r-dimensional source space. Whitened by mask / sigma, let G = w A scale B (m, r),
  u = w (y - A offset), v = w A scale m0, and G^T G = V diag(lam) V^T. Then res = u - a v,
  b = a V^T G^T res and

      log p(y | theta, a) = -1/2 |res|^2 + 1/2 sum_j b_j^2 / (1 + a^2 lam_j) - 1/2 sum_j log(1 + a^2 lam_j)
                            - sum log sigma - m/2 log 2 pi

  (m the unmasked pixels; nats, the likelihood's SCI-unit normalisation), and log p(y | theta) =
  logsumexp_k (log pi_k + log p(y | theta, a_k)). A shape c replaces B by B L_c and m0 by m0 + B mu_c;
  G^T G is formed once per lens and L_c^T G^T G L_c diagonalised per shape, and log p(y | theta) is the
  logsumexp over (c, k). A(theta) B for a batch of lenses
  is a gather of B's rows at each lens's ray-traced sub-pixels (bilinear weights,
  :func:`pipeline.lensing.lens_batch.bilinear_weights`) followed by one strided convolution with the
  supersampled PSF-and-pixel kernel, the same operator as :class:`~pipeline.lensing.lens_batch.LensBatchOperator`
  (checked against it in the tests). The cost per lens is O(N r) for the gather and convolution (N
  sub-pixels), O(m r^2) for G^T G, C O(r^3) eigendecompositions and O(C K r) for the amplitudes.

This is not the evidence under the diffusion prior: galaxies are not Gaussian. How far lens posteriors
under it are calibrated when the sources are real galaxies is measured by
``python -m pipeline.bench.lens_marginal_calibration`` (``docs/joint.md``).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.signal import convolve2d

from pipeline.lensing.lens_batch import LENS_KEYS, bilinear_weights, normalised_psf, raytrace, sub_grid
from pipeline.lensing.lens_prior import LensPrior

_LOG_2PI = math.log(2.0 * math.pi)


@dataclass
class SourceGaussian:
    """x = a g over flat sources (d,) in network units. g is a mixture over C shapes: with shape c,
    g = mean + basis (shape_means[c] + shape_chol[c] z), z ~ N(0, I_r), ``basis`` (d, r); the amplitude a is
    ``amplitudes[k]``; (c, k) has probability ``weights[c, k]``. The defaults are one shape (mean 0, chol I)
    and one amplitude 1: the plain Gaussian N(mean, basis basis^T). ``weights`` may be (K,) for one shape.
    ``explained``: the fraction of the (amplitude-normalised) images' total variance that the r components
    hold (1 when none were dropped)."""

    mean: torch.Tensor
    basis: torch.Tensor
    explained: float = 1.0
    amplitudes: torch.Tensor | None = None
    weights: torch.Tensor | None = None
    shape_means: torch.Tensor | None = None
    shape_chol: torch.Tensor | None = None

    def __post_init__(self):
        r = self.basis.shape[1]
        mu = torch.zeros(1, r) if self.shape_means is None else torch.as_tensor(self.shape_means)
        chol = torch.eye(r)[None].expand(len(mu), r, r) if self.shape_chol is None else torch.as_tensor(self.shape_chol)
        a = torch.ones(1) if self.amplitudes is None else torch.as_tensor(self.amplitudes)
        w = torch.ones(len(mu), len(a)) if self.weights is None else torch.as_tensor(self.weights)
        a, mu, chol, w = a.double().reshape(-1), mu.double(), chol.double(), w.double()
        if w.dim() == 1 and len(mu) == 1:                # (K,): one shape
            w = w[None]
        if w.shape != (len(mu), len(a)):
            raise ValueError(f"SourceGaussian: weights must be ({len(mu)}, {len(a)}) for {len(mu)} shapes and "
                             f"{len(a)} amplitudes (or ({len(a)},) for one shape), got {tuple(w.shape)}")
        if mu.shape[1:] != (r,) or chol.shape != (len(mu), r, r):
            raise ValueError(f"SourceGaussian: shape_means must be (C, {r}) and shape_chol (C, {r}, {r}), got "
                             f"{tuple(mu.shape)} and {tuple(chol.shape)}")
        if not bool((a > 0).all()) or not bool((w >= 0).all()) or float(w.sum()) <= 0:
            raise ValueError("SourceGaussian: amplitudes must be > 0 and weights >= 0 (not all 0)")
        keep = w.sum(0) > 0                           # a zero-weight amplitude or shape adds nothing
        w = w[:, keep]
        shapes = w.sum(1) > 0
        self.amplitudes, self.weights = a[keep], w[shapes] / w.sum()
        self.shape_means, self.shape_chol = mu[shapes], chol[shapes]

    @classmethod
    def from_images(cls, images: torch.Tensor, rank: int, dihedral: bool = True, amplitudes: int = 1,
                    shapes: int = 1, seed: int = 0) -> "SourceGaussian":
        """The mean and leading ``rank`` principal components of ``images`` (n, ..., H, W) in network units,
        over the 8 dihedral symmetries of every image when ``dihedral`` (a prior trained with dihedral
        augmentation is invariant under them). With ``amplitudes`` K > 1 each image's amplitude is its flux
        over the median flux (fluxes must be positive); the amplitudes' distribution is their histogram over
        K bins equally wide in log a, at the bins' geometric centres, and the components are those of the
        images divided by their bin's centre, so that g keeps the fluxes' spread within a bin (dividing by
        each image's own amplitude would give every g the same flux and allow only K fluxes). With ``shapes``
        C > 1 the components' coefficients (whitened) are fitted by a C-component Gaussian mixture
        (:func:`gaussian_mixture_em`, seeded by ``seed``), and (shape, amplitude) get the joint weights
        sum_i resp_ic [bin_i = k] / n, so that shape and flux may be related."""
        x = torch.as_tensor(images, dtype=torch.float64)
        x = x.reshape(x.shape[0], *x.shape[-2:])
        if x.shape[-1] != x.shape[-2]:
            raise ValueError(f"SourceGaussian.from_images needs square images, got {tuple(x.shape[-2:])}")
        amp, bins = torch.ones(1, dtype=torch.float64), torch.zeros(x.shape[0], dtype=torch.long)
        if amplitudes > 1:
            flux = x.sum((-2, -1))
            if not bool((flux > 0).all()):
                raise ValueError(f"SourceGaussian.from_images: {int((flux <= 0).sum())} images have flux <= 0 "
                                 "in network units; amplitudes need positive fluxes")
            a = flux / flux.median()
            edges = torch.linspace(float(a.log().min()), float(a.log().max()) + 1e-9, amplitudes + 1, dtype=torch.float64)
            amp = ((edges[1:] + edges[:-1]) / 2).exp()
            bins = torch.bucketize(a.log(), edges[1:-1])
            x = x / amp[bins, None, None]
        if dihedral:
            rots = [torch.rot90(x, k, (-2, -1)) for k in range(4)]
            x = torch.cat(rots + [r.flip(-1) for r in rots])
            bins = bins.repeat(8)
        x = x.reshape(x.shape[0], -1)
        n, d = x.shape
        if not 1 <= rank <= min(n - 1, d):
            raise ValueError(f"rank must be in [1, {min(n - 1, d)}] for {n} images of {d} pixels, got {rank}")
        mean = x.mean(0)
        # eigenvectors of the d x d sample covariance (cheaper than an SVD of the n x d data when n >> d)
        cov = (x - mean).T @ (x - mean) / (n - 1)
        evals, evecs = torch.linalg.eigh(cov)
        evals, evecs = evals.flip(0).clamp(min=0), evecs.flip(1)
        explained = float(evals[:rank].sum() / evals.sum().clamp(min=1e-300))
        basis = evecs[:, :rank] * evals[:rank].sqrt()
        resp, mu, chol = torch.ones(n, 1, dtype=torch.float64), None, None
        if shapes > 1:
            if float(evals[rank - 1]) <= 1e-12 * float(evals[0]):
                raise ValueError(f"SourceGaussian.from_images: the images span fewer than rank = {rank} "
                                 "directions; lower the rank to fit shapes")
            z = (x - mean) @ evecs[:, :rank] / evals[:rank].sqrt()                     # whitened coefficients
            _, mu, chol, resp = gaussian_mixture_em(z, shapes, seed=seed)
        weights = resp.T @ F.one_hot(bins, len(amp)).double() / n                          # (C, K)
        return cls(mean, basis, explained, amp, weights, mu, chol)

    @property
    def rank(self) -> int:
        return int(self.basis.shape[1])

    def covariance(self, shape: int = 0) -> torch.Tensor:
        """basis L_c L_c^T basis^T (d, d): g's covariance within shape c (amplitude 1)."""
        bl = self.basis @ self.shape_chol[shape]
        return bl @ bl.T

    def shape_mean(self, shape: int = 0) -> torch.Tensor:
        """mean + basis mu_c (d,): g's mean within shape c."""
        return self.mean + self.basis @ self.shape_means[shape]

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        z = torch.randn(n, self.rank, 1, generator=generator, dtype=torch.float64)
        if self.weights.numel() == 1:
            ck = torch.zeros(n, dtype=torch.long)
        else:
            ck = torch.multinomial(self.weights.reshape(-1), n, replacement=True, generator=generator)
        c, k = ck // len(self.amplitudes), ck % len(self.amplitudes)
        coef = self.shape_means[c] + (self.shape_chol[c] @ z)[..., 0]
        return self.amplitudes[k, None] * (self.mean + coef @ self.basis.T)


def gaussian_mixture_em(z: torch.Tensor, components: int, *, iters: int = 200, tol: float = 1e-6,
                        reg: float = 1e-3, seed: int = 0):
    """Maximum-likelihood C-component Gaussian mixture with full covariances on the rows of z (n, r) by EM,
    started from k-means++ seeds (``seed``), each covariance plus ``reg`` I, stopped when the mean log
    likelihood per row gains less than ``tol`` nats. A component left with less than one row's worth of
    responsibility is dropped. Returns weights (C',), means (C', r), Cholesky factors of the covariances
    (C', r, r) and the rows' responsibilities (n, C'), C' <= C the components kept."""
    z = torch.as_tensor(z, dtype=torch.float64)
    n, r = z.shape
    if not 1 <= components <= n:
        raise ValueError(f"gaussian_mixture_em: components must be in [1, {n}], got {components}")
    g = torch.Generator().manual_seed(seed)
    centres = z[torch.randint(n, (1,), generator=g)]
    for _ in range(1, components):
        d2 = torch.cdist(z, centres).pow(2).min(1).values
        centres = torch.cat([centres, z[torch.multinomial(d2 + 1e-300, 1, generator=g)]])
    resp = F.one_hot(torch.cdist(z, centres).argmin(1), components).double()
    prev = -math.inf
    for _ in range(iters):
        nk = resp.sum(0)
        keep = nk >= min(1.0, float(nk.max()))            # a component left without rows goes
        resp, nk = resp[:, keep], nk[keep]
        weights, means = nk / nk.sum(), resp.T @ z / nk[:, None]
        diff = z[None] - means[:, None]                                                  # (C, n, r)
        cov = (resp.T[..., None] * diff).transpose(1, 2) @ diff / nk[:, None, None]
        chol = torch.linalg.cholesky(cov + reg * torch.eye(r, dtype=torch.float64))
        white = torch.linalg.solve_triangular(chol, diff.transpose(1, 2), upper=False)    # (C, r, n)
        logp = (weights.log()[:, None] - 0.5 * white.pow(2).sum(1) - chol.diagonal(dim1=1, dim2=2).log().sum(1)[:, None]
                - 0.5 * r * _LOG_2PI).T                                                    # (n, C)
        ll = float(torch.logsumexp(logp, 1).mean())
        resp = torch.softmax(logp, 1)
        if ll - prev < tol:
            break
        prev = ll
    return weights, means, chol, resp


def pixel_kernel(psf, supersample: int) -> np.ndarray:
    """The kernel Kc (ss + ky - 1, ss + kx - 1) with image(i, j) = sum_t Kc[t] mu[i ss + t] over the padded
    supersampled grid mu of :func:`~pipeline.lensing.lens_batch.sub_grid`: the ss x ss pixel average
    convolved with the (normalised) PSF, so that a stride-ss correlation with it is Pool . Crop . Conv(PSF)."""
    ss = int(supersample)
    return convolve2d(np.full((ss, ss), 1.0 / (ss * ss)), normalised_psf(psf)[::-1, ::-1], mode="full")


class GaussianSourceEvidence:
    """Exact log p(y | theta) of observations under a :class:`SourceGaussian` source prior (module docstring).

    ``observations``: one (problem, y, meta) per observation, as from
    :func:`pipeline.lensing.observation.load_observation`; ``prior``: the lens prior whose free parameters
    are theta's columns (the fixed ones at their single value); ``source``: the source Gaussian on the
    observations' source grid. :meth:`log_likelihood` has the signature that
    :func:`pipeline.lensing.lens_smc.tempered_smc` takes. ``chunk`` lenses are traced and convolved at once
    (memory about chunk x sub-pixels x (rank + 2) x 4 bytes). The gather and convolution run in ``dtype``
    (float32 by default: 2e-5 nats from float64 at the shipped geometry), the rest in float64."""

    def __init__(self, observations: list, prior: LensPrior, source: SourceGaussian, *, chunk: int = 16,
                 dtype=torch.float32):
        if prior.config.model != "SIE":
            raise ValueError(f"GaussianSourceEvidence traces SIE + shear lenses only, got {prior.config.model!r}")
        self.prior, self.source, self.chunk, self.dtype = prior, source, int(chunk), dtype
        self.obs = [self._prepare(problem, y, meta) for problem, y, meta in observations]

    def _prepare(self, problem, y, meta) -> dict:
        if problem.d != self.source.mean.shape[0]:
            raise ValueError(f"{meta.get('path')}: source grid of {problem.d} pixels, the source Gaussian has "
                             f"{self.source.mean.shape[0]}")
        psf = meta["psf_used"]
        kernel = pixel_kernel(psf, meta["supersample"]) * float(meta["unit_factor"])
        gx, gy = sub_grid(problem.image_shape, meta["pixscale"], meta["supersample"], normalised_psf(psf).shape)
        mask = problem.mask.double().reshape(-1) > 0
        sigma = problem.sigma.double().reshape(-1)
        w = torch.where(mask, 1.0 / torch.where(mask, sigma, torch.ones_like(sigma)), torch.zeros_like(sigma))
        basis = torch.cat([problem.scale * self.source.basis, problem.scale * self.source.mean[:, None],
                           torch.full((problem.d, 1), float(problem.offset), dtype=torch.float64)], 1)
        ny, nx = problem.image_shape
        ss = int(meta["supersample"])
        hy, hx = (k // 2 for k in normalised_psf(psf).shape)
        return {"gx": gx, "gy": gy, "w": w, "wy": w * torch.as_tensor(y, dtype=torch.float64).reshape(-1),
                "const": float(-torch.log(sigma[mask]).sum() - 0.5 * int(mask.sum()) * _LOG_2PI),
                "basis": basis.to(self.dtype), "kernel": torch.as_tensor(kernel.copy(), dtype=self.dtype)[None, None],
                "sub_shape": (ny * ss + 2 * hy, nx * ss + 2 * hx), "image_shape": (ny, nx), "ss": ss,
                "source_npix": problem.source_npix, "source_pixscale": meta["source_pixscale"]}

    def lenses(self, theta: torch.Tensor) -> dict:
        """:data:`~pipeline.lensing.lens_batch.LENS_KEYS` -> (B,) float64 for theta (B, p), fixed parameters
        at their single value."""
        fixed = self.prior.to_lens(torch.zeros(0))
        cols = {k: i for i, k in enumerate(self.prior.names)}
        return {k: theta[:, cols[k]] if k in cols else torch.full((theta.shape[0],), float(getattr(fixed, k)),
                                                                   dtype=torch.float64) for k in LENS_KEYS}

    def image_basis(self, theta: torch.Tensor, row: int) -> torch.Tensor:
        """(B, m, r + 2): A(theta_b) applied to scale x basis (first r columns), to scale m0 and to the
        offset's flat source (last two columns), SCI units, for the lenses theta (B, p) of observation ``row``."""
        o = self.obs[row]
        bx, by = raytrace(self.lenses(theta.double()), o["gx"], o["gy"])
        idx, wts, _ = bilinear_weights(bx, by, o["source_npix"], o["source_pixscale"])
        B, N = idx.shape[:2]
        # W(theta) for all B lenses as one sparse (B N, d) matrix: 4 bilinear weights per sub-pixel
        rows = torch.arange(B * N).repeat_interleave(4)
        W = torch.sparse_coo_tensor(torch.stack([rows, idx.reshape(-1)]), wts.reshape(-1).to(self.dtype),
                                    (B * N, o["basis"].shape[0]), check_invariants=False)
        with warnings.catch_warnings():  # "sparse CSR support is in beta": one product is all we use
            warnings.simplefilter("ignore", UserWarning)
            mu = (W.to_sparse_csr() @ o["basis"]).view(B, N, -1)                # (B, N, r + 2)
        R = mu.shape[-1]
        (Ny, Nx), (ny, nx) = o["sub_shape"], o["image_shape"]
        # Pool . Crop . Conv(PSF): the same kernel on every channel (a grouped, strided correlation)
        img = F.conv2d(mu.transpose(1, 2).reshape(B, R, Ny, Nx), o["kernel"].expand(R, 1, -1, -1),
                       stride=o["ss"], groups=R)[..., :ny, :nx]
        return img.reshape(B, R, ny * nx).transpose(1, 2)

    def log_likelihood(self, theta: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """log p(y_rows | theta) (B,) float64 nats for theta (B, p) and observation indices ``rows`` (B,)."""
        theta = torch.as_tensor(theta, dtype=torch.float64).reshape(-1, self.prior.dim)
        rows = torch.as_tensor(rows).reshape(-1).long()
        out = torch.empty(theta.shape[0], dtype=torch.float64)
        for row in rows.unique().tolist():
            where = torch.nonzero(rows == row).flatten()
            for s in range(0, len(where), self.chunk):
                sel = where[s:s + self.chunk]
                out[sel] = self._log_likelihood(theta[sel], row)
        return out

    def _spectral(self, theta: torch.Tensor, row: int) -> dict:
        """For the lenses theta (B, p) of observation ``row``, whitened by mask / sigma, in float64, and each
        shape c of the source (mean mu_c and Cholesky factor L_c in the basis's coefficients): G = w A scale
        basis, G_c = G L_c, the eigenvalues lam (B, C, r) and vectors V (B, C, r, r) of G_c^T G_c, the
        projections p = V^T G_c^T u and q = V^T G_c^T v_c (B, C, r) of u = w (y - A offset) and
        v_c = w A scale (m0 + basis mu_c), u.u (B,), u.v_c and v_c.v_c (B, C), and ``ok`` (B,) False where the
        lens or its images are not finite (its terms are then zeros). At amplitude a the residual is u - a v_c,
        C = I + a^2 G_c^T G_c = V (I + a^2 lam) V^T and a G_c^T res = V a (p - a q), so every amplitude costs
        O(r) once G_c^T G_c is diagonalised, and every shape O(r^3) once G^T G is formed."""
        o = self.obs[row]
        img = self.image_basis(theta, row).double() * o["w"][None, :, None]
        ok = torch.isfinite(img).all(2).all(1) & torch.isfinite(theta).all(1)
        img = torch.where(ok[:, None, None], img, torch.zeros_like(img))
        G, v, u = img[..., :-2], img[..., -2], o["wy"][None] - img[..., -1]
        M, gu, gv = G.transpose(1, 2) @ G, (u[:, None] @ G)[:, 0], (v[:, None] @ G)[:, 0]      # (B, r, r), (B, r)
        mu, L = self.source.shape_means, self.source.shape_chol                                # (C, r), (C, r, r)
        lam, V = torch.linalg.eigh(L.transpose(1, 2)[None] @ M[:, None] @ L[None])            # (B, C, r), (B, C, r, r)
        VtLt = V.transpose(2, 3) @ L.transpose(1, 2)[None]
        M_mu = (M[:, None] @ mu[None, :, :, None])[..., 0]                                     # (B, C, r)
        uv, vv = (u * v).sum(1), v.pow(2).sum(1)
        return {"lam": lam.clamp(min=0), "V": V, "p": (VtLt @ gu[:, None, :, None])[..., 0],
                "q": (VtLt @ (gv[:, None] + M_mu)[..., None])[..., 0], "uu": u.pow(2).sum(1),
                "uv": uv[:, None] + gu @ mu.T, "vv": vv[:, None] + 2 * gv @ mu.T + (mu[None] * M_mu).sum(-1),
                "ok": ok}

    def _per_amplitude(self, sp: dict, row: int) -> tuple[torch.Tensor, torch.Tensor]:
        """From :meth:`_spectral`: log pi_ck + log p(y | theta, c, a_k) (B, C, K), -inf where not ``ok``, and
        the coefficients' posterior means E[z | y, theta, c, a_k] = V b / (1 + a_k^2 lam) in V's basis (B, C, K, r)."""
        a = self.source.amplitudes[None, None, :, None]                                  # (1, 1, K, 1)
        b = a * (sp["p"][:, :, None] - a * sp["q"][:, :, None])                           # (B, C, K, r)
        d = 1.0 + a.pow(2) * sp["lam"][:, :, None]                                        # C's eigenvalues
        a = a[..., 0]
        res2 = sp["uu"][:, None, None] - 2 * a * sp["uv"][..., None] + a.pow(2) * sp["vv"][..., None]
        ll = -0.5 * res2 + 0.5 * (b.pow(2) / d).sum(-1) - 0.5 * d.log().sum(-1) + self.obs[row]["const"]
        ll = torch.where(sp["ok"][:, None, None], ll + self.source.weights.log()[None], torch.full_like(ll, -math.inf))
        return ll, b / d

    def _log_likelihood(self, theta: torch.Tensor, row: int) -> torch.Tensor:
        return torch.logsumexp(self._per_amplitude(self._spectral(theta, row), row)[0].flatten(1), 1)

    def posterior_mean(self, theta: torch.Tensor, row: int) -> torch.Tensor:
        """E[x | y, theta] (B, d) in network units for lenses theta (B, p) of observation ``row``: the sum over
        shapes c and amplitudes a_k of p(c, a_k | y, theta) a_k (m0 + basis (mu_c + L_c E[z | y, theta, c, a_k]));
        NaN for a lens that is not finite or whose images are not."""
        theta = torch.as_tensor(theta, dtype=torch.float64).reshape(-1, self.prior.dim)
        sp = self._spectral(theta, row)
        ll, coef = self._per_amplitude(sp, row)
        B, C, K = ll.shape
        p_ck = torch.softmax(ll.flatten(1), 1).reshape(B, C, K)
        z = self.source.shape_means[None, :, None] + coef @ (self.source.shape_chol[None] @ sp["V"]).transpose(2, 3)
        g = self.source.mean + z @ self.source.basis.T                                     # (B, C, K, d)
        return ((p_ck * self.source.amplitudes)[..., None] * g).sum((1, 2))
