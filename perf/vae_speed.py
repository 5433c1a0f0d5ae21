"""Frames per second of the ConvVAE on this machine: training steps, encoding, and the streaming loader.

    .venv/bin/python perf/vae_speed.py [--seconds 3] [--threads N]

Training = forward + backward + Adam step of the World Models loss; encoding = ``encode_frames`` (posterior
mean and log-variance, no gradients), as ``run.py encode`` and the agent use it. The loader row streams
shuffled batches out of compressed episode files written to a temporary folder, to show it is not the
bottleneck. Each figure is the median of timed blocks after a warm-up.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from worldmodel.data import save_episode
from worldmodel.encode import encode_frames
from worldmodel.frames import shuffled_batches
from worldmodel.vae import ConvVAE, frames_to_tensor, vae_loss


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


def report(what: str, batch_size: int, rates: tuple[float, float]) -> None:
    print(f"{what:<28}{batch_size:>6}{rates[0]:>12.0f}{rates[1]:>14.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=3.0, help="timing budget per row")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    vae = ConvVAE(32)
    optimizer = torch.optim.Adam(vae.parameters(), lr=1e-4)
    load = os.getloadavg()[0]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU; load average {load:.1f} on "
        f"{os.cpu_count()} cores" + ("  (busy machine: the figures below are low)" if load > 1.5 else "")
    )
    print(f"{'what':<28}{'batch':>6}{'frames/s':>12}{'frames/CPU-s':>14}")

    for batch_size in (32, 64):
        frames = rng.integers(0, 256, (batch_size, 64, 64, 3), dtype=np.uint8)

        def train_step(frames=frames):
            x = frames_to_tensor(frames)
            recon, mu, logvar = vae(x)
            loss = vae_loss(recon, x, mu, logvar, 0.5)["loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        report("train (fwd+bwd+Adam)", batch_size, timed_rate(train_step, batch_size, args.seconds))

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
