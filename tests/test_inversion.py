"""Model inversion: the 1-step gradient, reachability, batch independence, resume, errors, and the
streamed run (DataModule -> predict -> part files -> merged outputs) end to end."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from deqlit.deq.degradations import frobenius_loss
from deqlit.deq.inversion import BatchInverter, InversionSettings
from deqlit.diffusion.chain import Chain
from deqlit.diffusion.schedule import alphas_cumprod, linear_betas
from deqlit.diffusion.sequential import ddim_sample
from tests.conftest import GaussianDataNoise, perturbed_unet
from tests.tiny import StopAfter, tiny_setup

ABAR = alphas_cumprod(linear_betas())
SOLVER = dict(max_iter=10, tol=1e-4, m=3, beta=0.9)


def settings(**kw) -> InversionSettings:
    base = dict(method="deq", init="random", lr=0.05, max_steps=4, solver="anderson",
                solver_options=SOLVER, seed=3)
    return InversionSettings(**{**base, **kw}).validate()


def generated_targets(model, chain: Chain, n: int = 2, seed: int = 123):
    gen = torch.Generator().manual_seed(seed)
    x_T = torch.randn(n, 1, 8, 8, generator=gen, dtype=next(model.parameters()).dtype)
    with torch.no_grad():
        return ddim_sample(model, x_T, chain), x_T


def run_to_end(inverter: BatchInverter) -> dict:
    while not inverter.finished:
        inverter.step()
    return inverter.result()


def test_one_step_gradient_on_x_T_matches_the_hand_derived_formula():
    """For x_0 = (1 - tau) X*_0 + tau [x_T / sqrt(abar_T) + sum_j c_j eps(X*_j) + c_T eps(x_T)]
    with X* held fixed: dL/dx_T = tau (g / sqrt(abar_T) + c_T J_eps(x_T)^T g), g = dL/dx_0."""
    torch.manual_seed(0)
    model = GaussianDataNoise(dtype=torch.float32).requires_grad_(False)
    T, tau = 6, 0.1
    chain = Chain.build(ABAR, T)
    targets, _ = generated_targets(model, chain, seed=1)
    inverter = BatchInverter(model, chain, targets, [0, 1], settings(tau=tau))
    x_T = torch.randn_like(targets).requires_grad_(True)
    with torch.enable_grad():
        X, _ = inverter.predict_states(x_T, None)
        x0_hat = X[0]
        frobenius_loss(x0_hat, targets).sum().backward()
    g = 2 * (x0_hat.detach() - targets)                      # dL/dx_0
    x = x_T.detach().clone().requires_grad_(True)
    eps_top = model(x, torch.full((2,), chain.timesteps[-1]))
    (vjp,) = torch.autograd.grad(eps_top, x, grad_outputs=g)
    expected = tau * (g / float(chain.abar[T].sqrt()) + float(chain.c[T - 1]) * vjp)
    assert torch.allclose(x_T.grad, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["deq", "baseline"])
def test_inverting_generated_images_drives_the_loss_far_down(method):
    model = GaussianDataNoise(dtype=torch.float32).requires_grad_(False)
    chain = Chain.build(ABAR, 5)
    targets, _ = generated_targets(model, chain)
    result = run_to_end(BatchInverter(model, chain, targets, [0, 1], settings(method=method, lr=0.1, max_steps=40, seed=0)))
    first, best = result["loss_history"][:, 0], result["min_loss"]
    assert torch.all(best < 0.1 * first), (first, best)
    # the saved reconstruction is what the exact chain gives from the saved latents
    with torch.no_grad():
        regenerated = ddim_sample(model, result["x_T"], chain)
    assert torch.allclose(regenerated, result["reconstructions"], atol=1e-6)
    assert torch.allclose(frobenius_loss(regenerated, targets), best, rtol=0.05, atol=1e-3)


def test_metrics_describe_the_exact_chain_even_when_the_solver_stops_early():
    """With 2 solver iterations at T = 8 the DEQ's x_0 is approximate; the reported loss must
    still be the exact chain's from the saved latents."""
    model = GaussianDataNoise(dtype=torch.float32).requires_grad_(False)
    chain = Chain.build(ABAR, 8)
    targets, _ = generated_targets(model, chain)
    result = run_to_end(BatchInverter(model, chain, targets, [0, 1], settings(
        solver="picard", solver_options=dict(max_iter=2, tol=0.0), max_steps=3)))
    with torch.no_grad():
        regenerated = ddim_sample(model, result["x_T"], chain)
    assert torch.allclose(result["exact_loss"], frobenius_loss(regenerated, targets), rtol=1e-5)
    assert not torch.allclose(result["exact_loss"], result["min_loss"], rtol=1e-2)   # the solve was loose


def test_an_image_gets_the_same_latent_whatever_its_batch():
    """Per-image seeds, Adam, early stop and solver stops: image 2's result alone equals its result
    in a batch of 3 (README's promise; issue: 0.13% differences between batch sizes before)."""
    model = GaussianDataNoise(dtype=torch.float64).requires_grad_(False)
    chain = Chain.build(ABAR, 6)
    targets, _ = generated_targets(model, chain, n=3)
    s = settings(solver="triangular-anderson", solver_options=dict(max_iter=6, tol=1e-3, m=3),
                 early_stop_loss=0.5, max_steps=5)
    together = run_to_end(BatchInverter(model, chain, targets, [0, 1, 2], s))
    alone = run_to_end(BatchInverter(model, chain, targets[2:], [2], s))
    assert torch.allclose(together["x_T"][2], alone["x_T"][0], atol=1e-9, rtol=0)
    assert torch.allclose(together["loss_history"][2], alone["loss_history"][0], atol=1e-9)


def test_a_resumed_batch_equals_an_uninterrupted_one():
    model = GaussianDataNoise(dtype=torch.float32).requires_grad_(False)
    chain = Chain.build(ABAR, 5)
    targets, _ = generated_targets(model, chain, n=3)
    s = settings(max_steps=6)
    whole = run_to_end(BatchInverter(model, chain, targets, [0, 1, 2], s))
    first = BatchInverter(model, chain, targets, [0, 1, 2], s)
    for _ in range(3):
        first.step()
    state = first.state_dict()
    second = BatchInverter(model, chain, targets, [0, 1, 2], s)
    second.load_state_dict(state)
    resumed = run_to_end(second)
    assert torch.allclose(whole["loss_history"], resumed["loss_history"], atol=1e-6)
    assert torch.allclose(whole["x_T"], resumed["x_T"], atol=1e-6)
    with pytest.raises(ValueError, match="other images"):
        BatchInverter(model, chain, targets[:2], [0, 1], s).load_state_dict(state)


def test_baseline_gradient_checkpointing_gives_the_same_gradient():
    model = GaussianDataNoise(dtype=torch.float32).requires_grad_(False)
    chain = Chain.build(ABAR, 4)
    targets, _ = generated_targets(model, chain)
    grads = []
    for ckpt in (False, True):
        inverter = BatchInverter(model, chain, targets, [0, 1], settings(method="baseline", grad_checkpointing=ckpt))
        x_T = torch.ones_like(targets).requires_grad_(True)
        with torch.enable_grad():
            X, _ = inverter.predict_states(x_T, None)
            x0 = X[0]
            frobenius_loss(x0, targets).sum().backward()
        grads.append(x_T.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_stochastic_inversion_holds_or_optimizes_the_injected_noise():
    model = GaussianDataNoise(dtype=torch.float32).requires_grad_(False)
    chain = Chain.build(ABAR, 4, eta=0.5)
    targets, _ = generated_targets(model, Chain.build(ABAR, 4))
    held = BatchInverter(model, chain, targets, [0, 1], settings(max_steps=3))
    start = held.noise.clone()
    held_result = run_to_end(held)
    assert torch.equal(held_result["noise"], start)            # drawn per image, never changed
    fresh = BatchInverter(model, chain, targets[1:], [1], settings(max_steps=3))
    assert torch.equal(fresh.noise[:, 0], start[:, 1])         # image 1's noise is its own
    moved = run_to_end(BatchInverter(model, chain, targets, [0, 1], settings(max_steps=3, optimize_noise=True)))
    assert not torch.allclose(moved["noise"], start)
    with torch.no_grad():   # the saved noise regenerates the saved reconstruction
        again = ddim_sample(model, moved["x_T"], chain, noise=moved["noise"])
    assert torch.allclose(again, moved["reconstructions"], atol=1e-6)


def test_bad_settings_and_image_sizes_are_refused():
    model = perturbed_unet(dtype=torch.float32)            # 8x8, 1 channel
    chain = Chain.build(ABAR, 4)
    with pytest.raises(ValueError, match=r"16x16 but the model takes 8x8"):
        BatchInverter(model, chain, torch.zeros(2, 1, 16, 16), [0, 1], settings())
    with pytest.raises(ValueError, match="3 channels but the model takes 1"):
        BatchInverter(model, chain, torch.zeros(2, 3, 8, 8), [0, 1], settings())
    with pytest.raises(ValueError, match="takes no option"):
        settings(solver="picard", solver_options=dict(m=3))
    for bad, word in ((dict(lr=-1.0), "lr"), (dict(max_steps=0), "max_steps"), (dict(tau=1.5), "tau"),
                      (dict(solver_options=dict(tol=-1.0)), "tol"), (dict(method="newton"), "method")):
        with pytest.raises(ValueError, match=word):
            settings(**bad)
    with pytest.raises(ValueError, match="eta"):
        Chain.build(ABAR, 4, eta=1.5)


# ---- the streamed run ---------------------------------------------------------------------------
def invert(config: Path, *extra: str) -> dict:
    from deqlit.commands.invert import main
    return main(["--config", str(config), "--no-progress", *extra])


@pytest.mark.slow
def test_streamed_run_writes_parts_merges_and_resumes_after_an_interrupt(tmp_path):
    config = tiny_setup(tmp_path)
    out = tmp_path / "run"
    metrics = invert(config)                                          # uninterrupted reference
    assert metrics["num_images"] == 5 and len(list((out / "latents").glob("part-*.pt"))) == 3
    for name in ("grid.png", "curves.png", "metrics.json", "latents.pt", "config.yaml", "run.json"):
        assert (out / name).is_file(), name
    assert list((out / "tb" / "version_0").glob("events.out.tfevents.*"))
    reference = torch.load(out / "latents.pt", weights_only=True)
    assert reference["indices"].tolist() == [0, 1, 2, 3, 4]
    assert Chain.from_dict(reference["chain"]) == Chain.build(ABAR, 4)
    with pytest.raises(Exception, match="--resume"):
        invert(config)                                                # never mixes two runs
    # Streamed through the Trainer and DataModule = the same batch inverted in memory. (Other
    # batchings agree to float rounding: exactly in float64, see the batch test above.)
    from deqlit.data.registry import load_images
    from deqlit.runs.inversion import settings_from
    from deqlit.models.build import build_noise_model
    cfg = yaml.safe_load(config.read_text())
    model, schedule, _ = build_noise_model(cfg)
    images = load_images(cfg["data"]["name"], "all", 8, 1)
    in_memory = run_to_end(BatchInverter(model.requires_grad_(False), Chain.build(schedule, 4), images[2:4],
                                         [2, 3], settings_from(cfg["inversion"])))
    assert (in_memory["x_T"] - reference["x_T"][2:4]).abs().max() <= 1e-6

    # Interrupted in the middle of the second batch (step 2 of 3), then resumed.
    from deqlit.cli import parse
    from deqlit.commands.invert import build_parser
    from deqlit.runs.inversion import run_inversion
    out2 = tmp_path / "run2"
    _, cfg = parse(build_parser(), ["--config", str(config), "--out", str(out2)], {"out": "inversion.out"})
    with pytest.raises(BaseException):
        run_inversion(cfg, progress=False, callbacks=[StopAfter(5)])
    assert len(list((out2 / "latents").glob("part-*.pt"))) == 1       # batch 0 finished
    partial = torch.load(next((out2 / "latents").glob("partial-*.pt")), weights_only=True)
    assert partial["step"] == 2 and partial["indices"] == [2, 3]
    with pytest.raises(ValueError, match="lr"):                       # changed settings refused
        invert(config, "--out", str(out2), "--resume", "--lr", "0.5")
    (out2 / "latents" / "part-99999999.pt").write_bytes(b"garbage")   # a corrupt part file
    with pytest.raises(ValueError, match="corrupt"):
        invert(config, "--out", str(out2), "--resume")
    (out2 / "latents" / "part-99999999.pt").unlink()
    invert(config, "--out", str(out2), "--resume")
    resumed = torch.load(out2 / "latents.pt", weights_only=True)
    assert torch.allclose(resumed["x_T"], reference["x_T"], atol=1e-5)
    saved = json.loads((out2 / "metrics.json").read_text())
    assert [m["index"] for m in saved["images"]] == [0, 1, 2, 3, 4]
    assert all(m["steps"] == 3 and m["exact_loss"] <= m["initial_loss"] * 1.5 for m in saved["images"])

    # More images later: the finished ones are kept, the new ones added, same per-image results.
    invert(config, "--out", str(out2), "--resume", "--num-images", "5", "--batch-size", "1")
    again = torch.load(out2 / "latents.pt", weights_only=True)
    assert torch.equal(again["x_T"], resumed["x_T"])


def test_a_second_process_on_the_same_folder_is_refused(tmp_path):
    from deqlit.runs.folder_lock import folder_lock
    from deqlit.guards import OutputFolderError
    with folder_lock(tmp_path, "invert.py"):
        with pytest.raises(OutputFolderError, match="in use by invert.py"):
            with folder_lock(tmp_path, "invert.py"):
                pass
    with folder_lock(tmp_path, "invert.py"):    # released again
        pass


def test_invert_celeba_without_data_or_checkpoint_names_both(tmp_path):
    from deqlit.commands.invert import main
    from deqlit.runs.inversion import MissingInputsError
    with pytest.raises(MissingInputsError) as err:
        main(["--data", "celeba", "--data.root", str(tmp_path / "data"),
              "--ckpt", str(tmp_path / "ckpt.pth"), "--out", str(tmp_path / "run")])
    text = str(err.value)
    assert str(tmp_path / "data" / "celeba") in text and "img_align_celeba" in text
    assert str(tmp_path / "ckpt.pth") in text and "never downloads" in text
    assert not (tmp_path / "run").exists()                  # nothing written before the check


def test_random_is_an_alias_of_the_gaussian_start_and_runs_record_gaussian():
    from deqlit.deq.inversion import canonical_init, draw_start
    from deqlit.diffusion.seeds import gaussian_latent
    from deqlit.lit.joint_module import JointFineTuneModule
    assert InversionSettings(init="random").init == "gaussian" == canonical_init("random")
    assert InversionSettings(init="ddim-inversion").init == "ddim-inversion"
    abar = alphas_cumprod(linear_betas())
    joint = JointFineTuneModule(perturbed_unet(), abar, 2, (1, 8, 8), timesteps=3, init="random", seed=5)
    assert joint.hparams.init == "gaussian"
    # one seeding function: inversion's start of image k is gaussian_latent(seed, k), whatever the batch
    chain = Chain.build(abar, 3, "uniform", 0.0)
    x_T, _, _ = draw_start(None, chain, torch.zeros(2, 1, 8, 8), [4, 1], InversionSettings(init="random", seed=5))
    assert torch.equal(x_T[0], gaussian_latent(5, 4, (1, 8, 8))) and torch.equal(x_T[1], gaussian_latent(5, 1, (1, 8, 8)))
    assert not torch.equal(x_T[0], x_T[1])
