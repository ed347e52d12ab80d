"""Every field of the config tree carries its own documentation (``doc``, ``unit``) in the dataclass, from which the schema and the docs are generated."""

import dataclasses
import typing
from pathlib import Path

import pytest
import yaml

from pipeline.config import CHECKS, from_mapping, load_section
from pipeline.errors import ConfigError
from pipeline.lensing.config import CalibrationConfig, LensingConfig, PosteriorConfig
from pipeline.settings import PipelineConfig
from pipeline.vision.config import VisionConfig

ROOT = Path(__file__).resolve().parents[1]
MAX_DOC_CHARS = 240  # one or two short sentences


def walk(cls, prefix):
    """(dotted name, field) for every field of ``cls`` and of the dataclasses nested in it."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        yield prefix + f.name, f
        if dataclasses.is_dataclass(hints[f.name]):
            yield from walk(hints[f.name], prefix + f.name + ".")


ALL_FIELDS = list(walk(PipelineConfig, ""))


def test_walk_reaches_the_nested_sections():
    names = {name for name, _ in ALL_FIELDS}
    assert {"lensing.geometry.psf_fwhm", "lensing.sources.galsim.n_knots", "lensing.sources.hst.zoom",
            "lensing.noise.sigma", "posterior.fps_smc_mode", "calibration.n_obs",
            "vision.rtb.policy.head_preset"} <= names
    assert len(ALL_FIELDS) > 100


@pytest.mark.parametrize("name,f", ALL_FIELDS, ids=[name for name, _ in ALL_FIELDS])
def test_every_field_has_a_doc_and_a_unit_entry(name, f):
    doc = f.metadata.get("doc")
    assert isinstance(doc, str) and doc.strip(), f"{name}: no doc"
    assert doc == doc.strip() and "\n" not in doc and len(doc) <= MAX_DOC_CHARS, f"{name}: doc not one short line"
    assert doc[0].isupper() or doc[0] in "[|", f"{name}: doc should start a sentence: {doc!r}"
    assert doc.endswith("."), f"{name}: doc should end with a full stop: {doc!r}"
    assert "unit" in f.metadata, f"{name}: unit not declared (None when dimensionless)"
    unit = f.metadata["unit"]
    assert unit is None or (isinstance(unit, str) and unit.strip()), f"{name}: empty unit"
    assert set(f.metadata) <= {"doc", "unit", *CHECKS}


@pytest.mark.parametrize("name,unit", [
    ("lensing.geometry.image_pixscale", "arcsec/pixel"),
    ("lensing.geometry.source_npix", "pixel"),
    ("lensing.geometry.psf_fwhm", "arcsec"),
    ("lensing.lens.rein", "arcsec"),
    ("lensing.lens.phi", "rad"),
    ("lensing.sources.galsim.flux", "electron/s"),
    ("lensing.noise.exposure_time", "s"),
    ("lensing.brightness.scale", "electron/(s arcsec2)"),
    ("lensing.lens.q", None),
    ("vision.chain.K", "steps"),
])
def test_physical_fields_state_their_unit(name, unit):
    assert dict(ALL_FIELDS)[name].metadata["unit"] == unit


def test_calibration_defaults_match_the_shipped_config():
    cfg = load_section(ROOT / "config" / "config.yaml", "calibration", CalibrationConfig, required=True)
    assert cfg == CalibrationConfig() == CalibrationConfig(n_obs=16, n_samples=32)


@pytest.mark.parametrize("key,value,words", [
    ("n_obs", 0, ">= 1"),
    ("n_samples", 1, ">= 2"),
    ("n_samples", 2.5, "expected int"),
    ("n_sample", 8, "unknown field"),
])
def test_bad_calibration_value_names_file_and_field(tmp_path, key, value, words):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"calibration": {key: value}}))
    with pytest.raises(ConfigError) as err:
        load_section(path, "calibration", CalibrationConfig)
    msg = str(err.value)
    assert str(path) in msg and f"calibration.{key}" in msg and words in msg and "\n" not in msg


def test_nested_sections_are_fresh_per_instance():
    a, b = from_mapping(LensingConfig, {}), LensingConfig()
    a.sources.galsim.offset = 0.3
    a.geometry.image_npix = 64
    PosteriorConfig().guidance_scales["dps"].append(9.0)
    VisionConfig().datasets.clear()
    assert b.sources.galsim.offset == 0.1 and LensingConfig().geometry.image_npix == 32
    assert PosteriorConfig().guidance_scales["dps"][-1] == 0.05 and VisionConfig().datasets
