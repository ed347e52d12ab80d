"""A reward of one's own as an inverse problem: ``log_r(x) -> (B,)`` behind the problem interface.

RTB and the guided samplers call ``problem.log_likelihood(x, y)`` (and ``grad_log_likelihood`` for
DPS guidance and RTB's ``grad`` feature). :class:`RewardProblem` answers those calls from plain
callables, so no inverse problem with a dummy noise level is needed: the observation is the empty
tensor :attr:`RewardProblem.y` (shape ``(0,)``), which every sampler broadcasts like any other.
"""

from __future__ import annotations

import torch

from pipeline.errors import PipelineError


class RewardProblem:
    """``log_r(x (B, *x_shape)) -> (B,)`` log-reward in nats (returned as float64); ``grad(x) -> (B, *x_shape)``
    its gradient in x, needed only by the methods that use it (DPS, RTB's ``grad`` feature)."""

    y_shape = (0,)
    is_linear = False

    def __init__(self, log_r, grad=None):
        if not callable(log_r) or (grad is not None and not callable(grad)):
            raise PipelineError("RewardProblem needs a callable log_r(x) -> (B,) (and grad(x), if given, callable)")
        self._log_r, self._grad = log_r, grad
        self.y = torch.zeros(0)

    def log_likelihood(self, x: torch.Tensor, y=None) -> torch.Tensor:
        out = torch.as_tensor(self._log_r(x))
        if out.shape != (x.shape[0],):
            raise PipelineError(f"log_r(x) returned shape {tuple(out.shape)}; expected ({x.shape[0]},)")
        return out.to(torch.float64)

    def grad_log_likelihood(self, x: torch.Tensor, y=None) -> torch.Tensor:
        if self._grad is None:
            raise PipelineError("this reward has no gradient: pass RewardProblem(log_r, grad=...) "
                                "(DPS guidance and RTB's 'grad' feature use it)")
        return torch.as_tensor(self._grad(x)).to(x.dtype)

    def to(self, device) -> "RewardProblem":
        return self
