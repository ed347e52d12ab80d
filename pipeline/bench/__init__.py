"""Benchmarks: the exact-posterior GMM benchmark (:mod:`.gmm`) and the RTB memory benchmark (:mod:`.rtb_memory`)."""
