"""Latent interpolation (diffusion/interpolation.py) against hand formulas."""
from __future__ import annotations

import json
import math

import pytest
import torch

from deqlit.diffusion.interpolation import interpolate, lerp, parse_pairs, slerp


def latents(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 16, 16, generator=gen, dtype=torch.float64),
            torch.randn(1, 16, 16, generator=gen, dtype=torch.float64))


def test_slerp_keeps_the_endpoints_and_walks_the_great_circle():
    a, b = latents()
    path = slerp(a, b, torch.linspace(0, 1, 9, dtype=torch.float64))
    assert torch.allclose(path[0], a, atol=1e-12) and torch.allclose(path[-1], b, atol=1e-12)
    # Equal angles between consecutive frames, on the plane of a and b.
    cos = [float((path[k] * path[k + 1]).sum() / (path[k].norm() * path[k + 1].norm())) for k in range(8)]
    assert max(cos) - min(cos) < 1e-10
    omega = math.acos(float((a * b).sum() / (a.norm() * b.norm())))
    assert math.acos(cos[0]) == pytest.approx(omega / 8, rel=1e-9)
    # The norm is interpolated linearly; lerp's midpoint sinks inside the sphere.
    assert float(path[4].norm()) == pytest.approx(float(a.norm() + b.norm()) / 2, rel=1e-9)
    assert float(lerp(a, b, torch.tensor([0.5]))[0].norm()) < 0.8 * float(path[4].norm())


def test_parallel_latents_fall_back_to_the_line():
    a, _ = latents()
    path = slerp(a, 2 * a, torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64))
    assert torch.allclose(path[1], 1.5 * a)


def test_interpolate_and_pairs_refuse_bad_input():
    a, b = latents()
    assert interpolate(a.float(), b.float(), 5).shape == (5, 1, 16, 16)
    with pytest.raises(ValueError, match=r"frames must be 2 or more \(the two endpoints are frames\), got 1"):
        interpolate(a, b, 1)
    with pytest.raises(ValueError, match="unknown interpolation"):
        interpolate(a, b, 3, "cubic")
    assert parse_pairs("0:1, 2:3", 4) == [(0, 1), (2, 3)]
    with pytest.raises(ValueError, match="rows 0..3"):
        parse_pairs("0:4", 4)
    with pytest.raises(ValueError, match="I:J"):
        parse_pairs("0-1", 4)
    with pytest.raises(ValueError, match="row 2 with itself"):
        parse_pairs("0:1,2:2", 4)
    with pytest.raises(ValueError, match="0:1 twice"):
        parse_pairs("0:1, 0:1", 4)


def test_frame_labels_are_exact_or_rounded_half_up():
    """t = k / (frames - 1) with the fewest decimals (up to 4) that write every t exactly, else 3
    decimals rounded half up: never Python's round-half-even on binary floats (0.125 -> 0.12 but
    0.375 -> 0.38)."""
    from deqlit.commands.interpolate import frame_labels
    assert frame_labels(9) == ["t = 0.000", "t = 0.125", "t = 0.250", "t = 0.375", "t = 0.500",
                               "t = 0.625", "t = 0.750", "t = 0.875", "t = 1.000"]
    assert frame_labels(5) == ["t = 0.00", "t = 0.25", "t = 0.50", "t = 0.75", "t = 1.00"]
    assert frame_labels(3) == ["t = 0.0", "t = 0.5", "t = 1.0"]
    assert frame_labels(2) == ["t = 0", "t = 1"]
    assert frame_labels(4) == ["t = 0.000", "t = 0.333", "t = 0.667", "t = 1.000"]
    assert frame_labels(17)[1:4] == ["t = 0.0625", "t = 0.1250", "t = 0.1875"]
    assert frame_labels(33)[1:4] == ["t = 0.031", "t = 0.063", "t = 0.094"]   # 0.0625: up, not even


# ---- the normality of latents (evaluation/normality.py) -----------------------------------------
def smooth(z: torch.Tensor) -> torch.Tensor:
    """Neighbour-averaged noise: correlated like a latent that still holds its image."""
    return (z + z.roll(1, -1) + z.roll(1, -2) + z.roll((1, 1), (-2, -1))) / 2


def test_white_noise_passes_and_correlated_or_heavy_tailed_latents_fail():
    from deqlit.evaluation.normality import normality, patch_correlation
    gen = torch.Generator().manual_seed(1)
    white = torch.randn(40, 1, 32, 32, generator=gen, dtype=torch.float64)
    stats = normality(white)
    assert stats["shapiro_rejection_rate"] <= 0.15            # ~alpha = 0.05 by design
    assert max(stats["patch_correlation"]) < 0.15
    heavy = torch.distributions.Laplace(0.0, 1.0).sample((10, 1, 32, 32)).double()
    assert normality(heavy)["shapiro_rejection_rate"] >= 0.9
    assert float(patch_correlation(smooth(white[:5])).min()) > 0.4
    # Displacement (0, 1) inside 8x8 blocks, by hand, is one of the correlations considered.
    z = white[:1]
    s = (z - z.mean()) / (z - z.mean()).pow(2).mean().sqrt()
    pairs = [float(s[0, 0, y, x] * s[0, 0, y, x + 1]) for y in range(32) for x in range(31) if x % 8 != 7]
    assert float(patch_correlation(z)[0]) >= abs(sum(pairs) / len(pairs)) - 1e-12


# ---- the command's core (commands/interpolate.py) -------------------------------------------------
def test_the_control_midpoints_follow_the_pairing_and_white_latents_score_as_their_control():
    """The control of fd-random: midpoints of white-noise latents paired like the real ones. Pairs
    (0, 1) and (1, 0) share their midpoint (slerp is symmetric at t = 0.5), and latents that are
    themselves the control's white noise score exactly 1 against it."""
    from deqlit.commands.interpolate import decode, midpoint_distances, pairwise_midpoints
    from deqlit.diffusion.chain import Chain
    from deqlit.diffusion.schedule import alphas_cumprod, linear_betas
    from tests.conftest import perturbed_unet
    z = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    mids = pairwise_midpoints(z, [(0, 1), (1, 0), (0, 2)], "slerp")
    assert torch.allclose(mids[0], mids[1], atol=1e-6) and not torch.allclose(mids[0], mids[2])
    model = perturbed_unet(dtype=torch.float32)
    chain = Chain.build(alphas_cumprod(linear_betas()), 3)
    pairs, seed = [(0, 1), (1, 2), (0, 2)], 5
    gen = torch.Generator().manual_seed(seed)             # the control's draws, in its order
    torch.randn(len(pairs), 1, 8, 8, generator=gen)        # the fresh samples' latents come first
    white = torch.randn(3, 1, 8, 8, generator=gen)
    cfg = {"data": {"name": "faces", "root": "data"}}
    images = decode(model, pairwise_midpoints(white, pairs, "slerp"), chain, "sequential", {})
    report = midpoint_distances(model, images, chain, cfg, seed, pairs, "slerp")
    assert report["ratio_to_fresh_midpoints"] == pytest.approx(1.0)
    assert report["ratio_to_fresh"] != pytest.approx(1.0)


def test_interpolation_run_writes_strips_and_figures(tmp_path):
    from PIL import Image
    from deqlit.commands.interpolate import run_interpolation
    from deqlit.diffusion.chain import Chain
    from deqlit.diffusion.schedule import alphas_cumprod, linear_betas
    from tests.conftest import perturbed_unet
    model = perturbed_unet(dtype=torch.float32)
    chain = Chain.build(alphas_cumprod(linear_betas()), 3)
    x_T = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    cfg = {"data": {"name": "faces", "root": "data"}}
    report = run_interpolation(model, cfg, {"x_T": x_T, "chain": chain.to_dict()}, "0:1,2:3", 5, "slerp", tmp_path)
    strip = Image.open(tmp_path / "strip_0_1.png")
    assert strip.width >= 5 * 96 and strip.height >= 2 * 96            # 2 rows of 5 tiles, >= 96 px
    pair = report["pairs"][0]
    assert pair["rows"] == [0, 1] and len(pair["kurtosis"]) == len(pair["shapiro_p"]) == 5
    assert report["interpolated"]["count"] == 2 * 3                    # the interior frames
    mid = report["midpoints"]
    assert mid["num_midpoints"] == 2 and mid["ratio_to_fresh"] == pytest.approx(
        mid["midpoints_fd_random"] / mid["fresh_fd_random"])
    assert mid["ratio_to_fresh_midpoints"] == pytest.approx(
        mid["midpoints_fd_random"] / mid["fresh_midpoints_fd_random"])
    assert json.loads((tmp_path / "metrics.json").read_text())["method"] == "slerp"
    with pytest.raises(ValueError, match="eta = 0.5"):
        run_interpolation(model, cfg, {"x_T": x_T, "chain": chain.with_eta(0.5).to_dict()}, "0:1", 3,
                          "slerp", tmp_path)
