"""Pseudo-marginal Metropolis-Hastings over the lens, with the diffusion source marginalised by twisted SMC.

    python -m pipeline.bench.joint_lensing_pmmh OUT.json [--config config/config.yaml] [--prior DIR]
        [--posterior DIR] [--n-obs 4] [--free rein q phi] [--particles 64] [--iters 2000] [--burn 500]
        [--var-runs 8] [--proposal gaussian|policy] [--seed 0] [--device auto|cpu|cuda]

The exact reference for a joint posterior over lens parameters theta and source. Observations are drawn
from the prior chain (sources) and from a lens prior that frees the ``--free`` parameters of the config's
lens ranges and fixes the others (centre at the origin, no external shear, any other range at its
midpoint), so that theta is low-dimensional. For each observation a random-walk chain targets
p(theta) Z^(y | theta), with Z^ from ``--particles`` particles of twisted SMC over the source chain at
theta's operator (:class:`~pipeline.lensing.lens_evidence.DiffusionSourceEvidence`); the current state's
Z^ is stored and reused (:func:`~pipeline.bench.joint_lensing_mh.metropolis`, started at the true lens,
its proposal adapted during ``--burn``). Before the chains, Var(log Z^) at the true lens is measured over
``--var-runs`` independent estimates (pseudo-marginal MH mixes well when it is about 1-2 or less).

Writes OUT.json (per observation: truth, Var(log Z^) at the truth, acceptance, integrated autocorrelation
time and effective sample size per parameter, posterior mean and sd per parameter, and seconds per
iteration) and prints one JSON line per observation. Each iteration costs one SMC run per observation
(``--particles`` trajectories of K prior-network calls): on the 2-core CPU 0.15-0.44 s per particle, so
this is a job for a GPU (``--device cuda``) at production sizes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from pipeline.bench.joint_lensing_mh import metropolis
from pipeline.bench.lensing_obs import prior_drawn_observations
from pipeline.lensing.lens_evidence import DiffusionSourceEvidence
from pipeline.lensing.lens_prior import LensPrior
from pipeline.lensing.operator import LensParams
from pipeline.lensing.sample import load_setup, method_run
from pipeline.rtb.joint import integrated_autocorr_time
from pipeline.rtb.smc import PROPOSALS
from pipeline.runtime import configure_threads

FREE_CHOICES = ("x0", "y0", "rein", "q", "phi", "g1", "g2")


def reduced_lens_config(lens_cfg, free: list[str]):
    """The config's lens ranges with only ``free`` parameters left free: the centre at the origin unless x0 /
    y0 are free, no shear unless g1 / g2 are (both or neither), any other range at its midpoint."""
    bad = [f for f in free if f not in FREE_CHOICES]
    if bad or not free:
        raise ValueError(f"--free takes one or more of {FREE_CHOICES}, got {free}")
    if ("g1" in free) != ("g2" in free) or ("x0" in free) != ("y0" in free):
        raise ValueError("free g1 and g2 together, and x0 and y0 together")
    mid = {k: (getattr(lens_cfg, k)[0] + getattr(lens_cfg, k)[1]) / 2 for k in ("rein", "q", "phi")}
    return dataclasses.replace(
        lens_cfg, center=lens_cfg.center if "x0" in free else 0.0,
        shear_sigma=lens_cfg.shear_sigma if "g1" in free else 0.0,
        **{k: (tuple(getattr(lens_cfg, k)) if k in free else (mid[k], mid[k])) for k in mid})


class _Target:
    """What :func:`metropolis` needs: the lens prior and the (pseudo-marginal) log evidence."""

    def __init__(self, prior: LensPrior, evidence: DiffusionSourceEvidence):
        self.prior, self.log_evidence = prior, evidence.log_evidence


def chain_summary(theta: torch.Tensor, names: list[str]) -> dict:
    """Per parameter of one chain's kept iterations (n, p): mean, sd, integrated autocorrelation time, ESS."""
    out = {}
    for j, name in enumerate(names):
        x = theta[:, j]
        tau = integrated_autocorr_time(x) if float(x.std()) > 0 else float("inf")
        out[name] = {"mean": float(x.mean()), "sd": float(x.std()), "tau_int": tau, "ess": len(x) / tau}
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m pipeline.bench.joint_lensing_pmmh", description=__doc__.split("\n")[0])
    ap.add_argument("out", help="JSON file to write")
    ap.add_argument("--config", default="config/config.yaml")
    ap.add_argument("--prior", default="data/pretrained/prior", help="prior checkpoint directory")
    ap.add_argument("--posterior", default="data/pretrained/posterior",
                    help="posterior whose prior-variance model (or, with --proposal policy, whose steps) sets the SMC proposals")
    ap.add_argument("--n-obs", type=int, default=4, help="prior-drawn observations, one chain each")
    ap.add_argument("--free", nargs="+", default=["rein", "q", "phi"], help=f"free lens parameters {FREE_CHOICES}")
    ap.add_argument("--particles", type=int, default=64, help="SMC particles per evidence estimate")
    ap.add_argument("--iters", type=int, default=2000, help="MH iterations after burn-in")
    ap.add_argument("--burn", type=int, default=500, help="burn-in iterations (proposal adapted)")
    ap.add_argument("--var-runs", type=int, default=8, help="estimates at the truth for Var(log Z^)")
    ap.add_argument("--proposal", choices=PROPOSALS, default="gaussian", help="SMC proposals (pipeline.rtb.smc)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=None, help="auto, cpu or cuda (default: the config's)")
    args = ap.parse_args(argv)
    configure_threads()
    setup = load_setup(args.config, args.prior, seed=args.seed, device=args.device)
    lens_cfg = reduced_lens_config(setup.lcfg.lens, args.free)
    setup = dataclasses.replace(setup, lcfg=dataclasses.replace(setup.lcfg, lens=lens_cfg))
    prior = LensPrior(lens_cfg)
    obs = prior_drawn_observations(setup, args.n_obs, args.seed)
    post = method_run(setup, "rtb_amortized", args.prior, args.posterior, obs[0]["problem"]).sampler.post
    evidence = DiffusionSourceEvidence(prior, post, [(o["problem"], o["y"], o["meta"]) for o in obs],
                                       particles=args.particles, batch=max(1, args.n_obs), proposal=args.proposal,
                                       generator=torch.Generator().manual_seed(args.seed))
    truth = torch.stack([prior.to_vector(LensParams(**o["entry"]["lens"])) for o in obs])
    rows = torch.arange(args.n_obs)
    t0 = time.perf_counter()
    at_truth = torch.stack([evidence.log_evidence(truth, rows) for _ in range(args.var_runs)])  # (runs, n_obs)
    sec_eval = (time.perf_counter() - t0) / args.var_runs
    start_sd = 1e-3 * torch.tensor([hi - lo for lo, hi in prior.box.values()]
                                   + [lens_cfg.shear_sigma] * (2 * prior.has_shear), dtype=torch.float64)
    t0 = time.perf_counter()
    mh = metropolis(_Target(prior, evidence), rows, truth.clone(), start_sd.expand_as(truth).clone(),
                    n_iter=args.iters + args.burn, burn=args.burn, seed=args.seed)
    sec_iter = (time.perf_counter() - t0) / (args.iters + args.burn)
    results = []
    for i, o in enumerate(obs):
        row = {"obs": o["entry"]["file"], "peak_snr": o["entry"]["peak_snr"],
               "truth": dict(zip(prior.names, truth[i].tolist())),
               "var_log_z_hat_at_truth": float(at_truth[:, i].var()), "acceptance": mh["acceptance"][i],
               "parameters": chain_summary(mh["theta"][:, i], prior.names)}
        results.append(row)
        print(json.dumps(row), flush=True)
    out = {"config": args.config, "posterior": args.posterior, "free": prior.names, "particles": args.particles,
           "proposal": args.proposal,
           "iters": args.iters, "burn": args.burn, "device": str(setup.device), "threads": torch.get_num_threads(),
           "seconds_per_evidence_batch": sec_eval, "seconds_per_iteration": sec_iter,
           "evidence_estimates": evidence.calls,  # the Var(log Z^) runs at the truth included
           "observations": results,
           "note": "phi's statistics are on the raw chain (not unwrapped): read them only away from its ends"}
    Path(args.out).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
