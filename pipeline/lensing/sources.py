"""Source galaxies on the source grid, in physical surface-brightness units.

Three kinds, concatenated and split into TRAIN / VALID / TEST by seed (stratified per kind):

* ``galsim``: parametric galaxies (Sersic bulge + exponential disk + RandomKnots clumps) with random
  flux, sizes, ellipticity, orientation and offset, convolved with a small Gaussian (knots are delta
  functions; DESIGN 5) and drawn without pixel response (``method='no_pixel'``).
* ``hst``: real shapes cut from ``skimage.data.hubble_deep_field()`` (a stretched JPEG composite: use for
  shapes only). Background-subtracted, centred on the flux-weighted centroid, neighbours removed by
  keeping only the target's dilated segment with a soft edge; one HDF pixel is mapped to one source
  pixel, and each stamp is rescaled to a random total flux from the config.
* ``user``: the user's FITS cube (N, ny, nx) with its pixel scale in the header (PIXSCALE, or a
  CD / CDELT matrix in arcsec or deg), values taken as surface brightness; bilinearly resampled to the
  source grid when the scale or shape differ (zero outside the cube).

Output values are surface brightness (default electron/s/arcsec^2): drawn flux per pixel / pixscale^2.
Array frame: [row = y, column = x], +x along columns; even grids centred on the corner between the four
central pixels (as caustics and GalSim's true centre).
"""

from __future__ import annotations

import functools
import logging
import math
import multiprocessing
import time

import numpy as np
from astropy.io import fits
from tqdm import tqdm

from pipeline.errors import InputFileError
from pipeline.lensing.config import GalSimConfig, HSTConfig, SourcesConfig
from pipeline.runtime import tqdm_disable

log = logging.getLogger(__name__)

SPLITS = ("TRAIN", "VALID", "TEST")
HST_CREDIT = ("Hubble eXtreme Deep Field (skimage.data.hubble_deep_field): NASA, ESA, G. Illingworth, "
              "D. Magee, P. Oesch (UCSC), R. Bouwens (Leiden), HUDF09 Team; public domain")


def _loguniform(rng, lo, hi):
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


# ------------------------------------------------------------------------------------------ GalSim
# Per-source generation parameters stored in the sources file (KINDS table), so that a source can be
# re-rendered at another pixel scale. Columns that do not apply to a kind hold NaN (floats) or -1 (ints).
GALSIM_PARAMS = ("FLUX", "BULGE_F", "BULGE_N", "BULGE_HLR", "DISK_HLR", "KNOT_F", "N_KNOTS", "KNOT_SEED", "G",
                 "BETA", "DX", "DY", "SMOOTH")
HST_PARAMS = ("FLUX", "HDF_LAB", "HDF_Y", "HDF_X")
INT_PARAMS = ("N_KNOTS", "KNOT_SEED", "HDF_LAB")


def draw_galsim_params(rng: np.random.Generator, cfg: GalSimConfig) -> dict:
    """The parameters of one parametric galaxy: FLUX [flux], BULGE_F, BULGE_N (NaN without bulge),
    BULGE_HLR / DISK_HLR [arcsec], KNOT_F, N_KNOTS, KNOT_SEED (GalSim seed of the knot positions, -1
    without knots), G (reduced shear of the disk; the bulge gets G/2), BETA [rad], DX / DY [arcsec] and
    SMOOTH (FWHM of the Gaussian convolved in) [arcsec]."""
    flux = _loguniform(rng, *cfg.flux)
    fb = rng.uniform(*cfg.bulge_fraction)
    fk = rng.uniform(*cfg.knots_fraction)
    nk = int(rng.integers(cfg.n_knots[0], cfg.n_knots[1] + 1))
    hd = rng.uniform(*cfg.disk_hlr)
    hb = min(rng.uniform(*cfg.bulge_hlr), hd)
    e = rng.uniform(*cfg.ellipticity)
    beta = rng.uniform(0.0, math.pi)
    dx, dy = rng.uniform(-cfg.offset, cfg.offset, size=2)
    n = rng.uniform(*cfg.bulge_n) if fb > 0 else float("nan")
    seed = int(rng.integers(1, 2**31 - 1)) if fb < 1 and fk > 0 else -1
    return {"FLUX": flux, "BULGE_F": float(fb), "BULGE_N": float(n), "BULGE_HLR": float(hb), "DISK_HLR": float(hd),
            "KNOT_F": float(fk), "N_KNOTS": nk, "KNOT_SEED": seed, "G": float(e), "BETA": float(beta),
            "DX": float(dx), "DY": float(dy), "SMOOTH": float(cfg.smooth_fwhm)}


def render_galsim(p: dict, npix: int, pixscale: float) -> np.ndarray:
    """The galaxy of parameters ``p`` (:func:`draw_galsim_params`) point-sampled on an npix x npix grid
    of ``pixscale`` [arcsec/px]: (npix, npix) float64 surface brightness [flux / arcsec^2]."""
    import galsim

    flux, fb, fk = p["FLUX"], p["BULGE_F"], p["KNOT_F"]
    hd, e = p["DISK_HLR"], p["G"]
    beta = p["BETA"] * galsim.radians
    parts = []
    if fb > 0:  # the bulge is rounder than the disk and shares its orientation
        parts.append(galsim.Sersic(n=p["BULGE_N"], half_light_radius=p["BULGE_HLR"], flux=flux * fb)
                     .shear(g=0.5 * e, beta=beta))
    disk_flux = flux * (1 - fb)
    if disk_flux > 0:
        disk = []
        if fk < 1:
            disk.append(galsim.Exponential(half_light_radius=hd, flux=disk_flux * (1 - fk)))
        if fk > 0:  # RandomKnots refuses flux=: the flux is set on its profile
            prof = galsim.Exponential(half_light_radius=hd, flux=disk_flux * fk)
            disk.append(galsim.RandomKnots(npoints=int(p["N_KNOTS"]), profile=prof,
                                           rng=galsim.BaseDeviate(int(p["KNOT_SEED"]))))
        parts.append(galsim.Add(disk).shear(g=e, beta=beta))
    gal = galsim.Add(parts).shift(p["DX"], p["DY"])
    gal = galsim.Convolve(gal, galsim.Gaussian(fwhm=p["SMOOTH"]))
    img = gal.drawImage(nx=npix, ny=npix, scale=pixscale, method="no_pixel").array
    return img.astype(np.float64) / pixscale ** 2


def galsim_galaxy(rng: np.random.Generator, cfg: GalSimConfig, npix: int, pixscale: float) -> np.ndarray:
    """One parametric galaxy (npix, npix) float64 in surface brightness [flux / arcsec^2]."""
    return render_galsim(draw_galsim_params(rng, cfg), npix, pixscale)


def galsim_sources(n: int, cfg: GalSimConfig, npix: int, pixscale: float, seed: int,
                   return_params: bool = False, workers: int = 1):
    """``n`` parametric galaxies (n, npix, npix) float32 [flux / arcsec^2], reproducible from ``seed``;
    with ``return_params`` also their parameters (list of dicts, :func:`draw_galsim_params`).

    All parameters are drawn first, in order, from one generator; rendering is a pure function of them,
    so ``workers`` > 1 processes give the same images bit for bit."""
    rng = np.random.default_rng(seed)
    params = [draw_galsim_params(rng, cfg) for _ in range(n)]
    out = np.zeros((n, npix, npix), np.float32)
    render = functools.partial(_render_params, npix=npix, pixscale=pixscale)
    if workers > 1 and n > 1:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            images = pool.imap(render, params, chunksize=max(1, n // (8 * workers)))
            for i, img in enumerate(tqdm(images, total=n, desc="galsim", disable=tqdm_disable())):
                out[i] = img
    else:
        for i, p in enumerate(tqdm(params, desc="galsim", disable=tqdm_disable())):
            out[i] = render(p)
    return (out, params) if return_params else out


def _render_params(p: dict, npix: int, pixscale: float) -> np.ndarray:
    return render_galsim(p, npix, pixscale)


# ---------------------------------------------------------------------------------------------- HST
def _hdf_image() -> tuple[np.ndarray, np.ndarray]:
    from skimage import data

    rgb = data.hubble_deep_field().astype(np.float64)
    return rgb.mean(-1), rgb.max(-1)


def hst_stamps(npix: int, cfg: HSTConfig, pixscale: float, seed: int, n_max: int = -1,
               return_params: bool = False):
    """Cut-outs (n, npix, npix) float32 [flux / arcsec^2] from the Hubble deep field JPEG.

    Detection: background = 51-px median (computed on a 4x-binned image for speed) subtracted; smoothed
    (Gaussian sigma 1) map thresholded at 3 MAD-sigma, opened, labelled. A target is kept if its area is
    >= ``min_area``, its bounding box <= 0.7 npix, it is not at the border, it has no saturated core
    (stars), and other objects' dilated segments cover < ``max_masked_fraction`` of its own dilated
    segment. The stamp is the background-subtracted image times a soft mask (target segment dilated by
    3 px, Gaussian-smoothed by 1 px) so neighbours and sky noise are removed; centred on the
    flux-weighted centroid with a sub-pixel shift; negatives clipped; flux log-uniform in ``cfg.flux``.
    With ``cfg.zoom != 1`` stamps of round(npix / zoom) HDF pixels are cut and bilinearly resampled to
    npix (zoom > 1 makes the galaxies larger on the source grid). With ``return_params`` also a list of
    dicts per stamp: FLUX [flux], HDF_LAB (the object's detection label), HDF_Y / HDF_X (its centroid,
    HDF pixels, row / column), which :func:`render_hdf` re-cuts at any scale.
    """
    cut = npix if cfg.zoom == 1 else max(8, 2 * int(round(npix / cfg.zoom / 2)))
    stamps, nlab, where = _hdf_candidates(cut, cfg.min_area, cfg.max_masked_fraction)
    if cut != npix:
        stamps = tuple(np.clip(resample_image(st, 1.0, cut / npix, npix), 0, None) for st in stamps)
    rng = np.random.default_rng(seed)
    # a seeded shuffle so that n_max picks a random subset
    order = rng.permutation(len(stamps))
    if n_max >= 0:
        order = order[:n_max]
    out = np.zeros((len(order), npix, npix), np.float32)
    params = []
    for i, j in enumerate(order):
        flux = _loguniform(rng, *cfg.flux)
        out[i] = stamps[j] / stamps[j].sum() * flux / pixscale ** 2
        k, cy, cx = where[j]
        params.append({"FLUX": flux, "HDF_LAB": int(k), "HDF_Y": float(cy), "HDF_X": float(cx)})
    log.info("HST deep field: %d labelled objects, %d usable %dx%d stamps", nlab, len(stamps), npix, npix)
    return (out, params) if return_params else out


@functools.lru_cache(maxsize=1)
def _hdf_detection() -> dict:
    """Background-subtracted HDF grey image ``res``, labels ``lab`` (``nlab`` objects), every segment
    dilated by 2 px ``grown`` (labels kept), the RGB maximum ``peak``, bounding ``slices`` and ``areas``
    [HDF px]; cached because several callers need the same detection."""
    from scipy import ndimage as ndi

    grey, peak = _hdf_image()
    small = grey[: grey.shape[0] // 4 * 4, : grey.shape[1] // 4 * 4]
    small = small.reshape(small.shape[0] // 4, 4, small.shape[1] // 4, 4).mean((1, 3))
    bg_small = ndi.median_filter(small, size=13, mode="reflect")
    bg = ndi.zoom(bg_small, 4, order=1)
    bg = np.pad(bg, ((0, grey.shape[0] - bg.shape[0]), (0, grey.shape[1] - bg.shape[1])), mode="edge")
    res = grey - bg
    sm = ndi.gaussian_filter(res, 1.0)
    sig = 1.4826 * np.median(np.abs(sm - np.median(sm)))
    det = ndi.binary_opening(sm > 3 * sig, iterations=1)
    lab, nlab = ndi.label(det)
    return {"res": res, "peak": peak, "lab": lab, "nlab": nlab, "slices": ndi.find_objects(lab),
            "areas": ndi.sum_labels(np.ones_like(lab), lab, index=np.arange(1, nlab + 1)),
            "grown": ndi.grey_dilation(lab, size=(5, 5))}


@functools.lru_cache(maxsize=4)
def _hdf_candidates(npix: int, min_area: int, max_masked_fraction: float) -> tuple[tuple, int, tuple]:
    """The usable stamps (unnormalised, deterministic order), the number of detections and, per stamp,
    (label, centroid row, centroid column) [HDF px]; cached because several callers ask for the same grid."""
    from scipy import ndimage as ndi

    d = _hdf_detection()
    res, peak, lab, grown = d["res"], d["peak"], d["lab"], d["grown"]
    half = npix // 2
    stamps, where = [], []
    for k, sl in enumerate(d["slices"], start=1):
        if sl is None or d["areas"][k - 1] < min_area:
            continue
        h, w = sl[0].stop - sl[0].start, sl[1].stop - sl[1].start
        if max(h, w) > 0.7 * npix:
            continue
        cy, cx = ndi.center_of_mass(np.clip(res[sl], 0, None) * (lab[sl] == k))
        cy += sl[0].start
        cx += sl[1].start
        r0, c0 = int(round(cy)) - half - 2, int(round(cx)) - half - 2
        r1, c1 = r0 + npix + 4, c0 + npix + 4
        if r0 < 0 or c0 < 0 or r1 > res.shape[0] or c1 > res.shape[1]:
            continue
        cut_lab = lab[r0:r1, c0:c1]
        target = cut_lab == k
        if (peak[r0:r1, c0:c1][target] >= 250).sum() >= 4:   # saturated core: a star
            continue
        target_grown = ndi.binary_dilation(target, iterations=3)
        others = (grown[r0:r1, c0:c1] > 0) & (grown[r0:r1, c0:c1] != k)
        if (others & target_grown).sum() >= max_masked_fraction * target_grown.sum():
            continue
        weight = ndi.gaussian_filter((target_grown & ~others).astype(np.float64), 1.0)
        stamp = res[r0:r1, c0:c1] * weight
        # sub-pixel centring: the flux-weighted centroid goes to the grid centre (between pixels)
        sy, sx = (r0 + (npix + 4 - 1) / 2) - cy, (c0 + (npix + 4 - 1) / 2) - cx
        stamp = ndi.shift(stamp, (sy, sx), order=1, mode="constant")[2:-2, 2:-2]
        stamp = np.clip(stamp, 0, None)
        if stamp.sum() <= 0:
            continue
        stamps.append(stamp)
        where.append((k, float(cy), float(cx)))
    return tuple(stamps), d["nlab"], tuple(where)


def render_hdf(label: int, cy: float, cx: float, npix: int, spacing: float, path=None) -> np.ndarray:
    """HDF object ``label`` re-cut around its centroid (``cy``, ``cx``) [HDF px] on an npix x npix grid
    whose pixel centres are ``spacing`` HDF pixels apart (grid centre on the centroid): the
    background-subtracted image times the soft mask of :func:`hst_stamps` (on a window large enough
    for the grid), bilinearly interpolated, negatives clipped, zero outside the HDF. Unnormalised
    (n, n) float64 [JPEG grey levels]; ``path`` only names the sources file in errors."""
    from scipy import ndimage as ndi

    d = _hdf_detection()
    res, lab, grown = d["res"], d["lab"], d["grown"]
    if not 1 <= int(label) <= d["nlab"]:
        raise InputFileError(path or "hubble_deep_field", f"HDF label {label} is not a detected object "
                             f"(1..{d['nlab']})", field="KINDS.HDF_LAB")
    half = int(math.ceil(npix * spacing / 2)) + 6
    r0, c0 = max(0, int(round(cy)) - half), max(0, int(round(cx)) - half)
    r1, c1 = min(res.shape[0], int(round(cy)) + half + 1), min(res.shape[1], int(round(cx)) + half + 1)
    target_grown = ndi.binary_dilation(lab[r0:r1, c0:c1] == label, iterations=3)
    if not target_grown.any():
        raise InputFileError(path or "hubble_deep_field", f"HDF object {label} is not near ({cy:.1f}, {cx:.1f})",
                             field="KINDS.HDF_Y")
    others = (grown[r0:r1, c0:c1] > 0) & (grown[r0:r1, c0:c1] != label)
    weight = ndi.gaussian_filter((target_grown & ~others).astype(np.float64), 1.0)
    stamp = res[r0:r1, c0:c1] * weight
    c = (np.arange(npix) - (npix - 1) / 2) * spacing
    rows = cy - r0 + c[:, None] + 0 * c[None, :]
    cols = cx - c0 + c[None, :] + 0 * c[:, None]
    out = ndi.map_coordinates(stamp, [rows, cols], order=1, mode="constant", cval=0.0)
    return np.clip(out, 0, None)


# --------------------------------------------------------------------------------------------- user
def header_pixscale(header, path, field: str) -> float | None:
    """Pixel scale [arcsec/px] from PIXSCALE, or a CD / PC*CDELT matrix (CUNIT arcsec or deg)."""
    if "PIXSCALE" in header:
        v = float(header["PIXSCALE"])
        if not v > 0:
            raise InputFileError(path, f"PIXSCALE must be > 0, got {v}", field=f"{field}.PIXSCALE")
        return v
    try:
        J = pixel_matrix(header)
    except KeyError:
        return None
    unit = str(header.get("CUNIT1", "deg")).strip().lower()
    fac = {"arcsec": 1.0, "deg": 3600.0, "arcmin": 60.0}.get(unit)
    if fac is None:
        raise InputFileError(path, f"unsupported CUNIT1 {unit!r} (arcsec, arcmin, deg)", field=f"{field}.CUNIT1")
    return float(math.sqrt(abs(np.linalg.det(J)))) * fac


def pixel_matrix(header) -> np.ndarray:
    """The 2x2 pixel->world matrix (world units per pixel) from CD, or PC*CDELT; KeyError if absent."""
    if "CD1_1" in header or "CD2_2" in header:
        return np.array([[header.get("CD1_1", 0.0), header.get("CD1_2", 0.0)],
                         [header.get("CD2_1", 0.0), header.get("CD2_2", 0.0)]], dtype=np.float64)
    if "CDELT1" in header and "CDELT2" in header:
        pc = np.array([[header.get("PC1_1", 1.0), header.get("PC1_2", 0.0)],
                       [header.get("PC2_1", 0.0), header.get("PC2_2", 1.0)]], dtype=np.float64)
        return pc * np.array([[header["CDELT1"]], [header["CDELT2"]]], dtype=np.float64)
    raise KeyError("no CD or CDELT")


def resample_image(img: np.ndarray, from_scale: float, to_scale: float, npix: int) -> np.ndarray:
    """Bilinear samples of a surface-brightness map at the centres of an npix x npix grid of
    spacing ``to_scale``, both grids centred on their array centres; zero outside the input."""
    from scipy import ndimage as ndi

    ny, nx = img.shape
    c = (np.arange(npix) - (npix - 1) / 2) * to_scale / from_scale
    rows = c[:, None] + (ny - 1) / 2 + 0 * c[None, :]
    cols = c[None, :] + (nx - 1) / 2 + 0 * c[:, None]
    return ndi.map_coordinates(img, [rows, cols], order=1, mode="constant", cval=0.0)


def user_sources(path, npix: int, pixscale: float, hdu: str | None = None) -> np.ndarray:
    """The user's cube (N, ny, nx) as (N, npix, npix) float32 surface brightness on the source grid."""
    from pipeline.io.fits import _open

    with _open(path) as hdul:
        if hdu is not None:
            if hdu.upper() not in [h.name for h in hdul]:
                raise InputFileError(path, f"no HDU named {hdu!r}", field=hdu)
            h = hdul[hdu]
        else:
            h = next((x for x in hdul if getattr(x, "data", None) is not None and x.data.ndim == 3), None)
            if h is None:
                raise InputFileError(path, "no 3-D image HDU (N, ny, nx) found", field="PRIMARY")
        name = h.name or "PRIMARY"
        data, header = h.data, h.header.copy()
    if data is None or data.ndim != 3:
        raise InputFileError(path, f"expected a cube (N, ny, nx), got shape {None if data is None else data.shape}",
                             field=name)
    cube = np.asarray(data, dtype=np.float64)
    if not np.isfinite(cube).all():
        raise InputFileError(path, "cube contains NaN or infinite values", field=name)
    scale = header_pixscale(header, path, name)
    if scale is None:
        raise InputFileError(path, "pixel scale missing: set PIXSCALE [arcsec/pixel] or a CD/CDELT matrix",
                             field=f"{name}.PIXSCALE")
    if cube.shape[1:] == (npix, npix) and abs(scale / pixscale - 1) < 1e-6:
        return cube.astype(np.float32)
    log.info("resampling user cube %s from %.4g\"/px %s to %.4g\"/px (%d, %d)", path, scale, cube.shape[1:],
             pixscale, npix, npix)
    return np.stack([resample_image(im, scale, pixscale, npix) for im in cube]).astype(np.float32)


# -------------------------------------------------------------------------------------- the cube
def split_indices(n: int, fractions, rng: np.random.Generator) -> list[np.ndarray]:
    """Random disjoint index sets of sizes round(cumulative fraction * n) for TRAIN, VALID, TEST."""
    perm = rng.permutation(n)
    cuts = np.round(np.cumsum(fractions) * n).astype(int)
    cuts[-1] = n
    return [np.sort(a) for a in np.split(perm, cuts[:-1])]


def build_sources(cfg: SourcesConfig, npix: int, pixscale: float, workers: int = 1) -> dict:
    """All configured kinds, split by ``cfg.seed``. Returns {'splits': {name: array}, 'kinds':
    {name: list of kind strings}, 'params': {name: list of generation-parameter dicts (empty for user
    sources)}, 'counts': {kind: {split: n}}, 'seconds': {kind: s}}. ``workers``: processes rendering the
    GalSim galaxies (the result does not depend on it)."""
    kinds: dict[str, np.ndarray] = {}
    kind_params: dict[str, list] = {}
    seconds = {}
    ss = np.random.SeedSequence(cfg.seed)
    s_gal, s_hst, s_split = (int(s.generate_state(1)[0]) for s in ss.spawn(3))
    if cfg.n_galsim > 0:
        t = time.perf_counter()
        kinds["galsim"], kind_params["galsim"] = galsim_sources(cfg.n_galsim, cfg.galsim, npix, pixscale, s_gal,
                                                                return_params=True, workers=workers)
        seconds["galsim"] = time.perf_counter() - t
    if cfg.n_hst != 0:
        t = time.perf_counter()
        kinds["hst"], kind_params["hst"] = hst_stamps(npix, cfg.hst, pixscale, s_hst, n_max=cfg.n_hst,
                                                      return_params=True)
        seconds["hst"] = time.perf_counter() - t
    if cfg.user_cube:
        t = time.perf_counter()
        kinds["user"] = user_sources(cfg.user_cube, npix, pixscale, cfg.user_hdu)
        kind_params["user"] = [{} for _ in kinds["user"]]
        seconds["user"] = time.perf_counter() - t
    rng = np.random.default_rng(s_split)
    splits = {s: [] for s in SPLITS}
    labels = {s: [] for s in SPLITS}
    params = {s: [] for s in SPLITS}
    counts = {}
    for kind, arr in kinds.items():
        parts = split_indices(len(arr), cfg.split, rng)
        counts[kind] = {}
        for s, idx in zip(SPLITS, parts):
            splits[s].append(arr[idx])
            labels[s] += [kind] * len(idx)
            params[s] += [kind_params[kind][i] for i in idx]
            counts[kind][s] = int(len(idx))
    out = {}
    for s in SPLITS:
        arr = np.concatenate(splits[s]) if splits[s] else np.zeros((0, npix, npix), np.float32)
        # shuffle kinds together inside each split (seeded), keeping labels aligned
        perm = rng.permutation(len(arr))
        out[s] = arr[perm].astype(np.float32)
        labels[s] = [labels[s][i] for i in perm]
        params[s] = [params[s][i] for i in perm]
    return {"splits": out, "kinds": labels, "params": params, "counts": counts, "seconds": seconds}


def write_sources(path, result: dict, cfg: SourcesConfig, npix: int, pixscale: float, cfg_hash: str):
    """One FITS file: primary (provenance), ImageHDUs TRAIN / VALID / TEST (N, n, n) float32 and a
    KINDS table (SPLIT, INDEX, KIND and, when ``result`` has 'params', the generation parameters
    GALSIM_PARAMS / HST_PARAMS: NaN or -1 where a column does not apply). Written atomically with
    checksums."""
    from pipeline import __version__
    from pipeline.io.fits import write_fits_atomic

    prim = fits.PrimaryHDU()
    h = prim.header
    h["CONTENT"] = ("source galaxies", "HDUs TRAIN, VALID, TEST (N, ny, nx)")
    h["SEED"] = (cfg.seed, "split / draw seed")
    h["CFGHASH"] = (cfg_hash, "config hash of lensing.sources")
    h["PKGVER"] = (__version__, "pipeline version")
    h["PIXSCALE"] = (pixscale, "[arcsec/pixel] source grid")
    h["SRCNPIX"] = (npix, "source grid size")
    h["BUNIT"] = (cfg.bunit, "surface brightness")
    for kind, key in (("galsim", "NGALSIM"), ("hst", "NHST"), ("user", "NUSER")):
        h[key] = (sum(result["counts"].get(kind, {}).values()), f"number of {kind} sources")
    if "hst" in result["counts"]:
        h["HSTCRED"] = HST_CREDIT
    if cfg.user_cube:
        h["USERCUBE"] = str(cfg.user_cube)[-60:]
    hdus = [prim]
    rows_split, rows_idx, rows_kind, rows_par = [], [], [], []
    for s in SPLITS:
        arr = result["splits"][s]
        hdu = fits.ImageHDU(arr, name=s)
        hh = hdu.header
        hh["BUNIT"] = cfg.bunit
        hh["PIXSCALE"] = (pixscale, "[arcsec/pixel]")
        for ax in (1, 2):
            hh[f"CTYPE{ax}"] = ("OFFSET_X" if ax == 1 else "OFFSET_Y", "array frame, source plane")
            hh[f"CUNIT{ax}"] = "arcsec"
            hh[f"CDELT{ax}"] = pixscale
            hh[f"CRPIX{ax}"] = (npix + 1) / 2
            hh[f"CRVAL{ax}"] = 0.0
        for kind, key in (("galsim", "NGALSIM"), ("hst", "NHST"), ("user", "NUSER")):
            hh[key] = result["counts"].get(kind, {}).get(s, 0)
        hdus.append(hdu)
        rows_split += [s] * len(arr)
        rows_idx += list(range(len(arr)))
        rows_kind += result["kinds"][s]
        rows_par += result.get("params", {}).get(s, [{}] * len(arr))
    cols = [
        fits.Column(name="SPLIT", format="5A", array=np.array(rows_split, dtype="U5")),
        fits.Column(name="INDEX", format="J", array=np.array(rows_idx, dtype=np.int32)),
        fits.Column(name="KIND", format="6A", array=np.array(rows_kind, dtype="U6")),
    ]
    if "params" in result:
        for name in dict.fromkeys(GALSIM_PARAMS + HST_PARAMS):
            if name in INT_PARAMS:
                vals = np.array([int(p.get(name, -1)) for p in rows_par], dtype=np.int64)
                cols.append(fits.Column(name=name, format="K", array=vals))
            else:
                vals = np.array([float(p.get(name, np.nan)) for p in rows_par], dtype=np.float64)
                cols.append(fits.Column(name=name, format="D", array=vals))
    table = fits.BinTableHDU.from_columns(cols, name="KINDS")
    hdus.append(table)
    return write_fits_atomic(path, fits.HDUList(hdus))


def read_sources(path, split: str = "TRAIN") -> tuple[np.ndarray, fits.Header]:
    """(N, n, n) float32 sources of one split and that HDU's header."""
    from pipeline.io.fits import _open

    split = split.upper()
    if split not in SPLITS:
        raise InputFileError(path, f"unknown split {split!r} (TRAIN, VALID, TEST)", field=split)
    with _open(path) as hdul:
        if split not in [h.name for h in hdul]:
            raise InputFileError(path, f"no HDU named {split!r}", field=split)
        hdu = hdul[split]
        header = hdu.header.copy()
        data = hdu.data
        n = int(header.get("NAXIS1", 0))
        arr = (np.zeros((0, n, n), np.float32) if data is None or data.size == 0
               else np.ascontiguousarray(data, dtype=np.float32))
    if arr.ndim != 3:
        raise InputFileError(path, f"expected (N, n, n), got shape {arr.shape}", field=split)
    if not np.isfinite(arr).all():
        raise InputFileError(path, "sources contain NaN or infinite values", field=split)
    return arr, header


# ------------------------------------------------------------------------------- finer re-rendering
HDF_PER_SOURCE_PIXEL = 2.0   # held-out HDF objects: HDF pixels per source pixel (real detail below it)


def read_source_records(path, split: str = "TEST") -> list[dict]:
    """Per source of ``split`` (in index order): {'KIND': 'galsim' / 'hst' / 'user', plus the generation
    parameters the KINDS table holds for that kind (GALSIM_PARAMS / HST_PARAMS; none for user)}."""
    from pipeline.io.fits import _open

    split = split.upper()
    with _open(path) as hdul:
        if "KINDS" not in [h.name for h in hdul]:
            raise InputFileError(path, "no KINDS table (rebuild with `python -m pipeline sources`)", field="KINDS")
        tab = hdul["KINDS"].data
        names = [c.upper() for c in tab.columns.names]
        rows = np.nonzero(np.char.strip(np.asarray(tab["SPLIT"]).astype(str)) == split)[0]
        rows = rows[np.argsort(np.asarray(tab["INDEX"])[rows], kind="stable")]
        out = []
        for r in rows:
            kind = str(tab["KIND"][r]).strip()
            keys = {"galsim": GALSIM_PARAMS, "hst": HST_PARAMS}.get(kind, ())
            rec = {"KIND": kind}
            for k in keys:
                if k in names:
                    v = tab[k][r]
                    rec[k] = int(v) if k in INT_PARAMS else float(v)
            out.append(rec)
    return out


def block_average(img: np.ndarray, factor: int) -> np.ndarray:
    """Mean over factor x factor blocks: (..., f n, f n) -> (..., n, n). Surface brightness keeps its
    unit, so the total flux (sum x pixel area) is unchanged."""
    img = np.asarray(img, np.float64)
    *lead, ny, nx = img.shape
    if ny % factor or nx % factor:
        raise ValueError(f"shape {img.shape[-2:]} is not a multiple of the factor {factor}")
    return img.reshape(*lead, ny // factor, factor, nx // factor, factor).mean(axis=(-3, -1))


def render_source_fine(record: dict, coarse: np.ndarray, pixscale: float, factor: int, path=None,
                       index: int | None = None) -> np.ndarray:
    """A source re-rendered on the grid ``factor`` times finer than its coarse map ``coarse`` (n, n) of
    ``pixscale`` [arcsec/px], same field: (f n, f n) float64 surface brightness [flux / arcsec^2].

    * galsim: redrawn from its parameters at pixscale / f (point samples, as on the coarse grid).
    * hst: its HDF object re-cut at HDF_PER_SOURCE_PIXEL HDF pixels per source pixel (one HDF pixel
      per fine pixel at f = 2), scaled to its recorded total flux.
    * user (no generation parameters): constant over each coarse pixel.
    ``path`` / ``index`` only name the sources file and the source in errors."""
    kind = record["KIND"]
    n = coarse.shape[-1]
    nf, pf = n * factor, pixscale / factor
    keys = {"galsim": GALSIM_PARAMS, "hst": HST_PARAMS}.get(kind, ())
    missing = [k for k in keys if k not in record or (k not in ("BULGE_N",) and not np.isfinite(record[k]))]
    if missing:
        raise InputFileError(path or "sources", f"{kind} source {index} has no generation parameter {missing[0]} "
                             "(rebuild the sources file with `python -m pipeline sources`)",
                             field=f"KINDS.{missing[0]}")
    if kind == "galsim":
        return render_galsim(record, nf, pf)
    if kind == "hst":
        img = render_hdf(record["HDF_LAB"], record["HDF_Y"], record["HDF_X"], nf, HDF_PER_SOURCE_PIXEL / factor, path)
        if not img.sum() > 0:
            raise InputFileError(path or "sources", f"hst source {index}: empty HDF cut", field="KINDS.HDF_LAB")
        return img / img.sum() * record["FLUX"] / pf ** 2
    return np.repeat(np.repeat(np.asarray(coarse, np.float64), factor, -2), factor, -1)
