"""The fixed-point map h(x_{0:T-1}; x_T) of DEQ-DDIM (paper Eq. 10-13), on any block of its rows.

Chain states x_0 (clean) .. x_T (noise); state x_i (i >= 1) is evaluated by the network at
timestep s_{i-1}. With y_i = x_i / sqrt(abar_i), one DDIM step is
    y_{i-1} = y_i + c_i eps(x_i, s_{i-1}) + d_i xi_i                      (Eq. 13; d = 0 when eta = 0)
so every state is x_T plus the reverse cumulative sum of the terms of all later states. Number the
term by its row q = the state x_{q+1} that makes it (q = 0..T-1):
    tau_q = c_q eps(x_{q+1}) + d_q xi_q,
    x_i   = sqrt(abar_i) * ( x_T / sqrt(abar_T) + sum_{q >= i} tau_q ).                  (Eq. 10)
One evaluation of h runs the network once, batched over all (state, image) rows, then does the
scaled reverse cumulative sum.

Blocks. The map holds the states x_start..x_{stop-1} of one block (blocks.py): one process holds
the block of every row; a time shard holds its own. A block evaluates the network on its own states
only (x_1.. on the first block, which skips x_0; the last block also holds x_T's term, evaluated
once per solve), so no state crosses a block boundary. Its states need
    sum_{q >= i} tau_q = (its own terms q in [i, stop - 1]) + (carry: the totals of all later blocks),
and the carry is the reducer's `carry_from_later` of this block's total (zero in one process; one
all_gather of K images per evaluation across time shards). The block owns the term rows [q0, q1):
q0 = max(start, 1) - 1 and q1 = stop - 1, or T on the last block (x_T's term).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from deqlit.deq.blocks import Block, block_of
from deqlit.deq.reduce import LOCAL, LocalReducer
from deqlit.diffusion.chain import Chain

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
    """h(X; x_T) on the rows of one block: X (rows, B, C, H, W) = x_start..x_{stop-1}.

    block: the rows this map holds; default the block of `reducer` (all T rows in one process).
    Build it, call `bind(x_T, noise)` once per solve, then call it on X. Counts `calls` (batched
    network calls) and `network_rows` (this block's eps evaluations per image).
    Evaluation window (global state indices): states x_k, k >= frozen_from, reuse the eps cached by
    an earlier call (the solvers pass it for states whose inputs can no longer change, solvers.py);
    states x_k, k < fresh_from, also reuse theirs (the sequential solver evaluates one state a call).
    """

    def __init__(self, model: NoiseModel, chain: Chain, max_batch: Optional[int] = None,
                 reducer: LocalReducer = LOCAL, block: Optional[Block] = None):
        block = block if block is not None else block_of(chain.T, reducer.shards, reducer.shard_index)
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

    def like(self) -> "FixedPointMap":
        """A new, unbound map on the same model, chain, block and reducer (for gradient steps)."""
        return FixedPointMap(self.model, self.chain, self.max_batch, self.reducer, self.block)

    # ---- per-solve state ------------------------------------------------------------------
    def bind(self, x_T: torch.Tensor, noise: Optional[torch.Tensor] = None) -> "FixedPointMap":
        """Fix x_T (B, C, H, W) and the injected noise xi (T, B, C, H, W), or only this block's
        term rows (q1 - q0, B, C, H, W), when eta > 0.

        Evaluates eps(x_T) once on the last block: x_T never changes during a solve. Under
        autograd the graph to x_T and to the network's parameters is kept (the gradient steps).
        """
        own = self.q1 - self.q0
        if self.eta > 0 and noise is None:
            raise ValueError("eta > 0 needs the injected noise xi (T, B, C, H, W); draw it once "
                             "per sample (the same on every time shard) and pass it so that every "
                             "solver iteration sees the same")
        if noise is not None:
            if noise.shape[1:] != x_T.shape or noise.shape[0] not in (self.T, own):
                raise ValueError(f"noise must have shape {(self.T,) + tuple(x_T.shape)} (or this block's "
                                 f"{own} rows), got {tuple(noise.shape)}")
            if noise.shape[0] == self.T and own != self.T:
                noise = noise[self.q0:self.q1]             # the other blocks' rows are not needed
        self.x_T, self.noise = x_T, noise
        # The chain's constants follow x_T's device and dtype, copied once per solve.
        dtype, device = x_T.dtype, x_T.device
        scale = self.chain.abar.sqrt().to(device=device, dtype=dtype)              # (T+1,)
        self._scale, self._scale_T = scale[self.block.start:self.block.stop], scale[self.T]
        self._c = self.chain.c[self.q0:self.q1].to(device=device, dtype=dtype)
        self._d = self.chain.d[self.q0:self.q1].to(device=device, dtype=dtype)
        self._timesteps = self.chain.timestep_tensor(device)[self.q0:self.q1]    # time of x_{q+1}
        self._eps = torch.zeros((self.q_states - self.q0,) + tuple(x_T.shape), dtype=dtype, device=device)
        self._eps_seen: Optional[torch.Tensor] = None     # the last call's eps, with or without gradient
        self._eps_top = None
        if self.block.is_last:
            self._eps_top = batched_eps(self.model, x_T[None], self._timesteps[-1:], self.max_batch)[0]
        return self

    def cached_eps(self) -> torch.Tensor:
        """eps of this block's states from the last evaluation without gradient, (q_states - q0, B, ...)."""
        return self._eps

    def scan_coefficients(self) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """The chain's structure for newton_scan.py, per row x_i of the block: (sqrt(abar_i) (rows,),
        the weight c_{i-1} of x_i's eps in the states below it (rows,; 0 for x_0), False: x_i's own
        eps does not enter x_i), float64 on the CPU."""
        c = torch.cat([torch.zeros(1, dtype=torch.float64), self.chain.c.double()])   # of x_0..x_T
        rows = slice(self.block.start, self.block.stop)
        return self.chain.abar.double().sqrt()[rows], c[rows], False

    def row_states(self) -> torch.Tensor:
        """The chain state x_i of every row of the block: i (rows,) long (for newton-scan's table)."""
        return torch.arange(self.block.start, self.block.stop)

    def row_eps(self) -> torch.Tensor:
        """The last call's eps aligned with the block's rows (rows, B, ...), detached, with or
        without gradient: zero for x_0, which makes no term."""
        eps = self._eps if self._eps_seen is None else self._eps_seen
        if self.block.start > 0:
            return eps
        return torch.cat([torch.zeros_like(eps[:1]), eps])

    def top_eps(self) -> Optional[torch.Tensor]:
        """eps(x_T) (B, C, H, W) on the last block (with a graph when x_T requires grad), else None."""
        return self._eps_top

    def row_shape(self, view: torch.Tensor) -> torch.Tensor:
        """Broadcast a (R,) coefficient over (R, B, C, H, W)."""
        return view.reshape(-1, *([1] * (self._eps.dim() - 1)))

    def rows_held(self) -> int:
        """Rows of image size that this map keeps between calls (eps cache, noise, eps(x_T))."""
        noise = 0 if self.noise is None else self.noise.shape[0]
        return self._eps.shape[0] + noise + (self._eps_top is not None)

    # ---- the map --------------------------------------------------------------------------
    def __call__(self, X: torch.Tensor, frozen_from: Optional[int] = None,
                 fresh_from: int = 1) -> torch.Tensor:
        """X (rows, B, ...) = x_start..x_{stop-1} -> the same rows of h(X).

        States x_k with fresh_from <= k < frozen_from (global) get a new eps; the others reuse
        the cache (no gradient through those).
        """
        if self.x_T is None:
            raise RuntimeError("call bind(x_T, noise) before evaluating the map")
        if X.shape[0] != self.block.rows:
            raise ValueError(f"X must hold the block's {self.block.rows} states x_{self.block.start}.."
                             f"x_{self.block.stop - 1}, got {X.shape[0]} rows")
        active = self.T if frozen_from is None else max(1, min(frozen_from, self.T))
        # Term rows q in [lo, hi) get a new eps of x_{q+1} (local row q + 1 - start).
        lo = min(max(self.q0, fresh_from - 1), self.q_states)
        hi = max(lo, min(active - 1, self.q_states))
        first = lo + 1 - self.block.start
        fresh = batched_eps(self.model, X[first:first + hi - lo], self._timesteps[lo - self.q0:hi - self.q0],
                            self.max_batch)
        self.calls += 1
        self.network_rows += hi - lo
        parts = [self._eps[:lo - self.q0], fresh, self._eps[hi - self.q0:]]
        if self._eps_top is not None:
            parts.append(self._eps_top[None])
        eps_own = torch.cat(parts)
        if not torch.is_grad_enabled():
            self._eps[lo - self.q0:hi - self.q0] = fresh
        # newton-scan's secant reads the eps this call saw; the cache above stays as it was under
        # gradient (its frozen rows must not carry a graph), so keep a detached view of the call's.
        self._eps_seen = eps_own[:self._eps.shape[0]].detach()
        return self.states_from_eps(eps_own)

    def states_from_eps(self, eps_own: torch.Tensor) -> torch.Tensor:
        """eps of the block's term rows (q1 - q0, B, ...) -> its states (rows, B, ...) by Eq. 10/13."""
        terms = self.row_shape(self._c) * eps_own
        if self.noise is not None:
            terms = terms + self.row_shape(self._d) * self.noise
        total = terms.sum(0, keepdim=True)                          # (1, B, ...): zero when empty
        carry = self.reducer.carry_from_later(total)
        # State x_i takes the terms q >= i of this block: the inclusive reverse cumsum from term
        # row i, i.e. local row i - q0 (0 on the first block, 1 on the others), zero past the end.
        suffix = torch.cat([reverse_cumsum(terms), torch.zeros_like(total)])
        offset = self.block.start - self.q0
        later = suffix[offset:offset + self.block.rows] + carry
        y_T = self.x_T / self._scale_T
        return self.row_shape(self._scale) * (y_T[None] + later)
