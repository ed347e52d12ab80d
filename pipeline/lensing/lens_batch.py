"""The lens operator for a batch of lenses at once, matrix-free: one lens per source in the batch.

A sampler that infers the lens needs y = A(theta_b) x_b for many lenses theta_b at every step.
Assembling each sparse operator (:func:`pipeline.lensing.operator.assemble_matrix`) costs tens of
milliseconds per lens on a CPU; here the batch shares everything that does not depend on the lens:

    A(theta) x = K (W(theta) x)

* the padded, supersampled image grid (:func:`sub_grid`) is ray-traced for all B lenses in one call of
  caustics' functional SIE and external-shear deflections (float64, single plane: beta = x - sum alpha);
* W(theta) holds the bilinear weights of caustics' ``Pixelated`` source at the traced positions
  (:func:`bilinear_weights`: 4 source pixels per sub-pixel, zero outside the source field), so
  W x is a gather and W^T r a scatter-add;
* K = Pool . Crop . Conv(PSF) is the same for every lens (:func:`pool_conv_matrix`).

The same three pieces build the single-lens sparse matrix, so both paths are one model (and match
caustics' own forward to ~1e-7, ``tests/lensing/test_operator.py``). Units as in
:mod:`pipeline.lensing.operator`: arcsec and radians for the lens, the source in surface brightness,
the image in caustics' mean surface brightness per pixel times ``unit_factor``.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
from scipy.signal import convolve2d

# the lens parameters of a batch, each a (B,) float64 tensor (arcsec, radians, dimensionless)
LENS_KEYS = ("x0", "y0", "q", "phi", "rein", "g1", "g2")


def sub_grid(image_shape: tuple[int, int], image_pixscale: float, supersample: int, psf_shape) -> tuple:
    """(gx, gy), each (N,) float64 [arcsec]: centres of the supersampled image grid padded by half the
    PSF on each side, row-major, N = (ny ss + 2 hy)(nx ss + 2 hx)."""
    ny, nx = image_shape
    hy, hx = psf_shape[0] // 2, psf_shape[1] // 2
    Ny, Nx = ny * supersample + 2 * hy, nx * supersample + 2 * hx
    d_sub = image_pixscale / supersample
    xs = (np.arange(Nx) - (Nx - 1) / 2) * d_sub
    ys = (np.arange(Ny) - (Ny - 1) / 2) * d_sub
    gx, gy = np.meshgrid(xs, ys, indexing="xy")
    return torch.as_tensor(gx.ravel()), torch.as_tensor(gy.ravel())


def normalised_psf(psf) -> np.ndarray:
    """The PSF at the supersampled scale as float64 summing to 1 (a 1x1 delta for None)."""
    k = np.ones((1, 1)) if psf is None else np.asarray(psf, np.float64)
    return k / k.sum()


def pool_conv_matrix(image_shape: tuple[int, int], supersample: int, psf) -> sp.csr_matrix:
    """K = Pool . Crop . Conv(PSF), (ny nx, N) on the grid of :func:`sub_grid`. Image pixel (i, j)
    averages the ss x ss sub-pixels of the PSF-convolved grid it covers, so
    image(i, j) = sum_t Kc[t] mu[i ss + t] with Kc = box(ss)/ss^2 (*) PSF reversed (full convolution)."""
    ny, nx = image_shape
    ss = int(supersample)
    k = normalised_psf(psf)
    hy, hx = k.shape[0] // 2, k.shape[1] // 2
    Nx = nx * ss + 2 * hx
    Kc = convolve2d(np.full((ss, ss), 1.0 / (ss * ss)), k[::-1, ::-1], mode="full")
    ty, tx = np.nonzero(Kc)
    kw = Kc[ty, tx]
    blocks = []
    rows_per_block = max(1, 2_000_000 // max(1, nx * len(kw)))   # bounds the temporaries' memory
    for i0 in range(0, ny, rows_per_block):
        ii, jj = np.meshgrid(np.arange(i0, min(ny, i0 + rows_per_block)), np.arange(nx), indexing="ij")
        r = (ii[..., None] * ss + ty).ravel()
        c = (jj[..., None] * ss + tx).ravel()
        out = np.broadcast_to(((ii - i0) * nx + jj)[..., None], ii.shape + (len(kw),)).ravel()
        blocks.append(sp.coo_matrix((np.broadcast_to(kw, ii.shape + (len(kw),)).ravel(), (out, r * Nx + c)),
                                    shape=(ii.size, (ny * ss + 2 * hy) * Nx)).tocsr())
    return sp.vstack(blocks).tocsr()


def bilinear_weights(bx: torch.Tensor, by: torch.Tensor, source_npix: int, source_pixscale: float):
    """caustics' ``interp2d`` (align_corners=False, linear extrapolation inside the outer half-pixel,
    zero beyond the field) at source-plane positions (..., N) [arcsec]: (idx, w, valid), the flat source
    pixels and their weights, each (..., N, 4), and whether the ray lands in the field (..., N). A
    non-finite position (a ray through a singular lens centre, where caustics' forward gives no light)
    counts as outside: weight 0, index 0."""
    n = source_npix
    fov = source_pixscale * n
    u, v = bx / fov * 2, by / fov * 2
    valid = torch.isfinite(u) & torch.isfinite(v) & (u.abs() <= 1) & (v.abs() <= 1)
    u, v = torch.where(valid, u, 0.0), torch.where(valid, v, 0.0)
    px, py = 0.5 * ((u + 1) * n - 1), 0.5 * ((v + 1) * n - 1)
    x0 = px.floor().clamp(0, n - 2)
    y0 = py.floor().clamp(0, n - 2)
    dx0, dy0 = px - x0, py - y0
    dx1, dy1 = 1 - dx0, 1 - dy0
    x0, y0 = x0.long(), y0.long()
    idx = torch.stack([y0 * n + x0, (y0 + 1) * n + x0, y0 * n + x0 + 1, (y0 + 1) * n + x0 + 1], -1)
    w = torch.stack([dx1 * dy1, dx1 * dy0, dx0 * dy1, dx0 * dy0], -1) * valid[..., None].to(bx.dtype)
    return idx, w, valid


def raytrace(lenses: dict, gx: torch.Tensor, gy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Source-plane positions (B, N) [arcsec] of the image-plane points (gx, gy) (N,) for B SIE + external
    shear lenses (``lenses``: :data:`LENS_KEYS` -> (B,) tensors, optionally ``model``, which must be SIE; the
    shear centred on the origin), by caustics' functional deflections in float64."""
    from caustics.lenses.func import reduced_deflection_angle_external_shear, reduced_deflection_angle_sie

    if lenses.get("model", "SIE") != "SIE":
        raise ValueError(f"the batched operator traces SIE + shear lenses only, got model {lenses['model']!r}")
    p = {k: torch.as_tensor(lenses[k], dtype=torch.float64).reshape(-1, 1) for k in LENS_KEYS}
    x, y = gx[None].double(), gy[None].double()
    ax, ay = reduced_deflection_angle_sie(p["x0"], p["y0"], p["q"], p["phi"], p["rein"], x, y)
    sx, sy = reduced_deflection_angle_external_shear(torch.zeros_like(p["g1"]), torch.zeros_like(p["g1"]),
                                                     p["g1"], p["g2"], x, y)
    return x - ax - sx, y - ay - sy


class LensBatchOperator:
    """A(theta_b), b = 1..B, for fixed geometry: ``bind(lenses)`` traces once, then ``A`` / ``AT`` apply
    each row's own lens. Sources (B, d) and images (B, m) are flat, float64 or float32 (kept)."""

    def __init__(self, *, image_shape, image_pixscale: float, source_npix: int, source_pixscale: float,
                 supersample: int, psf, unit_factor: float = 1.0):
        self.image_shape, self.source_npix = tuple(image_shape), int(source_npix)
        self.source_pixscale = float(source_pixscale)
        self.m, self.d = int(np.prod(self.image_shape)), self.source_npix ** 2
        k = normalised_psf(psf)
        self.gx, self.gy = sub_grid(self.image_shape, image_pixscale, supersample, k.shape)
        K = (pool_conv_matrix(self.image_shape, supersample, k) * float(unit_factor)).tocsr()
        self._K_csr = K                                    # (m, N), N: sub-pixels of the padded grid
        coo = K.tocoo()
        ind = torch.as_tensor(np.stack([coo.row, coo.col]).astype(np.int64))
        self.K = torch.sparse_coo_tensor(ind, torch.as_tensor(coo.data), K.shape, check_invariants=True).coalesce()
        self.KT = self.K.t().coalesce()
        self.idx = self.w = None

    def bind(self, lenses: dict) -> "LensBatchOperator":
        """Trace the grid for B lenses (:data:`LENS_KEYS` -> (B,) tensors); returns self."""
        bx, by = raytrace(lenses, self.gx, self.gy)
        self.idx, self.w, _ = bilinear_weights(bx, by, self.source_npix, self.source_pixscale)
        return self

    def _check(self, rows: int | None = None, what: str = ""):
        if self.idx is None:
            raise RuntimeError("LensBatchOperator: bind(lenses) before applying it")
        if rows is not None and rows != self.idx.shape[0]:
            raise ValueError(f"LensBatchOperator: {rows} {what} for {self.idx.shape[0]} bound lenses")

    def A(self, x: torch.Tensor) -> torch.Tensor:
        """(B, m) images of sources x (B, d), row b through lens b."""
        self._check(x.shape[0], "sources")
        B, N = self.idx.shape[:2]
        mu = (x.double().gather(1, self.idx.reshape(B, -1)).reshape(B, N, 4) * self.w).sum(-1)   # W x: (B, N)
        return torch.sparse.mm(self.K, mu.T).T.to(x.dtype)

    def AT(self, r: torch.Tensor) -> torch.Tensor:
        """(B, d) adjoint of :meth:`A` applied to images r (B, m)."""
        self._check(r.shape[0], "images")
        B, N = self.idx.shape[:2]
        mu = torch.sparse.mm(self.KT, r.double().T).T                             # K^T r: (B, N)
        out = torch.zeros(B, self.d, dtype=torch.float64)
        out.scatter_add_(1, self.idx.reshape(B, -1), (mu[..., None] * self.w).reshape(B, -1))
        return out.to(r.dtype)

    def diag_AtA(self, pixel_weights=None) -> torch.Tensor:
        """(B, d) float64 diagonals of A(theta_b)^T diag(pixel_weights) A(theta_b), exact: per lens the
        sparse product K W(theta_b) (scipy), squared, weighted and summed over image pixels.
        ``pixel_weights`` (m,): e.g. mask / sigma^2 per image pixel [1/image units^2]; default 1."""
        self._check()
        B, N = self.idx.shape[:2]
        pw = None if pixel_weights is None else sp.diags(np.asarray(pixel_weights, np.float64).reshape(-1))
        out = np.empty((B, self.d))
        rows = np.repeat(np.arange(N), 4)
        for b in range(B):
            W = sp.csr_matrix((self.w[b].reshape(-1).numpy(), (rows, self.idx[b].reshape(-1).numpy())),
                              shape=(N, self.d))
            A = self._K_csr @ W
            A2 = A.multiply(A)
            out[b] = np.asarray((A2 if pw is None else pw @ A2).sum(0)).ravel()
        return torch.as_tensor(out)

    def dense(self) -> torch.Tensor:
        """(B, m, d) float64 matrices of the bound lenses (for small problems and tests)."""
        B, N = self.idx.shape[:2]
        W = torch.zeros(B, N, self.d, dtype=torch.float64)
        W.scatter_add_(2, self.idx, self.w)
        return torch.stack([torch.sparse.mm(self.K, W[b]) for b in range(B)])
