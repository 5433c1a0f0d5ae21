"""Speed of the FRMDN memory (issue 2). Prints the measured times and two ratios against their goals:

1. Train step (forward + backward + Adam) of FRMDN (d'=3, 2 coupling blocks) over the diagonal RMDN, both at
   K=5, d=32, LSTM 256, batch 16 x 100 steps, with reward and done heads. Goal: <= 1.5x.
2. Dense reference (D + U U^T built, torch's MultivariateNormal(precision_matrix=...) mixture, the naive way)
   over the low-rank log-prob, K=20, d=200, d'=2, same batch. Goal: >= 500x.

Usage: .venv/bin/python perf/memory_speed.py [--repeats 9] [--dense-batch 16] [--threads N]
Timings are medians over repeats after warm-up, wall clock (the goals) and, in brackets, this process's CPU
time, which is steadier on a shared machine; the two models of ratio 1 are timed interleaved, so load from
other processes affects both alike. The dense batch is small because the naive reference stores K d^2 floats
per element (a 16 x 100 batch would need 5 GB for the precisions alone).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.distributions import MultivariateNormal

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from frmdn_worldmodels.models.memory import MemoryModel
from frmdn_worldmodels.models.mixture import gmm_log_prob
from frmdn_worldmodels.runtime.config import MemoryConfig

TRAIN_GOAL, DENSE_GOAL = 1.5, 500.0


def seconds(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall, CPU) seconds of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def median_times(
    fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 2
) -> dict[str, tuple[float, float]]:
    """Median (wall, CPU) time of each function, the functions run in turn (interleaved) each repeat."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(seconds(fn))
    return {
        name: (statistics.median(t[0] for t in values), statistics.median(t[1] for t in values))
        for name, values in times.items()
    }


def ms(times: tuple[float, float]) -> str:
    return f"{times[0] * 1e3:.3g} ms ({times[1] * 1e3:.3g} ms CPU)"


def train_step_fn(kind: str, rank: int, batch: int, steps: int) -> Callable[[], None]:
    d, actions = 32, 3
    config = MemoryConfig(kind=kind, hidden=256, components=5, rank=rank, flow_blocks=2)
    model = MemoryModel(d, actions, config)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    y = torch.randn(batch, steps + 1, d, generator=gen)
    cond = torch.rand(batch, steps, actions, generator=gen)
    rewards = torch.randn(batch, steps, generator=gen)
    dones = torch.zeros(batch, steps)
    dones[:, -1] = 1.0

    def step() -> None:
        losses = model.sequence_loss(y, cond, rewards, dones, done_pos_weight=float(steps))
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()

    return step


def mixture_params(batch: int, k: int, d: int, r: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(1)
    logit_pi = torch.randn(batch, k, generator=gen)
    mu = torch.randn(batch, k, d, generator=gen)
    diag = 0.5 + torch.rand(batch, k, d, generator=gen)
    u = torch.randn(batch, k, d, r, generator=gen) / d**0.5
    x = torch.randn(batch, d, generator=gen)
    return x, logit_pi, mu, diag, u


def dense_log_prob(x, logit_pi, mu, diag, u) -> torch.Tensor:
    """What a naive implementation does: materialise every d x d precision and use a dense Gaussian."""
    precision = torch.diag_embed(diag) + u @ u.transpose(-1, -2)
    components = MultivariateNormal(mu, precision_matrix=precision)
    return torch.logsumexp(torch.log_softmax(logit_pi, -1) + components.log_prob(x.unsqueeze(-2)), -1)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=9, help="timed repeats per measurement (median)")
    parser.add_argument(
        "--dense-batch", type=int, default=16, help="batch of the dense-vs-low-rank comparison"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, repeats {args.repeats}")

    # 1. train step, FRMDN vs diagonal RMDN
    torch.manual_seed(0)
    train = median_times(
        {
            "rmdn": train_step_fn("rmdn", rank=0, batch=16, steps=100),
            "frmdn": train_step_fn("frmdn", rank=3, batch=16, steps=100),
        },
        args.repeats,
    )
    train_ratio, train_cpu_ratio = (train["frmdn"][i] / train["rmdn"][i] for i in (0, 1))
    print(
        f"train step, K=5 d=32 LSTM 256 batch 16x100: diagonal RMDN {ms(train['rmdn'])}, "
        f"FRMDN(d'=3, 2 blocks) {ms(train['frmdn'])}"
    )
    print(
        f"  ratio FRMDN / RMDN = {train_ratio:.2f}x ({train_cpu_ratio:.2f}x CPU)  (goal <= {TRAIN_GOAL}x)  "
        f"{verdict(train_ratio <= TRAIN_GOAL)}"
    )

    # 2. low-rank log-prob vs the dense reference
    params = mixture_params(args.dense_batch, k=20, d=200, r=2)
    with torch.no_grad():
        torch.testing.assert_close(gmm_log_prob(*params), dense_log_prob(*params), rtol=1e-3, atol=1e-2)
        low_rank = median_times({"low_rank": lambda: gmm_log_prob(*params)}, 10 * args.repeats)["low_rank"]
        dense = median_times({"dense": lambda: dense_log_prob(*params)}, 3, warmup=1)["dense"]
    dense_ratio, dense_cpu_ratio = (dense[i] / low_rank[i] for i in (0, 1))
    print(
        f"log-prob, K=20 d=200 d'=2 batch {args.dense_batch}: low-rank {ms(low_rank)}, "
        f"dense MultivariateNormal {ms(dense)}"
    )
    print(
        f"  ratio dense / low-rank = {dense_ratio:.0f}x ({dense_cpu_ratio:.0f}x CPU)  "
        f"(goal >= {DENSE_GOAL:.0f}x)  {verdict(dense_ratio >= DENSE_GOAL)}"
    )


if __name__ == "__main__":
    main()
