"""Atomic files, validated episodes/latents and checkpoints that load with weights_only=True."""

import errno
import os

import numpy as np
import pytest
import torch

from frmdn_worldmodels.data.episodes import (
    list_npz,
    load_episode,
    load_latents,
    save_episode,
    save_latents,
    split_by_episode,
)
from frmdn_worldmodels.runtime.io import (
    DataError,
    append_jsonl,
    load_checkpoint,
    read_jsonl,
    save_checkpoint,
    save_npz,
)


def _episode(steps=5, actions=3):
    rng = np.random.default_rng(0)
    return {
        "obs": rng.integers(0, 255, (steps + 1, 8, 8, 3), dtype=np.uint8),
        "actions": rng.normal(size=(steps, actions)).astype(np.float32),
        "rewards": rng.normal(size=steps).astype(np.float32),
        "terminals": np.eye(1, steps, steps - 1, dtype=bool)[0],
    }


def test_episode_round_trip_and_no_temp_files_left(tmp_path):
    episode = _episode()
    save_episode(tmp_path / "ep.npz", **episode)
    loaded = load_episode(tmp_path / "ep.npz")
    for key, value in episode.items():
        np.testing.assert_array_equal(loaded[key], value)
    assert [p.name for p in tmp_path.iterdir()] == ["ep.npz"]
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "ep.npz").stat().st_mode & 0o777 == 0o666 & ~umask


def test_the_sprites_positions_are_stored_with_nan_off_the_screen(tmp_path):
    player = np.array([[1.5, 2.0], [np.nan, np.nan], [3, 4], [5, 6], [7, 8], [9, 10]], dtype=np.float64)
    enemies = np.arange(6 * 3 * 2, dtype=np.float64).reshape(6, 3, 2)
    enemies[2, 1] = np.nan
    sprites = np.concatenate([player[:, None], enemies], axis=1)
    save_episode(tmp_path / "ep.npz", **_episode(), sprites=sprites)
    loaded = load_episode(tmp_path / "ep.npz")
    assert loaded["player"].dtype == loaded["enemies"].dtype == np.float32
    np.testing.assert_array_equal(loaded["player"], player.astype(np.float32))  # NaN where NaN
    np.testing.assert_array_equal(loaded["enemies"], enemies.astype(np.float32))
    with pytest.raises(DataError, match="ep.npz: sprites has shape \\(6, 2\\)"):
        save_episode(tmp_path / "ep.npz", **_episode(), sprites=player)


def test_truncated_episode_is_reported_by_name(tmp_path):
    save_episode(tmp_path / "ep.npz", **_episode())
    data = (tmp_path / "ep.npz").read_bytes()
    (tmp_path / "ep.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="ep.npz"):
        load_episode(tmp_path / "ep.npz")


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("obs", np.zeros((6, 8, 8, 3), dtype=np.float32), "obs"),
        ("actions", np.zeros((4, 3), dtype=np.float32), "actions"),
        ("rewards", np.zeros(5, dtype=np.float64), "rewards"),
        ("terminals", np.zeros(5, dtype=np.int64), "terminals"),
        ("rewards", np.full(5, np.nan, dtype=np.float32), "NaN"),
        ("player", np.zeros((5, 2), dtype=np.float32), "player has shape"),
        ("player", np.zeros((6, 2), dtype=np.float64), "player has shape"),
        ("player", np.full((6, 2), np.inf, dtype=np.float32), "player contains inf"),
        ("enemies", np.zeros((6, 2), dtype=np.float32), r"enemies has shape \(6, 2\).*\[6, E, 2\]"),
        ("enemies", np.zeros((5, 3, 2), dtype=np.float32), "enemies has shape"),
        ("enemies", np.zeros((6, 3, 3), dtype=np.float32), "enemies has shape"),
        ("enemies", np.full((6, 3, 2), -np.inf, dtype=np.float32), "enemies contains inf"),
    ],
)
def test_bad_episode_layout_names_the_array(tmp_path, key, value, fragment):
    episode = _episode()
    episode[key] = value
    save_npz(tmp_path / "bad.npz", **episode)
    with pytest.raises(DataError, match=fragment) as info:
        load_episode(tmp_path / "bad.npz")
    assert "bad.npz" in str(info.value)


def test_latents_validate(tmp_path):
    episode = _episode()
    mu = np.zeros((6, 4), np.float32)
    save_latents(tmp_path / "l.npz", mu, mu, episode["actions"], episode["rewards"], episode["terminals"])
    assert load_latents(tmp_path / "l.npz")["mu"].shape == (6, 4)
    with pytest.raises(DataError, match="logvar"):
        save_latents(
            tmp_path / "m.npz", mu, mu[:, :3], episode["actions"], episode["rewards"], episode["terminals"]
        )


def test_list_npz_skips_temporary_files(tmp_path):
    save_episode(tmp_path / "ep_00000.npz", **_episode())
    (tmp_path / ".ep_00001.npz.abc.tmp").write_bytes(b"half")
    assert [p.name for p in list_npz(tmp_path)] == ["ep_00000.npz"]


def test_split_is_disjoint_complete_and_seeded():
    paths = [f"e{i}" for i in range(20)]
    parts = split_by_episode(paths, (0.1, 0.1), seed=3)
    assert sorted(p for part in parts for p in part) == sorted(paths)
    assert [len(p) for p in parts] == [2, 2, 16]
    assert parts == split_by_episode(paths, (0.1, 0.1), seed=3)
    assert all(len(p) >= 1 for p in split_by_episode(paths[:4], (0.05, 0.05), seed=0))


def test_checkpoint_round_trip_with_weights_only(tmp_path):
    state = {"w": torch.randn(3, 2)}
    save_checkpoint(tmp_path / "c.pt", state_dict=state, config={"a": 1, "b": [0.5, None]}, epoch=3)
    payload = load_checkpoint(tmp_path / "c.pt")
    assert torch.equal(payload["state_dict"]["w"], state["w"]) and payload["epoch"] == 3
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match="broken.pt"):
        load_checkpoint(tmp_path / "broken.pt")
    with pytest.raises(DataError, match="missing.pt"):
        load_checkpoint(tmp_path / "missing.pt")


class Unlisted:
    """A class that a weights_only load must refuse to rebuild."""


def test_checkpoint_refuses_code_objects(tmp_path):
    torch.save({"obj": Unlisted()}, tmp_path / "evil.pt")
    with pytest.raises(DataError, match="evil.pt"):
        load_checkpoint(tmp_path / "evil.pt")


def test_jsonl_survives_a_torn_last_line(tmp_path):
    append_jsonl(tmp_path / "m.jsonl", {"step": 1})
    append_jsonl(tmp_path / "m.jsonl", {"step": 2})
    with open(tmp_path / "m.jsonl", "a") as handle:
        handle.write('{"step": 3, "lo')
    assert [row["step"] for row in read_jsonl(tmp_path / "m.jsonl")] == [1, 2]


def test_a_full_disk_names_the_file_and_leaves_nothing_that_looks_whole(tmp_path, monkeypatch, run_main):
    """ENOSPC mid-write: no file and no temporary left, the error names the file being written, and a
    command ends with that message (exit code 1), not a traceback."""

    from frmdn_worldmodels import cli

    real_fdopen = os.fdopen

    class Full:
        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fdopen", lambda fd, mode: Full(real_fdopen(fd, mode)))
    target = tmp_path / "episodes" / "ep_00001.npz"
    with pytest.raises(OSError) as raised:
        save_episode(target, **_episode())
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(target)
    assert list(target.parent.iterdir()) == []

    monkeypatch.setattr(cli, "resolve", lambda name: lambda cfg: save_episode(target, **_episode()))
    result = run_main("collect", "--set", f"runs_dir={tmp_path / 'runs'}")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"the disk is full ({target}; nothing half-written is kept)" in result.stderr
