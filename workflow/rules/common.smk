# Shared helpers, constants and wildcard constraints (included first by the Snakefile).
import os
import sys

import yaml

BASEDIR = workflow.basedir
DATA_DIR = os.path.join(BASEDIR, "data")
# The interpreter running snakemake runs the package too (the venv locally, the conda env on clusters).
PY = sys.executable

SETS = ["prior", "heldout"]
LENS_METHODS = list(config["methods"])
VISION_DATASETS = list(config.get("vision", {}).get("datasets", ["mnist"]))


wildcard_constraints:
    set="|".join(SETS),
    method="|".join(
        [
            "rtb",
            "rtb_amortized",
            "rtb_dps",
            "rtb_dps_cla",
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


def resolved_config_path():
    """Write the merged, validated config (config file + --config overrides) to results/ once.

    Commands read their section from this file. It is rewritten only when its content changes,
    so an unchanged config never triggers reruns, and a changed one reruns the rules that read it.
    """
    path = os.path.join("results", "config.yaml")
    text = yaml.safe_dump(dict(config), sort_keys=True)
    old = open(path).read() if os.path.exists(path) else None
    if old != text:
        os.makedirs("results", exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    return path


CONFIG = resolved_config_path()


def posterior_dirs(wildcards):
    return expand("results/posteriors/{set}/{method}", set=wildcards.set, method=LENS_METHODS)
