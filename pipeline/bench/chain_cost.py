"""Seconds per prior-chain draw for several (prior, chain) pairs, measured side by side in one process.

A chain's cost is K network evaluations per draw, times the U-Net's cost; this command measures it rather
than assuming it. Each variant is ``CHECKPOINT:K:SPACING[:VARIANCE]`` (spacing ``uniform`` or ``quadratic``,
variance ``small`` by default). The variants are timed in turn, round after round (``--rounds``), so that
load on the machine falls on all of them alike; each timing draws ``--n`` samples in one batch after one
untimed warm-up draw per variant. Prints one line per variant (median, min and max seconds per draw over
the rounds, and the ratio of medians to the first variant) and writes the same as JSON with ``--out``.

    python -m pipeline.bench.chain_cost data/pretrained/v1/prior:20:uniform \\
        data/pretrained/prior:20:quadratic data/pretrained/prior:40:quadratic
"""

from __future__ import annotations

import argparse
import sys

import torch

from pipeline.diffusion.chain_config import timestep_grid
from pipeline.diffusion.network_prior import load_prior
from pipeline.diffusion.sampling import sample_prior
from pipeline.errors import PipelineError
from pipeline.bench.side_by_side import interleaved_seconds, with_ratios, write_record
from pipeline.runtime import configure_threads


def parse_variant(text: str) -> tuple[str, int, str, str]:
    """``CHECKPOINT:K:SPACING[:VARIANCE]`` -> (checkpoint, K, spacing, variance); ValueError naming the part."""
    parts = text.split(":")
    if len(parts) not in (3, 4):
        raise ValueError(f"variant {text!r}: expected CHECKPOINT:K:SPACING[:VARIANCE]")
    path, k, spacing = parts[:3]
    variance = parts[3] if len(parts) == 4 else "small"
    if not k.isdigit() or int(k) < 2:
        raise ValueError(f"variant {text!r}: K must be an integer >= 2, got {k!r}")
    if spacing not in ("uniform", "quadratic") or variance not in ("small", "large"):
        raise ValueError(f"variant {text!r}: spacing must be uniform or quadratic and variance small or large")
    return path, int(k), spacing, variance


def time_variants(variants: list[str], *, n: int = 16, rounds: int = 5, seed: int = 0) -> list[dict]:
    """Seconds per draw (median, min, max over ``rounds``) of each variant, and its ratio of medians to the
    first variant's."""
    setups = []
    for text in variants:
        path, K, spacing, variance = parse_variant(text)
        prior = load_prior(path)
        chain = prior.schedule.chain(K, variance, timestep_grid(prior.schedule.T, K, spacing))
        sample_prior(prior, chain, 1, generator=torch.Generator().manual_seed(seed))            # warm-up
        setups.append((text, prior, chain))

    def job(prior, chain):
        def run(r):
            sample_prior(prior, chain, n, generator=torch.Generator().manual_seed(seed + r), batch_size=n)
            return n
        return run

    times = interleaved_seconds([job(prior, chain) for _, prior, chain in setups], rounds)
    return with_ratios([{"variant": text} for text, _, _ in setups], times, "seconds_per_draw")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.bench.chain_cost", description=__doc__.split("\n")[0])
    ap.add_argument("variants", nargs="+", help="CHECKPOINT:K:SPACING[:VARIANCE]; ratios are to the first")
    ap.add_argument("--n", type=int, default=16, help="draws per timing, one batch (default 16)")
    ap.add_argument("--rounds", type=int, default=5, help="timings per variant, interleaved (default 5)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="also write the result as JSON here")
    a = ap.parse_args(argv)
    if a.n < 1 or a.rounds < 1:
        ap.error(f"--n and --rounds must be >= 1, got {a.n}, {a.rounds}")
    try:
        for text in a.variants:
            parse_variant(text)
    except ValueError as err:
        ap.error(str(err))
    configure_threads()
    try:
        rows = time_variants(a.variants, n=a.n, rounds=a.rounds, seed=a.seed)
    except PipelineError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for row in rows:
        s = row["seconds_per_draw"]
        print(f"{row['variant']}: {s['median']:.4f} s/draw (min {s['min']:.4f}, max {s['max']:.4f}), "
              f"x{row['ratio_to_first']:.2f} the first; torch threads {torch.get_num_threads()}")
    if a.out:
        write_record(a.out, "python -m pipeline.bench.chain_cost", argv, {"n": a.n, "rounds": a.rounds}, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
