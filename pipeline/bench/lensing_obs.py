"""Prior-drawn lensing observations in memory, for the benchmarks: sources from the prior chain,
lenses from the lens prior, the config's noise, written and read back through the pipeline's own FITS
path (so each problem is exactly what ``sample`` would build)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from pipeline.diffusion.sampling import sample_prior
from pipeline.lensing.observation import load_observation
from pipeline.lensing.simulate import simulate_set


def prior_drawn_observations(setup, n_obs: int, seed: int) -> list[dict]:
    """``n_obs`` observations for ``setup`` (:func:`pipeline.lensing.sample.load_setup`): one dict each
    with problem, y, meta, the manifest entry (lens, peak SNR) and the truth in network units (1, n, n)."""
    b = setup.brightness
    truths = sample_prior(setup.prior, setup.chain, n_obs, generator=torch.Generator().manual_seed(seed))
    phys = (b.scale * truths[:, 0] + b.offset).cpu().numpy()
    lcfg, out = setup.lcfg, []
    with tempfile.TemporaryDirectory() as tmp:
        entries = simulate_set(phys, n_obs, Path(tmp) / "obs", lcfg.geometry, lcfg.lens, lcfg.noise, seed=seed)
        for entry in entries:
            problem, y, meta = load_observation(Path(tmp) / "obs" / entry["file"], lcfg, device=setup.device,
                                                brightness=b)
            out.append({"problem": problem, "y": y, "meta": meta, "entry": entry,
                        "truth": truths[entry["source_index"]]})
    return out
