"""What inferring the lens costs: the operator per lens, and the pseudo-marginal reference's needs.

    python -m pipeline.bench.joint_lensing OUT.json [--config config/config.yaml] [--n-obs 4]
        [--trajectories 256] [--seed 0] [--smc-particles N ...] [--smc-runs R] [--skip-operator]
        [--smc-proposal policy|gaussian] [--step-model-chain-x0 on|off]

Two measurements, on prior-drawn observations (source from the prior chain, lens from the lens prior,
the config's noise):

1. **The operator for a new lens**, two ways: assembled (the sparse matrix of
   :class:`~pipeline.lensing.operator.LensingProblem`, whose diag(A^T A / sigma^2) the amortized
   posterior's features need) against matrix-free (one caustics forward, and forward plus its
   vector-Jacobian product, per source), and (SIE) the batched operator of
   :mod:`pipeline.lensing.lens_batch` over 64 lenses at once. Seconds per lens, median of ``--repeats``.
2. **The importance weights of today's lens-conditional sampler at the true lens.** Pseudo-marginal
   MH over the lens needs an estimate Z^(y | theta) = mean_i w_i from N trajectories of the
   theta-conditional sampler with Var(log Z^) <= about 2 at the posterior mode. From ``--trajectories``
   trajectories of the amortized posterior at the true lens it reports the log-weight spread, the
   weights' effective sample size, and Var(log Z^) for N = 1, 4, 16, ... (disjoint groups), with the
   seconds per trajectory, so the N and the cost per MH step follow.
3. With ``--smc-particles N ...``, the same estimate from twisted SMC over the chain at the true lens
   (:func:`pipeline.rtb.smc.twisted_smc`, ``--smc-proposal``: the posterior's own steps or the
   full-covariance Gaussian step): Var(log Z^) over
   ``--smc-runs`` independent runs of N particles, each run's smallest ESS, and seconds per particle.

Writes OUT.json and prints one JSON line. Single-threaded unless ``PIPELINE_NUM_THREADS`` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.bench.lensing_obs import prior_drawn_observations
from pipeline.lensing.lens_batch import LENS_KEYS, LensBatchOperator
from pipeline.lensing.lens_prior import LensPrior, draw_lens
from pipeline.lensing.operator import LensParams, build_simulator, caustics_forward
from pipeline.lensing.sample import load_setup, method_run
from pipeline.lensing.simulate import default_psf, make_problem
from pipeline.rtb.smc import PROPOSALS, twisted_smc
from pipeline.runtime import configure_threads

DEFAULT_PRIOR = "data/pretrained/prior"
DEFAULT_POSTERIOR = "data/pretrained/posterior"


def operator_seconds(lcfg, sigma: float, n_lenses: int, repeats: int, seed: int, batch: int = 64) -> dict:
    """Median seconds per lens: sparse assembly, caustics forward / forward+VJP of one source, and (SIE)
    the batched operator over ``batch`` lenses."""
    rng = np.random.default_rng(seed)
    g = lcfg.geometry
    psf, _ = default_psf(g)
    lenses = [draw_lens(lcfg.lens, rng) for _ in range(n_lenses)]
    src = torch.rand(1, g.source_npix, g.source_npix, generator=torch.Generator().manual_seed(seed))
    assemble, forward, vjp = [], [], []
    for _ in range(repeats):
        for lens in lenses:
            t0 = time.perf_counter()
            make_problem(lens, g, sigma=sigma)
            assemble.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            sim = build_simulator(lens, (g.image_npix, g.image_npix), g.image_pixscale, g.source_npix,
                                  g.source_pixscale, g.supersample, psf)
            with torch.no_grad():
                caustics_forward(sim, src)
            forward.append(time.perf_counter() - t0)
            x = src.clone().requires_grad_(True)
            t0 = time.perf_counter()
            sim = build_simulator(lens, (g.image_npix, g.image_npix), g.image_pixscale, g.source_npix,
                                  g.source_pixscale, g.supersample, psf)
            torch.vmap(sim)(x.reshape(1, -1)).sum().backward()   # caustics_forward runs without grad
            vjp.append(time.perf_counter() - t0)
    out = {"assembled_s": statistics.median(assemble), "matrix_free_forward_s": statistics.median(forward),
           "matrix_free_forward_vjp_s": statistics.median(vjp), "lenses": n_lenses, "repeats": repeats}
    if lcfg.lens.model == "SIE":
        out.update(batched_operator_seconds(g, psf, [draw_lens(lcfg.lens, rng) for _ in range(batch)], repeats))
    return out


def batched_operator_seconds(g, psf, lenses: list, repeats: int) -> dict:
    """Median seconds per lens of :class:`~pipeline.lensing.lens_batch.LensBatchOperator` for all ``lenses``
    at once: tracing and weights (``bind``), one source's forward plus adjoint per lens, diag(A^T A)."""
    op = LensBatchOperator(image_shape=(g.image_npix, g.image_npix), image_pixscale=g.image_pixscale,
                           source_npix=g.source_npix, source_pixscale=g.source_pixscale, supersample=g.supersample,
                           psf=psf, unit_factor=g.image_pixscale ** 2)
    batch = {k: torch.tensor([float(getattr(ln, k)) for ln in lenses], dtype=torch.float64) for k in LENS_KEYS}
    x = torch.rand(len(lenses), g.source_npix ** 2, generator=torch.Generator().manual_seed(0))
    bind, apply, diag = [], [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        op.bind(batch)
        t1 = time.perf_counter()
        op.AT(op.A(x))
        t2 = time.perf_counter()
        op.diag_AtA()
        bind.append((t1 - t0) / len(lenses))
        apply.append((t2 - t1) / len(lenses))
        diag.append((time.perf_counter() - t2) / len(lenses))
    return {"batched_bind_s": statistics.median(bind), "batched_forward_adjoint_s": statistics.median(apply),
            "batched_diag_AtA_s": statistics.median(diag), "batch": len(lenses)}


def log_z_hat_spread(log_w: torch.Tensor) -> dict:
    """Var(log Z^_N) over disjoint groups of N of the log-weights, for N = 1, 4, 16, ... (nats^2)."""
    out, n = {}, 1
    lw = log_w.double()
    while n <= len(lw) // 4:
        groups = lw[: (len(lw) // n) * n].reshape(-1, n)
        est = torch.logsumexp(groups, 1) - math.log(n)
        out[str(n)] = float(est.var())
        n *= 4
    return out


def weight_summary(log_w: torch.Tensor) -> dict:
    lw = log_w.double()
    w = torch.softmax(lw, 0)
    return {"log_w_std": float(lw.std()), "ess_fraction": float(1.0 / (w * w).sum()) / len(lw),
            "var_log_z_hat": log_z_hat_spread(lw)}


def smc_spread(run, problem, y, particles: list[int], runs: int, seed: int, proposal: str = "policy") -> dict:
    """Twisted SMC at the observation's true lens: per N, Var and mean of log Z^ over ``runs`` runs, the
    median over runs of the smallest ESS / N of any step, and seconds per particle."""
    post, out = run.sampler.post, {}
    cond = None
    if run.sampler.cond_fn is not None:
        cond = run.sampler.cond_fn(problem, torch.as_tensor(y).reshape(1, *problem.y_shape))[0]
    for n in particles:
        t0 = time.perf_counter()
        res = twisted_smc(post, problem, y, n, runs=runs, cond=cond, proposal=proposal,
                          generator=torch.Generator().manual_seed(seed + n))
        sec = (time.perf_counter() - t0) / (n * runs)
        out[str(n)] = {"var_log_z_hat": float(res.log_z.var()), "mean_log_z_hat": float(res.log_z.mean()),
                       "min_ess_fraction_median": float(res.ess.min(0).values.median()), "runs": runs,
                       "seconds_per_particle": sec}
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m pipeline.bench.joint_lensing", description=__doc__.split("\n")[0])
    ap.add_argument("out", help="JSON file to write")
    ap.add_argument("--config", default="config/config.yaml")
    ap.add_argument("--prior", default=DEFAULT_PRIOR, help="prior checkpoint directory")
    ap.add_argument("--posterior", default=DEFAULT_POSTERIOR, help="amortized posterior directory")
    ap.add_argument("--n-obs", type=int, default=4, help="prior-drawn observations")
    ap.add_argument("--trajectories", type=int, default=256, help="trajectories per observation at the true lens")
    ap.add_argument("--lenses", type=int, default=8, help="lenses for the operator timing")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smc-particles", type=int, nargs="*", default=[], metavar="N",
                    help="also run twisted SMC at the true lens with N particles per run (several N allowed)")
    ap.add_argument("--smc-runs", type=int, default=8, help="independent SMC runs per N")
    ap.add_argument("--smc-proposal", choices=PROPOSALS, default="policy",
                    help="SMC proposals: the posterior's steps (policy) or the full-covariance Gaussian step (gaussian)")
    ap.add_argument("--skip-operator", action="store_true", help="skip the operator timing")
    ap.add_argument("--step-model-chain-x0", choices=("on", "off"), default=None,
                    help="sample with rtb.policy.step_model_chain_x0 on or off (default: the posterior's own)")
    args = ap.parse_args(argv)
    configure_threads()
    setup = load_setup(args.config, args.prior, n=args.trajectories, seed=args.seed)
    lcfg, sigma = setup.lcfg, float(setup.lcfg.noise.sigma)
    ops = None if args.skip_operator else operator_seconds(lcfg, sigma, args.lenses, args.repeats, args.seed)
    rows, run = [], None
    prior_theta = LensPrior(lcfg.lens)
    for i, obs in enumerate(prior_drawn_observations(setup, args.n_obs, args.seed)):
        problem, y, entry = obs["problem"], obs["y"], obs["entry"]
        if run is None:
            run = method_run(setup, "rtb_amortized", args.prior, args.posterior, problem)
            if args.step_model_chain_x0 is not None:
                run.sampler.post.step_model_chain_x0 = args.step_model_chain_x0 == "on"
        gen = torch.Generator().manual_seed(args.seed * 1000 + i)
        t0 = time.perf_counter()
        smp = run.sampler.sample(problem, y, args.trajectories, generator=gen)
        seconds = (time.perf_counter() - t0) / args.trajectories
        log_w = (smp.log_r + smp.log_p_traj - smp.log_q_traj).cpu()
        row = {"obs": entry["file"], "peak_snr": entry["peak_snr"], "seconds_per_trajectory": seconds,
               "theta": dict(zip(prior_theta.names, prior_theta.to_vector(LensParams(**entry["lens"])).tolist()))}
        row.update(weight_summary(log_w))
        if args.smc_particles:
            row["smc"] = smc_spread(run, problem, y, args.smc_particles, args.smc_runs, args.seed * 1000 + i,
                                    args.smc_proposal)
            row["smc_proposal"] = args.smc_proposal
        print(json.dumps(row), flush=True)
        rows.append(row)
    result = {"config": args.config, "threads": torch.get_num_threads(), "operator": ops, "observations": rows,
              "step_model_chain_x0": bool(getattr(run.sampler.post, "step_model_chain_x0", False))}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
