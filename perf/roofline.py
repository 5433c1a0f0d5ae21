"""This CPU's fp32 roofline for the perf scripts: the matmul peak, and FLOP counts to hold against it.

A script reports its achieved GFLOP/s (counted FLOPs / wall time) as a fraction of ``matmul_peak`` measured
in the same run with the same torch thread count, so the ratio means something on a busy machine too.

    from perf.roofline import matmul_peak, training_flops_per_frame
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode


def matmul_peak(seconds: float = 1.0) -> float:
    """fp32 GFLOP/s of a 1024 x 1024 x 1024 matmul (median of repeats)."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a @ b
    rates = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(rates) < 5:
        start = time.perf_counter()
        a @ b
        rates.append(2 * 1024**3 / (time.perf_counter() - start) / 1e9)
    return statistics.median(rates)


def training_flops_per_frame(
    model: nn.Module, batch: Tensor, loss_fn: Callable[[nn.Module, Tensor], Tensor]
) -> float:
    """FLOPs of one forward + backward pass of ``loss_fn(model, batch)``, per item of ``batch``.

    Counted by torch's ``FlopCounterMode`` from shapes: matmuls and convolutions (with only the gradients
    backward needs); elementwise ops and the optimizer step count as zero, as they are memory-bound anyway.
    """
    with FlopCounterMode(display=False) as counter:
        loss_fn(model, batch).backward()
    model.zero_grad(set_to_none=True)  # leave no gradients behind for the caller's optimizer
    return counter.get_total_flops() / len(batch)
