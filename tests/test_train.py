"""train.py end to end on a shrunken faces config: files written, TensorBoard logs, resume, seeds,
EMA warm-up, CLI errors, and Lightning checkpoints read back by load_weights.

Every run is the real pipeline (train.main -> deqlit.cli.parse -> run_training -> Lightning) on the
real faces data, only with a tiny UNet (ch 16, two levels, 16x16) and a handful of steps.
"""
from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from deqlit.config import ConfigError, apply_overrides, load_config, set_path
from deqlit.lit.ema import make_ema, update_ema, warmup_ema_decay
from deqlit.models.loading import load_weights
from deqlit.models.unet import DDIMUNet

REPO = Path(__file__).resolve().parent.parent
FACES_YAML = REPO / "configs" / "faces.yaml"

from tests.tiny import RES, SAMPLE_COUNT, TINY, train_script  # noqa: E402  (the shrunken faces config)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny convolutions gain nothing from threads, and on a busy machine intra-op threads spin
    against other processes: measured 3.8 s for one forward+backward with 2 threads, 0.02 s
    with 1."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_argv(out: Path, max_steps: int, *extra: str, seed: int | None = None) -> list[str]:
    argv = ["--data", "faces", "--max-steps", str(max_steps), "--batch-size", "8", "--out", str(out)]
    if seed is not None:
        argv += ["--seed", str(seed)]
    for key, value in TINY.items():
        argv += [f"--{key}", value]
    return argv + list(extra)


def train(out: Path, max_steps: int, *extra: str, seed: int | None = None) -> Path:
    train_script.main(tiny_argv(out, max_steps, *extra, seed=seed))
    return out


def expected_config(out: Path, max_steps: int) -> dict:
    """configs/faces.yaml with the TINY overrides and the named flags applied, built by hand, and
    resolved (every section filled in with its defaults: what a run saves)."""
    from deqlit.runs.sections import resolve
    cfg = resolve(load_config(FACES_YAML), "train")
    cfg = apply_overrides(cfg, [arg for key, value in TINY.items() for arg in (f"--{key}", value)])
    set_path(cfg, "train.max_steps", max_steps)
    set_path(cfg, "data.batch_size", 8)
    set_path(cfg, "train.out", str(out))
    return resolve(cfg, "train")


def events(out: Path) -> list[Path]:
    """TensorBoard event files of the run, oldest first (one per fit: a resume adds one)."""
    files = sorted((out / "tb" / "version_0").glob("events.out.tfevents.*"),
                   key=lambda p: int(p.name.rsplit(".", 1)[-1]))
    assert files, f"no TensorBoard event file under {out / 'tb' / 'version_0'}"
    return files


def read_events(path: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(path), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def checkpoint(out: Path) -> dict:
    # A Lightning checkpoint holds hparams and loop state, not only tensors: our own file.
    return torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)


def ema_file(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "ema.pt", map_location="cpu", weights_only=True)


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def run4(tmp_path_factory) -> Path:
    """One 4-step run shared by the read-only tests below."""
    return train(tmp_path_factory.mktemp("run4"), 4)


# ---- 1. what a run writes ----------------------------------------------------------------------
def test_run_writes_checkpoint_ema_config_and_tensorboard_logs(run4):
    assert (run4 / "checkpoints" / "last.ckpt").is_file()
    assert (run4 / "ema.pt").is_file()

    with open(run4 / "config.yaml") as fh:
        saved = yaml.safe_load(fh)
    assert saved == expected_config(run4, 4)
    assert saved["model"]["ch_mult"] == [1, 2] and saved["model"]["attn_resolutions"] == []
    assert saved["model"]["ch"] == 16 and saved["train"]["max_steps"] == 4
    assert saved["data"]["batch_size"] == 8 and saved["train"]["out"] == str(run4)
    assert saved["train"]["lr"] == load_config(FACES_YAML)["train"]["lr"]  # not overridden

    ckpt = checkpoint(run4)
    assert ckpt["global_step"] == 4
    assert ckpt["hyper_parameters"]["model"]["ch"] == 16

    (event_file,) = events(run4)
    acc = read_events(event_file)
    tags = acc.Tags()
    assert {"train/loss", "val/denoise_mse"} <= set(tags["scalars"])
    assert "hp_metric" not in tags["scalars"]      # TensorBoardLogger's placeholder -1: turned off
    assert "samples" in tags["images"]
    # One train/loss point per optimizer step (Lightning numbers them from 0), all finite.
    losses = acc.Scalars("train/loss")
    assert [e.step for e in losses] == [0, 1, 2, 3]
    assert all(0 < e.value < float("inf") for e in losses)
    # Validation runs at the end of each 3-step epoch: once in 4 steps.
    assert len(acc.Scalars("val/denoise_mse")) == 1
    # Samples every 3 steps, a grid of sample_count images in one row of 4 (make_grid pads by 2).
    (image,) = acc.Images("samples")
    assert image.step == 3
    assert (image.width, image.height) == (SAMPLE_COUNT * (RES + 2) + 2, RES + 4)


# ---- 2. resume ---------------------------------------------------------------------------------
def test_resume_continues_steps_loss_history_and_ema(tmp_path, capsys):
    out = train(tmp_path, 4)
    # The run ends by saying what it wrote and where its curves are.
    printed = capsys.readouterr().out.splitlines()
    assert printed[-3].startswith("trained 4 steps (last loss ")
    assert printed[-2] == (f"wrote {out / 'ema.pt'} (the EMA weights of step 4: --ckpt of sample.py and "
                           f"invert.py) and {out / 'checkpoints' / 'last.ckpt'} (the same command with "
                           f"--resume continues it)")
    assert printed[-1] == (f"view the curves: tensorboard --logdir {out / 'tb'}; EMA samples every 3 "
                           f"steps are its image 'samples'")
    before = checkpoint(out)
    first_steps = [e.step for e in read_events(events(out)[0]).Scalars("train/loss")]

    train(out, 6, "--resume")
    after = checkpoint(out)
    assert after["global_step"] == 6
    assert "the EMA weights of step 6" in capsys.readouterr().out

    first_file, resumed_file = events(out)  # the resumed fit writes a second event file
    resumed = read_events(resumed_file)
    resumed_steps = [e.step for e in resumed.Scalars("train/loss")]
    # The history continues where it stopped (steps 5 and 6 are logged as 4 and 5), not from 0.
    assert resumed_steps == [max(first_steps) + 1, max(first_steps) + 2] == [4, 5]
    assert [e.step for e in resumed.Images("samples")] == [6]
    # The weights really were restored: training on, not from a fresh init.
    restored = {k: v for k, v in after["state_dict"].items() if k.startswith("model.")}
    fresh = {k: v for k, v in before["state_dict"].items() if k.startswith("model.")}
    assert not same_weights(restored, fresh)

    # The EMA counter was restored and kept counting, one update per optimizer step: the EMA is
    # updated in optimizer_step, before ModelCheckpoint saves in on_train_batch_end, so no
    # checkpoint is an update behind its weights and no resume loses an update.
    assert int(before["state_dict"]["ema.n_averaged"]) == before["global_step"] == 4
    assert int(after["state_dict"]["ema.n_averaged"]) == after["global_step"] == 6
    # ema.pt is exported with each checkpoint: it holds the final EMA, not an earlier one.
    ema_in_ckpt = {k[len("ema.module."):]: v for k, v in after["state_dict"].items()
                   if k.startswith("ema.module.")}
    assert same_weights(ema_in_ckpt, ema_file(out))


# ---- 3. seeds ----------------------------------------------------------------------------------
def test_same_seed_reproduces_weights_and_other_seed_differs(tmp_path):
    a = ema_file(train(tmp_path / "a", 2, seed=7))
    b = ema_file(train(tmp_path / "b", 2, seed=7))
    c = ema_file(train(tmp_path / "c", 2, seed=8))
    assert same_weights(a, b)
    assert a.keys() == c.keys() and not same_weights(a, c)


# ---- 4. EMA warm-up ----------------------------------------------------------------------------
def test_warmup_ema_decay_values():
    assert warmup_ema_decay(0, 0.999) == pytest.approx(0.1)
    assert warmup_ema_decay(1, 0.999) == pytest.approx(2 / 11)
    assert warmup_ema_decay(90, 0.999) == pytest.approx(0.91)
    assert warmup_ema_decay(8000, 0.999) == pytest.approx(8001 / 8010)  # still below the cap
    assert warmup_ema_decay(10 ** 6, 0.999) == 0.999
    assert warmup_ema_decay(10 ** 6, 0.5) == 0.5
    decays = [warmup_ema_decay(n, 0.999) for n in range(0, 20000, 50)]
    assert decays == sorted(decays)  # never decreases


def test_ema_update_moves_by_the_warmup_fraction():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    ema = make_ema(model)
    assert not any(p.requires_grad for p in ema.parameters())

    # the first update (n_averaged 0) copies the weights, as torch's AveragedModel does (n_averaged 0) ...
    with torch.no_grad():
        model.weight.add_(1.0)
    update_ema(ema, model, 0.999)
    assert int(ema.n_averaged) == 1
    assert torch.equal(ema.module.weight, model.weight)

    # ... and averages from then on, with decay (1 + n) / (10 + n) for the n updates so far.
    for n in (1, 2):
        old = ema.module.weight.detach().clone()
        with torch.no_grad():
            model.weight.add_(torch.randn_like(model.weight))
        new = model.weight.detach().clone()
        update_ema(ema, model, 0.999)
        decay = (1 + n) / (10 + n)
        assert torch.allclose(ema.module.weight, decay * old + (1 - decay) * new, atol=1e-6)
        assert torch.allclose(ema.module.weight - old, (1 - decay) * (new - old), atol=1e-6)
        assert int(ema.n_averaged) == n + 1

    # The cap applies once warm-up would exceed it.
    capped = make_ema(model)
    update_ema(capped, model, 0.05)
    old = capped.module.bias.detach().clone()
    with torch.no_grad():
        model.bias.add_(2.0)
    update_ema(capped, model, 0.05)  # warm-up would give 2/11 > 0.05
    assert torch.allclose(capped.module.bias, 0.05 * old + 0.95 * model.bias, atol=1e-6)


# ---- 5. CLI errors and types -------------------------------------------------------------------
def test_resume_without_checkpoint_names_the_path(tmp_path):
    missing = tmp_path / "checkpoints" / "last.ckpt"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        train(tmp_path, 2, "--resume")
    explicit = tmp_path / "nowhere.ckpt"
    with pytest.raises(FileNotFoundError, match=re.escape(str(explicit))):
        train(tmp_path, 2, "--resume", str(explicit))


def test_unknown_override_section_is_a_clear_error(tmp_path):
    with pytest.raises(KeyError, match=r"unknown config section 'nosuch' in --nosuch\.key.*train"):
        train(tmp_path, 2, "--nosuch.key", "1")
    with pytest.raises(ConfigError, match=r"unrecognized argument '--bogus'.*--section\.key value"):
        train(tmp_path, 2, "--bogus", "1")
    with pytest.raises(ConfigError, match=r"--train\.lr needs a value"):
        train(tmp_path, 2, "--train.lr")
    assert not (tmp_path / "config.yaml").exists()  # rejected before anything ran


def test_override_values_keep_their_yaml_types():
    cfg = load_config(FACES_YAML)
    before = copy.deepcopy(cfg)
    new = apply_overrides(cfg, ["--model.ch_mult", "[1,2]", "--train.hflip", "false",
                                "--train.lr=0.0002", "--model.ch", "16", "--data.name", "digits"])
    assert new["model"]["ch_mult"] == [1, 2] and isinstance(new["model"]["ch_mult"], list)
    assert new["train"]["hflip"] is False
    assert new["train"]["lr"] == 0.0002 and isinstance(new["train"]["lr"], float)
    assert new["model"]["ch"] == 16 and isinstance(new["model"]["ch"], int)
    assert new["data"]["name"] == "digits"
    assert cfg == before  # the loaded config is not modified in place


def test_override_of_a_key_no_section_takes_is_refused_with_the_close_match():
    from deqlit.runs.sections import resolve
    cfg = apply_overrides(resolve(load_config(FACES_YAML)), ["--inversion.lrr", "0.1"])
    with pytest.raises(ConfigError, match=r"unknown key 'lrr' in section inversion.*did you mean --inversion\.lr\b"):
        resolve(cfg)
    assert resolve(apply_overrides(resolve(load_config(FACES_YAML)), ["--inversion.lr", "0.1"]))["inversion"]["lr"] == 0.1


def test_override_exponent_float_is_a_float():
    """YAML 1.1 would read `1e-4` (no dot) as a string, and AdamW would fail on it."""
    cfg = apply_overrides(load_config(FACES_YAML), ["--train.lr", "1e-4", "--model.ch_mult", "[1e0, 2]"])
    assert cfg["train"]["lr"] == 1e-4 and isinstance(cfg["train"]["lr"], float)
    assert cfg["model"]["ch_mult"] == [1.0, 2]


# ---- 6. Lightning checkpoints through load_weights ---------------------------------------------
def test_load_weights_reads_ema_from_lightning_checkpoint(run4):
    with open(run4 / "config.yaml") as fh:
        cfg_model = yaml.safe_load(fh)["model"]
    ckpt_path = run4 / "checkpoints" / "last.ckpt"
    exported = ema_file(run4)

    ema_model = load_weights(DDIMUNet(**cfg_model), ckpt_path, ema=True)
    assert same_weights({k: v.detach() for k, v in ema_model.state_dict().items()}, exported)

    # ema=False reads the raw weights, which after 4 steps are not the EMA.
    raw_model = load_weights(DDIMUNet(**cfg_model), ckpt_path, ema=False)
    raw = {k: v.detach() for k, v in raw_model.state_dict().items()}
    assert raw.keys() == exported.keys() and not same_weights(raw, exported)
