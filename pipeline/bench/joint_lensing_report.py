"""Figure and printed summary of the stage-B lensing check (:mod:`pipeline.bench.joint_lensing_gaussian`)."""

from __future__ import annotations

import math

import numpy as np
import torch

from pipeline.bench.joint_lensing_mh import circular_mean, circular_unwrap


def marginals_figure(path, names: list[str], truth: torch.Tensor, mh: dict, q: torch.Tensor):
    """Marginals of theta (columns ``names``) on the reference observations: MH (``mh["theta"]``, (n, B, p),
    grey) against draws of q(theta | y) (``q`` (B, n, p), orange), one row per observation, the true value
    (``truth`` (B, p)) dashed; phi unwrapped around MH's circular mean. Writes ``path`` (PNG)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(truth.shape[0], len(names), figsize=(2.6 * len(names), 2.0 * truth.shape[0]), squeeze=False)
    for b in range(truth.shape[0]):
        for j, name in enumerate(names):
            c, s, t = mh["theta"][:, b, j], q[b, :, j], truth[b, j:j + 1]
            if name == "phi":
                centre = circular_mean(c, math.pi)
                c, s, t = (circular_unwrap(v, centre, math.pi) for v in (c, s, t))
            ax = axes[b, j]
            bins = np.linspace(float(min(c.min(), s.min())), float(max(c.max(), s.max())), 50)
            ax.hist(c.numpy(), bins=bins, density=True, color="0.75", label="MH (exact)")
            ax.hist(s.numpy(), bins=bins, density=True, histtype="step", color="C1", label="q(theta | y)")
            ax.axvline(float(t), color="k", ls="--", lw=0.8)
            ax.set_yticks([])
            if b == truth.shape[0] - 1:
                ax.set_xlabel({"rein": "rein (arcsec)", "phi": "phi (rad)"}.get(name, name))
    axes[0, 0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(name: str, block: dict) -> str:
    """The printed summary of one evaluation block of the check's JSON (MH comparison, calibration, refine)."""
    lines = [name]
    for i, row in enumerate(block["reference"]):
        lines.append(f"  obs {i}: MH acceptance {row['acceptance']:.2f}  " + "  ".join(
            f"{k}: dmean {v['dmean_over_sd']:+.2f} sd-ratio {v['sd_ratio']:.2f} ess {v['mh_ess']:.0f}"
            for k, v in row["parameters"].items()))
    cal = block["calibration"]
    lines.append("  calibration: " + "  ".join(
        f"{k}: cov68 {v['coverage'][0.68]:.3f} cov95 {v['coverage'][0.95]:.3f} bias {v['bias']:+.2f} "
        f"sd/prior {cal['sd_over_prior_sd'][k]:.3f}" for k, v in cal["parameters"].items())
        + f"  TARP p {cal['tarp']['tarp_p_value']:.3f}  ok {cal['ok']}")
    gaps = [o["truth_minus_best_draw"] for o in cal["per_observation"]]
    lines.append(f"  truth's log target above every q draw's by > 5 nats on {sum(g > 5 for g in gaps)} of {len(gaps)} "
                 f"observations (largest {max(gaps):.1f})")
    if "refine" in block:
        ess = block["refine"]["ess_fraction_per_observation"]
        lines.append(f"  importance ESS / n < 0.5 on {len(block['refine']['flagged_observations'])} of {len(ess)} "
                     f"observations (smallest {min(ess):.3f}, median {float(np.median(ess)):.3f})")
    return "\n".join(lines)
