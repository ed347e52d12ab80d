"""A SLURM run as a cluster sees it: the `sbatch` lines the SLURM executor plugin submits for the whole DAG.

Fake `sbatch`, `sacct`, `squeue`, `sinfo`, `scontrol`, `sacctmgr` and `scancel` (every SLURM command the
plugin calls) come first on PATH. The fake `sbatch` records its arguments, creates the submitted job's
outputs empty (files, or directories for the paths a dry run of the same command lists without a file
suffix) instead of running the job, and prints a job id; the fake `sacct`/`squeue` report every recorded job
COMPLETED. So Snakemake walks the whole DAG as on a cluster, submitting each job once its inputs exist,
with the real plugin building every `sbatch` line, in a few seconds and without running anything. For the
training jobs the fake `sbatch` also dry-runs the job's own wrapped command (what the node would run): it
must run the shell command the main dry run shows.

The jobs Snakemake runs itself (localrules: the config files and the shard merge, which run for real and
are cheap, and calibrate and report) are never submitted. Calibrate and report are left out of the run
(`--omit-from calibrate`): they would read the empty outputs. That they run on the submit host, without a
GPU, is checked by the assertions on the dry run below and by test_conventions.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.samplers.registry import CPU_METHODS, TUNED_METHODS

pytestmark = [pytest.mark.workflow, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))
SLURM_PROFILE = str(ROOT / "profiles" / "slurm")
PAPER = ROOT / "config" / "paper.yaml"
DEFAULT = ROOT / "config" / "config.yaml"

# the rules whose jobs ask for a GPU (train_prior and finetune_posterior only when they train)
GPU_RULES = {"train_prior", "finetune_posterior", "simulate_prior_set", "tune", "sample", "sample_shard"}
LOCAL_RULES = {"config_section", "sample_merge", "calibrate", "report"}
FILE_SUFFIXES = {".fits", ".json", ".yaml", ".png", ".md", ".html", ".tsv"}

_RECORD = """
import fcntl, json, os, sys
def record(name, **extra):
    with open(os.path.join(os.environ["FAKE_SLURM_DIR"], "calls.jsonl"), "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        number = sum(1 for _ in f) + 1
        f.write(json.dumps({"command": name, "argv": sys.argv[1:], **extra}) + "\\n")
    return 1000 + number
def submitted():
    path = os.path.join(os.environ["FAKE_SLURM_DIR"], "calls.jsonl")
    with open(path) as f:
        calls = [json.loads(line) for line in f]
    return [1000 + i + 1 for i, c in enumerate(calls) if c["command"] == "sbatch"]
"""

FAKES = {
    # records the call, creates the job's outputs (from the dry run's table) and prints its id (--parsable);
    # for the rules named in $FAKE_SLURM_DRY_RUN it first dry-runs the job's own command (as the node would
    # run it) and records that output
    "sbatch": """
import re, subprocess
stdin = "" if sys.stdin.isatty() else sys.stdin.read()
wrap = " ".join(a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--wrap=")) + stdin
target = re.search(r"--target-jobs '([^']*)'", wrap).group(1)
rule, _, wildcards = target.partition(":")
key = rule + ":" + ",".join(sorted(w for w in wildcards.split(",") if w))
job_dry_run = ""
if rule in os.environ.get("FAKE_SLURM_DRY_RUN", "").split(","):
    res = subprocess.run(wrap + " -n -p", shell=True, capture_output=True, text=True)
    job_dry_run = f"exit {res.returncode}\\n{res.stdout}{res.stderr}"
with open(os.path.join(os.environ["FAKE_SLURM_DIR"], "outputs.json")) as f:
    outputs = json.load(f)[key]
for path, is_dir in outputs:
    if is_dir:
        os.makedirs(path, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        open(path, "a").close()
print(record("sbatch", stdin=stdin, job_dry_run=job_dry_run))
""",
    # job status queries: every submitted job COMPLETED; the account guess (sacct -nu USER): none
    "sacct": """
record("sacct")
if "--format=JobIdRaw,State" in sys.argv:
    print("\\n".join(f"{i}|COMPLETED" for i in submitted()))
""",
    "squeue": """
record("squeue")
print("\\n".join(f"{i}|COMPLETED" for i in submitted()))
""",
    "sinfo": 'record("sinfo")\nprint("PARTITION\\ncpu*\\ngpu")\n',
    "scontrol": 'record("scontrol")\nprint("MinJobAge = 300\\nMaxArraySize = 1001")\n',
    # account validation: the site profile's account exists
    "sacctmgr": 'record("sacctmgr")\nprint("site_account")\n',
    "scancel": 'record("scancel")\n',
}


def _write_fakes(bin_dir: Path) -> None:
    bin_dir.mkdir()
    for name, body in FAKES.items():
        path = bin_dir / name
        path.write_text(f"#!{sys.executable}\n{_RECORD}\n{body}")
        path.chmod(0o755)


def _key(rule: str, wildcards: str) -> str:
    """A job's key: the rule and its sorted `name=value` wildcards (as sbatch's --target-jobs names them)."""
    return rule + ":" + ",".join(sorted(w.strip() for w in wildcards.split(",") if w.strip()))


def _dry_run_jobs(text: str) -> list[dict]:
    """The jobs of a `snakemake -n -p` output: rule, key, outputs (benchmark file included), resources and
    shell command."""
    jobs = []
    for block in re.split(r"\n(?=\[[^\n]*\]\n(?:local)?rule )", text):
        m = re.search(r"^(?:local)?rule (\w+):", block, re.M)
        if not m:
            continue
        field = {k: (re.search(rf"^\s+{k}: (.*)$", block, re.M) or [None, ""])[1]
                 for k in ("output", "benchmark", "wildcards", "resources")}
        shell = re.search(r"^Shell command: (.*)$", block, re.M)
        jobs.append({"rule": m.group(1), "key": _key(m.group(1), field["wildcards"].replace(" ", "")),
                     "outputs": [p for p in field["output"].split(", ") + [field["benchmark"]] if p],
                     "resources": dict(kv.split("=", 1) for kv in field["resources"].split(", ") if "=" in kv),
                     "shell": shell.group(1) if shell else ""})
    return jobs


def _snakemake(workdir: Path, args: list[str], configfiles: list[Path], env: dict, timeout: int):
    cmd = [SNAKEMAKE, "--snakefile", str(ROOT / "Snakefile"), "--directory", str(workdir), *args,
           "--configfile", *map(str, configfiles)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    out = res.stdout + res.stderr
    assert res.returncode == 0, f"snakemake {' '.join(args)} failed:\n{out[-4000:]}"
    return out


def submit_through_fake_slurm(tmp_path: Path, profile_args: list[str], configfiles: list[Path],
                              job_dry_runs: tuple[str, ...] = ()):
    """Run the DAG (all but calibrate and report) through the fake SLURM commands: the dry run's jobs, the
    recorded sbatch calls (rule, wildcards key, argv, and for the rules in `job_dry_runs` the output of the
    job's own command dry-run) and the run's output."""
    bin_dir, workdir = tmp_path / "bin", tmp_path / "work"
    _write_fakes(bin_dir)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", FAKE_SLURM_DIR=str(tmp_path),
               FAKE_SLURM_DRY_RUN=",".join(job_dry_runs))
    env.pop("SLURM_JOB_ID", None)
    env.pop("SNAKEMAKE_PROFILE", None)
    dry = _dry_run_jobs(_snakemake(workdir, [*profile_args, "-n", "-p"], configfiles, env, 120))
    table = {j["key"]: [(p, Path(p).suffix not in FILE_SUFFIXES) for p in j["outputs"]] for j in dry}
    (tmp_path / "outputs.json").write_text(json.dumps(table))
    # status checks every second, and a failure reported without a minute's wait for its outputs
    fast = ["--slurm-init-seconds-before-status-checks", "1", "--seconds-between-status-checks", "1",
            "--latency-wait", "3"]
    out = _snakemake(workdir, [*profile_args, *fast, "--omit-from", "calibrate"], configfiles, env, 300)
    calls = [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]
    submissions = []
    for call in (c for c in calls if c["command"] == "sbatch"):
        wrap = " ".join(a for a in call["argv"] if a.startswith("--wrap="))
        rule, _, wildcards = re.search(r"--target-jobs '([^']*)'", wrap).group(1).partition(":")
        submissions.append({"rule": rule, "key": _key(rule, wildcards), "argv": call["argv"],
                            "job_dry_run": call["job_dry_run"]})
    return dry, submissions, out


def _gpu_args(argv: list[str]) -> list[str]:
    return [a for a in argv if re.match(r"--(gpus|gres)\b", a) or a in ("-G", "--gpus-per-task")]


def _option(argv: list[str], name: str) -> str | None:
    for i, a in enumerate(argv):
        if a == name:
            return argv[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


@pytest.mark.parametrize("profile_args, execution, gpu_arg, account", [
    # the slurm profile as the workflow profile; the rules' default request form
    (["--workflow-profile", SLURM_PROFILE], None, "--gpus=1", None),
    # the slurm profile given as a site profile (profiles/default is loaded beside it and overrides nothing)
    (["--profile", SLURM_PROFILE], "{gpu_request: gres}", "--gres=gpu:1", None),
    # a site profile with the account, and the slurm workflow profile over it
    (["--profile", "SITE", "--workflow-profile", SLURM_PROFILE], "{gpu_request: gres, gpu_model: a100}",
     "--gres=gpu:a100:1", "site_account"),
])
def test_the_paper_run_submits_one_gpu_request_per_gpu_job(tmp_path, profile_args, execution, gpu_arg, account):
    configfiles = [PAPER]
    if execution:
        (tmp_path / "execution.yaml").write_text(f"execution: {execution}\n")
        configfiles.append(tmp_path / "execution.yaml")
    if "SITE" in profile_args:
        site = tmp_path / "site"
        site.mkdir()
        (site / "config.yaml").write_text("executor: slurm\njobs: 10\ndefault-resources:\n"
                                          f"  slurm_account: {account}\n  slurm_partition: site_cpu\n")
        profile_args = [str(site) if a == "SITE" else a for a in profile_args]
    training = ("train_prior", "finetune_posterior")
    dry, submissions, out = submit_through_fake_slurm(tmp_path, profile_args, configfiles, training)

    remote = [j for j in dry if j["rule"] not in LOCAL_RULES | {"all"}]
    omitted = {"calibrate", "report", "all"}
    # every job but the local ones was submitted, once; no local job was
    assert sorted(s["key"] for s in submissions) == sorted(j["key"] for j in remote)
    assert not LOCAL_RULES & {s["rule"] for s in submissions}
    assert {j["rule"] for j in dry} == GPU_RULES - {"sample"} | {"sources", "simulate"} | LOCAL_RULES | {"all"}
    paper = yaml.safe_load(PAPER.read_text())  # methods x sets x shards
    n_shards = len(paper["methods"]) * 2 * paper["execution"]["sample_shards"]
    assert len([s for s in submissions if s["rule"] == "sample_shard"]) == n_shards > 0
    for rule in LOCAL_RULES - omitted:
        assert f"localrule {rule}:" in out, rule
    for job in (j for j in dry if j["rule"] in omitted):  # neither submitted nor asking for a GPU
        assert not {"gpu", "gres", "gpu_model"} & set(job["resources"]), job["rule"]

    for sub in submissions:
        gpu = _gpu_args(sub["argv"])
        if sub["rule"] in GPU_RULES:  # exactly one request, in the form execution.gpu_request names
            assert gpu == [gpu_arg], (sub["key"], gpu)
            assert _option(sub["argv"], "-p") == "gpu", sub["key"]  # execution.gpu_partition
        else:  # the site profile's partition, else the cluster's default (the fake sinfo's)
            assert gpu == [], (sub["key"], gpu)
            assert _option(sub["argv"], "-p") == ("site_cpu" if account else "cpu"), sub["key"]
        # the site profile's account reaches every job (the slurm profile does not drop its default-resources)
        assert _option(sub["argv"], "-A") == account, sub["key"]
        # the slurm profile's limits and threads for every submitted rule
        assert None not in (_option(sub["argv"], o) for o in ("-t", "--mem", "--cpus-per-task")), sub["key"]
        assert "--requeue" in sub["argv"], sub["key"]

    # the paper config trains its own prior and posterior (no shipped 32x32 checkpoint)
    shells = {j["rule"]: j["shell"] for j in dry}
    assert " train-prior " in shells["train_prior"] and "install-prior" not in shells["train_prior"]
    assert " finetune-posterior " in shells["finetune_posterior"] and "--init-from" not in shells["finetune_posterior"]
    for sub in (s for s in submissions if s["rule"] in training):  # the submitted job runs that command
        assert sub["job_dry_run"].startswith("exit 0\n"), sub["job_dry_run"][-2000:]
        assert f"Shell command: {shells[sub['rule']]}" in sub["job_dry_run"], sub["rule"]


def test_copy_and_export_jobs_submit_no_gpu_request(tmp_path):
    """The default config installs the shipped prior (a copy) and exports the shipped posterior: both jobs are
    submitted without a GPU, as sources and simulate are, and so are the sampling jobs of the methods with no
    network (the inversion); the other sampling jobs still ask for one."""
    dry, submissions, out = submit_through_fake_slurm(tmp_path, ["--workflow-profile", SLURM_PROFILE], [DEFAULT],
                                                      ("train_prior",))
    by_rule = {}
    for sub in submissions:
        cpu_method = sub["rule"] == "sample" and any(f"method={m}" in sub["key"] for m in CPU_METHODS)
        by_rule.setdefault(sub["rule"] + ("_cpu" if cpu_method else ""), []).append(_gpu_args(sub["argv"]))
    for rule in ("train_prior", "finetune_posterior", "sources", "simulate"):
        assert by_rule[rule] == [[]], rule
    assert by_rule["sample_cpu"] and all(g == [] for g in by_rule["sample_cpu"])  # the inversion's
    default = yaml.safe_load(DEFAULT.read_text())  # tuning jobs where a method is tuned, baseline jobs where listed
    optional = ({"tune"} if set(default["methods"]) & set(TUNED_METHODS) else set()) | (
        {"sample_baseline"} if default.get("baselines") else set())
    assert {j["rule"] for j in dry} & {"tune", "sample_baseline"} == optional
    for rule in ("simulate_prior_set", "sample", *optional):
        assert by_rule[rule] and all(g == ["--gpus=1"] for g in by_rule[rule]), rule
    shells = {j["rule"]: j["shell"] for j in dry}
    assert "install-prior" in shells["train_prior"] and "--init-from" in shells["finetune_posterior"]
    (install,) = [s["job_dry_run"] for s in submissions if s["rule"] == "train_prior"]
    assert f"Shell command: {shells['train_prior']}" in install, install[-2000:]
