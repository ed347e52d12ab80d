# Shared helpers, constants and wildcard constraints (included first by the Snakefile).
import glob as _glob
import os
import sys

import yaml

from pipeline.io.atomic import write_text
from pipeline.samplers.registry import METHODS, TUNED_METHODS  # TUNED: a scale frozen by `tune`

BASEDIR = workflow.basedir
DATA_DIR = os.path.join(BASEDIR, "data")
# The interpreter running snakemake runs the package too (the venv locally, the env on clusters);
# with `--sdm conda` each job runs in the environment.yml env, whose `python` is on PATH.
_deploy = getattr(getattr(workflow, "deployment_settings", None), "deployment_method", ()) or ()
PY = "python" if any("CONDA" in str(m).upper() for m in _deploy) else sys.executable

SETS = ["prior", "heldout"]
LENS_METHODS = list(config["methods"])


def tuning_input(wildcards):
    """The `tune` rule's record for a method with a tuned scale; nothing for the others."""
    return f"results/tuning/{wildcards.method}.json" if wildcards.method in TUNED_METHODS else []


# scheduling order of the sample jobs (higher first): relative CPU cost per sample, measured on the demo
# (FPS-SMC with 2 particles per run > DPS, DPS+CLA (a network VJP per step) > amortized RTB)
SAMPLE_PRIORITY = {"fps_smc": 3, "prior_is": 3, "rtb_amortized_is": 3, "dps": 2, "dps_cla": 2}
VISION_DATASETS = list(config.get("vision", {}).get("datasets", ["mnist"]))


wildcard_constraints:
    set="|".join(SETS),
    method="|".join(METHODS),
    obs=r"[A-Za-z0-9_.\-]+",


# Config families: the sections each family of rules reads, written to results/config/NAME.yaml by the
# `config_section` rule. A family's file changes (and its rules rerun) only when one of its sections
# changes: tuning rtb: does not retrain the prior. Nothing is written at parse time, so `snakemake -n`
# changes no file.
CONFIG_FAMILIES = {
    "lensing": ["lensing"],
    "prior": ["prior", "prior_checkpoint"],
    "prior_set": ["lensing", "chain"],
    "posterior": ["lensing", "chain", "rtb", "posterior", "posterior_checkpoint"],
    "sample": ["lensing", "chain", "posterior"],
    "all": list(config),
}


def family_text(name):
    """The YAML text of config family NAME (its sections and the top-level device)."""
    keep = {k: v for k, v in config.items() if k in CONFIG_FAMILIES[name] or k == "device"}
    return yaml.safe_dump(keep, sort_keys=True)


CFG_LENSING, CFG_PRIOR, CFG_PRIOR_SET, CFG_POSTERIOR, CFG_SAMPLE, CFG_ALL = (
    f"results/config/{name}.yaml" for name in CONFIG_FAMILIES
)


def train_prior_command(wildcards, input, output):
    """train-prior, or install-prior when the config names a shipped checkpoint."""
    run_dir = os.path.dirname(output[0])
    shipped = config.get("prior_checkpoint")
    if shipped:
        path = shipped if os.path.isabs(shipped) else os.path.join(BASEDIR, shipped)
        return f"install-prior --checkpoint {path} --config {input.cfg} --out {run_dir}"
    return f"train-prior --config {input.cfg} --data {input.data} --out {run_dir}"


def finetune_init_arg(wildcards):
    """--init-from the shipped posterior trainer checkpoint, when the config names one."""
    shipped = config.get("posterior_checkpoint")
    if not shipped:
        return ""
    path = shipped if os.path.isabs(shipped) else os.path.join(BASEDIR, shipped)
    return f"--init-from {path}"


def posterior_dirs(wildcards):
    return expand("results/posteriors/{set}/{method}", set=wildcards.set, method=LENS_METHODS)


def parent_dir(wildcards, output):
    """The directory holding a rule's first output (rolling checkpoints live there)."""
    return os.path.dirname(output[0])


def output_dir(wildcards, output):
    return os.path.dirname(output[0])


# -- the `user` target ----------------------------------------------------------------------


def user_observations():
    pattern = config.get("observations")
    if not pattern:
        return {}
    if not os.path.isabs(pattern) and not _glob.glob(pattern):
        pattern = os.path.join(BASEDIR, pattern)
    files = sorted(_glob.glob(pattern))
    return {os.path.splitext(os.path.basename(f))[0]: os.path.abspath(f) for f in files}


USER_OBS = user_observations()


def user_obs_file(wildcards):
    return USER_OBS[wildcards.obs]


