# Lensed-source reconstruction with diffusion priors and RTB posteriors: the DAG.
#
#   snakemake --cores 2                      # default target: the whole lensing DAG to the report
#   snakemake --cores 2 vision               # secondary target: vision benchmarks
#   snakemake --cores 2 user --config observations='data/my/*.fits'
#   snakemake --workflow-profile profiles/slurm          # on a SLURM cluster with GPUs
#
# Every rule is a thin call of `python -m pipeline <command>`; all logic lives in the package.
import os

from snakemake.utils import min_version, validate

min_version("9.0")

configfile: os.path.join(workflow.basedir, "config", "config.yaml")


validate(config, "workflow/schemas/config.schema.yaml")


include: "workflow/rules/common.smk"
include: "workflow/rules/prior.smk"
include: "workflow/rules/simulate.smk"
include: "workflow/rules/posterior.smk"
include: "workflow/rules/calibration.smk"
include: "workflow/rules/vision.smk"
include: "workflow/rules/user.smk"


rule all:
    default_target: True
    input:
        "results/report.md",
