"""An eps-prediction U-Net sized by a handful of hyperparameters.

``UNet(**hparams)(x, t, cond_image=None, cond_vec=None) -> eps`` with ``x`` of shape (B, C, H, W) in
network units, ``t`` the integer TRAINING timestep (1..T) of the noise schedule (scalar or (B,)).

Architecture (DDPM/ADM-like, kept small): a 3x3 input conv, ``len(channel_mults)`` resolution levels
with ``num_res_blocks`` residual blocks each (GroupNorm, SiLU, the time embedding added between the
two convs), optional self-attention at the levels listed in ``attn_levels`` (level 0 = full
resolution) and in the bottleneck, stride-2 conv downsampling / nearest upsampling, skip
connections, and a GroupNorm-SiLU-conv output head.

Conditioning (both optional, for amortized posteriors and correction heads):
* ``cond_channels``: extra image channels concatenated to ``x`` at the input (for example an
  observation mapped to the source plane);
* ``cond_dim``: a vector projected and added to the time embedding.

``zero_init_output=True`` zeroes the last conv so the network starts as the zero function (used for
trainable correction heads whose untrained posterior must equal the prior).

``hparams()`` returns the JSON-able constructor arguments, so a checkpoint can rebuild the net.
"""

from __future__ import annotations

import math

import torch
from torch import nn
import torch.nn.functional as F

from pipeline.diffusion.unet_presets import PRESETS  # named sizes (plain numbers)


def _groups(ch: int) -> int:
    """GroupNorm group count: 8 where the channel count allows it, else the largest divisor <= 8."""
    for g in (8, 4, 2, 1):
        if ch % g == 0:
            return g
    return 1


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly non-integer) timesteps t (B,) -> (B, dim), float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, temb_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(cin), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.temb = nn.Linear(temb_dim, cout)
        self.norm2 = nn.GroupNorm(_groups(cout), cout)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over pixels (only used at low resolution: cost ~ (HW)^2)."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm = nn.GroupNorm(_groups(ch), ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)

    def forward(self, x, temb=None):
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, C, H * W).unbind(1)
        h = F.scaled_dot_product_attention(q.transpose(1, 2)[:, None], k.transpose(1, 2)[:, None],
                                           v.transpose(1, 2)[:, None])[:, 0]
        return x + self.proj(h.transpose(1, 2).reshape(B, C, H, W))


class UNet(nn.Module):
    """eps-prediction U-Net. See the module docstring for the conventions."""

    def __init__(self, in_channels: int = 1, out_channels: int | None = None, base_channels: int = 32,
                 channel_mults=(1, 2, 2), num_res_blocks: int = 1, attn_levels=(), mid_attn: bool | None = None,
                 dropout: float = 0.0, cond_channels: int = 0, cond_dim: int = 0,
                 zero_init_output: bool = False, image_size: int | None = None):
        super().__init__()
        if in_channels < 1 or base_channels < 1 or num_res_blocks < 1 or not channel_mults:
            raise ValueError("UNet needs in_channels, base_channels, num_res_blocks >= 1 and channel_mults")
        out_channels = in_channels if out_channels is None else out_channels
        channel_mults = [int(m) for m in channel_mults]
        attn_levels = sorted(int(a) for a in attn_levels)
        if any(not 0 <= a < len(channel_mults) for a in attn_levels):
            raise ValueError(f"attn_levels {attn_levels} outside 0..{len(channel_mults) - 1}")
        if mid_attn is None:
            mid_attn = bool(attn_levels)
        factor = 2 ** (len(channel_mults) - 1)
        if image_size is not None and image_size % factor:
            raise ValueError(f"image_size {image_size} must be divisible by {factor} for {len(channel_mults)} levels")
        self._hparams = dict(in_channels=in_channels, out_channels=out_channels, base_channels=base_channels,
                             channel_mults=channel_mults, num_res_blocks=num_res_blocks, attn_levels=attn_levels,
                             mid_attn=mid_attn, dropout=dropout, cond_channels=cond_channels, cond_dim=cond_dim,
                             zero_init_output=zero_init_output, image_size=image_size)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.cond_channels, self.cond_dim, self.factor = cond_channels, cond_dim, factor
        temb_dim = 4 * base_channels
        self.base_channels = base_channels
        self.time_mlp = nn.Sequential(nn.Linear(base_channels, temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim))
        self.cond_mlp = (nn.Sequential(nn.Linear(cond_dim, temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim))
                         if cond_dim > 0 else None)
        self.conv_in = nn.Conv2d(in_channels + cond_channels, base_channels, 3, padding=1)

        self.down = nn.ModuleList()
        skips = [base_channels]
        ch = base_channels
        for level, mult in enumerate(channel_mults):
            cout = base_channels * mult
            for _ in range(num_res_blocks):
                blocks = [ResBlock(ch, cout, temb_dim, dropout)]
                if level in attn_levels:
                    blocks.append(AttnBlock(cout))
                self.down.append(nn.ModuleList(blocks))
                ch = cout
                skips.append(ch)
            if level < len(channel_mults) - 1:
                self.down.append(nn.ModuleList([nn.Conv2d(ch, ch, 3, stride=2, padding=1)]))
                skips.append(ch)
        self.mid = nn.ModuleList([ResBlock(ch, ch, temb_dim, dropout)]
                                 + ([AttnBlock(ch)] if mid_attn else [])
                                 + [ResBlock(ch, ch, temb_dim, dropout)])
        self.up = nn.ModuleList()
        for level in reversed(range(len(channel_mults))):
            cout = base_channels * channel_mults[level]
            for _ in range(num_res_blocks + 1):
                blocks = [ResBlock(ch + skips.pop(), cout, temb_dim, dropout)]
                if level in attn_levels:
                    blocks.append(AttnBlock(cout))
                self.up.append(nn.ModuleList(blocks))
                ch = cout
            if level > 0:
                self.up.append(nn.ModuleList([nn.Upsample(scale_factor=2, mode="nearest"),
                                              nn.Conv2d(ch, ch, 3, padding=1)]))
        self.norm_out = nn.GroupNorm(_groups(ch), ch)
        self.conv_out = nn.Conv2d(ch, out_channels, 3, padding=1)
        if zero_init_output:
            nn.init.zeros_(self.conv_out.weight)
            nn.init.zeros_(self.conv_out.bias)

    def hparams(self) -> dict:
        """JSON-able constructor arguments (``UNet(**net.hparams())`` rebuilds the architecture)."""
        return dict(self._hparams)

    @staticmethod
    def _is_updown(blocks) -> bool:
        return not isinstance(blocks[0], ResBlock)

    def forward(self, x: torch.Tensor, t, cond_image: torch.Tensor | None = None,
                cond_vec: torch.Tensor | None = None) -> torch.Tensor:
        B, _, H, W = x.shape
        if H % self.factor or W % self.factor:
            raise ValueError(f"UNet input {H}x{W} must be divisible by {self.factor}")
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(B)
        temb = self.time_mlp(timestep_embedding(t, self.base_channels))
        if self.cond_mlp is not None:
            if cond_vec is None:
                raise ValueError(f"this UNet needs cond_vec of shape (B, {self.cond_dim})")
            temb = temb + self.cond_mlp(cond_vec.to(temb.dtype))
        if self.cond_channels:
            if cond_image is None or cond_image.shape[1] != self.cond_channels:
                raise ValueError(f"this UNet needs cond_image with {self.cond_channels} channels")
            x = torch.cat([x, cond_image.to(x.dtype)], 1)
        h = self.conv_in(x)
        hs = [h]
        for blocks in self.down:
            if self._is_updown(blocks):
                h = blocks[0](h)
            else:
                for blk in blocks:
                    h = blk(h, temb)
            hs.append(h)
        for blk in self.mid:
            h = blk(h, temb)
        for blocks in self.up:
            if self._is_updown(blocks):
                h = blocks[1](blocks[0](h))
            else:
                h = torch.cat([h, hs.pop()], 1)
                for blk in blocks:
                    h = blk(h, temb)
        return self.conv_out(F.silu(self.norm_out(h)))


def build_unet(preset: str | None = "small", **overrides) -> UNet:
    """A UNet from a named preset (see ``PRESETS``) with keyword overrides (None values ignored)."""
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"unknown UNet preset {preset!r} (known: {', '.join(PRESETS)})")
    kwargs = dict(PRESETS[preset]) if preset else {}
    kwargs.update({k: v for k, v in overrides.items() if v is not None})
    return UNet(**kwargs)


def count_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())
