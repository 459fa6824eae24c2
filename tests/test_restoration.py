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


@pytest.mark.parametrize("kw,match", [
    (dict(task="inpaint", method="exact", init="exact"), "--method deq"),
    (dict(task="inpaint", init="exact"), "init 'exact'"),
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
