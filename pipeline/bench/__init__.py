"""Benchmarks, above the library they measure: the exact-posterior GMM benchmark (:mod:`.gmm`, with
:mod:`.gmm_cases`, :mod:`.gmm_reference`, :mod:`.gmm_rtb`, :mod:`.gmm_run`, :mod:`.gmm_summary`), the
RTB memory benchmark (:mod:`.rtb_memory`) and the training-free samplers' report on problems with known
answers (:mod:`.sampler_report`). Nothing below ``pipeline.bench`` imports it."""
