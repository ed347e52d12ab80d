"""``python -m pipeline train-prior``: train (or resume) the diffusion prior from a config section."""

from __future__ import annotations

import json
import logging

from pipeline.config import load_section, read_device
from pipeline.errors import ConfigError

log = logging.getLogger(__name__)


def add_arguments(parser) -> None:
    parser.description = (
        "Train an eps-prediction U-Net diffusion prior on the images of a FITS file. RUN_DIR receives "
        "versioned checkpoints (step-N/ + LATEST), metrics.jsonl, and when finished final/ (EMA weights, "
        "loadable without the config) and a 'done' marker. Re-running on an existing RUN_DIR resumes it "
        "exactly; a larger --steps extends it.")
    parser.add_argument("--config", required=True, metavar="FILE", help="pipeline YAML config (section 'prior:')")
    parser.add_argument("--section", default="prior", help="config section to read (default: prior)")
    parser.add_argument("--data", metavar="SOURCES.fits",
                        help="training FITS; image HDU prior.data_hdu (default TRAIN) holding (N,H,W) or "
                             "(N,C,H,W) images in physical units (default: prior.data)")
    parser.add_argument("--out", metavar="RUN_DIR", help="run directory (default: prior.out)")
    parser.add_argument("--steps", type=int, metavar="N", help="override prior.steps")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], help="override the config's top-level device")


def run(args) -> int:
    from pipeline.diffusion.prior_config import PriorConfig
    from pipeline.diffusion.train import train_prior
    from pipeline.runtime import configure_threads

    configure_threads()
    cfg = load_section(args.config, args.section, PriorConfig)
    device = args.device or read_device(args.config)
    data = args.data or cfg.data
    out = args.out or cfg.out
    if not data:
        raise ConfigError(args.config, f"{args.section}.data", "no training data: give --data or set the field")
    if not out:
        raise ConfigError(args.config, f"{args.section}.out", "no run directory: give --out or set the field")
    if args.steps is not None and args.steps < 1:
        raise ConfigError("--steps", "steps", f"must be >= 1, got {args.steps}")
    res = train_prior(cfg, data, out, steps=args.steps, device=device)
    summary = {"run_dir": str(res.run_dir), "step": res.step, "target_steps": res.target_steps,
               "completed": res.completed, "final_loss": res.final_loss,
               "steps_per_second": round(res.steps_per_second, 3), "n_params": res.n_params}
    print(json.dumps(summary))
    if not res.completed:
        log.warning("stopped at step %d of %d by the wall-clock cap; run again to resume", res.step,
                    res.target_steps)
        return 3
    return 0
