# Lensed-source reconstruction with diffusion priors and RTB posteriors: the DAG.
#
#   snakemake --cores 2                      # default target: the whole lensing DAG to the report
#   snakemake --cores 2 vision               # secondary target: vision benchmarks
#   snakemake --cores 2 user --config observations='data/my/*.fits'
#   snakemake --workflow-profile profiles/slurm          # on a SLURM cluster with GPUs (docs/cluster.md)
#   snakemake --report results/report.zip    # the Snakemake report: calibration tables and figures
#
# Every rule is a thin call of `python -m pipeline <command>`; all logic lives in the package.
import os
import sys

from snakemake.utils import min_version, validate

min_version("9.0")


configfile: os.path.join(workflow.basedir, "config", "config.yaml")


sys.path.insert(0, workflow.basedir)
from pipeline.errors import PipelineError
from pipeline.settings import check_workflow_config

# the package checks the whole tree first (one line naming the file and the field), then the schema
# generated from it; the config files in the order Snakemake merges them, then --config
_cli_files = [str(p) for p in workflow.config_settings.configfiles]
try:
    check_workflow_config(
        config,
        [f for f in map(str, workflow.configfiles) if f not in _cli_files] + _cli_files,
        dict(workflow.config_settings.config),
    )
except PipelineError as exc:
    sys.exit(f"error: {exc}")
validate(config, os.path.join(workflow.basedir, "workflow/schemas/config.schema.yaml"), set_default=False)


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"


# every job in this image with `--sdm apptainer` (config `execution.container`)
if EXECUTION.get("container"):

    container: EXECUTION["container"]


include: "workflow/rules/config.smk"
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
