"""Side-by-side timing for the cost benches (``chain_cost``, ``sampler_cost``): variants timed in turn,
round after round, so that load on the machine falls on all of them alike, and their ratios to the first."""

from __future__ import annotations

import statistics
import sys
import time

import torch

from pipeline.io.atomic import write_json


def interleaved_seconds(jobs, rounds: int) -> list[list[float]]:
    """``jobs``: one callable per variant, ``job(r)`` doing round ``r``'s work and returning its number of
    units (draws, samples). Returns the seconds per unit of every round, per variant, in the given order (by
    position: a variant given twice is timed twice, which shows the noise)."""
    times = [[] for _ in jobs]
    for r in range(rounds):
        for job, t in zip(jobs, times):
            t0 = time.perf_counter()
            units = job(r)
            t.append((time.perf_counter() - t0) / units)
    return times


def with_ratios(rows: list[dict], times: list[list[float]], key: str) -> list[dict]:
    """Each row gains ``key`` (median, min and max seconds per unit over the rounds) and ``ratio_to_first``
    (its median over the first variant's)."""
    first = statistics.median(times[0])
    return [{**row, key: {"median": statistics.median(t), "min": min(t), "max": max(t)},
             "ratio_to_first": statistics.median(t) / first} for row, t in zip(rows, times)]


def write_record(out, prog: str, argv, settings: dict, rows: list[dict]) -> None:
    """The JSON record at ``out``: the command as run (``argv``, else the process's arguments), the
    settings, the torch threads and the rows."""
    given = sys.argv[1:] if argv is None else list(argv)
    write_json(out, {"command": " ".join([prog, *given]), **settings, "torch_threads": torch.get_num_threads(),
                     "variants": rows})
