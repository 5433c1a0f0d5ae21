"""The whole V-M-C pipeline from the command line, as a user runs it (`python run.py pipeline`)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from frmdn_worldmodels.data.episodes import list_npz, load_episode, load_latents
from frmdn_worldmodels.models.memory import MemoryModel
from frmdn_worldmodels.models.vae import load_vae
from frmdn_worldmodels.runtime.config import load_config
from frmdn_worldmodels.runtime.io import load_checkpoint, read_json, read_jsonl

REPO = Path(__file__).resolve().parents[2]

# Reduced counts for the default run: every stage runs for real, on a handful of short episodes.
TINY = [
    "collect.episodes=3",
    "collect.max_steps=24",
    "env.max_steps=24",
    "vae.epochs=1",
    "vae.batch_size=16",
    "memory.hidden=16",
    "memory_train.epochs=2",
    "memory_train.seq_len=8",
    "memory_train.batch_size=4",
    "controller.generations=2",
    "controller.population=4",
    "controller.rollouts=1",
    "controller.eval_every=1",
    "controller.eval_episodes=1",
    "evaluate.episodes=2",
]


def run_pipeline(
    tmp_path: Path, overrides: list[str], config: str | None = None, command: str = "pipeline"
) -> tuple[dict, str]:
    """The summary ``run.py command`` printed (stdout) and what it printed to stderr."""
    args = [sys.executable, "run.py", command, "--set", f"runs_dir={tmp_path}"]
    if config:
        args += ["--config", config]
    for override in overrides:
        args += ["--set", override]
    result = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, f"{command} failed:\n{result.stderr[-4000:]}"
    return json.loads(result.stdout), result.stderr


def check_outputs(root: Path, episodes: int) -> None:
    """Every stage left its outputs, and each loads and validates."""
    episode_files = list_npz(root / "episodes")
    assert len(episode_files) == episodes
    for path in episode_files:
        load_episode(path)
    latent_files = list_npz(root / "latents")
    assert [p.name for p in latent_files] == [p.name for p in episode_files]
    latents = [load_latents(path) for path in latent_files]
    assert latents[0]["mu"].shape[1] == load_vae(root / "vae" / "vae.pt").latent_dim

    memory = MemoryModel.from_checkpoint(load_checkpoint(root / "memory" / "memory.pt"))
    assert memory.target_dim == latents[0]["mu"].shape[1]
    assert memory.cond_dim == latents[0]["actions"].shape[1]
    assert all(
        key in read_json(root / "memory" / "summary.json")
        for key in ("test_nll_per_step", "test_nll_per_dim")
    )

    assert load_checkpoint(root / "controller" / "best.pt")
    evaluation = read_json(root / "evaluate" / "summary.json")
    assert evaluation["episodes"] >= 1
    for stage, picture in [
        ("vae", "reconstructions.png"),
        ("memory", "nll.png"),
        ("controller", "fitness.png"),
        ("dream", "dream.gif"),
    ]:
        assert (root / stage / picture).stat().st_size > 0, f"{stage}/{picture} missing"
    report = (root / "report.md").read_text()
    for link in ("vae/reconstructions.png", "memory/nll.png", "controller/fitness.png", "dream/dream.gif"):
        assert link in report
    controller = read_json(root / "controller" / "summary.json")
    # the dream-vs-real gap of the tiny config: each periodic evaluation scored the champion in both
    rows = [row for row in read_jsonl(root / "controller" / "metrics.jsonl") if "eval_mean" in row]
    assert rows and all("real_mean" in row for row in rows)
    kept = next(row for row in rows if row["generation"] == controller["best_generation"])
    assert controller["gap"]["real_mean"] == kept["real_mean"] and "dream vs real game" in report
    starts = "any frame" if controller["dream_start"] == "any" else "the first frames"
    assert f"dreams of up to {controller['dream_horizon']} steps from {starts}" in report.splitlines()[0]


@pytest.mark.slow
@pytest.mark.parametrize("config", ["configs/tiny.yaml", "configs/mario-tiny.yaml"])
def test_embedded_tiny_configs_full_size(tmp_path, config):
    run_pipeline(tmp_path, [], config=config)
    name = load_config(REPO / config).name
    check_outputs(tmp_path / name, episodes=load_config(REPO / config).collect.episodes)
