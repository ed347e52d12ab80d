"""Per-observation coverage of one method, grouped by the observations' peak signal-to-noise.

    python -m pipeline.bench.coverage_by_snr SUMMARY.json MANIFEST.json [--method rtb_amortized]
        [--groups 4] [--out OUT.json]

``SUMMARY.json`` is a ``calibrate`` summary (its ``per_obs`` coverages, in observation order) and
``MANIFEST.json`` the simulated set's manifest (``simulate-prior-set``; its ``observations[i].peak_snr``,
the brightest pixel of the noiseless image over the noise sigma). The observations are sorted by peak
SNR and split into ``--groups`` groups of near-equal size
(:func:`pipeline.evaluation.groups.snr_groups`, which ``calibrate`` also writes as ``per_snr`` when the
observations carry PEAKSNR; this command reads summaries written without it); per group it prints the SNR range, the mean
per-observation 68 % and 95 % coverage, and the median χ²_ν in the arc, beside the exact-sampler
levels the summary records (``coverage68_ref``, ``coverage95_ref``: what exact samples of the same
size score under the same rule). A pooled coverage that meets the exact level can hide groups on either
side of it: too narrow on faint sources and too wide on bright ones cancel in the mean but not in TARP.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from pipeline.errors import InputFileError, PipelineError
from pipeline.evaluation.groups import snr_groups


def _read(path: str) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise InputFileError(path, "no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputFileError(path, f"not JSON ({err})") from None


def method_summary(summary: dict, method: str, path: str) -> dict:
    """The one set's summary of ``method`` from a ``calibrate`` summary (``sets`` holds one set)."""
    sets = summary.get("sets")
    if not isinstance(sets, dict) or len(sets) != 1:
        raise InputFileError(path, "expected a calibrate summary with exactly one set", field="sets")
    per_set = next(iter(sets.values()))
    if method not in per_set:
        raise InputFileError(path, f"no method {method!r} (has {', '.join(sorted(per_set))})", field="sets")
    return per_set[method]


def _peak_snrs(manifest: dict, path: str, m: dict, summary_path: str) -> list[float]:
    """The manifest's finite peak SNRs, in the summary's observation order (matched by file name when both
    name their observations)."""
    obs = manifest.get("observations")
    if not isinstance(obs, list) or not all(isinstance(o, dict) and "peak_snr" in o for o in obs):
        raise InputFileError(path, "needs a list of observations with peak_snr", field="observations")
    names = m.get("observations")
    if names and all("file" in o for o in obs):
        by_name = {str(o["file"]).rsplit("/", 1)[-1]: o for o in obs}
        missing = [n for n in names if n not in by_name]
        if missing:
            raise InputFileError(path, f"has no observation {missing[0]} (named in {summary_path})",
                                 field="observations")
        obs = [by_name[n] for n in names]
    elif len(obs) != len(m.get("per_obs", {}).get("coverage68", [])):
        raise InputFileError(path, f"{len(obs)} observations, the summary has "
                                   f"{len(m.get('per_obs', {}).get('coverage68', []))}", field="observations")
    try:
        snr = [float(o["peak_snr"]) for o in obs]
    except (TypeError, ValueError):
        snr = [float("nan")]
    if not all(math.isfinite(v) for v in snr):
        raise InputFileError(path, "every peak_snr must be a finite number", field="observations")
    return snr


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.bench.coverage_by_snr", description=__doc__.split("\n")[0])
    ap.add_argument("summary", help="a calibrate summary.json (one set)")
    ap.add_argument("manifest", help="the set's manifest.json (simulate-prior-set), with peak_snr per observation")
    ap.add_argument("--method", default="rtb_amortized", help="method in the summary (default rtb_amortized)")
    ap.add_argument("--groups", type=int, default=4, help="SNR groups of near-equal size (default 4)")
    ap.add_argument("--out", default=None, help="also write the rows as JSON here")
    a = ap.parse_args(argv)
    try:
        m = method_summary(_read(a.summary), a.method, a.summary)
        snr = _peak_snrs(_read(a.manifest), a.manifest, m, a.summary)
        if not 1 <= a.groups <= len(snr):
            ap.error(f"--groups must be in [1, {len(snr)}], got {a.groups}")
        try:
            rows = snr_groups(m["per_obs"], snr, a.groups)
            ref68, ref95 = m["coverage68_ref"], m["coverage95_ref"]
        except (KeyError, TypeError, ValueError) as err:
            raise InputFileError(a.summary, f"not a calibrate summary of per-observation coverages ({err})",
                                 field=f"sets.*.{a.method}") from None
    except PipelineError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{a.method}: {len(snr)} observations; exact-sampler coverage {ref68:.3f} / {ref95:.3f}")
    for r in rows:
        arc = "n/a" if r["chi2_arc_median"] is None else f"{r['chi2_arc_median']:.3f}"
        print(f"peak SNR {r['snr_min']:6.1f} - {r['snr_max']:6.1f} ({r['n_obs']:3d}): coverage68 {r['coverage68']:.3f}, "
              f"coverage95 {r['coverage95']:.3f}, arc chi2_nu median {arc}")
    if a.out:
        Path(a.out).write_text(json.dumps({"summary": a.summary, "manifest": a.manifest, "method": a.method,
                                           "coverage68_ref": ref68, "coverage95_ref": ref95, "groups": rows},
                                          indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
