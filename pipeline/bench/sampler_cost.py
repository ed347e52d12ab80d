"""Seconds per posterior sample of amortized lensing samplers, measured side by side in one process.

Each variant is ``CONFIG:PRIOR:POSTERIOR[:METHOD]``: a pipeline config (its ``lensing:`` geometry and lens
ranges, its ``chain:``), the prior, the exported posterior and the method (``rtb_amortized``, the default,
or ``rtb_amortized_gn``). Every variant samples the same number of prior-predictive observations of its own
config (lenses, prior-chain truths and noise from ``--seed``, noise at the level the posterior records, or
else the config's ``lensing.noise.sigma``), ``--samples`` per observation in one batch, as ``sample`` and
``calibrate`` do. The variants are timed in turn, round after round (``--rounds``), so that load on the
machine falls on all of them alike, after one untimed warm-up observation each. Prints one line per variant
(median, min and max seconds per sample over the rounds, and the ratio of medians to the first variant)
and writes the same as JSON with ``--out``. Run it with one torch thread (``OMP_NUM_THREADS=1``, the
default of :func:`pipeline.runtime.configure_threads` on a CPU) to compare per-core cost.

    python -m pipeline.bench.sampler_cost data/pretrained/v1/config.yaml:data/pretrained/v1/prior:data/pretrained/v1/posterior \\
        config/config.yaml:data/pretrained/prior:data/pretrained/posterior
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from pipeline.diffusion.network_prior import load_prior
from pipeline.diffusion.schedule import load_chain
from pipeline.errors import InputFileError, PipelineError
from pipeline.bench.side_by_side import interleaved_seconds, with_ratios, write_record
from pipeline.io.checkpoint import load_checkpoint
from pipeline.lensing.amortized import amortized_sampler
from pipeline.lensing.config import load_lensing_config
from pipeline.lensing.sample import load_amortized
from pipeline.lensing.tuning import prior_predictive_observation
from pipeline.runtime import configure_threads

METHODS = ("rtb_amortized", "rtb_amortized_gn")


def parse_variant(text: str) -> tuple[str, str, str, str]:
    """``CONFIG:PRIOR:POSTERIOR[:METHOD]`` -> (config, prior, posterior, method); ValueError naming the part."""
    parts = text.split(":")
    if len(parts) not in (3, 4) or not all(parts):
        raise ValueError(f"variant {text!r}: expected CONFIG:PRIOR:POSTERIOR[:METHOD]")
    method = parts[3] if len(parts) == 4 else "rtb_amortized"
    if method not in METHODS:
        raise ValueError(f"variant {text!r}: METHOD must be one of {', '.join(METHODS)}, got {method!r}")
    return parts[0], parts[1], parts[2], method


def noise_level(posterior_dir, lcfg, config_path) -> float:
    """The noise level (SCI units) the posterior records, else the config's ``lensing.noise.sigma``."""
    hp = load_checkpoint(posterior_dir, names=[]).hparams
    if "lensing" in hp:
        return float(hp["lensing"]["noise_sigma"])
    if lcfg.noise.sigma is None:
        raise InputFileError(posterior_dir, f"records no noise level and {config_path} sets no "
                                            "lensing.noise.sigma", field="lensing.noise_sigma")
    return float(lcfg.noise.sigma)


def setup_variant(text: str, *, n_obs: int, samples: int, seed: int) -> dict:
    """Load one variant and draw its ``n_obs`` observations; one untimed warm-up sampling."""
    config, prior_dir, posterior_dir, method = parse_variant(text)
    prior = load_prior(prior_dir)
    chain = load_chain(config, prior)
    lcfg = load_lensing_config(config)
    sigma = noise_level(posterior_dir, lcfg, config)
    rng, gen = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    observations = [prior_predictive_observation(lcfg, prior, chain, rng, gen, sigma)[::2]  # (problem, y)
                    for _ in range(n_obs)]
    post, _ = load_amortized(posterior_dir, prior, chain)
    sampler = amortized_sampler(method, post, batch_size=samples)
    problem, y = observations[0]
    sampler.sample(problem, y, samples, generator=torch.Generator().manual_seed(seed))  # warm-up
    return {"variant": text, "method": method, "K": chain.K, "sampler": sampler, "observations": observations}


def time_variants(variants: list[str], *, n_obs: int = 4, samples: int = 32, rounds: int = 3,
                  seed: int = 0) -> list[dict]:
    """Seconds per sample (median, min, max over ``rounds``; each round samples every observation of the
    variant once) and the ratio of medians to the first variant's."""
    setups = [setup_variant(text, n_obs=n_obs, samples=samples, seed=seed) for text in variants]

    def job(s):
        def run(r):
            gen = torch.Generator().manual_seed(seed + 1 + r)
            for problem, y in s["observations"]:
                s["sampler"].sample(problem, y, samples, generator=gen)
            return n_obs * samples
        return run

    times = interleaved_seconds([job(s) for s in setups], rounds)
    rows = [{"variant": s["variant"], "method": s["method"], "K": s["K"]} for s in setups]
    return with_ratios(rows, times, "seconds_per_sample")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.bench.sampler_cost", description=__doc__.split("\n")[0])
    ap.add_argument("variants", nargs="+", help="CONFIG:PRIOR:POSTERIOR[:METHOD]; ratios are to the first")
    ap.add_argument("--n-obs", type=int, default=4, help="observations per variant and round (default 4)")
    ap.add_argument("--samples", type=int, default=32, help="samples per observation, one batch (default 32)")
    ap.add_argument("--rounds", type=int, default=3, help="timings per variant, interleaved (default 3)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the observations and samples (default 0)")
    ap.add_argument("--out", default=None, help="also write the result as JSON here")
    a = ap.parse_args(argv)
    if a.n_obs < 1 or a.samples < 1 or a.rounds < 1:
        ap.error(f"--n-obs, --samples and --rounds must be >= 1, got {a.n_obs}, {a.samples}, {a.rounds}")
    try:
        for text in a.variants:
            parse_variant(text)
    except ValueError as err:
        ap.error(str(err))
    configure_threads()
    try:
        rows = time_variants(a.variants, n_obs=a.n_obs, samples=a.samples, rounds=a.rounds, seed=a.seed)
    except PipelineError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for row in rows:
        s = row["seconds_per_sample"]
        print(f"{row['variant']}: {s['median']:.4f} s/sample (min {s['min']:.4f}, max {s['max']:.4f}), "
              f"x{row['ratio_to_first']:.2f} the first; K {row['K']}; torch threads {torch.get_num_threads()}")
    if a.out:
        write_record(a.out, "python -m pipeline.bench.sampler_cost", argv,
                     {"n_obs": a.n_obs, "samples": a.samples, "rounds": a.rounds}, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
