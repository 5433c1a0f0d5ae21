"""The tests of ``tests/unit/test_pipeline.py``'s subject that start Ray or a subprocess."""

from frmdn_worldmodels.runtime.config import load_config
from frmdn_worldmodels.runtime.io import read_json, read_jsonl
from frmdn_worldmodels.runtime.records import output_digest
from tests.conftest import copy_tiny_run
from tests.unit.test_pipeline import TINY, check_outputs, run_pipeline


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


def test_pessimism_trains_critics_and_the_controller_pays_their_disagreement(tmp_path, tiny_run, run_main):
    """``memory_train.critics`` then ``controller.pessimism`` from the command line, dreams from any frame
    (each critic warm-started there): every generation reports the pessimism a dream step, the controller's
    record holds the critic's weights, and a retrained critic makes it stale."""
    copy_tiny_run(tiny_run, tmp_path)
    root = tmp_path / "tiny"
    settings = [f"runs_dir={tmp_path}", *TINY, "memory_train.critics=1"]
    flags = [part for setting in settings for part in ("--set", setting)]
    memory = (root / "memory" / "memory.pt").stat().st_mtime_ns
    assert run_main("train-memory", *flags).returncode == 0
    assert (root / "memory" / "memory.pt").stat().st_mtime_ns == memory  # M is kept
    assert (root / "memory" / "critics" / "c1" / "memory.pt").exists()
    assert load_config(root / "config.yaml").memory_train.seed is None  # the run's config, not the critic's
    dream = ["--set", "controller.pessimism=0.5", "--set", "controller.dream_start=any"]
    result = run_main("train-controller", *flags, *dream)
    assert result.returncode == 0, result.stderr
    rows = [row for row in read_jsonl(root / "controller" / "metrics.jsonl") if "mean" in row]
    assert rows and all(row["pessimism_per_step"] > 0 for row in rows)
    assert "critic_1" in read_json(root / "controller" / "made_from.json")["fingerprint"]["inputs"]
    missing = run_main("train-controller", *flags, "--set", "memory_train.critics=2", *dream)
    assert missing.returncode == 2 and "critics/c2/memory.pt: no trained critic" in missing.stderr
