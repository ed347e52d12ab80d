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
import time

import numpy as np
from astropy.io import fits

from pipeline.errors import InputFileError
from pipeline.lensing.config import GalSimConfig, HSTConfig, SourcesConfig

log = logging.getLogger(__name__)

SPLITS = ("TRAIN", "VALID", "TEST")
HST_CREDIT = ("Hubble eXtreme Deep Field (skimage.data.hubble_deep_field): NASA, ESA, G. Illingworth, "
              "D. Magee, P. Oesch (UCSC), R. Bouwens (Leiden), HUDF09 Team; public domain")


def _loguniform(rng, lo, hi):
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


# ------------------------------------------------------------------------------------------ GalSim
def galsim_galaxy(rng: np.random.Generator, cfg: GalSimConfig, npix: int, pixscale: float) -> np.ndarray:
    """One parametric galaxy (npix, npix) float64 in surface brightness [flux / arcsec^2]."""
    import galsim

    flux = _loguniform(rng, *cfg.flux)
    fb = rng.uniform(*cfg.bulge_fraction)
    fk = rng.uniform(*cfg.knots_fraction)
    nk = int(rng.integers(cfg.n_knots[0], cfg.n_knots[1] + 1))
    hd = rng.uniform(*cfg.disk_hlr)
    hb = min(rng.uniform(*cfg.bulge_hlr), hd)
    e = rng.uniform(*cfg.ellipticity)
    beta = rng.uniform(0.0, math.pi)
    dx, dy = rng.uniform(-cfg.offset, cfg.offset, size=2)
    shape = dict(g=e, beta=beta * galsim.radians)
    parts = []
    if fb > 0:  # the bulge is rounder than the disk and shares its orientation
        n = rng.uniform(*cfg.bulge_n)
        parts.append(galsim.Sersic(n=n, half_light_radius=hb, flux=flux * fb).shear(g=0.5 * e, beta=shape["beta"]))
    disk_flux = flux * (1 - fb)
    if disk_flux > 0:
        disk = []
        if fk < 1:
            disk.append(galsim.Exponential(half_light_radius=hd, flux=disk_flux * (1 - fk)))
        if fk > 0:  # RandomKnots refuses flux=: the flux is set on its profile
            prof = galsim.Exponential(half_light_radius=hd, flux=disk_flux * fk)
            disk.append(galsim.RandomKnots(npoints=nk, profile=prof,
                                           rng=galsim.BaseDeviate(int(rng.integers(1, 2**31 - 1)))))
        parts.append(galsim.Add(disk).shear(**shape))
    gal = galsim.Add(parts).shift(dx, dy)
    gal = galsim.Convolve(gal, galsim.Gaussian(fwhm=cfg.smooth_fwhm))
    img = gal.drawImage(nx=npix, ny=npix, scale=pixscale, method="no_pixel").array
    return img.astype(np.float64) / pixscale ** 2


def galsim_sources(n: int, cfg: GalSimConfig, npix: int, pixscale: float, seed: int) -> np.ndarray:
    """``n`` parametric galaxies (n, npix, npix) float32 [flux / arcsec^2], reproducible from ``seed``."""
    from tqdm import tqdm

    from pipeline.runtime import tqdm_disable

    rng = np.random.default_rng(seed)
    out = np.zeros((n, npix, npix), np.float32)
    for i in tqdm(range(n), desc="galsim", disable=tqdm_disable()):
        out[i] = galsim_galaxy(rng, cfg, npix, pixscale)
    return out


# ---------------------------------------------------------------------------------------------- HST
def _hdf_image() -> tuple[np.ndarray, np.ndarray]:
    from skimage import data

    rgb = data.hubble_deep_field().astype(np.float64)
    return rgb.mean(-1), rgb.max(-1)


def hst_stamps(npix: int, cfg: HSTConfig, pixscale: float, seed: int, n_max: int = -1) -> np.ndarray:
    """Cut-outs (n, npix, npix) float32 [flux / arcsec^2] from the Hubble deep field JPEG.

    Detection: background = 51-px median (computed on a 4x-binned image for speed) subtracted; smoothed
    (Gaussian sigma 1) map thresholded at 3 MAD-sigma, opened, labelled. A target is kept if its area is
    >= ``min_area``, its bounding box <= 0.7 npix, it is not at the border, it has no saturated core
    (stars), and other objects' dilated segments cover < ``max_masked_fraction`` of its own dilated
    segment. The stamp is the background-subtracted image times a soft mask (target segment dilated by
    3 px, Gaussian-smoothed by 1 px) so neighbours and sky noise are removed; centred on the
    flux-weighted centroid with a sub-pixel shift; negatives clipped; flux log-uniform in ``cfg.flux``.
    With ``cfg.zoom != 1`` stamps of round(npix / zoom) HDF pixels are cut and bilinearly resampled to
    npix (zoom > 1 makes the galaxies larger on the source grid).
    """
    cut = npix if cfg.zoom == 1 else max(8, 2 * int(round(npix / cfg.zoom / 2)))
    stamps, nlab = _hdf_candidates(cut, cfg.min_area, cfg.max_masked_fraction)
    if cut != npix:
        stamps = tuple(np.clip(resample_image(st, 1.0, cut / npix, npix), 0, None) for st in stamps)
    rng = np.random.default_rng(seed)
    # a seeded shuffle so that n_max picks a random subset
    order = rng.permutation(len(stamps))
    if n_max >= 0:
        order = order[:n_max]
    out = np.zeros((len(order), npix, npix), np.float32)
    for i, j in enumerate(order):
        flux = _loguniform(rng, *cfg.flux)
        out[i] = stamps[j] / stamps[j].sum() * flux / pixscale ** 2
    log.info("HST deep field: %d labelled objects, %d usable %dx%d stamps", nlab, len(stamps), npix, npix)
    return out


@functools.lru_cache(maxsize=4)
def _hdf_candidates(npix: int, min_area: int, max_masked_fraction: float) -> tuple[tuple, int]:
    """The usable stamps (unnormalised, deterministic order) and the number of detections; cached
    because detection is the slow part and several callers ask for the same grid."""
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
    slices = ndi.find_objects(lab)
    areas = ndi.sum_labels(np.ones_like(lab), lab, index=np.arange(1, nlab + 1))
    grown = ndi.grey_dilation(lab, size=(5, 5))  # every segment dilated by 2 px, labels kept
    half = npix // 2
    stamps = []
    for k, sl in enumerate(slices, start=1):
        if sl is None or areas[k - 1] < min_area:
            continue
        h, w = sl[0].stop - sl[0].start, sl[1].stop - sl[1].start
        if max(h, w) > 0.7 * npix:
            continue
        cy, cx = ndi.center_of_mass(np.clip(res[sl], 0, None) * (lab[sl] == k))
        cy += sl[0].start
        cx += sl[1].start
        r0, c0 = int(round(cy)) - half - 2, int(round(cx)) - half - 2
        r1, c1 = r0 + npix + 4, c0 + npix + 4
        if r0 < 0 or c0 < 0 or r1 > grey.shape[0] or c1 > grey.shape[1]:
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
    return tuple(stamps), nlab


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


def build_sources(cfg: SourcesConfig, npix: int, pixscale: float) -> dict:
    """All configured kinds, split by ``cfg.seed``. Returns {'splits': {name: array}, 'kinds':
    {name: list of kind strings}, 'counts': {kind: {split: n}}, 'seconds': {kind: s}}."""
    kinds: dict[str, np.ndarray] = {}
    seconds = {}
    ss = np.random.SeedSequence(cfg.seed)
    s_gal, s_hst, s_split = (int(s.generate_state(1)[0]) for s in ss.spawn(3))
    if cfg.n_galsim > 0:
        t = time.perf_counter()
        kinds["galsim"] = galsim_sources(cfg.n_galsim, cfg.galsim, npix, pixscale, s_gal)
        seconds["galsim"] = time.perf_counter() - t
    if cfg.n_hst != 0:
        t = time.perf_counter()
        kinds["hst"] = hst_stamps(npix, cfg.hst, pixscale, s_hst, n_max=cfg.n_hst)
        seconds["hst"] = time.perf_counter() - t
    if cfg.user_cube:
        t = time.perf_counter()
        kinds["user"] = user_sources(cfg.user_cube, npix, pixscale, cfg.user_hdu)
        seconds["user"] = time.perf_counter() - t
    rng = np.random.default_rng(s_split)
    splits = {s: [] for s in SPLITS}
    labels = {s: [] for s in SPLITS}
    counts = {}
    for kind, arr in kinds.items():
        parts = split_indices(len(arr), cfg.split, rng)
        counts[kind] = {}
        for s, idx in zip(SPLITS, parts):
            splits[s].append(arr[idx])
            labels[s] += [kind] * len(idx)
            counts[kind][s] = int(len(idx))
    out = {}
    for s in SPLITS:
        arr = np.concatenate(splits[s]) if splits[s] else np.zeros((0, npix, npix), np.float32)
        # shuffle kinds together inside each split (seeded), keeping labels aligned
        perm = rng.permutation(len(arr))
        out[s] = arr[perm].astype(np.float32)
        labels[s] = [labels[s][i] for i in perm]
    return {"splits": out, "kinds": labels, "counts": counts, "seconds": seconds}


def write_sources(path, result: dict, cfg: SourcesConfig, npix: int, pixscale: float, cfg_hash: str):
    """One FITS file: primary (provenance), ImageHDUs TRAIN / VALID / TEST (N, n, n) float32 and a
    KINDS table (SPLIT, INDEX, KIND). Written atomically with checksums."""
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
    rows_split, rows_idx, rows_kind = [], [], []
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
    table = fits.BinTableHDU.from_columns([
        fits.Column(name="SPLIT", format="5A", array=np.array(rows_split, dtype="U5")),
        fits.Column(name="INDEX", format="J", array=np.array(rows_idx, dtype=np.int32)),
        fits.Column(name="KIND", format="6A", array=np.array(rows_kind, dtype="U6")),
    ], name="KINDS")
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
