"""``python run.py encode``: every episode through the trained VAE, to ``<run>/latents/<same name>.npz``.

Each latents file holds mu and logvar of q(z|x) for every frame (including the last, so the memory has a
target for the final transition) and the episode's actions, rewards and terminals unchanged. The memory
trains on fresh draws z = mu + exp(logvar / 2) * eps, so both moments are kept, not a single sample.

Resumable: a latents file that exists and validates is kept, a missing or broken one is encoded again. The
stage records the VAE and the episodes it was made from (``runtime.records``): with another VAE every file
is encoded again.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from frmdn_worldmodels.data.episodes import load_episode, load_latents, save_latents
from frmdn_worldmodels.models.vae import ConvVAE, frames_to_tensor, load_vae
from frmdn_worldmodels.runtime.config import Config
from frmdn_worldmodels.runtime.io import DataError
from frmdn_worldmodels.runtime.paths import run_paths
from frmdn_worldmodels.runtime.progress import progress
from frmdn_worldmodels.runtime.records import Stage
from frmdn_worldmodels.runtime.rules import check_rules
from frmdn_worldmodels.stages.train_vae import find_episodes


@torch.inference_mode()
def encode_frames(
    vae: ConvVAE, obs: np.ndarray, device: str | torch.device = "cpu", batch_size: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """(mu, logvar) float32 numpy of uint8 frames ``[N, 64, 64, 3]`` -> ``[N, Z]`` each, or one frame
    ``[64, 64, 3]`` -> ``[Z]`` each; ``batch_size`` frames per forward pass."""
    obs = np.asarray(obs)
    if obs.ndim == 3:
        mu, logvar = encode_frames(vae, obs[None], device, batch_size)
        return mu[0], logvar[0]
    mus, logvars = [], []
    for start in range(0, len(obs), batch_size):
        mu, logvar = vae.encode(frames_to_tensor(obs[start : start + batch_size], device))
        mus.append(mu.float().cpu().numpy())
        logvars.append(logvar.float().cpu().numpy())
    if not mus:
        empty = np.zeros((0, vae.latent_dim), dtype=np.float32)
        return empty, empty.copy()
    return np.concatenate(mus), np.concatenate(logvars)


def _is_valid(path) -> bool:
    if not path.exists():
        return False
    try:
        load_latents(path)
    except DataError:
        return False
    return True


def run(cfg: Config) -> dict:
    """Encode every episode of the run that has no current latents file; return the summary."""
    check_rules(cfg, "vae")
    paths = run_paths(cfg)
    vae_path = paths.vae / "vae.pt"
    if not vae_path.exists():
        raise DataError(f"{vae_path}: no trained VAE; run `python run.py train-vae` first")
    episodes = find_episodes(cfg)
    stage = Stage(cfg, "encode")
    stage.open()  # even when finished, every file is checked again: a broken one is encoded again
    out = stage.folder
    vae = load_vae(vae_path, cfg.device)

    todo = [episode for episode in episodes if not _is_valid(out / episode.name)]
    frames, started = 0, time.perf_counter()
    bar = progress(todo, desc="encode", unit="episode")
    for episode in bar:
        data = load_episode(episode)
        if data["obs"].shape[1:] != (64, 64, 3):
            raise DataError(
                f"{episode}: frames have shape {data['obs'].shape[1:]}, the ConvVAE takes (64, 64, 3)"
            )
        mu, logvar = encode_frames(vae, data["obs"], cfg.device, cfg.vae.encode_batch)
        save_latents(out / episode.name, mu, logvar, data["actions"], data["rewards"], data["terminals"])
        stage.record_progress()
        frames += len(mu)
        bar.set_postfix(frames=frames)
    bar.close()
    seconds = time.perf_counter() - started
    summary = {
        "episodes": len(episodes),
        "encoded": len(todo),
        "skipped": len(episodes) - len(todo),
        "frames_encoded": frames,
        "seconds": round(seconds, 2),
        "frames_per_s": round(frames / seconds, 1) if frames and seconds > 0 else None,
        "latents": str(out),
    }
    return stage.finish(summary)
