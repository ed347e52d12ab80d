"""The source cube: source galaxies on the source grid, in physical surface-brightness units.

Three kinds, concatenated and split into TRAIN / VALID / TEST by seed (stratified per kind):

* ``galsim``: parametric galaxies (:mod:`pipeline.lensing.sources_galsim`).
* ``hst``: real shapes cut from the Hubble deep field (:mod:`pipeline.lensing.sources_hst`).
* ``user``: the user's FITS cube (:mod:`pipeline.lensing.sources_user`).

Output values are surface brightness (default electron/s/arcsec^2): drawn flux per pixel / pixscale^2.
Array frame: [row = y, column = x], +x along columns; even grids centred on the corner between the four
central pixels (as caustics and GalSim's true centre).

File: a primary HDU (provenance), ImageHDUs TRAIN / VALID / TEST (N, n, n) float32 and a KINDS table
(SPLIT, INDEX, KIND and each source's generation parameters, so that it can be re-rendered finer).
"""

from __future__ import annotations

import time

import numpy as np
from astropy.io import fits

from pipeline import __version__
from pipeline.errors import InputFileError
from pipeline.io.fits import _open, write_fits_atomic
from pipeline.lensing.config import SourcesConfig
from pipeline.lensing.sources_galsim import GALSIM_PARAMS, galsim_sources, render_galsim
from pipeline.lensing.sources_hst import HST_CREDIT, HST_PARAMS, hst_stamps, render_hst_fine
from pipeline.lensing.sources_user import user_sources

SPLITS = ("TRAIN", "VALID", "TEST")
# KINDS table columns holding integers; the other parameter columns are float64. Columns that do not
# apply to a kind hold NaN (floats) or -1 (integers).
INT_PARAMS = ("N_KNOTS", "KNOT_SEED", "HDF_LAB")
KIND_PARAMS = {"galsim": GALSIM_PARAMS, "hst": HST_PARAMS}
COUNT_KEYS = (("galsim", "NGALSIM"), ("hst", "NHST"), ("user", "NUSER"))


def split_indices(n: int, fractions, rng: np.random.Generator) -> list[np.ndarray]:
    """Random disjoint index sets of sizes round(cumulative fraction * n) for TRAIN, VALID, TEST."""
    perm = rng.permutation(n)
    cuts = np.round(np.cumsum(fractions) * n).astype(int)
    cuts[-1] = n
    return [np.sort(a) for a in np.split(perm, cuts[:-1])]


def _draw_kinds(cfg: SourcesConfig, npix: int, pixscale: float, seeds, workers: int):
    """Every configured kind on the npix x npix grid of ``pixscale`` [arcsec/px]: ({kind: (N, n, n)
    float32 [surface brightness]}, {kind: list of parameter dicts}, {kind: seconds spent})."""
    s_gal, s_hst = seeds
    kinds, params, seconds = {}, {}, {}
    if cfg.n_galsim > 0:
        t = time.perf_counter()
        kinds["galsim"], params["galsim"] = galsim_sources(cfg.n_galsim, cfg.galsim, npix, pixscale, s_gal,
                                                           return_params=True, workers=workers)
        seconds["galsim"] = time.perf_counter() - t
    if cfg.n_hst != 0:
        t = time.perf_counter()
        kinds["hst"], params["hst"] = hst_stamps(npix, cfg.hst, pixscale, s_hst, n_max=cfg.n_hst, return_params=True)
        seconds["hst"] = time.perf_counter() - t
    if cfg.user_cube:
        t = time.perf_counter()
        kinds["user"] = user_sources(cfg.user_cube, npix, pixscale, cfg.user_hdu)
        params["user"] = [{} for _ in kinds["user"]]
        seconds["user"] = time.perf_counter() - t
    return kinds, params, seconds


def build_sources(cfg: SourcesConfig, npix: int, pixscale: float, workers: int = 1) -> dict:
    """All configured kinds on the npix x npix grid of ``pixscale`` [arcsec/px], split by ``cfg.seed``.
    Returns {'splits': {name: (N, n, n) float32 [surface brightness]}, 'kinds': {name: list of kind
    strings}, 'params': {name: list of generation-parameter dicts (empty for user sources)}, 'counts':
    {kind: {split: n}}, 'seconds': {kind: s}}. ``workers``: processes rendering the GalSim galaxies
    (the result does not depend on it)."""
    ss = np.random.SeedSequence(cfg.seed)
    s_gal, s_hst, s_split = (int(s.generate_state(1)[0]) for s in ss.spawn(3))
    kinds, kind_params, seconds = _draw_kinds(cfg, npix, pixscale, (s_gal, s_hst), workers)
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


def _primary_hdu(result: dict, cfg: SourcesConfig, npix: int, pixscale: float, cfg_hash: str) -> fits.PrimaryHDU:
    """The provenance header: seed, config hash, version, source grid (``pixscale`` [arcsec/px]), unit
    and the number of sources of each kind."""
    prim = fits.PrimaryHDU()
    h = prim.header
    h["CONTENT"] = ("source galaxies", "HDUs TRAIN, VALID, TEST (N, ny, nx)")
    h["SEED"] = (cfg.seed, "split / draw seed")
    h["CFGHASH"] = (cfg_hash, "config hash of lensing.sources")
    h["PKGVER"] = (__version__, "pipeline version")
    h["PIXSCALE"] = (pixscale, "[arcsec/pixel] source grid")
    h["SRCNPIX"] = (npix, "source grid size")
    h["BUNIT"] = (cfg.bunit, "surface brightness")
    for kind, key in COUNT_KEYS:
        h[key] = (sum(result["counts"].get(kind, {}).values()), f"number of {kind} sources")
    if "hst" in result["counts"]:
        h["HSTCRED"] = HST_CREDIT
    if cfg.user_cube:
        h["USERCUBE"] = str(cfg.user_cube)[-60:]
    return prim


def _split_hdu(result: dict, split: str, bunit: str, npix: int, pixscale: float) -> fits.ImageHDU:
    """The ImageHDU of one split (N, n, n) float32 with its unit, source-plane WCS (``pixscale``
    [arcsec/px], centred) and the number of sources of each kind in it."""
    hdu = fits.ImageHDU(result["splits"][split], name=split)
    hh = hdu.header
    hh["BUNIT"] = bunit
    hh["PIXSCALE"] = (pixscale, "[arcsec/pixel]")
    for ax in (1, 2):
        hh[f"CTYPE{ax}"] = ("OFFSET_X" if ax == 1 else "OFFSET_Y", "array frame, source plane")
        hh[f"CUNIT{ax}"] = "arcsec"
        hh[f"CDELT{ax}"] = pixscale
        hh[f"CRPIX{ax}"] = (npix + 1) / 2
        hh[f"CRVAL{ax}"] = 0.0
    for kind, key in COUNT_KEYS:
        hh[key] = result["counts"].get(kind, {}).get(split, 0)
    return hdu


def _kinds_table(result: dict) -> fits.BinTableHDU:
    """The KINDS table: one row per source (SPLIT, INDEX, KIND) and, when ``result`` has 'params', the
    GALSIM_PARAMS / HST_PARAMS columns (NaN or -1 where a column does not apply)."""
    rows_split, rows_idx, rows_kind, rows_par = [], [], [], []
    for s in SPLITS:
        n = len(result["splits"][s])
        rows_split += [s] * n
        rows_idx += list(range(n))
        rows_kind += result["kinds"][s]
        rows_par += result.get("params", {}).get(s, [{}] * n)
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
    return fits.BinTableHDU.from_columns(cols, name="KINDS")


def write_sources(path, result: dict, cfg: SourcesConfig, npix: int, pixscale: float, cfg_hash: str):
    """One FITS file of :func:`build_sources`' ``result`` on the npix x npix grid of ``pixscale``
    [arcsec/px]: primary (provenance), ImageHDUs TRAIN / VALID / TEST (N, n, n) float32 and the KINDS
    table. Written atomically with checksums; returns the path."""
    hdus = [_primary_hdu(result, cfg, npix, pixscale, cfg_hash)]
    hdus += [_split_hdu(result, s, cfg.bunit, npix, pixscale) for s in SPLITS]
    hdus.append(_kinds_table(result))
    return write_fits_atomic(path, fits.HDUList(hdus))


def read_sources(path, split: str = "TRAIN") -> tuple[np.ndarray, fits.Header]:
    """(N, n, n) float32 sources [the file's BUNIT, surface brightness] of one split and that HDU's
    header."""
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


def read_source_records(path, split: str = "TEST") -> list[dict]:
    """Per source of ``split`` (in index order): {'KIND': 'galsim' / 'hst' / 'user', plus the generation
    parameters the KINDS table holds for that kind (GALSIM_PARAMS / HST_PARAMS; none for user)}."""
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
            rec = {"KIND": kind}
            for k in KIND_PARAMS.get(kind, ()):
                if k in names:
                    v = tab[k][r]
                    rec[k] = int(v) if k in INT_PARAMS else float(v)
            out.append(rec)
    return out


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
    keys = KIND_PARAMS.get(kind, ())
    missing = [k for k in keys if k not in record or (k not in ("BULGE_N",) and not np.isfinite(record[k]))]
    if missing:
        raise InputFileError(path or "sources", f"{kind} source {index} has no generation parameter {missing[0]} "
                             "(rebuild the sources file with `python -m pipeline sources`)",
                             field=f"KINDS.{missing[0]}")
    if kind == "galsim":
        return render_galsim(record, nf, pf)
    if kind == "hst":
        return render_hst_fine(record, nf, pf, factor, path, index)
    return np.repeat(np.repeat(np.asarray(coarse, np.float64), factor, -2), factor, -1)
