"""Scores, summaries, the table and the figure of the GMM benchmark.

Per run: sliced Wasserstein distance ``sw`` to the reference (and in the row space of A above 2-D),
its Monte-Carlo floor (the distance between two independent reference sets), the total variation
between the mixture-component weights of the samples and of the reference (``mode_tv``), and log Z
(ELBO and importance-weighted, nats). Per case and method: means and standard errors over seeds.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from pipeline.bench.gmm_cases import GMMCase
from pipeline.io.atomic import atomic_file
from pipeline.metrics.distances import component_weights, mode_tv, sliced_wasserstein
from pipeline.metrics.logz import estimate_logz_samples

N_PROJECTIONS = 256
MODE_TV_WRONG = 0.5  # a run whose mode TV exceeds this has most of its mass on the wrong components
SUMMARY_KEYS = ("sw", "sw_floor", "excess_sw", "sw_rowspace", "excess_sw_rowspace", "mode_tv", "logz_elbo",
                "logz_iw", "err_logz_iw", "err_logz_iw_large", "err_logz_elbo", "seconds", "nfe_per_sample",
                "rollbacks")


def sample_metrics(case: GMMCase, x0, ref: dict, logz_analytic: float) -> dict:
    """Distances of samples x0 (N, d) to the reference ``ref`` of
    :func:`~pipeline.bench.gmm_reference.chain_reference`, and the reference's log Z (nats) and ESS."""
    x0 = x0.double().reshape(x0.shape[0], -1)
    out = {"sw": sliced_wasserstein(x0, ref["ref1"], N_PROJECTIONS, seed=1),
           "sw_floor": sliced_wasserstein(ref["ref2"], ref["ref1"], N_PROJECTIONS, seed=1)}
    if case.d_x > 2:
        A = case.problem.M
        out["sw_rowspace"] = sliced_wasserstein(x0, ref["ref1"], N_PROJECTIONS, seed=1, row_space=A)
        out["sw_rowspace_floor"] = sliced_wasserstein(ref["ref2"], ref["ref1"], N_PROJECTIONS, seed=1, row_space=A)
    J = case.prior.means.shape[0]
    wm = component_weights(case.prior.component_of(x0), J)
    wr = component_weights(case.prior.component_of(ref["ref1"].double()), J)
    out["mode_tv"] = mode_tv(wm, wr)
    out["logz_ref"] = ref["logz_ref"]
    out["logz_analytic"] = logz_analytic
    out["ref_ess"] = ref["ref_ess"]
    return out


def logz_fields(smp) -> dict:
    """log Z (ELBO with its standard error, IW) and ESS of a Samples, None where it has no density."""
    try:
        est = estimate_logz_samples(smp)
        return {"logz_elbo": est.elbo, "logz_elbo_se": est.elbo_se, "logz_iw": est.iw, "ess": est.ess}
    except ValueError:
        iw = smp.info.get("logz_iw") if isinstance(smp.info, dict) else None
        return {"logz_elbo": None, "logz_elbo_se": None, "logz_iw": iw, "ess": None}


def summarise(runs: list[dict]) -> dict:
    """Mean and standard error over seeds of every numeric field, per method."""
    by: dict[str, list[dict]] = {}
    for r in runs:
        by.setdefault(r["method"], []).append(r)
    out = {}
    for m, rs in by.items():
        s = {}
        for key in SUMMARY_KEYS:
            vals = [r[key] for r in rs if r.get(key) is not None and math.isfinite(r[key])]
            if vals:
                se = statistics.stdev(vals) / math.sqrt(len(vals)) if len(vals) > 1 else None
                s[key] = {"mean": statistics.fmean(vals), "se": se, "n": len(vals)}
        s["diverged"] = sum(bool(r.get("diverged")) for r in rs)
        s["seeds"] = len(rs)
        s["particles"] = rs[0].get("particles")
        out[m] = s
    return out


def targets(cases: dict) -> dict:
    """The acceptance criteria on the 2-D case: RTB's excess sw <= half of DPS's, RTB's |log Z_IW - ref|
    <= 0.1 nat, and the number of diverged RTB runs."""
    c = cases.get("2d")
    if not c:
        return {}
    s = c["summary"]
    out = {}
    if "rtb" in s and "dps" in s and "excess_sw" in s["rtb"] and "excess_sw" in s["dps"]:
        r, d = s["rtb"]["excess_sw"]["mean"], s["dps"]["excess_sw"]["mean"]
        out["rtb_excess_sw"] = r
        out["dps_excess_sw"] = d
        out["rtb_excess_le_half_dps"] = bool(r <= 0.5 * d)
    if "rtb" in s and "err_logz_iw" in s["rtb"]:
        out["rtb_abs_logz_iw_err"] = s["rtb"]["err_logz_iw"]["mean"]
        out["rtb_logz_iw_within_0.1"] = bool(s["rtb"]["err_logz_iw"]["mean"] <= 0.1)
    out["rtb_diverged"] = sum(s.get(m, {}).get("diverged", 0) for m in ("rtb", "rtb_amortized"))
    return out


def _cell(s: dict, key: str, digits: int = 3) -> str:
    v = s.get(key)
    if not v:
        return "n/a"
    se = v.get("se")
    return f"{v['mean']:.{digits}f}" + (f" ± {se:.{digits}f}" if se is not None else "")


def _wrong_modes(case_block: dict, method: str) -> str:
    """Runs that put more than half their mass on the wrong components (mode TV > 0.5): the 1-nat log Z
    test of ``diverged`` does not see these, since importance weighting corrects log Z, not the samples."""
    tv = [r["mode_tv"] for r in case_block.get("runs", []) if r["method"] == method and r.get("mode_tv") is not None]
    return f"{sum(v > MODE_TV_WRONG for v in tv)}/{len(tv)}" if tv else "n/a"


def _references_line(result: dict) -> list[str]:
    refs = []
    for cname, c in result["cases"].items():
        r = list(c.get("references", {}).values())
        if r:
            refs.append(f"{cname}: {r[0].get('proposal', '?')}, min ESS {min(x['ref_ess'] for x in r):,.0f} "
                        f"(>= 10 N in {sum(bool(x.get('ess_ge_10N')) for x in r)}/{len(r)} seeds)")
    return ["", "References: " + "; ".join(refs) + "."] if refs else []


def table(result: dict) -> str:
    """A markdown table of the per-case, per-method means (± standard errors) over seeds."""
    n_logz = next((r.get("n_logz") for c in result["cases"].values() for r in c.get("runs", []) if r.get("n_logz")),
                  None)
    large = f"abs(logZ_IW - ref), {n_logz:,} traj." if n_logz else "abs(logZ_IW - ref), RTB large"
    lines = [f"| case | method | excess sw | excess sw, row space of A | mode TV | mode TV > {MODE_TV_WRONG} | abs(logZ_IW - ref) "
             f"| {large} | abs(ELBO - ref) | s | NFE/sample | particles | diverged |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for cname, c in result["cases"].items():
        for m, s in c["summary"].items():
            lines.append(f"| {cname} | {m} | {_cell(s, 'excess_sw')} | {_cell(s, 'excess_sw_rowspace')} | "
                         f"{_cell(s, 'mode_tv')} | {_wrong_modes(c, m)} | "
                         f"{_cell(s, 'err_logz_iw')} | {_cell(s, 'err_logz_iw_large')} | "
                         f"{_cell(s, 'err_logz_elbo')} | {_cell(s, 'seconds', 1)} | {_cell(s, 'nfe_per_sample', 0)} | "
                         f"{s.get('particles') or ''} | {s['diverged']}/{s['seeds']} |")
    return "\n".join(lines + _references_line(result))


def figure(case: GMMCase, samples: dict, path: Path) -> None:
    """Scatter plots of each method's samples (seed 0) over the component means, written to ``path``."""
    import matplotlib.pyplot as plt

    names = list(samples)
    cols = min(4, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
    m = case.prior.means.numpy()
    for ax, name in zip(axes.flat, names):
        x = samples[name].double().numpy()
        ax.scatter(m[:, 0], m[:, 1], s=12, c="lightgray", marker="x")
        ax.scatter(x[:, 0], x[:, 1], s=2, alpha=0.4)
        ax.set_title(name, fontsize=9)
        ax.set_xlim(-24, 24)
        ax.set_ylim(-24, 24)
        ax.set_aspect("equal")
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle(f"GMM {case.name}: chain-prior posterior samples (seed 0)", fontsize=10)
    fig.tight_layout()
    try:
        with atomic_file(path) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(fig)
