"""train.py's config surface and device-correctness: the `trainer:` section and --trainer.KEY
overrides reach lightning.Trainer, the training module makes every tensor on the batch's device
and dtype (checked on 'meta' tensors and by a float64 run), a resume with changed settings is
refused, and on-disk training data is decoded lazily.
"""
from __future__ import annotations

import copy
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.tiny import load_script, run_train, tree_hashes
import yaml
from lightning.pytorch.strategies import DDPStrategy
from PIL import Image

from deqlit.config import apply_overrides, load_config
from deqlit.data import folders
from deqlit.data.streaming import TensorImages
from deqlit.lit.datamodule import ImageDataModule
from torch.optim.swa_utils import AveragedModel

from deqlit.lit.ema import warmup_ema_decay
from deqlit.runs.training import prepare_training
from deqlit.lit.train_module import DiffusionTrainModule

REPO = Path(__file__).resolve().parent.parent
TINY = ["--model.ch", "8", "--model.ch_mult", "[1,2]", "--model.num_res_blocks", "1",
        "--model.attn_resolutions", "[]", "--model.norm_groups", "4", "--model.resolution", "16",
        "--data.resolution", "16", "--batch-size", "4", "--train.sample_every", "0",
        "--train.warmup_steps", "1", "--train.steps_per_epoch", "1000",
        "--train.log_every_n_steps", "1"]
TINY_MODEL = dict(ch=8, out_ch=1, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[],
                  dropout=0.0, in_channels=1, resolution=16, resamp_with_conv=True, norm_groups=4)


train_script = load_script("train.py", "deqlit_train_script_cfg")


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_cfg(out: Path, *extra: str) -> dict:
    """configs/faces.yaml with the tiny overrides, as train.py would resolve them."""
    i = TINY.index("--batch-size")   # a named flag, not a --section.key override
    cfg = apply_overrides(load_config(REPO / "configs" / "faces.yaml"),
                          TINY[:i] + TINY[i + 2:] + list(extra))
    cfg["data"]["batch_size"], cfg["train"]["out"] = 4, str(out)
    return cfg




# ---- 1. the trainer section reaches lightning.Trainer ------------------------------------------
def test_trainer_overrides_reach_the_trainer(tmp_path):
    cfg = tiny_cfg(tmp_path / "run", "--trainer.accelerator", "cpu", "--trainer.devices", "2",
                   "--trainer.strategy", "ddp", "--trainer.precision", "64-true",
                   "--trainer.max_epochs", "3", "--train.grad_clip", "0.5",
                   "--train.max_steps", "7")
    trainer = prepare_training(cfg).trainer
    assert trainer.max_epochs == 3 and trainer.precision == "64-true"
    assert trainer.num_devices == 2 and isinstance(trainer.strategy, DDPStrategy)
    assert trainer.accelerator.__class__.__name__ == "CPUAccelerator"
    # What train: owns passes through the Trainer's own arguments.
    assert trainer.max_steps == 7 and trainer.log_every_n_steps == 1
    assert trainer.gradient_clip_val == 0.5 and trainer.gradient_clip_algorithm == "norm"
    assert not (tmp_path / "run" / "config.yaml").exists()   # preparing writes nothing

    # The config's own section (faces.yaml: auto, 1 device, 32-true) when nothing overrides it.
    plain = prepare_training(tiny_cfg(tmp_path / "plain")).trainer
    assert plain.num_devices == 1 and plain.precision == "32-true"
    off = prepare_training(tiny_cfg(tmp_path / "off", "--train.grad_clip", "0")).trainer
    assert off.gradient_clip_val is None


@pytest.mark.parametrize("extra, words", [
    (["--trainer.max_epoch", "3"], ["unknown trainer option", "max_epoch", "did you mean max_epochs"]),
    (["--trainer.max_steps", "3"], ["trainer.max_steps", "--max-steps", "remove it"]),
    (["--trainer.gradient_clip_val", "1"], ["trainer.gradient_clip_val", "--train.grad_clip"]),
    (["--train.precision", "64-true"], ["--trainer.precision 64-true"]),
    (["--train.ema_decay", "1.5"], ["--train.ema_decay", "[0, 1]"]),
    (["--train.weight_decay", "-1"], ["--train.weight_decay", ">= 0"]),
    (["--trainer.precision", "65-true"], ["65-true"]),
])
def test_bad_trainer_and_train_values_are_refused_before_anything_is_written(tmp_path, capsys,
                                                                             extra, words):
    out = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # keys the config lacks also warn: not what is tested
        code, err = run_train(TINY + ["--max-steps", "2", "--out", str(out)] + extra, capsys)
    assert code == 2, err
    line = next(l for l in err.splitlines() if l.startswith("error:"))
    assert all(w in line for w in words), line
    assert not (out / "config.yaml").exists() and not (out / "checkpoints").exists()


# ---- 2. device and dtype follow the batch ------------------------------------------------------
def test_training_math_runs_on_meta_tensors_and_a_cpu_constant_is_caught():
    """'meta' stands in for an accelerator: a CPU tensor mixed into meta ones raises 'not on the
    expected device', as it would on a GPU."""
    module = DiffusionTrainModule(model=TINY_MODEL, diffusion={}).to("meta")
    x0 = torch.empty(3, 1, 16, 16, device="meta")
    loss = module.training_loss(x0)                       # flips, timesteps, noise, network
    assert loss.device.type == "meta" and loss.shape == ()
    loss.backward()
    assert all(p.grad.device.type == "meta" for p in module.model.parameters())
    t = torch.full((3,), 50, device="meta", dtype=torch.long)
    val = module.diffusion_loss(module.ema.module, x0, t, torch.randn(x0.shape).to(x0))
    assert val.device.type == "meta"
    module.update_ema()                                   # the EMA step, on the device
    assert module.ema.n_averaged.device.type == "meta"

    # The check has teeth: a schedule left on the CPU is caught.
    module.abar = torch.linspace(0.999, 0.01, 1000, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="expected device|meta"):
        module.training_loss(x0)


def test_device_ema_update_equals_averaged_model():
    """update_ema (no host reads) against torch's AveragedModel averaging with the warm-up decay
    computed on the host."""
    torch.manual_seed(0)
    module = DiffusionTrainModule(model=TINY_MODEL, diffusion={}, ema_decay=0.999)

    def warmup_average(averaged, current, num_averaged):
        decay = warmup_ema_decay(int(num_averaged), 0.999)
        return decay * averaged + (1 - decay) * current
    oracle = AveragedModel(copy.deepcopy(module.model), avg_fn=warmup_average)
    for _ in range(4):
        with torch.no_grad():
            for p in module.model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        module.update_ema()
        oracle.update_parameters(module.model)
        for (name, a), b in zip(module.ema.module.state_dict().items(),
                                oracle.module.state_dict().values()):
            # lerp against decay * avg + (1 - decay) * new: a few float32 ulps apart
            assert torch.allclose(a, b, rtol=0, atol=1e-6), name
        assert int(module.ema.n_averaged) == int(oracle.n_averaged)
    # The first update is an exact copy, as AveragedModel's.
    fresh = DiffusionTrainModule(model=TINY_MODEL, diffusion={})
    with torch.no_grad():
        for p in fresh.model.parameters():
            p.mul_(1.5)
    fresh.update_ema()
    assert all(torch.equal(a, b) for a, b in zip(fresh.ema.module.parameters(), fresh.model.parameters()))


def test_float64_run_keeps_float64_weights_and_samples(tmp_path):
    out = tmp_path / "run"
    train_script.main(TINY + ["--max-steps", "2", "--out", str(out), "--trainer.precision", "64-true",
                              "--train.sample_every", "2", "--train.sample_timesteps", "3",
                              "--train.sample_count", "2", "--train.checkpoint_every", "2"])
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    weights = {k: v for k, v in ckpt["state_dict"].items() if v.is_floating_point()}
    assert {v.dtype for v in weights.values()} == {torch.float64}
    assert all(v.isfinite().all() for v in weights.values())
    assert ckpt["global_step"] == 2 and int(ckpt["state_dict"]["ema.n_averaged"]) == 2
    ema = torch.load(out / "ema.pt", weights_only=True)
    assert all(v.dtype == torch.float64 for v in ema.values() if v.is_floating_point())


# ---- 3. resume -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("resume") / "run"
    train_script.main(TINY + ["--max-steps", "2", "--train.checkpoint_every", "2", "--out", str(out)])
    return out


def _copy(run: Path, dest: Path) -> Path:
    import shutil
    shutil.copytree(run, dest)
    return dest


@pytest.mark.parametrize("extra, named", [
    (["--lr", "0.5"], ["train.lr (saved 0.001, now 0.5)"]),
    (["--train.ema_decay", "0.99", "--batch-size", "2"],
     ["train.ema_decay (saved 0.999, now 0.99)", "data.batch_size (saved 4, now 2)"]),
    (["--trainer.precision", "64-true"], ["trainer.precision (saved '32-true', now '64-true')"]),
])
def test_resume_with_changed_settings_is_refused_naming_each(finished_run, tmp_path, capsys,
                                                              extra, named):
    run = _copy(finished_run, tmp_path / "run")
    before = tree_hashes(run)
    code, err = run_train(TINY + ["--max-steps", "4", "--out", str(run), "--resume"] + extra, capsys)
    assert code == 2
    line = next(l for l in err.splitlines() if l.startswith("error:"))
    assert "cannot resume with changed settings" in line and all(n in line for n in named), line
    assert "--out NEW_FOLDER" in line
    assert tree_hashes(run) == before


def test_resume_with_more_steps_trains_on_and_records_it(finished_run, tmp_path, capsys):
    run = _copy(finished_run, tmp_path / "run")
    saved_config = (run / "config.yaml").read_bytes()
    code, err = run_train(TINY + ["--max-steps", "2", "--out", str(run), "--resume"], capsys)
    assert code == 2 and "has trained 2 steps already" in err and "--max-steps above 2" in err

    code, err = run_train(TINY + ["--max-steps", "3", "--out", str(run), "--resume",
                                  "--train.checkpoint_every", "5"], capsys)
    assert code == 0, err
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3
    assert (run / "config.yaml").read_bytes() == saved_config      # the run's start, untouched
    (record,) = yaml.safe_load((run / "resumes.yaml").read_text())
    assert record["from_step"] == 2
    assert record["changed"] == {"train.max_steps": {"saved": 2, "now": 3},
                                 "train.checkpoint_every": {"saved": 2, "now": 5},
                                 # the run was copied here: where it lives is no setting
                                 "train.out": {"saved": str(finished_run), "now": str(run)}}


# ---- 4. streamed data ------------------------------------------------------------------------
def test_folder_of_300_images_is_decoded_lazily(tmp_path, monkeypatch):
    folder = tmp_path / "pngs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(300):
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    decoded: list[int] = []
    real = folders._decode

    def counting(files, *args, **kwargs):
        decoded.append(len(files))
        return real(files, *args, **kwargs)

    monkeypatch.setattr(folders, "_decode", counting)
    data = ImageDataModule(name=f"folder:{folder}", resolution=8, channels=1, batch_size=4,
                           steps_per_epoch=3, val_images=5)
    data.setup("fit")
    assert sum(decoded) <= 2                      # one image per split, to check the format
    assert len(data.train_set) + len(folders.split_files(folders.image_files(folder), "test")) == 300
    assert len(data.eval_set) == 5

    loader = data.train_dataloader()
    batches = list(loader)
    assert len(batches) == 3                      # steps_per_epoch, drawn with replacement
    (x0,) = batches[0]
    assert x0.shape == (4, 1, 8, 8) and x0.dtype == torch.float32
    assert -1 <= x0.min() and x0.max() <= 1
    assert sum(decoded) <= 2 + 3 * 4              # only the images served were decoded
    (v,) = next(iter(data.val_dataloader()))
    assert v.shape == (4, 1, 8, 8)


def test_bundled_faces_stay_in_memory():
    data = ImageDataModule(name="faces", resolution=16, channels=1, batch_size=4, steps_per_epoch=2)
    data.setup("fit")
    assert isinstance(data.train_set, TensorImages) and data.train_set.images.shape[1:] == (1, 16, 16)
