"""Load UNet weights from the checkpoint formats the DEQ-DDIM paper meets, with errors that say what to do.

Readable formats (all through `torch.load(..., weights_only=True)`, which refuses arbitrary pickles):
  (a) a plain state_dict: Ho et al.'s models converted to PyTorch, `save_weights` output; the keys
      may carry the 'module.' prefix of nn.DataParallel;
  (b) DDIM's ckpt.pth: a list [state_dict ('module.' prefix), optimizer, epoch, step, ema_shadow];
  (c) this project's Lightning checkpoints: 'model.<key>' raw weights, 'ema.module.<key>' EMA weights;
  (d) an export {'state_dict': ..., 'config': ...};
  (e) `.safetensors` files (needs the `safetensors` package).
deqlit never downloads weights: every path is a local file that the user fetched.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deqlit.models.paper_configs import PAPER_CONFIGS, match_paper_config

WHERE_WEIGHTS_COME_FROM = (
    "deqlit never downloads weights. The paper's checkpoints are: CIFAR10 and LSUN, Ho et al.'s EMA "
    "models converted to PyTorch (diffusion_models_converted/ema_diffusion_cifar10_model/"
    "model-790000.ckpt, ema_diffusion_lsun_bedroom_model/model-2388000.ckpt, ...); CelebA, DDIM's "
    "ckpt.pth (linked from the ermongroup/ddim README). Download the file yourself and pass its "
    "local path, or train a model with train.py.")


class CheckpointNotFoundError(FileNotFoundError):
    """The checkpoint path does not exist."""


class CheckpointFormatError(ValueError):
    """The file exists but holds no UNet weights that deqlit can read."""


class ArchitectureMismatchError(ValueError):
    """The weights do not fit the model's architecture (missing, unexpected or mis-shaped keys)."""


# ---- reading a file into a flat {key: tensor} dict -------------------------------------------
def read_state_dict(path: str | Path, ema: bool = True) -> dict[str, torch.Tensor]:
    """The UNet state_dict stored in `path`, with wrapper prefixes removed.

    ema=True picks the EMA weights where the file holds both (DDIM ckpt.pth, Lightning .ckpt);
    a plain state_dict holds one set, returned for either value (Ho et al.'s files are EMA already).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointNotFoundError(f"checkpoint not found: {path}. {WHERE_WEIGHTS_COME_FROM}")
    if path.is_dir():
        raise CheckpointFormatError(
            f"{path} is a directory, not a checkpoint file: pass the weights file itself; for a "
            "diffusers folder (UNet2DModel.save_pretrained) use "
            "deqlit.models.diffusers_adapter.load_diffusers_unet")
    if path.suffix == ".safetensors":
        obj: Any = _load_safetensors(path)
    else:
        obj = _torch_load(path)
    return _extract_state_dict(obj, ema, path)


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, KeyError... by cause
        text = str(err)
        # torch 2.14: "unsupported GLOBAL posix.system whose module posix is blocked" for modules
        # that run code (os, posix, subprocess, builtins.eval...); older wording for the others.
        blocked = re.search(r"unsupported GLOBAL (\S+) whose module (\S+) is blocked", text, re.I)
        if blocked:
            raise CheckpointFormatError(
                f"{path} contains code that deqlit refuses to run: unpickling it would call "
                f"{blocked.group(1)} (module {blocked.group(2)}). A model checkpoint needs no code; "
                "do not load this file with weights_only=False unless you know what it does, and "
                "get the weights from a source you trust") from err
        refused = re.search(r"Unsupported global:? GLOBAL (\S+)", text, re.I)
        if refused:
            raise CheckpointFormatError(
                f"{path} pickles the Python object {refused.group(1)}, and deqlit unpickles only "
                "tensors and plain containers (torch.load weights_only=True), since a pickle can "
                "run arbitrary code. If you trust the file, re-save only its weights: "
                "obj = torch.load(p, weights_only=False); torch.save(<the UNet state_dict in obj>, "
                "'weights.pt')") from err
        # torch's weights_only message opens with generic advice; the cause follows this marker.
        cause = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
        reason = cause.group(1) if cause else (text.strip().splitlines() or [""])[0].split(". ")[0]
        raise CheckpointFormatError(
            f"{path} is not a readable PyTorch checkpoint ({type(err).__name__}: {reason}). "
            "It may be truncated or corrupt (re-download it and compare its size/checksum), or "
            "another format (TensorFlow checkpoints must first be converted to PyTorch)") from err


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError as err:
        raise ImportError(f"reading {path} needs the safetensors package: "
                          "pip install safetensors") from err
    try:
        return load_file(str(path), device="cpu")
    except Exception as err:  # safetensors raises its own SafetensorError for a bad header
        raise CheckpointFormatError(
            f"{path} is not a readable safetensors file ({type(err).__name__}: {err}). It may be "
            "truncated or corrupt: re-download or re-export it") from err


def _is_tensor_dict(obj: Any) -> bool:
    return (isinstance(obj, Mapping) and len(obj) > 0
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()))


def _strip_prefix(sd: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Drop `prefix` when every key has it (nn.DataParallel adds 'module.' to all keys)."""
    if all(k.startswith(prefix) for k in sd):
        return {k[len(prefix):]: v for k, v in sd.items()}
    return dict(sd)


def _select_lightning(sd: Mapping[str, torch.Tensor], ema: bool,
                      path: Path) -> dict[str, torch.Tensor]:
    """'ema.module.<key>' (ema=True) or 'model.<key>' (ema=False) of a Lightning state_dict."""
    prefix, other = (("ema.module.", "--checkpoint.ema false (ema=False in load_weights)") if ema
                     else ("model.", "--checkpoint.ema true (ema=True in load_weights)"))
    picked = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if not picked:
        kind = "EMA" if ema else "raw ('model.*')"
        raise CheckpointFormatError(f"{path} is a Lightning checkpoint without {kind} weights "
                                    f"(no '{prefix}*' keys): load it with {other}")
    return picked


def _extract_state_dict(obj: Any, ema: bool, path: Path) -> dict[str, torch.Tensor]:
    # (b) DDIM's ckpt.pth list: first element the raw weights, last the EMA shadow (if trained
    # with EMA).
    if isinstance(obj, (list, tuple)):
        if not obj or not _is_tensor_dict(obj[0]):
            raise CheckpointFormatError(f"{path} holds a list whose first element is not a tensor "
                                        "dict, so it is not DDIM's ckpt.pth [state_dict, optimizer, "
                                        "epoch, step, ema_shadow] layout")
        if ema:
            if len(obj) < 5 or not _is_tensor_dict(obj[-1]):
                raise CheckpointFormatError(
                    f"{path} is a DDIM ckpt.pth without an EMA shadow (it has {len(obj)} elements; "
                    "DDIM saves the EMA as the 5th): use its raw weights with --checkpoint.ema "
                    "false on the command line (ema=False in load_weights)")
            return _strip_prefix(obj[-1], "module.")
        return _strip_prefix(obj[0], "module.")
    if not isinstance(obj, Mapping):
        raise CheckpointFormatError(f"{path} holds a {type(obj).__name__}, not a dict of tensors: "
                                    "it is not a model checkpoint")
    # (c) Lightning and (d) exports both keep the weights under 'state_dict'.
    if "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        inner = obj["state_dict"]
        if any(k.startswith(("model.", "ema.module.")) for k in inner):
            return _select_lightning(inner, ema, path)
        obj = inner
    # (a) a plain state_dict; a flat file (safetensors) may also carry Lightning prefixes.
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        keys = ", ".join(map(repr, list(obj)[:8]))
        raise CheckpointFormatError(f"{path} holds a dict with no tensors (keys: {keys}): it is "
                                    "not a model checkpoint")
    if any(k.startswith(("model.", "ema.module.")) for k in tensors):
        return _select_lightning(tensors, ema, path)
    return _strip_prefix(tensors, "module.")


# ---- config inference and mismatch reports ---------------------------------------------------
def infer_unet_config(state_dict: Mapping[str, torch.Tensor], resolution: int) -> dict[str, Any]:
    """DDIMUNet keyword arguments that produce the layout of `state_dict` (only shapes are read).

    The weights fix ch, in_channels, out_ch, ch_mult, num_res_blocks, which levels have attention
    and resamp_with_conv. They do not fix the image size: `resolution` must be given, and the
    attention levels are turned into attn_resolutions = resolution / 2**level. dropout is 0.0 (it
    has no weights; set the training value to fine-tune).
    """
    sd = _strip_prefix(state_dict, "module.")
    for needed in ("conv_in.weight", "conv_out.weight", "down.0.block.0.conv1.weight"):
        if needed not in sd:
            raise CheckpointFormatError(f"the weights have no {needed!r}: they are not a DDPM/DDIM "
                                        "UNet state_dict")
    ch, in_channels = sd["conv_in.weight"].shape[:2]
    out_ch = sd["conv_out.weight"].shape[0]
    levels = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("down."))
    ch_mult = []
    for level in range(levels):
        width = sd[f"down.{level}.block.0.conv1.weight"].shape[0]
        if width % ch:
            raise CheckpointFormatError(f"down.{level} has {width} channels, not a multiple of "
                                        f"ch={ch}: not a DDIM UNet layout")
        ch_mult.append(width // ch)
    num_res_blocks = len({k.split(".")[3] for k in sd if k.startswith("down.0.block.")})
    attn_levels = [lv for lv in range(levels) if any(k.startswith(f"down.{lv}.attn.") for k in sd)]
    if resolution % 2 ** (levels - 1):
        raise ValueError(f"resolution {resolution} cannot be halved {levels - 1} times "
                         f"(the weights have {levels} levels)")
    return dict(ch=int(ch), out_ch=int(out_ch), ch_mult=ch_mult, num_res_blocks=num_res_blocks,
                attn_resolutions=[resolution // 2 ** lv for lv in attn_levels], dropout=0.0,
                in_channels=int(in_channels), resolution=resolution,
                resamp_with_conv=levels == 1 or "down.0.downsample.conv.weight" in sd)


def _listing(items: list[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... (+{len(items) - limit} more)" if len(items) > limit else "")


def _modules(keys: list[str]) -> list[str]:
    """Keys grouped by module, e.g. 'down.2.attn.0.q.weight' -> 'down.2.attn.0.*', in order.

    A missing attention block alone is 10 keys; naming blocks keeps the message short.
    """
    groups = [".".join(k.split(".")[:-1][:4]) or k for k in keys]
    return [g if g in keys else g + ".*" for g in dict.fromkeys(groups)]


def _mismatch_report(model: nn.Module, sd: Mapping[str, torch.Tensor], path: Path) -> str | None:
    """A message naming the differences between the model's layout and the file's, or None."""
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in sd.items()}
    missing = [k for k in want if k not in have]
    unexpected = [k for k in have if k not in want]
    misshaped = [f"{k} (file {list(have[k])}, model {list(want[k])})"
                 for k in want if k in have and have[k] != want[k]]
    if not (missing or unexpected or misshaped):
        return None
    model_cfg = getattr(model, "config", None)
    lines = [f"the weights in {path} do not fit this {type(model).__name__}"
             + (f" ({_config_text(model_cfg)})" if isinstance(model_cfg, dict) else "") + ":"]
    if missing:
        lines.append(f"  {len(missing)} missing keys (in the model, not in the file): "
                     f"{_listing(_modules(missing))}")
    if unexpected:
        lines.append(f"  {len(unexpected)} unexpected keys (in the file, not in the model): "
                     f"{_listing(_modules(unexpected))}")
    if misshaped:
        lines.append(f"  {len(misshaped)} mis-shaped keys: {_listing(misshaped, 3)}")
    lines.append(_suggestion(sd, have, model_cfg))
    return "\n".join(lines)


def _config_text(cfg: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in cfg.items())


def _suggestion(sd: Mapping[str, torch.Tensor], have: dict[str, tuple[int, ...]],
                model_cfg: Any) -> str:
    name = match_paper_config(have)
    if name is not None:
        return (f"The file fits the paper's {name!r} config: build the model with "
                f"DDIMUNet(**PAPER_CONFIGS[{name!r}]) (deqlit.models.paper_configs), i.e. "
                f"{_config_text(PAPER_CONFIGS[name])}.")
    text = f"The file fits none of the paper's configs ({', '.join(PAPER_CONFIGS)})."
    res = model_cfg.get("resolution", 32) if isinstance(model_cfg, dict) else 32
    try:
        inferred = infer_unet_config(sd, res)
    except (CheckpointFormatError, ValueError) as err:
        return f"{text} No DDIMUNet config could be inferred from it: {err}"
    return (f"{text} Config inferred from the weights: {_config_text(inferred)}. The resolution "
            f"cannot be inferred from weights: {res} is the model's, set it to the training image "
            "size (attn_resolutions scale with it); see deqlit.models.loading.infer_unet_config.")


# ---- public entry points ---------------------------------------------------------------------
def load_weights(model: nn.Module, path: str | Path, ema: bool = True) -> nn.Module:
    """Load the weights in `path` into `model` strictly and return the model.

    ema=True takes the EMA weights where the file has both (what the paper samples with).
    Raises CheckpointNotFoundError, CheckpointFormatError or ArchitectureMismatchError.
    """
    path = Path(path)
    sd = read_state_dict(path, ema=ema)
    # Our own comparison first: load_state_dict's error lists every key and stops at shapes.
    report = _mismatch_report(model, sd, path)
    if report is not None:
        raise ArchitectureMismatchError(report)
    model.load_state_dict(sd, strict=True)
    return model


def save_weights(model: nn.Module, path: str | Path) -> Path:
    """Write `model`'s state_dict as a plain {key: tensor} file (safetensors if the name ends so)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import save_file
        except ImportError as err:
            raise ImportError(f"writing {path} needs the safetensors package: "
                              "pip install safetensors (or save to a .pt file)") from err
        save_file(sd, str(path))
    else:
        torch.save(sd, path)
    return path
