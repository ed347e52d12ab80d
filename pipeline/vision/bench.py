"""``python -m pipeline bench vision``: MNIST / CIFAR-10 inverse problems in pixel and latent space.

For every dataset x task (x space: pixel, latent) the bench

1. loads the dataset (:mod:`pipeline.vision.datasets`; offline) and writes the training FITS;
2. trains (or resumes) one diffusion prior per dataset with the package's own trainer
   (:func:`pipeline.diffusion.train.train_prior`), and for the latent variant a small autoencoder and a
   prior on its latents; the denoised estimate is clipped to the data range (pixels [-1, 1], latents
   +-``latent_clip``; :class:`pipeline.vision.clipped_prior.ClippedPrior`) for every method alike;
3. builds the task's fixed operator (:mod:`pipeline.vision.operators`) and simulates ``n_obs``
   observations from held-out TEST images (noise seeded per observation), plus one extra observation
   used only to tune DPS's scale;
4. samples every method on the SAME observations with the same K-step chain:
   amortized RTB (one posterior per dataset x task, trained on observations simulated from TRAIN
   images), RTB+DPS (the same with frozen DPS guidance in its parameterisation), DPS, DPS+CLA,
   prior + importance resampling, FPS and FPS-SMC (the last three on linear pixel-space tasks only);
5. scores each observation: mean log r, log Z as ELBO +- standard error and importance-weighted (IW)
   from the trajectory log-weights ``log r + log p_theta(tau) - log q(tau)`` (per observation, never
   pooled), PSNR and SSIM against the truth (phase retrieval: after aligning each sample to the truth
   over shifts and the 180-degree rotation, which |FFT| cannot see), seconds and network evaluations
   per sample;
6. writes ``table.md`` / ``table.json`` (per dataset x space x task x method, means over observations,
   with each method's compute budget), ``per_observation.jsonl`` and figure grids ``figures/*.png``.

log Z for FPS-SMC is not available (its normaliser targets the bridged model); for prior+IS the IW
value is the importance-sampling estimate from all its proposals (q = prior chain) and the ELBO column
is the plain prior chain's (mean log r over proposals).

Modules: :mod:`~pipeline.vision.tasks` (trained artefacts, problems and observations),
:mod:`~pipeline.vision.methods` (tuning, RTB, samplers, scores), :mod:`~pipeline.vision.outputs`
(rows, claim check, table, figures); this one holds the CLI and the loop over tasks and methods.

NFE (network evaluations per sample): prior eps calls, plus vector-Jacobian products for DPS-type
guidance, plus correction-head calls for RTB (the head is a much smaller network; listed apart in the
budget column).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import torch

from pipeline.config import DEVICES, config_hash, from_mapping, load_yaml, read_device
from pipeline.errors import ConfigError
from pipeline.io.atomic import write_text
from pipeline.runtime import configure_threads
from pipeline.vision.config import QUICK, VisionConfig, method_applies
from pipeline.vision.methods import RTBMethod, build_sampler, score_observation, tune_dps_scale, tune_rtb_dps_scale
from pipeline.vision.outputs import aggregate, claim_check, render_markdown, task_figure
from pipeline.vision.tasks import Context, Task

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------
def add_arguments(parser) -> None:
    parser.add_argument("--config", metavar="FILE", help="pipeline YAML config (section 'vision:')")
    parser.add_argument("--out", metavar="DIR", help="output directory (default: vision.out)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run of a few minutes: MNIST, 2 tasks + 1 latent task, tiny budgets")
    parser.add_argument("--datasets", nargs="+", metavar="NAME", help="override vision.datasets (mnist cifar10)")
    parser.add_argument("--tasks", nargs="+", metavar="TASK", help="override vision.tasks")
    parser.add_argument("--methods", nargs="+", metavar="METHOD", help="override vision.methods")
    parser.add_argument("--latent-datasets", nargs="*", metavar="NAME", help="override vision.latent_datasets")
    parser.add_argument("--latent-tasks", nargs="*", metavar="TASK", help="override vision.latent_tasks")
    parser.add_argument("--mnist-dir", metavar="DIR", help="MNIST IDX directory (else the bundled 5k subset)")
    parser.add_argument("--cifar10-dir", metavar="DIR", help="cifar-10-batches-py directory (else the stand-in)")
    parser.add_argument("--n-obs", type=int, metavar="N", help="override vision.n_obs")
    parser.add_argument("--n-samples", type=int, metavar="N", help="override vision.n_samples")
    parser.add_argument("--seed", type=int, help="override vision.seed and the seeds of every training "
                        "(vision.prior.seed, vision.latent_prior.seed, vision.rtb.run.seed)")
    parser.add_argument("--device", choices=list(DEVICES), help="override the config's top-level device")


def merged(base: dict, overrides: dict) -> dict:
    """``base`` with ``overrides`` applied key by key, nested mappings merged (neither is modified)."""
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            value = merged(out[key], value)
        out[key] = value
    return out


def config_from_args(args) -> tuple[VisionConfig, str]:
    """Config = defaults <- file section <- --quick <- explicit flags (validated together; nested sections
    merge key by key)."""
    source = args.config or "<defaults>"
    data: dict = {}
    if args.config:
        data = load_yaml(args.config).get("vision") or {}
        if not isinstance(data, dict):
            raise ConfigError(args.config, "vision", "expected a mapping")
    if getattr(args, "quick", False):
        data = merged(data, QUICK)
    flags = {"out": args.out, "datasets": args.datasets, "tasks": args.tasks, "methods": args.methods,
             "latent_datasets": args.latent_datasets, "latent_tasks": args.latent_tasks,
             "mnist_dir": args.mnist_dir, "cifar10_dir": args.cifar10_dir, "n_obs": args.n_obs,
             "n_samples": args.n_samples, "seed": args.seed}
    data = merged(data, {k: v for k, v in flags.items() if v is not None})
    if args.seed is not None:
        data = merged(data, {"prior": {"seed": args.seed}, "latent_prior": {"seed": args.seed},
                             "rtb": {"run": {"seed": args.seed}}})
    cfg = from_mapping(VisionConfig, data, source, prefix="vision.")
    return cfg, source


def device_from_args(args) -> str:
    """``--device``, else the config file's top-level ``device``, else auto."""
    return args.device or (read_device(args.config) if args.config else "auto")


def run(args) -> int:
    configure_threads()
    cfg, _ = config_from_args(args)
    summary = run_bench(cfg, device_from_args(args))
    print(json.dumps({"out": cfg.out, "rows": len(summary["rows"]), "claim": summary["claim"]["summary"]}))
    return 0


# ------------------------------------------------------------------------------------------------
# the bench
# ------------------------------------------------------------------------------------------------
def tune_task(cfg: VisionConfig, task: Task, tuning: dict) -> tuple[float, float]:
    """(DPS scale, RTB+DPS frozen-guidance scale) of one task: tuned on its extra observation when
    ``cfg.dps_tune`` (records added to ``tuning``), else the configured values."""
    seed = cfg.seed + 11
    dps_scale = cfg.dps_scale
    if cfg.dps_tune and any(m in cfg.methods for m in ("dps", "rtb_dps")):
        dps_scale, rec = tune_dps_scale(cfg, task, seed)
        tuning[task.key] = {"chosen": dps_scale, "metric": cfg.dps_tune_metric, "grid": rec}
        log.info("%s: DPS scale %.3g (by %s)", task.key, dps_scale, cfg.dps_tune_metric)
    rtb_dps_scale = cfg.rtb_dps_scale
    if cfg.dps_tune and "rtb_dps" in cfg.methods:
        rtb_dps_scale, rec = tune_rtb_dps_scale(cfg, task, seed)
        tuning[task.key + " (rtb_dps frozen guidance)"] = {"chosen": rtb_dps_scale, "metric": "elbo", "grid": rec}
        log.info("%s: RTB+DPS guidance scale %.3g", task.key, rtb_dps_scale)
    return dps_scale, rtb_dps_scale


def prepare_method(cfg: VisionConfig, task: Task, ctx: Context, method: str, dps_scale: float,
                   rtb_dps_scale: float):
    """(sample_fn(y, n, generator), budget text, training seconds, extra row fields) of one method;
    RTB variants are trained (or resumed) here."""
    if method in ("rtb_amortized", "rtb_dps"):
        m = RTBMethod(cfg, task, ctx, guidance="none" if method == "rtb_amortized" else "dps",
                      scale=rtb_dps_scale, dps_scale=dps_scale)
        return m.sample, m.budget(cfg), m.train_seconds, {"rtb_summary": m.summary}
    sampler, budget = build_sampler(method, cfg, task, dps_scale)
    return (lambda y, n, g, s=sampler, p=task.problem: s.sample(p, y, n, generator=g)), budget, 0.0, {}


def run_observations(cfg: VisionConfig, task: Task, method: str, sample_fn) -> tuple[list[dict], torch.Tensor]:
    """(per-observation records, the first observation's images for the figure) of one method."""
    obs_recs, panel = [], None
    for i in range(task.n_obs):
        g = torch.Generator(device="cpu").manual_seed(cfg.seed * 7919 + 31 * i + 5)
        ts = time.perf_counter()
        s = sample_fn(task.ys[i], cfg.n_samples, g)
        secs = (time.perf_counter() - ts) / cfg.n_samples
        rec, imgs = score_observation(task, i, s)
        rec.update(dataset=task.ds_name, space=task.space, task=task.task, method=method, obs=i,
                   truth_index=task.truth_index[i], n=cfg.n_samples, nfe=int(s.nfe), seconds_per_sample=secs)
        obs_recs.append(rec)
        if i == 0:
            panel = imgs[: cfg.figure_samples].cpu()
    return obs_recs, panel


def run_bench(cfg: VisionConfig, device: str = "auto") -> dict:
    """Run every dataset x space x task x method of ``cfg`` on ``device`` (auto, cpu or cuda); write the
    table, JSON and figures."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    ctx = Context(cfg, out, device)
    combos = [(d, "pixel", t) for d in cfg.datasets for t in cfg.tasks]
    combos += [(d, "latent", t) for d in cfg.latent_datasets for t in cfg.latent_tasks]
    rows, per_obs, figures, tuning = [], [], [], {}
    t_start = time.perf_counter()
    for dataset, space, task_name in combos:
        log.info("task %s / %s / %s", dataset, space, task_name)
        task = Task(ctx, dataset, space, task_name)
        dps_scale, rtb_dps_scale = tune_task(cfg, task, tuning)
        fig_panels = {}
        for method in cfg.methods:
            if not method_applies(method, task_name, space):
                continue
            t0 = time.perf_counter()
            sample_fn, budget, train_s, extra = prepare_method(cfg, task, ctx, method, dps_scale, rtb_dps_scale)
            obs_recs, fig_panels[method] = run_observations(cfg, task, method, sample_fn)
            per_obs.extend(obs_recs)
            rows.append(aggregate(obs_recs, budget=budget, train_seconds=train_s,
                                  total_seconds=time.perf_counter() - t0, **extra))
        figures.append(task_figure(out, task, fig_panels))
        # written after every task, so a long run that is interrupted still leaves a (partial) table
        summary = _write_outputs(cfg, out, ctx, rows, per_obs, tuning, figures, t_start,
                                 complete=(dataset, space, task_name) == combos[-1])
    log.info("vision bench done in %.0f s: %s", summary["seconds_total"], out / "table.md")
    return summary


def _write_outputs(cfg, out, ctx, rows, per_obs, tuning, figures, t_start, complete: bool) -> dict:
    summary = {"config": dataclasses.asdict(cfg), "config_hash": config_hash(cfg), "complete": complete,
               "rows": rows, "costs": ctx.costs, "dps_tuning": tuning, "figures": [str(f) for f in figures if f],
               "seconds_total": round(time.perf_counter() - t_start, 1),
               "datasets": ctx.dataset_descriptions()}
    summary["claim"] = claim_check(per_obs)
    write_text(out / "table.json", json.dumps(summary, indent=2, default=str) + "\n")
    write_text(out / "per_observation.jsonl", "".join(json.dumps(r) + "\n" for r in per_obs))
    write_text(out / "table.md", render_markdown(summary))
    return summary
