"""The pictures and curves of an inversion run, for a person to read.

grid.png (and TensorBoard's inversion/grid): one row per image, labelled with its dataset index;
columns target | initial | final | latent x_T, tiles upscaled (nearest) to at least 96 px, the PSNR
of each regenerated image under it, the latent scaled to its own range (deqlit/pictures.py). A
restoration task: target | degraded input | restored | latent x_T, the PSNR on the hole
(inpainting) or on the whole image (super-resolution) under the input and the restored image.

curves.png: one panel per thing the run did:
- loss against optimization step (methods deq and baseline): a thin line per image, the mean bold;
- the exact inverse solve (method exact, or init exact): each state's residual against solver
  iteration (per step: the iterations of that state's own solve; all timesteps: the shared calls,
  with the worst over all states bold), the worst image of every batch, tol dashed;
- PSNR of the regenerated image against the network evaluations its solve took, per image.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from PIL import Image

from deqlit.pictures import as_picture, labelled_grid, save_picture

COLUMNS = ("target", "initial", "final", "latent x_T")
# A restoration task (inpaint, super-resolution): the degraded input as shown (the hole filled, or
# y upsampled bicubically) and the restored image, each with its PSNR (inpainting: on the hole).
RESTORATION_COLUMNS = ("target", "degraded input", "restored", "latent x_T")
GRID_IMAGES = 16      # the rows of grid.png: the images of the smallest dataset indices


def inversion_picture(targets: torch.Tensor, initial: torch.Tensor, final: torch.Tensor,
                      x_T: torch.Tensor, indices: Sequence[int], initial_psnr: Sequence[float],
                      final_psnr: Sequence[float], title: str = "", max_images: int = GRID_IMAGES,
                      columns: Sequence[str] = COLUMNS) -> Image.Image:
    """Rows of (target | initial | final | latent x_T) for the first max_images images, the
    columns labelled `columns` (a restoration: target | degraded input | restored | latent x_T).

    targets, initial, final (N, C, H, W) in [-1, 1]; x_T (N, C, H, W) any range; PSNRs in dB (N,).
    """
    n = min(max_images, len(targets))
    tiles = [[targets[b], initial[b], final[b], as_picture(x_T[b])] for b in range(n)]
    captions = [["", f"{initial_psnr[b]:.1f} dB", f"{final_psnr[b]:.1f} dB", ""] for b in range(n)]
    return labelled_grid(tiles, column_labels=columns, row_labels=[f"#{int(i)}" for i in indices[:n]],
                         captions=captions, title=title)


def grid_inputs(batch: dict[str, Any], metrics: Sequence[dict[str, Any]], method: str, T: int) -> dict[str, Any]:
    """inversion_picture's arguments for a batch result or the merged results (targets, initial,
    reconstructions, x_T, indices; a restoration also task, observed_shown, restored) and their
    per-image metrics, in the same order. A restoration shows target | degraded input | restored
    | latent x_T, with the PSNR on the hole (inpainting) or the whole image (super-resolution)."""
    common = {"targets": batch["targets"], "x_T": batch["x_T"], "indices": batch["indices"].tolist()}
    task = batch.get("task", "reconstruct")
    if task == "reconstruct":
        return {**common, "initial": batch["initial"], "final": batch["reconstructions"],
                "initial_psnr": [m["initial_psnr"] for m in metrics], "final_psnr": [m["psnr"] for m in metrics],
                "title": f"{method} inversion, T = {T}: PSNR of the regenerated image under it"}
    settings = batch.get("settings") or {}
    if task == "inpaint":
        shown_key, restored_key = "input_hole_psnr", "hole_psnr"
        title = f"{method} inpainting ({Path(str(settings.get('mask', 'mask'))).name}), T = {T}: hole PSNR under each"
    else:
        shown_key, restored_key = "input_psnr", "restored_psnr"
        title = f"{method} {settings.get('factor', '')}x super-resolution, T = {T}: PSNR under it"
    return {**common, "initial": batch["observed_shown"], "final": batch["restored"],
            "initial_psnr": [m[shown_key] for m in metrics], "final_psnr": [m[restored_key] for m in metrics],
            "title": title, "columns": RESTORATION_COLUMNS}


def picture_tensor(image: Image.Image) -> torch.Tensor:
    """A PIL picture as a (3, H, W) float tensor in [0, 1] (TensorBoard's add_image)."""
    import numpy as np
    return torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1).float() / 255


def padded(rows: Sequence[Sequence[float]]) -> torch.Tensor:
    """Lists of unequal length -> (len(rows), longest) float64, NaN after each list's end."""
    width = max([len(r) for r in rows] + [1])
    out = torch.full((len(rows), width), math.nan, dtype=torch.float64)
    for k, row in enumerate(rows):
        out[k, :len(row)] = torch.tensor(list(row), dtype=torch.float64)
    return out


def loss_rows(histories: Sequence[torch.Tensor]) -> torch.Tensor:
    """Loss histories (B_k, steps_k) of several batches -> (sum B_k, max steps_k) float64, NaN after
    each batch's last step (a batch that stopped early is shorter)."""
    return padded([row for h in histories for row in h.tolist()])


def worst_over_batches(traces: Sequence[torch.Tensor]) -> torch.Tensor:
    """(states, calls) traces of several batches -> their elementwise max, NaN-aware: a batch
    whose solve ended earlier does not hide the later calls of another."""
    width = max(t.shape[1] for t in traces)
    stacked = torch.full((len(traces), traces[0].shape[0], width), -math.inf, dtype=torch.float64)
    for k, t in enumerate(traces):
        stacked[k, :, :t.shape[1]] = torch.nan_to_num(t, nan=-math.inf)
    worst = stacked.amax(0)
    return torch.where(torch.isinf(worst), torch.full_like(worst, math.nan), worst)


def solve_curves(reports: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """What the exact solves of all batches did: state_trace (T, calls) and call_trace (calls,)
    (the worst image of all batches; call_trace empty per step), mode, tol; {} without reports."""
    reports = [r for r in reports if r and r.get("state_trace")]
    if not reports:
        return {}
    states = worst_over_batches([padded(r["state_trace"]) for r in reports])
    calls = [r["call_trace"] for r in reports if r.get("call_trace")]
    call_trace = worst_over_batches([padded([c]) for c in calls])[0] if calls else torch.empty(0)
    return {"state_trace": states, "call_trace": call_trace, "mode": reports[0]["mode"],
            "tol": reports[0]["tol"]}


def plot_curves(path: Path, title: str, loss_histories: Sequence[torch.Tensor],
                solve: dict[str, Any], evals_psnr: Optional[tuple[list[float], list[float]]]) -> None:
    """curves.png (see the module header). loss_histories: (B, steps) per batch, empty or all-NaN
    for method exact; solve: solve_curves(...); evals_psnr: (network evals, PSNR) per image of the
    exact solves, or None."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    losses = loss_rows(loss_histories) if loss_histories else None
    if losses is not None and not bool(torch.isfinite(losses).any()):
        losses = None
    panels = [p for p, on in (("loss", losses is not None), ("solve", bool(solve)),
                              ("psnr", bool(evals_psnr and evals_psnr[0]))) if on]
    if not panels:
        panels = ["loss"]   # nothing ran: an explicit empty panel rather than no file
    from matplotlib.ticker import MaxNLocator
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if panel == "loss":
            _loss_panel(ax, losses)
        elif panel == "solve":
            _solve_panel(fig, ax, solve)
        else:
            ax.scatter(evals_psnr[0], evals_psnr[1], s=14, color="tab:blue", alpha=0.7, label="one image")
            ax.scatter([sum(evals_psnr[0]) / len(evals_psnr[0])], [sum(evals_psnr[1]) / len(evals_psnr[1])],
                       s=60, marker="x", color="black", label="mean")
            ax.set_xlabel("network evaluations per image (start included)")
            ax.set_ylabel("PSNR of the regenerated image (dB)")
            ax.set_title("exact inversion: quality against cost")
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _loss_panel(ax, losses: Optional[torch.Tensor]) -> None:
    if losses is None:
        ax.text(0.5, 0.5, "no optimization steps", ha="center", va="center", transform=ax.transAxes)
    else:
        # Point k is step k's loss, that of the latents it starts from (as in TensorBoard's
        # deq/ curves); an image that stopped at its start has one point: drawn as a dot.
        for k, row in enumerate(losses[:64]):
            alone = int(torch.isfinite(row).sum()) == 1
            ax.plot(range(1, len(row) + 1), row.numpy(), color="tab:blue", alpha=0.35, lw=0.8,
                    marker="o" if alone else None, ms=3, label="one image" if k == 0 else None)
        ax.plot(range(1, losses.shape[1] + 1), torch.nanmean(losses, 0).numpy(), color="black", lw=2,
                label="mean over images", marker="o" if losses.shape[1] < 20 else None, ms=3)
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    ax.set_xlabel("optimization step (its loss: of the latents it starts from)")
    ax.set_ylabel("loss (squared Frobenius, [-1, 1] scale)")
    ax.set_title("latent optimization")


def _solve_panel(fig, ax, solve: dict[str, Any]) -> None:
    import matplotlib.pyplot as plt
    trace = solve["state_trace"]
    T = trace.shape[0]
    cmap = plt.get_cmap("viridis")
    for i in range(T):
        row = trace[i]
        keep = torch.isfinite(row)
        x = torch.arange(1, len(row) + 1)[keep]
        ax.plot(x.numpy(), row[keep].clamp(min=1e-12).numpy(), color=cmap(i / max(T - 1, 1)), lw=1,
                marker="o" if len(x) < 30 else None, ms=2)
    per_step = solve["mode"] == "per-step"
    if len(solve["call_trace"]):
        ax.plot(range(1, len(solve["call_trace"]) + 1), solve["call_trace"].clamp(min=1e-12).numpy(),
                color="black", lw=2, label="all states")
    ax.axhline(solve["tol"], color="tab:red", ls="--", lw=1, label=f"tol {solve['tol']:g}")
    ax.set_yscale("log")
    ax.set_xlabel("iteration of the state's own solve" if per_step else "solver call (all states at once)")
    ax.set_ylabel("relative residual (worst image)")
    ax.set_title(f"exact inverse solve ({solve['mode']}), one line per state")
    scalar = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(1, max(T, 2)))
    fig.colorbar(scalar, ax=ax, label="state i (x_i; x_T the latent)")
    ax.legend(fontsize=8)


def save_inversion_picture(path: Path, *args, **kwargs) -> Path:
    return save_picture(inversion_picture(*args, **kwargs), path)
