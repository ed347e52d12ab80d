"""Named U-Net sizes, plain numbers only, so the config tree can list and check them without torch.

Each preset gives :class:`pipeline.diffusion.unet.UNet` its ``base_channels`` (channels of the first
level), ``channel_mults`` (multiplier per resolution level), ``num_res_blocks`` (per level),
``attn_levels`` (levels with self-attention, 0 = full resolution) and optionally ``dropout``.
"small" trains at 32x32 on one CPU thread in minutes (~0.5 M parameters); "paper" is the GPU size
(64x64 images, ~9 M parameters, attention at 16x16 and 8x8).
"""

PRESETS: dict[str, dict] = {
    "tiny": {"base_channels": 16, "channel_mults": [1, 2], "num_res_blocks": 1, "attn_levels": []},
    "small": {"base_channels": 32, "channel_mults": [1, 2, 2], "num_res_blocks": 1, "attn_levels": []},
    "medium": {"base_channels": 64, "channel_mults": [1, 2, 2], "num_res_blocks": 1, "attn_levels": []},
    "paper": {"base_channels": 64, "channel_mults": [1, 2, 2, 4], "num_res_blocks": 2, "attn_levels": [2, 3],
              "dropout": 0.1},
}
