"""The posterior predictive check run by ``sample`` (pipeline.lensing.sample) on observations the model cannot
represent: made with an EPL slope t = 1.3 but labelled SIE, blurred by a PSF twice the file's FWHM (the file's
PSF HDU left at the trained one), and a source 10x above the shipped posterior's trained source-flux range.
The default method (rtb_amortized, shipped checkpoints) flags all three with a WARNING and PPCWARN; the
regularised inversion fits a well-specified prior-drawn observation to the noise (no excess chi2) and is
flagged on the two with the wrong physics (the bright source it fits: its model can represent it). No shipped
method passes well-specified observations every time: rtb_amortized's samples fit worse than the noise on
most of them (docs/posterior-files.md, "Posterior predictive check"), so that case is asserted for the
inversion only.

One prior draw's shape (seed 2) at half the top of the trained source-flux range, lensed by one SIE+shear lens
at the trained noise level, 8 samples per observation. The check flags what the data resolve: for a fainter or
more compact source a wrong slope or PSF can be absorbed by the pixelated source (the same draw at its own
flux is, for the inversion)."""

import dataclasses
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from astropy.io import fits

from pipeline.diffusion.network_prior import load_prior
from pipeline.diffusion.sampling import sample_prior
from pipeline.diffusion.schedule import load_chain
from pipeline.lensing.config import LensingConfig, NoiseConfig
from pipeline.lensing.guard import read_trained_record
from pipeline.lensing.operator import LensParams
from pipeline.lensing.sample import sample_observations
from pipeline.lensing.simulate import default_psf, simulate_observation, write_observation

ROOT = Path(__file__).resolve().parents[2]
PRIOR, POSTERIOR = ROOT / "data" / "pretrained" / "prior", ROOT / "data" / "pretrained" / "posterior"
SIGMA = 0.25725827636718757  # the shipped posterior's noise level (data/pretrained/README.md) [electron/s]
LENS = LensParams(x0=0.02, y0=-0.01, q=0.8, phi=0.6, rein=0.7, g1=0.03, g2=-0.02)
GEOM = LensingConfig().geometry  # config/config.yaml's, the trained one

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]  # ~40 s: two sampling runs


def _write(path, truth, lens=LENS, geom=GEOM):
    """Simulate ``truth`` [electron/(s arcsec2)] with ``lens`` and ``geom``, and write it as if it were an SIE
    observation with the trained PSF."""
    obs = simulate_observation(truth, lens, geom, NoiseConfig(sigma=SIGMA), np.random.default_rng(7))
    obs = dataclasses.replace(obs, lens=dataclasses.replace(lens, model="SIE", t=1.0),
                              psf=default_psf(GEOM)[0].astype(np.float32))
    write_observation(path, obs)
    return path


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ppc")
    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    cfg["device"] = "cpu"
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump(cfg))
    prior = load_prior(PRIOR, device="cpu")
    x = sample_prior(prior, load_chain(config, prior), 1, generator=torch.Generator().manual_seed(2))
    truth = prior.to_physical(x).reshape(GEOM.source_npix, GEOM.source_npix).cpu().numpy()
    # a prior galaxy's shape at a fixed flux inside the trained range (the top half, where the wrong physics
    # shows above the noise), so the cases do not hang on how bright one draw is [electron/s]
    lo, hi = read_trained_record(POSTERIOR)["source_flux"]
    flux = float(truth.sum()) * GEOM.source_pixscale ** 2
    truth = truth * (0.5 * hi / flux)
    flux, max_trained_flux = 0.5 * hi, hi
    assert lo < flux < hi
    files = {"prior": _write(root / "prior.fits", truth),
             "epl": _write(root / "epl.fits", truth, lens=dataclasses.replace(LENS, model="EPL", t=1.3)),
             "psf": _write(root / "psf.fits", truth, geom=dataclasses.replace(GEOM, psf_fwhm=2 * GEOM.psf_fwhm,
                                                                              psf_npix=2 * GEOM.psf_npix - 1)),
             "bright": _write(root / "bright.fits", truth * (10 * max_trained_flux / flux))}
    out, lines = {}, {}
    log = logging.getLogger("pipeline.lensing.sample")
    for method, names in (("rtb_amortized", ("epl", "psf", "bright")), ("inversion", ("prior", "epl", "psf"))):
        handler = _Lines()
        log.addHandler(handler)
        try:
            res = sample_observations(str(config), method, PRIOR, POSTERIOR, [str(files[k]) for k in names],
                                      root / method, n=8, seed=0)
        finally:
            log.removeHandler(handler)
        out[method], lines[method] = {Path(r["obs"]).stem: r for r in res}, handler.lines
    return out, lines


def _check(res, flagged, warnings):
    """The result's check, the file's cards and the log agree on the verdict ``flagged``."""
    h = fits.getheader(res["out"])
    assert res["ppc"]["flag"] is flagged and h["PPCWARN"] is flagged
    assert h["PPCIMG"] == pytest.approx(res["ppc"]["image"]) == pytest.approx(res["chi2_median"])
    mine = [w for w in warnings if w.startswith(res["obs"]) and "posterior predictive check" in w]
    assert len(mine) == int(flagged)
    if flagged:
        assert f"{res['ppc']['image']:.3f}" in mine[0] and "misfit" in mine[0]


@pytest.mark.parametrize("case", ["epl", "psf", "bright"])
def test_the_default_method_flags_observations_it_cannot_represent(runs, case):
    out, warnings = runs
    res = out["rtb_amortized"][case]
    _check(res, True, warnings["rtb_amortized"])
    ppc = res["ppc"]
    # far outside, not at the edge: the arc's median chi2_nu is beyond its band's upper edge
    assert ppc["arc"] > ppc["arc_band"][1] and ppc["arc_pit"] > 1 - ppc["tail"]


def test_the_inversion_fits_the_well_specified_observation_and_is_flagged_on_the_wrong_physics(runs):
    """On the well-specified observation the inversion's fit is not worse than the noise (image PIT median
    below the upper tail; arc inside its band on both sides). Its image chi2_nu there is 0.853, just under the
    band's lower edge 0.861: it fits part of the noise, and the check flags that on the low side."""
    out, warnings = runs
    res = out["inversion"]
    good = res["prior"]["ppc"]
    assert good["image_pit"] < 1 - good["tail"] and good["tail"] < good["arc_pit"] < 1 - good["tail"]
    assert good["arc_band"][0] < good["arc"] < good["arc_band"][1]
    assert good["image"] > 0.8 and good["image"] < good["image_band"][1]
    _check(res["prior"], good["flag"], warnings["inversion"])
    for case in ("epl", "psf"):
        _check(res[case], True, warnings["inversion"])
        assert res[case]["ppc"]["arc"] > res[case]["ppc"]["arc_band"][1] > good["arc"]
