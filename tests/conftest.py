"""Shared test helpers: small UNets whose output really depends on their input."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from deqlit.models.unet import DDIMUNet

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO.parent / "shared" / "fixtures"


def perturbed_unet(seed: int = 0, scale: float = 0.3, dtype=torch.float64, resolution: int = 8,
                   channels: int = 1) -> DDIMUNet:
    """A tiny DDIMUNet with every weight moved off its init (zero biases, unit norms), so that
    eps depends strongly on x: an untrained net's output hardly does, and then every solver
    'converges' at once and a test proves nothing (shared/paper.md, last section)."""
    torch.manual_seed(seed)
    model = DDIMUNet(ch=8, out_ch=channels, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[4],
                     dropout=0.0, in_channels=channels, resolution=resolution, norm_groups=2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model.to(dtype).eval()


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not FIXTURES.is_dir():
        pytest.skip(f"shared fixtures not found at {FIXTURES}")
    return FIXTURES


class GaussianDataNoise(torch.nn.Module):
    """A noise model with a known sensible scale: the exact eps of data ~ N(0, s^2 I),
    eps*(x, t) = sqrt(1 - abar_t) x / (abar_t s^2 + 1 - abar_t), plus `weight` times a perturbed
    UNet so that the map is nonlinear. Its samples stay in [-1, 1]-like range (a random UNet
    alone gives x_0 ~ 100, where float32 cannot show a 1e-4 agreement)."""

    def __init__(self, seed: int = 0, weight: float = 0.3, std: float = 0.5, dtype=torch.float64,
                 resolution: int = 8):
        super().__init__()
        from deqlit.diffusion.schedule import alphas_cumprod, linear_betas
        self.net = perturbed_unet(seed=seed, dtype=dtype, resolution=resolution)
        self.register_buffer("abar", alphas_cumprod(linear_betas()).to(dtype))
        self.weight, self.var = weight, std ** 2
        self.resolution, self.in_channels = resolution, 1

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = self.abar[t].to(x.dtype)[:, None, None, None]
        return (1 - a).sqrt() * x / (a * self.var + 1 - a) + self.weight * self.net(x, t)


@pytest.fixture
def one_thread():
    """Run a test on one thread (small network calls on 2 shared cores are faster that way)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
