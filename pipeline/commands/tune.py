"""``python -m pipeline tune``: freeze a sampler's guidance scale (DPS, DPS+CLA) once, for ``sample --tuning``.

The scale is tuned on prior-predictive observations drawn from ``posterior.tune_seed`` (apart from every
evaluated set) at the noise level of the given observation, exactly as ``sample`` would tune it; writing it
once lets every set sampled at that noise level share one frozen scale and skips repeating the search.
"""

from __future__ import annotations

import json

from pipeline.io.atomic import write_json
from pipeline.lensing.sample import observation_files
from pipeline.lensing.tuning import tune_for_observations
from pipeline.runtime import configure_threads


def add_arguments(parser) -> None:
    parser.add_argument("--config", required=True, metavar="FILE", help="pipeline YAML config (sections lensing:, posterior:)")
    parser.add_argument("--method", required=True, help="a method with a tuned guidance scale (dps, dps_cla)")
    parser.add_argument("--prior", required=True, metavar="DIR", help="trained prior")
    parser.add_argument("--obs", required=True, nargs="+", metavar="FILE_OR_DIR",
                        help="observation FITS files or directories; the first one sets the noise level")
    parser.add_argument("--out", required=True, metavar="JSON", help="tuning record (written atomically)")


def run(args) -> int:
    configure_threads()
    record = tune_for_observations(args.config, args.method, args.prior, observation_files(args.obs)[0])
    write_json(args.out, record)
    print(json.dumps({"method": args.method, "scale": record["scale"], "out": args.out}))
    return 0
