"""``python -m pipeline sample``: posterior samples for observations with one method -> posterior FITS.

One job handles many observations, so imports, model loading and guidance-scale tuning are paid once.
Methods: rtb_amortized (the fine-tuned posterior), rtb_amortized_is (the same, each sample importance-resampled
from ``posterior.particles`` of its trajectories), rtb_amortized_gn (the same with the Gauss-Newton twisted last
step, :mod:`pipeline.rtb.twisted_step`: a GPU method), dps, dps_cla, cla, prior_is, fps, fps_smc.
"""

from __future__ import annotations

import json

from pipeline.errors import ConfigError


def add_arguments(parser) -> None:
    parser.add_argument("--config", required=True, metavar="FILE", help="pipeline YAML config")
    parser.add_argument("--method", required=True, help="sampling method (rtb_amortized, rtb_amortized_is, rtb_amortized_gn, "
                        "dps, dps_cla, cla, prior_is, fps, fps_smc)")
    parser.add_argument("--prior", required=True, metavar="DIR", help="trained prior")
    parser.add_argument("--posterior", metavar="DIR", help="fine-tuned RTB posterior (for the rtb_amortized methods)")
    parser.add_argument("--obs", required=True, nargs="+", metavar="FILE_OR_DIR", help="observation FITS files or directories")
    out = parser.add_mutually_exclusive_group(required=True)
    out.add_argument("--out", metavar="DIR", help="directory: one posterior FITS per observation (same file name)")
    out.add_argument("--out-file", metavar="FILE", help="single observation: the posterior FITS path")
    parser.add_argument("--png", metavar="FILE", help="with --out-file: a figure of the posterior")
    parser.add_argument("--n", type=int, help="samples per observation (default posterior.n_samples)")
    parser.add_argument("--seed", type=int, help="default posterior.seed")
    parser.add_argument("--tuning", metavar="JSON", help="frozen guidance-scale record written by `tune` (dps, dps_cla); "
                        "default: tune here on posterior.tune_seed")


def run(args) -> int:
    from pipeline.io.atomic import atomic_directory
    from pipeline.lensing.sample import sample_observations
    from pipeline.lensing.tuning import read_tuning_record
    from pipeline.runtime import configure_threads

    configure_threads()
    if args.n is not None and args.n < 2:
        raise ConfigError("--n", "n", f"must be >= 2, got {args.n}")
    tuning = read_tuning_record(args.tuning, args.method) if args.tuning else None
    if args.out_file:
        res = sample_observations(args.config, args.method, args.prior, args.posterior, args.obs,
                                  out_file=args.out_file, png=args.png, n=args.n, seed=args.seed,
                                  tuning=tuning)
    else:
        # written into a temp dir renamed at the end: no partial output directory on failure
        with atomic_directory(args.out) as tmp:
            res = sample_observations(args.config, args.method, args.prior, args.posterior, args.obs, tmp,
                                      n=args.n, seed=args.seed, tuning=tuning)
    print(json.dumps({"method": args.method, "n_obs": len(res),
                      "seconds": round(sum(r["seconds"] for r in res), 2)}))
    return 0
