"""Twisted SMC's evidence on a lens with an exact answer: a Gaussian source prior on a small lensing grid.

    python -m pipeline.bench.smc_evidence_gaussian OUT.json [--sigma 0.5 0.2 0.05] [--particles 16] [--runs 16]

For a Gaussian source prior N(0, tau2 I) on a 16 x 16 source grid (0.1"/px), lensed by an SIE onto a
16 x 16 image (:func:`gaussian_case`), the chain's x_0 law is Gaussian, so p(y | lens) is exact. For each
noise level ``--sigma`` (flux per pixel) it draws y from the chain's model and runs ``--runs``
independent twisted SMC estimates of log p(y) with ``--particles`` particles, with each proposal of
:func:`pipeline.rtb.smc.twisted_smc` (the policy's diagonal closed-form steps, and the full-covariance
Gaussian step), and reports the mean error of log Z^ against the exact evidence, Var(log Z^) and the median
over runs of the smallest ESS / n of any step. Writes OUT.json and prints one JSON line per noise level.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from pipeline.diffusion.gaussian_chain import gaussian_linear_posterior, propagate_gaussian_chain
from pipeline.diffusion.prior import GaussianMixturePrior
from pipeline.lensing.config import GeometryConfig, LensConfig
from pipeline.lensing.lens_prior import LensPrior
from pipeline.lensing.simulate import default_psf, make_problem
from pipeline.rtb.posterior import MLPCorrection, RTBPosterior
from pipeline.rtb.smc import PROPOSALS, twisted_smc
from pipeline.runtime import configure_threads

GEOM = GeometryConfig(image_npix=16, image_pixscale=0.1, source_npix=16, source_pixscale=0.1, supersample=2,
                      psf_npix=7)
VAR = 0.5                                     # tau2: the source prior's per-pixel variance (network units^2)
TRUTH = (0.5, 0.75)                           # rein [arcsec], q of the observed lens


def gaussian_case(sigma: float, seed: int = 5, K: int = 6):
    """(posterior, problem, y, meta, chain law, lens prior, true theta) for noise ``sigma`` per image pixel:
    the prior N(0, VAR I) with its exact eps and a K-step chain, the closed-form-step policy without a head
    (10 CG iterations), a lens prior freeing rein in [0.4, 0.6]" and q in [0.6, 0.9] (phi 0.6, no centre
    offset or shear), the problem at :data:`TRUTH` (sources in SCI units per pixel, no flux-per-pixel
    factor), and y drawn from the chain's x_0 law through it. ``meta`` is what
    :func:`pipeline.lensing.lens_evidence.problem_at_lens` reads."""
    d = GEOM.source_npix ** 2
    prior = GaussianMixturePrior([1.0], torch.zeros(1, d), VAR)
    chain = prior.schedule.chain(K)
    post = RTBPosterior(prior, chain, MLPCorrection(d, hidden=8, layers=1), step_variance_tau2=VAR,
                        step_mean_shift=True, step_mean_cg_iters=10, use_head=False)
    lens_prior = LensPrior(LensConfig(rein=(0.4, 0.6), q=(0.6, 0.9), phi=(0.6, 0.6), center=0.0, shear_sigma=0.0))
    truth = torch.tensor(TRUTH, dtype=torch.float64)
    problem = make_problem(lens_prior.to_lens(truth), GEOM, sigma=sigma, flux_per_pixel=False)
    meta = {"pixscale": GEOM.image_pixscale, "source_npix": GEOM.source_npix, "source_pixscale": GEOM.source_pixscale,
            "supersample": GEOM.supersample, "psf_used": default_psf(GEOM)[0], "unit_factor": 1.0}
    law = propagate_gaussian_chain(chain, torch.zeros(d), VAR)
    g = torch.Generator().manual_seed(seed)
    x0 = law["x0_mean"] + torch.linalg.cholesky(law["x0_cov"]) @ torch.randn(d, generator=g, dtype=torch.float64)
    y = problem.forward(x0.float().reshape(1, *problem.x_shape))[0]
    y = y + sigma * torch.randn(y.shape, generator=g)
    return post, problem, y, meta, law, lens_prior, truth


def exact_log_z(problem, y, law) -> float:
    """log p(y) [nats] under the chain's Gaussian x_0 law ``law`` and ``problem``'s linear model and noise."""
    keep = problem.mask.reshape(-1).bool()
    r = (y - problem.offset_image).double().reshape(-1)[keep]
    s2 = problem.sigma.double().reshape(-1)[keep] ** 2
    return gaussian_linear_posterior(law["x0_mean"], law["x0_cov"], problem.dense_matrix()[keep], s2, r)[2]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m pipeline.bench.smc_evidence_gaussian",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("out", help="JSON file to write")
    ap.add_argument("--sigma", type=float, nargs="+", default=[0.5, 0.2, 0.05], help="noise per image pixel")
    ap.add_argument("--particles", type=int, default=16)
    ap.add_argument("--runs", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    configure_threads()
    rows = []
    for sigma in args.sigma:
        post, problem, y, _, law, _, _ = gaussian_case(sigma)
        exact = exact_log_z(problem, y, law)
        row = {"sigma": sigma, "exact_log_z": exact}
        for prop in PROPOSALS:
            res = twisted_smc(post, problem, y, args.particles, runs=args.runs, proposal=prop,
                              generator=torch.Generator().manual_seed(args.seed))
            row[prop] = {"mean_error": float((res.log_z - exact).mean()), "var_log_z_hat": float(res.log_z.var()),
                         "min_ess_fraction_median": float(res.ess.min(0).values.median())}
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = {"particles": args.particles, "runs": args.runs, "seed": args.seed, "rows": rows}
    Path(args.out).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
