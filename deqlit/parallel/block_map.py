"""The fixed-point map h(X; x_T) on one block of timestep rows (one time shard).

fixed_point.py writes every state as x_T plus the reverse cumulative sum of the terms of all
later states. Number the term by the state that makes it:
    tau_j = c_{j-1} eps(x_j) + d_{j-1} xi_{j-1}    (j = 1..T),
    x_i   = sqrt(abar_i) * ( x_T / sqrt(abar_T) + sum_{j > i} tau_j ).
A block holding the states x_start..x_{stop-1} evaluates the network on its own states only (on
x_1.. for the first block, which skips x_0; the last block also holds x_T's term, evaluated once
per solve), so no state crosses a shard boundary. Its states need
    sum_{j > i} tau_j = (local terms j in (i, stop)) + (carry: the totals of all later blocks),
and the carry is the reducer's `carry_from_later` of this block's total: one all_gather of K
images per evaluation. In the global term-row numbering of fixed_point.py (row q = term of
x_{q+1}) a block owns the term rows [q0, q1) with q0 = max(start, 1) - 1 and q1 = stop - 1
(stop = T for the last block, which then includes x_T's term).
"""
from __future__ import annotations

from typing import Optional

import torch

from deqlit.deq.fixed_point import NoiseModel, batched_eps, reverse_cumsum
from deqlit.diffusion.chain import Chain
from deqlit.deq.blocks import Block
from deqlit.deq.reduce import LOCAL, LocalReducer


class BlockMap:
    """h(X; x_T) for the rows of one block: X (rows, B, C, H, W) = x_start..x_{stop-1}.

    Same protocol as FixedPointMap: `bind(x_T, noise)` once per solve, then call it on X with an
    optional *global* `frozen_from` (states x_k, k >= frozen_from, reuse their cached eps).
    Counts `calls` and `network_rows` (this block's eps evaluations per image).
    """

    def __init__(self, model: NoiseModel, chain: Chain, block: Block, max_batch: Optional[int] = None,
                 reducer: LocalReducer = LOCAL):
        if block.T != chain.T:
            raise ValueError(f"the block splits a {block.T}-step chain but the chain has T = {chain.T}")
        if max_batch is not None and max_batch < 1:
            raise ValueError(f"max_batch must be >= 1 (rows per network call) or None, got {max_batch}")
        self.model, self.chain, self.block, self.max_batch, self.reducer = model, chain, block, max_batch, reducer
        self.T, self.eta = chain.T, chain.eta
        self.q0 = max(block.start, 1) - 1                 # first term row owned
        self.q_states = block.stop - 1                    # term rows [q0, q_states) come from X
        self.q1 = block.stop if block.is_last else block.stop - 1
        self.x_T: Optional[torch.Tensor] = None
        self.calls = 0
        self.network_rows = 0

    # ---- per-solve state ------------------------------------------------------------------
    def bind(self, x_T: torch.Tensor, noise: Optional[torch.Tensor] = None) -> "BlockMap":
        """x_T (B, C, H, W); noise xi (T, B, C, H, W), or only this block's term rows
        (q1 - q0, B, C, H, W), when eta > 0. Keeps the block's rows of the noise only."""
        own = self.q1 - self.q0
        if self.eta > 0 and noise is None:
            raise ValueError("eta > 0 needs the injected noise xi (T, B, C, H, W); draw it once "
                             "per sample, identically on every time shard")
        if noise is not None:
            if noise.shape[1:] != x_T.shape or noise.shape[0] not in (self.T, own):
                raise ValueError(f"noise must have shape {(self.T,) + tuple(x_T.shape)} (or this block's "
                                 f"{own} rows), got {tuple(noise.shape)}")
            if noise.shape[0] == self.T:
                noise = noise[self.q0:self.q1].clone()     # drop the other blocks' rows
        self.x_T, self.noise = x_T, noise
        dtype, device = x_T.dtype, x_T.device
        scale = self.chain.abar.sqrt().to(device=device, dtype=dtype)              # (T+1,)
        self._scale, self._scale_T = scale[self.block.start:self.block.stop], scale[self.T]
        self._c = self.chain.c[self.q0:self.q1].to(device=device, dtype=dtype)
        self._d = self.chain.d[self.q0:self.q1].to(device=device, dtype=dtype)
        self._timesteps = self.chain.timestep_tensor(device)[self.q0:self.q1]    # time of x_{q+1}
        self._eps = torch.zeros((self.q_states - self.q0,) + tuple(x_T.shape), dtype=dtype, device=device)
        self._eps_top = None
        if self.block.is_last:
            self._eps_top = batched_eps(self.model, x_T[None], self._timesteps[-1:], self.max_batch)[0]
        return self

    def cached_eps(self) -> torch.Tensor:
        """eps of this block's states from the last evaluation without gradient, (q_states - q0, B, ...)."""
        return self._eps

    def top_eps(self) -> Optional[torch.Tensor]:
        """eps(x_T) (B, C, H, W) on the last block, None on the others."""
        return self._eps_top

    def row_shape(self, view: torch.Tensor) -> torch.Tensor:
        return view.reshape(-1, *([1] * (self._eps.dim() - 1)))

    def rows_held(self) -> int:
        """Rows of image size that this map keeps between calls (eps cache, noise, eps(x_T))."""
        noise = 0 if self.noise is None else self.noise.shape[0]
        return self._eps.shape[0] + noise + (self._eps_top is not None)

    # ---- the map --------------------------------------------------------------------------
    def __call__(self, X: torch.Tensor, frozen_from: Optional[int] = None) -> torch.Tensor:
        """X (rows, B, ...) = x_start..x_{stop-1} -> the same rows of h(X); frozen_from global."""
        if self.x_T is None:
            raise RuntimeError("call bind(x_T, noise) before evaluating the map")
        if X.shape[0] != self.block.rows:
            raise ValueError(f"X must hold the block's {self.block.rows} states x_{self.block.start}.."
                             f"x_{self.block.stop - 1}, got {X.shape[0]} rows")
        active = self.T if frozen_from is None else max(1, min(frozen_from, self.T))
        # Term rows q in [q0, fresh_stop) get a new eps of x_{q+1} (local row q + 1 - start).
        fresh_rows = max(0, min(active - 1, self.q_states) - self.q0)
        first = self.q0 + 1 - self.block.start
        fresh = batched_eps(self.model, X[first:first + fresh_rows], self._timesteps[:fresh_rows],
                            self.max_batch)
        self.calls += 1
        self.network_rows += fresh_rows
        parts = [fresh, self._eps[fresh_rows:]]
        if self._eps_top is not None:
            parts.append(self._eps_top[None])
        eps_own = torch.cat(parts)
        if not torch.is_grad_enabled():
            self._eps[:fresh_rows] = fresh
        return self.states_from_eps(eps_own)

    def states_from_eps(self, eps_own: torch.Tensor) -> torch.Tensor:
        """eps of the block's term rows (q1 - q0, B, ...) -> its states (rows, B, ...)."""
        terms = self.row_shape(self._c) * eps_own
        if self.noise is not None:
            terms = terms + self.row_shape(self._d) * self.noise
        total = terms.sum(0, keepdim=True)                          # (1, B, ...): zero when empty
        carry = self.reducer.carry_from_later(total)
        # State x_i takes the terms j > i of this block: the inclusive reverse cumsum from term row
        # i (the first block, q0 = start = 0) or i + 1 (the others, q0 = start - 1), zero past the end.
        suffix = torch.cat([reverse_cumsum(terms), torch.zeros_like(total)])
        offset = self.block.start - self.q0
        later = suffix[offset:offset + self.block.rows] + carry
        y_T = self.x_T / self._scale_T
        return self.row_shape(self._scale) * (y_T[None] + later)
