"""Real galaxy shapes cut from the Hubble deep field (``skimage.data.hubble_deep_field()``).

The image is a stretched JPEG composite: use it for shapes only. Stamps are background-subtracted,
centred on the flux-weighted centroid, with neighbours removed by keeping only the target's dilated
segment with a soft edge; one HDF pixel is mapped to one source pixel (``zoom`` changes that), and each
stamp is rescaled to a random total flux. Values are surface brightness [flux / arcsec^2]. Each stamp's
detection label and centroid are kept (:data:`HST_PARAMS`) so that it can be re-cut at another scale.
"""

from __future__ import annotations

import functools
import logging
import math

import numpy as np
from scipy import ndimage as ndi
from skimage.data import hubble_deep_field

from pipeline.errors import InputFileError
from pipeline.lensing.config import HSTConfig
from pipeline.lensing.grids import resample_image
from pipeline.lensing.sources_galsim import loguniform

log = logging.getLogger(__name__)

HST_CREDIT = ("Hubble eXtreme Deep Field (skimage.data.hubble_deep_field): NASA, ESA, G. Illingworth, "
              "D. Magee, P. Oesch (UCSC), R. Bouwens (Leiden), HUDF09 Team; public domain")
# Per-stamp generation parameters, the hst columns of the sources file's KINDS table.
HST_PARAMS = ("FLUX", "HDF_LAB", "HDF_Y", "HDF_X")
HDF_PER_SOURCE_PIXEL = 2.0   # held-out HDF objects: HDF pixels per source pixel (real detail below it)


def _hdf_image() -> tuple[np.ndarray, np.ndarray]:
    """The deep field's grey image (RGB mean) and RGB maximum, (ny, nx) float64 [JPEG levels 0..255]."""
    rgb = hubble_deep_field().astype(np.float64)
    return rgb.mean(-1), rgb.max(-1)


def hst_stamps(npix: int, cfg: HSTConfig, pixscale: float, seed: int, n_max: int = -1,
               return_params: bool = False):
    """Cut-outs (n, npix, npix) float32 [flux / arcsec^2] from the Hubble deep field JPEG, on a grid of
    ``pixscale`` [arcsec/px].

    Detection: background = 51-px median (computed on a 4x-binned image for speed) subtracted; smoothed
    (Gaussian sigma 1) map thresholded at 3 MAD-sigma, opened, labelled. A target is kept if its area is
    >= ``min_area``, its bounding box <= 0.7 npix, it is not at the border, it has no saturated core
    (stars), and other objects' dilated segments cover < ``max_masked_fraction`` of its own dilated
    segment. The stamp is the background-subtracted image times a soft mask (target segment dilated by
    3 px, Gaussian-smoothed by 1 px) so neighbours and sky noise are removed; centred on the
    flux-weighted centroid with a sub-pixel shift; negatives clipped; flux log-uniform in ``cfg.flux``.
    With ``cfg.zoom != 1`` stamps of round(npix / zoom) HDF pixels are cut and bilinearly resampled to
    npix (zoom > 1 makes the galaxies larger on the source grid). ``n_max`` >= 0 keeps a seeded random
    subset of that many. With ``return_params`` also a list of dicts per stamp: FLUX [flux], HDF_LAB
    (the object's detection label), HDF_Y / HDF_X (its centroid, HDF pixels, row / column), which
    :func:`render_hdf` re-cuts at any scale.
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
        flux = loguniform(rng, *cfg.flux)
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
    """The usable stamps (npix, npix) (unnormalised [JPEG levels], deterministic order), the number of
    detections and, per stamp, (label, centroid row, centroid column) [HDF px]; cached because several
    callers ask for the same grid."""
    d = _hdf_detection()
    stamps, where = [], []
    for k, sl in enumerate(d["slices"], start=1):
        if sl is None or d["areas"][k - 1] < min_area:
            continue
        h, w = sl[0].stop - sl[0].start, sl[1].stop - sl[1].start
        if max(h, w) > 0.7 * npix:
            continue
        cy, cx = ndi.center_of_mass(np.clip(d["res"][sl], 0, None) * (d["lab"][sl] == k))
        cy, cx = cy + sl[0].start, cx + sl[1].start
        stamp = _hdf_stamp(d, k, cy, cx, npix, max_masked_fraction)
        if stamp is not None:
            stamps.append(stamp)
            where.append((k, float(cy), float(cx)))
    return tuple(stamps), d["nlab"], tuple(where)


def _hdf_stamp(d: dict, k: int, cy: float, cx: float, npix: int, max_masked_fraction: float):
    """The stamp (npix, npix) [JPEG levels] of object ``k`` of the detection ``d`` centred on its
    centroid (``cy``, ``cx``) [HDF px], or None when it touches the border, has a saturated core (a
    star), is crowded by neighbours or is empty."""
    res, lab, grown = d["res"], d["lab"], d["grown"]
    half = npix // 2
    r0, c0 = int(round(cy)) - half - 2, int(round(cx)) - half - 2
    r1, c1 = r0 + npix + 4, c0 + npix + 4
    if r0 < 0 or c0 < 0 or r1 > res.shape[0] or c1 > res.shape[1]:
        return None
    target = lab[r0:r1, c0:c1] == k
    if (d["peak"][r0:r1, c0:c1][target] >= 250).sum() >= 4:   # saturated core: a star
        return None
    target_grown = ndi.binary_dilation(target, iterations=3)
    others = (grown[r0:r1, c0:c1] > 0) & (grown[r0:r1, c0:c1] != k)
    if (others & target_grown).sum() >= max_masked_fraction * target_grown.sum():
        return None
    weight = ndi.gaussian_filter((target_grown & ~others).astype(np.float64), 1.0)
    stamp = res[r0:r1, c0:c1] * weight
    # sub-pixel centring: the flux-weighted centroid goes to the grid centre (between pixels)
    sy, sx = (r0 + (npix + 4 - 1) / 2) - cy, (c0 + (npix + 4 - 1) / 2) - cx
    stamp = ndi.shift(stamp, (sy, sx), order=1, mode="constant")[2:-2, 2:-2]
    stamp = np.clip(stamp, 0, None)
    return None if stamp.sum() <= 0 else stamp


def render_hdf(label: int, cy: float, cx: float, npix: int, spacing: float, path=None) -> np.ndarray:
    """HDF object ``label`` re-cut around its centroid (``cy``, ``cx``) [HDF px] on an npix x npix grid
    whose pixel centres are ``spacing`` HDF pixels apart (grid centre on the centroid): the
    background-subtracted image times the soft mask of :func:`hst_stamps` (on a window large enough
    for the grid), bilinearly interpolated, negatives clipped, zero outside the HDF. Unnormalised
    (n, n) float64 [JPEG grey levels]; ``path`` only names the sources file in errors."""
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


def render_hst_fine(record: dict, npix: int, pixscale: float, factor: int, path=None, index=None) -> np.ndarray:
    """The HDF object of ``record`` (HST_PARAMS) re-cut at HDF_PER_SOURCE_PIXEL / ``factor`` HDF pixels
    per pixel on an npix x npix grid of ``pixscale`` [arcsec/px] (one HDF pixel per pixel at factor 2),
    scaled to its recorded total flux: (npix, npix) float64 [flux / arcsec^2]. ``path`` / ``index`` only
    name the sources file and the source in errors."""
    img = render_hdf(record["HDF_LAB"], record["HDF_Y"], record["HDF_X"], npix, HDF_PER_SOURCE_PIXEL / factor, path)
    if not img.sum() > 0:
        raise InputFileError(path or "sources", f"hst source {index}: empty HDF cut", field="KINDS.HDF_LAB")
    return img / img.sum() * record["FLUX"] / pixscale ** 2
