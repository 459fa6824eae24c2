"""Model inversion: the 1-step gradient, reachability, resume, errors, and invert.py end to end."""
from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, TensorDataset

from deqlit.diffusion.schedule import alphas_cumprod, chain_alphas, ddim_sigmas, fixed_point_coefficients, linear_betas, timestep_sequence
from deqlit.diffusion.sequential import ddim_sample
from deqlit.lit.inversion_module import InversionModule, frobenius_loss
from tests.conftest import GaussianDataNoise, perturbed_unet

ABAR = alphas_cumprod(linear_betas())
SOLVER = dict(max_iter=10, tol=1e-4, m=3, beta=0.9)


def drive(module: InversionModule, steps: int) -> None:
    """Run `steps` optimization steps through a minimal Trainer, as invert.py does."""
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=DataLoader(TensorDataset(torch.arange(steps)), batch_size=1))


def generated_targets(model, T: int, n: int = 2, seed: int = 123):
    gen = torch.Generator().manual_seed(seed)
    x_T = torch.randn(n, 1, 8, 8, generator=gen)
    with torch.no_grad():
        return ddim_sample(model, x_T, ABAR, timestep_sequence(T)), x_T


def test_one_step_gradient_on_x_T_matches_the_hand_derived_formula():
    """For x_0 = (1 - tau) X*_0 + tau [x_T / sqrt(abar_T) + sum_j c_j eps(X*_j) + c_T eps(x_T)]
    with X* held fixed: dL/dx_T = tau (g / sqrt(abar_T) + c_T J_eps(x_T)^T g), g = dL/dx_0."""
    torch.manual_seed(0)
    model = GaussianDataNoise(dtype=torch.float32)
    T, tau = 6, 0.1
    targets, _ = generated_targets(model, T, seed=1)
    module = InversionModule(model, ABAR, targets, timesteps=T, tau=tau, solver_options=SOLVER)
    x_T = torch.randn_like(targets).requires_grad_(True)
    with torch.enable_grad():
        x0_hat, _ = module.predict_x0(x_T, None)
        frobenius_loss(x0_hat, targets).sum().backward()
    g = 2 * (x0_hat.detach() - targets)                      # dL/dx_0
    seq = timestep_sequence(T)
    chain = chain_alphas(ABAR, seq)
    c, _ = fixed_point_coefficients(chain, ddim_sigmas(chain, 0.0))
    x = x_T.detach().clone().requires_grad_(True)
    eps_top = model(x, torch.full((2,), seq[-1]))
    (vjp,) = torch.autograd.grad(eps_top, x, grad_outputs=g)
    expected = tau * (g / float(chain[T].sqrt()) + float(c[T - 1]) * vjp)
    assert torch.allclose(x_T.grad, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["deq", "baseline"])
def test_inverting_generated_images_drives_the_loss_far_down(method):
    model = GaussianDataNoise(dtype=torch.float32)
    T = 5
    targets, _ = generated_targets(model, T)
    module = InversionModule(model, ABAR, targets, method=method, timesteps=T, lr=0.1,
                             max_steps=40, batch_size=2, solver_options=SOLVER)
    drive(module, 40)
    first, best = module.loss_history[:, 0], module.min_loss
    assert torch.all(best < 0.1 * first), (first, best)
    # the recorded reconstruction is what the chain gives from the recorded latent
    with torch.no_grad():
        regenerated = ddim_sample(model, module.best_latents, ABAR, timestep_sequence(T))
    assert torch.allclose(frobenius_loss(regenerated, targets), best, rtol=0.05, atol=1e-3)


def test_metrics_describe_the_exact_chain_even_when_the_solver_stops_early():
    """With 2 solver iterations at T = 8 the DEQ's x_0 is approximate; the reported reconstruction
    and loss must still be what the exact chain makes from the saved latents."""
    model = GaussianDataNoise(dtype=torch.float32)
    T = 8
    targets, _ = generated_targets(model, T)
    module = InversionModule(model, ABAR, targets, timesteps=T, lr=0.05, max_steps=3, batch_size=2,
                             solver="picard", solver_options=dict(max_iter=2, tol=0.0))
    drive(module, 3)
    with torch.no_grad():
        regenerated = ddim_sample(model, module.best_latents, ABAR, timestep_sequence(T))
    assert torch.allclose(module.best_recon, regenerated, atol=1e-5)
    assert torch.allclose(module.exact_loss, frobenius_loss(regenerated, targets), rtol=1e-5)
    assert not torch.allclose(module.exact_loss, module.min_loss, rtol=1e-2)   # the solve was loose
    metrics = module.image_metrics()
    assert metrics["mean_exact_loss"] == pytest.approx(float(module.exact_loss.mean()), rel=1e-6)


def test_resumed_inversion_equals_an_uninterrupted_one():
    model = GaussianDataNoise(dtype=torch.float32)
    targets, _ = generated_targets(model, 5, n=3)
    settings = dict(timesteps=5, lr=0.05, max_steps=4, batch_size=2, solver_options=SOLVER, seed=3)
    whole = InversionModule(model, ABAR, targets, **settings)
    drive(whole, whole.total_steps())
    first = InversionModule(model, ABAR, targets, **settings)
    drive(first, 3)                                   # stops in the middle of batch 0
    state = first.inversion_state()
    second = InversionModule(model, ABAR, targets, **settings)
    second.load_inversion_state(state)
    assert second.steps_done() == 3
    drive(second, second.total_steps() - 3)
    assert torch.equal(whole.loss_history.isnan(), second.loss_history.isnan())
    assert torch.allclose(torch.nan_to_num(whole.loss_history), torch.nan_to_num(second.loss_history), atol=1e-5)
    assert torch.allclose(whole.best_latents, second.best_latents, atol=1e-6)


def test_baseline_gradient_checkpointing_gives_the_same_gradient():
    model = GaussianDataNoise(dtype=torch.float32)
    targets, _ = generated_targets(model, 4)
    grads = []
    for ckpt in (False, True):
        module = InversionModule(model, ABAR, targets, method="baseline", timesteps=4, grad_checkpointing=ckpt)
        x_T = torch.ones_like(targets).requires_grad_(True)
        with torch.enable_grad():
            x0, _ = module.predict_x0(x_T, None)
            frobenius_loss(x0, targets).sum().backward()
        grads.append(x_T.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_stochastic_inversion_holds_or_optimizes_the_injected_noise():
    model = GaussianDataNoise(dtype=torch.float32)
    targets, _ = generated_targets(model, 4)
    held = InversionModule(model, ABAR, targets, timesteps=4, eta=0.5, max_steps=3, solver_options=SOLVER)
    drive(held, 3)
    fresh = InversionModule(model, ABAR, targets, timesteps=4, eta=0.5, max_steps=3, solver_options=SOLVER)
    fresh.draw_latents(slice(0, 2))
    assert torch.equal(held.noise, fresh.noise)            # drawn per image, never changed
    moved = InversionModule(model, ABAR, targets, timesteps=4, eta=0.5, max_steps=3,
                            optimize_noise=True, solver_options=SOLVER)
    drive(moved, 3)
    assert not torch.allclose(moved.noise, fresh.noise)


def test_a_target_size_the_model_does_not_take_is_refused():
    model = perturbed_unet(dtype=torch.float32)            # 8x8, 1 channel
    with pytest.raises(ValueError, match=r"16x16 but the model takes 8x8"):
        InversionModule(model, ABAR, torch.zeros(2, 1, 16, 16))
    with pytest.raises(ValueError, match="3 channels but the model takes 1"):
        InversionModule(model, ABAR, torch.zeros(2, 3, 8, 8))


def test_invert_celeba_without_data_or_checkpoint_names_both(tmp_path, capsys):
    from deqlit.commands.invert import main
    from deqlit.lit.run_inversion import MissingInputsError
    with pytest.raises(MissingInputsError) as err:
        main(["--data", "celeba", "--data.root", str(tmp_path / "data"),
              "--ckpt", str(tmp_path / "ckpt.pth"), "--out", str(tmp_path / "run")])
    text = str(err.value)
    assert str(tmp_path / "data" / "celeba") in text and "img_align_celeba" in text
    assert str(tmp_path / "ckpt.pth") in text and "never downloads" in text


class StopAfter(Callback):
    def __init__(self, steps: int):
        self.steps = steps

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if module.steps_done() >= self.steps:
            raise KeyboardInterrupt  # what Ctrl-C does; Lightning then calls on_exception


@pytest.mark.slow
def test_invert_py_default_run_end_to_end_shrunk_with_interrupt_and_resume(tmp_path):
    """The no-argument command on the shipped model, shrunk: 2 faces, T = 4, 3 steps; interrupted
    after 2 steps and resumed; writes every promised file."""
    from deqlit.cli import parse
    from deqlit.commands.invert import build_parser, main
    from deqlit.lit.run_inversion import run_inversion
    out = tmp_path / "run"
    argv = ["--num-images", "2", "--batch-size", "2", "--timesteps", "4", "--max-steps", "3",
            "--out", str(out), "--no-progress"]
    _, cfg = parse(build_parser(), argv, {"out": "inversion.out", "num_images": "inversion.num_images",
                                          "batch_size": "inversion.batch_size", "timesteps": "inversion.timesteps",
                                          "max_steps": "inversion.max_steps"})
    with pytest.raises(SystemExit):      # Lightning saves through on_exception, then exits
        run_inversion(cfg, progress=False, callbacks=[StopAfter(2)])
    saved = torch.load(out / "state.pt", weights_only=True)
    assert int(saved["cursor"][1]) == 2 and torch.isnan(saved["loss_history"][:, 2]).all()
    with pytest.raises(FileExistsError, match="--resume"):
        main(argv)
    metrics = main(argv + ["--resume"])
    for name in ("grid.png", "loss_curve.png", "metrics.json", "latents.pt", "config.yaml", "state.pt"):
        assert (out / name).is_file(), name
    assert list((out / "tb" / "version_0").glob("events.out.tfevents.*"))
    written = json.loads((out / "metrics.json").read_text())
    assert len(written["images"]) == 2 and written == json.loads(json.dumps(metrics))
    for image in written["images"]:
        assert image["steps"] == 3 and image["min_loss"] <= image["final_loss"] + 1e-6
        assert 0 < image["psnr"] < 100 and -1 <= image["ssim"] <= 1
        # metrics describe the exact chain from the saved latents; at T = 4 the solve is exact too
        assert image["exact_loss"] == pytest.approx(image["min_loss"], rel=1e-3)
        assert image["mse"] == pytest.approx(image["exact_loss"] / 1024, rel=1e-3)
    latents = torch.load(out / "latents.pt", weights_only=True)
    assert latents["x_T"].shape == (2, 1, 32, 32) and latents["settings"]["timesteps"] == 4
