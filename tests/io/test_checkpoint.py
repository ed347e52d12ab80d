"""Checkpoint directories: round trip, LATEST pointer, pruning, fallback on truncation, one-line errors."""

import json
import logging
import random

import numpy as np
import pytest
import torch

from pipeline.diffusion.network_prior import NetworkPrior
from pipeline.diffusion.schedule import NoiseSchedule
from pipeline.diffusion.unet import build_unet
from pipeline.errors import InputFileError
from pipeline.diffusion.network_prior import export_prior, load_prior, prior_hparams
from pipeline.io.checkpoint import list_checkpoints, load_checkpoint, restore_rng_state, rng_state, save_checkpoint


def _states(seed):
    torch.manual_seed(seed)
    net = build_unet("tiny", base_channels=8)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    net(torch.randn(2, 1, 16, 16), 3).pow(2).mean().backward()
    opt.step()
    return net, opt


def test_round_trip_of_named_states_hparams_and_rng(tmp_path):
    net, opt = _states(0)
    gen = torch.Generator().manual_seed(123)
    torch.randn(3, generator=gen)
    log_z = torch.tensor(-4.25, dtype=torch.float64)
    state = {"config_hash": "abc", "rng": rng_state({"data": gen}), "extra": {"log_z": log_z, "note": [1, 2.5]}}
    path = save_checkpoint(tmp_path / "run", 7, {"model": net.state_dict(), "optim": opt.state_dict()},
                           {"kind": "test", "width": 8}, state)
    assert path.name == "step-000007"
    assert (tmp_path / "run" / "LATEST").read_text().strip() == "step-000007"
    expect_gen = torch.randn(4, generator=gen)
    expect_torch, expect_py, expect_np = torch.rand(2), random.random(), np.random.rand()

    ck = load_checkpoint(tmp_path / "run")
    assert ck.step == 7 and ck.hparams == {"kind": "test", "width": 8}
    assert ck.state["config_hash"] == "abc" and ck.state["extra"]["note"] == [1, 2.5]
    assert torch.equal(ck.state["extra"]["log_z"], log_z)
    for k, v in net.state_dict().items():
        assert torch.equal(ck.states["model"][k], v)
    opt2 = torch.optim.AdamW(build_unet("tiny", base_channels=8).parameters(), lr=1e-3)
    opt2.load_state_dict(ck.states["optim"])
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    gen2 = torch.Generator()
    restore_rng_state(ck.state["rng"], {"data": gen2})
    assert torch.equal(torch.randn(4, generator=gen2), expect_gen)
    assert torch.equal(torch.rand(2), expect_torch)
    assert random.random() == expect_py and np.random.rand() == expect_np


def test_latest_pointer_and_keep_last_n(tmp_path):
    net, _ = _states(0)
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, {"model": net.state_dict()}, {"kind": "test"}, keep=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3, 4]
    assert load_checkpoint(tmp_path).step == 4
    # re-saving an existing step replaces it atomically
    save_checkpoint(tmp_path, 4, {"model": net.state_dict()}, {"kind": "test", "v": 2}, keep=2)
    assert load_checkpoint(tmp_path).hparams["v"] == 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_truncated_newest_falls_back_to_previous_with_warning(tmp_path, caplog):
    net, _ = _states(0)
    save_checkpoint(tmp_path, 5, {"model": net.state_dict()}, {"kind": "test"}, {"extra": 5})
    net2, _ = _states(1)
    newest = save_checkpoint(tmp_path, 10, {"model": net2.state_dict()}, {"kind": "test"}, {"extra": 10})
    data = (newest / "model.pt").read_bytes()
    (newest / "model.pt").write_bytes(data[: len(data) // 2])
    with caplog.at_level(logging.WARNING):
        ck = load_checkpoint(tmp_path)
    assert ck.step == 5 and ck.state["extra"] == 5
    assert "step-000010" in caplog.text and "truncated" in caplog.text
    # naming the broken step directory itself is an error, not a silent fallback
    with pytest.raises(InputFileError) as err:
        load_checkpoint(newest)
    assert "truncated" in str(err.value) and "\n" not in str(err.value)


def test_corrupt_same_size_file_is_detected(tmp_path):
    net, _ = _states(0)
    path = save_checkpoint(tmp_path, 1, {"model": net.state_dict()}, {"kind": "test"})
    raw = bytearray((path / "model.pt").read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (path / "model.pt").write_bytes(bytes(raw))
    with pytest.raises(InputFileError, match="checksum"):
        load_checkpoint(tmp_path)


def test_missing_or_empty_checkpoint_is_one_line_error(tmp_path):
    for path, words in [(tmp_path / "nope", "not found"), (tmp_path, "no checkpoint")]:
        with pytest.raises(InputFileError) as err:
            load_checkpoint(path)
        msg = str(err.value)
        assert str(path) in msg and words in msg and "\n" not in msg
    with pytest.raises(InputFileError, match="not found"):
        load_prior(tmp_path / "nope")


def test_load_prior_rebuilds_the_network_from_hparams_alone(tmp_path):
    torch.manual_seed(0)
    net = build_unet("tiny", base_channels=8)
    sched = NoiseSchedule(T=200, beta_end=0.03)
    prior = NetworkPrior(net, sched, (1, 16, 16), scale=2.0, offset=0.5)
    h = prior_hparams(net, sched, (1, 16, 16), 2.0, 0.5, sample_K=7)
    export_prior(tmp_path / "final", net.state_dict(), h)
    loaded = load_prior(tmp_path / "final")
    assert loaded.schedule == sched and loaded.event_shape == (1, 16, 16)
    assert (loaded.scale, loaded.offset, loaded.meta["sample_K"]) == (2.0, 0.5, 7)
    x = torch.randn(3, 1, 16, 16)
    torch.testing.assert_close(loaded.eps(x, torch.tensor([1, 50, 200])), prior.eps(x, torch.tensor([1, 50, 200])),
                               rtol=0, atol=0)
    torch.testing.assert_close(loaded.to_physical(x), 2.0 * x + 0.5)
    torch.testing.assert_close(loaded.to_network(loaded.to_physical(x)), x)
    assert not any(p.requires_grad for p in loaded.net.parameters())
    # a checkpoint of something else is refused with a message naming hparams.json
    save_checkpoint(tmp_path / "other", 1, {"ema": net.state_dict()}, {"kind": "rtb"})
    with pytest.raises(InputFileError, match="hparams.json"):
        load_prior(tmp_path / "other")
    # weights that do not match hparams are a clean error too
    bad = json.loads((tmp_path / "final" / "hparams.json").read_text())
    bad["unet"]["base_channels"] = 16
    export_prior(tmp_path / "bad", net.state_dict(), bad)
    with pytest.raises(InputFileError, match="does not match"):
        load_prior(tmp_path / "bad")


def test_load_prior_falls_back_from_a_truncated_final_export(tmp_path, caplog):
    torch.manual_seed(0)
    net = build_unet("tiny", base_channels=8)
    sched = NoiseSchedule(T=100)
    h = prior_hparams(net, sched, (1, 16, 16), 1.0, 0.0)
    save_checkpoint(tmp_path, 4, {"ema": net.state_dict(), "model": net.state_dict()}, h)
    export_prior(tmp_path / "final", net.state_dict(), h)
    data = (tmp_path / "final" / "ema.pt").read_bytes()
    (tmp_path / "final" / "ema.pt").write_bytes(data[:-10])
    with caplog.at_level(logging.WARNING):
        prior = load_prior(tmp_path)
    assert prior.meta["step"] == 4 and "falling back" in caplog.text
