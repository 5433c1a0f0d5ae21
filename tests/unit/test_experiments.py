"""The experiment scripts: the switch comparison's sharing of stages and its table (``dream_switches.py``),
the imitation score's refusals (``score_imitation.py``), the teacher's score (``score_teacher.py``), the
player-patch error of V (``player_patch.py``), M read along the agent's episodes (``iterate_surprise.py``),
Take Cover's hits by skill (``doom_skill.py``)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from frmdn_worldmodels.data.frames import patch_boxes, sprite_masks
from frmdn_worldmodels.runtime.io import DataError

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"
sys.path.insert(0, str(EXPERIMENTS))  # the scripts import their neighbours by name
import action_effect  # noqa: E402 (the scripts' folder on the path)
import done_head  # noqa: E402 (the scripts' folder on the path)
import doom_skill  # noqa: E402 (the scripts' folder on the path)
import dream_switches  # noqa: E402 (the scripts' folder on the path)
import iterate_surprise  # noqa: E402 (the scripts' folder on the path)
import player_patch  # noqa: E402 (the scripts' folder on the path)


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


def test_the_table_counts_the_seeds_above_the_random_policy_and_pairs_each_switch_with_its_base():
    returns = {
        ("base", 0): [1.0, 3.0, 2.0],
        ("base", 1): [-1.0, 0.0, -2.0],
        ("dropout 0.1", 0): [4.0, 3.0, 2.0],
    }
    rows = [
        {
            "variant": name,
            "seed": seed,
            "real_mean": float(np.mean(values)),
            "real_std": 1.0,
            "returns": values,
            "seeds": [10 + seed, 20 + seed, 30 + seed],
            "random_mean": 0.0,
            "dream_best": 5.0,
            "gap_dream": 5.0,
            "gap_real": float(np.mean(values)),
            "seconds": 60.0,
        }
        for (name, seed), values in returns.items()
    ]
    text = dream_switches.table(rows)
    assert "| base | 0.5 | 1 of 2 |" in text and "| dropout 0.1 | 3.0 | 1 of 1 |" in text
    assert "| base | 1 | -1.0 ± 1.0 | — | 0.0 | 5.0 | 5.0 / -1.0 | 60 |" in text
    # dropout - base on seeds 10, 20, 30: +3, 0, 0 -> mean +1, standard error sqrt(3) / sqrt(3) = 1
    assert "| dropout 0.1 | 0 | 3.0 ± 1.0 | +1.0 ± 1.0 | 0.0 |" in text
    rows[-1]["seeds"] = [10, 30, 20]
    with pytest.raises(ValueError, match="the same seeds"):
        dream_switches.table(rows)


def test_the_imitation_score_refuses_a_run_without_an_imitation_or_a_memory(tmp_path, run_main):
    import score_imitation

    def score(*overrides):
        return run_main(f"--set=runs_dir={tmp_path}", *overrides, main=score_imitation.main)

    result = score()
    assert result.returncode == 2 and "controller.init is 'zeros'" in result.stderr
    result = score("--set=controller.init=imitate")
    assert result.returncode == 2 and "no trained memory" in result.stderr
    result = score("--set=controller.init=imitate", "--out=../elsewhere.json")
    assert result.returncode == 2 and "--out must be a .json file name" in result.stderr
    assert not any(tmp_path.iterdir())  # refused before any work


def test_the_sprite_patch_errors_against_the_rest_of_the_frame():
    player = np.array([[32.0, 32.0], [12.0, 53.3], [0.5, 32.0]])  # the last: the patch leaves the frame
    enemies = np.full((3, 2, 2), np.nan)
    enemies[1, 1] = 40.0, 10.0  # one enemy, in the second frame's second slot
    centres = {"player": player, "enemies": enemies}
    masks = sprite_masks(centres, ("player", "enemies"), 64)
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    recon = frames.copy()
    recon[0, 28:36, 28:36] = 0  # the player left out of the first frame...
    recon[2, 28:36, 0:4] = 0  # ...not counted where his patch would leave the frame: the rest's pixels
    recon[1, 6:14, 36:44] = 255 - frames[1, 6:14, 36:44]  # the enemy drawn in negative
    recon[1, 0, 0] = frames[1, 0, 0] ^ 1  # a nearly perfect rest
    errors = player_patch.patch_errors(frames, recon, masks)
    expected = ((frames[0, 28:36, 28:36] / 255.0) ** 2).sum() / (2 * 8 * 8 * 3)
    negative = (((255 - 2 * frames[1, 6:14, 36:44].astype(float)) / 255.0) ** 2).mean()
    assert errors["frames"] == 2 and errors["player_mse"] == pytest.approx(expected)
    assert errors["enemy_frames"] == 1 and errors["enemy_mse"] == pytest.approx(negative)
    rest = (((recon[2, 28:36, 0:4] - frames[2, 28:36, 0:4].astype(float)) / 255.0) ** 2).sum()
    assert errors["rest_mse"] == pytest.approx((rest / 3 + 1 / 255.0**2) / (3 * 64 * 64 - 2 * 64 - 64))
    assert errors["ratio"] == pytest.approx(expected / errors["rest_mse"])
    unseen = player_patch.patch_errors(frames, frames, sprite_masks(centres, ("player",), 64))
    assert unseen["ratio"] is None and unseen["enemy_mse"] is None and unseen["enemy_frames"] == 0
    boxes = patch_boxes(player, 64)
    sheet = player_patch.closeups(frames, recon, boxes)
    assert [len(row) for row in sheet] == [2, 2] and sheet[0][0].shape == (16, 16, 3)
    np.testing.assert_array_equal(player_patch.first_on_screen(enemies)[1], [40.0, 10.0])
    assert np.isnan(player_patch.first_on_screen(enemies)[[0, 2]]).all()
    with pytest.raises(DataError, match="off the screen in every frame"):
        player_patch.patch_errors(frames, recon, np.zeros((3, 64, 64), np.uint8))


def test_the_player_patch_command(tmp_path, run_main):
    from frmdn_worldmodels.models.vae import ConvVAE
    from frmdn_worldmodels.runtime.io import read_json, save_checkpoint

    save_checkpoint(tmp_path / "v.pt", state_dict=ConvVAE(8).state_dict(), config={})
    args = ["--set=env.name=mario", "--set=collect.max_steps=20", f"--set=runs_dir={tmp_path}"]
    result = run_main(*args, "--episodes=1", f"--vae={tmp_path / 'v.pt'}", main=player_patch.main)
    assert result.returncode == 0, result.stderr
    summary = read_json(tmp_path / "tiny" / "player_patch" / "summary.json")
    assert summary["frames"] == 21 and summary["player_mse"] > 0 and summary["rest_mse"] > 0
    assert summary["enemy_frames"] == 0 and summary["enemy_mse"] is None  # no enemy in the first 20 steps
    assert (tmp_path / "tiny" / "player_patch" / "closeups.png").stat().st_size > 0
    refused = run_main(f"--set=runs_dir={tmp_path}", main=player_patch.main)  # CarRacing has no Mario
    assert refused.returncode == 2 and "read from Mario's RAM" in refused.stderr
    missing = run_main(*args, f"--vae={tmp_path / 'none.pt'}", main=player_patch.main)
    assert missing.returncode == 2 and "none.pt" in missing.stderr


def test_the_done_head_read_in_one_pass_matches_a_step_by_step_reading(tmp_path):
    """``done_probabilities`` reads an episode in one sequence call; the memory's one-step path, fed the same
    z and a (and the next z, which the heads read), gives the same per-step chances, calibrated for the
    head's positive weight and horizon."""
    import torch

    from frmdn_worldmodels.data.episodes import load_latents
    from frmdn_worldmodels.models.memory import MemoryModel
    from frmdn_worldmodels.runtime.config import MemoryConfig
    from tests.conftest import write_tiny_latents

    write_tiny_latents(tmp_path, episodes=1, steps=12)
    latents = load_latents(tmp_path / "episode_0000.npz")
    torch.manual_seed(0)
    memory = MemoryModel(
        4, 2, MemoryConfig(hidden=8, components=2, rank=1, flow_blocks=1, flow_hidden=8)
    ).eval()
    memory.done_pos_weight, memory.done_horizon = 20.0, 3
    probabilities = done_head.done_probabilities(memory, latents)
    assert probabilities.shape == (12,)
    state, stepped = None, []
    with torch.no_grad():
        for t in range(12):
            z = torch.from_numpy(latents["mu"][t])[None]
            a = torch.from_numpy(latents["actions"][t])[None]
            out, state = memory.step(z, a, state)
            _, logit = memory.outcome(out, torch.from_numpy(latents["mu"][t + 1])[None])
            within = torch.sigmoid(logit - np.log(20.0))  # "the end within 3 steps", unweighted
            stepped.append(1 - (1 - within.item()) ** (1 / 3))
    np.testing.assert_allclose(probabilities, stepped, rtol=1e-5, atol=1e-6)


def _tiny_memory(tmp_path):
    import torch

    from frmdn_worldmodels.data.episodes import load_latents
    from frmdn_worldmodels.models.memory import MemoryModel
    from frmdn_worldmodels.runtime.config import MemoryConfig
    from tests.conftest import write_tiny_latents

    write_tiny_latents(tmp_path, episodes=1, steps=12)
    torch.manual_seed(0)
    config = MemoryConfig(hidden=8, components=2, rank=1, flow_blocks=1, flow_hidden=8)
    return MemoryModel(4, 2, config).eval(), load_latents(tmp_path / "episode_0000.npz")


def test_the_drawn_done_chance_is_the_recorded_one_when_the_head_ignores_the_next_frame(tmp_path):
    """``drawn_done_probabilities`` averages the done head over next frames M draws; a head whose weights on
    the next frame are zero gives exactly the chance read on the recorded frame, and one that reads it gives
    another."""
    import torch

    memory, latents = _tiny_memory(tmp_path)
    generator = torch.Generator().manual_seed(0)
    reads_z = done_head.drawn_done_probabilities(memory, latents, 8, generator)
    assert not np.allclose(reads_z, done_head.done_probabilities(memory, latents), atol=1e-4)
    with torch.no_grad():
        memory.done_head.weight[:, memory.config.hidden :] = 0.0
    drawn = done_head.drawn_done_probabilities(memory, latents, 8, generator)
    np.testing.assert_allclose(drawn, done_head.done_probabilities(memory, latents), rtol=1e-5, atol=1e-7)


def test_the_action_effect_counts_the_dreams_that_end(tmp_path):
    """``ended_share``: every dream ends under a done head that always fires, none under one that never
    does, and the share lies in between otherwise."""
    import torch

    memory, latents = _tiny_memory(tmp_path)
    plan = latents["actions"][4:10]
    generator = torch.Generator().manual_seed(0)
    between = action_effect.ended_share(memory, latents, 4, plan, generator)
    assert 0.0 <= between <= 1.0
    with torch.no_grad():
        memory.done_head.bias.fill_(30.0)
        assert action_effect.ended_share(memory, latents, 4, plan, generator) == 1.0
        memory.done_head.bias.fill_(-30.0)
        assert action_effect.ended_share(memory, latents, 0, plan, generator) == 0.0


def test_the_done_head_summary():
    ended = [np.array([0.1, 0.2, 0.3, 0.9]), np.array([0.0, 0.4, 0.1])]
    summary = done_head.summarise(ended)
    assert summary["episodes"] == 2 and summary["end_mean"] == pytest.approx(0.5)
    assert summary["end_share_above_half"] == 0.5
    assert summary["before_5_max_mean"] == pytest.approx((0.3 + 0.4) / 2)
    caught = (1 - 0.9 * 0.8 * 0.7 * 0.1) + (1 - 1.0 * 0.6 * 0.9)  # 1 - P(no end) over the last 6 steps
    assert summary["caught_mean"] == pytest.approx(caught / 2)
    assert summary["early_mean"] == 0.0  # no step before the last 6
    longer = done_head.summarise([np.array([0.5, 0.2, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0])])
    assert longer["early_mean"] == pytest.approx(1 - 0.5 * 0.8) and longer["caught_mean"] == 1.0
    assert summary["other_steps_mean"] == pytest.approx((0.1 + 0.2 + 0.3 + 0.0 + 0.4) / 5)
    assert done_head.summarise([]) == {"episodes": 0}


def test_a_death_is_a_fall_when_mario_ends_off_the_screen(tmp_path):
    from frmdn_worldmodels.data.episodes import save_episode

    obs, steps = np.zeros((4, 64, 64, 3), np.uint8), 3
    arrays = (obs, np.zeros((steps, 2)), np.zeros(steps), [False, False, True])
    sprites = np.full((4, 2, 2), 30.0)
    save_episode(tmp_path / "on_screen.npz", *arrays, sprites)
    sprites[-1, 0] = np.nan  # Mario below the screen in the last frame; the enemy is still there
    save_episode(tmp_path / "fell.npz", *arrays, sprites)
    sprites[-1, 0], sprites[-1, 1] = 30.0, np.nan  # the enemy gone does not make a fall
    save_episode(tmp_path / "enemy_gone.npz", *arrays, sprites)
    save_episode(tmp_path / "bare.npz", *arrays)
    kinds = [done_head.end_kind(tmp_path / f"{name}.npz") for name in ("on_screen", "fell", "enemy_gone")]
    assert kinds == ["on_screen", "fell", "on_screen"]
    assert done_head.end_kind(tmp_path / "bare.npz") is None
    assert done_head.end_kind(tmp_path / "missing.npz") is None


def test_the_teacher_score_is_the_teacher_on_the_evaluate_seeds(tmp_path, run_main):
    """``score_teacher.py`` plays the game's teacher on the evaluate stage's seeds with evaluate's draws:
    the same returns as the collector's own loop playing that driver; a game without the teacher named is
    refused before any work."""
    import json

    import score_teacher

    from frmdn_worldmodels.games.envs import make_env
    from frmdn_worldmodels.runtime.config import load_config
    from frmdn_worldmodels.runtime.seeds import episode_rng, seed_ints
    from frmdn_worldmodels.stages.collect import rollout_episode
    from tests.toy_game import CentringPolicy

    toy = ["--set=env.name=tests.toy_game:DOTS", "--set=env.max_steps=30", "--set=evaluate.episodes=6"]
    out = tmp_path / "teacher.json"
    result = run_main(*toy, "--teacher=centring", "--workers=1", f"--out={out}", main=score_teacher.main)
    assert result.returncode == 0, result.stderr
    score = json.loads(out.read_text())
    cfg = load_config(None, ["env.name=tests.toy_game:DOTS", "env.max_steps=30"])
    env = make_env(cfg.env)
    expected = [
        float(
            rollout_episode(env, cfg.env, CentringPolicy(episode_rng("teacher", seed)), seed)["rewards"].sum()
        )
        for seed in seed_ints(0, "test", 0, count=6)
    ]
    assert score["seeds"] == seed_ints(0, "test", 0, count=6) and score["returns"] == pytest.approx(expected)
    assert len(set(expected)) > 1  # the draws matter, so the same draws are what makes them equal

    refused = run_main(*toy, "--teacher=ram_expert", f"--out={tmp_path / 'no.json'}", main=score_teacher.main)
    assert refused.returncode == 2 and "'ram_expert' is not a teacher of env.name" in refused.stderr
    assert not (tmp_path / "no.json").exists()


def test_m_read_along_whole_episodes_scores_as_the_memory_stage_does(tmp_path):
    """``iterate_surprise.read_episodes`` reads each episode in one pass from its first frame; the memory
    stage's ``evaluate`` reads windows of ``seq_len`` carrying the state across them: on z = the means,
    the same NLL per dimension and reward error per step."""
    import torch

    from frmdn_worldmodels.data.episodes import list_npz
    from frmdn_worldmodels.data.sequences import load_sequences
    from frmdn_worldmodels.models.memory import MemoryModel
    from frmdn_worldmodels.runtime.config import Config, MemoryConfig, MemoryTrainConfig
    from frmdn_worldmodels.stages.train_memory import evaluate
    from tests.conftest import write_tiny_latents

    write_tiny_latents(tmp_path, episodes=3, steps=30)
    paths = list_npz(tmp_path)
    torch.manual_seed(0)
    memory = MemoryModel(4, 2, MemoryConfig(hidden=8, components=2, rank=1, flow_blocks=1, flow_hidden=8))
    memory.eval()
    read = iterate_surprise.read_episodes(memory, paths)
    cfg = Config(memory_train=MemoryTrainConfig(seq_len=7, batch_size=2, use_mu=True, carry_state=True))
    data = load_sequences(paths, cfg.memory_train.seq_len)
    windows = evaluate(memory, data, data.latents(True, np.random.default_rng(0)), cfg, 1.0)
    assert read["episodes"] == 3
    assert read["nll_per_dim"] == pytest.approx(windows["nll_per_dim"], rel=1e-5)
    assert read["reward_mse"] == pytest.approx(windows["reward_loss"], rel=1e-5)
    rewards = sum(np.load(path)["rewards"].sum() for path in paths) / 3
    assert read["real_return"] == pytest.approx(rewards)


def test_doom_skill_counts_the_hits_the_health_shows():
    """Two health traces: one hit of 21 at tic 2 then 42 at tic 4; one episode dead at its first tic."""
    result = doom_skill.summary([[100.0, 100.0, 79.0, 79.0, 37.0], [100.0]])
    assert result["lengths"] == [5, 1] and result["length_mean"] == 3.0
    assert result["first_hit_tic_mean"] == (2 + 1) / 2  # no hit seen: the episode's length
    assert result["hits_seen_mean"] == 1.0 and result["damages"] == [21.0, 42.0]
