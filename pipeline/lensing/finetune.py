"""Lensing posteriors, fine-tuning: amortized RTB over the prior predictive.

Section ``posterior:`` of the pipeline config (:class:`pipeline.lensing.config.PosteriorConfig`) holds
the lensing-specific settings; the RTB optimisation settings are in ``rtb:``
(:class:`pipeline.rtb.config.RTBConfig`).

Amortized training data (the default, ``rtb_amortized``): each training observation is drawn from the
prior predictive - a truth from the trained prior's chain (the exact K-step chain RTB targets), a lens
from the configured ranges (a pool of ``n_lenses`` assembled sparse operators) and Gaussian noise at
the fixed noise level (independent of the truth). The network sees the observation through
source-plane features (:func:`pipeline.lensing.amortized.lens_features`); each observation's lens
travels with it as a lens index into the pool (:meth:`pipeline.lensing.amortized.MultiLensProblem.take`).
The export records what the pool covered (``trained_on``, :mod:`pipeline.lensing.guard`).
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.config import load_section
from pipeline.diffusion.schedule import load_chain
from pipeline.diffusion.sampling import sample_prior
from pipeline.errors import ConfigError, InputFileError
from pipeline.io.atomic import atomic_file
from pipeline.io.checkpoint import has_checkpoints, load_checkpoint, save_checkpoint, write_checkpoint_dir
from pipeline.lensing.amortized import MultiLensProblem, amortized_sampler, lens_features
from pipeline.lensing.config import PosteriorConfig, check_rtb_for_lensing, load_lensing_config
from pipeline.lensing.guard import measure_trained_conditions
from pipeline.lensing.simulate import draw_lens, make_problem, typical_noise_sigma
from pipeline.lensing.sources import read_sources
from pipeline.lensing.tuning import prior_predictive_observation
from pipeline.rtb.config import RTBConfig
from pipeline.rtb.loading import check_prior_record
from pipeline.rtb.posterior import build_posterior, posterior_spec
from pipeline.rtb.trainer import RTBTrainer
from pipeline.rtb.tuning import UNTRAINED_ELBO, guidance_grid
from pipeline.runtime import seed_everything
from pipeline.samplers.tuning import tune_scale

log = logging.getLogger(__name__)

RECORD_TRUTHS = 256  # truths measured for the trained conditions when the run drew none
TRUTHS_FILE = "truths.pt"  # the run's prior-chain truths, kept in its run directory for the resumes


def resolve_noise_sigma(lcfg, sources_path) -> float:
    """The fixed noise level in SCI units: ``lensing.noise.sigma`` or the population rule of
    :func:`pipeline.lensing.simulate.typical_noise_sigma` on the TRAIN sources (never one truth)."""
    if lcfg.noise.sigma is not None:
        return float(lcfg.noise.sigma)

    if sources_path is None:
        raise ConfigError("<config>", "lensing.noise.sigma", "not set and no --sources file to derive it from")
    train, _ = read_sources(sources_path, "TRAIN")
    return typical_noise_sigma(train, lcfg.geometry, lcfg.lens, lcfg.noise.target_peak_snr)


def build_lens_pool(lcfg, sigma: float, n: int, seed: int, scale: float, offset: float, device,
                    shear: str = "reject"):
    """``n`` lenses drawn from the lens prior with ``seed`` (shear rule ``shear``, see
    :func:`pool_shear_rule`), each assembled into its operator."""
    rng = np.random.default_rng(seed)
    t0 = time.time()
    probs = []
    for _ in range(n):
        p = make_problem(draw_lens(lcfg.lens, rng, shear=shear), lcfg.geometry, sigma=sigma, device=device)
        probs.append(p.set_brightness(scale, offset))
    log.info("assembled %d lens operators in %.1f s", n, time.time() - t0)
    return MultiLensProblem(probs)


class LazyPool:
    """A lens pool assembled on first use (``build()`` returns the
    :class:`~pipeline.lensing.amortized.MultiLensProblem`): resuming a finished run, as ``make demo`` does
    with the shipped checkpoint, trains no step and needs no operator, so it skips their assembly (about
    20 s for 512 lenses on a CPU)."""

    def __init__(self, build, y_shape: tuple[int, int]):
        self._build, self._pool, self.y_shape = build, None, tuple(y_shape)  # (ny, nx) image pixels

    @property
    def built(self) -> bool:
        return self._pool is not None

    def get(self):
        if self._pool is None:
            self._pool = self._build()
        return self._pool

    def __len__(self) -> int:
        return len(self.get())

    def __getattr__(self, name):  # only reached for attributes this wrapper lacks: the pool's
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.get(), name)


def pool_shear_rule(run_dir) -> str:
    """How the lens pool's shears are drawn: ``"reject"`` (the lens prior's density) for a new run; a run
    resumed from a checkpoint keeps the rule it recorded, and one written before the rule was recorded
    drew with ``"rescale"``, so its replay buffer's lens indices keep pointing at the same lenses."""
    if not has_checkpoints(run_dir):
        return "reject"
    return load_checkpoint(run_dir, names=[]).hparams.get("lens_pool", {}).get("shear", "rescale")


def seed_run_dir(run_dir, init_from, prior=None) -> bool:
    """Start an empty run directory from a shipped trainer checkpoint (a ``step-N`` directory written
    by this command), so training resumes from it exactly; False if ``run_dir`` already has one."""
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

    For a NEW recipe that keeps the network (e.g. ``rtb.policy.learn_guidance_gain`` switched on): the run starts
    at step 0 with a fresh optimizer from the given weights, instead of from zero. Refuses a checkpoint
    whose network differs (one line naming the file)."""
    ck = load_checkpoint(checkpoint, map_location="cpu")
    if ck.hparams.get("kind") != "rtb_posterior":
        raise InputFileError(checkpoint, "not an RTB posterior checkpoint", field="kind")
    check_prior_record(ck.path, ck.hparams, post.prior, post.chain)
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


def record_truths(prior, chain, pcfg):
    """The first ``RECORD_TRUTHS`` of the pool's prior-chain truths (same seed and batches), drawn to
    measure the trained conditions of a run that drew none (no step left to train) and records none."""
    gen = torch.Generator().manual_seed(pcfg.seed)
    return sample_prior(prior, chain, min(pcfg.n_truths, RECORD_TRUTHS), generator=gen, batch_size=pcfg.batch_size)


def weights_digest(module: torch.nn.Module) -> str:
    """SHA-256 of a network's parameters and buffers (names, shapes, dtypes and values)."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()


def truths_key(prior, chain, pcfg) -> dict:
    """What fixes a run's prior-chain truths: the prior (recipe hash and the digest of its weights: the same
    recipe trained longer draws other truths), the chain, the count, seed and batch size (the generator's
    draws depend on the batching)."""
    meta = getattr(prior, "meta", None) or {}
    return {"prior": meta.get("config_hash"), "weights": weights_digest(prior.net), "K": chain.K,
            "variance": str(chain.variance), "timesteps": [float(t) for t in chain.t.tolist()],
            "n_truths": pcfg.n_truths, "seed": pcfg.seed, "batch_size": pcfg.batch_size}


def cached_truths(path, prior, chain, pcfg) -> torch.Tensor:
    """The run's ``n_truths`` prior-chain truths (seed ``posterior.seed``): read from ``path`` when it
    holds the same draw (:func:`truths_key`), else drawn and written there atomically, so a resumed run
    does not draw them again (4,096 at 32x32 take 10-19 min on the 2-core CPU). A prior not loaded from
    a checkpoint (no recipe hash) is never cached."""
    path = Path(path)
    key = truths_key(prior, chain, pcfg)
    cacheable = key["prior"] is not None
    if cacheable and path.is_file():
        try:
            rec = torch.load(path, map_location="cpu", weights_only=True)
            if not (isinstance(rec, dict) and isinstance(rec.get("truths"), torch.Tensor)):
                raise ValueError("not a truth cache")
        except Exception as err:  # a damaged cache is redrawn, never trusted
            log.warning("%s: unreadable truth cache (%s); drawing the truths again", path, err)
        else:
            if rec.get("key") == key and rec["truths"].shape[0] == pcfg.n_truths:
                log.info("read %d prior-chain truths from %s", rec["truths"].shape[0], path)
                return rec["truths"].to(prior.device)
            log.info("%s holds another draw (prior, chain, count or seed differ); drawing the truths again", path)
    t0 = time.time()
    gen = torch.Generator().manual_seed(pcfg.seed)
    truths = sample_prior(prior, chain, pcfg.n_truths, generator=gen, batch_size=pcfg.batch_size)
    log.info("drew %d prior-chain truths in %.1f s", pcfg.n_truths, time.time() - t0)
    if cacheable:
        with atomic_file(path) as tmp:
            torch.save({"key": key, "truths": truths.detach().cpu()}, tmp)
    return truths


def finetune(config_path, prior, run_dir, out_dir, *, sources_path=None, steps=None, init_from=None,
             warm_start=None) -> dict:
    """Amortized RTB over the prior predictive; resumes from ``run_dir`` (or starts it from the
    shipped checkpoint ``init_from``); exports to ``out_dir``."""
    lcfg = load_lensing_config(config_path)
    pcfg = load_section(config_path, "posterior", PosteriorConfig)
    rcfg = load_section(config_path, "rtb", RTBConfig)
    check_rtb_for_lensing(rcfg, config_path)
    chain = load_chain(config_path, prior)  # the chain RTB targets and the prior-drawn set is drawn from
    device = prior.device
    sigma = resolve_noise_sigma(lcfg, sources_path)
    run_dir = Path(run_dir)
    if init_from is not None:
        seed_run_dir(run_dir, init_from, prior)
    done = load_checkpoint(run_dir, names=[]).step if has_checkpoints(run_dir) else 0
    total = rcfg.run.steps if steps is None else steps
    if not rcfg.policy.use_head and done < total:
        raise ConfigError(config_path, "rtb.policy.use_head", f"false, but {done} of {total} steps are trained: "
                          "the head would not be sampled; set it to true to train one (or posterior_checkpoint to "
                          "a finished run)")
    shear = pool_shear_rule(run_dir)
    pool = LazyPool(lambda: build_lens_pool(lcfg, sigma, pcfg.n_lenses, pcfg.seed, prior.scale, prior.offset,
                                            device, shear=shear), (lcfg.geometry.image_npix,) * 2)
    truth_cache = []

    def draw_truths():
        # drawn on first use, so a resume of a finished run (make demo on the shipped checkpoint) skips it
        if not truth_cache:
            truth_cache.append(cached_truths(run_dir / TRUTHS_FILE, prior, chain, pcfg))
        return truth_cache[0]

    def obs_sampler(G, generator):
        """G prior-predictive observations: images (G, ny, nx) and their lens indices into the pool (G,)."""
        truths = draw_truths()
        li = torch.randint(len(pool), (G,), generator=generator)
        ti = torch.randint(truths.shape[0], (G,), generator=generator)
        ys = [pool.problems[int(i)].simulate(truths[int(j)][None], generator=generator)[0] for i, j in zip(li, ti)]
        return torch.stack(ys), li

    spec = posterior_spec(prior, chain, rcfg, cond_channels=2)
    seed_everything(rcfg.run.seed)  # the head's random layers: the same in every run from scratch
    post = build_posterior(prior, spec)
    if warm_start is not None and not has_checkpoints(run_dir):  # a resumed run keeps its own state
        warm_start_posterior(post, spec, warm_start)
    trainer = RTBTrainer(post, rcfg, problem=pool, obs_sampler=obs_sampler, cond_fn=lens_features, run_dir=run_dir,
                         metrics_path=run_dir / "metrics.jsonl", spec=spec, extra_hparams={"lens_pool": {"shear": shear}})
    # the conditions recorded by the checkpoint resumed from: they stand when no step is trained here
    carried = load_checkpoint(run_dir, names=[]).hparams.get("trained_on") if has_checkpoints(run_dir) else None
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
    hp["trained_on"] = carried if carried and not truth_cache else measure_trained_conditions(
        lcfg, sigma, pool.get(), truth_cache[0] if truth_cache else record_truths(prior, chain, pcfg), prior)
    states = {k: v for k, v in ck.states.items() if k in ("model", "ema", "per_step")}  # per_step: learned gains
    write_checkpoint_dir(out_dir, states, hp, {**ck.state, "summary": summary})
    return summary


def tune_rtb_guidance(config_path, prior, *, sources_path=None, n_obs: int = 4, n: int = 32, grid=None) -> dict:
    """The scale for ``rtb.policy.guidance`` (DPS / DPS+CLA inside the amortized posterior), by the untrained ELBO.

    The posterior built from the config's ``rtb:`` section starts with a zero correction, so it IS the
    guided chain; its mean ELBO over ``n_obs`` prior-predictive observations (each with its own lens; lenses
    and truths drawn from ``posterior.tune_seed``, apart from every trained and evaluated set), ``n``
    trajectories each, ranks the scales. Returns the tuning record; write its ``scale`` into
    ``rtb.policy.guidance_scale``.
    """
    lcfg = load_lensing_config(config_path)
    pcfg = load_section(config_path, "posterior", PosteriorConfig)
    rcfg = load_section(config_path, "rtb", RTBConfig)
    if rcfg.policy.guidance == "none":
        raise ConfigError(config_path, "rtb.policy.guidance", "is 'none': there is no guidance scale to tune")
    chain = load_chain(config_path, prior)
    sigma = resolve_noise_sigma(lcfg, sources_path)
    rng, gen = np.random.default_rng(pcfg.tune_seed), torch.Generator().manual_seed(pcfg.tune_seed)
    observations = [prior_predictive_observation(lcfg, prior, chain, rng, gen, sigma) for _ in range(n_obs)]

    def sampler_at(scale):
        rcfg.policy.guidance_scale = float(scale)
        post = build_posterior(prior, posterior_spec(prior, chain, rcfg, cond_channels=2))
        return amortized_sampler("rtb_amortized", post, batch_size=n)

    guidance = rcfg.policy.guidance
    _, record = tune_scale(sampler_at, [(p, y) for p, _, y in observations], grid=guidance_grid(guidance, grid),
                           n=n, seed=pcfg.tune_seed, objective="elbo", label=f"rtb_{guidance} guidance scale")
    return {"method": f"rtb_{rcfg.policy.guidance}", **record, "objective": UNTRAINED_ELBO, "K": chain.K,
            "tuning_seed": pcfg.tune_seed}
