"""Lensing: source galaxies, the caustics forward model, simulated and user observations (FITS).

The package itself imports nothing, so reading the ``lensing:`` config section
(:mod:`pipeline.lensing.config`) does not load torch; the forward model is
:mod:`pipeline.lensing.operator`.
"""
