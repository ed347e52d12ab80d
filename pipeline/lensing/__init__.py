"""Lensing: source galaxies, the caustics forward model, simulated and user observations (FITS)."""

from pipeline.lensing.config import LensingConfig, load_lensing_config
from pipeline.lensing.operator import LensingProblem, LensParams, gaussian_psf, resample_psf

__all__ = ["LensingConfig", "load_lensing_config", "LensingProblem", "LensParams", "gaussian_psf",
           "resample_psf"]
