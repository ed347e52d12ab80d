"""Relative Trajectory Balance: posterior model, objective, exploration, trainer and sampler.

Entry points: :func:`pipeline.rtb.posterior.make_posterior`, :class:`pipeline.rtb.trainer.RTBTrainer`,
:class:`pipeline.rtb.sampler.RTBSampler`, :class:`pipeline.rtb.config.RTBConfig` (config section ``rtb:``).
"""
