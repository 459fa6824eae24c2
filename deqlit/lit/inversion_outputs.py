"""What an inversion run writes: one part file per finished batch, then the merged results.

RUN/latents/part-XXXXXXXX.pt   one per batch (XXXXXXXX = its first image index), written atomically
                               by InversionWriter as soon as the batch is done: indices, latents,
                               noise, losses, reconstructions, per-image metrics and the chain.
RUN/latents/partial-*.pt       the state of an unfinished batch (every save_every steps, and on
                               an interrupt): --resume continues it from there.
RUN/latents.pt, metrics.json, grid.png, loss_curve.png
                               merged from the parts when the run ends (latents.pt and the grid
                               for runs of at most `merge_limit` images).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torchvision
from lightning.pytorch.callbacks import BasePredictionWriter
from torchmetrics.functional import mean_squared_error
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from deqlit.diffusion.gaussianity import kurtosis, lag1_autocorrelation
from deqlit.guards import atomic_torch_save

PART_GLOB = "part-*.pt"


def part_path(folder: Path, first_index: int) -> Path:
    return folder / f"part-{int(first_index):08d}.pt"


def partial_path(folder: Path, first_index: int) -> Path:
    return folder / f"partial-{int(first_index):08d}.pt"


def per_image_metrics(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Metrics per image of a batch result (BatchInverter.result()): losses of the start and of
    the end, MSE/PSNR/SSIM of the exact chain's reconstruction, how Gaussian the latent is."""
    targets, recon = result["targets"], result["reconstructions"].clamp(-1, 1)
    initial = result["initial"].clamp(-1, 1)
    x_T = result["x_T"]
    autocorr, kurt = lag1_autocorrelation(x_T), kurtosis(x_T)
    out = []
    for b, index in enumerate(result["indices"].tolist()):
        t, r, i0 = targets[b:b + 1], recon[b:b + 1], initial[b:b + 1]
        finite = math.isfinite(float(result["final_loss"][b]))
        out.append({
            "index": index,
            "min_loss": float(result["min_loss"][b]),
            "final_loss": float(result["final_loss"][b]) if finite else None,
            "exact_loss": float(result["exact_loss"][b]),
            "initial_loss": float(result["initial_loss"][b]),
            "initial_psnr": float(peak_signal_noise_ratio(i0, t, data_range=2.0)),
            "mse": float(mean_squared_error(r, t)),
            "psnr": float(peak_signal_noise_ratio(r, t, data_range=2.0)),
            "ssim": float(structural_similarity_index_measure(r, t, data_range=2.0)),
            "latent_autocorrelation": float(autocorr[b]),
            "latent_kurtosis": float(kurt[b]),
            "steps": int(result["steps"]),
            # The images of a batch are optimized together: each was worked on the whole time.
            "seconds": float(result["seconds"]),
        })
        report = result.get("exact_report")
        if report:   # the exact inverse solve that gave the start (init 'exact')
            out[-1].update(exact_solve_residual=report["image_residual"][b],
                           exact_solve_converged=bool(report["image_converged"][b]),
                           exact_solve_network_evals=int(report["network_evals"][b]),
                           exact_solve_depth=int(report["depth"]))
    return out


class InversionWriter(BasePredictionWriter):
    """Writes each finished batch to RUN/latents/part-*.pt (atomically) and drops its partial."""

    def __init__(self, folder: Path, chain: dict[str, Any], settings: dict[str, Any]):
        super().__init__(write_interval="batch")
        self.folder, self.chain, self.settings = folder, chain, settings

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx,
                           dataloader_idx=0) -> None:
        if not getattr(pl_module, "writes_outputs", True):   # another time shard of the replica writes
            return
        result = dict(prediction)
        result["metrics"] = per_image_metrics(result)
        result["chain"], result["settings"] = self.chain, self.settings
        first = int(result["indices"][0])
        atomic_torch_save(result, part_path(self.folder, first))
        partial_path(self.folder, first).unlink(missing_ok=True)
        pl_module.log_batch_result(result)


def read_result(path: Path) -> dict[str, Any]:
    """A part or partial file; a corrupt one is named with how to recover (its batch is redone)."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(data, dict) or "indices" not in data:
            raise ValueError("not a batch result")
        return data
    except Exception as err:  # torch raises RuntimeError, UnpicklingError, EOFError... by cause
        from deqlit.guards import CorruptCheckpointError
        raise CorruptCheckpointError(
            f"cannot resume: {path} is corrupt or truncated ({type(err).__name__}). Delete it and "
            f"run --resume again: only its batch is computed again") from err


def finished_indices(folder: Path) -> set[int]:
    """The image indices whose results are on disk (their part files)."""
    done: set[int] = set()
    for path in sorted(folder.glob(PART_GLOB)):
        done.update(int(i) for i in read_result(path)["indices"])
    return done


def load_parts(folder: Path) -> list[dict[str, Any]]:
    parts = [read_result(p) for p in sorted(folder.glob(PART_GLOB))]
    return sorted(parts, key=lambda p: int(p["indices"][0]))


def merge_outputs(out: Path, method: str, T: int, merge_limit: int) -> dict[str, Any]:
    """metrics.json (always), latents.pt + grid.png + loss_curve.png (runs of <= merge_limit
    images) from the part files. Returns the metrics dict."""
    parts = load_parts(out / "latents")
    images = sorted((m for p in parts for m in p["metrics"]), key=lambda m: m["index"])
    means: dict[str, Optional[float]] = {}
    for key in ("min_loss", "final_loss", "exact_loss", "initial_loss", "initial_psnr", "mse", "psnr",
                "ssim", "latent_autocorrelation", "latent_kurtosis", "seconds", "exact_solve_residual",
                "exact_solve_network_evals"):
        values = [m[key] for m in images if m.get(key) is not None]
        means[f"mean_{key}"] = sum(values) / len(values) if values else None
    metrics = {"settings": parts[0]["settings"] if parts else {},
               "chain": parts[0]["chain"] if parts else {}, "num_images": len(images),
               **means, "images": images}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    if not parts or len(images) > merge_limit:
        return metrics
    order = torch.cat([p["indices"] for p in parts]).argsort()

    def cat(key: str, dim: int = 0) -> Optional[torch.Tensor]:
        if parts[0][key] is None:
            return None
        return torch.cat([p[key] for p in parts], dim=dim).index_select(dim, order)
    merged = {"x_T": cat("x_T"), "noise": cat("noise", dim=1), "indices": cat("indices"),
              "targets": cat("targets"), "reconstructions": cat("reconstructions"),
              "initial": cat("initial"), "chain": parts[0]["chain"], "settings": parts[0]["settings"]}
    atomic_torch_save(merged, out / "latents.pt")
    save_grid(merged["targets"], merged["initial"], merged["reconstructions"], out / "grid.png")
    histories = [p["loss_history"] for p in parts]
    plot_loss_curves(histories, out / "loss_curve.png", f"{method} inversion, T = {T}")
    return metrics


def make_grid(targets: torch.Tensor, initial: torch.Tensor, final: torch.Tensor,
              max_images: int = 16) -> torch.Tensor:
    """Rows of (target | initial | final) reconstructions, 4 images per row, in [0, 1]."""
    n = min(max_images, len(targets))
    triples = torch.stack([targets[:n], initial[:n], final[:n]], dim=1).flatten(0, 1)
    return torchvision.utils.make_grid((triples.clamp(-1, 1) + 1) / 2, nrow=3 * 4, padding=2)


def save_grid(targets: torch.Tensor, initial: torch.Tensor, final: torch.Tensor, path: Path) -> None:
    torchvision.utils.save_image(make_grid(targets, initial, final), path)


def plot_loss_curves(histories: Sequence[torch.Tensor], path: Path, title: str) -> None:
    """One thin line per image and the mean over images, loss against optimization step."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    width = max(h.shape[1] for h in histories)
    rows = torch.full((sum(h.shape[0] for h in histories), width), math.nan)
    r = 0
    for h in histories:
        rows[r:r + h.shape[0], :h.shape[1]] = h
        r += h.shape[0]
    fig, ax = plt.subplots(figsize=(6, 4))
    for row in rows[:64]:
        ax.plot(row.numpy(), color="tab:blue", alpha=0.25, lw=0.8)
    ax.plot(torch.nanmean(rows, 0).numpy(), color="black", lw=2, label="mean")
    ax.set_yscale("log")
    ax.set_xlabel("optimization step")
    ax.set_ylabel("loss (squared Frobenius, [-1, 1] scale)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
