"""Units of observation images: a file's ``BUNIT`` converted to the pipeline's data unit.

The pipeline's data unit is ``lensing.noise.bunit`` (default electron/s): a flux per pixel, the unit the
simulator writes and the prior's fluxes are in. :func:`conversion_factor` returns the number that
multiplies an image in its file's ``BUNIT`` to give it in that unit, with ``A`` the pixel area
[arcsec^2]:

* a surface brightness (per arcsec^2, per sr, ...) is multiplied by the pixel area (``A`` in its
  solid-angle unit): electron/(s arcsec2) x A -> electron/s;
* a count (electron, count, DN) without a time is divided by ``EXPTIME`` [s];
* counts or DN are electrons times 1 / ``lensing.observation.gain`` [electron/count];
* a flux density goes to a count rate through the file's photometric keyword:
  ``PHOTMJSR`` [MJy/sr per DN/s] (JWST: a pixel of 1 MJy/sr holds 1 / PHOTMJSR DN/s),
  ``PHOTFNU`` [Jy s/electron] (HST: f_nu per pixel = PHOTFNU x electron/s),
  ``PHOTFLAM`` [erg/(cm2 Angstrom electron)] (HST: f_lambda per pixel = PHOTFLAM x electron/s).

Instruments write units that strict astropy parsing rejects; :data:`ALIASES` maps them. Logarithmic
units (mag, dex) and anything not convertible to the data unit are refused with one line naming the
file, the HDU and the keyword.
"""

from __future__ import annotations

import math
import warnings

import astropy.units as u

from pipeline.errors import ConfigError, InputFileError

ALIASES = {
    "ELECTRONS/S": "electron/s", "ELECTRONS/SEC": "electron/s", "ELECTRON/S": "electron/s",
    "E-/S": "electron/s", "E/S": "electron/s", "ELECTRONS": "electron", "ELECTRON": "electron",
    "COUNTS/S": "count/s", "COUNTS/SEC": "count/s", "CTS/S": "count/s", "COUNTS": "count",
    "DN/S": "count/s", "DN/SEC": "count/s", "DN": "count", "ADU/S": "count/s", "ADU": "count",
    "MJY/SR": "MJy/sr", "MJY/STERADIAN": "MJy/sr", "UJY/ARCSEC2": "uJy/arcsec2",
}
"""What instruments write (upper case, spaces removed) -> an astropy unit string. HST: ``ELECTRONS/S``,
``ELECTRONS`` (with EXPTIME), ``COUNTS/S``; JWST: ``MJy/sr``, ``DN/s``."""

PHOTOMETRIC = (
    # (keyword, its unit: flux density per unit of the count rate in the third column)
    ("PHOTMJSR", u.MJy / u.sr, u.count / u.s),
    ("PHOTFNU", u.Jy, u.electron / u.s),
    ("PHOTFLAM", u.erg / (u.s * u.cm ** 2 * u.AA), u.electron / u.s),
)
"""Photometric keywords: flux density (per pixel, or per solid angle) of one unit of count rate."""

_LOG_NAMES = {"mag", "dex", "dB"}


def parse_bunit(text: str, path, field: str) -> u.UnitBase:
    """The astropy unit of a ``BUNIT`` string (alias table first, then astropy's FITS and generic
    formats); logarithmic and unparseable units raise a one-line :class:`InputFileError`."""
    key = text.strip().upper().replace(" ", "")
    s = ALIASES.get(key, text.strip())
    unit = None
    for fmt in ("fits", None):
        try:
            with warnings.catch_warnings():  # "multiple slashes" is a style warning only
                warnings.simplefilter("ignore", u.UnitsWarning)
                unit = u.Unit(s, format=fmt, parse_strict="raise")
            break
        except (ValueError, TypeError):
            continue
    if unit is None:
        raise InputFileError(path, f"unknown unit {text!r} (e.g. electron/s, electron/(s arcsec2), MJy/sr)",
                             field=field)
    bases = getattr(unit, "bases", [unit])
    if isinstance(unit, u.FunctionUnitBase) or any(getattr(b, "name", "") in _LOG_NAMES for b in bases):
        raise InputFileError(path, f"logarithmic unit {text!r} (magnitudes) is not supported: give a linear "
                             "flux or surface brightness", field=field)
    return unit


def is_surface_brightness(unit: u.UnitBase) -> bool:
    """True when ``unit`` is per unit solid angle (its decomposition has rad^-2 or a lower power)."""
    dec = unit.decompose()
    return any(b == u.rad and p <= -2 for b, p in zip(dec.bases, dec.powers))


def _keyword(headers, key: str, path):
    """(value as float, HDU name) of ``key`` from the first of ``headers`` ((name, header) pairs) that
    has it, or (None, None); text raises a one-line error."""
    for name, h in headers:
        if key in h:
            return header_number(h, key, path, name), name
    return None, None


def header_number(header, key: str, path, hdu: str) -> float:
    """``header[key]`` as a finite float; text or a non-finite value raises a one-line
    :class:`InputFileError` naming ``hdu.key``."""
    raw = header[key]
    try:
        if isinstance(raw, bool):
            raise TypeError
        v = float(raw)
    except (TypeError, ValueError):
        raise InputFileError(path, f"not a number: {raw!r}", field=f"{hdu}.{key}") from None
    if not math.isfinite(v):
        raise InputFileError(path, f"not finite: {raw!r}", field=f"{hdu}.{key}")
    return v


def conversion_factor(unit: u.UnitBase, target: u.UnitBase, pixel_area: float, headers, path, field: str,
                      gain: float, text: str | None = None) -> float:
    """The factor taking an image in ``unit`` to ``target`` (a flux per pixel, e.g. electron/s).

    ``pixel_area`` [arcsec^2]; ``headers``: (HDU name, header) pairs searched in order for EXPTIME and
    the photometric keywords; ``field`` ("HDU.BUNIT") names the unit in errors; ``gain``
    [electron/count]; ``text``: the unit as the file wrote it, for messages. See the module docstring
    for the conventions."""
    label = text or unit.to_string()
    q = 1.0 * unit
    if is_surface_brightness(unit):
        q = q * (pixel_area * u.arcsec ** 2)
    hdu = field.split(".")[0]
    if q.unit.is_equivalent(u.electron) or q.unit.is_equivalent(u.count):
        exptime, _ = _keyword(headers, "EXPTIME", path)
        if exptime is None:
            raise InputFileError(path, f"BUNIT {label!r} is a count without a time: EXPTIME is "
                                 "needed to make it a rate", field=f"{hdu}.EXPTIME")
        if not exptime > 0:
            raise InputFileError(path, f"EXPTIME must be > 0, got {exptime}", field=f"{hdu}.EXPTIME")
        q = q / (exptime * u.s)
    if q.unit.is_equivalent(u.count / u.s):
        q = q.to(u.count / u.s) * (gain * u.electron / u.count)
    if not q.unit.is_equivalent(target):
        q = _photometric(q, label, pixel_area, headers, path, field, gain)
    try:
        return float(q.to_value(target))
    except u.UnitConversionError:
        raise InputFileError(path, f"unit {label!r} cannot be converted to {target.to_string()!r}",
                             field=field) from None


def _photometric(q, label: str, pixel_area, headers, path, field, gain):
    """``q`` (a flux density per pixel) as electron/s through the first photometric keyword that applies."""
    hdu = field.split(".")[0]
    applicable = []
    for key, kunit, rate in PHOTOMETRIC:
        sb = is_surface_brightness(kunit)
        per_pixel = kunit * u.arcsec ** 2 if sb else kunit
        if not q.unit.is_equivalent(per_pixel):
            continue
        applicable.append(key)
        value, _ = _keyword(headers, key, path)
        if value is None:
            continue
        if not value > 0:
            raise InputFileError(path, f"{key} must be > 0, got {value}", field=f"{hdu}.{key}")
        n_rate = q.to_value(per_pixel) / (value * (pixel_area if sb else 1.0))
        if rate == u.count / u.s:
            return n_rate * gain * u.electron / u.s
        return n_rate * rate
    if applicable:
        raise InputFileError(path, f"BUNIT {label!r} is a flux density: the photometric keyword "
                             f"{' or '.join(applicable)} is needed to convert it to a count rate",
                             field=f"{hdu}.{applicable[0]}")
    raise InputFileError(path, f"unit {label!r} cannot be converted to a flux or surface brightness "
                         "(e.g. electron/s, electron/(s arcsec2), MJy/sr)", field=field)


def _config_unit(text: str, field: str) -> u.UnitBase:
    try:
        return parse_bunit(text, "config", field)
    except InputFileError as exc:
        raise ConfigError("config", field, str(exc).split(": ", 1)[-1]) from None


def data_unit(cfg) -> u.UnitBase:
    """The pipeline's data unit, ``cfg.noise.bunit`` of a LensingConfig: a flux per pixel."""
    unit = _config_unit(cfg.noise.bunit, "lensing.noise.bunit")
    if is_surface_brightness(unit):
        raise ConfigError("config", "lensing.noise.bunit", f"must be a flux per pixel, got {cfg.noise.bunit!r}")
    return unit


def model_factor(cfg, pix: float) -> float:
    """Data unit per (source unit x pixel area): what multiplies the model's mean surface brightness
    [``cfg.sources.bunit``] of a pixel of ``pix`` [arcsec/pixel] to give flux per pixel in the data unit."""
    sb = _config_unit(cfg.sources.bunit, "lensing.sources.bunit")
    try:
        scale = (1.0 * sb * u.arcsec ** 2).to_value(data_unit(cfg))
    except u.UnitConversionError:
        raise ConfigError("config", "lensing.sources.bunit", f"{cfg.sources.bunit!r} x arcsec2 is not "
                          f"{cfg.noise.bunit!r}") from None
    return pix * pix if scale == 1.0 else pix * pix * scale
