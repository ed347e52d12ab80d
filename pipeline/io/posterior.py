"""Posterior FITS files: one file per observation and method.

:func:`write_posterior` writes them and :func:`read_posterior` reads them back; docs/posterior-files.md
lists every HDU and keyword a file carries, with units and when each is present. Source-plane images
carry a linear WCS in arcsec (:func:`source_wcs`: the array centre is the origin, +x along columns, +y
along rows: the package's array frame); image-plane images the observation's sky WCS when it has one.
Files are written atomically (:mod:`pipeline.io.atomic`) with FITS checksums; ``read_posterior``
verifies them.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
from astropy.io import fits

from pipeline.errors import InputFileError
from pipeline.io.atomic import atomic_file
from pipeline.io.lens_samples import lens_samples_hdu, read_lens_samples

SOURCE_HDUS = ("SAMPLES", "MEAN", "STD", "TRUTH", "PARTICLES")
_PROV_KEYS = {"version": "PIPEVER", "seed": "SEED", "config_hash": "CFGHASH"}
LENS_CARDS = ("LENSMOD", "LENSFRAM", "LENSFILE", "LENS_X0", "LENS_Y0", "LENS_Q", "LENS_PHI", "LENS_RE", "LENS_T",
              "SHEAR_G1", "SHEAR_G2", "Z_LENS", "Z_SRC")
"""The lens keywords a posterior carries (the observation files' names, :mod:`pipeline.lensing.simulate`)."""


def _as_numpy(a, dtype=np.float32) -> np.ndarray | None:
    if a is None:
        return None
    if hasattr(a, "detach"):  # torch tensor on any device
        a = a.detach().cpu().numpy()
    return np.ascontiguousarray(np.asarray(a, dtype=dtype))


def _image_stack(a, name: str) -> np.ndarray:
    """(n, ny, nx) from (n, ny, nx) or (n, 1, ny, nx) (a single channel is squeezed)."""
    a = _as_numpy(a)
    if a.ndim == 4 and a.shape[1] == 1:
        a = a[:, 0]
    if a.ndim != 3:
        raise ValueError(f"{name} must have shape (n, ny, nx) or (n, 1, ny, nx), got {a.shape}")
    return a


def _image(a, name: str, shape=None) -> np.ndarray | None:
    a = _as_numpy(a)
    if a is None:
        return None
    a = np.squeeze(a) if a.ndim > 2 else a
    if a.ndim != 2:
        raise ValueError(f"{name} must be a 2-D image, got shape {a.shape}")
    if shape is not None and a.shape != tuple(shape):
        raise ValueError(f"{name} has shape {a.shape}, expected {tuple(shape)}")
    return a


def weighted_moments(particles: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weighted per-pixel mean and std of particles (n_p, ...) with non-negative weights (n_p,)."""
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    p = particles.astype(np.float64)
    mean = np.tensordot(w, p, axes=1)
    var = np.tensordot(w, (p - mean) ** 2, axes=1)
    return mean.astype(np.float32), np.sqrt(np.maximum(var, 0.0)).astype(np.float32)


def source_wcs(header: fits.Header, shape, pixscale: float, cube: bool = False) -> None:
    """Add the source-plane linear WCS (arcsec, CRPIX=(n+1)/2, origin at the array centre)."""
    ny, nx = shape[-2:]
    header["CTYPE1"], header["CTYPE2"] = "OFFSET-X", "OFFSET-Y"
    header["CUNIT1"], header["CUNIT2"] = "arcsec", "arcsec"
    header["CDELT1"] = (float(pixscale), "arcsec/pixel")
    header["CDELT2"] = (float(pixscale), "arcsec/pixel")
    header["CRPIX1"], header["CRPIX2"] = (nx + 1) / 2.0, (ny + 1) / 2.0
    header["CRVAL1"], header["CRVAL2"] = 0.0, 0.0
    header["SRCPIXSC"] = (float(pixscale), "source pixel scale [arcsec/pixel]")
    if cube:
        header["CTYPE3"] = "SAMPLE"
        header["CUNIT3"] = ""
        header["CRPIX3"], header["CDELT3"], header["CRVAL3"] = 1.0, 1.0, 0.0


def _finite_or_none(v):
    if v is None:
        return None
    v = float(v)
    return v if np.isfinite(v) else None


STAT_KEYS = {"flux": "SRCFLUX", "magnification": "MAGNIF", "r_half": "RHALF"}
"""Source statistic -> primary keyword of its posterior mean; ``L`` / ``H`` appended: the 16th / 84th
percentiles (:mod:`pipeline.metrics.source_stats`)."""
_STAT_DOC = {"flux": "total source flux", "magnification": "magnification", "r_half": "half-light radius"}

PPC_CARDS = {"image": ("PPCIMG", "median chi2_nu over the image"), "image_pit": ("PPCUIMG", "median PIT, image"),
             "arc": ("PPCARC", "median chi2_nu in the arc"), "arc_pit": ("PPCUARC", "median PIT, arc"),
             "arc_m": ("PPCARCM", "arc pixels the arc band is for"), "tail": ("PPCTAIL", "PIT tail flagged")}
"""Posterior predictive check field -> (primary keyword, comment) (:mod:`pipeline.metrics.ppc`); the flag
is ``PPCWARN``, the bands ``PPCIMGLO``/``PPCIMGHI`` and ``PPCARCLO``/``PPCARCHI``."""


def posterior_moments(samples, particles=None, weights=None) -> tuple[np.ndarray, np.ndarray]:
    """(MEAN, STD) as :func:`write_posterior` computes them: the weighted moments of ``particles`` when
    ``weights`` is given, else the moments of ``samples``; float32 (ny, nx)."""
    s = _image_stack(samples, "samples")
    if particles is not None and weights is not None:
        w = np.asarray(_as_numpy(weights, np.float64)).reshape(-1)
        return weighted_moments(_image_stack(particles, "particles"), w / w.sum())
    return s.mean(0, dtype=np.float64).astype(np.float32), s.std(0, dtype=np.float64).astype(np.float32)


def _extra_cards(extra: dict | None, taken) -> list[tuple]:
    """Method-specific primary cards ``{key: value or (value, comment)}`` checked: FITS keywords of at most
    8 upper-case letters, digits, '-' or '_', none already written by the writer."""
    cards = []
    for k, v in (extra or {}).items():
        key = str(k)
        if not (0 < len(key) <= 8 and all(c.isupper() or c.isdigit() or c in "-_" for c in key)):
            raise ValueError(f"extra header key {key!r} must be 1-8 upper-case letters, digits, '-' or '_'")
        if key in taken:
            raise ValueError(f"extra header key {key!r} is already a posterior keyword")
        value, comment = v if isinstance(v, tuple) else (v, "")
        cards.append((key, value, comment))
    return cards


def _stat_cards(h: fits.Header, stats: dict | None, flux_unit: str) -> None:
    """Primary cards of the source statistics ``{"flux"|"magnification"|"r_half": {"mean", "lo", "hi"}}``."""
    units = {"flux": "FLUXUNIT", "magnification": "", "r_half": "arcsec"}
    for name, key in STAT_KEYS.items():
        v = (stats or {}).get(name) or {}
        unit = f" [{units[name]}]" if units[name] else ""
        for suffix, which, what in (("", "mean", "posterior mean"), ("L", "lo", "16th percentile"),
                                    ("H", "hi", "84th percentile")):
            if _finite_or_none(v.get(which)) is not None:
                h[key + suffix] = (float(v[which]), f"{_STAT_DOC[name]}, {what}{unit}")
    if stats and flux_unit:
        h["FLUXUNIT"] = (flux_unit, "unit of SRCFLUX (source unit x arcsec2)")


def _ppc_cards(h: fits.Header, ppc: dict | None) -> None:
    """Primary cards of a posterior predictive check (:meth:`pipeline.metrics.ppc.PPCResult.as_dict`);
    non-finite values are left out."""
    if ppc is None:
        return
    h["PPCWARN"] = (bool(ppc["flag"]), "fit inconsistent with the noise (PPC)")
    for name, (key, comment) in PPC_CARDS.items():
        if _finite_or_none(ppc.get(name)) is not None:
            h[key] = (int(ppc[name]) if name == "arc_m" else float(ppc[name]), comment)
        if name in ("image", "arc") and ppc.get(f"{name}_band") is not None:
            for suffix, v, what in zip(("LO", "HI"), ppc[f"{name}_band"], ("lower", "upper")):
                h[key + suffix] = (float(v), f"{what} edge of the 99.9 % chi2_nu band")


def _read_ppc(h: fits.Header) -> dict | None:
    """The check as :func:`_ppc_cards` wrote it (absent fields None), or None without ``PPCWARN``."""
    if "PPCWARN" not in h:
        return None
    out = {"flag": bool(h["PPCWARN"])}
    for name, (key, _comment) in PPC_CARDS.items():
        out[name] = h.get(key)
        if name in ("image", "arc"):
            out[f"{name}_band"] = (h[key + "LO"], h[key + "HI"]) if key + "LO" in h else None
    return out


def write_posterior(path, samples, *, mean=None, std=None, truth=None, obs=None, particles=None,
                    weights=None, logz: dict | None = None, chi2=None, src_pixscale: float,
                    method: str, provenance: dict | None = None, seconds: float | None = None,
                    obs_file: str | None = None, obs_pixscale: float | None = None,
                    bunit: str = "", units: str = "physical", extra_header: dict | None = None,
                    ood_warnings: list[str] | None = None, model=None, resid=None, data_unit: str = "",
                    image_wcs: fits.Header | None = None, lens_cards: dict | None = None,
                    source_stats: dict | None = None, flux_unit: str = "", ppc: dict | None = None,
                    lens_samples=None, lens_names: list[str] | None = None) -> Path:
    """Write one observation's posterior to ``path`` (atomically, with checksums).

    samples: (n, ny, nx) or (n, 1, ny, nx) equally weighted draws, in the units named by ``bunit`` (the
    source surface brightness unit). mean/std: default to :func:`posterior_moments`. particles/weights:
    raw particles (n_p, ny, nx) and their non-negative weights (normalised on write). logz:
    ``{"elbo", "elbo_se", "iw"}``, each a float [nats] or None (not available); ``None`` means no
    estimate at all. chi2: per-sample chi2_nu values (n,). src_pixscale: source pixel scale
    [arcsec/pixel]; obs_pixscale: the image's, for the image-plane HDUs. units: ``physical`` (x_phys =
    s*x + b, the SCI brightness units; the default and the recommendation) or ``network`` (the prior's
    own units); stored as ``XUNITS`` so calibration applies the right forward model. seconds: sampling
    wall time for this observation. provenance: JSON-serialisable mapping (``version``, ``seed``,
    ``config_hash`` get their own keys). ood_warnings: one line per condition the observation lies
    outside of the posterior's trained ones (``OODWARN`` cards).
    obs / model / resid: image-plane (ny, nx) data, model image of the posterior mean [both
    ``data_unit``, flux per pixel] and normalised residuals (dimensionless; NaN on masked pixels).
    image_wcs: the WCS cards of the image plane (e.g. a sky WCS); None: a linear offset WCS at
    ``obs_pixscale``. lens_cards: ``{keyword: (value, comment)}`` of the lens the posterior is
    conditional on. source_stats: ``{"flux", "magnification", "r_half"}`` each ``{"mean", "lo", "hi"}``
    with flux in ``flux_unit``, r_half in arcsec. extra_header: method cards ``{key: value or (value,
    comment)}`` (keys <= 8 upper-case characters). ppc: the observation's posterior predictive check as
    :meth:`pipeline.metrics.ppc.PPCResult.as_dict` gives it (``PPCWARN`` and ``PPC*`` cards; chi2_nu and
    band edges dimensionless). lens_samples (n, p) with ``lens_names``: the lens each sample was drawn under,
    row by row (the ``LENSSAMP`` table, :mod:`pipeline.io.lens_samples`). Returns the path.
    """
    path = Path(path)
    if not (src_pixscale and float(src_pixscale) > 0):
        raise ValueError("src_pixscale must be > 0 (arcsec/pixel)")
    s = _image_stack(samples, "samples")
    shape = s.shape[1:]
    p = None if particles is None else _image_stack(particles, "particles")
    w = None
    if weights is not None:
        w = np.asarray(_as_numpy(weights, np.float64)).reshape(-1)
        if p is None or w.shape[0] != p.shape[0]:
            raise ValueError("weights need particles with the same leading length")
        if not np.all(np.isfinite(w)) or (w < 0).any() or w.sum() <= 0:
            raise ValueError("weights must be finite, non-negative and not all zero")
    if mean is None or std is None:
        m_, s_ = posterior_moments(s, p, w)
        mean = m_ if mean is None else mean
        std = s_ if std is None else std
    if w is not None:
        w = w / w.sum()
    mean, std = _image(mean, "mean", shape), _image(std, "std", shape)
    truth = _image(truth, "truth", shape)
    obs = _image(obs, "obs")
    model = _image(model, "model", None if obs is None else obs.shape)
    resid = _image(resid, "resid", None if obs is None else obs.shape)

    if units not in ("physical", "network"):
        raise ValueError(f"units must be 'physical' or 'network', got {units!r}")
    prim = fits.PrimaryHDU()
    h = prim.header
    h["XUNITS"] = (units, "source units: physical (s*x+b) or network")
    h["METHOD"] = (str(method), "posterior sampler")
    h["NSAMPLE"] = (int(s.shape[0]), "equally weighted samples in SAMPLES")
    h["SRCPIXSC"] = (float(src_pixscale), "source pixel scale [arcsec/pixel]")
    if bunit:
        h["BUNIT"] = (bunit, "unit of the source-plane HDUs")
    if data_unit:
        h["DATAUNIT"] = (data_unit, "unit of OBS and MODEL (flux per pixel)")
    if obs_file:
        h["OBSFILE"] = (os.path.basename(str(obs_file)), "observation file")
    if seconds is not None:
        h["SAMPSEC"] = (float(seconds), "sampling wall time for this observation [s]")
    # log Z: FITS headers cannot hold NaN, so a missing estimate is an absent key plus LOGZAVL.
    logz = dict(logz or {})
    elbo, se, iw = (_finite_or_none(logz.get(k)) for k in ("elbo", "elbo_se", "iw"))
    h["LOGZAVL"] = (elbo is not None or iw is not None, "log Z estimate available")
    if elbo is not None:
        h["LOGZELBO"] = (elbo, "ELBO log Z estimate [nat, SCI units]")
    if se is not None:
        h["LOGZSE"] = (se, "standard error of LOGZELBO [nat]")
    if iw is not None:
        h["LOGZIW"] = (iw, "importance-weighted log Z estimate [nat]")
    chi2_arr = None
    if chi2 is not None:
        chi2_arr = np.asarray(_as_numpy(chi2, np.float64)).reshape(-1)
        fin = chi2_arr[np.isfinite(chi2_arr)]
        if fin.size:
            h["CHI2NU"] = (float(np.median(fin)), "median chi2_nu over samples")
    for k, v in (lens_cards or {}).items():
        h[k] = v
    _stat_cards(h, source_stats, flux_unit)
    _ppc_cards(h, ppc)
    prov = dict(provenance or {})
    for key, card in _PROV_KEYS.items():
        if prov.get(key) is not None:
            h[card] = prov[key]
    if prov:
        h["PROVJSON"] = json.dumps(prov, sort_keys=True, default=str)
    for key, value, comment in _extra_cards(extra_header, set(h.keys()) | {"OODWARN"}):
        h[key] = (value, comment)
    for reason in ood_warnings or []:
        h.append(("OODWARN", str(reason)), end=True)

    hdus = [prim]

    def add(data, name, cube=False, source=True, unit=bunit):
        hdu = fits.ImageHDU(data=data, name=name)
        if source:
            source_wcs(hdu.header, data.shape, float(src_pixscale), cube=cube)
        elif image_wcs is not None:
            hdu.header.update(image_wcs)
        elif obs_pixscale:
            source_wcs(hdu.header, data.shape, float(obs_pixscale), cube=cube)
            del hdu.header["SRCPIXSC"]
        if not source and obs_pixscale:
            hdu.header["PIXSCALE"] = (float(obs_pixscale), "image pixel scale [arcsec/pixel]")
        if unit or name == "RESID":
            hdu.header["BUNIT"] = unit
        hdus.append(hdu)

    add(s, "SAMPLES", cube=True)
    add(mean, "MEAN")
    add(std, "STD")
    if truth is not None:
        add(truth, "TRUTH")
    for data, name, unit in ((obs, "OBS", data_unit), (model, "MODEL", data_unit), (resid, "RESID", "")):
        if data is not None:
            add(data, name, source=False, unit=unit)
    if p is not None:
        add(p, "PARTICLES", cube=True)
    for data, name in ((w, "WEIGHTS"), (chi2_arr, "CHI2")):
        if data is not None:
            hdu = fits.ImageHDU(data=data.astype(np.float64), name=name)
            hdu.header["BUNIT"] = ""
            hdus.append(hdu)

    if lens_samples is not None:
        if len(lens_samples) != s.shape[0]:
            raise ValueError(f"lens samples ({len(lens_samples)}) must pair row by row with the {s.shape[0]} samples")
        hdus.append(lens_samples_hdu(lens_samples, list(lens_names or [])))

    with atomic_file(path) as tmp:
        fits.HDUList(hdus).writeto(tmp, overwrite=True, checksum=True)
    return path


def read_posterior(path) -> dict:
    """Read a posterior file written by :func:`write_posterior`; arrays come back native float32
    (WEIGHTS and CHI2 float64). Returns a dict with keys samples, mean, std, truth, obs, particles,
    weights, chi2 (arrays or None), obs_pixscale, method, n_samples, src_pixscale, logz (dict elbo/elbo_se/iw,
    None where not available), chi2_median, seconds, obs_file, provenance, ood_warnings (the OODWARN
    lines, empty when none), ppc (the posterior predictive check: flag, image, image_band, image_pit, arc,
    arc_band, arc_pit, arc_m, tail; None when the file has no ``PPCWARN``), data_unit, lens (the lens
    keywords, None when absent), lens_file, source_stats
    (``{"flux"|"magnification"|"r_half": {"mean", "lo", "hi"}}``, None where absent), flux_unit,
    header, samples_header, obs_header, lens_samples (:func:`pipeline.io.lens_samples.read_lens_samples`, None
    when the lens was given); model and resid are the MODEL and RESID images (None when absent).
    A missing, truncated or checksum-failing file raises :class:`InputFileError`."""
    path = Path(path)
    if not path.is_file():
        raise InputFileError(path, "posterior file not found")
    out: dict = {}
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with fits.open(path, checksum=True, memmap=False) as hdul:
                hdul.verify("exception")
                names = [hdu.name for hdu in hdul]
                if "SAMPLES" not in names:
                    raise InputFileError(path, "no SAMPLES HDU: not a posterior file", "SAMPLES")
                h = hdul[0].header.copy()
                for name in ("SAMPLES", "MEAN", "STD", "TRUTH", "OBS", "MODEL", "RESID", "PARTICLES"):
                    out[name.lower()] = (np.asarray(hdul[name].data, dtype=np.float32)
                                         if name in names else None)
                for name in ("WEIGHTS", "CHI2"):
                    out[name.lower()] = (np.asarray(hdul[name].data, dtype=np.float64)
                                         if name in names else None)
                sh = hdul["SAMPLES"].header
                out["obs_pixscale"] = (hdul["OBS"].header.get("PIXSCALE") if "OBS" in names else None)
                out["obs_header"] = hdul["OBS"].header.copy() if "OBS" in names else None
                out["header"] = h
                out["samples_header"] = sh.copy()
                out["lens_samples"] = read_lens_samples(hdul)
        bad = [str(w.message) for w in caught if "checksum" in str(w.message).lower()
               or "datasum" in str(w.message).lower()]
        if bad:
            raise InputFileError(path, f"checksum verification failed ({bad[0]})")
    except InputFileError:
        raise
    except (OSError, ValueError, TypeError, KeyError, fits.VerifyError) as exc:
        raise InputFileError(path, f"unreadable posterior FITS ({type(exc).__name__}: {exc})") from None
    if out["samples"].ndim != 3:
        raise InputFileError(path, f"SAMPLES must be (n, ny, nx), got {out['samples'].shape}", "SAMPLES")
    pix = h.get("SRCPIXSC", sh.get("SRCPIXSC", sh.get("CDELT1")))
    if pix is None or not float(pix) > 0:
        raise InputFileError(path, "missing or non-positive source pixel scale", "SRCPIXSC")
    out["src_pixscale"] = float(pix)
    out["method"] = str(h.get("METHOD", ""))
    out["label"] = str(h.get("LABEL", ""))  # the run's own name in calibration tables (a baseline's), if any
    out["n_samples"] = int(out["samples"].shape[0])
    out["logz"] = {"elbo": h.get("LOGZELBO"), "elbo_se": h.get("LOGZSE"), "iw": h.get("LOGZIW")}
    out["logz_available"] = bool(h.get("LOGZAVL", False))
    out["chi2_median"] = h.get("CHI2NU")
    out["seconds"] = h.get("SAMPSEC")
    out["obs_file"] = h.get("OBSFILE")
    out["bunit"] = h.get("BUNIT", "")
    out["units"] = str(h.get("XUNITS", "physical"))
    out["ood_warnings"] = [str(c.value) for c in h.cards if c.keyword == "OODWARN"]
    out["ppc"] = _read_ppc(h)
    out["data_unit"] = h.get("DATAUNIT", "")
    out["lens"] = ({k: h[k] for k in LENS_CARDS if k in h} if "LENSMOD" in h else None)
    out["lens_file"] = h.get("LENSFILE")
    out["source_stats"] = {name: {"mean": h.get(key), "lo": h.get(key + "L"), "hi": h.get(key + "H")}
                           for name, key in STAT_KEYS.items()}
    out["flux_unit"] = h.get("FLUXUNIT", "")
    prov = {}
    if "PROVJSON" in h:
        try:
            prov = json.loads(h["PROVJSON"])
        except json.JSONDecodeError:
            raise InputFileError(path, "PROVJSON is not valid JSON", "PROVJSON") from None
    out["provenance"] = prov
    return out
