"""deqlit.sampling.generate in consecutive image batches: the same x_0 as one solve, and one
SolverStats for all the images (combine_stats), against the unbatched solve as the oracle."""
from __future__ import annotations

import pytest
import torch

from deqlit.diffusion.chain import Chain
from deqlit.diffusion.schedule import timestep_sequence
from deqlit.sampling import generate
from tests.conftest import GaussianDataNoise

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("solver,eta", [("newton-scan", 0.0), ("triangular-anderson", 0.5), ("picard", 0.0)])
def test_batches_reproduce_one_solve_image_by_image(solver, eta):
    model = GaussianDataNoise(weight=0.3)
    chain = Chain.from_sequence(model.abar, timestep_sequence(6), eta=eta)
    x_T = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    torch.manual_seed(7)                  # the injected noise (eta > 0) is drawn before batching
    whole, one = generate(model, x_T, chain, solver, tol=1e-6, max_iter=6)
    torch.manual_seed(7)
    split, joined = generate(model, x_T, chain, solver, tol=1e-6, max_iter=6, batch_size=2)
    assert torch.allclose(split, whole, atol=1e-10)
    assert joined.image_iterations == one.image_iterations            # every image stopped alike
    assert joined.image_residual == pytest.approx(one.image_residual, rel=1e-6, abs=1e-14)
    assert joined.iterations == max(joined.image_iterations) == one.iterations
    assert joined.converged == one.converged and joined.exact_by_depth == one.exact_by_depth
    assert len(joined.rel_residual) == joined.iterations
    # A batch stops when its own images have: never more evaluations per image than one solve.
    assert joined.network_rows <= one.network_rows
    if solver == "picard":               # here every image of both solves stops at the same call
        assert joined.network_rows == one.network_rows


def test_batch_size_must_be_positive():
    model = GaussianDataNoise()
    chain = Chain.from_sequence(model.abar, timestep_sequence(3))
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        generate(model, torch.zeros(2, 1, 8, 8, dtype=torch.float64), chain, "picard", batch_size=0)
