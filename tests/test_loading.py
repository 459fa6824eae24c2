"""Checkpoint loading against the reference fixtures (shared/fixtures, made with DDIM's UNet)."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import pytest
import torch

from deqlit.models.loading import (ArchitectureMismatchError, CheckpointFormatError,
                                   CheckpointNotFoundError, infer_unet_config, load_weights,
                                   read_state_dict, save_weights)
from deqlit.models.paper_configs import PAPER_CONFIGS, PAPER_PARAM_COUNTS, paper_layout
from deqlit.models.unet import DDIMUNet

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"


def fixture_path(name: str) -> Path:
    """A file of ../shared/fixtures (the repo is checked out beside shared/); skip if absent."""
    path = FIXTURES / name
    if not path.is_file():
        pytest.skip(f"fixture {path} is absent: check out shared/ beside the repository")
    return path


@pytest.fixture(scope="module")
def vector() -> dict:
    return torch.load(fixture_path("ddim_unet_tiny_vector.pt"), map_location="cpu",
                      weights_only=True)


@pytest.fixture(scope="module")
def layouts() -> dict:
    return json.loads(fixture_path("ddim_unet_layouts.json").read_text())


@torch.no_grad()
def eps_of(model: DDIMUNet, vector: dict) -> torch.Tensor:
    return model.eval()(vector["x"], vector["t"])


def tiny(vector: dict) -> DDIMUNet:
    return DDIMUNet(**vector["config"])


def assert_close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> None:
    assert (a - b).abs().max().item() < tol


# ---- the network itself ----------------------------------------------------------------------
def test_tiny_vector_reproduces_reference_eps(vector):
    model = tiny(vector)
    model.load_state_dict(vector["state_dict"], strict=True)
    assert_close(eps_of(model, vector), vector["eps"])


@pytest.mark.parametrize("name", ["cifar10", "celeba", "lsun"])
def test_paper_layouts_match_reference(name, layouts):
    ref = layouts[name]
    assert PAPER_CONFIGS[name] == ref["config"]  # the shipped copy equals the fixture
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = DDIMUNet(**ref["config"])
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert list(shapes) == list(ref["state_dict"])
    assert shapes == ref["state_dict"]
    count = sum(p.numel() for p in model.parameters())
    assert count == ref["num_parameters"] == PAPER_PARAM_COUNTS[name]


@pytest.mark.parametrize("name", ["cifar10", "celeba", "lsun"])
def test_infer_config_from_reference_layouts(name, layouts):
    ref = layouts[name]
    sd = {k: torch.empty(shape, device="meta") for k, shape in ref["state_dict"].items()}
    inferred = infer_unet_config(sd, resolution=ref["config"]["resolution"])
    assert inferred == {**ref["config"], "dropout": 0.0}  # dropout has no weights


# ---- the formats -----------------------------------------------------------------------------
def test_plain_state_dict(vector, tmp_path):
    path = tmp_path / "plain.pt"
    torch.save(vector["state_dict"], path)
    assert_close(eps_of(load_weights(tiny(vector), path), vector), vector["eps"])


def test_plain_state_dict_with_module_prefix(vector, tmp_path):
    path = tmp_path / "dp.pt"
    torch.save({f"module.{k}": v for k, v in vector["state_dict"].items()}, path)
    assert_close(eps_of(load_weights(tiny(vector), path), vector), vector["eps"])


def test_export_dict_with_config(vector, tmp_path):
    path = tmp_path / "export.pt"
    torch.save({"state_dict": vector["state_dict"], "config": vector["config"]}, path)
    assert_close(eps_of(load_weights(tiny(vector), path), vector), vector["eps"])


def test_ddim_ckpt_list_ema_and_raw(vector):
    path = fixture_path("ddim_ckpt_layout_tiny.pth")
    ema_eps = eps_of(load_weights(tiny(vector), path, ema=True), vector)
    assert_close(ema_eps, vector["eps_ema_of_ckpt_layout"])
    # The fixture's raw weights (first element) are the vector's own weights, so ema=False gives
    # the vector's eps, and the EMA output differs from it.
    raw_eps = eps_of(load_weights(tiny(vector), path, ema=False), vector)
    assert_close(raw_eps, vector["eps"])
    assert (raw_eps - ema_eps).abs().max().item() > 1e-2


def test_ddim_ckpt_without_ema_asks_for_raw(vector, tmp_path):
    states = torch.load(fixture_path("ddim_ckpt_layout_tiny.pth"), weights_only=True)
    path = tmp_path / "no_ema.pth"
    torch.save(states[:4], path)  # DDIM saves 4 elements when training without EMA
    with pytest.raises(CheckpointFormatError, match="ema=False"):
        load_weights(tiny(vector), path, ema=True)
    assert_close(eps_of(load_weights(tiny(vector), path, ema=False), vector), vector["eps"])


def lightning_ckpt(raw: dict, ema: dict | None) -> dict:
    """The layout of DiffusionTrainModule's checkpoints: model.*, ema.module.*, ema.n_averaged."""
    sd = {f"model.{k}": v for k, v in raw.items()}
    if ema is not None:
        sd.update({f"ema.module.{k}": v for k, v in ema.items()})
        sd["ema.n_averaged"] = torch.tensor(1000)
    return {"state_dict": sd, "pytorch-lightning_version": "2.6.6", "epoch": 3, "global_step": 1000,
            "hyper_parameters": {"model": {"ch": 32}, "lr": 2e-4}}


def test_lightning_checkpoint_picks_ema_or_raw(vector, tmp_path):
    ema_sd = torch.load(fixture_path("ddim_ckpt_layout_tiny.pth"), weights_only=True)[-1]
    path = tmp_path / "last.ckpt"
    torch.save(lightning_ckpt(vector["state_dict"], ema_sd), path)
    assert_close(eps_of(load_weights(tiny(vector), path), vector), vector["eps_ema_of_ckpt_layout"])
    assert_close(eps_of(load_weights(tiny(vector), path, ema=False), vector), vector["eps"])


def test_lightning_checkpoint_without_ema(vector, tmp_path):
    path = tmp_path / "raw.ckpt"
    torch.save(lightning_ckpt(vector["state_dict"], None), path)
    with pytest.raises(CheckpointFormatError, match="ema=False"):
        load_weights(tiny(vector), path)


def test_train_module_keys_have_the_expected_prefixes(vector):
    train_module = pytest.importorskip("deqlit.lit.train_module")
    module = train_module.DiffusionTrainModule(model=dict(vector["config"]), diffusion={},
                                               sample_every=0)
    keys = set(module.state_dict())
    assert {f"model.{k}" for k in vector["state_dict"]} <= keys
    assert {f"ema.module.{k}" for k in vector["state_dict"]} <= keys


def test_save_weights_round_trip(vector, tmp_path):
    model = tiny(vector)
    model.load_state_dict(vector["state_dict"])
    path = save_weights(model, tmp_path / "sub" / "w.pt")
    assert set(torch.load(path, weights_only=True)) == set(vector["state_dict"])
    assert_close(eps_of(load_weights(tiny(vector), path), vector), vector["eps"])


def test_safetensors_round_trip(vector, tmp_path):
    pytest.importorskip("safetensors")
    model = tiny(vector)
    model.load_state_dict(vector["state_dict"])
    path = save_weights(model, tmp_path / "w.safetensors")
    assert_close(eps_of(load_weights(tiny(vector), path), vector), vector["eps"])


def test_safetensors_missing_package(vector, tmp_path, monkeypatch):
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"\0" * 16)
    monkeypatch.setitem(sys.modules, "safetensors", None)  # makes the import fail
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(ImportError, match="pip install safetensors"):
        load_weights(tiny(vector), path)


# ---- errors ----------------------------------------------------------------------------------
def test_missing_file_names_path_and_sources(vector, tmp_path):
    path = tmp_path / "model-790000.ckpt"
    with pytest.raises(CheckpointNotFoundError) as info:
        load_weights(tiny(vector), path)
    assert isinstance(info.value, FileNotFoundError)
    text = str(info.value)
    assert str(path) in text and "never downloads" in text
    assert "Ho et al." in text and "ckpt.pth" in text


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", os.urandom(4096)],
                         ids=["empty", "text", "random"])
def test_garbage_file(vector, tmp_path, content):
    path = tmp_path / "junk.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointFormatError, match="not a readable PyTorch checkpoint"):
        load_weights(tiny(vector), path)


def test_truncated_file(vector, tmp_path):
    data = fixture_path("ddim_unet_tiny_vector.pt").read_bytes()
    path = tmp_path / "half.pt"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointFormatError, match="truncated or corrupt"):
        load_weights(tiny(vector), path)


def test_pickle_refused_by_weights_only(vector, tmp_path):
    path = tmp_path / "with_args.pt"
    # Old training scripts pickle their argparse namespace next to the weights.
    torch.save({"state_dict": vector["state_dict"], "args": argparse.Namespace(lr=1e-4)}, path)
    with pytest.raises(CheckpointFormatError, match="argparse.Namespace") as info:
        load_weights(tiny(vector), path)
    assert "weights_only" in str(info.value)


def test_dict_without_tensors(vector, tmp_path):
    path = tmp_path / "meta.pt"
    torch.save({"epoch": 3, "note": "no weights"}, path)
    with pytest.raises(CheckpointFormatError, match="no tensors"):
        load_weights(tiny(vector), path)


def test_directory_points_to_diffusers_adapter(vector, tmp_path):
    with pytest.raises(CheckpointFormatError, match="load_diffusers_unet"):
        read_state_dict(tmp_path)


def test_cifar10_weights_into_celeba_model_names_cifar10(tmp_path):
    # Zeros expanded from one element: the file stores a single float per tensor, so it is tiny.
    layout = paper_layout("cifar10")
    torch.save({k: torch.zeros(()).expand(shape) for k, shape in layout.items()}, tmp_path / "c.pt")
    with torch.device("meta"):
        celeba = DDIMUNet(**PAPER_CONFIGS["celeba"])
    with pytest.raises(ArchitectureMismatchError) as info:
        load_weights(celeba, tmp_path / "c.pt")
    text = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "'cifar10'" in text and "PAPER_CONFIGS['cifar10']" in text
    assert "missing keys" in text and "down.4.block.0.*" in text
    # The middle block is 256 channels wide in cifar10 and 512 in celeba.
    assert "mis-shaped keys" in text and "file [256, 256, 3, 3], model [512, 512, 3, 3]" in text
    assert "more)" in text  # long lists are truncated with a count


def test_unknown_architecture_gets_an_inferred_config(vector, tmp_path):
    path = tmp_path / "tiny.pt"
    torch.save(vector["state_dict"], path)
    with torch.device("meta"):
        cifar = DDIMUNet(**PAPER_CONFIGS["cifar10"])
    with pytest.raises(ArchitectureMismatchError) as info:
        load_weights(cifar, path)
    text = str(info.value)
    assert "fits none of the paper's configs" in text
    assert "ch=32" in text and "ch_mult=[1, 2]" in text and "num_res_blocks=1" in text
    assert "resolution cannot be inferred" in text


def test_non_unet_weights_say_so(tmp_path):
    path = tmp_path / "linear.pt"
    torch.save(torch.nn.Linear(3, 4).state_dict(), path)
    with pytest.raises(ArchitectureMismatchError, match="not a DDPM/DDIM UNet"):
        load_weights(DDIMUNet(ch=32, ch_mult=[1, 2], num_res_blocks=1), path)
