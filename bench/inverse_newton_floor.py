"""How far newton-scan is from Newton with the true Jacobian on the inverse chain (exact inversion).

    OMP_NUM_THREADS=2 python bench/inverse_newton_floor.py        # T = 10, 8 held-out faces (~8 CPU minutes)

Exact inversion over all timesteps (deq/inverse_map.py, Eq. 3) solves X = G(X; x_0) for the states
x_1..x_T. newton-scan models the noise network's Jacobian per state by a per-frequency gain table
times a secant scalar, capped on this chain (deq/newton_scan.py). Exact Newton solves
(I - J_G) dX = R with the network's own Jacobian, here by GMRES on all T states at once with
--krylov Jacobian-vector products per Newton step (sequential JVPs: no use for speed, but it tells
what a better Jacobian model could reach in the same number of calls). Both start from the
extrapolated start (second-order DDIM inversion, T sequential calls); after each call the latent
x_T is regenerated with the sequential DDIM chain and scored by PSNR against the face, median over
the faces, as bench/exact_inversion.py does. Also printed: each state's RMS distance to the
converged solution (per-step Anderson to tol 1e-7), which shows where the model falls short.
Writes bench/results/inverse_newton_floor.csv.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from bench_csv import write_csv

import torch
from torch.func import jvp
from torchmetrics.functional.image import peak_signal_noise_ratio

from deqlit.config import find_config, load_config
from deqlit.data.registry import load_images
from deqlit.deq.inverse_map import InverseChainMap, exact_invert
from deqlit.diffusion.chain import Chain
from deqlit.diffusion.inverse import extrapolated_inversion_states
from deqlit.diffusion.sequential import ddim_sample
from deqlit.models.build import build_noise_model

RESULTS = Path(__file__).resolve().parent / "results"


def median_psnr(model, x_T: torch.Tensor, faces: torch.Tensor, chain: Chain) -> float:
    with torch.no_grad():
        rec = ddim_sample(model, x_T, chain).clamp(-1, 1)
    return float(torch.stack([peak_signal_noise_ratio(rec[b:b + 1], faces[b:b + 1], data_range=2.0)
                              for b in range(len(faces))]).median())


def row_errors_db(X: torch.Tensor, solution: torch.Tensor) -> list[float]:
    """Per state (natural order), the median over images of the RMS distance to the solution, in dB."""
    rms = (X - solution).double().flatten(2).pow(2).mean(-1).sqrt().clamp(min=1e-12)
    return [round(float(v), 1) for v in (20 * rms.log10()).median(1).values]


def gmres(apply, b: torch.Tensor, k: int) -> torch.Tensor:
    """k steps of GMRES from 0 for apply(x) = b, separately per image (dim 1 of (T, B, ...))."""
    B = b.shape[1]
    view = (1, B) + (1,) * (b.dim() - 2)

    def dot(u, v):
        return (u.double() * v.double()).sum(dim=[d for d in range(b.dim()) if d != 1])
    beta = dot(b, b).sqrt()
    basis = [b / beta.reshape(view).to(b.dtype)]
    hessenberg = torch.zeros(k + 1, k, B, dtype=torch.float64)
    for j in range(k):
        w = apply(basis[j])
        for i in range(j + 1):                       # modified Gram-Schmidt
            h = dot(w, basis[i])
            hessenberg[i, j] = h
            w = w - h.reshape(view).to(w.dtype) * basis[i]
        norm = dot(w, w).sqrt()
        hessenberg[j + 1, j] = norm
        basis.append(w / norm.clamp(min=1e-30).reshape(view).to(w.dtype))
    rhs = torch.zeros(B, k + 1, 1, dtype=torch.float64)
    rhs[:, 0, 0] = beta
    y = torch.linalg.lstsq(hessenberg.permute(2, 0, 1), rhs).solution[..., 0]      # (B, k)
    return sum(y[:, j].reshape(view).to(b.dtype) * basis[j] for j in range(k))


def exact_newton(model, faces, chain, start, calls: int, krylov: int, solution) -> list[dict]:
    """Newton with the true Jacobian, natural order; rows scored after each call of G."""
    G = InverseChainMap(model, chain, faces)
    times = chain.timestep_tensor(faces.device).repeat_interleave(faces.shape[0])     # x_1..x_T's
    offset = G.states_from_eps(torch.zeros((chain.T,) + tuple(faces.shape), dtype=faces.dtype))

    def G_natural(X):
        with torch.no_grad():
            return G(X.flip(0)).flip(0)

    def jacobian_times(X, V):                        # G is affine in eps: J_G V = G(J_eps V) - G(0)
        flat, tangent = X.reshape(-1, *X.shape[2:]), V.reshape(-1, *X.shape[2:])
        _, d_eps = jvp(lambda x: model(x, times), (flat,), (tangent,))
        return G.states_from_eps(d_eps.reshape(X.shape)) - offset

    rows, X = [], start.clone()
    for n in range(1, calls + 1):
        GX = G_natural(X)                            # call n: G at the n-th iterate
        rows.append(dict(method="exact Newton (GMRES, true JVPs)", call=n,
                         median_psnr=round(median_psnr(model, GX[-1], faces, chain), 2),
                         row_error_db=row_errors_db(GX, solution)))
        print(rows[-1], flush=True)
        if n == calls:
            break
        R = GX - X
        X = X + gmres(lambda V: V - jacobian_times(X, V), R, krylov)
    return rows


def newton_scan(model, faces, chain, start, calls: int, solution) -> list[dict]:
    seen = {}
    exact_invert(model, faces, chain, mode="all-timesteps", solver="newton-scan", max_iter=calls,
                 tol=0.0, init=start, on_fail="return",
                 callback=lambda n, stats, fx: seen.__setitem__(n, fx.flip(0).clone()))
    rows = []
    for n in sorted(seen):
        rows.append(dict(method="newton-scan (table)", call=n,
                         median_psnr=round(median_psnr(model, seen[n][-1], faces, chain), 2),
                         row_error_db=row_errors_db(seen[n], solution)))
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--timesteps", type=int, default=10)
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--calls", type=int, default=6)
    p.add_argument("--krylov", type=int, default=30, help="GMRES steps (JVPs) per Newton step")
    p.add_argument("--out", default=str(RESULTS / "inverse_newton_floor.csv"))
    args = p.parse_args()
    model, abar, _ = build_noise_model(load_config(find_config("faces")))
    model.requires_grad_(False)
    faces = load_images("faces", "test", 32, 1, limit=args.images)
    chain = Chain.build(abar, args.timesteps)
    with torch.no_grad():
        start = extrapolated_inversion_states(model, faces, chain)
    _, solution, _ = exact_invert(model, faces, chain, mode="per-step", solver="anderson", max_iter=40,
                                  tol=1e-7, on_fail="return")
    print(f"start: {median_psnr(model, start[-1], faces, chain):.2f} dB, state errors "
          f"{row_errors_db(start, solution)} dB", flush=True)
    rows = newton_scan(model, faces, chain, start, args.calls, solution)
    rows += exact_newton(model, faces, chain, start, args.calls, args.krylov, solution)
    for r in rows:
        r.update(T=args.timesteps, images=args.images, krylov=args.krylov if "exact" in r["method"] else "")
        r["row_error_db"] = " ".join(str(v) for v in r["row_error_db"])
    write_csv(rows, Path(args.out), ["T", "images", "method", "call", "krylov", "median_psnr", "row_error_db"])
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
