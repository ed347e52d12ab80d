"""Posterior predictive check of one observation's posterior samples: is the fit consistent with the noise?

Input: the per-sample chi2 of :func:`pipeline.metrics.chi2.chi2_per_sample` (chi2_nu over the ``nu``
unmasked image pixels, chi2_arc_nu over the sample's own arc, i.e. the pixels where that sample's noiseless
model exceeds sigma, and their count ``n_arc``).

The law: for an exact posterior sample x_s, the pair (x_s, y) has the same joint law as (x_true, y) under
the prior predictive, so the normalised residuals (y - A x_s) / sigma on any set of pixels chosen from x_s
alone are independent standard normals. chi2 summed over m such pixels is therefore chi2_m exactly, over
the whole image (m = nu, shared by all samples) and over the arc (m = n_arc of that sample).

The check: per sample the PIT u_s = F_{chi2_m}(chi2_s) (uniform on [0, 1] for exact samples); the
observation is flagged when the median of u_s over the samples lies outside [tail, 1 - tail] (default
tail 0.0005: the central 99.9 % band), for the image or for the arc. For the image (m shared) this is the
band [F^-1(tail), F^-1(1 - tail)] / m on the median chi2_nu. A sample without any arc pixel counts as
u = 0.5 in the arc median (it carries no evidence either way; an observation where no sample has an arc
is judged on the image alone); a sample whose chi2 is not finite (NaN or inf model) counts as u = 1.

False alarms for exact samples: the median of S values exceeds 1 - tail only if at least S/2 of them do,
and by Markov's inequality P(#{u_s > 1 - tail} >= S/2) <= S tail / (S/2) = 2 tail; the same holds below
tail. So P(flag) <= 4 tail = 0.2 % per statistic (image or arc) and <= 8 tail = 0.4 % for the flag
(either statistic), whatever the number of samples and however they are correlated.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import special

TAIL = 0.0005
"""Probability of each tail outside the band (dimensionless): 0.0005 = the central 99.9 % band."""


@dataclass(frozen=True)
class PPCResult:
    """One observation's check. chi2 values are reduced (chi2 / m, dimensionless); band edges likewise.

    flag: the fit is inconsistent with the noise (image or arc PIT median outside [tail, 1 - tail]).
    image: median chi2_nu over the samples on the ``nu`` unmasked pixels; image_band: the band on it.
    image_pit: median over samples of F_{chi2_m}(chi2) with m = nu.
    arc: median chi2_nu over the samples that have an arc (None when none has); arc_band: the band at
    ``arc_m`` = the median arc pixel count of those samples (the PIT uses each sample's own count).
    arc_pit: median over all samples of the arc PIT (0.5 for a sample without arc); n_no_arc: samples
    without any arc pixel. nu: unmasked pixels [pixel]. tail: the band's tail probability. A NaN chi2
    (failed model) counts as +inf in the medians.
    """

    flag: bool
    image: float
    image_band: tuple[float, float]
    image_pit: float
    arc: float | None
    arc_band: tuple[float, float] | None
    arc_pit: float | None
    arc_m: int | None
    n_no_arc: int
    nu: int
    tail: float

    def message(self) -> str:
        """One line: verdict, the two medians against their bands, and the PIT medians."""
        lo, hi = self.image_band
        line = (f"{'misfit' if self.flag else 'consistent with the noise'}: chi2_nu median {self.image:.3f} over "
                f"the image ({100 * (1 - 2 * self.tail):g} % band for exact samples [{lo:.3f}, {hi:.3f}], "
                f"{self.nu} pixels)")
        if self.arc is None:
            line += ", no arc pixel in any sample"
        else:
            alo, ahi = self.arc_band
            line += f", {self.arc:.3f} in the arc (band [{alo:.3f}, {ahi:.3f}] at {self.arc_m} pixels)"
        pits = f"{self.image_pit:.4f}" + ("" if self.arc_pit is None else f" / {self.arc_pit:.4f}")
        return line + f"; PIT median {pits} (flag outside [{self.tail:g}, {1 - self.tail:g}])"

    def as_dict(self) -> dict:
        """The fields as plain Python values (JSON-ready; bands as lists)."""
        d = asdict(self)
        for k in ("image_band", "arc_band"):
            d[k] = None if d[k] is None else [float(v) for v in d[k]]
        return d


def chi2_band(m: int, tail: float = TAIL) -> tuple[float, float]:
    """The central band of chi2_m / m holding 1 - 2 ``tail`` of its probability (dimensionless)."""
    if m < 1:
        raise ValueError(f"chi2 band needs m >= 1 pixels, got {m}")
    # the chi2_m quantiles through the regularised incomplete gamma function: F(x) = P(m/2, x/2)
    return float(2 * special.gammaincinv(m / 2, tail) / m), float(2 * special.gammainccinv(m / 2, tail) / m)


def chi2_pit(chi2_nu, m) -> np.ndarray:
    """u = F_{chi2_m}(chi2_nu * m) per sample (``m`` scalar or per sample); NaN chi2 gives 1."""
    chi2_nu = np.asarray(chi2_nu, np.float64)
    m = np.broadcast_to(np.asarray(m, np.float64), chi2_nu.shape)
    u = special.gammainc(m / 2, chi2_nu * m / 2)  # the chi2_m CDF at chi2_nu * m
    return np.where(np.isnan(chi2_nu), 1.0, u)


def _nan_to_inf(values) -> np.ndarray:
    """Per-sample chi2 as float64 with NaN (a failed model) counted as the worst fit, +inf."""
    v = np.asarray(values, np.float64).reshape(-1)
    return np.where(np.isnan(v), np.inf, v)


def posterior_predictive_check(chi: dict, tail: float = TAIL) -> PPCResult:
    """The check on ``chi`` = :func:`~pipeline.metrics.chi2.chi2_per_sample`'s output (``chi2_nu``,
    ``chi2_arc_nu``, ``n_arc`` per sample, ``nu``) at tail probability ``tail`` (module docstring)."""
    if not 0 < tail < 0.5:
        raise ValueError(f"tail must lie in (0, 0.5), got {tail}")
    img = _nan_to_inf(chi["chi2_nu"])
    if img.size == 0:
        raise ValueError("posterior predictive check needs at least one sample")
    nu = int(chi["nu"])
    band = chi2_band(nu, tail)
    u_img = float(np.median(chi2_pit(img, nu)))
    n_arc = np.asarray(chi["n_arc"], np.int64).reshape(-1)
    arc = _nan_to_inf(chi["chi2_arc_nu"])
    has = n_arc > 0
    arc_med = arc_band = u_arc = arc_m = None
    if has.any():
        u = np.full(arc.shape, 0.5)
        u[has] = chi2_pit(arc[has], n_arc[has])
        u_arc = float(np.median(u))
        arc_med = float(np.median(arc[has]))
        arc_m = int(round(float(np.median(n_arc[has]))))
        arc_band = chi2_band(arc_m, tail)
    out = [u_img] + ([] if u_arc is None else [u_arc])
    flag = any(u < tail or u > 1 - tail for u in out)
    return PPCResult(flag=bool(flag), image=float(np.median(img)), image_band=band, image_pit=u_img, arc=arc_med,
                     arc_band=arc_band, arc_pit=u_arc, arc_m=arc_m, n_no_arc=int((~has).sum()), nu=nu, tail=tail)
