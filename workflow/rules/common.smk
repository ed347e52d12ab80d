# Shared helpers, constants and wildcard constraints (included first by the Snakefile).
import glob as _glob
import os
import shlex
import shutil
import sys

import yaml

from pipeline.io.atomic import write_text
from pipeline.samplers.registry import CPU_METHODS, METHODS, RTB_METHODS, TUNED_METHODS  # TUNED: frozen by `tune`

BASEDIR = workflow.basedir
DATA_DIR = os.path.join(BASEDIR, "data")
# The interpreter running snakemake runs the package too (the venv locally, the env on clusters). With
# `--sdm conda` or `--sdm apptainer` each job runs in its environment, whose `python` is on PATH: that
# environment holds the dependencies only (environment.yml). Every job imports the package from this source
# tree (PYTHONPATH), as the Snakefile does, whatever the working directory (`--directory`) and whatever
# copy is installed. Rules call it through the derived param `pipeline_call` (below), never a plain param:
# plain params are rerun triggers, and a moved project (another absolute path) must not rerun anything.
_deploy = getattr(getattr(workflow, "deployment_settings", None), "deployment_method", ()) or ()
IN_JOB_ENV = any(m in str(d).upper() for d in _deploy for m in ("CONDA", "APPTAINER"))
PY = f"PYTHONPATH={shlex.quote(BASEDIR)}${{PYTHONPATH:+:$PYTHONPATH}} " + ("python" if IN_JOB_ENV else sys.executable)

# -- how jobs run on a cluster (config `execution:`) ------------------------------------------
EXECUTION = config.get("execution") or {}
GPU_REQUEST = EXECUTION.get("gpu_request", "gpu")
GPU_MODEL = EXECUTION.get("gpu_model")
GPU_PARTITION = EXECUTION.get("gpu_partition")
SAMPLE_SHARDS = int(EXECUTION.get("sample_shards", 1))


def gpu_resources(wanted=True):
    """The resources of a job that runs best on a GPU: exactly one GPU request, in the form the SLURM
    executor plugin turns into `--gpus=[MODEL:]1` (`gpu`, `gpu_model`) or `--gres=gpu[:MODEL]:1` (`gres`), as
    `execution.gpu_request` says; none when not `wanted` or for `gpu_request: none`. Locally `gpu` is only a
    counter, unlimited unless you pass `--resources gpu=1`. With `execution.gpu_partition` the job also goes
    to that SLURM partition."""
    if not wanted or GPU_REQUEST == "none":
        return {}
    partition = {"slurm_partition": GPU_PARTITION} if GPU_PARTITION else {}
    if GPU_REQUEST == "gres":
        return {"gres": f"gpu:{GPU_MODEL}:1" if GPU_MODEL else "gpu:1", **partition}
    return {"gpu": 1, **({"gpu_model": GPU_MODEL} if GPU_MODEL else {}), **partition}


def method_gpu_resources():
    """`gpu_resources()` for a job with a `method` wildcard: each value a function of the wildcards, empty
    (0 or "", which the SLURM plugin and `asks_for_gpu` read as no request and the default partition) for
    the methods with no network to run (`CPU_METHODS`, e.g. the inversion)."""
    wanted = gpu_resources()

    def per_method(value):
        return lambda wildcards: ("" if isinstance(value, str) else 0) if wildcards.method in CPU_METHODS else value

    return {key: per_method(value) for key, value in wanted.items()}


def all_cores(default=8):
    """`--cores`, or `default` when a cluster run gives none (the threads of the sources job)."""
    return workflow.resource_settings.cores or default


def asks_for_gpu(resources):
    """Whether a job's resources ask the scheduler for a GPU (as `gpu_resources` or a profile sets them)."""
    return int(resources.get("gpu", 0) or 0) > 0 or "gpu" in str(resources.get("gres", "") or "")


def pipeline_call(wildcards, threads, resources):
    """`python -m pipeline` with the options of every job: its threads (torch threads unless
    $SLURM_CPUS_PER_TASK says otherwise) and `--gpu-job` when it asked for a GPU, for the device line and
    GPU check at its start. A param computed from threads and resources is no rerun trigger: results made
    locally are up to date on SLURM, and the interpreter's absolute path may change with the project's."""
    return f"{PY} -m pipeline --threads {threads}" + (" --gpu-job" if asks_for_gpu(resources) else "")


SETS = ["prior", "heldout"]
LENS_METHODS = list(config["methods"])
# `baselines:` by name: other priors and posteriors sampled beside the methods (none by default)
BASELINES = {b["name"]: b for b in config.get("baselines") or []}


def tuning_input(wildcards):
    """The `tune` rule's record for a method with a tuned scale; nothing for the others."""
    return f"results/tuning/{wildcards.method}.json" if wildcards.method in TUNED_METHODS else []


# scheduling order of the sample jobs (higher first): relative CPU cost per sample, measured on the demo
# (FPS-SMC with 2 particles per run > DPS, DPS+CLA (a network VJP per step) > amortized RTB)
SAMPLE_PRIORITY = {"fps_smc": 3, "prior_is": 3, "rtb_amortized_is": 3, "rtb_amortized_smc": 3, "dps": 2, "dps_cla": 2}
VISION_DATASETS = list(config.get("vision", {}).get("datasets", ["mnist"]))


wildcard_constraints:
    set="|".join(SETS),
    method="|".join(METHODS),
    baseline="|".join(BASELINES) or "(?!)",  # names are letters, digits and _ (checked): no escaping needed
    obs=r"[A-Za-z0-9_.\-]+",
    shard=r"\d+",


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


def repo_path(path):
    """A path the config gives relative to the repository, as a path relative to the working directory where
    it lies below it: moving the whole project changes no job's params."""
    path = path if os.path.isabs(path) else os.path.join(BASEDIR, path)
    return os.path.relpath(path) if os.path.abspath(path).startswith(os.getcwd() + os.sep) else path


def shipped_path(key):
    """The shipped checkpoint the config names under `key` (relative to the repository), or None."""
    shipped = config.get(key)
    return repo_path(shipped) if shipped else None


def train_prior_command(wildcards, input, output):
    """train-prior, or install-prior when the config names a shipped checkpoint."""
    run_dir = os.path.dirname(output[0])
    if config.get("prior_checkpoint"):
        return f"install-prior --checkpoint {shipped_path('prior_checkpoint')} --config {input.cfg} --out {run_dir}"
    return f"train-prior --config {input.cfg} --data {input.data} --out {run_dir}"


def finetune_init_arg(wildcards):
    """--init-from the shipped posterior trainer checkpoint, when the config names one."""
    return f"--init-from {shipped_path('posterior_checkpoint')}" if config.get("posterior_checkpoint") else ""


def rtb_posterior(wildcards):
    """The fine-tuned RTB posterior for the methods that sample it; nothing for the others (so fine-tuning
    again reruns only their sample jobs)."""
    return "results/posterior/run/final" if wildcards.method in RTB_METHODS else []


def posterior_arg(wildcards, input):
    return f"--posterior {input.posterior}" if input.posterior else ""


def posterior_dirs(wildcards):
    """Every method's posterior directory of the set, then those of the baselines sampled on it."""
    baselines = [name for name, b in BASELINES.items() if wildcards.set in b.get("sets", SETS)]
    return expand("results/posteriors/{set}/{method}", set=wildcards.set, method=LENS_METHODS + baselines)


def baseline_path(key):
    """Input function: the `baselines:` item's `key` path (config, prior or posterior) for the wildcard."""
    return lambda wildcards: repo_path(BASELINES[wildcards.baseline][key])


def parent_dir(wildcards, output):
    """The directory holding a rule's first output (rolling checkpoints live there)."""
    return os.path.dirname(output[0])


def output_dir(wildcards, output):
    return os.path.dirname(output[0])


def merge_directories(sources, target, log_file):
    """The files of the `sources` directories (not the hidden ones, such as Snakemake's timestamps),
    together in the directory `target` (written whole or not at all); a file name found twice is an error."""
    from pipeline.io.atomic import atomic_directory

    files = {src: sorted(n for n in os.listdir(src) if not n.startswith(".")) for src in sources}
    names = [n for src in sources for n in files[src]]
    if len(set(names)) != len(names):
        raise ValueError(f"{target}: the same file name in two of {list(sources)}")
    with atomic_directory(target) as tmp:
        for src in sources:
            for name in files[src]:
                shutil.copy2(os.path.join(src, name), os.path.join(tmp, name))
    write_text(log_file, f"merged {len(names)} files of {len(sources)} shards into {target}\n")


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
