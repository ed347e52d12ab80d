"""The likelihood-informed step variance (pipeline.rtb.step_variance) and its use in the RTB policy."""

from __future__ import annotations

import pytest
import torch

from pipeline.diffusion.prior import GaussianMixturePrior
from pipeline.diffusion.schedule import gaussian_log_prob
from pipeline.rtb.objective import evaluate_states, policy_rollout
from pipeline.rtb.posterior import MLPCorrection, RTBPosterior, build_posterior
from pipeline.rtb.step_variance import data_precision_on_state, galaxy_tau2, local_tau2, mean_shift, narrowing


def _direct_precision(h: float, abar: float, tau2: float) -> float:
    """Precision of p(y | x_{k-1}) as a function of x_{k-1}, from the joint covariance of
    (x_0, x_{k-1}, y): x_0 ~ N(0, tau2), x_{k-1} = sqrt(abar) x_0 + sqrt(1 - abar) e, y = x_0 + n/sqrt(h)."""
    a = abar ** 0.5
    cov = torch.tensor([[tau2, a * tau2, tau2],
                        [a * tau2, abar * tau2 + 1 - abar, a * tau2],
                        [tau2, a * tau2, tau2 + 1 / h]], dtype=torch.float64)
    slope = cov[2, 1] / cov[1, 1]                     # E[y | x_{k-1}] = slope x_{k-1}
    resid = cov[2, 2] - cov[2, 1] ** 2 / cov[1, 1]   # Var[y | x_{k-1}]
    return float(slope ** 2 / resid)


@pytest.mark.parametrize("abar", [0.9996, 0.98, 0.6, 0.05])
@pytest.mark.parametrize("tau2", [0.026, 1.0])
def test_precision_matches_the_joint_gaussian(abar, tau2):
    h = torch.tensor([0.5, 65.0, 1500.0], dtype=torch.float64)
    got = data_precision_on_state(h, abar, tau2)
    want = torch.tensor([_direct_precision(float(v), abar, tau2) for v in h], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=0.0)


def test_narrowing_is_the_gaussian_product_and_one_without_data():
    h = torch.tensor([0.0, 10.0, 100.0, 1000.0], dtype=torch.float64)
    f = narrowing(h, 0.99, 0.07, 0.03)
    assert float(f[0]) == 1.0 and bool((f[1:] < f[:-1]).all()) and bool((f > 0).all())
    lam = data_precision_on_state(h, 0.99, 0.03)
    torch.testing.assert_close(f ** 2, 1.0 / (1.0 + 0.07 ** 2 * lam))  # 1/var = 1/s^2 + lambda
    with pytest.raises(ValueError, match="tau2"):
        narrowing(h, 0.99, 0.07, 0.0)


class _DiagProblem:
    """A 2-D identity problem y = x + N(0, sigma^2) that reports its diag(A^T A / sigma^2)."""
    is_linear = True
    y_shape = (2,)

    def __init__(self, sigma):
        self.sigma = torch.as_tensor(sigma, dtype=torch.float64)

    def diag_precision(self, y):
        return (1.0 / self.sigma ** 2).expand(y.shape[0], 2)

    def log_likelihood(self, x, y):
        return -0.5 * (((y - x) / self.sigma) ** 2).sum(1)

    def grad_log_likelihood(self, x, y):
        return ((y - x) / self.sigma ** 2).to(x.dtype)

    def row_precision(self, y):  # an identity operator couples no pixels: the row sums are the diagonal
        return self.diag_precision(y)


def _posterior(tau2):
    torch.manual_seed(0)
    prior = GaussianMixturePrior([0.5, 0.5], [[-1.0, 0.0], [1.0, 0.5]], 0.3)
    chain = prior.schedule.chain(8)
    model = MLPCorrection(2, feat_dim=2, hidden=16, layers=2, out_mult=2)
    return RTBPosterior(prior, chain, model, features=("grad",), learn_variance=True, step_variance_tau2=tau2)

def _assert_rollout_scores_again(post, b, problem):
    """The rollout's log q of every step equals the second pass's, at int k and at per-sample k."""
    again = evaluate_states(post, b.xs, b.y, None, problem=problem, eps_p=b.eps_p, log_p_steps=b.log_p_steps)
    for k in range(2, post.chain.K + 1):
        torch.testing.assert_close(again.log_q_steps[k], b.log_q_steps[k])
    ks = torch.tensor([2, 3, 5, 7])
    rows = torch.arange(4)
    x = torch.stack([b.xs[int(k)][i] for i, k in zip(rows, ks)])
    x_prev = torch.stack([b.xs[int(k) - 1][i] for i, k in zip(rows, ks)])
    eps = torch.stack([b.eps_p[int(k)][i] for i, k in zip(rows, ks)])
    with torch.no_grad():
        got = post.log_q_step(x, x_prev, ks, eps, b.y[:4], problem=problem)
    want = torch.stack([b.log_q_steps[int(k)][i] for i, k in zip(rows, ks)])
    torch.testing.assert_close(got.to(want.dtype), want, rtol=1e-5, atol=1e-4)



def test_policy_draws_and_scores_with_the_narrowed_std():
    problem = _DiagProblem([0.01, 10.0])  # pixel 0 well measured, pixel 1 barely
    y = torch.tensor([[0.8, 0.1]])
    post, plain = _posterior(1.0), _posterior(None)
    chain = post.chain
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(2))
    eps = post.prior.eps(x, post.timesteps(3, 5, x.device))
    _, s_plain = plain.step_params(x, 3, eps, y.expand(5, 2), problem=problem)
    _, s = post.step_params(x, 3, eps, y.expand(5, 2), problem=problem)
    factor = narrowing(problem.diag_precision(y.expand(5, 2)).float(), float(chain.abar[2]), chain.reverse_std(3), 1.0)
    torch.testing.assert_close(s, s_plain * factor)
    assert float(factor[:, 0].max()) < 0.9 and float(factor[:, 1].min()) > 0.999
    # rollout: the draws' spread and the recorded log q both use the narrowed std (log q exact)
    b = policy_rollout(post, 4000, y[0], problem=problem, generator=torch.Generator().manual_seed(3))
    again = evaluate_states(post, b.xs, b.y, None, problem=problem, eps_p=b.eps_p, log_p_steps=b.log_p_steps)
    for k in range(2, chain.K + 1):
        torch.testing.assert_close(again.log_q_steps[k], b.log_q_steps[k])
    yb = y.expand(4000, 2)
    with torch.no_grad():
        m2, s2 = post.step_params(b.xs[2], 2, b.eps_p[2], yb, problem=problem)
        _, s2_plain = plain.step_params(b.xs[2], 2, b.eps_p[2], yb, problem=problem)
    z = (b.x1 - m2) / s2  # the last step's draws are standard normal in the narrowed std's units
    assert abs(float(z.std()) - 1.0) < 0.03 and abs(float(z.mean())) < 0.03
    assert float((s2[:, 0] / s2_plain[:, 0]).max()) < 0.9


def test_spec_round_trip_and_old_specs():
    post = _posterior(0.1)
    spec = {"model": {"type": "mlp", "dim": 2, "cond_dim": 0, "feat_dim": 2, "hidden": 16, "layers": 2, "T": 1000,
                      "in_scale": 1.0, "out_mult": 2}, "mode": "residual", "features": ["grad"], "K": 8,
            "variance": "small", "guidance": "none", "guidance_scale": 1.0, "learn_variance": True}
    assert build_posterior(post.prior, spec).step_variance_tau2 is None  # checkpoints from before the option
    assert build_posterior(post.prior, {**spec, "step_variance_tau2": 0.1}).step_variance_tau2 == 0.1
    assert build_posterior(post.prior, spec).step_variance_mode == "prior"
    assert build_posterior(post.prior, {**spec, "step_variance_tau2": 1e-4,
                                        "step_variance_mode": "tweedie"}).step_variance_mode == "tweedie"
    assert build_posterior(post.prior, spec).step_mean_shift is False
    assert build_posterior(post.prior, {**spec, "step_variance_tau2": 0.1, "step_mean_shift": True}).step_mean_shift
    with pytest.raises(ValueError, match="step_variance_tau2"):
        build_posterior(post.prior, {**spec, "step_mean_shift": True})
    with pytest.raises(ValueError, match="step_variance_tau2"):
        build_posterior(post.prior, {**spec, "step_variance_tau2": -1.0})
    with pytest.raises(ValueError, match="problem"):
        x = torch.zeros(3, 2)
        post.step_params(x, 3, torch.zeros(3, 2), torch.zeros(3, 2), problem=None)


def test_step_std_bench_splits_the_policy_std_into_its_factors():
    """pipeline.bench.step_std: prior std x closed-form narrowing x learned factor = the policy's std."""
    from pipeline.bench.step_std import step_factors

    problem = _DiagProblem([0.01, 10.0])
    post = _posterior(1.0)
    with torch.no_grad():  # a non-zero learned offset, so the split is not trivially 1 x 1
        post.model.out.bias.add_(0.3)
    b = policy_rollout(post, 16, torch.tensor([0.8, 0.1]), problem=problem, generator=torch.Generator().manual_seed(4))
    f = step_factors(post, b)
    assert sorted(f) == list(range(2, post.chain.K + 1))
    for k, parts in f.items():
        _, std = post.step_params(b.xs[k], k, b.eps_p[k], b.y, problem=problem)
        rebuilt = post.chain.reverse_std(k) * parts["narrowing"] * torch.exp(0.5 * parts["v"])
        torch.testing.assert_close(rebuilt, std.reshape(-1))
        assert float(parts["v"].abs().max()) > 0.01
    assert float(f[2]["narrowing"].reshape(16, 2)[:, 0].max()) < 0.95  # the well-measured pixel narrows


def test_per_sample_steps_score_like_the_rollout():
    """The trainer scores replayed and backtracked states with a per-sample chain index (a (B,) tensor k):
    with the narrowing on, each row's log q equals the rollout's at that row's own step."""
    problem = _DiagProblem([0.01, 10.0])
    post = _posterior(1.0)
    with torch.no_grad():
        post.model.out.bias.add_(0.3)
    n = 6
    b = policy_rollout(post, n, torch.tensor([0.8, 0.1]), problem=problem, generator=torch.Generator().manual_seed(5))
    ks = torch.tensor([2, 3, 5, 8, 4, 2])
    rows = torch.arange(n)
    x = torch.stack([b.xs[int(k)][i] for i, k in zip(rows, ks)])
    x_prev = torch.stack([b.xs[int(k) - 1][i] for i, k in zip(rows, ks)])
    eps = torch.stack([b.eps_p[int(k)][i] for i, k in zip(rows, ks)])
    with torch.no_grad():
        got = post.log_q_step(x, x_prev, ks, eps, b.y, problem=problem)
    want = torch.stack([b.log_q_steps[int(k)][i] for i, k in zip(rows, ks)])
    torch.testing.assert_close(got.to(want.dtype), want, rtol=1e-5, atol=1e-4)


def test_local_tau2_is_the_tweedie_estimate_squared_plus_the_floor():
    x = torch.tensor([[0.5, -0.2]], dtype=torch.float64)
    eps = torch.tensor([[0.1, 0.3]], dtype=torch.float64)
    x0hat = (x - 0.6 ** 0.5 * eps) / 0.4 ** 0.5
    torch.testing.assert_close(local_tau2(x, eps, 0.4, 1e-3), x0hat ** 2 + 1e-3)
    # per-pixel tau2 enters the precision pixel by pixel: the same as the scalar form at each pixel's value
    h = torch.tensor([[50.0, 50.0]], dtype=torch.float64)
    t = local_tau2(x, eps, 0.4, 1e-3)
    per_pixel = data_precision_on_state(h, 0.9, t)
    for i in range(2):
        torch.testing.assert_close(per_pixel[0, i], data_precision_on_state(h[0, i:i + 1], 0.9, float(t[0, i]))[0])


def test_galaxy_tau2_is_the_mean_over_pixels_of_the_squared_estimate_plus_the_floor():
    x = torch.tensor([[0.5, -0.2], [0.0, 0.1]], dtype=torch.float64)
    eps = torch.tensor([[0.1, 0.3], [0.2, -0.4]], dtype=torch.float64)
    x0hat = (x - 0.6 ** 0.5 * eps) / 0.4 ** 0.5
    got = galaxy_tau2(x, eps, 0.4, 1e-3)
    assert got.shape == (2, 1)
    torch.testing.assert_close(got, (x0hat ** 2).mean(1, keepdim=True) + 1e-3)
    x4 = x.reshape(2, 1, 1, 2)  # image-shaped states: one value per sample, broadcastable
    assert galaxy_tau2(x4, eps.reshape(2, 1, 1, 2), 0.4, 1e-3).shape == (2, 1, 1, 1)


@pytest.mark.parametrize("mode", ["tweedie", "galaxy"])
def test_state_modes_draw_and_score_exactly_and_follow_the_state(mode):
    """With a per-state prior variance the step is still Gaussian in x_{k-1}: the rollout's log q equals
    the second pass's, at int and per-sample k; a faint state is narrowed less than a bright one (with
    ``galaxy`` in every pixel, with ``tweedie`` only where it is faint)."""
    problem = _DiagProblem([0.01, 0.01])
    post = _posterior(1e-4)
    post.step_variance_mode = mode
    b = policy_rollout(post, 200, torch.tensor([0.8, 0.1]), problem=problem, generator=torch.Generator().manual_seed(6))
    _assert_rollout_scores_again(post, b, problem)
    # two states at k = 3 with the same eps: x0hat 0 (faint) and 1 (bright) in pixel 0
    ab = float(post.chain.abar[3])
    eps0 = torch.zeros(2, 2)
    xs = torch.tensor([[0.0, 0.0], [ab ** 0.5, 0.0]])
    with torch.no_grad():
        _, std = post.step_params(xs, 3, eps0, torch.tensor([[0.8, 0.1]] * 2), problem=problem)
    assert float(std[0, 0]) > 1.05 * float(std[1, 0])
    if mode == "galaxy":  # pixel 1 is faint in both, but the bright galaxy's step is narrowed there too
        assert float(std[0, 1]) > 1.05 * float(std[1, 1])
    else:
        torch.testing.assert_close(std[0, 1], std[1, 1])
    with pytest.raises(ValueError, match="step_variance_mode"):
        RTBPosterior(post.prior, post.chain, post.model, step_variance_tau2=0.1, step_variance_mode="local")


def _exact_step(tau2, abar_prev, abar_k, h, xk, y):
    """The prior step (mean, var) of x_{k-1} given x_k, the prior's E[x_0 | x_k], and the exact posterior
    step (mean, var) given x_k and y, for x_0 ~ N(0, tau2), the forward chain and y = x_0 + N(0, 1/h)."""
    a_p, a_k = abar_prev, abar_k
    alpha = a_k / a_p  # x_k = sqrt(alpha) x_{k-1} + sqrt(1 - alpha) e
    # joint covariance of (x_0, x_{k-1}, x_k, y)
    v0, v1 = tau2, a_p * tau2 + 1 - a_p
    c01 = a_p ** 0.5 * tau2
    cov = torch.tensor([[v0, c01, alpha ** 0.5 * c01, v0],
                        [c01, v1, alpha ** 0.5 * v1, c01],
                        [alpha ** 0.5 * c01, alpha ** 0.5 * v1, alpha * v1 + 1 - alpha, alpha ** 0.5 * c01],
                        [v0, c01, alpha ** 0.5 * c01, v0 + 1 / h]], dtype=torch.float64)

    def cond(i, given, vals):
        s12 = cov[i, given]
        s22 = cov[given][:, given]
        w = torch.linalg.solve(s22, s12)
        return float(w @ torch.tensor(vals, dtype=torch.float64)), float(cov[i, i] - s12 @ w)

    mu, s2 = cond(1, [2], [xk])
    x0hat, _ = cond(0, [2], [xk])
    post_mean, post_var = cond(1, [2, 3], [xk, y])
    return mu, s2, x0hat, post_mean, post_var


@pytest.mark.parametrize("abar_prev,abar_k", [(0.999, 0.99), (0.9, 0.7), (0.3, 0.1)])
@pytest.mark.parametrize("tau2,h", [(0.026, 40.0), (1.0, 3.0), (0.5, 2000.0)])
def test_mean_shift_and_narrowing_give_the_exact_gaussian_step(abar_prev, abar_k, tau2, h):
    """For a diagonal operator (row sums = diagonal) and a Gaussian prior the narrowed std and the mean
    shift are the exact posterior step: the Gaussian product of the prior's step with p(y | x_{k-1})."""
    xk, y = 0.7, -0.4
    mu, s2, x0hat, want_mean, want_var = _exact_step(tau2, abar_prev, abar_k, h, xk, y)
    hh = torch.tensor([h], dtype=torch.float64)
    s_new = s2 ** 0.5 * narrowing(hh, abar_prev, s2 ** 0.5, tau2)
    torch.testing.assert_close(s_new ** 2, torch.tensor([want_var], dtype=torch.float64), rtol=1e-10, atol=0.0)
    grad = hh * (y - x0hat)
    got = mu + mean_shift(grad, hh, hh, abar_prev, s_new, tau2)
    torch.testing.assert_close(got, torch.tensor([want_mean], dtype=torch.float64), rtol=1e-10, atol=1e-12)


def test_mean_shift_is_damped_by_the_row_sums_and_zero_without_data():
    grad, h = torch.tensor([2.0, 2.0, 0.0]), torch.tensor([10.0, 10.0, 0.0])
    full = mean_shift(grad, h, h, 0.9, 0.1, 0.03)
    damped = mean_shift(grad, h, torch.tensor([40.0, 10.0, 0.0]), 0.9, 0.1, 0.03)
    torch.testing.assert_close(damped[0], full[0] / 4)
    torch.testing.assert_close(damped[1], full[1])
    assert float(damped[2]) == 0.0 and bool(torch.isfinite(damped).all())


def test_shifted_policy_draws_and_scores_exactly_and_moves_towards_the_data():
    """With step_mean_shift the step is still Gaussian in x_{k-1} (rollout log q = second pass, at int and
    per-sample k), its mean moves by the closed-form shift, and samples land nearer the data."""
    problem = _DiagProblem([0.05, 0.05])
    y = torch.tensor([1.5, -1.0])
    post, plain = _posterior(1.0), _posterior(1.0)
    post.step_mean_shift = True
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(7))
    eps = post.prior.eps(x, post.timesteps(3, 5, x.device))
    m_plain, s_plain = plain.step_params(x, 3, eps, y.expand(5, 2), problem=problem)
    m, s = post.step_params(x, 3, eps, y.expand(5, 2), problem=problem)
    torch.testing.assert_close(s, s_plain)
    narrow, shift = post.likelihood_step(x, 3, eps, y.expand(5, 2), problem)
    torch.testing.assert_close(m, m_plain + shift)
    assert float(shift.abs().min()) > 0
    b = policy_rollout(post, 256, y, problem=problem, generator=torch.Generator().manual_seed(8))
    _assert_rollout_scores_again(post, b, problem)
    b_plain = policy_rollout(plain, 256, y, problem=problem, generator=torch.Generator().manual_seed(8))
    err = float(((b.x0 - y) ** 2).sum(1).mean())
    err_plain = float(((b_plain.x0 - y) ** 2).sum(1).mean())
    assert err < 0.8 * err_plain
    with pytest.raises(ValueError, match="step_variance_tau2"):
        RTBPosterior(post.prior, post.chain, post.model, step_mean_shift=True)


def test_dense_row_precision_bounds_the_spectrum_and_config_needs_a_step_variance(tmp_path):
    """DenseLinearProblem.row_precision: the row sums of |M|^T W |M| (>= diagonal, >= every eigenvalue
    of M^T W M); rtb.policy.step_mean_shift without step_variance_tau2 is a one-line config error."""
    from pipeline.config import load_section
    from pipeline.errors import ConfigError
    from pipeline.problems import DenseLinearProblem
    from pipeline.rtb.config import RTBConfig

    M = torch.tensor([[1.0, -0.5, 0.0], [0.2, 1.0, 0.3], [0.0, 0.4, -1.0], [0.5, 0.0, 0.5]], dtype=torch.float64)
    prob = DenseLinearProblem(M, torch.tensor([0.5, 1.0, 2.0, 1.0]))
    y = torch.zeros(2, 4)
    w = 1.0 / torch.tensor([0.5, 1.0, 2.0, 1.0], dtype=torch.float64) ** 2
    row = prob.row_precision(y).double()
    assert row.shape == (2, 3)
    torch.testing.assert_close(row[0], M.abs().T @ (w * M.abs().sum(1)), rtol=1e-6, atol=0.0)
    assert bool((row[0] >= prob.diag_precision(y)[0].double() - 1e-6).all())
    assert float(torch.linalg.eigvalsh(M.T @ (w[:, None] * M)).max()) <= float(row[0].max()) + 1e-6
    cfg = tmp_path / "c.yaml"
    cfg.write_text("rtb:\n  policy:\n    step_mean_shift: true\n")
    with pytest.raises(ConfigError, match="step_mean_shift"):
        load_section(cfg, "rtb", RTBConfig)
