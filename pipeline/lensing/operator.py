"""The lens forward model: caustics SIE/EPL + external shear acting on a pixelated source.

Conventions
-----------
* Array frame: +x along increasing column, +y along increasing row, arcsec from the array centre
  (pixel centres at ``(j - (n-1)/2) * pix``), position angles in rad counter-clockwise from +x.
  caustics uses this frame natively.
* The external shear is centred on the array origin (0, 0), like lenstronomy's default ``ra_0=dec_0=0``
  (a shear centre offset is a constant deflection, i.e. a source shift).
* Source maps are surface brightness (e.g. electron/s/arcsec^2) on an ``n_s x n_s`` grid of pixel
  scale ``source_pixscale`` centred on the origin. caustics returns the *mean surface brightness* per
  image pixel; when SCI is flux per pixel the operator multiplies by the pixel area (``unit_factor``).
* PSF: a point-sampled PSF at the *supersampled* scale ``pix / supersample`` (odd, sums to 1); it is
  the optical PSF only, because the pixel response is applied by averaging the supersampled image
  (caustics' avg-pool). :func:`resample_psf` is the one rule that brings a file's PSF to that scale.
* Network units: ``x_phys = scale * x + offset``. ``LensingProblem.A`` is the *linear* part
  ``x -> scale * M x`` and ``forward(x) = A(x) + offset_image`` with ``offset_image = offset * M 1``.
  Samplers that use A/AT with the data must use ``data_for_linear(y) = y - offset_image``
  (identical to ``y`` when ``offset = 0``).
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import asdict, dataclass

import numpy as np
import scipy.sparse as sp
import torch
from scipy import ndimage

from pipeline.lensing.lens_batch import bilinear_weights, normalised_psf, pool_conv_matrix, sub_grid
from pipeline.problems import LinearInverseProblem

log = logging.getLogger(__name__)

FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))


@dataclass
class LensParams:
    """Lens mass model in the array frame. ``t`` is used by EPL only (caustics' slope, 1 = SIE)."""

    model: str = "SIE"            # 'SIE' or 'EPL' (both with external shear)
    x0: float = 0.0               # arcsec
    y0: float = 0.0               # arcsec
    q: float = 0.8                # axis ratio
    phi: float = 0.0              # rad, counter-clockwise from +x
    rein: float = 0.7             # Einstein radius, arcsec
    t: float = 1.0                # EPL slope
    g1: float = 0.0               # external shear
    g2: float = 0.0
    z_lens: float = 0.5
    z_source: float = 1.5

    def as_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------------------- PSF
def gaussian_psf(fwhm: float, pixscale: float, npix: int) -> np.ndarray:
    """Circular Gaussian of FWHM ``fwhm`` [arcsec] point-sampled at ``pixscale`` on an odd ``npix``
    grid centred on the middle pixel, normalised to sum 1 (float64). ``fwhm = 0`` gives a delta."""
    if npix % 2 == 0:
        raise ValueError(f"PSF size must be odd, got {npix}")
    if fwhm <= 0:
        out = np.zeros((npix, npix))
        out[npix // 2, npix // 2] = 1.0
        return out
    s = fwhm / FWHM_PER_SIGMA / pixscale
    c = np.arange(npix) - npix // 2
    g = np.exp(-(c[:, None] ** 2 + c[None, :] ** 2) / (2 * s * s))
    return g / g.sum()


def psf_fwhm(psf: np.ndarray, pixscale: float) -> float:
    """FWHM [arcsec] of a centred, roughly circular PSF from its second moments (Gaussian-equivalent)."""
    p = np.asarray(psf, dtype=np.float64)
    p = p / p.sum()
    ny, nx = p.shape
    yy, xx = np.mgrid[:ny, :nx]
    cy, cx = (p * yy).sum(), (p * xx).sum()
    var = 0.5 * (p * ((yy - cy) ** 2 + (xx - cx) ** 2)).sum()
    return float(FWHM_PER_SIGMA * math.sqrt(var) * pixscale)


def resample_psf(psf: np.ndarray, from_scale: float, to_scale: float, npix: int | None = None) -> np.ndarray:
    """The single PSF resampling rule of the package.

    The file's PSF is taken as point samples of a smooth optical PSF (no pixel response) at spacing
    ``from_scale`` [arcsec], centred on its middle pixel. It is re-sampled at spacing ``to_scale`` on an
    odd grid of ``npix`` pixels (default: the same angular extent) with a cubic spline through the
    samples (``scipy.ndimage.map_coordinates``, order 3, zero outside), negative ringing clipped to 0,
    and renormalised to sum 1. When the scales agree the PSF is returned (normalised) unchanged.
    The PSF should be Nyquist-sampled at ``from_scale`` for this to be accurate.
    """
    psf = np.asarray(psf, dtype=np.float64)
    if psf.ndim != 2 or psf.shape[0] % 2 == 0 or psf.shape[1] % 2 == 0:
        raise ValueError(f"PSF must be 2-D with odd sizes, got {psf.shape}")
    if abs(from_scale / to_scale - 1.0) < 1e-9 and (npix is None or npix == psf.shape[0] == psf.shape[1]):
        return psf / psf.sum()
    if npix is None:
        half = (max(psf.shape) // 2) * from_scale / to_scale
        npix = 2 * int(math.floor(half)) + 1
    if npix % 2 == 0:
        raise ValueError(f"PSF size must be odd, got {npix}")
    c = (np.arange(npix) - npix // 2) * (to_scale / from_scale)
    rows = c[:, None] + psf.shape[0] // 2 + 0 * c[None, :]
    cols = c[None, :] + psf.shape[1] // 2 + 0 * c[:, None]
    out = ndimage.map_coordinates(psf, [rows, cols], order=3, mode="constant", cval=0.0, prefilter=True)
    out = np.clip(out, 0.0, None)
    if out.sum() <= 0:
        raise ValueError("resampled PSF is empty")
    return out / out.sum()


# ------------------------------------------------------------------------------------ caustics
def build_simulator(lens: LensParams, image_shape: tuple[int, int], image_pixscale: float,
                    source_npix: int, source_pixscale: float, supersample: int, psf: np.ndarray | None,
                    psf_mode: str = "fft", dtype=torch.float32, device="cpu", source=None):
    """A caustics ``LensSource`` whose only dynamic parameter is the source image (``sim([src])``).

    ``psf`` is at the supersampled scale ``image_pixscale / supersample`` (or None for no PSF).
    ``source`` replaces the pixelated source by another (static) caustics light model (tests)."""
    import caustics

    ny, nx = image_shape
    cosmo = caustics.FlatLambdaCDM(name="cosmo")
    kw = dict(cosmology=cosmo, x0=lens.x0, y0=lens.y0, q=lens.q, phi=lens.phi, Rein=lens.rein)
    if lens.model == "SIE":
        main = caustics.SIE(name="main", **kw)
    elif lens.model == "EPL":
        main = caustics.EPL(name="main", t=lens.t, **kw)
    else:
        raise ValueError(f"unknown lens model {lens.model!r} (SIE, EPL)")
    shear = caustics.ExternalShear(cosmology=cosmo, name="shear", x0=0.0, y0=0.0,
                                   gamma_1=lens.g1, gamma_2=lens.g2)
    system = caustics.SinglePlane(cosmology=cosmo, lenses=[main, shear], name="lens",
                                  z_l=lens.z_lens, z_s=lens.z_source)
    src = source if source is not None else caustics.Pixelated(
        name="src", image=None, shape=(source_npix, source_npix), x0=0.0, y0=0.0, pixelscale=source_pixscale)
    if psf is None:
        psf = np.ones((1, 1))
    sim = caustics.LensSource(lens=system, source=src, pixelscale=image_pixscale, pixels_x=nx, pixels_y=ny,
                              upsample_factor=supersample, psf=torch.as_tensor(psf, dtype=dtype),
                              psf_mode=psf_mode)
    sim.to(device=torch.device(device), dtype=dtype)
    return sim


def caustics_forward(sim, src: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """Batched caustics image (B, ny, nx) of sources (B, n_s, n_s) [mean surface brightness per pixel]."""
    outs = []
    with torch.no_grad():
        for i in range(0, src.shape[0], chunk):
            part = src[i:i + chunk]
            outs.append(torch.vmap(sim)(part.reshape(part.shape[0], -1)))
    return torch.cat(outs)


def assemble_matrix_probe(sim, source_npix: int, chunk: int = 256, device="cpu") -> torch.Tensor:
    """The linear map of ``sim`` as a sparse COO matrix (m = ny*nx, d = n_s^2), float32, by probing.

    Columns are unit source images sent through caustics itself (build ``sim`` with
    ``psf_mode='conv2d'``, whose zeros outside the PSF support are exact). Cost: d / chunk vmapped
    forwards (seconds at 32^2, ~20 s at 64^2 on one CPU thread); the reference for
    :func:`assemble_matrix`."""
    d = source_npix * source_npix
    idx_rows, idx_cols, vals = [], [], []
    with torch.no_grad():
        for i in range(0, d, chunk):
            b = min(chunk, d - i)
            e = torch.zeros(b, d, device=device, dtype=torch.float32)
            e[torch.arange(b, device=device), torch.arange(i, i + b, device=device)] = 1.0
            cols = torch.vmap(sim)(e).reshape(b, -1)          # (b, m)
            nz = cols.nonzero(as_tuple=True)
            idx_cols.append(nz[0] + i)
            idx_rows.append(nz[1])
            vals.append(cols[nz])
    m = cols.shape[1]
    ind = torch.stack([torch.cat(idx_rows), torch.cat(idx_cols)])
    return torch.sparse_coo_tensor(ind, torch.cat(vals), (m, d), check_invariants=False).coalesce()


def assemble_matrix(lens: LensParams, image_shape: tuple[int, int], image_pixscale: float, source_npix: int,
                    source_pixscale: float, supersample: int, psf: np.ndarray | None) -> torch.Tensor:
    """The caustics ``LensSource`` map as a sparse COO matrix (m = ny*nx, d = n_s^2), float32, built
    directly: M = Pool . Crop . Conv(PSF) . W, where W holds the bilinear weights of caustics' Pixelated
    source (``interp2d``, align_corners=False, linear extrapolation inside the outer half-pixel, zero
    beyond) at the ray-traced positions of the PSF-padded supersampled grid (traced by caustics in
    float64), Conv is the true convolution with the normalised PSF (caustics' conv2d/fft modes) and Pool
    the ss x ss average. Matches caustics to ~1e-7 relative (tested) at a cost of milliseconds."""
    k = normalised_psf(psf)
    sim = build_simulator(lens, image_shape, image_pixscale, source_npix, source_pixscale, int(supersample), k,
                          psf_mode="conv2d", dtype=torch.float64)
    gx, gy = sub_grid(image_shape, image_pixscale, int(supersample), k.shape)
    with torch.no_grad():
        bx, by = sim.lens.raytrace(gx, gy)
    idx, w, keep = bilinear_weights(bx.double(), by.double(), source_npix, source_pixscale)   # keep: in the field
    rows = torch.arange(gx.shape[0])[keep].repeat_interleave(4).numpy()
    d = source_npix * source_npix
    W = sp.coo_matrix((w[keep].reshape(-1).numpy(), (rows, idx[keep].reshape(-1).numpy())),
                      shape=(gx.shape[0], d)).tocsr()
    M = (pool_conv_matrix(image_shape, int(supersample), k) @ W).tocoo()
    M.eliminate_zeros()
    ind = torch.as_tensor(np.stack([M.row, M.col]).astype(np.int64))
    return torch.sparse_coo_tensor(ind, torch.as_tensor(M.data, dtype=torch.float32), (M.shape[0], d),
                                   check_invariants=False).coalesce()


# ------------------------------------------------------------------------------- the problem
class LensingProblem(LinearInverseProblem):
    """y = A(scale * x + offset) + n for a fixed lens, with A a sparse matrix (SCI units per unit of
    source surface brightness). ``x`` has shape (B, *x_shape) (default x_shape (1, n_s, n_s)) or
    (B, n_s, n_s) in NETWORK units; ``y``, ``sigma`` and ``mask`` have shape (ny, nx) in SCI units.
    ``log_likelihood`` is fully normalised in SCI units (float64), so log Z is p(y) in SCI's units."""

    def __init__(self, matrix: torch.Tensor, sigma, mask=None, *, image_shape, source_npix: int,
                 scale: float = 1.0, offset: float = 0.0, x_shape=None, meta: dict | None = None):
        super().__init__(sigma, mask)
        self.image_shape = tuple(int(v) for v in image_shape)
        if tuple(self.sigma.shape) != self.image_shape:
            raise ValueError(f"sigma shape {tuple(self.sigma.shape)} != image shape {self.image_shape}")
        self.source_npix = int(source_npix)
        self.d = self.source_npix ** 2
        self.x_shape = tuple(x_shape) if x_shape is not None else (1, self.source_npix, self.source_npix)
        if math.prod(self.x_shape) != self.d:
            raise ValueError(f"x_shape {self.x_shape} does not hold {self.d} source pixels")
        self.y_shape = self.image_shape
        if matrix.shape != (math.prod(self.image_shape), self.d):
            raise ValueError(f"matrix shape {tuple(matrix.shape)} != ({math.prod(self.image_shape)}, {self.d})")
        if matrix.layout == torch.sparse_csr:
            matrix = matrix.to_sparse_coo()
        elif matrix.layout == torch.strided:
            matrix = matrix.to_sparse()
        coo = matrix.coalesce().to(torch.float32)
        with warnings.catch_warnings():  # "sparse CSR support is in beta": matmul is all we use
            warnings.simplefilter("ignore", UserWarning)
            self.M = coo.to_sparse_csr()                       # (m, d), physical units
            self.MT = coo.t().coalesce().to_sparse_csr()       # (d, m)
        self.nnz = int(coo.values().numel())
        self.scale, self.offset = float(scale), float(offset)
        self.meta = dict(meta or {})
        self._update_offset_image()

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_lens(cls, lens: LensParams, *, image_shape, image_pixscale: float, source_npix: int,
                  source_pixscale: float, supersample: int, psf: np.ndarray | None, sigma, mask=None,
                  unit_factor: float = 1.0, scale: float = 1.0, offset: float = 0.0, x_shape=None,
                  device="cpu", meta: dict | None = None) -> "LensingProblem":
        """Assemble the sparse operator for ``lens`` once. ``psf`` is at the supersampled scale;
        ``unit_factor`` multiplies caustics' mean surface brightness (pixel area for flux per pixel)."""
        M = assemble_matrix(lens, tuple(image_shape), image_pixscale, source_npix, source_pixscale, supersample,
                            psf).to(device)
        if unit_factor != 1.0:
            M = torch.sparse_coo_tensor(M.indices(), M.values() * float(unit_factor), M.shape,
                                        check_invariants=False).coalesce()
        info = dict(lens=lens.as_dict(), image_pixscale=image_pixscale, source_pixscale=source_pixscale,
                    supersample=supersample, unit_factor=unit_factor)
        info.update(meta or {})
        prob = cls(M, torch.as_tensor(sigma, dtype=torch.float32), mask, image_shape=image_shape,
                   source_npix=source_npix, scale=scale, offset=offset, x_shape=x_shape, meta=info)
        return prob.to(device)

    def _update_offset_image(self):
        ones = torch.ones(self.d, 1, device=self.M.device)
        self.offset_image = (self.offset * (self.M @ ones)).reshape(self.image_shape)

    def set_brightness(self, scale: float, offset: float) -> "LensingProblem":
        """Change the network-to-physical map x_phys = scale * x + offset."""
        if not scale > 0:
            raise ValueError("brightness scale must be > 0")
        self.scale, self.offset = float(scale), float(offset)
        self._update_offset_image()
        return self

    # -- operator -------------------------------------------------------------------------------
    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim < 2 or x[0].numel() != self.d:
            raise ValueError(f"source batch of shape {tuple(x.shape)} does not match (B, {self.x_shape})")
        return x.reshape(x.shape[0], self.d)

    def physical_forward(self, x_phys: torch.Tensor) -> torch.Tensor:
        """M x_phys: the noiseless image (B, ny, nx) of physical sources (B, ..., n_s, n_s)."""
        xf = self._flat(x_phys).to(torch.float32)
        return (self.M @ xf.T).T.reshape(xf.shape[0], *self.image_shape)

    def A(self, x: torch.Tensor) -> torch.Tensor:
        """Linear part scale * M x of network-unit sources, (B, ny, nx)."""
        return self.scale * self.physical_forward(x)

    def AT(self, r: torch.Tensor) -> torch.Tensor:
        """Adjoint of A: image-space (B, ny, nx) -> source grid (B, *x_shape)."""
        rf = r.reshape(r.shape[0], -1).to(torch.float32)
        return (self.scale * (self.MT @ rf.T)).T.reshape(r.shape[0], *self.x_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Noiseless model A(scale * x + offset) in SCI units, (B, ny, nx)."""
        return self.A(x) + self.offset_image

    def data_for_linear(self, y: torch.Tensor) -> torch.Tensor:
        """y - offset_image: the data of the purely linear model y' = A x + n."""
        return y - self.offset_image

    def grad_log_likelihood(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        r = (y - self.forward(x)) / self.sigma ** 2 * self.mask
        return self.AT(r).to(x.dtype)

    # -- helpers for samplers / amortised networks ---------------------------------------------------
    def diag_AtA_over_sigma2(self) -> torch.Tensor:
        """diag(A^T diag(mask/sigma^2) A) on the source grid, shape x_shape (network units)."""
        w = (self.mask / self.sigma ** 2).reshape(-1, 1).to(torch.float32)
        # the same (valid) structure as MT, which was checked when built
        sq = torch.sparse_csr_tensor(self.MT.crow_indices(), self.MT.col_indices(), self.MT.values() ** 2,
                                     self.MT.shape, check_invariants=False)
        return (self.scale ** 2 * (sq @ w)).reshape(self.x_shape)

    def diag_precision(self, y: torch.Tensor) -> torch.Tensor:
        """diag(A^T A / sigma^2) for each of the observations y (B, ny, nx): (B, *x_shape)."""
        return self.diag_AtA_over_sigma2().to(y.device).expand(y.shape[0], *self.x_shape)

    def row_AtA_over_sigma2(self) -> torch.Tensor:
        """Row sums of |A|^T diag(mask/sigma^2) |A| on the source grid, shape x_shape (network units^-2):
        at least diag(A^T A / sigma^2), and a Gershgorin bound on every eigenvalue of A^T A / sigma^2.
        The physical part (M, mask, sigma fixed) is computed once and kept; ``to`` drops it."""
        if getattr(self, "_row_phys", None) is None:
            w = (self.mask / self.sigma ** 2).reshape(-1, 1).to(torch.float32)
            absT = torch.sparse_csr_tensor(self.MT.crow_indices(), self.MT.col_indices(), self.MT.values().abs(),
                                           self.MT.shape, check_invariants=False)
            image_sums = torch.sparse_csr_tensor(self.M.crow_indices(), self.M.col_indices(), self.M.values().abs(),
                                               self.M.shape, check_invariants=False) @ torch.ones(self.d, 1,
                                                                                                 device=w.device)
            self._row_phys = (absT @ (w * image_sums)).reshape(self.x_shape)
        return self.scale ** 2 * self._row_phys

    def row_precision(self, y: torch.Tensor) -> torch.Tensor:
        """:meth:`row_AtA_over_sigma2` for each of the observations y (B, ny, nx): (B, *x_shape)."""
        return self.row_AtA_over_sigma2().to(y.device).expand(y.shape[0], *self.x_shape)

    def backproject(self, y: torch.Tensor) -> torch.Tensor:
        """A^T (mask * (y - offset_image) / sigma^2) on the source grid: (B, *x_shape) for y (B, ny, nx)
        or x_shape for a single y (ny, nx)."""
        single = y.ndim == 2
        yb = y[None] if single else y
        r = (yb - self.offset_image) / self.sigma ** 2 * self.mask
        out = self.AT(r)
        return out[0] if single else out

    def dense_matrix(self) -> torch.Tensor:
        """The linear part scale * M as a dense (m, d) float64 matrix (all pixels, masked included)."""
        return self.scale * self.M.to_dense().double()

    def to(self, device) -> "LensingProblem":
        super().to(device)
        self.M, self.MT = self.M.to(device), self.MT.to(device)
        self.offset_image = self.offset_image.to(device)
        self._row_phys = None
        return self

    @property
    def device(self) -> torch.device:
        return self.sigma.device
