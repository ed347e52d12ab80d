"""``python -m pipeline bench {gmm,rtb-memory,vision} ...``: the benchmarks.

* ``gmm [--quick] --out DIR``: exact-posterior benchmark on Gaussian-mixture priors -> DIR/gmm.json,
  DIR/gmm_2d.png, DIR/gmm_table.md (:mod:`pipeline.bench.gmm`).
* ``rtb-memory --out DIR``: peak memory and step time of one RTB step, two-pass vs naive gradient ->
  DIR/rtb_memory.json (:mod:`pipeline.bench.rtb_memory`).
* ``vision ...``: the vision benchmarks (:mod:`pipeline.vision.bench`, imported lazily).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import shlex
import sys
from pathlib import Path

from pipeline.bench.gmm import run_benchmark
from pipeline.bench.gmm_summary import table
from pipeline.bench.rtb_memory import run_memory_benchmark
from pipeline.commands import int_at_least
from pipeline.io.atomic import write_text
from pipeline.runtime import configure_threads
from pipeline.settings import load_config

log = logging.getLogger(__name__)


def _add_gmm_arguments(g: argparse.ArgumentParser) -> None:
    g.add_argument("--out", required=True, help="output directory (gmm.json, figure, table)")
    g.add_argument("--quick", action="store_true", help="2-D case, 3 seeds, every method at one setting")
    g.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3 quick / 10 full)")
    g.add_argument("--cases", nargs="+", default=None, help="cases (2d 8d_y1 8d_y2 8d_y4 80d_y1 80d_y2 80d_y4)")
    g.add_argument("--methods", nargs="+", default=None, help="restrict to these method labels")
    g.add_argument("--K", type=int, default=30, help="chain length for every method (default 30)")
    g.add_argument("--spacing", default="uniform", choices=["uniform", "quadratic"],
                   help="the chain's timestep grid (default uniform; quadratic ends near t = 0, as config/config.yaml)")
    g.add_argument("--n", type=int, default=2000, help="samples per method and seed (default 2000)")
    g.add_argument("--n-logz", type=int_at_least(2), default=None,
                   help="trajectories behind each RTB run's log Z_IW, the estimate that decides divergence "
                        "(default 20000: at 2000 it scattered by more than the 1-nat tolerance; "
                        "docs/results/experiments.md)")
    g.add_argument("--rtb-steps", type=int_at_least(1), default=None,
                   help="training steps of single-observation RTB (default 300 quick / 400 full on the 2-D "
                        "case, 500 above it); the amortized network trains 2x as long (4x in 80-D), the "
                        "guided variants in 80-D 1.6x")
    g.add_argument("--rtb-hidden", type=int_at_least(1), default=None,
                   help="hidden width of RTB's correction head (default 64 quick / 128 full)")
    g.add_argument("--jobs", type=int_at_least(1), default=1,
                   help="cases run in this many worker processes (1 torch thread each; default 1)")


def _add_memory_arguments(m: argparse.ArgumentParser) -> None:
    m.add_argument("--out", required=True, help="output directory (rtb_memory.json)")
    m.add_argument("--K", type=int, nargs="+", default=[20, 50, 100, 200], help="chain lengths")
    m.add_argument("--batch", type=int, default=16)
    m.add_argument("--chunk", type=int, default=4, help="steps per chunk in the two-pass gradient")
    m.add_argument("--preset", default="small", help="U-Net preset of the prior/posterior network")
    m.add_argument("--image-size", type=int, default=32)
    m.add_argument("--timeout", type=float, default=900.0, help="seconds per (method, K) subprocess")
    m.add_argument("--memory-limit-gb", type=float, default=None,
                   help="address-space limit per subprocess (an exceeded limit is recorded as OOM)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", metavar="BENCH", required=True)
    _add_gmm_arguments(sub.add_parser("gmm", help="exact-posterior benchmark on Gaussian-mixture priors"))
    _add_memory_arguments(sub.add_parser("rtb-memory", help="RTB step memory: two-pass vs naive gradient"))
    # every argument after "vision" goes, unparsed, to pipeline.vision.bench (imported only when used);
    # prefix_chars="+" stops this stub parser from treating "--out" or "--help" as its own options
    v = sub.add_parser("vision", help="vision benchmarks (MNIST / CIFAR-10); see bench vision --help",
                       add_help=False, prefix_chars="+")
    v.add_argument("rest", nargs=argparse.REMAINDER)


def _run_gmm(args) -> int:
    seeds = None if args.seeds is None else list(range(args.seeds))
    cmd = "python -m pipeline " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    res = run_benchmark(args.out, quick=args.quick, seeds=seeds, cases=args.cases, methods=args.methods, K=args.K,
                        spacing=args.spacing, n=args.n, command=cmd, jobs=args.jobs, rtb_steps=args.rtb_steps,
                        rtb_hidden=args.rtb_hidden,
                        **({} if args.n_logz is None else {"n_logz": args.n_logz}))
    md = table(res)
    write_text(Path(args.out) / "gmm_table.md", f"Command: `{cmd}`; wall time {res['wall_seconds']:.0f} s\n\n{md}\n")
    print(md)
    print(f"targets: {res.get('targets')}")
    print(f"wall time {res['wall_seconds']:.0f} s; wrote {Path(args.out) / 'gmm.json'}")
    return 0


def _run_memory(args) -> int:
    res = run_memory_benchmark(args.out, Ks=args.K, batch=args.batch, chunk=args.chunk, preset=args.preset,
                               image_size=args.image_size, timeout=args.timeout,
                               memory_limit_gb=args.memory_limit_gb)
    for r in res["runs"]:
        print(f"{r['method']:8s} K={r['K']:4d} peak+{r.get('peak_mib', float('nan')):8.1f} MiB "
              f"step {r.get('step_seconds', float('nan')):7.2f} s {r.get('status')}")
    print(f"checks: {res['checks']}")
    return 0


def _run_vision(args) -> int:
    mod = importlib.import_module("pipeline.vision.bench")
    p = argparse.ArgumentParser(prog="python -m pipeline bench vision")
    mod.add_arguments(p)
    vargs = p.parse_args(args.rest)
    if vargs.config:
        load_config(vargs.config)  # the whole file, as every command checks it: one line per error
    return int(mod.run(vargs) or 0)


def run(args) -> int:
    configure_threads()
    runners = {"gmm": _run_gmm, "rtb-memory": _run_memory, "vision": _run_vision}
    return runners[args.bench](args) if args.bench in runners else 2
