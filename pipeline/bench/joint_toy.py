"""A toy with an exact joint posterior over an operator parameter theta and a source x.

x (d = 4 pixels at positions 0..3) has a Gaussian prior, sampled through the exact Gaussian diffusion
chain (:class:`pipeline.rtb.joint.AffineChain`); theta is a sub-pixel shift (pixels) of a Gaussian PSF
with a uniform prior on [-1, 1]; y (m = 6 pixels at positions -1..4) = A(theta) x + N(0, sigma^2 I).
For each theta, p(y | theta) is Gaussian in closed form under the chain's x0 law, so the marginal
posterior of theta follows by quadrature on a grid (:func:`quadrature`), and x | theta, y is Gaussian.

``python -m pipeline.bench.joint_toy OUT_DIR`` trains joint RTB, runs the PMMH reference and writes
``joint_toy.json`` and ``joint_toy.png`` (the stage-A figure of docs/joint.md).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.diffusion.gaussian_chain import gaussian_linear_posterior
from pipeline.diffusion.schedule import NoiseSchedule
from pipeline.rtb.joint import (AffineChain, JointPolicy, UniformBox, choose_n_trajectories, ess, pmmh,
                                prior_chain_log_weights, train_joint)


@dataclass
class JointToy:
    """The toy's constants: chain length ``K``, PSF width ``psf_width`` (pixels), noise ``sigma``
    (y units), source prior N(``prior_mean``, ``prior_std``^2 exp(-|i-j| / ``corr_length``))."""

    K: int = 5
    psf_width: float = 0.8
    sigma: float = 0.2
    prior_mean: tuple = (0.6, 1.0, 1.0, 0.6)
    prior_std: float = 0.4
    corr_length: float = 2.0
    theta_range: tuple = (-1.0, 1.0)

    def __post_init__(self):
        self.d, self.m = len(self.prior_mean), len(self.prior_mean) + 2
        i = torch.arange(self.d, dtype=torch.float64)
        self.mean = torch.tensor(self.prior_mean, dtype=torch.float64)
        self.cov = self.prior_std ** 2 * torch.exp(-(i[:, None] - i[None]).abs() / self.corr_length)
        self.chain = AffineChain(NoiseSchedule().chain(self.K), self.mean, self.cov)
        self.box = UniformBox([self.theta_range[0]], [self.theta_range[1]])
        self.x_pos = i
        self.y_pos = torch.arange(self.m, dtype=torch.float64) - 1

    def operator(self, theta: torch.Tensor) -> torch.Tensor:
        """A(theta) for theta (B, 1): (B, m, d), a Gaussian PSF shifted by theta pixels."""
        r = self.y_pos[None, :, None] - self.x_pos[None, None, :] - theta.reshape(-1, 1, 1)
        return torch.exp(-0.5 * (r / self.psf_width) ** 2)

    def log_lik(self, x0: torch.Tensor, theta: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """log p(y | x0, theta) in nats, (B,)."""
        r = y - torch.einsum("bmd,bd->bm", self.operator(theta), x0)
        return (-0.5 * (r / self.sigma) ** 2).sum(-1) - self.m * (math.log(self.sigma) + 0.5 * math.log(2 * math.pi))

    def features(self, x: torch.Tensor, k: int, theta: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The policy's extra input: A^T (y - A x0hat(x_k)) at theta (the likelihood gradient times sigma^2)."""
        A = self.operator(theta)
        r = y - torch.einsum("bmd,bd->bm", A, self.chain.x0hat(x, k))
        return torch.einsum("bmd,bm->bd", A, r)

    def observations(self, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """n draws (theta (n, 1), y (n, m)) from the joint model (theta ~ prior, x0 from the chain)."""
        gen = torch.Generator().manual_seed(seed)
        theta = self.box.sample(n, gen)
        x0 = self.chain.rollout(n, gen)[0]
        y = torch.einsum("bmd,bd->bm", self.operator(theta), x0)
        return theta, y + self.sigma * torch.randn(y.shape, generator=gen, dtype=torch.float64)


def quadrature(toy: JointToy, y: torch.Tensor, n_grid: int = 2001) -> dict:
    """Exact marginal posterior of theta by the trapezoid rule on a grid of ``n_grid`` points.

    Returns grid, density (normalised), mean, std (pixels) and log_evidence log p(y) (nats)."""
    lo, hi = toy.theta_range
    grid = torch.linspace(lo, hi, n_grid, dtype=torch.float64)
    A = toy.operator(grid[:, None])
    log_l = torch.tensor([gaussian_linear_posterior(toy.chain.x0_mean, toy.chain.x0_cov, A[i], toy.sigma ** 2, y)[2]
                          for i in range(n_grid)], dtype=torch.float64)
    log_joint = log_l - math.log(hi - lo)
    w = torch.full((n_grid,), (hi - lo) / (n_grid - 1), dtype=torch.float64)
    w[0] = w[-1] = 0.5 * w[1]
    log_ev = torch.logsumexp(log_joint + w.log(), 0)
    dens = torch.exp(log_joint - log_ev)
    mean = float((w * dens * grid).sum())
    std = math.sqrt(float((w * dens * (grid - mean) ** 2).sum()))
    return {"grid": grid, "density": dens, "mean": mean, "std": std, "log_evidence": float(log_ev)}


def monte_carlo(toy: JointToy, y: torch.Tensor, n: int, seed: int = 0) -> dict:
    """Brute force: (theta, x) from the prior (x through the chain), weighted by p(y | x0, theta).
    Returns the self-normalised mean and std of theta and log p(y) (nats)."""
    gen = torch.Generator().manual_seed(seed)
    theta = toy.box.sample(n, gen)
    x0 = toy.chain.rollout(n, gen)[0]
    log_w = toy.log_lik(x0, theta, y.reshape(1, -1).expand(n, -1))
    w = torch.softmax(log_w, 0)
    mean = float((w * theta[:, 0]).sum())
    std = math.sqrt(float((w * (theta[:, 0] - mean) ** 2).sum()))
    return {"mean": mean, "std": std, "log_evidence": float(torch.logsumexp(log_w, 0) - math.log(n)),
            "ess": float(1 / (w ** 2).sum())}


def make_policy(toy: JointToy, seed: int = 0, hidden: int = 64, components: int = 2) -> JointPolicy:
    torch.manual_seed(seed)
    return JointPolicy(toy.chain, toy.box, toy.m, features=toy.features, feat_dim=toy.d, hidden=hidden,
                       components=components, y_scale=2.0)


@torch.no_grad()
def policy_theta_moments(policy: JointPolicy, y: torch.Tensor, n: int = 20000, seed: int = 0) -> dict:
    """Mean and std of theta under q_phi(theta | y), from n draws."""
    th = policy.theta_head.sample(y.reshape(1, -1).expand(n, -1).double(), torch.Generator().manual_seed(seed))
    return {"mean": float(th.mean()), "std": float(th.std())}


def run_pmmh(toy: JointToy, y: torch.Tensor, n_iter: int, seed: int = 0, target_var: float = 2.0) -> dict:
    """PMMH with the prior chain as theta-conditional sampler; n trajectories chosen so Var(log Z^) <= target_var
    at the quadrature's posterior mode, proposal step 2.4 x the posterior std. Returns the chain and its
    summaries (acceptance, tau_int, ESS, trajectories simulated, seconds)."""
    ref = quadrature(toy, y)
    mode = ref["grid"][int(ref["density"].argmax())].reshape(1)
    lw = prior_chain_log_weights(toy.chain, toy.log_lik, y)
    n_traj, var = choose_n_trajectories(lw, mode, target_var=target_var, seed=seed)
    t0 = time.perf_counter()
    out = pmmh(toy.box.log_prob, lw, mode, n_traj=n_traj, step=2.4 * ref["std"], n_iter=n_iter, seed=seed)
    th = out["theta"][:, 0]
    e = ess(th)
    return {"theta": th, "mean": float(th.mean()), "std": float(th.std()), "acceptance": out["acceptance"],
            "ess": e, "tau_int": len(th) / e, "n_traj": n_traj, "var_log_z": var, "trajectories": out["trajectories"],
            "seconds": time.perf_counter() - t0}


def stage_a(out_dir, n_obs: int = 4, steps: int = 400, n_iter: int = 20000, seed: int = 0) -> dict:
    """Train joint RTB amortized over n_obs observations, run PMMH on each, compare both with quadrature;
    write joint_toy.json and (with matplotlib) joint_toy.png in out_dir."""
    toy = JointToy()
    theta_true, ys = toy.observations(n_obs, seed)
    policy = make_policy(toy, seed)
    t0 = time.perf_counter()
    losses = train_joint(policy, toy.log_lik, ys, steps=steps, seed=seed)
    train_s = time.perf_counter() - t0
    rows, curves = [], []
    for i in range(n_obs):
        ref = quadrature(toy, ys[i])
        q = policy_theta_moments(policy, ys[i], seed=seed)
        mh = run_pmmh(toy, ys[i], n_iter, seed=seed + i)
        rows.append({"theta_true": float(theta_true[i, 0]), "quadrature": {k: ref[k] for k in ("mean", "std",
                     "log_evidence")}, "rtb": q, "pmmh": {k: v for k, v in mh.items() if k != "theta"}})
        curves.append((ref, mh["theta"], policy, ys[i]))
    out = {"steps": steps, "train_seconds": train_s, "final_loss": sum(losses[-20:]) / 20, "observations": rows}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "joint_toy.json").write_text(json.dumps(out, indent=2))
    _figure(curves, out_dir / "joint_toy.png")
    return out


def _figure(curves, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(curves), figsize=(3.2 * len(curves), 2.8), sharey=False)
    for ax, (ref, th, policy, y) in zip(axes, curves):
        grid = ref["grid"]
        with torch.no_grad():
            q = policy.theta_head.log_prob(grid[1:-1, None], y.reshape(1, -1).expand(len(grid) - 2, -1)).exp()
        ax.hist(th.numpy(), bins=60, density=True, color="0.8", label="PMMH")
        ax.plot(grid, ref["density"], "k", label="quadrature")
        ax.plot(grid[1:-1], q, "C1--", label="joint RTB q(theta|y)")
        ax.set_xlabel("theta (pixels)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    import sys
    print(json.dumps(stage_a(sys.argv[1] if len(sys.argv) > 1 else "joint_toy_out"), indent=2))
