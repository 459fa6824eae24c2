"""What a user sees: solver printouts, the curves every job logs (read back from TensorBoard's
event files), and the pictures of an inversion run."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
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
                           "--out", str(tmp_path / "a")])
    printed = capsys.readouterr()
    last = printed.out.strip().splitlines()[-1]
    assert metrics["exact_by_depth"] and metrics["iterations"] == 5
    assert "exact after T = 5 iterations" in last and "NOT converged" not in last
    assert "exact after T = 5 iterations" in printed.err.replace("\r", "\n").splitlines()[-1]   # the bar
    metrics = sample_main(["--timesteps", "5", "--num-images", "1", "--tol", "1e-12", "--max-iter", "3",
                           "--no-progress", "--out", str(tmp_path / "b")])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert not metrics["exact_by_depth"] and "NOT converged" in last and "exact after" not in last


# ---- the curves every job logs, read back from TensorBoard's event files ------------------------
def scalar_points(run: Path) -> dict[str, int]:
    """{tag: number of points} of a run's TensorBoard scalars (RUN/tb/version_0)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run / "tb" / "version_0"))
    events.Reload()
    return {tag: len(events.Scalars(tag)) for tag in events.Tags()["scalars"]}


def curves_of(points: dict[str, int], tags: set[str]) -> None:
    assert tags <= set(points), sorted(tags - set(points))
    flat = {tag: n for tag, n in points.items() if tag in tags and n < 2}
    assert not flat, f"curves with one point or none: {flat}"


@pytest.mark.slow
def test_a_short_training_run_logs_its_loss_curve(tmp_path):
    """train.log_every_n_steps is null in faces.yaml: 3 steps log 3 points, not none."""
    from tests.tiny import TINY, train_script
    argv = ["--data", "faces", "--max-steps", "3", "--batch-size", "4", "--out", str(tmp_path / "t"),
            "--train.sample_every", "0"]
    for key, value in TINY.items():
        if key != "train.log_every_n_steps":
            argv += [f"--{key}", value]
    train_script.main(argv)
    points = scalar_points(tmp_path / "t")
    curves_of(points, {"train/loss"})
    assert points["train/loss"] == 3


@pytest.mark.slow
@pytest.mark.parametrize("method", ["exact", "deq"])
def test_inversion_logs_its_solve_or_its_optimization_as_curves(tmp_path, method):
    """The default method (exact) logs its solve, residual against iteration and per state, and
    the running means over the images done; deq logs its loss against the optimization step.
    Both write the labelled grid and curves.png."""
    from deqlit.commands.invert import main as invert_main
    from tests.tiny import tiny_setup
    config = tiny_setup(tmp_path, n_images=2)
    out = tmp_path / method
    argv = ["--config", str(config), "--no-progress", "--out", str(out), "--batch-size", "1",
            "--method", method, "--timesteps", "3"]
    if method == "deq":        # the exact method (faces.yaml's default: per step, Anderson) takes no steps
        argv += ["--max-steps", "3"]
    invert_main(argv)
    points = scalar_points(out)
    means = {f"running/mean_{key}" for key in ("psnr", "ssim", "exact_loss", "latent_autocorrelation")}
    if method == "exact":
        curves_of(points, means | {"running/mean_exact_solve_network_evals",
                                   "exact_solve/worst_residual_by_iteration",
                                   "exact_solve/final_residual_by_state", "exact_solve/iterations_by_state"})
        assert points["exact_solve/final_residual_by_state"] == 3        # one point per state
    else:
        curves_of(points, means | {"deq/loss_mean", "deq/solver_iterations", "deq/mean_loss_vs_step"})
    assert points["running/mean_psnr"] == 2                               # one point per image done
    from PIL import Image
    grid = Image.open(out / "grid.png")
    assert grid.width >= 4 * 96 and grid.height >= 2 * 96               # 4 columns, 2 rows, upscaled
    assert (out / "curves.png").is_file() and not (out / "loss_curve.png").exists()


def event_files(run: Path) -> list[Path]:
    """A run's TensorBoard event files in the order they were opened (in this test process)."""
    files = (run / "tb" / "version_0").glob("events.out.tfevents.*")
    return sorted(files, key=lambda p: int(p.name.rsplit(".", 1)[-1]))


def read_events(path: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(path), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


def steps_by_file(files: list[Path], tag: str) -> list[list[int]]:
    """The steps of a scalar (or image) tag in each event file."""
    out = []
    for path in files:
        events = read_events(path)
        kind = "images" if tag in events.Tags()["images"] else "scalars"
        out.append([e.step for e in (events.Images(tag) if kind == "images" else events.Scalars(tag))]
                   if tag in events.Tags()[kind] else [])
    return out


def png_pixels(data: bytes):
    import io

    import numpy as np
    from PIL import Image
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@pytest.mark.slow
def test_the_curves_of_a_resumed_inversion_go_on_where_they_stopped(tmp_path):
    """Interrupted at step 2 of the second batch, resumed, then extended from 4 images to 6: the
    per-step scalars continue the run's step count, the running means the run's image count and
    their means take the earlier processes' images in; the grid is written when the run ends,
    the labelled grid of grid.png with all images."""
    from deqlit.cli import parse
    from deqlit.commands.invert import build_parser
    from deqlit.commands.invert import main as invert_main
    from deqlit.runs.inversion import run_inversion
    from tests.tiny import StopAfter, tiny_setup
    config = tiny_setup(tmp_path, n_images=6)          # batches of 2 images, 3 steps each
    out = tmp_path / "run"
    argv = ["--config", str(config), "--no-progress", "--out", str(out), "--num-images", "4"]
    _, cfg = parse(build_parser(), argv, {"out": "inversion.out", "num_images": "inversion.num_images"})
    with pytest.raises(BaseException):
        run_inversion(cfg, progress=False, callbacks=[StopAfter(5)])
    invert_main(argv + ["--resume"])
    at_four = json.loads((out / "metrics.json").read_text())
    invert_main(argv[:-1] + ["6", "--resume"])
    metrics = json.loads((out / "metrics.json").read_text())

    files = [f for f in event_files(out) if steps_by_file([f], "deq/loss_mean") != [[]]]
    assert len(files) == 3                                                 # one per process
    assert steps_by_file(files, "deq/loss_mean") == [[1, 2, 3, 4, 5], [6], [7, 8, 9]]
    assert steps_by_file(files, "running/mean_psnr") == [[1, 2], [3, 4], [5, 6]]
    assert steps_by_file(files, "inversion/grid") == [[], [4], [6]]
    # The means are over all images done, the earlier processes' included.
    psnr = {e.step: e.value for f in files for e in read_events(f).Scalars("running/mean_psnr")}
    assert psnr[4] == pytest.approx(at_four["mean_psnr"], rel=1e-6)
    assert psnr[6] == pytest.approx(metrics["mean_psnr"], rel=1e-6)
    assert psnr[3] == pytest.approx(sum(m["psnr"] for m in metrics["images"][:3]) / 3, rel=1e-6)
    # The grid is grid.png, pixel for pixel: the 6 labelled rows, not the last batch's 2.
    (last,) = read_events(files[-1]).Images("inversion/grid")
    from PIL import Image
    import numpy as np
    assert np.array_equal(png_pixels(last.encoded_image_string),
                          np.asarray(Image.open(out / "grid.png").convert("RGB")))


@pytest.mark.slow
def test_an_inversion_writes_its_summary_curves_once_from_step_1_in_its_one_event_file(tmp_path):
    """deq/mean_loss_vs_step counts steps from 1, as deq/loss_mean and curves.png do, and is the
    mean over all images of each step's loss; one process writes one event file."""
    from deqlit.commands.invert import main as invert_main
    from deqlit.lit.inversion_outputs import load_parts
    from tests.tiny import tiny_setup
    config = tiny_setup(tmp_path, n_images=3)          # batches of 2 and 1 images, 3 steps each
    out = tmp_path / "run"
    invert_main(["--config", str(config), "--no-progress", "--out", str(out), "--num-images", "3"])
    (events_file,) = event_files(out)
    events = read_events(events_file)
    curve = events.Scalars("deq/mean_loss_vs_step")
    assert [e.step for e in curve] == [1, 2, 3]
    assert [e.step for e in events.Scalars("deq/loss_mean")] == [1, 2, 3, 4, 5, 6]
    losses = torch.cat([p["loss_history"] for p in load_parts(out / "latents")])      # (3, 3)
    assert [e.value for e in curve] == pytest.approx(losses.mean(0).tolist(), rel=1e-6)


@pytest.mark.slow
def test_a_joint_run_logs_its_curves(tmp_path):
    from deqlit.runs.joint import run_joint
    from tests.tiny import tiny_config
    cfg = tiny_config(tmp_path, "joint", 2)
    cfg["joint"].update(kid_every=0, compare_every=0, image_every=0, checkpoint_every=2)
    run_joint(cfg)
    curves_of(scalar_points(tmp_path / "joint"), {"train/recon_loss", "train/prior_denoise_mse",
                                                   "latents/autocorr_mean", "solver/iterations"})


# ---- what the exact solve's curves are made of ------------------------------------------------
@pytest.mark.parametrize("mode", ["per-step", "all-timesteps"])
def test_the_exact_solve_keeps_a_residual_trace_per_state(mode):
    from deqlit.deq.inverse_map import exact_invert
    from deqlit.diffusion.chain import Chain
    from deqlit.diffusion.schedule import alphas_cumprod, linear_betas
    from tests.conftest import GaussianDataNoise
    net = GaussianDataNoise(seed=0, dtype=torch.float64)
    x0 = (0.5 * torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0),
                            dtype=torch.float64)).clamp(-1, 1)
    chain = Chain.build(alphas_cumprod(linear_betas()), 4)
    solver = "anderson" if mode == "per-step" else "triangular-anderson"
    _, _, report = exact_invert(net, x0, chain, mode=mode, solver=solver, tol=1e-8, max_iter=100)
    trace = report.state_trace
    assert len(trace) == chain.T and all(len(row) >= 1 for row in trace)
    if mode == "per-step":
        # State i's own solve: as many points as its worst image's iterations, ending below tol.
        assert len(report.call_trace) == 0
        assert sum(len(row) for row in trace) >= max(report.image_iterations)
        assert all(row[-1] < 1e-8 for row in trace)
    else:
        # One shared solve: every state has a point per call, and the residual over all states
        # (a norm ratio over all rows) is at most the worst state's.
        calls = report.depth - report.start_depth
        assert len(report.call_trace) == calls and all(len(row) == calls for row in trace)
        for n in range(calls):
            assert report.call_trace[n] <= max(row[n] for row in trace) * (1 + 1e-9) + 1e-12
        assert report.call_trace[-1] < 1e-8


def test_curves_of_several_batches_take_the_worst_and_ignore_a_batch_that_ended_earlier():
    from deqlit.lit.inversion_figures import solve_curves
    first = {"state_trace": [[1e-1, 1e-3], [1e-2]], "call_trace": [], "mode": "per-step", "tol": 1e-4}
    second = {"state_trace": [[1e-2, 1e-2, 1e-5], [1e-1, 1e-6]], "call_trace": [], "mode": "per-step", "tol": 1e-4}
    curves = solve_curves([first, None, second])
    expected = torch.tensor([[1e-1, 1e-2, 1e-5], [1e-1, 1e-6, float("nan")]], dtype=torch.float64)
    assert torch.allclose(curves["state_trace"], expected, equal_nan=True)
    assert solve_curves([None, {}]) == {}


def test_curves_png_takes_batches_that_stopped_after_different_steps(tmp_path):
    """A batch whose images all reached early_stop_loss is shorter than the others."""
    from deqlit.lit.inversion_figures import plot_curves
    histories = [torch.tensor([[4.0, 2.0, 1.0]]),
                 torch.tensor([[8.0, 4.0, 2.0, 1.0, 0.5], [2.0, 1.0, 0.5, 0.2, 0.1]])]
    plot_curves(tmp_path / "curves.png", "deq inversion", histories, {}, None)
    assert (tmp_path / "curves.png").stat().st_size > 0
    from deqlit.lit.inversion_figures import loss_rows
    rows = loss_rows(histories)          # the rows drawn, one per image, NaN after its batch's end
    assert rows.shape == (3, 5) and rows[0, :3].tolist() == [4.0, 2.0, 1.0] and torch.isnan(rows[0, 3:]).all()


def test_curves_png_draws_an_image_that_took_no_step_as_a_visible_dot(tmp_path):
    """An image under early_stop_loss at its start has a one-point history: a line through one
    point draws nothing, so it gets a marker; images with several points keep plain lines."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from deqlit.lit.inversion_figures import _loss_panel, loss_rows
    fig, ax = plt.subplots()
    _loss_panel(ax, loss_rows([torch.tensor([[0.3]]), torch.tensor([[4.0, 2.0, 1.0]])]))
    lines = ax.get_lines()            # one per image, then the mean
    assert lines[0].get_marker() == "o" and lines[1].get_marker() in ("None", None, "")
    assert list(lines[0].get_xdata()) == [1, 2, 3][:len(lines[0].get_xdata())]
    assert "optimization step" in ax.get_xlabel()
    plt.close(fig)
