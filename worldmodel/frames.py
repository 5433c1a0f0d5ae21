"""Streaming frame loaders for the VAE: shuffled minibatches in bounded memory, however many episodes there
are.

``shuffled_batches`` visits the episode files in a random order and pours their frames into a fixed-size
shuffle buffer; once the buffer is full, each minibatch is drawn uniformly (without replacement) from it
and the freed slots are refilled from the episode being read. At the end the rest of the buffer is
shuffled and emitted. Memory is the buffer plus one episode, never the data set. Every frame is emitted
exactly once per pass, and the whole pass is a function of the rng's seed, so a resumed epoch can replay
the same stream and skip the batches it already trained on.

With ``player=True`` each frame carries a fourth channel, 1 in the player's patch (``player_boxes``) and 0
elsewhere, read from the episode's ``player`` array, so the patch travels through the shuffle with its frame.
"""

from __future__ import annotations

import math
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from worldmodel.data import load_episode
from worldmodel.io import DataError


def episode_length(path: str | Path) -> int:
    """Number of frames (T+1) of an episode file, read from the ``obs`` header without decompressing it."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive, archive.open("obs.npy") as handle:
            version = np.lib.format.read_magic(handle)
            if version == (1, 0):
                shape, _, _ = np.lib.format.read_array_header_1_0(handle)
            else:
                shape, _, _ = np.lib.format.read_array_header_2_0(handle)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except KeyError:
        raise DataError(f"{path}: no obs array (is this an episode file?)") from None
    except Exception as error:  # noqa: BLE001 - BadZipFile, a damaged header...: all mean a broken file
        raise DataError(f"{path}: unreadable episode ({type(error).__name__}: {error})") from None
    if len(shape) != 4:
        raise DataError(f"{path}: obs has shape {shape}, expected [T+1, H, W, 3]")
    return int(shape[0])


def _no_player(path: Path, also: int = 0) -> DataError:
    others = f" (and {also} more episodes)" if also else ""
    return DataError(
        f"{path}{others}: no player positions, which vae.player_weight needs (Super Mario Bros episodes "
        "store them since 2026-12-05: collect again into a new run, or leave vae.player_weight at 1)"
    )


def check_player_positions(paths: Sequence[Path]) -> None:
    """Refuse, before any training, episodes without a ``player`` array (read from the zip's directory)."""
    missing = []
    for path in map(Path, paths):
        try:
            with zipfile.ZipFile(path) as archive:
                if "player.npy" not in archive.namelist():
                    missing.append(path)
        except Exception:  # noqa: BLE001,S112 - a broken file is named by the loader, with its reason
            continue
    if missing:
        raise _no_player(missing[0], len(missing) - 1)


def count_batches(frames: int, batch_size: int) -> int:
    """Batches of one pass over ``frames`` frames (the last one may be short)."""
    return math.ceil(frames / batch_size)


PLAYER_HALF = 4
"""Half the side of the player's patch in pixels of the 64 x 64 frame (8 x 8; small Mario is about 4 x 4)."""


def player_boxes(player: np.ndarray, size: int, half: int = PLAYER_HALF) -> np.ndarray:
    """``[N, 4]`` (top, bottom, left, right) of the ``2 half``-pixel square around each (x, y) centre of
    ``player`` (pixels, rounded) in a ``size``-pixel square frame; -1 in the rows whose centre is NaN (no
    player) or whose square leaves the frame."""
    known = ~np.isnan(player).any(axis=1)
    x, y = np.round(np.where(known[:, None], player, 0.0)).astype(int).T
    boxes = np.stack([y - half, y + half, x - half, x + half], axis=1)
    inside = known & (boxes[:, 0] >= 0) & (boxes[:, 1] <= size) & (boxes[:, 2] >= 0) & (boxes[:, 3] <= size)
    boxes[~inside] = -1
    return boxes


def player_masks(player: np.ndarray, size: int) -> np.ndarray:
    """uint8 ``[N, size, size]``: 1 inside each frame's player box (``player_boxes``), 0 elsewhere."""
    masks = np.zeros((len(player), size, size), dtype=np.uint8)
    for row, (top, bottom, left, right) in enumerate(player_boxes(player, size)):
        masks[row, top:bottom, left:right] = 1  # a -1 row slices nothing
    return masks


def _load_obs(path: Path, frame_shape: tuple[int, ...] | None, player: bool = False) -> np.ndarray:
    """The episode's frames ``[T+1, H, W, 3]``, or ``[T+1, H, W, 4]`` with the player's mask (``player``)."""
    arrays = load_episode(path)
    obs = arrays["obs"]
    if frame_shape is not None and obs.shape[1:] != tuple(frame_shape):
        raise DataError(
            f"{path}: frames have shape {obs.shape[1:]}, expected {tuple(frame_shape)} "
            "(the ConvVAE takes 64x64 RGB frames: collect with env.frame_size=64)"
        )
    if not player:
        return obs
    if "player" not in arrays:
        raise _no_player(path)
    return np.concatenate([obs, player_masks(arrays["player"], obs.shape[1])[..., None]], axis=-1)


def _drop_slots(buffer: np.ndarray, filled: int, slots: np.ndarray) -> int:
    """Remove ``slots`` from ``buffer[:filled]`` by moving surviving tail frames into the holes; new fill."""
    remaining = filled - len(slots)
    holes_in_front = slots[slots < remaining]
    tail = np.arange(remaining, filled)
    survivors = tail[~np.isin(tail, slots)]
    buffer[holes_in_front] = buffer[survivors]
    return remaining


def shuffled_batches(
    paths: Sequence[Path],
    batch_size: int,
    buffer_size: int,
    rng: np.random.Generator,
    frame_shape: tuple[int, ...] | None = None,
    player: bool = False,
) -> Iterator[np.ndarray]:
    """Shuffled uint8 minibatches ``[B, H, W, 3]`` (``[B, H, W, 4]`` with ``player``) of every frame of
    ``paths``, holding at most ``max(buffer_size, batch_size)`` frames (plus the episode being read)."""
    capacity = max(buffer_size, batch_size)
    buffer: np.ndarray | None = None
    filled = 0
    for index in rng.permutation(len(paths)):
        obs = _load_obs(Path(paths[index]), frame_shape, player)
        if buffer is None:
            buffer = np.empty((capacity, *obs.shape[1:]), dtype=np.uint8)
        elif obs.shape[1:] != buffer.shape[1:]:
            raise DataError(
                f"{paths[index]}: frames have shape {obs.shape[1:]}, other episodes {buffer.shape[1:]}"
            )
        read = 0
        while read < len(obs):
            if filled < capacity:
                take = min(capacity - filled, len(obs) - read)
                buffer[filled : filled + take] = obs[read : read + take]
                filled, read = filled + take, read + take
                continue
            slots = rng.choice(capacity, size=batch_size, replace=False)
            batch = buffer[slots]  # fancy indexing copies, so refilling the slots below is safe
            take = min(batch_size, len(obs) - read)
            buffer[slots[:take]] = obs[read : read + take]
            read += take
            if take < batch_size:  # the episode ran out: close the holes it could not fill
                filled = _drop_slots(buffer, filled, slots[take:])
            yield batch
    if filled:
        order = rng.permutation(filled)
        for start in range(0, filled, batch_size):
            yield buffer[order[start : start + batch_size]]


def sequential_batches(
    paths: Sequence[Path],
    batch_size: int,
    frame_shape: tuple[int, ...] | None = None,
    player: bool = False,
) -> Iterator[np.ndarray]:
    """Every frame of ``paths`` in file order (with the player's mask as a fourth channel with ``player``), in
    batches of at most ``batch_size`` (never across episodes)."""
    for path in paths:
        obs = _load_obs(Path(path), frame_shape, player)
        for start in range(0, len(obs), batch_size):
            yield obs[start : start + batch_size]
