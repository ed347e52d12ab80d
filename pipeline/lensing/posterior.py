"""Lensing posteriors: amortized RTB fine-tuning over the prior predictive, and sampling any method.

Section ``posterior:`` of the pipeline config (:class:`PosteriorConfig`) holds the lensing-specific
settings; the RTB optimisation settings are in ``rtb:`` (:class:`pipeline.rtb.config.RTBConfig`).

Amortized training data (the default, ``rtb_amortized``): each training observation is drawn from the
prior predictive - a truth from the trained prior's chain (the exact K-step chain RTB targets), a lens
from the configured ranges (a pool of ``n_lenses`` assembled sparse operators) and Gaussian noise at
the fixed noise level (independent of the truth, DESIGN 6). The network sees the observation through
source-plane features (:meth:`pipeline.lensing.amortized.MultiLensProblem.features`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipeline.diffusion.sampling import sample_prior
from pipeline.errors import ConfigError, InputFileError

log = logging.getLogger(__name__)


@dataclass
class PosteriorConfig:
    """Section ``posterior:``: amortized training set-up and sampling defaults for lensing."""

    n_lenses: int = field(default=32, metadata={"min": 1})        # pool of lens operators for training
    n_truths: int = field(default=256, metadata={"min": 1})       # pool of prior-chain truths for training
    n_samples: int = field(default=64, metadata={"min": 2})       # posterior samples per observation
    batch_size: int = field(default=64, metadata={"min": 1})      # sampling batch
    particles: int = field(default=8, metadata={"min": 1})  # per returned sample: prior_is, rtb_amortized_is
    # FPS-SMC (see fps_smc_options): `runs` = one independent run of fps_smc_particles per returned sample
    # (calibrated intervals); `weighted` = one run of n_samples weighted particles per observation
    fps_smc_mode: str = field(default="runs", metadata={"choices": ["runs", "weighted"]})
    fps_smc_particles: int = field(default=2, metadata={"min": 1})  # particles per run, runs mode only
    # grid per tuned method (DPS, DPS+CLA), searched on a separate seed; a method left out uses
    # pipeline.samplers.tuning.DEFAULT_GRIDS
    guidance_scales: dict = field(default_factory=lambda: {"dps": [0.001, 0.002, 0.005, 0.01, 0.02, 0.05],
                                                           "dps_cla": [0.5, 1.0, 1.5, 2.0, 3.0, 4.0]})
    # chi2 calibration (E[chi2] = m for exact posteriors): on lensing the ELBO favours vanishing DPS
    # guidance (each DPS kick costs path KL), which leaves DPS at the prior; see README
    tune_objective: str = field(default="chi2", metadata={"choices": ["chi2", "elbo", "log_r"]})
    tune_seed: int = field(default=987654, metadata={"min": 0})
    seed: int = field(default=0, metadata={"min": 0})
    device: str = field(default="auto", metadata={"choices": ["auto", "cpu", "cuda"]})


def resolve_noise_sigma(lcfg, sources_path) -> float:
    """The fixed noise level in SCI units: ``lensing.noise.sigma`` or the population rule of
    :func:`pipeline.lensing.simulate.typical_noise_sigma` on the TRAIN sources (never one truth)."""
    if lcfg.noise.sigma is not None:
        return float(lcfg.noise.sigma)
    from pipeline.lensing.simulate import typical_noise_sigma
    from pipeline.lensing.sources import read_sources

    if sources_path is None:
        raise ConfigError("<config>", "lensing.noise.sigma", "not set and no --sources file to derive it from")
    train, _ = read_sources(sources_path, "TRAIN")
    return typical_noise_sigma(train, lcfg.geometry, lcfg.lens, lcfg.noise.target_peak_snr)


def check_chain_matches(prior, rtb_cfg, config_path):
    """RTB targets the prior's chain, and the prior-drawn calibration set is drawn from it: one chain."""
    K, var = int(prior.meta.get("sample_K", rtb_cfg.K)), prior.meta.get("sample_variance", rtb_cfg.variance)
    if (rtb_cfg.K, rtb_cfg.variance) != (K, var):
        raise ConfigError(config_path, "rtb.K", f"rtb.K/variance ({rtb_cfg.K}, {rtb_cfg.variance}) must equal the "
                          f"prior's chain (prior.sample_K/sample_variance = {K}, {var})")
    return prior.schedule.chain(K, var)


def build_lens_pool(lcfg, sigma: float, n: int, seed: int, scale: float, offset: float, device):
    from pipeline.lensing.amortized import MultiLensProblem
    from pipeline.lensing.simulate import draw_lens, make_problem

    rng = np.random.default_rng(seed)
    t0 = time.time()
    probs = []
    for _ in range(n):
        p = make_problem(draw_lens(lcfg.lens, rng), lcfg.geometry, sigma=sigma, device=device)
        probs.append(p.set_brightness(scale, offset))
    log.info("assembled %d lens operators in %.1f s", n, time.time() - t0)
    return MultiLensProblem(probs)


def seed_run_dir(run_dir, init_from, prior=None) -> bool:
    """Start an empty run directory from a shipped trainer checkpoint (a ``step-N`` directory written
    by this command), so training resumes from it exactly; False if ``run_dir`` already has one."""
    from pipeline.io.checkpoint import has_checkpoints, load_checkpoint, save_checkpoint
    from pipeline.rtb.loading import check_prior_record

    if has_checkpoints(run_dir):
        return False
    ck = load_checkpoint(init_from, map_location="cpu")  # checksums verified here
    if ck.hparams.get("kind") != "rtb_posterior":
        raise InputFileError(init_from, "not an RTB posterior trainer checkpoint", field="kind")
    if prior is not None:
        check_prior_record(ck.path, ck.hparams, prior)
    target = save_checkpoint(run_dir, ck.step, ck.states, ck.hparams, ck.state, keep=None)
    log.info("run dir %s seeded from the shipped checkpoint %s (step %d)", run_dir, init_from, ck.step)
    return target.is_dir()


def warm_start_posterior(post, spec: dict, checkpoint) -> None:
    """Copy a trained posterior's network (and the per-step scalars it shares) into ``post``.

    For a NEW recipe that keeps the network (e.g. ``rtb.guided_variance`` switched on): the run starts
    at step 0 with a fresh optimizer from the given weights, instead of from zero. Refuses a checkpoint
    whose network differs (one line naming the file)."""
    from pipeline.io.checkpoint import load_checkpoint
    from pipeline.rtb.loading import check_prior_record

    ck = load_checkpoint(checkpoint, map_location="cpu")
    if ck.hparams.get("kind") != "rtb_posterior":
        raise InputFileError(checkpoint, "not an RTB posterior checkpoint", field="kind")
    check_prior_record(ck.path, ck.hparams, post.prior, post.chain.K, post.chain.variance)
    if ck.hparams["spec"]["model"] != spec["model"] or ck.hparams["spec"]["features"] != spec["features"]:
        raise InputFileError(checkpoint, "its network (spec model/features) differs from the rtb: config's",
                             field="spec")
    post.model.load_state_dict(ck.states["model"])
    shared = {n: v for n, v in (ck.states.get("per_step") or {}).items() if n in post.per_step_parameters()}
    with torch.no_grad():
        for n, v in shared.items():
            post.per_step_parameters()[n].copy_(v)
    log.info("warm start from %s (step %d): network%s", checkpoint, ck.step,
             f" and {sorted(shared)}" if shared else "")


def finetune(config_path, prior, run_dir, out_dir, *, sources_path=None, steps=None, init_from=None,
             warm_start=None) -> dict:
    """Amortized RTB over the prior predictive; resumes from ``run_dir`` (or starts it from the
    shipped checkpoint ``init_from``); exports to ``out_dir``."""
    from pipeline.config import load_section
    from pipeline.io.checkpoint import has_checkpoints, load_checkpoint, write_checkpoint_dir
    from pipeline.lensing.config import check_rtb_for_lensing, load_lensing_config
    from pipeline.rtb.config import RTBConfig
    from pipeline.rtb.posterior import build_posterior, posterior_spec
    from pipeline.rtb.trainer import RTBTrainer, seed_everything

    lcfg = load_lensing_config(config_path)
    pcfg = load_section(config_path, "posterior", PosteriorConfig)
    rcfg = load_section(config_path, "rtb", RTBConfig)
    check_rtb_for_lensing(rcfg, config_path)
    chain = check_chain_matches(prior, rcfg, config_path)
    device = prior.device
    sigma = resolve_noise_sigma(lcfg, sources_path)
    pool = build_lens_pool(lcfg, sigma, pcfg.n_lenses, pcfg.seed, prior.scale, prior.offset, device)
    truth_cache = []

    def draw_truths():
        # drawn on first use, so a resume of a finished run (make demo on the shipped checkpoint) skips it
        if not truth_cache:
            t0 = time.time()
            gen = torch.Generator().manual_seed(pcfg.seed)
            truth_cache.append(sample_prior(prior, chain, pcfg.n_truths, generator=gen, batch_size=pcfg.batch_size))
            log.info("drew %d prior-chain truths in %.1f s", pcfg.n_truths, time.time() - t0)
        return truth_cache[0]

    def obs_sampler(G, generator):
        truths = draw_truths()
        li = torch.randint(len(pool), (G,), generator=generator)
        ti = torch.randint(truths.shape[0], (G,), generator=generator)
        ys = [pool.simulate_packed(int(i), truths[int(j)][None], generator=generator)[0] for i, j in zip(li, ti)]
        return torch.stack(ys)

    spec = posterior_spec(prior, rcfg, cond_channels=2)
    seed_everything(rcfg.seed)  # the head's random layers: the same in every run from scratch
    post = build_posterior(prior, pool, spec)
    run_dir = Path(run_dir)
    if init_from is not None:
        seed_run_dir(run_dir, init_from, prior)
    if warm_start is not None and not has_checkpoints(run_dir):  # a resumed run keeps its own state
        warm_start_posterior(post, spec, warm_start)
    trainer = RTBTrainer(post, rcfg, obs_sampler=obs_sampler, cond_fn=pool.features, run_dir=run_dir,
                         metrics_path=run_dir / "metrics.jsonl", spec=spec)
    if trainer.resume():
        log.info("resuming fine-tuning at step %d", trainer.step_idx)
    t0 = time.time()
    summary = trainer.train(steps)
    summary["seconds"] = time.time() - t0
    trainer.save()
    if trainer.diverged:
        log.error("RTB fine-tuning diverged after %d rollbacks; exporting anyway, flagged", trainer.rollbacks)
    ck = load_checkpoint(run_dir)
    hp = dict(ck.hparams)
    hp["lensing"] = {"noise_sigma": sigma, "geometry": vars(lcfg.geometry), "lens_ranges": vars(lcfg.lens),
                     "n_lenses": pcfg.n_lenses, "n_truths": pcfg.n_truths}
    hp["prior_checkpoint"] = str(prior.meta.get("checkpoint"))
    states = {k: v for k, v in ck.states.items() if k in ("model", "ema", "per_step")}  # per_step: learned gains
    write_checkpoint_dir(out_dir, states, hp, {**ck.state, "summary": summary})
    return summary


def tune_rtb_guidance(config_path, prior, *, sources_path=None, n_obs: int = 4, n: int = 32, grid=None) -> dict:
    """The scale for ``rtb.guidance`` (DPS / DPS+CLA inside the amortized posterior), by the untrained ELBO.

    The posterior built from the config's ``rtb:`` section starts with a zero correction, so it IS the
    guided chain; its mean ELBO over ``n_obs`` prior-predictive observations (lenses and truths drawn
    from ``posterior.tune_seed``, apart from every trained and evaluated set) ranks the scales
    (:mod:`pipeline.rtb.tuning`). Returns the tuning record; write its ``scale`` into ``rtb.guidance_scale``.
    """
    from pipeline.config import load_section
    from pipeline.lensing.amortized import MultiLensProblem
    from pipeline.lensing.config import load_lensing_config
    from pipeline.lensing.simulate import draw_lens, make_problem
    from pipeline.rtb.config import RTBConfig
    from pipeline.rtb.posterior import build_posterior, posterior_spec
    from pipeline.rtb.tuning import GUIDANCE_GRIDS, best_by_elbo, trajectory_elbo

    lcfg = load_lensing_config(config_path)
    pcfg = load_section(config_path, "posterior", PosteriorConfig)
    rcfg = load_section(config_path, "rtb", RTBConfig)
    if rcfg.guidance == "none":
        raise ConfigError(config_path, "rtb.guidance", "is 'none': there is no guidance scale to tune")
    chain = check_chain_matches(prior, rcfg, config_path)
    sigma = resolve_noise_sigma(lcfg, sources_path)
    rng = np.random.default_rng(pcfg.tune_seed)
    gen = torch.Generator().manual_seed(pcfg.tune_seed)
    singles, ys = [], []
    for _ in range(n_obs):
        p = make_problem(draw_lens(lcfg.lens, rng), lcfg.geometry, sigma=sigma, device=prior.device)
        p.set_brightness(prior.scale, prior.offset)
        truth = sample_prior(prior, chain, 1, generator=gen)
        ys.append(p.simulate(truth, generator=gen)[0])
        singles.append(MultiLensProblem([p]))
    grid = list(grid if grid is not None else GUIDANCE_GRIDS[rcfg.guidance])

    def elbos(scale):
        rcfg.guidance_scale = float(scale)
        out = []
        for single, y in zip(singles, ys):
            post = build_posterior(prior, single, posterior_spec(prior, rcfg, cond_channels=2))
            out.append(trajectory_elbo(rtb_amortized_samples(post, single, y, n,
                                                             torch.Generator().manual_seed(pcfg.tune_seed), n)))
        log.info("rtb_%s guidance scale %.3g: mean untrained ELBO %.1f", rcfg.guidance, scale, sum(out) / len(out))
        return out

    return {"method": f"rtb_{rcfg.guidance}", **best_by_elbo(grid, elbos), "n": n, "n_obs": n_obs, "K": chain.K,
            "tuning_seed": pcfg.tune_seed}


def load_amortized(posterior_dir, prior, problem):
    """Load the exported amortized posterior for ONE observation's problem.

    Returns (posterior, MultiLensProblem of that one lens, hparams)."""
    from pipeline.lensing.amortized import MultiLensProblem
    from pipeline.rtb.loading import load_posterior

    single = MultiLensProblem([problem])
    post, hp = load_posterior(posterior_dir, prior, single)
    return post, single, hp


def check_in_trained_range(meta_lens, hp, path):
    """Warn when an observation's lens falls outside the ranges the amortized posterior saw."""
    ranges = (hp.get("lensing") or {}).get("lens_ranges") or {}
    for key, attr in (("rein", "rein"), ("q", "q")):
        lo_hi = ranges.get(key)
        if lo_hi is None:
            continue
        v = getattr(meta_lens, attr, None)
        if v is not None and not (lo_hi[0] - 1e-9 <= v <= lo_hi[1] + 1e-9):
            log.warning("%s: lens %s=%.3f outside the trained range %s: the amortized posterior may be "
                        "unreliable", path, key, v, list(lo_hi))


# ------------------------------------------------------------------------------------ sampling
def resample_within_groups(log_w: torch.Tensor, n: int, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampling importance resampling in ``n`` independent groups (rows of ``log_w.reshape(n, -1)``).

    Each group's weights are normalised on their own and one member is drawn from them, so the ``n``
    returned indices (into the flat ``log_w``) are independent draws, each from its own group's SIR
    approximation of the target, and never duplicates of one heavy particle across groups. Returns
    (indices (n,), weights normalised within each group (n, m), float64)."""
    lw = log_w.detach().double().cpu().reshape(n, -1)
    if not torch.isfinite(lw).any(1).all():
        raise ValueError("a group of importance weights has no finite member")
    w = torch.softmax(lw, 1)
    pick = torch.multinomial(w, 1, generator=generator)[:, 0]
    return torch.arange(n) * lw.shape[1] + pick, w


def rtb_amortized_samples(post, single, y, n, generator, batch_size, last_step=None):
    """Posterior samples of the amortized RTB network for one observation (network units); ``last_step``
    optionally replaces the step x_2 -> x_1 (see :func:`gauss_newton_last_step`)."""
    from pipeline.rtb.objective import policy_rollout
    from pipeline.samplers.base import Samples

    post.problem = single
    post.eval()
    yp = single.pack(0, y)
    cond = single.features(yp[None])[0]
    x0, lr, lq, lp = [], [], [], []
    for s in range(0, n, batch_size):
        m = min(batch_size, n - s)
        # cond is one (C, H, W) map: expand it here, since a batch of m = C trajectories would make
        # the rollout take its first axis for the batch
        b = policy_rollout(post, m, yp, cond.unsqueeze(0).expand(m, *cond.shape), generator=generator,
                           last_step=last_step)
        x0.append(b.x0)
        lr.append(b.log_r)
        lq.append(b.log_q())
        lp.append(b.log_p())
    K = post.chain.K
    return Samples(x0=torch.cat(x0), log_r=torch.cat(lr), log_q_traj=torch.cat(lq), log_p_traj=torch.cat(lp),
                   nfe=2 * K)  # prior eps + correction head per step


# Gauss-Newton iterations of the twisted last step (rtb_amortized_gn): the second linearisation, at the first
# one's mean, is what brought the ELBO above the policy's own last step on the shipped posterior (README)
GN_ITERATIONS = 2


def gauss_newton_last_step(post, problem, y):
    """The twisted last step of ``rtb_amortized_gn`` for one observation (:mod:`pipeline.rtb.twisted_step`)."""
    from pipeline.rtb.twisted_step import GaussNewtonLastStep

    return GaussNewtonLastStep(post.prior, post.chain, problem, y, iterations=GN_ITERATIONS)


def tune_guidance_scale(method, prior, chain, lcfg, pcfg, sigma, device, n_obs: int = 4, n: int = 32) -> dict:
    """Tune the heuristic DPS / DPS+CLA scale on a SEPARATE seed (:mod:`pipeline.samplers.tuning`,
    objective ``posterior.tune_objective``): tuning observations from the prior predictive under a lens drawn from
    ``posterior.tune_seed``, none of them in an evaluated set. The frozen scale and its record go into
    every posterior file's provenance."""
    from pipeline.lensing.simulate import draw_lens, make_problem
    from pipeline.samplers.tuning import tune_on_separate_seed

    rng = np.random.default_rng(pcfg.tune_seed)
    problem = make_problem(draw_lens(lcfg.lens, rng), lcfg.geometry, sigma=sigma, device=device)
    problem.set_brightness(prior.scale, prior.offset)
    scale, record = tune_on_separate_seed(method, prior, chain, problem, pcfg.tune_seed, n_obs=n_obs,
                                          grid=pcfg.guidance_scales.get(method), n=n, seed=pcfg.tune_seed,
                                          refine=False, sampler_opts={"device": device},
                                          objective=pcfg.tune_objective)
    log.info("%s: tuned scale %.3g on seed %d (%s)", method, scale, pcfg.tune_seed, record.get("objective"))
    return record


def fps_smc_options(pcfg: PosteriorConfig, n: int) -> dict:
    """FPS-SMC sampler options for ``n`` returned samples per observation (``posterior.fps_smc_*``).

    ``runs`` (default): ``n`` independent runs of ``fps_smc_particles`` particles each, one sample drawn per
    run, so the samples are independent and their per-pixel intervals calibrated. Cost: n x particles
    trajectories, ``batch_size`` trajectories per network call (on CPU the demo prior costs ~1.5x more per
    trajectory in calls of 256 than in calls of 64, so batching beyond that is no cheaper).
    ``weighted``: one run of ``n`` shared particles per observation (PARTICLES + WEIGHTS in the posterior
    file when the final weights differ; SAMPLES are resampled from them): one run's weighted-particle
    approximation, a cheap posterior mean at n trajectories. Resampling makes its particles share ancestors,
    so intervals from it are too narrow (linear-Gaussian toy, n = 32: 68 / 95 % coverage 0.57 / 0.80,
    against 0.72 / 0.95 for runs with 2 particles and 0.71 / 0.94 for exact samples).
    """
    if pcfg.fps_smc_mode == "weighted":
        return {"particles": int(n), "mode": "weighted"}
    return {"particles": pcfg.fps_smc_particles, "mode": "runs", "batch_size": pcfg.batch_size}


def observation_files(specs) -> list[Path]:
    files: list[Path] = []
    for spec in specs:
        p = Path(spec)
        if p.is_dir():
            files += sorted(f for f in p.glob("*.fits"))
        elif p.is_file():
            files.append(p)
        else:
            raise InputFileError(p, "observation file or directory not found", field="--obs")
    if not files:
        raise InputFileError(specs[0] if specs else "--obs", "no observation FITS files found", field="--obs")
    return files


def sample_observations(config_path, method, prior_dir, posterior_dir, obs_specs, out_dir=None, *, out_file=None,
                        png=None, n=None, seed=None) -> list[dict]:
    """Sample ``method``'s posterior for every observation; one posterior FITS per observation.

    Imports, models and the tuned guidance scale are set up once for all observations.
    """
    import pipeline
    from pipeline.config import config_hash, load_section, load_yaml
    from pipeline.diffusion.network_prior import load_prior
    from pipeline.io.posterior import write_posterior
    from pipeline.lensing.config import BrightnessConfig, load_lensing_config
    from pipeline.lensing.observation import load_observation
    from pipeline.metrics.chi2 import chi2_per_sample
    from pipeline.metrics.logz import estimate_logz_samples
    from pipeline.runtime import choose_device
    from pipeline.samplers import AMORTIZED_METHODS, PARTICLE_METHODS, RTB_METHODS, make_sampler

    lcfg = load_lensing_config(config_path)
    pcfg = load_section(config_path, "posterior", PosteriorConfig)
    device = choose_device(pcfg.device)
    prior = load_prior(prior_dir, device=device)
    K, var = int(prior.meta.get("sample_K", 50)), prior.meta.get("sample_variance", "small")
    chain = prior.schedule.chain(K, var)
    n = n or pcfg.n_samples
    seed = pcfg.seed if seed is None else seed
    files = observation_files(obs_specs)
    brightness = BrightnessConfig(scale=prior.scale, offset=prior.offset)
    provenance = {"version": pipeline.__version__, "seed": seed, "config_hash": config_hash(load_yaml(config_path)),
                  "prior": str(prior_dir), "K": K, "variance": var}

    post = tuning = sampler = None
    if method in RTB_METHODS:
        if method not in AMORTIZED_METHODS:
            raise ConfigError(config_path, "methods", f"lensing samples the amortized RTB posterior "
                              f"({', '.join(AMORTIZED_METHODS)}); '{method}' needs one fine-tuning per "
                              f"observation")
        if posterior_dir is None:
            raise InputFileError("--posterior", f"{method} needs the fine-tuned posterior directory")
        provenance["posterior"] = str(posterior_dir)
        if method == "rtb_amortized_is":
            provenance["options"] = {"particles": pcfg.particles}
        if method == "rtb_amortized_gn":
            provenance["options"] = {"last_step": "gauss_newton", "iterations": GN_ITERATIONS}
    else:
        opts = {"device": device}
        if method in ("dps", "dps_cla"):
            sigma_ref = float(load_observation(files[0], lcfg, device=device, brightness=brightness)[0].sigma.max())
            tuning = tune_guidance_scale(method, prior, chain, lcfg, pcfg, sigma_ref, device)
            opts["scale"] = tuning["scale"]
        if method == "fps_smc":
            opts.update(fps_smc_options(pcfg, n))
        if method == "prior_is":
            opts["particles"] = pcfg.particles
        sampler = make_sampler(method, prior, chain, **opts)
        provenance["options"] = {k: v for k, v in opts.items() if k != "device"}
    if tuning:
        provenance["tuning"] = tuning

    results = []
    for i, path in enumerate(files):
        problem, y, meta = load_observation(path, lcfg, device=device, brightness=brightness)
        gen = torch.Generator().manual_seed(seed * 100003 + i)
        t0 = time.time()
        group_idx = None
        if method in AMORTIZED_METHODS:
            if post is None:
                post, single, hp = load_amortized(posterior_dir, prior, problem)
            from pipeline.lensing.amortized import MultiLensProblem
            check_in_trained_range(meta.get("lens"), hp, path)
            m = pcfg.particles if method == "rtb_amortized_is" else 1
            step = gauss_newton_last_step(post, problem, y) if method == "rtb_amortized_gn" else None
            smp = rtb_amortized_samples(post, MultiLensProblem([problem]), y, n * m, gen, pcfg.batch_size,
                                        last_step=step)
            if method == "rtb_amortized_is":
                group_idx, group_w = resample_within_groups(smp.log_r + smp.log_p_traj - smp.log_q_traj, n, gen)
        else:
            smp = sampler.sample(problem, y, n, generator=gen)
        seconds = time.time() - t0
        n_out = smp.x0.shape[0]
        x_net = smp.x0.reshape(n_out, *problem.x_shape)
        x_phys = prior.to_physical(x_net).reshape(n_out, *problem.x_shape[-2:])
        particles = weights = None
        if group_idx is not None:
            # every trajectory is kept as a particle, weighted within its group (1/n per group), and
            # SAMPLES holds the one drawn from each group
            particles, weights = x_phys.cpu().numpy(), (group_w / n).reshape(-1).cpu().numpy()
            x_net, x_phys = x_net[group_idx.to(x_net.device)], x_phys[group_idx.to(x_phys.device)]
        elif smp.log_w is not None and float(smp.log_w.max() - smp.log_w.min()) > 0:
            # weighted particles: keep them, and resample equally weighted SAMPLES from them
            w = torch.softmax(smp.log_w.double(), 0)
            particles, weights = x_phys.cpu().numpy(), w.cpu().numpy()
            idx = torch.multinomial(w.float().cpu(), n, replacement=True, generator=gen)
            x_net, x_phys = x_net[idx.to(x_net.device)], x_phys[idx.to(x_phys.device)]
        logz = None
        if method == "prior_is" and smp.info.get("logz_iw") is not None:
            # one observation per call, so the sampler's estimate over all its n*M prior-chain
            # proposals is this observation's log Z; the ELBO is the prior proposal's (mean log r)
            logz = {"elbo": smp.info.get("prior_elbo"), "elbo_se": smp.info.get("prior_elbo_se"),
                    "iw": smp.info["logz_iw"]}
        elif method not in PARTICLE_METHODS:
            try:
                est = estimate_logz_samples(smp)
                logz = {"elbo": est.elbo, "elbo_se": est.elbo_se, "iw": est.iw}
            except ValueError:
                logz = None
        chi = chi2_per_sample(problem, x_net, y)
        truth = meta.get("truth")
        name = path.stem
        target = Path(out_file) if out_file else Path(out_dir) / f"{name}.fits"
        write_posterior(target, x_phys.cpu().numpy(), truth=truth, obs=y.cpu().numpy(), logz=logz,
                        particles=particles, weights=weights,
                        chi2=chi["chi2_nu"], src_pixscale=lcfg.geometry.source_pixscale, method=method,
                        provenance=provenance, seconds=seconds, obs_file=str(path),
                        obs_pixscale=meta.get("pixscale"), bunit=lcfg.sources.bunit)
        results.append({"obs": str(path), "out": str(target), "seconds": seconds, "logz": logz,
                        "chi2_median": float(np.median(chi["chi2_nu"]))})
        log.info("%s %s: %.1f s, chi2_nu median %.3f, log Z %s", method, name, seconds,
                 results[-1]["chi2_median"], None if logz is None else round(logz["elbo"], 2))
        if png:
            from pipeline.plots.lens import plot_posterior_file

            plot_posterior_file(target, png, obs_pixscale=meta.get("pixscale"))
    return results


def _seeded_observation(lcfg, prior, chain, rng, gen, noise_sigma):
    """One prior-predictive observation: a lens from ``rng``, a prior-chain truth and noise from ``gen``."""
    from pipeline.lensing.simulate import draw_lens, make_problem

    problem = make_problem(draw_lens(lcfg.lens, rng), lcfg.geometry, sigma=noise_sigma, device=prior.device)
    problem.set_brightness(prior.scale, prior.offset)
    truth = sample_prior(prior, chain, 1, generator=gen)
    return problem, truth, problem.simulate(truth, generator=gen)[0]


def evaluate_shipped_posterior(config_path, prior, checkpoint, *, seed: int = 0, n: int = 16,
                               noise_sigma: float) -> dict:
    """A fixed, seeded check of a posterior checkpoint: one prior-predictive observation (lens and truth
    from ``seed``), ``n`` amortized samples, their median chi2_nu and mean log r. Used to record and
    re-check the metrics of the checkpoints shipped under data/pretrained/."""
    rec = check_posterior(config_path, prior, checkpoint, n_obs=1, n=n, seed=seed, noise_sigma=noise_sigma)
    per = rec["per_observation"]
    return {"chi2_nu_median": per["chi2_nu"][0], "mean_log_r": per["mean_log_r"][0],
            "seed": seed, "n": n, "noise_sigma": noise_sigma}


def check_posterior(config_path, prior, checkpoint, *, n_obs: int = 16, n: int = 32, seed: int = 42,
                    noise_sigma: float | None = None, last_step: str = "policy") -> dict:
    """Seeded fit check of an amortized posterior on ``n_obs`` prior-predictive observations (lenses,
    truths and noise from ``seed``; the same set for every checkpoint): per observation the median over
    ``n`` samples of chi2_nu over the image and inside the arc, the mean log r, the ELBO, and the median
    per-pixel posterior std (physical units); and the medians of those over observations. Beside them,
    the truth's own chi2_nu over the image and inside its arc: exact posterior samples are exchangeable
    with the truth given y, so their chi2 should match these, not 1 exactly. Used to compare training
    stages (data/pretrained/README.md); not a calibration (that is ``calibrate``). ``last_step``:
    ``policy`` (the network's own) or ``gauss_newton`` (the twisted step of ``rtb_amortized_gn``)."""
    from pipeline.io.checkpoint import load_checkpoint
    from pipeline.lensing.amortized import MultiLensProblem
    from pipeline.lensing.config import load_lensing_config
    from pipeline.metrics.chi2 import chi2_per_sample

    if n_obs < 1 or n < 2:
        raise ValueError(f"check_posterior needs n_obs >= 1 and n >= 2 samples (got {n_obs}, {n})")
    if last_step not in ("policy", "gauss_newton"):
        raise ValueError(f"last_step must be 'policy' or 'gauss_newton', got {last_step!r}")
    if noise_sigma is None:  # an exported posterior records the noise level it was trained with
        hp = load_checkpoint(checkpoint, names=[]).hparams
        if "lensing" not in hp:
            raise InputFileError(checkpoint, "records no noise level (a trainer checkpoint, not an export): "
                                             "pass --noise-sigma", field="lensing.noise_sigma")
        noise_sigma = float(hp["lensing"]["noise_sigma"])
    lcfg = load_lensing_config(config_path)
    chain = prior.schedule.chain(int(prior.meta["sample_K"]), prior.meta["sample_variance"])
    rng, gen = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    rows = {"chi2_nu": [], "chi2_arc_nu": [], "mean_log_r": [], "elbo": [], "std": [],
            "truth_chi2_nu": [], "truth_chi2_arc_nu": []}
    post = None
    for _ in range(n_obs):
        problem, truth, y = _seeded_observation(lcfg, prior, chain, rng, gen, noise_sigma)
        if post is None:  # loaded once; each observation brings its own lens
            post, _, _ = load_amortized(checkpoint, prior, problem)
        step = gauss_newton_last_step(post, problem, y) if last_step == "gauss_newton" else None
        smp = rtb_amortized_samples(post, MultiLensProblem([problem]), y, n, gen, n, last_step=step)
        chi = chi2_per_sample(problem, smp.x0, y)
        rows["chi2_nu"].append(float(np.median(chi["chi2_nu"])))
        rows["chi2_arc_nu"].append(float(np.nanmedian(chi["chi2_arc_nu"])))
        rows["mean_log_r"].append(float(smp.log_r.mean()))
        rows["elbo"].append(float((smp.log_r + smp.log_p_traj - smp.log_q_traj).double().mean()))
        rows["std"].append(float(prior.to_physical(smp.x0).reshape(n, -1).std(0).median()))
        chi_t = chi2_per_sample(problem, truth.reshape(1, *smp.x0.shape[1:]).to(smp.x0), y)
        rows["truth_chi2_nu"].append(float(chi_t["chi2_nu"][0]))
        rows["truth_chi2_arc_nu"].append(float(chi_t["chi2_arc_nu"][0]))
    return {"posterior": str(checkpoint), "last_step": last_step, "n_obs": n_obs, "n_samples": n, "seed": seed,
            "noise_sigma": noise_sigma,
            **{f"{k}_median": float(np.median(v)) for k, v in rows.items()}, "per_observation": rows}
