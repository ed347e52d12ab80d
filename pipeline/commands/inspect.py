"""``python -m pipeline inspect FILE [--config CFG] [--posterior DIR] [--json]``: validate an observation
and summarise it.

Prints shapes, units, pixel scales, the lens model (array frame), PSF, mask fraction, NaN count and
peak SNR, and the guard's verdict on every condition the amortized posterior was trained on (``--posterior``,
default the config's ``posterior_checkpoint`` relative to the repository; :mod:`pipeline.lensing.guard`)
with the policy ``posterior.guard`` gives it; exits 2 with a one-line error naming the file and the
HDU/keyword when the file is invalid.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.config import load_section, load_yaml
from pipeline.lensing.config import PosteriorConfig
from pipeline.lensing.guard import check_observation, policy_of, read_trained_record

ROOT = Path(__file__).resolve().parents[2]


def add_arguments(parser):
    parser.add_argument("file", help="observation FITS file")
    parser.add_argument("--config", default=None, help="pipeline YAML config (lensing: geometry, observation)")
    parser.add_argument("--posterior", default=None, metavar="DIR", help="amortized posterior whose trained "
                        "conditions the observation is judged against (default: the config's posterior_checkpoint)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")


def posterior_dir(args):
    """``--posterior``, else the config's ``posterior_checkpoint`` resolved against the repository (as the
    workflow does); None when neither names one."""
    if args.posterior:
        return Path(args.posterior)
    shipped = load_yaml(args.config).get("posterior_checkpoint") if args.config else None
    if not shipped:
        return None
    return Path(shipped) if Path(shipped).is_absolute() else ROOT / shipped


def guard_verdicts(args, problem, y, meta) -> dict | None:
    """condition -> {inside, policy, reason} against the posterior's trained conditions (None: no posterior)."""
    pdir = posterior_dir(args)
    if pdir is None:
        return None
    gcfg = load_section(args.config, "posterior", PosteriorConfig).guard if args.config else PosteriorConfig().guard
    verdicts = check_observation(read_trained_record(pdir), problem, y, meta, gcfg)
    return {"posterior": str(pdir), "conditions": {
        v.condition: {"inside": v.inside, "policy": policy_of(gcfg, v.condition), "keyword": v.keyword,
                      **({} if v.inside else {"reason": v.reason})} for v in verdicts}}


def print_guard(guard: dict | None) -> None:
    if guard is None:
        print("  trained conditions: no posterior (give --posterior or a config with posterior_checkpoint)")
        return
    print(f"  trained conditions of {guard['posterior']}:")
    for name, v in guard["conditions"].items():
        verdict = "inside" if v["inside"] else f"OUTSIDE ({v['policy']}): {v['reason']}"
        print(f"    {name:12s} {verdict}")


def summarise(meta: dict, problem) -> dict:
    lens = meta["lens"]
    out = {
        "file": meta["path"], "obs_id": meta["obs_id"],
        "image_shape": list(meta["image_shape"]), "pixscale_arcsec": meta["pixscale"], "bunit": meta["bunit"],
        "sci_is_surface_brightness": meta["surface_brightness"], "unit_factor": meta["unit_factor"],
        "lens": {"model": f"{lens.model}+SHEAR", "frame_in_file": meta["frame"], **{
            k: round(v, 6) for k, v in lens.as_dict().items() if k != "model" and (lens.model == "EPL" or k != "t")}},
        "lens_from": meta["lens_source"],
        "source_grid": [meta["source_npix"], meta["source_pixscale"]], "supersample": meta["supersample"],
        "psf": {"shape": list(meta["psf_shape"]), "psfsamp": meta["psfsamp"], "fwhm_arcsec": round(meta["psf_fwhm"], 5)},
        "mask_fraction": round(meta["mask_fraction"], 5), "n_nan": meta["n_nan"], "n_data": problem.n_data,
        "peak_snr_data": round(meta["peak_snr_data"], 3), "operator_nnz": problem.nnz,
        "truth": meta["truth"] is not None, "warnings": meta["warnings"],
    }
    if "peak_snr_truth" in meta:
        out["peak_snr_truth_model"] = round(meta["peak_snr_truth"], 3)
    return out


def run(args) -> int:
    from pipeline.lensing.config import LensingConfig, load_lensing_config
    from pipeline.lensing.observation import load_observation
    from pipeline.runtime import configure_threads

    configure_threads()
    cfg = load_lensing_config(args.config) if args.config else LensingConfig()
    problem, y, meta = load_observation(args.file, cfg)
    s = summarise(meta, problem)
    s["guard"] = guard_verdicts(args, problem, y, meta)
    if args.json:
        print(json.dumps(s, indent=1))
        return 0
    lens = s["lens"]
    print(f"{s['file']}  ({s['obs_id']})")
    print(f"  SCI {s['image_shape'][0]}x{s['image_shape'][1]} at {s['pixscale_arcsec']:.4g}\"/px, BUNIT "
          f"{s['bunit']} ({'surface brightness' if s['sci_is_surface_brightness'] else 'flux per pixel'})")
    print(f"  lens {lens['model']} (from {s['lens_from']}, frame {lens['frame_in_file']}): "
          + ", ".join(f"{k}={v}" for k, v in lens.items() if k not in ('model', 'frame_in_file')))
    print(f"  source grid {s['source_grid'][0]}x{s['source_grid'][0]} at {s['source_grid'][1]:.4g}\"/px, "
          f"supersampling {s['supersample']}")
    print(f"  PSF {s['psf']['shape'][0]}x{s['psf']['shape'][1]} at {s['psf']['psfsamp']:.4g}\"/px, "
          f"FWHM {s['psf']['fwhm_arcsec']:.4g}\"")
    print(f"  mask fraction {s['mask_fraction']:.3f}, NaN pixels {s['n_nan']}, used pixels {s['n_data']}")
    snr = f"  peak SNR (data) {s['peak_snr_data']:.1f}"
    if "peak_snr_truth_model" in s:
        snr += f", (noiseless truth model) {s['peak_snr_truth_model']:.1f}"
    print(snr)
    for w in s["warnings"]:
        print(f"  warning: {w}")
    print_guard(s["guard"])
    return 0
