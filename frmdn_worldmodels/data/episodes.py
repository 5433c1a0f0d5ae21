"""Episodes and latents on disk (layout in docs/architecture.md), with loaders that validate and name the bad
file.

Episode: ``obs`` uint8 [T+1, H, W, 3], ``actions`` float32 [T, A], ``rewards`` float32 [T],
``terminals`` bool [T]; Mario's also ``player`` float32 [T+1, 2], the player's centre (x, y) in the pixels of
each frame, NaN while he is off the screen, and ``enemies`` float32 [T+1, E, 2], the centre of each enemy
slot's sprite, NaN for an empty slot or an enemy off the screen (the first episodes with ``player`` lack
it).
Latents: the same, with ``mu`` and ``logvar`` float32 [T+1, Z] in place of ``obs``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from frmdn_worldmodels.runtime.io import DataError, load_npz, save_npz

EPISODE_KEYS = ("obs", "actions", "rewards", "terminals")
LATENT_KEYS = ("mu", "logvar", "actions", "rewards", "terminals")


def _check_transitions(path: Path, arrays: dict[str, np.ndarray], first: str) -> int:
    """Check actions/rewards/terminals against ``arrays[first]`` (length T+1); return T."""
    lead = arrays[first]
    steps = lead.shape[0] - 1
    if steps < 1:
        raise DataError(f"{path}: {first} has {lead.shape[0]} frames; an episode needs at least 2")
    expected = {
        "actions": (np.float32, 2),
        "rewards": (np.float32, 1),
        "terminals": (np.bool_, 1),
    }
    for key, (dtype, ndim) in expected.items():
        array = arrays[key]
        if array.dtype != dtype:
            raise DataError(f"{path}: {key} has dtype {array.dtype}, expected {np.dtype(dtype)}")
        if array.ndim != ndim or array.shape[0] != steps:
            raise DataError(
                f"{path}: {key} has shape {array.shape}, expected {steps} steps "
                f"(one fewer than the {steps + 1} entries of {first})"
            )
    for key in ("actions", "rewards"):
        if not np.all(np.isfinite(arrays[key])):
            raise DataError(f"{path}: {key} contains NaN or inf")
    return steps


def _require_keys(path: Path, arrays: dict[str, np.ndarray], keys: tuple[str, ...]) -> None:
    missing = [key for key in keys if key not in arrays]
    if missing:
        raise DataError(f"{path}: missing array(s) {', '.join(missing)} (has {', '.join(sorted(arrays))})")


def validate_episode(path: str | Path, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    path = Path(path)
    _require_keys(path, arrays, EPISODE_KEYS)
    obs = arrays["obs"]
    if obs.dtype != np.uint8 or obs.ndim != 4 or obs.shape[-1] != 3:
        raise DataError(
            f"{path}: obs has shape {obs.shape} and dtype {obs.dtype}, expected uint8 [T+1, H, W, 3]"
        )
    _check_transitions(path, arrays, "obs")
    for key, shape in (("player", (obs.shape[0], 2)), ("enemies", (obs.shape[0], None, 2))):
        if key not in arrays:
            continue
        centres = arrays[key]
        if (
            centres.dtype != np.float32
            or centres.ndim != len(shape)
            or any(want is not None and have != want for have, want in zip(centres.shape, shape, strict=True))
        ):
            expected = ", ".join("E" if want is None else str(want) for want in shape)
            raise DataError(
                f"{path}: {key} has shape {centres.shape} and dtype {centres.dtype}, "
                f"expected float32 [{expected}] (an x, y per frame)"
            )
        if np.isinf(centres).any():
            raise DataError(f"{path}: {key} contains inf (NaN marks a frame without the sprite)")
    return arrays


def validate_latents(path: str | Path, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    path = Path(path)
    _require_keys(path, arrays, LATENT_KEYS)
    mu, logvar = arrays["mu"], arrays["logvar"]
    for key, array in (("mu", mu), ("logvar", logvar)):
        if array.dtype != np.float32 or array.ndim != 2:
            raise DataError(
                f"{path}: {key} has shape {array.shape} and dtype {array.dtype}, expected float32 [T+1, Z]"
            )
        if not np.all(np.isfinite(array)):
            raise DataError(f"{path}: {key} contains NaN or inf")
    if mu.shape != logvar.shape:
        raise DataError(f"{path}: mu {mu.shape} and logvar {logvar.shape} differ in shape")
    _check_transitions(path, arrays, "mu")
    return arrays


def episode_arrays(name: str | Path, obs, actions, rewards, terminals, sprites=None) -> dict[str, np.ndarray]:
    """An episode's arrays in the on-disk dtypes, validated (``name`` says which episode in an error).
    ``sprites`` [T+1, 1 + E, 2] (``games.envs.sprite_centres`` of every frame), when given, is stored as
    ``player`` (its first row) and ``enemies`` (the others)."""
    arrays = {
        "obs": np.asarray(obs, dtype=np.uint8),
        "actions": np.asarray(actions, dtype=np.float32),
        "rewards": np.asarray(rewards, dtype=np.float32),
        "terminals": np.asarray(terminals, dtype=np.bool_),
    }
    if arrays["actions"].ndim == 1:
        arrays["actions"] = arrays["actions"][:, None]
    if sprites is not None:
        sprites = np.asarray(sprites, dtype=np.float32)
        if sprites.ndim != 3 or sprites.shape[1] < 1 or sprites.shape[2] != 2:
            raise DataError(f"{name}: sprites has shape {sprites.shape}, expected [T+1, 1 + E, 2]")
        arrays["player"], arrays["enemies"] = sprites[:, 0], sprites[:, 1:]
    return validate_episode(name, arrays)


def save_episode(path: str | Path, obs, actions, rewards, terminals, sprites=None) -> None:
    """Write one episode atomically, in the on-disk dtypes (``sprites`` as in ``episode_arrays``)."""
    save_npz(path, **episode_arrays(path, obs, actions, rewards, terminals, sprites))


def load_episode(path: str | Path) -> dict[str, np.ndarray]:
    return validate_episode(path, load_npz(path))


def save_latents(path: str | Path, mu, logvar, actions, rewards, terminals) -> None:
    arrays = {
        "mu": np.asarray(mu, dtype=np.float32),
        "logvar": np.asarray(logvar, dtype=np.float32),
        "actions": np.asarray(actions, dtype=np.float32),
        "rewards": np.asarray(rewards, dtype=np.float32),
        "terminals": np.asarray(terminals, dtype=np.bool_),
    }
    validate_latents(path, arrays)
    save_npz(path, **arrays)


def load_latents(path: str | Path) -> dict[str, np.ndarray]:
    return validate_latents(path, load_npz(path))


def list_npz(folder: str | Path) -> list[Path]:
    """The complete ``.npz`` files of a folder, sorted (temporary files of an interrupted write are
    skipped)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("*.npz") if not p.name.startswith("."))


def split_by_episode(paths: list[Path], fractions: tuple[float, ...], seed: int) -> list[list[Path]]:
    """Shuffle episodes with ``seed`` and cut them into len(fractions)+1 parts (the last takes the rest).

    Every part with a positive fraction gets at least one episode when there are enough episodes.
    """
    order = np.random.default_rng(seed).permutation(len(paths))
    shuffled = [paths[i] for i in order]
    parts, start = [], 0
    for fraction in fractions:
        count = round(fraction * len(paths))
        if fraction > 0 and count == 0 and len(paths) - start > 1:
            count = 1
        parts.append(shuffled[start : start + count])
        start += count
    parts.append(shuffled[start:])
    return parts
