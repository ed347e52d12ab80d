"""The check-prior command: draws from a tiny trained prior or a sample-prior file against a reference
HDU, one JSON line with every figure, the figure, and one-line errors for bad inputs."""

import json

import numpy as np
import pytest
from astropy.io import fits

from pipeline.cli import main
from pipeline.io.fits import write_fits_atomic
from tests.conftest import make_blob_images

UNIT = "electron/(s arcsec2)"


def _reference(path, n=12, size=16, unit=UNIT, pixscale=0.05, name="VALID"):
    hdr = fits.Header()
    if unit:
        hdr["BUNIT"] = unit
    if pixscale is not None:
        hdr["PIXSCALE"] = pixscale
    imgs = make_blob_images(n, size, seed=5).astype(">f4")
    write_fits_atomic(path, [fits.PrimaryHDU(), fits.ImageHDU(imgs, header=hdr, name=name)])
    return path


def _draws(path, n=12, size=16, unit=UNIT, noise=0.0):
    hdr = fits.Header()
    hdr["BUNIT"], hdr["PIXSCALE"] = unit, 0.05
    imgs = make_blob_images(n, size, seed=6) + np.random.default_rng(0).normal(0, noise, (n, size, size))
    prim = fits.Header()
    prim["SEED"], prim["CHAIN_K"], prim["CHAINVAR"] = 3, 7, "small"
    write_fits_atomic(path, [fits.PrimaryHDU(header=prim), fits.ImageHDU(imgs.astype(np.float32), header=hdr,
                                                                         name="SAMPLES")])
    return path


def _run(capsys, *argv):
    rc = main(["check-prior", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.slow
def test_draws_file_against_reference_prints_one_json_line_and_writes_json_and_png(tmp_path, capsys):
    ref, draws = _reference(tmp_path / "ref.fits"), _draws(tmp_path / "draws.fits", noise=0.5)
    out_json, png = tmp_path / "fid.json", tmp_path / "fid.png"
    rc, out, _ = _run(capsys, "--draws", draws, "--data", ref, "--out-json", out_json, "--png", png, "--seed", 2)
    assert rc == 0
    lines = out.strip().splitlines()
    assert len(lines) == 1
    rec = json.loads(lines[0])
    assert rec == json.loads(out_json.read_text())
    assert rec["draws"]["n"] == 12 and rec["draws"]["chain"] == {"K": 7, "variance": "small", "grid": None}
    assert rec["data"] == {"path": str(ref), "hdu": "VALID", "n": 12, "unit": UNIT, "pixscale": 0.05}
    st = rec["statistics"]
    assert st["corner_std"]["draws"] > 10 * st["corner_std"]["data"]  # the added noise shows in the corners
    assert st["fraction_below"]["threshold"] == -5.0 and st["fraction_below"]["ratio"] is None  # 0 / 0
    assert len(st["power_spectrum"]["ratio"]) == 8 and st["half_light_radius"]["unit"] == "arcsec"
    clf = rec["classifier"]
    assert clf["n_train_per_set"] == 6 and clf["seed"] == 2 and clf["budget"]["epochs"] == 30
    assert 0 <= clf["auc"] <= 1 and clf["null_p95"] > 0.5
    assert png.is_file() and png.stat().st_size > 5000


def test_chain_draws_equal_sample_prior_draws_with_the_same_seed(tmp_path, blob_fits, tiny_config, capsys):
    run, cfg = tmp_path / "run", tiny_config()
    assert main(["train-prior", "--config", str(cfg), "--data", str(blob_fits), "--out", str(run)]) == 0
    ref = _reference(tmp_path / "ref.fits", unit=None)  # the tiny prior records no unit
    drawn = tmp_path / "drawn.fits"
    assert main(["sample-prior", "--checkpoint", str(run), "--config", str(cfg), "--n", "10", "--seed", "4",
                 "--batch-size", "4", "--out", str(drawn)]) == 0
    capsys.readouterr()
    rc, out, _ = _run(capsys, "--checkpoint", run, "--config", cfg, "--n", 10, "--seed", 4, "--batch-size", 4,
                      "--data", ref)
    assert rc == 0
    from_chain = json.loads(out)
    assert from_chain["draws"]["chain"] == {"K": 5, "variance": "small", "spacing": "uniform",
                                            "grid": [0, 200, 400, 600, 800, 1000]}
    rc, out, _ = _run(capsys, "--draws", drawn, "--data", ref, "--seed", 4)
    assert rc == 0
    assert json.loads(out)["draws"]["chain"]["grid"] == [0, 200, 400, 600, 800, 1000]  # sample-prior records it
    assert json.loads(out)["statistics"] == from_chain["statistics"]
    assert json.loads(out)["classifier"]["auc"] == from_chain["classifier"]["auc"]
    rc, out, _ = _run(capsys, "--checkpoint", run, "--config", cfg, "--n", 4, "--K", 4, "--spacing", "quadratic",
                      "--data", ref)
    assert rc == 0 and json.loads(out)["draws"]["chain"]["grid"] == [0, 62, 250, 562, 1000]
    quad = tmp_path / "quad.fits"  # sample-prior takes the same grid override and records the grid it used
    assert main(["sample-prior", "--checkpoint", str(run), "--config", str(cfg), "--n", "4", "--K", "4",
                 "--spacing", "quadratic", "--out", str(quad)]) == 0
    capsys.readouterr()
    rc, out, _ = _run(capsys, "--draws", quad, "--data", ref)
    assert rc == 0 and json.loads(out)["draws"]["chain"]["grid"] == [0, 62, 250, 562, 1000]


@pytest.mark.parametrize("case,expect", [
    ("missing_hdu", ["ref.fits", "TEST"]),
    ("unit", ["ref.fits", "BUNIT", "Jy"]),
    ("shape", ["ref.fits", "VALID", "(8, 8)"]),
    ("no_pixscale", ["ref.fits", "PIXSCALE"]),
    ("no_samples", ["draws.fits", "SAMPLES"]),
])
def test_bad_inputs_give_one_line_naming_file_and_field(tmp_path, capsys, case, expect):
    ref = _reference(tmp_path / "ref.fits", size=8 if case == "shape" else 16,
                     unit="Jy" if case == "unit" else UNIT, pixscale=None if case == "no_pixscale" else 0.05)
    draws = _draws(tmp_path / "draws.fits")
    if case == "no_samples":
        write_fits_atomic(draws, [fits.PrimaryHDU(), fits.ImageHDU(np.zeros((4, 16, 16), np.float32), name="X")])
    args = ["--draws", draws, "--data", ref] + (["--hdu", "TEST"] if case == "missing_hdu" else [])
    rc, out, err = _run(capsys, *args)
    assert rc == 2 and out == ""
    line = err.strip()
    assert len(line.splitlines()) == 1 and all(s in line for s in expect), line
