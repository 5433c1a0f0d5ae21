"""``python run.py train-vae``: fit the ConvVAE (V) to the frames of the collected episodes.

Frames stream from the episode files through a shuffle buffer (``data.frames``), so memory does not
grow with the data set. Episodes (not frames) are held out for validation, so the validation loss measures
frames of unseen tracks.

Files in ``<run>/vae/``:
- ``checkpoint.pt``: the resumable training state (model, optimiser, epoch, step within the epoch, best
  validation loss, torch CPU RNG state, running sums), written atomically at the end of every epoch and every
  ``vae.checkpoint_every`` optimiser steps within one. A killed run restarts from it: the epoch's shuffled
  stream is a function of (seed, epoch), so the rerun replays it and skips the batches already trained on,
  and loses at most ``checkpoint_every`` steps of work.
- ``vae.pt``: the model with the best validation loss so far (``state_dict`` + ``config``), read by
  ``frmdn_worldmodels.models.vae.load_vae``; written only when that loss improves.
- ``metrics.jsonl``: a ``train`` row every ``vae.log_every`` steps and an ``epoch`` row with validation
  losses.
- ``summary.json``, ``reconstructions.png`` (rows of validation frames over their reconstructions from the
  posterior mean), ``loss.png``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from frmdn_worldmodels.data.episodes import list_npz, load_episode, split_by_episode
from frmdn_worldmodels.data.frames import (
    SPRITE_BITS,
    check_sprite_positions,
    count_batches,
    episode_length,
    sequential_batches,
    shuffled_batches,
)
from frmdn_worldmodels.models.vae import ConvVAE, frames_to_tensor, load_vae, tensor_to_frames, vae_loss
from frmdn_worldmodels.runtime.config import SPRITE_WEIGHTS, Config, ConfigError, config_to_dict
from frmdn_worldmodels.runtime.io import (
    DataError,
    save_checkpoint,
)
from frmdn_worldmodels.runtime.paths import run_paths
from frmdn_worldmodels.runtime.plots import plot_curves, save_image_grid
from frmdn_worldmodels.runtime.records import Stage, file_digest
from frmdn_worldmodels.runtime.rules import check_rules
from frmdn_worldmodels.runtime.seeds import seeded_rng
from frmdn_worldmodels.train.loop import LoopSettings, TrainTask
from frmdn_worldmodels.train.loop import train as train_loop

FRAME_SHAPE = (64, 64, 3)
LOSS_PARTS = ("loss", "recon", "kl")


def find_episodes(cfg: Config) -> list[Path]:
    """The run's episode files, or a DataError telling the user to collect them."""
    folder = run_paths(cfg).episodes
    episodes = list_npz(folder)
    if not episodes:
        raise DataError(
            f"no episodes in {folder}: run `python run.py collect` first "
            f"(with the same --config and --set name=/runs_dir= as this command)"
        )
    return episodes


def sprite_weights(cfg: Config) -> dict[str, float]:
    """The weight of each sprite array's patches (``data.frames.SPRITE_BITS``) that is not 1."""
    weights = {key: getattr(cfg.vae, field) for key, field in SPRITE_WEIGHTS.items()}
    return {key: weight for key, weight in weights.items() if weight != 1}


def loss_inputs(batch: np.ndarray, cfg: Config) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(frames ``[B, 3, H, W]``, pixel weights ``[B, 1, H, W]`` or None) of a loader batch: in each sprite's
    patch (the batch's fourth channel, ``data.frames.sprite_masks``) the largest of the weights
    ``sprite_weights`` of the sprites covering the pixel, 1 elsewhere."""
    weights = sprite_weights(cfg)
    if not weights:
        return frames_to_tensor(batch, cfg.device), None
    x = frames_to_tensor(batch[..., :3], cfg.device)
    mask = torch.from_numpy(np.ascontiguousarray(batch[..., 3])).to(cfg.device)[:, None]
    weight = torch.ones(mask.shape, device=cfg.device)
    for key, value in weights.items():
        covered = (mask & SPRITE_BITS[key]) != 0
        weight = torch.where(covered, torch.clamp(weight, min=value), weight)
    return x, weight


@torch.no_grad()
def evaluate(model: ConvVAE, paths: list[Path], cfg: Config) -> dict[str, float]:
    """Per-frame mean of the training loss over ``paths``, with a fixed noise seed so epochs compare."""
    model.eval()
    generator = torch.Generator(device=cfg.device).manual_seed(cfg.seed)
    sums, frames = np.zeros(len(LOSS_PARTS)), 0
    for batch in sequential_batches(paths, cfg.vae.encode_batch, FRAME_SHAPE, tuple(sprite_weights(cfg))):
        x, weight = loss_inputs(batch, cfg)
        recon, mu, logvar = model(x, generator)
        losses = vae_loss(recon, x, mu, logvar, cfg.vae.kl_tolerance, weight)
        sums += [losses[part].item() * len(batch) for part in LOSS_PARTS]
        frames += len(batch)
    model.train()
    return {part: float(value / max(frames, 1)) for part, value in zip(LOSS_PARTS, sums)}


def pick_frames(paths: list[Path], count: int = 16, max_episodes: int = 4) -> np.ndarray:
    """``count`` frames spread evenly over the first few of ``paths`` (for the reconstruction grid)."""
    obs = np.concatenate([load_episode(path)["obs"] for path in paths[:max_episodes]])
    return obs[np.linspace(0, len(obs) - 1, count).round().astype(int)]


@torch.no_grad()
def save_reconstructions(
    path: Path, model: ConvVAE, frames: np.ndarray, device: str, per_row: int = 8
) -> None:
    """Rows of originals, each above its reconstruction decoded from the posterior mean."""
    model.eval()
    mu, _ = model.encode(frames_to_tensor(frames, device))
    recon = tensor_to_frames(model.decode(mu))
    model.train()
    rows = []
    for start in range(0, len(frames), per_row):
        rows += [list(frames[start : start + per_row]), list(recon[start : start + per_row])]
    save_image_grid(path, rows, scale=2)


def save_loss_plot(path: Path, rows: list[dict]) -> None:
    train = [row for row in rows if row["kind"] == "train"]
    epochs = [row for row in rows if row["kind"] == "epoch"]
    series = {"train loss": ([r["step"] for r in train], [r["loss"] for r in train])}
    if epochs and epochs[0].get("val_loss") is not None:
        series["validation loss"] = ([r["step"] for r in epochs], [r["val_loss"] for r in epochs])
    plot_curves(
        path,
        series,
        xlabel="optimiser step",
        ylabel="loss per frame",
        title="ConvVAE: summed L2 + KL (free bits)",
        logy=True,
    )


@dataclass
class VaeData:
    """The run's episodes split for the VAE."""

    train_paths: list[Path]
    val_paths: list[Path]
    """Held-out episodes (``vae.val_fraction``), so validation scores frames of unseen tracks."""
    train_frames: int
    val_frames: int
    shown_frames: np.ndarray
    """The frames of ``reconstructions.png`` (``pick_frames``, from the validation episodes if any)."""


def first_frames(paths: list[Path], limit: int) -> list[Path]:
    """The shortest prefix of ``paths`` with at least ``limit`` frames (all of them if they hold fewer)."""
    total = 0
    for count, path in enumerate(paths):
        if total >= limit:
            return paths[:count]
        total += episode_length(path)
    return paths


def split_episodes(cfg: Config, episodes: list[Path]) -> VaeData:
    """Hold out ``vae.val_fraction`` of ``episodes`` (a ConfigError if none is left for training); with
    ``vae.max_frames``, keep the first episodes of each part (they are shuffled) up to its share of frames."""
    fraction = cfg.vae.val_fraction
    val_paths, train_paths = split_by_episode(episodes, (fraction,), cfg.seed)
    if not train_paths:
        raise ConfigError(f"vae.val_fraction={fraction} leaves no training episodes of {len(episodes)}")
    if cfg.vae.max_frames:
        train_paths = first_frames(train_paths, cfg.vae.max_frames)
        val_paths = first_frames(val_paths, math.ceil(cfg.vae.max_frames * fraction / (1 - fraction)))
    return VaeData(
        train_paths,
        val_paths,
        sum(episode_length(path) for path in train_paths),
        sum(episode_length(path) for path in val_paths),
        pick_frames(val_paths or train_paths),
    )


def vae_task(cfg: Config, model: ConvVAE, data: VaeData, out: Path) -> TrainTask:
    """The VAE's batches, losses, validation, best model (``vae.pt``) and pictures for ``train.loop.train``:
    epoch e's shuffled stream is a function of (seed, e)."""
    vcfg = cfg.vae

    def epoch_batches(epoch: int, start: int):
        stream = shuffled_batches(
            data.train_paths,
            vcfg.batch_size,
            vcfg.shuffle_buffer,
            seeded_rng(cfg.seed, None, epoch),
            FRAME_SHAPE,
            tuple(sprite_weights(cfg)),
        )
        # the epoch's stream is replayed up to where a checkpoint left it (frames are cheap to read)
        return (loss_inputs(batch, cfg) for index, batch in enumerate(stream) if index >= start)

    def losses(
        model: ConvVAE, batch: tuple[torch.Tensor, torch.Tensor | None]
    ) -> tuple[dict[str, torch.Tensor], int]:
        x, weight = batch
        recon, mu, logvar = model(x)
        return vae_loss(recon, x, mu, logvar, vcfg.kl_tolerance, weight), len(x)

    def save_best(epoch: int, val_loss: float | None) -> None:
        save_checkpoint(
            out / "vae.pt",
            state_dict=model.state_dict(),
            config=config_to_dict(cfg),
            epoch=epoch,
            val_loss=val_loss,
        )

    def after_epoch(rows: list[dict]) -> None:
        save_reconstructions(out / "reconstructions.png", model, data.shown_frames, cfg.device)
        save_loss_plot(out / "loss.png", rows)

    return TrainTask(
        epoch_batches=epoch_batches,
        batches_per_epoch=count_batches(data.train_frames, vcfg.batch_size),
        losses=losses,
        validate=lambda model: evaluate(model, data.val_paths, cfg) if data.val_paths else None,
        score="loss",
        save_best=save_best,
        after_epoch=after_epoch,
        shown=LOSS_PARTS,
    )


def run(cfg: Config, *, initial: Path | None = None, stop_after_steps: int | None = None) -> dict:
    """Train the VAE (resuming from ``vae/checkpoint.pt``); return the summary.

    ``initial``: a ``vae.pt`` whose weights training starts from (iterative training), one of the stage's
    inputs.

    ``stop_after_steps``: see ``train.loop.train`` (a test hook that stops the run as a kill would).
    """
    check_rules(cfg, "vae")
    episodes = find_episodes(cfg)
    check_sprite_positions(episodes, tuple(sprite_weights(cfg)))
    inputs = {"initial": file_digest(initial)} if initial is not None else None
    stage = Stage(cfg, "train-vae", inputs=inputs)
    if (finished := stage.open()) is not None:
        return finished  # already trained: the pipeline reruns stages
    out = stage.folder
    model_path = out / "vae.pt"
    data = split_episodes(cfg, episodes)

    torch.manual_seed(cfg.seed)
    model = ConvVAE(cfg.vae.latent_dim).to(cfg.device)
    if initial is not None:
        model.load_state_dict(load_vae(initial, cfg.device).state_dict())
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.vae.lr)
    task = vae_task(cfg, model, data, out)
    settings = LoopSettings.of(cfg.vae, tensorboard=cfg.tensorboard, name="vae")
    result = train_loop(
        model,
        optimizer,
        task,
        settings,
        out,
        stage.fingerprint,
        stop_after_steps=stop_after_steps,
        on_checkpoint=stage.record_progress,
    )
    state, rows = result.state, result.rows

    best = load_vae(model_path, cfg.device)
    save_reconstructions(out / "reconstructions.png", best, data.shown_frames, cfg.device)
    save_loss_plot(out / "loss.png", rows)
    last_epoch = next((row for row in reversed(rows) if row["kind"] == "epoch"), {})
    best_row = result.epoch_row(state["best_epoch"])
    seconds = state["seconds"]
    summary = {
        "epochs": state["epoch"],
        "steps": state["global_step"],
        "train_episodes": len(data.train_paths),
        "val_episodes": len(data.val_paths),
        "train_frames": data.train_frames,
        "val_frames": data.val_frames,
        "best_epoch": state["best_epoch"],
        "val_loss": best_row.get("val_loss"),
        "val_recon": best_row.get("val_recon"),
        "val_kl": best_row.get("val_kl"),
        "train_loss": last_epoch.get("train_loss"),
        "skipped_steps": state["skipped_steps"],
        "stopped_early": result.stopped_early,
        "train_seconds": round(seconds, 2),
        "train_frames_per_s": round(state["epoch"] * data.train_frames / seconds, 1) if seconds > 0 else None,
        "vae": str(model_path),
        "reconstructions": str(out / "reconstructions.png"),
        "loss_plot": str(out / "loss.png"),
    }
    return stage.finish(summary)
