"""newton-scan's Jacobian table (deqlit/deq/jacobian_table.py) and the scan in the Fourier basis,
against independent oracles: a circular-convolution network whose Jacobian is a known filter (its
frequency response is the FFT of the kernel), and a row-by-row back-substitution of the Newton
equations with the Jacobian applied as an explicit operator."""
from __future__ import annotations

import pytest
import torch

from deqlit.deq.jacobian_table import evenly_spaced, gain_table, keep_tables, measured_tables, rfft_weights
from deqlit.deq.newton_scan import from_frequencies, scan_correction, to_frequencies
from deqlit.diffusion.chain import Chain
from deqlit.diffusion.schedule import alphas_cumprod, linear_betas

ABAR = alphas_cumprod(linear_betas())


class CircularFilter(torch.nn.Module):
    """eps(x, t) = (1 + t / 1000) * (k circularly convolved with x): linear, its Jacobian a filter."""

    def __init__(self):
        super().__init__()
        self.kernel = torch.tensor([[0.05, 0.1, 0.05], [0.1, 0.4, 0.1], [0.05, 0.1, 0.05]], dtype=torch.float64)
        self.calls = 0

    def forward(self, x, t):
        self.calls += 1
        padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="circular")
        out = torch.nn.functional.conv2d(padded, self.kernel[None, None].to(x.dtype))
        return out * (1 + t.to(x.dtype) / 1000).reshape(-1, 1, 1, 1)

    def response(self, size: int) -> torch.Tensor:
        """The filter's gain at every rfft2 frequency, (size, size // 2 + 1)."""
        image = torch.zeros(size, size, dtype=torch.float64)
        for i in range(3):
            for j in range(3):
                image[(i - 1) % size, (j - 1) % size] = self.kernel[i, j]
        return torch.fft.rfft2(image).real          # symmetric kernel: a real response


def test_the_table_of_a_filter_network_is_its_frequency_response_at_every_state():
    net = CircularFilter()
    chain = Chain.build(ABAR, 10)
    with torch.no_grad():
        table = gain_table(net, chain, (1, 8, 8), torch.device("cpu"), torch.float64)
    assert table.shape == (11, 1, 8, 5)
    assert table[0].abs().max() == 0                  # x_0 makes no term
    for i in range(1, 11):                            # state x_i is evaluated at timestep s_{i-1}
        expected = (1 + chain.timesteps[i - 1] / 1000) * net.response(8)
        assert (table[i, 0] - expected).abs().max() <= 1e-8


def test_the_table_is_measured_once_per_model_and_chain():
    net = CircularFilter()
    chain = Chain.build(ABAR, 10)
    with torch.no_grad():
        first = gain_table(net, chain, (1, 8, 8), torch.device("cpu"), torch.float64)
        calls = net.calls
        again = gain_table(net, chain, (1, 8, 8), torch.device("cpu"), torch.float64)
        assert again is first and net.calls == calls
        other = gain_table(net, Chain.build(ABAR, 12), (1, 8, 8), torch.device("cpu"), torch.float64)
    assert net.calls > calls and other.shape[0] == 13


@pytest.mark.parametrize("saved_on", ["cuda:0", "cpu"])
def test_a_saved_table_serves_a_process_on_another_device(saved_on):
    """Joint fine-tuning's checkpoint carries rank 0's tables (measured_tables) and every process of
    a resumed run keeps them (keep_tables). On GPUs rank 0's key names cuda:0 and rank 1 solves on
    cuda:1 (or the run resumes on a CPU): a key with the device missed, and that process measured a
    new table from the restored weights (then solved unlike the uninterrupted run). The saved table
    serves any device, moved there."""
    chain = Chain.build(ABAR, 10)
    first = CircularFilter()
    with torch.no_grad():
        table = gain_table(first, chain, (1, 8, 8), torch.device("cpu"), torch.float64)
    saved = measured_tables(first)
    assert len(saved) == 1
    saved[0]["key"][3] = saved_on                     # as the process that wrote it named its device
    resumed = CircularFilter()
    keep_tables(resumed, saved)
    with torch.no_grad():
        kept = gain_table(resumed, chain, (1, 8, 8), torch.device("cpu"), torch.float64)
    assert resumed.calls == 0
    assert torch.equal(kept, table) and kept.device == torch.device("cpu")


def test_a_long_chain_measures_a_subset_and_interpolates_between_its_states():
    """T = 60: 24 states measured; tau * sigma is linear in the state index between them, and the
    filter network's exact gains are met at the measured states."""
    net = CircularFilter()
    chain = Chain.build(ABAR, 60)
    with torch.no_grad():
        table = gain_table(net, chain, (1, 8, 8), torch.device("cpu"), torch.float64)
    measured = evenly_spaced(1, 60, 24)
    assert len(measured) == 24 and measured[0] == 1 and measured[-1] == 60
    sigma = (1 - chain.abar).sqrt()
    for i in measured:
        assert (table[i, 0] - (1 + chain.timesteps[i - 1] / 1000) * net.response(8)).abs().max() <= 1e-8
    lo, hi = measured[3], measured[4]
    assert hi - lo >= 2
    mid = lo + 1
    frac = (mid - lo) / (hi - lo)
    expected = (1 - frac) * table[lo] * sigma[lo] + frac * table[hi] * sigma[hi]
    assert (table[mid] * sigma[mid] - expected).abs().max() <= 1e-12


def back_substitution_with_operator(scale, weight, inclusive, J, R):
    """dX of dX_r = s_r sum_{r' in S(r)} w_r' J_r'(dX_r') + R_r row by row (O(rows^2)), J_r a
    linear operator; the inclusive row's own term solved by a dense linear solve."""
    rows = R.shape[0]
    dX = torch.zeros_like(R)
    for r in reversed(range(rows)):
        later = sum((weight[q] * J[q](dX[q]) for q in range(r + 1, rows)), torch.zeros_like(R[0]))
        rhs = scale[r] * later + R[r]
        if not inclusive:
            dX[r] = rhs
            continue
        size = R[r].numel()                           # (I - s_r w_r J_r) dX_r = rhs
        basis = torch.eye(size, dtype=R.dtype).reshape((size,) + tuple(R[r].shape))
        columns = torch.stack([J[r](e).flatten() for e in basis], 1)
        matrix = torch.eye(size, dtype=R.dtype) - scale[r] * weight[r] * columns
        dX[r] = torch.linalg.solve(matrix, rhs.flatten()).reshape(R[r].shape)
    return dX


def test_the_scan_in_the_fourier_basis_equals_back_substitution_with_the_filters():
    for inclusive in (False, True):
        gen = torch.Generator().manual_seed(int(inclusive))
        rows, B, H, W = 6, 2, 4, 6
        scale = torch.rand(rows, generator=gen, dtype=torch.float64) * 0.9 + 0.05
        weight = -torch.rand(rows, generator=gen, dtype=torch.float64) * (-1 if inclusive else 1) * 0.5
        gains = torch.rand(rows, B, 1, H, W // 2 + 1, generator=gen, dtype=torch.float64)
        # Real filters need gains symmetric under k -> -k: on the half spectrum, column 0 (and
        # W / 2) holds both k_y and -k_y.
        for col in (0, W // 2):
            gains[..., col] = 0.5 * (gains[..., col] + gains[..., col].flip(-1).roll(1, -1))
        R = torch.randn(rows, B, 1, H, W, generator=gen, dtype=torch.float64)
        U = from_frequencies(scan_correction(scale, weight, inclusive, gains, to_frequencies(R)), (H, W))
        dX = scale.reshape(-1, 1, 1, 1, 1) * U + R

        def operator(r):
            return lambda v: torch.fft.irfft2(gains[r] * torch.fft.rfft2(v, norm="ortho"), s=(H, W), norm="ortho")
        oracle = back_substitution_with_operator(scale, weight, inclusive, [operator(r) for r in range(rows)], R)
        assert (dX - oracle).abs().max() <= 1e-10 * oracle.abs().max()


def test_rfft_weights_make_half_spectrum_inner_products_equal_pixel_ones():
    gen = torch.Generator().manual_seed(0)
    for W in (6, 7):
        a, b = torch.randn(2, 5, W, generator=gen, dtype=torch.float64)
        fa, fb = torch.fft.rfft2(a, norm="ortho"), torch.fft.rfft2(b, norm="ortho")
        half = ((fa.conj() * fb).real * rfft_weights(W)).sum()
        assert abs(float(half) - float((a * b).sum())) <= 1e-12


def test_the_secant_scale_fits_the_step_and_stays_within_its_range():
    """rho = <d eps, d x> / <d x, tau d x>: exact when eps's change is tau's filter times a scalar
    inside RHO_RANGE; clamped outside it; kept where the row did not move."""
    from deqlit.deq.newton_scan import RHO_RANGE, table_secant
    gen = torch.Generator().manual_seed(0)
    rows, B, H, W = 3, 2, 4, 6
    tau = torch.rand(rows, 1, H, W // 2 + 1, generator=gen, dtype=torch.float64) + 0.5
    tau[..., 0] = 1.0                                  # symmetric columns: a real filter
    tau[..., W // 2] = 1.0
    x_prev = torch.randn(rows, B, 1, H, W, generator=gen, dtype=torch.float64)
    x = x_prev + torch.randn(rows, B, 1, H, W, generator=gen, dtype=torch.float64)
    x[1, 0] = x_prev[1, 0]                             # this row and image did not move

    def filtered(v, scale):
        return scale * torch.fft.irfft2(tau[:, None] * torch.fft.rfft2(v, norm="ortho"), s=(H, W), norm="ortho")
    rho0 = torch.full((rows, B), 0.77, dtype=torch.float64)
    eps_prev = torch.zeros_like(x)
    for scale, expected in ((1.3, 1.3), (-4.0, RHO_RANGE[0]), (9.0, RHO_RANGE[1])):
        rho = table_secant(rho0, tau, filtered(x - x_prev, scale), eps_prev, x, x_prev, rfft_weights(W))
        moved = torch.ones(rows, B, dtype=torch.bool)
        moved[1, 0] = False
        assert torch.allclose(rho[moved], torch.full_like(rho[moved], expected), atol=1e-12)
        assert rho[1, 0] == 0.77
