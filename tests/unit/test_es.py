"""CMA-ES: it improves fitness on cheap tasks, its state is plain data, and a killed run resumes exactly as if
it had never stopped. (The rollout actors' pool, which replaces a crashing actor and evaluates its candidate
again, is tested in tests/integration/test_pool.py.)"""

import dataclasses
import itertools
import json
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from frmdn_worldmodels.data.episodes import save_latents
from frmdn_worldmodels.models.memory import MemoryModel
from frmdn_worldmodels.runtime import records as stages
from frmdn_worldmodels.runtime.config import ConfigError, load_config
from frmdn_worldmodels.runtime.io import load_checkpoint, read_jsonl, save_checkpoint
from frmdn_worldmodels.runtime.paths import run_paths
from frmdn_worldmodels.runtime.records import recorded_seconds
from frmdn_worldmodels.stages import train_controller
from frmdn_worldmodels.train.es import CMAES

Z = 4


def quadratic(candidates: np.ndarray) -> np.ndarray:
    """A fitness to maximise: minus an ill-conditioned quadratic with its optimum at 1."""
    return -np.sum((candidates - 1.0) ** 2 * np.arange(1, candidates.shape[1] + 1), axis=1)


def evolve(es: CMAES, generations: int) -> CMAES:
    for _ in range(generations):
        candidates = es.ask()
        es.tell(candidates, quadratic(candidates))
    return es


@pytest.mark.parametrize("diagonal", [False, True])
def test_cmaes_improves_a_toy_quadratic(diagonal):
    es = evolve(CMAES(np.zeros(8), 0.5, population=10, seed=0, diagonal=diagonal), 40)
    assert es.generation == 40
    assert quadratic(es.mean[None])[0] > 0.01 * quadratic(np.zeros((1, 8)))[0]  # 100x closer to the optimum


def _state_sizes(state) -> list[int]:
    if isinstance(state, torch.Tensor):
        return [state.numel()]
    if isinstance(state, (list, tuple)):
        return [size for item in state for size in _state_sizes(item)]
    if isinstance(state, dict):
        return [size for item in state.values() for size in _state_sizes(item)]
    return []


@pytest.mark.parametrize(
    "dim, population, diagonal", [(10, 8, False), (120, 16, False), (5, 4, False), (120, 16, True)]
)
def test_es_state_is_plain_data_and_resumes_bit_for_bit(tmp_path, dim, population, diagonal):
    uninterrupted = evolve(CMAES(np.zeros(dim), 0.3, population, seed=4, diagonal=diagonal), 7)
    first_part = evolve(CMAES(np.zeros(dim), 0.3, population, seed=4, diagonal=diagonal), 3)
    state = first_part.state_dict()
    # sep-CMA-ES keeps vectors only; the full strategy its n x n covariance and eigen basis
    assert (max(_state_sizes(state)) < dim * dim) == diagonal
    save_checkpoint(tmp_path / "es.pt", es=state)
    del first_part
    resumed = CMAES.from_state_dict(load_checkpoint(tmp_path / "es.pt")["es"])  # weights_only=True load
    assert resumed.generation == 3 and resumed.diagonal == diagonal
    evolve(resumed, 4)
    assert resumed.generation == 7
    assert np.array_equal(resumed.mean, uninterrupted.mean) and resumed.sigma == uninterrupted.sigma
    if diagonal:  # the diagonal's scales moved away from 1 and were restored
        scales = resumed.es.sigma_vec.scaling
        assert not np.allclose(scales, 1.0) and np.array_equal(scales, uninterrupted.es.sigma_vec.scaling)
    else:
        assert np.array_equal(resumed.es.sm.C, uninterrupted.es.sm.C)
    assert np.array_equal(resumed.ask(), uninterrupted.ask())


def test_tell_refuses_bad_fitness():
    es = CMAES(np.zeros(3), 0.3, 6, seed=0)
    candidates = es.ask()
    with pytest.raises(ValueError, match="finite"):
        es.tell(candidates, np.array([1.0, np.nan, 0, 0, 0, 0]))


# ---- train-controller in a tiny dream ----------------------------------------------------------------------


def tiny_run(root, generations=6, extra=()):
    """A run folder with a memory whose reward the actions can steer, and a few latents files."""
    cfg = load_config(
        None,
        [
            f"runs_dir={root}",
            "memory.hidden=8",
            "memory.components=2",
            "memory.rank=1",
            "memory.flow_hidden=8",
            f"controller.generations={generations}",
            "controller.population=8",
            "controller.rollouts=2",
            "controller.sigma=0.5",
            "controller.eval_every=2",
            "controller.eval_episodes=4",
            "controller.eval_real_episodes=0",  # a dream of its own: no VAE for the real game
            "env.max_steps=10",
            *extra,
        ],
    )
    torch.manual_seed(0)
    memory = MemoryModel(Z, 3, cfg.memory)
    with torch.no_grad():
        memory.lstm.weight_ih_l0[:, Z:] *= 10.0  # the actions drive h, and h the reward
        memory.reward_head.weight.normal_()
        memory.reward_head.bias.zero_()
        memory.done_head.bias.fill_(-20.0)
    paths = run_paths(cfg)
    save_checkpoint(paths.memory / "memory.pt", **memory.to_checkpoint())
    rng = np.random.default_rng(0)
    for i in range(3):
        save_latents(
            paths.latents / f"ep_{i:05d}.npz",
            rng.normal(size=(6, Z)),
            np.full((6, Z), -2.0),
            rng.uniform(0, 1, (5, 3)),
            np.zeros(5),
            np.zeros(5, bool),
        )
    return cfg


def rows_without_time(cfg):
    return [
        {k: v for k, v in row.items() if k != "seconds"}
        for row in read_jsonl(run_paths(cfg).controller / "metrics.jsonl")
    ]


def test_train_controller_in_a_tiny_dream_improves_fitness(tmp_path):
    cfg = tiny_run(tmp_path, generations=10, extra=["controller.sigma=1.0"])
    summary = train_controller.run(cfg)
    out = run_paths(cfg).controller
    rows = read_jsonl(out / "metrics.jsonl")
    assert [row["generation"] for row in rows] == list(range(1, 11))
    # no dream ends before the game would (done bias -20): a dream from step t of a real episode lasts the
    # 10 - t steps the game had left (dream_start: any; the episodes have 5 steps)
    assert all(6 <= row["mean_length"] <= 10 for row in rows) and min(row["mean_length"] for row in rows) < 10
    assert (
        np.mean([row["mean"] for row in rows[-3:]]) > rows[0]["mean"] + 2.0
    )  # the population's mean fitness rises
    assert summary["generations"] == 10 and summary["train_in"] == "dream"
    best = load_checkpoint(out / "best.pt")
    assert best["params"].shape == (summary["num_params"],) and best["fitness"] == summary["best_score"]
    assert best["generation"] in (2, 4, 6, 8, 10) and "eval_mean" in rows[best["generation"] - 1]
    # the kept candidate beats the starting controller (zeros) on the dream
    fitness = train_controller.DreamFitness(cfg, *_memory_and_controller(cfg))
    dreamt = fitness.dream.rollout(best["params"][None], 32, torch.Generator().manual_seed(0))
    assert torch.equal(dreamt.lengths[0], fitness.dream.dynamics.limits[dreamt.starts])
    assert (
        fitness.episodes(best["params"].numpy(), 8, 99).mean()
        > fitness.episodes(np.zeros_like(best["params"]), 8, 99).mean()
    )
    for name in ("es_state.pt", "fitness.png", "summary.json", "config.yaml"):
        assert (out / name).exists()
    assert train_controller.run(cfg)["skipped"] is True


def test_dreams_that_end_far_sooner_than_the_game_are_flagged(tmp_path, capsys):
    cfg = tiny_run(tmp_path, generations=1, extra=["controller.dream_start=first"])
    path = run_paths(cfg).memory / "memory.pt"
    payload = load_checkpoint(path)
    payload["state_dict"]["done_head.bias"].fill_(20.0)  # every dream ends after its first step
    save_checkpoint(path, **payload)
    train_controller.run(cfg)
    assert (
        "dreams last 1 steps on average, the real episodes went on for 5 from the same frames"
        in capsys.readouterr().err
    )
    assert read_jsonl(run_paths(cfg).controller / "metrics.jsonl")[0]["mean_length"] == 1
    # from any frame of the 5-step episodes, the real game went on for 3 steps on average (5, 4, 3, 2 or 1)
    anywhere = dataclasses.replace(cfg, controller=dataclasses.replace(cfg.controller, dream_start="any"))
    fitness = train_controller.DreamFitness(anywhere, *_memory_and_controller(cfg))
    assert fitness.real_length == 3.0


def test_train_controller_dreams_from_any_frame_and_refuses_unknown_starts(tmp_path):
    cfg = tiny_run(
        tmp_path, generations=2, extra=["controller.dream_start=any", "controller.dream_start_limit=8"]
    )
    fitness = train_controller.DreamFitness(cfg, *_memory_and_controller(cfg))
    hidden, cell = fitness.dream.initial_state
    assert len(fitness.dream.initial_mu) == len(hidden) == 6  # 8 // 3 episodes = 2 frames from each
    assert (
        hidden.abs().sum(1).gt(0).sum() >= 3 and cell.abs().sum(1).gt(0).sum() >= 3
    )  # not only first frames
    assert train_controller.run(cfg)["generations"] == 2
    with pytest.raises(ConfigError, match="controller.dream_start must be one of first, any, got 'middle'"):
        tiny_run(tmp_path / "bad", extra=["controller.dream_start=middle"])  # refused as it is read
    bad = dataclasses.replace(cfg, controller=dataclasses.replace(cfg.controller, dream_start="middle"))
    with pytest.raises(ConfigError, match="controller.dream_start"):
        train_controller.run(bad)  # and a config built in code, by the stage


def test_train_controller_trains_a_controller_with_a_hidden_layer(tmp_path):
    extra = ["controller.hidden=4", "controller.sigma=1.0"]
    cfg = tiny_run(tmp_path, generations=6, extra=extra)
    summary = train_controller.run(cfg)
    out = run_paths(cfg).controller
    best = load_checkpoint(out / "best.pt")
    assert best["controller"]["hidden"] == 4 and summary["num_params"] == (Z + 8 + 1) * 4 + (4 + 1) * 3
    assert best["params"].shape == (summary["num_params"],) and np.isfinite(summary["best_score"])
    rows = read_jsonl(out / "metrics.jsonl")
    assert [row["generation"] for row in rows] == list(range(1, 7))
    assert rows[-1]["mean"] > rows[0]["mean"] + 2.0  # the population's mean fitness rises
    fitness = train_controller.DreamFitness(cfg, *_memory_and_controller(cfg))
    assert fitness.dream.controller.hidden == 4
    again = tiny_run(tmp_path / "again", generations=6, extra=extra)
    train_controller.run(again)
    assert rows_without_time(again) == rows_without_time(cfg)  # the same config, the same run
    # the hidden size is a setting of the stage: another one redoes it
    assert train_controller.run(tiny_run(tmp_path, generations=1))["num_params"] == (Z + 8 + 1) * 3
    with pytest.raises(ConfigError, match="controller.hidden"):
        train_controller.run(tiny_run(tmp_path / "bad", extra=["controller.hidden=-2"]))
    diagonal = tiny_run(
        tmp_path / "diagonal", generations=2, extra=[*extra, "controller.covariance=diagonal"]
    )
    train_controller.run(diagonal)
    state = load_checkpoint(run_paths(diagonal).controller / "es_state.pt")["es"]
    assert state["diagonal"] is True  # the checkpoint says so: from_state_dict rebuilds sep-CMA-ES
    with pytest.raises(ConfigError, match="controller.covariance must be one of full, diagonal"):
        train_controller.run(tiny_run(tmp_path / "bad", extra=["controller.covariance=sparse"]))


def _memory_and_controller(cfg):
    from frmdn_worldmodels.agent.play import controller_for
    from frmdn_worldmodels.dream.env import load_memory

    memory = load_memory(cfg)
    return memory, controller_for(cfg.env, memory, cfg.controller)


def kill_in_generation_3(cfg, monkeypatch) -> None:
    """Run train-controller on ``cfg`` until the process dies in the middle of generation 3."""
    real_population = train_controller.DreamFitness.population

    def killed_in_generation_3(self, candidates, rollouts, generation):
        if generation == 2:
            raise KeyboardInterrupt
        return real_population(self, candidates, rollouts, generation)

    monkeypatch.setattr(train_controller.DreamFitness, "population", killed_in_generation_3)
    with pytest.raises(KeyboardInterrupt):
        train_controller.run(cfg)
    monkeypatch.undo()


def test_train_controller_resumes_after_a_kill_as_if_uninterrupted(tmp_path, monkeypatch):
    reference_cfg = tiny_run(tmp_path / "a", generations=5)
    train_controller.run(reference_cfg)

    cfg = tiny_run(tmp_path / "b", generations=5)
    ticks = itertools.count()  # a clock that moves one second each time the stage reads it
    monkeypatch.setattr(stages, "time", SimpleNamespace(monotonic=lambda: float(next(ticks))))
    kill_in_generation_3(cfg, monkeypatch)
    out = run_paths(cfg).controller
    assert CMAES.from_state_dict(load_checkpoint(out / "es_state.pt")["es"]).generation == 2
    assert recorded_seconds(out) == 2.0  # opened at 0, the checkpoints of generations 1 and 2 at 1 and 2
    # a metrics row written just before a kill, without its checkpoint, must not survive the resume
    with open(out / "metrics.jsonl", "a") as handle:
        handle.write(
            json.dumps({"generation": 3, "best": 0.0, "mean": 0.0, "worst": 0.0, "sigma": 1.0}) + "\n"
        )

    summary = train_controller.run(cfg)
    assert summary["generations"] == 5
    assert rows_without_time(cfg) == rows_without_time(reference_cfg)
    ours, theirs = (
        load_checkpoint(out / "best.pt"),
        load_checkpoint(run_paths(reference_cfg).controller / "best.pt"),
    )
    assert torch.equal(ours["params"], theirs["params"]) and ours["generation"] == theirs["generation"]
    es_ours = CMAES.from_state_dict(load_checkpoint(out / "es_state.pt")["es"])
    es_theirs = CMAES.from_state_dict(
        load_checkpoint(run_paths(reference_cfg).controller / "es_state.pt")["es"]
    )
    assert np.array_equal(es_ours.mean, es_theirs.mean) and es_ours.sigma == es_theirs.sigma

    # more generations continue the finished run; a different population cannot reuse its state: the stage is
    # refused with --refuse-stale, else redone from generation 0
    cfg_more = tiny_run(tmp_path / "b", generations=7)
    assert train_controller.run(cfg_more)["generations"] == 7
    with pytest.raises(ConfigError, match=r"controller.population: \d+ -> 6"):
        train_controller.run(
            tiny_run(tmp_path / "b", generations=9, extra=["controller.population=6", "stale=refuse"])
        )
    redone = train_controller.run(tiny_run(tmp_path / "b", generations=2, extra=["controller.population=6"]))
    assert redone["population"] == 6 and redone["generations"] == 2 and "skipped" not in redone
    # fewer generations than a finished run holds: stale, so redone as well
    assert (
        train_controller.run(tiny_run(tmp_path / "b", generations=1, extra=["controller.population=6"]))[
            "generations"
        ]
        == 1
    )


@pytest.mark.slow
def test_train_controller_killed_with_sigkill_resumes_from_its_checkpoint(tmp_path):
    """The command line, killed for real (SIGKILL) after a generation, then run again: same result as
    uninterrupted."""
    import signal
    import subprocess
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    overrides = [
        "memory.hidden=8",
        "memory.components=2",
        "memory.rank=1",
        "memory.flow_hidden=8",
        "controller.generations=12",
        "controller.population=8",
        "controller.rollouts=2",
        "controller.sigma=0.5",
        "controller.eval_every=2",
        "controller.eval_episodes=4",
        "env.max_steps=10",
    ]
    reference = tiny_run(tmp_path / "a", generations=12)
    train_controller.run(reference)
    cfg = tiny_run(tmp_path / "b", generations=12)
    command = [sys.executable, "run.py", "train-controller", "--set", f"runs_dir={tmp_path / 'b'}"]
    for override in overrides:
        command += ["--set", override]
    state = run_paths(cfg).controller / "es_state.pt"
    process = subprocess.Popen(command, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not state.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = CMAES.from_state_dict(load_checkpoint(state)["es"]).generation
    assert 1 <= killed_at < 12
    finished = subprocess.run(command, check=False, cwd=root, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr
    assert rows_without_time(cfg) == rows_without_time(reference)


def test_controller_seed_replicates_the_search_on_the_same_evaluations(tmp_path):
    """``controller.seed`` draws another search (its candidates and training dreams) on the same M, and scores
    it on the run's evaluation dreams; its value equal to the run's seed is the run's own search."""
    runs = {
        name: tiny_run(tmp_path / name, generations=2, extra=extra)
        for name, extra in (("run", []), ("same", ["controller.seed=0"]), ("other", ["controller.seed=7"]))
    }
    for cfg in runs.values():
        train_controller.run(cfg)
    rows = {name: rows_without_time(cfg) for name, cfg in runs.items()}
    assert rows["same"] == rows["run"]
    assert rows["other"][0]["mean"] != rows["run"][0]["mean"]
    fitness = {
        name: train_controller.DreamFitness(cfg, *_memory_and_controller(cfg)) for name, cfg in runs.items()
    }
    params = np.full(load_checkpoint(run_paths(runs["run"]).controller / "best.pt")["params"].shape, 0.3)
    assert np.array_equal(fitness["other"].episodes(params, 4, 2), fitness["run"].episodes(params, 4, 2))
    train = [f.population(params[None], 4, 1)[0] for f in (fitness["run"], fitness["other"])]
    assert not np.array_equal(*train)


def test_keep_mean_scores_and_keeps_the_cma_es_mean(tmp_path):
    """``controller.keep: mean`` scores CMA-ES's mean at each periodic evaluation, not the generation's best
    candidate; the search itself is the same."""
    runs = {
        keep: tiny_run(tmp_path / keep, generations=2, extra=[f"controller.keep={keep}"])
        for keep in ("champion", "mean")
    }
    for cfg in runs.values():
        train_controller.run(cfg)
    rows = {keep: rows_without_time(cfg) for keep, cfg in runs.items()}
    search = ("generation", "best", "mean", "worst", "sigma")
    assert [{k: r[k] for k in search} for r in rows["mean"]] == [
        {k: r[k] for k in search} for r in rows["champion"]
    ]
    assert rows["mean"][-1]["eval_mean"] != rows["champion"][-1]["eval_mean"]
    controller = run_paths(runs["mean"]).controller
    es = CMAES.from_state_dict(load_checkpoint(controller / "es_state.pt")["es"])
    best = load_checkpoint(controller / "best.pt")
    assert best["generation"] == 2
    np.testing.assert_array_equal(best["params"].numpy(), es.mean.astype(np.float32))
