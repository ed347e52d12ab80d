"""Devices, seeds and thread counts.

Threads: on the 2-core machines this project is developed and tested on, two intra-op threads
were erratic (2-10x slower), so on CPU we default to ONE torch thread unless
the user sets ``PIPELINE_NUM_THREADS``. On a GPU the thread count matters little.
"""

from __future__ import annotations

import os
import random
import sys

import numpy as np
import torch


def configure_threads(n: int | None = None) -> int:
    """Set torch's intra-op thread count (default 1, or ``$PIPELINE_NUM_THREADS``)."""
    if n is None:
        n = int(os.environ.get("PIPELINE_NUM_THREADS", "1"))
    torch.set_num_threads(max(1, n))
    return torch.get_num_threads()


def choose_device(preference: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else CPU; ``cpu``/``cuda`` force one."""
    if preference == "cpu":
        return torch.device("cpu")
    if preference == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' requested but no CUDA device is available")
        return torch.device("cuda")
    if preference != "auto":
        raise ValueError(f"unknown device preference {preference!r} (auto, cpu, cuda)")
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; returns a torch Generator seeded the same way."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def tqdm_disable() -> bool:
    """tqdm's ``disable`` argument: bars only on a TTY, so SLURM logs are not flooded."""
    return not sys.stderr.isatty()
