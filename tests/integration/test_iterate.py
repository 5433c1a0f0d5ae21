"""The tests of ``tests/unit/test_iterate.py``'s subject that start Ray or a subprocess."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from frmdn_worldmodels.data.episodes import list_npz
from frmdn_worldmodels.data.sequences import fixed_sample_rng, load_sequences, split_latent_files
from frmdn_worldmodels.models.memory import MemoryModel
from frmdn_worldmodels.runtime.io import load_checkpoint, read_json, read_jsonl
from frmdn_worldmodels.runtime.paths import run_paths
from frmdn_worldmodels.runtime.records import file_digest
from frmdn_worldmodels.stages.iterate import iteration_config
from frmdn_worldmodels.stages.train_memory import evaluate
from frmdn_worldmodels.train.es import CMAES
from tests.conftest import copy_tiny_run
from tests.unit.test_iterate import ITERATE, config
from tests.unit.test_pipeline import REPO, TINY, run_pipeline


class Killed(BaseException):
    """What a kill leaves: the driver stops between two chunks of episodes."""


@pytest.mark.slow  # three pipelines of two iterations: over a minute idle (make test-slow)
def test_two_iterations_end_to_end_resume_after_a_kill(tmp_path, tiny_run):
    """The pipeline killed in iteration 1's memory training, then run again: the rerun keeps iteration 0's
    score and iteration 1's episodes and finishes both iterations. (One test: each run of the iterations
    starts Ray actors that import torch, the suite's slowest part.)"""
    copy_tiny_run(tiny_run, tmp_path)  # the stages before the iterations are done
    cfg = config(tmp_path)
    overrides = [f"runs_dir={tmp_path}", *TINY, *ITERATE]
    args = [sys.executable, "run.py", "pipeline", *(f"--set={o}" for o in overrides)]
    killed_log = tmp_path / "killed.log"  # a file, not a pipe nobody reads that could fill and block it
    with killed_log.open("w") as stderr:
        process = subprocess.Popen(
            args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True
        )
    target = run_paths(iteration_config(cfg, 1)).memory / "checkpoint.pt"
    deadline = time.monotonic() + 600
    while not target.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert process.poll() is None, (
        f"the pipeline ended before it could be killed:\n{killed_log.read_text()[-3000:]}"
    )
    os.killpg(process.pid, signal.SIGKILL)  # the driver and its Ray workers
    process.wait()
    kept = [
        *list_npz(run_paths(iteration_config(cfg, 1)).episodes),
        tmp_path / "tiny/iterate/iteration0.json",
    ]
    before = {path: path.stat().st_mtime_ns for path in kept}

    summary, log = run_pipeline(tmp_path, [*TINY, *ITERATE])
    assert {path: path.stat().st_mtime_ns for path in kept} == before  # nothing played or scored again
    assert "redoing it" not in log
    rows = read_json(tmp_path / "tiny" / "iterate" / "summary.json")["rows"]
    assert [row["iteration"] for row in rows] == [0, 1, 2]
    for row in rows:
        for key in ("episodes_total", "real_mean", "real_std", "dream_best", "random_mean"):
            assert np.isfinite(row[key]), key
    assert [row["episodes_total"] for row in rows] == [3, 5, 7]  # 3 explored, then 2 more per iteration
    assert [len(row["real_returns"]) for row in rows] == [cfg.iterate.eval_episodes] * 3
    assert all(np.mean(row["real_returns"]) == pytest.approx(row["real_mean"]) for row in rows)
    assert "iterate" in summary["seconds"]

    first, second = iteration_config(cfg, 1), iteration_config(cfg, 2)
    # the episodes of iteration 2 were played by the controller of iteration 1
    played = read_json(run_paths(second).episodes / "summary.json")["episodes"]
    best = load_checkpoint(run_paths(first).controller / "best.pt")["params"].numpy().astype(np.float32)
    new = {name: info for name, info in played.items() if name.startswith("it02_")}
    assert len(new) == 2 and {info["iteration"] for info in new.values()} == {2}
    assert rows[0]["played_mean"] is None  # the pipeline's own episodes fed iteration 0
    assert rows[2]["played_mean"] == pytest.approx(np.mean([info["return"] for info in new.values()]))
    assert {info["policy"] for info in new.values()} == {str(run_paths(first).controller / "best.pt")}
    import hashlib

    assert {info["policy_params"] for info in new.values()} == {
        hashlib.sha256(best.tobytes()).hexdigest()[:16]
    }
    assert len(list_npz(run_paths(second).episodes)) == 7

    # M's training went on from the previous weights: before its first step, the model of iteration 2 scores
    # exactly what iteration 1's memory scores on iteration 2's validation episodes
    made = read_json(run_paths(second).memory / "made_from.json")
    assert made["fingerprint"]["inputs"]["initial"] == file_digest(run_paths(first).memory / "memory.pt")
    tc = second.memory_train
    split = split_latent_files(run_paths(second).latents, tc.val_fraction, tc.test_fraction, second.seed)
    if split["val"]:
        val = load_sequences(split["val"], tc.seq_len)
        payload = load_checkpoint(run_paths(second).memory / "memory.pt")
        previous = MemoryModel.from_checkpoint(load_checkpoint(run_paths(first).memory / "memory.pt"))
        z = val.latents(tc.use_mu, fixed_sample_rng(second.seed, "val"))
        expected = evaluate(previous, val, z, second, payload["done_pos_weight"])["nll_per_dim"]
        epoch0 = next(
            row
            for row in read_jsonl(run_paths(second).memory / "metrics.jsonl")
            if row["kind"] == "epoch" and row["epoch"] == 0
        )
        assert epoch0["val_nll_per_dim"] == pytest.approx(expected, rel=1e-5)

    # CMA-ES went on from the previous mean
    before = CMAES.from_state_dict(load_checkpoint(run_paths(first).controller / "es_state.pt")["es"])
    after = load_checkpoint(run_paths(second).controller / "es_state.pt")["es"]
    torch.testing.assert_close(after["x0"], torch.from_numpy(before.mean.copy()))

    # the final evaluation and the dream video are the last iteration's, and the report shows the iterations
    assert (run_paths(second).evaluate / "summary.json").exists()
    report = (tmp_path / "tiny" / "report.md").read_text()
    assert "iterate/scores.png" in report and "iterative training" in report
    assert "it02/evaluate/" in report

    # fewer generations per iteration make the iterations' controllers stale: they are trained again, and
    # the scores kept are those of the new controllers (not the finished iterations' old rows)
    episodes_before = {p.name: p.stat().st_mtime_ns for p in list_npz(run_paths(first).episodes)}
    run_pipeline(tmp_path, [*TINY, *ITERATE, "iterate.generations=1"], command="iterate")
    rows = read_json(tmp_path / "tiny" / "iterate" / "summary.json")["rows"]
    for row, current in zip(rows[1:], (first, second), strict=True):
        generations = read_jsonl(run_paths(current).controller / "metrics.jsonl")
        assert [generation["generation"] for generation in generations] == [1]
        marker = read_json(run_paths(current).root / "iteration.json")
        assert marker["policy"] == file_digest(run_paths(current).controller / "best.pt")
        assert row["seconds"] > 0
    # iteration 1's episodes were kept: its collection did not change
    assert {p.name: p.stat().st_mtime_ns for p in list_npz(run_paths(first).episodes)} == episodes_before


def test_an_iterations_collection_keeps_the_episodes_saved_before_a_kill(
    tmp_path, monkeypatch, ray_session, tiny_run
):
    """The iteration collects with the collect stage's collector: an episode written before a kill is kept,
    the rerun plays only the others, and each new episode is seeded by ``iterate-collect``."""
    from frmdn_worldmodels.runtime.records import Stage
    from frmdn_worldmodels.stages import iterate
    from frmdn_worldmodels.stages.collect import episode_seeds

    copy_tiny_run(tiny_run, tmp_path)  # the controller the iteration plays
    cfg = config(tmp_path, "iterate.episodes=4")
    previous, current = iteration_config(cfg, 0), iteration_config(cfg, 1)
    folder = run_paths(current).episodes
    record_progress = Stage.record_progress
    written: list[int] = []

    def first_episode_then_killed(stage):
        record_progress(stage)
        raise Killed

    monkeypatch.setattr(Stage, "record_progress", first_episode_then_killed)
    with pytest.raises(Killed):
        iterate.collect_iteration(cfg, previous, current, 1)
    saved = {p.name: p.stat().st_mtime_ns for p in list_npz(folder) if p.name.startswith("it01_")}
    assert len(saved) == 1, "the first episode written was saved before the kill"
    record = read_json(folder / "made_from.json")
    assert record["finished"] is False and record["seconds"] > 0, "the saved episode's time is kept"

    def counted(stage):
        written.append(1)
        record_progress(stage)

    monkeypatch.setattr(Stage, "record_progress", counted)
    summary = iterate.collect_iteration(cfg, previous, current, 1)
    assert len(written) == 3, "only the unsaved episodes are played"
    new = {name: info for name, info in summary["episodes"].items() if name.startswith("it01_")}
    assert sorted(new) == [f"it01_ep_{i:05d}.npz" for i in range(4)]
    seeds = [episode_seeds(cfg.seed, i, "iterate-collect", (1,))[0] for i in range(4)]
    assert [new[f"it01_ep_{i:05d}.npz"]["seed"] for i in range(4)] == seeds
    assert all(info["iteration"] == 1 and info["steps"] > 0 for info in new.values())
    for name, mtime in saved.items():
        assert (folder / name).stat().st_mtime_ns == mtime, f"{name} was played again"
    assert summary["episodes_total"] == 4 + len(list_npz(run_paths(previous).episodes))
