"""``python -m pipeline calibrate``: calibration of posterior samplers on one observation set.

Parses the options and calls :func:`pipeline.evaluation.calibration.run_calibration` (TARP with its
exact-sampler null, per-pixel interval coverage, chi2_nu, sharpness, mean error and log Z per
method). Output: ``OUT/summary.json`` (one set; ``report`` merges every ``summary.json`` below its
``--calibration`` dir; with ``--merge`` an existing one keeps its other sets; the set's settings record the
commit and machine it was computed on), ``OUT/coverage_SET.png`` and ``OUT/lenses/SET_METHOD_OBS.png``.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.evaluation.calibration import run_calibration
from pipeline.evaluation.results_page import stamp_provenance
from pipeline.runtime import configure_threads


def add_arguments(parser) -> None:
    parser.add_argument("--posteriors", nargs="+", required=True, metavar="DIR_OR_GLOB",
                        help="posterior FITS files, directories of them or globs; several methods at once "
                             "(the method is the file's LABEL keyword, else its METHOD, else its directory name)")
    parser.add_argument("--observations", required=True, metavar="DIR",
                        help="directory of the observation FITS files the posteriors were drawn for "
                             "(matched by the posterior's OBSFILE keyword, else by file name)")
    parser.add_argument("--set", required=True, choices=["prior", "heldout"], dest="set_name",
                        help="prior: truths drawn from the trained prior's chain; heldout: held-out galaxies")
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory (summary.json, PNGs)")
    parser.add_argument("--config", metavar="FILE", help="pipeline YAML (its lensing: section reads observations)")
    parser.add_argument("--prior-samples", metavar="FITS_OR_DIR",
                        help="prior draws for the sharpness denominator: a FITS file with a SAMPLES HDU "
                             "(sample-prior output) or a directory of observations whose TRUTH HDUs are prior "
                             "draws. Default: for --set prior, the truths of this set; else sharpness is null")
    parser.add_argument("--alpha-bins", type=int, default=10, help="number of TARP alpha bins (fixed; default 10)")
    parser.add_argument("--n-boot", type=int, default=500, help="bootstrap resamples for TARP bands (default 500)")
    parser.add_argument("--n-null", type=int, default=None,
                        help="draws of the TARP null distribution (default 2000 from the exact rank law with pooled "
                             "normalisation; 300 Gaussian simulations with --tarp-norm truths)")
    parser.add_argument("--tarp-norm", default="pooled", choices=["pooled", "truths", "none"],
                        help="TARP coordinate normalisation: pooled min/max of samples and truths (default; keeps "
                             "the null exact for few observations), truths only (the tarp package), or none")
    parser.add_argument("--footprint-frac", type=float, default=0.1,
                        help="footprint = pooled mean of truth and samples > FRAC * its peak, per observation "
                             "(default 0.1)")
    parser.add_argument("--lens-figures", type=int, default=2,
                        help="per-lens figures per method (first N observations; default 2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the TARP references, bootstrap and null")
    parser.add_argument("--merge", action="store_true",
                        help="merge into an existing OUT/summary.json instead of replacing it")


def run(args) -> int:
    configure_threads()
    run_calibration(args.posteriors, args.observations, args.set_name, args.out, config=args.config,
                    prior_samples=args.prior_samples, n_bins=args.alpha_bins, n_boot=args.n_boot,
                    n_null=args.n_null, footprint_frac=args.footprint_frac, lens_figures=args.lens_figures,
                    seed=args.seed, merge=args.merge, tarp_norm=args.tarp_norm)
    stamp_provenance(Path(args.out) / "summary.json", args.set_name)
    return 0
