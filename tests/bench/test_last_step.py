"""The last-step comparison benchmark: its variants, and a small run on the shipped checkpoints."""

import pytest

from pipeline.bench.last_step import run_variant, variants
from pipeline.bench.lensing_obs import prior_drawn_observations
from pipeline.lensing.sample import load_setup, method_run
from pipeline.metrics.chi2 import chi2_per_sample


def test_variant_list():
    names = [n for n, _ in variants([8, 16], per_sample=True)]
    assert names == ["policy", "shared", "shared-r8", "shared-r8-policy", "shared-r16", "shared-r16-policy",
                     "per-sample"]
    assert [n for n, _ in variants([], per_sample=False)] == ["policy", "shared"]


@pytest.mark.slow
def test_policy_and_low_rank_variants_on_a_prior_drawn_observation():
    # the dense variant (a 1024 x 1024 Jacobian, about 20 s) is left to the benchmark itself
    setup = load_setup("config/config.yaml", "data/pretrained/prior", n=2, seed=0)
    obs = prior_drawn_observations(setup, 1, seed=0)[0]
    run = method_run(setup, "rtb_amortized", "data/pretrained/prior", "data/pretrained/posterior", obs["problem"])
    table = dict(variants([4], per_sample=False))
    for f in (None, table["shared-r4"], table["shared-r4-policy"]):
        r = run_variant(run.sampler, f, obs["problem"], obs["y"], 2, seed=0)
        assert r["seconds_per_sample"] > 0 and r["chi2_nu"] > 0.5 and r["elbo"] < 0
    truth = chi2_per_sample(obs["problem"], obs["truth"][None], obs["y"])["chi2_nu"][0]
    assert 0.7 < truth < 1.3  # the truth fits at the noise level (1024 pixels)
