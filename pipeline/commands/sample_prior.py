"""``python -m pipeline sample-prior``: ancestral samples of a trained prior's chain into FITS
(:func:`pipeline.diffusion.prior_samples.write_prior_samples`) and optionally a PNG grid."""

from __future__ import annotations

import logging

import numpy as np

from pipeline.config import load_section, read_device
from pipeline.diffusion.chain_config import ChainConfig
from pipeline.diffusion.network_prior import load_prior
from pipeline.diffusion.prior_samples import write_prior_samples
from pipeline.diffusion.sampling import sample_prior
from pipeline.diffusion.schedule import build_chain
from pipeline.errors import ConfigError
from pipeline.plots.grid import save_grid_png
from pipeline.runtime import choose_device, configure_threads, seed_everything

log = logging.getLogger(__name__)


def add_arguments(parser) -> None:
    parser.description = (
        "Draw samples x0 = f(x_1) from the strided K-step reverse chain of a trained prior and write them "
        "to FITS (HDU SAMPLES, (n, H, W) or (n, C, H, W), physical units scale*x+offset) with provenance "
        "in the primary header; optionally a PNG grid.")
    parser.add_argument("--checkpoint", required=True, metavar="DIR",
                        help="train-prior run directory (uses final/ or the newest readable step), a step-N "
                             "directory or an exported prior directory")
    parser.add_argument("--n", type=int, default=64, help="number of samples (default 64)")
    parser.add_argument("--out", required=True, metavar="FILE.fits", help="output FITS file (written atomically)")
    parser.add_argument("--config", metavar="FILE", help="pipeline YAML config: its chain: section and device "
                                                         "(default: the chain: defaults)")
    parser.add_argument("--K", type=int, help="chain length (default: chain.K)")
    parser.add_argument("--spacing", choices=["uniform", "quadratic"],
                        help="timestep grid rule (default: chain.spacing, or the config's explicit timesteps)")
    parser.add_argument("--variance", choices=["small", "large"],
                        help="reverse-step variance: small=beta-tilde, large=beta (default: chain.variance)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--batch-size", type=int, default=64, help="samples per batch (default 64)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default: the config's device, else auto")
    parser.add_argument("--png", metavar="FILE.png", help="also write a PNG grid of (up to 64) samples")


def run(args) -> int:
    configure_threads()
    if args.n < 1:
        raise ConfigError("--n", "n", f"must be >= 1, got {args.n}")
    if args.batch_size < 1:
        raise ConfigError("--batch-size", "batch_size", f"must be >= 1, got {args.batch_size}")
    source = args.config or "<defaults>"
    ccfg = load_section(args.config, "chain", ChainConfig) if args.config else ChainConfig()
    if args.K is not None or args.spacing:  # an explicit grid no longer applies: the spacing rule does
        ccfg.K, ccfg.spacing, ccfg.timesteps = args.K or ccfg.K, args.spacing or ccfg.spacing, None
        source = "--K/--spacing"
    if args.variance:
        ccfg.variance = args.variance
    device = choose_device(args.device or (read_device(args.config) if args.config else "auto"))
    prior = load_prior(args.checkpoint, device=device)
    chain = build_chain(ccfg, prior.schedule, source)
    K, variance = chain.K, chain.variance
    gen = seed_everything(args.seed)
    log.info("sampling %d images from %s with K=%d (%s variance) on %s", args.n, args.checkpoint, K, variance, device)
    x = sample_prior(prior, chain, args.n, generator=gen, batch_size=args.batch_size, device=device)
    phys = prior.to_physical(x).cpu().numpy().astype(np.float32)
    if phys.shape[1] == 1:
        phys = phys[:, 0]
    write_prior_samples(args.out, phys, prior, checkpoint=args.checkpoint, seed=args.seed, K=K, variance=variance,
                        timesteps=chain.t.tolist())
    log.info("wrote %s", args.out)
    if args.png:
        save_grid_png(phys, args.png, title=f"prior samples, K={K}")
        log.info("wrote %s", args.png)
    return 0
