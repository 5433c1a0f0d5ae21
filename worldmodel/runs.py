"""Where a run's outputs live: ``<runs_dir>/<name>/`` with one folder per stage."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from worldmodel.config import Config, config_to_dict, save_config


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

    @property
    def controller(self) -> Path:
        return self.root / "controller"

    @property
    def evaluate(self) -> Path:
        return self.root / "evaluate"

    @property
    def dream(self) -> Path:
        return self.root / "dream"

    @property
    def benchmarks(self) -> Path:
        return self.root / "benchmarks"


def run_paths(config: Config) -> RunPaths:
    return RunPaths(config.run_dir)


def prepare_stage(config: Config, stage_dir: Path) -> Path:
    """Create a stage folder and record the resolved config both there and at the run's root."""
    stage_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, stage_dir / "config.yaml")
    save_config(config, config.run_dir / "config.yaml")
    return stage_dir


def changed_settings(config: Config, stage_dir: Path, sections: tuple[str, ...]) -> list[str]:
    """The settings of ``sections`` (top-level fields or whole sections) that differ between ``config`` and the
    config last recorded in ``stage_dir``, as ``key: recorded -> now`` lines (none when nothing is recorded)."""
    try:
        recorded = yaml.safe_load((stage_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return []
    if not isinstance(recorded, dict):
        return []
    current = config_to_dict(config)

    def flat(values: object, prefix: str) -> dict[str, object]:
        if not isinstance(values, dict):
            return {prefix: values}
        return {key: value for name, inner in values.items() for key, value in flat(inner, f"{prefix}.{name}").items()}

    lines = []
    for section in sections:
        before, now = flat(recorded.get(section), section), flat(current.get(section), section)
        lines += [f"{key}: {before.get(key)!r} -> {now.get(key)!r}" for key in sorted(set(before) | set(now))
                  if before.get(key) != now.get(key)]
    return lines
