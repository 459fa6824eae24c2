"""What an exact inversion did, per image and per state, and the error when it did not converge."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from deqlit.diffusion.chain import Chain
from deqlit.diffusion.inverse import contraction_factors


@dataclass
class InversionReport:
    """Residuals are relative, ||g(x) - x|| / (1e-5 + ||g(x)||), at each image's stop.

    row_residual[i-1][b]: state x_i of image b. image_residual[b]: the stopping residual (all
    timesteps: over all states at once; per step: the worst step's). image_iterations[b]: solver
    iterations (per step: summed over the steps). network_evals[b]: eps evaluations that a solve of
    image b alone needs, its start included. depth: batched network calls one after another for the
    batch (start included; start_depth of them for the start). contraction[i-1] = |c_i| sqrt(abar_i):
    step i is a contraction when this times Lip(eps) < 1.
    state_trace[i-1][n-1]: the worst image's relative residual of state x_i after solver call n
    (per step: the calls of step i's own solve; all timesteps: the shared calls of the one solve).
    call_trace[n-1]: the worst image's residual over all states after call n (all timesteps only).
    """
    row_residual: list[list[float]]
    image_residual: list[float]
    image_iterations: list[int]
    network_evals: list[int]
    depth: int
    start_depth: int
    mode: str = ""
    solver: str = ""
    tol: float = 0.0
    contraction: list[float] = field(default_factory=list)
    timesteps: list[int] = field(default_factory=list)
    image_converged: list[bool] = field(default_factory=list)
    converged: bool = False
    state_trace: list[list[float]] = field(default_factory=list)
    call_trace: list[float] = field(default_factory=list)

    def finalize(self, tol: float) -> None:
        self.tol = tol
        self.image_converged = [r < tol for r in self.image_residual]
        self.converged = all(self.image_converged)

    def failed_images(self) -> list[int]:
        return [b for b, ok in enumerate(self.image_converged) if not ok]

    def failed_states(self) -> list[int]:
        """States i (1..T) above tol in some image that missed tol; at least each such image's worst."""
        bad = set()
        for b in self.failed_images():
            column = [row[b] for row in self.row_residual]
            above = [i + 1 for i, r in enumerate(column) if r >= self.tol]
            bad.update(above or [1 + max(range(len(column)), key=column.__getitem__)])
        return sorted(bad)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class InversionNotConverged(RuntimeError):
    """Exact inversion missed its tolerance; `report` holds the per-state residuals."""

    def __init__(self, message: str, report: InversionReport):
        super().__init__(message)
        self.report = report


def condition_text(chain: Chain) -> str:
    factors = contraction_factors(chain)
    worst = int(factors.argmax())
    return (f"Each inverse step x_i = sqrt(abar_i) (y_(i-1) - c_i eps(x_i)) is a fixed point that "
            f"converges when it is a contraction, |c_i| sqrt(abar_i) Lip(eps) < 1; the largest "
            f"|c_i| sqrt(abar_i) of this chain is {float(factors[worst]):.3g} (state x_{worst + 1}), "
            f"so eps may change by at most {1 / float(factors[worst]):.3g} per unit change of x there")


def failure_message(report: InversionReport, max_iter: int) -> str:
    images = report.failed_images()
    states = report.failed_states()
    shown = ", ".join(
        f"x_{i} (t={report.timesteps[i - 1]}, residual {max(report.row_residual[i - 1][b] for b in images):.2e}, "
        f"converges if Lip(eps) < {1 / report.contraction[i - 1]:.3g})" for i in states[:8])
    more = f" and {len(states) - 8} more" if len(states) > 8 else ""
    worst = max(report.image_residual[b] for b in images)
    budget = "per step" if report.mode == "per-step" else "in all"
    return (f"exact inversion ({report.mode}, {report.solver}) did not converge for image(s) {images}: "
            f"worst residual {worst:.2e} >= tol {report.tol:g} after max_iter = {max_iter} iterations "
            f"{budget}. States above tol: {shown}{more}. Each inverse step x_i = sqrt(abar_i) "
            f"(y_(i-1) - c_i eps(x_i)) converges when it is a contraction, |c_i| sqrt(abar_i) Lip(eps) "
            f"< 1, i.e. eps may change by at most 1 / (|c_i| sqrt(abar_i)) per unit change of x_i. "
            f"What helps: {remedies(len(report.timesteps), report.mode, report.solver, max_iter)}; "
            f"or keep these latents with --inversion.exact.on_fail warn (exact_invert(on_fail="
            f"'return'): report.converged is False)")


def remedies(T: int, mode: str, solver: str, max_iter: int, precision: Optional[str] = None,
             tol: Optional[float] = None) -> str:
    """What may make an exact inversion converge, as invert.py's flags (exact_invert's arguments
    of the same names). More timesteps first: on the faces' training images at T = 10, per-step
    Anderson stalls at residual 3e-2 (44 dB) with max_iter 20, 50 or 100 and with beta 0.5, and
    converges at T = 20 (86 dB); smaller steps shrink |c_i|, the contraction factor. Before all,
    a half `precision` whose rounding is above `tol` (devices.UNIT_ROUNDOFF): no step count or
    iteration budget gets the residual below it (bf16-mixed, T = 10, 2 faces: residuals up to 1.8e-3
    at tol 1e-4 after 20 iterations a step, 55.7 dB; stopped at tol 4e-3 instead, 45.0 dB)."""
    from deqlit.devices import UNIT_ROUNDOFF
    budget = "per step" if mode == "per-step" else "in all"
    u = UNIT_ROUNDOFF.get(str(precision))
    rounding = [f"--trainer.precision 32-true ({precision} rounds to {u:.1e}, above tol {tol:g}: no "
                f"iteration budget gets the residual below it, though the latents still improve)"] \
        if u is not None and tol is not None and tol < u else []
    tips = rounding + [f"more timesteps, e.g. --timesteps {2 * T} (smaller steps are closer to contractions)",
            f"a larger --inversion.exact.max_iter (now {max_iter} {budget})"]
    if "anderson" not in solver:
        tips.append("--inversion.exact.solver anderson")
    return ", ".join(tips)
