"""Off-policy exploration for RTB: a reward-prioritised replay buffer and backtracking.

* :class:`ReplayBuffer` stores terminal states x_1 (never x0: the sample is the deterministic f(x_1))
  with log r(f(x_1)) at beta = 1 and, for amortized posteriors, the observation they belong to (y,
  cond, the lens index of a per-sample problem, and an observation id shared by the trajectories of
  one y). FIFO eviction at capacity;
  sampling mixes uniform draws with rank-based priority
  ``P(i) ~ 1 / (kappa N + rank_i)`` (rank 0 = highest reward), which is invariant to the scale of
  log r (rewards of thousands of pixels span hundreds of nats, so ``exp(log r)`` priorities would
  pick one entry). Amortized replay draws whole groups (:meth:`ReplayBuffer.sample_groups`): an
  observation by priority, then several DISTINCT stored x_1 of it, so the VarGrad log Z of the group
  does not cancel the rewards (a group of copies of one x_1 would have delta independent of log r).
* :func:`backtrack` noises x_1 -> x_2 -> ... -> x_K step by step with the strided forward kernels
  ``q(x_k | x_{k-1}) = N(sqrt(a_k) x_{k-1}, b_k I)`` (a Markov chain with fresh noise each step,
  unlike the reference code's one fixed eps), so the reversed trajectory is evaluated at each
  state's own chain index k.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


class ReplayBuffer:
    """Terminal states x_1 with log rewards (and optional per-entry observation y, cond and lens index)."""

    def __init__(self, capacity: int, priority_frac: float = 0.5, kappa: float = 0.01):
        if capacity < 1:
            raise ValueError("replay buffer capacity must be >= 1")
        if not 0.0 <= priority_frac <= 1.0:
            raise ValueError("priority_frac must be in [0, 1]")
        self.capacity, self.priority_frac, self.kappa = capacity, priority_frac, kappa
        self.x1: torch.Tensor | None = None
        self.log_r: torch.Tensor | None = None
        self.y: torch.Tensor | None = None
        self.cond: torch.Tensor | None = None
        self.lens: torch.Tensor | None = None  # int64 per entry: the lens of a per-sample problem
        self.obs_id: torch.Tensor | None = None  # int64 per entry: which observation (amortized only)
        self.n_obs = 0  # observation ids handed out so far
        self.n_added = 0

    def __len__(self) -> int:
        return 0 if self.x1 is None else self.x1.shape[0]

    def add(self, x1: torch.Tensor, log_r: torch.Tensor, y: torch.Tensor | None = None,
            cond: torch.Tensor | None = None, groups: torch.Tensor | None = None,
            lens: torch.Tensor | None = None) -> None:
        """Append entries (detached, stored on CPU); non-finite rewards are dropped; the oldest
        entries are evicted beyond capacity. ``groups``: the batch's y-group labels (entries of one
        label share one observation); each label gets a fresh observation id. ``lens``: the lens index
        of each entry's observation (int64, when the problem differs per sample)."""
        keep = torch.isfinite(log_r.detach().cpu())
        obs = None
        if groups is not None:
            _, inv = torch.unique(torch.as_tensor(groups).cpu(), return_inverse=True)
            obs = (inv.long() + self.n_obs)[keep]
            self.n_obs += int(inv.max()) + 1 if inv.numel() else 0
        x1, log_r = x1.detach().cpu()[keep], log_r.detach().cpu().double()[keep]
        y = None if y is None else y.detach().cpu()[keep]
        cond = None if cond is None else cond.detach().cpu()[keep]
        lens = None if lens is None else torch.as_tensor(lens, dtype=torch.long).cpu()[keep]
        self.n_added += int(keep.sum())

        def cat(old, new):
            if new is None:
                return old
            return new if old is None else torch.cat([old, new])

        self.x1, self.log_r = cat(self.x1, x1), cat(self.log_r, log_r)
        self.y, self.cond = cat(self.y, y), cat(self.cond, cond)
        self.obs_id, self.lens = cat(self.obs_id, obs), cat(self.lens, lens)
        if len(self) > self.capacity:
            cut = len(self) - self.capacity
            self.x1, self.log_r = self.x1[cut:], self.log_r[cut:]
            self.obs_id = None if self.obs_id is None else self.obs_id[cut:]
            self.y = None if self.y is None else self.y[cut:]
            self.cond = None if self.cond is None else self.cond[cut:]
            self.lens = None if self.lens is None else self.lens[cut:]

    def priorities(self) -> torch.Tensor:
        """Rank-based sampling probabilities of the prioritised part (sum to 1)."""
        n = len(self)
        order = torch.argsort(self.log_r, descending=True)
        rank = torch.empty(n, dtype=torch.float64)
        rank[order] = torch.arange(n, dtype=torch.float64)
        w = 1.0 / (self.kappa * n + rank)
        return w / w.sum()

    def sample_indices(self, n: int, generator=None, eligible: torch.Tensor | None = None) -> torch.Tensor:
        """``n`` entry indices: a ``priority_frac`` share by rank priority, the rest uniform; only
        among the ``eligible`` entries (a bool mask) when given."""
        if len(self) == 0:
            raise ValueError("replay buffer is empty")
        n_pri = int(round(self.priority_frac * n))
        pri = self.priorities()
        uni = torch.ones(len(self), dtype=torch.float64)
        if eligible is not None:
            pri, uni = pri * eligible, uni * eligible
        idx_pri = torch.multinomial(pri, n_pri, replacement=True, generator=generator) if n_pri else \
            torch.empty(0, dtype=torch.long)
        if eligible is None:
            idx_uni = torch.randint(0, len(self), (n - n_pri,), generator=generator)
        else:
            idx_uni = torch.multinomial(uni, n - n_pri, replacement=True, generator=generator) if n > n_pri else \
                torch.empty(0, dtype=torch.long)
        return torch.cat([idx_pri, idx_uni])

    def can_sample_groups(self) -> bool:
        """True if some stored observation has at least two entries (a group with a VarGrad signal)."""
        if self.obs_id is None or len(self) == 0:
            return False
        return bool((torch.unique(self.obs_id, return_counts=True)[1] >= 2).any())

    def sample_groups(self, n_groups: int, group_size: int, generator=None) -> dict:
        """``n_groups`` groups for amortized replay: an observation picked by its entries' priority
        (rank-based / uniform as in :meth:`sample_indices`, among observations with >= 2 stored
        entries), then up to ``group_size`` distinct stored x_1 of that observation (without
        replacement). Returns the dict of :meth:`sample` plus ``groups`` (group label per entry)."""
        if not self.can_sample_groups():
            raise ValueError("replay buffer holds no observation with two or more entries")
        ids, inv, counts = torch.unique(self.obs_id, return_inverse=True, return_counts=True)
        eligible = counts[inv] >= 2
        seeds = self.sample_indices(n_groups, generator, eligible=eligible)
        idx, labels = [], []
        for g, s in enumerate(seeds.tolist()):
            members = torch.nonzero(self.obs_id == self.obs_id[s]).flatten()
            pick = members[torch.randperm(members.numel(), generator=generator)[:group_size]]
            idx.append(pick)
            labels.append(torch.full((pick.numel(),), g, dtype=torch.long))
        return {**self._entries(torch.cat(idx)), "groups": torch.cat(labels)}

    def sample(self, n: int, generator=None) -> dict:
        """n entries: dict with x1, log_r, y, cond, lens (None where not stored), idx."""
        return self._entries(self.sample_indices(n, generator))

    def _entries(self, idx: torch.Tensor) -> dict:
        def take(v):
            return None if v is None else v[idx]

        return {"x1": self.x1[idx], "log_r": self.log_r[idx], "idx": idx, "y": take(self.y),
                "cond": take(self.cond), "lens": take(self.lens)}

    def state_dict(self) -> dict:
        return {"x1": self.x1, "log_r": self.log_r, "y": self.y, "cond": self.cond, "lens": self.lens,
                "n_added": self.n_added, "capacity": self.capacity, "obs_id": self.obs_id, "n_obs": self.n_obs}

    def load_state_dict(self, state: dict, y_shape: tuple[int, ...] | None = None) -> None:
        """Restore :meth:`state_dict`'s entries. ``y_shape``: one observation's shape, needed to read a
        buffer saved with the lens index packed into slot 0 of a flat y (``[index, y.flatten()]``)."""
        self.x1, self.log_r, self.y, self.cond = state["x1"], state["log_r"], state["y"], state["cond"]
        self.lens = state.get("lens")
        self.n_added = state["n_added"]
        self.obs_id, self.n_obs = state.get("obs_id"), int(state.get("n_obs", 0))
        if self.obs_id is None and self.y is not None and len(self):
            # a buffer saved before observation ids were stored: entries with equal y share one
            self.obs_id = torch.unique(self.y.reshape(len(self), -1), dim=0, return_inverse=True)[1].long()
            self.n_obs = int(self.obs_id.max()) + 1
        if "lens" not in state and y_shape is not None and self.y is not None and self.y.ndim == 2 \
                and self.y.shape[1] == 1 + _numel(y_shape):
            self.lens = self.y[:, 0].round().long()
            self.y = self.y[:, 1:].reshape(len(self), *y_shape)
            log.info("replay buffer: read the packed-y layout (lens index in slot 0) of %d entries", len(self))


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


@torch.no_grad()
def backtrack(chain, x1: torch.Tensor, generator=None) -> dict[int, torch.Tensor]:
    """States {k: x_k} for k = 1..K with x_k ~ q(x_k | x_{k-1}) drawn step by step from x_1."""
    xs = {1: x1}
    for k in range(2, chain.K + 1):
        xs[k] = chain.forward_step(xs[k - 1], k, generator=generator)
    return xs
