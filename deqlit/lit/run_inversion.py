"""Builds and runs an inversion from a resolved config (invert.py), and writes its outputs."""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
import torchvision
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset

from deqlit.config import save_config
from deqlit.data.registry import load_images
from deqlit.lit.inversion_module import InversionModule
from deqlit.models.build import build_noise_model, resolve_checkpoint

SOLVER_KEYS = ("max_iter", "tol", "m", "lam", "beta", "relative_lam", "freeze")

# Expected here and only noise to a user: the module owns one Adam per image batch, and the frozen
# noise network stays in eval mode on purpose.
for _message in (r".*configure_optimizers.*returned `None`", r".*module\(s\) in eval mode",
                 r".*isinstance\(treespec, LeafSpec\)"):
    warnings.filterwarnings("ignore", message=_message)


class MissingInputsError(FileNotFoundError):
    """The dataset and/or the checkpoint that a run needs are not on disk."""


def save_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class SaveInversionState(Callback):
    """Writes RUN/state.pt every `every` steps, at the end, and when the run is interrupted."""

    def __init__(self, path: Path, every: int):
        self.path, self.every = path, max(1, every)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if module.steps_done() % self.every == 0:
            save_atomic(module.inversion_state(), self.path)

    def on_train_end(self, trainer, module) -> None:
        save_atomic(module.inversion_state(), self.path)

    def on_exception(self, trainer, module, exception) -> None:
        save_atomic(module.inversion_state(), self.path)


def check_inputs(cfg: dict, ckpt: Optional[str]) -> None:
    """One message naming everything that is missing: the dataset and the checkpoint."""
    from deqlit.data.folders import DatasetNotFoundError
    problems = []
    data = cfg["data"]
    if data["name"] not in ("faces", "digits"):
        try:  # reading one image finds a missing folder or file list, with the loader's own words
            load_images(data["name"], cfg["inversion"].get("split", "test"), data["resolution"],
                        data["channels"], data.get("root", "data"), limit=1)
        except DatasetNotFoundError as err:
            problems.append(str(err))
    ckpt_text = ckpt or cfg.get("checkpoint", {}).get("path")
    if ckpt_text and not resolve_checkpoint(ckpt_text).exists():
        problems.append(f"checkpoint: {resolve_checkpoint(ckpt_text)} does not exist. "
                        f"{cfg.get('checkpoint', {}).get('source', '')}".strip())
    if problems:
        raise MissingInputsError(
            "cannot start: deqlit never downloads, so these must be on this machine first.\n- "
            + "\n- ".join(problems)
            + "\nPut them there, or point elsewhere with --data.root DIR and --ckpt PATH.")


def build_module(cfg: dict) -> InversionModule:
    inv, data = cfg["inversion"], cfg["data"]
    check_inputs(cfg, None)
    model, abar, _ = build_noise_model(cfg)
    targets = load_images(data["name"], inv.get("split", "test"), data["resolution"],
                          data["channels"], data.get("root", "data"), limit=inv["num_images"])
    solver_options = {k: inv[k] for k in SOLVER_KEYS if k in inv and inv[k] is not None}
    return InversionModule(
        model, abar, targets, method=inv["method"], timesteps=inv["timesteps"], skip=inv["skip"],
        eta=inv["eta"], lr=inv["lr"], max_steps=inv["max_steps"], batch_size=inv["batch_size"],
        early_stop_loss=inv.get("early_stop_loss", 0.0), init=inv["init"], seed=inv["seed"],
        tau=inv.get("tau", 0.1), warm_start=inv.get("warm_start", True),
        solver=inv.get("solver", "anderson"), solver_options=solver_options,
        optimize_noise=inv.get("optimize_noise", False),
        grad_checkpointing=inv.get("grad_checkpointing", False), max_batch=inv.get("max_batch"))


def run_inversion(cfg: dict, resume: bool = False, progress: bool = True,
                  callbacks: Optional[list[Callback]] = None) -> tuple[InversionModule, Path]:
    inv = cfg["inversion"]
    out = Path(inv["out"])
    state_path = out / "state.pt"
    if out.exists() and state_path.exists() and not resume:
        raise FileExistsError(f"{out} holds an earlier inversion (state.pt): add --resume to "
                              f"continue it, or choose another --out")
    torch.manual_seed(inv["seed"])
    module = build_module(cfg)
    if resume:
        if not state_path.exists():
            raise FileNotFoundError(f"cannot resume: {state_path} does not exist; run without --resume")
        module.load_inversion_state(torch.load(state_path, map_location="cpu", weights_only=True))
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    remaining = module.total_steps() - module.steps_done()
    if remaining > 0:
        trainer = L.Trainer(max_epochs=1, accelerator="auto", devices=1, enable_checkpointing=False,
                            logger=TensorBoardLogger(str(out), name="tb", version=0),
                            callbacks=[SaveInversionState(state_path, inv.get("save_every", 10)), *(callbacks or [])],
                            enable_progress_bar=progress, enable_model_summary=False,
                            num_sanity_val_steps=0, log_every_n_steps=1)
        steps = DataLoader(TensorDataset(torch.arange(remaining)), batch_size=1)
        trainer.fit(module, train_dataloaders=steps)
        write_outputs(module, out, trainer.logger)
    else:
        write_outputs(module, out, None)
    return module, out


def write_outputs(module: InversionModule, out: Path, logger: Optional[TensorBoardLogger]) -> None:
    """metrics.json, latents.pt, grid.png (target | initial | final), loss_curve.png."""
    metrics = module.image_metrics()
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    torch.save({"x_T": module.best_latents.cpu(), "noise": module.best_noise.cpu() if module.eta > 0 else None,
                "targets": module.targets.cpu(), "reconstructions": module.best_recon.cpu(),
                "settings": dict(module.settings)}, out / "latents.pt")
    triples = torch.stack([module.targets, module.initial_recon, module.best_recon], dim=1)
    grid = torchvision.utils.make_grid((triples.flatten(0, 1).clamp(-1, 1) + 1) / 2, nrow=3 * 4, padding=2)
    torchvision.utils.save_image(grid, out / "grid.png")
    plot_loss_curve(module, out / "loss_curve.png")
    if logger is not None:
        logger.experiment.add_image("inversion/target|initial|final", grid, module.steps_done())
        history = module.loss_history
        for step in range(history.shape[1]):
            column = history[:, step]
            finite = column[torch.isfinite(column)]
            if len(finite):
                logger.experiment.add_scalar(f"{module.method}/mean_loss_vs_step", float(finite.mean()), step)
        logger.experiment.flush()


def plot_loss_curve(module: InversionModule, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    history = module.loss_history.cpu()
    fig, ax = plt.subplots(figsize=(6, 4))
    for row in history:
        ax.plot(row.numpy(), color="tab:blue", alpha=0.25, lw=0.8)
    ax.plot(torch.nanmean(history, 0).numpy(), color="black", lw=2, label="mean")
    ax.set_yscale("log")
    ax.set_xlabel("optimization step")
    ax.set_ylabel("loss (squared Frobenius, [-1, 1] scale)")
    ax.set_title(f"{module.method} inversion, T = {module.T}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
