"""``ChainConfig``: the ``chain:`` section, the one reverse chain every command samples, trains and checks on.

The chain is K of the prior's T training timesteps, ``0 = t_0 < t_1 < ... < t_K = T``
(:class:`pipeline.diffusion.schedule.Chain`). Prior-chain sampling, the prior-drawn calibration set, RTB
fine-tuning and its checks all read it from here, so they cannot disagree. This module is plain Python
(no torch), so the config tree imports fast; the chain itself is built by
:func:`pipeline.diffusion.schedule.build_chain` and :func:`pipeline.diffusion.schedule.load_chain`.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import param
from pipeline.errors import ConfigError


def timestep_grid(T: int, K: int, spacing: str = "uniform") -> list[int]:
    """K+1 training timesteps ``0 = t_0 < ... < t_K = T`` (integers, in steps): ``uniform`` evenly spaced
    (``round(k T / K)``, halves to even, exactly as ``torch.round(torch.linspace(0, T, K + 1))`` in float64),
    ``quadratic`` ``round(T (k / K)^2)`` (denser at low noise; a step that would repeat its predecessor is
    moved up by one)."""
    if not 2 <= K <= T:
        raise ValueError(f"chain length K must be in [2, T={T}], got {K}")
    if spacing == "uniform":
        # linspace's float64 points: k * step below the midpoint, T - (K - k) * step from it on
        step = T / K
        return [round(k * step) if k < (K + 1) // 2 else round(T - step * (K - k)) for k in range(K + 1)]
    if spacing != "quadratic":
        raise ValueError(f"chain spacing must be 'uniform' or 'quadratic', got {spacing!r}")
    t = [round(T * (k / K) ** 2) for k in range(K + 1)]
    for k in range(1, K + 1):
        t[k] = max(t[k], t[k - 1] + 1)
    if t[-1] != T:
        raise ValueError(f"K={K} is too long for a quadratic grid on T={T}")
    return t


@dataclass
class ChainConfig:
    """The strided reverse chain: its length, step variance and timestep grid."""

    K: int = param(50, "Number of reverse steps of the chain (the sample is the denoise of the last state).",
                   unit="steps", min=2, max=1000)
    variance: str = param("small", "Reverse-step variance: small = DDPM posterior variance (beta-tilde), "
                                   "large = the strided beta.", choices=["small", "large"])
    spacing: str = param("uniform", "Timestep grid when `timesteps` is not given: uniform = evenly spaced, "
                                    "quadratic = t_k ~ T (k/K)^2 (denser at low noise).",
                         choices=["uniform", "quadratic"])
    timesteps: list[int] | None = param(None, "Explicit grid of K+1 increasing training timesteps from 0 to T "
                                              "(overrides `spacing`).", unit="steps", min=0)

    def validate(self, source="<config>", prefix: str = "") -> None:
        """The checks that need no schedule: an explicit grid has K+1 strictly increasing entries from 0."""
        if self.timesteps is None:
            return
        t, name = list(self.timesteps), prefix + "timesteps"
        if len(t) != self.K + 1:
            raise ConfigError(source, name, f"needs K+1 = {self.K + 1} entries, got {len(t)}")
        if t[0] != 0:
            raise ConfigError(source, name, f"must start at 0, got {t[0]}")
        if any(b <= a for a, b in zip(t, t[1:])):
            raise ConfigError(source, name, f"must be strictly increasing, got {t}")

    def grid(self, T: int, source="<config>", prefix: str = "chain.") -> list[int]:
        """The K+1 training timesteps (integers, 0 .. T) on a schedule of ``T`` steps."""
        self.validate(source, prefix)
        if self.timesteps is not None:
            if self.timesteps[-1] != T:
                raise ConfigError(source, prefix + "timesteps",
                                  f"must end at the prior's T = {T}, got {self.timesteps[-1]}")
            return list(self.timesteps)
        try:
            return timestep_grid(T, self.K, self.spacing)
        except ValueError as exc:
            raise ConfigError(source, prefix + "K", str(exc)) from None
