"""``python -m pipeline sources --config FILE --out SOURCES.fits``: the source-galaxy cube.

GalSim parametric galaxies, Hubble deep field stamps and/or the user's cube (section ``lensing.sources``)
on the source grid (``lensing.geometry``), split into TRAIN / VALID / TEST by seed, in physical
surface-brightness units. Written atomically with provenance headers.
"""

from __future__ import annotations

import json
import logging
import time

from pipeline.commands import int_at_least
from pipeline.config import config_hash
from pipeline.errors import ConfigError

log = logging.getLogger(__name__)


def add_arguments(parser):
    parser.add_argument("--config", required=True, help="pipeline YAML config (section lensing:)")
    parser.add_argument("--out", required=True, help="output FITS file")
    parser.add_argument("--seed", type=int, default=None, help="override lensing.sources.seed")
    parser.add_argument("--workers", type=int_at_least(1), default=1,
                        help="processes rendering the GalSim galaxies (same output for any number; default 1)")


def run(args) -> int:
    from pipeline.lensing.config import load_lensing_config
    from pipeline.lensing.sources import build_sources, write_sources
    from pipeline.runtime import configure_threads

    configure_threads()
    cfg = load_lensing_config(args.config)
    if args.seed is not None:
        cfg.sources.seed = args.seed
    g = cfg.geometry
    t0 = time.perf_counter()
    result = build_sources(cfg.sources, g.source_npix, g.source_pixscale, workers=args.workers)
    n_total = sum(len(a) for a in result["splits"].values())
    if n_total == 0:
        raise ConfigError(args.config, "lensing.sources", "no sources configured (n_galsim, n_hst, user_cube)")
    h = config_hash({"sources": cfg.sources, "npix": g.source_npix, "pixscale": g.source_pixscale})
    write_sources(args.out, result, cfg.sources, g.source_npix, g.source_pixscale, h)
    summary = {"out": str(args.out), "counts": result["counts"],
               "n": {k: len(v) for k, v in result["splits"].items()},
               "seconds": {**{k: round(v, 2) for k, v in result["seconds"].items()},
                           "total": round(time.perf_counter() - t0, 2)}}
    log.debug("sources: %s", json.dumps(summary))
    print(json.dumps(summary))
    return 0
