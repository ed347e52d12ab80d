"""Source galaxies: GalSim parametric, HST deep-field stamps, user cubes, splits and the sources command."""

import json
import subprocess
import sys

import numpy as np
import pytest
from astropy.io import fits

from pipeline.errors import ConfigError, InputFileError
from pipeline.lensing.config import GalSimConfig, HSTConfig, SourcesConfig, load_lensing_config
from pipeline.lensing.sources import build_sources, read_sources, split_indices
from pipeline.lensing.sources_galsim import galsim_sources
from pipeline.lensing.sources_hst import hst_stamps
from pipeline.lensing.sources_user import user_sources

NPIX, PIX = 32, 0.05


def _centroid(img):
    yy, xx = np.mgrid[: img.shape[0], : img.shape[1]]
    t = img.sum()
    c = (img.shape[0] - 1) / 2
    return (img * xx).sum() / t - c, (img * yy).sum() / t - c


def test_galsim_sources_flux_offset_and_reproducible():
    cfg = GalSimConfig(disk_hlr=(0.08, 0.15), bulge_hlr=(0.03, 0.06), offset=0.1)
    a = galsim_sources(6, cfg, NPIX, PIX, seed=11)
    b = galsim_sources(6, cfg, NPIX, PIX, seed=11)
    c = galsim_sources(6, cfg, NPIX, PIX, seed=12)
    assert a.dtype == np.float32 and a.shape == (6, NPIX, NPIX)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    flux = a.sum((1, 2)) * PIX ** 2          # surface brightness x pixel area = flux
    # compact galaxies on a 1.6" stamp keep > 90 % of their flux; none exceeds the drawn maximum
    assert np.all(flux > 0.9 * cfg.flux[0]) and np.all(flux < 1.01 * cfg.flux[1])
    for img in a:
        cx, cy = _centroid(img)
        # the centre offset is at most 0.1" = 2 px per axis (knots add scatter)
        assert abs(cx) < 3.0 and abs(cy) < 3.0
    assert (a >= -1e-3 * a.max()).all()


def test_hst_stamps_centred_positive_and_scaled():
    cfg = HSTConfig(flux=(10.0, 20.0))
    st = hst_stamps(NPIX, cfg, PIX, seed=0, n_max=40)
    assert st.shape == (40, NPIX, NPIX)
    full = hst_stamps(NPIX, cfg, PIX, seed=0, n_max=-1)
    assert len(full) > 300      # hundreds of usable 32x32 stamps
    flux = st.sum((1, 2)) * PIX ** 2
    assert np.all(flux >= 10.0 * 0.999) and np.all(flux <= 20.0 * 1.001)
    assert (st >= 0).all()
    offs = np.array([_centroid(s) for s in st])
    # centred to within a pixel (clipping negatives and the soft mask move the centroid slightly)
    assert np.median(np.abs(offs)) < 0.5 and np.abs(offs).max() < 1.5
    # neighbours removed: the outer ring of the stamp is essentially empty
    ring = np.ones((NPIX, NPIX), bool)
    ring[3:-3, 3:-3] = False
    assert np.median(st[:, ring].sum(1) / st.sum((1, 2))) < 0.02


def test_hst_zoom_enlarges_the_same_stamps():
    small = hst_stamps(16, HSTConfig(), PIX, seed=3, n_max=10)
    big = hst_stamps(32, HSTConfig(zoom=2.0), PIX, seed=3, n_max=10)

    def radius(img):
        yy, xx = np.mgrid[: img.shape[0], : img.shape[1]]
        cx, cy = _centroid(img)
        c = (img.shape[0] - 1) / 2
        return np.sqrt((img * ((xx - c - cx) ** 2 + (yy - c - cy) ** 2)).sum() / img.sum())

    ratio = np.array([radius(b) / radius(s) for s, b in zip(small, big)])
    assert np.all(np.abs(ratio - 2.0) < 0.2)
    # flux per stamp is still drawn from the configured range
    assert np.allclose(big.sum((1, 2)) * PIX ** 2, small.sum((1, 2)) * PIX ** 2, rtol=1e-4)


def test_user_cube_resampled_and_validated(tmp_path):
    n, scale = 64, 0.025          # finer than the source grid: resampled to 32 x 0.05"
    c = (np.arange(n) - (n - 1) / 2) * scale
    xx, yy = np.meshgrid(c, c)
    cube = np.stack([np.exp(-((xx - 0.1) ** 2 + yy ** 2) / (2 * 0.08 ** 2)),
                     np.exp(-(xx ** 2 + (yy + 0.05) ** 2) / (2 * 0.12 ** 2))]).astype(np.float32)
    f = tmp_path / "cube.fits"
    h = fits.Header()
    h["PIXSCALE"] = scale
    fits.PrimaryHDU(cube, header=h).writeto(f)
    out = user_sources(f, NPIX, PIX)
    assert out.shape == (2, NPIX, NPIX)
    # surface brightness is intensive: total flux (SB x area) is kept, the centre moves to 0.1" = 2 px
    flux_in = cube.sum((1, 2)) * scale ** 2
    flux_out = out.sum((1, 2)) * PIX ** 2
    assert np.allclose(flux_out, flux_in, rtol=0.02)
    cx, cy = _centroid(out[0])
    assert cx == pytest.approx(2.0, abs=0.05) and cy == pytest.approx(0.0, abs=0.05)
    # a CD matrix in degrees works as well
    g = tmp_path / "cube_cd.fits"
    h2 = fits.Header()
    h2["CD1_1"], h2["CD2_2"], h2["CUNIT1"] = scale / 3600, scale / 3600, "deg"
    fits.PrimaryHDU(cube, header=h2).writeto(g)
    assert np.allclose(user_sources(g, NPIX, PIX), out, atol=1e-6)
    bad = tmp_path / "noscale.fits"
    fits.PrimaryHDU(cube).writeto(bad)
    with pytest.raises(InputFileError, match="PIXSCALE"):
        user_sources(bad, NPIX, PIX)
    flat = tmp_path / "flat.fits"
    fits.PrimaryHDU(cube[0], header=h).writeto(flat)
    with pytest.raises(InputFileError, match=r"no 3-D image HDU"):
        user_sources(flat, NPIX, PIX)


def test_split_indices_disjoint_and_seeded():
    rng = np.random.default_rng(0)
    parts = split_indices(100, (0.8, 0.1, 0.1), rng)
    assert [len(p) for p in parts] == [80, 10, 10]
    allidx = np.concatenate(parts)
    assert len(np.unique(allidx)) == 100
    again = split_indices(100, (0.8, 0.1, 0.1), np.random.default_rng(0))
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))


def test_build_sources_stratified_counts():
    cfg = SourcesConfig(seed=5, n_galsim=10, n_hst=20)
    res = build_sources(cfg, NPIX, PIX)
    assert res["counts"]["galsim"] == {"TRAIN": 8, "VALID": 1, "TEST": 1}
    assert res["counts"]["hst"] == {"TRAIN": 16, "VALID": 2, "TEST": 2}
    assert sorted(res["kinds"]["TEST"]) == ["galsim", "hst", "hst"]
    # no source appears in two splits
    flat = {s: {a.tobytes() for a in res["splits"][s]} for s in res["splits"]}
    assert not (flat["TRAIN"] & flat["TEST"]) and not (flat["TRAIN"] & flat["VALID"])


@pytest.mark.slow
def test_sources_command_writes_cube_with_provenance(tmp_path):
    cfgf = tmp_path / "cfg.yaml"
    cfgf.write_text("lensing:\n  sources: {n_galsim: 10, n_hst: 10, seed: 2}\n")
    out = tmp_path / "src.fits"
    r = subprocess.run([sys.executable, "-m", "pipeline", "sources", "--config", str(cfgf), "--out", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["n"] == {"TRAIN": 16, "VALID": 2, "TEST": 2}
    with fits.open(out, checksum=True) as f:
        assert [h.name for h in f] == ["PRIMARY", "TRAIN", "VALID", "TEST", "KINDS"]
        h = f[0].header
        assert h["NGALSIM"] == 10 and h["NHST"] == 10 and h["SEED"] == 2 and h["PIXSCALE"] == 0.05
        assert "Illingworth" in h["HSTCRED"] and len(h["CFGHASH"]) == 16 and "PKGVER" in h
        assert f["TRAIN"].header["NGALSIM"] == 8 and f["TRAIN"].header["CRPIX1"] == 16.5
    tr, hdr = read_sources(out, "TRAIN")
    assert tr.shape == (16, NPIX, NPIX) and tr.dtype == np.float32 and tr.flags["C_CONTIGUOUS"]
    with pytest.raises(InputFileError, match=r"\[BOGUS\]"):
        read_sources(out, "bogus")


@pytest.mark.slow
def test_config_errors_are_one_line(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("lensing:\n  sources: {split: [0.5, 0.2, 0.2]}\n")
    with pytest.raises(ConfigError, match=r"lensing\.sources\.split.*sum to 1"):
        load_lensing_config(f)
    f.write_text("lensing:\n  geometry: {psf_npix: 10}\n")
    with pytest.raises(ConfigError, match=r"lensing\.geometry\.psf_npix.*odd"):
        load_lensing_config(f)
    f.write_text("lensing:\n  lens: {rein: [0.9, 0.5]}\n")
    with pytest.raises(ConfigError, match=r"lensing\.lens\.rein.*min > max"):
        load_lensing_config(f)
    f.write_text("lensing:\n  sources: {galsim: {fluxx: [1, 2]}}\n")
    with pytest.raises(ConfigError, match=r"lensing\.sources\.galsim\.fluxx.*unknown") as e:
        load_lensing_config(f)
    assert "\n" not in str(e.value)
    cfgf = tmp_path / "cmd.yaml"
    cfgf.write_text("lensing:\n  sources: {n_galsim: 0, n_hst: 0}\n")
    out = tmp_path / "none.fits"
    r = subprocess.run([sys.executable, "-m", "pipeline", "sources", "--config", str(cfgf), "--out", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "lensing.sources" in r.stderr and not out.exists()


def test_sources_file_keeps_generation_parameters_that_reproduce_each_source(tmp_path):
    """The KINDS table holds each source's parameters: GalSim galaxies redrawn from them equal the cube
    bit for bit; HDF objects re-cut at one HDF pixel per source pixel equal the stamps (1e-6 of the
    peak); both keep their recorded flux when re-rendered twice finer. A file without them (or a
    user source) is handled: one-line error naming KINDS.<column>, or constant over each pixel."""
    from pipeline.lensing.sources import read_source_records, render_source_fine, write_sources
    from pipeline.lensing.sources_galsim import render_galsim
    from pipeline.lensing.sources_hst import render_hdf

    cfg = SourcesConfig(seed=4, n_galsim=10, n_hst=10)
    res = build_sources(cfg, NPIX, PIX)
    path = tmp_path / "src.fits"
    write_sources(path, res, cfg, NPIX, PIX, "0" * 16)
    for split in ("TRAIN", "TEST"):
        arr, _ = read_sources(path, split)
        recs = read_source_records(path, split)
        assert [r["KIND"] for r in recs] == res["kinds"][split]
        for img, rec in zip(arr, recs):
            if rec["KIND"] == "galsim":
                assert np.array_equal(render_galsim(rec, NPIX, PIX).astype(np.float32), img)
            else:
                st = render_hdf(rec["HDF_LAB"], rec["HDF_Y"], rec["HDF_X"], NPIX, 1.0)
                st = st / st.sum() * rec["FLUX"] / PIX ** 2
                assert np.abs(st - img).max() < 1e-6 * img.max()
            fine = render_source_fine(rec, img, PIX, 2)
            assert fine.shape == (2 * NPIX, 2 * NPIX)
            flux = fine.sum() * (PIX / 2) ** 2
            if rec["KIND"] == "hst":
                assert flux == pytest.approx(rec["FLUX"], rel=1e-9)
            else:   # the same galaxy, so the same flux on the field to 2 %
                assert flux == pytest.approx(img.sum() * PIX ** 2, rel=0.02)
    # a user source has no parameters: constant over each source pixel
    user = np.arange(16.0).reshape(4, 4)
    assert np.array_equal(render_source_fine({"KIND": "user"}, user, PIX, 3)[3:6, 6:9], np.full((3, 3), 6.0))
    # an older file without the parameter columns: a one-line error naming the column
    with fits.open(path) as f:
        hl = fits.HDUList([h.copy() for h in f])
    hl["KINDS"] = fits.BinTableHDU.from_columns(hl["KINDS"].columns[:3], name="KINDS")
    old = tmp_path / "old.fits"
    hl.writeto(old)
    recs = read_source_records(old, "TEST")
    i = [r["KIND"] for r in recs].index("galsim")
    with pytest.raises(InputFileError, match=r"old\.fits \[KINDS\.FLUX\].*rebuild") as e:
        render_source_fine(recs[i], read_sources(old, "TEST")[0][i], PIX, 2, path=old, index=i)
    assert "\n" not in str(e.value)
