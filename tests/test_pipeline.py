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
from frmdn_worldmodels.runtime.records import output_digest
from tests.conftest import copy_tiny_run

REPO = Path(__file__).resolve().parent.parent

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


def redone(log: str) -> list[str]:
    """The stages the pipeline's log says it redid because they were stale."""
    return [line.split("]")[0].lstrip("[") for line in log.splitlines() if "redoing it" in line]


def test_tiny_pipeline_end_to_end_reruns_skip_done_stages_and_redo_stale_ones(tmp_path, tiny_run, run_main):
    _, summary, log = tiny_run
    copy_tiny_run(tiny_run, tmp_path)
    root = tmp_path / "tiny"
    check_outputs(root, episodes=3)
    assert set(summary["seconds"]) >= {
        "collect",
        "train-vae",
        "encode",
        "train-memory",
        "train-controller",
        "evaluate",
    }
    assert redone(log) == []
    made = {
        name: (root / name).stat().st_mtime_ns
        for name in (
            "vae/vae.pt",
            "latents/ep_00000.npz",
            "memory/memory.pt",
            "controller/best.pt",
            "evaluate/summary.json",
        )
    }

    # a controller setting: the controller and its evaluation are redone, V and M are kept
    rerun, log = run_pipeline(tmp_path, [*TINY, "controller.temperature=0.5"])
    # every invocation recorded its machine, and the report shows this one's
    rows = read_jsonl(root / "machines.jsonl")
    assert [(row["command"], row["exit"]) for row in rows] == [("pipeline", 0), ("pipeline", 0)]
    assert rows[-1]["matmul_gflops"] == rerun["machine"]["matmul_gflops"] > 0
    assert (
        f"matmul {rerun['machine']['matmul_gflops']:.0f} GFLOP/s at the start of this command"
        in (root / "report.md").read_text()
    )
    assert redone(log) == ["train-controller", "evaluate"], log[-3000:]
    # a kept stage still reports the time its work took, not the instant it took to skip it
    assert rerun["work_seconds"]["train-vae"] == summary["work_seconds"]["train-vae"]
    assert rerun["work_seconds"]["train-vae"] > rerun["seconds"]["train-vae"]
    assert "| train-vae | " in (root / "report.md").read_text()
    assert (
        "controller.temperature: 1.15 -> 0.5" in log and "the output of train-controller changed since" in log
    )
    for name in ("vae/vae.pt", "latents/ep_00000.npz", "memory/memory.pt"):
        assert (root / name).stat().st_mtime_ns == made[name], f"{name} must be kept"
    check_outputs(root, episodes=3)

    # --refuse-stale: a changed V is refused before anything is redone
    refused = run_main(
        "pipeline",
        "--refuse-stale",
        f"--set=runs_dir={tmp_path}",
        *(f"--set={o}" for o in [*TINY, "controller.temperature=0.5", "vae.lr=0.002"]),
    )
    assert (
        refused.returncode == 2
        and "train-vae" in refused.stderr
        and "vae.lr: 0.001 -> 0.002" in refused.stderr
    )
    assert (root / "vae" / "vae.pt").stat().st_mtime_ns == made["vae/vae.pt"]

    # a retrained V: the latents, the memory, the controller and the evaluation are all redone, never mixed
    _, log = run_pipeline(tmp_path, [*TINY, "controller.temperature=0.5", "vae.lr=0.002"])
    assert redone(log) == ["train-vae", "encode", "train-memory", "train-controller", "evaluate"], log[-3000:]
    for name, before in made.items():
        assert (root / name).stat().st_mtime_ns > before, f"{name} must be redone"
    check_outputs(root, episodes=3)
    memory = read_json(root / "memory" / "made_from.json")
    assert memory["fingerprint"]["inputs"]["encode"] == output_digest(
        load_config(None, [f"runs_dir={tmp_path}", *TINY, "controller.temperature=0.5", "vae.lr=0.002"]),
        "encode",
    )


@pytest.mark.slow
@pytest.mark.parametrize("config", ["configs/tiny.yaml", "configs/mario-tiny.yaml"])
def test_embedded_tiny_configs_full_size(tmp_path, config):
    run_pipeline(tmp_path, [], config=config)
    name = load_config(REPO / config).name
    check_outputs(tmp_path / name, episodes=load_config(REPO / config).collect.episodes)
