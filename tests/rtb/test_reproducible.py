"""finetune-posterior from scratch is reproducible from the config's seeds, a resumed run's
metrics.jsonl holds each step once, and settings lensing cannot train with are refused up front."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.diffusion.network_prior import NetworkPrior
from pipeline.diffusion.schedule import NoiseSchedule
from pipeline.diffusion.unet import build_unet
from pipeline.io.checkpoint import load_checkpoint

CONFIG = """
device: cpu
lensing:
  geometry: {image_npix: 12, image_pixscale: 0.2, source_npix: 12, source_pixscale: 0.1, supersample: 1,
             psf_fwhm: 0.3, psf_npix: 5}
  noise: {sigma: 0.05}
chain:
  K: 5
rtb:
  policy: {head_preset: tiny}
  objective: {amortized: true, logz: vargrad, group_size: 2}
  optim: {batch_size: 4}
  exploration:
    replay_rate: 0.3
    tempered_rate: 0.3
  run: {steps: 3, checkpoint_every: 1, log_every: 1, seed: 5}
posterior:
  n_lenses: 2
  n_truths: 4
  batch_size: 4
"""


def _prior():
    g = torch.random.fork_rng()
    with g:
        torch.manual_seed(0)
        net = build_unet("tiny", in_channels=1, image_size=12)
    return NetworkPrior(net, NoiseSchedule(), (1, 12, 12), scale=2.0,
                        meta={"config_hash": "0123456789abcdef", "sample_K": 5, "sample_variance": "small"})


def _flat(obj, prefix=""):
    """Every tensor / number in a nested state as {path: value}."""
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out.update(_flat(v, f"{prefix}/{k}"))
        return out
    if isinstance(obj, (list, tuple)):
        out = {}
        for i, v in enumerate(obj):
            out.update(_flat(v, f"{prefix}/{i}"))
        return out
    return {prefix: obj}


def _run(tmp_path, name, steps=None):
    from pipeline.lensing.finetune import finetune

    cfg = tmp_path / "c.yaml"
    cfg.write_text(CONFIG)
    torch.manual_seed(1234 + len(name))  # a different global state before each run must not matter
    finetune(cfg, _prior(), tmp_path / name, tmp_path / f"{name}-out", steps=steps)
    return load_checkpoint(tmp_path / name)


@pytest.mark.slow
def test_two_runs_from_scratch_are_identical(tmp_path):
    a, b = _run(tmp_path, "a"), _run(tmp_path, "bb")
    assert a.step == b.step == 3
    assert a.hparams["lens_pool"] == {"shear": "reject"}  # a new run draws its pool from the lens prior's density
    for part in ("model", "optim", "buffer", "per_step"):
        fa, fb = _flat(a.states.get(part)), _flat(b.states.get(part))
        assert fa.keys() == fb.keys(), part
        for k in fa:
            va, vb = fa[k], fb[k]
            if isinstance(va, torch.Tensor):
                assert torch.equal(va, vb), f"{part}{k} differs"
            else:
                assert va == vb, f"{part}{k} differs"
    ra, rb = _flat(a.state["rng"]), _flat(b.state["rng"])
    assert ra.keys() == rb.keys()
    for k in ra:
        assert (torch.equal(ra[k], rb[k]) if isinstance(ra[k], torch.Tensor) else ra[k] == rb[k]), f"rng{k}"
    assert float(a.state["log_z"]) == float(b.state["log_z"])


@pytest.mark.slow
def test_resumed_finetune_writes_each_metrics_step_once(tmp_path, caplog):
    _run(tmp_path, "r", steps=2)
    run = tmp_path / "r"
    # a run killed after step 3's metrics line but before its checkpoint: the line must not stay twice
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps({"step": 3, "loss": 1.0}) + "\n")
    with caplog.at_level("INFO", logger="pipeline.rtb"):
        _run(tmp_path, "r", steps=4)
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4], steps
    # amortized: log Z is per observation, so the resume line does not print the unused global one
    resumed = [r.getMessage() for r in caplog.records if "resumed RTB training" in r.getMessage()]
    assert resumed and "log Z" not in resumed[0] and "(step 2)" in resumed[0]


@pytest.mark.parametrize("old,new,field", [
    ("    tempered_rate: 0.3\n", "    tempered_rate: 0.3\n    dps_rate: 0.2\n", "rtb.exploration.dps_rate"),
    # a head that is not sampled, with steps left to train
    ("  policy: {head_preset: tiny}", "  policy: {head_preset: tiny, use_head: false}", "rtb.policy.use_head"),
])
def test_unsupported_lensing_settings_are_refused_in_one_line(tmp_path, old, new, field):
    """One line naming the config file and the field, before any output is written."""
    from pipeline.errors import ConfigError
    from pipeline.lensing.finetune import finetune

    cfg = tmp_path / "c.yaml"
    assert old in CONFIG
    cfg.write_text(CONFIG.replace(old, new))
    with pytest.raises(ConfigError) as exc:
        finetune(cfg, _prior(), tmp_path / "run", tmp_path / "out")
    msg = str(exc.value)
    assert "\n" not in msg and field in msg and str(cfg) in msg
    assert not (tmp_path / "out").exists()
    if field.endswith("dps_rate"):
        assert not (tmp_path / "run").exists()  # refused before any work


def test_truths_are_drawn_once_and_read_back_when_the_draw_is_the_same(tmp_path, monkeypatch):
    from pipeline.diffusion.schedule import load_chain
    from pipeline.lensing import finetune as ft
    from pipeline.lensing.config import PosteriorConfig
    from pipeline.config import load_section

    cfg = tmp_path / "c.yaml"
    cfg.write_text(CONFIG)
    prior = _prior()
    chain, pcfg = load_chain(cfg, prior), load_section(cfg, "posterior", PosteriorConfig)
    calls = []
    draw = ft.sample_prior
    monkeypatch.setattr(ft, "sample_prior", lambda *a, **k: calls.append(1) or draw(*a, **k))
    path = tmp_path / "run" / ft.TRUTHS_FILE
    first = ft.cached_truths(path, prior, chain, pcfg)
    again = ft.cached_truths(path, prior, chain, pcfg)
    assert len(calls) == 1 and torch.equal(first, again) and first.shape == (4, 1, 12, 12)
    pcfg.seed += 1  # another draw: the cache is not used, and is replaced
    other = ft.cached_truths(path, prior, chain, pcfg)
    assert len(calls) == 2 and not torch.equal(other, first)
    path.write_bytes(b"not a torch file")  # a damaged cache is drawn again, never trusted
    assert torch.equal(ft.cached_truths(path, prior, chain, pcfg), other) and len(calls) == 3
    torch.save({"key": "no truths here"}, path)  # a readable file that is not a truth cache: drawn again
    assert torch.equal(ft.cached_truths(path, prior, chain, pcfg), other) and len(calls) == 4
    with torch.no_grad():  # the same recipe with other weights (trained longer): other truths
        next(prior.net.parameters()).add_(0.01)
    moved = ft.cached_truths(path, prior, chain, pcfg)
    assert len(calls) == 5 and not torch.equal(moved, other)
    prior.meta.pop("config_hash")  # a prior with no recipe hash cannot be identified: never cached
    path.unlink()
    ft.cached_truths(path, prior, chain, pcfg)
    assert not path.exists()


@pytest.mark.slow
def test_a_resumed_run_reads_its_truths_and_ends_where_an_unbroken_run_does(tmp_path, monkeypatch):
    from pipeline.lensing import finetune as ft

    a = _run(tmp_path, "a")
    _run(tmp_path, "c", steps=2)
    assert (tmp_path / "c" / "truths.pt").is_file()
    calls, draw = [], ft.sample_prior
    monkeypatch.setattr(ft, "sample_prior", lambda *a, **k: calls.append(1) or draw(*a, **k))
    c = _run(tmp_path, "c")
    assert not calls  # the resumed run read its truths
    assert c.step == a.step == 3
    for part in ("model", "per_step"):
        fa, fc = _flat(a.states.get(part)), _flat(c.states.get(part))
        for k in fa:
            assert torch.equal(fa[k], fc[k]) if isinstance(fa[k], torch.Tensor) else fa[k] == fc[k], f"{part}{k}"
