"""Latent steps per second of the batched dream (``frmdn_worldmodels.dream.batched``) on this machine.

    .venv/bin/python perf/dream_speed.py [--batch 1024] [--steps 50] [--repeats 5] [--threads 1 2]
        [--profile]

The model is the paper-scale world model: LSTM 256, K = 5 components, d = 32, d' = 3, a coupling flow
(2 blocks, hidden 64), CarRacing's 3 actions, linear controllers; the batch is a population of 64 candidates x
16 rollouts = 1024 dreams. Dones are switched off, so every dream runs every step and a latent step is one
z_{t+1} drawn for one dream. Goal: >= 70,000 latent steps/s on a 2-core laptop CPU. One row per torch
thread count (the dream's default is one thread, ``controller.dream_threads``); a second thread only pays on
an otherwise idle machine.

For scale the script also times this machine's fp32 matrix-multiply peak (a 1024^3 matmul) and reports what
fraction of it the dream sustains, counting the flops of the matmuls it does (LSTM gates, the small head,
the chosen component's head, the controller, the flow's networks). ``--profile`` prints torch's operator
profile of one rollout, to see what dominates.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from frmdn_worldmodels.dream.batched import BatchedDream
from frmdn_worldmodels.models.controller import Controller
from frmdn_worldmodels.models.memory import MemoryModel
from frmdn_worldmodels.runtime.config import MemoryConfig
from perf.roofline import matmul_peak


def flops_per_latent_step(memory: MemoryModel, controller: Controller) -> float:
    """Multiply-adds x 2 of the dream step's matmuls, per dream."""
    z, h, a = memory.target_dim, memory.config.hidden, controller.action_dim
    weights = sum(rows * cols for rows, cols in controller.shapes[::2])  # the controller's matmuls
    k, r = memory.config.components, memory.config.rank
    flow = (
        memory.config.flow_blocks * 2 * 2 * (z // 2) * memory.config.flow_hidden
    )  # s and t nets, 2 layers each
    return 2.0 * ((z + h + a) * 4 * h + h * (k + 2) + h * (2 * z + z * r) + weights + flow)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=1024, help="dreams in the batch (population x rollouts)")
    parser.add_argument("--rollouts", type=int, default=16, help="rollouts per candidate")
    parser.add_argument("--steps", type=int, default=50, help="dream steps per timed rollout")
    parser.add_argument("--repeats", type=int, default=5, help="timed rollouts (the median is reported)")
    parser.add_argument(
        "--threads", type=int, nargs="+", default=[1, 2], help="torch thread counts (one row each)"
    )
    parser.add_argument("--profile", action="store_true", help="print the operator profile of one rollout")
    args = parser.parse_args()
    torch.manual_seed(0)
    config = MemoryConfig(kind="frmdn", hidden=256, components=5, rank=3, flow_blocks=2, flow_hidden=64)
    memory = MemoryModel(32, 3, config).eval()
    with torch.no_grad():
        for parameter in memory.flow.parameters():  # a fresh flow is the identity; time a real one
            parameter.normal_(0.0, 0.1)
        memory.done_head.weight.zero_()
        memory.done_head.bias.fill_(-1e4)  # no dream ends: every step of every dream is timed
    controller = Controller(32, 256, 3, discrete=False)
    population = args.batch // args.rollouts
    params = 0.1 * torch.randn(population, controller.num_params)
    print(
        f"batched dream: LSTM 256, K=5, d=32, d'=3, flow on, batch {population * args.rollouts} "
        f"({population} candidates x {args.rollouts} rollouts), {args.steps} steps, median of {args.repeats}"
    )
    for threads in args.threads:
        dream = BatchedDream(
            memory,
            controller,
            torch.randn(100, 32),
            torch.full((100, 32), -2.0),
            horizon=args.steps,
            temperature=1.15,
            threads=threads,
        )
        generator = torch.Generator().manual_seed(0)
        dream.rollout(params, args.rollouts, generator)  # warm-up
        rates = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            result = dream.rollout(params, args.rollouts, generator)
            elapsed = time.perf_counter() - start
            assert int(result.lengths.min()) == args.steps
            rates.append(population * args.rollouts * args.steps / elapsed)
        rate = statistics.median(rates)
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        peak = matmul_peak()
        torch.set_num_threads(previous)
        gflops = rate * flops_per_latent_step(memory, controller) / 1e9
        print(
            f"  {threads} thread(s): {rate:9,.0f} latent steps/s "
            f"(goal >= 70,000: {'met' if rate >= 70_000 else 'NOT met'}),"
            f" {1e3 * population * args.rollouts / rate:.2f} ms per batch step; "
            f"matmul flops {gflops:.1f} GFLOP/s ="
            f" {100 * gflops / peak:.0f}% of a 1024^3 matmul on {threads} thread(s) ({peak:.1f} GFLOP/s)"
        )
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            dream.rollout(params, args.rollouts, generator)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


if __name__ == "__main__":
    main()
