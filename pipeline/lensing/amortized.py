"""Many lenses behind one ``InverseProblem``, for the amortized posterior.

The amortized RTB posterior is trained on observations whose lens differs from one to the next. The
lenses travel with every call as the inverse problem itself: :class:`MultiLensProblem` is the pool
of assembled lens operators, and :meth:`MultiLensProblem.take` returns a :class:`LensBatch`, an
``InverseProblem`` whose row i uses lens ``index[i]``; ``y`` is the image itself, (B, ny, nx).

The conditioning features the posterior network sees (:func:`lens_features`) live on the source
grid, so the network needs no knowledge of the lens beyond them:

* the "dirty image" ``A^T(y - b)/sigma^2 / (diag(A^T A / sigma^2) + 1)``, and
* ``log1p(diag(A^T A / sigma^2))``, which carries where the lens constrains the source and how well
  (magnification, multiple images, PSF, noise level).
"""

from __future__ import annotations

import torch

from pipeline.lensing.operator import LensingProblem
from pipeline.problems import InverseProblem
from pipeline.samplers import make_sampler


class MultiLensProblem:
    """A pool of :class:`LensingProblem` sharing grids; :meth:`take` picks one lens per sample.

    Not an inverse problem itself (it needs a lens index per sample); not exposed as linear: a
    closed-form sampler must use the single lens's own LensingProblem."""

    def __init__(self, problems: list[LensingProblem]):
        if not problems:
            raise ValueError("MultiLensProblem needs at least one lens")
        first = problems[0]
        for p in problems[1:]:
            if p.image_shape != first.image_shape or p.x_shape != first.x_shape:
                raise ValueError("all lenses of a MultiLensProblem must share the image and source grids")
        self.problems = list(problems)
        self.image_shape, self.x_shape = first.image_shape, first.x_shape
        self.y_shape = tuple(first.image_shape)
        self.diag = torch.stack([p.diag_AtA_over_sigma2() for p in problems])  # (L, *x_shape)
        self.row = torch.stack([p.row_AtA_over_sigma2() for p in problems])  # (L, *x_shape)

    def __len__(self) -> int:
        return len(self.problems)

    def take(self, index) -> "LensBatch":
        """The per-sample problem whose row i uses lens ``index[i]`` (int64 (B,))."""
        return LensBatch(self, index)

    def to(self, device) -> "MultiLensProblem":
        self.problems = [p.to(device) for p in self.problems]
        return self


class LensBatch(InverseProblem):
    """Row i of every call uses lens ``index[i]`` of ``pool`` (x (B, *x_shape), y (B, ny, nx)).

    ``repeat(r)`` and ``index_select(rows)`` follow the batch the way ``y.repeat`` and ``y[rows]`` do, so
    a batch of trajectories can be stacked or subset with its operators."""

    is_linear = False

    def __init__(self, pool: MultiLensProblem, index):
        index = torch.as_tensor(index, dtype=torch.long).reshape(-1).cpu()
        if index.numel() and ((index < 0).any() or (index >= len(pool)).any()):
            raise ValueError(f"lens index outside the pool of {len(pool)} lenses")
        self.pool, self.index = pool, index
        self.image_shape, self.x_shape, self.y_shape = pool.image_shape, pool.x_shape, pool.y_shape

    def __len__(self) -> int:
        return self.index.numel()

    def repeat(self, r: int) -> "LensBatch":
        return LensBatch(self.pool, self.index.repeat(r))

    def repeat_interleave(self, r: int) -> "LensBatch":
        return LensBatch(self.pool, self.index.repeat_interleave(r))

    def index_select(self, rows) -> "LensBatch":
        return LensBatch(self.pool, self.index[torch.as_tensor(rows).cpu()])

    @staticmethod
    def cat(batches: list["LensBatch"]) -> "LensBatch":
        if any(b.pool is not batches[0].pool for b in batches):
            raise ValueError("LensBatch.cat needs batches of one pool")
        return LensBatch(batches[0].pool, torch.cat([b.index for b in batches]))

    def _check(self, n: int) -> None:
        if n != self.index.numel():
            raise ValueError(f"a batch of {n} rows for a LensBatch of {self.index.numel()} lenses")

    def _dispatch(self, n, fn, out_shape, dtype, device):
        """``fn(problem, rows)`` for each lens's rows, gathered into (n, *out_shape)."""
        self._check(n)
        out = torch.empty((n, *out_shape), dtype=dtype, device=device)
        idx = self.index.to(device)
        for i in torch.unique(self.index).tolist():
            sel = idx == i
            out[sel] = fn(self.pool.problems[i], sel).to(dtype)
        return out

    # -- InverseProblem ---------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._dispatch(x.shape[0], lambda p, sel: p.forward(x[sel]), self.image_shape, x.dtype, x.device)

    def log_likelihood(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self._dispatch(x.shape[0], lambda p, sel: p.log_likelihood(x[sel], y[sel]), (), torch.float64,
                              x.device)

    def residual_chi2(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self._dispatch(x.shape[0], lambda p, sel: p.residual_chi2(x[sel], y[sel]), (), torch.float64,
                              x.device)

    def grad_log_likelihood(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self._dispatch(x.shape[0], lambda p, sel: p.grad_log_likelihood(x[sel], y[sel]), self.x_shape,
                              x.dtype, x.device)

    def whitened_residual(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self._dispatch(x.shape[0], lambda p, sel: p.whitened_residual(x[sel], y[sel]), self.image_shape,
                              x.dtype, x.device)

    def whitened_A(self, u: torch.Tensor) -> torch.Tensor:
        return self._dispatch(u.shape[0], lambda p, sel: p.whitened_A(u[sel]), self.image_shape, u.dtype, u.device)

    def whitened_AT(self, w: torch.Tensor) -> torch.Tensor:
        return self._dispatch(w.shape[0], lambda p, sel: p.whitened_AT(w[sel]), self.x_shape, w.dtype, w.device)

    def diag_precision(self, y: torch.Tensor) -> torch.Tensor:
        """diag(A^T A / sigma^2) of each row's own lens, (B, *x_shape) in network units."""
        self._check(y.shape[0])
        return self.pool.diag.to(y.device)[self.index.to(y.device)]

    def row_precision(self, y: torch.Tensor) -> torch.Tensor:
        """Row sums of |A|^T diag(mask/sigma^2) |A| of each row's own lens, (B, *x_shape), network units."""
        self._check(y.shape[0])
        return self.pool.row.to(y.device)[self.index.to(y.device)]

    def backproject(self, y: torch.Tensor) -> torch.Tensor:
        return self._dispatch(y.shape[0], lambda p, sel: p.backproject(y[sel]), self.x_shape, y.dtype, y.device)

    def map_per_lens(self, y: torch.Tensor, x: torch.Tensor, fn) -> torch.Tensor:
        """``fn(problem_i, x_i, y_i)`` for each lens's rows, gathered into x's shape (B, *x_shape).

        How a per-lens method (e.g. the linear-Gaussian DPS+CLA guidance, which needs one lens's
        A A^T) runs on a batch that mixes lenses."""
        return self._dispatch(x.shape[0], lambda p, sel: fn(p, x[sel], y[sel]), tuple(x.shape[1:]), x.dtype,
                              x.device)

    def to(self, device) -> "LensBatch":
        self.pool.to(device)
        return self


def lens_features(problem, y: torch.Tensor) -> torch.Tensor:
    """(B, 2, n_s, n_s) float32 conditioning of the amortized posterior for observations y (B, ny, nx)
    under ``problem`` (one :class:`LensingProblem` for all rows, or a :class:`LensBatch`): the
    normalised back-projection and log1p of diag(A^T A / sigma^2), both on the source grid."""
    diag = problem.diag_precision(y)  # (B, *x_shape)
    bp = problem.backproject(y).to(y.dtype)
    dirty = bp / (diag + 1.0)
    shape = (y.shape[0], 1, *problem.x_shape[-2:])
    feats = torch.cat([dirty.reshape(shape), torch.log1p(diag).reshape(shape)], 1)
    return feats.to(torch.float32)


def amortized_sampler(method: str, post, *, batch_size: int, particles: int = 1):
    """The registry's RTB sampler of an amortized lensing posterior ``post``, for observations given as
    (their own :class:`LensingProblem`, image ``y``); ``particles`` is used by ``rtb_amortized_is`` and
    ``rtb_amortized_smc`` only."""
    opts = {"particles": particles} if method in ("rtb_amortized_is", "rtb_amortized_smc") else {}
    return make_sampler(method, None, None, posterior=post, cond_fn=lens_features, batch_size=batch_size, **opts)
