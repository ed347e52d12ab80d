"""Many lenses behind one ``InverseProblem``, for the amortized posterior.

The amortized RTB posterior is trained on observations whose lens differs from one to the next, and
the RTB code calls ``problem.log_likelihood(x, y)`` with per-sample ``y``. :class:`MultiLensProblem`
makes that work without special cases: a *packed* observation is ``[lens_index, y.flatten()]``
(shape ``(1 + ny*nx,)``), and every method dispatches each sample to its own lens's operator.

The conditioning features the posterior network sees (:meth:`MultiLensProblem.features`) live on the
source grid, so the network needs no knowledge of the lens beyond them:

* the "dirty image" ``A^T(y - b)/sigma^2 / (diag(A^T A / sigma^2) + 1)``, and
* ``log1p(diag(A^T A / sigma^2))``, which carries where the lens constrains the source and how well
  (magnification, multiple images, PSF, noise level).
"""

from __future__ import annotations

import torch

from pipeline.lensing.operator import LensingProblem
from pipeline.problems import InverseProblem
from pipeline.samplers import make_sampler


class MultiLensProblem(InverseProblem):
    """A list of :class:`LensingProblem` sharing grids, addressed by a packed observation.

    Not exposed as linear: a closed-form sampler must use the single lens's own LensingProblem."""

    def __init__(self, problems: list[LensingProblem]):
        if not problems:
            raise ValueError("MultiLensProblem needs at least one lens")
        first = problems[0]
        for p in problems[1:]:
            if p.image_shape != first.image_shape or p.x_shape != first.x_shape:
                raise ValueError("all lenses of a MultiLensProblem must share the image and source grids")
        # sigma/mask of the packed layout: index slot first (unused by the likelihood)
        self.problems = list(problems)
        self.image_shape, self.x_shape = first.image_shape, first.x_shape
        self.m = first.sigma.numel()
        self.y_shape = (1 + self.m,)
        self.sigma = torch.cat([torch.ones(1), first.sigma.reshape(-1).cpu()])
        self.mask = torch.cat([torch.zeros(1, dtype=torch.bool), first.mask.reshape(-1).cpu()])
        self._diag = torch.stack([p.diag_AtA_over_sigma2() for p in problems])  # (L, *x_shape)
        self._lognorm = torch.tensor([p.log_norm_const() for p in problems], dtype=torch.float64)

    def __len__(self) -> int:
        return len(self.problems)

    # -- packing ----------------------------------------------------------------------------
    def pack(self, index: int, y: torch.Tensor) -> torch.Tensor:
        """[index, y.flatten()] for one observation (ny, nx) or a batch (B, ny, nx)."""
        single = y.ndim == len(self.image_shape)
        yb = y[None] if single else y
        idx = torch.full((yb.shape[0], 1), float(index), dtype=yb.dtype, device=yb.device)
        out = torch.cat([idx, yb.reshape(yb.shape[0], -1)], 1)
        return out[0] if single else out

    def unpack(self, y_packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx = y_packed[:, 0].round().long()
        if (idx < 0).any() or (idx >= len(self.problems)).any():
            raise ValueError("packed observation refers to a lens index outside the pool")
        return idx, y_packed[:, 1:].reshape(y_packed.shape[0], *self.image_shape)

    def _dispatch(self, y_packed, fn, out_shape, dtype, device):
        idx, y = self.unpack(y_packed)
        out = torch.empty((y_packed.shape[0], *out_shape), dtype=dtype, device=device)
        for i in torch.unique(idx).tolist():
            sel = idx == i
            out[sel] = fn(self.problems[i], sel, y[sel]).to(dtype)
        return out

    # -- InverseProblem ---------------------------------------------------------------------
    def forward(self, x):  # pragma: no cover - needs an index: use forward_packed
        raise TypeError("MultiLensProblem.forward needs the lens index: use forward_packed(x, y_packed)")

    def forward_packed(self, x: torch.Tensor, y_packed: torch.Tensor) -> torch.Tensor:
        return self._dispatch(y_packed, lambda p, sel, _y: p.forward(x[sel]), self.image_shape, x.dtype, x.device)

    def log_likelihood(self, x: torch.Tensor, y_packed: torch.Tensor) -> torch.Tensor:
        return self._dispatch(y_packed, lambda p, sel, y: p.log_likelihood(x[sel], y), (), torch.float64,
                              x.device)

    def residual_chi2(self, x: torch.Tensor, y_packed: torch.Tensor) -> torch.Tensor:
        return self._dispatch(y_packed, lambda p, sel, y: p.residual_chi2(x[sel], y), (), torch.float64, x.device)

    def grad_log_likelihood(self, x: torch.Tensor, y_packed: torch.Tensor) -> torch.Tensor:
        return self._dispatch(y_packed, lambda p, sel, y: p.grad_log_likelihood(x[sel], y), self.x_shape,
                              x.dtype, x.device)

    def diag_precision(self, y_packed: torch.Tensor) -> torch.Tensor:
        """diag(A^T A / sigma^2) of each row's own lens, (B, *x_shape) in network units."""
        idx, _ = self.unpack(y_packed)
        return self._diag.to(y_packed.device)[idx]

    def map_per_lens(self, y_packed: torch.Tensor, x: torch.Tensor, fn) -> torch.Tensor:
        """``fn(problem_i, x_i, y_i)`` for each lens's rows, gathered into x's shape (B, *x_shape).

        How a per-lens method (e.g. the linear-Gaussian DPS+CLA guidance, which needs one lens's
        A A^T) runs on a batch that mixes lenses."""
        return self._dispatch(y_packed, lambda p, sel, y: fn(p, x[sel], y), tuple(x.shape[1:]), x.dtype, x.device)

    def simulate_packed(self, index: int, x: torch.Tensor, generator=None) -> torch.Tensor:
        return self.pack(index, self.problems[index].simulate(x, generator=generator))

    # -- conditioning features ----------------------------------------------------------------
    def features(self, y_packed: torch.Tensor) -> torch.Tensor:
        """(B, 2, n_s, n_s): normalised back-projection and log1p of diag(A^T A / sigma^2)."""
        idx, y = self.unpack(y_packed)
        diag = self._diag.to(y.device)[idx]  # (B, *x_shape)
        bp = self._dispatch(y_packed, lambda p, sel, yy: p.backproject(yy), self.x_shape, y.dtype, y.device)
        dirty = bp / (diag + 1.0)
        feats = torch.cat([dirty.reshape(y.shape[0], 1, *self.x_shape[-2:]),
                           torch.log1p(diag).reshape(y.shape[0], 1, *self.x_shape[-2:])], 1)
        return feats.to(torch.float32)

    def to(self, device) -> "MultiLensProblem":
        self.problems = [p.to(device) for p in self.problems]
        self.sigma, self.mask = self.sigma.to(device), self.mask.to(device)
        return self


def single_lens_view(problem: LensingProblem, y: torch.Tensor) -> tuple[MultiLensProblem, torch.Tensor]:
    """How the amortized posterior sees one observation: a one-lens pool and the packed ``y``."""
    single = MultiLensProblem([problem])
    return single, single.pack(0, y)


def amortized_sampler(method: str, post, *, batch_size: int, particles: int = 1):
    """The registry's RTB sampler of an amortized lensing posterior ``post``, for observations given as
    (their own :class:`LensingProblem`, image ``y``); ``particles`` is used by ``rtb_amortized_is`` only."""
    opts = {"particles": particles} if method == "rtb_amortized_is" else {}
    return make_sampler(method, None, None, posterior=post, cond_fn=lambda yp: post.problem.features(yp),
                        batch_size=batch_size, view=single_lens_view, **opts)
