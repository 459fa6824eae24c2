"""The diffusers adapter on a tiny UNet2DModel saved locally (no network, no downloaded weights)."""
from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from deqlit.diffusion.schedule import make_betas  # noqa: E402
from deqlit.models.diffusers_adapter import (UnsupportedScheduleError,  # noqa: E402
                                             load_diffusers_unet)
from deqlit.models.loading import CheckpointFormatError, CheckpointNotFoundError  # noqa: E402


def tiny_unet(channels: int = 2) -> "diffusers.UNet2DModel":
    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        sample_size=16, in_channels=channels, out_channels=channels, block_out_channels=(16, 32),
        layers_per_block=1, norm_num_groups=8, attention_head_dim=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D")).eval()


def save_pipeline(root: Path, unet: "diffusers.UNet2DModel", **scheduler_kwargs) -> Path:
    """The layout of google/ddpm-cifar10-32: unet/ and scheduler/ side by side."""
    unet.save_pretrained(root / "unet")
    diffusers.DDPMScheduler(**scheduler_kwargs).save_pretrained(root / "scheduler")
    return root


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("the adapter tried to use the network")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_eps_equals_diffusers_output(tmp_path, no_network):
    unet = tiny_unet()
    root = save_pipeline(tmp_path / "pipe", unet)
    model, schedule = load_diffusers_unet(root)
    assert (model.resolution, model.in_channels) == (16, 2)
    x = torch.randn(3, 2, 16, 16, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0, 500, 999])
    with torch.no_grad():
        expected = unet(x, t).sample
        eps = model(x, t)
    assert eps.shape == x.shape
    assert torch.allclose(eps, expected, atol=1e-6)
    assert schedule == dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                            num_diffusion_timesteps=1000)


def test_plain_unet_folder_defaults_to_ddpm_schedule(tmp_path, no_network):
    tiny_unet(1).save_pretrained(tmp_path / "unet_only")
    model, schedule = load_diffusers_unet(tmp_path / "unet_only")
    assert model.in_channels == 1
    assert schedule == dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                            num_diffusion_timesteps=1000)


def test_linear_schedule_fields_and_betas(tmp_path):
    root = save_pipeline(tmp_path / "p", tiny_unet(), beta_start=2e-4, beta_end=0.03,
                         num_train_timesteps=500)
    _, schedule = load_diffusers_unet(root)
    assert schedule == dict(beta_schedule="linear", beta_start=2e-4, beta_end=0.03,
                            num_diffusion_timesteps=500)
    ours = make_betas(schedule["beta_schedule"], schedule["num_diffusion_timesteps"],
                      schedule["beta_start"], schedule["beta_end"])
    theirs = diffusers.DDPMScheduler(beta_start=2e-4, beta_end=0.03, num_train_timesteps=500).betas
    assert torch.allclose(ours.float(), theirs, atol=1e-7)


def test_squaredcos_maps_to_our_cosine(tmp_path):
    root = save_pipeline(tmp_path / "p", tiny_unet(), beta_schedule="squaredcos_cap_v2")
    _, schedule = load_diffusers_unet(root)
    assert schedule["beta_schedule"] == "cosine"
    ours = make_betas("cosine", schedule["num_diffusion_timesteps"])
    theirs = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2").betas
    assert torch.allclose(ours.float(), theirs, atol=1e-6)


@pytest.mark.parametrize("prediction", ["v_prediction", "sample"])
def test_non_epsilon_prediction_is_refused(tmp_path, prediction):
    root = save_pipeline(tmp_path / "p", tiny_unet(), prediction_type=prediction)
    with pytest.raises(UnsupportedScheduleError, match=f"{prediction!r}.*'epsilon'"):
        load_diffusers_unet(root)


def test_unsupported_beta_schedule(tmp_path):
    root = save_pipeline(tmp_path / "p", tiny_unet(), beta_schedule="scaled_linear")
    with pytest.raises(UnsupportedScheduleError, match="scaled_linear"):
        load_diffusers_unet(root)


def test_learned_variance_returns_eps_half(tmp_path):
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=16, in_channels=1, out_channels=2,
                                 block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D")).eval()
    unet.save_pretrained(tmp_path / "u")
    model, _ = load_diffusers_unet(tmp_path / "u")
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([3, 700])
    with torch.no_grad():
        assert torch.allclose(model(x, t), unet(x, t).sample[:, :1], atol=1e-6)


def test_missing_and_wrong_paths(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="never downloads"):
        load_diffusers_unet(tmp_path / "ddpm-cifar10-32")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointFormatError, match="config.json"):
        load_diffusers_unet(tmp_path / "empty")
    (tmp_path / "w.pt").write_bytes(b"")
    with pytest.raises(CheckpointFormatError, match="load_weights"):
        load_diffusers_unet(tmp_path / "w.pt")


def test_missing_diffusers_says_what_to_install(tmp_path, monkeypatch):
    root = save_pipeline(tmp_path / "p", tiny_unet())
    monkeypatch.setitem(sys.modules, "diffusers", None)  # makes `import diffusers` fail
    with pytest.raises(ImportError, match=r"pip install 'deqlit\[diffusers\]'"):
        load_diffusers_unet(root)
