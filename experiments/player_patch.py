"""Does V draw the player and the enemies? On Super Mario Bros episodes played by the RAM expert, V's
reconstruction error in the patch around Mario and in those around the enemies (placed from the game's RAM,
never from the frame) against its error over the rest of the frame, and sheets of close-ups: originals above
their reconstructions from the posterior mean.

    .venv/bin/python experiments/player_patch.py --config configs/mario-hour-expert.yaml [--set name=...]
        [--episodes 4] [--vae PATH]

Writes ``<run>/player_patch/summary.json`` (also printed), ``closeups.png`` (Mario) and
``enemy_closeups.png``. ``ratio`` is the player patch's mean squared error over the rest's (``enemy_ratio``
the enemies'): a V that leaves Mario out has a patch error several times the rest's; one that draws him, near
it. The rest is every pixel outside all patches. The episodes are the expert's (``collect.expert_noise`` of
the config) on seeds of their own, so the frames are like V's training data but not among them.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from run_args import run_parser  # noqa: E402 (the script's folder)

from frmdn_worldmodels.data.frames import PATCH_HALF, SPRITE_BITS, patch_boxes, sprite_masks  # noqa: E402 (sys.path)
from frmdn_worldmodels.games.envs import make_env  # noqa: E402 (sys.path)
from frmdn_worldmodels.games.policies import make_exploration_policy  # noqa: E402 (sys.path)
from frmdn_worldmodels.models.vae import ConvVAE, frames_to_tensor, load_vae, tensor_to_frames  # noqa: E402 (sys.path)
from frmdn_worldmodels.runtime.config import Config, ConfigError, load_config  # noqa: E402 (sys.path)
from frmdn_worldmodels.runtime.io import DataError, write_json  # noqa: E402 (sys.path)
from frmdn_worldmodels.runtime.paths import run_paths  # noqa: E402 (sys.path)
from frmdn_worldmodels.runtime.plots import save_image_grid  # noqa: E402 (sys.path)
from frmdn_worldmodels.runtime.seeds import seed_ints  # noqa: E402 (sys.path)
from frmdn_worldmodels.stages.collect import collect_env_config, rollout_episode  # noqa: E402 (sys.path)

SPRITES = ("player", "enemies")


def play(cfg: Config, episodes: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Frames ``[N, S, S, 3]`` of ``episodes`` expert episodes and where the sprites are in each (the
    episodes' ``player`` [N, 2] and ``enemies`` [N, E, 2]: x, y in pixels of the frame, NaN off the
    screen)."""
    env_cfg = collect_env_config(cfg)
    collect = dataclasses.replace(cfg.collect, policy="ram_expert")
    frames, centres = [], {key: [] for key in SPRITES}
    for index in range(episodes):
        env_seed, policy_seed = seed_ints(cfg.seed, "player-patch", index, count=2)
        env = make_env(env_cfg)
        try:
            policy = make_exploration_policy(env_cfg, collect, np.random.default_rng(policy_seed), env)
            arrays = rollout_episode(env, env_cfg, policy, int(env_seed))
        finally:
            env.close()
        frames.append(arrays["obs"])
        for key in SPRITES:
            centres[key].append(arrays[key])
    return np.concatenate(frames), {key: np.concatenate(value) for key, value in centres.items()}


def patch_errors(frames: np.ndarray, recon: np.ndarray, masks: np.ndarray) -> dict:
    """Mean squared error (pixels in [0, 1]) inside the player's patches, inside the enemies' and over the
    pixels outside every patch, from the sprite ``masks`` ``[N, S, S]`` (``data.frames.sprite_masks``)
    of the frames; ``frames`` and ``enemy_frames`` count the frames with each kind of patch."""
    player, enemies = (masks & SPRITE_BITS[key] != 0 for key in SPRITES)
    if not player.any():
        raise DataError("player_patch: Mario was off the screen in every frame")
    squared = (((recon.astype(np.float64) - frames) / 255.0) ** 2).mean(axis=-1)
    player_mse, rest_mse = float(squared[player].mean()), float(squared[masks == 0].mean())
    enemy_mse = float(squared[enemies].mean()) if enemies.any() else None

    def ratio(mse: float | None) -> float | None:  # None: a perfect reconstruction outside the patches
        return mse / rest_mse if mse is not None and rest_mse > 0 else None

    return {
        "frames": int(player.any(axis=(1, 2)).sum()),
        "player_mse": player_mse,
        "enemy_frames": int(enemies.any(axis=(1, 2)).sum()),
        "enemy_mse": enemy_mse,
        "rest_mse": rest_mse,
        "ratio": ratio(player_mse),
        "enemy_ratio": ratio(enemy_mse),
    }


def first_on_screen(centres: np.ndarray) -> np.ndarray:
    """``[N, 2]``: the first of each frame's ``[N, E, 2]`` centres that is on the screen (NaN if none)."""
    known = ~np.isnan(centres).any(axis=2)
    first = np.where(known.any(axis=1), known.argmax(axis=1), 0)
    return np.where(known.any(axis=1)[:, None], centres[np.arange(len(centres)), first], np.nan)


@torch.no_grad()
def reconstruct(vae: ConvVAE, frames: np.ndarray, batch: int = 64) -> np.ndarray:
    """Each frame decoded from its posterior mean."""
    out = []
    for start in range(0, len(frames), batch):
        mu, _ = vae.encode(frames_to_tensor(frames[start : start + batch]))
        out.append(tensor_to_frames(vae.decode(mu)))
    return np.concatenate(out)


def closeups(
    frames: np.ndarray, recon: np.ndarray, boxes: np.ndarray, count: int = 8
) -> list[list[np.ndarray]]:
    """Rows of crops (four patch sides wide) around ``boxes`` (``patch_boxes``): originals above
    reconstructions, ``count`` frames spread over those with a box."""
    kept = np.flatnonzero(boxes[:, 0] >= 0)
    chosen = kept[np.linspace(0, len(kept) - 1, min(count, len(kept))).round().astype(int)]
    size, side = frames.shape[1], 4 * PATCH_HALF

    def crop(image: np.ndarray, box: np.ndarray) -> np.ndarray:
        top = int(np.clip((box[0] + box[1]) // 2 - side // 2, 0, size - side))
        left = int(np.clip((box[2] + box[3]) // 2 - side // 2, 0, size - side))
        return image[top : top + side, left : left + side]

    return [[crop(images[i], boxes[i]) for i in chosen] for images in (frames, recon)]


def main(argv: list[str] | None = None) -> int:
    parser = run_parser(__doc__)
    parser.add_argument("--episodes", type=int, default=4, help="expert episodes to play (default 4)")
    parser.add_argument("--vae", help="a V checkpoint (default: the run's vae/vae.pt)")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        if cfg.env.name != "mario":
            raise ConfigError(f"env.name is {cfg.env.name!r}: the player's position is read from Mario's RAM")
        if args.episodes < 1:
            raise ConfigError(f"--episodes must be at least 1, got {args.episodes}")
        path = Path(args.vae) if args.vae else run_paths(cfg).vae / "vae.pt"
        vae = load_vae(path)
    except (ConfigError, DataError) as error:
        print(f"player_patch: {error}", file=sys.stderr)
        return 2
    frames, centres = play(cfg, args.episodes)
    recon = reconstruct(vae, frames)
    size = frames.shape[1]
    masks = sprite_masks(centres, SPRITES, size)
    out = run_paths(cfg).root / "player_patch"
    summary = {"vae": str(path), "episodes": args.episodes, **patch_errors(frames, recon, masks)}
    save_image_grid(
        out / "closeups.png", closeups(frames, recon, patch_boxes(centres["player"], size)), scale=4
    )
    enemy_boxes = patch_boxes(first_on_screen(centres["enemies"]), size)
    if (enemy_boxes[:, 0] >= 0).any():
        save_image_grid(out / "enemy_closeups.png", closeups(frames, recon, enemy_boxes), scale=4)
    write_json(out / "summary.json", summary)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
