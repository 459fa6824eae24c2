"""How far newton-scan is from Newton with the true Jacobian: the floor of any Jacobian model.

    OMP_NUM_THREADS=1 python bench/newton_floor.py                 # T = 25, 8 seeds (~2 CPU minutes)
    OMP_NUM_THREADS=1 python bench/newton_floor.py --timesteps 25 100 --seeds 4

newton-scan (deq/newton_scan.py) models the noise network's Jacobian by one secant scalar per row
and image, so that its Newton correction is a parallel scan. Exact Newton on the chain (DEER) uses
the network's own Jacobian: the correction dX_r = s_r U_r + R_r, U_{r-1} = U_r + w_r J_r dX_r, taken
row by row from the top with one Jacobian-vector product per row (T sequential JVPs a call: no use
for speed, but it tells how many iterations a better Jacobian model could save). Both count
iterations (batched calls of the chain map) until x_0 is within RMSE 1e-3 of sequential DDIM, as
bench/sampling.py does, on the same seeds of x_T. Writes bench/results/newton_floor.csv.
"""
from __future__ import annotations

import argparse
import statistics
import warnings
from pathlib import Path

from bench_csv import write_csv

import torch
from torch.func import jvp

from deqlit.config import find_config, load_config
from deqlit.deq.fixed_point import FixedPointMap
from deqlit.deq.solvers import solve
from deqlit.diffusion.chain import Chain
from deqlit.diffusion.schedule import timestep_sequence
from deqlit.diffusion.sequential import ddim_sample
from deqlit.models.build import build_noise_model

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_RMSE = 1e-3


class Reached(Exception):
    """Raised from the solver's callback once x_0 is within the target."""


def newton_scan_iterations(model, chain: Chain, x_T: torch.Tensor, ref: torch.Tensor, max_iter: int,
                           jacobian: str = "table") -> int:
    fmap = FixedPointMap(model, chain).bind(x_T)
    calls = []

    def watch(n, stats, fx):
        calls.append(n)
        if float((fx[0] - ref).pow(2).mean().sqrt()) <= TARGET_RMSE:
            raise Reached

    try:
        solve("newton-scan", fmap, x_T[None].expand(chain.T, *x_T.shape).clone(), max_iter=max_iter,
              tol=0.0, jacobian=jacobian, callback=watch)
    except Reached:
        pass
    return calls[-1]


def exact_newton_iterations(model, chain: Chain, seq: list[int], x_T: torch.Tensor, ref: torch.Tensor,
                            max_iter: int) -> int:
    """Newton on X = h(X) with the network's Jacobian (one JVP per row, rows from the top).

    Row r >= 1 holds x_r, evaluated at timestep seq[r - 1] (as the chain map does); its eps enters
    the rows below it with weight w_r (FixedPointMap.scan_coefficients)."""
    fmap = FixedPointMap(model, chain).bind(x_T)
    scale, weight, _ = fmap.scan_coefficients()
    t = torch.tensor(seq)
    X = x_T[None].expand(chain.T, *x_T.shape).clone()
    for n in range(1, max_iter + 1):
        fx = fmap(X)
        if float((fx[0] - ref).pow(2).mean().sqrt()) <= TARGET_RMSE:
            return n
        R = fx - X
        dX, U = torch.zeros_like(X), torch.zeros_like(X[0])
        for r in range(chain.T - 1, -1, -1):
            dX[r] = float(scale[r]) * U + R[r]
            if r >= 1:
                _, J_dx = jvp(lambda x: model(x, t[r - 1:r]), (X[r],), (dX[r],))
                U = U + float(weight[r]) * J_dx
        X = X + dX
    return max_iter


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--timesteps", type=int, nargs="+", default=[25])
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--out", default=str(RESULTS / "newton_floor.csv"))
    args = p.parse_args()
    warnings.simplefilter("ignore", UserWarning)
    model, abar, path = build_noise_model(load_config(find_config("faces")), None)
    print(f"model: {path}")
    rows = []
    for T in args.timesteps:
        seq = timestep_sequence(T)
        chain = Chain.from_sequence(abar, seq)
        for seed in range(args.seeds):
            x_T = torch.randn(1, 1, 32, 32, generator=torch.Generator().manual_seed(seed))
            with torch.no_grad():
                ref = ddim_sample(model, x_T, chain)
                scan = newton_scan_iterations(model, chain, x_T, ref, T)
                scalar = newton_scan_iterations(model, chain, x_T, ref, T, jacobian="scalar")
                exact = exact_newton_iterations(model, chain, seq, x_T, ref, T)
            rows.append({"T": T, "seed": seed, "newton_scan": scan, "newton_scan_scalar": scalar,
                         "exact_newton": exact})
            print(f"T={T} seed={seed}: newton-scan {scan} (scalar Jacobian {scalar}), "
                  f"exact Newton {exact}", flush=True)
        sel = [r for r in rows if r["T"] == T]
        print(f"T={T}: median newton-scan {statistics.median(r['newton_scan'] for r in sel)} "
              f"(scalar {statistics.median(r['newton_scan_scalar'] for r in sel)}), "
              f"exact Newton {statistics.median(r['exact_newton'] for r in sel)}")
    print(f"wrote {write_csv(rows, args.out)}")


if __name__ == "__main__":
    main()
