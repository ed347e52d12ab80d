"""``ChainConfig``: the ``chain:`` section, the one reverse chain every command samples, trains and checks on.

The chain is K of the prior's T training timesteps, ``0 = t_0 < t_1 < ... < t_K = T``
(:class:`pipeline.diffusion.schedule.Chain`). Prior-chain sampling, the prior-drawn calibration set, RTB
fine-tuning and its checks all read it from here, so they cannot disagree.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pipeline.config import load_section, param
from pipeline.diffusion.schedule import Chain, NoiseSchedule, timestep_grid
from pipeline.errors import ConfigError

log = logging.getLogger(__name__)


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

    def build(self, schedule: NoiseSchedule, source="<config>", prefix: str = "chain.") -> Chain:
        """The :class:`Chain` on ``schedule``; a one-line ConfigError naming ``source`` if the grid does not fit."""
        return Chain(schedule, self.K, self.variance, timesteps=self.grid(schedule.T, source, prefix))


def load_chain(config_path, prior) -> Chain:
    """The ``chain:`` section of the config file at ``config_path`` (defaults when absent), built on the
    noise schedule of ``prior``. A prior exported with a recorded sampling chain (``sample_K`` /
    ``sample_variance`` in its metadata, from before this section existed) that differs gets a warning:
    the config decides."""
    chain = load_section(config_path, "chain", ChainConfig).build(prior.schedule, config_path)
    meta = getattr(prior, "meta", None) or {}
    recorded = (meta.get("sample_K", chain.K), meta.get("sample_variance", chain.variance))
    if (int(recorded[0]), str(recorded[1])) != (chain.K, chain.variance):
        log.warning("%s: chain K=%d (%s) differs from the chain the prior recorded at training, K=%s (%s); "
                    "the config's chain is used", config_path, chain.K, chain.variance, *recorded)
    return chain
