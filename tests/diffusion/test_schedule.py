"""Schedule identities: abar, the DDPM posterior variance/mean, and the strided chain's kernels."""

import math

import pytest
import torch

from pipeline.diffusion.schedule import Chain, NoiseSchedule


def test_alpha_bar_is_cumulative_product_of_one_minus_beta():
    s = NoiseSchedule()
    betas = s.betas
    assert betas.shape == (1000,)
    assert float(betas[0]) == pytest.approx(1e-4, abs=1e-15)
    assert float(betas[-1]) == pytest.approx(0.02, abs=1e-15)
    assert float(s.abar(0)) == 1.0
    for t in (1, 2, 10, 500, 1000):
        prod = 1.0
        for i in range(t):  # beta_s for s = 1..t is betas[s-1]
            prod *= 1.0 - float(betas[i])
        assert float(s.abar(t)) == pytest.approx(prod, rel=1e-12)
    # the end of the default schedule is almost pure noise (abar_K ~ 4e-5)
    assert 1e-5 < float(s.abar(1000)) < 1e-4


@pytest.mark.parametrize("K", [2, 10, 20, 100, 1000])
def test_chain_timesteps_and_strided_kernels(K):
    s = NoiseSchedule()
    c = s.chain(K)
    assert int(c.t[0]) == 0 and int(c.t[-1]) == 1000 and len(c.t) == K + 1
    assert bool((c.t[1:] > c.t[:-1]).all())
    # composing the strided forward kernels q(x_k | x_{k-1}) = N(sqrt(a_k) x_{k-1}, b_k) from x_0
    # gives q(x_k | x_0) = N(sqrt(abar_k) x_0, 1 - abar_k) exactly
    coef, var = 1.0, 0.0
    for k in range(1, K + 1):
        a, b = float(c.a[k]), float(c.b[k])
        coef, var = coef * math.sqrt(a), a * var + b
        assert coef == pytest.approx(math.sqrt(float(c.abar[k])), rel=1e-10)
        assert var == pytest.approx(1.0 - float(c.abar[k]), rel=1e-10, abs=1e-14)


def test_posterior_variance_and_mean_match_gaussian_conditioning():
    """beta-tilde and the reverse mean are those of q(x_{k-1} | x_k, x_0) with x_0 = Tweedie estimate."""
    c = NoiseSchedule().chain(25)
    torch.manual_seed(0)
    x0 = torch.randn(5, 3, dtype=torch.float64)
    for k in range(2, c.K + 1):
        abp, ab, a = float(c.abar[k - 1]), float(c.abar[k]), float(c.a[k])
        # joint of (x_{k-1}, x_k) given x_0: Var x_{k-1} = 1-abp, Var x_k = 1-ab, Cov = sqrt(a)(1-abp)
        cov12 = math.sqrt(a) * (1 - abp)
        cond_var = (1 - abp) - cov12**2 / (1 - ab)
        assert float(c.var_small[k]) == pytest.approx(cond_var, rel=1e-9)
        assert float(c.reverse_var[k]) == pytest.approx(cond_var, rel=1e-9)
        eps = torch.randn(5, 3, dtype=torch.float64)
        xk = math.sqrt(ab) * x0 + math.sqrt(1 - ab) * eps
        cond_mean = math.sqrt(abp) * x0 + cov12 / (1 - ab) * (xk - math.sqrt(ab) * x0)
        torch.testing.assert_close(c.reverse_mean(xk, eps, k), cond_mean, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(c.x0_from_eps(xk, eps, k), x0, rtol=1e-9, atol=1e-9)
    large = NoiseSchedule().chain(25, "large")
    assert torch.equal(large.reverse_var[1:], large.b[1:])
    assert bool((large.var_small[2:] < large.b[2:]).all())


def test_forward_steps_monte_carlo_match_marginals():
    c = NoiseSchedule().chain(10)
    g = torch.Generator().manual_seed(1)
    n = 40000
    x = torch.full((n, 1), 2.0, dtype=torch.float64)
    for k in range(1, c.K + 1):
        x = c.forward_step(x, k, generator=g)
        m, v = math.sqrt(float(c.abar[k])) * 2.0, 1 - float(c.abar[k])
        se_m, se_v = math.sqrt(v / n), v * math.sqrt(2.0 / n)
        assert abs(float(x.mean()) - m) < 5 * se_m
        assert abs(float(x.var()) - v) < 5 * se_v


def test_bad_schedule_and_chain_arguments():
    with pytest.raises(ValueError):
        NoiseSchedule(T=1)
    with pytest.raises(ValueError):
        NoiseSchedule(beta_start=0.1, beta_end=0.01)
    s = NoiseSchedule(T=100)
    with pytest.raises(ValueError):
        Chain(s, 1)
    with pytest.raises(ValueError):
        Chain(s, 101)
    with pytest.raises(ValueError):
        Chain(s, 10, variance="medium")
    with pytest.raises(IndexError):
        s.chain(10).reverse_mean(torch.zeros(1, 1), torch.zeros(1, 1), 1)


def test_chain_takes_a_chain_index_per_sample():
    """reverse_mean / reverse_std / x0_from_eps with a (B,) tensor k equal the int-k values row by row
    (float32 states and coefficients: to 1e-5), and an index outside 2..K is refused."""
    chain = NoiseSchedule().chain(10)
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(4, 3, 5, 5, generator=g), torch.randn(4, 3, 5, 5, generator=g)
    k = torch.tensor([2, 5, 10, 7])
    mean, std = chain.reverse_mean(x, eps, k), chain.reverse_std(k, like=x)
    x0 = chain.x0_from_eps(x, eps, k)
    assert std.shape == (4, 1, 1, 1) and std.dtype == x.dtype
    for i, ki in enumerate(k.tolist()):
        torch.testing.assert_close(mean[i], chain.reverse_mean(x[i:i + 1], eps[i:i + 1], ki)[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x0[i], chain.x0_from_eps(x[i:i + 1], eps[i:i + 1], ki)[0], rtol=1e-5, atol=1e-5)
        assert abs(float(std[i]) - chain.reverse_std(ki)) < 1e-6 * chain.reverse_std(ki)
    with pytest.raises(IndexError, match="outside 2..10"):
        chain.reverse_mean(x, eps, torch.tensor([1, 2, 3, 4]))
