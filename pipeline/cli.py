"""Command-line entry point: ``python -m pipeline <command> [options]``.

Each command lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``.
Modules are imported lazily so ``--help`` and small commands stay fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from pipeline.errors import PipelineError

# command name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train-prior": ("pipeline.commands.train_prior", "train a diffusion prior from a config"),
    "install-prior": ("pipeline.commands.install_prior",
                      "install a shipped, pipeline-trained prior checkpoint instead of training"),
    "sample-prior": ("pipeline.commands.sample_prior", "draw samples from a trained prior into FITS"),
    "check-prior": ("pipeline.commands.check_prior",
                    "do the prior chain's draws look like galaxies? statistics and a classifier test against data"),
    "sources": ("pipeline.commands.sources", "build the source-galaxy FITS cube (GalSim, HST, user)"),
    "simulate": ("pipeline.commands.simulate", "simulate lensed observations as FITS files"),
    "simulate-prior-set": ("pipeline.commands.simulate_prior_set",
                           "simulate observations whose truths are drawn from the trained prior chain"),
    "inspect": ("pipeline.commands.inspect", "validate and summarise an observation FITS file"),
    "finetune-posterior": ("pipeline.commands.finetune_posterior",
                           "fine-tune the prior into a posterior sampler with RTB"),
    "check-posterior": ("pipeline.commands.check_posterior",
                        "seeded chi2 / ELBO check of amortized lensing posteriors (compare runs)"),
    "tune": ("pipeline.commands.tune", "freeze a sampler's guidance scale (dps, dps_cla) for sample --tuning"),
    "sample": ("pipeline.commands.sample", "sample posteriors for observations with one method"),
    "calibrate": ("pipeline.commands.calibrate", "TARP, interval coverage, chi2 and log Z of posteriors"),
    "report": ("pipeline.commands.report", "write the markdown report with figures and tables"),
    "bench": ("pipeline.commands.bench", "benchmarks: gmm, rtb-memory, vision"),
    "config": ("pipeline.commands.config", "check config files; regenerate the config schema and reference page"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    # set by every workflow job (workflow/rules/common.smk): the job's setup line and GPU check
    parser.add_argument("--threads", type=int, metavar="N", help="a workflow job's Snakemake threads: torch threads "
                        "unless $PIPELINE_NUM_THREADS or $SLURM_CPUS_PER_TASK say otherwise; logs the device")
    parser.add_argument("--gpu-job", action="store_true", help="the job asked its scheduler for a GPU: "
                        "stop inside a SLURM job if torch sees none")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_module, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = build_parser()
    # Find the command name; everything after it belongs to the command's own parser.
    idx = next((i for i, a in enumerate(argv) if a in COMMANDS), None)
    if idx is None:
        top.parse_args(argv)  # handles --help / errors
        top.print_help()
        return 2
    top_args = top.parse_args(argv[:idx])
    name = argv[idx]
    logging.basicConfig(level=logging.DEBUG if top_args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import matplotlib

    matplotlib.use("Agg")  # commands write figures to files and run without a display; set before any plots
    module_name, help_text = COMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            print(f"error: command '{name}' is not available in this version", file=sys.stderr)
            return 2
        raise
    parser = argparse.ArgumentParser(prog=f"python -m pipeline {name}", description=help_text)
    module.add_arguments(parser)
    args = parser.parse_args(argv[idx + 1:])
    try:
        device = "auto"
        if getattr(args, "config", None):
            from pipeline.settings import load_config  # the whole config tree: imported only when needed

            device = load_config(args.config).device  # the whole file, before any work: one line per error
        if top_args.threads is not None or top_args.gpu_job:  # a workflow job: threads, GPU check, device line
            from pipeline.runtime import setup_job  # torch: imported only for workflow jobs

            logging.getLogger("pipeline.job").info("%s: %s", name, setup_job(top_args.threads, top_args.gpu_job,
                                                                             device))
        return int(module.run(args) or 0)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
