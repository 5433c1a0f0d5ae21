"""Frames per second of the ConvVAE on this machine: training steps, encoding, and the streaming loader.

    .venv/bin/python perf/vae_speed.py [--seconds 3] [--threads N] [--compile-timeout 600]

Training = forward + backward + Adam step of the World Models loss, timed in three variants of the same step
at batch 64: ``default`` (NCHW float32, as ``run.py`` trains), ``channels_last`` (model and batch in
``torch.channels_last``) and ``torch.compile`` (inductor; its compile warm-up is timed apart, and the row
reads ``unavailable: <reason>`` if compiling fails or outlasts ``--compile-timeout`` seconds). Each training
row also shows the achieved GFLOP/s (the step's convolution and matmul FLOPs, counted once by torch's
``FlopCounterMode``, x frames/s) as a percentage of a 1024^3 fp32 matmul measured in the same run with the
same threads (``perf/roofline.py``); the last line is the best variant's speed over the default's.

Encoding = ``encode_frames`` (posterior mean and log-variance, no gradients), as ``run.py encode`` and the
agent use it. The loader row streams shuffled batches out of compressed episode files written to a temporary
folder, to show it is not the bottleneck. Each figure is the median of timed blocks after a warm-up.
"""

from __future__ import annotations

import argparse
import copy
import os
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from frmdn_worldmodels.data.episodes import save_episode
from frmdn_worldmodels.data.frames import shuffled_batches
from frmdn_worldmodels.models.vae import ConvVAE, frames_to_tensor, vae_loss
from frmdn_worldmodels.stages.encode import encode_frames
from perf.roofline import matmul_peak, training_flops_per_frame


def timed_rate(step, frames_per_call: int, seconds: float) -> tuple[float, float]:
    """Median frames per wall second and per CPU second (this process, all threads) over blocks of calls
    lasting about ``seconds / 5`` each, after one warm-up call.

    With one thread, frames per CPU second is what an idle core would do, however busy the machine is.
    """
    step()
    wall_rates, cpu_rates, deadline = [], [], time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(wall_rates) < 3:
        start, cpu_start, calls = time.perf_counter(), time.process_time(), 0
        while time.perf_counter() - start < seconds / 5:
            step()
            calls += 1
        wall_rates.append(calls * frames_per_call / (time.perf_counter() - start))
        cpu_rates.append(calls * frames_per_call / max(time.process_time() - cpu_start, 1e-9))
    return statistics.median(wall_rates), statistics.median(cpu_rates)


def report(what: str, batch_size: int, rates: tuple[float, float], extra: str = "") -> None:
    print(f"{what:<28}{batch_size:>6}{rates[0]:>12.0f}{rates[1]:>14.0f}{extra}")


def train_loss(model: torch.nn.Module, x: Tensor) -> Tensor:
    recon, mu, logvar = model(x)
    return vae_loss(recon, x, mu, logvar, 0.5)["loss"]


def train_step_for(vae: ConvVAE, frames: np.ndarray, variant: str) -> Callable[[], None]:
    """One Adam step on ``frames`` of a private copy of ``vae`` (so variants start alike and ``vae`` stays
    as it is), in the layout or compiled form ``variant`` names."""
    model = copy.deepcopy(vae)
    layout = torch.channels_last if variant == "channels_last" else torch.contiguous_format
    model = model.to(memory_format=layout)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    forward = torch.compile(model) if variant == "torch.compile" else model

    def step() -> None:
        x = frames_to_tensor(frames).contiguous(memory_format=layout)
        loss = train_loss(forward, x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def warm_up(step: Callable[[], None], timeout: float) -> float:
    """Seconds of the first call of ``step`` (where torch.compile compiles); TimeoutError past ``timeout``."""

    def give_up(signum, frame):
        raise TimeoutError(f"compiling took over {timeout:.0f} s")

    previous = signal.signal(signal.SIGALRM, give_up)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    start = time.perf_counter()
    try:
        step()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=3.0, help="timing budget per row")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument(
        "--compile-timeout", type=float, default=600.0, help="seconds torch.compile may take to warm up"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    vae = ConvVAE(32)
    load = os.getloadavg()[0]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU; load average {load:.1f} on "
        f"{os.cpu_count()} cores" + ("  (busy machine: the figures below are low)" if load > 1.5 else "")
    )

    # the peak with the threads the rows below use, so "% peak" compares like with like
    peak = matmul_peak(args.seconds)
    frames = rng.integers(0, 256, (64, 64, 64, 3), dtype=np.uint8)
    flops = training_flops_per_frame(vae, frames_to_tensor(frames), train_loss)
    print(
        f"fp32 matmul peak (1024^3, {torch.get_num_threads()} threads) {peak:.1f} GFLOP/s; "
        f"training step {flops / 1e6:.0f} MFLOP/frame (conv + matmul, forward + backward)"
    )
    print(f"{'what':<28}{'batch':>6}{'frames/s':>12}{'frames/CPU-s':>14}{'GFLOP/s':>9}{'% peak':>8}")

    def roofline(rate: float) -> str:
        return f"{rate * flops / 1e9:>9.1f}{100 * rate * flops / 1e9 / peak:>7.0f}%"

    rates = timed_rate(train_step_for(vae, frames[:32], "default"), 32, args.seconds)
    report("train, default", 32, rates, roofline(rates[0]))
    speeds = {}
    for variant in ("default", "channels_last", "torch.compile"):
        step = train_step_for(vae, frames, variant)
        what = f"train, {variant}"
        try:
            seconds = warm_up(step, args.compile_timeout)
        except Exception as error:  # a missing compiler or an inductor bug must not cost the other rows
            reason = (str(error).strip().splitlines() or [""])[0][:100]
            print(f"{what:<28}{64:>6}   unavailable: {type(error).__name__}: {reason}")
            continue
        rates = timed_rate(step, 64, args.seconds)
        speeds[variant] = rates[0]
        compiled = f"  (compile warm-up {seconds:.0f} s)" if variant == "torch.compile" else ""
        report(what, 64, rates, roofline(rates[0]) + compiled)
    best = max(speeds, key=speeds.get)
    print(f"{best} / default (batch 64, frames/s): {speeds[best] / speeds['default']:.2f}x")
    print(f"{'what':<28}{'batch':>6}{'frames/s':>12}{'frames/CPU-s':>14}")

    vae.eval()
    for batch_size in (1, 32, 64, 256):
        frames = rng.integers(0, 256, (max(batch_size, 256), 64, 64, 3), dtype=np.uint8)

        def encode_step(frames=frames, batch_size=batch_size):
            encode_frames(vae, frames, "cpu", batch_size)

        report("encode (encode_frames)", batch_size, timed_rate(encode_step, len(frames), args.seconds))

    with tempfile.TemporaryDirectory() as folder:
        paths = []
        for index in range(8):
            # smooth frames compress like game frames do, unlike white noise
            base = rng.integers(0, 256, (1, 8, 8, 3), dtype=np.uint8)
            obs = np.repeat(np.repeat(np.repeat(base, 201, 0), 8, 1), 8, 2)
            paths.append(Path(folder) / f"ep_{index}.npz")
            save_episode(paths[-1], obs, np.zeros((200, 3)), np.zeros(200), np.zeros(200, bool))

        def load_pass():
            for _ in shuffled_batches(paths, 32, 4096, np.random.default_rng(0)):
                pass

        report("loader (shuffled_batches)", 32, timed_rate(load_pass, 8 * 201, args.seconds))


if __name__ == "__main__":
    main()
