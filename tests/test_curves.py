"""What a user sees: solver printouts, the curves every job logs (read back from TensorBoard's
event files), and the pictures of an inversion run."""
from __future__ import annotations

import torch

from deqlit.commands.sample import main as sample_main
from deqlit.deq.solvers import solve


def lower_triangular_map(T: int):
    """Row r of f(X) depends on rows > r only: exact after T calls whatever the start."""
    weights = torch.tril(torch.full((T, T), 0.5), diagonal=-1).flip(0).flip(1)   # row r <- rows > r

    def f(X):
        return torch.ones_like(X) + torch.einsum("rs,s...->r...", weights, X)
    return f


def test_the_triangular_guarantee_is_reported_as_exact_and_only_then():
    T = 4
    X0 = torch.zeros(T, 2, 3)
    _, stats = solve("picard", lower_triangular_map(T), X0, max_iter=50, tol=0.0)
    assert stats.iterations == T and stats.exact_by_depth and stats.converged
    _, short = solve("picard", lower_triangular_map(T), X0, max_iter=T - 1, tol=0.0)
    assert not short.exact_by_depth and not short.converged
    # The inverse chain's rows depend on themselves: no guarantee, however many calls.
    _, loose = solve("picard", lambda X: 0.5 * X + 1, X0, max_iter=T + 2, tol=0.0, triangular=False)
    assert loose.iterations == T + 2 and not loose.exact_by_depth


def test_sample_says_exact_after_T_iterations_not_a_residual_above_tol(tmp_path, capsys):
    metrics = sample_main(["--timesteps", "5", "--num-images", "1", "--tol", "1e-12", "--max-iter", "100",
                           "--no-progress", "--out", str(tmp_path / "a")])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert metrics["exact_by_depth"] and metrics["iterations"] == 5
    assert "exact after T = 5 iterations" in last and "NOT converged" not in last
    metrics = sample_main(["--timesteps", "5", "--num-images", "1", "--tol", "1e-12", "--max-iter", "3",
                           "--no-progress", "--out", str(tmp_path / "b")])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert not metrics["exact_by_depth"] and "NOT converged" in last and "exact after" not in last
