"""The ``chain:`` section: the uniform grid is the one the chain always had, non-uniform grids build valid
chains, and a bad explicit grid is a one-line error naming ``chain.timesteps``."""

import pytest
import torch
import yaml

from pipeline.config import from_mapping, load_section
from pipeline.diffusion.chain_config import ChainConfig
from pipeline.diffusion.schedule import NoiseSchedule, build_chain, load_chain
from pipeline.errors import ConfigError


def _valid(chain, K, T):
    t = chain.t.tolist()
    assert len(t) == K + 1 and t[0] == 0 and t[-1] == T and all(b > a for a, b in zip(t, t[1:]))
    # every strided coefficient is finite where it applies (k >= 1), the small variance below the large one
    assert torch.isfinite(chain.a[1:]).all() and bool((chain.b[1:] > 0).all())
    assert bool((chain.var_small[1:] <= chain.b[1:] + 1e-15).all())


@pytest.mark.parametrize("K", [2, 6, 20, 50, 333, 1000])
def test_uniform_grid_is_the_evenly_rounded_grid(K):
    sched = NoiseSchedule()
    chain = build_chain(ChainConfig(K=K), sched)
    want = torch.round(torch.linspace(0, sched.T, K + 1, dtype=torch.float64)).long()
    assert torch.equal(chain.t, want)
    assert torch.equal(chain.t, sched.chain(K).t)  # the chain's own default grid
    assert chain.describe()["timesteps"] == want.tolist()


@pytest.mark.parametrize("K", [2, 6, 20, 50, 100])
def test_quadratic_grid_builds_a_valid_chain_denser_at_low_noise(K):
    sched = NoiseSchedule()
    chain = build_chain(ChainConfig(K=K, spacing="quadratic"), sched)
    _valid(chain, K, sched.T)
    gaps = torch.diff(chain.t)
    assert int(gaps[0]) < int(gaps[-1])  # small steps near the data, large ones near the noise
    assert chain.describe()["timesteps"] == chain.t.tolist()


def test_explicit_grid_from_the_config_file(tmp_path):
    path = tmp_path / "c.yaml"
    grid = [0, 5, 40, 200, 600, 1000]
    path.write_text(yaml.safe_dump({"chain": {"K": 5, "variance": "large", "timesteps": grid}}))
    prior = type("P", (), {"schedule": NoiseSchedule(), "meta": {}})()
    chain = load_chain(path, prior)
    _valid(chain, 5, 1000)
    assert chain.t.tolist() == grid and chain.variance == "large"
    # absent section: the defaults (50 uniform steps, small variance)
    empty = tmp_path / "e.yaml"
    empty.write_text("{}\n")
    d = load_chain(empty, prior)
    assert (d.K, d.variance, d.t.tolist()) == (50, "small", NoiseSchedule().chain(50).t.tolist())


@pytest.mark.parametrize("grid, words", [
    ([0, 10, 20], "needs K+1 = 6 entries"),
    ([1, 5, 40, 200, 600, 1000], "must start at 0"),
    ([0, 40, 5, 200, 600, 1000], "strictly increasing"),
    ([0, 5, 5, 200, 600, 1000], "strictly increasing"),
    ([0, 5, 40, 200, 600, 999], "must end at the prior's T = 1000"),
    ([0, 5, 40, 200, 600, "x"], "expected int"),
])
def test_bad_explicit_grid_is_a_one_line_error_naming_chain_timesteps(tmp_path, grid, words):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"chain": {"K": 5, "timesteps": grid}}))
    with pytest.raises(ConfigError) as err:
        build_chain(load_section(path, "chain", ChainConfig), NoiseSchedule(), path)
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg and "chain.timesteps" in msg and words in msg


def test_bad_K_and_spacing_are_one_line_errors():
    with pytest.raises(ConfigError, match=r"field 'chain.K'.*>= 2"):
        from_mapping(ChainConfig, {"K": 1}, "c.yaml", prefix="chain.")
    with pytest.raises(ConfigError, match=r"field 'chain.spacing'.*must be one of"):
        from_mapping(ChainConfig, {"spacing": "cosine"}, "c.yaml", prefix="chain.")
    with pytest.raises(ConfigError, match=r"c.yaml: field 'chain.K'.*T=10"):
        build_chain(ChainConfig(K=20), NoiseSchedule(T=10), "c.yaml")


def test_a_prior_that_recorded_another_chain_warns_and_the_config_decides(tmp_path, caplog):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"chain": {"K": 6}}))
    old = type("P", (), {"schedule": NoiseSchedule(), "meta": {"sample_K": 20, "sample_variance": "small"}})()
    with caplog.at_level("WARNING"):
        chain = load_chain(path, old)
    assert chain.K == 6 and any("K=20" in r.getMessage() for r in caplog.records)
