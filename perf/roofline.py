"""This CPU's fp32 roofline for the perf scripts: the matmul peak, and FLOP counts to hold against it.

A script reports its achieved GFLOP/s (counted FLOPs / wall time) as a fraction of ``matmul_peak``
(``runtime.machine``, the rate every command records) measured in the same run with the same torch thread
count, so the ratio means something on a busy machine too.

    from perf.roofline import matmul_peak, training_flops_per_frame
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from frmdn_worldmodels.runtime.machine import matmul_peak

__all__ = ["matmul_peak", "training_flops_per_frame"]


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
