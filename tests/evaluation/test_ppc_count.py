"""The posterior predictive check in the posterior files (PPCWARN and PPC* cards, read back by read_posterior)
and its count in the calibration summary and the report table, on a small linear-Gaussian image problem."""

import json

import numpy as np
import pytest
import torch
from astropy.io import fits

from pipeline.cli import main
from pipeline.evaluation.calibration import run_calibration
from pipeline.io.fits import read_image_hdu
from pipeline.io.posterior import read_posterior, write_posterior
from pipeline.metrics.chi2 import chi2_per_sample
from pipeline.metrics.ppc import posterior_predictive_check

from tests.evaluation.image_problem import ImageProblem

NS, NI = 5, 8  # source and image sizes (pixels)


def _world(tmp_path, n_obs=6, n_s=8, seed=0):
    """Observations with prior N(1, I) sources; per observation exact posterior draws (method ``good``, with
    their check), draws shifted by +1 on every pixel on the odd observations (``bad``, with their check) and
    the exact draws without a check (``old``, files written before the check existed)."""
    rng = np.random.default_rng(seed)
    d, m, sigma = NS * NS, NI * NI, 0.3
    M = rng.normal(size=(m, d)) / np.sqrt(d)
    problem = ImageProblem(M, sigma, NS, NI)
    cov = np.linalg.inv(np.eye(d) + M.T @ M / sigma ** 2)
    L = np.linalg.cholesky(cov)
    obs_dir = tmp_path / "obs"
    obs_dir.mkdir()
    flags = {"good": [], "bad": []}
    for i in range(n_obs):
        truth = 1.0 + rng.normal(size=d)
        y = M @ truth + sigma * rng.normal(size=m)
        name = f"obs-{i:02d}.fits"
        fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(y.reshape(NI, NI).astype(np.float32), name="SCI"),
                      fits.ImageHDU(truth.reshape(NS, NS).astype(np.float32), name="TRUTH")]).writeto(obs_dir / name)
        mean = cov @ (np.ones(d) + M.T @ y / sigma ** 2)
        exact = (mean + rng.normal(size=(n_s, d)) @ L.T).reshape(n_s, NS, NS).astype(np.float32)
        for method, s in (("good", exact), ("bad", exact + (i % 2)), ("old", exact)):
            ppc = None
            if method != "old":
                chi = chi2_per_sample(problem, torch.from_numpy(s), torch.from_numpy(y.reshape(NI, NI)))
                ppc = posterior_predictive_check(chi).as_dict()
                flags[method].append(ppc["flag"])
            write_posterior(tmp_path / "post" / method / name, s, src_pixscale=0.05, method=method, obs_file=name,
                            ppc=ppc)

    def loader(path):
        return problem, torch.from_numpy(read_image_hdu(path, "SCI")), read_image_hdu(path, "TRUTH")

    return obs_dir, loader, flags


def test_the_check_round_trips_through_the_posterior_file(tmp_path):
    chi = {"chi2_nu": np.array([1.4, 1.5, 1.45]), "chi2_arc_nu": np.array([2.0, 2.2, 2.1]),
           "n_arc": np.array([100, 120, 110]), "nu": 1024}
    ppc = posterior_predictive_check(chi)
    write_posterior(tmp_path / "p.fits", np.zeros((3, 4, 4)), src_pixscale=0.05, method="m", ppc=ppc.as_dict())
    h = fits.getheader(tmp_path / "p.fits")
    assert h["PPCWARN"] is True and h["PPCIMG"] == pytest.approx(1.45)
    assert (h["PPCIMGLO"], h["PPCIMGHI"]) == pytest.approx(ppc.image_band)
    assert (h["PPCARCLO"], h["PPCARCHI"]) == pytest.approx(ppc.arc_band) and h["PPCARCM"] == 110
    assert "PPC" in h.comments["PPCWARN"] and "band" in h.comments["PPCIMGHI"]
    back = read_posterior(tmp_path / "p.fits")["ppc"]
    want = ppc.as_dict()
    for key in ("n_no_arc", "nu"):
        want.pop(key)
    assert back.keys() == want.keys()
    for k, v in want.items():
        assert back[k] == (pytest.approx(v) if v is not None else None), k


def test_a_fit_without_arc_and_a_file_without_check(tmp_path):
    ok = posterior_predictive_check({"chi2_nu": np.ones(2), "chi2_arc_nu": np.full(2, np.nan),
                                     "n_arc": np.zeros(2, int), "nu": 64})
    write_posterior(tmp_path / "a.fits", np.zeros((2, 4, 4)), src_pixscale=0.05, method="m", ppc=ok.as_dict())
    h = fits.getheader(tmp_path / "a.fits")
    assert h["PPCWARN"] is False and "PPCIMG" in h
    assert not {"PPCARC", "PPCARCLO", "PPCARCHI", "PPCUARC", "PPCARCM"} & set(h)
    back = read_posterior(tmp_path / "a.fits")["ppc"]
    assert back["flag"] is False and back["arc"] is None and back["arc_band"] is None
    write_posterior(tmp_path / "b.fits", np.zeros((2, 4, 4)), src_pixscale=0.05, method="m")
    assert "PPCWARN" not in fits.getheader(tmp_path / "b.fits")
    assert read_posterior(tmp_path / "b.fits")["ppc"] is None


@pytest.mark.slow
def test_calibration_counts_the_flagged_observations_and_the_report_shows_them(tmp_path):
    obs_dir, loader, flags = _world(tmp_path)
    assert not any(flags["good"]) and flags["bad"] == [False, True] * 3
    summary = run_calibration([str(tmp_path / "post" / m) for m in ("good", "bad", "old")], obs_dir, "prior",
                              tmp_path / "cal", loader=loader, n_bins=4, n_boot=20, n_null=20, lens_figures=0)
    sets = summary["sets"]["prior"]
    assert (sets["good"]["ppc_flagged"], sets["good"]["ppc_checked"]) == (0, 6)
    assert (sets["bad"]["ppc_flagged"], sets["bad"]["ppc_checked"]) == (3, 6)
    assert sets["bad"]["per_obs"]["ppc_warn"] == flags["bad"]
    assert (sets["old"]["ppc_flagged"], sets["old"]["ppc_checked"]) == (None, 0)
    on_disk = json.loads((tmp_path / "cal" / "summary.json").read_text())["sets"]["prior"]
    assert on_disk["bad"]["ppc_flagged"] == 3
    rep = tmp_path / "report.md"
    assert main(["report", "--calibration", str(tmp_path / "cal"), "--out", str(rep)]) == 0
    lines = rep.read_text().split("## Results", 1)[1].split("\n## ", 1)[0].splitlines()  # the main table
    header = next(line for line in lines if line.startswith("| set |")).split("|")
    col = [c.strip() for c in header].index("PPC flagged")
    cells = {row.split("|")[2].strip(): row.split("|")[col].strip() for row in lines if row.startswith("| prior |")}
    assert cells == {"good": "0/6", "bad": "3/6", "old": "n/a"}
