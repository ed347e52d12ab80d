"""The Gaussian-source joint lensing check: exact evidence, its MH reference, the amortized theta head."""

import math

import numpy as np
import pytest
import torch

from pipeline.bench import joint_lensing_gaussian as jlg
from pipeline.bench import joint_lensing_mh as jmh
from pipeline.lensing.lens_head import _logit_within, importance_check, refine

TINY = dict(source_npix=6, source_pixscale=0.3, image_npix=8, image_pixscale=0.25, psf_npix=3, psf_fwhm=0.25,
            length_scale=0.4, K=10, snr=3.0)
ONE = {"center": 0.0, "q": (0.8, 0.8), "phi": (0.3, 0.3), "shear_sigma": 0.0}   # theta = (rein,)


def _grid_posterior(model, y, n=801):
    """Quadrature over rein on its prior range: (grid, normalised density)."""
    lo, hi = model.prior.box["rein"]
    grid = torch.linspace(lo, hi, n, dtype=torch.float64)[:, None]
    lp = model.log_evidence(grid, y.expand(n, -1))
    w = torch.exp(lp - lp.max())
    return grid[:, 0], w / torch.trapezoid(w, grid[:, 0])


def test_log_evidence_is_the_gaussian_marginal():
    model = jlg.GaussianSourceLensing(jlg.Setup(**TINY), seed=0)
    assert model.prior.names == ["rein", "q", "phi", "g1", "g2"]
    theta, y = model.simulate(3, np.random.default_rng(1), torch.Generator().manual_seed(1))
    A = model.bind(theta).dense()
    cov = A @ model.S0 @ A.transpose(1, 2) + model.sigma ** 2 * torch.eye(A.shape[1], dtype=torch.float64)
    want = torch.distributions.MultivariateNormal(A @ model.m0, covariance_matrix=cov).log_prob(y)
    torch.testing.assert_close(model.log_evidence(theta, y), want, rtol=1e-9, atol=1e-6)
    # and the truth is likelier than a lens from elsewhere in the prior
    other = model.draw_theta(3, np.random.default_rng(99))
    assert bool((model.log_evidence(theta, y) > model.log_evidence(other, y)).all())


@pytest.mark.slow
def test_metropolis_matches_quadrature_on_one_parameter():
    model = jlg.GaussianSourceLensing(jlg.Setup(**TINY, lens=ONE), seed=0)
    truth, y = model.simulate(2, np.random.default_rng(3), torch.Generator().manual_seed(3))
    mh = jmh.metropolis(model, y, truth, torch.full_like(truth, 1e-3), n_iter=6000, burn=1000, seed=0)
    for b in range(2):
        grid, dens = _grid_posterior(model, y[b:b + 1])
        mean = float(torch.trapezoid(grid * dens, grid))
        sd = math.sqrt(float(torch.trapezoid((grid - mean) ** 2 * dens, grid)))
        chain = mh["theta"][:, b, 0]
        ess = chain.shape[0] / jlg.integrated_autocorr_time(chain)
        assert ess > 300
        assert abs(float(chain.mean()) - mean) < 5 * sd / math.sqrt(ess)
        assert 0.85 < float(chain.std()) / sd < 1.15
        assert 0.1 < mh["acceptance"][b] < 0.7


@pytest.mark.slow
def test_head_trained_amortized_then_fitted_matches_quadrature_on_one_parameter():
    """Joint RTB's theta objective with an exact lens-conditional sampler: amortized on fresh model draws,
    then fitted over the observations it is asked about, q(theta | y) matches the exact posterior."""
    model = jlg.GaussianSourceLensing(jlg.Setup(**TINY, lens=ONE), seed=0)
    head, losses = jlg.train_head(model, steps=300, groups=8, group_size=16, lr=3e-3, seed=0)
    assert np.mean(losses[-50:]) < 0.1 * np.mean(losses[:50])
    _, y = model.simulate(4, np.random.default_rng(5), torch.Generator().manual_seed(5))
    head, _ = jlg.train_head(model, steps=400, groups=4, group_size=16, lr=1.5e-3, seed=1, observations=y,
                             head=head)
    gen = torch.Generator().manual_seed(0)
    for b in range(4):
        grid, dens = _grid_posterior(model, y[b:b + 1])
        mean = float(torch.trapezoid(grid * dens, grid))
        sd = math.sqrt(float(torch.trapezoid((grid - mean) ** 2 * dens, grid)))
        s = head.sample((y[b:b + 1] / model.y_scale).expand(4000, -1), gen)[:, 0]
        # Monte-Carlo sd of the mean of 4,000 draws is 0.016 sd: the bounds are the method's, not the noise's
        assert abs(float(s.mean()) - mean) < 0.2 * sd, (b, float(s.mean()), mean, sd)
        assert 0.8 < float(s.std()) / sd < 1.25, (b, float(s.std()), sd)


def test_compare_marginals_reads_phi_on_its_circle():
    """A head and an MH chain that agree on phi but straddle 0 = pi give dmean ~ 0, not ~ pi / 2."""
    assert abs(jmh.circular_mean(torch.tensor([0.05, math.pi - 0.05], dtype=torch.float64), math.pi)) < 1e-9
    v = jmh.circular_unwrap(torch.tensor([3.1, 0.02, 1.0], dtype=torch.float64), 0.0, math.pi)
    torch.testing.assert_close(v, torch.tensor([3.1 - math.pi, 0.02, 1.0], dtype=torch.float64))


def test_refine_per_observation_reaches_quadrature_from_an_untrained_head():
    """Semi-amortized refinement: each observation's head outputs fitted on their own (the network untouched)
    reach the exact posterior over rein, with off-policy widened draws early on."""
    model = jlg.GaussianSourceLensing(jlg.Setup(**TINY, lens=ONE), seed=0)
    _, y = model.simulate(3, np.random.default_rng(5), torch.Generator().manual_seed(5))
    torch.manual_seed(0)
    head = jlg.LensThetaHead(model.prior, model.op.m)
    net_before = [p.detach().clone() for p in head.parameters()]
    raw, losses = refine(head, y / model.y_scale,
                         lambda theta, rows: model.log_evidence(theta, y[rows]),
                         steps=300, group_size=16, lr=0.05, widen=3.0, seed=0)
    assert raw.shape[0] == 3 and losses.shape == (300, 3)
    assert all(torch.equal(a, b) for a, b in zip(net_before, head.parameters()))
    gen = torch.Generator().manual_seed(1)
    for b in range(3):
        grid, dens = _grid_posterior(model, y[b:b + 1])
        mean = float(torch.trapezoid(grid * dens, grid))
        sd = math.sqrt(float(torch.trapezoid((grid - mean) ** 2 * dens, grid)))
        s = head.sample(raw=raw[b:b + 1].expand(4000, -1), generator=gen)[:, 0]
        assert abs(float(s.mean()) - mean) < 0.2 * sd, (b, float(s.mean()), mean, sd)
        assert 0.8 < float(s.std()) / sd < 1.25, (b, float(s.std()), sd)


def test_importance_check_scores_a_refined_fit_and_flags_an_untrained_one():
    """Kish ESS fraction near 1 and the importance-weighted log evidence at the quadrature value for a
    refined q(rein | y); an untrained head, far from the posterior, flagged."""
    model = jlg.GaussianSourceLensing(jlg.Setup(**TINY, lens=ONE), seed=0)
    _, y = model.simulate(2, np.random.default_rng(5), torch.Generator().manual_seed(5))
    torch.manual_seed(0)
    head = jlg.LensThetaHead(model.prior, model.op.m)

    def log_likelihood(theta, rows):
        return model.log_evidence(theta, y[rows])

    with torch.no_grad():
        untrained = importance_check(head, head.raw(y / model.y_scale), log_likelihood, n=512, seed=2)
    raw, _ = refine(head, y / model.y_scale, log_likelihood, steps=300, group_size=16, lr=0.05, widen=3.0, seed=0)
    fit = importance_check(head, raw, log_likelihood, n=2000, seed=2)
    lo, hi = model.prior.box["rein"]
    for b in range(2):
        grid = torch.linspace(lo, hi, 4001, dtype=torch.float64)
        lp = model.log_evidence(grid[:, None], y[b:b + 1].expand(4001, -1)) - math.log(hi - lo)
        log_z = float(lp.max() + torch.log(torch.trapezoid(torch.exp(lp - lp.max()), grid)))
        assert fit["ess_fraction"][b] > 0.8 and not fit["flagged"][b], fit
        # the estimator's sd is about log_w_sd / sqrt(n ESS) < 0.02 nats here
        assert abs(fit["log_z"][b] - log_z) < 0.05, (b, fit["log_z"][b], log_z)
        assert untrained["flagged"][b] and untrained["ess_fraction"][b] < 0.3, untrained
        assert untrained["log_z"][b] < log_z + 0.5
    with pytest.raises(ValueError, match="min_ess_fraction"):
        importance_check(head, raw, log_likelihood, n=8, min_ess_fraction=0.0)


def test_refine_tempering_leaves_a_local_optimum_that_on_policy_fitting_keeps():
    """A fit started at a minor mode (rein 0.55, 30 nats below the main one at 0.7) stays there on-policy:
    VarGrad never sees the main mode. Tempered from beta0 = 0.01 it ends at the main mode."""
    model = jlg.GaussianSourceLensing(jlg.Setup(**TINY, lens=ONE), seed=0)
    lo, hi = model.prior.box["rein"]
    assert lo < 0.55 and 0.7 < hi

    def log_likelihood(theta, rows):
        r = theta[:, 0]
        return torch.logaddexp(-0.5 * ((r - 0.7) / 0.01) ** 2, -0.5 * ((r - 0.55) / 0.01) ** 2 - 30.0)

    torch.manual_seed(0)
    head = jlg.LensThetaHead(model.prior, model.op.m)
    with torch.no_grad():                         # the components at rein 0.54-0.57, each with sd 0.005
        nb = len(head.box_names)
        bias = head.net[-1].bias.view(head.C, -1)
        mid, half = 0.5 * (lo + hi), 0.5 * (hi - lo)
        bias[:, :nb] = torch.tensor([[math.atanh((r - mid) / half)] for r in (0.54, 0.55, 0.56, 0.57)])
        bias[:, nb:2 * nb] = _logit_within(math.log(0.005 / (hi - lo)), head.log_s_range)
    h = torch.zeros(1, model.op.m, dtype=torch.float64)
    gen = torch.Generator().manual_seed(1)
    assert abs(float(head.sample(h.expand(2000, -1), gen)[:, 0].mean()) - 0.555) < 0.01
    near_main = {}
    for beta0 in (1.0, 0.01):
        raw, _ = refine(head, h, log_likelihood, steps=400, group_size=16, lr=0.1, beta0=beta0, seed=0)
        s = head.sample(raw=raw.expand(4000, -1), generator=gen)[:, 0]
        near_main[beta0] = float(((s - 0.7).abs() < 0.03).double().mean())
    assert near_main[1.0] < 0.01, near_main
    assert near_main[0.01] > 0.98, near_main


def test_refine_fits_each_observation_on_its_own():
    """Changing one observation's likelihood leaves the other's refined outputs unchanged (bitwise: no phi,
    so the random stream does not depend on the parameters)."""
    model = jlg.GaussianSourceLensing(jlg.Setup(**TINY, lens=ONE), seed=0)
    _, y = model.simulate(2, np.random.default_rng(5), torch.Generator().manual_seed(5))
    torch.manual_seed(0)
    head = jlg.LensThetaHead(model.prior, model.op.m)
    out = []
    for shift in (0.0, 1.0):
        y2 = y.clone()
        y2[1] += shift
        raw, _ = refine(head, y / model.y_scale, lambda theta, rows: model.log_evidence(theta, y2[rows]),
                        steps=20, group_size=8, lr=0.05, seed=0)
        out.append(raw)
    assert torch.equal(out[0][0], out[1][0]) and not torch.equal(out[0][1], out[1][1])
    with pytest.raises(ValueError, match="beta0"):
        refine(head, y / model.y_scale, lambda theta, rows: theta[:, 0], steps=1, beta0=0.0)


def test_cli_refuses_a_bad_tempering_start_in_one_line(capsys):
    with pytest.raises(SystemExit) as err:
        jlg.main(["out.json", "--refine-beta0", "0"])
    assert err.value.code == 2 and "--refine-beta0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as err:       # the moment start fits a correlated normal: that head only
        jlg.main(["out.json", "--refine-start", "smc"])
    assert err.value.code == 2 and "--head correlated" in capsys.readouterr().err


class _BoxPrior:
    """Uniform on [0, 2]^2 (the prior part of the MH target), named like two lens parameters."""
    names = ["rein", "q"]
    box = {"rein": (0.0, 2.0), "q": (0.0, 2.0)}

    def log_prob(self, t):
        inside = ((t >= 0) & (t <= 2)).all(-1)
        return torch.where(inside, 0.0, -math.inf).double()


class _CorrelatedTarget:
    """log p(y | theta): a normal at (1, 1) with sds (0.01, 0.03) and correlation 0.95, like q and a shear
    component of a lens posterior."""
    prior = _BoxPrior()
    rho, sd = 0.95, torch.tensor([0.01, 0.03], dtype=torch.float64)

    def log_evidence(self, t, y):
        z = (t - 1.0) / self.sd
        return -0.5 * (z[:, 0] ** 2 - 2 * self.rho * z[:, 0] * z[:, 1] + z[:, 1] ** 2) / (1 - self.rho ** 2)


def test_metropolis_adapts_a_full_covariance_on_a_correlated_target():
    """Started 100x too narrow and diagonal, the adapted proposal follows the ridge: over 10,000 kept
    iterations each of 4 chains has ESS > 800 per parameter (a diagonal adaptation gets 190-310 here)
    and the right moments."""
    model, B = _CorrelatedTarget(), 4
    mh = jmh.metropolis(model, torch.zeros(B, 1), torch.ones(B, 2, dtype=torch.float64),
                        torch.full((B, 2), 1e-3, dtype=torch.float64), n_iter=12000, burn=2000, seed=0)
    th = mh["theta"]
    for b in range(B):
        for j in range(2):
            chain = th[:, b, j]
            ess = chain.shape[0] / jlg.integrated_autocorr_time(chain)
            assert ess > 800, (b, j, ess)
            assert abs(float(chain.mean()) - 1.0) < 5 * float(model.sd[j]) / math.sqrt(ess)
            assert 0.9 < float(chain.std()) / float(model.sd[j]) < 1.1
        assert abs(float(torch.corrcoef(th[:, b].T)[0, 1]) - 0.95) < 0.02
        assert 0.15 < mh["acceptance"][b] < 0.4
