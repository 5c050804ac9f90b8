"""Float comparisons whose tolerance comes from the size of the numbers compared.

Two float32 computations of the same quantity that differ only in the order of their sums agree to
a few float32 eps *relative to the size of the whole quantity*, not of each element: torch's CPU
kernels pick that order by instruction set (ATEN_CPU_CAPABILITY: default, avx2, avx512), by thread
count and by shape, and an element that is small because its terms cancel still carries the rounding
of those terms, so an element-wise `allclose(rtol, atol)` fails on it now and then on some machines.

`assert_close` bounds the norm of the difference instead: ||actual - expected|| <= ulps * eps *
||expected||. Wilkinson's bound for a float sum of n terms is (n - 1) * eps relative to the sum of
their magnitudes, so `ulps` of about the longest reduction behind the compared numbers covers any
summation order, and a real error (a missing term, a factor of 2) is still many orders above it.
"""

from __future__ import annotations

import math

import torch

EPS32 = torch.finfo(torch.float32).eps  # 1.19e-7


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected||, in float64; 0 for two zeros, inf for a non-zero against zero."""
    actual, expected = torch.as_tensor(actual).double(), torch.as_tensor(expected).double()
    assert actual.shape == expected.shape, f"shapes {tuple(actual.shape)} and {tuple(expected.shape)}"
    diff, scale = (actual - expected).norm().item(), expected.norm().item()
    if scale == 0:
        return 0.0 if diff == 0 else math.inf
    return diff / scale


def assert_close(actual: torch.Tensor, expected: torch.Tensor, ulps: float, what: str = "") -> None:
    """Fail unless ||actual - expected|| <= ulps * float32 eps * ||expected||; the message gives the
    error in eps, so a failure says how far off it is."""
    error = relative_error(actual, expected)
    assert error <= ulps * EPS32, (f"{what}: ||actual - expected|| / ||expected|| = {error:.3g} "
                                   f"= {error / EPS32:.3g} eps, more than {ulps:g} eps")
