"""train.py on the real faces config, shrunk: files, TensorBoard tags, resume, seeds, EMA."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import train
from deqlit.lit.ema import make_ema, warmup_ema_decay
from deqlit.models.loading import load_weights
from deqlit.models.unet import DDIMUNet

SHRINK = ["--model.ch", "16", "--model.ch_mult", "[1,2]", "--model.num_res_blocks", "1",
          "--model.attn_resolutions", "[]", "--model.norm_groups", "4", "--data.batch_size", "4",
          "--train.steps_per_epoch", "2", "--train.checkpoint_every", "2", "--train.sample_every", "3",
          "--train.sample_timesteps", "3", "--train.sample_count", "2", "--train.warmup_steps", "1",
          "--train.log_every_n_steps", "1"]


def run(out: Path, steps: int, *extra: str) -> None:
    train.main(["--data", "faces", "--max-steps", str(steps), "--out", str(out), *SHRINK, *extra])


def events(out: Path) -> EventAccumulator:
    acc = EventAccumulator(str(out / "tb" / "version_0"))
    acc.Reload()
    return acc


def test_train_writes_checkpoints_ema_config_and_tensorboard_tags(tmp_path):
    run(tmp_path, 4)
    for name in ("checkpoints/last.ckpt", "ema.pt", "config.yaml"):
        assert (tmp_path / name).is_file(), name
    assert "ch: 16" in (tmp_path / "config.yaml").read_text()
    tags = events(tmp_path).Tags()
    assert {"train/loss", "val/denoise_mse"} <= set(tags["scalars"])
    assert "samples" in tags["images"]
    # the exported EMA weights are the checkpoint's EMA weights
    cfg_model = dict(ch=16, out_ch=1, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[],
                     dropout=0.0, in_channels=1, resolution=32, norm_groups=4)
    from_ckpt = load_weights(DDIMUNet(**cfg_model), tmp_path / "checkpoints/last.ckpt", ema=True)
    exported = torch.load(tmp_path / "ema.pt", weights_only=True)
    for key, value in from_ckpt.state_dict().items():
        assert torch.equal(value, exported[key])


def test_resume_continues_the_step_count_and_the_ema(tmp_path):
    run(tmp_path, 4)
    run(tmp_path, 6, "--resume")
    ckpt = torch.load(tmp_path / "checkpoints/last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 6
    assert int(ckpt["state_dict"]["ema.n_averaged"]) == 6
    steps = [e.step for e in events(tmp_path).Scalars("train/loss")]
    assert max(steps) > 4


def test_same_seed_reproduces_and_another_seed_differs(tmp_path):
    run(tmp_path / "a", 2)
    run(tmp_path / "b", 2)
    run(tmp_path / "c", 2, "--seed", "7")
    a, b, c = (torch.load(tmp_path / n / "ema.pt", weights_only=True) for n in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_ema_warm_up():
    assert warmup_ema_decay(0, 0.999) == pytest.approx(0.1)
    assert warmup_ema_decay(10 ** 6, 0.999) == 0.999
    net = torch.nn.Linear(2, 1)
    ema = make_ema(net, 0.999)
    ema.update_parameters(net)                 # first update copies the weights
    before = ema.module.weight.detach().clone()
    with torch.no_grad():
        net.weight.add_(1.0)
    ema.update_parameters(net)                 # n_averaged = 1 -> decay (1 + 1) / (10 + 1)
    decay = 2 / 11
    assert torch.allclose(ema.module.weight, decay * before + (1 - decay) * net.weight)


def test_cli_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="last.ckpt"):
        run(tmp_path, 2, "--resume")
    with pytest.raises(KeyError, match="nosuch"):
        run(tmp_path, 2, "--nosuch.key", "1")
