"""Device correctness without an accelerator: the math runs with every tensor on the `meta` device.

A constant made on the CPU inside the map, the sequential chains, the Anderson mixing, the warm
start or the inversion loss meets meta tensors there and raises "not on the expected device" /
"Tensor on device cpu is not on the expected device meta" — exactly the error a GPU run would
give. (The solver loop's only host reads are its per-iteration flag vector and the statistics at
the end, which meta tensors cannot give; bench/gpu_check.py runs the whole loop on a real GPU.)
"""
from __future__ import annotations

import pytest
import torch

from deqlit.deq.fixed_point import FixedPointMap
from deqlit.deq.inverse_map import InverseChainMap
from deqlit.deq.degradations import frobenius_loss
from deqlit.deq.inversion import sequential_x0
from deqlit.deq.grad import onestep_gradient
from deqlit.deq.solvers import _mix_with, mixing_weights, per_row_gram, residuals
from deqlit.deq.warm_start import shifted_warm_start
from deqlit.diffusion.chain import Chain
from deqlit.diffusion.schedule import alphas_cumprod, linear_betas
from deqlit.diffusion.sequential import ddim_encode, ddim_sample
from deqlit.deq.reduce import LOCAL
from tests.conftest import perturbed_unet

META = torch.device("meta")
T, B = 4, 2


@pytest.fixture(scope="module")
def meta_model():
    return perturbed_unet(dtype=torch.float32).to(META)


@pytest.fixture(scope="module")
def chain():
    return Chain.build(alphas_cumprod(linear_betas()), T, eta=0.5)


def meta(*shape):
    return torch.empty(*shape, device=META)


def test_the_meta_check_catches_a_cpu_constant(meta_model):
    with pytest.raises((RuntimeError, NotImplementedError)):
        meta(B, 1, 8, 8) * torch.ones(1, 1, 8, 8)       # what a hard-coded CPU constant would do
    with pytest.raises((RuntimeError, NotImplementedError)):
        meta_model(torch.zeros(B, 1, 8, 8), torch.zeros(B, dtype=torch.long))


def test_map_one_step_gradient_and_mixing_follow_the_device(meta_model, chain):
    x_T, noise = meta(B, 1, 8, 8).requires_grad_(True), meta(T, B, 1, 8, 8)
    fmap = FixedPointMap(meta_model, chain, max_batch=3).bind(x_T.detach(), noise)
    X = meta(T, B, 1, 8, 8)
    with torch.no_grad():
        fx = fmap(X)
        fx_frozen = fmap(X, frozen_from=2)
    assert fx.device == META and fx.shape == X.shape and fx_frozen.device == META
    meta_model.requires_grad_(False)                                # the inversion's gradient path
    try:
        step = onestep_gradient(fmap, X, x_T, noise, tau=0.1)
    finally:
        meta_model.requires_grad_(True)
    frobenius_loss(step[0], meta(B, 1, 8, 8)).sum().backward()
    assert x_T.grad.device == META
    absolute, relative, per_row = residuals(fx, X, LOCAL)
    assert absolute.device == relative.device == per_row.device == META
    gs = [meta(T, B, 1, 8, 8) for _ in range(3)]
    gram = per_row_gram(gs)
    weights = mixing_weights(gram.flip(0).cumsum(0).flip(0), 1e-3, True)
    assert _mix_with(weights, gs, gs, 0.9).device == META
    warm = shifted_warm_start(X, x_T.detach(), meta(B, 1, 8, 8), chain.abar, meta(B))
    assert warm.device == META


def test_sequential_chains_and_the_inverse_map_follow_the_device(meta_model, chain):
    x_T, noise, x0 = meta(B, 1, 8, 8), meta(T, B, 1, 8, 8), meta(B, 1, 8, 8)
    with torch.no_grad():
        assert ddim_sample(meta_model, x_T, chain, noise=noise).device == META
        assert ddim_encode(meta_model, x0, chain.with_eta(0.0)).device == META
        G = InverseChainMap(meta_model, chain, x0, noise)
        assert G(meta(T, B, 1, 8, 8)).device == META
    latents = meta(B, 1, 8, 8).requires_grad_(True)
    x0_hat = sequential_x0(meta_model, latents, chain, noise, checkpoint=True)   # the baseline
    frobenius_loss(x0_hat, x0).sum().backward()
    assert latents.grad.device == META
