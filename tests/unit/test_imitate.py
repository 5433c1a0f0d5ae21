"""controller.init: imitate: the features are what the agent reads, the fit reproduces a controller's own
actions, and train-controller starts CMA-ES from the imitation of the best collected episodes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from frmdn_worldmodels.data.episodes import load_latents, save_episode, save_latents
from frmdn_worldmodels.models.controller import Controller
from frmdn_worldmodels.models.memory import MemoryModel
from frmdn_worldmodels.runtime.config import ConfigError, MemoryConfig, load_config
from frmdn_worldmodels.runtime.io import DataError, load_checkpoint, read_json
from frmdn_worldmodels.runtime.paths import run_paths
from frmdn_worldmodels.runtime.rules import check_rules
from frmdn_worldmodels.stages import train_controller
from frmdn_worldmodels.stages.report import _headline
from frmdn_worldmodels.train.imitate import (
    controller_features,
    fit_controller,
    follower_labels,
    imitate_collected,
    imitation_loss,
    imitation_targets,
)

Z, H = 4, 6
EVERY_CONTROLLER = pytest.mark.parametrize(
    "controller",
    [
        Controller(Z, H, 3, discrete=False),
        Controller(Z, H, 3, discrete=False, hidden=5),
        Controller(Z, H, 7, discrete=True),
    ],
    ids=["car-linear", "car-hidden", "mario"],
)
"""The CarRacing controllers, linear and with a hidden layer, and Mario's."""


@EVERY_CONTROLLER
def test_the_fit_reproduces_the_actions_of_a_controller_it_can_express(controller):
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(600, Z + H, generator=generator)
    teacher = 0.3 * torch.randn(controller.num_params, generator=generator)  # logits of unit size
    logits = controller.logits(teacher, features)
    if controller.discrete:
        actions = torch.nn.functional.one_hot(logits.argmax(-1), controller.action_dim).float()
        counts = np.bincount(logits.argmax(-1).numpy(), minlength=controller.action_dim)
        frequencies = counts[counts > 0] / counts.sum()
        constant = -(frequencies * np.log(frequencies)).sum()  # the entropy of the action frequencies
    else:
        actions = controller.squash(logits)
        constant = ((actions.numpy() - actions.numpy().mean(0)) ** 2).mean()  # the mean action's MSE
    start = controller.initial_params(torch.Generator().manual_seed(1))
    params, loss, constant_loss = fit_controller(controller, features, actions, start)
    assert constant_loss == pytest.approx(constant, rel=1e-5)
    assert loss < 0.1 * constant_loss
    fitted = controller.squash(controller.logits(params, features))
    if controller.discrete:
        assert (fitted == actions.argmax(-1)).float().mean() > 0.9
    else:
        assert float(((fitted - actions) ** 2).mean()) == pytest.approx(loss, rel=1e-4)
        # the start's actions are far from the teacher's: the fit moved
        assert (
            float(((controller.squash(controller.logits(start, features)) - actions) ** 2).mean()) > 3 * loss
        )


@pytest.mark.parametrize("use_mu", [True, False])
def test_the_features_are_z_and_the_h_the_agent_reads_before_each_action(use_mu):
    torch.manual_seed(0)
    memory = MemoryModel(Z, 3, MemoryConfig(hidden=H, components=2, rank=1, flow_hidden=8)).eval()
    rng = np.random.default_rng(3)
    steps = 7
    data = {
        "mu": rng.normal(size=(steps + 1, Z)).astype(np.float32),
        "logvar": np.full((steps + 1, Z), -1.0, np.float32),
        "actions": rng.uniform(size=(steps, 3)).astype(np.float32),
    }
    features = controller_features(memory, data, use_mu, np.random.default_rng(5))
    assert features.shape == (steps, Z + H)
    z = data["mu"][:steps]
    if not use_mu:
        z = z + float(np.exp(-0.5)) * np.random.default_rng(5).standard_normal(z.shape, dtype=np.float32)
    np.testing.assert_allclose(features[:, :Z].numpy(), z, atol=1e-6)
    # reference: MemoryModel.step through the episode, h before reading (z_t, a_t)
    state = memory.initial_state(1)
    with torch.no_grad():
        for t in range(steps):
            np.testing.assert_allclose(features[t, Z:].numpy(), state[0][0, 0].numpy(), atol=1e-5)
            _, state = memory.step(
                torch.from_numpy(z[t : t + 1]), torch.from_numpy(data["actions"][t : t + 1]), state
            )


def test_train_controller_starts_from_the_imitation_of_the_best_episodes(tmp_path):
    from tests.unit.test_es import _memory_and_controller, tiny_run

    extra = ["controller.init=imitate", "controller.imitate_top=0.34", "controller.sigma=0.05"]
    cfg = tiny_run(tmp_path, generations=2, extra=extra)
    latents = sorted(run_paths(cfg).latents.glob("ep_*.npz"))
    for index, path in enumerate(latents):  # returns 0, 5, 10: the last episode is the best
        data = load_latents(path)
        data["actions"] = np.full_like(
            data["actions"], 0.2 + 0.3 * index
        )  # each episode's own constant action
        save_latents(
            path, data["mu"], data["logvar"], data["actions"], np.full(5, float(index)), data["terminals"]
        )
    summary = train_controller.run(cfg)
    start = read_json(run_paths(cfg).controller / "start.json")
    assert summary["start"] == start
    assert (start["episodes"], start["frames"], start["mean_return"]) == (1, 5, 10.0)
    assert start["loss"] < 0.01 and start["constant_loss"] == 0.0 and np.isfinite(start["eval_mean"])
    assert "real_mean" not in start  # no real-game evaluation in this dream of its own
    # on the best episode's frames the imitation plays its constant action (0.8, 0.8, 0.8)
    memory, controller = _memory_and_controller(cfg)
    imitation = imitate_collected(cfg, memory, controller, controller.initial_params())
    best = load_latents(latents[-1])
    features = controller_features(memory, best, cfg.memory_train.use_mu, np.random.default_rng(cfg.seed))
    np.testing.assert_allclose(
        controller.squash(controller.logits(imitation.params, features)).numpy(), best["actions"], atol=0.05
    )
    headline = "\n".join(_headline({"train-controller": summary}))
    assert "imitates 1 collected episodes (mean return 10.0" in headline
    assert f"{start['eval_mean']:.1f} in the dream" in headline and "in the real game" not in headline
    assert train_controller.run(cfg)["skipped"] is True
    for field, value in (
        ("init", "clone"),
        ("imitate_top", "0"),
        ("imitate_top", "1.5"),
        ("imitate_weight", "-1"),
        ("imitate_weight", "inf"),
    ):
        with pytest.raises(ConfigError, match=f"controller.{field}"):
            train_controller.run(tiny_run(tmp_path / "bad", extra=[f"controller.{field}={value}"]))


def test_the_follower_labels_are_the_followers_own_action_on_each_recorded_frame(tmp_path):
    from tests.unit.test_envs import grass_with_road
    from tests.unit.test_es import _memory_and_controller, tiny_run

    extra = ["controller.init=imitate", "controller.imitate_actions=follower", "controller.imitate_top=1.0"]
    cfg = tiny_run(tmp_path, extra=extra)
    latents = sorted(run_paths(cfg).latents.glob("ep_*.npz"))
    expected = []
    for index, path in enumerate(latents):
        # the road's first column moves step by step; its 4 columns' mean pixel centre is start + 2
        starts = [8 * index + 6 * t for t in range(6)]
        frames = np.stack([grass_with_road(slice(start, start + 4)) for start in starts])
        save_episode(
            run_paths(cfg).episodes / path.name, frames, np.zeros((5, 3)), np.zeros(5), np.zeros(5, bool)
        )
        steer = np.clip(3 * (np.array(starts[:-1]) + 2 - 32) / 32, -1, 1)  # no action after the last frame
        labels = np.stack([steer, 0.15 * (1 - np.abs(steer)), np.zeros(5)], axis=1)
        np.testing.assert_allclose(follower_labels(cfg, path), labels, rtol=1e-6, atol=1e-7)
        expected.append(labels)
    memory, controller = _memory_and_controller(cfg)
    imitation = imitate_collected(cfg, memory, controller, controller.initial_params())
    # every frame of every episode, labelled by the follower, not the recorded actions
    np.testing.assert_allclose(imitation.target.numpy(), np.concatenate(expected), rtol=1e-6, atol=1e-7)
    recorded = imitate_collected(
        load_config(None, [f"runs_dir={tmp_path}", "controller.init=imitate", "controller.imitate_top=1.0"]),
        memory,
        controller,
        controller.initial_params(),
    )
    assert not np.allclose(recorded.target.numpy(), imitation.target.numpy())

    (run_paths(cfg).episodes / latents[1].name).unlink()
    with pytest.raises(DataError, match=f"{latents[1].name}: missing; controller.imitate_actions=follower"):
        imitate_collected(cfg, memory, controller, controller.initial_params())
    with pytest.raises(ConfigError, match="controller.imitate_actions must be one of"):  # as it is read
        train_controller.run(
            tiny_run(tmp_path / "bad", extra=["controller.imitate_actions=expert", *extra[:1]])
        )
    with pytest.raises(ConfigError, match="labels CarRacing frames; env.name is 'mario'"):
        check_rules(load_config(None, ["env.name=mario", *extra]), "controller")


@EVERY_CONTROLLER
def test_a_populations_imitation_loss_is_each_candidates_own(controller):
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(50, Z + H, generator=generator)
    population = 0.3 * torch.randn(4, controller.num_params, generator=generator)
    recorded = torch.rand(50, controller.action_dim, generator=generator)
    if controller.discrete:
        recorded = torch.nn.functional.one_hot(recorded.argmax(-1), controller.action_dim).float()
    target = imitation_targets(controller, recorded)
    losses = imitation_loss(controller, population, features, target)
    assert losses.shape == (4,)
    for params, loss in zip(population, losses, strict=True):
        logits = controller.logits(params, features)
        if controller.discrete:  # the mean negative log-probability of the recorded action
            expected = -torch.log_softmax(logits, -1)[torch.arange(50), recorded.argmax(-1)].mean()
        else:
            expected = ((controller.squash(logits) - recorded) ** 2).mean()
        assert float(loss) == pytest.approx(float(expected), rel=1e-5)
        assert float(imitation_loss(controller, params, features, target)) == pytest.approx(
            float(loss), rel=1e-5
        )


def _imitation_run(tmp_path, weight: float, generations: int = 4):
    from tests.unit.test_es import tiny_run

    extra = ["controller.init=imitate", "controller.eval_every=1", f"controller.imitate_weight={weight}"]
    return tiny_run(tmp_path, generations=generations, extra=extra)


def test_the_imitation_weight_ranks_and_keeps_by_the_dream_return_less_the_penalty(tmp_path):
    from tests.unit.test_es import _memory_and_controller

    weight = 50.0
    cfg = _imitation_run(tmp_path / "weighted", weight)
    summary = train_controller.run(cfg)
    memory, controller = _memory_and_controller(cfg)
    imitation = imitate_collected(cfg, memory, controller, controller.initial_params())
    rows = [
        json.loads(line) for line in (run_paths(cfg).controller / "metrics.jsonl").read_text().splitlines()
    ]
    for row in rows:
        assert row["mean"] == pytest.approx(row["return_mean"] - row["penalty_mean"])
        assert row["penalty_mean"] > 0
    kept = load_checkpoint(run_paths(cfg).controller / "best.pt")
    kept_loss = float(imitation_loss(controller, kept["params"], imitation.features, imitation.target))
    row = next(row for row in rows if row["generation"] == kept["generation"])
    assert row["eval_score"] == pytest.approx(row["eval_mean"] - weight * kept_loss, rel=1e-5)
    assert summary["best_score"] == pytest.approx(max(row["eval_score"] for row in rows))
    assert summary["imitate_weight"] == weight
    assert "less 50 x the imitation loss" in "\n".join(_headline({"train-controller": summary}))
    # without the penalty, the search (sigma 0.5) wanders off the imitation; with it, it stays closer
    free_cfg = _imitation_run(tmp_path / "free", 0.0)
    train_controller.run(free_cfg)
    free = load_checkpoint(run_paths(free_cfg).controller / "best.pt")
    free_loss = float(imitation_loss(controller, free["params"], imitation.features, imitation.target))
    assert kept_loss < free_loss


def test_a_weighted_run_resumes_after_a_kill_as_if_uninterrupted(tmp_path, monkeypatch):
    from tests.unit.test_es import kill_in_generation_3, rows_without_time

    reference = _imitation_run(tmp_path / "a", 5.0)
    train_controller.run(reference)
    cfg = _imitation_run(tmp_path / "b", 5.0)
    kill_in_generation_3(cfg, monkeypatch)
    train_controller.run(cfg)
    assert rows_without_time(cfg) == rows_without_time(reference)


@pytest.mark.parametrize("weight", [0.0, 30000.0])
def test_the_fitness_plot_gives_the_returns_their_own_axis_when_the_fitness_is_penalised(
    tmp_path, monkeypatch, weight
):
    """With ``controller.imitate_weight`` the fitness (return - weight x loss) is on another scale than the
    best candidate's dream and real returns: those go to the right-hand axis; without it, one axis."""
    drawn = {}
    monkeypatch.setattr(
        train_controller, "plot_curves", lambda path, series, **kw: drawn.update(kw, series=series)
    )
    rows = [
        {"generation": 1, "best": -16000.0, "mean": -16500.0, "worst": -17000.0},
        {
            "generation": 2,
            "best": -15900.0,
            "mean": -16400.0,
            "worst": -16900.0,
            "eval_mean": 1600.0,
            "real_mean": 1900.0,
        },
    ]
    start = {"eval_mean": 1400.0, "real_mean": 1650.0}
    train_controller._plot(tmp_path / "fitness.png", rows, start, "dream", weight)
    returns = {
        "best candidate, dream (more episodes)": ([0, 2], [1400.0, 1600.0]),
        "best candidate, real game": ([0, 2], [1650.0, 1900.0]),
    }
    fitness = {name: ([1, 2], [row[name] for row in rows]) for name in ("best", "mean", "worst")}
    if weight:
        assert drawn["series"] == fitness and drawn["right"] == returns
        assert "30000 x imitation loss" in drawn["ylabel"]
    else:
        assert drawn["series"] == {**fitness, **returns} and "right" not in drawn
