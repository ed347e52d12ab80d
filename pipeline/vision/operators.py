"""Vision measurement operators, each an :class:`~pipeline.problems.InverseProblem`.

Images ``x`` are (B, C, H, W) float32 in [-1, 1]. Every operator is *fixed per measurement*: its
mask, kernel or random draw comes from an explicit integer seed at construction, never from a call
(reproducible tasks). ``sigma_y`` (default 0.05) is the Gaussian noise std in the units of ``y`` stated below.

* :class:`BoxInpainting` -- ``y = x * M``: a square box of every channel is hidden. Linear,
  self-adjoint mask form (``A = A^T = diag(M)``); hidden pixels are masked out of the likelihood.
* :class:`RandomInpainting` -- the same with a random pixel mask (a fraction ``p_missing`` hidden,
  the same pixels in every channel).
* :class:`PhaseRetrieval` -- ``y = |FFT2(pad((x + 1) / 2))|`` per channel, ``norm="ortho"`` (so
  ``sigma_y`` means the same per-pixel noise level as elsewhere). The image is mapped to [0, 1] first so
  the zero padding is a true support constraint. Padding per side is ``round(oversample / 8 * H)``
  (DPS's 64 px at 256 px, 8 px at 32 px). |FFT| is blind to (circular) shifts and to a
  180-degree rotation, so PSNR/SSIM are computed after :func:`align_phase_retrieval` aligns each sample
  to the truth over those symmetries.
* :class:`NonlinearDeblur` -- **choice made here**: a fixed random motion-blur kernel (a seeded random
  walk, normalised to sum 1, replicate padding) applied to ``u = (x + 1) / 2``, then a saturating
  camera-response curve ``g(b) = 2 (1 - exp(-a b)) / (1 - exp(-a)) - 1`` (a = ``crf_strength``)
  mapping [0, 1] back to [-1, 1]. Smooth and monotone, so gradients exist everywhere. The blurred
  irradiance is clipped to [-0.5, 1.5] first: images in [-1, 1] never reach the clip, but a wild
  sample of an untrained prior would otherwise overflow exp() to inf.

:func:`make_operator` builds one by task name; it is how the bench and configs call them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pipeline.problems import InverseProblem, LinearInverseProblem
from pipeline.vision.config import TASKS


def _check_shape(image_shape) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in image_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"image_shape must be (C, H, W), got {image_shape}")
    return shape


def _sigma_map(shape, sigma_y: float) -> torch.Tensor:
    if not (sigma_y > 0 and math.isfinite(sigma_y)):
        raise ValueError(f"sigma_y must be finite and > 0, got {sigma_y}")
    return torch.full(shape, float(sigma_y), dtype=torch.float32)


class MaskInpainting(LinearInverseProblem):
    """``y = x * keep`` with a fixed boolean ``keep`` of shape x_shape. A = A^T (a projection).

    ``keep`` is also the likelihood mask, so hidden pixels carry no data (their y is 0 by convention).
    ``diag_AAT()`` is ``keep`` as float: the mask form closed-form samplers (FPS, CLA) use.
    """

    def __init__(self, keep: torch.Tensor, sigma_y: float = 0.05):
        keep = torch.as_tensor(keep, dtype=torch.bool)
        self.x_shape = self.y_shape = tuple(keep.shape)
        super().__init__(_sigma_map(keep.shape, sigma_y), keep.clone())
        self.keep = keep.clone()
        self.sigma_y = float(sigma_y)

    def A(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.keep.to(device=x.device, dtype=x.dtype)

    def AT(self, r: torch.Tensor) -> torch.Tensor:
        return r * self.keep.to(device=r.device, dtype=r.dtype)

    def diag_AAT(self) -> torch.Tensor:
        return self.keep.float()

    def to(self, device):
        super().to(device)
        self.keep = self.keep.to(device)
        return self


class BoxInpainting(MaskInpainting):
    """A ``box`` x ``box`` square hidden in every channel; its corner is drawn from ``seed`` with a
    ``margin`` to the border (DPS's 16 px of 256, scaled), or centred when ``seed`` is None."""

    def __init__(self, image_shape, box: int | None = None, sigma_y: float = 0.05, seed: int | None = 0,
                 margin: int | None = None):
        C, H, W = _check_shape(image_shape)
        box = int(box if box is not None else round(H / 2))  # DPS: 128 of 256
        margin = int(margin if margin is not None else round(H / 16))
        if not 1 <= box <= min(H, W) - 2 * margin:
            raise ValueError(f"box {box} does not fit {H}x{W} with margin {margin}")
        if seed is None:
            r0, c0 = (H - box) // 2, (W - box) // 2
        else:
            g = torch.Generator().manual_seed(int(seed))
            r0 = int(torch.randint(margin, H - margin - box + 1, (1,), generator=g))
            c0 = int(torch.randint(margin, W - margin - box + 1, (1,), generator=g))
        keep = torch.ones((C, H, W), dtype=torch.bool)
        keep[:, r0:r0 + box, c0:c0 + box] = False
        super().__init__(keep, sigma_y)
        self.box, self.corner = box, (r0, c0)


class RandomInpainting(MaskInpainting):
    """A fraction ``p_missing`` of pixel positions hidden (same positions in every channel), drawn from ``seed``."""

    def __init__(self, image_shape, p_missing: float = 0.7, sigma_y: float = 0.05, seed: int = 0):
        C, H, W = _check_shape(image_shape)
        if not 0.0 <= p_missing < 1.0:
            raise ValueError(f"p_missing must be in [0, 1), got {p_missing}")
        g = torch.Generator().manual_seed(int(seed))
        n_hide = int(round(p_missing * H * W))
        hide = torch.randperm(H * W, generator=g)[:n_hide]
        keep2d = torch.ones(H * W, dtype=torch.bool)
        keep2d[hide] = False
        super().__init__(keep2d.reshape(1, H, W).expand(C, H, W).clone(), sigma_y)
        self.p_missing = float(p_missing)


def phase_retrieval_pad(size: int, oversample: float = 2.0) -> int:
    """Zero padding per side for |FFT| phase retrieval: ``round(oversample / 8 * size)``.

    Scales with the image (DPS hard-coded 64 px for 256-px images, i.e. this rule at oversample 2)."""
    if oversample < 0:
        raise ValueError(f"oversample must be >= 0, got {oversample}")
    return int(round(oversample / 8.0 * size))


class PhaseRetrieval(InverseProblem):
    """``y = |FFT2(pad((x+1)/2))|`` per channel, orthonormal FFT; y_shape (C, H+2p, W+2p)."""

    def __init__(self, image_shape, oversample: float = 2.0, sigma_y: float = 0.05):
        C, H, W = _check_shape(image_shape)
        self.pad = phase_retrieval_pad(max(H, W), oversample)
        self.oversample = float(oversample)
        self.x_shape = (C, H, W)
        self.y_shape = (C, H + 2 * self.pad, W + 2 * self.pad)
        super().__init__(_sigma_map(self.y_shape, sigma_y))
        self.sigma_y = float(sigma_y)

    def padded(self, x: torch.Tensor) -> torch.Tensor:
        p = self.pad
        return F.pad((x + 1.0) * 0.5, (p, p, p, p))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.fft.fft2(self.padded(x), norm="ortho").abs()


def motion_blur_kernel(size: int = 9, seed: int = 0, steps: int = 64) -> torch.Tensor:
    """A fixed random motion-blur kernel: a seeded smooth random walk rasterised on a size x size
    grid with bilinear splatting, normalised to sum 1. float32 (size, size)."""
    if size < 3 or size % 2 == 0:
        raise ValueError(f"kernel size must be odd and >= 3, got {size}")
    g = torch.Generator().manual_seed(int(seed))
    angle = float(torch.rand((), generator=g)) * 2 * math.pi
    turn = torch.randn(steps, generator=g, dtype=torch.float64).cumsum(0) * 0.15
    step = (size - 1) * 0.8 / steps
    xy = torch.stack([torch.cos(angle + turn), torch.sin(angle + turn)], 1).cumsum(0) * step
    xy = xy - xy.mean(0) + (size - 1) / 2.0
    xy = xy.clamp(0, size - 1 - 1e-9)
    k = torch.zeros(size, size, dtype=torch.float64)
    i0, j0 = xy[:, 1].floor().long(), xy[:, 0].floor().long()
    fi, fj = xy[:, 1] - i0, xy[:, 0] - j0
    for di, wi in ((0, 1 - fi), (1, fi)):
        for dj, wj in ((0, 1 - fj), (1, fj)):
            k.index_put_(((i0 + di).clamp(max=size - 1), (j0 + dj).clamp(max=size - 1)), wi * wj, accumulate=True)
    return (k / k.sum()).float()


class NonlinearDeblur(InverseProblem):
    """``y = g(k * (x+1)/2)``: fixed motion blur (kernel from ``seed``) then camera response ``g``."""

    def __init__(self, image_shape, kernel_size: int | None = None, seed: int = 0, crf_strength: float = 3.0,
                 sigma_y: float = 0.05):
        C, H, W = _check_shape(image_shape)
        if not crf_strength > 0:
            raise ValueError(f"crf_strength must be > 0, got {crf_strength}")
        kernel_size = int(kernel_size if kernel_size is not None else 2 * round(H / 8) + 1)  # 9 px at 32
        self.kernel = motion_blur_kernel(kernel_size, seed)
        self.crf_strength = float(crf_strength)
        self.x_shape = self.y_shape = (C, H, W)
        super().__init__(_sigma_map(self.y_shape, sigma_y))
        self.sigma_y = float(sigma_y)

    def blur(self, u: torch.Tensor) -> torch.Tensor:
        C = u.shape[1]
        k = self.kernel.to(device=u.device, dtype=u.dtype)
        p = k.shape[-1] // 2
        w = k.flip(0, 1).expand(C, 1, *k.shape)  # flipped: a true convolution, not a correlation
        return F.conv2d(F.pad(u, (p, p, p, p), mode="replicate"), w, groups=C)

    def camera_response(self, b: torch.Tensor) -> torch.Tensor:
        a = self.crf_strength
        b = b.clamp(-0.5, 1.5)
        return 2.0 * (1.0 - torch.exp(-a * b)) / (1.0 - math.exp(-a)) - 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.camera_response(self.blur((x + 1.0) * 0.5))

    def to(self, device):
        super().to(device)
        self.kernel = self.kernel.to(device)
        return self


def make_operator(task: str, image_shape, *, sigma_y: float = 0.05, seed: int = 0, box: int | None = None,
                  p_missing: float = 0.7, oversample: float = 2.0, kernel_size: int | None = None,
                  crf_strength: float = 3.0) -> InverseProblem:
    """Build the operator for ``task`` (one of :data:`pipeline.vision.config.TASKS`); ``seed`` fixes its random parts."""
    if task == "box_inpaint":
        return BoxInpainting(image_shape, box=box, sigma_y=sigma_y, seed=seed)
    if task == "random_inpaint":
        return RandomInpainting(image_shape, p_missing=p_missing, sigma_y=sigma_y, seed=seed)
    if task == "phase_retrieval":
        return PhaseRetrieval(image_shape, oversample=oversample, sigma_y=sigma_y)
    if task == "nonlinear_deblur":
        return NonlinearDeblur(image_shape, kernel_size=kernel_size, seed=seed, crf_strength=crf_strength,
                               sigma_y=sigma_y)
    raise ValueError(f"unknown task {task!r} (choices: {', '.join(TASKS)})")


# ---------------------------------------------------------------------------------------------
# Phase-retrieval alignment (shift + 180-degree rotation ambiguity)
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def align_phase_retrieval(x: torch.Tensor, truth: torch.Tensor, pad: int) -> torch.Tensor:
    """Align samples ``x`` (B, C, H, W) to ``truth`` (C, H, W) over the symmetries of |FFT|.

    Both are placed on the zero-padded canvas used by :class:`PhaseRetrieval` (in [0, 1] units), the
    sample and its 180-degree rotation are circularly shifted to maximise the cross-correlation with
    the truth (computed by FFT over all channels), and the best one is cropped back to H x W and
    returned in [-1, 1]. Used only for PSNR/SSIM of phase retrieval, never for the likelihood.
    """
    B, C, H, W = x.shape
    p = pad
    canvas = lambda z: F.pad((z + 1.0) * 0.5, (p, p, p, p))  # noqa: E731
    cx, ct = canvas(x.float()), canvas(truth.float()[None])
    best, best_score = None, None
    Ft = torch.fft.fft2(ct)
    for cand in (cx, torch.flip(cx, dims=(-2, -1))):
        # circular cross-correlation  c[s] = sum_u t[u] cand[u - s]... via FFT, summed over channels
        corr = torch.fft.ifft2(Ft * torch.fft.fft2(cand).conj()).real.sum(1)  # (B, Hp, Wp)
        score, flat = corr.reshape(B, -1).max(1)
        Wp = corr.shape[-1]
        shifts = [(int(f) // Wp, int(f) % Wp) for f in flat]
        shifted = torch.stack([torch.roll(cand[b], shifts=s, dims=(-2, -1)) for b, s in enumerate(shifts)])
        if best is None:
            best, best_score = shifted, score
        else:
            take = (score > best_score)[:, None, None, None]
            best = torch.where(take, shifted, best)
            best_score = torch.maximum(score, best_score)
    cropped = best[:, :, p:p + H, p:p + W]
    return cropped * 2.0 - 1.0
