r"""``python run.py train-memory``: fit the memory M (RMDN / FRMDN) to the encoded latent sequences.

At step t the memory reads :math:`(z_t, a_t)` and is scored on :math:`z_{t+1}`, :math:`r_t` and
:math:`\mathrm{done}_t`; the loss per step is

.. math::
    \frac{1}{d}\,\mathrm{NLL}(z_{t+1}) + w_r (\hat r_t - r_t)^2 + w_d\,\mathrm{BCE}_{p}(\hat d_t, \mathrm{done}_t),

with the done loss's positive weight p = negatives / positives of the training split unless configured.
Episodes (not windows) are split into train / val / test; z is a fresh posterior sample every epoch (or the
VAE mean with ``memory_train.use_mu``); validation and test use one fixed sample (see ``worldmodel.sequences``).

A step whose loss or gradient is not finite, or that would leave a non-finite parameter or optimiser state,
is skipped (the model is restored), counted and logged; no checkpoint is ever written with a non-finite value.

Files in the output folder (``<run>/memory/``, or one per cell of ``--sweep table1``):
- ``checkpoint.pt``: the resumable state (model, optimiser, epoch, step within it, best validation NLL,
  patience counter, running sums), written atomically every epoch and every ``checkpoint_every`` steps. The
  epoch's posterior sample and batch order are functions of (seed, epoch), so a resumed run replays them and
  goes on from the saved step: a killed run loses at most ``checkpoint_every`` steps.
- ``memory.pt``: the model with the best validation NLL (``MemoryModel.to_checkpoint()`` + ``done_pos_weight``,
  ``epoch``, ``val_nll``); the untrained model is scored first, so this file exists after the first epoch starts.
- ``metrics.jsonl`` (``train``, ``epoch`` and ``skipped`` rows), ``summary.json``, ``nll.png``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from worldmodel.config import Config, ConfigError, save_config
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
from worldmodel.memory import MemoryModel
from worldmodel.plots import plot_curves
from worldmodel.runs import prepare_stage, run_paths
from worldmodel.sequences import (
    SPLITS,
    SequenceSet,
    epoch_rngs,
    fixed_sample_rng,
    load_sequences,
    split_latent_files,
)

LOSS_PARTS = ("loss", "nll", "nll_per_dim", "reward_loss", "done_loss")
# memory_train fields that change neither the trained model nor its scores (a finished run stays finished)
NEUTRAL_TRAIN_FIELDS = ("checkpoint_every", "log_every", "sweep_kinds", "sweep_components", "sweep_ranks")


class TrainingStopped(RuntimeError):
    """Raised by ``train_memory(..., stop_after_steps=n)``: the run stops as if killed (nothing saved then)."""


def check_memory_train_config(cfg: Config) -> None:
    tc = cfg.memory_train
    for name in ("batch_size", "seq_len", "log_every"):
        if getattr(tc, name) < 1:
            raise ConfigError(f"memory_train.{name} must be at least 1, got {getattr(tc, name)}")
    for name in ("epochs", "patience", "max_steps_per_epoch", "checkpoint_every", "grad_clip", "done_pos_weight",
                 "reward_weight", "done_weight"):
        if getattr(tc, name) < 0:
            raise ConfigError(f"memory_train.{name} must be >= 0, got {getattr(tc, name)}")
    if not tc.lr > 0:
        raise ConfigError(f"memory_train.lr must be positive, got {tc.lr}")
    if tc.optimizer not in ("adam", "rmsprop"):
        raise ConfigError(f"memory_train.optimizer must be 'adam' or 'rmsprop', got {tc.optimizer!r}")
    for name in ("val_fraction", "test_fraction"):
        if not 0 <= getattr(tc, name) < 1:
            raise ConfigError(f"memory_train.{name} must be in [0, 1), got {getattr(tc, name)}")
    if tc.val_fraction + tc.test_fraction >= 1:
        raise ConfigError("memory_train.val_fraction + test_fraction must leave episodes for training")


def make_optimizer(model: torch.nn.Module, name: str, lr: float) -> torch.optim.Optimizer:
    if name == "rmsprop":
        return torch.optim.RMSprop(model.parameters(), lr=lr)
    return torch.optim.Adam(model.parameters(), lr=lr)


def parameter_counts(model: MemoryModel) -> dict[str, int]:
    """Trainable parameters in total and per part (the flow is 0 for the RMDN)."""
    parts = {
        "lstm": model.lstm,
        "mixture_head": model.mixture_head,
        "flow": model.flow,
        "reward_head": model.reward_head,
        "done_head": model.done_head,
    }
    counts = {name: sum(p.numel() for p in part.parameters()) if part is not None else 0 for name, part in parts.items()}
    counts["total"] = sum(p.numel() for p in model.parameters())
    return counts


def done_weight_from_data(train: SequenceSet) -> tuple[float, int]:
    """negatives / positives of the done targets of the training split (1 when there is no positive)."""
    positives = int((train.dones & train.mask).sum())
    negatives = train.steps - positives
    return (negatives / positives if positives else 1.0), positives


def _all_finite(tensors) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors if torch.is_tensor(t) and t.is_floating_point())


def _optimizer_tensors(optimizer: torch.optim.Optimizer):
    for state in optimizer.state.values():
        yield from state.values()


def optimisation_step(
    model: MemoryModel, optimizer: torch.optim.Optimizer, batch: dict, cfg: Config, done_pos_weight: float
) -> tuple[dict[str, float], str | None]:
    """One guarded step: returns the batch's losses and, if the step was skipped, why."""
    tc = cfg.memory_train
    optimizer.zero_grad(set_to_none=True)
    losses = model.sequence_loss(
        batch["y"], batch["cond"], batch["rewards"], batch["dones"], batch["mask"],
        done_pos_weight=done_pos_weight, reward_weight=tc.reward_weight, done_weight=tc.done_weight,
    )
    values = {part: losses[part].item() for part in LOSS_PARTS}
    if not math.isfinite(values["loss"]):
        return values, "non-finite loss"
    losses["loss"].backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip if tc.grad_clip > 0 else math.inf)
    if not math.isfinite(norm.item()):
        optimizer.zero_grad(set_to_none=True)
        return values, "non-finite gradient"
    # Finite gradients can still overflow the update or Adam's second moment (e.g. no clipping and a huge lr).
    model_before = {name: value.clone() for name, value in model.state_dict().items()}
    optimizer_before = copy.deepcopy(optimizer.state_dict())
    optimizer.step()
    if not (_all_finite(model.parameters()) and _all_finite(_optimizer_tensors(optimizer))):
        model.load_state_dict(model_before)
        optimizer.load_state_dict(optimizer_before)
        return values, "non-finite parameters after the step"
    return values, None


@torch.no_grad()
def evaluate(model: MemoryModel, data: SequenceSet, z: np.ndarray, cfg: Config, done_pos_weight: float) -> dict:
    """Mean losses per real (unpadded) step over every window of ``data``, with latents ``z``."""
    was_training = model.training
    model.eval()
    totals = dict.fromkeys(LOSS_PARTS, 0.0)
    steps = 0
    tc = cfg.memory_train
    for batch in data.batches(z, np.arange(len(data)), 4 * tc.batch_size, cfg.device):
        losses = model.sequence_loss(
            batch["y"], batch["cond"], batch["rewards"], batch["dones"], batch["mask"],
            done_pos_weight=done_pos_weight, reward_weight=tc.reward_weight, done_weight=tc.done_weight,
        )
        count = int(batch["mask"].sum())
        for part in LOSS_PARTS:
            totals[part] += losses[part].item() * count
        steps += count
    model.train(was_training)
    return {part: value / max(steps, 1) for part, value in totals.items()}


def save_nll_plot(path: Path, rows: list[dict], title: str) -> None:
    epochs = [row for row in rows if row["kind"] == "epoch"]
    trained = [row for row in epochs if row.get("train_nll_per_dim") is not None]
    series = {"train": ([r["epoch"] for r in trained], [r["train_nll_per_dim"] for r in trained])}
    scored = [row for row in epochs if row.get("val_nll_per_dim") is not None]
    if scored:
        series["validation"] = ([r["epoch"] for r in scored], [r["val_nll_per_dim"] for r in scored])
    plot_curves(path, series, xlabel="epoch", ylabel="NLL per latent dimension (nats)", title=title)


def _finite_or_none(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _train_fingerprint(cfg: Config) -> dict:
    values = dataclasses.asdict(cfg.memory_train)
    return {key: value for key, value in values.items() if key not in NEUTRAL_TRAIN_FIELDS}


def _split_names(split: dict[str, list[Path]]) -> dict[str, list[str]]:
    return {name: [path.name for path in paths] for name, paths in split.items()}


def finished_summary(cfg: Config, out_dir: Path, split: dict[str, list[Path]] | None = None) -> dict | None:
    """The summary of a finished run of this model, config and data in ``out_dir``, else None."""
    path = out_dir / "summary.json"
    if not path.exists():
        return None
    try:
        summary = read_json(path)
    except DataError:
        return None
    if split is None:
        tc = cfg.memory_train
        split = split_latent_files(run_paths(cfg).latents, tc.val_fraction, tc.test_fraction, cfg.seed)
    same = (
        summary.get("memory_config") == dataclasses.asdict(cfg.memory)
        and summary.get("train_config") == _train_fingerprint(cfg)
        and summary.get("split") == _split_names(split)
        and summary.get("seed") == cfg.seed
    )
    return summary if same else None


def run(cfg: Config, *, stop_after_steps: int | None = None) -> dict:
    """``python run.py train-memory``: train the memory into ``<run>/memory/`` and return the summary."""
    check_memory_train_config(cfg)
    tc = cfg.memory_train
    # fail on missing latents before creating any folder
    split_latent_files(run_paths(cfg).latents, tc.val_fraction, tc.test_fraction, cfg.seed)
    out = prepare_stage(cfg, run_paths(cfg).memory)
    return train_memory(cfg, out, stop_after_steps=stop_after_steps)


def train_memory(
    cfg: Config, out_dir: Path, *, progress: bool = True, stop_after_steps: int | None = None
) -> dict:
    """Train ``MemoryModel(Z, A, cfg.memory)`` on the run's latents into ``out_dir`` (resumable); return the summary.

    ``progress`` shows progress bars and redraws ``nll.png`` every epoch (the sweep's cells draw it once, at the
    end). ``stop_after_steps`` (for tests of resuming) raises ``TrainingStopped`` once that many optimiser steps
    have been taken in total, without saving anything at that moment, as a kill would.
    """
    check_memory_train_config(cfg)
    tc = cfg.memory_train
    split = split_latent_files(run_paths(cfg).latents, tc.val_fraction, tc.test_fraction, cfg.seed)
    summary = finished_summary(cfg, out_dir, split)
    if summary is not None:
        return summary  # already trained: the pipeline (and the sweep) rerun stages

    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir / "config.yaml")
    checkpoint_path, model_path = out_dir / "checkpoint.pt", out_dir / "memory.pt"
    metrics_path, summary_path = out_dir / "metrics.jsonl", out_dir / "summary.json"
    data = {name: load_sequences(paths, tc.seq_len) for name, paths in split.items() if paths}
    train = data["train"]
    latent_dim, action_dim = train.latent_dim, train.action_dim
    for name, part in data.items():
        if (part.latent_dim, part.action_dim) != (latent_dim, action_dim):
            raise DataError(
                f"{run_paths(cfg).latents}: {name} episodes have Z={part.latent_dim}, A={part.action_dim} but the "
                f"training episodes Z={latent_dim}, A={action_dim}; rerun `python run.py encode`"
            )
    if tc.done_pos_weight > 0:
        done_pos_weight, positives = tc.done_pos_weight, int((train.dones & train.mask).sum())
    else:
        done_pos_weight, positives = done_weight_from_data(train)
    # one fixed posterior sample per held-out split, shared by every model of this run and seed
    fixed_z = {name: data[name].latents(tc.use_mu, fixed_sample_rng(cfg.seed, name)) for name in ("val", "test")
               if name in data}

    torch.manual_seed(cfg.seed)
    model = MemoryModel(latent_dim, action_dim, cfg.memory).to(cfg.device)
    optimizer = make_optimizer(model, tc.optimizer, tc.lr)
    state = {
        "epoch": 0, "step_in_epoch": 0, "global_step": 0, "best_val": math.inf, "best_epoch": 0,
        "bad_epochs": 0, "skipped_steps": 0, "seconds": 0.0, "epoch_sums": dict.fromkeys(LOSS_PARTS, 0.0),
        "epoch_steps": 0,
    }
    names = _split_names(split)
    resumed = checkpoint_path.exists()
    if resumed:
        saved = load_checkpoint(checkpoint_path)
        expected = {**model.to_checkpoint(), "state_dict": None}
        found = {**saved["model"], "state_dict": None}
        if found != expected:
            raise ConfigError(
                f"{checkpoint_path} holds a memory with target_dim={found['target_dim']}, cond_dim={found['cond_dim']}, "
                f"config {found['config']}; this run asks for target_dim={latent_dim}, cond_dim={action_dim}, "
                f"config {expected['config']}: use another --set name=... or delete {out_dir}"
            )
        if saved["split"] != names:
            raise DataError(
                f"{checkpoint_path} was trained on other episodes than {run_paths(cfg).latents} now holds "
                f"(the latents changed since): delete {out_dir} to retrain the memory on them"
            )
        if saved["optimizer_name"] != tc.optimizer:
            raise ConfigError(
                f"{checkpoint_path} was trained with memory_train.optimizer={saved['optimizer_name']}, not "
                f"{tc.optimizer}: use another --set name=... or delete {out_dir}"
            )
        model.load_state_dict(saved["model"]["state_dict"])
        optimizer.load_state_dict(saved["optimizer"])
        for group in optimizer.param_groups:
            group["lr"] = tc.lr  # a rerun may change the learning rate
        state = saved["state"]
        # rows logged after the checkpoint would be logged again by the rerun
        rows = [row for row in read_jsonl(metrics_path)
                if row["step"] <= state["global_step"] and (row["kind"] != "epoch" or row["epoch"] <= state["epoch"])]
        atomic_write_text(metrics_path, "".join(json.dumps(row) + "\n" for row in rows))
        if progress:
            tqdm.write(f"resuming memory training at epoch {state['epoch'] + 1}, step {state['step_in_epoch']}",
                       file=sys.stderr)
    elif metrics_path.exists():
        metrics_path.unlink()  # a fresh start: the old metrics describe another run

    def save_state() -> None:
        if not (_all_finite(model.state_dict().values()) and _all_finite(_optimizer_tensors(optimizer))):
            append_jsonl(metrics_path, {"kind": "skipped", "step": state["global_step"], "epoch": state["epoch"],
                                        "reason": "checkpoint not written: non-finite state"})
            return
        save_checkpoint(checkpoint_path, model=model.to_checkpoint(), optimizer=optimizer.state_dict(),
                        optimizer_name=tc.optimizer, state=state, split=names, done_pos_weight=done_pos_weight)

    def save_best(epoch: int, val_nll: float | None) -> None:
        if _all_finite(model.state_dict().values()):
            save_checkpoint(model_path, **model.to_checkpoint(), done_pos_weight=done_pos_weight, epoch=epoch,
                            val_nll=val_nll)

    def score(name: str) -> dict | None:
        return evaluate(model, data[name], fixed_z[name], cfg, done_pos_weight) if name in data else None

    if not resumed:
        # Score the untrained model first: the curve starts at epoch 0, and memory.pt exists (finite) even if
        # every later step diverges.
        val = score("val")
        val_nll = val["nll_per_dim"] if val else math.inf
        state["best_val"] = val_nll if math.isfinite(val_nll) else math.inf
        save_best(0, _finite_or_none(val_nll))
        append_jsonl(metrics_path, {"kind": "epoch", "step": 0, "epoch": 0, "train_nll_per_dim": None,
                                    "val_nll_per_dim": _finite_or_none(val_nll), "best": True, "skipped_steps": 0})
        save_state()

    per_epoch = train.num_batches(tc.batch_size)
    if tc.max_steps_per_epoch:
        per_epoch = min(per_epoch, tc.max_steps_per_epoch)
    title = f"{cfg.memory.kind.upper()} K={cfg.memory.components} d'={cfg.memory.rank} ({cfg.env.name})"
    model.train()
    while state["epoch"] < tc.epochs and not (tc.patience and state["bad_epochs"] >= tc.patience):
        epoch = state["epoch"]
        sample_rng, order_rng = epoch_rngs(cfg.seed, epoch)
        z = train.latents(tc.use_mu, sample_rng)
        order = order_rng.permutation(len(train))[: per_epoch * tc.batch_size]
        done_windows = state["step_in_epoch"] * tc.batch_size
        bar = tqdm(total=per_epoch, initial=state["step_in_epoch"], desc=f"memory epoch {epoch + 1}/{tc.epochs}",
                   unit="batch", dynamic_ncols=True, disable=not progress)
        started = time.perf_counter()
        for batch in train.batches(z, order[done_windows:], tc.batch_size, cfg.device):
            values, skipped = optimisation_step(model, optimizer, batch, cfg, done_pos_weight)
            state["step_in_epoch"] += 1
            state["global_step"] += 1
            if skipped:
                state["skipped_steps"] += 1
                append_jsonl(metrics_path, {"kind": "skipped", "step": state["global_step"], "epoch": epoch,
                                            "reason": skipped, "loss": _finite_or_none(values["loss"])})
            else:
                count = int(batch["mask"].sum())
                for part in LOSS_PARTS:
                    state["epoch_sums"][part] += values[part] * count
                state["epoch_steps"] += count
            bar.update()
            bar.set_postfix(nll_dim=f"{values['nll_per_dim']:.3f}", skipped=state["skipped_steps"])
            if state["global_step"] % tc.log_every == 0 and not skipped:
                append_jsonl(metrics_path, {"kind": "train", "step": state["global_step"],
                                            "epoch": epoch + state["step_in_epoch"] / per_epoch, **values})
            if tc.checkpoint_every and state["global_step"] % tc.checkpoint_every == 0:
                state["seconds"] += time.perf_counter() - started
                started = time.perf_counter()
                save_state()
            if stop_after_steps is not None and state["global_step"] >= stop_after_steps:
                bar.close()
                raise TrainingStopped(f"stopped after {state['global_step']} steps (test hook)")
        bar.close()
        state["seconds"] += time.perf_counter() - started

        steps = state["epoch_steps"]
        train_means = {part: (value / steps if steps else None) for part, value in state["epoch_sums"].items()}
        val = score("val")
        state["epoch"], state["step_in_epoch"] = epoch + 1, 0
        state["epoch_sums"], state["epoch_steps"] = dict.fromkeys(LOSS_PARTS, 0.0), 0
        # without validation episodes the latest model is the one kept
        val_nll = val["nll_per_dim"] if val else -math.inf
        improved = val is None or (math.isfinite(val_nll) and val_nll < state["best_val"])
        if improved:
            state["best_val"], state["best_epoch"], state["bad_epochs"] = val_nll, epoch + 1, 0
            save_best(epoch + 1, val["nll_per_dim"] if val else None)
        else:
            state["bad_epochs"] += 1
        append_jsonl(metrics_path, {
            "kind": "epoch", "step": state["global_step"], "epoch": epoch + 1,
            **{f"train_{part}": train_means[part] for part in LOSS_PARTS},
            **{f"val_{part}": _finite_or_none(val[part]) if val else None for part in LOSS_PARTS},
            "best": improved, "skipped_steps": state["skipped_steps"], "seconds": state["seconds"],
        })
        save_state()
        if progress:
            save_nll_plot(out_dir / "nll.png", read_jsonl(metrics_path), title)
            tqdm.write(f"memory epoch {epoch + 1}/{tc.epochs}: train NLL/dim {train_means['nll_per_dim'] or math.nan:.4f}"
                       + (f", validation NLL/dim {val_nll:.4f}" if val else "")
                       + (f", {state['skipped_steps']} skipped steps" if state["skipped_steps"] else ""),
                       file=sys.stderr)

    best = load_checkpoint(model_path)
    model = MemoryModel.from_checkpoint(best).to(cfg.device)
    test = score("test")
    rows = read_jsonl(metrics_path)
    save_nll_plot(out_dir / "nll.png", rows, title)
    epochs_done = state["epoch"]
    summary = {
        "kind": cfg.memory.kind,
        "components": cfg.memory.components,
        "rank": cfg.memory.rank,
        "env": cfg.env.name,
        "latent_dim": latent_dim,
        "action_dim": action_dim,
        "test_nll_per_step": _finite_or_none(test["nll"]) if test else None,
        "test_nll_per_dim": _finite_or_none(test["nll_per_dim"]) if test else None,
        "test_reward_mse": _finite_or_none(test["reward_loss"]) if test else None,
        "test_done_loss": _finite_or_none(test["done_loss"]) if test else None,
        "val_nll_per_dim": _finite_or_none(best["val_nll"]) if best["val_nll"] is not None else None,
        "nll_units": "nats; per step = summed over the latent dimensions, per dim = divided by Z",
        "best_epoch": best["epoch"],
        "epochs_trained": epochs_done,
        "stopped_early": bool(tc.patience and state["bad_epochs"] >= tc.patience and epochs_done < tc.epochs),
        "steps": state["global_step"],
        "skipped_steps": state["skipped_steps"],
        "parameters": parameter_counts(model),
        "done_pos_weight": done_pos_weight,
        "done_positives_train": positives,
        "episodes": {name: len(split[name]) for name in SPLITS},
        "transitions": {name: data[name].steps if name in data else 0 for name in SPLITS},
        "windows": {name: len(data[name]) if name in data else 0 for name in SPLITS},
        "use_mu": tc.use_mu,
        "train_seconds": round(state["seconds"], 2),
        "memory": str(model_path),
        "nll_plot": str(out_dir / "nll.png"),
        "seed": cfg.seed,
        "memory_config": dataclasses.asdict(cfg.memory),
        "train_config": _train_fingerprint(cfg),
        "split": names,
    }
    write_json(summary_path, summary)
    return summary
