"""The Snakemake DAG: lint, dry runs, a real tiny run, and resume after kill -9 / a truncated checkpoint.

Every run uses ``--directory`` in a temp dir with absolute ``--snakefile``/``--configfile``,
so existing results in the checkout never mask the DAG.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
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
    assert "from pipeline.samplers.registry import METHODS, TUNED_METHODS" in common
    assert 'method="|".join(METHODS)' in common
