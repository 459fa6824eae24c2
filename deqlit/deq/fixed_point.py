"""The fixed-point map h(x_{0:T-1}; x_T) of DEQ-DDIM (paper Eq. 10-13).

Chain states x_0 (clean) .. x_T (noise); state x_i (i >= 1) is evaluated by the network at
timestep s_{i-1}. With y_i = x_i / sqrt(abar_i), one DDIM step is
    y_{i-1} = y_i + c_i eps(x_i, s_{i-1}) + d_i xi_i                      (Eq. 13; d = 0 when eta = 0)
so every state is x_T plus the reverse cumulative sum of the terms of all later states:
    x_i = sqrt(abar_i) * ( x_T / sqrt(abar_T) + sum_{j = i+1..T} [c_j eps_j + d_j xi_j] ).
The unknown X holds rows x_0 .. x_{T-1}, shape (T, B, C, H, W). One evaluation of h runs the network
once, batched over all (state, image) rows, then does the scaled reverse cumulative sum.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from deqlit.diffusion.chain import Chain
from deqlit.deq.reduce import LOCAL, LocalReducer

NoiseModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def reverse_cumsum(terms: torch.Tensor) -> torch.Tensor:
    """out[r] = sum_{q >= r} terms[q] along dim 0. (R, ...) -> (R, ...)."""
    return terms.flip(0).cumsum(0).flip(0)


def batched_eps(model: NoiseModel, states: torch.Tensor, timesteps: torch.Tensor,
                max_batch: Optional[int] = None) -> torch.Tensor:
    """eps for every (state, image) row in one batched call, or in chunks of at most max_batch rows.

    states (R, B, C, H, W), timesteps (R,) -> eps (R, B, C, H, W).
    """
    rows, batch = states.shape[:2]
    if rows == 0:
        return torch.empty_like(states)
    flat = states.reshape(rows * batch, *states.shape[2:])
    t = timesteps.repeat_interleave(batch)
    if max_batch is None or flat.shape[0] <= max_batch:
        eps = model(flat, t)
    else:
        eps = torch.cat([model(flat[i:i + max_batch], t[i:i + max_batch])
                         for i in range(0, flat.shape[0], max_batch)])
    return eps.reshape(states.shape)


class FixedPointMap:
    """h(X; x_T) for one chain (all T states in this process).

    Build it, call `bind(x_T, noise)` once per solve, then call it on X (T, B, C, H, W).
    Counts `calls` (batched network calls) and `network_rows` (eps evaluations per image).
    With `frozen_from = k`, states j >= k reuse their cached eps instead of a new evaluation:
    the solvers pass it for states whose inputs can no longer change (see solvers.py).
    """

    def __init__(self, model: NoiseModel, chain: Chain, max_batch: Optional[int] = None,
                 reducer: LocalReducer = LOCAL):
        if max_batch is not None and max_batch < 1:
            raise ValueError(f"max_batch must be >= 1 (rows per network call) or None, got {max_batch}")
        self.model, self.chain, self.max_batch, self.reducer = model, chain, max_batch, reducer
        self.T, self.eta = chain.T, chain.eta
        self.x_T: Optional[torch.Tensor] = None
        self.calls = 0
        self.network_rows = 0

    # ---- per-solve state ------------------------------------------------------------------
    def bind(self, x_T: torch.Tensor, noise: Optional[torch.Tensor] = None) -> "FixedPointMap":
        """Fix x_T (B, C, H, W) and the injected noise xi (T, B, C, H, W; needed when eta > 0).

        Evaluates eps(x_T) once: x_T never changes during a solve. Under autograd the graph to
        x_T and to the network's parameters is kept, which the 1-step gradient needs.
        """
        if self.eta > 0 and noise is None:
            raise ValueError("eta > 0 needs the injected noise xi (T, B, C, H, W); draw it once "
                             "per sample and pass it so that every solver iteration sees the same")
        if noise is not None and noise.shape != (self.T,) + tuple(x_T.shape):
            raise ValueError(f"noise must have shape {(self.T,) + tuple(x_T.shape)}, got {tuple(noise.shape)}")
        self.x_T, self.noise = x_T, noise
        # The chain's constants follow x_T's device and dtype, copied once per solve.
        dtype, device = x_T.dtype, x_T.device
        self._scale = self.chain.abar.sqrt().to(device=device, dtype=dtype)  # (T+1,)
        self._c = self.chain.c.to(device=device, dtype=dtype)
        self._d = self.chain.d.to(device=device, dtype=dtype)
        self._timesteps = self.chain.timestep_tensor(device)             # network time of x_1..x_T
        self._eps = torch.zeros((self.T - 1,) + tuple(x_T.shape), dtype=dtype, device=device)
        eps_top = batched_eps(self.model, x_T[None], self._timesteps[-1:], self.max_batch)[0]
        self._eps_top = eps_top
        return self

    def cached_eps(self) -> torch.Tensor:
        """eps of x_1..x_{T-1} from the last evaluation without gradient, (T-1, B, C, H, W)."""
        return self._eps

    def top_eps(self) -> torch.Tensor:
        """eps(x_T) computed by bind (with a graph when x_T requires grad), (B, C, H, W)."""
        return self._eps_top

    def row_shape(self, view: torch.Tensor) -> torch.Tensor:
        """Broadcast a (R,) coefficient over (R, B, C, H, W)."""
        return view.reshape(-1, *([1] * (self._eps.dim() - 1)))

    # ---- the map --------------------------------------------------------------------------
    def __call__(self, X: torch.Tensor, frozen_from: Optional[int] = None) -> torch.Tensor:
        """X (T, B, C, H, W) = x_0..x_{T-1} -> h(X) of the same shape.

        frozen_from = k: states x_k..x_{T-1} reuse the eps cached by an earlier call (no grad).
        """
        if self.x_T is None:
            raise RuntimeError("call bind(x_T, noise) before evaluating the map")
        T = self.T
        if X.shape[0] != T:
            raise ValueError(f"X must hold the {T} states x_0..x_{T - 1}, got {X.shape[0]} rows")
        active = T if frozen_from is None else max(1, min(frozen_from, T))
        # Cache row r holds eps of state x_{r+1}; x_1..x_{active-1} get a fresh evaluation.
        fresh = batched_eps(self.model, X[1:active], self._timesteps[:active - 1], self.max_batch)
        self.calls += 1
        self.network_rows += active - 1
        eps_all = torch.cat([fresh, self._eps[active - 1:T - 1], self._eps_top[None]])
        if not torch.is_grad_enabled():
            self._eps[:active - 1] = fresh
        return self.states_from_eps(eps_all)

    def states_from_eps(self, eps_all: torch.Tensor) -> torch.Tensor:
        """eps of x_1..x_T (T, B, ...) -> states x_0..x_{T-1} (T, B, ...) by Eq. 10/13."""
        terms = self.row_shape(self._c) * eps_all              # row r: term of state x_{r+1}
        if self.noise is not None:
            terms = terms + self.row_shape(self._d) * self.noise
        # x_i needs the terms of x_{i+1}..x_T, i.e. rows r >= i: an inclusive reverse cumsum,
        # plus the carry of the shards that hold later states (zero in one process).
        later = reverse_cumsum(terms) + self.reducer.carry_from_later(terms.sum(0, keepdim=True))
        y_T = self.x_T / self._scale[self.T]
        return self.row_shape(self._scale[:-1]) * (y_T[None] + later)
