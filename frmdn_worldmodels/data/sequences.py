r"""The memory's data: encoded episodes cut into fixed-length windows of (z_t, a_t) -> (z_{t+1}, r_t, done_t).

An episode with T transitions holds ``mu``/``logvar`` [T+1, Z] and ``actions``/``rewards``/``terminals`` [T].
It is cut into ceil(T / L) windows of L transitions; window j covers transitions s = jL .. jL+L-1 and keeps
the L+1 frames z_s .. z_{s+L} (consecutive windows share one frame). The last window is padded with zeros and
its ``mask`` is False on the padding, so no padded step ever enters a loss.

With ``memory_train.carry_state`` (truncated backpropagation through time) the windows are read in *lanes*:
the episodes are dealt to B lanes once (the longest first, each to the lane with the fewest windows so far),
each epoch shuffles the order of the episodes within every lane, and batch i holds the i-th window of every
lane, so window j + 1 of an episode comes one batch after window j and starts from the LSTM state it ended in
(``reset`` is true where a window starts an episode, or pads a lane that has run out).

Each epoch draws a fresh posterior sample :math:`z = \mu + e^{\log\sigma^2/2}\,\epsilon` (as World Models
does), or uses :math:`\mu` itself when asked. Validation and test use one fixed sample, the same for every run
with the same seed, so test NLLs of different models are comparable.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from frmdn_worldmodels.data.episodes import list_npz, load_latents, split_by_episode
from frmdn_worldmodels.models.vae import posterior_sample
from frmdn_worldmodels.runtime.io import DataError
from frmdn_worldmodels.runtime.seeds import seeded_rng

SPLITS = ("train", "val", "test")


@dataclass
class SequenceSet:
    """Windows of L transitions from a list of episodes, stacked (N windows)."""

    mu: np.ndarray
    """[N, L+1, Z] posterior means."""
    logvar: np.ndarray
    """[N, L+1, Z] posterior log-variances."""
    actions: np.ndarray
    """[N, L, A] a_t."""
    rewards: np.ndarray
    """[N, L] r_t, the reward of transition t."""
    dones: np.ndarray
    """[N, L] bool: the episode ended with transition t."""
    mask: np.ndarray
    """[N, L] bool: False on the padding of an episode's last window."""
    episodes: list[str]
    """File names of the episodes, in order."""
    episode: np.ndarray
    """[N] which episode (index into ``episodes``) each window comes from."""
    window: np.ndarray
    """[N] each window's place in its episode (0 for its first)."""

    def __len__(self) -> int:
        return self.mu.shape[0]

    @property
    def latent_dim(self) -> int:
        return self.mu.shape[-1]

    @property
    def action_dim(self) -> int:
        return self.actions.shape[-1]

    @property
    def steps(self) -> int:
        """Number of real (unpadded) transitions."""
        return int(self.mask.sum())

    def latents(self, use_mu: bool, rng: np.random.Generator) -> np.ndarray:
        """z for every window: mu, or mu + exp(logvar / 2) * eps with eps drawn from ``rng``."""
        if use_mu:
            return self.mu
        eps = rng.standard_normal(self.mu.shape, dtype=np.float32)
        return posterior_sample(self.mu, self.logvar, eps)

    def batches(
        self, z: np.ndarray, order: np.ndarray, batch_size: int, device: torch.device | str = "cpu"
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Batches of windows in ``order``: y [B, L+1, Z], cond [B, L, A], rewards, dones, mask [B, L]."""
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            yield {
                "y": torch.from_numpy(z[index]).to(device),
                "cond": torch.from_numpy(self.actions[index]).to(device),
                "rewards": torch.from_numpy(self.rewards[index]).to(device),
                "dones": torch.from_numpy(self.dones[index]).to(device),
                "mask": torch.from_numpy(self.mask[index]).to(device),
            }

    def num_batches(self, batch_size: int) -> int:
        return math.ceil(len(self) / batch_size)

    def lanes(self, count: int) -> list[list[int]]:
        """The episodes dealt to ``min(count, episodes)`` lanes, the longest first, each to the lane with the
        fewest windows so far (so the lanes end together)."""
        sizes = np.bincount(self.episode, minlength=len(self.episodes))
        lanes: list[list[int]] = [[] for _ in range(min(count, len(self.episodes)))]
        loads = np.zeros(len(lanes), np.int64)
        for episode in np.argsort(-sizes, kind="stable"):
            lane = int(np.argmin(loads))
            lanes[lane].append(int(episode))
            loads[lane] += sizes[episode]
        return lanes

    def lane_schedule(self, lanes: list[list[int]], rng: np.random.Generator | None = None) -> np.ndarray:
        """[S, lanes] the window each lane reads at each step (-1: the lane has run out): every lane's
        episodes (in an order drawn from ``rng``, or as listed), each episode's windows in order."""
        starts = np.flatnonzero(self.window == 0)  # windows of an episode are stored consecutively
        sizes = np.bincount(self.episode, minlength=len(self.episodes))
        rows = []
        for lane in lanes:
            order = lane if rng is None else [lane[i] for i in rng.permutation(len(lane))]
            rows.append(np.concatenate([starts[e] + np.arange(sizes[e]) for e in order]))
        schedule = np.full((max(len(row) for row in rows), len(rows)), -1, np.int64)
        for column, row in enumerate(rows):
            schedule[: len(row), column] = row
        return schedule

    def lane_batches(
        self, z: np.ndarray, schedule: np.ndarray, start: int = 0, device: torch.device | str = "cpu"
    ) -> Iterator[dict[str, torch.Tensor]]:
        """The batches of ``lane_schedule`` from step ``start`` on, as ``batches`` gives them, with ``reset``
        [B] (true where the window starts an episode or pads a run-out lane: its LSTM state starts at 0)."""
        for index in schedule[start:]:
            empty = index < 0
            safe = np.where(empty, 0, index)
            mask = self.mask[safe] & ~empty[:, None]
            yield {
                "y": torch.from_numpy(z[safe]).to(device),
                "cond": torch.from_numpy(self.actions[safe]).to(device),
                "rewards": torch.from_numpy(self.rewards[safe]).to(device),
                "dones": torch.from_numpy(self.dones[safe]).to(device),
                "mask": torch.from_numpy(mask).to(device),
                "reset": torch.from_numpy(empty | (self.window[safe] == 0)).to(device),
            }


def spread_terminals(terminals: np.ndarray, horizon: int) -> np.ndarray:
    """done_t = any(terminals[t : t + horizon]): true on the ``horizon`` steps up to each terminal one."""
    ends = np.flatnonzero(terminals)
    dones = np.zeros_like(terminals, dtype=np.bool_)
    for end in ends:
        dones[max(0, end - horizon + 1) : end + 1] = True
    return dones


def chunk_episode(
    arrays: dict[str, np.ndarray], seq_len: int, done_horizon: int = 1
) -> dict[str, np.ndarray]:
    """Cut one episode's latents into ceil(T / seq_len) windows (layout of :class:`SequenceSet`), the done
    targets spread over ``done_horizon`` steps (``spread_terminals``)."""
    steps = arrays["actions"].shape[0]
    count = math.ceil(steps / seq_len)
    padded = count * seq_len

    def pad(array: np.ndarray, length: int) -> np.ndarray:
        out = np.zeros((length, *array.shape[1:]), dtype=array.dtype)
        out[: array.shape[0]] = array
        return out

    frames = {key: pad(arrays[key], padded + 1) for key in ("mu", "logvar")}
    moves = {key: pad(arrays[key], padded) for key in ("actions", "rewards")}
    moves["terminals"] = pad(spread_terminals(arrays["terminals"], done_horizon), padded)
    mask = pad(np.ones(steps, dtype=np.bool_), padded)
    starts = np.arange(count) * seq_len
    frame_index = starts[:, None] + np.arange(seq_len + 1)
    step_index = starts[:, None] + np.arange(seq_len)
    return {
        "mu": frames["mu"][frame_index],
        "logvar": frames["logvar"][frame_index],
        "actions": moves["actions"][step_index],
        "rewards": moves["rewards"][step_index],
        "dones": moves["terminals"][step_index],
        "mask": mask[step_index],
    }


def load_sequences(paths: list[Path], seq_len: int, done_horizon: int = 1) -> SequenceSet:
    """Load and window the latent files ``paths`` (every file must have the same Z and A), the done targets
    spread over ``done_horizon`` steps."""
    if seq_len < 1:
        raise ValueError(f"memory_train.seq_len must be >= 1, got {seq_len}")
    parts: list[dict[str, np.ndarray]] = []
    shapes: tuple[int, int] | None = None
    for number, path in enumerate(paths):
        arrays = load_latents(path)
        shape = (arrays["mu"].shape[1], arrays["actions"].shape[1])
        if shapes is not None and shape != shapes:
            raise DataError(
                f"{path}: latent/action sizes {shape} differ from the other episodes' {shapes}; "
                "were the latents encoded by different VAEs? Rerun `python run.py encode`."
            )
        shapes = shape
        part = chunk_episode(arrays, seq_len, done_horizon)
        windows = len(part["mask"])
        parts.append({**part, "episode": np.full(windows, number), "window": np.arange(windows)})
    if not parts:
        raise DataError("no episodes to load")
    stacked = {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}
    return SequenceSet(**stacked, episodes=[Path(p).name for p in paths])


def split_latent_files(
    folder: Path, val_fraction: float, test_fraction: float, seed: int
) -> dict[str, list[Path]]:
    """The latent files of ``folder`` split by episode into train / val / test (seeded, reproducible)."""
    paths = list_npz(folder)
    if not paths:
        raise DataError(
            f"no latents in {folder}: run `python run.py encode` first (after collect and train-vae)"
        )
    for name, fraction in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0 <= fraction < 1:
            raise ValueError(f"memory_train.{name} must be in [0, 1), got {fraction}")
    val, test, train = split_by_episode(paths, (val_fraction, test_fraction), seed)
    split = {"train": sorted(train), "val": sorted(val), "test": sorted(test)}
    for name, fraction in (("train", 1.0), ("val", val_fraction), ("test", test_fraction)):
        if fraction > 0 and not split[name]:
            raise DataError(
                f"{folder} holds {len(paths)} episode(s): too few for a train/val/test split by episode "
                f"(val_fraction={val_fraction}, test_fraction={test_fraction}); collect more episodes "
                "(collect.episodes) or set memory_train.test_fraction=0"
            )
    return split


def fixed_sample_rng(seed: int, split: str) -> np.random.Generator:
    """The generator of the one posterior sample used to score ``split`` (same for every model of a run)."""
    return seeded_rng(seed, "memory-score", SPLITS.index(split))


def epoch_rngs(seed: int, epoch: int) -> tuple[np.random.Generator, np.random.Generator]:
    """Generators of epoch ``epoch``'s posterior sample and batch order: a resumed epoch replays them
    exactly."""
    return seeded_rng(seed, None, epoch, 0), seeded_rng(seed, None, epoch, 1)
