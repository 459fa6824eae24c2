"""Quasi-Newton on the chain, its correction solved as a parallel scan (`newton-scan`).

The maps. Both chain maps of deqlit have, in the solvers' row order (row r depends on rows >= r),
the form
    h(X)_r = s_r * ( k_r + sum_{r' in S(r)} w_{r'} eps(X_{r'}) ),                        (1)
with constants k_r (x_T's or x_0's scaled state, the fixed eps(x_T) and the injected noise), the
row's sqrt(abar) s_r, and the weight w_{r'} with which row r' enters through its noise prediction:
  forward (fixed_point.py, Eq. 10): row r = x_r, w_r = c_{r-1} (0 for x_0), S(r) = {r' > r};
  inverse (inverse_map.py, Eq. 3):  row r = x_{T-r}, w_r = -c_{T-r-1},      S(r) = {r' >= r}.
The map reports (s, w, inclusive = whether r is in S(r)) by `scan_coefficients()` and the eps of
every row's state at its last call by `row_eps()` (zero for a row that makes no term).

Newton. Solve X = h(X) by X <- X + dX with (I - J_h) dX = R, R = h(X) - X the residual. With the
network's Jacobian modelled by one scalar per row and image, eps(x_r + dx) ~ eps(x_r) + g_r dx,
    dX_r = s_r U_r + R_r,      U_r = sum_{r' in S(r)} w_{r'} g_{r'} dX_{r'},                 (2)
so the new iterate is X_r + dX_r = h(X)_r + s_r U_r: Picard's update plus a correction that needs
no network call. U obeys a first-order linear recurrence from the top (U = 0 above the top row:
x_T, or x_0, is not an unknown). Writing p_r = w_r g_r:
  exclusive (forward):  U_{r-1} = (1 + p_r s_r) U_r + p_r R_r      =: phi_r(U_r),
  inclusive (inverse):  U_r = (U_{r+1} + p_r R_r) / (1 - p_r s_r)  =: phi_r(U_{r+1}),
each phi_r(U) = a_r U + b_r affine, a_r (B,) per image, b_r (B, C, H, W). Then
    U_r = (phi_{r+1} o ... o phi_top)(0)  (exclusive),   U_r = (phi_r o ... o phi_top)(0)  (inclusive).  (3)
Composition (a2, b2) o (a1, b1) = (a2 a1, a2 b1 + b2) is associative, so the prefixes of (3) are
a parallel scan: log2(rows) vectorized steps (Hillis-Steele), no loop over T. Under time shards each
shard composes its block into one map per image; the blocks exchange these (one all_gather of K
maps) and each applies the composition of the later blocks' maps to 0 as its block's incoming U
(the reducer's `compose_from_later`, an affine generalization of the carry of cumulative sums).
g = 0 gives Picard exactly (DEER / quasi-DEER: Lim et al. 2023, Gonzalez et al. 2024).

The Jacobian model (jacobian="table", the default). J_r = rho_{r,b} diag(tau_r) in the orthonormal
2-D Fourier basis of the image: tau_r(k) the network's gain at spatial frequency k for the row's
state, measured once per model and chain (jacobian_table.py: a denoiser keeps low frequencies and
removes high ones, which one scalar cannot say), and rho a scalar secant per row and image,
rho = <eps(x_r) - eps(x'_r), x_r - x'_r> / <x_r - x'_r, tau_r (x_r - x'_r)>, 1 at the first call and
kept where x_r did not move. The recurrence (3) is then diagonal in the Fourier basis: it runs on
the residual's rfft2 with one gain a_r per frequency, and the maps compose elementwise (the shards
exchange a per-frequency a with b). jacobian="scalar": J_r = g I, g = 1 / sqrt(1 - abar_r) (pure
noise) at the first call, then the secant <d eps, d x> / ||d x||^2 (the same code with a flat table:
tau_r = 1 / sqrt(1 - abar_r) at every frequency, g = rho tau_r, rho unclamped). Measured on the shipped faces
model (bench/sampling.py, 8 seeds, median [max] iterations to x_0 within RMSE 1e-3 of sequential
DDIM): T = 25: table 7 [8], scalar 8 [9]; T = 100: table 8 [10], scalar 9 [11] (RHO_RANGE).

The inverse map's safeguards. On inclusive rows the scan divides by 1 - w_r g_r s_r, and the a_r
of (3) are > 1: an error in g is amplified along the chain instead of damped (forward: 0 < a_r < 1).
So there (measured on the shipped faces model, bench/exact_inversion.py):
  - the first call takes Picard's step (g = 0): with the scalar model the pure-noise prior makes
    1 - w g s vanish at x_1 (eps of pure noise cancels that inverse step exactly) and took T = 10
    from 22 dB to 7; with the measured table, a first call from the table gained 0.7 dB at T = 10
    (16 held-out faces, 5 calls: 36.9 against 36.1 dB) but lost 18 dB at T = 100 (4 calls: 43.3
    against 61.1);
  - g is clamped to [0, INVERSE_GAIN_CAP / (w_r s_r)], i.e. a_r <= 1 / (1 - cap) (per frequency
    with the table; its rho is not held to RHO_RANGE);
  - an image whose residual ||R|| grew over its last call has its g scaled by BACKOFF from then on
    (T = 100, 16 held-out faces, 4 / 6 / 12 calls: without it 61.5 dB, then down to 50 after 6;
    0.5: 59.9 / 63.8 / 82.8; 0.7: 61.3 / 67.2 / 95.4; 0.8: 61.9 / 65.8 / 97.1; on 16 training faces
    0.7 beat 0.5 at every point too: 53.7 / 57.1 / 64.4 against 53.0 / 55.5 / 63.3).

Where the inverse map falls short (T = 10; bench/inverse_newton_floor.py, 8 held-out faces, the
extrapolated start, median PSNR of the regenerated faces after 5 calls). The second step
(x_1 -> x_2, t = 0 -> 100) has w g s ~ 0.95 at high frequencies: that row is barely a contraction
(1 / (1 - 0.95) amplifies any error in g twentyfold) and its error sets every later state's (after
5 calls x_2 is at -33 dB RMS, x_T at -15). Newton with the network's true Jacobian (GMRES on JVPs)
reaches 61 dB at 5 calls after a worse first step; newton-scan 35.7: the gap is the Jacobian model.
Tried and not kept: per-row caps (0.4 on the top rows, 0.9 on x_2: 41 dB, not monotone in the
calls), a rho per frequency band (35.7), Anderson on the newton-scan iterates (at most 34.8), a
table measured on the solve's own start states (35.6), a first call from the table (30.5), a
Broyden rank-1 term per row along the last step (40.1 with its Sherman-Morrison denominator kept
above 0.6, 33.7 above 0.05; its maps no longer compose, so no scan and no time shards).
Why no cheap model closes it (x_2's step linearized at the solution, x_1 exact, same 8 faces): at
the inversion's own states the network's gain is below the table's (s w tau 0.96 at the highest
frequencies, measured 0.78: these states are not noised training images), so the uncapped table
expands the error (+24 dB a step); even the best per-image diagonal in the Fourier, Haar or pixel
basis (48 JVP probes each) does not contract (+1 / +2 / +4 dB a step): the Jacobian there is far
from diagonal in any fixed basis. Newton-GMRES with 4 true JVPs a step takes x_2 from -18 to -60
dB in two steps, but its JVPs are sequential; directions chosen one call ahead (the table's Krylov
space of the last residual, probed in the same batched call) gain under 3 dB on Picard. And with
x_1, x_2 pinned to the solution, newton-scan still gives 37.3 dB at 5 calls (45.9 at 6 with the cap
lifted on the other rows): the later rows would need a better model too.

Triangular guarantee (forward). A row whose input X_r and every later row's are exact has R = 0
there, so U_r = 0 on it and on the row below: the update is Picard's on the settled rows, and the
shared loop (solvers._run) also copies h(X) onto them. So after n calls the rows >= T - n are
exact and the solve ends exact at n = T, as for every solver.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional

import torch

from deqlit.deq.reduce import LOCAL, LocalReducer

if TYPE_CHECKING:
    from deqlit.deq.solvers import SolverStats

Map = Callable[..., torch.Tensor]
INVERSE_GAIN_CAP = 0.2      # largest w g s on an inclusive (inverse) row; T = 10: 0.5 lost 1-8 dB
# rho (jacobian="table") is kept within this range of the measured table: a single step's secant
# overshoots now and then (T = 100, 8 seeds: unclamped 8.5 [11] iterations, [0.5, 2] 8 [10],
# [0.3, 3] and [0.3, 1.5] alike on the 4 slowest seeds, [0, 3] worse; T = 25: 7 [9] -> 7 [8]).
RHO_RANGE = (0.5, 2.0)
BACKOFF = 0.7               # g factor of an inverse-map image whose residual grew (0.5: 59.9 dB at T = 100, 4 calls)


def compose_scan(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inclusive prefix compositions of affine maps in application order: map k is applied after
    maps 0..k-1, and out[k] = phi_k o ... o phi_0.

    a (R, B), b (R, B, ...) -> (A (R, B), Bv (R, B, ...)) with phi(U) = a U + b per image.
    Hillis-Steele: ceil(log2 R) rounds of one vectorized composition each.
    """
    view = a.shape + (1,) * (b.dim() - a.dim())
    A, Bv = a, b
    shift = 1
    while shift < a.shape[0]:
        # out[k] <- out[k] o out[k - shift] for k >= shift.
        Bv = torch.cat([Bv[:shift], A[shift:].reshape((-1,) + view[1:]) * Bv[:-shift] + Bv[shift:]])
        A = torch.cat([A[:shift], A[shift:] * A[:-shift]])
        shift *= 2
    return A, Bv


def trailing(t: torch.Tensor, dims: int) -> torch.Tensor:
    """t with singleton dimensions appended up to `dims` (to broadcast over an image's axes)."""
    return t.reshape(t.shape + (1,) * (dims - t.dim()))


def row_maps(scale: torch.Tensor, weight: torch.Tensor, g: torch.Tensor, residual: torch.Tensor,
             inclusive: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The affine maps phi_r of the recurrence for U (module header, (2)-(3)).

    scale, weight (R,); g (R, B) or (R, B, ...) (one gain per component, broadcast over the
    residual's further axes); residual (R, B, ...) -> a (shaped like g), b (R, B, ...).
    """
    p = trailing(weight, g.dim()) * g
    ps = p * trailing(scale, g.dim())
    a = 1.0 / (1.0 - ps) if inclusive else 1.0 + ps
    coef = (a * p if inclusive else p).to(residual.dtype)
    return a.to(residual.dtype), trailing(coef, residual.dim()) * residual


def scan_correction(scale: torch.Tensor, weight: torch.Tensor, inclusive: bool, g: torch.Tensor,
                    residual: torch.Tensor, reducer: LocalReducer = LOCAL) -> torch.Tensor:
    """U of (2) on this block's rows: (R, B, ...). scale, weight (R,), g (R, B) or (R, B, ...)
    (row_maps), residual (R, B, ...).

    The rows run top (last row, next to the fixed end) first; the incoming U at the block's top is
    the later blocks' composed maps applied to 0 (zero on the last block and in one process).
    """
    a, b = row_maps(scale, weight, g, residual, inclusive)
    A, Bv = compose_scan(a.flip(0), b.flip(0))               # top first
    carry_a, carry_b = reducer.compose_from_later(A[-1], Bv[-1])   # the block's map: all its rows
    del carry_a                                              # applied to U = 0 above the top
    if not inclusive:                                        # U_r takes the maps of rows > r only
        A = torch.cat([torch.ones_like(A[:1]), A[:-1]])
        Bv = torch.cat([torch.zeros_like(Bv[:1]), Bv[:-1]])
    U = trailing(A, Bv.dim()) * carry_b[None] + Bv
    return U.flip(0)


def to_frequencies(x: torch.Tensor) -> torch.Tensor:
    """(..., H, W) real -> rfft2 (orthonormal) as a real view (..., H, W // 2 + 1, 2), float64."""
    return torch.view_as_real(torch.fft.rfft2(x.double(), norm="ortho"))


def from_frequencies(z: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Inverse of to_frequencies: (..., H, W // 2 + 1, 2) -> (..., H, W) float64."""
    return torch.fft.irfft2(torch.view_as_complex(z.contiguous()), s=size, norm="ortho")


def table_secant(rho: torch.Tensor, tau: torch.Tensor, eps: torch.Tensor, eps_prev: torch.Tensor,
                 x: torch.Tensor, x_prev: torch.Tensor, weights: torch.Tensor,
                 bounds: Optional[tuple[float, float]] = RHO_RANGE) -> torch.Tensor:
    """The scalar rho per row and image for which rho * tau best explains the last step:
    <d eps, d x> / <d x, tau d x> (both over the full spectrum) clamped to `bounds` (None: not
    clamped), rho kept where x did not move.

    rho (R, B); tau (R, C, H, Wf); eps.. (R, B, C, H, W); weights (Wf,) (rfft_weights) -> (R, B).
    """
    dx = torch.fft.rfft2((x - x_prev).double(), norm="ortho")
    de = torch.fft.rfft2((eps - eps_prev).double(), norm="ortho")
    num = ((dx.conj() * de).real * weights).flatten(2).sum(-1)
    power = dx.abs().pow(2) * weights
    den = (power * tau[:, None]).flatten(2).sum(-1)
    moved = power.flatten(2).sum(-1) > 1e-30 * (x.double().flatten(2).pow(2).sum(-1) + 1e-30)
    usable = moved & (den.abs() > 1e-300)
    fitted = num / torch.where(usable, den, torch.ones_like(den))
    if bounds is not None:
        fitted = fitted.clamp(*bounds)
    return torch.where(usable, fitted, rho)


def chain_structure(f: Map) -> tuple[torch.Tensor, torch.Tensor, bool]:
    if not (hasattr(f, "scan_coefficients") and hasattr(f, "row_eps")):
        raise TypeError("newton-scan needs the chain's structure from the map itself: pass a "
                        "FixedPointMap or InverseChainMap (scan_coefficients, row_eps), not a "
                        "wrapper function; or use picard / triangular-anderson")
    return f.scan_coefficients()


JACOBIANS = ("table", "scalar")


def row_gain_table(f: Map, x0: torch.Tensor, jacobian: str, scale: torch.Tensor) -> torch.Tensor:
    """tau of the map's rows, (R, C, H, W // 2 + 1) float64 on x0's device: measured
    (jacobian_table.py) or, for jacobian="scalar", flat at the pure-noise gain 1 / sqrt(1 - abar)."""
    from deqlit.deq.jacobian_table import gain_table
    if x0.dim() != 5:
        raise ValueError(f"newton-scan needs image rows (R, B, C, H, W), got {tuple(x0.shape)}")
    if jacobian == "scalar":
        prior = (1.0 - scale.pow(2)).clamp(min=1e-12).rsqrt()
        C, H, W = x0.shape[2:]
        return prior.reshape(-1, 1, 1, 1).expand(-1, C, H, W // 2 + 1)
    table = gain_table(f.model, f.chain, tuple(x0.shape[2:]), x0.device, x0.dtype)
    return table[f.row_states().to(table.device)]


def newton_scan(f: Map, x0: torch.Tensor, *, max_iter: int = 50, tol: float = 1e-3,
                jacobian: str = "table", freeze: bool = False, reducer: LocalReducer = LOCAL,
                triangular: bool = True, callback=None) -> tuple[torch.Tensor, SolverStats]:
    """Quasi-Newton on the chain (module header): X <- h(X) + s U, U from a scan of affine maps.
    f must be the chain map itself.

    jacobian: the model of eps's Jacobian per row and image, rho * diag(tau) in the Fourier basis
    with rho a scalar secant. "table" (default): tau the per-frequency gains measured once per
    model and chain (jacobian_table.py); "scalar": tau flat at the pure-noise gain, i.e. one scalar
    secant g = rho / sqrt(1 - abar) (header), no calibration.
    x0 (R, B, C, H, W): this block's rows. Same contract and loop as the other solvers
    (solvers._run): per-image stop, stats as tensors, NaN raised with the iteration, and on the
    forward chain at most T calls.
    """
    from deqlit.deq.jacobian_table import rfft_weights
    from deqlit.deq.solvers import _run       # solvers.py registers this solver: import at call time
    if jacobian not in JACOBIANS:
        raise ValueError(f"newton-scan: jacobian must be one of {', '.join(JACOBIANS)}, got {jacobian!r}")
    scale, weight, inclusive = chain_structure(f)
    dtype = torch.float64
    scale, weight = scale.to(device=x0.device, dtype=dtype), weight.to(device=x0.device, dtype=dtype)
    B = x0.shape[1]
    cap = INVERSE_GAIN_CAP / (weight * scale).clamp(min=1e-300)                 # (R,)
    tau = row_gain_table(f, x0, jacobian, scale)                                # (R, C, H, Wf)
    size, freq_weights = tuple(x0.shape[-2:]), rfft_weights(x0.shape[-1], device=x0.device)
    # The measured table's rho is held to RHO_RANGE on the forward chain only (header).
    bounds = RHO_RANGE if jacobian == "table" and not inclusive else None
    # The inverse map's first call takes Picard's step (header); the forward map's the model's.
    state: dict[str, Optional[torch.Tensor]] = {
        "rho": torch.full((x0.shape[0], B), 0.0 if inclusive else 1.0, dtype=dtype, device=x0.device),
        "eps": None, "backoff": torch.ones(B, dtype=dtype, device=x0.device)}

    def mix(xs, fxs, gs):
        eps = f.row_eps().clone()
        if state["eps"] is not None and len(xs) >= 2:
            state["rho"] = table_secant(state["rho"], tau, eps, state["eps"], xs[-1], xs[-2], freq_weights, bounds)
        state["eps"] = eps
        g = trailing(state["rho"], tau.dim() + 1) * tau[:, None]                # (R, B, C, H, Wf)
        if inclusive:                                  # the inverse map's safeguards (header)
            if len(gs) >= 2:
                norms = reducer.sum(torch.stack([r.double().pow(2).flatten(2).sum((0, 2)) for r in gs[-2:]]))
                state["backoff"] = torch.where(norms[1] > norms[0], state["backoff"] * BACKOFF,
                                               state["backoff"])
            g = torch.minimum(g.clamp(min=0), trailing(cap, g.dim())) * trailing(state["backoff"], g.dim() - 1)
        U = from_frequencies(scan_correction(scale, weight, inclusive, g, to_frequencies(gs[-1]), reducer), size)
        return fxs[-1] + trailing(scale, U.dim()).to(gs[-1].dtype) * U.to(gs[-1].dtype)

    return _run("newton-scan", f, x0, max_iter=max_iter, tol=tol, mix=mix, m=2, freeze=freeze,
                reducer=reducer, triangular=triangular, callback=callback)
