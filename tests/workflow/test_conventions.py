"""Snakemake conventions checked without running Snakemake: profiles that work with a site profile, the
report captions, the catalog file, the config README and snakefmt formatting."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
RULES = sorted((ROOT / "workflow" / "rules").glob("*.smk"))
GPU_RULES = {"train_prior", "finetune_posterior", "simulate_prior_set", "tune", "sample", "sample_shard",
             "sample_user", "sample_baseline", "bench_vision"}


def _rule_names() -> set[str]:
    text = (ROOT / "Snakefile").read_text() + "".join(p.read_text() for p in RULES)
    return set(re.findall(r"^\s*rule (\w+):", text, re.M)) | set(re.findall(r"use rule \w+ as (\w+)", text))


def test_the_default_workflow_profile_overrides_nothing_a_site_profile_sets():
    """Snakemake loads profiles/default beside any `--profile` and lets its keys win: cores, resource caps,
    latency or executor settings there would cap or break a cluster run."""
    profile = yaml.safe_load((ROOT / "profiles" / "default" / "config.yaml").read_text())
    assert set(profile) <= {"rerun-incomplete", "printshellcmds"}, sorted(profile)


def test_the_slurm_profile_leaves_gpu_requests_to_the_rules_and_knows_every_rule_it_names():
    profile = yaml.safe_load((ROOT / "profiles" / "slurm" / "config.yaml").read_text())
    assert profile["executor"] == "slurm"
    resources = [profile.get("default-resources", {})] + list(profile.get("set-resources", {}).values())
    assert not [r for r in resources if {"gpu", "gres", "gpu_model"} & set(r)]  # one request: the rule's
    names = _rule_names()
    assert set(profile["set-resources"]) <= names and set(profile["set-threads"]) <= names
    assert GPU_RULES <= set(profile["set-threads"])  # a GPU job's threads are its CPUs and torch threads


def test_every_rule_that_can_ask_for_a_gpu_is_listed_as_a_gpu_rule():
    """GPU_RULES (which the profiles' threads and resources are checked against) holds every rule whose
    resources come from gpu_resources / method_gpu_resources (a `use rule` copy inherits its rule's)."""
    text = (ROOT / "Snakefile").read_text() + "".join(p.read_text() for p in RULES)
    blocks = re.findall(r"^\s*rule (\w+):\n(.*?)(?=^\s*(?:rule|use rule|ruleorder|if|def) |\Z)", text, re.M | re.S)
    asking = {name for name, body in blocks if re.search(r"\*\*(method_)?gpu_resources\(", body)}
    assert asking and asking <= GPU_RULES, sorted(asking - GPU_RULES)


def test_light_rules_run_on_the_submit_host():
    """calibrate, report, the config files and the shard merge run beside Snakemake (no queue wait)."""
    text = "".join(p.read_text() for p in RULES)
    for rule in ("calibrate", "report", "config_section", "sample_merge"):
        block = re.search(rf"^\s*rule {rule}:\n(.*?)(?=^\s*(?:rule|use rule|ruleorder) |\Z)", text, re.M | re.S)
        assert block and "localrule: True" in block.group(1), rule


def test_report_captions_exist_for_every_report_item():
    text = (ROOT / "Snakefile").read_text() + "".join(p.read_text() for p in RULES)
    captions = re.findall(r'caption="([^"]+)"', text)
    assert captions and 'report: "workflow/report/workflow.rst"' in text
    for cap in captions:
        assert (ROOT / "workflow" / "rules" / cap).resolve().is_file(), cap


def test_catalog_file_and_config_readme():
    catalog = yaml.safe_load((ROOT / ".snakemake-workflow-catalog.yml").read_text())
    assert catalog["usage"]["software-stack-deployment"]["conda"] is True and catalog["usage"]["report"] is True
    readme = (ROOT / "config" / "README.md").read_text()
    assert "../docs/config.md" in readme
    for cfg in sorted((ROOT / "config").glob("*.yaml")):
        assert f"`{cfg.name}`" in readme, f"config/README.md does not say what {cfg.name} is for"


def test_paper_config_trains_its_own_networks():
    """config/paper.yaml is merged over config/config.yaml: it must switch off both shipped (32x32)
    checkpoints, or fine-tuning aborts on a recipe mismatch after the prior has trained for hours."""
    paper = yaml.safe_load((ROOT / "config" / "paper.yaml").read_text())
    assert "prior_checkpoint" in paper and paper["prior_checkpoint"] is None
    assert "posterior_checkpoint" in paper and paper["posterior_checkpoint"] is None


@pytest.mark.skipif(importlib.util.find_spec("snakefmt") is None, reason="snakefmt not installed")
def test_rules_are_formatted_by_snakefmt():
    res = subprocess.run([sys.executable, "-m", "snakefmt", "--check", "--line-length", "120", "Snakefile",
                          "workflow/rules"], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
