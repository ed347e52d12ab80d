"""GMM benchmark pieces: fast isotropic prior, cases, analytic evidence, chain references, a tiny run."""

import json
import math

import pytest
import torch

from pipeline.bench.gmm import run_benchmark
from pipeline.bench.gmm_cases import IsotropicGMMPrior, analytic_logz, make_case
from pipeline.bench.gmm_reference import chain_reference, prior_chain_samples
from pipeline.bench.gmm_rtb import tune_rtb_guidance
from pipeline.bench.gmm_summary import table
from pipeline.diffusion.prior import GaussianMixturePrior
from pipeline.rtb.tuning import GUIDANCE_GRIDS as RTB_GUIDANCE_GRIDS
from pipeline.samplers.exact_guidance import ExactGuidance


def test_isotropic_prior_matches_general_mixture():
    g = torch.Generator().manual_seed(0)
    means = torch.randn(5, 3, generator=g, dtype=torch.float64) * 4
    w = torch.tensor([0.1, 0.2, 0.3, 0.25, 0.15], dtype=torch.float64)
    fast, ref = IsotropicGMMPrior(w, means), GaussianMixturePrior(w, means, 1.0)
    x = torch.randn(64, 3, generator=g) * 3
    for t in (1, 100, 500, 999):
        torch.testing.assert_close(fast.eps(x, t), ref.eps(x, t), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fast.log_prob_noised(x, t), ref.log_prob_noised(x, t))
    torch.testing.assert_close(fast.component_of(x), ref.component_of(x))


def test_cases_have_the_documented_shapes():
    c = make_case("2d")
    assert c.d_x == 2 and c.d_y == 1 and c.prior.means.shape == (25, 2)
    assert sorted(set(c.prior.means[:, 0].tolist())) == [-16.0, -8.0, 0.0, 8.0, 16.0]
    assert float(c.problem.M.norm()) == pytest.approx(1.0)
    c8 = make_case("8d_y4")
    assert c8.prior.means.shape == (25, 8) and float(c8.prior.means.abs().max()) <= 8
    torch.testing.assert_close(c8.problem.M.norm(dim=1), torch.ones(4, dtype=torch.float64))
    # fixed seeds: the same case twice is identical
    torch.testing.assert_close(make_case("8d_y4").problem.M, c8.problem.M)
    with pytest.raises(ValueError, match="unknown gmm case"):
        make_case("3d")


def test_analytic_logz_matches_monte_carlo():
    c = make_case("2d")
    y = torch.tensor([1.7])
    x = c.prior.sample(400000, generator=torch.Generator().manual_seed(1))
    lr = c.problem.log_likelihood(x, y)
    mc = float(torch.logsumexp(lr, 0) - math.log(x.shape[0]))
    assert analytic_logz(c, y) == pytest.approx(mc, abs=0.02)


@pytest.mark.slow
def test_chain_reference_evidence_and_floor():
    c = make_case("2d")
    chain = c.prior.schedule.chain(10)
    y = torch.tensor([3.0])
    ref = chain_reference(c, chain, y, n=500, n_prop=40000, seed=0)
    assert ref["ref1"].shape == (500, 2) and ref["ref_ess"] > 500
    # an independent prior-chain estimate of the chain evidence agrees
    x0 = prior_chain_samples(c.prior, chain, 100000, torch.Generator().manual_seed(9))
    lr = c.problem.log_likelihood(x0, y)
    assert ref["logz_ref"] == pytest.approx(float(torch.logsumexp(lr, 0) - math.log(lr.numel())), abs=0.05)


def test_tiny_benchmark_run_writes_json_and_figure(tmp_path):
    res = run_benchmark(tmp_path, quick=True, seeds=[0], methods=["dps", "prior_is", "exact_guidance"], K=10,
                        n=300, n_prop=20000)
    data = json.loads((tmp_path / "gmm.json").read_text())
    runs = data["cases"]["2d"]["runs"]
    assert {r["method"] for r in runs} == {"dps", "prior_is", "exact_guidance"}
    for r in runs:
        for key in ("sw", "sw_floor", "mode_tv", "logz_ref", "logz_analytic", "logz_iw", "diverged", "rollbacks",
                    "seconds", "nfe_per_sample", "K", "n_samples"):
            assert key in r, key
        assert r["K"] == 10 and r["n_samples"] == 300
    eg = next(r for r in runs if r["method"] == "exact_guidance")
    # the ELBO never exceeds the IW estimate (Jensen on the same weights); both near the reference
    assert eg["logz_elbo"] <= eg["logz_iw"] and abs(eg["logz_iw"] - eg["logz_ref"]) < 1.0
    assert "dps" in data["cases"]["2d"]["tuning"]
    assert (tmp_path / "gmm_2d.png").is_file()
    assert "| 2d | dps |" in table(res)
    # the wrong-modes column counts runs with mode TV > 0.5, per case and method
    fake = {"cases": {"2d": {"summary": res["cases"]["2d"]["summary"],
                             "runs": [{**r, "mode_tv": tv} for r, tv in zip(runs, (0.9, 0.2, 0.51))]}}}
    rows = {line.split(" | ")[1]: line.split(" | ")[5] for line in table(fake).splitlines() if line.startswith("| 2d |")}
    by_method = {r["method"]: tv > 0.5 for r, tv in zip(runs, (0.9, 0.2, 0.51))}
    assert rows == {m: f"{int(w)}/1" for m, w in by_method.items()}


@pytest.mark.slow
def test_benchmark_resumes_finished_cases_and_runs_cases_in_workers(tmp_path, caplog):
    """Finished cases are written to cases/<name>.json and reused by a rerun with the same settings;
    jobs > 1 runs cases in spawned worker processes with the same results format."""
    kw = dict(quick=True, seeds=[0], methods=["dps"], K=5, n=100, n_prop=2000)
    first = run_benchmark(tmp_path, cases=["2d", "8d_y1"], jobs=2, **kw)
    assert (tmp_path / "cases" / "2d.json").is_file() and (tmp_path / "cases" / "8d_y1.json").is_file()
    assert list(first["cases"]) == ["2d", "8d_y1"]
    assert {r["method"] for r in first["cases"]["8d_y1"]["runs"]} == {"dps"}
    with caplog.at_level("INFO", logger="pipeline.bench.gmm"):
        again = run_benchmark(tmp_path, cases=["2d", "8d_y1"], **kw)
    assert "reusing" in caplog.text
    assert again["cases"]["2d"]["runs"] == json.loads(json.dumps(first["cases"]["2d"]["runs"]))
    # different settings: the case is recomputed, not reused
    caplog.clear()
    with caplog.at_level("INFO", logger="pipeline.bench.gmm"):
        run_benchmark(tmp_path, cases=["2d"], **{**kw, "n": 120})
    assert "reusing" not in caplog.text


def test_bench_cli_dispatch(capsys):
    from pipeline.cli import main

    with pytest.raises(SystemExit) as e:
        main(["bench", "gmm"])  # --out is required
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["bench", "vision", "--help"])  # forwarded to pipeline.vision.bench's own parser
    assert e.value.code == 0
    assert "bench vision" in capsys.readouterr().out


@pytest.mark.slow
def test_smc_reference_matches_plain_importance_sampling():
    """The twisted-SMC reference (higher-dimensional cases) against plain prior-chain importance sampling
    on a case where the latter is still efficient: same log Z (the SMC estimate is unbiased) and the
    same posterior mean, within Monte-Carlo error."""
    c = make_case("8d_y1")
    chain = c.prior.schedule.chain(10)
    y = c.problem.simulate(c.prior.sample(1, generator=torch.Generator().manual_seed(3)).float(),
                           generator=torch.Generator().manual_seed(4))[0]
    ref = chain_reference(c, chain, y, n=2000, n_prop=8000, seed=0)
    assert ref["proposal"] == "exact_guidance_smc" and ref["ref1"].shape == (2000, 8)
    assert ref["ref_ess"] > 2000
    g = torch.Generator().manual_seed(11)
    x0 = prior_chain_samples(c.prior, chain, 200_000, g)
    lw = c.problem.log_likelihood(x0, y).double()
    w = torch.softmax(lw, 0)
    logz_is = float(torch.logsumexp(lw, 0) - math.log(lw.shape[0]))
    assert abs(ref["logz_ref"] - logz_is) < 0.05, (ref["logz_ref"], logz_is)
    mean_is = (w[:, None] * x0.double()).sum(0)
    sd = ((w[:, None] * (x0.double() - mean_is) ** 2).sum(0)).sqrt()
    err = ((ref["ref1"].double().mean(0) - mean_is) / sd).abs().max()
    assert err < 0.1, err  # 2000 resampled draws: ~0.03 sd standard error per coordinate


def test_exact_guidance_diagonal_fast_path_equals_general_path():
    c = make_case("80d_y4")
    chain = c.prior.schedule.chain(10)
    y = c.problem.simulate(c.prior.sample(1, generator=torch.Generator().manual_seed(3)).float(),
                           generator=torch.Generator().manual_seed(4))[0]
    guide = ExactGuidance(c.prior, chain, c.problem)
    assert guide.diagonal
    x = 3.0 * torch.randn(64, 80, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    for k in (1, 5, 10):
        g_fast, h_fast = guide.score_and_log_likelihood_t(x, y, k)
        guide.diagonal = False
        g_gen, h_gen = guide.score_and_log_likelihood_t(x, y, k)
        guide.diagonal = True
        torch.testing.assert_close(g_fast, g_gen, rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(h_fast, h_gen, rtol=1e-10, atol=1e-8)
    # the isotropic prior's matrix-product eps equals the direct (B, J, d) formula
    t = torch.full((64,), int(chain.t[5]))
    ab = c.prior._abar_batch(t, 64)
    mu = ab.sqrt()[:, None, None] * c.prior.means[None]
    logits = torch.log(c.prior.weights)[None] - 0.5 * ((x[:, None, :] - mu) ** 2).sum(-1)
    score = (torch.softmax(logits, 1)[..., None] * mu).sum(1) - x
    torch.testing.assert_close(c.prior.score(x, t), score, rtol=1e-8, atol=1e-9)


def test_rtb_guidance_scale_tuned_on_separate_seed():
    c = make_case("2d")
    rec = tune_rtb_guidance(c, c.prior.schedule.chain(8), "dps_cla", tuning_seed=999, n=64)
    assert rec["scale"] in RTB_GUIDANCE_GRIDS["dps_cla"] and rec["tuning_seed"] == 999
    finite = [v for v in rec["values"] if v is not None]
    assert rec["values"][RTB_GUIDANCE_GRIDS["dps_cla"].index(rec["scale"])] == max(finite)


@pytest.mark.slow
def test_rtb_divergence_is_decided_by_the_large_log_z_estimate(tmp_path):
    """RTB runs record log Z_IW from n_logz fresh trajectories beside the n-sample one, and the
    divergence flag follows the large estimate (|log Z_IW - log Z_ref| > 1 nat)."""
    res = run_benchmark(tmp_path, quick=True, seeds=[0], methods=["rtb"], K=8, n=200, n_prop=20000, n_logz=3000,
                        rtb_steps=15)
    (r,) = res["cases"]["2d"]["runs"]
    assert r["n_logz"] == 3000 and r["n_samples"] == 200
    assert math.isfinite(r["logz_iw_large"]) and 0 < r["ess_large"] <= 3000
    assert r["err_logz_iw_large"] == pytest.approx(abs(r["logz_iw_large"] - r["logz_ref"]))
    assert r["diverged"] == (r["err_logz_iw_large"] > 1.0)
    assert "3,000 traj." in table(res)
    assert res["cases"]["2d"]["summary"]["rtb"]["err_logz_iw_large"]["n"] == 1


def test_rtb_steps_and_hidden_defaults_and_scaling():
    """Defaults: 300 (quick) / 400 steps on the 2-D case, 500 above it; the amortized network trains 2x
    (4x in 80-D), the guided 80-D variants 1.6x; head width 64 quick / 128. An explicit step count is the
    base of the same multipliers."""
    from pipeline.bench.gmm_rtb import rtb_config

    c2, c80 = make_case("2d"), make_case("80d_y1")
    assert [rtb_config(c2, q, False, 0).run.steps for q in (True, False)] == [300, 400]
    assert [rtb_config(c2, q, False, 0).policy.head_hidden for q in (True, False)] == [64, 128]
    assert rtb_config(c80, False, False, 0).run.steps == 500
    assert rtb_config(c80, False, True, 0).run.steps == 2000
    assert rtb_config(c80, False, False, 0, guided=True).run.steps == 800
    assert rtb_config(c2, True, True, 0).run.steps == 600
    assert rtb_config(c2, True, False, 0, guided=True).run.steps == 300
    assert rtb_config(c2, True, False, 0, steps=15, hidden=16).run.steps == 15
    assert rtb_config(c2, True, False, 0, steps=15, hidden=16).policy.head_hidden == 16
    assert rtb_config(c80, False, True, 0, steps=15).run.steps == 60
    assert rtb_config(c80, False, False, 0, guided=True, steps=15).run.steps == 24
    assert rtb_config(c80, False, False, 0, steps=15).objective.beta_ramp_steps == 7


@pytest.mark.slow
def test_bench_gmm_rtb_flags_reach_the_recorded_runs(tmp_path, capsys):
    """--rtb-steps / --rtb-hidden of `bench gmm` set the steps RTB trains (recorded per run) and the head
    width, are documented in --help, and are part of the settings a finished case is reused under."""
    from pipeline.cli import main

    with pytest.raises(SystemExit):
        main(["bench", "gmm", "--help"])
    helptext = capsys.readouterr().out
    assert "--rtb-steps" in helptext and "--rtb-hidden" in helptext
    argv = ["bench", "gmm", "--quick", "--seeds", "1", "--methods", "rtb", "--K", "6", "--n", "100",
            "--n-logz", "200", "--out", str(tmp_path)]
    assert main(argv + ["--rtb-steps", "7", "--rtb-hidden", "16"]) == 0
    (r,) = json.loads((tmp_path / "gmm.json").read_text())["cases"]["2d"]["runs"]
    assert r["train_steps"] == 7 and r["config"]["steps"] == 7 and r["config"]["head_hidden"] == 16
    settings = json.loads((tmp_path / "cases" / "2d.json").read_text())["settings"]
    assert settings["rtb_steps"] == 7 and settings["rtb_hidden"] == 16
    assert main(argv + ["--rtb-steps", "9", "--rtb-hidden", "16"]) == 0  # other settings: not reused
    (r,) = json.loads((tmp_path / "gmm.json").read_text())["cases"]["2d"]["runs"]
    assert r["train_steps"] == 9


def test_bench_gmm_spacing_builds_the_quadratic_chain_for_every_method_and_the_reference(tmp_path):
    """--spacing quadratic: the chain every method and the reference use ends near t = 0 (t_1 = 1 at K = 30
    on T = 1000); the exact-guidance sampler's log Z stays within 1 nat of the reference on it; the spacing
    is recorded and part of the settings a finished case is reused under (uniform, the default, is not
    written there)."""
    from pipeline.bench.gmm_run import case_chain
    from pipeline.cli import main
    from pipeline.diffusion.chain_config import timestep_grid

    c = make_case("2d")
    assert case_chain(c, 30, "quadratic").t.tolist() == timestep_grid(c.prior.schedule.T, 30, "quadratic")
    assert case_chain(c, 30).t.tolist() == c.prior.schedule.chain(30).t.tolist()
    argv = ["bench", "gmm", "--quick", "--seeds", "1", "--methods", "exact_guidance", "--K", "10", "--n", "300",
            "--out", str(tmp_path)]
    assert main(argv + ["--spacing", "quadratic"]) == 0
    data = json.loads((tmp_path / "cases" / "2d.json").read_text())
    assert data["settings"]["spacing"] == "quadratic" and data["block"]["spacing"] == "quadratic"
    (r,) = data["block"]["runs"]
    assert abs(r["logz_iw"] - r["logz_ref"]) < 1.0
    assert main(argv) == 0  # uniform: a different case block, not the reused quadratic one
    data = json.loads((tmp_path / "cases" / "2d.json").read_text())
    assert "spacing" not in data["settings"] and data["block"]["spacing"] == "uniform"


@pytest.mark.parametrize("name, flag", [("GMM_RTB_STEPS", "--rtb-steps"), ("GMM_RTB_HIDDEN", "--rtb-hidden")])
def test_retired_environment_variables_are_refused(tmp_path, monkeypatch, capsys, name, flag):
    """The variables that once set RTB's budget are refused with a one-line error naming the flag, rather
    than silently ignored."""
    from pipeline.cli import main
    from pipeline.errors import ConfigError

    monkeypatch.setenv(name, "15")
    with pytest.raises(ConfigError, match=flag) as exc:
        run_benchmark(tmp_path, quick=True, seeds=[0], methods=["exact_guidance"], K=4, n=50, n_prop=1000)
    assert exc.value.field == name and "\n" not in str(exc.value)
    assert not (tmp_path / "gmm.json").exists()
    assert main(["bench", "gmm", "--quick", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and name in err and flag in err
