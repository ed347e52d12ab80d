"""Posterior samplers behind one interface: ``sampler.sample(problem, y, n, generator=None) -> Samples``.

Method names, used everywhere (configs, results files, tables):

========================  ===============================================================================
``rtb``                   RTB posterior for one observation (:mod:`pipeline.rtb.sampler`, ``posterior=``)
``rtb_amortized``         RTB posterior conditioned on y (the same, with ``cond_fn``)
``rtb_amortized_is``      the same, each returned sample importance-resampled from its own group of
                          ``particles`` RTB trajectories (weights r p / q; lensing ``sample``)
``rtb_amortized_smc``     the same, each returned sample drawn from its own twisted SMC run of ``particles``
                          particles over the chain (:mod:`pipeline.rtb.smc`; lensing ``sample``)
``rtb_amortized_gn``      the same, its last step x_2 -> x_1 replaced by the prior's kernel times the
                          likelihood, linearised by Gauss-Newton (:mod:`pipeline.rtb.twisted_step`; GPU)
``rtb_dps``               RTB with DPS guidance in the parameterisation
``rtb_dps_cla``           RTB with DPS+CLA guidance
``dps``                   DPS, guidance through the network, tuned scale (:mod:`.dps`; any reward via :mod:`.reward`)
``dps_cla``               DPS mean + CLA covariance (PiGDM-like), tuned scale (:mod:`.cla`)
``cla``                   convolved likelihood of the noisy state, scale 1 (:mod:`.cla`)
``exact_guidance``        exact noised likelihood for Gaussian(-mixture) priors, scale 1 (:mod:`.exact_guidance`)
``prior_is``              prior chain + importance resampling (:mod:`.prior_is`)
``fps``                   FPS, one particle, Gaussian steps (:mod:`.fps`)
``fps_smc``               FPS-SMC, M particles, weights (:mod:`.fps`)
``inversion``             regularised linear inversion, no diffusion prior, evidence-tuned (:mod:`.inversion`)
========================  ===============================================================================

One registry (:mod:`.registry`) holds every method's builder and properties; the method tuples
below are derived from it. The package re-exports the registry only, which imports no torch (so the
config tree can list the methods cheaply); the interface itself, ``Sampler`` and ``Samples``, is in
:mod:`.base`. ``make_sampler(name, prior, chain, **opts)`` builds any method; options are
the sampler's keyword arguments (``scale``, ``particles``, ``c_rate``, ``ess_threshold``, ``mode``,
``device``, ``batch_size``, ``cond``, ``tuning_record``; for RTB ``posterior``, ``cond_fn``,
``particles``, ``batch_size``). Unknown options are an error, not ignored.
"""

from __future__ import annotations

from pipeline.samplers.registry import (AMORTIZED_METHODS, LINEAR_ONLY, METHODS, PARTICLE_METHODS, REGISTRY,
                                        RTB_METHODS, TRAINING_FREE, TUNED_METHODS, MethodSpec, make_sampler,
                                        method_spec, sampler_class)

__all__ = ["AMORTIZED_METHODS", "LINEAR_ONLY", "METHODS", "PARTICLE_METHODS", "REGISTRY", "RTB_METHODS",
           "TRAINING_FREE", "TUNED_METHODS", "MethodSpec", "make_sampler", "method_spec", "sampler_class"]
