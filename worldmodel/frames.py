"""Streaming frame loaders for the VAE: shuffled minibatches in bounded memory, however many episodes there
are.

``shuffled_batches`` visits the episode files in a random order and pours their frames into a fixed-size
shuffle buffer; once the buffer is full, each minibatch is drawn uniformly (without replacement) from it
and the freed slots are refilled from the episode being read. At the end the rest of the buffer is
shuffled and emitted. Memory is the buffer plus one episode, never the data set. Every frame is emitted
exactly once per pass, and the whole pass is a function of the rng's seed, so a resumed epoch can replay
the same stream and skip the batches it already trained on.
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


def count_batches(frames: int, batch_size: int) -> int:
    """Batches of one pass over ``frames`` frames (the last one may be short)."""
    return math.ceil(frames / batch_size)


def _load_obs(path: Path, frame_shape: tuple[int, ...] | None) -> np.ndarray:
    obs = load_episode(path)["obs"]
    if frame_shape is not None and obs.shape[1:] != tuple(frame_shape):
        raise DataError(
            f"{path}: frames have shape {obs.shape[1:]}, expected {tuple(frame_shape)} "
            "(the ConvVAE takes 64x64 RGB frames: collect with env.frame_size=64)"
        )
    return obs


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
) -> Iterator[np.ndarray]:
    """Shuffled uint8 minibatches ``[B, H, W, 3]`` of every frame of ``paths``, holding at most
    ``max(buffer_size, batch_size)`` frames (plus the episode being read)."""
    capacity = max(buffer_size, batch_size)
    buffer: np.ndarray | None = None
    filled = 0
    for index in rng.permutation(len(paths)):
        obs = _load_obs(Path(paths[index]), frame_shape)
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
    paths: Sequence[Path], batch_size: int, frame_shape: tuple[int, ...] | None = None
) -> Iterator[np.ndarray]:
    """Every frame of ``paths`` in file order, in batches of at most ``batch_size`` (never across
    episodes)."""
    for path in paths:
        obs = _load_obs(Path(path), frame_shape)
        for start in range(0, len(obs), batch_size):
            yield obs[start : start + batch_size]
