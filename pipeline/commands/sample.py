"""``python -m pipeline sample``: posterior samples for observations with one method -> posterior FITS.

One job handles many observations, so imports, model loading and guidance-scale tuning are paid once.
Methods: rtb_amortized (the fine-tuned posterior), rtb_amortized_is (the same, each sample importance-resampled
from ``posterior.particles`` of its trajectories), rtb_amortized_smc (the same steps as SMC proposals: each sample
drawn from its own twisted SMC run of ``posterior.particles`` particles, :mod:`pipeline.rtb.smc`), rtb_amortized_gn (the same with the Gauss-Newton twisted last
step, :mod:`pipeline.rtb.twisted_step`: a GPU method), dps, dps_cla, cla, prior_is, fps, fps_smc.

``--resume`` (what the workflow uses) makes a job stopped by a time limit cheap to rerun: each observation's
posterior is written, as soon as it is done, into ``.NAME.partial/`` beside the ``--out`` directory NAME; a rerun
of the same job (same method, observations, config, checkpoints, seed, sample count, tuning) skips those already
there, and the finished directory is renamed into place at the end. ``--shard K/N`` samples the K-th of N
contiguous shares of the observations (each keeps its own seed, so the shards together equal one whole run).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

from pipeline.errors import ConfigError, InputFileError
from pipeline.io.atomic import atomic_directory, write_json

log = logging.getLogger(__name__)

JOB_FILE = "job.json"
"""The fingerprint of the job that wrote a ``.partial`` directory (resumed only by the same job)."""


def add_arguments(parser) -> None:
    parser.add_argument("--config", required=True, metavar="FILE", help="pipeline YAML config")
    parser.add_argument("--method", required=True, help="sampling method (rtb_amortized, rtb_amortized_is, rtb_amortized_smc, rtb_amortized_gn, "
                        "dps, dps_cla, cla, prior_is, fps, fps_smc)")
    parser.add_argument("--prior", required=True, metavar="DIR", help="trained prior")
    parser.add_argument("--posterior", metavar="DIR", help="fine-tuned RTB posterior (for the rtb_amortized methods)")
    parser.add_argument("--obs", required=True, nargs="+", metavar="FILE_OR_DIR", help="observation FITS files or directories")
    out = parser.add_mutually_exclusive_group(required=True)
    out.add_argument("--out", metavar="DIR", help="directory: one posterior FITS per observation (same file name)")
    out.add_argument("--out-file", metavar="FILE", help="single observation: the posterior FITS path")
    parser.add_argument("--png", metavar="FILE", help="with --out-file: a figure of the posterior")
    parser.add_argument("--n", type=int, help="samples per observation (default posterior.n_samples)")
    parser.add_argument("--seed", type=int, help="default posterior.seed")
    parser.add_argument("--tuning", metavar="JSON", help="frozen guidance-scale record written by `tune` (dps, dps_cla); "
                        "default: tune here on posterior.tune_seed")
    parser.add_argument("--resume", action="store_true", help="with --out: keep each finished observation in "
                        ".NAME.partial/ beside the output and skip those a stopped run of the same job finished")
    parser.add_argument("--shard", metavar="K/N", help="with --out: sample only the K-th (0-based) of N contiguous "
                        "shares of the observations")
    parser.add_argument("--label", metavar="NAME", help="the run's name in calibration tables (the files' LABEL card), "
                        "for a prior and posterior compared beside the methods: the report's acceptance compares "
                        "the methods with a labelled run and does not judge it; default: the method's name")


def parse_shard(text: str | None, n_files: int) -> set[int] | None:
    """Indices of the observations of shard ``K/N`` among ``n_files`` (contiguous shares differing in size
    by at most one); None for no shard."""
    if text is None:
        return None
    try:
        k, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise ConfigError("--shard", "shard", f"expected K/N (e.g. 0/4), got {text!r}") from None
    if n < 1 or not 0 <= k < n:
        raise ConfigError("--shard", "shard", f"needs 0 <= K < N, got {text!r}")
    return set(range(k * n_files // n, (k + 1) * n_files // n))


def content_digest(path) -> str | None:
    """sha256 of a file's bytes; of a directory, of its checkpoint manifests (each lists the sha256 of its
    checkpoint's files) or, without any, of all its files; None for no path."""
    if path is None:
        return None
    p = Path(path)
    if not p.exists():
        raise InputFileError(p, "not found")
    if p.is_file():
        return hashlib.sha256(p.read_bytes()).hexdigest()
    files = sorted(p.rglob("manifest.json")) or sorted(f for f in p.rglob("*") if f.is_file())
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(p)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def job_fingerprint(args, files) -> dict:
    """What makes two runs of ``sample`` write the same files: method, label, sample count, seed, shard, and the
    content of the observations, config, checkpoints and tuning record."""
    return {"method": args.method, **({"label": args.label} if args.label else {}), "n": args.n, "seed": args.seed,
            "shard": args.shard,
            "obs": {f.name: content_digest(f) for f in files}, "config": content_digest(args.config),
            "prior": content_digest(args.prior), "posterior": content_digest(args.posterior),
            "tuning": content_digest(args.tuning)}


def partial_dir(out) -> Path:
    """The directory beside ``out`` that a ``--resume`` run fills one observation at a time."""
    out = Path(out)
    return out.with_name(f".{out.name}.partial")


def prepare_partial(out, fingerprint: dict) -> Path:
    """The ``.partial`` directory of ``out``, emptied first unless the same job wrote it."""
    work = partial_dir(out)
    job = work / JOB_FILE
    if work.is_dir() and (not job.is_file() or json.loads(job.read_text()) != fingerprint):
        log.info("%s: left by a different job (config, checkpoints or options changed): starting afresh", work)
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    if not job.is_file():
        write_json(job, fingerprint)
    return work


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def sample_resumably(out, files, only, fingerprint: dict, sample) -> list[dict]:
    """``--resume``: ``sample(directory, only=indices)`` writes the observations not yet in the ``.partial``
    directory of ``out`` into it; then every selected observation's file goes into ``out``, which appears
    whole, and the ``.partial`` directory is removed. Returns what ``sample`` returned."""
    work = prepare_partial(out, fingerprint)
    wanted = [i for i in range(len(files)) if only is None or i in only]
    todo = {i for i in wanted if not (work / f"{files[i].stem}.fits").is_file()}
    if len(todo) < len(wanted):
        log.info("resuming: %d of %d observations already sampled in %s", len(wanted) - len(todo), len(wanted), work)
    res = sample(work, only=todo) if todo else []
    with atomic_directory(out) as tmp:
        for i in wanted:
            _link_or_copy(work / f"{files[i].stem}.fits", Path(tmp) / f"{files[i].stem}.fits")
    shutil.rmtree(work)
    return res


def run(args) -> int:
    from pipeline.lensing.sample import observation_files, sample_observations
    from pipeline.lensing.tuning import read_tuning_record
    from pipeline.runtime import configure_threads
    from pipeline.settings import check_run_label

    configure_threads()
    if args.n is not None and args.n < 2:
        raise ConfigError("--n", "n", f"must be >= 2, got {args.n}")
    if args.label is not None:
        check_run_label(args.label, "--label", "label")
    if args.out_file and (args.resume or args.shard):
        raise ConfigError("--out-file", "out_file", "--resume and --shard need --out DIR")
    tuning = read_tuning_record(args.tuning, args.method) if args.tuning else None
    sample = functools.partial(sample_observations, args.config, args.method, args.prior, args.posterior, args.obs,
                               n=args.n, seed=args.seed, tuning=tuning, label=args.label)
    if args.out_file:
        res = sample(out_file=args.out_file, png=args.png)
    else:
        files = observation_files(args.obs)
        only = parse_shard(args.shard, len(files))
        if args.resume:
            res = sample_resumably(args.out, files, only, job_fingerprint(args, files), sample)
        else:
            # written into a temp dir renamed at the end: no partial output directory on failure
            with atomic_directory(args.out) as tmp:
                res = sample(tmp, only=only)
    print(json.dumps({"method": args.method, "n_obs": len(res),
                      "seconds": round(sum(r["seconds"] for r in res), 2)}))
    return 0
