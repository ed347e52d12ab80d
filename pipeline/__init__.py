"""Lensed-source reconstruction with diffusion priors and RTB posterior fine-tuning.

The package holds all logic; Snakemake rules call ``python -m pipeline <command>``.
"""

__version__ = "0.1.0"
