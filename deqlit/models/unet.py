"""The DDPM noise network used by DDIM and by the DEQ-DDIM paper.

A re-implementation of the UNet of Ho et al. (2020) with the module layout of the DDIM code, so that
the paper's checkpoints (CIFAR10, CelebA, LSUN) load strictly: every state_dict key and shape is the
same (see tests/test_unet.py against shared fixture layouts).

Shapes: x (B, C, H, W) in [-1, 1] scale, t (B,) integer timesteps in [0, 1000) -> eps (B, C_out, H, W).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps, (B,) -> (B, dim), as in the DDPM/DDIM code."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=t.device)
                      * -(math.log(10000.0) / (half - 1)))
    angles = t.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb


def swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class Upsample(nn.Module):
    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        if with_conv:
            self.conv = nn.Conv2d(channels, channels, 3, stride=1, padding=1)
        self.with_conv = with_conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.with_conv else x


class Downsample(nn.Module):
    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        if with_conv:
            # Asymmetric padding (right/bottom only) matches the TensorFlow original.
            self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)
        self.with_conv = with_conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.with_conv:
            return self.conv(F.pad(x, (0, 1, 0, 1)))
        return F.avg_pool2d(x, kernel_size=2, stride=2)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, dropout: float,
                 groups: int):
        super().__init__()
        self.norm1 = group_norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.temb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = group_norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)
        self.needs_shortcut = in_channels != out_channels

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = h + self.temb_proj(swish(temb))[:, :, None, None]
        h = self.conv2(self.dropout(swish(self.norm2(h))))
        skip = self.nin_shortcut(x) if self.needs_shortcut else x
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = group_norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hgt, wid = x.shape
        h = self.norm(x)
        q = self.q(h).reshape(b, c, hgt * wid).transpose(1, 2)  # (B, HW, C)
        k = self.k(h).reshape(b, c, hgt * wid)                  # (B, C, HW)
        v = self.v(h).reshape(b, c, hgt * wid)                  # (B, C, HW)
        weights = torch.softmax(torch.bmm(q, k) * (c ** -0.5), dim=2)  # (B, HW query, HW key)
        out = torch.bmm(v, weights.transpose(1, 2)).reshape(b, c, hgt, wid)
        return x + self.proj_out(out)


class DDIMUNet(nn.Module):
    """The DDPM UNet with the DDIM code's configuration fields.

    Args follow the reference config (`model:` section of DDIM's YAML files). `norm_groups` is ours:
    the paper's models use 32 GroupNorm groups; with ch = 32 that is one channel per group, which
    removes every channel's spatial mean and leaves the network unable to predict the image-wide
    mean of the noise, so small models use fewer groups. It changes no parameter shape.
    """

    def __init__(self, *, ch: int = 128, out_ch: int = 3, ch_mult: Sequence[int] = (1, 2, 2, 2),
                 num_res_blocks: int = 2, attn_resolutions: Sequence[int] = (16,),
                 dropout: float = 0.1, in_channels: int = 3, resolution: int = 32,
                 resamp_with_conv: bool = True, norm_groups: int = 32):
        super().__init__()
        self.config = dict(ch=ch, out_ch=out_ch, ch_mult=list(ch_mult),
                           num_res_blocks=num_res_blocks, attn_resolutions=list(attn_resolutions),
                           dropout=dropout, in_channels=in_channels, resolution=resolution,
                           resamp_with_conv=resamp_with_conv, norm_groups=norm_groups)
        self.ch, self.temb_ch = ch, ch * 4
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.resolution, self.in_channels = resolution, in_channels
        groups = norm_groups

        self.temb = nn.Module()
        self.temb.dense = nn.ModuleList([nn.Linear(ch, self.temb_ch),
                                         nn.Linear(self.temb_ch, self.temb_ch)])
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)

        in_ch_mult = (1,) + tuple(ch_mult)
        curr_res = resolution
        self.down = nn.ModuleList()
        block_in = ch
        for level in range(self.num_resolutions):
            blocks, attns = nn.ModuleList(), nn.ModuleList()
            block_in, block_out = ch * in_ch_mult[level], ch * ch_mult[level]
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(block_in, block_out, self.temb_ch, dropout, groups))
                block_in = block_out
                if curr_res in attn_resolutions:
                    attns.append(AttnBlock(block_in, groups))
            stage = nn.Module()
            stage.block, stage.attn = blocks, attns
            if level != self.num_resolutions - 1:
                stage.downsample = Downsample(block_in, resamp_with_conv)
                curr_res //= 2
            self.down.append(stage)

        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, self.temb_ch, dropout, groups)
        self.mid.attn_1 = AttnBlock(block_in, groups)
        self.mid.block_2 = ResnetBlock(block_in, block_in, self.temb_ch, dropout, groups)

        up_stages = []
        for level in reversed(range(self.num_resolutions)):
            blocks, attns = nn.ModuleList(), nn.ModuleList()
            block_out = ch * ch_mult[level]
            skip_in = ch * ch_mult[level]
            for i_block in range(num_res_blocks + 1):
                if i_block == num_res_blocks:
                    skip_in = ch * in_ch_mult[level]
                blocks.append(ResnetBlock(block_in + skip_in, block_out, self.temb_ch, dropout,
                                          groups))
                block_in = block_out
                if curr_res in attn_resolutions:
                    attns.append(AttnBlock(block_in, groups))
            stage = nn.Module()
            stage.block, stage.attn = blocks, attns
            if level != 0:
                stage.upsample = Upsample(block_in, resamp_with_conv)
                curr_res *= 2
            up_stages.insert(0, stage)  # self.up[i] is the stage at resolution level i
        self.up = nn.ModuleList(up_stages)

        self.norm_out = group_norm(block_in, groups)
        self.conv_out = nn.Conv2d(block_in, out_ch, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W); t: (B,) integer timesteps -> predicted noise (B, out_ch, H, W)."""
        if x.shape[-1] != self.resolution or x.shape[-2] != self.resolution:
            raise ValueError(
                f"this DDIMUNet takes {self.resolution}x{self.resolution} images, got "
                f"{x.shape[-2]}x{x.shape[-1]}: resize the images or load a model of that size")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"this DDIMUNet takes {self.in_channels}-channel images, got "
                             f"{x.shape[1]}: convert the images (e.g. grayscale <-> RGB)")
        temb = self.temb.dense[0](timestep_embedding(t, self.ch).to(self.conv_in.weight.dtype))
        temb = self.temb.dense[1](swish(temb))

        hs = [self.conv_in(x)]
        for level, stage in enumerate(self.down):
            for i_block, block in enumerate(stage.block):
                h = block(hs[-1], temb)
                if len(stage.attn) > 0:
                    h = stage.attn[i_block](h)
                hs.append(h)
            if level != self.num_resolutions - 1:
                hs.append(stage.downsample(hs[-1]))

        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(hs[-1], temb)), temb)

        for level in reversed(range(self.num_resolutions)):
            stage = self.up[level]
            for i_block, block in enumerate(stage.block):
                h = block(torch.cat([h, hs.pop()], dim=1), temb)
                if len(stage.attn) > 0:
                    h = stage.attn[i_block](h)
            if level != 0:
                h = stage.upsample(h)

        return self.conv_out(swish(self.norm_out(h)))
