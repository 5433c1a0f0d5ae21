"""The machine a run's times were spent on: its CPU, cores, torch build and threads, and the fp32 matmul rate
measured there and then.

Machines sold as one kind differ several-fold: 2-core AMD EPYCs of this project did a 1024³ fp32 matmul at
~164 GFLOP/s on some days and 38-51 on others. A wall time means something only beside the rate of the CPU
that spent it, so every command records its machine in ``<run>/machines.jsonl`` and the pipeline's report
shows it.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from frmdn_worldmodels.runtime.io import append_jsonl, read_jsonl

RECORD = "machines.jsonl"
"""One line per command run on the run's folder: the machine (``describe``), the command and its exit code."""

RATE_SPREAD = 1.5
"""Matmul rates further apart than this factor within one run make its stage times a mix of machines."""


def matmul_peak(seconds: float = 1.0) -> float:
    """fp32 GFLOP/s of a 1024 x 1024 x 1024 matmul with torch's current threads (median of at least 5
    repeats, repeated for ``seconds``): 2 * 1024³ FLOPs per product."""
    generator = torch.Generator().manual_seed(0)  # torch's global generator is the stages' to draw from
    a, b = torch.randn(1024, 1024, generator=generator), torch.randn(1024, 1024, generator=generator)
    a @ b
    rates = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(rates) < 5:
        start = time.perf_counter()
        a @ b
        rates.append(2 * 1024**3 / (time.perf_counter() - start) / 1e9)
    return statistics.median(rates)


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux; else what ``platform`` knows)."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def describe(seconds: float = 0.3) -> dict:
    """This machine now: ``{"time", "host", "cpu", "cores", "torch", "threads", "matmul_gflops"}`` (the
    matmul rate with the threads the command runs with)."""
    return {
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "matmul_gflops": round(matmul_peak(seconds), 1),
    }


def record(root: Path, machine: dict, command: str, exit_code: int) -> None:
    """Append ``machine`` to ``root``'s record with the command that ran on it, if the command left a run
    folder and was not refused (exit code 2: no work to time). Never fails the command: a record that cannot
    be written is reported on stderr."""
    if exit_code == 2 or not root.is_dir():
        return
    try:
        append_jsonl(root / RECORD, {**machine, "command": command, "exit": exit_code})
    except OSError as error:
        print(f"warning: {root / RECORD}: the machine record was not written ({error})", file=sys.stderr)


def summary_line(root: Path, current: dict | None = None) -> str | None:
    """One line for the run's report: the machine of ``current`` (this command's, not recorded until it ends)
    or else of the last recorded command, and a warning when commands of the run on the same number of threads
    measured matmul rates more than ``RATE_SPREAD`` apart (their stage times then mix speeds)."""
    rows = [*read_jsonl(root / RECORD), *([current] if current else [])]
    rows = [row for row in rows if isinstance(row.get("matmul_gflops"), int | float)]
    if not rows:
        return None
    last = rows[-1]
    line = (
        f"Machine: {last['cpu']}, {last['cores']} cores, torch {last['torch']} on {last['threads']} threads; "
        f"1024³ fp32 matmul {last['matmul_gflops']:.0f} GFLOP/s at the start of "
        f"{'this' if current else 'the last'} command (every command's: [{RECORD}]({RECORD}))."
    )
    for threads in sorted({row.get("threads") for row in rows}, key=str):
        rates = [row["matmul_gflops"] for row in rows if row.get("threads") == threads]
        if max(rates) > RATE_SPREAD * min(rates):
            line += (
                f" The run's {len(rates)} commands on {threads} threads measured {min(rates):.0f}-"
                f"{max(rates):.0f} GFLOP/s: its stage times mix speeds (other machines, or a busy one)."
            )
    return line
