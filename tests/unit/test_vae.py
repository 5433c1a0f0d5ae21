"""V: the ConvVAE, its loss, the streaming frame loader, train-vae (resume), encode, and the run.py
commands."""

from __future__ import annotations

import itertools
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from frmdn_worldmodels.data import frames as frames_module
from frmdn_worldmodels.data.episodes import load_latents, save_episode
from frmdn_worldmodels.models.vae import ConvVAE, frames_to_tensor, load_vae, tensor_to_frames, vae_loss
from frmdn_worldmodels.runtime import records as stages
from frmdn_worldmodels.runtime.config import ConfigError, load_config
from frmdn_worldmodels.runtime.io import DataError, load_checkpoint, read_json, read_jsonl, save_checkpoint
from frmdn_worldmodels.runtime.paths import run_paths
from frmdn_worldmodels.runtime.plots import plot_curves, save_image_grid
from frmdn_worldmodels.runtime.records import recorded_seconds
from frmdn_worldmodels.stages import encode as encode_module
from frmdn_worldmodels.stages import train_vae
from frmdn_worldmodels.train.loop import TrainingStopped

ROOT = Path(__file__).resolve().parents[2]


def write_episodes(folder: Path, count: int = 4, steps: int = 20, seed: int = 0) -> list[Path]:
    """Synthetic episodes whose frames are blocky random images (8x8 blocks, so they compress and are
    learnable)."""
    rng = np.random.default_rng(seed)
    paths = []
    for index in range(count):
        blocks = rng.integers(0, 256, (steps + 1, 8, 8, 3), dtype=np.uint8)
        obs = blocks.repeat(8, axis=1).repeat(8, axis=2)
        path = folder / f"episode_{index:04d}.npz"
        save_episode(
            path, obs, rng.uniform(-1, 1, (steps, 3)), rng.normal(size=steps), np.arange(steps) == steps - 1
        )
        paths.append(path)
    return paths


def tiny_config(tmp_path: Path, name: str = "v", *overrides: str):
    return load_config(
        None,
        [
            f"runs_dir={tmp_path / 'runs'}",
            f"name={name}",
            "vae.epochs=2",
            "vae.batch_size=8",
            "vae.shuffle_buffer=16",
            "vae.log_every=1",
            "vae.checkpoint_every=3",
            "vae.val_fraction=0.25",
            "vae.encode_batch=16",
            *overrides,
        ],
    )


@pytest.fixture
def episode_run(tmp_path):
    """``make(name, *overrides) -> Config`` for a run holding 4 synthetic episodes of 21 frames."""

    def make(name: str = "v", *overrides: str):
        config = tiny_config(tmp_path, name, *overrides)
        write_episodes(run_paths(config).episodes)
        return config

    return make


@pytest.fixture
def count_train_steps(monkeypatch):
    """A list that grows by one per optimiser step of train_vae (loss calls with gradients enabled)."""
    calls = []
    original = train_vae.vae_loss

    def counting(*args, **kwargs):
        if torch.is_grad_enabled():
            calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(train_vae, "vae_loss", counting)
    return calls


# --- the model and its loss -----------------------------------------------------------------------------


def test_encode_decode_shapes_and_ranges():
    torch.manual_seed(0)
    vae = ConvVAE(latent_dim=16)
    x = torch.rand(5, 3, 64, 64)
    mu, logvar = vae.encode(x)
    assert mu.shape == logvar.shape == (5, 16)
    recon = vae.decode(torch.randn(5, 16))
    assert recon.shape == (5, 3, 64, 64)
    assert recon.min() >= 0 and recon.max() <= 1
    recon, mu, logvar = vae(x)
    assert recon.shape == x.shape and mu.shape == (5, 16)
    # the architecture of the paper: 4 stride-2 convs 32/64/128/256 down to 2x2x256
    convs = [m for m in vae.encoder if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 64, 128, 256]
    assert all(c.kernel_size == (4, 4) and c.stride == (2, 2) for c in convs)
    assert vae.encoder(x).shape == (5, 1024)


def test_frames_tensor_round_trip():
    obs = np.random.default_rng(0).integers(0, 256, (2, 3, 64, 64, 3), dtype=np.uint8)
    tensor = frames_to_tensor(obs)
    assert tensor.shape == (2, 3, 3, 64, 64) and tensor.dtype == torch.float32
    assert tensor.min() >= 0 and tensor.max() <= 1
    assert tensor[1, 2, 0, 5, 7].item() == pytest.approx(obs[1, 2, 5, 7, 0] / 255.0)
    assert np.array_equal(tensor_to_frames(tensor), obs)
    with pytest.raises(ValueError, match="uint8"):
        frames_to_tensor(obs.astype(np.float32))


def test_vae_loss_matches_hand_computation():
    rng = np.random.default_rng(1)
    x, recon = rng.uniform(size=(2, 3, 4, 4)), rng.uniform(size=(2, 3, 4, 4))
    mu = np.array(
        [[0.1, -0.2, 0.05], [2.0, -1.5, 1.0]]
    )  # frame 0 under the free-bits floor, frame 1 above it
    logvar = np.array([[0.0, -0.1, 0.1], [-1.0, 0.5, -2.0]])
    tolerance = 0.5

    recon_hand = np.mean([np.sum((recon[b] - x[b]) ** 2) for b in range(2)])
    kl_frames = []
    for b in range(2):
        kl = sum(-0.5 * (1 + logvar[b, j] - mu[b, j] ** 2 - np.exp(logvar[b, j])) for j in range(3))
        kl_frames.append(max(kl, tolerance * 3))
    assert kl_frames[0] == tolerance * 3 and kl_frames[1] > tolerance * 3

    tensors = [torch.tensor(a, requires_grad=True) for a in (recon, x, mu, logvar)]
    losses = vae_loss(*tensors, kl_tolerance=tolerance)
    assert losses["recon"].item() == pytest.approx(recon_hand)
    assert losses["kl"].item() == pytest.approx(np.mean(kl_frames))
    assert losses["loss"].item() == pytest.approx(recon_hand + np.mean(kl_frames))
    losses["loss"].backward()
    mu_grad = tensors[2].grad
    assert torch.all(mu_grad[0] == 0), "the clamped frame must give the encoder no KL gradient"
    assert torch.allclose(mu_grad[1], torch.tensor(mu[1]) / 2)  # d/dmu of mean_b 1/2 mu^2


def test_weighted_vae_loss_against_a_dense_reference():
    """Each pixel's squared error times its weight: a loop over every pixel, and the unweighted loss as the
    special case of weights 1."""
    rng = np.random.default_rng(2)
    x, recon = rng.uniform(size=(2, 3, 5, 5)), rng.uniform(size=(2, 3, 5, 5))
    mu, logvar = rng.normal(size=(2, 4)), rng.normal(size=(2, 4))
    weight = 1.0 + 30.0 * (rng.uniform(size=(2, 1, 5, 5)) < 0.2)  # broadcast over the channels
    dense = 0.0
    for b, c, i, j in itertools.product(range(2), range(3), range(5), range(5)):
        dense += weight[b, 0, i, j] * (recon[b, c, i, j] - x[b, c, i, j]) ** 2
    tensors = [torch.tensor(a) for a in (recon, x, mu, logvar)]
    weighted = vae_loss(*tensors, kl_tolerance=0.5, weight=torch.tensor(weight))
    plain = vae_loss(*tensors, kl_tolerance=0.5)
    assert weighted["recon"].item() == pytest.approx(dense / 2)
    assert weighted["recon"].item() > plain["recon"].item()
    ones = vae_loss(*tensors, kl_tolerance=0.5, weight=torch.ones(2, 1, 5, 5, dtype=torch.float64))
    assert ones["recon"].item() == pytest.approx(plain["recon"].item())
    assert weighted["kl"].item() == plain["kl"].item()


def carracing_frames(count: int = 16) -> np.ndarray:
    """Real CarRacing frames through the project's env (past the opening zoom), with a gentle random drive."""
    from frmdn_worldmodels.games.envs import make_env

    config = load_config(None, ["env.max_steps=200"])
    env = make_env(config.env, seed=3)
    rng = np.random.default_rng(0)
    obs, _ = env.reset(seed=3)
    frames = []
    for step in range(50 + 2 * count):
        obs, *_ = env.step(np.array([rng.uniform(-0.5, 0.5), 0.4, 0.0], dtype=np.float32))
        if step >= 50 and step % 2 == 0:
            frames.append(obs)
    env.close()
    return np.stack(frames)


def test_loss_falls_on_real_carracing_frames():
    frames = carracing_frames()
    assert frames.shape == (16, 64, 64, 3) and frames.dtype == np.uint8
    torch.manual_seed(0)
    vae = ConvVAE()
    optimizer = torch.optim.Adam(vae.parameters(), lr=1e-3)
    x = frames_to_tensor(frames)
    history = []
    for _ in range(25):
        recon, mu, logvar = vae(x)
        losses = vae_loss(recon, x, mu, logvar, kl_tolerance=0.5)
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
        history.append(losses["recon"].item())
    assert history[-1] < 0.5 * history[0], history


# --- the streaming loader -------------------------------------------------------------------------------


def test_shuffled_batches_emit_every_frame_once_in_bounded_memory(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    paths = []
    for episode, length in enumerate([13, 30, 7, 21, 16]):
        obs = np.zeros((length, 64, 64, 3), dtype=np.uint8)
        obs[:, 0, 0, 0], obs[:, 0, 0, 1] = episode, np.arange(length)  # each frame labelled (episode, index)
        paths.append(tmp_path / f"e{episode}.npz")
        save_episode(
            paths[-1], obs, rng.normal(size=(length - 1, 2)), np.zeros(length - 1), np.zeros(length - 1)
        )

    loaded = []
    original = frames_module.load_episode
    monkeypatch.setattr(frames_module, "load_episode", lambda path: loaded.append(path) or original(path))
    frame_lengths = {path: length for path, length in zip(paths, [13, 30, 7, 21, 16])}
    batch_size, buffer_size = 4, 10
    seen, emitted = [], 0
    for batch in frames_module.shuffled_batches(paths, batch_size, buffer_size, np.random.default_rng(5)):
        assert 1 <= len(batch) <= batch_size
        emitted += len(batch)
        read = sum(frame_lengths[path] for path in loaded)
        # held = read - emitted, at most the buffer plus what is left of the episode being read
        assert read - emitted <= buffer_size + frame_lengths[loaded[-1]]
        seen += [(int(frame[0, 0, 0]), int(frame[0, 0, 1])) for frame in batch]
    expected = [(e, i) for e, length in enumerate([13, 30, 7, 21, 16]) for i in range(length)]
    assert sorted(seen) == expected
    assert len(seen) == len(expected)
    assert seen != sorted(seen)  # shuffled
    assert frames_module.count_batches(len(expected), batch_size) == -(-len(expected) // batch_size)
    assert [frames_module.episode_length(path) for path in paths] == [13, 30, 7, 21, 16]

    again = [
        b.copy()
        for b in frames_module.shuffled_batches(paths, batch_size, buffer_size, np.random.default_rng(5))
    ]
    first = list(frames_module.shuffled_batches(paths, batch_size, buffer_size, np.random.default_rng(5)))
    assert all(np.array_equal(a, b) for a, b in zip(again, first))  # a pass is a function of the seed


def test_patch_boxes_and_sprite_masks():
    centres = np.array([[32.0, 32.0], [12.0, 53.3], [0.5, 32.0], [np.nan, np.nan]])
    boxes = frames_module.patch_boxes(centres, 64)
    # the third square leaves the frame, the fourth frame has no sprite
    assert boxes.tolist() == [[28, 36, 28, 36], [49, 57, 8, 16], [-1] * 4, [-1] * 4]
    # two enemy slots per frame: the first frame's overlaps the player's patch by 4 x 8 pixels, the second
    # frame's two enemies overlap each other (one bit all the same), the others have none on the screen
    enemies = np.full((4, 2, 2), np.nan)
    enemies[0, 0] = 36.0, 32.0
    enemies[1] = [[50.0, 10.0], [52.0, 10.0]]
    masks = frames_module.sprite_masks({"player": centres, "enemies": enemies}, ("player", "enemies"), 64)
    assert masks.dtype == np.uint8 and masks.shape == (4, 64, 64)
    player, enemy = frames_module.SPRITE_BITS["player"], frames_module.SPRITE_BITS["enemies"]
    assert np.bincount(masks[0].ravel(), minlength=4).tolist() == [64 * 64 - 96, 32, 32, 32]
    assert (masks[0, 28:36, 32:36] == player + enemy).all() and (masks[0, 28:36, 36:40] == enemy).all()
    assert (masks[1, 49:57, 8:16] == player).all()
    assert (masks[1, 6:14, 46:56] == enemy).all() and (masks[1] == enemy).sum() == 8 * 10
    assert masks[2:].sum() == 0
    only_player = frames_module.sprite_masks({"player": centres, "enemies": enemies}, ("player",), 64)
    np.testing.assert_array_equal(only_player, masks & player)


def test_the_sprites_patches_travel_with_their_frame_through_the_shuffle(tmp_path):
    """With ``sprites`` every emitted frame carries, as a fourth channel, the mask of its own episode's
    ``player`` and ``enemies`` rows; an episode without the positions asked for is refused by name."""
    rng = np.random.default_rng(0)
    paths, lengths = [], [9, 14, 6]
    for episode, length in enumerate(lengths):
        obs = np.zeros((length, 64, 64, 3), dtype=np.uint8)
        obs[:, 0, 0, 0], obs[:, 0, 0, 1] = episode, np.arange(length)
        sprites = np.full((length, 3, 2), np.nan)
        sprites[:, 0] = np.stack([10.0 + 3 * np.arange(length), np.full(length, 20.0 + 10 * episode)], axis=1)
        sprites[-1, 0] = np.nan  # the last frame without the player
        sprites[::2, 2] = 50.0, 40.0  # an enemy in every other frame
        paths.append(tmp_path / f"e{episode}.npz")
        steps = length - 1
        save_episode(paths[-1], obs, rng.normal(size=(steps, 2)), np.zeros(steps), np.zeros(steps), sprites)
    emitted = 0
    keys = ("player", "enemies")
    for batch in frames_module.shuffled_batches(paths, 4, 5, np.random.default_rng(1), sprites=keys):
        assert batch.shape[1:] == (64, 64, 4)
        for frame in batch:
            episode, index = int(frame[0, 0, 0]), int(frame[0, 0, 1])
            arrays = {key: np.load(paths[episode])[key][index : index + 1] for key in keys}
            np.testing.assert_array_equal(frame[..., 3], frames_module.sprite_masks(arrays, keys, 64)[0])
            player = 0 if index == lengths[episode] - 1 else 64
            assert (frame[..., 3] & 1).sum() == player and (frame[..., 3] >= 2).sum() == 64 * (index % 2 == 0)
            emitted += 1
    assert emitted == sum(lengths)
    batches = frames_module.sequential_batches(paths, 100, (64, 64, 3), sprites=("player",))
    first = next(iter(batches))
    assert first.shape == (9, 64, 64, 4) and first[0, 16:24, 6:14, 3].all() and first[..., 3].max() == 1

    bare = write_episodes(tmp_path / "bare", count=1, steps=3)
    with pytest.raises(DataError, match="episode_0000.npz: no player positions.*vae.player_weight"):
        list(frames_module.shuffled_batches(bare, 4, 8, np.random.default_rng(0), sprites=("player",)))
    older = tmp_path / "older.npz"  # the first episodes with positions stored the player's only
    arrays = dict(np.load(paths[0]))
    del arrays["enemies"]
    np.savez(older, **arrays)
    with pytest.raises(DataError, match="older.npz: no enemies positions.*vae.enemy_weight"):
        list(frames_module.sequential_batches([older], 4, sprites=keys))


def test_loader_names_a_broken_episode(tmp_path):
    paths = write_episodes(tmp_path, count=2, steps=5)
    paths[1].write_bytes(b"not an npz")
    with pytest.raises(DataError, match=paths[1].name):
        list(frames_module.shuffled_batches(paths, 4, 8, np.random.default_rng(0)))
    with pytest.raises(DataError, match=paths[1].name):
        frames_module.episode_length(paths[1])


# --- train-vae -----------------------------------------------------------------------------------------


def test_train_writes_outputs_and_skips_when_done(episode_run, count_train_steps):
    config = episode_run()
    summary = train_vae.run(config)
    out = run_paths(config).vae
    for name in (
        "vae.pt",
        "checkpoint.pt",
        "metrics.jsonl",
        "summary.json",
        "reconstructions.png",
        "loss.png",
    ):
        assert (out / name).is_file(), name
    assert summary == read_json(out / "summary.json")
    assert summary["train_episodes"] == 3 and summary["val_episodes"] == 1
    assert summary["train_frames"] == 63 and summary["epochs"] == 2
    assert summary["steps"] == 2 * 8 == len(count_train_steps)  # ceil(63 / 8) batches per epoch
    assert np.isfinite(summary["val_loss"])
    epochs = [row for row in read_jsonl(out / "metrics.jsonl") if row["kind"] == "epoch"]
    assert [row["epoch"] for row in epochs] == [0, 1, 2]  # epoch 0: the untrained model
    assert min(row["val_loss"] for row in epochs) == pytest.approx(summary["val_loss"])

    vae = load_vae(out / "vae.pt")
    assert not vae.training and vae.latent_dim == 32

    count_train_steps.clear()
    assert train_vae.run(config) == summary
    assert count_train_steps == []  # a finished stage is not trained again


def test_max_frames_trains_on_the_first_whole_episodes(tmp_path):
    """vae.max_frames=30 of episodes of 21 frames: two training episodes, and one validation episode (its
    share, ceil(30 * 0.25 / 0.75) = 10 frames); the data split otherwise is the full one's."""
    full, capped = (
        tiny_config(tmp_path, name, *extra) for name, extra in (("full", ()), ("cap", ("vae.max_frames=30",)))
    )
    episodes = write_episodes(tmp_path / "episodes", count=8)
    whole, cut = train_vae.split_episodes(full, episodes), train_vae.split_episodes(capped, episodes)
    assert (len(whole.train_paths), len(whole.val_paths)) == (6, 2)
    assert cut.train_paths == whole.train_paths[:2] and cut.val_paths == whole.val_paths[:1]
    assert (cut.train_frames, cut.val_frames) == (42, 21)
    write_episodes(run_paths(capped).episodes, count=8)
    summary = train_vae.run(capped)
    assert (summary["train_episodes"], summary["train_frames"], summary["val_episodes"]) == (2, 42, 1)


@pytest.fixture(scope="module")
def uninterrupted_vae(tmp_path_factory) -> tuple[int, dict[str, torch.Tensor]]:
    """(optimiser steps, final weights) of the tiny train-vae run trained without a kill, shared by the
    resume tests whatever their ``vae.checkpoint_every``: writing checkpoints must not change the weights."""
    config = tiny_config(tmp_path_factory.mktemp("uninterrupted"), "whole")
    write_episodes(run_paths(config).episodes)
    summary = train_vae.run(config)
    return summary["steps"], load_checkpoint(run_paths(config).vae / "checkpoint.pt")["model"]


@pytest.mark.parametrize("checkpoint_every, stop_at, resume_at", [(3, 5, 3), (0, 11, 8)])
def test_resume_after_a_kill_continues_from_the_checkpoint(
    episode_run, uninterrupted_vae, count_train_steps, monkeypatch, checkpoint_every, stop_at, resume_at
):
    """Kill mid-epoch (checkpoint every 3 steps) or in epoch 2 (checkpoints at epoch ends only); the rerun
    takes only the missing steps and ends with exactly the weights of an uninterrupted run."""
    total, reference = uninterrupted_vae
    killed = episode_run("killed", f"vae.checkpoint_every={checkpoint_every}")
    ticks = itertools.count()  # a clock that moves one second each time the stage reads it
    monkeypatch.setattr(stages, "time", SimpleNamespace(monotonic=lambda: float(next(ticks))))
    with pytest.raises(TrainingStopped):
        train_vae.run(killed, stop_after_steps=stop_at)
    assert len(count_train_steps) == stop_at
    state = load_checkpoint(run_paths(killed).vae / "checkpoint.pt")
    assert state["state"]["global_step"] == resume_at
    killed_seconds = recorded_seconds(run_paths(killed).vae)
    assert killed_seconds >= 1  # the time up to the last checkpoint was recorded there

    count_train_steps.clear()
    summary = train_vae.run(killed)
    assert len(count_train_steps) == total - resume_at  # resumed, not restarted
    assert summary["steps"] == total
    assert recorded_seconds(run_paths(killed).vae) > killed_seconds
    steps = [
        row["step"] for row in read_jsonl(run_paths(killed).vae / "metrics.jsonl") if row["kind"] == "train"
    ]
    assert steps == list(range(1, total + 1))  # no step logged twice, none missing

    final = load_checkpoint(run_paths(killed).vae / "checkpoint.pt")["model"]
    for key in reference:
        torch.testing.assert_close(final[key], reference[key], rtol=1e-5, atol=1e-6)


def test_sprite_weights_weigh_the_patches_in_training_and_validation(tmp_path, monkeypatch):
    """``vae.player_weight`` and ``vae.enemy_weight`` reach the loss as weights of 31 on the player's 8 x 8
    patch, 11 on an enemy's, 31 where they overlap and 1 elsewhere; they are refused below 1, for a game
    without sprites and for episodes without the positions, before any work."""
    config = tiny_config(
        tmp_path, "pw", "env.name=mario", "vae.player_weight=31", "vae.enemy_weight=11", "vae.epochs=1"
    )
    folder = run_paths(config).episodes
    for index, path in enumerate(write_episodes(folder, count=4, steps=6)):
        episode = np.load(path)
        sprites = np.full((7, 2, 2), np.nan)
        sprites[:, 0] = 30.0, 30.0
        sprites[index, 0] = np.nan  # one frame of each episode without the player
        sprites[:, 1] = 34.0, 30.0  # an enemy whose patch half covers the player's
        arrays = (episode[key] for key in ("obs", "actions", "rewards", "terminals"))
        save_episode(path, *arrays, sprites)
    weights = []
    original = train_vae.vae_loss

    def recording(*args, **kwargs):
        weights.append((torch.is_grad_enabled(), args[-1] if len(args) > 5 else kwargs.get("weight")))
        return original(*args, **kwargs)

    monkeypatch.setattr(train_vae, "vae_loss", recording)
    train_vae.run(config)
    assert any(grad for grad, _ in weights) and any(not grad for grad, _ in weights)  # training, validation
    for _, weight in weights:
        assert weight.shape[1:] == (1, 64, 64)
        assert set(weight.unique().tolist()) <= {1.0, 11.0, 31.0}
        patches = (weight == 31).flatten(1).sum(dim=1)
        assert set(patches.tolist()) <= {0, 64} and (patches == 64).any()
        assert weight[patches == 64][:, 0, 26:34, 26:34].eq(31).all()
        assert weight[patches == 64][:, 0, 26:34, 34:38].eq(11).all()  # the enemy's half outside Mario's
        assert weight[patches == 0][:, 0, 26:34, 30:38].eq(11).all()  # the frames without the player
        assert (weight != 1).flatten(1).sum(dim=1).tolist() == [8 * 8 + 8 * 4 * (p == 64) for p in patches]

    with pytest.raises(ConfigError, match="vae.enemy_weight must be at least 1"):
        tiny_config(tmp_path, "low", "env.name=mario", "vae.enemy_weight=0.5")
    old = tiny_config(tmp_path, "old", "env.name=mario", "vae.player_weight=31")
    write_episodes(run_paths(old).episodes, count=3, steps=4)
    with pytest.raises(DataError, match=r"episode_0000.npz \(and 2 more episodes\): no player positions"):
        train_vae.run(old)
    assert not run_paths(old).vae.exists()  # refused before any work
    car = tiny_config(tmp_path, "car", "vae.enemy_weight=2")
    with pytest.raises(ConfigError, match="vae.enemy_weight=2.0 .*only Super Mario Bros"):
        train_vae.run(car)
    assert not run_paths(car).root.exists()


def test_train_without_episodes_says_to_collect(tmp_path):
    with pytest.raises(DataError, match="run.py collect"):
        train_vae.run(tiny_config(tmp_path))


def test_train_names_a_broken_episode(episode_run):
    config = episode_run()
    broken = run_paths(config).episodes / "episode_0002.npz"
    broken.write_bytes(b"truncated")
    with pytest.raises(DataError, match="episode_0002.npz"):
        train_vae.run(config)


def test_load_vae_rejects_other_checkpoints(tmp_path):
    save_checkpoint(tmp_path / "other.pt", state_dict={"weight": torch.zeros(2)}, config={})
    with pytest.raises(DataError, match="other.pt"):
        load_vae(tmp_path / "other.pt")


# --- encode --------------------------------------------------------------------------------------------


def test_encode_frames_batches_and_single_frames():
    torch.manual_seed(0)
    vae = ConvVAE(8).eval()
    obs = np.random.default_rng(0).integers(0, 256, (10, 64, 64, 3), dtype=np.uint8)
    mu, logvar = encode_module.encode_frames(vae, obs, "cpu", batch_size=3)
    assert mu.shape == logvar.shape == (10, 8) and mu.dtype == np.float32
    with torch.no_grad():
        reference_mu, reference_logvar = vae.encode(frames_to_tensor(obs))
    np.testing.assert_allclose(mu, reference_mu.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logvar, reference_logvar.numpy(), rtol=1e-5, atol=1e-5)
    single_mu, single_logvar = encode_module.encode_frames(vae, obs[4], "cpu")
    assert single_mu.shape == single_logvar.shape == (8,)
    np.testing.assert_allclose(single_mu, mu[4], rtol=1e-4, atol=1e-5)


def test_encode_writes_valid_latents_and_resumes(episode_run):
    config = episode_run("e", "vae.epochs=1")
    with pytest.raises(DataError, match="train-vae"):
        encode_module.run(config)
    train_vae.run(config)
    summary = encode_module.run(config)
    assert summary["encoded"] == 4 and summary["skipped"] == 0 and summary["frames_encoded"] == 84

    paths = run_paths(config)
    vae = load_vae(paths.vae / "vae.pt")
    for episode in sorted(paths.episodes.glob("*.npz")):
        latents = load_latents(paths.latents / episode.name)  # validates
        with np.load(episode) as data:
            assert latents["mu"].shape == (len(data["obs"]), 32)
            for key in ("actions", "rewards", "terminals"):
                assert np.array_equal(latents[key], data[key])
            mu, logvar = encode_module.encode_frames(vae, data["obs"])
        np.testing.assert_allclose(latents["mu"], mu, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(latents["logvar"], logvar, rtol=1e-5, atol=1e-5)

    broken = paths.latents / "episode_0001.npz"
    broken.write_bytes(b"half a file")
    again = encode_module.run(config)
    assert again["skipped"] == 3 and again["encoded"] == 1
    load_latents(broken)

    # another VAE makes every latents file stale
    retrained = episode_run("e", "vae.epochs=1", "vae.lr=0.002")
    train_vae.run(retrained)
    assert encode_module.run(retrained)["encoded"] == 4


def test_encode_without_episodes_says_to_collect(tmp_path):
    config = tiny_config(tmp_path)
    torch.manual_seed(0)
    save_checkpoint(run_paths(config).vae / "vae.pt", state_dict=ConvVAE().state_dict(), config={})
    with pytest.raises(DataError, match="run.py collect"):
        encode_module.run(config)


# --- plots ---------------------------------------------------------------------------------------------


def test_plot_helpers_write_pngs(tmp_path):
    plot_curves(
        tmp_path / "curves.png", {"a": [3.0, 2.0, 1.0], "b": ([0, 5, 10], [1.0, 2.0, 4.0])}, title="t"
    )
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plot_curves(
        tmp_path / "two_scales.png",
        {"fitness": [-16000.0, -15000.0]},
        right={"return": ([0, 1], [1500.0, 1800.0]), "empty": []},
        right_label="return",
    )
    import matplotlib.image

    assert matplotlib.image.imread(tmp_path / "two_scales.png").shape[:2] == (480, 640)  # the legend below
    image = np.full((4, 6, 3), 200, dtype=np.uint8)
    save_image_grid(tmp_path / "grid.png", [[image, image, image], [image]], pad=1, scale=2)
    grid = matplotlib.image.imread(tmp_path / "grid.png")
    assert grid.shape[:2] == (2 * (2 * (4 + 1) + 1), 2 * (3 * (6 + 1) + 1))


# --- the commands --------------------------------------------------------------------------------------
