"""How much each reverse step of an amortized posterior narrows the prior's std, and by what.

    python -m pipeline.bench.step_std OUT.json [--config config/config.yaml] [--prior data/pretrained/prior]
        [--posterior data/pretrained/posterior] [--n-obs 6] [--n 32] [--seed 7]

On seeded prior-predictive observations (the check's draw: lens, prior-chain truth and noise from
``--seed``), ``--n`` trajectories of the posterior each. At every visited state x_k it splits the
policy's step std into the prior chain's ``s_k``, the closed-form likelihood-informed narrowing
(``RTBPosterior.likelihood_step``; 1 where the posterior does not use it) and the head's learned factor
``exp(v / 2)``, and reports per chain step k the mean and sd of the learned log-variance offset v, its
range, and the median and 10th percentile over pixels and samples of both factors. Writes OUT.json and
prints one line per step.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from pipeline.diffusion.network_prior import load_prior
from pipeline.diffusion.schedule import load_chain
from pipeline.lensing.amortized import amortized_sampler
from pipeline.lensing.config import load_lensing_config
from pipeline.lensing.sample import load_amortized
from pipeline.lensing.tuning import prior_predictive_observation
from pipeline.rtb.objective import policy_rollout
from pipeline.runtime import configure_threads


@torch.no_grad()
def step_factors(post, batch) -> dict[int, dict[str, torch.Tensor]]:
    """Per chain step k of one rollout: the learned offset ``v`` and the closed-form ``narrowing`` (flat)."""
    out = {}
    for k in range(post.chain.K, 1, -1):
        x = batch.xs[k]
        _, v = (post._model_out(x, k, batch.eps_p[k], batch.y, batch.cond, batch.problem)
                if getattr(post, "use_head", True) else (None, None))  # a head not sampled has no factor
        nar = post.likelihood_step(x, k, batch.eps_p[k], batch.y, batch.problem, shift=False)[0]
        out[k] = {"v": (torch.zeros_like(x) if v is None else v).reshape(-1), "narrowing": nar.reshape(-1)}
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m pipeline.bench.step_std", description=__doc__.split("\n")[0])
    ap.add_argument("out", help="JSON file to write")
    ap.add_argument("--config", default="config/config.yaml")
    ap.add_argument("--prior", default="data/pretrained/prior")
    ap.add_argument("--posterior", default="data/pretrained/posterior")
    ap.add_argument("--n-obs", type=int, default=6)
    ap.add_argument("--n", type=int, default=32, help="trajectories per observation")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--noise-sigma", type=float, default=None, help="default: the posterior's recorded noise level")
    args = ap.parse_args(argv)
    configure_threads()
    prior = load_prior(args.prior)
    chain, lcfg = load_chain(args.config, prior), load_lensing_config(args.config)
    post, hp = load_amortized(args.posterior, prior, chain)
    sigma = args.noise_sigma if args.noise_sigma is not None else float(hp["lensing"]["noise_sigma"])
    sampler = amortized_sampler("rtb_amortized", post, batch_size=args.n)
    rng, gen = np.random.default_rng(args.seed), torch.Generator().manual_seed(args.seed)
    acc: dict[int, dict[str, list]] = {}
    with torch.no_grad():
        for _ in range(args.n_obs):
            problem, _, y = prior_predictive_observation(lcfg, prior, chain, rng, gen, sigma)
            cond = sampler.cond_fn(problem, y.reshape(1, *problem.y_shape))[0]
            batch = policy_rollout(post, args.n, y, cond, problem=problem, generator=gen)
            for k, f in step_factors(post, batch).items():
                for name, val in f.items():
                    acc.setdefault(k, {}).setdefault(name, []).append(val)
    rows = []
    for k in sorted(acc):
        v, nar = torch.cat(acc[k]["v"]).double(), torch.cat(acc[k]["narrowing"]).double()
        learned = torch.exp(0.5 * v)
        row = {"k": k, "v_mean": float(v.mean()), "v_sd": float(v.std()), "v_min": float(v.min()), "v_max": float(v.max()),
               "learned_factor_median": float(learned.median()), "learned_factor_p10": float(learned.quantile(0.1)),
               "narrowing_median": float(nar.median()), "narrowing_p10": float(nar.quantile(0.1))}
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"config": args.config, "posterior": args.posterior, "step_variance_tau2": post.step_variance_tau2,
              "n_obs": args.n_obs, "n": args.n, "seed": args.seed, "steps": rows}
    Path(args.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
