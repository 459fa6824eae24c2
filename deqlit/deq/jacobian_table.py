"""The noise network's Jacobian as a per-state, per-spatial-frequency gain table (for newton-scan).

newton-scan (newton_scan.py) models eps(x_i + dx) ~ eps(x_i) + J_i dx. The scalar model J_i = g I
cannot tell image content from noise: a denoiser keeps the low frequencies of a noisy state and
removes the high ones, so d eps / dx is near 0 on the first and near 1 / sqrt(1 - abar) on the
second (for Gaussian data eps is linear and J_i is exactly such a filter). This module measures,
once per model, chain and image shape, the gain of J_i at every spatial frequency k,
    tau_i(k) = E[ Re( conj(V(k)) (J_i v)^(k) ) ] / E[ |V(k)|^2 ],   V = rfft2(v), v white noise,
on states x_i = sqrt(abar_i) x0 + sqrt(1 - abar_i) n like those a solve visits (x0: a few samples
of a short DDIM chain of the model itself; no data needed), with J_i v by central differences (two
forward calls; any model, no autograd). newton-scan then uses J_i ~ rho_{i,b} diag(tau_i) in the
Fourier basis, rho a per-image scalar secant.

Cost. The states are measured on at most CALIBRATION_STATES of the chain (the rest interpolate
tau * sqrt(1 - abar), which stays between 0 and about 1, linearly in the state index); the clean
samples come from a DDIM chain through at most SAMPLE_STEPS of the chain's own states. In all
SAMPLE_STEPS + 2 batched calls of CALIBRATION_SAMPLES images (times CALIBRATION_STATES in the last
two), once per (model, chain, image shape, dtype) in a process, the whole table even on a
time shard (which reads its block's rows only): a checkpoint written by rank 0 then holds every
row that the processes of a resumed run read. The table is cached with
the model and not refreshed when its weights change (joint fine-tuning, whose checkpoints carry
it, measured_tables / keep_tables, so that --resume solves as the uninterrupted run): a stale table could only
make the solve take more iterations, never change its fixed point, and measured it does not: after
200 steps of the default joint run (weights 2.6% away from the shipped ones, the table 19% at T = 10
and 12% at T = 25), sampling with the fine-tuned network and the shipped network's table took the
same iterations as with its own (8 seeds of 4 images, tol 1e-4: T = 10 median 8 both, T = 25 median
10 both).

Measured (shipped faces model, T = 25, 8 seeds, iterations to x_0 within RMSE 1e-3 of sequential
DDIM, bench/sampling.py's rule): the scalar model median 8 [7, 7, 8, 9, 7, 9, 8, 8]; this table with
the scalar secant rho: median 7 [7, 7, 8, 8, 6, 9, 6, 7], with rho held to [0.5, 2]
(newton_scan.RHO_RANGE) 7 [6, 7, 7, 8, 6, 8, 6, 7]; the table without rho: 8; a secant per frequency
band instead of rho: 7.5 (the bands' secants are noisier); exact Newton (true JVPs): 5-6. A table
measured on the chain's own trajectories (JVPs) instead of noised samples: the same iterations.
"""
from __future__ import annotations

import weakref
from typing import Callable

import torch

from deqlit.diffusion.chain import Chain

NoiseModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
CALIBRATION_STATES = 24     # states measured; the others interpolate
CALIBRATION_SAMPLES = 8     # clean samples (32 gave the same iterations at T = 25 and 100)
SAMPLE_STEPS = 10           # DDIM steps that make them
SEED = 0                    # the calibration's own generator: every process gets the same table

_CACHE: "weakref.WeakKeyDictionary[object, dict]" = weakref.WeakKeyDictionary()


def rfft_weights(width: int, dtype=torch.float64, device=None) -> torch.Tensor:
    """How often each column of rfft2's half spectrum counts in the full one: (W // 2 + 1,).
    Inner products over the half spectrum with these weights equal those over the full one."""
    w = torch.full((width // 2 + 1,), 2.0, dtype=dtype, device=device)
    w[0] = 1.0
    if width % 2 == 0:
        w[-1] = 1.0
    return w


def evenly_spaced(first: int, last: int, count: int) -> list[int]:
    """At most `count` distinct integers from first to last (both included), evenly spaced."""
    if last - first + 1 <= count:
        return list(range(first, last + 1))
    return sorted({round(first + k * (last - first) / (count - 1)) for k in range(count)})


def clean_samples(model: NoiseModel, chain: Chain, image_shape: tuple[int, ...], samples: int,
                  device, dtype, generator: torch.Generator) -> torch.Tensor:
    """x0 of `samples` images from a DDIM chain through at most SAMPLE_STEPS of the chain's states.
    -> (samples, C, H, W)."""
    from deqlit.diffusion.sequential import ddim_sample
    states = evenly_spaced(1, chain.T, SAMPLE_STEPS)
    sub = Chain(tuple(chain.timesteps[i - 1] for i in states),
                torch.cat([chain.abar[:1], chain.abar[states]]))
    x_T = torch.randn((samples,) + tuple(image_shape), generator=generator, dtype=torch.float64)
    return ddim_sample(model, x_T.to(device=device, dtype=dtype), sub)


def measure_gains(model: NoiseModel, chain: Chain, states: list[int], x0: torch.Tensor,
                  generator: torch.Generator, step: float) -> torch.Tensor:
    """tau_i(k) at the given states (module header), (len(states), C, H, W // 2 + 1) float64."""
    from deqlit.deq.fixed_point import batched_eps
    idx = torch.tensor(states)
    s = chain.abar[idx].sqrt().to(device=x0.device, dtype=x0.dtype).reshape(-1, 1, 1, 1, 1)
    sigma = (1 - chain.abar[idx]).sqrt().to(device=x0.device, dtype=x0.dtype).reshape(-1, 1, 1, 1, 1)
    shape = (len(states),) + tuple(x0.shape)
    noise = torch.randn(shape, generator=generator, dtype=torch.float64).to(x0)
    probe = torch.randn(shape, generator=generator, dtype=torch.float64).to(x0)
    x = s * x0[None] + sigma * noise
    times = chain.timestep_tensor(x0.device)[idx - 1]
    jv = (batched_eps(model, x + step * probe, times) - batched_eps(model, x - step * probe, times)) / (2 * step)
    V = torch.fft.rfft2(probe.double(), norm="ortho")
    JV = torch.fft.rfft2(jv.double(), norm="ortho")
    # Sum over the samples (dim 1): one gain per (state, channel, frequency).
    return (V.conj() * JV).real.sum(1) / (V.abs() ** 2).sum(1).clamp(min=1e-300)


def calibrate(model: NoiseModel, chain: Chain, image_shape: tuple[int, ...], device=None,
              dtype=torch.float32) -> torch.Tensor:
    """tau_i(k) of every state x_0..x_T: (T + 1, C, H, W // 2 + 1) float64 on `device` (row 0,
    x_0, makes no term: zero). Uncached; `gain_table` caches it."""
    if len(image_shape) != 3:
        raise ValueError(f"the Jacobian table needs images (C, H, W), got a state shape {tuple(image_shape)}")
    generator = torch.Generator().manual_seed(SEED)
    # Central differences: a step well above the dtype's resolution, small beside the states' ~1.
    step = 1e-3 if dtype in (torch.float32, torch.float64) else 3e-2
    with torch.no_grad():
        x0 = clean_samples(model, chain, image_shape, CALIBRATION_SAMPLES, device, dtype, generator)
        states = evenly_spaced(1, chain.T, CALIBRATION_STATES)
        gains = measure_gains(model, chain, states, x0, generator, step)
    if not bool(torch.isfinite(gains).all()):
        from deqlit.deq.solvers import SolverDivergedError
        raise SolverDivergedError(
            "newton-scan: the noise network returned NaN/Inf while its Jacobian table was measured "
            "(a short DDIM sample and two calls on noised states): the model itself produces "
            "non-finite values (check the checkpoint's weights); newton-scan with jacobian='scalar' "
            "or another solver will meet the same values")
    # Interpolate tau * sigma (bounded) over the state index; sigma_i = sqrt(1 - abar_i).
    sigma = (1 - chain.abar.double()).clamp(min=0).sqrt().to(gains.device)
    measured = gains * sigma[states].reshape(-1, 1, 1, 1)
    # Every state i >= 1 between the measured states lo <= i <= hi (states[0] = 1, states[-1] = T).
    where = torch.tensor(states, dtype=torch.float64, device=gains.device)
    i = torch.arange(1, chain.T + 1, dtype=torch.float64, device=gains.device)
    hi = torch.searchsorted(where, i).clamp(max=len(states) - 1)
    lo = (hi - 1).clamp(min=0)
    frac = ((i - where[lo]) / (where[hi] - where[lo]).clamp(min=1)).reshape(-1, 1, 1, 1)
    table = torch.zeros((chain.T + 1,) + tuple(gains.shape[1:]), dtype=torch.float64, device=gains.device)
    table[1:] = ((1 - frac) * measured[lo] + frac * measured[hi]) / sigma[1:].clamp(min=1e-12).reshape(-1, 1, 1, 1)
    return table


def gain_table(model: NoiseModel, chain: Chain, image_shape: tuple[int, ...], device=None,
               dtype=torch.float32) -> torch.Tensor:
    """`calibrate`'s table, measured once per (model, chain, image shape, dtype) and moved to the
    `device` asked for. The device is not part of the key: a checkpoint's table, written by rank 0
    on cuda:0, serves rank 1 on cuda:1 (or a resume on a CPU) instead of being measured again."""
    key = (chain.timesteps, tuple(chain.abar.tolist()), tuple(image_shape), dtype)
    try:
        per_model = _CACHE.setdefault(model, {})
    except TypeError:                    # a model that cannot be weakly referenced: no cache
        return calibrate(model, chain, image_shape, device, dtype)
    if key not in per_model:
        per_model[key] = calibrate(model, chain, image_shape, device, dtype)
    elif device is not None and per_model[key].device != torch.device(device):
        per_model[key] = per_model[key].to(device)
    return per_model[key]


def measured_tables(model: NoiseModel) -> list[dict]:
    """The tables gain_table has measured (or was given) for `model` in this process, as plain
    data for a checkpoint: [{'key': [timesteps, abar, image shape, device, dtype name],
    'table': tensor}]; keep_tables gives them back."""
    try:
        per_model = _CACHE.get(model) or {}
    except TypeError:
        return []
    return [{"key": [*key[:3], str(table.device), str(key[3]).removeprefix("torch.")], "table": table}
            for key, table in per_model.items()]


def keep_tables(model: NoiseModel, saved: list[dict]) -> None:
    """gain_table answers with the `saved` tables (measured_tables of an earlier process) for
    `model` instead of measuring them. A table is measured once, from the weights of the first
    solve: a process resuming fine-tuning would measure the restored weights, and its solves
    (within tol) would differ from the uninterrupted run's, which kept the starting weights' table.
    The saved device (the writer's, rank 0's) is only informative: gain_table moves the table to
    the device of each process's solve."""
    for entry in saved:
        timesteps, abar, shape, _device, dtype = entry["key"]
        key = (tuple(timesteps), tuple(abar), tuple(shape), getattr(torch, dtype))
        _CACHE.setdefault(model, {})[key] = entry["table"]
