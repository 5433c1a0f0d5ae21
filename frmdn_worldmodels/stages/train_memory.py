r"""``python run.py train-memory``: fit the memory M (RMDN / FRMDN) to the encoded latent sequences.

At step t the memory reads :math:`(z_t, a_t)` and is scored on :math:`z_{t+1}`, :math:`r_t` and
:math:`\mathrm{done}_t`; the loss per step is

.. math::
    \frac{1}{d}\,\mathrm{NLL}(z_{t+1}) + w_r (\hat r_t - r_t)^2
        + w_d\,\mathrm{BCE}_{p}(\hat d_t, \mathrm{done}_t),

with the done loss's positive weight p = negatives / positives of the training split unless configured (the
memory keeps p and the done horizon, so the dream can undo both: ``MemoryModel.done_probability``).
Episodes (not windows) are split into train / val / test; z is a fresh posterior sample every epoch (or the
VAE mean with ``memory_train.use_mu``); validation and test use one fixed sample (see
``data.sequences``). With ``memory_train.carry_state`` an episode's windows are read in order, each from
the LSTM state the previous one ended in (detached: truncated backpropagation through time), in training and
in validation and test alike, so M is fitted and scored on LSTM states as old as the episodes, as the agent
and the dream produce them. The model kept is the one with the best validation loss, the whole of it (the
latent NLL, the reward and the done terms): the dream uses every head.

A step whose loss or gradient is not finite, or that would leave a non-finite parameter or optimiser state,
is skipped (the model is restored), counted and logged; no checkpoint is ever written with a non-finite value.

Files in the output folder (``<run>/memory/``, or one per cell of ``--sweep table1``):
- ``checkpoint.pt``: the resumable state (model, optimiser, epoch, step within it, best validation NLL,
  patience counter, running sums), written atomically every epoch and every ``checkpoint_every`` steps. The
  epoch's posterior sample and batch order are functions of (``memory_train.seed``, epoch), so a resumed run
  replays them and goes on from the saved step: a killed run loses at most ``checkpoint_every`` steps.
- ``memory.pt``: the model with the best validation loss (``MemoryModel.to_checkpoint()``, with its done
  head's positive weight and horizon, + ``epoch``, ``val_loss``); the untrained model is scored first, so
  this file exists after the first epoch starts.
- ``metrics.jsonl`` (``train``, ``epoch`` and ``skipped`` rows), ``summary.json``, ``nll.png``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from frmdn_worldmodels.data.sequences import (
    SPLITS,
    SequenceSet,
    epoch_rngs,
    fixed_sample_rng,
    load_sequences,
    split_latent_files,
)
from frmdn_worldmodels.models.memory import MemoryModel, State
from frmdn_worldmodels.runtime.config import Config
from frmdn_worldmodels.runtime.io import (
    DataError,
    load_checkpoint,
    save_checkpoint,
)
from frmdn_worldmodels.runtime.paths import run_paths
from frmdn_worldmodels.runtime.plots import plot_curves
from frmdn_worldmodels.runtime.records import Stage, file_digest
from frmdn_worldmodels.runtime.rules import check_rules
from frmdn_worldmodels.train.loop import LoopSettings, TrainTask, finite_or_none
from frmdn_worldmodels.train.loop import train as train_loop

LOSS_PARTS = ("loss", "nll", "nll_per_dim", "reward_loss", "done_loss")


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
    counts = {
        name: sum(p.numel() for p in part.parameters()) if part is not None else 0
        for name, part in parts.items()
    }
    counts["flow"] += sum(p.numel() for p in model.member_flows.parameters())  # an ensemble's other flows
    counts["total"] = sum(p.numel() for p in model.parameters())
    return counts


def done_weight_from_data(train: SequenceSet) -> tuple[float, int]:
    """negatives / positives of the done targets of the training split (1 when there is no positive)."""
    positives = int((train.dones & train.mask).sum())
    negatives = train.steps - positives
    return (negatives / positives if positives else 1.0), positives


class StateCarry:
    """Truncated backpropagation through time: the LSTM state each lane's last window ended in, detached,
    which the lane's next window starts from (zeros where it starts an episode)."""

    def __init__(self) -> None:
        self.state: State | None = None

    def start(self, reset: torch.Tensor) -> State | None:
        """The state a batch starts from: the carried one, zeroed on the rows of ``reset [B]``."""
        if self.state is None:
            return None
        keep = (~reset).to(self.state[0].dtype)[None, :, None]
        return self.state[0] * keep, self.state[1] * keep

    def end(self, state: State) -> None:
        self.state = (state[0].detach(), state[1].detach())

    def get(self) -> dict | None:
        return None if self.state is None else {"h": self.state[0], "c": self.state[1]}

    def set(self, saved: dict | None) -> None:
        self.state = None if saved is None else (saved["h"], saved["c"])


def batch_losses(
    model: MemoryModel, batch: dict, cfg: Config, done_pos_weight: float, carry: StateCarry | None = None
) -> tuple[dict[str, torch.Tensor], int]:
    """The memory's losses on one batch of windows, and the number of real (unpadded) steps they average;
    with ``carry``, read from the state it carries (and left with the state the batch ends in)."""
    tc = cfg.memory_train
    losses, state = model.sequence_loss_and_state(
        batch["y"],
        batch["cond"],
        batch["rewards"],
        batch["dones"],
        batch["mask"],
        done_pos_weight=done_pos_weight,
        reward_weight=tc.reward_weight,
        done_weight=tc.done_weight,
        state=None if carry is None else carry.start(batch["reset"]),
    )
    if carry is not None:
        carry.end(state)
    return losses, int(batch["mask"].sum())


def scoring_batches(
    data: SequenceSet, z: np.ndarray, cfg: Config
) -> tuple[StateCarry | None, Iterator[dict]]:
    """Every window of ``data`` once, in batches of ``4 x batch_size`` (with ``carry_state``, lanes that read
    each episode through from its start, and the carry they need)."""
    size = 4 * cfg.memory_train.batch_size
    if cfg.memory_train.carry_state:
        return StateCarry(), data.lane_batches(z, data.lane_schedule(data.lanes(size)), device=cfg.device)
    return None, data.batches(z, np.arange(len(data)), size, cfg.device)


@torch.no_grad()
def evaluate(
    model: MemoryModel, data: SequenceSet, z: np.ndarray, cfg: Config, done_pos_weight: float
) -> dict:
    """Mean losses per real (unpadded) step over every window of ``data``, with latents ``z`` (with
    ``carry_state``, each episode read through from its start)."""
    was_training = model.training
    model.eval()
    totals = dict.fromkeys(LOSS_PARTS, 0.0)
    steps = 0
    carry, batches = scoring_batches(data, z, cfg)
    for batch in batches:
        losses, count = batch_losses(model, batch, cfg, done_pos_weight, carry)
        for part in LOSS_PARTS:
            totals[part] += losses[part].item() * count
        steps += count
    model.train(was_training)
    return {part: value / max(steps, 1) for part, value in totals.items()}


@torch.no_grad()
def calibrate_done(model: MemoryModel, data: SequenceSet, z: np.ndarray, cfg: Config) -> dict:
    r"""Set ``model.done_bias`` to the b for which the done head's mean chance over the real steps of
    ``data`` (every member's, the positive weight w taken out) is the data's rate of done targets, with one
    pseudo-count each way: :math:`\overline{\sigma(\ell - \log w + b)} = (n_+ + 1) / (n + 2)` (bisection; the
    mean rises with b). Returns the rate, b and the head's mean chance before."""
    model.eval()
    carry, batches = scoring_batches(data, z, cfg)
    logits = []
    for batch in batches:
        start = None if carry is None else carry.start(batch["reset"])
        members, state = model.read_sequence(batch["y"], batch["cond"], start)
        if carry is not None:
            carry.end(state)
        logits += [out.done_logit[batch["mask"]].double() for _, out in members]
    shifted = torch.cat(logits) - math.log(model.done_pos_weight)
    rate = (float((data.dones & data.mask).sum()) + 1) / (data.steps + 2)
    low, high = -60.0, 60.0
    for _ in range(80):
        middle = (low + high) / 2
        low, high = (middle, high) if float(torch.sigmoid(shifted + middle).mean()) < rate else (low, middle)
    model.done_bias = (low + high) / 2
    return {"rate": rate, "bias": model.done_bias, "mean_before": float(torch.sigmoid(shifted).mean())}


def save_nll_plot(path: Path, rows: list[dict], title: str) -> None:
    epochs = [row for row in rows if row["kind"] == "epoch"]
    trained = [row for row in epochs if row.get("train_nll_per_dim") is not None]
    series = {"train": ([r["epoch"] for r in trained], [r["train_nll_per_dim"] for r in trained])}
    scored = [row for row in epochs if row.get("val_nll_per_dim") is not None]
    if scored:
        series["validation"] = ([r["epoch"] for r in scored], [r["val_nll_per_dim"] for r in scored])
    plot_curves(path, series, xlabel="epoch", ylabel="NLL per latent dimension (nats)", title=title)


def _split_names(split: dict[str, list[Path]]) -> dict[str, list[str]]:
    return {name: [path.name for path in paths] for name, paths in split.items()}


def run(cfg: Config, *, initial: Path | None = None, stop_after_steps: int | None = None) -> dict:
    """``python run.py train-memory``: train the memory into ``<run>/memory/`` and its critics
    (``memory_train.critics``) into ``<run>/memory/critics/c<i>/``, and return the summary.

    ``initial``: a ``memory.pt`` whose weights training starts from (iterative training), instead of a fresh
    initialisation; it is one of the stage's inputs (and the critics' too)."""
    inputs = {"initial": file_digest(initial)} if initial is not None else None
    summary = train_memory(
        cfg, Stage(cfg, "train-memory", inputs=inputs), initial=initial, stop_after_steps=stop_after_steps
    )
    critics = [
        train_memory(critic, Stage(critic, "train-memory", folder, inputs), initial=initial)
        for critic, folder in critic_runs(cfg)
    ]
    if critics:
        summary = {**summary, "critics": [{key: c.get(key) for key in CRITIC_KEYS} for c in critics]}
    return summary


CRITIC_KEYS = ("model_seed", "test_nll_per_dim", "val_loss", "best_epoch", "train_seconds")
"""What the memory's summary says of each critic."""


def critic_runs(cfg: Config) -> list[tuple[Config, Path]]:
    """(config, folder) of each critic of ``memory_train.critics``: M's settings with the model seeds after
    M's, each in ``<run>/memory/critics/c<i>/``."""
    tc = cfg.memory_train
    model_seed = cfg.seed if tc.seed is None else tc.seed
    return [
        (
            dataclasses.replace(cfg, memory_train=dataclasses.replace(tc, seed=model_seed + i, critics=0)),
            run_paths(cfg).critic(i),
        )
        for i in range(1, tc.critics + 1)
    ]


@dataclass
class MemoryData:
    """The run's encoded episodes as the memory is trained and scored on them."""

    split: dict[str, list[Path]]
    """The latent files of each split (``SPLITS``), split by episode."""
    sets: dict[str, SequenceSet]
    """The windows of each split that has episodes."""
    fixed_z: dict[str, np.ndarray]
    """One fixed posterior sample per held-out split (``val``, ``test``), shared by every model of the run and
    seed."""
    done_pos_weight: float
    """The done loss's positive weight p (``memory_train.done_pos_weight``, or ``done_weight_from_data``)."""
    positives: int
    """Done targets of the training split."""


def load_memory_data(cfg: Config, split: dict[str, list[Path]]) -> MemoryData:
    """Read the windows of ``split``'s episodes (a DataError if their Z or A differ from the training
    split's) and draw the held-out splits' fixed samples."""
    tc = cfg.memory_train
    sets = {
        name: load_sequences(paths, tc.seq_len, tc.done_horizon) for name, paths in split.items() if paths
    }
    train = sets["train"]
    for name, part in sets.items():
        if (part.latent_dim, part.action_dim) != (train.latent_dim, train.action_dim):
            raise DataError(
                f"{run_paths(cfg).latents}: {name} episodes have Z={part.latent_dim}, A={part.action_dim} "
                f"but the training episodes Z={train.latent_dim}, A={train.action_dim}; "
                "rerun `python run.py encode`"
            )
    if tc.done_pos_weight > 0:
        done_pos_weight, positives = tc.done_pos_weight, int((train.dones & train.mask).sum())
    else:
        done_pos_weight, positives = done_weight_from_data(train)
    fixed_z = {
        name: sets[name].latents(tc.use_mu, fixed_sample_rng(cfg.seed, name))
        for name in ("val", "test")
        if name in sets
    }
    return MemoryData(split, sets, fixed_z, done_pos_weight, positives)


def new_memory(cfg: Config, data: MemoryData, model_seed: int, initial: Path | None) -> MemoryModel:
    """``MemoryModel(Z, A, cfg.memory)`` seeded with ``model_seed``, with the data's done weight and horizon,
    starting from the weights of ``initial`` if given (of the same shape)."""
    train = data.sets["train"]
    torch.manual_seed(model_seed)
    model = MemoryModel(train.latent_dim, train.action_dim, cfg.memory).to(cfg.device)
    model.done_pos_weight, model.done_horizon = data.done_pos_weight, cfg.memory_train.done_horizon
    if initial is not None:
        start = MemoryModel.from_checkpoint(load_checkpoint(initial))
        if start.to_checkpoint()["config"] != model.to_checkpoint()["config"]:
            raise DataError(
                f"{initial}: a memory of another shape than memory.* asks for: it cannot start this one"
            )
        model.load_state_dict(start.state_dict())
    return model


def memory_task(
    cfg: Config, model: MemoryModel, data: MemoryData, model_seed: int, out_dir: Path, progress: bool
) -> TrainTask:
    """The memory's batches, losses, validation and best model (``memory.pt``) for ``train.loop.train``:
    epoch e's posterior sample and batch order are functions of (``model_seed``, e); with ``carry_state`` the
    lanes read each episode's windows in order, from the LSTM state the previous one ended in."""
    tc, train = cfg.memory_train, data.sets["train"]
    carry = StateCarry() if tc.carry_state else None
    lanes = train.lanes(tc.batch_size)

    def epoch_batches(epoch: int, start: int):
        sample_rng, order_rng = epoch_rngs(model_seed, epoch)
        z = train.latents(tc.use_mu, sample_rng)
        if carry is not None:
            return train.lane_batches(z, train.lane_schedule(lanes, order_rng), start, cfg.device)
        order = order_rng.permutation(len(train))
        return train.batches(z, order[start * tc.batch_size :], tc.batch_size, cfg.device)

    def save_best(epoch: int, val_loss: float | None) -> None:
        save_checkpoint(out_dir / "memory.pt", **model.to_checkpoint(), epoch=epoch, val_loss=val_loss)

    def validate(model: MemoryModel) -> dict | None:
        if "val" not in data.sets:
            return None
        return evaluate(model, data.sets["val"], data.fixed_z["val"], cfg, data.done_pos_weight)

    title = _plot_title(cfg)
    return TrainTask(
        epoch_batches=epoch_batches,
        batches_per_epoch=(
            len(train.lane_schedule(lanes)) if carry is not None else train.num_batches(tc.batch_size)
        ),
        losses=lambda model, batch: batch_losses(model, batch, cfg, data.done_pos_weight, carry),
        validate=validate,
        score="loss",
        save_best=save_best,
        after_epoch=(lambda rows: save_nll_plot(out_dir / "nll.png", rows, title)) if progress else None,
        shown=("nll_per_dim",),
        checkpoint_extra={"split": _split_names(data.split), "done_pos_weight": data.done_pos_weight},
        carried=None if carry is None else (carry.get, carry.set),
    )


def _plot_title(cfg: Config) -> str:
    return f"{cfg.memory.kind.upper()} K={cfg.memory.components} d'={cfg.memory.rank} ({cfg.env.name})"


def calibrated_best(
    cfg: Config, model_path: Path, train: SequenceSet
) -> tuple[MemoryModel, dict, dict | None]:
    """The best memory of ``model_path`` (and its checkpoint) with its done head calibrated
    (``calibrate_done``) on the training split's fixed sample, rewritten there; and the calibration."""
    best = load_checkpoint(model_path)
    model = MemoryModel.from_checkpoint(best).to(cfg.device)
    if model.done_head is None:
        return model, best, None
    # on the training split's fixed sample: the same z for a rerun, so memory.pt is rewritten the same
    train_z = train.latents(cfg.memory_train.use_mu, fixed_sample_rng(cfg.seed, "train"))
    calibration = calibrate_done(model, train, train_z, cfg)
    save_checkpoint(model_path, **{**best, **model.to_checkpoint()})
    return model, best, calibration


def _test_figures(cfg: Config, test: dict | None) -> dict:
    """The test split's losses in the summary (None without test episodes, or for a head the memory has
    not)."""
    return {
        "test_nll_per_step": finite_or_none(test["nll"]) if test else None,
        "test_nll_per_dim": finite_or_none(test["nll_per_dim"]) if test else None,
        # None, not the 0 the loss has, for a memory without the head
        "test_reward_mse": (
            finite_or_none(test["reward_loss"]) if test and cfg.memory.predict_reward else None
        ),
        "test_done_loss": finite_or_none(test["done_loss"]) if test and cfg.memory.predict_done else None,
    }


def _data_figures(data: MemoryData) -> dict:
    """Episodes, transitions and windows of each split, in the summary."""
    sets = data.sets
    return {
        "episodes": {name: len(data.split[name]) for name in SPLITS},
        "transitions": {name: sets[name].steps if name in sets else 0 for name in SPLITS},
        "windows": {name: len(sets[name]) if name in sets else 0 for name in SPLITS},
    }


def train_memory(
    cfg: Config,
    stage: Stage,
    *,
    progress: bool = True,
    initial: Path | None = None,
    stop_after_steps: int | None = None,
) -> dict:
    """Train ``MemoryModel(Z, A, cfg.memory)`` on the run's latents into ``stage.folder`` (resumable; skipped
    when finished); return the summary.

    ``progress`` shows progress bars and redraws ``nll.png`` every epoch (the sweep's cells draw it once, at
    the end). ``stop_after_steps``: see ``frmdn_worldmodels.train.loop.train``.
    """
    check_rules(cfg, "memory_train")
    tc = cfg.memory_train
    # fails on missing latents before any folder is made
    split = split_latent_files(run_paths(cfg).latents, tc.val_fraction, tc.test_fraction, cfg.seed)
    if (finished := stage.open()) is not None:
        return finished  # already trained: the pipeline (and the sweep) rerun stages
    out_dir = stage.folder
    data = load_memory_data(cfg, split)
    model_seed = cfg.seed if tc.seed is None else tc.seed
    model = new_memory(cfg, data, model_seed, initial)
    optimizer = make_optimizer(model, tc.optimizer, tc.lr)
    task = memory_task(cfg, model, data, model_seed, out_dir, progress)
    settings = LoopSettings.of(tc, tensorboard=cfg.tensorboard, progress=progress, name="memory")
    result = train_loop(
        model,
        optimizer,
        task,
        settings,
        out_dir,
        stage.fingerprint,
        stop_after_steps=stop_after_steps,
        on_checkpoint=stage.record_progress,
    )

    model, best, calibration = calibrated_best(cfg, out_dir / "memory.pt", data.sets["train"])
    test = None
    if "test" in data.sets:
        test = evaluate(model, data.sets["test"], data.fixed_z["test"], cfg, data.done_pos_weight)
    save_nll_plot(out_dir / "nll.png", result.rows, _plot_title(cfg))
    train = data.sets["train"]
    summary = {
        "kind": cfg.memory.kind,
        "components": cfg.memory.components,
        "rank": cfg.memory.rank,
        "env": cfg.env.name,
        "latent_dim": train.latent_dim,
        "action_dim": train.action_dim,
        **_test_figures(cfg, test),
        "val_loss": finite_or_none(best["val_loss"]) if best["val_loss"] is not None else None,
        "val_nll_per_dim": result.epoch_row(best["epoch"]).get("val_nll_per_dim"),
        "nll_units": "nats; per step = summed over the latent dimensions, per dim = divided by Z"
        + ("; the mean of the ensemble's members' NLLs" if cfg.memory.ensemble > 1 else ""),
        "best_epoch": best["epoch"],
        "epochs_trained": result.state["epoch"],
        "stopped_early": result.stopped_early,
        "steps": result.state["global_step"],
        "skipped_steps": result.state["skipped_steps"],
        "parameters": parameter_counts(model),
        "done_pos_weight": data.done_pos_weight,
        "done_positives_train": data.positives,
        # the done head's mean chance on the training steps before and after its bias b, against the data's
        "done_calibration": calibration,
        **_data_figures(data),
        "use_mu": tc.use_mu,
        "train_seconds": round(result.state["seconds"], 2),
        "memory": str(out_dir / "memory.pt"),
        "nll_plot": str(out_dir / "nll.png"),
        "seed": cfg.seed,
        "model_seed": model_seed,
        "memory_config": dataclasses.asdict(cfg.memory),
        "split": _split_names(split),
    }
    return stage.finish(summary)
