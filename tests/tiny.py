"""The tests' shared harness: a tiny end-to-end setup (a folder of 8x8 PNGs, a small checkpoint, a
config), train.py's and the joint run's tiny configs, an in-process script runner, StopAfter."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
import yaml
from lightning.pytorch.callbacks import Callback
from PIL import Image

from tests.conftest import perturbed_unet

REPO = Path(__file__).resolve().parent.parent


def load_script(relative: str, name: str):
    """Import a script of the repository (train.py, bench/*.py) as a module. A benchmark imports its
    siblings (bench_csv) as `python bench/X.py` would: with bench/ on sys.path."""
    import importlib.util
    import sys
    folder = str((REPO / relative).parent)
    if relative.startswith("bench/") and folder not in sys.path:
        sys.path.append(folder)
    spec = importlib.util.spec_from_file_location(name, REPO / relative)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_setup(tmp_path: Path, n_images: int = 5) -> Path:
    """A folder of 8x8 PNGs, a tiny checkpoint and a config for them; returns the config path."""
    folder = tmp_path / "images"
    folder.mkdir()
    gen = np.random.default_rng(0)
    for i in range(n_images):
        Image.fromarray(gen.integers(0, 256, (8, 8), dtype=np.uint8), mode="L").save(folder / f"{i:02d}.png")
    model = perturbed_unet(seed=1, dtype=torch.float32, scale=0.1)
    torch.save(model.state_dict(), tmp_path / "tiny.pt")
    cfg = yaml.safe_load((REPO / "configs" / "faces.yaml").read_text())
    cfg["data"].update(name=f"folder:{folder}", resolution=8, channels=1)
    cfg["model"] = dict(ch=8, out_ch=1, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[4],
                        dropout=0.0, in_channels=1, resolution=8, resamp_with_conv=True, norm_groups=2)
    cfg["checkpoint"] = {"path": str(tmp_path / "tiny.pt"), "ema": True}
    cfg["inversion"].update(method="deq", split="all", num_images=n_images, batch_size=2, timesteps=4, max_steps=3,
                            init="random", save_every=1, max_batch=None, out=str(tmp_path / "run"))
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path




class GradRowCounter(torch.nn.Module):
    """Wraps a noise model and counts what it evaluates while autograd is recording: all rows
    (`rows_with_grad`) and the largest batch (`largest_with_grad`)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.rows_with_grad, self.largest_with_grad = model, 0, 0

    def forward(self, x, t):
        if torch.is_grad_enabled():
            self.rows_with_grad += x.shape[0]
            self.largest_with_grad = max(self.largest_with_grad, x.shape[0])
        return self.model(x, t)


def exact_config(tmp_path: Path, n_images: int = 2) -> Path:
    """tiny_setup with the shipped configs' default inversion method and start (exact,
    ddim-inversion; max_steps 2 for the methods that step)."""
    path = tiny_setup(tmp_path, n_images=n_images)
    cfg = yaml.safe_load(path.read_text())
    cfg["inversion"].update(method="exact", init="ddim-inversion", max_steps=2)
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_cli(main, argv: list[str], script: str, capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `python SCRIPT ARGV` run in this process (cli.run_main)."""
    from deqlit.cli import run_main
    capsys.readouterr()
    try:
        run_main(main, argv, script=script)
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def run_train(argv: list[str], capsys) -> tuple[int, str]:
    """(exit code, stderr) of `python train.py ARGV`, in this process."""
    code, _, err = run_cli(train_script.main, argv, "train.py", capsys)
    return code, err


def tree_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file below folder, by relative path: a run folder left untouched or not."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def error_line(err: str) -> str:
    """The one `error:` line of a script's stderr (and no traceback)."""
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ---- train.py's tiny run (tests/test_train.py, test_curves.py) ----
RES = 16
SAMPLE_COUNT = 4
# The shrunken faces config, as the dotted overrides a user would type (values are YAML text).
# norm_groups 8 divides both channel counts (16, 32); log_every_n_steps 1 so that a 4-step run logs
# train/loss at every step (null would log every max(1, 4 // 10) = 1 step too, but the tests
# must not depend on that rule); warmup_steps 1 so that the lr is not ~0.
TINY = {
    "model.ch": "16", "model.ch_mult": "[1, 2]", "model.num_res_blocks": "1",
    "model.attn_resolutions": "[]", "model.norm_groups": "8", "model.resolution": str(RES),
    "data.resolution": str(RES),
    "train.steps_per_epoch": "3", "train.checkpoint_every": "2", "train.sample_every": "3",
    "train.sample_timesteps": "5", "train.sample_count": str(SAMPLE_COUNT),
    "train.warmup_steps": "1", "train.log_every_n_steps": "1",
}


train_script = load_script("train.py", "deqlit_train_script")


# ---- the joint run's tiny config (test_joint, test_joint_streaming, test_sharded_joint, test_curves) ----
TINY_MODEL = dict(ch=8, out_ch=1, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[4], dropout=0.0,
                  in_channels=1, resolution=8, resamp_with_conv=True, norm_groups=2)


def tiny_config(tmp_path, out: str, max_steps: int) -> dict:
    ckpt = tmp_path / "tiny.pt"
    if not ckpt.exists():
        torch.save(perturbed_unet(seed=3, scale=0.1, dtype=torch.float32).state_dict(), ckpt)
    return {"data": {"name": "faces", "resolution": 8, "channels": 1, "root": "data"},
            "model": dict(TINY_MODEL), "diffusion": {"beta_schedule": "linear", "num_diffusion_timesteps": 1000},
            "checkpoint": {"path": str(ckpt), "ema": True},
            "joint": {"split": "test", "num_images": 4, "batch_size": 2, "prior_batch_size": 4,
                      "timesteps": 3, "grad": "ift", "adjoint": {"solver": "sweep"}, "solver": "picard",
                      "max_iter": 3, "tol": 0.0, "init": "ddim-inversion", "latent_lr": 0.05,
                      "network_lr": 1e-3, "ema_decay": 0.9, "checkpoint_every": 1, "image_every": 1,
                      "compare_every": 2, "kid_every": 2, "kid_samples": 8, "out": str(tmp_path / out)},
            "trainer": {"max_steps": max_steps, "enable_progress_bar": False, "accelerator": "cpu"}}


# ---- inversion ----
class StopAfter(Callback):
    """Ctrl-C after `steps` optimization steps (Lightning then calls on_exception)."""

    def __init__(self, steps: int):
        self.steps = steps

    def on_predict_batch_start(self, trainer, module, batch, batch_idx, dataloader_idx=0):
        original = module.log_step

        def log_and_stop(inverter, loss):
            original(inverter, loss)
            if module.steps_done >= self.steps:
                raise KeyboardInterrupt
        module.log_step = log_and_stop
