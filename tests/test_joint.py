"""Joint fine-tuning of network and latents (deqlit/lit/joint_module.py, run_joint.py)."""
from __future__ import annotations

import json

import lightning as L
import pytest
import torch

from deqlit.diffusion.chain import Chain
from deqlit.diffusion.schedule import alphas_cumprod, linear_betas
from deqlit.diffusion.sequential import ddim_sample
from deqlit.diffusion.gaussianity import kurtosis, lag1_autocorrelations, typicality_chi2
from deqlit.diffusion.seeds import gaussian_latent
from deqlit.lit.joint_module import JointFineTuneModule, decay_factor
from deqlit.lit.latent_table import RowAdam, to_sphere
from deqlit.lit.joint_data import JointDataModule
from deqlit.runs.joint import run_joint
from tests.conftest import GaussianDataNoise
from tests.tiny import TINY_MODEL, tiny_config

ABAR = alphas_cumprod(linear_betas())


def smooth(x: torch.Tensor) -> torch.Tensor:
    """Correlated noise: each pixel averaged with its right and lower neighbours (autocorr ~0.5)."""
    return (x + x.roll(1, -1) + x.roll(1, -2)) / 3 ** 0.5


# ---- the typicality statistics -----------------------------------------------------------------
def test_white_noise_scores_about_four_and_structured_latents_far_more():
    gen = torch.Generator().manual_seed(0)
    white = torch.randn(400, 1, 32, 32, generator=gen, dtype=torch.float64)
    chi2 = typicality_chi2(white)
    assert 3.3 < float(chi2.mean()) < 4.7                 # chi-square with 4 degrees of freedom
    along_w, along_h = lag1_autocorrelations(white)
    assert float(along_w.abs().mean()) < 0.05 and abs(float(kurtosis(white).mean()) - 3) < 0.1
    # Independent oracle: numpy-free direct formula for one image.
    x = white[0, 0] - white[0, 0].mean()
    assert torch.isclose(along_w[0], (x[:, 1:] * x[:, :-1]).mean() / x.pow(2).mean())
    corr = smooth(white)
    assert float(lag1_autocorrelations(corr)[0].mean()) > 0.25
    assert float(typicality_chi2(corr).min()) > 50


def test_descending_the_chi2_whitens_a_correlated_latent_on_the_sphere():
    gen = torch.Generator().manual_seed(1)
    z = smooth(torch.randn(2, 1, 16, 16, generator=gen, dtype=torch.float64)).flatten(1).requires_grad_(True)
    opt = torch.optim.Adam([z], lr=0.05)
    start = float(typicality_chi2(to_sphere(z.detach()).reshape(2, 1, 16, 16)).mean())
    for _ in range(150):
        x = to_sphere(z).reshape(2, 1, 16, 16)
        opt.zero_grad()
        typicality_chi2(x).mean().backward()
        opt.step()
    x = to_sphere(z).reshape(2, 1, 16, 16).detach()
    assert float(typicality_chi2(x).mean()) < 0.05 * start
    assert float(lag1_autocorrelations(x)[0].abs().max()) < 0.1
    assert torch.allclose(x.flatten(1).norm(dim=1), torch.full((2,), 16.0, dtype=torch.float64))


# ---- RowAdam ----------------------------------------------------------------------------------
def test_row_adam_moves_only_the_batch_rows_and_matches_adam_per_row():
    """Row 2 first seen after rows 0-1 took 5 steps: its updates equal torch's Adam started fresh
    on that row alone (per-row bias correction), and rows never in a batch do not move."""
    gen = torch.Generator().manual_seed(2)
    table = torch.nn.Parameter(torch.randn(4, 6, generator=gen, dtype=torch.float64))
    start = table.detach().clone()
    opt = RowAdam([table], lr=0.1)
    target = torch.randn(4, 6, generator=gen, dtype=torch.float64)

    def step(rows):
        opt.zero_grad()
        picked = torch.nn.functional.embedding(torch.tensor(rows), table, sparse=True)
        (picked - target[rows]).pow(3).abs().sum().backward()
        opt.step()
    for _ in range(5):
        step([0, 1])
    row = torch.nn.Parameter(start[2].clone())
    ref = torch.optim.Adam([row], lr=0.1)
    for _ in range(3):
        step([2])
        ref.zero_grad()
        (row - target[2]).pow(3).abs().sum().backward()
        ref.step()
    assert torch.allclose(table[2], row, atol=1e-12)
    assert torch.equal(table[3], start[3])
    assert not torch.equal(table[0], start[0])


# ---- the module on generated images ---------------------------------------------------------
def generated_images(T: int, count: int):
    """Images of a tiny net from known latents on the sphere: their exact latents exist."""
    net = GaussianDataNoise(seed=1, dtype=torch.float32)
    chain = Chain.build(ABAR, T)
    x_true = to_sphere(torch.randn(count, 64, generator=torch.Generator().manual_seed(5))).reshape(count, 1, 8, 8)
    with torch.no_grad():
        images = ddim_sample(net, x_true, chain)
    return net, images


class Recorder(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(trainer.callback_metrics["train/recon_loss"]))


@pytest.mark.slow
def test_joint_run_drives_the_reconstruction_loss_far_down_in_a_few_steps():
    T = 5
    net, images = generated_images(T, 6)
    module = JointFineTuneModule(net, ABAR, 6, (1, 8, 8), timesteps=T, grad="ift", solver="picard",
                                 solver_options=dict(max_iter=T, tol=0.0), latent_lr=0.2, network_lr=1e-3,
                                 typicality_weight=0.0, image_every=0, compare_every=5)
    rec = Recorder()
    trainer = L.Trainer(max_steps=15, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        callbacks=[rec], enable_model_summary=False)
    trainer.fit(module, datamodule=JointDataModule(images, images, 6, 4))
    assert len(rec.losses) == 15 and module.global_step == 15       # one global step per training step
    assert rec.losses[-1] < 0.1 * rec.losses[0]
    assert bool(module.latents.ready.all())
    # The latents stayed on the sphere and the network moved (both groups were trained).
    norms = module.latents.weight.detach().norm(dim=1)
    assert torch.allclose(norms, torch.full_like(norms, 8.0), atol=1e-4)
    cosine = float(trainer.callback_metrics["grad/cosine_onestep_ift"])
    assert -1.0 <= cosine <= 1.0


# ---- learning rates: warmup and decay over the run ---------------------------------------------
def test_decay_factor_runs_from_one_to_its_final_value():
    for shape in ("linear", "cosine"):
        values = [decay_factor(p / 20, shape, 0.1) for p in range(21)]
        assert values[0] == pytest.approx(1.0) and values[-1] == pytest.approx(0.1)
        assert all(a > b for a, b in zip(values, values[1:]))          # strictly down
        assert decay_factor(1.7, shape, 0.1) == pytest.approx(0.1)      # clamped past the end
    assert decay_factor(0.5, "linear", 0.1) == pytest.approx(0.55)
    assert decay_factor(0.5, "cosine", 0.1) == pytest.approx(0.55)      # symmetric about the middle
    assert decay_factor(0.25, "cosine", 0.0) == pytest.approx((1 + 2 ** -0.5) / 2)
    assert decay_factor(0.9, "none", 0.1) == 1.0
    with pytest.raises(ValueError, match="lr_decay"):
        decay_factor(0.5, "step", 0.1)


class LearningRates(L.Callback):
    """The rates the optimizers used at each step (latents, network)."""

    def __init__(self):
        self.rates = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.rates.append(tuple(opt.param_groups[0]["lr"] for opt in pl_module.optimizers()))


def test_the_optimizers_step_with_warmup_then_the_decay_over_max_steps():
    T, steps = 3, 6
    net, images = generated_images(T, 4)
    module = JointFineTuneModule(net, ABAR, 4, (1, 8, 8), timesteps=T, solver="sequential",
                                 latent_lr=0.1, network_lr=1e-3, warmup_steps=2, lr_decay="cosine",
                                 lr_final=0.2, image_every=0)
    rec = LearningRates()
    trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        callbacks=[rec], enable_model_summary=False)
    trainer.fit(module, datamodule=JointDataModule(images, images, 2, 2))
    for step, (latent_lr, network_lr) in enumerate(rec.rates):
        decay = decay_factor(step / steps, "cosine", 0.2)
        assert latent_lr == pytest.approx(0.1 * decay)
        assert network_lr == pytest.approx(1e-3 * min(1.0, (step + 1) / 2) * decay)
    assert module.progress() == pytest.approx(1.0)      # max_steps reached
    # A budget clock (run_joint's CPU-time budget) counts where it is further than the steps.
    fresh = JointFineTuneModule(net, ABAR, 4, (1, 8, 8), timesteps=T, latent_lr=0.1, network_lr=1e-3,
                                warmup_steps=1, lr_decay="linear", lr_final=0.0)
    assert fresh.learning_rates() == pytest.approx((0.1, 1e-3))
    fresh.progress_clock = lambda: 0.75
    assert fresh.learning_rates() == pytest.approx((0.025, 2.5e-4))


def test_latents_start_from_per_image_seeds_whatever_the_batch():
    net, images = generated_images(3, 4)
    module = JointFineTuneModule(net, ABAR, 4, (1, 8, 8), timesteps=3, seed=7)
    module.initialize_rows(torch.tensor([3, 1]), images[[3, 1]])
    assert module.latents.ready.tolist() == [False, True, False, True]
    expected = to_sphere(gaussian_latent(7, 3, (1, 8, 8)).reshape(1, -1))
    assert torch.allclose(module.latents.weight[3], expected[0])
    with pytest.raises(ValueError, match="latent init"):
        JointFineTuneModule(net, ABAR, 4, (1, 8, 8), init="zeros")


# ---- the run: train.py --task joint -------------------------------------------------------------
@pytest.mark.slow
def test_resume_equals_an_uninterrupted_run_and_the_weights_load_and_sample(tmp_path):
    from deqlit.models.loading import load_weights
    from deqlit.models.unet import DDIMUNet

    run_joint(tiny_config(tmp_path, "whole", 4))
    # 'Interrupted' after 3 steps: in the middle of the second epoch (2 batches of 2 images each).
    run_joint(tiny_config(tmp_path, "split", 3))
    run_joint(tiny_config(tmp_path, "split", 4), resume="last")   # continued to 4
    whole, split = tmp_path / "whole", tmp_path / "split"
    for name in ("ema.pt", "latents.pt"):
        a = torch.load(whole / name, weights_only=True)
        b = torch.load(split / name, weights_only=True)
        tensors = a.items() if name == "ema.pt" else [("x_T", a["x_T"])]
        for key, value in tensors:
            assert torch.allclose(value.float(), b[key].float(), atol=1e-6), (name, key)
    metrics = json.loads((whole / "metrics.json").read_text())
    assert metrics["steps"] == 4 and len(metrics["ema"]["psnr"]) == 4
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(whole / "tb" / "version_0"))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/recon_loss", "train/prior_denoise_mse", "train/target_denoise_mse",
            "latents/autocorr_mean", "latents/kurtosis_mean", "solver/iterations",
            "solver/adjoint_iterations", "grad/cosine_onestep_ift", "eval/kid"} <= scalars
    assert len(events.Scalars("train/recon_loss")) == 4
    assert "hp_metric" not in scalars          # TensorBoardLogger's placeholder -1: turned off
    assert "reconstructions" in events.Tags()["images"]

    latents = torch.load(whole / "latents.pt", weights_only=True)
    assert latents["indices"].tolist() == [0, 1, 2, 3] and latents["x_T"].shape == (4, 1, 8, 8)
    chain = Chain.from_dict(latents["chain"])
    model = load_weights(DDIMUNet(**TINY_MODEL), whole / "ema.pt").eval()
    with torch.no_grad():
        x0 = ddim_sample(model, latents["x_T"], chain)
    assert torch.isfinite(x0).all()
    # The metrics' reconstruction is exactly this chain from these latents with these weights.
    from deqlit.data.registry import load_images
    targets = load_images("faces", "test", 8, 1)[:4]
    recon = (x0 - targets).pow(2).flatten(1).sum(1).mean()
    assert abs(float(recon) - metrics["ema"]["recon_loss_mean"]) <= 1e-4 * float(recon) + 1e-6

    from deqlit.commands.sample import main as sample_main
    argv = ["--ckpt", str(whole / "ema.pt"), "--latents", str(whole / "latents.pt"),
            "--out", str(tmp_path / "samples"), "--no-progress", "--solver", "sequential",
            "--model.ch", "8", "--model.ch_mult", "[1,2]", "--model.num_res_blocks", "1",
            "--model.attn_resolutions", "[4]", "--model.resolution", "8", "--model.norm_groups", "2",
            "--data.resolution", "8"]
    sample_main(argv)
    assert (tmp_path / "samples" / "samples.png").exists()


def test_a_resumed_newton_scan_run_solves_with_the_jacobian_table_of_the_uninterrupted_one(tmp_path):
    """newton-scan (faces.yaml's joint.solver) measures its Jacobian table once, at a process's
    first solve: a resumed process measured the restored weights, and its solves (2 iterations of
    T = 6, so the table shows) left latents 1.2e-3 away from the uninterrupted run's. The table
    travels in the checkpoint."""
    def config(out, steps):
        cfg = tiny_config(tmp_path, out, steps)
        cfg["joint"].update(solver="newton-scan", grad="onestep", timesteps=6, max_iter=2,
                            kid_every=0, compare_every=0, image_every=0)
        return cfg
    run_joint(config("whole", 4))
    run_joint(config("split", 2))
    run_joint(config("split", 4), resume="last")
    a = torch.load(tmp_path / "whole" / "latents.pt", weights_only=True)["x_T"]
    b = torch.load(tmp_path / "split" / "latents.pt", weights_only=True)["x_T"]
    assert torch.equal(a, b), float((a - b).abs().max())


@pytest.mark.parametrize("log_every", [1, 2])
def test_images_and_periodic_scalars_lie_at_the_step_of_the_curves_they_belong_to(tmp_path, log_every):
    """A step's curves are at x = global_step before its update. The reconstructions (of that
    step's solve) were at x + 1 (steps 2, 4 of a 4-step run beside train/recon_loss 0..3), and KID
    with its samples one step apart; with log_every_n_steps 2, KID and the gradient cosine computed
    at step 0 appeared at 1."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    cfg = tiny_config(tmp_path, "run", 4)
    cfg["joint"].update(image_every=2, kid_every=2, compare_every=2, checkpoint_every=4)
    cfg["trainer"]["log_every_n_steps"] = log_every
    run_joint(cfg)
    events = EventAccumulator(str(tmp_path / "run" / "tb" / "version_0"), size_guidance={"images": 0})
    events.Reload()
    def steps(kind, tag):
        return [e.step for e in getattr(events, kind)(tag)]
    assert steps("Scalars", "train/recon_loss") == list(range(log_every - 1, 4, log_every))   # Lightning's
    for tag in ("reconstructions", "samples"):
        assert steps("Images", tag) == [0, 2], tag
    for tag in ("eval/kid", "grad/cosine_onestep_ift"):
        assert steps("Scalars", tag) == [0, 2], tag


def test_a_cpu_time_budget_stops_the_run_and_is_recorded(tmp_path, capsys):
    """max_process_s counts this process's CPU time: a budget of 0 stops after the first step.
    The run ends with one line naming its files and the EMA weights' PSNR from metrics.json, then
    the tensorboard line."""
    cfg = tiny_config(tmp_path, "budget", 5)
    cfg["joint"].update(max_process_s=0.0, kid_every=0, image_every=0, compare_every=0)
    run_joint(cfg)
    metrics = json.loads((tmp_path / "budget" / "metrics.json").read_text())
    assert metrics["steps"] == 1 and metrics["process_seconds"] > 0
    summary, last = capsys.readouterr().out.strip().splitlines()[-2:]
    assert last == f"view the curves: tensorboard --logdir {tmp_path / 'budget' / 'tb'}"
    last = summary
    assert last.startswith(f"wrote {tmp_path / 'budget' / 'ema.pt'}") and "1 steps" in last
    assert f"PSNR {metrics['ema']['psnr_mean']:.1f} dB mean" in last


def test_a_config_without_a_joint_section_takes_the_one_home_of_its_defaults(tmp_path):
    """Since the typed sections, a config without a joint section is not refused (as it was): it
    resolves to the defaults of JointRun and of JointFineTuneModule's signature, like an empty one.
    (This test used to expect a refusal and passed only where an earlier runs/joint made the run
    stop on its output folder.)"""
    import dataclasses
    import inspect
    from deqlit.runs.sections import JointRun, resolve
    cfg = tiny_config(tmp_path, "x", 1)
    del cfg["joint"]
    resolved = resolve(cfg, "joint")["joint"]
    assert resolved == resolve({**cfg, "joint": {}}, "joint")["joint"]
    for field in dataclasses.fields(JointRun):
        assert resolved[field.name] == field.default, field.name
    module_defaults = inspect.signature(JointFineTuneModule).parameters
    for key in ("grad", "solver", "latent_lr", "network_lr", "tau"):
        assert resolved[key] == module_defaults[key].default, key


@pytest.mark.parametrize("grad,network_lr", [("ift", 1e-5), ("onestep", 1e-5), ("onestep", 0.0)])
def test_sequential_forward_gives_the_same_solution_and_gradients_as_the_exact_solver(grad, network_lr):
    """solver='sequential' (X* by the DDIM loop, cheaper on a CPU) feeds the same gradient modes;
    with the network frozen the 1-step gradient reads the eps that the DDIM loop cached."""
    net = GaussianDataNoise(seed=4, dtype=torch.float64)
    x_T = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    results = []
    for solver, options in (("sequential", None), ("picard", dict(max_iter=4, tol=0.0))):
        module = JointFineTuneModule(net, ABAR, 2, (1, 8, 8), timesteps=4, grad=grad, solver=solver,
                                     solver_options=options, network_lr=network_lr)
        x = x_T.clone().requires_grad_(True)
        X, deq, _ = module.solve_chain(x)
        X_star = deq.last_solution
        params = [p for p in net.parameters() if p.requires_grad]
        grads = torch.autograd.grad(X[0].pow(2).sum(), [x] + params)
        results.append((X_star, grads))
    (a, ga), (b, gb) = results
    assert torch.allclose(a, b, atol=1e-10)
    for u, v in zip(ga, gb):
        assert torch.allclose(u, v, rtol=1e-8, atol=1e-10)


@pytest.mark.slow
def test_train_py_task_joint_maps_its_flags_onto_the_joint_section(tmp_path):
    import yaml
    import train
    cfg = tiny_config(tmp_path, "unused", 1)
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "cli"
    train.main(["--task", "joint", "--config", str(config), "--max-steps", "1", "--out", str(out),
                "--lr", "0.0005", "--joint.kid_every", "0"])
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["trainer"]["max_steps"] == 1 and saved["joint"]["network_lr"] == 0.0005
    assert json.loads((out / "metrics.json").read_text())["steps"] == 1
    assert (out / "ema.pt").is_file() and (out / "checkpoints" / "last.ckpt").is_file()


def test_exact_init_regenerates_the_images_off_the_sphere():
    """init 'exact' (the inverse chain) with sphere=False: the chain of the stored latent gives the
    image back far better than plain DDIM inversion does."""
    net, images = generated_images(4, 2)
    errors = {}
    for init in ("exact", "ddim-inversion"):
        module = JointFineTuneModule(net, ABAR, 2, (1, 8, 8), timesteps=4, init=init, sphere=False)
        module.initialize_rows(torch.tensor([0, 1]), images)
        with torch.no_grad():
            x0 = ddim_sample(net, module.latents(torch.tensor([0, 1])), module.chain)
        errors[init] = float((x0 - images).pow(2).sum())
    assert errors["exact"] < 0.05 * errors["ddim-inversion"]


def test_bench_collects_the_method_parts_and_scores_the_targets(tmp_path):
    """bench/joint.py runs methods as separate processes; --collect assembles their parts: the
    denoising MSE relative to the shipped model's and every target met or missed."""
    import csv
    from tests.tiny import load_script
    bench = load_script("bench/joint.py", "deqlit_bench_joint")
    parts = tmp_path / "parts"
    parts.mkdir()
    (parts / "shipped.json").write_text(json.dumps({"row": {"method": "shipped", "kid": 0.007,
                                                            "denoise_mse_train": 0.01}}))
    row = {"method": "onestep", "psnr_mean": 35.5, "autocorr_max": 0.06, "kurtosis_maxdev": 0.2,
           "kid": 0.01, "denoise_mse_train": 0.016}
    (parts / "onestep.json").write_text(json.dumps({"row": row, "joint": {}}))
    torch.save(torch.zeros(2, 1, 8, 8), parts / "onestep.pt")
    bench.collect(parts, tmp_path / "out", torch.zeros(2, 1, 8, 8))
    rows = json.loads((tmp_path / "out" / "joint.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["shipped", "onestep"]
    assert abs(rows[1]["denoise_ratio_vs_shipped"] - 1.6) < 1e-9
    assert rows[1]["targets_met"] == {"psnr_mean": True, "autocorr_max": False, "kurtosis_maxdev": True,
                                      "kid": True, "denoise_ratio_vs_shipped": False}
    with open(tmp_path / "out" / "joint.csv") as fh:
        assert "autocorr_max=missed" in list(csv.DictReader(fh))[1]["targets_met"]
    assert (tmp_path / "out" / "joint.png").is_file()
