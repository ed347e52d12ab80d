"""``python -m pipeline finetune-posterior``: amortized RTB fine-tuning of the prior against lensing.

Trains over the prior predictive (truths from the prior chain, lenses from the configured ranges,
fixed noise): one network serves every observation. Runs on CUDA when available, else CPU; under
``torchrun`` it trains data-parallel. Rolling checkpoints in ``--run-dir`` (resumed on rerun); the
final posterior is exported to ``--out``.
"""

from __future__ import annotations

import json
import logging

from pipeline.errors import PipelineError

log = logging.getLogger(__name__)


def add_arguments(parser) -> None:
    parser.add_argument("--config", required=True, metavar="FILE", help="pipeline YAML config (rtb:, posterior:, lensing:)")
    parser.add_argument("--prior", required=True, metavar="DIR", help="trained prior (train-prior output)")
    parser.add_argument("--sources", metavar="SOURCES.fits",
                        help="source cube, used only to derive the fixed noise level when lensing.noise.sigma is null")
    parser.add_argument("--run-dir", metavar="DIR", help="rolling checkpoints + metrics.jsonl (resumed); required to train")
    parser.add_argument("--out", metavar="DIR", help="exported final posterior; required to train")
    parser.add_argument("--steps", type=int, help="override rtb.run.steps")
    parser.add_argument("--init-from", metavar="DIR",
                        help="start an empty --run-dir from this shipped trainer checkpoint (same rtb: recipe)")
    parser.add_argument("--warm-start", metavar="DIR",
                        help="start a NEW run (step 0, fresh optimizer) from this posterior's network weights; "
                             "for a changed rtb: recipe that keeps the network")
    parser.add_argument("--tune-guidance", action="store_true",
                        help="only print the untrained-ELBO tuning record for rtb.policy.guidance_scale (no training)")


def run(args) -> int:
    from pipeline import distributed
    from pipeline.config import read_device
    from pipeline.diffusion.network_prior import load_prior
    from pipeline.lensing.finetune import finetune, tune_rtb_guidance
    from pipeline.runtime import choose_device, configure_threads

    if not args.tune_guidance and (args.run_dir is None or args.out is None):
        raise PipelineError("finetune-posterior needs --run-dir and --out (unless --tune-guidance)")
    configure_threads()
    device = choose_device(read_device(args.config))
    distributed.init_from_env(device)
    device = distributed.local_device(device)
    prior = load_prior(args.prior, device=device)
    if args.tune_guidance:
        print(json.dumps(tune_rtb_guidance(args.config, prior, sources_path=args.sources)))
        return 0
    try:
        summary = finetune(args.config, prior, args.run_dir, args.out, sources_path=args.sources, steps=args.steps,
                           init_from=args.init_from, warm_start=args.warm_start)
    finally:
        distributed.cleanup()
    print(json.dumps(summary, default=str))
    return 0
