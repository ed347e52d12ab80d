"""environment.yml (conda users) and pyproject.toml (pip) must name the same runtime packages."""

import re
import tomllib
from pathlib import Path

import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parents[2]

# conda-forge name -> PyPI name where they differ (everything else is the same name on both)
CONDA_TO_PIP = {"pytorch": "torch", "pytorch-gpu": "torch", "pytorch-cpu": "torch"}
# conda-only tooling that is not a Python runtime dependency of the package
CONDA_ONLY = {"python", "pip", "cuda-version", "cudatoolkit"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _conda_spec(entry: str) -> tuple[str, SpecifierSet]:
    """'numpy>=1.26' / 'snakemake >=9,<10' / 'python=3.11' -> (name, specifier)."""
    entry = entry.split("#")[0].strip()
    m = re.match(r"^([A-Za-z0-9_.\-]+)\s*(.*)$", entry)
    name, spec = m.group(1), m.group(2).replace(" ", "")
    if spec and re.match(r"^=?[0-9]", spec):  # conda's '=1.2' means '==1.2.*'
        spec = "==" + spec.lstrip("=") + ("" if "*" in spec else ".*")
    return name, SpecifierSet(spec)


def _environment():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda, pip = {}, {}
    for dep in env["dependencies"]:
        if isinstance(dep, dict):
            for entry in dep.get("pip", []):
                req = Requirement(entry)
                pip[_norm(req.name)] = req.specifier
        else:
            name, spec = _conda_spec(dep)
            if name in CONDA_ONLY:
                continue
            conda[_norm(CONDA_TO_PIP.get(name, name))] = spec
    return env, conda, pip


def _pyproject():
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return {_norm(Requirement(r).name): Requirement(r).specifier for r in data["project"]["dependencies"]}


def test_same_package_names_in_environment_and_pyproject():
    env, conda, pip = _environment()
    py = _pyproject()
    both = set(conda) & set(pip)
    assert not both, f"listed both as conda and pip packages in environment.yml: {sorted(both)}"
    env_names = set(conda) | set(pip)
    assert env_names == set(py), (f"only in environment.yml: {sorted(env_names - set(py))}; "
                                  f"only in pyproject: {sorted(set(py) - env_names)}")
    assert "torch" in conda  # GPU users get conda-forge pytorch, not a pip wheel


def test_environment_holds_the_cuda_build_and_not_the_package_itself():
    """`pytorch-gpu` (the solver refuses it where it sees no driver, rather than quietly giving the CPU
    build), and no pip entry installing the package by a relative path: under `--sdm conda` Snakemake builds
    the environment from a copy in .snakemake/conda/, where `.` is not the repository (jobs import the
    package from the workflow's source tree instead, workflow/rules/common.smk)."""
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    names = [_conda_spec(d)[0] for d in env["dependencies"] if isinstance(d, str)]
    assert "pytorch-gpu" in names and "pytorch" not in names and "pytorch-cpu" not in names
    pip = [e for d in env["dependencies"] if isinstance(d, dict) for e in d.get("pip", [])]
    local = [e for e in pip if e.startswith(("-e", ".", "/", "file:")) or "lensing-rtb-pipeline" in e]
    assert not local, f"environment.yml installs the package itself: {local}"
    text = (ROOT / "environment.yml").read_text()
    assert "CONDA_OVERRIDE_CUDA" in text and "pip install --no-deps -e ." in text  # the notes for users
    common = (ROOT / "workflow" / "rules" / "common.smk").read_text()
    assert "PYTHONPATH={shlex.quote(BASEDIR)}" in common


def test_version_bounds_in_environment_are_those_of_pyproject():
    """Every bound environment.yml states is also in pyproject (it may omit an upper bound)."""
    _env, conda, pip = _environment()
    py = _pyproject()
    for name, spec in {**conda, **pip}.items():
        extra = {str(s) for s in spec} - {str(s) for s in py[name]}
        assert not extra, f"{name}: environment.yml says {spec}, pyproject says {py[name]}"


def test_conda_spec_parser():
    assert _conda_spec("python=3.11")[1] == SpecifierSet("==3.11.*")
    assert _conda_spec("snakemake >=9.0,<10  # comment") == ("snakemake", SpecifierSet(">=9.0,<10"))
    assert CONDA_TO_PIP["pytorch"] == "torch"
