"""bench vision: config precedence and validation, aggregation, the RTB-vs-DPS claim check, and an
end-to-end smoke run on a tiny configuration (marked slow)."""

import argparse
import json
import math

import pytest
import yaml

from pipeline.errors import ConfigError
from pipeline.vision import bench
from pipeline.vision.config import QUICK, VisionConfig, method_applies
from pipeline.vision.outputs import aggregate, claim_check


def _args(*argv):
    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    return p.parse_args(list(argv))


def test_config_precedence(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(yaml.safe_dump({"vision": {"n_obs": 7, "chain": {"K": 30}, "tasks": ["phase_retrieval"],
                                                   "prior": {"steps": 5000, "lr": 1e-3}}}))
    cfg, src = bench.config_from_args(_args("--config", str(cfg_file)))
    assert (cfg.n_obs, cfg.chain.K, cfg.tasks) == (7, 30, ["phase_retrieval"]) and src == str(cfg_file)
    assert (cfg.prior.steps, cfg.prior.lr) == (5000, 1e-3)
    # --quick overrides the file key by key (the file's prior.lr stays), explicit flags override --quick
    cfg, _ = bench.config_from_args(_args("--config", str(cfg_file), "--quick", "--n-obs", "3"))
    assert cfg.chain.K == QUICK["chain"]["K"] and cfg.n_obs == 3 and cfg.tasks == QUICK["tasks"]
    assert (cfg.prior.steps, cfg.prior.lr) == (300, 1e-3)
    assert VisionConfig().sigma_y == 0.05


@pytest.mark.parametrize("section, field", [
    ({"n_obs": 0}, "vision.n_obs"),
    ({"tasks": ["superres"]}, "vision.tasks[0]"),
    ({"rtb": {"optim": {"batch_size": 10}, "objective": {"group_size": 4}}}, "vision.rtb.objective.group_size"),
    ({"rtb": {"exploration": {"replay_rate": 0.5, "dps_rate": 0.5}}}, "vision.rtb.exploration.replay_rate"),
    ({"rtb": {"policy": {"guidance": "dps"}}}, "vision.rtb.policy.guidance"),
    ({"prior_augment": {"mnist": "rotate"}}, "vision.prior_augment.mnist"),
    ({"chain": {"K": 1}}, "vision.chain.K"),
    ({"latent_prior": {"data": "x.fits"}}, "vision.latent_prior.data"),
    ({"sigma_y": -1.0}, "vision.sigma_y"),
    ({"unknown_key": 1}, "vision.unknown_key"),
])
def test_config_errors_name_file_and_field(tmp_path, section, field):
    cfg_file = tmp_path / "bad.yaml"
    cfg_file.write_text(yaml.safe_dump({"vision": section}))
    with pytest.raises(ConfigError) as exc:
        bench.config_from_args(_args("--config", str(cfg_file)))
    assert exc.value.field == field and str(cfg_file) in str(exc.value)
    assert "\n" not in str(exc.value)


def test_method_applicability():
    assert method_applies("fps", "box_inpaint", "pixel")
    assert not method_applies("fps", "phase_retrieval", "pixel")
    assert not method_applies("fps_smc", "box_inpaint", "latent")  # the decoder makes it nonlinear
    assert not method_applies("dps_cla", "nonlinear_deblur", "pixel")
    assert method_applies("dps", "nonlinear_deblur", "latent")
    assert method_applies("rtb_dps", "phase_retrieval", "pixel")


def _rec(method, obs, elbo, se, **kw):
    base = dict(dataset="mnist", space="pixel", task="box_inpaint", method=method, obs=obs, n=8, nfe=19,
                mean_log_r=-10.0, elbo=elbo, elbo_se=se, iw=elbo + 1, psnr=20.0, ssim=0.5, psnr_of_mean=21.0,
                seconds_per_sample=0.1, ess=2.0)
    base.update(kw)
    return base


def test_aggregate_combines_standard_errors():
    recs = [_rec("dps", 0, -100.0, 3.0), _rec("dps", 1, -120.0, 4.0)]
    row = aggregate(recs, budget="K=20")
    assert row["elbo"] == pytest.approx(-110.0)
    assert row["elbo_se"] == pytest.approx(math.sqrt(9 + 16) / 2)  # SE of a mean of independent estimates
    assert row["n_obs"] == 2 and row["budget"] == "K=20"
    recs[1]["elbo"] = None  # one observation without an estimate: no mean is reported
    assert aggregate(recs)["elbo"] is None


def test_claim_check_counts_per_observation():
    recs = [_rec("dps", 0, -100.0, 1.0), _rec("rtb_amortized", 0, -90.0, 1.0),
            _rec("dps", 1, -100.0, 1.0), _rec("rtb_amortized", 1, -101.0, 1.0),  # lower, within 2 SE
            _rec("dps", 2, -100.0, 1.0), _rec("rtb_amortized", 2, -110.0, 1.0)]  # lower by > 2 SE
    res = claim_check(recs)["per_task"]["mnist/pixel/box_inpaint/rtb_amortized"]
    assert res["n_obs"] == 3 and res["geq"] == 1 and res["significantly_lower"] == 1
    assert res["diff"] == [10.0, -1.0, -10.0]


@pytest.mark.slow
def test_end_to_end_tiny(tmp_path):
    cfg_file = tmp_path / "v.yaml"
    cfg_file.write_text(yaml.safe_dump({"device": "cpu", "vision": {
        "datasets": ["mnist"], "tasks": ["random_inpaint", "phase_retrieval"], "latent_datasets": ["mnist"],
        "latent_tasks": ["nonlinear_deblur"], "n_obs": 1, "n_samples": 4, "chain": {"K": 4},
        "prior": {"steps": 8}, "latent_prior": {"steps": 8}, "ae_steps": 10,
        "rtb": {"run": {"steps": 2}, "optim": {"batch_size": 4}, "objective": {"group_size": 2}},
        "prior_is_particles": 2, "fps_smc_particles": 2, "dps_grid": [0.01], "rtb_dps_grid": [0.001],
        "figure_samples": 2}}))
    out = tmp_path / "out"
    assert bench.run(_args("--config", str(cfg_file), "--out", str(out))) == 0
    summary = json.loads((out / "table.json").read_text())
    rows = {(r["space"], r["task"], r["method"]) for r in summary["rows"]}
    # linear-only methods run on the linear pixel task only
    assert ("pixel", "random_inpaint", "fps_smc") in rows and ("pixel", "phase_retrieval", "fps") not in rows
    assert ("latent", "nonlinear_deblur", "dps") in rows and ("latent", "nonlinear_deblur", "dps_cla") not in rows
    assert len(rows) == 7 + 4 + 4
    for r in summary["rows"]:
        assert r["nfe"] >= 4 and r["seconds_per_sample"] > 0
        assert r["psnr"] is not None and r["ssim"] is not None
        if r["method"] == "fps_smc":
            assert r["elbo"] is None and r["iw"] is None
        if r["method"] in ("dps", "rtb_amortized", "rtb_dps", "fps"):
            assert r["elbo"] is not None and r["elbo_se"] is not None
    md = (out / "table.md").read_text()
    assert "| mnist | pixel | phase_retrieval | dps |" in md and "Claim" in md
    assert len(list((out / "figures").glob("*.png"))) == 3
    lines = (out / "per_observation.jsonl").read_text().splitlines()
    assert len(lines) == len(rows)
    # a second run reuses the trained prior, autoencoder and RTB checkpoints
    assert bench.run(_args("--config", str(cfg_file), "--out", str(out))) == 0
