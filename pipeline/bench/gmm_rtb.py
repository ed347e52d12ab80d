"""RTB in the GMM benchmark: its settings, training, guidance-scale tuning and sampling.

Variants: ``rtb`` (one observation), ``rtb_amortized`` (one network over a set of observations, VarGrad
log Z per observation) and ``rtb_dps`` / ``rtb_dps_cla`` (frozen-prior guidance inside the
parameterisation, its scale tuned by the untrained ELBO on a separate seed, and a learned per-step gain
on it). The number of training steps and the head's hidden width are arguments (the ``--rtb-steps`` and
``--rtb-hidden`` flags of ``python -m pipeline bench gmm``); everything else is fixed here and recorded in
``gmm.json``. The measurements behind the fixed settings are on the experiments page
(docs/results/experiments.md, "Exact-posterior benchmark").
"""

from __future__ import annotations

import math
import torch

from pipeline.bench.gmm_cases import GMMCase
from pipeline.rtb.config import (ExplorationConfig, ObjectiveConfig, OptimConfig, PolicyConfig, RTBConfig,
                                 RunConfig)
from pipeline.rtb.posterior import make_posterior
from pipeline.rtb.sampler import RTBSampler
from pipeline.rtb.trainer import RTBTrainer
from pipeline.rtb.tuning import tune_guidance_scale

# Trajectories behind the log Z_IW that decides divergence (|log Z_IW - log Z_ref| > 1 nat): from the 2,000
# samples behind the distances an 80-D estimate scatters by more than that tolerance, so the test would
# judge the estimator instead of the training (experiments page, "Why 20,000 trajectories").
N_LOGZ = 20_000


def default_rtb_steps(d_x: int, quick: bool) -> int:
    """Training steps of single-observation RTB: 300 (quick) / 400 on the 2-D case, 500 above it.

    Sized so the full benchmark (7 cases x 10 seeds x 4 RTB variants) fits in ~1.5 h on 2 cores; more
    steps did not make plain RTB better in 80-D (experiments page, "Exact-posterior benchmark")."""
    return (300 if quick else 400) if d_x == 2 else 500


def default_rtb_hidden(quick: bool) -> int:
    """Hidden width of the RTB correction head: 64 (quick) / 128."""
    return 64 if quick else 128


def rtb_config(case: GMMCase, quick: bool, amortized: bool, seed: int, guided: bool = False, *,
               steps: int | None = None, hidden: int | None = None) -> RTBConfig:
    """The RTB settings of the benchmark (recorded in gmm.json); ``guided`` for RTB with the frozen-prior
    DPS / DPS+CLA guidance inside its parameterisation.

    ``steps``: training steps of single-observation RTB (default :func:`default_rtb_steps`); the
    amortized network trains 2x as long (4x in 80-D) and the guided variants in 80-D 1.6x as long.
    ``hidden``: the head's hidden width (default :func:`default_rtb_hidden`)."""
    base = default_rtb_steps(case.d_x, quick) if steps is None else steps
    if amortized:
        # one network for the whole observation set; in 80-D twice as long again, at half the lr (below)
        steps = base * (4 if case.d_x >= 80 else 2)
    elif guided and case.d_x >= 80:
        steps = base * 8 // 5  # 800 at the default 500, at half the lr (below)
    else:
        steps = base
    hidden = default_rtb_hidden(quick) if hidden is None else hidden
    batch = 256 if case.d_x == 2 else 128  # higher dimension: smaller batches keep 70 RTB runs within budget
    # prior rollouts are what finds the modes (with replay-only exploration 80-D posteriors settle on wrong ones)
    explore = dict(prior_rate=0.05, tempered_rate=0.1)
    # Above 2-D the policy (q = p at the start) locks onto the first modes its samples find; a reward
    # temperature ramp beta 0.1 -> 1 over the first half keeps it broad while it explores. Outputs and
    # log Z always use beta = 1.
    ramp = dict(beta_start=0.1, beta_ramp_steps=steps // 2) if case.d_x > 2 else {}
    # lr 3e-3 makes 80-D training blow up (loss spikes past the rollbacks): 1e-3 there, and 5e-4 for the
    # amortized and guided 80-D variants, which train longer
    lr = 3e-3 if case.d_x < 80 else (5e-4 if amortized or guided else 1e-3)
    # The guided 80-D variants start from a weaker guidance, gain e^-1 of the tuned scale on every step
    # (training raises it where it pays): from gain 1 training can stay on the modes DPS picks.
    gain0 = math.exp(-1.0) if guided and case.d_x >= 80 else 1.0
    return RTBConfig(
        policy=PolicyConfig(head_hidden=hidden, head_layers=3, in_scale=8.0, guidance_gain_init=gain0),
        objective=ObjectiveConfig(amortized=amortized, logz="vargrad" if amortized else "scalar", group_size=16,
                                  **ramp),
        optim=OptimConfig(batch_size=batch, lr=lr, lr_final_frac=0.05, lr_logz=0.1),
        exploration=ExplorationConfig(replay_rate=0.1, tempered_std_scale=1.5, **explore),
        run=RunConfig(steps=steps, eval_samples=2000, seed=seed, log_every=50))


def train_rtb(case: GMMCase, chain, seed: int, *, quick: bool, y=None, obs_set=None, metrics_path=None,
              guidance: str = "none", guidance_scale: float = 1.0, logz_ref: float | None = None,
              steps: int | None = None, hidden: int | None = None):
    """Train an RTB posterior: for one observation ``y``, or amortized over the observations
    ``obs_set`` (G, d_y) (each batch holds several of them, VarGrad log Z per observation); optionally
    with the frozen-prior DPS / DPS+CLA guidance inside the parameterisation (and a learned per-step
    gain on it). ``steps`` / ``hidden``: see :func:`rtb_config`.

    Returns (posterior, trainer, cfg, cond_fn).
    """
    amortized = obs_set is not None
    base = rtb_config(case, quick, amortized, seed, guided=guidance != "none", steps=steps, hidden=hidden)
    cfg = base.with_fields(guidance=guidance, guidance_scale=float(guidance_scale),
                           learn_guidance_gain=guidance != "none")
    torch.manual_seed(seed)
    cond_scale = 8.0  # y is O(10) on these cases: a fixed input normalisation

    def cond_fn(_problem, yy):
        return yy.reshape(yy.shape[0], -1) / cond_scale

    post = make_posterior(case.prior, chain, cfg, cond_dim=case.d_y if amortized else 0)
    if amortized:
        obs = torch.as_tensor(obs_set).reshape(-1, case.d_y).float()

        def obs_sampler(G, gen):  # one shared problem: no lens index
            return obs[torch.randint(obs.shape[0], (G,), generator=gen)], None

        trainer = RTBTrainer(post, cfg, problem=case.problem, obs_sampler=obs_sampler, cond_fn=cond_fn,
                             metrics_path=metrics_path)
    else:
        trainer = RTBTrainer(post, cfg, problem=case.problem, y=y, log_z_ref=logz_ref, metrics_path=metrics_path)
    trainer.train()
    return post, trainer, cfg, cond_fn


def tune_rtb_guidance(case: GMMCase, chain, guidance: str, tuning_seed: int, n: int = 256) -> dict:
    """Scale of the frozen-prior guidance inside the RTB+DPS(+CLA) parameterisation, tuned on a
    SEPARATE seed before any training by the ELBO of the untrained posterior
    (:func:`pipeline.rtb.tuning.tune_guidance_scale`, one tuning observation)."""
    return tune_guidance_scale(case.prior, chain, case.problem, guidance, tuning_seed, n=n, n_obs=1)


def sample_rtb(post, cfg, cond_fn, case: GMMCase, y, seed: int, n: int, name: str):
    """n samples of a trained posterior at y (cond_fn for amortized ones), as Samples."""
    sampler = RTBSampler(post, name, cond_fn=cond_fn if name == "rtb_amortized" else None)
    return sampler.sample(case.problem, y, n, generator=torch.Generator().manual_seed(30_000 + seed))


def run_rtb(case: GMMCase, chain, y, seed: int, *, quick: bool, n: int, logz_ref: float, metrics_path=None,
            guidance: str = "none", guidance_scale: float = 1.0, n_logz: int = N_LOGZ,
            steps: int | None = None, hidden: int | None = None):
    """Single-observation RTB at y: train, sample n, flag divergence (|log Z_IW - log Z_ref| > tol, with
    log Z_IW from ``n_logz`` fresh trajectories, see :data:`N_LOGZ`).

    Returns (Samples, trainer, cfg, LogZEstimate of the n_logz trajectories).
    """
    post, trainer, cfg, cond_fn = train_rtb(case, chain, seed, quick=quick, y=y, metrics_path=metrics_path,
                                            guidance=guidance, guidance_scale=guidance_scale, logz_ref=logz_ref,
                                            steps=steps, hidden=hidden)
    name = "rtb" if guidance == "none" else f"rtb_{guidance}"
    smp = sample_rtb(post, cfg, cond_fn, case, y, seed, n, name)
    _, est = trainer.evaluate(n=max(n_logz, n))  # marks the trainer diverged if |log Z_IW - ref| > tol
    return smp, trainer, cfg, est
