"""VP/DDPM noise schedule and the strided K-step reverse chain.

Conventions (used everywhere in the package):

* The *training* schedule has T steps (default 1000) with linear betas (1e-4 .. 0.02).
  ``alpha_bar(t) = prod_{s<=t} (1 - beta_s)`` for t = 1..T and ``alpha_bar(0) = 1`` (clean data).
  The forward process is ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps``.
* A *chain* uses K of those timesteps, ``0 = t_0 < t_1 < ... < t_K = T``. Chain states are
  ``x_K -> ... -> x_1``; every transition ``p(x_{k-1} | x_k)``, k = 2..K, is Gaussian with a mean from
  the eps-prediction and a fixed variance, so it has an exact log-density. The sample is
  ``x_0 = f(x_1)``, the deterministic final denoise ``(x_1 - sqrt(1-abar_1) eps(x_1)) / sqrt(abar_1)``
  (no step is scored as a fake narrow Gaussian).
* Strided kernels between consecutive chain states: ``a_k = abar_k / abar_{k-1}``, ``b_k = 1 - a_k``;
  forward ``q(x_k | x_{k-1}) = N(sqrt(a_k) x_{k-1}, b_k I)``.
* Reverse variance: ``"small"`` is the DDPM posterior variance
  ``b_k (1 - abar_{k-1}) / (1 - abar_k)`` (beta-tilde), ``"large"`` is ``b_k``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from pipeline.config import load_section
from pipeline.diffusion.chain_config import ChainConfig, timestep_grid

log = logging.getLogger(__name__)

LOG_2PI = math.log(2.0 * math.pi)


@dataclass(frozen=True)
class NoiseSchedule:
    """Linear-beta VP schedule over ``T`` training steps."""

    T: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02

    def __post_init__(self):
        if self.T < 2:
            raise ValueError(f"schedule T must be >= 2, got {self.T}")
        if not 0 < self.beta_start <= self.beta_end < 1:
            raise ValueError(f"need 0 < beta_start <= beta_end < 1, got {self.beta_start}, {self.beta_end}")

    @property
    def betas(self) -> torch.Tensor:
        """beta_t for t = 1..T, as a float64 tensor of length T (index t-1)."""
        return torch.linspace(self.beta_start, self.beta_end, self.T, dtype=torch.float64)

    @property
    def alpha_bar(self) -> torch.Tensor:
        """abar_t for t = 0..T (length T+1, abar_0 = 1), float64."""
        return torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1.0 - self.betas, 0)])

    def abar(self, t) -> torch.Tensor:
        """abar at integer timesteps ``t`` (tensor or int), float64."""
        return self.alpha_bar[torch.as_tensor(t, dtype=torch.long)]

    def chain(self, K: int, variance: str = "small", timesteps=None) -> "Chain":
        return Chain(self, K, variance, timesteps)

    def to_dict(self) -> dict:
        return {"T": self.T, "beta_start": self.beta_start, "beta_end": self.beta_end}


class Chain:
    """A strided K-step reverse chain on a :class:`NoiseSchedule`.

    Index ``k`` runs 0..K; ``t[k]`` is the training timestep of chain state k (``t[0] = 0``,
    ``t[K] = T``): ``timesteps`` (K+1 increasing integers) or, by default, evenly spaced
    (:func:`pipeline.diffusion.chain_config.timestep_grid`). All coefficient tensors are float64 of
    length K+1 and indexed by k (entries that do not apply at k = 0 are NaN).
    """

    def __init__(self, schedule: NoiseSchedule, K: int, variance: str = "small", timesteps=None):
        if not 2 <= K <= schedule.T:
            raise ValueError(f"chain length K must be in [2, T={schedule.T}], got {K}")
        if variance not in ("small", "large"):
            raise ValueError(f"chain variance must be 'small' or 'large', got {variance!r}")
        self.schedule, self.K, self.variance = schedule, K, variance
        t = torch.tensor(timestep_grid(schedule.T, K) if timesteps is None else list(timesteps), dtype=torch.long)
        if t.shape != (K + 1,) or int(t[0]) != 0 or int(t[-1]) != schedule.T or not bool((t[1:] > t[:-1]).all()):
            raise ValueError(f"chain timesteps must be K+1 = {K + 1} strictly increasing integers from 0 to "
                             f"T = {schedule.T}, got {t.tolist()}")
        self.t = t
        self.abar = schedule.alpha_bar[t]
        nan = torch.tensor([float("nan")], dtype=torch.float64)
        a = self.abar[1:] / self.abar[:-1]
        self.a = torch.cat([nan, a])  # strided alpha a_k
        self.b = 1.0 - self.a  # strided beta b_k
        post_var = self.b[1:] * (1.0 - self.abar[:-1]) / (1.0 - self.abar[1:])
        self.var_small = torch.cat([nan, post_var])
        self.reverse_var = self.var_small if variance == "small" else self.b

    def describe(self) -> dict:
        return {"K": self.K, "variance": self.variance, "schedule": self.schedule.to_dict(),
                "timesteps": self.t.tolist()}

    # -- reverse transitions --------------------------------------------------------------
    # k is an int (one step for the whole batch) or a (B,) long tensor (a chain index per sample,
    # e.g. the stacked steps of the two-pass RTB gradient); tensor coefficients are gathered per
    # sample in x's dtype and shaped to broadcast against x.
    def _per_sample(self, coef: torch.Tensor, k: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return coef.to(x.device)[k.to(x.device)].to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))

    def x0_from_eps(self, x: torch.Tensor, eps: torch.Tensor, k) -> torch.Tensor:
        """Tweedie/denoised estimate x0_hat = (x_k - sqrt(1-abar_k) eps) / sqrt(abar_k)."""
        if isinstance(k, torch.Tensor):
            ab = self._per_sample(self.abar, k, x)
            return (x - (1 - ab).sqrt() * eps) / ab.sqrt()
        ab = float(self.abar[k])
        return (x - math.sqrt(1.0 - ab) * eps) / math.sqrt(ab)

    def reverse_mean(self, x: torch.Tensor, eps: torch.Tensor, k) -> torch.Tensor:
        """Mean of p(x_{k-1} | x_k) for k >= 2: (x_k - b_k / sqrt(1-abar_k) eps) / sqrt(a_k)."""
        if isinstance(k, torch.Tensor):
            if k.numel() and not (2 <= int(k.min()) and int(k.max()) <= self.K):
                raise IndexError(f"reverse transition indices outside 2..{self.K}")
            a, b, ab = (self._per_sample(c, k, x) for c in (self.a, self.b, self.abar))
            return (x - (b / (1 - ab).sqrt()) * eps) / a.sqrt()
        if not 2 <= k <= self.K:
            raise IndexError(f"reverse transition index k={k} outside 2..{self.K}")
        a, b, ab = float(self.a[k]), float(self.b[k]), float(self.abar[k])
        return (x - (b / math.sqrt(1.0 - ab)) * eps) / math.sqrt(a)

    def reverse_std(self, k, like: torch.Tensor | None = None):
        """Std of p(x_{k-1} | x_k): a float for an int k; for a (B,) tensor k a tensor in ``like``'s dtype,
        shaped to broadcast against ``like`` (required then)."""
        if isinstance(k, torch.Tensor):
            if like is None:
                raise ValueError("reverse_std with per-sample k needs like= (the states it broadcasts against)")
            return torch.sqrt(self.reverse_var.to(like.device)[k.to(like.device)]).to(like.dtype).reshape(
                -1, *([1] * (like.ndim - 1)))
        return math.sqrt(float(self.reverse_var[k]))

    def final_denoise(self, x1: torch.Tensor, eps1: torch.Tensor) -> torch.Tensor:
        """f(x_1): the deterministic last step, x0 = x0_hat(x_1)."""
        return self.x0_from_eps(x1, eps1, 1)

    # -- forward (noising) kernels --------------------------------------------------------
    def forward_step(self, x_prev: torch.Tensor, k: int, generator=None) -> torch.Tensor:
        """Draw x_k ~ q(x_k | x_{k-1}) = N(sqrt(a_k) x_{k-1}, b_k I), k = 1..K."""
        a, b = float(self.a[k]), float(self.b[k])
        noise = torch.randn(x_prev.shape, generator=generator, dtype=x_prev.dtype, device="cpu").to(x_prev.device)
        return math.sqrt(a) * x_prev + math.sqrt(b) * noise


def build_chain(cfg: ChainConfig, schedule: NoiseSchedule, source="<config>", prefix: str = "chain.") -> Chain:
    """The :class:`Chain` of the ``chain:`` section ``cfg`` on ``schedule``; a one-line ConfigError naming
    ``source`` and the field (under ``prefix``) if its grid does not fit the schedule."""
    return Chain(schedule, cfg.K, cfg.variance, timesteps=cfg.grid(schedule.T, source, prefix))


def load_chain(config_path, prior) -> Chain:
    """The ``chain:`` section of the config file at ``config_path`` (defaults when absent), built on the
    noise schedule of ``prior``. A prior exported with a recorded sampling chain (``sample_K`` /
    ``sample_variance`` in its metadata, from before this section existed) that differs gets a warning:
    the config decides."""
    chain = build_chain(load_section(config_path, "chain", ChainConfig), prior.schedule, config_path)
    meta = getattr(prior, "meta", None) or {}
    recorded = (meta.get("sample_K", chain.K), meta.get("sample_variance", chain.variance))
    if (int(recorded[0]), str(recorded[1])) != (chain.K, chain.variance):
        log.warning("%s: chain K=%d (%s) differs from the chain the prior recorded at training, K=%s (%s); "
                    "the config's chain is used", config_path, chain.K, chain.variance, *recorded)
    return chain


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std) -> torch.Tensor:
    """Sum over event dims of log N(x; mean, std^2), computed in float64.

    ``std`` is a float or a tensor broadcastable to x. Returns shape (B,).
    """
    x64, m64 = x.double(), mean.double()
    std64 = torch.as_tensor(std, dtype=torch.float64, device=x.device)
    z = (x64 - m64) / std64
    per = -0.5 * z * z - torch.log(std64) - 0.5 * LOG_2PI
    per = per.expand_as(x64)
    return per.reshape(x.shape[0], -1).sum(1)
