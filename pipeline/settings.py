"""The whole pipeline config: one dataclass tree, read and validated in one place.

:class:`PipelineConfig` is the root: top-level keys and one field per section (``lensing:``,
``prior:``, ``chain:``, ``rtb:``, ``posterior:``, ``calibration:``, ``vision:``). :func:`load_config` reads a YAML
file into it; every wrong type, out-of-range value or unknown key, at any depth, is a one-line
:class:`pipeline.errors.ConfigError` naming the file and the dotted field, and a key that moved since
an older release names its new place. The Snakefile checks the merged workflow config with
:func:`check_workflow_config`; every command given ``--config`` checks its file with
:func:`load_config` before any work. The workflow's JSON schema and ``docs/config.md`` are generated
from this tree (:mod:`pipeline.config_docs`).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, fields

from pipeline.config import DEVICES, from_mapping, load_yaml, param
from pipeline.diffusion.chain_config import ChainConfig
from pipeline.diffusion.prior_config import PriorConfig
from pipeline.errors import ConfigError
from pipeline.lensing.config import CalibrationConfig, LensingConfig, PosteriorConfig
from pipeline.rtb.config import RTBConfig
from pipeline.samplers.registry import AMORTIZED_METHODS, METHODS
from pipeline.vision.config import VisionConfig

log = logging.getLogger(__name__)

GPU_REQUESTS = ("gpu", "gres", "none")
CALIBRATION_SETS = ("prior", "heldout")


def check_run_label(name, source, field) -> None:
    """A baseline's name (``sample --label``): letters, digits and _ only (it names directories and figure
    files) and no method's name (its rows would merge with that method's); else a one-line ConfigError."""
    if not re.fullmatch(r"[A-Za-z0-9_]+", str(name)):
        raise ConfigError(source, field, f"must be letters, digits and _ only, got {name!r}")
    if name in METHODS:
        raise ConfigError(source, field, f"{name!r} is a method's name; give the run its own")


@dataclass
class BaselineConfig:
    """One item of ``baselines:``, a prior and posterior sampled and reported beside the methods.

    Another prior and amortized posterior, with the config they were trained on, sampled on the calibration
    sets beside ``methods`` and reported under its own name: e.g. a previous release's, to compare the default
    against it in the same report. ``name``, ``config``, ``prior`` and ``posterior`` are required."""

    name: str = param("", "Its name in the calibration tables and the directory results/posteriors/SET/NAME; "
                      "letters, digits and _ only, and no method's name.")
    config: str = param("", "The pipeline config it was trained with (its lensing:, chain: and posterior: "
                        "sections are used to sample it), relative to the repository.")
    prior: str = param("", "Its prior checkpoint directory, relative to the repository.")
    posterior: str = param("", "Its amortized posterior (an export or a trainer checkpoint), relative to the "
                           "repository.")
    method: str = param("rtb_amortized", "The amortized sampler run with it.", choices=list(AMORTIZED_METHODS))
    sets: list[str] = param(list(CALIBRATION_SETS), "The calibration sets it is sampled on.",
                            choices=list(CALIBRATION_SETS))

    def validate(self, source="<config>", prefix: str = "") -> None:
        check_run_label(self.name, source, prefix + "name")
        for key in ("config", "prior", "posterior"):
            if not getattr(self, key):
                raise ConfigError(source, prefix + key, "is required: a path relative to the repository")
        if not self.sets:
            raise ConfigError(source, prefix + "sets", "list at least one calibration set")


@dataclass
class ExecutionConfig:
    """Section ``execution:``: how the workflow's jobs ask a scheduler for GPUs, run in a container and are
    split (read by the Snakefile only; no command reads it)."""

    gpu_request: str = param("gpu", "How GPU jobs ask for their GPU: gpu (resource gpu=1, SLURM --gpus), gres "
                             "(gres=gpu:1, SLURM --gres, for sites refusing --gpus) or none (CPU-only runs).",
                             choices=list(GPU_REQUESTS))
    gpu_model: str | None = param(None, "GPU model to ask for (e.g. a100), or null for any.")
    gpu_partition: str | None = param(None, "SLURM partition of the jobs that ask for a GPU; null leaves them "
                                      "in the site profile's or the cluster's default partition.")
    container: str | None = param(None, "Container image every job runs in with `--sdm apptainer` "
                                  "(e.g. docker://ghcr.io/you/lensing-rtb:0.1); null for none.")
    sample_shards: int = param(1, "Sample jobs per method and set, each on a share of the observations "
                               "(merged afterwards); 1 keeps one job.", min=1)


@dataclass
class PipelineConfig:
    """The pipeline config file: top-level keys, then one section per part of the pipeline."""

    device: str = param("auto", "Where every command runs: auto picks CUDA when available, else the CPU.",
                        choices=list(DEVICES))
    methods: list[str] = param(["rtb_amortized", "dps_cla", "fps_smc", "inversion"],
                               "Posterior methods sampled and calibrated on both sets.", choices=list(METHODS))
    prior_checkpoint: str | None = param(None, "Shipped prior checkpoint directory (relative to the repository) "
                                         "installed instead of training one; null trains the prior from prior:.")
    posterior_checkpoint: str | None = param(None, "Shipped RTB trainer checkpoint directory (relative to the "
                                             "repository) that fine-tuning starts from; null starts from the prior.")
    observations: str | None = param(None, "Glob of your observation FITS files for the `user` target; null for none.")
    user_method: str = param("rtb_amortized", "Method the `user` target samples your observations with.",
                             choices=list(METHODS))
    baselines: list[BaselineConfig] = param([], "Other priors and amortized posteriors sampled and calibrated "
                                            "beside the methods, each under its own name; none by default.")
    calibration: CalibrationConfig = param(CalibrationConfig, "Calibration sets.")
    lensing: LensingConfig = param(LensingConfig, "Geometry, sources, lens ranges, noise and observation reading.")
    prior: PriorConfig = param(PriorConfig, "Diffusion prior training.")
    chain: ChainConfig = param(ChainConfig, "The reverse chain every sampler runs, RTB trains on and the "
                               "prior-drawn set is drawn from.")
    rtb: RTBConfig = param(RTBConfig, "RTB fine-tuning of the prior into an amortized posterior sampler.")
    posterior: PosteriorConfig = param(PosteriorConfig, "Amortized training set-up and posterior sampling defaults.")
    vision: VisionConfig = param(VisionConfig, "The vision benchmarks (`snakemake vision`, `bench vision`).")
    execution: ExecutionConfig = param(ExecutionConfig, "How the workflow's jobs run on a cluster.")

    def validate(self, source="<config>", prefix: str = "") -> None:
        if not self.methods:
            raise ConfigError(source, prefix + "methods", "list at least one method")
        if len(set(self.methods)) != len(self.methods):
            raise ConfigError(source, prefix + "methods", f"repeated method in {self.methods}")
        names = [b.name for b in self.baselines]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise ConfigError(source, f"{prefix}baselines[{i}].name", f"repeated baseline name {name!r}")


SECTIONS = tuple(f.name for f in fields(PipelineConfig) if f.name in
                 ("calibration", "lensing", "prior", "chain", "rtb", "posterior", "vision"))


def config_from_dict(data: dict, source) -> PipelineConfig:
    """Validate a config mapping (``source`` names it in errors) into a :class:`PipelineConfig`."""
    if not isinstance(data, dict):
        raise ConfigError(source, "<top level>", f"expected a mapping, got {type(data).__name__}")
    return from_mapping(PipelineConfig, data, source)


def load_config(path, log_defaults: bool = True) -> PipelineConfig:
    """Read and validate the whole config file at ``path``; log the sections it leaves to defaults."""
    data = load_yaml(path)
    cfg = config_from_dict(data, path)
    missing = [s for s in SECTIONS if s not in data]
    if log_defaults and missing:
        log.info("%s: sections from defaults: %s", path, ", ".join(missing))
    return cfg


def _holds(data, dotted: str) -> bool:
    """Whether the mapping ``data`` sets the field ``dotted`` (``a.b[2].c``: list items by index)."""
    for part in dotted.split("."):
        key, indices = re.fullmatch(r"([^\[]*)((?:\[\d+\])*)", part).groups()
        if not isinstance(data, dict) or key not in data:
            return False
        data = data[key]
        for i in map(int, re.findall(r"\d+", indices)):
            if not isinstance(data, list) or i >= len(data):
                return False
            data = data[i]
    return True


def check_workflow_config(config: dict, configfiles: list, overrides: dict | None = None) -> PipelineConfig:
    """Check the workflow's merged ``config`` (the config files in order, then ``--config`` overrides).
    An error names the last source that sets the offending field: a config file, or ``--config``."""
    sources = [(str(p), load_yaml(p)) for p in configfiles] + [("--config", overrides or {})]
    try:
        return config_from_dict(config, sources[0][0] if configfiles else "--config")
    except ConfigError as exc:
        # the last source that sets the field, else (a required key left out) the nearest enclosing item
        fields = [exc.field] + [exc.field[:i] for i in range(len(exc.field) - 1, 0, -1) if exc.field[i] in ".["]
        where = next((name for f in fields for name, data in reversed(sources) if _holds(data, f)), exc.source)
        if where == exc.source:
            raise
        raise ConfigError(where, exc.field, exc.message) from None
