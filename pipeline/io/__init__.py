"""File formats: FITS helpers (:mod:`pipeline.io.fits`) and checkpoint directories
(:mod:`pipeline.io.checkpoint`)."""
