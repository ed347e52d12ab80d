"""Lensed-source reconstruction with diffusion priors and RTB posterior fine-tuning.

The package holds all logic; Snakemake rules call ``python -m pipeline <command>``. In Python,
``pipeline.reconstruct`` (:mod:`pipeline.api`, imported on first use so ``import pipeline`` stays light)
reconstructs a source from arrays.
"""

import importlib

__version__ = "0.1.0"

_LAZY = {"reconstruct": "pipeline.api", "Reconstruction": "pipeline.api"}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
