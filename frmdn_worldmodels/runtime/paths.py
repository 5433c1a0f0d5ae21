"""Where a run's outputs live: ``<runs_dir>/<name>/`` with one folder per stage."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from frmdn_worldmodels.runtime.config import Config, save_config
from frmdn_worldmodels.runtime.registry import COMMANDS


@dataclass(frozen=True)
class RunPaths:
    root: Path

    @property
    def episodes(self) -> Path:
        """Collected real-game episodes, one npz each."""
        return self.root / "episodes"

    @property
    def latents(self) -> Path:
        """The episodes encoded by the VAE, one npz each (same file names)."""
        return self.root / "latents"

    @property
    def vae(self) -> Path:
        return self.root / "vae"

    @property
    def memory(self) -> Path:
        return self.root / "memory"

    def critic(self, index: int) -> Path:
        """Critic ``index`` (1, 2, ...) of the memory (``memory_train.critics``), trained beside it."""
        return self.memory / "critics" / f"c{index}"

    @property
    def table1(self) -> Path:
        """The paper's Table 1 on this run's latents (``train-memory --sweep table1``), a folder per cell."""
        return self.root / "table1"

    @property
    def controller(self) -> Path:
        return self.root / "controller"

    @property
    def iterate(self) -> Path:
        """Iterative training: a run per iteration (``it01/``, ...) and the rounds' summary."""
        return self.root / "iterate"

    @property
    def evaluate(self) -> Path:
        return self.root / "evaluate"

    @property
    def dream(self) -> Path:
        return self.root / "dream"

    @property
    def fidelity(self) -> Path:
        """How well the dream ranks controllers as the real game does (``run.py fidelity``)."""
        return self.root / "fidelity"

    @property
    def benchmarks(self) -> Path:
        return self.root / "benchmarks"

    def of(self, command: str) -> Path:
        """The folder of a registered command (``runtime.registry``)."""
        return self.root / COMMANDS[command].folder


def run_paths(config: Config) -> RunPaths:
    return RunPaths(config.run_dir)


def prepare_stage(config: Config, stage_dir: Path, *, root: bool = True) -> Path:
    """Create a stage folder and record the resolved config there and, with ``root``, at the run's root (not
    for a critic or a sweep cell, whose configs are variants of the run's)."""
    stage_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, stage_dir / "config.yaml")
    if root:
        save_config(config, config.run_dir / "config.yaml")
    return stage_dir
