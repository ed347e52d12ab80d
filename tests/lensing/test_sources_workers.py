"""GalSim sources rendered by several processes equal the single-process ones bit for bit."""

import numpy as np
import pytest

pytest.importorskip("galsim")

from pipeline.lensing.config import GalSimConfig  # noqa: E402
from pipeline.lensing.sources_galsim import galsim_sources  # noqa: E402


@pytest.mark.slow
def test_parallel_rendering_is_bit_identical():
    cfg = GalSimConfig()
    one, p1 = galsim_sources(6, cfg, 16, 0.05, seed=3, return_params=True)
    two, p2 = galsim_sources(6, cfg, 16, 0.05, seed=3, return_params=True, workers=2)
    assert p1 == p2
    assert np.array_equal(one, two)
    assert one.std() > 0
