"""Joint fine-tuning under --trainer.strategy ddp_time (one training step: lit/joint_module.py) gives what
one process gives. The oracle is JointFineTuneModule trained by a one-device Trainer in this
process (float64); the sharded runs are the same module and Trainer with the DDPTimeStrategy in
spawned gloo processes (world 2: time 2; world 4: data 2 x time 2). The command tests run
train.py --task joint under torchrun and under Lightning's own launcher."""
from __future__ import annotations

import os
import sys
import time
import traceback
from contextlib import ExitStack
from datetime import timedelta
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from deqlit.diffusion.schedule import alphas_cumprod, linear_betas
from deqlit.guards import UserInputError
from deqlit.lit.joint_module import JointFineTuneModule
from deqlit.runs.joint import check_replica_batches
from deqlit.lit.joint_data import JointDataModule
from tests.conftest import REPO, GaussianDataNoise

ABAR = alphas_cumprod(linear_betas())
T = 5                    # not divisible by 2
N, BATCH, STEPS = 6, 3, 2   # batches of 3: replicas of 2 and 1 images on the data 2 x time 2 mesh


class RecordingModule(JointFineTuneModule):
    """Records the gradient norms that reach the clipping (after every reduction): Adam is blind
    to a uniform scale of the gradient, the norms are not."""

    def clip_gradients(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        net = torch.cat([p.grad.flatten() for p in self.model.parameters()]).norm()
        latent = self.latents.weight.grad.coalesce().values().norm()
        self.norms.append((float(net), float(latent)))
        super().clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)


def images(seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (0.6 * torch.randn(N, 1, 8, 8, generator=gen, dtype=torch.float64)).clamp(-1, 1)


# What the one training step must give under time shards as in one process: the onestep gradient,
# the exact implicit (ift) gradient with its adjoint solved across the shards, the sequential
# solver, and the latents alone (the network frozen: nothing for DDP to reduce).
CASES = {
    "onestep": {},
    "ift": dict(grad="ift"),
    "sequential": dict(solver="sequential", solver_options=None),
    "latents-only": dict(network_lr=0.0),
}


def train(strategy=None, devices: int = 1) -> dict:
    """STEPS joint steps of every case of CASES; the weights, EMA, latents and gradient norms after them."""
    return {name: train_case(strategy, devices, **case) for name, case in CASES.items()}


def train_case(strategy=None, devices: int = 1, **case) -> dict:
    """STEPS joint steps (onestep DEQ unless `case` says otherwise, AdamW on the network after
    clipping, RowAdam on the latents) on the N images; the weights, EMA, latents and gradient
    norms after them."""
    from deqlit.lit.time_strategy import DDPTimeStrategy
    if isinstance(strategy, DDPTimeStrategy):        # a Trainer takes a strategy object once
        strategy = DDPTimeStrategy(time_shards=strategy.time_shards, timeout=strategy._timeout)
    model = GaussianDataNoise(dtype=torch.float64)
    settings = dict(grad="onestep", solver="triangular-anderson", solver_options=dict(max_iter=20, tol=1e-4, m=3),
                    network_lr=1e-3)
    settings.update(case)
    module = RecordingModule(model, ABAR, N, (1, 8, 8), timesteps=T, tau=0.2, latent_lr=0.05,
                             grad_clip=0.5, ema_decay=0.9, image_every=0, compare_every=0, seed=3,
                             **settings).double()
    module.norms = []
    trainer = L.Trainer(max_steps=STEPS, accelerator="cpu", devices=devices, strategy=strategy or "auto",
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, use_distributed_sampler=False)
    trainer.fit(module, datamodule=JointDataModule(images(1), images(2), BATCH, BATCH, seed=5))
    mesh = getattr(trainer.strategy, "mesh", None)
    from deqlit.parallel.mesh import group_timeout
    timeouts = None if mesh is None else [group_timeout(g) for g in (None, mesh.time_group, mesh.data_group)]
    return dict(timeouts=timeouts, params=[p.detach().clone() for p in module.model.parameters()],
                ema=[p.detach().clone() for p in module.ema.module.parameters()],
                latents=module.latents.weight.detach().clone(), ready=module.latents.ready.clone(),
                norms=list(module.norms), step=module.global_step)


def worker(rank: int, world: int, port: int, job: str, out_dir: str) -> None:
    """One process of the world, started like torchrun starts it (the environment Lightning reads)."""
    from deqlit.lit.time_strategy import DDPTimeStrategy
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world), NODE_RANK="0")
    try:
        start = time.monotonic()
        strategy = DDPTimeStrategy(time_shards=2, timeout=timedelta(seconds=180))   # a loaded CPU
        result = {"cases": train(strategy, world), "seconds": time.monotonic() - start}
    except Exception as err:      # reported to the test, which decides
        result = {"error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()}
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def one_process():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train()
    finally:
        torch.set_num_threads(before)


def sharded(world: int, folder: Path) -> list[dict]:
    from tests.processes import launch
    results = launch(world, f"world{world}", folder, worker)
    for r, res in enumerate(results):
        assert res is not None and "error" not in res, f"rank {r}: {res and res.get('trace')}"
    return [res["cases"] for res in results]


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-6) -> bool:
    return a.shape == b.shape and float((a - b).abs().max()) <= tol


def check_equal(got: dict, one: dict) -> None:
    assert got.keys() == one.keys() == CASES.keys()
    for case in CASES:
        check_case(got[case], one[case])


def check_case(got: dict, one: dict) -> None:
    assert got["step"] == one["step"] == STEPS
    assert all(close(a, b) for a, b in zip(got["params"], one["params"]))
    assert all(close(a, b) for a, b in zip(got["ema"], one["ema"]))
    assert close(got["latents"], one["latents"]) and torch.equal(got["ready"], one["ready"])
    for (net, latent), (net1, latent1) in zip(got["norms"], one["norms"]):
        assert net == pytest.approx(net1, rel=1e-8) and latent == pytest.approx(latent1, rel=1e-8)


@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_joint_steps_under_ddp_time_equal_one_process(one_process, world, tmp_path):
    """Two steps through the real module and Trainer, for every case of CASES (onestep, ift,
    sequential, latents only): world 2 (time 2) and world 4 (data 2 x time 2, replicas of 2 and
    1 images) give the weights, EMA, latents table and gradient norms of one process to 1e-6, on
    every rank."""
    start = GaussianDataNoise(dtype=torch.float64)
    for case in ("onestep", "ift", "sequential"):
        one = one_process[case]
        moved = max(float((a - b).abs().max()) for a, b in zip(one["params"], start.parameters()))
        assert moved > 1e-4 and len(one["norms"]) == STEPS, case
        assert one["norms"][0][0] > 0.5, case          # the clipping acts: its input must be right
        assert bool(one["ready"].all()), case          # both batches' rows were initialized and trained
    frozen = one_process["latents-only"]
    assert all(torch.equal(a, b) for a, b in zip(frozen["params"], start.parameters()))
    # The cases differ from each other: ift's gradient is not onestep's.
    assert not close(one_process["ift"]["latents"], one_process["onestep"]["latents"], 1e-6)
    assert not close(frozen["latents"], one_process["onestep"]["latents"], 1e-6)
    for rank in sharded(world, tmp_path):
        check_equal(rank, one_process)
        # The mesh's groups stop a silent peer after the world's timeout, not torch's 30 minutes.
        assert rank["onestep"]["timeouts"] == [timedelta(seconds=180)] * 3


def test_ddp_time_strategy_takes_parallel_timeout_s():
    from deqlit.runs.launch import Launch, trainer_section
    parallel = {"time_shards": 2, "timeout_s": 42}
    section = trainer_section(Launch({"strategy": "ddp_time", "devices": 2}, parallel, None, 2))
    assert section["devices"] == 2 and section["strategy"].time_shards == 2
    assert section["strategy"]._timeout == timedelta(seconds=42)
    assert trainer_section(Launch({"strategy": "ddp"}, parallel, None, 1)) == {"strategy": "ddp"}


# ---- refusals: before anything is written -----------------------------------------------------
def test_batches_smaller_than_the_replicas_are_refused_naming_the_fix():
    batches = dict(num_images=5, batch_size=2, prior_batch_size=4)
    with pytest.raises(UserInputError, match="--joint.batch_size"):
        check_replica_batches(batches, replicas=2)                  # the last batch holds 1 image
    check_replica_batches(dict(batches, num_images=6, batch_size=3, prior_batch_size=3), replicas=2)
    check_replica_batches(batches, replicas=1)


def tiny_joint_config(folder: Path, **joint) -> Path:
    """tests/test_joint's tiny run (float32 UNet, 4 faces at 8x8) with the onestep gradient, a
    trainer and a parallel section, written as a config file."""
    from tests.tiny import tiny_config
    cfg = tiny_config(folder, "unused", 2)
    cfg["joint"].update(grad="onestep", solver="triangular-anderson", m=3, max_iter=10, tol=1e-4,
                        init="gaussian", kid_every=0, image_every=0, compare_every=0, **joint)
    cfg["trainer"].update(devices=1, strategy="auto", num_nodes=1)   # keeps max_steps 2
    cfg["parallel"] = {"time_shards": 1, "timeout_s": 180}
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("flags,match", [
    (["--trainer.strategy", "ddp"], "ddp_time"),
    (["--trainer.devices", "3"], "--trainer.devices 2"),          # 3 processes for 2 time shards
])
def test_train_py_refuses_before_writing_anything(tmp_path, flags, match):
    from tests.tiny import load_script
    train_py = load_script("train.py", "train_script")
    config = tiny_joint_config(tmp_path)
    argv = ["--task", "joint", "--config", str(config), "--out", str(tmp_path / "run"),
            "--trainer.strategy", "ddp_time", "--parallel.time_shards", "2", "--trainer.devices", "2"]
    with pytest.raises(UserInputError, match=match):
        train_py.main(argv + flags)
    assert not (tmp_path / "run").exists()


# ---- the commands ------------------------------------------------------------------------------
def command(folder: Path, name: str, launcher: list[str], *args: str):
    """`python [LAUNCHER] train.py --task joint ARGS`, started (tests.processes.Command)."""
    from tests.processes import Command
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return Command([sys.executable, *launcher, str(REPO / "train.py"), "--task", "joint", *args], folder, name,
                   cwd=REPO, env=env)


@pytest.mark.slow
def test_train_py_joint_under_torchrun_and_lightnings_launcher_equals_one_process(tmp_path, one_thread):
    """`torchrun --standalone --nproc_per_node 2 train.py --task joint --trainer.strategy ddp_time
    --parallel.time_shards 2`, and a run of one process resumed by `python train.py --task joint
    --trainer.devices 2 ...` (Lightning starts the processes): the EMA weights and latents of one
    uninterrupted process (float32: a few 1e-5 after Adam's sign-like first steps), one writer.
    Each command starts as soon as its input exists (torchrun first), and they and the one-process
    runs (in this process, on one thread) overlap each other's interpreter starts."""
    config = tiny_joint_config(tmp_path)
    common = ["--config", str(config)]
    sharding = ["--trainer.strategy", "ddp_time", "--parallel.time_shards", "2"]
    from tests.tiny import load_script
    train_py = load_script("train.py", "train_script")       # one process: in this one
    with ExitStack() as started:
        torchrun = started.enter_context(command(tmp_path, "torchrun", ["-m", "torch.distributed.run", "--standalone",
                                                                        "--nproc_per_node", "2"],
                                                 *common, "--out", str(tmp_path / "torchrun"), *sharding))
        train_py.main(["--task", "joint", *common, "--out", str(tmp_path / "lightning"), "--max-steps", "1"])
        lightning = started.enter_context(command(tmp_path, "lightning", [], *common, "--out",
                                                  str(tmp_path / "lightning"), "--resume", "--trainer.devices", "2",
                                                  *sharding))
        train_py.main(["--task", "joint", *common, "--out", str(tmp_path / "one")])
        runs = {"torchrun": torchrun.result(), "lightning": lightning.result()}
    for name, run in runs.items():
        assert run.returncode == 0, (name, run.stderr[-3000:])
    assert "Restored all states from the checkpoint" in runs["lightning"].stdout + runs["lightning"].stderr
    one_ema = torch.load(tmp_path / "one" / "ema.pt", weights_only=True)
    one_lat = torch.load(tmp_path / "one" / "latents.pt", weights_only=True)
    start = torch.load(tmp_path / "tiny.pt", weights_only=True)
    assert max(float((one_ema[k] - start[k]).abs().max()) for k in start) > 1e-3      # trained
    for name in ("torchrun", "lightning"):
        ema = torch.load(tmp_path / name / "ema.pt", weights_only=True)
        lat = torch.load(tmp_path / name / "latents.pt", weights_only=True)
        assert max(float((ema[k] - one_ema[k]).abs().max()) for k in one_ema) < 2e-4, name
        assert lat["indices"].tolist() == one_lat["indices"].tolist() == [0, 1, 2, 3]
        assert close(lat["x_T"], one_lat["x_T"], 1e-5), name
        if name == "torchrun":
            assert yaml.safe_load((tmp_path / name / "config.yaml").read_text())["trainer"]["max_steps"] == 2
        else:   # a resume keeps the run's config.yaml and records what it changed
            (record,) = yaml.safe_load((tmp_path / name / "resumes.yaml").read_text())
            assert record["changed"]["trainer.max_steps"] == {"saved": 1, "now": 2}
            assert record["changed"]["trainer.devices"] == {"saved": 1, "now": 2}
        import json
        assert json.loads((tmp_path / name / "metrics.json").read_text())["steps"] == 2


def test_ifts_sweep_adjoint_becomes_the_exact_plain_iteration_on_time_shards(capsys):
    """faces.yaml's adjoint 'sweep' goes row by row; on time shards the run takes plain iteration
    to tol 0 with freezing (the same exact adjoint) and says so once; one process keeps the sweep,
    and so does onestep (which has no adjoint)."""
    from deqlit.runs.joint import time_shardable_adjoint
    for shards, grad, expected in ((2, "ift", {"solver": "picard", "tol": 0.0, "freeze": True}),
                                   (1, "ift", {"solver": "sweep"}), (2, "onestep", {"solver": "sweep"})):
        joint = {"grad": grad, "adjoint": {"solver": "sweep"}}
        time_shardable_adjoint(joint, shards)
        assert joint["adjoint"] == expected, (shards, grad)
        printed = capsys.readouterr().out
        assert (printed.count("\n") == 1 and "--joint.adjoint" in printed) == (expected["solver"] == "picard")


def test_the_gradient_cosine_of_a_onestep_run_takes_the_time_shardable_adjoint_too(capsys):
    """compare_every logs the cosine between onestep and ift, which solves ift's adjoint: with
    faces.yaml's 'sweep' a onestep run on time shards stopped at its first step ('cannot be split
    over time shards', README's torchrun command). It switches as ift does, and says why."""
    from deqlit.runs.joint import time_shardable_adjoint
    joint = {"grad": "onestep", "compare_every": 25, "adjoint": {"solver": "sweep"}}
    time_shardable_adjoint(joint, 2)
    assert joint["adjoint"] == {"solver": "picard", "tol": 0.0, "freeze": True}
    assert "--joint.compare_every's onestep-vs-ift cosine" in capsys.readouterr().out
