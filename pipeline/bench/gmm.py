"""The exact-posterior benchmark on Gaussian-mixture priors: ``python -m pipeline bench gmm``.

Cases (:mod:`pipeline.bench.gmm_cases`): a 2-D mixture of 25 components on a grid with a 1-D
observation, and 8-D / 80-D mixtures with 1, 2 or 4 observed directions. References are exact under the
**chain** prior (:mod:`pipeline.bench.gmm_reference`): importance sampling of prior-chain trajectories
in 2-D (1,000,000 per pool in the full mode), twisted SMC with exact-guidance proposals above it (25 N
particles per pool). ``ref_ess`` (the final Kish ESS; >= 10 N is recorded as ``ess_ge_10N``) and
``logz_ref`` (the mean of the two pools' estimates) are recorded. The Monte-Carlo floor ``sw_floor`` is
the distance between two independent reference sets of the same N. The analytic-prior evidence
``log sum_k w_k N(y; A m_k, A A^T + sigma^2 I)`` is reported as ``logz_analytic`` for context (the chain
is not the analytic prior).

Methods: the four RTB variants (:mod:`pipeline.bench.gmm_rtb`) and every training-free sampler of
:mod:`pipeline.samplers` that applies (DPS and DPS+CLA with the scale tuned on a separate seed and
frozen, CLA, exact guidance, prior chain + importance resampling, FPS, FPS-SMC with ``particles``); one
case is run by :func:`pipeline.bench.gmm_run.run_case`, scored and tabulated by
:mod:`pipeline.bench.gmm_summary`. This module runs the cases (in worker processes with ``jobs > 1``),
reuses finished ones and writes ``gmm.json``.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.bench.gmm_cases import FULL_CASES, make_case
from pipeline.bench.gmm_rtb import N_LOGZ
from pipeline.bench.gmm_run import run_case
from pipeline.bench.gmm_summary import targets
from pipeline.errors import ConfigError
from pipeline.io.atomic import write_json
from pipeline.runtime import configure_threads

log = logging.getLogger(__name__)

CASE_COST_ORDER = ("80d_y4", "80d_y2", "80d_y1", "2d", "8d_y4", "8d_y2", "8d_y1")  # slowest first
# environment variables that once set the RTB budget, and the flag of ``bench gmm`` that replaced each
RETIRED_ENVIRONMENT = {"GMM_RTB_STEPS": ("--rtb-steps", "rtb_steps"), "GMM_RTB_HIDDEN": ("--rtb-hidden", "rtb_hidden")}


def refuse_retired_environment() -> None:
    """Raise a one-line ConfigError if a retired variable is set (it would otherwise be silently ignored)."""
    for name, (flag, argument) in RETIRED_ENVIRONMENT.items():
        if name in os.environ:
            raise ConfigError("environment", name, f"no longer read: unset it and pass {flag} to "
                              f"`python -m pipeline bench gmm` ({argument}= of run_benchmark)")


def _run_case_job(args) -> str:
    """Worker for ``jobs > 1``: one case in a fresh (spawned) process; writes ``cases/<name>.json``."""
    name, settings, out_dir = args
    configure_threads()
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s [{name}] %(message)s", force=True)  # workers are reused
    _run_one_case(name, settings, Path(out_dir))
    return name


def _run_one_case(name: str, settings: dict, out_dir: Path) -> dict:
    case = make_case(name)
    log.info("case %s: d_x=%d d_y=%d, K=%d, N=%d, reference particles 2x%d", name, case.d_x, case.d_y,
             settings["K"], settings["n"], settings["n_prop"])
    t0 = time.perf_counter()
    block = run_case(case, seeds=settings["seeds"], quick=settings["quick"], K=settings["K"], n=settings["n"],
                     n_prop=settings["n_prop"], methods=settings["methods"], out_dir=out_dir,
                     n_logz=settings.get("n_logz", N_LOGZ), rtb_steps=settings.get("rtb_steps"),
                     rtb_hidden=settings.get("rtb_hidden"), spacing=settings.get("spacing", "uniform"))
    block["case_seconds"] = time.perf_counter() - t0
    _write_json(out_dir / "cases" / f"{name}.json", {"settings": settings, "block": block})
    return block


def case_settings(name: str, *, quick: bool, seeds, K: int, n: int, n_prop: int | None, n_logz: int, methods,
                  rtb_steps: int | None, rtb_hidden: int | None, spacing: str = "uniform") -> dict:
    """The settings that make one case's block (a finished case is reused only if they are equal).

    ``rtb_steps`` / ``rtb_hidden`` appear only when given, and ``spacing`` only when not uniform, so the
    defaults keep the recorded settings."""
    if n_prop:
        npr = n_prop
    elif make_case(name).d_x == 2:
        npr = 200_000 if quick else 1_000_000  # plain prior-chain proposals per reference pool
    else:
        npr = 25 * n  # SMC particles per pool (final ESS >= 10 N is checked and recorded)
    settings = {"quick": quick, "seeds": seeds, "K": K, "n": n, "n_prop": npr, "n_logz": n_logz,
                "methods": list(methods) if methods else None}
    settings.update({k: v for k, v in (("rtb_steps", rtb_steps), ("rtb_hidden", rtb_hidden)) if v is not None})
    if spacing != "uniform":
        settings["spacing"] = spacing
    return settings


def _reused_block(out_dir: Path, name: str, settings: dict) -> dict | None:
    path = out_dir / "cases" / f"{name}.json"
    if path.exists():
        cached = json.loads(path.read_text())
        if cached.get("settings") == settings:
            log.info("case %s: reusing %s (same settings)", name, path)
            return cached["block"]
    return None


def _run_in_workers(todo: list, out_dir: Path, jobs: int, result: dict) -> None:
    rank = {c: i for i, c in enumerate(CASE_COST_ORDER)}
    todo.sort(key=lambda t: rank.get(t[0], -1))
    with multiprocessing.get_context("spawn").Pool(min(jobs, len(todo))) as pool:
        for name in pool.imap_unordered(_run_case_job, [(nm, st, str(out_dir)) for nm, st in todo]):
            result["cases"][name] = json.loads((out_dir / "cases" / f"{name}.json").read_text())["block"]
            _write_json(out_dir / "gmm.json", {**result, "partial": True})
            log.info("case %s done", name)


def run_benchmark(out_dir, *, quick: bool = False, seeds=None, cases=None, methods=None, K: int = 30,
                  n: int | None = None, n_prop: int | None = None, command: str = "", jobs: int = 1,
                  n_logz: int = N_LOGZ, rtb_steps: int | None = None, rtb_hidden: int | None = None,
                  spacing: str = "uniform") -> dict:
    """Run the benchmark and write ``out_dir/gmm.json`` (atomically) and the figure(s).

    Each finished case is also written to ``out_dir/cases/<case>.json`` with the settings that made it;
    a rerun with the same settings reuses it (resume after an interruption). ``jobs > 1`` runs cases
    in that many worker processes (one torch thread each, see :mod:`pipeline.runtime`).
    ``rtb_steps`` / ``rtb_hidden``: RTB training steps and head width (None: the defaults of
    :func:`pipeline.bench.gmm_rtb.rtb_config`). ``spacing``: the chain's timestep grid, uniform or
    quadratic (:func:`pipeline.diffusion.chain_config.timestep_grid`), for every method and the reference.
    """
    refuse_retired_environment()
    out_dir = Path(out_dir)
    (out_dir / "cases").mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    cases = list(cases or (("2d",) if quick else FULL_CASES))
    seeds = list(seeds if seeds is not None else (range(3) if quick else range(10)))
    n = n or 2000
    result = {"benchmark": "gmm", "mode": "quick" if quick else "full", "command": command,
              "seeds": seeds, "torch_threads": torch.get_num_threads(), "jobs": jobs, "host": platform.node(),
              "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "cases": {}}
    todo = []
    for name in cases:
        settings = case_settings(name, quick=quick, seeds=seeds, K=K, n=n, n_prop=n_prop, n_logz=n_logz,
                                 methods=methods, rtb_steps=rtb_steps, rtb_hidden=rtb_hidden, spacing=spacing)
        block = _reused_block(out_dir, name, settings)
        if block is None:
            todo.append((name, settings))
        else:
            result["cases"][name] = block
    if jobs > 1 and len(todo) > 1:
        _run_in_workers(todo, out_dir, jobs, result)
    else:
        for name, settings in todo:
            result["cases"][name] = _run_one_case(name, settings, out_dir)
            _write_json(out_dir / "gmm.json", {**result, "partial": True})
    result["cases"] = {name: result["cases"][name] for name in cases}  # the requested order
    result["targets"] = targets(result["cases"])
    result["wall_seconds"] = time.perf_counter() - t_start
    _write_json(out_dir / "gmm.json", result)
    return result


def _write_json(path: Path, obj) -> None:
    write_json(path, obj, indent=1, default=_json_default)


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    return str(o)
