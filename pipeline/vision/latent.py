"""Latent-space inverse problems: the diffusion prior lives in an autoencoder's latent space and the
likelihood is evaluated through the (frozen) decoder.

``LatentProblem(image_problem, ae)``: ``x`` are normalised latents (B, *ae.latent_shape);
``forward(z) = image_problem.forward(ae.decode(z))``; ``sigma``, ``mask`` and ``y`` are the image
problem's, so ``log_likelihood`` is the same fully normalised Gaussian in image-measurement space and
log Z values are comparable with the pixel-space benchmark. The problem is nonlinear even when the
image operator is linear (the decoder is not), so closed-form linear samplers (FPS, CLA) do not apply;
gradient-guided samplers (DPS) backpropagate through the decoder.
"""

from __future__ import annotations

import torch

from pipeline.problems import InverseProblem


class LatentProblem(InverseProblem):
    """An image :class:`InverseProblem` seen through a decoder (see the module docstring)."""

    is_linear = False

    def __init__(self, image_problem: InverseProblem, ae):
        self.image_problem = image_problem
        self.ae = ae
        for p in ae.parameters():
            p.requires_grad_(False)
        self.x_shape = tuple(ae.latent_shape)
        self.y_shape = tuple(image_problem.y_shape)
        self.image_shape = tuple(image_problem.x_shape)
        if tuple(ae.image_shape) != self.image_shape:
            raise ValueError(f"autoencoder images {ae.image_shape} differ from the problem's {self.image_shape}")
        super().__init__(image_problem.sigma, image_problem.mask)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [-1, 1], under the caller's grad mode."""
        dev = self.ae.latent_scale.device
        return self.ae.decode(z.to(device=dev, dtype=torch.float32)).to(device=z.device, dtype=z.dtype)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.image_problem.forward(self.decode(z))

    def to(self, device) -> "LatentProblem":
        super().to(device)
        self.image_problem.to(device)
        self.ae.to(device)
        return self
