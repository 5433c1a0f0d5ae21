"""Streaming frame loaders for the VAE: shuffled minibatches in bounded memory, however many episodes there
are.

``shuffled_batches`` visits the episode files in a random order and pours their frames into a fixed-size
shuffle buffer; once the buffer is full, each minibatch is drawn uniformly (without replacement) from it
and the freed slots are refilled from the episode being read. At the end the rest of the buffer is
shuffled and emitted. Memory is the buffer plus one episode, never the data set. Every frame is emitted
exactly once per pass, and the whole pass is a function of the rng's seed, so a resumed epoch can replay
the same stream and skip the batches it already trained on.

With ``sprites=("player", "enemies")`` (or either) each frame carries a fourth channel, the sum of
``SPRITE_BITS[key]`` over the named sprites whose patch (``patch_boxes``) covers a pixel, 0 elsewhere, read
from the episode's arrays of those names, so the patches travel through the shuffle with their frame.
"""

from __future__ import annotations

import math
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from frmdn_worldmodels.data.episodes import load_episode
from frmdn_worldmodels.runtime.config import SPRITE_WEIGHTS
from frmdn_worldmodels.runtime.io import DataError


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


SPRITE_BITS = {"player": 1, "enemies": 2}
"""The bit of each sprite array's patches in the mask channel."""


def _no_positions(path: Path, key: str, also: int = 0) -> DataError:
    others = f" (and {also} more episodes)" if also else ""
    return DataError(
        f"{path}{others}: no {key} positions, which vae.{SPRITE_WEIGHTS[key]} needs (Super Mario Bros "
        "episodes store the player's since 2026-12-05 and the enemies' a few hours later: collect again into "
        f"a new run, or leave vae.{SPRITE_WEIGHTS[key]} at 1)"
    )


def check_sprite_positions(paths: Sequence[Path], keys: Sequence[str]) -> None:
    """Refuse, before any training, episodes without the sprite arrays ``keys`` (read from the zip's
    directory)."""
    if not keys:
        return
    stored: dict[Path, set[str]] = {}
    for path in map(Path, paths):
        try:
            with zipfile.ZipFile(path) as archive:
                stored[path] = set(archive.namelist())
        except Exception:  # noqa: BLE001,S112 - a broken file is named by the loader, with its reason
            continue
    for key in keys:
        missing = [path for path, names in stored.items() if f"{key}.npy" not in names]
        if missing:
            raise _no_positions(missing[0], key, len(missing) - 1)


def count_batches(frames: int, batch_size: int) -> int:
    """Batches of one pass over ``frames`` frames (the last one may be short)."""
    return math.ceil(frames / batch_size)


PATCH_HALF = 4
"""Half the side of a sprite's patch in pixels of the 64 x 64 frame (8 x 8; small Mario and a goomba are about
4 x 4)."""


def patch_boxes(centres: np.ndarray, size: int, half: int = PATCH_HALF) -> np.ndarray:
    """``[N, 4]`` (top, bottom, left, right) of the ``2 half``-pixel square around each (x, y) of ``centres``
    ``[N, 2]`` (pixels, rounded) in a ``size``-pixel square frame; -1 in the rows whose centre is NaN (no
    sprite) or whose square leaves the frame."""
    known = ~np.isnan(centres).any(axis=1)
    x, y = np.round(np.where(known[:, None], centres, 0.0)).astype(int).T
    boxes = np.stack([y - half, y + half, x - half, x + half], axis=1)
    inside = known & (boxes[:, 0] >= 0) & (boxes[:, 1] <= size) & (boxes[:, 2] >= 0) & (boxes[:, 3] <= size)
    boxes[~inside] = -1
    return boxes


def sprite_masks(arrays: dict[str, np.ndarray], keys: Sequence[str], size: int) -> np.ndarray:
    """uint8 ``[N, size, size]``: in each frame, the sum of ``SPRITE_BITS[key]`` over the ``keys`` whose patch
    (``patch_boxes``) of any of the frame's centres ``arrays[key]`` (``[N, 2]`` or ``[N, E, 2]``) covers the
    pixel."""
    frames = len(arrays[keys[0]]) if keys else 0
    masks = np.zeros((frames, size, size), dtype=np.uint8)
    for key in keys:
        centres = arrays[key].reshape(frames, -1, 2)
        layer = np.zeros_like(masks, dtype=bool)
        boxes = patch_boxes(centres.reshape(-1, 2), size).reshape(frames, -1, 4)
        for row, sprite in zip(*np.nonzero(boxes[..., 0] >= 0), strict=True):
            top, bottom, left, right = boxes[row, sprite]
            layer[row, top:bottom, left:right] = True
        masks += layer * np.uint8(SPRITE_BITS[key])
    return masks


def _load_obs(path: Path, frame_shape: tuple[int, ...] | None, sprites: Sequence[str] = ()) -> np.ndarray:
    """The episode's frames ``[T+1, H, W, 3]``, or ``[T+1, H, W, 4]`` with the mask of the ``sprites``'
    patches (``sprite_masks``)."""
    arrays = load_episode(path)
    obs = arrays["obs"]
    if frame_shape is not None and obs.shape[1:] != tuple(frame_shape):
        raise DataError(
            f"{path}: frames have shape {obs.shape[1:]}, expected {tuple(frame_shape)} "
            "(the ConvVAE takes 64x64 RGB frames: collect with env.frame_size=64)"
        )
    if not sprites:
        return obs
    for key in sprites:
        if key not in arrays:
            raise _no_positions(path, key)
    return np.concatenate([obs, sprite_masks(arrays, sprites, obs.shape[1])[..., None]], axis=-1)


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
    sprites: Sequence[str] = (),
) -> Iterator[np.ndarray]:
    """Shuffled uint8 minibatches ``[B, H, W, 3]`` (``[B, H, W, 4]`` with ``sprites``) of every frame of
    ``paths``, holding at most ``max(buffer_size, batch_size)`` frames (plus the episode being read)."""
    capacity = max(buffer_size, batch_size)
    buffer: np.ndarray | None = None
    filled = 0
    for index in rng.permutation(len(paths)):
        obs = _load_obs(Path(paths[index]), frame_shape, sprites)
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
    sprites: Sequence[str] = (),
) -> Iterator[np.ndarray]:
    """Every frame of ``paths`` in file order (with the ``sprites``' mask as a fourth channel), in
    batches of at most ``batch_size`` (never across episodes)."""
    for path in paths:
        obs = _load_obs(Path(path), frame_shape, sprites)
        for start in range(0, len(obs), batch_size):
            yield obs[start : start + batch_size]
