"""The Snakemake DAG: lint, dry runs, a real tiny run, and resume after kill -9 / a truncated checkpoint.

Every run uses ``--directory`` in a temp dir with absolute ``--snakefile``/``--configfile``,
so existing results in the checkout never mask the DAG.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.samplers.registry import CPU_METHODS

pytestmark = [pytest.mark.workflow, pytest.mark.slow]  # every test here runs snakemake or a notebook

ROOT = Path(__file__).resolve().parents[2]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))
CI_CONFIG = ROOT / "tests" / "config" / "ci.yaml"


def snakemake(workdir, *args, timeout=900, check=True, config=CI_CONFIG):
    cmd = [SNAKEMAKE, "--snakefile", str(ROOT / "Snakefile"), "--directory", str(workdir), "--cores", "2"]
    cmd += list(args)
    if config is not None:  # last: --configfile takes several values and would swallow targets
        cmd += ["--configfile", str(config)]
    env = dict(os.environ, PIPELINE_NUM_THREADS="1")
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    if check and res.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return res


def test_lint_is_clean(tmp_path):
    res = snakemake(tmp_path, "--lint", config=None)
    assert "Congratulations, your workflow is in a good condition" in res.stdout + res.stderr


@pytest.mark.parametrize("target", ["all", "vision"])
def test_dry_run(tmp_path, target):
    res = snakemake(tmp_path, "-n", target)
    out = res.stdout + res.stderr
    assert "This was a dry-run" in out
    expected = ["sources", "train_prior", "finetune_posterior", "sample", "calibrate", "report"] \
        if target == "all" else ["bench_vision"]
    for rule in expected:
        assert f"rule {rule}:" in out or f"\n{rule} " in out, rule


def test_dry_run_slurm_profile(tmp_path):
    res = snakemake(tmp_path, "-n", "--workflow-profile", str(ROOT / "profiles" / "slurm"), config=None)
    out = res.stdout + res.stderr
    assert "profiles/slurm" in out and "This was a dry-run" in out
    assert "finetune_posterior" in out


def _jobs(dry_run_output: str) -> list[dict]:
    """The jobs of a `snakemake -n -p` output: rule, input, wildcards, resources (a dict) and shell command."""
    jobs = []
    for block in re.split(r"\n(?=\[[^\n]*\]\nrule )", dry_run_output):
        m = re.search(r"^rule (\w+):", block, re.M)
        if not m:
            continue
        res = re.search(r"^\s+resources: (.*)$", block, re.M)
        resources = dict(kv.split("=", 1) for kv in res.group(1).split(", ")) if res else {}
        field = {k: (re.search(rf"^\s+{k}: (.*)$", block, re.M) or [None, ""])[1] for k in ("input", "wildcards")}
        shell = re.search(r"^Shell command: (.*)$", block, re.M)
        jobs.append({"rule": m.group(1), "resources": resources, **field,
                     "shell": shell.group(1) if shell else ""})
    return jobs


GPU_RULES = {"train_prior", "finetune_posterior", "simulate_prior_set", "tune", "sample"}


@pytest.mark.parametrize("request_, model, expected", [
    ("gpu", None, {"gpu": "1"}),
    ("gpu", "a100", {"gpu": "1", "gpu_model": "a100"}),
    ("gres", None, {"gres": "gpu:1"}),
    ("gres", "a100", {"gres": "gpu:a100:1"}),
    ("none", None, {}),
])
def test_each_gpu_job_asks_for_exactly_one_gpu_in_the_chosen_form(tmp_path, request_, model, expected):
    execution = f"{{gpu_request: {request_}" + (f", gpu_model: {model}" if model else "") + "}"
    res = snakemake(tmp_path, "-n", "-p", "--config", f"execution={execution}")
    jobs = _jobs(res.stdout + res.stderr)
    assert {j["rule"] for j in jobs} >= GPU_RULES | {"sources", "calibrate", "report", "config_section"}
    assert any("method=inversion" in j["wildcards"] for j in jobs if j["rule"] == "sample")
    for job in jobs:
        asked = {k: v for k, v in job["resources"].items() if k in ("gpu", "gres", "gpu_model") and v not in ("0", "")}
        gpu_job = job["rule"] in GPU_RULES and not any(f"method={m}" in job["wildcards"] for m in CPU_METHODS)
        assert asked == (expected if gpu_job else {}), (job["rule"], job["wildcards"], asked)
        if job["shell"]:  # the job's setup knows it asked for a GPU
            assert ("--gpu-job" in job["shell"]) == bool(asked), job["rule"]


def test_copy_and_light_jobs_ask_for_no_gpu(tmp_path):
    """With the shipped checkpoints (the default config) train_prior only installs one and fine-tuning
    only continues it: no GPU, as for the light jobs."""
    res = snakemake(tmp_path, "-n", "-p", config=ROOT / "config" / "config.yaml")
    jobs = {j["rule"]: j for j in _jobs(res.stdout + res.stderr)}
    for rule in ("train_prior", "finetune_posterior", "calibrate", "report", "config_section", "sources"):
        assert not {"gpu", "gres"} & set(jobs[rule]["resources"]), rule
    assert "install-prior" in jobs["train_prior"]["shell"]
    # shipped checkpoints are passed relative to the working directory when they lie below it (here they
    # do not: the test's working directory is a temp dir), never built from the working directory's path
    assert "--init-from " + str(ROOT / "data" / "pretrained" / "posterior") in jobs["finetune_posterior"]["shell"]


def test_only_the_rtb_methods_sample_jobs_depend_on_the_fine_tuned_posterior(tmp_path):
    res = snakemake(tmp_path, "-n", "-p")
    samples = [j for j in _jobs(res.stdout + res.stderr) if j["rule"] == "sample"]
    assert len(samples) == 10  # 5 methods of the CI config x 2 sets
    for job in samples:
        method = re.search(r"method=(\w+)", job["wildcards"]).group(1)
        rtb = method.startswith("rtb")
        assert ("results/posterior/run/final" in job["input"]) == rtb, method
        assert ("--posterior results/posterior/run/final" in job["shell"]) == rtb, method
        assert "--resume" in job["shell"]


def test_sample_shards_split_and_merge_the_sample_jobs(tmp_path):
    cfg = tmp_path / "shards.yaml"  # (--config passes nested values as strings)
    cfg.write_text(CI_CONFIG.read_text() + "execution: {sample_shards: 3}\n")
    res = snakemake(tmp_path / "wd", "-n", "-p", config=cfg)
    jobs = _jobs(res.stdout + res.stderr)
    shards = [j for j in jobs if j["rule"] == "sample_shard"]
    assert len(shards) == 30 and not [j for j in jobs if j["rule"] == "sample"]
    assert {re.search(r"--shard (\d/3)", j["shell"]).group(1) for j in shards} == {"0/3", "1/3", "2/3"}
    assert len([j for j in jobs if j["rule"] == "sample_merge"]) == 10


def test_a_baseline_is_sampled_with_its_own_files_and_labelled_beside_the_methods(tmp_path):
    cfg = tmp_path / "baseline.yaml"
    cfg.write_text(CI_CONFIG.read_text().replace(
        "baselines: []", "baselines:\n- {name: v1, config: data/pretrained/v1/config.yaml, prior: data/pretrained/v1/prior, "
        "posterior: data/pretrained/v1/posterior, sets: [heldout]}\n", 1))
    res = snakemake(tmp_path / "wd", "-n", "-p", config=cfg)
    jobs = _jobs(res.stdout + res.stderr)
    base = [j for j in jobs if j["rule"] == "sample_baseline"]
    assert len(base) == 1 and "set=heldout" in base[0]["wildcards"]  # only the sets it names
    shell = base[0]["shell"]
    v1 = ROOT / "data" / "pretrained" / "v1"
    for part in ("--method rtb_amortized", "--label v1", "--resume", "--out results/posteriors/heldout/v1",
                 f"--config {v1 / 'config.yaml'}", f"--prior {v1 / 'prior'}", f"--posterior {v1 / 'posterior'}",
                 "--obs results/observations/heldout"):
        assert part in shell, part
    assert len([j for j in jobs if j["rule"] == "sample"]) == 10  # the methods' jobs are unchanged
    calib = {re.search(r"set=(\w+)", j["wildcards"]).group(1): j for j in jobs if j["rule"] == "calibrate"}
    assert "results/posteriors/heldout/v1" in calib["heldout"]["shell"]
    assert "results/posteriors/prior/v1" not in calib["prior"]["shell"]


@pytest.mark.slow
def test_a_moved_project_reruns_nothing(tmp_path):
    """A project (the workflow, the package, the shipped checkpoints and results made in it) moved to
    another directory is up to date: no job's params hold the project's absolute path (the shipped
    posterior checkpoint used to be passed as one)."""
    import shutil

    first = tmp_path / "first"
    first.mkdir()
    for name in ("Snakefile", "workflow", "pipeline", "config", "profiles", "environment.yml"):
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, first / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, first / name)
    shutil.copytree(ROOT / "data" / "pretrained", first / "data" / "pretrained")
    cfg = first / "config" / "config.yaml"
    # a small source cube (the paths are what matters here, not the galaxies): seconds instead of minutes
    (first / "small_cube.yaml").write_text("lensing: {sources: {n_galsim: 30, n_hst: 10}}\n")

    def run_in(project, *args):
        cmd = [SNAKEMAKE, "--snakefile", str(project / "Snakefile"), "--cores", "2", *args,
               "results/posterior/run/final", "--configfile", str(project / "config" / cfg.name),
               str(project / "small_cube.yaml")]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=project,
                              env=dict(os.environ, PIPELINE_NUM_THREADS="1"))

    res = run_in(first)
    assert res.returncode == 0, res.stderr[-3000:]
    moved = tmp_path / "moved"
    first.rename(moved)
    again = run_in(moved, "-n")
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr, again.stdout[-3000:]


def test_bad_config_is_refused_in_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("methods: [not_a_method]\n")
    res = snakemake(tmp_path / "wd", "-n", config=bad, check=False)
    assert res.returncode != 0
    assert "not_a_method" in res.stdout + res.stderr


def test_the_workflows_method_lists_equal_the_packages():
    """The generated config schema's enum names exactly pipeline.samplers.METHODS, and the workflow takes
    its method lists from the package (no copy to keep in step)."""
    import yaml

    from pipeline.samplers import METHODS

    schema = yaml.safe_load((ROOT / "workflow" / "schemas" / "config.schema.yaml").read_text())
    assert set(schema["properties"]["methods"]["items"]["enum"]) == set(METHODS)
    common = (ROOT / "workflow" / "rules" / "common.smk").read_text()
    assert re.search(r"^from pipeline\.samplers\.registry import .*\bMETHODS\b", common, re.M)
    assert not re.search(r"^(METHODS|RTB_METHODS|TUNED_METHODS|CPU_METHODS) *=", common, re.M)  # no local copy
    assert 'method="|".join(METHODS)' in common


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """The whole DAG on the tiny CI config, for real (shared by the notebook tests)."""
    wd = tmp_path_factory.mktemp("tiny_run")
    snakemake(wd)
    return wd


@pytest.mark.slow
def test_tiny_run_produces_report_and_is_idempotent(tiny_run):
    import numpy as np
    from astropy.io import fits

    res = tiny_run / "results"
    assert (res / "report.md").stat().st_size > 500
    for s in ("prior", "heldout"):
        summary = res / "calibration" / s / "summary.json"
        assert summary.is_file()
        for m in ("rtb_amortized", "rtb_amortized_is", "dps", "fps_smc", "inversion"):
            files = sorted((res / "posteriors" / s / m).glob("*.fits"))
            assert len(files) == 3, (s, m)
    # every posterior file carries the products: model, residuals, the lens, true units
    with fits.open(sorted((res / "posteriors" / "heldout" / "inversion").glob("*.fits"))[0]) as h:
        assert {"MODEL", "RESID", "OBS", "SAMPLES"} <= {x.name for x in h}
        assert h[0].header["LENSMOD"] == "SIE+SHEAR" and h["OBS"].header["BUNIT"] == h["MODEL"].header["BUNIT"]
        assert "LOGZT2" in h[0].header and h[0].header["LOGZMARG"] == h[0].header["LOGZELBO"]
    report = (res / "report.md").read_text()
    assert "| prior | inversion |" in report and "| heldout | inversion |" in report
    assert "The regularised inversion beside RTB" in report
    # RTB + importance resampling keeps every trajectory as a particle, weighted 1/n per group
    with fits.open(sorted((res / "posteriors" / "prior" / "rtb_amortized_is").glob("*.fits"))[0]) as h:
        n, m = h["SAMPLES"].data.shape[0], h["PARTICLES"].data.shape[0] // h["SAMPLES"].data.shape[0]
        assert m == 2 and h["PARTICLES"].data.shape[0] == n * m
        w = h["WEIGHTS"].data.reshape(n, m)
        np.testing.assert_allclose(w.sum(1), 1.0 / n, rtol=1e-6)
    again = snakemake(tiny_run, "-n")
    assert "Nothing to be done" in again.stdout + again.stderr


@pytest.mark.slow
def test_every_job_logs_its_device_and_the_snakemake_report_shows_the_results(tiny_run, tmp_path):
    import zipfile

    for log in ["sources.log", "train_prior.log", "calibrate_prior.log", "report.log", "sample/prior_dps.log"]:
        text = (tiny_run / "logs" / log).read_text()
        assert re.search(r"INFO pipeline\.job: [\w-]+: device (cpu|cuda)\b.*, threads 1 \(", text), log
    assert (tiny_run / "results" / "report.html").stat().st_size > 1000
    snakemake(tiny_run, "--report", str(tmp_path / "report.zip"))
    with zipfile.ZipFile(tmp_path / "report.zip") as z:
        names = [Path(n).name for n in z.namelist()]
        page = z.read("report/report.html").decode()
    for name in ("report.html", "summary.json", "coverage_prior.png", "coverage_heldout.png",
                 "prior_rtb_amortized_obs-0000.png"):
        assert name in names, name
    assert "TARP's expected coverage" in page and "Lenses of the heldout set" in page  # the captions


@pytest.mark.slow
def test_rtb_guidance_is_tuned_by_untrained_elbo_and_its_gain_is_learned(tiny_run):
    """RTB with guidance on the amortized lensing posterior (the CI config turns it on): the tuner's
    record, and the exported per-step gains."""
    import json

    from pipeline.io.checkpoint import load_checkpoint

    res = subprocess.run([sys.executable, "-m", "pipeline", "finetune-posterior", "--config",
                          "results/config/posterior.yaml", "--prior", "results/prior/run/final", "--sources",
                          "results/sources/sources.fits", "--tune-guidance"], capture_output=True, text=True, cwd=tiny_run, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    rec = json.loads(res.stdout.strip().splitlines()[-1])
    assert rec["method"] == "rtb_dps_cla" and rec["n_obs"] == 4 and rec["scale"] in rec["grid"]
    vals = [v for v in rec["values"] if v is not None]
    assert len(vals) == len(rec["grid"]) and rec["values"][rec["grid"].index(rec["scale"])] == max(vals)
    ck = load_checkpoint(tiny_run / "results" / "posterior" / "run" / "final")
    gains = ck.states["per_step"]  # exported with the network: sampling needs them
    assert gains["guidance_log_gain"].shape == (7,) and bool((gains["guidance_log_gain"][2:] != 0).any())


def _python_pids(command: str, cwd: Path) -> list[int]:
    """PIDs of python processes running ``-m pipeline COMMAND`` in ``cwd`` (not the wrapping shell)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            here = os.path.realpath(proc / "cwd")
        except OSError:
            continue
        args = [a.decode(errors="replace") for a in argv if a]
        if (args and "python" in Path(args[0]).name and command in args
                and here == os.path.realpath(cwd)):
            pids.append(int(proc.name))
    return pids


def _wait_for(predicate, timeout):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if predicate():
            return True
        time.sleep(0.5)
    return False


@pytest.mark.slow
def test_finetune_resumes_after_kill_and_falls_back_from_truncated_checkpoint(tmp_path):
    cfg = tmp_path / "long.yaml"
    cfg.write_text(CI_CONFIG.read_text().replace("  steps: 6\n", "  steps: 400\n"))
    wd = tmp_path / "wd"
    snakemake(wd, "results/prior/run/final", config=cfg)
    run_dir = wd / "results" / "posterior" / "run"
    cmd = [SNAKEMAKE, "--snakefile", str(ROOT / "Snakefile"), "--directory", str(wd), "--cores", "1",
           "results/posterior/run/final", "--configfile", str(cfg)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT,
                            start_new_session=True)
    try:
        assert _wait_for(lambda: len(list(run_dir.glob("step-*"))) >= 3, 300), "no checkpoints appeared"
        # kill -9 the fine-tuning python process itself (not snakemake)
        pids = _python_pids("finetune-posterior", wd)
        assert pids, "fine-tuning process not found"
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert not (run_dir / "final").exists()
    steps = sorted(run_dir.glob("step-*"))
    newest, previous = steps[-1], steps[-2]
    # truncate the newest checkpoint's weights: the rerun must fall back to the previous one
    weights = newest / "model.pt"
    weights.write_bytes(weights.read_bytes()[:100])
    cfg.write_text(cfg.read_text().replace("  steps: 400\n", f"  steps: {int(previous.name.split('-')[1]) + 4}\n"))
    # (the step count is not part of the resume hash: more or fewer steps may continue a run)
    snakemake(wd, "--rerun-incomplete", "results/posterior/run/final", config=cfg)
    log = (wd / "logs" / "finetune_posterior.log").read_text()
    assert "falling back to the previous one" in log
    prev_step = int(previous.name.split("-")[1])
    assert f"resumed RTB training from results/posterior/run/{previous.name}" in log
    assert f"resuming fine-tuning at step {prev_step}" in log
    assert (run_dir / "final" / "hparams.json").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("notebook", ["01_quickstart.ipynb", "02_your_own_data.ipynb"])
def test_notebook_runs_on_the_tiny_run(tiny_run, notebook, tmp_path):
    """Both notebooks execute top to bottom (nbmake) against the tiny run's outputs."""
    nb = ROOT / "notebooks" / notebook
    assert all(not c.get("outputs") for c in __import__("json").loads(nb.read_text())["cells"]
               if c["cell_type"] == "code"), "commit notebooks with outputs stripped"
    env = dict(os.environ, PIPELINE_RESULTS=str(tiny_run / "results"), PIPELINE_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbmake",
                          "--nbmake-timeout=600", str(nb)], capture_output=True, text=True, cwd=nb.parent,
                         env=env, timeout=900)
    assert res.returncode == 0, res.stdout[-4000:]
