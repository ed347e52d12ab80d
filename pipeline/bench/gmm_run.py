"""One case of the GMM benchmark: tune the guided methods, draw the observations and references, run
every method on every seed and score it (:func:`run_case`, returning the case's JSON block).

A run is ``diverged`` when it ends with |log Z_IW - log Z_ref| > 1 nat or produces non-finite values
after 3 rollbacks; ``rollbacks`` and ``stopped_early`` (a loss spike after the 3 rollbacks: training
ends at the last good state) are recorded beside it. RTB's log Z_IW for that test comes from
``n_logz`` fresh trajectories (:data:`pipeline.bench.gmm_rtb.N_LOGZ`). Times in seconds.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline.bench.gmm_cases import GMMCase, analytic_logz, draw_observation
from pipeline.bench.gmm_reference import chain_reference
from pipeline.bench.gmm_rtb import N_LOGZ, run_rtb, sample_rtb, train_rtb, tune_rtb_guidance
from pipeline.bench.gmm_summary import figure, logz_fields, sample_metrics, summarise
from pipeline.diffusion.chain_config import timestep_grid
from pipeline.samplers import TRAINING_FREE, make_sampler, sampler_class
from pipeline.samplers.tuning import tune_on_separate_seed

log = logging.getLogger(__name__)

RTB_METHODS = (("rtb", "rtb", {}), ("rtb_amortized", "rtb_amortized", {}), ("rtb_dps", "rtb_dps", {}),
               ("rtb_dps_cla", "rtb_dps_cla", {}))
AMORTIZED_CONFIG_KEYS = ("K", "steps", "batch_size", "lr", "head_hidden", "learn_variance", "logz", "group_size")
RTB_CONFIG_KEYS = ("K", "steps", "batch_size", "lr", "head_hidden", "learn_variance", "replay_rate", "prior_rate",
                   "tempered_rate", "logz", "learn_guidance_gain", "guidance_gain_init", "lr_per_step")


@dataclass
class CaseRun:
    """What every method of one case shares: settings, the tuned scales, the amortized network."""

    case: GMMCase
    chain: object
    seeds: list
    quick: bool
    K: int
    n: int
    n_logz: int
    out_dir: Path | None
    rtb_options: dict                      # steps / hidden of train_rtb (None: the defaults)
    tuning: dict = field(default_factory=dict)
    obs_set: torch.Tensor | None = None
    amortized: tuple | None = None         # (posterior, trainer, cfg, cond_fn), trained on first use
    amortized_seconds: float = 0.0


def training_free_methods(quick: bool) -> list[tuple[str, str, dict]]:
    """(label, method, options) for the registry's training-free samplers that exist here."""
    out = []
    for m in (m for m in TRAINING_FREE if m != "inversion"):  # inversion: its own prior, not the case's
        try:
            sampler_class(m)
        except Exception:  # noqa: BLE001 - a method whose module is missing is skipped, and logged
            log.warning("sampler %s not available; skipped", m)
            continue
        if m == "fps_smc":
            for M in ((20,) if quick else (1, 5, 20, 100)):
                out.append((f"fps_smc_M{M}", m, {"particles": M}))
        elif m == "prior_is":
            out.append(("prior_is", m, {"particles": 10}))
        else:
            out.append((m, m, {}))
    return out


def tune_scales(case: GMMCase, chain, tf, wanted, tuning_seed: int) -> dict:
    """Guidance scales of DPS / DPS+CLA (ELBO objective: the scale that brings the sampler closest to the
    posterior) and of the guidance inside RTB+DPS(+CLA), each tuned on ``tuning_seed`` and frozen."""
    tuning = {}
    for label, m, _opts in tf:
        if m in ("dps", "dps_cla") and (wanted is None or label in wanted or f"rtb_{m}" in wanted):
            t0 = time.perf_counter()
            scale, rec = tune_on_separate_seed(m, case.prior, chain, case.problem, tuning_seed, n=256,
                                               objective="elbo")
            rec["seconds"] = time.perf_counter() - t0
            tuning[m] = rec
            log.info("[%s] tuned %s scale = %.4g on tuning seed %d", case.name, m, scale, tuning_seed)
    for m in ("rtb_dps", "rtb_dps_cla"):
        if wanted is None or m in wanted:
            t0 = time.perf_counter()
            rec = tune_rtb_guidance(case, chain, m[len("rtb_"):], tuning_seed)
            rec["seconds"] = time.perf_counter() - t0
            tuning[m] = rec
            log.info("[%s] tuned %s guidance scale = %.4g on tuning seed %d", case.name, m, rec["scale"],
                     tuning_seed)
    return tuning


def observation_set(case: GMMCase, observations: dict, seeds) -> torch.Tensor:
    """The amortized posterior's training set: every evaluated observation plus prior-predictive draws
    (64 in all)."""
    g_obs = torch.Generator().manual_seed(60_000)
    extra = case.problem.simulate(case.prior.sample(max(0, 64 - len(seeds)), generator=g_obs).float(),
                                  generator=g_obs)
    return torch.cat([torch.stack([observations[s_] for s_ in seeds]), extra])


def reference_record(run: CaseRun, y, seed: int, n_prop: int) -> tuple[dict, dict]:
    """(reference, its JSON record) of one seed's observation y."""
    case = run.case
    t0 = time.perf_counter()
    ref = chain_reference(case, run.chain, y, run.n, n_prop, seed)
    ref_seconds = time.perf_counter() - t0
    la = analytic_logz(case, y)
    rec = {"y": y.tolist(), "logz_ref": ref["logz_ref"], "ref_ess": ref["ref_ess"],
           "n_proposals": ref["n_proposals"], "proposal": ref["proposal"], "logz_analytic": la,
           "seconds": ref_seconds, "ess_ge_10N": ref["ref_ess"] >= 10 * run.n}
    log.info("[%s seed %d] y=%s logz_ref=%.4f (analytic %.4f) ref_ess=%.0f in %.1fs", case.name, seed,
             [round(v, 3) for v in y.tolist()], ref["logz_ref"], la, ref["ref_ess"], ref_seconds)
    return ref, rec


def _metrics_path(run: CaseRun, label: str, seed: int | None) -> Path | None:
    if run.out_dir is None:
        return None
    return run.out_dir / (f"rtb_metrics_{run.case.name}_{label}.jsonl" if seed is None
                          else f"rtb_metrics_{run.case.name}_{label}_{seed}.jsonl")


def _config_record(cfg, K: int, keys) -> dict:
    """The recorded RTB settings of a run: ``keys`` of the config's fields by name, and the chain's K."""
    flat = {**cfg.flat(), "K": K}
    return {k: flat[k] for k in keys}


def run_amortized(run: CaseRun, rec: dict, label: str, y, seed: int, logz_ref: float):
    """The amortized network (trained once per case, on the first seed) sampled at y."""
    if run.amortized is None:
        t_tr = time.perf_counter()
        run.amortized = train_rtb(run.case, run.chain, run.seeds[0], quick=run.quick, obs_set=run.obs_set,
                                  metrics_path=_metrics_path(run, label, None), **run.rtb_options)
        run.amortized_seconds = time.perf_counter() - t_tr
    post, trainer, cfg, cond_fn = run.amortized
    smp = sample_rtb(post, cfg, cond_fn, run.case, y, seed, run.n, "rtb_amortized")
    _, est_large = trainer.evaluate(n=max(run.n_logz, run.n), y=y)
    tol = cfg.guards.diverged_logz_tol
    div = trainer.diverged or not math.isfinite(est_large.iw) or abs(est_large.iw - logz_ref) > tol
    rec.update(diverged=bool(div), rollbacks=trainer.rollbacks, train_steps=trainer.step_idx,
               stopped_early=trainer.stopped_early, train_seconds_shared=run.amortized_seconds,
               n_observations=int(run.obs_set.shape[0]))
    rec["config"] = _config_record(cfg, run.K, AMORTIZED_CONFIG_KEYS)
    return smp, est_large


def run_single_rtb(run: CaseRun, rec: dict, label: str, m: str, y, seed: int, logz_ref: float):
    """Single-observation RTB (plain or guided) trained and sampled at y."""
    gname = {"rtb_dps": "dps", "rtb_dps_cla": "dps_cla"}.get(m, "none")
    gscale = run.tuning[m]["scale"] if gname != "none" else 1.0
    smp, trainer, cfg, est_large = run_rtb(run.case, run.chain, y, seed, quick=run.quick, n=run.n, logz_ref=logz_ref,
                                           metrics_path=_metrics_path(run, label, seed), guidance=gname,
                                           guidance_scale=gscale, n_logz=run.n_logz, **run.rtb_options)
    if gname != "none":
        rec["scale"] = gscale
    rec.update(diverged=trainer.diverged, rollbacks=trainer.rollbacks, train_steps=trainer.step_idx,
               stopped_early=trainer.stopped_early)
    rec["config"] = _config_record(cfg, run.K, RTB_CONFIG_KEYS)
    return smp, est_large


def run_training_free(run: CaseRun, rec: dict, m: str, opts: dict, y, seed: int):
    """A training-free sampler of the registry (DPS / DPS+CLA at their tuned scales) at y."""
    o = dict(opts)
    if m in run.tuning:
        o.update(scale=run.tuning[m]["scale"], tuning_record=run.tuning[m])
    smp = make_sampler(m, run.case.prior, run.chain, **o).sample(
        run.case.problem, y, run.n, generator=torch.Generator().manual_seed(40_000 + seed))
    rec.update(diverged=False, rollbacks=0)
    if m in run.tuning:
        rec["scale"] = run.tuning[m]["scale"]
    return smp, None


def score_run(run: CaseRun, rec: dict, smp, est_large, ref: dict, la: float, seed: int) -> torch.Tensor:
    """Fill ``rec`` with the distances, log Z fields and errors of one run; returns its equal-weight x0."""
    rec["nfe_per_sample"] = smp.nfe
    x0 = smp.x0
    if smp.log_w is not None and not torch.allclose(smp.log_w, torch.zeros_like(smp.log_w)):
        # weighted particles: resample to equal weights for the distances
        g = torch.Generator().manual_seed(50_000 + seed)
        x0 = x0[torch.multinomial(torch.softmax(smp.log_w.double(), 0).float(), run.n, True, generator=g)]
    rec.update(sample_metrics(run.case, x0, ref, la))
    rec.update(logz_fields(smp))
    if est_large is not None:  # RTB: the estimate that decides divergence (see N_LOGZ)
        rec.update(logz_iw_large=est_large.iw, ess_large=est_large.ess, n_logz=est_large.n,
                   err_logz_iw_large=abs(est_large.iw - rec["logz_ref"]))
    rec["excess_sw"] = rec["sw"] - rec["sw_floor"]
    if "sw_rowspace" in rec:
        rec["excess_sw_rowspace"] = rec["sw_rowspace"] - rec["sw_rowspace_floor"]
    rec["err_logz_iw"] = abs(rec["logz_iw"] - rec["logz_ref"]) if rec.get("logz_iw") is not None else None
    rec["err_logz_elbo"] = abs(rec["logz_elbo"] - rec["logz_ref"]) if rec.get("logz_elbo") is not None else None
    if not math.isfinite(rec["sw"]):
        rec["diverged"] = True
    log.info("[%s seed %d] %-14s sw=%.4f floor=%.4f tv=%.3f logz_iw=%s (ref %.4f) %.1fs", run.case.name, seed,
             rec["method"], rec["sw"], rec["sw_floor"], rec["mode_tv"],
             None if rec.get("logz_iw") is None else round(rec["logz_iw"], 4), rec["logz_ref"], rec["seconds"])
    return x0


def run_method(run: CaseRun, label: str, m: str, opts: dict, y, seed: int, ref: dict, la: float):
    """One method at one seed: (its JSON record, its equal-weight samples or None if it failed)."""
    t0 = time.perf_counter()
    rec = {"case": run.case.name, "method": label, "seed": seed, "K": run.K, "n_samples": run.n,
           "particles": opts.get("particles")}
    try:
        if m == "rtb_amortized":
            smp, est_large = run_amortized(run, rec, label, y, seed, ref["logz_ref"])
        elif m.startswith("rtb"):
            smp, est_large = run_single_rtb(run, rec, label, m, y, seed, ref["logz_ref"])
        else:
            smp, est_large = run_training_free(run, rec, m, opts, y, seed)
    except Exception as exc:  # noqa: BLE001 - a failing method is recorded, never dropped silently
        log.exception("[%s seed %d] %s failed", run.case.name, seed, label)
        rec.update(error=f"{type(exc).__name__}: {exc}", diverged=True, seconds=time.perf_counter() - t0)
        return rec, None
    rec["seconds"] = time.perf_counter() - t0
    return rec, score_run(run, rec, smp, est_large, ref, la, seed)


def case_chain(case: GMMCase, K: int, spacing: str = "uniform"):
    """The K-step chain of ``case``'s prior on the ``spacing`` timestep grid (uniform or quadratic)."""
    return case.prior.schedule.chain(K, timesteps=timestep_grid(case.prior.schedule.T, K, spacing))


def run_case(case: GMMCase, *, seeds, quick: bool, K: int, n: int, n_prop: int, methods=None,
             out_dir: Path | None = None, tuning_seed: int = 999, n_logz: int = N_LOGZ,
             rtb_steps: int | None = None, rtb_hidden: int | None = None, spacing: str = "uniform") -> dict:
    """All methods on one case over ``seeds``, on the K-step chain with the ``spacing`` timestep grid
    (:func:`pipeline.diffusion.chain_config.timestep_grid`). Returns the case's JSON block.

    ``rtb_steps`` / ``rtb_hidden``: RTB training steps and head width (None: the defaults of
    :func:`pipeline.bench.gmm_rtb.rtb_config`)."""
    chain = case_chain(case, K, spacing)
    tf = training_free_methods(quick)
    wanted = set(methods) if methods else None
    run = CaseRun(case, chain, list(seeds), quick, K, n, n_logz, out_dir,
                  rtb_options={"steps": rtb_steps, "hidden": rtb_hidden})
    run.tuning = tune_scales(case, chain, tf, wanted, tuning_seed)
    runs, refs, figure_samples = [], {}, {}
    observations = {seed: draw_observation(case, chain, seed)[0] for seed in seeds}
    run.obs_set = observation_set(case, observations, seeds)
    for seed in seeds:
        y = observations[seed]
        ref, refs[str(seed)] = reference_record(run, y, seed, n_prop)
        la = refs[str(seed)]["logz_analytic"]
        if seed == seeds[0]:
            figure_samples["reference"] = ref["ref1"]
        for label, m, opts in list(RTB_METHODS) + tf:
            if wanted is not None and label not in wanted and m not in wanted:
                continue
            rec, x0 = run_method(run, label, m, opts, y, seed, ref, la)
            runs.append(rec)
            if x0 is not None and seed == seeds[0]:
                figure_samples[label] = x0
    block = {"d_x": case.d_x, "d_y": case.d_y, "K": K, "spacing": spacing, "n_samples": n,
             "sigma_y": case.sigma_y, "references": refs, "tuning": run.tuning, "runs": runs, "summary": summarise(runs)}
    if out_dir is not None and case.d_x == 2:
        figure(case, figure_samples, out_dir / f"gmm_{case.name}.png")
        block["figure"] = f"gmm_{case.name}.png"
    return block
