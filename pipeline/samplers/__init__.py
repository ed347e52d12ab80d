"""Posterior samplers behind one interface: ``sampler.sample(problem, y, n, generator=None) -> Samples``.

Method names, used everywhere (configs, results files, tables):

========================  ===============================================================================
``rtb``                   RTB posterior for one observation (built by :mod:`pipeline.rtb`)
``rtb_amortized``         RTB posterior conditioned on y (built by :mod:`pipeline.rtb`)
``rtb_amortized_is``      the same, each returned sample importance-resampled from its own group of
                          ``particles`` RTB trajectories (weights r p / q; lensing ``sample``)
``rtb_amortized_gn``      the same, its last step x_2 -> x_1 replaced by the prior's kernel times the
                          likelihood, linearised by Gauss-Newton (:mod:`pipeline.rtb.twisted_step`; GPU)
``rtb_dps``               RTB with DPS guidance in the parameterisation (built by :mod:`pipeline.rtb`)
``rtb_dps_cla``           RTB with DPS+CLA guidance (built by :mod:`pipeline.rtb`)
``dps``                   DPS, guidance through the network, tuned scale (:mod:`.dps`)
``dps_cla``               DPS mean + CLA covariance (PiGDM-like), tuned scale (:mod:`.cla`)
``cla``                   convolved likelihood of the noisy state, scale 1 (:mod:`.cla`)
``exact_guidance``        exact noised likelihood for Gaussian(-mixture) priors, scale 1 (:mod:`.exact_guidance`)
``prior_is``              prior chain + importance resampling (:mod:`.prior_is`)
``fps``                   FPS, one particle, Gaussian steps (:mod:`.fps`)
``fps_smc``               FPS-SMC, M particles, weights (:mod:`.fps`)
========================  ===============================================================================

``make_sampler(name, prior, chain, **opts)`` builds the training-free ones; options are the sampler's
keyword arguments (``scale``, ``particles``, ``c_rate``, ``ess_threshold``, ``mode``, ``device``,
``batch_size``, ``cond``, ``tuning_record``). Unknown options are an error, not ignored.
"""

from __future__ import annotations

import inspect

from pipeline.errors import PipelineError
from pipeline.samplers.base import Sampler, Samples

METHODS: tuple[str, ...] = ("rtb", "rtb_amortized", "rtb_dps", "rtb_dps_cla", "rtb_amortized_is", "rtb_amortized_gn",
                            "dps", "dps_cla", "cla", "exact_guidance", "prior_is", "fps", "fps_smc")
RTB_METHODS: tuple[str, ...] = ("rtb", "rtb_amortized", "rtb_dps", "rtb_dps_cla", "rtb_amortized_is", "rtb_amortized_gn")
AMORTIZED_METHODS: tuple[str, ...] = ("rtb_amortized", "rtb_amortized_is", "rtb_amortized_gn")  # one network, many y
TRAINING_FREE: tuple[str, ...] = tuple(m for m in METHODS if m not in RTB_METHODS)
TUNED_METHODS: tuple[str, ...] = ("dps", "dps_cla")   # heuristic scale: tune on a separate seed
LINEAR_ONLY: tuple[str, ...] = ("dps_cla", "cla", "exact_guidance", "fps", "fps_smc", "rtb_dps_cla")
PARTICLE_METHODS: tuple[str, ...] = ("prior_is", "fps_smc")


def sampler_class(name: str):
    """The class implementing a training-free method."""
    if name in RTB_METHODS:
        raise PipelineError(f"method '{name}' is a trained RTB posterior: build it with pipeline.rtb "
                            f"(fine-tune, then load the checkpoint), not with make_sampler")
    if name == "dps":
        from pipeline.samplers.dps import DPSSampler
        return DPSSampler
    if name == "dps_cla":
        from pipeline.samplers.cla import DPSCLASampler
        return DPSCLASampler
    if name == "cla":
        from pipeline.samplers.cla import CLASampler
        return CLASampler
    if name == "exact_guidance":
        from pipeline.samplers.exact_guidance import ExactGuidanceSampler
        return ExactGuidanceSampler
    if name == "prior_is":
        from pipeline.samplers.prior_is import PriorISSampler
        return PriorISSampler
    if name == "fps":
        from pipeline.samplers.fps import FPSSampler
        return FPSSampler
    if name == "fps_smc":
        from pipeline.samplers.fps import FPSSMCSampler
        return FPSSMCSampler
    raise PipelineError(f"unknown sampling method {name!r}; known: {', '.join(METHODS)}")


def make_sampler(name: str, prior, chain, **opts) -> Sampler:
    """Build a training-free sampler by name; unknown options raise a one-line error."""
    cls = sampler_class(name)
    allowed = set(inspect.signature(cls.__init__).parameters) - {"self", "prior", "chain"}
    bad = sorted(set(opts) - allowed)
    if bad:
        raise PipelineError(f"method '{name}': unknown option(s) {', '.join(bad)}; allowed: {', '.join(sorted(allowed))}")
    return cls(prior, chain, **opts)


__all__ = ["METHODS", "RTB_METHODS", "TRAINING_FREE", "TUNED_METHODS", "LINEAR_ONLY", "PARTICLE_METHODS",
           "Sampler", "Samples", "make_sampler", "sampler_class"]
