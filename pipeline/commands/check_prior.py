"""``python -m pipeline check-prior``: does the prior chain make galaxies?

Draws samples from a prior checkpoint's chain (or reads draws written by ``sample-prior``), compares
them with a reference set of galaxies the prior never trained on (the sources cube's VALID or TEST HDU)
through image statistics and a classifier two-sample test (:mod:`pipeline.evaluation.prior_fidelity`,
:mod:`pipeline.evaluation.prior_classifier`), and prints one JSON line with every figure and setting.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline.commands import int_at_least
from pipeline.config import load_section, read_device
from pipeline.diffusion.chain_config import ChainConfig
from pipeline.diffusion.network_prior import load_prior
from pipeline.diffusion.sampling import sample_prior
from pipeline.diffusion.schedule import build_chain
from pipeline.errors import InputFileError
from pipeline.evaluation.prior_classifier import ClassifierBudget, classifier_two_sample_test
from pipeline.evaluation.prior_fidelity import NEG_THRESHOLD, fidelity_statistics
from pipeline.evaluation.prior_fidelity_plot import save_fidelity_png
from pipeline.io.atomic import write_json
from pipeline.io.fits import read_header, read_image_hdu
from pipeline.runtime import choose_device, configure_threads, seed_everything, tqdm_disable

log = logging.getLogger(__name__)
DEFAULT_N = 1000


def add_arguments(parser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", metavar="DIR", help="prior to draw from (as for sample-prior)")
    source.add_argument("--draws", metavar="FILE.fits", help="draws written by sample-prior (HDU SAMPLES)")
    parser.add_argument("--data", required=True, metavar="FILE.fits", help="reference galaxies, e.g. the sources cube")
    parser.add_argument("--hdu", default="VALID", help="image HDU of --data (default VALID; TEST for final figures)")
    parser.add_argument("--config", metavar="FILE", help="pipeline YAML config: its chain: section and device")
    parser.add_argument("--n", type=int_at_least(4), help=f"number of draws (default {DEFAULT_N}; with --draws, "
                                                          "the first n of the file, default all)")
    parser.add_argument("--K", type=int_at_least(2), help="chain length override (default: chain.K)")
    parser.add_argument("--spacing", choices=["uniform", "quadratic"], help="timestep grid override")
    parser.add_argument("--seed", type=int, default=0, help="seed of the draws and of the classifier (default 0)")
    parser.add_argument("--batch-size", type=int_at_least(1), default=64, help="draws per batch (default 64)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default: the config's device, else auto")
    parser.add_argument("--neg-threshold", type=float, default=NEG_THRESHOLD,
                        help=f"pixel value counted as strongly negative, data units (default {NEG_THRESHOLD})")
    parser.add_argument("--out-json", metavar="FILE.json", help="also write the result here")
    parser.add_argument("--png", metavar="FILE.png", help="figure: draws beside data, power ratio, histograms")


def _sample_draws(args) -> tuple[np.ndarray, dict]:
    """Draws of the chain in physical units, (n, H, W), the same as ``sample-prior`` with these options."""
    ccfg = load_section(args.config, "chain", ChainConfig) if args.config else ChainConfig()
    if args.K is not None or args.spacing:  # an explicit grid of another length no longer applies
        ccfg.K, ccfg.spacing, ccfg.timesteps = args.K or ccfg.K, args.spacing or ccfg.spacing, None
    device = choose_device(args.device or (read_device(args.config) if args.config else "auto"))
    prior = load_prior(args.checkpoint, device=device)
    if prior.event_shape[0] != 1:
        raise InputFileError(args.checkpoint, f"prior makes {prior.event_shape[0]}-channel images; "
                                              "check-prior compares single-band images", field="event_shape")
    chain = build_chain(ccfg, prior.schedule, args.config or "<defaults>")
    n, gen = args.n or DEFAULT_N, seed_everything(args.seed)
    log.info("sampling %d draws from %s, K=%d (%s) on %s", n, args.checkpoint, chain.K, ccfg.spacing, device)
    batches = [min(args.batch_size, n - s) for s in range(0, n, args.batch_size)]
    parts = [sample_prior(prior, chain, m, generator=gen, batch_size=m, device=device)
             for m in tqdm(batches, desc="check-prior draws", disable=tqdm_disable())]
    draws = np.concatenate([prior.to_physical(x).cpu().numpy() for x in parts])[:, 0]
    data_meta = prior.meta.get("data") or {}
    return draws, {"source": "chain", "checkpoint": str(args.checkpoint), "n": n, "seed": args.seed,
                   "chain": {"K": chain.K, "variance": chain.variance,
                             "spacing": "explicit" if ccfg.timesteps else ccfg.spacing, "grid": chain.t.tolist()},
                   "unit": data_meta.get("bunit"), "pixscale": data_meta.get("pixscale")}


def _grid(header) -> list[int] | None:
    """The chain's timestep grid a ``sample-prior`` file records (``CHAINGRD``); None for older files."""
    return [int(t) for t in str(header["CHAINGRD"]).split(",")] if "CHAINGRD" in header else None


def _read_draws(args) -> tuple[np.ndarray, dict]:
    """Draws from a ``sample-prior`` FITS file: HDU SAMPLES, (n, H, W) or (n, 1, H, W)."""
    draws, hdr = read_image_hdu(args.draws, "SAMPLES", header=True)
    if draws.ndim == 4 and draws.shape[1] == 1:
        draws = draws[:, 0]
    if draws.ndim != 3:
        raise InputFileError(args.draws, f"expected single-band draws (n, H, W), got shape {draws.shape}",
                             field="SAMPLES")
    draws = draws[: args.n] if args.n else draws
    prim = read_header(args.draws)
    return draws, {"source": str(args.draws), "n": len(draws), "seed": prim.get("SEED"),
                   "checkpoint": prim.get("CKPT"),
                   "chain": {"K": prim.get("CHAIN_K"), "variance": prim.get("CHAINVAR"), "grid": _grid(prim)},
                   "unit": hdr.get("BUNIT"), "pixscale": hdr.get("PIXSCALE")}


def _read_reference(args, shape, unit, pixscale) -> tuple[np.ndarray, dict]:
    """The reference images in ``--data [--hdu]``, checked against the draws' image shape, unit and pixel scale."""
    data, hdr = read_image_hdu(args.data, args.hdu, header=True)
    hdu = args.hdu.upper()
    if data.ndim == 4 and data.shape[1] == 1:
        data = data[:, 0]
    if data.ndim != 3 or data.shape[1:] != tuple(shape):
        raise InputFileError(args.data, f"images of shape {data.shape[1:]} do not match the draws' "
                                        f"{tuple(shape)}", field=hdu)
    if not unit:
        log.warning("the draws record no unit: %s[%s] BUNIT %r is taken on trust", args.data, hdu, hdr.get("BUNIT"))
    elif hdr.get("BUNIT") != unit:
        raise InputFileError(args.data, f"BUNIT {hdr.get('BUNIT')!r} differs from the prior's unit {unit!r}",
                             field=f"{hdu} BUNIT")
    if hdr.get("PIXSCALE") is None:
        raise InputFileError(args.data, "no PIXSCALE keyword (arcsec/pixel)", field=f"{hdu} PIXSCALE")
    if pixscale is not None and not math.isclose(float(hdr["PIXSCALE"]), float(pixscale), rel_tol=1e-6):
        raise InputFileError(args.data, f"PIXSCALE {hdr['PIXSCALE']} differs from the prior's {pixscale}",
                             field=f"{hdu} PIXSCALE")
    return data, {"path": str(args.data), "hdu": hdu, "n": len(data), "unit": hdr.get("BUNIT"),
                  "pixscale": float(hdr["PIXSCALE"])}


def _finite(obj):
    """``obj`` with NaN and infinities as None (strict JSON)."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def run(args) -> int:
    configure_threads()
    draws, draws_meta = _read_draws(args) if args.draws else _sample_draws(args)
    data, data_meta = _read_reference(args, draws.shape[1:], draws_meta["unit"], draws_meta["pixscale"])
    unit = data_meta["unit"] or "data units"
    log.info("statistics of %d draws against %d images of %s[%s]", len(draws), len(data), args.data, data_meta["hdu"])
    stats = fidelity_statistics(draws, data, data_meta["pixscale"], neg_threshold=args.neg_threshold, unit=unit)
    log.info("classifier two-sample test")
    clf = classifier_two_sample_test(draws, data, seed=args.seed, budget=ClassifierBudget())
    result = _finite({"command": "check-prior", "draws": draws_meta, "data": data_meta, "seed": args.seed,
                      "neg_threshold": args.neg_threshold, "statistics": stats, "classifier": clf})
    print(json.dumps(result), flush=True)
    if args.out_json:
        write_json(args.out_json, result)
        log.info("wrote %s", args.out_json)
    if args.png:
        source = Path(draws_meta["source"]).name  # a file's name, not its machine-specific path
        title = f"{source} (K={draws_meta['chain'].get('K')}) vs {Path(data_meta['path']).name} {data_meta['hdu']}"
        save_fidelity_png(draws, data, stats, args.png, title=title)
        log.info("wrote %s", args.png)
    return 0
