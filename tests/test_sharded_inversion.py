"""Inversion with the T chain rows split over time shards (deqlit/parallel/inversion_shard.py,
inverse_block.py) gives what one process gives. The oracle is the unsharded BatchInverter /
exact_invert in this process (float64); the sharded runs are gloo groups on CPU in spawned
subprocesses (tests/test_sharding.launch), each running all its cases in one start; the command
tests run invert.py under torchrun."""
from __future__ import annotations

import os
import sys
from contextlib import ExitStack
from pathlib import Path

import pytest
import torch

from deqlit.deq.inversion import BatchInverter, InversionSettings
from deqlit.diffusion.chain import Chain
from deqlit.diffusion.schedule import alphas_cumprod, linear_betas
from tests.conftest import REPO, GaussianDataNoise

ABAR = alphas_cumprod(linear_betas())
T = 7                                   # divisible by neither 2 nor 4
B = 2
TOL = 1e-3                              # some solves stop on it, before T


def targets(batch: int = B) -> torch.Tensor:
    gen = torch.Generator().manual_seed(3)
    return (0.6 * torch.randn(batch, 1, 8, 8, generator=gen, dtype=torch.float64)).clamp(-1, 1)


# name -> (eta, settings, steps): the gradient method (one / two Adam steps) and exact inversion.
DEQ_CASES = {
    "deq-anderson": (0.0, dict(method="deq", solver="anderson", lr=0.05,
                               solver_options=dict(max_iter=20, tol=TOL, m=3)), 2),
    "deq-tri-noise": (0.5, dict(method="deq", solver="triangular-anderson", lr=0.05, optimize_noise=True,
                                solver_options=dict(max_iter=20, tol=TOL, freeze=True)), 1),
}
EXACT_CASES = {
    "exact-ddim": (0.0, dict(method="exact", init="exact",
                             exact=dict(mode="all-timesteps", solver="triangular-anderson", max_iter=40,
                                        tol=1e-6, init="ddim", m=3)), 0),
    "exact-extrapolated": (0.0, dict(method="exact", init="exact",
                                     exact=dict(mode="all-timesteps", solver="anderson", max_iter=40,
                                                tol=1e-6, init="extrapolated")), 0),
    "exact-gauss-eta": (0.5, dict(method="exact", init="exact",
                                  exact=dict(mode="all-timesteps", solver="anderson", max_iter=40,
                                             tol=1e-6, init="gaussian", freeze=True)), 0),
}


def inverter(case: str, images: torch.Tensor, indices: list[int], reducer=None) -> BatchInverter:
    from deqlit.deq.reduce import LOCAL
    eta, settings, _ = {**DEQ_CASES, **EXACT_CASES}[case]
    chain = Chain.build(ABAR, T, eta=eta)
    model = GaussianDataNoise(dtype=torch.float64).requires_grad_(False)
    return BatchInverter(model, chain, images, indices, InversionSettings(**settings).validate(),
                         reducer=reducer or LOCAL)


def run(case: str, images: torch.Tensor, indices: list[int], reducer=None) -> dict:
    """The latents after the case's steps, the saved state (for resume) and the exact report."""
    inv = inverter(case, images, indices, reducer)
    for _ in range(DEQ_CASES.get(case, (0, 0, 0))[2]):
        inv.step()
    state = inv.state_dict()
    report = inv.exact_report.to_dict() if inv.exact_report is not None else None
    return dict(latents=inv.latents.detach().clone(), noise=None if inv.noise is None else inv.noise.detach().clone(),
                loss=inv.loss_history.clone(), iterations=inv.iterations_history.clone(), warm=state["warm"],
                report=report)


def resumed_step(case: str, images: torch.Tensor, indices: list[int], state: dict, reducer=None) -> torch.Tensor:
    """One more step after loading a state saved by one process (all T warm-start rows)."""
    inv = inverter(case, images, indices, reducer)
    inv.load_state_dict(state)
    inv.step()
    return inv.latents.detach().clone()


def one_process_state(case: str) -> dict:
    inv = inverter(case, targets(), list(range(B)))
    inv.step()
    return inv.state_dict()


def joint_step(mesh=None) -> dict:
    """One step of joint fine-tuning (joint_module.py's loss: reconstruction through the onestep
    DEQ + typicality chi2 of the latents + the prior-preservation denoising loss) on a trainable
    network and a dense table of the B latents, with AdamW (after clipping the gradient norm to 1)
    and Adam. mesh None: one process; else this process's replica and time shard. Returns the
    weights and latents after the step."""
    import torch.nn.functional as F
    from deqlit.deq.layer import DEQSampler
    from deqlit.deq.degradations import frobenius_loss
    from deqlit.diffusion.gaussianity import typicality_chi2
    from deqlit.deq.blocks import x0_objective
    from deqlit.parallel.gradients import sum_time_mean_data
    model = GaussianDataNoise(dtype=torch.float64).requires_grad_(True)
    chain = Chain.build(ABAR, T)
    x0_all = targets()
    latents = torch.randn(x0_all.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    latents.requires_grad_(True)
    gen = torch.Generator().manual_seed(6)        # the prior batch's draws, for the whole batch
    prior = 0.5 * torch.randn(B, 1, 8, 8, generator=gen, dtype=torch.float64)
    t = torch.randint(0, len(ABAR), (B,), generator=gen)
    noise = torch.randn(prior.shape, generator=gen, dtype=torch.float64)
    mine = slice(0, B) if mesh is None else mesh.data_slice(B)     # this replica's images
    options = dict(max_iter=20, tol=1e-4)
    x0, x_T = x0_all[mine], latents[mine]

    def loss_of(x0_hat):
        a = ABAR[t[mine]].to(torch.float64)[:, None, None, None]
        x_t = a.sqrt() * prior[mine] + (1 - a).sqrt() * noise[mine]
        prior_loss = F.mse_loss(model(x_t, t[mine]), noise[mine]) * prior[0].numel()
        return (frobenius_loss(x0_hat, x0) + typicality_chi2(x_T)).mean() + prior_loss
    params = list(model.parameters())
    if mesh is None:
        X, _ = DEQSampler(model, chain, "triangular-anderson", options, grad="onestep")(x_T)
        loss_of(X[0]).backward()
    else:
        sampler = DEQSampler(model, chain, "triangular-anderson", options, grad="onestep", reducer=mesh.time_reducer())
        X, _ = sampler(x_T)
        x0_objective(X, sampler.block, loss_of).backward()
        sum_time_mean_data([*params, latents], mesh)
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    torch.optim.AdamW(params, lr=1e-3).step()
    torch.optim.Adam([latents], lr=0.05).step()
    return dict(params=[p.detach().clone() for p in params], latents=latents.detach().clone(),
                grad_norm=float(torch.cat([p.grad.flatten() for p in params]).norm()))


# ---- the processes ---------------------------------------------------------------------------
def run_job(job: str) -> dict:
    from deqlit.parallel.mesh import build_time_mesh
    out: dict = {}
    time_shards = 2
    mesh = build_time_mesh(time_shards)            # world 2: time 2; world 4: data 2 x time 2
    reducer = mesh.time_reducer()
    mine = mesh.data_slice(B)
    images, indices = targets()[mine], list(range(B))[mine]
    out["mesh"] = (mesh.data_index, mesh.time_index)
    out["joint"] = joint_step(mesh)
    for case in DEQ_CASES if job == "world2" else ["deq-anderson"]:
        out[case] = run(case, images, indices, reducer)
    for case in EXACT_CASES if job == "world2" else ["exact-gauss-eta"]:
        out[case] = run(case, images, indices, reducer)
    if job == "world2":
        out["resumed"] = resumed_step("deq-anderson", images, indices, one_process_state("deq-anderson"), reducer)
        try:
            from deqlit.deq.inverse_map import exact_invert
            exact_invert(GaussianDataNoise(dtype=torch.float64), images, Chain.build(ABAR, T),
                         mode="per-step", solver="anderson", reducer=reducer)
            out["per-step"] = "no error"
        except ValueError as err:
            out["per-step"] = str(err)
    return out


def worker(rank: int, world: int, port: int, job: str, out_dir: str) -> None:
    from tests.processes import run_in_group
    run_in_group(rank, world, port, out_dir, 180, lambda: run_job(job))   # 180 s: a loaded CPU


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """world -> per-rank results of the job 'world2' or 'world4', started once per world size."""
    from tests.processes import launch
    cache: dict[int, list[dict]] = {}

    def get(world: int) -> list[dict]:
        if world not in cache:
            results = launch(world, f"world{world}", tmp_path_factory.mktemp(f"inv{world}"), worker)
            for r, res in enumerate(results):
                assert res is not None and "error" not in res, f"rank {r}: {res and res.get('trace')}"
            cache[world] = [res["cases"] for res in results]
        return cache[world]
    return get


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-6) -> bool:
    return a.shape == b.shape and float((a - b).abs().max()) <= tol


# ---- the tests -------------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(DEQ_CASES))
def test_deq_inversion_steps_on_two_time_shards_equal_one_process(sharded, case):
    """The latents (and the optimized noise) after the Adam steps, the loss history and the
    solver's iterations are the same on both time shards and equal one process's."""
    one = run(case, targets(), list(range(B)))
    assert one["iterations"][:, :DEQ_CASES[case][2]].min() < 20          # some solves stop on tol
    assert not torch.equal(one["latents"], inverter(case, targets(), list(range(B))).latents)  # moved
    for rank in sharded(2):
        got = rank[case]
        assert close(got["latents"], one["latents"]), case
        assert got["noise"] is None or close(got["noise"], one["noise"])
        assert close(got["loss"].nan_to_num(-1.0), one["loss"].nan_to_num(-1.0))
        assert torch.equal(got["iterations"], one["iterations"])
        assert close(got["warm"], one["warm"])          # the saved state holds all T rows


@pytest.mark.parametrize("case", list(EXACT_CASES))
def test_exact_all_timesteps_inversion_on_two_time_shards_equals_one_process(sharded, case):
    one = run(case, targets(), list(range(B)))
    assert one["report"]["converged"]
    for rank in sharded(2):
        got = rank[case]
        assert close(got["latents"], one["latents"]), case                # x_T, on every shard
        report = got["report"]
        assert report["converged"] and report["image_iterations"] == one["report"]["image_iterations"]
        assert report["network_evals"] == one["report"]["network_evals"]   # summed over the shards
        assert report["depth"] == one["report"]["depth"]
        assert torch.allclose(torch.tensor(report["row_residual"]), torch.tensor(one["report"]["row_residual"]),
                              rtol=1e-4, atol=1e-12)                      # every state, x_1..x_T
        # The solve's curves (curves.png): every state's residual after every call, joined over the shards.
        assert torch.allclose(torch.tensor(report["state_trace"]), torch.tensor(one["report"]["state_trace"]),
                              rtol=1e-4, atol=1e-12)


def test_a_state_saved_by_one_process_continues_on_two_time_shards(sharded):
    state = one_process_state("deq-anderson")
    expected = resumed_step("deq-anderson", targets(), list(range(B)), state)
    for rank in sharded(2):
        assert close(rank["resumed"], expected)


def test_exact_per_step_refuses_time_shards_naming_all_timesteps(sharded):
    for rank in sharded(2):
        assert "per step is sequential" in rank["per-step"] and "all-timesteps" in rank["per-step"]


@pytest.mark.slow
def test_data_2_by_time_2_mesh_equals_one_process(sharded):
    """Ranks (d, t) = (r // 2, r % 2): replica d inverts image d over the time shards t = 0, 1.
    The oracle inverts image d alone (freezing settles rows over a batch's images)."""
    for r, rank in enumerate(sharded(4)):
        d = r // 2
        assert rank["mesh"] == (d, r % 2)
        for case in ("deq-anderson", "exact-gauss-eta"):
            one = run(case, targets()[d:d + 1], [d])
            assert close(rank[case]["latents"], one["latents"]), (r, case)


@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_one_joint_fine_tuning_step_on_time_shards_equals_one_process(sharded, world):
    """Weights and latents after one AdamW / Adam step through the onestep DEQ: world 2 (time 2)
    and world 4 (data 2 x time 2, each replica one image) equal one process to 1e-6."""
    one = joint_step()
    start = GaussianDataNoise(dtype=torch.float64).requires_grad_(False)
    assert max(float((a - b).abs().max()) for a, b in zip(one["params"], start.parameters())) > 1e-4  # moved
    for rank in sharded(world):
        got = rank["joint"]
        assert len(got["params"]) == len(one["params"])
        assert all(close(a, b) for a, b in zip(got["params"], one["params"]))
        assert close(got["latents"], one["latents"])
        assert got["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-8)


# ---- invert.py under torchrun ------------------------------------------------------------------
def torchrun(folder: Path, name: str, *args: str):
    """`torchrun --standalone --nproc_per_node 2 invert.py ARGS`, started (tests.processes.Command)."""
    from tests.processes import Command
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return Command([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    str(REPO / "invert.py"), *args], folder, name, cwd=REPO, env=env)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The tiny config (the gradient method, 5 images in batches of 2, 3 steps, float64), its
    uninterrupted one-process latents, and the torchrun commands of the two tests below, each
    started as soon as its input exists: a fresh run on 2 time shards ("two"; it starts first, and
    the one-process runs overlap its interpreter starts, on one thread) and the resume of a run
    interrupted on one process ("resumed"; with what the interrupted run left, for the test to
    judge). The two commands run at the same time and the tests wait for them."""
    from deqlit.cli import parse
    from deqlit.commands.invert import build_parser, main
    from deqlit.runs.inversion import run_inversion
    from tests.tiny import StopAfter, tiny_setup
    folder = tmp_path_factory.mktemp("tiny")
    config = tiny_setup(folder)
    common = ["--config", str(config), "--no-progress", "--trainer.precision", "64-true"]
    sharding = ["--trainer.strategy", "ddp_time", "--parallel.time_shards", "2"]
    threads = torch.get_num_threads()
    with ExitStack() as started:
        commands = {"two": started.enter_context(torchrun(folder, "two", *common, "--out", str(folder / "two"),
                                                          *sharding))}
        torch.set_num_threads(1)
        try:
            main(common + ["--out", str(folder / "one")])
            # Interrupted in the second batch: a part file and a partial state with all T warm-start rows.
            out = folder / "resumed"
            _, cfg = parse(build_parser(), common + ["--out", str(out)], {"out": "inversion.out"})
            try:
                run_inversion(cfg, progress=False, callbacks=[StopAfter(5)])
                interrupted = False
            except BaseException:
                interrupted = True
        finally:
            torch.set_num_threads(threads)
        partials = list((out / "latents").glob("partial-*.pt"))
        left = dict(interrupted=interrupted, parts=len(list((out / "latents").glob("part-*.pt"))),
                    partial=torch.load(partials[0], weights_only=True) if partials else None)
        commands["resumed"] = started.enter_context(torchrun(folder, "resumed", *common, "--out", str(out),
                                                             "--resume", *sharding))
        yield common, torch.load(folder / "one" / "latents.pt", weights_only=True), folder, commands, left


@pytest.mark.slow
def test_invert_py_under_torchrun_with_two_time_shards_equals_one_process(tiny_run):
    """`torchrun --standalone --nproc_per_node 2 invert.py --trainer.strategy ddp_time
    --parallel.time_shards 2`: the latents of one process; one process per replica writes."""
    common, one, folder, commands, _ = tiny_run
    run = commands["two"].result()
    assert run.returncode == 0, run.stderr[-3000:]
    two = torch.load(folder / "two" / "latents.pt", weights_only=True)
    assert two["indices"].tolist() == one["indices"].tolist() == [0, 1, 2, 3, 4]
    assert close(two["x_T"], one["x_T"])
    assert sorted(p.name for p in (folder / "two" / "latents").glob("*.pt")) == \
        ["part-00000000.pt", "part-00000002.pt", "part-00000004.pt"]


@pytest.mark.slow
def test_a_run_interrupted_on_one_process_resumes_on_two_time_shards(tiny_run):
    """Interrupted in the second batch (a part file and a partial state with all T warm-start
    rows), resumed by torchrun with 2 time shards: the latents of the uninterrupted run."""
    common, one, folder, commands, left = tiny_run
    assert left["interrupted"] and left["parts"] == 1          # as the fixture found them, before the resume
    partial = left["partial"]
    assert partial is not None, "no partial-*.pt state"
    assert partial["indices"] == [2, 3] and partial["warm"].shape[0] == 4      # T rows
    run = commands["resumed"].result()
    assert run.returncode == 0, run.stderr[-3000:]
    resumed = torch.load(folder / "resumed" / "latents.pt", weights_only=True)
    assert resumed["indices"].tolist() == [0, 1, 2, 3, 4]
    assert close(resumed["x_T"], one["x_T"])


def test_exact_per_step_becomes_all_timesteps_over_time_shards_and_the_baseline_is_refused(tmp_path, capsys):
    """Per step is sequential over time; all-timesteps solves the same fixed point and shards:
    the switch takes the all-timesteps solver and budget (per step they were chosen for one state),
    keeps every other exact option and says so in one line naming the options."""
    from deqlit.commands.invert import main
    from deqlit.runs.inversion import check_time_shardable
    from tests.tiny import tiny_setup
    per_step = InversionSettings(method="exact", init="exact", exact=dict(
        mode="per-step", solver="anderson", max_iter=20, tol=1e-4)).validate()
    assert check_time_shardable(per_step, 1) is per_step
    switched = check_time_shardable(per_step, 2)
    assert switched.exact == {"mode": "all-timesteps", "solver": "triangular-anderson", "tol": 1e-4,
                              "max_iter": 50}
    assert (switched.method, switched.init) == ("exact", "exact")
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "all-timesteps" in out
    assert "--inversion.exact.mode" in out and "--inversion.exact.solver" in out
    check_time_shardable(per_step, 2, quiet=True)               # the other ranks: no second line
    assert capsys.readouterr().out == ""
    config = tiny_setup(tmp_path)
    with pytest.raises(ValueError, match="baseline.*--method deq"):
        main(["--config", str(config), "--method", "baseline", "--trainer.strategy", "ddp_time",
              "--parallel.time_shards", "2", "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()                  # refused before anything is written


@pytest.mark.slow
def test_invert_py_default_exact_per_step_on_two_time_shards_equals_all_timesteps_on_one(tmp_path, one_thread):
    """`python invert.py --trainer.devices 2 --trainer.strategy ddp_time --parallel.time_shards 2`
    with faces.yaml's exact per-step (the shipped model; 2 faces; Lightning starts the processes)
    gives the latents of one process run over all timesteps with triangular Anderson. The command
    starts first, and the one-process run (in this process, on one thread) overlaps its
    interpreter starts."""
    from deqlit.commands.invert import main
    from tests.processes import Command
    common = ["--no-progress", "--inversion.num_images", "2", "--inversion.batch_size", "2"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with Command([sys.executable, str(REPO / "invert.py"), *common, "--out", str(tmp_path / "two"),
                  "--trainer.devices", "2", "--trainer.strategy", "ddp_time", "--parallel.time_shards", "2"],
                 tmp_path, "two", cwd=REPO, env=env) as command:
        main(common + ["--out", str(tmp_path / "one"), "--inversion.exact.mode", "all-timesteps",
                       "--inversion.exact.solver", "triangular-anderson", "--inversion.exact.max_iter", "50"])
        run = command.result()
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("solving the same fixed point over all timesteps") == 1   # rank 0 only
    one = torch.load(tmp_path / "one" / "latents.pt", weights_only=True)
    two = torch.load(tmp_path / "two" / "latents.pt", weights_only=True)
    assert two["indices"].tolist() == one["indices"].tolist() == [0, 1]
    assert close(two["x_T"], one["x_T"], 1e-4)
    import json
    metrics = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert metrics["mean_psnr"] > 60                         # the exact inverse chain, solved


def test_the_launcher_decides_the_process_counts():
    from deqlit.parallel.launch import launched_counts
    assert launched_counts({"devices": 1, "num_nodes": 1}, (2, 1))["devices"] == 2    # faces.yaml's 1
    assert launched_counts({"devices": "auto"}, (8, 2)) == {"devices": 8, "num_nodes": 2}
    with pytest.raises(ValueError, match="nproc_per_node 4"):
        launched_counts({"devices": 4}, (2, 1))
