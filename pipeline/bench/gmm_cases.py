"""Cases of the exact-posterior GMM benchmark and their analytic quantities.

* ``2d``: 25 unit-covariance components with means (8i, 8j), i, j in {-2..2}, weights drawn once from
  a fixed seed; a 1-D observation ``y = a.x + sigma_y n`` along a fixed random unit direction a,
  sigma_y = 1.
* ``{8,80}d_y{1,2,4}``: 25 unit-covariance components with means uniform in [-8, 8]^d and weights from a
  fixed seed; A with d_y Gaussian rows normalised to unit length; sigma_y = 1.

Every case draws its observations from the prior predictive of the K-step chain, one per seed
(:func:`draw_observation`). Units: x and y are dimensionless; log densities and log Z in nats.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.diffusion.prior import GaussianMixturePrior
from pipeline.diffusion.sampling import rollout
from pipeline.problems import DenseLinearProblem

FULL_CASES = ("2d", "8d_y1", "8d_y2", "8d_y4", "80d_y1", "80d_y2", "80d_y4")


class IsotropicGMMPrior(GaussianMixturePrior):
    """A mixture whose components all have identity covariance: the VP-noised components stay
    N(sqrt(abar) m_j, I), so eps and the score need no Cholesky (an exact, O(B J d) fast path)."""

    def __init__(self, weights, means, schedule=None):
        means = torch.as_tensor(means, dtype=torch.float64)
        super().__init__(weights, means, 1.0, schedule)
        self._log_w = torch.log(self.weights)

    def _logits(self, x64, ab):
        # |x - sqrt(ab) m_j|^2 by matrix products (no (B, J, d) tensor: the 80-D cases are memory-bound)
        sab = ab.sqrt()[:, None]
        d2 = (x64 * x64).sum(1, keepdim=True) - 2.0 * sab * (x64 @ self.means.T) + \
            ab[:, None] * (self.means * self.means).sum(1)[None]
        return self._log_w[None] - 0.5 * d2 - 0.5 * self.dim * math.log(2 * math.pi), sab

    def log_prob_noised(self, x, t):
        ab = self._abar_batch(t, x.shape[0])
        logits, _ = self._logits(x.double().cpu(), ab)
        return torch.logsumexp(logits, 1)

    def score(self, x, t):
        ab = self._abar_batch(t, x.shape[0])
        x64 = x.double().cpu()
        logits, sab = self._logits(x64, ab)
        r = torch.softmax(logits, 1)
        return sab * (r @ self.means) - x64

    def component_of(self, x):
        ab = torch.ones(x.shape[0], dtype=torch.float64)
        logits, _ = self._logits(x.double().cpu(), ab)
        return logits.argmax(1)


@dataclass
class GMMCase:
    """One benchmark case: the prior, the linear-Gaussian problem and its dimensions."""

    name: str
    prior: IsotropicGMMPrior
    problem: DenseLinearProblem
    d_x: int
    d_y: int
    sigma_y: float = 1.0


def make_case(name: str) -> GMMCase:
    """Build a benchmark case by name: ``2d`` or ``<d>d_y<m>`` (d in {8, 80}, m in {1, 2, 4})."""
    if name == "2d":
        rng = np.random.default_rng(20240501)
        grid = torch.tensor([(8.0 * i, 8.0 * j) for i in range(-2, 3) for j in range(-2, 3)], dtype=torch.float64)
        w = rng.uniform(0.5, 1.5, 25)
        a = rng.normal(size=2)
        A = torch.tensor(a / np.linalg.norm(a), dtype=torch.float64)[None]
        prior = IsotropicGMMPrior(w / w.sum(), grid)
        return GMMCase(name, prior, DenseLinearProblem(A, 1.0), 2, 1)
    try:
        d_part, y_part = name.split("d_y")
        d, m = int(d_part), int(y_part)
    except ValueError:
        raise ValueError(f"unknown gmm case {name!r} (2d, 8d_y1, 8d_y2, 8d_y4, 80d_y1, 80d_y2, 80d_y4)") from None
    rng = np.random.default_rng(1000 + d)
    means = torch.tensor(rng.uniform(-8, 8, size=(25, d)), dtype=torch.float64)
    w = rng.uniform(0.5, 1.5, 25)
    rngA = np.random.default_rng(2000 + 10 * d + m)
    A = rngA.normal(size=(m, d))
    A /= np.linalg.norm(A, axis=1, keepdims=True)
    prior = IsotropicGMMPrior(w / w.sum(), means)
    return GMMCase(name, prior, DenseLinearProblem(torch.tensor(A), 1.0), d, m)


def draw_observation(case: GMMCase, chain, seed: int):
    """(y, x_true): a truth from the prior chain and its noisy observation, from ``seed``."""
    g = torch.Generator().manual_seed(10_000 + seed)
    x = rollout(case.prior, chain, 1, generator=g, keep_states=False, dtype=torch.float64).x0.float()
    y = case.problem.simulate(x, generator=g)[0]
    return y, x[0]


def analytic_logz(case: GMMCase, y) -> float:
    """log p(y) in nats under the analytic mixture: log sum_k w_k N(y; A m_k, A A^T + sigma^2 I)."""
    A = case.problem.M
    cov = A @ A.T + case.sigma_y ** 2 * torch.eye(case.d_y, dtype=torch.float64)
    mu = case.prior.means @ A.T
    diff = torch.as_tensor(y, dtype=torch.float64)[None] - mu
    L = torch.linalg.cholesky(cov)
    sol = torch.cholesky_solve(diff.T, L).T
    logn = (-0.5 * (diff * sol).sum(1) - torch.log(torch.diagonal(L)).sum() - 0.5 * case.d_y * math.log(2 * math.pi))
    return float(torch.logsumexp(torch.log(case.prior.weights) + logn, 0))
