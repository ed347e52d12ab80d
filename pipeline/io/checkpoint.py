"""Self-describing, atomically written checkpoint directories (generic: no model is built here; the prior
loads in :mod:`pipeline.diffusion.network_prior`, the RTB posterior in :mod:`pipeline.rtb.loading`).

Layout of a run directory::

    run_dir/
      LATEST                 # one line: the name of the newest complete step directory
      step-000500/
        hparams.json         # everything needed to rebuild the model (no config file needed)
        <name>.pt            # one file per named state (e.g. model.pt, ema.pt, optim.pt)
        state.pt             # step, RNG states, config hash, trainer extras
        manifest.json        # byte size and sha256 of every file above (written last)
      final/                 # optional export (hparams.json + ema.pt + manifest.json)

A step directory is written into a hidden temp directory and renamed into place, then ``LATEST`` is
replaced the same way; readers never see a half-written step. Loading a run directory verifies
the manifest and falls back to the previous step (with a warning) if the newest is truncated or
corrupt. Everything is loaded with ``torch.load(weights_only=True)``: states must be tensors and plain
Python containers (see :func:`rng_state`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipeline.errors import InputFileError
from pipeline.io.atomic import atomic_directory, remove_stale_temporaries, write_text

log = logging.getLogger(__name__)

STEP_RE = re.compile(r"^step-(\d+)$")
FORMAT_VERSION = 1


def step_dir_name(step: int) -> str:
    return f"step-{int(step):06d}"


@dataclass
class Checkpoint:
    """A loaded checkpoint: ``states[name]`` as saved, ``state`` the trainer state (incl. ``step``)."""

    path: Path
    step: int
    hparams: dict
    states: dict = field(default_factory=dict)
    state: dict = field(default_factory=dict)


# -- RNG state ---------------------------------------------------------------------------------
def rng_state(generators: dict[str, torch.Generator] | None = None) -> dict:
    """All RNG states as weights-only-loadable values: torch CPU (+CUDA), python, numpy, and
    the named ``generators``."""
    np_state = np.random.get_state()
    out = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
        "generators": {k: g.get_state() for k, g in (generators or {}).items()},
    }
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def restore_rng_state(saved: dict, generators: dict[str, torch.Generator] | None = None) -> None:
    """Inverse of :func:`rng_state` (CUDA states are restored only when CUDA is available)."""
    torch.set_rng_state(saved["torch"])
    random.setstate(_tuplify(saved["python"]))
    n = saved["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    if "cuda" in saved and torch.cuda.is_available() and len(saved["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(saved["cuda"])
    for k, g in (generators or {}).items():
        if k not in saved["generators"]:
            raise KeyError(f"checkpoint holds no RNG state for generator {k!r}")
        g.set_state(saved["generators"][k])


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


# -- writing -----------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _write_text_atomic(path: Path, text: str) -> None:
    write_text(path, text)


def write_checkpoint_dir(target, states: dict, hparams: dict, state: dict | None = None) -> Path:
    """Write a complete checkpoint directory at ``target`` atomically (temp dir + rename).

    ``states``: name -> object saved as ``<name>.pt`` (state_dicts, tensors, plain containers);
    ``hparams``: JSON-able dict; ``state``: saved as ``state.pt``. An existing ``target`` is replaced.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    bad = [n for n in states if n in ("state", "hparams", "manifest") or not re.fullmatch(r"[A-Za-z0-9_.-]+", n)]
    if bad:
        raise ValueError(f"invalid checkpoint state name(s): {bad}")
    with atomic_directory(target) as tmp:
        files = {}
        (tmp / "hparams.json").write_text(json.dumps(hparams, indent=2, sort_keys=True, default=_json_default))
        files["hparams.json"] = tmp / "hparams.json"
        for name, obj in states.items():
            torch.save(obj, tmp / f"{name}.pt")
            files[f"{name}.pt"] = tmp / f"{name}.pt"
        if state is not None:
            torch.save(state, tmp / "state.pt")
            files["state.pt"] = tmp / "state.pt"
        manifest = {"format": FORMAT_VERSION,
                    "files": {n: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for n, p in files.items()}}
        for p in files.values():
            _fsync_file(p)
        _write_text_atomic(tmp / "manifest.json", json.dumps(manifest, indent=2, sort_keys=True))
    return target


def _json_default(obj):
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, (tuple, set)):
        return list(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"hparams value of type {type(obj).__name__} is not JSON-serialisable")


def list_checkpoints(run_dir) -> list[tuple[int, Path]]:
    """Complete step directories of ``run_dir`` as (step, path), oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    out = []
    for p in run_dir.iterdir():
        m = STEP_RE.match(p.name)
        if m and p.is_dir():
            out.append((int(m.group(1)), p))
    return sorted(out)


def save_checkpoint(run_dir, step: int, states: dict, hparams: dict, state: dict | None = None,
                    keep: int | None = 3) -> Path:
    """Write ``run_dir/step-<step>/``, point ``LATEST`` at it, and keep only the newest ``keep`` steps.

    ``state`` (the trainer state) gets ``step`` filled in. Returns the step directory.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    state = dict(state or {})
    state["step"] = int(step)
    path = write_checkpoint_dir(run_dir / step_dir_name(step), states, hparams, state)
    _write_text_atomic(run_dir / "LATEST", path.name + "\n")
    if keep is not None and keep > 0:
        for _s, old in list_checkpoints(run_dir)[:-keep]:
            if old != path:
                shutil.rmtree(old, ignore_errors=True)
    remove_stale_temporaries(run_dir)  # leftovers of killed writers
    return path


# -- reading -----------------------------------------------------------------------------------
class _Unreadable(Exception):
    pass


def _verify(step_dir: Path) -> None:
    manifest_path = step_dir / "manifest.json"
    if not manifest_path.is_file():
        raise _Unreadable("manifest.json missing (incomplete checkpoint)")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (ValueError, KeyError, TypeError):
        raise _Unreadable("manifest.json is corrupt") from None
    for name, info in files.items():
        p = step_dir / name
        if not p.is_file():
            raise _Unreadable(f"{name} missing")
        size = p.stat().st_size
        if size != info["bytes"]:
            raise _Unreadable(f"{name} truncated ({size} of {info['bytes']} bytes)")
        if _sha256(p) != info["sha256"]:
            raise _Unreadable(f"{name} checksum mismatch")


def _read_dir(step_dir: Path, names, map_location) -> Checkpoint:
    _verify(step_dir)
    try:
        hparams = json.loads((step_dir / "hparams.json").read_text())
    except (OSError, ValueError) as exc:
        raise _Unreadable(f"hparams.json unreadable ({exc})") from None
    if names is None:
        names = [p.stem for p in step_dir.glob("*.pt") if p.stem != "state"]
    states = {}
    for name in names:
        p = step_dir / f"{name}.pt"
        if not p.is_file():
            raise _Unreadable(f"{name}.pt missing")
        try:
            states[name] = torch.load(p, map_location=map_location, weights_only=True)
        except Exception as exc:
            raise _Unreadable(f"{name}.pt unreadable ({type(exc).__name__})") from None
    state = {}
    if (step_dir / "state.pt").is_file():
        try:
            state = torch.load(step_dir / "state.pt", map_location="cpu", weights_only=True)
        except Exception as exc:
            raise _Unreadable(f"state.pt unreadable ({type(exc).__name__})") from None
    m = STEP_RE.match(step_dir.name)
    step = int(state.get("step", m.group(1) if m else -1))
    return Checkpoint(path=step_dir, step=step, hparams=hparams, states=states, state=state)


def is_checkpoint_dir(path) -> bool:
    """True if ``path`` is itself a checkpoint directory (holds hparams.json or manifest.json)."""
    path = Path(path)
    return (path / "manifest.json").is_file() or (path / "hparams.json").is_file()


def has_checkpoints(run_dir) -> bool:
    return bool(list_checkpoints(run_dir))


def load_checkpoint(path, names=None, map_location="cpu") -> Checkpoint:
    """Load a checkpoint from a step directory or from a run directory (its newest readable step).

    ``names`` limits which ``<name>.pt`` files are read (default: all). From a run directory the
    ``LATEST`` step is tried first, then older steps, newest first; each unreadable one is logged as a
    warning. A missing path or no readable checkpoint raises a one-line :class:`InputFileError`.
    """
    path = Path(path)
    if not path.exists():
        raise InputFileError(path, "checkpoint directory not found")
    if not path.is_dir():
        raise InputFileError(path, "checkpoint must be a directory (a run dir or a step-N dir)")
    if is_checkpoint_dir(path):
        try:
            return _read_dir(path, names, map_location)
        except _Unreadable as exc:
            raise InputFileError(path, f"unreadable checkpoint: {exc}") from None
    candidates = [p for _s, p in reversed(list_checkpoints(path))]
    latest_file = path / "LATEST"
    if latest_file.is_file():
        named = path / latest_file.read_text().strip()
        if named in candidates:
            candidates.remove(named)
            candidates.insert(0, named)
    if not candidates:
        raise InputFileError(path, "no checkpoint found (expected step-N directories or hparams.json)")
    reasons = []
    for cand in candidates:
        try:
            ckpt = _read_dir(cand, names, map_location)
        except _Unreadable as exc:
            log.warning("checkpoint %s is unreadable (%s); falling back to the previous one", cand, exc)
            reasons.append(f"{cand.name}: {exc}")
            continue
        return ckpt
    raise InputFileError(path, "no readable checkpoint (" + "; ".join(reasons) + ")")
