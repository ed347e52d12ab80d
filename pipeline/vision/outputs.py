"""Outputs of the vision benchmark: per-task rows (means over observations), the RTB-vs-DPS ELBO
claim check, the markdown table and the figure grids. log Z in nats, PSNR in dB.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from pipeline.vision.tasks import Task


def aggregate(recs: list[dict], **extra) -> dict:
    """Means over observations; the ELBO's SE combines the per-observation SEs (independent)."""
    r0 = recs[0]
    row = {k: r0[k] for k in ("dataset", "space", "task", "method", "n", "nfe")}
    row["n_obs"] = len(recs)

    def mean(key):
        vals = [r[key] for r in recs if r.get(key) is not None]
        return float(np.mean(vals)) if len(vals) == len(recs) else None

    for key in ("mean_log_r", "elbo", "iw", "psnr", "ssim", "psnr_of_mean", "seconds_per_sample", "ess"):
        row[key] = mean(key)
    ses = [r["elbo_se"] for r in recs if r.get("elbo_se") is not None]
    row["elbo_se"] = float(math.sqrt(sum(s * s for s in ses)) / len(recs)) if len(ses) == len(recs) else None
    row.update(extra)
    return row


def claim_check(per_obs: list[dict]) -> dict:
    """Per task and observation: is RTB's (and RTB+DPS's) ELBO >= DPS's? Counted with the SEs."""
    by = {}
    for r in per_obs:
        by.setdefault((r["dataset"], r["space"], r["task"], r["obs"]), {})[r["method"]] = r
    res = {}
    for (d, sp, t, i), ms in sorted(by.items()):
        if "dps" not in ms or ms["dps"].get("elbo") is None:
            continue
        for m in ("rtb_amortized", "rtb_dps"):
            if m not in ms or ms[m].get("elbo") is None:
                continue
            key = f"{d}/{sp}/{t}/{m}"
            e = res.setdefault(key, {"n_obs": 0, "geq": 0, "significantly_lower": 0, "diff": []})
            diff = ms[m]["elbo"] - ms["dps"]["elbo"]
            se = math.hypot(ms[m].get("elbo_se") or 0.0, ms["dps"].get("elbo_se") or 0.0)
            e["n_obs"] += 1
            e["geq"] += int(diff >= 0)
            e["significantly_lower"] += int(diff < -2 * se)
            e["diff"].append(round(diff, 3))
    lines = []
    for key, e in res.items():
        lines.append(f"{key}: ELBO >= DPS on {e['geq']}/{e['n_obs']} observations "
                     f"({e['significantly_lower']} lower by > 2 SE); mean diff {np.mean(e['diff']):+.1f} nats")
    return {"per_task": res, "summary": lines}


def _fmt(v, spec=".1f"):
    return "n/a" if v is None else format(v, spec)


def render_markdown(summary: dict) -> str:
    """``table.md``: the settings, one row per dataset x space x task x method, the claim check, the
    training costs and the DPS-scale tuning records of a run's summary."""
    cfg = summary["config"]
    lines = ["# Vision benchmark (bench vision)", ""]
    if not summary.get("complete", True):
        lines += ["**PARTIAL: the run has not finished all tasks yet.**", ""]
    for name, d in summary["datasets"].items():
        tag = "**STAND-IN (not CIFAR-10)**: " if d["standin"] else ""
        lines.append(f"- {name}: {tag}{d['name']}, {d['image_shape']}, splits {d['n']}")
    lines += [
        f"- sigma_y = {cfg['sigma_y']}; K = {cfg['chain']['K']} chain steps for every method; {cfg['n_obs']} test "
        f"observations per task, {cfg['n_samples']} samples per observation and method; seed {cfg['seed']}.",
        "- log Z in nats, per observation then averaged over observations: ELBO +- SE (mean of "
        "log r + log p(tau) - log q(tau)) and IW (log-mean-exp). FPS-SMC: not available (SMC normaliser of "
        "the bridged model). prior_is: IW over all its prior-chain proposals; its ELBO column is the prior "
        "chain's own (mean log r of the proposals). FPS: its log q is "
        "the density given the sample's own random bridge y_{1:K} (the marginal is intractable); the bridge "
        "is an auxiliary variable whose law does not depend on the trajectory, so its ELBO/IW are valid "
        "but loose lower bounds on log p(y) under the chain, not estimates of it.",
        "- RTB rows: amortized posteriors (one per dataset x task), trained on observations simulated from "
        "TRAIN images and evaluated on the held-out observations; the budget column gives their training.",
        "- PSNR/SSIM against the truth, images in [-1, 1] (SSIM on [0, 1]); phase retrieval samples are first "
        "aligned to the truth over shifts and the 180-degree rotation (|FFT| cannot see them).",
        "- Priors: the denoised estimate is clipped to the data range (clip_denoised) for every method.",
        "- NFE: network evaluations per sample (prior eps calls + DPS VJPs; RTB: K prior + K-1 head calls).",
        "",
        "| dataset | space | task | method | mean log r | log Z ELBO +- SE | log Z IW | PSNR | SSIM | "
        "s/sample | NFE | budget |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary["rows"]:
        elbo = "n/a" if r["elbo"] is None else f"{r['elbo']:.1f} +- {r['elbo_se']:.1f}"
        lines.append(f"| {r['dataset']} | {r['space']} | {r['task']} | {r['method']} | {_fmt(r['mean_log_r'])} | "
                     f"{elbo} | {_fmt(r['iw'])} | {_fmt(r['psnr'], '.2f')} | {_fmt(r['ssim'], '.3f')} | "
                     f"{_fmt(r['seconds_per_sample'], '.3f')} | {r['nfe']} | {r['budget']} |")
    lines += ["", "## Claim: RTB's log Z (ELBO) >= DPS's, per task", ""]
    lines += [f"- {s}" for s in summary["claim"]["summary"]] or ["- (no RTB/DPS pair was run)"]
    lines += ["", "## Training costs", ""]
    for k, v in summary["costs"].items():
        lines.append(f"- {k}: {json.dumps(v)}")
    if summary["dps_tuning"]:
        lines += ["", "## DPS scale tuning (on a separate observation)", ""]
        for k, v in summary["dps_tuning"].items():
            rec = v["grid"]
            grid = ", ".join(f"{g:g}: {_fmt(val)}" for g, val in zip(rec["grid"], rec["values"]))
            lines.append(f"- {k}: chose {v['chosen']:g} by {v['metric']} ({grid})")
    lines += ["", f"Total wall time: {summary['seconds_total']:.0f} s. Figures: "
              + ", ".join(Path(f).name for f in summary["figures"]), ""]
    return "\n".join(lines)


def _show_y(task: Task) -> np.ndarray:
    """A displayable (H', W', C) picture of the first observation."""
    y = task.ys[0].detach().cpu().float()
    if task.task == "phase_retrieval":
        a = torch.log1p(torch.fft.fftshift(y, dim=(-2, -1)))
        a = a / a.max()
        return a.permute(1, 2, 0).numpy()
    y = y.clone()
    y[~task.image_op.mask.cpu()] = 0.0  # hidden pixels grey
    return ((y.clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()


def task_figure(out: Path, task: Task, panels: dict) -> Path | None:
    """Grid: one row per method (truth, observation, samples, sample mean) for observation 0, written to
    ``out/figures/<dataset>_<space>_<task>.png``."""
    if not panels:
        return None
    import matplotlib.pyplot as plt

    def pic(x):
        return ((x.clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()

    n_s = max(len(v) for v in panels.values())
    rows, cols = len(panels), n_s + 3
    fig, axes = plt.subplots(rows, cols, figsize=(1.3 * cols, 1.35 * rows + 0.4), squeeze=False)
    truth = task.truths[0].detach().cpu()
    ypic = _show_y(task)
    cmap = "gray" if truth.shape[0] == 1 else None
    for r, (method, imgs) in enumerate(panels.items()):
        ims = [pic(truth), ypic] + [pic(im) for im in imgs] + [pic(imgs.mean(0))]
        titles = ["truth", "y"] + [f"sample {j + 1}" for j in range(len(imgs))] + ["mean"]
        for c in range(cols):
            ax = axes[r, c]
            ax.axis("off")
            if c < len(ims):
                im = ims[c]
                ax.imshow(im[..., 0] if im.shape[-1] == 1 else im, cmap=cmap, vmin=0, vmax=1)
                if r == 0:
                    ax.set_title(titles[c] if c < len(ims) - 1 else "mean", fontsize=7)
        axes[r, 0].text(-0.1, 0.5, method, transform=axes[r, 0].transAxes, ha="right", va="center", fontsize=7)
    fig.suptitle(f"{task.key}" + (" (phase retrieval: aligned)" if task.task == "phase_retrieval" else ""),
                 fontsize=8)
    path = out / "figures" / f"{task.ds_name}_{task.space}_{task.task}.png"
    from pipeline.plots.common import save_figure

    return save_figure(fig, path, dpi=110, bbox_inches="tight")
