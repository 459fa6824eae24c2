"""Time sharding (deqlit/parallel): K processes, each holding a block of the T chain rows, give what
one process gives. The oracle is the unsharded DEQSampler in this process; the sharded runs are
gloo process groups on CPU in spawned subprocesses, each running all its cases in one start."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from deqlit.deq.layer import DEQSampler
from deqlit.diffusion.chain import Chain
from deqlit.diffusion.schedule import alphas_cumprod, linear_betas
from deqlit.deq.blocks import time_blocks
from deqlit.deq.reduce import LOCAL
from tests import processes
from tests.conftest import GaussianDataNoise
from tests.processes import run_in_group

ABAR = alphas_cumprod(linear_betas())
T = 11                                   # divisible by neither 2 nor 4
SOLVERS = ["picard", "anderson", "triangular-anderson"]
CASES = [(s, eta, freeze) for s in SOLVERS for eta in (0.0, 0.5) for freeze in (False, True)]
STALL_S, STALL_TIMEOUT_S = 6.0, 3.0
TOL = 1e-2          # loose enough that some solves stop on it (and freeze rows) before T
# 4 processes on the tests' 2 cores: one case a solver, eta 0 and 0.5 and both freeze modes among them
WORLD4_CASES = [("picard", 0.0, False), ("anderson", 0.5, True), ("triangular-anderson", 0.5, True)]


def inputs(eta: float, batch: int = 2):
    gen = torch.Generator().manual_seed(5)
    x_T = torch.randn(batch, 1, 8, 8, generator=gen, dtype=torch.float64)
    noise = torch.randn(T, batch, 1, 8, 8, generator=gen, dtype=torch.float64) if eta > 0 else None
    return x_T, noise


def options(freeze: bool) -> dict:
    return dict(max_iter=40, tol=TOL, freeze=freeze)


def loss_weights(batch: int = 2) -> torch.Tensor:
    return torch.randn(T, batch, 1, 8, 8, generator=torch.Generator().manual_seed(8), dtype=torch.float64)


GRAD_CASES = [(mode, trainable) for mode in ("onestep", "ift") for trainable in (False, True)]


def gradients(mode: str, trainable: bool, reducer=LOCAL) -> dict:
    """d/d(x_T, noise, weights) of a weighted sum of all chain states, through grad `mode`; each
    shard's parts summed over the group (one process: the gradients themselves)."""
    model = GaussianDataNoise(dtype=torch.float64).requires_grad_(trainable)
    x_T, noise = inputs(0.5)
    x_T.requires_grad_(True)
    noise.requires_grad_(True)
    sampler = DEQSampler(model, Chain.build(ABAR, T, eta=0.5), "anderson", options(False), grad=mode,
                         reducer=reducer)
    X, _ = sampler(x_T, noise)
    (loss_weights()[sampler.block.start:sampler.block.stop] * X).sum().backward()
    params = [p for p in model.parameters() if p.requires_grad]
    reducer.sum_gradients([x_T, noise, *params])
    return dict(x_T=x_T.grad, noise=noise.grad, params=[p.grad for p in params])


# ---- the processes ---------------------------------------------------------------------------
class NaNOnShard(torch.nn.Module):
    """Returns NaN from its `at`-th call on shard `shard` only."""

    def __init__(self, model, shard: int, at: int):
        super().__init__()
        self.model, self.shard, self.at, self.calls = model, shard, at, 0

    def forward(self, x, t):
        self.calls += 1
        out = self.model(x, t)
        if dist.get_rank() == self.shard and self.calls >= self.at:
            out = out * float("nan")
        return out


def check_strategy() -> dict:
    """The ddp_time strategy's pieces on the running 4-process world (data 2 x time 2): the
    sampler's replicas, its gradient hook on a DDP model, and its metric reduction."""
    from torch.nn.parallel import DistributedDataParallel
    from deqlit.lit.time_strategy import DDPTimeStrategy, time_sum_data_mean_hook
    from deqlit.parallel.mesh import build_time_mesh
    strategy = DDPTimeStrategy(time_shards=2)
    strategy.mesh = build_time_mesh(2)                  # what setup_distributed does
    model = DistributedDataParallel(torch.nn.Linear(3, 1, bias=False).double())
    model.register_comm_hook(strategy.mesh.data, time_sum_data_mean_hook)
    rank = dist.get_rank()
    (model(torch.ones(1, 3, dtype=torch.float64)).sum() * (rank + 1)).backward()
    metric = strategy.reduce(torch.tensor(float(rank)), reduce_op="mean")
    return dict(sampler=strategy.distributed_sampler_kwargs, grad=model.module.weight.grad.clone(),
                metric=float(metric), reducer_shard=strategy.time_reducer.shard_index)


def run_cases(job: str, reducer) -> dict:
    from deqlit.deq.solvers import SolverDivergedError
    from deqlit.deq.layer import DEQSampler
    from deqlit.sampling import generate
    net = GaussianDataNoise(dtype=torch.float64)
    out: dict = {}
    if job in ("world2", "world4"):
        for solver, eta, freeze in CASES if job == "world2" else WORLD4_CASES:
            chain = Chain.build(ABAR, T, eta=eta)
            x_T, noise = inputs(eta)
            rows_seen = []
            opts = dict(options(freeze), callback=lambda n, stats, fx: rows_seen.append(fx.shape[0]))
            with torch.no_grad():
                sampler = DEQSampler(net, chain, solver, opts, reducer=reducer)
                X, stats = sampler(x_T, noise)
                x_0 = None if freeze else generate(net, x_T, chain, solver, noise=noise, reducer=reducer,
                                                   **options(freeze))[0]
            out[(solver, eta, freeze)] = dict(X=X, x_0=sampler.first_state(X), generated=x_0,
                                              iterations=stats.iterations, network_rows=stats.network_rows,
                                              rel=stats.rel_residual, rows=max(rows_seen),
                                              held=sampler.last_map.rows_held())
        for mode, trainable in GRAD_CASES if job == "world2" else ():
            out[("grad", mode, trainable)] = gradients(mode, trainable, reducer)
        if job == "world2":     # the chain one state a call, through the same block map
            x_T, noise = inputs(0.5)
            with torch.no_grad():
                sampler = DEQSampler(net, Chain.build(ABAR, T, eta=0.5), "sequential", reducer=reducer)
                X, stats = sampler(x_T, noise)
            out["sequential"] = dict(X=X, x_0=sampler.first_state(X), network_rows=stats.network_rows,
                                     iterations=stats.iterations)
    if job == "world4":
        # The same 4 processes as a data 2 x time 2 mesh: replica d samples image d of the batch.
        from deqlit.parallel.mesh import build_time_mesh
        mesh = build_time_mesh(2)
        time_reducer = mesh.time_reducer()
        for solver in SOLVERS:
            chain = Chain.build(ABAR, T, eta=0.5)
            x_T, noise = inputs(0.5)
            mine = mesh.data_slice(x_T.shape[0])
            with torch.no_grad():
                sampler = DEQSampler(net, chain, solver, options(True), reducer=time_reducer)
                X, stats = sampler(x_T[mine], noise[:, mine])
            out[("mesh", solver)] = dict(X=X, x_0=sampler.first_state(X), images=mine,
                                         image_iterations=stats.image_iterations,
                                         mesh=(mesh.data_index, mesh.time_index))
        out["strategy"] = check_strategy()
    if job == "world2":
        # Every process raises at the same iteration, after the same collectives: the group stays
        # usable, so these run in the same processes.
        for solver in SOLVERS:
            chain = Chain.build(ABAR, T)
            x_T, _ = inputs(0.0)
            model = NaNOnShard(net, shard=1, at=4)
            try:
                with torch.no_grad():
                    DEQSampler(model, chain, solver, dict(max_iter=40, tol=0.0), reducer=reducer)(x_T)
                out[("nan", solver)] = "no error"
            except SolverDivergedError as err:
                out[("nan", solver)] = str(err)
    elif job == "stall":
        chain = Chain.build(ABAR, T)
        x_T, _ = inputs(0.0)
        if reducer.shard_index == 1:
            time.sleep(STALL_S)           # alive but silent: only the group's timeout ends the wait
            return out
        with torch.no_grad():
            DEQSampler(net, chain, "picard", dict(max_iter=40, tol=0.0), reducer=reducer)(x_T)
    elif job == "die":
        chain = Chain.build(ABAR, T)
        x_T, _ = inputs(0.0)
        if reducer.shard_index == 1:
            os._exit(3)                   # a crashed process: no goodbye to the group
        with torch.no_grad():
            DEQSampler(net, chain, "picard", dict(max_iter=40, tol=0.0), reducer=reducer)(x_T)
    return out


def worker(rank: int, world: int, port: int, job: str, out_dir: str) -> None:
    from deqlit.parallel.distributed import DistributedReducer
    run_in_group(rank, world, port, out_dir, STALL_TIMEOUT_S if job == "stall" else 30,
                 lambda: run_cases(job, DistributedReducer()))


def launch(world: int, job: str, out_dir: Path, wait_s: float = 240.0) -> list[dict]:
    """processes.launch with this module's worker."""
    return processes.launch(world, job, out_dir, worker, wait_s)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """world -> per-rank results of the job 'world2' or 'world4', started once per world size."""
    cache: dict[int, list[dict]] = {}

    def get(world: int) -> list[dict]:
        if world not in cache:
            results = launch(world, f"world{world}", tmp_path_factory.mktemp(f"world{world}"))
            for r, res in enumerate(results):
                assert res is not None and "error" not in res, f"rank {r}: {res and res.get('trace')}"
            cache[world] = [res["cases"] for res in results]
        return cache[world]
    return get


def reference(solver: str, eta: float, freeze: bool):
    chain = Chain.build(ABAR, T, eta=eta)
    x_T, noise = inputs(eta)
    with torch.no_grad():
        return DEQSampler(GaussianDataNoise(dtype=torch.float64), chain, solver, options(freeze))(x_T, noise)


# ---- the tests -------------------------------------------------------------------------------
def test_blocks_cover_the_rows_contiguously_with_the_top_block_next_to_x_T():
    blocks = time_blocks(11, 4)
    assert [(b.start, b.stop) for b in blocks] == [(0, 3), (3, 6), (6, 9), (9, 11)]
    assert blocks[0].is_first and blocks[-1].is_last and not blocks[1].is_last
    with pytest.raises(ValueError, match="at most 3 time shards"):
        time_blocks(3, 4)


def test_one_shard_is_the_unsharded_sampler_exactly():
    from deqlit.deq.layer import DEQSampler
    for solver, eta, freeze in CASES[::3]:
        X1, s1 = reference(solver, eta, freeze)
        x_T, noise = inputs(eta)
        with torch.no_grad():
            X2, s2 = DEQSampler(GaussianDataNoise(dtype=torch.float64), Chain.build(ABAR, T, eta=eta), solver, options(freeze), reducer=LOCAL)(x_T, noise)
        assert torch.equal(X1, X2) and s1.iterations == s2.iterations and s1.network_rows == s2.network_rows


@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_sharded_sampling_equals_one_process(sharded, world):
    ranks = sharded(world)
    blocks = time_blocks(T, world)
    for case in CASES if world == 2 else WORLD4_CASES:
        X1, s1 = reference(*case)
        X = torch.cat([ranks[r][case]["X"] for r in range(world)])
        assert X.shape == X1.shape
        assert (X - X1).abs().max() <= 1e-6, case
        for r in range(world):   # x_0 reaches every process, by the layer and by generate()
            assert (ranks[r][case]["x_0"] - X1[0]).abs().max() <= 1e-6
            if ranks[r][case]["generated"] is not None:
                assert (ranks[r][case]["generated"] - X1[0]).abs().max() <= 1e-6
            assert ranks[r][case]["iterations"] == s1.iterations, case
            assert ranks[r][case]["network_rows"] == s1.network_rows, case   # freezing: global rows
            assert ranks[r][case]["rel"] == pytest.approx(s1.rel_residual, rel=1e-6, abs=1e-12)
            assert ranks[r][case]["rows"] == blocks[r].rows
    assert any(ranks[0][c]["iterations"] < T for c in CASES if c in ranks[0])   # some stop on tol


@pytest.mark.slow
def test_data_2_by_time_2_mesh_equals_one_process(sharded):
    """Ranks (d, t) = (r // 2, r % 2): replica d solves image d over the time shards t = 0, 1."""
    ranks = sharded(4)
    blocks = time_blocks(T, 2)
    for solver in SOLVERS:
        X1, s1 = reference(solver, 0.5, True)
        for r, rank in enumerate(ranks):
            got = rank[("mesh", solver)]
            d, t = got["mesh"]
            assert (d, t) == (r // 2, r % 2) and got["images"] == slice(d, d + 1)
            assert (got["X"] - X1[blocks[t].start:blocks[t].stop, d:d + 1]).abs().max() <= 1e-6
            assert (got["x_0"] - X1[0, d:d + 1]).abs().max() <= 1e-6
            assert got["image_iterations"] == [s1.image_iterations[d]]      # stops per image


@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_per_process_state_is_a_block_of_rows(sharded, world):
    """Solver iterates and the map's cached rows (eps, noise) scale as T/K, not T."""
    ranks = sharded(world)
    case = ("anderson", 0.5, True)
    held = [ranks[r][case]["held"] + ranks[r][case]["rows"] for r in range(world)]
    one = T + (T - 1) + T        # one process: X, eps cache of x_1..x_{T-1}, noise (x_T's eps aside)
    limit = -(-T // world)       # ceil(T / K)
    assert all(ranks[r][case]["rows"] <= limit for r in range(world))
    assert max(held) <= 3 * limit + 1
    assert max(held) <= one * (1 / world + 0.2)


@pytest.mark.parametrize("mode,trainable", GRAD_CASES)
def test_sharded_gradients_equal_one_process(sharded, mode, trainable):
    """onestep and the exact ift gradient (its adjoint solved over the shards, rows in reversed
    shard order), to x_T, the injected noise and the weights: one process's to 1e-8."""
    one = gradients(mode, trainable)
    for rank in sharded(2):
        got = rank[("grad", mode, trainable)]
        assert torch.allclose(got["x_T"], one["x_T"], rtol=1e-8, atol=1e-10)
        assert torch.allclose(got["noise"], one["noise"], rtol=1e-8, atol=1e-10)
        assert len(got["params"]) == len(one["params"]) and (len(one["params"]) > 0) == trainable
        for g, p in zip(got["params"], one["params"]):
            assert torch.allclose(g, p, rtol=1e-8, atol=1e-10)
    if mode == "ift":       # a different gradient from onestep's: the test can tell them apart
        assert not torch.allclose(one["x_T"], gradients("onestep", trainable)["x_T"], rtol=1e-3)


def test_sequential_solver_on_shards_is_the_sequential_chain(sharded):
    """The registered sequential solver over 2 time shards (eta 0.5): the chain of
    diffusion.sequential.ddim_sample (the independent oracle), T network rows per image."""
    from deqlit.diffusion.sequential import ddim_sample
    x_T, noise = inputs(0.5)
    with torch.no_grad():
        oracle = ddim_sample(GaussianDataNoise(dtype=torch.float64), x_T, Chain.build(ABAR, T, eta=0.5), noise=noise)
    ranks = sharded(2)
    for rank in ranks:
        got = rank["sequential"]
        assert (got["x_0"] - oracle).abs().max() <= 1e-10
        assert got["network_rows"] == T and got["iterations"] == T
    assert torch.cat([rank["sequential"]["X"] for rank in ranks]).shape[0] == T


def test_nan_on_one_process_raises_the_same_error_on_all(sharded):
    for solver in SOLVERS:
        messages = [rank[("nan", solver)] for rank in sharded(2)]
        assert "NaN/Inf at iteration" in messages[0], messages
        assert messages[0] == messages[1]


@pytest.mark.slow
def test_a_dead_process_makes_the_others_stop_with_an_error(tmp_path):
    results = launch(2, "die", tmp_path, wait_s=120.0)
    assert results[1] is None                        # it died without a word
    assert results[0] is not None and "error" in results[0]


@pytest.mark.slow
def test_ddp_time_strategy_splits_data_over_replicas_and_sums_gradients_over_time(sharded):
    """Rank r's loss is (r + 1) sum(w): gradients summed over the time group and averaged over
    replicas give ((1 + 2) + (3 + 4)) / 2 = 5 everywhere; a metric is averaged over the replicas
    (ranks of equal time index); each replica's processes read the same data shard."""
    from lightning.pytorch.strategies import StrategyRegistry
    import deqlit.lit.time_strategy  # noqa: F401 (registers the name)
    assert "ddp_time" in StrategyRegistry
    for r, rank in enumerate(sharded(4)):
        got = rank["strategy"]
        assert got["sampler"] == {"num_replicas": 2, "rank": r // 2}
        assert torch.allclose(got["grad"], torch.full((1, 3), 5.0, dtype=torch.float64))
        assert got["metric"] == pytest.approx((r % 2 + r % 2 + 2) / 2)
        assert got["reducer_shard"] == r % 2


@pytest.mark.slow
def test_sample_py_under_torchrun_with_ddp_time_equals_one_process(tmp_path, one_thread):
    """`torchrun --standalone --nproc_per_node 2 sample.py --trainer.strategy ddp_time
    --parallel.time_shards 2` writes the samples that one process writes (float64, eta 0.5). The
    command starts first, and the one-process run (in this process, on one thread) overlaps its
    interpreter starts."""
    import sys
    from deqlit.commands.sample import main
    from tests.conftest import REPO
    config = tmp_path / "faces.yaml"
    config.write_text((REPO / "configs" / "faces.yaml").read_text()
                      + "\nparallel:\n  time_shards: 1\n  timeout_s: 60\n")
    common = ["--config", str(config), "--timesteps", "5", "--num-images", "3", "--eta", "0.5",
              "--solver", "triangular-anderson", "--tol", "1e-8", "--trainer.precision", "64-true",
              "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with processes.Command([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                            str(REPO / "sample.py"), *common, "--out", str(tmp_path / "two"),
                            "--trainer.strategy", "ddp_time", "--parallel.time_shards", "2"],
                           tmp_path, "torchrun", timeout_s=300, cwd=REPO, env=env) as command:
        main(common + ["--out", str(tmp_path / "one")])
        run = command.result()
    assert run.returncode == 0, run.stderr[-3000:]
    one = torch.load(tmp_path / "one" / "samples.pt", weights_only=True)
    two = torch.load(tmp_path / "two" / "samples.pt", weights_only=True)
    assert torch.equal(one["x_T"], two["x_T"]) and torch.equal(one["noise"], two["noise"])
    assert (one["x0"] - two["x0"]).abs().max() <= 1e-6


@pytest.mark.slow
def test_a_silent_process_makes_the_others_stop_after_the_timeout(tmp_path):
    """A peer that is alive but never joins the collective: the others raise once the process
    group's timeout passes (here 3 s, while the peer stays silent for 6 s), they do not hang."""
    results = launch(2, "stall", tmp_path, wait_s=120.0)
    assert "error" in results[0] and "timed out" in results[0]["error"].lower(), results[0]
    assert "error" not in results[1]
