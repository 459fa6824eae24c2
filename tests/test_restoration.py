"""Restoration through the DEQ (deq/degradations.py): inpainting and super-resolution as inversion
with a degraded loss. Oracles: hand-computed masks and block means, plain inversion (a mask that
hides nothing), and invariance to what the loss must not see (the hidden pixels)."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from deqlit.deq.degradations import Degradation, center_mask, file_mask, make_degradation
from deqlit.deq.inversion import BatchInverter, InversionSettings
from deqlit.diffusion.chain import Chain
from deqlit.diffusion.schedule import alphas_cumprod, linear_betas
from deqlit.diffusion.sequential import ddim_sample
from tests.conftest import perturbed_unet

ABAR = alphas_cumprod(linear_betas())
SOLVER = dict(max_iter=10, tol=1e-4, m=3, beta=0.9)


def settings(**kw) -> InversionSettings:
    base = dict(method="deq", init="random", lr=0.05, max_steps=3, solver="anderson",
                solver_options=SOLVER, seed=3)
    return InversionSettings(**{**base, **kw}).validate()


def images(n: int = 2, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (0.5 * torch.randn(n, 1, 8, 8, generator=gen, dtype=torch.float64)).clamp(-1, 1)


def run(model, targets, **kw) -> dict:
    inverter = BatchInverter(model, Chain.build(ABAR, 4), targets, list(range(len(targets))), settings(**kw))
    while not inverter.finished:
        inverter.step()
    return inverter.result()


def test_center_mask_hides_a_centred_quarter():
    mask = center_mask(8, 8)
    assert mask.shape == (1, 1, 8, 8) and int((mask == 0).sum()) == 16     # 25% of 64
    assert torch.equal(mask[0, 0, 2:6, 2:6], torch.zeros(4, 4)) and mask[0, 0, 0].eq(1).all()


def test_inpainting_loss_counts_the_known_pixels_only():
    x, y = images(1, 1), images(1, 2)
    mask = center_mask(8, 8)
    by_hand = sum(float((x[0, 0, i, j] - y[0, 0, i, j]) ** 2)
                  for i in range(8) for j in range(8) if mask[0, 0, i, j] == 1)
    degradation = Degradation(mask=mask.double())
    assert float(degradation.loss(x, degradation.apply(y))[0]) == pytest.approx(by_hand, rel=1e-12)
    shown = degradation.shown(degradation.apply(y), y)
    known_mean = float(y[0, 0][mask[0, 0] == 1].mean())
    assert float(shown[0, 0, 3, 3]) == pytest.approx(known_mean) and shown[0, 0, 0, 0] == y[0, 0, 0, 0]


def test_super_resolution_is_the_block_mean():
    x = images(1, 3)
    low = Degradation(factor=2).apply(x)
    assert low.shape == (1, 1, 4, 4)
    assert float(low[0, 0, 1, 2]) == pytest.approx(float(x[0, 0, 2:4, 4:6].mean()), rel=1e-12)
    assert Degradation(factor=2).shown(low, x).shape == x.shape


def test_random_masks_depend_on_the_image_not_the_batch():
    x = images(3)
    whole = make_degradation("inpaint", "random:0.5", 2, x, [0, 1, 2], seed=4).mask
    alone = make_degradation("inpaint", "random:0.5", 2, x[2:], [2], seed=4).mask
    assert torch.equal(whole[2:], alone) and not torch.equal(whole[0], whole[1])
    assert 0.3 < float((whole == 0).double().mean()) < 0.7


def test_a_mask_file_is_read_white_known_and_bad_ones_are_refused(tmp_path):
    picture = Image.new("L", (16, 16), 255)
    picture.paste(0, (0, 0, 8, 16))                       # left half black: unknown
    picture.save(tmp_path / "mask.png")
    mask = file_mask(tmp_path / "mask.png", 8, 8)
    assert mask[0, 0, :, :4].eq(0).all() and mask[0, 0, :, 4:].eq(1).all()
    Image.new("L", (8, 8), 255).save(tmp_path / "white.png")
    with pytest.raises(ValueError, match="every pixel as known"):
        file_mask(tmp_path / "white.png", 8, 8)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="not a readable image"):
        file_mask(tmp_path / "bad.png", 8, 8)
    with pytest.raises(FileNotFoundError, match="--mask center"):
        file_mask(tmp_path / "missing.png", 8, 8)
    Image.new("L", (8, 8), 0).save(tmp_path / "black.png")
    with pytest.raises(ValueError, match="marks no pixel as known"):       # nothing to restore from
        file_mask(tmp_path / "black.png", 8, 8)
    erased = Image.new("RGBA", (8, 8), (255, 255, 255, 255))
    erased.paste((255, 255, 255, 0), (0, 0, 4, 8))        # left half erased to transparent: unknown
    erased.save(tmp_path / "erased.png")                  # (read without alpha: all white, refused)
    assert torch.equal(file_mask(tmp_path / "erased.png", 8, 8), mask)
    picture.crop((0, 0, 16, 8)).save(tmp_path / "wide.png")
    with pytest.raises(ValueError, match=r"is 16x8 pixels but the images are 8x8"):   # would stretch
        file_mask(tmp_path / "wide.png", 8, 8)


def test_the_loss_sees_a_known_share_of_each_image():
    like = images(2)
    assert make_degradation("inpaint", "center", 2, like, [0, 1], seed=0).observed_fraction(like).tolist() == [0.75, 0.75]
    assert make_degradation("super-resolution", "center", 2, like, [0, 1], seed=0).observed_fraction(like).tolist() == [0.25, 0.25]
    assert Degradation().observed_fraction(like).tolist() == [1.0, 1.0]


def test_early_stop_is_scaled_to_the_share_of_the_image_the_loss_sees():
    """early_stop_loss is a whole-image loss; 2x super-resolution's pooled loss sums a quarter of the
    values, so an image stops below a quarter of it. Before, the unscaled threshold stopped every
    image after one step (whose result was never used) whatever --max-steps said."""
    model = perturbed_unet(dtype=torch.float64).requires_grad_(False)
    target = images(1)
    start_loss = float(run(model, target, task="super-resolution", max_steps=1)["loss_history"][0, 0])
    above = run(model, target, task="super-resolution", max_steps=4, early_stop_loss=2 * start_loss)
    assert above["stop_below"].tolist() == [pytest.approx(start_loss / 2)]
    assert above["steps"] > 1 and int(above["image_steps"][0]) >= 1
    under = run(model, target, task="super-resolution", max_steps=4, early_stop_loss=8 * start_loss)
    assert under["steps"] == 1 and under["image_steps"].tolist() == [0]    # the start is kept as it is
    assert torch.equal(under["reconstructions"], under["initial"])


@pytest.mark.parametrize("kw,match", [
    (dict(task="inpaint", method="exact", init="exact"), "--method deq"),
    (dict(task="inpaint", fill="smooth"), "unknown fill 'smooth'"),
    (dict(task="inpaint", mask="random:1.5"), r"\(0, 1\)"),
    (dict(task="inpaint", mask="square"), "center, random:P"),
    (dict(task="super-resolution", factor=1), "factor >= 2"),
    (dict(task="denoise"), "unknown task"),
])
def test_bad_restoration_settings_are_refused_naming_the_fix(kw, match):
    with pytest.raises(ValueError, match=match):
        settings(**kw)


def test_super_resolution_factor_must_divide_the_image():
    with pytest.raises(ValueError, match="does not divide the 8x8"):
        make_degradation("super-resolution", "center", 3, images(1), [0], seed=0)


@pytest.mark.parametrize("method", ["deq", "baseline"])
def test_inpainting_never_looks_at_the_hidden_pixels(method):
    """Two targets that differ only inside the hole give the same latents, step for step."""
    model = perturbed_unet(dtype=torch.float64).requires_grad_(False)
    a = images(2)
    b = a.clone()
    b[..., 2:6, 2:6] = -a[..., 2:6, 2:6] + 0.3
    ra = run(model, a, task="inpaint", method=method)
    rb = run(model, b, task="inpaint", method=method)
    assert torch.equal(ra["x_T"], rb["x_T"]) and torch.equal(ra["min_loss"], rb["min_loss"])
    assert ra["unknown"].shape == (2, 1, 8, 8) and int(ra["unknown"].sum()) == 2 * 16
    # ... while plain inversion of the same two targets does see them
    assert not torch.equal(run(model, a, method=method)["x_T"], run(model, b, method=method)["x_T"])


def test_a_mask_that_hides_nothing_is_plain_inversion():
    model = perturbed_unet(dtype=torch.float64).requires_grad_(False)
    targets = images(2)
    plain = run(model, targets)
    nothing_hidden = run(model, targets, task="inpaint", mask="random:1e-9")
    assert torch.equal(plain["x_T"], nothing_hidden["x_T"])


def test_restoration_lowers_the_loss_on_what_is_known():
    """On targets the chain can reach, a few DEQ steps from a Gaussian start lower the
    degraded loss, and the result's reconstruction is the exact chain of its latent."""
    model = perturbed_unet(dtype=torch.float64).requires_grad_(False)
    chain = Chain.build(ABAR, 4)
    with torch.no_grad():
        targets = ddim_sample(model, torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(9),
                                                 dtype=torch.float64), chain)
    for task in ("inpaint", "super-resolution"):
        result = run(model, targets, task=task, max_steps=6, lr=0.1)
        assert (result["min_loss"] < result["initial_loss"]).all(), task
        with torch.no_grad():
            again = ddim_sample(model, result["x_T"].double(), chain)
        assert torch.allclose(again.float(), result["reconstructions"], atol=1e-5)
        assert result["observed_shown"].shape == targets.shape


def test_harmonic_fill_solves_laplace_in_the_hole():
    """A plane is harmonic: the fill of a plane's hole is the plane; any fill's hole pixels are the
    mean of their 4 neighbours, and the known pixels stay."""
    i, j = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    plane = (0.1 * i - 0.05 * j - 0.2).double().view(1, 1, 8, 8)
    degradation = make_degradation("inpaint", "center", 2, plane, [0], seed=0, fill="harmonic")
    filled = degradation.shown(degradation.apply(plane), plane)
    assert torch.allclose(filled, plane, atol=1e-4)
    y = images(1, 5)
    filled = degradation.shown(degradation.apply(y), y)
    hole = filled[0, 0, 2:6, 2:6]
    neighbours = (filled[0, 0, 1:5, 2:6] + filled[0, 0, 3:7, 2:6] + filled[0, 0, 2:6, 1:5] + filled[0, 0, 2:6, 3:7]) / 4
    assert torch.allclose(hole, neighbours, atol=1e-4)
    known = degradation.mask.bool().expand_as(y)
    assert torch.equal(filled[known], y[known])


def test_projection_honours_y_and_comes_no_farther_from_the_image():
    """project(x) satisfies A(x) = y exactly and, y being A(target), is never farther from the target
    than x (an orthogonal projection onto a set that holds the target)."""
    target, guess = images(2, 6), images(2, 7)
    for degradation in (make_degradation("inpaint", "center", 2, target, [0, 1], seed=0),
                        make_degradation("super-resolution", "center", 2, target, [0, 1], seed=0)):
        y = degradation.apply(target)
        projected = degradation.project(guess, y)
        assert torch.allclose(degradation.apply(projected), y, atol=1e-12)
        assert ((projected - target).pow(2).sum((1, 2, 3)) <= (guess - target).pow(2).sum((1, 2, 3)) + 1e-12).all()
    assert torch.equal(Degradation().project(guess, target), guess)


def test_exact_start_of_a_restoration_regenerates_the_filled_guess():
    """init exact inverts what the degradation shows (here the harmonic fill): its start is plain
    exact inversion's latent of that guess."""
    model = perturbed_unet(dtype=torch.float64).requires_grad_(False)
    targets, exact = images(2), dict(mode="per-step", solver="anderson", max_iter=5, tol=1e-3, init="ddim")
    result = run(model, targets, task="inpaint", fill="harmonic", init="exact", max_steps=1, exact=exact)
    degradation = make_degradation("inpaint", "center", 2, targets, [0, 1], seed=3, fill="harmonic")
    guess = degradation.shown(degradation.apply(targets), targets)
    plain = run(model, guess, method="exact", init="exact", exact=exact)
    # 5 iterations a step miss tol: the report says so (invert.py prints it once the run ends).
    assert result["exact_report"]["converged"] is False
    assert torch.allclose(result["initial"], plain["reconstructions"], atol=1e-6)
    assert not torch.allclose(result["observed_shown"], targets.float(), atol=1e-2)


def test_fill_reaches_the_start_and_restored_pastes_the_known_pixels():
    model = perturbed_unet(dtype=torch.float64).requires_grad_(False)
    targets = images(2)
    result = run(model, targets, task="inpaint", fill="harmonic", init="ddim-inversion", max_steps=1)
    known = ~result["unknown"].expand_as(targets)
    assert torch.allclose(result["restored"][known], targets.float()[known])
    assert torch.equal(result["restored"][~known], result["reconstructions"][~known])
