r"""The V + M + C agent that plays the real game from raw frames.

Per step t (the same alignment as the dream, docs/architecture.md):

1. V encodes the frame: :math:`z_t \sim q(z \mid x_t)` (a posterior sample), or its mean with
   ``memory_train.use_mu``: the same choice the memory was trained on;
2. C acts on :math:`(z_t, h_t)`, where :math:`h_t` is the memory's LSTM output *before* reading
   :math:`(z_t, a_t)` (zeros at the start of an episode);
3. M reads :math:`(z_t, a_t)`, which gives :math:`h_{t+1}` for the next step.

``play_episodes`` plays N envs in lockstep, so V, M and C run once per step for all of them: a single
frame leaves the CPU mostly waiting on the weights, a batch of frames keeps it busy
(``perf/agent_overhead.py``). ``agent=None`` plays random actions, the baseline.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import gymnasium
import numpy as np
import torch
from torch import Tensor

from frmdn_worldmodels.games.envs import action_dim, action_space, is_discrete, sprite_centres
from frmdn_worldmodels.games.game import Policy, game_of
from frmdn_worldmodels.models.controller import Controller
from frmdn_worldmodels.models.memory import MemoryModel
from frmdn_worldmodels.models.vae import ConvVAE, frames_to_tensor, posterior_sample
from frmdn_worldmodels.runtime.config import Config, ConfigError, ControllerConfig, EnvConfig
from frmdn_worldmodels.runtime.seeds import episode_rng


def controller_for(env_cfg: EnvConfig, memory: MemoryModel, c: ControllerConfig) -> Controller:
    """The controller that reads this memory's z and h and drives this game, with ``c.hidden`` tanh units
    (0 = linear) and the action rule ``c.policy``."""
    return Controller(
        memory.target_dim,
        memory.config.hidden,
        action_dim(env_cfg),
        is_discrete(env_cfg),
        c.hidden,
        c.policy == "sample",
    )


def check_controller_config(cfg: Config) -> None:
    """Refuse ``controller.policy: sample`` for a game of continuous actions (``ConfigError`` naming it)."""
    if cfg.controller.policy == "sample" and not is_discrete(cfg.env):
        raise ConfigError(
            f"controller.policy: sample draws from a softmax over discrete actions; env.name={cfg.env.name} "
            "has continuous ones (use argmax)"
        )


@contextmanager
def onednn(enabled: bool) -> Iterator[None]:
    """Run the block with oneDNN (torch's mkldnn backend) on or off. Measured on this project's 2-core CPU,
    one thread, per frame: the VAE encoder takes 0.77 ms without oneDNN and 1.07 ms with it for 1 frame, but
    0.67 ms without and 0.35 ms with it (channels-last) for 8 frames; the memory's LSTM step is faster without
    (0.17 vs 0.36 ms)."""
    previous = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = enabled
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = previous


ONEDNN_MIN_FRAMES = 4
"""From this many frames per call on, the VAE encoder runs faster with oneDNN, on channels-last tensors."""


class WorldModelAgent:
    """Acts for N envs at once (N = 1 for a single game) from uint8 frames with V, C and M.

    Every env keeps its own memory state and its own random generator for the posterior samples, so an
    episode depends on its seed, not on which other episodes share the batch (up to float rounding).
    """

    def __init__(
        self,
        vae: ConvVAE,
        memory: MemoryModel,
        controller: Controller,
        params: Tensor | np.ndarray,
        use_mu: bool = False,
        device: str | torch.device = "cpu",
    ):
        if vae.latent_dim != memory.target_dim:
            raise ValueError(f"the VAE makes z of {vae.latent_dim}, the memory reads {memory.target_dim}")
        self.vae, self.memory, self.controller = vae.eval(), memory.eval(), controller
        self.use_mu, self.device = use_mu, torch.device(device)
        self.set_params(params)
        # the same weights laid out for oneDNN, for batches of frames
        self.channels_last_vae = copy.deepcopy(vae).to(memory_format=torch.channels_last).eval()
        self.generators: list[torch.Generator] = []
        self.state = None
        self.policy_rngs: list[np.random.Generator] = []
        """Each env's draws of a sampling controller (``Controller.sample``), seeded by its episode's seed."""
        self.noise: ActionNoise | None = None
        """Exploration noise on the actions (iterative training's collection), applied before M reads them."""

    def set_params(self, params: Tensor | np.ndarray) -> None:
        """Drive with other controller parameters (the models stay loaded): ``[n]`` for every env, or
        ``[N, n]``, one controller per env (e.g. several CMA-ES candidates played in one lockstep batch)."""
        if isinstance(params, Tensor):
            params = params.detach().to(self.device, torch.float32).clone()
        else:  # a copy: Ray's arrays are read-only
            params = torch.tensor(np.array(params, dtype=np.float32), device=self.device)
        self.controller.split(params)  # checks the parameter count
        if params.dim() not in (1, 2):
            raise ValueError(f"controller params must be [n] or [N, n], got {tuple(params.shape)}")
        self.params = params

    def reset(self, seeds: int | Sequence[int] | None = None) -> None:
        """Start one episode per seed (a single int: one env; None: one env, unseeded): h_0 = 0, and each
        episode's posterior samples (and a sampling controller's draws) come from generators seeded with its
        seed."""
        seeds = [seeds] if seeds is None or isinstance(seeds, (int, np.integer)) else list(seeds)
        self.generators = [torch.Generator(device=self.device) for _ in seeds]
        for generator, seed in zip(self.generators, seeds, strict=True):
            if seed is None:
                generator.seed()
            else:
                generator.manual_seed(int(seed))
        self.state = self.memory.initial_state(len(seeds), self.device)
        self.policy_rngs = [
            np.random.default_rng() if seed is None else episode_rng("policy", seed) for seed in seeds
        ]
        if self.noise is not None:
            self.noise.reset(seeds)

    def encode(self, frames: np.ndarray) -> Tensor:
        """z ``[N, Z]`` of uint8 frames ``[N, 64, 64, 3]``: the posterior mean with ``use_mu``, else a
        sample."""
        x = frames_to_tensor(frames, self.device)
        if len(frames) < ONEDNN_MIN_FRAMES:
            with onednn(False):
                mu, logvar = self.vae.encode(x)
        else:
            with onednn(True):
                mu, logvar = self.channels_last_vae.encode(x.contiguous(memory_format=torch.channels_last))
        if self.use_mu:
            return mu
        noise = torch.stack(
            [torch.randn(mu.shape[1:], generator=g, device=self.device) for g in self.generators]
        )
        return posterior_sample(mu, logvar, noise.to(mu.dtype))

    @torch.inference_mode()
    def act(self, frames: np.ndarray) -> list | np.ndarray | int:
        """The env actions for frames ``[N, 64, 64, 3]`` (a list of N), or for one frame ``[64, 64, 3]`` (one
        action); advances each env's memory by its (z_t, a_t)."""
        single = frames.ndim == 3
        frames = frames[None] if single else frames
        if self.state is None:
            self.reset()
        if self.state[0].shape[1] != len(frames):
            raise ValueError(
                f"the agent was reset for {self.state[0].shape[1]} envs, got {len(frames)} frames"
            )
        if self.params.dim() == 2 and len(self.params) != len(frames):
            raise ValueError(f"{len(self.params)} controllers for {len(frames)} envs")
        z = self.encode(frames)
        features = torch.cat([z, self.state[0][0]], dim=-1)  # h_t: before reading (z_t, a_t)
        if self.params.dim() == 2:  # one controller per env: the population form with one rollout each
            logits = self.controller.logits(self.params, features.unsqueeze(1)).squeeze(1)
        else:
            logits = self.controller.logits(self.params, features)
        uniforms = None
        if self.controller.sample:
            uniforms = torch.tensor([rng.random() for rng in self.policy_rngs], device=self.device)
        action = self.controller.squash(logits, uniforms)
        if self.noise is not None:  # M reads the action the env gets
            action = self.noise(action)
        with onednn(False):
            _, self.state = self.memory.step(z, self.controller.encode(action), self.state)
        actions = (
            action.cpu().tolist()
            if self.controller.discrete
            else list(action.cpu().numpy().astype(np.float32))
        )
        return actions[0] if single else actions


class ActionNoise:
    """Exploration noise on the agent's actions, from one generator per episode seeded by the episode's seed:
    Gaussian of std ``scale`` on a continuous action, clipped to the game's box ``space``; for a discrete
    game, a uniformly random action with probability ``scale``."""

    def __init__(self, controller: Controller, scale: float, space: gymnasium.spaces.Space):
        self.controller, self.scale, self.space = controller, scale, space
        self.generators: list[np.random.Generator] = []

    def reset(self, seeds: Sequence[int | None]) -> None:
        self.generators = [episode_rng("action-noise", seed or 0) for seed in seeds]

    def __call__(self, action: Tensor) -> Tensor:
        if self.controller.discrete:
            action = action.clone()
            for i, generator in enumerate(self.generators):
                if generator.random() < self.scale:
                    action[i] = int(generator.integers(self.controller.action_dim))
            return action
        noise = np.stack([generator.standard_normal(action.shape[-1]) for generator in self.generators])
        noisy = action + self.scale * torch.as_tensor(noise, dtype=action.dtype, device=action.device)
        low, high = (
            torch.as_tensor(bound, dtype=action.dtype, device=action.device)
            for bound in (self.space.low, self.space.high)
        )
        return torch.maximum(torch.minimum(noisy, high), low)


@dataclass
class Episode:
    """One real-game episode."""

    seed: int
    ret: float
    """Sum of the env's rewards."""
    steps: int
    frames: list[np.ndarray] = field(default_factory=list)
    """The observed uint8 frames, when recorded (the first, then one after every action)."""
    actions: list = field(default_factory=list)
    """When recorded: the env action of every step."""
    rewards: list[float] = field(default_factory=list)
    """When recorded: the reward of every step."""
    terminals: list[bool] = field(default_factory=list)
    """When recorded: whether the game itself ended with the step (gymnasium's ``terminated``)."""
    sprites: list = field(default_factory=list)
    """When recorded: where the sprites are in each frame (``games.envs.sprite_centres``; None:
    CarRacing)."""
    max_x: float | None = None
    """The furthest ``info["x_pos"]`` reached (Super Mario Bros reports it; None for games that don't)."""


def play_episodes(
    envs: Sequence[gymnasium.Env],
    agent: WorldModelAgent | PolicyBatch | None,
    seeds: Sequence[int],
    max_steps: int | None = None,
    record: bool = False,
) -> list[Episode]:
    """One episode per seed, ``envs[i]`` playing from ``reset(seed=seeds[i])``, all in lockstep (the agent
    encodes and acts for every env at once), each until its game ends, its env truncates, or ``max_steps``.

    ``agent=None`` plays uniformly random actions from each env's ``action_space`` seeded with its seed; a
    ``PolicyBatch`` plays its policies.
    """
    if len(envs) < len(seeds):
        raise ValueError(f"{len(seeds)} episodes need as many envs, got {len(envs)}")
    envs = list(envs[: len(seeds)])
    observations = [env.reset(seed=int(seed))[0] for env, seed in zip(envs, seeds, strict=True)]
    if agent is None:
        for env, seed in zip(envs, seeds, strict=True):
            env.action_space.seed(int(seed))
    else:
        agent.reset([int(seed) for seed in seeds])
    episodes = [
        Episode(
            seed=int(seed),
            ret=0.0,
            steps=0,
            frames=[obs] if record else [],
            sprites=[sprite_centres(env)] if record else [],
        )
        for seed, obs, env in zip(seeds, observations, envs, strict=True)
    ]
    playing = [max_steps is None or max_steps > 0] * len(envs)
    while any(playing):
        # finished envs keep their last frame in the batch (their actions are ignored):
        # the batch keeps its shape
        actions = (
            agent.act(np.stack(observations))
            if agent is not None
            else [env.action_space.sample() for env in envs]
        )
        for i, env in enumerate(envs):
            if not playing[i]:
                continue
            observations[i], reward, terminated, truncated, info = env.step(actions[i])
            episode = episodes[i]
            episode.ret += float(reward)
            if "x_pos" in info:
                episode.max_x = max(float(info["x_pos"]), episode.max_x or 0.0)
            episode.steps += 1
            if record:
                episode.frames.append(observations[i])
                episode.actions.append(actions[i])
                episode.rewards.append(float(reward))
                episode.terminals.append(bool(terminated))
                episode.sprites.append(sprite_centres(env))
            playing[i] = not (
                terminated or truncated or (max_steps is not None and episode.steps >= max_steps)
            )
    return episodes


def play_episode(
    env: gymnasium.Env,
    agent: WorldModelAgent | None,
    seed: int,
    max_steps: int | None = None,
    record: bool = False,
) -> Episode:
    """``play_episodes`` for one env and one seed."""
    return play_episodes([env], agent, [seed], max_steps, record)[0]


class PolicyBatch:
    """One-env policies (``games.game.Policy``: an exploration policy, a teacher) played in lockstep by
    ``play_episodes``, policy i in env i."""

    def __init__(self, policies: Sequence[Policy]):
        self.policies = list(policies)

    def reset(self, seeds: Sequence[int]) -> None:
        if len(seeds) != len(self.policies):
            raise ValueError(f"{len(seeds)} episodes for {len(self.policies)} policies")
        for policy in self.policies:
            policy.reset()

    def act(self, frames: np.ndarray) -> list:
        return [policy.act(frame) for policy, frame in zip(self.policies, frames, strict=True)]


def teacher_batch(
    env_cfg: EnvConfig, teacher: str, envs: Sequence[gymnasium.Env], seeds: Sequence[int]
) -> PolicyBatch:
    """The game's teacher ``teacher`` (``Game.teachers``) for each env, episode ``seeds[i]`` drawing from
    ``episode_rng("teacher", seeds[i])``: what ``evaluate.teacher`` plays."""
    make = game_of(env_cfg).teachers[teacher]
    return PolicyBatch(
        [make(env_cfg, episode_rng("teacher", seed), env) for env, seed in zip(envs, seeds, strict=True)]
    )


class AgentPolicy:
    """A ``WorldModelAgent`` as a one-env policy of the collector (``games.game.Policy``): one episode."""

    def __init__(self, agent: WorldModelAgent, seed: int):
        self.agent, self.seed = agent, seed

    def reset(self) -> None:
        self.agent.reset(self.seed)

    def act(self, obs: np.ndarray) -> int | np.ndarray:
        return self.agent.act(obs)


@dataclass
class ControllerPlayer:
    """Iterative training's player (``stages.collect.Player``): the controller ``params`` acting through V
    and M, with exploration noise (``noise``: ``action`` perturbs each action by ``ActionNoise`` of
    ``scale``; ``params`` plays each episode with params + scale x N(0, I)), each episode's noise seeded by
    its env seed. The models are sent as state dicts and built once per worker, on its first episode."""

    env_cfg: EnvConfig
    vae_state: dict
    memory_payload: dict
    params: np.ndarray
    use_mu: bool
    controller: ControllerConfig
    noise: str
    scale: float
    _agent: WorldModelAgent | None = field(default=None, repr=False)

    def agent(self) -> WorldModelAgent:
        if self._agent is None:
            vae = ConvVAE(self.vae_state["fc_mu.weight"].shape[0])
            vae.load_state_dict(self.vae_state)
            memory = MemoryModel.from_checkpoint(self.memory_payload)
            controller = controller_for(self.env_cfg, memory, self.controller)
            self._agent = WorldModelAgent(vae, memory, controller, self.params, self.use_mu)
        return self._agent

    def policy(self, env: gymnasium.Env, rng: np.random.Generator, env_seed: int) -> AgentPolicy:
        agent = self.agent()
        params = np.asarray(self.params, dtype=np.float32)
        if self.noise == "params":
            draw = episode_rng("param-noise", env_seed).standard_normal(len(params))
            agent.set_params(params + self.scale * draw.astype(np.float32))
        else:
            agent.set_params(params)
            agent.noise = ActionNoise(agent.controller, self.scale, action_space(self.env_cfg))
        return AgentPolicy(agent, env_seed)
