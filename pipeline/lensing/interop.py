"""Lens models from and to lenstronomy and PyAutoLens: parameter conversions in pure arithmetic (neither
package is needed). docs/observations.md ("Lenses from lenstronomy and PyAutoLens") has the table.

The project's lens (:class:`~pipeline.lensing.operator.LensParams`, the keywords of
:func:`~pipeline.lensing.observation.parse_lens`): centre ``x0, y0`` [arcsec], axis ratio ``q``, major-axis
angle ``phi`` [rad, counter-clockwise from +x, period pi], Einstein radius ``rein`` [arcsec] in the
intermediate-axis convention (convergence ``kappa = (2 - t)/2 (rein / r)^t`` with ``r = sqrt(q x'^2 + y'^2/q)``
in the lens's principal axes), EPL slope ``t`` (1 = isothermal), external shear ``g1, g2`` centred on the
frame's origin. Conversions:

* lenstronomy: ``e1 + i e2 = (1-q)/(1+q) exp(2i phi)``, ``theta_E = rein`` (the same convention, for SIE,
  SIS and EPL), EPL ``gamma = t + 1``, ``SHEAR`` ``gamma1, gamma2 = g1, g2`` (``SHEAR_GAMMA_PSI``:
  ``gamma_ext (cos 2 psi_ext, sin 2 psi_ext)``), centre ``center_x, center_y``. Its ``(ra, dec)`` frame is
  the image's ``transform_pix2angle`` frame, usually RA to the left: taken as this project's WORLD frame
  (the observation's WCS maps it to the array), or mapped to the ARRAY frame with lenstronomy's
  ``kwargs_data`` (``transform_pix2angle``, ``ra_at_xy_0``, ``dec_at_xy_0``, ``image_data``).
* PyAutoLens (``Isothermal``, ``IsothermalSph``, ``PowerLaw``, ``PowerLawSph``, ``PowerLawIntermediate``
  and ``ExternalShear``), in PyAutoLens's own (y, x) frame: ``centre = (y0, x0)``,
  ``ell_comps = (f sin 2 phi, f cos 2 phi)`` with ``f = (1-q)/(1+q)`` (the y component first),
  ``slope = t + 1``, shear ``gamma_1, gamma_2 = g1, g2``, and ``einstein_radius = rein / sqrt(q) *
  ((1+q)/2)^(1/t)`` (its convergence is ``(3 - slope)/(1 + q) einstein_radius^t R^-t`` with the major-axis
  radius ``R = sqrt(x'^2 + y'^2/q^2)``; ``PowerLawIntermediate`` uses ``rein`` itself). That frame is the
  ARRAY frame, mirrored in y unless PyAutoLens flipped the FITS arrays on reading (:func:`pyautolens_frame`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping

import numpy as np

from pipeline.errors import InputFileError, PipelineError
from pipeline.lensing.observation import parse_lens
from pipeline.lensing.operator import LensParams

FRAMES = ("WORLD", "ARRAY")
MAIN_LENSTRONOMY = ("SIE", "SIS", "EPL", "EPL_NUMBA")
SHEAR_LENSTRONOMY = ("SHEAR", "SHEAR_GAMMA_PSI")
PYAUTOLENS_MASS = ("Isothermal", "IsothermalSph", "PowerLaw", "PowerLawSph", "PowerLawIntermediate")
SHEAR_CENTRE_TOL = 1e-6
"""Largest source-plane shift [arcsec] from a lenstronomy shear centre off the origin left without a warning."""


class LensConversionError(PipelineError, ValueError):
    """A lens from another code that the operator cannot represent, or a malformed parameter."""


# ------------------------------------------------------------------------------------------ geometry
def ellipticity_to_q_phi(e1: float, e2: float, where: str) -> tuple[float, float]:
    """(q, phi [rad, in [0, pi)]) from ``e1 + i e2 = (1-q)/(1+q) exp(2i phi)``; refuses ``|e| >= 1``."""
    e = math.hypot(e1, e2)
    if not e < 1:
        raise LensConversionError(f"{where}: ellipticity |e| = {e:.6g} must be < 1")
    phi = 0.5 * math.atan2(e2, e1) % math.pi if e > 0 else 0.0
    return (1 - e) / (1 + e), phi


def q_phi_to_ellipticity(q: float, phi: float) -> tuple[float, float]:
    """(e1, e2) = (1-q)/(1+q) (cos 2 phi, sin 2 phi) for ``phi`` in rad."""
    f = (1 - q) / (1 + q)
    return f * math.cos(2 * phi), f * math.sin(2 * phi)


def map_lens(lens: LensParams, R: np.ndarray, shift) -> LensParams:
    """``lens`` seen in another frame whose coordinates are ``R p + shift`` [arcsec] for a point ``p``:
    ``R`` orthogonal (a rotation, or a reflection for RA-left frames); the major axis turns like the direction
    (cos phi, sin phi) (a round lens keeps phi = 0), the shear like a spin-2 quantity (its angle
    atan2(g2, g1)/2 turns like phi)."""
    pos = R @ np.array([lens.x0, lens.y0]) + np.asarray(shift, float)

    def turn(angle):
        v = R @ np.array([math.cos(angle), math.sin(angle)])
        return math.atan2(v[1], v[0])

    g = math.hypot(lens.g1, lens.g2)
    theta = turn(0.5 * math.atan2(lens.g2, lens.g1)) if g > 0 else 0.0
    phi = turn(lens.phi) % math.pi if lens.q < 1 else 0.0
    return LensParams(model=lens.model, x0=float(pos[0]), y0=float(pos[1]), q=lens.q, phi=phi, rein=lens.rein,
                      t=lens.t, g1=g * math.cos(2 * theta), g2=g * math.sin(2 * theta),
                      z_lens=lens.z_lens, z_source=lens.z_source)


def lenstronomy_frame(kwargs_data: Mapping) -> tuple[np.ndarray, np.ndarray]:
    """(R, shift): array-frame position = ``R w + shift`` [arcsec] for a lenstronomy position ``w = (ra, dec)``
    of the image that ``kwargs_data`` describes (lenstronomy's ImageData keywords: ``transform_pix2angle``
    [arcsec/pixel], ``ra_at_xy_0``, ``dec_at_xy_0`` [arcsec, the centre of pixel (0, 0)] and ``image_data``,
    whose shape (ny, nx) places the array centre). The pixels must be square."""
    if not isinstance(kwargs_data, Mapping):
        raise LensConversionError("kwargs_data: must be lenstronomy's ImageData keyword dict")
    for key in ("transform_pix2angle", "ra_at_xy_0", "dec_at_xy_0", "image_data"):
        if key not in kwargs_data:
            raise LensConversionError(f"kwargs_data: '{key}' missing (lenstronomy's ImageData keywords)")
    T = np.asarray(kwargs_data["transform_pix2angle"], float)
    shape = np.shape(kwargs_data["image_data"])
    if T.shape != (2, 2) or not np.isfinite(T).all() or len(shape) != 2:
        raise LensConversionError("kwargs_data: transform_pix2angle must be a finite 2x2 matrix and image_data 2-D")
    pix = math.sqrt(abs(np.linalg.det(T)))
    if not pix > 0 or not np.allclose(T.T @ T, pix * pix * np.eye(2), rtol=1e-6, atol=1e-12 * pix * pix):
        raise LensConversionError("kwargs_data: transform_pix2angle must be a scaled rotation or reflection "
                                  "(square pixels)")
    R = pix * np.linalg.inv(T)
    w0 = np.array([float(kwargs_data["ra_at_xy_0"]), float(kwargs_data["dec_at_xy_0"])])
    centre = np.array([(shape[1] - 1) / 2, (shape[0] - 1) / 2])
    return R, -R @ w0 - pix * centre


def _keywords(lens: LensParams, frame: str, z_given: bool) -> dict:
    """The keyword dict of :func:`parse_lens` (plain floats): t only for EPL, redshifts only when given."""
    out = {"model": f"{lens.model}+SHEAR", "frame": frame, "x0": lens.x0, "y0": lens.y0, "q": lens.q,
           "phi": lens.phi, "rein": lens.rein, "g1": lens.g1, "g2": lens.g2}
    if lens.model == "EPL":
        out["t"] = lens.t
    if z_given:
        out.update(z_lens=lens.z_lens, z_source=lens.z_source)
    return {k: v if isinstance(v, str) else float(v) for k, v in out.items()}


def _checked(raw: dict, where: str) -> LensParams:
    """``raw`` through :func:`parse_lens` (q in (0, 1], rein > 0, z_source > z_lens), EPL slope in (0, 2)."""
    try:
        lens, _ = parse_lens(raw, where)
    except InputFileError as exc:
        raise LensConversionError(str(exc)) from None
    if lens.model == "EPL" and not 0 < lens.t < 2:
        raise LensConversionError(f"{where}: EPL slope t = {lens.t:.6g} must be in (0, 2) (power-law gamma in (1, 3))")
    return lens


def _redshifts(z_lens, z_source) -> dict:
    return {k: float(v) for k, v in (("z_lens", z_lens), ("z_source", z_source)) if v is not None}


def _number(kw: Mapping, key: str, where: str, default=None) -> float:
    if key not in kw:
        if default is not None:
            return default
        raise LensConversionError(f"{where}: '{key}' missing")
    try:
        v = float(kw[key])
    except (TypeError, ValueError):
        raise LensConversionError(f"{where}: '{key}' is not a number: {kw[key]!r}") from None
    if not math.isfinite(v):
        raise LensConversionError(f"{where}: '{key}' is not finite: {v}")
    return v


# --------------------------------------------------------------------------------------- lenstronomy
def _lenstronomy_profiles(kwargs_lens, lens_model_list) -> tuple[int, int | None]:
    """Indices of the one main deflector and of the shear (None without one) in lenstronomy's lists."""
    names = [str(n) for n in lens_model_list]
    if len(names) != len(kwargs_lens):
        raise LensConversionError(f"lens_model_list has {len(names)} profiles but kwargs_lens {len(kwargs_lens)}")
    for i, name in enumerate(names):
        if not isinstance(kwargs_lens[i], Mapping):
            raise LensConversionError(f"kwargs_lens[{i}] ({name}) must be a dict of its parameters")
        if name not in MAIN_LENSTRONOMY + SHEAR_LENSTRONOMY:
            raise LensConversionError(f"lenstronomy profile {name!r} (lens_model_list[{i}]) is not supported: one "
                                      f"of {', '.join(MAIN_LENSTRONOMY)} with at most one of "
                                      f"{', '.join(SHEAR_LENSTRONOMY)}")
    main = [i for i, n in enumerate(names) if n in MAIN_LENSTRONOMY]
    shear = [i for i, n in enumerate(names) if n in SHEAR_LENSTRONOMY]
    if len(main) != 1:
        raise LensConversionError(f"lens_model_list {names}: needs exactly one main deflector "
                                  f"({', '.join(MAIN_LENSTRONOMY)}), got {len(main)}")
    if len(shear) > 1:
        raise LensConversionError(f"lens_model_list {names}: at most one external shear, got {len(shear)}")
    return main[0], (shear[0] if shear else None)


def _lenstronomy_main(name: str, kw: Mapping, where: str) -> dict:
    """Model, centre, q, phi, rein, t of lenstronomy's SIE / SIS / EPL keywords."""
    out = {"model": "EPL" if name.startswith("EPL") else "SIE", "x0": _number(kw, "center_x", where, 0.0),
           "y0": _number(kw, "center_y", where, 0.0), "rein": _number(kw, "theta_E", where), "t": 1.0}
    if name == "SIS":
        out.update(q=1.0, phi=0.0)
    else:
        out["q"], out["phi"] = ellipticity_to_q_phi(_number(kw, "e1", where), _number(kw, "e2", where), where)
    if out["model"] == "EPL":
        out["t"] = _number(kw, "gamma", where) - 1.0
    return out


def _lenstronomy_shear(name: str, kw: Mapping, where: str) -> tuple[float, float, np.ndarray]:
    """(g1, g2, shear centre (ra_0, dec_0)) of lenstronomy's SHEAR or SHEAR_GAMMA_PSI keywords."""
    if name == "SHEAR":
        g1, g2 = _number(kw, "gamma1", where), _number(kw, "gamma2", where)
    else:
        g, psi = _number(kw, "gamma_ext", where), _number(kw, "psi_ext", where)
        g1, g2 = g * math.cos(2 * psi), g * math.sin(2 * psi)
    return g1, g2, np.array([_number(kw, "ra_0", where, 0.0), _number(kw, "dec_0", where, 0.0)])


def from_lenstronomy(kwargs_lens, lens_model_list, *, frame: str = "WORLD", kwargs_data: Mapping | None = None,
                     z_lens: float | None = None, z_source: float | None = None) -> dict:
    """The project's lens keywords (:func:`~pipeline.lensing.observation.parse_lens`'s dict, model
    'SIE+SHEAR' or 'EPL+SHEAR') of a lenstronomy lens: ``lens_model_list`` one of SIE, SIS, EPL, EPL_NUMBA and
    optionally SHEAR or SHEAR_GAMMA_PSI, with their ``kwargs_lens`` (arcsec, rad).

    ``frame='WORLD'`` returns lenstronomy's ``(ra, dec)`` values unchanged: right for an observation file
    whose SCI WCS matrix is lenstronomy's ``transform_pix2angle`` and whose CRPIX is lenstronomy's origin
    (the file's WCS maps them to the array). ``frame='ARRAY'`` maps them to the array frame with
    ``kwargs_data`` (lenstronomy's ImageData keywords of the fitted image; :func:`lenstronomy_frame`).
    The shear is centred on the origin here; a lenstronomy shear centre ``(ra_0, dec_0)`` elsewhere shifts
    the reconstructed source by ``-Gamma s`` (``s`` that centre in the returned frame), which is warned of
    above ``SHEAR_CENTRE_TOL``. Redshifts are included when given."""
    frame = str(frame).upper()
    if frame not in FRAMES:
        raise LensConversionError(f"frame {frame!r} is not one of {', '.join(FRAMES)}")
    if (frame == "ARRAY") != (kwargs_data is not None):
        raise LensConversionError("frame='ARRAY' needs kwargs_data (lenstronomy's ImageData keywords) and "
                                  "frame='WORLD' takes none")
    names = [str(n) for n in lens_model_list]
    i_main, i_shear = _lenstronomy_profiles(kwargs_lens, names)
    vals = _lenstronomy_main(names[i_main], kwargs_lens[i_main], f"kwargs_lens[{i_main}] ({names[i_main]})")
    g1 = g2 = 0.0
    centre = np.zeros(2)
    if i_shear is not None:
        g1, g2, centre = _lenstronomy_shear(names[i_shear], kwargs_lens[i_shear],
                                            f"kwargs_lens[{i_shear}] ({names[i_shear]})")
    raw = dict(vals, g1=g1, g2=g2, **_redshifts(z_lens, z_source))
    lens = _checked(dict(raw, model=f"{vals['model']}+SHEAR"), "lenstronomy lens")
    if frame == "ARRAY":
        R, shift = lenstronomy_frame(kwargs_data)
        lens = map_lens(lens, R, shift)
        centre = R @ centre + shift
    shift_src = math.hypot(g1, g2) * float(np.hypot(*centre))
    if shift_src > SHEAR_CENTRE_TOL:
        warnings.warn(f"lenstronomy shear centre at ({centre[0]:.4g}, {centre[1]:.4g}) arcsec in the {frame} frame: "
                      f"centred on the origin here, the source moves by {shift_src:.3g} arcsec", stacklevel=2)
    return _keywords(lens, frame, z_lens is not None or z_source is not None)


def _as_lens(lens) -> tuple[LensParams, str]:
    """(LensParams, frame) of a LensParams (array frame) or a :func:`parse_lens` keyword dict."""
    if isinstance(lens, LensParams):
        return lens, "ARRAY"
    if isinstance(lens, Mapping):
        params, frame = parse_lens(dict(lens), "lens keywords")
        if frame not in FRAMES:
            raise LensConversionError(f"lens keywords: frame {frame!r} is not one of {', '.join(FRAMES)}")
        return params, frame
    raise LensConversionError(f"lens must be LensParams or a lens keyword dict, got {type(lens).__name__}")


def to_lenstronomy(lens, *, kwargs_data: Mapping | None = None) -> tuple[list[str], list[dict]]:
    """``(lens_model_list, kwargs_lens)`` for lenstronomy of ``lens`` (LensParams in the array frame, or a lens
    keyword dict with its ``frame``): ['SIE', 'SHEAR'] or ['EPL', 'SHEAR'], shear centred on the origin.

    An ARRAY-frame lens needs ``kwargs_data`` (lenstronomy's ImageData keywords) to be placed in lenstronomy's
    ``(ra, dec)`` frame; a WORLD-frame lens is already in it and takes none."""
    params, frame = _as_lens(lens)
    if (frame == "ARRAY") != (kwargs_data is not None):
        raise LensConversionError("an ARRAY-frame lens needs kwargs_data (lenstronomy's ImageData keywords) and a "
                                  "WORLD-frame lens takes none")
    if frame == "ARRAY":
        R, shift = lenstronomy_frame(kwargs_data)
        params = map_lens(params, R.T, -R.T @ shift)
    e1, e2 = q_phi_to_ellipticity(params.q, params.phi)
    main = {"theta_E": params.rein, "e1": e1, "e2": e2, "center_x": params.x0, "center_y": params.y0}
    if params.model == "EPL":
        main["gamma"] = params.t + 1.0
    shear = {"gamma1": params.g1, "gamma2": params.g2, "ra_0": 0.0, "dec_0": 0.0}
    return [params.model, "SHEAR"], [{k: float(v) for k, v in main.items()}, {k: float(v) for k, v in shear.items()}]


# ----------------------------------------------------------------------------------------- PyAutoLens
def _fields(obj, names: tuple[str, ...]) -> dict:
    """The attributes or keys ``names`` of a PyAutoLens profile or a plain dict (those present)."""
    if isinstance(obj, Mapping):
        return {k: obj[k] for k in names if k in obj}
    return {k: getattr(obj, k) for k in names if hasattr(obj, k)}


def _pyautolens_profile(mass) -> str:
    """The PyAutoLens class name of ``mass``: its type's, or for a dict an optional 'profile' key, else
    PowerLaw with a 'slope' and Isothermal without; refuses other profiles and unknown keys."""
    if isinstance(mass, Mapping):
        known = {"profile", "centre", "ell_comps", "einstein_radius", "slope"}
        extra = sorted(set(mass) - known)
        if extra:
            raise LensConversionError(f"PyAutoLens mass: unsupported parameter(s) {', '.join(extra)} (an Isothermal or "
                                      "PowerLaw has centre, ell_comps, einstein_radius, slope)")
        name = str(mass.get("profile", "PowerLaw" if "slope" in mass else "Isothermal"))
    else:
        name = type(mass).__name__
    if name not in PYAUTOLENS_MASS:
        raise LensConversionError(f"PyAutoLens mass profile {name} is not supported ({', '.join(PYAUTOLENS_MASS)})")
    return name


def _pair(value, key: str, where: str) -> tuple[float, float]:
    try:
        a, b = (float(v) for v in value)
    except (TypeError, ValueError):
        raise LensConversionError(f"{where}: '{key}' must be a pair of numbers, got {value!r}") from None
    return a, b


def pyautolens_frame(flip_for_ds9: bool) -> np.ndarray:
    """R with array-frame position = ``R (x, y)`` for a PyAutoLens position ``(y, x)``: both put x along
    increasing FITS columns and the origin at the array centre; PyAutoLens's +y points to the first row of the
    array it holds (its top), which is the last FITS row when it flipped the file up-down on reading
    (``flip_for_ds9``, the setting of older releases: R = identity) and the first FITS row otherwise (current
    releases read FITS arrays as stored: R = diag(1, -1))."""
    return np.eye(2) if flip_for_ds9 else np.diag([1.0, -1.0])


def _pyautolens_mass(mass) -> dict:
    """Model, centre, q, phi, rein, t of a PyAutoLens mass (in its own frame)."""
    name = _pyautolens_profile(mass)
    where = f"PyAutoLens {name}"
    f = _fields(mass, ("centre", "ell_comps", "einstein_radius", "slope"))
    y0, x0 = _pair(f.get("centre", (0.0, 0.0)), "centre", where)
    ey, ex = (0.0, 0.0) if name.endswith("Sph") else _pair(f.get("ell_comps", (0.0, 0.0)), "ell_comps", where)
    q, phi = ellipticity_to_q_phi(ex, ey, where)
    slope = 2.0 if name.startswith("Isothermal") else _number(f, "slope", where, 2.0)
    t = slope - 1.0
    if not 0 < t < 2:
        raise LensConversionError(f"{where}: slope {slope:.6g} must be in (1, 3)")
    theta = _number(f, "einstein_radius", where)
    rein = theta if name == "PowerLawIntermediate" else theta * math.sqrt(q) * (2.0 / (1.0 + q)) ** (1.0 / t)
    return {"model": "SIE" if name.startswith("Isothermal") else "EPL", "x0": x0, "y0": y0, "q": q, "phi": phi,
            "rein": rein, "t": t}


def _pyautolens_shear(shear) -> tuple[float, float]:
    """(gamma_1, gamma_2) of a PyAutoLens ExternalShear or a dict of those keys; (0, 0) for None."""
    if shear is None:
        return 0.0, 0.0
    where = "PyAutoLens ExternalShear"
    if isinstance(shear, Mapping) and set(shear) - {"gamma_1", "gamma_2"}:
        extra = ", ".join(sorted(set(shear) - {"gamma_1", "gamma_2"}))
        raise LensConversionError(f"{where}: unsupported parameter(s) {extra} (gamma_1, gamma_2)")
    s = _fields(shear, ("gamma_1", "gamma_2"))
    return _number(s, "gamma_1", where), _number(s, "gamma_2", where)


def from_pyautolens(mass, shear=None, *, flip_for_ds9: bool = False, z_lens: float | None = None,
                    z_source: float | None = None) -> dict:
    """The project's lens keywords (ARRAY frame, model 'SIE+SHEAR' or 'EPL+SHEAR') of a PyAutoLens
    ``Isothermal`` / ``IsothermalSph`` / ``PowerLaw`` / ``PowerLawSph`` / ``PowerLawIntermediate`` mass and an
    optional ``ExternalShear``: the profile objects, or plain dicts of their parameters (``centre`` (y, x)
    [arcsec], ``ell_comps``, ``einstein_radius`` [arcsec], ``slope``; ``gamma_1``, ``gamma_2``), so that
    autolens need not be installed. The fit must have used the observation's pixels with PyAutoLens's default
    origin (0, 0); ``flip_for_ds9`` says whether that PyAutoLens flipped FITS arrays up-down on reading
    (:func:`pyautolens_frame`). Redshifts are included when given."""
    vals = _pyautolens_mass(mass)
    g1, g2 = _pyautolens_shear(shear)
    raw = dict(vals, model=f"{vals['model']}+SHEAR", g1=g1, g2=g2, **_redshifts(z_lens, z_source))
    lens = map_lens(_checked(raw, f"PyAutoLens {_pyautolens_profile(mass)}"), pyautolens_frame(flip_for_ds9), (0, 0))
    return _keywords(lens, "ARRAY", z_lens is not None or z_source is not None)


def to_pyautolens(lens, *, flip_for_ds9: bool = False) -> tuple[str, dict, dict]:
    """``(mass class name, mass parameters, shear parameters)`` for PyAutoLens of ``lens`` (LensParams or an
    ARRAY-frame keyword dict): ``Isothermal`` for SIE, ``PowerLaw`` for EPL, and ``ExternalShear``'s
    ``gamma_1, gamma_2``, e.g. ``getattr(al.mp, name)(**mass)``, ``al.mp.ExternalShear(**shear)``;
    ``flip_for_ds9`` as in :func:`from_pyautolens`."""
    params, frame = _as_lens(lens)
    if frame != "ARRAY":
        raise LensConversionError("to_pyautolens takes an ARRAY-frame lens: map a WORLD-frame lens with the "
                                  "observation's WCS first")
    R = pyautolens_frame(flip_for_ds9)
    params = map_lens(params, R.T, (0, 0))
    q, t = params.q, params.t if params.model == "EPL" else 1.0
    f = (1 - q) / (1 + q)
    mass = {"centre": (float(params.y0), float(params.x0)),
            "ell_comps": (f * math.sin(2 * params.phi), f * math.cos(2 * params.phi)),
            "einstein_radius": params.rein / math.sqrt(q) * ((1.0 + q) / 2.0) ** (1.0 / t)}
    name = "Isothermal"
    if params.model == "EPL":
        name, mass["slope"] = "PowerLaw", t + 1.0
    return name, mass, {"gamma_1": float(params.g1), "gamma_2": float(params.g2)}
