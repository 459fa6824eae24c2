"""The one reader of saved latents, for every job that writes them.

What is on disk:
- invert.py:  RUN/latents/part-*.pt (one per batch, always) and RUN/latents.pt (their merge, for
  runs of at most merge_limit images);
- train.py --task joint:  RUN/latents.pt holding x_T, or, with the table on disk, a pointer
  {'latents_dir', 'indices', ...} to RUN/latents/weight.npy.
`read_latents(path, limit)` takes any of these files or a run folder and returns one payload
{'x_T' (N, C, H, W), 'noise' (T, N, C, H, W) or None, 'indices' (N,), 'chain', and where saved
'reconstructions', 'targets', 'settings'} with the first `limit` images in index order. A folder
of parts is read part by part until `limit` images are in hand, so memory follows `limit`, not
the run's size.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional

import torch

from deqlit.guards import CorruptCheckpointError, UserInputError, first_few
from deqlit.lit.inversion_outputs import PART_GLOB, ROW_KEYS, join_parts, read_result


def _reason(err: BaseException) -> str:
    """An exception as 'Type: cause'. torch's weights_only message opens with advice on
    weights_only=False that does not apply to a damaged file; its cause follows this marker."""
    text = str(err)
    cause = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
    reason = cause.group(1) if cause else (text.strip().splitlines() or [""])[0]
    return f"{type(err).__name__}: {reason[:120]}".rstrip(": ")


def read_latents(path: str | Path, limit: Optional[int] = None) -> dict[str, Any]:
    """The latents payload of a file or a run folder (see the module header). Latents holding
    NaN/Inf are refused naming their rows (a solve from them would fail far from the cause)."""
    data = _read_payload(Path(path), limit)
    x_T = data["x_T"]
    if isinstance(x_T, torch.Tensor) and x_T.is_floating_point() and not bool(torch.isfinite(x_T).all()):
        bad = (~torch.isfinite(x_T.reshape(len(x_T), -1))).any(1).nonzero().flatten().tolist()
        indices = data.get("indices")
        named = [int(indices[b]) for b in bad] if indices is not None and len(indices) == len(x_T) else bad
        raise UserInputError(f"the latents in {path} hold NaN/Inf for {len(bad)} of {len(x_T)} image(s) "
                             f"(dataset indices {first_few(named)}): they come from a diverged run; invert those "
                             f"images again, or pass --num-images to stop before them")
    return data


def _read_payload(path: Path, limit: Optional[int]) -> dict[str, Any]:
    if path.is_dir():
        parts = sorted((path / "latents").glob(PART_GLOB)) if (path / "latents").is_dir() else []
        if parts:
            return _from_parts(parts, limit)
        if (path / "latents.pt").is_file():
            return _read_payload(path / "latents.pt", limit)
        raise FileNotFoundError(f"{path} holds neither latents.pt nor latents/part-*.pt: pass the folder "
                                f"of an invert.py or train.py --task joint run, or its latents.pt")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"latents file {path} does not exist; invert.py and train.py --task "
                                f"joint write RUN/latents.pt (a run folder is accepted too)") from None
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError, OSError... by cause
        raise UserInputError(f"latents file {path} is corrupt or truncated ({_reason(err)}): write it "
                             f"again with the invert.py or train.py --task joint run that made it") from err
    if isinstance(data, dict) and "latents_dir" in data and "x_T" not in data:
        from deqlit.lit.latent_store import read_disk_latents
        indices = data["indices"][:limit]
        data["x_T"] = read_disk_latents(path.parent, indices, data.get("sphere", True),
                                        tuple(data["image_shape"]))
        data["indices"] = indices
    if not isinstance(data, dict) or "x_T" not in data:
        raise ValueError(f"{path} is not a latents file of invert.py or train.py --task joint "
                         f"(expected a dict with 'x_T')")
    if "chain" not in data:
        raise ValueError(f"{path} holds no chain (written by an older deqlit): re-run invert.py, "
                         f"or pass --timesteps/--skip/--eta and sample from its x_T yourself")
    return first_rows(data, limit)


def first_rows(data: dict[str, Any], limit: Optional[int]) -> dict[str, Any]:
    """The payload cut to its first `limit` images (all without one)."""
    if limit is None:
        return data
    out = dict(data)
    for key in ROW_KEYS:
        if out.get(key) is not None:
            out[key] = out[key][:limit]
    if out.get("noise") is not None:
        out["noise"] = out["noise"][:, :limit]          # (T, N, ...)
    return out


def _from_parts(parts: list[Path], limit: Optional[int]) -> dict[str, Any]:
    """Part files in index order (their names are their first image index), read until `limit`."""
    pieces: list[dict[str, Any]] = []
    count = 0
    for part in parts:
        try:
            data = read_result(part)
        except CorruptCheckpointError as err:   # its message is for invert.py --resume
            cause = err.__cause__ or err
            raise UserInputError(f"latents part file {part} is corrupt or truncated ({_reason(cause)}): "
                                 f"delete it and finish the inversion with invert.py --resume --out "
                                 f"{part.parent.parent} (only its batch is solved again)") from err
        pieces.append(data)
        count += len(data["indices"])
        if limit is not None and count >= limit:
            break
    merged = join_parts(pieces)
    return first_rows(merged, limit)
