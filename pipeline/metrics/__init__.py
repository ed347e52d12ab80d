"""Metrics: per-observation log Z estimators (:mod:`.logz`) and sample-set distances
(:mod:`.distances`). Calibration metrics (TARP, coverage, chi2) live in their own modules."""

from pipeline.metrics.distances import (component_weights, mode_tv, sliced_wasserstein,  # noqa: F401
                                        wasserstein_1d)
from pipeline.metrics.logz import (LogZEstimate, ess, estimate_logz, estimate_logz_grouped,  # noqa: F401
                                   estimate_logz_samples, log_weights, logmeanexp, logz_elbo, logz_iw)
