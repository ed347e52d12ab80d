"""Relative Trajectory Balance: posterior model, objective, exploration, trainer and sampler.

Entry points: :func:`pipeline.rtb.posterior.make_posterior`, :class:`pipeline.rtb.trainer.RTBTrainer`,
:func:`pipeline.rtb.loading.load_posterior` (inference loads from here, never from the trainer),
:class:`pipeline.rtb.sampler.RTBSampler`, :class:`pipeline.rtb.config.RTBConfig` (config section ``rtb:``).
"""
