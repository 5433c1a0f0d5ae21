"""train-memory: windows and alignment, the loss falls, resume after a kill, the NaN guard, the command
line."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

import frmdn_worldmodels.train.loop as training
from frmdn_worldmodels.data.episodes import list_npz, load_latents
from frmdn_worldmodels.data.sequences import (
    SequenceSet,
    chunk_episode,
    load_sequences,
    split_latent_files,
    spread_terminals,
)
from frmdn_worldmodels.models.memory import MemoryModel
from frmdn_worldmodels.runtime.config import ConfigError, MemoryConfig
from frmdn_worldmodels.runtime.io import DataError, load_checkpoint, read_jsonl
from frmdn_worldmodels.runtime.paths import run_paths
from frmdn_worldmodels.stages.train_memory import run
from frmdn_worldmodels.train.loop import TrainingStopped
from tests.conftest import write_tiny_latents

ROOT = Path(__file__).resolve().parents[2]


pytestmark = pytest.mark.usefixtures("one_thread")


def _finite_tensors(payload) -> bool:
    if torch.is_tensor(payload):
        return not payload.is_floating_point() or bool(torch.isfinite(payload).all())
    if isinstance(payload, dict):
        return all(_finite_tensors(value) for value in payload.values())
    if isinstance(payload, list | tuple):
        return all(_finite_tensors(value) for value in payload)
    return True


def test_windows_align_inputs_targets_and_mask_the_tail():
    steps, seq_len = 10, 4
    mu = np.arange((steps + 1) * 2, dtype=np.float32).reshape(steps + 1, 2)
    arrays = {
        "mu": mu,
        "logvar": -mu,
        "actions": np.arange(steps, dtype=np.float32)[:, None],
        "rewards": np.arange(steps, dtype=np.float32) * 10,
        "terminals": np.arange(steps) == steps - 1,
    }
    windows = chunk_episode(arrays, seq_len)
    assert windows["mu"].shape == (3, seq_len + 1, 2) and windows["actions"].shape == (3, seq_len, 1)
    np.testing.assert_array_equal(windows["mask"].sum(1), [4, 4, 2])
    for j in range(3):
        for i in range(seq_len):
            t = j * seq_len + i
            if t >= steps:
                assert not windows["mask"][j, i]
                continue
            # at step t the memory reads (z_t, a_t) and is scored on z_{t+1}, r_t, done_t
            np.testing.assert_array_equal(windows["mu"][j, i], mu[t])
            np.testing.assert_array_equal(windows["mu"][j, i + 1], mu[t + 1])
            assert windows["actions"][j, i, 0] == t and windows["rewards"][j, i] == 10 * t
            assert windows["dones"][j, i] == (t == steps - 1)
    assert np.isfinite(windows["mu"]).all() and np.isfinite(windows["logvar"]).all()


def test_done_targets_spread_over_the_horizon():
    terminals = np.array([0, 0, 0, 0, 1, 0, 1, 0, 0, 1], dtype=bool)
    assert spread_terminals(terminals, 1).tolist() == terminals.tolist()
    assert spread_terminals(terminals, 3).astype(int).tolist() == [0, 0, 1, 1, 1, 1, 1, 1, 1, 1]
    assert spread_terminals(terminals[:3], 5).sum() == 0  # no end: nothing to spread
    steps = 10
    arrays = {
        "mu": np.zeros((steps + 1, 2), np.float32),
        "logvar": np.zeros((steps + 1, 2), np.float32),
        "actions": np.zeros((steps, 1), np.float32),
        "rewards": np.zeros(steps, np.float32),
        "terminals": np.arange(steps) == steps - 1,
    }
    windows = chunk_episode(arrays, 4, done_horizon=3)
    dones = windows["dones"].reshape(-1)[windows["mask"].reshape(-1)]
    assert np.flatnonzero(dones).tolist() == [7, 8, 9]
    assert not windows["dones"][~windows["mask"]].any()  # the padded tail stays 0


def test_the_done_horizon_reaches_training_and_its_weight(tiny_memory_run):
    """With ``memory_train.done_horizon`` the done targets of every split are spread and the done loss's
    positive weight is negatives / positives of the spread training targets; below 1 is refused."""
    cfg = tiny_memory_run("horizon", "memory_train.done_horizon=3", "memory_train.epochs=1")
    summary = run(cfg)
    split = split_latent_files(cfg.run_dir / "latents", 0.2, 0.2, cfg.seed)
    dones = np.concatenate([spread_terminals(load_latents(path)["terminals"], 3) for path in split["train"]])
    assert summary["done_positives_train"] == dones.sum() == 3 * len(split["train"])
    assert summary["done_pos_weight"] == pytest.approx((~dones).sum() / dones.sum())
    with pytest.raises(ConfigError, match="memory_train.done_horizon must be at least 1, got 0"):
        run(tiny_memory_run("zero", "memory_train.done_horizon=0"))


def test_posterior_sample_is_fresh_and_has_the_posterior_moments():
    rng = np.random.default_rng(0)
    mu = rng.standard_normal((200, 3, 2)).astype(np.float32)
    logvar = np.log(np.full_like(mu, 0.25))
    data = SequenceSet(
        mu,
        logvar,
        np.zeros((200, 2, 1), np.float32),
        np.zeros((200, 2), np.float32),
        np.zeros((200, 2), bool),
        np.ones((200, 2), bool),
        ["a"],
        np.zeros(200, np.int64),
        np.arange(200),
    )
    first = data.latents(False, np.random.default_rng(1))
    second = data.latents(False, np.random.default_rng(2))
    assert not np.allclose(first, second)
    assert data.latents(True, np.random.default_rng(1)) is mu
    noise = (first - mu) / 0.5
    assert abs(noise.mean()) < 0.05 and abs(noise.std() - 1) < 0.05


def test_loss_falls_test_nll_is_finite_and_a_rerun_is_skipped(tiny_memory_run):
    cfg = tiny_memory_run("m", "memory_train.epochs=6")
    summary = run(cfg)
    out = cfg.run_dir / "memory"
    epochs = [row for row in read_jsonl(out / "metrics.jsonl") if row["kind"] == "epoch"]
    assert [row["epoch"] for row in epochs] == list(range(7))
    train = [row["train_nll_per_dim"] for row in epochs[1:]]
    assert train[-1] < train[0] - 0.2
    assert epochs[-1]["val_nll_per_dim"] < epochs[0]["val_nll_per_dim"] - 0.05
    assert np.isfinite(summary["test_nll_per_dim"]) and np.isfinite(summary["test_nll_per_step"])
    assert summary["test_nll_per_step"] == pytest.approx(4 * summary["test_nll_per_dim"])
    assert summary["skipped_steps"] == 0 and summary["episodes"] == {"train": 4, "val": 1, "test": 1}
    parameters = summary["parameters"]
    assert parameters["flow"] > 0 and parameters["total"] == sum(
        v for k, v in parameters.items() if k != "total"
    )
    assert (out / "nll.png").stat().st_size > 0

    # the contract others load: the model with the best validation loss, the dream's (the latent NLL, the
    # reward and the done terms), plain data
    payload = load_checkpoint(out / "memory.pt")
    best = min(epochs, key=lambda row: row["val_loss"])
    assert payload["epoch"] == summary["best_epoch"] == best["epoch"]
    assert payload["val_loss"] == pytest.approx(best["val_loss"]) == summary["val_loss"]
    assert summary["val_nll_per_dim"] == best["val_nll_per_dim"]
    model = MemoryModel.from_checkpoint(payload)
    assert (model.target_dim, model.cond_dim, model.config.kind) == (4, 2, "frmdn")

    # done weighting from the training split: negatives / positives, computed independently here; the memory
    # keeps it (and the done horizon) for the dream to undo
    split = split_latent_files(cfg.run_dir / "latents", 0.2, 0.2, cfg.seed)
    dones = np.concatenate([load_latents(path)["terminals"] for path in split["train"]])
    assert summary["done_pos_weight"] == pytest.approx((~dones).sum() / dones.sum())
    assert model.done_pos_weight == pytest.approx(summary["done_pos_weight"]) and model.done_horizon == 1

    # the pipeline reruns stages: a finished run is not trained again
    before = (out / "metrics.jsonl").read_text()
    assert run(cfg) == summary
    assert (out / "metrics.jsonl").read_text() == before


def test_a_kill_mid_epoch_resumes_from_the_saved_step(tiny_memory_run, monkeypatch):
    # saved at step 3: mid-episode in both lanes, so the carried LSTM states must be restored too
    overrides = ("memory_train.epochs=2", "memory_train.batch_size=2", "memory_train.checkpoint_every=3")
    reference_cfg = tiny_memory_run("straight", *overrides)
    reference = run(reference_cfg)
    steps_per_epoch = reference["steps"] // 2
    assert steps_per_epoch > 5

    cfg = tiny_memory_run("killed", *overrides)
    with pytest.raises(TrainingStopped):
        run(cfg, stop_after_steps=5)
    checkpoint = load_checkpoint(cfg.run_dir / "memory" / "checkpoint.pt")
    saved = checkpoint["state"]
    assert (saved["epoch"], saved["step_in_epoch"], saved["global_step"]) == (0, 3, 3)
    assert checkpoint["carried"]["h"].shape == (1, 2, 16) and checkpoint["carried"]["h"].ne(0).all()

    calls = []
    real_step = training.guarded_step
    monkeypatch.setattr(training, "guarded_step", lambda *a, **k: calls.append(1) or real_step(*a, **k))
    resumed = run(cfg)
    assert len(calls) == reference["steps"] - 3  # it went on from step 3, it did not start over
    assert resumed["steps"] == reference["steps"]
    train_rows = [
        row["step"] for row in read_jsonl(cfg.run_dir / "memory" / "metrics.jsonl") if row["kind"] == "train"
    ]
    assert len(train_rows) == len(set(train_rows))
    # the epoch's sample and order are replayed, so the result is that of the uninterrupted run
    for name in ("memory.pt", "checkpoint.pt"):
        got = load_checkpoint(cfg.run_dir / "memory" / name)
        want = load_checkpoint(reference_cfg.run_dir / "memory" / name)
        got, want = (p.get("state_dict") or p["model"] for p in (got, want))
        torch.testing.assert_close(got, want)
    assert resumed["test_nll_per_dim"] == pytest.approx(reference["test_nll_per_dim"], rel=1e-5)


@pytest.mark.parametrize("optimizer", ["adam", "rmsprop"])
def test_an_exploding_learning_rate_skips_steps_and_leaves_finite_checkpoints(tiny_memory_run, optimizer):
    cfg = tiny_memory_run(
        "boom",
        "memory_train.lr=1000000.0",
        "memory_train.grad_clip=0",
        f"memory_train.optimizer={optimizer}",
        "memory_train.checkpoint_every=1",
    )
    summary = run(cfg)
    out = cfg.run_dir / "memory"
    skipped = [row for row in read_jsonl(out / "metrics.jsonl") if row["kind"] == "skipped"]
    assert summary["skipped_steps"] == len(skipped) > 0
    assert all(row["reason"].startswith("non-finite") for row in skipped)
    for name in ("memory.pt", "checkpoint.pt"):
        assert _finite_tensors(load_checkpoint(out / name))
    assert np.isfinite(summary["test_nll_per_dim"])


def test_missing_latents_tell_the_user_to_encode(tiny_memory_run):
    cfg = tiny_memory_run("empty")
    for path in list_npz(cfg.run_dir / "latents"):
        path.unlink()
    with pytest.raises(DataError, match="run.py encode"):
        run(cfg)


def test_a_changed_model_is_redone_or_refused_never_resumed(tiny_memory_run):
    from frmdn_worldmodels.runtime.config import ConfigError

    cfg = tiny_memory_run("m", "memory_train.epochs=1")
    assert run(cfg)["rank"] == 1
    refused = tiny_memory_run("m", "memory_train.epochs=1", "memory.rank=2", "stale=refuse")
    with pytest.raises(ConfigError, match=r"memory.rank: 1 -> 2"):
        run(refused)
    redone = run(tiny_memory_run("m", "memory_train.epochs=1", "memory.rank=2"))
    assert redone["rank"] == 2 and redone["steps"] > 0
    model = MemoryModel.from_checkpoint(load_checkpoint(cfg.run_dir / "memory" / "memory.pt"))
    assert model.config.rank == 2


def test_use_mu_trains_on_the_posterior_mean(tiny_memory_run):
    cfg = tiny_memory_run("mu", "memory_train.use_mu=true", "memory_train.epochs=1")
    split = split_latent_files(cfg.run_dir / "latents", 0.2, 0.2, cfg.seed)
    # each test episode read whole, from a zero state: what carrying the state across its windows reads
    test = load_sequences(split["test"], 10_000)
    assert len(test) == len(split["test"]) and cfg.memory_train.seq_len < test.steps
    summary = run(cfg)
    model = MemoryModel.from_checkpoint(load_checkpoint(cfg.run_dir / "memory" / "memory.pt"))
    with torch.no_grad():
        losses = model.sequence_loss(
            torch.from_numpy(test.mu), torch.from_numpy(test.actions), mask=torch.from_numpy(test.mask)
        )
    assert summary["use_mu"] and summary["test_nll_per_step"] == pytest.approx(losses["nll"].item(), rel=1e-5)


def geometric_episodes(count: int, hazard: float, cap: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Episodes of random latents and actions whose end comes with a constant chance ``hazard`` a step
    (cut at ``cap`` steps without a terminal)."""
    rng = np.random.default_rng(seed)
    episodes = []
    for _ in range(count):
        steps = min(int(rng.geometric(hazard)), cap)
        mu = rng.normal(size=(steps + 1, 2)).astype(np.float32)
        episodes.append(
            {
                "mu": mu,
                "logvar": np.full_like(mu, -4.0),
                "actions": rng.normal(size=(steps, 1)).astype(np.float32),
                "rewards": np.zeros(steps, np.float32),
                "terminals": np.arange(steps) == (steps - 1 if steps < cap else steps),
            }
        )
    return episodes


def test_a_weighted_horizon_done_head_trained_on_the_data_gives_its_hazard():
    """Trained as train-memory trains it (targets on the last H steps, positives weighted by the data's
    negatives / positives), the done head's raw sigmoid is near 1/2, far from the data's chance an episode
    ends at a step; ``done_probability`` gives that chance back."""
    hazard, horizon = 0.05, 4
    windows = [chunk_episode(e, 16, horizon) for e in geometric_episodes(300, hazard, cap=250)]
    data = {key: torch.from_numpy(np.concatenate([w[key] for w in windows])) for key in windows[0]}
    positives = float((data["dones"] & data["mask"]).sum())
    weight = (float(data["mask"].sum()) - positives) / positives
    torch.manual_seed(0)
    model = MemoryModel(2, 1, MemoryConfig(hidden=8, components=1, rank=0, kind="rmdn"))
    model.done_pos_weight, model.done_horizon = weight, horizon
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    rng = np.random.default_rng(1)
    for _ in range(300):
        index = torch.from_numpy(rng.choice(len(data["mu"]), 64))
        losses = model.sequence_loss(
            data["mu"][index],
            data["actions"][index],
            None,
            data["dones"][index],
            data["mask"][index],
            done_pos_weight=weight,
        )
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
    with torch.no_grad():
        _, out = model.sequence_log_prob(data["mu"], data["actions"])
    live = data["mask"]
    assert float(torch.sigmoid(out.done_logit)[live].mean()) == pytest.approx(0.5, abs=0.1)
    assert float(model.done_probability(out.done_logit)[live].mean()) == pytest.approx(hazard, abs=0.012)


def test_lanes_read_each_episode_in_order_one_window_a_step():
    """Truncated backpropagation's schedule: every window once an epoch, an episode's window j + 1 one step
    after its window j in the same lane, ``reset`` exactly where a window starts an episode or pads a lane."""
    windows = [chunk_episode(e, 4) for e in geometric_episodes(9, 0.08, cap=40, seed=3)]
    sizes = [len(w["mask"]) for w in windows]
    stacked = {key: np.concatenate([w[key] for w in windows]) for key in windows[0]}
    data = SequenceSet(
        **stacked,
        episodes=[f"ep{i}" for i in range(9)],
        episode=np.repeat(np.arange(9), sizes),
        window=np.concatenate([np.arange(size) for size in sizes]),
    )
    lanes = data.lanes(3)
    assert sorted(e for lane in lanes for e in lane) == list(range(9))
    for rng in (None, np.random.default_rng(0)):
        schedule = data.lane_schedule(lanes, rng)
        assert schedule.shape == (max(sum(sizes[e] for e in lane) for lane in lanes), 3)
        assert sorted(schedule[schedule >= 0].tolist()) == list(range(len(data)))
        for step, row in enumerate(schedule):
            for lane, index in enumerate(row):
                if index >= 0 and data.window[index] > 0:
                    assert schedule[step - 1, lane] == index - 1  # the same episode's previous window
        z = data.latents(True, np.random.default_rng(0))
        resets = np.stack([batch["reset"].numpy() for batch in data.lane_batches(z, schedule)])
        np.testing.assert_array_equal(resets, (schedule < 0) | (data.window[np.maximum(schedule, 0)] == 0))
        # a padded lane scores nothing
        masks = np.stack([batch["mask"].numpy() for batch in data.lane_batches(z, schedule)])
        assert not masks[schedule < 0].any() and masks.sum() == data.steps


def test_the_carried_state_is_the_state_the_last_window_ended_in_detached(tiny_memory_run):
    """One lane batch after another: the second starts where the first ended (zeros on reset rows) and no
    gradient flows back into the first."""
    from frmdn_worldmodels.stages.train_memory import StateCarry, batch_losses

    cfg = tiny_memory_run("carry")
    split = split_latent_files(cfg.run_dir / "latents", 0.2, 0.2, cfg.seed)
    train = load_sequences(split["train"], cfg.memory_train.seq_len)
    schedule = train.lane_schedule(train.lanes(2))
    assert (schedule[1] >= 0).all() and (train.window[schedule[1]] > 0).any()
    batches = list(train.lane_batches(train.latents(True, np.random.default_rng(0)), schedule[:2]))
    torch.manual_seed(0)
    model = MemoryModel(4, 2, cfg.memory)
    carry = StateCarry()
    batch_losses(model, batches[0], cfg, 1.0, carry)
    ended = carry.state
    assert not ended[0].requires_grad and not ended[1].requires_grad
    start = carry.start(batches[1]["reset"])
    reset = batches[1]["reset"]
    assert torch.equal(start[0][0, ~reset], ended[0][0, ~reset]) and start[0][0, reset].eq(0).all()
    losses, _ = batch_losses(model, batches[1], cfg, 1.0, carry)
    fresh, _ = batch_losses(model, batches[1], cfg, 1.0)
    assert not torch.allclose(losses["nll"], fresh["nll"])  # the carried state changed what it reads


@pytest.mark.parametrize("ends", [True, False])
def test_the_done_head_is_calibrated_to_the_datas_rate_of_ends(tiny_memory_run, ends):
    """After training, b is set so that the head's mean chance over the training steps (the positive weight
    taken out) is the data's rate of ends with one pseudo-count each way: with no end in the data, about one
    in the number of steps, however sure the head was."""
    from frmdn_worldmodels.stages.train_memory import calibrate_done

    cfg = tiny_memory_run("calibrated", "memory_train.use_mu=true", "memory_train.epochs=1")
    if not ends:  # the same episodes, cut by the time limit: no terminal anywhere
        for path in list_npz(cfg.run_dir / "latents"):
            data = load_latents(path)
            np.savez(path, **{**data, "terminals": np.zeros_like(data["terminals"])})
    summary = run(cfg)
    model = MemoryModel.from_checkpoint(load_checkpoint(cfg.run_dir / "memory" / "memory.pt"))
    split = split_latent_files(cfg.run_dir / "latents", 0.2, 0.2, cfg.seed)
    whole = load_sequences(split["train"], 10_000)  # each episode read through in one window
    with torch.no_grad():
        _, out = model.double().sequence_log_prob(
            torch.from_numpy(whole.mu).double(), torch.from_numpy(whole.actions).double()
        )
    chance = model.done_probability(out.done_logit)[torch.from_numpy(whole.mask)]
    ended = int(whole.dones.sum())
    rate = (ended + 1) / (whole.steps + 2)
    assert ended == (4 if ends else 0) and summary["done_calibration"]["rate"] == pytest.approx(rate)
    assert float(chance.mean()) == pytest.approx(rate, rel=1e-3)
    assert model.done_bias == summary["done_calibration"]["bias"] != 0
    # calibrating again changes nothing (a rerun after a kill rewrites the same memory.pt)
    assert calibrate_done(model.float(), whole, whole.mu, cfg)["bias"] == pytest.approx(
        model.done_bias, abs=1e-6
    )


def test_critics_are_memories_of_their_own_seeds_trained_beside_m(tiny_memory_run):
    """``memory_train.critics`` trains each critic as M is trained, from the next model seeds, into its own
    folder; M is left as it was (raising the count is no reason to retrain it), and a rerun skips them all."""
    from frmdn_worldmodels.dream.env import load_memory

    cfg = tiny_memory_run("critics", "memory_train.epochs=1")
    alone = run(cfg)
    more = dataclasses.replace(cfg, memory_train=dataclasses.replace(cfg.memory_train, critics=2))
    summary = run(more)
    assert summary.get("skipped") or summary["train_seconds"] == alone["train_seconds"]  # M: not redone
    assert [critic["model_seed"] for critic in summary["critics"]] == [1, 2]
    memories = [load_memory(more, "cpu")] + [
        load_memory(more, "cpu", run_paths(more).critic(i)) for i in (1, 2)
    ]
    first = [next(m.parameters()).detach() for m in memories]
    assert not torch.equal(first[0], first[1]) and not torch.equal(first[1], first[2])
    solo = dataclasses.replace(more, memory_train=dataclasses.replace(more.memory_train, seed=1, critics=0))
    solo = dataclasses.replace(solo, name="solo")
    write_tiny_latents(solo.run_dir / "latents")
    run(solo)
    torch.testing.assert_close(
        load_memory(solo, "cpu").state_dict(), memories[1].state_dict(), rtol=0, atol=0
    )
    again = run(more)
    assert again["critics"] == summary["critics"]
