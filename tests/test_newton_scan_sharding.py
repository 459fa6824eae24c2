"""newton-scan over time shards: each shard composes its block's affine maps, the blocks exchange one
map per image (Reducer.compose_from_later), and the result is one process's (float64, 2 gloo
processes; the harness is test_sharding's)."""
from __future__ import annotations

import pytest
import torch

from deqlit.deq.blocks import time_blocks
from deqlit.deq.layer import DEQSampler
from deqlit.deq.newton_scan import scan_correction
from deqlit.diffusion.chain import Chain
from deqlit.diffusion.schedule import alphas_cumprod, linear_betas
from tests.conftest import GaussianDataNoise
from tests.processes import launch, run_in_group

ABAR = alphas_cumprod(linear_betas())
T = 11
CASES = [(eta, freeze) for eta in (0.0, 0.5) for freeze in (False, True)]


def scan_inputs(inclusive: bool):
    gen = torch.Generator().manual_seed(int(inclusive))
    scale = torch.rand(T, generator=gen, dtype=torch.float64) * 0.9 + 0.05
    weight = torch.rand(T, generator=gen, dtype=torch.float64) * (1 if inclusive else -1)
    g = torch.rand(T, 3, generator=gen, dtype=torch.float64) * 2
    R = torch.randn(T, 3, 1, 4, 4, generator=gen, dtype=torch.float64)
    return scale, weight, g, R


def solve_inputs(eta: float):
    gen = torch.Generator().manual_seed(9)
    x_T = torch.randn(2, 1, 8, 8, generator=gen, dtype=torch.float64)
    noise = torch.randn(T, 2, 1, 8, 8, generator=gen, dtype=torch.float64) if eta > 0 else None
    return x_T, noise


def options(freeze: bool) -> dict:
    return dict(max_iter=40, tol=1e-4, freeze=freeze)


def cases(reducer) -> dict:
    out: dict = {}
    block = time_blocks(T, reducer.shards)[reducer.shard_index]
    rows = slice(block.start, block.stop)
    for inclusive in (False, True):
        scale, weight, g, R = scan_inputs(inclusive)
        out[("scan", inclusive)] = scan_correction(scale[rows], weight[rows], inclusive, g[rows], R[rows], reducer)
    net = GaussianDataNoise(seed=1, weight=1.0, dtype=torch.float64)
    for eta, freeze in CASES:
        x_T, noise = solve_inputs(eta)
        with torch.no_grad():
            X, stats = DEQSampler(net, Chain.build(ABAR, T, eta=eta), "newton-scan", options(freeze),
                                  reducer=reducer)(x_T, noise)
        out[(eta, freeze)] = dict(X=X, iterations=stats.iterations, image_iterations=stats.image_iterations,
                                  network_rows=stats.network_rows)
    return out


def worker(rank: int, world: int, port: int, job: str, out_dir: str) -> None:
    from deqlit.parallel.distributed import DistributedReducer
    run_in_group(rank, world, port, out_dir, 30, lambda: cases(DistributedReducer()))


@pytest.fixture(scope="module")
def two_shards(tmp_path_factory):
    results = launch(2, "newton-scan", tmp_path_factory.mktemp("newton_scan"), worker)
    for r, res in enumerate(results):
        assert res is not None and "error" not in res, f"rank {r}: {res and res.get('trace')}"
    return [res["cases"] for res in results]


@pytest.mark.parametrize("inclusive", [False, True])
def test_sharded_scan_equals_one_process(two_shards, inclusive):
    one = scan_correction(*scan_inputs(inclusive)[:2], inclusive, *scan_inputs(inclusive)[2:])
    sharded = torch.cat([two_shards[r][("scan", inclusive)] for r in range(2)])
    assert (sharded - one).abs().max() <= 1e-6 * max(1.0, float(one.abs().max()))


@pytest.mark.parametrize("eta, freeze", CASES)
def test_sharded_newton_scan_equals_one_process(two_shards, eta, freeze):
    net = GaussianDataNoise(seed=1, weight=1.0, dtype=torch.float64)
    x_T, noise = solve_inputs(eta)
    with torch.no_grad():
        X1, s1 = DEQSampler(net, Chain.build(ABAR, T, eta=eta), "newton-scan", options(freeze))(x_T, noise)
    X = torch.cat([two_shards[r][(eta, freeze)]["X"] for r in range(2)])
    assert (X - X1).abs().max() <= 1e-6
    for r in range(2):
        got = two_shards[r][(eta, freeze)]
        assert got["iterations"] == s1.iterations and min(s1.image_iterations) < T   # tol stops some
        assert got["image_iterations"] == s1.image_iterations
        assert got["network_rows"] == s1.network_rows
