"""The per-image latents of joint fine-tuning (joint_module.py) and their optimizer.

LatentTable: (N, D) rows updated only at the rows of a batch (sparse gradient), in memory or, for
a large N, in the memory-mapped files of latent_store.DiskLatentStore. RowAdam: Adam with one step
count per row, so the bias correction is right for a row first seen at step 10,000.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn


def to_sphere(z: torch.Tensor) -> torch.Tensor:
    """z (B, D) -> sqrt(D) z / ||z||: the shell where white noise of dimension D concentrates."""
    return z * (math.sqrt(z.shape[1]) / z.norm(dim=1, keepdim=True).clamp(min=1e-12))


# ---- latents table and its optimizer ---------------------------------------------------------
class LatentTable(nn.Module):
    """Latents of N images, (N, D) rows; `ready` marks the rows initialized so far (saved).

    With `store` (deqlit/lit/latent_store.py, joint.latents_on_disk) the rows and `ready` are the
    store's memory-mapped files: the state_dict then holds only the marker `on_disk_rows` (N), the
    table never moves to the accelerator (batch rows are read on the CPU and sent over), and it
    stays float32 whatever the module's dtype (rows are cast on the way out)."""

    def __init__(self, num_images: int, image_shape: tuple[int, ...], sphere: bool = True,
                 store: Optional[Any] = None):
        super().__init__()
        if num_images < 1:
            raise ValueError(f"joint fine-tuning needs at least one image, got {num_images}")
        self.image_shape, self.sphere, self.store = tuple(image_shape), sphere, store
        if store is None:
            self.weight = nn.Parameter(torch.zeros(num_images, math.prod(image_shape)))
            self.register_buffer("ready", torch.zeros(num_images, dtype=torch.bool))
        else:
            if tuple(store.weight.shape) != (num_images, math.prod(image_shape)):
                raise ValueError(f"the on-disk table is {tuple(store.weight.shape)}, not "
                                 f"({num_images}, {math.prod(image_shape)})")
            self.weight = nn.Parameter(store.weight)       # shares the mapped pages
            self.register_buffer("ready", store.ready, persistent=False)
            self.out_device, self.out_dtype = store.weight.device, store.weight.dtype

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        """index (B,) long -> x_T (B, C, H, W), with a sparse gradient to the table's rows."""
        z = F.embedding(index.to(self.weight.device), self.weight, sparse=True)
        if self.store is not None:
            z = z.to(device=index.device, dtype=self.out_dtype)
        return (to_sphere(z) if self.sphere else z).reshape(len(index), *self.image_shape)

    def is_ready(self, index: torch.Tensor) -> torch.Tensor:
        """(B,) bool on index's device: which of the rows are initialized."""
        return self.ready[index.to(self.ready.device)].to(index.device)

    @torch.no_grad()
    def fill(self, index: torch.Tensor, values: torch.Tensor) -> None:
        index = index.to(self.weight.device)
        if self.store is not None:
            self.store.record(index)
        self.weight[index] = values.reshape(len(index), -1).to(self.weight)
        self.ready[index] = True
        self.renormalize(index)

    @torch.no_grad()
    def renormalize(self, index: torch.Tensor) -> None:
        """Keep the rows on the sphere, so the step size of RowAdam means the same all along."""
        if self.sphere:
            index = index.to(self.weight.device)
            if self.store is not None:
                self.store.record(index)
            self.weight[index] = to_sphere(self.weight[index])

    def _apply(self, fn, recurse: bool = True):
        """On disk: .to(device) / .double() leave the files alone; rows leave forward() in the
        dtype that `fn` gives (the device is the index's)."""
        if self.store is None:
            return super()._apply(fn, recurse)
        self.out_dtype = fn(torch.zeros(0, dtype=self.store.weight.dtype)).dtype
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        if self.store is None:
            return super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "on_disk_rows"] = torch.tensor(self.weight.shape[0])

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        marker = prefix + "on_disk_rows"
        if self.store is None and marker in state_dict:
            error_msgs.append("the checkpoint's latents table is on disk (RUN/latents/) and this run "
                              "keeps it in memory: resume with --joint.latents_on_disk true")
        elif self.store is None:
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                          unexpected_keys, error_msgs)
        elif marker not in state_dict:
            error_msgs.append("the checkpoint holds the latents table in memory and this run keeps "
                              "it on disk: resume with --joint.latents_on_disk false")
        elif int(state_dict[marker]) != self.weight.shape[0]:
            error_msgs.append(f"the checkpoint's on-disk table has {int(state_dict[marker])} rows, "
                              f"this run {self.weight.shape[0]}")


def grow_saved_rows(checkpoint: dict[str, Any], prefix: str, rows: int) -> int:
    """Pad a Lightning checkpoint's in-memory table of n <= `rows` rows to `rows`, in place: the
    table (PREFIX.weight, PREFIX.ready) and RowAdam's per-row moments and step counts (the first
    optimizer's). The new rows are zero and not ready: initialized when first seen, as in a new
    run. Returns n (the checkpoint's rows); nothing changes when n >= rows, or when the table is
    on disk (the caller refuses n > rows)."""
    state = checkpoint.get("state_dict", {})
    weight = state.get(prefix + "weight")
    if weight is None or weight.shape[0] >= rows:
        return rows if weight is None else int(weight.shape[0])
    n = int(weight.shape[0])

    def padded(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([t, t.new_zeros((rows - n, *t.shape[1:]))])
    state[prefix + "weight"] = padded(weight)
    if prefix + "ready" in state:
        state[prefix + "ready"] = padded(state[prefix + "ready"])
    for saved in (checkpoint.get("optimizer_states") or [])[:1]:
        for moments in saved.get("state", {}).values():
            for key, value in moments.items():
                if torch.is_tensor(value) and value.dim() >= 1 and value.shape[0] == n:
                    moments[key] = padded(value)
    return n


class RowAdam(torch.optim.Optimizer):
    """Adam on the rows present in a sparse gradient, with one step count per row.

    With `store` (latent_store.DiskLatentStore) the moments and step counts are its memory-mapped
    arrays: state_dict() then holds the marker {'on_disk': True} instead of them, and
    load_state_dict() binds the arrays again (the store rolls them back to the checkpoint)."""

    def __init__(self, params, lr: float = 1e-2, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 store: Optional[Any] = None):
        if not lr > 0:
            raise ValueError(f"the latents' learning rate must be > 0, got {lr}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps))
        self.store = store
        self._bind_store()

    def _bind_store(self) -> None:
        """The store as the state of the (single) table: an object without tensors or `to`, so
        Lightning neither moves it to the accelerator nor finds tensors in it."""
        if self.store is not None:
            for group in self.param_groups:
                for p in group["params"]:
                    self.state[p] = {"on_disk": self.store}

    def _moments(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        state = self.state[p]
        if "on_disk" in state:
            store = state["on_disk"]
            return store.exp_avg, store.exp_avg_sq, store.step
        if not state:
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] = torch.zeros(p.shape[0], dtype=torch.long, device=p.device)
        return state["exp_avg"], state["exp_avg_sq"], state["step"]

    def state_dict(self) -> dict[str, Any]:
        saved = super().state_dict()
        if self.store is not None:
            saved["state"] = {key: {"on_disk": True} for key in saved["state"]}
        return saved

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        on_disk = any(isinstance(s, dict) and s.get("on_disk") is True for s in state_dict["state"].values())
        if on_disk != (self.store is not None):
            where = ("on disk and this run keeps them in memory: resume with --joint.latents_on_disk true"
                     if on_disk else "in memory and this run keeps them on disk: resume with "
                     "--joint.latents_on_disk false")
            raise ValueError(f"the checkpoint's RowAdam moments are {where}")
        if self.store is None:
            return super().load_state_dict(state_dict)
        super().load_state_dict({**state_dict, "state": {}})
        self._bind_store()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad.coalesce() if p.grad.is_sparse else p.grad.to_sparse(1).coalesce()
                rows, values = grad.indices()[0], grad.values()
                exp_avg, exp_avg_sq, steps = self._moments(p)
                if self.store is not None:
                    self.store.record(rows)          # undo journal first, then the rows change
                steps[rows] += 1
                n = steps[rows].to(p.dtype)[:, None]
                m = exp_avg[rows].mul_(b1).add_(values, alpha=1 - b1)
                v = exp_avg_sq[rows].mul_(b2).addcmul_(values, values, value=1 - b2)
                exp_avg[rows], exp_avg_sq[rows] = m, v
                update = (m / (1 - b1 ** n)) / ((v / (1 - b2 ** n)).sqrt() + group["eps"])
                p[rows] -= group["lr"] * update
        return loss
