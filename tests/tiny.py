"""A tiny end-to-end setup for command tests: a folder of 8x8 PNGs, a small checkpoint, a config."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from tests.conftest import perturbed_unet

REPO = Path(__file__).resolve().parent.parent


def load_script(relative: str, name: str):
    """Import a script of the repository (train.py, bench/*.py) as a module."""
    import importlib.util
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


def error_line(err: str) -> str:
    """The one `error:` line of a script's stderr (and no traceback)."""
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]
