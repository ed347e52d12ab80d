"""Figures (matplotlib; the backend is the caller's): per-lens posterior panels and the coverage figure.

Images use an asinh stretch (astropy ``AsinhStretch``, shared between truth, mean and samples; another
shared between data and model) and arcsec axes from the pixel scales, origin at the array centre.
"""

from pipeline.plots.coverage import plot_coverage
from pipeline.plots.lens import lens_figure, plot_lens, plot_posterior_file

__all__ = ["lens_figure", "plot_lens", "plot_posterior_file", "plot_coverage"]
