"""The whole config tree: every shipped config validates, every bad key or value at any depth is one
line naming the file and the field (commands and ``snakemake -n`` alike, with nothing written), moved
keys name their new place, and the committed schema and reference page are generated from the code."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.cli import main
from pipeline.commands.config import generated
from pipeline.config_renames import RENAMED
from pipeline.errors import ConfigError
from pipeline.settings import PipelineConfig, check_workflow_config, load_config

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "config").glob("*.yaml")) + [ROOT / "tests" / "config" / "ci.yaml",
                                                   ROOT / "data" / "pretrained" / "v1" / "config.yaml"]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_configs_validate(path):
    assert isinstance(load_config(path), PipelineConfig)


def _write(tmp_path, data) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("data,field,words", [
    ({"lensin": {}}, "lensin", "did you mean 'lensing'"),
    ({"lensing": {"geometry": {"image_npix": "abc"}}}, "lensing.geometry.image_npix", "expected int"),
    ({"lensing": {"sources": {"galsim": {"fluxx": [1, 2]}}}}, "lensing.sources.galsim.fluxx", "unknown field"),
    ({"lensing": []}, "lensing", "expected a mapping"),
    ({"rtb": {"lrr": 0.1}}, "rtb.lrr", "unknown field"),
    ({"calibration": {"n_samples": 1}}, "calibration.n_samples", ">= 2"),
    ({"methods": ["dps", "nope"]}, "methods[1]", "must be one of"),
    ({"device": "tpu"}, "device", "must be one of"),
])
def test_bad_key_or_value_at_any_depth_names_file_and_field(tmp_path, data, field, words):
    path = _write(tmp_path, data)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert f"{path}: field '{field}'" in msg and words in msg and "\n" not in msg


def test_moved_keys_name_their_new_place(tmp_path):
    assert RENAMED, "the table of moved keys is empty"
    for old, new in RENAMED.items():
        data: dict = {}
        *parents, leaf = old.split(".")
        node = data
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = 1
        with pytest.raises(ConfigError) as err:
            load_config(_write(tmp_path, data))
        msg = str(err.value)
        assert f"field '{old}'" in msg and (new in msg if not new.startswith("removed") else "removed" in msg)


def test_command_refuses_a_misspelt_section_in_one_line(tmp_path, capsys):
    path = _write(tmp_path, {"lensin": {"geometry": {"image_npix": 16}}})
    assert main(["inspect", "--config", str(path), str(tmp_path / "obs.fits")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [f"error: {path}: field 'lensin': unknown field (did you mean 'lensing'?)"]


def test_bench_vision_checks_the_whole_file_too(tmp_path, capsys):
    path = _write(tmp_path, {"lensin": {}, "vision": {"datasets": ["mnist"]}})
    assert main(["bench", "vision", "--config", str(path), "--out", str(tmp_path / "out")]) == 2
    assert "field 'lensin'" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_command_logs_the_sections_taken_from_defaults(tmp_path, caplog):
    path = _write(tmp_path, {"lensing": {"simulate_seed": 3}})
    with caplog.at_level(logging.INFO, logger="pipeline.settings"):
        cfg = load_config(path)
    assert cfg.lensing.simulate_seed == 3
    line = next(r.getMessage() for r in caplog.records if "from defaults" in r.getMessage())
    assert str(path) in line and "rtb" in line and "prior" in line and "lensing" not in line


def test_workflow_errors_name_the_source_that_set_the_field(tmp_path):
    base = _write(tmp_path, {"calibration": {"n_obs": 4, "n_samples": 8}})
    extra = tmp_path / "extra.yaml"
    extra.write_text(yaml.safe_dump({"rtb": {"lrr": 1.0}}))
    merged = {"calibration": {"n_obs": 4, "n_samples": 8}, "rtb": {"lrr": 1.0}}
    with pytest.raises(ConfigError) as err:
        check_workflow_config(merged, [base, extra])
    assert err.value.source == str(extra) and err.value.field == "rtb.lrr"
    merged["calibration"]["n_obs"] = "x"
    del merged["rtb"]
    with pytest.raises(ConfigError) as err:
        check_workflow_config(merged, [base], {"calibration": {"n_obs": "x"}})
    assert err.value.source == "--config" and err.value.field == "calibration.n_obs"


def test_workflow_errors_in_a_list_item_name_the_file_that_set_the_item(tmp_path):
    base = _write(tmp_path, {"calibration": {"n_obs": 4, "n_samples": 8}})
    extra = tmp_path / "extra.yaml"
    item = {"name": "v 1", "config": "c.yaml", "prior": "p", "posterior": "q"}
    extra.write_text(yaml.safe_dump({"baselines": [item]}))
    merged = {"calibration": {"n_obs": 4, "n_samples": 8}, "baselines": [dict(item)]}
    with pytest.raises(ConfigError) as err:
        check_workflow_config(merged, [base, extra])
    assert err.value.source == str(extra) and err.value.field == "baselines[0].name"
    del item["config"]  # a required key left out: the file holding the item is named
    extra.write_text(yaml.safe_dump({"baselines": [{**item, "name": "v1"}]}))
    merged["baselines"] = [{**item, "name": "v1"}]
    with pytest.raises(ConfigError) as err:
        check_workflow_config(merged, [base, extra])
    assert err.value.source == str(extra) and err.value.field == "baselines[0].config"


def test_config_command_checks_files_and_the_committed_copies(tmp_path, capsys):
    assert main(["config", "check", str(SHIPPED[0])]) == 0
    assert capsys.readouterr().out.strip() == f"{SHIPPED[0]}: ok"
    bad = _write(tmp_path, {"rtb": {"optim": {"lr": "fast"}}})
    assert main(["config", "check", str(bad)]) == 2
    assert capsys.readouterr().err.strip() == f"error: {bad}: field 'rtb.optim.lr': expected float, got str 'fast'"
    assert main(["config", "schema", "--check"]) == 0


def test_committed_schema_and_reference_page_are_current():
    for path, text in generated().items():
        assert path.read_text() == text, f"{path} is stale: run `python -m pipeline config schema --write`"


def test_config_tree_and_method_registry_import_without_torch():
    """What the Snakefile's config check and ``snakemake -n`` load (the config tree, its reference-page
    generator, the method registry) pulls in no torch, numpy, astropy or scipy and no sampler or network
    module, so a dry run does not pay their ~2 s import."""
    code = ("import sys, pipeline.settings, pipeline.config_docs, pipeline.samplers.registry; "
            "heavy = {'torch', 'numpy', 'astropy', 'scipy', 'skimage', 'caustics'}; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy or m in "
            "('pipeline.samplers.base', 'pipeline.diffusion.schedule', 'pipeline.diffusion.unet', "
            "'pipeline.lensing.operator')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT,
                         timeout=120).stdout.strip()
    assert out == "[]"


@pytest.mark.slow
@pytest.mark.workflow
@pytest.mark.parametrize("bad,field", [
    ({"lensing": {"geometry": {"image_npix": "abc"}}}, "lensing.geometry.image_npix"),
    ({"rtb": {"lrr": 0.1}}, "rtb.lrr"),
])
def test_snakemake_dry_run_refuses_a_bad_config_and_changes_nothing(tmp_path, bad, field):
    work = tmp_path / "work"
    (work / "results" / "config").mkdir(parents=True)
    kept = work / "results" / "config" / "lensing.yaml"
    kept.write_text("lensing: {}\n")
    before = {p: p.read_bytes() for p in work.rglob("*") if p.is_file()}
    path = _write(tmp_path, bad)
    cmd = [str(Path(sys.executable).with_name("snakemake")), "--snakefile", str(ROOT / "Snakefile"),
           "--directory", str(work), "--cores", "1", "-n", "--configfile", str(path)]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode != 0
    errors = [line for line in (res.stdout + res.stderr).splitlines() if line.startswith("error:")]
    assert errors == [errors[0]] and f"{path}: field '{field}'" in errors[0]
    after = {p: p.read_bytes() for p in work.rglob("*") if p.is_file() and ".snakemake" not in p.parts}
    assert after == before


def test_the_v1_config_merged_over_the_default_is_the_v1_config_alone():
    """data/pretrained/v1/config.yaml sets every key that differs from config/config.yaml, so Snakemake's
    key-by-key merge (`--configfile` over the default) reruns v1 exactly as the file alone describes it."""
    import copy

    from pipeline.config import load_yaml
    from pipeline.settings import config_from_dict

    def merge(base, over):
        out = copy.deepcopy(base)
        for k, v in over.items():
            out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        return out

    path = ROOT / "data" / "pretrained" / "v1" / "config.yaml"
    v1 = load_yaml(path)
    merged = merge(load_yaml(ROOT / "config" / "config.yaml"), v1)
    assert config_from_dict(merged, path) == config_from_dict(v1, path)
    assert merged["prior_checkpoint"] == "data/pretrained/v1/prior" and merged["baselines"] == []
