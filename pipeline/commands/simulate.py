"""``python -m pipeline simulate --config FILE --sources SOURCES.fits --split TEST --n N --out DIR``.

Draws lens parameters from ``lensing.lens`` ranges and writes ``DIR/obs-0000.fits`` ... (one file per
observation, in the FITS layout of docs/observations.md) and ``DIR/manifest.json``. The noise level is
``lensing.noise.sigma`` or, when null, set from the TRAIN split's typical lensed peak brightness /
``target_peak_snr``: a property of the source population, independent of each truth. The directory
appears only when complete.

Held-out rendering: each source is re-rendered ``--fine-factor`` (default 2, >= 2) times finer than the
source grid from the generation parameters in the sources file (GalSim galaxies redrawn, deep-field
objects re-cut at 2 HDF pixels per source pixel, user sources constant over each source pixel), lensed
with the image supersampled that much more and averaged onto the image pixels; TRUTH is its block
average onto the source grid. Each file records SRCKIND and the truth's chi2_nu under the inference
operator (TRCHI2, TRCHI2A in the arc); the printed summary and manifest.json give them per kind.
"""

from __future__ import annotations

import json
import logging
import time

from pipeline.config import config_hash
from pipeline.errors import ConfigError, InputFileError

log = logging.getLogger(__name__)


def add_arguments(parser):
    parser.add_argument("--config", required=True, help="pipeline YAML config (section lensing:)")
    parser.add_argument("--sources", required=True, help="sources FITS from `pipeline sources`")
    parser.add_argument("--split", default="TEST", choices=["TRAIN", "VALID", "TEST"], help="source split to lens")
    parser.add_argument("--n", type=int, required=True, help="number of observations")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=None, help="override lensing.simulate_seed")
    parser.add_argument("--fine-factor", type=int, default=2,
                        help="render sources this many times finer than the source grid (integer >= 2)")


def run(args) -> int:
    from pipeline.lensing.config import load_lensing_config
    from pipeline.lensing.heldout import heldout_kind_summary, simulate_heldout_set
    from pipeline.lensing.simulate import peak_snr_stats, typical_noise_sigma
    from pipeline.lensing.sources import read_source_records, read_sources
    from pipeline.runtime import configure_threads

    configure_threads()
    cfg = load_lensing_config(args.config)
    if args.n < 1:
        raise ConfigError("command line", "--n", f"must be >= 1, got {args.n}")
    if args.fine_factor < 2:
        raise ConfigError("command line", "--fine-factor", f"must be an integer >= 2, got {args.fine_factor}")
    seed = cfg.simulate_seed if args.seed is None else args.seed
    sources, sh = read_sources(args.sources, args.split)
    g = cfg.geometry
    if len(sources) == 0:
        raise InputFileError(args.sources, "the split holds no sources", field=args.split)
    if sources.shape[1:] != (g.source_npix, g.source_npix):
        raise InputFileError(args.sources, f"sources are {sources.shape[1:]}, config source grid is "
                             f"({g.source_npix}, {g.source_npix})", field=args.split)
    if abs(float(sh.get("PIXSCALE", g.source_pixscale)) / g.source_pixscale - 1) > 1e-6:
        raise InputFileError(args.sources, f"PIXSCALE {sh['PIXSCALE']} != lensing.geometry.source_pixscale "
                             f"{g.source_pixscale}", field=f"{args.split}.PIXSCALE")
    records = read_source_records(args.sources, args.split)
    if len(records) != len(sources):
        raise InputFileError(args.sources, f"KINDS lists {len(records)} {args.split} sources, the HDU holds "
                             f"{len(sources)}", field="KINDS")
    t0 = time.perf_counter()
    if cfg.noise.sigma is None:
        train, _ = read_sources(args.sources, "TRAIN")
        ref = train if len(train) else sources
        cfg.noise.sigma = typical_noise_sigma(ref, g, cfg.lens, cfg.noise.target_peak_snr)
        log.info("noise sigma %.4g %s from the TRAIN population (target peak SNR %.1f)", cfg.noise.sigma,
                 cfg.noise.bunit, cfg.noise.target_peak_snr)
    extra = {"SPLIT": (args.split, "source split"), "SRCFILE": (str(args.sources)[-48:], "sources"),
             "CFGHASH": (config_hash(cfg), "lensing config hash")}
    entries = simulate_heldout_set(sources, records, args.n, args.out, cfg, seed, factor=args.fine_factor,
                                   extra=extra, source_bunit=str(sh.get("BUNIT", cfg.sources.bunit)),
                                   sources_path=args.sources)
    summary = {"out": str(args.out), "n": len(entries), "noise_sigma": cfg.noise.sigma,
               "fine_factor": args.fine_factor, "peak_snr": peak_snr_stats(entries),
               "per_kind": heldout_kind_summary(entries), "seconds": round(time.perf_counter() - t0, 2)}
    log.debug("simulate: %s", json.dumps(summary))
    print(json.dumps(summary))
    return 0
