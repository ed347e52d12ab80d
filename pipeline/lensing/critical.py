"""Critical curves (image plane) and caustics (source plane) of the operator's lens model.

The lens is the one :func:`pipeline.lensing.operator.build_simulator` builds (caustics' SIE or EPL plus
the external shear centred on the array origin), evaluated in float64. Positions are in the array frame:
+x along columns, +y along rows, arcsec from the array centre.

Method: the lens equation beta = theta - alpha(theta) is ray-traced by caustics on a regular image-plane
grid centred on the lens; the Jacobian determinant det(d beta / d theta) = det(I - d alpha / d theta) comes
from central differences of beta with a step much smaller than the grid spacing; its zero contours
(contourpy's marching squares, linear interpolation between grid nodes) are the critical curves, and
ray-tracing their points gives the caustics. Accuracy: a small fraction of the grid spacing (the default
grid resolves the curves to ~1e-3 of the Einstein radius).
"""

from __future__ import annotations

import math

import contourpy
import numpy as np
import torch

from pipeline.errors import InputFileError
from pipeline.lensing.observation import lens_keywords, parse_lens
from pipeline.lensing.operator import LensParams, build_simulator

DEFAULT_GRID = 256        # grid nodes per side (even: no node on the singular lens centre)
DIFF_STEP = 1e-5          # central-difference step [arcsec]


def lens_system(lens: LensParams):
    """The caustics lens system (main deflector + external shear) that the operator uses, in float64."""
    sim = build_simulator(lens, (1, 1), 1.0, 2, 1.0, 1, None, dtype=torch.float64)
    return sim.lens


def lens_equation(system, x, y) -> tuple[np.ndarray, np.ndarray]:
    """Source-plane position beta = theta - alpha(theta) [arcsec] of image-plane points (x, y) [arcsec]."""
    with torch.no_grad():
        bx, by = system.raytrace(torch.as_tensor(np.asarray(x, np.float64)),
                                 torch.as_tensor(np.asarray(y, np.float64)))
    return bx.numpy(), by.numpy()


def jacobian_det(system, x, y, step: float = DIFF_STEP) -> np.ndarray:
    """det(d beta / d theta) (dimensionless) at image-plane points (x, y) [arcsec], by central
    differences of the lens equation with ``step`` [arcsec]; negative inside the tangential critical
    curve of an isothermal lens, NaN at the singular centre."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    bx_xp, by_xp = lens_equation(system, x + step, y)
    bx_xm, by_xm = lens_equation(system, x - step, y)
    bx_yp, by_yp = lens_equation(system, x, y + step)
    bx_ym, by_ym = lens_equation(system, x, y - step)
    h = 2.0 * step
    return ((bx_xp - bx_xm) * (by_yp - by_ym) - (bx_yp - bx_ym) * (by_xp - by_xm)) / (h * h)


def default_half_width(lens: LensParams) -> float:
    """Half side [arcsec] of a grid centred on the lens that holds its critical curves: twice the
    Einstein radius stretched by the axis ratio (1/sqrt(q)) and the shear (1 / (1 - |gamma|))."""
    gamma = math.hypot(lens.g1, lens.g2)
    return 2.0 * lens.rein / (math.sqrt(lens.q) * max(1.0 - gamma, 0.1))


def critical_curves(lens: LensParams, half_width: float | None = None, n: int = DEFAULT_GRID) -> list[np.ndarray]:
    """Critical curves of ``lens``: a list of (k, 2) arrays of (x, y) [arcsec, array frame], the det = 0
    contours on an ``n x n`` grid of half side ``half_width`` [arcsec] (default
    :func:`default_half_width`) centred on the lens centre (x0, y0). Closed curves repeat their first
    point at the end; a curve that leaves the grid is cut at its edge."""
    half = default_half_width(lens) if half_width is None else float(half_width)
    if not half > 0 or n < 3:
        raise ValueError(f"need half_width > 0 and n >= 3, got {half}, {n}")
    offsets = np.linspace(-half, half, n)
    xs, ys = lens.x0 + offsets, lens.y0 + offsets
    gx, gy = np.meshgrid(xs, ys, indexing="xy")
    det = jacobian_det(lens_system(lens), gx, gy)
    gen = contourpy.contour_generator(xs, ys, np.ma.masked_invalid(det), name="serial", line_type="Separate")
    return [np.asarray(c, np.float64) for c in gen.lines(0.0) if len(c) >= 2]


def caustics_of(lens: LensParams, curves: list[np.ndarray]) -> list[np.ndarray]:
    """The caustics: each critical curve (k, 2) [arcsec] mapped through the lens equation, (k, 2) [arcsec]."""
    system = lens_system(lens)
    out = []
    for c in curves:
        bx, by = lens_equation(system, c[:, 0], c[:, 1])
        out.append(np.stack([bx, by], axis=1))
    return out


def lens_curves(lens: LensParams, half_width: float | None = None,
                n: int = DEFAULT_GRID) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(critical curves, caustics) of ``lens``, lists of (k, 2) arrays in arcsec (array frame)."""
    crit = critical_curves(lens, half_width, n)
    return crit, caustics_of(lens, crit)


def lens_from_header(header, source) -> LensParams | None:
    """The lens of a FITS header's LENSMOD / LENS_* / SHEAR_G* keywords (the observation files'
    names, parsed by :func:`pipeline.lensing.observation.parse_lens`), or None when LENSMOD is absent.
    Only the array frame (``LENSFRAM`` absent or ARRAY) is accepted: a header has no WCS to map
    another frame with. ``source`` names the file in errors."""
    raw = lens_keywords(header)
    if raw is None:
        return None
    lens, frame = parse_lens(raw, source)
    if frame != "ARRAY":
        raise InputFileError(source, f"lens keywords must be in the ARRAY frame here, got {frame!r}",
                             field="LENSFRAM")
    return lens


def curves_from_header(header, source=None) -> tuple[list[np.ndarray], list[np.ndarray]] | None:
    """(critical curves, caustics) [arcsec] of the lens in ``header`` (see :func:`lens_from_header`),
    or None when the header has no lens. Pass it as ``lens_curves`` to
    :func:`pipeline.plots.lens.plot_posterior_file`."""
    lens = lens_from_header(header, source if source is not None else "header")
    return None if lens is None else lens_curves(lens)
