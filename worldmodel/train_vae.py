"""``python run.py train-vae``: fit the ConvVAE (V) to the frames of the collected episodes.

Frames stream from the episode files through a shuffle buffer (``worldmodel.frames``), so memory does not
grow with the data set. Episodes (not frames) are held out for validation, so the validation loss measures
frames of unseen tracks.

Files in ``<run>/vae/``:
- ``checkpoint.pt``: the resumable training state (model, optimiser, epoch, step within the epoch, best
  validation loss, torch CPU RNG state, running sums), written atomically at the end of every epoch and every
  ``vae.checkpoint_every`` optimiser steps within one. A killed run restarts from it: the epoch's shuffled
  stream is a function of (seed, epoch), so the rerun replays it and skips the batches already trained on,
  and loses at most ``checkpoint_every`` steps of work.
- ``vae.pt``: the model with the best validation loss so far (``state_dict`` + ``config``), read by
  ``worldmodel.vae.load_vae``; written only when that loss improves.
- ``metrics.jsonl``: a ``train`` row every ``vae.log_every`` steps and an ``epoch`` row with validation losses.
- ``summary.json``, ``reconstructions.png`` (rows of validation frames over their reconstructions from the
  posterior mean), ``loss.png``.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from worldmodel.config import Config, ConfigError, config_to_dict
from worldmodel.data import list_npz, load_episode, split_by_episode
from worldmodel.frames import count_batches, episode_length, sequential_batches, shuffled_batches
from worldmodel.io import (
    DataError,
    append_jsonl,
    atomic_write_text,
    load_checkpoint,
    read_json,
    read_jsonl,
    save_checkpoint,
    write_json,
)
from worldmodel.plots import plot_curves, save_image_grid
from worldmodel.runs import prepare_stage, run_paths
from worldmodel.vae import ConvVAE, frames_to_tensor, load_vae, tensor_to_frames, vae_loss

FRAME_SHAPE = (64, 64, 3)
LOSS_PARTS = ("loss", "recon", "kl")


class TrainingStopped(RuntimeError):
    """Raised by ``run(..., stop_after_steps=n)``: the run stops as if killed (nothing saved at that moment)."""


def check_vae_config(cfg: Config) -> None:
    vae = cfg.vae
    positive = {"latent_dim": vae.latent_dim, "batch_size": vae.batch_size, "shuffle_buffer": vae.shuffle_buffer,
                "log_every": vae.log_every, "encode_batch": vae.encode_batch}
    for name, value in positive.items():
        if value < 1:
            raise ConfigError(f"vae.{name} must be at least 1, got {value}")
    if vae.epochs < 0 or vae.checkpoint_every < 0:
        raise ConfigError(f"vae.epochs and vae.checkpoint_every must be >= 0, got {vae.epochs}, {vae.checkpoint_every}")
    if not vae.lr > 0:
        raise ConfigError(f"vae.lr must be positive, got {vae.lr}")
    if vae.kl_tolerance < 0:
        raise ConfigError(f"vae.kl_tolerance must be >= 0, got {vae.kl_tolerance}")
    if not 0 <= vae.val_fraction < 1:
        raise ConfigError(f"vae.val_fraction must be in [0, 1), got {vae.val_fraction}")


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


@torch.no_grad()
def evaluate(model: ConvVAE, paths: list[Path], cfg: Config) -> dict[str, float]:
    """Per-frame mean of the training loss over ``paths``, with a fixed noise seed so epochs compare."""
    model.eval()
    generator = torch.Generator(device=cfg.device).manual_seed(cfg.seed)
    sums, frames = np.zeros(len(LOSS_PARTS)), 0
    for batch in sequential_batches(paths, cfg.vae.encode_batch, FRAME_SHAPE):
        x = frames_to_tensor(batch, cfg.device)
        recon, mu, logvar = model(x, generator)
        losses = vae_loss(recon, x, mu, logvar, cfg.vae.kl_tolerance)
        sums += [losses[part].item() * len(batch) for part in LOSS_PARTS]
        frames += len(batch)
    model.train()
    return {part: float(value / max(frames, 1)) for part, value in zip(LOSS_PARTS, sums)}


def pick_frames(paths: list[Path], count: int = 16, max_episodes: int = 4) -> np.ndarray:
    """``count`` frames spread evenly over the first few of ``paths`` (for the reconstruction grid)."""
    obs = np.concatenate([load_episode(path)["obs"] for path in paths[:max_episodes]])
    return obs[np.linspace(0, len(obs) - 1, count).round().astype(int)]


@torch.no_grad()
def save_reconstructions(path: Path, model: ConvVAE, frames: np.ndarray, device: str, per_row: int = 8) -> None:
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
    plot_curves(path, series, xlabel="optimiser step", ylabel="loss per frame",
                title="ConvVAE: summed L2 + KL (free bits)", logy=True)


def run(cfg: Config, *, stop_after_steps: int | None = None) -> dict:
    """Train the VAE (resuming from ``vae/checkpoint.pt``); return the summary.

    ``stop_after_steps`` (for tests of resuming) raises ``TrainingStopped`` once that many optimiser steps
    have been taken in total, without saving anything at that moment, as a kill would.
    """
    check_vae_config(cfg)
    vcfg = cfg.vae
    episodes = find_episodes(cfg)
    out = prepare_stage(cfg, run_paths(cfg).vae)
    checkpoint_path, model_path = out / "checkpoint.pt", out / "vae.pt"
    metrics_path, summary_path = out / "metrics.jsonl", out / "summary.json"

    state = load_checkpoint(checkpoint_path) if checkpoint_path.exists() else None
    if state is not None and state["config"]["vae"]["latent_dim"] != vcfg.latent_dim:
        raise ConfigError(
            f"{checkpoint_path} was trained with vae.latent_dim={state['config']['vae']['latent_dim']}, "
            f"not {vcfg.latent_dim}: use another --set name=... or delete {out}"
        )
    if state is not None and state["epoch"] >= vcfg.epochs and model_path.exists() and summary_path.exists():
        return read_json(summary_path)  # already trained: the pipeline reruns stages

    val_paths, train_paths = split_by_episode(episodes, (vcfg.val_fraction,), cfg.seed)
    if not train_paths:
        raise ConfigError(f"vae.val_fraction={vcfg.val_fraction} leaves no training episodes of {len(episodes)}")
    train_frames = sum(episode_length(path) for path in train_paths)
    val_frames = sum(episode_length(path) for path in val_paths)
    batches_per_epoch = count_batches(train_frames, vcfg.batch_size)
    shown_frames = pick_frames(val_paths or train_paths)

    torch.manual_seed(cfg.seed)
    model = ConvVAE(vcfg.latent_dim).to(cfg.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=vcfg.lr)
    epoch, step_in_epoch, global_step = 0, 0, 0
    best_val, best_epoch, seconds = math.inf, 0, 0.0
    epoch_sums, epoch_frames = np.zeros(len(LOSS_PARTS)), 0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        for group in optimizer.param_groups:
            group["lr"] = vcfg.lr  # a rerun may change the learning rate
        torch.set_rng_state(state["rng"])
        epoch, step_in_epoch, global_step = state["epoch"], state["step_in_epoch"], state["global_step"]
        best_val, best_epoch, seconds = state["best_val"], state["best_epoch"], state["seconds"]
        epoch_sums, epoch_frames = np.array(state["epoch_sums"]), state["epoch_frames"]
        # rows logged after the checkpoint would be logged again by the rerun
        rows = [row for row in read_jsonl(metrics_path) if row["step"] <= global_step]
        atomic_write_text(metrics_path, "".join(json.dumps(row) + "\n" for row in rows))
        print(f"resuming VAE training at epoch {epoch + 1}, step {step_in_epoch} of {batches_per_epoch}",
              file=sys.stderr)  # stdout is the summary's JSON
    elif metrics_path.exists():
        metrics_path.unlink()  # a fresh start: the old metrics describe another run

    def save_state() -> None:
        save_checkpoint(
            checkpoint_path, model=model.state_dict(), optimizer=optimizer.state_dict(), rng=torch.get_rng_state(),
            epoch=epoch, step_in_epoch=step_in_epoch, global_step=global_step, best_val=best_val,
            best_epoch=best_epoch, seconds=seconds, epoch_sums=epoch_sums.tolist(), epoch_frames=epoch_frames,
            config=config_to_dict(cfg),
        )

    model.train()
    while epoch < vcfg.epochs:
        stream = shuffled_batches(
            train_paths, vcfg.batch_size, vcfg.shuffle_buffer, np.random.default_rng([cfg.seed, epoch]), FRAME_SHAPE
        )
        bar = tqdm(total=batches_per_epoch, initial=step_in_epoch, desc=f"vae epoch {epoch + 1}/{vcfg.epochs}",
                   unit="batch", dynamic_ncols=True)
        started = time.perf_counter()
        for index, batch in enumerate(stream):
            if index < step_in_epoch:
                continue  # replaying the epoch's stream up to where the checkpoint left it
            x = frames_to_tensor(batch, cfg.device)
            recon, mu, logvar = model(x)
            losses = vae_loss(recon, x, mu, logvar, vcfg.kl_tolerance)
            optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            optimizer.step()

            step_in_epoch, global_step = step_in_epoch + 1, global_step + 1
            values = [losses[part].item() for part in LOSS_PARTS]
            epoch_sums += np.array(values) * len(batch)
            epoch_frames += len(batch)
            bar.update()
            bar.set_postfix(loss=f"{values[0]:.1f}", recon=f"{values[1]:.1f}", kl=f"{values[2]:.1f}")
            if global_step % vcfg.log_every == 0:
                append_jsonl(metrics_path, {"kind": "train", "step": global_step,
                                            "epoch": epoch + step_in_epoch / batches_per_epoch,
                                            **dict(zip(LOSS_PARTS, values))})
            if vcfg.checkpoint_every and step_in_epoch % vcfg.checkpoint_every == 0:
                seconds += time.perf_counter() - started
                started = time.perf_counter()
                save_state()
            if stop_after_steps is not None and global_step >= stop_after_steps:
                bar.close()
                raise TrainingStopped(f"stopped after {global_step} steps (test hook)")
        bar.close()
        seconds += time.perf_counter() - started

        train_means = {part: float(value / max(epoch_frames, 1)) for part, value in zip(LOSS_PARTS, epoch_sums)}
        val = evaluate(model, val_paths, cfg) if val_paths else None
        epoch, step_in_epoch = epoch + 1, 0
        epoch_sums, epoch_frames = np.zeros(len(LOSS_PARTS)), 0
        row = {"kind": "epoch", "step": global_step, "epoch": epoch,
               **{f"train_{part}": value for part, value in train_means.items()},
               **{f"val_{part}": (val[part] if val else None) for part in LOSS_PARTS},
               "seconds": seconds}
        append_jsonl(metrics_path, row)
        score = val["loss"] if val else train_means["loss"]  # no held-out episodes: the training loss decides
        if score < best_val:
            best_val, best_epoch = score, epoch
            save_checkpoint(model_path, state_dict=model.state_dict(), config=config_to_dict(cfg),
                            epoch=epoch, val_loss=score)
        save_state()
        save_reconstructions(out / "reconstructions.png", model, shown_frames, cfg.device)
        save_loss_plot(out / "loss.png", read_jsonl(metrics_path))
        tqdm.write(f"vae epoch {epoch}/{vcfg.epochs}: train loss {train_means['loss']:.2f}"
                   + (f", validation loss {val['loss']:.2f}" if val else ""), file=sys.stderr)

    if not model_path.exists():  # zero epochs asked for: keep the untrained model so later stages can run
        save_checkpoint(model_path, state_dict=model.state_dict(), config=config_to_dict(cfg), epoch=0,
                        val_loss=None)
    best = load_vae(model_path, cfg.device)
    save_reconstructions(out / "reconstructions.png", best, shown_frames, cfg.device)
    rows = read_jsonl(metrics_path)
    save_loss_plot(out / "loss.png", rows)
    last_epoch = next((row for row in reversed(rows) if row["kind"] == "epoch"), {})
    best_row = next((row for row in rows if row["kind"] == "epoch" and row["epoch"] == best_epoch), {})
    summary = {
        "epochs": epoch,
        "steps": global_step,
        "train_episodes": len(train_paths),
        "val_episodes": len(val_paths),
        "train_frames": train_frames,
        "val_frames": val_frames,
        "best_epoch": best_epoch,
        "val_loss": best_row.get("val_loss"),
        "val_recon": best_row.get("val_recon"),
        "val_kl": best_row.get("val_kl"),
        "train_loss": last_epoch.get("train_loss"),
        "train_seconds": round(seconds, 2),
        "train_frames_per_s": round(epoch * train_frames / seconds, 1) if seconds > 0 else None,
        "vae": str(model_path),
        "reconstructions": str(out / "reconstructions.png"),
        "loss_plot": str(out / "loss.png"),
    }
    write_json(summary_path, summary)
    return summary
