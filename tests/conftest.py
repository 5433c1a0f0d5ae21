"""Fixtures shared by every test file."""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray (2 CPUs, no dashboard) for the whole test session; ``ray.init`` costs seconds.

    If Ray is already running in this process it is used as it is and left running. Ray workers import the
    project's packages, so the project root goes on their PYTHONPATH whatever pytest's working directory is.
    Test modules whose functions run in workers register themselves with
    ``ray.cloudpickle.register_pickle_by_value`` (workers cannot import test files).
    """
    import ray

    if ray.is_initialized():
        yield ray
        return
    # The local Ray's processes (and so its workers) take the environment at ray.init; restore ours after.
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(
        dict.fromkeys([str(ROOT), *filter(None, (saved or "").split(os.pathsep))])
    )
    try:
        ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, ignore_reinit_error=True)
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH")
        else:
            os.environ["PYTHONPATH"] = saved
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture
def run_main(capsys) -> Callable[..., subprocess.CompletedProcess]:
    """``run_main(*args, main=cli.main)``: a command's ``main(args)`` in this process, as the
    ``CompletedProcess`` a subprocess would give (exit code, stdout, stderr).

    For the refusals (exit code 2 before any work): a subprocess costs seconds of imports; each command keeps
    its cheap subprocess smoke test. torch's thread count, which a command may set, is restored.
    """
    import torch

    def call(*args, main: Callable[[list[str]], int] | None = None) -> subprocess.CompletedProcess:
        if main is None:
            from frmdn_worldmodels import cli

            main = cli.main
        threads = torch.get_num_threads()
        capsys.readouterr()
        try:
            code = main([str(arg) for arg in args])
        except SystemExit as exit:  # argparse's refusals
            code = exit.code
        finally:
            torch.set_num_threads(threads)
        printed = capsys.readouterr()
        return subprocess.CompletedProcess(list(args), code, printed.out, printed.err)

    return call


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> tuple[Path, dict, str]:
    """The tiny pipeline (``tests.unit.test_pipeline.TINY``) run once for the session: (its runs_dir,
    the summary it printed, its stderr). Tests never change it: they start from a copy (``copy_tiny_run``),
    which the stages take as done, since a stage's record holds settings and file digests, not paths."""
    from tests.unit.test_pipeline import TINY, run_pipeline

    runs = tmp_path_factory.mktemp("tiny-run")
    summary, log = run_pipeline(runs, TINY)
    return runs, summary, log


def copy_tiny_run(tiny_run: tuple[Path, dict, str], runs_dir: Path) -> None:
    """The session's tiny run, files and times as they are, into ``runs_dir``."""
    import shutil

    shutil.copytree(tiny_run[0] / "tiny", runs_dir / "tiny")


def write_tiny_latents(
    folder: Path, episodes: int = 6, steps: int = 40, z_dim: int = 4, a_dim: int = 2, seed: int = 0
) -> None:
    """Synthetic latents with learnable structure: z_{t+1} = A z_t + B a_t + noise,
    r_t = z_{t+1,0} + a_t0 / 10.

    Episodes get shorter by 3 steps each, so windows end in padded tails; each ends with one terminal.
    """
    import numpy as np

    from frmdn_worldmodels.data.episodes import save_latents

    rng = np.random.default_rng(seed)
    dynamics = 0.9 * np.linalg.qr(rng.standard_normal((z_dim, z_dim)))[0]
    control = 0.5 * rng.standard_normal((z_dim, a_dim))
    for episode in range(episodes):
        length = steps - 3 * episode
        z = np.zeros((length + 1, z_dim))
        z[0] = rng.standard_normal(z_dim)
        actions = np.tanh(rng.standard_normal((length, a_dim)))
        for t in range(length):
            z[t + 1] = dynamics @ z[t] + control @ actions[t] + 0.05 * rng.standard_normal(z_dim)
        terminals = np.zeros(length, dtype=bool)
        terminals[-1] = True
        save_latents(
            folder / f"episode_{episode:04d}.npz",
            z,
            np.full_like(z, -4.0),
            actions,
            z[1:, 0] + 0.1 * actions[:, 0],
            terminals,
        )


@pytest.fixture
def tiny_memory_run(tmp_path):
    """``make(name="m", *overrides) -> Config``: a run under tmp_path holding synthetic latents (6 episodes,
    Z=4, A=2) and a small, fast memory (train/val/test = 4/1/1 episodes)."""
    from frmdn_worldmodels.runtime.config import load_config

    def make(name: str = "m", *overrides: str):
        config = load_config(
            None,
            [
                f"runs_dir={tmp_path / 'runs'}",
                f"name={name}",
                "memory.hidden=16",
                "memory.components=2",
                "memory.rank=1",
                "memory.flow_hidden=8",
                "memory_train.seq_len=8",
                "memory_train.batch_size=4",
                "memory_train.epochs=3",
                "memory_train.val_fraction=0.2",
                "memory_train.test_fraction=0.2",
                "memory_train.lr=0.01",
                *overrides,
            ],
        )
        write_tiny_latents(config.run_dir / "latents")
        return config

    return make


@pytest.fixture
def one_thread():
    """Tiny models train fastest on one torch thread, and don't fight other work for a busy machine's
    cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
