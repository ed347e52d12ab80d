# Shared helpers, constants and wildcard constraints (included first by the Snakefile).
import glob as _glob
import os
import sys

import yaml

BASEDIR = workflow.basedir
DATA_DIR = os.path.join(BASEDIR, "data")
# The interpreter running snakemake runs the package too (the venv locally, the env on clusters);
# with `--sdm conda` each job runs in the environment.yml env, whose `python` is on PATH.
_deploy = getattr(getattr(workflow, "deployment_settings", None), "deployment_method", ()) or ()
PY = "python" if any("CONDA" in str(m).upper() for m in _deploy) else sys.executable

SETS = ["prior", "heldout"]
LENS_METHODS = list(config["methods"])
# scheduling order of the sample jobs (higher first): relative CPU cost per sample, measured on the demo
# (FPS-SMC with 2 particles per run > DPS, DPS+CLA (a network VJP per step) > amortized RTB)
TUNED_METHODS = ["dps", "dps_cla"]  # methods with a guidance scale frozen by the `tune` rule


def tuning_input(wildcards):
    """The `tune` rule's record for a method with a tuned scale; nothing for the others."""
    return f"results/tuning/{wildcards.method}.json" if wildcards.method in TUNED_METHODS else []


SAMPLE_PRIORITY = {"fps_smc": 3, "prior_is": 3, "rtb_amortized_is": 3, "dps": 2, "dps_cla": 2}
VISION_DATASETS = list(config.get("vision", {}).get("datasets", ["mnist"]))


wildcard_constraints:
    set="|".join(SETS),
    method="|".join(
        [
            "rtb",
            "rtb_amortized",
            "rtb_dps",
            "rtb_dps_cla",
            "rtb_amortized_is",
            "rtb_amortized_gn",
            "dps",
            "dps_cla",
            "cla",
            "exact_guidance",
            "prior_is",
            "fps",
            "fps_smc",
        ]
    ),
    obs=r"[A-Za-z0-9_.\-]+",


def section_config(name, sections):
    """Write the merged, validated config sections a rule family reads to results/config/NAME.yaml.

    Commands read their sections from this file. It is rewritten only when its content changes, so
    an unchanged config never triggers reruns, and a change reruns only the rules that read the
    changed sections (tuning rtb: does not retrain the prior).
    """
    path = os.path.join("results", "config", f"{name}.yaml")
    keep = {k: v for k, v in config.items() if k in sections or k == "device"}
    text = yaml.safe_dump(keep, sort_keys=True)
    old = open(path).read() if os.path.exists(path) else None
    if old != text:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp"
        with open(tmp, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    return path


CFG_LENSING = section_config("lensing", ["lensing", "chain"])
CFG_PRIOR = section_config("prior", ["prior", "prior_checkpoint"])
CFG_POSTERIOR = section_config("posterior", ["lensing", "chain", "rtb", "posterior", "posterior_checkpoint"])
CFG_SAMPLE = section_config("sample", ["lensing", "chain", "posterior"])
CFG_ALL = section_config("all", list(config))


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


