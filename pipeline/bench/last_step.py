"""The amortized posterior's last step, compared: fit in the arc, ELBO and seconds per sample.

    python -m pipeline.bench.last_step OUT.json [--config config/config.yaml] [--n-obs 4] [--n 32]
        [--ranks 32,128] [--per-sample] [--seed 0]

On prior-drawn observations (the model is exact there, so an exact sampler's samples fit like the
truths do), each variant draws ``--n`` samples per observation from the shipped amortized posterior:

* ``policy``: the trained network's own last step (today's ``rtb_amortized``);
* ``shared``: the Gauss-Newton twisted step linearised once per observation (dense Jacobian),
  :class:`pipeline.rtb.twisted_step.SharedGaussNewtonLastStep`;
* ``shared-rK``: the same on a rank-K subspace (matrix-free Jacobian products), the prior's kernel
  outside it; ``shared-rK-policy``: the network's own step outside it;
* ``per-sample`` (``--per-sample``; minutes per sample on a CPU): today's ``rtb_amortized_gn``.

Per variant and observation: the median over samples of chi2_nu over the image and in the arc (the
truth's own values beside them), the ELBO (mean log-weight, nats) and seconds per sample. All
variants share each observation's trajectories up to x_2 (same generator), so differences are the
last step's. Writes OUT.json and prints one summary line per variant.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.bench.lensing_obs import prior_drawn_observations
from pipeline.lensing.sample import load_setup, method_run
from pipeline.metrics.chi2 import chi2_per_sample
from pipeline.rtb.objective import policy_rollout
from pipeline.rtb.sampler import GN_ITERATIONS
from pipeline.rtb.twisted_step import GaussNewtonLastStep, SharedGaussNewtonLastStep
from pipeline.runtime import configure_threads


def variants(ranks, per_sample: bool) -> list[tuple[str, object]]:
    """(name, factory(prior, chain, problem, y) -> last step or None)."""
    out = [("policy", None), ("shared", lambda p, c, pr, y: SharedGaussNewtonLastStep(p, c, pr, y))]
    for k in ranks:
        out.append((f"shared-r{k}", (lambda k: lambda p, c, pr, y: SharedGaussNewtonLastStep(p, c, pr, y, rank=k))(k)))
        out.append((f"shared-r{k}-policy", (lambda k: lambda p, c, pr, y: SharedGaussNewtonLastStep(
            p, c, pr, y, rank=k, outside="policy"))(k)))
    if per_sample:
        out.append(("per-sample", lambda p, c, pr, y: GaussNewtonLastStep(p, c, pr, y, iterations=GN_ITERATIONS)))
    return out


def run_variant(sampler, factory, problem, y, n: int, seed: int) -> dict:
    post = sampler.post
    post.eval()
    cond = sampler.cond_fn(problem, y.reshape(1, *problem.y_shape))[0]
    t0 = time.perf_counter()
    with torch.no_grad():
        step = None if factory is None else factory(post.prior, post.chain, problem, y)
        b = policy_rollout(post, n, y, cond, problem=problem, generator=torch.Generator().manual_seed(seed),
                           last_step=step)
    seconds = (time.perf_counter() - t0) / n
    chi = chi2_per_sample(problem, b.x0, y)
    log_w = (b.log_r - b.log_ratio()).double()
    return {"seconds_per_sample": seconds, "chi2_nu": float(np.median(chi["chi2_nu"])),
            "chi2_arc_nu": float(np.nanmedian(chi["chi2_arc_nu"])), "elbo": float(log_w.mean())}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m pipeline.bench.last_step", description=__doc__.split("\n")[0])
    ap.add_argument("out", help="JSON file to write")
    ap.add_argument("--config", default="config/config.yaml")
    ap.add_argument("--prior", default="data/pretrained/prior")
    ap.add_argument("--posterior", default="data/pretrained/posterior")
    ap.add_argument("--n-obs", type=int, default=4)
    ap.add_argument("--n", type=int, default=32, help="samples per observation")
    ap.add_argument("--ranks", default="32,128", help="comma-separated subspace ranks ('' for none)")
    ap.add_argument("--per-sample", action="store_true", help="also run the per-sample dense step (slow)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    configure_threads()
    ranks = [int(k) for k in args.ranks.split(",") if k.strip()]
    setup = load_setup(args.config, args.prior, n=args.n, seed=args.seed)
    rows, run = [], None
    for i, obs in enumerate(prior_drawn_observations(setup, args.n_obs, args.seed)):
        problem, y = obs["problem"], obs["y"]
        if run is None:
            run = method_run(setup, "rtb_amortized", args.prior, args.posterior, problem)
        truth = chi2_per_sample(problem, obs["truth"][None], y)
        row = {"obs": obs["entry"]["file"], "peak_snr": obs["entry"]["peak_snr"],
               "truth_chi2_nu": float(truth["chi2_nu"][0]), "truth_chi2_arc_nu": float(truth["chi2_arc_nu"][0])}
        for name, factory in variants(ranks, args.per_sample):
            row[name] = run_variant(run.sampler, factory, problem, y, args.n, args.seed * 1000 + i)
            print(json.dumps({"obs": i, "variant": name, **row[name]}), flush=True)
        rows.append(row)
    summary = {}
    for name, _ in variants(ranks, args.per_sample):
        summary[name] = {key: float(np.median([r[name][key] for r in rows]))
                         for key in ("seconds_per_sample", "chi2_nu", "chi2_arc_nu", "elbo")}
    summary["truth"] = {key: float(np.median([r[f"truth_{key}"] for r in rows])) for key in ("chi2_nu", "chi2_arc_nu")}
    result = {"config": args.config, "n": args.n, "threads": torch.get_num_threads(), "summary": summary,
              "observations": rows}
    Path(args.out).write_text(json.dumps(result, indent=1))
    for name, s in summary.items():
        print(name, json.dumps(s))
    return result


if __name__ == "__main__":
    main()
