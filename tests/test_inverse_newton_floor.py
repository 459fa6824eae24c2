"""bench/inverse_newton_floor.py: Newton with the true Jacobian on the inverse chain (the floor of
newton-scan's Jacobian model for exact inversion)."""
from __future__ import annotations

import pytest
import torch

from tests.tiny import load_script

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def floor():
    return load_script("bench/inverse_newton_floor.py", "inverse_newton_floor")


def test_gmres_solves_each_images_system_like_a_dense_solve(floor):
    """Batched GMRES with as many steps as unknowns is exact, separately per image (dim 1)."""
    g = torch.Generator().manual_seed(0)
    T, B, n = 2, 3, 4                                     # 8 unknowns per image
    mats = torch.eye(T * n, dtype=torch.float64) + 0.3 * torch.randn(B, T * n, T * n, generator=g,
                                                                       dtype=torch.float64)
    b = torch.randn(T, B, 1, 1, n, generator=g, dtype=torch.float64)

    def apply(x):                                         # image b's matrix on its own unknowns
        flat = x.permute(1, 0, 2, 3, 4).reshape(B, T * n, 1)
        return (mats @ flat).reshape(B, T, 1, 1, n).permute(1, 0, 2, 3, 4)
    x = floor.gmres(apply, b, T * n)
    expected = torch.linalg.solve(mats, b.permute(1, 0, 2, 3, 4).reshape(B, T * n, 1))
    assert torch.allclose(x.permute(1, 0, 2, 3, 4).reshape(B, T * n, 1), expected, atol=1e-9)


def test_exact_newton_inverts_a_linear_network_in_one_step(floor):
    """With eps linear in x (Gaussian data), one Newton step is the exact inverse chain: at the
    second call every state equals the per-step solution (the start is far from it)."""
    from deqlit.deq.inverse_map import exact_invert
    from deqlit.diffusion.chain import Chain
    from deqlit.diffusion.inverse import extrapolated_inversion_states
    from deqlit.diffusion.schedule import timestep_sequence
    from tests.conftest import GaussianDataNoise
    model = GaussianDataNoise(weight=0.0)
    chain = Chain.from_sequence(model.abar, timestep_sequence(5))
    faces = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2 - 1
    with torch.no_grad():
        start = extrapolated_inversion_states(model, faces, chain)
    _, solution, _ = exact_invert(model, faces, chain, mode="per-step", solver="anderson", max_iter=60,
                                  tol=1e-13, on_fail="return")
    rows = floor.exact_newton(model, faces, chain, start, calls=2, krylov=6, solution=solution)
    assert [r["call"] for r in rows] == [1, 2]
    assert max(rows[0]["row_error_db"]) > -100                   # the start is not the solution
    assert max(rows[1]["row_error_db"]) < -180, rows[1]          # one Newton step is (float64)
