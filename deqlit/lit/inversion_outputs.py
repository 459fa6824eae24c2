"""What an inversion run writes: one part file per finished batch, then the merged results.

RUN/latents/part-XXXXXXXX.pt   one per batch (XXXXXXXX = its first image index), written atomically
                               by InversionWriter as soon as the batch is done: indices, latents,
                               noise, losses, reconstructions, per-image metrics and the chain.
RUN/latents/partial-*.pt       the state of an unfinished batch (every save_every steps, and on
                               an interrupt): --resume continues it from there.
RUN/latents.pt, metrics.json, grid.png, curves.png
                               merged from the parts when the run ends (latents.pt, the grid and
                               the curves for runs of at most `merge_limit` images; what the grid
                               and the curves show: lit/inversion_figures.py).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torchmetrics.functional import mean_squared_error
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from deqlit.diffusion.gaussianity import kurtosis, lag1_autocorrelation
from deqlit.guards import atomic_torch_save
from deqlit.lit.inversion_figures import grid_inputs, plot_curves, save_inversion_picture, solve_curves

PART_GLOB = "part-*.pt"
# Per-image scores of a restoration task (restoration_metrics), averaged like the others.
RESTORATION_KEYS = ("hole_psnr", "hole_ssim", "initial_hole_psnr", "input_hole_psnr", "restored_psnr",
                    "restored_ssim", "input_psnr", "initial_restored_psnr")
CURVES = "curves.png"


def part_path(folder: Path, first_index: int) -> Path:
    return folder / f"part-{int(first_index):08d}.pt"


def partial_path(folder: Path, first_index: int) -> Path:
    return folder / f"partial-{int(first_index):08d}.pt"


def per_image_metrics(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Metrics per image of a batch result (BatchInverter.result()): losses of the start and of
    the end, MSE/PSNR/SSIM of the exact chain's reconstruction, how Gaussian the latent is, and
    for a restoration task the scores of the restored image (restoration_metrics)."""
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
            # The Adam steps this image took (a batch of another version: the batch's).
            "steps": int(result["image_steps"][b]) if "image_steps" in result else int(result["steps"]),
            # The images of a batch are optimized together: each was worked on the whole time.
            "seconds": float(result["seconds"]),
        })
        if result.get("stop_below") is not None:   # early_stop_loss scaled to what the loss sees
            out[-1]["early_stop_threshold"] = float(result["stop_below"][b])
        out[-1].update(restoration_metrics(result, b))
        report = result.get("exact_report")
        if report:   # the exact inverse solve that gave the start (init 'exact')
            out[-1].update(exact_solve_residual=report["image_residual"][b],
                           exact_solve_converged=bool(report["image_converged"][b]),
                           exact_solve_network_evals=int(report["network_evals"][b]),
                           exact_solve_depth=int(report["depth"]))
    return out


def masked_psnr(x: torch.Tensor, target: torch.Tensor, where: Optional[torch.Tensor]) -> float:
    """PSNR (dB, data range 2: images in [-1, 1]) of x (1, C, H, W) on the pixels `where`
    (1, 1, H, W) bool, all channels of each; the whole image when `where` is None."""
    if where is not None:
        x, target = x[where.expand_as(x)], target[where.expand_as(target)]
    return float(peak_signal_noise_ratio(x, target, data_range=2.0))


def masked_ssim(x: torch.Tensor, target: torch.Tensor, where: Optional[torch.Tensor]) -> float:
    """SSIM of x (1, C, H, W): torchmetrics' SSIM map (11x11 Gaussian windows, data range 2)
    averaged over the pixels `where` (1, 1, H, W) bool; the whole image's SSIM when None."""
    whole, ssim_map = structural_similarity_index_measure(x, target, data_range=2.0, return_full_image=True)
    return float(whole if where is None else ssim_map[where.expand_as(ssim_map)].mean())


def restoration_metrics(result: dict[str, Any], b: int) -> dict[str, float]:
    """Image b's scores of a restoration (task inpaint or super-resolution; {} for reconstruct):
    PSNR and SSIM of `restored` (the chain's x_0 projected onto A(x) = y) on the whole image and,
    inpainting, on the hidden pixels alone (hole_*; the known ones are the target's there); the
    hole PSNR of the start's image (initial_hole_psnr), and the PSNRs of the degraded input as
    shown, the hole filled or y upsampled bicubically (input_*): the guess without the model; and
    super-resolution, the PSNR of the start's image projected as `restored` is
    (initial_restored_psnr: what the Adam steps are measured against)."""
    if result.get("task", "reconstruct") == "reconstruct":
        return {}
    t = result["targets"][b:b + 1]
    restored = result["restored"][b:b + 1].clamp(-1, 1)
    shown = result["observed_shown"][b:b + 1].clamp(-1, 1)
    unknown = result.get("unknown")
    hole = None if unknown is None else unknown[b:b + 1]
    scores = {"restored_psnr": masked_psnr(restored, t, None), "restored_ssim": masked_ssim(restored, t, None),
              "input_psnr": masked_psnr(shown, t, None)}
    if hole is None and result.get("initial_restored") is not None:
        initial_restored = result["initial_restored"][b:b + 1].clamp(-1, 1)
        scores["initial_restored_psnr"] = masked_psnr(initial_restored, t, None)
    if hole is not None:      # projecting the start would change its known pixels only
        initial = result["initial"][b:b + 1].clamp(-1, 1)
        scores.update(hole_psnr=masked_psnr(restored, t, hole), hole_ssim=masked_ssim(restored, t, hole),
                      initial_hole_psnr=masked_psnr(initial, t, hole),
                      input_hole_psnr=masked_psnr(shown, t, hole))
    return scores


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


# Per-image tensors of a part file: dim 0 is the image, except the injected noise (T, N, ...).
ROW_KEYS = ("x_T", "indices", "reconstructions", "targets", "initial", "observed_shown", "restored",
            "unknown")


def join_parts(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Part files' payloads as one, its images in index order: every per-image tensor that all
    parts hold (ROW_KEYS; noise along dim 1), the first part's chain, settings and task."""
    order = torch.cat([p["indices"] for p in parts]).argsort()
    merged: dict[str, Any] = {"chain": parts[0]["chain"], "settings": parts[0].get("settings"),
                              "noise": None, **{key: None for key in ROW_KEYS[:5]}}
    task = parts[0].get("task", "reconstruct")
    if task != "reconstruct":     # what the restoration saw and made (see BatchInverter.result)
        merged.update(task=task, **{key: None for key in ROW_KEYS[5:]})
    for key, dim in [*((k, 0) for k in ROW_KEYS), ("noise", 1)]:
        if all(p.get(key) is not None for p in parts):
            merged[key] = torch.cat([p[key] for p in parts], dim=dim).index_select(dim, order)
    return merged


def merge_outputs(out: Path, method: str, T: int, merge_limit: int) -> dict[str, Any]:
    """metrics.json (always), latents.pt + grid.png + curves.png (runs of <= merge_limit
    images) from the part files. Returns the metrics dict."""
    parts = load_parts(out / "latents")
    images = sorted((m for p in parts for m in p["metrics"]), key=lambda m: m["index"])
    means: dict[str, Optional[float]] = {}
    for key in ("min_loss", "final_loss", "exact_loss", "initial_loss", "initial_psnr", "mse", "psnr",
                "ssim", "latent_autocorrelation", "latent_kurtosis", "seconds", "exact_solve_residual",
                "exact_solve_network_evals", *[k for k in RESTORATION_KEYS if any(k in m for m in images)]):
        values = [m[key] for m in images if m.get(key) is not None]
        means[f"mean_{key}"] = sum(values) / len(values) if values else None
    metrics = {"settings": parts[0]["settings"] if parts else {},
               "chain": parts[0]["chain"] if parts else {}, "num_images": len(images),
               **means, "images": images}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    if not parts or len(images) > merge_limit:
        return metrics
    merged = join_parts(parts)
    atomic_torch_save(merged, out / "latents.pt")
    save_inversion_picture(out / "grid.png", **grid_inputs(merged, images, method, T))
    evals = [(m["exact_solve_network_evals"], m["psnr"]) for m in images
             if m.get("exact_solve_network_evals") is not None]
    plot_curves(out / CURVES, f"{method} inversion, T = {T}, {len(images)} images",
                [p["loss_history"] for p in parts], solve_curves([p.get("exact_report") for p in parts]),
                ([e for e, _ in evals], [q for _, q in evals]) if evals else None)
    return metrics
