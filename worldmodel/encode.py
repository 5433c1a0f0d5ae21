"""``python run.py encode``: every episode through the trained VAE, to ``<run>/latents/<same name>.npz``.

Each latents file holds mu and logvar of q(z|x) for every frame (including the last, so the memory has a
target for the final transition) and the episode's actions, rewards and terminals unchanged. The memory
trains on fresh draws z = mu + exp(logvar / 2) * eps, so both moments are kept, not a single sample.

Resumable: a latents file that exists, validates and is newer than ``vae/vae.pt`` is kept; a missing,
broken or stale one (the VAE was retrained after it was written) is encoded again.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from tqdm import tqdm

from worldmodel.config import Config
from worldmodel.data import load_episode, load_latents, save_latents
from worldmodel.io import DataError, write_json
from worldmodel.runs import prepare_stage, run_paths
from worldmodel.train_vae import check_vae_config, find_episodes
from worldmodel.vae import ConvVAE, frames_to_tensor, load_vae


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


def _is_current(path, vae_mtime: float) -> bool:
    """A latents file that validates and was written after the VAE it came from."""
    if not path.exists() or path.stat().st_mtime < vae_mtime:
        return False
    try:
        load_latents(path)
    except DataError:
        return False
    return True


def run(cfg: Config) -> dict:
    """Encode every episode of the run that has no current latents file; return the summary."""
    check_vae_config(cfg)
    paths = run_paths(cfg)
    vae_path = paths.vae / "vae.pt"
    if not vae_path.exists():
        raise DataError(f"{vae_path}: no trained VAE; run `python run.py train-vae` first")
    episodes = find_episodes(cfg)
    out = prepare_stage(cfg, paths.latents)
    vae = load_vae(vae_path, cfg.device)
    vae_mtime = vae_path.stat().st_mtime

    todo = [episode for episode in episodes if not _is_current(out / episode.name, vae_mtime)]
    frames, started = 0, time.perf_counter()
    bar = tqdm(todo, desc="encode", unit="episode", dynamic_ncols=True)
    for episode in bar:
        data = load_episode(episode)
        if data["obs"].shape[1:] != (64, 64, 3):
            raise DataError(f"{episode}: frames have shape {data['obs'].shape[1:]}, the ConvVAE takes (64, 64, 3)")
        mu, logvar = encode_frames(vae, data["obs"], cfg.device, cfg.vae.encode_batch)
        save_latents(out / episode.name, mu, logvar, data["actions"], data["rewards"], data["terminals"])
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
    write_json(out / "summary.json", summary)
    return summary
