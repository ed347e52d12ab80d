"""Prior training: outputs, seed reproducibility, exact resume after an interruption, wall-clock cap."""

import json

import pytest
import torch

from conftest import TINY_PRIOR
from pipeline.config import from_mapping
from pipeline.diffusion.prior_config import PriorConfig
from pipeline.diffusion.train import augment_batch, load_training_images, train_prior
from pipeline.errors import InputFileError
from pipeline.diffusion.network_prior import load_prior
from pipeline.io.checkpoint import list_checkpoints, load_checkpoint


def _cfg(**kw):
    return from_mapping(PriorConfig, {**TINY_PRIOR, **kw}, "test")


class Interrupt(Exception):
    pass


def _assert_same_run(dir_a, dir_b):
    a = load_checkpoint(dir_a, names=["model", "ema", "optim"])
    b = load_checkpoint(dir_b, names=["model", "ema", "optim"])
    assert a.step == b.step
    for name in ("model", "ema"):
        for k, v in a.states[name].items():
            assert torch.equal(v, b.states[name][k]), (name, k)
    for pid, st in a.states["optim"]["state"].items():
        for key, v in st.items():
            assert torch.equal(v, b.states["optim"]["state"][pid][key]), (pid, key)
    assert torch.equal(a.state["rng"]["generators"]["data"], b.state["rng"]["generators"]["data"])


def test_training_writes_checkpoints_metrics_final_and_done(tmp_path, blob_fits):
    res = train_prior(_cfg(), blob_fits, tmp_path / "run")
    run = tmp_path / "run"
    assert res.completed and res.step == 6 and res.steps_per_second > 0
    assert [s for s, _ in list_checkpoints(run)] == [3, 6]
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [2, 4, 6]
    assert all(r["loss"] > 0 and r["steps_per_s"] > 0 for r in lines)
    done = json.loads((run / "done").read_text())
    assert done["step"] == 6 and done["config_hash"] == res.config_hash
    prior = load_prior(run)  # from final/ (EMA weights) without the config
    ema = load_checkpoint(run, names=["ema"]).states["ema"]
    for k, v in prior.net.state_dict().items():
        assert torch.equal(v, ema[k])
    assert prior.event_shape == (1, 16, 16) and prior.scale == 0.5
    assert "sample_K" not in prior.meta  # the chain is the config's chain: section, not the prior's


def test_same_seed_same_weights_and_other_seed_differs(tmp_path, blob_fits):
    train_prior(_cfg(steps=3), blob_fits, tmp_path / "a")
    train_prior(_cfg(steps=3), blob_fits, tmp_path / "b")
    train_prior(_cfg(steps=3, seed=1), blob_fits, tmp_path / "c")
    _assert_same_run(tmp_path / "a", tmp_path / "b")
    wa = load_checkpoint(tmp_path / "a", names=["model"]).states["model"]
    wc = load_checkpoint(tmp_path / "c", names=["model"]).states["model"]
    assert not all(torch.equal(v, wc[k]) for k, v in wa.items())


def test_interrupted_then_resumed_equals_uninterrupted(tmp_path, blob_fits):
    """Crash at step 5 (after the step-3 checkpoint), resume, and compare everything at step 6."""
    cfg = _cfg(dropout=0.1)  # dropout draws from the global RNG: it must be restored too

    def crash(step, record):
        if step == 5:
            raise Interrupt

    with pytest.raises(Interrupt):
        train_prior(cfg, blob_fits, tmp_path / "resumed", callback=crash)
    assert load_checkpoint(tmp_path / "resumed").step == 3
    assert not (tmp_path / "resumed" / "done").exists()
    res = train_prior(cfg, blob_fits, tmp_path / "resumed")
    assert res.completed and res.step == 6
    train_prior(cfg, blob_fits, tmp_path / "straight")
    _assert_same_run(tmp_path / "resumed", tmp_path / "straight")
    # metrics after the resume point were rewritten, not duplicated
    steps = [json.loads(x)["step"] for x in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6]
    m1 = (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    m2 = (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["loss"] for x in m1] == [json.loads(x)["loss"] for x in m2]


def test_extending_a_finished_run_equals_training_longer(tmp_path, blob_fits):
    train_prior(_cfg(), blob_fits, tmp_path / "ext")
    res = train_prior(_cfg(), blob_fits, tmp_path / "ext", steps=9)
    assert res.step == 9 and json.loads((tmp_path / "ext" / "done").read_text())["step"] == 9
    train_prior(_cfg(steps=9), blob_fits, tmp_path / "long")
    _assert_same_run(tmp_path / "ext", tmp_path / "long")
    # a finished run is not retrained
    before = (tmp_path / "long" / "metrics.jsonl").read_text()
    again = train_prior(_cfg(), blob_fits, tmp_path / "long", steps=9)
    assert again.completed and again.step == 9
    assert (tmp_path / "long" / "metrics.jsonl").read_text() == before
    _assert_same_run(tmp_path / "ext", tmp_path / "long")


def test_resume_with_a_different_recipe_is_refused(tmp_path, blob_fits):
    train_prior(_cfg(steps=3), blob_fits, tmp_path / "run")
    with pytest.raises(InputFileError, match="different prior config"):
        train_prior(_cfg(steps=6, lr=1e-3), blob_fits, tmp_path / "run")


def test_wall_clock_cap_checkpoints_and_stops_without_done(tmp_path, blob_fits):
    res = train_prior(_cfg(max_wall_seconds=1e-6), blob_fits, tmp_path / "run")
    assert not res.completed and res.step == 1
    assert not (tmp_path / "run" / "done").exists()
    assert load_checkpoint(tmp_path / "run").step == 1
    events = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "wall_clock_cap"
    assert train_prior(_cfg(), blob_fits, tmp_path / "run").completed


@pytest.mark.slow
def test_loss_decreases_on_blobs(tmp_path, blob_fits):
    res = train_prior(_cfg(steps=150, batch_size=16, lr=2e-3, warmup_steps=10, log_every=50,
                           checkpoint_every=150), blob_fits, tmp_path / "run")
    losses = [json.loads(x)["loss"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    print("mean loss per 50 steps:", losses)
    assert losses[0] > 0.15 and losses[-1] < 0.6 * losses[0]
    assert 0 < res.final_loss < losses[0]


def test_training_images_are_native_float32_network_units(blob_fits):
    x, info = load_training_images(blob_fits, "TRAIN", scale=0.5, offset=0.1)
    assert x.dtype == torch.float32 and x.shape == (64, 1, 16, 16) and info["n"] == 64
    x1, _ = load_training_images(blob_fits, "TRAIN")
    torch.testing.assert_close(x, (x1 - 0.1) / 0.5)
    with pytest.raises(InputFileError, match="image_size=32"):
        load_training_images(blob_fits, "TRAIN", image_size=32)
    with pytest.raises(InputFileError, match="'NOPE'"):
        load_training_images(blob_fits, "NOPE")


def test_dihedral_augmentation_is_a_symmetry_of_each_image():
    x = torch.arange(2 * 16, dtype=torch.float32).reshape(2, 1, 4, 4)
    x = x.repeat(16, 1, 1, 1)
    out = augment_batch(x, "dihedral", torch.Generator().manual_seed(0))
    seen = set()
    for xi, oi in zip(x, out):
        ops = [torch.rot90(f, r, (-2, -1)) for f in (xi, xi.flip(-1)) for r in range(4)]
        match = [i for i, o in enumerate(ops) if torch.equal(o, oi)]
        assert match
        seen.add(match[0])
    assert len(seen) >= 6  # draws cover the group
    assert torch.equal(augment_batch(x, "none", torch.Generator()), x)


def test_the_export_records_the_flux_size_and_peak_ranges_of_source_maps(tmp_path):
    """Source maps with a pixel scale: the exported prior records the percentiles of the training images'
    total flux [BUNIT x arcsec^2], half-light radius [arcsec] and peak [BUNIT], so a guard can tell how
    far a new source is from what the prior learned; other images record nothing."""
    from astropy.io import fits

    from pipeline.io.fits import write_fits_atomic

    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    peaks = torch.linspace(1.0, 8.0, 32)
    widths = torch.linspace(3.0, 4.0, 32)  # pixels: circular Gaussians of sigma w have r_half = 1.1774 w
    imgs = torch.stack([p * torch.exp(-((xx - 15.5) ** 2 + (yy - 15.5) ** 2) / (2 * w ** 2))
                        for p, w in zip(peaks, widths)]).numpy().astype(">f4")
    path = tmp_path / "src.fits"
    hdr = fits.Header({"BUNIT": "electron/(s arcsec2)", "PIXSCALE": 0.05})
    write_fits_atomic(path, [fits.PrimaryHDU(), fits.ImageHDU(imgs, header=hdr, name="TRAIN")])
    train_prior(_cfg(), path, tmp_path / "run")
    cov = load_prior(tmp_path / "run").meta["data"]["covered"]
    assert cov["n"] == 32 and cov["percentiles"] == [0.0, 1.0, 50.0, 99.0, 100.0]
    pixel_peaks = (peaks * torch.exp(-0.25 / widths ** 2)).numpy()  # the centre falls between 4 pixels
    assert cov["peak"][0] == pytest.approx(pixel_peaks.min(), rel=1e-5)
    assert cov["peak"][-1] == pytest.approx(pixel_peaks.max(), rel=1e-5)
    flux = (peaks * 2 * torch.pi * widths ** 2 * 0.05 ** 2).numpy()  # the Gaussians' integrals
    assert cov["flux"][0] == pytest.approx(flux.min(), rel=0.01)
    assert cov["flux"][-1] == pytest.approx(flux.max(), rel=0.01)
    assert cov["r_half"][0] == pytest.approx(1.1774 * 3 * 0.05, rel=0.025)
    assert cov["r_half"][-1] == pytest.approx(1.1774 * 4 * 0.05, rel=0.025)


def test_images_without_a_pixel_scale_record_no_ranges(blob_fits):
    _, info = load_training_images(blob_fits)
    assert "covered" not in info
