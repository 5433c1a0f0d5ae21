"""The experiment scripts: the switch comparison's sharing of stages and its table (``dream_switches.py``),
the imitation score's refusals (``score_imitation.py``), the player-patch error of V (``player_patch.py``)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from tests.test_pipeline import REPO
from worldmodel.frames import player_boxes
from worldmodel.io import DataError

sys.path.insert(0, str(REPO / "experiments"))

import done_head  # noqa: E402 (the script's folder on the path)
import dream_switches  # noqa: E402 (the script's folder on the path)
import player_patch  # noqa: E402 (the script's folder on the path)


def test_shared_stage_folders_are_hard_links_and_nothing_is_overwritten(tmp_path):
    source = tmp_path / "base" / "vae"
    (source / "sub").mkdir(parents=True)
    (source / "vae.pt").write_bytes(b"weights")
    (source / "sub" / "x.txt").write_text("x")
    target = tmp_path / "variant" / "vae"
    target.mkdir(parents=True)
    (target / "vae.pt").write_bytes(b"mine")
    dream_switches.link_tree(source, target)
    assert (target / "vae.pt").read_bytes() == b"mine"
    assert (target / "sub" / "x.txt").stat().st_ino == (source / "sub" / "x.txt").stat().st_ino


def test_the_table_counts_the_seeds_above_the_random_policy():
    rows = [
        {
            "variant": name,
            "seed": seed,
            "real_mean": real,
            "real_std": 1.0,
            "random_mean": 0.0,
            "dream_best": 5.0,
            "gap_dream": 5.0,
            "gap_real": real,
            "seconds": 60.0,
        }
        for name, seed, real in (("base", 0, 1.0), ("base", 1, -1.0), ("dropout 0.1", 0, 2.0))
    ]
    text = dream_switches.table(rows)
    assert "| base | 0.0 | 1 of 2 |" in text and "| dropout 0.1 | 2.0 | 1 of 1 |" in text
    assert "| base | 1 | -1.0 ± 1.0 | 0.0 | 5.0 | 5.0 / -1.0 | 60 |" in text


def test_an_unknown_switch_is_refused():
    result = subprocess.run(
        [sys.executable, "experiments/dream_switches.py", "--only", "magic"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2 and "unknown switch 'magic'" in result.stderr


def test_the_imitation_score_refuses_a_run_without_an_imitation_or_a_memory(tmp_path, run_main):
    import score_imitation

    def score(*overrides):
        return run_main(f"--set=runs_dir={tmp_path}", *overrides, main=score_imitation.main)

    result = score()
    assert result.returncode == 2 and "controller.init is 'zeros'" in result.stderr
    result = score("--set=controller.init=imitate")
    assert result.returncode == 2 and "no trained memory" in result.stderr
    assert not any(tmp_path.iterdir())  # refused before any work


def test_the_player_patch_error_against_the_rest_of_the_frame():
    centres = np.array([[32.0, 32.0], [12.0, 53.3], [0.5, 32.0]])  # the last: the patch leaves the frame
    boxes = player_boxes(centres, 64)
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    recon = frames.copy()
    recon[0, 28:36, 28:36] = 0  # the player left out of the first frame...
    recon[2] = 0  # ...and of a frame without him: not counted
    recon[1, 0, 0] = frames[1, 0, 0] ^ 1  # a nearly perfect rest
    errors = player_patch.patch_errors(frames, recon, boxes)
    expected = ((frames[0, 28:36, 28:36] / 255.0) ** 2).sum() / (2 * 8 * 8 * 3)
    assert errors["frames"] == 2 and errors["player_mse"] == pytest.approx(expected)
    assert 0 < errors["rest_mse"] < 1e-6 and errors["ratio"] > 1e4
    assert player_patch.patch_errors(frames, frames, boxes)["ratio"] is None
    sheet = player_patch.closeups(frames, recon, boxes)
    assert [len(row) for row in sheet] == [2, 2] and sheet[0][0].shape == (16, 16, 3)
    with pytest.raises(DataError, match="off the screen in every frame"):
        player_patch.patch_errors(frames, recon, np.full((3, 4), -1))


def test_the_player_patch_command(tmp_path, run_main):
    from worldmodel.io import read_json, save_checkpoint
    from worldmodel.vae import ConvVAE

    save_checkpoint(tmp_path / "v.pt", state_dict=ConvVAE(8).state_dict(), config={})
    args = ["--set=env.name=mario", "--set=collect.max_steps=20", f"--set=runs_dir={tmp_path}"]
    result = run_main(*args, "--episodes=1", f"--vae={tmp_path / 'v.pt'}", main=player_patch.main)
    assert result.returncode == 0, result.stderr
    summary = read_json(tmp_path / "tiny" / "player_patch" / "summary.json")
    assert summary["frames"] == 21 and summary["player_mse"] > 0 and summary["rest_mse"] > 0
    assert (tmp_path / "tiny" / "player_patch" / "closeups.png").stat().st_size > 0
    refused = run_main(f"--set=runs_dir={tmp_path}", main=player_patch.main)  # CarRacing has no Mario
    assert refused.returncode == 2 and "read from Mario's RAM" in refused.stderr
    missing = run_main(*args, f"--vae={tmp_path / 'none.pt'}", main=player_patch.main)
    assert missing.returncode == 2 and "none.pt" in missing.stderr


def test_the_done_head_read_in_one_pass_matches_a_step_by_step_reading(tmp_path):
    """``done_probabilities`` reads an episode in one sequence call; the memory's one-step path, fed the same
    z and a, gives the same probabilities."""
    import torch

    from tests.conftest import write_tiny_latents
    from worldmodel.config import MemoryConfig
    from worldmodel.data import load_latents
    from worldmodel.memory import MemoryModel

    write_tiny_latents(tmp_path, episodes=1, steps=12)
    latents = load_latents(tmp_path / "episode_0000.npz")
    torch.manual_seed(0)
    memory = MemoryModel(
        4, 2, MemoryConfig(hidden=8, components=2, rank=1, flow_blocks=1, flow_hidden=8)
    ).eval()
    probabilities = done_head.done_probabilities(memory, latents)
    assert probabilities.shape == (12,)
    state, stepped = None, []
    with torch.no_grad():
        for t in range(12):
            z = torch.from_numpy(latents["mu"][t])[None]
            a = torch.from_numpy(latents["actions"][t])[None]
            out, state = memory.step(z, a, state)
            stepped.append(torch.sigmoid(out.done_logit).item())
    np.testing.assert_allclose(probabilities, stepped, rtol=1e-5, atol=1e-6)


def test_the_done_head_summary():
    ended = [np.array([0.1, 0.2, 0.3, 0.9]), np.array([0.0, 0.4, 0.1])]
    summary = done_head.summarise(ended)
    assert summary["episodes"] == 2 and summary["end_mean"] == pytest.approx(0.5)
    assert summary["end_share_above_half"] == 0.5
    assert summary["before_5_max_mean"] == pytest.approx((0.3 + 0.4) / 2)
    assert summary["other_steps_mean"] == pytest.approx((0.1 + 0.2 + 0.3 + 0.0 + 0.4) / 5)
    assert done_head.summarise([]) == {"episodes": 0}


def test_the_done_head_command(tmp_path, tiny_run, run_main):
    from tests.conftest import copy_tiny_run
    from worldmodel.data import load_latents
    from worldmodel.io import read_json

    copy_tiny_run(tiny_run, tmp_path)
    result = run_main(f"--set=runs_dir={tmp_path}", main=done_head.main)
    assert result.returncode == 0, result.stderr
    summary = read_json(tmp_path / "tiny" / "done_head.json")
    split = read_json(tmp_path / "tiny" / "memory" / "summary.json")["split"]
    for name in ("train", "test"):
        ended = [
            episode
            for episode in split[name]
            if load_latents(tmp_path / "tiny" / "latents" / episode)["terminals"][-1]
        ]
        assert summary[name]["episodes"] == len(ended)
    missing = run_main(f"--set=runs_dir={tmp_path / 'none'}", main=done_head.main)
    assert missing.returncode == 2 and "no trained memory" in missing.stderr
