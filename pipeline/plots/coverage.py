"""The coverage figure: TARP expected coverage of every method on one set, with bootstrap bands
and the null band, beside the per-pixel interval coverage against the level an exact sampler
reaches with the same number of samples (the diagonal only when no such curve is given)."""

from __future__ import annotations

import numpy as np

from pipeline.plots.common import plt, save_figure


def plot_coverage(path, results: dict, *, title: str | None = None, pixel_levels=None):
    """results: {method: tarp-summary dict} with keys alpha, ecp, ecp_band, null_band,
    tarp_max_dev, tarp_null_p95, n_obs, n_samples, n_alpha_bins, optionally tarp_p_value and
    ``pixel_curve`` ({"levels": [...], "all": [...], "footprint": [...], "ref": [...]}, ``ref`` the
    exact-sampler coverage at each level). One PNG with two panels."""
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10.5, 4.6), constrained_layout=True)
    ax.plot([0, 1], [0, 1], color="k", lw=0.8, ls="--")
    null_drawn = False
    refs_drawn = set()
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (method, r) in enumerate(sorted(results.items())):
        c = colours[i % len(colours)]
        a = np.asarray(r["alpha"])
        if not null_drawn and r.get("null_band") is not None:
            lo, hi = np.asarray(r["null_band"])
            ax.fill_between(a, lo, hi, color="0.8", alpha=0.6, lw=0,
                            label=f"null 95% (n_obs={r['n_obs']}, n_samples={r['n_samples']})")
            null_drawn = True
        lo, hi = np.asarray(r["ecp_band"])
        ax.fill_between(a, lo, hi, color=c, alpha=0.2, lw=0)
        p_txt = f", p = {r['tarp_p_value']:.3f}" if r.get("tarp_p_value") is not None else ""
        ax.plot(a, r["ecp"], color=c, lw=1.6,
                label=f"{method}: max dev {r['tarp_max_dev']:.3f} (null p95 {r['tarp_null_p95']:.3f}{p_txt})")
        pc = r.get("pixel_curve")
        if pc:
            ref_key = (r.get("n_samples"), tuple(pc["levels"]))
            if pc.get("ref") is not None and ref_key not in refs_drawn:
                refs_drawn.add(ref_key)
                ax2.plot(pc["levels"], pc["ref"], color="k", lw=1.0, ls="--", marker=".", ms=3,
                         label=f"exact sampler, n_samples={r.get('n_samples')}")
            ax2.plot(pc["levels"], pc["all"], color=c, lw=1.6, label=f"{method}, all pixels")
            if pc.get("footprint") is not None:
                ax2.plot(pc["levels"], pc["footprint"], color=c, lw=1.2, ls=":", label=f"{method}, footprint")
    n_bins = next(iter(results.values()))["n_alpha_bins"] if results else 0
    ax.set_xlabel("credibility level alpha")
    ax.set_ylabel("expected coverage (TARP)")
    ax.set_title(f"TARP, {n_bins} alpha bins, bands: 95% pointwise bootstrap", fontsize=9)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, loc="upper left")
    if not refs_drawn:
        ax2.plot([0, 1], [0, 1], color="k", lw=0.8, ls="--")
    else:
        ax2.plot([0, 1], [0, 1], color="0.6", lw=0.6, ls=":")
    ax2.set_xlabel("nominal central-interval level")
    ax2.set_ylabel("empirical per-pixel coverage")
    ax2.set_title("rank-based per-pixel interval coverage", fontsize=9)
    ax2.set_xlim(0, 1)
    ax2.set_ylim(0, 1)
    if any(not ln.get_label().startswith("_") for ln in ax2.lines):
        ax2.legend(fontsize=7, loc="upper left")
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)
