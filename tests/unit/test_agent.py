"""The V + M + C agent in the real game: alignment (C acts on z_t and the h_t from before M reads (z_t, a_t)),
the z choice matching memory training, seeded episodes, the Ray rollout worker on CarRacing, and the
``evaluate`` / ``dream`` commands end to end on a tiny run."""

import io

import gymnasium
import imageio.v3 as iio
import numpy as np
import pytest
import torch
from gymnasium import spaces

from frmdn_worldmodels.agent.play import (
    ControllerPlayer,
    Episode,
    WorldModelAgent,
    controller_for,
    play_episode,
    play_episodes,
)
from frmdn_worldmodels.agent.workers import RolloutWorker
from frmdn_worldmodels.data.episodes import save_latents
from frmdn_worldmodels.games.envs import action_dim
from frmdn_worldmodels.models.controller import Controller
from frmdn_worldmodels.models.memory import MemoryModel
from frmdn_worldmodels.models.vae import ConvVAE, frames_to_tensor
from frmdn_worldmodels.runtime.config import ControllerConfig, EnvConfig, MemoryConfig, load_config
from frmdn_worldmodels.runtime.io import save_checkpoint
from frmdn_worldmodels.runtime.paths import run_paths
from frmdn_worldmodels.stages import evaluate
from frmdn_worldmodels.stages.collect import EpisodeSet, EpisodeWorker, episode_seeds, rollout_episode
from tests.tracing import TracedMemory

Z, H = 8, 12


class NoiseGame(gymnasium.Env):
    """Random uint8 64x64 frames from ``np_random``; ends after ``length`` steps; reward = first action
    number."""

    def __init__(self, action_space, length=6):
        self.observation_space = spaces.Box(0, 255, (64, 64, 3), np.uint8)
        self.action_space, self.length = action_space, length

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return self.np_random.integers(0, 256, (64, 64, 3), dtype=np.uint8), {}

    def step(self, action):
        self.t += 1
        reward = float(np.asarray(action, dtype=np.float64).reshape(-1)[0])
        obs = self.np_random.integers(0, 256, (64, 64, 3), dtype=np.uint8)
        return obs, reward, self.t >= self.length, False, {}


def models(actions=3, cls=MemoryModel, seed=0):
    torch.manual_seed(seed)
    memory = cls(Z, actions, MemoryConfig(hidden=H, components=2, rank=1, flow_hidden=8))
    with torch.no_grad():
        for parameter in memory.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    return ConvVAE(Z).eval(), memory.eval()


@pytest.mark.parametrize("discrete", [False, True])
def test_agent_acts_on_z_and_the_h_from_before_the_memory_reads_z_and_a(discrete):
    actions = 5 if discrete else 3
    vae, memory = models(actions, cls=TracedMemory)
    controller = Controller(Z, H, actions, discrete)
    torch.manual_seed(1)
    params = 2.0 * torch.randn(controller.num_params)
    weight, bias = controller.split(params)
    weight[:, :Z] *= 0.01  # mostly h decides, so acting on the wrong h would show
    bias.zero_()
    agent = WorldModelAgent(vae, memory, controller, params, use_mu=True)
    game = NoiseGame(spaces.Discrete(5) if discrete else spaces.Box(-1.0, 1.0, (3,), np.float32))
    obs, _ = game.reset(seed=0)
    agent.reset(0)
    frames, taken = [], []
    for _ in range(5):
        frames.append(obs)
        taken.append(agent.act(obs))
        obs, *_ = game.step(taken[-1])
    # float32: the agent encodes with oneDNN off, this reference with the default conv kernel (and the matmul
    # kernels differ between machines), so the actions agree up to rounding (~1e-9 seen), not bit for bit
    tolerance = dict(rtol=1e-5, atol=1e-6)
    # per step, how far the action on the h after reading (z_t, a_t) is from the one on the h before
    gaps = []
    with torch.no_grad():
        for t, read in enumerate(memory.trace):
            z_t = vae.encode(frames_to_tensor(frames[t][None]))[0]  # use_mu: the posterior mean
            torch.testing.assert_close(read["y"], z_t)
            expected_h = torch.zeros(1, H) if t == 0 else memory.trace[t - 1]["h_after"]
            torch.testing.assert_close(read["h_before"], expected_h, rtol=0, atol=0)  # h_0 = 0, then carried
            action = controller.act(params, z_t, read["h_before"])
            if discrete:  # argmax indices
                np.testing.assert_array_equal(np.asarray(taken[t]), action[0].numpy())
            else:
                np.testing.assert_allclose(np.asarray(taken[t]), action[0].numpy(), **tolerance)
            torch.testing.assert_close(read["cond"], controller.encode(action))  # M reads the action taken
            after = controller.act(params, z_t, read["h_after"])
            gaps.append((after - action).abs().max().item())
    # so the check above can tell "before" from "after": some argmax changes; every continuous action
    # (in [-1, 1], so within atol + rtol of the reference) moves far beyond the tolerance (>= 0.03 here)
    if discrete:
        assert max(gaps) > 0, gaps
    else:
        assert min(gaps) > 100 * (tolerance["atol"] + tolerance["rtol"]), gaps


def test_a_sampling_agent_draws_each_episodes_actions_from_its_seed():
    """``controller.policy: sample``: at zero parameters every action is drawn uniformly, the same seeds
    repeat the same actions, each env's draws do not depend on the others in the batch, and a large logit
    makes its action almost certain."""
    vae, memory = models(5)
    controller = Controller(Z, H, 5, True, sample=True)
    agent = WorldModelAgent(vae, memory, controller, torch.zeros(controller.num_params), use_mu=True)
    frames = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)

    def play(seeds: list[int], steps: int = 60) -> np.ndarray:
        agent.reset(seeds)
        return np.array([agent.act(frames[: len(seeds)]) for _ in range(steps)])

    together = play([1, 2, 3])
    assert np.array_equal(play([1, 2, 3]), together)
    assert np.array_equal(play([1])[:, 0], together[:, 0])
    assert not np.array_equal(together[:, 0], together[:, 1])
    assert set(together.ravel().tolist()) == set(range(5))
    params = torch.zeros(controller.num_params)
    controller.split(params)[1][2] = 20.0
    agent.set_params(params)
    assert (play([1, 2, 3]) == 2).mean() > 0.99


def test_agent_samples_z_from_the_posterior_unless_use_mu():
    vae, memory = models()
    controller = Controller(Z, H, 3, False)
    frame = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    agent = WorldModelAgent(vae, memory, controller, torch.zeros(controller.num_params), use_mu=False)
    with torch.no_grad():
        mu, logvar = vae.encode(frames_to_tensor(frame[None]))
        agent.reset(3)
        first = agent.encode(frame[None])
        agent.reset(3)
        assert torch.equal(agent.encode(frame[None]), first)  # seeded per episode
        offsets = (first - mu) / torch.exp(0.5 * logvar)
        assert 0 < offsets.abs().max() < 6
        agent.use_mu = True
        torch.testing.assert_close(
            agent.encode(frame[None]), mu
        )  # the mean (up to the conv kernel's rounding)
        # a batch of frames (encoded with oneDNN, channels-last) gives the same means, each env its own noise
        frames = np.random.default_rng(1).integers(0, 256, (5, 64, 64, 3), dtype=np.uint8)
        torch.testing.assert_close(
            agent.encode(frames), vae.encode(frames_to_tensor(frames))[0], rtol=1e-4, atol=1e-5
        )
        agent.use_mu = False
        agent.reset([3, 4, 5, 6, 7])
        batch = agent.encode(np.repeat(frame[None], 5, axis=0))
        torch.testing.assert_close(
            batch[0], first[0], rtol=1e-4, atol=1e-5
        )  # env 0 draws what seed 3 drew alone
        assert not torch.allclose(batch[1], batch[0])


def test_episodes_are_reproducible_from_their_seed():
    vae, memory = models()
    controller = Controller(Z, H, 3, False)
    agent = WorldModelAgent(vae, memory, controller, torch.randn(controller.num_params), use_mu=False)
    game = NoiseGame(spaces.Box(-1.0, 1.0, (3,), np.float32), length=7)
    first, again = play_episode(game, agent, 5, record=True), play_episode(game, agent, 5)
    assert first.ret == again.ret and first.steps == 7 and len(first.frames) == 8
    randomly, randomly_again = play_episode(game, None, 5), play_episode(game, None, 5)
    assert randomly.ret == randomly_again.ret != play_episode(game, None, 6).ret
    assert play_episode(game, agent, 5, max_steps=3).steps == 3


@pytest.mark.parametrize("hidden", [0, 4])
def test_lockstep_episodes_match_episodes_played_alone(hidden):
    """[N, n] (one controller per env, the population form) against [n] (each alone), linear and with Ha's
    hidden layer."""
    vae, memory = models()
    controller = Controller(Z, H, 3, False, hidden)
    population = torch.randn(3, controller.num_params)
    games = [NoiseGame(spaces.Box(-1.0, 1.0, (3,), np.float32), length=length) for length in (4, 7, 5)]
    agent = WorldModelAgent(vae, memory, controller, population, use_mu=False)  # one controller per env
    together = play_episodes(games, agent, [10, 11, 12], record=True)
    assert [episode.steps for episode in together] == [4, 7, 5]  # each stops at its own end
    for i, game in enumerate(games):
        alone = play_episode(game, WorldModelAgent(vae, memory, controller, population[i]), 10 + i)
        assert together[i].ret == pytest.approx(alone.ret, rel=1e-4, abs=1e-5)
    assert len({round(episode.ret, 3) for episode in together}) == 3
    randomly = play_episodes(games, None, [10, 11, 12])
    assert [episode.ret for episode in randomly] == [
        play_episode(g, None, 10 + i).ret for i, g in enumerate(games)
    ]


def test_rollout_worker_plays_carracing_with_the_models_it_holds():
    env_cfg = EnvConfig(name="carracing", max_steps=1000)
    vae, memory = models()
    worker = RolloutWorker(env_cfg, vae.state_dict(), memory.to_checkpoint(), use_mu=False, max_steps=6)
    assert worker.controller == Controller(Z, H, action_dim(env_cfg), False)
    hidden = RolloutWorker(
        env_cfg, vae.state_dict(), memory.to_checkpoint(), False, 6, controller=ControllerConfig(hidden=4)
    )
    assert hidden.controller == Controller(Z, H, action_dim(env_cfg), False, hidden=4)
    hidden.close()
    params = np.random.default_rng(0).normal(size=worker.controller.num_params).astype(np.float32)
    first, second = worker.evaluate(params, [11, 12], record=True)
    assert second.seed == 12 and second.steps == 6
    assert first.steps == 6 and len(first.frames) == 7 and first.frames[0].shape == (64, 64, 3)
    assert worker.evaluate(params, [11, 12])[0].ret == first.ret  # same seed, same episode
    assert worker.evaluate(None, [11])[0].steps == 6
    # one controller per episode, in lockstep: episode i is the one controller i plays alone
    per_episode = np.stack([params, np.zeros_like(params)])
    mixed = worker.evaluate(per_episode, [11, 11])
    assert mixed[0].ret == pytest.approx(first.ret, rel=1e-4, abs=1e-5)
    assert mixed[1].ret == pytest.approx(
        worker.evaluate(np.zeros_like(params), [11])[0].ret, rel=1e-4, abs=1e-5
    )
    worker.close()


def test_the_collector_plays_a_controller_as_the_rollout_worker_does():
    """Iterative training collects with the collect stage's worker and a ``ControllerPlayer``: without noise,
    the episode it writes is the one the rollout worker plays on the same env seed; action noise changes the
    actions, seeded by the episode (the same episode twice is the same file)."""
    env_cfg = EnvConfig(name="carracing", max_steps=6)
    vae, memory = models()
    controller = controller_for(env_cfg, memory, ControllerConfig())
    params = np.random.default_rng(0).normal(size=controller.num_params).astype(np.float32)
    state, payload = vae.state_dict(), memory.to_checkpoint()

    def worker(noise: str, scale: float) -> EpisodeWorker:
        player = ControllerPlayer(env_cfg, state, payload, params, False, ControllerConfig(), noise, scale)
        return EpisodeWorker(env_cfg, EpisodeSet(2, player, "it01_", "iterate-collect", (1,)))

    plain = worker("params", 0.0)
    result = plain.collect(0, 5)
    seed = episode_seeds(5, 0, "iterate-collect", (1,))[0]
    rollout = RolloutWorker(env_cfg, state, payload, use_mu=False, max_steps=6)
    played = rollout.evaluate(params, [seed], record=True)[0]
    with np.load(io.BytesIO(result["data"])) as arrays:
        np.testing.assert_allclose(arrays["actions"], np.stack(played.actions), atol=1e-5)
        assert arrays["rewards"].sum() == pytest.approx(played.ret, abs=1e-4)
    noisy = worker("action", 0.5)
    first, again = noisy.collect(0, 5)["data"], noisy.collect(0, 5)["data"]
    with np.load(io.BytesIO(first)) as arrays:
        assert np.abs(arrays["actions"] - np.stack(played.actions)).max() > 0.01
    assert first == again
    for each in (plain, noisy):
        each.close()
    rollout.close()


# ---- the commands on a tiny run ----------------------------------------------------------------------------


@pytest.fixture
def agent_run(tmp_path):
    cfg = load_config(
        None,
        [
            f"runs_dir={tmp_path}",
            f"vae.latent_dim={Z}",
            f"memory.hidden={H}",
            "memory.components=2",
            "memory.rank=1",
            "memory.flow_hidden=8",
            "env.max_steps=6",
            "evaluate.episodes=3",
            "evaluate.video_scale=1",
            "controller.workers=2",
        ],
    )
    vae, memory = models()
    paths = run_paths(cfg)
    save_checkpoint(paths.vae / "vae.pt", state_dict=vae.state_dict())
    save_checkpoint(paths.memory / "memory.pt", **memory.to_checkpoint())
    rng = np.random.default_rng(0)
    for i in range(2):
        save_latents(
            paths.latents / f"ep_{i:05d}.npz",
            rng.normal(size=(4, Z)),
            np.full((4, Z), -2.0),
            rng.uniform(0, 1, (3, 3)),
            np.zeros(3),
            np.zeros(3, bool),
        )
    controller = controller_for(cfg.env, memory, cfg.controller)
    params = torch.as_tensor(rng.normal(size=controller.num_params), dtype=torch.float32)
    save_checkpoint(
        paths.controller / "best.pt",
        params=params,
        controller=controller.to_dict(),
        fitness=1.0,
        generation=3,
        train_in="dream",
    )
    return cfg


def test_dream_command_renders_a_dream_of_the_controller(agent_run):
    summary = evaluate.run_dream(agent_run)
    video = iio.imread(summary["video"])
    assert video.shape == (summary["steps"] + 1, 64, 64, 3)
    assert 1 <= summary["steps"] <= 6 and summary["ended"] in ("done", "horizon")
    # the sheet holds every frame of a dream this short, first to last, in rows of 5 (64 px + 2 px of pad)
    sheet = iio.imread(summary["sheet"])[..., :3]
    frames = summary["steps"] + 1
    rows, columns = -(-frames // 5), min(frames, 5)
    assert sheet.shape == (rows * 66 + 2, columns * 66 + 2, 3)
    np.testing.assert_allclose(sheet[2:66, 2:66], video[0], atol=8)  # the gif's palette rounds colours


def test_the_dream_sheet_spreads_its_frames_over_the_whole_dream():
    from frmdn_worldmodels.stages.evaluate import dream_sheet

    frames = [np.full((2, 2, 3), i, np.uint8) for i in range(101)]
    rows = dream_sheet(frames)
    picked = [int(tile[0, 0, 0]) for row in rows for tile in row]
    assert [len(row) for row in rows] == [5, 5, 5, 5] and picked[0] == 0 and picked[-1] == 100
    assert all(5 <= b - a <= 6 for a, b in zip(picked, picked[1:]))
    assert [int(tile[0, 0, 0]) for row in dream_sheet(frames[:3]) for tile in row] == [0, 1, 2]


def test_dream_and_evaluate_rebuild_a_hidden_layer_controller_and_refuse_another_shape(agent_run):
    from dataclasses import replace

    from frmdn_worldmodels.runtime.io import DataError, load_checkpoint

    hidden_cfg = replace(agent_run, controller=replace(agent_run.controller, hidden=4))
    for command in (evaluate.run, evaluate.run_dream):  # best.pt holds a linear controller
        with pytest.raises(DataError, match="train the controller again"):
            command(hidden_cfg)
    path = run_paths(agent_run).controller / "best.pt"
    best = load_checkpoint(path)
    controller = controller_for(agent_run.env, models()[1], hidden_cfg.controller)
    params = controller.initial_params(torch.Generator().manual_seed(3), scale=1.0)
    save_checkpoint(path, **{**best, "params": params, "controller": controller.to_dict()})
    summary = evaluate.run_dream(hidden_cfg)
    assert 1 <= summary["steps"] <= 6 and iio.imread(summary["video"]).shape[0] == summary["steps"] + 1
    with pytest.raises(DataError, match="hidden=4"):  # a linear config, a hidden-layer best.pt
        evaluate.run_dream(agent_run)


def test_dream_only_fields_are_named_only_when_candidates_are_scored_in_the_real_game():
    from dataclasses import replace

    from frmdn_worldmodels.runtime.config import ControllerConfig
    from frmdn_worldmodels.stages.train_controller import unused_in_real

    cfg = load_config(None)
    dreamy = replace(ControllerConfig(), temperature=1.3, dream_threads=2)
    assert unused_in_real(replace(cfg, controller=replace(dreamy, train_in="dream"))) == []
    assert unused_in_real(replace(cfg, controller=replace(ControllerConfig(), train_in="real"))) == []
    assert unused_in_real(replace(cfg, controller=replace(dreamy, train_in="real"))) == [
        "controller.temperature=1.3",
        "controller.dream_threads=2",
    ]


class _WalkRight(gymnasium.Env):
    """A stand-in for Super Mario Bros: reports ``x_pos`` in info, moving right by the action taken."""

    observation_space = gymnasium.spaces.Box(0, 255, (64, 64, 3), np.uint8)
    action_space = gymnasium.spaces.Discrete(3)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.x = 40
        return np.zeros((64, 64, 3), np.uint8), {"x_pos": self.x}

    def step(self, action):
        self.x += int(action) - 1
        return np.zeros((64, 64, 3), np.uint8), float(int(action) - 1), False, False, {"x_pos": self.x}


def test_play_episodes_records_the_furthest_x_position():
    episodes = play_episodes([_WalkRight(), _WalkRight()], None, seeds=[1, 2], max_steps=30)
    for episode in episodes:
        assert episode.max_x is not None and episode.max_x >= 40
        assert episode.max_x >= 40 + episode.ret  # x moved by the summed rewards at the end, and max >= end
    bare = play_episodes([gymnasium.make("CartPole-v1")], None, seeds=[0], max_steps=5)
    assert bare[0].max_x is None


def test_recorded_episodes_note_where_mario_is_in_every_frame():
    """The controller's recorded episodes (M's data in the iterations) carry the sprites' positions as
    collection's do, so a V weighted on them can train on them."""
    from frmdn_worldmodels.games.envs import make_env
    from frmdn_worldmodels.runtime.config import EnvConfig

    mario = make_env(EnvConfig(name="mario", max_steps=6))
    try:
        episode = play_episode(mario, None, seed=3, record=True)
        again = rollout_episode(mario, EnvConfig(name="mario", max_steps=6), _Replay(episode.actions), seed=3)
    finally:
        mario.close()
    assert len(episode.sprites) == len(episode.frames) == 7
    np.testing.assert_array_equal(np.stack(episode.sprites)[:, 0], again["player"])
    np.testing.assert_array_equal(np.stack(episode.sprites)[:, 1:], again["enemies"])
    np.testing.assert_allclose(episode.sprites[0][0], [12.0, 200 * 64 / 240], rtol=1e-6)
    game = NoiseGame(spaces.Box(-1.0, 1.0, (3,), np.float32), length=3)
    assert play_episode(game, None, 0, record=True).sprites == [None] * 4


class _Replay:
    """A policy that plays back recorded actions."""

    def __init__(self, actions):
        self.actions = list(actions)

    def reset(self) -> None:
        self.step = 0

    def act(self, obs):
        self.step += 1
        return self.actions[self.step - 1]


def test_episode_stats_summarise_returns_and_the_furthest_x_where_the_game_reports_it():
    mario = [Episode(seed=0, ret=10.0, steps=5, max_x=300.0), Episode(seed=1, ret=30.0, steps=9, max_x=900.0)]
    stats = evaluate.episode_stats(mario)
    assert (stats["mean"], stats["std"], stats["min"], stats["max"]) == (20.0, 10.0, 10.0, 30.0)
    assert stats["returns"] == [10.0, 30.0]
    assert stats["max_x"] == {
        "mean": 600.0,
        "std": 300.0,
        "min": 300.0,
        "max": 900.0,
        "values": [300.0, 900.0],
    }
    carracing = [Episode(seed=0, ret=-5.0, steps=3), Episode(seed=1, ret=5.0, steps=3)]
    assert "max_x" not in evaluate.episode_stats(carracing)


def test_the_paired_difference_is_seed_by_seed_and_the_report_shows_the_teachers():
    from frmdn_worldmodels.agent.play import Episode
    from frmdn_worldmodels.stages.evaluate import episode_stats, paired_difference
    from frmdn_worldmodels.stages.report import _headline

    agent = [
        Episode(seed, ret, 10, max_x=x) for seed, ret, x in [(1, 5.0, 300), (2, 9.0, 500), (3, 1.0, 200)]
    ]
    teacher = [
        Episode(seed, ret, 10, max_x=x) for seed, ret, x in [(1, 4.0, 250), (2, 6.0, 600), (3, 3.0, 100)]
    ]
    paired = paired_difference(agent, teacher)
    differences = np.array([1.0, 3.0, -2.0])
    assert paired["mean"] == pytest.approx(differences.mean())
    assert paired["se"] == pytest.approx(differences.std(ddof=1) / np.sqrt(3))
    assert paired["max_x"]["mean"] == pytest.approx(np.mean([50, -100, 100]))
    with pytest.raises(ValueError, match="the same seeds"):
        paired_difference(agent, teacher[::-1])
    evaluation = {
        **episode_stats(agent),
        "episodes": 3,
        "teacher": {"policy": "ram_expert", **episode_stats(teacher), "agent_minus_teacher": paired},
    }
    (row,) = [line for line in _headline({"evaluate": evaluation}) if "teacher (ram_expert)" in line]
    assert "4.3 ± 1.2; agent - teacher, paired: +0.7 ± 1.5, furthest x +17 ± 60" in row
