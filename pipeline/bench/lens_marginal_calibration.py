"""Lens posteriors with the source marginalised under a Gaussian, calibrated on observations with hidden lenses.

For every observation in a directory (the pipeline's simulated sets: the lens is in the file's keywords and
is read only to score the result) this infers the free parameters of the configured lens prior by tempered
SMC (:func:`pipeline.lensing.lens_smc.tempered_smc`; with ``--runs`` R, R independent runs pooled by
their evidence, :func:`pipeline.lensing.lens_smc.pool_runs`) on p(theta) p(y | theta), where p(y | theta) is
the exact evidence under a rank-r Gaussian fitted to the prior's training galaxies, optionally a mixture over
their amplitudes and shapes (:class:`pipeline.lensing.lens_marginal.GaussianSourceEvidence`). It then scores
``--samples`` of each observation's particles against the true lens with
:func:`pipeline.metrics.lens_calibration.lens_calibration` (per-parameter coverage and bias against the exact sampler's bands, TARP), phi unwrapped around each
observation's circular mean. Per observation it records log Z, the SMC's stages, acceptance and evaluations,
the seconds spent, and at the true lens and at the particles' mean lens both log p(y | theta) and chi2_nu
of the Gaussian source's posterior mean imaged through that lens (how well the rank-r source fits the data
there: with the number of unmasked pixels, the data-fit part of the evidence difference between the lenses). ``--mh-obs N`` checks
the SMC against adaptive MH on the same target for the first N observations; ``--prior`` and
``--posterior`` draw one RTB source per lens sample, scored beside the known-lens sampler's draws.

Run: ``python -m pipeline.bench.lens_marginal_calibration OUT.json --config CFG --sources SOURCES.fits
--obs DIR`` (``--help``). Observations are processed ``--group`` at a time and each finished group is written
to ``OUT.json.partial`` (atomically), from which a rerun resumes.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.bench.joint_lensing_mh import circular_mean, circular_unwrap, reference_chains
from pipeline.config import load_section
from pipeline.diffusion.network_prior import load_prior
from pipeline.diffusion.prior_config import PriorConfig
from pipeline.diffusion.train import load_training_images
from pipeline.io.atomic import write_json
from pipeline.lensing.amortized import MultiLensProblem, lens_features
from pipeline.lensing.config import BrightnessConfig, load_lensing_config
from pipeline.lensing.lens_evidence import problem_at_lens
from pipeline.lensing.lens_head_mvn import CorrelatedLensHead
from pipeline.lensing.lens_marginal import GaussianSourceEvidence, SourceGaussian
from pipeline.lensing.lens_prior import LensPrior
from pipeline.lensing.lens_smc import pool_runs, tempered_smc
from pipeline.lensing.observation import load_observation
from pipeline.metrics.chi2 import chi2_per_sample
from pipeline.metrics.lens_calibration import lens_calibration
from pipeline.metrics.sharpness import mean_error
from pipeline.rtb.loading import load_posterior
from pipeline.rtb.objective import policy_rollout
from pipeline.rtb.joint import integrated_autocorr_time
from pipeline.runtime import configure_threads

log = logging.getLogger(__name__)


def chi2_nu(problem, y, x_net: torch.Tensor) -> float:
    """sum over unmasked pixels of ((y - model) / sigma)^2 over their number, for one network-unit source."""
    r = (y - problem.forward(x_net.reshape(1, *problem.x_shape).float())[0]) / problem.sigma
    keep = problem.mask > 0
    return float((r[keep].double() ** 2).mean())


def in_range(theta: torch.Tensor, prior: LensPrior) -> torch.Tensor:
    """theta (p,) with phi (period pi) moved into the prior's range."""
    theta = theta.clone()
    if "phi" in prior.names:
        lo = prior.box["phi"][0]
        j = prior.names.index("phi")
        theta[j] = lo + torch.remainder(theta[j] - lo, math.pi)
    return theta


def unwrapped_moments(theta: torch.Tensor, names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and sd (p,) of draws theta (n, p), phi (period pi) read around its circular mean."""
    theta = theta.clone()
    if "phi" in names:
        j = names.index("phi")
        theta[:, j] = circular_unwrap(theta[:, j], circular_mean(theta[:, j], math.pi), math.pi)
    return theta.mean(0), theta.std(0)


def mh_check(ev: GaussianSourceEvidence, recs: list[dict], truths: torch.Tensor, *, n_iter: int, seed: int) -> list:
    """Adaptive random-walk MH (:func:`pipeline.bench.joint_lensing_mh.reference_chains`, started at the truth,
    a quarter of the iterations adapting and discarded) on the same exact target for the observations of
    ``recs``: per parameter the SMC particles' mean error in MH sds, their sd over MH's, and MH's ESS."""
    class Target:                                   # the observation indices stand in for y
        prior = ev.prior

        @staticmethod
        def log_evidence(theta, rows):
            return ev.log_likelihood(theta, rows)

    rows = torch.tensor([r["row"] for r in recs])
    chains = reference_chains(Target, rows, truths[rows], n_iter=n_iter, burn=n_iter // 4, seed=seed)["theta"]
    out = []
    for b, r in enumerate(recs):
        mean, sd = unwrapped_moments(chains[:, b], ev.prior.names)
        sm, ss = torch.tensor(r["particle_mean"]), torch.tensor(r["particle_sd"])
        if "phi" in ev.prior.names:                 # the two means on one branch of phi's circle
            j = ev.prior.names.index("phi")
            sm[j] = circular_unwrap(sm[j:j + 1], float(mean[j]), math.pi)[0]
        ess = [len(chains) / integrated_autocorr_time(chains[:, b, j].numpy()) for j in range(chains.shape[-1])]
        out.append({"file": r.get("file"), "mh_mean": mean.tolist(), "mh_sd": sd.tolist(), "mh_ess": ess,
                    "mean_error_in_mh_sd": ((sm - mean) / sd).tolist(), "sd_ratio": (ss / sd).tolist()})
    return out


def infer_group(ev: GaussianSourceEvidence, head: CorrelatedLensHead, rows: list[int], *, particles: int,
                moves: int, samples: int, seed: int, final_moves: int = 0, runs: int = 1) -> list[dict]:
    """Tempered SMC for the observations ``rows`` of ``ev`` at once, ``runs`` independent runs each pooled by
    their evidence (:func:`pipeline.lensing.lens_smc.pool_runs`); one record per observation."""
    t0 = time.perf_counter()
    index = torch.tensor(rows).repeat_interleave(runs)        # SMC row g * runs + j: run j of observation g

    def log_likelihood(theta, smc_rows):                      # the SMC's rows -> the observations' own
        return ev.log_likelihood(theta, index[smc_rows])

    names = ev.prior.names
    out = tempered_smc(head, log_likelihood, len(index), n=particles, moves=moves, final_moves=final_moves, seed=seed)
    seconds = (time.perf_counter() - t0) / len(rows)
    gen = torch.Generator().manual_seed(seed + 1)
    recs = []
    for g, i in enumerate(rows):
        mine = slice(g * runs, (g + 1) * runs)
        log_z_runs = out["log_z"][mine]
        failed = bool(out["failed"][mine].all())
        # a run stopped at beta < 1 carries a tempered Z: pooled only when no run finished
        done = (out["beta"][mine] >= 1) & ~out["failed"][mine]
        log_z = log_z_runs
        if bool(done.any()):
            log_z = torch.where(done, log_z_runs, torch.full_like(log_z_runs, -math.inf))
        theta = out["theta"][mine][0] if failed else pool_runs(out["theta"][mine], log_z, gen)
        mean, sd = unwrapped_moments(theta, names)
        pick = torch.randperm(theta.shape[0], generator=gen)[:samples]
        recs.append({"row": i, "samples": theta[pick].tolist(),
                     "log_z": float(torch.logsumexp(log_z, 0) - math.log(int(done.sum()) or runs)),
                     "log_z_runs": log_z_runs.tolist(), "failed": failed,
                     "beta": 1.0 if bool(done.any()) else float(out["beta"][mine].min()),
                     "collapsed": int(out["collapsed"][mine].sum()),
                     "acceptance": float(out["acceptance"][mine].mean()),
                     "stages": int(out["stages"]), "evaluations": int(out["evaluations"][mine].sum()),
                     "seconds": seconds, "particle_mean": mean.tolist(), "particle_sd": sd.tolist()})
    return recs


@torch.no_grad()
def source_draws(post, problem, meta, y, thetas: torch.Tensor | None, prior: LensPrior, seed: int) -> dict:
    """One RTB posterior source per lens of ``thetas`` (S, p), each drawn with that lens's operator (the
    known-lens sampler at the file's own lens when ``thetas`` is None, S = 32): chi2_nu over the image and
    inside the arc per draw (:func:`pipeline.metrics.chi2.chi2_per_sample`, each at its own lens) and the RMS
    error of the draws' mean against the file's TRUTH, physical units."""
    S = 32 if thetas is None else thetas.shape[0]
    problems = [problem] if thetas is None else [problem_at_lens(problem, meta, prior.to_lens(t)) for t in thetas]
    index = torch.zeros(S, dtype=torch.long) if thetas is None else torch.arange(S)
    batch = MultiLensProblem(problems).take(index)
    cond = lens_features(batch, y.expand(S, *y.shape))
    x = policy_rollout(post, S, y, cond, problem=batch, generator=torch.Generator().manual_seed(seed)).x0
    chi = [chi2_per_sample(problems[int(i)], x[s:s + 1], y) for s, i in enumerate(index)]
    phys = (problem.scale * x.double() + problem.offset).reshape(S, -1)
    truth = torch.as_tensor(meta["truth"], dtype=torch.float64).reshape(1, -1)
    return {"chi2_nu": float(np.median([c["chi2_nu"][0] for c in chi])),
            "chi2_arc_nu": float(np.nanmedian([c["chi2_arc_nu"][0] for c in chi])),
            "mean_err": float(mean_error(phys.mean(0, keepdim=True).numpy(), truth.numpy())[0])}


def summarise(recs: list[dict], truths: torch.Tensor, names: list[str], seed: int) -> dict:
    samples = torch.tensor([r["samples"] for r in recs], dtype=torch.float64)
    truths = truths.clone()
    if "phi" in names:       # phi has period pi: unwrap around each observation's circular mean
        j = names.index("phi")
        for b in range(samples.shape[0]):
            centre = circular_mean(samples[b, :, j], math.pi)
            samples[b, :, j] = circular_unwrap(samples[b, :, j], centre, math.pi)
            truths[b, j] = circular_unwrap(truths[b, j:j + 1], centre, math.pi)[0]
    cal = lens_calibration(samples.numpy(), truths.numpy(), names, rng=np.random.default_rng(seed))
    z = (samples.mean(1) - truths) / samples.std(1)
    cal["largest_abs_z_per_observation"] = z.abs().max(1).values.tolist()
    return cal


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m pipeline.bench.lens_marginal_calibration",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("out", help="JSON file to write")
    ap.add_argument("--config", required=True, help="pipeline config (lensing geometry, lens prior, prior's scale)")
    ap.add_argument("--sources", required=True, help="sources FITS whose prior.data_hdu images fit the Gaussian")
    ap.add_argument("--obs", required=True, help="directory of observation FITS files (true lens in the keywords)")
    ap.add_argument("--n-obs", type=int, default=64, help="first N files (sorted by name)")
    ap.add_argument("--rank", type=int, default=128, help="principal components of the source Gaussian")
    ap.add_argument("--amplitudes", type=int, default=1,
                    help="K > 1: the source Gaussian is a mixture over K amplitudes (the training fluxes' histogram)")
    ap.add_argument("--shapes", type=int, default=1,
                    help="C > 1: a mixture over C shapes, a Gaussian mixture fitted to the components' coefficients")
    ap.add_argument("--particles", type=int, default=128)
    ap.add_argument("--moves", type=int, default=5, help="random-walk moves per SMC stage")
    ap.add_argument("--final-moves", type=int, default=0,
                    help="extra random-walk moves when an observation reaches beta = 1 (decorrelate the resampled cloud)")
    ap.add_argument("--runs", type=int, default=1,
                    help="independent SMC runs per observation, pooled by their evidence "
                         "(a spread of their log Z flags a lost mode)")
    ap.add_argument("--samples", type=int, default=32, help="particles scored per observation")
    ap.add_argument("--group", type=int, default=8, help="observations run together (one checkpoint each)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mh-obs", type=int, default=0, help="check the SMC against MH on the first N observations")
    ap.add_argument("--mh-iter", type=int, default=20000, help="MH iterations per chain (a quarter adapting)")
    ap.add_argument("--prior", help="diffusion prior checkpoint: with --posterior, draw a source per lens sample")
    ap.add_argument("--posterior", help="RTB posterior checkpoint (its known-lens draws are scored beside)")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = ap.parse_args(argv)
    if bool(args.prior) != bool(args.posterior):
        ap.error("--prior and --posterior go together")
    for flag in ("runs", "amplitudes", "shapes"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    configure_threads()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    lcfg, pcfg = load_lensing_config(args.config), load_section(args.config, "prior", PriorConfig)
    files = sorted(Path(args.obs).glob("*.fits"))[:args.n_obs]
    if not files:
        raise SystemExit(f"{args.obs}: no .fits files")
    images, _ = load_training_images(args.sources, pcfg.data_hdu, pcfg.scale, pcfg.offset)
    try:
        source = SourceGaussian.from_images(images, args.rank, amplitudes=args.amplitudes, shapes=args.shapes,
                                            seed=args.seed)
    except ValueError as err:                       # e.g. an image with flux <= 0, a rank too large
        raise SystemExit(f"{args.sources}: HDU {pcfg.data_hdu}: {err}") from None
    log.info("source Gaussian: rank %d holds %.4f of the training images' variance, %d amplitudes in [%.3g, %.3g], "
             "%d shapes", args.rank, source.explained, len(source.amplitudes), source.amplitudes.min(),
             source.amplitudes.max(), len(source.shape_means))
    # sources in the prior's network units, as the pipeline's samplers load them
    brightness = BrightnessConfig(scale=pcfg.scale, offset=pcfg.offset)
    observations = [load_observation(f, lcfg, brightness=brightness) for f in files]
    prior = LensPrior(lcfg.lens)
    truths = torch.stack([prior.to_vector(meta["lens"]) for _, _, meta in observations])
    ev = GaussianSourceEvidence(observations, prior, source)
    head = CorrelatedLensHead(prior, embed_dim=1)
    partial = Path(str(args.out) + ".partial")
    # the SMC's settings: a partial file made with others is refused rather than mixed in
    settings = {k: getattr(args, k) for k in ("config", "sources", "obs", "rank", "amplitudes", "shapes", "particles",
                                             "moves", "final_moves", "runs", "samples", "group", "seed")}
    recs = []
    if partial.exists():
        saved = json.loads(partial.read_text())
        if saved.get("settings") != settings:
            raise SystemExit(f"{partial}: made with settings {saved.get('settings')}, not {settings}; remove it")
        recs = saved["records"]
    for s in range(len(recs), len(files), args.group):
        rows = list(range(s, min(len(files), s + args.group)))
        recs += infer_group(ev, head, rows, particles=args.particles, moves=args.moves, samples=args.samples,
                            seed=args.seed + s, final_moves=args.final_moves, runs=args.runs)
        write_json(partial, {"settings": settings, "records": recs})
        log.info("observations %d/%d done (%.1f s each)", len(recs), len(files), recs[-1]["seconds"])
    recs = recs[:len(files)]
    for r in recs:
        r.pop("median", None)           # written by earlier versions, with phi read off its circle
        problem, y, meta = observations[r["row"]]
        r["file"] = files[r["row"]].name
        r["truth"] = truths[r["row"]].tolist()
        for at, theta in (("truth", truths[r["row"]]), ("mean", in_range(torch.tensor(r["particle_mean"]), prior))):
            # the Gaussian source's posterior mean at that lens, imaged through that lens's own operator
            x = ev.posterior_mean(theta[None], r["row"])[0]
            r[f"chi2_nu_at_{at}"] = chi2_nu(problem_at_lens(problem, meta, prior.to_lens(theta)), y, x)
            r[f"log_evidence_at_{at}"] = float(ev.log_likelihood(theta[None], torch.tensor([r["row"]]))[0])
        r["n_pixels"] = int((problem.mask > 0).sum())
    if args.posterior:
        prior_net = load_prior(args.prior)
        if (prior_net.scale, prior_net.offset) != (brightness.scale, brightness.offset):
            raise SystemExit(f"{args.prior}: brightness map {prior_net.scale}, {prior_net.offset} differs from "
                             f"{args.config}'s prior.scale / prior.offset")
        post, _ = load_posterior(args.posterior, prior_net)
        for r in recs:
            problem, y, meta = observations[r["row"]]
            if meta.get("truth") is None:
                raise SystemExit(f"{files[r['row']]}: no TRUTH HDU to score the source against")
            thetas = torch.tensor(r["samples"], dtype=torch.float64)
            r["source_inferred_lens"] = source_draws(post, problem, meta, y, thetas, prior, args.seed + r["row"])
            r["source_known_lens"] = source_draws(post, problem, meta, y, None, prior, args.seed + r["row"])
            truth_net = (torch.as_tensor(meta["truth"]) - problem.offset) / problem.scale
            c = chi2_per_sample(problem, truth_net.reshape(1, *problem.x_shape), y)
            r["source_truth"] = {"chi2_nu": float(c["chi2_nu"][0]), "chi2_arc_nu": float(c["chi2_arc_nu"][0])}
            log.info("%s: RMS inferred lens %.3g, known lens %.3g", r["file"], r["source_inferred_lens"]["mean_err"],
                     r["source_known_lens"]["mean_err"])
    mh = mh_check(ev, recs[:args.mh_obs], truths, n_iter=args.mh_iter, seed=args.seed + 5) if args.mh_obs else []
    result = {"command": "python -m pipeline.bench.lens_marginal_calibration " + " ".join(argv),
              "args": vars(args), "names": prior.names, "rank": args.rank, "explained": source.explained,
              "amplitudes": source.amplitudes.tolist(), "amplitude_weights": source.weights.sum(0).tolist(),
              "shape_weights": source.weights.sum(1).tolist(),
              "seconds_per_observation": float(np.mean([r["seconds"] for r in recs])),
              "calibration": summarise(recs, truths[:len(recs)], prior.names, args.seed + 3), "mh_check": mh,
              "records": recs}
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
