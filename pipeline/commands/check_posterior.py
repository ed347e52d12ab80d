"""``python -m pipeline check-posterior``: seeded fit check of amortized lensing posteriors.

Draws the same prior-predictive observations (lenses, prior-chain truths, noise; ``--seed``) for every
posterior given, samples each, and prints one JSON line per posterior: the medians over observations of
chi2_nu over the image and inside the arc, of the ELBO and of the per-pixel posterior std, plus the
per-observation values. ``truth_chi2_nu`` / ``truth_chi2_arc_nu`` are the truths' own values: what
exact posterior samples would score (they are exchangeable with the truth given y). ``frac_above_band``:
per observation, the share of samples whose chi2_nu is above the central 99.9 % band of chi2_m / m, which
the medians hide (exact samples: 0.0005, ``frac_above_band_exact``). For comparing
training runs or stages quickly; calibration is ``calibrate``.
"""

from __future__ import annotations

import argparse
import json

from pipeline.commands import int_at_least
from pipeline.rtb.step_variance import MODES as STEP_VARIANCE_MODES


def add_arguments(parser) -> None:
    parser.add_argument("--config", required=True, metavar="FILE", help="pipeline YAML config (lensing:)")
    parser.add_argument("--prior", required=True, metavar="DIR", help="trained prior")
    parser.add_argument("--posterior", required=True, nargs="+", metavar="DIR",
                        help="posterior(s): finetune-posterior --out exports, or trainer checkpoints with --noise-sigma")
    parser.add_argument("--n-obs", type=int_at_least(1), default=16, help="observations (default 16)")
    parser.add_argument("--samples", type=int_at_least(2), default=32, help="posterior samples per observation (default 32)")
    parser.add_argument("--seed", type=int, default=42, help="seed of the observation set (default 42)")
    parser.add_argument("--last-step", choices=("policy", "gauss_newton"), default="policy",
                        help="the step x_2 -> x_1: the network's own (default) or the Gauss-Newton twisted step of "
                             "rtb_amortized_gn (one d x d Jacobian per sample and iteration: use a GPU)")
    parser.add_argument("--step-variance-tau2", type=_tau2, default=None, metavar="TAU2|off",
                        help="sample with this likelihood-informed step variance (rtb.policy.step_variance_tau2, network "
                             "units^2) or 'off', instead of the posterior's own (for comparing settings on one network)")
    parser.add_argument("--step-variance-mode", choices=STEP_VARIANCE_MODES, default=None,
                        help="with --step-variance-tau2: the prior variance is that value for every pixel (prior), "
                             "per pixel the Tweedie estimate's square plus it (tweedie) or per sample that square's "
                             "mean over pixels plus it (galaxy); default: the posterior's own")
    parser.add_argument("--step-mean-shift", choices=("on", "off"), default=None,
                        help="sample with the likelihood-informed step mean shift on or off (rtb.policy.step_mean_shift; "
                             "needs a step variance); default: the posterior's own")
    parser.add_argument("--step-mean-cg-iters", type=int_at_least(0), default=None, metavar="N",
                        help="conjugate-gradient iterations of that shift on the whole operator (0: the damped diagonal "
                             "form; rtb.policy.step_mean_cg_iters); default: the posterior's own")
    parser.add_argument("--head", choices=("on", "off"), default=None,
                        help="sample with the trained correction head or without it (rtb.policy.use_head); default: the "
                             "posterior's own")
    parser.add_argument("--step-model-chain-x0", choices=("on", "off"), default=None,
                        help="the step model's x_0 is the chain's final denoise f(x_1) (on) or the forward process's "
                             "(off) (rtb.policy.step_model_chain_x0); default: the posterior's own")
    parser.add_argument("--noise-sigma", type=float, default=None,
                        help="noise level (default: the one recorded in the exported posterior)")


def _tau2(text: str):
    if text == "off":
        return "off"
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number or 'off', got {text!r}")
    return value


def run(args) -> int:
    from pipeline.config import read_device
    from pipeline.diffusion.network_prior import load_prior
    from pipeline.lensing.checks import check_posterior
    from pipeline.runtime import choose_device, configure_threads

    configure_threads()
    device = choose_device(read_device(args.config))
    prior = load_prior(args.prior, device=device)
    for ck in args.posterior:
        rec = check_posterior(args.config, prior, ck, n_obs=args.n_obs, n=args.samples, seed=args.seed,
                              noise_sigma=args.noise_sigma, last_step=args.last_step,
                              step_variance_tau2=args.step_variance_tau2, step_variance_mode=args.step_variance_mode,
                              step_mean_shift=None if args.step_mean_shift is None else args.step_mean_shift == "on",
                              step_mean_cg_iters=args.step_mean_cg_iters,
                              use_head=None if args.head is None else args.head == "on",
                              step_model_chain_x0=None if args.step_model_chain_x0 is None
                              else args.step_model_chain_x0 == "on")
        print(json.dumps(rec), flush=True)
    return 0
