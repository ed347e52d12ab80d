"""Low-rank adapters (LoRA) for the linear and conv layers of a copied eps-network.

``apply_lora(net, rank, alpha)`` replaces every ``nn.Linear`` and ``nn.Conv2d`` of ``net`` (in place)
by the frozen original plus a trainable low-rank update ``(alpha / rank) * up(down(x))``:
for a linear layer ``down: in -> rank``, ``up: rank -> out``; for a conv layer ``down`` is a conv with
the original kernel, stride, padding and ``rank`` output channels and ``up`` a 1x1 conv. ``up`` is
zero-initialised, so the adapted network equals the original at initialisation (q = p).
"""

from __future__ import annotations

from torch import nn


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base, self.scale = base, alpha / rank
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.down = nn.Linear(base.in_features, rank, bias=False)
        self.up = nn.Linear(rank, base.out_features, bias=False)
        nn.init.zeros_(self.up.weight)

    def forward(self, x):
        return self.base(x) + self.scale * self.up(self.down(x))


class LoRAConv2d(nn.Module):
    def __init__(self, base: nn.Conv2d, rank: int, alpha: float):
        super().__init__()
        self.base, self.scale = base, alpha / rank
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding,
                              base.dilation, bias=False)
        self.up = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        nn.init.zeros_(self.up.weight)

    def forward(self, x):
        return self.base(x) + self.scale * self.up(self.down(x))


def apply_lora(net: nn.Module, rank: int, alpha: float | None = None) -> nn.Module:
    """Wrap every Linear/Conv2d of ``net`` with a LoRA adapter; returns ``net`` (modified in place).

    Only the adapters are trainable afterwards; the original weights (and all other parameters, e.g.
    GroupNorm affine terms) are frozen.
    """
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    alpha = float(rank if alpha is None else alpha)
    for p in net.parameters():
        p.requires_grad_(False)

    def swap(module: nn.Module):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, LoRALinear(child, rank, alpha))
            elif isinstance(child, nn.Conv2d) and child.groups == 1:
                setattr(module, name, LoRAConv2d(child, rank, alpha))
            else:
                swap(child)

    swap(net)
    return net
