"""``python -m pipeline simulate-prior-set``: observations whose truths come from the trained prior's chain.

The truths are drawn from the exact chain RTB targets (the config's ``chain:`` section: K, timestep
grid, variances; the final denoise of the prior checkpoint), lenses from the configured ranges, and
noise at the fixed level that does not depend on the truth: on this set exact posteriors are calibrated, so any
miscalibration is the sampler's.
"""

from __future__ import annotations

import dataclasses
import json
import logging

from pipeline.errors import ConfigError

log = logging.getLogger(__name__)


def add_arguments(parser) -> None:
    parser.add_argument("--config", required=True, metavar="FILE", help="pipeline YAML config")
    parser.add_argument("--checkpoint", required=True, metavar="DIR", help="trained prior (train-prior output)")
    parser.add_argument("--sources", metavar="SOURCES.fits",
                        help="source cube, used only to derive the fixed noise level when lensing.noise.sigma is null")
    parser.add_argument("--n", type=int, required=True, help="number of observations")
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory (obs-NNNN.fits + manifest.json)")
    parser.add_argument("--seed", type=int, default=None, help="default: lensing.simulate_seed + 1")


def run(args) -> int:
    import torch

    from pipeline.config import read_device
    from pipeline.diffusion.schedule import load_chain
    from pipeline.diffusion.network_prior import load_prior
    from pipeline.lensing.config import load_lensing_config
    from pipeline.lensing.finetune import resolve_noise_sigma
    from pipeline.lensing.simulate import peak_snr_stats, simulate_set
    from pipeline.diffusion.sampling import sample_prior
    from pipeline.runtime import choose_device, configure_threads

    configure_threads()
    if args.n < 1:
        raise ConfigError("--n", "n", f"must be >= 1, got {args.n}")
    lcfg = load_lensing_config(args.config)
    prior = load_prior(args.checkpoint, device=choose_device(read_device(args.config)))
    chain = load_chain(args.config, prior)
    K, var = chain.K, chain.variance
    seed = lcfg.simulate_seed + 1 if args.seed is None else args.seed
    gen = torch.Generator().manual_seed(seed)
    x = sample_prior(prior, chain, args.n, generator=gen)
    truths = prior.to_physical(x).reshape(args.n, lcfg.geometry.source_npix, lcfg.geometry.source_npix)
    sigma = resolve_noise_sigma(lcfg, args.sources)
    noise = dataclasses.replace(lcfg.noise, sigma=sigma, poisson=False)  # truth-independent noise only
    extra = {"TRUTHSRC": ("prior-chain", "truths drawn from the trained prior chain"),
             "PRIORK": (K, "chain steps of the prior"), "PRIORVAR": (var, "chain reverse variance")}
    entries = simulate_set(truths.cpu().numpy(), args.n, args.out, lcfg.geometry, lcfg.lens, noise, seed,
                           extra=extra, source_bunit=lcfg.sources.bunit)
    print(json.dumps({"n": len(entries), "noise_sigma": sigma, "K": K, "variance": var,
                      "peak_snr": peak_snr_stats(entries)}))
    return 0
